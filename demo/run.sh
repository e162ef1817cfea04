#!/usr/bin/env bash
# `make demo`: four simulated model servers and an Envoy with model-lb on loopback; the same
# streaming workload through RANDOM and through LEAST_OUTSTANDING_REQUESTS; a side-by-side table.
# Stops everything it started, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source demo/workload.env
source demo/lib.sh

BIN=target/sim
ENVOY=${ENVOY_BIN:-.venv/bin/envoy}
OUT=target/demo
for tool in "$BIN/model-server" "$BIN/model-load" "$BIN/model-compare" "$ENVOY" \
            target/wasm32-wasip1/release/model_lb.wasm; do
  [ -x "$tool" ] || [ -f "$tool" ] || { echo "demo: $tool is missing; run 'make demo'" >&2; exit 1; }
done
for port in $DEMO_SERVER_PORTS $DEMO_LOR_PORT $DEMO_RANDOM_PORT $DEMO_ADMIN_PORT; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port on 127.0.0.1 is already in use; stop whatever listens there" >&2
    exit 1
  fi
done

mkdir -p "$OUT"
pids=()
cleanup() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted, stopping"; exit 130' INT TERM

for port in $DEMO_SERVER_PORTS; do
  # shellcheck disable=SC2086
  "$BIN/model-server" --listen "127.0.0.1:$port" --id "127.0.0.1:$port" --seed "$port" \
    $DEMO_SERVER_FLAGS > "$OUT/server-$port.log" 2>&1 &
  pids+=($!)
done
"$ENVOY" -c "$DEMO_ENVOY_CONFIG" --concurrency 2 --disable-hot-restart -l warning \
  > "$OUT/envoy.log" 2>&1 &
pids+=($!)
for port in $DEMO_SERVER_PORTS; do
  wait_ready "model server" 127.0.0.1 "$port" /health
done
wait_ready Envoy 127.0.0.1 "$DEMO_ADMIN_PORT" /ready
echo "demo: 4 model servers (127.0.0.1:8001-8004) and Envoy (LOR :$DEMO_LOR_PORT, RANDOM :$DEMO_RANDOM_PORT, admin :$DEMO_ADMIN_PORT) are up"

run_comparison "$BIN" "$OUT"

echo
echo "demo: reports, full tables and logs are in $OUT/"
