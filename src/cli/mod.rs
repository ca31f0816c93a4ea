//! The `walhook` command line: argument parsing and one module per subcommand.

pub mod check;
pub mod config_schema;
pub mod deliveries;
pub mod demo;
pub mod operator;
pub mod run;
pub mod setup;
pub mod subscriptions;
pub mod tail;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};

/// walhook: PostgreSQL changes to signed, ordered, durable webhooks.
#[derive(Debug, Parser)]
#[command(name = "walhook", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

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
    /// Show walhook working end to end on a throwaway local PostgreSQL (no config needed).
    Demo(demo::DemoArgs),
    /// Config tools: `walhook config schema` prints the JSON Schema of walhook.toml.
    Config(config_schema::ConfigArgs),
}

/// An error and its causes on one line, without repeating a cause that the message
/// already contains; when a PostgreSQL error in the chain has a known remedy that the
/// message does not give yet, that remedy follows.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    let fix = err
        .chain()
        .filter_map(|cause| cause.downcast_ref::<tokio_postgres::Error>())
        .find_map(|pg| pg.code().and_then(|code| fix_for_sqlstate(code.code())));
    if let Some(fix) = fix
        && !out.contains("Fix:")
    {
        // PostgreSQL's text may end with a sentence of its own ("HINT: ... space.").
        out.truncate(out.trim_end_matches(['.', ' ', '\n']).len());
        out.push_str(". ");
        out.push_str(fix);
    }
    out
}

/// The remedy for a PostgreSQL error that a walhook message may carry unexplained
/// (mostly from the store, which shares no code with the source's checks).
fn fix_for_sqlstate(code: &str) -> Option<&'static str> {
    Some(match code {
        "25006" => {
            "Fix: the database refuses writes (default_transaction_read_only is on, or it is a hot standby): point the url at a writable primary, or run `ALTER DATABASE <name> SET default_transaction_read_only = off;`"
        }
        "53100" => {
            "Fix: the database server's disk is full: free space there, then start walhook again"
        }
        "42501" => {
            "Fix: grant the role the privilege PostgreSQL names (sql/least-privilege.sql lists what walhook needs), or use another role"
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sqlstates_get_a_fix() {
        assert!(fix_for_sqlstate("25006").unwrap().contains("read_only"));
        assert!(fix_for_sqlstate("53100").unwrap().contains("disk is full"));
        assert_eq!(fix_for_sqlstate("23505"), None);
    }
}
