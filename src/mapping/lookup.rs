//! Context lookups against the source database: the [`ContextPlan`] built from the
//! config and the catalog (at start, on reload and by `walhook check`, each lookup's
//! query tried once), and [`resolve`], which reads a batch's parent rows with one
//! query per context entry and chain level, never one per event.

use std::collections::HashMap;
use std::sync::Arc;

use metrics::counter;
use serde_json::{Map, Value};
use tokio_postgres::Client;
use tokio_postgres::types::Json;

use super::context::{
    ContextKeys, ContextPlan, Found, Group, Lookup, MAX_DEPTH, ParentColumn, group, key_text,
    place, start,
};
use super::error::{MappingError, TableError};
use crate::config::{Config, ContextConfig};
use crate::pg::{TableName, quote_ident};
use crate::source::decoder::Row;
use crate::source::values::to_json;
use crate::telemetry::{CONTEXT_MISSING_TOTAL, label};

/// What the catalog says of a parent table.
struct ParentInfo {
    columns: Vec<ParentColumn>,
    primary_key: Vec<String>,
}

/// Builds the context plan of `config`'s tables against the catalog of `sql`'s
/// database, and runs each lookup's query once with no keys (so a missing SELECT
/// privilege or a type that cannot be compared shows now, not at the first event).
/// Reports every problem, each naming its config key.
pub async fn plan(sql: &Client, config: &Config) -> Result<ContextPlan, MappingError> {
    let mut parents: HashMap<String, Option<ParentInfo>> = HashMap::new();
    for t in &config.tables {
        for c in &t.context {
            if !parents.contains_key(&c.table) {
                let info = inspect(sql, &c.table).await.map_err(|e| MappingError {
                    errors: vec![TableError::ContextQuery {
                        key: "tables".into(),
                        table: c.table.clone(),
                        reason: crate::pg::ErrorChain(&e).to_string(),
                    }],
                })?;
                parents.insert(c.table.clone(), info);
            }
        }
    }
    let mut builder = Builder {
        config,
        parents: &parents,
        errors: Vec::new(),
    };
    let mut tables: HashMap<TableName, Arc<[Arc<Lookup>]>> = HashMap::new();
    for (i, t) in config.tables.iter().enumerate() {
        if t.context.is_empty() {
            continue;
        }
        let name = TableName {
            schema: t.schema.clone(),
            name: t.name.clone(),
        };
        let qualified: Arc<str> = Arc::from(t.qualified_name());
        let lookups: Vec<Arc<Lookup>> = t
            .context
            .iter()
            .enumerate()
            .filter_map(|(j, c)| {
                builder.lookup(&format!("tables[{i}].context[{j}]"), c, &qualified, 1)
            })
            .collect();
        tables.insert(name, Arc::from(lookups));
    }
    let mut errors = builder.errors;
    if errors.is_empty() {
        for (i, t) in config.tables.iter().enumerate() {
            let Some(lookups) = tables.get(&TableName {
                schema: t.schema.clone(),
                name: t.name.clone(),
            }) else {
                continue;
            };
            for (j, l) in lookups.iter().enumerate() {
                try_query(sql, &format!("tables[{i}].context[{j}]"), l, &mut errors).await;
            }
        }
    }
    if errors.is_empty() {
        Ok(ContextPlan { tables })
    } else {
        Err(MappingError { errors })
    }
}

/// Runs `l`'s query (and its chain's) with no keys; records why it fails.
async fn try_query(sql: &Client, key: &str, l: &Lookup, errors: &mut Vec<TableError>) {
    let empty: Vec<Map<String, Value>> = Vec::new();
    if let Err(e) = sql.query(&l.sql, &[&Json(&empty)]).await {
        errors.push(TableError::ContextQuery {
            key: key.to_owned(),
            table: l.parent.to_string(),
            reason: e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| crate::pg::ErrorChain(&e).to_string()),
        });
        return;
    }
    for n in &l.next {
        Box::pin(try_query(sql, key, n, errors)).await;
    }
}

