//! `format = "set"`: Security Event Tokens verified by an independent JOSE library
//! (Python's PyJWT, tests/python/set_verify.py) against the keys it fetches over HTTP
//! from walhook's `/.well-known/jwks.json`; a key rotation by reload (old tokens keep
//! verifying while the old key is configured, new tokens carry the new kid); a retry
//! resending the first attempt's token byte for byte; and the config errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use super::formats::{generate_pair, python};
use super::{WAIT, subscription};
use crate::support::cli::{self, ConfigFile};
use crate::support::daemon::{Daemon, Workdir, server_url, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::{Received, Receiver};
use crate::support::{wait_for, wait_for_some};

const ISSUER: &str = "https://app.example.com";
const AUDIENCE: &str = "https://idp.example.com/receiver";
const THIN_PREFIX: &str = "https://app.example.com/events/";

/// Two SET subscriptions to `url` signing with `keys` (newest first): `idp` (full
/// envelope, default event URI prefix) and `idp_thin` (thin envelope, own prefix).
fn set_subscriptions(url: &str, keys: &[&str]) -> String {
    let secret = keys
        .iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{}format = \"set\"\nsignature = \"v1a\"\nsecret = [{secret}]\nset = {{ issuer = \"{ISSUER}\", audience = \"{AUDIENCE}\" }}\n\
         {}format = \"set\"\npayload = \"thin\"\nsignature = \"v1a\"\nsecret = [{secret}]\nset = {{ issuer = \"{ISSUER}\", audience = \"{AUDIENCE}\", event_uri_prefix = \"{THIN_PREFIX}\" }}\n",
        subscription("idp", url, "[\"user.*\"]"),
        subscription("idp_thin", url, "[\"user.*\"]"),
    )
}

/// The token a delivery carries (its whole body), checking the content type.
fn token_of(r: &Received) -> String {
    assert_eq!(r.headers["content-type"], "application/secevent+jwt");
    String::from_utf8(r.body.clone()).expect("a token is ASCII")
}

/// A token's claims, decoded without verifying (to pick deliveries out).
fn claims_unverified(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("three parts");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
}

/// What `set_verify.py` says of each token, with the keys it fetches from
/// `jwks_url`: the verified `{kid, typ, alg, claims}`, or why not.
fn verify(jwks_url: &str, audience: &str, tokens: &[String]) -> Vec<Result<Value, String>> {
    let out = python(
        "set_verify.py",
        &[jwks_url, ISSUER, audience],
        &(tokens.join("\n") + "\n"),
    );
    let verdicts: Vec<_> = out
        .lines()
        .map(|l| match l.strip_prefix("bad: ") {
            Some(why) => Err(why.to_owned()),
            None => Ok(serde_json::from_str(l).expect("a JSON verdict")),
        })
        .collect();
    assert_eq!(verdicts.len(), tokens.len(), "{out}");
    verdicts
}

/// GET the JWKS: its kids, in order, after checking each key is a public Ed25519 JWK.
async fn jwks_kids(jwks_url: &str) -> Vec<String> {
    let resp = reqwest::get(jwks_url)
        .await
        .unwrap_or_else(|e| panic!("GET {jwks_url}: {e}"));
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let body: Value = serde_json::from_str(&resp.text().await.unwrap()).expect("JWKS JSON");
    body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            for (member, value) in [
                ("kty", "OKP"),
                ("crv", "Ed25519"),
                ("use", "sig"),
                ("alg", "EdDSA"),
            ] {
                assert_eq!(k[member], value, "{k}");
            }
            assert!(k.get("d").is_none(), "a private key in the JWKS: {k}");
            k["kid"].as_str().expect("kid").to_owned()
        })
        .collect()
}

/// Waits until the JWKS lists exactly `n` keys; returns their kids.
async fn wait_jwks(jwks_url: &str, n: usize) -> Vec<String> {
    wait_for_some(&format!("the JWKS to list {n} keys"), WAIT, || async {
        let kids = jwks_kids(jwks_url).await;
        (kids.len() == n).then_some(kids)
    })
    .await
}

/// Sends SIGHUP and waits until the daemon logged "config reloaded" once more.
async fn reload(daemon: &mut Daemon) {
    let before = daemon.log().matches("config reloaded").count();
    daemon.signal(libc::SIGHUP);
    wait_for("the log line `config reloaded` after SIGHUP", WAIT, || {
        assert!(daemon.is_running(), "walhook exited: {}", daemon.log());
        let n = daemon.log().matches("config reloaded").count();
        async move { n > before }
    })
    .await;
}

