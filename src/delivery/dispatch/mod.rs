//! The dispatcher of one subscription: holds the subscription's lease in the store (one
//! instance at a time sends its deliveries), sends due retries and new events past its
//! cursor, keeps per-entity order (G5) and records what needs another attempt (G4).
//!
//! What to send, what to record and where the cursor may go is decided by
//! [`machine::Machine`], which does no I/O and has the unit tests. This module is the
//! loop around it: one coordinator task fetches events from the log (while earlier ones
//! are still in flight), hands attempts to worker tasks (at most `max_in_flight` at
//! once; see [`workers`]), hands their answers to the machine in batches and writes
//! what it settles.
//!
//! An event is attempted from one source at a time: an event with a retry row is never
//! fetched as new (the store skips it), and a due retry row of an event this session
//! fetched as new and has not settled is left for later. Retry rows are taken oldest
//! first per entity.
//!
//! The lease (G8): every write of delivery state is fenced by it in the store, and a
//! dispatcher whose write or renewal finds the lease gone stops at once, abandoning what
//! is in flight (the new holder starts from the stored cursor and retry rows). No
//! attempt starts once the lease may have run out by this process's clock (after a
//! stall or a SIGSTOP longer than the lease): the lease is renewed first, and an attempt
//! task that was delayed past that moment sends nothing.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::machine::{Answer, Machine, Row, Sent};
use self::workers::{Shared, Workers};
use super::measure::AttemptMetrics;
use super::{Decision, HttpClients, Target, body, decide, request_headers};
use crate::config::{Ordering, SubscriptionConfig};
use crate::routing::{Envelope, EventSource, Router};
use crate::source::decoder::TableName;
use crate::store::deliveries::{DueEvent, NewEvents, RawJson, StoredBatch, SubscriptionLease};
use crate::store::wake::Wake;
use crate::store::{Store, StoreError};

/// How long a lease lasts without renewal; another instance takes over after it.
const LEASE_SECONDS: f64 = 10.0;
/// No attempt starts later than this before the lease would run out, counted from when
/// the renewal was sent (the server counts from a later moment): room for the time
/// between an attempt's last check and its request leaving the process.
const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// How often the lease is renewed (and pause or disable by an operator noticed).
const RENEW: Duration = Duration::from_secs(1);
/// Events fetched from the log, or retry rows taken, per query.
const BATCH: i64 = 500;
/// Positions of the log read per query at most (events due to other subscriptions
/// included): bounds the cost of one query whatever plan it gets. A query reads
/// [`BATCH`] positions while most events are due to the subscription, and a wider window
/// while few are (see [`next_window`]): the server reads and sorts the whole window
/// before the limit applies, so a window ten times the batch cost ten times as much.
const WINDOW_MAX: i64 = 5_000;
/// How often a dispatcher looks for work without being woken (retries coming due,
/// events written by a process whose notification was lost).
const POLL: Duration = Duration::from_millis(250);

mod machine;
mod workers;

/// Dispatchers started by this process so far: each one's lease owner is unique.
static DISPATCHERS: AtomicU64 = AtomicU64::new(0);

