//! Running the real `walhook` binary: a config file in a temporary directory per test,
//! one-shot runs with their exit code and output, and a running `walhook tail` whose
//! stdout lines, stderr and peak memory a test can read.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{walhook_bin, within};

/// How long a one-shot `walhook tail` or `walhook check` that should fail or finish may
/// take (generous: the machine may be loaded).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A `walhook.toml` in a temporary directory of its own, removed on drop.
pub struct ConfigFile {
    _dir: TempDir,
    /// Path of the file.
    pub path: PathBuf,
}

impl ConfigFile {
    /// Writes `text` as walhook.toml.
    pub fn new(text: &str) -> ConfigFile {
        let dir = tempfile::Builder::new()
            .prefix("walhook-cli-")
            .tempdir()
            .expect("create a temporary directory for walhook.toml");
        let path = dir.path().join("walhook.toml");
        std::fs::write(&path, text).expect("write walhook.toml");
        ConfigFile { _dir: dir, path }
    }

    /// A config with `source.url = "${DATABASE_URL}"`, `slot`, `publication` and one
    /// `[[tables]]` per schema-qualified name in `tables` (entity `t0`, `t1`, ...).
    pub fn source(slot: &str, publication: &str, tables: &[&str]) -> ConfigFile {
        let mut text = format!(
            "[source]\nurl = \"${{DATABASE_URL}}\"\nslot = \"{slot}\"\npublication = \"{publication}\"\n"
        );
        for (i, table) in tables.iter().enumerate() {
            text.push_str(&format!(
                "\n[[tables]]\ntable = \"{table}\"\nentity = \"t{i}\"\n"
            ));
        }
        ConfigFile::new(&text)
    }
}

/// How a finished `walhook` run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// Asserts exit code 1, and that `text` (stderr for `tail`, the report on stdout for
    /// `check`) holds one paragraph containing every one of `needles`, and that nothing
    /// panicked. Returns the paragraph.
    pub fn assert_failed_with(&self, what: &str, text: &str, needles: &[&str]) -> String {
        self.assert_exit_with(1, what, text, needles)
    }

    /// Like [`Outcome::assert_failed_with`], for exit code 78: the config is invalid.
    pub fn assert_config_error(&self, what: &str, text: &str, needles: &[&str]) -> String {
        self.assert_exit_with(78, what, text, needles)
    }

    /// Like [`Outcome::assert_failed_with`], with exit code `code`.
    pub fn assert_exit_with(&self, code: i32, what: &str, text: &str, needles: &[&str]) -> String {
        assert_eq!(
            self.code,
            Some(code),
            "{what}: exit code; stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        for output in [&self.stdout, &self.stderr] {
            assert!(
                !output.contains("panicked") && !output.contains("RUST_BACKTRACE"),
                "{what}: walhook panicked:\n{output}"
            );
        }
        assert!(
            !text.trim().contains("\n\n"),
            "{what}: the message is one paragraph:\n{text}"
        );
        let paragraph = text
            .lines()
            .find(|line| needles.iter().all(|n| line.contains(n)))
            .unwrap_or_else(|| panic!("{what}: no line contains all of {needles:?} in:\n{text}"));
        paragraph.to_owned()
    }
}

