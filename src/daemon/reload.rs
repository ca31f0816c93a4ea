//! Live reload: on SIGHUP `walhook run` reads its config file again (same path, env
//! overrides applied again) and applies what may change without a restart.
//!
//! A reload is all or nothing. The new config must load and validate, its tables must
//! pass the start-up checks (they exist, have an identity, REPLICA IDENTITY FULL where
//! rules need old rows), the store must record its subscriptions and the publication
//! must be altered to match; if any step fails the reload is refused with an error log
//! naming the reason, and the running config keeps going untouched.
//!
//! State flows one way, over `watch` channels, from [`run`] (which owns the config):
//!
//! - [`Rules`] (mapper and routes) to the source task, which takes them between source
//!   transactions. They are sent inside the transaction that alters the publication,
//!   before it commits, so every source transaction committed after the publication
//!   change is mapped by the new rules (no change of an added table is lost), while
//!   changes of a removed table that pgoutput still sends are dropped.
//! - the [`Config`] to [`delivery::supervise`](crate::delivery::supervise), which starts a dispatcher for each added
//!   subscription, stops removed ones (lease released), and restarts changed ones, and
//!   to the purge loop (retention, subscriptions).
//!
//! An added subscription's cursor starts at the end of the event log when the store
//! first records it (before any event is routed to it): it gets events of source
//! transactions mapped after the reload, not the backlog. A subscription removed and
//! added back keeps its stored cursor and state. Keys that need a restart
//! ([`RESTART_KEYS`]) are logged and otherwise ignored. Each instance reloads only its
//! own config: with several instances (G8), send SIGHUP to each.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::DaemonError;
use super::prepare::{self, Routes};
use crate::config::{self, Config, SubscriptionConfig, TableConfig};
use crate::mapping::Mapper;
use crate::pg::TableName;
use crate::pg::{ConnInfo, ErrorChain};
use crate::source::publication::{Ending, HandOver, Publication, PublicationChange};
use crate::store::Store;

/// Keys that take effect only at start-up; a reload that changes them logs a warning.
pub const RESTART_KEYS: [&str; 10] = [
    "source.url",
    "source.slot",
    "source.publication",
    "store.url",
    "store.schema",
    "server.listen",
    "log.format",
    "log.level",
    "daemon.ingest_buffer",
    "delivery.proxy",
];

/// What the source task maps and routes with.
pub struct Rules {
    /// The table rules.
    pub mapper: Mapper,
    /// The tables' bulk events (`[[tables.aggregate]]`).
    pub aggregates: crate::mapping::aggregate::Aggregates,
    /// Which subscriptions each event type is due to.
    pub routes: Arc<Routes>,
}

/// Reload requests (one per SIGHUP; several pending ones are one reload) and the path
/// of the config file to read again.
pub struct Requests {
    pub path: PathBuf,
    pub rx: mpsc::Receiver<()>,
}

/// What a reload changed, by name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub subscriptions_added: Vec<String>,
    pub subscriptions_removed: Vec<String>,
    pub subscriptions_changed: Vec<String>,
    pub tables_added: Vec<String>,
    pub tables_removed: Vec<String>,
    pub tables_changed: Vec<String>,
}

impl Changes {
    /// Compares the subscriptions and tables of two configs.
    pub fn between(old: &Config, new: &Config) -> Changes {
        // Every setting counts, secrets included (`PartialEq` of the config types).
        let subs = |c: &Config| -> BTreeMap<String, SubscriptionConfig> {
            c.subscriptions
                .iter()
                .map(|s| (s.name.as_str().to_owned(), s.clone()))
                .collect()
        };
        let tables = |c: &Config| -> BTreeMap<String, TableConfig> {
            c.tables
                .iter()
                .map(|t| (t.qualified_name(), t.clone()))
                .collect()
        };
        let (s_added, s_removed, s_changed) = diff(&subs(old), &subs(new));
        let (t_added, t_removed, t_changed) = diff(&tables(old), &tables(new));
        Changes {
            subscriptions_added: s_added,
            subscriptions_removed: s_removed,
            subscriptions_changed: s_changed,
            tables_added: t_added,
            tables_removed: t_removed,
            tables_changed: t_changed,
        }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// Added, removed and changed keys.
fn diff<V: PartialEq>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let added = new.keys().filter(|k| !old.contains_key(*k)).cloned();
    let removed = old.keys().filter(|k| !new.contains_key(*k)).cloned();
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k.clone());
    (added.collect(), removed.collect(), changed.collect())
}

