//! Records one delivery attempt in the metrics: its outcome, the receiver's answer, the
//! attempt's duration and, once delivered, the commit-to-2xx latency.
//!
//! A dispatcher holds one [`AttemptMetrics`] for its subscription: each series handle
//! is looked up once (a lookup builds the labels and hashes the key), not per attempt.
//! A series is created by its first sample, as before: a subscription that never
//! attempted anything has none (and a reload that removes it leaves none behind).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use metrics::{Counter, Histogram, counter, histogram};

use super::policy::ErrorKind;
use super::{Attempt, AttemptOutcome, Decision};
use crate::telemetry::{
    DELIVERIES_TOTAL, DELIVERY_ATTEMPT_SECONDS, DELIVERY_LATENCY_SECONDS, HTTP_RESPONSES_TOTAL,
    label,
};

/// The `outcome` labels, in [`outcome`]'s order.
const OUTCOMES: [&str; 4] = ["delivered", "retry", "dead", "disabled"];

/// A status code, or the kind of failure.
type ResponseKey = Result<u16, ErrorKind>;

/// The index in [`OUTCOMES`] of a decision's `outcome` label.
fn outcome(decision: &Decision) -> usize {
    match decision {
        Decision::Delivered => 0,
        Decision::Retry { .. } => 1,
        Decision::Dead { .. } => 2,
        Decision::DeadAndDisable { .. } => 3,
    }
}

/// The attempt series of one subscription, in the process's recorder.
pub struct AttemptMetrics {
    subscription: String,
    deliveries: [OnceLock<Counter>; 4],
    /// `http_responses_total` per status code or failure kind seen so far (a bounded
    /// set), keyed without building the label.
    responses: Mutex<HashMap<ResponseKey, Counter>>,
    attempt_seconds: OnceLock<Histogram>,
    latency_seconds: OnceLock<Histogram>,
}

impl AttemptMetrics {
    /// The handles of `subscription`'s series.
    pub fn new(subscription: &str) -> AttemptMetrics {
        AttemptMetrics {
            subscription: subscription.to_owned(),
            deliveries: Default::default(),
            responses: Mutex::default(),
            attempt_seconds: OnceLock::new(),
            latency_seconds: OnceLock::new(),
        }
    }

    /// Records one request of `events` events that ended in `decision`: each event is
    /// a delivery (`deliveries_total`, and its latency from `occurred_at`, the source
    /// commit time of the oldest), the request one response and one attempt duration.
    pub fn record(
        &self,
        attempt: &Attempt,
        decision: &Decision,
        occurred_at: SystemTime,
        events: u64,
    ) {
        let sub = || self.subscription.clone();
        let i = outcome(decision);
        self.deliveries[i]
            .get_or_init(|| counter!(DELIVERIES_TOTAL, label::SUBSCRIPTION => sub(), label::OUTCOME => OUTCOMES[i]))
            .increment(events);
        let key = match attempt.outcome {
            AttemptOutcome::Status { code, .. } => Ok(code),
            AttemptOutcome::Error { kind } => Err(kind),
        };
        self.responses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_insert_with(|| {
                let code = attempt.outcome.label();
                counter!(HTTP_RESPONSES_TOTAL, label::SUBSCRIPTION => sub(), label::CODE => code)
            })
            .increment(1);
        self.attempt_seconds
            .get_or_init(|| histogram!(DELIVERY_ATTEMPT_SECONDS, label::SUBSCRIPTION => sub()))
            .record(attempt.elapsed.as_secs_f64());
        if matches!(decision, Decision::Delivered) {
            let latency = SystemTime::now()
                .duration_since(occurred_at)
                .unwrap_or_default();
            self.latency_seconds
                .get_or_init(|| histogram!(DELIVERY_LATENCY_SECONDS, label::SUBSCRIPTION => sub()))
                .record_many(latency.as_secs_f64(), events as usize);
        }
    }
}
