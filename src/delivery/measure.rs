//! Records one delivery attempt in the metrics: its outcome, the receiver's answer, the
//! attempt's duration and, once delivered, the commit-to-2xx latency.

use std::time::SystemTime;

use metrics::{counter, histogram};

use super::{Attempt, Decision};
use crate::telemetry::{
    DELIVERIES_TOTAL, DELIVERY_ATTEMPT_SECONDS, DELIVERY_LATENCY_SECONDS, HTTP_RESPONSES_TOTAL,
    label,
};

/// The `outcome` label of a decision.
fn outcome(decision: &Decision) -> &'static str {
    match decision {
        Decision::Delivered => "delivered",
        Decision::Retry { .. } => "retry",
        Decision::Dead { .. } => "dead",
        Decision::DeadAndDisable { .. } => "disabled",
    }
}

/// Records one attempt of `subscription` that ended in `decision`; `occurred_at` is the
/// source commit time of the event.
pub fn record_attempt(
    subscription: &str,
    attempt: &Attempt,
    decision: &Decision,
    occurred_at: SystemTime,
) {
    let sub = subscription.to_owned();
    counter!(DELIVERIES_TOTAL, label::SUBSCRIPTION => sub.clone(), label::OUTCOME => outcome(decision))
        .increment(1);
    counter!(HTTP_RESPONSES_TOTAL, label::SUBSCRIPTION => sub.clone(), label::CODE => attempt.outcome.label())
        .increment(1);
    histogram!(DELIVERY_ATTEMPT_SECONDS, label::SUBSCRIPTION => sub.clone())
        .record(attempt.elapsed.as_secs_f64());
    if matches!(decision, Decision::Delivered) {
        let latency = SystemTime::now()
            .duration_since(occurred_at)
            .unwrap_or_default();
        histogram!(DELIVERY_LATENCY_SECONDS, label::SUBSCRIPTION => sub)
            .record(latency.as_secs_f64());
    }
}
