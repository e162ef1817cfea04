# Shared by demo/run.sh (local) and demo/compose-load.sh (docker compose). Needs only bash.

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
    if [ $SECONDS -ge $deadline ]; then
      echo "demo: $what on $host:$port did not become ready" >&2
      return 1
    fi
    sleep 0.2
  done
}

# run_comparison BIN_DIR OUT_DIR: the same workload through RANDOM, then LEAST_OUTSTANDING_REQUESTS.
run_comparison() {
  local bin=$1 out=$2
  mkdir -p "$out"
  echo "demo: RANDOM                     (16 users, 4 servers, $((3 + 22)) s)..."
  # shellcheck disable=SC2086
  "$bin/model-load" --url "http://127.0.0.1:$DEMO_RANDOM_PORT" --label RANDOM \
    $DEMO_LOAD_FLAGS --json "$out/random.json" > "$out/random.txt"
  echo "demo: LEAST_OUTSTANDING_REQUESTS (same workload and seed)..."
  # shellcheck disable=SC2086
  "$bin/model-load" --url "http://127.0.0.1:$DEMO_LOR_PORT" --label LEAST_OUTSTANDING_REQUESTS \
    $DEMO_LOAD_FLAGS --json "$out/lor.json" > "$out/lor.txt"
  echo
  "$bin/model-compare" "$out/random.json" "$out/lor.json"
}
