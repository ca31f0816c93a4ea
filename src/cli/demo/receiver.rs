//! The demo's webhook receiver: a real HTTP/1.1 server (hyper) on 127.0.0.1 that checks
//! every request's Standard Webhooks signature against the demo secret and hands each
//! request, verified or not, to the printer. Verified requests are answered 204, others
//! 401 (so walhook would retry them).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::SystemTime;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
use crate::delivery as signing;

/// How far `webhook-timestamp` may be from now (the Standard Webhooks default).
const TOLERANCE_SECS: i64 = 5 * 60;

/// One webhook as received.
#[derive(Debug)]
pub struct Webhook {
    /// When it arrived.
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// The parsed body (`Null` if it was not JSON).
    pub body: serde_json::Value,
    /// `Ok` when the signature verified; otherwise why not.
    pub verified: Result<(), String>,
}

/// Binds 127.0.0.1:0 and serves until `stop`; each request goes to `out`.
pub async fn start(
    key: Secret<Vec<u8>>,
    out: mpsc::UnboundedSender<Webhook>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let socket = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => socket,
                    Err(_) => continue,
                },
            };
            let (key, out, stop) = (key.clone(), out.clone(), stop.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(req, key.clone(), out.clone()));
                let conn = http1::Builder::new().serve_connection(TokioIo::new(socket), service);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = conn => {}
                }
            });
        }
    });
    Ok(addr)
}

async fn handle(
    req: Request<Incoming>,
    key: Secret<Vec<u8>>,
    out: mpsc::UnboundedSender<Webhook>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (id, ts, sig) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST)),
    };
    let verified = verify(&key, id.as_deref(), ts.as_deref(), sig.as_deref(), &body);
    let status = if verified.is_ok() {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::UNAUTHORIZED
    };
    let _ = out.send(Webhook {
        received_at: chrono::Utc::now(),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        verified,
    });
    Ok(reply(status))
}

fn reply(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Standard Webhooks verification: the timestamp is recent and one of the `v1,`
/// signatures equals HMAC-SHA256 over `"{id}.{timestamp}.{body}"` with `key`.
pub fn verify(
    key: &Secret<Vec<u8>>,
    id: Option<&str>,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
) -> Result<(), String> {
    let id = id.ok_or("no webhook-id header")?;
    let timestamp: i64 = timestamp
        .ok_or("no webhook-timestamp header")?
        .parse()
        .map_err(|_| "webhook-timestamp is not a number")?;
    let signature = signature.ok_or("no webhook-signature header")?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if (now - timestamp).abs() > TOLERANCE_SECS {
        return Err(format!("webhook-timestamp is {}s off", now - timestamp));
    }
    let expected =
        signing::sign_v1(std::slice::from_ref(key), id, timestamp, body).ok_or("no signing key")?;
    let expected = expected.as_bytes();
    let matches = signature
        .split(' ')
        .any(|candidate| constant_time_eq(candidate.as_bytes(), expected));
    if matches {
        Ok(())
    } else {
        Err("no signature matches the demo secret".into())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_own_signatures_and_rejects_tampering() {
        let key = Secret::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let sig = signing::sign_v1(std::slice::from_ref(&key), "evt_1", now, b"{}").unwrap();
        let ts = now.to_string();
        assert!(verify(&key, Some("evt_1"), Some(&ts), Some(&sig), b"{}").is_ok());
        assert!(verify(&key, Some("evt_1"), Some(&ts), Some(&sig), b"{ }").is_err());
        assert!(verify(&key, Some("evt_2"), Some(&ts), Some(&sig), b"{}").is_err());
        let old = (now - 3600).to_string();
        assert!(verify(&key, Some("evt_1"), Some(&old), Some(&sig), b"{}").is_err());
        assert!(verify(&key, None, Some(&ts), Some(&sig), b"{}").is_err());
    }
}
