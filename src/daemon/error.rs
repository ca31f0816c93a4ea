//! The daemon's one error: why `walhook run`, `setup` or a reload stops. Every message
//! names the culprit and the fix; causes are kept as sources (printed once, by
//! [`crate::pg::ErrorChain`]).

use crate::config::ConfigErrors;
use crate::mapping::MappingError;
use crate::pg::{PgError, TableName};
use crate::source::SourceError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Connect(#[from] PgError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    Delivery(#[from] crate::delivery::DeliveryError),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error("the source task stopped unexpectedly")]
    SourceTask(#[source] tokio::task::JoinError),
    #[error("an ingest task writing a batch stopped unexpectedly")]
    IngestTask(#[source] tokio::task::JoinError),
    #[error(
        "table `{table}`: {needs} need the old row, which only REPLICA IDENTITY FULL provides. Fix: run `ALTER TABLE {quoted} REPLICA IDENTITY FULL;` or remove those settings from the config"
    )]
    NeedsFullIdentity {
        table: TableName,
        quoted: String,
        needs: String,
    },
    #[error(
        "replication slot `{slot}` is gone, but the store has a checkpoint for it (last stored commit {lsn}). Changes made since then may have been lost with the slot (dropped, invalidated by max_slot_wal_keep_size, or lost in a failover), so walhook will not silently start again from now. Fix: run `walhook setup --reset-slot` to create a new slot and continue from now, then backfill what was missed"
    )]
    SlotLost { slot: String, lsn: String },
}

impl From<tokio_postgres::Error> for DaemonError {
    fn from(e: tokio_postgres::Error) -> Self {
        DaemonError::Source(SourceError::Sql(e))
    }
}
