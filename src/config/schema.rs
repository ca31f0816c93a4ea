//! The JSON Schema of walhook.toml (`walhook config schema`), generated from the raw
//! serde structs so that it always has exactly the keys the loader accepts, and the
//! list of every dotted key (`source.url`, `tables.rules.when`, ...) derived from it,
//! which keeps docs/config.md complete (a test checks each key is documented).

use serde_json::{Map, Value};

use super::raw::RawConfig;

/// The JSON Schema (draft 2020-12) of walhook.toml, as TOML parsed to JSON.
pub fn json_schema() -> Value {
    let schema = schemars::schema_for!(RawConfig);
    let mut value = serde_json::to_value(schema).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("title".into(), "walhook.toml".into());
        map.insert(
            "description".into(),
            "walhook configuration: watched tables, subscriptions, source, store, server, log, \
             daemon. Durations are strings such as \"30s\", \"5m\", \"7d\". Any string may \
             hold ${VAR}, expanded from the environment. See docs/config.md."
                .into(),
        );
    }
    value
}

/// Every key of the config as a dotted path, arrays of tables included without an
/// index: `source.url`, `tables.rules.event`, `subscriptions.retry.backoff`. Sorted.
pub fn keys() -> Vec<String> {
    let schema = json_schema();
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    walk(&schema, "", &defs, &mut out, 0);
    out.sort();
    out.dedup();
    out
}

fn walk(node: &Value, prefix: &str, defs: &Map<String, Value>, out: &mut Vec<String>, depth: u8) {
    if depth > 16 {
        return;
    }
    let Some(obj) = node.as_object() else {
        return;
    };
    if let Some(name) = obj
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/$defs/"))
        && let Some(target) = defs.get(name)
    {
        walk(target, prefix, defs, out, depth + 1);
    }
    for combinator in ["anyOf", "oneOf", "allOf"] {
        for branch in obj
            .get(combinator)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            walk(branch, prefix, defs, out, depth + 1);
        }
    }
    if let Some(items) = obj.get("items") {
        walk(items, prefix, defs, out, depth + 1);
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            let dotted = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            out.push(dotted.clone());
            walk(sub, &dotted, defs, out, depth + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cover_nested_tables_and_arrays_of_tables() {
        let keys = keys();
        for key in [
            "source.url",
            "store.paused_retention",
            "tables.rules.when",
            "tables.events.insert",
            "tables.aggregate.min_rows",
            "subscriptions.retry.backoff",
            "subscriptions.set.issuer",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn schema_rejects_unknown_keys() {
        let schema = json_schema();
        let text = schema.to_string();
        assert!(text.contains("\"additionalProperties\":false"), "{text}");
    }
}
