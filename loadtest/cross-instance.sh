#!/usr/bin/env bash
# Requests to an agent on another instance, by relay binary and by how many agents the store
# lists elsewhere: two relay instances A and B on one redis-server, a loadgen upstream behind a
# real `burrow agent --name svc` on A, and wrk sending small GETs to B, which sends each on to A.
# The other agents are presence records of made-up instances (100 agents each, never contacted),
# written to the store as a relay writes its own; every instance that routes a request elsewhere
# reads them. One line per binary, count and number of connections: requests per second, p50 and
# p99. Everything runs on 127.0.0.1, is bounded in time and stops by itself.
#
#   loadtest/cross-instance.sh /tmp/old/burrow target/release/burrow
#   AGENTS="0 100 1000" CONNECTIONS="8 64" DURATION=10s loadtest/cross-instance.sh target/release/burrow
#
# Needs wrk, redis-server and a release loadgen (`cargo build --release -p loadgen`); run
# `scripts/install-deps.sh --loadtest` first on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

BINARIES=("$@")
AGENTS=${AGENTS:-0 1000}
CONNECTIONS=${CONNECTIONS:-8}
DURATION=${DURATION:-5s}
LOADGEN=${LOADGEN_BIN:-target/release/loadgen}
. loadtest/lib.sh
scratch cross-instance

# fake_instances COUNT: presence records of made-up instances holding COUNT agents in all, alive
# for ten minutes.
fake_instances() {
  python3 - "$1" <<'PY' | redis-cli -p "$REDIS_PORT" >/dev/null
import json, sys, time
count, per = int(sys.argv[1]), 100
now = int(time.time() * 1000)
for first in range(0, count, per):
    instance = f"made-up-{first:08d}"
    agents = [{"name": f"service-{n:010d}", "instance": instance, "connected_since_ms": now,
               "last_heartbeat_ms": now, "requests_in_flight": 0}
              for n in range(first, min(count, first + per))]
    record = json.dumps({"instance": instance, "address": f"127.0.0.1:{9 + first // per}",
                         "agents": agents})
    print(f"SET burrow:instance:{instance} {json.dumps(record)} PX 600000")
    print(f"ZADD burrow:instances {now + 600000} {instance}")
PY
}

start_redis
UP_PORT=$(free_port)
"$LOADGEN" upstream --port "$UP_PORT" --seconds 600 >"$TMP/upstream.log" 2>&1 &
PIDS+=("$!")

for binary in "${BINARIES[@]}"; do
  for count in $AGENTS; do
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    fake_instances "$count"
    relays=()
    for instance in a b; do
      port=$(free_port)
      env BURROW_ACCESS_LOG=0 RUST_LOG=warn BURROW_STORE=redis "REDIS_URL=redis://127.0.0.1:$REDIS_PORT" \
        BURROW_CONF="$(relay_conf "$instance")" BURROW_LISTEN="127.0.0.1:$port" "$binary" serve \
        >"$TMP/$instance.log" 2>&1 &
      relays+=("$!")
      PIDS+=("$!")
      wait_http "http://127.0.0.1:$port/health"
      [[ $instance == a ]] && a_port=$port || b_port=$port
    done
    RUST_LOG=warn "$binary" agent --relay "http://127.0.0.1:$a_port" --name svc \
      --upstream "http://127.0.0.1:$UP_PORT" >"$TMP/agent.log" 2>&1 &
    agent=$!
    PIDS+=("$agent")
    wait_http "http://127.0.0.1:$b_port/small" -H 'x-backstream-client-id: svc'
    for connections in $CONNECTIONS; do
      out=$(wrk -t1 -c"$connections" -d"$DURATION" --latency -H 'x-backstream-client-id: svc' \
        "http://127.0.0.1:$b_port/small")
      rate=$(awk '/Requests\/sec/ {printf "%d", $2}' <<<"$out")
      p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
      p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
      failed=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
      echo "$binary, $count agents elsewhere, $connections connections: $rate req/s, p50 $p50," \
        "p99 $p99, non-2xx ${failed:-0}"
    done
    kill "$agent" "${relays[@]}" 2>/dev/null || true
    wait "$agent" "${relays[@]}" 2>/dev/null || true
  done
done
