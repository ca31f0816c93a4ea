//! Group-committed ingest: one store transaction per batch writes the revisions, the
//! events (binary COPY) and the checkpoint, with `synchronous_commit = on`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::pin_mut;
use serde_json::{Map, Value};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{Json, PgLsn, ToSql, Type};

use super::{Store, StoreError};
use crate::source::Lsn;
use crate::source::client::PG_EPOCH_OFFSET_MICROS;
use crate::source::stream::Position;

/// One event of a row change, before it has a revision and a sequence number.
#[derive(Clone, Debug)]
pub struct PendingEvent {
    pub event_type: String,
    pub data: Map<String, Value>,
    pub previous: Option<Map<String, Value>>,
    pub changed: Option<Vec<String>>,
    /// The subscriptions the event is due to (shared by all events of one type).
    pub subscriptions: Arc<[String]>,
}

/// The events of one source row change: they share one revision of their entity (G3).
#[derive(Clone, Debug)]
pub struct ChangeEvents {
    pub entity: Arc<str>,
    pub entity_id: String,
    pub table: Arc<str>,
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    pub events: Vec<PendingEvent>,
}

/// A batch: the events of many source changes, and the source position it reaches.
#[derive(Debug, Default)]
pub struct IngestBatch {
    pub changes: Vec<ChangeEvents>,
    /// The stream position after the last change of the batch.
    pub position: Position,
}

impl IngestBatch {
    /// Number of events in the batch.
    pub fn event_count(&self) -> usize {
        self.changes.iter().map(|c| c.events.len()).sum()
    }
}

/// What one ingest wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct IngestOutcome {
    pub events: u64,
    /// The sequence number of the last event in the log.
    pub last_seq: i64,
}

const EVENT_COLUMNS: &str = "seq, id, type, entity, entity_id, revision, occurred_at, data, previous, changed, source_table, source_lsn, source_xid, subscriptions";
const EVENT_TYPES: [Type; 14] = [
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TIMESTAMPTZ,
    Type::JSON,
    Type::JSON,
    Type::TEXT_ARRAY,
    Type::TEXT,
    Type::PG_LSN,
    Type::INT8,
    Type::TEXT_ARRAY,
];

