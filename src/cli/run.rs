//! `walhook run`: the daemon. SIGTERM or SIGINT finishes the batch in hand, confirms it
//! and exits 0.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::ConfigArg;
use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Runs the daemon with an already loaded config.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: finishing the current batch"),
            _ = int.recv() => info!("SIGINT: finishing the current batch"),
        }
        token.cancel();
    });
    info!(version = env!("CARGO_PKG_VERSION"), "walhook starting");
    crate::daemon::run(config, shutdown).await?;
    info!("walhook stopped");
    Ok(())
}
