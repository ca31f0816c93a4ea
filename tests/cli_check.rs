//! `walhook check` on a good setup, and bad input to both `walhook tail` and `walhook
//! check`: each failure exits 1 (78 for an invalid config) with one paragraph naming
//! the culprit and the fix, and never a panic. `tail` writes it to stderr; `check` reports it on its `error` line.

use std::time::Duration;

use crate::support::cli::{ConfigFile, Outcome, StdoutMode, Tail, run};
use crate::support::pg::{Auth, Cluster, TestDb, cluster, create_db};
use crate::support::{wait_for, wait_for_some};

const WAIT: Duration = Duration::from_secs(60);

/// Runs `walhook tail` and `walhook check` with `config` and `url`; both must exit 1:
/// tail with a stderr line holding `tail_needles`, check with an `error {check_what}:`
/// line holding `check_needles`. Returns both outcomes.
async fn both_fail(
    config: &ConfigFile,
    url: &str,
    tail_needles: &[&str],
    check_what: &str,
    check_needles: &[&str],
) -> (Outcome, Outcome) {
    both_exit_with(1, config, url, tail_needles, check_what, check_needles).await
}

/// Like [`both_fail`], with exit code `code` (78 for an invalid config).
async fn both_exit_with(
    code: i32,
    config: &ConfigFile,
    url: &str,
    tail_needles: &[&str],
    check_what: &str,
    check_needles: &[&str],
) -> (Outcome, Outcome) {
    let tail = run(&["tail"], config, url).await;
    tail.assert_exit_with(code, "walhook tail", &tail.stderr, tail_needles);
    assert!(tail.stderr.starts_with("error: "), "tail: {}", tail.stderr);
    assert!(
        tail.stdout.is_empty(),
        "tail printed no change: {}",
        tail.stdout
    );

    let check = run(&["check"], config, url).await;
    let prefix = format!("error {check_what}: ");
    let mut needles = vec![prefix.as_str()];
    needles.extend_from_slice(check_needles);
    check.assert_exit_with(code, "walhook check", &check.stdout, &needles);
    assert!(
        check.stdout.contains("error(s)"),
        "check ends with its summary: {}",
        check.stdout
    );
    (tail, check)
}

/// A database with table `t` (primary key), its own config file watching `public.t`.
async fn db_with_table() -> (TestDb, ConfigFile) {
    let db = create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let config = ConfigFile::source(&format!("{}_slot", db.name), "walhook", &["public.t"]);
    (db, config)
}

