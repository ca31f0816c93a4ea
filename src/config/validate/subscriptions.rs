//! Validation of `[[subscriptions]]` (receiver, patterns, keys, headers, retry).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::super::duration::parse_duration;
use super::super::locate::{index, join};
use super::super::raw::*;
use super::super::secret::Secret;
use super::super::types::*;
use super::{DEFAULT_BACKOFF, Validator, slugify};

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
    ("context", true),
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
impl Validator<'_> {
    /// The subscriptions; `slot` (`source.slot`, when valid) names the default
    /// CloudEvents source.
    pub(super) fn subscriptions(
        &mut self,
        raw: Vec<RawSubscription>,
        slot: Option<&str>,
    ) -> Vec<SubscriptionConfig> {
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
            if let Some(sub) = self.subscription(&key, s, slot) {
                out.push(sub);
            }
        }
        out
    }

    fn subscription(
        &mut self,
        key: &str,
        s: RawSubscription,
        slot: Option<&str>,
    ) -> Option<SubscriptionConfig> {
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

        let signature = s.signature.unwrap_or_default();
        let keys = self.signing_keys(key, name.as_deref(), signature, s.secret, s.secret_file);

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
        let batch_size = match s.batch_size.unwrap_or(1) {
            n @ 1..=10_000 => n as u32,
            n => {
                self.err(
                    &k("batch_size"),
                    format!("batch_size = {n} is out of range 1..=10000"),
                );
                1
            }
        };
        if batch_size > 1 && matches!(format, Format::Set | Format::Slack) {
            let why = if format == Format::Set {
                "format = \"set\": a Security Event Token holds one event"
            } else {
                "format = \"slack\": a Slack message is one event's text"
            };
            let who = name
                .as_deref()
                .map(|n| format!("subscription \"{n}\": "))
                .unwrap_or_default();
            self.err(
                &k("batch_size"),
                format!("{who}batch_size = {batch_size} cannot be used with {why}; remove batch_size, or use format = \"json\" or \"cloudevents\""),
            );
        }

        let set = self.set_options(key, name.as_deref(), format, signature, s.set);
        let slack = self.slack_options(key, name.as_deref(), format, payload, s.slack);
        let cloudevents = self.cloudevents(&k("cloudevents"), format, s.cloudevents, slot);
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
            keys: keys?,
            payload,
            fields,
            timeout: timeout?,
            max_in_flight,
            ordering: s.ordering.unwrap_or_default(),
            tls_insecure: s.tls_insecure.unwrap_or(false),
            signature,
            format,
            cloudevents,
            batch_size,
            set,
            slack,
            retry: RetryPolicy {
                backoff: backoff?,
                max_age: max_age?,
            },
        })
    }

    /// `cloudevents = { source }`: only with `format = "cloudevents"`, which always
    /// gets one (default source `walhook://<slot>`).
    fn cloudevents(
        &mut self,
        key: &str,
        format: Format,
        raw: Option<RawCloudEvents>,
        slot: Option<&str>,
    ) -> Option<CloudEventsConfig> {
        if format != Format::Cloudevents {
            if raw.is_some() {
                self.err(
                    key,
                    "cloudevents = {...} is only used with format = \"cloudevents\"",
                );
            }
            return None;
        }
        let source = match raw.and_then(|r| r.source) {
            None => format!("walhook://{}", slot.unwrap_or("walhook")),
            Some(source) => {
                // A URI-reference (RFC 3986): non-empty, no spaces or control characters.
                if source.is_empty()
                    || source.chars().any(|c| {
                        c.is_whitespace()
                            || c.is_control()
                            || matches!(c, '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}')
                    })
                {
                    self.err(
                        &join(key, "source"),
                        "source must be a non-empty URI-reference without spaces, e.g. \"https://app.example.com/db\" or \"/walhook/app\"",
                    );
                    return None;
                }
                source
            }
        };
        Some(CloudEventsConfig { source })
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
        let mut out = Vec::new();
        let mut ok = true;
        for (output, path) in raw {
            let fkey = join(key, &output);
            let parts: Vec<String> = path.split('.').map(str::to_string).collect();
            let problem = envelope_path_problem(&parts, payload);
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

/// Why `parts` (an envelope path split on dots) can never name a value of the
/// envelope of a subscription with `payload`, or `None` when it can. Columns are not
/// known here: any `data.<column>` passes.
pub(super) fn envelope_path_problem(parts: &[String], payload: Payload) -> Option<String> {
    let path = parts.join(".");
    let root = ENVELOPE_ROOTS.iter().find(|(r, _)| *r == parts[0]);
    match root {
        None => {
            let roots: Vec<&str> = ENVELOPE_ROOTS.iter().map(|(r, _)| *r).collect();
            Some(format!(
                "unknown envelope field \"{path}\"; use one of {}, or data.<column>",
                roots.join(", ")
            ))
        }
        Some((_, false)) if parts.len() > 1 => Some(format!("\"{}\" has no sub-fields", parts[0])),
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
                && ["data", "previous", "changed", "context"].contains(&parts[0].as_str()) =>
        {
            Some(format!(
                "\"{path}\" is never present with payload = \"thin\"; use payload = \"full\""
            ))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Format, load_str};

    fn load(keys: &str) -> Result<crate::config::Config, String> {
        let toml = format!(
            "[source]\nurl = \"postgres://x/app\"\nslot = \"app_slot\"\n[[subscriptions]]\nname = \"ce\"\nurl = \"https://ce.example.com/\"\nevents = [\"*\"]\n{keys}\n"
        );
        load_str(&toml, "walhook.toml", &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn cloudevents_source_defaults_to_the_slot_and_needs_the_format() {
        let c = load("format = \"cloudevents\"").unwrap();
        let s = &c.subscriptions[0];
        assert_eq!(s.format, Format::Cloudevents);
        assert_eq!(s.cloudevents.as_ref().unwrap().source, "walhook://app_slot");
        assert!(c.inactive_keys().is_empty(), "{:?}", c.inactive_keys());
        let c =
            load("format = \"cloudevents\"\ncloudevents = { source = \"/walhook/app\" }").unwrap();
        assert_eq!(
            c.subscriptions[0].cloudevents.as_ref().unwrap().source,
            "/walhook/app"
        );
        assert_eq!(load("").unwrap().subscriptions[0].cloudevents, None);

        let e = load("cloudevents = { source = \"/x\" }").unwrap_err();
        assert!(e.contains("walhook.toml:8: subscriptions[0].cloudevents: cloudevents = {...} is only used with format = \"cloudevents\""), "{e}");
        for bad in ["", "two words", "a{b}"] {
            let e = load(&format!(
                "format = \"cloudevents\"\ncloudevents = {{ source = \"{bad}\" }}"
            ))
            .unwrap_err();
            assert!(
                e.contains(
                    "subscriptions[0].cloudevents.source: source must be a non-empty URI-reference"
                ),
                "{e}"
            );
        }
        let e = load("format = \"cloudevents\"\nfields = { id = \"entity_id\" }").unwrap_err();
        assert!(
            e.contains("fields only applies to format = \"json\""),
            "{e}"
        );
    }
}
