#!/usr/bin/env bash
# CPU per request of two relay binaries, interleaved: the A/B behind docs/PERFORMANCE.md's
# comparisons. For each round and binary it starts a fresh relay (and, for `route`, an upstream
# and an agent of that binary; for `produce`, its own redis-server), drives it with wrk for
# DURATION, reads the processes' CPU from /proc, and prints one line: requests per second and
# µs of CPU per request (relay, and agent for `route`). Everything runs on 127.0.0.1, is bounded
# in time and stops by itself.
#
#   loadtest/cpu-ab.sh health  /tmp/old/burrow target/release/burrow
#   DURATION=5s ROUNDS=3 loadtest/cpu-ab.sh produce OLD NEW     # produce on the redis store
#   loadtest/cpu-ab.sh route OLD NEW                             # relay → agent → upstream
#   loadtest/cpu-ab.sh publish OLD NEW   # events on the redis store; `other`: a second instance
#
# Needs wrk, redis-server and a release loadgen (`cargo build --release -p loadgen`); run
# `scripts/install-deps.sh --loadtest` first on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIO=$1
shift
BINARIES=("$@")
DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-2}
LOADGEN=${LOADGEN_BIN:-target/release/loadgen}
. loadtest/lib.sh
scratch cpu-ab

ENV=(BURROW_ACCESS_LOG=0 RUST_LOG=warn)
WRK_CONNECTIONS=64
case $SCENARIO in
  health | route) ENV+=(BURROW_STORE=memory) ;;
  produce | publish)
    start_redis
    ENV+=(BURROW_STORE=redis "REDIS_URL=redis://127.0.0.1:$REDIS_PORT")
    ;;
  *) echo "scenario: health, produce, publish or route" >&2 && exit 2 ;;
esac
[[ $SCENARIO == route ]] && WRK_CONNECTIONS=32

for _ in $(seq "$ROUNDS"); do
  for binary in "${BINARIES[@]}"; do
    port=$(free_port)
    env "${ENV[@]}" BURROW_CONF="$(relay_conf burrow)" BURROW_LISTEN="127.0.0.1:$port" "$binary" serve \
      >"$TMP/relay.log" 2>&1 &
    relay=$!
    PIDS+=("$relay")
    wait_http "http://127.0.0.1:$port/health"
    watched=("$relay")
    names=(relay)
    if [[ $SCENARIO == publish ]]; then
      # Another instance on the store, with no subscriber and no request: what the events
      # published through the first cost it.
      other_port=$(free_port)
      env "${ENV[@]}" BURROW_CONF="$(relay_conf other)" BURROW_LISTEN="127.0.0.1:$other_port" \
        "$binary" serve >"$TMP/other.log" 2>&1 &
      other=$!
      PIDS+=("$other")
      wait_http "http://127.0.0.1:$other_port/health"
      watched+=("$other")
      names+=(other)
    fi
    if [[ $SCENARIO == route ]]; then
      up_port=$(free_port)
      "$LOADGEN" upstream --port "$up_port" --seconds 600 >"$TMP/upstream.log" 2>&1 &
      upstream=$!
      PIDS+=("$upstream")
      RUST_LOG=warn "$binary" agent --relay "http://127.0.0.1:$port" --name svc \
        --upstream "http://127.0.0.1:$up_port" >"$TMP/agent.log" 2>&1 &
      agent=$!
      PIDS+=("$agent")
      watched+=("$agent")
      names+=(agent)
      for _ in $(seq 200); do
        curl -sf "http://127.0.0.1:$port/agents" | grep -q '"svc"' && break
        sleep 0.05
      done
      wait_http "http://127.0.0.1:$port/r/svc/small"
    fi
    before=()
    for pid in "${watched[@]}"; do before+=("$(ticks "$pid")"); done
    result=$(wrk -t2 -c"$WRK_CONNECTIONS" -d"$DURATION" -s "loadtest/wrk/$SCENARIO.lua" \
      "http://127.0.0.1:$port" | grep RESULT)
    rate=$(grep -o 'rate=[0-9]*' <<<"$result" | cut -d= -f2)
    seconds=${DURATION%s}
    line="$(basename "$(dirname "$binary")")/$(basename "$binary") ${rate} req/s"
    for i in "${!watched[@]}"; do
      used=$(($(ticks "${watched[$i]}") - before[i]))
      # Clock ticks are 1/100 s: µs per request = ticks * 10^4 / (rate * seconds).
      line+=" ${names[$i]}=$(awk -v t="$used" -v r="$rate" -v s="$seconds" 'BEGIN { printf "%.1f", t * 10000 / (r * s) }')µs"
    done
    echo "$line"
    kill "${watched[@]}" 2>/dev/null || true
    [[ $SCENARIO == route ]] && kill "$upstream" 2>/dev/null
    wait 2>/dev/null || true
  done
done
