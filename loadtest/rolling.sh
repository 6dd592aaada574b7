#!/usr/bin/env bash
# Rolling-deploy measurement for Burrow's routed traffic (agents), as clients see it.
#
#   loadtest/rolling.sh [BURROW_BIN] [LOADGEN_BIN]
#   (defaults target/release/burrow target/release/loadgen; env: SECONDS_PER=15 CLIENTS=6
#    BASE_PORT=45200 OUT=/tmp/burrow-rolling-<time> ONLY="s1a s3a" to run a subset)
#
# One redis-server, two relays A and B on it (BURROW_STORE=redis), loadgen upstreams, agents.
# A Python client load (rolling_client.py: CLIENTS keep-alive clients, GET /small with
# x-backstream-client-id, 5 s timeout, alternating between A and B) runs through each scenario;
# every answer / transport error is recorded with a timestamp, and the event's time is marked.
# Relays are restarted and redis flushed for every scenario. Everything it starts is killed on exit
# (trap; also a watchdog at MAX_SECONDS=330). Scenarios (the event comes at SECONDS_PER/3):
#   s1a one agent on A: SIGTERM it + start a replacement at once   s1b start new, wait for 2 listed, SIGTERM old
#   s2  agents svc on A and B: SIGTERM A's, replace 5 s later        s2b the same, both agents on A
#   s3a 10 names svc0-9 (0-4 on A, 5-9 on B), clients A+B: SIGTERM relay A, start A' on its port at once
#   s3b the same with 10 agents of one name          s3c like s3a, docker-style: wait for A to exit, +2 s, start A'
#   s4a 10 names all on A, clients only to B         s4b 10 agents 'svc' all on A, clients only to B
#   s5a/s5b as s3a/s4a, but A is replaced by a graceful upgrade (serve --upgrade + SIGQUIT)
#   s5c the memory store, A alone: 10 names on A, clients to A on a connection per request
#       (so that they reach both processes), A replaced by a graceful upgrade
#   s5d as s5c, with POST /sink (a 200-byte body) instead of GET /small
#   s5e as s5a, with POST /sink on a connection per request
# Output: one table on stdout; $OUT/details.txt has event marks and each distinct non-200 (body, headers).
# Uses ports BASE_PORT..BASE_PORT+99 only (default 45200-45299). Runs in about 4 minutes.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BURROW=$(readlink -f "${1:-$ROOT/target/release/burrow}")
LOADGEN=$(readlink -f "${2:-$ROOT/target/release/loadgen}")
CLIENT_PY="$HERE/rolling_client.py"
SECONDS_PER=${SECONDS_PER:-15}
CLIENTS=${CLIENTS:-6}
BASE=${BASE_PORT:-45200}
OUT=${OUT:-/tmp/burrow-rolling-$(date +%H%M%S)}
ONLY=${ONLY:-}
mkdir -p "$OUT"

# Ports: this range overlaps the kernel's ephemeral range (32768-60999) on many hosts, so a port
# can be held by someone's outgoing connection: take the next one that binds, without reuse.
TAKEN=" "
free_port() {
  local p
  for p in $(seq $((BASE + 1)) $((BASE + 99))); do
    [[ $TAKEN == *" $p "* ]] && continue
    if python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' "$p" 2>/dev/null; then
      TAKEN+="$p "; PORT=$p; return 0
    fi
  done
  echo "no free port in $BASE..$((BASE + 99))" >&2; exit 1
}
free_port; RP=$PORT; free_port; PA=$PORT; free_port; PB=$PORT; free_port; UP1=$PORT; free_port; UP2=$PORT
A="127.0.0.1:$PA"; B="127.0.0.1:$PB"

