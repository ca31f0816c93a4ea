//! sql/least-privilege.sql and sql/publication.sql, applied as a DBA and a table owner
//! would: walhook then runs `setup` and `run` as the unprivileged role they create and
//! delivers events. Also checks that sql/publication.sql is what `walhook setup
//! --print-sql` prints for the example config.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::daemon::Workdir;
use crate::support::pg::{TestDb, create_db, pg_bin};
use crate::support::receiver::Receiver;
use crate::support::{wait_for, walhook_bin};

const WAIT: Duration = Duration::from_secs(60);

fn sql_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sql").join(name)
}

/// Runs a file with psql as `user` (trust auth) in `db`; panics with psql's output.
fn psql(db: &TestDb, user: &str, file: &Path, vars: &[(&str, &str)]) {
    let mut command = Command::new(pg_bin("psql"));
    command
        .args(["-X", "-q", "-h", "127.0.0.1", "-p", &db.port.to_string()])
        .args(["-U", user, "-d", &db.name, "-f"])
        .arg(file);
    for (name, value) in vars {
        command.arg("-v").arg(format!("{name}={value}"));
    }
    let out = command.output().expect("run psql");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "psql -f {} as {user}: {}\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn walhook_runs_as_the_least_privilege_role_from_the_sql_scripts() {
    let db = create_db().await;
    let owner = format!("{}_owner", db.name);
    let role = format!("{}_walhook", db.name);
    // The application: an ordinary role owns the database and its tables.
    db.batch(&format!(
        "CREATE ROLE {owner} LOGIN;
         ALTER DATABASE {db} OWNER TO {owner};
         CREATE TABLE users (id int PRIMARY KEY, email text, status text, password_hash text);
         CREATE TABLE user_roles (user_id int, role_id int, PRIMARY KEY (user_id, role_id));
         ALTER TABLE users OWNER TO {owner};
         ALTER TABLE user_roles OWNER TO {owner};",
        db = db.name
    ))
    .await;
    // The DBA, then the tables' owner.
    psql(
        &db,
        "postgres",
        &sql_file("least-privilege.sql"),
        &[("password", "s3cret-Pw"), ("role", &role)],
    );
    psql(&db, &owner, &sql_file("publication.sql"), &[]);

    let attrs = db
        .query_one(
            "SELECT rolsuper, rolreplication, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await;
    let (sup, repl, createdb, createrole): (bool, bool, bool, bool) =
        (attrs.get(0), attrs.get(1), attrs.get(2), attrs.get(3));
    assert!(!sup && repl && !createdb && !createrole);

    let receiver = Receiver::start(|_| 200).await;
    let work = Workdir::new(&format!(
        r#"
[source]
url = "postgres://{role}:s3cret-Pw@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.users"
entity = "user"
exclude_columns = ["password_hash"]
update_columns = ["email", "status"]

[[tables.rules]]
event = "user.suspended"
when = "old.status != 'suspended' && new.status == 'suspended'"

[[tables]]
table = "public.user_roles"
entity = "user"
id = ["user_id"]
events = {{ insert = "role.assigned", delete = "role.unassigned", update = false }}

[[subscriptions]]
name = "crm"
url = "{url}"
events = ["user.*"]
"#,
        port = db.port,
        name = db.name,
        url = receiver.url,
    ));
    let (status, stdout, stderr) = work.run_to_end(&["setup"], WAIT);
    assert!(
        status.success(),
        "walhook setup as {role}: {stdout}{stderr}"
    );

    // The store tables belong to the role, in its own schema.
    let store_owner = db
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = 'walhook' AND tablename = 'events'",
            &[],
        )
        .await;
    assert_eq!(store_owner.get::<_, String>(0), role);

    let mut daemon = work.spawn_run(0);
    let client = db.client().await;
    for attempt in 0.. {
        assert!(daemon.is_running(), "walhook run exited: {}", daemon.log());
        let active = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&db.name],
            )
            .await
            .unwrap();
        if active.is_some() {
            break;
        }
        assert!(
            attempt < 600,
            "walhook did not hold the slot within 60 s: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The application writes, as the owner.
    let app = crate::support::pg::connect(&format!(
        "postgres://{owner}@127.0.0.1:{}/{}",
        db.port, db.name
    ))
    .await
    .unwrap();
    app.batch_execute(
        "INSERT INTO users VALUES (1, 'a@example.com', 'active', 'hash');
         UPDATE users SET status = 'suspended' WHERE id = 1;
         INSERT INTO user_roles VALUES (1, 7);",
    )
    .await
    .unwrap();
    wait_for("4 deliveries", WAIT, || async {
        receiver.received().len() >= 4
    })
    .await;
    let mut types: Vec<String> = receiver
        .received()
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_owned())
        .collect();
    types.sort();
    assert_eq!(
        types,
        [
            "user.created",
            "user.role.assigned",
            "user.suspended",
            "user.updated"
        ]
    );
    assert!(
        receiver
            .received()
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.body).contains("hash")),
        "password_hash is excluded"
    );

    // A backfill as the role: its watermarks (pg_logical_emit_message), its settle look
    // at pg_stat_activity and the chunk read all pass with these rights.
    let (status, stdout, stderr) = work.run_to_end(&["backfill", "--table", "public.users"], WAIT);
    assert!(
        status.success(),
        "walhook backfill as {role}: {stdout}{stderr}\n{}",
        daemon.log()
    );
    wait_for("the snapshot delivery", WAIT, || async {
        receiver.received().len() >= 5
    })
    .await;
    let snapshot = receiver.received()[4].json();
    assert_eq!(snapshot["type"], "user.snapshot");
    assert_eq!(snapshot["data"]["status"], "suspended");
    assert!(snapshot["data"].get("password_hash").is_none());
    assert!(daemon.is_running(), "{}", daemon.log());
}

#[test]
fn publication_sql_matches_setup_print_sql_for_the_example_config() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/walhook.toml");
    let out = Command::new(walhook_bin())
        .args(["setup", "--print-sql", "-c"])
        .arg(&example)
        .env("DATABASE_URL", "postgres://walhook@localhost/app")
        .output()
        .expect("run walhook setup --print-sql");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let statement = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("CREATE PUBLICATION"))
            .map(|l| l.replace('"', ""))
            .unwrap_or_else(|| panic!("no CREATE PUBLICATION in:\n{text}"))
    };
    let script = std::fs::read_to_string(sql_file("publication.sql")).unwrap();
    assert_eq!(statement(&script), statement(&printed));
    // The least-privilege script grants SELECT on exactly those tables.
    let grants = std::fs::read_to_string(sql_file("least-privilege.sql")).unwrap();
    let tables = statement(&script)
        .trim_start_matches("CREATE PUBLICATION walhook FOR TABLE ")
        .trim_end_matches(';')
        .to_owned();
    assert!(
        grants.contains(&format!("GRANT SELECT ON TABLE {tables} TO")),
        "least-privilege.sql grants SELECT on {tables}"
    );
}
