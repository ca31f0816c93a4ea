//! `walhook demo`: the whole pipeline on a throwaway local PostgreSQL, no config needed.
//!
//! Starts a cluster ([`cluster`]), creates an identity-service schema, starts a receiver
//! that verifies every signature ([`receiver`]), runs the real daemon in-process with a
//! config built in memory, applies scripted changes ([`script`]) and prints each
//! delivered webhook. Then it waits for the user's own SQL until Ctrl-C (or, with
//! `--once`, exits). Everything is removed on exit, error paths included.

pub mod cluster;
pub mod receiver;
pub mod script;

use std::collections::HashMap;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use cluster::Cluster;
use receiver::Webhook;

/// The demo database's name.
const DB: &str = "demo";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Exit after the scripted changes were delivered and verified (exit 1 if they
    /// were not within --timeout) instead of waiting for Ctrl-C.
    #[arg(long)]
    pub once: bool,
    /// How long the scripted changes may take to arrive, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,
}

/// Runs the demo. `Ok(false)` when a webhook did not arrive or did not verify.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    println!("walhook demo: PostgreSQL changes -> entity events -> signed webhooks\n");

    // The server is forked from this thread (the one running `block_on`), which lives
    // as long as walhook: it gets SIGQUIT when walhook dies, even by SIGKILL.
    let cluster = Cluster::start()?;
    let cluster_ready = started.elapsed();
    println!(
        "  postgres   {} from {}, throwaway cluster in {} (port {})",
        cluster.version,
        cluster.bin_dir.display(),
        cluster.root.display(),
        cluster.port
    );
    let result = run_with_cluster(&cluster, &args, started, cluster_ready).await;
    println!(
        "\nstopping: PostgreSQL stopped and {} removed",
        cluster.root.display()
    );
    drop(cluster);
    result
}

async fn run_with_cluster(
    cluster: &Cluster,
    args: &DemoArgs,
    started: Instant,
    cluster_ready: Duration,
) -> anyhow::Result<bool> {
    let admin = connect(&cluster.url("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await
        .context("create the demo database")?;
    let db = connect(&cluster.url(DB)).await?;
    db.batch_execute(script::SCHEMA)
        .await
        .context("create the demo schema")?;
    println!("  schema     organisations, users, roles, user_roles (database `{DB}`)");

    // A fresh random key per run; it is never printed.
    let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(&key)
    );
    let stop = CancellationToken::new();
    let (tx, mut webhooks) = mpsc::unbounded_channel();
    let addr = receiver::start(Secret::new(key), tx, stop.clone())
        .await
        .context("start the demo receiver on 127.0.0.1")?;
    let receiver_url = format!("http://{addr}/webhooks");
    println!(
        "  receiver   {receiver_url} (checks every Standard Webhooks signature with the demo secret)"
    );

    let toml = script::config_toml(&cluster.url(DB), &receiver_url, &secret);
    let config = crate::config::load_str(&toml, "<demo config>", &|_| None)
        .map_err(|errors| anyhow::anyhow!("the demo config is invalid: {errors}"))?;
    println!(
        "  walhook    watching public.organisations, public.users (user.suspended when status \
         turns 'suspended'; password_hash excluded), public.user_roles (user.role.assigned/unassigned)"
    );

    let daemon_stop = CancellationToken::new();
    // The demo's config lives in memory: nothing to reload.
    let (_, no_reloads) = tokio::sync::mpsc::channel(1);
    let reloads = crate::daemon::reload::Requests {
        path: std::path::PathBuf::new(),
        rx: no_reloads,
    };
    let mut daemon = tokio::spawn(crate::daemon::run(config, reloads, daemon_stop.clone()));
    let result = async {
        wait_streaming(&db, &mut daemon).await?;
        let pipeline_ready = started.elapsed();
        println!(
            "  ready      cluster {:.1} s, pipeline streaming {:.1} s after start\n",
            cluster_ready.as_secs_f64(),
            pipeline_ready.as_secs_f64()
        );
        let ok = play_script(&db, &mut webhooks, &mut daemon, args, started).await?;
        if args.once || !ok {
            return Ok(ok);
        }
        interactive(cluster, &mut webhooks, &mut daemon).await?;
        Ok(ok)
    }
    .await;
    daemon_stop.cancel();
    if !daemon.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut daemon).await;
    }
    daemon.abort();
    stop.cancel();
    result
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connect to the demo cluster")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

type DaemonTask = tokio::task::JoinHandle<Result<(), crate::daemon::DaemonError>>;

/// The daemon's task ended: its error, or a note that it stopped.
async fn daemon_ended(daemon: &mut DaemonTask) -> anyhow::Error {
    match daemon.await {
        Ok(Ok(())) => anyhow::anyhow!("the walhook pipeline stopped unexpectedly"),
        Ok(Err(err)) => anyhow::Error::new(err).context("the walhook pipeline failed"),
        Err(err) => anyhow::anyhow!("the walhook pipeline panicked: {err}"),
    }
}