PIDS=()         # every process started, killed on exit
cleanup() {
  [[ -f $OUT/.watchdog-sleep ]] && kill "$(cat "$OUT/.watchdog-sleep")" 2>/dev/null
  [[ -n ${WATCHDOG:-} ]] && kill "$WATCHDOG" 2>/dev/null
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  [[ -n ${REDIS_PID:-} ]] && kill -KILL "$REDIS_PID" 2>/dev/null
  wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# self-bound: never run past MAX_SECONDS (default 330)
( exec >/dev/null 2>&1; sleep "${MAX_SECONDS:-330}" & echo $! >"$OUT/.watchdog-sleep"; wait
  echo "$(date +%T) time limit" >"$OUT/TIME-LIMIT-REACHED"; kill -TERM $$ ) &
WATCHDOG=$!

now() { date +%s.%N; }
mark() { echo "$(now) $*" >>"$OUT/$SCEN.marks"; }
log() { echo "[$(date +%T)] $*" >&2; }

wait_listen() {  # port, tries of 50 ms
  for _ in $(seq "${2:-200}"); do
    curl -s -o /dev/null -m 1 "http://127.0.0.1:$1/health" && return 0
    sleep 0.05
  done
  log "port $1 not answering"; return 1
}

# Count agents named $2 listed by relay at $1
count_agents() { curl -s -m 2 "http://$1/agents" | grep -o "\"name\":\"$2\"" | wc -l; }
wait_agents() {  # relay name count
  for _ in $(seq 200); do
    [[ $(count_agents "$1" "$2") -ge $3 ]] && return 0
    sleep 0.05
  done
  log "timed out waiting for $3 agents '$2' at $1 (have $(count_agents "$1" "$2"))"; return 1
}

conf_for() {  # relay tag port -> conf path
  local c="$OUT/conf-$1.yaml"
  sed -e "s#^pid_file:.*#pid_file: $OUT/pid-$1#" \
      -e "s#^upgrade_sock:.*#upgrade_sock: $OUT/upg-$2.sock#" \
      "$ROOT/conf/burrow.yaml" >"$c"
  echo "$c"
}

start_relay() {  # tag port [extra serve args] -> sets RELAY_PID; STORE_ENV=memory: no redis
  local tag=$1 port=$2; shift 2
  local store=(BURROW_STORE=redis REDIS_URL="redis://127.0.0.1:$RP")
  [[ ${STORE_ENV:-} == memory ]] && store=(BURROW_STORE=memory)
  env BURROW_LISTEN="127.0.0.1:$port" "${store[@]}" \
    BURROW_ADVERTISE="127.0.0.1:$port" BURROW_CONF="$(conf_for "$tag" "$port")" BURROW_ACCESS_LOG=0 \
    RUST_LOG=info "$BURROW" serve "$@" >>"$OUT/$SCEN.relay-$tag.log" 2>&1 &
  RELAY_PID=$!
  PIDS+=("$RELAY_PID")
}

start_agent() {  # relay-hostport name upstream-port -> sets AGENT_PID
  RUST_LOG=info "$BURROW" agent --relay "http://$1" --name "$2" \
    --upstream "http://127.0.0.1:$3" >>"$OUT/$SCEN.agents.log" 2>&1 &
  AGENT_PID=$!
  PIDS+=("$AGENT_PID")
}

run_load() {  # targets names [--fresh] -> starts load in background, sets LOAD_PID
  python3 "$CLIENT_PY" load --targets "$1" --names "$2" --clients "$CLIENTS" \
    --seconds "$SECONDS_PER" --out "$OUT/$SCEN.jsonl" "${@:3}" &
  LOAD_PID=$!
  PIDS+=("$LOAD_PID")
}

setup() {  # fresh redis + relays A and B for a scenario
  SCEN=$1
  : >"$OUT/$SCEN.marks"
  timeout 2 redis-cli -p "$RP" flushall >/dev/null 2>&1
  start_relay A "$PA"; RELAY_A=$RELAY_PID
  start_relay B "$PB"; RELAY_B=$RELAY_PID
  wait_listen "$PA" && wait_listen "$PB" || { log "relays did not start (see $OUT/$SCEN.relay-*.log)"; exit 1; }
  log "== $SCEN"
}

teardown() {  # stop every agent and relay of the scenario (SIGTERM, then KILL)
  local live=()
  for p in "${SCEN_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null && live+=("$p"); done
  for _ in $(seq 100); do
    local any=0
    for p in "${live[@]}"; do kill -0 "$p" 2>/dev/null && any=1; done
    [[ $any == 0 ]] && break
    sleep 0.1
  done
  for p in "${live[@]}"; do kill -KILL "$p" 2>/dev/null; done
  SCEN_PIDS=()
}

want() { [[ -z $ONLY ]] || [[ " $ONLY " == *" $1 "* ]]; }

# Restart relay A in place: SIGTERM it and start A' on the same port at once, as an
# orchestrator restarting a container would; if the port is still held, retry every 100 ms.
restart_a_in_place() {  # mode: now (start A' at once) | docker (wait for A to exit, 2 s, start)
  kill -TERM "$RELAY_A"
  local old=$RELAY_A tries=0 new
  ( while kill -0 "$old" 2>/dev/null; do sleep 0.02; done; echo "$(now) old A exited" >>"$OUT/$SCEN.marks" ) &
  if [[ ${1:-now} == docker ]]; then
    while kill -0 "$old" 2>/dev/null; do sleep 0.05; done
    sleep 2
  fi
  while :; do
    start_relay A2 "$PA"; new=$RELAY_PID
    mark "A' (pid $new) started (attempt $((tries + 1)))"
    # it either comes to answer /health or exits on a bind error
    local up=0
    for _ in $(seq 100); do
      kill -0 "$new" 2>/dev/null || break
      curl -s -o /dev/null -m 0.2 "http://$A/health" && { up=1; break; }
      sleep 0.02
    done
    [[ $up == 1 ]] && break
    tries=$((tries + 1))
    [[ $tries -gt 50 ]] && { log "A' never started"; break; }
    sleep 0.1
  done
  RELAY_A=$new
  SCEN_PIDS+=("$new")
  mark "A' answers /health (old A alive=$(kill -0 "$old" 2>/dev/null && echo yes || echo no))"
}

# Graceful upgrade of A (serve --upgrade, then SIGQUIT the old one), as the README describes.
upgrade_a() {
  local old=$RELAY_A
  start_relay A2 "$PA" --upgrade; local new=$RELAY_PID
  SCEN_PIDS+=("$new")
  for _ in $(seq 200); do ss -xl | grep -q "$OUT/upg-$PA.sock " && break; sleep 0.05; done
  mark "new process waits on the upgrade socket; SIGQUIT old A"
  kill -QUIT "$old"
  # what B says 2 s into the handover: its /agents listing and a routed request for svc0
  ( sleep 2; echo "$(now) at +2s into the upgrade, B lists $(count_agents "$B" svc0) svc0 agent(s) and routes svc0 with $(curl -s -m 2 -o /dev/null -w '%{http_code}' -H 'x-backstream-client-id: svc0' "http://$B/small")" >>"$OUT/$SCEN.marks" ) >/dev/null 2>&1 &
  ( while kill -0 "$old" 2>/dev/null; do sleep 0.02; done; echo "$(now) old A exited" >>"$OUT/$SCEN.marks" ) &
  RELAY_A=$new
}

redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
  --dir "$OUT" >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
"$LOADGEN" upstream --port "$UP1" --seconds 600 >"$OUT/up1.log" 2>&1 & PIDS+=("$!")
"$LOADGEN" upstream --port "$UP2" --seconds 600 >"$OUT/up2.log" 2>&1 & PIDS+=("$!")
for _ in $(seq 100); do timeout 2 redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.05; done
for _ in $(seq 100); do curl -s -m 1 -o /dev/null "http://127.0.0.1:$UP1/small" && curl -s -m 1 -o /dev/null "http://127.0.0.1:$UP2/small" && break; sleep 0.05; done
curl -sf -m 1 -o /dev/null "http://127.0.0.1:$UP1/small" && curl -sf -m 1 -o /dev/null "http://127.0.0.1:$UP2/small" &&
  timeout 2 redis-cli -p "$RP" ping >/dev/null || { log "redis or an upstream did not start (see $OUT/*.log)"; exit 1; }
log "ports: redis $RP, A $PA, B $PB, upstreams $UP1 $UP2; output in $OUT"

EV=$((SECONDS_PER / 3))   # the event comes a third of the way in
SCEN_PIDS=()
RAN=()

# 1a: one agent on A; SIGTERM it and start its replacement at the same moment.
if want s1a; then
  setup s1a_one_agent_term+start
  start_agent "$A" svc "$UP1"; SCEN_PIDS+=("$AGENT_PID" "$RELAY_A" "$RELAY_B"); old=$AGENT_PID
  wait_agents "$A" svc 1; wait_agents "$B" svc 1
  run_load "$A,$B" svc; sleep "$EV"
  mark "EVENT SIGTERM old agent + start new"
  kill -TERM "$old"; start_agent "$A" svc "$UP2"; SCEN_PIDS+=("$AGENT_PID")
  wait_agents "$A" svc 1 && mark "new agent listed"
  ( while kill -0 "$old" 2>/dev/null; do sleep 0.05; done; echo "$(now) old agent exited" >>"$OUT/$SCEN.marks" ) &
  wait "$LOAD_PID"; teardown; RAN+=("$SCEN")
fi

# 1b: one agent on A; start the replacement, wait for /agents to list two, then SIGTERM the old.
if want s1b; then
  setup s1b_one_agent_start,wait,term
  start_agent "$A" svc "$UP1"; SCEN_PIDS+=("$AGENT_PID" "$RELAY_A" "$RELAY_B"); old=$AGENT_PID
  wait_agents "$A" svc 1; wait_agents "$B" svc 1
  run_load "$A,$B" svc; sleep "$EV"
  mark "EVENT start new agent"
  start_agent "$A" svc "$UP2"; SCEN_PIDS+=("$AGENT_PID")
  wait_agents "$A" svc 2 && mark "two listed; SIGTERM old"
  kill -TERM "$old"
  ( while kill -0 "$old" 2>/dev/null; do sleep 0.05; done; echo "$(now) old agent exited" >>"$OUT/$SCEN.marks" ) &
  wait "$LOAD_PID"; teardown; RAN+=("$SCEN")
fi

# 2 / 2b: two agents of one name, one on A and the other on $2 (B, or A too); SIGTERM the one
# on A, start its replacement a third of the way later.
two_agents_scenario() {  # tag relay-of-the-second
  setup "$1"
  start_agent "$A" svc "$UP1"; SCEN_PIDS+=("$AGENT_PID" "$RELAY_A" "$RELAY_B"); old=$AGENT_PID
  start_agent "$2" svc "$UP2"; SCEN_PIDS+=("$AGENT_PID")
  wait_agents "$A" svc 2; wait_agents "$B" svc 2
  run_load "$A,$B" svc; sleep "$EV"
  mark "EVENT SIGTERM an agent on A"
  kill -TERM "$old"
  ( while kill -0 "$old" 2>/dev/null; do sleep 0.05; done; echo "$(now) old agent exited" >>"$OUT/$SCEN.marks" ) &
  sleep "$EV"
  mark "start replacement on A"; start_agent "$A" svc "$UP1"; SCEN_PIDS+=("$AGENT_PID")
  wait_agents "$A" svc 2 && mark "two listed again"
  wait "$LOAD_PID"; teardown; RAN+=("$SCEN")
}
want s2 && two_agents_scenario s2_two_agents_term_one_later_replace "$B"
want s2b && two_agents_scenario s2b_two_agents_on_A_term_one "$A"

# 3 / 4: ten agents spread over A and B (or all on A); relay A restarted in place.
relay_scenario() {  # tag layout(spread|allA) names(distinct|same) targets mode(now|docker|upgrade) [load options]
  setup "$1"
  SCEN_PIDS+=("$RELAY_A" "$RELAY_B")
  local names=() n
  for i in $(seq 0 9); do
    [[ $3 == distinct ]] && n="svc$i" || n=svc
    names+=("$n")
    local r=$A
    [[ $2 == spread && $i -ge 5 ]] && r=$B
    start_agent "$r" "$n" $(( i % 2 ? UP2 : UP1 )); SCEN_PIDS+=("$AGENT_PID")
  done
  local uniq; uniq=$(printf '%s\n' "${names[@]}" | sort -u | paste -sd,)
  if [[ $3 == distinct ]]; then
    for i in $(seq 0 9); do wait_agents "$B" "svc$i" 1; done
  else
    wait_agents "$B" svc 10
  fi
  run_load "$4" "$uniq" "${@:6}"; sleep "$EV"
  if [[ $5 == upgrade ]]; then
    mark "EVENT graceful upgrade of A begins (serve --upgrade)"
    upgrade_a
  else
    mark "EVENT SIGTERM relay A ($5)"
    restart_a_in_place "$5"
  fi
  if [[ $3 == distinct ]]; then
    for i in $(seq 0 9); do wait_agents "$B" "svc$i" 1 >/dev/null 2>&1; done
  else
    wait_agents "$B" svc 10
  fi && mark "B lists all 10 agents again"
  wait "$LOAD_PID"; teardown; RAN+=("$SCEN")
}
want s3a && relay_scenario s3a_relayA_restart_distinct_spread spread distinct "$A,$B" now
want s3b && relay_scenario s3b_relayA_restart_same_spread spread same "$A,$B" now
want s3c && relay_scenario s3c_relayA_docker_restart_distinct spread distinct "$A,$B" docker
want s4a && relay_scenario s4a_clients_B_only_distinct_allA allA distinct "$B" now
want s4b && relay_scenario s4b_clients_B_only_same_allA allA same "$B" now
want s5a && relay_scenario s5a_relayA_upgrade_distinct_spread spread distinct "$A,$B" upgrade
want s5b && relay_scenario s5b_relayA_upgrade_B_only_allA allA distinct "$B" upgrade
want s5e && relay_scenario s5e_relayA_upgrade_fresh_POST spread distinct "$A,$B" upgrade --fresh --post

# 5c/5d: the memory store, relay A alone, 10 names on it; A replaced by a graceful upgrade while
# clients open a connection per request.
memory_upgrade_scenario() {  # tag [--post]
  SCEN=$1
  : >"$OUT/$SCEN.marks"
  STORE_ENV=memory start_relay A "$PA"; RELAY_A=$RELAY_PID; SCEN_PIDS+=("$RELAY_A")
  wait_listen "$PA" || { log "relay A did not start (see $OUT/$SCEN.relay-A.log)"; exit 1; }
  log "== $SCEN"
  for i in $(seq 0 9); do start_agent "$A" "svc$i" $(( i % 2 ? UP2 : UP1 )); SCEN_PIDS+=("$AGENT_PID"); done
  for i in $(seq 0 9); do wait_agents "$A" "svc$i" 1; done
  run_load "$A" "$(seq -s, -f 'svc%g' 0 9)" --fresh "${@:2}"; sleep "$EV"
  mark "EVENT graceful upgrade of A begins (serve --upgrade)"
  STORE_ENV=memory upgrade_a
  wait "$LOAD_PID"; teardown; RAN+=("$SCEN")
}
want s5c && memory_upgrade_scenario s5c_memory_upgrade_fresh_connections
want s5d && memory_upgrade_scenario s5d_memory_upgrade_fresh_POST --post

timeout 2 redis-cli -p "$RP" shutdown nosave >/dev/null 2>&1
python3 "$CLIENT_PY" summary --dir "$OUT" "${RAN[@]}" | tee "$OUT/summary.txt"
python3 "$CLIENT_PY" summary --dir "$OUT" --details "${RAN[@]}" >"$OUT/details.txt"
echo
echo "details (marks, a sample of each non-200 with body and headers): $OUT/details.txt"
