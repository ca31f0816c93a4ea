//! `walhook keys generate`: a new ed25519 key pair for `signature = "v1a"`, in the
//! Standard Webhooks encoding (`whsk_` secret key, `whpk_` public key). Needs no config.

use clap::Subcommand;

use super::{Exit, write_stdout};
use crate::config::Ed25519Key;

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print a new ed25519 key pair for signature = "v1a": the secret key (whsk_, for
    /// the subscription's secret or secret_file) and the public key (whpk_, for the
    /// receivers), as two TOML lines.
    Generate,
}

/// Runs `walhook keys ...`.
pub fn run(args: &KeysArgs) -> Exit {
    match args.command {
        KeysCommand::Generate => generate(),
    }
}

fn generate() -> Exit {
    let key = match Ed25519Key::generate() {
        Ok(key) => key,
        Err(e) => {
            eprintln!("error: cannot get random bytes from the operating system: {e}");
            return Exit::Failure;
        }
    };
    let text = pair_text(&key);
    write_stdout(text.as_bytes(), "key pair")
}

/// The two lines `walhook keys generate` prints: valid TOML, one key per line, so a
/// script can take either (`sed -n 's/^secret_key = "\(.*\)"$/\1/p'`).
fn pair_text(key: &Ed25519Key) -> String {
    format!(
        "secret_key = \"{}\"\npublic_key = \"{}\"\n",
        key.to_whsk().expose(),
        key.public_whpk()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_text_is_two_toml_lines_of_one_pair() {
        let key = Ed25519Key::from_seed(&[9u8; 32]);
        let text = pair_text(&key);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("secret_key = \"whsk_"), "{text}");
        assert!(lines[1].starts_with("public_key = \"whpk_"), "{text}");
        assert!(lines[1].contains(&key.public_whpk()), "{text}");
    }
}
