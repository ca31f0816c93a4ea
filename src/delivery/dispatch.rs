//! The dispatcher of one subscription: holds the subscription's lease in the store (one
//! instance at a time sends its deliveries), sends due retries and new events past its
//! cursor, keeps per-entity order (G5) and records what needs another attempt (G4).
//!
//! It is a pipeline, not a series of rounds: one coordinator task fetches events from
//! the log (while earlier ones are still in flight), starts attempts as tasks (at most
//! `max_in_flight` at once), records their results in batches, and moves the cursor up
//! to the oldest event not yet settled. An event is settled once it is delivered at its
//! first attempt, filtered out, or has a retry row (retry, dead, or queued behind an
//! earlier delivery of its entity); only settled events are ever behind the cursor, so
//! a crash re-sends at most what was in flight, never skips anything.
//!
//! With `ordering = "entity"`, an entity's fetched events form a chain in memory: the
//! next one starts when the one before it is answered, and when that answer asks for a
//! retry, the rest of the chain is queued behind it as retry rows. An entity that has a
//! pending retry row when its new events are fetched gets them queued behind that row.
//! Retry rows are taken oldest first per entity.
//!
//! An event is attempted from one source at a time: an event with a retry row is never
//! fetched as new (the store skips it), and a due retry row of an event this session
//! fetched as new and has not settled is left for later.
//!
//! The lease (G8): every write of delivery state is fenced by it in the store, and a
//! dispatcher whose write or renewal finds the lease gone stops at once, abandoning what
//! is in flight (the new holder starts from the stored cursor and retry rows). No
//! attempt starts once the lease may have run out by this process's clock (after a
//! stall or a SIGSTOP longer than the lease): the lease is renewed first, and an attempt
//! task that was delayed past that moment sends nothing.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Attempt, AttemptOutcome, Decision, HttpClients, body, decide, request_headers};
use crate::config::{Ordering, SubscriptionConfig};
use crate::routing::{Envelope, EventSource, Router};
use crate::source::decoder::TableName;
use crate::store::deliveries::{AttemptRecord, DueEvent, NewEvents, SubscriptionLease};
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
/// included): bounds the cost of one query whatever plan it gets.
const WINDOW: i64 = 5_000;
/// Fetched events waiting in memory at most (their number, not the backlog's, bounds
/// the memory a dispatcher uses: G6).
const WAITING_MAX: usize = 2_000;
/// How often a dispatcher looks for work without being woken (retries coming due,
/// events written by a process whose notification was lost).
const POLL: Duration = Duration::from_millis(250);
/// How often the cursor is written while events keep being settled.
const CURSOR_EVERY: Duration = Duration::from_millis(50);

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
        router: Arc::new(Router::new(std::slice::from_ref(&*sub))),
        ordered: sub.ordering == Ordering::Entity,
        sub,
        clients,
        store,
        owner: format!("{instance}/{serial}"),
        leased: false,
        valid_until: Instant::now(),
    };
    let mut woken = wake.subscribe();
    while !shutdown.is_cancelled() {
        if let Err(e) = d.session(&mut woken, &shutdown).await {
            warn!(subscription = %d.sub.name, error = %e, "dispatching failed; retrying");
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

/// What an attempt task was sent.
enum Kind {
    /// An event past the cursor, at its first attempt.
    New,
    /// A retry row (retry, replay, or queued behind an earlier delivery).
    Retry,
}

/// A finished attempt task.
struct Done {
    event: DueEvent,
    kind: Kind,
    result: Sent,
}

/// What became of an event handed to an attempt task.
enum Sent {
    /// Nothing was sent: the task started after the lease may have run out.
    Lapsed,
    /// The subscription's filter rejects it: nothing to send.
    Filtered,
    /// No request could be made of it (its body does not render).
    Unsendable(String),
    /// A request was made.
    Attempted(Attempt, Decision),
}

/// What is in flight and waiting, and what the cursor may pass.
struct Pipeline {
    /// The last event fetched from the log.
    fetched_upto: i64,
    /// The cursor as stored.
    cursor: i64,
    /// Fetched events not settled yet.
    unsettled: BTreeSet<i64>,
    /// Events ready to be attempted, in order.
    ready: VecDeque<(DueEvent, Kind)>,
    /// With ordering: entities with an event in flight or ready, and the events queued
    /// behind it in memory.
    chains: HashMap<(String, String), VecDeque<DueEvent>>,
    /// Events waiting in chains.
    chained: usize,
    in_flight: JoinSet<Done>,
    retries_in_flight: usize,
    /// The last retry query filled its batch: look again once those are done.
    more_retries: bool,
    /// No new attempts start (disabled, paused, shutdown).
    stopping: bool,
    /// An attempt task found the lease possibly expired and sent nothing.
    lapsed: bool,
    cursor_written_at: Instant,
}

impl Pipeline {
    fn new(cursor: i64) -> Pipeline {
        Pipeline {
            fetched_upto: cursor,
            cursor,
            unsettled: BTreeSet::new(),
            ready: VecDeque::new(),
            chains: HashMap::new(),
            chained: 0,
            in_flight: JoinSet::new(),
            retries_in_flight: 0,
            more_retries: false,
            stopping: false,
            lapsed: false,
            cursor_written_at: Instant::now(),
        }
    }

    /// Events fetched and not yet started.
    fn waiting(&self) -> usize {
        self.ready.len() + self.chained
    }

    /// Where the cursor may go: just before the oldest unsettled event.
    fn settled_upto(&self) -> i64 {
        self.unsettled
            .first()
            .map_or(self.fetched_upto, |oldest| oldest - 1)
    }

    /// Stops starting attempts; what was waiting stays past the cursor.
    fn stop(&mut self) {
        self.stopping = true;
        let retries = self.ready.iter().filter(|(_, k)| matches!(k, Kind::Retry));
        self.retries_in_flight -= retries.count();
        self.ready.clear();
        self.chains.clear();
        self.chained = 0;
    }
}

struct Dispatcher {
    sub: Arc<SubscriptionConfig>,
    router: Arc<Router>,
    clients: Arc<HttpClients>,
    store: Store,
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
        let mut p = Pipeline::new(lease.cursor);
        match self.dispatch(&mut p, woken, shutdown).await {
            Err(StoreError::LeaseLost { .. }) => {
                // Nothing more is written; what is in flight is abandoned (its results
                // could not be recorded), and the new holder sends it again.
                info!(subscription = %self.name(), abandoned = p.in_flight.len(), "lost the lease to another instance; stopped dispatching");
                self.leased = false;
                p.in_flight.abort_all();
                Ok(())
            }
            other => other,
        }
    }

    /// The session's work once the lease is held.
    async fn dispatch(
        &mut self,
        p: &mut Pipeline,
        woken: &mut watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        self.pump(p, woken, shutdown).await?;
        p.stop();
        while let Some(joined) = p.in_flight.join_next().await {
            let done = joined.expect("delivery task panicked");
            self.settle(p, vec![done]).await?;
        }
        self.write_cursor(p).await
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

    /// The coordinator loop.
    async fn pump(
        &mut self,
        p: &mut Pipeline,
        woken: &mut watch::Receiver<u64>,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let limit = self.sub.max_in_flight.max(1) as usize;
        let (mut want_new, mut want_retries) = (true, true);
        let mut renew_at = Instant::now() + RENEW;
        let mut poll_at = Instant::now() + POLL;
        loop {
            // Renewal comes first: it is due, the lease may have run out during a stall
            // (no attempt may start then), or an attempt task found it may have.
            let now = Instant::now();
            if now >= renew_at || now >= self.valid_until || p.lapsed {
                renew_at = now + RENEW;
                if !self.renew().await? {
                    return Ok(());
                }
                if std::mem::take(&mut p.lapsed) {
                    // The lapsed events are unsettled, past the cursor: the next
                    // session fetches them again.
                    info!(subscription = %self.name(), "the lease was renewed late; starting the session again");
                    return Ok(());
                }
            }
            if !p.stopping {
                if (want_retries || p.more_retries) && p.retries_in_flight == 0 {
                    want_retries = false;
                    self.fetch_retries(p).await?;
                }
                if want_new && p.waiting() < WAITING_MAX {
                    want_new = self.fetch_new(p).await?;
                }
                while p.in_flight.len() < limit {
                    let Some((event, kind)) = p.ready.pop_front() else {
                        break;
                    };
                    self.start(p, event, kind);
                }
            }
            if p.settled_upto() > p.cursor
                && (p.in_flight.is_empty() || p.cursor_written_at.elapsed() >= CURSOR_EVERY)
            {
                self.write_cursor(p).await?;
            }
            if p.stopping {
                return Ok(());
            }

            let flush_at =
                (p.settled_upto() > p.cursor).then(|| p.cursor_written_at + CURSOR_EVERY);
            let tick = [
                Some(renew_at),
                Some(poll_at),
                flush_at,
                Some(self.valid_until),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("at least one deadline");
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(joined) = p.in_flight.join_next(), if !p.in_flight.is_empty() => {
                    let mut done = vec![joined.expect("delivery task panicked")];
                    while let Some(joined) = p.in_flight.try_join_next() {
                        done.push(joined.expect("delivery task panicked"));
                    }
                    self.settle(p, done).await?;
                }
                Ok(()) = woken.changed() => want_new = true,
                _ = tokio::time::sleep_until(tick) => {
                    if Instant::now() >= poll_at {
                        poll_at = Instant::now() + POLL;
                        want_new = true;
                        want_retries = true;
                    }
                }
            }
        }
    }

    /// Takes due retry rows (with ordering, the oldest pending one of each entity whose
    /// chain is not in memory).
    async fn fetch_retries(&mut self, p: &mut Pipeline) -> Result<(), StoreError> {
        let retries = self
            .store
            .due_retries(self.name(), self.ordered, BATCH)
            .await?;
        let mut more = retries.len() as i64 == BATCH;
        // Retries go first, oldest first.
        for event in retries.into_iter().rev() {
            // An event this session fetched as new and has not settled is attempted
            // from there (a retry row can appear for it only by an operator's replay).
            if p.unsettled.contains(&event.seq) {
                more = false;
                continue;
            }
            if self.ordered && p.chains.contains_key(&key(&event)) {
                continue;
            }
            p.retries_in_flight += 1;
            p.ready.push_front((event, Kind::Retry));
        }
        p.more_retries = more;
        Ok(())
    }

    /// Fetches events past the last fetched one; returns whether there may be more.
    async fn fetch_new(&mut self, p: &mut Pipeline) -> Result<bool, StoreError> {
        let NewEvents {
            events,
            read_upto,
            more,
        } = self
            .store
            .new_events(self.name(), p.fetched_upto, BATCH, WINDOW)
            .await?;
        p.fetched_upto = p.fetched_upto.max(read_upto);
        p.unsettled.extend(events.iter().map(|e| e.seq));
        if !self.ordered {
            p.ready.extend(events.into_iter().map(|e| (e, Kind::New)));
            return Ok(more);
        }

        // Entities with a chain in memory get these events appended to it; the others
        // start a chain unless a retry row of theirs is pending in the store.
        let mut order: Vec<(String, String)> = Vec::new();
        let mut groups: HashMap<(String, String), Vec<DueEvent>> = HashMap::new();
        for event in events {
            let k = key(&event);
            if let Some(chain) = p.chains.get_mut(&k) {
                chain.push_back(event);
                p.chained += 1;
                continue;
            }
            let group = groups.entry(k.clone()).or_default();
            if group.is_empty() {
                order.push(k);
            }
            group.push(event);
        }
        let blocked = self.store.blocked_entities(self.name(), &order).await?;
        let mut queued = Vec::new();
        for k in order {
            let group = groups.remove(&k).expect("grouped above");
            if blocked.contains(&k) {
                queued.extend(group);
                continue;
            }
            let mut group = group.into_iter();
            let first = group.next().expect("groups are not empty");
            let rest: VecDeque<DueEvent> = group.collect();
            p.chained += rest.len();
            p.ready.push_back((first, Kind::New));
            p.chains.insert(k, rest);
        }
        self.queue_behind(p, queued).await?;
        Ok(more)
    }

    /// Starts the attempt of `event`.
    fn start(&self, p: &mut Pipeline, event: DueEvent, kind: Kind) {
        let (sub, clients, router) = (self.sub.clone(), self.clients.clone(), self.router.clone());
        let valid_until = self.valid_until;
        p.in_flight.spawn(async move {
            let (event, result) = attempt(&sub, &clients, &router, event, valid_until).await;
            Done {
                event,
                kind,
                result,
            }
        });
    }

    /// Records finished attempts (one statement for those that need a row), moves
    /// chains on, and marks events settled.
    async fn settle(&mut self, p: &mut Pipeline, done: Vec<Done>) -> Result<(), StoreError> {
        let name = self.sub.name.as_str();
        let now = SystemTime::now();
        let mut rows = Vec::new();
        let mut queued = Vec::new();
        let mut forget = Vec::new();
        let mut disabled = None;
        for d in &done {
            let (attempt, decision) = match &d.result {
                Sent::Attempted(attempt, decision) => (attempt, decision),
                Sent::Lapsed => {
                    p.lapsed = true;
                    continue;
                }
                // A pending row the filter rejects (queued behind a retry, or after a
                // reload changed the filter) is not due: it goes, or it would block its
                // entity for ever. A new event it rejects needs no row.
                Sent::Filtered if matches!(d.kind, Kind::Retry) => {
                    forget.push(d.event.seq);
                    continue;
                }
                Sent::Filtered => continue,
                Sent::Unsendable(error) => {
                    warn!(subscription = %name, event = %d.event.id, error = %error, "cannot build the request; the delivery is dead");
                    rows.push((&d.event, dead_row(&d.event, now, error)));
                    continue;
                }
            };
            if let Some(location) = &attempt.location {
                warn!(subscription = %name, event = %d.event.id, location = %location, "receiver redirected; redirects are not followed");
            }
            let (status, next, reason) = match decision {
                // A new event delivered at once needs no row (the cursor says it); a
                // retry row (even one queued with 0 attempts) must leave `pending`.
                Decision::Delivered if matches!(d.kind, Kind::New) => continue,
                Decision::Delivered => ("delivered", now, None),
                Decision::Retry { at, reason } => ("pending", *at, Some(reason.as_str())),
                Decision::Dead { reason } => ("dead", now, Some(reason.as_str())),
                Decision::DeadAndDisable { reason } => {
                    disabled = Some(reason.as_str());
                    ("dead", now, Some(reason.as_str()))
                }
            };
            if status == "dead" {
                warn!(subscription = %name, event = %d.event.id, attempts = d.event.attempts + 1, "delivery is dead");
            }
            rows.push((
                &d.event,
                AttemptRecord {
                    status,
                    attempts: d.event.attempts + 1,
                    next_attempt_at: next,
                    last_status: match &attempt.outcome {
                        AttemptOutcome::Status { code, .. } => Some(i32::from(*code)),
                        _ => None,
                    },
                    last_error: attempt.error.as_deref().or(reason),
                    last_response: Some(attempt.response_head.as_str()).filter(|s| !s.is_empty()),
                },
            ));
        }
        let owner = self.owner.as_str();
        if let Some(reason) = disabled {
            self.store.disable_subscription(name, owner, reason).await?;
            warn!(subscription = %name, "receiver answered 410 Gone: subscription disabled until resumed");
        }
        self.store.record_attempts(name, owner, &rows).await?;
        self.store.forget_pending(name, owner, &forget).await?;
        drop(rows);
        let disabled = disabled.is_some();

        for d in done {
            match d.kind {
                Kind::Retry => p.retries_in_flight -= 1,
                // A lapsed new event stays unsettled; the session starts again.
                Kind::New if matches!(d.result, Sent::Lapsed) => continue,
                Kind::New => {
                    p.unsettled.remove(&d.event.seq);
                }
            }
            if !self.ordered || !matches!(d.kind, Kind::New) {
                continue;
            }
            // The entity's chain: the next event starts, or all of it queues behind a
            // retry.
            let k = key(&d.event);
            let retry = matches!(d.result, Sent::Attempted(_, Decision::Retry { .. }));
            let Some(chain) = p.chains.get_mut(&k) else {
                continue;
            };
            if retry {
                let rest = p.chains.remove(&k).expect("looked up above");
                p.chained -= rest.len();
                queued.extend(rest);
            } else if let Some(next) = chain.pop_front() {
                p.chained -= 1;
                p.ready.push_back((next, Kind::New));
            } else {
                p.chains.remove(&k);
            }
        }
        self.queue_behind(p, queued).await?;
        if disabled {
            p.stop();
        }
        Ok(())
    }

    /// Queues `events` behind their entity's pending delivery and marks them settled.
    async fn queue_behind(
        &mut self,
        p: &mut Pipeline,
        events: Vec<DueEvent>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.store
            .queue_behind(self.name(), &self.owner, &events.iter().collect::<Vec<_>>())
            .await?;
        for e in &events {
            p.unsettled.remove(&e.seq);
        }
        Ok(())
    }

    /// Moves the stored cursor up to the settled events.
    async fn write_cursor(&mut self, p: &mut Pipeline) -> Result<(), StoreError> {
        let upto = p.settled_upto();
        if upto <= p.cursor {
            return Ok(());
        }
        self.store
            .advance_cursor(self.name(), &self.owner, upto, true)
            .await?;
        p.cursor = upto;
        p.cursor_written_at = Instant::now();
        Ok(())
    }
}

/// The row of a delivery that is dead without an attempt.
fn dead_row<'a>(event: &DueEvent, now: SystemTime, error: &'a str) -> AttemptRecord<'a> {
    AttemptRecord {
        status: "dead",
        attempts: event.attempts,
        next_attempt_at: now,
        last_status: None,
        last_error: Some(error),
        last_response: None,
    }
}

