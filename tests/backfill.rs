//! `walhook backfill` against the real daemon: consistency with a concurrent workload
//! (watermarks), kill -9 and resume without duplicates, `--where` and `--subscription`
//! narrowing with their input checks, and `snapshot = true` on a table added by reload.
//!
//! Row counts are small for CI; `WALHOOK_BACKFILL_ROWS` scales the consistency test
//! (the issue's figure is `WALHOOK_BACKFILL_ROWS=100000`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Client;

use crate::support::daemon::{
    Daemon, Workdir, metric, server_url, wait_leading, wait_leading_with_store,
};
use crate::support::pg::{Cluster, TestDb, create_db};
use crate::support::wait_for;
use crate::support::workload::Rng;

/// Rows of the consistency test (default 8,000: a few chunks).
fn rows() -> i64 {
    std::env::var("WALHOOK_BACKFILL_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8_000)
}

/// `items (id bigint PRIMARY KEY, ver bigint, body text)` with ids 1..=n; `ver` comes
/// from one sequence on every insert and update, so a newer state has a higher `ver`.
async fn items_db(n: i64) -> TestDb {
    items_db_on(crate::support::pg::cluster(), n).await
}

/// [`items_db`] on `cluster`.
async fn items_db_on(cluster: &Cluster, n: i64) -> TestDb {
    let db = cluster.create_db().await;
    db.batch(&format!(
        "CREATE SEQUENCE ver;
         CREATE TABLE items (id bigint PRIMARY KEY, ver bigint NOT NULL DEFAULT nextval('ver'), body text);
         INSERT INTO items (id, body) SELECT i, 'row ' || i FROM generate_series(1, {n}) i;
         CREATE TABLE extra (id int PRIMARY KEY, name text);
         INSERT INTO extra SELECT i, 'e' || i FROM generate_series(1, 50) i;
         CREATE FUNCTION slow(bigint) RETURNS bool LANGUAGE sql AS 'SELECT $1 % 8 <> 0 OR pg_sleep(0.001) IS NOT NULL';"
    ))
    .await;
    db
}

/// A config watching `items` (entity `item`), with subscriptions `a` and `b` whose
/// receivers are never reached (these tests read the store), plus `more`.
fn config(db: &TestDb, more: &str) -> String {
    format!(
        r#"
[source]
url = "postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.items"
entity = "item"
{more}

[[subscriptions]]
name = "a"
url = "http://127.0.0.1:9/a"
events = ["*"]

[[subscriptions]]
name = "b"
url = "http://127.0.0.1:9/b"
events = ["item.*"]
"#,
        port = db.port,
        name = db.name
    )
}

async fn start(db: &TestDb, work: &Workdir, n: usize) -> Daemon {
    let mut daemon = work.spawn_run(n);
    wait_leading(db, &mut daemon).await;
    daemon
}

/// Runs `walhook backfill ARGS` to its end.
fn backfill(work: &Workdir, args: &[&str]) -> (i32, String) {
    let mut all = vec!["backfill"];
    all.extend_from_slice(args);
    let (status, stdout, stderr) = work.run_to_end(&all, Duration::from_secs(120));
    (status.code().unwrap_or(-1), format!("{stdout}{stderr}"))
}

/// One stored event of an entity.
#[derive(Debug)]
struct Stored {
    revision: i64,
    kind: String,
    data: Value,
    subscriptions: Vec<String>,
}

/// Every stored event per entity id of `entity`, in revision order.
async fn events(client: &Client, entity: &str) -> HashMap<String, Vec<Stored>> {
    let rows = client
        .query(
            "SELECT entity_id, revision, type, data, subscriptions FROM walhook.events
             WHERE entity = $1 ORDER BY entity_id, revision, seq",
            &[&entity],
        )
        .await
        .expect("read events");
    let mut out: HashMap<String, Vec<Stored>> = HashMap::new();
    for r in rows {
        out.entry(r.get(0)).or_default().push(Stored {
            revision: r.get(1),
            kind: r.get(2),
            data: r.get(3),
            subscriptions: r.get(4),
        });
    }
    out
}

/// Waits until the store holds an event of `item` `id` with `ver` (the stream caught up).
async fn wait_for_ver(client: &Client, id: i64, ver: i64) {
    wait_for(
        "the marker update to be stored",
        Duration::from_secs(60),
        || async {
            client
                .query_opt(
                    "SELECT 1 FROM walhook.events WHERE entity = 'item' AND entity_id = $1
                     AND (data->>'ver')::bigint = $2",
                    &[&id.to_string(), &ver],
                )
                .await
                .expect("query")
                .is_some()
        },
    )
    .await;
}

async fn backfill_state(client: &Client, id: i64) -> (String, i64, i64) {
    let r = client
        .query_one(
            "SELECT status, rows_done, events FROM walhook.backfills WHERE id = $1",
            &[&id],
        )
        .await
        .expect("backfill row");
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_under_concurrent_writes_leaves_every_entity_at_its_row() {
    let n = rows();
    let db = items_db(n).await;
    let work = Workdir::new(&config(&db, ""));
    let _daemon = start(&db, &work, 1).await;
    let client = db.client().await;

    // A workload of updates, inserts and deletes on the rows being read.
    let writer_db = db.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_w = stop.clone();
    let writer = tokio::spawn(async move {
        let mut rng = Rng::new(Rng::seed_from_env("WALHOOK_BACKFILL_SEED"));
        let mut next_id = n + 1;
        let mut txns = 0u64;
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            let id = 1 + rng.below(n as u64) as i64;
            let sql = match rng.below(10) {
                0..=5 => {
                    format!("UPDATE items SET ver = nextval('ver'), body = 'u' WHERE id = {id}")
                }
                6 | 7 => {
                    next_id += 1;
                    format!("INSERT INTO items (id, body) VALUES ({next_id}, 'new')")
                }
                8 => format!("DELETE FROM items WHERE id = {id}"),
                _ => format!(
                    "INSERT INTO items (id, body) VALUES ({id}, 'again') ON CONFLICT (id) DO UPDATE SET ver = nextval('ver')"
                ),
            };
            writer_db.batch_execute(&sql).await.expect("workload write");
            txns += 1;
        }
        txns
    });

    let started = Instant::now();
    let (code, out) = backfill(&work, &["--table", "public.items"]);
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let txns = writer.await.expect("writer");
    assert_eq!(code, 0, "walhook backfill failed:\n{out}");
    assert!(out.contains("backfill 1 done"), "{out}");
    eprintln!("backfilled {n} rows in {took:?} while {txns} workload transactions committed");
    assert!(
        txns > 10,
        "the workload ran alongside ({txns} transactions)"
    );

    // A marker: once it is stored, every change before it is too.
    let marker: i64 = client
        .query_one(
            "UPDATE items SET ver = nextval('ver') WHERE id = (SELECT min(id) FROM items) RETURNING ver",
            &[],
        )
        .await
        .expect("marker")
        .get(0);
    let marker_id: i64 = client
        .query_one("SELECT min(id) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    wait_for_ver(&client, marker_id, marker).await;

    let table: HashMap<String, Value> = client
        .query("SELECT id, to_jsonb(i) FROM items i", &[])
        .await
        .expect("rows")
        .into_iter()
        .map(|r| (r.get::<_, i64>(0).to_string(), r.get(1)))
        .collect();
    let stored = events(&client, "item").await;
    let mut snapshots = 0;
    for (id, evs) in &stored {
        // Gap-free revisions from 1.
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e.revision, i as i64 + 1, "item {id}: revisions {evs:?}");
        }
        // No older state after a newer one: `ver` never goes down.
        let mut last_ver = 0;
        for e in evs.iter().filter(|e| e.kind != "item.deleted") {
            let ver = e.data["ver"].as_i64().expect("ver");
            assert!(
                ver >= last_ver,
                "item {id}: an older state after a newer one: {evs:?}"
            );
            last_ver = ver;
        }
        snapshots += evs.iter().filter(|e| e.kind == "item.snapshot").count();
        let last = evs.last().expect("an event");
        match table.get(id) {
            Some(row) => {
                assert_ne!(last.kind, "item.deleted", "item {id} exists: {evs:?}");
                assert_eq!(
                    &last.data, row,
                    "item {id}: last state differs from the row"
                );
            }
            None => assert_eq!(last.kind, "item.deleted", "item {id} is gone: {evs:?}"),
        }
    }
    // Every row present at the start and never changed has its snapshot; every row in
    // the table has an event.
    for id in table.keys() {
        assert!(stored.contains_key(id), "item {id} has no event");
    }
    let (status, rows_done, events_done) = backfill_state(&client, 1).await;
    assert_eq!(status, "done");
    assert_eq!(
        events_done as usize, snapshots,
        "events counted = snapshot events"
    );
    assert!(rows_done >= n - txns as i64, "rows read: {rows_done}");
    eprintln!(
        "{rows_done} rows read, {events_done} snapshot events, {} dropped (changed between watermarks)",
        rows_done - events_done
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_interrupted_by_kill_9_resumes_without_duplicates() {
    let n = 8_000;
    let db = items_db(n).await;
    let work = Workdir::new(&config(&db, ""));
    let daemon = start(&db, &work, 1).await;
    let client = db.client().await;
    // `slow` sleeps 1 ms on every eighth row (about 0.4 s for the second chunk), so the
    // kill lands mid-backfill. (It used to end in `OR true`, which PostgreSQL folds
    // away: no sleep at all.)
    let (code, out) = backfill(
        &work,
        &["--table", "public.items", "--where", "slow(id)", "--detach"],
    );
    assert_eq!(code, 0, "{out}");
    wait_for(
        "the first chunk to be stored",
        Duration::from_secs(60),
        || async { backfill_state(&client, 1).await.1 > 0 },
    )
    .await;
    daemon.kill9();
    let (status, done_at_kill, _) = backfill_state(&client, 1).await;
    assert_eq!(status, "running", "killed mid-backfill");
    assert!(
        done_at_kill < n,
        "killed before the end ({done_at_kill} rows)"
    );

    let (code, out) = backfill(&work, &["--status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("public.items") && out.contains("running"),
        "{out}"
    );

    let _daemon = start(&db, &work, 2).await;
    let (code, out) = backfill(&work, &["--resume"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("backfill 1 done"), "{out}");
    let stored = events(&client, "item").await;
    assert_eq!(stored.len() as i64, n, "every row has its event");
    for (id, evs) in &stored {
        assert_eq!(
            evs.len(),
            1,
            "item {id}: one snapshot, no duplicate: {evs:?}"
        );
        assert_eq!(evs[0].kind, "item.snapshot");
        assert_eq!(evs[0].revision, 1);
    }
    assert_eq!(backfill_state(&client, 1).await, ("done".into(), n, n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_and_subscription_narrow_a_backfill_and_bad_input_is_refused() {
    let db = items_db(1_000).await;
    // Subscription `c` takes no snapshot events.
    let only_changes = "\n[[subscriptions]]\nname = \"c\"\nurl = \"http://127.0.0.1:9/c\"\nevents = [\"item.created\"]\n";
    let work = Workdir::new(&format!("{}{only_changes}", config(&db, "")));
    let mut daemon = start(&db, &work, 1).await;
    let base = server_url(&mut daemon).await;
    let client = db.client().await;

    let (code, out) = backfill(&work, &["--table", "public.nope"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("`public.nope` is not in walhook.toml") && out.contains("public.items"),
        "{out}"
    );
    let (code, out) = backfill(
        &work,
        &["--table", "public.items", "--where", "colour = 'red'"],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("--where") && out.contains("column \"colour\" does not exist"),
        "{out}"
    );
    let (code, out) = backfill(&work, &["--table", "public.items", "--subscription", "zzz"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unknown subscription `zzz`"), "{out}");
    let (code, out) = backfill(&work, &["--table", "public.items", "--subscription", "c"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("subscription `c` does not take `item.snapshot` events")
            && out.contains(r#"its events = ["item.created"]"#)
            && out.contains("--event")
            && out.contains(r#""*.snapshot""#),
        "{out}"
    );
    let rows_series = r#"walhook_backfill_rows_total{table="public.items"}"#;
    assert_eq!(metric(&base, rows_series).await, 0.0);
    let none: i64 = client
        .query_one("SELECT count(*) FROM walhook.backfills", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(none, 0, "refused requests are not recorded");

    let (code, out) = backfill(
        &work,
        &[
            "--table",
            "public.items",
            "--where",
            "id % 4 = 0",
            "--subscription",
            "b",
            "--event",
            "item.resent",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let stored = events(&client, "item").await;
    assert_eq!(stored.len(), 250, "only the rows --where selects");
    for (id, evs) in &stored {
        assert_eq!(id.parse::<i64>().unwrap() % 4, 0, "item {id}");
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].kind, "item.resent");
        assert_eq!(evs[0].subscriptions, ["b"], "only subscription b");
    }
    // The 250 rows --where selected, counted once their chunk was stored.
    assert_eq!(metric(&base, rows_series).await, 250.0);
    assert_eq!(metric(&base, "walhook_backfill_running").await, 0.0);
    // `c` takes the backfill under a name its patterns match.
    let (code, out) = backfill(
        &work,
        &[
            "--table",
            "public.items",
            "--where",
            "id <= 10",
            "--subscription",
            "c",
            "--event",
            "item.created",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let created: i64 = client
        .query_one(
            "SELECT count(*) FROM walhook.events WHERE type = 'item.created' AND subscriptions = '{c}'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(created, 10, "only subscription c");
    assert_eq!(metric(&base, rows_series).await, 260.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_by_reload_with_snapshot_true_is_backfilled_once() {
    let db = items_db(10).await;
    let work = Workdir::new(&config(&db, ""));
    let daemon = start(&db, &work, 1).await;
    let client = db.client().await;
    let extra = "\n[[tables]]\ntable = \"public.extra\"\nentity = \"extra\"\nsnapshot = true\n";
    work.rewrite(&config(&db, extra));
    daemon.signal(libc::SIGHUP);
    wait_for(
        "the snapshot of public.extra",
        Duration::from_secs(60),
        || async { events(&client, "extra").await.len() == 50 },
    )
    .await;
    let backfills = || async {
        client
            .query_one("SELECT count(*) FROM walhook.backfills", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // A second reload and a restart request nothing again.
    daemon.signal(libc::SIGHUP);
    drop(daemon);
    let _daemon = start(&db, &work, 2).await;
    client
        .batch_execute("UPDATE extra SET name = 'changed' WHERE id = 1")
        .await
        .unwrap();
    wait_for(
        "the update after the restart",
        Duration::from_secs(60),
        || async { events(&client, "extra").await["1"].len() == 2 },
    )
    .await;
    assert_eq!(backfills().await, 1, "one snapshot request");
    let stored = events(&client, "extra").await;
    for (id, evs) in &stored {
        assert_eq!(evs[0].kind, "extra.snapshot", "extra {id}");
        assert_eq!(evs.iter().filter(|e| e.kind == "extra.snapshot").count(), 1);
    }
    assert_eq!(stored["1"][1].kind, "extra.updated");
}

/// A transaction whose commit is in the WAL (the stream hands its change on) but not yet
/// visible to new snapshots: here one waiting for a synchronous standby that never
/// answers. A chunk read before it is visible carries the row's older state, which would
/// go out after the newer one; the backfill waits (and says why in the log) until the
/// transaction is visible, then reads the row's current state. The source is a cluster
/// of its own with `synchronous_standby_names` set and `synchronous_commit = local` (only
/// the test's session asks for the standby); the store is on the shared cluster, since
/// ingest commits with `synchronous_commit = on`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transaction_not_yet_visible_is_waited_for() {
    let source = Cluster::start_with(&[
        ("synchronous_standby_names", "walhook_absent_standby"),
        ("synchronous_commit", "local"),
    ]);
    let db = items_db_on(&source, 200).await;
    let store = create_db().await;
    let more = format!(
        "\n[store]\nurl = \"postgres://postgres@127.0.0.1:{}/{}?sslmode=disable\"\n",
        store.port, store.name
    );
    let work = Workdir::new(&config(&db, &more));
    let mut daemon = work.spawn_run(1);
    wait_leading_with_store(&db, &store, &mut daemon).await;
    let client = store.client().await;

    // The hidden update: committed locally, waiting for the standby, invisible.
    let hidden = db.client().await;
    let pid: i32 = hidden
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    hidden
        .batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    let update = tokio::spawn(async move {
        hidden
            .batch_execute("UPDATE items SET ver = nextval('ver'), body = 'hidden' WHERE id = 1")
            .await
    });
    wait_for(
        "the hidden update to be stored",
        Duration::from_secs(60),
        || async {
            client
                .query_opt(
                    "SELECT 1 FROM walhook.events WHERE entity = 'item' AND entity_id = '1'
                     AND data->>'body' = 'hidden'",
                    &[],
                )
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    let body: String = db
        .query_one("SELECT body FROM items WHERE id = 1", &[])
        .await
        .get(0);
    assert_eq!(body, "row 1", "the update is not visible yet");

    let run = tokio::task::spawn_blocking({
        let config = work.config();
        move || {
            std::process::Command::new(crate::support::walhook_bin())
                .args(["backfill", "--table", "public.items", "--config"])
                .arg(config)
                .output()
                .expect("run walhook backfill")
        }
    });
    // The line comes after 5 s of waiting, when the worker used to read anyway.
    let waiting = Instant::now();
    while !daemon.log().contains("committed but are not visible yet") {
        if run.is_finished() || waiting.elapsed() > Duration::from_secs(60) {
            let one = events(&client, "item").await.remove("1");
            panic!(
                "the backfill did not wait for the invisible update; item 1's events: \
                 {one:?}\nlog:\n{}",
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let snapshots: i64 = client
        .query_one(
            "SELECT count(*) FROM walhook.events WHERE type = 'item.snapshot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        snapshots,
        0,
        "nothing read while the update is invisible ({:?} after the log line)",
        waited.elapsed()
    );

    // The wait ends: the commit becomes visible, the backfill reads it.
    source
        .admin_client()
        .await
        .execute("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap();
    update.await.unwrap().expect("the update commits locally");
    let out = run.await.unwrap();
    assert!(
        out.status.success(),
        "walhook backfill failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = events(&client, "item").await;
    assert_eq!(stored.len(), 200, "every row has its events");
    let one = &stored["1"];
    let kinds: Vec<&str> = one.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["item.updated", "item.snapshot"], "{one:?}");
    assert_eq!(
        one[1].data["body"], "hidden",
        "the snapshot is the row's newest state"
    );
    assert_eq!(one[1].data["ver"], one[0].data["ver"]);
}

/// The progress display: under a pseudo-terminal (`script` from util-linux) an
/// indicatif bar with rows done, rate and ETA, cleared before the final line; without
/// a terminal, plain lines and no escape sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() {
    let n = 6_000;
    let db = items_db(n).await;
    let work = Workdir::new(&config(&db, ""));
    let _daemon = start(&db, &work, 1).await;
    // A 1 ms sleep on every sixth row makes each backfill last about a second, over two
    // chunks: progress moves while the command watches (pg_sleep is volatile: run for
    // each such row, never folded away).
    let slow = "id % 6 <> 0 OR pg_sleep(0.001) IS NOT NULL";
    let cmd = format!(
        "{} backfill --table public.items --where '{slow}' -c {}",
        crate::support::walhook_bin().display(),
        work.config().display()
    );
    let tty = std::process::Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("run script (util-linux) for a pseudo-terminal");
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    // Each frame of the bar, up to the next carriage return, newline or escape.
    let frames: Vec<&str> = shown
        .match_indices("backfill 1 [")
        .map(|(at, _)| {
            let frame = &shown[at..];
            &frame[..frame.find(['\r', '\n', '\u{1b}']).unwrap_or(frame.len())]
        })
        .collect();
    // `... 5000/6000 rows (83%), 3012 rows/s, ETA 0s`: whole rows per second.
    let with_rate = |frame: &str| {
        frame
            .split_once(&format!("/{n} rows ("))
            .and_then(|(_, rest)| rest.split_once("%), "))
            .and_then(|(_, rest)| rest.split_once(" rows/s, ETA "))
            .is_some_and(|(rate, _)| !rate.is_empty() && rate.bytes().all(|b| b.is_ascii_digit()))
    };
    let frame = frames
        .iter()
        .rev()
        .find(|f| with_rate(f))
        .unwrap_or_else(|| panic!("no bar frame with rows, rate and ETA: {frames:?}"));
    let bar = shown.rfind("backfill 1 [").expect("frames found above");
    eprintln!("last bar frame on the terminal: {frame:?}");
    let done = shown
        .find("backfill 1 done: 6000 rows read")
        .unwrap_or_else(|| panic!("no final line:\n{shown:?}"));
    assert!(
        bar < done,
        "the bar is drawn again after the end:\n{shown:?}"
    );

    let (code, plain) = backfill(&work, &["--table", "public.items", "--where", slow]);
    assert_eq!(code, 0, "{plain}");
    assert!(
        plain.contains("backfill 2: public.items ")
            && !plain.contains('\u{1b}')
            && !plain.contains("[="),
        "plain lines without a terminal:\n{plain}"
    );
    assert!(plain.contains("backfill 2 done: 6000 rows read"), "{plain}");
}

/// Speed: rows/s backfilled into the store against walhook's ingest rate of the same
/// number of row changes, on this machine in this run. Ignored (a minute or more):
/// `WALHOOK_BACKFILL_BENCH_ROWS=1000000 cargo test --release --test main --
/// backfill::bench_backfill_against_ingest --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_backfill_against_ingest() {
    let n: i64 = std::env::var("WALHOOK_BACKFILL_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let db = items_db(n).await;
    let work = Workdir::new(&config(&db, ""));
    let _daemon = start(&db, &work, 1).await;
    let client = db.client().await;
    let last_seq = || async {
        client
            .query_one("SELECT last_seq FROM walhook.checkpoints", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    // Ingest: one transaction updating every row, stored as n events.
    client
        .batch_execute("UPDATE items SET ver = nextval('ver')")
        .await
        .unwrap();
    let started = Instant::now();
    wait_for(
        "the update of every row to be ingested",
        Duration::from_secs(600),
        || async { last_seq().await >= n },
    )
    .await;
    let ingest = n as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let (code, out) = backfill(&work, &["--table", "public.items", "--detach"]);
    assert_eq!(code, 0, "{out}");
    wait_for(
        "the backfill to be done",
        Duration::from_secs(600),
        || async { backfill_state(&client, 1).await.0 == "done" },
    )
    .await;
    let backfilled = n as f64 / started.elapsed().as_secs_f64();
    assert_eq!(last_seq().await, 2 * n);
    eprintln!(
        "{n} rows: ingest {ingest:.0} events/s, backfill {backfilled:.0} rows/s, ratio {:.2}",
        backfilled / ingest
    );
}
