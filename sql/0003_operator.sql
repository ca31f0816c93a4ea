-- walhook store, version 3: what the operator commands (`walhook deliveries ...`) need.
-- A BRIN index on the log's ingest time: nearly free to maintain on an append-only
-- table (no per-row btree insert), and it narrows `--since`/`--until` and lookups of a
-- delivery by event id (a ULID, whose timestamp is the ingest time) to a time range.
CREATE INDEX events_ingested_at_brin ON {schema}.events USING brin (ingested_at);
