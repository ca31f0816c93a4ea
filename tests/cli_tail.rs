//! `walhook tail` as a user runs it: the real binary, a config file, the shared cluster.
//! A temporary slot (changes in order, Ctrl-C, slot gone), an existing slot read without
//! confirming progress or touching the publication, and a 200,000-row transaction
//! streamed in bounded memory.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::Client;
use walhook::source::Lsn;

use crate::support::cli::{ConfigFile, StdoutMode, Tail};
use crate::support::pg::{TestDb, create_db};
use crate::support::{wait_for, wait_for_some};

/// Generous bound for anything the cluster or walhook should do in a moment.
const WAIT: Duration = Duration::from_secs(60);

/// Commits `sql` in one transaction; returns its xid (as pgoutput sends it: 32 bits).
async fn commit(client: &mut Client, sql: &str) -> u32 {
    let txn = client.transaction().await.expect("BEGIN");
    txn.batch_execute(sql)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err:?}"));
    let xid: i64 = txn
        .query_one("SELECT txid_current()", &[])
        .await
        .expect("txid_current()")
        .get(0);
    txn.commit().await.expect("COMMIT");
    (xid & 0xffff_ffff) as u32
}

/// The server's current WAL insert position.
async fn wal_position(db: &TestDb) -> Lsn {
    let text: String = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .get(0);
    text.parse().expect("an LSN")
}

