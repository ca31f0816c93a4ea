//! The stateful pgoutput decoder: keeps the relation and type caches the stream
//! announces and turns row-change messages into typed, row-level [`Change`]s with
//! JSON values. Unknown values (unchanged TOAST without a full old row, non-key
//! columns of a key tuple) are left out of rows, never set to null.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::ser::{Error as _, Serialize, SerializeMap, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

use super::Lsn;
use super::pgoutput::{ColumnData, DecodeError, Message, OldKind, OldTuple, Relation, TupleData};
use super::values;
use crate::config::Columns;

/// A row: column name to JSON value, in column order.
pub type Row = serde_json::Map<String, Value>;

pub use crate::pg::TableName;

/// The kind of a row change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// INSERT
    Insert,
    /// UPDATE
    Update,
    /// DELETE
    Delete,
}

impl Op {
    /// `"insert"`, `"update"` or `"delete"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row change, with its values converted to JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The relation OID.
    pub relation_id: u32,
    /// The table, shared by every change to it.
    pub table: Arc<TableName>,
    /// Insert, update or delete.
    pub op: Op,
    /// The new row (insert, update); unchanged TOASTed columns that could not be filled
    /// from a full old row are left out and named in `unchanged_toast`. Only its key
    /// columns and those its mapping reads when `new_json` is set.
    pub new: Option<Row>,
    /// The new row as JSON text, its columns filtered, written as it was decoded: for a
    /// table of [`JsonRows`], on an insert or an update without a full old row.
    pub new_json: Option<RowJson>,
    /// The old row (update when sent, delete): the whole row under REPLICA IDENTITY
    /// FULL, otherwise only the key columns.
    pub old: Option<Row>,
    /// Whether `old` is the whole old row ('O', REPLICA IDENTITY FULL).
    pub old_is_full: bool,
    /// Columns of the new row that Postgres did not send (unchanged TOAST) and that
    /// are absent from `new`.
    pub unchanged_toast: Vec<String>,
    /// The replica identity columns as pgoutput flags them (every column under FULL).
    pub key_columns: Arc<[String]>,
}

/// What one pgoutput message decodes to.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// A transaction begins.
    Begin {
        /// The transaction id.
        xid: u32,
        /// The LSN of its commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 00:00 UTC.
        commit_time: i64,
    },
    /// A row changed.
    Change(Change),
    /// The transaction commits.
    Commit {
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The LSN just past it (what to confirm once the transaction is stored).
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 00:00 UTC.
        commit_time: i64,
    },
    /// Tables were truncated.
    Truncate {
        /// The truncated tables.
        tables: Vec<Arc<TableName>>,
        /// TRUNCATE ... CASCADE.
        cascade: bool,
        /// TRUNCATE ... RESTART IDENTITY.
        restart_identity: bool,
    },
    /// A `pg_logical_emit_message` message.
    LogicalMessage {
        /// Emitted inside a transaction.
        transactional: bool,
        /// Its LSN.
        lsn: Lsn,
        /// Its prefix.
        prefix: String,
        /// Its content.
        content: Bytes,
    },
}

/// Tables whose new rows the decoder writes as JSON text as it decodes them
/// ([`Change::new_json`]) instead of building every value: the text is all a row
/// payload needs, and building the [`Row`] (a key and a value allocated per column,
/// hashed into a map, serialised, dropped) was ~12 % of walhook's CPU end to end. Set by
/// the mapping, for the tables nothing else reads whole rows of.
///
/// `bench/ingest-loop run LABEL paused` (ingest alone), alternated: 6.3/6.4 µs of
/// walhook CPU per event with rows as values, 5.9/5.8 written as JSON; `e2e`
/// 22.8/22.0 against 22.1/21.7.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JsonRows {
    pub tables: HashMap<TableName, JsonRowSpec>,
}

/// How one table's new rows are written as JSON.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonRowSpec {
    /// Columns kept in [`Change::new`] besides the key columns (the entity id's).
    pub read: Vec<String>,
    /// The columns the text has.
    pub columns: Columns,
}

/// A row as JSON text (compact, in column order).
#[derive(Clone, Debug)]
pub struct RowJson(pub Arc<RawValue>);

impl JsonRows {
    /// What `table`'s rows need, per column, when it is one of these tables.
    fn relation(&self, table: &TableName, columns: &[ColumnInfo]) -> Option<RelationJson> {
        let spec = self.tables.get(table)?;
        Some(RelationJson {
            kept: columns
                .iter()
                .map(|c| c.is_key || spec.read.contains(&c.name))
                .collect(),
            shown: columns
                .iter()
                .map(|c| spec.columns.allows(&c.name))
                .collect(),
        })
    }
}

impl PartialEq for RowJson {
    fn eq(&self, other: &RowJson) -> bool {
        self.0.get() == other.0.get()
    }
}

