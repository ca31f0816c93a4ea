//! The source task: reads the replication stream, maps each row change to entity events,
//! routes them to subscriptions, and hands them to ingest over a bounded channel. It
//! confirms to the slot only what ingest reports as committed.
//!
//! Table rules and routes may be replaced by a config reload; the task takes the new
//! ones between source transactions (at a Begin), so a transaction is mapped by one set
//! of rules only. Changes of a table the rules no longer watch (pgoutput may still send
//! a few already in flight after the publication dropped it) produce no events.

use std::sync::Arc;
use std::time::Duration;

use foldhash::HashMap;
use metrics::{Counter, counter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::prepare::Routes;
use super::reload::Rules;
use crate::backfill::{self, Watermarks};
use crate::mapping::aggregate::{Emit, TxnAggregates};
use crate::mapping::{ContextKeys, EventDraft};
use crate::source::Lsn;
use crate::source::SourceError;
use crate::source::decoder::{Decoded, JsonRows, Op, TableName};
use crate::source::stream::{Position, ReplicationStream};
use crate::store::backfills::BackfillProgress;
use crate::store::ingest::EventJson;
use crate::store::{BulkRole, ChangeEvents, PendingEvent};
use crate::telemetry::{SOURCE_CHANGES_TOTAL, label};

/// How long the source task waits for ingest to take one message before it closes the
/// replication connection (G9): ingest that takes nothing for this long cannot store
/// (the store is unreachable or refuses a batch), and the server must not be held up
/// waiting for confirmations that will not come. Ingest keeps what it has; the stream
/// reconnects once the message is taken and resumes after it.
const BLOCKED_LIMIT: Duration = Duration::from_secs(5);

/// What the source hands to ingest.
#[derive(Debug)]
pub enum SourceMsg {
    /// A row change (with its events, if it produced any; with bulk events, held
    /// rows or a bulk part) and the position after it.
    Change {
        events: Vec<ChangeEvents>,
        position: Position,
        /// The change's share of the ingest buffer, given back once it is stored (G6).
        held: Option<OwnedSemaphorePermit>,
    },
    /// A transaction committed; `end_lsn` may be confirmed once it is stored.
    /// `commit_time` is in microseconds since 2000-01-01 UTC. `events` are what bulk
    /// events held back to the commit (rows short of `min_rows`, last bulk parts).
    Commit {
        events: Vec<ChangeEvents>,
        end_lsn: Lsn,
        commit_time: i64,
        position: Position,
    },
    /// A backfill chunk merged at its high watermark (see [`crate::backfill`]): its
    /// events and progress are stored in one batch, then `done` is told.
    Chunk {
        changes: Vec<ChangeEvents>,
        progress: BackfillProgress,
        position: Position,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// The current transaction's context, from its Begin message.
struct Txn {
    xid: u32,
    commit_lsn: Lsn,
    commit_time: i64,
    /// Row changes seen so far (replayed ones included).
    rows: u64,
}

/// How the source task is tied to ingest.
pub struct Links {
    /// Messages to ingest.
    pub tx: mpsc::Sender<SourceMsg>,
    /// The ingest buffer: row data in flight, in bytes (G6).
    pub buffer: Arc<Semaphore>,
    /// The end LSN of the last source transaction ingest stored.
    pub confirmed: watch::Receiver<Lsn>,
    /// Whether ingest is retrying a batch it cannot store: the replication connection
    /// is then closed at once while the source task waits for ingest (G9).
    pub stalled: watch::Receiver<bool>,
    /// The backfill worker's watermark window (see [`crate::backfill::window`]).
    pub watermarks: Arc<Watermarks>,
}

/// Runs until `stop` is cancelled or the stream fails.
pub async fn run(
    links: Links,
    mut stream: ReplicationStream,
    mut rules: watch::Receiver<Arc<Rules>>,
    stop: CancellationToken,
) -> Result<(), SourceError> {
    let Links {
        tx,
        buffer,
        confirmed,
        mut stalled,
        watermarks,
    } = links;
    let capacity = buffer.available_permits();
    stream.follow_confirmations(confirmed);
    let mut txn: Option<Txn> = None;
    let mut drafts: Vec<EventDraft> = Vec::new();
    let mut names = NameCache::default();
    let mut current = rules.borrow_and_update().clone();
    let mut bulks = TxnAggregates::default();
    let mut emits: Vec<Emit> = Vec::new();
    stream.set_json_rows(json_rows(&current));
    if !current.aggregates.is_empty() {
        // Bulk events depend on a transaction's earlier rows: after a restart in the
        // middle of one, its stored rows are fed again (their output dropped).
        stream.replay_covered_rows();
    }
    loop {
        let item = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            item = stream.next() => item?,
        };
        let msg = match item {
            Decoded::Begin {
                xid,
                final_lsn,
                commit_time,
            } => {
                // Between transactions: a reload's rules take effect here.
                if rules.has_changed().unwrap_or(false) {
                    current = rules.borrow_and_update().clone();
                    names.routes.clear();
                    stream.set_json_rows(json_rows(&current));
                    tracing::info!(
                        xid,
                        "reloaded table rules and routes in effect from this transaction"
                    );
                }
                txn = Some(Txn {
                    xid,
                    commit_lsn: final_lsn,
                    commit_time,
                    rows: 0,
                });
                bulks = TxnAggregates::default();
                continue;
            }
            Decoded::Change(mut change) => {
                watermarks.observe(&change);
                let replayed = stream.replayed();
                if !replayed {
                    names.count_change(&change.table, change.op);
                }
                drafts.clear();
                // Read before mapping, which moves the rows into the events. Keys are
                // taken while the change is at hand: a held row's events may go on at
                // the commit, with its context.
                let keys = current.mapper.context_keys(&change);
                current.mapper.map(&mut change, &mut drafts);
                let mut events = Vec::new();
                if let Some(t) = &mut txn {
                    t.rows += 1;
                    if current.aggregates.is_empty() {
                        if !drafts.is_empty() {
                            let first = &drafts[0];
                            let (entity, id) = (first.entity.clone(), first.entity_id.clone());
                            events.push(change_events(
                                t,
                                (entity, id),
                                &mut drafts,
                                keys,
                                None,
                                &current.routes,
                                &mut names,
                            ));
                        }
                    } else {
                        let d = std::mem::take(&mut drafts);
                        let keys = if d.is_empty() { None } else { keys };
                        bulks.row(
                            &current.aggregates,
                            t.rows,
                            &change.table,
                            change.op,
                            d,
                            keys,
                            &mut emits,
                        );
                        if replayed {
                            emits.clear();
                        }
                        for e in emits.drain(..) {
                            push_emit(t, e, &current.routes, &mut names, &mut events);
                        }
                    }
                }
                if replayed {
                    continue;
                }
                let cost = change_cost(
                    stream.last_size(),
                    events.iter().map(|e| e.events.len()).sum(),
                    capacity,
                );
                match hold(&buffer, cost, &mut stream, &mut stalled, &stop).await {
                    Some(held) => SourceMsg::Change {
                        events,
                        position: stream.position(),
                        held: Some(held),
                    },
                    None => break,
                }
            }
            Decoded::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                let mut events = Vec::new();
                if let Some(t) = &txn {
                    bulks.commit(&current.aggregates, &mut emits);
                    for e in emits.drain(..) {
                        push_emit(t, e, &current.routes, &mut names, &mut events);
                    }
                }
                txn = None;
                SourceMsg::Commit {
                    events,
                    end_lsn,
                    commit_time,
                    position: stream.position(),
                }
            }
            Decoded::Truncate { tables, .. } => {
                let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
                tracing::warn!(tables = ?names, "tables truncated; walhook emits no events for TRUNCATE");
                SourceMsg::Change {
                    events: Vec::new(),
                    position: stream.position(),
                    held: None,
                }
            }
            Decoded::LogicalMessage {
                transactional,
                prefix,
                content,
                ..
            } => {
                if !transactional {
                    continue;
                }
                let closed = match (&txn, prefix == backfill::window::PREFIX) {
                    (Some(t), true) => watermarks.on_message(&content).map(|c| (c, t)),
                    _ => None,
                };
                match closed {
                    Some((closed, t)) => {
                        chunk_msg(closed, t, &current, &mut names, stream.position())
                    }
                    None => SourceMsg::Change {
                        events: Vec::new(),
                        position: stream.position(),
                        held: None,
                    },
                }
            }
        };
        // Hand on; if ingest takes nothing for a while, stop holding the server up.
        // When there is room and nothing to watch for, without building the wait
        // (once per row change: its waiters and timer cost more than the send).
        let msg = if stop.is_cancelled() || (stream.is_connected() && *stalled.borrow()) {
            msg
        } else {
            match tx.try_reserve() {
                Ok(permit) => {
                    permit.send(msg);
                    continue;
                }
                Err(mpsc::error::TrySendError::Closed(())) => break,
                Err(mpsc::error::TrySendError::Full(())) => msg,
            }
        };
        let blocked_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = stalled_now(&mut stalled), if stream.is_connected() => {
                    stream.disconnect("ingest cannot store what it received").await;
                }
                permit = tx.reserve() => {
                    match permit {
                        Ok(permit) => permit.send(msg),
                        // Ingest stopped.
                        Err(_) => break,
                    }
                    break;
                }
                _ = tokio::time::sleep_until(blocked_since + BLOCKED_LIMIT), if stream.is_connected() => {
                    stream.disconnect("ingest has taken nothing for 5 s (the store cannot keep up or is unreachable)").await;
                }
            }
        }
        if stop.is_cancelled() || tx.is_closed() {
            break;
        }
    }
    // Ingest may be gone (its sender dropped), but its last word still counts.
    stream.close().await;
    Ok(())
}

