#!/usr/bin/env bash
# The docker compose demo's load service: waits for the servers and Envoy (all share one network
# namespace, so the addresses are the local demo's), then runs the same comparison and prints the
# table only if both phases completed (otherwise it exits non-zero, and compose stops the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
source demo/workload.env
source demo/lib.sh
for port in $DEMO_SERVER_PORTS; do
  wait_ready "model server" 127.0.0.1 "$port" /health 120
done
wait_ready Envoy 127.0.0.1 "$DEMO_ADMIN_PORT" /ready 120
run_comparison /usr/local/bin /tmp/demo
echo
cat /tmp/demo/compare.txt
