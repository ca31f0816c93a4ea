//! Bulk events per source transaction (`[[tables.aggregate]]`), decided row by row
//! as a transaction streams in: a pure state machine, no I/O.
//!
//! The row changes of one transaction go in, in order ([`TxnAggregates::row`]), then
//! its commit ([`TxnAggregates::commit`]); what to hand on comes out ([`Emit`]): row
//! changes as they are, or a [`Bulk`] part, i.e. up to `max_rows` row changes of one
//! aggregate and the one bulk event that lists them.
//!
//! - A row change of a table and op with an aggregate is held back until the
//!   transaction has `min_rows` of them (then they are bulk rows) or commits with
//!   fewer (then they go on as row changes, at the commit). From the `min_rows`-th on,
//!   every row of that aggregate in the transaction is a bulk row; a part goes out once
//!   it has `max_rows` rows, the rest at the commit. So at most `max_rows` rows per
//!   aggregate are held (G6), whatever the transaction's size.
//! - Each bulk row still consumes one revision of its entity (G3); with `replace =
//!   false` it keeps its own events, which share that revision, and with `replace =
//!   true` it has none: the bulk event is where its revision shows.
//! - Per-entity order: before a row of an entity that a part holds back goes on (a
//!   row of another table or op, or of another aggregate), that part goes on first: a
//!   part short of `max_rows` if the transaction already has `min_rows`, otherwise its
//!   rows as row changes (the aggregate then counts again from zero). Revisions thus
//!   follow the rows' order within the transaction.
//! - Exactly once across a crash: what comes out is a function of the transaction's
//!   rows up to the current one (and of the config). Whatever came out while feeding
//!   rows `1..=k` was handed on with a position at or below `k`; after a restart at a
//!   stored position `(commit, k)`, feeding rows `1..=k` again and discarding what
//!   comes out rebuilds the state, and what comes out after is exactly what was not
//!   stored (see the `replay_*` tests).
//!
//! Wiring (`daemon::source_task`): the stream hands the rows of a partly stored
//! transaction that it skips on the first connection after a start to the source task
//! marked as replayed (`ReplicationStream::replay_covered_rows`), which feeds them here
//! and drops the output; a [`Bulk`] goes to ingest as one message, so its rows and its
//! event land in one store batch: each row consumes one revision even without events
//! (`replace = true`), and the store fills the bulk event's `data.items` revisions in
//! (`store::ingest::fill_bulk`). The bulk event's own entity is the table's entity with
//! an id naming the part, `<table>/<op>/<commit LSN>/<part>`, at revision 1, so it
//! never waits behind, or holds up, the entities it lists.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::{AggregateOp, DEFAULT_MAX_ROWS, TableConfig};
use crate::source::decoder::{Op, Row, TableName};

use super::{ContextKeys, EventDraft};

/// One aggregate of one table, ready to use.
#[derive(Debug, Clone)]
struct Spec {
    table: Arc<TableName>,
    op: Op,
    event: String,
    entity: Arc<str>,
    min_rows: u64,
    max_rows: u64,
    replace: bool,
}

/// The aggregates of a config.
#[derive(Debug, Clone, Default)]
pub struct Aggregates {
    specs: Vec<Spec>,
}

impl Aggregates {
    /// The aggregates of `tables`. Validation makes `1 <= min_rows <= max_rows`.
    pub fn new(tables: &[TableConfig]) -> Aggregates {
        let mut specs = Vec::new();
        for t in tables {
            for a in &t.aggregates {
                specs.push(Spec {
                    table: Arc::new(TableName {
                        schema: t.schema.clone(),
                        name: t.name.clone(),
                    }),
                    op: match a.op {
                        AggregateOp::Insert => Op::Insert,
                        AggregateOp::Update => Op::Update,
                        AggregateOp::Delete => Op::Delete,
                    },
                    event: a.event.clone(),
                    entity: Arc::from(t.entity.as_str()),
                    min_rows: a.min_rows.max(1),
                    max_rows: a.max_rows.unwrap_or(DEFAULT_MAX_ROWS).max(a.min_rows),
                    replace: a.replace,
                });
            }
        }
        Aggregates { specs }
    }

