//! Security Event Tokens (RFC 8417) for `format = "set"`, and the JWKS (RFC 7517)
//! receivers verify them with.
//!
//! A token is a JWS in compact serialization (RFC 7515), signed with EdDSA (RFC 8037)
//! by the subscription's newest `whsk_` key: header `{"alg":"EdDSA",
//! "typ":"secevent+jwt","kid":...}` (the kid is the key's RFC 7638 thumbprint), claims
//! `iss`, `aud`, `iat`, `jti` (the event id, also the `webhook-id`) and `events`, one
//! member: `"<event_uri_prefix><event type>"` -> the envelope (thin or full, as
//! `payload` says).
//!
//! Same bytes on every retry: instead of storing each token when first signed, walhook
//! makes the token a pure function of the stored event and the subscription's `set`
//! options and newest key. `iat` is the event's `occurred_at` (the source commit time,
//! whole seconds), never the attempt time, and ed25519 signatures are deterministic
//! (RFC 8032), so re-signing a retry gives the first attempt's bytes. That costs no
//! store write per event; only a reload that changes the subscription's `set`,
//! `payload` or newest key changes the tokens of its deliveries still pending.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer as _;
use serde_json::{Map, Value, json};

use super::body::THIN_OMITS;
use crate::config::{Config, Ed25519Key, Payload, SetConfig, SigningKeys};
use crate::routing::Envelope;

/// The `content-type` of a SET body (RFC 8417 section 2.3).
pub const CONTENT_TYPE: &str = "application/secevent+jwt";

/// The JOSE `typ` of a SET.
pub const TYP: &str = "secevent+jwt";

/// The signed token of `envelope` for a subscription with `set` options, as a
/// compact JWS signed with `key` (the subscription's newest key). Deterministic: the
/// same arguments always give the same token.
pub fn token(
    envelope: &Envelope,
    payload: Payload,
    set: &SetConfig,
    key: &Ed25519Key,
) -> Result<String, serde_json::Error> {
    let mut event = serde_json::to_value(envelope)?;
    if payload == Payload::Thin
        && let Value::Object(m) = &mut event
    {
        m.retain(|k, _| !THIN_OMITS.contains(&k.as_str()));
    }
    let mut events = Map::with_capacity(1);
    events.insert(
        format!("{}{}", set.event_uri_prefix, envelope.event_type),
        event,
    );
    let header = json!({"alg": "EdDSA", "typ": TYP, "kid": key.kid()});
    let claims = json!({
        "iss": set.issuer,
        "aud": set.audience,
        "iat": envelope.occurred_at.timestamp(),
        "jti": envelope.id,
        "events": events,
    });
    Ok(compact_jws(
        &serde_json::to_vec(&header)?,
        &serde_json::to_vec(&claims)?,
        key,
    ))
}

/// `base64url(header) "." base64url(payload) "." base64url(signature)`, the EdDSA
/// signature over the first two parts (RFC 7515 section 7.1, RFC 8037 section 3.1).
pub fn compact_jws(header: &[u8], payload: &[u8], key: &Ed25519Key) -> String {
    let mut out = String::with_capacity((header.len() + payload.len() + 64) * 4 / 3 + 8);
    URL_SAFE_NO_PAD.encode_string(header, &mut out);
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(payload, &mut out);
    let signature = key.signing_key().sign(out.as_bytes());
    out.push('.');
    URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut out);
    out
}

