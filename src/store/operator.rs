//! Store queries of the operator commands (`walhook deliveries ...`, `walhook
//! subscriptions ...`): listing deliveries, re-queueing them, and pausing subscriptions.
//!
//! A delivery is one (event, subscription) pair, identified as `<event id>:<subscription>`
//! (the `id` column of the `walhook.deliveries` view). Its state lives in a
//! `delivery_retries` row when it needed a retry, went dead or was replayed; otherwise
//! the subscription's cursor says it: at or before the cursor it was delivered at its
//! first attempt, after it it is pending.
//!
//! Contract of [`Store::replay`]: selected deliveries become `pending`, due now, with a
//! fresh retry life (`first_due_at = now`, so `max_age` counts from the replay) and
//! their attempt count kept (it counts every attempt ever made). Rows are written in
//! ascending log order, [`REPLAY_BATCH`] per statement, so at every moment the replayed
//! part of an entity is a prefix of its events, and the dispatcher (which sends only
//! the oldest pending row of an entity, and queues later events behind it) sends an
//! entity's replayed events in revision order (G5). Events past the cursor without a
//! row are left alone: they are about to be sent anyway, and a row for them would make
//! them be sent twice.

use std::time::{Duration, SystemTime};

use super::deliveries::{DueEvent, EVENT_FIELDS, due_event};
use super::{Store, StoreError};

/// Rows re-queued per statement by [`Store::replay`].
pub const REPLAY_BATCH: i64 = 1_000;

/// The state of a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Not answered 2xx yet; will be attempted.
    Pending,
    /// Answered 2xx.
    Delivered,
    /// Retry policy exhausted (or 410 Gone): kept, replayable.
    Dead,
}

impl DeliveryStatus {
    /// The name stored in `delivery_retries.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
        }
    }

    fn parse(text: &str) -> DeliveryStatus {
        match text {
            "delivered" => DeliveryStatus::Delivered,
            "dead" => DeliveryStatus::Dead,
            _ => DeliveryStatus::Pending,
        }
    }
}

/// A delivery id as an operator writes it: `<event id>:<subscription>`, or a bare event
/// id meaning every delivery of that event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeliveryId {
    pub event_id: String,
    pub subscription: Option<String>,
}

impl DeliveryId {
    /// Parses `evt_...:name` or `evt_...`.
    pub fn parse(text: &str) -> Result<DeliveryId, String> {
        let text = text.trim();
        let (event_id, subscription) = match text.split_once(':') {
            Some((e, s)) => (e, Some(s)),
            None => (text, None),
        };
        if event_id.is_empty() || subscription.is_some_and(str::is_empty) {
            return Err(format!(
                "bad delivery id `{text}`: expected `<event id>:<subscription>` (e.g. `evt_01JDX5...:crm`) or an event id"
            ));
        }
        Ok(DeliveryId {
            event_id: event_id.to_owned(),
            subscription: subscription.map(str::to_owned),
        })
    }

    /// When the event was ingested, read from its ULID (`evt_<ulid>`), if it is one.
    fn ingest_time(&self) -> Option<SystemTime> {
        let ulid = self.event_id.strip_prefix("evt_")?;
        ulid::Ulid::from_string(ulid).ok().map(|u| u.datetime())
    }
}

impl std::fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.subscription {
            Some(s) => write!(f, "{}:{s}", self.event_id),
            None => f.write_str(&self.event_id),
        }
    }
}

/// Which deliveries a list or replay covers. Every set field narrows the selection.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Only these subscriptions (`None`: all).
    pub subscriptions: Option<Vec<String>>,
    /// Only these states (empty: all).
    pub statuses: Vec<DeliveryStatus>,
    /// Only this entity: (type, id).
    pub entity: Option<(String, String)>,
    /// Only events ingested at or after this time.
    pub since: Option<SystemTime>,
    /// Only events ingested before this time.
    pub until: Option<SystemTime>,
    /// Only this event (by id).
    pub event_id: Option<String>,
    /// Only this event (by log position).
    pub seq: Option<i64>,
}

impl Selection {
    fn wants(&self, status: DeliveryStatus) -> bool {
        self.statuses.is_empty() || self.statuses.contains(&status)
    }
}

/// One delivery, as operators see it.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub subscription: String,
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    pub entity: String,
    pub entity_id: String,
    pub revision: i64,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<SystemTime>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    /// The first 1 KiB of the last response body.
    pub last_response: Option<String>,
    pub delivered_at: Option<SystemTime>,
    pub occurred_at: SystemTime,
    pub ingested_at: SystemTime,
    /// The batch it was sent in, when that batch needed a retry (`batch_size > 1`).
    pub batch_id: Option<String>,
    /// The context the event carried (`[[tables.context]]`), if its table has any.
    pub context: Option<serde_json::Value>,
}