/// A relation's [`JsonRowSpec`], per column.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RelationJson {
    /// In [`Change::new`].
    kept: Vec<bool>,
    /// In [`Change::new_json`].
    shown: Vec<bool>,
}

/// One column of a cached relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnInfo {
    /// The column name.
    pub name: String,
    /// The type OID.
    pub type_oid: u32,
    /// The type's name when a Type message announced it (non-builtin types only).
    pub type_name: Option<Arc<str>>,
    /// Flagged as part of the replica identity.
    pub is_key: bool,
}

/// A relation as last announced by the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationInfo {
    /// The table.
    pub table: Arc<TableName>,
    /// `relreplident`: b'd' default, b'n' nothing, b'f' full, b'i' index.
    pub replica_identity: u8,
    /// The published columns, in order.
    pub columns: Vec<ColumnInfo>,
    /// Names of the columns flagged as key.
    pub key_columns: Arc<[String]>,
    /// Set when the table's new rows are written as JSON ([`JsonRows`]).
    json: Option<RelationJson>,
}

/// Decodes a pgoutput message stream. One per replication connection: the caches
/// it keeps are valid for one walsender session (the server announces every relation
/// again after a reconnect).
#[derive(Debug, Default)]
pub struct Decoder {
    relations: HashMap<u32, RelationInfo>,
    types: HashMap<u32, Arc<str>>,
    origin: Option<String>,
    json_rows: JsonRows,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder for a new walsender session: no caches, the same [`JsonRows`].
    pub fn fresh(&self) -> Decoder {
        Decoder {
            json_rows: self.json_rows.clone(),
            ..Decoder::default()
        }
    }

    /// Writes the new rows of `rows`' tables as JSON from the next change on.
    pub fn set_json_rows(&mut self, rows: JsonRows) {
        if rows == self.json_rows {
            return;
        }
        for rel in self.relations.values_mut() {
            rel.json = rows.relation(&rel.table, &rel.columns);
        }
        self.json_rows = rows;
    }

    /// The cached relation with this OID.
    pub fn relation(&self, relation_id: u32) -> Option<&RelationInfo> {
        self.relations.get(&relation_id)
    }

