//! The bytes a subscription is sent for one event: the full or thin envelope, a
//! custom object built from envelope paths (`fields`), a CloudEvent, a Security
//! Event Token ([`super::set`]) or a Slack message ([`super::slack`]); and their
//! content type. With `batch_size > 1`, the body is a JSON array of those bodies (the
//! CloudEvents batch mode for CloudEvents).

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::DeliveryError;
use super::{set, slack};
use crate::config::{
    CloudEventsConfig, FieldMapping, Format, Payload, SigningKeys, SubscriptionConfig,
};
use crate::routing::Envelope;
use crate::routing::envelope::format_time;
use crate::store::deliveries::DueEvent;

/// Envelope keys left out of a `payload = "thin"` body.
pub(super) const THIN_OMITS: [&str; 4] = ["data", "previous", "changed", "context"];

/// Envelope keys that become CloudEvents attributes (`id`, `type`, `subject`, `time`)
/// and so are not repeated in the event's `data`.
const CLOUDEVENTS_ATTRIBUTES: [&str; 4] = ["id", "type", "entity_id", "occurred_at"];

/// The `content-type` of `format`'s bodies.
pub fn content_type(format: Format) -> &'static str {
    match format {
        Format::Cloudevents => "application/cloudevents+json",
        Format::Set => set::CONTENT_TYPE,
        Format::Json | Format::Slack => "application/json",
    }
}

/// The `content-type` of `format`'s batch bodies (`batch_size > 1`): a JSON array, in
/// CloudEvents batch mode with `format = "cloudevents"`.
pub fn batch_content_type(format: Format) -> &'static str {
    match format {
        Format::Cloudevents => "application/cloudevents-batch+json",
        _ => "application/json",
    }
}

/// A batch body: the JSON array of `bodies` (each as [`render`] gives it), in order.
pub fn batch(bodies: &[Bytes]) -> Bytes {
    let len = bodies.iter().map(|b| b.len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(len);
    out.push(b'[');
    for (i, body) in bodies.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(body);
    }
    out.push(b']');
    Bytes::from(out)
}

/// The request body of `envelope` for `sub` (its `format`, `payload` and `fields`).
///
/// Deterministic: the same envelope and subscription give the same bytes, so every
/// retry signs and sends the same body (a SET too: see [`super::set`]).
pub fn render(envelope: &Envelope, sub: &SubscriptionConfig) -> Result<Bytes, DeliveryError> {
    if let Some(options) = &sub.set {
        // Validation gives every `format = "set"` subscription at least one v1a key.
        let SigningKeys::V1a(keys) = &sub.keys else {
            return Err(DeliveryError::NoSetKey);
        };
        let key = keys.first().ok_or(DeliveryError::NoSetKey)?;
        let token = set::token(envelope, sub.payload, options, key).map_err(DeliveryError::Body)?;
        return Ok(Bytes::from(token));
    }
    if let Some(options) = &sub.slack {
        return slack::message(envelope, options)
            .map(Bytes::from)
            .map_err(DeliveryError::Body);
    }
    if let Some(ce) = &sub.cloudevents {
        let envelope = serde_json::to_value(envelope).map_err(DeliveryError::Body)?;
        let event = cloudevent(envelope, sub.payload, ce);
        return serde_json::to_vec(&event)
            .map(Bytes::from)
            .map_err(DeliveryError::Body);
    }
    if sub.fields.is_none() && sub.payload == Payload::Full {
        // Same bytes as going through a `Value`, one serialisation instead of two.
        return serde_json::to_vec(envelope)
            .map(Bytes::from)
            .map_err(DeliveryError::Body);
    }
    let full = serde_json::to_value(envelope).map_err(DeliveryError::Body)?;
    render_value(&full, sub.payload, sub.fields.as_deref()).map_err(DeliveryError::Body)
}

/// Whether `sub`'s bodies are the JSON envelope (full or thin), which
/// [`render_stored`] writes from a stored event's text without parsing its values.
pub fn renders_stored(sub: &SubscriptionConfig) -> bool {
    sub.set.is_none() && sub.slack.is_none() && sub.cloudevents.is_none() && sub.fields.is_none()
}

