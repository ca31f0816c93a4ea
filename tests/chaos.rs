//! The chaos test: a seeded random workload over a few hundred entities in three
//! watched tables while receivers fail at random, walhook is SIGKILLed and restarted,
//! a second instance comes and goes, and the source PostgreSQL restarts (fast stop).
//! At the end, from the writer's own log of committed changes: every change has its
//! events in the store exactly once with gap-free revisions (G1-G3), every delivery was
//! answered 2xx at least once (G4), no receiver got revision n+1 of an entity before
//! n was answered 2xx (G5), no walhook process went over a peak RSS bound (G6), no
//! instance exited on its own (G8), and every PostgreSQL restart finished in under
//! 10 s (G9).
//!
//! `cargo test` runs a short round (60 s, a few kills, 2 restarts). A long one by hand:
//! `WALHOOK_CHAOS_SECS=1800 cargo test --release --test main -- chaos --nocapture`
//! (see docs/reliability.md for the knobs and the table it prints).

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::support::chaos_receiver::ChaosReceiver;
use crate::support::daemon::{Daemon, Workdir, wait_leading};
use crate::support::pg::{Cluster, StopMode, TestDb, connect};
use crate::support::workload::{self, Rng, TABLES, Writer};

/// Length of the chaos phase when `WALHOOK_CHAOS_SECS` is not set.
const SHORT_SECS: u64 = 60;
/// Rows per watched table (three tables: a few hundred entities).
const ENTITIES: usize = 100;
/// G6: the peak RSS (VmHWM) no walhook process may pass.
const RSS_LIMIT_KIB: u64 = 150 * 1024;
/// G9: the longest a `-m fast` restart (stop and start) may take.
const RESTART_LIMIT: Duration = Duration::from_secs(10);
/// How long the end may take to store everything once the chaos stops, and to deliver
/// it at least (the delivery wait goes on while deliveries progress, see [`STALL`]).
const DRAIN: Duration = Duration::from_secs(180);
/// At the end, a subscription with deliveries missing and none answered for this long
/// is stuck: a failure however much time is left.
const STALL: Duration = Duration::from_secs(60);
/// How often the controller looks at its processes.
const TICK: Duration = Duration::from_millis(200);

/// What to do, from the environment.
struct Settings {
    secs: u64,
    seed: u64,
    pg_restarts: u64,
    /// Mean time between two SIGKILLs.
    kill_every: Duration,
    /// The writer's pause between transactions.
    pace: Duration,
}

impl Settings {
    fn from_env() -> Settings {
        let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        let secs = number("WALHOOK_CHAOS_SECS").unwrap_or(SHORT_SECS);
        Settings {
            secs,
            seed: Rng::seed_from_env("WALHOOK_CHAOS_SEED"),
            // A long run restarts PostgreSQL about once a minute.
            pg_restarts: number("WALHOOK_CHAOS_PG_RESTARTS").unwrap_or((secs / 60).max(2)),
            kill_every: Duration::from_secs(number("WALHOOK_CHAOS_KILL_EVERY").unwrap_or(10)),
            pace: Duration::from_millis(number("WALHOOK_CHAOS_PACE_MS").unwrap_or(15)),
        }
    }
}

/// A `walhook run` slot of the test: A is the one that always comes back, B the
/// second instance that comes and goes.
struct Instance {
    name: &'static str,
    daemon: Option<Daemon>,
    /// When to start it again, if it is down.
    start_at: Option<Instant>,
    /// When it was last started.
    started: Instant,
}

/// What happened, for the checks and the table.
#[derive(Default)]
struct Tally {
    kills: u64,
    pg_restarts: u64,
    longest_restart: Duration,
    max_rss_kib: u64,
    max_lag_bytes: f64,
    spawned: usize,
    /// Every check that failed, with its evidence.
    failures: Vec<String>,
}

struct Chaos {
    cluster: Cluster,
    db: TestDb,
    work: Workdir,
    instances: [Instance; 2],
    receivers: Vec<ChaosReceiver>,
    rng: Rng,
    tally: Tally,
    monitor: Option<Client>,
}

