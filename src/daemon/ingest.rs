//! The ingest loop: collects source messages into batches (bounded by count and by a few
//! milliseconds), writes each in one store transaction, and only then reports the last
//! committed source transaction's end LSN for confirmation to the slot.
//!
//! Batches are pipelined over [`PIPELINE_DEPTH`] store connections: batch n+1 is
//! written while batch n commits, but commits only after batch n did (see
//! [`Store::ingest_ordered`]). On any failure everything in flight is rolled back and
//! retried in order, one batch at a time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::DaemonError;
use super::source_task::SourceMsg;
use crate::delivery::wake::Wake;
use crate::server::metrics::metrics;
use crate::source::Lsn;
use crate::source::client::PG_EPOCH_OFFSET_MICROS;
use crate::store::{IngestBatch, Store, StoreError};

/// Store connections ingest writes over at once. Two overlap the writing of one batch
/// with the commit of the one before (about +15 % on `bench/ingest.sh`), but recovery
/// after a store outage with two batches in flight was seen to stall in
/// `daemon::unreachable_store_makes_ingest_wait_without_confirming` under load; until
/// that is understood, ingest writes one batch at a time.
pub const PIPELINE_DEPTH: usize = 1;
/// A batch closes at this many events...
const MAX_BATCH_EVENTS: usize = 5_000;
/// ...or this many source messages (changes without events count too)...
const MAX_BATCH_MESSAGES: usize = 20_000;
/// ...or, when no message is waiting and it ends with a source transaction's commit,
/// at once, but no sooner than [`MIN_BATCH_INTERVAL`] after the batch before closed
/// (a quiet stream's changes are not held back for company; a busy one's are gathered
/// into fewer store commits, each a WAL flush on a store that is often the source
/// database itself)...
const MIN_BATCH_INTERVAL: Duration = Duration::from_millis(2);
/// ...or this long after its first message arrived (a transaction's changes arrive
/// over time).
const MAX_BATCH_WAIT: Duration = Duration::from_millis(5);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

/// A batch and the end LSN of the last source transaction it completes.
struct Pending {
    batch: IngestBatch,
    last_commit: Option<Lsn>,
    /// Commit time of that transaction, microseconds since 2000-01-01 UTC.
    last_commit_time: Option<i64>,
    events: usize,
    /// The last message added was a commit.
    at_commit: bool,
    /// The batch's share of the ingest buffer, given back when it is dropped (stored).
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Pending {
    /// Metrics of a committed batch: its duration, event counts and lag reference.
    fn committed(&self, took: Duration) {
        let m = metrics();
        m.events_committed(
            self.batch
                .changes
                .iter()
                .flat_map(|c| c.events.iter().map(|e| e.event_type.as_str())),
        );
        m.ingest_committed(
            took.as_secs_f64(),
            self.last_commit_time.map(|t| t + PG_EPOCH_OFFSET_MICROS),
        );
    }
}

type Written = (Store, Pending, Result<i64, StoreError>, Duration);

struct InFlight {
    task: JoinHandle<Written>,
    /// Events in the batch (their sequence numbers are taken).
    events: i64,
}

/// Runs until the source closes the channel or `shutdown` is cancelled; every batch in
/// hand is committed (or the error returned) before returning.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut stores: Vec<Store>,
    wake: Arc<Wake>,
    slot: &str,
    epoch: i64,
    mut last_seq: i64,
    mut rx: mpsc::Receiver<SourceMsg>,
    confirm: watch::Sender<Lsn>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let mut in_flight: VecDeque<InFlight> = VecDeque::new();
    // Resolves once the newest batch in flight committed (or failed).
    let mut previous: Option<oneshot::Receiver<bool>> = None;
    let mut last_closed = Instant::now();
    loop {
        while stores.is_empty() {
            finish_oldest(
                &mut in_flight,
                &mut stores,
                slot,
                epoch,
                &mut last_seq,
                &confirm,
                &wake,
            )
            .await?;
        }
        if in_flight.is_empty() {
            // Nothing in flight: the next batch follows what is committed.
            previous = None;
            if rx.is_empty() {
                // Caught up with the stream: replication lag (seconds) is 0.
                metrics().ingest_idle(true);
            }
        }
        let collected = collect(&mut rx, last_closed + MIN_BATCH_INTERVAL, &shutdown).await;
        last_closed = Instant::now();
        metrics().ingest_idle(false);
        let Some(pending) = collected else {
            while !in_flight.is_empty() {
                finish_oldest(
                    &mut in_flight,
                    &mut stores,
                    slot,
                    epoch,
                    &mut last_seq,
                    &confirm,
                    &wake,
                )
                .await?;
            }
            return Ok(());
        };
        let mut store = stores.pop().expect("a free store connection");
        let (locked_tx, locked_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let predecessor = previous.replace(done_rx);
        let seq_base = last_seq + in_flight.iter().map(|f| f.events).sum::<i64>();
        let events = pending.events as i64;
        let slot_owned = slot.to_owned();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let prior = async move {
                match predecessor {
                    None => true,
                    Some(rx) => rx.await.unwrap_or(false),
                }
            };
            let result = store
                .ingest_ordered(
                    &slot_owned,
                    epoch,
                    seq_base,
                    &pending.batch,
                    locked_tx,
                    prior,
                )
                .await
                .map(|o| o.last_seq);
            let _ = done_tx.send(result.is_ok());
            (store, pending, result, started.elapsed())
        });
        in_flight.push_back(InFlight { task, events });
        // The next batch may start once this one holds its revision rows.
        let _ = locked_rx.await;
    }
}

