//! A throwaway PostgreSQL cluster for the integration tests: found on the machine,
//! initialised into a temporary directory with logical replication, TLS and per-role
//! authentication methods, started lazily, and stopped and removed when the test
//! process exits.
//!
//! All tests share one cluster ([`cluster`]) and isolate themselves with a fresh
//! database each ([`create_db`]). A test that stops or restarts PostgreSQL must start
//! its own cluster ([`Cluster::start`]) so that it does not disturb the others.
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
//!
//! The same rules apply to replication connections (`replication=database`).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

/// Oldest PostgreSQL major version the tests support.
const MIN_MAJOR: u32 = 14;
/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The address the server listens on.
const HOST: &str = "127.0.0.1";
/// The superuser created by initdb; it connects with `trust`.
const SUPERUSER: &str = "postgres";

const INSTALL_HINT: &str = "install the server (Debian/Ubuntu: `apt-get install -y postgresql-15`) \
     or set PG_BIN to a directory holding `postgres`, `initdb` and `pg_isready` (version >= 14)";

// ---------------------------------------------------------------------------------------
// Finding the server binaries
// ---------------------------------------------------------------------------------------

/// Directory holding the PostgreSQL server binaries: `$PG_BIN`, else `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin`. Panics, saying how to install them, when
/// none is found or the version is older than 14.
pub fn bin_dir() -> &'static Path {
    static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN_DIR.get_or_init(find_bin_dir) {
        Ok(dir) => dir,
        Err(message) => panic!("{message}"),
    }
}

/// Path of the PostgreSQL program `name` (`pg_recvlogical`, `psql`, ...) in [`bin_dir`].
pub fn pg_bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

fn find_bin_dir() -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    let dir = if let Some(dir) = std::env::var_os("PG_BIN") {
        let dir = PathBuf::from(dir);
        if !has_server(&dir) {
            return Err(format!(
                "PG_BIN={} holds no `postgres` and `initdb`; {INSTALL_HINT}",
                dir.display()
            ));
        }
        dir
    } else {
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
            .filter(|dir| has_server(dir));
        match from_pg_config.or_else(|| newest_debian_bin_dir(has_server)) {
            Some(dir) => dir,
            None => {
                return Err(format!(
                    "PostgreSQL server binaries not found (tried $PG_BIN, `pg_config --bindir`, \
                     /usr/lib/postgresql/*/bin); {INSTALL_HINT}"
                ));
            }
        }
    };
    let major = server_major_version(&dir)?;
    if major < MIN_MAJOR {
        return Err(format!(
            "PostgreSQL {major} in {} is too old, the tests need >= {MIN_MAJOR}; {INSTALL_HINT}",
            dir.display()
        ));
    }
    Ok(dir)
}

