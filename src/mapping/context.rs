//! Context (`[[tables.context]]`): the parent rows an event carries, read from the
//! source database when the event is ingested. This file holds the plan (what is read
//! for which table, parent chains followed) and the pure steps of resolving a batch:
//! the keys of each change, grouping them into one request per parent lookup, and
//! placing what was found. [`super::lookup`] builds the plan from the catalog and runs
//! the queries.
//!
//! Chains: when a context's parent table is itself a watched `[[tables]]` entry with
//! `[[tables.context]]` entries, those are followed from the parent row, and their
//! rows join the same `context` object under their own names (certificate ->
//! application -> organisation gives `context.application` and
//! `context.organisation`), up to [`MAX_DEPTH`] parents deep.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::pg::TableName;
use crate::source::decoder::Row;

/// Most parents in one chain (a certificate's application's organisation is 2).
pub const MAX_DEPTH: usize = crate::config::MAX_CONTEXT_DEPTH;

/// One parent column the lookup reads, and how its text form becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_name: String,
}

/// One `[[tables.context]]` entry, ready to run: its query, and the entries of its
/// parent table that are followed from the parent row.
#[derive(Debug, PartialEq)]
pub struct Lookup {
    /// Context name: the key under `context`.
    pub name: String,
    /// `schema.name` of the table whose row holds the key (a metric label).
    pub table: Arc<str>,
    /// The parent table.
    pub parent: TableName,
    /// Columns of the referencing row holding the parent's id, in id order.
    pub key: Vec<String>,
    /// Parent columns shown under the context name.
    pub columns: Vec<String>,
    /// Parent columns the query returns, in this order: the id columns first, then
    /// what `columns` and the followed entries' keys need.
    pub select: Vec<ParentColumn>,
    /// The parent table's own context entries.
    pub next: Vec<Arc<Lookup>>,
    /// The query: `$1` is a JSON array of id objects; it returns `select` as text.
    pub sql: String,
}

impl Lookup {
    /// Every context name this entry fills (its own and those of its chain).
    fn names<'a>(&'a self, out: &mut Vec<&'a str>) {
        out.push(&self.name);
        for n in &self.next {
            n.names(out);
        }
    }
}

/// The context entries of each watched table that has any.
#[derive(Debug, Default)]
pub struct ContextPlan {
    pub(crate) tables: HashMap<TableName, Arc<[Arc<Lookup>]>>,
}

impl ContextPlan {
    /// The keys `row` (a change's new row, or its old row for a delete) gives the
    /// context entries of `table`; `None` when the table has no context.
    pub fn keys(&self, table: &TableName, row: Option<&Row>) -> Option<ContextKeys> {
        let lookups = self.tables.get(table)?;
        let keys = lookups
            .iter()
            .map(|l| row.and_then(|r| key_values(&l.key, r)))
            .collect();
        Some(ContextKeys {
            lookups: lookups.clone(),
            keys,
        })
    }

    /// Whether any table has context.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// What a row change needs looked up: per context entry of its table, the parent's id
/// values, or `None` when the row has no parent (a key column is NULL) or the key is
/// unknown (not in a DELETE's key tuple): that context is then `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct ContextKeys {
    pub lookups: Arc<[Arc<Lookup>]>,
    pub keys: Vec<Option<Vec<Value>>>,
}

/// The values of `columns` in `row`; `None` when one is absent or NULL.
fn key_values(columns: &[String], row: &Row) -> Option<Vec<Value>> {
    columns
        .iter()
        .map(|c| row.get(c).filter(|v| !v.is_null()).cloned())
        .collect()
}

/// A key as text, equal for equal ids whatever JSON type each side gave a part (an
/// `int8` child column against a `text` id gives `42` and `"42"`).
pub fn key_text(values: &[Value]) -> String {
    let mut out = String::new();
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push('\u{1f}');
        }
        match v {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
    }
    out
}

