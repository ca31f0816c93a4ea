//! Every Prometheus metric walhook exports: names (as scraped) and help text defined once
//! here, one process-wide registry, and the cheap recording calls the stages make.
//!
//! Labels are bounded: subscription names, table names, operations, event types, outcomes
//! and status codes come from the config or a fixed set. Never a URL, an entity id or
//! error text. Hot paths hold [`Counter`] handles (an `Arc<AtomicU64>`) instead of
//! looking a label set up per row.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

use crate::delivery::{Attempt, Decision};

/// Row changes read from the replication stream, per table and operation.
pub const SOURCE_CHANGES_TOTAL: &str = "walhook_source_changes_total";
/// Entity events committed to the store, per event type.
pub const EVENTS_TOTAL: &str = "walhook_events_total";
/// Bytes of WAL the slot keeps.
pub const REPLICATION_LAG_BYTES: &str = "walhook_replication_lag_bytes";
/// Seconds since the commit of the last ingested source transaction.
pub const REPLICATION_LAG_SECONDS: &str = "walhook_replication_lag_seconds";
/// Whether the slot is active (a walsender streams it).
pub const SLOT_ACTIVE: &str = "walhook_slot_active";
/// Duration of one ingest store transaction.
pub const INGEST_BATCH_SECONDS: &str = "walhook_ingest_batch_seconds";
/// Ingest batches the store did not take, by kind.
pub const INGEST_ERRORS_TOTAL: &str = "walhook_ingest_errors_total";
/// Delivery attempts by outcome.
pub const DELIVERIES_TOTAL: &str = "walhook_deliveries_total";
/// Duration of one delivery attempt.
pub const DELIVERY_ATTEMPT_SECONDS: &str = "walhook_delivery_attempt_seconds";
/// Source commit to 2xx.
pub const DELIVERY_LATENCY_SECONDS: &str = "walhook_delivery_latency_seconds";
/// Deliveries not yet delivered nor dead.
pub const QUEUE_PENDING: &str = "walhook_queue_pending";
/// Dead deliveries kept in the store.
pub const QUEUE_DEAD: &str = "walhook_queue_dead";
/// Age of the oldest pending delivery.
pub const QUEUE_OLDEST_PENDING_SECONDS: &str = "walhook_queue_oldest_pending_seconds";
/// Receiver answers by status code (or failure kind).
pub const HTTP_RESPONSES_TOTAL: &str = "walhook_http_responses_total";
/// 1 while a subscription is dispatched, 0 when disabled (410) or paused.
pub const SUBSCRIPTION_ENABLED: &str = "walhook_subscription_enabled";
/// Always 1, labelled with the version.
pub const BUILD_INFO: &str = "walhook_build_info";

/// `{table, op}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableOp {
    pub table: String,
    pub op: &'static str,
}

/// `{type}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventType {
    pub r#type: String,
}

/// `{subscription}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Sub {
    pub subscription: String,
}

/// `{subscription, outcome}`; outcome is `delivered`, `retry`, `dead` or `disabled`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubOutcome {
    pub subscription: String,
    pub outcome: &'static str,
}

/// `{subscription, code}`; code is the HTTP status, or `timeout`, `connect`, `tls`,
/// `body`, `other` when there was no answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubCode {
    pub subscription: String,
    pub code: String,
}

/// `{kind}`: `unavailable` (connection lost, server restarting) or the kind of the
/// store's refusal (`limit`, `constraint`, `privilege`, `read_only`, `resources`,
/// `other`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

/// `{version}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Version {
    pub version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The process-wide metrics. Get them with [`metrics`].
pub struct Metrics {
    registry: Registry,
    pub source_changes: Family<TableOp, Counter>,
    pub events: Family<EventType, Counter>,
    pub lag_bytes: Gauge,
    lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub slot_active: Gauge,
    pub ingest_batch: Histogram,
    pub ingest_errors: Family<Kind, Counter>,
    pub deliveries: Family<SubOutcome, Counter>,
    pub attempt_seconds: HistogramFamily<Sub>,
    pub latency_seconds: HistogramFamily<Sub>,
    pub queue_pending: Family<Sub, Gauge>,
    pub queue_dead: Family<Sub, Gauge>,
    pub queue_oldest_pending: Family<Sub, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub http_responses: Family<SubCode, Counter>,
    pub subscription_enabled: Family<Sub, Gauge>,
    /// Lag-seconds state: ingest has nothing in hand (caught up).
    ingest_idle: AtomicBool,
    /// Commit time (unix microseconds) of the last ingested source transaction, or of
    /// the moment ingest last got work after being idle.
    ingest_reference_micros: AtomicI64,
}