/// A `walhook` command with `-c config`, `DATABASE_URL=database_url`, and no inherited
/// walhook settings.
fn command(args: &[&str], config: &Path, database_url: &str) -> Command {
    let mut command = Command::new(walhook_bin());
    command
        .args(args)
        .arg("-c")
        .arg(config)
        .env("DATABASE_URL", database_url)
        .env_remove("WALHOOK_CONFIG")
        .env_remove("WALHOOK_LOG")
        .env_remove("PGPASSWORD")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `walhook ARGS -c config` to completion (at most [`RUN_TIMEOUT`]).
pub async fn run(args: &[&str], config: &ConfigFile, database_url: &str) -> Outcome {
    run_env(args, config, database_url, &[]).await
}

/// Runs `walhook check` and `walhook run` on `config` (the database is never reached)
/// and asserts that each exits 78 with `summary` (e.g. "3 config errors") and every
/// one of `expected` in its report (stdout for check, stderr for run). Returns what
/// each printed, as ("walhook check" or "walhook run", outcome), for further checks.
pub async fn assert_check_and_run_refuse(
    config: &ConfigFile,
    summary: &str,
    expected: &[String],
) -> Vec<(String, Outcome)> {
    let url = "postgres://postgres@127.0.0.1:1/db";
    let mut outcomes = Vec::new();
    for args in [&["check"][..], &["run"]] {
        let out = run(args, config, url).await;
        let text = if args[0] == "check" {
            &out.stdout
        } else {
            &out.stderr
        };
        let what = format!("walhook {}", args[0]);
        out.assert_config_error(&what, text, &[summary]);
        for needle in expected {
            out.assert_config_error(&what, text, &[needle]);
        }
        outcomes.push((what, out));
    }
    outcomes
}

/// Like [`run`], with these environment variables set too.
pub async fn run_env(
    args: &[&str],
    config: &ConfigFile,
    database_url: &str,
    env: &[(&str, &str)],
) -> Outcome {
    let what = format!("`walhook {}` to exit", args.join(" "));
    let child = command(args, &config.path, database_url)
        .envs(env.iter().copied())
        .spawn()
        .expect("start walhook");
    let out = within(&what, RUN_TIMEOUT, child.wait_with_output())
        .await
        .expect("wait for walhook");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// What a running [`Tail`] does with its stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StdoutMode {
    /// Hand every line to the test ([`Tail::next_json`]).
    Lines,
    /// Only count lines and keep the first and the last (for huge outputs).
    Count,
}

/// What [`StdoutMode::Count`] saw.
#[derive(Debug, Default)]
pub struct Counted {
    pub lines: u64,
    pub bytes: u64,
    pub first: Option<String>,
    pub last: Option<String>,
}

/// How a [`Tail`] ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit code and stderr (stdout is empty: its lines went to [`Tail::next_json`]
    /// or were counted).
    pub outcome: Outcome,
    /// What [`StdoutMode::Count`] counted (lines and bytes in either mode).
    pub counted: Counted,
    /// Stdout lines the test had not read with [`Tail::next_json`].
    pub rest: Vec<String>,
    /// Highest VmHWM (peak resident set) seen while it ran, in KiB.
    pub peak_rss_kib: u64,
}

/// A running `walhook tail`. Killed if dropped while still running.
pub struct Tail {
    child: Child,
    /// Its process id.
    pub pid: u32,
    lines: mpsc::UnboundedReceiver<String>,
    /// `None` once [`Tail::close_stdout`] closed it.
    stdout_task: Option<JoinHandle<Counted>>,
    stderr_task: JoinHandle<String>,
    stderr: Arc<Mutex<String>>,
    peak_rss_kib: Arc<AtomicU64>,
}

