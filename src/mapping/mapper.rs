//! The [`Mapper`]: turns one row [`Change`] into the entity event drafts its table's
//! rules call for. Pure and synchronous; the hot path of the pipeline.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::TableConfig;
use crate::source::decoder::{Change, JsonRowSpec, JsonRows, Op, Row, RowJson, TableName};
use crate::source::setup::TableInfo;

use super::condition::{self, EvalError};
use super::entity_id::{MissingId, entity_id};
use super::error::MappingError;
use super::rows::{changed, redact};
use super::table::TableMapping;

/// One entity event derived from a row change, before the store gives it an id and a
/// revision. All drafts of one change share one revision.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    /// Full event name, e.g. `user.updated`.
    pub event_type: String,
    /// Entity name, e.g. `user`.
    pub entity: Arc<str>,
    /// Entity id (id columns; composite ids joined with `:`).
    pub entity_id: String,
    /// The new row, or on a delete the old row's known values; redacted. Empty when
    /// `json` holds it.
    pub data: Row,
    /// `data` as JSON text, when the decoder wrote it so ([`Mapper::json_rows`]).
    pub json: Option<RowJson>,
    /// The old row on updates under REPLICA IDENTITY FULL; redacted.
    pub previous: Option<Row>,
    /// Columns whose value changed, on updates under REPLICA IDENTITY FULL; redacted.
    pub changed: Option<Vec<String>>,
    /// The source table.
    pub table: Arc<TableName>,
}

/// Why a change produced no drafts although its table may have wanted some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The table is not watched by this config.
    Unwatched,
    /// An event was due, but the row has no value for an id column (absent or NULL).
    MissingId {
        /// The id column (a name, never a value).
        column: String,
        /// Absent or NULL.
        reason: MissingId,
    },
}

/// What mapping one change did, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapStats {
    /// Drafts pushed.
    pub drafts: u32,
    /// Rules whose condition failed at run time (counted as false).
    pub rule_errors: u32,
    /// Indices (in the table's `rules`) of those rules; see [`Mapper::rule_event`].
    pub failed_rules: Vec<usize>,
    /// Set when the change was skipped.
    pub skipped: Option<Skip>,
}

/// The table rules of a config, checked against the database catalog.
///
/// A rule is false when its condition is false, is not a bool, or fails at run time;
/// failures are counted in [`MapStats`] and logged without values. A failure of a rule
/// that reads a row the change does not have (`old` on an insert or without REPLICA
/// IDENTITY FULL, `new` on a delete) is not counted: `old.status != new.status` simply
/// does not apply to an insert.
///
/// Rules (`[[tables.rules]]`) see the same redacted rows as payloads: a column
/// filtered out by `include_columns`/`exclude_columns` is absent from `new` and `old`,
/// and from `changed`. Entity ids are read from the unredacted row (id columns are
/// never redacted: config and [`Mapper::new`] refuse it). A single-column id is the
/// value as is; only composite ids percent-encode `:` and `%` inside their parts.
#[derive(Debug)]
pub struct Mapper {
    pub(super) tables: HashMap<TableName, TableMapping>,
    /// `[[tables.context]]` lookups, per table.
    context: super::ContextPlan,
}

impl Mapper {
    /// Builds the mapper; `infos` is the catalog information of the watched tables.
    /// Reports every table problem at once.
    pub fn new(tables: &[TableConfig], infos: &[TableInfo]) -> Result<Mapper, MappingError> {
        let mut map = HashMap::with_capacity(tables.len());
        let mut errors = Vec::new();
        for config in tables {
            let info = infos
                .iter()
                .find(|i| i.name.schema == config.schema && i.name.name == config.name);
            match TableMapping::build(config, info) {
                Ok(t) => {
                    map.insert(TableName::clone(&t.table), t);
                }
                Err(e) => errors.extend(e),
            }
        }
        if errors.is_empty() {
            Ok(Mapper {
                tables: map,
                context: super::ContextPlan::default(),
            })
        } else {
            Err(MappingError { errors })
        }
    }