/// Waits until the daemon holds the slot: changes from then on are captured.
async fn wait_streaming(
    db: &tokio_postgres::Client,
    daemon: &mut DaemonTask,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walhook_demo' AND active",
                &[],
            )
            .await
            .context("look at the replication slot")?;
        if active.is_some() {
            return Ok(());
        }
        if daemon.is_finished() {
            return Err(daemon_ended(daemon).await);
        }
        if Instant::now() >= deadline {
            bail!("timed out after 30 s waiting for walhook to start streaming from the demo slot");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Applies each step and waits for its webhooks. `Ok(false)` as soon as one does not
/// verify.
async fn play_script(
    db: &tokio_postgres::Client,
    webhooks: &mut mpsc::UnboundedReceiver<Webhook>,
    daemon: &mut DaemonTask,
    args: &DemoArgs,
    started: Instant,
) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut first: Option<Duration> = None;
    let mut total = 0;
    for step in script::STEPS {
        println!("> {}", step.title);
        println!("    {}", step.sql);
        db.batch_execute(step.sql)
            .await
            .with_context(|| format!("run scripted SQL `{}`", step.sql))?;
        let mut missing: HashMap<(&str, &str, i64), usize> = HashMap::new();
        for expected in step.expect {
            *missing.entry(*expected).or_default() += 1;
        }
        while !missing.is_empty() {
            let webhook = tokio::select! {
                got = webhooks.recv() => got.context("the demo receiver stopped")?,
                err = daemon_ended(daemon) => return Err(err),
                _ = tokio::time::sleep_until(deadline) => {
                    let mut left: Vec<String> = missing
                        .keys()
                        .map(|(t, e, r)| format!("{t} ({e} rev {r})"))
                        .collect();
                    left.sort();
                    bail!(
                        "timed out after {} s waiting for the webhooks of \"{}\": {} did not arrive",
                        args.timeout,
                        step.title,
                        left.join(", ")
                    );
                }
            };
            first.get_or_insert_with(|| started.elapsed());
            total += 1;
            print_webhook(&webhook);
            if webhook.verified.is_err() {
                println!("error: a webhook did not verify (see above); stopping the demo");
                return Ok(false);
            }
            let key = (
                webhook.body["type"].as_str().unwrap_or_default(),
                format!(
                    "{}:{}",
                    webhook.body["entity"].as_str().unwrap_or_default(),
                    webhook.body["entity_id"].as_str().unwrap_or_default()
                ),
                webhook.body["revision"].as_i64().unwrap_or_default(),
            );
            let found = missing
                .keys()
                .find(|(t, e, r)| *t == key.0 && *e == key.1 && *r == key.2)
                .copied();
            if let Some(found) = found {
                let n = missing.get_mut(&found).expect("found above");
                *n -= 1;
                if *n == 0 {
                    missing.remove(&found);
                }
            }
        }
        println!();
    }
    if let Some(first) = first {
        println!(
            "{total} webhooks delivered and verified; the first arrived {:.2} s after `walhook demo` started",
            first.as_secs_f64()
        );
    }
    Ok(true)
}

/// Prints webhooks as they come until Ctrl-C.
async fn interactive(
    cluster: &Cluster,
    webhooks: &mut mpsc::UnboundedReceiver<Webhook>,
    daemon: &mut DaemonTask,
) -> anyhow::Result<()> {
    let psql = if which("psql") {
        "psql".to_owned()
    } else {
        cluster.bin_dir.join("psql").display().to_string()
    };
    println!(
        "\nNow try your own SQL; its webhooks appear here as they arrive:\n\n  \
         {psql} \"host={} port={} dbname={DB} user={}\"\n\n  \
         e.g. INSERT INTO users (org_id, email, name) VALUES (1, 'grace@acme.example', 'Grace Hopper');\n       \
         UPDATE users SET status = 'suspended' WHERE email = 'grace@acme.example';\n       \
         SELECT type, entity_id, revision FROM walhook.events ORDER BY seq;\n\n\
         Press Ctrl-C to stop (PostgreSQL is stopped and its directory removed).\n",
        cluster.socket_dir.display(),
        cluster.port,
        cluster::SUPERUSER,
    );
    let _ = std::io::stdout().flush();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            got = webhooks.recv() => match got {
                Some(webhook) => print_webhook(&webhook),
                None => bail!("the demo receiver stopped"),
            },
            err = daemon_ended(daemon) => return Err(err),
        }
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// One line per webhook: time, type, entity:id, revision, verification, compact body.
fn print_webhook(webhook: &Webhook) {
    let b = &webhook.body;
    let entity = format!(
        "{}:{}",
        b["entity"].as_str().unwrap_or("?"),
        b["entity_id"].as_str().unwrap_or("?")
    );
    let verified = match &webhook.verified {
        Ok(()) => "signature ✓ verified".to_owned(),
        Err(why) => format!("signature ✗ NOT verified ({why})"),
    };
    let mut summary = String::new();
    if let Some(changed) = b.get("changed").and_then(|c| c.as_array()) {
        let names: Vec<&str> = changed.iter().filter_map(|c| c.as_str()).collect();
        summary.push_str(&format!("changed=[{}] ", names.join(",")));
    }
    summary.push_str(&compact(b.get("data").unwrap_or(&serde_json::Value::Null)));
    println!(
        "    {}  {:<22} {:<16} rev {:<3} {verified}  {summary}",
        webhook.received_at.format("%H:%M:%S%.3f"),
        b["type"].as_str().unwrap_or("?"),
        entity,
        b["revision"].as_i64().unwrap_or(0),
    );
}

/// Compact JSON, cut at 110 characters.
fn compact(value: &serde_json::Value) -> String {
    let text = value.to_string();
    if text.chars().count() <= 110 {
        text
    } else {
        let cut: String = text.chars().take(109).collect();
        format!("{cut}…")
    }
}
