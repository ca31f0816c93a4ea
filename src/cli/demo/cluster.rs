//! The demo's throwaway PostgreSQL cluster: finds the server binaries, runs initdb in a
//! temporary directory (as the `postgres` OS user when walhook runs as root), starts
//! `postgres` with `wal_level = logical` on a free 127.0.0.1 port and a Unix socket in
//! that directory, and stops it and removes the directory when dropped.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Oldest PostgreSQL major version walhook supports.
const MIN_MAJOR: u32 = 14;
/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The superuser initdb creates; it connects with `trust` (local connections only).
pub const SUPERUSER: &str = "postgres";

/// What to do when no PostgreSQL server is installed.
pub const INSTALL_HINT: &str = "install the PostgreSQL server (version 14 or newer):\n  \
     Debian/Ubuntu:  sudo apt-get install postgresql-15\n  \
     Fedora/RHEL:    sudo dnf install postgresql-server\n  \
     macOS:          brew install postgresql@16\n\
     or set PG_BIN to the directory that holds `postgres` and `initdb`";

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("PostgreSQL server binaries not found (looked at {looked}); {INSTALL_HINT}")]
    NotFound { looked: String },
    #[error("PG_BIN={0} holds no `postgres` and `initdb`; {INSTALL_HINT}")]
    BadPgBin(String),
    #[error(
        "PostgreSQL {major} in {dir} is too old, walhook needs {MIN_MAJOR} or newer; {INSTALL_HINT}"
    )]
    TooOld { major: u32, dir: String },
    #[error(
        "running as root, but there is no `postgres` OS user to run the server as (PostgreSQL refuses to run as root); install the PostgreSQL package, which creates it, or run the demo as a normal user"
    )]
    NoPostgresUser,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed:\n{output}")]
    Failed { what: String, output: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// A running throwaway cluster. Dropping it stops the server and removes its directory.
pub struct Cluster {
    /// The server binaries' directory.
    pub bin_dir: PathBuf,
    /// `PostgreSQL 16.4`-style version line.
    pub version: String,
    /// Temporary directory holding everything (data, socket, log).
    pub root: PathBuf,
    /// Directory of the Unix socket.
    pub socket_dir: PathBuf,
    /// TCP port on 127.0.0.1 (also the socket's port number).
    pub port: u16,
    log_path: PathBuf,
    child: Option<Child>,
}

#[derive(Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Cluster {
    /// Finds the binaries, creates and starts the cluster. Blocks for a second or two.
    ///
    /// Call it from a thread that lives as long as the cluster (the server gets SIGQUIT
    /// when the thread that started it exits, so it never outlives walhook).
    pub fn start() -> Result<Cluster, ClusterError> {
        let bin_dir = find_bin_dir()?;
        let version = server_version(&bin_dir)?;
        let owner = if is_root() {
            Some(postgres_os_user()?)
        } else {
            None
        };
        // As root, /tmp: a TMPDIR under /root would not be reachable by `postgres`.
        let parent = if owner.is_some() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let root = tempfile::Builder::new()
            .prefix("walhook-demo-")
            .tempdir_in(&parent)
            .map_err(io_err(format!(
                "create a temporary directory in {}",
                parent.display()
            )))?
            .keep();
        let mut cluster = Cluster {
            bin_dir,
            version,
            socket_dir: root.join("socket"),
            log_path: root.join("postgres.log"),
            root,
            port: 0,
            child: None,
        };
        // From here on, an error drops `cluster`, which removes the directory.
        cluster.init(owner)?;
        Ok(cluster)
    }

    fn init(&mut self, owner: Option<Owner>) -> Result<(), ClusterError> {
        fs::create_dir(&self.socket_dir).map_err(io_err("create the socket directory"))?;
        File::create(&self.log_path).map_err(io_err("create the server log"))?;
        if let Some(o) = owner {
            for path in [&self.root, &self.socket_dir, &self.log_path] {
                std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
                    .map_err(io_err(format!("chown {} to postgres", path.display())))?;
            }
        }
        let data = self.root.join("data");
        let out = self
            .command("initdb", owner)
            .arg("-D")
            .arg(&data)
            .args([
                "--username",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .map_err(io_err(format!("run {}/initdb", self.bin_dir.display())))?;
        if !out.status.success() {
            return Err(ClusterError::Failed {
                what: "initdb".into(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        let settings = format!(
            "\n# walhook demo\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             wal_level = logical\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             fsync = off\n\
             full_page_writes = off\n\
             shared_buffers = '32MB'\n\
             log_min_messages = warning\n",
            self.socket_dir.display()
        );
        let conf = data.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(io_err(format!("write {}", conf.display())))?;

        let mut last = None;
        for _ in 0..3 {
            let port = std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map_err(io_err("find a free port on 127.0.0.1"))?
                .port();
            let log = OpenOptions::new()
                .append(true)
                .open(&self.log_path)
                .map_err(io_err("open the server log"))?;
            let log_err = log.try_clone().map_err(io_err("open the server log"))?;
            let child = self
                .command("postgres", owner)
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log_err)
                .spawn()
                .map_err(io_err(format!("start {}/postgres", self.bin_dir.display())))?;
            self.child = Some(child);
            self.port = port;
            match self.wait_ready() {
                Ok(()) => return Ok(()),
                Err(err) => {
                    self.stop();
                    let bind_race = self.log_tail().contains("could not bind");
                    last = Some(err);
                    if !bind_race {
                        break;
                    }
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// A command for a server program: run as `postgres` when we are root, in its own
    /// process group (Ctrl-C in the terminal reaches walhook, which stops the server
    /// in order), and sent SIGQUIT if walhook dies.
    fn command(&self, program: &str, owner: Option<Owner>) -> Command {
        let mut command = Command::new(self.bin_dir.join(program));
        command
            .current_dir(&self.root)
            .env("LC_ALL", "C")
            .process_group(0);
        if let Some(o) = owner {
            command.uid(o.uid).gid(o.gid);
        }
        // SAFETY: runs in the forked child before exec; prctl and getppid are
        // async-signal-safe.
        unsafe {
            let parent = libc::getpid();
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("walhook exited"));
                }
                Ok(())
            });
        }
        command
    }

    /// Waits until the server accepts TCP connections (a startup packet is answered).
    fn wait_ready(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(ClusterError::Failed {
                    what: format!("postgres (exited with {status})"),
                    output: self.log_tail(),
                });
            }
            if self.pid_file_says_ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ClusterError::Failed {
                    what: format!("postgres did not accept connections within {READY_TIMEOUT:?}"),
                    output: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// postmaster.pid's last line is the server status (`ready` once it accepts
    /// connections), which does not depend on the log level.
    fn pid_file_says_ready(&self) -> bool {
        fs::read_to_string(self.root.join("data").join("postmaster.pid"))
            .map(|text| text.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
            .unwrap_or(false)
    }

    /// The end of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(4000)));
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// A `postgres://` URL of database `db` for the superuser over TCP (trust).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Stops the server (fast shutdown, then SIGQUIT, then SIGKILL). Never panics.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        for (signal, grace) in [
            (libc::SIGINT, Duration::from_secs(10)),
            (libc::SIGQUIT, Duration::from_secs(5)),
        ] {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// `$PG_BIN`, else `pg_config --bindir`, else `postgres` on `PATH`, else the usual
/// install locations, newest version first.
fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    let has_server = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has_server(&dir) {
            check_version(dir)
        } else {
            Err(ClusterError::BadPgBin(dir.display().to_string()))
        };
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .filter(|dir| has_server(dir));
    let on_path = || {
        std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).find(|dir| has_server(dir)))
    };
    let mut candidates: Vec<(u32, PathBuf)> = Vec::new();
    for pattern_dir in [
        "/usr/lib/postgresql",
        "/opt/homebrew/opt",
        "/usr/local/opt",
        "/usr",
    ] {
        let Ok(entries) = fs::read_dir(pattern_dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // /usr/lib/postgresql/16, /opt/homebrew/opt/postgresql@16, /usr/pgsql-16
            let major = if pattern_dir == "/usr/lib/postgresql" {
                name.parse().ok()
            } else if pattern_dir == "/usr" {
                name.strip_prefix("pgsql-").and_then(|v| v.parse().ok())
            } else if name == "postgresql" {
                Some(0)
            } else {
                name.strip_prefix("postgresql@")
                    .and_then(|v| v.parse().ok())
            };
            let bin = entry.path().join("bin");
            if let Some(major) = major
                && has_server(&bin)
            {
                candidates.push((major, bin));
            }
        }
    }
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    let fixed = ["/usr/local/pgsql/bin", "/opt/local/lib/postgresql/bin"]
        .into_iter()
        .map(PathBuf::from)
        .filter(|d| has_server(d));
    let found = from_pg_config
        .or_else(on_path)
        .or_else(|| candidates.into_iter().map(|(_, d)| d).next())
        .or_else(|| fixed.into_iter().next());
    match found {
        Some(dir) => check_version(dir),
        None => Err(ClusterError::NotFound {
            looked: "$PG_BIN, `pg_config --bindir`, PATH, /usr/lib/postgresql/*/bin, \
                     /usr/pgsql-*/bin, /usr/local/pgsql/bin, /opt/homebrew/opt/postgresql*/bin, \
                     /usr/local/opt/postgresql*/bin"
                .into(),
        }),
    }
}

fn check_version(dir: PathBuf) -> Result<PathBuf, ClusterError> {
    let version = server_version(&dir)?;
    let major = major_of(&version).unwrap_or(0);
    if major < MIN_MAJOR {
        return Err(ClusterError::TooOld {
            major,
            dir: dir.display().to_string(),
        });
    }
    Ok(dir)
}

/// `PostgreSQL 16.4` from `postgres (PostgreSQL) 16.4 (Debian ...)`.
fn server_version(dir: &Path) -> Result<String, ClusterError> {
    let postgres = dir.join("postgres");
    let out = Command::new(&postgres)
        .arg("--version")
        .output()
        .map_err(io_err(format!("run {} --version", postgres.display())))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .nth(2)
        .map(|v| format!("PostgreSQL {v}"))
        .unwrap_or_else(|| text.trim().to_owned()))
}

fn major_of(version: &str) -> Option<u32> {
    let v = version.strip_prefix("PostgreSQL ")?;
    v.chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn postgres_os_user() -> Result<Owner, ClusterError> {
    let name = CString::new(SUPERUSER).expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the record is copied out at once, before
    // any other thread of walhook could call getpwnam.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(ClusterError::NoPostgresUser);
    }
    // SAFETY: checked non-null above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Owner { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_major_versions() {
        assert_eq!(major_of("PostgreSQL 16.4"), Some(16));
        assert_eq!(major_of("PostgreSQL 17devel"), Some(17));
        assert_eq!(major_of("garbage"), None);
    }
}
