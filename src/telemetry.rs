//! Every metric walhook exports, defined once: names (as scraped), help texts, label
//! keys and histogram buckets, plus the replication-lag clock that ingest keeps.
//!
//! Stages record through the `metrics` facade (`counter!`, `gauge!`, `histogram!`) with
//! the names below and import nothing from `server`; only the server knows the exporter:
//! it installs the recorder (applying [`describe`] and [`histogram_buckets`]) and serves
//! `/metrics`. Without an installed recorder (the CLI's other commands, unit tests) the
//! macros record nothing.
//!
//! Labels are bounded: subscription names, table names, operations, event types,
//! outcomes, kinds and status codes come from the config or a fixed set. Never a URL, an
//! entity id or error text. Counter names carry their `_total` suffix here: the exporter
//! adds none.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::SystemTime;

use metrics::{describe_counter, describe_gauge, describe_histogram};

/// Row changes read from the replication stream, `{table, op}`.
pub const SOURCE_CHANGES_TOTAL: &str = "walhook_source_changes_total";
/// Entity events committed to the store, `{type}`.
pub const EVENTS_TOTAL: &str = "walhook_events_total";
/// Bytes of WAL the slot keeps.
pub const REPLICATION_LAG_BYTES: &str = "walhook_replication_lag_bytes";
/// Seconds since the commit of the last ingested source transaction.
pub const REPLICATION_LAG_SECONDS: &str = "walhook_replication_lag_seconds";
/// Whether the slot is active (a walsender streams it).
pub const SLOT_ACTIVE: &str = "walhook_slot_active";
/// Duration of one ingest store transaction.
pub const INGEST_BATCH_SECONDS: &str = "walhook_ingest_batch_seconds";
/// Ingest batches the store did not take, `{kind}`.
pub const INGEST_ERRORS_TOTAL: &str = "walhook_ingest_errors_total";
/// Context parents not found at ingest, `{table, context}`: the event carries `null`.
pub const CONTEXT_MISSING_TOTAL: &str = "walhook_context_missing_total";
/// Rows a backfill read, in chunks stored (with their events, or dropped as changed
/// between the watermarks), `{table}`.
pub const BACKFILL_ROWS_TOTAL: &str = "walhook_backfill_rows_total";
/// 1 while this process runs a backfill, else 0.
pub const BACKFILL_RUNNING: &str = "walhook_backfill_running";
/// Delivery attempts, `{subscription, outcome}`.
pub const DELIVERIES_TOTAL: &str = "walhook_deliveries_total";
/// Duration of one delivery attempt, `{subscription}`.
pub const DELIVERY_ATTEMPT_SECONDS: &str = "walhook_delivery_attempt_seconds";
/// Source commit to 2xx, `{subscription}`.
pub const DELIVERY_LATENCY_SECONDS: &str = "walhook_delivery_latency_seconds";
/// Deliveries not yet delivered nor dead, `{subscription}`.
pub const QUEUE_PENDING: &str = "walhook_queue_pending";
/// Dead deliveries kept in the store, `{subscription}`.
pub const QUEUE_DEAD: &str = "walhook_queue_dead";
/// Age of the oldest pending delivery, `{subscription}`.
pub const QUEUE_OLDEST_PENDING_SECONDS: &str = "walhook_queue_oldest_pending_seconds";
/// Receiver answers by status code (or failure kind), `{subscription, code}`.
pub const HTTP_RESPONSES_TOTAL: &str = "walhook_http_responses_total";
/// 1 while a subscription is dispatched, 0 when disabled (410) or paused, `{subscription}`.
pub const SUBSCRIPTION_ENABLED: &str = "walhook_subscription_enabled";
/// Dispatchers started again after a panic or an early end, `{subscription}`.
pub const DISPATCHER_RESTARTS_TOTAL: &str = "walhook_dispatcher_restarts_total";
/// Always 1, `{version}`.
pub const BUILD_INFO: &str = "walhook_build_info";

/// Label keys.
pub mod label {
    /// A `[[tables.context]]` name.
    pub const CONTEXT: &str = "context";
    /// A source table, `schema.name`.
    pub const TABLE: &str = "table";
    /// `insert`, `update` or `delete`.
    pub const OP: &str = "op";
    /// An event type from the config.
    pub const TYPE: &str = "type";
    /// A subscription name from the config.
    pub const SUBSCRIPTION: &str = "subscription";
    /// `delivered`, `retry`, `dead` or `disabled`.
    pub const OUTCOME: &str = "outcome";
    /// The HTTP status, or `timeout`, `connect`, `tls`, `body`, `other` without one.
    pub const CODE: &str = "code";
    /// `unavailable`, or the kind of the store's refusal (`limit`, `constraint`,
    /// `privilege`, `read_only`, `resources`, `other`).
    pub const KIND: &str = "kind";
    /// walhook's version.
    pub const VERSION: &str = "version";
}

