//! Slack incoming-webhook messages for `format = "slack"`: `{"text": "..."}`, the
//! subscription's template with each `{path}` replaced by the envelope's value there.
//!
//! Values are escaped for Slack's mrkdwn as Slack documents it (`&` -> `&amp;`, `<` ->
//! `&lt;`, `>` -> `&gt;`), so a row value cannot open a link, a mention (`<@U123>`,
//! `<!channel>`) or a date token; the template's own text is sent as written, so it
//! may use them. Formatting characters in values (`*`, `_`, `~`, backticks) are left
//! as they are: they can style the text but not address anyone.
//!
//! How a value reads: a string as is; a number or bool as in JSON; a list as its items
//! joined by `", "` (`{changed}` gives `email, status`); an object as compact JSON; a
//! value the envelope lacks (an unknown column, a delete's non-key column, no
//! `previous`) or SQL NULL as nothing at all.

use serde_json::Value;

use crate::config::{SlackConfig, TemplatePart};
use crate::routing::Envelope;

/// The JSON body of the Slack message of `envelope`. Deterministic, so every retry
/// sends the same bytes.
pub fn message(envelope: &Envelope, slack: &SlackConfig) -> Result<Vec<u8>, serde_json::Error> {
    let full = serde_json::to_value(envelope)?;
    let text = text(&full, slack);
    serde_json::to_vec(&serde_json::json!({ "text": text }))
}

/// The message text: `slack.text` filled in from `full`, the envelope as JSON.
pub fn text(full: &Value, slack: &SlackConfig) -> String {
    let mut out = String::with_capacity(slack.text.source.len() + 64);
    for part in &slack.text.parts {
        match part {
            TemplatePart::Literal(text) => out.push_str(text),
            TemplatePart::Path(path) => {
                if let Some(value) = super::body::lookup(full, path) {
                    write_value(&mut out, value, true);
                }
            }
        }
    }
    out
}

/// Appends `value` as text, escaped; `top` is false inside a list.
fn write_value(out: &mut String, value: &Value, top: bool) {
    match value {
        Value::Null => {}
        Value::String(s) => escape_into(out, s),
        Value::Array(items) if top => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item, false);
            }
        }
        Value::Bool(_) | Value::Number(_) | Value::Array(_) | Value::Object(_) => {
            escape_into(out, &value.to_string());
        }
    }
}

/// Appends `s` with Slack's three control characters escaped.
fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TextTemplate;
    use crate::routing::envelope::tests::example;
    use serde_json::json;

    fn slack(template: &str) -> SlackConfig {
        SlackConfig {
            text: TextTemplate::parse(template).unwrap(),
        }
    }

    fn render(template: &str, full: &Value) -> String {
        text(full, &slack(template))
    }

    #[test]
    fn the_issue_template_on_the_example() {
        let body = message(
            &example(),
            &slack("{type} {entity} {entity_id} is now {data.status} (revision {revision})"),
        )
        .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"text":"user.updated user 42 is now active (revision 7)"}"#
        );
    }

    #[test]
    fn values_are_escaped_and_the_template_is_not() {
        let mut full = serde_json::to_value(example()).unwrap();
        full["data"]["name"] = json!("<@U123> & <!channel> > <https://evil|click>");
        assert_eq!(
            render("<!here> {data.name} & co", &full),
            "<!here> &lt;@U123&gt; &amp; &lt;!channel&gt; &gt; &lt;https://evil|click&gt; & co"
        );
        // Already-escaped text is escaped again: the reader sees what the row holds.
        full["data"]["name"] = json!("&amp;");
        assert_eq!(render("{data.name}", &full), "&amp;amp;");
    }

    #[test]
    fn how_each_kind_of_value_reads() {
        let full = json!({
            "revision": 7, "data": {"ok": true, "n": 1.5, "nul": null,
            "tags": ["a<b", 2, null, {"k": "v"}], "doc": {"x": "<y>"}},
            "changed": ["email", "status"]
        });
        assert_eq!(render("{revision}|{data.ok}|{data.n}", &full), "7|true|1.5");
        assert_eq!(
            render("[{data.nul}][{data.missing}][{previous.x}]", &full),
            "[][][]"
        );
        assert_eq!(render("{changed}", &full), "email, status");
        assert_eq!(render("{data.tags}", &full), r#"a&lt;b, 2, , {"k":"v"}"#);
        assert_eq!(render("{data.doc}", &full), r#"{"x":"&lt;y&gt;"}"#);
        assert_eq!(render("{data.tags.0}", &full), "a&lt;b");
    }

    #[test]
    fn same_bytes_every_time() {
        let s = slack("{type} {entity_id} {occurred_at} {source.lsn}");
        assert_eq!(
            message(&example(), &s).unwrap(),
            message(&example(), &s).unwrap()
        );
        assert_eq!(
            text(&serde_json::to_value(example()).unwrap(), &s),
            "user.updated 42 2026-11-25T19:15:30.123456Z 0/16B3748"
        );
    }
}
