//! `walhook setup`: applies the store migrations and makes the publication and the slot
//! (`--print-sql` prints the SQL instead; `--reset-slot` replaces a lost slot).

use super::ConfigArg;
use crate::daemon::prepare;
use crate::source::connect::ConnectParams;
use crate::source::setup::{self, QualifiedName};
use crate::store::Store;
use crate::store::migrations;

#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Print the SQL (store schema and publication) for a DBA instead of applying it.
    #[arg(long)]
    pub print_sql: bool,
    /// The slot was lost: drop what is left of it, create a new one and continue from
    /// now. Changes made while there was no slot are NOT delivered; backfill them.
    #[arg(long)]
    pub reset_slot: bool,
}

/// Runs `walhook setup`.
pub async fn run(args: SetupArgs) -> anyhow::Result<()> {
    let config = args.config.load()?;
    if args.print_sql {
        let tables: Vec<QualifiedName> = super::tail::watched_tables(&config);
        println!("-- walhook store (schema {})", config.store.schema);
        println!("{}", migrations::full_sql(&config.store.schema));
        println!("-- publication of the watched tables (run as the tables' owner)");
        println!(
            "{}",
            setup::publication_sql(&config.source.publication, &tables, false)
        );
        return Ok(());
    }
    if args.reset_slot {
        let source = ConnectParams::parse(config.source.url.expose().as_str())?;
        let sql = source.connect_sql().await?;
        if let Some(info) = setup::slot_info(&sql, &config.source.slot).await? {
            if let Some(pid) = info.active_pid {
                anyhow::bail!(
                    "slot `{}` is in use by PID {pid}; stop every walhook using it first",
                    config.source.slot
                );
            }
            sql.execute(
                "SELECT pg_drop_replication_slot($1)",
                &[&config.source.slot],
            )
            .await?;
        }
        let store_params = ConnectParams::parse(config.store.url.expose().as_str())?;
        let mut store = Store::connect(&store_params, &config.store.schema).await?;
        store.migrate().await?;
        // Forget the checkpoint row, so that prepare() creates slot and row anew.
        store
            .client()
            .execute(
                &format!(
                    "DELETE FROM {}.checkpoints WHERE slot = $1",
                    crate::source::client::quote_ident(&config.store.schema)
                ),
                &[&config.source.slot],
            )
            .await?;
        eprintln!(
            "slot `{}` reset: walhook continues from now; changes made while the slot was missing were not captured",
            config.source.slot
        );
    }
    prepare::prepare(&config).await?;
    println!(
        "store schema `{}` migrated; publication `{}` and slot `{}` ready",
        config.store.schema, config.source.publication, config.source.slot
    );
    Ok(())
}
