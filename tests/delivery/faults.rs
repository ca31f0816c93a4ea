//! Receivers that answer badly or not at all, through the real daemon: 429/503 with
//! `Retry-After` (seconds and HTTP date), a timeout, a redirect that is not followed, a
//! 10 MiB error body, a garbage body, an unresolvable host and an untrusted
//! certificate. Each is recorded as a retry with a clear `last_error`, never blocks
//! other subscriptions, and is delivered once the receiver answers 2xx (G4).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio_postgres::Client;

use super::WAIT;
use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::{Receiver, Reply};
use crate::support::wait_for;

/// One row of `walhook.deliveries`.
#[derive(Debug)]
struct Delivery {
    entity_id: String,
    status: String,
    attempts: i32,
    next_attempt_at: Option<SystemTime>,
    last_status: Option<i32>,
    last_error: Option<String>,
    last_response: Option<String>,
}

/// The deliveries of `subscription`, in event order.
async fn deliveries(client: &Client, subscription: &str) -> Vec<Delivery> {
    client
        .query(
            "SELECT entity_id, status, attempts, next_attempt_at, last_status, last_error, last_response
             FROM walhook.deliveries WHERE subscription = $1 ORDER BY seq",
            &[&subscription],
        )
        .await
        .expect("query walhook.deliveries")
        .iter()
        .map(|r| Delivery {
            entity_id: r.get(0),
            status: r.get(1),
            attempts: r.get(2),
            next_attempt_at: r.get(3),
            last_status: r.get(4),
            last_error: r.get(5),
            last_response: r.get(6),
        })
        .collect()
}

/// The one delivery of `subscription`, once it has `attempts` or more attempts and is
/// still pending.
async fn pending_after(client: &Client, subscription: &str, attempts: i32) -> Delivery {
    crate::support::wait_for_some(
        &format!("a pending delivery of `{subscription}` with {attempts}+ attempts"),
        WAIT,
        || async {
            let mut rows = deliveries(client, subscription).await;
            assert!(rows.len() <= 1, "{rows:?}");
            rows.pop()
                .filter(|d| d.status == "pending" && d.attempts >= attempts)
        },
    )
    .await
}

/// A receiver that answers `failing` until `healed`, then 200.
async fn failing_until(
    healed: &Arc<AtomicBool>,
    failing: impl Fn(&crate::support::receiver::Received) -> Reply + Send + Sync + 'static,
) -> Receiver {
    let healed = healed.clone();
    Receiver::start_with(move |r| {
        if healed.load(Ordering::SeqCst) {
            Reply::status(200)
        } else {
            failing(r)
        }
    })
    .await
}

/// The `Retry-After` date the 503 receiver sends for a request that arrived at `wall`:
/// three seconds later, cut to whole seconds as HTTP dates are.
fn retry_date(wall: SystemTime) -> String {
    httpdate::fmt_http_date(wall + Duration::from_secs(3))
}

