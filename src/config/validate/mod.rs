//! `validate`: raw serde structs -> ready types, reporting every problem at once.
//! Sections here; `tables` and `subscriptions` in their own files.

use std::net::SocketAddr;
use std::time::Duration;

use super::duration::parse_duration;
use super::error::ConfigError;
use super::locate::{Locator, index};
use super::raw::*;
use super::secret::{DatabaseUrl, Secret};
use super::size::parse_size;
use super::types::*;
use crate::pg::ConnInfo;

pub use context::MAX_CONTEXT_DEPTH;

/// Default retry schedule of a subscription.
pub const DEFAULT_BACKOFF: &[&str] = &["5s", "5m", "30m", "2h", "5h", "10h", "10h"];

/// Default `server.listen`. Port 7187 is outside 9090-9999 and 10000 up, the ranges of
/// Prometheus' "default port allocations" list (9100-9999 is fully allocated; 9187,
/// walhook's first default, is postgres_exporter's, which often runs on the same host),
/// and is no well-known service's port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7187";

/// Turns the raw config into ready types, or returns every problem found.
pub(crate) fn validate(raw: RawConfig, loc: &Locator) -> Result<Config, Vec<ConfigError>> {
    let mut v = Validator {
        loc,
        errors: Vec::new(),
    };
    let source = v.source(raw.source);
    let store = v.store(raw.store, source.as_ref().map(|s| &s.url));
    let server = v.server(raw.server);
    let log = v.log(raw.log);
    let daemon = DaemonConfig {
        shutdown_grace: v
            .duration(
                "daemon.shutdown_grace",
                raw.daemon.shutdown_grace,
                "30s",
                false,
            )
            .unwrap_or_default(),
        ingest_buffer: v
            .size(
                "daemon.ingest_buffer",
                raw.daemon.ingest_buffer,
                "4MiB",
                1 << 20,
            )
            .unwrap_or_default(),
    };
    let delivery = v.delivery(raw.delivery);
    let tables = v.tables(raw.tables);
    let subscriptions =
        v.subscriptions(raw.subscriptions, source.as_ref().map(|s| s.slot.as_str()));
    match (source, store, server, log) {
        (Some(source), Some(store), Some(server), Some(log)) if v.errors.is_empty() => Ok(Config {
            source,
            store,
            server,
            log,
            daemon,
            delivery,
            tables,
            subscriptions,
        }),
        _ => Err(v.errors),
    }
}

struct Validator<'a> {
    loc: &'a Locator,
    errors: Vec<ConfigError>,
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