/// The (entity, id) an event belongs to.
fn key(e: &DueEvent) -> (String, String) {
    (e.entity.clone(), e.entity_id.clone())
}

/// One HTTP attempt of `event`, unless the subscription's filter rejects it.
#[tracing::instrument(name = "delivery", skip_all, fields(event = %event.id, attempt = event.attempts + 1, status = tracing::field::Empty))]
async fn attempt(
    sub: &SubscriptionConfig,
    clients: &HttpClients,
    router: &Router,
    mut event: DueEvent,
    valid_until: Instant,
) -> (DueEvent, Sent) {
    let envelope = envelope(&mut event);
    if sub.filter.is_some() && router.route(&envelope).subscriptions.is_empty() {
        return (event, Sent::Filtered);
    }
    let body = match body::render(&envelope, sub) {
        Ok(b) => b,
        Err(e) => {
            return (
                event,
                Sent::Unsendable(format!("cannot render the body: {e}")),
            );
        }
    };
    drop(envelope);
    let now = SystemTime::now();
    let timestamp = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let headers = request_headers(sub, &event.id, timestamp, &body);
    // The last moment to hold back: after it, the request may be on its way.
    if Instant::now() >= valid_until {
        return (event, Sent::Lapsed);
    }
    let result = clients
        .for_subscription(sub)
        .post(sub.url.expose(), &headers, body, sub.timeout)
        .await;
    // Retry-After and the backoff count from the answer, not from the request: a slow
    // answer must not bring the next attempt forward.
    let answered = SystemTime::now();
    let age = answered
        .duration_since(event.first_due_at)
        .unwrap_or_default();
    let decision = decide(
        result.outcome(),
        event.attempts as u32 + 1,
        age,
        &sub.retry,
        answered,
        fastrand::f64(),
    );
    tracing::Span::current().record("status", result.outcome.label().as_ref());
    super::measure::record_attempt(sub.name.as_str(), &result, &decision, event.occurred_at);
    debug!(subscription = %sub.name, event = %event.id, attempt = event.attempts + 1, elapsed_ms = result.elapsed.as_millis() as u64, "attempt");
    (event, Sent::Attempted(result, decision))
}

/// The envelope of a stored event; takes the event's row values (it needs only its
/// metadata afterwards).
pub(crate) fn envelope(e: &mut DueEvent) -> Envelope {
    let (schema, name) = e.table.split_once('.').unwrap_or(("", &e.table));
    let as_row = |v: serde_json::Value| match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    Envelope {
        id: e.id.clone(),
        event_type: e.event_type.clone(),
        entity: Arc::from(e.entity.as_str()),
        entity_id: e.entity_id.clone(),
        revision: e.revision,
        occurred_at: DateTime::<Utc>::from(e.occurred_at),
        data: as_row(std::mem::take(&mut e.data)),
        previous: e.previous.take().map(as_row),
        changed: e.changed.clone(),
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
