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

/// The events of a closed chunk (its rows taken), one change per row (each its entity's next
/// revision), and the backfill's progress to store with them. `route` gives the
/// subscriptions an event type is due to; a backfill for one subscription goes to
/// that one only, and only if its `events` patterns match the event type. `None` when
/// the mapper does not watch the chunk's table.
pub fn chunk_events(
    closed: &mut Closed,
    mapper: &Mapper,
    at: At,
    route: &mut dyn FnMut(&str) -> Arc<[String]>,
) -> Option<(Vec<ChangeEvents>, BackfillProgress)> {
    let chunk = &mut closed.chunk;
    mapper.entity(&closed.table)?;
    let table: Arc<str> = Arc::from(closed.table.to_string());
    // Every row of a chunk has the same event type: routed once.
    let mut routed: Option<(String, Arc<[String]>)> = None;
    let mut changes = Vec::with_capacity(chunk.rows.len());
    for row in std::mem::take(&mut chunk.rows) {
        // Read like a change's new row: the parent as it is when the chunk is ingested.
        let context_keys = mapper.snapshot_context_keys(&closed.table, &row);
        let Some(d) = mapper.snapshot(&closed.table, row, chunk.event.as_deref()) else {
            continue;
        };
        let subscriptions = match &routed {
            Some((t, s)) if *t == d.event_type => s.clone(),
            _ => {
                let s = due_to(route(&d.event_type), chunk.subscription.as_deref());
                routed = Some((d.event_type.clone(), s.clone()));
                s
            }
        };
        changes.push(ChangeEvents {
            entity: d.entity,
            entity_id: d.entity_id,
            table: table.clone(),
            commit_lsn: at.commit_lsn,
            xid: at.xid,
            commit_time: at.commit_time,
            events: vec![{
                let mut e = PendingEvent {
                    id: crate::store::ingest::new_event_id(),
                    event_type: d.event_type,
                    data: d.data,
                    previous: None,
                    changed: None,
                    subscriptions,
                    json: None,
                };
                // Serialised here, not inside the store transaction (as live events).
                e.render();
                e
            }],
            bulk: None,
            context_keys,
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

/// The subscriptions a backfill event is due to: those its type routes to, narrowed to
/// `only` when the backfill names one (none when that one's patterns do not match).
fn due_to(routed: Arc<[String]>, only: Option<&str>) -> Arc<[String]> {
    match only {
        None => routed,
        Some(s) if routed.iter().any(|r| r == s) => Arc::from(vec![s.to_owned()]),
        Some(_) => Arc::from(Vec::<String>::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backfill_for_one_subscription_goes_there_only_if_its_patterns_match() {
        let routed: Arc<[String]> = Arc::from(vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(&*due_to(routed.clone(), None), ["a", "b"]);
        assert_eq!(&*due_to(routed.clone(), Some("b")), ["b"]);
        assert!(due_to(routed, Some("c")).is_empty());
    }
}
