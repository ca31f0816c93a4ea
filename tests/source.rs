//! The replication source against a real cluster: value conversion per type family,
//! old rows under each replica identity, commit order, ALTER TABLE mid-stream,
//! authentication methods, TLS, and resuming after the walsender is killed.

use std::time::Duration;

use serde_json::{Value, json};
use std::collections::HashMap;
use walhook::pg::ConnInfo;

use walhook::config::Columns;
use walhook::source::decoder::{Change, Decoded, JsonRowSpec, JsonRows, Op, Row, TableName};
use walhook::source::stream::{ConfirmMode, Position, ReplicationStream, StreamOptions};

use crate::support::pg::{Auth, TestDb, create_db};
use crate::support::within;

const WAIT: Duration = Duration::from_secs(30);

/// Makes publication `walhook` for `tables` and a pgoutput slot named after the
/// database (slots are cluster-wide).
async fn publish(db: &TestDb, tables: &str) {
    db.batch(&format!("CREATE PUBLICATION walhook FOR TABLE {tables}"))
        .await;
    db.batch(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        db.name
    ))
    .await;
}

/// A stream of the slot `publish` made for the database that `url` names.
fn stream_for(url: &str) -> ReplicationStream {
    let slot = ConnInfo::parse(url).expect("test URL parses").dbname;
    stream_of_slot(url, slot)
}

fn stream_of_slot(url: &str, slot: String) -> ReplicationStream {
    let params = ConnInfo::parse(url).expect("test URL parses");
    ReplicationStream::new(
        params,
        StreamOptions {
            slot,
            publication: "walhook".into(),
            temporary: false,
            confirm: ConfirmMode::Consumer,
            application_name: "walhook-test".into(),
            resume: Position::default(),
        },
    )
}

/// Reads items until `commits` transactions have committed; returns them all.
async fn read_commits(stream: &mut ReplicationStream, commits: usize) -> Vec<Decoded> {
    within(&format!("{commits} commits from the stream"), WAIT, async {
        let mut items = Vec::new();
        let mut seen = 0;
        while seen < commits {
            let item = stream.next().await.expect("stream item");
            if let Decoded::Commit { end_lsn, .. } = &item {
                seen += 1;
                stream.confirm(*end_lsn);
            }
            items.push(item);
        }
        items
    })
    .await
}

