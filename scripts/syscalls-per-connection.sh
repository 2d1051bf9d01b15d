#!/usr/bin/env bash
# System calls per proxied TCP connection, fulcrum and HAProxy (mode tcp) side by side: each proxies
# `wrk -H 'Connection: close'` (one connection per request) to one `fulcrum app` backend for 4 s while
# `strace -c -f` counts its calls. Needs: a release build, wrk, haproxy, strace (apt-get install -y wrk
# haproxy strace iproute2). Ports 19101 (backend), 19180 (fulcrum), 19181 (haproxy) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/fulcrum
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
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
"$bin" app --listen 127.0.0.1:19101 --name b1 >/dev/null 2>&1 &
sleep 1
count() { # name port command...
  local name=$1 port=$2; shift 2
  "$@" >/dev/null 2>&1 &
  local pid=$!
  sleep 1
  timeout 7 strace -c -f -p "$pid" -o "$dir/$name.strace" &
  sleep 1
  local done
  nstat -n >/dev/null
  done=$(wrk -t1 -c8 -d4s -H 'Connection: close' "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
  nstat >"$dir/$name.nstat"
  sleep 3
  kill "$pid" 2>/dev/null || true
  local calls
  calls=$(awk '/total$/ {print $4}' "$dir/$name.strace")
  echo "$name: $calls system calls for $done connections: $(echo "scale=1; $calls / $done" | bc) per connection"
  # TCP segments sent on loopback (client, proxy and backend together) per connection: the kernel's
  # share of the work, which no proxy can shrink below the protocol's.
  awk -v n="$done" -v name="$name" '/TcpOutSegs/ {printf "%s: %.1f TCP segments per connection\n", name, $2 / n}' "$dir/$name.nstat"
  sed -n '1,20p' "$dir/$name.strace"
}
count fulcrum 19180 "$bin" run --config "$dir/fulcrum.toml"
count haproxy 19181 haproxy -f "$dir/haproxy.cfg" -db
