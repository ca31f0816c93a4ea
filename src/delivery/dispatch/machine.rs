//! The dispatcher's state, with no I/O: events fetched and answers to attempts go in,
//! and what to do comes out (attempts to start, rows to record, events to queue behind
//! a retry, where the cursor may move). The loop in the parent module does the store
//! queries, HTTP and timers around it.
//!
//! An event is settled once it is delivered at its first attempt, filtered out, or has
//! a retry row (retry, dead, or queued behind an earlier delivery of its entity). The
//! cursor only passes settled events, so a crash re-sends at most what was in flight.
//!
//! With ordering, an entity's fetched events form a chain: the next one is ready when
//! the one before it is answered, and when that answer asks for a retry, the rest of
//! the chain is queued behind it. An entity with a pending retry row in the store gets
//! its new events queued behind that row.

use std::collections::{BTreeSet, HashSet, VecDeque};

use foldhash::{HashMap, HashMapExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::delivery::{Attempt, AttemptOutcome, Decision};
use crate::store::deliveries::{AttemptRecord, DueEvent, NewEvents, StoredBatch};

/// Fetched events waiting in memory at most (their number, not the backlog's, bounds
/// the memory a dispatcher uses: G6).
pub(super) const WAITING_MAX: usize = 2_000;
/// How often the cursor is written while events keep being settled.
pub(super) const CURSOR_EVERY: Duration = Duration::from_millis(50);

/// An entity: its name and id.
pub(super) type Key = (Arc<str>, Arc<str>);

/// Where an attempt's event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// An event past the cursor, at its first attempt.
    New,
    /// A retry row (retry, replay, or queued behind an earlier delivery).
    Retry,
}

/// What became of an event handed to an attempt.
#[derive(Clone, Debug)]
pub(super) enum Sent {
    /// Nothing was sent: the attempt started after the lease may have run out.
    Lapsed,
    /// The subscription's filter rejects it: nothing to send.
    Filtered,
    /// No request could be made of it (its body does not render).
    Unsendable(String),
    /// A request was made.
    Attempted(Attempt, Decision),
}

/// The answer to one request (or to none, when nothing of it was sent): what became of
/// each of its events, in the order they were handed out.
#[derive(Debug)]
pub(super) struct Answer {
    pub events: Vec<(DueEvent, Sent)>,
    /// A batch of several new events sent in this request, to keep if the request
    /// did not deliver it.
    pub batch: Option<Arc<StoredBatch>>,
}

/// A retry row to write for an answered attempt.
#[derive(Debug)]
pub(super) struct Row {
    pub event: DueEvent,
    /// The batch the event was sent in, with others.
    pub batch: Option<Arc<StoredBatch>>,
    pub status: &'static str,
    pub attempts: i32,
    pub next_attempt_at: SystemTime,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub last_response: Option<String>,
}

impl Row {
    /// The row as the store writes it.
    pub fn record(&self) -> (&DueEvent, AttemptRecord<'_>) {
        let record = AttemptRecord {
            status: self.status,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at,
            last_status: self.last_status,
            last_error: self.last_error.as_deref(),
            last_response: self.last_response.as_deref(),
            batch_id: self.batch.as_ref().map(|b| b.id.as_str()),
        };
        (&self.event, record)
    }
}

/// What answered attempts ask of the store, in this order.
#[derive(Debug, Default)]
pub(super) struct Settlement {
    /// 410 Gone: disable the subscription, for this reason.
    pub disable: Option<String>,
    /// Retry rows to create or update.
    pub rows: Vec<Row>,
    /// Batches the rows refer to that are not kept yet.
    pub batches: Vec<Arc<StoredBatch>>,
    /// Pending rows the filter now rejects: delete them.
    pub forget: Vec<i64>,
    /// Events to queue behind their entity's pending retry row.
    pub queue_behind: Vec<DueEvent>,
}

/// The chains of entities with an event in flight or ready, and the events behind it.
#[derive(Debug, Default)]
struct Chains {
    map: HashMap<Key, VecDeque<DueEvent>>,
    /// Events waiting behind the heads, over all chains.
    waiting: usize,
}

impl Chains {
    fn contains(&self, k: &Key) -> bool {
        self.map.contains_key(k)
    }

    /// Starts the chain of `k` (its head is ready or in flight) with `rest` behind it.
    fn start(&mut self, k: Key, rest: VecDeque<DueEvent>) {
        self.waiting += rest.len();
        self.map.insert(k, rest);
    }

    /// Appends `e` to its entity's chain; gives it back when there is none.
    fn append(&mut self, e: DueEvent) -> Option<DueEvent> {
        let Some(chain) = self.map.get_mut(&key(&e)) else {
            return Some(e);
        };
        chain.push_back(e);
        self.waiting += 1;
        None
    }

