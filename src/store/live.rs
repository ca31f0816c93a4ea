//! The log's newest events, kept in memory by the process that ingests them, so its
//! dispatchers take new events from here instead of reading them back from the store.
//! The store stays the truth: a dispatcher whose cursor is not inside what is kept here
//! (it fell behind, the process just started, another instance ingests, or a batch was
//! not seen here) reads the store as before, and everything here was committed to the
//! store before it was published.
//!
//! What is kept is a run of consecutive sequence numbers (ingest assigns them one by
//! one from the checkpoint's `last_seq`); a batch that does not follow on starts the
//! run again. Memory is bounded by a byte budget (the batches' shares of the ingest
//! buffer): the oldest batches go first.
//!
//! A batch no dispatcher would reach before it goes is not kept: when the furthest
//! cursor any dispatcher read from is further behind the batch than the budget has held
//! events, the run is emptied instead (a backlog ingested faster than it is delivered;
//! building what is dropped unread cost about 7 % of the CPU per delivered event).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::deliveries::{DueEvent, NewEvents};
use super::ingest::raw_json;
use super::ingest::{IngestBatch, pg_time};

/// An event as published: what a dispatcher needs, and the subscriptions it is due to.
#[derive(Debug)]
struct LiveEvent {
    event: DueEvent,
    subscriptions: Arc<[String]>,
}

#[derive(Debug, Default)]
struct Run {
    /// The sequence number before the first event kept.
    base: i64,
    /// `None` for an event due to no subscription: only its place in the run is kept.
    events: VecDeque<Option<Arc<LiveEvent>>>,
    /// Per batch kept, oldest first: its last sequence number and its cost.
    batches: VecDeque<(i64, usize)>,
    bytes: usize,
}

impl Run {
    fn last(&self) -> i64 {
        self.base + self.events.len() as i64
    }
}

/// The newest committed events of this process's ingest.
#[derive(Debug)]
pub struct LiveLog {
    run: Mutex<Run>,
    budget: usize,
    /// The furthest cursor a dispatcher asked to read past; `i64::MIN` before any.
    furthest: AtomicI64,
    /// How many events the budget held when it last ran out; 0 before it did.
    held: AtomicUsize,
}

impl LiveLog {
    /// Keeps at most about `budget` bytes of events (as the ingest buffer counts them).
    pub fn new(budget: usize) -> LiveLog {
        LiveLog {
            run: Mutex::new(Run::default()),
            budget,
            furthest: AtomicI64::new(i64::MIN),
            held: AtomicUsize::new(0),
        }
    }

    /// Publishes a committed batch whose events got the sequence numbers after
    /// `seq_base`, and whose row changes with events got `revisions` (the first
    /// revision of each, in order); `cost` is its share of the ingest buffer.
    pub fn publish(&self, batch: IngestBatch, seq_base: i64, revisions: &[i64], cost: usize) {
        if self.out_of_reach(seq_base) {
            *self.run.lock().expect("live log lock") = Run::default();
            return;
        }
        let mut events = Vec::with_capacity(batch.event_count());
        let mut seq = seq_base;
        // The changes of one transaction share its commit LSN's text.
        let mut last_lsn: Option<(crate::source::Lsn, Arc<str>)> = None;
        let changes = batch.changes.into_iter().filter(|c| c.takes_revision());
        for (i, (change, &revision)) in changes.zip(revisions).enumerate() {
            let occurred_at = pg_time(change.commit_time);
            let bulk_rows = match change.bulk {
                Some(crate::store::BulkRole::Event { rows }) => {
                    &revisions[i.saturating_sub(rows)..i]
                }
                _ => &[],
            };
            // Serialised once per change, shared by its events.
            let context = change.context.as_deref().map(raw_json);
            let entity_id: Arc<str> = Arc::from(change.entity_id);
            let lsn = match &last_lsn {
                Some((at, text)) if *at == change.commit_lsn => text.clone(),
                _ => {
                    let text: Arc<str> = Arc::from(change.commit_lsn.to_string());
                    last_lsn = Some((change.commit_lsn, text.clone()));
                    text
                }
            };
            for mut e in change.events {
                seq += 1;
                if !bulk_rows.is_empty() {
                    crate::store::ingest::fill_bulk(&mut e.data, bulk_rows);
                }
                if e.subscriptions.is_empty() {
                    events.push(None);
                    continue;
                }
                let (data, previous) = (e.data_json(), e.previous_json());
                let event = DueEvent {
                    seq,
                    id: e.id,
                    event_type: Arc::from(e.event_type),
                    entity: change.entity.clone(),
                    entity_id: entity_id.clone(),
                    revision,
                    occurred_at,
                    data,
                    previous,
                    changed: e.changed,
                    table: change.table.clone(),
                    lsn: lsn.clone(),
                    xid: i64::from(change.xid),
                    context: context.clone(),
                    attempts: 0,
                    first_due_at: SystemTime::UNIX_EPOCH,
                    batch: None,
                };
                events.push(Some(Arc::new(LiveEvent {
                    event,
                    subscriptions: e.subscriptions,
                })));
            }
        }
        let mut run = self.run.lock().expect("live log lock");
        if run.last() != seq_base || run.events.is_empty() {
            // Not the continuation of what is kept: start again from this batch.
            *run = Run {
                base: seq_base,
                ..Run::default()
            };
        }
        run.events.extend(events);
        run.batches.push_back((seq, cost));
        run.bytes += cost;
        while run.bytes > self.budget && run.batches.len() > 1 {
            let (upto, cost) = run.batches.pop_front().expect("more than one batch");
            let n = (upto - run.base) as usize;
            run.events.drain(..n);
            run.base = upto;
            run.bytes -= cost;
            self.held.store(run.events.len(), Ordering::Relaxed);
        }
    }

