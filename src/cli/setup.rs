//! `walhook setup`: applies the store migrations and makes the publication and the slot
//! (`--print-sql` prints the SQL instead; `--reset-slot` replaces a lost slot).

use super::ConfigArg;
use crate::daemon::prepare;
use crate::pg::TableName;
use crate::source::publication;
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
        let tables: Vec<TableName> = super::tail::watched_tables(&config);
        println!("-- walhook store (schema {})", config.store.schema);
        println!("{}", migrations::full_sql(&config.store.schema));
        println!("-- publication of the watched tables (run as the tables' owner)");
        println!(
            "{}",
            publication::publication_sql(&config.source.publication, &tables, false)
        );
        return Ok(());
    }
    if args.reset_slot {
        prepare::reset_slot(&config).await?;
        eprintln!(
            "slot `{}` reset: walhook continues from now, appending after the stored event log; changes made while the slot was missing were not captured (backfill them)",
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
