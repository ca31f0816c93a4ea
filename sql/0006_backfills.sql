-- walhook store, version 6: backfills (`walhook backfill`, `[[tables]] snapshot = true`).
-- The CLI (or the daemon, for `snapshot = true`) inserts a request; the daemon that
-- holds the slot reads the table in primary-key chunks between watermarks and moves
-- `cursor` in the same ingest transaction as the chunk's events, so an interrupted
-- backfill goes on after its last stored chunk, without duplicates.
CREATE TABLE {schema}.backfills (
    id           bigserial PRIMARY KEY,
    table_name   text NOT NULL,                 -- schema-qualified, as in walhook.toml
    where_sql    text,                          -- extra condition, NULL: every row
    event        text,                          -- event name, NULL: {entity}.snapshot
    subscription text,                          -- the only subscription, NULL: all matching
    origin       text NOT NULL DEFAULT 'cli' CHECK (origin IN ('cli', 'snapshot')),
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'done', 'failed')),
    cursor       jsonb,                         -- primary key of the last row done (text forms)
    rows_done    bigint NOT NULL DEFAULT 0,     -- rows read by stored chunks
    events       bigint NOT NULL DEFAULT 0,     -- rows emitted as events
    rows_total   bigint,                        -- rows to read, counted at the start
    error        text,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
-- `snapshot = true` requests a table's backfill once, whichever instance sees it first.
CREATE UNIQUE INDEX backfills_snapshot_once ON {schema}.backfills (table_name) WHERE origin = 'snapshot';
