//! Store queries of the dispatcher: leases, new events past a subscription's cursor, due
//! retries, and recording attempts. The happy path (first attempt 2xx) writes one cursor
//! update per batch, nothing per delivery.
//!
//! Every write of delivery state (cursor, retry rows, queued rows, attempts, dead,
//! disable) is fenced by the writer's lease (G8): it commits only if `lease_owner` still
//! names the writer, checked in the same statement under a lock on the subscription's
//! state row, and fails with [`StoreError::LeaseLost`] otherwise. A takeover updates that
//! row, so it waits for a fenced write in progress and the write is visible to the new
//! holder, or the write waits for the takeover and then finds another owner and writes
//! nothing. Owners are unique per dispatcher (an instance's random id and a serial), so a
//! stale dispatcher of the same process is fenced out too.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio_postgres::Row;
use tokio_postgres::types::Json;

use super::{Store, StoreError};

/// A stored event due to a subscription, with its retry row when it has one. Its text
/// fields are shared (`Arc<str>`): an event the live log hands to a dispatcher, and
/// the per-entity order key the dispatcher keeps for it, are copies of pointers, not of
/// strings.
#[derive(Clone, Debug)]
pub struct DueEvent {
    pub seq: i64,
    pub id: Arc<str>,
    pub event_type: Arc<str>,
    pub entity: Arc<str>,
    pub entity_id: Arc<str>,
    pub revision: i64,
    pub occurred_at: SystemTime,
    pub data: RawJson,
    pub previous: Option<RawJson>,
    pub changed: Option<Vec<String>>,
    pub table: Arc<str>,
    pub lsn: Arc<str>,
    pub xid: i64,
    /// The context the event carried (`[[tables.context]]`), if its table has any.
    pub context: Option<RawJson>,
    /// Attempts made so far (0 for a new event).
    pub attempts: i32,
    /// When the delivery first became due (its age counts from here).
    pub first_due_at: SystemTime,
    /// The stored batch this retry row was sent in: a retry sends the whole batch
    /// again, and its answer settles every event of it.
    pub batch: Option<Arc<StoredBatch>>,
}

/// A JSON value of an event as stored (`data`, `previous`, `context`): its text, parsed
/// only for what needs its values (a filter, `fields`, a format other than the JSON
/// envelope); the JSON envelope copies it into the body as it is.
pub type RawJson = Arc<RawValue>;

/// A batch POST (`batch_size > 1`) kept when its first attempt did not deliver it, so
/// that every retry sends the same bytes under the same `webhook-id`.
#[derive(Debug, PartialEq, Eq)]
pub struct StoredBatch {
    pub id: String,
    pub content_type: String,
    pub body: Bytes,
}

/// Events fetched past a subscription's cursor.
#[derive(Debug)]
pub struct NewEvents {
    pub events: Vec<DueEvent>,
    /// The log was read up to here: no event up to it is due other than `events`.
    pub read_upto: i64,
    /// The log goes on past `read_upto`.
    pub more: bool,
}

/// A subscription's state as the lease holder sees it.
#[derive(Clone, Copy, Debug)]
pub struct SubscriptionLease {
    pub cursor: i64,
    pub enabled: bool,
    pub paused: bool,
}

/// What one attempt left on a retry row.
#[derive(Clone, Debug)]
pub struct AttemptRecord<'a> {
    pub status: &'a str,
    pub attempts: i32,
    pub next_attempt_at: SystemTime,
    pub last_status: Option<i32>,
    pub last_error: Option<&'a str>,
    pub last_response: Option<&'a str>,
    /// The batch the event was sent in, when it was sent in one with others: the row
    /// of every event of that batch gets this record.
    pub batch_id: Option<&'a str>,
}

