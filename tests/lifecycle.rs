//! The database's edges (G7, G9): walhook never holds up a `pg_ctl stop/restart -m fast`
//! of its source (idle, under load, mid-batch, with the store unreachable), keeps
//! ingesting after each restart, and an idle watched set does not retain WAL after a
//! watched write. Every restart is timed; none may take 10 s.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::daemon::{Rng, assert_exactly_once, config, event_count, write_random};
use crate::support::daemon::{Daemon, Workdir, wait_leading, wait_leading_with_store};
use crate::support::pg::{Cluster, StopMode, TestDb, create_db};
use crate::support::wait_for_some;

const WAIT: Duration = Duration::from_secs(60);
/// No stop or restart of the source may take longer with walhook attached (G9). Alone,
/// a fast stop of these clusters takes well under a second.
const STOP_LIMIT: Duration = Duration::from_secs(10);
const USERS: &str = "[[tables]]\ntable = \"public.users\"\nentity = \"user\"\n";

/// Stops the source with `-m fast` and starts it again; fails if the stop takes
/// `STOP_LIMIT` or more. Returns how long the stop took.
async fn timed_restart(cluster: &Cluster, daemon: &mut Daemon, what: &str) -> Duration {
    let c = cluster.clone();
    let took = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        c.stop(StopMode::Fast);
        let took = started.elapsed();
        c.start_again();
        took
    })
    .await
    .unwrap();
    assert!(
        took < STOP_LIMIT,
        "{what}: the fast stop took {took:?} with walhook attached; walhook log:\n{}",
        daemon.log()
    );
    eprintln!("{what}: fast stop took {took:?}");
    took
}

async fn users_db(cluster: &Cluster) -> (TestDb, Client) {
    let db = cluster.create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int); CREATE TABLE busy (id serial PRIMARY KEY, v int);")
        .await;
    let client = db.client().await;
    (db, client)
}

