//! Delivery end to end: the real `walhook run`, a real receiver on 127.0.0.1, signatures
//! checked with the independent `standardwebhooks` crate, per-entity order under random
//! failures (G4, G5), and 410 Gone disabling one subscription while others flow. Leases
//! across instances are in `lease`, a session restarted behind retry rows in `restart`,
//! outbound proxies in `proxy`, v1a signatures and CloudEvents bodies in `formats`,
//! Security Event Tokens and their JWKS in `set`, Slack messages in `slack`.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::{create_db, users_db};
use crate::support::receiver::{Received, Receiver};
use crate::support::wait_for;

mod backlog;
mod batches;
mod faults;
mod formats;
mod lease;
mod proxy;
mod restart;
mod set;
mod slack;

const WAIT: Duration = Duration::from_secs(60);
/// `whsec_` + base64 of 32 bytes.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A `[[subscriptions]]` entry sending the events `events` (a TOML array of globs)
/// matches to `url`; more keys of it may follow.
fn subscription(name: &str, url: &str, events: &str) -> String {
    format!("\n[[subscriptions]]\nname = \"{name}\"\nurl = \"{url}\"\nevents = {events}\n")
}

/// For each entity, the revisions answered 2xx, in arrival order; panics if a revision
/// was attempted before the previous one was answered 2xx (G5): before that revision's
/// 2xx arrived, or before the receiver had begun to send it.
fn delivered_in_order(received: &[Received]) -> HashMap<String, Vec<i64>> {
    let mut delivered: HashMap<String, Vec<i64>> = HashMap::new();
    // Per entity, when the 2xx of its last delivered revision began to be sent.
    let mut answered: HashMap<String, std::time::Instant> = HashMap::new();
    for r in received {
        let body = r.json();
        let id = body["entity_id"].as_str().unwrap().to_owned();
        let rev = body["revision"].as_i64().unwrap();
        let done = delivered.entry(id.clone()).or_default();
        let last = done.last().copied().unwrap_or(0);
        assert!(
            rev <= last + 1,
            "entity {id}: revision {rev} attempted before {} was delivered",
            last + 1
        );
        if rev == last + 1
            && let Some(sent) = answered.get(&id)
        {
            assert!(
                r.at >= *sent,
                "entity {id}: revision {rev} arrived {:?} before the receiver began to send the 2xx of revision {last}",
                *sent - r.at
            );
        }
        if (200..300).contains(&r.status)
            && rev == last + 1
            && let Some(sent) = r.answered_at
        {
            done.push(rev);
            answered.insert(id, sent);
        }
    }
    delivered
}

