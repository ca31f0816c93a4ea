//! Setting a test cluster up: finding the server binaries, the temporary directory
//! (owned by the `postgres` OS user when the tests run as root), TLS files, initdb,
//! configuration, and starting `postgres` so that it never outlives the test process.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

use super::{Auth, HOST, SUPERUSER};

/// Oldest PostgreSQL major version the tests support.
const MIN_MAJOR: u32 = 14;
/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

const INSTALL_HINT: &str = "install the server (Debian/Ubuntu: `apt-get install -y postgresql-15`) \
     or set PG_BIN to a directory holding `postgres`, `initdb` and `pg_isready` (version >= 14)";

/// Where a cluster's files live and who owns them.
pub(super) struct Layout {
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub ca_cert_path: PathBuf,
    pub log_path: PathBuf,
    /// Set when the tests run as root: the server runs as the `postgres` OS user.
    owner: Option<Owner>,
}

#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

/// A freshly started cluster, before it is wrapped in a `Cluster`.
pub(super) struct Launched {
    pub layout: Layout,
    pub ca_cert_der: CertificateDer<'static>,
    pub port: u16,
    pub child: Child,
}

/// Creates, configures and starts a new cluster, with `settings` overriding the
/// harness defaults in postgresql.conf. On failure nothing is left behind and the error
/// ends with the server log, if any.
pub(super) fn launch(settings: &[(&str, &str)]) -> Result<Launched, String> {
    let bin = bin_dir_or_error()?;
    let owner = if is_root() {
        Some(postgres_os_user()?)
    } else {
        None
    };
    let layout = Layout::create(owner)?;
    // From here on, a failure removes the directory.
    let started = (|| -> Result<_, String> {
        let ca_cert_der = write_tls_files(&layout)?;
        run_initdb(bin, &layout)?;
        write_config(&layout, settings)?;
        let (port, child) = start_on_free_port(&layout)?;
        bootstrap_roles(&layout, port)?;
        Ok((ca_cert_der, port, child))
    })();
    match started {
        Ok((ca_cert_der, port, child)) => Ok(Launched {
            layout,
            ca_cert_der,
            port,
            child,
        }),
        Err(message) => {
            let log = read_log_tail(&layout.log_path);
            let _ = fs::remove_dir_all(&layout.root);
            Err(format!("{message}{log}"))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Finding the server binaries
// ---------------------------------------------------------------------------------------

/// Directory holding the PostgreSQL server binaries: `$PG_BIN`, else `pg_config --bindir`,
/// else the newest `/usr/lib/postgresql/*/bin`. Panics, saying how to install them, when
/// none is found or the version is older than 14.
pub fn bin_dir() -> &'static Path {
    bin_dir_or_error().unwrap_or_else(|message| panic!("{message}"))
}

fn bin_dir_or_error() -> Result<&'static Path, String> {
    static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN_DIR
        .get_or_init(find_bin_dir)
        .as_deref()
        .map_err(Clone::clone)
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
            .map_err(|err| {
                format!(
                    "create a temporary directory in {}: {err}",
                    parent.display()
                )
            })?
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

    /// A command for a PostgreSQL program, run as the server's OS user, that gets
    /// SIGQUIT when the thread that spawned it exits (so it never outlives the tests).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(pg_bin(program));
        command.current_dir(&self.root).env("LC_ALL", "C");
        if let Some(owner) = self.owner {
            command.uid(owner.uid).gid(owner.gid);
        }
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
    let ca = ca_params(layout)?.self_signed(&ca_key).map_err(tls)?;

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
    layout.write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    Ok(ca.der().clone())
}

/// The test CA's parameters: the same each time for one cluster, so the CA can be
/// rebuilt from its key to issue client certificates later.
fn ca_params(layout: &Layout) -> Result<CertificateParams, String> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| format!("CA parameters: {e}"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.distinguished_name.push(
        DnType::CommonName,
        format!("walhook test CA {}", layout.root.display()),
    );
    Ok(params)
}

/// Issues a client certificate for `user` (its common name) signed by the cluster's
/// CA; writes `{user}.crt` and `{user}.key` (0600, owned by the test process) into
/// `dir` and returns their paths.
pub(super) fn issue_client_cert(
    layout: &Layout,
    user: &str,
    dir: &Path,
) -> Result<(PathBuf, PathBuf), String> {
    let tls = |err: rcgen::Error| format!("issue a client certificate: {err}");
    let ca_key_path = layout.root.join("tls").join("ca.key");
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .map_err(|e| format!("read {}: {e}", ca_key_path.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(tls)?;
    let ca = ca_params(layout)?.self_signed(&ca_key).map_err(tls)?;
    let key = KeyPair::generate().map_err(tls)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    params.distinguished_name.push(DnType::CommonName, user);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(tls)?;
    let (cert_path, key_path) = (
        dir.join(format!("{user}.crt")),
        dir.join(format!("{user}.key")),
    );
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)))
            .map_err(|e| format!("write {}: {e}", path.display()))
    };
    write(&cert_path, &cert.pem())?;
    write(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
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

/// Appends the test settings, then `overrides`, to postgresql.conf (later lines win)
/// and replaces pg_hba.conf with the per-group rules of the module docs.
fn write_config(layout: &Layout, overrides: &[(&str, &str)]) -> Result<(), String> {
    let tls = layout.root.join("tls");
    let mut settings = format!(
        "\n# walhook test harness\n\
         listen_addresses = '{HOST}'\n\
         unix_socket_directories = '{socket}'\n\
         wal_level = logical\n\
         max_wal_senders = 60\n\
         max_replication_slots = 300\n\
         max_connections = 200\n\
         wal_sender_timeout = '10s'\n\
         fsync = off\n\
         full_page_writes = off\n\
         shared_buffers = '32MB'\n\
         ssl = on\n\
         ssl_cert_file = '{cert}'\n\
         ssl_key_file = '{key}'\n\
         ssl_ca_file = '{ca}'\n\
         password_encryption = 'scram-sha-256'\n\
         logging_collector = off\n\
         log_min_messages = warning\n",
        socket = layout.socket_dir.display(),
        cert = tls.join("server.crt").display(),
        key = tls.join("server.key").display(),
        ca = layout.ca_cert_path.display(),
    );
    for (name, value) in overrides {
        settings.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
    }
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
            "hostssl   {database} +walhook_auth_cert     {HOST}/32 cert clientcert=verify-full\n\
             hostnossl {database} +walhook_auth_cert     {HOST}/32 reject\n\
             hostssl   {database} +walhook_auth_tls      {HOST}/32 scram-sha-256\n\
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
pub(super) fn spawn_postgres(layout: &Layout, port: u16) -> Result<Child, String> {
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
    spawner_thread_spawn(command)
        .map_err(|err| format!("start {}: {err}", pg_bin("postgres").display()))
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
pub(super) fn wait_ready(layout: &Layout, port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("postgres exited during start-up ({status})"));
        }
        let ready = layout
            .command("pg_isready")
            .args([
                "-q", "-t", "1", "-h", HOST, "-U", SUPERUSER, "-d", "postgres",
            ])
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
    let sql = [
        Auth::Md5,
        Auth::Scram,
        Auth::Password,
        Auth::TlsScram,
        Auth::Cert,
    ]
    .iter()
    .filter_map(|auth| auth.group())
    .map(|group| format!("CREATE ROLE {group} NOLOGIN;"))
    .collect::<String>();
    let out = layout
        .command("psql")
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
        ])
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
pub(super) fn read_log_tail(path: &Path) -> String {
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