    /// Whether the events after `seq_base` would go unread: every dispatcher that
    /// reads here is further behind them than the budget holds.
    fn out_of_reach(&self, seq_base: i64) -> bool {
        let furthest = self.furthest.load(Ordering::Relaxed);
        let held = self.held.load(Ordering::Relaxed) as i64;
        furthest != i64::MIN && held > 0 && seq_base.saturating_sub(furthest) > held
    }

    /// The events due to `subscription` after `after`, at most `limit`, when what is
    /// kept holds every event past `after` up to the newest published; `None` when the
    /// store must be read instead.
    pub fn read(&self, subscription: &str, after: i64, limit: usize) -> Option<NewEvents> {
        self.furthest.fetch_max(after, Ordering::Relaxed);
        let run = self.run.lock().expect("live log lock");
        let last = run.last();
        if after < run.base || after >= last {
            return None;
        }
        let mut read_upto = last;
        let mut due: Vec<Arc<LiveEvent>> = Vec::new();
        let kept = run.events.iter().skip((after - run.base) as usize);
        for e in kept.flatten() {
            if e.subscriptions.iter().any(|s| s == subscription) {
                due.push(e.clone());
                if due.len() == limit {
                    read_upto = e.event.seq;
                    break;
                }
            }
        }
        drop(run);
        let now = SystemTime::now();
        let events = due
            .iter()
            .map(|e| DueEvent {
                first_due_at: now,
                ..e.event.clone()
            })
            .collect();
        Some(NewEvents {
            events,
            read_upto,
            more: read_upto < last,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};

    use super::*;
    use crate::source::Lsn;
    use crate::store::{ChangeEvents, PendingEvent};

    /// A batch of one change per entity id, each with one event due to `subs`.
    fn batch(ids: &[&str], subs: &[&str]) -> IngestBatch {
        let subscriptions: Arc<[String]> = subs.iter().map(|s| s.to_string()).collect();
        IngestBatch {
            changes: ids
                .iter()
                .map(|id| ChangeEvents {
                    entity: "user".into(),
                    entity_id: id.to_string(),
                    table: "public.users".into(),
                    commit_lsn: Lsn(0x16B3748),
                    xid: 9,
                    commit_time: 0,
                    bulk: None,
                    events: vec![PendingEvent {
                        json: None,
                        id: format!("evt_{id}").into(),
                        event_type: "user.updated".into(),
                        data: Map::from_iter([("id".to_owned(), Value::from(*id))]),
                        previous: None,
                        changed: None,
                        subscriptions: subscriptions.clone(),
                    }],
                    context_keys: None,
                    context: None,
                })
                .collect(),
            position: Default::default(),
            backfills: Vec::new(),
        }
    }

    fn seqs(new: &NewEvents) -> Vec<i64> {
        new.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn events_past_the_cursor_come_from_memory_with_their_stored_fields() {
        let log = LiveLog::new(1 << 20);
        assert!(log.read("a", 0, 10).is_none(), "nothing published");
        let mut b = batch(&["1", "2", "3"], &["a"]);
        // The third change is of a later transaction.
        b.changes[2].commit_lsn = Lsn(0x16B3800);
        log.publish(b, 40, &[7, 1, 2], 100);
        let new = log.read("a", 40, 10).expect("41..=43 are kept");
        assert_eq!(seqs(&new), [41, 42, 43]);
        assert_eq!((new.read_upto, new.more), (43, false));
        let e = &new.events[0];
        assert_eq!((&*e.id, e.revision, &*e.entity_id), ("evt_1", 7, "1"));
        assert_eq!((&*e.entity, &*e.table), ("user", "public.users"));
        assert_eq!((&*e.lsn, e.xid, e.attempts), ("0/16B3748", 9, 0));
        assert_eq!(e.data.get(), r#"{"id":"1"}"#);
        let lsns: Vec<&str> = new.events.iter().map(|e| &*e.lsn).collect();
        assert_eq!(lsns, ["0/16B3748", "0/16B3748", "0/16B3800"]);
        assert_eq!(log.read("a", 41, 10).map(|n| seqs(&n)), Some(vec![42, 43]));
        assert!(log.read("a", 43, 10).is_none(), "caught up: ask the store");
        assert!(log.read("a", 39, 10).is_none(), "40 is not kept");
    }

    #[test]
    fn a_subscription_gets_only_its_events_and_at_most_the_limit() {
        let log = LiveLog::new(1 << 20);
        log.publish(batch(&["1", "2"], &["a"]), 0, &[1, 1], 10);
        log.publish(batch(&["3", "4", "5"], &["a", "b"]), 2, &[1, 1, 1], 10);
        let b = log.read("b", 0, 10).unwrap();
        assert_eq!(seqs(&b), [3, 4, 5]);
        let a = log.read("a", 0, 2).unwrap();
        assert_eq!(seqs(&a), [1, 2]);
        assert_eq!((a.read_upto, a.more), (2, true));
        let none = log.read("c", 0, 10).unwrap();
        assert!(none.events.is_empty());
        assert_eq!(
            (none.read_upto, none.more),
            (5, false),
            "read past all of it"
        );
    }

    #[test]
    fn a_batch_that_does_not_follow_on_starts_the_run_again() {
        let log = LiveLog::new(1 << 20);
        log.publish(batch(&["1", "2"], &["a"]), 0, &[1, 1], 10);
        // Seqs 3..=9 were written by another instance (or a batch not seen here).
        log.publish(batch(&["3"], &["a"]), 9, &[1], 10);
        assert!(log.read("a", 0, 10).is_none(), "3..=9 are not kept");
        assert_eq!(log.read("a", 9, 10).map(|n| seqs(&n)), Some(vec![10]));
    }

    #[test]
    fn the_oldest_batches_go_when_the_budget_is_spent() {
        let log = LiveLog::new(250);
        log.publish(batch(&["1", "2"], &["a"]), 0, &[1, 1], 100);
        log.publish(batch(&["3"], &["a"]), 2, &[1], 100);
        log.publish(batch(&["4"], &["a"]), 3, &[1], 100);
        assert!(log.read("a", 1, 10).is_none(), "the first batch went");
        assert_eq!(log.read("a", 2, 10).map(|n| seqs(&n)), Some(vec![3, 4]));
        // One batch larger than the budget is still kept.
        log.publish(batch(&["5"], &["a"]), 4, &[1], 1_000);
        assert!(log.read("a", 3, 10).is_none());
        assert_eq!(log.read("a", 4, 10).map(|n| seqs(&n)), Some(vec![5]));
    }

    #[test]
    fn batches_no_dispatcher_would_reach_in_time_are_not_kept() {
        let log = LiveLog::new(250);
        // Nobody has read yet: everything is kept, and the budget ran out at 2 events.
        log.publish(batch(&["1", "2"], &["a"]), 0, &[1, 1], 100);
        log.publish(batch(&["3"], &["a"]), 2, &[1], 100);
        log.publish(batch(&["4"], &["a"]), 3, &[1], 100);
        assert_eq!(log.held.load(Ordering::Relaxed), 2);
        // A dispatcher at 1 (reading the store) is 3 behind the next batch: out of reach.
        assert!(log.read("a", 1, 10).is_none());
        log.publish(batch(&["5"], &["a"]), 4, &[1], 100);
        assert!(
            log.run.lock().unwrap().events.is_empty(),
            "nothing built or kept"
        );
        assert!(log.read("a", 4, 10).is_none(), "5 comes from the store");
        // Now at 4, the dispatcher is close: the next batch is kept for it.
        log.publish(batch(&["6"], &["a"]), 5, &[1], 100);
        assert_eq!(log.read("a", 5, 10).map(|n| seqs(&n)), Some(vec![6]));
        // Another dispatcher far behind does not stop it: the furthest one counts.
        assert!(log.read("b", 0, 10).is_none());
        log.publish(batch(&["7"], &["a"]), 6, &[1], 100);
        assert_eq!(log.read("a", 6, 10).map(|n| seqs(&n)), Some(vec![7]));
    }

    #[test]
    fn events_due_to_no_subscription_keep_their_place_but_not_their_data() {
        let log = LiveLog::new(1 << 20);
        log.publish(batch(&["1", "2"], &[]), 0, &[1, 1], 10);
        log.publish(batch(&["3"], &["a"]), 2, &[1], 10);
        let run = log.run.lock().unwrap();
        assert_eq!(run.events.iter().filter(|e| e.is_some()).count(), 1);
        drop(run);
        let a = log.read("a", 0, 10).expect("1..=3 are in the run");
        assert_eq!(seqs(&a), [3]);
        assert_eq!((a.read_upto, a.more), (3, false));
    }
}
