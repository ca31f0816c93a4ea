//! Validation of `[[tables]]` (rules, context, aggregate).

use std::collections::HashMap;

use super::super::locate::{index, join};
use super::super::raw::*;
use super::super::types::*;
use super::{Validator, is_event_name, is_ident, is_name_segment};

impl Validator<'_> {
    pub(super) fn tables(&mut self, raw: Vec<RawTable>) -> Vec<TableConfig> {
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut out = Vec::new();
        let mut keys = Vec::new();
        for (i, t) in raw.into_iter().enumerate() {
            let key = index("tables", i);
            let table_key = join(&key, "table");
            let Some(name) = self.required(
                &table_key,
                t.table.clone(),
                ": e.g. table = \"public.users\"",
            ) else {
                continue;
            };
            let qualified = self.qualified_table(&table_key, &name);
            if let Some((schema, table)) = &qualified {
                let full = format!("{schema}.{table}");
                if let Some(first) = seen.get(&full) {
                    let first = self.describe_key(&join(first, "table"));
                    self.err(
                        &table_key,
                        format!(
                            "table \"{full}\" is already declared ({first}); merge the two entries (use [[tables.rules]] for extra events)"
                        ),
                    );
                } else {
                    seen.insert(full, key.clone());
                }
            }
            if let Some(t) = self.table(&key, qualified, t) {
                out.push(t);
                keys.push(key);
            }
        }
        self.context_chains(&keys, &out);
        out
    }

    fn table(
        &mut self,
        key: &str,
        qualified: Option<(String, String)>,
        t: RawTable,
    ) -> Option<TableConfig> {
        let before = self.errors.len();
        // Without a valid `table` the entity still defaults sensibly (no second error).
        let default_entity = match &qualified {
            Some((_, n)) => n.clone(),
            None => t
                .table
                .as_deref()
                .and_then(|n| n.rsplit('.').next())
                .filter(|n| is_name_segment(n))
                .unwrap_or("entity")
                .to_string(),
        };
        let entity = t.entity.unwrap_or(default_entity);
        if !is_name_segment(&entity) {
            self.err(
                &join(key, "entity"),
                format!(
                    "bad entity \"{entity}\": use letters, digits, _ and - (no dots), e.g. entity = \"user\""
                ),
            );
        }
        let id = t.id.map(|id| match id {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        });
        let id = match id {
            Some(list) => self.name_list(&join(key, "id"), list, "id column"),
            None => None,
        };
        let columns = match (t.include_columns, t.exclude_columns) {
            (Some(_), Some(_)) => {
                self.err(
                    &join(key, "exclude_columns"),
                    "include_columns and exclude_columns cannot be used together; keep one",
                );
                Columns::All
            }
            (Some(inc), None) => self
                .name_list(&join(key, "include_columns"), inc, "column")
                .map_or(Columns::All, Columns::Include),
            (None, Some(exc)) => self
                .name_list(&join(key, "exclude_columns"), exc, "column")
                .map_or(Columns::All, Columns::Exclude),
            (None, None) => Columns::All,
        };
        if let (Some(id), Columns::Exclude(_) | Columns::Include(_)) = (&id, &columns) {
            for col in id {
                if !columns.allows(col) {
                    self.err(
                        &join(key, "id"),
                        format!("id column \"{col}\" is filtered out by include_columns/exclude_columns; ids are always sent"),
                    );
                }
            }
        }
        let update_columns = match t.update_columns {
            Some(list) => {
                let list = self.name_list(&join(key, "update_columns"), list, "column");
                for col in list.iter().flatten() {
                    if !columns.allows(col) {
                        self.err(
                            &join(key, "update_columns"),
                            format!("column \"{col}\" is filtered out by include_columns/exclude_columns, so it cannot trigger updates"),
                        );
                    }
                }
                list
            }
            None => None,
        };
        let events = self.event_names(key, &entity, t.events.unwrap_or_default());
        let mut rules = Vec::new();
        for (j, r) in t.rules.into_iter().enumerate() {
            let rkey = index(&join(key, "rules"), j);
            let event = self.full_event_name(&join(&rkey, "event"), r.event);
            let when_key = join(&rkey, "when");
            let when = self.required(
                &when_key,
                r.when,
                ": a CEL condition such as \"new.status == 'suspended'\"",
            );
            let program = when.as_deref().and_then(|w| self.cel(&when_key, w));
            if let (Some(event), Some(when_source), Some(program)) = (event, when, program) {
                let refs = program.references();
                let reads_old = refs.has_variable("old");
                let reads_changed = refs.has_variable("changed");
                rules.push(Rule {
                    event,
                    when_source,
                    reads_old,
                    reads_changed,
                    program,
                });
            }
        }
        let context = self.contexts(key, t.context);
        let aggregates = self.aggregates(key, t.aggregate);
        if events.insert.is_none()
            && events.update.is_none()
            && events.delete.is_none()
            && rules.is_empty()
            && aggregates.is_empty()
            && self.errors.len() == before
        {
            self.err(
                &join(key, "events"),
                "every event of this table is disabled and it has no rules: it would produce nothing; enable an event or remove the table",
            );
        }
        if self.errors.len() != before {
            return None;
        }
        let (schema, name) = qualified?;
        Some(TableConfig {
            schema,
            name,
            entity,
            id,
            columns,
            update_columns,
            events,
            rules,
            snapshot: t.snapshot.unwrap_or(false),
            context,
            aggregates,
        })
    }

    fn event_names(&mut self, key: &str, entity: &str, raw: RawEvents) -> EventNames {
        let mut one = |op: &str, value: Option<EventSuffix>, default: &str| -> Option<String> {
            match value {
                None | Some(EventSuffix::Enabled(true)) => Some(format!("{entity}.{default}")),
                Some(EventSuffix::Enabled(false)) => None,
                Some(EventSuffix::Suffix(s)) => {
                    if !is_event_name(&s) {
                        self.err(
                            &join(&join(key, "events"), op),
                            format!(
                                "bad event suffix \"{s}\": dot-separated parts of letters, digits, _ and -; it is appended to \"{entity}.\" (use false to disable)"
                            ),
                        );
                    }
                    Some(format!("{entity}.{s}"))
                }
            }
        };
        EventNames {
            insert: one("insert", raw.insert, "created"),
            update: one("update", raw.update, "updated"),
            delete: one("delete", raw.delete, "deleted"),
        }
    }

    fn contexts(&mut self, key: &str, raw: Vec<RawContext>) -> Vec<ContextConfig> {
        let mut out = Vec::new();
        for (j, c) in raw.into_iter().enumerate() {
            let ckey = index(&join(key, "context"), j);
            let name = self.required(&join(&ckey, "name"), c.name, "");
            if let Some(n) = &name
                && !is_ident(n)
            {
                self.err(
                    &join(&ckey, "name"),
                    format!("bad context name \"{n}\": use letters, digits and _"),
                );
            }
            let table_key = join(&ckey, "table");
            let table = self
                .required(
                    &table_key,
                    c.table,
                    ": e.g. table = \"public.organisations\"",
                )
                .and_then(|t| {
                    self.qualified_table(&table_key, &t)
                        .map(|(s, n)| format!("{s}.{n}"))
                });
            let key_key = join(&ckey, "key");
            let ckey_cols = self
                .required(
                    &key_key,
                    c.key,
                    ": the column(s) of this table holding the other row's key",
                )
                .and_then(|k| {
                    let list = match k {
                        OneOrMany::One(s) => vec![s],
                        OneOrMany::Many(v) => v,
                    };
                    self.name_list(&key_key, list, "key column")
                });
            let columns = c
                .columns
                .and_then(|cols| self.name_list(&join(&ckey, "columns"), cols, "column"));
            if let (Some(name), Some(table), Some(key)) = (name, table, ckey_cols) {
                out.push(ContextConfig {
                    name,
                    table,
                    key,
                    columns,
                });
            }
        }
        out
    }

    fn aggregates(&mut self, key: &str, raw: Vec<RawAggregate>) -> Vec<AggregateConfig> {
        let mut out = Vec::new();
        let mut ops: Vec<(AggregateOp, String)> = Vec::new();
        for (j, a) in raw.into_iter().enumerate() {
            let akey = index(&join(key, "aggregate"), j);
            let event = self.full_event_name(&join(&akey, "event"), a.event);
            let op = self.required(
                &join(&akey, "op"),
                a.op,
                ": \"insert\", \"update\" or \"delete\"",
            );
            let min_rows = a.min_rows.unwrap_or(DEFAULT_MIN_ROWS);
            if min_rows == 0 {
                self.err(&join(&akey, "min_rows"), "min_rows must be at least 1");
            }
            let max_rows = a.max_rows.unwrap_or(DEFAULT_MAX_ROWS);
            if !(1..=MAX_MAX_ROWS).contains(&max_rows) {
                self.err(
                    &join(&akey, "max_rows"),
                    format!("max_rows = {max_rows} is out of range 1..={MAX_MAX_ROWS} (rows of one bulk event, held in memory)"),
                );
            } else if max_rows < min_rows.max(1) {
                self.err(
                    &join(&akey, "max_rows"),
                    format!("max_rows ({max_rows}) must be at least min_rows ({min_rows})"),
                );
            }
            if let Some(op) = op {
                if let Some(first) = ops.iter().find(|(o, _)| *o == op) {
                    let first = self.describe_key(&join(&first.1, "op"));
                    self.err(
                        &join(&akey, "op"),
                        format!("this table already has an aggregate for op = \"{}\" ({first}); one per op", op.as_str()),
                    );
                } else {
                    ops.push((op, akey.clone()));
                }
            }
            if let (Some(event), Some(op)) = (event, op) {
                out.push(AggregateConfig {
                    event,
                    op,
                    min_rows,
                    max_rows: Some(max_rows),
                    replace: a.replace.unwrap_or(false),
                });
            }
        }
        out
    }
}
