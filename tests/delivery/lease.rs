//! Dispatch leases across instances (G8): a lease is refused to another instance even
//! on the same host with the same PID, every delivery-state write is fenced by it, and a
//! dispatcher frozen (SIGSTOP) past its lease neither writes nor sends anything once it
//! runs again, while the instance that took over delivers each event.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::Client;
use walhook::pg::ConnInfo;
use walhook::store::deliveries::{AttemptRecord, DueEvent};
use walhook::store::{Store, StoreError};

use super::WAIT;
use crate::support::daemon::{Daemon, Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::{Received, Receiver, Reply};
use crate::support::wait_for;

/// Waits until `daemon`'s log holds `needle` at least `times` times.
async fn wait_log(daemon: &Daemon, needle: &str, times: usize) {
    wait_for(
        &format!("{times} x `{needle}` in the log"),
        WAIT,
        || async { daemon.log().matches(needle).count() >= times },
    )
    .await;
}

/// Waits until `daemon` logged that another instance took subscription `name` over.
async fn wait_lost(daemon: &Daemon, name: &str) {
    let field = format!("subscription={name}");
    wait_for(
        &format!("the log to say another instance dispatches `{name}` now"),
        WAIT,
        || async {
            daemon
                .log()
                .lines()
                .any(|l| l.contains("another instance") && l.contains(&field))
        },
    )
    .await;
}

/// The instance id a daemon logged at start.
fn instance_id(daemon: &Daemon) -> String {
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("instance id"))
        .unwrap_or_else(|| panic!("no instance id in the log:\n{log}"));
    let id = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("instance="))
        .unwrap_or_else(|| panic!("no instance= in {line:?}"));
    id.to_owned()
}

/// A stored event as the store hands it to a dispatcher (only `seq` and the entity
/// matter to the writes tested here).
fn due(seq: i64) -> DueEvent {
    DueEvent {
        seq,
        id: format!("evt_{seq}").into(),
        event_type: "user.created".into(),
        entity: "user".into(),
        entity_id: seq.to_string().into(),
        revision: 1,
        occurred_at: SystemTime::now(),
        data: std::sync::Arc::from(
            serde_json::value::RawValue::from_string("{}".to_owned()).unwrap(),
        ),
        previous: None,
        changed: None,
        table: "public.users".into(),
        lsn: "0/0".into(),
        xid: 1,
        context: None,
        attempts: 0,
        first_due_at: SystemTime::now(),
        batch: None,
    }
}

fn retry_record() -> AttemptRecord<'static> {
    AttemptRecord {
        status: "pending",
        attempts: 1,
        next_attempt_at: SystemTime::now(),
        last_status: Some(500),
        last_error: Some("http 500"),
        last_response: None,
        batch_id: None,
    }
}

/// Every write a dispatcher makes, as `owner`: all refused with `LeaseLost`.
async fn assert_all_writes_refused(store: &Store, owner: &str) {
    let event = due(7);
    let lost = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::LeaseLost { subscription }) => assert_eq!(subscription, "s"),
        other => panic!("{what} as {owner}: {other:?}, not LeaseLost"),
    };
    lost(
        store
            .record_attempts("s", owner, &[(&event, retry_record())], &[])
            .await,
        "record_attempts",
    );
    lost(
        store.queue_behind("s", owner, &[&event]).await,
        "queue_behind",
    );
    lost(
        store.forget_pending("s", owner, &[7]).await,
        "forget_pending",
    );
    lost(
        store.advance_cursor("s", owner, 7, true).await,
        "advance_cursor",
    );
    lost(
        store.disable_subscription("s", owner, "gone").await,
        "disable_subscription",
    );
}

