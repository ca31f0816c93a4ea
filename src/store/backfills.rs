//! The `backfills` table: backfill requests (`walhook backfill`, `snapshot = true`),
//! their state and their cursor. The cursor moves only inside the ingest transaction
//! that stores the chunk's events ([`advance`]), so it never runs ahead of them.

use std::time::SystemTime;

use serde_json::Value;
use tokio_postgres::GenericClient;

use super::{Store, StoreError};

/// Where a backfill is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackfillStatus {
    /// Requested; the daemon holding the slot has not started it.
    Pending,
    /// Being read; an interrupted one goes on after its cursor.
    Running,
    /// Every row read.
    Done,
    /// Stopped by an error (`error` says which); `walhook backfill --resume` retries.
    Failed,
}

impl BackfillStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            BackfillStatus::Pending => "pending",
            BackfillStatus::Running => "running",
            BackfillStatus::Done => "done",
            BackfillStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> BackfillStatus {
        match text {
            "running" => BackfillStatus::Running,
            "done" => BackfillStatus::Done,
            "failed" => BackfillStatus::Failed,
            _ => BackfillStatus::Pending,
        }
    }

    /// Whether the backfill has ended (done or failed).
    pub fn is_final(self) -> bool {
        matches!(self, BackfillStatus::Done | BackfillStatus::Failed)
    }
}

/// What to backfill.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackfillRequest {
    /// The schema-qualified table, as in walhook.toml.
    pub table: String,
    /// An extra SQL condition on its rows.
    pub where_sql: Option<String>,
    /// The event name (default `{entity}.snapshot`).
    pub event: Option<String>,
    /// The only subscription to deliver to (default: every matching one).
    pub subscription: Option<String>,
}

/// A stored backfill.
#[derive(Clone, Debug)]
pub struct Backfill {
    pub id: i64,
    pub request: BackfillRequest,
    /// `cli` or `snapshot`.
    pub origin: String,
    pub status: BackfillStatus,
    /// Primary key of the last row done, as a JSON array of text forms.
    pub cursor: Option<Value>,
    pub rows_done: i64,
    pub events: i64,
    pub rows_total: Option<i64>,
    pub error: Option<String>,
    pub requested_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
}

/// How far one stored chunk took a backfill: written with the chunk's events.
#[derive(Clone, Debug, PartialEq)]
pub struct BackfillProgress {
    pub id: i64,
    /// Primary key of the chunk's last row.
    pub cursor: Value,
    /// Rows the chunk read.
    pub rows: i64,
    /// Rows it emitted as events (the others changed while it was read: the stream
    /// carries their newer state).
    pub events: i64,
}

const COLUMNS: &str = "id, table_name, where_sql, event, subscription, origin, status, cursor, rows_done, events, rows_total, error, requested_at, started_at, finished_at";

fn from_row(r: &tokio_postgres::Row) -> Backfill {
    Backfill {
        id: r.get(0),
        request: BackfillRequest {
            table: r.get(1),
            where_sql: r.get(2),
            event: r.get(3),
            subscription: r.get(4),
        },
        origin: r.get(5),
        status: BackfillStatus::parse(r.get(6)),
        cursor: r.get(7),
        rows_done: r.get(8),
        events: r.get(9),
        rows_total: r.get(10),
        error: r.get(11),
        requested_at: r.get(12),
        started_at: r.get(13),
        finished_at: r.get(14),
    }
}

impl Store {
    /// Records a backfill request; returns its id.
    pub async fn request_backfill(&self, req: &BackfillRequest) -> Result<i64, StoreError> {
        let s = &self.s;
        let row = self
            .client
            .query_one(
                &format!(
                    "INSERT INTO {s}.backfills (table_name, where_sql, event, subscription)
                     VALUES ($1, $2, $3, $4) RETURNING id"
                ),
                &[&req.table, &req.where_sql, &req.event, &req.subscription],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Requests the `snapshot = true` backfill of `table`, unless it was requested
    /// before; returns the new request's id.
    pub async fn request_snapshot(&self, table: &str) -> Result<Option<i64>, StoreError> {
        let s = &self.s;
        let row = self
            .client
            .query_opt(
                &format!(
                    "INSERT INTO {s}.backfills (table_name, origin) VALUES ($1, 'snapshot')
                     ON CONFLICT (table_name) WHERE origin = 'snapshot' DO NOTHING RETURNING id"
                ),
                &[&table],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// One backfill.
    pub async fn backfill(&self, id: i64) -> Result<Option<Backfill>, StoreError> {
        let s = &self.s;
        let row = self
            .client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM {s}.backfills WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(from_row))
    }

    /// Every backfill, oldest first.
    pub async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError> {
        let s = &self.s;
        let rows = self
            .client
            .query(
                &format!("SELECT {COLUMNS} FROM {s}.backfills ORDER BY id"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(from_row).collect())
    }

    /// The oldest backfill still to run (running before pending: an interrupted one
    /// goes on first).
    pub async fn next_backfill(&self) -> Result<Option<Backfill>, StoreError> {
        let s = &self.s;
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM {s}.backfills WHERE status IN ('pending', 'running')
                     ORDER BY status = 'pending', id LIMIT 1"
                ),
                &[],
            )
            .await?;
        Ok(row.as_ref().map(from_row))
    }

    /// Marks a backfill running, with the number of rows it is to read.
    pub async fn start_backfill(&self, id: i64, rows_total: i64) -> Result<(), StoreError> {
        let s = &self.s;
        self.client
            .execute(
                &format!(
                    "UPDATE {s}.backfills SET status = 'running', rows_total = $2, error = NULL,
                        started_at = coalesce(started_at, now()), updated_at = now() WHERE id = $1"
                ),
                &[&id, &rows_total],
            )
            .await?;
        Ok(())
    }

    /// Ends a backfill: done, or failed with `error`.
    pub async fn finish_backfill(&self, id: i64, error: Option<&str>) -> Result<(), StoreError> {
        let s = &self.s;
        let status = if error.is_some() { "failed" } else { "done" };
        self.client
            .execute(
                &format!(
                    "UPDATE {s}.backfills SET status = $2, error = $3, finished_at = now(), updated_at = now()
                     WHERE id = $1"
                ),
                &[&id, &status, &error],
            )
            .await?;
        Ok(())
    }

    /// Makes a failed backfill run again from its cursor; `false` when `id` is not a
    /// failed backfill.
    pub async fn retry_backfill(&self, id: i64) -> Result<bool, StoreError> {
        let s = &self.s;
        let n = self
            .client
            .execute(
                &format!(
                    "UPDATE {s}.backfills SET status = 'running', error = NULL, finished_at = NULL, updated_at = now()
                     WHERE id = $1 AND status = 'failed'"
                ),
                &[&id],
            )
            .await?;
        Ok(n == 1)
    }
}

/// Moves each backfill's cursor and counts past a stored chunk, inside the ingest
/// transaction that stores the chunk's events.
pub(super) async fn advance(
    tx: &impl GenericClient,
    s: &str,
    progress: &[BackfillProgress],
) -> Result<(), StoreError> {
    for p in progress {
        tx.execute(
            &format!(
                "UPDATE {s}.backfills SET cursor = $2, rows_done = rows_done + $3,
                    events = events + $4, updated_at = now() WHERE id = $1"
            ),
            &[&p.id, &p.cursor, &p.rows, &p.events],
        )
        .await?;
    }
    Ok(())
}
