//! `walhook check`: a readable report, one line per check with ok / warn / error and
//! the fix for each problem. Exit 1 on any error.

use std::fmt::Write as _;

use super::ConfigArg;
use crate::source::connect::ConnectParams;
use crate::source::setup::{self, SetupError};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Error,
}

#[derive(Default)]
struct Report {
    lines: String,
    errors: usize,
    warnings: usize,
}

impl Report {
    fn add(&mut self, level: Level, what: &str, detail: impl std::fmt::Display) {
        let tag = match level {
            Level::Ok => "ok   ",
            Level::Warn => {
                self.warnings += 1;
                "warn "
            }
            Level::Error => {
                self.errors += 1;
                "error"
            }
        };
        let _ = writeln!(self.lines, "{tag} {what}: {detail}");
    }
}

/// Runs `walhook check`; returns whether everything passed (no errors).
pub async fn run(args: CheckArgs) -> anyhow::Result<bool> {
    let mut report = Report::default();
    let ok = check(&args, &mut report).await;
    print!("{}", report.lines);
    println!("{} error(s), {} warning(s)", report.errors, report.warnings);
    Ok(ok && report.errors == 0)
}

async fn check(args: &CheckArgs, report: &mut Report) -> bool {
    let config = match args.config.load() {
        Ok(c) => {
            report.add(Level::Ok, "config", args.config.path.display());
            c
        }
        Err(errors) => {
            report.add(Level::Error, "config", errors);
            return false;
        }
    };
    for key in config.inactive_keys() {
        report.add(
            Level::Warn,
            "config",
            format!("`{key}` is accepted but not active yet in this version"),
        );
    }
    let params = match ConnectParams::parse(config.source.url.expose().as_str()) {
        Ok(p) => p,
        Err(e) => {
            report.add(Level::Error, "source.url", e);
            return false;
        }
    };
    let client = match params.connect_sql().await {
        Ok(c) => {
            report.add(Level::Ok, "connection", params.redacted());
            c
        }
        Err(e) => {
            report.add(Level::Error, "connection", params.describe_sql_error(e));
            return false;
        }
    };
    match setup::check_wal_level(&client).await {
        Ok(()) => report.add(Level::Ok, "wal_level", "logical"),
        Err(e) => report.add(Level::Error, "wal_level", e),
    }
    match setup::check_replication_role(&client).await {
        Ok(()) => report.add(Level::Ok, "replication privilege", "granted"),
        Err(e) => report.add(Level::Error, "replication privilege", e),
    }
    let tables = super::tail::watched_tables(&config);
    for (table, cfg) in tables.iter().zip(&config.tables) {
        match setup::inspect_tables(&client, std::slice::from_ref(table)).await {
            Ok(infos) => {
                let info = &infos[0];
                let needs = cfg.needs_full_identity();
                if info.replica_identity != 'f' && !needs.is_empty() {
                    report.add(
                        Level::Error,
                        &format!("table {table}"),
                        format!(
                            "{} need the old row, which only REPLICA IDENTITY FULL provides. Fix: `ALTER TABLE {} REPLICA IDENTITY FULL;`",
                            needs.join(", "),
                            table.quoted()
                        ),
                    );
                } else if info.replica_identity != 'f' && !info.toastable.is_empty() {
                    report.add(
                        Level::Warn,
                        &format!("table {table}"),
                        format!(
                            "columns {} may be TOASTed; an UPDATE that leaves them unchanged will omit them from `data`. Fix if you need them: `ALTER TABLE {} REPLICA IDENTITY FULL;`",
                            info.toastable.join(", "),
                            table.quoted()
                        ),
                    );
                } else {
                    report.add(
                        Level::Ok,
                        &format!("table {table}"),
                        "exists, has an identity",
                    );
                }
            }
            Err(e) => report.add(Level::Error, &format!("table {table}"), e),
        }
    }
    match setup::published_tables(&client, &config.source.publication).await {
        Ok(None) => report.add(
            Level::Warn,
            "publication",
            format!(
                "`{}` does not exist yet; `walhook setup` or `walhook run` creates it (if the role may not: {})",
                config.source.publication,
                setup::publication_sql(&config.source.publication, &tables, false)
            ),
        ),
        Ok(Some(published)) => {
            let mut wanted = tables.clone();
            wanted.sort();
            wanted.dedup();
            if published == wanted {
                report.add(Level::Ok, "publication", format!("`{}` publishes exactly the watched tables", config.source.publication));
            } else {
                report.add(
                    Level::Warn,
                    "publication",
                    format!(
                        "`{}` differs from the config; `walhook run` will change it (if the role may not: {})",
                        config.source.publication,
                        setup::publication_sql(&config.source.publication, &wanted, true)
                    ),
                );
            }
        }
        Err(e) => report.add(Level::Error, "publication", e),
    }
    match setup::check_slot_usable(&client, &config.source.slot).await {
        Ok(info) => report.add(
            Level::Ok,
            "slot",
            format!(
                "`{}` confirmed up to {}",
                config.source.slot,
                info.confirmed_flush
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "-".into())
            ),
        ),
        Err(SetupError::NoSlot(_)) => report.add(
            Level::Warn,
            "slot",
            format!(
                "`{}` does not exist yet; `walhook setup` or `walhook run` creates it",
                config.source.slot
            ),
        ),
        Err(e) => report.add(Level::Error, "slot", e),
    }
    true
}
