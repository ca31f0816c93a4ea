//! `walhook config schema`: prints the JSON Schema of walhook.toml, for editors
//! (completion and checks, e.g. with taplo or the VS Code "Even Better TOML" extension).

use clap::Subcommand;

#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the JSON Schema of walhook.toml.
    Schema,
}

/// Runs `walhook config ...`.
pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::config::json_schema())?
            );
        }
    }
    Ok(())
}
