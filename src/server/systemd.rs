//! systemd service notifications (`Type=notify`): `READY=1` once the daemon is prepared,
//! `WATCHDOG=1` at half the unit's `WatchdogSec`, `STOPPING=1` on shutdown. Each is a
//! no-op when `NOTIFY_SOCKET` is unset (not run by systemd).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

fn notify(state: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Start-up is done: migrations applied, publication and slot checked, workers started.
pub fn ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("running")]);
}

/// Shutdown has begun (in-flight deliveries get `daemon.shutdown_grace`).
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// When the unit sets `WatchdogSec`, pings systemd at half that period until `stop`. The
/// ping runs on the async runtime, so a wedged runtime gets the service restarted.
pub fn spawn_watchdog(stop: CancellationToken) {
    // As sd_watchdog_enabled(3): WATCHDOG_USEC set, and WATCHDOG_PID unset or ours.
    let usec: u64 = match std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(usec) if usec > 0 => usec,
        _ => return,
    };
    let pid = std::env::var("WATCHDOG_PID").ok();
    if pid.is_some_and(|p| p.trim() != std::process::id().to_string()) {
        return;
    }
    let period = Duration::from_micros(usec) / 2;
    debug!(period = ?period, "systemd watchdog enabled");
    tokio::spawn(async move {
        loop {
            notify(&[NotifyState::Watchdog]);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    });
}
