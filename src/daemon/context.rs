//! The context stage of ingest: between mapping and the store commit, fills each
//! change's `context` (`[[tables.context]]`) from the source database over an ordinary
//! SQL connection of its own, with one query per context entry and chain level per
//! batch ([`crate::mapping::lookup::resolve`]).
//!
//! A lookup that fails is retried until it succeeds, like a store commit (G1, G2):
//! the batch is neither dropped nor stored without its context, and nothing after it
//! is confirmed meanwhile. While it fails, ingest says it is stalled (the source task
//! then closes its replication connection, G9); an error a reconnect cannot cure (a
//! privilege revoked, a column dropped) also makes `/readyz` not ready, naming the
//! table and the server's reason. A parent that is simply not there is no error: its
//! context is `null` and `walhook_context_missing_total` counts it.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::mapping::lookup;
use crate::pg::{ConnInfo, ErrorChain};
use crate::server::Health;
use crate::store::IngestBatch;

/// Longest wait between tries while the source is unreachable.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);
/// Longest wait between tries while the source refuses the lookup.
const MAX_REFUSED_BACKOFF: Duration = Duration::from_secs(30);

/// Reads context for ingest; connects on first use and again after a lost connection.
pub struct ContextReader {
    params: ConnInfo,
    client: Option<tokio_postgres::Client>,
}

/// What ingest shares with the context stage while it retries.
pub struct Signals<'a> {
    pub health: &'a Health,
    pub stalled: &'a watch::Sender<bool>,
    pub shutdown: &'a CancellationToken,
}

impl ContextReader {
    /// A reader of the source database at `params` (not connected yet).
    pub fn new(params: ConnInfo) -> ContextReader {
        ContextReader {
            params,
            client: None,
        }
    }

    /// Fills the context of `batch`'s changes whose table has context entries,
    /// retrying until it succeeds. Returns `false` when shutdown came first (the batch
    /// is then not stored; the slot replays it to the next run).
    pub async fn fill(&mut self, batch: &mut IngestBatch, signals: &Signals<'_>) -> bool {
        if batch.changes.iter().all(|c| c.context_keys.is_none()) {
            return true;
        }
        let mut backoff = Duration::from_millis(100);
        let mut refused = false;
        loop {
            let err = match self.try_fill(batch, signals.shutdown).await {
                Some(Ok(())) => {
                    signals
                        .stalled
                        .send_if_modified(|s| std::mem::replace(s, false));
                    if refused {
                        info!("context lookup works again; ingest goes on");
                        signals.health.set_ingest_refused(None);
                    }
                    return true;
                }
                None => return false,
                Some(Err(e)) => e,
            };
            signals
                .stalled
                .send_if_modified(|s| !std::mem::replace(s, true));
            match &err {
                Failure::Connect(e) => {
                    warn!(error = %ErrorChain(e), backoff_ms = backoff.as_millis() as u64, "cannot connect to the source for context lookups; retrying the batch");
                }
                Failure::Query(e) if is_transient(e) => {
                    warn!(error = %ErrorChain(e), backoff_ms = backoff.as_millis() as u64, "context lookup failed; retrying the batch");
                }
                Failure::Query(e) => {
                    let why = format!(
                        "the context lookup of a batch fails: {}. Fix: let walhook's role read the context tables (GRANT SELECT), or correct [[tables.context]]; walhook retries it (backoff up to {} s) and confirms nothing past it until then",
                        e.as_db_error()
                            .map(|d| d.message().to_owned())
                            .unwrap_or_else(|| ErrorChain(e).to_string()),
                        MAX_REFUSED_BACKOFF.as_secs()
                    );
                    error!(reason = %why, backoff_s = backoff.as_secs(), "context lookup refused; retrying the batch (nothing after it is confirmed)");
                    signals.health.set_ingest_refused(Some(why));
                    refused = true;
                    backoff = backoff.max(Duration::from_secs(1));
                }
            }
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                self.client = None;
            }
            tokio::select! {
                biased;
                _ = signals.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            let cap = if refused {
                MAX_REFUSED_BACKOFF
            } else {
                MAX_RETRY_BACKOFF
            };
            backoff = (backoff * 2).min(cap);
        }
    }

    /// One try; `None` when shutdown came first.
    async fn try_fill(
        &mut self,
        batch: &mut IngestBatch,
        shutdown: &CancellationToken,
    ) -> Option<Result<(), Failure>> {
        if self.client.is_none() {
            let connected = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                c = self.params.connect_sql() => c,
            };
            match connected {
                Ok(c) => self.client = Some(c),
                Err(e) => return Some(Err(Failure::Connect(e))),
            }
        }
        let client = self.client.as_ref().expect("connected above");
        let keys: Vec<_> = batch
            .changes
            .iter()
            .map(|c| c.context_keys.as_ref())
            .collect();
        let resolved = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            r = lookup::resolve(client, &keys) => r,
        };
        match resolved {
            Ok(contexts) => {
                for (change, context) in batch.changes.iter_mut().zip(contexts) {
                    change.context = context.map(std::sync::Arc::new);
                }
                Some(Ok(()))
            }
            Err(e) => Some(Err(Failure::Query(e))),
        }
    }
}

/// Why one try failed.
enum Failure {
    Connect(crate::pg::PgError),
    Query(tokio_postgres::Error),
}

/// Whether reconnecting or waiting may cure `e`: a lost connection, a server shutting
/// down or restarting, serialization and deadlock failures, too many connections.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || e.code().is_none_or(|c| {
            let c = c.code();
            c.starts_with("08")
                || c.starts_with("57P")
                || c == "40001"
                || c == "40P01"
                || c == "53300"
        })
}
