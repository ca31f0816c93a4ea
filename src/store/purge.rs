//! Retention: delivered events and finished retry rows are deleted in small batches,
//! so purging never holds long locks; the backlog of a paused or disabled subscription
//! goes dead after `store.paused_retention` (kept, replayable), also in small batches.

use std::time::Duration;

use super::{Store, StoreError};

/// Rows deleted per statement.
pub const PURGE_BATCH: i64 = 1_000;

impl Store {
    /// One purge pass over at most [`PURGE_BATCH`] rows of each kind; returns how many
    /// events it deleted. An event goes when it is older than `retention` and every
    /// configured subscription is done with it (its cursor is past it and no pending or
    /// dead retry row refers to it). Delivered retry rows go after `retention`, dead
    /// ones after `dead_retention`.
    pub async fn purge_once(
        &self,
        subscriptions: &[String],
        retention: Duration,
        dead_retention: Duration,
    ) -> Result<u64, StoreError> {
        let s = &self.s;
        let retention = retention.as_secs_f64();
        let dead_retention = dead_retention.as_secs_f64();
        self.client
            .execute(
                &format!(
                    "DELETE FROM {s}.delivery_retries WHERE ctid IN (
                        SELECT ctid FROM {s}.delivery_retries
                        WHERE (status = 'delivered' AND updated_at < now() - make_interval(secs => $1))
                           OR (status = 'dead' AND updated_at < now() - make_interval(secs => $2))
                        LIMIT $3)"
                ),
                &[&retention, &dead_retention, &PURGE_BATCH],
            )
            .await?;
        // A kept batch goes once no row of it is pending or dead (a replay sends its
        // event on its own and leaves the batch).
        self.client
            .execute(
                &format!(
                    "DELETE FROM {s}.delivery_batches WHERE ctid IN (
                        SELECT b.ctid FROM {s}.delivery_batches b
                        WHERE NOT EXISTS (SELECT 1 FROM {s}.delivery_retries r WHERE r.subscription = b.subscription
                                            AND r.batch_id = b.batch_id AND r.status <> 'delivered')
                        LIMIT $1)"
                ),
                &[&PURGE_BATCH],
            )
            .await?;
        let events = self
            .client
            .execute(
                &format!(
                    "DELETE FROM {s}.events WHERE seq IN (
                        SELECT e.seq FROM {s}.events e
                        WHERE e.ingested_at < now() - make_interval(secs => $1)
                          AND NOT EXISTS (SELECT 1 FROM {s}.subscription_state st
                                          WHERE st.subscription = ANY (e.subscriptions) AND st.subscription = ANY ($2)
                                            AND st.cursor < e.seq)
                          AND NOT EXISTS (SELECT 1 FROM {s}.delivery_retries r WHERE r.seq = e.seq AND r.status <> 'delivered')
                        ORDER BY e.seq LIMIT $3)"
                ),
                &[&retention, &subscriptions, &PURGE_BATCH],
            )
            .await?;
        Ok(events)
    }
}

impl Store {
    /// One pass of `store.paused_retention` over `subscription`, at most
    /// [`PURGE_BATCH`] deliveries of each kind; returns how many went dead.
    ///
    /// Does nothing unless the subscription is paused or disabled (checked under the
    /// lock of its state row, so a resume in between wins). Then every delivery of it
    /// whose event was ingested more than `paused_retention` ago and is not done goes
    /// `dead`, with a `last_error` saying why:
    /// - events past its cursor get a dead retry row, and the cursor moves past them
    ///   (only over a prefix of old events, so no younger event is skipped);
    /// - its pending retry rows (failed attempts, or queued behind one) become dead.
    ///
    /// Events the subscription's CEL filter would have dropped are not evaluated here:
    /// they go dead too (a replay drops them again).
    pub async fn expire_paused_once(
        &self,
        subscription: &str,
        paused_retention: Duration,
    ) -> Result<u64, StoreError> {
        let s = &self.s;
        let retention = paused_retention.as_secs_f64();
        let human = human(paused_retention);
        let reason =
            "CASE WHEN NOT st.enabled THEN 'subscription disabled' ELSE 'subscription paused' END
                      || ': backlog older than store.paused_retention (' || $4 || ') went dead'";
        let past_cursor = self
            .client
            .query_one(
                &format!(
                    "WITH st AS (
                        SELECT subscription, cursor, enabled FROM {s}.subscription_state
                        WHERE subscription = $1 AND (paused OR NOT enabled) FOR UPDATE),
                     batch AS (
                        SELECT e.seq, e.entity, e.entity_id, e.ingested_at, $1 = ANY (e.subscriptions) AS due
                        FROM {s}.events e, st WHERE e.seq > st.cursor ORDER BY e.seq LIMIT $3),
                     old AS (
                        SELECT b.* FROM batch b
                        WHERE b.seq < coalesce((SELECT min(y.seq) FROM batch y
                                                WHERE y.ingested_at >= now() - make_interval(secs => $2)),
                                               9223372036854775807)),
                     dead AS (
                        INSERT INTO {s}.delivery_retries AS r (subscription, seq, entity, entity_id, status,
                            next_attempt_at, first_due_at, last_error)
                        SELECT $1, o.seq, o.entity, o.entity_id, 'dead', now(), o.ingested_at, {reason}
                        FROM old o, st WHERE o.due
                        ON CONFLICT (subscription, seq) DO UPDATE SET status = 'dead',
                            last_error = excluded.last_error, next_attempt_at = now(), updated_at = now()
                        WHERE r.status = 'pending'
                        RETURNING 1),
                     moved AS (
                        UPDATE {s}.subscription_state SET cursor = greatest(cursor, (SELECT max(seq) FROM old)),
                            updated_at = now()
                        WHERE subscription = $1 AND EXISTS (SELECT 1 FROM old)
                        RETURNING 1)
                     SELECT (SELECT count(*) FROM dead), (SELECT count(*) FROM moved)"
                ),
                &[&subscription, &retention, &PURGE_BATCH, &human],
            )
            .await?;
        let pending = self
            .client
            .execute(
                &format!(
                    "UPDATE {s}.delivery_retries r SET status = 'dead', last_error = {reason},
                        next_attempt_at = now(), updated_at = now()
                     FROM {s}.subscription_state st
                     WHERE st.subscription = $1 AND (st.paused OR NOT st.enabled)
                       AND r.subscription = $1 AND r.status = 'pending' AND r.seq IN (
                        SELECT p.seq FROM {s}.delivery_retries p JOIN {s}.events e ON e.seq = p.seq
                        WHERE p.subscription = $1 AND p.status = 'pending'
                          AND e.ingested_at < now() - make_interval(secs => $2)
                        ORDER BY p.seq LIMIT $3)"
                ),
                &[&subscription, &retention, &PURGE_BATCH, &human],
            )
            .await?;
        Ok(past_cursor.get::<_, i64>(0) as u64 + pending)
    }
}

/// `7d`, `5h`, `90s`: the largest unit that divides the duration.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        _ if s.is_multiple_of(86_400) => format!("{}d", s / 86_400),
        _ if s.is_multiple_of(3_600) => format!("{}h", s / 3_600),
        _ if s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}
