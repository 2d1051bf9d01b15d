#!/usr/bin/env bash
# A small autoscaler for one fulcrum pool: the admin API at work (see docs/operations.md).
#
# Every INTERVAL seconds it reads GET /api/v1/pools/POOL. When the pool's saturation (requests in flight
# per available server, against the pool's `saturation_target`) is above HIGH, it starts
# `fulcrum-app --listen 127.0.0.1:PORT --name auto-N` and registers it (POST …/servers). When the
# saturation is below LOW, it drains the newest server it started (DELETE …/servers/auto-N), waits until
# fulcrum has removed it, then stops it. The pool stays within MIN and MAX servers. It ends after
# DURATION seconds (or on Ctrl-C), and then drains and stops every server it started.
#
# Everything stays on 127.0.0.1: the admin API must listen there, and the servers it starts do.
#
# Usage: scripts/autoscale.sh [--admin 127.0.0.1:9090] [--pool app] [--high 0.8] [--low 0.2]
#                             [--min 1] [--max 5] [--port 9101] [--interval 2] [--duration 300]
# Environment: FULCRUM_TOKEN (the admin.token, if one is set), FULCRUM_APP (default: fulcrum-app).
# Needs bash, curl and jq (Debian: apt-get install curl jq).
set -euo pipefail

ADMIN=127.0.0.1:9090 POOL=app HIGH=0.8 LOW=0.2 MIN=1 MAX=5 PORT=9101 INTERVAL=2 DURATION=300
while (($#)); do
  case "$1" in
    --admin) ADMIN=$2 ;;
    --pool) POOL=$2 ;;
    --high) HIGH=$2 ;;
    --low) LOW=$2 ;;
    --min) MIN=$2 ;;
    --max) MAX=$2 ;;
    --port) PORT=$2 ;;
    --interval) INTERVAL=$2 ;;
    --duration) DURATION=$2 ;;
    *) sed -n '2,16s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
  esac
  shift 2
done
[[ $ADMIN =~ ^127\.0\.0\.1:[0-9]+$ ]] || { echo "--admin must be 127.0.0.1:PORT" >&2; exit 2; }
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install $tool)" >&2; exit 2; }
done
APP=${FULCRUM_APP:-fulcrum-app}
API="http://$ADMIN/api/v1/pools/$POOL"
auth=()
[ -n "${FULCRUM_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $FULCRUM_TOKEN")

names=() pids=() # the servers this script started, oldest first
started=0

log() { echo "$(date +%T) $*"; }

add_server() {
  started=$((started + 1))
  local name="auto-$started" port=$((PORT + started - 1))
  "$APP" --listen "127.0.0.1:$port" --name "$name" >/dev/null 2>&1 &
  local pid=$!
  local up=
  for _ in $(seq 50); do # up to 5 s for the server to answer
    if curl -sf -o /dev/null "http://127.0.0.1:$port/health"; then up=1 && break; fi
    sleep 0.1
  done
  if [ -z "$up" ]; then
    log "! $name did not start on 127.0.0.1:$port"
    kill "$pid" 2>/dev/null || true
    return
  fi
  local answer
  answer=$(curl -s -w '\n%{http_code}' -X POST "${auth[@]}" -H 'Content-Type: application/json' \
    -d "{\"name\":\"$name\",\"address\":\"127.0.0.1:$port\"}" "$API/servers")
  if [ "${answer##*$'\n'}" = 201 ]; then
    names+=("$name") pids+=("$pid")
    log "+ $name at 127.0.0.1:$port"
  else
    log "! $name not added: ${answer%$'\n'*}"
    kill "$pid" 2>/dev/null || true
  fi
}

remove_newest() {
  local i=$((${#names[@]} - 1))
  local name=${names[$i]} pid=${pids[$i]} delay_ms
  delay_ms=$(curl -sf -X DELETE "${auth[@]}" "$API/servers/$name" | jq .deregistration_delay_ms) || delay_ms=0
  log "- $name draining (at most ${delay_ms} ms)"
  # The server leaves the pool when its requests have finished (or the delay passed): only then stop it.
  local deadline=$((SECONDS + delay_ms / 1000 + 5))
  while [ "$(curl -s -o /dev/null -w '%{http_code}' "$API/servers/$name")" = 200 ] && ((SECONDS < deadline)); do
    sleep 0.2
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  log "- $name removed and stopped"
  unset "names[$i]" "pids[$i]"
}

cleanup() {
  while ((${#names[@]})); do remove_newest; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "scaling pool $POOL at $ADMIN: add above $HIGH, drain below $LOW, $MIN to $MAX servers, for ${DURATION}s"
end=$((SECONDS + DURATION))
while ((SECONDS < end)); do
  if ! state=$(curl -sf "$API"); then
    log "cannot read $API"
    sleep "$INTERVAL"
    continue
  fi
  # saturation, servers not on their way out, requests in flight, and the verdict (jq does the floats).
  read -r saturation servers in_flight verdict < <(jq -r --argjson high "$HIGH" --argjson low "$LOW" '
    [ (.saturation // "none"),
      ([.servers[] | select(.removing | not)] | length),
      .in_flight,
      (if .saturation == null or .saturation > $high then "high"
       elif .saturation < $low then "low" else "ok" end) ] | @tsv' <<<"$state")
  log "saturation=$saturation servers=$servers in_flight=$in_flight"
  if [ "$verdict" = high ] && ((servers < MAX)); then
    add_server
  elif [ "$verdict" = low ] && ((servers > MIN && ${#names[@]} > 0)); then
    remove_newest
  fi
  sleep "$INTERVAL"
done
log "duration over"
