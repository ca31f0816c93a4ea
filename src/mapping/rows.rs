//! Row helpers for payloads: redaction (`include_columns` / `exclude_columns`) and the
//! list of changed columns.

use crate::config::Columns;
use crate::source::decoder::Row;

/// `row` without the columns `columns` redacts, in column order.
pub(crate) fn redact(row: Row, columns: &Columns) -> Row {
    match columns {
        Columns::All => row,
        _ => row
            .into_iter()
            .filter(|(name, _)| columns.allows(name))
            .collect(),
    }
}

/// Columns of `new` whose value differs from the full `old` row, in column order
/// (redacted columns included: callers filter). A column absent from `new` (an
/// unchanged TOAST value that could not be filled) is not reported.
pub(crate) fn changed<'r>(old: &Row, new: &'r Row) -> Vec<&'r str> {
    new.iter()
        .filter(|(name, value)| old.get(name.as_str()) != Some(value))
        .map(|(name, _)| name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn redaction_keeps_order_and_drops_columns() {
        let r = row(json!({"id": 1, "email": "e", "pw": "p"}));
        let ex = redact(r.clone(), &Columns::Exclude(vec!["pw".into()]));
        assert_eq!(ex.keys().collect::<Vec<_>>(), ["id", "email"]);
        let inc = redact(
            r.clone(),
            &Columns::Include(vec!["email".into(), "id".into()]),
        );
        assert_eq!(inc.keys().collect::<Vec<_>>(), ["id", "email"]);
        assert_eq!(redact(r.clone(), &Columns::All), r);
    }

    #[test]
    fn changed_lists_differing_columns_only() {
        let old = row(json!({"id": 1, "email": "a", "bio": "long", "n": 1}));
        let new = row(json!({"id": 1, "email": "b", "bio": "long", "n": 1.0}));
        // 1 and 1.0 are different JSON numbers (int4 became float): reported.
        assert_eq!(changed(&old, &new), ["email", "n"]);
        let partial = row(json!({"id": 1, "email": "a"}));
        assert!(changed(&old, &partial).is_empty());
    }
}
