//! `ReplicationStream`: a pgoutput stream from one slot that answers keepalives, sends
//! standby status updates, reconnects with backoff, and never hands on a change twice
//! or skips one across reconnects (it resumes at `(commit LSN, rows handed on)`).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::Lsn;
use super::SourceError;
use super::client::{ClientError, ReplicationClient, ReplicationMessage};
use super::decoder::{Decoded, Decoder, JsonRows};
use super::pgoutput;
use super::setup::{create_slot, slot_error};
use crate::pg::ErrorChain;
use crate::pg::{ConnInfo, quote_ident, quote_literal};

/// Standby status updates go out at least this often (DESIGN: every 10 s at most).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// A consumer's confirmation is passed on at most this often, unless the server waits
/// for it.
const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// How long the server may wait for a confirmation it asked for (its reply request
/// carried a WAL end the consumer has not yet made durable) before the stream closes
/// the connection instead of answering again (G9). A stopping walsender asks again as
/// soon as it is answered and exits only once the client confirmed all it sent: a
/// client that keeps answering without confirming holds `pg_ctl stop` up for ever.
/// A healthy consumer confirms within milliseconds; one whose store is unreachable
/// never does, and the server should not wait for it.
const OWED_GRACE: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The replication connection's state, for readiness (see [`ReplicationStream::link`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Not connected: connecting for the first time, or reconnecting after a loss.
    Connecting,
    /// Waiting because another process holds the slot (G8).
    StandingBy,
    /// Streaming from the slot.
    Streaming,
    /// Closed on purpose because the consumer cannot take or store more (G9); it
    /// connects again after a pause.
    Paused,
}

/// How the stream reports progress to the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmMode {
    /// Confirm what the consumer passed to [`ReplicationStream::confirm`], and between
    /// transactions, once all of that is confirmed, the server's WAL end (G7).
    Consumer,
    /// Never move `confirmed_flush_lsn`: status updates carry an invalid flush position
    /// (`walhook tail --slot`).
    Never,
}

/// How far a consumer has got: every transaction committed before `commit_lsn` is done,
/// and of the transaction that commits at `commit_lsn`, the first `rows_done` changes
/// (all of them when `complete`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub commit_lsn: Lsn,
    pub rows_done: u64,
    pub complete: bool,
}

/// Where and how to stream.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub slot: String,
    pub publication: String,
    /// A temporary slot, created by the stream on each connection (`walhook tail`).
    pub temporary: bool,
    pub confirm: ConfirmMode,
    pub application_name: String,
    /// Resume after this position (skipping what it covers).
    pub resume: Position,
}

/// A pgoutput stream with reconnects. See the module docs.
pub struct ReplicationStream {
    params: ConnInfo,
    opts: StreamOptions,
    client: Option<ReplicationClient>,
    decoder: Decoder,
    /// The last position handed on (or the resume point).
    handed: Position,
    /// Rows of the current transaction seen so far in this session (handed or skipped).
    rows_in_txn: u64,
    /// Skip the rest of this transaction (already handed on before a reconnect).
    skip_txn: bool,
    in_txn: bool,
    /// The transaction whose Begin was handed on last.
    begun: Option<Lsn>,
    /// End LSN of the last commit handed on.
    handed_end: Lsn,
    /// Size of the pgoutput message of the last item handed on, in bytes.
    last_size: usize,
    /// What the consumer said is durable.
    consumer_flush: Lsn,
    /// Highest WAL position the server told us about.
    received: Lsn,
    last_status: Instant,
    status_dirty: bool,
    /// The server asked for a reply at this WAL end, which could not be confirmed yet;
    /// since when (see [`OWED_GRACE`]).
    owed: Option<(Lsn, Instant)>,
    /// Wait this long before the next connection attempt (after closing on purpose).
    pause: Option<Duration>,
    /// What the consumer has made durable, watched while waiting for the server.
    confirmations: Option<watch::Receiver<Lsn>>,
    backoff: Duration,
    link: watch::Sender<Link>,
    /// Hand on, marked as replayed, the rows of the resume transaction that the
    /// resume position covers: set from a partial resume position, until its commit
    /// or the first reconnect (whose consumer has them already).
    replay_rows: bool,
    /// The last item handed on was such a replayed row.
    last_replayed: bool,
    /// `connect` ran before in this stream's life.
    connected_once: bool,
}

