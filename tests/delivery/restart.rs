//! A dispatcher session that starts again from a cursor behind retry rows (its
//! predecessor stopped while an earlier event was still in flight): each event is
//! attempted from one source only, so attempts are counted, the backoff holds across the
//! restart, and the delivery goes dead or arrives once (issue 11 item b).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::WAIT;
use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::{Received, Receiver, Reply};
use crate::support::wait_for;

/// (seq, status, attempts) of the retry row of entity `id` for subscription `s`.
async fn retry_row(client: &Client, id: &str) -> Option<(i64, String, i32)> {
    client
        .query_opt(
            "SELECT seq, status, attempts FROM walhook.delivery_retries WHERE subscription = 's' AND entity_id = $1",
            &[&id],
        )
        .await
        .expect("read delivery_retries")
        .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// The requests the receiver got for entity `id`.
fn requests_for<'a>(got: &'a [Received], id: &str) -> Vec<&'a Received> {
    got.iter().filter(|r| r.json()["entity_id"] == id).collect()
}

#[tokio::test]
async fn ordering_none_restarted_behind_retry_rows_attempts_each_event_from_one_source() {
    let db = users_db().await;
    // Entity 1 is answered 200 after 6 s: in flight, it holds the cursor behind the
    // others. Entities 2 and 3 fail: 2 until it is dead, 3 until `healed`.
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let receiver = Receiver::start_with(move |r| match r.json()["entity_id"].as_str() {
        Some("1") => Reply::status(200).delay(Duration::from_secs(6)),
        Some("3") if h.load(Ordering::SeqCst) => Reply::status(200),
        _ => Reply::status(500),
    })
    .await;
    let backoff = Duration::from_secs(2);
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[daemon]
shutdown_grace = "1s"

[[subscriptions]]
name = "s"
url = "{}"
events = ["user.*"]
ordering = "none"
timeout = "30s"

[subscriptions.retry]
backoff = ["2s"]
max_age = "20s"
"#,
            receiver.url
        ),
    ));
    let mut first = work.spawn_run(0);
    wait_leading(&db, &mut first).await;
    for id in 1..=3 {
        db.batch(&format!("INSERT INTO users VALUES ({id}, 'a', 0)"))
            .await;
    }
    let client = db.client().await;
    wait_for("entities 2 and 3 retried once", WAIT, || async {
        for id in ["2", "3"] {
            if retry_row(&client, id).await.is_none_or(|(_, _, n)| n < 2) {
                return false;
            }
        }
        true
    })
    .await;

    // The session stops with entity 1 in flight (SIGTERM; the grace runs out before its
    // answer), so its cursor stays behind the retry rows of 2 and 3.
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(WAIT).success(), "{}", first.log());
    let cursor: i64 = client
        .query_one(
            "SELECT cursor FROM walhook.subscription_state WHERE subscription = 's'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for id in ["2", "3"] {
        let (seq, status, attempts) = retry_row(&client, id).await.expect("retry row");
        assert!(
            cursor < seq,
            "precondition: the cursor ({cursor}) is behind the retry row of entity {id} (seq {seq})"
        );
        assert_eq!(status, "pending");
        assert_eq!(
            attempts as usize,
            requests_for(&receiver.received(), id).len(),
            "entity {id}: attempts stored before the restart"
        );
    }

    let mut second = work.spawn_run(1);
    wait_leading(&db, &mut second).await;
    wait_for(
        "entity 2 retried twice more after the restart",
        WAIT,
        || async { requests_for(&receiver.received(), "2").len() >= 5 },
    )
    .await;
    healed.store(true, Ordering::SeqCst);
    wait_for(
        "entity 3 delivered and entity 2 dead (max_age 20 s)",
        WAIT,
        || async {
            retry_row(&client, "3")
                .await
                .is_some_and(|(_, s, _)| s == "delivered")
                && retry_row(&client, "2")
                    .await
                    .is_some_and(|(_, s, _)| s == "dead")
        },
    )
    .await;
    wait_for("entity 1 delivered", WAIT, || async {
        client
            .query_opt(
                "SELECT 1 FROM walhook.deliveries WHERE subscription = 's' AND entity_id = '1' AND status = 'delivered'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;

    let got = receiver.received();
    let mut attempts = HashMap::new();
    for id in ["2", "3"] {
        let requests = requests_for(&got, id);
        let (_, _, stored) = retry_row(&client, id).await.unwrap();
        attempts.insert(id, requests.len());
        assert_eq!(
            stored as usize,
            requests.len(),
            "entity {id}: every attempt counted once, none made twice (log:\n{})",
            second.log()
        );
        // The backoff is 2 s with +-20% jitter, counted from each answer.
        let times: Vec<Instant> = requests.iter().map(|r| r.at).collect();
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= backoff.mul_f64(0.75),
                "entity {id}: attempts {gap:?} apart, the backoff is {backoff:?} (attempt times {:?})",
                times.iter().map(|t| *t - times[0]).collect::<Vec<_>>()
            );
        }
    }
    assert_eq!(
        requests_for(&got, "3")
            .iter()
            .filter(|r| r.status == 200)
            .count(),
        1,
        "entity 3 answered 200 once"
    );
    let log = second.log();
    assert!(
        !log.contains("dispatching failed"),
        "the session failed (21000: one row twice in one statement?):\n{log}"
    );
    eprintln!("attempts per entity: {attempts:?}");
    second.signal(libc::SIGTERM);
    assert!(second.wait_exit(WAIT).success(), "{}", second.log());
}
