//! `walhook backfill`: asks the daemon that holds the slot to send a table's existing
//! rows as events, then shows its progress (a progress bar on a terminal, a line every
//! few seconds otherwise) until it is done. `--status` lists backfills; `--resume`
//! follows an unfinished one again, or runs a failed one again from its cursor.
//!
//! The CLI only records the request (table `backfills` of the store) and reads its
//! progress; the daemon reads the rows and merges them into its stream (see
//! [`crate::backfill`]). Interrupting the CLI does not stop the backfill.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::ConfigArg;
use super::operator::{Table, check_subscription, configured, human_time, open_store};
use crate::backfill::worker::table_name;
use crate::config::Config;
use crate::pg::ErrorChain;
use crate::store::Store;
use crate::store::backfills::{Backfill, BackfillRequest, BackfillStatus};

#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The table to backfill, schema-qualified as in walhook.toml (e.g. public.users).
    #[arg(long, required_unless_present_any = ["status", "resume"], conflicts_with_all = ["status", "resume"])]
    pub table: Option<String>,
    /// Only the rows matching this SQL condition (e.g. "org_id = 7").
    #[arg(long = "where", value_name = "SQL", requires = "table")]
    pub where_sql: Option<String>,
    /// The event name (default: {entity}.snapshot).
    #[arg(long, value_name = "NAME", requires = "table")]
    pub event: Option<String>,
    /// Deliver the events to this subscription only (default: every subscription whose
    /// events match).
    #[arg(long, value_name = "NAME", requires = "table")]
    pub subscription: Option<String>,
    /// List running and finished backfills.
    #[arg(long, conflicts_with = "resume")]
    pub status: bool,
    /// Follow an unfinished backfill again, or run a failed one again from its cursor
    /// (default: the newest unfinished or failed one).
    #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "0")]
    pub resume: Option<i64>,
    /// Record the request and exit, without showing progress.
    #[arg(long, conflicts_with = "status")]
    pub detach: bool,
}

/// Runs `walhook backfill`; `false` when the backfill failed.
pub async fn run(args: BackfillArgs) -> anyhow::Result<bool> {
    let config = args.config.load()?;
    let store = open_store(&config).await?;
    if args.status {
        status(&store).await?;
        return Ok(true);
    }
    let id = match args.resume {
        Some(id) => resume(&store, id).await?,
        None => request(&config, &store, &args).await?,
    };
    if args.detach {
        return Ok(true);
    }
    follow(&store, id).await
}

async fn request(config: &Config, store: &Store, args: &BackfillArgs) -> anyhow::Result<i64> {
    let table = args.table.as_deref().unwrap_or_default();
    let Some(t) = config.tables.iter().find(|t| t.qualified_name() == table) else {
        let known: Vec<String> = config.tables.iter().map(|t| t.qualified_name()).collect();
        bail!(
            "table `{table}` is not in walhook.toml's [[tables]] ({}); walhook backfills only watched tables",
            if known.is_empty() {
                "it has none".to_owned()
            } else {
                format!("watched: {}", known.join(", "))
            }
        );
    };
    if let Some(event) = &args.event
        && (event.is_empty() || event.contains(char::is_whitespace))
    {
        bail!(
            "--event `{event}`: an event name is a full name such as user.resent, without spaces"
        );
    }
    let event = args
        .event
        .clone()
        .unwrap_or_else(|| format!("{}.snapshot", t.entity));
    if let Some(name) = &args.subscription {
        let names = configured(config);
        check_subscription(name, &names, &[])?;
        if let Some(s) = config
            .subscriptions
            .iter()
            .find(|s| s.name.as_str() == name)
        {
            takes_event(name, s.events.patterns(), s.events.matches(&event), &event)?;
        }
    }
    let name = table_name(table).context("a table name is schema.table")?;
    let client = config.source.url.expose().connect_sql().await?;
    let shape = crate::backfill::read::describe(&client, &name)
        .await?
        .map_err(anyhow::Error::msg)?;
    if let Some(w) = &args.where_sql {
        // Prepared, not run: a bad condition fails here with PostgreSQL's message.
        let sql = format!("SELECT 1 FROM {} WHERE ({w}) LIMIT 0", name.quoted());
        if let Err(e) = client.prepare(&sql).await {
            let why = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| ErrorChain(&e).to_string());
            bail!("--where `{w}` is not a valid condition on {table}: {why}");
        }
    }
    drop(shape);
    let id = store
        .request_backfill(&BackfillRequest {
            table: table.to_owned(),
            where_sql: args.where_sql.clone(),
            event: args.event.clone(),
            subscription: args.subscription.clone(),
        })
        .await?;
    eprintln!(
        "backfill {id} requested: {table} as {event} events, to {}; the daemon that holds the slot runs it",
        args.subscription
            .as_deref()
            .map(|s| format!("subscription {s} only"))
            .unwrap_or_else(|| "every matching subscription".into())
    );
    Ok(id)
}

