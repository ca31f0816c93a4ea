//! Preparing a database for walhook and checking that it is ready: `wal_level`, the
//! REPLICATION privilege, the watched tables and their replica identity, the
//! publication (kept in step with the config: [`super::publication`]) and the slot.

use tokio_postgres::Client;

use super::Lsn;
use super::SourceError;
use super::client::{ClientError, ReplicationClient};
use crate::pg::{TableName, quote_ident};

/// What start-up needs to know about one watched table.
#[derive(Clone, Debug)]
pub struct TableInfo {
    pub name: TableName,
    pub oid: u32,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub primary_key: Vec<String>,
    pub columns: Vec<String>,
    /// Columns whose values may be TOASTed (storage other than plain).
    pub toastable: Vec<String>,
}

impl TableInfo {
    /// Whether UPDATE and DELETE carry an identity (primary key, index or full).
    pub fn has_identity(&self) -> bool {
        match self.replica_identity {
            'f' | 'i' => true,
            'd' => !self.primary_key.is_empty(),
            _ => false,
        }
    }
}

/// `SHOW wal_level` must say `logical`.
pub async fn check_wal_level(client: &Client) -> Result<(), SourceError> {
    let row = client.query_one("SHOW wal_level", &[]).await?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(SourceError::WalLevel(level));
    }
    Ok(())
}

/// The connected role must be a superuser or have REPLICATION.
pub async fn check_replication_role(client: &Client) -> Result<(), SourceError> {
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (role, ok): (String, bool) = (row.get(0), row.get(1));
    if !ok {
        return Err(SourceError::NoReplication(role));
    }
    Ok(())
}

/// Looks up each table; a missing table or one without identity is an error.
pub async fn inspect_tables(
    client: &Client,
    tables: &[TableName],
) -> Result<Vec<TableInfo>, SourceError> {
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    let mut out = Vec::with_capacity(tables.len());
    for table in tables {
        let row = client
            .query_opt(
                "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&table.schema, &table.name],
            )
            .await?;
        let Some(row) = row else {
            return Err(SourceError::NoSuchTable(table.clone(), db));
        };
        let oid: u32 = row.get(0);
        let ident: String = row.get(1);
        let pk = client
            .query(
                "SELECT a.attname::text FROM pg_index i
                 JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord) ON true
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&oid],
            )
            .await?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect();
        let cols = client
            .query(
                "SELECT attname::text, attstorage::text FROM pg_attribute
                 WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&oid],
            )
            .await?;
        let columns = cols.iter().map(|r| r.get::<_, String>(0)).collect();
        let toastable = cols
            .iter()
            .filter(|r| r.get::<_, String>(1) != "p")
            .map(|r| r.get::<_, String>(0))
            .collect();
        let info = TableInfo {
            name: table.clone(),
            oid,
            replica_identity: ident.chars().next().unwrap_or('d'),
            primary_key: pk,
            columns,
            toastable,
        };
        if !info.has_identity() {
            return Err(SourceError::NoIdentity(table.clone(), table.quoted()));
        }
        out.push(info);
    }
    Ok(out)
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Clone, Debug)]
pub struct SlotInfo {
    pub plugin: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    pub wal_status: Option<String>,
}

/// Looks up slot `name` in the connected database.
pub async fn slot_info(client: &Client, name: &str) -> Result<Option<SlotInfo>, SourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, active_pid, confirmed_flush_lsn::text, wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| SlotInfo {
        plugin: r.get(0),
        active_pid: r.get(1),
        confirmed_flush: r.get::<_, Option<String>>(2).and_then(|s| s.parse().ok()),
        wal_status: r.get(3),
    }))
}

/// Replication slots and WAL senders in use against their limits.
#[derive(Clone, Copy, Debug)]
pub struct Headroom {
    pub slots_used: i64,
    pub slots_max: i64,
    pub senders_used: i64,
    pub senders_max: i64,
}

/// How many replication slots and WAL senders the server has left.
pub async fn headroom(client: &Client) -> Result<Headroom, SourceError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots),
                    current_setting('max_replication_slots')::int8,
                    (SELECT count(*) FROM pg_stat_replication),
                    current_setting('max_wal_senders')::int8",
            &[],
        )
        .await?;
    Ok(Headroom {
        slots_used: row.get(0),
        slots_max: row.get(1),
        senders_used: row.get(2),
        senders_max: row.get(3),
    })
}

/// The WAL a slot keeps on the server, and the server's cap on it.
#[derive(Clone, Debug)]
pub struct RetainedWal {
    /// Bytes from the slot's restart position to the current WAL position.
    pub retained_bytes: Option<i64>,
    /// `max_slot_wal_keep_size` in bytes; `None` when unlimited (-1).
    pub keep_limit_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// How much WAL slot `name` retains; `None` when there is no such slot.
pub async fn retained_wal(client: &Client, name: &str) -> Result<Option<RetainedWal>, SourceError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8,
                    CASE WHEN current_setting('max_slot_wal_keep_size') = '-1' THEN NULL
                         ELSE pg_size_bytes(current_setting('max_slot_wal_keep_size')) END,
                    wal_status
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| RetainedWal {
        retained_bytes: r.get(0),
        keep_limit_bytes: r.get(1),
        wal_status: r.get(2),
    }))
}

/// Slot `name` must exist, use pgoutput and not be active in another process.
pub async fn check_slot_usable(client: &Client, name: &str) -> Result<SlotInfo, SourceError> {
    let info = slot_info(client, name)
        .await?
        .ok_or_else(|| SourceError::NoSlot(name.to_owned()))?;
    if let Some(plugin) = info.plugin.as_deref().filter(|p| *p != "pgoutput") {
        return Err(SourceError::SlotPlugin {
            slot: name.to_owned(),
            plugin: plugin.to_owned(),
        });
    }
    if let Some(pid) = info.active_pid {
        return Err(SourceError::SlotActive {
            slot: name.to_owned(),
            pid,
        });
    }
    Ok(info)
}

/// Creates a permanent pgoutput slot named `name`; returns its consistent point.
pub async fn create_slot(
    repl: &mut ReplicationClient,
    name: &str,
    temporary: bool,
) -> Result<Lsn, SourceError> {
    let temp = if temporary { " TEMPORARY" } else { "" };
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {}{temp} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(name)
        ))
        .await?;
    let point = rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|s| s.parse().ok())
        .unwrap_or(Lsn::INVALID);
    Ok(point)
}

/// Turns a slot-in-use server error (SQLSTATE 55006) into [`SourceError::SlotActive`].
pub fn slot_error(slot: &str, err: ClientError) -> SourceError {
    if err.code() == Some("55006") {
        let pid = match &err {
            ClientError::Server(e) => e
                .message
                .rsplit(' ')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            _ => 0,
        };
        return SourceError::SlotActive {
            slot: slot.to_owned(),
            pid,
        };
    }
    if err.code() == Some("42704") {
        return SourceError::NoSlot(slot.to_owned());
    }
    SourceError::Replication(err)
}