impl Store {
    /// Writes `batch` and moves the checkpoint of `slot` to `batch.position`, in one
    /// transaction, provided this instance still holds leader epoch `epoch`.
    pub async fn ingest(
        &mut self,
        slot: &str,
        epoch: i64,
        batch: &IngestBatch,
    ) -> Result<IngestOutcome, StoreError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT last_seq FROM {}.checkpoints WHERE slot = $1",
                    self.s
                ),
                &[&slot],
            )
            .await?
            .ok_or_else(|| StoreError::NoCheckpoint(slot.to_owned()))?;
        let (locked, _) = tokio::sync::oneshot::channel();
        self.ingest_ordered(slot, epoch, row.get(0), batch, locked, async { true })
            .await
    }

    /// Like [`Store::ingest`], for pipelined ingest over several connections: the
    /// batch's events get sequence numbers after `seq_base` (the last event of the
    /// batch before it); `locked` fires once this transaction holds its revision rows,
    /// and the transaction commits only if `predecessor` resolves to true (the batch
    /// before it committed). The checkpoint update checks both the leader epoch and
    /// that the log ends at `seq_base`, so a batch can never commit out of order or
    /// after a deposed leader (G2, G8).
    pub async fn ingest_ordered(
        &mut self,
        slot: &str,
        epoch: i64,
        seq_base: i64,
        batch: &IngestBatch,
        locked: tokio::sync::oneshot::Sender<()>,
        predecessor: impl std::future::Future<Output = bool>,
    ) -> Result<IngestOutcome, StoreError> {
        let s = self.s.clone();
        let tx = self.client.transaction().await?;
        // The notification goes out at commit: dispatchers of other processes wake.
        tx.batch_execute(&format!(
            "SET LOCAL synchronous_commit = on; NOTIFY {}",
            crate::delivery::wake::channel(&self.schema)
        ))
        .await?;
        let mut seq = seq_base;

        // Revisions: one upsert row per entity in the batch, adding its change count,
        // in a fixed order so concurrent batches lock rows in the same order.
        let mut counts: HashMap<(&str, &str), i64> = HashMap::new();
        for c in batch.changes.iter().filter(|c| !c.events.is_empty()) {
            *counts.entry((&c.entity, &c.entity_id)).or_default() += 1;
        }
        let mut next_rev: HashMap<(&str, &str), i64> = HashMap::with_capacity(counts.len());
        if !counts.is_empty() {
            let mut keys: Vec<((&str, &str), i64)> = counts.iter().map(|(k, n)| (*k, *n)).collect();
            keys.sort_unstable();
            let entities: Vec<&str> = keys.iter().map(|((e, _), _)| *e).collect();
            let ids: Vec<&str> = keys.iter().map(|((_, i), _)| *i).collect();
            let ns: Vec<i64> = keys.iter().map(|(_, n)| *n).collect();
            let rows = tx
                .query(
                    &format!(
                        "INSERT INTO {s}.revisions AS r (entity, entity_id, revision)
                         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])
                         ON CONFLICT (entity, entity_id) DO UPDATE SET revision = r.revision + excluded.revision
                         RETURNING entity, entity_id, revision"
                    ),
                    &[&entities, &ids, &ns],
                )
                .await?;
            let last: HashMap<(String, String), i64> = rows
                .iter()
                .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                .collect();
            for (key, n) in &counts {
                let owned = (key.0.to_owned(), key.1.to_owned());
                if let Some(last) = last.get(&owned) {
                    next_rev.insert(*key, last - n + 1);
                }
            }
        }
        let _ = locked.send(());

        // Events, by binary COPY, in commit order.
        let mut written = 0u64;
        if !next_rev.is_empty() {
            let sink = tx
                .copy_in(&format!(
                    "COPY {s}.events ({EVENT_COLUMNS}) FROM STDIN BINARY"
                ))
                .await?;
            let writer = BinaryCopyInWriter::new(sink, &EVENT_TYPES);
            pin_mut!(writer);
            for change in batch.changes.iter().filter(|c| !c.events.is_empty()) {
                let key = (&*change.entity, change.entity_id.as_str());
                let revision = next_rev.get_mut(&key).expect("every entity got a revision");
                let rev = *revision;
                *revision += 1;
                let occurred = pg_time(change.commit_time);
                let lsn = PgLsn::from(change.commit_lsn.0);
                let xid = i64::from(change.xid);
                for event in &change.events {
                    seq += 1;
                    let id = format!("evt_{}", ulid::Ulid::new());
                    let data = Json(&event.data);
                    let previous = event.previous.as_ref().map(Json);
                    let subscriptions: &[String] = &event.subscriptions;
                    let values: [&(dyn ToSql + Sync); 14] = [
                        &seq,
                        &id,
                        &event.event_type,
                        &&*change.entity,
                        &change.entity_id,
                        &rev,
                        &occurred,
                        &data,
                        &previous,
                        &event.changed,
                        &&*change.table,
                        &lsn,
                        &xid,
                        &subscriptions,
                    ];
                    writer.as_mut().write(&values).await?;
                    written += 1;
                }
            }
            writer.finish().await?;
        }

        if !predecessor.await {
            return Err(StoreError::PredecessorFailed);
        }
        let p = batch.position;
        let updated = tx
            .execute(
                &format!(
                    "UPDATE {s}.checkpoints SET commit_lsn = $2::text::pg_lsn, rows_done = $3, complete = $4, last_seq = $5, updated_at = now()
                     WHERE slot = $1 AND leader_epoch = $6 AND last_seq = $7"
                ),
                &[&slot, &p.commit_lsn.to_string(), &(p.rows_done as i64), &p.complete, &seq, &epoch, &seq_base],
            )
            .await?;
        if updated == 0 {
            let row = tx
                .query_opt(
                    &format!("SELECT leader_epoch, last_seq FROM {s}.checkpoints WHERE slot = $1"),
                    &[&slot],
                )
                .await?
                .ok_or_else(|| StoreError::NoCheckpoint(slot.to_owned()))?;
            let (current, last_seq): (i64, i64) = (row.get(0), row.get(1));
            if current != epoch {
                return Err(StoreError::Deposed {
                    slot: slot.to_owned(),
                    ours: epoch,
                    current,
                });
            }
            return Err(StoreError::OutOfOrder {
                expected: seq_base,
                found: last_seq,
            });
        }
        tx.commit().await?;
        Ok(IngestOutcome {
            events: written,
            last_seq: seq,
        })
    }
}

fn pg_time(pg_micros: i64) -> SystemTime {
    let unix = pg_micros + PG_EPOCH_OFFSET_MICROS;
    if unix >= 0 {
        UNIX_EPOCH + Duration::from_micros(unix as u64)
    } else {
        UNIX_EPOCH - Duration::from_micros(unix.unsigned_abs())
    }
}
