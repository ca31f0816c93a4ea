//! `walhook demo --once`: the real binary starts its own cluster, receiver and pipeline;
//! every scripted change must arrive with a verified signature, in revision order per
//! entity, and nothing may be left behind.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::walhook_bin;

/// Scripted events in the order the demo applies them: (type, entity:id, revision).
const EXPECTED: &[(&str, &str, i64)] = &[
    ("organisation.created", "organisation:1", 1),
    ("user.created", "user:1", 1),
    ("user.updated", "user:1", 2),
    ("user.role.assigned", "user:1", 3),
    ("user.updated", "user:1", 4),
    ("user.suspended", "user:1", 4),
    ("user.role.unassigned", "user:1", 5),
    ("user.deleted", "user:1", 6),
];

/// A printed webhook line: `HH:MM:SS.mmm  type  entity:id  rev N  signature ✓ verified  body`.
struct Line {
    event_type: String,
    entity: String,
    revision: i64,
    verified: bool,
    text: String,
}

fn webhook_lines(stdout: &str) -> Vec<Line> {
    stdout
        .lines()
        .filter(|l| l.contains(" rev ") && l.contains("signature"))
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            Line {
                event_type: words[1].to_owned(),
                entity: words[2].to_owned(),
                revision: words[4].parse().expect("revision is a number"),
                verified: l.contains("signature ✓ verified"),
                text: l.to_owned(),
            }
        })
        .collect()
}

#[test]
fn demo_once_delivers_every_scripted_change_verified_and_in_order() {
    // The demo finds PostgreSQL as the harness does (PG_BIN or the usual places).
    let started = Instant::now();
    let mut child = Command::new(walhook_bin())
        .args(["demo", "--once", "--timeout", "45"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walhook demo");
    let deadline = started + Duration::from_secs(90);
    while child.try_wait().expect("wait walhook demo").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "walhook demo --once did not finish within 90 s:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("demo output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(out.status.success(), "exit {}; {context}", out.status);

    let lines = webhook_lines(&stdout);
    assert_eq!(lines.len(), EXPECTED.len(), "webhook lines; {context}");
    for line in &lines {
        assert!(line.verified, "not verified: {}; {context}", line.text);
    }
    for (event_type, entity, revision) in EXPECTED {
        assert!(
            lines.iter().any(|l| l.event_type == *event_type
                && l.entity == *entity
                && l.revision == *revision),
            "{event_type} {entity} rev {revision} missing; {context}"
        );
    }
    // Per entity, revisions never go backwards.
    let mut last: HashMap<&str, i64> = HashMap::new();
    for line in &lines {
        let prev = last.insert(&line.entity, line.revision).unwrap_or(0);
        assert!(
            line.revision >= prev,
            "{} arrived after revision {prev}; {context}",
            line.text
        );
    }
    // The secret is never printed; the cluster directory is removed.
    assert!(
        !stdout.contains("whsec_") && !stderr.contains("whsec_"),
        "{context}"
    );
    let root = stdout
        .split_whitespace()
        .find(|w| w.contains("walhook-demo-"))
        .expect("the cluster directory is printed");
    assert!(
        !std::path::Path::new(root).exists(),
        "{root} was not removed; {context}"
    );
    assert!(stdout.contains("the first arrived"), "{context}");
}
