//! The [`Envelope`]: an entity event as receivers get it (the `full` payload of
//! DESIGN.md) and as subscription filters see it (`event`).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};

use crate::mapping::{EventDraft, row_to_cel, string, to_cel};
use crate::source::Lsn;
use crate::source::decoder::{Row, TableName};

/// An entity event with its id, revision and source position. Serializes to the
/// payload JSON: `previous` and `changed` are left out when unknown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Envelope {
    /// Event id (`evt_...`), also the `webhook-id` header.
    pub id: String,
    /// Full event name, e.g. `user.updated`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Entity name.
    #[serde(serialize_with = "as_str")]
    pub entity: Arc<str>,
    /// Entity id.
    pub entity_id: String,
    /// Per-entity revision, from 1, gap-free.
    pub revision: i64,
    /// Source commit time, printed with microseconds: `2026-11-25T19:15:30.123456Z`.
    #[serde(serialize_with = "timestamp")]
    pub occurred_at: DateTime<Utc>,
    /// Row values (redacted).
    pub data: Row,
    /// Old row values, on updates under REPLICA IDENTITY FULL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<Row>,
    /// Changed columns, on updates under REPLICA IDENTITY FULL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changed: Option<Vec<String>>,
    /// Parent rows read at ingest (`[[tables.context]]`), by context name; `null` for
    /// a parent that was not found. Left out when the table has no context.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Row>,
    /// Where the change came from.
    pub source: EventSource,
}

/// The `source` object of an envelope.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventSource {
    /// `schema.name`.
    #[serde(serialize_with = "display")]
    pub table: Arc<TableName>,
    /// LSN of the source transaction's commit, `0/16B3748`.
    #[serde(serialize_with = "display")]
    pub lsn: Lsn,
    /// Source transaction id.
    pub xid: u32,
}

impl Envelope {
    /// Completes a mapping draft with what the store assigns.
    pub fn from_draft(
        draft: EventDraft,
        id: String,
        revision: i64,
        occurred_at: DateTime<Utc>,
        lsn: Lsn,
        xid: u32,
    ) -> Envelope {
        Envelope {
            id,
            event_type: draft.event_type,
            entity: draft.entity,
            entity_id: draft.entity_id,
            revision,
            occurred_at,
            data: draft.data,
            previous: draft.previous,
            changed: draft.changed,
            context: None,
            source: EventSource {
                table: draft.table,
                lsn,
                xid,
            },
        }
    }

    /// The envelope as the CEL `event` variable: the same shape as its JSON, built
    /// directly (no JSON round trip).
    pub(crate) fn to_cel(&self) -> cel::Value {
        use cel::objects::{Key, Map};
        let key = |k: &str| Key::String(Arc::new(k.to_owned()));
        let mut m = std::collections::HashMap::with_capacity(10);
        m.insert(key("id"), string(&self.id));
        m.insert(key("type"), string(&self.event_type));
        m.insert(key("entity"), string(&self.entity));
        m.insert(key("entity_id"), string(&self.entity_id));
        m.insert(key("revision"), cel::Value::Int(self.revision));
        m.insert(key("occurred_at"), string(&format_time(&self.occurred_at)));
        m.insert(
            key("data"),
            row_to_cel(&self.data, &crate::config::Columns::All),
        );
        if let Some(previous) = &self.previous {
            m.insert(
                key("previous"),
                row_to_cel(previous, &crate::config::Columns::All),
            );
        }
        if let Some(changed) = &self.changed {
            let list = changed.iter().map(|c| string(c)).collect();
            m.insert(key("changed"), cel::Value::List(Arc::new(list)));
        }
        if let Some(context) = &self.context {
            m.insert(
                key("context"),
                row_to_cel(context, &crate::config::Columns::All),
            );
        }
        let mut source = std::collections::HashMap::with_capacity(3);
        source.insert(key("table"), string(&self.source.table.to_string()));
        source.insert(key("lsn"), string(&self.source.lsn.to_string()));
        source.insert(key("xid"), to_cel(&self.source.xid.into()));
        m.insert(
            key("source"),
            cel::Value::Map(Map {
                map: Arc::new(source),
            }),
        );
        cel::Value::Map(Map { map: Arc::new(m) })
    }
}

/// RFC 3339 in UTC with microseconds: `2026-11-26T05:00:00.123456Z`.
pub(crate) fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn timestamp<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

fn as_str<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn display<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::{Value, json};

    /// The payload example of DESIGN.md.
    pub(crate) fn example() -> Envelope {
        let row = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        Envelope {
            id: "evt_01JDX5".into(),
            event_type: "user.updated".into(),
            entity: Arc::from("user"),
            entity_id: "42".into(),
            revision: 7,
            occurred_at: Utc.timestamp_opt(1_795_634_130, 123_456_000).unwrap(),
            data: row(json!({"id": 42, "email": "a@example.com", "status": "active"})),
            previous: Some(row(
                json!({"id": 42, "email": "old@example.com", "status": "active"}),
            )),
            changed: Some(vec!["email".into()]),
            context: None,
            source: EventSource {
                table: Arc::new(TableName {
                    schema: "public".into(),
                    name: "users".into(),
                }),
                lsn: "0/16B3748".parse().unwrap(),
                xid: 7345,
            },
        }
    }

    #[test]
    fn serializes_as_the_design_payload() {
        let text = serde_json::to_string(&example()).unwrap();
        assert_eq!(
            text,
            r#"{"id":"evt_01JDX5","type":"user.updated","entity":"user","entity_id":"42","revision":7,"occurred_at":"2026-11-25T19:15:30.123456Z","data":{"id":42,"email":"a@example.com","status":"active"},"previous":{"id":42,"email":"old@example.com","status":"active"},"changed":["email"],"source":{"table":"public.users","lsn":"0/16B3748","xid":7345}}"#
        );
    }

    /// The example with a context: an organisation found, a team missing.
    pub(crate) fn with_context() -> Envelope {
        let Value::Object(context) = json!({
            "organisation": {"id": 7, "name": "Acme & <Co>", "status": "active"},
            "team": null,
        }) else {
            unreachable!()
        };
        Envelope {
            context: Some(context),
            ..example()
        }
    }

    #[test]
    fn context_comes_before_source_and_only_when_the_table_has_one() {
        let text = serde_json::to_string(&with_context()).unwrap();
        assert!(
            text.ends_with(r#""changed":["email"],"context":{"organisation":{"id":7,"name":"Acme & <Co>","status":"active"},"team":null},"source":{"table":"public.users","lsn":"0/16B3748","xid":7345}}"#),
            "{text}"
        );
        let plain = serde_json::to_value(example()).unwrap();
        assert!(plain.get("context").is_none());
    }

    #[test]
    fn unknown_previous_and_changed_are_left_out() {
        let mut e = example();
        e.previous = None;
        e.changed = None;
        let v = serde_json::to_value(&e).unwrap();
        assert!(v.get("previous").is_none() && v.get("changed").is_none());
    }

    #[test]
    fn cel_value_matches_the_json() {
        for e in [
            example(),
            Envelope {
                previous: None,
                changed: None,
                ..example()
            },
            with_context(),
        ] {
            let json = serde_json::to_value(&e).unwrap();
            assert_eq!(e.to_cel(), to_cel(&json));
        }
    }
}