/// The JSON envelope of a stored event, its values copied as stored: the same bytes as
/// [`render`] gives for the parsed envelope (the store keeps the compact JSON that
/// serialising them gives), without parsing and serialising every row value again.
pub fn render_stored(e: &DueEvent, payload: Payload) -> Result<Bytes, DeliveryError> {
    let thin = payload == Payload::Thin;
    let body = StoredEnvelope {
        id: &e.id,
        event_type: &e.event_type,
        entity: &e.entity,
        entity_id: &e.entity_id,
        revision: e.revision,
        occurred_at: format_time(&DateTime::<Utc>::from(e.occurred_at)),
        data: (!thin).then_some(&*e.data),
        previous: e.previous.as_deref().filter(|_| !thin),
        changed: e.changed.as_deref().filter(|_| !thin),
        context: e.context.as_deref().filter(|_| !thin),
        // Stored as `schema.name` and as PostgreSQL prints an LSN (`16/B374D848`):
        // the text the envelope's `Display`s give.
        source: StoredSource {
            table: &e.table,
            lsn: &e.lsn,
            xid: e.xid as u32,
        },
    };
    // Sized for the whole envelope: growing from serde_json's 128 bytes took three
    // copies of a typical body.
    let values = [body.data, body.previous, body.context]
        .iter()
        .flatten()
        .map(|v| v.get().len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(values + ENVELOPE_ROOM);
    serde_json::to_writer(&mut out, &body).map_err(DeliveryError::Body)?;
    Ok(Bytes::from(out))
}

/// Room in a body for the envelope around its row values: the other fields of a
/// typical event fit.
const ENVELOPE_ROOM: usize = 384;

/// [`Envelope`]'s JSON, its values borrowed from a stored event as text.
#[derive(Serialize)]
struct StoredEnvelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    entity: &'a str,
    entity_id: &'a str,
    revision: i64,
    occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a RawValue>,
    source: StoredSource<'a>,
}

#[derive(Serialize)]
struct StoredSource<'a> {
    table: &'a str,
    lsn: &'a str,
    xid: u32,
}

/// Like [`render`], from the envelope already as JSON (the `full` payload, e.g. as
/// stored). With `fields`, `payload` is ignored: the body is an object whose keys are
/// the outputs, in the given order, and whose values are the envelope's values at the
/// paths, types kept; a path the envelope lacks (an unknown column, no `previous`)
/// leaves its key out. A path part indexes an array when it is a number (`changed.0`).
pub fn render_value(
    full: &Value,
    payload: Payload,
    fields: Option<&[FieldMapping]>,
) -> Result<Bytes, serde_json::Error> {
    let body = match (fields, payload) {
        (Some(fields), _) => Value::Object(pick(full, fields)),
        (None, Payload::Full) => return serde_json::to_vec(full).map(Bytes::from),
        (None, Payload::Thin) => match full {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| !THIN_OMITS.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            other => other.clone(),
        },
    };
    serde_json::to_vec(&body).map(Bytes::from)
}

/// A CloudEvents 1.0 event in structured JSON mode: `specversion` "1.0", `id` (the
/// event id), `source` (the subscription's), `type` (the event type), `subject` (the
/// entity id), `time` (`occurred_at`), `datacontenttype` "application/json", and
/// `data`: the envelope without the four keys that became attributes, i.e. `entity`,
/// `revision`, `data`, `previous` and `changed` (when known, and not with `payload =
/// "thin"`), and `source` (table, LSN, xid), in the envelope's order.
fn cloudevent(full: Value, payload: Payload, ce: &CloudEventsConfig) -> Value {
    let Value::Object(mut envelope) = full else {
        return full;
    };
    let mut take = |key: &str| envelope.remove(key).unwrap_or(Value::Null);
    let (id, event_type, subject, time) = (
        take("id"),
        take("type"),
        take("entity_id"),
        take("occurred_at"),
    );
    debug_assert!(
        CLOUDEVENTS_ATTRIBUTES
            .iter()
            .all(|k| !envelope.contains_key(*k))
    );
    if payload == Payload::Thin {
        envelope.retain(|k, _| !THIN_OMITS.contains(&k.as_str()));
    }
    let mut event = Map::with_capacity(8);
    event.insert("specversion".into(), Value::from("1.0"));
    event.insert("id".into(), id);
    event.insert("source".into(), Value::from(ce.source.as_str()));
    event.insert("type".into(), event_type);
    event.insert("subject".into(), subject);
    event.insert("time".into(), time);
    event.insert("datacontenttype".into(), Value::from("application/json"));
    event.insert("data".into(), Value::Object(envelope));
    Value::Object(event)
}

fn pick(full: &Value, fields: &[FieldMapping]) -> Map<String, Value> {
    let mut out = Map::with_capacity(fields.len());
    for field in fields {
        if let Some(v) = lookup(full, &field.path) {
            out.insert(field.output.clone(), v.clone());
        }
    }
    out
}

