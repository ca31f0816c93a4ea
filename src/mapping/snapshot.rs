//! Snapshot events: a table's existing row as one entity event (`walhook backfill`,
//! `snapshot = true`), with the same entity id and redaction as the table's changes.

use super::entity_id::entity_id;
use super::mapper::{EventDraft, Mapper};
use crate::config::Columns;
use crate::source::decoder::{Row, TableName};

impl Mapper {
    /// The entity of `table`, when it is watched.
    pub fn entity(&self, table: &TableName) -> Option<&str> {
        self.tables.get(table).map(|t| &*t.entity)
    }

    /// The draft of one existing row of `table`: event `event` (default
    /// `{entity}.snapshot`), its entity id, the redacted row (taken, not copied) as `data`. `None` when the
    /// table is not watched or the row has no entity id.
    pub fn snapshot(
        &self,
        table: &TableName,
        mut row: Row,
        event: Option<&str>,
    ) -> Option<EventDraft> {
        let t = self.tables.get(table)?;
        let entity_id = entity_id(&row, &t.id).ok()?;
        Some(EventDraft {
            event_type: match event {
                Some(name) => name.to_owned(),
                None => format!("{}.snapshot", t.entity),
            },
            entity: t.entity.clone(),
            entity_id,
            data: if matches!(t.columns, Columns::All) {
                row
            } else {
                row.retain(|name, _| t.columns.allows(name));
                row
            },
            json: None,
            previous: None,
            changed: None,
            table: t.table.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::{info, tables};
    use serde_json::json;

    #[test]
    fn a_snapshot_draft_has_the_id_and_the_redaction_of_the_tables_changes() {
        let t = tables(
            r#"
[[tables]]
table = "public.users"
entity = "user"
exclude_columns = ["pw"]
"#,
        );
        let m = Mapper::new(
            &t,
            &[info("public.users", 'd', &["id"], &["id", "email", "pw"])],
        )
        .unwrap();
        let table = TableName {
            schema: "public".into(),
            name: "users".into(),
        };
        let row: Row = json!({"id": 7, "email": "e", "pw": "p"})
            .as_object()
            .unwrap()
            .clone();
        let d = m.snapshot(&table, row.clone(), None).unwrap();
        assert_eq!(d.event_type, "user.snapshot");
        assert_eq!(d.entity_id, "7");
        assert_eq!(
            serde_json::Value::Object(d.data),
            json!({"id": 7, "email": "e"})
        );
        let named = m
            .snapshot(&table, row.clone(), Some("user.resent"))
            .unwrap();
        assert_eq!(named.event_type, "user.resent");
        let other = TableName {
            schema: "public".into(),
            name: "other".into(),
        };
        assert!(m.snapshot(&other, row, None).is_none());
        assert_eq!(m.entity(&table), Some("user"));
    }
}
