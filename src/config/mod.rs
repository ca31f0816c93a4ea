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
mod keys;
mod locate;
mod raw;
mod schema;
mod secret;
mod size;
mod template;
mod types;
mod validate;

use std::path::Path;

use figment::Figment;
use figment::providers::{Format as _, Toml};
use figment::value::{Dict, Value};

pub use duration::parse_duration;
pub use error::{ConfigError, ConfigErrors, Origin};
pub use keys::{Ed25519Key, PUBLIC_KEY_PREFIX, SECRET_KEY_PREFIX, SigningKeys};
pub use schema::{json_schema, keys as schema_keys};
pub use secret::{DatabaseUrl, Secret};
pub use template::{TemplateError, TemplatePart, TextTemplate};
pub use types::*;
pub use validate::{DEFAULT_BACKOFF, DEFAULT_LISTEN, MAX_CONTEXT_DEPTH};

use env::EnvOverrides;
use locate::{Locator, index, join, line_of};

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
        let message = format!(
            "TOML syntax error: {}",
            e.message().trim().replace('\n', "; ")
        );
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
            ConfigErrors::single(ConfigError::new(
                file,
                "",
                format!("cannot merge config: {e}"),
            ))
        })?;
    let mut value = Value::from(merged);

    let mut expand_errors = Vec::new();
    expand::expand_tree(&mut value, "", lookup, &mut expand_errors);
    // A value left unexpanded is not checked again: "${LEVEL}" is no bad log level.
    let unexpanded: Vec<String> = expand_errors.iter().map(|e| e.key.clone()).collect();
    errors.extend(
        expand_errors
            .into_iter()
            .map(|e| loc.error(&e.key, e.message)),
    );

    let Some((raw, mut poisoned)) = deserialize_all(value, &loc, &mut errors) else {
        return Err(sorted(errors));
    };
    match validate::validate(raw, &loc) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(sorted(errors)),
        Err(more) => {
            poisoned.extend(unexpanded);
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
/// keys removed for type errors (their "missing" errors are suppressed later), or
/// `None` when an error could not be removed (then validation would only add noise).
fn deserialize_all(
    mut value: Value,
    loc: &Locator,
    errors: &mut Vec<ConfigError>,
) -> Option<(raw::RawConfig, Vec<String>)> {
    let mut poisoned = Vec::new();
    // Each round removes at least one key, so this ends; the bound is a safety net.
    for _ in 0..500 {
        let err = match value.deserialize::<raw::RawConfig>() {
            Ok(raw) => return Some((raw, poisoned)),
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
    None
}

/// Path segments to a dotted key: `["tables", "1", "id"]` -> `tables[1].id`.
fn dotted(segments: &[String]) -> String {
    segments
        .iter()
        .fold(String::new(), |acc, s| match s.parse::<usize>() {
            Ok(i) if !acc.is_empty() => index(&acc, i),
            _ => join(&acc, s),
        })
}

/// The path of the offending value, its dotted key and a message.
fn describe(e: &figment::Error) -> (Vec<String>, String, String) {
    use figment::error::Kind;
    match &e.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path usually ends with the field already.
            let mut path = e.path.clone();
            if path.last() != Some(field) {
                path.push(field.clone());
            }
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
        Kind::InvalidType(figment::error::Actual::Map, _)
            if e.path.last().is_some_and(|s| s.parse::<usize>().is_ok()) =>
        {
            // A struct given as an array of tables: `[[x.retry]]` for `[x.retry]`.
            let array = e.path[..e.path.len() - 1]
                .iter()
                .filter(|s| s.parse::<usize>().is_err())
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            let message = format!(
                "{} is a table, not a list of tables: write [{array}] instead of [[{array}]]",
                array.rsplit('.').next().unwrap_or(&array)
            );
            (e.path.clone(), dotted(&e.path), message)
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
            Value::Array(_, items) => {
                match seg.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                    Some(v) => v,
                    None => return false,
                }
            }
            _ => return false,
        };
    }
    match cur {
        Value::Dict(_, d) => d.remove(last).is_some(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    const EXAMPLE: &str = include_str!("../../config/walhook.toml");
    const DB: &str = "postgres://walhook:pg-pass-123@db.internal:5432/app";
    // 32 bytes, base64.
    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn load_ok(toml: &str, pairs: &[(&str, &str)]) -> Config {
        match load_str(toml, "walhook.toml", &env_of(pairs)) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    fn load_err(toml: &str, pairs: &[(&str, &str)]) -> ConfigErrors {
        match load_str(toml, "walhook.toml", &env_of(pairs)) {
            Ok(_) => panic!("expected errors"),
            Err(e) => e,
        }
    }

    /// The error at `key`, with its line.
    fn find<'a>(errors: &'a ConfigErrors, key: &str) -> &'a ConfigError {
        errors
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("no error at {key}; got:\n{errors}"))
    }

    #[test]
    fn example_config_loads() {
        let c = load_ok(EXAMPLE, &[("DATABASE_URL", DB)]);
        assert_eq!(c.source.url.redacted(), "walhook@db.internal:5432/app");
        let src = c.source.url.expose();
        assert_eq!(
            src.password_for(&src.hosts[0]).as_deref(),
            Some("pg-pass-123")
        );
        assert_eq!(c.store.url, c.source.url);
        assert_eq!(c.tables.len(), 2);
        let users = &c.tables[0];
        assert_eq!(
            (users.schema.as_str(), users.name.as_str()),
            ("public", "users")
        );
        assert_eq!(
            users.columns,
            Columns::Exclude(vec!["password_hash".into()])
        );
        assert_eq!(users.events.update.as_deref(), Some("user.updated"));
        assert_eq!(users.rules[0].event, "user.suspended");
        assert!(users.rules[0].reads_old && !users.rules[0].reads_changed);
        assert_eq!(users.needs_full_identity().len(), 2);
        let roles = &c.tables[1];
        assert_eq!(
            roles.events,
            EventNames {
                insert: Some("user.role.assigned".into()),
                update: None,
                delete: Some("user.role.unassigned".into()),
            }
        );
        assert!(roles.needs_full_identity().is_empty());
        let crm = c.subscription("crm").unwrap();
        assert!(crm.events.matches("user.role.assigned"));
        assert!(!crm.events.matches("organisation.created"));
        assert_eq!(crm.url_redacted(), "https://crm.example.com");
        assert!(c.inactive_keys().is_empty());
    }

    #[test]
    fn defaults_filled() {
        let c = load_ok("[source]\nurl = \"postgres://localhost/app\"\n", &[]);
        assert_eq!(c.source.slot, "walhook");
        assert_eq!(c.source.publication, "walhook");
        assert_eq!(c.store.url, c.source.url);
        assert_eq!(c.store.schema, "walhook");
        assert_eq!(c.store.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.store.dead_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.store.paused_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.server.listen, "127.0.0.1:7187".parse().unwrap());
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.daemon.shutdown_grace, Duration::from_secs(30));

        let c = load_ok(
            "[source]\nurl = \"postgres://localhost/app\"\n\
             [[tables]]\ntable = \"public.orders\"\n\
             [[subscriptions]]\nname = \"a\"\nurl = \"http://localhost:8080/\"\nevents = [\"*\"]\n",
            &[],
        );
        let t = &c.tables[0];
        assert_eq!(t.entity, "orders");
        assert_eq!(t.id, None);
        assert_eq!(t.columns, Columns::All);
        assert_eq!(t.events.insert.as_deref(), Some("orders.created"));
        assert_eq!(t.events.delete.as_deref(), Some("orders.deleted"));
        let s = &c.subscriptions[0];
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.max_in_flight, 16);
        assert_eq!(s.ordering, Ordering::Entity);
        assert_eq!(s.payload, Payload::Full);
        assert!(!s.tls_insecure && s.keys.is_empty() && s.filter.is_none());
        assert_eq!(s.retry.backoff.len(), 7);
        assert_eq!(s.retry.backoff[1], Duration::from_secs(300));
        assert_eq!(s.retry.max_age, Duration::from_secs(3 * 86_400));
    }

    #[test]
    fn env_override_wins_over_file() {
        let toml = "[source]\nurl = \"postgres://file/app\"\n[log]\nlevel = \"info\"\n";
        let c = load_ok(
            toml,
            &[
                ("WALHOOK_LOG__LEVEL", "debug"),
                ("WALHOOK_SOURCE__URL", "postgres://env/app"),
                ("WALHOOK_STORE__SCHEMA", "hooks"),
            ],
        );
        assert_eq!(c.log.level, "debug");
        assert_eq!(
            c.source.url.expose().hosts[0].host,
            crate::pg::Host::Tcp("env".into())
        );
        assert_eq!(c.store.schema, "hooks");
    }

    #[test]
    fn env_override_errors_name_the_variable() {
        let e = load_err(
            "[source]\nurl = \"postgres://x/app\"\n",
            &[("WALHOOK_SERVER__LISTEN", "nowhere")],
        );
        let err = find(&e, "server.listen");
        assert_eq!(err.env_var.as_deref(), Some("WALHOOK_SERVER__LISTEN"));
        assert!(
            e.to_string()
                .contains("(env WALHOOK_SERVER__LISTEN): server.listen"),
            "{e}"
        );
    }

    #[test]
    fn delivery_proxy_is_off_by_default_and_checked_without_echoing_it() {
        let base = "[source]\nurl = \"postgres://x/app\"\n";
        assert_eq!(load_ok(base, &[]).delivery.proxy, None);

        let c = load_ok(
            &format!("{base}[delivery]\nproxy = \"http://u:pw@proxy.internal:3128\"\n"),
            &[],
        );
        let proxy = c.delivery.proxy.as_ref().expect("a proxy");
        assert_eq!(proxy.expose().host_str(), Some("proxy.internal"));
        assert_eq!(
            c.delivery.proxy_redacted().as_deref(),
            Some("http://proxy.internal:3128")
        );
        assert!(
            !format!("{c:?}").contains("pw@"),
            "the password is redacted"
        );

        let c = load_ok(base, &[("WALHOOK_DELIVERY__PROXY", "https://p.example")]);
        assert_eq!(
            c.delivery.proxy_redacted().as_deref(),
            Some("https://p.example:443")
        );

        for bad in [
            "socks5://u:s3cret@p:1080",
            "u:s3cret@proxy:3128",
            "http://",
            "not a url",
        ] {
            let e = load_err(&format!("{base}[delivery]\nproxy = \"{bad}\"\n"), &[]);
            let err = find(&e, "delivery.proxy");
            assert_eq!(err.line, Some(4), "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
            assert!(e.to_string().contains("http://"), "{e}");
        }
    }

    #[test]
    fn var_expansion_and_missing_var() {
        let c = load_ok(
            "[source]\nurl = \"postgres://u:${PGPASS}@db/app\"\n[store]\nschema = \"wh_${SUFFIX}\"\n",
            &[("PGPASS", "pw"), ("SUFFIX", "prod")],
        );
        let src = c.source.url.expose();
        assert_eq!(src.password_for(&src.hosts[0]).as_deref(), Some("pw"));
        assert_eq!(c.store.schema, "wh_prod");

        let e = load_err(
            "[source]\nurl = \"postgres://x/app\"\n\n[log]\nlevel = \"${LEVEL}\"\n",
            &[],
        );
        let err = find(&e, "log.level");
        assert_eq!(err.line, Some(5));
        assert!(err.message.contains("LEVEL"), "{err}");
        // Only the missing variable: the unexpanded text is not judged as a level.
        assert_eq!(e.len(), 1, "{e}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = load_err(
            "[source]\nurl = \"postgres://x/app\"\n[store]\nretenton = \"7d\"\n[[tables]]\ntable = \"public.a\"\ncolour = 1\n",
            &[],
        );
        let err = find(&e, "store.retenton");
        assert_eq!(err.line, Some(4));
        assert!(err.message.contains("did you mean \"retention\""), "{err}");
        assert_eq!(find(&e, "tables[0].colour").line, Some(7));
        assert!(
            e.to_string()
                .contains("walhook.toml:4: store.retenton: unknown key"),
            "{e}"
        );
    }

    #[test]
    fn every_problem_reported_at_once() {
        let toml = r#"[source]
url = "postgres://x/app"

[[subscriptions]]
name = "crm"
url = "https://crm.example.com/hooks"
events = ["user.*", "user.["]
timeout = "10 sec"
filter = "event.data.org_id == "

[[subscriptions]]
name = "crm"
url = "https://other.example.com/"
events = ["*"]

[[subscriptions]]
name = "CRM Sync"
url = "ftp://x.example.com/"
events = ["*"]
max_in_flight = "many"

[[subscriptions.retry]]
"#;
        let e = load_err(toml, &[]);
        let glob = find(&e, "subscriptions[0].events[1]");
        assert_eq!(glob.line, Some(7));
        assert!(glob.message.starts_with("bad glob \"user.[\""), "{glob}");
        assert_eq!(find(&e, "subscriptions[0].timeout").line, Some(8));
        let cel = find(&e, "subscriptions[0].filter");
        assert_eq!(cel.line, Some(9));
        assert!(cel.message.starts_with("bad CEL"), "{cel}");
        let dup = find(&e, "subscriptions[1].name");
        assert_eq!(dup.line, Some(12));
        assert!(
            dup.message
                .contains("(first at subscriptions[0].name, line 5)"),
            "{dup}"
        );
        let bad = find(&e, "subscriptions[2].name");
        assert_eq!(bad.line, Some(17));
        assert!(bad.message.contains("\"crm-sync\""), "{bad}");
        assert_eq!(find(&e, "subscriptions[2].url").line, Some(18));
        assert_eq!(find(&e, "subscriptions[2].max_in_flight").line, Some(20));
        let retry = find(&e, "subscriptions[2].retry[0]");
        assert!(
            retry.message.contains("write [subscriptions.retry]"),
            "{retry}"
        );
        // A removed value does not come back as a second "missing" error.
        assert_eq!(
            e.iter()
                .filter(|e| e.key.starts_with("subscriptions[2].m"))
                .count(),
            1
        );
        // Sorted by line, each line of the report names file and line.
        let lines: Vec<usize> = e.iter().filter_map(|e| e.line).collect();
        assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
        assert!(
            e.to_string()
                .contains("walhook.toml:7: subscriptions[0].events[1]: bad glob"),
            "{e}"
        );
    }

    #[test]
    fn table_problems() {
        let toml = r#"[source]
url = "postgres://x/app"
[[tables]]
table = "users"
[[tables]]
table = "public.orders"
include_columns = ["id"]
exclude_columns = ["secret"]
[[tables]]
table = "public.orders"
events = { insert = "bad name", update = false }
[[tables.rules]]
event = "orders.big"
when = "new.total >"
[[tables]]
table = "public.items"
events = { insert = false, update = false, delete = false }
"#;
        let e = load_err(toml, &[]);
        assert!(
            find(&e, "tables[0].table")
                .message
                .contains("\"public.users\""),
            "{e}"
        );
        assert_eq!(find(&e, "tables[1].exclude_columns").line, Some(8));
        assert!(
            find(&e, "tables[2].table")
                .message
                .contains("already declared (tables[1].table, line 6)"),
            "{e}"
        );
        assert!(!e.iter().any(|e| e.key == "tables[0].entity"), "{e}");
        assert_eq!(find(&e, "tables[2].events.insert").line, Some(11));
        assert_eq!(find(&e, "tables[2].rules[0].when").line, Some(14));
        find(&e, "tables[3].events");
    }

    #[test]
    fn secret_and_header_problems_never_echo_values() {
        let toml = r#"[source]
url = "postgres://x/app"
[[subscriptions]]
name = "a"
url = "https://a.example.com/"
events = ["*"]
secret = ["whsec_not*base64", "tooshort-top-secret"]
headers = { webhook-signature = "x", X-Token = "line\nbreak-top-secret" }
"#;
        let e = load_err(toml, &[]);
        assert_eq!(find(&e, "subscriptions[0].secret[0]").line, Some(7));
        find(&e, "subscriptions[0].secret[1]");
        find(&e, "subscriptions[0].headers.webhook-signature");
        find(&e, "subscriptions[0].headers.X-Token");
        let text = e.to_string();
        assert!(
            !text.contains("top-secret") && !text.contains("not*base64"),
            "{text}"
        );
    }

    #[test]
    fn glob_star_matches_dots() {
        let toml = format!(
            "[source]\nurl = \"postgres://x/app\"\n[[subscriptions]]\nname = \"a\"\nurl = \"https://a.example.com/\"\nevents = [\"user.*\", \"*.deleted\"]\nsecret = \"{KEY}\"\n"
        );
        let c = load_ok(&toml, &[]);
        let p = &c.subscriptions[0].events;
        assert!(p.matches("user.role.assigned"));
        assert!(p.matches("user.created"));
        assert!(p.matches("organisation.member.deleted"));
        assert!(!p.matches("users.created"));
        assert!(!p.matches("organisation.created"));
        assert!(
            matches!(&c.subscriptions[0].keys, SigningKeys::V1(k) if k[0].expose().len() == 24)
        );
    }

    #[test]
    fn secrets_never_in_debug_output() {
        let toml = format!(
            r#"[source]
url = "postgres://app:pg-pass-123@db/app?sslmode=require"
[store]
url = "postgres://store:store-pass-456@db/app"
[[subscriptions]]
name = "a"
url = "https://hooks.example.com/T000/B000/url-token-789"
events = ["*"]
headers = {{ Authorization = "Bearer header-token-abc" }}
secret = ["{KEY}", "${{OLD_KEY}}"]
"#
        );
        let c = load_ok(&toml, &[("OLD_KEY", KEY)]);
        let debug = format!("{c:?}");
        for leak in [
            "pg-pass-123",
            "store-pass-456",
            "url-token-789",
            "header-token-abc",
            KEY,
            "MfKQ9r8",
        ] {
            assert!(!debug.contains(leak), "{leak} leaked in {debug}");
        }
        assert!(debug.contains("DatabaseUrl(app@db:5432/app)"), "{debug}");
        assert_eq!(
            c.subscriptions[0].headers["Authorization"].expose(),
            "Bearer header-token-abc"
        );
    }

    #[test]
    fn every_key_of_the_syntax_is_active() {
        let toml = r#"[source]
url = "postgres://x/app"
[[tables]]
table = "public.orders"
snapshot = true
[[tables.context]]
name = "customer"
table = "public.customers"
key = "customer_id"
[[tables.aggregate]]
event = "orders.imported"
op = "insert"
min_rows = 100
[[subscriptions]]
name = "chat"
url = "https://hooks.example.com/x"
events = ["orders.*"]
format = "slack"
slack = { text = "new order" }
"#;
        let c = load_ok(toml, &[]);
        assert!(c.inactive_keys().is_empty(), "{:?}", c.inactive_keys());
    }

    #[test]
    fn rules_record_old_and_changed_reads() {
        let toml = r#"[source]
url = "postgres://x/app"
[[tables]]
table = "public.a"
update_columns = ["x"]
[[tables.rules]]
event = "a.moved"
when = "'x' in changed"
[[tables.rules]]
event = "a.big"
when = "new.size > 10"
"#;
        let c = load_ok(toml, &[]);
        let t = &c.tables[0];
        assert!(t.rules[0].reads_changed && !t.rules[0].reads_old);
        assert!(!t.rules[1].reads_changed && !t.rules[1].reads_old);
        assert_eq!(t.needs_full_identity().len(), 2);
    }

    #[test]
    fn missing_file_and_syntax_errors() {
        let e = load(Path::new("/nonexistent/walhook.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/walhook.toml"), "{e}");
        assert!(e.to_string().contains("cannot read config file"), "{e}");

        let e = load_err("[source]\nurl = \"postgres://x/app\"\nslot = \n", &[]);
        assert_eq!(e.errors[0].line, Some(3), "{e}");
        // One line per problem.
        assert!(!e.errors[0].message.contains('\n'), "{e}");
    }

    #[test]
    fn id_accepts_a_string_and_events_true_keeps_default() {
        let toml = "[source]\nurl = \"postgres://x/app\"\n[[tables]]\ntable = \"app.Orders\"\nentity = \"order\"\nid = \"order_no\"\nevents = { update = true }\n";
        let c = load_ok(toml, &[]);
        assert_eq!(c.tables[0].id, Some(vec!["order_no".to_string()]));
        assert_eq!(c.tables[0].events.update.as_deref(), Some("order.updated"));
        assert_eq!(c.tables[0].qualified_name(), "app.Orders");
    }

    #[test]
    fn missing_source_url_is_required() {
        let e = load_err("", &[]);
        assert!(
            find(&e, "source.url")
                .message
                .contains("WALHOOK_SOURCE__URL"),
            "{e}"
        );
    }
}
