//! `walhook check`: a readable report, one line per check with ok / warn / error and
//! the fix for each problem. Exit 78 when the config is invalid, 1 on any other error.

use std::fmt::Write as _;

use super::{ConfigArg, Exit};
use crate::daemon::DaemonError;
use crate::mapping::Mapper;
use crate::pg::{ConnInfo, ErrorChain, Host, SslMode};
use crate::source::SourceError;
use crate::source::publication::{Ending, Publication};
use crate::source::setup;
use crate::store::{Checkpoint, Store};

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

/// Runs `walhook check`: [`Exit::Success`] when everything passed, [`Exit::Config`]
/// when the config is invalid (nothing else is checked then), else [`Exit::Failure`].
pub async fn run(args: CheckArgs) -> anyhow::Result<Exit> {
    let mut report = Report::default();
    let ended = check(&args, &mut report).await;
    print!("{}", report.lines);
    println!("{} error(s), {} warning(s)", report.errors, report.warnings);
    Ok(match ended {
        Ended::InvalidConfig => Exit::Config,
        Ended::Early => Exit::Failure,
        Ended::Complete => Exit::from_success(report.errors == 0),
    })
}

/// How far [`check`] got.
enum Ended {
    /// The config did not load.
    InvalidConfig,
    /// A check that the others depend on failed (the report says which).
    Early,
    /// Every check ran.
    Complete,
}

async fn check(args: &CheckArgs, report: &mut Report) -> Ended {
    let config = match args.config.load() {
        Ok(c) => {
            report.add(Level::Ok, "config", args.config.path.display());
            c
        }
        Err(errors) => {
            report.add(Level::Error, "config", errors);
            return Ended::InvalidConfig;
        }
    };
    for key in config.inactive_keys() {
        report.add(
            Level::Warn,
            "config",
            format!("`{key}` is accepted but not active yet in this version"),
        );
    }
    let params = config.source.url.expose();
    let client = match params.connect_sql().await {
        Ok(c) => {
            report.add(Level::Ok, "connection", params.to_string());
            tls_line(params, report);
            c
        }
        Err(e) => {
            report.add(Level::Error, "connection", ErrorChain(&e));
            return Ended::Early;
        }
    };
    match setup::check_wal_level(&client).await {
        Ok(()) => report.add(Level::Ok, "wal_level", "logical"),
        Err(e) => report.add(Level::Error, "wal_level", ErrorChain(&e)),
    }
    match setup::check_replication_role(&client).await {
        Ok(()) => report.add(Level::Ok, "replication privilege", "granted"),
        Err(e) => report.add(Level::Error, "replication privilege", ErrorChain(&e)),
    }
    let own_slot = matches!(
        setup::slot_info(&client, &config.source.slot).await,
        Ok(Some(_))
    );
    match setup::headroom(&client).await {
        Ok(h) => headroom_lines(h, own_slot, report),
        Err(e) => report.add(Level::Warn, "replication headroom", ErrorChain(&e)),
    }
    let tables = super::tail::watched_tables(&config);
    let errors_before = report.errors;
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
                } else if let Err(e) =
                    Mapper::new(std::slice::from_ref(cfg), std::slice::from_ref(info))
                {
                    report.add(Level::Error, &format!("table {table}"), ErrorChain(&e));
                } else {
                    report.add(
                        Level::Ok,
                        &format!("table {table}"),
                        "exists, id columns and configured columns present, has an identity",
                    );
                }
            }
            Err(e) => report.add(Level::Error, &format!("table {table}"), ErrorChain(&e)),
        }
    }
    let tables_ok = report.errors == errors_before;
    if tables_ok && let Err(e) = crate::daemon::prepare::table_rules(&client, &config).await {
        // Each table alone passed; together they do not (as `walhook run` sees them).
        report.add(Level::Error, "tables", ErrorChain(&e));
    }
    if tables_ok {
        publication_line(&client, &config.source.publication, &tables, report).await;
    } else {
        report.add(
            Level::Warn,
            "publication",
            "not checked until the tables above are fixed",
        );
    }
    let checkpoint = store_checkpoint(&config).await;
    slot_line(&client, &config.source.slot, checkpoint, report).await;
    match setup::retained_wal(&client, &config.source.slot).await {
        Ok(Some(wal)) => retained_wal_line(&config.source.slot, &wal, report),
        Ok(None) => {}
        Err(e) => report.add(Level::Warn, "slot WAL", ErrorChain(&e)),
    }
    store_line(&config, report).await;
    Ended::Complete
}