    /// Whether there are none (then nothing needs to go through a [`TxnAggregates`]).
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    fn find(&self, table: &TableName, op: Op) -> Option<usize> {
        self.specs
            .iter()
            .position(|s| s.op == op && *s.table == *table)
    }
}

/// One row change that produced events: its place in the transaction (from 1), its
/// entity id, and its drafts (none for a bulk row with `replace = true`).
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    /// The row's number within its transaction, from 1.
    pub index: u64,
    /// The entity (of the drafts).
    pub entity: Arc<str>,
    /// The entity id (of the drafts).
    pub entity_id: String,
    /// The row's events; empty for a bulk row that the bulk event replaces.
    pub drafts: Vec<EventDraft>,
    /// What the context stage reads for the row's events (`None` when its table has
    /// no context, or when it has no events).
    pub context_keys: Option<ContextKeys>,
}

/// A part of an aggregate's rows in one transaction, and its bulk event.
#[derive(Debug, Clone, PartialEq)]
pub struct Bulk {
    /// The bulk event's full name.
    pub event: String,
    /// The entity of the rows (and of the bulk event).
    pub entity: Arc<str>,
    /// The rows' table.
    pub table: Arc<TableName>,
    /// The aggregated op.
    pub op: Op,
    /// Which part of this aggregate in this transaction, from 1.
    pub part: u32,
    /// The rows, in transaction order; each consumes one revision of its entity.
    pub rows: Vec<RowChange>,
}

impl Bulk {
    /// The bulk event's `data`, given the revision each row got (in order):
    /// `{"op": "delete", "part": 1, "count": 3, "items": [{"id": "42", "revision":
    /// 7}, ...]}`.
    pub fn data(&self, revisions: &[i64]) -> Row {
        let items: Vec<Value> = self
            .rows
            .iter()
            .zip(revisions)
            .map(|(r, rev)| json!({"id": r.entity_id, "revision": rev}))
            .collect();
        let mut data = Row::new();
        data.insert("op".into(), Value::from(self.op.as_str()));
        data.insert("part".into(), Value::from(self.part));
        data.insert("count".into(), Value::from(self.rows.len()));
        data.insert("items".into(), Value::Array(items));
        data
    }
}

/// What to hand on, in this order.
#[derive(Debug, Clone, PartialEq)]
pub enum Emit {
    /// A row change with its events, as without aggregates.
    Row(RowChange),
    /// A bulk part: its rows' revisions, then its bulk event.
    Bulk(Bulk),
}

/// An aggregate's rows held back in the current transaction.
#[derive(Debug, Default)]
struct Group {
    rows: Vec<RowChange>,
    /// The entities of `rows`.
    keys: HashSet<(Arc<str>, String)>,
    /// The transaction has `min_rows` rows of this aggregate: held rows are bulk rows.
    qualified: bool,
    /// Rows counted towards `min_rows` (reset when held rows go on as row changes).
    counted: u64,
    /// Parts emitted so far.
    parts: u32,
}

/// The aggregate state of the transaction being streamed. Start a new one at each
/// Begin (or reuse one after [`TxnAggregates::commit`]).
#[derive(Debug, Default)]
pub struct TxnAggregates {
    /// One group per spec, by spec index.
    groups: Vec<Group>,
}