impl ReplicationStream {
    /// Prepares a stream; it connects on the first call to [`next`](Self::next).
    pub fn new(params: ConnInfo, opts: StreamOptions) -> Self {
        ReplicationStream {
            params,
            handed: opts.resume,
            opts,
            client: None,
            decoder: Decoder::new(),
            rows_in_txn: 0,
            skip_txn: false,
            in_txn: false,
            begun: None,
            handed_end: Lsn::INVALID,
            last_size: 0,
            consumer_flush: Lsn::INVALID,
            received: Lsn::INVALID,
            last_status: Instant::now(),
            status_dirty: false,
            owed: None,
            pause: None,
            confirmations: None,
            backoff: Duration::from_millis(100),
            link: watch::Sender::new(Link::Connecting),
            replay_rows: false,
            last_replayed: false,
            connected_once: false,
        }
    }

    /// Writes the new rows of `rows`' tables as JSON text from the next change on
    /// ([`JsonRows`]), in this session and the next.
    pub fn set_json_rows(&mut self, rows: JsonRows) {
        self.decoder.set_json_rows(rows);
    }

    /// From now on until the resume transaction commits (or the stream reconnects),
    /// also hand on the row changes of the resume transaction that the resume position
    /// covers, each marked by [`replayed`](Self::replayed): a consumer whose state
    /// depends on a transaction's earlier rows (bulk events) rebuilds it from them
    /// after a restart in the middle of a transaction. Call before the first `next`.
    pub fn replay_covered_rows(&mut self) {
        self.replay_rows = !self.handed.complete && self.handed.rows_done > 0;
    }

    /// Whether the last item handed on is a row change the resume position covers
    /// (see [`replay_covered_rows`](Self::replay_covered_rows)): its events are stored
    /// already, and the position does not move past it.
    pub fn replayed(&self) -> bool {
        self.last_replayed
    }

    /// Follows the consumer's confirmations (the end LSN of the last transaction it made
    /// durable) from `rx`, also while waiting for the server: an idle stream passes a
    /// confirmation on within a second, and at once when the server waits for it.
    pub fn follow_confirmations(&mut self, mut rx: watch::Receiver<Lsn>) {
        let lsn = *rx.borrow_and_update();
        self.confirm(lsn);
        self.confirmations = Some(rx);
    }

    /// Connects now (so that setup errors surface before the first change).
    pub async fn connect(&mut self) -> Result<(), SourceError> {
        if self.client.is_some() {
            return Ok(());
        }
        let mut client = ReplicationClient::connect(&self.params, &self.opts.application_name)
            .await
            .map_err(SourceError::Replication)?;
        // IDENTIFY_SYSTEM: which cluster and timeline this is (logged; a failover
        // shows up as a new timeline).
        let ident = client
            .simple_query("IDENTIFY_SYSTEM")
            .await
            .map_err(SourceError::Replication)?;
        if let Some(row) = ident.first() {
            let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            tracing::debug!(systemid = %field(0), timeline = %field(1), xlogpos = %field(2), "identified the server");
        }
        if self.opts.temporary {
            create_slot(&mut client, &self.opts.slot, true).await?;
        }
        let start = Lsn::INVALID;
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (\"proto_version\" '1', \"publication_names\" {}, \"messages\" 'true')",
            quote_ident(&self.opts.slot),
            start,
            quote_literal(&quote_ident(&self.opts.publication)),
        );
        client
            .start_replication(&command)
            .await
            .map_err(|e| slot_error(&self.opts.slot, e))?;
        if self.connected_once {
            // The consumer has every row handed on before this reconnect.
            self.replay_rows = false;
        }
        self.connected_once = true;
        self.decoder = self.decoder.fresh();
        self.in_txn = false;
        self.skip_txn = false;
        self.rows_in_txn = 0;
        self.owed = None;
        self.client = Some(client);
        self.last_status = Instant::now();
        self.link.send_replace(Link::Streaming);
        Ok(())
    }