impl Delivery {
    /// The delivery id: `<event id>:<subscription>`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.event_id, self.subscription)
    }
}

/// One subscription's state and queue, for `walhook subscriptions list`.
#[derive(Clone, Debug)]
pub struct SubscriptionOverview {
    pub subscription: String,
    pub enabled: bool,
    pub paused: bool,
    pub disabled_reason: Option<String>,
    /// Pending deliveries: retry rows plus events past the cursor.
    pub pending: i64,
    pub dead: i64,
    /// How long the oldest pending delivery has been due.
    pub oldest_pending: Option<Duration>,
    pub last_success_at: Option<SystemTime>,
    /// Events in the log past the subscription's cursor.
    pub cursor_lag: i64,
}

/// Columns of a candidate delivery row (`d`, from retry rows or from the cursor) joined
/// with its event (`e`).
const DELIVERY_COLUMNS: &str = "d.subscription, d.seq, e.id, e.type, e.entity, e.entity_id, e.revision, d.status, d.attempts, \
     d.next_attempt_at, d.last_status, d.last_error, d.last_response, d.delivered_at, e.occurred_at, e.ingested_at, e.context, d.batch_id";

/// SQL parameters shared by every selection query, in this order:
/// $1 subscriptions text[], $2 entity text, $3 entity_id text, $4 since, $5 until,
/// $6 event id, $7 seq, $8 retry statuses text[], $9 cursor-delivered wanted,
/// $10 cursor-pending wanted, $11 after seq, $12 after subscription, $13 limit.
fn narrowing(sub: &str, single: bool) -> String {
    // One subscription: an equality, so that the (subscription, seq) key orders a scan.
    let subs = if single {
        format!("{sub} = ($1::text[])[1]")
    } else {
        format!("($1::text[] IS NULL OR {sub} = ANY ($1))")
    };
    format!(
        "{subs} \
         AND ($2::text IS NULL OR (e.entity = $2 AND e.entity_id = $3::text)) \
         AND ($4::timestamptz IS NULL OR e.ingested_at >= $4) \
         AND ($5::timestamptz IS NULL OR e.ingested_at < $5) \
         AND ($6::text IS NULL OR e.id = $6) \
         AND ($7::int8 IS NULL OR e.seq = $7)"
    )
}

/// The candidate deliveries of a selection: retry rows in the wanted states, and events
/// without a row whose state the cursor gives. `ascending` orders by log position (and
/// pages after $11/$12); otherwise newest first (before $11/$12).
fn candidates_sql(s: &str, ascending: bool, single: bool) -> String {
    let (dir, cmp) = if ascending {
        ("ASC", ">")
    } else {
        ("DESC", "<")
    };
    // The plain `seq >=` (or `<=`) lets each page start in the index instead of
    // rescanning from the beginning of the log.
    let keyset_a = format!(
        "AND ($11::int8 IS NULL OR (r.seq {cmp}= $11 AND (r.seq, r.subscription) {cmp} ($11, $12::text)))"
    );
    let keyset_b = format!(
        "AND ($11::int8 IS NULL OR (e.seq {cmp}= $11 AND (e.seq, st.subscription) {cmp} ($11, $12::text)))"
    );
    let (na, nb) = (
        narrowing("r.subscription", single),
        narrowing("st.subscription", single),
    );
    format!(
        "SELECT * FROM (
           (SELECT r.subscription, r.seq, r.status, r.attempts,
                   CASE WHEN r.status = 'pending' THEN r.next_attempt_at END AS next_attempt_at,
                   r.last_status, r.last_error, r.last_response, r.delivered_at, true AS from_row, r.batch_id
            FROM {s}.delivery_retries r JOIN {s}.events e ON e.seq = r.seq
            WHERE r.status = ANY ($8) AND {na} {keyset_a}
            ORDER BY r.seq {dir}, r.subscription {dir} LIMIT $13)
           UNION ALL
           (SELECT st.subscription, e.seq,
                   CASE WHEN e.seq <= st.cursor THEN 'delivered' ELSE 'pending' END,
                   CASE WHEN e.seq <= st.cursor THEN 1 ELSE 0 END,
                   CASE WHEN e.seq > st.cursor THEN e.ingested_at END,
                   NULL::int4, NULL::text, NULL::text, NULL::timestamptz, false, NULL::text
            FROM {s}.subscription_state st JOIN {s}.events e ON st.subscription = ANY (e.subscriptions)
            WHERE ($9 OR $10) AND {nb} {keyset_b}
              AND ((e.seq <= st.cursor AND $9) OR (e.seq > st.cursor AND $10))
              AND NOT EXISTS (SELECT 1 FROM {s}.delivery_retries x WHERE x.subscription = st.subscription AND x.seq = e.seq)
            ORDER BY e.seq {dir}, st.subscription {dir} LIMIT $13)
         ) d ORDER BY d.seq {dir}, d.subscription {dir} LIMIT $13"
    )
}

