//! Errors found when building a [`super::Mapper`]: config and database disagree.

use std::fmt;

/// One table whose config cannot work against the database. Each message names the
/// table and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// Start-up has no catalog information for a watched table.
    #[error(
        "table `{table}` was not found in the database. Fix: create it, or correct `table` in its [[tables]] entry"
    )]
    NotFound {
        /// `schema.name`.
        table: String,
    },
    /// Neither `id` nor a primary key.
    #[error(
        "table `{table}` has no primary key and no `id` is configured, so its events have no entity id. Fix: set `id = [\"...\"]` in its [[tables]] entry, or add a primary key"
    )]
    NoId {
        /// `schema.name`.
        table: String,
    },
    /// A column named by the config is not in the table.
    #[error(
        "table `{table}` has no column `{column}` (named in `{key}`). Fix: correct `{key}` in its [[tables]] entry"
    )]
    UnknownColumn {
        /// `schema.name`.
        table: String,
        /// The config key: `id`, `include_columns`, `exclude_columns`, `update_columns`.
        key: &'static str,
        /// The missing column.
        column: String,
    },
    /// A primary-key id column is redacted (a configured one is refused by config).
    #[error(
        "table `{table}`: primary key column `{column}` is the entity id but is filtered out by include_columns/exclude_columns; ids are always sent. Fix: stop filtering it, or set `id` to other columns"
    )]
    IdRedacted {
        /// `schema.name`.
        table: String,
        /// The id column.
        column: String,
    },
    /// A DELETE's key tuple would not carry the id column.
    #[error(
        "table `{table}`: id column `{column}` is not part of the primary key, so a DELETE does not carry it and deletes would have no entity id. Fix: `ALTER TABLE {table} REPLICA IDENTITY FULL;`, or use primary key columns as `id`"
    )]
    IdNotInIdentity {
        /// `schema.name`.
        table: String,
        /// The id column.
        column: String,
    },
    /// A context's parent table is not in the database.
    #[error(
        "`{key}`: table `{table}` was not found in the database. Fix: create it, or correct `{key}`"
    )]
    ContextParent {
        /// The config key, e.g. `tables[0].context[1].table`.
        key: String,
        /// `schema.name` of the parent.
        table: String,
    },
    /// A context's parent has neither a configured `id` nor a primary key.
    #[error(
        "`{key}`: table `{table}` has no primary key (and is not a watched table with `id`), so its rows cannot be looked up by key. Fix: add a primary key, or watch it with `id = [\"...\"]`"
    )]
    ContextNoId {
        /// The config key.
        key: String,
        /// `schema.name` of the parent.
        table: String,
    },
    /// `key` has not as many columns as the parent's id.
    #[error(
        "`{key}` names {count} column(s), but the id of `{table}` has {expected} ({id}). Fix: list one column of this table per id column, in that order"
    )]
    ContextKeyCount {
        /// The config key.
        key: String,
        /// `schema.name` of the parent.
        table: String,
        /// The parent's id columns, comma-separated.
        id: String,
        expected: usize,
        count: usize,
    },
    /// A column a context reads is not in its parent table.
    #[error("`{key}`: table `{table}` has no column `{column}`. Fix: correct `{key}`")]
    ContextColumn {
        /// The config key.
        key: String,
        /// `schema.name` of the parent.
        table: String,
        column: String,
    },
    /// A context's lookup query fails when tried (no SELECT privilege, types that do
    /// not compare).
    #[error(
        "`{key}`: reading `{table}` fails: {reason}. Fix: let walhook's role read it (`GRANT SELECT ON {table} TO <role>;`), or correct `{key}`"
    )]
    ContextQuery {
        /// The config key.
        key: String,
        /// `schema.name` of the parent.
        table: String,
        /// The server's message.
        reason: String,
    },
}

/// Every problem found while building a mapper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    /// One entry per problem, in table order.
    pub errors: Vec<TableError>,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for MappingError {}
