//! Text templates with envelope-path placeholders, for `slack = { text = "..." }`:
//! `"{type} {entity_id} is now {data.status}"`. `{{` and `}}` stand for literal braces.
//!
//! Parsing only splits the text; which paths exist is checked by the validator (it
//! knows the envelope's fields), and filling in values is the delivery stage's job.

use std::fmt;

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    /// Text kept as written (braces already unescaped).
    Literal(String),
    /// An envelope path, split on dots: `{data.status}` is `["data", "status"]`.
    Path(Vec<String>),
}

/// A parsed text template: literal text and placeholders, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextTemplate {
    /// The template as written, for messages.
    pub source: String,
    /// The pieces, adjacent literals merged.
    pub parts: Vec<TemplatePart>,
}

/// Why a template does not parse; offsets are character positions from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// A `{` with no `}` after it.
    Unclosed { at: usize },
    /// A `}` that closes nothing (write `}}` for a literal brace).
    StrayClose { at: usize },
    /// `{}` or `{ }`.
    Empty { at: usize },
    /// A `{` inside a placeholder.
    Nested { at: usize },
    /// A placeholder with an empty path part (`{data..x}`, `{.id}`) or whitespace
    /// inside the path.
    BadPath { at: usize, path: String },
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Unclosed { at } => write!(
                f,
                "unclosed placeholder: the {{ at character {at} has no }} (write {{{{ for a literal brace)"
            ),
            TemplateError::StrayClose { at } => write!(
                f,
                "the }} at character {at} closes no placeholder (write }}}} for a literal brace)"
            ),
            TemplateError::Empty { at } => write!(
                f,
                "empty placeholder at character {at}; name an envelope path such as {{entity_id}}"
            ),
            TemplateError::Nested { at } => write!(
                f,
                "a {{ inside a placeholder at character {at}; placeholders do not nest"
            ),
            TemplateError::BadPath { at, path } => write!(
                f,
                "bad placeholder {{{path}}} at character {at}: a path is names joined by dots, e.g. {{data.status}}"
            ),
        }
    }
}

impl std::error::Error for TemplateError {}

impl TextTemplate {
    /// Splits `text` into literals and placeholders. Whitespace around a path inside
    /// the braces is ignored (`{ type }` is `{type}`).
    pub fn parse(text: &str) -> Result<TextTemplate, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().enumerate().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::StrayClose { at: i + 1 }),
                '{' => {
                    let mut inner = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(TemplateError::Unclosed { at: i + 1 }),
                            Some((_, '}')) => break,
                            Some((j, '{')) => return Err(TemplateError::Nested { at: j + 1 }),
                            Some((_, c)) => inner.push(c),
                        }
                    }
                    let path = inner.trim();
                    if path.is_empty() {
                        return Err(TemplateError::Empty { at: i + 1 });
                    }
                    let split: Vec<String> = path.split('.').map(str::to_string).collect();
                    if split
                        .iter()
                        .any(|p| p.is_empty() || p.contains(char::is_whitespace))
                    {
                        return Err(TemplateError::BadPath {
                            at: i + 1,
                            path: path.to_string(),
                        });
                    }
                    if !literal.is_empty() {
                        parts.push(TemplatePart::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(TemplatePart::Path(split));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(TemplatePart::Literal(literal));
        }
        Ok(TextTemplate {
            source: text.to_string(),
            parts,
        })
    }

    /// The placeholders' paths, in order.
    pub fn paths(&self) -> impl Iterator<Item = &[String]> {
        self.parts.iter().filter_map(|p| match p {
            TemplatePart::Path(path) => Some(path.as_slice()),
            TemplatePart::Literal(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::TemplatePart::{Literal, Path};
    use super::*;

    fn path(p: &str) -> TemplatePart {
        Path(p.split('.').map(str::to_string).collect())
    }

    #[test]
    fn splits_literals_and_paths() {
        let t = TextTemplate::parse(
            "{type} {entity} {entity_id} is now {data.status} (revision {revision})",
        )
        .unwrap();
        assert_eq!(
            t.parts,
            vec![
                path("type"),
                Literal(" ".into()),
                path("entity"),
                Literal(" ".into()),
                path("entity_id"),
                Literal(" is now ".into()),
                path("data.status"),
                Literal(" (revision ".into()),
                path("revision"),
                Literal(")".into()),
            ]
        );
        assert_eq!(
            t.paths().map(|p| p.join(".")).collect::<Vec<_>>(),
            ["type", "entity", "entity_id", "data.status", "revision"]
        );
    }

    #[test]
    fn doubled_braces_are_literal() {
        let t = TextTemplate::parse("{{literal}} {{{id}}} }}{{").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Literal("{literal} {".into()),
                path("id"),
                Literal("} }{".into())
            ]
        );
        assert_eq!(
            TextTemplate::parse("no placeholders").unwrap().parts,
            vec![Literal("no placeholders".into())]
        );
        assert!(TextTemplate::parse("").unwrap().parts.is_empty());
    }

    #[test]
    fn whitespace_around_a_path_is_ignored_and_unicode_offsets_count_characters() {
        let t = TextTemplate::parse("é { data.name }").unwrap();
        assert_eq!(t.parts, vec![Literal("é ".into()), path("data.name")]);
        assert_eq!(
            TextTemplate::parse("é {").unwrap_err(),
            TemplateError::Unclosed { at: 3 }
        );
    }

    #[test]
    fn malformed_templates_say_where() {
        let cases = [
            ("a {type", TemplateError::Unclosed { at: 3 }),
            ("a } b", TemplateError::StrayClose { at: 3 }),
            ("x {}", TemplateError::Empty { at: 3 }),
            ("x {  }", TemplateError::Empty { at: 3 }),
            ("{a{b}}", TemplateError::Nested { at: 3 }),
            (
                "{data..x}",
                TemplateError::BadPath {
                    at: 1,
                    path: "data..x".into(),
                },
            ),
            (
                "{.id}",
                TemplateError::BadPath {
                    at: 1,
                    path: ".id".into(),
                },
            ),
            (
                "{data. x}",
                TemplateError::BadPath {
                    at: 1,
                    path: "data. x".into(),
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(TextTemplate::parse(text).unwrap_err(), expected, "{text}");
        }
        assert_eq!(
            TemplateError::Unclosed { at: 3 }.to_string(),
            "unclosed placeholder: the { at character 3 has no } (write {{ for a literal brace)"
        );
        assert_eq!(
            TemplateError::StrayClose { at: 3 }.to_string(),
            "the } at character 3 closes no placeholder (write }} for a literal brace)"
        );
    }
}
