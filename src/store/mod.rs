//! The durable store in PostgreSQL (schema `walhook` by default): migrations, the ingest
//! checkpoint and leader epoch, and group-committed ingest of entity events.
//!
//! Contract of [`Store::ingest`]: one store transaction writes a batch's events, their
//! revisions and the checkpoint, so after any crash the checkpoint says exactly which
//! source changes are stored (G2), and revisions stay gap-free (G3). Callers confirm a
//! flush LSN to the slot only after `ingest` returned (G1).

pub mod backfills;
pub mod deliveries;
pub mod ingest;
pub mod live;
pub mod migrations;
pub mod operator;
pub mod purge;
pub mod stats;
pub mod wake;

use tokio::sync::OnceCell;
use tokio_postgres::{Client, Statement};

pub use ingest::{BulkRole, ChangeEvents, IngestBatch, PendingEvent};

use crate::pg::quote_ident;
use crate::pg::{ConnInfo, ErrorChain, PgError};
use crate::source::Lsn;
use crate::source::stream::Position;

/// How long a new ingest leader waits for the checkpoint row before it ends the
/// sessions holding it (see [`Store::take_leadership`]). A live earlier holder's last
/// ingest transaction ends well within it.
pub const STALLED_HOLDER: std::time::Duration = std::time::Duration::from_secs(5);

/// Failures of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the store")]
    Connect(#[from] PgError),
    #[error("store query failed")]
    Query(#[from] tokio_postgres::Error),
    #[error("store migration {name} failed")]
    Migration {
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "another instance took over slot `{slot}` (leader epoch {current}, ours {ours}); this instance stops ingesting"
    )]
    Deposed {
        slot: String,
        ours: i64,
        current: i64,
    },
    /// A batch written while the one before it was still on its way was rolled back
    /// because that one failed (see [`Store::ingest_after`]).
    #[error("the batch before this one was not stored; this one is written again after it")]
    EarlierFailed,
    #[error("the store has no checkpoint row for slot `{0}`")]
    NoCheckpoint(String),
    /// A delivery-state write was refused: this dispatcher no longer holds the
    /// subscription's lease (another instance took it over after it expired; G8).
    #[error(
        "this instance no longer holds the dispatch lease of subscription `{subscription}`; another instance dispatches it"
    )]
    LeaseLost { subscription: String },
}

impl StoreError {
    /// Whether the store may come back (connection lost, server restarting), so that
    /// the caller should wait and retry the same batch.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect(_) => true,
            StoreError::Query(e) => {
                e.is_closed()
                    || e.code().is_none()
                    || e.code().is_some_and(|c| {
                        let c = c.code();
                        c.starts_with("08")
                            || c.starts_with("57P")
                            || c == "40001"
                            || c == "40P01"
                            || c == "53300"
                    })
            }
            _ => false,
        }
    }

    /// What the store's refusal of a write means for an operator, for an error that
    /// retrying alone cannot cure: a bounded `kind` (a metric label), a description
    /// without row values (PostgreSQL's message, never its DETAIL, which quotes the
    /// row), and the fix.
    pub fn refusal(&self) -> Refusal {
        let db = match self {
            StoreError::Query(e) | StoreError::Migration { source: e, .. } => e.as_db_error(),
            _ => None,
        };
        let Some(db) = db else {
            return Refusal {
                kind: "other",
                what: ErrorChain(self).to_string(),
                fix: "see the error; walhook retries until the store accepts the change",
            };
        };
        let mut what = db.message().to_owned();
        if let Some(table) = db.table() {
            what.push_str(&format!(" (store table `{table}`)"));
        }
        let code = db.code().code();
        let (kind, fix) = match code {
            "54000" => (
                "limit",
                "a value is over a PostgreSQL limit in the store, typically an entity id too long for an index; choose shorter id columns for this table (`id = [...]` in [[tables]]) and restart walhook, or change the store so it accepts the value",
            ),
            c if c.starts_with("23") => (
                "constraint",
                "a constraint in the store refuses the row; drop or relax that constraint (it is not one of walhook's migrations)",
            ),
            "42501" => (
                "privilege",
                "grant the store role the privileges on the walhook schema (see sql/least-privilege.sql)",
            ),
            "25006" => (
                "read_only",
                "the store is read-only (a standby, or default_transaction_read_only); point [store] url at the primary",
            ),
            c if c.starts_with("53") => (
                "resources",
                "the store is out of disk, memory or another resource; free or raise it",
            ),
            _ => (
                "other",
                "see the error; walhook retries until the store accepts the change",
            ),
        };
        Refusal { kind, what, fix }
    }
}

