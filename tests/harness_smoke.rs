//! Proves the test harness itself: the shared cluster is set up for logical
//! replication, databases are isolated, roles are forced to the auth method asked for,
//! TLS works with the harness CA, and restarts keep data.

use std::time::{Duration, Instant};

use crate::support::pg::{self, Auth, Cluster, StopMode};
use crate::support::{wait_for, walhook_bin};
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn cluster_is_configured_for_logical_replication() {
    let db = pg::create_db().await;
    let client = db.client().await;
    for (setting, expected) in [
        ("wal_level", "logical"),
        ("max_replication_slots", "300"),
        ("max_wal_senders", "60"),
        ("wal_sender_timeout", "10s"),
        ("ssl", "on"),
    ] {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), expected, "setting {setting}");
    }
    let port: String = client.query_one("SHOW port", &[]).await.unwrap().get(0);
    assert_eq!(port, db.port.to_string());
    assert!(db.url().ends_with(&format!(":{}/{}", db.port, db.name)));
}

#[tokio::test]
async fn each_database_is_isolated() {
    let a = pg::create_db().await;
    let b = pg::create_db().await;
    assert_ne!(a.name, b.name);

    a.batch("CREATE TABLE only_in_a (id int PRIMARY KEY); INSERT INTO only_in_a VALUES (1)")
        .await;
    let row = a
        .query_one("SELECT current_database(), count(*) FROM only_in_a", &[])
        .await;
    assert_eq!(row.get::<_, String>(0), a.name);
    assert_eq!(row.get::<_, i64>(1), 1);

    let row = b
        .query_one(
            "SELECT current_database(), to_regclass('only_in_a') IS NULL",
            &[],
        )
        .await;
    assert_eq!(row.get::<_, String>(0), b.name);
    assert!(row.get::<_, bool>(1), "table of database a is visible in b");
}

/// Connects as `role` with `password` over plain TCP and returns `current_user`.
async fn login(
    db: &pg::TestDb,
    role: &pg::Role,
    password: &str,
) -> Result<String, tokio_postgres::Error> {
    let with_password = pg::Role {
        password: password.to_owned(),
        ..role.clone()
    };
    let client = pg::connect(&format!("{}?sslmode=disable", db.url_as(&with_password))).await?;
    Ok(client
        .query_one("SELECT current_user::text", &[])
        .await?
        .get(0))
}

fn assert_bad_password(result: Result<String, tokio_postgres::Error>, role: &pg::Role) {
    let err = result.expect_err(&format!("{} logged in with a wrong password", role.name));
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PASSWORD),
        "{} with a wrong password: {err:?}",
        role.name
    );
}

#[tokio::test]
async fn password_roles_need_their_password() {
    let db = pg::create_db().await;
    let cluster = pg::cluster();
    for (auth, stored_prefix) in [
        (Auth::Md5, "md5"),
        (Auth::Scram, "SCRAM-SHA-256$"),
        (Auth::Password, "SCRAM-SHA-256$"),
    ] {
        let role = cluster.create_role(auth, "s3cret: p@ss/word'").await;
        assert_eq!(login(&db, &role, &role.password).await.unwrap(), role.name);
        assert_bad_password(login(&db, &role, "wrong").await, &role);

        let stored: String = db
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&role.name],
            )
            .await
            .get(0);
        assert!(
            stored.starts_with(stored_prefix),
            "{auth:?} role password stored as {}",
            &stored[..stored.len().min(16)]
        );
    }
}

#[tokio::test]
async fn trust_role_logs_in_without_password() {
    let db = pg::create_db().await;
    let role = pg::cluster().create_role(Auth::Trust, "unused").await;
    assert_eq!(login(&db, &role, "anything").await.unwrap(), role.name);
}

#[tokio::test]
async fn tls_connection_is_verified_against_the_harness_ca() {
    let db = pg::create_db().await;
    let cluster = db.cluster();
    assert!(cluster.ca_cert_path().is_file());

    for host in ["127.0.0.1", "localhost"] {
        let url = format!(
            "postgres://postgres@{host}:{}/{}?sslmode=require",
            db.port, db.name
        );
        let client = pg::connect_tls(&url, cluster).await.unwrap();
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "connection to {host} is not encrypted");
    }

    // A TLS-only role: refused over plain TCP, accepted over TLS with its password.
    let role = cluster.create_role(Auth::TlsScram, "tls-pass").await;
    let plain = pg::connect(&format!("{}?sslmode=disable", db.url_as(&role))).await;
    let err = plain.expect_err("TLS-only role logged in without TLS");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err:?}"
    );
    let client = pg::connect_tls(&format!("{}?sslmode=require", db.url_as(&role)), cluster)
        .await
        .unwrap();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, role.name);
}

#[tokio::test]
async fn replication_connections_follow_the_same_auth_rules() {
    let db = pg::create_db().await;
    let role = pg::cluster().create_role(Auth::Md5, "repl-pass").await;
    let identify = |password: &str| {
        std::process::Command::new(pg::pg_bin("psql"))
            .arg(format!(
                "host=127.0.0.1 port={} user={} dbname={} replication=database sslmode=disable",
                db.port, role.name, db.name
            ))
            .args(["-X", "-A", "-t", "-c", "IDENTIFY_SYSTEM"])
            .env("PGPASSWORD", password)
            .output()
            .expect("run psql")
    };
    let ok = identify(&role.password);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(&db.name));

    let wrong = identify("wrong");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

#[tokio::test]
async fn dedicated_cluster_keeps_committed_data_across_restarts() {
    let cluster = Cluster::start();
    assert_ne!(cluster.port(), pg::cluster().port());
    let db = cluster.create_db().await;

    // Each cluster has its own CA: the shared cluster's CA does not vouch for this one.
    let tls_url = format!("{}?sslmode=require", db.url());
    let err = pg::connect_tls(&tls_url, pg::cluster())
        .await
        .expect_err("TLS accepted a server certificate from another CA");
    assert!(format!("{err:?}").contains("InvalidCertificate"), "{err:?}");
    pg::connect_tls(&tls_url, &cluster).await.unwrap();

    db.batch("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await;

    cluster.restart(StopMode::Fast);
    db.batch("INSERT INTO t VALUES (2)").await;

    // A crash: committed rows survive recovery.
    cluster.restart(StopMode::Immediate);
    let count: i64 = db.query_one("SELECT count(*) FROM t", &[]).await.get(0);
    assert_eq!(count, 2);

    cluster.stop(StopMode::Fast);
    assert!(
        pg::connect(&db.url()).await.is_err(),
        "connected to a stopped server"
    );
    cluster.start_again();
    db.batch("SELECT 1").await;

    let root = cluster.data_dir().parent().unwrap().to_owned();
    drop(db);
    drop(cluster);
    assert!(!root.exists(), "{} left behind", root.display());
}

#[tokio::test]
#[should_panic(expected = "waiting for the flag that never flips")]
async fn wait_for_names_what_it_waited_for() {
    wait_for(
        "the flag that never flips",
        Duration::from_millis(100),
        || async { false },
    )
    .await;
}

#[tokio::test]
async fn wait_for_returns_once_the_condition_holds() {
    let start = Instant::now();
    wait_for("200ms to pass", Duration::from_secs(5), || async move {
        start.elapsed() >= Duration::from_millis(200)
    })
    .await;
}

#[test]
fn tools_are_found() {
    assert!(pg::bin_dir().join("postgres").is_file());
    assert!(pg::pg_bin("pg_recvlogical").is_file());
    assert!(walhook_bin().is_file());
}
