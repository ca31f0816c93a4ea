//! Ingest's write path against a real store: a batch whose COMMIT acknowledgement was
//! lost is not stored twice when retried (G2, G3); a batch without events writes nothing
//! (G9) while the slot still advances (G7); a change the store refuses keeps the daemon
//! up and not ready, is never confirmed, and goes through once the store accepts it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, json};
use tokio::sync::oneshot::Sender;
use walhook::pg::ConnInfo;
use walhook::source::Lsn;
use walhook::source::stream::Position;
use walhook::store::ingest::{After, IngestOutcome, batch_keys};
use walhook::store::{ChangeEvents, IngestBatch, PendingEvent, Store, StoreError};

use crate::support::daemon::{Daemon, Workdir, server_url, users_config, wait_leading};
use crate::support::pg::{TestDb, create_db, users_db};
use crate::support::{wait_for, wait_for_some};

const WAIT: Duration = Duration::from_secs(60);

/// A migrated store in `db` with a checkpoint for slot `s` led by epoch 1.
async fn store(db: &TestDb) -> Store {
    let params = ConnInfo::parse(&db.url()).expect("store url");
    let mut store = Store::connect(&params, "walhook").await.expect("store");
    store.migrate().await.expect("migrate");
    store.create_checkpoint("s").await.expect("checkpoint");
    assert_eq!(store.take_leadership("s", "test").await.expect("lead"), 1);
    store
}

/// One `user.created` event per id, in one source transaction committing at `lsn`.
fn batch(lsn: u64, ids: &[&str]) -> IngestBatch {
    let changes = ids
        .iter()
        .map(|id| ChangeEvents {
            entity: Arc::from("user"),
            entity_id: (*id).to_owned(),
            table: Arc::from("public.users"),
            commit_lsn: Lsn(lsn),
            xid: 7,
            commit_time: 0,
            bulk: None,
            events: vec![PendingEvent {
                id: walhook::store::ingest::new_event_id(),
                event_type: "user.created".into(),
                data: Map::from_iter([("id".to_owned(), json!(id))]),
                previous: None,
                changed: None,
                subscriptions: Arc::from(Vec::<String>::new()),
                json: None,
            }],
            context_keys: None,
            context: None,
        })
        .collect::<Vec<_>>();
    IngestBatch {
        position: Position {
            commit_lsn: Lsn(lsn),
            rows_done: changes.len() as u64,
            complete: true,
        },
        changes,
        backfills: Vec::new(),
    }
}

