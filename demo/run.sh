#!/usr/bin/env bash
# `make demo`: four simulated model servers and an Envoy with model-lb on loopback; the same
# streaming workload through RANDOM and through LEAST_OUTSTANDING_REQUESTS; a side-by-side table.
#
# Reports, table and logs are written to a scratch directory and replace $DEMO_OUT (default
# target/demo/) only after a complete run: both phases finished, the servers and Envoy up all
# along, at most 10 % of requests failed. Anything else (Ctrl-C, SIGTERM, a server or Envoy that
# stops, a phase of errors) stops everything it started, says why, prints no table, leaves
# $DEMO_OUT as it was and exits non-zero.
#
# Environment: DEMO_OUT; DEMO_WARMUP_S and DEMO_MEASURE_S (demo/workload.env); ENVOY_BIN;
# DEMO_PORT_BASE=N runs the same demo on ports N+1..N+7 instead of the fixed ones (for tests).
set -euo pipefail
cd "$(dirname "$0")/.."
source demo/workload.env
source demo/lib.sh

BIN=target/sim
ENVOY=${ENVOY_BIN:-.venv/bin/envoy}
OUT=${DEMO_OUT:-target/demo}
OUT=${OUT%/}
for tool in "$BIN/model-server" "$BIN/model-load" "$BIN/model-compare" "$ENVOY" \
            target/wasm32-wasip1/release/model_lb.wasm; do
  [ -x "$tool" ] || [ -f "$tool" ] || { echo "demo: $tool is missing; run 'make demo'" >&2; exit 1; }
done

mkdir -p "$(dirname "$OUT")"
work=$(mktemp -d "$(dirname "$OUT")/.demo-run.XXXXXX")
chmod 755 "$work"
declare -A started=()  # pid -> what it is, for the model servers and Envoy
declare -A logs=()     # pid -> its log
complete=

stop_all() {
  if [ -n "$DEMO_LOAD_PID" ]; then
    kill "$DEMO_LOAD_PID" 2>/dev/null || true
    wait "$DEMO_LOAD_PID" 2>/dev/null || true
    DEMO_LOAD_PID=
  fi
  if [ ${#started[@]} -gt 0 ]; then
    kill "${!started[@]}" 2>/dev/null || true
    wait "${!started[@]}" 2>/dev/null || true
    started=()
  fi
}
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_all
  rm -rf "$work"
  if [ -z "$complete" ]; then
    echo "demo: the run did not complete: no results; $OUT/ is as it was" >&2
    [ "$status" -ne 0 ] || status=1
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted, stopping everything it started" >&2; exit 130' INT
trap 'echo; echo "demo: terminated, stopping everything it started" >&2; exit 143' TERM

# Everything the load runs against must stay up: a server or Envoy that stops (a crash, or Ctrl-C
# where the demo itself ignores it, as a background job of a script does) ends the run.
demo_alive() {
  local pid status
  for pid in "${!started[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      status=0
      wait "$pid" 2>/dev/null || status=$?
      echo >&2
      echo "demo: ${started[$pid]} stopped (exit status $status); its log ends:" >&2
      tail -n 5 "${logs[$pid]}" | sed 's/^/demo:   | /' >&2
      unset "started[$pid]"
      return 1
    fi
  done
}

envoy_config=$DEMO_ENVOY_CONFIG
if [ -n "${DEMO_PORT_BASE:-}" ]; then
  if ! [ "$DEMO_PORT_BASE" -gt 10001 ] || ! [ "$DEMO_PORT_BASE" -lt 65528 ]; then
    echo "demo: DEMO_PORT_BASE must be between 10002 and 65527" >&2
    exit 1
  fi
  envoy_config=$work/envoy.yaml
  edits=() n=0 servers=
  for port in $DEMO_SERVER_PORTS; do
    n=$((n + 1))
    edits+=(-e "s/port_value: $port /port_value: $((DEMO_PORT_BASE + n)) /")
    edits+=(-e "s/\"127\.0\.0\.1:$port\"/\"127.0.0.1:$((DEMO_PORT_BASE + n))\"/g")
    servers+=" $((DEMO_PORT_BASE + n))"
  done
  for var in DEMO_LOR_PORT DEMO_RANDOM_PORT DEMO_ADMIN_PORT; do
    n=$((n + 1))
    edits+=(-e "s/port_value: ${!var} /port_value: $((DEMO_PORT_BASE + n)) /")
    printf -v "$var" %s $((DEMO_PORT_BASE + n))
  done
  DEMO_SERVER_PORTS=${servers# }
  sed "${edits[@]}" "$DEMO_ENVOY_CONFIG" > "$envoy_config"
fi

for port in $DEMO_SERVER_PORTS $DEMO_LOR_PORT $DEMO_RANDOM_PORT $DEMO_ADMIN_PORT; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is already in use; stop whatever listens there" >&2
    exit 1
  fi
done

for port in $DEMO_SERVER_PORTS; do
  # shellcheck disable=SC2086
  "$BIN/model-server" --listen "127.0.0.1:$port" --id "127.0.0.1:$port" --seed "$port" \
    $DEMO_SERVER_FLAGS > "$work/server-$port.log" 2>&1 &
  started[$!]="the model server on 127.0.0.1:$port"
  logs[$!]=$work/server-$port.log
done
"$ENVOY" -c "$envoy_config" --concurrency 2 --disable-hot-restart -l warning \
  > "$work/envoy.log" 2>&1 &
started[$!]=Envoy
logs[$!]=$work/envoy.log
for port in $DEMO_SERVER_PORTS; do
  wait_ready "model server" 127.0.0.1 "$port" /health
done
wait_ready Envoy 127.0.0.1 "$DEMO_ADMIN_PORT" /ready
read -r first _ _ last <<< "$DEMO_SERVER_PORTS"
echo "demo: 4 model servers (127.0.0.1:$first-$last) and Envoy (LOR :$DEMO_LOR_PORT, RANDOM :$DEMO_RANDOM_PORT, admin :$DEMO_ADMIN_PORT) are up"

run_comparison "$BIN" "$work"
demo_alive
stop_all

# Complete: the results replace the previous ones, then the table is shown.
rm -f "$work/envoy.yaml"
find "$work" -name '*.err' -empty -delete
if [ -e "$OUT" ]; then
  mv "$OUT" "$work.old"
fi
mv "$work" "$OUT"
rm -rf "$work.old"
complete=1
echo
cat "$OUT/compare.txt"
echo
echo "demo: reports, full tables and logs are in $OUT/"
