//! Standard Webhooks signatures over the spec's signed content
//! `"{msg_id}.{timestamp}.{body}"`: `v1` (HMAC-SHA256) and `v1a` (ed25519).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::ed25519::signature::MultipartSigner;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::{Ed25519Key, Secret, SigningKeys};

type HmacSha256 = Hmac<Sha256>;

/// The `webhook-signature` header value for one attempt with the subscription's keys:
/// [`sign_v1`] or [`sign_v1a`]. `None` when the subscription is unsigned.
pub fn sign(keys: &SigningKeys, msg_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    match keys {
        SigningKeys::Unsigned => None,
        SigningKeys::V1(secrets) => sign_v1(secrets, msg_id, timestamp, body),
        SigningKeys::V1a(keys) => sign_v1a(keys, msg_id, timestamp, body),
    }
}

/// `v1a,<base64 of the 64-byte ed25519 signature>` for each key, space-separated, in
/// the order given (newest first), so a receiver trusting any one of the public keys
/// can verify during a rotation. `None` when there are no keys.
///
/// Signs the same content as [`sign_v1`]; ed25519 is deterministic, so the same key and
/// content always give the same signature.
pub fn sign_v1a(keys: &[Ed25519Key], msg_id: &str, timestamp: i64, body: &[u8]) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    let prefix = format!("{msg_id}.{timestamp}.");
    let mut header = String::with_capacity(keys.len() * 93);
    for key in keys {
        // The signed content in two parts: the body is never copied.
        let Ok(signature) = key
            .signing_key()
            .try_multipart_sign(&[prefix.as_bytes(), body])
        else {
            continue;
        };
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str("v1a,");
        STANDARD.encode_string(signature.to_bytes(), &mut header);
    }
    Some(header)
}

