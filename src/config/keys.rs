//! Standard Webhooks signing keys: `whsec_` (symmetric, `v1`), `whsk_` and `whpk_`
//! (ed25519 secret and public keys, `v1a`). The one place that knows their encoding.
//!
//! The encoding is the Standard Webhooks spec's, as its reference library (Go,
//! `webhook_asymmetric.go`) reads it: the prefix, then standard base64 (with padding)
//! of the HMAC secret (24 to 64 bytes), of the 32-byte ed25519 seed, or of the 32-byte
//! ed25519 public key.
//!
//! The same ed25519 keys sign Security Event Tokens (`format = "set"`); their public
//! halves are published as JWKs (RFC 8037) whose `kid` is the RFC 7638 thumbprint, so
//! a `kid` always matches its key and needs no configuration.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::secret::Secret;

/// Prefix of a symmetric (`v1`) key.
pub const SYMMETRIC_PREFIX: &str = "whsec_";
/// Prefix of an ed25519 secret key (`v1a`).
pub const SECRET_KEY_PREFIX: &str = "whsk_";
/// Prefix of an ed25519 public key (what receivers of `v1a` verify with).
pub const PUBLIC_KEY_PREFIX: &str = "whpk_";

/// An ed25519 secret key, expanded once at load. `Debug` shows no key material (not
/// even the public key: keys are never logged); the secret half is zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Ed25519Key(SigningKey);

impl Ed25519Key {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Ed25519Key, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        let key = Ed25519Key(SigningKey::from_bytes(&seed));
        seed.fill(0);
        Ok(key)
    }

    /// The key of a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Ed25519Key {
        Ed25519Key(SigningKey::from_bytes(seed))
    }

    /// The expanded key, for signing.
    pub fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    /// `whsk_<base64 of the seed>`. Never log or display it.
    pub fn to_whsk(&self) -> Secret<String> {
        Secret::new(format!(
            "{SECRET_KEY_PREFIX}{}",
            STANDARD.encode(self.0.to_bytes())
        ))
    }

    /// `whpk_<base64 of the public key>`: what receivers verify with. Not secret.
    pub fn public_whpk(&self) -> String {
        format!(
            "{PUBLIC_KEY_PREFIX}{}",
            STANDARD.encode(self.0.verifying_key().to_bytes())
        )
    }

    /// The public key as the JWK `x` member: base64url (no padding) of its 32 bytes.
    fn jwk_x(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.verifying_key().to_bytes())
    }

    /// The key id of tokens this key signs: the RFC 7638 JWK thumbprint of the public
    /// key (base64url, no padding, of the SHA-256 of
    /// `{"crv":"Ed25519","kty":"OKP","x":"..."}`, members in that order). Derived, so
    /// it cannot disagree with the key; stable, so a receiver's cached JWKS stays
    /// valid. Not secret.
    pub fn kid(&self) -> String {
        let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, self.jwk_x());
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// The public key as a JWK (RFC 8037): `kty` OKP, `crv` Ed25519, `x`, with `kid`
    /// ([`Ed25519Key::kid`]), `use` "sig" and `alg` "EdDSA". Not secret.
    pub fn public_jwk(&self) -> Value {
        json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.jwk_x(),
            "kid": self.kid(),
            "use": "sig",
            "alg": "EdDSA",
        })
    }
}

impl fmt::Debug for Ed25519Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ed25519Key([redacted])")
    }
}

/// How a subscription signs its requests (`signature` and `secret` together).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SigningKeys {
    /// No key: requests carry no `webhook-signature` (only with `signature = "v1"`).
    #[default]
    Unsigned,
    /// `signature = "v1"`: HMAC-SHA256 keys decoded from `whsec_`, newest first.
    /// Never empty.
    V1(Vec<Secret<Vec<u8>>>),
    /// `signature = "v1a"`: ed25519 keys from `whsk_`, newest first. Never empty.
    V1a(Vec<Ed25519Key>),
}

impl SigningKeys {
    /// How many keys sign each request.
    pub fn len(&self) -> usize {
        match self {
            SigningKeys::Unsigned => 0,
            SigningKeys::V1(keys) => keys.len(),
            SigningKeys::V1a(keys) => keys.len(),
        }
    }

    /// Whether requests go unsigned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A key as the config gives it, by its prefix; the text after the prefix is not
/// checked yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// `whsec_`.
    Symmetric,
    /// `whsk_`.
    Ed25519Secret,
    /// `whpk_`: a public key, which cannot sign.
    Ed25519Public,
    /// No known prefix.
    Unknown,
}

impl KeyKind {
    /// The kind of `raw`, by prefix.
    pub(crate) fn of(raw: &str) -> KeyKind {
        if raw.starts_with(SYMMETRIC_PREFIX) {
            KeyKind::Symmetric
        } else if raw.starts_with(SECRET_KEY_PREFIX) {
            KeyKind::Ed25519Secret
        } else if raw.starts_with(PUBLIC_KEY_PREFIX) {
            KeyKind::Ed25519Public
        } else {
            KeyKind::Unknown
        }
    }
}

