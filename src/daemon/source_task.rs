//! The source task: reads the replication stream, maps each row change to entity events,
//! routes them to subscriptions, and hands them to ingest over a bounded channel. It
//! confirms to the slot only what ingest reports as committed.
//!
//! Table rules and routes may be replaced by a config reload; the task takes the new
//! ones between source transactions (at a Begin), so a transaction is mapped by one set
//! of rules only. Changes of a table the rules no longer watch (pgoutput may still send
//! a few already in flight after the publication dropped it) produce no events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, counter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::prepare::Routes;
use super::reload::Rules;
use crate::backfill::{self, Watermarks};
use crate::mapping::EventDraft;
use crate::source::Lsn;
use crate::source::SourceError;
use crate::source::decoder::{Decoded, Op, TableName};
use crate::source::stream::{Position, ReplicationStream};
use crate::store::backfills::BackfillProgress;
use crate::store::{ChangeEvents, PendingEvent};
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
    /// A row change (with its events, if it produced any) and the position after it.
    Change {
        events: Option<ChangeEvents>,
        position: Position,
        /// The change's share of the ingest buffer, given back once it is stored (G6).
        held: Option<OwnedSemaphorePermit>,
    },
    /// A transaction committed; `end_lsn` may be confirmed once it is stored.
    /// `commit_time` is in microseconds since 2000-01-01 UTC.
    Commit {
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
                    tracing::info!(
                        xid,
                        "reloaded table rules and routes in effect from this transaction"
                    );
                }
                txn = Some(Txn {
                    xid,
                    commit_lsn: final_lsn,
                    commit_time,
                });
                continue;
            }
            Decoded::Change(change) => {
                watermarks.observe(&change);
                names.count_change(&change.table, change.op);
                drafts.clear();
                current.mapper.map(&change, &mut drafts);
                let events = match (&txn, drafts.is_empty()) {
                    (Some(t), false) => Some(to_change_events(
                        t,
                        &mut drafts,
                        &current.routes,
                        &mut names,
                    )),
                    _ => None,
                };
                let cost = change_cost(
                    stream.last_size(),
                    events.as_ref().map_or(0, |e| e.events.len()),
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
                txn = None;
                SourceMsg::Commit {
                    end_lsn,
                    commit_time,
                    position: stream.position(),
                }
            }
            Decoded::Truncate { tables, .. } => {
                let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
                tracing::warn!(tables = ?names, "tables truncated; walhook emits no events for TRUNCATE");
                SourceMsg::Change {
                    events: None,
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
                        events: None,
                        position: stream.position(),
                        held: None,
                    },
                }
            }
        };
        // Hand on; if ingest takes nothing for a while, stop holding the server up.
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

/// What a row change holds of the ingest buffer: its size on the wire for the decoded
/// row, and as much again for each of its events (their data and previous values),
/// never more than the whole buffer (a row larger than the buffer passes alone).
fn change_cost(wire: usize, events: usize, capacity: usize) -> u32 {
    let cost = (wire.max(64)).saturating_mul(1 + events);
    cost.min(capacity).min(u32::MAX as usize) as u32
}

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

fn to_change_events(
    txn: &Txn,
    drafts: &mut Vec<EventDraft>,
    routes: &Routes,
    names: &mut NameCache,
) -> ChangeEvents {
    let first = &drafts[0];
    let entity = first.entity.clone();
    let entity_id = first.entity_id.clone();
    let table = names.table(&first.table);
    let events = drafts
        .drain(..)
        .map(|d| PendingEvent {
            id: crate::store::ingest::new_event_id(),
            subscriptions: names.routes(routes, &d.event_type),
            event_type: d.event_type,
            data: d.data,
            previous: d.previous,
            changed: d.changed,
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
    }
}

/// The message of a backfill chunk at its high watermark: its rows' events (mapped and
/// routed by the current rules), or, when the rules do not watch its table, a plain
/// position and the backfill told why.
fn chunk_msg(
    closed: backfill::Closed,
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
    match backfill::chunk_events(&closed, &rules.mapper, at, &mut route) {
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
                events: None,
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
