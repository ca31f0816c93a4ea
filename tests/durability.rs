//! G2 on a server whose default is `synchronous_commit = off`: walhook's ingest
//! transactions commit synchronously whatever the default, so an immediate stop (a
//! crash of the source PostgreSQL, which loses asynchronously committed transactions)
//! in the middle of a write load still leaves every change's events in the store
//! exactly once.

use std::time::{Duration, Instant};

use crate::support::daemon::{Workdir, wait_leading};
use crate::support::pg::{Cluster, StopMode};
use crate::support::wait_for;
use crate::support::workload::{self, ONE_TABLE, Rng, Writer};

const WAIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_stops_with_asynchronous_commit_by_default_lose_and_repeat_nothing() {
    let cluster = Cluster::start_with(&[("synchronous_commit", "off")]);
    let db = cluster.create_db().await;
    db.batch(&workload::create_sql(ONE_TABLE)).await;
    let default: String = db.query_one("SHOW synchronous_commit", &[]).await.get(0);
    assert_eq!(default, "off", "the server default this test is about");
    let work = Workdir::new(&crate::daemon::config(
        &db,
        &workload::tables_toml(ONE_TABLE),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let mut rng = Rng::new(Rng::seed_from_env("WALHOOK_TEST_SEED"));
    // The writer's own session commits synchronously: its log holds only what the
    // server keeps through a crash.
    let writer = Writer::spawn(
        db.url(),
        ONE_TABLE,
        300,
        rng.below(u64::MAX),
        Duration::from_millis(2),
    );
    for round in 1..=3 {
        let target = writer.committed() + 300;
        let client = db.client().await;
        wait_for("the writer to commit 300 more changes", WAIT, || async {
            writer.committed() >= target
        })
        .await;
        // Mid-load: the daemon has batches in flight (ingest lags the writer a little).
        let stored = workload::stored_events(&client).await;
        drop(client);
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || {
            c.stop(StopMode::Immediate);
            c.start_again();
        })
        .await
        .unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()));
        eprintln!(
            "immediate stop {round}: {} changes committed, {stored} stored just before",
            writer.committed()
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = writer.stop().await;
    let client = db.client().await;
    let want = log.changes.len() as i64;
    // A lost batch never arrives: after the wait, the check names what is missing.
    let deadline = Instant::now() + WAIT;
    while workload::stored_events(&client).await < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        daemon.is_running(),
        "walhook exited; log:\n{}",
        daemon.log()
    );
    workload::assert_exactly_once(&client, &log.changes).await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
}