/// (seq, entity_id, revision) of every stored event, in log order.
async fn events(db: &TestDb) -> Vec<(i64, String, i64)> {
    db.query(
        "SELECT seq, entity_id, revision FROM walhook.events ORDER BY seq",
        &[],
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

#[tokio::test]
async fn a_batch_retried_after_its_commit_was_acknowledged_lost_is_stored_once() {
    let db = create_db().await;
    let mut store = store(&db).await;
    let first = batch(0x1000, &["a", "b"]);
    let done = store.ingest("s", 1, &first).await.expect("first ingest");
    assert_eq!((done.events, done.last_seq), (2, 2));
    assert!(!done.already_stored);

    // The server committed, but the acknowledgement was lost: ingest retries the batch.
    let again = store.ingest("s", 1, &first).await.expect("retried ingest");
    assert!(again.already_stored, "the retry is recognised as stored");
    assert_eq!((again.events, again.last_seq), (0, 2));

    // The next batch, and a retried part of one transaction, continue the log.
    let mut part = batch(0x2000, &["a", "c", "d"]);
    part.changes.truncate(2);
    part.position = Position {
        commit_lsn: Lsn(0x2000),
        rows_done: 2,
        complete: false,
    };
    store
        .ingest("s", 1, &part)
        .await
        .expect("part of a transaction");
    assert!(
        store
            .ingest("s", 1, &part)
            .await
            .expect("part again")
            .already_stored
    );
    let mut rest = batch(0x2000, &["a", "c", "d"]);
    rest.changes.drain(..2);
    let out = store.ingest("s", 1, &rest).await.expect("rest");
    assert_eq!(
        (out.events, out.last_seq, out.already_stored),
        (1, 5, false)
    );

    assert_eq!(
        events(&db).await,
        [
            (1, "a".into(), 1),
            (2, "b".into(), 1),
            (3, "a".into(), 2),
            (4, "c".into(), 1),
            (5, "d".into(), 1),
        ]
    );
    let revision = db
        .query_one(
            "SELECT revision FROM walhook.revisions WHERE entity = 'user' AND entity_id = 'a'",
            &[],
        )
        .await;
    assert_eq!(revision.get::<_, i64>(0), 2);
}

#[tokio::test]
async fn a_store_upgraded_to_byte_ordered_revisions_keeps_and_continues_them() {
    // A version-6 store (revisions in the database's collation) with revisions in it:
    // migration 7 keeps them, and ingest goes on from them.
    let db = create_db().await;
    let mut store = store(&db).await;
    store
        .ingest("s", 1, &batch(0x1000, &["a", "b", "é"]))
        .await
        .expect("first ingest");
    db.batch(
        "ALTER TABLE walhook.revisions
             ALTER COLUMN entity TYPE text COLLATE \"default\",
             ALTER COLUMN entity_id TYPE text COLLATE \"default\";
         DELETE FROM walhook.schema_migrations WHERE version = 7;",
    )
    .await;
    let collations = || async {
        db.query(
            "SELECT a.attname::text, coalesce(c.collname::text, '') FROM pg_attribute a
             LEFT JOIN pg_collation c ON c.oid = a.attcollation
             WHERE a.attrelid = 'walhook.revisions'::regclass AND a.attname IN ('entity', 'entity_id')
             ORDER BY 1",
            &[],
        )
        .await
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect::<Vec<_>>()
    };
    assert_eq!(collations().await[0].1, "default", "set up as version 6");

    assert_eq!(store.migrate().await.expect("upgrade"), 1, "one migration");
    assert_eq!(
        collations().await,
        [
            ("entity".into(), "C".into()),
            ("entity_id".into(), "C".into())
        ]
    );
    let out = store
        .ingest("s", 1, &batch(0x2000, &["é", "c", "a"]))
        .await
        .expect("ingest after the upgrade");
    assert_eq!(
        out.revisions,
        [2, 1, 2],
        "revisions go on from the stored ones"
    );
    let revisions: Vec<(String, i64)> = db
        .query(
            "SELECT entity_id, revision FROM walhook.revisions ORDER BY entity_id",
            &[],
        )
        .await
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        revisions,
        [
            ("a".into(), 2),
            ("b".into(), 1),
            ("c".into(), 1),
            ("é".into(), 2)
        ]
    );
}

#[tokio::test]
async fn a_refused_batch_is_refused_for_its_cause_not_for_the_statements_after_it() {
    // The statements of a batch are sent together; those after the refused one fail
    // only with "current transaction is aborted". The reason (and metric kind) must
    // be the refused statement's, every time.
    let db = create_db().await;
    let mut store = store(&db).await;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..40 {
        // ~10 kB that does not compress: over the revisions index's row size limit.
        let id: String = (0..640).map(|_| format!("{:016x}", next())).collect();
        let refused = batch(0x1000 + i, &["a", &id, "b"]);
        let err = store
            .ingest("s", 1, &refused)
            .await
            .expect_err("an id over the index limit");
        let refusal = err.refusal();
        assert_eq!(refusal.kind, "limit", "try {i}: {}", refusal.what);
    }
    assert!(
        events(&db).await.is_empty(),
        "nothing of a refused batch is stored"
    );
}

/// The store sessions of ingest that wait inside their transaction for the batch
/// before (idle in transaction), and those that wait for a lock.
async fn sessions(db: &TestDb) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'idle in transaction'),
                    count(*) FILTER (WHERE wait_event_type = 'Lock')
             FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            &[],
        )
        .await;
    (row.get(0), row.get(1))
}

/// `After` a batch with `keys`, and the sender that says it committed.
fn after(keys: &IngestBatch) -> (After, tokio::sync::oneshot::Sender<bool>) {
    let (go, committed) = tokio::sync::oneshot::channel();
    let keys = Arc::new(batch_keys(keys));
    (After { keys, committed }, go)
}

/// A batch being written by a task, giving back its connection and outcome.
type Writing = tokio::task::JoinHandle<(Store, Result<IngestOutcome, StoreError>)>;

/// Writes `batch` with `store` after the batch `after` names, in a task.
fn write(mut store: Store, batch: IngestBatch, after: After) -> Writing {
    tokio::spawn(async move {
        let out = store.ingest_after("s", 1, &batch, Some(after)).await;
        (store, out)
    })
}