/// See [`StoreError::refusal`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `limit`, `constraint`, `privilege`, `read_only`, `resources` or `other`.
    pub kind: &'static str,
    pub what: String,
    pub fix: &'static str,
}

/// Where ingest stands for one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: Position,
    pub last_seq: i64,
    pub leader_epoch: i64,
}

/// A connection to the store.
pub struct Store {
    client: Client,
    params: ConnInfo,
    schema: String,
    /// The schema, quoted for SQL.
    s: String,
    /// The dispatcher's query of new events, prepared on this connection when first
    /// run (it runs every few milliseconds under load: a prepared statement saves a
    /// round trip and the parse).
    new_events: OnceCell<Statement>,
    /// The statements of ingest's transaction, prepared when this connection first
    /// ingests.
    ingest_sql: OnceCell<ingest::IngestStatements>,
}

impl Store {
    /// Connects to the store database.
    pub async fn connect(params: &ConnInfo, schema: &str) -> Result<Store, StoreError> {
        let client = params.connect_sql().await?;
        Ok(Store {
            client,
            params: params.clone(),
            schema: schema.to_owned(),
            s: quote_ident(schema),
            new_events: OnceCell::new(),
            ingest_sql: OnceCell::new(),
        })
    }

    /// A second connection to the same store.
    pub async fn connect_another(&self) -> Result<Store, StoreError> {
        Store::connect(&self.params, &self.schema).await
    }

