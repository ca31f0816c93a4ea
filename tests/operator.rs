//! The operator commands against a real store while the real daemon runs, with real
//! receivers on 127.0.0.1: dead deliveries listed, shown and replayed until they arrive,
//! delivered ones sent again, pause and resume, the subscriptions overview, bad input,
//! and a replay of thousands of rows in batches.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::daemon::{Daemon, Workdir, users_config, wait_leading};
use crate::support::pg::{TestDb, users_db};
use crate::support::receiver::{Received, Receiver};
use crate::support::{wait_for, walhook_bin, within};

const WAIT: Duration = Duration::from_secs(60);
/// A token in the subscription's headers: no operator command may print it.
const TOKEN: &str = "Bearer op-s3cret-t0ken";

/// How a `walhook` command ended.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Asserts exit 0 and returns stdout.
    fn ok(&self, what: &str) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "{what}: stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Stdout as JSON lines.
    fn json_lines(&self, what: &str) -> Vec<Value> {
        self.ok(what)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}: `{l}`: {e}")))
            .collect()
    }

    /// Asserts exit 1 with every needle on stderr, and no panic.
    fn failed_with(&self, what: &str, needles: &[&str]) {
        assert_eq!(
            self.code,
            Some(1),
            "{what}: exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        for needle in needles {
            assert!(
                self.stderr.contains(needle),
                "{what}: stderr lacks `{needle}`:\n{}",
                self.stderr
            );
        }
        assert!(!self.stderr.contains("panicked"), "{what}: {}", self.stderr);
    }
}

/// Runs `walhook ARGS -c walhook.toml` to its end (bounded).
async fn walhook(work: &Workdir, args: &[&str]) -> Out {
    let what = format!("`walhook {}` to exit", args.join(" "));
    let child = tokio::process::Command::new(walhook_bin())
        .args(args)
        .arg("-c")
        .arg(work.config())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start walhook");
    let out = within(&what, WAIT, child.wait_with_output())
        .await
        .expect("wait for walhook");
    let out = Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !out.stdout.contains(TOKEN) && !out.stderr.contains(TOKEN),
        "`walhook {}` printed the subscription's auth header",
        args.join(" ")
    );
    out
}

/// A receiver answering with whatever status `answer` holds.
async fn switchable_receiver(status: u16) -> (Receiver, Arc<AtomicU16>) {
    let answer = Arc::new(AtomicU16::new(status));
    let a = answer.clone();
    let receiver = Receiver::start(move |_| a.load(Ordering::SeqCst)).await;
    (receiver, answer)
}

/// The store's view of things and the daemon log, for a failed wait.
async fn dump(db: &TestDb, daemon: &Daemon) -> String {
    let client = db.client().await;
    let mut out = String::new();
    for sql in [
        "SELECT seq::text, id, type, entity_id, array_to_string(subscriptions, ',') FROM walhook.events ORDER BY seq",
        "SELECT subscription, cursor::text, enabled::text, paused::text, coalesce(lease_owner, '-') FROM walhook.subscription_state",
        "SELECT subscription, seq::text, status, attempts::text, coalesce(last_error, '-') FROM walhook.delivery_retries ORDER BY seq LIMIT 20",
    ] {
        for row in client.query(sql, &[]).await.unwrap_or_default() {
            let cells: Vec<String> = (0..row.len()).map(|i| row.get::<_, String>(i)).collect();
            out.push_str(&cells.join(" | "));
            out.push('\n');
        }
        out.push_str("--\n");
    }
    format!("{out}daemon log:\n{}", daemon.log())
}

