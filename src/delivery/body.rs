//! The bytes a subscription is sent for one event: the full or thin envelope, or a
//! custom object built from envelope paths (`fields`).

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::config::{FieldMapping, Payload, SubscriptionConfig};
use crate::routing::Envelope;

/// Envelope keys left out of a `payload = "thin"` body.
const THIN_OMITS: [&str; 3] = ["data", "previous", "changed"];

/// The request body of `envelope` for `sub` (its `payload` and `fields`).
///
/// Deterministic: the same envelope and subscription give the same bytes, so every
/// retry signs and sends the same body.
pub fn render(envelope: &Envelope, sub: &SubscriptionConfig) -> Result<Bytes, serde_json::Error> {
    if sub.fields.is_none() && sub.payload == Payload::Full {
        // Same bytes as going through a `Value`, one serialisation instead of two.
        return serde_json::to_vec(envelope).map(Bytes::from);
    }
    let full = serde_json::to_value(envelope)?;
    render_value(&full, sub.payload, sub.fields.as_deref())
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

fn pick(full: &Value, fields: &[FieldMapping]) -> Map<String, Value> {
    let mut out = Map::with_capacity(fields.len());
    for field in fields {
        if let Some(v) = lookup(full, &field.path) {
            out.insert(field.output.clone(), v.clone());
        }
    }
    out
}

fn lookup<'a>(mut value: &'a Value, path: &[String]) -> Option<&'a Value> {
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
}