/// The JWK Set served at `/.well-known/jwks.json`: `{"keys": [...]}`, the public key
/// of every key of every `format = "set"` subscription, each once (by `kid`), in
/// config order (newest first within a subscription). Old keys stay listed while they
/// are configured, so tokens they signed keep verifying during a rotation.
pub fn jwks(config: &Config) -> Value {
    let mut seen = HashSet::new();
    let mut keys = Vec::new();
    for sub in config.subscriptions.iter().filter(|s| s.set.is_some()) {
        if let SigningKeys::V1a(list) = &sub.keys {
            for key in list {
                let jwk = key.public_jwk();
                if seen.insert(jwk["kid"].as_str().unwrap_or_default().to_owned()) {
                    keys.push(jwk);
                }
            }
        }
    }
    json!({ "keys": keys })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::test_support::config;
    use crate::routing::envelope::tests::example;
    use base64::engine::general_purpose::STANDARD;
    use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};

    // RFC 8037 appendix A.1: the example Ed25519 key.
    const RFC_SEED: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    const WHSK_A: &str = "whsk_VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";

    fn rfc_key() -> Ed25519Key {
        let seed: [u8; 32] = URL_SAFE_NO_PAD
            .decode(RFC_SEED)
            .unwrap()
            .try_into()
            .unwrap();
        Ed25519Key::from_seed(&seed)
    }

    fn part(token: &str, i: usize) -> Vec<u8> {
        URL_SAFE_NO_PAD
            .decode(token.split('.').nth(i).unwrap())
            .unwrap()
    }

    fn verifies(token: &str, key: &Ed25519Key) -> bool {
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
        let public: [u8; 32] = STANDARD
            .decode(key.public_whpk().strip_prefix("whpk_").unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        VerifyingKey::from_bytes(&public)
            .unwrap()
            .verify(input.as_bytes(), &sig)
            .is_ok()
    }

    #[test]
    fn compact_jws_matches_rfc8037_a4() {
        let jws = compact_jws(
            br#"{"alg":"EdDSA"}"#,
            b"Example of Ed25519 signing",
            &rfc_key(),
        );
        assert_eq!(
            jws,
            "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc.hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
        assert!(verifies(&jws, &rfc_key()));
        assert!(!verifies(&jws, &Ed25519Key::generate().unwrap()));
    }

    fn set() -> SetConfig {
        SetConfig {
            issuer: "https://app.example.com".into(),
            audience: "https://idp.example.com".into(),
            event_uri_prefix: "urn:walhook:event:".into(),
        }
    }

    #[test]
    fn token_header_claims_and_signature() {
        let key = rfc_key();
        let token = token(&example(), Payload::Full, &set(), &key).unwrap();
        assert_eq!(token.split('.').count(), 3);
        let header: Value = serde_json::from_slice(&part(&token, 0)).unwrap();
        assert_eq!(
            header,
            json!({"alg": "EdDSA", "typ": "secevent+jwt", "kid": "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"})
        );
        let claims: Value = serde_json::from_slice(&part(&token, 1)).unwrap();
        let envelope = serde_json::to_value(example()).unwrap();
        assert_eq!(
            claims,
            json!({
                "iss": "https://app.example.com",
                "aud": "https://idp.example.com",
                "iat": example().occurred_at.timestamp(),
                "jti": "evt_01JDX5",
                "events": {"urn:walhook:event:user.updated": envelope},
            })
        );
        assert_eq!(claims["iat"], 1_795_634_130, "occurred_at, whole seconds");
        assert!(verifies(&token, &key));
        // Deterministic: a retry signs the same bytes.
        assert_eq!(
            token,
            super::token(&example(), Payload::Full, &set(), &key).unwrap()
        );
        // The signature covers the claims.
        let mut other = example();
        other.revision += 1;
        let forged = format!(
            "{}.{}.{}",
            token.split('.').next().unwrap(),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&json!({"jti": "x"})).unwrap()),
            token.rsplit('.').next().unwrap()
        );
        assert!(!verifies(&forged, &key));
        assert_ne!(
            token,
            super::token(&other, Payload::Full, &set(), &key).unwrap()
        );
    }

    #[test]
    fn thin_payload_and_prefix() {
        let set = SetConfig {
            event_uri_prefix: "https://app.example.com/events/".into(),
            ..set()
        };
        let token = token(&example(), Payload::Thin, &set, &rfc_key()).unwrap();
        let claims: Value = serde_json::from_slice(&part(&token, 1)).unwrap();
        let event = &claims["events"]["https://app.example.com/events/user.updated"];
        assert_eq!(event["id"], "evt_01JDX5");
        assert_eq!(event["revision"], 7);
        for omitted in ["data", "previous", "changed"] {
            assert!(event.get(omitted).is_none(), "thin: {event}");
        }
    }

    #[test]
    fn jwks_lists_set_keys_once_newest_first() {
        let new = Ed25519Key::generate().unwrap();
        let new_whsk = new.to_whsk();
        let sub = |name: &str, extra: &str| {
            format!(
                "[[subscriptions]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\n{extra}\n"
            )
        };
        let set_opts = "format = \"set\"\nset = { issuer = \"i\", audience = \"a\" }\n";
        let c = config(&format!(
            "{}{}{}",
            sub(
                "a",
                &format!(
                    "{set_opts}signature = \"v1a\"\nsecret = [\"{}\", \"{WHSK_A}\"]",
                    new_whsk.expose()
                )
            ),
            sub(
                "b",
                &format!("{set_opts}signature = \"v1a\"\nsecret = \"{WHSK_A}\"")
            ),
            // v1a without format = "set": not a SET key.
            sub(
                "c",
                &format!(
                    "signature = \"v1a\"\nsecret = \"whsk_{}\"",
                    STANDARD.encode([9u8; 32])
                )
            ),
        ));
        let set = jwks(&c);
        let keys = set["keys"].as_array().unwrap();
        let kids: Vec<&str> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
        let old = crate::config::Ed25519Key::from_seed(b"TESTSIGNINGKEYDONOTUSETHISFORANY");
        assert_eq!(kids, [new.kid(), old.kid()]);
        assert_eq!(keys[0], new.public_jwk());
        assert!(keys.iter().all(|k| k.get("d").is_none()));
        assert_eq!(jwks(&config("")), json!({"keys": []}));
    }
}