fn lsn_of(line: &Value) -> Lsn {
    line["lsn"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no valid lsn in {line}"))
}

/// `line` without its transaction fields (xid, lsn, commit_time), for comparison.
fn row_part(line: &Value) -> Value {
    let mut line = line.clone();
    let map = line.as_object_mut().expect("a JSON object");
    for key in ["xid", "lsn", "commit_time"] {
        assert!(map.remove(key).is_some(), "line lacks {key}");
    }
    line
}

/// Waits until no slot of `db` is named `walhook_tail_*`.
async fn wait_no_tail_slot(db: &TestDb) {
    wait_for(
        "the temporary walhook_tail_* slot to be dropped",
        WAIT,
        || async {
            db.query(
                "SELECT slot_name FROM pg_replication_slots
                 WHERE database = current_database() AND slot_name LIKE 'walhook\\_tail\\_%'",
                &[],
            )
            .await
            .is_empty()
        },
    )
    .await;
}

/// Waits until the temporary slot of `tail` has reached its consistent point
/// (confirmed_flush_lsn is set): every transaction that commits afterwards is decoded.
async fn wait_tail_ready(db: &TestDb, tail: &Tail) {
    let slot = tail.temporary_slot();
    wait_for(
        "walhook tail's temporary slot to be ready",
        WAIT,
        || async {
            !db.query(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND temporary
             AND active_pid IS NOT NULL AND confirmed_flush_lsn IS NOT NULL",
                &[&slot],
            )
            .await
            .is_empty()
        },
    )
    .await;
}

#[tokio::test]
async fn tail_prints_changes_in_order_and_drops_its_temporary_slot_on_ctrl_c() {
    let db = create_db().await;
    db.batch(
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
         CREATE TABLE ledger (id int PRIMARY KEY, amount int);
         ALTER TABLE ledger REPLICA IDENTITY FULL;
         CREATE TABLE other (id int PRIMARY KEY);",
    )
    .await;
    let config = ConfigFile::source("unused", "walhook", &["public.items", "public.ledger"]);
    let mut tail = Tail::spawn(&[], &config, &db.url(), StdoutMode::Lines);
    wait_tail_ready(&db, &tail).await;

    let mut client = db.client().await;
    let start = wal_position(&db).await;
    let xids = [
        commit(
            &mut client,
            "INSERT INTO items VALUES (1, 'apple', 3); INSERT INTO items VALUES (2, 'pear', 5);
             INSERT INTO other VALUES (1);",
        )
        .await,
        commit(
            &mut client,
            "UPDATE items SET qty = 4 WHERE id = 1; INSERT INTO ledger VALUES (10, 100);",
        )
        .await,
        commit(
            &mut client,
            "UPDATE ledger SET amount = 150 WHERE id = 10; UPDATE items SET id = 3 WHERE id = 1;",
        )
        .await,
        commit(
            &mut client,
            "DELETE FROM items WHERE id = 2; DELETE FROM ledger WHERE id = 10;",
        )
        .await,
    ];
    let end = wal_position(&db).await;

    // (transaction index, the line without xid/lsn/commit_time)
    let expected = [
        (
            0,
            json!({"table": "public.items", "op": "insert", "new": {"id": 1, "name": "apple", "qty": 3}}),
        ),
        (
            0,
            json!({"table": "public.items", "op": "insert", "new": {"id": 2, "name": "pear", "qty": 5}}),
        ),
        (
            1,
            json!({"table": "public.items", "op": "update", "new": {"id": 1, "name": "apple", "qty": 4}}),
        ),
        (
            1,
            json!({"table": "public.ledger", "op": "insert", "new": {"id": 10, "amount": 100}}),
        ),
        (
            2,
            json!({"table": "public.ledger", "op": "update", "new": {"id": 10, "amount": 150},
                   "old": {"id": 10, "amount": 100}}),
        ),
        (
            2,
            json!({"table": "public.items", "op": "update", "new": {"id": 3, "name": "apple", "qty": 4},
                   "old": {"id": 1}}),
        ),
        (
            3,
            json!({"table": "public.items", "op": "delete", "old": {"id": 2}}),
        ),
        (
            3,
            json!({"table": "public.ledger", "op": "delete", "old": {"id": 10, "amount": 150}}),
        ),
    ];
    let mut lines = Vec::new();
    for (i, (txn, want)) in expected.iter().enumerate() {
        let line = tail.next_json(&format!("change {i}"), WAIT).await;
        assert_eq!(row_part(&line), *want, "change {i}: {line}");
        assert_eq!(line["xid"], json!(xids[*txn]), "change {i}: xid; {line}");
        lines.push((*txn, line));
    }

    // Lines of one transaction share xid, lsn and commit_time; transactions come in
    // commit order, between the WAL positions read before and after them.
    for pair in lines.windows(2) {
        let ((ta, a), (tb, b)) = (&pair[0], &pair[1]);
        if ta == tb {
            assert_eq!(a["lsn"], b["lsn"], "same transaction: {a} / {b}");
            assert_eq!(a["commit_time"], b["commit_time"], "{a} / {b}");
        } else {
            assert!(lsn_of(a) < lsn_of(b), "commit order: {a} / {b}");
            assert!(
                a["commit_time"].as_str() <= b["commit_time"].as_str(),
                "{a} / {b}"
            );
        }
    }
    for (_, line) in &lines {
        let lsn = lsn_of(line);
        assert!(
            start < lsn && lsn < end,
            "lsn within the test's WAL: {line}"
        );
        let time = line["commit_time"].as_str().expect("commit_time string");
        assert!(
            chrono::DateTime::parse_from_rfc3339(time).is_ok() && time.ends_with('Z'),
            "commit_time is RFC 3339 UTC: {line}"
        );
    }

    tail.interrupt();
    let finished = tail.finish(WAIT).await;
    let (outcome, rest) = (finished.outcome, finished.rest);
    assert_eq!(
        outcome.code,
        Some(0),
        "exit code after SIGINT; stderr:\n{}",
        outcome.stderr
    );
    assert!(
        rest.is_empty(),
        "nothing else printed (no `other`): {rest:?}"
    );
    wait_no_tail_slot(&db).await;
}

#[tokio::test]
async fn tail_stops_quietly_when_its_reader_goes_away() {
    let db = create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY)").await;
    let config = ConfigFile::source("unused", "walhook", &["public.t"]);
    let mut tail = Tail::spawn(&[], &config, &db.url(), StdoutMode::Lines);
    wait_tail_ready(&db, &tail).await;
    db.batch("INSERT INTO t VALUES (1)").await;
    tail.next_json("the insert", WAIT).await;
    // `walhook tail | head -n 1`: the reader is gone; the next write fails with EPIPE.
    tail.close_stdout();
    db.batch("INSERT INTO t VALUES (2)").await;
    let finished = tail.finish(WAIT).await;
    assert_eq!(
        finished.outcome.code,
        Some(0),
        "a closed stdout ends tail normally; stderr:\n{}",
        finished.outcome.stderr
    );
    assert!(
        !finished.outcome.stderr.contains("error"),
        "{}",
        finished.outcome.stderr
    );
    wait_no_tail_slot(&db).await;
}

