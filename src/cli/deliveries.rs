//! `walhook deliveries list|show|replay`: what was sent where, and re-queueing
//! deliveries (dead ones, or delivered ones to send them again), against the store while
//! the daemon runs.
//!
//! A delivery id is `<event id>:<subscription>` (the `id` of the `walhook.deliveries`
//! view); `show` and `replay` also take a bare event id, meaning all its deliveries.
//! `--json` prints JSON lines: one object per delivery (`list`, `show`), or one
//! `{"queued": N, ...}` object (`replay`).

use clap::{Subcommand, ValueEnum};
use serde_json::json;

use super::ConfigArg;
use super::operator::{
    Table, check_subscription, configured, human_time, json_time, open_store, parse_entity,
    parse_time, truncate,
};
use std::collections::HashSet;

use crate::config::{Config, SubscriptionConfig};
use crate::delivery::dispatch;
use crate::routing::Router;
use crate::store::Store;
use crate::store::operator::{Delivery, DeliveryId, DeliveryStatus, REPLAY_BATCH, Selection};

#[derive(Debug, clap::Args)]
pub struct DeliveriesArgs {
    #[command(subcommand)]
    pub command: DeliveriesCommand,
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List(ListArgs),
    /// Show every field of deliveries: attempts, last status and error, the kept
    /// response head.
    Show(ShowArgs),
    /// Re-queue deliveries as pending, due now: by id, by subscription and status, or
    /// by entity. Prints how many were queued.
    Replay(ReplayArgs),
}

/// A delivery state on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    Pending,
    Delivered,
    Dead,
}