/// What a row change holds of the ingest buffer once mapped (its decoded row is gone by
/// then): for each of its events, its data and previous values as JSON, about the row's
/// size on the wire, plus [`EVENT_OVERHEAD`]; a change without events its wire size.
/// At least 64 bytes, never more than the whole buffer (a row larger than the buffer
/// passes alone).
fn change_cost(wire: usize, events: usize, capacity: usize) -> u32 {
    let cost = wire
        .max(64)
        .saturating_mul(events.max(1))
        .saturating_add(events.saturating_mul(EVENT_OVERHEAD));
    cost.min(capacity).min(u32::MAX as usize) as u32
}

/// Memory of an event besides its row values: its id, type, entity id, subscriptions
/// and the structures holding them (measured: narrow rows took about this much more
/// than their wire size).
const EVENT_OVERHEAD: usize = 256;

/// Takes `cost` bytes of the ingest buffer, waiting while it is full (back-pressure on
/// the stream). While the wait lasts longer than [`BLOCKED_LIMIT`] the replication
/// connection is closed (G9). `None` when `stop` was cancelled.
async fn hold(
    buffer: &Arc<Semaphore>,
    cost: u32,
    stream: &mut ReplicationStream,
    stalled: &mut watch::Receiver<bool>,
    stop: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if stop.is_cancelled() {
        return None;
    }
    // Room at once: no wait to build (as the wait below would take it first).
    if let Ok(permit) = buffer.clone().try_acquire_many_owned(cost) {
        return Some(permit);
    }
    let since = tokio::time::Instant::now();
    let acquire = buffer.clone().acquire_many_owned(cost);
    tokio::pin!(acquire);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return None,
            permit = &mut acquire => return permit.ok(),
            _ = stalled_now(stalled), if stream.is_connected() => {
                stream.disconnect("ingest cannot store what it received").await;
            }
            _ = tokio::time::sleep_until(since + BLOCKED_LIMIT), if stream.is_connected() => {
                stream.disconnect("ingest has stored nothing for 5 s (the store is slow or unreachable)").await;
            }
        }
    }
}

