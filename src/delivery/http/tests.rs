//! Tests of the outbound client against real servers on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use super::*;
use crate::mapping::test_support::config;

const WAIT: Duration = Duration::from_secs(10);
const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A request as the server saw it.
#[derive(Debug)]
struct Received {
    /// Which connection it came on: the server's accept count, from 1.
    conn: usize,
    request_line: String,
    /// Lowercased names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How the server answers every request.
#[derive(Clone)]
enum Reply {
    /// These bytes, then close.
    Raw(String),
    /// `200` with a body of this many bytes (`x`), then close.
    Big(usize),
    /// Never answer (keep the connection open).
    Never,
    /// `200` announcing 1,000 body bytes, 10 of them, then nothing (kept open).
    Stalls,
    /// `204` to every request, keeping the connection open.
    KeepAlive,
    /// `204` without `connection: close`, then close 50 ms later.
    Once,
    /// `204` with `connection: close`, then close.
    OnceSayingClose,
}

/// Serves `reply` on `127.0.0.1:0` over plain TCP, or TLS with `tls`; each request
/// is forwarded to the returned channel.
async fn serve(
    reply: Reply,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        for conn in 1.. {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (reply, tx, tls) = (reply.clone(), tx.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(sock).await {
                            handle(s, conn, reply, tx).await;
                        }
                    }
                    None => handle(sock, conn, reply, tx).await,
                }
            });
        }
    });
    (addr, rx)
}

/// [`serve`] over plain TCP, answering every request with `text` and closing.
async fn serve_raw(text: &str) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    serve(Reply::Raw(text.to_owned()), None).await
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    conn: usize,
    reply: Reply,
    tx: mpsc::UnboundedSender<Received>,
) {
    let Some(mut request) = read_request(&mut s).await else {
        return;
    };
    request.conn = conn;
    let _ = tx.send(request);
    match reply {
        Reply::KeepAlive => loop {
            if s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            let Some(mut request) = read_request(&mut s).await else {
                // The client closed the connection: say so with a request line of "".
                let _ = tx.send(Received {
                    conn,
                    request_line: String::new(),
                    headers: Vec::new(),
                    body: Vec::new(),
                });
                return;
            };
            request.conn = conn;
            let _ = tx.send(request);
        },
        Reply::Once => {
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Reply::OnceSayingClose => {
            let text = "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n";
            let _ = s.write_all(text.as_bytes()).await;
        }
        Reply::Raw(text) => {
            let _ = s.write_all(text.as_bytes()).await;
        }
        Reply::Big(len) => {
            let head =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(chunk.len());
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        }
        Reply::Never => {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Reply::Stalls => {
            let text = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789";
            let _ = s.write_all(text.as_bytes()).await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
    }
    let _ = s.shutdown().await;
}

async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<Received> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Some(Received {
        conn: 0,
        request_line,
        headers,
        body: buf[head_end..head_end + len].to_vec(),
    })
}

fn url(scheme: &str, addr: SocketAddr) -> Url {
    Url::parse(&format!("{scheme}://{addr}/hook?token=s3cret")).unwrap()
}

fn client() -> HttpClient {
    HttpClient::new(false, None).unwrap()
}

fn json_headers() -> HeaderMap {
    HeaderMap::from_iter([(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    )])
}

async fn post(client: &HttpClient, url: &Url, timeout: Duration) -> Attempt {
    post_to(client, &Target::new(url), timeout).await
}

async fn post_to(client: &HttpClient, target: &Target, timeout: Duration) -> Attempt {
    tokio::time::timeout(
        WAIT,
        client.post(target, json_headers(), Bytes::from_static(b"{}"), timeout),
    )
    .await
    .expect("post returned within 10s")
}

/// The connections the requests received so far came on, in order.
fn connections(rx: &mut mpsc::UnboundedReceiver<Received>) -> Vec<usize> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .map(|r| r.conn)
        .collect()
}

fn code(a: &Attempt) -> u16 {
    match &a.outcome {
        AttemptOutcome::Status { code, .. } => *code,
        other => panic!("expected a status, got {other:?} ({:?})", a.error),
    }
}

/// Each way the pool reaches a receiver, with a server for it and a client: plain
/// HTTP, and HTTPS (a self-signed certificate, so the client does not check it).
fn schemes() -> [(&'static str, Option<tokio_rustls::TlsAcceptor>, HttpClient); 2] {
    [
        ("http", None, client()),
        (
            "https",
            Some(self_signed()),
            HttpClient::new(true, None).unwrap(),
        ),
    ]
}

#[tokio::test]
async fn connections_are_kept_and_reused() {
    for (scheme, tls, client) in schemes() {
        let (addr, mut rx) = serve(Reply::KeepAlive, tls).await;
        let target = Target::new(&url(scheme, addr));
        for _ in 0..5 {
            assert_eq!(
                code(&post_to(&client, &target, WAIT).await),
                204,
                "{scheme}"
            );
        }
        assert_eq!(
            connections(&mut rx),
            [1; 5],
            "{scheme}: one after another, one connection"
        );

        // Eight at once need at most eight connections; the next eight find them idle.
        let eight =
            || futures_util::future::join_all((0..8).map(|_| post_to(&client, &target, WAIT)));
        for a in eight().await {
            assert_eq!(code(&a), 204);
        }
        let first = connections(&mut rx);
        let opened = *first.iter().max().unwrap();
        assert!(first.len() == 8 && opened <= 8, "{scheme}: {first:?}");
        for a in eight().await {
            assert_eq!(code(&a), 204);
        }
        let second = connections(&mut rx);
        assert_eq!(second.len(), 8);
        assert!(
            second.iter().all(|&c| c <= opened),
            "{scheme}: {first:?} then {second:?}"
        );
    }
}

/// The pool's own idle timeout (reqwest's is 90 s): this also shows that HTTPS goes
/// through the pool.
#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    for (scheme, tls, client) in schemes() {
        let (addr, mut rx) = serve(Reply::KeepAlive, tls).await;
        let target = Target::with_idle_timeout(&url(scheme, addr), Duration::from_millis(300));
        let started = std::time::Instant::now();
        assert_eq!(code(&post_to(&client, &target, WAIT).await), 204);
        let first = rx.recv().await.unwrap();
        assert_eq!(
            (first.conn, first.request_line.as_str()),
            (1, "POST /hook?token=s3cret HTTP/1.1")
        );
        // Nothing else is sent: the pool itself closes the connection.
        let closed = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((closed.conn, closed.request_line.as_str()), (1, ""));
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(300) && after < Duration::from_secs(3),
            "{scheme}: closed after {after:?}"
        );
        // The next request opens a new connection.
        assert_eq!(code(&post_to(&client, &target, WAIT).await), 204);
        assert_eq!(rx.recv().await.unwrap().conn, 2, "{scheme}");
    }
}

