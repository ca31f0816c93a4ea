-- walhook store, version 4: batches (`batch_size > 1`). A batch POST that is delivered
-- at its first attempt writes nothing, like a single event. One that needs a retry is
-- kept here, body and all, so that every retry sends the same bytes under the same
-- `webhook-id`; its events' retry rows name it and share its fate.
CREATE TABLE {schema}.delivery_batches (
    subscription  text NOT NULL,
    batch_id      text NOT NULL,
    content_type  text NOT NULL,
    body          bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, batch_id)
);
ALTER TABLE {schema}.delivery_retries ADD COLUMN batch_id text;
CREATE INDEX delivery_retries_batch_idx ON {schema}.delivery_retries (subscription, batch_id) WHERE batch_id IS NOT NULL;

-- The operator view gains the batch a delivery was sent in (NULL: on its own, or in a
-- batch delivered at its first attempt).
CREATE OR REPLACE VIEW {schema}.deliveries AS
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
       e.ingested_at,
       r.batch_id
FROM {schema}.events e
JOIN {schema}.subscription_state s ON s.subscription = ANY (e.subscriptions)
LEFT JOIN {schema}.delivery_retries r ON r.subscription = s.subscription AND r.seq = e.seq;
