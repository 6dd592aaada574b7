#!/usr/bin/env bash
# Runs Burrow with the embedded store on 0.0.0.0:8080 (settings from the environment; see
# README.md), after installing the build's system packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
command -v cargo >/dev/null 2>&1 || export PATH="$HOME/.cargo/bin:$PATH"
exec cargo run --release -- serve "$@"
