//! The mapping stage: table rules turn row [`Change`](crate::source::decoder::Change)s
//! into entity [`EventDraft`]s (default events, `update_columns`, CEL rules,
//! redaction, entity ids).

pub mod aggregate;
mod condition;
pub mod context;
mod entity_id;
mod error;
pub mod lookup;
mod mapper;
pub(crate) mod rows;
mod snapshot;
mod table;

pub use condition::EvalError;
pub(crate) use condition::{FailureCount, eval_bool, row_to_cel, scope, string, to_cel};
pub use context::{ContextKeys, ContextPlan};
pub use entity_id::MissingId;
pub use error::{MappingError, TableError};
pub use mapper::{EventDraft, MapStats, Mapper, Skip};

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders for mapping and routing tests.

    use crate::config::{Config, TableConfig, load_str};
    use crate::pg::TableName;
    use crate::source::setup::TableInfo;

    /// Loads a config from `body` (a `[source]` section is added).
    pub(crate) fn config(body: &str) -> Config {
        let toml = format!("[source]\nurl = \"postgres://u@localhost/db\"\n{body}");
        match load_str(&toml, "test.toml", &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    /// The `[[tables]]` of `body`.
    pub(crate) fn tables(body: &str) -> Vec<TableConfig> {
        config(body).tables
    }

    /// Catalog information for `schema.name`.
    pub(crate) fn info(
        qualified: &str,
        identity: char,
        pk: &[&str],
        columns: &[&str],
    ) -> TableInfo {
        let (schema, name) = qualified.split_once('.').unwrap();
        TableInfo {
            name: TableName {
                schema: schema.into(),
                name: name.into(),
            },
            oid: 1,
            replica_identity: identity,
            primary_key: pk.iter().map(|s| s.to_string()).collect(),
            columns: columns.iter().map(|s| s.to_string()).collect(),
            toastable: Vec::new(),
        }
    }
}