/// One parent row wanted by one change.
#[derive(Debug, Clone)]
pub struct Request {
    /// Index of the change in the batch.
    pub change: usize,
    pub lookup: Arc<Lookup>,
    pub key: Vec<Value>,
}

/// The requests of one level grouped by lookup: each lookup's distinct keys, run as
/// one query.
#[derive(Debug)]
pub struct Group {
    pub lookup: Arc<Lookup>,
    pub keys: Vec<Vec<Value>>,
}

/// Parent rows found by one group's query, by [`key_text`] of their id.
pub type Found = HashMap<String, Row>;

/// Starts resolving a batch: each change's context with `null` under every name of
/// its chains (what is found replaces it), and the first level of requests.
pub fn start(changes: &[Option<&ContextKeys>]) -> (Vec<Option<Row>>, Vec<Request>) {
    let mut out = Vec::with_capacity(changes.len());
    let mut requests = Vec::new();
    for (i, keys) in changes.iter().enumerate() {
        let Some(keys) = keys else {
            out.push(None);
            continue;
        };
        let mut names = Vec::new();
        for l in keys.lookups.iter() {
            l.names(&mut names);
        }
        out.push(Some(
            names
                .into_iter()
                .map(|n| (n.to_owned(), Value::Null))
                .collect(),
        ));
        for (l, key) in keys.lookups.iter().zip(&keys.keys) {
            if let Some(key) = key {
                requests.push(Request {
                    change: i,
                    lookup: l.clone(),
                    key: key.clone(),
                });
            }
        }
    }
    (out, requests)
}

/// Groups `requests` by lookup, each key once, in first-seen order.
pub fn group(requests: &[Request]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut seen: HashMap<(usize, String), ()> = HashMap::new();
    for r in requests {
        let ptr = Arc::as_ptr(&r.lookup) as usize;
        if seen.insert((ptr, key_text(&r.key)), ()).is_some() {
            continue;
        }
        match groups
            .iter_mut()
            .find(|g| Arc::ptr_eq(&g.lookup, &r.lookup))
        {
            Some(g) => g.keys.push(r.key.clone()),
            None => groups.push(Group {
                lookup: r.lookup.clone(),
                keys: vec![r.key.clone()],
            }),
        }
    }
    groups
}

