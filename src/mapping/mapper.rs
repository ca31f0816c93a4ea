//! The [`Mapper`]: turns one row [`Change`] into the entity event drafts its table's
//! rules call for. Pure and synchronous; the hot path of the pipeline.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::TableConfig;
use crate::source::decoder::{Change, Op, Row, TableName};
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
    /// The new row, or on a delete the old row's known values; redacted.
    pub data: Row,
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
/// Rules (`[[tables.rules]]`) see the same redacted rows as payloads: a column
/// filtered out by `include_columns`/`exclude_columns` is absent from `new` and `old`,
/// and from `changed`. Entity ids are read from the unredacted row (id columns are
/// never redacted: config and [`Mapper::new`] refuse it). A single-column id is the
/// value as is; only composite ids percent-encode `:` and `%` inside their parts.
#[derive(Debug)]
pub struct Mapper {
    tables: HashMap<TableName, TableMapping>,
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
            Ok(Mapper { tables: map })
        } else {
            Err(MappingError { errors })
        }
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
    pub fn map(&self, change: &Change, out: &mut Vec<EventDraft>) -> MapStats {
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
            for (i, rule) in t.rules.iter().enumerate() {
                match condition::eval_bool(&rule.program, &ctx) {
                    Ok(true) => fired.push(&rule.event),
                    Ok(false) => {}
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

        let (id_row, data_row) = match change.op {
            Op::Delete => (change.old.as_ref(), change.old.as_ref()),
            Op::Insert | Op::Update => (change.new.as_ref(), change.new.as_ref()),
        };
        let empty = Row::new();
        let entity_id = match entity_id(id_row.unwrap_or(&empty), &t.id) {
            Ok(id) => id,
            Err((column, reason)) => {
                tracing::warn!(
                    table = %t.qualified,
                    column,
                    reason = ?reason,
                    op = change.op.as_str(),
                    "row change has no entity id; no event emitted"
                );
                stats.skipped = Some(Skip::MissingId {
                    column: column.to_owned(),
                    reason,
                });
                return stats;
            }
        };

        let data = redact(data_row.unwrap_or(&empty), &t.columns);
        let previous = match (&change.old, change.op) {
            (Some(old), Op::Update) if old_full => Some(redact(old, &t.columns)),
            _ => None,
        };
        let changed = raw_changed.map(|cols| {
            cols.into_iter()
                .filter(|c| t.columns.allows(c))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        });

        let count = own.iter().len() + fired.len();
        out.reserve(count);
        let mut draft = EventDraft {
            event_type: String::new(),
            entity: Arc::clone(&t.entity),
            entity_id,
            data,
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
    ctx.add_variable_from_value("table", condition::string(&t.qualified));
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