/// Whether the publication publishes exactly the watched tables, or `walhook run` may
/// make it so (tried in a rolled-back transaction); otherwise the SQL a DBA must run.
async fn publication_line(
    client: &tokio_postgres::Client,
    name: &str,
    tables: &[crate::pg::TableName],
    report: &mut Report,
) {
    let tried = match Publication::read(client, name, tables).await {
        Ok(plan) => plan
            .apply(client, Ending::RollBack)
            .await
            .map(|_| plan.sql()),
        Err(e) => Err(e),
    };
    match tried {
        Ok(None) => report.add(
            Level::Ok,
            "publication",
            format!("`{name}` publishes exactly the watched tables"),
        ),
        Ok(Some(sql)) => report.add(
            Level::Warn,
            "publication",
            format!(
                "`{name}` does not publish exactly the watched tables; `walhook setup` or `walhook run` will run: {sql}"
            ),
        ),
        Err(e) => report.add(Level::Error, "publication", ErrorChain(&e)),
    }
}

/// The store's checkpoint for `config`'s slot, if the store is reachable, migrated and
/// has one (the store line reports what is wrong with the store otherwise).
async fn store_checkpoint(config: &crate::config::Config) -> Option<Checkpoint> {
    let store = Store::connect(config.store.url.expose(), &config.store.schema)
        .await
        .ok()?;
    store.checkpoint(&config.source.slot).await.ok().flatten()
}

/// Whether the slot can be used, or would be created; a store checkpoint without a
/// usable slot is the lost slot `walhook run` refuses (G1).
async fn slot_line(
    client: &tokio_postgres::Client,
    slot: &str,
    checkpoint: Option<Checkpoint>,
    report: &mut Report,
) {
    let lost = |lsn: String| DaemonError::SlotLost {
        slot: slot.to_owned(),
        lsn,
    };
    match setup::check_slot_usable(client, slot).await {
        Ok(info) if info.wal_status.as_deref() == Some("lost") => {
            let lsn = checkpoint
                .map(|c| c.position.commit_lsn.to_string())
                .unwrap_or_else(|| "-".into());
            report.add(Level::Error, "slot", lost(lsn))
        }
        Ok(info) => report.add(
            Level::Ok,
            "slot",
            format!(
                "`{slot}` confirmed up to {}",
                info.confirmed_flush
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "-".into())
            ),
        ),
        Err(SourceError::NoSlot(_)) => match checkpoint {
            Some(cp) => report.add(
                Level::Error,
                "slot",
                lost(cp.position.commit_lsn.to_string()),
            ),
            None => report.add(
                Level::Warn,
                "slot",
                format!("`{slot}` does not exist yet; `walhook setup` or `walhook run` creates it"),
            ),
        },
        Err(e) => report.add(Level::Error, "slot", ErrorChain(&e)),
    }
}

/// Whether the source connection is encrypted and verified.
fn tls_line(params: &ConnInfo, report: &mut Report) {
    let local = params.hosts.iter().all(|h| match &h.host {
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Host::Unix(_) => true,
    });
    let verified_chain = params.tls.roots.is_some();
    let (level, detail) = match params.tls.mode {
        SslMode::VerifyFull => (
            Level::Ok,
            "sslmode=verify-full: encrypted, certificate and host name verified",
        ),
        SslMode::VerifyCa => (
            Level::Ok,
            "sslmode=verify-ca: encrypted, certificate verified (host name not checked)",
        ),
        _ if local => (Level::Ok, "local connection; TLS not needed"),
        SslMode::Require if verified_chain => (
            Level::Warn,
            "sslmode=require with a root certificate file: encrypted, certificate verified, host name not checked. Fix: `sslmode=verify-full`",
        ),
        SslMode::Disable => (
            Level::Warn,
            "sslmode=disable: credentials and changes cross the network unencrypted. Fix: `sslmode=verify-full` with `sslrootcert=` in [source] url",
        ),
        SslMode::Prefer | SslMode::Require => (
            Level::Warn,
            "the server certificate is not verified (sslmode prefer/require). Fix: `sslmode=verify-full` with `sslrootcert=` (a CA file, or `system`) in [source] url",
        ),
    };
    report.add(level, "tls", detail);
}