/// The connection parameters the running daemon uses.
pub struct Connections {
    pub source: ConnInfo,
    pub store: ConnInfo,
}

/// Applies reload requests until `stop`. `current` is the running config; new rules go
/// to `rules`, the new config to `configs`.
pub async fn run(
    mut requests: Requests,
    mut current: Arc<Config>,
    connections: Connections,
    rules: watch::Sender<Arc<Rules>>,
    configs: watch::Sender<Arc<Config>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            got = requests.rx.recv() => if got.is_none() {
                return;
            },
        }
        // Signals that came meanwhile are served by this reload.
        while requests.rx.try_recv().is_ok() {}
        info!(file = %requests.path.display(), "SIGHUP: reloading the config");
        match reload(&requests.path, &current, &connections, &rules).await {
            Ok((next, changes)) => {
                let next = Arc::new(next);
                configs.send_replace(next.clone());
                current = next;
                log_changes(&changes);
            }
            Err(err) => {
                error!(file = %requests.path.display(), error = %ErrorChain(&err), "config reload refused; the running config stays in effect");
            }
        }
    }
}

/// Loads, checks and applies the config at `path`; returns the new running config.
async fn reload(
    path: &std::path::Path,
    current: &Config,
    connections: &Connections,
    rules: &watch::Sender<Arc<Rules>>,
) -> Result<(Config, Changes), DaemonError> {
    let loaded = config::load(path)?;
    let next = keep_restart_keys(current, loaded);
    let changes = Changes::between(current, &next);

    // Checks first: nothing is applied unless the tables pass.
    let sql = connections.source.connect_sql().await?;
    let (mapper, _) = prepare::table_rules(&sql, &next).await?;

    // Added subscriptions get their state row (cursor at the log's end) before any
    // event is routed to them.
    let store = Store::connect(&connections.store, &next.store.schema).await?;
    let names: Vec<String> = next
        .subscriptions
        .iter()
        .map(|s| s.name.as_str().to_owned())
        .collect();
    store.ensure_subscriptions(&names).await?;
    drop(store);

    let new_rules = Arc::new(Rules {
        mapper,
        aggregates: crate::mapping::aggregate::Aggregates::new(&next.tables),
        routes: Arc::new(Routes::new(&next)),
    });
    publish(
        &sql,
        &next.source.publication,
        &prepare::table_names(&next),
        rules,
        new_rules,
    )
    .await?;
    Ok((next, changes))
}

/// Makes the publication publish exactly `tables` and hands `new_rules` to the source
/// task before that change commits (see the module docs). On failure the publication
/// and the rules stay as they were.
async fn publish(
    sql: &tokio_postgres::Client,
    publication: &str,
    tables: &[TableName],
    rules: &watch::Sender<Arc<Rules>>,
    new_rules: Arc<Rules>,
) -> Result<(), DaemonError> {
    let plan = Publication::read(sql, publication, tables).await?;
    let mut hand_over = RulesHandOver {
        rules,
        swap: new_rules,
    };
    let change = plan.apply(sql, Ending::CommitWith(&mut hand_over)).await?;
    if change != PublicationChange::Unchanged {
        info!(publication = %publication, "publication now matches the config");
    }
    Ok(())
}

/// Sends the new rules to the source task; taking them back sends the old ones again.
struct RulesHandOver<'a> {
    rules: &'a watch::Sender<Arc<Rules>>,
    /// The rules to send next: the new ones, then (once sent) the ones they replaced.
    swap: Arc<Rules>,
}

impl HandOver for RulesHandOver<'_> {
    fn hand_over(&mut self) {
        self.swap = self.rules.send_replace(self.swap.clone());
    }

    fn take_back(&mut self) {
        self.swap = self.rules.send_replace(self.swap.clone());
    }
}

