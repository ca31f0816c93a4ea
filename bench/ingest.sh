#!/usr/bin/env bash
# ingest.sh — in one run on one throwaway cluster: the raw write rate of a backlog of
# ROWS changes (100-row transactions, identity-service users rows), the rate at which
# pg_recvlogical (pgoutput) drains that backlog, and the rate at which `walhook run`
# ingests it (events committed to the store, which shares the source database).
#
# Usage: bench/ingest.sh [ROWS] (default 1000000)
# Env:   PGBIN, BENCH_DIR, BENCH_PORT (default 55498), WALHOOK (default target/release/walhook)
set -euo pipefail

ROWS="${1:-1000000}"
PORT="${BENCH_PORT:-55498}"
PGBIN="${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WALHOOK="${WALHOOK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/walhook}"
DIR="${BENCH_DIR:-$(mktemp -d /tmp/walhook-bench.XXXXXX)}"
[ -x "$PGBIN/postgres" ] || { echo "no PostgreSQL server binaries (install postgresql-15 or set PGBIN)" >&2; exit 2; }
[ -x "$WALHOOK" ] || (cd "$ROOT" && cargo build --release --quiet)

as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
sql() { "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d bench -c "$1"; }
now() { date +%s.%N; }

chmod 0755 "$DIR"; [ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
cleanup() { [ -n "${WPID:-}" ] && kill "$WPID" 2>/dev/null; as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

log "cluster in $DIR, port $PORT (PostgreSQL defaults, synchronous_commit on)"
as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
max_wal_size = 4GB
CONF
as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/pg.log" -w start >/dev/null
"$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE bench" postgres
sql "CREATE TABLE users (id bigserial PRIMARY KEY, org_id int NOT NULL, email text NOT NULL,
       display_name text NOT NULL, status text NOT NULL DEFAULT 'active',
       created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now())"

cat >"$DIR/walhook.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/bench?sslmode=disable"
slot = "walhook_bench"
publication = "walhook"

[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.users"
entity = "user"
TOML
WALHOOK_LOG=warn "$WALHOOK" setup -c "$DIR/walhook.toml" >/dev/null
sql "SELECT pg_create_logical_replication_slot('recvlogical_bench', 'pgoutput')" >/dev/null

log "raw: writing $ROWS rows in 100-row transactions (no reader running)"
cat >"$DIR/batch.sql" <<'SQL'
INSERT INTO users (org_id, email, display_name)
SELECT (random() * 1000)::int, 'user' || g || '-' || random() || '@example.com', 'Some Person'
FROM generate_series(1, 100) g;
SQL
t0=$(now)
"$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 4 -j 2 -t $((ROWS / 400)) -f "$DIR/batch.sql" bench >/dev/null
t1=$(now)
ENDPOS="$(sql "SELECT pg_current_wal_insert_lsn()")"
sql "INSERT INTO users (org_id, email, display_name) VALUES (0, 'end@example.com', 'end')"
sql "CHECKPOINT"
N=$((ROWS / 400 * 400 + 1))

log "pg_recvlogical drains the backlog"
t2=$(now)
"$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d bench --slot=recvlogical_bench --start \
  --endpos="$ENDPOS" -o proto_version=1 -o publication_names=walhook -f /dev/null -s 10 -F 0 --no-loop
t3=$(now)

log "walhook run ingests the backlog"
WALHOOK_LOG="${BENCH_LOG:-warn}" "$WALHOOK" run -c "$DIR/walhook.toml" 2>"$DIR/walhook.log" &
WPID=$!
t4=$(now)
peak=0
while :; do
  done_seq="$(sql "SELECT last_seq FROM walhook.checkpoints")"
  rss="$(awk '/VmHWM/ {print $2}' "/proc/$WPID/status" 2>/dev/null || echo 0)"
  [ "${rss:-0}" -gt "$peak" ] && peak=$rss
  [ "$done_seq" -ge "$N" ] && break
  kill -0 "$WPID" 2>/dev/null || { cat "$DIR/walhook.log" >&2; exit 1; }
  sleep 0.2
done
t5=$(now)
ps -o pid,cputime,args --ppid 1 -p "$WPID" $(pgrep -f "postgres: .*bench") 2>/dev/null | grep -E "walhook|postgres: " | grep -v grep >&2 || true
kill -TERM "$WPID"; wait "$WPID" || true; WPID=
awk -v n="$N" -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v e="$t4" -v f="$t5" -v rss="$peak" 'BEGIN {
  printf "raw write (pgbench, 100-row transactions): %d rows in %.2f s = %.0f rows/s\n", n, b - a, n / (b - a);
  printf "pg_recvlogical drain (pgoutput -> /dev/null): %.2f s = %.0f rows/s\n", d - c, n / (d - c);
  printf "walhook run ingest (events committed to the store): %.2f s = %.0f events/s (peak RSS %d KiB)\n", f - e, n / (f - e), rss;
  printf "walhook / pg_recvlogical: %.0f%%\n", 100 * (d - c) / (f - e) }'
cp "$DIR/walhook.log" /tmp/last-ingest.log 2>/dev/null || true
