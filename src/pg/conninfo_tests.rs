use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn env(pairs: &[(&'static str, &'static str)]) -> BTreeMap<&'static str, &'static str> {
    let mut m: BTreeMap<&str, &str> = pairs.iter().copied().collect();
    m.entry("USER").or_insert("osuser");
    m
}

fn parse(s: &str, pairs: &[(&'static str, &'static str)]) -> Result<ConnInfo, PgError> {
    ConnInfo::parse_with(s, &env(pairs))
}

fn tcp(info: &ConnInfo) -> Vec<(String, u16)> {
    info.hosts
        .iter()
        .map(|h| (h.host.to_string(), h.port))
        .collect()
}

#[test]
fn url_form_is_percent_decoded_with_query_settings() {
    let c = parse(
        "postgresql://app%40corp:p%40ss%3Aw%26rd@db.example:6543/my%20db?sslmode=disable&application_name=svc&options=-c%20search_path%3Dx&connect_timeout=4",
        &[],
    )
    .unwrap();
    assert_eq!(c.user, "app@corp");
    assert_eq!(c.password_for(&c.hosts[0]).as_deref(), Some("p@ss:w&rd"));
    assert_eq!(tcp(&c), [("db.example".to_owned(), 6543)]);
    assert_eq!(c.dbname, "my db");
    assert_eq!(c.tls.mode, SslMode::Disable);
    assert_eq!(c.application_name.as_deref(), Some("svc"));
    assert_eq!(c.options.as_deref(), Some("-c search_path=x"));
    assert_eq!(c.connect_timeout, Duration::from_secs(4));
    assert!(
        c.startup_options()
            .starts_with("-c search_path=x -c TimeZone=UTC")
    );
    // Never the password.
    assert_eq!(c.to_string(), "app@corp@db.example:6543/my db");
    assert!(!format!("{c:?}").contains("p@ss"));
}

#[test]
fn key_value_form_with_quotes_and_escapes() {
    let c = parse(
        r"host=db port = 5433 dbname='my app' user=walhook password='it\'s a \\secret' options='-c statement_timeout=0'",
        &[],
    )
    .unwrap();
    assert_eq!(tcp(&c), [("db".to_owned(), 5433)]);
    assert_eq!(c.dbname, "my app");
    assert_eq!(c.user, "walhook");
    assert_eq!(
        c.password_for(&c.hosts[0]).as_deref(),
        Some(r"it's a \secret")
    );
    assert_eq!(c.options.as_deref(), Some("-c statement_timeout=0"));
    let err = parse("host=db dbname='open", &[]).unwrap_err().to_string();
    assert!(err.contains("unterminated"), "{err}");
    let err = parse("host db", &[]).unwrap_err().to_string();
    assert!(err.contains("missing `=` after `host`"), "{err}");
}