/// Per-row strings that are the same for many rows: table names, the subscriptions
/// each event type routes to, and the change counters of each table (insert, update,
/// delete), so that counting a row is a map lookup and an atomic add.
#[derive(Default)]
struct NameCache {
    tables: HashMap<TableName, Arc<str>>,
    routes: HashMap<String, Arc<[String]>>,
    changes: HashMap<TableName, [Counter; 3]>,
}

impl NameCache {
    fn count_change(&mut self, table: &TableName, op: Op) {
        let i = match op {
            Op::Insert => 0,
            Op::Update => 1,
            Op::Delete => 2,
        };
        if let Some(counters) = self.changes.get(table) {
            counters[i].increment(1);
            return;
        }
        let name = table.to_string();
        let counters = [Op::Insert, Op::Update, Op::Delete].map(|op| {
            counter!(SOURCE_CHANGES_TOTAL, label::TABLE => name.clone(), label::OP => op.as_str())
        });
        counters[i].increment(1);
        self.changes.insert(table.clone(), counters);
    }

    fn table(&mut self, table: &TableName) -> Arc<str> {
        if let Some(name) = self.tables.get(table) {
            return name.clone();
        }
        let name: Arc<str> = Arc::from(table.to_string());
        self.tables.insert(table.clone(), name.clone());
        name
    }

