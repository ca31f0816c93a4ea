//! libpq connection strings: the URL form (`postgresql://user@host:5432/db?key=value`)
//! and the key/value form (`host=db port=5432 dbname=app`), the `PG*` environment
//! variables for every setting the string leaves out, libpq's defaults, and the
//! password file (`~/.pgpass`). The result, [`ConnInfo`], is what every walhook
//! connection is opened from: the replication connection and the SQL ones alike.
//!
//! Precedence is libpq's: the string, then the environment variable, then the
//! default. A setting libpq has but walhook cannot honour (a service file, GSSAPI,
//! encrypted client keys, ...) is refused by name rather than ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::PgError;

/// Session settings sent at start-up on every connection, so that values do not depend
/// on the server's defaults.
pub const SESSION_SETTINGS: [(&str, &str); 3] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("extra_float_digits", "3"),
];

/// How long connecting may take when the string sets no `connect_timeout` (libpq waits
/// forever; a daemon must not hang on a server that accepts TCP and never answers).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive idle time when the string sets none (the kernel's 2 h default would
/// leave a dead peer unnoticed for hours).
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);

/// Every key walhook accepts, with the environment variable that supplies it when the
/// string does not (libpq's names).
const KEYS: &[(&str, Option<&str>)] = &[
    ("host", Some("PGHOST")),
    ("hostaddr", Some("PGHOSTADDR")),
    ("port", Some("PGPORT")),
    ("dbname", Some("PGDATABASE")),
    ("user", Some("PGUSER")),
    ("password", Some("PGPASSWORD")),
    ("passfile", Some("PGPASSFILE")),
    ("options", Some("PGOPTIONS")),
    ("application_name", Some("PGAPPNAME")),
    ("fallback_application_name", None),
    ("connect_timeout", Some("PGCONNECT_TIMEOUT")),
    ("client_encoding", Some("PGCLIENTENCODING")),
    ("keepalives", None),
    ("keepalives_idle", None),
    ("keepalives_interval", None),
    ("keepalives_count", None),
    ("tcp_user_timeout", None),
    ("target_session_attrs", Some("PGTARGETSESSIONATTRS")),
    ("load_balance_hosts", Some("PGLOADBALANCEHOSTS")),
    ("sslmode", Some("PGSSLMODE")),
    ("sslrootcert", Some("PGSSLROOTCERT")),
    ("sslcert", Some("PGSSLCERT")),
    ("sslkey", Some("PGSSLKEY")),
    ("sslsni", Some("PGSSLSNI")),
    ("sslcompression", None),
    ("channel_binding", Some("PGCHANNELBINDING")),
    ("gssencmode", Some("PGGSSENCMODE")),
];

/// libpq settings walhook refuses, with what to do instead.
const REFUSED: &[(&str, &str)] = &[
    (
        "service",
        "service files (pg_service.conf) are not read; put the settings in the string",
    ),
    (
        "sslpassword",
        "encrypted client keys are not supported; give an unencrypted key in sslkey (mode 0600)",
    ),
    (
        "sslcrl",
        "certificate revocation lists are not supported; remove sslcrl",
    ),
    (
        "sslcrldir",
        "certificate revocation lists are not supported; remove sslcrldir",
    ),
    ("krbsrvname", "Kerberos/GSSAPI is not supported"),
    ("gsslib", "Kerberos/GSSAPI is not supported"),
    (
        "requirepeer",
        "requirepeer is not supported; use a TCP host or peer authentication in pg_hba.conf",
    ),
    (
        "require_auth",
        "require_auth is not supported; restrict methods in pg_hba.conf",
    ),
    (
        "replication",
        "walhook opens its replication connection itself; remove replication",
    ),
    (
        "sslcertmode",
        "sslcertmode is not supported; name the client certificate in sslcert",
    ),
    (
        "ssl_min_protocol_version",
        "walhook negotiates TLS 1.2 or 1.3; remove ssl_min_protocol_version",
    ),
    (
        "ssl_max_protocol_version",
        "walhook negotiates TLS 1.2 or 1.3; remove ssl_max_protocol_version",
    ),
];

/// How a connection negotiates TLS, as libpq's `sslmode` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Plain TCP only (`disable`; `allow` is treated the same: walhook never retries a
    /// refused plain connection with TLS).
    Disable,
    /// TLS when the server offers it.
    Prefer,
    /// TLS required; the certificate is verified only when a root certificate file
    /// exists (libpq's rule).
    Require,
    /// TLS required, certificate chain verified against `sslrootcert`.
    VerifyCa,
    /// TLS required, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, PgError> {
        Ok(match value {
            "disable" | "allow" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(PgError::invalid(
                    "sslmode",
                    format!(
                        "`{other}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                    ),
                ));
            }
        })
    }
}

