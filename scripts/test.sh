#!/usr/bin/env bash
# Runs every check and test of Burrow: the one command for CI and for a fresh Debian 12 machine.
#
# 1. Installs what the build and the tests need, via apt-get, only when it is missing
#    (scripts/install-deps.sh: a C toolchain, cmake, pkg-config, redis-server, openssl, curl,
#    python3 and procps, then chromium, Node.js and npm for step 4 — the tests start their own
#    redis-server on a free port; no system redis service is used).
# 2. Adds the rustfmt and clippy components when missing.
# 3. Runs `cargo fmt --check` and `cargo clippy -D warnings`.
# 4. Runs the browser test of the /demo/ page (tests/browser: headless Debian chromium, installed
#    when missing, driven by playwright-core under `node --test`).
# 5. Runs the conformance suite against an external relay (BURROW_URL, or one started here).
# 6. Runs every Rust test (cargo-nextest when installed, else `cargo test`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --tests

# rustup's default install puts cargo in ~/.cargo/bin, which a non-login shell may not have on PATH.
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

echo "==> cargo fmt"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# ---- Browser test (tests/browser): drives the relay's /demo/ page in headless Chromium ----
# Debian's chromium through playwright-core (no browser download), under Node's test runner; the
# test starts target/debug/burrow on a free port itself and leaves a screenshot in target/demo.png.
scripts/install-deps.sh --browser
cargo build --bin burrow
echo "==> browser test (tests/browser)"
burrow_bin="$PWD/target/debug/burrow"
(cd tests/browser && npm ci --no-audit --no-fund && BURROW_BIN="$burrow_bin" node --test)

# The conformance suite's `external` variants target BURROW_URL; when none is given, they run
# against a relay started here, so the external mode itself stays tested.
if [[ -z "${BURROW_URL:-}" ]]; then
  # A free port below the kernel's ephemeral range, where no outgoing connection can take it
  # before the relay binds it.
  port=$(python3 -c '
import random, socket
for port in random.sample(range(10000, 32768), 1000):
    try:
        socket.socket().bind(("127.0.0.1", port))
    except OSError:
        continue
    print(port)
    break')
  BURROW_LISTEN="127.0.0.1:$port" RUST_LOG=warn target/debug/burrow serve &
  relay=$!
  trap 'kill $relay 2>/dev/null || true' EXIT
  export BURROW_URL="http://127.0.0.1:$port"
  for _ in $(seq 100); do
    curl -sf "$BURROW_URL/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -sf "$BURROW_URL/health" >/dev/null || { echo "the relay on port $port did not start" >&2; exit 1; }
fi
echo "==> conformance suite against $BURROW_URL"
cargo test --test tests external -- --ignored

echo "==> tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast
else
  cargo test --no-fail-fast
fi
