-- walhook store, version 2: deliveries. The happy path writes nothing per delivery: a
-- subscription's cursor in the event log says which events were delivered at their
-- first attempt. Rows exist only for deliveries that needed a retry, went dead, or are
-- queued behind such a delivery of the same entity (ordering = "entity").
CREATE TABLE {schema}.delivery_retries (
    subscription     text NOT NULL,
    seq              bigint NOT NULL,
    entity           text NOT NULL,
    entity_id        text NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    first_due_at     timestamptz NOT NULL DEFAULT now(),
    last_status      integer,
    last_error       text,
    last_response    text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, seq)
);
CREATE INDEX delivery_retries_due_idx ON {schema}.delivery_retries (subscription, next_attempt_at) WHERE status = 'pending';
CREATE INDEX delivery_retries_entity_idx ON {schema}.delivery_retries (subscription, entity, entity_id, seq) WHERE status = 'pending';

-- Which instance dispatches a subscription (one at a time; another takes over when the
-- lease runs out).
ALTER TABLE {schema}.subscription_state
    ADD COLUMN lease_owner text,
    ADD COLUMN lease_until timestamptz;

-- What operators query: one row per (event, subscription it is due to).
CREATE VIEW {schema}.deliveries AS
SELECT e.id || ':' || s.subscription AS id,
       e.id AS event_id,
       s.subscription,
       e.seq,
       e.type,
       e.entity,
       e.entity_id,
       e.revision,
       COALESCE(r.status, CASE WHEN e.seq <= s.cursor THEN 'delivered' ELSE 'pending' END) AS status,
       COALESCE(r.attempts, CASE WHEN e.seq <= s.cursor THEN 1 ELSE 0 END) AS attempts,
       COALESCE(r.next_attempt_at, CASE WHEN e.seq > s.cursor THEN e.ingested_at END) AS next_attempt_at,
       r.last_status,
       r.last_error,
       r.last_response,
       r.delivered_at,
       e.occurred_at,
       e.ingested_at
FROM {schema}.events e
JOIN {schema}.subscription_state s ON s.subscription = ANY (e.subscriptions)
LEFT JOIN {schema}.delivery_retries r ON r.subscription = s.subscription AND r.seq = e.seq;
