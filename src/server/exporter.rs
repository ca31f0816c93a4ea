//! The Prometheus exporter behind `/metrics`: installs the process's `metrics` recorder
//! (metrics-exporter-prometheus without a listener of its own; the ops server serves the
//! text) and renders a scrape. Names, help texts and buckets come from
//! [`crate::telemetry`]; the stages record through the `metrics` facade.
//!
//! The per-subscription queue gauges are the exception: they are figures read from the
//! store, and a subscription that a config reload removes must stop being reported. The
//! facade cannot unregister a series, so these gauges are not kept in the process's
//! recorder at all: each refresh records the figures of the live config's subscriptions
//! into a fresh recorder of their own and keeps its rendered text
//! ([`Exporter::publish_queue_figures`]); a scrape appends that text. A removed
//! subscription is absent from the next refresh, and so from every scrape after it, at
//! once and without a timeout; a subscription that comes back starts from the store's
//! figures again.

use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use metrics::gauge;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::pg::ErrorChain;
use crate::store::stats::QueueStats;
use crate::telemetry::{
    self, BACKFILL_RUNNING, BUILD_INFO, INGEST_BATCH_SECONDS, QUEUE_DEAD,
    QUEUE_OLDEST_PENDING_SECONDS, QUEUE_PENDING, REPLICATION_LAG_BYTES, SLOT_ACTIVE,
    SUBSCRIPTION_ENABLED, label,
};

/// Content type of the Prometheus text (exposition format 0.0.4) `/metrics` answers with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often histogram samples are folded into their buckets between scrapes, so that
/// memory does not grow with the time since the last scrape (G6).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The process's recorder, installed once (`walhook demo` may run the daemon again in
/// the same process).
static INSTALLED: OnceLock<PrometheusHandle> = OnceLock::new();

/// Renders `/metrics`: the process's recorder plus the latest queue figures.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    /// Rendered text of the per-subscription queue gauges of the last refresh.
    queues: Arc<RwLock<String>>,
}

/// A recorder with walhook's histogram buckets (not installed).
fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in telemetry::histogram_buckets() {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_owned()), &buckets)
            .expect("bucket lists are not empty");
    }
    builder
}

