//! `walhook tail`: print what walhook sees, one JSON line per change, until Ctrl-C.
//!
//! By default it reads a TEMPORARY slot of its own, so it never disturbs the daemon's
//! slot. With `--slot NAME` it reads an existing slot from its confirmed position without
//! ever confirming progress.

use std::io::Write;

use serde::Serialize;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use super::ConfigArg;
use crate::config::Config;
use crate::pg::TableName;
use crate::source::Lsn;
use crate::source::decoder::{Decoded, Row};
use crate::source::publication::{self, Ending, Publication};
use crate::source::setup;
use crate::source::stream::{ConfirmMode, Position, ReplicationStream, StreamOptions};

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Read this existing slot (from its confirmed position) instead of a temporary
    /// one. Progress is never confirmed, so the slot is left as it was; the daemon
    /// cannot use the slot meanwhile.
    #[arg(long)]
    pub slot: Option<String>,
    /// Stop after the first transaction that commits at or beyond this WAL position.
    #[arg(long, value_name = "LSN")]
    pub endpos: Option<Lsn>,
}

/// One printed line.
#[derive(Serialize)]
struct Line<'a> {
    table: &'a str,
    op: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    new: Option<&'a Row>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old: Option<&'a Row>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    unchanged_toast: &'a [String],
    xid: u32,
    lsn: String,
    commit_time: &'a str,
}

/// Runs `walhook tail`.
pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    // Listen for Ctrl-C and SIGTERM before anything else, and once: a signal that
    // arrives while connecting or while a change is being printed is kept until a
    // `select!` below looks, instead of killing the process or being lost.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut stream = tokio::select! {
        biased;
        _ = sigint.recv() => return Ok(()),
        _ = sigterm.recv() => return Ok(()),
        stream = connect(&args) => stream?,
    };
    info!("tailing; press Ctrl-C to stop");

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let mut txn: Option<(u32, Lsn, String)> = None;
    loop {
        let item = tokio::select! {
            biased;
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            item = stream.next() => item?,
        };
        match item {
            Decoded::Begin {
                xid,
                final_lsn,
                commit_time,
            } => {
                txn = Some((xid, final_lsn, format_commit_time(commit_time)));
            }
            Decoded::Change(change) => {
                let (xid, lsn, time) = txn
                    .as_ref()
                    .map(|(x, l, t)| (*x, *l, t.as_str()))
                    .unwrap_or((0, Lsn::INVALID, ""));
                let table = change.table.to_string();
                let line = Line {
                    table: &table,
                    op: change.op.as_str(),
                    new: change.new.as_ref(),
                    old: change.old.as_ref(),
                    unchanged_toast: &change.unchanged_toast,
                    xid,
                    lsn: lsn.to_string(),
                    commit_time: time,
                };
                let written = serde_json::to_writer(&mut out, &line)
                    .map_err(std::io::Error::from)
                    .and_then(|()| out.write_all(b"\n"));
                if reader_gone(written)? {
                    break;
                }
            }
            Decoded::Commit {
                end_lsn,
                commit_lsn,
                ..
            } => {
                txn = None;
                if reader_gone(out.flush())? {
                    break;
                }
                stream.confirm(end_lsn);
                if args.endpos.is_some_and(|end| commit_lsn >= end) {
                    break;
                }
            }
            Decoded::Truncate { tables, .. } => {
                let names: Vec<String> = tables.iter().map(|t| t.to_string()).collect();
                warn!(tables = ?names, "tables truncated; walhook emits no events for TRUNCATE");
            }
            Decoded::LogicalMessage { .. } => {}
        }
    }
    reader_gone(out.flush())?;
    drop(out);
    stream.close().await;
    Ok(())
}

/// Whether a write failed because stdout was closed (`walhook tail | head`): a normal
/// way to stop, not an error. Other write errors are returned.
fn reader_gone(written: std::io::Result<()>) -> anyhow::Result<bool> {
    match written {
        Ok(()) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// Checks the database and the config's tables, then connects the stream: to a new
/// TEMPORARY slot (keeping the publication in step), or to `--slot` without touching
/// the publication.
async fn connect(args: &TailArgs) -> anyhow::Result<ReplicationStream> {
    let config = args.config.load()?;
    let params = config.source.url.expose().clone();
    let tables = watched_tables(&config);

    let sql = params.connect_sql().await?;
    setup::check_wal_level(&sql).await?;
    setup::check_replication_role(&sql).await?;
    setup::inspect_tables(&sql, &tables).await?;

    let (slot, temporary, confirm) = match &args.slot {
        Some(slot) => {
            setup::check_slot_usable(&sql, slot).await?;
            let published = publication::published_tables(&sql, &config.source.publication).await?;
            if published.is_none() {
                anyhow::bail!(
                    "publication `{}` does not exist; `tail --slot` never creates or alters it. Fix: run `walhook setup` or `walhook run` first",
                    config.source.publication
                );
            }
            warn!(slot = %slot, "reading an existing slot without confirming progress; the daemon cannot use this slot until tail exits");
            (slot.clone(), false, ConfirmMode::Never)
        }
        None => {
            Publication::read(&sql, &config.source.publication, &tables)
                .await?
                .apply(&sql, Ending::Commit)
                .await?;
            let slot = format!("walhook_tail_{}", std::process::id());
            (slot, true, ConfirmMode::Consumer)
        }
    };
    drop(sql);

    let mut stream = ReplicationStream::new(
        params,
        StreamOptions {
            slot,
            publication: config.source.publication.clone(),
            temporary,
            confirm,
            application_name: "walhook tail".into(),
            resume: Position::default(),
        },
    );
    stream.connect().await?;
    Ok(stream)
}

/// The configured tables as schema-qualified names.
pub fn watched_tables(config: &Config) -> Vec<TableName> {
    config
        .tables
        .iter()
        .map(|t| TableName {
            schema: t.schema.clone(),
            name: t.name.clone(),
        })
        .collect()
}

/// RFC 3339 UTC with microseconds, from the protocol's clock.
pub fn format_commit_time(pg_micros: i64) -> String {
    crate::pg::pg_micros_to_utc(pg_micros)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn commit_time_is_rfc3339_utc_micros() {
        // 2000-01-01 00:00:00.000001 UTC is 1 µs on the protocol clock.
        assert_eq!(super::format_commit_time(1), "2000-01-01T00:00:00.000001Z");
    }
}