/// Free replication slots and WAL senders.
fn headroom_lines(h: setup::Headroom, own_slot: bool, report: &mut Report) {
    let slots = format!(
        "{} of max_replication_slots = {} in use",
        h.slots_used, h.slots_max
    );
    if h.slots_used >= h.slots_max && !own_slot {
        report.add(
            Level::Error,
            "replication slots",
            format!("{slots}; none is free for a new slot. Fix: drop an unused slot (`SELECT pg_drop_replication_slot('name');`) or raise max_replication_slots (restart)"),
        );
    } else {
        report.add(Level::Ok, "replication slots", slots);
    }
    let senders = format!(
        "{} of max_wal_senders = {} in use",
        h.senders_used, h.senders_max
    );
    if h.senders_used >= h.senders_max {
        report.add(
            Level::Error,
            "wal senders",
            format!("{senders}; walhook needs one (a standby instance needs one while it takes over). Fix: raise max_wal_senders (restart)"),
        );
    } else if h.senders_max - h.senders_used < 2 {
        report.add(
            Level::Warn,
            "wal senders",
            format!("{senders}; a standby walhook instance could not take over while the holder reconnects. Fix: raise max_wal_senders (restart)"),
        );
    } else {
        report.add(Level::Ok, "wal senders", senders);
    }
}

/// WAL kept for the slot against `max_slot_wal_keep_size`.
fn retained_wal_line(slot: &str, wal: &setup::RetainedWal, report: &mut Report) {
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    let retained = wal.retained_bytes.unwrap_or(0);
    match (wal.wal_status.as_deref(), wal.keep_limit_bytes) {
        (Some("lost"), _) => {} // the slot line above says it
        (Some("unreserved"), _) => report.add(
            Level::Error,
            "slot WAL",
            format!("`{slot}` retains {:.1} MiB and is past max_slot_wal_keep_size: the server is about to remove WAL it still needs. Fix: start walhook now, or raise max_slot_wal_keep_size", mib(retained)),
        ),
        (_, Some(limit)) if retained * 2 > limit => report.add(
            Level::Warn,
            "slot WAL",
            format!("`{slot}` retains {:.1} MiB, over half of max_slot_wal_keep_size ({:.0} MiB); if walhook stays behind, the slot will be lost. Fix: make sure walhook runs and keeps up, or raise max_slot_wal_keep_size", mib(retained), mib(limit)),
        ),
        (_, Some(limit)) => report.add(
            Level::Ok,
            "slot WAL",
            format!("`{slot}` retains {:.1} MiB of max_slot_wal_keep_size {:.0} MiB", mib(retained), mib(limit)),
        ),
        (_, None) => report.add(
            Level::Ok,
            "slot WAL",
            format!("`{slot}` retains {:.1} MiB (max_slot_wal_keep_size is unlimited: a stopped walhook makes the server keep WAL until the disk fills; consider a cap)", mib(retained)),
        ),
    }
}

/// Whether the store is reachable and migrated.
async fn store_line(config: &crate::config::Config, report: &mut Report) {
    let params = config.store.url.expose();
    let client = match params.connect_sql().await {
        Ok(c) => c,
        Err(e) => return report.add(Level::Error, "store", ErrorChain(&e)),
    };
    let mut client = client;
    let known = crate::store::migrations::MIGRATIONS.len();
    // What `walhook run` would apply, tried in a transaction that is rolled back.
    match crate::store::migrations::dry_run(&mut client, &config.store.schema).await {
        Ok(0) => report.add(
            Level::Ok,
            "store",
            format!("schema `{}` at version {known}", config.store.schema),
        ),
        Ok(n) => report.add(
            Level::Ok,
            "store",
            format!(
                "schema `{}` needs {n} of {known} migrations; `walhook setup` or `walhook run` applies them",
                config.store.schema
            ),
        ),
        Err(e) => report.add(
            Level::Error,
            "store",
            format!(
                "schema `{}` cannot be created or migrated by this role: {}. Fix: have a DBA create the schema owned by this role (sql/least-privilege.sql) or apply `walhook setup --print-sql`",
                config.store.schema,
                e.refusal().what
            ),
        ),
    }
}