/// Describes every metric and records those present from the start: the build info,
/// the slot gauges (0 until the first read) and the ingest histogram (empty).
fn register() {
    telemetry::describe();
    gauge!(BUILD_INFO, label::VERSION => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(REPLICATION_LAG_BYTES).increment(0.0);
    gauge!(SLOT_ACTIVE).increment(0.0);
    gauge!(BACKFILL_RUNNING).increment(0.0);
    // Registered, it is rendered with empty buckets until the first batch.
    let _ = metrics::histogram!(INGEST_BATCH_SECONDS);
    telemetry::update_replication_lag_seconds();
}

impl Exporter {
    /// Installs the process's recorder the first time (every `counter!`, `gauge!` and
    /// `histogram!` after it records into it) and returns an exporter rendering it.
    pub fn install() -> Exporter {
        let handle = INSTALLED.get_or_init(|| {
            let handle = match builder().install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    // Only another recorder installed first could cause this: serve an
                    // empty one rather than fail.
                    warn!(error = %ErrorChain(&e), "cannot install the metrics recorder; /metrics stays empty");
                    builder().build_recorder().handle()
                }
            };
            register();
            handle
        });
        Exporter::new(handle.clone())
    }

    fn new(handle: PrometheusHandle) -> Exporter {
        Exporter {
            handle,
            queues: Arc::new(RwLock::new(String::new())),
        }
    }

    /// Replaces the queue gauges with `figures`, those of the live config's
    /// subscriptions: a subscription left out is no longer reported.
    pub fn publish_queue_figures(&self, figures: &[QueueStats]) {
        let recorder = PrometheusBuilder::new().build_recorder();
        metrics::with_local_recorder(&recorder, || {
            telemetry::describe();
            for q in figures {
                let sub = q.subscription.clone();
                gauge!(SUBSCRIPTION_ENABLED, label::SUBSCRIPTION => sub.clone())
                    .set(f64::from(u8::from(q.dispatched)));
                gauge!(QUEUE_DEAD, label::SUBSCRIPTION => sub.clone()).set(q.dead as f64);
                // Not yet known while a backlog's first count is under way.
                if let (Some(pending), Some(oldest)) = (q.pending, q.oldest_pending_seconds) {
                    gauge!(QUEUE_PENDING, label::SUBSCRIPTION => sub.clone()).set(pending as f64);
                    gauge!(QUEUE_OLDEST_PENDING_SECONDS, label::SUBSCRIPTION => sub).set(oldest);
                }
            }
        });
        let text = recorder.handle().render();
        *self.queues.write().unwrap_or_else(PoisonError::into_inner) = text;
    }

    /// The Prometheus text of every metric.
    pub fn render(&self) -> String {
        telemetry::update_replication_lag_seconds();
        let mut out = self.handle.render();
        out.push_str(&self.queues.read().unwrap_or_else(PoisonError::into_inner));
        out
    }

    /// Folds histogram samples into their buckets every [`UPKEEP_INTERVAL`] until `stop`.
    pub async fn upkeep(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(UPKEEP_INTERVAL) => self.handle.run_upkeep(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::SystemTime;

    use super::*;
    use crate::delivery::measure::AttemptMetrics;
    use crate::delivery::{Attempt, AttemptOutcome, Decision};
    use crate::telemetry::*;

    /// An exporter on a recorder of its own, and `f` run with that recorder.
    fn with_exporter<T>(f: impl FnOnce(&Exporter) -> T) -> T {
        let recorder = builder().build_recorder();
        let exporter = Exporter::new(recorder.handle());
        metrics::with_local_recorder(&recorder, || {
            register();
            f(&exporter)
        })
    }

    fn samples(text: &str) -> HashMap<&str, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series, value.parse().ok()?))
            })
            .collect()
    }

    fn stats(subscription: &str, pending: i64) -> QueueStats {
        QueueStats {
            subscription: subscription.into(),
            dispatched: true,
            pending: Some(pending),
            dead: 0,
            oldest_pending_seconds: Some(0.0),
        }
    }

    #[test]
    fn every_name_is_exported_once_with_help_and_todays_series_names() {
        let text = with_exporter(|exporter| {
            let c = metrics::counter!(SOURCE_CHANGES_TOTAL, label::TABLE => "public.users", label::OP => "insert");
            c.increment(1);
            for t in ["user.created", "user.created", "user.updated"] {
                metrics::counter!(EVENTS_TOTAL, label::TYPE => t).increment(1);
            }
            metrics::counter!(INGEST_ERRORS_TOTAL, label::KIND => "unavailable").increment(1);
            metrics::histogram!(INGEST_BATCH_SECONDS).record(0.003);
            exporter.publish_queue_figures(&[stats("crm", 0)]);
            let attempt = Attempt {
                outcome: AttemptOutcome::Status {
                    code: 500,
                    retry_after: None,
                },
                response_head: String::new(),
                body_read: 0,
                location: None,
                error: None,
                elapsed: std::time::Duration::from_millis(3),
            };
            let retry = Decision::Retry {
                at: SystemTime::now(),
                reason: "http 500".into(),
            };
            let crm = AttemptMetrics::new("crm");
            crm.record(&attempt, &retry, SystemTime::now(), 1);
            crm.record(&attempt, &Decision::Delivered, SystemTime::now(), 1);
            exporter.render()
        });
        for name in [
            SOURCE_CHANGES_TOTAL,
            EVENTS_TOTAL,
            REPLICATION_LAG_BYTES,
            REPLICATION_LAG_SECONDS,
            SLOT_ACTIVE,
            INGEST_BATCH_SECONDS,
            INGEST_ERRORS_TOTAL,
            DELIVERIES_TOTAL,
            DELIVERY_ATTEMPT_SECONDS,
            DELIVERY_LATENCY_SECONDS,
            QUEUE_PENDING,
            QUEUE_DEAD,
            QUEUE_OLDEST_PENDING_SECONDS,
            HTTP_RESPONSES_TOTAL,
            SUBSCRIPTION_ENABLED,
            BACKFILL_RUNNING,
            BUILD_INFO,
        ] {
            assert_eq!(
                text.matches(&format!("# HELP {name} ")).count(),
                1,
                "{name} has help text once:\n{text}"
            );
            assert_eq!(
                text.matches(&format!("# TYPE {name} ")).count(),
                1,
                "{name} has a type once:\n{text}"
            );
        }
        let s = samples(&text);
        for (series, value) in [
            (
                "walhook_source_changes_total{table=\"public.users\",op=\"insert\"}",
                1.0,
            ),
            ("walhook_events_total{type=\"user.created\"}", 2.0),
            ("walhook_ingest_errors_total{kind=\"unavailable\"}", 1.0),
            (
                concat!(
                    "walhook_build_info{version=\"",
                    env!("CARGO_PKG_VERSION"),
                    "\"}"
                ),
                1.0,
            ),
            ("walhook_replication_lag_bytes", 0.0),
            ("walhook_replication_lag_seconds", 0.0),
            ("walhook_slot_active", 0.0),
            ("walhook_ingest_batch_seconds_count", 1.0),
            ("walhook_ingest_batch_seconds_bucket{le=\"0.004\"}", 1.0),
            ("walhook_ingest_batch_seconds_bucket{le=\"0.002\"}", 0.0),
            ("walhook_ingest_batch_seconds_bucket{le=\"65.536\"}", 1.0),
            ("walhook_subscription_enabled{subscription=\"crm\"}", 1.0),
            ("walhook_queue_pending{subscription=\"crm\"}", 0.0),
            (
                "walhook_deliveries_total{subscription=\"crm\",outcome=\"retry\"}",
                1.0,
            ),
            (
                "walhook_http_responses_total{subscription=\"crm\",code=\"500\"}",
                2.0,
            ),
            (
                "walhook_delivery_attempt_seconds_count{subscription=\"crm\"}",
                2.0,
            ),
            (
                "walhook_delivery_latency_seconds_count{subscription=\"crm\"}",
                1.0,
            ),
            (
                "walhook_delivery_latency_seconds_bucket{subscription=\"crm\",le=\"5368709.12\"}",
                1.0,
            ),
        ] {
            assert_eq!(s.get(series), Some(&value), "{series}:\n{text}");
        }
        // Today's buckets: 17 durations from 1 ms, 16 latencies from 5 ms, and +Inf.
        let buckets = |name: &str| {
            s.keys()
                .filter(|k| k.starts_with(&format!("{name}_bucket")))
                .count()
        };
        assert_eq!(buckets(INGEST_BATCH_SECONDS), 18);
        assert_eq!(buckets(DELIVERY_ATTEMPT_SECONDS), 18);
        assert_eq!(buckets(DELIVERY_LATENCY_SECONDS), 17);
        assert_eq!(
            s.len(),
            text.lines().filter(|l| l.starts_with("walhook_")).count()
        );
    }

    #[test]
    fn a_subscription_left_out_of_the_queue_figures_is_no_longer_reported() {
        let (before, after) = with_exporter(|exporter| {
            exporter.publish_queue_figures(&[stats("crm", 3), stats("old", 5)]);
            let before = exporter.render();
            exporter.publish_queue_figures(&[stats("crm", 4)]);
            (before, exporter.render())
        });
        assert!(before.contains("walhook_queue_pending{subscription=\"old\"} 5"));
        assert!(after.contains("walhook_queue_pending{subscription=\"crm\"} 4"));
        assert!(!after.contains("\"old\""), "{after}");
        assert_eq!(after.matches("# TYPE walhook_queue_pending ").count(), 1);
    }
}