#[tokio::test]
async fn check_on_a_good_setup_prints_ok_for_every_check() {
    let db = create_db().await;
    let slot = format!("{}_slot", db.name);
    db.batch(
        "CREATE TABLE accounts (id int PRIMARY KEY, email text);
         ALTER TABLE accounts REPLICA IDENTITY FULL;
         CREATE TABLE roles (account_id int, role int, PRIMARY KEY (account_id, role));
         CREATE PUBLICATION walhook FOR TABLE accounts, roles;",
    )
    .await;
    db.create_slot(&slot).await;
    let config = ConfigFile::source(&slot, "walhook", &["public.accounts", "public.roles"]);
    let out = run(&["check"], &config, &db.url()).await;
    assert_eq!(
        out.code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    let (summary, checks) = lines.split_last().expect("some output");
    assert_eq!(*summary, "0 error(s), 0 warning(s)");
    let names: Vec<&str> = checks
        .iter()
        .map(|line| {
            let rest = line
                .strip_prefix("ok ")
                .unwrap_or_else(|| panic!("not an ok line: {line}\n{}", out.stdout));
            rest.trim_start().split(':').next().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "config",
            "connection",
            "tls",
            "wal_level",
            "replication privilege",
            "replication slots",
            "wal senders",
            "table public.accounts",
            "table public.roles",
            "publication",
            "slot",
            "slot WAL",
            "store",
        ]
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
}

#[tokio::test]
async fn no_free_slot_few_wal_senders_and_retained_wal_are_reported() {
    let cluster = tokio::task::spawn_blocking(|| {
        Cluster::start_with(&[
            ("max_replication_slots", "1"),
            ("max_wal_senders", "1"),
            ("max_slot_wal_keep_size", "64MB"),
        ])
    })
    .await
    .expect("start a cluster with one slot and one WAL sender");
    let db = cluster.create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    db.create_slot("other").await;
    let config = ConfigFile::source("walhook_slot", "walhook", &["public.t"]);
    let out = run(&["check"], &config, &db.url()).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    let line = |prefix: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{}", out.stdout))
            .to_owned()
    };
    let slots = line("error replication slots:");
    assert!(
        slots.contains("1 of max_replication_slots = 1") && slots.contains("Fix:"),
        "{slots}"
    );
    let senders = line("warn  wal senders:");
    assert!(
        senders.contains("max_wal_senders = 1") && senders.contains("Fix:"),
        "{senders}"
    );

    // The slot that walhook would use exists: no new slot is needed, and its retained
    // WAL is compared with max_slot_wal_keep_size.
    let config = ConfigFile::source("other", "walhook", &["public.t"]);
    let out = run(&["check"], &config, &db.url()).await;
    assert!(
        out.stdout.contains("ok    replication slots:"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ok    slot WAL: `other` retains"),
        "{}",
        out.stdout
    );
    // Over half of the 64 MB cap: a warning with the fix.
    db.batch("INSERT INTO t SELECT g, g FROM generate_series(1, 300000) g")
        .await;
    let out = run(&["check"], &config, &db.url()).await;
    let wal = out
        .stdout
        .lines()
        .find(|l| l.contains("slot WAL:"))
        .unwrap_or_else(|| panic!("no slot WAL line in:\n{}", out.stdout));
    assert!(
        wal.starts_with("warn ") && wal.contains("max_slot_wal_keep_size") && wal.contains("Fix:"),
        "{wal}"
    );
}

#[tokio::test]
async fn wal_level_replica_is_refused() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start_with(&[("wal_level", "replica")]))
        .await
        .expect("start a cluster with wal_level=replica");
    let db = cluster.create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY)").await;
    let config = ConfigFile::source("s", "walhook", &["public.t"]);
    both_fail(
        &config,
        &db.url(),
        &[
            "wal_level is `replica`",
            "Fix:",
            "wal_level = logical",
            "restart",
        ],
        "wal_level",
        &["`replica`", "Fix:"],
    )
    .await;
}

#[tokio::test]
async fn role_without_replication_is_refused() {
    let (db, config) = db_with_table().await;
    let role = format!("plain_{}", db.name);
    db.batch(&format!("CREATE ROLE {role} LOGIN")).await;
    let url = format!("postgres://{role}@127.0.0.1:{}/{}", db.port, db.name);
    both_fail(
        &config,
        &url,
        &[
            &format!("role `{role}` may not use replication"),
            &format!("Fix: as a superuser run `ALTER ROLE {role} REPLICATION;`"),
        ],
        "replication privilege",
        &[&format!("role `{role}`"), "ALTER ROLE"],
    )
    .await;
}

#[tokio::test]
async fn wrong_password_is_refused_for_md5_and_scram() {
    let (db, config) = db_with_table().await;
    for auth in [Auth::Md5, Auth::Scram] {
        let role = cluster().create_role(auth, "right-password").await;
        let wrong = crate::support::pg::Role {
            password: "wrong-Pa55".into(),
            ..role.clone()
        };
        let needles = [
            "refused the connection",
            "password authentication failed",
            role.name.as_str(),
            "Fix: check the user and password",
        ];
        let (tail, check) = both_fail(
            &config,
            &db.url_as(&wrong),
            &needles,
            "connection",
            &needles,
        )
        .await;
        for out in [&tail.stderr, &check.stdout] {
            assert!(
                !out.contains("wrong-Pa55"),
                "{auth:?}: the password is not shown: {out}"
            );
        }
    }
}

#[tokio::test]
async fn missing_table_is_refused() {
    let db = create_db().await;
    let config = ConfigFile::source("s", "walhook", &["public.nope"]);
    both_fail(
        &config,
        &db.url(),
        &["table `public.nope`", "does not exist", &db.name, "Fix:"],
        "table public.nope",
        &["does not exist", "Fix:"],
    )
    .await;
}

