//! [`SourceError`]: the one error of the source stage, for setup, the replication
//! stream and `walhook check` alike. The replication client's [`ClientError`] and the
//! pgoutput parser's [`DecodeError`] stay their own (their callers match on them) and
//! are wrapped without repeating their text.

use super::client::ClientError;
use super::pgoutput::DecodeError;
use crate::pg::TableName;

/// Errors of the source stage: a database that is not (yet) fit for walhook (each
/// message names the culprit and the fix), a failed query, a failed replication
/// connection, or pgoutput data that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "wal_level is `{0}`, but logical replication needs `logical`. Fix: run `ALTER SYSTEM SET wal_level = logical;` as a superuser (or set it in postgresql.conf) and restart PostgreSQL"
    )]
    WalLevel(String),
    #[error(
        "role `{0}` may not use replication. Fix: as a superuser run `ALTER ROLE {0} REPLICATION;`"
    )]
    NoReplication(String),
    #[error(
        "table `{0}` (listed in the config) does not exist in database `{1}`. Fix: create it, correct the name, or remove it from [[tables]]"
    )]
    NoSuchTable(TableName, String),
    #[error(
        "table `{0}` has neither a primary key nor a replica identity: publishing it would make the application's own UPDATE and DELETE on it fail. Fix: add a primary key, or run `ALTER TABLE {1} REPLICA IDENTITY FULL;` (or `REPLICA IDENTITY USING INDEX ...`)"
    )]
    NoIdentity(TableName, String),
    #[error(
        "publication `{name}` does not match the config and role `{role}` may not change it ({reason}). Fix: have a DBA run:\n{sql}"
    )]
    PublicationNeedsDba {
        name: String,
        role: String,
        reason: String,
        sql: String,
    },
    #[error(
        "replication slot `{slot}` is in use by another process (PID {pid}); another walhook or `walhook tail --slot` is probably reading it. Fix: stop that process, or use another slot name"
    )]
    SlotActive { slot: String, pid: i32 },
    #[error(
        "replication slot `{slot}` uses output plugin `{plugin}`, walhook needs `pgoutput`. Fix: drop it (`SELECT pg_drop_replication_slot('{slot}');`) or choose another slot name"
    )]
    SlotPlugin { slot: String, plugin: String },
    #[error(
        "replication slot `{0}` does not exist. Fix: run `walhook setup` (or `walhook run`, which creates it), or correct [source] slot"
    )]
    NoSlot(String),
    /// A query on the source database failed.
    #[error("query on the source database failed")]
    Sql(#[from] tokio_postgres::Error),
    /// The replication connection failed (its messages name the server).
    #[error(transparent)]
    Replication(#[from] ClientError),
    /// A pgoutput message could not be read: reconnecting cannot fix it.
    #[error("malformed pgoutput data")]
    Decode(#[from] DecodeError),
}
