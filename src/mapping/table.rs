//! One watched table ready for mapping: its config checked against the catalog
//! (id columns, column names, what a DELETE carries), with rule programs and the
//! CEL variables they read.

use std::sync::Arc;

use crate::config::{CelProgram, Columns, EventNames, TableConfig};
use crate::source::decoder::TableName;
use crate::source::setup::TableInfo;

use super::condition::FailureCount;
use super::error::TableError;

/// A `[[tables.rules]]` entry ready to run.
#[derive(Debug)]
pub(crate) struct RuleMapping {
    /// Full event name.
    pub event: String,
    /// Compiled condition.
    pub program: CelProgram,
    /// The condition reads `new`.
    pub reads_new: bool,
    /// The condition reads `old`.
    pub reads_old: bool,
    /// Runtime failures so far (for rate-limited logs).
    pub failures: FailureCount,
}

/// Which CEL variables any rule of a table reads, so unused ones are not built.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Needs {
    pub new: bool,
    pub old: bool,
    pub changed: bool,
}

/// A watched table's mapping rules.
#[derive(Debug)]
pub(crate) struct TableMapping {
    /// The table, shared by its drafts.
    pub table: Arc<TableName>,
    /// `schema.name`, for logs.
    pub qualified: String,
    /// `schema.name` as the `table` CEL variable (cloning it is an `Arc` clone).
    pub qualified_cel: cel::Value,
    /// Rows skipped for a missing id so far (for rate-limited logs).
    pub missing_ids: FailureCount,
    /// Entity name.
    pub entity: Arc<str>,
    /// Id columns (configured, else the primary key); never empty.
    pub id: Vec<String>,
    /// Redaction.
    pub columns: Columns,
    /// Update event only when one of these changed.
    pub update_columns: Option<Vec<String>>,
    /// The table's own events.
    pub events: EventNames,
    /// Derived events, in file order.
    pub rules: Vec<RuleMapping>,
    /// Variables the rules read.
    pub needs: Needs,
}

