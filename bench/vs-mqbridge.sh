#!/usr/bin/env bash
# vs-mqbridge.sh — end to end against a peer, in one run: the CDC-to-webhooks bench kit
# (BENCH_KIT) drains a slot backlog of its identity workload (100-row transactions) with
# mq-bridge (one POST per change into the kit's nginx sink), then walhook drains the same
# kind of backlog: ingest into the store, sign, POST each event to the same nginx.
#
# Usage: BENCH_KIT=/path/to/bench-kit bench/vs-mqbridge.sh [ROWS] (default 100000)
# Needs what the kit needs (nginx, python3 venv for mq-bridge); WALHOOK overrides the
# binary (default: target/release/walhook, built).
set -euo pipefail
ROWS=${1:-100000}
KIT="$(cd "${BENCH_KIT:?set BENCH_KIT to the bench kit directory}" && pwd)"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$ROOT" && cargo build --release --quiet --bin walhook)
WALHOOK="${WALHOOK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/walhook}"
. "$KIT/lib.sh"
OUT="$(mktemp -d /tmp/walhook-vs-mqbridge.XXXXXX)"
"$KIT/pg-up.sh" >/dev/null
trap '"$KIT/pg-down.sh" >/dev/null 2>&1 || true' EXIT
"$KIT/peer-mqbridge.sh" "$ROWS" batch http | grep -E "^MQB_SUMMARY"
wh_prepare_db
cat > $OUT/w.toml <<T
[source]
url = "postgres://postgres@127.0.0.1:$WH_PGPORT/$WH_DB?sslmode=disable"
slot = "wh_walhook"
[server]
listen = "127.0.0.1:0"
[[tables]]
table = "public.users"
entity = "user"
[[tables]]
table = "public.user_roles"
entity = "user"
id = ["user_id"]
events = { insert = "role.assigned", delete = "role.unassigned", update = false }
[[tables]]
table = "public.applications"
entity = "application"
[[subscriptions]]
name = "nginx"
url = "http://127.0.0.1:18080/hook"
events = ["*"]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
max_in_flight = 64
T
# nginx's request counter counts the polls below too (a few hundred at most).
# First start: slot, publication and store; then stopped while the backlog is written.
WALHOOK_LOG=warn $WALHOOK run -c $OUT/w.toml 2>>$OUT/w.log >/dev/null & W=$!
until wh_sql "SELECT 1 FROM walhook.checkpoints WHERE leader IS NOT NULL" 2>/dev/null | grep -q 1; do sleep 0.2; done
kill $W; wait $W || true
rows0="$(wh_rows_changed)"
read -r BL_TPS BL_TXS BL_FAILED < <(wh_pgbench batch 8 -t $(( ROWS / 99 / 8 + 1 )))
wh_wait_no_pgbench
rows=$(( $(wh_rows_changed) - rows0 ))
wh_sql "CHECKPOINT" >/dev/null
"$KIT/nginx-sink.sh" start $OUT/nginx 18080 >/dev/null
before="$("$KIT/nginx-sink.sh" requests $OUT/nginx)"
wh_log "walhook: draining $rows rows end to end"
t0=$(wh_now)
WALHOOK_LOG=warn $WALHOOK run -c $OUT/w.toml 2>>$OUT/w.log >/dev/null & W=$!
trap 'kill $W 2>/dev/null; "$KIT/nginx-sink.sh" stop "$OUT/nginx" >/dev/null 2>&1; "$KIT/pg-down.sh" >/dev/null 2>&1 || true' EXIT
deadline=$(( $(date +%s) + 180 ))
while :; do
  n=$(( $("$KIT/nginx-sink.sh" requests $OUT/nginx) - before ))
  [ "$n" -ge "$rows" ] && break
  [ "$(date +%s)" -gt "$deadline" ] && { echo "timed out at $n posts"; break; }
  sleep 0.05
done
t1=$(wh_now)
cpu=$(awk '{ print ($14 + $15) / 100 }' /proc/$W/stat)
secs=$(wh_calc "$t1 - $t0")
echo "WALHOOK_SUMMARY rows_changed=$rows events=$(wh_sql "SELECT count(*) FROM walhook.events") posts=$n drain_s=$secs posts_per_s=$(wh_calc "$n / $secs") walhook_cpu_s=$cpu"