    /// The next event of the chain of `k`, which ends when there is none.
    fn advance(&mut self, k: &Key) -> Option<DueEvent> {
        let next = self.map.get_mut(k)?.pop_front();
        match next {
            Some(_) => self.waiting -= 1,
            None => {
                self.map.remove(k);
            }
        }
        next
    }

    /// Ends the chain of `k`, giving back the events behind its head.
    fn take(&mut self, k: &Key) -> VecDeque<DueEvent> {
        let rest = self.map.remove(k).unwrap_or_default();
        self.waiting -= rest.len();
        rest
    }

    fn clear(&mut self) {
        self.map.clear();
        self.waiting = 0;
    }
}

/// One session's dispatch state (a session holds the lease from a stored cursor).
#[derive(Debug)]
pub(super) struct Machine {
    ordered: bool,
    /// The last event fetched from the log.
    fetched_upto: i64,
    /// The cursor as stored.
    cursor: i64,
    cursor_written_at: Instant,
    /// Fetched events not settled yet.
    unsettled: BTreeSet<i64>,
    /// Retry rows ready to be attempted, oldest first; they go before new events.
    ready_retries: VecDeque<DueEvent>,
    /// New events ready to be attempted, in order.
    ready_new: VecDeque<DueEvent>,
    chains: Chains,
    /// Events handed to attempts and not answered, and where they came from.
    in_flight: HashMap<i64, Kind>,
    /// Requests started and not answered.
    requests: usize,
    want_new: bool,
    /// A query of new events is on its way ([`Machine::fetch_started`]).
    fetching: bool,
    /// Woken or polled while it was: look again after it, whatever it finds.
    asked_while_fetching: bool,
    want_retries: bool,
    /// The last retry query filled its batch: look again once those are done.
    more_retries: bool,
    /// No new attempts start (disabled, paused, shutdown).
    stopping: bool,
    /// An attempt found the lease possibly expired and sent nothing.
    lapsed: bool,
}

impl Machine {
    /// A session starting at the stored `cursor`, at `now`.
    pub fn new(cursor: i64, ordered: bool, now: Instant) -> Machine {
        Machine {
            ordered,
            fetched_upto: cursor,
            cursor,
            cursor_written_at: now,
            unsettled: BTreeSet::new(),
            ready_retries: VecDeque::new(),
            ready_new: VecDeque::new(),
            chains: Chains::default(),
            in_flight: HashMap::new(),
            requests: 0,
            want_new: true,
            fetching: false,
            asked_while_fetching: false,
            want_retries: true,
            more_retries: false,
            stopping: false,
            lapsed: false,
        }
    }

    /// The periodic look for work: retries may have come due, events may have been
    /// written without a notification.
    pub fn poll(&mut self) {
        self.woken();
        self.want_retries = true;
    }

    /// New events were written.
    pub fn woken(&mut self) {
        self.want_new = true;
        self.asked_while_fetching |= self.fetching;
    }

    /// Whether to query due retry rows now: asked for, and none taken still out.
    pub fn wants_retries(&self) -> bool {
        let out =
            !self.ready_retries.is_empty() || self.in_flight.values().any(|k| *k == Kind::Retry);
        !self.stopping && (self.want_retries || self.more_retries) && !out
    }

    /// Takes due retry rows, oldest first; `full` when the query filled its batch.
    /// With ordering the store gives the oldest pending row of each entity.
    pub fn retries_fetched(&mut self, retries: Vec<DueEvent>, full: bool) {
        self.want_retries = false;
        let mut more = full;
        // Retries go first, oldest first.
        for event in retries.into_iter().rev() {
            // An event this session fetched as new and has not settled is attempted
            // from there (a retry row can appear for it only by an operator's replay).
            if self.unsettled.contains(&event.seq) {
                more = false;
                continue;
            }
            if self.ordered && self.chains.contains(&key(&event)) {
                continue;
            }
            self.ready_retries.push_front(event);
        }
        self.more_retries = more;
    }

    /// Fetch new events past this position, when asked for and room is left.
    pub fn wants_new(&self) -> Option<i64> {
        let waiting = self.ready_retries.len() + self.ready_new.len() + self.chains.waiting;
        let ready = !self.stopping && !self.fetching && self.want_new && waiting < WAITING_MAX;
        ready.then_some(self.fetched_upto)
    }

    /// A query of the new events [`Machine::wants_new`] asked for was sent; no other is
    /// asked for until [`Machine::new_fetched`] takes its answer.
    pub fn fetch_started(&mut self) {
        self.fetching = true;
        self.asked_while_fetching = false;
    }