/// What the store holds of subscription `s`: its retry rows, cursor and enabled flag.
async fn delivery_state(client: &Client) -> (Vec<String>, i64, bool) {
    let rows = client
        .query(
            "SELECT format('%s %s %s %s %s', seq, status, attempts, next_attempt_at, updated_at) FROM walhook.delivery_retries
             WHERE subscription = 's' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let state = client
        .query_one(
            "SELECT cursor, enabled FROM walhook.subscription_state WHERE subscription = 's'",
            &[],
        )
        .await
        .unwrap();
    (rows, state.get(0), state.get(1))
}

#[tokio::test]
async fn a_lease_is_refused_to_another_instance_on_the_same_host_and_pid_and_fences_writes() {
    let db = users_db().await;
    let params = ConnInfo::parse(&db.url()).expect("test URL parses");
    let mut store = Store::connect(&params, "walhook").await.expect("store");
    store.migrate().await.expect("migrations");
    store.ensure_subscriptions(&["s".into()]).await.unwrap();
    let client = db.client().await;

    // Two instances in containers on one host network, both PID 1 in a process
    // namespace of their own: what tells them apart is the random part.
    let (a, b) = (
        walhook::daemon::instance_id(),
        walhook::daemon::instance_id(),
    );
    assert_ne!(a, b, "two instance ids of one process are equal");
    let host_pid = |id: &str| id.rsplit_once(':').unwrap().0.to_owned();
    assert_eq!(host_pid(&a), host_pid(&b), "{a} / {b}");
    let (a, b) = (format!("{a}/0"), format!("{b}/0"));

    assert!(
        store
            .lease_subscription("s", &a, 10.0)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .lease_subscription("s", &b, 10.0)
            .await
            .unwrap()
            .is_none(),
        "a second instance with the same host and pid took a held lease"
    );
    let before = delivery_state(&client).await;
    assert_all_writes_refused(&store, &b).await;
    assert_eq!(
        delivery_state(&client).await,
        before,
        "a refused write wrote"
    );

    // The holder writes; then its lease runs out, the other takes it, and the first
    // one's writes are refused.
    store
        .record_attempts("s", &a, &[(&due(5), retry_record())], &[])
        .await
        .expect("the holder records an attempt");
    store.advance_cursor("s", &a, 6, true).await.unwrap();
    assert!(
        store
            .lease_subscription("s", &a, 0.05)
            .await
            .unwrap()
            .is_some()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        store
            .lease_subscription("s", &b, 10.0)
            .await
            .unwrap()
            .is_some(),
        "an expired lease is taken over"
    );
    let before = delivery_state(&client).await;
    assert_eq!(before.0.len(), 1);
    assert_eq!(before.1, 6);
    assert_all_writes_refused(&store, &a).await;
    assert_eq!(
        delivery_state(&client).await,
        before,
        "a refused write wrote"
    );

    // One event twice in one record (an event attempted from two sources) is one row.
    let (e, mut last) = (due(9), retry_record());
    last.attempts = 2;
    store
        .record_attempts("s", &b, &[(&e, retry_record()), (&e, last)], &[])
        .await
        .expect("one event twice in one statement");
    let attempts: i32 = client
        .query_one(
            "SELECT attempts FROM walhook.delivery_retries WHERE subscription = 's' AND seq = 9",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 2, "the last record of the event is kept");
}

/// Per entity id, the revisions of the requests in arrival order.
fn revisions_by_entity(got: &[Received]) -> HashMap<String, Vec<i64>> {
    let mut by: HashMap<String, Vec<i64>> = HashMap::new();
    for r in got {
        let body = r.json();
        by.entry(body["entity_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["revision"].as_i64().unwrap());
    }
    by
}

#[tokio::test]
async fn a_dispatcher_frozen_past_its_lease_writes_and_sends_nothing_once_resumed() {
    let db = users_db().await;
    // Failing (500 after 300 ms, so attempts are in flight most of the time) until
    // healed once the first instance is frozen.
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let receiver = Receiver::start_with(move |_| {
        if h.load(Ordering::SeqCst) {
            Reply::status(200)
        } else {
            Reply::status(500).delay(Duration::from_millis(300))
        }
    })
    .await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "s"
url = "{}"
events = ["user.*"]
max_in_flight = 4

[subscriptions.retry]
backoff = ["1s"]
max_age = "1h"
"#,
            receiver.url
        ),
    ));
    let mut first = work.spawn_run(0);
    wait_leading(&db, &mut first).await;
    wait_log(&first, "dispatching this subscription", 1).await;
    let mut second = work.spawn_run(1);
    wait_log(&second, "waiting to hold the replication slot", 1).await;

    // 40 entities, 3 revisions each.
    db.batch("INSERT INTO users SELECT g, 'a', 0 FROM generate_series(1, 40) g")
        .await;
    db.batch("UPDATE users SET n = 1").await;
    db.batch("UPDATE users SET n = 2").await;
    let client = db.client().await;
    wait_for("120 events stored", WAIT, || async {
        client
            .query_one("SELECT count(*) FROM walhook.events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 120
    })
    .await;
    // Freeze the holder while the receiver holds some of its attempts.
    let deadline = Instant::now() + WAIT;
    while !(receiver.count() >= 12 && receiver.count() > receiver.answered()) {
        assert!(Instant::now() < deadline, "no attempts in flight");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    healed.store(true, Ordering::SeqCst);

    let all_delivered = || async {
        client
            .query_one(
                "SELECT count(*) FROM walhook.deliveries WHERE subscription = 's' AND status = 'delivered'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 120
    };
    wait_for(
        "the second instance to take over and deliver all 120",
        WAIT,
        all_delivered,
    )
    .await;
    wait_log(&second, "dispatching this subscription", 1).await;
    let settled = delivery_state(&client).await;
    let sent_before_resume = receiver.count();

    first.signal(libc::SIGCONT);
    let resumed = Instant::now();
    wait_lost(&first, "s").await;
    // A later marker: a new event, ingested by the first (still the slot holder) and
    // delivered by the second.
    db.batch("INSERT INTO users VALUES (1000, 'a', 0)").await;
    wait_for("user 1000 delivered", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.json()["entity_id"] == "1000" && r.status == 200)
    })
    .await;

    let (rows, cursor, enabled) = delivery_state(&client).await;
    assert_eq!(
        rows,
        settled.0,
        "retry rows changed after the takeover was complete (log of the resumed instance:\n{})",
        first.log()
    );
    assert!(cursor >= settled.1 && enabled);
    let got = receiver.received();
    for r in &got[sent_before_resume..] {
        assert_eq!(
            r.json()["entity_id"],
            "1000",
            "an event was sent again after the frozen instance resumed ({:?} after SIGCONT)",
            r.at.saturating_duration_since(resumed)
        );
    }
    for (id, revs) in revisions_by_entity(&got) {
        assert!(
            revs.is_sorted(),
            "entity {id}: an older revision arrived after a newer one: {revs:?}"
        );
    }
    let mut ok = HashSet::new();
    for r in got.iter().filter(|r| r.status == 200) {
        let body = r.json();
        let key = (
            body["entity_id"].as_str().unwrap().to_owned(),
            body["revision"].as_i64().unwrap(),
        );
        assert!(r.at > stopped, "{key:?} answered 200 before the takeover");
        assert!(ok.insert(key.clone()), "{key:?} delivered twice");
    }
    assert_eq!(ok.len(), 121);
    for d in [&first, &second] {
        assert!(!d.log().contains("panicked"), "{}", d.log());
    }
    assert_ne!(instance_id(&first), instance_id(&second));
    second.signal(libc::SIGTERM);
    first.signal(libc::SIGTERM);
    assert!(second.wait_exit(WAIT).success(), "{}", second.log());
    assert!(first.wait_exit(WAIT).success(), "{}", first.log());
}

/// Webhook id -> seq of every stored event.
async fn seqs(client: &Client) -> HashMap<String, i64> {
    client
        .query("SELECT id, seq FROM walhook.events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The cursor and lease owner of `subscription`.
async fn cursor_and_owner(client: &Client, subscription: &str) -> (i64, String) {
    let r = client
        .query_one(
            "SELECT cursor, lease_owner FROM walhook.subscription_state WHERE subscription = $1",
            &[&subscription],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// What holds for a delivery sent by two instances, the lease changing hands between
/// them: an event at or before the cursor the first left is sent once; one after it at
/// most twice, and then first by the first instance (it was in flight or its 2xx not yet
/// behind the cursor when the first froze) and again by the second. Returns how many
/// were sent twice.
fn check_hand_over(
    name: &str,
    got: &[Received],
    seqs: &HashMap<String, i64>,
    due: usize,
    cursor: i64,
    stopped: Instant,
) -> usize {
    let mut sent: HashMap<&str, Vec<Instant>> = HashMap::new();
    for r in got {
        sent.entry(r.headers["webhook-id"].as_str())
            .or_default()
            .push(r.at);
    }
    assert_eq!(sent.len(), due, "{name}: every event sent");
    let mut twice = 0;
    for (id, times) in &sent {
        let seq = seqs[*id];
        match times.as_slice() {
            [_] => {}
            [a, b] if seq > cursor && *a < stopped && *b > stopped => twice += 1,
            _ => panic!(
                "{name}: event {id} (seq {seq}, cursor left at {cursor}) sent {} times, at {:?} from the SIGSTOP",
                times.len(),
                times
                    .iter()
                    .map(|t| t
                        .checked_duration_since(stopped)
                        .map_or(-1.0, |d| d.as_secs_f64()))
                    .collect::<Vec<_>>()
            ),
        }
    }
    assert!(
        got.iter().any(|r| r.at < stopped) && got.iter().any(|r| r.at > stopped),
        "{name}: sent by both instances"
    );
    twice
}

#[tokio::test]
async fn two_processes_on_one_store_send_each_delivery_once() {
    let db = users_db().await;
    let slow = || Receiver::start_with(|_| Reply::status(200).delay(Duration::from_millis(50)));
    let (ra, rb) = (slow().await, slow().await);
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "a"
url = "{}"
events = ["user.*"]
max_in_flight = 2

[[subscriptions]]
name = "b"
url = "{}"
events = ["user.created"]
max_in_flight = 2
"#,
            ra.url, rb.url
        ),
    ));
    let mut first = work.spawn_run(0);
    wait_leading(&db, &mut first).await;
    wait_log(&first, "dispatching this subscription", 2).await;
    let client = db.client().await;
    let mut holders = HashMap::new();
    for name in ["a", "b"] {
        holders.insert(name, cursor_and_owner(&client, name).await.1);
    }
    let mut second = work.spawn_run(1);
    wait_log(&second, "waiting to hold the replication slot", 1).await;
    // Subscription a gets 200 events, b the 100 creations.
    db.batch("INSERT INTO users SELECT g, 'a', 0 FROM generate_series(0, 99) g")
        .await;
    db.batch("UPDATE users SET n = 1").await;
    wait_for("200 events stored", WAIT, || async {
        client
            .query_one("SELECT count(*) FROM walhook.events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 200
    })
    .await;
    // The lease changes hands mid-run: the holder freezes with a's backlog half sent.
    wait_for("40 deliveries to a", WAIT, || async { ra.count() >= 40 }).await;
    first.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    // A statement the frozen process sent just before has committed within a second;
    // the lease (10 s) is still its own.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut left = HashMap::new();
    for name in ["a", "b"] {
        let (cursor, holder) = cursor_and_owner(&client, name).await;
        assert_eq!(holder, holders[name], "{name}: the frozen holder's lease");
        left.insert(name, cursor);
    }
    assert!(ra.count() < 200, "a was done before the freeze");

    let distinct = |r: &Receiver| {
        r.received()
            .iter()
            .map(|g| g.headers["webhook-id"].clone())
            .collect::<HashSet<_>>()
            .len()
    };
    wait_for("all 300 deliveries", WAIT, || async {
        distinct(&ra) >= 200 && distinct(&rb) >= 100
    })
    .await;
    wait_log(&second, "dispatching this subscription", 2).await;
    first.signal(libc::SIGCONT);
    let resumed = Instant::now();
    wait_lost(&first, "a").await;
    wait_lost(&first, "b").await;
    db.batch("INSERT INTO users VALUES (1000, 'a', 0)").await;
    let got_1000 = |r: &Receiver| r.received().iter().any(|g| g.json()["entity_id"] == "1000");
    wait_for("user 1000 sent to a and b", WAIT, || async {
        got_1000(&ra) && got_1000(&rb)
    })
    .await;
    assert!(
        first.is_running() && second.is_running(),
        "{}\n{}",
        first.log(),
        second.log()
    );

    for (name, receiver) in [("a", &ra), ("b", &rb)] {
        for r in receiver.received().iter().filter(|r| r.at > resumed) {
            assert_eq!(
                r.json()["entity_id"],
                "1000",
                "{name}: an event was sent again after the frozen instance resumed"
            );
        }
    }
    let seqs = seqs(&client).await;
    let mut twice = 0;
    for (name, receiver, due) in [("a", &ra, 201), ("b", &rb, 101)] {
        twice += check_hand_over(name, &receiver.received(), &seqs, due, left[name], stopped);
    }
    eprintln!("sent twice across the hand-over: {twice}");
}