fn is_name_segment(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn is_event_name(s: &str) -> bool {
    s.split('.').all(is_name_segment)
}

/// Suggests a valid subscription name for a bad one.
fn slugify(s: &str) -> String {
    let slug: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    slug.trim_matches('-').to_string()
}

fn compile_cel(source: &str) -> Result<cel::Program, String> {
    // The parser is third-party; a panic on odd input must not take the daemon down.
    match std::panic::catch_unwind(|| cel::Program::compile(source)) {
        Ok(Ok(program)) => Ok(program),
        Ok(Err(errors)) => {
            let text = errors.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("syntax error")
                .trim()
                .to_string();
            Err(first)
        }
        Err(_) => Err("the CEL parser could not handle this expression".to_string()),
    }
}

impl Validator<'_> {
    /// `key (line N)` for messages that point at another key.
    fn describe_key(&self, key: &str) -> String {
        match self.loc.origin(key) {
            Some(super::error::Origin::File { line: Some(line) }) => format!("{key}, line {line}"),
            Some(super::error::Origin::Env { var }) => format!("{key}, env {var}"),
            _ => key.to_string(),
        }
    }

    fn err(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(self.loc.error(key, message));
    }

    fn required<T>(&mut self, key: &str, value: Option<T>, hint: &str) -> Option<T> {
        if value.is_none() {
            self.err(key, format!("missing required key{hint}"));
        }
        value
    }

    fn duration(
        &mut self,
        key: &str,
        raw: Option<String>,
        default: &str,
        allow_zero: bool,
    ) -> Option<Duration> {
        let text = raw.as_deref().unwrap_or(default);
        match parse_duration(text) {
            Ok(d) if d.is_zero() && !allow_zero => {
                self.err(
                    key,
                    format!("duration \"{text}\" must be greater than zero"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(message) => {
                self.err(key, message);
                None
            }
        }
    }

    /// A byte size of at least `min`.
    fn size(&mut self, key: &str, raw: Option<String>, default: &str, min: u64) -> Option<u64> {
        let text = raw.as_deref().unwrap_or(default);
        match parse_size(text) {
            Ok(n) if n < min => {
                self.err(
                    key,
                    format!("size \"{text}\" is too small: at least {min} bytes (\"1MiB\")"),
                );
                None
            }
            Ok(n) => Some(n),
            Err(message) => {
                self.err(key, message);
                None
            }
        }
    }

    /// A non-empty list of distinct, non-empty names.
    fn name_list(&mut self, key: &str, list: Vec<String>, what: &str) -> Option<Vec<String>> {
        if list.is_empty() {
            self.err(
                key,
                format!("empty list: name at least one {what}, or remove the key"),
            );
            return None;
        }
        let mut ok = true;
        for (i, name) in list.iter().enumerate() {
            if name.trim().is_empty() {
                self.err(&index(key, i), format!("empty {what} name"));
                ok = false;
            } else if list[..i].contains(name) {
                self.err(&index(key, i), format!("{what} \"{name}\" is listed twice"));
                ok = false;
            }
        }
        ok.then_some(list)
    }

    fn database_url(&mut self, key: &str, raw: &str) -> Option<DatabaseUrl> {
        // Never echo the value: it usually holds a password. The error names the
        // setting at fault, never its value's secret part.
        match ConnInfo::parse(raw) {
            Ok(info) => Some(DatabaseUrl::new(info)),
            Err(e) => {
                self.err(
                    key,
                    format!(
                        "{e}; expected a libpq connection string: postgres://user:password@host:5432/dbname or host=db port=5432 dbname=app user=walhook (PG* environment variables and ~/.pgpass fill what it leaves out)"
                    ),
                );
                None
            }
        }
    }

    fn source(&mut self, raw: RawSource) -> Option<SourceConfig> {
        let url = self.required(
            "source.url",
            raw.url,
            ": set url = \"${DATABASE_URL}\" or WALHOOK_SOURCE__URL",
        );
        let url = url.and_then(|u| self.database_url("source.url", &u));
        let slot = raw.slot.unwrap_or_else(|| "walhook".into());
        let slot_ok = !slot.is_empty()
            && slot.len() <= 63
            && slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !slot_ok {
            self.err(
                "source.slot",
                format!(
                    "bad slot name \"{slot}\": use lowercase letters, digits and _ (at most 63)"
                ),
            );
        }
        let publication = raw.publication.unwrap_or_else(|| "walhook".into());
        if !is_ident(&publication) {
            self.err(
                "source.publication",
                format!("bad publication name \"{publication}\": use letters, digits and _"),
            );
        }
        Some(SourceConfig {
            url: url?,
            slot,
            publication,
        })
    }

    fn store(&mut self, raw: RawStore, source_url: Option<&DatabaseUrl>) -> Option<StoreConfig> {
        let url = match raw.url {
            Some(u) => self.database_url("store.url", &u),
            None => source_url.cloned(),
        };
        let schema = raw.schema.unwrap_or_else(|| "walhook".into());
        if !is_ident(&schema) {
            self.err(
                "store.schema",
                format!("bad schema name \"{schema}\": use letters, digits and _"),
            );
        }
        let retention = self.duration("store.retention", raw.retention, "7d", false);
        let dead_retention =
            self.duration("store.dead_retention", raw.dead_retention, "30d", false);
        let paused_retention =
            self.duration("store.paused_retention", raw.paused_retention, "7d", false);
        Some(StoreConfig {
            url: url?,
            schema,
            retention: retention?,
            dead_retention: dead_retention?,
            paused_retention: paused_retention?,
        })
    }

    fn server(&mut self, raw: RawServer) -> Option<ServerConfig> {
        let text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
        match text.parse::<SocketAddr>() {
            Ok(listen) => Some(ServerConfig { listen }),
            Err(e) => {
                let error = self
                    .loc
                    .error(
                        "server.listen",
                        format!("bad address \"{text}\": expected ip:port, e.g. \"0.0.0.0:7187\""),
                    )
                    .with_cause(e);
                self.errors.push(error);
                None
            }
        }
    }

    /// `[delivery]`. A bad proxy URL is reported by its reason only, never echoed: it
    /// may hold a password.
    fn delivery(&mut self, raw: RawDelivery) -> DeliveryConfig {
        const EXAMPLE: &str = "e.g. \"http://proxy.internal:3128\"";
        let proxy = raw.proxy.and_then(|text| match url::Url::parse(&text) {
            Ok(url) if !matches!(url.scheme(), "http" | "https") => {
                self.err(
                    "delivery.proxy",
                    format!("proxy URL must start with http:// or https://, {EXAMPLE}"),
                );
                None
            }
            Ok(url) if url.host_str().is_none_or(str::is_empty) => {
                self.err(
                    "delivery.proxy",
                    format!("proxy URL has no host, {EXAMPLE}"),
                );
                None
            }
            Ok(url) => Some(Secret::new(url)),
            Err(e) => {
                let error = self
                    .loc
                    .error(
                        "delivery.proxy",
                        format!(
                            "not a valid proxy URL ({e}); expected http://host:port, {EXAMPLE}"
                        ),
                    )
                    .with_cause(e);
                self.errors.push(error);
                None
            }
        });
        DeliveryConfig { proxy }
    }

    fn log(&mut self, raw: RawLog) -> Option<LogConfig> {
        let level = raw.level.unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&level) {
            let error = self
                .loc
                .error(
                    "log.level",
                    format!(
                        "bad log level \"{level}\" ({e}); use error, warn, info, debug or trace"
                    ),
                )
                .with_cause(e);
            self.errors.push(error);
            return None;
        }
        Some(LogConfig {
            format: raw.format.unwrap_or_default(),
            level,
        })
    }

    /// `schema.table` -> (schema, table).
    fn qualified_table(&mut self, key: &str, raw: &str) -> Option<(String, String)> {
        match raw.split_once('.') {
            Some((schema, name))
                if !schema.is_empty() && !name.is_empty() && !name.contains('.') =>
            {
                Some((schema.to_string(), name.to_string()))
            }
            _ => {
                self.err(
                    key,
                    format!(
                        "table \"{raw}\" must be schema-qualified, e.g. \"public.{}\"",
                        raw.rsplit('.').next().unwrap_or(raw)
                    ),
                );
                None
            }
        }
    }

    fn full_event_name(&mut self, key: &str, raw: Option<String>) -> Option<String> {
        let name = self.required(key, raw, ": a full event name such as \"user.suspended\"")?;
        if !is_event_name(&name) {
            self.err(
                key,
                format!(
                    "bad event name \"{name}\": dot-separated parts of letters, digits, _ and -, e.g. \"user.suspended\""
                ),
            );
            return None;
        }
        Some(name)
    }

    fn cel(&mut self, key: &str, source: &str) -> Option<CelProgram> {
        match compile_cel(source) {
            Ok(program) => Some(CelProgram::new(source, program)),
            Err(message) => {
                self.err(key, format!("bad CEL \"{source}\": {message}"));
                None
            }
        }
    }
}

mod context;
mod keys;
mod set;
mod slack;
mod subscriptions;
mod tables;