#[tokio::test]
async fn bad_answers_are_retried_as_the_receiver_asks_then_delivered() {
    let db = users_db().await;
    let healed = Arc::new(AtomicBool::new(false));
    // 429 after 1 s of thinking, come back 2 s after the answer.
    let ra_secs = failing_until(&healed, |_| {
        Reply::status(429)
            .header("Retry-After", "2")
            .delay(Duration::from_secs(1))
    })
    .await;
    let ra_date = failing_until(&healed, |r| {
        Reply::status(503).header("Retry-After", &retry_date(r.wall))
    })
    .await;
    let slow = failing_until(&healed, |_| Reply::status(504).hang()).await;
    let target = Receiver::start(|_| 200).await;
    let location = target.url.clone();
    let redirect = failing_until(&healed, move |_| {
        Reply::status(302).header("Location", &location)
    })
    .await;
    // 10 MiB; its first KiB is recognisable.
    let huge_body: Arc<Vec<u8>> = Arc::new(
        b"0123456789abcdef"
            .iter()
            .copied()
            .cycle()
            .take(10 << 20)
            .collect(),
    );
    let first_kib = String::from_utf8(huge_body[..1024].to_vec()).unwrap();
    let body = huge_body.clone();
    let huge = failing_until(&healed, move |_| Reply::status(500).body(body.clone())).await;
    let garbage = failing_until(&healed, |_| {
        Reply::status(400).body(Arc::new(
            b"\x00\xff\xfe<html>\x00\x01\x02\xc3(\r\n\x00".to_vec(),
        ))
    })
    .await;

    let sub = |name: &str, url: &str, extra: &str| {
        format!(
            "[[subscriptions]]\nname = \"{name}\"\nurl = \"{url}\"\nevents = [\"user.*\"]\n{extra}\n"
        )
    };
    // Retry-After subscriptions have a long backoff: only the header can bring the
    // next attempt within the test's waits.
    let subs = [
        sub(
            "ra_secs",
            &ra_secs.url,
            "[subscriptions.retry]\nbackoff = [\"1m\"]",
        ),
        sub(
            "ra_date",
            &ra_date.url,
            "[subscriptions.retry]\nbackoff = [\"1m\"]",
        ),
        sub(
            "slow",
            &slow.url,
            "timeout = \"1s\"\n[subscriptions.retry]\nbackoff = [\"300ms\"]",
        ),
        sub(
            "redirect",
            &redirect.url,
            "[subscriptions.retry]\nbackoff = [\"300ms\"]",
        ),
        sub(
            "huge",
            &huge.url,
            "[subscriptions.retry]\nbackoff = [\"300ms\"]",
        ),
        sub(
            "garbage",
            &garbage.url,
            "[subscriptions.retry]\nbackoff = [\"300ms\"]",
        ),
    ]
    .concat();
    let work = Workdir::new(&users_config(&db, &subs));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a@x', 0)").await;
    let client = db.client().await;

    // 429, Retry-After: 2 (seconds), answered after 1 s: the next attempt comes no
    // earlier than 2 s after the answer, 3 s after the request arrived.
    let row = pending_after(&client, "ra_secs", 1).await;
    assert_eq!(row.last_status, Some(429), "{row:?}");
    assert_eq!(row.last_error.as_deref(), Some("http 429, retry-after"));
    // The request that produced `row`, and the one after it.
    let i = row.attempts as usize - 1;
    wait_for("another attempt after the 429", WAIT, || async {
        ra_secs.received().len() >= i + 2
    })
    .await;
    let got = ra_secs.received();
    let gap = got[i + 1].at - got[i].at;
    assert!(
        gap >= Duration::from_millis(2950) && gap < Duration::from_secs(10),
        "429 Retry-After: 2 after a 1 s answer: next attempt {gap:?} after the previous"
    );
    let next = row.next_attempt_at.expect("next_attempt_at");
    let since_request = next.duration_since(got[i].wall).unwrap_or_default();
    assert!(
        since_request >= Duration::from_millis(2950) && since_request < Duration::from_secs(6),
        "stored next_attempt_at is {since_request:?} after the first request"
    );

    // 503 with an HTTP date: the next attempt is due exactly then, and comes no earlier.
    let row = pending_after(&client, "ra_date", 1).await;
    assert_eq!(row.last_status, Some(503), "{row:?}");
    assert_eq!(row.last_error.as_deref(), Some("http 503, retry-after"));
    let i = row.attempts as usize - 1;
    wait_for("another attempt after the 503", WAIT, || async {
        ra_date.received().len() >= i + 2
    })
    .await;
    let got = ra_date.received();
    let date = httpdate::parse_http_date(&retry_date(got[i].wall)).unwrap();
    assert_eq!(
        row.next_attempt_at,
        Some(date),
        "next_attempt_at is the Retry-After date"
    );
    assert!(
        got[i + 1].wall >= date,
        "503 Retry-After {}: the next attempt came {:?} early",
        retry_date(got[i].wall),
        date.duration_since(got[i + 1].wall).unwrap_or_default()
    );

    // No answer within `timeout = "1s"`.
    let row = pending_after(&client, "slow", 1).await;
    assert_eq!(row.last_status, None, "{row:?}");
    assert_eq!(row.last_error.as_deref(), Some("timeout after 1s"));

    // 302: recorded, not followed.
    let row = pending_after(&client, "redirect", 1).await;
    assert_eq!(row.last_status, Some(302), "{row:?}");
    assert_eq!(row.last_error.as_deref(), Some("http 302"));

    // 10 MiB of 500: the first KiB is kept, the daemon does not read the rest.
    let row = pending_after(&client, "huge", 1).await;
    assert_eq!(row.last_status, Some(500), "{row:?}");
    assert_eq!(row.last_error.as_deref(), Some("http 500"));
    assert_eq!(row.last_response.as_deref(), Some(first_kib.as_str()));
    let kept: Option<i32> = client
        .query_one(
            "SELECT length(last_response) FROM walhook.delivery_retries WHERE subscription = 'huge'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, Some(1024));

    // Binary garbage with NUL bytes (PostgreSQL text cannot hold NUL).
    let row = pending_after(&client, "garbage", 1).await;
    assert_eq!(row.last_status, Some(400), "{row:?}");
    assert_eq!(row.last_error.as_deref(), Some("http 400"));
    let kept = row.last_response.unwrap_or_default();
    assert!(
        kept.contains("<html>") && kept.contains('\u{fffd}') && !kept.contains('\0'),
        "{kept:?}"
    );

    // Everything was retried at least once more while failing.
    wait_for(
        "retries of the timeout, redirect, huge and garbage subscriptions",
        WAIT,
        || async {
            [&slow, &redirect, &huge, &garbage]
                .iter()
                .all(|r| r.received().len() >= 3)
        },
    )
    .await;
    let peak = daemon.peak_rss_kib().expect("daemon VmHWM");
    eprintln!("walhook peak RSS after 10 MiB error bodies: {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "walhook peak RSS {peak} KiB after 10 MiB error bodies"
    );

    // The receivers recover: each subscription delivers the event once more, with 200.
    healed.store(true, Ordering::SeqCst);
    for name in ["ra_secs", "ra_date", "slow", "redirect", "huge", "garbage"] {
        wait_for(&format!("`{name}` delivered"), WAIT, || async {
            let rows = deliveries(&client, name).await;
            rows.len() == 1 && rows[0].status == "delivered"
        })
        .await;
        let row = &deliveries(&client, name).await[0];
        assert_eq!(row.entity_id, "1");
        assert_eq!(row.last_status, Some(200), "{name}: {row:?}");
        assert!(row.attempts >= 2, "{name}: {row:?}");
        assert_eq!(row.last_error, None, "{name}: {row:?}");
    }
    for (name, r) in [
        ("ra_secs", &ra_secs),
        ("ra_date", &ra_date),
        ("slow", &slow),
        ("redirect", &redirect),
        ("huge", &huge),
        ("garbage", &garbage),
    ] {
        let got = r.received();
        assert_eq!(
            got.iter().filter(|g| g.status == 200).count(),
            1,
            "{name}: answered 200 once"
        );
        let ids: Vec<_> = got
            .iter()
            .map(|g| g.headers["webhook-id"].clone())
            .collect();
        assert!(ids.iter().all(|id| id == &ids[0]), "{name}: one webhook-id");
    }
    assert!(
        target.received().is_empty(),
        "the redirect was followed to its Location"
    );
    assert!(daemon.is_running(), "{}", daemon.log());
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[tokio::test]
async fn unresolvable_host_and_untrusted_certificate_retry_while_others_flow() {
    let db = users_db().await;
    let tls = Receiver::start_tls(|_| 200).await;
    let ok = Receiver::start(|_| 200).await;
    let retry = "[subscriptions.retry]\nbackoff = [\"300ms\"]";
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "nodns"
url = "http://walhook-test.invalid:9/hook"
events = ["user.*"]
{retry}

[[subscriptions]]
name = "badtls"
url = "{tls}"
events = ["user.*"]
{retry}

[[subscriptions]]
name = "insecure"
url = "{tls}"
events = ["user.*"]
tls_insecure = true

[[subscriptions]]
name = "ok"
url = "{ok}"
events = ["user.*"]
"#,
            tls = tls.url,
            ok = ok.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    for i in 0..5 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    let client = db.client().await;
    // Both bad subscriptions keep trying (several attempts each), and keep their
    // deliveries pending with the cause.
    for name in ["nodns", "badtls"] {
        wait_for(
            &format!("5 pending deliveries of `{name}`, each attempted 3+ times"),
            WAIT,
            || async {
                let rows = deliveries(&client, name).await;
                rows.len() == 5
                    && rows
                        .iter()
                        .all(|d| d.status == "pending" && d.attempts >= 3)
            },
        )
        .await;
    }
    for row in deliveries(&client, "nodns").await {
        let error = row.last_error.unwrap_or_default();
        assert!(
            error.starts_with("connect") && error.contains("lookup"),
            "nodns last_error: {error:?}"
        );
        assert_eq!(row.last_status, None);
    }
    for row in deliveries(&client, "badtls").await {
        let error = row.last_error.unwrap_or_default();
        assert!(
            error.starts_with("tls") && error.contains("certificate"),
            "badtls last_error: {error:?}"
        );
        assert_eq!(row.last_status, None);
    }
    // Others flow, before and after.
    for i in 5..10 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    wait_for("10 deliveries to `ok` and to `insecure`", WAIT, || async {
        ok.received().len() >= 10 && tls.received().len() >= 10
    })
    .await;
    // Only `insecure` ever got through the TLS handshake.
    assert_eq!(tls.received().len(), 10);
    assert_eq!(ok.received().len(), 10);
    wait_for("10 pending deliveries of `badtls`", WAIT, || async {
        let rows = deliveries(&client, "badtls").await;
        rows.len() == 10 && rows.iter().all(|d| d.status == "pending")
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log());
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// A retry sends the bytes of the first attempt, although the first came from the
/// events this process just ingested (`store::live`) and the retry from the store:
/// only the signature headers change. (`data` keeps column order in both: the store's
/// column is `json`, not `jsonb`, which would sort the keys.)
#[tokio::test]
async fn a_retry_sends_the_same_body_bytes_as_the_first_attempt() {
    let db = users_db().await;
    let healed = Arc::new(AtomicBool::new(false));
    let flaky = failing_until(&healed, |_| Reply::status(503)).await;
    let subs = format!(
        "[[subscriptions]]\nname = \"flaky\"\nurl = \"{}\"\nevents = [\"user.*\"]\n[subscriptions.retry]\nbackoff = [\"300ms\"]\n",
        flaky.url
    );
    let work = Workdir::new(&users_config(&db, &subs));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    // Column order (id, email, n) is not jsonb's key order (n, id, email).
    db.batch("INSERT INTO users VALUES (1, 'a@x', 7)").await;
    wait_for("a failed first attempt", WAIT, || async {
        !flaky.received().is_empty()
    })
    .await;
    healed.store(true, Ordering::SeqCst);
    wait_for("the retry delivered", WAIT, || async {
        flaky.received().iter().any(|r| r.status == 200)
    })
    .await;
    let got = flaky.received();
    assert_eq!(got[0].status, 503);
    let retry = got.iter().find(|r| r.status == 200).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&retry.body),
        String::from_utf8_lossy(&got[0].body),
        "the retry's body differs from the first attempt's"
    );
    assert_eq!(retry.headers["webhook-id"], got[0].headers["webhook-id"]);
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}
