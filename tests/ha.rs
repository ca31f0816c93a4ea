//! High availability (G8): two `walhook run` processes with one config. One holds the
//! slot and ingests; the other stands by. SIGKILL the holder under load: the other
//! takes the slot and the deliveries over within 15 s, nothing is lost, revisions stay
//! gap-free, and every revision reaches the receiver in order. A frozen holder is
//! fenced once the standby took over, and stands by when thawed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::daemon::{USERS_TABLE, assert_exactly_once, config, event_count, write_random};
use crate::support::daemon::{Daemon, Workdir, wait_leading};
use crate::support::pg::{Cluster, TestDb, create_db};
use crate::support::receiver::Receiver;
use crate::support::wait_for;
use crate::support::workload::{self, ONE_TABLE, Writer};
use tokio_postgres::Client;

const WAIT: Duration = Duration::from_secs(90);
/// The issue's bound on a takeover.
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

    // Load: a writer commits small random transactions at a steady pace (about 1,000
    // transactions, 2,500 changes a second) until told to stop. Unpaced, it wrote as
    // fast as the machine let it: some 240,000 changes in the ten seconds of the
    // takeover, whose delivery by the debug build then took 70-90 s alone and more than
    // the wait below on a loaded machine.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let mut rng = crate::daemon::Rng::new();
            let mut live = vec![false; 200];
            let mut log = Vec::new();
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
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

    let before = holder(&client, &db.name).await;
    first.kill9();
    let killed = Instant::now();
    wait_takeover(
        &client,
        &db.name,
        before,
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
    let deadline = Instant::now() + WAIT;
    loop {
        let top = newest_revisions(&receiver);
        if top == expected {
            break;
        }
        if Instant::now() >= deadline {
            let missing: Vec<_> = expected
                .iter()
                .filter(|(id, rev)| top.get(*id) != Some(rev))
                .map(|(id, rev)| format!("{id}: {:?} of {rev}", top.get(id)))
                .collect();
            let log = second.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            panic!(
                "timed out after {WAIT:?} waiting for every revision delivered; {} entities \
                 short of it, newest received revision of some: {:?}\ndelivery state: {}\n\
                 the second instance's log, last 200 lines:\n{}",
                missing.len(),
                &missing[..missing.len().min(20)],
                delivery_state(&store).await,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slot_taken < TAKEOVER,
        "slot taken over {slot_taken:?} after the kill (bound {TAKEOVER:?})"
    );
    assert!(
        delivering < TAKEOVER + Duration::from_secs(5),
        "deliveries resumed {delivering:?} after the kill"
    );
    assert!(second.is_running(), "{}", second.log());
    eprintln!(
        "takeover: slot after {slot_taken:?}, deliveries after {delivering:?}; {} changes",
        log.len()
    );
}

/// The newest revision received per entity id, checking that none arrived before its
/// predecessor (a revision sent by a killed instance may arrive again).
fn newest_revisions(receiver: &Receiver) -> HashMap<String, i64> {
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
    top
}

/// The subscriptions' cursors and leases, the retry rows and the log's end, for a
/// failure message.
async fn delivery_state(store: &Client) -> String {
    let queries = [
        "SELECT coalesce(json_agg(s)::text, '') FROM walhook.subscription_state s",
        "SELECT coalesce(json_agg(r)::text, '') FROM (SELECT subscription, seq, status, \
         attempts, next_attempt_at, last_status, last_error FROM walhook.delivery_retries \
         ORDER BY seq LIMIT 20) r",
        "SELECT coalesce(json_agg(c)::text, '') FROM walhook.checkpoints c",
    ];
    let mut out = String::new();
    for q in queries {
        match store.query_one(q, &[]).await {
            Ok(row) => out.push_str(&format!("\n{}", row.get::<_, String>(0))),
            Err(e) => out.push_str(&format!("\n{q}: {e}")),
        }
    }
    out
}

/// Who holds slot `slot`: its walsender's pid and the store's leader epoch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Holder {
    pub active_pid: i32,
    pub epoch: i64,
}

/// The current [`Holder`] of `slot` (the slot must be active and led).
pub(crate) async fn holder(client: &Client, slot: &str) -> Holder {
    holder_now(client, slot)
        .await
        .unwrap_or_else(|| panic!("slot {slot} has no active holder"))
}

async fn holder_now(client: &Client, slot: &str) -> Option<Holder> {
    let row = client
        .query_opt(
            "SELECT s.active_pid, c.leader_epoch FROM pg_replication_slots s \
             JOIN walhook.checkpoints c ON c.slot = s.slot_name \
             WHERE s.slot_name = $1 AND s.active AND c.leader IS NOT NULL",
            &[&slot],
        )
        .await
        .ok()??;
    Some(Holder {
        active_pid: row.get(0),
        epoch: row.get(1),
    })
}

/// The server's sessions (pid, backend type, state, wait event, query start), for a
/// failure message.
async fn sessions(client: &Client) -> String {
    let rows = client
        .query(
            "SELECT pid, backend_type, coalesce(state, ''), coalesce(wait_event, ''), \
             left(coalesce(query, ''), 60) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| {
            format!(
                "{} {} {} {} {}\n",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4)
            )
        })
        .collect()
}

