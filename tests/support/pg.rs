//! A throwaway PostgreSQL cluster for the integration tests: found on the machine,
//! initialised into a temporary directory with logical replication, TLS and per-role
//! authentication methods, started lazily, and stopped and removed when the test
//! process exits.
//!
//! All tests share one cluster ([`cluster`]) and isolate themselves with a fresh
//! database each ([`create_db`]). A test that stops or restarts PostgreSQL must start
//! its own cluster ([`Cluster::start`]) so that it does not disturb the others; so must
//! one that needs other server settings ([`Cluster::start_with`]). Stops and restarts
//! are timed; one slower than [`STOP_LIMIT`] fails the test (G9), naming what was
//! attached to the server.
//!
//! Authentication over TCP (127.0.0.1) is `trust` unless a role belongs to one of the
//! groups below, which [`Cluster::create_role`] sets up:
//!
//! | [`Auth`]          | group                  | pg_hba method                      |
//! |-------------------|------------------------|------------------------------------|
//! | `Trust`           | none                   | `trust`                            |
//! | `Md5`             | `walhook_auth_md5`     | `md5` (md5-hashed password)        |
//! | `Scram`           | `walhook_auth_scram`   | `scram-sha-256`                    |
//! | `Password`        | `walhook_auth_password`| `password` (cleartext)             |
//! | `TlsScram`        | `walhook_auth_tls`     | `hostssl` + `scram-sha-256`, plain TCP rejected |
//! | `Cert`            | `walhook_auth_cert`    | `hostssl` + `cert clientcert=verify-full` ([`Cluster::client_cert`]) |
//!
//! The same rules apply to replication connections (`replication=database`).

mod setup;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

use setup::{Layout, read_log_tail, spawn_postgres, wait_ready};
pub use setup::{bin_dir, pg_bin};

/// The address the server listens on.
const HOST: &str = "127.0.0.1";
/// The superuser created by initdb; it connects with `trust`.
const SUPERUSER: &str = "postgres";

// ---------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------

/// How to stop the server in [`Cluster::stop`] and [`Cluster::restart`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: disconnect clients, checkpoint, exit cleanly.
    Fast,
    /// SIGQUIT: exit at once without a checkpoint, like a crash; the next start runs
    /// crash recovery.
    Immediate,
}

/// How a role made by [`Cluster::create_role`] must authenticate over TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No password needed.
    Trust,
    /// `md5` method; the password is stored md5-hashed.
    Md5,
    /// `scram-sha-256` method.
    Scram,
    /// `password` method: the client sends the password in cleartext.
    Password,
    /// `scram-sha-256`, and only over TLS (`hostssl`); plain TCP is rejected.
    TlsScram,
    /// A client certificate whose common name is the role (`cert
    /// clientcert=verify-full`), only over TLS.
    Cert,
}

impl Auth {
    /// The group whose members pg_hba.conf forces to this method.
    fn group(self) -> Option<&'static str> {
        match self {
            Auth::Trust => None,
            Auth::Md5 => Some("walhook_auth_md5"),
            Auth::Scram => Some("walhook_auth_scram"),
            Auth::Password => Some("walhook_auth_password"),
            Auth::TlsScram => Some("walhook_auth_tls"),
            Auth::Cert => Some("walhook_auth_cert"),
        }
    }

    /// `password_encryption` used when storing the role's password.
    fn password_encryption(self) -> &'static str {
        match self {
            Auth::Md5 => "md5",
            _ => "scram-sha-256",
        }
    }
}

/// A login role made by [`Cluster::create_role`] (with `LOGIN REPLICATION`).
#[derive(Debug, Clone)]
pub struct Role {
    /// Role name, unique in the cluster.
    pub name: String,
    /// Its password.
    pub password: String,
    /// How it must authenticate.
    pub auth: Auth,
}

/// A running PostgreSQL cluster in a temporary directory.
///
/// Cloning shares the same server. A cluster from [`Cluster::start`] is stopped and its
/// directory removed when the last clone is dropped; the shared one from [`cluster`]
/// when the process exits.
#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

