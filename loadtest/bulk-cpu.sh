#!/usr/bin/env bash
# The relay's and the agent's CPU for bodies through an agent, for one or more `burrow` binaries
# (to compare two builds; run them interleaved, several times: the spread is ±10 %). For each
# binary: a relay on the memory store, a loadgen upstream and one `burrow agent`; then COUNT
# downloads of 100 MiB (`GET /r/svc/big?mb=100`) and, apart, COUNT uploads of 100 MiB
# (`PUT /r/svc/sink`, without `Expect`), one at a time with curl, and one line: the CPU ticks
# (10 ms) each process spent on each. Everything runs on 127.0.0.1 and stops by itself.
#
#   loadtest/bulk-cpu.sh /tmp/old/burrow target/release/burrow
#
# Needs curl and a release loadgen (`cargo build --release -p loadgen`).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-8}
LOADGEN=${LOADGEN_BIN:-target/release/loadgen}
. loadtest/lib.sh
scratch bulk-cpu

for binary in "$@"; do
  port=$(free_port) up=$(free_port)
  BURROW_STORE=memory BURROW_LISTEN="127.0.0.1:$port" BURROW_ACCESS_LOG=0 RUST_LOG=warn \
    "$binary" serve &
  relay=$!
  "$LOADGEN" upstream --port "$up" --seconds 300 >/dev/null &
  upstream=$!
  wait_http "http://127.0.0.1:$port/health"
  RUST_LOG=error "$binary" agent --relay "http://127.0.0.1:$port" --name svc \
    --upstream "http://127.0.0.1:$up" &
  agent=$!
  PIDS+=("$relay" "$upstream" "$agent")
  wait_http "http://127.0.0.1:$port/r/svc/small"
  line="$binary:"
  for direction in download upload; do
    relay_before=$(ticks "$relay") agent_before=$(ticks "$agent")
    for _ in $(seq "$COUNT"); do
      if [[ $direction == download ]]; then
        got=$(curl -sf "http://127.0.0.1:$port/r/svc/big?mb=100" | wc -c)
      else
        got=$(head -c 104857600 /dev/zero | curl -sf -H 'Expect:' -T - "http://127.0.0.1:$port/r/svc/sink")
      fi
      [[ $got == 104857600 ]] || { echo "$direction: got $got bytes" >&2 && exit 1; }
    done
    line+=" $direction relay=$(($(ticks "$relay") - relay_before)) agent=$(($(ticks "$agent") - agent_before))"
  done
  echo "$line ticks for $COUNT × 100 MiB"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
done
