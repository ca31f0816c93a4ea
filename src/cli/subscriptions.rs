//! `walhook subscriptions list|pause|resume`: each configured subscription's state and
//! queue, and pausing or resuming one, against the store while the daemon runs. The
//! state is persisted in `subscription_state`; the dispatcher reads it every round
//! (a quarter of a second when idle), so a pause or resume takes effect within that.
//! `--json` prints JSON lines, one object per subscription.

use clap::Subcommand;
use serde_json::json;

use super::ConfigArg;
use super::operator::{
    Table, configured, human_age, human_time, json_time, known_list, open_store,
};

#[derive(Debug, clap::Args)]
pub struct SubscriptionsArgs {
    #[command(subcommand)]
    pub command: SubscriptionsCommand,
}

#[derive(Debug, Subcommand)]
pub enum SubscriptionsCommand {
    /// Each configured subscription: state, pending and dead deliveries, oldest
    /// pending age, last success, events past its cursor.
    List(ListArgs),
    /// Stop sending a subscription's deliveries; its events keep queueing in the store.
    Pause(NameArgs),
    /// Send again: undoes a pause, and re-enables a subscription disabled by 410 Gone.
    Resume(NameArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct NameArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The subscription's name.
    pub name: String,
}

/// Runs `walhook subscriptions ...`.
pub async fn run(args: SubscriptionsArgs) -> anyhow::Result<()> {
    match args.command {
        SubscriptionsCommand::List(a) => list(a).await,
        SubscriptionsCommand::Pause(a) => set_paused(a, true).await,
        SubscriptionsCommand::Resume(a) => set_paused(a, false).await,
    }
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let store = open_store(&config).await?;
    let names = configured(&config);
    let overview = store.subscription_overview(&names).await?;
    let mut table = Table::new(vec![
        "SUBSCRIPTION",
        "STATE",
        "PENDING",
        "DEAD",
        "OLDEST PENDING",
        "LAST SUCCESS",
        "CURSOR LAG",
    ]);
    for name in &names {
        let Some(o) = overview.iter().find(|o| &o.subscription == name) else {
            // The daemon creates a subscription's state when it first runs with it.
            if args.json {
                println!(
                    "{}",
                    json!({ "subscription": name, "state": "not started", "enabled": true, "paused": false,
                            "disabled_reason": null, "pending": 0, "dead": 0, "oldest_pending_seconds": null,
                            "last_success_at": null, "cursor_lag": 0 })
                );
            } else {
                table.row(vec![
                    name.clone(),
                    "not started".into(),
                    "0".into(),
                    "0".into(),
                    "-".into(),
                    "-".into(),
                    "0".into(),
                ]);
            }
            continue;
        };
        let state = match (o.enabled, o.paused) {
            (false, _) => "disabled",
            (true, true) => "paused",
            (true, false) => "active",
        };
        if args.json {
            println!(
                "{}",
                json!({
                    "subscription": o.subscription,
                    "state": state,
                    "enabled": o.enabled,
                    "paused": o.paused,
                    "disabled_reason": o.disabled_reason,
                    "pending": o.pending,
                    "dead": o.dead,
                    "oldest_pending_seconds": o.oldest_pending.map(|d| d.as_secs_f64()),
                    "last_success_at": json_time(o.last_success_at),
                    "cursor_lag": o.cursor_lag,
                })
            );
            continue;
        }
        let state = match &o.disabled_reason {
            Some(reason) if !o.enabled => format!("disabled ({reason})"),
            _ if o.paused && !o.enabled => "disabled, paused".into(),
            _ => state.to_owned(),
        };
        table.row(vec![
            o.subscription.clone(),
            state,
            o.pending.to_string(),
            o.dead.to_string(),
            o.oldest_pending.map_or("-".into(), human_age),
            o.last_success_at.map_or("-".into(), human_time),
            o.cursor_lag.to_string(),
        ]);
    }
    if !args.json {
        print!("{}", table.render());
    }
    Ok(())
}

async fn set_paused(args: NameArgs, paused: bool) -> anyhow::Result<()> {
    let config = args.config.load()?;
    let names = configured(&config);
    if !names.contains(&args.name) {
        anyhow::bail!(
            "unknown subscription `{}`; {}",
            args.name,
            known_list(&names)
        );
    }
    let store = open_store(&config).await?;
    // A subscription the daemon has not started yet gets its state row now, as the
    // daemon would make it.
    store
        .ensure_subscriptions(std::slice::from_ref(&args.name))
        .await?;
    store.set_paused(&args.name, paused).await?;
    if paused {
        println!(
            "subscription `{}` paused: its events queue in the store until `walhook subscriptions resume {}`",
            args.name, args.name
        );
    } else {
        println!("subscription `{}` resumed", args.name);
    }
    Ok(())
}
