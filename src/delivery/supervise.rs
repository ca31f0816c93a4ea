//! Dispatcher supervision: one dispatcher per subscription of the running config,
//! started, stopped and restarted as reloads change the subscriptions, and started again
//! when one ends by a panic or an early return.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{HttpClients, dispatch};
use crate::config::{Config, SubscriptionConfig};
use crate::pg::ConnInfo;
use crate::pg::ErrorChain;
use crate::store::Store;
use crate::store::wake::{self, Wake};

/// First wait before a dispatcher that ended early is started again.
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait between restarts; a dispatcher that ran twice this long before ending
/// starts the backoff over.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A task that is aborted when its handle is dropped (the supervisor itself aborted).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running dispatcher.
struct Running {
    /// The settings it runs with; a reload that changes any restarts it.
    config: SubscriptionConfig,
    stop: CancellationToken,
    task: AbortOnDrop,
}

/// What every dispatcher shares.
pub struct DispatchContext {
    pub store_params: ConnInfo,
    pub schema: String,
    pub clients: Arc<HttpClients>,
    /// This instance's id (each dispatcher leases under it and a serial).
    pub owner: String,
    pub wake: Arc<Wake>,
}

/// Runs one dispatcher per subscription of the current config until `stop`, following
/// reloads: added subscriptions get a dispatcher, removed ones have theirs stopped
/// (in-flight attempts get `daemon.shutdown_grace` to finish; the lease is released),
/// changed ones are stopped and started again with the new settings. At `stop`, every
/// dispatcher is stopped the same way (the caller bounds the wait).
pub async fn supervise(
    mut configs: watch::Receiver<Arc<Config>>,
    cx: DispatchContext,
    stop: CancellationToken,
) {
    let cx = Arc::new(cx);
    let mut running: BTreeMap<String, Running> = BTreeMap::new();
    let listen_stop = stop.child_token();
    let mut listener: Option<AbortOnDrop> = None;
    loop {
        let config = configs.borrow_and_update().clone();
        // Dispatchers of other processes' events learn of them by NOTIFY.
        if listener.is_none() && !config.subscriptions.is_empty() {
            listener = Some(AbortOnDrop(tokio::spawn(wake::listen(
                cx.store_params.clone(),
                cx.schema.clone(),
                cx.wake.clone(),
                listen_stop.clone(),
            ))));
        }
        let wanted: BTreeMap<String, &SubscriptionConfig> = config
            .subscriptions
            .iter()
            .map(|s| (s.name.as_str().to_owned(), s))
            .collect();
        let outdated: BTreeSet<String> = running
            .iter()
            .filter(|(name, r)| wanted.get(*name).is_none_or(|s| **s != r.config))
            .map(|(name, _)| name.clone())
            .collect();
        let stopping: Vec<(String, Running)> = outdated
            .into_iter()
            .filter_map(|name| running.remove_entry(&name))
            .collect();
        stop_all(stopping, config.daemon.shutdown_grace).await;
        for (name, sub) in wanted {
            if running.contains_key(&name) {
                continue;
            }
            let token = stop.child_token();
            let task = tokio::spawn(keep_running(sub.clone(), cx.clone(), token.clone()));
            running.insert(
                name,
                Running {
                    config: sub.clone(),
                    stop: token,
                    task: AbortOnDrop(task),
                },
            );
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = configs.changed() => {
                if changed.is_err() {
                    // No more reloads: run as configured until stopped.
                    stop.cancelled().await;
                    break;
                }
            }
        }
    }
    let grace = configs.borrow().daemon.shutdown_grace;
    stop_all(running.into_iter().collect(), grace).await;
    listen_stop.cancel();
    if let Some(mut listener) = listener.take() {
        let _ = (&mut listener.0).await;
    }
}

/// Stops dispatchers together; one still busy after `grace` is aborted. Its lease is
/// its own (every dispatcher has an owner of its own), so a successor here takes it over
/// when it runs out, and a write the aborted one left on its way is fenced out.
async fn stop_all(stopping: Vec<(String, Running)>, grace: Duration) {
    for (_, r) in &stopping {
        r.stop.cancel();
    }
    for (name, mut r) in stopping {
        if tokio::time::timeout(grace, &mut r.task.0).await.is_err() {
            warn!(subscription = %name, grace = ?grace, "dispatcher still busy after the shutdown grace; stopping it");
        } else {
            info!(subscription = %name, "dispatcher stopped");
        }
    }
}

