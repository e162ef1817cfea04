#!/usr/bin/env bash
# `make fuzz`: the plugin-configuration parser (fuzz_targets/config.rs) under libFuzzer for
# SECONDS (default $FUZZ_SECONDS or 60), on stable Rust, with no sanitizer and no cargo-fuzz.
#
#   fuzz/run.sh [SECONDS [LIBFUZZER_FLAG...]]
#
# It builds what `cargo fuzz run --sanitizer none config` builds, with cargo-fuzz 0.13's flags
# (below) into the same fuzz/target/ directory, runs it on corpus/config and seeds/config as
# cargo-fuzz would, keeps libFuzzer's output in $FUZZ_LOG (default target/fuzz.log at the repo
# root) and prints one line. On a crash it prints the panic, the end of the log and the saved
# input, and fails.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-${FUZZ_SECONDS:-60}}
shift || true
log=${FUZZ_LOG:-$(cd .. && pwd)/target/fuzz.log}
log_shown=${log#"$(cd .. && pwd)/"}

triple=$(rustc -vV | sed -n 's/^host: //p')
# What cargo-fuzz passes: sancov coverage (8-bit counters, PC table, comparisons, stack depth),
# cfg(fuzzing), no branch folding, debug assertions, one codegen unit; --target keeps these
# flags off build scripts and proc macros.
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
flags+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0"
[[ $triple == *-linux-* ]] && flags+=" -Cllvm-args=-sanitizer-coverage-stack-depth"
# make test's 20 s smoke run takes 16 codegen units (FUZZ_CODEGEN_UNITS): it builds in a third
# of the time, and 20 s of fuzzing does not need the last percent of speed.
flags+=" -Cdebug-assertions -Ccodegen-units=${FUZZ_CODEGEN_UNITS:-1}"
RUSTFLAGS="$flags${RUSTFLAGS:+ $RUSTFLAGS}" cargo build --release \
  --config 'profile.release.debug="line-tables-only"' --target "$triple" --bin config

mkdir -p corpus/config artifacts/config "$(dirname "$log")"
echo "fuzz: config parser for $seconds s (libFuzzer, stable Rust, no sanitizer)..."
status=0
"${CARGO_TARGET_DIR:-target}/$triple/release/config" -artifact_prefix=artifacts/config/ -max_total_time="$seconds" \
  -max_len=65536 -print_final_stats=1 "$@" corpus/config seeds/config > "$log" 2>&1 || status=$?

# 1234567 -> 1,234,567
thousands() { sed -e ':a' -e 's/\([0-9]\)\([0-9]\{3\}\)\($\|,\)/\1,\2\3/' -e 'ta' <<< "$1"; }
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
if [ -z "$runs" ]; then  # no final stats: it died before or while reporting
  runs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$log" | tail -n 1)
fi
artifacts=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log")
crashes=$(grep -c . <<< "$artifacts" || true)

if [ "$status" -eq 0 ] && [ "$crashes" -eq 0 ]; then
  echo "fuzz: config parser, $(thousands "${runs:-0}") runs in ${took:-$seconds} s, 0 crashes (log: $log_shown)"
  exit 0
fi

# The panic message (if any), then libFuzzer's last lines: the input, where it was saved, stats.
{
  grep -m 1 -A 1 "panicked at" "$log" || true
  echo "..."
  tail -n 15 "$log"
} | sed 's/^/fuzz: | /' >&2
if [ "$crashes" -gt 0 ]; then
  echo "fuzz: config parser FAILED after $(thousands "${runs:-?}") runs: $crashes crash(es) (log: $log_shown)" >&2
  while read -r input; do
    echo "fuzz: input saved in fuzz/$input; reproduce with: fuzz/target/$triple/release/config fuzz/$input" >&2
  done <<< "$artifacts"
else
  echo "fuzz: config parser FAILED: libFuzzer exited with status $status (log: $log_shown)" >&2
fi
exit 1
