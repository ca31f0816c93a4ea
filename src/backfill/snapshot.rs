//! `[[tables]] snapshot = true`: the first time walhook runs with such a table (at
//! start or after a config reload), it requests the table's backfill, once: the store
//! keeps one `snapshot` request per table, whichever instance made it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::pg::{ConnInfo, ErrorChain};
use crate::store::Store;

/// Requests the backfill of each `snapshot = true` table of the live config not
/// requested before, at start and after each reload, until `stop`.
pub async fn request_snapshots(
    mut config: watch::Receiver<Arc<Config>>,
    store: ConnInfo,
    schema: String,
    stop: CancellationToken,
) {
    loop {
        let tables: Vec<String> = config
            .borrow_and_update()
            .tables
            .iter()
            .filter(|t| t.snapshot)
            .map(|t| t.qualified_name())
            .collect();
        while !tables.is_empty() {
            match request(&store, &schema, &tables).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %ErrorChain(&e), "cannot request the backfills of snapshot = true tables; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = config.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

async fn request(
    store: &ConnInfo,
    schema: &str,
    tables: &[String],
) -> Result<(), crate::store::StoreError> {
    let store = Store::connect(store, schema).await?;
    for table in tables {
        if let Some(id) = store.request_snapshot(table).await? {
            info!(table = %table, backfill = id, "snapshot = true: backfill requested");
        }
    }
    Ok(())
}