    /// Where the next query of new events may start before `new` (the answer of the
    /// query on its way) is taken: past it, when the log has more and taking it leaves
    /// room.
    pub fn room_after(&self, new: &NewEvents) -> Option<i64> {
        let waiting = self.ready_retries.len() + self.ready_new.len() + self.chains.waiting;
        let room = !self.stopping && waiting + new.events.len() < WAITING_MAX;
        (new.more && room).then_some(new.read_upto)
    }

    /// With ordering, the entities of `events` with no chain in memory, in order: the
    /// store says which of them have a pending retry row, for [`Machine::new_fetched`].
    pub fn unchained(&self, events: &[DueEvent]) -> Vec<Key> {
        if !self.ordered {
            return Vec::new();
        }
        let mut seen = HashSet::new();
        events
            .iter()
            .map(key)
            .filter(|k| !self.chains.contains(k) && seen.insert(k.clone()))
            .collect()
    }

    /// Takes fetched events; `blocked` are the entities (of [`Machine::unchained`])
    /// with a pending retry row. Returns the events to queue behind those rows; they
    /// count as settled.
    pub fn new_fetched(&mut self, new: NewEvents, blocked: &HashSet<Key>) -> Vec<DueEvent> {
        let NewEvents {
            events,
            read_upto,
            more,
        } = new;
        self.want_new = more || std::mem::take(&mut self.asked_while_fetching);
        self.fetching = false;
        self.fetched_upto = self.fetched_upto.max(read_upto);
        self.unsettled.extend(events.iter().map(|e| e.seq));
        if !self.ordered {
            self.ready_new.extend(events);
            return Vec::new();
        }
        // Entities with a chain get these events appended to it; the others start one
        // unless a retry row of theirs is pending.
        let mut order: Vec<Key> = Vec::new();
        let mut groups: HashMap<Key, VecDeque<DueEvent>> = HashMap::new();
        for event in events {
            let Some(event) = self.chains.append(event) else {
                continue;
            };
            let k = key(&event);
            let group = groups.entry(k.clone()).or_default();
            if group.is_empty() {
                order.push(k);
            }
            group.push_back(event);
        }
        let mut queued = Vec::new();
        for k in order {
            let mut group = groups.remove(&k).expect("grouped above");
            if blocked.contains(&k) {
                queued.extend(group);
                continue;
            }
            let head = group.pop_front().expect("groups are not empty");
            self.ready_new.push_back(head);
            self.chains.start(k, group);
        }
        self.settle_all(&queued);
        queued
    }

    /// The next request to start, while fewer than `limit` are in flight: one due
    /// retry row (a stored batch is one row), or else up to `batch` new events. With
    /// ordering, only the head of each entity's chain is ready, so a batch holds at
    /// most one event per entity and never revision n+1 before n is answered.
    pub fn next_start(&mut self, limit: usize, batch: usize) -> Option<Vec<DueEvent>> {
        if self.stopping || self.requests >= limit {
            return None;
        }
        let events: Vec<DueEvent> = match self.ready_retries.pop_front() {
            Some(retry) => {
                self.in_flight.insert(retry.seq, Kind::Retry);
                vec![retry]
            }
            None => {
                let n = batch.max(1).min(self.ready_new.len());
                if n == 0 {
                    return None;
                }
                let events: Vec<DueEvent> = self.ready_new.drain(..n).collect();
                for e in &events {
                    self.in_flight.insert(e.seq, Kind::New);
                }
                events
            }
        };
        self.requests += 1;
        Some(events)
    }

    /// Takes the answers to requests started by [`Machine::next_start`], answered at
    /// `now`: moves chains on and says what to write. A 410 stops the session.
    pub fn answered(&mut self, done: Vec<Answer>, now: SystemTime) -> Settlement {
        let mut out = Settlement::default();
        for answer in done {
            self.requests -= 1;
            let mut keep = false;
            for (event, sent) in answer.events {
                let attempted = matches!(sent, Sent::Attempted(..));
                let batch = attempted
                    .then(|| answer.batch.clone().or_else(|| event.batch.clone()))
                    .flatten();
                if let Some(mut row) = self.answered_one(event, sent, now, &mut out) {
                    keep |= answer.batch.is_some() && batch.is_some();
                    row.batch = batch;
                    out.rows.push(row);
                }
            }
            if keep && let Some(batch) = answer.batch {
                out.batches.push(batch);
            }
        }
        self.settle_all(&out.queue_behind);
        if out.disable.is_some() {
            self.stop();
        }
        out
    }

