//! Start-up checks and preparation for `walhook run` and `walhook setup`: the source
//! database is fit (wal_level, privilege, tables, replica identity where the config
//! needs old rows), the store is migrated, the publication matches the config, and the
//! slot exists — or, when the store has a checkpoint but the slot is gone, refusal (G1).

use std::sync::Arc;

use tracing::{info, warn};

use crate::config::Config;
use crate::mapping::Mapper;
use crate::pg::ConnInfo;
use crate::pg::TableName;
use crate::source::SourceError;
use crate::source::client::ReplicationClient;
use crate::source::publication::{Ending, Publication, PublicationChange};
use crate::source::setup::{self, TableInfo};
use crate::store::Store;

use super::DaemonError;

/// What `prepare` hands to the pipeline.
pub struct Prepared {
    pub source_params: ConnInfo,
    pub store_params: ConnInfo,
    pub store: Store,
    pub mapper: Mapper,
    /// Per subscription: its name and event patterns, for routing at ingest.
    pub routes: Arc<Routes>,
    pub tables: Vec<TableInfo>,
}

/// Subscriptions' event patterns, for routing at ingest.
pub struct Routes {
    pub subscriptions: Vec<(String, crate::config::EventPatterns)>,
}

impl Routes {
    /// The routes of `config`'s subscriptions.
    pub fn new(config: &Config) -> Routes {
        Routes {
            subscriptions: config
                .subscriptions
                .iter()
                .map(|s| (s.name.as_str().to_owned(), s.events.clone()))
                .collect(),
        }
    }

