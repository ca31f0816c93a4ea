//! Validation of context chains across `[[tables]]`: a context's parent table that is
//! itself watched has its own `[[tables.context]]` entries followed from the parent
//! row, so loops, chains deeper than [`MAX_CONTEXT_DEPTH`] parents, names that appear
//! twice in one event's `context`, and keys that do not fit a configured `id` are
//! config errors.

use super::super::locate::{index, join};
use super::super::types::*;
use super::Validator;

/// Most parents in one context chain (certificate -> application -> organisation is 2).
pub const MAX_CONTEXT_DEPTH: usize = 3;

impl Validator<'_> {
    /// Checks the chains of every table's context entries; `keys` are the tables'
    /// config keys (`tables[3]`), in the order of `tables`.
    pub(super) fn context_chains(&mut self, keys: &[String], tables: &[TableConfig]) {
        for (key, t) in keys.iter().zip(tables) {
            let mut names: Vec<String> = Vec::new();
            for (j, c) in t.context.iter().enumerate() {
                let ckey = index(&join(key, "context"), j);
                let mut path = vec![t.qualified_name()];
                self.chain(&ckey, c, tables, &mut path, &mut names);
            }
        }
    }

    /// Follows entry `c` (reached along `path`), recording the context names the
    /// event gets in `names`; reports the first problem at `ckey`.
    fn chain(
        &mut self,
        ckey: &str,
        c: &ContextConfig,
        tables: &[TableConfig],
        path: &mut Vec<String>,
        names: &mut Vec<String>,
    ) {
        let via = |path: &[String]| path.join(" -> ");
        if names.contains(&c.name) {
            let message = if path.len() == 1 {
                format!("context \"{}\" is declared twice for this table", c.name)
            } else {
                format!(
                    "context \"{}\" appears twice in the events of {}: the chain {} -> {} adds it again (a parent's own context joins its children's). Rename one",
                    c.name,
                    path[0],
                    via(path),
                    c.table
                )
            };
            self.err(&join(ckey, "name"), message);
            return;
        }
        names.push(c.name.clone());
        if path.contains(&c.table) {
            self.err(
                &join(ckey, "table"),
                format!(
                    "context chain loops: {} -> {}. A watched parent's own [[tables.context]] entries are followed; remove one link",
                    via(path),
                    c.table
                ),
            );
            return;
        }
        if path.len() > MAX_CONTEXT_DEPTH {
            self.err(
                &join(ckey, "table"),
                format!(
                    "context chain too deep: {} -> {} has more than {MAX_CONTEXT_DEPTH} parents",
                    via(path),
                    c.table
                ),
            );
            return;
        }
        let Some(parent) = tables.iter().find(|t| t.qualified_name() == c.table) else {
            return;
        };
        if let Some(id) = &parent.id
            && id.len() != c.key.len()
        {
            self.err(
                &join(ckey, "key"),
                format!(
                    "key names {} column(s), but the id of {} has {} ({}); list one column of this table per id column, in that order",
                    c.key.len(),
                    c.table,
                    id.len(),
                    id.join(", ")
                ),
            );
        }
        path.push(c.table.clone());
        for n in &parent.context {
            self.chain(ckey, n, tables, path, names);
        }
        path.pop();
    }
}

#[cfg(test)]
mod tests {
    use crate::config::load_str;

    /// The errors of a config with these `[[tables]]`, as text.
    fn errors(tables: &str) -> String {
        let toml = format!("[source]\nurl = \"postgres://u@localhost/db\"\n{tables}");
        match load_str(&toml, "walhook.toml", &|_| None) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    const CHAIN: &str = r#"
[[tables]]
table = "public.certificates"
[[tables.context]]
name = "application"
table = "public.applications"
key = "application_id"
[[tables]]
table = "public.applications"
[[tables.context]]
name = "organisation"
table = "public.organisations"
key = "org_id"
"#;

    #[test]
    fn a_two_parent_chain_is_valid() {
        assert_eq!(errors(CHAIN), "");
    }

    #[test]
    fn a_loop_is_an_error_naming_the_chain() {
        let e = errors(&format!(
            "{CHAIN}[[tables]]\ntable = \"public.organisations\"\n[[tables.context]]\nname = \"cert\"\ntable = \"public.certificates\"\nkey = \"cert_id\"\n"
        ));
        assert!(e.contains("tables[0].context[0].table"), "{e}");
        assert!(
            e.contains("context chain loops: public.certificates -> public.applications -> public.organisations -> public.certificates"),
            "{e}"
        );
    }

    #[test]
    fn a_chain_deeper_than_the_limit_is_an_error() {
        let mut toml = String::new();
        for i in 0..5 {
            toml.push_str(&format!(
                "[[tables]]\ntable = \"public.t{i}\"\n[[tables.context]]\nname = \"p{i}\"\ntable = \"public.t{}\"\nkey = \"parent_id\"\n",
                i + 1
            ));
        }
        let e = errors(&toml);
        assert!(e.contains("context chain too deep"), "{e}");
        assert!(e.contains("tables[0].context[0].table"), "{e}");
        assert!(!e.contains("tables[2].context[0]"), "{e}");
    }

    #[test]
    fn a_name_twice_in_one_event_is_an_error() {
        let e = errors(&format!(
            "{CHAIN}[[tables.context]]\nname = \"application\"\ntable = \"public.other\"\nkey = \"other_id\"\n"
        ));
        assert!(e.contains("tables[0].context[0].name"), "{e}");
        assert!(
            e.contains("appears twice in the events of public.certificates"),
            "{e}"
        );
        let e = errors(
            "[[tables]]\ntable = \"public.a\"\n[[tables.context]]\nname = \"o\"\ntable = \"public.o\"\nkey = \"o_id\"\n[[tables.context]]\nname = \"o\"\ntable = \"public.p\"\nkey = \"p_id\"\n",
        );
        assert!(e.contains("tables[0].context[1].name"), "{e}");
        assert!(e.contains("declared twice for this table"), "{e}");
    }

    #[test]
    fn a_key_must_fit_a_configured_id() {
        let e = errors(
            "[[tables]]\ntable = \"public.a\"\n[[tables.context]]\nname = \"o\"\ntable = \"public.o\"\nkey = [\"o_id\", \"region\"]\n[[tables]]\ntable = \"public.o\"\nid = [\"id\"]\n",
        );
        assert!(e.contains("tables[0].context[0].key"), "{e}");
        assert!(
            e.contains("key names 2 column(s), but the id of public.o has 1 (id)"),
            "{e}"
        );
    }
}