/// Why a key's text is not a usable key. Never holds any of the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyProblem {
    /// Not base64 after the prefix.
    NotBase64,
    /// Decodes to this many bytes, outside what the kind allows.
    Length(usize),
}

/// The HMAC secret of `whsec_<base64>`: 24 to 64 bytes, as the spec asks.
pub(crate) fn decode_symmetric(raw: &str) -> Result<Vec<u8>, KeyProblem> {
    let b64 = raw.strip_prefix(SYMMETRIC_PREFIX).unwrap_or(raw);
    let bytes = STANDARD.decode(b64).map_err(|_| KeyProblem::NotBase64)?;
    if (24..=64).contains(&bytes.len()) {
        Ok(bytes)
    } else {
        Err(KeyProblem::Length(bytes.len()))
    }
}

/// The ed25519 key of `whsk_<base64 of the 32-byte seed>`.
pub(crate) fn decode_ed25519_secret(raw: &str) -> Result<Ed25519Key, KeyProblem> {
    let b64 = raw.strip_prefix(SECRET_KEY_PREFIX).unwrap_or(raw);
    let mut bytes = STANDARD.decode(b64).map_err(|_| KeyProblem::NotBase64)?;
    let result = match <&[u8; 32]>::try_from(bytes.as_slice()) {
        Ok(seed) => Ok(Ed25519Key::from_seed(seed)),
        Err(_) => Err(KeyProblem::Length(bytes.len())),
    };
    bytes.fill(0);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Go reference library's asymmetric test key ("TESTSIGNINGKEYDONOTUSETHISFORANY").
    const SPEC_SEED_B64: &str = "VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";
    // Its public key, computed independently (Python `cryptography`).
    const SPEC_PUBLIC: &str = "whpk_ZlN4eg7dSSqi0moX9hQUk3orrOouK3QVQSlJa248c/g=";

    #[test]
    fn whsk_round_trips_and_derives_the_public_key() {
        let key = decode_ed25519_secret(&format!("whsk_{SPEC_SEED_B64}")).unwrap();
        assert_eq!(key.public_whpk(), SPEC_PUBLIC);
        assert_eq!(
            key.to_whsk().expose().as_str(),
            format!("whsk_{SPEC_SEED_B64}")
        );
        assert_eq!(format!("{key:?}"), "Ed25519Key([redacted])");
    }

    #[test]
    fn bad_keys_are_refused_without_their_text() {
        assert_eq!(
            decode_ed25519_secret("whsk_not*base64").unwrap_err(),
            KeyProblem::NotBase64
        );
        // 31 and 64 bytes: only the 32-byte seed is a whsk_ key.
        let short = format!("whsk_{}", STANDARD.encode([7u8; 31]));
        assert_eq!(
            decode_ed25519_secret(&short).unwrap_err(),
            KeyProblem::Length(31)
        );
        let long = format!("whsk_{}", STANDARD.encode([7u8; 64]));
        assert_eq!(
            decode_ed25519_secret(&long).unwrap_err(),
            KeyProblem::Length(64)
        );
        assert_eq!(
            decode_symmetric(&format!("whsec_{}", STANDARD.encode([1u8; 23]))).unwrap_err(),
            KeyProblem::Length(23)
        );
        assert_eq!(
            decode_symmetric(&format!("whsec_{}", STANDARD.encode([1u8; 24])))
                .unwrap()
                .len(),
            24
        );
    }

    #[test]
    fn kinds_by_prefix() {
        assert_eq!(KeyKind::of("whsec_abc"), KeyKind::Symmetric);
        assert_eq!(KeyKind::of("whsk_abc"), KeyKind::Ed25519Secret);
        assert_eq!(KeyKind::of("whpk_abc"), KeyKind::Ed25519Public);
        assert_eq!(KeyKind::of("abc"), KeyKind::Unknown);
    }

    #[test]
    fn kid_is_the_rfc7638_thumbprint() {
        // RFC 8037 appendix A.1-A.3: its example key, public `x` and thumbprint.
        let seed: [u8; 32] = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap()
            .try_into()
            .unwrap();
        let key = Ed25519Key::from_seed(&seed);
        let jwk = key.public_jwk();
        assert_eq!(jwk["x"], "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
        assert_eq!(key.kid(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        assert_eq!(jwk["kid"], key.kid());
        assert_eq!(
            (&jwk["kty"], &jwk["crv"], &jwk["use"], &jwk["alg"]),
            (
                &json!("OKP"),
                &json!("Ed25519"),
                &json!("sig"),
                &json!("EdDSA")
            )
        );
        assert!(jwk.get("d").is_none(), "the JWK is the public key only");
        // Another key, another kid.
        assert_ne!(Ed25519Key::generate().unwrap().kid(), key.kid());
    }

    #[test]
    fn generated_keys_differ_and_round_trip() {
        let a = Ed25519Key::generate().unwrap();
        let b = Ed25519Key::generate().unwrap();
        assert_ne!(a.public_whpk(), b.public_whpk());
        let again = decode_ed25519_secret(a.to_whsk().expose()).unwrap();
        assert_eq!(again, a);
    }
}
