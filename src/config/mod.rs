//! Configuration: `walhook.toml` plus `WALHOOK_SECTION__KEY` env overrides, expanded
//! (`${VAR}`), parsed into raw serde structs, then validated into ready types.
//!
//! Pipeline: TOML text -> (toml_edit: key lines) -> figment (file, then env overrides)
//! -> `${VAR}` expansion on string leaves -> [`raw`] structs (`deny_unknown_fields`)
//! -> one `validate` that reports every problem at once ([`ConfigErrors`]).

mod duration;
mod env;
mod error;
mod expand;
mod locate;
mod raw;
mod secret;
mod types;
mod validate;

use std::path::Path;

use figment::providers::{Format as _, Toml};
use figment::value::{Dict, Value};
use figment::Figment;

pub use duration::parse_duration;
pub use error::{ConfigError, ConfigErrors, Origin};
pub use secret::{DatabaseUrl, Secret};
pub use types::*;
pub use validate::DEFAULT_BACKOFF;

use env::EnvOverrides;
use locate::{index, join, line_of, Locator};

/// Reads, expands and validates the config file at `path`, with overrides and `${VAR}`
/// values from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors::single(
            ConfigError::new(&file, "", format!("cannot read config file: {e}")).with_cause(e),
        )
    })?;
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| name.to_uppercase().starts_with(env::PREFIX))
        .collect();
    load_inner(&text, &file, &|name| std::env::var(name).ok(), &names)
}

/// Like [`load`] on a string: `origin` names the file in messages, `env` looks up
/// environment variables (for `${VAR}` and `WALHOOK_SECTION__KEY` overrides), so tests
/// need no global env. Overrides are found by probing every overridable key's name.
pub fn load_str(
    toml: &str,
    origin: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    load_inner(toml, origin, env, &EnvOverrides::known_names())
}

fn load_inner(
    text: &str,
    file: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    env_names: &[String],
) -> Result<Config, ConfigErrors> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        let message = format!("TOML syntax error: {}", e.message().trim());
        let mut error = ConfigError::new(file, "", message);
        error.line = line;
        ConfigErrors::single(error.with_cause(e))
    })?;
    let mut loc = Locator::new(file, text, &doc);
    let mut errors = Vec::new();

    let overrides = EnvOverrides::collect(env_names, lookup);
    for var in &overrides.unknown {
        let mut error = ConfigError::new(
            file,
            "",
            format!(
                "unknown override {var}: overridable keys are {}",
                EnvOverrides::known_names().join(", ")
            ),
        );
        error.env_var = Some(var.clone());
        errors.push(error);
    }
    for (key, var) in &overrides.sources {
        loc.set_env(key.clone(), var.clone());
    }

    let merged = Figment::from(Toml::string(text))
        .merge(overrides)
        .extract::<Dict>()
        .map_err(|e| {
            ConfigErrors::single(ConfigError::new(file, "", format!("cannot merge config: {e}")))
        })?;
    let mut value = Value::from(merged);

    let mut expand_errors = Vec::new();
    expand::expand_tree(&mut value, "", lookup, &mut expand_errors);
    errors.extend(expand_errors.into_iter().map(|e| loc.error(&e.key, e.message)));

    let (raw, poisoned) = deserialize_all(value, &loc, &mut errors);
    match validate::validate(raw, &loc) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(sorted(errors)),
        Err(more) => {
            // A value removed for a type error reappears as "missing"; report it once.
            errors.extend(more.into_iter().filter(|e| {
                !poisoned.iter().any(|p| {
                    e.key == *p
                        || e.key.starts_with(&format!("{p}."))
                        || e.key.starts_with(&format!("{p}["))
                })
            }));
            Err(sorted(errors))
        }
    }
}

fn sorted(mut errors: Vec<ConfigError>) -> ConfigErrors {
    errors.sort_by_key(|e| (e.env_var.is_some(), e.line.unwrap_or(usize::MAX)));
    ConfigErrors { errors }
}

/// Deserializes into the raw structs, collecting every serde error: each offending key
/// is reported, removed, and deserialization retried. Returns the raw config and the
/// keys removed for type errors (their "missing" errors are suppressed later).
fn deserialize_all(
    mut value: Value,
    loc: &Locator,
    errors: &mut Vec<ConfigError>,
) -> (raw::RawConfig, Vec<String>) {
    let mut poisoned = Vec::new();
    // Each round removes at least one key, so this ends; the bound is a safety net.
    for _ in 0..500 {
        let err = match value.deserialize::<raw::RawConfig>() {
            Ok(raw) => return (raw, poisoned),
            Err(err) => err,
        };
        let mut progressed = false;
        for e in err {
            let (segments, key, message) = describe(&e);
            errors.push(loc.error(&key, message));
            let mut target = segments.clone();
            // Removing one array element would shift the others: drop the whole array.
            while target.last().is_some_and(|s| s.parse::<usize>().is_ok()) {
                target.pop();
            }
            if !matches!(e.kind, figment::error::Kind::UnknownField(..)) {
                poisoned.push(dotted(&target));
            }
            if remove_at(&mut value, &target) {
                progressed = true;
            }
        }
        if !progressed {
            break;
        }
    }
    poisoned.push(String::new());
    (raw::RawConfig::default(), poisoned)
}

/// Path segments to a dotted key: `["tables", "1", "id"]` -> `tables[1].id`.
fn dotted(segments: &[String]) -> String {
    segments.iter().fold(String::new(), |acc, s| match s.parse::<usize>() {
        Ok(i) if !acc.is_empty() => index(&acc, i),
        _ => join(&acc, s),
    })
}

/// The path of the offending value, its dotted key and a message.
fn describe(e: &figment::Error) -> (Vec<String>, String, String) {
    use figment::error::Kind;
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            let mut path = e.path.clone();
            path.push(field.clone());
            let mut message = format!("unknown key \"{field}\"");
            match closest(field, expected) {
                Some(best) => message.push_str(&format!("; did you mean \"{best}\"?")),
                None if !expected.is_empty() => {
                    message.push_str(&format!("; expected one of: {}", expected.join(", ")))
                }
                None => {}
            }
            let key = dotted(&path);
            (path, key, message)
        }
        kind => (e.path.clone(), dotted(&e.path), kind.to_string()),
    }
}

/// The expected key closest to a misspelt one, if close enough.
fn closest<'a>(got: &str, expected: &[&'a str]) -> Option<&'a str> {
    expected
        .iter()
        .map(|e| (edit_distance(got, e), *e))
        .filter(|(d, e)| *d <= 2.max(e.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, e)| e)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Removes the value at `path`; false when there was nothing to remove.
fn remove_at(value: &mut Value, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        cur = match cur {
            Value::Dict(_, d) => match d.get_mut(seg) {
                Some(v) => v,
                None => return false,
            },
            Value::Array(_, items) => match seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match cur {
        Value::Dict(_, d) => d.remove(last).is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