/// Runs the dispatcher of `sub` until `shutdown`; `instance` is this process's instance
/// id (its lease owner is that id and a serial of its own, so that a dispatcher of this
/// process still stopping, or aborted with a write on its way, is fenced out too).
pub async fn run(
    sub: SubscriptionConfig,
    store: Store,
    clients: Arc<HttpClients>,
    instance: String,
    wake: Arc<Wake>,
    shutdown: CancellationToken,
) {
    let sub = Arc::new(sub);
    let serial = DISPATCHERS.fetch_add(1, AtomicOrdering::Relaxed);
    let mut d = Dispatcher {
        outbound: Arc::new(Outbound {
            router: Router::new(std::slice::from_ref(&*sub)),
            metrics: AttemptMetrics::new(sub.name.as_str()),
            target: Target::new(sub.url.expose()),
        }),
        ordered: sub.ordering == Ordering::Entity,
        sub,
        clients,
        store,
        wake: wake.clone(),
        live_from: i64::MAX,
        window: BATCH,
        reader: None,
        owner: format!("{instance}/{serial}"),
        leased: false,
        valid_until: Instant::now(),
    };
    let mut woken = wake.subscribe();
    while !shutdown.is_cancelled() {
        if let Err(e) = d.session(&mut woken, &shutdown).await {
            warn!(subscription = %d.sub.name, error = %crate::pg::ErrorChain(&e), "dispatching failed; retrying");
            if d.store.is_closed() {
                let _ = d.store.reconnect().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = woken.changed() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
    if d.leased {
        let _ = d
            .store
            .release_subscription(d.sub.name.as_str(), &d.owner)
            .await;
    }
}

/// A finished attempt.
type Done = Answer;

/// A finished query of new events, and the connection it ran on.
type Fetched = (Store, Result<NewEvents, StoreError>);

/// What every attempt of a subscription uses, built once.
struct Outbound {
    /// Applies the subscription's filter.
    router: Router,
    metrics: AttemptMetrics,
    /// Where requests go.
    target: Target,
}

struct Dispatcher {
    sub: Arc<SubscriptionConfig>,
    outbound: Arc<Outbound>,
    clients: Arc<HttpClients>,
    store: Store,
    /// Bumped on new events; holds the newest this process ingested.
    wake: Arc<Wake>,
    /// New events are taken from the live log only past this one.
    live_from: i64,
    /// Positions of the log the next query of new events reads.
    window: i64,
    /// The second store connection, which reads new events while the first records
    /// answers; opened when first needed.
    reader: Option<Store>,
    /// This dispatcher's lease owner: the instance id and a serial.
    owner: String,
    ordered: bool,
    leased: bool,
    /// No attempt starts at or after this moment without a renewal first.
    valid_until: Instant,
}

impl Dispatcher {
    fn name(&self) -> &str {
        self.sub.name.as_str()
    }

    /// Takes the lease and dispatches until the subscription stops or shutdown, then
    /// lets what is in flight finish and records it; or until the lease is lost, then
    /// stops at once.
    async fn session(
        &mut self,
        woken: &mut watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let Some(lease) = self.lease().await? else {
            return Ok(());
        };
        if !lease.enabled || lease.paused {
            return Ok(());
        }
        // New events with a retry row (left by an earlier session or instance, or an
        // operator's replay) must come from the store, which skips them.
        self.live_from = self.store.newest_retry_row(self.name()).await?;
        let mut m = Machine::new(lease.cursor, self.ordered, Instant::now());
        let mut workers = Workers::new(Shared {
            sub: self.sub.clone(),
            clients: self.clients.clone(),
            outbound: self.outbound.clone(),
        });
        match self.dispatch(&mut m, &mut workers, woken, shutdown).await {
            Err(StoreError::LeaseLost { .. }) => {
                // Nothing more is written; what is in flight is abandoned (its results
                // could not be recorded), and the new holder sends it again.
                info!(subscription = %self.name(), abandoned = workers.in_flight(), "lost the lease to another instance; stopped dispatching");
                self.leased = false;
                workers.abort();
                Ok(())
            }
            other => other,
        }
    }

    /// The session's work once the lease is held.
    async fn dispatch(
        &mut self,
        m: &mut Machine,
        workers: &mut Workers,
        woken: &mut watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        self.pump(m, workers, woken, shutdown).await?;
        m.stop();
        while let Some(done) = workers.next().await {
            self.settle(m, vec![done]).await?;
        }
        self.write_cursor(m, true).await
    }

    /// Takes or renews the lease; `None` when another instance holds it.
    async fn lease(&mut self) -> Result<Option<SubscriptionLease>, StoreError> {
        let name = self.sub.name.as_str();
        let asked = Instant::now();
        let Some(lease) = self
            .store
            .lease_subscription(name, &self.owner, LEASE_SECONDS)
            .await?
        else {
            if self.leased {
                info!(subscription = %name, "another instance dispatches this subscription now");
            }
            self.leased = false;
            return Ok(None);
        };
        self.valid_until = asked + Duration::from_secs_f64(LEASE_SECONDS) - LEASE_MARGIN;
        if !self.leased {
            info!(subscription = %name, owner = %self.owner, "dispatching this subscription");
            self.leased = true;
        }
        Ok(Some(lease))
    }

    /// Renews the lease within a session: `Ok(true)` to go on, `Ok(false)` when the
    /// subscription was paused or disabled, `LeaseLost` when another instance holds it.
    async fn renew(&mut self) -> Result<bool, StoreError> {
        match self.lease().await? {
            Some(lease) => Ok(lease.enabled && !lease.paused),
            None => Err(StoreError::LeaseLost {
                subscription: self.name().to_owned(),
            }),
        }
    }

    /// The loop around the machine: fetches what it asks for, starts its attempts,
    /// feeds it their answers, writes what it settles, and keeps the lease.
    async fn pump(
        &mut self,
        m: &mut Machine,
        workers: &mut Workers,
        woken: &mut watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let limit = self.sub.max_in_flight.max(1) as usize;
        // The query of new events on its way, if any (aborted when the session ends).
        let mut fetching: JoinSet<Fetched> = JoinSet::new();
        let mut renew_at = Instant::now() + RENEW;
        let mut poll_at = Instant::now() + POLL;
        loop {
            // Renewal comes first: it is due, the lease may have run out during a stall
            // (no attempt may start then), or an attempt task found it may have.
            let now = Instant::now();
            let lapsed = m.take_lapsed();
            if now >= renew_at || now >= self.valid_until || lapsed {
                renew_at = now + RENEW;
                if !self.renew().await? {
                    return Ok(());
                }
                if lapsed {
                    // The lapsed events are unsettled, past the cursor: the next
                    // session fetches them again.
                    info!(subscription = %self.name(), "the lease was renewed late; starting the session again");
                    return Ok(());
                }
            }
            if m.wants_retries() {
                let (retries, full) = self
                    .store
                    .due_retries(self.name(), self.ordered, BATCH, retry_batches(&self.sub))
                    .await?;
                m.retries_fetched(retries, full);
            }
            if let Some(after) = m.wants_new() {
                m.fetch_started();
                // The newest events are in memory when this process ingested them.
                let live = (after >= self.live_from)
                    .then(|| self.wake.live().read(self.name(), after, BATCH as usize))
                    .flatten();
                match live {
                    // As the store reads nothing for a paused or disabled subscription
                    // (the lease renewal notices only within a second).
                    Some(_) if !self.store.subscription_active(self.name()).await? => {
                        let none = NewEvents {
                            events: Vec::new(),
                            read_upto: after,
                            more: false,
                        };
                        self.take_new(m, none).await?;
                    }
                    Some(new) => self.take_new(m, new).await?,
                    // From the store, on the reading connection: answers are settled
                    // and attempts started meanwhile.
                    None => {
                        let reader = match self.reader.take() {
                            Some(reader) if !reader.is_closed() => reader,
                            _ => self.store.connect_another().await?,
                        };
                        self.fetch(&mut fetching, reader, after);
                    }
                }
            }
            let batch = self.sub.batch_size.max(1) as usize;
            while let Some(events) = m.next_start(limit, batch) {
                workers.start(events, self.valid_until);
            }
            self.write_cursor(m, false).await?;
            if m.is_stopping() {
                return Ok(());
            }

            let tick = [Some(renew_at), Some(poll_at), m.cursor_deadline()]
                .into_iter()
                .flatten()
                .chain([self.valid_until])
                .min()
                .expect("at least one deadline");
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(first) = workers.next(), if workers.in_flight() > 0 => {
                    let mut done = vec![first];
                    while let Some(next) = workers.try_next() {
                        done.push(next);
                    }
                    self.settle(m, done).await?;
                }
                Some(joined) = fetching.join_next(), if !fetching.is_empty() => {
                    let (reader, new) = joined.unwrap_or_else(|e| match e.try_into_panic() {
                        Ok(panic) => std::panic::resume_unwind(panic),
                        Err(e) => panic!("the query of new events ended early: {e}"),
                    });
                    let new = new?;
                    self.window = next_window(self.window, new.events.len(), new.more);
                    // The next query goes out before these are taken (the log has more
                    // and they leave room): one query is always on its way.
                    match m.room_after(&new) {
                        Some(after) => self.fetch(&mut fetching, reader, after),
                        None => self.reader = Some(reader),
                    }
                    let again = !fetching.is_empty();
                    self.take_new(m, new).await?;
                    if again {
                        m.fetch_started();
                    }
                }
                Ok(()) = woken.changed() => m.woken(),
                _ = tokio::time::sleep_until(tick) => {
                    if Instant::now() >= poll_at {
                        poll_at = Instant::now() + POLL;
                        m.poll();
                    }
                }
            }
        }
    }

    /// Sends a query of new events past `after` on the reading connection.
    fn fetch(&self, fetching: &mut JoinSet<Fetched>, reader: Store, after: i64) {
        let (name, window) = (self.sub.name.clone(), self.window);
        fetching.spawn(async move {
            let new = reader.new_events(name.as_str(), after, BATCH, window).await;
            (reader, new)
        });
    }

    /// Hands fetched new events to the machine, after asking the store which of their
    /// entities wait behind a retry row, and queues those.
    async fn take_new(&self, m: &mut Machine, new: NewEvents) -> Result<(), StoreError> {
        let entities = m.unchained(&new.events);
        let blocked = self.store.blocked_entities(self.name(), &entities).await?;
        let queued = m.new_fetched(new, &blocked);
        self.queue_behind(&queued).await
    }

    /// Hands finished attempts to the machine and writes what it settles (one
    /// statement for the rows).
    async fn settle(&mut self, m: &mut Machine, done: Vec<Done>) -> Result<(), StoreError> {
        let name = self.sub.name.as_str();
        for answer in &done {
            log_answer(name, answer);
        }
        let settled = m.answered(done, SystemTime::now());
        let owner = self.owner.as_str();
        if let Some(reason) = &settled.disable {
            self.store.disable_subscription(name, owner, reason).await?;
            warn!(subscription = %name, "receiver answered 410 Gone: subscription disabled until resumed");
        }
        let rows: Vec<_> = settled.rows.iter().map(Row::record).collect();
        let batches: Vec<&StoredBatch> = settled.batches.iter().map(|b| &**b).collect();
        self.store
            .record_attempts(name, owner, &rows, &batches)
            .await?;
        self.store
            .forget_pending(name, owner, &settled.forget)
            .await?;
        self.queue_behind(&settled.queue_behind).await
    }

    /// Queues `events` behind their entity's pending delivery.
    async fn queue_behind(&self, events: &[DueEvent]) -> Result<(), StoreError> {
        let events: Vec<&DueEvent> = events.iter().collect();
        self.store
            .queue_behind(self.name(), &self.owner, &events)
            .await
    }

    /// Moves the stored cursor up to the settled events when the machine says it is
    /// due (`force`: whatever has settled).
    async fn write_cursor(&mut self, m: &mut Machine, force: bool) -> Result<(), StoreError> {
        let Some(upto) = m.cursor_due(Instant::now(), force) else {
            return Ok(());
        };
        self.store
            .advance_cursor(self.name(), &self.owner, upto, true)
            .await?;
        m.cursor_written(upto, Instant::now());
        Ok(())
    }
}

/// The window of the next query of new events, after one over `window` positions gave
/// `found` events and `more` of the log lies past it: the batch while the log is dense
/// with the subscription's events (or was read to its head), doubling up to
/// [`WINDOW_MAX`] while it is sparse.
fn next_window(window: i64, found: usize, more: bool) -> i64 {
    if !more || found as i64 >= BATCH / 2 {
        BATCH
    } else {
        (window * 2).min(WINDOW_MAX)
    }
}

/// Stored batches taken per query of due retries: about [`BATCH`] events' bodies.
fn retry_batches(sub: &SubscriptionConfig) -> usize {
    (BATCH as usize / sub.batch_size.max(1) as usize).max(1)
}

/// Logs what an operator should hear of an answer (never a body or a URL).
fn log_answer(subscription: &str, answer: &Answer) {
    let batch = answer
        .batch
        .as_ref()
        .or_else(|| answer.events.first().and_then(|(e, _)| e.batch.as_ref()))
        .map(|b| b.id.as_str());
    for (event, sent) in &answer.events {
        match sent {
            Sent::Unsendable(error) => {
                warn!(subscription = %subscription, event = %event.id, error = %error, "cannot build the request; the delivery is dead");
            }
            Sent::Attempted(attempt, decision) => {
                if let Some(location) = &attempt.location {
                    warn!(subscription = %subscription, event = %event.id, batch = ?batch, location = %location, "receiver redirected; redirects are not followed");
                }
                if matches!(
                    decision,
                    Decision::Dead { .. } | Decision::DeadAndDisable { .. }
                ) {
                    warn!(subscription = %subscription, event = %event.id, batch = ?batch, attempts = event.attempts + 1, "delivery is dead");
                }
            }
            Sent::Lapsed | Sent::Filtered => {}
        }
        if batch.is_some() && matches!(sent, Sent::Attempted(..)) {
            // One line per request is enough for a batch.
            break;
        }
    }
}

/// What to send for a request: the `webhook-id`, the body and its content type.
struct Request {
    /// `webhook-id`: the event's id (shared with the event), or a batch's.
    id: Arc<str>,
    body: Bytes,
    content_type: Cow<'static, str>,
}

/// One HTTP request for `events` (one due retry row, or up to `batch_size` new
/// events), leaving out those the subscription's filter rejects or whose body does
/// not render. A stored batch is sent again as stored.
///
/// Its `delivery` span is at debug level, like the `attempt` line it frames: a span
/// enabled at the default level (info) is built for every request (its fields
/// formatted, a registry slot taken) and cost 2.4 µs of 28 per event dispatched.
#[tracing::instrument(name = "delivery", level = "debug", skip_all, fields(event = %events[0].id, events = events.len(), attempt = events[0].attempts + 1, status = tracing::field::Empty))]
async fn attempt(
    sub: &SubscriptionConfig,
    clients: &HttpClients,
    outbound: &Outbound,
    events: Vec<DueEvent>,
    valid_until: Instant,
) -> Answer {
    let mut out: Vec<(DueEvent, Option<Sent>)> = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    let mut stored = None;
    // The JSON envelope, unfiltered, is written from the stored text (no parse).
    let stored_text = sub.filter.is_none() && body::renders_stored(sub);
    for event in events {
        if let Some(batch) = &event.batch {
            stored = Some(batch.clone());
            out.push((event, None));
            continue;
        }
        let rendered = if stored_text {
            body::render_stored(&event, sub.payload)
        } else {
            let envelope = envelope(&event);
            if sub.filter.is_some() && outbound.router.route(&envelope).subscriptions.is_empty() {
                out.push((event, Some(Sent::Filtered)));
                continue;
            }
            body::render(&envelope, sub)
        };
        match rendered {
            Ok(body) => {
                bodies.push(body);
                out.push((event, None));
            }
            Err(e) => {
                let error = format!("cannot render the body: {}", crate::pg::ErrorChain(&e));
                out.push((event, Some(Sent::Unsendable(error))));
            }
        }
    }
    let mut sending = out.iter().filter(|(_, s)| s.is_none()).map(|(e, _)| e);
    let Some(first) = sending.next() else {
        return finish(out, None, None);
    };
    let several = sending.next().is_some();
    let (request, batch) = match stored {
        Some(batch) => {
            let request = Request {
                id: Arc::from(batch.id.as_str()),
                body: batch.body.clone(),
                content_type: Cow::Owned(batch.content_type.clone()),
            };
            (request, None)
        }
        // With batch_size > 1 every body is an array; one event's keeps its own id, so
        // its retries (which need no stored batch) send the same bytes.
        None if sub.batch_size > 1 => {
            let content_type = Cow::Borrowed(body::batch_content_type(sub.format));
            let body = body::batch(&bodies);
            if several {
                let id = format!("bat_{}", ulid::Ulid::new());
                let batch = Arc::new(StoredBatch {
                    id: id.clone(),
                    content_type: content_type.clone().into_owned(),
                    body: body.clone(),
                });
                (
                    Request {
                        id: Arc::from(id),
                        body,
                        content_type,
                    },
                    Some(batch),
                )
            } else {
                (
                    Request {
                        id: first.id.clone(),
                        body,
                        content_type,
                    },
                    None,
                )
            }
        }
        None => {
            let request = Request {
                id: first.id.clone(),
                body: bodies.pop().expect("one body per event sent"),
                content_type: Cow::Borrowed(body::content_type(sub.format)),
            };
            (request, None)
        }
    };
    // The oldest event sent decides the attempt count and the age (a batch's events
    // share their fate).
    let (attempts, first_due_at, occurred_at) =
        (first.attempts, first.first_due_at, first.occurred_at);
    let count = out.iter().filter(|(_, s)| s.is_none()).count();
    let now = SystemTime::now();
    let timestamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let headers = request_headers(
        sub,
        &request.content_type,
        &request.id,
        timestamp,
        &request.body,
    );
    // The last moment to hold back: after it, the request may be on its way.
    if Instant::now() >= valid_until {
        return finish(out, Some(Sent::Lapsed), None);
    }
    let result = clients
        .for_subscription(sub)
        .post(&outbound.target, headers, request.body, sub.timeout)
        .await;
    // Retry-After and the backoff count from the answer, not from the request: a slow
    // answer must not bring the next attempt forward.
    let answered = SystemTime::now();
    let age = answered.duration_since(first_due_at).unwrap_or_default();
    let decision = decide(
        result.outcome(),
        attempts as u32 + 1,
        age,
        &sub.retry,
        answered,
        fastrand::f64(),
    );
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("status", result.outcome.label().as_ref());
    }
    outbound
        .metrics
        .record(&result, &decision, occurred_at, count as u64);
    debug!(subscription = %sub.name, webhook_id = %request.id, events = count, attempt = attempts + 1, elapsed_ms = result.elapsed.as_millis() as u64, "attempt");
    finish(out, Some(Sent::Attempted(result, decision)), batch)
}

/// The answer of a request: `sent` for every event that was in it.
fn finish(
    events: Vec<(DueEvent, Option<Sent>)>,
    sent: Option<Sent>,
    batch: Option<Arc<StoredBatch>>,
) -> Answer {
    let events = events
        .into_iter()
        .map(|(event, own)| {
            let sent = own
                .or_else(|| sent.clone())
                .expect("every event sent has the request's outcome");
            (event, sent)
        })
        .collect();
    Answer { events, batch }
}

/// The envelope of a stored event, its JSON values parsed.
pub(crate) fn envelope(e: &DueEvent) -> Envelope {
    let (schema, name) = e.table.split_once('.').unwrap_or(("", &e.table));
    // Stored values are objects; anything else (never written) reads as empty.
    let as_row = |v: &RawJson| serde_json::from_str(v.get()).unwrap_or_default();
    Envelope {
        id: e.id.to_string(),
        event_type: e.event_type.to_string(),
        entity: e.entity.clone(),
        entity_id: e.entity_id.to_string(),
        revision: e.revision,
        occurred_at: DateTime::<Utc>::from(e.occurred_at),
        data: as_row(&e.data),
        previous: e.previous.as_ref().map(as_row),
        changed: e.changed.clone(),
        context: e.context.as_ref().map(as_row),
        source: EventSource {
            table: Arc::new(TableName {
                schema: schema.to_owned(),
                name: name.to_owned(),
            }),
            lsn: e.lsn.parse().unwrap_or_default(),
            xid: e.xid as u32,
        },
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::mapping::test_support::config;
    use serde_json::json;

    fn raw(v: serde_json::Value) -> RawJson {
        Arc::from(serde_json::value::to_raw_value(&v).unwrap())
    }

    /// A stored event, as the store reads it back, with or without its optional parts.
    pub(super) fn stored(full: bool) -> DueEvent {
        DueEvent {
            seq: 12,
            id: "evt_01JDXYZ".into(),
            event_type: "user.updated".into(),
            entity: "user".into(),
            entity_id: "42".into(),
            revision: 7,
            occurred_at: UNIX_EPOCH + Duration::from_micros(1_764_133_200_123_456),
            data: raw(
                json!({"id": 42, "email": "a\"b\u{1F600}<>&\n", "n": 1.5, "tags": ["x"], "z": null}),
            ),
            previous: full.then(|| raw(json!({"id": 42, "email": "old"}))),
            changed: full.then(|| vec!["email".to_owned()]),
            table: "public.users".into(),
            lsn: "1A/B374D848".into(),
            xid: 4_000_000_000,
            context: full
                .then(|| raw(json!({"organisation": {"id": 1, "name": "Acme"}, "gone": null}))),
            attempts: 0,
            first_due_at: UNIX_EPOCH,
            batch: None,
        }
    }

    #[test]
    fn the_envelope_from_stored_text_is_the_parsed_envelope_byte_for_byte() {
        for payload in ["full", "thin"] {
            let c = config(&format!(
                "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\npayload = \"{payload}\""
            ));
            let sub = &c.subscriptions[0];
            assert!(body::renders_stored(sub));
            for full in [true, false] {
                let e = stored(full);
                let parsed = body::render(&envelope(&e), sub).unwrap();
                let copied = body::render_stored(&e, sub.payload).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&copied),
                    String::from_utf8_lossy(&parsed),
                    "payload {payload}, optional parts {full}"
                );
            }
        }
        for other in [
            "format = \"cloudevents\"\ncloudevents = { source = \"/x\" }",
            "fields = { id = \"id\" }",
        ] {
            let c = config(&format!(
                "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\n{other}"
            ));
            assert!(!body::renders_stored(&c.subscriptions[0]), "{other}");
        }
    }

    #[test]
    fn the_window_widens_while_the_log_is_sparse_and_narrows_when_dense() {
        // Sparse: 10 of 500 positions were the subscription's; more log lies past.
        assert_eq!(next_window(BATCH, 10, true), 2 * BATCH);
        assert_eq!(next_window(4 * BATCH, 10, true), 8 * BATCH);
        assert_eq!(next_window(WINDOW_MAX, 0, true), WINDOW_MAX);
        // Dense again, or read to the head: back to the batch.
        assert_eq!(next_window(WINDOW_MAX, BATCH as usize, true), BATCH);
        assert_eq!(next_window(WINDOW_MAX, 3, false), BATCH);
    }
}