fn changes(items: &[Decoded]) -> Vec<&Change> {
    items
        .iter()
        .filter_map(|i| match i {
            Decoded::Change(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// Inserts `value` (an SQL literal) into a one-column table of `sql_type` and returns
/// the column's JSON as the stream carries it.
///
/// Read a second time from a slot of its own, with the rows written as JSON text by
/// the decoder (as the daemon has them for a table whose mapping reads only the id):
/// that text must be the serialisation of the row read as values, byte for byte.
async fn convert(sql_type: &str, values: &[&str]) -> Vec<Value> {
    let db = create_db().await;
    db.batch(&format!(
        "CREATE TABLE t (id serial PRIMARY KEY, v {sql_type})"
    ))
    .await;
    publish(&db, "t").await;
    let json_slot = format!("{}_json", db.name);
    db.batch(&format!(
        "SELECT pg_create_logical_replication_slot('{json_slot}', 'pgoutput')"
    ))
    .await;
    let mut sql = String::new();
    for v in values {
        sql.push_str(&format!("INSERT INTO t (v) VALUES ({v});"));
    }
    db.batch(&format!("BEGIN; {sql} COMMIT;")).await;
    let mut stream = stream_for(&db.url());
    let items = read_commits(&mut stream, 1).await;
    let rows: Vec<&Row> = changes(&items)
        .iter()
        .map(|c| c.new.as_ref().expect("insert has new"))
        .collect();

    let mut stream = stream_of_slot(&db.url(), json_slot);
    let table = TableName {
        schema: "public".into(),
        name: "t".into(),
    };
    let spec = JsonRowSpec {
        read: Vec::new(),
        columns: Columns::All,
    };
    stream.set_json_rows(JsonRows {
        tables: HashMap::from([(table, spec)]),
    });
    let items = read_commits(&mut stream, 1).await;
    let texts: Vec<&str> = changes(&items)
        .iter()
        .map(|c| c.new_json.as_ref().expect("written as JSON").0.get())
        .collect();
    let expected: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    assert_eq!(texts, expected, "{sql_type}: rows written as JSON");

    rows.iter().map(|r| r["v"].clone()).collect()
}

#[tokio::test]
async fn booleans_and_null() {
    assert_eq!(
        convert("boolean", &["true", "false", "NULL"]).await,
        [json!(true), json!(false), Value::Null]
    );
}

#[tokio::test]
async fn integers_are_numbers() {
    let got = convert("bigint", &["0", "-42", "9007199254740993"]).await;
    assert_eq!(got, [json!(0), json!(-42), json!(9007199254740993_i64)]);
    assert_eq!(convert("smallint", &["-32768"]).await, [json!(-32768)]);
}

#[tokio::test]
async fn floats_are_numbers_and_specials_strings() {
    let got = convert(
        "double precision",
        &["1.5", "'NaN'", "'Infinity'", "'-Infinity'", "0.1"],
    )
    .await;
    assert_eq!(
        got,
        [
            json!(1.5),
            json!("NaN"),
            json!("Infinity"),
            json!("-Infinity"),
            json!(0.1)
        ]
    );
    assert_eq!(convert("real", &["2.25"]).await, [json!(2.25)]);
}

#[tokio::test]
async fn numeric_is_an_exact_string() {
    let got = convert(
        "numeric",
        &["123456789012345678901234567890.000000001", "'NaN'"],
    )
    .await;
    assert_eq!(
        got,
        [
            json!("123456789012345678901234567890.000000001"),
            json!("NaN")
        ]
    );
}

#[tokio::test]
async fn json_and_jsonb_are_embedded() {
    assert_eq!(
        convert("jsonb", &[r#"'{"a": [1, "x", null]}'"#]).await,
        [json!({"a": [1, "x", null]})]
    );
    assert_eq!(
        convert("json", &[r#"'[true, {"b": 2}]'"#]).await,
        [json!([true, {"b": 2}])]
    );
}

#[tokio::test]
async fn bytea_is_base64() {
    assert_eq!(
        convert("bytea", &[r"'\x00ff10'", "''"]).await,
        [json!("AP8Q"), json!("")]
    );
}

#[tokio::test]
async fn arrays_are_json_arrays() {
    assert_eq!(
        convert("int[]", &["'{1,NULL,3}'"]).await,
        [json!([1, null, 3])]
    );
    assert_eq!(
        convert("int[][]", &["'{{1,2},{3,4}}'"]).await,
        [json!([[1, 2], [3, 4]])]
    );
    assert_eq!(
        convert("text[]", &[r#"ARRAY['a,b', 'say "hi"', NULL, 'NULL', '']"#]).await,
        [json!(["a,b", "say \"hi\"", null, "NULL", ""])]
    );
    assert_eq!(convert("boolean[]", &["'{}'"]).await, [json!([])]);
    assert_eq!(
        convert("jsonb[]", &[r#"ARRAY['{"a":1}'::jsonb]"#]).await,
        [json!([{"a": 1}])]
    );
    assert_eq!(
        convert("numeric[]", &["'{1.50,2}'"]).await,
        [json!(["1.50", "2"])]
    );
}

#[tokio::test]
async fn user_defined_enum_and_its_array_are_text() {
    let db = create_db().await;
    db.batch(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE t (id serial PRIMARY KEY, m mood, ms mood[]);",
    )
    .await;
    publish(&db, "t").await;
    db.batch("INSERT INTO t (m, ms) VALUES ('happy', '{sad,happy}')")
        .await;
    let mut stream = stream_for(&db.url());
    let items = read_commits(&mut stream, 1).await;
    let new = changes(&items)[0].new.clone().unwrap();
    assert_eq!(new["m"], json!("happy"));
    assert_eq!(new["ms"], json!(["sad", "happy"]));
}

#[tokio::test]
async fn time_uuid_and_other_types_keep_their_text_form_in_utc() {
    let got = convert("timestamptz", &["'2026-11-25 20:15:30.123456+01'"]).await;
    assert_eq!(got, [json!("2026-11-25 19:15:30.123456+00")]);
    assert_eq!(
        convert("date", &["'2026-02-03'"]).await,
        [json!("2026-02-03")]
    );
    assert_eq!(
        convert("uuid", &["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"]).await,
        [json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")]
    );
    assert_eq!(
        convert("interval", &["'1 day 2 hours'"]).await,
        [json!("1 day 02:00:00")]
    );
    assert_eq!(
        convert("inet", &["'10.0.0.1/8'"]).await,
        [json!("10.0.0.1/8")]
    );
    assert_eq!(convert("text", &["'héllo ✓'"]).await, [json!("héllo ✓")]);
}

#[tokio::test]
async fn old_values_only_with_replica_identity_full() {
    let db = create_db().await;
    db.batch(
        "CREATE TABLE d (id int PRIMARY KEY, email text, status text);
         CREATE TABLE f (id int PRIMARY KEY, email text, status text);
         ALTER TABLE f REPLICA IDENTITY FULL;",
    )
    .await;
    publish(&db, "d, f").await;
    for t in ["d", "f"] {
        db.batch(&format!(
            "INSERT INTO {t} VALUES (1, 'a@x', 'active');
             UPDATE {t} SET email = 'b@x' WHERE id = 1;
             DELETE FROM {t} WHERE id = 1;"
        ))
        .await;
    }
    let mut stream = stream_for(&db.url());
    let items = read_commits(&mut stream, 2).await;
    let c = changes(&items);
    assert_eq!(c.len(), 6);
    let ops: Vec<Op> = c.iter().map(|c| c.op).collect();
    assert_eq!(
        ops,
        [
            Op::Insert,
            Op::Update,
            Op::Delete,
            Op::Insert,
            Op::Update,
            Op::Delete
        ]
    );

    // DEFAULT: no old row on update; the delete carries only the key, never nulls.
    assert_eq!(c[1].old, None);
    assert_eq!(c[1].new.as_ref().unwrap()["email"], json!("b@x"));
    assert_eq!(Value::Object(c[2].old.clone().unwrap()), json!({"id": 1}));
    assert!(!c[2].old_is_full);

    // FULL: the whole old row on update and delete.
    assert_eq!(
        Value::Object(c[4].old.clone().unwrap()),
        json!({"id": 1, "email": "a@x", "status": "active"})
    );
    assert!(c[4].old_is_full);
    assert_eq!(
        Value::Object(c[5].old.clone().unwrap()),
        json!({"id": 1, "email": "b@x", "status": "active"})
    );
    assert_eq!(c[0].table.to_string(), "public.d");
    assert_eq!(c[3].table.to_string(), "public.f");
}

#[tokio::test]
async fn transactions_keep_commit_order_across_tables() {
    let db = create_db().await;
    db.batch("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);")
        .await;
    publish(&db, "a, b").await;
    // Two interleaved transactions: the one that commits first comes first.
    let c1 = db.client().await;
    let c2 = db.client().await;
    c1.batch_execute("BEGIN; INSERT INTO a VALUES (1); INSERT INTO b VALUES (1);")
        .await
        .unwrap();
    c2.batch_execute("BEGIN; INSERT INTO b VALUES (2); INSERT INTO a VALUES (2);")
        .await
        .unwrap();
    c1.batch_execute("INSERT INTO a VALUES (3);").await.unwrap();
    c2.batch_execute("COMMIT").await.unwrap();
    c1.batch_execute("COMMIT").await.unwrap();
    let mut stream = stream_for(&db.url());
    let items = read_commits(&mut stream, 2).await;
    let seq: Vec<String> = changes(&items)
        .iter()
        .map(|c| format!("{}:{}", c.table.name, c.new.as_ref().unwrap()["id"]))
        .collect();
    assert_eq!(seq, ["b:2", "a:2", "a:1", "b:1", "a:3"]);
    let xids: Vec<u32> = items
        .iter()
        .filter_map(|i| match i {
            Decoded::Begin { xid, .. } => Some(*xid),
            _ => None,
        })
        .collect();
    assert_eq!(xids.len(), 2);
    assert!(
        xids[0] > xids[1],
        "the later-started, earlier-committed transaction comes first"
    );
}

#[tokio::test]
async fn alter_table_mid_stream_is_followed() {
    let db = create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY, a text)")
        .await;
    publish(&db, "t").await;
    db.batch(
        "INSERT INTO t VALUES (1, 'one');
         ALTER TABLE t ADD COLUMN b int DEFAULT 7;
         INSERT INTO t VALUES (2, 'two', 2);
         ALTER TABLE t DROP COLUMN a;
         INSERT INTO t VALUES (3, 3);",
    )
    .await;
    // One transaction (batch_execute), so the new Relation message arrives mid-transaction.
    let mut stream = stream_for(&db.url());
    let items = read_commits(&mut stream, 1).await;
    let rows: Vec<Value> = changes(&items)
        .iter()
        .map(|c| Value::Object(c.new.clone().unwrap()))
        .collect();
    assert_eq!(
        rows,
        [
            json!({"id": 1, "a": "one"}),
            json!({"id": 2, "a": "two", "b": 2}),
            json!({"id": 3, "b": 3})
        ]
    );
}

async fn streams_as(auth: Auth) {
    let db = create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY)").await;
    publish(&db, "t").await;
    let role = db.cluster().create_role(auth, "s3cret pa:ss").await;
    db.batch(&format!("GRANT SELECT ON t TO {}", role.name))
        .await;
    db.batch("INSERT INTO t VALUES (1)").await;
    let mut stream = stream_for(&db.url_as(&role));
    let items = read_commits(&mut stream, 1).await;
    assert_eq!(changes(&items).len(), 1);

    // A wrong password is refused with the server's reason, not retried forever.
    let wrong = db.url_as(&role).replace("s3cret", "wrong");
    let mut bad = stream_for(&wrong);
    let err = within("refusal of a wrong password", WAIT, bad.connect())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
}

#[tokio::test]
async fn md5_role_streams() {
    streams_as(Auth::Md5).await;
}

#[tokio::test]
async fn scram_role_streams() {
    streams_as(Auth::Scram).await;
}

#[tokio::test]
async fn cleartext_password_role_streams() {
    streams_as(Auth::Password).await;
}

#[tokio::test]
async fn tls_verify_full_with_own_ca_and_wrong_host_refused() {
    let db = create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY)").await;
    publish(&db, "t").await;
    let role = db.cluster().create_role(Auth::TlsScram, "tls-pass").await;
    db.batch("INSERT INTO t VALUES (1)").await;
    let ca = db.cluster().ca_cert_path().display().to_string();
    let base = db.url_as(&role);

    // Plain TCP is refused for this role (hostssl only).
    let mut plain = stream_for(&format!("{base}?sslmode=disable"));
    assert!(
        within("plain refusal", WAIT, plain.connect())
            .await
            .is_err()
    );

    let mut tls = stream_for(&format!("{base}?sslmode=verify-full&sslrootcert={ca}"));
    let items = read_commits(&mut tls, 1).await;
    assert_eq!(changes(&items).len(), 1);
    drop(tls);

    // The certificate names localhost and 127.0.0.1; a host name it lacks is refused
    // under verify-full but accepted under verify-ca.
    let other = format!(
        "host=wrong.invalid hostaddr=127.0.0.1 port={} user={} password=tls-pass dbname={} sslrootcert={ca}",
        db.port, role.name, db.name
    );
    let mut full = stream_for(&format!("{other} sslmode=verify-full"));
    let err = within("verify-full refusal", WAIT, full.connect())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    let mut ca_only = stream_for(&format!("{other} sslmode=verify-ca"));
    within("verify-ca connect", WAIT, ca_only.connect())
        .await
        .expect("verify-ca ignores the host name");

    // verify-ca with no root certificate file is refused before connecting (libpq's
    // rule; tests/connect.rs shows that only `sslrootcert` is trusted).
    let err = ConnInfo::parse(&format!("{base}?sslmode=verify-ca")).unwrap_err();
    assert!(err.to_string().contains("sslrootcert"), "{err}");
}

#[tokio::test]
async fn walsender_killed_mid_stream_resumes_without_loss_or_repeat() {
    let db = create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY, txn int, pad text)")
        .await;
    publish(&db, "t").await;
    let writer = db.client().await;
    let mut stream = stream_for(&db.url());
    let mut seen: Vec<(i64, i64)> = Vec::new();
    // Transactions far larger than the socket buffers, so that a kill lands while the
    // walsender is still sending one.
    let total_txns = 6;
    let rows_per_txn = 40_000;
    let mut next_txn = 0;
    let mut commits = 0;
    let mut kills = 0;
    within("every change after three walsender kills", Duration::from_secs(60), async {
        while commits < total_txns {
            if next_txn < total_txns && next_txn <= commits + 2 {
                writer
                    .batch_execute(&format!(
                        "INSERT INTO t SELECT g, {next_txn}, repeat('x', 100) FROM generate_series({}, {}) g",
                        next_txn * rows_per_txn,
                        next_txn * rows_per_txn + rows_per_txn - 1
                    ))
                    .await
                    .unwrap();
                next_txn += 1;
            }
            match stream.next().await.expect("stream survives walsender kills") {
                Decoded::Change(c) => {
                    let new = c.new.unwrap();
                    seen.push((new["txn"].as_i64().unwrap(), new["id"].as_i64().unwrap()));
                    // Kill the walsender in the middle of transactions 1, 3 and 4.
                    if seen.len() as i64 % rows_per_txn == 1000 && [1, 3, 4].contains(&new["txn"].as_i64().unwrap()) {
                        kills += 1;
                        writer
                            .batch_execute(
                                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = current_database()",
                            )
                            .await
                            .unwrap();
                    }
                }
                Decoded::Commit { end_lsn, .. } => {
                    commits += 1;
                    stream.confirm(end_lsn);
                }
                _ => {}
            }
        }
    })
    .await;
    let expected: Vec<(i64, i64)> = (0..total_txns)
        .flat_map(|t| (0..rows_per_txn).map(move |r| (t, t * rows_per_txn + r)))
        .collect();
    assert_eq!(kills, 3);
    assert_eq!(seen.len(), expected.len(), "no change lost or repeated");
    if let Some(i) = (0..expected.len()).find(|&i| seen[i] != expected[i]) {
        panic!(
            "change {i}: got (txn, id) {:?}, expected {:?}",
            seen[i], expected[i]
        );
    }
}