struct Inner {
    port: u16,
    layout: Layout,
    ca_cert_der: CertificateDer<'static>,
    child: Mutex<Option<Child>>,
    next_id: AtomicU64,
}

/// The cluster shared by every test in the process, started on first use.
///
/// Panics (in every test that asks, with the same message) if it cannot start.
pub fn cluster() -> &'static Cluster {
    static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        let cluster = Cluster::try_start()?;
        SHARED_FOR_EXIT
            .set(cluster.clone())
            .unwrap_or_else(|_| unreachable!("the shared cluster starts once"));
        // SAFETY: registers a plain `extern "C" fn` that never unwinds.
        unsafe { libc::atexit(stop_shared_cluster_at_exit) };
        Ok(cluster)
    });
    match shared {
        Ok(cluster) => cluster,
        Err(message) => panic!("test PostgreSQL cluster did not start: {message}"),
    }
}

/// A fresh database in the shared [`cluster`].
/// A fresh database with `users (id int PRIMARY KEY, email text, n int)`.
pub async fn users_db() -> TestDb {
    let db = create_db().await;
    db.batch("CREATE TABLE users (id int PRIMARY KEY, email text, n int)")
        .await;
    db
}

pub async fn create_db() -> TestDb {
    cluster().create_db().await
}

static SHARED_FOR_EXIT: OnceLock<Cluster> = OnceLock::new();

/// libtest leaves `main` (or calls `process::exit`) when all tests are done; both run
/// atexit handlers. Stops the shared server and removes its directory.
extern "C" fn stop_shared_cluster_at_exit() {
    if let Some(cluster) = SHARED_FOR_EXIT.get() {
        // A panic must not unwind out of an `extern "C"` fn.
        let _ = std::panic::catch_unwind(|| cluster.0.shut_down());
    }
}

impl Cluster {
    /// Starts a cluster of its own (for tests that stop or restart PostgreSQL). Blocks
    /// for a second or two. Panics naming the cause if it cannot start.
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Like [`Cluster::start`], with server `settings` (`name`, `value`) that override
    /// the harness defaults, e.g. `&[("wal_level", "replica")]`. Values are written to
    /// postgresql.conf as quoted strings.
    pub fn start_with(settings: &[(&str, &str)]) -> Cluster {
        Cluster::try_start_with(settings)
            .unwrap_or_else(|message| panic!("test PostgreSQL cluster did not start: {message}"))
    }

    fn try_start() -> Result<Cluster, String> {
        Cluster::try_start_with(&[])
    }

    fn try_start_with(settings: &[(&str, &str)]) -> Result<Cluster, String> {
        let launched = setup::launch(settings)?;
        Ok(Cluster(Arc::new(Inner {
            port: launched.port,
            layout: launched.layout,
            ca_cert_der: launched.ca_cert_der,
            child: Mutex::new(Some(launched.child)),
            next_id: AtomicU64::new(1),
        })))
    }

