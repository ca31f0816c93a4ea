//! Live reload against the real binary, cluster and receivers: SIGHUP adds a subscription
//! and a table, then removes a table and a subscription (nothing lost for the table that
//! stays, nothing new for what went); an invalid new config is refused with the reason
//! logged while the old one keeps delivering.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::daemon::{Daemon, Workdir};
use crate::support::pg::TestDb;
use crate::support::pg::create_db;
use crate::support::receiver::{Received, Receiver};
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(60);

/// A config for `db`: `[source]`, then `rest` (tables and subscriptions).
fn config(db: &TestDb, rest: &str) -> String {
    format!(
        r#"
[source]
url = "postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

[server]
listen = "127.0.0.1:0"

{rest}
"#,
        port = db.port,
        name = db.name
    )
}

fn table(name: &str, entity: &str) -> String {
    format!("[[tables]]\ntable = \"public.{name}\"\nentity = \"{entity}\"\n")
}

fn subscription(name: &str, url: &str, events: &str) -> String {
    format!(
        "[[subscriptions]]\nname = \"{name}\"\nurl = \"{url}\"\nevents = [{events}]\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nheaders = {{ Authorization = \"Bearer s3cr3t-t0ken\" }}\n"
    )
}

/// Waits until walhook streams from the slot. (An active slot is not enough: the slot
/// is active while it is being created, before changes are captured.)
async fn wait_streaming(daemon: &mut Daemon) {
    wait_for("walhook to hold the slot and ingest", WAIT, || {
        assert!(daemon.is_running(), "walhook exited: {}", daemon.log());
        let holding = daemon.log().contains("holding the slot; ingesting");
        async move { holding }
    })
    .await;
}

/// Sends SIGHUP and waits until the daemon logged `outcome` once more than before.
async fn sighup(daemon: &mut Daemon, outcome: &str) -> String {
    let before = daemon.log().matches(outcome).count();
    daemon.signal(libc::SIGHUP);
    wait_for(
        &format!("the log line `{outcome}` after SIGHUP"),
        WAIT,
        || {
            assert!(daemon.is_running(), "walhook exited: {}", daemon.log());
            let n = daemon.log().matches(outcome).count();
            async move { n > before }
        },
    )
    .await;
    let log = daemon.log();
    let line = log
        .lines()
        .filter(|l| l.contains(outcome))
        .nth(before)
        .unwrap_or_default();
    line.to_owned()
}

