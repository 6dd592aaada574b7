#!/usr/bin/env bash
# Burrow's load tests in one command: installs wrk and redis-server when missing, builds the relay
# and the load generator in release mode, starts its own redis-server(s) on free ports, runs each
# scenario against a fresh relay per store, prints a markdown table and writes it to
# loadtest/results/latest.md (raw outputs next to it). Everything runs on 127.0.0.1, is bounded
# in time and stops by itself; every process started here is stopped on exit.
#
#   loadtest/run.sh                          # every scenario, both stores
#   loadtest/run.sh produce pairs            # a subset
#   STORES=redis loadtest/run.sh wake idle   # one store
#
# Scenarios: health produce pairs wake idle race reply faults jobs route (faults: redis only;
# route: memory only).
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(health produce pairs wake idle race reply faults jobs route)
SCENARIOS=("$@")
((${#SCENARIOS[@]})) || SCENARIOS=("${ALL[@]}")
read -r -a STORE_LIST <<<"${STORES:-memory redis}"
WRK_DURATION=${WRK_DURATION:-10s}
RESULTS=loadtest/results
# BURROW_BIN / LOADGEN_BIN: binaries built elsewhere (e.g. from a clean checkout), not rebuilt here.
BURROW=${BURROW_BIN:-target/release/burrow}
LOADGEN=${LOADGEN_BIN:-target/release/loadgen}

# --- dependencies, build, limits -----------------------------------------------------------------
scripts/install-deps.sh --loadtest
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
packages=()
[[ -n ${BURROW_BIN:-} ]] || packages+=(-p burrow)
[[ -n ${LOADGEN_BIN:-} ]] || packages+=(-p loadgen)
if ((${#packages[@]})); then
  echo "==> cargo build --release ${packages[*]}"
  cargo build --release "${packages[@]}"
fi
if [[ -n ${BURROW_BIN:-} ]]; then
  BUILT="binary $BURROW_BIN"
else
  BUILT="commit $(git rev-parse --short HEAD)$(git diff --quiet -- src Cargo.toml || echo ' + uncommitted changes')"
fi
# 10,000 waiters need 10,000+ descriptors in the relay and in the load generator.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= 12000)) || echo "warning: ulimit -n is $(ulimit -n); the idle scenario needs ~10,100"

# --- processes (ports from 20000-31999, below the ephemeral range) ---------------------------------------------------------------------------------
TMP=$(mktemp -d /tmp/burrow-loadtest.XXXXXX)
RELAY_PID=
RELAYS=0
PIDFILES=()
HELPERS=() # pids of workers, agents and upstreams started here
cleanup() {
  [[ -n $RELAY_PID ]] && kill -9 "$RELAY_PID" 2>/dev/null || true
  for pid in "${HELPERS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for f in "${PIDFILES[@]}"; do
    if [[ -s $f ]]; then
      kill -CONT "$(cat "$f")" 2>/dev/null || true
      kill -9 "$(cat "$f")" 2>/dev/null || true
    fi
  done
  jobs -p | xargs -r kill 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    ss -Htan "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}

# start_redis NAME [extra config lines...]: a daemonized redis-server in $TMP/NAME; sets REDIS_PORT.
start_redis() {
  local name=$1 dir=$TMP/$1
  shift
  mkdir -p "$dir"
  REDIS_PORT=$(free_port)
  {
    echo "port $REDIS_PORT"
    echo "bind 127.0.0.1"
    echo "dir $dir"
    echo "daemonize yes"
    echo "pidfile $dir/redis.pid"
    echo "logfile $dir/redis.log"
    echo "save \"\""
    echo "maxclients 15000"
    printf '%s\n' "$@"
  } >"$dir/redis.conf"
  PIDFILES+=("$dir/redis.pid")
  redis-server "$dir/redis.conf"
  for _ in $(seq 100); do
    [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && return
    sleep 0.05
  done
  echo "redis-server $name did not start:" >&2
  tail -5 "$dir/redis.log" >&2
  exit 1
}

# start_relay STORE [VAR=value...]: a fresh relay; sets RELAY_PID, PORT, MPORT, STORE_PORT/PID.
start_relay() {
  local store=$1
  shift
  PORT=$(free_port)
  MPORT=$(free_port)
  # Pingora's settings as built in, with the pid file and upgrade socket in $TMP instead of
  # /tmp, so that no other relay on the machine shares them.
  sed -e "s|^pid_file:.*|pid_file: $TMP/burrow.pid|" \
    -e "s|^upgrade_sock:.*|upgrade_sock: $TMP/upgrade.sock|" conf/burrow.yaml >"$TMP/burrow.yaml"
  local env=(BURROW_CONF="$TMP/burrow.yaml" BURROW_LISTEN="127.0.0.1:$PORT" BURROW_METRICS_LISTEN="127.0.0.1:$MPORT"
    RUST_LOG=warn BURROW_ACCESS_LOG=0 BURROW_STORE="$store")
  STORE_PORT=0 STORE_PID=0
  if [[ $store == redis ]]; then
    STORE_PORT=${RELAY_REDIS_PORT:-$MAIN_REDIS_PORT}
    STORE_PID=$(cat "${RELAY_REDIS_PIDFILE:-$MAIN_REDIS_PIDFILE}")
    redis-cli -p "$STORE_PORT" flushall >/dev/null
    env+=(REDIS_URL="redis://127.0.0.1:$STORE_PORT")
  fi
  RELAY_LOG=$TMP/relay-$((++RELAYS)).log
  env "${env[@]}" "$@" "$BURROW" serve >"$RELAY_LOG" 2>&1 &
  RELAY_PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return
    sleep 0.05
  done
  echo "relay did not start:" >&2
  tail "$RELAY_LOG" >&2
  exit 1
}

stop_relay() {
  local rc=0
  stop_pid "$RELAY_PID" || rc=$?
  # Keeps what the relay said (warnings, panics), except access logs.
  { echo "### relay $RELAYS: exit status $rc"; grep -v "burrow::access" "$RELAY_LOG" | tail -50 || true; } \
    >>"$RESULTS/relay.log"
  RELAY_PID=
}

# start_helper NAME COMMAND...: a worker, agent or upstream in the background, output in
# $TMP/NAME.log; sets HELPER_PID.
start_helper() {
  local name=$1
  shift
  "$@" >"$TMP/$name.log" 2>&1 &
  HELPER_PID=$!
  HELPERS+=("$HELPER_PID")
}

# stop_helper PID: stops a worker, agent or upstream (see stop_pid).
stop_helper() {
  stop_pid "$1" || true
}

# stop_pid PID: SIGTERM, then SIGKILL after 5 s; returns the process's exit status.
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null
}

rss_mib() { awk '/^VmRSS/ {printf "%.0f MiB", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
# percent TICKS_AFTER TICKS_BEFORE SECONDS: CPU use in percent of one core (100 ticks/s).
percent() { awk -v a="$1" -v b="$2" -v s="$3" 'BEGIN {printf "%.0f", (a - b) / s}'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# ticks_with_children PID: as ticks, plus the children it has waited for (a worker's commands).
ticks_with_children() { awk '{print $14 + $15 + $16 + $17}' "/proc/$1/stat" 2>/dev/null || echo 0; }
store_conns() {
  [[ $STORE_PORT == 0 ]] && { echo "-"; return; }
  redis-cli -p "$STORE_PORT" info clients | awk -F: '/^connected_clients/ {print $2 - 1}' | tr -d '\r'
}
# field LINE KEY: the value of KEY=value in a RESULT line.
field() { grep -o "\b$2=[^ ]*" <<<"$1" | head -1 | cut -d= -f2-; }
wrk_errors() { echo $(($(field "$1" status_errors) + $(field "$1" socket_errors))); }

ROWS=$TMP/rows.md
mkdir -p "$RESULTS"
: >"$RESULTS/raw.txt"
: >"$RESULTS/relay.log"
row() { printf '| %s |\n' "$(IFS='|'; echo "$*" | sed 's/|/ | /g')" | tee -a "$ROWS"; }
keep() { printf '### %s (%s)\n%s\n\n' "$1" "$2" "$3" >>"$RESULTS/raw.txt"; }

# --- scenarios ---------------------------------------------------------------------------------
# wrk_scenario NAME SCRIPT STORE [VAR=value...]: wrk -t2 -c64 against a fresh relay.
wrk_scenario() {
  local name=$1 script=$2 store=$3
  shift 3
  start_relay "$store" "$@"
  local r0 s0 t0 out sample
  r0=$(ticks "$RELAY_PID") s0=$( ((STORE_PID)) && ticks "$STORE_PID" || echo 0) t0=$(date +%s.%N)
  (sleep 5; echo "$(rss_mib "$RELAY_PID")|$(store_conns)" >"$TMP/sample") &
  local sampler=$!
  out=$(wrk -t2 -c64 -d"$WRK_DURATION" -s "loadtest/wrk/$script.lua" "http://127.0.0.1:$PORT")
  wait "$sampler"
  local secs cpu
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
  cpu="relay CPU $(percent "$(ticks "$RELAY_PID")" "$r0" "$secs")%"
  ((STORE_PID)) && cpu+=", redis CPU $(percent "$(ticks "$STORE_PID")" "$s0" "$secs")%"
  if [[ $name == *"access log"* ]]; then
    cpu+=", log $(du -h "$RELAY_LOG" | cut -f1)"
  fi
  keep "$name" "$store" "$out"
  local res rate errors extra=""
  res=$(grep '^RESULT' <<<"$out")
  rate="$(field "$res" rate) req/s"
  errors=$(($(field "$res" status_errors) + $(field "$res" socket_errors)))
  if [[ $name == pairs ]]; then
    rate="$(field "$res" pairs_per_s) pairs/s ($(field "$res" rate) req/s)"
    errors=$((errors + $(field "$res" non2xx)))
    extra="; GET 204: $(field "$res" get_204)"
  fi
  row "$name" "$store" "$rate" "$(field "$res" p50_ms) ms" "$(field "$res" p99_ms) ms" "$errors" \
    "$(cut -d'|' -f1 "$TMP/sample")" "$(cut -d'|' -f2 "$TMP/sample")" "$cpu$extra"
  stop_relay
}

# route_wrk LABEL URL [WRK OPTIONS]: wrk GET /small (header x-backstream-client-id: svc) against
# URL, -t2 -c32 unless given; prints its RESULT line plus the CPU of relay, agent and upstream.
route_wrk() {
  local pids=("$RELAY_PID" "$AGENT_PID" "$UPSTREAM_PID") before=() out t0 secs i
  for i in "${pids[@]}"; do before+=("$(ticks "$i")"); done
  t0=$(date +%s.%N)
  out=$(wrk "${@:3}" -s loadtest/wrk/route.lua "$2")
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
  keep "route $1" memory "$out"
  printf '%s' "$(grep '^RESULT' <<<"$out")"
  for i in 0 1 2; do
    printf ' %s_cpu=%s' "$(cut -d' ' -f$((i + 1)) <<<"relay agent upstream")" \
      "$(percent "$(ticks "${pids[$i]}")" "${before[$i]}" "$secs")"
  done
  echo
}

# route_scenario: loadgen upstream behind a real `burrow agent --name svc`; small GETs direct and
# routed with wrk, then a 100 MiB download and upload through the relay (loadgen transfer).
route_scenario() {
  local up res direct routed direct1 routed1 small
  start_relay memory
  up=$(free_port)
  start_helper upstream "$LOADGEN" upstream --port "$up" --seconds 300
  UPSTREAM_PID=$HELPER_PID
  start_helper agent env RUST_LOG=warn "$BURROW" agent --relay "http://127.0.0.1:$PORT" --name svc \
    --upstream "http://127.0.0.1:$up"
  AGENT_PID=$HELPER_PID
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PORT/agents" | grep -q '"svc"' && break
    sleep 0.1
  done
  small=$(curl -s -H 'x-backstream-client-id: svc' "http://127.0.0.1:$PORT/small")
  [[ $small == "Hello, world!" && $(curl -s "http://127.0.0.1:$PORT/r/svc/small") == "$small" ]] || {
    echo "route: agent svc not reachable through the relay (got ${small:0:80})" >&2
    tail "$TMP/agent.log" >&2
    exit 1
  }
  direct=$(route_wrk direct "http://127.0.0.1:$up" -t2 -c32 -d"$WRK_DURATION")
  routed=$(route_wrk routed "http://127.0.0.1:$PORT" -t2 -c32 -d"$WRK_DURATION")
  # One connection, one request at a time: the latency each hop adds, without queueing.
  direct1=$(route_wrk "direct, 1 connection" "http://127.0.0.1:$up" -t1 -c1 -d5s)
  routed1=$(route_wrk "routed, 1 connection" "http://127.0.0.1:$PORT" -t1 -c1 -d5s)
  row "route: direct" "-" "$(field "$direct" rate) req/s" "$(field "$direct" p50_ms) ms" \
    "$(field "$direct" p99_ms) ms" "$(wrk_errors "$direct")" - - \
    "GET /small on the upstream itself; upstream CPU $(field "$direct" upstream_cpu)%"
  row "route: routed" memory "$(field "$routed" rate) req/s" "$(field "$routed" p50_ms) ms" \
    "$(field "$routed" p99_ms) ms" "$(wrk_errors "$routed")" "$(rss_mib "$RELAY_PID")" - \
    "$(awk -v r="$(field "$routed" p50_ms)" -v d="$(field "$direct" p50_ms)" -v rr="$(field "$routed" rate)" \
      -v dr="$(field "$direct" rate)" 'BEGIN {printf "overhead at p50 %+.3f ms, throughput %.2f × direct", r - d, rr / dr}'); relay CPU $(field "$routed" relay_cpu)%, agent CPU $(field "$routed" agent_cpu)%, upstream CPU $(field "$routed" upstream_cpu)%"
  row "route: routed, 1 connection" memory "$(field "$routed1" rate) req/s" "$(field "$routed1" p50_ms) ms" \
    "$(field "$routed1" p99_ms) ms" "$(wrk_errors "$routed1")" "$(rss_mib "$RELAY_PID")" - \
    "wrk -t1 -c1 -d5s; direct: $(field "$direct1" rate) req/s, p50 $(field "$direct1" p50_ms) / p99 $(field "$direct1" p99_ms) ms; $(awk -v r="$(field "$routed1" p50_ms)" -v d="$(field "$direct1" p50_ms)" 'BEGIN {printf "overhead at p50 %+.3f ms", r - d}')"
  res=$(loadgen transfer memory --pid "$RELAY_PID" --mb 100 --prefix /r/svc --seconds 60)
  for t in download upload plain_upload; do
    row "route: ${t/plain_upload/upload without Expect} 100 MiB" memory "$(field "$res" ${t}_mib_s) MiB/s" - - \
      "$([[ $(field "$res" ${t}_ok) == true ]] && echo 0 || echo 1)" \
      "$(($(field "$res" rss_before_kib) / 1024)) → max $(($(field "$res" ${t}_max_rss_kib) / 1024)) MiB" - \
      "status $(field "$res" ${t}_status), $(field "$res" ${t}_bytes) bytes back$([[ $t == upload ]] && echo ", answer $(field "$res" upload_answer)") in $(field "$res" ${t}_seconds) s; agent RSS after $(rss_mib "$AGENT_PID")"
  done
  stop_helper "$AGENT_PID"
  stop_helper "$UPSTREAM_PID"
  stop_relay
}

# jobs_scenario STORE: a real `burrow worker --concurrency 8 -- cat` on queue lt-jobs; then
# throughput (loadgen jobs: trigger + /done?wait=30 from 16 clients) and latency (loadgen jobs-ws:
# one job at a time over a WebSocket).
jobs_scenario() {
  local store=$1 res worker r0 w0 t0 secs cpu
  start_relay "$store"
  start_helper "worker-$store" env RUST_LOG=warn "$BURROW" worker --relay "http://127.0.0.1:$PORT" \
    --queue lt-jobs --concurrency 8 -- cat
  worker=$HELPER_PID
  r0=$(ticks "$RELAY_PID") w0=$(ticks_with_children "$worker") t0=$(date +%s.%N)
  res=$(loadgen jobs "$store" --queue lt-jobs --n 2000 --clients 16 --seconds 20)
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')
  cpu="relay CPU $(percent "$(ticks "$RELAY_PID")" "$r0" "$secs")%, worker + cat CPU $(percent "$(ticks_with_children "$worker")" "$w0" "$secs")%"
  row jobs "$store" "$(field "$res" rate) jobs/s" "$(field "$res" p50_ms) ms" "$(field "$res" p99_ms) ms" \
    "$(field "$res" errors)" "$(rss_mib "$RELAY_PID")" "$(store_conns)" \
    "$(field "$res" done) jobs in $(field "$res" seconds) s, 16 clients, latency = trigger → Done under load; $cpu"
  res=$(loadgen jobs-ws "$store" --queue lt-jobs --n 500 --seconds 30 --spawns 200)
  row "jobs ws" "$store" "$(field "$res" jobs) jobs, one at a time" "$(field "$res" p50_ms) ms" \
    "$(field "$res" p99_ms) ms" "$(field "$res" errors)" "$(rss_mib "$RELAY_PID")" "$(store_conns)" \
    "frame sent → Done frame; → started: p50 $(field "$res" started_p50_ms) / p99 $(field "$res" started_p99_ms) ms; cat alone (spawned by loadgen): p50 $(field "$res" cat_p50_ms) / p99 $(field "$res" cat_p99_ms) ms"
  stop_helper "$worker"
  stop_relay
}

loadgen() {
  local name=$1 store=$2
  shift 2
  local out
  out=$("$LOADGEN" "$name" --addr "127.0.0.1:$PORT" --metrics "127.0.0.1:$MPORT" "$@")
  keep "$name" "$store" "$out"
  grep '^RESULT' <<<"$out"
}

scenario() {
  local name=$1 store=$2 res
  case $name in
    health) wrk_scenario health health "$store" ;;
    produce)
      wrk_scenario produce produce "$store"
      wrk_scenario "produce (access log)" produce "$store" \
        BURROW_ACCESS_LOG=1 RUST_LOG=warn,burrow::access=info
      ;;
    pairs) wrk_scenario pairs pairs "$store" ;;
    wake)
      start_relay "$store"
      res=$(loadgen wake "$store" --n 1000)
      row wake "$store" "1000 waiters, $(field "$res" delivered) delivered" \
        "$(field "$res" p50_ms) ms" "$(field "$res" p99_ms) ms" "$(field "$res" errors)" \
        "$(rss_mib "$RELAY_PID")" "$(store_conns)" "max $(field "$res" max_ms) ms; from produce sent: p50 $(field "$res" from_produce_sent_p50_ms) / p99 $(field "$res" from_produce_sent_p99_ms) ms"
      stop_relay
      ;;
    idle)
      start_relay "$store"
      res=$(loadgen idle "$store" --n 10000 --hold 30 --pid "$RELAY_PID" \
        --redis-pid "$STORE_PID" --redis-port "$STORE_PORT")
      local cpu="relay CPU $(field "$res" relay_cpu_pct)%"
      ((STORE_PID)) && cpu+=", redis CPU $(field "$res" store_cpu_pct)%"
      row idle "$store" "10,000 waiters, $(field "$res" delivered) delivered" - - \
        "$((10000 - $(field "$res" delivered)))" \
        "$(($(field "$res" rss_before_kib) / 1024)) → $(($(field "$res" rss_holding_kib) / 1024)) MiB" \
        "$(field "$res" store_clients)" \
        "$(field "$res" per_waiter_kib) KiB/waiter; $cpu while holding; all waiting after $(field "$res" all_waiting_after_s) s"
      stop_relay
      ;;
    race)
      start_relay "$store"
      res=$(loadgen race "$store" --trials 10 --producers 200 --limit 10)
      row race "$store" "$(field "$res" exact)/10 trials exact" - - \
        "$((10 - $(field "$res" exact)))" "$(rss_mib "$RELAY_PID")" "$(store_conns)" \
        "201s/final size per trial: $(field "$res" 'per_trial_201/size')"
      stop_relay
      ;;
    reply)
      start_relay "$store"
      res=$(loadgen reply "$store" --producers 32 --workers 32 --seconds 10 --max 20000 --threads 2)
      row reply "$store" "$(field "$res" rate) round trips/s" "$(field "$res" p50_ms) ms" \
        "$(field "$res" p99_ms) ms" "$(field "$res" errors)" "$(rss_mib "$RELAY_PID")" \
        "$(store_conns)" "$(field "$res" round_trips) round trips in $(field "$res" seconds) s"
      stop_relay
      ;;
    faults)
      [[ $store == redis ]] || return 0
      start_redis faults "appendonly yes" "appendfsync always"
      local dir=$TMP/faults
      RELAY_REDIS_PORT=$REDIS_PORT RELAY_REDIS_PIDFILE=$dir/redis.pid start_relay redis
      res=$(loadgen faults "$store" --seconds 60 --redis-port "$REDIS_PORT" \
        --redis-pidfile "$dir/redis.pid" --restart "redis-server $dir/redis.conf")
      row faults "redis (AOF always)" "$(field "$res" produced_201) produced (201)" - - \
        "$(field "$res" errors) (unexpected $(field "$res" unexpected_errors), hung $(field "$res" hung))" \
        "$(rss_mib "$RELAY_PID")" "$(store_conns)" \
        "lost $(field "$res" lost), duplicates $(field "$res" duplicates), pending redeliveries $(field "$res" pending_redeliveries), stored despite 503 $(field "$res" stored_despite_error); served again $(field "$res" recover_after_cont_ms) ms after SIGCONT, $(field "$res" recover_after_redis_up_ms) ms after redis answered PING ($(field "$res" recover_after_restart_ms) ms after restart); pass=$(field "$res" pass)"
      stop_relay
      ;;
    jobs) jobs_scenario "$store" ;;
    route) if [[ $store == memory ]]; then route_scenario; fi ;;
    *) echo "unknown scenario $name (${ALL[*]})" >&2; exit 2 ;;
  esac
}

# --- run ---------------------------------------------------------------------------------------
if [[ " ${STORE_LIST[*]} " == *" redis "* ]]; then
  start_redis main
  MAIN_REDIS_PORT=$REDIS_PORT MAIN_REDIS_PIDFILE=$TMP/main/redis.pid
fi
{
  echo "| scenario | store | rate | p50 | p99 | errors | relay RSS | store conns | notes |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
} | tee "$ROWS"
for store in "${STORE_LIST[@]}"; do
  for name in "${SCENARIOS[@]}"; do
    scenario "$name" "$store"
  done
done
{
  echo "# Burrow load test, $(date -u '+%Y-%m-%d %H:%M UTC'), $BUILT"
  echo
  echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(redis-server --version | cut -d' ' -f3)"
  echo
  cat "$ROWS"
} >"$RESULTS/latest.md"
echo
echo "==> written to $RESULTS/latest.md (raw outputs: $RESULTS/raw.txt)"
