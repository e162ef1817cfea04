# shellcheck shell=bash
# Shared by demo/run.sh (local) and demo/compose-load.sh (docker compose). Needs only bash.
# Every function returns non-zero with a message on stderr instead of exiting, so that the
# caller decides what a failure means.

# demo_alive: succeeds while everything the load runs against is up. run.sh replaces it with a
# check of the model servers and Envoy it started; in compose, compose itself watches them.
demo_alive() { return 0; }

# The model-load process of the phase under way (run.sh's cleanup stops it).
DEMO_LOAD_PID=

# http_status HOST PORT PATH: prints the HTTP status code, or nothing if nobody answers.
http_status() {
  local reply
  reply=$( (exec 3<>"/dev/tcp/$1/$2" && printf 'GET %s HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n' "$3" >&3 \
            && head -c 12 <&3) 2>/dev/null) || return 0
  echo "${reply:9:3}"
}

# wait_ready WHAT HOST PORT PATH [SECONDS]: waits for a 200, or fails with a message.
wait_ready() {
  local what=$1 host=$2 port=$3 path=$4 deadline=$((SECONDS + ${5:-60}))
  until [ "$(http_status "$host" "$port" "$path")" = 200 ]; do
    demo_alive || return 1
    if [ $SECONDS -ge $deadline ]; then
      echo "demo: $what on $host:$port did not become ready" >&2
      return 1
    fi
    sleep 0.2
  done
}

# report_field FILE KEY: a top-level integer of a model-load JSON report (serde's pretty
# printing puts top-level keys at two spaces).
report_field() {
  sed -n "s/^  \"$2\": \([0-9]*\),\{0,1\}$/\1/p" "$1"
}

# phase_progress LABEL ELAPSED TOTAL: "demo:   RANDOM 10/25 s"; past the end, model-load is
# waiting for the requests still in flight (long answers take several seconds).
phase_progress() {
  if [ "$2" -le "$3" ]; then
    printf 'demo:   %s %d/%d s' "$1" "$2" "$3"
  else
    printf 'demo:   %s %d/%d s, the last requests are finishing' "$1" "$2" "$3"
  fi
}

# run_phase BIN_DIR LABEL PORT OUT_PREFIX: one model-load run against 127.0.0.1:PORT, with an
# elapsed/total line every 5 s (every second in place on a terminal). Succeeds only if the run
# finished, everything stayed up, and at most 10 % of the measured requests failed.
run_phase() {
  local bin=$1 label=$2 port=$3 out=$4
  local total=$((DEMO_WARMUP_S + DEMO_MEASURE_S)) start=$SECONDS elapsed shown=0 status=0
  local tty=; [ -t 1 ] && tty=1
  # shellcheck disable=SC2086
  "$bin/model-load" --url "http://127.0.0.1:$port" --label "$label" \
    $DEMO_LOAD_FLAGS --json "$out.json" > "$out.txt" 2> "$out.err" &
  DEMO_LOAD_PID=$!
  while kill -0 "$DEMO_LOAD_PID" 2>/dev/null; do
    if ! demo_alive; then
      [ -n "$tty" ] && echo
      kill "$DEMO_LOAD_PID" 2>/dev/null || true
      wait "$DEMO_LOAD_PID" 2>/dev/null || true
      DEMO_LOAD_PID=
      echo "demo: the $label phase cannot finish" >&2
      return 1
    fi
    elapsed=$((SECONDS - start))
    if [ -n "$tty" ]; then
      printf '\r%s' "$(phase_progress "$label" "$elapsed" "$total")"
    elif [ $elapsed -ge $((shown + 5)) ]; then
      shown=$((elapsed - elapsed % 5))
      phase_progress "$label" "$shown" "$total"
      echo
    fi
    sleep 1
  done
  [ -n "$tty" ] && printf '\r%s, done\n' "$(phase_progress "$label" $((SECONDS - start)) "$total")"
  wait "$DEMO_LOAD_PID" || status=$?
  DEMO_LOAD_PID=
  demo_alive || return 1
  if [ $status -ne 0 ] || [ ! -s "$out.json" ]; then
    echo "demo: model-load ($label) failed with status $status:" >&2
    tail -n 5 "$out.err" >&2
    return 1
  fi
  local requests ok errors
  requests=$(report_field "$out.json" requests)
  ok=$(report_field "$out.json" ok)
  if [ -z "$requests" ] || [ -z "$ok" ] || [ "$ok" -eq 0 ] || [ $((10 * (requests - ok))) -gt "$requests" ]; then
    errors=$(tr -d ' \n' < "$out.json" | sed -n 's/.*"errors":{\([^}]*\)}.*/\1/p')
    echo "demo: the $label phase is not a valid measurement: ${ok:-?} of ${requests:-?} requests succeeded (errors: ${errors:-none})" >&2
    return 1
  fi
}

# run_comparison BIN_DIR OUT_DIR: the same workload through RANDOM, then
# LEAST_OUTSTANDING_REQUESTS; writes both reports and the side-by-side table (compare.txt) to
# OUT_DIR, and prints nothing of the results. Fails if either phase did.
run_comparison() {
  local bin=$1 out=$2 total=$((DEMO_WARMUP_S + DEMO_MEASURE_S))
  mkdir -p "$out" || return 1
  echo "demo: RANDOM                     (16 users, 4 servers, $DEMO_WARMUP_S s warm-up + $DEMO_MEASURE_S s measured)..."
  run_phase "$bin" RANDOM "$DEMO_RANDOM_PORT" "$out/random" || return 1
  echo "demo: LEAST_OUTSTANDING_REQUESTS (same workload and seed, $total s)..."
  run_phase "$bin" LEAST_OUTSTANDING_REQUESTS "$DEMO_LOR_PORT" "$out/lor" || return 1
  "$bin/model-compare" "$out/random.json" "$out/lor.json" > "$out/compare.txt" || return 1
}
