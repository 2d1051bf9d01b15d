#!/usr/bin/env bash
# User and kernel CPU per proxied TCP connection, fulcrum and HAProxy (mode tcp) side by side. Each
# proxy runs pinned to CPU 1 and proxies `wrk -H 'Connection: close'` (one connection per request,
# pinned to CPU 0) to one nginx backend for 5 s; its utime and stime (/proc/PID/stat) are read before
# and after. Shows how much of a connection's cost is the kernel's (TCP handshakes, segments, socket
# setup and teardown: the same for every proxy) and how much is the proxy's own code. Needs: a release
# build, wrk, haproxy, nginx, bc. Ports 19101 (backend), 19180 (fulcrum), 19181 (haproxy), 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/target/release/fulcrum
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null; rm -rf "$dir"' EXIT
cat > "$dir/fulcrum.toml" <<EOT
[[listeners]]
name = "bench"
bind = "127.0.0.1:19180"
protocol = "tcp"
pool = "b"

[[pools]]
name = "b"
servers = [ { address = "127.0.0.1:19101" } ]
EOT
cat > "$dir/haproxy.cfg" <<EOT
global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend fe
  bind 127.0.0.1:19181
  default_backend be
backend be
  server b1 127.0.0.1:19101
EOT
cat > "$dir/nginx.conf" <<EOT
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx.err;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:19101; location / { return 200 "hello\n"; } } }
EOT
taskset -c 0 nginx -c "$dir/nginx.conf" -p "$dir"
hz=$(getconf CLK_TCK)
measure() { # name port command...
  local name=$1 port=$2; shift 2
  taskset -c 1 "$@" >"$dir/$name.log" 2>&1 &
  local pid=$!
  sleep 1.5
  taskset -c 0 wrk -t1 -c8 -d1s -H 'Connection: close' "http://127.0.0.1:$port/" >/dev/null
  local u0 s0 u1 s1 n
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  n=$(taskset -c 0 wrk -t1 -c8 -d5s -H 'Connection: close' "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo "$name: $n connections; per connection: user $(echo "scale=1; ($u1 - $u0) * 1000000 / $hz / $n" | bc) µs, kernel $(echo "scale=1; ($s1 - $s0) * 1000000 / $hz / $n" | bc) µs"
}
for round in 1 2 3; do
  echo "round $round"
  measure fulcrum 19180 "$bin" run --config "$dir/fulcrum.toml"
  measure haproxy 19181 haproxy -f "$dir/haproxy.cfg" -db
done
