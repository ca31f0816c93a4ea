//! Running the real `walhook` binary: a config file in a temp dir, a daemon process whose
//! output goes to a log file, signals (SIGTERM, SIGKILL), and bounded waits for its exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::pg::TestDb;
use super::{wait_for_some, walhook_bin};

/// A temp dir holding `walhook.toml` and the daemon logs.
pub struct Workdir {
    pub dir: tempfile::TempDir,
}

impl Workdir {
    /// Writes `toml` as walhook.toml in a new temp dir.
    pub fn new(toml: &str) -> Workdir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("walhook.toml"), toml).expect("write walhook.toml");
        Workdir { dir }
    }

    /// Path of walhook.toml.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("walhook.toml")
    }

    /// Replaces walhook.toml.
    pub fn rewrite(&self, toml: &str) {
        std::fs::write(self.config(), toml).expect("rewrite walhook.toml");
    }

    /// Runs `walhook ARGS -c walhook.toml` to completion (bounded), returning status,
    /// stdout and stderr.
    pub fn run_to_end(&self, args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
        let mut child = Command::new(walhook_bin())
            .args(args)
            .arg("-c")
            .arg(self.config())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walhook");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(_status) = child.try_wait().expect("wait walhook") {
                let out = child.wait_with_output().expect("walhook output");
                return (
                    out.status,
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("walhook output");
                panic!(
                    "walhook {args:?} did not finish within {timeout:?}; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `walhook run`; its stdout and stderr go to `run-N.log` in the dir.
    pub fn spawn_run(&self, n: usize) -> Daemon {
        self.spawn_run_env(n, &[("WALHOOK_LOG", Some("info,walhook=debug"))])
    }

    /// Like [`spawn_run`](Self::spawn_run) with only these environment changes: each
    /// variable set, or removed when `None` (without `WALHOOK_LOG` the config's `[log]`
    /// applies).
    pub fn spawn_run_env(&self, n: usize, env: &[(&str, Option<&str>)]) -> Daemon {
        let log_path = self.dir.path().join(format!("run-{n}.log"));
        let log = std::fs::File::create(&log_path).expect("daemon log");
        let mut command = Command::new(walhook_bin());
        for (name, value) in env {
            match value {
                Some(v) => command.env(name, v),
                None => command.env_remove(name),
            };
        }
        let child = command
            .args(["run", "-c"])
            .arg(self.config())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn walhook run");
        Daemon {
            child: Some(child),
            log_path,
        }
    }
}

/// A running `walhook run`. Killed (SIGKILL) when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub log_path: PathBuf,
}

impl Daemon {
    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `signal` (libc::SIGTERM, SIGKILL, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), signal) };
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait walhook") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "walhook run did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("wait walhook").is_none(),
            None => false,
        }
    }

    /// Everything it printed so far.
    pub fn log(&self) -> String {
        read(&self.log_path)
    }

    /// Peak resident set size (VmHWM) in KiB, while it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    }
}

/// Lines of a daemon's log printed when a test fails while it runs: its last lines
/// above debug level, and its last lines.
const LOG_TAIL_ON_FAILURE: usize = 30;

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            // A test that fails while the daemon runs (a bounded wait ran out) shows
            // what the daemon was doing, not only what the test waited for.
            if std::thread::panicking() {
                let log = self.log();
                let tail = |lines: Vec<&str>| {
                    lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..].join("\n")
                };
                eprintln!(
                    "--- {}: last lines above debug ---\n{}\n--- last lines ---\n{}",
                    self.log_path.display(),
                    tail(log.lines().filter(|l| !l.contains(" DEBUG ")).collect()),
                    tail(log.lines().collect()),
                );
            }
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until walhook holds `db`'s slot (named after the database) and leads ingest.
/// An active slot alone is not enough: a slot being created is already active before
/// its consistent point, and changes committed before that point are not captured.
pub async fn wait_leading(db: &TestDb, daemon: &mut Daemon) {
    wait_leading_with_store(db, db, daemon).await;
}

/// [`wait_leading`] for a store in database `store` (the checkpoint is there, the slot
/// on `db`'s cluster).
pub async fn wait_leading_with_store(db: &TestDb, store: &TestDb, daemon: &mut Daemon) {
    let client = db.client().await;
    let store_client = store.client().await;
    let slot = db.name.clone();
    let start = Instant::now();
    loop {
        if !daemon.is_running() {
            panic!("walhook run exited early; log:\n{}", daemon.log());
        }
        let row = store_client
            .query_opt(
                "SELECT leader_epoch FROM walhook.checkpoints WHERE slot = $1 AND leader IS NOT NULL",
                &[&slot],
            )
            .await;
        let active = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&slot],
            )
            .await;
        if matches!(row, Ok(Some(_))) && matches!(active, Ok(Some(_))) {
            return;
        }
        if start.elapsed() > Duration::from_secs(60) {
            panic!(
                "timed out waiting for walhook to hold slot {slot}; log:\n{}",
                daemon.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A config for `db`: its slot, a server on a free port, `public.users` as entity
/// `user`, then `rest` (subscriptions, more keys).
pub fn users_config(db: &TestDb, rest: &str) -> String {
    format!(
        r#"
[source]
url = "postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.users"
entity = "user"

{rest}
"#,
        port = db.port,
        name = db.name
    )
}

/// The address the daemon's server bound (it logs it, text or JSON), as `http://ip:port`.
pub async fn server_url(daemon: &mut Daemon) -> String {
    wait_for_some(
        "the daemon to log its server address",
        Duration::from_secs(60),
        || {
            let running = daemon.is_running();
            let log = daemon.log();
            async move {
                assert!(running, "walhook exited:\n{log}");
                let line = log.lines().find(|l| l.contains("serving /metrics"))?;
                let at = line.find("127.0.0.1:")?;
                let port: String = line[at + "127.0.0.1:".len()..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                Some(format!("http://127.0.0.1:{port}"))
            }
        },
    )
    .await
}

/// The value of the series `series` (with its labels, as printed) in the daemon's
/// /metrics at `base`; 0 when absent.
pub async fn metric(base: &str, series: &str) -> f64 {
    let url = format!("{base}/metrics");
    let body = reqwest::Client::new()
        .get(&url)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("response body");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