/// Where the trusted roots come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    /// A PEM file: only its certificates are trusted.
    File(PathBuf),
    /// `sslrootcert=system`: the operating system's trusted roots.
    System,
}

/// The TLS settings of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// The roots to verify the server against: `sslrootcert`, or
    /// `~/.postgresql/root.crt` when that file exists. `None` with `require` or
    /// `prefer` means the certificate is not verified (libpq's behaviour).
    pub roots: Option<RootCerts>,
    /// A client certificate and its key: `sslcert`/`sslkey`, or
    /// `~/.postgresql/postgresql.crt` and `.key` when the certificate file exists.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Send the host name in the TLS handshake (`sslsni`, default on).
    pub sni: bool,
}

/// One host to try, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSpec {
    pub host: Host,
    /// `hostaddr`: the address to connect to; `host` stays the name TLS verifies.
    pub hostaddr: Option<IpAddr>,
    pub port: u16,
}

/// Where a host is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A Unix-domain socket directory.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(dir) => write!(f, "{}", dir.display()),
        }
    }
}

/// Which server a session may land on (`target_session_attrs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetSession {
    Any,
    ReadWrite,
    ReadOnly,
}

/// A parsed connection string with the environment and defaults applied: everything
/// needed to open a connection. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub hosts: Vec<HostSpec>,
    pub user: String,
    /// `password` or `PGPASSWORD`.
    password: Option<String>,
    /// The password file read when no password is given: `passfile`, `PGPASSFILE`, or
    /// `~/.pgpass`. Read at each connect, as libpq does, so a rotated password is used
    /// without a restart.
    passfile: Option<PathBuf>,
    pub dbname: String,
    /// `options`, sent at start-up (walhook's session settings are added to it).
    pub options: Option<String>,
    pub application_name: Option<String>,
    pub connect_timeout: Duration,
    /// TCP keepalives: `None` when `keepalives=0`.
    pub keepalives: Option<Keepalives>,
    pub tcp_user_timeout: Option<Duration>,
    pub target_session: TargetSession,
    /// `load_balance_hosts=random`: try the hosts in random order.
    pub random_hosts: bool,
    pub tls: TlsSettings,
}

/// TCP keepalive settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalives {
    pub idle: Duration,
    pub interval: Option<Duration>,
    pub count: Option<u32>,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({self})")
    }
}

impl fmt::Display for ConnInfo {
    /// `user@host:port/db` (each host when there are several), never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@", self.user)?;
        for (i, h) in self.hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match &h.host {
                Host::Tcp(name) if name.contains(':') => write!(f, "[{name}]:{}", h.port)?,
                host => write!(f, "{host}:{}", h.port)?,
            }
        }
        write!(f, "/{}", self.dbname)
    }
}

/// Where the settings the string leaves out come from: the process environment, or a
/// fixed map in tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment, with `$HOME` and the OS user for libpq's defaults.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        match std::env::var(name) {
            Ok(v) => Some(v),
            Err(_) if name == "USER" => os_user(),
            Err(_) => None,
        }
    }
}

impl Env for BTreeMap<&str, &str> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).map(|v| (*v).to_owned())
    }
}

/// The name of the effective OS user, as libpq's default `user`.
fn os_user() -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or null; it is read at
    // once, before any other call that could overwrite it.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return None;
        }
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_str()
            .ok()
            .map(str::to_owned)
    }
}

impl ConnInfo {
    /// Parses a connection string (URL or key/value form; empty means libpq's
    /// defaults) with the process environment.
    pub fn parse(conn: &str) -> Result<ConnInfo, PgError> {
        Self::parse_with(conn, &ProcessEnv)
    }

