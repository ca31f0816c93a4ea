//! Backlogs through the real daemon: a receiver outage with thousands of events (each
//! delivered once, in order per entity, in bounded memory: G4, G5, G6), a CEL filter
//! whose rejected events never block, `store.paused_retention` turning a paused or
//! disabled subscription's old backlog dead, and `daemon.shutdown_grace` letting an
//! in-flight delivery finish.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{WAIT, delivered_in_order};
use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::{Cluster, create_db, users_db};
use crate::support::receiver::{Receiver, Reply};
use crate::support::wait_for;

/// Count of `walhook.deliveries` rows of `subscription` with `status`.
async fn count(client: &tokio_postgres::Client, subscription: &str, status: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM walhook.deliveries WHERE subscription = $1 AND status = $2",
            &[&subscription, &status],
        )
        .await
        .expect("count walhook.deliveries")
        .get(0)
}

/// Writes `revisions` revisions of each of `entities` new users (ids from `first`),
/// each event carrying an 8 KiB column: one INSERT transaction, then one UPDATE
/// transaction per further revision.
async fn write_backlog(db: &crate::support::pg::TestDb, first: i32, entities: i32, revisions: i32) {
    let last = first + entities - 1;
    db.batch(&format!(
        "INSERT INTO users SELECT i, repeat('x', 8192), 1 FROM generate_series({first}, {last}) i"
    ))
    .await;
    for n in 2..=revisions {
        db.batch(&format!(
            "UPDATE users SET n = {n} WHERE id BETWEEN {first} AND {last}"
        ))
        .await;
    }
}