/// Batches a (users x, y) and b (users y, z), each on a connection of its own in `db`,
/// both waiting inside their transactions, a for its sender (after an empty batch: it
/// has upserted x and y and holds their rows), b for a's (it has upserted z, and waits
/// for a without touching y). Fails when b waits for a lock instead.
async fn two_batches_waiting(db: &TestDb) -> ((Writing, Sender<bool>), (Writing, Sender<bool>)) {
    let first = store(db).await;
    let second = first.connect_another().await.expect("second connection");
    let a = batch(0x1000, &["x", "y"]);
    let b = batch(0x2000, &["y", "z"]);
    let (after_none, go_a) = after(&batch(0, &[]));
    let (after_a, go_b) = after(&a);
    let write_a = write(first, a, after_none);
    wait_for("the first batch to wait", WAIT, || async {
        sessions(db).await.0 == 1
    })
    .await;
    let write_b = write(second, b, after_a);
    // Both sessions wait in their transactions, neither for a lock.
    wait_for("both batches to wait", WAIT, || async {
        sessions(db).await == (2, 0)
    })
    .await;
    assert!(
        events(db).await.is_empty(),
        "nothing is visible before a commit"
    );
    ((write_a, go_a), (write_b, go_b))
}

/// The log of a then b (see [`two_batches_waiting`]).
const A_THEN_B: [(i64, &str, i64); 4] = [(1, "x", 1), (2, "y", 1), (3, "y", 2), (4, "z", 1)];

fn log_is(log: Vec<(i64, String, i64)>, want: &[(i64, &str, i64)]) {
    let log: Vec<(i64, &str, i64)> = log.iter().map(|(s, id, r)| (*s, id.as_str(), *r)).collect();
    assert_eq!(log, want);
}

#[tokio::test]
async fn a_batch_written_while_the_one_before_is_open_waits_only_for_the_entities_they_share() {
    let db = create_db().await;
    let ((write_a, go_a), (write_b, go_b)) = two_batches_waiting(&db).await;
    go_a.send(true).expect("a waits");
    let (_, out_a) = write_a.await.expect("a's task");
    let out_a = out_a.expect("a stored");
    assert_eq!(
        (out_a.events, out_a.last_seq, out_a.revisions),
        (2, 2, vec![1, 1])
    );
    go_b.send(true).expect("b waits");
    let (_, out_b) = write_b.await.expect("b's task");
    let out_b = out_b.expect("b stored");
    assert_eq!(
        (out_b.events, out_b.last_seq, out_b.revisions),
        (2, 4, vec![2, 1])
    );
    log_is(events(&db).await, &A_THEN_B);
}

#[tokio::test]
async fn when_the_batch_before_fails_the_next_is_rolled_back_and_both_go_through_again() {
    let db = create_db().await;
    let ((write_a, go_a), (write_b, go_b)) = two_batches_waiting(&db).await;
    // The batch before this one fails (here: told so); the next is told it failed.
    go_a.send(false).expect("a waits");
    let (mut first, out_a) = write_a.await.expect("a's task");
    assert!(matches!(out_a, Err(StoreError::EarlierFailed)), "{out_a:?}");
    drop(go_b);
    let (mut second, out_b) = write_b.await.expect("b's task");
    assert!(matches!(out_b, Err(StoreError::EarlierFailed)), "{out_b:?}");
    assert!(events(&db).await.is_empty(), "both rolled back");
    let revisions = db.query("SELECT * FROM walhook.revisions", &[]).await;
    assert!(revisions.is_empty(), "no revision consumed");

    // Written again, one at a time, on the same connections.
    first
        .ingest("s", 1, &batch(0x1000, &["x", "y"]))
        .await
        .expect("a again");
    second
        .ingest("s", 1, &batch(0x2000, &["y", "z"]))
        .await
        .expect("b again");
    log_is(events(&db).await, &A_THEN_B);
}

/// Rows in `ckpt_log`: one per update of the checkpoint row since [`log_checkpoint_writes`].
async fn checkpoint_writes(db: &TestDb) -> i64 {
    db.query_one("SELECT count(*) FROM ckpt_log", &[])
        .await
        .get(0)
}