impl Chaos {
    fn spawn(&mut self, i: usize) {
        let daemon = self
            .work
            .spawn_run_env(self.tally.spawned, &[("WALHOOK_LOG", Some("info"))]);
        self.tally.spawned += 1;
        self.instances[i].daemon = Some(daemon);
        self.instances[i].start_at = None;
        self.instances[i].started = Instant::now();
    }

    /// Samples peak RSS and notices instances that exited on their own (a failure:
    /// `walhook run` never exits by itself, G8), then restarts what is due.
    fn supervise(&mut self) {
        let now = Instant::now();
        for i in 0..self.instances.len() {
            let instance = &mut self.instances[i];
            if let Some(daemon) = instance.daemon.as_mut() {
                if daemon.is_running() {
                    if let Some(rss) = daemon.peak_rss_kib() {
                        self.tally.max_rss_kib = self.tally.max_rss_kib.max(rss);
                    }
                } else {
                    let pid = daemon.pid();
                    let status = daemon.wait_exit(Duration::ZERO);
                    self.tally.failures.push(format!(
                        "instance {} (pid {pid}) exited on its own: {status}; log tail:\n{}",
                        instance.name,
                        log_tail(&daemon.log(), 15)
                    ));
                    instance.daemon = None;
                    instance.start_at = Some(now + Duration::from_secs(1));
                }
            }
            if instance.daemon.is_none() && instance.start_at.is_some_and(|at| at <= now) {
                self.spawn(i);
            }
        }
    }

    /// SIGKILLs a running instance at random; A comes back within 3 s, B half the time.
    fn kill_one(&mut self) {
        let running: Vec<usize> = (0..2)
            .filter(|&i| self.instances[i].daemon.is_some())
            .collect();
        if running.is_empty() {
            return;
        }
        let i = running[self.rng.below(running.len() as u64) as usize];
        let daemon = self.instances[i].daemon.take().expect("running");
        if let Some(rss) = daemon.peak_rss_kib() {
            self.tally.max_rss_kib = self.tally.max_rss_kib.max(rss);
        }
        daemon.kill9();
        self.tally.kills += 1;
        let back = Instant::now() + self.rng.between(Duration::ZERO, Duration::from_secs(3));
        self.instances[i].start_at = (i == 0 || self.rng.chance(50)).then_some(back);
    }

    /// The second instance comes (if away) or goes with SIGTERM (if running), which
    /// must end it with status 0 within its shutdown grace.
    async fn toggle_second(&mut self) {
        if self.instances[1].daemon.is_none() {
            self.spawn(1);
            return;
        }
        // A process signalled before it set its handlers up dies of the signal; give
        // it time to start (the next toggle comes soon enough).
        if self.instances[1].started.elapsed() < Duration::from_secs(3) {
            return;
        }
        let mut daemon = self.instances[1].daemon.take().expect("running");
        daemon.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if daemon.is_running() {
            self.tally.failures.push(format!(
                "instance B did not exit within 30 s of SIGTERM; log tail:\n{}",
                log_tail(&daemon.log(), 15)
            ));
            daemon.kill9();
        } else {
            let status = daemon.wait_exit(Duration::ZERO);
            if !status.success() {
                self.tally.failures.push(format!(
                    "instance B exited with {status} on SIGTERM; log tail:\n{}",
                    log_tail(&daemon.log(), 15)
                ));
            }
        }
        self.instances[1].start_at = None;
    }

    /// `-m fast` restart of the source PostgreSQL, timed (G9).
    async fn restart_postgres(&mut self) {
        let cluster = self.cluster.clone();
        let result = tokio::task::spawn_blocking(move || cluster.try_restart(StopMode::Fast))
            .await
            .expect("restart PostgreSQL");
        self.tally.pg_restarts += 1;
        self.monitor = None;
        match result {
            Ok(took) => {
                self.tally.longest_restart = self.tally.longest_restart.max(took);
                if took > RESTART_LIMIT {
                    self.tally.failures.push(format!(
                        "PostgreSQL restart {} took {took:?} (bound {RESTART_LIMIT:?})",
                        self.tally.pg_restarts
                    ));
                }
            }
            Err(slow) => {
                self.tally.longest_restart = self.tally.longest_restart.max(slow.elapsed);
                self.tally.failures.push(format!(
                    "PostgreSQL restart {}: {slow}",
                    self.tally.pg_restarts
                ));
            }
        }
    }