/// The event columns [`due_event`] reads, in its order (14 columns: a query's own
/// columns after them start at index 14).
pub(super) const EVENT_FIELDS: &str = "e.seq, e.id, e.type, e.entity, e.entity_id, e.revision, e.occurred_at, e.data, e.previous, e.changed, e.source_table, e.source_lsn::text, e.source_xid, e.context";

pub(super) fn due_event(r: &Row, attempts: i32, first_due_at: SystemTime) -> DueEvent {
    DueEvent {
        seq: r.get(0),
        id: text(r, 1),
        event_type: text(r, 2),
        entity: text(r, 3),
        entity_id: text(r, 4),
        revision: r.get(5),
        occurred_at: r.get(6),
        data: raw(r.get(7)),
        previous: r.get::<_, Option<_>>(8).map(raw),
        changed: r.get(9),
        table: text(r, 10),
        lsn: text(r, 11),
        xid: r.get(12),
        context: r.get::<_, Option<_>>(13).map(raw),
        attempts,
        first_due_at,
        batch: None,
    }
}

/// Column `i` of `r`, a text, shared.
fn text(r: &Row, i: usize) -> Arc<str> {
    Arc::from(r.get::<_, &str>(i))
}

/// A due retry row and the id of the stored batch it was sent in, if any.
type DueRow = (DueEvent, Option<String>);

/// Due retry rows, oldest first, with one row per stored batch (its first) and rows of
/// at most `max_batches` batches; the batch ids to load, in order; and whether rows
/// were left out for that limit.
fn one_row_per_batch(rows: Vec<DueRow>, max_batches: usize) -> (Vec<DueRow>, Vec<String>, bool) {
    let mut seen = HashSet::new();
    let mut due = Vec::with_capacity(rows.len());
    let mut batch_ids = Vec::new();
    for (event, batch) in rows {
        if let Some(id) = &batch {
            if seen.contains(id) {
                continue;
            }
            if batch_ids.len() == max_batches.max(1) {
                return (due, batch_ids, true);
            }
            seen.insert(id.clone());
            batch_ids.push(id.clone());
        }
        due.push((event, batch));
    }
    (due, batch_ids, false)
}

fn raw(json: Json<Box<RawValue>>) -> RawJson {
    Arc::from(json.0)
}

/// A CTE (`lease`) with one row while `$2` holds the lease of subscription `$1`; it
/// locks the subscription's state row, so a takeover waits for the statement (or the
/// statement for the takeover, and then finds another owner).
fn lease_cte(s: &str) -> String {
    format!(
        "lease AS (SELECT 1 FROM {s}.subscription_state WHERE subscription = $1 AND lease_owner = $2 FOR SHARE)"
    )
}

/// `Err(LeaseLost)` unless `held`.
fn fenced(held: bool, subscription: &str) -> Result<(), StoreError> {
    if held {
        Ok(())
    } else {
        Err(StoreError::LeaseLost {
            subscription: subscription.to_owned(),
        })
    }
}

/// True while subscription `$1` is enabled and not paused: the dispatcher's queries
/// return nothing the moment an operator pauses it or a receiver disables it, not only
/// at its next lease renewal.
fn active_clause(s: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {s}.subscription_state st WHERE st.subscription = $1 AND st.enabled AND NOT st.paused)"
    )
}

