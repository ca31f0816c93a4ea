//! Entity ids from id columns: one column gives its value as is; a composite id joins
//! its parts with `:`, percent-encoding `%` and `:` inside a part so the join cannot
//! be ambiguous.

use serde_json::Value;

use crate::source::decoder::Row;

/// Why a row has no entity id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingId {
    /// The id column is not in the row (e.g. a delete's key tuple without it).
    Absent,
    /// The id column is NULL.
    Null,
}

/// The entity id of `row` from the id columns `columns` (never empty).
pub(crate) fn entity_id<'c>(
    row: &Row,
    columns: &'c [String],
) -> Result<String, (&'c str, MissingId)> {
    if let [column] = columns {
        return part(row, column).map_err(|e| (column.as_str(), e));
    }
    let mut id = String::new();
    for (i, column) in columns.iter().enumerate() {
        let value = part(row, column).map_err(|e| (column.as_str(), e))?;
        if i > 0 {
            id.push(':');
        }
        push_encoded(&mut id, &value);
    }
    Ok(id)
}

/// One column's text: strings raw, numbers and bools (and JSON values) as JSON text.
fn part(row: &Row, column: &str) -> Result<String, MissingId> {
    match row.get(column) {
        None => Err(MissingId::Absent),
        Some(Value::Null) => Err(MissingId::Null),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(other) => Ok(other.to_string()),
    }
}

fn push_encoded(out: &mut String, part: &str) {
    for ch in part.chars() {
        match ch {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn single_ids_are_raw() {
        let r = row(json!({"id": 42, "s": "a:b%c", "b": true, "u": "5a1e"}));
        assert_eq!(entity_id(&r, &cols(&["id"])).unwrap(), "42");
        assert_eq!(entity_id(&r, &cols(&["s"])).unwrap(), "a:b%c");
        assert_eq!(entity_id(&r, &cols(&["b"])).unwrap(), "true");
        assert_eq!(entity_id(&r, &cols(&["u"])).unwrap(), "5a1e");
    }

    #[test]
    fn composite_ids_join_and_encode_parts() {
        let r = row(json!({"org": "acme:eu", "n": 7, "p": "50%"}));
        assert_eq!(entity_id(&r, &cols(&["org", "n"])).unwrap(), "acme%3Aeu:7");
        assert_eq!(
            entity_id(&r, &cols(&["p", "n", "org"])).unwrap(),
            "50%25:7:acme%3Aeu"
        );
    }

    #[test]
    fn missing_and_null_parts_are_reported_with_their_column() {
        let r = row(json!({"a": 1, "n": null}));
        assert_eq!(
            entity_id(&r, &cols(&["a", "b"])),
            Err(("b", MissingId::Absent))
        );
        assert_eq!(entity_id(&r, &cols(&["n"])), Err(("n", MissingId::Null)));
    }
}
