//! `walhook run` part 1 against the real binary and cluster: entity events in the store,
//! exactly once across SIGKILL and PostgreSQL restarts under a running writer (G1, G2,
//! G3), a huge transaction
//! in bounded memory, a lost slot refused (G1), idle slot advance (G7), and start-up
//! refusals for configs that need REPLICA IDENTITY FULL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use crate::support::daemon::{Daemon, Workdir, wait_leading, wait_leading_with_store};
use crate::support::pg::{Cluster, StopMode, TestDb, create_db};
use crate::support::workload::{self, ONE_TABLE, Writer};
use crate::support::{wait_for, wait_for_some};

const WAIT: Duration = Duration::from_secs(60);

/// A config for `db` watching `tables_toml`, with the slot named after the database.
pub(crate) fn config(db: &TestDb, tables_toml: &str) -> String {
    config_with_store(db, None, tables_toml)
}

/// Like [`config`], with the store in `store` (default: the source database).
pub(crate) fn config_with_store(db: &TestDb, store: Option<&TestDb>, tables_toml: &str) -> String {
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
publication = "walhook"

{store}
[server]
listen = "127.0.0.1:0"

{tables_toml}
"#,
        port = db.port,
        name = db.name
    )
}

pub(crate) async fn event_count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM walhook.events", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

