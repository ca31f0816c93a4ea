//! Validated, ready-to-use config types produced by [`super::validate`].

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::keys::SigningKeys;
use super::secret::{DatabaseUrl, Secret};
use super::template::TextTemplate;

/// The whole validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[source]`: the database whose WAL is tailed.
    pub source: SourceConfig,
    /// `[store]`: where events and deliveries are kept.
    pub store: StoreConfig,
    /// `[server]`: metrics and health endpoints.
    pub server: ServerConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[delivery]`: settings shared by every subscription's HTTP client.
    pub delivery: DeliveryConfig,
    /// `[[tables]]`: watched tables, in file order.
    pub tables: Vec<TableConfig>,
    /// `[[subscriptions]]`: receivers, in file order.
    pub subscriptions: Vec<SubscriptionConfig>,
}

/// `[source]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// Connection URL (replication and SQL); printable only redacted.
    pub url: DatabaseUrl,
    /// Replication slot name (default `walhook`).
    pub slot: String,
    /// Publication name (default `walhook`).
    pub publication: String,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Store database; defaults to the source URL.
    pub url: DatabaseUrl,
    /// Schema of the store tables (default `walhook`).
    pub schema: String,
    /// Delivered events are purged after this (default 7 days).
    pub retention: Duration,
    /// Dead deliveries are purged after this (default 30 days).
    pub dead_retention: Duration,
    /// Backlog of a paused or disabled subscription goes dead after this (default 7 days).
    pub paused_retention: Duration,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Listen address for `/metrics`, `/healthz`, `/readyz` (default `127.0.0.1:7187`).
    pub listen: SocketAddr,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `walhook=debug,info`.
    pub level: String,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[daemon]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// On SIGTERM, in-flight deliveries get at most this long (default 30 s).
    pub shutdown_grace: Duration,
    /// Row data received from the source but not yet stored, in bytes (default 4 MiB):
    /// the replication stream pauses while this much is in flight (G6).
    pub ingest_buffer: u64,
}

/// `[delivery]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// The proxy every webhook request goes through (`http://` or `https://`, with a
    /// host). `None`: direct connections, and the proxy environment variables
    /// (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`) are ignored. May hold a
    /// password, so it is kept secret; [`DeliveryConfig::proxy_redacted`] is printable.
    pub proxy: Option<Secret<url::Url>>,
}

impl DeliveryConfig {
    /// The proxy as `scheme://host:port`, without credentials or path, for logs.
    pub fn proxy_redacted(&self) -> Option<String> {
        self.proxy.as_ref().map(|url| {
            let url = url.expose();
            let host = url.host_str().unwrap_or("");
            match url.port_or_known_default() {
                Some(port) => format!("{}://{host}:{port}", url.scheme()),
                None => format!("{}://{host}", url.scheme()),
            }
        })
    }
}

/// One `[[tables]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TableConfig {
    /// Schema of the table (`public` in `public.users`).
    pub schema: String,
    /// Table name without schema.
    pub name: String,
    /// Entity name; events are `{entity}.created` etc. Defaults to the table name.
    pub entity: String,
    /// Id columns; `None` means the primary key.
    pub id: Option<Vec<String>>,
    /// Which columns appear in `data` / `previous`.
    pub columns: Columns,
    /// When set, `{entity}.updated` is emitted only if one of these columns changed.
    pub update_columns: Option<Vec<String>>,
    /// The table's own event names (full names); `None` disables one.
    pub events: EventNames,
    /// Derived events (`[[tables.rules]]`), in file order.
    pub rules: Vec<Rule>,
    /// `snapshot = true`: backfill the table once, the first time walhook runs with it.
    pub snapshot: bool,
    /// `[[tables.context]]`: parent rows read at ingest.
    pub context: Vec<ContextConfig>,
    /// `[[tables.aggregate]]`: bulk events per source transaction.
    pub aggregates: Vec<AggregateConfig>,
}

impl TableConfig {
    /// `schema.name`, as written in the config.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// Why this table needs `REPLICA IDENTITY FULL`, one reason per entry (empty when
    /// it does not). `walhook check` and `run` refuse the config when the table lacks it.
    pub fn needs_full_identity(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.update_columns.is_some() {
            reasons.push("update_columns compares old and new values".to_string());
        }
        for rule in &self.rules {
            let mut reads = Vec::new();
            if rule.reads_old {
                reads.push("`old`");
            }
            if rule.reads_changed {
                reads.push("`changed`");
            }
            if !reads.is_empty() {
                reasons.push(format!(
                    "rule for {} reads {}",
                    rule.event,
                    reads.join(" and ")
                ));
            }
        }
        reasons
    }
}

/// Column filter of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Columns {
    /// Every column.
    All,
    /// Only these columns (`include_columns`).
    Include(Vec<String>),
    /// Every column but these (`exclude_columns`); excluded columns never appear anywhere.
    Exclude(Vec<String>),
}