    /// Names of the subscriptions whose `events` patterns match `event_type`.
    pub fn matching(&self, event_type: &str) -> Arc<[String]> {
        self.subscriptions
            .iter()
            .filter(|(_, p)| p.matches(event_type))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// The watched tables of `config`, in file order.
pub fn table_names(config: &Config) -> Vec<TableName> {
    config
        .tables
        .iter()
        .map(|t| TableName {
            schema: t.schema.clone(),
            name: t.name.clone(),
        })
        .collect()
}

/// Checks the config's tables against the catalog (they exist, have an identity, and
/// REPLICA IDENTITY FULL where the config needs old rows) and builds their mapper.
/// Used at start-up and on reload.
pub async fn table_rules(
    sql: &tokio_postgres::Client,
    config: &Config,
) -> Result<(Mapper, Vec<TableInfo>), DaemonError> {
    let names = table_names(config);
    let infos = setup::inspect_tables(sql, &names).await?;
    for (cfg, info) in config.tables.iter().zip(&infos) {
        let needs = cfg.needs_full_identity();
        if !needs.is_empty() && info.replica_identity != 'f' {
            return Err(DaemonError::NeedsFullIdentity {
                table: info.name.clone(),
                quoted: info.name.quoted(),
                needs: needs.join(", "),
            });
        }
    }
    let mapper = Mapper::new(&config.tables, &infos)?;
    let plan = crate::mapping::lookup::plan(sql, config).await?;
    Ok((mapper.with_context(plan), infos))
}

/// `walhook setup --reset-slot`: drops what is left of the slot, replaces the store's
/// source position and creates a new slot, in that order (a crash in between leaves a
/// checkpoint without a slot, which `run` refuses until the reset is run again). The
/// event log's sequence, revisions, cursors and retry rows are kept: the next `run`
/// appends after the last stored event ("Recovery keeps the log").
pub async fn reset_slot(config: &Config) -> Result<(), DaemonError> {
    let slot = &config.source.slot;
    let source_params = config.source.url.expose().clone();
    let sql = source_params.connect_sql().await?;
    if let Some(info) = setup::slot_info(&sql, slot).await? {
        if let Some(pid) = info.active_pid {
            return Err(SourceError::SlotActive {
                slot: slot.clone(),
                pid,
            }
            .into());
        }
        sql.execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
            .map_err(SourceError::Sql)?;
        info!(slot = %slot, "replication slot dropped");
    }
    let store_params = config.store.url.expose().clone();
    let mut store = Store::connect(&store_params, &config.store.schema).await?;
    store.migrate().await?;
    store.reset_checkpoint(slot).await?;
    let mut repl = ReplicationClient::connect(&source_params, "walhook setup")
        .await
        .map_err(SourceError::Replication)?;
    let point = setup::create_slot(&mut repl, slot, false).await?;
    repl.close().await;
    info!(slot = %slot, consistent_point = %point, "replication slot created; ingest continues after the stored event log");
    Ok(())
}

/// Checks the source, migrates the store, makes the publication and the slot.
pub async fn prepare(config: &Config) -> Result<Prepared, DaemonError> {
    let source_params = config.source.url.expose().clone();
    let sql = source_params.connect_sql().await?;
    setup::check_wal_level(&sql).await?;
    setup::check_replication_role(&sql).await?;
    let names = table_names(config);
    let (mapper, infos) = table_rules(&sql, config).await?;

    let store_params = config.store.url.expose().clone();
    let mut store = Store::connect(&store_params, &config.store.schema).await?;
    let applied = store.migrate().await?;
    if applied > 0 {
        info!(schema = %config.store.schema, applied, "store migrated");
    }
    let sub_names: Vec<String> = config
        .subscriptions
        .iter()
        .map(|s| s.name.as_str().to_owned())
        .collect();
    store.ensure_subscriptions(&sub_names).await?;

    // Instances starting together on a fresh database take turns here, so none sees
    // another's checkpoint without its slot (a false "slot lost") or races it into
    // "already exists". The lock goes with the store connection if start-up fails.
    let slot = &config.source.slot;
    store.lock_setup(slot).await?;
    let result = prepare_source(config, &source_params, &sql, &store, &names).await;
    store.unlock_setup(slot).await?;
    result?;
    drop(sql);
    let routes = Arc::new(Routes::new(config));
    Ok(Prepared {
        source_params,
        store_params,
        store,
        mapper,
        routes,
        tables: infos,
    })
}

/// The publication and the slot, under the store's setup lock (see [`prepare`]).
async fn prepare_source(
    config: &Config,
    source_params: &ConnInfo,
    sql: &tokio_postgres::Client,
    store: &Store,
    names: &[TableName],
) -> Result<(), DaemonError> {
    let publication = Publication::read(sql, &config.source.publication, names).await?;
    match publication.apply(sql, Ending::Commit).await? {
        PublicationChange::Unchanged => {}
        PublicationChange::Created => {
            info!(publication = %config.source.publication, "publication created")
        }
        PublicationChange::Altered => {
            info!(publication = %config.source.publication, "publication now matches the config")
        }
    }

    let slot = &config.source.slot;
    let checkpoint = store.checkpoint(slot).await?;
    match (setup::slot_info(sql, slot).await?, checkpoint) {
        (None, Some(cp)) => {
            return Err(DaemonError::SlotLost {
                slot: slot.clone(),
                lsn: cp.position.commit_lsn.to_string(),
            });
        }
        (None, None) => {
            let mut repl = ReplicationClient::connect(source_params, "walhook setup")
                .await
                .map_err(SourceError::Replication)?;
            // The checkpoint row first: if we crash in between, the next start sees a
            // checkpoint without a slot and refuses, rather than silently starting over.
            store.create_checkpoint(slot).await?;
            let point = setup::create_slot(&mut repl, slot, false).await?;
            repl.close().await;
            info!(slot = %slot, consistent_point = %point, "replication slot created");
        }
        (Some(info), cp) => {
            if let Some(plugin) = info.plugin.as_deref().filter(|p| *p != "pgoutput") {
                return Err(SourceError::SlotPlugin {
                    slot: slot.clone(),
                    plugin: plugin.to_owned(),
                }
                .into());
            }
            if info.wal_status.as_deref() == Some("lost") {
                return Err(DaemonError::SlotLost {
                    slot: slot.clone(),
                    lsn: cp
                        .map(|c| c.position.commit_lsn.to_string())
                        .unwrap_or_else(|| "-".into()),
                });
            }
            if cp.is_none() {
                warn!(slot = %slot, "slot exists but the store has no checkpoint for it; starting from the slot's position");
                store.create_checkpoint(slot).await?;
            }
        }
    }
    Ok(())
}