/// From now on every update of `walhook.checkpoints` adds a row to `ckpt_log`.
async fn log_checkpoint_writes(db: &TestDb) {
    db.batch(
        "CREATE TABLE ckpt_log (at timestamptz DEFAULT clock_timestamp());
         CREATE FUNCTION log_ckpt() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO ckpt_log DEFAULT VALUES; RETURN NULL; END $$;
         CREATE TRIGGER log_ckpt AFTER UPDATE ON walhook.checkpoints
           FOR EACH ROW EXECUTE FUNCTION log_ckpt();",
    )
    .await;
}

async fn event_count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM walhook.events", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// `walhook run` on `db` (`users_config` with `rest`) once it stored its first event
/// (user 1 created): its workdir (the daemon's config and log), the daemon, a client.
async fn running_with_one_event(
    db: &TestDb,
    rest: &str,
) -> (Workdir, Daemon, tokio_postgres::Client) {
    let work = Workdir::new(&users_config(db, rest));
    let mut daemon = work.spawn_run(0);
    wait_leading(db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a', 0)").await;
    let client = db.client().await;
    wait_for("the first event", WAIT, || async {
        event_count(&client).await == 1
    })
    .await;
    (work, daemon, client)
}

#[tokio::test]
async fn changes_without_events_write_nothing_to_the_store_but_advance_the_slot() {
    let db = users_db().await;
    db.batch("ALTER TABLE users REPLICA IDENTITY FULL").await;
    // Updates that change only `n` produce no event. (Transactions on unwatched tables
    // do not reach walhook at all on PostgreSQL 15: pgoutput skips them.)
    let (work, mut daemon, client) =
        running_with_one_event(&db, "update_columns = [\"email\"]").await;
    log_checkpoint_writes(&db).await;

    // Twenty transactions of watched changes without events, then a change with one:
    // only the latter's batch may write to the store.
    for i in 0..20 {
        db.batch(&format!("UPDATE users SET n = {i} WHERE id = 1"))
            .await;
    }
    let eventless_end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    db.batch("INSERT INTO users VALUES (2, 'b', 0)").await;
    wait_for(
        "the event after the changes without events",
        WAIT,
        || async { event_count(&client).await == 2 },
    )
    .await;
    assert_eq!(
        checkpoint_writes(&db).await,
        1,
        "only the batch with the watched change wrote to the store; {}",
        daemon.log()
    );
    // The checkpoint lags behind the slot, which still passes those changes
    // (one more change makes the source task hand the confirmation on).
    db.batch("INSERT INTO users VALUES (3, 'c', 0)").await;
    let slot = db.name.clone();
    wait_for(
        "the slot's confirmed_flush_lsn to pass the changes without events",
        WAIT,
        || async {
            client
                .query_one(
                    "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot, &eventless_end],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false)
        },
    )
    .await;
    // A restart resumes correctly from a checkpoint behind the slot: nothing lost,
    // nothing twice.
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
    let mut daemon = work.spawn_run(1);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (4, 'd', 0)").await;
    wait_for("the event after a restart", WAIT, || async {
        event_count(&client).await >= 4
    })
    .await;
    let ids: Vec<i32> = db
        .query(
            "SELECT (data->>'id')::int FROM walhook.events ORDER BY seq",
            &[],
        )
        .await
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1, 2, 3, 4], "{}", daemon.log());
}

/// A config watching `public.docs` as entity `doc` with `id = ["ref"]`, delivering to
/// `url`.
fn docs_config(db: &TestDb, url: &str) -> String {
    format!(
        r#"
[source]
url = "postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.docs"
entity = "doc"
id = ["ref"]

[[subscriptions]]
name = "sink"
url = "{url}"
events = ["doc.*"]
"#,
        port = db.port,
        name = db.name
    )
}

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

