#!/usr/bin/env bash
# What idle agents' links cost a relay once they have carried bodies, for one or more `burrow`
# binaries (to compare two builds). For each binary and each direction: a relay on the memory
# store, a loadgen upstream, AGENTS real `burrow agent` processes of distinct names, and a spare
# agent that first carries three 1 MiB bodies each way (so that the allocator's one-time growth
# is not counted); then each agent in turn carries one 1 MiB body (a download `GET /r/aN/big`,
# or an upload `PUT /r/aN/sink`), and the relay's RSS growth is printed per link. Links that
# carried nothing are measured by `loadtest/idle-cost.py`. Everything runs on 127.0.0.1, takes
# about half a minute per binary and stops by itself.
#
#   loadtest/agent-links.sh /tmp/old/burrow target/release/burrow
#
# Needs curl and a release loadgen (`cargo build --release -p loadgen`).
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-120}
LOADGEN=${LOADGEN_BIN:-target/release/loadgen}
. loadtest/lib.sh
scratch agent-links

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }

# listed PORT COUNT: until the relay at PORT lists COUNT agent names (30 s), else the script stops.
listed() {
  for _ in $(seq 300); do
    [[ $(curl -s "http://127.0.0.1:$1/agents" | grep -o '"name": *"[a-z0-9]*"' | sort -u | wc -l) -ge $2 ]] && return
    sleep 0.1
  done
  echo "the relay lists fewer than $2 agents" >&2
  exit 1
}

# carry PORT NAME DIRECTION: one 1 MiB body through agent NAME, checked.
carry() {
  local got
  if [[ $3 == download ]]; then
    got=$(curl -sf "http://127.0.0.1:$1/r/$2/big?mb=1" | wc -c)
  else
    got=$(head -c 1048576 /dev/zero | curl -sf -T - "http://127.0.0.1:$1/r/$2/sink")
  fi
  [[ $got == 1048576 ]] || { echo "$3 through $2: got $got bytes" >&2 && exit 1; }
}

for binary in "$@"; do
  for direction in download upload; do
    port=$(free_port) up=$(free_port)
    BURROW_STORE=memory BURROW_LISTEN="127.0.0.1:$port" BURROW_ACCESS_LOG=0 RUST_LOG=warn \
      "$binary" serve &
    relay=$!
    PIDS+=("$relay")
    "$LOADGEN" upstream --port "$up" --seconds 120 >/dev/null &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$port/health"
    for name in warm $(seq -f 'a%g' "$AGENTS"); do
      RUST_LOG=error "$binary" agent --relay "http://127.0.0.1:$port" --name "$name" \
        --upstream "http://127.0.0.1:$up" &
      PIDS+=($!)
    done
    listed "$port" $((AGENTS + 1))
    for _ in 1 2 3; do carry "$port" warm download && carry "$port" warm upload; done
    before=$(rss "$relay")
    for i in $(seq "$AGENTS"); do carry "$port" "a$i" "$direction"; done
    after=$(rss "$relay")
    echo "$binary: $(((after - before) / AGENTS)) KiB more per idle agent link after a 1 MiB $direction each ($AGENTS links)"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
  done
done
