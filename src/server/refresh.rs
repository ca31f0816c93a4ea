//! Background refreshers behind `/readyz` and the gauges that come from queries rather
//! than from the pipeline: a store probe with the queue figures, and the slot's lag read
//! over an ordinary SQL connection to the source. Each query has a timeout; a failure is
//! logged once when it starts and once when it clears.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::health::{Health, StoreState};
use super::metrics::{Sub, metrics};
use crate::pg::ConnInfo;
use crate::store::Store;

/// How often the store is probed for `/readyz`.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How often queue gauges are read from the store.
pub const STATS_INTERVAL: Duration = Duration::from_secs(10);
/// How often the slot's lag is read from the source (DESIGN: at least every 10 s).
pub const LAG_INTERVAL: Duration = Duration::from_secs(5);
/// Longest a probe, a connection or a query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes the store every [`PROBE_INTERVAL`] (setting `health`) and refreshes the queue
/// gauges of `subscriptions` every [`STATS_INTERVAL`], until `stop`.
pub async fn store_loop(
    params: ConnInfo,
    schema: String,
    config: tokio::sync::watch::Receiver<Arc<crate::config::Config>>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut store: Option<Store> = None;
    let mut last_stats: Option<Instant> = None;
    let mut failing = false;
    // The subscriptions whose gauges are set; one removed by a reload loses them.
    let mut shown: Vec<String> = Vec::new();
    loop {
        let probe = async {
            if store.as_ref().is_none_or(|s| s.is_closed()) {
                store = Some(Store::connect(&params, &schema).await?);
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
                    warn!(error = %e, "store probe failed; not ready");
                    failing = true;
                }
                store = None;
                health.set_store(StoreState::Unreachable(e.to_string()));
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
        if let Some(s) = store.as_ref()
            && last_stats.is_none_or(|t| t.elapsed() >= STATS_INTERVAL)
        {
            last_stats = Some(Instant::now());
            let subscriptions: Vec<String> = config
                .borrow()
                .subscriptions
                .iter()
                .map(|s| s.name.as_str().to_owned())
                .collect();
            let m = metrics();
            for gone in shown.iter().filter(|n| !subscriptions.contains(n)) {
                let sub = Sub {
                    subscription: gone.clone(),
                };
                m.subscription_enabled.remove(&sub);
                m.queue_pending.remove(&sub);
                m.queue_dead.remove(&sub);
                m.queue_oldest_pending.remove(&sub);
            }
            shown.clone_from(&subscriptions);
            match tokio::time::timeout(QUERY_TIMEOUT, s.queue_stats(&subscriptions)).await {
                Ok(Ok(stats)) => {
                    for q in stats {
                        let sub = Sub {
                            subscription: q.subscription,
                        };
                        m.subscription_enabled
                            .get_or_create(&sub)
                            .set(i64::from(q.dispatched));
                        m.queue_pending.get_or_create(&sub).set(q.pending);
                        m.queue_dead.get_or_create(&sub).set(q.dead);
                        m.queue_oldest_pending
                            .get_or_create(&sub)
                            .set(q.oldest_pending_seconds);
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "reading queue figures failed"),
                Err(_) => warn!(timeout = ?QUERY_TIMEOUT, "reading queue figures timed out"),
            }
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
                client = Some(params.connect_sql().await.map_err(|e| e.to_string())?);
            }
            let c = client.as_ref().expect("connected above");
            c.query_opt(SQL, &[&slot]).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(QUERY_TIMEOUT, read).await {
            Ok(Ok(row)) => {
                failing = false;
                let m = metrics();
                match row {
                    Some(r) => {
                        if let Some(bytes) = r.get::<_, Option<i64>>(0) {
                            m.lag_bytes.set(bytes.max(0));
                        }
                        m.slot_active.set(i64::from(r.get::<_, bool>(1)));
                    }
                    None => {
                        m.slot_active.set(0);
                    }
                }
            }
            Ok(Err(e)) => {
                if !failing {
                    warn!(slot = %slot, error = %e, "reading the slot's lag failed");
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