/// Buckets for request and transaction durations: 1 ms to ~65 s.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Buckets for commit-to-delivery latency: 5 ms to ~3 days (retries included).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 4.0, 16))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            source_changes: Family::default(),
            events: Family::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            slot_active: Gauge::default(),
            ingest_batch: duration_histogram(),
            ingest_errors: Family::default(),
            deliveries: Family::default(),
            attempt_seconds: Family::new_with_constructor(duration_histogram),
            latency_seconds: Family::new_with_constructor(latency_histogram),
            queue_pending: Family::default(),
            queue_dead: Family::default(),
            queue_oldest_pending: Family::default(),
            http_responses: Family::default(),
            subscription_enabled: Family::default(),
            ingest_idle: AtomicBool::new(true),
            ingest_reference_micros: AtomicI64::new(0),
        };
        let build_info: Family<Version, Gauge> = Family::default();
        build_info
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let mut add = |name: &str, help: &str, metric: Box<dyn Metric>| {
            // The text encoder appends `_total` to counters itself.
            let name = name.strip_suffix("_total").unwrap_or(name);
            registry.register(name, help, Boxed(metric));
        };
        add(
            SOURCE_CHANGES_TOTAL,
            "Row changes of watched tables read from the replication stream",
            Box::new(m.source_changes.clone()),
        );
        add(
            EVENTS_TOTAL,
            "Entity events committed to the store",
            Box::new(m.events.clone()),
        );
        add(
            REPLICATION_LAG_BYTES,
            "WAL the slot keeps: the server's pg_current_wal_lsn() minus the slot's confirmed_flush_lsn (refreshed every 5 s)",
            Box::new(m.lag_bytes.clone()),
        );
        add(
            REPLICATION_LAG_SECONDS,
            "Now minus the commit time of the last ingested source transaction while ingest has work in hand; 0 when ingest is caught up with the stream",
            Box::new(m.lag_seconds.clone()),
        );
        add(
            SLOT_ACTIVE,
            "1 when the replication slot is active (some walsender streams it), 0 otherwise (refreshed every 5 s)",
            Box::new(m.slot_active.clone()),
        );
        add(
            INGEST_BATCH_SECONDS,
            "Duration of one ingest store transaction (a group-committed batch)",
            Box::new(m.ingest_batch.clone()),
        );
        add(
            INGEST_ERRORS_TOTAL,
            "Failed ingest store transactions by kind: unavailable (retried at once when the store is back) or the store's refusal (limit, constraint, privilege, read_only, resources, other; retried with backoff, /readyz not ready meanwhile)",
            Box::new(m.ingest_errors.clone()),
        );
        add(
            DELIVERIES_TOTAL,
            "Delivery attempts by outcome: delivered, retry, dead, disabled (410 Gone)",
            Box::new(m.deliveries.clone()),
        );
        add(
            DELIVERY_ATTEMPT_SECONDS,
            "Duration of one delivery attempt, request to end of the response body",
            Box::new(m.attempt_seconds.clone()),
        );
        add(
            DELIVERY_LATENCY_SECONDS,
            "Source commit time to the 2xx answer of the delivery",
            Box::new(m.latency_seconds.clone()),
        );
        add(
            QUEUE_PENDING,
            "Deliveries neither delivered nor dead: new events past the cursor plus pending retries (refreshed every 10 s)",
            Box::new(m.queue_pending.clone()),
        );
        add(
            QUEUE_DEAD,
            "Dead deliveries kept in the store (replayable) (refreshed every 10 s)",
            Box::new(m.queue_dead.clone()),
        );
        add(
            QUEUE_OLDEST_PENDING_SECONDS,
            "Age of the oldest pending delivery since it became due, 0 when none (refreshed every 10 s)",
            Box::new(m.queue_oldest_pending.clone()),
        );
        add(
            HTTP_RESPONSES_TOTAL,
            "Receiver answers by HTTP status code, or timeout, connect, tls, body, other when there was none",
            Box::new(m.http_responses.clone()),
        );
        add(
            SUBSCRIPTION_ENABLED,
            "1 while a subscription is dispatched, 0 when disabled (410 Gone) or paused (refreshed every 10 s)",
            Box::new(m.subscription_enabled.clone()),
        );
        add(
            BUILD_INFO,
            "Always 1; the version label is walhook's version",
            Box::new(build_info),
        );
        Metrics { registry, ..m }
    }

    /// The counter of row changes to `table` with `op`; hold it and `inc()` per row.
    pub fn source_change_counter(&self, table: &str, op: &'static str) -> Counter {
        self.source_changes
            .get_or_create(&TableOp {
                table: table.to_owned(),
                op,
            })
            .clone()
    }

    /// Counts a committed batch's events by type (one label lookup per type).
    pub fn events_committed<'a>(&self, types: impl IntoIterator<Item = &'a str>) {
        let mut counts: Vec<(&str, u64)> = Vec::new();
        for t in types {
            match counts.iter_mut().find(|(name, _)| *name == t) {
                Some((_, n)) => *n += 1,
                None => counts.push((t, 1)),
            }
        }
        for (t, n) in counts {
            self.events
                .get_or_create(&EventType {
                    r#type: t.to_owned(),
                })
                .inc_by(n);
        }
    }

    /// Ingest committed a batch in `seconds`; `commit_time` is the unix time in
    /// microseconds of the last source transaction it holds, if known.
    pub fn ingest_committed(&self, seconds: f64, commit_time_unix_micros: Option<i64>) {
        self.ingest_batch.observe(seconds);
        if let Some(t) = commit_time_unix_micros {
            self.ingest_reference_micros.store(t, Ordering::Relaxed);
        }
    }

    /// An ingest store transaction failed with an error of `kind`.
    pub fn ingest_error(&self, kind: &'static str) {
        self.ingest_errors.get_or_create(&Kind { kind }).inc();
    }

    /// Ingest has nothing in hand (`true`) or just got work after being idle.
    pub fn ingest_idle(&self, idle: bool) {
        let was = self.ingest_idle.swap(idle, Ordering::Relaxed);
        if was && !idle {
            // Work that arrived now is at most as old as now, as far as we know.
            self.ingest_reference_micros
                .store(unix_micros(SystemTime::now()), Ordering::Relaxed);
        }
    }

    /// Records one delivery attempt of `subscription`: its outcome, answer, duration
    /// and, when delivered, the commit-to-2xx latency from `occurred_at`.
    pub fn delivery_attempt(
        &self,
        subscription: &str,
        attempt: &Attempt,
        decision: &Decision,
        occurred_at: SystemTime,
    ) {
        let sub = Sub {
            subscription: subscription.to_owned(),
        };
        let outcome = match decision {
            Decision::Delivered => "delivered",
            Decision::Retry { .. } => "retry",
            Decision::Dead { .. } => "dead",
            Decision::DeadAndDisable { .. } => "disabled",
        };
        self.deliveries
            .get_or_create(&SubOutcome {
                subscription: sub.subscription.clone(),
                outcome,
            })
            .inc();
        self.http_responses
            .get_or_create(&SubCode {
                subscription: sub.subscription.clone(),
                code: attempt.outcome.label().into_owned(),
            })
            .inc();
        self.attempt_seconds
            .get_or_create(&sub)
            .observe(attempt.elapsed.as_secs_f64());
        if matches!(decision, Decision::Delivered) {
            let latency = SystemTime::now()
                .duration_since(occurred_at)
                .unwrap_or_default();
            self.latency_seconds
                .get_or_create(&sub)
                .observe(latency.as_secs_f64());
        }
    }

    /// The Prometheus text exposition (OpenMetrics) of every metric.
    pub fn encode(&self) -> String {
        let lag = if self.ingest_idle.load(Ordering::Relaxed) {
            0.0
        } else {
            let since = unix_micros(SystemTime::now())
                - self.ingest_reference_micros.load(Ordering::Relaxed);
            (since.max(0) as f64) / 1e6
        };
        self.lag_seconds.set(lag);
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn unix_micros(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A boxed metric, so that one closure can register metrics of every type.
#[derive(Debug)]
struct Boxed(Box<dyn Metric>);

impl prometheus_client::encoding::EncodeMetric for Boxed {
    fn encode(
        &self,
        encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::AttemptOutcome;

    #[test]
    fn every_name_is_exported_once_with_help() {
        let m = metrics();
        m.source_change_counter("public.users", "insert").inc();
        m.events_committed(["user.created", "user.created", "user.updated"]);
        let sub = Sub {
            subscription: "crm".into(),
        };
        m.subscription_enabled.get_or_create(&sub).set(1);
        m.queue_pending.get_or_create(&sub).set(0);
        m.queue_dead.get_or_create(&sub).set(0);
        m.queue_oldest_pending.get_or_create(&sub).set(0.0);
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
        m.delivery_attempt("crm", &attempt, &retry, SystemTime::now());
        m.delivery_attempt("crm", &attempt, &Decision::Delivered, SystemTime::now());
        let text = m.encode();
        for name in [
            SOURCE_CHANGES_TOTAL,
            EVENTS_TOTAL,
            REPLICATION_LAG_BYTES,
            REPLICATION_LAG_SECONDS,
            SLOT_ACTIVE,
            INGEST_BATCH_SECONDS,
            DELIVERIES_TOTAL,
            DELIVERY_ATTEMPT_SECONDS,
            DELIVERY_LATENCY_SECONDS,
            QUEUE_PENDING,
            QUEUE_DEAD,
            QUEUE_OLDEST_PENDING_SECONDS,
            HTTP_RESPONSES_TOTAL,
            SUBSCRIPTION_ENABLED,
            BUILD_INFO,
        ] {
            let family = name.strip_suffix("_total").unwrap_or(name);
            assert!(
                text.contains(&format!("# HELP {family} ")),
                "{name} has help text:\n{text}"
            );
        }
        assert!(
            text.contains("walhook_source_changes_total{table=\"public.users\",op=\"insert\"} 1")
        );
        assert!(text.contains("walhook_events_total{type=\"user.created\"} 2"));
        assert!(text.contains("walhook_build_info{version=\""));
        assert!(text.contains("walhook_subscription_enabled{subscription=\"crm\"} 1"));
        assert!(
            text.contains("walhook_deliveries_total{subscription=\"crm\",outcome=\"retry\"} 1")
        );
        assert!(text.contains("walhook_http_responses_total{subscription=\"crm\",code=\"500\"} 2"));
        assert!(text.contains("walhook_delivery_latency_seconds_count{subscription=\"crm\"} 1"));
    }
}