impl Store {
    /// Takes or renews the dispatch lease of `subscription` for `owner`; `None` when
    /// another live instance holds it.
    pub async fn lease_subscription(
        &self,
        subscription: &str,
        owner: &str,
        ttl_seconds: f64,
    ) -> Result<Option<SubscriptionLease>, StoreError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "UPDATE {}.subscription_state
                     SET lease_owner = $2, lease_until = now() + make_interval(secs => $3)
                     WHERE subscription = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < now())
                     RETURNING cursor, enabled, paused",
                    self.s
                ),
                &[&subscription, &owner, &ttl_seconds],
            )
            .await?;
        Ok(row.map(|r| SubscriptionLease {
            cursor: r.get(0),
            enabled: r.get(1),
            paused: r.get(2),
        }))
    }

    /// Gives the lease up (at shutdown), so another instance takes over at once.
    pub async fn release_subscription(
        &self,
        subscription: &str,
        owner: &str,
    ) -> Result<(), StoreError> {
        self.client
            .execute(
                &format!(
                    "UPDATE {}.subscription_state SET lease_owner = NULL, lease_until = NULL WHERE subscription = $1 AND lease_owner = $2",
                    self.s
                ),
                &[&subscription, &owner],
            )
            .await?;
        Ok(())
    }

    /// Events after `after` that are due to `subscription` and have no retry row, in
    /// commit order: at most `limit` of them, from at most `window` positions of the log
    /// (counted from the first event after `after`). An event with a retry row belongs to
    /// the retries from then on: a session that starts from a cursor behind such a row
    /// (its predecessor stopped before moving the cursor past it) must not attempt it as
    /// a new event too, concurrently with its retry and with its attempts counted from 0.
    ///
    /// The window keeps the query an index range scan of bounded size whatever the
    /// planner believes: on a log that just grew by a backlog and has no statistics yet,
    /// an open-ended `seq > $2 AND $1 = ANY (subscriptions) ORDER BY seq LIMIT n` was
    /// planned as a scan and sort of the whole rest of the log, 50 ms per batch at
    /// 100,000 events. The head of the log is read in the same statement (so in the same
    /// snapshot), which tells how far the log was read even when no event in the window
    /// is due to this subscription. A paused or disabled subscription reads nothing (no
    /// row at all), so its cursor stays before the events it has not been sent.
    pub async fn new_events(
        &self,
        subscription: &str,
        after: i64,
        limit: i64,
        window: i64,
    ) -> Result<NewEvents, StoreError> {
        let s = &self.s;
        let statement = self
            .new_events
            .get_or_try_init(|| async {
                let sql = format!(
                    "SELECT {EVENT_FIELDS}, h.head, h.upto
                     FROM (SELECT (SELECT max(seq) FROM {s}.events) AS head,
                                  (SELECT min(seq) FROM {s}.events WHERE seq > $2) + $4 AS upto) h
                     LEFT JOIN LATERAL (
                         SELECT * FROM {s}.events e
                         WHERE e.seq > $2 AND e.seq < h.upto AND $1 = ANY (e.subscriptions)
                           AND NOT EXISTS (SELECT 1 FROM {s}.delivery_retries r WHERE r.subscription = $1 AND r.seq = e.seq)
                         ORDER BY e.seq LIMIT $3) e ON true
                     WHERE {active}
                     ORDER BY e.seq",
                    active = active_clause(s)
                );
                self.client.prepare(&sql).await
            })
            .await?;
        let rows = self
            .client
            .query(statement, &[&subscription, &after, &limit, &window])
            .await?;
        let (head, upto) = rows.first().map_or((None, None), |r| {
            (r.get::<_, Option<i64>>(14), r.get::<_, Option<i64>>(15))
        });
        let now = SystemTime::now();
        let events: Vec<DueEvent> = rows
            .iter()
            .filter(|r| r.get::<_, Option<i64>>(0).is_some())
            .map(|r| due_event(r, 0, now))
            .collect();
        let head = head.unwrap_or(after);
        let (read_upto, more) = match (events.last(), upto) {
            (Some(last), _) if events.len() as i64 == limit => (last.seq, last.seq < head),
            (_, Some(upto)) => ((upto - 1).min(head), upto - 1 < head),
            // No event past `after` at all.
            (_, None) => (after, false),
        };
        Ok(NewEvents {
            events,
            read_upto,
            more,
        })
    }

    /// Retry rows whose time has come, and whether there may be more (the query filled
    /// its `limit`). With `ordered`, only the oldest pending row of each entity (a later
    /// revision waits for the earlier one: G5). The rows of a stored batch come as one
    /// item, the first of them, carrying the batch.
    ///
    /// At most `max_batches` stored batches are taken (each holds the bodies of up to
    /// `batch_size` events, G6); the rows after the one that would exceed it are left
    /// for the next query, and the answer then says there may be more.
    pub async fn due_retries(
        &self,
        subscription: &str,
        ordered: bool,
        limit: i64,
        max_batches: usize,
    ) -> Result<(Vec<DueEvent>, bool), StoreError> {
        let s = &self.s;
        let order_clause = if ordered {
            // A scalar subquery, not NOT EXISTS: it is always one probe of the entity
            // index per row. As an anti join, with the stale statistics of a table that
            // just grew (a backlog), the planner chose a nested loop filtering every
            // pending row against every other: seconds per round at 20,000 rows.
            format!(
                "AND r.seq = (SELECT b.seq FROM {s}.delivery_retries b WHERE b.subscription = r.subscription
                   AND b.entity = r.entity AND b.entity_id = r.entity_id AND b.status = 'pending'
                   ORDER BY b.seq LIMIT 1)"
            )
        } else {
            String::new()
        };
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {EVENT_FIELDS}, r.attempts, r.first_due_at, r.batch_id FROM {s}.delivery_retries r
                     JOIN {s}.events e ON e.seq = r.seq
                     WHERE r.subscription = $1 AND r.status = 'pending' AND r.next_attempt_at <= now() {order_clause}
                       AND {active}
                     ORDER BY r.seq LIMIT $2",
                    active = active_clause(s)
                ),
                &[&subscription, &limit],
            )
            .await?;
        let rows: Vec<DueRow> = rows
            .iter()
            .map(|r| (due_event(r, r.get(14), r.get(15)), r.get(16)))
            .collect();
        let full = rows.len() as i64 == limit;
        let (due, batch_ids, cut) = one_row_per_batch(rows, max_batches);
        let mut batches = self.stored_batches(subscription, &batch_ids).await?;
        Ok((
            due.into_iter()
                .map(|(mut event, batch)| {
                    // A row whose batch is gone (which the store never does) is sent on
                    // its own.
                    event.batch = batch.and_then(|id| batches.remove(&id));
                    event
                })
                .collect(),
            full || cut,
        ))
    }

    /// The stored batches of `subscription` with these ids.
    async fn stored_batches(
        &self,
        subscription: &str,
        ids: &[String],
    ) -> Result<HashMap<String, Arc<StoredBatch>>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT batch_id, content_type, body FROM {}.delivery_batches
                     WHERE subscription = $1 AND batch_id = ANY ($2)",
                    self.s
                ),
                &[&subscription, &ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let batch = StoredBatch {
                    id: r.get(0),
                    content_type: r.get(1),
                    body: Bytes::from(r.get::<_, Vec<u8>>(2)),
                };
                (batch.id.clone(), Arc::new(batch))
            })
            .collect())
    }

    /// Which of `entities` have a pending retry row (later events must queue behind it).
    pub async fn blocked_entities(
        &self,
        subscription: &str,
        entities: &[(Arc<str>, Arc<str>)],
    ) -> Result<HashSet<(Arc<str>, Arc<str>)>, StoreError> {
        if entities.is_empty() {
            return Ok(HashSet::new());
        }
        let (es, ids): (Vec<&str>, Vec<&str>) = entities.iter().map(|(e, i)| (&**e, &**i)).unzip();
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT DISTINCT r.entity, r.entity_id FROM {}.delivery_retries r
                     JOIN unnest($2::text[], $3::text[]) k(entity, entity_id) ON k.entity = r.entity AND k.entity_id = r.entity_id
                     WHERE r.subscription = $1 AND r.status = 'pending'",
                    self.s
                ),
                &[&subscription, &es, &ids],
            )
            .await?;
        Ok(rows.iter().map(|r| (text(r, 0), text(r, 1))).collect())
    }

    /// Creates or updates the retry rows of `subscription` for attempts that need one
    /// (a retry, a dead delivery, or a retried delivery that finally arrived), and keeps
    /// `batches` (batch POSTs whose first attempt did not deliver them), in one
    /// statement, as lease holder `owner`. A record with a `batch_id` is the record of
    /// every row of that batch. An event listed twice is written once, with its last
    /// record (PostgreSQL refuses an `ON CONFLICT DO UPDATE` that would touch one row
    /// twice).
    pub async fn record_attempts(
        &self,
        subscription: &str,
        owner: &str,
        attempts: &[(&DueEvent, AttemptRecord<'_>)],
        batches: &[&StoredBatch],
    ) -> Result<(), StoreError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let mut seen = HashSet::new();
        let mut attempts: Vec<&(&DueEvent, AttemptRecord<'_>)> = attempts
            .iter()
            .rev()
            .filter(|(event, _)| seen.insert(event.seq))
            .collect();
        attempts.reverse();
        let now = SystemTime::now();
        let n = attempts.len();
        let (mut seqs, mut entities, mut ids) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut states, mut counts, mut nexts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut firsts, mut codes, mut errors) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut heads, mut delivered, mut in_batch) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (event, rec) in attempts {
            seqs.push(event.seq);
            entities.push(&*event.entity);
            ids.push(&*event.entity_id);
            states.push(rec.status);
            counts.push(rec.attempts);
            nexts.push(rec.next_attempt_at);
            firsts.push(event.first_due_at);
            codes.push(rec.last_status);
            errors.push(rec.last_error);
            heads.push(rec.last_response);
            delivered.push((rec.status == "delivered").then_some(now));
            in_batch.push(rec.batch_id);
        }
        let batch_ids: Vec<&str> = batches.iter().map(|b| b.id.as_str()).collect();
        let types: Vec<&str> = batches.iter().map(|b| b.content_type.as_str()).collect();
        let bodies: Vec<&[u8]> = batches.iter().map(|b| b.body.as_ref()).collect();
        // `m` gives the other rows of a stored batch the record of the one retried (rows
        // inserted by `w` are not in its snapshot: a new batch's rows are all in `w`).
        let held: bool = self
            .client
            .query_one(
                &format!(
                    "WITH {lease}, b AS (
                        INSERT INTO {s}.delivery_batches (subscription, batch_id, content_type, body)
                        SELECT $1, * FROM unnest($15::text[], $16::text[], $17::bytea[])
                        WHERE EXISTS (SELECT 1 FROM lease)
                        ON CONFLICT (subscription, batch_id) DO NOTHING
                        RETURNING 1),
                     w AS (
                        INSERT INTO {s}.delivery_retries AS r (subscription, seq, entity, entity_id, status, attempts, next_attempt_at,
                            first_due_at, last_status, last_error, last_response, delivered_at, batch_id)
                        SELECT $1, * FROM unnest($3::int8[], $4::text[], $5::text[], $6::text[], $7::int4[], $8::timestamptz[],
                            $9::timestamptz[], $10::int4[], $11::text[], $12::text[], $13::timestamptz[], $14::text[])
                        WHERE EXISTS (SELECT 1 FROM lease)
                        ON CONFLICT (subscription, seq) DO UPDATE SET status = excluded.status, attempts = excluded.attempts,
                            next_attempt_at = excluded.next_attempt_at, last_status = excluded.last_status,
                            last_error = excluded.last_error, last_response = excluded.last_response,
                            delivered_at = excluded.delivered_at, batch_id = COALESCE(excluded.batch_id, r.batch_id),
                            updated_at = now()
                        RETURNING 1),
                     m AS (
                        UPDATE {s}.delivery_retries x SET status = k.status, attempts = k.attempts,
                            next_attempt_at = k.next_attempt_at, last_status = k.last_status, last_error = k.last_error,
                            last_response = k.last_response, delivered_at = k.delivered_at, updated_at = now()
                        FROM unnest($3::int8[], $6::text[], $7::int4[], $8::timestamptz[], $10::int4[], $11::text[],
                            $12::text[], $13::timestamptz[], $14::text[])
                            k(seq, status, attempts, next_attempt_at, last_status, last_error, last_response, delivered_at, batch_id)
                        WHERE EXISTS (SELECT 1 FROM lease) AND x.subscription = $1 AND k.batch_id IS NOT NULL
                          AND x.batch_id = k.batch_id AND x.seq <> k.seq
                        RETURNING 1)
                     SELECT EXISTS (SELECT 1 FROM lease)",
                    s = self.s,
                    lease = lease_cte(&self.s)
                ),
                &[
                    &subscription, &owner, &seqs, &entities, &ids, &states, &counts, &nexts, &firsts, &codes, &errors,
                    &heads, &delivered, &in_batch, &batch_ids, &types, &bodies,
                ],
            )
            .await?
            .get(0);
        fenced(held, subscription)
    }

    /// Queues events behind an entity's pending delivery, without attempting them, as
    /// lease holder `owner`.
    pub async fn queue_behind(
        &self,
        subscription: &str,
        owner: &str,
        events: &[&DueEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut seen = HashSet::new();
        let events: Vec<&DueEvent> = events
            .iter()
            .copied()
            .filter(|e| seen.insert(e.seq))
            .collect();
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        let entities: Vec<&str> = events.iter().map(|e| &*e.entity).collect();
        let ids: Vec<&str> = events.iter().map(|e| &*e.entity_id).collect();
        let held: bool = self
            .client
            .query_one(
                &format!(
                    "WITH {lease}, w AS (
                        INSERT INTO {s}.delivery_retries (subscription, seq, entity, entity_id)
                        SELECT $1, * FROM unnest($3::int8[], $4::text[], $5::text[])
                        WHERE EXISTS (SELECT 1 FROM lease)
                        ON CONFLICT (subscription, seq) DO NOTHING
                        RETURNING 1)
                     SELECT EXISTS (SELECT 1 FROM lease)",
                    s = self.s,
                    lease = lease_cte(&self.s)
                ),
                &[&subscription, &owner, &seqs, &entities, &ids],
            )
            .await?
            .get(0);
        fenced(held, subscription)
    }

    /// Whether `subscription` is enabled and not paused (new events are read from the
    /// store only then; the live log is checked against this).
    pub async fn subscription_active(&self, subscription: &str) -> Result<bool, StoreError> {
        let row = self
            .client
            .query_one(
                &format!("SELECT {}", active_clause(&self.s)),
                &[&subscription],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The newest event of `subscription` with a retry row (of any status), or 0. New
    /// events past it have none, so they may be taken from the live log, which does not
    /// know of retry rows (see `store::live`).
    pub async fn newest_retry_row(&self, subscription: &str) -> Result<i64, StoreError> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT coalesce(max(seq), 0) FROM {}.delivery_retries WHERE subscription = $1",
                    self.s
                ),
                &[&subscription],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Deletes the pending rows of events `seqs` that will never be sent (the
    /// subscription's filter rejects them), as lease holder `owner`; the cursor then
    /// counts them as done. No statement when `seqs` is empty.
    pub async fn forget_pending(
        &self,
        subscription: &str,
        owner: &str,
        seqs: &[i64],
    ) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let held: bool = self
            .client
            .query_one(
                &format!(
                    "WITH {lease}, w AS (
                        DELETE FROM {s}.delivery_retries WHERE subscription = $1 AND seq = ANY ($3) AND status = 'pending'
                          AND EXISTS (SELECT 1 FROM lease)
                        RETURNING 1)
                     SELECT EXISTS (SELECT 1 FROM lease)",
                    s = self.s,
                    lease = lease_cte(&self.s)
                ),
                &[&subscription, &owner, &seqs],
            )
            .await?
            .get(0);
        fenced(held, subscription)
    }

    /// Moves the cursor of `subscription` forward to `seq` (never back), as lease holder
    /// `owner`. `last_success_at` moves to now when `success` and some event it passes
    /// has no retry row (was delivered at its first attempt); retried deliveries carry
    /// their own `delivered_at`.
    pub async fn advance_cursor(
        &self,
        subscription: &str,
        owner: &str,
        seq: i64,
        success: bool,
    ) -> Result<(), StoreError> {
        let n = self
            .client
            .execute(
                &format!(
                    "UPDATE {s}.subscription_state SET cursor = greatest(cursor, $3), updated_at = now(),
                        last_success_at = CASE WHEN $4 AND EXISTS (
                            SELECT 1 FROM {s}.events e WHERE e.seq > cursor AND e.seq <= $3 AND $1 = ANY (e.subscriptions)
                              AND NOT EXISTS (SELECT 1 FROM {s}.delivery_retries r WHERE r.subscription = $1 AND r.seq = e.seq))
                          THEN now() ELSE last_success_at END
                     WHERE subscription = $1 AND lease_owner = $2",
                    s = self.s
                ),
                &[&subscription, &owner, &seq, &success],
            )
            .await?;
        fenced(n == 1, subscription)
    }

    /// Disables a subscription (410 Gone) until an operator resumes it, as lease holder
    /// `owner`.
    pub async fn disable_subscription(
        &self,
        subscription: &str,
        owner: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        let n = self
            .client
            .execute(
                &format!(
                    "UPDATE {}.subscription_state SET enabled = false, disabled_reason = $3, updated_at = now()
                     WHERE subscription = $1 AND lease_owner = $2",
                    self.s
                ),
                &[&subscription, &owner, &reason],
            )
            .await?;
        fenced(n == 1, subscription)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, batch: Option<&str>) -> (DueEvent, Option<String>) {
        let event = DueEvent {
            seq,
            id: format!("evt_{seq}").into(),
            event_type: "user.updated".into(),
            entity: "user".into(),
            entity_id: seq.to_string().into(),
            revision: 1,
            occurred_at: SystemTime::UNIX_EPOCH,
            data: Arc::from(RawValue::from_string("{}".into()).unwrap()),
            previous: None,
            changed: None,
            table: "public.users".into(),
            lsn: "0/1".into(),
            xid: 1,
            context: None,
            attempts: 1,
            first_due_at: SystemTime::UNIX_EPOCH,
            batch: None,
        };
        (event, batch.map(str::to_owned))
    }

    fn seqs(due: &[(DueEvent, Option<String>)]) -> Vec<i64> {
        due.iter().map(|(e, _)| e.seq).collect()
    }

    #[test]
    fn due_retries_take_one_row_per_batch_and_at_most_the_batches_allowed() {
        let rows = || {
            vec![
                row(1, Some("bat_a")),
                row(2, None),
                row(3, Some("bat_a")),
                row(4, Some("bat_b")),
                row(5, Some("bat_c")),
                row(6, None),
            ]
        };
        let (due, ids, cut) = one_row_per_batch(rows(), 5);
        assert_eq!(seqs(&due), [1, 2, 4, 5, 6]);
        assert_eq!(ids, ["bat_a", "bat_b", "bat_c"]);
        assert!(!cut);
        // Two batches' bodies at most: the rows from the third batch on wait.
        let (due, ids, cut) = one_row_per_batch(rows(), 2);
        assert_eq!(seqs(&due), [1, 2, 4]);
        assert_eq!(ids, ["bat_a", "bat_b"]);
        assert!(cut, "rows were left out: there may be more");
        // A limit of 0 still takes one batch, or nothing would ever be retried.
        let (due, _, cut) = one_row_per_batch(rows(), 0);
        assert_eq!((seqs(&due), cut), (vec![1, 2], true));
    }
}