#[tokio::test]
async fn a_kept_connection_the_receiver_closed_is_not_used_again() {
    // Closed after the answer, with `connection: close` or (later) without a word.
    for (scheme, tls, client) in schemes() {
        for (reply, pause) in [(Reply::OnceSayingClose, 0), (Reply::Once, 200)] {
            let (addr, mut rx) = serve(reply, tls.clone()).await;
            let target = Target::new(&url(scheme, addr));
            for _ in 0..3 {
                let a = post_to(&client, &target, WAIT).await;
                assert_eq!(code(&a), 204, "{scheme}: {:?}", a.error);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            assert_eq!(
                connections(&mut rx),
                [1, 2, 3],
                "{scheme}, pause {pause} ms"
            );
        }
    }
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let (target, mut target_rx) = serve_raw("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let location = format!("http://{target}/elsewhere");
    let reply = format!(
        "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 5\r\nconnection: close\r\n\r\nmoved"
    );
    let (addr, mut rx) = serve_raw(&reply).await;
    let a = post(&client(), &url("http", addr), WAIT).await;
    assert_eq!(code(&a), 302);
    assert_eq!(a.location.as_deref(), Some(location.as_str()));
    assert_eq!(a.response_head, "moved");
    assert!(rx.recv().await.is_some(), "the receiver got the POST");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        target_rx.try_recv().is_err(),
        "the redirect target got nothing"
    );
}

#[tokio::test]
async fn retry_after_is_returned() {
    let (addr, _rx) = serve_raw("HTTP/1.1 503 Service Unavailable\r\nretry-after: 120\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    .await;
    let a = post(&client(), &url("http", addr), WAIT).await;
    assert_eq!(
        a.outcome(),
        Outcome::Status {
            code: 503,
            retry_after: Some("120")
        }
    );
    assert_eq!(a.location, None);
    assert_eq!(a.error, None);
}

/// A receiver that never answers, over either scheme, and one that accepts the TCP
/// connection but never answers the TLS hello: the timeout covers the whole exchange.
#[tokio::test]
async fn silent_server_times_out() {
    let mut receivers = Vec::new();
    for (scheme, tls, client) in schemes() {
        receivers.push((scheme, serve(Reply::Never, tls).await.0, client));
    }
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    receivers.push(("https", mute.local_addr().unwrap(), client()));
    for (scheme, addr, client) in receivers {
        let a = post(&client, &url(scheme, addr), Duration::from_millis(300)).await;
        assert_eq!(
            a.outcome,
            AttemptOutcome::Error {
                kind: ErrorKind::Timeout
            },
            "{scheme} {addr}"
        );
        assert_eq!(a.error.as_deref(), Some("timeout after 300ms"));
        assert!(a.elapsed >= Duration::from_millis(300) && a.elapsed < Duration::from_secs(5));
    }
    drop(mute);
}

/// Both schemes (plain HTTP, and TLS over the same pool) time a body
/// that stops arriving out the same way: the status stands, the error says so.
#[tokio::test]
async fn a_body_that_stops_arriving_keeps_its_status_and_times_out() {
    for (scheme, tls, client) in schemes() {
        let (addr, _rx) = serve(Reply::Stalls, tls).await;
        let a = post(&client, &url(scheme, addr), Duration::from_millis(500)).await;
        assert_eq!(code(&a), 200, "{scheme}");
        assert_eq!(
            a.error.as_deref(),
            Some("reading body: timeout after 500ms"),
            "{scheme}"
        );
        assert_eq!(
            (a.body_read, a.response_head.as_str()),
            (10, "0123456789"),
            "{scheme}"
        );
        assert!(a.elapsed >= Duration::from_millis(500) && a.elapsed < Duration::from_secs(5));
    }
}

/// Credentials in an `http://` URL become an `Authorization` header (reqwest's way,
/// which such URLs take), never part of the request line or `Host`.
#[tokio::test]
async fn credentials_in_a_plain_url_are_sent_as_basic_auth() {
    let (addr, mut rx) = serve_raw("HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await;
    let url = Url::parse(&format!("http://user:pass@{addr}/hook")).unwrap();
    let a = post(&client(), &url, WAIT).await;
    assert_eq!(code(&a), 204);
    let got = rx.recv().await.expect("the request");
    assert_eq!(got.header("authorization"), Some("Basic dXNlcjpwYXNz"));
    assert_eq!(got.header("host"), Some(addr.to_string().as_str()));
    assert!(!got.request_line.contains("pass"), "{}", got.request_line);
}

#[tokio::test]
async fn huge_body_is_cut_off() {
    let (addr, _rx) = serve(Reply::Big(10 * 1024 * 1024), None).await;
    let a = post(&client(), &url("http", addr), WAIT).await;
    assert_eq!(code(&a), 200);
    assert_eq!(a.body_read, MAX_BODY_READ);
    assert_eq!(a.response_head.len(), HEAD_KEPT);
    assert!(a.response_head.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn closed_port_is_a_connect_error() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let a = post(&client(), &url("http", addr), WAIT).await;
    assert_eq!(
        a.outcome,
        AttemptOutcome::Error {
            kind: ErrorKind::Connect
        }
    );
    let error = a.error.unwrap();
    assert_eq!(error, "connection refused");
}

#[tokio::test]
async fn errors_never_show_the_url() {
    // An unresolvable host: whatever the resolver says, the URL's token stays out.
    let url = Url::parse("http://walhook-no-such-host.invalid/hook?token=s3cret").unwrap();
    let a = post(&client(), &url, Duration::from_secs(5)).await;
    assert!(matches!(a.outcome, AttemptOutcome::Error { .. }), "{a:?}");
    let error = a.error.unwrap();
    assert!(
        !error.contains("s3cret") && !error.contains("no-such-host"),
        "{error}"
    );
}

#[tokio::test]
async fn headers_arrive_and_the_signature_verifies() {
    let (addr, mut rx) = serve_raw("HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n").await;
    let c = config(&format!(
        "[[subscriptions]]\nname = \"crm\"\nurl = \"http://{addr}/hook\"\nevents = [\"*\"]\n\
         secret = \"{KEY}\"\nheaders = {{ Authorization = \"Bearer t0k\", X-Tenant = \"acme\" }}\n"
    ));
    let sub = &c.subscriptions[0];
    let body = Bytes::from_static(br#"{"id":"evt_1","type":"user.created"}"#);
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let headers = request_headers(
        sub,
        super::super::body::content_type(sub.format),
        "evt_1",
        ts,
        &body,
    );
    // Secret values are marked sensitive (hidden by `Debug`).
    for (name, value) in &headers {
        let secret = ["authorization", "x-tenant", "webhook-signature"].contains(&name.as_str());
        assert_eq!(value.is_sensitive(), secret, "{name}");
    }
    let clients = HttpClients::new(&c.delivery).unwrap();
    let a = clients
        .for_subscription(sub)
        .post(
            &Target::new(sub.url.expose()),
            headers.clone(),
            body.clone(),
            sub.timeout,
        )
        .await;
    assert_eq!(code(&a), 204);
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.request_line, "POST /hook HTTP/1.1");
    assert_eq!(got.body, &body[..]);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("user-agent"), Some(USER_AGENT));
    assert!(USER_AGENT.starts_with("walhook/0."));
    assert_eq!(got.header("webhook-id"), Some("evt_1"));
    assert_eq!(
        got.header("webhook-timestamp"),
        Some(ts.to_string().as_str())
    );
    assert_eq!(got.header("authorization"), Some("Bearer t0k"));
    assert_eq!(got.header("x-tenant"), Some("acme"));
    assert_eq!(
        got.headers
            .iter()
            .filter(|(n, _)| n == "user-agent")
            .count(),
        1
    );
    let mut map = HeaderMap::new();
    for (n, v) in &got.headers {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let wh = standardwebhooks::Webhook::new(KEY).unwrap();
    wh.verify(&got.body, &map).expect("signature verifies");
}

#[test]
fn unsigned_subscription_sends_no_signature() {
    let c = config(
        "[[subscriptions]]\nname = \"s\"\nurl = \"http://127.0.0.1:1/\"\nevents = [\"*\"]\n",
    );
    let headers = request_headers(&c.subscriptions[0], "application/json", "evt_1", 1, b"{}");
    let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "content-type",
            "user-agent",
            "webhook-id",
            "webhook-timestamp"
        ]
    );
}

#[test]
fn head_does_not_cut_a_character() {
    let mut body = vec![b'a'; HEAD_KEPT - 1];
    body.extend_from_slice("é and more".as_bytes());
    let h = head(&body);
    assert_eq!(h.len(), HEAD_KEPT - 1);
    assert!(h.bytes().all(|b| b == b'a'));
    assert_eq!(head(b"short \xff"), "short \u{fffd}");
    assert_eq!(head(b"nul\0here"), "nul\u{fffd}here");
}

fn self_signed() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// `a` failed in the TLS handshake, and its error says so first.
fn assert_tls_error(a: &Attempt) {
    assert_eq!(
        a.outcome,
        AttemptOutcome::Error {
            kind: ErrorKind::Tls
        },
        "{:?}",
        a.error
    );
    let error = a.error.as_deref().unwrap_or_default();
    assert!(error.starts_with("tls: "), "{error}");
}

#[tokio::test]
async fn untrusted_certificate_is_a_tls_error_unless_insecure() {
    let (addr, _rx) = serve(
        Reply::Raw("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".into()),
        Some(self_signed()),
    )
    .await;
    let a = post(&client(), &url("https", addr), WAIT).await;
    assert_tls_error(&a);
    let insecure = HttpClient::new(true, None).unwrap();
    let a = post(&insecure, &url("https", addr), WAIT).await;
    assert_eq!(code(&a), 200);
    assert_eq!(a.response_head, "ok");
}

#[tokio::test]
async fn https_to_a_plain_http_receiver_is_a_tls_error() {
    // A plain-HTTP server answers the TLS hello as the garbage it is to HTTP.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut hello = [0u8; 512];
        let _ = sock.read(&mut hello).await;
        let _ = sock
            .write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
            .await;
    });
    let insecure = HttpClient::new(true, None).unwrap();
    let a = post(&insecure, &url("https", addr), WAIT).await;
    assert_tls_error(&a);
}

#[tokio::test]
async fn a_configured_proxy_gets_every_request_in_absolute_form() {
    let ok = "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n".to_string();
    let (proxy_addr, mut rx) = serve_raw(&ok).await;
    let proxy = Url::parse(&format!("http://{proxy_addr}")).unwrap();
    let client = HttpClient::new(false, Some(&proxy)).unwrap();
    // The receiver's host does not resolve: only the proxy can have answered.
    let receiver = Url::parse("http://receiver.invalid:8080/hook").unwrap();
    let a = client
        .post(
            &Target::new(&receiver),
            json_headers(),
            Bytes::from_static(b"{}"),
            WAIT,
        )
        .await;
    assert_eq!(code(&a), 204, "{a:?}");
    let got = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got.request_line,
        "POST http://receiver.invalid:8080/hook HTTP/1.1"
    );
    assert_eq!(got.body, b"{}");
}