impl Tail {
    /// Starts `walhook tail ARGS -c config`.
    pub fn spawn(
        extra_args: &[&str],
        config: &ConfigFile,
        database_url: &str,
        mode: StdoutMode,
    ) -> Tail {
        let mut args = vec!["tail"];
        args.extend_from_slice(extra_args);
        let mut child = command(&args, &config.path, database_url)
            .spawn()
            .expect("start walhook tail");
        let pid = child.id().expect("a running child has a pid");
        let (send, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdout_task = tokio::spawn(read_stdout(stdout, mode, send));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_task = tokio::spawn(read_all(
            child.stderr.take().expect("stderr is piped"),
            stderr.clone(),
        ));
        let peak_rss_kib = Arc::new(AtomicU64::new(0));
        tokio::spawn(watch_peak_rss(pid, peak_rss_kib.clone()));
        Tail {
            child,
            pid,
            lines,
            stdout_task: Some(stdout_task),
            stderr_task,
            stderr,
            peak_rss_kib,
        }
    }

    /// Name of the temporary slot a `walhook tail` without `--slot` creates.
    pub fn temporary_slot(&self) -> String {
        format!("walhook_tail_{}", self.pid)
    }

    /// What it has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next stdout line, parsed as JSON. Panics after `timeout` naming `what`, or if
    /// stdout ends first.
    pub async fn next_json(&mut self, what: &str, timeout: Duration) -> Value {
        let line = within(
            &format!("`walhook tail` to print {what}"),
            timeout,
            self.lines.recv(),
        )
        .await
        .unwrap_or_else(|| {
            panic!(
                "`walhook tail` closed stdout before printing {what}; stderr:\n{}",
                self.stderr()
            )
        });
        serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("{what}: stdout line is not JSON ({err}): {line}"))
    }

    /// Closes the read end of its stdout, as `walhook tail | head -n 1` does after one
    /// line; lines not read yet are lost.
    pub fn close_stdout(&mut self) {
        if let Some(task) = self.stdout_task.take() {
            task.abort();
        }
    }

    /// Sends SIGINT (Ctrl-C).
    pub fn interrupt(&self) {
        // SAFETY: kill(2) on our own child, which is not reaped before `finish`.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGINT) };
        assert_eq!(rc, 0, "send SIGINT to walhook tail");
    }

    /// The highest VmHWM (peak resident set) seen while it ran, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.peak_rss_kib.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until it exits and its output is read.
    pub async fn finish(mut self, timeout: Duration) -> Finished {
        let status = within("`walhook tail` to exit", timeout, self.child.wait())
            .await
            .expect("wait for walhook tail");
        let counted = match self.stdout_task.take() {
            Some(task) => within("`walhook tail` stdout to close", timeout, task)
                .await
                .expect("stdout reader"),
            None => Counted::default(),
        };
        let stderr = within(
            "`walhook tail` stderr to close",
            timeout,
            &mut self.stderr_task,
        )
        .await
        .expect("stderr reader");
        let mut rest = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            rest.push(line);
        }
        Finished {
            outcome: Outcome {
                code: status.code(),
                stdout: String::new(),
                stderr,
            },
            counted,
            rest,
            peak_rss_kib: self.peak_rss_kib(),
        }
    }
}

async fn read_stdout(
    stdout: impl AsyncRead + Unpin,
    mode: StdoutMode,
    lines: mpsc::UnboundedSender<String>,
) -> Counted {
    let mut reader = BufReader::with_capacity(256 * 1024, stdout);
    let mut counted = Counted::default();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => return counted,
            Ok(n) => {
                counted.lines += 1;
                counted.bytes += n as u64;
                let text = line.trim_end_matches('\n');
                match mode {
                    StdoutMode::Lines => {
                        let _ = lines.send(text.to_owned());
                    }
                    StdoutMode::Count => {
                        if counted.first.is_none() {
                            counted.first = Some(text.to_owned());
                        }
                        counted.last = Some(text.to_owned());
                    }
                }
            }
        }
    }
}

async fn read_all(mut stream: impl AsyncRead + Unpin, into: Arc<Mutex<String>>) -> String {
    let mut buf = vec![0; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return into.lock().unwrap().clone(),
            Ok(n) => into
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
}

/// Polls VmHWM of `pid` every 20 ms while /proc shows it, keeping the maximum.
async fn watch_peak_rss(pid: u32, peak_kib: Arc<AtomicU64>) {
    let path = format!("/proc/{pid}/status");
    loop {
        let Ok(status) = tokio::fs::read_to_string(&path).await else {
            return;
        };
        // A zombie (exited, not yet reaped) has no VmHWM line any more.
        let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        else {
            return;
        };
        peak_kib.fetch_max(kib, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
