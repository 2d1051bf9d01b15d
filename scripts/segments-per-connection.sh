#!/usr/bin/env bash
# TCP segments per proxied connection on loopback (client, proxy and backend sides together, from
# `nstat`'s TcpOutSegs), fulcrum and HAProxy side by side, for an HTTP listener and a TCP (L4)
# listener: each proxies `wrk -c8 -d4s -H 'Connection: close'` (one connection per request) to one
# `fulcrum app` backend. The HTTP listeners keep their server connections, so the HTTP figure is the
# client's side plus 2 (request and answer to the server); the L4 figure holds both connections'
# handshakes and closes. Needs: a release build, wrk, haproxy, iproute2 (apt-get install -y wrk
# haproxy iproute2). Ports 19301 (backend), 19380/19381 (fulcrum http/tcp), 19390/19391 (haproxy).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/fulcrum
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/fulcrum.toml" <<EOT
[[listeners]]
name = "http"
bind = "127.0.0.1:19380"
protocol = "http"
pool = "b"

[[listeners]]
name = "tcp"
bind = "127.0.0.1:19381"
protocol = "tcp"
pool = "b"

[[pools]]
name = "b"
servers = [ { address = "127.0.0.1:19301" } ]
EOT
cat > "$dir/haproxy.cfg" <<EOT
global
  nbthread 1
defaults
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend http
  mode http
  option http-keep-alive
  bind 127.0.0.1:19390
  default_backend bhttp
frontend tcp
  mode tcp
  bind 127.0.0.1:19391
  default_backend btcp
backend bhttp
  mode http
  http-reuse always
  server b1 127.0.0.1:19301
backend btcp
  mode tcp
  server b1 127.0.0.1:19301
EOT
"$bin" app --listen 127.0.0.1:19301 --name b1 >/dev/null 2>&1 &
"$bin" run --config "$dir/fulcrum.toml" >/dev/null 2>&1 &
haproxy -f "$dir/haproxy.cfg" -db >/dev/null 2>&1 &
sleep 2
segments() { # name port
  local done
  nstat -n >/dev/null
  done=$(wrk -t1 -c8 -d4s -H 'Connection: close' "http://127.0.0.1:$2/" | awk '/requests in/ {print $1}')
  nstat >"$dir/$1.nstat"
  awk -v n="$done" -v name="$1" '/TcpOutSegs/ {printf "%-14s %.2f TCP segments per connection (%d connections)\n", name, $2 / n, n}' "$dir/$1.nstat"
}
segments "fulcrum http" 19380
segments "haproxy http" 19390
segments "fulcrum tcp" 19381
segments "haproxy tcp" 19391