    /// Like [`ConnInfo::parse`], reading `PG*`, `HOME` and `USER` from `env`.
    pub fn parse_with(conn: &str, env: &dyn Env) -> Result<ConnInfo, PgError> {
        let trimmed = conn.trim();
        let given = if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
            super::syntax::parse_url(trimmed)?
        } else if trimmed.contains("://") {
            let scheme = trimmed.split("://").next().unwrap_or_default();
            return Err(PgError::Syntax(format!(
                "URL scheme `{scheme}` is not supported: use postgresql://user@host:5432/dbname or key/value settings such as `host=db dbname=app`"
            )));
        } else {
            super::syntax::parse_key_values(trimmed)?
        };
        let mut settings = BTreeMap::new();
        for (key, value) in given {
            if let Some((_, why)) = REFUSED.iter().find(|(k, _)| *k == key) {
                return Err(PgError::invalid(&key, (*why).to_owned()));
            }
            if !KEYS.iter().any(|(k, _)| *k == key) {
                return Err(PgError::invalid(
                    &key,
                    "is not a connection setting walhook knows (see libpq's parameter keywords)"
                        .to_owned(),
                ));
            }
            settings.insert(key, value);
        }
        for (key, var) in KEYS {
            if let Some(var) = var
                && !settings.contains_key(*key)
                && let Some(value) = env.var(var).filter(|v| !v.is_empty())
            {
                settings.insert((*key).to_owned(), value);
            }
        }
        Self::from_settings(&settings, env)
    }

    fn from_settings(s: &BTreeMap<String, String>, env: &dyn Env) -> Result<ConnInfo, PgError> {
        let get = |k: &str| s.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let home = env.var("HOME").map(PathBuf::from);
        let user = match get("user") {
            Some(u) => u.to_owned(),
            None => env.var("USER").ok_or_else(|| {
                PgError::invalid(
                    "user",
                    "is not set and the OS user is unknown: set user= or PGUSER".to_owned(),
                )
            })?,
        };
        let dbname = get("dbname").unwrap_or(&user).to_owned();

        match get("client_encoding") {
            None | Some("UTF8" | "utf8" | "UTF-8" | "utf-8" | "auto") => {}
            Some(other) => {
                return Err(PgError::invalid(
                    "client_encoding",
                    format!("`{other}`: walhook always uses UTF8; remove client_encoding"),
                ));
            }
        }
        match get("gssencmode") {
            None | Some("disable" | "prefer") => {}
            Some(other) => {
                return Err(PgError::invalid(
                    "gssencmode",
                    format!("`{other}`: GSSAPI encryption is not supported; use TLS (sslmode)"),
                ));
            }
        }
        match get("channel_binding") {
            None | Some("disable" | "prefer") => {}
            Some(other) => {
                return Err(PgError::invalid(
                    "channel_binding",
                    format!(
                        "`{other}` is not supported (disable or prefer); sslmode=verify-full ties the session to the server's certificate"
                    ),
                ));
            }
        }

        let connect_timeout = match get("connect_timeout") {
            // libpq: 0 or absent waits forever; walhook keeps a bound, and libpq's
            // minimum of 2 s.
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(v) => match seconds("connect_timeout", v)? {
                0 => DEFAULT_CONNECT_TIMEOUT,
                n => Duration::from_secs(n.max(2)),
            },
        };
        let keepalives = match get("keepalives") {
            Some("0") => None,
            None | Some("1") => Some(Keepalives {
                idle: match get("keepalives_idle") {
                    Some(v) => Duration::from_secs(seconds("keepalives_idle", v)?.max(1)),
                    None => DEFAULT_KEEPALIVES_IDLE,
                },
                interval: get("keepalives_interval")
                    .map(|v| {
                        seconds("keepalives_interval", v).map(|n| Duration::from_secs(n.max(1)))
                    })
                    .transpose()?,
                count: get("keepalives_count")
                    .map(|v| {
                        v.parse::<u32>().map_err(|_| {
                            PgError::invalid("keepalives_count", format!("`{v}` is not a count"))
                        })
                    })
                    .transpose()?,
            }),
            Some(other) => {
                return Err(PgError::invalid(
                    "keepalives",
                    format!("`{other}` is not 0 or 1"),
                ));
            }
        };
        let tcp_user_timeout = match get("tcp_user_timeout") {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(0) => None,
                Ok(ms) => Some(Duration::from_millis(ms)),
                Err(_) => {
                    return Err(PgError::invalid(
                        "tcp_user_timeout",
                        format!("`{v}` is not a number of milliseconds"),
                    ));
                }
            },
        };
        let target_session = choice(
            "target_session_attrs",
            get("target_session_attrs"),
            TargetSession::Any,
            &[
                ("any", TargetSession::Any),
                ("read-write", TargetSession::ReadWrite),
                ("primary", TargetSession::ReadWrite),
                ("read-only", TargetSession::ReadOnly),
                ("standby", TargetSession::ReadOnly),
            ],
        )?;
        let random_hosts = choice(
            "load_balance_hosts",
            get("load_balance_hosts"),
            false,
            &[("disable", false), ("random", true)],
        )?;
        let sni = choice("sslsni", get("sslsni"), true, &[("1", true), ("0", false)])?;
        let tls = tls_settings(
            get("sslmode"),
            get("sslrootcert"),
            get("sslcert"),
            get("sslkey"),
            home.as_deref(),
            sni,
        )?;

        let hosts = host_specs(get("host"), get("hostaddr"), get("port"))?;
        let passfile = get("passfile")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".pgpass")));

        Ok(ConnInfo {
            hosts,
            user,
            password: get("password").map(str::to_owned),
            passfile,
            dbname,
            options: get("options").map(str::to_owned),
            application_name: get("application_name")
                .or(get("fallback_application_name"))
                .map(str::to_owned),
            connect_timeout,
            keepalives,
            tcp_user_timeout,
            target_session,
            random_hosts,
            tls,
        })
    }

    /// The password for `host`: the string's or `PGPASSWORD`, else the password
    /// file's entry for this host, port, database and user.
    pub fn password_for(&self, host: &HostSpec) -> Option<String> {
        self.password.clone().or_else(|| {
            self.passfile
                .as_deref()
                .and_then(|f| super::pgpass::lookup(f, host, &self.dbname, &self.user))
        })
    }

    /// The hosts in the order to try them (shuffled with `load_balance_hosts=random`).
    pub fn hosts_in_order(&self) -> Vec<&HostSpec> {
        let mut hosts: Vec<&HostSpec> = self.hosts.iter().collect();
        if self.random_hosts {
            fastrand::shuffle(&mut hosts);
        }
        hosts
    }

    /// The `options` start-up parameter: the string's options followed by walhook's
    /// session settings.
    pub fn startup_options(&self) -> String {
        let mut options = self.options.clone().unwrap_or_default();
        for (name, value) in SESSION_SETTINGS {
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={value}"));
        }
        options
    }

    /// The application name a connection reports: the string's, else `fallback`.
    pub fn application_name_or<'a>(&'a self, fallback: &'a str) -> &'a str {
        self.application_name.as_deref().unwrap_or(fallback)
    }
}