impl TableMapping {
    /// Checks `config` against the catalog `info` (absent: table not found).
    pub(crate) fn build(
        config: &TableConfig,
        info: Option<&TableInfo>,
    ) -> Result<TableMapping, Vec<TableError>> {
        let qualified = config.qualified_name();
        let Some(info) = info else {
            return Err(vec![TableError::NotFound { table: qualified }]);
        };
        let mut errors = Vec::new();
        let id = match &config.id {
            Some(id) => id.clone(),
            None => {
                for column in &info.primary_key {
                    if !config.columns.allows(column) {
                        errors.push(TableError::IdRedacted {
                            table: qualified.clone(),
                            column: column.clone(),
                        });
                    }
                }
                info.primary_key.clone()
            }
        };
        if id.is_empty() {
            errors.push(TableError::NoId {
                table: qualified.clone(),
            });
        }
        let mut check = |key: &'static str, columns: &[String]| {
            for column in columns {
                if !info.columns.contains(column) {
                    errors.push(TableError::UnknownColumn {
                        table: qualified.clone(),
                        key,
                        column: column.clone(),
                    });
                }
            }
        };
        check("id", &id);
        match &config.columns {
            Columns::All => {}
            Columns::Include(c) => check("include_columns", c),
            Columns::Exclude(c) => check("exclude_columns", c),
        }
        if let Some(c) = &config.update_columns {
            check("update_columns", c);
        }
        // Under the default identity a DELETE carries only the primary key.
        let deletes_matter = config.events.delete.is_some() || !config.rules.is_empty();
        if info.replica_identity == 'd' && deletes_matter {
            for column in &id {
                if info.columns.contains(column) && !info.primary_key.contains(column) {
                    errors.push(TableError::IdNotInIdentity {
                        table: qualified.clone(),
                        column: column.clone(),
                    });
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let mut needs = Needs::default();
        let rules = config
            .rules
            .iter()
            .map(|rule| {
                let refs = rule.program.references();
                let (reads_new, reads_old) = (refs.has_variable("new"), refs.has_variable("old"));
                needs.new |= reads_new;
                needs.old |= reads_old;
                needs.changed |= refs.has_variable("changed");
                RuleMapping {
                    event: rule.event.clone(),
                    program: rule.program.clone(),
                    reads_new,
                    reads_old,
                    failures: FailureCount::default(),
                }
            })
            .collect();
        Ok(TableMapping {
            table: Arc::new(TableName {
                schema: config.schema.clone(),
                name: config.name.clone(),
            }),
            qualified_cel: super::condition::string(&qualified),
            qualified,
            missing_ids: FailureCount::default(),
            entity: Arc::from(config.entity.as_str()),
            id,
            columns: config.columns.clone(),
            update_columns: config.update_columns.clone(),
            events: config.events.clone(),
            rules,
            needs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::{info, tables};

    fn build(toml: &str, info: Option<&TableInfo>) -> Result<TableMapping, Vec<TableError>> {
        TableMapping::build(&tables(toml)[0], info)
    }

    #[test]
    fn id_defaults_to_the_primary_key() {
        let t = build(
            "[[tables]]\ntable = \"public.users\"\n",
            Some(&info("public.users", 'd', &["id"], &["id", "email"])),
        )
        .unwrap();
        assert_eq!(t.id, ["id"]);
        assert_eq!(&*t.entity, "users");
        assert_eq!(t.qualified, "public.users");
    }

    #[test]
    fn missing_table_and_missing_id_are_errors_with_a_fix() {
        let errs = build("[[tables]]\ntable = \"public.users\"\n", None).unwrap_err();
        assert!(matches!(&errs[..], [TableError::NotFound { table }] if table == "public.users"));
        let errs = build(
            "[[tables]]\ntable = \"public.logs\"\n",
            Some(&info("public.logs", 'f', &[], &["msg"])),
        )
        .unwrap_err();
        assert!(matches!(&errs[..], [TableError::NoId { .. }]));
        let text = errs[0].to_string();
        assert!(
            text.contains("public.logs") && text.contains("Fix: set `id"),
            "{text}"
        );
    }

    #[test]
    fn unknown_columns_are_all_reported() {
        let errs = build(
            "[[tables]]\ntable = \"public.users\"\nid = [\"uid\"]\nexclude_columns = [\"pasword\"]\nupdate_columns = [\"mail\"]\n",
            Some(&info("public.users", 'f', &["id"], &["id", "email", "password"])),
        )
        .unwrap_err();
        let keys: Vec<_> = errs
            .iter()
            .map(|e| match e {
                TableError::UnknownColumn { key, column, .. } => format!("{key}:{column}"),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(
            keys,
            ["id:uid", "exclude_columns:pasword", "update_columns:mail"]
        );
    }

    #[test]
    fn redacted_primary_key_is_an_error() {
        let errs = build(
            "[[tables]]\ntable = \"public.users\"\nexclude_columns = [\"id\"]\n",
            Some(&info("public.users", 'd', &["id"], &["id", "email"])),
        )
        .unwrap_err();
        assert!(matches!(&errs[..], [TableError::IdRedacted { .. }]));
    }

    #[test]
    fn id_outside_the_key_needs_full_identity_when_deletes_are_mapped() {
        let toml = "[[tables]]\ntable = \"public.posts\"\nid = [\"author_id\"]\n";
        let cols = ["id", "author_id"];
        let errs = build(toml, Some(&info("public.posts", 'd', &["id"], &cols))).unwrap_err();
        assert!(
            matches!(&errs[..], [TableError::IdNotInIdentity { column, .. }] if column == "author_id")
        );
        assert!(build(toml, Some(&info("public.posts", 'f', &["id"], &cols))).is_ok());
        let no_delete = format!("{toml}events = {{ delete = false }}\n");
        assert!(build(&no_delete, Some(&info("public.posts", 'd', &["id"], &cols))).is_ok());
    }

    #[test]
    fn rule_variables_are_detected() {
        let t = build(
            "[[tables]]\ntable = \"public.users\"\n[[tables.rules]]\nevent = \"user.x\"\nwhen = \"new.a == 1 && op == 'update'\"\n",
            Some(&info("public.users", 'f', &["id"], &["id", "a"])),
        )
        .unwrap();
        assert!(t.needs.new && !t.needs.old && !t.needs.changed);
    }
}
