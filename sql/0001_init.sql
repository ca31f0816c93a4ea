-- walhook store, version 1: the event log, revision counters, the ingest checkpoint and
-- per-subscription state. `{schema}` is replaced by the configured schema name.

-- Where ingest stands, per replication slot: every source transaction that commits before
-- commit_lsn is stored, and of the one committing at commit_lsn the first rows_done
-- changes (all of them when complete). Written in the same transaction as the events.
CREATE TABLE {schema}.checkpoints (
    slot          text PRIMARY KEY,
    commit_lsn    pg_lsn NOT NULL DEFAULT '0/0',
    rows_done     bigint NOT NULL DEFAULT 0,
    complete      boolean NOT NULL DEFAULT true,
    -- seq of the last event appended to the log
    last_seq      bigint NOT NULL DEFAULT 0,
    -- bumped by each instance that takes over the slot; ingest checks it (G8)
    leader_epoch  bigint NOT NULL DEFAULT 0,
    leader        text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- The append-only event log. seq is commit order: only the slot holder appends, under
-- the checkpoint row's lock, so a reader's cursor never skips a row committed late.
CREATE TABLE {schema}.events (
    seq            bigint PRIMARY KEY,
    id             text NOT NULL,
    type           text NOT NULL,
    entity         text NOT NULL,
    entity_id      text NOT NULL,
    revision       bigint NOT NULL,
    occurred_at    timestamptz NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now(),
    data           json NOT NULL,
    previous       json,
    changed        text[],
    source_table   text NOT NULL,
    source_lsn     pg_lsn NOT NULL,
    source_xid     bigint NOT NULL,
    -- the subscriptions this event is due to
    subscriptions  text[] NOT NULL DEFAULT '{}'
);

-- The last revision given to each entity (G3).
CREATE TABLE {schema}.revisions (
    entity     text NOT NULL,
    entity_id  text NOT NULL,
    revision   bigint NOT NULL,
    PRIMARY KEY (entity, entity_id)
);

-- Per subscription: how far the dispatcher has got in the log, and whether it runs.
CREATE TABLE {schema}.subscription_state (
    subscription     text PRIMARY KEY,
    cursor           bigint NOT NULL DEFAULT 0,
    enabled          boolean NOT NULL DEFAULT true,
    paused           boolean NOT NULL DEFAULT false,
    disabled_reason  text,
    last_success_at  timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