impl From<StatusArg> for DeliveryStatus {
    fn from(s: StatusArg) -> DeliveryStatus {
        match s {
            StatusArg::Pending => DeliveryStatus::Pending,
            StatusArg::Delivered => DeliveryStatus::Delivered,
            StatusArg::Dead => DeliveryStatus::Dead,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Only this subscription.
    #[arg(long, value_name = "NAME")]
    pub subscription: Option<String>,
    /// Only deliveries in this state.
    #[arg(long, value_enum)]
    pub status: Option<StatusArg>,
    /// Only this entity, e.g. `user:42`.
    #[arg(long, value_name = "TYPE:ID", value_parser = parse_entity)]
    pub entity: Option<(String, String)>,
    /// Only events ingested since: a duration back from now (`30m`, `2d`) or an RFC 3339 time.
    #[arg(long, value_name = "DURATION|RFC3339", value_parser = parse_time)]
    pub since: Option<std::time::SystemTime>,
    /// At most this many deliveries.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
    pub limit: i64,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Delivery ids (`<event id>:<subscription>`) or event ids.
    #[arg(required = true, value_name = "ID", value_parser = DeliveryId::parse)]
    pub ids: Vec<DeliveryId>,
    /// JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["ids", "subscription", "entity"])))]
pub struct ReplayArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Delivery ids (`<event id>:<subscription>`) or event ids (all their deliveries).
    #[arg(value_name = "ID", value_parser = DeliveryId::parse,
          conflicts_with_all = ["subscription", "status", "entity", "since", "until"])]
    pub ids: Vec<DeliveryId>,
    /// Deliveries of this subscription (needs --status unless --entity is given).
    #[arg(long, value_name = "NAME")]
    pub subscription: Option<String>,
    /// Only deliveries in these states (repeatable or comma-separated); default with
    /// --entity: all of them.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub status: Vec<StatusArg>,
    /// Deliveries of this entity's events, e.g. `user:42`.
    #[arg(long, value_name = "TYPE:ID", value_parser = parse_entity)]
    pub entity: Option<(String, String)>,
    /// Only events ingested since: a duration back from now or an RFC 3339 time.
    #[arg(long, value_name = "DURATION|RFC3339", value_parser = parse_time)]
    pub since: Option<std::time::SystemTime>,
    /// Only events ingested before: a duration back from now or an RFC 3339 time.
    #[arg(long, value_name = "DURATION|RFC3339", value_parser = parse_time)]
    pub until: Option<std::time::SystemTime>,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `walhook deliveries ...`.
pub async fn run(args: DeliveriesArgs) -> anyhow::Result<()> {
    match args.command {
        DeliveriesCommand::List(a) => list(a).await,
        DeliveriesCommand::Show(a) => show(a).await,
        DeliveriesCommand::Replay(a) => replay(a).await,
    }
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let store = open_store(&config).await?;
    if let Some(name) = &args.subscription {
        check_subscription(
            name,
            &configured(&config),
            &store.stored_subscriptions().await?,
        )?;
    }
    let sel = Selection {
        subscriptions: args.subscription.map(|s| vec![s]),
        statuses: args.status.map(|s| vec![s.into()]).unwrap_or_default(),
        entity: args.entity,
        since: args.since,
        ..Selection::default()
    };
    let found = store.list_deliveries(&sel, args.limit).await?;
    if args.json {
        for d in &found {
            println!("{}", delivery_json(d, false));
        }
        return Ok(());
    }
    let mut table = Table::new(vec![
        "ID",
        "SUBSCRIPTION",
        "TYPE",
        "ENTITY",
        "REV",
        "STATUS",
        "ATTEMPTS",
        "LAST",
        "NEXT/DELIVERED",
        "ERROR",
    ]);
    for d in &found {
        table.row(vec![
            d.id(),
            d.subscription.clone(),
            d.event_type.clone(),
            format!("{}:{}", d.entity, d.entity_id),
            d.revision.to_string(),
            d.status.as_str().to_owned(),
            d.attempts.to_string(),
            d.last_status.map_or("-".into(), |s| s.to_string()),
            when(d),
            d.last_error
                .as_deref()
                .map_or("-".into(), |e| truncate(e, 60)),
        ]);
    }
    print!("{}", table.render());
    if found.is_empty() {
        eprintln!("no deliveries match");
    }
    Ok(())
}

/// The next attempt of a pending delivery, or when it was delivered.
fn when(d: &Delivery) -> String {
    match (d.status, d.next_attempt_at, d.delivered_at) {
        (DeliveryStatus::Pending, Some(t), _) => format!("next {}", human_time(t)),
        (DeliveryStatus::Delivered, _, Some(t)) => human_time(t),
        (DeliveryStatus::Delivered, _, None) => "first attempt".into(),
        _ => "-".into(),
    }
}

fn delivery_json(d: &Delivery, with_response: bool) -> serde_json::Value {
    let mut v = json!({
        "id": d.id(),
        "subscription": d.subscription,
        "event_id": d.event_id,
        "seq": d.seq,
        "type": d.event_type,
        "entity": d.entity,
        "entity_id": d.entity_id,
        "revision": d.revision,
        "status": d.status.as_str(),
        "attempts": d.attempts,
        "next_attempt_at": json_time(d.next_attempt_at),
        "delivered_at": json_time(d.delivered_at),
        "last_status": d.last_status,
        "last_error": d.last_error,
        "occurred_at": json_time(Some(d.occurred_at)),
        "ingested_at": json_time(Some(d.ingested_at)),
        "batch_id": d.batch_id,
    });
    if with_response {
        v["response_head"] = json!(d.last_response);
        if let Some(context) = &d.context {
            v["context"] = context.clone();
        }
    }
    v
}

/// Looks every id up; fails naming the first unknown one before anything is done.
async fn lookup(
    store: &Store,
    config: &Config,
    ids: &[DeliveryId],
) -> anyhow::Result<Vec<Delivery>> {
    let configured = configured(config);
    let stored = store.stored_subscriptions().await?;
    let mut all = Vec::new();
    for id in ids {
        if let Some(sub) = &id.subscription {
            check_subscription(sub, &configured, &stored)?;
        }
        let found = store.find_deliveries(id).await?;
        if found.is_empty() {
            anyhow::bail!(
                "unknown delivery `{id}`: no such event{} in the store (purged after store.retention, or mistyped); find ids with `walhook deliveries list`",
                id.subscription
                    .as_ref()
                    .map(|s| format!(" due to subscription `{s}`"))
                    .unwrap_or_default()
            );
        }
        all.extend(found);
    }
    Ok(all)
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let store = open_store(&config).await?;
    let found = lookup(&store, &config, &args.ids).await?;
    for (i, d) in found.iter().enumerate() {
        if args.json {
            println!("{}", delivery_json(d, true));
            continue;
        }
        if i > 0 {
            println!();
        }
        let opt = |t: Option<std::time::SystemTime>| t.map_or("-".into(), human_time);
        let fields: [(&str, String); 16] = [
            ("id", d.id()),
            ("subscription", d.subscription.clone()),
            ("event", d.event_id.clone()),
            ("type", d.event_type.clone()),
            ("entity", format!("{}:{}", d.entity, d.entity_id)),
            ("revision", d.revision.to_string()),
            ("status", d.status.as_str().to_owned()),
            ("attempts", d.attempts.to_string()),
            ("next attempt", opt(d.next_attempt_at)),
            ("delivered at", when_delivered(d)),
            (
                "last status",
                d.last_status.map_or("-".into(), |s| s.to_string()),
            ),
            (
                "last error",
                d.last_error.clone().unwrap_or_else(|| "-".into()),
            ),
            ("occurred at", human_time(d.occurred_at)),
            ("ingested at", human_time(d.ingested_at)),
            ("log position", d.seq.to_string()),
            ("batch", d.batch_id.clone().unwrap_or_else(|| "-".into())),
        ];
        for (k, v) in fields {
            println!("{:<14}{v}", format!("{k}:"));
        }
        print_context(d.context.as_ref());
        match d.last_response.as_deref() {
            Some(head) if !head.is_empty() => {
                println!("response head (first 1 KiB of the last response body):");
                for line in head.lines() {
                    println!("  {line}");
                }
            }
            _ => println!("{:<14}-", "response head:"),
        }
    }
    Ok(())
}

/// The context the event carried, one line per context name (its parent row as
/// compact JSON, or `null` when the parent was not found at ingest).
fn print_context(context: Option<&serde_json::Value>) {
    let Some(serde_json::Value::Object(context)) = context else {
        return;
    };
    println!("context (parent rows when the event was ingested):");
    for (name, row) in context {
        println!("  {name}: {row}");
    }
}

fn when_delivered(d: &Delivery) -> String {
    match (d.status, d.delivered_at) {
        (_, Some(t)) => human_time(t),
        (DeliveryStatus::Delivered, None) => "at its first attempt (time not recorded)".into(),
        _ => "-".into(),
    }
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let store = open_store(&config).await?;
    let all = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivered,
        DeliveryStatus::Dead,
    ];
    let mut queued = 0u64;
    let mut skipped = 0u64;
    if !args.ids.is_empty() {
        let mut found = lookup(&store, &config, &args.ids).await?;
        // Ascending log order keeps each entity's replayed events in revision order (G5).
        found.sort_by(|a, b| (a.seq, &a.subscription).cmp(&(b.seq, &b.subscription)));
        found.dedup_by(|a, b| a.seq == b.seq && a.subscription == b.subscription);
        for d in &found {
            let sel = Selection {
                subscriptions: Some(vec![d.subscription.clone()]),
                statuses: all.to_vec(),
                seq: Some(d.seq),
                ..Selection::default()
            };
            let n = replay_selection(&store, &config, &sel, &mut |_| {}).await?;
            if n == 0 {
                // Pending past the cursor: the dispatcher sends it without help.
                skipped += 1;
            }
            queued += n;
        }
    } else {
        if let Some(name) = &args.subscription {
            check_subscription(
                name,
                &configured(&config),
                &store.stored_subscriptions().await?,
            )?;
        }
        let statuses: Vec<DeliveryStatus> = if args.status.is_empty() {
            if args.entity.is_none() {
                anyhow::bail!(
                    "replay by subscription needs --status: e.g. `--status dead` for dead deliveries, `--status delivered` to send delivered ones again"
                );
            }
            all.to_vec()
        } else {
            args.status.iter().map(|s| (*s).into()).collect()
        };
        let sel = Selection {
            subscriptions: args.subscription.map(|s| vec![s]),
            statuses,
            entity: args.entity,
            since: args.since,
            until: args.until,
            ..Selection::default()
        };
        let interactive = !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        queued = replay_selection(&store, &config, &sel, &mut |n| {
            if interactive {
                eprint!("\rqueued {n} ...");
            }
        })
        .await?;
        if interactive && queued > 0 {
            eprintln!();
        }
    }
    if args.json {
        println!(
            "{}",
            json!({ "queued": queued, "already_pending": skipped })
        );
    } else {
        println!(
            "queued {queued} deliver{} for replay",
            if queued == 1 { "y" } else { "ies" }
        );
        if skipped > 0 {
            println!("{skipped} already pending (not yet attempted; left as they are)");
        }
    }
    Ok(())
}

