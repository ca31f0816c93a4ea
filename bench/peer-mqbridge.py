#!/usr/bin/env python3
"""peer-mqbridge.py — drain a pgoutput slot with PyPI `mq-bridge` (Rust core) using its
`postgres_cdc` input, to an `http` output (one POST per change), a `file`, or `null`.
Run with the venv's python that has mq-bridge.

Usage: peer-mqbridge.py --slot wh_mqb --end-lsn LSN [--output http|null|file]
         [--url http://127.0.0.1:18080/hook] [--file PATH] [--batch-size 128]
         [--concurrency 1] [--http-concurrency 20] [--timeout 900]
Done = the slot's confirmed_flush_lsn reached --end-lsn (polled with psql every 100 ms;
mq-bridge reports progress every status_interval_ms=200). Prints `PEER_RESULT ...`.
Environment: PGBIN, WH_PGHOST (psql host for polling), WH_PGPORT, WH_DB, WH_REPL_HOST.
Copied from the CDC-to-webhooks bench kit (bench-kit/peer-mqbridge.py) so bench/run is self-contained.
"""
import argparse
import os
import resource
import subprocess
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--slot", default="wh_mqb")
ap.add_argument("--publication", default="wh_pub")
ap.add_argument("--end-lsn", required=True)
ap.add_argument("--output", default="http", choices=["http", "null", "file"])
ap.add_argument("--url", default="http://127.0.0.1:18080/hook")
ap.add_argument("--file", default="/tmp/wh-mqb-out.jsonl")
ap.add_argument("--batch-size", type=int, default=128)
ap.add_argument("--concurrency", type=int, default=1)
ap.add_argument("--http-concurrency", type=int, default=20)
ap.add_argument("--timeout", type=float, default=900.0)
args = ap.parse_args()

pgbin = os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin")
port = os.environ.get("WH_PGPORT", "55432")
db = os.environ.get("WH_DB", "wh")
sql_host = os.environ.get("WH_PGHOST", os.path.join(os.environ.get("WH_PGDIR", "/tmp/wh-pg"), "run"))
repl_host = os.environ.get("WH_REPL_HOST", "127.0.0.1")


def sql(q):
    return subprocess.run([f"{pgbin}/psql", "-X", "-A", "-t", "-h", sql_host, "-p", port, "-U", "postgres",
                           "-d", db, "-c", q], check=True, capture_output=True, text=True).stdout.strip()


import mq_bridge  # noqa: E402
from mq_bridge import Route  # noqa: E402

if args.output == "http":
    output = {"http": {"url": args.url, "method": "POST", "batch_concurrency": args.http_concurrency}}
elif args.output == "file":
    output = {"file": {"path": args.file}}
else:
    output = {"null": None}

cfg = {
    "input": {"postgres_cdc": {
        "url": f"postgres://postgres@{repl_host}:{port}/{db}",
        "publication": args.publication,
        "slot_name": args.slot,
        "create_slot": False,
        "consume": "capture_new",
        "status_interval_ms": 200,
    }},
    "output": output,
    "batch_size": args.batch_size,
    "concurrency": args.concurrency,
}

route = Route.from_config(cfg)
t0 = time.time()
route.start()
t_started = time.time()
reason = "timeout"
lag = None
while time.time() - t0 < args.timeout:
    r = sql(f"SELECT confirmed_flush_lsn >= '{args.end_lsn}'::pg_lsn, "
            f"pg_wal_lsn_diff('{args.end_lsn}', confirmed_flush_lsn)::bigint, active "
            f"FROM pg_replication_slots WHERE slot_name = '{args.slot}'")
    done, lag, active = r.split("|")
    if done == "t":
        reason = "caught-up"
        break
    time.sleep(0.1)
t1 = time.time()
route.stop()
route.join()
# CPU of this process: mq-bridge's Rust core runs in it (the psql polls are children, not counted).
ru = resource.getrusage(resource.RUSAGE_SELF)
print("PEER_RESULT tool=mq-bridge version=%s output=%s reason=%s start_call_s=%.3f drain_s=%.3f "
      "remaining_lag_bytes=%s batch_size=%d concurrency=%d http_concurrency=%d cpu_s=%.3f"
      % (getattr(mq_bridge, "__version__", "?"), args.output, reason, t_started - t0, t1 - t0, lag,
         args.batch_size, args.concurrency, args.http_concurrency, ru.ru_utime + ru.ru_stime))
sys.stdout.flush()
sys.exit(0 if reason == "caught-up" else 1)
