//! `walhook completions <shell>`: prints a completion script generated from the
//! command line definition (clap_complete), so it never falls behind the CLI.

use clap::CommandFactory as _;
use clap_complete::Shell;

use super::{Cli, Exit};

#[derive(Debug, clap::Args)]
#[command(after_help = "Install, e.g.:
  bash: walhook completions bash > ~/.local/share/bash-completion/completions/walhook
  zsh:  walhook completions zsh > ~/.zfunc/_walhook   (with fpath+=~/.zfunc before compinit)
  fish: walhook completions fish > ~/.config/fish/completions/walhook.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Prints the script for `args.shell` on stdout. A closed stdout (`| head`) is no error.
pub fn run(args: &CompletionsArgs) -> Exit {
    let script = script(args.shell);
    super::write_stdout(&script, "completion script")
}

/// The completion script for `shell`.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "walhook", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).expect("UTF-8");
            for sub in ["run", "check", "setup", "deliveries", "completions", "man"] {
                assert!(text.contains(sub), "{shell}: no `{sub}` in\n{text}");
            }
        }
    }
}
