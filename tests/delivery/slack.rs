//! `format = "slack"`: Slack incoming-webhook messages rendered from the
//! subscription's templates (text and a section block), for each event type, with row values escaped for mrkdwn;
//! and the config errors of bad templates.

use super::{SECRET, WAIT, subscription};
use crate::support::cli::{self, ConfigFile};
use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::Receiver;
use crate::support::wait_for;

/// Created, updated and deleted each give one `{"text": ..., "blocks": [...]}` message
/// from the templates: placeholders filled, row values with `<`, `>` and `&` escaped (no
/// mention, link or `<!here>` can come from a row), the template's own text (its
/// `<!here>`, its `{{`) as written, a value the event lacks (a delete's non-key
/// column) as nothing. Signed as JSON bodies are.
#[tokio::test]
async fn slack_messages_for_each_event_type_escape_row_values() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    let template = "{type} {entity} {entity_id} is now {data.email} (revision {revision}, n={data.n}) {{x}} <!here>";
    let rest = format!(
        "{}format = \"slack\"\nsecret = \"{SECRET}\"\nslack = {{ text = \"{template}\", blocks = [\"*{{type}}* {{data.email}}\"] }}\n",
        subscription("chat", &receiver.url, "[\"user.*\"]"),
    );
    let work = Workdir::new(&users_config(&db, &rest));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    db.batch("INSERT INTO users VALUES (1, '<@U123> & <https://evil.example|x> > me', 0)")
        .await;
    db.batch("UPDATE users SET n = 1 WHERE id = 1").await;
    db.batch("DELETE FROM users WHERE id = 1").await;
    wait_for("3 deliveries", WAIT, || async {
        receiver.received().len() >= 3
    })
    .await;
    let got = receiver.received();
    let escaped = "&lt;@U123&gt; &amp; &lt;https://evil.example|x&gt; &gt; me";
    let texts: Vec<serde_json::Value> = got.iter().map(|r| r.json()).collect();
    let section = |text: String| serde_json::json!([{"type": "section", "text": {"type": "mrkdwn", "text": text}}]);
    assert_eq!(
        texts,
        [
            serde_json::json!({
                "text": format!("user.created user 1 is now {escaped} (revision 1, n=0) {{x}} <!here>"),
                "blocks": section(format!("*user.created* {escaped}")),
            }),
            serde_json::json!({
                "text": format!("user.updated user 1 is now {escaped} (revision 2, n=1) {{x}} <!here>"),
                "blocks": section(format!("*user.updated* {escaped}")),
            }),
            serde_json::json!({
                "text": "user.deleted user 1 is now  (revision 3, n=) {x} <!here>",
                "blocks": section("*user.deleted* ".into()),
            }),
        ],
        "one message per event, in revision order"
    );
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    for r in &got {
        assert_eq!(r.headers["content-type"], "application/json");
        let mut headers = reqwest::header::HeaderMap::new();
        for k in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            headers.insert(k, r.headers[k].parse().unwrap());
        }
        wh.verify(&r.body, &headers).expect("signed as a JSON body");
    }
    assert!(
        !daemon.log().contains("U123"),
        "a row value reached the log"
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

/// Template errors stop `walhook check` and `walhook run` with exit 78, naming the
/// file, line, key path, subscription and placeholder. No PostgreSQL is needed.
#[tokio::test]
async fn slack_template_errors_name_the_subscription_and_placeholder() {
    let config = ConfigFile::new(
        "[source]\nurl = \"${DATABASE_URL}\"\n\n\
         [[subscriptions]]\nname = \"chat\"\nurl = \"https://hooks.example.com/a\"\nevents = [\"*\"]\nformat = \"slack\"\nslack = { text = \"{type} by {user.name}\", blocks = [\"{type}\", \"{data\"] }\n\n\
         [[subscriptions]]\nname = \"braces\"\nurl = \"https://hooks.example.com/b\"\nevents = [\"*\"]\nformat = \"slack\"\nslack = { text = \"{type\" }\n\n\
         [[subscriptions]]\nname = \"nothing\"\nurl = \"https://hooks.example.com/c\"\nevents = [\"*\"]\nformat = \"slack\"\n",
    );
    let file = config.path.display().to_string();
    let expected = [
        format!(
            "{file}:9: subscriptions[0].slack.text: subscription \"chat\": unknown placeholder {{user.name}}: unknown envelope field \"user.name\""
        ),
        format!(
            "{file}:9: subscriptions[0].slack.blocks[1]: subscription \"chat\": unclosed placeholder: the {{ at character 1 has no }}"
        ),
        format!(
            "{file}:16: subscriptions[1].slack.text: subscription \"braces\": unclosed placeholder: the {{ at character 1 has no }}"
        ),
        format!(
            "{file}:22: subscriptions[2].format: subscription \"nothing\": format = \"slack\" needs slack = {{ text"
        ),
    ];
    cli::assert_check_and_run_refuse(&config, "4 config errors", &expected).await;
}
