//! The ingest loop: collects source messages into batches (bounded by count and by a few
//! milliseconds), writes each in one store transaction, and only then reports the last
//! committed source transaction's end LSN for confirmation to the slot.
//!
//! Up to two batches are written at a time, on two store connections, and commit in
//! source order (see [`run`]). A batch that fails is written again alone, retried until
//! it commits, and nothing after it is confirmed meanwhile (G1): at once with short backoff while the
//! store is unreachable, and with backoff up to [`MAX_REFUSED_BACKOFF`] while the store
//! refuses it (an entity id too long for an index, a constraint): ingest then stays up
//! and not ready, naming the source table and the fix, until an operator fixed the
//! cause. A batch with no events writes nothing (G9).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, histogram};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use super::DaemonError;
use super::context::{ContextReader, Signals};
use super::source_task::SourceMsg;
use crate::pg::ConnInfo;
use crate::pg::ErrorChain;
use crate::pg::PG_EPOCH_OFFSET_MICROS;
use crate::server::Health;
use crate::server::health::StoreState;
use crate::source::Lsn;
use crate::store::ingest::{After, IngestOutcome, batch_keys};
use crate::store::wake::Wake;
use crate::store::{IngestBatch, Store, StoreError};
use crate::telemetry::{self, EVENTS_TOTAL, INGEST_BATCH_SECONDS, INGEST_ERRORS_TOTAL, label};

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
/// Longest wait between tries while the store is unreachable.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);
/// Longest wait between tries while the store refuses a batch.
pub const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(30);
/// Entity ids are cut to this many characters in logs (an id over an index limit is
/// kilobytes long).
const LOGGED_ID_CHARS: usize = 100;

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
    /// Backfill chunks in the batch, told once it is stored.
    chunks_done: Vec<oneshot::Sender<Result<(), String>>>,
}

impl Pending {
    /// Whether the batch goes to the store: it has events, or backfill chunks (whose
    /// cursors move even without events).
    fn writes(&self) -> bool {
        self.events > 0 || !self.batch.backfills.is_empty()
    }

    /// Metrics of a committed batch: its duration, event counts and lag reference.
    fn committed(&self, took: Duration) {
        // One label lookup per event type, not per event.
        let mut counts: Vec<(&str, u64)> = Vec::new();
        for t in self
            .batch
            .changes
            .iter()
            .flat_map(|c| c.events.iter().map(|e| e.event_type.as_str()))
        {
            match counts.iter_mut().find(|(name, _)| *name == t) {
                Some((_, n)) => *n += 1,
                None => counts.push((t, 1)),
            }
        }
        for (t, n) in counts {
            counter!(EVENTS_TOTAL, label::TYPE => t.to_owned()).increment(n);
        }
        histogram!(INGEST_BATCH_SECONDS).record(took.as_secs_f64());
        if let Some(t) = self.last_commit_time {
            telemetry::ingest_caught_up_to(t + PG_EPOCH_OFFSET_MICROS);
        }
    }
}