/// Refuses a backfill for subscription `name` whose `events` patterns never match the
/// backfill's event name: it would read the whole table and deliver nothing.
fn takes_event(name: &str, patterns: &[String], matches: bool, event: &str) -> anyhow::Result<()> {
    if matches {
        return Ok(());
    }
    let listed: Vec<String> = patterns.iter().map(|p| format!("\"{p}\"")).collect();
    bail!(
        "subscription `{name}` does not take `{event}` events (its events = [{}]), so this backfill would deliver it nothing; fix: pass --event with a name its events match, or add \"{event}\" (or \"*.snapshot\") to its events in walhook.toml",
        listed.join(", ")
    )
}

/// The backfill to follow for `--resume [ID]` (0: the newest unfinished or failed).
async fn resume(store: &Store, id: i64) -> anyhow::Result<i64> {
    let b = if id == 0 {
        let all = store.list_backfills().await?;
        match all
            .into_iter()
            .rev()
            .find(|b| b.status != BackfillStatus::Done)
        {
            Some(b) => b,
            None => {
                bail!("no unfinished or failed backfill to resume (see walhook backfill --status)")
            }
        }
    } else {
        match store.backfill(id).await? {
            Some(b) => b,
            None => bail!("no backfill {id} (see walhook backfill --status)"),
        }
    };
    match b.status {
        BackfillStatus::Done => bail!("backfill {} is done; nothing to resume", b.id),
        BackfillStatus::Failed => {
            store.retry_backfill(b.id).await?;
            eprintln!(
                "backfill {} runs again after its last stored row ({} rows read before)",
                b.id, b.rows_done
            );
        }
        BackfillStatus::Pending | BackfillStatus::Running => {}
    }
    Ok(b.id)
}

async fn status(store: &Store) -> anyhow::Result<()> {
    let mut table = Table::new(vec![
        "ID",
        "TABLE",
        "STATUS",
        "ROWS",
        "EVENTS",
        "EVENT",
        "SUBSCRIPTION",
        "ORIGIN",
        "REQUESTED",
        "FINISHED",
        "ERROR",
    ]);
    for b in store.list_backfills().await? {
        table.row(vec![
            b.id.to_string(),
            b.request.table.clone(),
            b.status.as_str().to_owned(),
            match b.rows_total {
                Some(total) => format!("{}/{total}", b.rows_done),
                None => b.rows_done.to_string(),
            },
            b.events.to_string(),
            b.request.event.clone().unwrap_or_else(|| "-".into()),
            b.request.subscription.clone().unwrap_or_else(|| "-".into()),
            b.origin.clone(),
            human_time(b.requested_at),
            b.finished_at.map(human_time).unwrap_or_else(|| "-".into()),
            b.error.clone().unwrap_or_default(),
        ]);
    }
    print!("{}", table.render());
    Ok(())
}

