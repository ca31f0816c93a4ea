//! Shared plumbing of the operator commands (`walhook deliveries`, `walhook
//! subscriptions`): opening the store from the config, checking subscription names,
//! parsing `--since`/`--entity`, and printing aligned tables or JSON lines.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, SecondsFormat, Utc};

use crate::config::Config;
use crate::config::parse_duration;
use crate::store::Store;

/// Connects to the store (`store.url`, default `source.url`); never touches the slot.
/// Fails with the fix when the store was never set up.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(config.store.url.expose(), &config.store.schema).await?;
    if !store.is_set_up().await? {
        anyhow::bail!(
            "the store has no walhook tables in schema `{}`: run `walhook setup` or start `walhook run` first",
            config.store.schema
        );
    }
    Ok(store)
}

/// The configured subscription names, in config order.
pub fn configured(config: &Config) -> Vec<String> {
    config
        .subscriptions
        .iter()
        .map(|s| s.name.as_str().to_owned())
        .collect()
}

/// Checks that `name` is a subscription of the config or of the store; the error names
/// it and lists the configured ones.
pub fn check_subscription(
    name: &str,
    configured: &[String],
    stored: &[String],
) -> anyhow::Result<()> {
    if configured.iter().chain(stored).any(|n| n == name) {
        return Ok(());
    }
    anyhow::bail!("unknown subscription `{name}`; {}", known_list(configured))
}

/// "configured subscriptions: a, b" (or that there are none).
pub fn known_list(configured: &[String]) -> String {
    if configured.is_empty() {
        "the config has no [[subscriptions]]".to_owned()
    } else {
        format!("configured subscriptions: {}", configured.join(", "))
    }
}

/// Parses `--since`/`--until`: a duration back from now (`30m`, `2d`) or an RFC 3339
/// time (`2026-11-25T10:00:00Z`).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(SystemTime::from(t));
    }
    match parse_duration(text) {
        Ok(d) => Ok(SystemTime::now()
            .checked_sub(d)
            .unwrap_or(SystemTime::UNIX_EPOCH)),
        Err(_) => Err(format!(
            "expected a duration back from now (e.g. 30m, 2d) or an RFC 3339 time (e.g. 2026-11-25T10:00:00Z), got `{text}`"
        )),
    }
}

/// Parses `--entity TYPE:ID` (the id may itself contain `:`, as composite ids do).
pub fn parse_entity(text: &str) -> Result<(String, String), String> {
    match text.split_once(':') {
        Some((entity, id)) if !entity.is_empty() && !id.is_empty() => {
            Ok((entity.to_owned(), id.to_owned()))
        }
        _ => Err(format!(
            "expected TYPE:ID, e.g. user:42 (composite ids as walhook sends them, e.g. order:7:3), got `{text}`"
        )),
    }
}

/// A time for people: `2026-11-25T19:15:30Z`.
pub fn human_time(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A time for scripts: RFC 3339 with microseconds.
pub fn json_time(t: Option<SystemTime>) -> serde_json::Value {
    match t {
        Some(t) => DateTime::<Utc>::from(t)
            .to_rfc3339_opts(SecondsFormat::Micros, true)
            .into(),
        None => serde_json::Value::Null,
    }
}

/// An age for people: `45s`, `3m12s`, `5h03m`, `2d04h`.
pub fn human_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `text` cut to `max` characters, with `…` when cut; newlines become spaces.
pub fn truncate(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() <= max {
        return flat;
    }
    let mut out: String = flat.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Rows printed as left-aligned columns separated by two spaces, under a header.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: Vec<&'static str>) -> Table {
        Table {
            header,
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as columns).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, trailing spaces trimmed.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if i + 1 < row.len() {
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(vec!["ID", "STATUS"]);
        t.row(vec!["a".into(), "dead".into()]);
        t.row(vec!["longer-id".into(), "pending".into()]);
        assert_eq!(
            t.render(),
            "ID         STATUS\na          dead\nlonger-id  pending\n"
        );
    }

    #[test]
    fn times_and_entities_parse() {
        let t = parse_time("2026-11-25T10:00:00Z").unwrap();
        assert_eq!(human_time(t), "2026-11-25T10:00:00Z");
        let ago = parse_time("1h").unwrap();
        let d = SystemTime::now().duration_since(ago).unwrap();
        assert!((3599..=3601).contains(&d.as_secs()));
        assert!(parse_time("yesterday").unwrap_err().contains("RFC 3339"));
        assert_eq!(
            parse_entity("order:7:3").unwrap(),
            ("order".into(), "7:3".into())
        );
        assert!(parse_entity("user").is_err());
        assert!(parse_entity(":1").is_err());
    }

    #[test]
    fn ages_and_truncation_read_well() {
        assert_eq!(human_age(Duration::from_secs(45)), "45s");
        assert_eq!(human_age(Duration::from_secs(192)), "3m12s");
        assert_eq!(human_age(Duration::from_secs(3 * 86_400 + 7200)), "3d02h");
        assert_eq!(truncate("http 500\nx", 40), "http 500 x");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }
}
