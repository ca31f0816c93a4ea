//! Standard Webhooks `v1` signatures: HMAC-SHA256 over `"{id}.{timestamp}.{body}"`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// The `webhook-signature` header value for one attempt: `v1,<base64 signature>` for
/// each key, space-separated, in the order given (newest key first in the config), so a
/// receiver holding any one of the keys can verify during a rotation. `None` when there
/// are no keys (the subscription is unsigned).
///
/// `timestamp` is the `webhook-timestamp` of this attempt (unix seconds), `msg_id` the
/// `webhook-id`; `body` is signed byte for byte as sent.
pub fn sign(
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
        let sig = sign(&[key(SPEC_KEY)], SPEC_ID, SPEC_TS, SPEC_BODY).unwrap();
        assert_eq!(sig, SPEC_SIG);
    }

    #[test]
    fn no_keys_no_signature() {
        assert_eq!(sign(&[], SPEC_ID, SPEC_TS, SPEC_BODY), None);
    }

    #[test]
    fn verifies_with_the_standardwebhooks_crate() {
        let ts = now();
        let body = br#"{"id":"evt_1","type":"user.created"}"#;
        let sig = sign(&[key(SPEC_KEY)], "evt_1", ts, body).unwrap();
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
        let sig = sign(&[key(new), key(SPEC_KEY)], "evt_9", ts, body).unwrap();
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
}