/// Runs the dispatcher of `sub` until `stop`, starting it again whenever it ends
/// otherwise: by a panic (a bug in one attempt must not stop a subscription silently)
/// or by returning early. Each restart is logged and counted
/// (`walhook_dispatcher_restarts_total`); restarts back off from 1 s to 30 s while they
/// keep coming. A restarted dispatcher takes its lease over again and resumes from the
/// stored cursor and retry rows, so nothing is lost or sent out of order.
async fn keep_running(sub: SubscriptionConfig, cx: Arc<DispatchContext>, stop: CancellationToken) {
    let name = sub.name.as_str().to_owned();
    restarting(&name, &stop, || {
        dispatcher(sub.clone(), cx.clone(), stop.clone())
    })
    .await;
}

/// Runs `start()` on a task of its own until `stop`, again after each early end.
async fn restarting<F, Fut>(name: &str, stop: &CancellationToken, start: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = RESTART_BACKOFF_MIN;
    loop {
        let began = tokio::time::Instant::now();
        // Aborted with this future: the supervisor may abort it after the grace.
        let mut task = AbortOnDrop(tokio::spawn(start()));
        let ended = (&mut task.0).await;
        if stop.is_cancelled() {
            return;
        }
        match ended {
            Err(e) if e.is_panic() => error!(
                subscription = %name,
                "dispatcher panicked (message above); restarting it from the stored cursor"
            ),
            Err(_) => return,
            Ok(()) => warn!(subscription = %name, "dispatcher ended early; restarting it"),
        }
        count_restart(name);
        if began.elapsed() > RESTART_BACKOFF_MAX * 2 {
            backoff = RESTART_BACKOFF_MIN;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RESTART_BACKOFF_MAX);
    }
}

/// Connects the dispatcher's store connection (retrying while the store is down) and
/// runs the dispatcher until `stop`.
async fn dispatcher(sub: SubscriptionConfig, cx: Arc<DispatchContext>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    let store = loop {
        match Store::connect(&cx.store_params, &cx.schema).await {
            Ok(store) => break store,
            Err(e) => {
                warn!(subscription = %sub.name, error = %ErrorChain(&e), "dispatcher cannot reach the store; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    let span = tracing::info_span!("dispatcher", subscription = %sub.name);
    tracing::Instrument::instrument(
        dispatch::run(
            sub,
            store,
            cx.clients.clone(),
            cx.owner.clone(),
            cx.wake.clone(),
            stop,
        ),
        span,
    )
    .await;
}

/// Counts a restart of `subscription`'s dispatcher.
fn count_restart(subscription: &str) {
    metrics::counter!(
        crate::telemetry::DISPATCHER_RESTARTS_TOTAL,
        crate::telemetry::label::SUBSCRIPTION => subscription.to_owned()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_run_is_started_again_until_stopped() {
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (counted, stopper) = (runs.clone(), stop.clone());
        let supervisor = tokio::spawn(async move {
            let inner = stopper.clone();
            restarting("s", &stopper, move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                let stop = inner.clone();
                async move {
                    if n < 3 {
                        panic!("attempt {n} failed");
                    }
                    // The fourth run keeps going until stopped, as a healthy
                    // dispatcher does.
                    stop.cancelled().await;
                }
            })
            .await;
        });
        // Restarts after 1 s, 2 s and 4 s of backoff.
        tokio::time::sleep(Duration::from_millis(7500)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        stop.cancel();
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 4, "no restart after stop");
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_return_is_restarted_with_backoff() {
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (counted, stopper) = (runs.clone(), stop.clone());
        let supervisor = tokio::spawn(async move {
            restarting("s", &stopper, move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async {}
            })
            .await;
        });
        // Runs at 0 s, then after 1 s, 2 s and 4 s of backoff.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        stop.cancel();
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no restart after stop");
    }
}
