//! Background refreshers behind `/readyz` and the gauges that come from queries rather
//! than from the pipeline: a store probe with the queue figures, and the slot's lag read
//! over an ordinary SQL connection to the source. Each query has a timeout; a failure is
//! logged once when it starts and once when it clears.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::gauge;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Exporter;
use super::health::{Health, StoreState};
use crate::pg::ConnInfo;
use crate::pg::ErrorChain;
use crate::store::Store;
use crate::store::stats::{QueueCounts, QueueStats};
use crate::telemetry::{REPLICATION_LAG_BYTES, SLOT_ACTIVE};

/// How often the store is probed for `/readyz`.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How often queue gauges are read from the store.
pub const STATS_INTERVAL: Duration = Duration::from_secs(10);
/// How often the slot's lag is read from the source (DESIGN: at least every 10 s).
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);
/// Longest a probe, a connection or a query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Why reading the slot's lag failed: connecting or querying.
type ReadError = Box<dyn std::error::Error + Send + Sync>;

/// Probes the store every [`PROBE_INTERVAL`] (setting `health`) and publishes the queue
/// figures of the live config's subscriptions to `exporter` every [`STATS_INTERVAL`],
/// until `stop`.
pub async fn store_loop(
    params: ConnInfo,
    schema: String,
    config: tokio::sync::watch::Receiver<Arc<crate::config::Config>>,
    health: Arc<Health>,
    exporter: Exporter,
    stop: CancellationToken,
) {
    let mut store: Option<Store> = None;
    let mut last_stats: Option<Instant> = None;
    let mut failing = false;
    // The figures last read, of subscriptions still in the config.
    let mut figures: Vec<QueueStats> = Vec::new();
    // What earlier refreshes counted of each backlog (see `QueueCounts`).
    let mut counts = QueueCounts::default();
    loop {
        let probe = async {
            if store.as_ref().is_none_or(|s| s.is_closed()) {
                store = Some(Store::connect(&params, &schema).await?);
                // A store that went away may come back restored from a backup.
                counts.clear();
            }
            store.as_ref().expect("connected above").ping().await
        };
        match tokio::time::timeout(QUERY_TIMEOUT, probe).await {
            Ok(Ok(())) => {
                if failing {
                    info!("store reachable again");
                    failing = false;
                }
                health.set_store(StoreState::Reachable);
            }
            Ok(Err(e)) => {
                if !failing {
                    warn!(error = %ErrorChain(&e), "store probe failed; not ready");
                    failing = true;
                }
                store = None;
                health.set_store(StoreState::Unreachable(ErrorChain(&e).to_string()));
            }
            Err(_) => {
                if !failing {
                    warn!(timeout = ?QUERY_TIMEOUT, "store probe timed out; not ready");
                    failing = true;
                }
                store = None;
                health.set_store(StoreState::Unreachable(format!(
                    "no answer to SELECT 1 within {QUERY_TIMEOUT:?}"
                )));
            }
        }
        // While the store is unreachable the last figures are published again at each
        // probe, so that a subscription removed by a reload meanwhile goes at once.
        if store.is_none() || last_stats.is_none_or(|t| t.elapsed() >= STATS_INTERVAL) {
            let subscriptions: Vec<String> = config
                .borrow()
                .subscriptions
                .iter()
                .map(|s| s.name.as_str().to_owned())
                .collect();
            // Every refresh publishes the figures of exactly the live config's
            // subscriptions, and a scrape shows only the last published figures (see
            // `server::exporter`): a subscription removed by a reload is no longer
            // reported from this refresh on, even while the store does not answer. The
            // others keep their last figures until it answers again.
            figures.retain(|q| subscriptions.contains(&q.subscription));
            if let Some(s) = store.as_mut() {
                last_stats = Some(Instant::now());
                let read = s.queue_stats(&subscriptions, &mut counts);
                match tokio::time::timeout(QUERY_TIMEOUT, read).await {
                    Ok(Ok(stats)) => figures = stats,
                    Ok(Err(e)) => warn!(error = %ErrorChain(&e), "reading queue figures failed"),
                    Err(_) => warn!(timeout = ?QUERY_TIMEOUT, "reading queue figures timed out"),
                }
            }
            exporter.publish_queue_figures(&figures);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

/// Reads the slot's retained WAL and whether it is active every [`LAG_INTERVAL`], over
/// an ordinary SQL connection to the source, until `stop`.
pub async fn lag_loop(params: ConnInfo, slot: String, stop: CancellationToken) {
    // On a standby (logical decoding from a standby) the current position is the replay
    // position.
    const SQL: &str = "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END - confirmed_flush_lsn)::bigint, active
                       FROM pg_replication_slots WHERE slot_name = $1";
    let mut client: Option<tokio_postgres::Client> = None;
    let mut failing = false;
    loop {
        let read = async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = Some(params.connect_sql().await.map_err(ReadError::from)?);
            }
            let c = client.as_ref().expect("connected above");
            c.query_opt(SQL, &[&slot]).await.map_err(ReadError::from)
        };
        match tokio::time::timeout(QUERY_TIMEOUT, read).await {
            Ok(Ok(row)) => {
                failing = false;
                match row {
                    Some(r) => {
                        if let Some(bytes) = r.get::<_, Option<i64>>(0) {
                            gauge!(REPLICATION_LAG_BYTES).set(bytes.max(0) as f64);
                        }
                        gauge!(SLOT_ACTIVE).set(f64::from(u8::from(r.get::<_, bool>(1))));
                    }
                    None => {
                        gauge!(SLOT_ACTIVE).set(0.0);
                    }
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    warn!(slot = %slot, error = %ErrorChain(&*e), "reading the slot's lag failed");
                    failing = true;
                }
                client = None;
            }
            Err(_) => {
                if !failing {
                    warn!(slot = %slot, timeout = ?QUERY_TIMEOUT, "reading the slot's lag timed out");
                    failing = true;
                }
                client = None;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LAG_INTERVAL) => {}
        }
    }
}