/// Waits until `daemon` (running) took slot `slot` over from `before`: a new walsender
/// (another `active_pid`; a dead one may still be marked active for a while) and a
/// higher leader epoch in the store. Returns the new holder.
pub(crate) async fn wait_takeover(
    client: &Client,
    slot: &str,
    before: Holder,
    daemon: &mut Daemon,
    what: &str,
) -> Holder {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            daemon.is_running(),
            "{what}: walhook exited: {}",
            daemon.log()
        );
        if let Some(now) = holder_now(client, slot).await
            && now.active_pid != before.active_pid
            && now.epoch > before.epoch
        {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what} (a walsender other than pid {} and a leader epoch above {}); now {:?}; sessions:\n{}\nits log:\n{}",
            before.active_pid,
            before.epoch,
            holder_now(client, slot).await,
            sessions(client).await,
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two `walhook run` instances with one config (one watched table) on a new database of
/// `cluster`: the database, the work directory (to keep), a client, the leading
/// instance and the one standing by.
async fn leader_and_standby(cluster: &Cluster) -> (TestDb, Workdir, Client, Daemon, Daemon) {
    let db = cluster.create_db().await;
    db.batch(&workload::create_sql(ONE_TABLE)).await;
    let toml = format!(
        "[source]\nurl = \"{}?sslmode=disable\"\nslot = \"{}\"\n\n[server]\nlisten = \"127.0.0.1:0\"\n\n{}",
        db.url(),
        db.name,
        workload::tables_toml(ONE_TABLE)
    );
    let work = Workdir::new(&toml);
    let client = db.client().await;
    let mut first = work.spawn_run(0);
    wait_leading(&db, &mut first).await;
    let second = work.spawn_run(1);
    wait_for("the second instance to stand by", WAIT, || async {
        second.log().contains("standing by")
    })
    .await;
    (db, work, client, first, second)
}

