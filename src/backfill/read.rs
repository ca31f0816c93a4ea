//! Reading a table for a backfill: its key and columns from the catalog, and its rows
//! in primary-key order, a chunk at a time, as the same JSON values the stream gives.

use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::pg::{TableName, quote_ident, quote_literal};
use crate::source::decoder::Row;
use crate::source::values;

/// What a backfill needs to know of a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Primary key columns with their SQL types, in key order.
    pub key: Vec<(String, String)>,
    /// The columns pgoutput publishes (not dropped, not generated), in order.
    pub columns: Vec<String>,
}

impl Shape {
    /// The key column names.
    pub fn key_names(&self) -> Vec<String> {
        self.key.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Why a table cannot be backfilled (a message for the operator).
pub type Refusal = String;

/// Reads the table's primary key and columns. A table without a primary key, or whose
/// replica identity does not carry it (USING INDEX, NOTHING), is refused: the merge
/// with the stream needs the key of every changed row.
pub async fn describe(
    client: &Client,
    table: &TableName,
) -> Result<Result<Shape, Refusal>, tokio_postgres::Error> {
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await?;
    let Some(rel) = rel else {
        return Ok(Err(format!("table {table} does not exist")));
    };
    let oid: u32 = rel.get(0);
    let identity: String = rel.get(1);
    let key = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
            &[&oid],
        )
        .await?;
    if key.is_empty() {
        return Ok(Err(format!(
            "table {table} has no primary key; a backfill reads rows in primary-key order"
        )));
    }
    if identity != "d" && identity != "f" {
        return Ok(Err(format!(
            "table {table} has REPLICA IDENTITY {}; a backfill needs the primary key of deleted rows (REPLICA IDENTITY DEFAULT or FULL)",
            if identity == "i" {
                "USING INDEX"
            } else {
                "NOTHING"
            }
        )));
    }
    let columns = client
        .query(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''
             ORDER BY attnum",
            &[&oid],
        )
        .await?;
    Ok(Ok(Shape {
        key: key.iter().map(|r| (r.get(0), r.get(1))).collect(),
        columns: columns.iter().map(|r| r.get(0)).collect(),
    }))
}

/// `(k1, k2)`, quoted.
fn key_list(shape: &Shape) -> String {
    let names: Vec<String> = shape.key.iter().map(|(n, _)| quote_ident(n)).collect();
    format!("({})", names.join(", "))
}

/// The condition of the rows after `cursor` (key text forms) and matching `where_sql`.
fn condition(shape: &Shape, cursor: Option<&[String]>, where_sql: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let Some(cursor) = cursor {
        let values: Vec<String> = shape
            .key
            .iter()
            .zip(cursor)
            .map(|((_, ty), v)| format!("{}::{ty}", quote_literal(v)))
            .collect();
        parts.push(format!("{} > ({})", key_list(shape), values.join(", ")));
    }
    if let Some(w) = where_sql {
        parts.push(format!("({w})"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", parts.join(" AND "))
    }
}

/// The statement reading the next chunk: at most `limit` rows after `cursor`, in key
/// order.
pub fn chunk_sql(
    table: &TableName,
    shape: &Shape,
    cursor: Option<&[String]>,
    where_sql: Option<&str>,
    limit: usize,
) -> String {
    let columns: Vec<String> = shape.columns.iter().map(|c| quote_ident(c)).collect();
    format!(
        "SELECT {} FROM {}{} ORDER BY {} LIMIT {limit}",
        columns.join(", "),
        table.quoted(),
        condition(shape, cursor, where_sql),
        key_list(shape).trim_matches(|c| c == '(' || c == ')'),
    )
}

/// The statement counting the rows still to read.
pub fn count_sql(
    table: &TableName,
    shape: &Shape,
    cursor: Option<&[String]>,
    where_sql: Option<&str>,
) -> String {
    format!(
        "SELECT count(*) FROM {}{}",
        table.quoted(),
        condition(shape, cursor, where_sql)
    )
}

/// A chunk: its rows as JSON (as the stream converts them), the key of its last row in
/// text form (the next cursor), and the size of its values' text.
pub struct Chunk {
    pub rows: Vec<Row>,
    pub last_key: Option<Vec<String>>,
    pub text_bytes: usize,
}

/// The result columns' types (OID and name) of a chunk statement. Preparing it also
/// refuses a statement that is several (a `--where` cannot smuggle in another one).
pub async fn column_types(
    client: &Client,
    sql: &str,
) -> Result<Vec<(u32, String)>, tokio_postgres::Error> {
    let statement = client.prepare(sql).await?;
    Ok(statement
        .columns()
        .iter()
        .map(|c| (c.type_().oid(), c.type_().name().to_owned()))
        .collect())
}

/// Runs `sql` (a statement [`column_types`] accepted, with another cursor) and converts
/// its rows by column type, from the server's text output as pgoutput sends it.
pub async fn read_chunk(
    client: &Client,
    sql: &str,
    shape: &Shape,
    types: &[(u32, String)],
) -> Result<Chunk, tokio_postgres::Error> {
    let key_at: Vec<usize> = shape
        .key
        .iter()
        .filter_map(|(k, _)| shape.columns.iter().position(|c| c == k))
        .collect();
    let mut rows = Vec::new();
    let mut last = None;
    let mut text_bytes = 0;
    for message in client.simple_query(sql).await? {
        let SimpleQueryMessage::Row(r) = message else {
            continue;
        };
        let mut row = Row::with_capacity(types.len());
        for (i, (oid, name)) in types.iter().enumerate() {
            let value = match r.get(i) {
                Some(text) => {
                    text_bytes += text.len();
                    values::to_json(*oid, Some(name), text)
                }
                None => Value::Null,
            };
            row.insert(shape.columns[i].clone(), value);
        }
        rows.push(row);
        last = Some(r);
    }
    let last_key = last.map(|r| {
        key_at
            .iter()
            .map(|&i| r.get(i).unwrap_or_default().to_owned())
            .collect()
    });
    Ok(Chunk {
        rows,
        last_key,
        text_bytes,
    })
}

/// The planner's estimate of the table's rows (`pg_class.reltuples`), for the progress
/// bar's total without counting every row; `None` before the table was ever vacuumed
/// or analysed.
pub async fn estimated_rows(
    client: &Client,
    table: &TableName,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.reltuples::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(row.map(|r| r.get::<_, i64>(0)).filter(|n| *n >= 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            key: vec![
                ("org".into(), "text".into()),
                ("id".into(), "bigint".into()),
            ],
            columns: vec!["org".into(), "id".into(), "name".into()],
        }
    }

    #[test]
    fn a_chunk_reads_after_the_cursor_in_key_order() {
        let t = TableName {
            schema: "public".into(),
            name: "members".into(),
        };
        assert_eq!(
            chunk_sql(&t, &shape(), None, None, 100),
            r#"SELECT "org", "id", "name" FROM "public"."members" ORDER BY "org", "id" LIMIT 100"#
        );
        let cursor = vec!["o'1".to_owned(), "7".to_owned()];
        assert_eq!(
            chunk_sql(&t, &shape(), Some(&cursor), Some("name <> ''"), 5),
            r#"SELECT "org", "id", "name" FROM "public"."members" WHERE ("org", "id") > ('o''1'::text, '7'::bigint) AND (name <> '') ORDER BY "org", "id" LIMIT 5"#
        );
        assert_eq!(
            count_sql(&t, &shape(), None, Some("id > 3")),
            r#"SELECT count(*) FROM "public"."members" WHERE (id > 3)"#
        );
    }
}