    /// The replication origin of the current transaction, when an Origin message named one.
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// Decodes one message. Relation, Type and Origin messages update the decoder's
    /// state and give `None`; a change to a relation not announced is an error.
    pub fn decode(&mut self, msg: Message) -> Result<Option<Decoded>, DecodeError> {
        Ok(Some(match msg {
            Message::Begin(b) => {
                self.origin = None;
                Decoded::Begin {
                    xid: b.xid,
                    final_lsn: b.final_lsn,
                    commit_time: b.commit_time,
                }
            }
            Message::Commit(c) => {
                self.origin = None;
                Decoded::Commit {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time: c.commit_time,
                }
            }
            Message::Origin { name, .. } => {
                self.origin = Some(name);
                return Ok(None);
            }
            Message::Relation(rel) => {
                self.add_relation(rel);
                return Ok(None);
            }
            Message::Type(t) => {
                let name: Arc<str> = Arc::from(t.name);
                for rel in self.relations.values_mut() {
                    for col in rel.columns.iter_mut().filter(|c| c.type_oid == t.id) {
                        col.type_name = Some(name.clone());
                    }
                }
                self.types.insert(t.id, name);
                return Ok(None);
            }
            Message::Insert { relation_id, new } => {
                let rel = self.lookup(relation_id, Op::Insert.as_str())?;
                let (new, new_json, unchanged_toast) = match &rel.json {
                    Some(json) => json_row(rel, json, Op::Insert, &new)?,
                    None => {
                        let (new, unchanged) = new_row(rel, Op::Insert, &new, None)?;
                        (new, None, unchanged)
                    }
                };
                let mut c = change(
                    relation_id,
                    rel,
                    Op::Insert,
                    Some(new),
                    None,
                    false,
                    unchanged_toast,
                );
                c.new_json = new_json;
                Decoded::Change(c)
            }
            Message::Update {
                relation_id,
                old,
                new,
            } => {
                let rel = self.lookup(relation_id, Op::Update.as_str())?;
                let old_is_full = old.as_ref().is_some_and(|o| o.kind == OldKind::Full);
                let old = old.map(|o| old_row(rel, Op::Update, &o)).transpose()?;
                let fill = if old_is_full { old.as_ref() } else { None };
                // With the full old row, the mapping compares whole rows.
                let (new, new_json, unchanged_toast) = match &rel.json {
                    Some(json) if !old_is_full => json_row(rel, json, Op::Update, &new)?,
                    _ => {
                        let (new, unchanged) = new_row(rel, Op::Update, &new, fill)?;
                        (new, None, unchanged)
                    }
                };
                let mut c = change(
                    relation_id,
                    rel,
                    Op::Update,
                    Some(new),
                    old,
                    old_is_full,
                    unchanged_toast,
                );
                c.new_json = new_json;
                Decoded::Change(c)
            }
            Message::Delete { relation_id, old } => {
                let rel = self.lookup(relation_id, Op::Delete.as_str())?;
                let old_is_full = old.kind == OldKind::Full;
                let old = old_row(rel, Op::Delete, &old)?;
                Decoded::Change(change(
                    relation_id,
                    rel,
                    Op::Delete,
                    None,
                    Some(old),
                    old_is_full,
                    Vec::new(),
                ))
            }
            Message::Truncate {
                options,
                relation_ids,
            } => {
                let tables = relation_ids
                    .iter()
                    .map(|&id| self.lookup(id, "truncate").map(|rel| rel.table.clone()))
                    .collect::<Result<_, _>>()?;
                Decoded::Truncate {
                    tables,
                    cascade: options & 1 != 0,
                    restart_identity: options & 2 != 0,
                }
            }
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => Decoded::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content,
            },
        }))
    }

    /// Caches a relation, replacing what an earlier message (before an ALTER) said.
    fn add_relation(&mut self, rel: Relation) {
        let schema = if rel.namespace.is_empty() {
            "pg_catalog".to_owned()
        } else {
            rel.namespace
        };
        let columns: Vec<ColumnInfo> = rel
            .columns
            .into_iter()
            .map(|c| ColumnInfo {
                type_name: self.types.get(&c.type_oid).cloned(),
                name: c.name,
                type_oid: c.type_oid,
                is_key: c.is_key,
            })
            .collect();
        let key_columns = columns
            .iter()
            .filter(|c| c.is_key)
            .map(|c| c.name.clone())
            .collect();
        if let Some(old) = self.relations.get(&rel.id)
            && (old.table.schema != schema || old.table.name != rel.name)
        {
            // Only published (watched) tables reach the stream, and `[[tables]]` match
            // by name: from here on this table's changes match no entry.
            tracing::warn!(
                relation_id = rel.id,
                was = %old.table,
                now = format_args!("{schema}.{}", rel.name),
                "watched table renamed: its changes no longer match its [[tables]] entry and \
                 produce no events; fix: set `table` to the new name and reload, or rename it back"
            );
        }
        let table = TableName {
            schema,
            name: rel.name,
        };
        let json = self.json_rows.relation(&table, &columns);
        self.relations.insert(
            rel.id,
            RelationInfo {
                table: Arc::new(table),
                replica_identity: rel.replica_identity,
                columns,
                key_columns,
                json,
            },
        );
    }

    fn lookup(&self, relation_id: u32, op: &'static str) -> Result<&RelationInfo, DecodeError> {
        self.relations
            .get(&relation_id)
            .ok_or(DecodeError::UnknownRelation { op, relation_id })
    }
}

fn change(
    relation_id: u32,
    rel: &RelationInfo,
    op: Op,
    new: Option<Row>,
    old: Option<Row>,
    old_is_full: bool,
    unchanged_toast: Vec<String>,
) -> Change {
    Change {
        relation_id,
        table: rel.table.clone(),
        op,
        new,
        new_json: None,
        old,
        old_is_full,
        unchanged_toast,
        key_columns: rel.key_columns.clone(),
    }
}

fn check_width(rel: &RelationInfo, op: Op, tuple: &TupleData) -> Result<(), DecodeError> {
    if tuple.0.len() != rel.columns.len() {
        return Err(DecodeError::ColumnCount {
            op: op.as_str(),
            table: rel.table.to_string(),
            expected: rel.columns.len(),
            found: tuple.0.len(),
        });
    }
    Ok(())
}

/// The new row of a [`JsonRows`] table: its kept columns as values, all its shown
/// columns as JSON text, and its unchanged TOAST columns (left out of both) by name.
///
/// Each column's text is checked to be UTF-8 once: a kept one by [`value`], a shown one
/// as it is written, any other here. When a check fails, the error names the first
/// column in order whose text is not UTF-8, as [`new_row`]'s does.
fn json_row(
    rel: &RelationInfo,
    json: &RelationJson,
    op: Op,
    new: &TupleData,
) -> Result<(Row, Option<RowJson>, Vec<String>), DecodeError> {
    check_width(rel, op, new)?;
    let invalid = || invalid_text(rel, op, new);
    let mut row = Row::new();
    let mut unchanged = Vec::new();
    let columns = rel.columns.iter().zip(&new.0);
    for ((col, data), (&kept, &shown)) in columns.zip(json.kept.iter().zip(&json.shown)) {
        match data {
            ColumnData::UnchangedToast => unchanged.push(col.name.clone()),
            _ if kept => {
                if let Some(v) = value(rel, op, col, data).map_err(|_| invalid())? {
                    row.insert(col.name.clone(), v);
                }
            }
            ColumnData::Text(raw) if !shown && std::str::from_utf8(raw).is_err() => {
                return Err(invalid());
            }
            _ => {}
        }
    }
    let text = serde_json::value::to_raw_value(&TupleJson {
        rel,
        shown: &json.shown,
        tuple: new,
    })
    .map_err(|_| invalid())?;
    Ok((row, Some(RowJson(Arc::from(text))), unchanged))
}

