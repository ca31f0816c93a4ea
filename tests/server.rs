//! The ops server of the real `walhook run`: metrics present and moving after a workload,
//! readiness following a store that goes away and comes back, `/healthz` throughout, an
//! empty `/.well-known/jwks.json` without `format = "set"` subscriptions; and
//! JSON logs at debug level that carry no secret, auth header, row value or body.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use walhook::pg::ConnInfo;
use walhook::store::Store;
use walhook::store::stats::QueueCounts;

use crate::support::daemon::{Daemon, Workdir, server_url};
use crate::support::pg::{Cluster, StopMode, TestDb, create_db};
use crate::support::receiver::Receiver;
use crate::support::{wait_for, wait_for_some};

const WAIT: Duration = Duration::from_secs(60);
/// `whsec_` + base64 of 32 bytes.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A config for `db` watching `public.users`, the store in `store` (default: `db`),
/// with `extra` appended (subscriptions, `[log]`).
fn config(db: &TestDb, store: Option<&TestDb>, extra: &str) -> String {
    let store = store
        .map(|s| {
            format!(
                "[store]\nurl = \"postgres://postgres@127.0.0.1:{}/{}?sslmode=disable\"\n",
                s.port, s.name
            )
        })
        .unwrap_or_default();
    format!(
        r#"
[source]
url = "postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

{store}
[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.users"
entity = "user"

{extra}
"#,
        port = db.port,
        name = db.name
    )
}

async fn users_db() -> TestDb {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
        .await;
    db
}

/// GET `url`: status and body.
async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("response body"))
}

/// Every sample of a scrape, by series (`name{labels}`).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(base: &str) -> HashMap<String, f64> {
    let (status, body) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200, "{body}");
    samples(&body)
}

fn value(s: &HashMap<String, f64>, series: &str) -> f64 {
    s.get(series).copied().unwrap_or(0.0)
}

/// Waits until walhook streams: `/readyz` answers 200, which needs START_REPLICATION to
/// have succeeded. (The slot shows `active` already while it is being created, before its
/// consistent point: a change written then is not streamed.)
async fn wait_streaming(daemon: &mut Daemon) -> String {
    let base = server_url(daemon).await;
    let readyz = format!("{base}/readyz");
    wait_for("walhook to stream (/readyz 200)", WAIT, || {
        let running = daemon.is_running();
        let log = daemon.log();
        let readyz = &readyz;
        async move {
            assert!(running, "walhook exited:\n{log}");
            get(readyz).await.0 == 200
        }
    })
    .await;
    base
}