/// `walhook_ingest_errors_total{kind="<kind>"}` from /metrics.
async fn ingest_errors(base: &str, kind: &str) -> f64 {
    let (_, body) = get(&format!("{base}/metrics")).await;
    let series = format!("walhook_ingest_errors_total{{kind=\"{kind}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Whether the slot's confirmed_flush_lsn is at or past `lsn`.
async fn confirmed_past(db: &TestDb, lsn: &str) -> bool {
    db.query_one(
        "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $1",
        &[&db.name, &lsn],
    )
    .await
    .get(0)
}

/// Runs the refused-change scenario: a watched row whose change the store refuses
/// (made so by `refuse`, written by `insert`), asserts the daemon stays up and not
/// ready naming the table, never confirms past it, and counts it as `kind`; then, if
/// `cure` is given, runs it and asserts the change goes through and readiness returns.
async fn refused_change(refuse: &str, insert: &str, kind: &str, cure: Option<&str>) {
    let db = create_db().await;
    db.batch(
        "CREATE TABLE docs (n serial PRIMARY KEY, ref text NOT NULL, note text);
         ALTER TABLE docs REPLICA IDENTITY FULL;",
    )
    .await;
    let receiver = crate::support::receiver::Receiver::start(|_| 200).await;
    let work = Workdir::new(&docs_config(&db, &receiver.url));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let base = server_url(&mut daemon).await;
    let readyz = format!("{base}/readyz");
    wait_for("/readyz 200 before the refused change", WAIT, || async {
        get(&readyz).await.0 == 200
    })
    .await;
    db.batch("INSERT INTO docs (ref, note) VALUES ('small', 'secret-value')")
        .await;
    wait_for("the first delivery", WAIT, || async {
        receiver.count() >= 1
    })
    .await;
    db.batch(refuse).await;

    db.batch(insert).await;
    let after_insert: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .get(0);
    let body = wait_for_some("/readyz 503 naming the refused table", WAIT, || async {
        let (status, body) = get(&readyz).await;
        (status == 503 && body.contains("public.docs")).then_some(body)
    })
    .await;
    let json: serde_json::Value = serde_json::from_str(&body).expect("/readyz JSON");
    assert_eq!(json["ingest"]["ok"], false, "{body}");
    let reason = json["reason"].as_str().expect("a reason");
    assert!(reason.starts_with("ingest: "), "{body}");
    assert!(reason.contains("Fix:"), "{body}");
    assert!(!reason.contains("secret-value"), "no row values: {body}");
    // Two refusals counted: the daemon retried and is still up.
    wait_for("a second refusal counted", WAIT, || async {
        ingest_errors(&base, kind).await >= 2.0
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log());
    // More writes after the refused one: none may be confirmed past it.
    db.batch("INSERT INTO docs (ref, note) VALUES ('later', 'secret-value')")
        .await;
    let before_retry = ingest_errors(&base, kind).await;
    wait_for("one more refusal after the later write", WAIT, || async {
        ingest_errors(&base, kind).await > before_retry
    })
    .await;
    assert!(
        !confirmed_past(&db, &after_insert).await,
        "the slot confirmed past a change the store refused"
    );
    let log = daemon.log();
    assert!(
        log.contains("public.docs"),
        "the log names the table:\n{log}"
    );
    assert!(!log.contains("secret-value"), "no row values in the log");
    assert_eq!(
        receiver.count(),
        1,
        "nothing after the refused change was sent"
    );

    let Some(cure) = cure else {
        return;
    };
    db.batch(cure).await;
    wait_for(
        "/readyz 200 once the store takes the change",
        WAIT,
        || async { get(&readyz).await.0 == 200 },
    )
    .await;
    wait_for(
        "the refused and the later change delivered",
        WAIT,
        || async { receiver.count() >= 3 },
    )
    .await;
    // One more change makes the source task hand ingest's confirmation on to the
    // stream (it takes it between messages).
    db.batch("INSERT INTO docs (ref, note) VALUES ('nudge', 'secret-value')")
        .await;
    wait_for("the slot to pass the refused change", WAIT, || async {
        confirmed_past(&db, &after_insert).await
    })
    .await;
    wait_for("the nudge stored", WAIT, || async {
        db.query_one(
            "SELECT count(*) FROM walhook.events WHERE entity_id = 'nudge'",
            &[],
        )
        .await
        .get::<_, i64>(0)
            == 1
    })
    .await;
    let stored = db
        .query_one("SELECT count(*) FROM walhook.events", &[])
        .await
        .get::<_, i64>(0);
    assert_eq!(stored, 4, "each change stored once");
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[tokio::test]
async fn an_id_too_long_for_the_store_index_keeps_the_daemon_up_and_not_ready() {
    // ~10 kB of random hex: it does not compress, so its revisions_pkey entry is over
    // PostgreSQL's btree limit (about 2.7 kB). The source table does not index it.
    refused_change(
        "SELECT 1",
        "INSERT INTO docs (ref, note) SELECT string_agg(md5(random()::text), ''), 'secret-value' FROM generate_series(1, 320)",
        "limit",
        None,
    )
    .await;
}

#[tokio::test]
async fn a_change_the_store_refuses_goes_through_once_the_limit_is_raised() {
    // A DBA capped entity ids in the store; a longer one comes; the DBA raises the cap.
    refused_change(
        "ALTER TABLE walhook.events ADD CONSTRAINT entity_id_cap CHECK (length(entity_id) <= 64)",
        "INSERT INTO docs (ref, note) VALUES (repeat('x', 200), 'secret-value')",
        "constraint",
        Some(
            "ALTER TABLE walhook.events DROP CONSTRAINT entity_id_cap;
             ALTER TABLE walhook.events ADD CONSTRAINT entity_id_cap CHECK (length(entity_id) <= 1024)",
        ),
    )
    .await;
}

/// Daemon level: the batch written first fails while the batch after it is in flight on
/// the second connection (`Lanes::completed`'s failure arm). Both go through again, one
/// at a time and in source order: each change stored once, a shared entity's revisions
/// in commit order, the slot confirmed past both, and ingest goes on after.
#[tokio::test]
async fn a_batch_failing_while_the_next_is_in_flight_is_written_again_with_it_in_order() {
    let db = users_db().await;
    // No subscription: nothing but ingest writes to the store.
    let (_work, mut daemon, client) = running_with_one_event(&db, "").await;
    // The next COPY into the events fails once, and only once the batch after it holds
    // a transaction open beside it (its own entities upserted, waiting for this one to
    // commit): the failure lands while both are in flight, whatever the timing.
    db.batch(
        "CREATE SEQUENCE public.injected;
         CREATE FUNCTION public.fail_beside_the_next() RETURNS trigger
         LANGUAGE plpgsql SECURITY DEFINER AS $$
         BEGIN
           IF (SELECT is_called FROM public.injected) THEN RETURN NULL; END IF;
           FOR i IN 1..600 LOOP
             -- pg_stat_activity is read once per transaction unless cleared.
             PERFORM pg_stat_clear_snapshot();
             EXIT WHEN EXISTS (SELECT 1 FROM pg_stat_activity
               WHERE pid <> pg_backend_pid() AND datname = current_database()
                 AND state = 'idle in transaction' AND backend_xid IS NOT NULL);
             PERFORM pg_sleep(0.05);
           END LOOP;
           PERFORM nextval('public.injected');
           RAISE EXCEPTION 'injected: the batch before fails';
         END $$;
         CREATE TRIGGER fail_beside_the_next BEFORE INSERT ON walhook.events
           FOR EACH STATEMENT EXECUTE FUNCTION public.fail_beside_the_next();",
    )
    .await;
    // Batch A updates user 1 and creates 2; once its COPY waits in the trigger, batch B
    // (a transaction of its own, so a batch of its own) updates 1 again and creates 3.
    db.batch("BEGIN; UPDATE users SET email = 'a2' WHERE id = 1; INSERT INTO users VALUES (2, 'b', 0); COMMIT")
        .await;
    wait_for("batch A waiting in the trigger", WAIT, || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE 'COPY%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    db.batch("BEGIN; UPDATE users SET email = 'a3' WHERE id = 1; INSERT INTO users VALUES (3, 'c', 0); COMMIT")
        .await;
    let b_end: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_for("both batches stored", WAIT, || async {
        event_count(&client).await == 5
    })
    .await;
    let log = daemon.log();
    assert!(
        log.contains("a batch failed; it and the one after it are written again one at a time"),
        "the failure landed with two batches in flight:\n{log}"
    );
    let injected: bool = client
        .query_one("SELECT is_called FROM public.injected", &[])
        .await
        .unwrap()
        .get(0);
    assert!(injected, "the trigger failed a batch");
    let stored: Vec<(String, String, i64)> = client
        .query(
            "SELECT type, entity_id, revision FROM walhook.events ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want = [
        ("user.created", "1", 1),
        ("user.updated", "1", 2),
        ("user.created", "2", 1),
        ("user.updated", "1", 3),
        ("user.created", "3", 1),
    ]
    .map(|(t, e, r)| (t.to_owned(), e.to_owned(), r));
    assert_eq!(stored, want, "{log}");
    // Ingest goes on (two batches at a time again), and the slot passes both.
    db.batch("INSERT INTO users VALUES (4, 'd', 0)").await;
    wait_for("the event after the rewrite", WAIT, || async {
        event_count(&client).await == 6
    })
    .await;
    wait_for("the slot to pass batch B", WAIT, || async {
        confirmed_past(&db, &b_end).await
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log());
}