/// Everything about publication `walhook` that ALTER / DROP / CREATE would change.
async fn publication_state(db: &TestDb) -> Vec<String> {
    db.query(
        "SELECT format('%s %s %s %s %s %s %s', p.oid, p.xmin, p.puballtables, p.pubinsert,
                p.pubupdate, p.pubdelete, p.pubtruncate) FROM pg_publication p WHERE pubname = 'walhook'
         UNION ALL
         SELECT format('rel %s %s %s', r.prrelid::regclass, r.oid, r.xmin)
         FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid WHERE p.pubname = 'walhook'
         ORDER BY 1",
        &[],
    )
    .await
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// `(confirmed_flush_lsn, restart_lsn)` of `slot`.
async fn slot_progress(db: &TestDb, slot: &str) -> (String, String) {
    let row = db
        .query_one(
            "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots
             WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn tail_slot_reads_an_existing_slot_without_confirming_or_altering_the_publication() {
    let db = create_db().await;
    let slot = format!("{}_slot", db.name);
    db.batch(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE u (id int PRIMARY KEY);
         CREATE PUBLICATION walhook FOR TABLE t;",
    )
    .await;
    db.create_slot(&slot).await;
    // The config watches `u` too: `tail --slot` must not add it to the publication.
    let config = ConfigFile::source(&slot, "walhook", &["public.t", "public.u"]);
    db.batch("INSERT INTO t VALUES (1, 'a'), (2, 'b'); INSERT INTO u VALUES (1);")
        .await;
    let publication_before = publication_state(&db).await;
    let progress_before = slot_progress(&db, &slot).await;

    let mut tail = Tail::spawn(&["--slot", &slot], &config, &db.url(), StdoutMode::Lines);
    let first = tail.next_json("the first insert", WAIT).await;
    let second = tail.next_json("the second insert", WAIT).await;
    assert_eq!(
        row_part(&first),
        json!({"table": "public.t", "op": "insert", "new": {"id": 1, "v": "a"}})
    );
    assert_eq!(
        row_part(&second),
        json!({"table": "public.t", "op": "insert", "new": {"id": 2, "v": "b"}})
    );
    db.batch("UPDATE t SET v = 'c' WHERE id = 1").await;
    let third = tail.next_json("the update", WAIT).await;
    assert_eq!(
        row_part(&third),
        json!({"table": "public.t", "op": "update", "new": {"id": 1, "v": "c"}})
    );
    assert!(lsn_of(&second) < lsn_of(&third));

    // A standby status update sent after everything above was received: it reports
    // the WAL written, and would confirm it if tail confirmed anything.
    let seen_at: String = db
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .get(0);
    let received = wal_position(&db).await.to_string();
    let (flush, write): (Option<String>, String) = wait_for_some(
        "a standby status update from `walhook tail --slot` after its changes (sent at least every 10 s)",
        WAIT,
        || async {
            let rows = db
                .query(
                    "SELECT r.flush_lsn::text, r.write_lsn::text FROM pg_stat_replication r
                     JOIN pg_replication_slots s ON s.active_pid = r.pid
                     WHERE s.slot_name = $1 AND r.reply_time > $2::text::timestamptz
                       AND r.write_lsn >= $3::text::pg_lsn",
                    &[&slot, &seen_at, &received],
                )
                .await;
            rows.first().map(|r| (r.get(0), r.get(1)))
        },
    )
    .await;
    assert!(
        flush.is_none() || flush.as_deref() == Some("0/0"),
        "tail --slot reports no flush position (got {flush:?}, write {write})"
    );
    assert_eq!(slot_progress(&db, &slot).await, progress_before);

    tail.interrupt();
    let finished = tail.finish(WAIT).await;
    let (outcome, rest) = (finished.outcome, finished.rest);
    assert_eq!(outcome.code, Some(0), "stderr:\n{}", outcome.stderr);
    assert!(rest.is_empty(), "`u` is not published: {rest:?}");
    wait_for("the slot to be released by tail", WAIT, || async {
        !db.query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NULL",
            &[&slot],
        )
        .await
        .is_empty()
    })
    .await;
    assert_eq!(
        slot_progress(&db, &slot).await,
        progress_before,
        "confirmed_flush_lsn and restart_lsn unchanged after tail"
    );
    assert_eq!(
        publication_state(&db).await,
        publication_before,
        "publication untouched"
    );

    // Nothing was confirmed: a second run sees the same changes again.
    let mut again = Tail::spawn(&["--slot", &slot], &config, &db.url(), StdoutMode::Lines);
    for (i, want) in [&first, &second, &third].into_iter().enumerate() {
        let line = again
            .next_json(&format!("change {i} again, in a second run"), WAIT)
            .await;
        assert_eq!(&line, want);
    }
    again.interrupt();
    let outcome = again.finish(WAIT).await.outcome;
    assert_eq!(outcome.code, Some(0), "stderr:\n{}", outcome.stderr);
    assert_eq!(slot_progress(&db, &slot).await, progress_before);
}

#[tokio::test]
async fn tail_streams_a_200k_row_transaction_in_bounded_memory() {
    const ROWS: u64 = 200_000;
    const MAX_RSS_KIB: u64 = 100 * 1024;
    let db = create_db().await;
    let slot = format!("{}_slot", db.name);
    db.batch(
        "CREATE TABLE big (id int PRIMARY KEY, pad text);
         CREATE PUBLICATION walhook FOR TABLE big;",
    )
    .await;
    db.create_slot(&slot).await;
    // ~1 KiB per row (32 x 32 hex digits, different per row), ~200 MB in all, in one
    // transaction; --endpos is a position inside it, so its commit is the last one.
    let mut client = db.client().await;
    let txn = client.transaction().await.expect("BEGIN");
    txn.batch_execute(&format!(
        "INSERT INTO big SELECT g, repeat(md5(g::text), 32) FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .expect("insert 200k rows");
    let endpos: String = txn
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("WAL position")
        .get(0);
    txn.commit().await.expect("COMMIT");
    let config = ConfigFile::source(&slot, "walhook", &["public.big"]);

    let started = std::time::Instant::now();
    let tail = Tail::spawn(
        &["--slot", &slot, "--endpos", &endpos],
        &config,
        &db.url(),
        StdoutMode::Count,
    );
    let finished = tail.finish(Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    let (outcome, counted, peak_kib) = (finished.outcome, finished.counted, finished.peak_rss_kib);
    assert_eq!(outcome.code, Some(0), "stderr:\n{}", outcome.stderr);
    assert_eq!(counted.lines, ROWS, "one line per row");
    assert!(counted.bytes > 200_000_000, "{} bytes", counted.bytes);
    let id_of = |line: &Option<String>| -> Value {
        let line: Value = serde_json::from_str(line.as_deref().expect("a line")).expect("JSON");
        line["new"]["id"].clone()
    };
    assert_eq!(id_of(&counted.first), json!(1));
    assert_eq!(id_of(&counted.last), json!(ROWS));
    eprintln!(
        "200k-row transaction: {} lines, {} MB in {elapsed:.1?}; walhook peak RSS (VmHWM) {} KiB",
        counted.lines,
        counted.bytes / 1_000_000,
        peak_kib
    );
    assert!(peak_kib > 0, "VmHWM was read at least once");
    assert!(
        peak_kib < MAX_RSS_KIB,
        "peak RSS {peak_kib} KiB, limit {MAX_RSS_KIB} KiB"
    );
}