/// The parameters of [`candidates_sql`] for `sel`.
struct Params {
    subscriptions: Option<Vec<String>>,
    entity: Option<String>,
    entity_id: Option<String>,
    since: Option<SystemTime>,
    until: Option<SystemTime>,
    event_id: Option<String>,
    seq: Option<i64>,
    retry_statuses: Vec<String>,
    cursor_delivered: bool,
    cursor_pending: bool,
}

impl Params {
    /// The query parameters of [`candidates_sql`], in its order: the selection, then
    /// the page start (`after_seq`, `after_sub`) and the page size.
    fn args<'a>(
        &'a self,
        after_seq: &'a Option<i64>,
        after_sub: &'a Option<String>,
        limit: &'a i64,
    ) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 13] {
        [
            &self.subscriptions,
            &self.entity,
            &self.entity_id,
            &self.since,
            &self.until,
            &self.event_id,
            &self.seq,
            &self.retry_statuses,
            &self.cursor_delivered,
            &self.cursor_pending,
            after_seq,
            after_sub,
            limit,
        ]
    }

    fn new(sel: &Selection, with_cursor_pending: bool) -> Params {
        let retry_statuses = [
            DeliveryStatus::Pending,
            DeliveryStatus::Delivered,
            DeliveryStatus::Dead,
        ]
        .into_iter()
        .filter(|s| sel.wants(*s))
        .map(|s| s.as_str().to_owned())
        .collect();
        Params {
            subscriptions: sel.subscriptions.clone(),
            entity: sel.entity.as_ref().map(|(e, _)| e.clone()),
            entity_id: sel.entity.as_ref().map(|(_, i)| i.clone()),
            since: sel.since,
            until: sel.until,
            event_id: sel.event_id.clone(),
            seq: sel.seq,
            retry_statuses,
            cursor_delivered: sel.wants(DeliveryStatus::Delivered),
            cursor_pending: with_cursor_pending && sel.wants(DeliveryStatus::Pending),
        }
    }
}

/// Whether `sel` names exactly one subscription.
fn is_single(sel: &Selection) -> bool {
    sel.subscriptions.as_ref().is_some_and(|s| s.len() == 1)
}

fn delivery(r: &tokio_postgres::Row) -> Delivery {
    Delivery {
        subscription: r.get(0),
        seq: r.get(1),
        event_id: r.get(2),
        event_type: r.get(3),
        entity: r.get(4),
        entity_id: r.get(5),
        revision: r.get(6),
        status: DeliveryStatus::parse(r.get(7)),
        attempts: r.get(8),
        next_attempt_at: r.get(9),
        last_status: r.get(10),
        last_error: r.get(11),
        last_response: r.get(12),
        delivered_at: r.get(13),
        occurred_at: r.get(14),
        ingested_at: r.get(15),
        context: r.get(16),
        batch_id: r.get(17),
    }
}

