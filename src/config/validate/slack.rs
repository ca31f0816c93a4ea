//! Validation of `format = "slack"` and its `slack = { text = "...", blocks = [...] }`
//! table.
//!
//! The rules: `slack` only with `format = "slack"`, which needs it; `text` is a
//! required, non-empty template whose every placeholder names an envelope path that
//! can exist for this subscription (the paths `fields` accepts: `data.<column>` for
//! any column, since columns are known only from the database; nothing under `data`,
//! `previous` or `changed` with `payload = "thin"`). `blocks`, when given, is a list of
//! 1 to [`MAX_BLOCKS`] such templates. `fields` does not apply (checked with `fields`).
//! Every message names the subscription and the placeholder.

use super::super::locate::{index, join};
use super::super::raw::RawSlack;
use super::super::template::TextTemplate;
use super::super::types::{Format, Payload, SlackConfig};
use super::Validator;
use super::subscriptions::envelope_path_problem;

/// Most blocks in one Slack message (Slack refuses more).
pub const MAX_BLOCKS: usize = 50;

impl Validator<'_> {
    /// The Slack options of the subscription at `sub_key` (named `name`, when valid):
    /// `Some` exactly when `format = "slack"` and the template checks.
    pub(super) fn slack_options(
        &mut self,
        sub_key: &str,
        name: Option<&str>,
        format: Format,
        payload: Payload,
        raw: Option<RawSlack>,
    ) -> Option<SlackConfig> {
        let who = match name {
            Some(n) => format!("subscription \"{n}\": "),
            None => String::new(),
        };
        let key = join(sub_key, "slack");
        if format != Format::Slack {
            if raw.is_some() {
                self.err(
                    &key,
                    format!("{who}slack = {{...}} is only used with format = \"slack\""),
                );
            }
            return None;
        }
        let Some(raw) = raw else {
            self.err(
                &join(sub_key, "format"),
                format!(
                    "{who}format = \"slack\" needs slack = {{ text = \"{{type}} {{entity_id}}\" }}, the message template"
                ),
            );
            return None;
        };
        let text_key = join(&key, "text");
        let text = self.required(
            &text_key,
            raw.text,
            ": the message template, e.g. text = \"{type} {entity_id}\"",
        );
        let text = text.and_then(|t| self.slack_template(&text_key, &who, &t, payload, "message"));
        let blocks_key = join(&key, "blocks");
        let mut blocks = Vec::new();
        let mut blocks_ok = true;
        match raw.blocks {
            None => {}
            Some(list) if list.is_empty() || list.len() > MAX_BLOCKS => {
                self.err(
                    &blocks_key,
                    format!(
                        "{who}blocks has {} section texts; give 1 to {MAX_BLOCKS} (Slack takes at most {MAX_BLOCKS} blocks), or leave blocks out",
                        list.len()
                    ),
                );
                blocks_ok = false;
            }
            Some(list) => {
                for (i, block) in list.iter().enumerate() {
                    let block_key = index(&blocks_key, i);
                    match self.slack_template(&block_key, &who, block, payload, "section") {
                        Some(t) => blocks.push(t),
                        None => blocks_ok = false,
                    }
                }
            }
        }
        let text = text?;
        blocks_ok.then_some(SlackConfig { text, blocks })
    }

    /// One template of `slack` at `key` (`what`: "message" or "section"), parsed and
    /// with every placeholder checked; `None` after reporting what is wrong.
    fn slack_template(
        &mut self,
        key: &str,
        who: &str,
        text: &str,
        payload: Payload,
        what: &str,
    ) -> Option<TextTemplate> {
        if text.trim().is_empty() {
            self.err(
                key,
                format!("{who}the {what} template is empty; Slack refuses empty texts"),
            );
            return None;
        }
        let template = match TextTemplate::parse(text) {
            Ok(t) => t,
            Err(e) => {
                let error = self.loc.error(key, format!("{who}{e}")).with_cause(e);
                self.errors.push(error);
                return None;
            }
        };
        let mut ok = true;
        for path in template.paths() {
            if let Some(problem) = envelope_path_problem(path, payload) {
                self.err(
                    key,
                    format!("{who}unknown placeholder {{{}}}: {problem}", path.join(".")),
                );
                ok = false;
            }
        }
        ok.then_some(template)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{TemplatePart, load_str};

    fn load(keys: &str) -> Result<crate::config::Config, String> {
        let toml = format!(
            "[source]\nurl = \"postgres://x/app\"\n[[subscriptions]]\nname = \"chat\"\nurl = \"https://hooks.slack.example/T/B/x\"\nevents = [\"*\"]\n{keys}\n"
        );
        load_str(&toml, "walhook.toml", &|_| None).map_err(|e| e.to_string())
    }

    #[test]
    fn a_template_of_envelope_paths_loads_and_is_active() {
        let c = load(
            "format = \"slack\"\nslack = { text = \"{type} {entity} {entity_id} is now {data.status} (revision {revision}) {{x}}\" }",
        )
        .unwrap();
        let slack = c.subscriptions[0].slack.as_ref().unwrap();
        assert_eq!(slack.text.paths().count(), 5);
        assert_eq!(
            slack.text.parts.last(),
            Some(&TemplatePart::Literal(") {x}".into()))
        );
        assert!(c.inactive_keys().is_empty(), "{:?}", c.inactive_keys());
        // Every root fields accepts, and any column.
        load("format = \"slack\"\nslack = { text = \"{id}{occurred_at}{changed}{previous.a}{source.table}{source.lsn}{source.xid}{data.any_column}\" }").unwrap();
    }

    #[test]
    fn unknown_placeholders_are_errors_naming_subscription_and_placeholder() {
        let e = load("format = \"slack\"\nslack = { text = \"{type} by {user}\" }").unwrap_err();
        assert!(
            e.contains("walhook.toml:8: subscriptions[0].slack.text: subscription \"chat\": unknown placeholder {user}: unknown envelope field \"user\""),
            "{e}"
        );
        for (bad, why) in [
            ("{revision.x}", "\"revision\" has no sub-fields"),
            ("{source.host}", "source has table, lsn and xid"),
            ("{Type}", "unknown envelope field \"Type\""),
        ] {
            let e = load(&format!(
                "format = \"slack\"\nslack = {{ text = \"{bad}\" }}"
            ))
            .unwrap_err();
            assert!(e.contains(&format!("unknown placeholder {bad}: ")), "{e}");
            assert!(e.contains(why), "{e}");
        }
        // Every unknown placeholder is reported, not only the first.
        let e = load("format = \"slack\"\nslack = { text = \"{a} {b}\" }").unwrap_err();
        assert!(e.contains("{a}") && e.contains("{b}"), "{e}");
        let e =
            load("format = \"slack\"\npayload = \"thin\"\nslack = { text = \"{data.status}\" }")
                .unwrap_err();
        assert!(
            e.contains("unknown placeholder {data.status}: \"data.status\" is never present with payload = \"thin\""),
            "{e}"
        );
    }

    #[test]
    fn blocks_are_section_templates_checked_like_text() {
        let c = load(
            "format = \"slack\"\nslack = { text = \"{type}\", blocks = [\"*{type}* {entity_id}\", \"{data.status}\"] }",
        )
        .unwrap();
        let slack = c.subscriptions[0].slack.as_ref().unwrap();
        assert_eq!(slack.blocks.len(), 2);
        assert_eq!(slack.blocks[1].paths().count(), 1);
        assert!(c.inactive_keys().is_empty(), "{:?}", c.inactive_keys());
        // The README's form: the list over several lines.
        let c = load(
            "format = \"slack\"\nslack = { text = \"{type}\", blocks = [\n  \"*{type}*\",\n  \"email: {data.email}\\nstatus\",\n] }",
        )
        .unwrap();
        assert_eq!(c.subscriptions[0].slack.as_ref().unwrap().blocks.len(), 2);
        // Without blocks: none.
        let c = load("format = \"slack\"\nslack = { text = \"{type}\" }").unwrap();
        assert!(c.subscriptions[0].slack.as_ref().unwrap().blocks.is_empty());

        // Every bad block is named by its index; text is still checked beside them.
        let e = load(
            "format = \"slack\"\nslack = { text = \"{nope}\", blocks = [\"{type}\", \"{user}\", \" \", \"{data\"] }",
        )
        .unwrap_err();
        for needle in [
            "subscriptions[0].slack.text: subscription \"chat\": unknown placeholder {nope}",
            "subscriptions[0].slack.blocks[1]: subscription \"chat\": unknown placeholder {user}: unknown envelope field \"user\"",
            "subscriptions[0].slack.blocks[2]: subscription \"chat\": the section template is empty",
            "subscriptions[0].slack.blocks[3]: subscription \"chat\": unclosed placeholder",
        ] {
            assert!(e.contains(needle), "{needle}\n{e}");
        }
        let e = load(
            "format = \"slack\"\npayload = \"thin\"\nslack = { text = \"{type}\", blocks = [\"{changed}\"] }",
        )
        .unwrap_err();
        assert!(
            e.contains("slack.blocks[0]: subscription \"chat\": unknown placeholder {changed}"),
            "{e}"
        );
        let e = load("format = \"slack\"\nslack = { text = \"{type}\", blocks = [] }").unwrap_err();
        assert!(
            e.contains("subscriptions[0].slack.blocks: subscription \"chat\": blocks has 0 section texts; give 1 to 50"),
            "{e}"
        );
        let many = vec!["\"{type}\""; 51].join(", ");
        let e = load(&format!(
            "format = \"slack\"\nslack = {{ text = \"{{type}}\", blocks = [{many}] }}"
        ))
        .unwrap_err();
        assert!(e.contains("blocks has 51 section texts"), "{e}");
    }

    #[test]
    fn malformed_and_misplaced_slack_options() {
        let e = load("format = \"slack\"\nslack = { text = \"{type\" }").unwrap_err();
        assert!(
            e.contains("subscriptions[0].slack.text: subscription \"chat\": unclosed placeholder"),
            "{e}"
        );
        let e = load("format = \"slack\"").unwrap_err();
        assert!(
            e.contains("subscriptions[0].format: subscription \"chat\": format = \"slack\" needs slack = { text"),
            "{e}"
        );
        let e = load("format = \"slack\"\nslack = {}").unwrap_err();
        assert!(
            e.contains("subscriptions[0].slack.text: missing required key"),
            "{e}"
        );
        let e = load("format = \"slack\"\nslack = { text = \" \" }").unwrap_err();
        assert!(e.contains("the message template is empty"), "{e}");
        let e = load("slack = { text = \"{type}\" }").unwrap_err();
        assert!(
            e.contains("subscriptions[0].slack: subscription \"chat\": slack = {...} is only used with format = \"slack\""),
            "{e}"
        );
        let e = load(
            "format = \"slack\"\nslack = { text = \"{type}\" }\nfields = { id = \"entity_id\" }",
        )
        .unwrap_err();
        assert!(
            e.contains("fields only applies to format = \"json\""),
            "{e}"
        );
        // Signing stays as for json (a relay in front of Slack may verify it).
        load("format = \"slack\"\nslack = { text = \"{type}\" }\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"").unwrap();
    }
}
