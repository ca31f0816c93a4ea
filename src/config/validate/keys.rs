//! Validation of a subscription's signing keys: `secret` or `secret_file`, checked
//! against its `signature` scheme. Messages never quote a key, nor decoder errors
//! (they quote characters of it).

use super::super::keys::{
    Ed25519Key, KeyKind, KeyProblem, SigningKeys, decode_ed25519_secret, decode_symmetric,
};
use super::super::locate::{index, join};
use super::super::raw::OneOrMany;
use super::super::secret::Secret;
use super::super::types::Signature;
use super::Validator;

const V1_FIX: &str = "a Standard Webhooks key \"whsec_<base64 of 24 to 64 random bytes>\", e.g. from: echo \"whsec_$(openssl rand -base64 32)\"";
const V1A_FIX: &str =
    "an ed25519 secret key \"whsk_<base64 of a 32-byte seed>\", e.g. from: walhook keys generate";

/// One key as configured: the key path to blame, the file it was read from (if any),
/// and its text.
struct GivenKey {
    key: String,
    file: Option<String>,
    text: Secret<String>,
}

impl Validator<'_> {
    /// The keys of the subscription at `sub_key` (named `name`, when it has a valid
    /// one): `secret` (a key or a list) or `secret_file` (a path or a list; each file
    /// holds one key, surrounding whitespace ignored), each of the kind `signature`
    /// names. `signature = "v1a"` needs at least one key; `v1` without keys is unsigned.
    pub(super) fn signing_keys(
        &mut self,
        sub_key: &str,
        name: Option<&str>,
        signature: Signature,
        secret: Option<OneOrMany>,
        secret_file: Option<OneOrMany>,
    ) -> Option<SigningKeys> {
        let who = match name {
            Some(n) => format!("subscription \"{n}\": "),
            None => String::new(),
        };
        let before = self.errors.len();
        let secret_key = join(sub_key, "secret");
        let file_key = join(sub_key, "secret_file");
        if secret.is_some() && secret_file.is_some() {
            self.err(
                &file_key,
                format!("{who}give the keys in secret or in secret_file, not both"),
            );
            return None;
        }
        let mut given = Vec::new();
        if let Some(list) = secret {
            for (key, text) in self.listed(&secret_key, list, &who) {
                given.push(GivenKey {
                    key,
                    file: None,
                    text: Secret::new(text),
                });
            }
        }
        if let Some(list) = secret_file {
            for (key, path) in self.listed(&file_key, list, &who) {
                match std::fs::read_to_string(&path) {
                    Ok(text) => given.push(GivenKey {
                        key,
                        text: Secret::new(text.trim().to_string()),
                        file: Some(path),
                    }),
                    Err(e) => {
                        let error = self
                            .loc
                            .error(&key, format!("{who}cannot read key file {path}: {e}"))
                            .with_cause(e);
                        self.errors.push(error);
                    }
                }
            }
        }
        if given.is_empty() && self.errors.len() == before {
            if signature == Signature::V1a {
                self.err(
                    &join(sub_key, "signature"),
                    format!(
                        "{who}signature = \"v1a\" needs a signing key: secret = \"whsk_...\" or secret_file = \"/path\", with {V1A_FIX}"
                    ),
                );
                return None;
            }
            return Some(SigningKeys::Unsigned);
        }
        let mut v1 = Vec::new();
        let mut v1a = Vec::new();
        for g in given {
            match self.one_key(&g, &who, signature) {
                Some(Parsed::V1(k)) => v1.push(k),
                Some(Parsed::V1a(k)) => v1a.push(k),
                None => {}
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(match signature {
            Signature::V1 => SigningKeys::V1(v1),
            Signature::V1a => SigningKeys::V1a(v1a),
        })
    }

    /// The entries of a string-or-list key with their key paths; an empty list is an
    /// error.
    fn listed(&mut self, key: &str, list: OneOrMany, who: &str) -> Vec<(String, String)> {
        match list {
            OneOrMany::One(one) => vec![(key.to_string(), one)],
            OneOrMany::Many(many) => {
                if many.is_empty() {
                    self.err(
                        key,
                        format!("{who}empty list: give at least one key, or remove the key"),
                    );
                }
                many.into_iter()
                    .enumerate()
                    .map(|(j, item)| (index(key, j), item))
                    .collect()
            }
        }
    }

    fn one_key(&mut self, g: &GivenKey, who: &str, signature: Signature) -> Option<Parsed> {
        let what = match &g.file {
            Some(path) => format!("{who}the key in {path}"),
            None => format!("{who}the key"),
        };
        let text = g.text.expose();
        let problem = match (signature, KeyKind::of(text)) {
            (Signature::V1, KeyKind::Symmetric) => match decode_symmetric(text) {
                Ok(bytes) => return Some(Parsed::V1(Secret::new(bytes))),
                Err(p) => describe(p, "whsec_", V1_FIX),
            },
            (Signature::V1a, KeyKind::Ed25519Secret) => match decode_ed25519_secret(text) {
                Ok(key) => return Some(Parsed::V1a(key)),
                Err(p) => describe(p, "whsk_", V1A_FIX),
            },
            (Signature::V1, KeyKind::Ed25519Secret) => "is an ed25519 secret key (whsk_), which signs only with signature = \"v1a\": add signature = \"v1a\" to this subscription, or give a whsec_ key".to_string(),
            (Signature::V1a, KeyKind::Symmetric) => format!(
                "is a symmetric key (whsec_), for signature = \"v1\"; signature = \"v1a\" needs {V1A_FIX}"
            ),
            (_, KeyKind::Ed25519Public) => "is a public key (whpk_), which verifies but cannot sign: give walhook the secret key (whsk_) and the receivers the whpk_ key".to_string(),
            (Signature::V1, KeyKind::Unknown) => {
                format!("is not of the form whsec_<base64>; expected {V1_FIX}")
            }
            (Signature::V1a, KeyKind::Unknown) => {
                format!("is not of the form whsk_<base64>; expected {V1A_FIX}")
            }
        };
        self.err(&g.key, format!("{what} {problem}"));
        None
    }
}

enum Parsed {
    V1(Secret<Vec<u8>>),
    V1a(Ed25519Key),
}

fn describe(problem: KeyProblem, prefix: &str, fix: &str) -> String {
    match problem {
        KeyProblem::NotBase64 => format!("is not base64 after {prefix}; expected {fix}"),
        KeyProblem::Length(n) => format!("decodes to {n} bytes; expected {fix}"),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{ConfigErrors, SigningKeys, load_str};

    const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const WHSK: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";
    const WHPK: &str = "whpk_ZlN4eg7dSSqi0moX9hQUk3orrOouK3QVQSlJa248c/g=";

    fn load(subscription_keys: &str) -> Result<crate::config::Config, ConfigErrors> {
        let toml = format!(
            "[source]\nurl = \"postgres://x/app\"\n[[subscriptions]]\nname = \"crm\"\nurl = \"https://crm.example.com/\"\nevents = [\"*\"]\n{subscription_keys}\n"
        );
        load_str(&toml, "walhook.toml", &|_| None)
    }

    /// The one error of `keys`, as printed; asserts that no key text leaked into it.
    fn error(keys: &str) -> String {
        let errors = load(keys).expect_err(keys);
        assert_eq!(errors.len(), 1, "{errors}");
        let text = errors.to_string();
        for leak in ["MfKQ9r8", "VEVTVFNJ", "ZlN4eg7d", "c2VjcmV0"] {
            assert!(!text.contains(leak), "key text in {text}");
        }
        text
    }

    #[test]
    fn v1a_takes_whsk_keys_and_lists_rotate() {
        let c = load(&format!("signature = \"v1a\"\nsecret = \"{WHSK}\"")).unwrap();
        match &c.subscriptions[0].keys {
            SigningKeys::V1a(keys) => {
                assert_eq!(keys.len(), 1);
                assert_eq!(keys[0].public_whpk(), WHPK);
            }
            other => panic!("{other:?}"),
        }
        let c = load(&format!(
            "signature = \"v1a\"\nsecret = [\"{WHSK}\", \"whsk_{}\"]",
            "A".repeat(43) + "="
        ))
        .unwrap();
        assert_eq!(c.subscriptions[0].keys.len(), 2);
        let c = load(&format!("secret = \"{WHSEC}\"")).unwrap();
        assert!(matches!(&c.subscriptions[0].keys, SigningKeys::V1(k) if k.len() == 1));
        let c = load("").unwrap();
        assert_eq!(c.subscriptions[0].keys, SigningKeys::Unsigned);
        assert!(!format!("{c:?}").contains("VEVTVFNJ"));
    }

    #[test]
    fn mismatched_and_missing_keys_name_the_subscription_and_key() {
        let e = error("signature = \"v1a\"");
        assert!(e.contains("walhook.toml:7: subscriptions[0].signature: subscription \"crm\": signature = \"v1a\" needs a signing key"), "{e}");
        let e = error(&format!("secret = \"{WHSK}\""));
        assert!(e.contains("walhook.toml:7: subscriptions[0].secret: subscription \"crm\": the key is an ed25519 secret key (whsk_)"), "{e}");
        assert!(e.contains("add signature = \"v1a\""), "{e}");
        let e = error(&format!(
            "signature = \"v1a\"\nsecret = [\"{WHSK}\", \"{WHSEC}\"]"
        ));
        assert!(e.contains("subscriptions[0].secret[1]: subscription \"crm\": the key is a symmetric key (whsec_)"), "{e}");
        let e = error(&format!("signature = \"v1a\"\nsecret = \"{WHPK}\""));
        assert!(e.contains("is a public key (whpk_)"), "{e}");
        let e = error("signature = \"v1a\"\nsecret = \"whsk_c2VjcmV0\"");
        assert!(e.contains("subscriptions[0].secret: subscription \"crm\": the key decodes to 6 bytes; expected an ed25519 secret key"), "{e}");
        let e = error("signature = \"v1a\"\nsecret = \"whsk_c2VjcmV0*\"");
        assert!(e.contains("is not base64 after whsk_"), "{e}");
        let e = error("signature = \"v1a\"\nsecret = \"c2VjcmV0\"");
        assert!(e.contains("is not of the form whsk_<base64>"), "{e}");
        let e = error("secret = []");
        assert!(
            e.contains("subscriptions[0].secret: subscription \"crm\": empty list"),
            "{e}"
        );
    }

    #[test]
    fn secret_file_reads_one_key_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let sk = dir.path().join("crm.whsk");
        std::fs::write(&sk, format!("{WHSK}\n")).unwrap();
        let bad = dir.path().join("bad.whsk");
        std::fs::write(&bad, "whsk_c2VjcmV0\n").unwrap();
        let (sk, bad) = (sk.display().to_string(), bad.display().to_string());

        let c = load(&format!("signature = \"v1a\"\nsecret_file = \"{sk}\"")).unwrap();
        assert!(
            matches!(&c.subscriptions[0].keys, SigningKeys::V1a(k) if k[0].public_whpk() == WHPK)
        );
        let e = error(&format!(
            "signature = \"v1a\"\nsecret_file = [\"{sk}\", \"{bad}\"]"
        ));
        assert!(
            e.contains(&format!("subscriptions[0].secret_file[1]: subscription \"crm\": the key in {bad} decodes to 6 bytes")),
            "{e}"
        );
        let e = error(&format!("secret_file = \"{sk}\""));
        assert!(
            e.contains(&format!("the key in {sk} is an ed25519 secret key")),
            "{e}"
        );
        let missing = dir.path().join("nope").display().to_string();
        let e = error(&format!("signature = \"v1a\"\nsecret_file = \"{missing}\""));
        assert!(
            e.contains(&format!(
                "subscriptions[0].secret_file: subscription \"crm\": cannot read key file {missing}"
            )),
            "{e}"
        );
        let e = error(&format!(
            "signature = \"v1a\"\nsecret = \"{WHSK}\"\nsecret_file = \"{sk}\""
        ));
        assert!(e.contains("not both"), "{e}");
    }
}