/// Describes every metric to the current recorder (help texts as scraped).
pub fn describe() {
    describe_counter!(
        SOURCE_CHANGES_TOTAL,
        "Row changes of watched tables read from the replication stream."
    );
    describe_counter!(EVENTS_TOTAL, "Entity events committed to the store.");
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        "WAL the slot keeps: the server's pg_current_wal_lsn() minus the slot's confirmed_flush_lsn (refreshed every 5 s)."
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        "Now minus the commit time of the last ingested source transaction while ingest has work in hand; 0 when ingest is caught up with the stream."
    );
    describe_gauge!(
        SLOT_ACTIVE,
        "1 when the replication slot is active (some walsender streams it), 0 otherwise (refreshed every 5 s)."
    );
    describe_histogram!(
        INGEST_BATCH_SECONDS,
        "Duration of one ingest store transaction (a group-committed batch), including its wait for the batch before it while two are written at once."
    );
    describe_counter!(
        INGEST_ERRORS_TOTAL,
        "Failed ingest store transactions by kind: unavailable (retried at once when the store is back) or the store's refusal (limit, constraint, privilege, read_only, resources, other; retried with backoff, /readyz not ready meanwhile)."
    );
    describe_counter!(
        CONTEXT_MISSING_TOTAL,
        "Context lookups ([[tables.context]]) whose parent row was not found at ingest (deleted, or not yet visible); the event carries null under that context name."
    );
    describe_counter!(
        BACKFILL_ROWS_TOTAL,
        "Rows a backfill read, counted once their chunk is stored: as snapshot events, or dropped because the stream carried a newer state of the row."
    );
    describe_gauge!(
        BACKFILL_RUNNING,
        "1 while this process runs a backfill (walhook backfill, snapshot = true), else 0."
    );
    describe_counter!(
        DISPATCHER_RESTARTS_TOTAL,
        "Dispatchers started again after a panic or an early end (a bug: report it); the subscription resumes from its stored cursor."
    );
    describe_counter!(
        DELIVERIES_TOTAL,
        "Delivery attempts by outcome: delivered, retry, dead, disabled (410 Gone)."
    );
    describe_histogram!(
        DELIVERY_ATTEMPT_SECONDS,
        "Duration of one delivery attempt, request to end of the response body."
    );
    describe_histogram!(
        DELIVERY_LATENCY_SECONDS,
        "Source commit time to the 2xx answer of the delivery."
    );
    describe_gauge!(
        QUEUE_PENDING,
        "Deliveries neither delivered nor dead: new events past the cursor plus pending retries (refreshed every 10 s)."
    );
    describe_gauge!(
        QUEUE_DEAD,
        "Dead deliveries kept in the store (replayable) (refreshed every 10 s)."
    );
    describe_gauge!(
        QUEUE_OLDEST_PENDING_SECONDS,
        "Age of the oldest pending delivery since it became due, 0 when none (refreshed every 10 s)."
    );
    describe_counter!(
        HTTP_RESPONSES_TOTAL,
        "Receiver answers by HTTP status code, or timeout, connect, tls, body, other when there was none."
    );
    describe_gauge!(
        SUBSCRIPTION_ENABLED,
        "1 while a subscription is dispatched, 0 when disabled (410 Gone) or paused (refreshed every 10 s)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label is walhook's version."
    );
}

/// `start * factor^i` for `i` in `0..length`.
fn exponential_buckets(start: f64, factor: f64, length: u16) -> Vec<f64> {
    (0..length)
        .map(|i| start * factor.powf(f64::from(i)))
        .collect()
}

/// The upper bounds of each histogram's buckets: 1 ms to ~65 s for request and
/// transaction durations; 5 ms to ~62 days for commit-to-delivery latency (retries
/// included).
pub fn histogram_buckets() -> [(&'static str, Vec<f64>); 3] {
    let durations = exponential_buckets(0.001, 2.0, 17);
    [
        (INGEST_BATCH_SECONDS, durations.clone()),
        (DELIVERY_ATTEMPT_SECONDS, durations),
        (
            DELIVERY_LATENCY_SECONDS,
            exponential_buckets(0.005, 4.0, 16),
        ),
    ]
}

/// Replication lag in seconds as ingest sees it; read when `/metrics` is scraped, so it
/// grows while ingest is stuck.
static LAG: LagClock = LagClock {
    idle: AtomicBool::new(true),
    reference_micros: AtomicI64::new(0),
};

struct LagClock {
    /// Ingest has nothing in hand (caught up).
    idle: AtomicBool,
    /// Commit time (unix microseconds) of the last ingested source transaction, or of
    /// the moment ingest last got work after being idle.
    reference_micros: AtomicI64,
}

/// Ingest has nothing in hand (`true`) or just got work after being idle.
pub fn ingest_idle(idle: bool) {
    let was = LAG.idle.swap(idle, Ordering::Relaxed);
    if was && !idle {
        // Work that arrived now is at most as old as now, as far as we know.
        LAG.reference_micros
            .store(unix_micros(SystemTime::now()), Ordering::Relaxed);
    }
}

/// Ingest committed a batch whose last source transaction committed at
/// `commit_time_unix_micros`.
pub fn ingest_caught_up_to(commit_time_unix_micros: i64) {
    LAG.reference_micros
        .store(commit_time_unix_micros, Ordering::Relaxed);
}

/// Sets [`REPLICATION_LAG_SECONDS`]: now minus the last ingested commit time while
/// ingest has work in hand, 0 when it is caught up. Called before each scrape.
pub fn update_replication_lag_seconds() {
    let lag = if LAG.idle.load(Ordering::Relaxed) {
        0.0
    } else {
        let since = unix_micros(SystemTime::now()) - LAG.reference_micros.load(Ordering::Relaxed);
        (since.max(0) as f64) / 1e6
    };
    metrics::gauge!(REPLICATION_LAG_SECONDS).set(lag);
}

fn unix_micros(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