/// Waits for the oldest batch; on success confirms it, on failure rolls back everything
/// in flight and retries in order.
async fn finish_oldest(
    in_flight: &mut VecDeque<InFlight>,
    stores: &mut Vec<Store>,
    slot: &str,
    epoch: i64,
    last_seq: &mut i64,
    confirm: &watch::Sender<Lsn>,
    wake: &Wake,
) -> Result<(), DaemonError> {
    let Some(oldest) = in_flight.pop_front() else {
        return Ok(());
    };
    let (store, pending, result, took) = oldest
        .task
        .await
        .map_err(|e| DaemonError::SourceTask(e.to_string()))?;
    stores.push(store);
    match result {
        Ok(seq) => {
            *last_seq = seq;
            if let Some(end) = pending.last_commit {
                confirm.send_replace(end);
            }
            pending.committed(took);
            debug!(events = pending.events, "batch ingested");
            // Dispatchers in this process learn of new events at once.
            wake.notify();
            Ok(())
        }
        Err(err) => {
            warn!(error = %err, "ingest failed; retrying the batches in flight in order");
            let mut retry = vec![pending];
            while let Some(next) = in_flight.pop_front() {
                let (store, pending, _, _) = next
                    .task
                    .await
                    .map_err(|e| DaemonError::SourceTask(e.to_string()))?;
                stores.push(store);
                retry.push(pending);
            }
            for store in stores.iter_mut().filter(|s| s.is_closed()) {
                if let Err(e) = store.reconnect().await {
                    warn!(error = %e, "store reconnect failed");
                }
            }
            for pending in retry {
                let started = Instant::now();
                *last_seq = commit_with_retry(stores, slot, epoch, &pending.batch).await?;
                pending.committed(started.elapsed());
                if let Some(end) = pending.last_commit {
                    confirm.send_replace(end);
                }
            }
            wake.notify();
            Ok(())
        }
    }
}

/// The next batch, or `None` when the source is done or shutdown was asked for.
async fn collect(
    rx: &mut mpsc::Receiver<SourceMsg>,
    not_before: Instant,
    shutdown: &CancellationToken,
) -> Option<Pending> {
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return None,
        msg = rx.recv() => msg?,
    };
    let mut pending = Pending {
        batch: IngestBatch::default(),
        last_commit: None,
        last_commit_time: None,
        events: 0,
        at_commit: false,
        held: None,
    };
    let mut messages = 1;
    add(&mut pending, first);
    let deadline = Instant::now() + MAX_BATCH_WAIT;
    while pending.events < MAX_BATCH_EVENTS && messages < MAX_BATCH_MESSAGES {
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty)
                if pending.at_commit && Instant::now() >= not_before =>
            {
                break;
            }
            Err(mpsc::error::TryRecvError::Empty) => {
                let until = if pending.at_commit {
                    deadline.min(not_before)
                } else {
                    deadline
                };
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(msg)) => msg,
                    Ok(None) | Err(_) => break,
                }
            }
        };
        add(&mut pending, msg);
        messages += 1;
    }
    Some(pending)
}