/// `loaded`, with the keys that need a restart set back to the running values (each
/// change logged).
fn keep_restart_keys(current: &Config, mut loaded: Config) -> Config {
    let changed = [
        current.source.url != loaded.source.url,
        current.source.slot != loaded.source.slot,
        current.source.publication != loaded.source.publication,
        current.store.url != loaded.store.url,
        current.store.schema != loaded.store.schema,
        current.server.listen != loaded.server.listen,
        current.log.format != loaded.log.format,
        current.log.level != loaded.log.level,
        current.daemon.ingest_buffer != loaded.daemon.ingest_buffer,
        current.delivery != loaded.delivery,
    ];
    for (key, _) in RESTART_KEYS.iter().zip(changed).filter(|(_, c)| *c) {
        warn!(key = %key, "changed in the config file, but needs a restart to take effect; the running value stays");
    }
    loaded.source = current.source.clone();
    loaded.store.url = current.store.url.clone();
    loaded.store.schema = current.store.schema.clone();
    loaded.server = current.server.clone();
    loaded.log = current.log.clone();
    loaded.daemon.ingest_buffer = current.daemon.ingest_buffer;
    loaded.delivery = current.delivery.clone();
    loaded
}

/// The one info line of a reload that was applied.
fn log_changes(c: &Changes) {
    if c.is_empty() {
        info!("config reloaded: no subscription or table changed");
        return;
    }
    let list = |v: &[String]| v.join(",");
    info!(
        subscriptions_added = %list(&c.subscriptions_added),
        subscriptions_removed = %list(&c.subscriptions_removed),
        subscriptions_changed = %list(&c.subscriptions_changed),
        tables_added = %list(&c.tables_added),
        tables_removed = %list(&c.tables_removed),
        tables_changed = %list(&c.tables_changed),
        "config reloaded"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::config;

    const BASE: &str = r#"
[[tables]]
table = "public.users"

[[subscriptions]]
name = "a"
url = "http://127.0.0.1:1/a"
events = ["*"]
"#;

    #[test]
    fn no_change_is_empty() {
        assert!(Changes::between(&config(BASE), &config(BASE)).is_empty());
    }

    #[test]
    fn names_added_removed_and_changed() {
        let next = config(
            r#"
[[tables]]
table = "public.users"
exclude_columns = ["password"]

[[tables]]
table = "public.orgs"

[[subscriptions]]
name = "b"
url = "http://127.0.0.1:1/b"
events = ["*"]
"#,
        );
        let c = Changes::between(&config(BASE), &next);
        assert_eq!(c.subscriptions_added, ["b"]);
        assert_eq!(c.subscriptions_removed, ["a"]);
        assert!(c.subscriptions_changed.is_empty());
        assert_eq!(c.tables_added, ["public.orgs"]);
        assert_eq!(c.tables_changed, ["public.users"]);
        assert!(c.tables_removed.is_empty());
    }

    #[test]
    fn a_new_secret_or_header_is_a_change() {
        let with = |extra: &str| {
            config(&format!(
                r#"
[[tables]]
table = "public.users"

[[subscriptions]]
name = "a"
url = "http://127.0.0.1:1/a"
events = ["*"]
{extra}
"#
            ))
        };
        let secret1 = with(r#"secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw""#);
        let secret2 = with(r#"secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD""#);
        let header1 = with(r#"headers = { Authorization = "Bearer one" }"#);
        let header2 = with(r#"headers = { Authorization = "Bearer two" }"#);
        let url2 = config(&BASE.replace("/a\"", "/other\""));
        for (a, b) in [(&secret1, &secret2), (&header1, &header2)] {
            assert_eq!(Changes::between(a, b).subscriptions_changed, ["a"]);
        }
        assert_eq!(
            Changes::between(&config(BASE), &url2).subscriptions_changed,
            ["a"]
        );
        assert!(Changes::between(&secret1, &secret1).is_empty());
    }

    #[test]
    fn restart_keys_keep_their_running_values() {
        let current = config(BASE);
        let moved = config(&format!(
            "{BASE}\n[server]\nlisten = \"127.0.0.1:1\"\n[store]\nschema = \"other\"\nretention = \"1h\"\n"
        ));
        let next = keep_restart_keys(&current, moved);
        assert_eq!(next.server.listen, current.server.listen);
        assert_eq!(next.store.schema, current.store.schema);
        assert_eq!(next.store.retention, std::time::Duration::from_secs(3600));
    }
}
