//! The reference material the binary generates from its own command line: shell
//! completions (`walhook completions <shell>`) and the manual page (`walhook man`),
//! checked by running the real binary.

use std::process::{Command, Output};

use crate::support::walhook_bin;

/// Every subcommand, as the completions and the man page must name them.
const SUBCOMMANDS: [&str; 12] = [
    "run",
    "setup",
    "tail",
    "check",
    "deliveries",
    "subscriptions",
    "backfill",
    "demo",
    "config",
    "keys",
    "completions",
    "man",
];

fn walhook(args: &[&str]) -> Output {
    let out = Command::new(walhook_bin())
        .args(args)
        .output()
        .expect("run walhook");
    assert!(
        out.status.success(),
        "walhook {}: {:?}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_subcommand() {
    for shell in ["bash", "zsh", "fish"] {
        let out = walhook(&["completions", shell]);
        let script = String::from_utf8(out.stdout).expect("UTF-8");
        assert!(script.len() > 1000, "{shell}: a short script:\n{script}");
        assert!(script.contains("walhook"), "{shell}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell}: no `{sub}`");
        }
        // Nested subcommands and options are completed too (fish writes `-l print-sql`).
        for word in ["replay", "pause", "print-sql", "reset-slot", "generate"] {
            assert!(script.contains(word), "{shell}: no `{word}`");
        }
    }
    let bad = Command::new(walhook_bin())
        .args(["completions", "tcsh"])
        .output()
        .expect("run walhook");
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn man_prints_roff_naming_every_subcommand_and_writes_one_page_each() {
    let page = String::from_utf8(walhook(&["man"]).stdout).expect("UTF-8");
    assert!(page.contains(".TH walhook 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for sub in SUBCOMMANDS {
        // roff escapes the hyphen.
        assert!(
            page.contains(&format!("walhook\\-{sub}(1)")),
            "no {sub}:\n{page}"
        );
    }
    assert!(
        page.contains("78"),
        "the exit statuses are in the page:\n{page}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_str().expect("UTF-8 path");
    walhook(&["man", "--dir", path]);
    for name in ["walhook.1", "walhook-run.1", "walhook-deliveries-replay.1"] {
        let text = std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains(".TH"), "{name}:\n{text}");
    }
}