/// How often progress is read from the store.
const POLL: Duration = Duration::from_millis(200);
/// How often a progress line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// Shows the backfill's progress until it ends; `false` when it failed.
async fn follow(store: &Store, id: i64) -> anyhow::Result<bool> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("backfill {id}"));
        bar
    });
    let started = Instant::now();
    let mut last_line: Option<Instant> = None;
    let mut first_rows: Option<(Instant, i64)> = None;
    loop {
        let b = store
            .backfill(id)
            .await?
            .with_context(|| format!("backfill {id} is gone from the store"))?;
        if first_rows.is_none() && b.status == BackfillStatus::Running {
            first_rows = Some((Instant::now(), b.rows_done));
        }
        if let Some(bar) = &bar {
            bar.set_length(b.rows_total.unwrap_or(0).max(b.rows_done) as u64);
            bar.set_position(b.rows_done as u64);
            // The rate and ETA are the plain lines' (indicatif's own estimate jumps
            // with the chunk-sized steps of the position).
            bar.set_message(progress(&b, first_rows));
        } else if last_line.is_none_or(|t| t.elapsed() >= LINE_EVERY) && !b.status.is_final() {
            eprintln!("{}", line(&b, first_rows));
            last_line = Some(Instant::now());
        }
        if b.status.is_final() {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(report(&b, started.elapsed()));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn waiting(b: &Backfill) -> String {
    if b.status == BackfillStatus::Pending {
        "(waiting for the daemon that holds the slot)".into()
    } else {
        String::new()
    }
}

/// One progress line: the backfill, its table and status, then [`progress`].
fn line(b: &Backfill, first: Option<(Instant, i64)>) -> String {
    format!(
        "backfill {}: {} {}, {}",
        b.id,
        b.request.table,
        b.status.as_str(),
        progress(b, first)
    )
}

/// Rows done of the total, rows per second since `first` (the first poll that saw the
/// backfill running, and its rows done: a resumed backfill's earlier rows are not this
/// run's rate) and the time left, once known.
fn progress(b: &Backfill, first: Option<(Instant, i64)>) -> String {
    let mut text = match b.rows_total {
        Some(total) if total > 0 => {
            let pct = b.rows_done as f64 * 100.0 / total as f64;
            format!("{}/{total} rows ({pct:.0}%)", b.rows_done)
        }
        _ => format!("{} rows", b.rows_done),
    };
    if let Some((t0, r0)) = first {
        let secs = t0.elapsed().as_secs_f64();
        let rate = (b.rows_done - r0) as f64 / secs.max(0.001);
        if secs >= 0.5 && rate > 0.0 {
            text.push_str(&format!(", {rate:.0} rows/s"));
            if let Some(total) = b.rows_total {
                let left = (total - b.rows_done).max(0) as f64 / rate;
                text.push_str(&format!(", ETA {left:.0}s"));
            }
        }
    }
    let wait = waiting(b);
    if !wait.is_empty() {
        text.push(' ');
        text.push_str(&wait);
    }
    text
}

/// The final line; `false` when the backfill failed.
fn report(b: &Backfill, took: Duration) -> bool {
    match b.status {
        BackfillStatus::Failed => {
            eprintln!(
                "backfill {} failed after {} rows: {}\nfix the cause, then: walhook backfill --resume {}",
                b.id,
                b.rows_done,
                b.error.as_deref().unwrap_or("no reason recorded"),
                b.id
            );
            false
        }
        _ => {
            let merged = b.rows_done - b.events;
            eprintln!(
                "backfill {} done: {} rows read, {} events in {:.1}s{}",
                b.id,
                b.rows_done,
                b.events,
                took.as_secs_f64(),
                if merged > 0 {
                    format!(
                        " ({merged} rows changed while being read: the stream carried their newer state)"
                    )
                } else {
                    String::new()
                }
            );
            true
        }
    }
}