    /// The mapper with `plan`'s context lookups.
    pub fn with_context(self, plan: super::ContextPlan) -> Mapper {
        Mapper {
            context: plan,
            ..self
        }
    }

    /// What the context lookup stage reads for `change` (its new row, or its old row
    /// for a delete); `None` when its table has no context.
    pub fn context_keys(&self, change: &Change) -> Option<super::ContextKeys> {
        if self.context.is_empty() {
            return None;
        }
        let row = match change.op {
            Op::Delete => change.old.as_ref(),
            Op::Insert | Op::Update => change.new.as_ref(),
        };
        self.context.keys(&change.table, row)
    }

    /// What the context stage reads for the snapshot event of `row`, an existing row
    /// of `table` (as for a change's new row); `None` when the table has no context.
    pub fn snapshot_context_keys(
        &self,
        table: &TableName,
        row: &Row,
    ) -> Option<super::ContextKeys> {
        if self.context.is_empty() {
            return None;
        }
        self.context.keys(table, Some(row))
    }

    /// The tables whose new rows the decoder may write as JSON text: those whose
    /// mapping reads only the entity id of a row (no rules, no `update_columns`, no
    /// context). Not for a config with bulk events, which build their items from rows.
    pub fn json_rows(&self) -> JsonRows {
        let tables = self
            .tables
            .iter()
            .filter(|(table, t)| {
                t.rules.is_empty()
                    && t.update_columns.is_none()
                    && !self.context.tables.contains_key(*table)
            })
            .map(|(table, t)| {
                let spec = JsonRowSpec {
                    read: t.id.clone(),
                    columns: t.columns.clone(),
                };
                (table.clone(), spec)
            })
            .collect();
        JsonRows { tables }
    }

    /// Whether `table` is watched.
    pub fn watches(&self, table: &TableName) -> bool {
        self.tables.contains_key(table)
    }

    /// The event name of rule `index` of `table` (to label [`MapStats::failed_rules`]).
    pub fn rule_event(&self, table: &TableName, index: usize) -> Option<&str> {
        let t = self.tables.get(table)?;
        t.rules.get(index).map(|r| r.event.as_str())
    }

