#!/usr/bin/env bash
# Every session cure compared on this machine, with the same workload: the tables of
# docs/sessions.md ("Every cure compared").
#
# For each cure (balancer stickiness by cookie, application cookie and source address with memory
# sessions; session clustering; Redis; Redis with Sentinel; Redis Cluster) it starts three fulcrum-app
# servers behind one fulcrum, measures memory per 100,000 sessions, the latency of GET /me and how
# evenly the servers share it, then adds a fourth server, kills one, and kills the store's primary,
# counting what the users see. scripts/sessions-compare.py does the work and prints Markdown tables.
#
# Usage: scripts/sessions-compare.sh [--users 300] [--me 20] [--after 5] [--skewed 3000]
#          [--bulk 100000] [--store-window 8] [--only memory,cluster,redis,sentinel,redis-cluster]
#        scripts/sessions-compare.sh --help
# Build first: cargo build --release (it uses target/release/fulcrum and target/release/fulcrum-app).
# Needs python3 (3.11), wrk, redis-server and redis-cli (Debian: apt-get install wrk redis-server).
# Everything listens on 127.0.0.1; about 2 minutes; every process it starts is stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
for bin in target/release/fulcrum target/release/fulcrum-app; do
  [ -x "$bin" ] || { echo "$bin is missing: cargo build --release" >&2; exit 2; }
done
for tool in python3 wrk redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 2; }
done

work=$(mktemp -d /tmp/sessions-compare.XXXXXX)
pidfile=$work/pids
touch "$pidfile"
cleanup() {
  # The helper stops what it started; this catches what a crash or a signal left behind.
  while read -r pid; do
    if kill -0 "$pid" 2>/dev/null && grep -qE 'fulcrum|redis' "/proc/$pid/cmdline" 2>/dev/null; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done <"$pidfile"
  rm -rf "$work"
}
trap cleanup EXIT

# In the background, so that a signal to this script is handled at once rather than after the helper.
timeout 600 python3 scripts/sessions-compare.py --workdir "$work" --pidfile "$pidfile" "$@" &
helper=$!
trap 'kill -TERM "$helper" 2>/dev/null; wait "$helper"; exit 130' INT TERM
wait "$helper"
