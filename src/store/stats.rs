//! Cheap per-subscription queue figures for metrics: pending and dead counts and the
//! age of the oldest pending delivery. One query for all subscriptions; it reads the
//! retry rows through their indexes and the events past each cursor.

use super::{Store, StoreError};

/// One subscription's queue as the store sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueStats {
    pub subscription: String,
    /// Enabled and not paused.
    pub dispatched: bool,
    /// New events past the cursor plus pending retry rows.
    pub pending: i64,
    pub dead: i64,
    /// Seconds since the oldest pending delivery became due; 0 when none is pending.
    pub oldest_pending_seconds: f64,
}

impl Store {
    /// Queue figures of `subscriptions` (those without a state row are left out).
    pub async fn queue_stats(
        &self,
        subscriptions: &[String],
    ) -> Result<Vec<QueueStats>, StoreError> {
        let s = &self.s;
        let sql = format!(
            "SELECT st.subscription, st.enabled AND NOT st.paused,
                    r.pending + e.pending,
                    r.dead,
                    coalesce(extract(epoch FROM now() - least(r.oldest, e.oldest))::float8, 0)
             FROM {s}.subscription_state st
             CROSS JOIN LATERAL (
                 SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
                        count(*) FILTER (WHERE status = 'dead') AS dead,
                        min(first_due_at) FILTER (WHERE status = 'pending') AS oldest
                 FROM {s}.delivery_retries WHERE subscription = st.subscription
             ) r
             CROSS JOIN LATERAL (
                 SELECT count(*) AS pending, min(ingested_at) AS oldest
                 FROM {s}.events
                 WHERE seq > st.cursor AND st.subscription = ANY (subscriptions)
             ) e
             WHERE st.subscription = ANY ($1)"
        );
        let rows = self.client.query(&sql, &[&subscriptions]).await?;
        Ok(rows
            .iter()
            .map(|r| QueueStats {
                subscription: r.get(0),
                dispatched: r.get(1),
                pending: r.get(2),
                dead: r.get(3),
                oldest_pending_seconds: r.get::<_, f64>(4).max(0.0),
            })
            .collect())
    }

    /// `SELECT 1`: whether the store answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.client.simple_query("SELECT 1").await?;
        Ok(())
    }
}
