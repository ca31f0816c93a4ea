//! Validation of `format = "set"` (Security Event Tokens) and its `set = { issuer,
//! audience, event_uri_prefix }` table.
//!
//! The rules: `set` only with `format = "set"`, which needs it; `issuer` and
//! `audience` are required non-empty strings; `event_uri_prefix` (default
//! `urn:walhook:event:`) has no spaces or control characters; a token is signed with
//! an ed25519 key, so `format = "set"` needs `signature = "v1a"` (its `whsk_` keys,
//! the newest first, signs); `fields` does not apply (the `events` claim holds the
//! envelope). Every message names the subscription.

use super::super::locate::join;
use super::super::raw::RawSet;
use super::super::types::{DEFAULT_EVENT_URI_PREFIX, Format, SetConfig, Signature};
use super::Validator;

impl Validator<'_> {
    /// The SET options of the subscription at `sub_key` (named `name`, when valid):
    /// `Some` exactly when `format = "set"` and everything checks.
    pub(super) fn set_options(
        &mut self,
        sub_key: &str,
        name: Option<&str>,
        format: Format,
        signature: Signature,
        raw: Option<RawSet>,
    ) -> Option<SetConfig> {
        let who = match name {
            Some(n) => format!("subscription \"{n}\": "),
            None => String::new(),
        };
        let key = join(sub_key, "set");
        if format != Format::Set {
            if raw.is_some() {
                self.err(
                    &key,
                    format!("{who}set = {{...}} is only used with format = \"set\""),
                );
            }
            return None;
        }
        let before = self.errors.len();
        if signature != Signature::V1a {
            self.err(
                &join(sub_key, "format"),
                format!(
                    "{who}format = \"set\" signs each token with an ed25519 key: add signature = \"v1a\" and secret = \"whsk_...\" (from: walhook keys generate)"
                ),
            );
        }
        let Some(raw) = raw else {
            self.err(
                &join(sub_key, "format"),
                format!(
                    "{who}format = \"set\" needs set = {{ issuer = \"https://...\", audience = \"...\" }}"
                ),
            );
            return None;
        };
        let issuer = self.claim(&key, "issuer", raw.issuer, &who, "the iss claim");
        let audience = self.claim(&key, "audience", raw.audience, &who, "the aud claim");
        let event_uri_prefix = match raw.event_uri_prefix {
            None => DEFAULT_EVENT_URI_PREFIX.to_string(),
            Some(p) if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                self.err(
                    &join(&key, "event_uri_prefix"),
                    format!(
                        "{who}event_uri_prefix must be a non-empty URI prefix without spaces, e.g. \"https://app.example.com/events/\" (default \"{DEFAULT_EVENT_URI_PREFIX}\")"
                    ),
                );
                return None;
            }
            Some(p) => p,
        };
        if self.errors.len() != before {
            return None;
        }
        Some(SetConfig {
            issuer: issuer?,
            audience: audience?,
            event_uri_prefix,
        })
    }

    /// A required, non-empty string claim of `set`.
    fn claim(
        &mut self,
        set_key: &str,
        name: &str,
        value: Option<String>,
        who: &str,
        what: &str,
    ) -> Option<String> {
        let key = join(set_key, name);
        match value {
            Some(v) if !v.trim().is_empty() => Some(v),
            Some(_) => {
                self.err(&key, format!("{who}{name} is empty; it is {what}"));
                None
            }
            None => {
                self.err(
                    &key,
                    format!("{who}missing required key: {name}, {what}, e.g. set = {{ issuer = \"https://app.example.com\", audience = \"https://receiver.example.com\" }}"),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Format, SigningKeys, load_str};

    const WHSK: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";

    fn load(keys: &str) -> Result<crate::config::Config, String> {
        let toml = format!(
            "[source]\nurl = \"postgres://x/app\"\n[[subscriptions]]\nname = \"idp\"\nurl = \"https://idp.example.com/\"\nevents = [\"*\"]\n{keys}\n"
        );
        load_str(&toml, "walhook.toml", &|_| None).map_err(|e| e.to_string())
    }

    fn set_sub(set: &str) -> String {
        format!("format = \"set\"\nsignature = \"v1a\"\nsecret = \"{WHSK}\"\nset = {set}")
    }

    #[test]
    fn set_options_with_their_default_prefix() {
        let c = load(&set_sub("{ issuer = \"https://app\", audience = \"rcv\" }")).unwrap();
        let s = &c.subscriptions[0];
        assert_eq!(s.format, Format::Set);
        let set = s.set.as_ref().unwrap();
        assert_eq!(
            (
                set.issuer.as_str(),
                set.audience.as_str(),
                set.event_uri_prefix.as_str()
            ),
            ("https://app", "rcv", "urn:walhook:event:")
        );
        assert!(matches!(&s.keys, SigningKeys::V1a(k) if k.len() == 1));
        assert!(c.inactive_keys().is_empty(), "{:?}", c.inactive_keys());
        let c = load(&set_sub(
            "{ issuer = \"i\", audience = \"a\", event_uri_prefix = \"https://app/ev/\" }",
        ))
        .unwrap();
        assert_eq!(
            c.subscriptions[0].set.as_ref().unwrap().event_uri_prefix,
            "https://app/ev/"
        );
        assert_eq!(load("").unwrap().subscriptions[0].set, None);
    }

    #[test]
    fn batch_size_is_refused_with_one_event_formats() {
        let e = load(&format!(
            "{}\nbatch_size = 10",
            set_sub("{ issuer = \"i\", audience = \"a\" }")
        ))
        .unwrap_err();
        assert!(
            e.contains("subscriptions[0].batch_size: subscription \"idp\": batch_size = 10 cannot be used with format = \"set\""),
            "{e}"
        );
        let e = load("batch_size = 0").unwrap_err();
        assert!(
            e.contains("batch_size = 0 is out of range 1..=10000"),
            "{e}"
        );
        let c = load("format = \"cloudevents\"\nbatch_size = 100").unwrap();
        assert_eq!(c.subscriptions[0].batch_size, 100);
        assert_eq!(load("").unwrap().subscriptions[0].batch_size, 1);
    }

    #[test]
    fn set_errors_name_the_subscription_and_key() {
        let e = load(&set_sub("{ audience = \"a\" }")).unwrap_err();
        assert!(
            e.contains(
                "subscriptions[0].set.issuer: subscription \"idp\": missing required key: issuer"
            ),
            "{e}"
        );
        let e = load(&set_sub("{ issuer = \"i\", audience = \" \" }")).unwrap_err();
        assert!(
            e.contains("subscriptions[0].set.audience: subscription \"idp\": audience is empty"),
            "{e}"
        );
        let e = load(&set_sub(
            "{ issuer = \"i\", audience = \"a\", event_uri_prefix = \"a b\" }",
        ))
        .unwrap_err();
        assert!(
            e.contains("set.event_uri_prefix: subscription \"idp\": event_uri_prefix must be"),
            "{e}"
        );
        let e = load("set = { issuer = \"i\", audience = \"a\" }").unwrap_err();
        assert!(
            e.contains("walhook.toml:7: subscriptions[0].set: subscription \"idp\": set = {...} is only used with format = \"set\""),
            "{e}"
        );
        let e = load("format = \"set\"\nset = { issuer = \"i\", audience = \"a\" }").unwrap_err();
        assert!(
            e.contains("subscriptions[0].format: subscription \"idp\": format = \"set\" signs each token with an ed25519 key"),
            "{e}"
        );
        let e = load(&format!(
            "format = \"set\"\nsignature = \"v1a\"\nsecret = \"{WHSK}\""
        ))
        .unwrap_err();
        assert!(e.contains("format = \"set\" needs set = {"), "{e}");
        let e = load(&format!(
            "{}\nfields = {{ id = \"entity_id\" }}",
            set_sub("{ issuer = \"i\", audience = \"a\" }")
        ))
        .unwrap_err();
        assert!(
            e.contains("fields only applies to format = \"json\""),
            "{e}"
        );
        assert!(!e.contains("VEVTVFNJ"), "a key in {e}");
    }
}
