//! High availability (G8): two `walhook run` processes with one config. One holds the
//! slot and ingests; the other stands by. SIGKILL the holder under load: the other
//! takes the slot and the deliveries over within 15 s, nothing is lost, revisions stay
//! gap-free, and every revision reaches the receiver in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::daemon::{Rng, USERS_TABLE, assert_exactly_once, config, event_count, write_random};
use crate::support::daemon::{Daemon, wait_leading};
use crate::support::pg::create_db;
use crate::support::receiver::Receiver;
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(90);
/// The bound on a takeover.
const TAKEOVER: Duration = Duration::from_secs(15);

#[tokio::test]
async fn standby_takes_over_slot_and_deliveries_after_sigkill_under_load() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
        .await;
    let receiver = Receiver::start(|_| 200).await;
    let toml = format!(
        "{}\n[[subscriptions]]\nname = \"crm\"\nurl = \"{}\"\nevents = [\"user.*\"]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n",
        config(&db, USERS_TABLE),
        receiver.url
    );
    let work = crate::support::daemon::Workdir::new(&toml);
    let client = db.client().await;

    let mut first = work.spawn_run(0);
    // Holding the slot is not enough (a slot being created is active before its
    // consistent point): wait until the first instance leads ingest.
    wait_leading(&db, &mut first).await;
    let second = work.spawn_run(1);
    wait_for("the second instance to stand by", WAIT, || async {
        second.log().contains("standing by")
    })
    .await;
    let mut second = second;

    // Load: a writer commits small random transactions until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let mut rng = Rng::new();
            let mut live = vec![false; 200];
            let mut log = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                log.extend(write_random(&client, &mut rng, &mut live, 20).await);
            }
            log
        })
    };
    let store = db.client().await;
    wait_for("events to flow", WAIT, || async {
        event_count(&store).await > 300 && receiver.received().len() > 300
    })
    .await;

    first.kill9();
    let killed = Instant::now();
    wait_slot(
        &client,
        &db.name,
        &mut second,
        "the second instance to take the slot",
    )
    .await;
    let slot_taken = killed.elapsed();
    let before = receiver.received().len();
    wait_for("deliveries to resume", WAIT, || async {
        receiver.received().len() > before + 50
    })
    .await;
    let delivering = killed.elapsed();
    stop.store(true, Ordering::Relaxed);
    let log = writer.await.expect("writer");

    // Everything committed is stored exactly once with gap-free revisions...
    wait_for("every committed change stored", WAIT, || async {
        event_count(&store).await >= log.len() as i64
    })
    .await;
    assert_exactly_once(&store, &log).await;
    // ... and every revision arrives, in order per entity (a revision sent by the
    // killed instance may arrive again: duplicates are allowed after a crash).
    let mut expected: HashMap<String, i64> = HashMap::new();
    for (id, _) in &log {
        *expected.entry(id.to_string()).or_default() += 1;
    }
    wait_for("every revision delivered", WAIT, || async {
        let mut top: HashMap<String, i64> = HashMap::new();
        for r in receiver.received() {
            let body = r.json();
            let id = body["entity_id"].as_str().unwrap().to_owned();
            let rev = body["revision"].as_i64().unwrap();
            let seen = top.entry(id.clone()).or_default();
            assert!(
                rev <= *seen + 1,
                "entity {id}: revision {rev} arrived before {}",
                *seen + 1
            );
            *seen = (*seen).max(rev);
        }
        top == expected
    })
    .await;
    assert!(
        slot_taken < TAKEOVER,
        "slot taken over {slot_taken:?} after the kill (bound {TAKEOVER:?})"
    );
    assert!(
        delivering < TAKEOVER + Duration::from_secs(5),
        "deliveries resumed {delivering:?} after the kill"
    );
    assert!(second.is_running(), "{}", second.log());
    eprintln!("takeover: slot after {slot_taken:?}, deliveries after {delivering:?}");
}

/// Waits until slot `slot` is active while `daemon` runs.
async fn wait_slot(client: &tokio_postgres::Client, slot: &str, daemon: &mut Daemon, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            daemon.is_running(),
            "{what}: walhook exited: {}",
            daemon.log()
        );
        let active = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some();
        if active {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