/// The columns (with types) and primary key of `qualified`; `None` when there is no
/// such table or view.
async fn inspect(
    sql: &Client,
    qualified: &str,
) -> Result<Option<ParentInfo>, tokio_postgres::Error> {
    let (schema, name) = qualified.split_once('.').unwrap_or(("public", qualified));
    let Some(row) = sql
        .query_opt(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
            &[&schema, &name],
        )
        .await?
    else {
        return Ok(None);
    };
    let oid: u32 = row.get(0);
    let columns = sql
        .query(
            "SELECT a.attname::text, a.atttypid, t.typname::text FROM pg_attribute a
             JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| ParentColumn {
            name: r.get(0),
            type_oid: r.get(1),
            type_name: r.get(2),
        })
        .collect();
    let primary_key = sql
        .query(
            "SELECT a.attname::text FROM pg_index i
             JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    Ok(Some(ParentInfo {
        columns,
        primary_key,
    }))
}

struct Builder<'a> {
    config: &'a Config,
    parents: &'a HashMap<String, Option<ParentInfo>>,
    errors: Vec<TableError>,
}

impl Builder<'_> {
    /// The lookup of entry `c` (config key `key`) on rows of `table`, `depth` parents
    /// deep, with its parent's own entries; `None` after recording a problem.
    fn lookup(
        &mut self,
        key: &str,
        c: &ContextConfig,
        table: &Arc<str>,
        depth: usize,
    ) -> Option<Arc<Lookup>> {
        let err = |e: &mut Vec<TableError>, what: TableError| e.push(what);
        let Some(Some(info)) = self.parents.get(&c.table) else {
            err(
                &mut self.errors,
                TableError::ContextParent {
                    key: format!("{key}.table"),
                    table: c.table.clone(),
                },
            );
            return None;
        };
        let (schema, name) = c.table.split_once('.').unwrap_or(("public", &c.table));
        let parent = TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        };
        // The parent's id: its `id` when it is a watched table with one, else its
        // primary key.
        let watched = self
            .config
            .tables
            .iter()
            .find(|t| t.schema == parent.schema && t.name == parent.name);
        let id = match watched.and_then(|t| t.id.clone()) {
            Some(id) => id,
            None if !info.primary_key.is_empty() => info.primary_key.clone(),
            None => {
                err(
                    &mut self.errors,
                    TableError::ContextNoId {
                        key: format!("{key}.table"),
                        table: c.table.clone(),
                    },
                );
                return None;
            }
        };
        if id.len() != c.key.len() {
            err(
                &mut self.errors,
                TableError::ContextKeyCount {
                    key: format!("{key}.key"),
                    table: c.table.clone(),
                    id: id.join(", "),
                    expected: id.len(),
                    count: c.key.len(),
                },
            );
            return None;
        }
        let columns = c
            .columns
            .clone()
            .unwrap_or_else(|| info.columns.iter().map(|c| c.name.clone()).collect());
        let next: Vec<Arc<Lookup>> = match watched {
            // Config validation refuses loops and chains deeper than the limit.
            Some(w) if depth < MAX_DEPTH => {
                let i = self
                    .config
                    .tables
                    .iter()
                    .position(|t| std::ptr::eq(t, w))
                    .unwrap_or_default();
                let parent_name: Arc<str> = Arc::from(w.qualified_name());
                w.context
                    .iter()
                    .enumerate()
                    .filter_map(|(j, n)| {
                        self.lookup(
                            &format!("tables[{i}].context[{j}]"),
                            n,
                            &parent_name,
                            depth + 1,
                        )
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let mut wanted: Vec<(&str, String)> = Vec::new();
        for col in &id {
            wanted.push((col, format!("{key}.table")));
        }
        for col in &columns {
            wanted.push((col, format!("{key}.columns")));
        }
        for n in &next {
            for col in &n.key {
                wanted.push((col, format!("{key}.table")));
            }
        }
        let mut select: Vec<ParentColumn> = Vec::new();
        for (col, ckey) in wanted {
            if select.iter().any(|s| s.name == col) {
                continue;
            }
            match info.columns.iter().find(|p| p.name == col) {
                Some(p) => select.push(p.clone()),
                None => err(
                    &mut self.errors,
                    TableError::ContextColumn {
                        key: ckey,
                        table: c.table.clone(),
                        column: col.to_owned(),
                    },
                ),
            }
        }
        if select.len() < id.len() {
            return None;
        }
        let sql = query(&parent, &select, id.len());
        Some(Arc::new(Lookup {
            name: c.name.clone(),
            table: table.clone(),
            parent,
            key: c.key.clone(),
            columns,
            select,
            next,
            sql,
        }))
    }
}

/// `SELECT <select>::text FROM parent WHERE (<id>) IN (<ids of $1>)`: the first
/// `id_len` columns of `select` are the id. `$1` is a JSON array of objects keyed by
/// id column; `json_populate_recordset` types them as the parent's columns, so the
/// comparison uses the parent's id index.
fn query(parent: &TableName, select: &[ParentColumn], id_len: usize) -> String {
    let cols: Vec<String> = select
        .iter()
        .map(|c| format!("p.{}::text", quote_ident(&c.name)))
        .collect();
    let id: Vec<String> = select[..id_len]
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    let p_id: Vec<String> = id.iter().map(|c| format!("p.{c}")).collect();
    let k_id: Vec<String> = id.iter().map(|c| format!("k.{c}")).collect();
    let table = parent.quoted();
    format!(
        "SELECT {} FROM {table} p WHERE ({}) IN (SELECT {} FROM json_populate_recordset(NULL::{table}, $1::json) k)",
        cols.join(", "),
        p_id.join(", "),
        k_id.join(", "),
    )
}

/// The context of each change of a batch (`None` where its table has none), read with
/// one query per context entry and chain level. A parent that is not found gives
/// `null` under its name (and under the names of its chain) and counts in
/// `walhook_context_missing_total`.
pub async fn resolve(
    sql: &Client,
    changes: &[Option<&ContextKeys>],
) -> Result<Vec<Option<Row>>, tokio_postgres::Error> {
    let (mut out, mut requests) = start(changes);
    while !requests.is_empty() {
        let groups = group(&requests);
        let mut found = Vec::with_capacity(groups.len());
        for g in &groups {
            found.push(fetch(sql, g).await?);
        }
        requests = place(requests, &groups, &found, &mut out, |l| {
            counter!(CONTEXT_MISSING_TOTAL, label::TABLE => l.table.to_string(), label::CONTEXT => l.name.clone())
                .increment(1);
        });
    }
    Ok(out)
}

/// Runs one group's query: its parent rows by id.
async fn fetch(sql: &Client, g: &Group) -> Result<Found, tokio_postgres::Error> {
    let l = &g.lookup;
    let id_len = l.key.len();
    let ids: Vec<Map<String, Value>> = g
        .keys
        .iter()
        .map(|k| {
            l.select[..id_len]
                .iter()
                .zip(k)
                .map(|(c, v)| (c.name.clone(), v.clone()))
                .collect()
        })
        .collect();
    let rows = sql.query(&l.sql, &[&Json(&ids)]).await?;
    let mut found = Found::with_capacity(rows.len());
    for r in rows {
        let mut row = Row::with_capacity(l.select.len());
        for (i, c) in l.select.iter().enumerate() {
            let v = match r.get::<_, Option<&str>>(i) {
                Some(text) => to_json(c.type_oid, Some(&c.type_name), text),
                None => Value::Null,
            };
            row.insert(c.name.clone(), v);
        }
        let id: Vec<Value> = l.select[..id_len]
            .iter()
            .map(|c| row.get(&c.name).cloned().unwrap_or(Value::Null))
            .collect();
        found.insert(key_text(&id), row);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_compares_typed_ids_and_reads_text() {
        let col = |n: &str| ParentColumn {
            name: n.into(),
            type_oid: 23,
            type_name: "int4".into(),
        };
        let parent = TableName {
            schema: "public".into(),
            name: "Orgs".into(),
        };
        assert_eq!(
            query(&parent, &[col("id"), col("region"), col("name")], 2),
            r#"SELECT p."id"::text, p."region"::text, p."name"::text FROM "public"."Orgs" p WHERE (p."id", p."region") IN (SELECT k."id", k."region" FROM json_populate_recordset(NULL::"public"."Orgs", $1::json) k)"#
        );
    }
}
