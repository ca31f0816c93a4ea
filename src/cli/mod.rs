//! The `walhook` command line: argument parsing and one module per subcommand.

pub mod backfill;
pub mod check;
pub mod completions;
pub mod config_schema;
pub mod deliveries;
pub mod demo;
pub mod keys;
pub mod man;
pub mod operator;
pub mod run;
pub mod setup;
pub mod subscriptions;
pub mod tail;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::pg::ErrorChain;

/// walhook: PostgreSQL changes to signed, ordered, durable webhooks.
#[derive(Debug, Parser)]
#[command(name = "walhook", version, about, long_about = None, after_long_help = EXIT_STATUS_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The exit statuses, at the end of `walhook --help` and in the manual page.
const EXIT_STATUS_HELP: &str = "Exit status:
  0   success
  1   failure (the message on stderr, or the `walhook check` report, says why)
  2   bad command line arguments
  78  invalid config: walhook.toml or a WALHOOK_SECTION__KEY override (EX_CONFIG); the
      systemd unit does not restart walhook on it (RestartPreventExitStatus=78)";

/// Where the config file is.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path of walhook.toml.
    #[arg(
        short = 'c',
        long = "config",
        env = "WALHOOK_CONFIG",
        default_value = "walhook.toml"
    )]
    pub path: PathBuf,
}

impl ConfigArg {
    /// Loads and validates the config, or returns every problem in it.
    pub fn load(&self) -> Result<Config, config::ConfigErrors> {
        config::load(&self.path)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: replication stream -> entity events -> store (-> webhooks).
    Run(run::RunArgs),
    /// Apply store migrations and create the publication and the slot.
    Setup(setup::SetupArgs),
    /// Print the changes walhook sees on the configured tables, as JSON lines.
    Tail(tail::TailArgs),
    /// Check the config, the connection, the database settings, the tables,
    /// the publication and the slot; exit 1 on any error.
    Check(check::CheckArgs),
    /// List, show and replay deliveries (works while the daemon runs).
    Deliveries(deliveries::DeliveriesArgs),
    /// List subscriptions with their queues; pause or resume one.
    Subscriptions(subscriptions::SubscriptionsArgs),
    /// Send a table's existing rows as events (`{entity}.snapshot`), consistent with
    /// the live stream; `--status` lists backfills, `--resume` continues one.
    Backfill(backfill::BackfillArgs),
    /// Show walhook working end to end on a throwaway local PostgreSQL (no config needed).
    Demo(demo::DemoArgs),
    /// Config tools: `walhook config schema` prints the JSON Schema of walhook.toml.
    Config(config_schema::ConfigArgs),
    /// Key tools: `walhook keys generate` prints a new ed25519 key pair for
    /// signature = "v1a" (no config needed).
    Keys(keys::KeysArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Print the manual page (roff), e.g. `walhook man | man -l -`.
    Man(man::ManArgs),
}

/// How a command ended, as the process exit status.
///
/// 0 success; 1 any failure (its message says why); 78 (`EX_CONFIG` of sysexits.h)
/// when walhook.toml (or a `WALHOOK_SECTION__KEY` override) is invalid, so that a
/// supervisor can tell a config that will never work from a failure worth a restart
/// (the systemd unit sets `RestartPreventExitStatus=78`). Bad arguments exit 2
/// (clap's usage error), before any of this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exit status 0.
    Success,
    /// Exit status 1.
    Failure,
    /// Exit status 78: the config is invalid.
    Config,
}

impl Exit {
    /// Exit status of an invalid config (sysexits.h `EX_CONFIG`).
    pub const CONFIG_STATUS: u8 = 78;

    /// The exit for a command that failed with `err`: [`Exit::Config`] when a
    /// [`config::ConfigErrors`] is anywhere in its chain, else [`Exit::Failure`].
    pub fn for_error(err: &anyhow::Error) -> Exit {
        if err.chain().any(|cause| cause.is::<config::ConfigErrors>()) {
            Exit::Config
        } else {
            Exit::Failure
        }
    }

    /// [`Exit::Success`] or [`Exit::Failure`].
    pub fn from_success(ok: bool) -> Exit {
        if ok { Exit::Success } else { Exit::Failure }
    }

    /// The numeric exit status.
    pub fn status(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Config => Exit::CONFIG_STATUS,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.status())
    }
}

/// Writes `bytes` to stdout; a reader that went away is fine, other errors exit 1.
pub(crate) fn write_stdout(bytes: &[u8], what: &str) -> Exit {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Exit::Success,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Success,
        Err(e) => {
            eprintln!("error: cannot write the {what} to stdout: {e}");
            Exit::Failure
        }
    }
}

/// An error and its causes on one line (see [`ErrorChain`]): the `error:` line of
/// every command.
pub fn error_chain(err: &anyhow::Error) -> String {
    let err: &(dyn std::error::Error + 'static) = err.as_ref();
    ErrorChain(err).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_anywhere_in_the_chain_exit_78() {
        let invalid = config::load_str("[source]\nurl = 1\n", "walhook.toml", &|_| None)
            .expect_err("a number is no URL");
        let direct = anyhow::Error::from(invalid.clone());
        assert_eq!(Exit::for_error(&direct), Exit::Config);
        let wrapped = anyhow::Error::from(invalid).context("load walhook.toml");
        assert_eq!(Exit::for_error(&wrapped), Exit::Config);
        assert_eq!(
            Exit::for_error(&anyhow::anyhow!("connection refused")),
            Exit::Failure
        );
        assert_eq!(Exit::Config.status(), 78);
        assert_eq!(Exit::from_success(false).status(), 1);
        assert_eq!(Exit::from_success(true).status(), 0);
    }
}