/// The error of the first column of `tuple` whose text is not UTF-8, once a check
/// found one.
fn invalid_text(rel: &RelationInfo, op: Op, tuple: &TupleData) -> DecodeError {
    rel.columns
        .iter()
        .zip(&tuple.0)
        .find_map(|(col, data)| match data {
            ColumnData::Text(raw) => text(rel, op, col, raw).err(),
            _ => None,
        })
        .expect("a column's text failed the UTF-8 check")
}

/// A tuple's shown columns as a JSON object, the values as [`value`] gives them.
struct TupleJson<'a> {
    rel: &'a RelationInfo,
    shown: &'a [bool],
    tuple: &'a TupleData,
}

impl Serialize for TupleJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let columns = self.rel.columns.iter().zip(&self.tuple.0).zip(self.shown);
        for ((col, data), _) in columns.filter(|(_, shown)| **shown) {
            match data {
                ColumnData::Null => map.serialize_entry(&col.name, &Value::Null)?,
                ColumnData::UnchangedToast => {}
                ColumnData::Text(raw) => {
                    let text = std::str::from_utf8(raw).map_err(S::Error::custom)?;
                    let value = values::JsonText {
                        type_oid: col.type_oid,
                        type_name: col.type_name.as_deref(),
                        text,
                    };
                    map.serialize_entry(&col.name, &value)?;
                }
                ColumnData::Binary(raw) => {
                    map.serialize_entry(&col.name, &values::binary_column_to_json(raw))?;
                }
            }
        }
        map.end()
    }
}

/// A sent column's text, checked to be UTF-8.
fn text<'a>(
    rel: &RelationInfo,
    op: Op,
    col: &ColumnInfo,
    raw: &'a [u8],
) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8Value {
        op: op.as_str(),
        table: rel.table.to_string(),
        column: col.name.clone(),
    })
}

/// The JSON value of one sent column (`None` for an unchanged TOAST value).
fn value(
    rel: &RelationInfo,
    op: Op,
    col: &ColumnInfo,
    data: &ColumnData,
) -> Result<Option<Value>, DecodeError> {
    Ok(Some(match data {
        ColumnData::Null => Value::Null,
        ColumnData::UnchangedToast => return Ok(None),
        ColumnData::Text(raw) => values::to_json(
            col.type_oid,
            col.type_name.as_deref(),
            text(rel, op, col, raw)?,
        ),
        ColumnData::Binary(raw) => values::binary_column_to_json(raw),
    }))
}

/// The old row: every sent column of a full tuple; only key columns of a key tuple
/// (pgoutput sends the others as NULL, which would be a lie).
fn old_row(rel: &RelationInfo, op: Op, old: &OldTuple) -> Result<Row, DecodeError> {
    check_width(rel, op, &old.tuple)?;
    let key_only = old.kind == OldKind::Key;
    let mut row = Row::with_capacity(if key_only {
        rel.key_columns.len()
    } else {
        rel.columns.len()
    });
    for (col, data) in rel.columns.iter().zip(&old.tuple.0) {
        if key_only && !col.is_key {
            continue;
        }
        if let Some(v) = value(rel, op, col, data)? {
            row.insert(col.name.clone(), v);
        }
    }
    Ok(row)
}

/// The new row; unchanged TOAST columns are filled from `full_old` when it has them,
/// otherwise left out and returned by name.
fn new_row(
    rel: &RelationInfo,
    op: Op,
    new: &TupleData,
    full_old: Option<&Row>,
) -> Result<(Row, Vec<String>), DecodeError> {
    check_width(rel, op, new)?;
    let mut row = Row::with_capacity(rel.columns.len());
    let mut unchanged = Vec::new();
    for (col, data) in rel.columns.iter().zip(&new.0) {
        match value(rel, op, col, data)? {
            Some(v) => {
                row.insert(col.name.clone(), v);
            }
            None => match full_old.and_then(|old| old.get(&col.name)) {
                Some(v) => {
                    row.insert(col.name.clone(), v.clone());
                }
                None => unchanged.push(col.name.clone()),
            },
        }
    }
    Ok((row, unchanged))
}

#[cfg(test)]
mod tests;