/// The value of `key` among `options` (keyword, meaning), `default` when unset.
fn choice<T: Copy>(
    key: &str,
    value: Option<&str>,
    default: T,
    options: &[(&str, T)],
) -> Result<T, PgError> {
    let Some(value) = value else {
        return Ok(default);
    };
    options
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
            PgError::invalid(key, format!("`{value}` is not one of {}", names.join(", ")))
        })
}

fn seconds(key: &str, v: &str) -> Result<u64, PgError> {
    v.trim()
        .parse::<u64>()
        .map_err(|_| PgError::invalid(key, format!("`{v}` is not a whole number of seconds")))
}

/// The TLS settings from `sslmode`, `sslrootcert`, `sslcert` and `sslkey`, with
/// libpq's defaults and rules:
/// - `sslrootcert` defaults to `~/.postgresql/root.crt`; `verify-ca` and
///   `verify-full` need it to exist and trust only its certificates;
/// - `sslrootcert=system` trusts the system roots and needs `verify-full` (the default
///   `sslmode` then);
/// - with `require` (or `prefer`), an existing root file makes the chain verified too;
/// - `sslcert` defaults to `~/.postgresql/postgresql.crt`, used when it exists, with
///   `sslkey` (default `~/.postgresql/postgresql.key`).
fn tls_settings(
    mode: Option<&str>,
    rootcert: Option<&str>,
    cert: Option<&str>,
    key: Option<&str>,
    home: Option<&Path>,
    sni: bool,
) -> Result<TlsSettings, PgError> {
    let pgdir = home.map(|h| h.join(".postgresql"));
    let explicit_mode = mode.map(SslMode::parse).transpose()?;
    let (mode, roots) = if rootcert == Some("system") {
        match explicit_mode {
            None | Some(SslMode::VerifyFull) => (SslMode::VerifyFull, Some(RootCerts::System)),
            Some(_) => {
                return Err(PgError::invalid(
                    "sslmode",
                    format!(
                        "`{}` may not be used with sslrootcert=system: the system roots trust any public CA, so the host name must be checked too. Fix: use sslmode=verify-full",
                        mode.unwrap_or_default()
                    ),
                ));
            }
        }
    } else {
        let mode = explicit_mode.unwrap_or(SslMode::Prefer);
        let path = rootcert
            .map(PathBuf::from)
            .or_else(|| pgdir.as_ref().map(|d| d.join("root.crt")));
        let exists = path.as_ref().is_some_and(|p| p.exists());
        let roots = match mode {
            SslMode::Disable => None,
            SslMode::VerifyCa | SslMode::VerifyFull if !exists => {
                let shown = path
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "~/.postgresql/root.crt".to_owned());
                return Err(PgError::invalid(
                    "sslrootcert",
                    format!(
                        "root certificate file `{shown}` does not exist; sslmode={} verifies the server against it. Fix: name the CA file in sslrootcert, use sslrootcert=system for the system's trusted roots, or use sslmode=require",
                        mode.name()
                    ),
                ));
            }
            _ if exists => path.map(RootCerts::File),
            _ => None,
        };
        (mode, roots)
    };
    let cert_path = cert
        .map(PathBuf::from)
        .or_else(|| pgdir.as_ref().map(|d| d.join("postgresql.crt")));
    let client_cert = match cert_path {
        Some(c) if mode != SslMode::Disable && c.exists() => {
            let k = key
                .map(PathBuf::from)
                .or_else(|| pgdir.as_ref().map(|d| d.join("postgresql.key")))
                .ok_or_else(|| {
                    PgError::invalid("sslkey", "is not set and $HOME is unknown".to_owned())
                })?;
            Some((c, k))
        }
        Some(c) if cert.is_some() && mode != SslMode::Disable => {
            return Err(PgError::invalid(
                "sslcert",
                format!(
                    "certificate file `{}` does not exist. Fix: correct the path or remove sslcert",
                    c.display()
                ),
            ));
        }
        _ => None,
    };
    Ok(TlsSettings {
        mode,
        roots,
        client_cert,
        sni,
    })
}

