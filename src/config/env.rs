//! Env overrides `WALHOOK_SECTION__KEY`, as a figment provider.

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::locate::join;
use super::raw::OVERRIDABLE;

/// Prefix of override variables.
pub(crate) const PREFIX: &str = "WALHOOK_";

/// Overrides found in the environment.
#[derive(Debug, Default)]
pub(crate) struct EnvOverrides {
    /// `section -> key -> value`, ready to merge over the file.
    pub dict: Dict,
    /// `(dotted key, var name)` of each override, for error messages.
    pub sources: Vec<(String, String)>,
    /// Variables that look like overrides but match no overridable key.
    pub unknown: Vec<String>,
}

/// The var name that overrides `section.key`.
pub(crate) fn var_name(section: &str, key: &str) -> String {
    format!("{PREFIX}{}__{}", section.to_uppercase(), key.to_uppercase())
}

impl EnvOverrides {
    /// Collects overrides. `names` are candidate variable names: every known override
    /// name when only a lookup function is available, or every `WALHOOK_*` name of the
    /// process environment (then unknown ones are reported). Names match
    /// case-insensitively, as figment's `Env` does; values are always strings (every
    /// overridable key is a string), so a password is never reinterpreted as a number.
    pub(crate) fn collect(names: &[String], lookup: &dyn Fn(&str) -> Option<String>) -> Self {
        let mut out = EnvOverrides::default();
        for name in names {
            let upper = name.to_uppercase();
            let Some(rest) = upper.strip_prefix(PREFIX) else {
                continue;
            };
            // `WALHOOK_CONFIG` and other single-level names are not overrides.
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            let (section, key) = (section.to_lowercase(), key.to_lowercase());
            let known = OVERRIDABLE
                .iter()
                .any(|(s, keys)| *s == section && keys.contains(&key.as_str()));
            if !known {
                out.unknown.push(name.clone());
                continue;
            }
            let Some(value) = lookup(name) else {
                continue;
            };
            let section_dict = out
                .dict
                .entry(section.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, d) = section_dict {
                d.insert(key.clone(), Value::from(value));
            }
            out.sources.push((join(&section, &key), name.clone()));
        }
        out
    }

    /// Every override name, for probing a lookup function.
    pub(crate) fn known_names() -> Vec<String> {
        OVERRIDABLE
            .iter()
            .flat_map(|(s, keys)| keys.iter().map(move |k| var_name(s, k)))
            .collect()
    }
}

impl Provider for EnvOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable(s)")
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut map = Map::new();
        map.insert(Profile::Default, self.dict.clone());
        Ok(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_known_and_flags_unknown() {
        let names = vec![
            "WALHOOK_SOURCE__URL".to_string(),
            "WALHOOK_log__level".to_string(),
            "WALHOOK_CONFIG".to_string(),
            "WALHOOK_STORE__RETENTON".to_string(),
        ];
        let o = EnvOverrides::collect(&names, &|n| Some(format!("v-{n}")));
        assert_eq!(o.unknown, vec!["WALHOOK_STORE__RETENTON".to_string()]);
        assert_eq!(o.sources.len(), 2);
        assert!(
            o.sources
                .contains(&("log.level".into(), "WALHOOK_log__level".into()))
        );
        assert!(EnvOverrides::known_names().contains(&"WALHOOK_DAEMON__SHUTDOWN_GRACE".into()));
    }
}