    /// Pushes the drafts `change` produces onto `out`, all together (default event
    /// first, then rules in file order). A change that produces no event pushes
    /// nothing. Never fails: rule errors and skips are reported in the stats.
    ///
    /// The rows that become the drafts' `data` and `previous` are moved out of
    /// `change` (left `None`) when the table keeps every column, and their values moved
    /// when it redacts some: a row is not copied. Read what else the change is needed
    /// for ([`Mapper::context_keys`]) before.
    pub fn map(&self, change: &mut Change, out: &mut Vec<EventDraft>) -> MapStats {
        let mut stats = MapStats::default();
        let Some(t) = self.tables.get(&*change.table) else {
            stats.skipped = Some(Skip::Unwatched);
            return stats;
        };
        let old_full = change.old_is_full && change.old.is_some();
        let raw_changed = match (change.op, &change.old, &change.new) {
            (Op::Update, Some(old), Some(new)) if old_full => Some(changed(old, new)),
            _ => None,
        };

        let own = match change.op {
            Op::Insert => t.events.insert.as_deref(),
            Op::Delete => t.events.delete.as_deref(),
            Op::Update => t.events.update.as_deref().filter(|_| {
                match (&t.update_columns, &raw_changed) {
                    (Some(cols), Some(ch)) => ch.iter().any(|c| cols.iter().any(|u| u == c)),
                    // Without the old row the check cannot be made (start-up refuses
                    // update_columns without FULL): treat as changed.
                    _ => true,
                }
            }),
        };

        let mut fired: Vec<&str> = Vec::new();
        if !t.rules.is_empty() {
            let ctx = rule_scope(t, change, old_full, raw_changed.as_deref());
            let new_null = change.op == Op::Delete || change.new.is_none();
            for (i, rule) in t.rules.iter().enumerate() {
                match condition::eval_bool(&rule.program, &ctx) {
                    Ok(true) => fired.push(&rule.event),
                    Ok(false) => {}
                    // A rule reading a row this change lacks (`old` on an insert,
                    // `new` on a delete) does not apply: false, not an error.
                    Err(_) if (rule.reads_old && !old_full) || (rule.reads_new && new_null) => {}
                    Err(e) => {
                        stats.rule_errors += 1;
                        stats.failed_rules.push(i);
                        log_rule_error(t, i, e);
                    }
                }
            }
        }
        if own.is_none() && fired.is_empty() {
            return stats;
        }

        let id_row = match change.op {
            Op::Delete => change.old.as_ref(),
            Op::Insert | Op::Update => change.new.as_ref(),
        };
        let empty = Row::new();
        let entity_id = match entity_id(id_row.unwrap_or(&empty), &t.id) {
            Ok(id) => id,
            Err((column, reason)) => {
                let (failures, log) = t.missing_ids.record();
                if log {
                    tracing::warn!(
                        table = %t.qualified,
                        column,
                        reason = ?reason,
                        op = change.op.as_str(),
                        failures,
                        "row change has no entity id; no event emitted"
                    );
                }
                stats.skipped = Some(Skip::MissingId {
                    column: column.to_owned(),
                    reason,
                });
                return stats;
            }
        };

        let changed = raw_changed.map(|cols| {
            cols.into_iter()
                .filter(|c| t.columns.allows(c))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        });
        let (data, previous) = match change.op {
            Op::Delete => (change.old.take(), None),
            Op::Insert => (change.new.take(), None),
            Op::Update if old_full => (change.new.take(), change.old.take()),
            Op::Update => (change.new.take(), None),
        };
        // Written by the decoder, filtered already: `data` keeps only the id's columns.
        let json = match change.op {
            Op::Insert | Op::Update if !old_full => change.new_json.take(),
            _ => None,
        };
        let data = match json {
            Some(_) => Row::new(),
            None => redact(data.unwrap_or_default(), &t.columns),
        };
        let previous = previous.map(|old| redact(old, &t.columns));

        let count = own.iter().len() + fired.len();
        out.reserve(count);
        let mut draft = EventDraft {
            event_type: String::new(),
            entity: Arc::clone(&t.entity),
            entity_id,
            data,
            json,
            previous,
            changed,
            table: Arc::clone(&change.table),
        };
        // Every name but the last gets a copy; the last takes the originals.
        let mut names = own.into_iter().chain(fired).peekable();
        while let Some(name) = names.next() {
            if names.peek().is_none() {
                draft.event_type = name.to_owned();
                out.push(draft);
                break;
            }
            out.push(EventDraft {
                event_type: name.to_owned(),
                ..draft.clone()
            });
        }
        stats.drafts = count as u32;
        stats
    }
}

/// The CEL variables of one change: `new`, `old` (null unless known in full), `op`,
/// `table`, `changed` (empty unless known). Rows are redacted; unread ones not built.
fn rule_scope(
    t: &TableMapping,
    change: &Change,
    old_full: bool,
    raw_changed: Option<&[&str]>,
) -> cel::Context<'static> {
    let mut ctx = condition::scope();
    ctx.add_variable_from_value("op", condition::string(change.op.as_str()));
    ctx.add_variable_from_value("table", t.qualified_cel.clone());
    if t.needs.new {
        let new = match (&change.new, change.op) {
            (Some(row), Op::Insert | Op::Update) => condition::row_to_cel(row, &t.columns),
            _ => cel::Value::Null,
        };
        ctx.add_variable_from_value("new", new);
    }
    if t.needs.old {
        let old = match &change.old {
            Some(row) if old_full => condition::row_to_cel(row, &t.columns),
            _ => cel::Value::Null,
        };
        ctx.add_variable_from_value("old", old);
    }
    if t.needs.changed {
        let cols = raw_changed.unwrap_or_default().iter().copied();
        let list = condition::string_list(cols.filter(|c| t.columns.allows(c)));
        ctx.add_variable_from_value("changed", list);
    }
    ctx
}