    /// TCP port the server listens on (at [`Cluster::host`]); kept across restarts.
    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// Host the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        HOST
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`: the superuser in the `postgres`
    /// database.
    pub fn admin_url(&self) -> String {
        self.url("postgres")
    }

    /// URL of database `db` for the superuser (trust auth, no TLS needed).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@{HOST}:{}/{db}", self.0.port)
    }

    /// Data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.0.layout.data_dir
    }

    /// Directory of the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.0.layout.socket_dir
    }

    /// The server's log file (stdout and stderr of `postgres`).
    pub fn log_path(&self) -> &Path {
        &self.0.layout.log_path
    }

    /// PEM file of the CA that signed the server certificate (valid for `localhost`
    /// and `127.0.0.1`); pass it as `sslrootcert` for `verify-ca` / `verify-full`.
    pub fn ca_cert_path(&self) -> &Path {
        &self.0.layout.ca_cert_path
    }

    /// A client certificate and key for `user`, signed by this cluster's CA (which the
    /// server trusts for client certificates), written into `dir`.
    pub fn client_cert(&self, user: &str, dir: &Path) -> (PathBuf, PathBuf) {
        setup::issue_client_cert(&self.0.layout, user, dir)
            .unwrap_or_else(|e| panic!("client certificate for {user}: {e}"))
    }

    /// DER of the same CA certificate.
    pub fn ca_cert_der(&self) -> CertificateDer<'static> {
        self.0.ca_cert_der.clone()
    }

    /// A tokio-postgres TLS connector (rustls) that trusts only this cluster's CA.
    pub fn tls_connector(&self) -> MakeRustlsConnect {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca_cert_der())
            .expect("the test CA certificate is valid");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        MakeRustlsConnect::new(config)
    }

    /// Connects as the superuser to the `postgres` database. Panics on failure.
    pub async fn admin_client(&self) -> Client {
        connect(&self.admin_url())
            .await
            .unwrap_or_else(|err| panic!("connect to {}: {err}", self.admin_url()))
    }

    /// Creates a fresh, empty database with a unique name.
    pub async fn create_db(&self) -> TestDb {
        let name = format!(
            "walhook_test_{}",
            self.0.next_id.fetch_add(1, Ordering::Relaxed)
        );
        self.admin_client()
            .await
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .unwrap_or_else(|err| panic!("CREATE DATABASE {name}: {err}"));
        TestDb {
            name,
            port: self.0.port,
            cluster: self.clone(),
        }
    }

    /// Creates a login role with `LOGIN REPLICATION`, a unique name
    /// (`{prefix}_{n}`, prefix from `auth`), `password`, and membership in the group
    /// that forces `auth` (see the module docs). Give it further rights with
    /// [`Cluster::admin_client`] or [`TestDb::batch`].
    pub async fn create_role(&self, auth: Auth, password: &str) -> Role {
        let prefix = match auth {
            Auth::Trust => "trust_user",
            Auth::Md5 => "md5_user",
            Auth::Scram => "scram_user",
            Auth::Password => "pw_user",
            Auth::TlsScram => "tls_user",
            Auth::Cert => "cert_user",
        };
        let name = format!(
            "{prefix}_{}",
            self.0.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let in_role = auth
            .group()
            .map(|group| format!(" IN ROLE {group}"))
            .unwrap_or_default();
        let sql = format!(
            "SET password_encryption = '{}'; CREATE ROLE {} LOGIN REPLICATION PASSWORD {}{in_role}",
            auth.password_encryption(),
            quote_ident(&name),
            quote_literal(password),
        );
        self.admin_client()
            .await
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|err| panic!("create role {name} ({auth:?}): {err}"));
        Role {
            name,
            password: password.to_owned(),
            auth,
        }
    }

    /// Stops the server, waits until it has exited, and returns how long that took.
    /// Blocks the calling thread. Only for clusters of one's own ([`Cluster::start`]).
    ///
    /// Panics when the server was not running, or when it took longer than
    /// [`STOP_LIMIT`] to exit (G9: nothing attached may hold a shutdown up): the message
    /// gives the time and the processes still attached to the server. The server is
    /// forced down (SIGQUIT, then SIGKILL) before the panic, so the cleanup still runs.
    pub fn stop(&self, mode: StopMode) -> Duration {
        match self.try_stop(mode) {
            Ok(elapsed) => elapsed,
            Err(slow) => panic!("{slow}"),
        }
    }

    /// Begins a smart shutdown (SIGTERM) and returns at once: the server refuses new
    /// connections ("the database system is shutting down", 57P03) but waits for the
    /// open sessions to end. Finish it with [`Cluster::stop`] (fast).
    pub fn begin_smart_stop(&self) {
        let child = self.0.lock_child();
        let child = child
            .as_ref()
            .expect("begin a smart stop: PostgreSQL is not running");
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }

    /// Like [`Cluster::stop`], but a stop slower than [`STOP_LIMIT`] is returned as an
    /// error (the server forced down) instead of a panic.
    pub fn try_stop(&self, mode: StopMode) -> Result<Duration, SlowStop> {
        self.0
            .stop(mode)
            .unwrap_or_else(|| panic!("stop PostgreSQL ({mode:?}): it was not running"))
    }

    /// Starts a stopped server again on the same port and data directory, waits until
    /// it accepts connections, and returns how long that took. Blocks the calling
    /// thread.
    pub fn start_again(&self) -> Duration {
        let begun = Instant::now();
        let mut child = self.0.lock_child();
        assert!(child.is_none(), "start PostgreSQL: it is already running");
        let mut started = spawn_postgres(&self.0.layout, self.0.port)
            .unwrap_or_else(|message| panic!("start PostgreSQL again: {message}"));
        if let Err(message) = wait_ready(&self.0.layout, self.0.port, &mut started) {
            let _ = started.kill();
            let _ = started.wait();
            panic!(
                "start PostgreSQL again: {message}{}",
                read_log_tail(&self.0.layout.log_path)
            );
        }
        *child = Some(started);
        begun.elapsed()
    }

    /// [`Cluster::stop`] then [`Cluster::start_again`] (same port, same data); returns
    /// the time both took. Panics like [`Cluster::stop`] on a slow stop.
    pub fn restart(&self, mode: StopMode) -> Duration {
        let stopped = self.stop(mode);
        stopped + self.start_again()
    }

    /// Like [`Cluster::restart`], but a slow stop is returned as an error after the
    /// server (forced down) was started again, so that a long test can go on and
    /// report it at the end.
    pub fn try_restart(&self, mode: StopMode) -> Result<Duration, SlowStop> {
        let stopped = self.try_stop(mode);
        let started = self.start_again();
        stopped.map(|stopped| stopped + started)
    }
}

/// The longest a stop may take (G9 allows a `pg_ctl stop -m fast` no longer with
/// walhook attached than with `pg_recvlogical`, which takes well under a second).
pub const STOP_LIMIT: Duration = Duration::from_secs(5);

/// A stop that took longer than [`STOP_LIMIT`]: the server had to be forced down.
#[derive(Debug, Clone)]
pub struct SlowStop {
    /// How the stop was asked for.
    pub mode: StopMode,
    /// Until the server exited (forced by SIGQUIT or SIGKILL after [`STOP_LIMIT`]).
    pub elapsed: Duration,
    /// The server's child processes at [`STOP_LIMIT`] (pid and process title: a
    /// `walsender` line names the client holding the shutdown up), and its log tail.
    pub attached: String,
}

impl std::fmt::Display for SlowStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PostgreSQL stop ({:?}) did not finish within {STOP_LIMIT:?} (forced down after {:?}); \
             processes still attached then:\n{}",
            self.mode, self.elapsed, self.attached
        )
    }
}

impl Inner {
    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signals the postmaster and waits for it. If it has not exited after
    /// [`STOP_LIMIT`], lists what is attached, forces it down (SIGQUIT, then SIGKILL)
    /// and returns a [`SlowStop`]. `None` if it was not running.
    fn stop(&self, mode: StopMode) -> Option<Result<Duration, SlowStop>> {
        let mut child = self.lock_child().take()?;
        let begun = Instant::now();
        let signal = match mode {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        };
        if wait_after_signal(&mut child, signal, STOP_LIMIT) {
            return Some(Ok(begun.elapsed()));
        }
        // The clients refused meanwhile are noise next to what held the stop up.
        let log: Vec<String> = read_log_tail(&self.layout.log_path)
            .lines()
            .filter(|line| !line.contains("the database system is shutting down"))
            .map(str::to_owned)
            .collect();
        let attached = format!("{}{}", child_processes(child.id()), log.join("\n"));
        if !wait_after_signal(&mut child, libc::SIGQUIT, Duration::from_secs(10)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        Some(Err(SlowStop {
            mode,
            elapsed: begun.elapsed(),
            attached,
        }))
    }

    /// Stops the server (fast) and removes the cluster's directory. Never panics.
    fn shut_down(&self) {
        let _ = self.stop(StopMode::Fast);
        let _ = fs::remove_dir_all(&self.layout.root);
    }
}

/// Sends `signal` to `child` and waits up to `grace` for it to exit.
fn wait_after_signal(child: &mut Child, signal: i32, grace: Duration) -> bool {
    // SAFETY: kill(2) on our own child, which has not been reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `pid title` of every child of `parent` (the postmaster), one a line, from /proc:
/// PostgreSQL puts the backend kind, user, client address and state in the title
/// (`postgres: walsender postgres 127.0.0.1(40000) START_REPLICATION`).
fn child_processes(parent: u32) -> String {
    let Ok(entries) = fs::read_dir("/proc") else {
        return "(cannot read /proc)\n".to_owned();
    };
    let mut lines = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the parenthesised command: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let title = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
            .unwrap_or_default();
        lines.push(format!("  {pid} {}", title.trim_end()));
    }
    if lines.is_empty() {
        return "  (none)\n".to_owned();
    }
    lines.sort();
    lines.join("\n") + "\n"
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shut_down();
    }
}

// ---------------------------------------------------------------------------------------
// A database per test
// ---------------------------------------------------------------------------------------

/// A database of its own for one test. Dropping it leaves the database in place (the
/// cluster is removed at exit anyway).
pub struct TestDb {
    /// Database name, unique in the cluster.
    pub name: String,
    /// The server's TCP port on 127.0.0.1.
    pub port: u16,
    cluster: Cluster,
}

impl TestDb {
    /// `postgres://postgres@127.0.0.1:PORT/NAME` (superuser, trust, no TLS).
    pub fn url(&self) -> String {
        self.cluster.url(&self.name)
    }