/// Waits until the receiver has answered 200 to revisions 1..=`revisions` of every
/// entity in `ids` (at least `requests` requests in all), then checks each came
/// exactly once and in order.
async fn all_delivered_once(
    daemon: &crate::support::daemon::Daemon,
    receiver: &Receiver,
    ids: std::ops::Range<i32>,
    revisions: i64,
    requests: usize,
) {
    let want = ids.len();
    let deadline = Instant::now() + WAIT * 2;
    loop {
        // Cheap until enough requests arrived: the full check parses every body.
        if receiver.count() < requests && Instant::now() <= deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let done = delivered_in_order(&receiver.received());
        let complete = ids
            .clone()
            .filter(|i| done.get(&i.to_string()).map(Vec::len) == Some(revisions as usize))
            .count();
        if complete == want {
            break;
        }
        if Instant::now() > deadline {
            let log = daemon.log();
            panic!(
                "timed out after {:?} waiting for {want} entities x {revisions} revisions delivered ({complete} complete, {} requests); log tail:\n{}",
                WAIT * 2,
                receiver.received().len(),
                &log[log.len().saturating_sub(6000)..]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = receiver.received();
    let mut seen = HashSet::new();
    for r in &got {
        let body = r.json();
        let key = (
            body["entity_id"].as_str().unwrap().to_owned(),
            body["revision"].as_i64().unwrap(),
        );
        assert_eq!(r.status, 200);
        assert!(seen.insert(key.clone()), "{key:?} delivered twice");
    }
    let done = delivered_in_order(&got);
    let expected: Vec<i64> = (1..=revisions).collect();
    for i in ids {
        assert_eq!(done[&i.to_string()], expected, "entity {i}");
    }
}

/// Resets the peak resident set size (VmHWM) of process `pid` to its current size
/// (Linux: `5` into `/proc/PID/clear_refs`) and returns that size in KiB.
fn reset_peak_rss(pid: i32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receiver_outage_backlog_is_delivered_once_in_order_in_bounded_memory() {
    // A cluster of its own without fsync: every delivery of a backlog writes its retry
    // row in a transaction of its own, and 5,000 fsyncs would make this test much
    // longer. Durability across crashes is not what this test is about.
    let cluster = Cluster::start_with(&[("fsync", "off"), ("synchronous_commit", "off")]);
    let db = cluster.create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
        .await;
    let receiver = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "down"
url = "{}"
events = ["user.*"]

[subscriptions.retry]
backoff = ["2s"]
max_age = "1h"
"#,
            receiver.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let client = db.client().await;
    let entities = 500;
    let t0 = Instant::now();

    // A short outage: 1,000 events.
    receiver.stop();
    write_backlog(&db, 0, entities, 2).await;
    wait_for("1,000 events pending", WAIT, || async {
        count(&client, "down", "pending").await == 1_000
    })
    .await;
    eprintln!("{:?} small backlog written", t0.elapsed());
    receiver.restart().await;
    all_delivered_once(&daemon, &receiver, 0..entities, 2, 1_000).await;
    eprintln!("{:?} small backlog delivered", t0.elapsed());
    let small = daemon.peak_rss_kib().expect("VmHWM");

    // A longer one: 4,000 more events, 32 revisions of 125 entities (an entity's
    // events wait behind its first one), the receiver's port closed for 12 s.
    receiver.stop();
    let down_since = Instant::now();
    let (long, revisions) = (125, 32);
    write_backlog(&db, entities, long, revisions).await;
    // Only the first event of each new entity is attempted; the rest queue behind it.
    let attempted = || async {
        client
            .query_one(
                "SELECT count(*) FROM walhook.delivery_retries WHERE subscription = 'down' AND attempts > 0 AND status = 'pending'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    wait_for(
        "4,000 events pending, the first of each entity attempted",
        WAIT,
        || async {
            count(&client, "down", "pending").await == 4_000 && attempted().await == long as i64
        },
    )
    .await;
    let ingested = daemon.peak_rss_kib().expect("VmHWM");
    eprintln!(
        "{:?} large backlog written, peak RSS {ingested} KiB",
        t0.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(down_since.elapsed())).await;
    assert_eq!(
        attempted().await,
        long as i64,
        "a later revision was attempted while an earlier one was pending (G5)"
    );
    assert!(daemon.is_running(), "{}", daemon.log());
    // What holding the backlog would take: its events' data as JSON text (a parsed
    // value or a rendered body is no smaller).
    let backlog_kib = client
        .query_one(
            "SELECT sum(octet_length(e.data::text) + coalesce(octet_length(e.previous::text), 0))::int8 / 1024
             FROM walhook.deliveries d JOIN walhook.events e ON e.seq = d.seq
             WHERE d.subscription = 'down' AND d.status = 'pending'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0) as u64;
    // Ingesting 32 MiB of events has a peak of its own: the peak is reset, so what
    // follows measures the delivery of the backlog alone.
    let before = reset_peak_rss(daemon.pid());
    receiver.restart().await;
    all_delivered_once(
        &daemon,
        &receiver,
        entities..entities + long,
        revisions as i64,
        5_000,
    )
    .await;
    eprintln!("{:?} large backlog delivered", t0.elapsed());
    assert_eq!(receiver.received().len(), 1_000 + 4_000);
    let large = daemon.peak_rss_kib().expect("VmHWM");
    let grown = large.saturating_sub(before);
    eprintln!(
        "walhook peak RSS: {small} KiB after delivering a 1,000-event backlog; {ingested} KiB after ingesting 4,000 more; \
         delivering them from {before} KiB peaked at {large} KiB (+{grown} KiB for a {backlog_kib} KiB backlog)"
    );
    // The dispatcher holds a bounded number of events at once, never the backlog: here
    // one retry query's rows, the oldest of each entity (125 rows, a thirty-second of
    // the backlog, held as fetched rows, parsed values and request bodies). Holding the
    // backlog would take more than its 32 MiB of text; a bounded window measured +6 to
    // +10 MiB, most of it a fixed cost (allocator arenas, buffers) that does not grow
    // with the backlog. With 250 entities x 16 revisions (a sixteenth held) the same
    // test measured +10 to +19 MiB, too close to the backlog to tell the two apart.
    // Alone it measures +3 to +4 MiB; in the fresh-clone CI, beside the other tests, it
    // once measured +16 MiB (allocator pages released after ingest and touched again),
    // so the bound is three quarters of the backlog's text: holding the backlog would
    // take the whole text and more (parsed values are larger than their JSON).
    assert!(
        grown < backlog_kib * 3 / 4,
        "peak RSS grew by {grown} KiB delivering a {backlog_kib} KiB backlog (from {before} KiB to {large} KiB) (G6)"
    );
    wait_for("no pending delivery left", WAIT, || async {
        count(&client, "down", "pending").await == 0
    })
    .await;
}

#[tokio::test]
async fn filter_sends_only_matching_events_and_rejected_ones_never_block() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, status text)")
        .await;
    // The very first request fails, so later events of entity 1 queue behind it.
    let first = Arc::new(AtomicUsize::new(0));
    let f = first.clone();
    let filtered = Receiver::start(move |_| {
        if f.fetch_add(1, Ordering::SeqCst) == 0 {
            500
        } else {
            200
        }
    })
    .await;
    let all = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "suspended"
url = "{}"
events = ["user.*"]
filter = "event.data.status == 'suspended'"

[subscriptions.retry]
backoff = ["200ms"]

[[subscriptions]]
name = "all"
url = "{}"
events = ["user.*"]
"#,
            filtered.url, all.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    // One transaction: revision 1 (matches, answered 500), 2 (rejected), 3 (matches).
    db.batch(
        "BEGIN;
         INSERT INTO users VALUES (1, 'a', 'suspended');
         UPDATE users SET status = 'active' WHERE id = 1;
         UPDATE users SET status = 'suspended' WHERE id = 1;
         COMMIT;",
    )
    .await;
    db.batch("INSERT INTO users VALUES (2, 'b', 'active'), (3, 'c', 'active')")
        .await;
    // Revisions answered 200 (delivered_in_order does not fit: rejected revisions are
    // never sent, so revision numbers skip).
    let delivered = || -> Vec<i64> {
        filtered
            .received()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.json()["revision"].as_i64().unwrap())
            .collect()
    };
    wait_for("revisions 1 and 3 delivered", WAIT, || async {
        delivered().len() >= 2
    })
    .await;
    assert_eq!(delivered(), [1, 3]);
    let client = db.client().await;
    wait_for("no pending delivery of `suspended`", WAIT, || async {
        count(&client, "suspended", "pending").await == 0
    })
    .await;
    // Later events of the same entity are not blocked either.
    db.batch("UPDATE users SET status = 'active' WHERE id = 1; UPDATE users SET status = 'suspended' WHERE id = 1")
        .await;
    wait_for("revision 5 delivered", WAIT, || async {
        delivered().len() >= 3
    })
    .await;
    wait_for("7 events to `all`", WAIT, || async {
        all.received().len() >= 7
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<(String, i64, u16)> = filtered
        .received()
        .iter()
        .map(|r| {
            let b = r.json();
            assert_eq!(
                b["data"]["status"], "suspended",
                "a rejected event was sent"
            );
            (
                b["entity_id"].as_str().unwrap().to_owned(),
                b["revision"].as_i64().unwrap(),
                r.status,
            )
        })
        .collect();
    let want =
        [(1, 500), (1, 200), (3, 200), (5, 200)].map(|(rev, status)| ("1".to_owned(), rev, status));
    assert_eq!(got, want);
    assert_eq!(count(&client, "suspended", "pending").await, 0);
    assert_eq!(count(&client, "suspended", "dead").await, 0);
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test]
async fn paused_and_disabled_backlogs_go_dead_after_paused_retention() {
    let db = users_db().await;
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let held = Receiver::start(move |_| if h.load(Ordering::SeqCst) { 200 } else { 500 }).await;
    let off = Receiver::start(|_| 200).await;
    let ok = Receiver::start(|_| 200).await;
    let toml = users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "held"
url = "{}"
events = ["user.*"]

[subscriptions.retry]
backoff = ["1h"]

[[subscriptions]]
name = "off"
url = "{}"
events = ["user.*"]

[[subscriptions]]
name = "ok"
url = "{}"
events = ["user.*"]
"#,
            held.url, off.url, ok.url
        ),
    )
    .replace("[server]", "[store]\npaused_retention = \"2s\"\n\n[server]");
    let work = Workdir::new(&toml);
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.execute(
        "UPDATE walhook.subscription_state SET enabled = false, disabled_reason = 'test' WHERE subscription = 'off'",
        &[],
    )
    .await;
    let client = db.client().await;
    // `held` fails its first delivery (a pending retry, due in an hour), then is paused.
    db.batch("INSERT INTO users VALUES (1, 'a', 0)").await;
    wait_for("the failed attempt of `held` recorded", WAIT, || async {
        client
            .query_opt(
                "SELECT 1 FROM walhook.delivery_retries WHERE subscription = 'held' AND attempts = 1 AND status = 'pending'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    db.execute(
        "UPDATE walhook.subscription_state SET paused = true WHERE subscription = 'held'",
        &[],
    )
    .await;
    db.batch("INSERT INTO users VALUES (2, 'b', 0), (3, 'c', 0)")
        .await;
    wait_for("3 deliveries to `ok`", WAIT, || async {
        ok.received().len() >= 3
    })
    .await;
    for name in ["held", "off"] {
        wait_for(
            &format!("the 3 deliveries of `{name}` dead"),
            WAIT,
            || async { count(&client, name, "dead").await == 3 },
        )
        .await;
    }
    let rows = client
        .query(
            "SELECT subscription, entity_id, attempts, last_status, last_error FROM walhook.deliveries
             WHERE subscription IN ('held', 'off') ORDER BY subscription, seq",
            &[],
        )
        .await
        .unwrap();
    let mut errors: HashMap<(String, String), (i32, Option<i32>, String)> = HashMap::new();
    for r in &rows {
        errors.insert(
            (r.get(0), r.get(1)),
            (
                r.get(2),
                r.get(3),
                r.get::<_, Option<String>>(4).unwrap_or_default(),
            ),
        );
    }
    let held_1 = &errors[&("held".to_owned(), "1".to_owned())];
    assert_eq!((held_1.0, held_1.1), (1, Some(500)), "the attempt is kept");
    for ((sub, id), (_, _, error)) in &errors {
        let why = if sub == "held" {
            "subscription paused"
        } else {
            "subscription disabled"
        };
        assert!(
            error.starts_with(why) && error.contains("store.paused_retention (2s)"),
            "{sub} {id}: last_error {error:?}"
        );
    }
    let behind: i64 = client
        .query_one(
            "SELECT count(*) FROM walhook.subscription_state WHERE subscription IN ('held', 'off')
               AND cursor < (SELECT max(seq) FROM walhook.events)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(behind, 0, "the cursors moved past the dead backlog");
    assert_eq!(count(&client, "ok", "delivered").await, 3);
    assert!(off.received().is_empty());

    // Resumed, `held` gets new events only: the dead backlog is not sent.
    healed.store(true, Ordering::SeqCst);
    db.execute(
        "UPDATE walhook.subscription_state SET paused = false WHERE subscription = 'held'",
        &[],
    )
    .await;
    db.batch("INSERT INTO users VALUES (4, 'd', 0)").await;
    wait_for("user 4 delivered to `held`", WAIT, || async {
        held.received().iter().any(|r| r.status == 200)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = held
        .received()
        .iter()
        .map(|r| r.json()["entity_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["1", "4"]);
    assert_eq!(count(&client, "held", "dead").await, 3);
    assert!(daemon.is_running(), "{}", daemon.log());
}

// Multi-threaded: the receiver must answer while this thread blocks in `wait_exit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_delivery_finish_within_shutdown_grace() {
    let db = users_db().await;
    let slow_answer = Arc::new(AtomicBool::new(true));
    let s = slow_answer.clone();
    let receiver = Receiver::start_with(move |_| {
        let reply = Reply::status(200);
        if s.load(Ordering::SeqCst) {
            reply.delay(Duration::from_secs(2))
        } else {
            reply
        }
    })
    .await;
    let toml = users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "slow"
url = "{}"
events = ["user.*"]
"#,
            receiver.url
        ),
    )
    .replace("[server]", "[daemon]\nshutdown_grace = \"10s\"\n\n[server]");
    let work = Workdir::new(&toml);
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a', 0)").await;
    wait_for("the request in flight", WAIT, || async {
        !receiver.received().is_empty()
    })
    .await;
    let term = Instant::now();
    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(Duration::from_secs(15));
    let took = term.elapsed();
    assert!(status.success(), "exit {status:?}: {}", daemon.log());
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM: it must wait for the 2 s answer, within the 10 s grace"
    );
    assert_eq!(
        receiver.answered(),
        1,
        "the answer was read: {}",
        daemon.log()
    );

    // Restarted, the delivered event is not sent again.
    slow_answer.store(false, Ordering::SeqCst);
    let mut daemon = work.spawn_run(1);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (2, 'b', 0)").await;
    wait_for("user 2 delivered", WAIT, || async {
        receiver.received().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.json()["entity_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["1", "2"], "user 1 was sent again after the restart");
    let client = db.client().await;
    assert_eq!(count(&client, "slow", "delivered").await, 2);
}