#[tokio::test]
async fn table_without_identity_is_refused() {
    let db = create_db().await;
    db.batch("CREATE TABLE loose (id int, v text)").await;
    let config = ConfigFile::source("s", "walhook", &["public.loose"]);
    both_fail(
        &config,
        &db.url(),
        &[
            "table `public.loose` has neither a primary key nor a replica identity",
            "Fix:",
            "REPLICA IDENTITY FULL",
        ],
        "table public.loose",
        &["neither a primary key nor a replica identity", "Fix:"],
    )
    .await;
    let published = db.query("SELECT 1 FROM pg_publication", &[]).await;
    assert!(published.is_empty(), "tail created no publication");
}

#[tokio::test]
async fn slot_active_in_another_process_is_refused() {
    let (db, config) = db_with_table().await;
    let slot = format!("{}_slot", db.name);
    db.batch("CREATE PUBLICATION walhook FOR TABLE t").await;
    db.create_slot(&slot).await;
    let holder = Tail::spawn(&["--slot", &slot], &config, &db.url(), StdoutMode::Lines);
    let holding = "the first `walhook tail --slot` to hold the slot";
    let pid: i32 = wait_for_some(holding, WAIT, || async {
        db.query(
            "SELECT active_pid FROM pg_replication_slots
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .first()
        .map(|r| r.get(0))
    })
    .await;

    let second = run(&["tail", "--slot", &slot], &config, &db.url()).await;
    second.assert_failed_with(
        "second walhook tail --slot",
        &second.stderr,
        &[
            &format!("replication slot `{slot}` is in use by another process (PID {pid})"),
            "Fix: stop that process",
        ],
    );
    let check = run(&["check"], &config, &db.url()).await;
    check.assert_failed_with(
        "walhook check",
        &check.stdout,
        &["error slot: ", &format!("`{slot}` is in use"), "Fix:"],
    );

    holder.interrupt();
    let finished = holder.finish(WAIT).await;
    assert_eq!(
        finished.outcome.code,
        Some(0),
        "{}",
        finished.outcome.stderr
    );
    wait_for("the slot to be free again", WAIT, || async {
        !db.query(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NULL",
            &[&slot],
        )
        .await
        .is_empty()
    })
    .await;
}

#[tokio::test]
async fn unreachable_host_is_refused() {
    let (db, config) = db_with_table().await;
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/{}", db.name);
    let target = format!(
        "cannot reach PostgreSQL at postgres@127.0.0.1:{port}/{}",
        db.name
    );
    let needles = [target.as_str(), "Fix: check the host and port"];
    both_fail(&config, &url, &needles, "connection", &needles).await;
}

#[tokio::test]
async fn unknown_config_key_is_named_with_its_line() {
    let db = create_db().await;
    let config = ConfigFile::new(
        r#"[source]
url = "${DATABASE_URL}"
slott = "x"
publication = "walhook"

[[tables]]
table = "public.t"
entity = "t"
"#,
    );
    let needles = [
        "walhook.toml:3",
        "source.slott",
        "unknown key",
        "did you mean \"slot\"",
    ];
    let (_, check) = both_exit_with(
        78,
        &config,
        &db.url(),
        &needles,
        "config",
        &["config error"],
    )
    .await;
    check.assert_config_error("walhook check", &check.stdout, &needles);
}

/// `walhook check` and `walhook run` with `config` and `url`: both exit 1; check on an
/// `error {what}:` line holding `needles`, run on stderr with `run_needles`. Check
/// exits 1 whenever run would refuse to start (G9).
/// Like [`db_with_table`], with the ops server on a free port (for `walhook run`).
async fn db_for_run() -> (TestDb, ConfigFile) {
    let db = create_db().await;
    db.batch("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    let config = ConfigFile::new(&format!(
        "[source]\nurl = \"${{DATABASE_URL}}\"\nslot = \"{}_slot\"\npublication = \"walhook\"\n\n[server]\nlisten = \"127.0.0.1:0\"\n\n[[tables]]\ntable = \"public.t\"\n",
        db.name
    ));
    (db, config)
}