fn newest_debian_bin_dir(has_server: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let major: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

/// Parses `postgres (PostgreSQL) 15.18 (Debian ...)` or `... 17devel` into its major.
fn server_major_version(dir: &Path) -> Result<u32, String> {
    let postgres = dir.join("postgres");
    let out = Command::new(&postgres)
        .arg("--version")
        .output()
        .map_err(|err| format!("cannot run {} --version: {err}", postgres.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|version| {
            let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .ok_or_else(|| format!("cannot parse the version in `{}`", text.trim()))
}

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

/// Where a cluster's files live and who owns them.
struct Layout {
    root: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    ca_cert_path: PathBuf,
    log_path: PathBuf,
    /// Set when the tests run as root: the server runs as the `postgres` OS user.
    owner: Option<Owner>,
}

#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
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
        Cluster::try_start().unwrap_or_else(|message| {
            panic!("test PostgreSQL cluster did not start: {message}")
        })
    }

    fn try_start() -> Result<Cluster, String> {
        let bin = bin_dir();
        let owner = if is_root() { Some(postgres_os_user()?) } else { None };
        let layout = Layout::create(owner)?;
        // From here on, a failure removes the directory.
        let started = (|| -> Result<_, String> {
            let ca_cert_der = write_tls_files(&layout)?;
            run_initdb(bin, &layout)?;
            write_config(&layout)?;
            let (port, child) = start_on_free_port(&layout)?;
            bootstrap_roles(&layout, port)?;
            Ok((ca_cert_der, port, child))
        })();
        match started {
            Ok((ca_cert_der, port, child)) => Ok(Cluster(Arc::new(Inner {
                port,
                layout,
                ca_cert_der,
                child: Mutex::new(Some(child)),
                next_id: AtomicU64::new(1),
            }))),
            Err(message) => {
                let log = read_log_tail(&layout.log_path);
                let _ = fs::remove_dir_all(&layout.root);
                Err(format!("{message}{log}"))
            }
        }
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
        let name = format!("walhook_test_{}", self.0.next_id.fetch_add(1, Ordering::Relaxed));
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
        };
        let name = format!("{prefix}_{}", self.0.next_id.fetch_add(1, Ordering::Relaxed));
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

    /// Stops the server and waits until it has exited. Blocks the calling thread.
    /// Only for clusters of one's own ([`Cluster::start`]).
    pub fn stop(&self, mode: StopMode) {
        let status = self.0.stop(mode);
        if status.is_none() {
            panic!("stop PostgreSQL ({mode:?}): it was not running");
        }
    }

    /// Starts a stopped server again on the same port and data directory and waits
    /// until it accepts connections. Blocks the calling thread.
    pub fn start_again(&self) {
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
    }

    /// [`Cluster::stop`] then [`Cluster::start_again`]: same port, same data.
    pub fn restart(&self, mode: StopMode) {
        self.stop(mode);
        self.start_again();
    }
}

impl Inner {
    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Signals the postmaster and waits for it, escalating to SIGQUIT then SIGKILL if
    /// it does not exit in time. `None` if it was not running.
    fn stop(&self, mode: StopMode) -> Option<ExitStatus> {
        let mut child = self.lock_child().take()?;
        let steps: &[(i32, Duration)] = match mode {
            StopMode::Fast => &[
                (libc::SIGINT, Duration::from_secs(30)),
                (libc::SIGQUIT, Duration::from_secs(10)),
            ],
            StopMode::Immediate => &[(libc::SIGQUIT, Duration::from_secs(10))],
        };
        for &(signal, grace) in steps {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Stops the server (fast) and removes the cluster's directory. Never panics.
    fn shut_down(&self) {
        self.stop(StopMode::Fast);
        let _ = fs::remove_dir_all(&self.layout.root);
    }
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
// Setting a cluster up
// ---------------------------------------------------------------------------------------

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// initdb and postgres refuse to run as root; as root, they run as `postgres`.
fn postgres_os_user() -> Result<Owner, String> {
    let name = CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the record is copied out at once, and
    // only this function calls getpwnam in the test process.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(format!(
            "running as root, but there is no `postgres` OS user to run the server as; \
             {INSTALL_HINT} (the package creates that user), or run the tests as a non-root user"
        ));
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Owner { uid, gid })
}

impl Layout {
    fn create(owner: Option<Owner>) -> Result<Layout, String> {
        // As root, /tmp: a TMPDIR under /root would not be reachable by `postgres`.
        let parent = if owner.is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let root = tempfile::Builder::new()
            .prefix("walhook-pg-")
            .tempdir_in(&parent)
            .map_err(|err| format!("create a temporary directory in {}: {err}", parent.display()))?
            .keep();
        let layout = Layout {
            data_dir: root.join("data"),
            socket_dir: root.join("socket"),
            ca_cert_path: root.join("tls").join("ca.crt"),
            log_path: root.join("postgres.log"),
            root,
            owner,
        };
        let prepared = (|| -> io::Result<()> {
            fs::create_dir(&layout.socket_dir)?;
            fs::create_dir(layout.root.join("tls"))?;
            File::create(&layout.log_path)?;
            for path in [
                &layout.root,
                &layout.socket_dir,
                &layout.root.join("tls"),
                &layout.log_path,
            ] {
                layout.chown(path)?;
            }
            Ok(())
        })();
        prepared.map_err(|err| {
            let _ = fs::remove_dir_all(&layout.root);
            format!("prepare {}: {err}", layout.root.display())
        })?;
        Ok(layout)
    }

    fn chown(&self, path: &Path) -> io::Result<()> {
        match self.owner {
            Some(owner) => std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid)),
            None => Ok(()),
        }
    }

    /// A command for a PostgreSQL program, run as the server's OS user.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(pg_bin(program));
        command.current_dir(&self.root).env("LC_ALL", "C");
        if let Some(owner) = self.owner {
            command.uid(owner.uid).gid(owner.gid);
        }
        command
    }

    fn write_file(&self, path: &Path, contents: &str, mode: u32) -> Result<(), String> {
        let written = (|| -> io::Result<()> {
            fs::write(path, contents)?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
            self.chown(path)
        })();
        written.map_err(|err| format!("write {}: {err}", path.display()))
    }
}