    /// Replication lag of the slot: WAL written but not confirmed, in bytes.
    async fn sample_lag(&mut self) {
        if self.monitor.as_ref().is_none_or(|c| c.is_closed()) {
            self.monitor = connect(&self.db.url()).await.ok();
        }
        let Some(client) = self.monitor.as_ref() else {
            return;
        };
        let lag = client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.db.name],
            )
            .await;
        if let Ok(Some(row)) = lag
            && let Some(bytes) = row.get::<_, Option<f64>>(0)
        {
            self.tally.max_lag_bytes = self.tally.max_lag_bytes.max(bytes);
        }
    }

    /// A receiver event: flaky on or off, or down for a few seconds.
    async fn receiver_event(&mut self, back_at: &mut [Option<Instant>]) {
        let r = self.rng.below(self.receivers.len() as u64) as usize;
        if self.rng.chance(25) && back_at[r].is_none() {
            self.receivers[r].go_down();
            back_at[r] = Some(
                Instant::now()
                    + self
                        .rng
                        .between(Duration::from_secs(1), Duration::from_secs(6)),
            );
        } else {
            let flaky = self.rng.chance(60);
            self.receivers[r].set_flaky(flaky);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_keeps_every_guarantee() {
    let settings = Settings::from_env();
    let cluster = Cluster::start();
    let db = cluster.create_db().await;
    db.batch(&workload::create_sql(TABLES)).await;
    let mut rng = Rng::new(settings.seed);
    let receivers = vec![
        ChaosReceiver::start(settings.seed ^ 0x5a5a).await,
        ChaosReceiver::start(settings.seed ^ 0xa5a5).await,
    ];
    let work = Workdir::new(&chaos_config(&db, &receivers));
    let mut chaos = Chaos {
        cluster: cluster.clone(),
        db,
        work,
        instances: [
            Instance {
                name: "A",
                daemon: None,
                start_at: None,
                started: Instant::now(),
            },
            Instance {
                name: "B",
                daemon: None,
                start_at: None,
                started: Instant::now(),
            },
        ],
        receivers,
        rng: Rng::new(settings.seed ^ 0x77),
        tally: Tally::default(),
        monitor: None,
    };
    chaos.spawn(0);
    wait_leading(&chaos.db, chaos.instances[0].daemon.as_mut().expect("A")).await;

    let writer = Writer::spawn(
        chaos.db.url(),
        TABLES,
        ENTITIES,
        settings.seed ^ 0x33,
        settings.pace,
    );
    let begun = Instant::now();
    let end = begun + Duration::from_secs(settings.secs);
    // PostgreSQL restarts spread over the run, each at a random point of its share.
    let share = Duration::from_secs(settings.secs) / (settings.pg_restarts as u32 + 1);
    let mut restarts: Vec<Instant> = (1..=settings.pg_restarts as u32)
        .map(|k| begun + share * k + rng.between(Duration::ZERO, share / 2) - share / 4)
        .collect();
    let mut next_kill = begun + rng.between(settings.kill_every / 2, settings.kill_every * 3 / 2);
    let mut next_toggle = begun + rng.between(Duration::from_secs(3), Duration::from_secs(10));
    let mut next_receiver = begun + rng.between(Duration::from_secs(1), Duration::from_secs(4));
    let mut next_lag = begun;
    let mut back_at: Vec<Option<Instant>> = vec![None; chaos.receivers.len()];
    while Instant::now() < end {
        let now = Instant::now();
        chaos.supervise();
        if now >= next_kill {
            chaos.kill_one();
            next_kill = now + rng.between(settings.kill_every / 2, settings.kill_every * 3 / 2);
        }
        if now >= next_toggle {
            chaos.toggle_second().await;
            next_toggle = now + rng.between(Duration::from_secs(5), Duration::from_secs(20));
        }
        if restarts.first().is_some_and(|at| *at <= now) {
            restarts.remove(0);
            chaos.restart_postgres().await;
        }
        if now >= next_receiver {
            chaos.receiver_event(&mut back_at).await;
            next_receiver = now + rng.between(Duration::from_secs(1), Duration::from_secs(5));
        }
        for (r, at) in back_at.iter_mut().enumerate() {
            if at.is_some_and(|at| at <= now) {
                chaos.receivers[r].come_back().await;
                *at = None;
            }
        }
        if now >= next_lag {
            chaos.sample_lag().await;
            next_lag = now + Duration::from_secs(1);
        }
        tokio::time::sleep(TICK).await;
    }

    // The end: receivers well, A running, the writer done; then everything must be
    // stored and delivered.
    for receiver in &chaos.receivers {
        receiver.set_flaky(false);
        receiver.come_back().await;
    }
    if chaos.instances[0].daemon.is_none() {
        chaos.instances[0].start_at = Some(Instant::now());
    }
    let log = writer.stop().await;
    let store = connect(&chaos.db.url())
        .await
        .expect("connect to the store");
    let want = log.changes.len() as i64;
    let deadline = Instant::now() + DRAIN;
    let mut stored = workload::stored_events(&store).await;
    while stored < want && Instant::now() < deadline {
        chaos.supervise();
        tokio::time::sleep(TICK).await;
        stored = workload::stored_events(&store).await;
    }
    if stored < want {
        chaos.tally.failures.push(format!(
            "after {DRAIN:?}, {stored} of {want} events stored; A's log tail:\n{}",
            chaos.instances[0]
                .daemon
                .as_ref()
                .map(|d| log_tail(&d.log(), 30))
                .unwrap_or_default()
        ));
    }
    chaos
        .tally
        .failures
        .extend(workload::check_exactly_once(&store, &log.changes).await);

    // G4: every (event, subscription) answered 2xx at least once.
    let mut delivered = 0;
    let mut duplicates = 0;
    let mut requests = 0;
    for (r, subscription) in SUBSCRIPTIONS.into_iter().enumerate() {
        let due: Vec<String> = store
            .query(
                "SELECT id FROM walhook.events WHERE $1 = ANY (subscriptions)",
                &[&subscription],
            )
            .await
            .expect("events due to a subscription")
            .iter()
            .map(|r| r.get(0))
            .collect();
        // A backlog left by a long run takes its time: wait while deliveries progress
        // (at least DRAIN, at most DRAIN plus the run's length), and fail at once when
        // none is answered for STALL.
        let began = Instant::now();
        let cap = DRAIN + Duration::from_secs(settings.secs);
        let mut missing = due.len();
        let mut last_progress = Instant::now();
        let mut stalled = false;
        while began.elapsed() < cap {
            let got = chaos.receivers[r].delivered_ids();
            let now_missing = due.iter().filter(|id| !got.contains(*id)).count();
            if now_missing < missing {
                last_progress = Instant::now();
            }
            missing = now_missing;
            if missing == 0 {
                break;
            }
            if last_progress.elapsed() > STALL && began.elapsed() > DRAIN.min(STALL * 2) {
                stalled = true;
                break;
            }
            chaos.supervise();
            tokio::time::sleep(TICK).await;
        }
        eprintln!(
            "subscription {subscription}: {} deliveries, {missing} missing after a drain of {:.0?}",
            due.len(),
            began.elapsed()
        );
        if missing > 0 {
            let why = if stalled {
                format!("none answered 2xx for {STALL:?}")
            } else {
                format!("still progressing after {cap:?}")
            };
            chaos.tally.failures.push(format!(
                "subscription {subscription}: {missing} of {} deliveries never answered 2xx ({why})",
                due.len()
            ));
        }
        let receiver = &chaos.receivers[r];
        let all = receiver.requests();
        let ok = all.iter().filter(|r| r.answered_ok.is_some()).count();
        requests += all.len();
        delivered += due.len();
        duplicates += ok.saturating_sub(receiver.delivered_ids().len());
        for violation in chaos.receivers[r].order_violations() {
            chaos
                .tally
                .failures
                .push(format!("G5, subscription {subscription}: {violation}"));
        }
    }
    let dead: i64 = store
        .query_one(
            "SELECT count(*) FROM walhook.deliveries WHERE status = 'dead'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    if dead > 0 {
        chaos
            .tally
            .failures
            .push(format!("{dead} deliveries went dead"));
    }

    // Everyone stops cleanly.
    chaos.supervise();
    for i in 0..2 {
        if let Some(mut daemon) = chaos.instances[i].daemon.take() {
            let young = Duration::from_secs(3).saturating_sub(chaos.instances[i].started.elapsed());
            tokio::time::sleep(young).await;
            if let Some(rss) = daemon.peak_rss_kib() {
                chaos.tally.max_rss_kib = chaos.tally.max_rss_kib.max(rss);
            }
            daemon.signal(libc::SIGTERM);
            let status = daemon.wait_exit(Duration::from_secs(30));
            if !status.success() {
                chaos.tally.failures.push(format!(
                    "instance {} exited with {status} on SIGTERM; log tail:\n{}",
                    chaos.instances[i].name,
                    log_tail(&daemon.log(), 15)
                ));
            }
        }
    }
    let tally = &mut chaos.tally;
    if tally.max_rss_kib > RSS_LIMIT_KIB {
        tally.failures.push(format!(
            "G6: peak RSS {} KiB over the bound {RSS_LIMIT_KIB} KiB",
            tally.max_rss_kib
        ));
    }

    eprintln!(
        "chaos run: seed {}, {} s, {} transactions ({} with an unanswered COMMIT)\n\
         | changes | events | deliveries | requests | duplicates sent | kills | PG restarts | longest restart | max RSS | max lag |\n\
         |---|---|---|---|---|---|---|---|---|---|\n\
         | {} | {stored} | {delivered} | {requests} | {duplicates} | {} | {} | {:.2} s | {:.1} MiB | {:.1} MiB |",
        settings.seed,
        settings.secs,
        log.transactions,
        log.unanswered_commits,
        log.changes.len(),
        tally.kills,
        tally.pg_restarts,
        tally.longest_restart.as_secs_f64(),
        tally.max_rss_kib as f64 / 1024.0,
        tally.max_lag_bytes / (1024.0 * 1024.0),
    );
    assert!(
        tally.failures.is_empty(),
        "chaos run (seed {}) broke guarantees:\n- {}",
        settings.seed,
        tally.failures.join("\n- ")
    );
}

/// The subscriptions, in the order of the receivers.
const SUBSCRIPTIONS: [&str; 2] = ["all", "accounts"];

/// Two subscriptions with short timeouts and a fast retry schedule, so that failures
/// cost seconds; nothing goes dead within the run.
fn chaos_config(db: &TestDb, receivers: &[ChaosReceiver]) -> String {
    format!(
        r#"
[source]
url = "postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

[server]
listen = "127.0.0.1:0"

[daemon]
shutdown_grace = "2s"

{tables}
[[subscriptions]]
name = "{all}"
url = "{url_all}"
events = ["*"]
timeout = "1s"
[subscriptions.retry]
backoff = ["100ms", "500ms", "1s", "2s"]
max_age = "1h"

[[subscriptions]]
name = "{accounts}"
url = "{url_accounts}"
events = ["account.*", "order.*"]
timeout = "1s"
[subscriptions.retry]
backoff = ["100ms", "500ms", "1s", "2s"]
max_age = "1h"
"#,
        port = db.port,
        name = db.name,
        tables = workload::tables_toml(TABLES),
        all = SUBSCRIPTIONS[0],
        accounts = SUBSCRIPTIONS[1],
        url_all = receivers[0].url,
        url_accounts = receivers[1].url,
    )
}

/// The last `n` lines of a daemon log.
fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