impl Columns {
    /// Whether `column` may appear in payloads.
    pub fn allows(&self, column: &str) -> bool {
        match self {
            Columns::All => true,
            Columns::Include(cols) => cols.iter().any(|c| c == column),
            Columns::Exclude(cols) => !cols.iter().any(|c| c == column),
        }
    }
}

/// Full event names of a table's own events; `None` = disabled (`update = false`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNames {
    /// E.g. `user.created` or `user.role.assigned`.
    pub insert: Option<String>,
    /// E.g. `user.updated`.
    pub update: Option<String>,
    /// E.g. `user.deleted`.
    pub delete: Option<String>,
}

/// A compiled CEL program, shareable across threads. Two are equal when their
/// sources are (how a reload tells a changed rule or filter).
#[derive(Clone)]
pub struct CelProgram {
    source: Arc<str>,
    program: Arc<cel::Program>,
}

impl CelProgram {
    pub(crate) fn new(source: &str, program: cel::Program) -> CelProgram {
        CelProgram {
            source: source.into(),
            program: Arc::new(program),
        }
    }
}

impl PartialEq for CelProgram {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl fmt::Debug for CelProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CelProgram(..)")
    }
}

impl std::ops::Deref for CelProgram {
    type Target = cel::Program;
    fn deref(&self) -> &cel::Program {
        &self.program
    }
}

/// A `[[tables.rules]]` entry: emit `event` when `when` is true.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Full event name, e.g. `user.suspended`.
    pub event: String,
    /// The CEL source, for messages.
    pub when_source: String,
    /// Compiled once at load. Variables: `new`, `old`, `op`, `table`, `changed`.
    pub program: CelProgram,
    /// The expression references `old` (needs REPLICA IDENTITY FULL).
    pub reads_old: bool,
    /// The expression references `changed` (needs REPLICA IDENTITY FULL).
    pub reads_changed: bool,
}

/// A `[[tables.context]]` entry: a parent row read from the source database when the
/// event is ingested, shown under `context.<name>`.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextConfig {
    /// Name under which the looked-up row appears.
    pub name: String,
    /// Schema-qualified table to look up.
    pub table: String,
    /// Column(s) of this table holding the parent's id (its `id` when it is a watched
    /// table that sets one, else its primary key), in id order.
    pub key: Vec<String>,
    /// Columns to take; `None` = all.
    pub columns: Option<Vec<String>>,
}

/// A `[[tables.aggregate]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateConfig {
    /// Full event name.
    pub event: String,
    /// Which row operation is aggregated.
    pub op: AggregateOp,
    /// Fewest rows in one transaction that trigger the aggregate (default
    /// [`DEFAULT_MIN_ROWS`]).
    pub min_rows: u64,
    /// Most rows folded into one aggregate event (default [`DEFAULT_MAX_ROWS`], at
    /// most [`MAX_MAX_ROWS`]); always `Some` after validation.
    pub max_rows: Option<u64>,
    /// Whether the aggregate replaces the per-row events.
    pub replace: bool,
}

/// Default `aggregate.min_rows`.
pub const DEFAULT_MIN_ROWS: u64 = 2;
/// Default `aggregate.max_rows`.
pub const DEFAULT_MAX_ROWS: u64 = 1000;
/// Largest `aggregate.max_rows`: the rows of one bulk event are held in memory.
pub const MAX_MAX_ROWS: u64 = 100_000;

/// `aggregate.op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AggregateOp {
    /// Inserted rows.
    Insert,
    /// Updated rows.
    Update,
    /// Deleted rows.
    Delete,
}

impl AggregateOp {
    /// `"insert"`, `"update"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateOp::Insert => "insert",
            AggregateOp::Update => "update",
            AggregateOp::Delete => "delete",
        }
    }
}

/// A subscription name: unique, `[a-z0-9_-]+`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubscriptionName(pub(crate) String);

impl SubscriptionName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SubscriptionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Compiled `events` patterns of a subscription; `*` matches any run of characters,
/// dots included.
#[derive(Clone)]
pub struct EventPatterns {
    pub(crate) patterns: Vec<String>,
    pub(crate) set: globset::GlobSet,
}

impl EventPatterns {
    /// Whether an event name matches any pattern.
    pub fn matches(&self, event: &str) -> bool {
        self.set.is_match(event)
    }

    /// The patterns as written.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl PartialEq for EventPatterns {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl fmt::Debug for EventPatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EventPatterns")
            .field(&self.patterns)
            .finish()
    }
}

/// A compiled CEL filter over the envelope (`event`).
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// The CEL source.
    pub source: String,
    /// Compiled once at load.
    pub program: CelProgram,
}

/// `payload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// The whole envelope.
    #[default]
    Full,
    /// Without `data`, `previous` and `changed`.
    Thin,
}

/// `ordering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Revision n+1 of an entity waits for revision n (default).
    #[default]
    Entity,
    /// No ordering.
    None,
}