    /// Reconnects after the connection was lost.
    pub async fn reconnect(&mut self) -> Result<(), StoreError> {
        self.client = self.params.connect_sql().await?;
        self.new_events = OnceCell::new();
        self.ingest_sql = OnceCell::new();
        Ok(())
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Where the store is.
    pub fn conn_info(&self) -> &ConnInfo {
        &self.params
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The underlying client, for operator queries.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Applies pending migrations.
    pub async fn migrate(&mut self) -> Result<usize, StoreError> {
        migrations::migrate(&mut self.client, &self.schema).await
    }

    /// The checkpoint of `slot`, if walhook has ever created that slot with this store.
    pub async fn checkpoint(&self, slot: &str) -> Result<Option<Checkpoint>, StoreError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT commit_lsn::text, rows_done, complete, last_seq, leader_epoch FROM {}.checkpoints WHERE slot = $1",
                    self.s
                ),
                &[&slot],
            )
            .await?;
        Ok(row.map(|r| Checkpoint {
            position: Position {
                commit_lsn: r.get::<_, String>(0).parse().unwrap_or(Lsn::INVALID),
                rows_done: r.get::<_, i64>(1) as u64,
                complete: r.get(2),
            },
            last_seq: r.get(3),
            leader_epoch: r.get(4),
        }))
    }

    /// Records that walhook created `slot`: from now on a missing slot means changes may
    /// have been missed (G1).
    pub async fn create_checkpoint(&self, slot: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                &format!(
                    "INSERT INTO {}.checkpoints (slot) VALUES ($1) ON CONFLICT (slot) DO NOTHING",
                    self.s
                ),
                &[&slot],
            )
            .await?;
        Ok(())
    }

    /// Forgets the source position of `slot` (`walhook setup --reset-slot`, before a new
    /// slot is created): ingest starts from the new slot's start. Only the position is
    /// replaced; the event log's sequence (`last_seq`), revisions, cursors and retry
    /// rows are kept, so ingest appends after the last stored event. The leader epoch
    /// is bumped, fencing out any instance still running with the old slot (G8).
    pub async fn reset_checkpoint(&self, slot: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                &format!(
                    "INSERT INTO {s}.checkpoints AS c (slot) VALUES ($1)
                     ON CONFLICT (slot) DO UPDATE SET commit_lsn = '0/0', rows_done = 0, complete = true,
                         leader_epoch = c.leader_epoch + 1, updated_at = now()",
                    s = self.s
                ),
                &[&slot],
            )
            .await?;
        Ok(())
    }

    /// Waits for and takes the setup lock of `slot` (publication, slot and checkpoint
    /// creation), held by this connection until [`Store::unlock_setup`] or its end.
    pub async fn lock_setup(&self, slot: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                "SELECT pg_advisory_lock(hashtextextended('walhook setup ' || $1, 0))",
                &[&slot],
            )
            .await?;
        Ok(())
    }

    /// Releases the lock taken by [`Store::lock_setup`].
    pub async fn unlock_setup(&self, slot: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                "SELECT pg_advisory_unlock(hashtextextended('walhook setup ' || $1, 0))",
                &[&slot],
            )
            .await?;
        Ok(())
    }

    /// Makes this instance the slot's ingest leader: bumps the epoch and returns it. Any
    /// ingest by an earlier leader fails from now on (G8).
    ///
    /// The caller holds the slot, so a session that keeps the checkpoint row locked can
    /// only be an earlier holder's ingest, and PostgreSQL does not always end it: a
    /// holder frozen inside its events COPY leaves a session `active` and waiting for
    /// data, which neither `idle_in_transaction_session_timeout` nor `statement_timeout`
    /// ends. Every [`STALLED_HOLDER`] of waiting, the sessions blocking the update are
    /// ended (`pg_terminate_backend`); their transaction rolls back and this leader
    /// resumes from the checkpoint, so nothing is lost or stored twice.
    pub async fn take_leadership(&self, slot: &str, leader: &str) -> Result<i64, StoreError> {
        let own_pid: i32 = self
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        let update = format!(
            "UPDATE {}.checkpoints SET leader_epoch = leader_epoch + 1, leader = $2, updated_at = now()
             WHERE slot = $1 RETURNING leader_epoch",
            self.s
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&slot, &leader];
        let taken = self.client.query_opt(&update, &params);
        tokio::pin!(taken);
        let mut other = None;
        loop {
            tokio::select! {
                row = &mut taken => {
                    return row?
                        .map(|r| r.get(0))
                        .ok_or_else(|| StoreError::NoCheckpoint(slot.to_owned()));
                }
                _ = tokio::time::sleep(STALLED_HOLDER) => {
                    if let Err(e) = self.end_blockers(own_pid, &mut other).await {
                        tracing::warn!(error = %ErrorChain(&e), "cannot look for the sessions holding the checkpoint; still waiting");
                    }
                }
            }
        }
    }

    /// Ends the sessions blocking session `blocked` (see [`Store::take_leadership`]),
    /// over a second connection kept in `other`.
    async fn end_blockers(
        &self,
        blocked: i32,
        other: &mut Option<Store>,
    ) -> Result<(), StoreError> {
        if other.as_ref().is_none_or(|o| o.is_closed()) {
            *other = Some(self.connect_another().await?);
        }
        let client = &other.as_ref().expect("connected above").client;
        let blockers = client
            .query(
                "SELECT b.pid, coalesce(a.application_name, ''), coalesce(a.usename::text, '')
                 FROM unnest(pg_blocking_pids($1)) AS b(pid)
                 LEFT JOIN pg_stat_activity a ON a.pid = b.pid",
                &[&blocked],
            )
            .await?;
        for b in blockers {
            let (pid, application, role): (i32, String, String) = (b.get(0), b.get(1), b.get(2));
            match client
                .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                .await
            {
                Ok(_) => tracing::warn!(
                    pid,
                    application = %application,
                    role = %role,
                    "ended a session that held the checkpoint row of the slot this instance now holds (an earlier holder frozen mid-transaction); its transaction rolls back"
                ),
                Err(e) => tracing::warn!(
                    pid,
                    application = %application,
                    role = %role,
                    error = %ErrorChain(&e),
                    "a session holds the checkpoint row and cannot be ended by this role; end it (SELECT pg_terminate_backend(pid)) or grant pg_signal_backend to walhook's role"
                ),
            }
        }
        Ok(())
    }

    /// Records the subscriptions of the config, keeping the state of known ones.
    pub async fn ensure_subscriptions(&self, names: &[String]) -> Result<(), StoreError> {
        self.client
            .execute(
                &format!(
                    "INSERT INTO {}.subscription_state (subscription, cursor)
                     SELECT name, (SELECT coalesce(max(last_seq), 0) FROM {s}.checkpoints) FROM unnest($1::text[]) name
                     ON CONFLICT (subscription) DO NOTHING",
                    self.s,
                    s = self.s
                ),
                &[&names],
            )
            .await?;
        Ok(())
    }
}
