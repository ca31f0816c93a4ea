//! Receiver formats, checked by independent implementations run from the test:
//! `signature = "v1a"` (ed25519, verified with Python's `cryptography`, keys from
//! `walhook keys generate`), `format = "cloudevents"` (validated with Python's
//! `jsonschema` against the official CloudEvents 1.0.2 schema,
//! tests/cloudevents/cloudevents.json), and the config errors of bad keys.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::{SECRET, WAIT, subscription};
use crate::support::cli::{self, ConfigFile};
use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::{Received, Receiver};
use crate::support::{wait_for, walhook_bin};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `python3 tests/python/SCRIPT ARGS` with `stdin`; returns stdout, panicking
/// (with stderr) when it fails.
pub(super) fn python(script: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new("python3")
        .arg(repo(&format!("tests/python/{script}")))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "run python3 (apt-get install python3 python3-cryptography python3-jsonschema python3-jwt)",
        );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("python3 output");
    assert!(
        out.status.success(),
        "python3 {script} {args:?}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// A new key pair from `walhook keys generate`: (whsk, whpk).
pub(super) fn generate_pair() -> (String, String) {
    let out = Command::new(walhook_bin())
        .args(["keys", "generate"])
        .env_remove("WALHOOK_CONFIG")
        .output()
        .expect("run walhook keys generate");
    assert!(
        out.status.success(),
        "walhook keys generate: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let parsed: toml::Table = toml::from_str(&text).expect("the output is TOML");
    assert_eq!(parsed.len(), 2, "two keys:\n{text}");
    let get = |k: &str| parsed[k].as_str().expect("a string").to_owned();
    (get("secret_key"), get("public_key"))
}

/// One delivery as a line for `ed25519_check.py verify`.
fn delivery_line(r: &Received) -> String {
    serde_json::json!({
        "id": r.headers["webhook-id"],
        "timestamp": r.headers["webhook-timestamp"],
        "signature": r.headers["webhook-signature"],
        "body_b64": STANDARD.encode(&r.body),
    })
    .to_string()
}

/// What `ed25519_check.py verify whpk` says of each line.
fn verify_v1a(whpk: &str, lines: &[String]) -> Vec<String> {
    python(
        "ed25519_check.py",
        &["verify", whpk],
        &(lines.join("\n") + "\n"),
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

#[test]
fn keys_generate_prints_a_pair_that_signs_and_verifies() {
    let (whsk, whpk) = generate_pair();
    assert!(whsk.starts_with("whsk_") && whpk.starts_with("whpk_"));
    assert_eq!(
        python("ed25519_check.py", &["pair", &whsk, &whpk], ""),
        "pair ok\n"
    );
    // Every run is a new pair, and a pair's halves do not mix with another's.
    let (other_sk, other_pk) = generate_pair();
    assert_ne!(other_sk, whsk);
    let mixed = Command::new("python3")
        .arg(repo("tests/python/ed25519_check.py"))
        .args(["pair", &whsk, &other_pk])
        .output()
        .expect("run python3");
    assert!(!mixed.status.success(), "a foreign public key was accepted");
}

#[tokio::test]
async fn v1a_signatures_verify_with_an_independent_ed25519_implementation() {
    let (new_sk, new_pk) = generate_pair();
    let (old_sk, old_pk) = generate_pair();
    let (_, stranger_pk) = generate_pair();
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let dir = tempfile::tempdir().unwrap();
    let new_file = dir.path().join("new.whsk");
    std::fs::write(&new_file, format!("{new_sk}\n")).unwrap();
    let rest = format!(
        "{}signature = \"v1a\"\nsecret_file = \"{}\"\n{}signature = \"v1a\"\nsecret = [\"${{NEW_KEY}}\", \"{old_sk}\"]\n",
        subscription("one", &receiver.url, "[\"user.*\"]"),
        new_file.display(),
        subscription("rotating", &receiver.url, "[\"user.*\"]"),
    );
    let work = Workdir::new(&users_config(&db, &rest));
    let mut daemon = work.spawn_run_env(0, &[("NEW_KEY", Some(&new_sk))]);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a@x', 0), (2, 'b@x', 0)")
        .await;
    db.batch("UPDATE users SET n = 1 WHERE id = 1; DELETE FROM users WHERE id = 2")
        .await;
    // 4 events, 2 subscriptions.
    wait_for("8 deliveries", WAIT, || async {
        receiver.received().len() >= 8
    })
    .await;
    let got = receiver.received();
    assert_eq!(got.len(), 8, "each event once per subscription");

    let mut lines = Vec::new();
    let mut rotating = Vec::new();
    for r in &got {
        let signature = &r.headers["webhook-signature"];
        let parts: Vec<&str> = signature.split(' ').collect();
        assert!(
            parts.iter().all(|p| p.starts_with("v1a,")),
            "only v1a signatures: {signature}"
        );
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["webhook-id"], r.json()["id"].as_str().unwrap());
        rotating.push(parts.len() == 2);
        lines.push(delivery_line(r));
    }
    assert_eq!(
        rotating.iter().filter(|r| **r).count(),
        4,
        "the rotating subscription signs with both keys, the other with one"
    );
    // The new key verifies every delivery; the old one those of `rotating`.
    assert!(
        verify_v1a(&new_pk, &lines).iter().all(|v| v == "ok"),
        "a delivery does not verify with the new key"
    );
    let old = verify_v1a(&old_pk, &lines);
    for (verdict, rotating) in old.iter().zip(&rotating) {
        assert_eq!(verdict == "ok", *rotating, "old key: {old:?}");
    }
    // The check has teeth: another key, a changed body, id or timestamp fail.
    assert!(
        verify_v1a(&stranger_pk, &lines).iter().all(|v| v == "bad"),
        "a stranger's key verified"
    );
    let r = &got[0];
    let mut tampered = Vec::new();
    for (field, value) in [
        ("body_b64", STANDARD.encode([&r.body[..], b" "].concat())),
        ("id", "evt_forged".to_owned()),
        (
            "timestamp",
            (r.headers["webhook-timestamp"].parse::<i64>().unwrap() + 1).to_string(),
        ),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&delivery_line(r)).unwrap();
        v[field] = value.into();
        tampered.push(v.to_string());
    }
    assert_eq!(verify_v1a(&new_pk, &tampered), ["bad", "bad", "bad"]);

    let log = daemon.log();
    for key in [&new_sk, &old_sk] {
        let b64 = key.trim_start_matches("whsk_");
        assert!(!log.contains(b64), "a secret key reached the log");
    }
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

#[tokio::test]
async fn cloudevents_bodies_validate_against_the_cloudevents_schema() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let rest = format!(
        "{}format = \"cloudevents\"\nsecret = \"{SECRET}\"\n{}format = \"cloudevents\"\npayload = \"thin\"\ncloudevents = {{ source = \"https://app.example.com/db\" }}\n",
        subscription("ce", &receiver.url, "[\"user.*\"]"),
        subscription("ce_thin", &receiver.url, "[\"user.*\"]"),
    );
    let work = Workdir::new(&users_config(&db, &rest));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, 'a@x', 0), (2, 'b@x', 0)")
        .await;
    db.batch("UPDATE users SET n = 1 WHERE id = 1; DELETE FROM users WHERE id = 2")
        .await;
    wait_for("8 deliveries", WAIT, || async {
        receiver.received().len() >= 8
    })
    .await;
    let got = receiver.received();
    assert_eq!(got.len(), 8, "each event once per subscription");

    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    let mut documents = Vec::new();
    let mut seen = Vec::new();
    for r in &got {
        let event = r.json();
        assert_eq!(
            r.headers["content-type"], "application/cloudevents+json",
            "{event}"
        );
        // Standard Webhooks headers still come with every CloudEvent.
        assert_eq!(r.headers["webhook-id"], event["id"].as_str().unwrap());
        assert!(r.headers.contains_key("webhook-timestamp"));
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["datacontenttype"], "application/json");
        let subject = event["subject"].as_str().unwrap();
        let revision = event["data"]["revision"].as_i64().unwrap();
        let ty = event["type"].as_str().unwrap().to_owned();
        assert_eq!(event["data"]["entity"], "user");
        assert_eq!(event["data"]["source"]["table"], "public.users");
        chrono::DateTime::parse_from_rfc3339(event["time"].as_str().unwrap())
            .expect("time is RFC 3339");
        for attribute in ["entity_id", "occurred_at", "id", "type"] {
            assert!(
                event["data"].get(attribute).is_none(),
                "{attribute} is an attribute, not data: {event}"
            );
        }
        if event["source"] == "https://app.example.com/db" {
            assert!(!r.headers.contains_key("webhook-signature"), "unsigned");
            assert!(event["data"].get("data").is_none(), "thin: {event}");
        } else {
            assert_eq!(event["source"], format!("walhook://{}", db.name));
            let mut headers = reqwest::header::HeaderMap::new();
            for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
                headers.insert(name, r.headers[name].parse().unwrap());
            }
            wh.verify(&r.body, &headers)
                .expect("the v1 signature verifies over the CloudEvent");
            let row = &event["data"]["data"];
            assert_eq!(row["id"].to_string(), subject, "{event}");
            seen.push((ty, subject.to_owned(), revision));
        }
        documents.push(event.to_string());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("user.created".to_owned(), "1".to_owned(), 1),
            ("user.created".to_owned(), "2".to_owned(), 1),
            ("user.deleted".to_owned(), "2".to_owned(), 2),
            ("user.updated".to_owned(), "1".to_owned(), 2),
        ]
    );

    let schema = repo("tests/cloudevents/cloudevents.json");
    let schema = schema.to_str().unwrap();
    let verdicts = python(
        "validate_json.py",
        &[schema],
        &(documents.join("\n") + "\n"),
    );
    let verdicts: Vec<&str> = verdicts.lines().collect();
    assert_eq!(verdicts.len(), documents.len());
    assert!(
        verdicts.iter().all(|v| *v == "valid"),
        "{verdicts:#?}\n{documents:#?}"
    );
    // The schema has teeth: without specversion, with an empty source or a numeric id,
    // an event is invalid.
    let mut broken = Vec::new();
    for (key, value) in [
        ("specversion", None),
        ("source", Some(serde_json::json!(""))),
        ("id", Some(serde_json::json!(7))),
    ] {
        let mut event = got[0].json();
        match value {
            None => {
                event.as_object_mut().unwrap().remove(key);
            }
            Some(v) => event[key] = v,
        }
        broken.push(event.to_string());
    }
    let verdicts = python("validate_json.py", &[schema], &(broken.join("\n") + "\n"));
    assert_eq!(verdicts.lines().count(), 3);
    assert!(
        verdicts.lines().all(|v| v.starts_with("invalid: ")),
        "{verdicts}"
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// Bad keys stop `walhook check` and `walhook run` with exit 78, each problem naming the
/// file, line, key path and subscription, and never the key. No PostgreSQL is needed.
#[tokio::test]
async fn bad_signing_keys_are_config_errors_naming_the_subscription() {
    let (whsk, whpk) = generate_pair();
    let short = format!("whsk_{}", STANDARD.encode([7u8; 31]));
    let config = ConfigFile::new(&format!(
        "[source]\nurl = \"${{DATABASE_URL}}\"\n\n\
         [[subscriptions]]\nname = \"crm\"\nurl = \"https://crm.example.com/\"\nevents = [\"*\"]\nsignature = \"v1a\"\n\n\
         [[subscriptions]]\nname = \"audit\"\nurl = \"https://audit.example.com/\"\nevents = [\"*\"]\nsignature = \"v1a\"\nsecret = \"{short}\"\n\n\
         [[subscriptions]]\nname = \"partner\"\nurl = \"https://partner.example.com/\"\nevents = [\"*\"]\nsecret = \"{whsk}\"\n\n\
         [[subscriptions]]\nname = \"public\"\nurl = \"https://public.example.com/\"\nevents = [\"*\"]\nsignature = \"v1a\"\nsecret = \"{whpk}\"\n"
    ));
    let file = config.path.display().to_string();
    let expected = [
        format!(
            "{file}:8: subscriptions[0].signature: subscription \"crm\": signature = \"v1a\" needs a signing key"
        ),
        format!(
            "{file}:15: subscriptions[1].secret: subscription \"audit\": the key decodes to 31 bytes; expected an ed25519 secret key"
        ),
        format!(
            "{file}:21: subscriptions[2].secret: subscription \"partner\": the key is an ed25519 secret key (whsk_), which signs only with signature = \"v1a\""
        ),
        format!(
            "{file}:28: subscriptions[3].secret: subscription \"public\": the key is a public key (whpk_)"
        ),
    ];
    let outcomes = cli::assert_check_and_run_refuse(&config, "4 config errors", &expected).await;
    for (what, out) in &outcomes {
        for key in [&whsk, &short, &whpk] {
            let b64 = &key[5..];
            assert!(
                !out.stdout.contains(b64) && !out.stderr.contains(b64),
                "{what}: a key was printed:\n{}{}",
                out.stdout,
                out.stderr
            );
        }
    }
}