/// Logs a failed rule without row values, rate-limited per rule.
fn log_rule_error(t: &TableMapping, index: usize, e: EvalError) {
    let rule = &t.rules[index];
    let (failures, log) = rule.failures.record();
    if log {
        tracing::warn!(
            table = %t.qualified,
            event = %rule.event,
            error = e.kind,
            failures,
            "rule condition failed; counted as false"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::{info, tables};
    use serde_json::{Value, json};

    /// The `[[tables]]` example of DESIGN.md, plus tables for ids and rule errors.
    const CONFIG: &str = r#"
[[tables]]
table = "public.users"
entity = "user"
id = ["id"]
exclude_columns = ["password_hash"]
update_columns = ["email", "status"]

[[tables.rules]]
event = "user.suspended"
when = "old.status != 'suspended' && new.status == 'suspended'"

[[tables.rules]]
event = "user.saw_redacted"
when = "'password_hash' in new || (old != null && 'password_hash' in old) || 'password_hash' in changed"

[[tables]]
table = "public.user_roles"
entity = "user"
id = ["user_id"]
events = { insert = "role.assigned", delete = "role.unassigned", update = false }

[[tables]]
table = "public.memberships"
entity = "membership"
id = ["org", "member"]
include_columns = ["org", "member", "role"]

[[tables]]
table = "public.counters"
entity = "counter"
events = { update = false, delete = false }

[[tables.rules]]
event = "counter.high"
when = "new.count > 5"

[[tables.rules]]
event = "counter.seen"
when = "op == 'insert' && table == 'public.counters' && size(changed) == 0 && old == null"
"#;

    fn mapper() -> Mapper {
        let infos = [
            info(
                "public.users",
                'f',
                &["id"],
                &["id", "email", "status", "name", "password_hash", "bio"],
            ),
            info(
                "public.user_roles",
                'd',
                &["user_id", "role_id"],
                &["user_id", "role_id", "granted_by"],
            ),
            info(
                "public.memberships",
                'd',
                &["org", "member"],
                &["org", "member", "role", "secret"],
            ),
            info("public.counters", 'd', &["id"], &["id", "count"]),
        ];
        Mapper::new(&tables(CONFIG), &infos).unwrap()
    }

    fn row(v: Value) -> Row {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn change(table: &str, op: Op, new: Option<Value>, old: Option<Value>, full: bool) -> Change {
        let (schema, name) = table.split_once('.').unwrap();
        Change {
            relation_id: 1,
            table: Arc::new(TableName {
                schema: schema.into(),
                name: name.into(),
            }),
            op,
            new: new.map(row),
            new_json: None,
            old: old.map(row),
            old_is_full: full,
            unchanged_toast: Vec::new(),
            key_columns: Arc::from(Vec::<String>::new()),
        }
    }

    fn run(m: &Mapper, c: &Change) -> (Vec<EventDraft>, MapStats) {
        let mut out = Vec::new();
        let stats = m.map(&mut c.clone(), &mut out);
        assert_eq!(stats.drafts as usize, out.len());
        (out, stats)
    }

    fn types(drafts: &[EventDraft]) -> Vec<&str> {
        drafts.iter().map(|d| d.event_type.as_str()).collect()
    }

    fn user(email: &str, status: &str, pw: &str) -> Value {
        json!({"id": 42, "email": email, "status": status, "name": "Ann", "password_hash": pw})
    }

    /// Only tables whose mapping reads nothing of a row but its id get rows as JSON
    /// text: users have rules and `update_columns`, counters rules.
    #[test]
    fn json_rows_are_for_tables_that_read_only_the_id() {
        let rows = mapper().json_rows();
        let mut tables: Vec<String> = rows.tables.keys().map(|t| t.to_string()).collect();
        tables.sort();
        assert_eq!(tables, ["public.memberships", "public.user_roles"]);
        let spec = &rows.tables[&TableName {
            schema: "public".into(),
            name: "memberships".into(),
        }];
        assert_eq!(spec.read, ["org", "member"]);
        assert!(!spec.columns.allows("secret"));
    }

    /// A row the decoder wrote as JSON becomes the draft's data as it is; with the full
    /// old row (an update under FULL) there is none, and a delete's data is its old row.
    #[test]
    fn json_rows_become_the_data_of_inserts_and_updates() {
        let m = mapper();
        let text = RowJson(Arc::from(
            serde_json::value::to_raw_value(&json!({"org": 1, "member": 2, "role": "x"})).unwrap(),
        ));
        for op in [Op::Insert, Op::Update, Op::Delete] {
            let mut c = change(
                "public.memberships",
                op,
                Some(json!({"org": 1, "member": 2})),
                Some(json!({"org": 1, "member": 2})),
                false,
            );
            c.new_json = Some(text.clone());
            let (out, _) = run(&m, &c);
            assert_eq!(out.len(), 1, "{op}");
            let d = &out[0];
            assert_eq!(d.entity_id, "1:2");
            if op == Op::Delete {
                assert_eq!(
                    (&d.json, &d.data),
                    (&None, &row(json!({"org": 1, "member": 2})))
                );
            } else {
                assert_eq!(
                    (&d.json, &d.data),
                    (&Some(text.clone()), &Row::new()),
                    "{op}"
                );
            }
        }
    }

    #[test]
    fn insert_emits_created_with_redacted_data() {
        let m = mapper();
        let c = change(
            "public.users",
            Op::Insert,
            Some(user("a@x", "active", "h1")),
            None,
            false,
        );
        let (out, stats) = run(&m, &c);
        assert_eq!(types(&out), ["user.created"]);
        let d = &out[0];
        assert_eq!(&*d.entity, "user");
        assert_eq!(d.entity_id, "42");
        assert_eq!(
            d.data,
            row(json!({"id": 42, "email": "a@x", "status": "active", "name": "Ann"}))
        );
        assert_eq!((d.previous.as_ref(), d.changed.as_ref()), (None, None));
        assert_eq!(d.table.to_string(), "public.users");
        assert_eq!(stats.rule_errors, 0, "{stats:?}");
    }

    #[test]
    fn update_under_full_has_previous_and_changed_without_redacted_columns() {
        let m = mapper();
        let c = change(
            "public.users",
            Op::Update,
            Some(user("b@x", "active", "h2")),
            Some(user("a@x", "active", "h1")),
            true,
        );
        let (out, stats) = run(&m, &c);
        assert_eq!(types(&out), ["user.updated"]);
        let d = &out[0];
        assert_eq!(d.changed.as_deref(), Some(&["email".to_string()][..]));
        let prev = d.previous.as_ref().unwrap();
        assert_eq!(prev["email"], "a@x");
        assert!(!prev.contains_key("password_hash") && !d.data.contains_key("password_hash"));
        // The rule probing for password_hash never sees it.
        assert_eq!(
            stats,
            MapStats {
                drafts: 1,
                ..MapStats::default()
            }
        );
    }

    #[test]
    fn update_columns_suppress_updates_of_other_columns() {
        let m = mapper();
        let mut new = user("a@x", "active", "h2");
        new["name"] = json!("Bob");
        let c = change(
            "public.users",
            Op::Update,
            Some(new),
            Some(user("a@x", "active", "h1")),
            true,
        );
        let (out, stats) = run(&m, &c);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(stats, MapStats::default());
    }

    #[test]
    fn update_without_old_row_is_treated_as_changed() {
        let m = mapper();
        let c = change(
            "public.users",
            Op::Update,
            Some(user("a@x", "active", "h")),
            None,
            false,
        );
        let (out, stats) = run(&m, &c);
        assert_eq!(types(&out), ["user.updated"]);
        assert_eq!(
            (out[0].previous.as_ref(), out[0].changed.as_ref()),
            (None, None)
        );
        // `old` is null, so the suspension rule does not apply: false, not an error.
        assert_eq!(
            stats,
            MapStats {
                drafts: 1,
                ..MapStats::default()
            }
        );
    }

    #[test]
    fn status_transition_rule_fires_alongside_the_update() {
        let m = mapper();
        let c = change(
            "public.users",
            Op::Update,
            Some(user("a@x", "suspended", "h")),
            Some(user("a@x", "active", "h")),
            true,
        );
        let (out, stats) = run(&m, &c);
        assert_eq!(types(&out), ["user.updated", "user.suspended"]);
        assert_eq!(out[0].data, out[1].data);
        assert_eq!(out[1].changed.as_deref(), Some(&["status".to_string()][..]));
        assert_eq!(out[1].previous, out[0].previous);
        assert_eq!(stats.rule_errors, 0);

        // Already suspended: the email change is an update, not a new suspension.
        let c = change(
            "public.users",
            Op::Update,
            Some(user("b@x", "suspended", "h")),
            Some(user("a@x", "suspended", "h")),
            true,
        );
        assert_eq!(types(&run(&m, &c).0), ["user.updated"]);
    }

    #[test]
    fn delete_data_is_the_key_tuple_or_the_full_old_row() {
        let m = mapper();
        let key_only = change(
            "public.users",
            Op::Delete,
            None,
            Some(json!({"id": 42})),
            false,
        );
        let (out, _) = run(&m, &key_only);
        assert_eq!(types(&out), ["user.deleted"]);
        assert_eq!(out[0].data, row(json!({"id": 42})));
        assert_eq!(
            (out[0].previous.as_ref(), out[0].changed.as_ref()),
            (None, None)
        );

        let full = change(
            "public.users",
            Op::Delete,
            None,
            Some(user("a@x", "active", "h")),
            true,
        );
        let (out, _) = run(&m, &full);
        assert_eq!(out[0].entity_id, "42");
        assert_eq!(
            out[0].data,
            row(json!({"id": 42, "email": "a@x", "status": "active", "name": "Ann"}))
        );
        assert_eq!(out[0].previous, None);
    }

    #[test]
    fn join_table_emits_role_events_on_the_user_entity() {
        let m = mapper();
        let ins = change(
            "public.user_roles",
            Op::Insert,
            Some(json!({"user_id": 7, "role_id": 3, "granted_by": 1})),
            None,
            false,
        );
        let (out, _) = run(&m, &ins);
        assert_eq!(types(&out), ["user.role.assigned"]);
        assert_eq!((&*out[0].entity, out[0].entity_id.as_str()), ("user", "7"));

        let upd = change(
            "public.user_roles",
            Op::Update,
            Some(json!({"user_id": 7, "role_id": 3, "granted_by": 2})),
            None,
            false,
        );
        let (out, stats) = run(&m, &upd);
        assert!(out.is_empty());
        assert_eq!(stats, MapStats::default());

        let del = change(
            "public.user_roles",
            Op::Delete,
            None,
            Some(json!({"user_id": 7, "role_id": 3})),
            false,
        );
        let (out, _) = run(&m, &del);
        assert_eq!(types(&out), ["user.role.unassigned"]);
        assert_eq!(out[0].entity_id, "7");
        assert_eq!(out[0].data, row(json!({"user_id": 7, "role_id": 3})));
    }

    #[test]
    fn composite_ids_encode_parts_and_include_columns_redact() {
        let m = mapper();
        let c = change(
            "public.memberships",
            Op::Insert,
            Some(json!({"org": "acme:eu", "member": "50%", "role": "admin", "secret": "s"})),
            None,
            false,
        );
        let (out, _) = run(&m, &c);
        assert_eq!(types(&out), ["membership.created"]);
        assert_eq!(out[0].entity_id, "acme%3Aeu:50%25");
        assert_eq!(
            out[0].data,
            row(json!({"org": "acme:eu", "member": "50%", "role": "admin"}))
        );
    }

    #[test]
    fn include_columns_redact_previous_and_changed() {
        let tables = tables(
            "[[tables]]\ntable = \"public.memberships\"\ninclude_columns = [\"org\", \"member\", \"role\"]\n",
        );
        let infos = [info(
            "public.memberships",
            'f',
            &["org", "member"],
            &["org", "member", "role", "secret"],
        )];
        let m = Mapper::new(&tables, &infos).unwrap();
        let c = change(
            "public.memberships",
            Op::Update,
            Some(json!({"org": "o", "member": "m", "role": "owner", "secret": "new"})),
            Some(json!({"org": "o", "member": "m", "role": "admin", "secret": "old"})),
            true,
        );
        let (out, _) = run(&m, &c);
        assert_eq!(out[0].changed.as_deref(), Some(&["role".to_string()][..]));
        assert!(!out[0].previous.as_ref().unwrap().contains_key("secret"));
        assert!(!out[0].data.contains_key("secret"));
    }

    #[test]
    fn rule_runtime_error_counts_as_false_and_is_reported() {
        let m = mapper();
        let c = change(
            "public.counters",
            Op::Insert,
            Some(json!({"id": 1, "count": "7"})),
            None,
            false,
        );
        let (out, stats) = run(&m, &c);
        assert_eq!(types(&out), ["counter.created", "counter.seen"]);
        assert_eq!((stats.rule_errors, &stats.failed_rules[..]), (1, &[0][..]));
        let table = TableName {
            schema: "public".into(),
            name: "counters".into(),
        };
        assert_eq!(m.rule_event(&table, 0), Some("counter.high"));

        let c = change(
            "public.counters",
            Op::Insert,
            Some(json!({"id": 1, "count": 9})),
            None,
            false,
        );
        let (out, stats) = run(&m, &c);
        assert_eq!(
            types(&out),
            ["counter.created", "counter.high", "counter.seen"]
        );
        assert_eq!(stats.rule_errors, 0);
    }

    #[test]
    fn rules_alone_can_emit_when_own_events_are_disabled() {
        let m = mapper();
        let c = change(
            "public.counters",
            Op::Update,
            Some(json!({"id": 1, "count": 6})),
            Some(json!({"id": 1})),
            false,
        );
        let (out, _) = run(&m, &c);
        assert_eq!(types(&out), ["counter.high"]);
        assert_eq!(out[0].entity_id, "1");
    }

    #[test]
    fn unwatched_tables_and_rows_without_id_are_skipped() {
        let m = mapper();
        let c = change(
            "public.other",
            Op::Insert,
            Some(json!({"id": 1})),
            None,
            false,
        );
        assert_eq!(run(&m, &c).1.skipped, Some(Skip::Unwatched));

        let mut u = user("a@x", "active", "h");
        u["id"] = Value::Null;
        let c = change("public.users", Op::Insert, Some(u), None, false);
        let (out, stats) = run(&m, &c);
        assert!(out.is_empty());
        assert_eq!(
            stats.skipped,
            Some(Skip::MissingId {
                column: "id".into(),
                reason: MissingId::Null
            })
        );
    }

    #[test]
    fn unchanged_toast_without_full_is_left_out() {
        let m = mapper();
        let mut c = change(
            "public.users",
            Op::Update,
            Some(user("a@x", "active", "h")),
            None,
            false,
        );
        c.unchanged_toast = vec!["bio".into()];
        let (out, _) = run(&m, &c);
        assert!(!out[0].data.contains_key("bio"));
    }

    #[test]
    fn unknown_columns_fail_construction_naming_every_table() {
        let tables = tables(
            "[[tables]]\ntable = \"public.a\"\nid = [\"nope\"]\n[[tables]]\ntable = \"public.b\"\n",
        );
        let err = Mapper::new(&tables, &[info("public.a", 'f', &["id"], &["id"])]).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.errors.len(), 2, "{text}");
        assert!(
            text.contains("public.a") && text.contains("public.b"),
            "{text}"
        );
    }

    /// Rough throughput check: `cargo test --release --lib -- --ignored map_throughput --nocapture`.
    #[test]
    #[ignore]
    fn map_throughput() {
        let m = mapper();
        let c = change(
            "public.users",
            Op::Update,
            Some(user("b@x", "suspended", "h2")),
            Some(user("a@x", "active", "h1")),
            true,
        );
        let n = 200_000;
        let mut out = Vec::new();
        let start = std::time::Instant::now();
        for _ in 0..n {
            out.clear();
            m.map(&mut c.clone(), &mut out);
        }
        let per_sec = f64::from(n) / start.elapsed().as_secs_f64();
        println!(
            "{per_sec:.0} changes/s (2 CEL rules, redaction, 2 drafts each, a change cloned each)"
        );
    }
}
