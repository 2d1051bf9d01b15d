#!/usr/bin/env bash
# Hostile-traffic check with external tools, against a release build of fulcrum on 127.0.0.1:
# slowhttptest in slow-headers (Slowloris), slow-body (R-U-Dead-Yet) and slow-read modes with 1,000
# connections each, then an h2load flood over h2c, while a probe client keeps asking for a page every
# 200 ms. It passes when every probe got its 200 and fulcrum is still up. Bounded: about 2 minutes.
#
#   apt-get install -y slowhttptest nghttp2-client curl     # once, as root
#   scripts/attack.sh                                       # builds target/release/fulcrum if needed
#
# Timeouts are short here (5 s) so that the attackers' connections are seen closed within the run.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in slowhttptest h2load curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install -y slowhttptest nghttp2-client curl)" >&2; exit 1; }
done
[ -x target/release/fulcrum ] || cargo build --release -p fulcrum -p fulcrum-app
[ -x target/release/fulcrum-app ] || cargo build --release -p fulcrum-app

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

target/release/fulcrum-app --listen 127.0.0.1:18301 --name A >/dev/null 2>&1 & pids+=($!)
target/release/fulcrum-app --listen 127.0.0.1:18302 --name B >/dev/null 2>&1 & pids+=($!)
cat > "$dir/fulcrum.toml" <<TOML
shutdown_timeout = "2s"
[admin]
bind = "127.0.0.1:18390"

[[listeners]]
name = "web"
bind = "127.0.0.1:18380"
protocol = "http"
pool = "app"
max_connections = 20000
request_header_timeout = "5s"
body_timeout = "5s"
write_timeout = "5s"
idle_timeout = "10s"

[[pools]]
name = "app"
servers = [{ address = "127.0.0.1:18301" }, { address = "127.0.0.1:18302" }]
TOML
ulimit -n 65536 2>/dev/null || true
RUST_LOG=error target/release/fulcrum run --config "$dir/fulcrum.toml" & fulcrum=$!; pids+=($fulcrum)
for _ in $(seq 50); do curl -sf -o /dev/null http://127.0.0.1:18380/ && break; sleep 0.1; done

probe_fail=0; probe_ok=0
probe() { # $1: seconds
  local end=$((SECONDS + $1))
  while [ $SECONDS -lt $end ]; do
    if curl -sf -m 3 -o /dev/null http://127.0.0.1:18380/; then probe_ok=$((probe_ok + 1)); else probe_fail=$((probe_fail + 1)); fi
    sleep 0.2
  done
}

run() { # name, command...
  local name=$1; shift
  echo "== $name"
  "$@" >"$dir/$name.log" 2>&1 & local attack=$!
  # What fulcrum holds: client connections open on its port 4 s and 12 s into the attack
  # (slowhttptest's own counters do not show connections the server closed).
  ( sleep 4; a=$(ss -Htn state established '( sport = :18380 )' | wc -l)
    sleep 8; b=$(ss -Htn state established '( sport = :18380 )' | wc -l)
    echo "   connections open on fulcrum's port: $a after 4 s, $b after 12 s" ) &
  probe 25
  wait "$attack" || true
  grep -aE "service available" "$dir/$name.log" | tail -1 || true
  kill -0 "$fulcrum" || { echo "fulcrum died during $name" >&2; exit 1; }
}

run slow-headers slowhttptest -H -c 1000 -r 250 -i 4 -l 20 -u http://127.0.0.1:18380/ -p 3
run slow-body    slowhttptest -B -c 1000 -r 250 -i 4 -l 20 -s 100000 -u http://127.0.0.1:18380/echo -p 3
run slow-read    slowhttptest -X -c 1000 -r 250 -l 20 -k 3 -n 5 -w 10 -y 20 -z 1 -u http://127.0.0.1:18380/bytes/1000000 -p 3
run h2-flood     h2load -c 50 -m 100 -D 20 http://127.0.0.1:18380/

rss=$(awk '/VmRSS/ {print $2}' "/proc/$fulcrum/status")
echo "probes: $probe_ok answered, $probe_fail failed; fulcrum RSS ${rss} KiB"
[ "$probe_fail" -eq 0 ]
