#!/usr/bin/env python3
"""Writes the pgoutput seed corpora from logical slots on a real cluster.

Usage: capture_pgoutput.py PSQL_ARGS... (e.g. -h /tmp/pg -p 5432 -U postgres)

Reads every message of slots `fuzz` (text values), `fuzzbin` (binary 'true') and
`fuzzmsg` (messages 'true'), publication `fuzz`, with pg_logical_slot_peek_binary_changes,
and writes:
  fuzz/corpus/pgoutput_stream/<slot>-*: each session, and its prefixes cut after each
    commit, as length-prefixed streams (big-endian u32 length, then the message);
  fuzz/corpus/pgoutput_message/<tag>-*: each distinct message; row changes get the
    relation ids of walhook::fuzzing::FUZZ_TABLES (users with 14 columns: 1, with 15: 2,
    audit: 3, roles: 4), the tables the target announces, so that they reach value
    conversion.
The workload that fills the slots is in fuzz/README.md.
"""
import hashlib, os, struct, subprocess, sys

PSQL = ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1"] + sys.argv[1:]
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")
SLOTS = {
    "fuzz": [],
    "fuzzbin": ["binary", "true"],
    "fuzzmsg": ["messages", "true"],
}


def sql(query):
    return subprocess.run(PSQL + ["-c", query], check=True, capture_output=True, text=True).stdout


def messages(slot, options):
    opts = ", ".join(f"'{o}'" for o in ["proto_version", "1", "publication_names", "fuzz"] + options)
    rows = sql(f"select encode(data, 'hex') from pg_logical_slot_peek_binary_changes('{slot}', NULL, NULL, {opts})")
    return [bytes.fromhex(line) for line in rows.split()]


def frame(msgs):
    return b"".join(struct.pack(">I", len(m)) + m for m in msgs)


def write(dir_, name, data):
    os.makedirs(dir_, exist_ok=True)
    with open(os.path.join(dir_, name), "wb") as f:
        f.write(data)


oids = {
    name: int(sql(f"select 'public.{name}'::regclass::oid").strip())
    for name in ("users", "audit", "roles")
}


def fuzz_relation_id(relation_id, columns):
    """The id walhook::fuzzing::FUZZ_TABLES gives this table's row changes."""
    if relation_id == oids["users"]:
        return 1 if columns == 14 else 2
    return {oids["audit"]: 3, oids["roles"]: 4}.get(relation_id, relation_id)



seen = set()
for slot, options in SLOTS.items():
    msgs = messages(slot, options)
    stream_dir = os.path.join(ROOT, "pgoutput_stream")
    write(stream_dir, f"{slot}-session", frame(msgs))
    commits = [i for i, m in enumerate(msgs) if m[:1] == b"C"]
    for n, i in enumerate(commits[:6]):
        write(stream_dir, f"{slot}-first-{n + 1}-txns", frame(msgs[: i + 1]))
    for m in msgs:
        if m[:1] in (b"I", b"U", b"D"):
            columns = struct.unpack(">H", m[6:8])[0]
            new_id = fuzz_relation_id(struct.unpack(">I", m[1:5])[0], columns)
            m = m[:1] + struct.pack(">I", new_id) + m[5:]
        digest = hashlib.sha1(m).hexdigest()[:12]
        if digest in seen:
            continue
        seen.add(digest)
        write(os.path.join(ROOT, "pgoutput_message"), f"{chr(m[0])}-{digest}", m)
print("wrote", len(seen), "messages")
