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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;

    use super::*;
    use crate::delivery::dispatch::machine::Sent;
    use crate::delivery::dispatch::tests::stored;
    use crate::delivery::measure::AttemptMetrics;
    use crate::delivery::{Decision, Target};
    use crate::mapping::test_support::config;
    use crate::routing::Router;

    /// A keep-alive receiver on 127.0.0.1 that answers each request 204 once `gate`
    /// lets it; returns its address and how many connections it accepted.
    async fn receiver(
        gate: Arc<Semaphore>,
    ) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let gate = gate.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request: its head, then content-length bytes of body.
                        let request_end = loop {
                            if let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                let text = String::from_utf8_lossy(&buf[..head]).to_lowercase();
                                let len = text
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                                if buf.len() >= head + 4 + len {
                                    break head + 4 + len;
                                }
                            }
                            match conn.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        buf.drain(..request_end);
                        gate.acquire().await.unwrap().forget();
                        let answer = b"HTTP/1.1 204 No Content\r\n\r\n";
                        if conn.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn workers(addr: std::net::SocketAddr) -> Workers {
        let c = config(&format!(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://{addr}/hook\"\nevents = [\"*\"]\nmax_in_flight = 3\n"
        ));
        let sub = Arc::new(c.subscriptions[0].clone());
        Workers::new(Shared {
            outbound: Arc::new(Outbound {
                router: Router::new(std::slice::from_ref(&*sub)),
                metrics: AttemptMetrics::new("s"),
                target: Target::new(sub.url.expose()),
            }),
            clients: Arc::new(HttpClients::new(&c.delivery).unwrap()),
            sub,
        })
    }

    fn delivered(done: &Done) -> bool {
        matches!(
            done.events[..],
            [(_, Sent::Attempted(_, Decision::Delivered))]
        )
    }

    #[tokio::test]
    async fn a_worker_per_attempt_in_flight_and_idle_ones_are_used_again() {
        let gate = Arc::new(Semaphore::new(0));
        let (addr, connections) = receiver(gate.clone()).await;
        let mut w = workers(addr);
        let until = Instant::now() + Duration::from_secs(60);
        assert!(w.next().await.is_none(), "nothing in flight");

        // Three at once: three workers, each with its request held by the receiver.
        for _ in 0..3 {
            w.start(vec![stored(false)], until);
        }
        assert_eq!((w.jobs.len(), w.in_flight()), (3, 3));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            w.try_next().is_none(),
            "answered before the receiver let them go"
        );
        gate.add_permits(3);
        for _ in 0..3 {
            let done = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .unwrap()
                .unwrap();
            assert!(delivered(&done), "{done:?}");
        }
        assert_eq!(w.in_flight(), 0);
        assert!(w.next().await.is_none());

        // One after another: the idle workers take them, none is added.
        gate.add_permits(5);
        for _ in 0..5 {
            w.start(vec![stored(false)], until);
            let done = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .unwrap()
                .unwrap();
            assert!(delivered(&done), "{done:?}");
        }
        assert_eq!(w.jobs.len(), 3);
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);

        // Past the lease's last moment a worker sends nothing.
        w.start(vec![stored(false)], Instant::now() - Duration::from_secs(1));
        let done = w.next().await.unwrap();
        assert!(matches!(done.events[..], [(_, Sent::Lapsed)]), "{done:?}");
    }

    #[tokio::test]
    async fn abort_cuts_off_what_is_in_flight() {
        let gate = Arc::new(Semaphore::new(0));
        let (addr, _) = receiver(gate.clone()).await;
        let mut w = workers(addr);
        w.start(
            vec![stored(false)],
            Instant::now() + Duration::from_secs(60),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        w.abort();
        gate.add_permits(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(w.try_next().is_none(), "an aborted attempt answers nothing");
        assert_eq!(w.in_flight(), 1, "left to the session, which abandons it");
    }
}
