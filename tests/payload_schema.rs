//! schemas/event.schema.json describes what receivers really get: payloads delivered by
//! the real daemon to a real receiver (inserts, updates with previous/changed, a derived
//! event, deletes, many column types) validate against it, and their headers are the
//! ones docs/payload.md lists.

use std::path::Path;
use std::time::Duration;

use crate::support::daemon::Workdir;
use crate::support::pg::create_db;
use crate::support::receiver::Receiver;
use crate::support::wait_for;

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn delivered_payloads_validate_against_the_event_schema() {
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/event.schema.json"),
        )
        .expect("read schemas/event.schema.json"),
    )
    .expect("the event schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("the event schema compiles");

    let db = create_db().await;
    db.batch(
        "CREATE TABLE accounts (
             org text, id int, email text, status text, balance numeric, score float8,
             active bool, settings jsonb, avatar bytea, tags text[], seen_at timestamptz,
             ref uuid, secret text, PRIMARY KEY (org, id));
         ALTER TABLE accounts REPLICA IDENTITY FULL;",
    )
    .await;
    let receiver = Receiver::start(|_| 200).await;
    let work = Workdir::new(&format!(
        r#"
[source]
url = "postgres://postgres@127.0.0.1:{port}/{name}?sslmode=disable"
slot = "{name}"

[server]
listen = "127.0.0.1:0"

[[tables]]
table = "public.accounts"
entity = "account"
exclude_columns = ["secret"]

[[tables.rules]]
event = "account.suspended"
when = "old.status != 'suspended' && new.status == 'suspended'"

[[subscriptions]]
name = "all"
url = "{url}"
events = ["*"]
secret = "{SECRET}"
"#,
        port = db.port,
        name = db.name,
        url = receiver.url
    ));
    let mut daemon = work.spawn_run(0);
    let client = db.client().await;
    for attempt in 0.. {
        assert!(daemon.is_running(), "walhook run exited: {}", daemon.log());
        let active = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&db.name],
            )
            .await
            .unwrap();
        if active.is_some() {
            break;
        }
        assert!(
            attempt < 600,
            "walhook did not hold the slot: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client
        .batch_execute(
            "INSERT INTO accounts VALUES ('acme:eu', 1, 'a@example.com', 'active', 12.50, 'NaN',
                 true, '{\"theme\": \"dark\", \"n\": [1, 2]}', '\\x00ff', '{a,b}', now(),
                 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'hunter2');
             UPDATE accounts SET email = 'b@example.com', score = 1.5 WHERE id = 1;
             UPDATE accounts SET status = 'suspended' WHERE id = 1;
             INSERT INTO accounts (org, id, email) VALUES ('acme', 2, NULL);
             DELETE FROM accounts WHERE id = 1;",
        )
        .await
        .unwrap();
    // created, updated, updated + suspended, created, deleted
    wait_for("6 deliveries", WAIT, || async {
        receiver.received().len() >= 6
    })
    .await;
    let received = receiver.received();
    let mut types = Vec::new();
    for r in &received {
        let body = r.json();
        let errors: Vec<String> = validator
            .iter_errors(&body)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{body:#}\ndoes not match the schema: {errors:#?}"
        );
        // The headers docs/payload.md promises.
        assert_eq!(r.headers["webhook-id"], body["id"].as_str().unwrap());
        assert_eq!(r.headers["content-type"], "application/json");
        assert!(r.headers["user-agent"].starts_with("walhook/"));
        assert!(r.headers["webhook-signature"].starts_with("v1,"));
        let mut headers = reqwest::header::HeaderMap::new();
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            headers.insert(name, r.headers[name].parse().unwrap());
        }
        standardwebhooks::Webhook::new(SECRET)
            .unwrap()
            .verify(&r.body, &headers)
            .expect("the signature verifies as docs/payload.md describes");
        assert!(!String::from_utf8_lossy(&r.body).contains("hunter2"));
        types.push(body["type"].as_str().unwrap().to_owned());
    }
    types.sort();
    assert_eq!(
        types,
        [
            "account.created",
            "account.created",
            "account.deleted",
            "account.suspended",
            "account.updated",
            "account.updated"
        ]
    );
    let update = received
        .iter()
        .map(|r| r.json())
        .find(|b| b["type"] == "account.updated" && b["revision"] == 2)
        .expect("the first update");
    assert_eq!(update["entity_id"], "acme%3Aeu:1");
    assert_eq!(update["changed"], serde_json::json!(["email", "score"]));
    assert_eq!(update["previous"]["email"], "a@example.com");

    // The schema has teeth: a body missing a field or with a wrong type fails.
    let mut broken = received[0].json();
    broken.as_object_mut().unwrap().remove("revision");
    assert!(!validator.is_valid(&broken));
    let mut broken = received[0].json();
    broken["source"]["xid"] = serde_json::json!("7");
    assert!(!validator.is_valid(&broken));
    assert!(daemon.is_running(), "{}", daemon.log());
}