#[tokio::test]
async fn set_tokens_verify_with_pyjwt_against_the_jwks_and_keys_rotate() {
    let (old_sk, _) = generate_pair();
    let (new_sk, _) = generate_pair();
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let work = Workdir::new(&users_config(
        &db,
        &set_subscriptions(&receiver.url, &[&old_sk]),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let jwks_url = format!("{}/.well-known/jwks.json", server_url(&mut daemon).await);
    let old_kids = jwks_kids(&jwks_url).await;
    assert_eq!(
        old_kids.len(),
        1,
        "one key, listed once for both subscriptions"
    );
    let old_kid = old_kids[0].clone();

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
    let tokens: Vec<String> = got.iter().map(token_of).collect();
    let mut seen = Vec::new();
    for (r, verdict) in got.iter().zip(verify(&jwks_url, AUDIENCE, &tokens)) {
        let v = verdict.unwrap_or_else(|why| panic!("a token does not verify: {why}"));
        assert_eq!(
            (&v["typ"], &v["alg"], &v["kid"]),
            (
                &Value::from("secevent+jwt"),
                &Value::from("EdDSA"),
                &Value::from(old_kid.as_str())
            )
        );
        let claims = &v["claims"];
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(claims["aud"], AUDIENCE);
        assert_eq!(claims["jti"], r.headers["webhook-id"].as_str());
        let events = claims["events"].as_object().expect("events claim");
        assert_eq!(events.len(), 1, "{claims}");
        let (uri, event) = events.iter().next().unwrap();
        // The envelope inside is the event the token is about.
        assert_eq!(event["id"], claims["jti"]);
        let ty = event["type"].as_str().unwrap();
        let thin = uri.starts_with(THIN_PREFIX);
        let prefix = if thin {
            THIN_PREFIX
        } else {
            "urn:walhook:event:"
        };
        assert_eq!(uri, &format!("{prefix}{ty}"));
        assert_eq!(event["entity"], "user");
        assert_eq!(event["source"]["table"], "public.users");
        let entity_id = event["entity_id"].as_str().unwrap().to_owned();
        if thin {
            assert!(event.get("data").is_none(), "thin: {event}");
        } else {
            assert_eq!(event["data"]["id"].to_string(), entity_id, "{event}");
        }
        // iat is the event's time, not the attempt's.
        let occurred = chrono::DateTime::parse_from_rfc3339(event["occurred_at"].as_str().unwrap())
            .expect("occurred_at is RFC 3339");
        assert_eq!(claims["iat"], occurred.timestamp(), "{claims}");
        // Standard Webhooks headers still come with every token, signed over it.
        assert!(r.headers["webhook-signature"].starts_with("v1a,"));
        assert!(r.headers.contains_key("webhook-timestamp"));
        seen.push((
            thin,
            ty.to_owned(),
            entity_id,
            event["revision"].as_i64().unwrap(),
        ));
    }
    seen.sort();
    let mut expected = Vec::new();
    for thin in [false, true] {
        for (ty, id, rev) in [
            ("user.created", "1", 1),
            ("user.created", "2", 1),
            ("user.deleted", "2", 2),
            ("user.updated", "1", 2),
        ] {
            expected.push((thin, ty.to_owned(), id.to_owned(), rev));
        }
    }
    assert_eq!(seen, expected);

    // The check has teeth: another audience, or claims that were not signed, fail.
    let other = verify(&jwks_url, "https://someone-else.example.com", &tokens[..1]);
    assert!(
        other[0].as_ref().is_err_and(|e| e.contains("Audience")),
        "{other:?}"
    );
    let parts: Vec<&str> = tokens[0].split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&{
                let mut c = claims_unverified(&tokens[0]);
                c["jti"] = "evt_forged".into();
                c
            })
            .unwrap()
        ),
        parts[2]
    );
    let forged = verify(&jwks_url, AUDIENCE, &[forged]);
    assert!(
        forged[0].as_ref().is_err_and(|e| e.contains("Signature")),
        "{forged:?}"
    );

    // Rotation: a reload puts a new key in front. The JWKS serves both; tokens signed
    // before verify still, new ones carry the new kid.
    work.rewrite(&users_config(
        &db,
        &set_subscriptions(&receiver.url, &[&new_sk, &old_sk]),
    ));
    reload(&mut daemon).await;
    let kids = wait_jwks(&jwks_url, 2).await;
    assert_eq!(kids[1], old_kid, "newest first: {kids:?}");
    let new_kid = kids[0].clone();
    assert_ne!(new_kid, old_kid);
    db.batch("INSERT INTO users VALUES (3, 'c@x', 0)").await;
    let is_user_3 = |t: &String| {
        let claims = claims_unverified(t);
        claims["events"]
            .as_object()
            .unwrap()
            .values()
            .any(|e| e["entity_id"] == "3")
    };
    let newer = wait_for_some("2 deliveries of user 3", WAIT, || async {
        let newer: Vec<String> = receiver
            .received()
            .iter()
            .map(token_of)
            .filter(|t| is_user_3(t))
            .collect();
        (newer.len() >= 2).then_some(newer)
    })
    .await;
    assert_eq!(newer.len(), 2, "user 3 once per subscription");
    let all: Vec<String> = tokens.iter().chain(&newer).cloned().collect();
    let verdicts = verify(&jwks_url, AUDIENCE, &all);
    for (i, verdict) in verdicts.iter().enumerate() {
        let v = verdict
            .as_ref()
            .unwrap_or_else(|why| panic!("token {i} does not verify after the rotation: {why}"));
        let kid = if i < tokens.len() { &old_kid } else { &new_kid };
        assert_eq!(v["kid"], kid.as_str(), "token {i}");
    }

    // A reload that drops the old key takes it out of the JWKS: what it signed no
    // longer verifies (receivers trust the JWKS, nothing else), the new tokens do.
    work.rewrite(&users_config(
        &db,
        &set_subscriptions(&receiver.url, &[&new_sk]),
    ));
    reload(&mut daemon).await;
    assert_eq!(wait_jwks(&jwks_url, 1).await, [new_kid]);
    let verdicts = verify(&jwks_url, AUDIENCE, &all);
    for (i, verdict) in verdicts.iter().enumerate() {
        assert_eq!(verdict.is_ok(), i >= tokens.len(), "token {i}: {verdict:?}");
    }

    let log = daemon.log();
    for key in [&old_sk, &new_sk] {
        assert!(
            !log.contains(key.trim_start_matches("whsk_")),
            "a secret key reached the log"
        );
    }
    assert!(!log.contains(&tokens[0]), "a token reached the log");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// The first attempt is answered 503, the retry (from the store, more than a second
