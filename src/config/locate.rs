//! Where each key came from: a line of the TOML file or an env override.

use std::collections::HashMap;

use toml_edit::{ImDocument, Item, TableLike, Value};

use super::error::{ConfigError, Origin};

/// Maps dotted key paths (`tables[1].rules[0].when`) to their origin.
#[derive(Debug, Default)]
pub(crate) struct Locator {
    file: String,
    lines: HashMap<String, usize>,
    env: HashMap<String, String>,
}

/// `parent.key`, or `key` at the top.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub(crate) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// The key one level up: `a.b[2]` -> `a.b`, `a.b` -> `a`, `a` -> ``.
fn parent_of(key: &str) -> Option<&str> {
    if key.is_empty() {
        return None;
    }
    if key.ends_with(']') {
        return key.rfind('[').map(|i| &key[..i]);
    }
    Some(key.rfind('.').map_or("", |i| &key[..i]))
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

impl Locator {
    /// Indexes every key of an already parsed document.
    pub(crate) fn new(file: &str, text: &str, doc: &ImDocument<&str>) -> Self {
        let mut loc = Locator {
            file: file.to_string(),
            ..Default::default()
        };
        loc.walk_table(text, "", doc.as_table());
        loc
    }

    /// Records that `key` was set by env var `var`.
    pub(crate) fn set_env(&mut self, key: String, var: String) {
        self.env.insert(key, var);
    }

    fn record(&mut self, text: &str, key: &str, span: Option<std::ops::Range<usize>>) {
        if let Some(span) = span {
            self.lines
                .entry(key.to_string())
                .or_insert_with(|| line_of(text, span.start));
        }
    }

    fn walk_table(&mut self, text: &str, path: &str, table: &dyn TableLike) {
        for (name, _) in table.iter() {
            let Some((key, item)) = table.get_key_value(name) else {
                continue;
            };
            let child = join(path, name);
            self.record(text, &child, key.span());
            self.walk_item(text, &child, item);
        }
    }

    fn walk_item(&mut self, text: &str, path: &str, item: &Item) {
        match item {
            Item::Table(t) => {
                self.record(text, path, t.span());
                self.walk_table(text, path, t);
            }
            Item::ArrayOfTables(arr) => {
                for (i, t) in arr.iter().enumerate() {
                    let child = index(path, i);
                    self.record(text, &child, t.span());
                    self.walk_table(text, &child, t);
                }
            }
            Item::Value(v) => self.walk_value(text, path, v),
            Item::None => {}
        }
    }

    fn walk_value(&mut self, text: &str, path: &str, value: &Value) {
        self.record(text, path, value.span());
        match value {
            Value::Array(arr) => {
                for (i, v) in arr.iter().enumerate() {
                    self.walk_value(text, &index(path, i), v);
                }
            }
            Value::InlineTable(t) => self.walk_table(text, path, t),
            _ => {}
        }
    }

    /// Where `key` (or its nearest located ancestor) came from.
    pub(crate) fn origin(&self, key: &str) -> Option<Origin> {
        let mut k = Some(key);
        while let Some(cur) = k {
            if let Some(var) = self.env.get(cur) {
                return Some(Origin::Env { var: var.clone() });
            }
            if let Some(line) = self.lines.get(cur) {
                return Some(Origin::File { line: Some(*line) });
            }
            k = parent_of(cur);
        }
        None
    }

    /// An error at `key`, located.
    pub(crate) fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, key, message).at(self.origin(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_keys() {
        let text = "[source]\nurl = \"x\"\n\n[[tables]]\ntable = \"a.b\"\n[[tables.rules]]\nwhen = \"1\"\n[[tables]]\nevents = { insert = \"x\" }\nid = [\n  \"a\",\n  \"b\",\n]\n";
        let doc = ImDocument::parse(text).unwrap();
        let loc = Locator::new("w.toml", text, &doc);
        let line = |k: &str| match loc.origin(k) {
            Some(Origin::File { line }) => line,
            _ => None,
        };
        assert_eq!(line("source.url"), Some(2));
        assert_eq!(line("tables[0]"), Some(4));
        assert_eq!(line("tables[0].rules[0].when"), Some(7));
        assert_eq!(line("tables[1].events.insert"), Some(9));
        assert_eq!(line("tables[1].id[1]"), Some(12));
        // Unknown keys fall back to their nearest ancestor.
        assert_eq!(line("tables[1].entity"), Some(8));
    }
}
