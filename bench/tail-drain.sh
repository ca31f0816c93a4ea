#!/usr/bin/env bash
# tail-drain.sh — drain one backlog of single-row transactions held by a slot, with
# `walhook tail --slot` and with `pg_recvlogical --plugin=pgoutput`, in the same run,
# and print both rates.
#
# Usage: bench/tail-drain.sh [ROWS] (default 1000000)
# Env:   PGBIN (default: newest /usr/lib/postgresql/*/bin), BENCH_DIR (default a temp dir),
#        BENCH_PORT (default 55499), WALHOOK (default target/release/walhook; built if missing)
# Runs as root (the server runs as the `postgres` OS user) or as a normal user.
set -euo pipefail

ROWS="${1:-1000000}"
PORT="${BENCH_PORT:-55499}"
PGBIN="${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WALHOOK="${WALHOOK:-${CARGO_TARGET_DIR:-$ROOT/target}/release/walhook}"
DIR="${BENCH_DIR:-$(mktemp -d /tmp/walhook-bench.XXXXXX)}"
[ -x "$PGBIN/postgres" ] || { echo "no PostgreSQL server binaries (install postgresql-15 or set PGBIN)" >&2; exit 2; }
[ -x "$WALHOOK" ] || (cd "$ROOT" && cargo build --release --quiet)

as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
sql() { "$PGBIN/psql" -X -q -A -t -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d bench -c "$1"; }

chmod 0755 "$DIR"; [ "$(id -u)" -eq 0 ] && chown postgres: "$DIR"
cleanup() { as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$DIR"; }
trap cleanup EXIT

log "cluster in $DIR, port $PORT"
as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
synchronous_commit = off
max_wal_size = 8GB
CONF
as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/pg.log" -w start >/dev/null
"$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -c "CREATE DATABASE bench" postgres
sql "CREATE TABLE users (id bigserial PRIMARY KEY, org_id int NOT NULL, email text NOT NULL,
       display_name text NOT NULL, status text NOT NULL DEFAULT 'active', roles text[] NOT NULL DEFAULT '{member}',
       created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
     CREATE PUBLICATION walhook FOR TABLE users;"
sql "SELECT pg_create_logical_replication_slot('walhook_bench', 'pgoutput')" >/dev/null
sql "SELECT pg_create_logical_replication_slot('recvlogical_bench', 'pgoutput')" >/dev/null

log "writing $ROWS single-row transactions"
cat >"$DIR/insert.sql" <<'SQL'
\set org random(1, 1000)
INSERT INTO users (org_id, email, display_name) VALUES (:org, 'user' || :client_id || '-' || random() || '@example.com', 'Some Person');
SQL
clients=4
"$PGBIN/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -c "$clients" -j 2 -t $((ROWS / clients)) -f "$DIR/insert.sql" bench >/dev/null
ENDPOS="$(sql "SELECT pg_current_wal_insert_lsn()")"
# One more transaction, committed past ENDPOS, so both readers see a commit at or beyond it.
sql "INSERT INTO users (org_id, email, display_name) VALUES (0, 'end@example.com', 'end')"
sql "CHECKPOINT"
log "backlog up to $ENDPOS"

cat >"$DIR/walhook.toml" <<TOML
[source]
url = "postgres://postgres@127.0.0.1:$PORT/bench?sslmode=disable"
slot = "walhook_bench"
publication = "walhook"

[[tables]]
table = "public.users"
TOML

t0=$(date +%s.%N)
"$PGBIN/pg_recvlogical" -h 127.0.0.1 -p "$PORT" -U postgres -d bench --slot=recvlogical_bench --start \
  --endpos="$ENDPOS" -o proto_version=1 -o publication_names=walhook -f /dev/null -s 10 -F 0 --no-loop
t1=$(date +%s.%N)
WALHOOK_LOG=warn "$WALHOOK" tail -c "$DIR/walhook.toml" --slot walhook_bench --endpos "$ENDPOS" >"$DIR/out.jsonl"
t2=$(date +%s.%N)
lines=$(wc -l <"$DIR/out.jsonl")
awk -v n="$ROWS" -v a="$t0" -v b="$t1" -v c="$t2" -v l="$lines" 'BEGIN {
  r = n / (b - a); w = n / (c - b);
  printf "pg_recvlogical (pgoutput, -> /dev/null): %d rows in %.2f s = %.0f rows/s\n", n, b - a, r;
  printf "walhook tail --slot (JSON lines, -> file): %d lines in %.2f s = %.0f rows/s\n", l, c - b, w;
  printf "walhook / pg_recvlogical: %.0f%%\n", 100 * w / r }'
