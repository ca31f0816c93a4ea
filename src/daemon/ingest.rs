//! The ingest loop: collects source messages into batches (bounded by count and by a few
//! milliseconds), writes each in one store transaction, and only then reports the last
//! committed source transaction's end LSN for confirmation to the slot.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::DaemonError;
use super::source_task::SourceMsg;
use crate::source::Lsn;
use crate::store::{IngestBatch, Store};

/// A batch closes at this many events...
const MAX_BATCH_EVENTS: usize = 5_000;
/// ...or this many source messages (changes without events count too)...
const MAX_BATCH_MESSAGES: usize = 20_000;
/// ...or this long after its first message arrived.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(5);
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

/// Runs until the source closes the channel or `shutdown` is cancelled; the batch in
/// hand is always committed (or the error returned) before returning.
pub async fn run(
    store: &mut Store,
    slot: &str,
    epoch: i64,
    mut rx: mpsc::Receiver<SourceMsg>,
    confirm: watch::Sender<Lsn>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            msg = rx.recv() => match msg {
                Some(m) => m,
                None => return Ok(()),
            },
        };
        let mut batch = IngestBatch::default();
        let mut last_commit = None;
        let mut messages = 0;
        let mut events = add(&mut batch, &mut last_commit, first);
        messages += 1;
        let deadline = Instant::now() + MAX_BATCH_WAIT;
        while events < MAX_BATCH_EVENTS && messages < MAX_BATCH_MESSAGES {
            match rx.try_recv() {
                Ok(msg) => {
                    events += add(&mut batch, &mut last_commit, msg);
                    messages += 1;
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(msg)) => {
                    events += add(&mut batch, &mut last_commit, msg);
                    messages += 1;
                }
                Ok(None) | Err(_) => break,
            }
        }
        commit_with_retry(store, slot, epoch, &batch).await?;
        if let Some(end) = last_commit {
            confirm.send_replace(end);
        }
    }
}

/// Adds a message to the batch; returns how many events it added.
fn add(batch: &mut IngestBatch, last_commit: &mut Option<Lsn>, msg: SourceMsg) -> usize {
    match msg {
        SourceMsg::Change { events, position } => {
            batch.position = position;
            match events {
                Some(events) => {
                    let n = events.events.len();
                    batch.changes.push(events);
                    n
                }
                None => 0,
            }
        }
        SourceMsg::Commit { end_lsn, position } => {
            *last_commit = Some(end_lsn);
            batch.position = position;
            0
        }
    }
}

/// Writes the batch; while the store is unreachable, waits and retries the same batch
/// (nothing is confirmed meanwhile).
async fn commit_with_retry(
    store: &mut Store,
    slot: &str,
    epoch: i64,
    batch: &IngestBatch,
) -> Result<(), DaemonError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        match store.ingest(slot, epoch, batch).await {
            Ok(outcome) => {
                debug!(
                    events = outcome.events,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "batch ingested"
                );
                return Ok(());
            }
            Err(e) if e.is_transient() => {
                warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "store unavailable; retrying the batch");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
                if store.is_closed()
                    && let Err(e) = store.reconnect().await
                {
                    warn!(error = %e, "store reconnect failed");
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}