/// The value at `path` in `value`: object keys, or array indexes for number parts.
pub(super) fn lookup<'a>(mut value: &'a Value, path: &[String]) -> Option<&'a Value> {
    for part in path {
        value = match value {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::config;
    use serde_json::json;

    use crate::routing::envelope::tests::example;

    /// The body `subscription` (TOML lines after `events`) gives for the example.
    fn body(subscription: &str) -> Value {
        let c = config(&format!(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\n{subscription}"
        ));
        let bytes = render(&example(), &c.subscriptions[0]).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_batch_is_the_array_of_the_bodies_in_order() {
        let c = config(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\nformat = \"cloudevents\"\nbatch_size = 10",
        );
        let sub = &c.subscriptions[0];
        let (mut first, mut second) = (example(), example());
        first.id = "evt_1".into();
        second.id = "evt_2".into();
        let bodies = [render(&first, sub).unwrap(), render(&second, sub).unwrap()];
        let array: Value = serde_json::from_slice(&batch(&bodies)).unwrap();
        let ids: Vec<&str> = array
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["evt_1", "evt_2"]);
        assert_eq!(array[0]["specversion"], "1.0");
        assert_eq!(batch(&bodies[..1]).len(), bodies[0].len() + 2);
        assert_eq!(&batch(&[])[..], b"[]");
        assert_eq!(
            batch_content_type(sub.format),
            "application/cloudevents-batch+json"
        );
        assert_eq!(batch_content_type(Format::Json), "application/json");
    }

    #[test]
    fn full_is_the_envelope_json() {
        let c = config(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\n",
        );
        let bytes = render(&example(), &c.subscriptions[0]).unwrap();
        assert_eq!(bytes, serde_json::to_vec(&example()).unwrap());
    }

    #[test]
    fn thin_leaves_out_data_previous_changed() {
        let v = body("payload = \"thin\"");
        assert_eq!(
            v,
            json!({
                "id": "evt_01JDX5", "type": "user.updated", "entity": "user",
                "entity_id": "42", "revision": 7,
                "occurred_at": "2026-11-25T19:15:30.123456Z",
                "source": {"table": "public.users", "lsn": "0/16B3748", "xid": 7345}
            })
        );
    }

    /// The body `subscription` gives for an event with context.
    fn body_with_context(subscription: &str) -> Value {
        let c = config(&format!(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\n{subscription}"
        ));
        let e = crate::routing::envelope::tests::with_context();
        serde_json::from_slice(&render(&e, &c.subscriptions[0]).unwrap()).unwrap()
    }

    #[test]
    fn context_is_in_full_bodies_reachable_by_fields_and_left_out_of_thin_ones() {
        let full = body_with_context("");
        assert_eq!(full["context"]["organisation"]["name"], "Acme & <Co>");
        assert!(full["context"]["team"].is_null());
        let thin = body_with_context("payload = \"thin\"");
        assert!(thin.get("context").is_none(), "{thin}");
        let ce = body_with_context(
            "format = \"cloudevents\"\ncloudevents = { source = \"/x\" }\npayload = \"thin\"",
        );
        assert!(ce["data"].get("context").is_none(), "{ce}");
        let picked = body_with_context(
            r#"fields = { org = "context.organisation.name", team = "context.team", gone = "context.team.name" }"#,
        );
        assert_eq!(picked, json!({"org": "Acme & <Co>", "team": null}));
    }

    #[test]
    fn fields_api_resource_shape() {
        let v = body(
            r#"fields = { ApiResource = "entity_id", UpdateTimestamp = "occurred_at", ResourcePayload = "data", Revision = "revision" }"#,
        );
        assert_eq!(
            v,
            json!({
                "ApiResource": "42",
                "UpdateTimestamp": "2026-11-25T19:15:30.123456Z",
                "ResourcePayload": {"id": 42, "email": "a@example.com", "status": "active"},
                "Revision": 7
            })
        );
        assert!(v["Revision"].is_i64(), "a number stays a number");
    }

    #[test]
    fn fields_entity_type_shape() {
        let v = body(
            r#"fields = { id = "entity_id", entityType = "entity", eventType = "type", timestamp = "occurred_at" }"#,
        );
        assert_eq!(
            v,
            json!({
                "id": "42", "entityType": "user", "eventType": "user.updated",
                "timestamp": "2026-11-25T19:15:30.123456Z"
            })
        );
    }

    #[test]
    fn fields_nested_paths_and_missing_keys() {
        let v = body(
            r#"fields = { email = "data.email", table = "source.table", xid = "source.xid", nope = "data.missing", before = "previous.email" }"#,
        );
        assert_eq!(
            v,
            json!({"email": "a@example.com", "table": "public.users", "xid": 7345, "before": "old@example.com"})
        );
        // Without `previous` the key is left out, never null.
        let mut e = serde_json::to_value(example()).unwrap();
        e.as_object_mut().unwrap().remove("previous");
        let fields = [FieldMapping {
            output: "before".into(),
            path: vec!["previous".into(), "email".into()],
        }];
        let out = render_value(&e, Payload::Full, Some(&fields)).unwrap();
        assert_eq!(&out[..], b"{}");
    }

    #[test]
    fn fields_keep_their_order() {
        let fields: Vec<FieldMapping> = ["revision", "id", "entity"]
            .iter()
            .map(|p| FieldMapping {
                output: format!("k_{p}"),
                path: vec![p.to_string()],
            })
            .collect();
        let full = serde_json::to_value(example()).unwrap();
        let out = render_value(&full, Payload::Full, Some(&fields)).unwrap();
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"k_revision":7,"k_id":"evt_01JDX5","k_entity":"user"}"#
        );
    }

    #[test]
    fn cloudevents_structured_mode() {
        let v = body("format = \"cloudevents\"");
        assert_eq!(
            v,
            json!({
                "specversion": "1.0",
                "id": "evt_01JDX5",
                "source": "walhook://walhook",
                "type": "user.updated",
                "subject": "42",
                "time": "2026-11-25T19:15:30.123456Z",
                "datacontenttype": "application/json",
                "data": {
                    "entity": "user",
                    "revision": 7,
                    "data": {"id": 42, "email": "a@example.com", "status": "active"},
                    "previous": {"id": 42, "email": "old@example.com", "status": "active"},
                    "changed": ["email"],
                    "source": {"table": "public.users", "lsn": "0/16B3748", "xid": 7345}
                }
            })
        );
        // Attributes first, in this order, then data.
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "specversion",
                "id",
                "source",
                "type",
                "subject",
                "time",
                "datacontenttype",
                "data"
            ]
        );
    }

    #[test]
    fn cloudevents_source_and_thin_payload() {
        let v = body(
            "format = \"cloudevents\"\npayload = \"thin\"\ncloudevents = { source = \"https://app.example.com/db\" }",
        );
        assert_eq!(v["source"], "https://app.example.com/db");
        assert_eq!(
            v["data"],
            json!({
                "entity": "user", "revision": 7,
                "source": {"table": "public.users", "lsn": "0/16B3748", "xid": 7345}
            })
        );
        let c = config(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\nformat = \"cloudevents\"\n",
        );
        let sub = &c.subscriptions[0];
        assert_eq!(content_type(sub.format), "application/cloudevents+json");
        // The same envelope gives the same bytes: retries sign and send the same body.
        assert_eq!(
            render(&example(), sub).unwrap(),
            render(&example(), sub).unwrap()
        );
        assert_eq!(content_type(Format::Json), "application/json");
    }

    #[test]
    fn set_is_a_token_signed_with_the_newest_key() {
        let c = config(
            "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\nformat = \"set\"\nset = { issuer = \"i\", audience = \"a\" }\nsignature = \"v1a\"\nsecret = [\"whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=\", \"whsk_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"]\n",
        );
        let sub = &c.subscriptions[0];
        assert_eq!(content_type(sub.format), "application/secevent+jwt");
        let bytes = render(&example(), sub).unwrap();
        let SigningKeys::V1a(keys) = &sub.keys else {
            panic!("v1a keys")
        };
        let expected = set::token(
            &example(),
            Payload::Full,
            sub.set.as_ref().unwrap(),
            &keys[0],
        );
        assert_eq!(std::str::from_utf8(&bytes).unwrap(), expected.unwrap());
        assert_eq!(
            bytes,
            render(&example(), sub).unwrap(),
            "same bytes on a retry"
        );
    }

    #[test]
    fn slack_is_a_text_message_sent_as_json() {
        let v = body("format = \"slack\"\nslack = { text = \"{type} {entity_id}: {data.email}\" }");
        assert_eq!(v, json!({"text": "user.updated 42: a@example.com"}));
        assert_eq!(content_type(Format::Slack), "application/json");
    }
}
