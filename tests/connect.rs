//! Connection strings as libpq reads them, against a real cluster: the URL and
//! key/value forms, the `PG*` environment variables alone, the password file, a client
//! certificate under `clientcert=verify-full`, and `sslmode=verify-ca` trusting only
//! `sslrootcert`. Each form opens both kinds of walhook connection: an SQL session and
//! a replication connection.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use walhook::pg::{ConnInfo, ErrorChain};
use walhook::source::client::ReplicationClient;

use crate::support::cli::{ConfigFile, run_env};
use crate::support::pg::{Auth, create_db};

/// Parses `conn` with only `env` as the environment (no process-wide variables), then
/// opens an SQL session and a replication connection with it. Returns the session's
/// `current_user`, `application_name` and whether it uses TLS, or the first error.
async fn connect_both(conn: &str, env: &[(&str, &str)]) -> Result<(String, String, bool), String> {
    let mut vars: BTreeMap<&str, &str> = env.iter().copied().collect();
    vars.entry("USER").or_insert("nobody-in-particular");
    let info = ConnInfo::parse_with(conn, &vars).map_err(|e| e.to_string())?;
    let sql = info
        .connect_sql()
        .await
        .map_err(|e| ErrorChain(&e).to_string())?;
    let row = sql
        .query_one(
            "SELECT current_user::text, current_setting('application_name'), \
                    coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut repl = ReplicationClient::connect(&info, "walhook-connect-test")
        .await
        .map_err(|e| format!("replication connection: {}", ErrorChain(&e)))?;
    let system = repl
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .map_err(|e| format!("IDENTIFY_SYSTEM: {e}"))?;
    assert_eq!(system.len(), 1, "IDENTIFY_SYSTEM returns one row");
    repl.close().await;
    Ok((row.get(0), row.get(1), row.get(2)))
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn url_key_value_environment_and_password_file_each_connect() {
    let db = create_db().await;
    let role = db
        .cluster()
        .create_role(Auth::Scram, "s3cret pass:word")
        .await;
    let (port, user, name) = (db.port.to_string(), role.name.as_str(), db.name.as_str());
    let home = tempfile::tempdir().unwrap();
    let home_dir = home.path().to_str().unwrap();

    // URL, percent-encoded password.
    let url = format!(
        "postgresql://{user}:s3cret%20pass%3Aword@127.0.0.1:{port}/{name}?application_name=url-form&sslmode=disable"
    );
    let (who, app, tls) = connect_both(&url, &[("HOME", home_dir)]).await.unwrap();
    assert_eq!((who.as_str(), app.as_str(), tls), (user, "url-form", false));

    // Key/value, quoted password.
    let kv = format!(
        "host=127.0.0.1 port={port} user={user} dbname={name} password='s3cret pass:word' application_name=kv-form sslmode=require"
    );
    let (who, app, tls) = connect_both(&kv, &[("HOME", home_dir)]).await.unwrap();
    assert_eq!((who.as_str(), app.as_str(), tls), (user, "kv-form", true));

    // Nothing in the string: every setting from PG* variables.
    let env = [
        ("HOME", home_dir),
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", port.as_str()),
        ("PGUSER", user),
        ("PGPASSWORD", "s3cret pass:word"),
        ("PGDATABASE", name),
        ("PGAPPNAME", "env-only"),
        ("PGSSLMODE", "require"),
    ];
    let (who, app, tls) = connect_both("", &env).await.unwrap();
    assert_eq!((who.as_str(), app.as_str(), tls), (user, "env-only", true));

    // No password anywhere: refused by the server, naming the fix.
    let bare = format!("host=127.0.0.1 port={port} user={user} dbname={name} sslmode=disable");
    let err = connect_both(&bare, &[("HOME", home_dir)])
        .await
        .unwrap_err();
    assert!(err.contains("password"), "{err}");

    // The password from ~/.pgpass (the `:` in it escaped), for SQL and replication.
    private_file(
        &home.path().join(".pgpass"),
        &format!("127.0.0.1:{port}:*:{user}:s3cret pass\\:word\n"),
    );
    let (who, _, _) = connect_both(&bare, &[("HOME", home_dir)]).await.unwrap();
    assert_eq!(who, user);
    // PGPASSFILE names another file; a file others may read is ignored, as by libpq.
    let other = home.path().join("other-pgpass");
    private_file(&other, &format!("*:*:*:{user}:s3cret pass\\:word\n"));
    let (who, _, _) = connect_both(
        &bare,
        &[
            ("HOME", "/nonexistent"),
            ("PGPASSFILE", other.to_str().unwrap()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(who, user);
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = connect_both(
        &bare,
        &[
            ("HOME", "/nonexistent"),
            ("PGPASSFILE", other.to_str().unwrap()),
        ],
    )
    .await
    .unwrap_err();
    assert!(err.contains("password"), "{err}");
}

#[tokio::test]
async fn client_certificate_authenticates_under_clientcert_verify_full() {
    let db = create_db().await;
    let role = db.cluster().create_role(Auth::Cert, "unused").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = db.cluster().client_cert(&role.name, dir.path());
    let ca = db.cluster().ca_cert_path().display().to_string();
    let home = tempfile::tempdir().unwrap();
    let env = [("HOME", home.path().to_str().unwrap())];
    let base = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={} dbname={} sslmode=verify-full sslrootcert={ca}",
        db.port, role.name, db.name
    );

    let with_cert = format!("{base} sslcert={} sslkey={}", cert.display(), key.display());
    let (who, _, tls) = connect_both(&with_cert, &env).await.unwrap();
    assert_eq!((who.as_str(), tls), (role.name.as_str(), true));

    // The default files ~/.postgresql/postgresql.crt and .key are used too.
    let pgdir = home.path().join(".postgresql");
    std::fs::create_dir(&pgdir).unwrap();
    std::fs::copy(&cert, pgdir.join("postgresql.crt")).unwrap();
    std::fs::copy(&key, pgdir.join("postgresql.key")).unwrap();
    let (who, _, _) = connect_both(&base, &env).await.unwrap();
    assert_eq!(who, role.name);
    std::fs::remove_dir_all(&pgdir).unwrap();

    // Without a certificate the server refuses the role.
    let err = connect_both(&base, &env).await.unwrap_err();
    assert!(
        err.contains("refused") || err.contains("certificate"),
        "{err}"
    );

    // A key others may read is refused before connecting, naming the fix.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = connect_both(&with_cert, &env).await.unwrap_err();
    assert!(
        err.contains("group or world access") && err.contains("chmod 0600"),
        "{err}"
    );
}

/// A CA of its own, which signed nothing the server presents.
fn unrelated_ca(dir: &Path) -> std::path::PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "unrelated test CA");
    let ca = params.self_signed(&key).unwrap();
    let path = dir.join("unrelated-ca.crt");
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

#[tokio::test]
async fn verify_ca_trusts_only_sslrootcert_even_when_the_system_trusts_the_server() {
    let db = create_db().await;
    let dir = tempfile::tempdir().unwrap();
    let unrelated = unrelated_ca(dir.path());
    let cluster_ca = db.cluster().ca_cert_path().display().to_string();
    // The "system" roots of the walhook process trust the server's CA.
    let system = [
        ("SSL_CERT_FILE", cluster_ca.as_str()),
        ("HOME", "/nonexistent"),
    ];
    let config = |conn: &str| {
        ConfigFile::new(&format!(
            "[source]\nurl = \"{conn}\"\nslot = \"s\"\npublication = \"p\"\n\n[[tables]]\ntable = \"public.t\"\nentity = \"t\"\n"
        ))
    };
    let base = format!(
        "host=127.0.0.1 port={} user=postgres dbname={}",
        db.port, db.name
    );
    let connection_line = |stdout: &str| {
        stdout
            .lines()
            .find(|l| l.contains("connection"))
            .unwrap_or_default()
            .to_owned()
    };

    // sslrootcert names a CA that did not sign the server's certificate: refused,
    // although the system roots would trust it.
    let refused = config(&format!(
        "{base} sslmode=verify-ca sslrootcert={}",
        unrelated.display()
    ));
    let out = run_env(&["check"], &refused, "", &system).await;
    let line = connection_line(&out.stdout);
    assert!(line.starts_with("error"), "{}\n{}", out.stdout, out.stderr);
    assert!(
        line.contains("certificate") || line.contains("TLS"),
        "{line}"
    );
    assert_ne!(out.code, Some(0));

    // The same server is trusted through the system roots (sslrootcert=system, which
    // means verify-full), and through its own CA named in sslrootcert.
    for conn in [
        format!("{base} sslrootcert=system"),
        format!("{base} sslmode=verify-ca sslrootcert={cluster_ca}"),
    ] {
        let out = run_env(&["check"], &config(&conn), "", &system).await;
        let line = connection_line(&out.stdout);
        assert!(
            line.starts_with("ok"),
            "{conn}: {}\n{}",
            out.stdout,
            out.stderr
        );
        assert!(
            line.contains(&format!("postgres@127.0.0.1:{}/{}", db.port, db.name)),
            "{line}"
        );
    }

    // A weak sslmode with sslrootcert=system is a config error naming the fix.
    let weak = config(&format!("{base} sslrootcert=system sslmode=require"));
    let out = run_env(&["check"], &weak, "", &system).await;
    assert_eq!(out.code, Some(78), "a config error exits 78");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("source.url") && all.contains("verify-full"),
        "{all}"
    );
}

#[tokio::test]
async fn key_value_strings_and_pg_variables_work_from_the_config() {
    let db = create_db().await;
    let role = db.cluster().create_role(Auth::Scram, "from-env").await;
    let kv = ConfigFile::new(&format!(
        "[source]\nurl = \"host=127.0.0.1 port={} dbname={}\"\nslot = \"s\"\npublication = \"p\"\n\n[[tables]]\ntable = \"public.t\"\nentity = \"t\"\n",
        db.port, db.name
    ));
    let env = [("PGUSER", role.name.as_str()), ("PGPASSWORD", "from-env")];
    let out = run_env(&["check"], &kv, "", &env).await;
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("connection"))
        .unwrap_or_default();
    assert!(
        line.starts_with("ok")
            && line.contains(&format!("{}@127.0.0.1:{}/{}", role.name, db.port, db.name)),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    // Nothing leaks the password.
    assert!(!out.stdout.contains("from-env") && !out.stderr.contains("from-env"));

    // url = "" takes everything from the environment.
    let empty = ConfigFile::new(
        "[source]\nurl = \"\"\nslot = \"s\"\npublication = \"p\"\n\n[[tables]]\ntable = \"public.t\"\nentity = \"t\"\n",
    );
    let port = db.port.to_string();
    let env = [
        ("PGHOST", "127.0.0.1"),
        ("PGPORT", port.as_str()),
        ("PGDATABASE", db.name.as_str()),
        ("PGUSER", role.name.as_str()),
        ("PGPASSWORD", "from-env"),
    ];
    let out = run_env(&["check"], &empty, "", &env).await;
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("connection")),
        "{}\n{}",
        out.stdout,
        out.stderr
    );

    // A malformed string is a config error naming the key and the line.
    let bad = ConfigFile::new("[source]\nurl = \"host=db port=nope\"\n");
    let out = run_env(&["check"], &bad, "", &[]).await;
    assert_eq!(out.code, Some(78), "a config error exits 78");
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("source.url") && all.contains("`port`") && all.contains("nope"),
        "{all}"
    );
    assert!(all.contains(":2"), "the message names the line: {all}");
}