#[tokio::test]
async fn run_stores_entity_events_with_revisions_and_exits_0_on_sigterm() {
    let db = create_db().await;
    db.batch(
        "CREATE TABLE users (id int PRIMARY KEY, email text, status text, password_hash text);
         ALTER TABLE users REPLICA IDENTITY FULL;
         CREATE TABLE user_roles (user_id int, role text, PRIMARY KEY (user_id, role));",
    )
    .await;
    let work = Workdir::new(&config(
        &db,
        r#"
[[tables]]
table = "public.users"
entity = "user"
exclude_columns = ["password_hash"]

[[tables.rules]]
event = "user.suspended"
when = "old.status != 'suspended' && new.status == 'suspended'"

[[tables]]
table = "public.user_roles"
entity = "user"
id = ["user_id"]
events = { insert = "role.assigned", delete = "role.unassigned", update = false }

[[subscriptions]]
name = "crm"
url = "http://127.0.0.1:9/hook"
events = ["user.*"]
"#,
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a@x', 'active', 'secret-hash')")
        .await;
    db.batch("UPDATE users SET email = 'b@x' WHERE id = 1")
        .await;
    db.batch("INSERT INTO user_roles VALUES (1, 'admin')").await;
    db.batch("UPDATE users SET status = 'suspended' WHERE id = 1")
        .await;
    db.batch("DELETE FROM user_roles WHERE user_id = 1").await;
    db.batch("DELETE FROM users WHERE id = 1").await;
    let client = db.client().await;
    wait_for("7 events in the store", WAIT, || async {
        event_count(&client).await == 7
    })
    .await;

    let rows = client
        .query(
            "SELECT type, entity, entity_id, revision, data, previous, changed, subscriptions, source_table FROM walhook.events ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(3))).collect();
    assert_eq!(
        got,
        [
            ("user.created".into(), 1),
            ("user.updated".into(), 2),
            ("user.role.assigned".into(), 3),
            ("user.updated".into(), 4),
            ("user.suspended".into(), 4),
            ("user.role.unassigned".into(), 5),
            ("user.deleted".into(), 6),
        ]
    );
    for r in &rows {
        assert_eq!(r.get::<_, String>(1), "user");
        assert_eq!(r.get::<_, String>(2), "1");
        assert_eq!(r.get::<_, Vec<String>>(7), ["crm"]);
        let data: serde_json::Value = r.get(4);
        assert!(
            data.get("password_hash").is_none(),
            "redacted column stored: {data}"
        );
        if let Some(prev) = r.get::<_, Option<serde_json::Value>>(5) {
            assert!(prev.get("password_hash").is_none());
        }
    }
    assert_eq!(
        rows[1].get::<_, serde_json::Value>(4),
        json!({"id": 1, "email": "b@x", "status": "active"})
    );
    assert_eq!(
        rows[1].get::<_, Option<serde_json::Value>>(5),
        Some(json!({"id": 1, "email": "a@x", "status": "active"}))
    );
    assert_eq!(
        rows[1].get::<_, Option<Vec<String>>>(6),
        Some(vec!["email".to_owned()])
    );
    assert_eq!(rows[2].get::<_, String>(8), "public.user_roles");
    let revision: i64 = client
        .query_one(
            "SELECT revision FROM walhook.revisions WHERE entity = 'user' AND entity_id = '1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(revision, 6);
    assert!(
        !daemon.log().contains("secret-hash"),
        "a row value reached the log"
    );

    daemon.signal(libc::SIGTERM);
    let status = daemon.wait_exit(WAIT);
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        daemon.log()
    );
    // The final status update confirmed everything stored.
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn > (SELECT max(source_lsn) FROM walhook.events), confirmed_flush_lsn::text, (SELECT max(source_lsn) FROM walhook.events)::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "confirmed {} vs last commit {}; log:\n{}",
        row.get::<_, String>(1),
        row.get::<_, String>(2),
        daemon.log()
    );
}

/// A deterministic pseudo-random sequence (xorshift), seeded per run and printed.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Commits random small transactions of inserts/updates/deletes on `entities` ids and
/// returns the committed log: (id, event type) in commit order.
pub(crate) async fn write_random(
    client: &Client,
    rng: &mut Rng,
    live: &mut [bool],
    txns: usize,
) -> Vec<(i32, &'static str)> {
    let mut log = Vec::new();
    for _ in 0..txns {
        let mut sql = String::from("BEGIN;");
        let mut pending = Vec::new();
        for _ in 0..=rng.below(4) {
            let id = rng.below(live.len() as u64) as usize;
            let n = rng.below(1_000_000);
            if !live[id] {
                sql.push_str(&format!("INSERT INTO users VALUES ({id}, 'u{id}@x', {n});"));
                live[id] = true;
                pending.push((id as i32, "user.created"));
            } else if rng.below(5) == 0 {
                sql.push_str(&format!("DELETE FROM users WHERE id = {id};"));
                live[id] = false;
                pending.push((id as i32, "user.deleted"));
            } else {
                sql.push_str(&format!("UPDATE users SET n = {n} WHERE id = {id};"));
                pending.push((id as i32, "user.updated"));
            }
        }
        sql.push_str("COMMIT;");
        client
            .batch_execute(&sql)
            .await
            .expect("workload transaction");
        log.extend(pending);
    }
    log
}

/// Every committed change has exactly one event, and revisions per entity are 1..n in
/// commit order.
pub(crate) async fn assert_exactly_once(client: &Client, log: &[(i32, &'static str)]) {
    let rows = client
        .query(
            "SELECT entity_id, type, revision FROM walhook.events ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        log.len(),
        "events in store vs committed changes"
    );
    let mut expected: HashMap<String, Vec<&str>> = HashMap::new();
    for (id, ty) in log {
        expected.entry(id.to_string()).or_default().push(ty);
    }
    let mut got: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for r in &rows {
        got.entry(r.get(0)).or_default().push((r.get(1), r.get(2)));
    }
    assert_eq!(got.len(), expected.len());
    for (id, want) in &expected {
        let have = &got[id];
        let types: Vec<&str> = have.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(&types, want, "event types of entity {id}");
        let revs: Vec<i64> = have.iter().map(|(_, r)| *r).collect();
        let one_to_n: Vec<i64> = (1..=want.len() as i64).collect();
        assert_eq!(revs, one_to_n, "revisions of entity {id}");
    }
}

pub(crate) const USERS_TABLE: &str = r#"
[[tables]]
table = "public.users"
entity = "user"
"#;

/// The watched table of the kill and restart loops, and its config.
fn workload_config(db: &TestDb) -> String {
    config(db, &workload::tables_toml(ONE_TABLE))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_repeats_nothing() {
    let db = create_db().await;
    db.batch(&workload::create_sql(ONE_TABLE)).await;
    let work = Workdir::new(&workload_config(&db));
    let reader = db.client().await;
    let mut rng = workload::Rng::new(workload::Rng::seed_from_env("WALHOOK_TEST_SEED"));
    let mut first = work.spawn_run(0);
    wait_leading(&db, &mut first).await;
    // A writer commits the whole time: every kill hits a daemon with work in flight.
    let writer = Writer::spawn(
        db.url(),
        ONE_TABLE,
        300,
        rng.below(u64::MAX),
        Duration::from_millis(2),
    );
    let mut daemon = Some(first);
    for round in 1..=10 {
        let alive = rng.between(Duration::from_millis(300), Duration::from_millis(2000));
        tokio::time::sleep(alive).await;
        let stored = workload::stored_events(&reader).await;
        daemon.take().expect("running").kill9();
        eprintln!(
            "kill {round}: {} changes committed, {stored} stored",
            writer.committed()
        );
        // A while with no walhook at all, the writer still going.
        tokio::time::sleep(rng.between(Duration::ZERO, Duration::from_millis(500))).await;
        daemon = Some(work.spawn_run(round));
    }
    let log = writer.stop().await;
    let mut daemon = daemon.expect("running");
    let total = log.changes.len() as i64;
    wait_events(&reader, total, &mut daemon, WAIT * 2).await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
    workload::assert_exactly_once(&reader, &log.changes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarts_lose_and_repeat_nothing() {
    let cluster = Cluster::start();
    let db = cluster.create_db().await;
    db.batch(&workload::create_sql(ONE_TABLE)).await;
    let work = Workdir::new(&workload_config(&db));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let mut rng = workload::Rng::new(workload::Rng::seed_from_env("WALHOOK_TEST_SEED"));
    // A writer commits through every restart (it reconnects and learns whether a
    // COMMIT without an answer happened).
    let writer = Writer::spawn(
        db.url(),
        ONE_TABLE,
        300,
        rng.below(u64::MAX),
        Duration::from_millis(2),
    );
    for round in 1..=3 {
        tokio::time::sleep(rng.between(Duration::from_millis(500), Duration::from_millis(2500)))
            .await;
        let c = cluster.clone();
        // Panics past the harness's stop limit (G9), naming what held the stop up.
        let took = tokio::task::spawn_blocking(move || c.restart(StopMode::Fast))
            .await
            .unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()));
        eprintln!(
            "restart {round} took {took:?}; {} changes committed",
            writer.committed()
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = writer.stop().await;
    let client = db.client().await;
    let total = log.changes.len() as i64;
    wait_events(&client, total, &mut daemon, WAIT * 2).await;
    assert!(
        daemon.is_running(),
        "walhook survived the restarts; log:\n{}",
        daemon.log()
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success());
    workload::assert_exactly_once(&client, &log.changes).await;
}

#[tokio::test]
async fn crash_inside_a_million_row_transaction_is_exactly_once_in_bounded_memory() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
        .await;
    let work = Workdir::new(&config(&db, USERS_TABLE));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users SELECT g, 'user' || g || '@example.com', g FROM generate_series(1, 1000000) g").await;
    let client = db.client().await;
    // Kill it once part of the transaction is stored (checkpoint not complete).
    wait_for("part of the big transaction stored", WAIT * 3, || async {
        client
            .query_one(
                "SELECT NOT complete AND rows_done > 50000 FROM walhook.checkpoints",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;
    let mut peak = daemon.peak_rss_kib().unwrap_or(0);
    daemon.kill9();
    let mut daemon = work.spawn_run(1);
    let deadline = Instant::now() + WAIT * 5;
    loop {
        if let Some(rss) = daemon.is_running().then(|| daemon.peak_rss_kib()).flatten() {
            peak = peak.max(rss);
        }
        if event_count(&client).await >= 1_000_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for 1,000,000 events; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(rss) = daemon.peak_rss_kib() {
        peak = peak.max(rss);
    }
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success());
    let row = client
        .query_one(
            "SELECT count(*), count(DISTINCT entity_id), max(revision), bool_and(type = 'user.created') FROM walhook.events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1_000_000);
    assert_eq!(row.get::<_, i64>(1), 1_000_000);
    assert_eq!(row.get::<_, i64>(2), 1);
    assert!(row.get::<_, bool>(3));
    eprintln!("peak RSS {peak} KiB");
    assert!(
        peak < 150 * 1024,
        "peak RSS {peak} KiB is not below 150 MiB"
    );
}

#[tokio::test]
async fn lost_slot_with_a_checkpoint_is_refused_until_reset() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
        .await;
    let work = Workdir::new(&config(&db, USERS_TABLE));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    // Events stored before the loss: the reset must keep them and append after them.
    db.batch("INSERT INTO users VALUES (1, 'a', 1)").await;
    let client = db.client().await;
    wait_for("the event before the loss", WAIT, || async {
        event_count(&client).await == 1
    })
    .await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success());
    db.batch(&format!("SELECT pg_drop_replication_slot('{}')", db.name))
        .await;

    let (status, _, stderr) = work.run_to_end(&["run"], WAIT);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("is gone"), "{stderr}");
    assert!(stderr.contains("may have been lost"), "{stderr}");
    assert!(stderr.contains("walhook setup --reset-slot"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let (status, _, stderr) = work.run_to_end(&["setup", "--reset-slot"], WAIT);
    assert!(status.success(), "{stderr}");
    let mut daemon = work.spawn_run(1);
    wait_leading(&db, &mut daemon).await;
    db.batch("UPDATE users SET n = 2 WHERE id = 1").await;
    wait_for("the event after a reset", WAIT, || async {
        event_count(&client).await == 2
    })
    .await;
    let rows = client
        .query("SELECT seq, revision FROM walhook.events ORDER BY seq", &[])
        .await
        .unwrap();
    let log: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(log, [(1, 1), (2, 2)], "appended after the old log");
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test]
async fn idle_watched_tables_still_advance_the_slot() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int); CREATE TABLE busy (id serial PRIMARY KEY, v int);")
        .await;
    let work = Workdir::new(&config(&db, USERS_TABLE));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let client = db.client().await;
    let lsn_of = |sql: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(sql, &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let slot = db.name.clone();
    let before: String = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0);
    for i in 0..50 {
        client
            .execute("INSERT INTO busy (v) VALUES ($1)", &[&i])
            .await
            .unwrap();
    }
    let target = lsn_of("SELECT pg_current_wal_lsn()::text").await;
    wait_for_some("confirmed_flush_lsn to pass the unwatched writes", Duration::from_secs(30), || async {
        let advanced: bool = client
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn AND confirmed_flush_lsn > $3::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &target, &before],
            )
            .await
            .unwrap()
            .get(0);
        advanced.then_some(())
    })
    .await;
    assert_eq!(event_count(&client).await, 0);
}

#[tokio::test]
async fn configs_that_need_old_rows_are_refused_without_replica_identity_full() {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, status text)")
        .await;
    let cases = [
        r#"
[[tables]]
table = "public.users"
[[tables.rules]]
event = "users.suspended"
when = "old.status != 'suspended' && new.status == 'suspended'"
"#,
        r#"
[[tables]]
table = "public.users"
update_columns = ["email"]
"#,
    ];
    for tables in cases {
        let work = Workdir::new(&config(&db, tables));
        for cmd in ["run", "check"] {
            let (status, stdout, stderr) = work.run_to_end(&[cmd], WAIT);
            let out = format!("{stdout}{stderr}");
            assert_eq!(status.code(), Some(1), "walhook {cmd}: {out}");
            assert!(
                out.contains("public.users"),
                "walhook {cmd} names the table: {out}"
            );
            assert!(
                out.contains("REPLICA IDENTITY FULL"),
                "walhook {cmd} names the fix: {out}"
            );
            assert!(!out.contains("panicked"), "{out}");
        }
    }
    // With FULL the same config starts.
    db.batch("ALTER TABLE users REPLICA IDENTITY FULL").await;
    let work = Workdir::new(&config(&db, cases[0]));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
}

/// A source database watched by walhook, whose store lives in a cluster of its own (which
/// a test stops and starts), with `first` random transactions written and stored.
struct OutageSetup {
    db: TestDb,
    store_cluster: Cluster,
    store_db: TestDb,
    daemon: Daemon,
    /// Holds the daemon's config and log; dropped after it.
    work: Workdir,
    writer: Client,
    rng: Rng,
    /// Which ids exist ([`write_random`]).
    live: Vec<bool>,
    /// What was written ([`assert_exactly_once`]).
    log: Vec<(i32, &'static str)>,
}

impl OutageSetup {
    async fn start(first: usize) -> OutageSetup {
        let db = create_db().await;
        db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
            .await;
        let store_cluster = Cluster::start();
        let store_db = store_cluster.create_db().await;
        let work = Workdir::new(&config_with_store(&db, Some(&store_db), USERS_TABLE));
        let mut daemon = work.spawn_run(0);
        wait_leading_with_store(&db, &store_db, &mut daemon).await;
        let store_client = store_db.client().await;
        let writer = db.client().await;
        let mut rng = Rng::new();
        let mut live = vec![false; 100];
        let log = write_random(&writer, &mut rng, &mut live, first).await;
        let stored = log.len() as i64;
        wait_for("the first events", WAIT, || async {
            event_count(&store_client).await == stored
        })
        .await;
        OutageSetup {
            db,
            store_cluster,
            store_db,
            daemon,
            work,
            writer,
            rng,
            live,
            log,
        }
    }
}

#[tokio::test]
async fn unreachable_store_makes_ingest_wait_without_confirming() {
    let OutageSetup {
        db,
        store_cluster,
        store_db,
        mut daemon,
        work: _work,
        writer,
        mut rng,
        mut live,
        mut log,
    } = OutageSetup::start(30).await;

    let c = store_cluster.clone();
    tokio::task::spawn_blocking(move || c.stop(StopMode::Fast))
        .await
        .unwrap();
    // Every transaction from here on commits after `mark`.
    let mark: String = writer
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    log.extend(write_random(&writer, &mut rng, &mut live, 40).await);
    // Long enough for several status updates; none may confirm the unstored changes.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let past: bool = writer
        .query_one(
            "SELECT confirmed_flush_lsn > $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.name, &mark],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        !past,
        "confirmed past {mark} (now {}) while the store was down",
        confirmed_flush(&writer, &db.name).await
    );
    assert!(
        daemon.is_running(),
        "walhook waits for the store; log:\n{}",
        daemon.log()
    );

    let c = store_cluster.clone();
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .unwrap();
    let store_client = store_db.client().await;
    let total = log.len() as i64;
    wait_events(&store_client, total, &mut daemon, WAIT).await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
    assert_exactly_once(&store_client, &log).await;
}

/// G9: once ingest cannot store a batch, the source stops holding the server up at
/// once: it closes the replication connection on the next change it hands on, not
/// when the channel to ingest fills (16,384 messages: minutes at this write rate) nor
/// after the 5 s an ingest that takes nothing is given. Writes go on steadily (a
/// transaction every 50 ms) through the outage, so every change after the store
/// stopped reaches the source task while ingest is retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_lets_go_of_the_server_as_soon_as_ingest_cannot_store() {
    let OutageSetup {
        db,
        store_cluster,
        store_db,
        mut daemon,
        work: _work,
        writer,
        mut rng,
        mut live,
        mut log,
    } = OutageSetup::start(10).await;

    // A steady writer, through the outage and after it.
    let stop_writing = tokio_util::sync::CancellationToken::new();
    let steady = tokio::spawn({
        let stop_writing = stop_writing.clone();
        async move {
            let mut log = Vec::new();
            while !stop_writing.is_cancelled() {
                log.extend(write_random(&writer, &mut rng, &mut live, 1).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            log
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watcher = db.client().await;
    let slot_active = || async {
        watcher
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&db.name],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
    };
    assert!(slot_active().await, "streaming before the store stops");

    let c = store_cluster.clone();
    tokio::task::spawn_blocking(move || c.stop(StopMode::Fast))
        .await
        .unwrap();
    let stopped = Instant::now();
    let mut let_go = None;
    while stopped.elapsed() < Duration::from_secs(20) {
        if !slot_active().await {
            let_go = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some(let_go) = let_go else {
        panic!(
            "the slot stayed active 20 s after the store stopped; log:\n{}",
            daemon.log()
        );
    };
    eprintln!("replication connection closed {let_go:?} after the store stopped");
    // Ingest learns of the outage at its next batch (a change every 50 ms); the close
    // follows at the next change. Far below the 5 s limit either fallback would take.
    assert!(
        let_go < Duration::from_millis(2500),
        "closed {let_go:?} after the store stopped; log:\n{}",
        daemon.log()
    );
    let first_close = daemon
        .log()
        .lines()
        .find(|l| l.contains("closing the replication connection"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(
        first_close.contains("ingest cannot store what it received"),
        "the first close names ingest's failure: {first_close:?}"
    );

    let c = store_cluster.clone();
    tokio::task::spawn_blocking(move || c.start_again())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writing.cancel();
    log.extend(steady.await.unwrap());
    let store_client = store_db.client().await;
    wait_events(&store_client, log.len() as i64, &mut daemon, WAIT).await;
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "log:\n{}", daemon.log());
    assert_exactly_once(&store_client, &log).await;
}

async fn confirmed_flush(client: &Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

/// Waits until the store holds `n` events; on timeout, fails with the daemon's log.
async fn wait_events(client: &Client, n: i64, daemon: &mut Daemon, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = event_count(client).await;
        if have >= n {
            return;
        }
        if Instant::now() > deadline || !daemon.is_running() {
            let activity: Vec<String> = client
                .query(
                    "SELECT format('%s %s %s/%s xact=%s %s', pid, state, wait_event_type, wait_event, xact_start, left(query, 80)) FROM pg_stat_activity WHERE datname = current_database()",
                    &[],
                )
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            let log: String = daemon
                .log()
                .lines()
                .filter(|l| !l.contains("standby status"))
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "waited {timeout:?} for {n} events, have {have}; activity:\n{}\nwalhook log:\n{log}",
                activity.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The binary sets its allocator up as `main.rs` says (arenas commit as used, freed
/// memory purged after 10 ms: the mimalloc 3 default of 1000 ms held 71-78 MiB instead
/// of 56-58 while ingesting and delivering a 1M backlog), and the `MIMALLOC_*`
/// environment still wins. mimalloc prints its options with `MIMALLOC_VERBOSE=1`.
#[test]
fn the_allocator_purges_soon_and_the_environment_wins() {
    let options = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(crate::support::walhook_bin())
            .arg("--version")
            .env("MIMALLOC_VERBOSE", "1")
            .envs(env.iter().copied())
            .output()
            .expect("run walhook --version");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let tuned = options(&[]);
    assert!(tuned.contains("option 'purge_delay': 10 "), "{tuned}");
    assert!(tuned.contains("option 'arena_eager_commit': 0 "), "{tuned}");
    let env = options(&[
        ("MIMALLOC_PURGE_DELAY", "250"),
        ("MIMALLOC_ARENA_EAGER_COMMIT", "1"),
    ]);
    assert!(env.contains("option 'purge_delay': 250 "), "{env}");
    assert!(env.contains("option 'arena_eager_commit': 1 "), "{env}");
}
