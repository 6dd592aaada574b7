#!/usr/bin/env bash
# Installs, via apt-get and only when missing, what building Burrow needs on a fresh Debian
# machine: a C toolchain, cmake and pkg-config (Pingora builds zlib-ng from source). With
# `--tests`, also redis-server (the tests start their own on a free port; no system service is used),
# openssl (the https-upstream test makes its certificates with it), curl and python3
# (scripts/test.sh waits for its relay with them), procps (its `kill`, which tests send signals with),
# and libcap2-bin and util-linux (setcap and setpriv: a test listens below port 1024 as the container
# image does, by a file capability and as another user; prlimit: a test starts the relay with a
# low open-file limit).
# With `--browser`, also Debian's chromium (/usr/bin/chromium) and Node.js with npm, for
# tests/browser; with `--loadtest`, redis-server, wrk and curl (for loadtest/run.sh). Options
# combine.
set -euo pipefail

# Debian packages, each with the commands that show it is installed.
declare -A needs=(
  [build-essential]="cc make"
  [cmake]=cmake
  [pkg-config]=pkg-config
)
for opt in "$@"; do
  case "$opt" in
    --tests)
      needs[redis-server]=redis-server needs[openssl]=openssl needs[curl]=curl
      needs[python3]=python3 needs[procps]=pkill
      needs[libcap2-bin]=setcap needs[util-linux]=setpriv
      ;;
    --browser) needs[chromium]=chromium needs[nodejs]=node needs[npm]=npm ;;
    --loadtest) needs[redis-server]=redis-server needs[wrk]=wrk needs[curl]=curl ;;
    *) echo "usage: $0 [--tests] [--browser] [--loadtest]" >&2; exit 2 ;;
  esac
done

missing=()
for pkg in "${!needs[@]}"; do
  for cmd in ${needs[$pkg]}; do
    command -v "$cmd" >/dev/null 2>&1 || { missing+=("$pkg"); break; }
  done
done
if ((${#missing[@]})); then
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  echo "==> installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
