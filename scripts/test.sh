#!/usr/bin/env bash
# The one test command: installs what the tests need on a fresh Debian machine, then runs formatting,
# lints and every test (unit, property and black-box integration tests against real processes).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use, installed only when missing (needs root, as on CI):
# redis-server for the session tests, iproute2 (`ip netns`) for the ICMP health-check test and the
# redundancy tests' networks of namespaces, keepalived as a peer in the VRRP interop test, curl and
# openssl (`s_client`) as real TLS clients of the TLS tests, chromium and chromium-driver
# (`chromedriver`) for the dashboard's browser test.
packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v ip >/dev/null 2>&1 || packages+=(iproute2)
command -v keepalived >/dev/null 2>&1 || packages+=(keepalived)
command -v curl >/dev/null 2>&1 || packages+=(curl)
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
[ -x /usr/bin/chromium ] || packages+=(chromium)
command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
if ((${#packages[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
  else
    echo "missing packages: ${packages[*]} (run as root to install them)" >&2
    exit 1
  fi
fi

rustup component add clippy rustfmt >/dev/null 2>&1 || true

# No incremental state unless asked for: on a clean clone it is gigabytes that are never reused.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