async fn check_and_run_refuse(
    config: &ConfigFile,
    url: &str,
    what: &str,
    needles: &[&str],
    run_needles: &[&str],
) -> String {
    let check = run(&["check"], config, url).await;
    let prefix = format!("error {what}: ");
    let mut all = vec![prefix.as_str()];
    all.extend_from_slice(needles);
    let line = check.assert_failed_with("walhook check", &check.stdout, &all);
    let daemon = run(&["run"], config, url).await;
    daemon.assert_failed_with("walhook run", &daemon.stderr, run_needles);
    line
}

#[tokio::test]
async fn lost_slot_with_a_checkpoint_fails_check_like_run() {
    let (db, config) = db_for_run().await;
    let slot = format!("{}_slot", db.name);
    let setup = run(&["setup"], &config, &db.url()).await;
    assert_eq!(setup.code, Some(0), "setup: {}", setup.stderr);
    let before = run(&["check"], &config, &db.url()).await;
    assert_eq!(
        before.code,
        Some(0),
        "check before the loss:\n{}",
        before.stdout
    );

    db.batch(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await;
    let line = check_and_run_refuse(
        &config,
        &db.url(),
        "slot",
        &[
            "is gone",
            "may have been lost",
            "Fix:",
            "walhook setup --reset-slot",
        ],
        &["is gone", "walhook setup --reset-slot"],
    )
    .await;
    assert!(!line.contains("does not exist yet"), "{line}");

    // After the reset, both agree again.
    let reset = run(&["setup", "--reset-slot"], &config, &db.url()).await;
    assert_eq!(reset.code, Some(0), "reset: {}", reset.stderr);
    let after = run(&["check"], &config, &db.url()).await;
    assert_eq!(
        after.code,
        Some(0),
        "check after the reset:\n{}",
        after.stdout
    );
}

#[tokio::test]
async fn missing_publication_the_role_may_not_create_fails_check_like_run() {
    let (db, config) = db_for_run().await;
    // A replication role that may create the store schema but does not own the table,
    // so it may not publish it.
    let role = format!("nopub_{}", db.name);
    db.batch(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION;
         GRANT CREATE ON DATABASE {db} TO {role};
         GRANT SELECT ON t TO {role};",
        db = db.name
    ))
    .await;
    let url = format!("postgres://{role}@127.0.0.1:{}/{}", db.port, db.name);
    let line = check_and_run_refuse(
        &config,
        &url,
        "publication",
        &["may not change it", "Fix: have a DBA run:"],
        &["publication `walhook`", "Fix: have a DBA run:"],
    )
    .await;
    let check = run(&["check"], &config, &url).await;
    assert!(
        check
            .stdout
            .contains("CREATE PUBLICATION \"walhook\" FOR TABLE \"public\".\"t\";"),
        "check prints the SQL a DBA must run:\n{}",
        check.stdout
    );
    assert!(line.contains("walhook"), "{line}");
    let published = db.query("SELECT 1 FROM pg_publication", &[]).await;
    assert!(published.is_empty(), "check created no publication");

    // With the publication in place (a DBA ran the SQL), check passes that line.
    db.batch("CREATE PUBLICATION walhook FOR TABLE t").await;
    let check = run(&["check"], &config, &url).await;
    assert!(
        check.stdout.contains("ok    publication:"),
        "{}",
        check.stdout
    );
}

#[tokio::test]
async fn a_store_the_role_may_not_create_fails_check_like_run() {
    let (db, config) = db_for_run().await;
    // The DBA published the table but gave the role no right to create the store.
    db.batch("CREATE PUBLICATION walhook FOR TABLE t").await;
    let role = format!("nostore_{}", db.name);
    db.batch(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION; GRANT SELECT ON t TO {role};"
    ))
    .await;
    let url = format!("postgres://{role}@127.0.0.1:{}/{}", db.port, db.name);
    check_and_run_refuse(
        &config,
        &url,
        "store",
        &[
            "schema `walhook` cannot be created",
            "permission denied",
            "Fix:",
        ],
        &["permission denied"],
    )
    .await;
}