/// Places what `groups`' queries found (`found[i]` for `groups[i]`) into `out`, and
/// returns the next level's requests (the followed entries of each parent found).
/// `missing` is called once per request whose parent was not found.
pub fn place(
    requests: Vec<Request>,
    groups: &[Group],
    found: &[Found],
    out: &mut [Option<Row>],
    mut missing: impl FnMut(&Lookup),
) -> Vec<Request> {
    let mut next = Vec::new();
    for r in requests {
        let row = groups
            .iter()
            .position(|g| Arc::ptr_eq(&g.lookup, &r.lookup))
            .and_then(|i| found.get(i))
            .and_then(|f| f.get(&key_text(&r.key)));
        let Some(row) = row else {
            missing(&r.lookup);
            continue;
        };
        let shown: Map<String, Value> = r
            .lookup
            .columns
            .iter()
            .filter_map(|c| row.get(c).map(|v| (c.clone(), v.clone())))
            .collect();
        if let Some(context) = &mut out[r.change] {
            context.insert(r.lookup.name.clone(), Value::Object(shown));
        }
        for n in &r.lookup.next {
            if let Some(key) = key_values(&n.key, row) {
                next.push(Request {
                    change: r.change,
                    lookup: n.clone(),
                    key,
                });
            }
        }
    }
    next
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

    fn lookup(name: &str, key: &str, columns: &[&str], next: Vec<Arc<Lookup>>) -> Arc<Lookup> {
        Arc::new(Lookup {
            name: name.into(),
            table: "public.child".into(),
            parent: TableName {
                schema: "public".into(),
                name: format!("{name}s"),
            },
            key: vec![key.into()],
            columns: columns.iter().map(|c| c.to_string()).collect(),
            select: Vec::new(),
            next,
            sql: String::new(),
        })
    }

    /// certificate -> application -> organisation.
    fn chain() -> Arc<[Arc<Lookup>]> {
        let org = lookup("organisation", "org_id", &["id", "name"], Vec::new());
        let app = lookup("application", "app_id", &["id", "name"], vec![org]);
        Arc::from(vec![app])
    }

    fn keys(lookups: &Arc<[Arc<Lookup>]>, app_id: Option<i64>) -> ContextKeys {
        ContextKeys {
            lookups: lookups.clone(),
            keys: vec![app_id.map(|id| vec![json!(id)])],
        }
    }

    #[test]
    fn key_text_equates_numbers_and_strings_and_separates_parts() {
        assert_eq!(key_text(&[json!(42)]), key_text(&[json!("42")]));
        assert_ne!(
            key_text(&[json!("a"), json!("b")]),
            key_text(&[json!("ab"), json!("")])
        );
    }

    #[test]
    fn a_null_or_absent_key_column_gives_no_key() {
        let plan = ContextPlan {
            tables: HashMap::from([(
                TableName {
                    schema: "public".into(),
                    name: "certificates".into(),
                },
                chain(),
            )]),
        };
        let t = TableName {
            schema: "public".into(),
            name: "certificates".into(),
        };
        let k = plan.keys(&t, Some(&row(json!({"app_id": 3})))).unwrap();
        assert_eq!(k.keys, vec![Some(vec![json!(3)])]);
        let k = plan.keys(&t, Some(&row(json!({"app_id": null})))).unwrap();
        assert_eq!(k.keys, vec![None]);
        let k = plan.keys(&t, Some(&row(json!({"id": 1})))).unwrap();
        assert_eq!(k.keys, vec![None]);
        let other = TableName {
            schema: "public".into(),
            name: "users".into(),
        };
        assert!(plan.keys(&other, None).is_none());
    }

    #[test]
    fn a_batch_asks_each_parent_once_and_follows_chains() {
        let lookups = chain();
        let (k1, k2, k3, none) = (
            keys(&lookups, Some(1)),
            keys(&lookups, Some(1)),
            keys(&lookups, Some(2)),
            keys(&lookups, None),
        );
        let changes = [Some(&k1), None, Some(&k2), Some(&k3), Some(&none)];
        let (mut out, requests) = start(&changes);
        assert_eq!(out[1], None);
        assert_eq!(
            out[4],
            Some(row(json!({"application": null, "organisation": null})))
        );
        let groups = group(&requests);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].keys, vec![vec![json!(1)], vec![json!(2)]]);

        // Application 1 exists (organisation 10); application 2 does not.
        let found = vec![Found::from([(
            "1".to_owned(),
            row(json!({"id": 1, "name": "app", "org_id": 10, "secret": "x"})),
        )])];
        let mut missing = Vec::new();
        let next = place(requests, &groups, &found, &mut out, |l| {
            missing.push(l.name.clone())
        });
        assert_eq!(missing, ["application"]);
        let groups = group(&next);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].lookup.name, "organisation");
        assert_eq!(groups[0].keys, vec![vec![json!(10)]]);
        let found = vec![Found::from([(
            "10".to_owned(),
            row(json!({"id": 10, "name": "Acme"})),
        )])];
        let next = place(next, &groups, &found, &mut out, |_| panic!("missing"));
        assert!(next.is_empty());
        let both = row(json!({
            "application": {"id": 1, "name": "app"},
            "organisation": {"id": 10, "name": "Acme"},
        }));
        assert_eq!(out[0].as_ref(), Some(&both));
        assert_eq!(out[2].as_ref(), Some(&both));
        assert_eq!(
            out[3],
            Some(row(json!({"application": null, "organisation": null})))
        );
    }
}