/// Waits for `condition`; on timeout panics naming `what`, with [`dump`].
async fn wait_until<F, Fut>(what: &str, db: &TestDb, daemon: &Daemon, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + WAIT;
    while !condition().await {
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {WAIT:?} waiting for {what}\n{}",
                dump(db, daemon).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn delivered_ids(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .map(|r| r.headers["webhook-id"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_deliveries_are_listed_shown_and_replayed_until_they_arrive() {
    let db = users_db().await;
    let (crm, crm_answer) = switchable_receiver(500).await;
    let audit = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            r#"
[[subscriptions]]
name = "crm"
url = "{}"
events = ["user.*"]
headers = {{ Authorization = "{TOKEN}" }}

[subscriptions.retry]
backoff = ["50ms"]
max_age = "300ms"

[[subscriptions]]
name = "audit"
url = "{}"
events = ["user.created"]
"#,
            crm.url, audit.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a', 0), (2, 'b', 0), (3, 'c', 0)")
        .await;
    db.batch("UPDATE users SET n = 1 WHERE id = 1").await;

    // crm answers 500 and gives up after 300 ms: all four of its deliveries go dead.
    let client = db.client().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let rows = client
            .query(
                "SELECT seq, status, attempts, next_attempt_at::text, last_error FROM walhook.delivery_retries WHERE subscription = 'crm' ORDER BY seq",
                &[],
            )
            .await
            .unwrap();
        if rows.len() == 4 && rows.iter().all(|r| r.get::<_, &str>(1) == "dead") {
            break;
        }
        if std::time::Instant::now() > deadline {
            let rows: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{} {} {} {:?} {:?}",
                        r.get::<_, i64>(0),
                        r.get::<_, &str>(1),
                        r.get::<_, i32>(2),
                        r.get::<_, Option<String>>(3),
                        r.get::<_, Option<String>>(4)
                    )
                })
                .collect();
            panic!(
                "timed out after {WAIT:?} waiting for 4 dead deliveries for crm; retry rows: {rows:#?}\nlog:\n{}",
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until("3 deliveries to audit", &db, &daemon, || async {
        audit.received().len() >= 3
    })
    .await;

    let dead = walhook(&work, &["deliveries", "list", "--status", "dead", "--json"])
        .await
        .json_lines("list dead");
    assert_eq!(dead.len(), 4, "{dead:?}");
    let seqs: Vec<i64> = dead.iter().map(|d| d["seq"].as_i64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );
    for d in &dead {
        assert_eq!(d["status"], "dead");
        assert_eq!(d["subscription"], "crm");
        assert_eq!(d["last_status"], 500);
        assert!(d["attempts"].as_i64().unwrap() >= 1);
        assert_eq!(
            d["id"].as_str().unwrap(),
            format!("{}:crm", d["event_id"].as_str().unwrap())
        );
    }
    let user1: Vec<&Value> = dead.iter().filter(|d| d["entity_id"] == "1").collect();
    assert_eq!(user1.len(), 2, "user 1's created and updated");

    // The other filters and the table.
    let by_entity = walhook(
        &work,
        &["deliveries", "list", "--entity", "user:1", "--json"],
    )
    .await
    .json_lines("list by entity");
    assert_eq!(by_entity.len(), 3, "2 for crm, 1 for audit: {by_entity:?}");
    let audit_list = walhook(
        &work,
        &[
            "deliveries",
            "list",
            "--subscription",
            "audit",
            "--status",
            "delivered",
            "--since",
            "10m",
            "--limit",
            "2",
            "--json",
        ],
    )
    .await
    .json_lines("list audit");
    assert_eq!(audit_list.len(), 2, "--limit 2: {audit_list:?}");
    assert!(
        audit_list
            .iter()
            .all(|d| d["attempts"] == 1 && d["status"] == "delivered")
    );
    let future = walhook(
        &work,
        &[
            "deliveries",
            "list",
            "--since",
            "2100-01-01T00:00:00Z",
            "--json",
        ],
    )
    .await;
    assert_eq!(future.ok("list since the future"), "");
    let table = walhook(&work, &["deliveries", "list"]).await;
    let table = table.ok("list table");
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("STATUS") && header.contains("ERROR"));
    assert_eq!(table.lines().count(), 1 + 4 + 3, "{table}");
    assert!(table.contains("http 500"), "{table}");

    // show: every field, the response head, no secrets (checked in `walhook`).
    let id = dead[0]["id"].as_str().unwrap();
    let shown = walhook(&work, &["deliveries", "show", id]).await;
    let text = shown.ok("show");
    assert!(text.contains(&format!("id:           {id}")), "{text}");
    assert!(text.contains("status:       dead"), "{text}");
    assert!(text.contains("last status:  500"), "{text}");
    assert!(text.contains("response head (first 1 KiB"), "{text}");
    assert!(
        text.contains("\n  ok\n"),
        "the receiver's body `ok`: {text}"
    );
    let shown = walhook(&work, &["deliveries", "show", id, "--json"])
        .await
        .json_lines("show json");
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["response_head"], "ok");
    assert_eq!(shown[0]["last_status"], 500);
    let event_id = dead[0]["event_id"].as_str().unwrap();
    let both = walhook(&work, &["deliveries", "show", event_id, "--json"])
        .await
        .json_lines("show by event id");
    assert!(!both.is_empty() && both.iter().all(|d| d["event_id"] == event_id));

    // The subscriptions overview counts them.
    let subs = walhook(&work, &["subscriptions", "list", "--json"])
        .await
        .json_lines("subscriptions list");
    assert_eq!(subs.len(), 2);
    assert_eq!(subs[0]["subscription"], "crm");
    assert_eq!(subs[0]["dead"], 4);
    assert_eq!(subs[0]["pending"], 0);
    assert_eq!(subs[0]["state"], "active");
    assert_eq!(subs[1]["subscription"], "audit");
    assert_eq!(subs[1]["dead"], 0);
    assert!(subs[1]["last_success_at"].is_string(), "{subs:?}");
    let table = walhook(&work, &["subscriptions", "list"]).await;
    assert!(table.ok("subscriptions table").contains("LAST SUCCESS"));

    // The receiver is fixed; replay sends the dead deliveries again, user 1 in order.
    crm_answer.store(200, Ordering::SeqCst);
    let replayed = walhook(
        &work,
        &[
            "deliveries",
            "replay",
            "--subscription",
            "crm",
            "--status",
            "dead",
        ],
    )
    .await;
    assert_eq!(
        replayed.ok("replay dead").trim(),
        "queued 4 deliveries for replay"
    );
    wait_until(
        "the 4 replayed deliveries to arrive",
        &db,
        &daemon,
        || async { delivered_ids(&crm.received()).len() >= 4 },
    )
    .await;
    let got = crm.received();
    let mut ids = delivered_ids(&got);
    ids.sort();
    let mut want: Vec<String> = dead
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect();
    want.sort();
    assert_eq!(ids, want, "each dead delivery arrived once");
    let user1_revisions: Vec<i64> = got
        .iter()
        .filter(|r| r.status == 200 && r.json()["entity_id"] == "1")
        .map(|r| r.json()["revision"].as_i64().unwrap())
        .collect();
    assert_eq!(user1_revisions, vec![1, 2], "replay keeps per-entity order");
    wait_for("no dead deliveries left", WAIT, || async {
        walhook(&work, &["deliveries", "list", "--status", "dead", "--json"])
            .await
            .ok("list dead")
            .is_empty()
    })
    .await;
    let delivered = walhook(
        &work,
        &[
            "deliveries",
            "list",
            "--subscription",
            "crm",
            "--status",
            "delivered",
            "--json",
        ],
    )
    .await
    .json_lines("list crm delivered");
    assert_eq!(delivered.len(), 4);
    assert!(delivered.iter().all(|d| d["delivered_at"].is_string()));

    // Replaying a delivery delivered at its first attempt (no retry row) sends it again.
    let first = audit_list[0]["id"].as_str().unwrap();
    let again = walhook(&work, &["deliveries", "replay", first, "--json"])
        .await
        .json_lines("replay by id");
    assert_eq!(again[0]["queued"], 1);
    let audit_event = audit_list[0]["event_id"].as_str().unwrap().to_owned();
    wait_until(
        "the replayed audit delivery to arrive again",
        &db,
        &daemon,
        || async {
            delivered_ids(&audit.received())
                .iter()
                .filter(|id| **id == audit_event)
                .count()
                == 2
        },
    )
    .await;

    // Bad input: exit 1, a message naming the thing, the known subscriptions.
    walhook(&work, &["deliveries", "list", "--subscription", "nope"])
        .await
        .failed_with(
            "list unknown subscription",
            &[
                "unknown subscription `nope`",
                "configured subscriptions: crm, audit",
            ],
        );
    walhook(
        &work,
        &["deliveries", "show", "evt_01JDX5ZQ3J8K2M4N6P8R0T2V4X:crm"],
    )
    .await
    .failed_with(
        "show unknown id",
        &["unknown delivery `evt_01JDX5ZQ3J8K2M4N6P8R0T2V4X:crm`"],
    );
    walhook(&work, &["deliveries", "replay", "evt_nope"])
        .await
        .failed_with("replay unknown id", &["unknown delivery `evt_nope`"]);
    walhook(&work, &["deliveries", "show", &format!("{event_id}:nope")])
        .await
        .failed_with(
            "show unknown subscription",
            &["unknown subscription `nope`"],
        );
    walhook(&work, &["subscriptions", "pause", "nope"])
        .await
        .failed_with(
            "pause unknown subscription",
            &["unknown subscription `nope`", "crm, audit"],
        );
    walhook(&work, &["deliveries", "replay", "--subscription", "crm"])
        .await
        .failed_with(
            "replay without status",
            &["needs --status", "--status dead"],
        );
    let bad = walhook(&work, &["deliveries", "list", "--status", "lost"]).await;
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(
        bad.stderr
            .contains("possible values: pending, delivered, dead")
    );
    let bad = walhook(&work, &["deliveries", "list", "--since", "yesterday"]).await;
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    assert!(bad.stderr.contains("RFC 3339"), "{}", bad.stderr);
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_deliveries_and_resume_sends_them() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            "[[subscriptions]]\nname = \"crm\"\nurl = \"{}\"\nevents = [\"user.*\"]\n",
            receiver.url
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a', 0)").await;
    wait_until("the first delivery", &db, &daemon, || async {
        receiver.received().len() == 1
    })
    .await;

    let out = walhook(&work, &["subscriptions", "pause", "crm"]).await;
    assert!(out.ok("pause").contains("paused"));
    let client = db.client().await;
    // The dispatcher renews its lease at the start of every round: once it renewed it
    // after the pause, every round that could still send has ended.
    let paused_at: std::time::SystemTime = client
        .query_one(
            "SELECT now() FROM walhook.subscription_state WHERE subscription = 'crm' AND paused",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_for("a dispatch round to begin after the pause", WAIT, || async {
        client
            .query_one(
                "SELECT lease_until > $1::timestamptz + interval '15 s' FROM walhook.subscription_state WHERE subscription = 'crm'",
                &[&paused_at],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    })
    .await;
    db.batch("INSERT INTO users VALUES (2, 'b', 0); UPDATE users SET n = 1 WHERE id = 1")
        .await;
    wait_for("both new events in the log", WAIT, || async {
        client
            .query_one("SELECT count(*) FROM walhook.events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 3
    })
    .await;
    // While paused, nothing is sent (a second is four dispatcher polls).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.received().len(), 1, "sent while paused");
    let subs = walhook(&work, &["subscriptions", "list", "--json"])
        .await
        .json_lines("subscriptions list");
    assert_eq!(subs[0]["state"], "paused");
    assert_eq!(subs[0]["paused"], true);
    assert_eq!(subs[0]["pending"], 2);
    assert_eq!(subs[0]["cursor_lag"], 2);
    assert_eq!(subs[0]["dead"], 0);
    assert!(subs[0]["oldest_pending_seconds"].as_f64().unwrap() >= 1.0);
    let pending = walhook(
        &work,
        &["deliveries", "list", "--status", "pending", "--json"],
    )
    .await
    .json_lines("list pending");
    assert_eq!(pending.len(), 2);
    assert!(pending.iter().all(|d| d["attempts"] == 0));

    let out = walhook(&work, &["subscriptions", "resume", "crm"]).await;
    assert!(out.ok("resume").contains("resumed"));
    wait_until(
        "the 2 held deliveries after resume",
        &db,
        &daemon,
        || async { receiver.received().len() == 3 },
    )
    .await;

    // resume also re-enables a subscription disabled by 410 Gone.
    client
        .batch_execute(
            "UPDATE walhook.subscription_state SET enabled = false, disabled_reason = 'http 410 gone: subscription disabled'",
        )
        .await
        .unwrap();
    let table = walhook(&work, &["subscriptions", "list"]).await;
    assert!(
        table
            .ok("list disabled")
            .contains("disabled (http 410 gone"),
        "{}",
        table.stdout
    );
    walhook(&work, &["subscriptions", "resume", "crm"])
        .await
        .ok("resume disabled");
    let row = client
        .query_one(
            "SELECT enabled, paused, disabled_reason FROM walhook.subscription_state WHERE subscription = 'crm'",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && !row.get::<_, bool>(1));
    assert_eq!(row.get::<_, Option<String>>(2), None);
    db.batch("INSERT INTO users VALUES (3, 'c', 0)").await;
    wait_until("a delivery after re-enabling", &db, &daemon, || async {
        receiver.received().len() == 4
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_thousands_of_rows_goes_in_batches_and_reports_the_count() {
    let db = users_db().await;
    let work = Workdir::new(&users_config(
        &db,
        "[[subscriptions]]\nname = \"crm\"\nurl = \"http://127.0.0.1:9/hook\"\nevents = [\"user.*\"]\n\n\
         [[subscriptions]]\nname = \"vip\"\nurl = \"http://127.0.0.1:9/hook\"\nevents = [\"user.*\"]\n\
         filter = \"event.entity_id == '1'\"\n",
    ));
    walhook(&work, &["setup"]).await.ok("setup");
    // 5,500 events: the first 5,000 dead for crm, the rest delivered (behind the cursor).
    db.batch(
        "INSERT INTO walhook.subscription_state (subscription, cursor) VALUES ('crm', 5500)
             ON CONFLICT (subscription) DO UPDATE SET cursor = 5500;
         INSERT INTO walhook.events (seq, id, type, entity, entity_id, revision, occurred_at, data,
                                     source_table, source_lsn, source_xid, subscriptions)
         SELECT n, 'evt_' || n, 'user.created', 'user', (n % 700)::text, n / 700 + 1, now(), '{}',
                'public.users', '0/0', 1, '{crm}'
         FROM generate_series(1, 5500) n;
         INSERT INTO walhook.delivery_retries (subscription, seq, entity, entity_id, status, attempts,
                                               first_due_at, last_status, last_error)
         SELECT 'crm', n, 'user', (n % 700)::text, 'dead', 7, now() - interval '3 days', 500, 'http 500'
         FROM generate_series(1, 5000) n;",
    )
    .await;
    let nothing = walhook(
        &work,
        &[
            "deliveries",
            "replay",
            "--subscription",
            "crm",
            "--status",
            "dead",
            "--until",
            "1h",
        ],
    )
    .await;
    assert_eq!(
        nothing.ok("replay before").trim(),
        "queued 0 deliveries for replay"
    );

    let out = walhook(
        &work,
        &[
            "deliveries",
            "replay",
            "--subscription",
            "crm",
            "--status",
            "dead",
            "--since",
            "1h",
            "--json",
        ],
    )
    .await
    .json_lines("replay 5000");
    assert_eq!(out[0]["queued"], 5000);
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE status = 'pending' AND next_attempt_at <= now()
                                       AND first_due_at > now() - interval '1 minute' AND attempts = 7),
                    count(*)
             FROM walhook.delivery_retries",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        5000,
        "all due now, fresh max_age, attempts kept"
    );
    assert_eq!(row.get::<_, i64>(1), 5000);

    // Delivered ones have no row: replay gives them one, due now.
    let out = walhook(
        &work,
        &[
            "deliveries",
            "replay",
            "--subscription",
            "crm",
            "--status",
            "delivered",
        ],
    )
    .await;
    assert_eq!(
        out.ok("replay delivered").trim(),
        "queued 500 deliveries for replay"
    );
    let subs = walhook(&work, &["subscriptions", "list", "--json"])
        .await
        .json_lines("subscriptions list");
    assert_eq!(subs[0]["pending"], 5500);
    assert_eq!(subs[0]["dead"], 0);
    assert_eq!(subs[0]["cursor_lag"], 0);

    // A subscription with a filter: of its delivered events, only those the filter
    // passes were sent, so only those are queued again.
    db.batch(
        "INSERT INTO walhook.subscription_state (subscription, cursor) VALUES ('vip', 5510)
             ON CONFLICT (subscription) DO UPDATE SET cursor = 5510;
         INSERT INTO walhook.events (seq, id, type, entity, entity_id, revision, occurred_at, data,
                                     source_table, source_lsn, source_xid, subscriptions)
         SELECT n, 'evt_' || n, 'user.updated', 'user', (n % 3)::text, n, now(), '{}',
                'public.users', '0/0', 1, '{vip}'
         FROM generate_series(5501, 5510) n;",
    )
    .await;
    let out = walhook(
        &work,
        &[
            "deliveries",
            "replay",
            "--subscription",
            "vip",
            "--status",
            "delivered",
        ],
    )
    .await;
    assert_eq!(
        out.ok("replay filtered").trim(),
        "queued 3 deliveries for replay"
    );
    let seqs: Vec<i64> = client
        .query(
            "SELECT seq FROM walhook.delivery_retries WHERE subscription = 'vip' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(seqs, vec![5503, 5506, 5509]);
}