/// `(entity, entity_id)` of each request, in arrival order.
fn ids(received: &[Received]) -> Vec<(String, String)> {
    received
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["entity"].as_str().unwrap().to_owned(),
                body["entity_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_received(receiver: &Receiver, what: &str, n: usize, daemon: &mut Daemon) {
    wait_for(what, WAIT, || {
        assert!(daemon.is_running(), "walhook exited: {}", daemon.log());
        let got = receiver.received().len();
        async move { got >= n }
    })
    .await;
}

#[tokio::test]
async fn reload_adds_a_subscription_and_removes_a_table() {
    let db = create_db().await;
    db.batch(
        "CREATE TABLE users (id int PRIMARY KEY, email text, n int);
         CREATE TABLE orgs (id int PRIMARY KEY, name text)",
    )
    .await;
    let (a, b) = (
        Receiver::start(|_| 200).await,
        Receiver::start(|_| 200).await,
    );
    let sub_a = subscription("a", &a.url, "\"user.*\"");
    let sub_b = subscription("b", &b.url, "\"*\"");
    let users = table("users", "user");
    let orgs = table("orgs", "org");
    let work = Workdir::new(&config(&db, &format!("{users}\n{sub_a}")));
    let mut daemon = work.spawn_run(0);
    wait_streaming(&mut daemon).await;
    for i in 1..=5 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    wait_received(&a, "5 user events at a", 5, &mut daemon).await;

    // Reload 1: subscription b and table orgs are added.
    work.rewrite(&config(&db, &format!("{users}\n{orgs}\n{sub_a}\n{sub_b}")));
    let line = sighup(&mut daemon, "config reloaded").await;
    assert!(
        line.contains("subscriptions_added=b") && line.contains("tables_added=public.orgs"),
        "summary names what changed: {line}"
    );
    for i in 6..=10 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    for i in 1..=5 {
        db.batch(&format!("INSERT INTO orgs VALUES ({i}, 'o{i}')"))
            .await;
    }
    wait_received(&a, "10 user events at a", 10, &mut daemon).await;
    wait_received(&b, "5 user and 5 org events at b", 10, &mut daemon).await;
    let at_b = ids(&b.received());
    let mut users_at_b: Vec<i32> = at_b
        .iter()
        .filter(|(e, _)| e == "user")
        .map(|(_, id)| id.parse().unwrap())
        .collect();
    users_at_b.sort();
    assert_eq!(
        users_at_b,
        [6, 7, 8, 9, 10],
        "b gets changes made after it was added, not the backlog"
    );
    assert!(
        ids(&a.received()).iter().all(|(e, _)| e == "user"),
        "a keeps its own event patterns"
    );

    // Reload 2, under load: every transaction writes an org and updates a user.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let mut next = 6;
            while !stop.load(Ordering::Relaxed) {
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO orgs VALUES ({next}, 'o'); UPDATE users SET n = {next} WHERE id = 1; COMMIT"
                    ))
                    .await
                    .expect("writer transaction");
                next += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            next - 1
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    work.rewrite(&config(&db, &format!("{orgs}\n{sub_b}")));
    let line = sighup(&mut daemon, "config reloaded").await;
    assert!(
        line.contains("subscriptions_removed=a") && line.contains("tables_removed=public.users"),
        "summary names what changed: {line}"
    );
    let after_reload: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .get(0);
    wait_for("a's dispatcher to stop", WAIT, || {
        let stopped = daemon
            .log()
            .lines()
            .any(|l| l.contains("dispatcher stopped") && l.contains("subscription=a"));
        async move { stopped }
    })
    .await;
    let at_a = a.received().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 100..105 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let last_org = writer.await.expect("writer");
    // A last org after the users inserts: once it arrives, they were streamed too.
    let fence = last_org + 1;
    db.batch(&format!("INSERT INTO orgs VALUES ({fence}, 'fence')"))
        .await;

    wait_for("every org to arrive at b", WAIT, || {
        assert!(daemon.is_running(), "walhook exited: {}", daemon.log());
        let got = ids(&b.received());
        async move {
            got.iter()
                .any(|(e, id)| e == "org" && *id == fence.to_string())
        }
    })
    .await;
    // Nothing lost or repeated for orgs, in the store and at b.
    let mut orgs_at_b: HashMap<String, usize> = HashMap::new();
    for (e, id) in ids(&b.received()) {
        if e == "org" {
            *orgs_at_b.entry(id).or_default() += 1;
        }
    }
    let want: Vec<String> = (1..=fence).map(|i| i.to_string()).collect();
    let mut got: Vec<String> = orgs_at_b.keys().cloned().collect();
    got.sort_by_key(|id| id.parse::<i32>().unwrap());
    assert_eq!(got, want, "every committed org reached b");
    assert!(
        orgs_at_b.values().all(|n| *n == 1),
        "each org reached b once"
    );
    let stored = db
        .query_one(
            "SELECT count(*), count(DISTINCT entity_id) FROM walhook.events WHERE entity = 'org'",
            &[],
        )
        .await;
    assert_eq!(stored.get::<_, i64>(0), fence as i64, "one event per org");
    assert_eq!(stored.get::<_, i64>(1), fence as i64, "one event per org");

    // The removed table makes no events, and a gets nothing new.
    let late_users: i64 = db
        .query_one(
            "SELECT count(*) FROM walhook.events WHERE entity = 'user' AND source_lsn > $1::text::pg_lsn",
            &[&after_reload],
        )
        .await
        .get(0);
    assert_eq!(late_users, 0, "users changes after the reload made events");
    let for_a: i64 = db
        .query_one(
            "SELECT count(*) FROM walhook.events WHERE 'a' = ANY (subscriptions) AND source_lsn > $1::text::pg_lsn",
            &[&after_reload],
        )
        .await
        .get(0);
    assert_eq!(for_a, 0, "events routed to a removed subscription");
    assert_eq!(a.received().len(), at_a, "a removed subscription got more");
    let published: Vec<String> = db
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'walhook'",
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, ["orgs"], "the publication follows the config");

    let log = daemon.log();
    assert!(!log.contains("s3cr3t"), "a secret reached the log");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

