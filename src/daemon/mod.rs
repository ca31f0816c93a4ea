//! `walhook run`: prepares the source and the store, waits to hold the slot, then runs
//! source -> mapping -> group-committed ingest until SIGTERM; SIGHUP reloads the config
//! (see [`reload`]).

mod context;
mod error;
pub mod ingest;
pub mod prepare;
pub mod reload;
pub mod source_task;

pub use error::DaemonError;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::delivery::HttpClients;
use crate::pg::ErrorChain;
use crate::server::{Health, Server, refresh, systemd};
use crate::source::Lsn;
use crate::source::SourceError;
use crate::source::stream::{ConfirmMode, ReplicationStream, StreamOptions};
use crate::store::Store;
use crate::store::wake::Wake;

/// Capacity of the channel between the source task and ingest, in messages.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// Runs the daemon until `shutdown` is cancelled, reloading the config on each of
/// `reloads`.
pub async fn run(
    config: Config,
    reloads: reload::Requests,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    // The ops server comes first: a taken address fails start-up at once, and /healthz
    // answers while the daemon prepares.
    let server = Server::bind(config.server.listen).await?;
    let exporter = server.exporter();
    let health = Arc::new(Health::default());
    let server_stop = CancellationToken::new();
    let _stop_server = server_stop.clone().drop_guard();
    let config = Arc::new(config);
    // The live config (subscriptions, retention, the JWKS) and table rules; a reload
    // replaces them.
    let (config_tx, config_rx) = watch::channel(config.clone());
    tokio::spawn(server.serve(health.clone(), config_rx.clone(), server_stop.clone()));
    systemd::spawn_watchdog(server_stop.clone());

    let prepared = prepare::prepare(&config).await?;
    let store = prepared.store;
    let owner = instance_id();
    info!(instance = %owner, "instance id");
    tokio::spawn(refresh::lag_loop(
        prepared.source_params.clone(),
        config.source.slot.clone(),
        server_stop.clone(),
    ));
    tokio::spawn(refresh::store_loop(
        prepared.store_params.clone(),
        config.store.schema.clone(),
        config_rx.clone(),
        health.clone(),
        exporter,
        server_stop.clone(),
    ));
    let (rules_tx, rules_rx) = watch::channel(Arc::new(reload::Rules {
        mapper: prepared.mapper,
        aggregates: crate::mapping::aggregate::Aggregates::new(&config.tables),
        routes: prepared.routes,
    }));

    // Delivery runs whether or not this instance holds the slot (G8): each subscription
    // is dispatched by whichever instance holds its lease in the store.
    // An eighth of the ingest buffer keeps the newest events for this process's
    // dispatchers (see store::live).
    let wake = Arc::new(Wake::new(
        usize::try_from(config.daemon.ingest_buffer / 8).unwrap_or(usize::MAX),
    ));
    let dispatch_stop = CancellationToken::new();
    let mut dispatchers = JoinSet::new();
    dispatchers.spawn(crate::delivery::supervise::supervise(
        config_rx.clone(),
        crate::delivery::supervise::DispatchContext {
            store_params: prepared.store_params.clone(),
            schema: config.store.schema.clone(),
            clients: Arc::new(HttpClients::new(&config.delivery)?),
            owner: owner.clone(),
            wake: wake.clone(),
        },
        dispatch_stop.clone(),
    ));
    let purge_store = Store::connect(&prepared.store_params, &config.store.schema).await?;
    dispatchers.spawn(purge_loop(
        purge_store,
        config_rx.clone(),
        dispatch_stop.clone(),
    ));
    // `snapshot = true` tables get their backfill requested once, by any instance.
    dispatchers.spawn(crate::backfill::snapshot::request_snapshots(
        config_rx.clone(),
        prepared.store_params.clone(),
        config.store.schema.clone(),
        dispatch_stop.clone(),
    ));
    dispatchers.spawn(reload::run(
        reloads,
        config.clone(),
        reload::Connections {
            source: prepared.source_params.clone(),
            store: prepared.store_params.clone(),
        },
        rules_tx,
        config_tx,
        dispatch_stop.clone(),
    ));
    systemd::ready();
    let result = ingest_until_shutdown(
        &config,
        prepared.source_params,
        prepared.store_params.clone(),
        store,
        rules_rx,
        &owner,
        wake,
        &health,
        shutdown,
    )
    .await;
    // SIGTERM: in-flight deliveries get `shutdown_grace` to finish.
    systemd::stopping();
    dispatch_stop.cancel();
    let grace = config_rx.borrow().daemon.shutdown_grace;
    if tokio::time::timeout(grace, async {
        while dispatchers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!(grace = ?grace, "deliveries still in flight after the shutdown grace; stopping them");
        dispatchers.abort_all();
    }
    result
}

/// Holds the slot and ingests until `shutdown`. Each term of leadership begins by
/// waiting to hold the slot (a standby waits here, G8); a term ends when this instance
/// loses the slot to another (deposed, or the slot taken while reconnecting), and the
/// instance then stands by for the next term instead of exiting.
#[allow(clippy::too_many_arguments)]
async fn ingest_until_shutdown(
    config: &Config,
    source_params: crate::pg::ConnInfo,
    store_params: crate::pg::ConnInfo,
    store: Store,
    rules: watch::Receiver<Arc<reload::Rules>>,
    owner: &str,
    wake: Arc<Wake>,
    health: &Health,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let mut store = Some(store);
    loop {
        let store = match store.take() {
            Some(store) => store,
            None => match connect_store(&store_params, &config.store.schema, &shutdown).await? {
                Some(store) => store,
                None => return Ok(()),
            },
        };
        let term = lead_once(
            config,
            source_params.clone(),
            &store_params,
            store,
            rules.clone(),
            owner,
            wake.clone(),
            health,
            &shutdown,
        )
        .await;
        match term {
            Err(DaemonError::Store(crate::store::StoreError::Deposed { current, .. })) => {
                warn!(
                    epoch = current,
                    "another instance leads ingest now; standing by"
                );
            }
            Err(DaemonError::Source(SourceError::SlotActive { pid, .. })) => {
                warn!(
                    holder_pid = pid,
                    "another process took the slot; standing by"
                );
            }
            other => return other,
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// One term of leadership (see [`ingest_until_shutdown`]).
#[allow(clippy::too_many_arguments)]
async fn lead_once(
    config: &Config,
    source_params: crate::pg::ConnInfo,
    store_params: &crate::pg::ConnInfo,
    mut store: Store,
    rules: watch::Receiver<Arc<reload::Rules>>,
    owner: &str,
    wake: Arc<Wake>,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<(), DaemonError> {
    let slot = config.source.slot.clone();
    let context = context::ContextReader::new(source_params.clone());
    let mut stream = ReplicationStream::new(
        source_params.clone(),
        StreamOptions {
            slot: slot.clone(),
            publication: config.source.publication.clone(),
            temporary: false,
            confirm: ConfirmMode::Consumer,
            application_name: "walhook".into(),
            resume: Default::default(),
        },
    );
    health.watch_source(stream.link());
    // G8: wait until this instance holds the slot; another holder makes us a standby.
    info!(slot = %slot, "waiting to hold the replication slot");
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Ok(()),
        held = stream.connect_waiting() => held?,
    }
    // Holding the slot, take the lead in the store; a store that is down is waited for.
    let (epoch, checkpoint) = loop {
        let taken = async {
            let epoch = store.take_leadership(&slot, owner).await?;
            let checkpoint = store
                .checkpoint(&slot)
                .await?
                .ok_or_else(|| crate::store::StoreError::NoCheckpoint(slot.clone()))?;
            Ok::<_, crate::store::StoreError>((epoch, checkpoint))
        };
        match taken.await {
            Ok(taken) => break taken,
            Err(e) if e.is_transient() => {
                warn!(error = %ErrorChain(&e), "cannot take the lead in the store yet; retrying");
                // Meanwhile the server must not wait for this connection (G9).
                stream.disconnect("the store is unreachable").await;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                if store.is_closed() {
                    let _ = store.reconnect().await;
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.resume_from(checkpoint.position);
    info!(slot = %slot, epoch, resume_lsn = %checkpoint.position.commit_lsn, rows_done = checkpoint.position.rows_done, "holding the slot; ingesting");

    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (confirm_tx, confirm_rx) = watch::channel(Lsn::INVALID);
    // Ingest says when it cannot store (it retries a batch); see source_task::run.
    let (stalled_tx, stalled_rx) = watch::channel(false);
    let source_stop = CancellationToken::new();
    let buffer = Arc::new(tokio::sync::Semaphore::new(
        usize::try_from(config.daemon.ingest_buffer)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    // Backfills run in the holder of the slot, merged into its stream.
    let watermarks = Arc::new(crate::backfill::Watermarks::default());
    let backfills = tokio::spawn(
        crate::backfill::worker::run(
            source_params,
            store_params.clone(),
            config.store.schema.clone(),
            watermarks.clone(),
            ulid::Ulid::new().to_string(),
            source_stop.clone(),
        )
        .instrument(info_span!("backfill")),
    );
    let source = tokio::spawn(
        source_task::run(
            source_task::Links {
                tx,
                buffer,
                confirmed: confirm_rx,
                stalled: stalled_rx,
                watermarks,
            },
            stream,
            rules,
            source_stop.clone(),
        )
        .instrument(info_span!("source", slot = %slot)),
    );
    let result = ingest::run(
        store,
        &wake,
        health,
        &slot,
        epoch,
        rx,
        confirm_tx,
        stalled_tx,
        context,
        shutdown.clone(),
    )
    .instrument(info_span!("ingest", slot = %slot))
    .await;
    source_stop.cancel();
    let _ = backfills.await;
    match tokio::time::timeout(Duration::from_secs(10), source).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            if result.is_ok() {
                return Err(e.into());
            }
            warn!(error = %ErrorChain(&e), "source task failed during shutdown");
        }
        Ok(Err(join)) => return Err(DaemonError::SourceTask(join)),
        Err(_) => warn!("source task did not stop within 10 s"),
    }
    result
}

/// A store connection, waiting (with backoff) while the store is unreachable; `None`
/// once `shutdown` is asked for.
async fn connect_store(
    params: &crate::pg::ConnInfo,
    schema: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Store>, DaemonError> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match Store::connect(params, schema).await {
            Ok(store) => return Ok(Some(store)),
            Err(e) if e.is_transient() => {
                warn!(error = %ErrorChain(&e), "cannot connect to the store; retrying");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Deletes what retention allows and makes the old backlog of paused or disabled
/// subscriptions dead, in small batches, about once a minute (more often with a short
/// retention). Subscriptions and retention are the live config's.
async fn purge_loop(
    mut store: Store,
    config: watch::Receiver<Arc<Config>>,
    stop: CancellationToken,
) {
    loop {
        let period = {
            let c = config.borrow();
            c.store.retention.min(c.store.paused_retention)
        }
        .min(Duration::from_secs(60))
        .max(Duration::from_millis(500));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let (subscriptions, retention, dead_retention, paused_retention) = {
            let c = config.borrow();
            let names: Vec<String> = c
                .subscriptions
                .iter()
                .map(|s| s.name.as_str().to_owned())
                .collect();
            (
                names,
                c.store.retention,
                c.store.dead_retention,
                c.store.paused_retention,
            )
        };
        'subscriptions: for name in &subscriptions {
            loop {
                match store.expire_paused_once(name, paused_retention).await {
                    Ok(n) if n > 0 => {
                        warn!(subscription = %name, deliveries = n, "paused or disabled subscription: backlog older than store.paused_retention is now dead");
                        if n < crate::store::purge::PURGE_BATCH as u64 {
                            break;
                        }
                    }
                    Ok(_) => break,
                    Err(e) => {
                        warn!(subscription = %name, error = %ErrorChain(&e), "expiring a paused backlog failed; trying again later");
                        if store.is_closed() {
                            let _ = store.reconnect().await;
                        }
                        break 'subscriptions;
                    }
                }
            }
        }
        loop {
            match store
                .purge_once(&subscriptions, retention, dead_retention)
                .await
            {
                Ok(n) if n == crate::store::purge::PURGE_BATCH as u64 => continue,
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(events = n, "purged");
                    }
                    break;
                }
                Err(e) => {
                    warn!(error = %ErrorChain(&e), "purge failed; trying again later");
                    if store.is_closed() {
                        let _ = store.reconnect().await;
                    }
                    break;
                }
            }
        }
    }
}

/// This instance's id, for the slot's leader and the dispatch leases: host name, process
/// id and a random ULID. Host name and PID alone are not unique: containers on one host
/// network share the host name, and each runs walhook as PID 1 (G8).
pub fn instance_id() -> String {
    format!(
        "{}:{}:{}",
        hostname(),
        std::process::id(),
        ulid::Ulid::new()
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
