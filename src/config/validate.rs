//! `validate`: raw serde structs -> ready types, reporting every problem at once.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use super::duration::parse_duration;
use super::error::ConfigError;
use super::locate::{Locator, index, join};
use super::raw::*;
use super::secret::{DatabaseUrl, Secret};
use super::types::*;

/// Default retry schedule of a subscription.
pub const DEFAULT_BACKOFF: &[&str] = &["5s", "5m", "30m", "2h", "5h", "10h", "10h"];

/// Envelope fields `fields` may reference; the bool says whether sub-paths are allowed.
const ENVELOPE_ROOTS: &[(&str, bool)] = &[
    ("id", false),
    ("type", false),
    ("entity", false),
    ("entity_id", false),
    ("revision", false),
    ("occurred_at", false),
    ("data", true),
    ("previous", true),
    ("changed", false),
    ("source", true),
];

/// Headers walhook sets itself; a subscription may not override them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "host",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

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
    };
    let tables = v.tables(raw.tables);
    let subscriptions = v.subscriptions(raw.subscriptions);
    match (source, store, server, log) {
        (Some(source), Some(store), Some(server), Some(log)) if v.errors.is_empty() => Ok(Config {
            source,
            store,
            server,
            log,
            daemon,
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
        // Never echo the value: it usually holds a password.
        match url::Url::parse(raw) {
            Ok(url) if matches!(url.scheme(), "postgres" | "postgresql") => {
                Some(DatabaseUrl::new(url))
            }
            Ok(url) => {
                self.err(
                    key,
                    format!(
                        "URL scheme \"{}\" is not supported: use postgres://user:password@host:5432/dbname",
                        url.scheme()
                    ),
                );
                None
            }
            Err(e) => {
                let error = self
                    .loc
                    .error(
                        key,
                        format!(
                            "not a valid URL ({e}); expected postgres://user:password@host:5432/dbname"
                        ),
                    )
                    .with_cause(e);
                self.errors.push(error);
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
        let text = raw.listen.unwrap_or_else(|| "127.0.0.1:9187".into());
        match text.parse::<SocketAddr>() {
            Ok(listen) => Some(ServerConfig { listen }),
            Err(e) => {
                let error = self
                    .loc
                    .error(
                        "server.listen",
                        format!("bad address \"{text}\": expected ip:port, e.g. \"0.0.0.0:9187\""),
                    )
                    .with_cause(e);
                self.errors.push(error);
                None
            }
        }
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
            Ok(program) => Some(CelProgram(Arc::new(program))),
            Err(message) => {
                self.err(key, format!("bad CEL \"{source}\": {message}"));
                None
            }
        }
    }

    fn tables(&mut self, raw: Vec<RawTable>) -> Vec<TableConfig> {
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut out = Vec::new();
        for (i, t) in raw.into_iter().enumerate() {
            let key = index("tables", i);
            let table_key = join(&key, "table");
            let Some(name) = self.required(
                &table_key,
                t.table.clone(),
                ": e.g. table = \"public.users\"",
            ) else {
                continue;
            };
            let qualified = self.qualified_table(&table_key, &name);
            if let Some((schema, table)) = &qualified {
                let full = format!("{schema}.{table}");
                if let Some(first) = seen.get(&full) {
                    let first = self.describe_key(&join(first, "table"));
                    self.err(
                        &table_key,
                        format!(
                            "table \"{full}\" is already declared ({first}); merge the two entries (use [[tables.rules]] for extra events)"
                        ),
                    );
                } else {
                    seen.insert(full, key.clone());
                }
            }
            if let Some(t) = self.table(&key, qualified, t) {
                out.push(t);
            }
        }
        out
    }

    fn table(
        &mut self,
        key: &str,
        qualified: Option<(String, String)>,
        t: RawTable,
    ) -> Option<TableConfig> {
        let before = self.errors.len();
        // Without a valid `table` the entity still defaults sensibly (no second error).
        let default_entity = match &qualified {
            Some((_, n)) => n.clone(),
            None => t
                .table
                .as_deref()
                .and_then(|n| n.rsplit('.').next())
                .filter(|n| is_name_segment(n))
                .unwrap_or("entity")
                .to_string(),
        };
        let entity = t.entity.unwrap_or(default_entity);
        if !is_name_segment(&entity) {
            self.err(
                &join(key, "entity"),
                format!(
                    "bad entity \"{entity}\": use letters, digits, _ and - (no dots), e.g. entity = \"user\""
                ),
            );
        }
        let id = t.id.map(|id| match id {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        });
        let id = match id {
            Some(list) => self.name_list(&join(key, "id"), list, "id column"),
            None => None,
        };
        let columns = match (t.include_columns, t.exclude_columns) {
            (Some(_), Some(_)) => {
                self.err(
                    &join(key, "exclude_columns"),
                    "include_columns and exclude_columns cannot be used together; keep one",
                );
                Columns::All
            }
            (Some(inc), None) => self
                .name_list(&join(key, "include_columns"), inc, "column")
                .map_or(Columns::All, Columns::Include),
            (None, Some(exc)) => self
                .name_list(&join(key, "exclude_columns"), exc, "column")
                .map_or(Columns::All, Columns::Exclude),
            (None, None) => Columns::All,
        };
        if let (Some(id), Columns::Exclude(_) | Columns::Include(_)) = (&id, &columns) {
            for col in id {
                if !columns.allows(col) {
                    self.err(
                        &join(key, "id"),
                        format!("id column \"{col}\" is filtered out by include_columns/exclude_columns; ids are always sent"),
                    );
                }
            }
        }
        let update_columns = match t.update_columns {
            Some(list) => {
                let list = self.name_list(&join(key, "update_columns"), list, "column");
                for col in list.iter().flatten() {
                    if !columns.allows(col) {
                        self.err(
                            &join(key, "update_columns"),
                            format!("column \"{col}\" is filtered out by include_columns/exclude_columns, so it cannot trigger updates"),
                        );
                    }
                }
                list
            }
            None => None,
        };
        let events = self.event_names(key, &entity, t.events.unwrap_or_default());
        let mut rules = Vec::new();
        for (j, r) in t.rules.into_iter().enumerate() {
            let rkey = index(&join(key, "rules"), j);
            let event = self.full_event_name(&join(&rkey, "event"), r.event);
            let when_key = join(&rkey, "when");
            let when = self.required(
                &when_key,
                r.when,
                ": a CEL condition such as \"new.status == 'suspended'\"",
            );
            let program = when.as_deref().and_then(|w| self.cel(&when_key, w));
            if let (Some(event), Some(when_source), Some(program)) = (event, when, program) {
                let refs = program.references();
                let reads_old = refs.has_variable("old");
                let reads_changed = refs.has_variable("changed");
                rules.push(Rule {
                    event,
                    when_source,
                    reads_old,
                    reads_changed,
                    program,
                });
            }
        }
        let context = self.contexts(key, t.context);
        let aggregates = self.aggregates(key, t.aggregate);
        if events.insert.is_none()
            && events.update.is_none()
            && events.delete.is_none()
            && rules.is_empty()
            && aggregates.is_empty()
            && self.errors.len() == before
        {
            self.err(
                &join(key, "events"),
                "every event of this table is disabled and it has no rules: it would produce nothing; enable an event or remove the table",
            );
        }
        if self.errors.len() != before {
            return None;
        }
        let (schema, name) = qualified?;
        Some(TableConfig {
            schema,
            name,
            entity,
            id,
            columns,
            update_columns,
            events,
            rules,
            snapshot: t.snapshot.unwrap_or(false),
            context,
            aggregates,
        })
    }

    fn event_names(&mut self, key: &str, entity: &str, raw: RawEvents) -> EventNames {
        let mut one = |op: &str, value: Option<EventSuffix>, default: &str| -> Option<String> {
            match value {
                None | Some(EventSuffix::Enabled(true)) => Some(format!("{entity}.{default}")),
                Some(EventSuffix::Enabled(false)) => None,
                Some(EventSuffix::Suffix(s)) => {
                    if !is_event_name(&s) {
                        self.err(
                            &join(&join(key, "events"), op),
                            format!(
                                "bad event suffix \"{s}\": dot-separated parts of letters, digits, _ and -; it is appended to \"{entity}.\" (use false to disable)"
                            ),
                        );
                    }
                    Some(format!("{entity}.{s}"))
                }
            }
        };
        EventNames {
            insert: one("insert", raw.insert, "created"),
            update: one("update", raw.update, "updated"),
            delete: one("delete", raw.delete, "deleted"),
        }
    }

    fn contexts(&mut self, key: &str, raw: Vec<RawContext>) -> Vec<ContextConfig> {
        let mut out: Vec<ContextConfig> = Vec::new();
        for (j, c) in raw.into_iter().enumerate() {
            let ckey = index(&join(key, "context"), j);
            let name = self.required(&join(&ckey, "name"), c.name, "");
            if let Some(n) = &name {
                if !is_ident(n) {
                    self.err(
                        &join(&ckey, "name"),
                        format!("bad context name \"{n}\": use letters, digits and _"),
                    );
                } else if out.iter().any(|o| &o.name == n) {
                    self.err(
                        &join(&ckey, "name"),
                        format!("context \"{n}\" is declared twice for this table"),
                    );
                }
            }
            let table_key = join(&ckey, "table");
            let table = self
                .required(
                    &table_key,
                    c.table,
                    ": e.g. table = \"public.organisations\"",
                )
                .and_then(|t| {
                    self.qualified_table(&table_key, &t)
                        .map(|(s, n)| format!("{s}.{n}"))
                });
            let key_key = join(&ckey, "key");
            let ckey_cols = self
                .required(
                    &key_key,
                    c.key,
                    ": the column(s) of this table holding the other row's key",
                )
                .and_then(|k| {
                    let list = match k {
                        OneOrMany::One(s) => vec![s],
                        OneOrMany::Many(v) => v,
                    };
                    self.name_list(&key_key, list, "key column")
                });
            let columns = c
                .columns
                .and_then(|cols| self.name_list(&join(&ckey, "columns"), cols, "column"));
            if let (Some(name), Some(table), Some(key)) = (name, table, ckey_cols) {
                out.push(ContextConfig {
                    name,
                    table,
                    key,
                    columns,
                });
            }
        }
        out
    }

    fn aggregates(&mut self, key: &str, raw: Vec<RawAggregate>) -> Vec<AggregateConfig> {
        let mut out = Vec::new();
        for (j, a) in raw.into_iter().enumerate() {
            let akey = index(&join(key, "aggregate"), j);
            let event = self.full_event_name(&join(&akey, "event"), a.event);
            let op = self.required(
                &join(&akey, "op"),
                a.op,
                ": \"insert\", \"update\" or \"delete\"",
            );
            let min_rows = a.min_rows.unwrap_or(1);
            if min_rows == 0 {
                self.err(&join(&akey, "min_rows"), "min_rows must be at least 1");
            }
            if let Some(max) = a.max_rows {
                if max < min_rows.max(1) {
                    self.err(
                        &join(&akey, "max_rows"),
                        format!("max_rows ({max}) must be at least min_rows ({min_rows})"),
                    );
                }
            }
            if let (Some(event), Some(op)) = (event, op) {
                out.push(AggregateConfig {
                    event,
                    op,
                    min_rows,
                    max_rows: a.max_rows,
                    replace: a.replace.unwrap_or(false),
                });
            }
        }
        out
    }

    fn subscriptions(&mut self, raw: Vec<RawSubscription>) -> Vec<SubscriptionConfig> {
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut out = Vec::new();
        for (i, s) in raw.into_iter().enumerate() {
            let key = index("subscriptions", i);
            let name_key = join(&key, "name");
            if let Some(name) = &s.name {
                if let Some(first) = seen.get(name) {
                    let first = self.describe_key(&join(first, "name"));
                    self.err(
                        &name_key,
                        format!("duplicate subscription name \"{name}\" (first at {first}); names must be unique"),
                    );
                } else {
                    seen.insert(name.clone(), key.clone());
                }
            }
            if let Some(sub) = self.subscription(&key, s) {
                out.push(sub);
            }
        }
        out
    }

    fn subscription(&mut self, key: &str, s: RawSubscription) -> Option<SubscriptionConfig> {
        let before = self.errors.len();
        let k = |name: &str| join(key, name);

        let name = self.required(&k("name"), s.name, ": e.g. name = \"crm\"");
        if let Some(n) = &name {
            let valid = !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !valid {
                let suggestion = slugify(n);
                let fix = if suggestion.is_empty() {
                    String::new()
                } else {
                    format!(", e.g. \"{suggestion}\"")
                };
                self.err(
                    &k("name"),
                    format!("bad subscription name \"{n}\": use only a-z, 0-9, _ and -{fix}"),
                );
            }
        }

        let url = self
            .required(
                &k("url"),
                s.url,
                ": the receiver, e.g. url = \"https://example.com/hooks\"",
            )
            .and_then(|u| self.receiver_url(&k("url"), &u));

        let events = self
            .required(
                &k("events"),
                s.events,
                ": e.g. events = [\"user.*\"] (\"*\" for all)",
            )
            .and_then(|patterns| self.patterns(&k("events"), patterns));

        let filter = s.filter.and_then(|source| {
            let program = self.cel(&k("filter"), &source)?;
            Some(Filter { source, program })
        });

        let mut headers = BTreeMap::new();
        for (name, value) in s.headers.unwrap_or_default() {
            let hkey = join(&k("headers"), &name);
            let token = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c));
            if !token {
                self.err(&hkey, format!("bad header name \"{name}\""));
            } else if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                self.err(
                    &hkey,
                    format!("header \"{name}\" is set by walhook and cannot be overridden"),
                );
            } else if value.contains(['\r', '\n', '\0']) {
                self.err(&hkey, "header value contains a line break or NUL");
            } else {
                headers.insert(name, Secret::new(value));
            }
        }

        let secrets = match s.secret {
            None => Vec::new(),
            Some(OneOrMany::One(secret)) => self
                .signing_key(&k("secret"), &secret)
                .into_iter()
                .collect(),
            Some(OneOrMany::Many(list)) => {
                if list.is_empty() {
                    self.err(
                        &k("secret"),
                        "empty list: give at least one key, or remove secret",
                    );
                }
                list.iter()
                    .enumerate()
                    .filter_map(|(j, secret)| self.signing_key(&index(&k("secret"), j), secret))
                    .collect()
            }
        };

        let payload = s.payload.unwrap_or_default();
        let format = s.format.unwrap_or_default();
        let fields = s
            .fields
            .and_then(|f| self.fields(&k("fields"), f, payload, format));

        let timeout = self.duration(&k("timeout"), s.timeout, "10s", false);
        let max_in_flight = match s.max_in_flight.unwrap_or(16) {
            n @ 1..=10_000 => n as u32,
            n => {
                self.err(
                    &k("max_in_flight"),
                    format!("max_in_flight = {n} is out of range 1..=10000"),
                );
                1
            }
        };
        let batch_size = match s.batch_size {
            None => None,
            Some(n @ 1..=10_000) => Some(n as u32),
            Some(n) => {
                self.err(
                    &k("batch_size"),
                    format!("batch_size = {n} is out of range 1..=10000"),
                );
                None
            }
        };

        let set = s.set.and_then(|set| {
            let issuer =
                self.required(&join(&k("set"), "issuer"), set.issuer, ": the `iss` claim")?;
            Some(SetConfig {
                issuer,
                audience: set.audience,
                event_uri_prefix: set.event_uri_prefix,
            })
        });
        let slack = s.slack.and_then(|slack| {
            let text = self.required(
                &join(&k("slack"), "text"),
                slack.text,
                ": the message template",
            )?;
            Some(SlackConfig { text })
        });
        match format {
            Format::Set if set.is_none() && self.errors.len() == before => {
                self.err(
                    &k("format"),
                    "format = \"set\" needs set = { issuer = \"...\" }",
                );
            }
            Format::Slack if slack.is_none() && self.errors.len() == before => {
                self.err(
                    &k("format"),
                    "format = \"slack\" needs slack = { text = \"...\" }",
                );
            }
            _ => {}
        }
        if set.is_some() && format != Format::Set {
            self.err(&k("set"), "set = {...} is only used with format = \"set\"");
        }
        if slack.is_some() && format != Format::Slack {
            self.err(
                &k("slack"),
                "slack = {...} is only used with format = \"slack\"",
            );
        }

        let retry_raw = s.retry.unwrap_or_default();
        let rkey = k("retry");
        let backoff_key = join(&rkey, "backoff");
        let backoff: Option<Vec<Duration>> = match retry_raw.backoff {
            Some(list) if list.is_empty() => {
                self.err(
                    &backoff_key,
                    "empty backoff: give at least one delay, e.g. [\"5s\", \"5m\"]",
                );
                None
            }
            Some(list) => list
                .into_iter()
                .enumerate()
                .map(|(j, d)| self.duration(&index(&backoff_key, j), Some(d), "", false))
                .collect::<Vec<_>>()
                .into_iter()
                .collect(),
            None => Some(
                DEFAULT_BACKOFF
                    .iter()
                    .map(|d| parse_duration(d).unwrap_or_default())
                    .collect(),
            ),
        };
        let max_age = self.duration(&join(&rkey, "max_age"), retry_raw.max_age, "3d", false);

        if self.errors.len() != before {
            return None;
        }
        Some(SubscriptionConfig {
            name: SubscriptionName(name?),
            description: s.description,
            url: url?,
            events: events?,
            filter,
            headers,
            secrets,
            payload,
            fields,
            timeout: timeout?,
            max_in_flight,
            ordering: s.ordering.unwrap_or_default(),
            tls_insecure: s.tls_insecure.unwrap_or(false),
            signature: s.signature.unwrap_or_default(),
            format,
            batch_size,
            set,
            slack,
            retry: RetryPolicy {
                backoff: backoff?,
                max_age: max_age?,
            },
        })
    }

    fn receiver_url(&mut self, key: &str, raw: &str) -> Option<Secret<url::Url>> {
        // Never echo the value: receiver URLs often embed tokens.
        match url::Url::parse(raw) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Some(Secret::new(url))
            }
            Ok(url) => {
                self.err(
                    key,
                    format!(
                        "receiver URL must be http:// or https:// with a host (got scheme \"{}\")",
                        url.scheme()
                    ),
                );
                None
            }
            Err(e) => {
                let error = self
                    .loc
                    .error(
                        key,
                        format!("not a valid URL ({e}); expected e.g. https://example.com/hooks"),
                    )
                    .with_cause(e);
                self.errors.push(error);
                None
            }
        }
    }

    fn patterns(&mut self, key: &str, patterns: Vec<String>) -> Option<EventPatterns> {
        if patterns.is_empty() {
            self.err(
                key,
                "empty events: give at least one pattern, e.g. [\"user.*\"] or [\"*\"]",
            );
            return None;
        }
        let mut builder = globset::GlobSetBuilder::new();
        let mut ok = true;
        for (j, p) in patterns.iter().enumerate() {
            let pkey = index(key, j);
            if p.is_empty() {
                self.err(&pkey, "empty pattern; use \"*\" for all events");
                ok = false;
                continue;
            }
            // `*` matches any run of characters, dots included: dots are not separators.
            match globset::GlobBuilder::new(p)
                .literal_separator(false)
                .backslash_escape(true)
                .build()
            {
                Ok(glob) => {
                    builder.add(glob);
                }
                Err(e) => {
                    let error = self
                        .loc
                        .error(
                            &pkey,
                            format!(
                                "bad glob \"{p}\": {}; patterns use * for any characters, e.g. \"user.*\"",
                                e.kind()
                            ),
                        )
                        .with_cause(e);
                    self.errors.push(error);
                    ok = false;
                }
            }
        }
        if !ok {
            return None;
        }
        match builder.build() {
            Ok(set) => Some(EventPatterns { patterns, set }),
            Err(e) => {
                let error = self
                    .loc
                    .error(key, format!("cannot compile patterns: {e}"))
                    .with_cause(e);
                self.errors.push(error);
                None
            }
        }
    }

    fn signing_key(&mut self, key: &str, raw: &str) -> Option<Secret<Vec<u8>>> {
        // Never echo the value, nor decoder errors (they quote characters of it).
        const FIX: &str = "a Standard Webhooks key \"whsec_<base64 of 24 to 64 random bytes>\", e.g. from: echo \"whsec_$(openssl rand -base64 32)\"";
        let decoded = raw
            .strip_prefix("whsec_")
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok());
        match decoded {
            Some(bytes) if (24..=64).contains(&bytes.len()) => Some(Secret::new(bytes)),
            Some(bytes) => {
                self.err(
                    key,
                    format!("secret decodes to {} bytes; expected {FIX}", bytes.len()),
                );
                None
            }
            None => {
                self.err(
                    key,
                    format!("secret is not of the form whsec_<base64>; expected {FIX}"),
                );
                None
            }
        }
    }

    fn fields(
        &mut self,
        key: &str,
        raw: BTreeMap<String, String>,
        payload: Payload,
        format: Format,
    ) -> Option<Vec<FieldMapping>> {
        if raw.is_empty() {
            self.err(
                key,
                "empty fields: map at least one output key, or remove fields",
            );
            return None;
        }
        if format != Format::Json {
            self.err(key, "fields only applies to format = \"json\"");
        }
        let roots: Vec<&str> = ENVELOPE_ROOTS.iter().map(|(r, _)| *r).collect();
        let mut out = Vec::new();
        let mut ok = true;
        for (output, path) in raw {
            let fkey = join(key, &output);
            let parts: Vec<String> = path.split('.').map(str::to_string).collect();
            let root = ENVELOPE_ROOTS.iter().find(|(r, _)| *r == parts[0]);
            let problem = match root {
                None => Some(format!(
                    "unknown envelope field \"{path}\"; use one of {}, or data.<column>",
                    roots.join(", ")
                )),
                Some((_, false)) if parts.len() > 1 => {
                    Some(format!("\"{}\" has no sub-fields", parts[0]))
                }
                Some(_) if parts.iter().any(String::is_empty) => {
                    Some(format!("bad path \"{path}\": empty part"))
                }
                Some(_)
                    if parts[0] == "source"
                        && parts.len() == 2
                        && !["table", "lsn", "xid"].contains(&parts[1].as_str()) =>
                {
                    Some(format!("\"{path}\": source has table, lsn and xid"))
                }
                Some(_)
                    if payload == Payload::Thin
                        && ["data", "previous", "changed"].contains(&parts[0].as_str()) =>
                {
                    Some(format!(
                        "\"{path}\" is never present with payload = \"thin\"; use payload = \"full\""
                    ))
                }
                Some(_) => None,
            };
            match problem {
                Some(p) => {
                    self.err(&fkey, p);
                    ok = false;
                }
                None => out.push(FieldMapping {
                    output,
                    path: parts,
                }),
            }
        }
        ok.then_some(out)
    }
}