impl TxnAggregates {
    /// Takes the row change at `index` (from 1) of the transaction with the drafts the
    /// mapper made of it (a change without drafts consumes no revision and is not
    /// passed) and its context keys, which stay with its events. Pushes what goes on
    /// now onto `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        aggs: &Aggregates,
        index: u64,
        table: &TableName,
        op: Op,
        drafts: Vec<EventDraft>,
        context_keys: Option<ContextKeys>,
        out: &mut Vec<Emit>,
    ) {
        let Some(first) = drafts.first() else {
            return;
        };
        if self.groups.len() < aggs.specs.len() {
            self.groups.resize_with(aggs.specs.len(), Group::default);
        }
        let row = RowChange {
            index,
            entity: first.entity.clone(),
            entity_id: first.entity_id.clone(),
            drafts,
            context_keys,
        };
        let key = (row.entity.clone(), row.entity_id.clone());
        let joins = aggs.find(table, op);
        // Held rows of this entity in other groups go on first.
        for i in 0..self.groups.len() {
            if Some(i) != joins && self.groups[i].keys.contains(&key) {
                self.flush(aggs, i, out);
            }
        }
        let Some(i) = joins else {
            out.push(Emit::Row(row));
            return;
        };
        let spec = &aggs.specs[i];
        let group = &mut self.groups[i];
        group.keys.insert(key);
        group.rows.push(row);
        group.counted += 1;
        if !group.qualified && group.counted >= spec.min_rows {
            group.qualified = true;
        }
        if group.qualified && group.rows.len() as u64 >= spec.max_rows {
            self.flush(aggs, i, out);
        }
    }

    /// The transaction committed: everything held goes on, first the rows of
    /// aggregates short of `min_rows` as row changes in row order, then the last
    /// part of each qualified aggregate in config order (an entity is held by one
    /// group at most, so this keeps each entity's order). Empty afterwards.
    pub fn commit(&mut self, aggs: &Aggregates, out: &mut Vec<Emit>) {
        let mut rows: Vec<RowChange> = Vec::new();
        for group in self.groups.iter_mut().filter(|g| !g.qualified) {
            rows.append(&mut group.rows);
        }
        rows.sort_by_key(|r| r.index);
        out.extend(rows.into_iter().map(Emit::Row));
        for (i, group) in self.groups.iter_mut().enumerate() {
            if group.qualified && !group.rows.is_empty() {
                out.push(Emit::Bulk(take_part(&aggs.specs[i], group)));
            }
        }
        self.groups.clear();
    }

    /// Sends group `i`'s held rows on: as a bulk part when the transaction has
    /// `min_rows` of them, otherwise as row changes (counting starts again).
    fn flush(&mut self, aggs: &Aggregates, i: usize, out: &mut Vec<Emit>) {
        let group = &mut self.groups[i];
        if group.rows.is_empty() {
            return;
        }
        if group.qualified {
            let bulk = take_part(&aggs.specs[i], group);
            out.push(Emit::Bulk(bulk));
        } else {
            group.keys.clear();
            group.counted = 0;
            out.extend(group.rows.drain(..).map(Emit::Row));
        }
    }
}

