# Shared by the loadtest scripts that start their own processes (cpu-ab.sh, cross-instance.sh,
# failover.sh, agent-links.sh, bulk-cpu.sh): a scratch directory and the processes to stop on
# exit, free ports, a process's CPU ticks, waiting for an HTTP answer, a redis-server and a
# relay's Pingora configuration. Sourced, not run; the caller
# has `set -euo pipefail` and runs from the repository's root.

# scratch NAME: makes $TMP, a fresh directory; every pid in PIDS is killed and $TMP removed on
# exit.
scratch() {
  TMP=$(mktemp -d "/tmp/burrow-$1.XXXXXX")
  PIDS=()
  trap cleanup EXIT
}
cleanup() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ticks PID: the CPU time (user + system, in 10 ms ticks) process PID has spent.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# wait_http URL [CURL_ARGS…]: until URL answers 2xx (10 s), else the script stops.
wait_http() {
  for _ in $(seq 200); do curl -sf "${@:2}" "$1" >/dev/null 2>&1 && return; sleep 0.05; done
  echo "no answer from $1" >&2
  exit 1
}

# start_redis: a redis-server without persistence on a free port, REDIS_PORT.
start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$TMP" --daemonize yes --pidfile "$TMP/redis.pid" >/dev/null
  for _ in $(seq 100); do [[ -s $TMP/redis.pid ]] && break; sleep 0.05; done
  PIDS+=("$(cat "$TMP/redis.pid")")
}

# relay_conf NAME: conf/burrow.yaml with a pid file and an upgrade socket of its own in $TMP;
# prints the copy's path.
relay_conf() {
  sed -e "s|^pid_file:.*|pid_file: $TMP/$1.pid|" \
    -e "s|^upgrade_sock:.*|upgrade_sock: $TMP/$1.sock|" conf/burrow.yaml >"$TMP/$1.yaml"
  echo "$TMP/$1.yaml"
}