/// Re-queues what `sel` selects. Subscriptions without a CEL filter are re-queued in
/// SQL alone ([`Store::replay`]); for one with a filter, events delivered without a
/// retry row may have been filtered out rather than sent, so each is checked against
/// the filter first (a filtered-out event must not be queued: the dispatcher would
/// never resolve it, and it would hold back its entity).
async fn replay_selection(
    store: &Store,
    config: &Config,
    sel: &Selection,
    progress: &mut dyn FnMut(u64),
) -> anyhow::Result<u64> {
    let scope = match &sel.subscriptions {
        Some(names) => names.clone(),
        None => store.stored_subscriptions().await?,
    };
    let filtered: Vec<&SubscriptionConfig> = config
        .subscriptions
        .iter()
        .filter(|s| s.filter.is_some() && scope.iter().any(|n| n == s.name.as_str()))
        .collect();
    let plain: Vec<String> = scope
        .into_iter()
        .filter(|n| !filtered.iter().any(|s| s.name.as_str() == n))
        .collect();
    let mut total = 0;
    // One subscription at a time: order matters only within one (G5), and a query for
    // one subscription pages through its (subscription, seq) key.
    for name in plain {
        let sel = Selection {
            subscriptions: Some(vec![name]),
            ..sel.clone()
        };
        let before = total;
        total += store.replay(&sel, |n| progress(before + n)).await?;
    }
    for sub in filtered {
        let router = Router::new(std::slice::from_ref(sub));
        let sel = Selection {
            subscriptions: Some(vec![sub.name.as_str().to_owned()]),
            ..sel.clone()
        };
        let mut after = None;
        loop {
            let page = store.replay_page(&sel, after.clone()).await?;
            let Some((last_sub, last_seq, _)) = page.last() else {
                break;
            };
            after = Some((*last_seq, last_sub.clone()));
            let unrowed: Vec<i64> = page.iter().filter(|d| !d.2).map(|d| d.1).collect();
            let passing: HashSet<i64> = store
                .events_at(&unrowed)
                .await?
                .into_iter()
                .filter_map(|e| {
                    let passes = !router
                        .route(&dispatch::envelope(&e))
                        .subscriptions
                        .is_empty();
                    passes.then_some(e.seq)
                })
                .collect();
            let keep: Vec<(String, i64)> = page
                .iter()
                .filter(|d| d.2 || passing.contains(&d.1))
                .map(|d| (d.0.clone(), d.1))
                .collect();
            if !keep.is_empty() {
                total += store.requeue(&keep).await?;
                progress(total);
            }
            if (page.len() as i64) < REPLAY_BATCH {
                break;
            }
        }
    }
    Ok(total)
}
