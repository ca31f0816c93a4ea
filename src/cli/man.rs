//! `walhook man`: the manual page, generated from the command line definition
//! (clap_mangen): `walhook man` prints walhook(1) as roff; `walhook man --dir DIR`
//! writes walhook.1 and one page per subcommand (walhook-run.1, ...) for packaging.

use std::path::PathBuf;

use clap::CommandFactory as _;

use super::{Cli, Exit};

#[derive(Debug, clap::Args)]
#[command(after_help = "Read it with: walhook man | man -l -")]
pub struct ManArgs {
    /// Write walhook.1 and a page per subcommand (walhook-run.1, ...) into this
    /// directory instead of printing walhook(1).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints walhook(1), or writes every page into `--dir`.
pub fn run(args: &ManArgs) -> Exit {
    match &args.dir {
        None => match page() {
            Ok(roff) => super::write_stdout(&roff, "manual page"),
            Err(e) => {
                eprintln!("error: cannot render the manual page: {e}");
                Exit::Failure
            }
        },
        Some(dir) => match clap_mangen::generate_to(Cli::command(), dir) {
            Ok(()) => Exit::Success,
            Err(e) => {
                eprintln!(
                    "error: cannot write the manual pages into {}: {e}",
                    dir.display()
                );
                Exit::Failure
            }
        },
    }
}

/// walhook(1) as roff.
pub fn page() -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_a_title_the_subcommands_and_the_exit_statuses() {
        let text = String::from_utf8(page().unwrap()).expect("UTF-8");
        assert!(text.contains(".TH walhook"), "{text}");
        for sub in ["walhook\\-run", "walhook\\-check", "walhook\\-completions"] {
            assert!(text.contains(sub), "no `{sub}` in\n{text}");
        }
        assert!(text.contains("78"), "exit status 78 documented:\n{text}");
    }
}