#[tokio::test]
async fn invalid_config_on_sighup_is_refused_and_the_old_one_keeps_running() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
        .await;
    let (a, b) = (
        Receiver::start(|_| 200).await,
        Receiver::start(|_| 200).await,
    );
    let users = table("users", "user");
    let sub_a = subscription("a", &a.url, "\"user.*\"");
    let sub_b = subscription("b", &b.url, "\"*\"");
    let good = config(&db, &format!("{users}\n{sub_a}"));
    let work = Workdir::new(&good);
    let mut daemon = work.spawn_run(0);
    wait_streaming(&mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'u1@x', 0)").await;
    wait_received(&a, "the first event at a", 1, &mut daemon).await;

    let refused = "config reload refused";
    let cases = [
        (
            "a TOML syntax error",
            format!("{good}\n[[tables]\n{sub_b}"),
            "TOML syntax error",
        ),
        (
            "an unknown table",
            config(
                &db,
                &format!("{users}\n{}\n{sub_a}\n{sub_b}", table("nope", "nope")),
            ),
            "public.nope` (listed in the config) does not exist",
        ),
        (
            "a rule that needs REPLICA IDENTITY FULL",
            config(
                &db,
                &format!("{users}update_columns = [\"email\"]\n{sub_a}\n{sub_b}"),
            ),
            "REPLICA IDENTITY FULL",
        ),
    ];
    for (n, (what, toml, reason)) in cases.iter().enumerate() {
        work.rewrite(toml);
        sighup(&mut daemon, refused).await;
        let log = daemon.log();
        let refusal = &log[log.match_indices(refused).nth(n).unwrap().0..];
        assert!(
            refusal.contains(reason),
            "the refusal of {what} names `{reason}`: {log}"
        );
        // The old config keeps delivering; b was never added.
        let id = n + 2;
        db.batch(&format!("INSERT INTO users VALUES ({id}, 'u@x', 0)"))
            .await;
        wait_received(
            &a,
            &format!("event {id} at a after {what}"),
            id,
            &mut daemon,
        )
        .await;
        assert!(b.received().is_empty(), "b got events after {what}");
    }
    assert!(
        !daemon.log().contains("config reloaded"),
        "a refused config was applied"
    );
    let published: Vec<String> = db
        .query(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = 'walhook'",
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(published, ["users"], "the publication was left alone");

    // A valid config after that applies: b is added, a moves to another receiver (its
    // dispatcher restarts with the new url); a key that needs a restart is only warned
    // about.
    let c = Receiver::start(|_| 200).await;
    let moved = good
        .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"")
        .replace(&a.url, &c.url);
    work.rewrite(&format!("{moved}\n{sub_b}"));
    let line = sighup(&mut daemon, "config reloaded").await;
    assert!(
        line.contains("subscriptions_added=b") && line.contains("subscriptions_changed=a"),
        "summary names what changed: {line}"
    );
    assert!(
        daemon
            .log()
            .lines()
            .any(|l| l.contains("needs a restart") && l.contains("server.listen")),
        "the restart-only change is warned about: {}",
        daemon.log()
    );
    db.batch("INSERT INTO users VALUES (10, 'u@x', 0)").await;
    wait_received(&b, "the first event at b", 1, &mut daemon).await;
    wait_received(&c, "a's event at its new url", 1, &mut daemon).await;
    assert_eq!(a.received().len(), cases.len() + 1, "a's old url got more");
    assert!(!daemon.log().contains("s3cr3t"), "a secret reached the log");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}