fn take_part(spec: &Spec, group: &mut Group) -> Bulk {
    group.parts += 1;
    group.keys.clear();
    let mut rows = std::mem::take(&mut group.rows);
    if spec.replace {
        for r in &mut rows {
            r.drafts.clear();
            // No events, so no context to read.
            r.context_keys = None;
        }
    }
    Bulk {
        event: spec.event.clone(),
        entity: spec.entity.clone(),
        table: spec.table.clone(),
        op: spec.op,
        part: group.parts,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::tables;

    fn aggs(extra: &str) -> Aggregates {
        Aggregates::new(&tables(&format!(
            "[[tables]]\ntable = \"public.users\"\nentity = \"user\"\n[[tables.aggregate]]\nevent = \"user.bulk_deleted\"\nop = \"delete\"\n{extra}\n[[tables]]\ntable = \"public.user_roles\"\nentity = \"user\"\nid = \"user_id\"\n"
        )))
    }

    fn users() -> TableName {
        TableName {
            schema: "public".into(),
            name: "users".into(),
        }
    }

    fn roles() -> TableName {
        TableName {
            schema: "public".into(),
            name: "user_roles".into(),
        }
    }

    fn draft(id: u64, event: &str, table: &TableName) -> Vec<EventDraft> {
        vec![EventDraft {
            event_type: event.into(),
            entity: Arc::from("user"),
            entity_id: id.to_string(),
            data: Row::new(),
            json: None,
            previous: None,
            changed: None,
            table: Arc::new(table.clone()),
        }]
    }

    /// A transaction's rows: (table, op, entity id).
    type Txn = Vec<(TableName, Op, u64)>;

    /// What each row (1..) and the commit (index rows + 1) emit.
    fn run(a: &Aggregates, txn: &Txn) -> Vec<(u64, Emit)> {
        let mut state = TxnAggregates::default();
        let mut all = Vec::new();
        let mut out = Vec::new();
        for (i, (table, op, id)) in txn.iter().enumerate() {
            let event = format!("user.{}", op.as_str());
            state.row(
                a,
                i as u64 + 1,
                table,
                *op,
                draft(*id, &event, table),
                None,
                &mut out,
            );
            all.extend(out.drain(..).map(|e| (i as u64 + 1, e)));
        }
        state.commit(a, &mut out);
        all.extend(out.drain(..).map(|e| (txn.len() as u64 + 1, e)));
        all
    }

    /// A short description: `r5` a row change of row 5 (with events), `B2[1-200]` part 2
    /// of rows 1 to 200 (`B2[..]r` when the rows keep their events).
    fn describe(emits: &[(u64, Emit)]) -> Vec<String> {
        emits
            .iter()
            .map(|(_, e)| match e {
                Emit::Row(r) => format!("r{}", r.index),
                Emit::Bulk(b) => format!(
                    "B{}[{}-{}]{}",
                    b.part,
                    b.rows[0].index,
                    b.rows.last().unwrap().index,
                    if b.rows[0].drafts.is_empty() { "" } else { "r" }
                ),
            })
            .collect()
    }

    fn deletes(n: u64) -> Txn {
        (1..=n).map(|i| (users(), Op::Delete, i)).collect()
    }

    #[test]
    fn a_bulk_delete_is_one_bulk_event_listing_every_row() {
        let a = aggs("replace = true");
        let emits = run(&a, &deletes(500));
        assert_eq!(describe(&emits), ["B1[1-500]"]);
        let (at, Emit::Bulk(b)) = &emits[0] else {
            panic!()
        };
        assert_eq!(*at, 501, "decided at the commit");
        assert_eq!(b.event, "user.bulk_deleted");
        let revisions: Vec<i64> = (1..=500).map(|i| i + 10).collect();
        let data = b.data(&revisions);
        assert_eq!(data["count"], 500);
        assert_eq!(data["op"], "delete");
        assert_eq!(data["items"][0], json!({"id": "1", "revision": 11}));
        assert_eq!(data["items"][499], json!({"id": "500", "revision": 510}));
    }

    #[test]
    fn replace_false_keeps_the_row_events_before_the_bulk_event() {
        let emits = run(&aggs("replace = false"), &deletes(3));
        assert_eq!(describe(&emits), ["B1[1-3]r"]);
    }

    #[test]
    fn max_rows_splits_and_bounds_what_is_held() {
        let emits = run(&aggs("replace = true\nmax_rows = 200"), &deletes(500));
        assert_eq!(
            describe(&emits),
            ["B1[1-200]", "B2[201-400]", "B3[401-500]"]
        );
        let at: Vec<u64> = emits.iter().map(|(at, _)| *at).collect();
        assert_eq!(at, [200, 400, 501], "a full part goes on at once");
    }

    #[test]
    fn below_min_rows_only_row_events_at_the_commit() {
        let a = aggs("min_rows = 3\nreplace = true");
        let mut txn = deletes(2);
        txn.push((users(), Op::Insert, 9));
        let emits = run(&a, &txn);
        assert_eq!(describe(&emits), ["r3", "r1", "r2"]);
        assert_eq!(emits[1].0, 4, "held rows go on at the commit");
        // Defaults: min_rows 2, so one row is a plain row event.
        assert_eq!(describe(&run(&aggs(""), &deletes(1))), ["r1"]);
        assert_eq!(describe(&run(&aggs(""), &deletes(2))), ["B1[1-2]r"]);
    }

    #[test]
    fn another_change_of_a_held_entity_sends_the_held_rows_first() {
        // User 2 is deleted (held), then gets a role row: the held deletes go on
        // first, so user 2's revisions follow the transaction's order.
        let a = aggs("min_rows = 3\nreplace = true");
        let txn = vec![
            (users(), Op::Delete, 1),
            (users(), Op::Delete, 2),
            (roles(), Op::Insert, 2),
            (users(), Op::Delete, 3),
            (users(), Op::Delete, 4),
            (users(), Op::Delete, 5),
            (roles(), Op::Insert, 4),
            (users(), Op::Delete, 6),
        ];
        assert_eq!(
            describe(&run(&a, &txn)),
            // Not yet qualified at row 3: rows 1-2 go on as rows, counting restarts;
            // qualified at row 6, so row 7 cuts a short part.
            ["r1", "r2", "r3", "B1[4-6]", "r7", "B2[8-8]"]
        );
    }

    #[test]
    fn other_tables_and_ops_pass_at_once() {
        let a = aggs("");
        let txn = vec![
            (users(), Op::Delete, 1),
            (roles(), Op::Delete, 7),
            (users(), Op::Update, 8),
            (users(), Op::Delete, 2),
        ];
        assert_eq!(describe(&run(&a, &txn)), ["r2", "r3", "B1[1-4]r"]);
    }

    /// A crash after the store took everything emitted at or below row `k`: a restart
    /// feeds rows 1..=k again (discarding what comes out) and goes on. Together, the
    /// stored part and the restarted run are exactly the uninterrupted run.
    #[test]
    fn replay_after_a_crash_at_any_row_emits_each_thing_exactly_once() {
        let mut txn = deletes(7);
        txn.insert(3, (roles(), Op::Insert, 2));
        txn.insert(5, (roles(), Op::Insert, 50));
        for config in [
            "replace = true\nmax_rows = 3",
            "min_rows = 4\nmax_rows = 5",
            "",
        ] {
            let a = aggs(config);
            let whole = run(&a, &txn);
            for k in 0..=txn.len() as u64 {
                let mut state = TxnAggregates::default();
                let mut out = Vec::new();
                let mut after = Vec::new();
                for (i, (table, op, id)) in txn.iter().enumerate() {
                    let index = i as u64 + 1;
                    let event = format!("user.{}", op.as_str());
                    state.row(
                        &a,
                        index,
                        table,
                        *op,
                        draft(*id, &event, table),
                        None,
                        &mut out,
                    );
                    if index <= k {
                        out.clear();
                    } else {
                        after.extend(out.drain(..).map(|e| (index, e)));
                    }
                }
                state.commit(&a, &mut out);
                after.extend(out.drain(..).map(|e| (txn.len() as u64 + 1, e)));
                let stored: Vec<(u64, Emit)> =
                    whole.iter().filter(|(at, _)| *at <= k).cloned().collect();
                let mut joined = stored;
                joined.extend(after);
                assert_eq!(joined, whole, "{config:?}, crash after row {k}");
            }
        }
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::load_str;

    fn load(aggregates: &str) -> Result<crate::config::Config, String> {
        let toml = format!(
            "[source]\nurl = \"postgres://x/app\"\n[[tables]]\ntable = \"public.users\"\nentity = \"user\"\n{aggregates}"
        );
        load_str(&toml, "walhook.toml", &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_bad_aggregates() {
        let c =
            load("[[tables.aggregate]]\nevent = \"user.bulk_deleted\"\nop = \"delete\"\n").unwrap();
        let a = &c.tables[0].aggregates[0];
        assert_eq!((a.min_rows, a.max_rows, a.replace), (2, Some(1000), false));
        let e = load("[[tables.aggregate]]\nevent = \"user.a\"\nop = \"delete\"\n[[tables.aggregate]]\nevent = \"user.b\"\nop = \"delete\"\n").unwrap_err();
        assert!(
            e.contains("walhook.toml:11: tables[0].aggregate[1].op: this table already has an aggregate for op = \"delete\" (tables[0].aggregate[0].op, line 8); one per op"),
            "{e}"
        );
        let e =
            load("[[tables.aggregate]]\nevent = \"user.a\"\nop = \"insert\"\nmax_rows = 1000000\n")
                .unwrap_err();
        assert!(
            e.contains(
                "tables[0].aggregate[0].max_rows: max_rows = 1000000 is out of range 1..=100000"
            ),
            "{e}"
        );
        let e = load("[[tables.aggregate]]\nevent = \"user.a\"\nop = \"insert\"\nmin_rows = 5\nmax_rows = 4\n")
            .unwrap_err();
        assert!(
            e.contains("max_rows (4) must be at least min_rows (5)"),
            "{e}"
        );
        // The default max_rows is checked against min_rows too.
        let e =
            load("[[tables.aggregate]]\nevent = \"user.a\"\nop = \"insert\"\nmin_rows = 5000\n")
                .unwrap_err();
        assert!(
            e.contains("max_rows (1000) must be at least min_rows (5000)"),
            "{e}"
        );
    }
}