/// The `webhook-signature` header value for one attempt: `v1,<base64 signature>` for
/// each key, space-separated, in the order given (newest key first in the config), so a
/// receiver holding any one of the keys can verify during a rotation. `None` when there
/// are no keys (the subscription is unsigned).
///
/// `timestamp` is the `webhook-timestamp` of this attempt (unix seconds), `msg_id` the
/// `webhook-id`; `body` is signed byte for byte as sent.
pub fn sign_v1(
    secrets: &[Secret<Vec<u8>>],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Option<String> {
    if secrets.is_empty() {
        return None;
    }
    let prefix = format!("{msg_id}.{timestamp}.");
    let mut header = String::with_capacity(secrets.len() * 48);
    for secret in secrets {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
        let Ok(mut mac) = HmacSha256::new_from_slice(secret.expose()) else {
            continue;
        };
        mac.update(prefix.as_bytes());
        mac.update(body);
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str("v1,");
        STANDARD.encode_string(mac.finalize().into_bytes(), &mut header);
    }
    Some(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use standardwebhooks::Webhook;

    // The signing example of the Standard Webhooks reference libraries.
    const SPEC_KEY: &str = "C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const SPEC_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const SPEC_TS: i64 = 1_649_367_553;
    const SPEC_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SPEC_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn key(b64: &str) -> Secret<Vec<u8>> {
        Secret::new(STANDARD.decode(b64).unwrap())
    }

    fn headers(id: &str, ts: i64, sig: &str) -> reqwest::header::HeaderMap {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("webhook-id", id.parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert("webhook-signature", sig.parse().unwrap());
        h
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn matches_the_spec_vector() {
        let sig = sign_v1(&[key(SPEC_KEY)], SPEC_ID, SPEC_TS, SPEC_BODY).unwrap();
        assert_eq!(sig, SPEC_SIG);
    }

    #[test]
    fn no_keys_no_signature() {
        assert_eq!(sign_v1(&[], SPEC_ID, SPEC_TS, SPEC_BODY), None);
        assert_eq!(sign_v1a(&[], SPEC_ID, SPEC_TS, SPEC_BODY), None);
        assert_eq!(
            sign(&SigningKeys::Unsigned, SPEC_ID, SPEC_TS, SPEC_BODY),
            None
        );
    }

    #[test]
    fn verifies_with_the_standardwebhooks_crate() {
        let ts = now();
        let body = br#"{"id":"evt_1","type":"user.created"}"#;
        let sig = sign_v1(&[key(SPEC_KEY)], "evt_1", ts, body).unwrap();
        let wh = Webhook::new(&format!("whsec_{SPEC_KEY}")).unwrap();
        wh.verify(body, &headers("evt_1", ts, &sig)).unwrap();
        // A changed body or id fails.
        assert!(wh.verify(b"{}", &headers("evt_1", ts, &sig)).is_err());
        assert!(wh.verify(body, &headers("evt_2", ts, &sig)).is_err());
    }

    #[test]
    fn rotated_keys_each_verify() {
        let new = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let ts = now();
        let body = b"{\"n\":1}";
        let sig = sign(
            &SigningKeys::V1(vec![key(new), key(SPEC_KEY)]),
            "evt_9",
            ts,
            body,
        )
        .unwrap();
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2, "{sig}");
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
        for k in [new, SPEC_KEY] {
            let wh = Webhook::new(&format!("whsec_{k}")).unwrap();
            wh.verify(body, &headers("evt_9", ts, &sig)).unwrap();
        }
        let other = Webhook::new("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert!(other.verify(body, &headers("evt_9", ts, &sig)).is_err());
    }

    // The asymmetric signing vector of the Standard Webhooks Go reference library
    // (`webhook_asymmetric_test.go`): its 32-byte seed, message and signature.
    const V1A_SEED: &str = "VEVTVFNJR05JTkdLRVlET05PVFVTRVRISVNGT1JBTlk=";
    const V1A_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const V1A_TS: i64 = 1_614_265_330;
    const V1A_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const V1A_SIG: &str = "v1a,tQ9V2XOqn7jL/DQenEFpqIugdBVtiMmER5mhSkXBNwM0mkATuDe6KYYUuxqtaiHeYGb7KaaBRdM5WqyeFiL8Ag==";

    fn ed_key(seed_b64: &str) -> Ed25519Key {
        let seed: [u8; 32] = STANDARD.decode(seed_b64).unwrap().try_into().unwrap();
        Ed25519Key::from_seed(&seed)
    }

    #[test]
    fn v1a_matches_the_reference_vector() {
        let keys = SigningKeys::V1a(vec![ed_key(V1A_SEED)]);
        assert_eq!(
            sign(&keys, V1A_ID, V1A_TS, V1A_BODY).as_deref(),
            Some(V1A_SIG)
        );
        // Any change to the id, the timestamp or the body changes the signature.
        for (id, ts, body) in [
            ("msg_p5jXN8AQM9LWM0D4loKWxJeK", V1A_TS, V1A_BODY),
            (V1A_ID, V1A_TS + 1, V1A_BODY),
            (V1A_ID, V1A_TS, br#"{"test": 2432232315}"#.as_slice()),
        ] {
            assert_ne!(sign(&keys, id, ts, body).as_deref(), Some(V1A_SIG));
        }
    }

    #[test]
    fn v1a_verifies_with_the_public_key_and_rotates() {
        use ed25519_dalek::{Signature, Verifier, VerifyingKey};
        let (new, old) = (Ed25519Key::generate().unwrap(), ed_key(V1A_SEED));
        let ts = now();
        let body = b"{\"n\":1}";
        let header = sign_v1a(&[new.clone(), old.clone()], "evt_9", ts, body).unwrap();
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2, "{header}");
        let content = format!("evt_9.{ts}.{{\"n\":1}}");
        for (part, key) in parts.iter().zip([&new, &old]) {
            let b64 = part.strip_prefix("v1a,").expect("v1a prefix");
            let sig = Signature::from_slice(&STANDARD.decode(b64).unwrap()).unwrap();
            let public = key.public_whpk();
            let public: [u8; 32] = STANDARD
                .decode(public.strip_prefix("whpk_").unwrap())
                .unwrap()
                .try_into()
                .unwrap();
            let verifier = VerifyingKey::from_bytes(&public).unwrap();
            verifier.verify(content.as_bytes(), &sig).unwrap();
            assert!(verifier.verify(b"evt_9.0.{}", &sig).is_err());
        }
    }
}