    /// One event's answer; the retry row it needs, if any.
    fn answered_one(
        &mut self,
        event: DueEvent,
        sent: Sent,
        now: SystemTime,
        out: &mut Settlement,
    ) -> Option<Row> {
        let kind = self
            .in_flight
            .remove(&event.seq)
            .expect("an answer to an attempt this session started");
        match &sent {
            // Unsettled: the session starts again and fetches it anew.
            Sent::Lapsed => {
                self.lapsed = true;
                return None;
            }
            // A pending row the filter rejects (queued behind a retry, or after a
            // reload changed the filter) is not due: it goes, or it would block its
            // entity for ever. A new event it rejects needs no row.
            Sent::Filtered if kind == Kind::Retry => out.forget.push(event.seq),
            Sent::Attempted(_, Decision::DeadAndDisable { reason }) => {
                out.disable = Some(reason.clone());
            }
            _ => {}
        }
        if kind == Kind::New {
            self.unsettled.remove(&event.seq);
            if self.ordered {
                // The entity's chain: the next event is ready, or all of it queues
                // behind the retry.
                let k = key(&event);
                if matches!(sent, Sent::Attempted(_, Decision::Retry { .. })) {
                    out.queue_behind.extend(self.chains.take(&k));
                } else if let Some(next) = self.chains.advance(&k) {
                    self.ready_new.push_back(next);
                }
            }
        }
        row(event, kind, sent, now)
    }

    /// Whether an attempt found the lease possibly expired (cleared by asking).
    pub fn take_lapsed(&mut self) -> bool {
        std::mem::take(&mut self.lapsed)
    }

    /// Stops starting attempts; what was waiting stays past the cursor. Answers to
    /// attempts in flight are still taken.
    pub fn stop(&mut self) {
        self.stopping = true;
        self.ready_retries.clear();
        self.ready_new.clear();
        self.chains.clear();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping
    }

    /// Where the cursor may go: just before the oldest unsettled event.
    pub fn settled_upto(&self) -> i64 {
        self.unsettled
            .first()
            .map_or(self.fetched_upto, |oldest| oldest - 1)
    }

    /// The cursor to write at `now`, if any: when nothing is in flight, or
    /// [`CURSOR_EVERY`] after the last write; `force` writes whatever has settled.
    pub fn cursor_due(&self, now: Instant, force: bool) -> Option<i64> {
        let upto = self.settled_upto();
        let due =
            force || self.in_flight.is_empty() || now >= self.cursor_written_at + CURSOR_EVERY;
        (upto > self.cursor && due).then_some(upto)
    }

    /// When the cursor is next due to be written while attempts are in flight.
    pub fn cursor_deadline(&self) -> Option<Instant> {
        (self.settled_upto() > self.cursor).then(|| self.cursor_written_at + CURSOR_EVERY)
    }

    /// The cursor was written up to `upto` at `now`.
    pub fn cursor_written(&mut self, upto: i64, now: Instant) {
        self.cursor = self.cursor.max(upto);
        self.cursor_written_at = now;
    }

    fn settle_all(&mut self, events: &[DueEvent]) {
        for e in events {
            self.unsettled.remove(&e.seq);
        }
    }
}

/// The retry row an answered attempt needs, if any.
fn row(event: DueEvent, kind: Kind, sent: Sent, now: SystemTime) -> Option<Row> {
    let (attempt, decision) = match sent {
        Sent::Lapsed | Sent::Filtered => return None,
        Sent::Unsendable(error) => {
            return Some(Row {
                batch: None,
                status: "dead",
                attempts: event.attempts,
                next_attempt_at: now,
                last_status: None,
                last_error: Some(error),
                last_response: None,
                event,
            });
        }
        Sent::Attempted(attempt, decision) => (attempt, decision),
    };
    let (status, next_attempt_at, reason) = match decision {
        // A new event delivered at once needs no row (the cursor says it); a retry row
        // (even one queued with 0 attempts) must leave `pending`.
        Decision::Delivered if kind == Kind::New => return None,
        Decision::Delivered => ("delivered", now, None),
        Decision::Retry { at, reason } => ("pending", at, Some(reason)),
        Decision::Dead { reason } | Decision::DeadAndDisable { reason } => {
            ("dead", now, Some(reason))
        }
    };
    Some(Row {
        batch: None,
        status,
        attempts: event.attempts + 1,
        next_attempt_at,
        last_status: match attempt.outcome {
            AttemptOutcome::Status { code, .. } => Some(i32::from(code)),
            AttemptOutcome::Error { .. } => None,
        },
        last_error: attempt.error.or(reason),
        last_response: Some(attempt.response_head).filter(|s| !s.is_empty()),
        event,
    })
}

/// The entity an event belongs to.
pub(super) fn key(e: &DueEvent) -> Key {
    (e.entity.clone(), e.entity_id.clone())
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
