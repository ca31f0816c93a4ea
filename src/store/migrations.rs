//! Store migrations: numbered SQL files from `sql/`, embedded in the binary, applied in
//! order under an advisory lock so that several instances (or versions N and N+1 during
//! a rolling upgrade) never apply one twice.

use tokio_postgres::Client;

use super::StoreError;
use crate::pg::quote_ident;

/// One embedded migration.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init",
        sql: include_str!("../../sql/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_deliveries",
        sql: include_str!("../../sql/0002_deliveries.sql"),
    },
    Migration {
        version: 3,
        name: "0003_operator",
        sql: include_str!("../../sql/0003_operator.sql"),
    },
    Migration {
        version: 4,
        name: "0004_batches",
        sql: include_str!("../../sql/0004_batches.sql"),
    },
    Migration {
        version: 5,
        name: "0005_context",
        sql: include_str!("../../sql/0005_context.sql"),
    },
    Migration {
        version: 6,
        name: "0006_backfills",
        sql: include_str!("../../sql/0006_backfills.sql"),
    },
    Migration {
        version: 7,
        name: "0007_revisions_collate_c",
        sql: include_str!("../../sql/0007_revisions_collate_c.sql"),
    },
];

/// Advisory lock key for migrations ("walhook" in ASCII).
const MIGRATION_LOCK: i64 = 0x0077_616c_686f_6f6b;

impl Migration {
    /// The SQL with `{schema}` replaced by the quoted schema name.
    pub fn sql_for(&self, schema: &str) -> String {
        self.sql.replace("{schema}", &quote_ident(schema))
    }
}

/// Everything `walhook setup --print-sql` prints: the schema, the bookkeeping table and
/// every migration, for DBAs who apply SQL by hand.
pub fn full_sql(schema: &str) -> String {
    let s = quote_ident(schema);
    let mut out = format!(
        "CREATE SCHEMA IF NOT EXISTS {s};\n\
         CREATE TABLE IF NOT EXISTS {s}.schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());\n"
    );
    for m in MIGRATIONS {
        out.push_str(&format!("\n-- {}\n{}\n", m.name, m.sql_for(schema)));
        out.push_str(&format!(
            "INSERT INTO {s}.schema_migrations (version, name) VALUES ({}, '{}');\n",
            m.version, m.name
        ));
    }
    out
}

/// Applies the migrations not yet applied; returns how many were.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<usize, StoreError> {
    apply(client, schema, true).await
}

/// Applies the migrations not yet applied in a transaction that is rolled back
/// (`walhook check`): whether `walhook run` could migrate this store, and how many
/// migrations it would apply.
pub async fn dry_run(client: &mut Client, schema: &str) -> Result<usize, StoreError> {
    apply(client, schema, false).await
}

async fn apply(client: &mut Client, schema: &str, commit: bool) -> Result<usize, StoreError> {
    let s = quote_ident(schema);
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await?;
    // CREATE SCHEMA needs CREATE on the database even when the schema exists; a
    // least-privilege role owns its schema but has no such right (sql/least-privilege.sql).
    let schema_exists = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await?
        .is_some();
    if !schema_exists {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
            .await?;
    }
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {s}.schema_migrations (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());"
    ))
    .await?;
    let applied: Vec<i32> = tx
        .query(&format!("SELECT version FROM {s}.schema_migrations"), &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let newest_known = MIGRATIONS.last().map(|m| m.version).unwrap_or(0);
    if let Some(newer) = applied.iter().copied().filter(|v| *v > newest_known).max() {
        // A newer walhook migrated this store; older code keeps running (rolling upgrade)
        // as long as migrations stay additive.
        tracing::warn!(
            store_version = newer,
            known = newest_known,
            "the store was migrated by a newer walhook"
        );
    }
    let mut count = 0;
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(&m.sql_for(schema))
            .await
            .map_err(|source| StoreError::Migration {
                name: m.name,
                source,
            })?;
        tx.execute(
            &format!("INSERT INTO {s}.schema_migrations (version, name) VALUES ($1, $2)"),
            &[&m.version, &m.name],
        )
        .await?;
        count += 1;
    }
    if commit {
        tx.commit().await?;
    } else {
        tx.rollback().await?;
    }
    Ok(count)
}
