//! The attempts of one dispatcher session, made by worker tasks kept for the session
//! rather than by a task spawned per attempt.
//!
//! A task per attempt cost its allocation, a copy of the attempt's ~2.5 KB future into
//! it, and the `JoinSet`'s bookkeeping under a lock: 6 % of walhook's CPU dispatching
//! unbatched (`PERF=1 bench/ingest-loop dispatch`). A worker makes one attempt at a
//! time; the dispatcher hands it the next when it is idle, and starts a new worker only
//! while none is idle (never more than `max_in_flight` for the session).
//!
//! `bench/ingest-loop dispatch` (1M pending events, 64 in flight, examples/sink),
//! alternated on the development machine: a task per attempt 16.5/15.8 µs of walhook
//! CPU per event (60.4k/63.8k events/s), workers 15.9/15.0 µs (61.7k/66.2k).

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Done, Outbound, attempt};
use crate::config::SubscriptionConfig;
use crate::delivery::HttpClients;
use crate::store::deliveries::DueEvent;

/// An attempt to make: its events, and the moment after which it may not start.
type Job = (Vec<DueEvent>, Instant);

/// A worker's answer: its index, and the attempt's answer or the panic it ended in.
type Finished = (usize, Result<Done, Box<dyn Any + Send>>);

/// What every attempt of the dispatcher uses.
#[derive(Clone)]
pub(super) struct Shared {
    pub sub: Arc<SubscriptionConfig>,
    pub clients: Arc<HttpClients>,
    pub outbound: Arc<Outbound>,
}

/// A session's workers and the attempts they have in hand.
pub(super) struct Workers {
    shared: Shared,
    /// Where each worker takes its next job from.
    jobs: Vec<mpsc::Sender<Job>>,
    idle: Vec<usize>,
    tasks: JoinSet<()>,
    done_tx: mpsc::UnboundedSender<Finished>,
    done_rx: mpsc::UnboundedReceiver<Finished>,
    in_flight: usize,
}

impl Workers {
    pub fn new(shared: Shared) -> Workers {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Workers {
            shared,
            jobs: Vec::new(),
            idle: Vec::new(),
            tasks: JoinSet::new(),
            done_tx,
            done_rx,
            in_flight: 0,
        }
    }

    /// Attempts started and not yet taken back by [`Workers::next`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts the attempt of `events` on an idle worker, or a new one.
    pub fn start(&mut self, events: Vec<DueEvent>, valid_until: Instant) {
        let worker = match self.idle.pop() {
            Some(worker) => worker,
            None => self.spawn(),
        };
        // An idle worker waits on its empty queue of one.
        let sent = self.jobs[worker].try_send((events, valid_until));
        assert!(sent.is_ok(), "an idle attempt worker takes a job");
        self.in_flight += 1;
    }

    fn spawn(&mut self) -> usize {
        let (tx, mut rx) = mpsc::channel::<Job>(1);
        let worker = self.jobs.len();
        self.jobs.push(tx);
        let Shared {
            sub,
            clients,
            outbound,
        } = self.shared.clone();
        let done = self.done_tx.clone();
        self.tasks.spawn(async move {
            while let Some((events, valid_until)) = rx.recv().await {
                let answer =
                    AssertUnwindSafe(attempt(&sub, &clients, &outbound, events, valid_until))
                        .catch_unwind()
                        .await;
                if done.send((worker, answer)).is_err() {
                    return;
                }
            }
        });
        worker
    }

    /// The next finished attempt (`None` when none is in flight). A panic in one is
    /// carried on: the supervisor restarts the dispatcher, which starts again from the
    /// stored cursor and retry rows.
    pub async fn next(&mut self) -> Option<Done> {
        if self.in_flight == 0 {
            return None;
        }
        let finished = self
            .done_rx
            .recv()
            .await
            .expect("the workers' sender is kept");
        Some(self.took(finished))
    }

    /// A finished attempt, if one is waiting.
    pub fn try_next(&mut self) -> Option<Done> {
        let finished = self.done_rx.try_recv().ok()?;
        Some(self.took(finished))
    }

    fn took(&mut self, (worker, answer): Finished) -> Done {
        self.in_flight -= 1;
        self.idle.push(worker);
        answer.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Drops what is in flight: the requests on their way are cut off.
    pub fn abort(&mut self) {
        self.tasks.abort_all();
    }
}
