//! Retention: delivered events and finished retry rows are deleted in small batches,
//! so purging never holds long locks.

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
