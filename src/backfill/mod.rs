//! Backfill: a table's existing rows as events (`walhook backfill`, `[[tables]]
//! snapshot = true`), consistent with the live stream.
//!
//! The CLI only records a request in the store (`backfills`). The daemon that holds
//! the slot runs it ([`worker`]): it reads the table in primary-key chunks, each
//! between a low and a high watermark written into the WAL as logical messages, and the
//! source task merges each chunk into the stream at its high watermark ([`window`]).
//! The chunk's events go through the normal ingest path, in stream order: each takes
//! its entity's next revision (G3, G5), and the backfill's cursor moves in the same
//! store transaction as the events (G2), so an interrupted backfill goes on after its
//! last stored chunk without duplicates.

pub mod read;
pub mod snapshot;
pub mod window;
pub mod worker;

use std::sync::Arc;

use crate::mapping::Mapper;
use crate::source::Lsn;
use crate::store::backfills::BackfillProgress;
use crate::store::{ChangeEvents, PendingEvent};

pub use window::{Closed, Watermarks};

/// The source transaction a chunk is merged at (its high watermark's).
#[derive(Clone, Copy, Debug)]
pub struct At {
    pub commit_lsn: Lsn,
    pub xid: u32,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// The events of a closed chunk, one change per row (each its entity's next
/// revision), and the backfill's progress to store with them. `route` gives the
/// subscriptions an event type is due to; a backfill for one subscription goes to
/// that one only. `None` when the mapper does not watch the chunk's table.
pub fn chunk_events(
    closed: &Closed,
    mapper: &Mapper,
    at: At,
    route: &mut dyn FnMut(&str) -> Arc<[String]>,
) -> Option<(Vec<ChangeEvents>, BackfillProgress)> {
    let chunk = &closed.chunk;
    mapper.entity(&closed.table)?;
    let table: Arc<str> = Arc::from(closed.table.to_string());
    let only: Option<Arc<[String]>> = chunk
        .subscription
        .as_ref()
        .map(|s| Arc::from(vec![s.clone()]));
    let mut changes = Vec::with_capacity(chunk.rows.len());
    for row in &chunk.rows {
        let Some(d) = mapper.snapshot(&closed.table, row, chunk.event.as_deref()) else {
            continue;
        };
        let subscriptions = match &only {
            Some(s) => s.clone(),
            None => route(&d.event_type),
        };
        changes.push(ChangeEvents {
            entity: d.entity,
            entity_id: d.entity_id,
            table: table.clone(),
            commit_lsn: at.commit_lsn,
            xid: at.xid,
            commit_time: at.commit_time,
            events: vec![PendingEvent {
                id: crate::store::ingest::new_event_id(),
                event_type: d.event_type,
                data: d.data,
                previous: None,
                changed: None,
                subscriptions,
            }],
            bulk: None,
            // Read like a change's new row: the parent as it is when the chunk is
            // ingested.
            context_keys: mapper.snapshot_context_keys(&closed.table, row),
            context: None,
        });
    }
    let progress = BackfillProgress {
        id: chunk.backfill,
        cursor: chunk.cursor.clone(),
        rows: closed.read as i64,
        events: changes.len() as i64,
    };
    Some((changes, progress))
}