/// Generates a CA and a server certificate for `localhost` and 127.0.0.1 signed by it;
/// writes `tls/ca.crt`, `tls/server.crt` and `tls/server.key` (0600, server-owned).
fn write_tls_files(layout: &Layout) -> Result<CertificateDer<'static>, String> {
    let tls = |err: rcgen::Error| format!("generate test certificates: {err}");
    let ca_key = KeyPair::generate().map_err(tls)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "walhook test CA");
    let ca = ca_params.self_signed(&ca_key).map_err(tls)?;

    let server_key = KeyPair::generate().map_err(tls)?;
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_owned(), HOST.to_owned()]).map_err(tls)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params
        .signed_by(&server_key, &ca, &ca_key)
        .map_err(tls)?;

    let dir = layout.root.join("tls");
    layout.write_file(&layout.ca_cert_path, &ca.pem(), 0o644)?;
    layout.write_file(&dir.join("server.crt"), &server.pem(), 0o644)?;
    layout.write_file(&dir.join("server.key"), &server_key.serialize_pem(), 0o600)?;
    Ok(ca.der().clone())
}

fn run_initdb(bin: &Path, layout: &Layout) -> Result<(), String> {
    let out = layout
        .command("initdb")
        .arg("-D")
        .arg(&layout.data_dir)
        .args([
            "--username",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ])
        .output()
        .map_err(|err| format!("run {}/initdb: {err}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{}/initdb failed ({}):\n{}{}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Appends the test settings to postgresql.conf (later lines win) and replaces
/// pg_hba.conf with the per-group rules of the module docs.
fn write_config(layout: &Layout) -> Result<(), String> {
    let tls = layout.root.join("tls");
    let settings = format!(
        "\n# walhook test harness\n\
         listen_addresses = '{HOST}'\n\
         unix_socket_directories = '{socket}'\n\
         wal_level = logical\n\
         max_wal_senders = 20\n\
         max_replication_slots = 20\n\
         max_connections = 200\n\
         wal_sender_timeout = '10s'\n\
         fsync = off\n\
         full_page_writes = off\n\
         shared_buffers = '32MB'\n\
         ssl = on\n\
         ssl_cert_file = '{cert}'\n\
         ssl_key_file = '{key}'\n\
         password_encryption = 'scram-sha-256'\n\
         logging_collector = off\n\
         log_min_messages = warning\n",
        socket = layout.socket_dir.display(),
        cert = tls.join("server.crt").display(),
        key = tls.join("server.key").display(),
    );
    let conf_path = layout.data_dir.join("postgresql.conf");
    OpenOptions::new()
        .append(true)
        .open(&conf_path)
        .and_then(|mut file| file.write_all(settings.as_bytes()))
        .map_err(|err| format!("write {}: {err}", conf_path.display()))?;

    let mut hba = String::from(
        "# walhook test harness: see tests/support/pg.rs\n\
         local all all trust\n\
         local replication all trust\n",
    );
    for database in ["all", "replication"] {
        hba.push_str(&format!(
            "hostssl   {database} +walhook_auth_tls      {HOST}/32 scram-sha-256\n\
             hostnossl {database} +walhook_auth_tls      {HOST}/32 reject\n\
             host      {database} +walhook_auth_md5      {HOST}/32 md5\n\
             host      {database} +walhook_auth_scram    {HOST}/32 scram-sha-256\n\
             host      {database} +walhook_auth_password {HOST}/32 password\n\
             host      {database} all                    {HOST}/32 trust\n"
        ));
    }
    layout.write_file(&layout.data_dir.join("pg_hba.conf"), &hba, 0o600)
}

/// Picks a free port (bind 127.0.0.1:0) and starts the server there, trying another
/// port if someone else took it meanwhile.
fn start_on_free_port(layout: &Layout) -> Result<(u16, Child), String> {
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = std::net::TcpListener::bind((HOST, 0))
            .and_then(|listener| listener.local_addr())
            .map_err(|err| format!("find a free port on {HOST}: {err}"))?
            .port();
        let mut child = spawn_postgres(layout, port)?;
        match wait_ready(layout, port, &mut child) {
            Ok(()) => return Ok((port, child)),
            Err(message) => {
                let _ = child.kill();
                let _ = child.wait();
                if !read_log_tail(&layout.log_path).contains("could not bind") {
                    return Err(message);
                }
                last_error = message;
            }
        }
    }
    Err(last_error)
}

/// Runs `postgres -D data -p port` as a child that gets SIGQUIT if this process dies.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked exits, and libtest runs each
/// test on a thread of its own, so every server is forked by one long-lived thread.
fn spawn_postgres(layout: &Layout, port: u16) -> Result<Child, String> {
    let log = OpenOptions::new()
        .append(true)
        .open(&layout.log_path)
        .map_err(|err| format!("open {}: {err}", layout.log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|err| format!("open {}: {err}", layout.log_path.display()))?;
    let mut command = layout.command("postgres");
    command
        .arg("-D")
        .arg(&layout.data_dir)
        .arg("-p")
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: runs in the forked child before exec and only calls async-signal-safe
    // functions (prctl, getppid).
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The test process died between fork and prctl: do not outlive it.
            if libc::getppid() != parent {
                return Err(io::Error::other("test process is gone"));
            }
            Ok(())
        });
    }
    spawner_thread_spawn(command).map_err(|err| format!("start {}: {err}", pg_bin("postgres").display()))
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `command` from the process-long spawner thread (see [`spawn_postgres`]).
fn spawner_thread_spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("pg-spawner".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the postgres spawner thread");
        requests
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| io::Error::other("postgres spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("postgres spawner thread is gone"))?
}

/// Polls `pg_isready` until the server accepts connections, the child exits, or
/// [`READY_TIMEOUT`] passes.
fn wait_ready(layout: &Layout, port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("postgres exited during start-up ({status})"));
        }
        let ready = layout
            .command("pg_isready")
            .args(["-q", "-t", "1", "-h", HOST, "-U", SUPERUSER, "-d", "postgres"])
            .arg("-p")
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|err| format!("run {}: {err}", pg_bin("pg_isready").display()))?;
        if ready.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {READY_TIMEOUT:?} waiting for postgres on {HOST}:{port} to accept connections"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Creates the NOLOGIN groups that pg_hba.conf uses to force an auth method.
fn bootstrap_roles(layout: &Layout, port: u16) -> Result<(), String> {
    let sql = [Auth::Md5, Auth::Scram, Auth::Password, Auth::TlsScram]
        .iter()
        .filter_map(|auth| auth.group())
        .map(|group| format!("CREATE ROLE {group} NOLOGIN;"))
        .collect::<String>();
    let out = layout
        .command("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-U", SUPERUSER, "-d", "postgres"])
        .arg("-h")
        .arg(&layout.socket_dir)
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(&sql)
        .output()
        .map_err(|err| format!("run {}: {err}", pg_bin("psql").display()))?;
    if !out.status.success() {
        return Err(format!(
            "create the auth groups: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The end of the server log, for error messages ("" if it is empty or unreadable).
fn read_log_tail(path: &Path) -> String {
    const TAIL: u64 = 4000;
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(TAIL)));
        let _ = file.read_to_string(&mut text);
    }
    if text.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- end of {} ---\n{text}", path.display())
    }
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
