//! Raw serde structs: the file's shape, nothing checked beyond types and key names.
//!
//! Every field is optional here so that one missing key does not hide other problems;
//! `validate` reports required keys and fills defaults.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

use super::types::{AggregateOp, Format, LogFormat, Ordering, Payload, Signature};

/// Sections and keys that env overrides (`WALHOOK_SECTION__KEY`) may set. Arrays of
/// tables (`tables`, `subscriptions`) are configured in the file only.
pub(crate) const OVERRIDABLE: &[(&str, &[&str])] = &[
    ("source", &["url", "slot", "publication"]),
    (
        "store",
        &[
            "url",
            "schema",
            "retention",
            "dead_retention",
            "paused_retention",
        ],
    ),
    ("server", &["listen"]),
    ("log", &["format", "level"]),
    ("daemon", &["shutdown_grace", "ingest_buffer"]),
    ("delivery", &["proxy"]),
];

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub source: RawSource,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub delivery: RawDelivery,
    #[serde(default)]
    pub tables: Vec<RawTable>,
    #[serde(default)]
    pub subscriptions: Vec<RawSubscription>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSource {
    pub url: Option<String>,
    pub slot: Option<String>,
    pub publication: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub url: Option<String>,
    pub schema: Option<String>,
    pub retention: Option<String>,
    pub dead_retention: Option<String>,
    pub paused_retention: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLog {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDaemon {
    pub shutdown_grace: Option<String>,
    pub ingest_buffer: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDelivery {
    /// Proxy for every webhook request, `http://[user:password@]host:port`. Without it
    /// walhook connects directly and ignores HTTP_PROXY, HTTPS_PROXY and ALL_PROXY.
    pub proxy: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTable {
    pub table: Option<String>,
    pub entity: Option<String>,
    pub id: Option<OneOrMany>,
    pub include_columns: Option<Vec<String>>,
    pub exclude_columns: Option<Vec<String>>,
    pub update_columns: Option<Vec<String>>,
    pub events: Option<RawEvents>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    pub snapshot: Option<bool>,
    #[serde(default)]
    pub context: Vec<RawContext>,
    #[serde(default)]
    pub aggregate: Vec<RawAggregate>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvents {
    pub insert: Option<EventSuffix>,
    pub update: Option<EventSuffix>,
    pub delete: Option<EventSuffix>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub event: Option<String>,
    pub when: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawContext {
    pub name: Option<String>,
    pub table: Option<String>,
    pub key: Option<OneOrMany>,
    pub columns: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAggregate {
    pub event: Option<String>,
    pub op: Option<AggregateOp>,
    pub min_rows: Option<u64>,
    pub max_rows: Option<u64>,
    pub replace: Option<bool>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSubscription {
    pub name: Option<String>,
    pub description: Option<String>,
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub filter: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub secret: Option<OneOrMany>,
    /// Files each holding one key, in the form `secret` takes (instead of `secret`).
    pub secret_file: Option<OneOrMany>,
    pub payload: Option<Payload>,
    pub fields: Option<BTreeMap<String, String>>,
    pub timeout: Option<String>,
    pub max_in_flight: Option<u64>,
    pub ordering: Option<Ordering>,
    pub tls_insecure: Option<bool>,
    pub signature: Option<Signature>,
    pub format: Option<Format>,
    pub batch_size: Option<u64>,
    pub cloudevents: Option<RawCloudEvents>,
    pub set: Option<RawSet>,
    pub slack: Option<RawSlack>,
    pub retry: Option<RawRetry>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub backoff: Option<Vec<String>>,
    pub max_age: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCloudEvents {
    /// The `source` attribute (a URI-reference); default `walhook://<source.slot>`.
    pub source: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSet {
    /// The `iss` claim of every token (required).
    pub issuer: Option<String>,
    /// The `aud` claim of every token (required).
    pub audience: Option<String>,
    /// Prefix of the `events` claim's key, followed by the event type; default
    /// `urn:walhook:event:`.
    pub event_uri_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSlack {
    /// The message template: text and `{envelope.path}` placeholders (`{{`, `}}` for
    /// literal braces), e.g. "{type} {entity_id} is now {data.status}" (required).
    pub text: Option<String>,
    /// Optional Block Kit sections: each a template like `text`, sent as one mrkdwn
    /// section block (`text` is then the notification fallback); at most 50.
    pub blocks: Option<Vec<String>>,
}

/// A string or a list of strings (`secret`, `id`, `context.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<OneOrMany, E> {
                Ok(OneOrMany::One(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(OneOrMany::Many(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// `events.insert` etc.: a suffix appended to `{entity}.`, or `false` to disable
/// (`true` keeps the default name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EventSuffix {
    Suffix(String),
    Enabled(bool),
}

impl<'de> Deserialize<'de> for EventSuffix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = EventSuffix;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an event name suffix such as \"role.assigned\", or false")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EventSuffix, E> {
                Ok(EventSuffix::Suffix(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<EventSuffix, E> {
                Ok(EventSuffix::Enabled(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for OneOrMany {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StringOrList".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "anyOf": [
                { "type": "string" },
                { "type": "array", "items": { "type": "string" } }
            ]
        })
    }
}

impl JsonSchema for EventSuffix {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "EventSuffix".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "a suffix appended to \"{entity}.\" (e.g. \"role.assigned\"), false to disable the event, true for the default name",
            "anyOf": [{ "type": "string" }, { "type": "boolean" }]
        })
    }
}
