//! `batch_size`: several events of a subscription in one POST, a JSON array. A batch the
//! receiver does not take at once is kept in the store and every retry of it sends the
//! same bytes under the same `webhook-id`, after a `kill -9` too; per-entity order holds
//! with batches and random failures (G5), and nothing is lost (G4).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{SECRET, WAIT, delivered_in_order};
use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::{Received, Receiver};
use crate::support::wait_for;

/// The events of each request, as if each had come on its own (same status and times).
fn each_event(received: &[Received]) -> Vec<Received> {
    received
        .iter()
        .flat_map(|r| {
            let events = r.json().as_array().expect("a batch is an array").clone();
            events.into_iter().map(move |e| Received {
                body: serde_json::to_vec(&e).unwrap(),
                ..r.clone()
            })
        })
        .collect()
}

/// Whether the Standard Webhooks signature of `r` verifies.
fn verifies(r: &Received) -> bool {
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &r.headers {
        headers.insert(
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    wh.verify(&r.body, &headers).is_ok()
}

#[tokio::test]
async fn a_failed_batch_is_resent_byte_for_byte_under_its_id_after_a_kill() {
    let db = users_db().await;
    let healed = Arc::new(AtomicBool::new(false));
    let flag = healed.clone();
    let receiver = Receiver::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            200
        } else {
            503
        }
    })
    .await;
    let subs = format!(
        r#"
[[subscriptions]]
name = "bulk"
url = "{}"
events = ["user.*"]
secret = "{SECRET}"
batch_size = 50
[subscriptions.retry]
backoff = ["500ms"]
"#,
        receiver.url
    );
    let work = Workdir::new(&users_config(&db, &subs));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users SELECT i, 'u' || i || '@x', 0 FROM generate_series(1, 30) i")
        .await;
    wait_for("a failed batch", WAIT, || async {
        !receiver.received().is_empty()
    })
    .await;
    let first = receiver.received()[0].clone();
    let id = first.headers["webhook-id"].clone();
    assert!(id.starts_with("bat_"), "a batch has its own id: {id}");
    assert_eq!(first.headers["content-type"], "application/json");
    assert!(verifies(&first), "the batch is signed");
    let events = first.json().as_array().unwrap().len();
    assert!(events > 1, "one transaction's events go together: {events}");

    // The retry comes from the store, by another process.
    let client = db.client().await;
    wait_for("the batch kept", WAIT, || async {
        client
            .query_one(
                "SELECT count(*) FROM walhook.deliveries WHERE batch_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == events as i64
    })
    .await;
    daemon.kill9();
    healed.store(true, Ordering::SeqCst);
    let mut daemon = work.spawn_run(1);
    wait_for("all 30 delivered", WAIT, || async {
        let ok: Vec<Received> = receiver
            .received()
            .into_iter()
            .filter(|r| r.status == 200)
            .collect();
        each_event(&ok).len() >= 30
    })
    .await;
    let got = receiver.received();
    let resent: Vec<&Received> = got
        .iter()
        .filter(|r| r.headers["webhook-id"] == id)
        .collect();
    assert!(resent.len() >= 2, "the batch was retried");
    for r in &resent {
        assert_eq!(r.body, first.body, "a retry changed the batch's bytes");
        assert!(verifies(r));
    }
    let delivered = each_event(
        &got.into_iter()
            .filter(|r| r.status == 200)
            .collect::<Vec<_>>(),
    );
    let ids: HashSet<String> = delivered
        .iter()
        .map(|r| r.json()["entity_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!((delivered.len(), ids.len()), (30, 30), "each event once");
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'delivered'), count(*) FROM walhook.deliveries WHERE batch_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let (done, all): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!((done, all), (events as i64, events as i64));
    // The operator sees which batch an event went in.
    let event: String = client
        .query_one(
            "SELECT event_id FROM walhook.deliveries WHERE batch_id = $1 LIMIT 1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let (status, out, err) =
        work.run_to_end(&["deliveries", "show", &format!("{event}:bulk")], WAIT);
    assert!(status.success(), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("batch:") && l.ends_with(&id)),
        "{out}"
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

#[tokio::test]
async fn batches_keep_per_entity_order_under_30_percent_failures() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| if fastrand::u8(0..10) < 3 { 500 } else { 200 }).await;
    let subs = format!(
        r#"
[[subscriptions]]
name = "flaky"
url = "{}"
events = ["user.*"]
batch_size = 8
format = "cloudevents"
[subscriptions.retry]
backoff = ["50ms", "100ms", "200ms"]
max_age = "1h"
"#,
        receiver.url
    );
    let work = Workdir::new(&users_config(&db, &subs));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let (entities, updates) = (40, 5);
    db.batch(&format!(
        "INSERT INTO users SELECT i, 'u' || i || '@x', 0 FROM generate_series(0, {}) i",
        entities - 1
    ))
    .await;
    for n in 1..=updates {
        db.batch(&format!("UPDATE users SET n = {n}")).await;
    }
    // CloudEvents batch mode: the entity is the subject, the revision in data.
    let as_envelopes = |received: &[Received]| -> Vec<Received> {
        each_event(received)
            .into_iter()
            .map(|r| {
                let ce = r.json();
                let envelope = serde_json::json!({
                    "entity_id": ce["subject"],
                    "revision": ce["data"]["revision"],
                });
                Received {
                    body: serde_json::to_vec(&envelope).unwrap(),
                    ..r
                }
            })
            .collect()
    };
    let want = updates + 1;
    wait_for(
        "every revision of every entity answered 2xx",
        WAIT * 2,
        || async {
            let delivered = delivered_in_order(&as_envelopes(&receiver.received()));
            delivered.len() == entities && delivered.values().all(|revs| revs.len() == want)
        },
    )
    .await;
    let got = receiver.received();
    let delivered = delivered_in_order(&as_envelopes(&got));
    let expected: Vec<i64> = (1..=want as i64).collect();
    assert!(delivered.values().all(|revs| revs == &expected));
    assert!(got.iter().any(|r| r.status == 500), "some requests failed");
    assert!(
        got.iter()
            .all(|r| r.headers["content-type"] == "application/cloudevents-batch+json")
    );
    let largest = got
        .iter()
        .map(|r| r.json().as_array().unwrap().len())
        .max()
        .unwrap();
    assert!((2..=8).contains(&largest), "batches of up to 8: {largest}");
    assert!(daemon.is_running(), "{}", daemon.log());
}