/// Runs until the source closes the channel or `shutdown` is cancelled. A batch in
/// hand is committed before returning, unless shutdown comes while the store does not
/// take it (then it is left unconfirmed: the slot replays it to the next run).
///
/// Up to two batches are written at once, each on a store connection of its own (see
/// [`Store::ingest_after`]): the second starts on the revisions only it has while the
/// first finishes, and commits after it. Batches are confirmed and published in source
/// order, each once it committed (G1). When a batch fails, it and the one after it are
/// written again one at a time, retried as [`commit_with_retry`] says.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    store: Store,
    wake: &Wake,
    health: &Health,
    slot: &str,
    epoch: i64,
    mut rx: mpsc::Receiver<SourceMsg>,
    confirm: watch::Sender<Lsn>,
    stalled: watch::Sender<bool>,
    mut context: ContextReader,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let cx = Ingest {
        wake,
        health,
        slot,
        epoch,
        confirm,
        stalled,
        shutdown,
    };
    let mut lanes = Lanes {
        conn: (store.conn_info().clone(), store.schema().to_owned()),
        second_refused: None,
        spare: vec![store],
        flight: VecDeque::new(),
    };
    let mut last_closed = Instant::now();
    loop {
        let idle = lanes.flight.is_empty();
        let room = lanes.flight.len() < LANES && !cx.shutdown.is_cancelled();
        if idle && rx.is_empty() {
            // Caught up with the stream: replication lag (seconds) is 0.
            telemetry::ingest_idle(true);
        }
        let first = tokio::select! {
            biased;
            // Batches in flight are finished first.
            _ = cx.shutdown.cancelled(), if idle => return Ok(()),
            written = lanes.oldest(), if !idle => {
                if !lanes.completed(written, &cx).await? {
                    return Ok(());
                }
                continue;
            }
            msg = rx.recv(), if room => msg,
        };
        let Some(first) = first else {
            // The source is done.
            lanes.drain(&cx).await?;
            return Ok(());
        };
        let mut pending = collect_from(first, &mut rx, last_closed + MIN_BATCH_INTERVAL).await;
        last_closed = Instant::now();
        telemetry::ingest_idle(false);
        // A batch without events (changes of unwatched rows, bare commits) writes
        // nothing: no transaction, no NOTIFY (G9). Its commit is still confirmed (once
        // the batches before it are stored), so the slot advances (G7), and the store's
        // checkpoint then lags behind the slot's confirmed LSN. That is safe: the
        // server never sends again what the slot confirmed, and the stream's resume
        // filter (`ReplicationStream::filter`) skips only transactions at or below the
        // checkpoint, so everything the server sends after a restart (all past the
        // confirmed LSN, hence past the checkpoint) is handed on.
        // A backfill chunk is written even without events: its cursor moves.
        if !pending.writes() {
            match lanes.flight.back_mut() {
                Some(lane) => lane.then.push(pending),
                None => cx.confirm(&pending),
            }
            continue;
        }
        // Context is read before the batch is stored, and a batch is stored only with
        // it (G1, G2).
        let signals = Signals {
            health,
            stalled: &cx.stalled,
            shutdown: &cx.shutdown,
        };
        if !context.fill(&mut pending.batch, &signals).await {
            lanes.drain(&cx).await?;
            return Ok(());
        }
        if !lanes.start(pending, &cx).await? {
            return Ok(());
        }
    }
}

/// Batches written at once at most.
const LANES: usize = 2;
/// After the store refused a second connection, batches are written one at a time
/// this long before ingest asks again.
const SECOND_RETRY: Duration = Duration::from_secs(10);

/// What ingest's stages share.
struct Ingest<'a> {
    wake: &'a Wake,
    health: &'a Health,
    slot: &'a str,
    epoch: i64,
    confirm: watch::Sender<Lsn>,
    stalled: watch::Sender<bool>,
    shutdown: CancellationToken,
}

impl Ingest<'_> {
    /// After `pending` committed (`outcome`): metrics, confirmation, backfill chunks
    /// told, and the new events handed to the dispatchers of this process.
    fn stored(&self, mut pending: Pending, outcome: IngestOutcome, took: Duration) {
        pending.committed(took);
        debug!(
            events = pending.events,
            last_seq = outcome.last_seq,
            already_stored = outcome.already_stored,
            "batch ingested"
        );
        self.confirm(&pending);
        for done in std::mem::take(&mut pending.chunks_done) {
            let _ = done.send(Ok(()));
        }
        // Dispatchers in this process learn of new events at once, and take them from
        // memory (a batch stored before is not published: they read it from the store).
        if !outcome.already_stored {
            let cost = pending.held.as_ref().map_or(0, |h| h.num_permits());
            let seq_base = outcome.last_seq - outcome.events as i64;
            self.wake
                .live()
                .publish(pending.batch, seq_base, &outcome.revisions, cost);
        }
        self.wake.notify();
    }

    /// Confirms the last source commit of `pending`.
    fn confirm(&self, pending: &Pending) {
        if let Some(end) = pending.last_commit {
            self.confirm.send_replace(end);
        }
    }

    /// Writes `pending` alone with `store`, retrying until it commits; `false` when
    /// shutdown came first.
    async fn write_alone(&self, store: &mut Store, pending: Pending) -> Result<bool, DaemonError> {
        let started = Instant::now();
        let Some(outcome) = commit_with_retry(
            store,
            self.health,
            &self.stalled,
            self.slot,
            self.epoch,
            &pending.batch,
            &self.shutdown,
        )
        .await?
        else {
            return Ok(false);
        };
        self.stored(pending, outcome, started.elapsed());
        Ok(true)
    }
}