/// G8 epoch fencing: the ingest holder is frozen (SIGSTOP) under a write load, its
/// walsender times out (the cluster's `wal_sender_timeout` is 2 s), and the standby
/// takes the slot and leads (new walsender, higher epoch). Thawed (SIGCONT), the old
/// holder commits nothing more: every change is stored exactly once, revisions stay
/// gap-free and the log stays in commit order. It does not exit either: it stands by,
/// and leads again when the new holder dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_is_fenced_after_a_takeover_and_stands_by() {
    // A frozen holder may be inside an ingest transaction, holding the checkpoint row
    // the standby must lock to take over: PostgreSQL ends such a session after 3 s when
    // it is idle in the transaction, as it would end the session of a vanished host once
    // TCP gives up; the new holder ends it after 5 s when it is inside a COPY (below).
    let cluster = Cluster::start_with(&[
        ("wal_sender_timeout", "2s"),
        ("idle_in_transaction_session_timeout", "3s"),
    ]);
    let (db, _work, client, mut first, mut second) = leader_and_standby(&cluster).await;

    let seed = workload::Rng::seed_from_env("WALHOOK_TEST_SEED");
    let writer = Writer::spawn(db.url(), ONE_TABLE, 200, seed, Duration::from_millis(5));
    wait_for("the first 300 events stored", WAIT, || async {
        workload::stored_events(&client).await > 300
    })
    .await;

    let before = holder(&client, &db.name).await;
    first.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    wait_takeover(
        &client,
        &db.name,
        before,
        &mut second,
        "the standby to take over from the frozen holder",
    )
    .await;
    let took_over = frozen.elapsed();
    // The new holder ingests: 300 more events stored while the old one is frozen.
    let stored = workload::stored_events(&client).await;
    wait_for("the new holder to store 300 events", WAIT, || async {
        workload::stored_events(&client).await > stored + 300
    })
    .await;

    let seen = first.log().len();
    first.signal(libc::SIGCONT);
    // Thawed, the old holder finds itself deposed and stands by (it may not exit).
    let deadline = Instant::now() + WAIT;
    while !first.log()[seen..].contains("standing by") {
        assert!(
            first.is_running(),
            "the deposed holder exited instead of standing by; log since SIGCONT:\n{}",
            &first.log()[seen..]
        );
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for the thawed holder to stand by; log since SIGCONT:\n{}",
            &first.log()[seen..]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = workload::stored_events(&client).await;
    wait_for("300 more events after the thaw", WAIT, || async {
        workload::stored_events(&client).await > stored + 300
    })
    .await;
    assert!(first.is_running(), "{}", &first.log()[seen..]);

    // It leads again once the new holder is gone.
    let now = holder(&client, &db.name).await;
    second.kill9();
    wait_takeover(
        &client,
        &db.name,
        now,
        &mut first,
        "the old holder to lead again",
    )
    .await;
    let log = writer.stop().await;
    let want = log.changes.len() as i64;
    wait_for(&format!("{want} events stored"), WAIT, || async {
        workload::stored_events(&client).await >= want
    })
    .await;
    workload::assert_exactly_once(&client, &log.changes).await;
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(WAIT).success(), "{}", first.log());
    eprintln!("takeover from a frozen holder after {took_over:?}");
}

/// G8 with a holder frozen inside an ingest COPY: its store session keeps the checkpoint
/// row locked and waits for COPY data in state `active`, where neither
/// `idle_in_transaction_session_timeout` nor `statement_timeout` ends it. The test plays
/// that session (the row locked, a COPY begun and never fed) and kills the holder; the
/// standby takes the slot, ends the stalled session and leads within the takeover bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stalled_mid_copy_holding_the_checkpoint_is_ended_by_the_new_holder() {
    let cluster = Cluster::start();
    let (db, _work, client, mut first, mut second) = leader_and_standby(&cluster).await;

    let mut stalled = db.client().await;
    let tx = stalled.transaction().await.expect("begin");
    tx.execute(
        "SELECT 1 FROM walhook.checkpoints WHERE slot = $1 FOR UPDATE",
        &[&db.name],
    )
    .await
    .expect("lock the checkpoint row");
    tx.batch_execute("CREATE TEMP TABLE fed (x int)")
        .await
        .expect("temp table");
    let sink = tx
        .copy_in::<_, bytes::Bytes>("COPY fed FROM STDIN")
        .await
        .expect("begin a COPY");
    let stalled_pid: i32 = client
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'COPY fed%' AND state = 'active'",
            &[],
        )
        .await
        .expect("the stalled session")
        .get(0);

    let before = holder(&client, &db.name).await;
    first.signal(libc::SIGKILL);
    first.wait_exit(WAIT);
    let killed = Instant::now();
    wait_takeover(
        &client,
        &db.name,
        before,
        &mut second,
        "the standby to end the stalled session and lead",
    )
    .await;
    let took_over = killed.elapsed();
    let ended = client
        .query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1",
            &[&stalled_pid],
        )
        .await
        .expect("pg_stat_activity");
    assert!(
        ended.is_none(),
        "the stalled session {stalled_pid} is still there"
    );
    assert!(
        second.log().contains(&stalled_pid.to_string()),
        "the new holder's log does not name the session it ended ({stalled_pid}) after \
         {took_over:?}:\n{}\nthe killed holder's log:\n{}\nthe server's log:\n{}",
        second.log(),
        first.log(),
        std::fs::read_to_string(cluster.log_path()).unwrap_or_default()
    );
    drop(sink);
    assert!(
        took_over < TAKEOVER,
        "took over {took_over:?} after the kill (bound {TAKEOVER:?})"
    );
    second.signal(libc::SIGTERM);
    assert!(second.wait_exit(WAIT).success(), "{}", second.log());
    eprintln!("takeover past a session stalled mid-COPY after {took_over:?}");
}