#[test]
fn several_hosts_with_one_port_each_or_one_for_all() {
    let c = parse("postgresql://a:1,b:2,[::1]:3/db", &[]).unwrap();
    assert_eq!(
        tcp(&c),
        [("a".into(), 1), ("b".into(), 2), ("::1".into(), 3)]
    );
    assert_eq!(c.to_string(), "osuser@a:1,b:2,[::1]:3/db");
    let c = parse("host=a,b port=7", &[]).unwrap();
    assert_eq!(tcp(&c), [("a".into(), 7), ("b".into(), 7)]);
    let err = parse("host=a,b,c port=1,2", &[]).unwrap_err().to_string();
    assert!(
        err.contains("`port`") && err.contains("2 ports for 3 hosts"),
        "{err}"
    );
    let c = parse("host=db.example hostaddr=127.0.0.1 port=5", &[]).unwrap();
    assert_eq!(c.hosts[0].hostaddr, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(c.hosts[0].host, Host::Tcp("db.example".into()));
    let c = parse("host=/run/pg port=5", &[]).unwrap();
    assert_eq!(c.hosts[0].host, Host::Unix("/run/pg".into()));
}

#[test]
fn environment_fills_what_the_string_leaves_out() {
    let vars = [
        ("PGHOST", "envhost"),
        ("PGPORT", "6000"),
        ("PGUSER", "envuser"),
        ("PGDATABASE", "envdb"),
        ("PGPASSWORD", "envpw"),
        ("PGSSLMODE", "require"),
        ("PGAPPNAME", "envapp"),
        ("PGCONNECT_TIMEOUT", "3"),
        ("PGOPTIONS", "-c work_mem=64MB"),
        ("PGTARGETSESSIONATTRS", "read-write"),
    ];
    let c = parse("", &vars).unwrap();
    assert_eq!(tcp(&c), [("envhost".into(), 6000)]);
    assert_eq!((c.user.as_str(), c.dbname.as_str()), ("envuser", "envdb"));
    assert_eq!(c.password_for(&c.hosts[0]).as_deref(), Some("envpw"));
    assert_eq!(c.tls.mode, SslMode::Require);
    assert_eq!(c.application_name.as_deref(), Some("envapp"));
    assert_eq!(c.connect_timeout, Duration::from_secs(3));
    assert_eq!(c.options.as_deref(), Some("-c work_mem=64MB"));
    assert_eq!(c.target_session, TargetSession::ReadWrite);
    // The string wins over the environment.
    let c = parse("postgresql://u:pw@h:1/d?sslmode=disable", &vars).unwrap();
    assert_eq!(tcp(&c), [("h".into(), 1)]);
    assert_eq!((c.user.as_str(), c.dbname.as_str()), ("u", "d"));
    assert_eq!(c.password_for(&c.hosts[0]).as_deref(), Some("pw"));
    assert_eq!(c.tls.mode, SslMode::Disable);
}

#[test]
fn defaults_are_libpqs() {
    let c = parse("", &[]).unwrap();
    assert_eq!(c.user, "osuser");
    assert_eq!(c.dbname, "osuser");
    assert_eq!(c.hosts.len(), 1);
    assert!(matches!(c.hosts[0].host, Host::Unix(_)));
    assert_eq!(c.hosts[0].port, 5432);
    assert_eq!(c.tls.mode, SslMode::Prefer);
    assert_eq!(c.connect_timeout, Duration::from_secs(10));
    assert_eq!(c.keepalives.unwrap().idle, Duration::from_secs(30));
    let c = parse("keepalives=0 tcp_user_timeout=5000", &[]).unwrap();
    assert!(c.keepalives.is_none());
    assert_eq!(c.tcp_user_timeout, Some(Duration::from_secs(5)));
    let c = parse(
        "keepalives_idle=5 keepalives_interval=2 keepalives_count=3",
        &[],
    )
    .unwrap();
    let k = c.keepalives.unwrap();
    assert_eq!(
        (k.idle, k.interval, k.count),
        (
            Duration::from_secs(5),
            Some(Duration::from_secs(2)),
            Some(3)
        )
    );
}

#[test]
fn unknown_and_unsupported_settings_are_named() {
    let err = parse("host=h colour=blue", &[]).unwrap_err().to_string();
    assert!(err.contains("`colour`"), "{err}");
    let err = parse("postgresql://h/d?service=prod", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`service`") && err.contains("pg_service.conf"),
        "{err}"
    );
    let err = parse("host=h sslmode=sometimes", &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`sslmode`") && err.contains("sometimes"),
        "{err}"
    );
    let err = parse("mysql://h/d", &[]).unwrap_err().to_string();
    assert!(err.contains("`mysql`"), "{err}");
    let err = parse("host=h port=99999", &[]).unwrap_err().to_string();
    assert!(err.contains("`port`") && err.contains("99999"), "{err}");
    let err = parse("host=h channel_binding=require", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("`channel_binding`"), "{err}");
}

/// A home directory with `.postgresql/` files, as libpq's defaults read them.
fn home_with(files: &[&str]) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join(".postgresql")).unwrap();
    for f in files {
        let path = home.path().join(".postgresql").join(f);
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    home
}

fn parse_home(s: &str, home: &tempfile::TempDir) -> Result<ConnInfo, PgError> {
    let home = home.path().to_str().unwrap().to_owned();
    let mut e = BTreeMap::new();
    e.insert("USER", "osuser");
    let home: &'static str = Box::leak(home.into_boxed_str());
    e.insert("HOME", home);
    ConnInfo::parse_with(s, &e)
}

