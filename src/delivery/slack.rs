//! Slack incoming-webhook messages for `format = "slack"`: `{"text": "..."}`, the
//! subscription's template with each `{path}` replaced by the envelope's value there,
//! and with `slack.blocks` also `"blocks"`: one mrkdwn section block per template,
//! rendered the same way (Slack then shows the blocks, and `text` in notifications).
//! A section whose text comes out empty is left out (Slack refuses empty sections),
//! and `blocks` with it when none is left; a longer section text than Slack takes
//! ([`MAX_SECTION_CHARS`]) is cut, ending in `…`.
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

use serde_json::{Value, json};

use crate::config::{SlackConfig, TemplatePart, TextTemplate};
use crate::routing::Envelope;

/// Most characters of a section block's text (Slack refuses the message beyond).
pub const MAX_SECTION_CHARS: usize = 3000;

/// The JSON body of the Slack message of `envelope`. Deterministic, so every retry
/// sends the same bytes.
pub fn message(envelope: &Envelope, slack: &SlackConfig) -> Result<Vec<u8>, serde_json::Error> {
    let full = serde_json::to_value(envelope)?;
    let text = text(&full, slack);
    if slack.blocks.is_empty() {
        return serde_json::to_vec(&json!({ "text": text }));
    }
    let blocks: Vec<Value> = slack
        .blocks
        .iter()
        .map(|b| cut(render(&full, b), MAX_SECTION_CHARS))
        .filter(|t| !t.trim().is_empty())
        .map(|t| json!({"type": "section", "text": {"type": "mrkdwn", "text": t}}))
        .collect();
    if blocks.is_empty() {
        return serde_json::to_vec(&json!({ "text": text }));
    }
    serde_json::to_vec(&json!({ "text": text, "blocks": blocks }))
}

/// The message text: `slack.text` filled in from `full`, the envelope as JSON.
pub fn text(full: &Value, slack: &SlackConfig) -> String {
    render(full, &slack.text)
}

/// `template` filled in from `full`, values escaped.
fn render(full: &Value, template: &TextTemplate) -> String {
    let mut out = String::with_capacity(template.source.len() + 64);
    for part in &template.parts {
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

/// `text` cut to at most `max` characters, the last one `…`; never inside an
/// escape (`&amp;`, `&lt;`, `&gt;`), so no half entity is left.
fn cut(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    let end = text
        .char_indices()
        .nth(max - 1)
        .map_or(text.len(), |(i, _)| i);
    let mut kept = &text[..end];
    // A cut escape has at most 4 of its characters (`&amp`), all ASCII.
    let tail = kept.len().saturating_sub(4);
    if let Some(amp) = kept.as_bytes()[tail..].iter().rposition(|&b| b == b'&')
        && !kept[tail + amp..].contains(';')
    {
        kept = &kept[..tail + amp];
    }
    format!("{kept}…")
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
            blocks: Vec::new(),
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

    fn with_blocks(text: &str, blocks: &[&str]) -> SlackConfig {
        SlackConfig {
            blocks: blocks
                .iter()
                .map(|b| TextTemplate::parse(b).unwrap())
                .collect(),
            ..slack(text)
        }
    }

    fn body(envelope: &Envelope, slack: &SlackConfig) -> Value {
        serde_json::from_slice(&message(envelope, slack).unwrap()).unwrap()
    }

    #[test]
    fn blocks_are_mrkdwn_sections_rendered_and_escaped_like_text() {
        let mut e = example();
        e.data.insert("status".into(), json!("<!channel> & co"));
        let s = with_blocks(
            "{type} {entity_id}",
            &[
                "*{type}* <!here>",
                "status: {data.status}",
                "{data.nothing}",
            ],
        );
        assert_eq!(
            body(&e, &s),
            json!({
                "text": "user.updated 42",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": "*user.updated* <!here>"}},
                    {"type": "section", "text": {"type": "mrkdwn", "text": "status: &lt;!channel&gt; &amp; co"}},
                ]
            }),
            "the empty third section is left out"
        );
        // No section left: no blocks key.
        let s = with_blocks("{type}", &["{data.nothing}", " {previous.x} "]);
        assert_eq!(body(&e, &s), json!({"text": "user.updated"}));
    }

    #[test]
    fn a_long_section_is_cut_at_slacks_limit_never_inside_an_escape() {
        let mut e = example();
        let s = with_blocks("{type}", &["{data.status}"]);
        let section = |e: &Envelope| -> String {
            body(e, &s)["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        e.data.insert("status".into(), json!("é".repeat(3000)));
        assert_eq!(section(&e), "é".repeat(3000), "at the limit: whole");
        e.data.insert("status".into(), json!("é".repeat(3001)));
        let cut = section(&e);
        assert_eq!(cut.chars().count(), MAX_SECTION_CHARS);
        assert!(cut.ends_with("é…"), "{cut}");
        // `&` becomes `&amp;`: a cut inside it drops the partial escape.
        for pad in 2990..2999 {
            let value = format!("{}{}", "x".repeat(pad), "&".repeat(10));
            e.data.insert("status".into(), json!(value));
            let cut = section(&e);
            assert!(cut.chars().count() <= MAX_SECTION_CHARS, "{pad}");
            let body = cut.strip_suffix('…').unwrap();
            assert!(
                body.trim_start_matches('x')
                    .split("&amp;")
                    .all(str::is_empty),
                "{pad}: {}",
                &body[pad.min(body.len())..]
            );
        }
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