impl SslMode {
    /// The `sslmode` keyword.
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The hosts to try: `host`, `hostaddr` and `port` are comma-separated lists; `port`
/// may hold one value for all hosts. No host means the local Unix socket.
fn host_specs(
    host: Option<&str>,
    hostaddr: Option<&str>,
    port: Option<&str>,
) -> Result<Vec<HostSpec>, PgError> {
    let names: Vec<&str> = match (host, hostaddr) {
        (Some(h), _) => h.split(',').map(str::trim).collect(),
        (None, Some(a)) => a.split(',').map(|_| "").collect(),
        (None, None) => vec![""],
    };
    let addrs: Vec<Option<IpAddr>> = match hostaddr {
        None => vec![None; names.len()],
        Some(a) => {
            let list: Vec<&str> = a.split(',').map(str::trim).collect();
            if list.len() != names.len() {
                return Err(PgError::invalid(
                    "hostaddr",
                    format!(
                        "lists {} addresses for {} hosts; give one per host",
                        list.len(),
                        names.len()
                    ),
                ));
            }
            list.into_iter()
                .map(|a| {
                    if a.is_empty() {
                        return Ok(None);
                    }
                    a.parse().map(Some).map_err(|_| {
                        PgError::invalid("hostaddr", format!("`{a}` is not an IP address"))
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    let ports: Vec<u16> = match port {
        None => vec![5432; names.len()],
        Some(p) => {
            let list = p
                .split(',')
                .map(|v| match v.trim() {
                    "" => Ok(5432),
                    v => v.parse::<u16>().ok().filter(|n| *n > 0).ok_or_else(|| {
                        PgError::invalid("port", format!("`{v}` is not a port number"))
                    }),
                })
                .collect::<Result<Vec<u16>, _>>()?;
            match list.len() {
                1 => vec![list[0]; names.len()],
                n if n == names.len() => list,
                n => {
                    return Err(PgError::invalid(
                        "port",
                        format!(
                            "lists {n} ports for {} hosts; give one port, or one per host",
                            names.len()
                        ),
                    ));
                }
            }
        }
    };
    Ok(names
        .into_iter()
        .zip(addrs)
        .zip(ports)
        .map(|((name, hostaddr), port)| HostSpec {
            host: match name {
                "" if hostaddr.is_some() => Host::Tcp(hostaddr.unwrap().to_string()),
                "" => Host::Unix(default_socket_dir()),
                n if n.starts_with('/') => Host::Unix(PathBuf::from(n)),
                n => Host::Tcp(n.to_owned()),
            },
            hostaddr,
            port,
        })
        .collect())
}

/// libpq's default socket directory as Debian and most distributions build it, else
/// `/tmp` (the upstream default).
fn default_socket_dir() -> PathBuf {
    let debian = Path::new("/var/run/postgresql");
    if debian.is_dir() {
        debian.to_owned()
    } else {
        PathBuf::from("/tmp")
    }
}

#[cfg(test)]
#[path = "conninfo_tests.rs"]
mod tests;
