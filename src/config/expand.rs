//! `${VAR}` expansion in string values, done after file and env are merged.

use figment::value::Value;

use super::locate::{index, join};

/// A `${VAR}` that could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpandError {
    /// Dotted key of the string holding it.
    pub key: String,
    pub message: String,
}

/// Expands `${VAR}` in every string leaf of `value`, in place. `$${` stands for a
/// literal `${`. Returns one error per bad reference.
pub(crate) fn expand_tree(
    value: &mut Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ExpandError>,
) {
    match value {
        Value::String(_, s) if s.contains('$') => match expand_str(s, lookup) {
            Ok(expanded) => *s = expanded,
            Err(message) => errors.push(ExpandError {
                key: path.to_string(),
                message,
            }),
        },
        Value::Dict(_, dict) => {
            for (k, v) in dict.iter_mut() {
                expand_tree(v, &join(path, k), lookup, errors);
            }
        }
        Value::Array(_, items) => {
            for (i, v) in items.iter_mut().enumerate() {
                expand_tree(v, &index(path, i), lookup, errors);
            }
        }
        _ => {}
    }
}

/// Expands one string. Errors name the variable, never the value.
pub(crate) fn expand_str(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut missing = Vec::new();
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else {
                return Err(
                    "unterminated \"${\": write ${VAR}, or $${ for a literal \"${\"".into(),
                );
            };
            let name = &tail[..end];
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!(
                    "bad variable name \"{name}\" in ${{...}}: use letters, digits and _"
                ));
            }
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => missing.push(name.to_string()),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    match missing.len() {
        0 => Ok(out),
        1 => Err(format!(
            "environment variable {} is not set (referenced as ${{{}}})",
            missing[0], missing[0]
        )),
        _ => Err(format!(
            "environment variables {} are not set",
            missing.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_and_escapes() {
        assert_eq!(expand_str("x${A}y", &env), Ok("xalphay".into()));
        assert_eq!(expand_str("${EMPTY}", &env), Ok(String::new()));
        assert_eq!(expand_str("$${A} $5", &env), Ok("${A} $5".into()));
        assert_eq!(expand_str("no vars", &env), Ok("no vars".into()));
    }

    #[test]
    fn reports_missing_and_malformed() {
        let e = expand_str("${NOPE}", &env).unwrap_err();
        assert!(e.contains("NOPE"), "{e}");
        assert!(expand_str("${A", &env).is_err());
        assert!(expand_str("${A-B}", &env).is_err());
        let e = expand_str("${X} ${Y}", &env).unwrap_err();
        assert!(e.contains("X, Y"), "{e}");
    }
}