/// A batch being written by a task of its own.
struct Lane {
    task: JoinHandle<Written>,
    /// The batch's entity keys, hashed, for the batch after it.
    keys: Arc<foldhash::HashSet<u64>>,
    /// Tells the batch after this one that this one committed.
    next_go: Option<oneshot::Sender<bool>>,
    /// Batches after this one that write nothing, confirmed once it committed.
    then: Vec<Pending>,
}

/// What a lane's task gives back.
struct Written {
    store: Store,
    pending: Pending,
    result: Result<IngestOutcome, StoreError>,
    took: Duration,
}

/// The store connections of ingest, and the batches being written, oldest first.
struct Lanes {
    /// Where and in which schema the store is, for a second connection.
    conn: (ConnInfo, String),
    /// When the store last refused a second connection.
    second_refused: Option<Instant>,
    spare: Vec<Store>,
    flight: VecDeque<Lane>,
}

impl Drop for Lanes {
    fn drop(&mut self) {
        // Returning early (an error): what is still being written is rolled back with
        // its connection, and nothing of it was confirmed.
        for lane in &self.flight {
            lane.task.abort();
        }
    }
}

impl Lanes {
    /// The oldest batch's task, once it ended. Cancel-safe.
    async fn oldest(&mut self) -> Result<Written, tokio::task::JoinError> {
        let lane = self.flight.front_mut().expect("a batch in flight");
        (&mut lane.task).await
    }

    /// A store connection for the next batch: a spare one; else a second one, unless
    /// the store refused one less than [`SECOND_RETRY`] ago or the batch in flight ends
    /// first (a store that does not answer never holds ingest up longer than that
    /// batch); else that batch's, once it is finished. `None` when shutdown came while
    /// the store did not take that batch.
    async fn next_store(&mut self, cx: &Ingest<'_>) -> Result<Option<Store>, DaemonError> {
        if let Some(store) = self.spare.pop() {
            return Ok(Some(store));
        }
        let refused_lately = self
            .second_refused
            .is_some_and(|at| at.elapsed() < SECOND_RETRY);
        let ended = if refused_lately {
            None
        } else {
            let (info, schema) = self.conn.clone();
            tokio::select! {
                biased;
                written = self.oldest() => Some(written),
                connected = Store::connect(&info, &schema) => match connected {
                    Ok(store) => return Ok(Some(store)),
                    Err(e) => {
                        debug!(error = %ErrorChain(&e), "no second store connection for ingest; one batch at a time for now");
                        None
                    }
                },
            }
        };
        let written = match ended {
            Some(written) => written,
            None => {
                if !refused_lately {
                    self.second_refused = Some(Instant::now());
                }
                self.oldest().await
            }
        };
        if !self.completed(written, cx).await? {
            return Ok(None);
        }
        let store = self
            .spare
            .pop()
            .expect("a finished batch gives its connection back");
        Ok(Some(store))
    }

    /// Starts writing `pending`, on a connection of its own when another batch is in
    /// flight. `false` when shutdown came while waiting for the store.
    async fn start(&mut self, pending: Pending, cx: &Ingest<'_>) -> Result<bool, DaemonError> {
        // A connection lost meanwhile fails the batch, which is then written alone
        // (reconnecting).
        let Some(store) = self.next_store(cx).await? else {
            return Ok(false);
        };
        let keys = Arc::new(batch_keys(&pending.batch));
        let after = match self.flight.back_mut() {
            Some(before) => {
                let (go, committed) = oneshot::channel();
                before.next_go = Some(go);
                Some(After {
                    keys: before.keys.clone(),
                    committed,
                })
            }
            None => None,
        };
        let (slot, epoch) = (cx.slot.to_owned(), cx.epoch);
        let task = tokio::spawn(
            async move {
                let mut store = store;
                let started = Instant::now();
                let result = store
                    .ingest_after(&slot, epoch, &pending.batch, after)
                    .await;
                Written {
                    store,
                    pending,
                    result,
                    took: started.elapsed(),
                }
            }
            .in_current_span(),
        );
        self.flight.push_back(Lane {
            task,
            keys,
            next_go: None,
            then: Vec::new(),
        });
        Ok(true)
    }

