#!/usr/bin/env bash
# deliver.sh — delivery figures on a throwaway cluster, receiver on loopback
# (examples/sink.rs, answers 200 at once):
#   1. commit-to-receiver latency p50/p99 at a steady 1,000 single-row changes/s (20 s);
#   2. the highest sustained delivered events/s: ROWS changes (100-row txns) are ingested
#      while the subscription is paused, then the backlog is delivered; walhook's CPU
#      time per delivered event is printed too (a figure the machine's load moves less).
# Usage: bench/deliver.sh [ROWS] (default 100000)
# Env:   PGBIN, BENCH_DIR, BENCH_PORT (default 55497), SINK_PORT (default 18080)
set -euo pipefail

ROWS="${1:-100000}"
PORT="${BENCH_PORT:-55497}"
SINK_PORT="${SINK_PORT:-18080}"
PGBIN="${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${BENCH_DIR:-$(mktemp -d /tmp/walhook-bench.XXXXXX)}"
(cd "$ROOT" && cargo build --release --quiet --bin walhook --example sink)
WALHOOK="${WALHOOK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/walhook}"
SINK="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/sink"

as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
sql() { "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d bench -c "$1"; }

chmod 0755 "$DIR"; [ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
cleanup() { [ -n "${WPID:-}" ] && kill "$WPID" 2>/dev/null; as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
wal_level = logical
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
CONF
as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/pg.log" -w start >/dev/null
"$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE bench" postgres
sql "CREATE TABLE users (id bigserial PRIMARY KEY, org_id int NOT NULL, email text NOT NULL, status text NOT NULL DEFAULT 'active')"
cat >"$DIR/walhook.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/bench?sslmode=disable"

[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.users"
entity = "user"

[[subscriptions]]
name = "sink"
url = "http://127.0.0.1:$SINK_PORT/hook"
events = ["user.*"]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
max_in_flight = 64
TOML
WALHOOK_LOG=warn "$WALHOOK" run -c "$DIR/walhook.toml" 2>"$DIR/walhook.log" &
WPID=$!
sleep 2

# CPU seconds (user + system) a process has used so far; `pg_cpu_secs`: the server's
# processes (postmaster and its children).
cpu_secs() { awk '{ print ($14 + $15) / 100 }' "/proc/${1:-$WPID}/stat"; }
PGPID=$(head -n 1 "$DIR/data/postmaster.pid")
pg_cpu_secs() {
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v pm="$PGPID" '{ sub(/^.*\) /, ""); if ($2 == pm) t += $12 + $13 } END { printf "%.2f", t / 100 }'
}

log "1. latency at 1,000 changes/s for 20 s"
echo "INSERT INTO users (org_id, email) VALUES (1, 'u' || random() || '@example.com');" >"$DIR/one.sql"
"$SINK" "$SINK_PORT" 20000 >"$DIR/sink1.txt" &
SPID=$!
sleep 0.5
"$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -R 1000 -T 20 -f "$DIR/one.sql" bench >/dev/null
wait "$SPID"
echo "steady 1,000/s: $(cat "$DIR/sink1.txt")"

log "2. backlog drain: $ROWS changes (100-row transactions) ingested while the subscription is paused, then delivered"
sql "UPDATE walhook.subscription_state SET paused = true"
sleep 2
before_events=$(sql "SELECT count(*) FROM walhook.events")
echo "INSERT INTO users (org_id, email) SELECT 1, 'u' || g || '@example.com' FROM generate_series(1, 100) g;" >"$DIR/batch.sql"
"$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -t $((ROWS / 400)) -f "$DIR/batch.sql" bench >/dev/null
until [ "$(sql "SELECT count(*) FROM walhook.events")" -ge $((before_events + ROWS)) ]; do sleep 0.5; done
"$SINK" "$SINK_PORT" "$ROWS" >"$DIR/sink2.txt" &
SPID=$!
sleep 0.5
cpu0=$(cpu_secs); sink0=$(cpu_secs "$SPID"); pg0=$(pg_cpu_secs)
sql "UPDATE walhook.subscription_state SET paused = false"
# Sampled until the sink reports (it exits then; walhook goes on idling).
cpu1=$cpu0; sink1=$sink0; pg1=$pg0
until grep -q received "$DIR/sink2.txt" 2>/dev/null; do
  c=$(cpu_secs 2>/dev/null) && cpu1=$c
  c=$(cpu_secs "$SPID" 2>/dev/null) && sink1=$c
  pg1=$(pg_cpu_secs); sleep 0.2
done
wait "$SPID"
per_event() { awk -v a="$1" -v b="$2" -v n="$ROWS" 'BEGIN { printf "%.1f s = %.0f us per delivered event", b - a, (b - a) * 1e6 / n }'; }
echo "backlog drain: $(cat "$DIR/sink2.txt")"
echo "CPU while draining: walhook $(per_event "$cpu0" "$cpu1"); PostgreSQL $(per_event "$pg0" "$pg1"); sink $(per_event "$sink0" "$sink1")"
