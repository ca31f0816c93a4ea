//! `walhook run`: the daemon. SIGTERM or SIGINT finishes the batch in hand, confirms it
//! and exits 0; SIGHUP reloads the config file.

use std::path::PathBuf;

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

/// Runs the daemon with an already loaded config, read from `path` (read again on
/// SIGHUP).
pub async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Installed before anything else, so a SIGHUP never kills the daemon.
    let mut hup = signal(SignalKind::hangup())?;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // A reload already pending serves this signal too.
            let _ = reload_tx.try_send(());
        }
    });
    let reloads = crate::daemon::reload::Requests {
        path,
        rx: reload_rx,
    };
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: finishing the current batch"),
            _ = int.recv() => info!("SIGINT: finishing the current batch"),
        }
        token.cancel();
    });
    info!(version = env!("CARGO_PKG_VERSION"), "walhook starting");
    crate::daemon::run(config, reloads, shutdown).await?;
    info!("walhook stopped");
    Ok(())
}