    /// Takes the end of the oldest batch's task: a committed batch is confirmed and
    /// published, and the one after it told to go on; a failed one is written again
    /// alone, then the one after it. `false` when shutdown came while the store did not
    /// take a batch.
    async fn completed(
        &mut self,
        written: Result<Written, tokio::task::JoinError>,
        cx: &Ingest<'_>,
    ) -> Result<bool, DaemonError> {
        let lane = self.flight.pop_front().expect("a batch in flight");
        let Written {
            store,
            pending,
            result,
            took,
        } = written.map_err(DaemonError::IngestTask)?;
        match result {
            Ok(outcome) => {
                if let Some(go) = lane.next_go {
                    let _ = go.send(true);
                }
                self.spare.push(store);
                cx.stored(pending, outcome, took);
                for then in &lane.then {
                    cx.confirm(then);
                }
                Ok(true)
            }
            Err(e) => {
                debug!(error = %ErrorChain(&e), "a batch failed; it and the one after it are written again one at a time");
                // The batch after this one gives up (rolled back), and waits its turn.
                drop(lane.next_go);
                let mut again = vec![(store, pending, lane.then)];
                if let Some(next) = self.flight.pop_front() {
                    let w = next.task.await.map_err(DaemonError::IngestTask)?;
                    again.push((w.store, w.pending, next.then));
                }
                for (mut store, pending, then) in again {
                    let stored = cx.write_alone(&mut store, pending).await;
                    self.spare.push(store);
                    if !stored? {
                        return Ok(false);
                    }
                    for then in &then {
                        cx.confirm(then);
                    }
                }
                Ok(true)
            }
        }
    }