    fn routes(&mut self, routes: &Routes, event_type: &str) -> Arc<[String]> {
        if let Some(r) = self.routes.get(event_type) {
            return r.clone();
        }
        let r = routes.matching(event_type);
        self.routes.insert(event_type.to_owned(), r.clone());
        r
    }
}

/// The events of one row change (or bulk event) of entity `(entity, id)` with
/// `drafts`, due to the subscriptions their types route to. `context_keys` is what the
/// context stage reads for them (every row event's, however it got here: at once,
/// held by an aggregate, or as a bulk row that keeps its events; a bulk event has
/// none).
fn change_events(
    txn: &Txn,
    (entity, entity_id): (Arc<str>, String),
    drafts: &mut Vec<EventDraft>,
    context_keys: Option<ContextKeys>,
    bulk: Option<BulkRole>,
    routes: &Routes,
    names: &mut NameCache,
) -> ChangeEvents {
    let table = match drafts.first() {
        Some(d) => names.table(&d.table),
        None => Arc::from(""),
    };
    // A change without events has nothing to read context for (a bulk row that the
    // bulk event replaces).
    let context_keys = context_keys.filter(|_| !drafts.is_empty());
    // Drained, not consumed: the caller's buffer is kept, and the events get an
    // allocation of their own. Consumed, the drafts (once they had grown a `json` field)
    // were collected in place: the events took the drafts' allocation to the ingest
    // task, which freed it there, and allocating it again per change kept faulting in
    // fresh pages (~7 % of ingest's CPU, +7 MiB RSS).
    let events = drafts
        .drain(..)
        .map(|d| {
            let mut e = PendingEvent {
                id: crate::store::ingest::new_event_id(),
                subscriptions: names.routes(routes, &d.event_type),
                event_type: d.event_type,
                data: d.data,
                previous: d.previous,
                changed: d.changed,
                json: d.json.map(|j| EventJson {
                    data: j.0,
                    previous: None,
                }),
            };
            // Serialised here, beside the store transaction of the batch before, not
            // inside it (a bulk event's data is completed when it is stored).
            if !matches!(bulk, Some(BulkRole::Event { .. })) {
                e.render();
            }
            e
        })
        .collect();
    ChangeEvents {
        entity,
        entity_id,
        table,
        commit_lsn: txn.commit_lsn,
        xid: txn.xid,
        commit_time: txn.commit_time,
        events,
        bulk,
        context_keys,
        context: None,
    }
}

/// The tables whose new rows the decoder writes as JSON text ([`JsonRows`]): none
/// while bulk events are configured, whose items are built from rows.
fn json_rows(rules: &Rules) -> JsonRows {
    if rules.aggregates.is_empty() {
        rules.mapper.json_rows()
    } else {
        JsonRows::default()
    }
}

