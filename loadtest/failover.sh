#!/usr/bin/env bash
# Two agents of one name, one of whose upstreams is down, by relay binary: a relay with the memory
# store, a loadgen upstream behind one `burrow agent --name svc`, and a second agent `svc` whose
# upstream is a port where nothing listens. wrk sends small GETs; then sequential PUTs of a
# 100 KB body. One line per binary: requests per second, p50, p99 and the answers that were not
# 2xx. Everything runs on 127.0.0.1, is bounded in time and stops by itself.
#
#   loadtest/failover.sh /tmp/old/burrow target/release/burrow
#   CONNECTIONS=32 DURATION=10s PUTS=200 loadtest/failover.sh target/release/burrow
#
# Needs wrk and a release loadgen (`cargo build --release -p loadgen`); run
# `scripts/install-deps.sh --loadtest` first on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARIES=("$@")
CONNECTIONS=${CONNECTIONS:-8}
DURATION=${DURATION:-5s}
PUTS=${PUTS:-50}
LOADGEN=${LOADGEN_BIN:-target/release/loadgen}
. loadtest/lib.sh
scratch failover

UP_PORT=$(free_port)
"$LOADGEN" upstream --port "$UP_PORT" --seconds 600 >"$TMP/upstream.log" 2>&1 &
PIDS+=("$!")
# Bound, then closed: nothing listens there.
DEAD_PORT=$(free_port)
head -c 100000 /dev/urandom >"$TMP/body"
CONF=$(relay_conf relay)

for binary in "${BINARIES[@]}"; do
  port=$(free_port)
  env BURROW_ACCESS_LOG=0 RUST_LOG=warn BURROW_STORE=memory BURROW_CONF="$CONF" \
    BURROW_LISTEN="127.0.0.1:$port" "$binary" serve >"$TMP/relay.log" 2>&1 &
  relay=$!
  PIDS+=("$relay")
  wait_http "http://127.0.0.1:$port/health"
  agents=()
  for upstream in "$UP_PORT" "$DEAD_PORT"; do
    RUST_LOG=warn "$binary" agent --relay "http://127.0.0.1:$port" --name svc \
      --upstream "http://127.0.0.1:$upstream" >>"$TMP/agents.log" 2>&1 &
    agents+=("$!")
    PIDS+=("$!")
  done
  for _ in $(seq 200); do
    listed=$(curl -s "http://127.0.0.1:$port/agents" | grep -o '"name":"svc"' | wc -l || true)
    [[ $listed == 2 ]] && break
    sleep 0.05
  done
  out=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H 'x-backstream-client-id: svc' \
    "http://127.0.0.1:$port/small")
  rate=$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  failed=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  put_failed=0
  for _ in $(seq "$PUTS"); do
    status=$(curl -s -o /dev/null -w '%{http_code}' -X PUT --data-binary @"$TMP/body" \
      "http://127.0.0.1:$port/r/svc/sink")
    [[ $status == 200 ]] || put_failed=$((put_failed + 1))
  done
  echo "$binary, $CONNECTIONS connections: GET $rate req/s, p50 $p50, p99 $p99, non-2xx" \
    "${failed:-0}; PUT 100 KB: $put_failed of $PUTS not 200"
  kill "${agents[@]}" "$relay" 2>/dev/null || true
  wait "${agents[@]}" "$relay" 2>/dev/null || true
done