fn add(pending: &mut Pending, msg: SourceMsg) {
    pending.at_commit = matches!(msg, SourceMsg::Commit { .. });
    match msg {
        SourceMsg::Change {
            events,
            position,
            held,
        } => {
            match (&mut pending.held, held) {
                (Some(all), Some(held)) => all.merge(held),
                (all, held) => *all = all.take().or(held),
            }
            pending.batch.position = position;
            if let Some(events) = events {
                pending.events += events.events.len();
                pending.batch.changes.push(events);
            }
        }
        SourceMsg::Commit {
            end_lsn,
            commit_time,
            position,
        } => {
            pending.last_commit = Some(end_lsn);
            pending.last_commit_time = Some(commit_time);
            pending.batch.position = position;
        }
    }
}

/// Writes one batch alone; while the store is unreachable, waits and retries the same
/// batch (nothing is confirmed meanwhile). Returns the log's last sequence number.
async fn commit_with_retry(
    stores: &mut [Store],
    slot: &str,
    epoch: i64,
    batch: &IngestBatch,
) -> Result<i64, DaemonError> {
    let store = &mut stores[0];
    let mut backoff = Duration::from_millis(100);
    loop {
        debug!(events = batch.changes.len(), "writing a batch alone");
        match store.ingest(slot, epoch, batch).await {
            Ok(outcome) => return Ok(outcome.last_seq),
            Err(e) if e.is_transient() => {
                warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "store unavailable; retrying the batch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                if store.is_closed() {
                    match store.reconnect().await {
                        Ok(()) => info!("store reconnected"),
                        Err(e) => warn!(error = %e, "store reconnect failed"),
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::stream::Position;

    fn change() -> SourceMsg {
        SourceMsg::Change {
            events: None,
            position: Position::default(),
            held: None,
        }
    }

    fn commit(lsn: u64) -> SourceMsg {
        SourceMsg::Commit {
            end_lsn: Lsn(lsn),
            commit_time: 0,
            position: Position::default(),
        }
    }

    /// Sends `msgs`, each after its delay from now (time is paused in these tests), and
    /// keeps the channel open for a minute (a closed channel ends a batch at once).
    fn send_later(tx: mpsc::Sender<SourceMsg>, msgs: Vec<(u64, SourceMsg)>) {
        let start = Instant::now();
        tokio::spawn(async move {
            for (ms, msg) in msgs {
                tokio::time::sleep_until(start + Duration::from_millis(ms)).await;
                tx.send(msg).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_ending_at_a_commit_closes_at_once_when_nothing_waits() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(change()).await.unwrap();
        tx.send(commit(10)).await.unwrap();
        let start = Instant::now();
        let batch = collect(&mut rx, start, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO, "held back for company");
        assert_eq!(batch.last_commit, Some(Lsn(10)));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_closes_no_sooner_than_the_interval_and_takes_what_came_meanwhile() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(commit(10)).await.unwrap();
        send_later(tx, vec![(1, change()), (1, commit(20))]);
        let start = Instant::now();
        let batch = collect(
            &mut rx,
            start + MIN_BATCH_INTERVAL,
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(start.elapsed(), MIN_BATCH_INTERVAL);
        assert_eq!(batch.last_commit, Some(Lsn(20)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_still_arriving_holds_the_batch_open_up_to_the_wait() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(change()).await.unwrap();
        send_later(tx.clone(), vec![(3, change()), (4, commit(30))]);
        let start = Instant::now();
        let batch = collect(&mut rx, start, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(4));
        assert_eq!(batch.last_commit, Some(Lsn(30)));

        // A transaction whose commit does not come within the wait is cut there.
        send_later(tx, vec![(0, change()), (20, commit(40))]);
        let start = Instant::now();
        let batch = collect(&mut rx, start, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(start.elapsed(), MAX_BATCH_WAIT);
        assert_eq!(batch.last_commit, None);
    }
}