/// later) 200: both carry the same token, byte for byte, although their
/// `webhook-timestamp`s differ.
#[tokio::test]
async fn a_retry_resends_a_byte_identical_token() {
    let (sk, _) = generate_pair();
    let db = users_db().await;
    let first = Arc::new(AtomicBool::new(true));
    let answer = first.clone();
    let receiver = Receiver::start(move |_| {
        if answer.swap(false, Ordering::SeqCst) {
            503
        } else {
            200
        }
    })
    .await;
    let rest = format!(
        "{}format = \"set\"\nsignature = \"v1a\"\nsecret = \"{sk}\"\nset = {{ issuer = \"{ISSUER}\", audience = \"{AUDIENCE}\" }}\n[subscriptions.retry]\nbackoff = [\"1500ms\"]\n",
        subscription("idp", &receiver.url, "[\"user.*\"]")
    );
    let work = Workdir::new(&users_config(&db, &rest));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    let jwks_url = format!("{}/.well-known/jwks.json", server_url(&mut daemon).await);
    db.batch("INSERT INTO users VALUES (1, 'a@x', 7)").await;
    wait_for("the retry delivered", WAIT, || async {
        receiver.received().iter().any(|r| r.status == 200)
    })
    .await;
    let got = receiver.received();
    assert_eq!(got.len(), 2, "one failed attempt, one retry");
    assert_eq!(got[0].status, 503);
    assert_eq!(got[1].status, 200);
    assert_eq!(
        token_of(&got[1]),
        token_of(&got[0]),
        "the retry's token differs from the first attempt's"
    );
    assert_eq!(got[1].headers["webhook-id"], got[0].headers["webhook-id"]);
    assert_ne!(
        got[1].headers["webhook-timestamp"], got[0].headers["webhook-timestamp"],
        "attempts a second apart"
    );
    let verdict = verify(&jwks_url, AUDIENCE, &[token_of(&got[1])]);
    let v = verdict[0].as_ref().expect("the retried token verifies");
    assert_eq!(v["claims"]["jti"], got[1].headers["webhook-id"].as_str());
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// SET config errors stop `walhook check` and `walhook run` with exit 78, each naming
/// the file, line, key path and subscription. No PostgreSQL is needed.
#[tokio::test]
async fn set_config_errors_name_the_subscription() {
    let (whsk, _) = generate_pair();
    let config = ConfigFile::new(&format!(
        "[source]\nurl = \"${{DATABASE_URL}}\"\n\n\
         [[subscriptions]]\nname = \"no_issuer\"\nurl = \"https://a.example.com/\"\nevents = [\"*\"]\nformat = \"set\"\nsignature = \"v1a\"\nsecret = \"{whsk}\"\nset = {{ audience = \"https://rcv.example.com\" }}\n\n\
         [[subscriptions]]\nname = \"json_set\"\nurl = \"https://b.example.com/\"\nevents = [\"*\"]\nset = {{ issuer = \"i\", audience = \"a\" }}\n\n\
         [[subscriptions]]\nname = \"keyless\"\nurl = \"https://c.example.com/\"\nevents = [\"*\"]\nformat = \"set\"\nset = {{ issuer = \"i\", audience = \"a\" }}\n"
    ));
    let file = config.path.display().to_string();
    let expected = [
        format!(
            "{file}:11: subscriptions[0].set.issuer: subscription \"no_issuer\": missing required key: issuer"
        ),
        format!(
            "{file}:17: subscriptions[1].set: subscription \"json_set\": set = {{...}} is only used with format = \"set\""
        ),
        format!(
            "{file}:23: subscriptions[2].format: subscription \"keyless\": format = \"set\" signs each token with an ed25519 key"
        ),
    ];
    let outcomes = cli::assert_check_and_run_refuse(&config, "3 config errors", &expected).await;
    for (what, out) in &outcomes {
        let b64 = &whsk[5..];
        assert!(
            !out.stdout.contains(b64) && !out.stderr.contains(b64),
            "{what}: a key was printed"
        );
    }
}