#[tokio::test]
async fn deliveries_are_signed_and_verify_with_standardwebhooks() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "crm"
url = "{}"
events = ["user.*"]
secret = "{SECRET}"
headers = {{ Authorization = "Bearer t0ken" }}
"#,
            receiver.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    for i in 0..5 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
        db.batch(&format!("UPDATE users SET n = 1 WHERE id = {i}"))
            .await;
    }
    wait_for("10 deliveries", WAIT, || async {
        receiver.received().len() >= 10
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log());
    let got = receiver.received();
    assert_eq!(got.len(), 10, "each event once");
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    for r in &got {
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &r.headers {
            headers.insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        wh.verify(&r.body, &headers).expect("signature verifies");
        let body = r.json();
        assert_eq!(r.headers["webhook-id"], body["id"].as_str().unwrap());
        assert!(r.headers["user-agent"].starts_with("walhook/"));
        assert_eq!(r.headers["authorization"], "Bearer t0ken");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(body["entity"], "user");
        assert!(body["source"]["table"] == "public.users");
    }
    let delivered = delivered_in_order(&got);
    for i in 0..5 {
        assert_eq!(delivered[&i.to_string()], [1, 2]);
    }
    assert!(
        !daemon.log().contains("t0ken"),
        "an auth header reached the log"
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

#[tokio::test]
async fn random_failures_keep_per_entity_order_and_lose_nothing() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| if fastrand::bool() { 200 } else { 500 }).await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "flaky"
url = "{}"
events = ["user.*"]

[subscriptions.retry]
backoff = ["50ms", "100ms", "200ms"]
max_age = "1h"
"#,
            receiver.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let entities = 20;
    let updates = 5;
    for i in 0..entities {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    for n in 1..=updates {
        db.batch(&format!("UPDATE users SET n = {n}")).await;
    }
    let want = (updates + 1) as usize;
    wait_for(
        "every revision of every entity answered 2xx",
        WAIT * 2,
        || async {
            let delivered = delivered_in_order(&receiver.received());
            delivered.len() == entities as usize
                && delivered.values().all(|revs| revs.len() == want)
        },
    )
    .await;
    let delivered = delivered_in_order(&receiver.received());
    let expected: Vec<i64> = (1..=want as i64).collect();
    for revs in delivered.values() {
        assert_eq!(revs, &expected);
    }
    assert!(
        receiver.received().iter().any(|r| r.status == 500),
        "the receiver failed some requests"
    );
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test]
async fn gone_disables_one_subscription_while_others_flow() {
    let db = users_db().await;
    let gone = Receiver::start(|_| 410).await;
    let fine = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &(subscription("gone", &gone.url, r#"["user.*"]"#)
            + &subscription("fine", &fine.url, r#"["user.*"]"#)),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a', 0)").await;
    wait_for("the 410", WAIT, || async { !gone.received().is_empty() }).await;
    let client = db.client().await;
    wait_for("subscription `gone` disabled", WAIT, || async {
        client
            .query_opt("SELECT 1 FROM walhook.subscription_state WHERE subscription = 'gone' AND NOT enabled", &[])
            .await
            .map(|r| r.is_some())
            .unwrap_or(false)
    })
    .await;
    for i in 2..6 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'a', 0)"))
            .await;
    }
    wait_for("5 deliveries to `fine`", WAIT, || async {
        fine.received().len() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gone.received().len(),
        1,
        "a disabled subscription gets nothing more"
    );
    let dead: i64 = client
        .query_one("SELECT count(*) FROM walhook.deliveries WHERE subscription = 'gone' AND status = 'dead'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dead, 1);
}

/// A subscription reads the log in bounded windows: an event due to it after a long
/// stretch of events due only to others (more than one window) still arrives, in
/// order, and its cursor passes the stretch.
#[tokio::test]
async fn a_rare_event_after_a_long_stretch_of_others_arrives() {
    let db = users_db().await;
    let rare = Receiver::start(|_| 200).await;
    let all = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &(subscription("rare", &rare.url, r#"["user.deleted"]"#)
            + &subscription("all", &all.url, r#"["user.*"]"#)
            + "max_in_flight = 64\n"),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (0, 'a', 0); DELETE FROM users WHERE id = 0")
        .await;
    db.batch("INSERT INTO users SELECT g, 'a', 0 FROM generate_series(1, 12000) g")
        .await;
    db.batch("DELETE FROM users WHERE id = 7").await;
    wait_for("two deletions to `rare`", WAIT, || async {
        rare.received().len() >= 2
    })
    .await;
    wait_for("12,003 events to `all`", WAIT, || async {
        all.received().len() >= 12_003
    })
    .await;
    let ids: Vec<String> = rare
        .received()
        .iter()
        .map(|r| r.json()["entity_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["0", "7"]);
    let client = db.client().await;
    wait_for("the cursor of `rare` at the head of the log", WAIT, || async {
        client
            .query_one(
                "SELECT cursor = (SELECT max(seq) FROM walhook.events) FROM walhook.subscription_state WHERE subscription = 'rare'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
}

#[tokio::test]
async fn thin_and_fields_bodies_have_exactly_the_configured_shape() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, password_hash text)")
        .await;
    let thin = Receiver::start(|_| 200).await;
    let shaped = Receiver::start(|_| 200).await;
    let toml = users_config(&db,
        &format!(
            r#"
[[subscriptions]]
name = "thin"
url = "{}"
events = ["user.*"]
payload = "thin"

[[subscriptions]]
name = "shaped"
url = "{}"
events = ["user.*"]
fields = {{ ApiResource = "entity_id", UpdateTimestamp = "occurred_at", ResourcePayload = "data", Revision = "revision" }}
"#,
            thin.url, shaped.url
        ),
    )
    .replace("entity = \"user\"", "entity = \"user\"\nexclude_columns = [\"password_hash\"]");
    let work = Workdir::new(&toml);
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (7, 'a@x', 'hash-secret')")
        .await;
    wait_for("both bodies", WAIT, || async {
        !thin.received().is_empty() && !shaped.received().is_empty()
    })
    .await;

    let body = thin.received()[0].json();
    let keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "id",
            "type",
            "entity",
            "entity_id",
            "revision",
            "occurred_at",
            "source"
        ]
    );
    assert_eq!(body["type"], "user.created");

    let body = shaped.received()[0].json();
    // JSON objects are unordered; figment hands `fields` over sorted by key.
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "ApiResource",
            "ResourcePayload",
            "Revision",
            "UpdateTimestamp"
        ]
    );
    assert_eq!(body["ApiResource"], "7");
    assert_eq!(body["Revision"], 1, "a number stays a number");
    assert_eq!(
        body["ResourcePayload"],
        serde_json::json!({"id": 7, "email": "a@x"})
    );
    assert!(body["UpdateTimestamp"].as_str().unwrap().ends_with('Z'));
    for r in thin.received().iter().chain(shaped.received().iter()) {
        assert!(
            !String::from_utf8_lossy(&r.body).contains("hash-secret"),
            "a redacted column was sent"
        );
    }
}

/// A receiver that takes 200 ms per request and records the most requests it had in
/// flight at once.
async fn slow_receiver() -> (Receiver, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n, p) = (now.clone(), peak.clone());
    let receiver = Receiver::start(move |_| {
        let inflight = n.fetch_add(1, Ordering::SeqCst) + 1;
        p.fetch_max(inflight, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        n.fetch_sub(1, Ordering::SeqCst);
        200
    })
    .await;
    (receiver, peak)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 12)]
async fn ordering_none_sends_one_entity_in_parallel_and_entity_ordering_does_not() {
    let db = users_db().await;
    let (parallel, parallel_peak) = slow_receiver().await;
    let (serial, serial_peak) = slow_receiver().await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "parallel"
url = "{}"
events = ["user.*"]
ordering = "none"

[[subscriptions]]
name = "serial"
url = "{}"
events = ["user.*"]
"#,
            parallel.url, serial.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    // One transaction, so all eight events reach the dispatcher in one round.
    let mut sql = String::from("INSERT INTO users VALUES (1, 'a', 0);");
    for n in 1..8 {
        sql.push_str(&format!("UPDATE users SET n = {n} WHERE id = 1;"));
    }
    db.batch(&sql).await;
    wait_for("8 deliveries to each", WAIT, || async {
        parallel.received().len() >= 8 && serial.received().len() >= 8
    })
    .await;
    let (p, s) = (
        parallel_peak.load(std::sync::atomic::Ordering::SeqCst),
        serial_peak.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert!(
        p > 1,
        "ordering = none: one entity's events went one at a time"
    );
    assert_eq!(s, 1, "ordering = entity: one entity's events overlapped");
    let revisions: Vec<i64> = serial
        .received()
        .iter()
        .map(|r| r.json()["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(revisions, (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn delivered_events_are_purged_after_retention_and_pending_ones_kept() {
    let db = users_db().await;
    let ok = Receiver::start(|_| 200).await;
    let toml = users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "ok"
url = "{}"
events = ["user.created"]

[[subscriptions]]
name = "down"
url = "http://127.0.0.1:9/hook"
events = ["user.updated"]

[subscriptions.retry]
backoff = ["1h"]
"#,
            ok.url
        ),
    )
    .replace("[server]", "[store]\nretention = \"1s\"\n\n[server]");
    let work = Workdir::new(&toml);
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    for i in 0..10 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'a', 0)"))
            .await;
    }
    db.batch("UPDATE users SET n = 1 WHERE id = 0").await;
    wait_for("10 deliveries", WAIT, || async {
        ok.received().len() >= 10
    })
    .await;
    let client = db.client().await;
    // The ten delivered creations go; the update, pending for `down`, stays.
    wait_for("the delivered events purged", WAIT, || async {
        client
            .query_one("SELECT count(*) FROM walhook.events", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    let left: String = client
        .query_one("SELECT type FROM walhook.events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, "user.updated");
    let status: String = client
        .query_one(
            "SELECT status FROM walhook.deliveries WHERE subscription = 'down'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "pending");
    assert!(daemon.is_running(), "{}", daemon.log());
}