    /// Finishes every batch in flight.
    async fn drain(&mut self, cx: &Ingest<'_>) -> Result<(), DaemonError> {
        while !self.flight.is_empty() {
            let written = self.oldest().await;
            if !self.completed(written, cx).await? {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// The next batch, or `None` when the source is done or shutdown was asked for.
#[cfg(test)]
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
    Some(collect_from(first, rx, not_before).await)
}

/// The batch that begins with `first` (see [`collect`]).
async fn collect_from(
    first: SourceMsg,
    rx: &mut mpsc::Receiver<SourceMsg>,
    not_before: Instant,
) -> Pending {
    let mut pending = Pending {
        batch: IngestBatch::default(),
        last_commit: None,
        last_commit_time: None,
        events: 0,
        at_commit: false,
        held: None,
        chunks_done: Vec::new(),
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
    pending
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
            for change in events {
                pending.events += change.events.len();
                pending.batch.changes.push(change);
            }
        }
        SourceMsg::Commit {
            events,
            end_lsn,
            commit_time,
            position,
        } => {
            for change in events {
                pending.events += change.events.len();
                pending.batch.changes.push(change);
            }
            pending.last_commit = Some(end_lsn);
            pending.last_commit_time = Some(commit_time);
            pending.batch.position = position;
        }
        // A chunk is never split across batches: its events and cursor move together.
        SourceMsg::Chunk {
            changes,
            progress,
            position,
            done,
        } => {
            pending.batch.position = position;
            pending.events += changes.len();
            pending.batch.changes.extend(changes);
            pending.batch.backfills.push(progress);
            pending.chunks_done.push(done);
        }
    }
}

/// Writes one batch, retrying until it commits; nothing is confirmed meanwhile.
/// Returns `None` when shutdown came first. While the store is unreachable, retries
/// with short backoff; while it refuses the batch, retries with backoff up to
/// [`MAX_REFUSED_BACKOFF`], not ready, naming the culprit. A COMMIT whose
/// acknowledgement was lost is recognised by [`Store::ingest`] (the batch is at or
/// below the stored checkpoint) and not written twice.
#[allow(clippy::too_many_arguments)]
async fn commit_with_retry(
    store: &mut Store,
    health: &Health,
    stalled: &watch::Sender<bool>,
    slot: &str,
    epoch: i64,
    batch: &IngestBatch,
    shutdown: &CancellationToken,
) -> Result<Option<crate::store::ingest::IngestOutcome>, DaemonError> {
    let mut backoff = Duration::from_millis(100);
    // The kind and reason of the store's refusal, found once per batch.
    let mut refused: Option<(&'static str, String)> = None;
    loop {
        let err = match store.ingest(slot, epoch, batch).await {
            Ok(outcome) => {
                stalled.send_if_modified(|s| std::mem::replace(s, false));
                if outcome.already_stored {
                    info!(
                        "the batch was committed before (its acknowledgement was lost); not written again"
                    );
                }
                if refused.is_some() {
                    info!("the store took the batch it refused before; ingest goes on");
                    health.set_ingest_refused(None);
                }
                return Ok(Some(outcome));
            }
            Err(e @ (StoreError::Deposed { .. } | StoreError::NoCheckpoint(_))) => {
                return Err(e.into());
            }
            Err(e) => e,
        };
        let transient = err.is_transient();
        if transient {
            // Readiness names the store at once, not at its next probe, and before the
            // source pauses because of it.
            health.set_store(StoreState::Unreachable(
                "ingest cannot reach it to store a batch".to_owned(),
            ));
        }
        // The source stops holding the server up while this batch waits (G9).
        stalled.send_if_modified(|s| !std::mem::replace(s, true));
        if transient {
            counter!(INGEST_ERRORS_TOTAL, label::KIND => "unavailable").increment(1);
            warn!(error = %ErrorChain(&err), backoff_ms = backoff.as_millis() as u64, "store unavailable; retrying the batch");
        } else {
            if refused.is_none() {
                refused = Some(refusal_reason(store, slot, batch, &err).await);
                backoff = backoff.max(Duration::from_secs(1));
            }
            let (kind, why) = refused.as_ref().expect("set above");
            error!(reason = %why, backoff_s = backoff.as_secs(), "the store refuses a batch; retrying it (nothing after it is confirmed)");
            counter!(INGEST_ERRORS_TOTAL, label::KIND => *kind).increment(1);
            health.set_ingest_refused(Some(why.clone()));
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        let cap = if refused.is_some() {
            MAX_REFUSED_BACKOFF
        } else {
            MAX_RETRY_BACKOFF
        };
        backoff = (backoff * 2).min(cap);
        if store.is_closed() {
            match store.reconnect().await {
                Ok(()) => info!("store reconnected"),
                Err(e) => warn!(error = %ErrorChain(&e), "store reconnect failed"),
            }
        }
    }
}

/// The metric kind and a reason for the store's refusal of `batch`: the store's
/// message, the source table and entity id of the change it refuses (found by writing
/// each change alone, rolled back), and the fix. Never row values.
async fn refusal_reason(
    store: &mut Store,
    slot: &str,
    batch: &IngestBatch,
    err: &StoreError,
) -> (&'static str, String) {
    let refusal = err.refusal();
    let culprit = match store.find_refused(slot, batch).await {
        Ok(Some((i, _))) => {
            let c = &batch.changes[i];
            let mut id: String = c.entity_id.chars().take(LOGGED_ID_CHARS).collect();
            if id.len() < c.entity_id.len() {
                id.push_str(&format!("... ({} bytes)", c.entity_id.len()));
            }
            format!(
                "a change to table {} (entity {}, id {id}, source commit {})",
                c.table, c.entity, c.commit_lsn
            )
        }
        Ok(None) | Err(_) => {
            let mut tables: Vec<&str> = batch.changes.iter().map(|c| &*c.table).collect();
            tables.sort_unstable();
            tables.dedup();
            format!("a batch of changes to tables {}", tables.join(", "))
        }
    };
    (
        refusal.kind,
        format!(
            "the store refuses {culprit}: {}. Fix: {}; walhook retries it (backoff up to {} s) and confirms nothing past it until then",
            refusal.what,
            refusal.fix,
            MAX_REFUSED_BACKOFF.as_secs()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::stream::Position;

    fn change() -> SourceMsg {
        SourceMsg::Change {
            events: Vec::new(),
            position: Position::default(),
            held: None,
        }
    }

    fn commit(lsn: u64) -> SourceMsg {
        SourceMsg::Commit {
            events: Vec::new(),
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
