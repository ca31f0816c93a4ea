//! How dispatchers learn that new events are in the log: ingest in this process bumps a
//! [`Wake`] at once; events ingested by another process (the slot holder, when this
//! instance only dispatches) arrive as a PostgreSQL `NOTIFY` that [`listen`] turns into
//! the same bump. A dispatcher never misses a bump that happened while it was busy, and
//! still polls the store every few hundred milliseconds in case a notification is lost.
//! Ingest in this process also leaves the events it committed in the [`LiveLog`], where
//! this process's dispatchers take them without reading them back from the store.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::live::LiveLog;
use crate::pg::ConnInfo;
use crate::pg::ErrorChain;
use crate::pg::quote_ident;

/// A generation counter: every bump wakes every dispatcher's receiver once; and the
/// newest events this process ingested.
pub struct Wake {
    tx: watch::Sender<u64>,
    live: LiveLog,
}

impl Wake {
    /// A counter at zero; `live_budget` bounds the bytes of events kept in memory.
    pub fn new(live_budget: usize) -> Wake {
        Wake {
            tx: watch::Sender::new(0),
            live: LiveLog::new(live_budget),
        }
    }

    /// The newest events this process ingested.
    pub fn live(&self) -> &LiveLog {
        &self.live
    }

    /// New events are in the log.
    pub fn notify(&self) {
        self.tx.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A receiver whose `changed()` resolves after the next bump (or at once when one
    /// happened since it last looked).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

/// The `NOTIFY` channel of the store in `schema` (ingest notifies it in the transaction
/// that writes events, so the notification arrives only once they are committed).
pub fn channel(schema: &str) -> String {
    quote_ident(&format!("walhook_events.{schema}"))
}

/// Listens on the store's channel until `shutdown`, bumping `wake` on every
/// notification; reconnects after a lost connection.
pub async fn listen(
    params: ConnInfo,
    schema: String,
    wake: std::sync::Arc<Wake>,
    shutdown: CancellationToken,
) {
    let channel = channel(&schema);
    let mut failures = 0u32;
    while !shutdown.is_cancelled() {
        match params.connect_listen().await {
            Ok((client, mut notes)) => {
                if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
                    warn!(error = %ErrorChain(&e), "cannot listen for new events; polling only");
                } else {
                    debug!("listening for new events");
                    failures = 0;
                    // Events may have arrived while the connection was down.
                    wake.notify();
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            note = notes.recv() => match note {
                                Some(()) => wake.notify(),
                                None => break,
                            },
                        }
                    }
                }
            }
            Err(e) => {
                if failures == 0 {
                    warn!(error = %ErrorChain(&e), "cannot connect to listen for new events; polling until it works");
                }
            }
        }
        failures = failures.saturating_add(1);
        let pause = Duration::from_millis(500 * u64::from(failures.min(10)));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