    /// Connects, waiting (with backoff) while the slot is active in another process or
    /// the server is unreachable: a standby instance sits here until the holder goes (G8).
    pub async fn connect_waiting(&mut self) -> Result<(), SourceError> {
        let mut standing_by = false;
        loop {
            match self.connect().await {
                Ok(()) => {
                    self.backoff = Duration::from_millis(100);
                    if standing_by {
                        tracing::info!(slot = %self.opts.slot, "the slot is free; taking over");
                    }
                    return Ok(());
                }
                Err(SourceError::SlotActive { pid, .. }) => {
                    self.link.send_replace(Link::StandingBy);
                    if !standing_by {
                        tracing::info!(slot = %self.opts.slot, holder_pid = pid, "slot held by another process; standing by");
                        standing_by = true;
                    }
                }
                Err(SourceError::Replication(e)) if e.is_transient() => {
                    self.link.send_replace(Link::Connecting);
                    warn!(slot = %self.opts.slot, error = %ErrorChain(&e), "cannot start replication yet; retrying");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(self.backoff).await;
            self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Skips everything at or before `position` (the store's checkpoint). Call before
    /// reading the first item.
    pub fn resume_from(&mut self, position: Position) {
        self.handed = position;
    }

    /// Closes the replication connection on purpose (the consumer cannot take more and
    /// the server should not wait for it, G9); the next [`next`](Self::next) connects
    /// again after a pause and resumes after what was handed on.
    pub async fn disconnect(&mut self, why: &'static str) {
        if let Some(client) = self.client.take() {
            warn!(slot = %self.opts.slot, reason = why, "closing the replication connection; it reconnects and resumes after what was handed on");
            client.close().await;
            self.link.send_replace(Link::Paused);
            self.pause = Some(self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Whether the replication connection is open.
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// The consumer has made everything up to `end_lsn` durable; the slot may confirm it.
    pub fn confirm(&mut self, end_lsn: Lsn) {
        if end_lsn > self.consumer_flush {
            self.consumer_flush = end_lsn;
            self.status_dirty = true;
        }
    }

    /// Follows the connection's state: connecting, standing by or streaming.
    pub fn link(&self) -> watch::Receiver<Link> {
        self.link.subscribe()
    }

    /// Size of the pgoutput message the last item was decoded from, in bytes (a row
    /// change's size on the wire).
    pub fn last_size(&self) -> usize {
        self.last_size
    }

    /// The position after the last item handed on.
    pub fn position(&self) -> Position {
        self.handed
    }

    /// Highest WAL position received from the server.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// The next decoded item. Transient failures (connection lost, server restarting)
    /// are retried with backoff inside. A slot found in use by another process on
    /// reconnecting is returned as [`SourceError::SlotActive`]: another instance may lead
    /// now, and the caller stands by (G8). Any other error needs an operator.
    pub async fn next(&mut self) -> Result<Decoded, SourceError> {
        loop {
            match self.next_once().await {
                Ok(Some(item)) => return Ok(item),
                Ok(None) => {}
                Err(SourceError::Replication(e)) if e.is_transient() => {
                    self.reconnect_after(&e).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn reconnect_after(&mut self, err: &ClientError) {
        warn!(slot = %self.opts.slot, error = %ErrorChain(err), backoff_ms = self.backoff.as_millis() as u64, "replication connection lost; reconnecting");
        if let Some(client) = self.client.take() {
            drop(client);
        }
        self.link.send_replace(Link::Connecting);
        if self.opts.temporary {
            warn!(slot = %self.opts.slot, "the temporary slot went with the connection; changes made while disconnected are not shown");
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    async fn next_once(&mut self) -> Result<Option<Decoded>, SourceError> {
        if self.client.is_none() {
            if let Some(pause) = self.pause.take() {
                tokio::time::sleep(pause).await;
            }
            self.connect().await?;
            info!(slot = %self.opts.slot, "streaming");
        }
        if self.status_due() {
            self.send_status(false).await?;
        }
        let deadline = self.last_status + STATUS_INTERVAL;
        let owed_until = self.owed.map(|(_, since)| since + OWED_GRACE);
        let client = self.client.as_mut().expect("connected above");
        let confirmations = &mut self.confirmations;
        let msg = tokio::select! {
            biased;
            // The consumer made more durable: pass it on (at once if the server waits).
            Some(lsn) = next_confirmation(confirmations) => {
                self.confirm(lsn);
                if self.owed.is_some() || self.status_due() {
                    self.send_status(false).await?;
                }
                return Ok(None);
            }
            // The server has waited too long for a confirmation: stop answering it.
            _ = sleep_until_opt(owed_until), if owed_until.is_some() => {
                self.disconnect("the server waits for a confirmation of changes not yet stored").await;
                return Ok(None);
            }
            msg = client.next_message() => msg.map_err(SourceError::Replication)?,
            _ = tokio::time::sleep_until(deadline.into()) => {
                self.send_status(false).await?;
                return Ok(None);
            }
        };
        self.backoff = Duration::from_millis(100);
        match msg {
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.note_received(wal_end);
                if reply_requested {
                    self.send_status(false).await?;
                    // Outside a transaction everything received can be confirmed once
                    // it is durable; until then the server waits (see OWED_GRACE). In
                    // the middle of a transaction it cannot, and the server's request
                    // is only a timeout check.
                    if self.opts.confirm == ConfirmMode::Consumer
                        && !self.in_txn
                        && self.flush_position() < wal_end
                        && self.owed.is_none()
                    {
                        self.owed = Some((wal_end, Instant::now()));
                    }
                }
                Ok(None)
            }
            ReplicationMessage::XLogData { wal_end, data, .. } => {
                self.note_received(wal_end);
                self.last_size = data.len();
                let message = pgoutput::parse(data)?;
                let Some(decoded) = self.decoder.decode(message)? else {
                    return Ok(None);
                };
                Ok(self.filter(decoded))
            }
        }
    }

    fn note_received(&mut self, lsn: Lsn) {
        if lsn > self.received {
            self.received = lsn;
            if !self.in_txn {
                self.status_dirty = true;
            }
        }
    }

    /// Applies the resume position: drops what was handed on before a reconnect.
    fn filter(&mut self, decoded: Decoded) -> Option<Decoded> {
        match &decoded {
            Decoded::Begin { final_lsn, .. } => {
                self.in_txn = true;
                self.rows_in_txn = 0;
                let h = self.handed;
                self.skip_txn =
                    *final_lsn < h.commit_lsn || (*final_lsn == h.commit_lsn && h.complete);
                if self.skip_txn {
                    return None;
                }
                if *final_lsn != h.commit_lsn {
                    self.handed = Position {
                        commit_lsn: *final_lsn,
                        rows_done: 0,
                        complete: false,
                    };
                }
                if self.begun == Some(*final_lsn) {
                    // Replayed after a reconnect: the consumer already has this Begin.
                    return None;
                }
                self.begun = Some(*final_lsn);
                Some(decoded)
            }
            Decoded::Change(_) | Decoded::Truncate { .. } | Decoded::LogicalMessage { .. } => {
                if !self.in_txn {
                    // A non-transactional logical message.
                    return Some(decoded);
                }
                if self.skip_txn {
                    return None;
                }
                self.rows_in_txn += 1;
                self.last_replayed = false;
                if self.rows_in_txn <= self.handed.rows_done {
                    if self.replay_rows && matches!(decoded, Decoded::Change(_)) {
                        self.last_replayed = true;
                        return Some(decoded);
                    }
                    return None;
                }
                self.handed.rows_done = self.rows_in_txn;
                Some(decoded)
            }
            Decoded::Commit { end_lsn, .. } => {
                self.in_txn = false;
                self.replay_rows = false;
                self.last_replayed = false;
                if self.skip_txn {
                    self.skip_txn = false;
                    return None;
                }
                self.handed.complete = true;
                self.handed_end = *end_lsn;
                Some(decoded)
            }
        }
    }

    fn status_due(&self) -> bool {
        self.status_dirty && self.last_status.elapsed() >= STATUS_MIN_INTERVAL
    }

    fn flush_position(&self) -> Lsn {
        match self.opts.confirm {
            ConfirmMode::Never => Lsn::INVALID,
            ConfirmMode::Consumer => {
                // Between transactions, once everything handed on is durable, nothing
                // received so far is still owed: the server's WAL end may be confirmed (G7).
                if !self.in_txn && self.consumer_flush >= self.handed_end {
                    self.consumer_flush.max(self.received)
                } else {
                    self.consumer_flush
                }
            }
        }
    }

    async fn send_status(&mut self, reply: bool) -> Result<(), SourceError> {
        let flush = self.flush_position();
        tracing::debug!(slot = %self.opts.slot, %flush, received = %self.received, in_txn = self.in_txn, "standby status update");
        let (write, apply) = match self.opts.confirm {
            ConfirmMode::Never => (self.received, Lsn::INVALID),
            ConfirmMode::Consumer => (self.received, flush),
        };
        if let Some(client) = self.client.as_mut() {
            client
                .send_status(write, flush, apply, reply)
                .await
                .map_err(SourceError::Replication)?;
        }
        self.last_status = Instant::now();
        self.status_dirty = false;
        if self.owed.is_some_and(|(lsn, _)| flush >= lsn) {
            self.owed = None;
        }
        Ok(())
    }

    /// Sends a final status update (so the slot records the last confirmed position)
    /// and closes the connection.
    pub async fn close(mut self) {
        if let Some(rx) = self.confirmations.as_mut() {
            let lsn = *rx.borrow_and_update();
            self.confirm(lsn);
        }
        let _ = self.send_status(false).await;
        if let Some(client) = self.client.take() {
            client.close().await;
        }
    }
}

/// The consumer's next confirmation; pending for ever when there is no consumer to
/// follow or it is gone.
async fn next_confirmation(rx: &mut Option<watch::Receiver<Lsn>>) -> Option<Lsn> {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return Some(*rx.borrow_and_update());
    }
    std::future::pending().await
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