#[tokio::test]
async fn metrics_are_present_and_move_after_a_workload() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let work = Workdir::new(&config(
        &db,
        None,
        &format!(
            "[[subscriptions]]\nname = \"crm\"\nurl = \"{}\"\nevents = [\"user.*\"]\n",
            receiver.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    let base = wait_streaming(&mut daemon).await;
    let (status, body) = get(&format!("{base}/healthz")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    // No format = "set" subscription: an empty JWK Set (tests/delivery/set.rs has keys).
    let (status, body) = get(&format!("{base}/.well-known/jwks.json")).await;
    assert_eq!((status, body.as_str()), (200, r#"{"keys":[]}"#));
    let before = scrape(&base).await;
    assert_eq!(
        value(&before, "walhook_build_info{version=\"0.1.0\"}"),
        1.0,
        "{before:?}"
    );

    // 20 inserts, 10 updates, 5 deletes: 35 changes, 35 events, 35 deliveries.
    db.batch("INSERT INTO users SELECT i, 'u' || i || '@x', 0 FROM generate_series(1, 20) i")
        .await;
    db.batch("UPDATE users SET n = 1 WHERE id <= 10").await;
    db.batch("DELETE FROM users WHERE id > 15").await;
    wait_for("35 deliveries at the receiver", WAIT, || async {
        receiver.received().len() >= 35
    })
    .await;

    let delivered = "walhook_deliveries_total{subscription=\"crm\",outcome=\"delivered\"}";
    let after = wait_for_some("the metrics to count 35 deliveries", WAIT, || {
        let base = base.clone();
        let before = value(&before, delivered);
        async move {
            let s = scrape(&base).await;
            (value(&s, delivered) - before >= 35.0).then_some(s)
        }
    })
    .await;
    let moved = |series: &str| value(&after, series) - value(&before, series);
    for (op, n) in [("insert", 20.0), ("update", 10.0), ("delete", 5.0)] {
        let series = format!("walhook_source_changes_total{{table=\"public.users\",op=\"{op}\"}}");
        assert_eq!(moved(&series), n, "{series}");
    }
    for (t, n) in [
        ("user.created", 20.0),
        ("user.updated", 10.0),
        ("user.deleted", 5.0),
    ] {
        let series = format!("walhook_events_total{{type=\"{t}\"}}");
        assert_eq!(moved(&series), n, "{series}");
    }
    assert_eq!(moved(delivered), 35.0);
    assert_eq!(
        moved("walhook_http_responses_total{subscription=\"crm\",code=\"200\"}"),
        35.0
    );
    assert_eq!(
        moved("walhook_delivery_latency_seconds_count{subscription=\"crm\"}"),
        35.0
    );
    assert_eq!(
        moved("walhook_delivery_attempt_seconds_count{subscription=\"crm\"}"),
        35.0
    );
    assert!(moved("walhook_ingest_batch_seconds_count") >= 1.0);
    for series in [
        "walhook_replication_lag_seconds",
        "walhook_replication_lag_bytes",
    ] {
        assert!(after.contains_key(series), "{series} missing: {after:?}");
    }

    // The refreshed gauges: the slot streams, the queue drains, nothing is dead.
    wait_for_some("the refreshed slot and queue gauges", WAIT, || {
        let base = base.clone();
        async move {
            let s = scrape(&base).await;
            let ok = value(&s, "walhook_slot_active") == 1.0
                && s.get("walhook_queue_pending{subscription=\"crm\"}") == Some(&0.0)
                && s.get("walhook_queue_dead{subscription=\"crm\"}") == Some(&0.0)
                && s.get("walhook_queue_oldest_pending_seconds{subscription=\"crm\"}")
                    == Some(&0.0)
                && s.get("walhook_subscription_enabled{subscription=\"crm\"}") == Some(&1.0);
            ok.then_some(())
        }
    })
    .await;
    // Caught up: no lag in seconds.
    assert_eq!(
        value(&scrape(&base).await, "walhook_replication_lag_seconds"),
        0.0
    );
    let (status, body) = get(&format!("{base}/readyz")).await;
    assert_eq!(status, 200, "{body}");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// The queue gauges follow the live config: a subscription a reload adds gets them, one
/// it removes loses them (bounded label sets: a removed name must not linger).
#[tokio::test]
async fn queue_gauges_follow_subscriptions_added_and_removed_by_a_reload() {
    let db = users_db().await;
    let failing = Receiver::start(|_| 500).await;
    let sub = |name: &str| {
        format!(
            "[[subscriptions]]\nname = \"{name}\"\nurl = \"{}\"\nevents = [\"user.*\"]\n\n[subscriptions.retry]\nbackoff = [\"1h\"]\n",
            failing.url
        )
    };
    let work = Workdir::new(&config(&db, None, &sub("old")));
    let mut daemon = work.spawn_run(0);
    let base = wait_streaming(&mut daemon).await;
    let pending = |name: &str| format!("walhook_queue_pending{{subscription=\"{name}\"}}");
    let before = wait_for_some("a gauge for `old`", WAIT, || {
        let base = base.clone();
        let series = pending("old");
        async move {
            let s = scrape(&base).await;
            s.contains_key(&series).then_some(s)
        }
    })
    .await;
    for family in [
        "walhook_queue_pending",
        "walhook_queue_dead",
        "walhook_queue_oldest_pending_seconds",
        "walhook_subscription_enabled",
    ] {
        let series = format!("{family}{{subscription=\"old\"}}");
        assert!(before.contains_key(&series), "{series} missing: {before:?}");
    }

    work.rewrite(&config(&db, None, &sub("new")));
    daemon.signal(libc::SIGHUP);
    wait_for("the reload", WAIT, || {
        let log = daemon.log();
        async move { log.contains("config reloaded") }
    })
    .await;
    db.batch("INSERT INTO users VALUES (1, 'a', 0), (2, 'b', 0)")
        .await;
    // Both events fail once and wait an hour: 2 pending deliveries of `new`.
    let after = wait_for_some("2 pending deliveries of `new`", WAIT, || {
        let base = base.clone();
        let series = pending("new");
        async move {
            let s = scrape(&base).await;
            (value(&s, &series) == 2.0).then_some(s)
        }
    })
    .await;
    let old: Vec<&String> = after.keys().filter(|k| k.contains("\"old\"")).collect();
    assert!(old.is_empty(), "series of a removed subscription: {old:?}");
    assert_eq!(
        value(&after, "walhook_subscription_enabled{subscription=\"new\"}"),
        1.0
    );
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test]
async fn readiness_follows_the_store_and_healthz_stays_ok() {
    let db = users_db().await;
    let store_cluster = Cluster::start();
    let store_db = store_cluster.create_db().await;
    let work = Workdir::new(&config(&db, Some(&store_db), ""));
    let mut daemon = work.spawn_run(0);
    let base = server_url(&mut daemon).await;
    let readyz = format!("{base}/readyz");
    let healthz = format!("{base}/healthz");
    wait_for("/readyz to answer 200 with the store up", WAIT, || async {
        get(&readyz).await.0 == 200
    })
    .await;

    let c = store_cluster.clone();
    tokio::task::spawn_blocking(move || c.stop(StopMode::Fast))
        .await
        .unwrap();
    let body = wait_for_some(
        "/readyz to answer 503 with the store down",
        WAIT,
        || async {
            let (status, body) = get(&readyz).await;
            (status == 503).then_some(body)
        },
    )
    .await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("/readyz JSON");
    assert_eq!(json["status"], "not ready", "{body}");
    assert_eq!(json["store"]["ok"], false, "{body}");
    // The source streams, or was closed on purpose while ingest cannot store (G9):
    // never reported as failing to connect.
    let source = json["source"]["state"].as_str().expect("a source state");
    assert!(matches!(source, "streaming" | "paused"), "{body}");
    let reason = json["reason"].as_str().expect("a reason");
    assert!(reason.starts_with("store:"), "{body}");
    assert!(reason.contains("unreachable"), "{body}");
    let (status, body) = get(&healthz).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));

    let c = store_cluster.clone();
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .unwrap();
    wait_for(
        "/readyz to answer 200 once the store is back",
        WAIT,
        || async { get(&readyz).await.0 == 200 },
    )
    .await;
    assert_eq!(get(&healthz).await.0, 200);
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test]
async fn json_debug_logs_carry_no_secrets_headers_row_values_or_bodies() {
    const TOKEN: &str = "sekrit-token-123";
    const ROW_VALUE: &str = "zq-distinctive-row-value-8142@example.org";
    let db = users_db().await;
    // Three 500s, then 200s.
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    let receiver = Receiver::start(move |_| {
        if count.fetch_add(1, Ordering::SeqCst) < 3 {
            500
        } else {
            200
        }
    })
    .await;
    let work = Workdir::new(&config(
        &db,
        None,
        &format!(
            r#"
[log]
format = "json"
level = "debug"

[[subscriptions]]
name = "crm"
url = "{url}"
events = ["user.*"]
secret = "{SECRET}"
headers = {{ Authorization = "Bearer {TOKEN}", X-Api-Key = "{TOKEN}-key" }}

[subscriptions.retry]
backoff = ["100ms"]
"#,
            url = receiver.url
        ),
    ));
    // No WALHOOK_LOG: the config's level and format apply.
    let mut daemon = work.spawn_run_env(0, &[("WALHOOK_LOG", None)]);
    wait_streaming(&mut daemon).await;
    db.batch(&format!("INSERT INTO users VALUES (1, '{ROW_VALUE}', 7)"))
        .await;
    db.batch("UPDATE users SET n = 8 WHERE id = 1").await;
    let deadline = std::time::Instant::now() + WAIT;
    while receiver
        .received()
        .iter()
        .filter(|r| r.status == 200)
        .count()
        < 2
    {
        if std::time::Instant::now() > deadline {
            let diag = db
                .query(
                    "SELECT format('%s %s', (SELECT string_agg(tablename, ',') FROM pg_publication_tables), (SELECT string_agg(slot_name || ':' || active || ':' || confirmed_flush_lsn, ',') FROM pg_replication_slots))",
                    &[],
                )
                .await;
            panic!(
                "timed out after {WAIT:?} waiting for both events delivered after three 500s; got {:?}; {:?} log:\n{}",
                receiver
                    .received()
                    .iter()
                    .map(|r| r.status)
                    .collect::<Vec<_>>(),
                diag.first().map(|r| r.get::<_, String>(0)),
                daemon
                    .log()
                    .lines()
                    .filter(|l| !l.contains("standby status"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = receiver.received();
    assert!(got.len() >= 5, "{} requests", got.len());
    assert_eq!(
        got[0].headers.get("authorization").map(String::as_str),
        Some("Bearer sekrit-token-123"),
        "the receiver got the header (so the test would see a leak)"
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());

    let log = daemon.log();
    let key = SECRET.strip_prefix("whsec_").unwrap();
    for (what, needle) in [
        ("the secret", key),
        ("the auth token", TOKEN),
        ("the row value", ROW_VALUE),
        ("a signature", "v1,"),
        // A body, raw or escaped inside a JSON string.
        ("a body", "\"occurred_at"),
    ] {
        assert!(
            !log.contains(needle),
            "the log holds {what} ({needle}):\n{log}"
        );
    }
    // Every line is a JSON object; attempts are logged in a delivery span with status.
    let mut delivery_statuses = Vec::new();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        if let Some(spans) = v["spans"].as_array() {
            for span in spans {
                if span["name"] == "delivery"
                    && let Some(status) = span["status"].as_str()
                {
                    delivery_statuses.push(status.to_owned());
                }
            }
        }
    }
    assert!(
        delivery_statuses.iter().any(|s| s == "500")
            && delivery_statuses.iter().any(|s| s == "200"),
        "attempt logs carry their status in a delivery span: {delivery_statuses:?}\n{log}"
    );
    assert!(
        log.contains("\"name\":\"dispatcher\"") && log.contains("\"subscription\":\"crm\""),
        "dispatcher span with its subscription:\n{log}"
    );
}

#[tokio::test]
async fn a_taken_listen_address_fails_start_up_naming_it() {
    let db = users_db().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let addr = taken.local_addr().unwrap().to_string();
    let toml = config(&db, None, "").replace("127.0.0.1:0", &addr);
    let work = Workdir::new(&toml);
    let (status, _, stderr) = work.run_to_end(&["run"], WAIT);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn systemd_gets_ready_watchdog_and_stopping() {
    let db = users_db().await;
    let work = Workdir::new(&config(&db, None, ""));
    let socket_path = work.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let socket_env = socket_path.to_str().unwrap().to_owned();
    let mut daemon = work.spawn_run_env(
        0,
        &[
            ("NOTIFY_SOCKET", Some(&socket_env)),
            ("WATCHDOG_USEC", Some("400000")),
        ],
    );
    recv_until(&socket, "READY=1").await;
    recv_until(&socket, "WATCHDOG=1").await;
    recv_until(&socket, "WATCHDOG=1").await;
    daemon.signal(libc::SIGTERM);
    recv_until(&socket, "STOPPING=1").await;
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// Reads notifications from `socket` until one has the line `want`.
async fn recv_until(socket: &tokio::net::UnixDatagram, want: &str) {
    let mut buf = vec![0; 4096];
    crate::support::within(&format!("systemd notification {want}"), WAIT, async {
        loop {
            let n = socket.recv(&mut buf).await.expect("recv notification");
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == want)
            {
                return;
            }
        }
    })
    .await
}

/// The queue figures a refresh reads incrementally (`QueueCounts`) equal a full count
/// of the log at every step: events appended, cursors moving (within a chunk and
/// across many), delivered events purged behind a cursor, a cursor rewound, retry rows,
/// a subscription that gets only some events. Fails if a refresh keeps a stale count,
/// counts a range twice, or takes away events that were purged. With a small scan
/// limit, a backlog's first count takes several refreshes, publishes nothing until
/// counted through, and is exact then.
#[tokio::test]
async fn incremental_queue_figures_equal_a_full_count() {
    let refreshes = queue_figures_scenario(QueueCounts::default()).await;
    assert!(refreshes.iter().all(|&n| n == 1), "{refreshes:?}");
    let refreshes = queue_figures_scenario(QueueCounts::with_scan_limit(20_000)).await;
    // The 50,000-event backlog: its first chunk is read directly, the 33,617 seqs
    // after it in two refreshes of at most 20,000.
    assert_eq!(refreshes[1], 2, "{refreshes:?}");
}

/// The steps of `incremental_queue_figures_equal_a_full_count`, counting on from
/// `counts`; returns how many refreshes each step took to give figures.
async fn queue_figures_scenario(mut counts: QueueCounts) -> Vec<usize> {
    let db = create_db().await;
    let params = ConnInfo::parse(&db.url()).expect("store url");
    let mut store = Store::connect(&params, "walhook").await.expect("store");
    store.migrate().await.expect("migrate");
    db.batch(
        "INSERT INTO walhook.subscription_state (subscription, cursor) VALUES ('all', 0), ('some', 0);",
    )
    .await;
    // Every event is due to `all`; one in three also to `some`.
    let append = |from: i64, to: i64| {
        format!(
            "INSERT INTO walhook.events (seq, id, type, entity, entity_id, revision, occurred_at, data,
                                         source_table, source_lsn, source_xid, subscriptions)
             SELECT n, 'evt_' || n, 'user.created', 'user', n::text, 1, now(), '{{}}', 'public.users', '0/0', 1,
                    CASE WHEN n % 3 = 0 THEN '{{all,some}}'::text[] ELSE '{{all}}' END
             FROM generate_series({from}, {to}) n;"
        )
    };
    let subs = vec!["all".to_owned(), "some".to_owned()];
    let mut refreshes = Vec::new();
    let mut check = async |step: &str| {
        let mut n = 0;
        let got = loop {
            n += 1;
            assert!(n <= 10, "{step}: no figures after 10 refreshes");
            let got = store
                .queue_stats(&subs, &mut counts)
                .await
                .expect("queue stats");
            for q in &got {
                assert_eq!(
                    q.pending.is_some(),
                    q.oldest_pending_seconds.is_some(),
                    "{step}"
                );
            }
            if got.iter().all(|q| q.pending.is_some()) {
                break got;
            }
        };
        refreshes.push(n);
        for q in &got {
            let full: i64 = db
                .query_one(
                    "SELECT (SELECT count(*) FROM walhook.events e, walhook.subscription_state st
                             WHERE st.subscription = $1 AND e.seq > st.cursor AND $1 = ANY (e.subscriptions))
                          + (SELECT count(*) FROM walhook.delivery_retries WHERE subscription = $1 AND status = 'pending')",
                    &[&q.subscription],
                )
                .await
                .get(0);
            assert_eq!(
                q.pending,
                Some(full),
                "{step}: pending of {}",
                q.subscription
            );
            assert_eq!(
                q.oldest_pending_seconds.is_some_and(|age| age > 0.0),
                full > 0,
                "{step}: oldest of {}",
                q.subscription
            );
        }
        assert_eq!(got.len(), 2, "{step}");
    };
    check("empty log").await;
    db.batch(&append(1, 50_000)).await;
    check("a backlog over several chunks").await;
    let cursors = |all: i64, some: i64| {
        format!(
            "UPDATE walhook.subscription_state
             SET cursor = CASE subscription WHEN 'all' THEN {all} ELSE {some} END"
        )
    };
    db.batch(&cursors(20, 0)).await;
    check("a cursor moved within its chunk").await;
    db.batch(&append(50_001, 50_100)).await;
    db.batch(&cursors(40_000, 17_000)).await;
    check("cursors moved across chunks while events came").await;
    db.batch("DELETE FROM walhook.events WHERE seq <= 17000")
        .await;
    db.batch(&append(50_101, 70_000)).await;
    check("delivered events purged behind the cursors").await;
    db.batch(
        "INSERT INTO walhook.delivery_retries (subscription, seq, entity, entity_id, status, attempts, first_due_at)
         VALUES ('some', 3, 'user', '3', 'pending', 2, now() - interval '1 hour');",
    )
    .await;
    db.batch(&cursors(30_000, 65_000)).await;
    check("a cursor rewound by an operator, a retry row").await;
    db.batch(&cursors(70_000, 70_000)).await;
    db.batch("DELETE FROM walhook.delivery_retries").await;
    check("everything delivered").await;
    refreshes
}