/// Appends what one [`Emit`] hands on: a row change, or a bulk part's rows (each
/// taking a revision, with or without events) and then its bulk event, whose entity
/// id names the part (`<table>/<op>/<commit LSN>/<part>`: revision 1 of an entity of
/// its own, so it neither waits behind nor holds up the entities it lists) and whose
/// `data.items` revisions the store fills in.
fn push_emit(
    txn: &Txn,
    emit: Emit,
    routes: &Routes,
    names: &mut NameCache,
    out: &mut Vec<ChangeEvents>,
) {
    match emit {
        Emit::Row(mut r) => out.push(change_events(
            txn,
            (r.entity, r.entity_id),
            &mut r.drafts,
            r.context_keys,
            None,
            routes,
            names,
        )),
        Emit::Bulk(b) => {
            let rows = b.rows.len();
            let data = b.data(&vec![0; rows]);
            let table = names.table(&b.table);
            for mut r in b.rows {
                let mut c = change_events(
                    txn,
                    (r.entity, r.entity_id),
                    &mut r.drafts,
                    r.context_keys,
                    Some(BulkRole::Row),
                    routes,
                    names,
                );
                c.table = table.clone();
                out.push(c);
            }
            let entity_id = format!(
                "{}/{}/{}/{}",
                b.table,
                b.op.as_str(),
                txn.commit_lsn,
                b.part
            );
            let draft = EventDraft {
                event_type: b.event,
                entity: b.entity.clone(),
                entity_id: entity_id.clone(),
                data,
                json: None,
                previous: None,
                changed: None,
                table: b.table,
            };
            // A bulk event has no context: its rows may have different parents.
            out.push(change_events(
                txn,
                (b.entity, entity_id),
                &mut vec![draft],
                None,
                Some(BulkRole::Event { rows }),
                routes,
                names,
            ));
        }
    }
}

/// The message of a backfill chunk at its high watermark: its rows' events (mapped and
/// routed by the current rules), or, when the rules do not watch its table, a plain
/// position and the backfill told why.
fn chunk_msg(
    mut closed: backfill::Closed,
    txn: &Txn,
    rules: &Rules,
    names: &mut NameCache,
    position: Position,
) -> SourceMsg {
    let at = backfill::At {
        commit_lsn: txn.commit_lsn,
        xid: txn.xid,
        commit_time: txn.commit_time,
    };
    let mut route = |event_type: &str| names.routes(&rules.routes, event_type);
    match backfill::chunk_events(&mut closed, &rules.mapper, at, &mut route) {
        Some((changes, progress)) => SourceMsg::Chunk {
            changes,
            progress,
            position,
            done: closed.chunk.done,
        },
        None => {
            let _ = closed.chunk.done.send(Err(format!(
                "table {} is not in the running config's [[tables]]",
                closed.table
            )));
            SourceMsg::Change {
                events: Vec::new(),
                position,
                held: None,
            }
        }
    }
}

/// Resolves once ingest says it cannot store (pending for ever once ingest is gone).
async fn stalled_now(stalled: &mut watch::Receiver<bool>) {
    if stalled.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_costs_its_events_values_and_their_overhead_within_the_buffer() {
        let cap = 4 << 20;
        // One event: its values (about the wire size) and its overhead.
        assert_eq!(change_cost(2_000, 1, cap), 2_000 + EVENT_OVERHEAD as u32);
        // Two events hold two copies of the values.
        assert_eq!(
            change_cost(2_000, 2, cap),
            4_000 + 2 * EVENT_OVERHEAD as u32
        );
        // No event: the wire size, at least 64 bytes.
        assert_eq!(change_cost(2_000, 0, cap), 2_000);
        assert_eq!(change_cost(10, 0, cap), 64);
        // A row larger than the buffer takes all of it, and passes alone.
        assert_eq!(change_cost(10 << 20, 1, cap), cap as u32);
    }
}
