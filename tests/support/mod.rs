//! Shared helpers for the integration tests: the throwaway PostgreSQL cluster (`pg`),
//! running the `walhook` binary (`cli`), bounded waits that name what they waited for,
//! and the path of the built binary.

// Each test module uses a different subset of these helpers; the ones a given build
// does not call yet must not fail `clippy -D warnings`.
#![allow(dead_code)]

pub mod chaos_receiver;
pub mod cli;
pub mod daemon;
pub mod pg;
pub mod receiver;
pub mod workload;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often [`wait_for`] and [`wait_for_some`] re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `condition` until it returns `true`.
///
/// Panics after `timeout` with a message naming `what` ("timed out after 5s waiting for
/// {what}"). The condition is checked at least once, even with a zero timeout.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_some(what, timeout, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it returns `Some(value)` and returns that value.
///
/// Panics after `timeout` with a message naming `what`, like [`wait_for`].
pub async fn wait_for_some<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Awaits `future` for at most `timeout`; panics naming `what` if it does not finish.
pub async fn within<T>(what: &str, timeout: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Path of the `walhook` binary Cargo built for this test run.
pub fn walhook_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walhook"))
}