    /// URL of this database for `role`, password included (percent-encoded).
    pub fn url_as(&self, role: &Role) -> String {
        format!(
            "postgres://{}:{}@{HOST}:{}/{}",
            percent_encode(&role.name),
            percent_encode(&role.password),
            self.port,
            self.name
        )
    }

    /// The cluster holding this database.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A new superuser connection to this database (its connection task is spawned on
    /// the current runtime). Panics on failure.
    pub async fn client(&self) -> Client {
        connect(&self.url())
            .await
            .unwrap_or_else(|err| panic!("connect to database {}: {err}", self.name))
    }

    /// Runs `sql` (one or more statements) as the superuser; panics naming the SQL.
    pub async fn batch(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|err| panic!("in database {}: {sql}: {err:?}", self.name));
    }

    /// Creates the logical replication slot `slot` with the pgoutput plugin (in a
    /// transaction of its own: PostgreSQL refuses one that has written).
    pub async fn create_slot(&self, slot: &str) {
        self.query_one(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')::text",
            &[&slot],
        )
        .await;
    }

    /// Runs one statement as the superuser and returns the rows affected.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> u64 {
        self.client()
            .await
            .execute(sql, params)
            .await
            .unwrap_or_else(|err| panic!("in database {}: {sql}: {err:?}", self.name))
    }

    /// Runs one query as the superuser and returns its rows.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<Row> {
        self.client()
            .await
            .query(sql, params)
            .await
            .unwrap_or_else(|err| panic!("in database {}: {sql}: {err:?}", self.name))
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Row {
        self.client()
            .await
            .query_one(sql, params)
            .await
            .unwrap_or_else(|err| panic!("in database {}: {sql}: {err:?}", self.name))
    }
}

/// Connects without TLS and spawns the connection task on the current runtime.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Connects with TLS, trusting only `cluster`'s CA, and spawns the connection task.
/// Add `sslmode=require` to `url` to refuse a plain connection.
pub async fn connect_tls(url: &str, cluster: &Cluster) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, cluster.tls_connector()).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

// ---------------------------------------------------------------------------------------
// Quoting
// ---------------------------------------------------------------------------------------

/// `"name"`, doubling embedded quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, doubling embedded quotes (standard_conforming_strings is on).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for URL user info).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}