#[test]
fn verify_modes_trust_only_the_root_file() {
    let empty = home_with(&[]);
    // No root file: verify-ca and verify-full are refused, with the fix.
    for mode in ["verify-ca", "verify-full"] {
        let err = parse_home(&format!("host=h sslmode={mode}"), &empty)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("root.crt")
                && err.contains("does not exist")
                && err.contains("sslrootcert=system"),
            "{err}"
        );
    }
    // An explicit file is the only trust anchor.
    let c = parse_home("host=h sslmode=verify-ca sslrootcert=/etc/hostname", &empty).unwrap();
    assert_eq!(c.tls.mode, SslMode::VerifyCa);
    assert_eq!(c.tls.roots, Some(RootCerts::File("/etc/hostname".into())));
    // require without a root file: no verification; with ~/.postgresql/root.crt the
    // chain is verified (libpq's rule), the host name not.
    let c = parse_home("host=h sslmode=require", &empty).unwrap();
    assert_eq!(c.tls.roots, None);
    let with_root = home_with(&["root.crt"]);
    let c = parse_home("host=h sslmode=require", &with_root).unwrap();
    assert_eq!(c.tls.mode, SslMode::Require);
    assert!(
        matches!(c.tls.roots, Some(RootCerts::File(ref p)) if p.ends_with(".postgresql/root.crt"))
    );
    let c = parse_home("host=h sslmode=disable", &with_root).unwrap();
    assert_eq!(c.tls.roots, None);
}

#[test]
fn sslrootcert_system_means_verify_full() {
    let c = parse("host=h sslrootcert=system", &[]).unwrap();
    assert_eq!(c.tls.mode, SslMode::VerifyFull);
    assert_eq!(c.tls.roots, Some(RootCerts::System));
    let c = parse("host=h sslrootcert=system sslmode=verify-full", &[]).unwrap();
    assert_eq!(c.tls.roots, Some(RootCerts::System));
    for weak in ["verify-ca", "require", "prefer", "disable"] {
        let err = parse(&format!("host=h sslrootcert=system sslmode={weak}"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(weak) && err.contains("verify-full"), "{err}");
    }
}

#[test]
fn client_certificate_from_the_string_or_the_default_files() {
    let empty = home_with(&[]);
    let c = parse_home("host=h", &empty).unwrap();
    assert_eq!(c.tls.client_cert, None);
    let err = parse_home("host=h sslcert=/nonexistent/c.crt", &empty)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`sslcert`") && err.contains("/nonexistent/c.crt"),
        "{err}"
    );
    let c = parse_home("host=h sslcert=/etc/hostname sslkey=/etc/k.key", &empty).unwrap();
    assert_eq!(
        c.tls.client_cert,
        Some(("/etc/hostname".into(), "/etc/k.key".into()))
    );
    let home = home_with(&["postgresql.crt", "postgresql.key"]);
    let c = parse_home("host=h sslmode=require", &home).unwrap();
    let (cert, key) = c.tls.client_cert.unwrap();
    assert!(cert.ends_with(".postgresql/postgresql.crt"));
    assert!(key.ends_with(".postgresql/postgresql.key"));
}

#[test]
fn password_file_supplies_a_missing_password_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgpass");
    std::fs::write(&file, "a:5432:app:u:pw-a\nb:5432:*:u:pw-b\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = format!("host=a,b,c dbname=app user=u passfile={}", file.display());
    let c = parse(&s, &[]).unwrap();
    let pws: Vec<Option<String>> = c.hosts.iter().map(|h| c.password_for(h)).collect();
    assert_eq!(pws, [Some("pw-a".into()), Some("pw-b".into()), None]);
    // A password in the string wins.
    let c = parse(&format!("{s} password=given"), &[]).unwrap();
    assert!(
        c.hosts
            .iter()
            .all(|h| c.password_for(h).as_deref() == Some("given"))
    );
    // PGPASSFILE names it too; ~/.pgpass is the default.
    let mut e = env(&[]);
    let path: &'static str = Box::leak(file.display().to_string().into_boxed_str());
    e.insert("PGPASSFILE", path);
    let c = ConnInfo::parse_with("host=a dbname=app user=u", &e).unwrap();
    assert_eq!(c.password_for(&c.hosts[0]).as_deref(), Some("pw-a"));
    let home = tempfile::tempdir().unwrap();
    std::fs::copy(&file, home.path().join(".pgpass")).unwrap();
    let home_s: &'static str = Box::leak(home.path().display().to_string().into_boxed_str());
    let mut e = env(&[]);
    e.insert("HOME", home_s);
    let c = ConnInfo::parse_with("host=b user=u", &e).unwrap();
    assert_eq!(c.password_for(&c.hosts[0]).as_deref(), Some("pw-b"));
}