impl Store {
    /// Whether the store's tables exist (a `walhook setup` or `walhook run` made them).
    pub async fn is_set_up(&self) -> Result<bool, StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT to_regclass(format('%I.delivery_retries', $1::text)) IS NOT NULL",
                &[&self.schema],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Subscriptions the store knows (has a state row for), by name.
    pub async fn stored_subscriptions(&self) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT subscription FROM {}.subscription_state ORDER BY subscription",
                    self.s
                ),
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Deliveries matching `sel`, newest first, at most `limit`.
    pub async fn list_deliveries(
        &self,
        sel: &Selection,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let p = Params::new(sel, true);
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM ({}) d JOIN {s}.events e ON e.seq = d.seq ORDER BY d.seq DESC, d.subscription DESC",
            candidates_sql(&self.s, false, is_single(sel)),
            s = self.s
        );
        let none_seq: Option<i64> = None;
        let none_sub: Option<String> = None;
        let rows = self
            .client
            .query(&sql, &p.args(&none_seq, &none_sub, &limit))
            .await?;
        Ok(rows.iter().map(delivery).collect())
    }

    /// The deliveries `id` names (one, or every delivery of a bare event id); empty when
    /// there is none. The event's ULID narrows the search to a day either side of its
    /// ingest time (the BRIN index); only when nothing is found there is the whole log
    /// searched.
    pub async fn find_deliveries(&self, id: &DeliveryId) -> Result<Vec<Delivery>, StoreError> {
        let mut sel = Selection {
            subscriptions: id.subscription.clone().map(|s| vec![s]),
            event_id: Some(id.event_id.clone()),
            ..Selection::default()
        };
        if let Some(t) = id.ingest_time() {
            const DAY: Duration = Duration::from_secs(86_400);
            let narrow = Selection {
                since: t.checked_sub(DAY),
                until: Some(t + DAY),
                ..sel.clone()
            };
            let found = self.list_deliveries(&narrow, 1_000).await?;
            if !found.is_empty() {
                return Ok(found);
            }
        }
        sel.since = None;
        self.list_deliveries(&sel, 1_000).await
    }

    /// Re-queues the deliveries `sel` selects (see the module docs), [`REPLAY_BATCH`]
    /// rows per statement in ascending log order; returns how many it queued. Pending
    /// deliveries past the cursor have no row and are not counted: they are sent soon
    /// anyway. `progress` is called after each batch with the running total.
    pub async fn replay(
        &self,
        sel: &Selection,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, StoreError> {
        let p = Params::new(sel, false);
        let s = &self.s;
        let sql = format!(
            "WITH picked AS (
                SELECT d.subscription, d.seq, e.entity, e.entity_id
                FROM ({}) d JOIN {s}.events e ON e.seq = d.seq),
             queued AS (
                INSERT INTO {s}.delivery_retries AS r (subscription, seq, entity, entity_id, status, attempts, next_attempt_at, first_due_at)
                SELECT subscription, seq, entity, entity_id, 'pending', 1, now(), now() FROM picked
                ON CONFLICT (subscription, seq) DO UPDATE SET status = 'pending', next_attempt_at = now(),
                    first_due_at = now(), delivered_at = NULL, batch_id = NULL, updated_at = now()
                RETURNING 1)
             SELECT (SELECT count(*) FROM queued),
                    (SELECT seq FROM picked ORDER BY seq DESC, subscription DESC LIMIT 1),
                    (SELECT subscription FROM picked ORDER BY seq DESC, subscription DESC LIMIT 1)",
            candidates_sql(s, true, is_single(sel))
        );
        // Planned afresh for each page (not a reused prepared statement): a custom plan
        // sees the page's start and begins its index scan there.
        let mut after_seq: Option<i64> = None;
        let mut after_sub: Option<String> = None;
        let mut total = 0u64;
        loop {
            let row = self
                .client
                .query_one(&sql, &p.args(&after_seq, &after_sub, &REPLAY_BATCH))
                .await?;
            let n: i64 = row.get(0);
            total += n as u64;
            if n > 0 {
                progress(total);
            }
            if n < REPLAY_BATCH {
                return Ok(total);
            }
            after_seq = row.get(1);
            after_sub = row.get(2);
        }
    }

    /// One page of what [`Store::replay`] would re-queue, in ascending log order after
    /// `after`: (subscription, seq, whether it has a retry row). For callers that must
    /// look at the events first (a subscription's CEL filter) before [`Store::requeue`].
    pub async fn replay_page(
        &self,
        sel: &Selection,
        after: Option<(i64, String)>,
    ) -> Result<Vec<(String, i64, bool)>, StoreError> {
        let p = Params::new(sel, false);
        let (after_seq, after_sub) = match after {
            Some((seq, sub)) => (Some(seq), Some(sub)),
            None => (None, None),
        };
        let sql = format!(
            "SELECT d.subscription, d.seq, d.from_row FROM ({}) d ORDER BY d.seq, d.subscription",
            candidates_sql(&self.s, true, is_single(sel))
        );
        let rows = self
            .client
            .query(&sql, &p.args(&after_seq, &after_sub, &REPLAY_BATCH))
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// The stored events at `seqs`, for evaluating a filter on them.
    pub async fn events_at(&self, seqs: &[i64]) -> Result<Vec<DueEvent>, StoreError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT {EVENT_FIELDS} FROM {}.events e WHERE e.seq = ANY ($1) ORDER BY e.seq",
                    self.s
                ),
                &[&seqs],
            )
            .await?;
        let now = SystemTime::now();
        Ok(rows.iter().map(|r| due_event(r, 0, now)).collect())
    }

    /// Re-queues the deliveries (subscription, seq) in one statement, as [`Store::replay`]
    /// does; returns how many.
    pub async fn requeue(&self, deliveries: &[(String, i64)]) -> Result<u64, StoreError> {
        let (subs, seqs): (Vec<&str>, Vec<i64>) =
            deliveries.iter().map(|(s, q)| (s.as_str(), *q)).unzip();
        let n = self
            .client
            .execute(
                &format!(
                    "INSERT INTO {s}.delivery_retries AS r (subscription, seq, entity, entity_id, status, attempts, next_attempt_at, first_due_at)
                     SELECT k.subscription, e.seq, e.entity, e.entity_id, 'pending', 1, now(), now()
                     FROM unnest($1::text[], $2::int8[]) k(subscription, seq) JOIN {s}.events e ON e.seq = k.seq
                     ORDER BY e.seq
                     ON CONFLICT (subscription, seq) DO UPDATE SET status = 'pending', next_attempt_at = now(),
                         first_due_at = now(), delivered_at = NULL, batch_id = NULL, updated_at = now()",
                    s = self.s
                ),
                &[&subs, &seqs],
            )
            .await?;
        Ok(n)
    }

    /// State and queue of each of `names` that has a state row, in the order of `names`.
    pub async fn subscription_overview(
        &self,
        names: &[String],
    ) -> Result<Vec<SubscriptionOverview>, StoreError> {
        let s = &self.s;
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT st.subscription, st.enabled, st.paused, st.disabled_reason,
                            coalesce(r.pending, 0) + lag.n, coalesce(r.dead, 0),
                            extract(epoch FROM now() - least(r.oldest_pending, lag.oldest))::float8,
                            greatest(st.last_success_at, r.last_delivered), lag.n
                     FROM {s}.subscription_state st
                     LEFT JOIN (SELECT subscription,
                                       count(*) FILTER (WHERE status = 'pending') AS pending,
                                       count(*) FILTER (WHERE status = 'dead') AS dead,
                                       min(first_due_at) FILTER (WHERE status = 'pending') AS oldest_pending,
                                       max(delivered_at) AS last_delivered
                                FROM {s}.delivery_retries WHERE subscription = ANY ($1) GROUP BY subscription) r
                       ON r.subscription = st.subscription
                     CROSS JOIN LATERAL (
                         SELECT count(*) AS n, min(e.ingested_at) AS oldest FROM {s}.events e
                         WHERE e.seq > st.cursor AND st.subscription = ANY (e.subscriptions)) lag
                     WHERE st.subscription = ANY ($1)"
                ),
                &[&names],
            )
            .await?;
        let mut out: Vec<SubscriptionOverview> = rows
            .iter()
            .map(|r| SubscriptionOverview {
                subscription: r.get(0),
                enabled: r.get(1),
                paused: r.get(2),
                disabled_reason: r.get(3),
                pending: r.get(4),
                dead: r.get(5),
                oldest_pending: r
                    .get::<_, Option<f64>>(6)
                    .map(|secs| Duration::from_secs_f64(secs.max(0.0))),
                last_success_at: r.get(7),
                cursor_lag: r.get(8),
            })
            .collect();
        out.sort_by_key(|o| names.iter().position(|n| *n == o.subscription));
        Ok(out)
    }

    /// Pauses (`true`) or resumes (`false`) `subscription`. Resuming also re-enables a
    /// subscription disabled by 410 Gone and clears the reason. Returns whether the
    /// state row exists.
    pub async fn set_paused(&self, subscription: &str, paused: bool) -> Result<bool, StoreError> {
        let sql = if paused {
            format!(
                "UPDATE {}.subscription_state SET paused = true, updated_at = now() WHERE subscription = $1",
                self.s
            )
        } else {
            format!(
                "UPDATE {}.subscription_state SET paused = false, enabled = true, disabled_reason = NULL, updated_at = now()
                 WHERE subscription = $1",
                self.s
            )
        };
        Ok(self.client.execute(&sql, &[&subscription]).await? == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_parse() {
        let id = DeliveryId::parse("evt_01JDX5ZQ3J8K2M4N6P8R0T2V4X:crm").unwrap();
        assert_eq!(id.event_id, "evt_01JDX5ZQ3J8K2M4N6P8R0T2V4X");
        assert_eq!(id.subscription.as_deref(), Some("crm"));
        assert_eq!(id.to_string(), "evt_01JDX5ZQ3J8K2M4N6P8R0T2V4X:crm");
        assert!(id.ingest_time().is_some());
        let bare = DeliveryId::parse("evt_1").unwrap();
        assert_eq!(bare.subscription, None);
        assert_eq!(bare.ingest_time(), None);
        assert!(DeliveryId::parse("").is_err());
        assert!(DeliveryId::parse("evt_1:").is_err());
        assert!(DeliveryId::parse(":crm").is_err());
    }
}