/// Waits until the store holds `n` events, or fails with the daemon's log.
async fn wait_events(db: &TestDb, n: i64, daemon: &mut Daemon) {
    let started = Instant::now();
    loop {
        if let Ok(client) = crate::support::pg::connect(&db.url()).await
            && event_count(&client).await >= n
        {
            return;
        }
        assert!(
            daemon.is_running(),
            "walhook exited while {n} events were awaited; log:\n{}",
            daemon.log()
        );
        assert!(
            started.elapsed() < WAIT,
            "waited {WAIT:?} for {n} events; walhook log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 11 item 1: after one restart the next watched change must be ingested (not
/// wedged), and the restarts after it must not hang on walhook's confirmations.
#[tokio::test]
async fn fast_restarts_with_walhook_idle_are_quick_and_ingest_goes_on() {
    let cluster = Cluster::start();
    let (db, _) = users_db(&cluster).await;
    let work = Workdir::new(&config(&db, USERS));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let mut rng = Rng::new();
    let mut live = vec![false; 100];
    let mut log = Vec::new();
    for round in 0..3 {
        timed_restart(&cluster, &mut daemon, &format!("idle restart {round}")).await;
        let writer = db.client().await;
        log.extend(write_random(&writer, &mut rng, &mut live, 5).await);
        wait_events(&db, log.len() as i64, &mut daemon).await;
    }
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
    assert_exactly_once(&db.client().await, &log).await;
}

/// G9 under load: a writer commits watched changes through every stop.
#[tokio::test]
async fn fast_restarts_under_load_are_quick_and_exactly_once() {
    let cluster = Cluster::start();
    let (db, _) = users_db(&cluster).await;
    let work = Workdir::new(&config(&db, USERS));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let url = db.url();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The writer inserts fresh ids only, so what committed is exactly what the table
    // holds afterwards, also for a commit whose answer was lost to a stop.
    let writer = tokio::spawn(async move {
        let mut next = 0;
        while !*stop_rx.borrow() {
            let Ok(client) = crate::support::pg::connect(&url).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            while !*stop_rx.borrow() {
                let sql = format!(
                    "INSERT INTO users (id, email, n) SELECT g, 'u' || g, 0 FROM generate_series({}, {}) g",
                    next + 1,
                    next + 5
                );
                next += 5;
                if client.batch_execute(&sql).await.is_err() {
                    break;
                }
            }
        }
    });
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        timed_restart(
            &cluster,
            &mut daemon,
            &format!("restart under load {round}"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send_replace(true);
    writer.await.unwrap();
    let client = db.client().await;
    let log: Vec<(i32, &'static str)> = client
        .query("SELECT id FROM users ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), "user.created"))
        .collect();
    assert!(
        log.len() > 30,
        "the writer committed only {} changes",
        log.len()
    );
    wait_events(&db, log.len() as i64, &mut daemon).await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
    assert_exactly_once(&db.client().await, &log).await;
}

/// G9 mid-batch: the stop begins while walhook ingests a large transaction.
#[tokio::test]
async fn a_fast_stop_while_a_large_transaction_is_ingested_is_quick() {
    let cluster = Cluster::start();
    let (db, client) = users_db(&cluster).await;
    let work = Workdir::new(&config(&db, USERS));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    client
        .batch_execute("INSERT INTO users (id, email, n) SELECT g, 'u' || g, 0 FROM generate_series(1, 100000) g")
        .await
        .unwrap();
    // Stop once ingest has begun on the transaction, before it is done.
    wait_for_some("ingest to begin on the large transaction", WAIT, || async {
        let n = event_count(&client).await;
        (n > 0).then_some(())
    })
    .await;
    drop(client);
    timed_restart(&cluster, &mut daemon, "stop mid-batch").await;
    wait_events(&db, 100_000, &mut daemon).await;
    let client = db.client().await;
    let (events, entities): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*), count(DISTINCT entity_id) FROM walhook.events",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((events, entities), (100_000, 100_000), "each row once");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
}

/// G9 with the store unreachable: walhook holds changes it cannot store; the source's
/// fast stop must not wait for it, and once both are back everything is stored once.
#[tokio::test]
async fn a_fast_stop_with_the_store_unreachable_is_quick() {
    let cluster = Cluster::start();
    let (db, client) = users_db(&cluster).await;
    let store_cluster = Cluster::start();
    let store_db = store_cluster.create_db().await;
    let toml = crate::daemon::config_with_store(&db, Some(&store_db), USERS);
    let work = Workdir::new(&toml);
    let mut daemon = work.spawn_run(0);
    wait_leading_with_store(&db, &store_db, &mut daemon).await;
    let sc = store_cluster.clone();
    tokio::task::spawn_blocking(move || sc.stop(StopMode::Fast))
        .await
        .unwrap();
    let mut rng = Rng::new();
    let mut live = vec![false; 50];
    let mut log = write_random(&client, &mut rng, &mut live, 20).await;
    drop(client);
    // Let walhook receive them (and fail to store them).
    tokio::time::sleep(Duration::from_secs(2)).await;
    timed_restart(&cluster, &mut daemon, "stop with the store down").await;
    timed_restart(&cluster, &mut daemon, "second stop with the store down").await;
    let sc = store_cluster.clone();
    tokio::task::spawn_blocking(move || sc.start_again())
        .await
        .unwrap();
    let client = db.client().await;
    log.extend(write_random(&client, &mut rng, &mut live, 5).await);
    let started = Instant::now();
    loop {
        if let Ok(c) = crate::support::pg::connect(&store_db.url()).await
            && event_count(&c).await >= log.len() as i64
        {
            break;
        }
        assert!(
            daemon.is_running(),
            "walhook exited; log:\n{}",
            daemon.log()
        );
        assert!(
            started.elapsed() < WAIT,
            "events never stored; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
    assert_exactly_once(&store_db.client().await, &log).await;
}

/// G7 (issue 11 item 2): after a watched write, only unwatched writes follow; the slot
/// must still reach the current WAL position.
#[tokio::test]
async fn after_a_watched_write_unwatched_writes_still_advance_the_slot() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int); CREATE TABLE busy (id serial PRIMARY KEY, v int);")
        .await;
    let work = Workdir::new(&config(&db, USERS));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let client = db.client().await;
    client
        .execute("INSERT INTO users (id, email, n) VALUES (1, 'a', 0)", &[])
        .await
        .unwrap();
    wait_events(&db, 1, &mut daemon).await;
    for i in 0..20 {
        client
            .execute("INSERT INTO busy (v) VALUES ($1)", &[&i])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let slot = db.name.clone();
    wait_for_some(
        "confirmed_flush_lsn to reach the WAL position after the unwatched writes",
        Duration::from_secs(30),
        || async {
            let row = client
                .query_one(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot, &target],
                )
                .await
                .unwrap();
            row.get::<_, bool>(0).then_some(())
        },
    )
    .await;
    assert_eq!(event_count(&client).await, 1);
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
}

/// Found by the long chaos run: a walhook started while PostgreSQL shuts down got "the
/// database system is shutting down" (57P03) at start-up and exited 1. It must wait for
/// the server and then lead.
#[tokio::test]
async fn run_started_while_postgres_shuts_down_waits_for_it() {
    let cluster = Cluster::start();
    let (db, holder) = users_db(&cluster).await;
    let work = Workdir::new(&config(&db, USERS));
    // A smart stop waits for the open session `holder`; new connections are refused.
    cluster.begin_smart_stop();
    wait_for_some("new connections refused as shutting down", WAIT, || async {
        match crate::support::pg::connect(&db.url()).await {
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW) => {
                Some(())
            }
            _ => None,
        }
    })
    .await;
    let mut daemon = work.spawn_run(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        daemon.is_running(),
        "walhook exited while PostgreSQL was shutting down; log:\n{}",
        daemon.log()
    );
    drop(holder);
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.restart(StopMode::Fast))
        .await
        .unwrap();
    wait_leading(&db, &mut daemon).await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO users VALUES (1, 'a@example.com', 1)")
        .await
        .unwrap();
    wait_events(&db, 1, &mut daemon).await;
}