/// `signature`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Signature {
    /// Standard Webhooks HMAC-SHA256.
    #[default]
    V1,
    /// Standard Webhooks asymmetric (ed25519).
    V1a,
}

/// `format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The JSON envelope (or `fields`).
    #[default]
    Json,
    /// A Security Event Token.
    Set,
    /// A CloudEvents JSON event.
    Cloudevents,
    /// A Slack message.
    Slack,
}

/// One `fields` entry: output key -> envelope path such as `data.email`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMapping {
    /// Key in the output body.
    pub output: String,
    /// Path into the envelope, split on dots: `["data", "email"]`.
    pub path: Vec<String>,
}

/// `cloudevents = { source }`, with its default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEventsConfig {
    /// The `source` attribute of every event: `cloudevents.source`, by default
    /// `walhook://<source.slot>`.
    pub source: String,
}

/// `set = { issuer, audience, event_uri_prefix }`, with its default filled in; only
/// with `format = "set"`, which always has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetConfig {
    /// The `iss` claim of every token. Non-empty.
    pub issuer: String,
    /// The `aud` claim of every token. Non-empty.
    pub audience: String,
    /// Prefix of the event URI, the key of the `events` claim: the URI is the prefix
    /// followed by the event type. Default [`DEFAULT_EVENT_URI_PREFIX`].
    pub event_uri_prefix: String,
}

/// The default `set.event_uri_prefix`: `urn:walhook:event:user.created`.
pub const DEFAULT_EVENT_URI_PREFIX: &str = "urn:walhook:event:";

/// `slack = { text, blocks }`; only with `format = "slack"`, which always has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackConfig {
    /// The message template; every placeholder names an envelope path that can exist.
    pub text: TextTemplate,
    /// The texts of the message's mrkdwn section blocks, checked as `text` is; empty
    /// when the message has no `blocks`.
    pub blocks: Vec<TextTemplate>,
}

/// `[subscriptions.retry]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delays between attempts; the last one repeats. Never empty.
    pub backoff: Vec<Duration>,
    /// After this age a delivery is dead.
    pub max_age: Duration,
}

/// One `[[subscriptions]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionConfig {
    /// Unique name.
    pub name: SubscriptionName,
    /// Free text.
    pub description: Option<String>,
    /// Receiver URL (http or https). Kept secret: receiver URLs often embed tokens.
    pub url: Secret<url::Url>,
    /// Event name patterns.
    pub events: EventPatterns,
    /// Optional CEL filter over the envelope.
    pub filter: Option<Filter>,
    /// Extra request headers; values may hold tokens, so they are secret.
    pub headers: BTreeMap<String, Secret<String>>,
    /// Signing keys (`secret` or `secret_file`), of the kind `signature` names.
    pub keys: SigningKeys,
    /// Full or thin envelope.
    pub payload: Payload,
    /// Custom body built from envelope paths.
    pub fields: Option<Vec<FieldMapping>>,
    /// Per-attempt timeout (default 10 s).
    pub timeout: Duration,
    /// Concurrent requests to this receiver (default 16).
    pub max_in_flight: u32,
    /// Ordering guarantee.
    pub ordering: Ordering,
    /// Skip certificate checks (explicit, logged at start).
    pub tls_insecure: bool,
    /// Signature scheme; `keys` holds keys of this scheme.
    pub signature: Signature,
    /// Body format.
    pub format: Format,
    /// CloudEvents attributes; `Some` exactly when `format = "cloudevents"`.
    pub cloudevents: Option<CloudEventsConfig>,
    /// Events per POST (1: one event per POST, its body the event's; more: a JSON
    /// array, or a CloudEvents batch).
    pub batch_size: u32,
    /// Security Event Token claims; `Some` exactly when `format = "set"` (which also
    /// means `keys` is [`SigningKeys::V1a`]: the newest key signs the tokens).
    pub set: Option<SetConfig>,
    /// Slack message template; `Some` exactly when `format = "slack"`.
    pub slack: Option<SlackConfig>,
    /// Retry schedule.
    pub retry: RetryPolicy,
}

impl SubscriptionConfig {
    /// `scheme://host[:port]` of the receiver, safe to log.
    pub fn url_redacted(&self) -> String {
        let url = self.url.expose();
        match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
            (Some(host), None) => format!("{}://{host}", url.scheme()),
            _ => format!("{}://", url.scheme()),
        }
    }
}

impl Config {
    /// Keys present in this config whose behaviour is accepted and validated but not
    /// implemented yet. Every key of DESIGN.md's syntax is active now, so none; kept so
    /// that a key can again be accepted before it is built, with a warning.
    pub fn inactive_keys(&self) -> Vec<String> {
        Vec::new()
    }

    /// The subscription with this name.
    pub fn subscription(&self, name: &str) -> Option<&SubscriptionConfig> {
        self.subscriptions.iter().find(|s| s.name.as_str() == name)
    }
}

// The daemon shares the config across tasks.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Config>();
};
