//! The outbound HTTP client (STYLE rule 11): built once, pooled keep-alive, rustls,
//! no redirects, a `walhook/<version>` User-Agent, a timeout per request, a proxy only
//! when `[delivery] proxy` names one; and the headers every attempt carries.
//!
//! Requests to `http://` and `https://` receivers, when no proxy is configured, go over
//! hyper's HTTP/1.1 client connections in walhook's own pool ([`pool`]), not through reqwest,
//! which wraps hyper's pooled client (`hyper_util`'s `legacy::Client`) in layers of its
//! own (a client and connector clone, a URL conversion, a redirect layer and a timeout
//! wrapper per request). On the 2-core development machine, 300,000 POSTs of 400 bytes,
//! 64 at a time, into `examples/sink`: reqwest 17.7-18.3 µs of CPU per request, hyper's
//! pooled client 9.4-9.7 µs (with the same headers and a timeout), hyper's connections
//! driven directly 6.7-6.9 µs. reqwest (a crate the user named) stays for the proxy
//! (HTTPS through `CONNECT`, HTTP/2 by ALPN) and for URLs with credentials, where its
//! handling is worth its cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use url::Url;

use super::error::DeliveryError;
use super::policy::{ErrorKind, Outcome};
use super::signing::sign;
use crate::config::{DeliveryConfig, SubscriptionConfig};

/// `walhook/<version>`, the User-Agent of every request.
pub const USER_AGENT: &str = concat!("walhook/", env!("CARGO_PKG_VERSION"));
/// At most this many response body bytes are read; the rest is never received.
pub const MAX_BODY_READ: usize = 64 * 1024;
/// At most this many bytes of the response body are kept in [`Attempt::response_head`].
pub const HEAD_KEPT: usize = 1024;

/// Longest `Location` or `Retry-After` value kept.
const MAX_HEADER_KEPT: usize = 2048;
/// Longest error text kept.
const MAX_ERROR_KEPT: usize = 300;

const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// All headers of one attempt: `content-type` (the body's: see
/// [`super::body::content_type`]), `user-agent`, `webhook-id` (`msg_id`, the event
/// id or a batch's id), `webhook-timestamp` (`timestamp`, unix
/// seconds of this attempt), `webhook-signature` (when the subscription has keys),
/// then the subscription's own headers.
///
/// Values of the signature and the subscription's headers are marked sensitive. A
/// subscription header that is not a valid header (config validation prevents it) is
/// left out with a warning naming only the header.
pub fn request_headers(
    sub: &SubscriptionConfig,
    content_type: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> HeaderMap {
    // Room for the plain-HTTP path's Host header too.
    let mut out = HeaderMap::with_capacity(6 + sub.headers.len());
    let content_type =
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/json"));
    out.append(header::CONTENT_TYPE, content_type);
    out.append(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
    match HeaderValue::from_str(msg_id) {
        Ok(v) => {
            out.append(WEBHOOK_ID, v);
        }
        Err(_) => tracing::warn!(subscription = %sub.name, "event id is not a valid header value"),
    }
    out.append(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
    // The signature's bytes become the header value as they are (checked, not copied).
    if let Some(signature) = sign(&sub.keys, msg_id, timestamp, body)
        && let Ok(mut v) = HeaderValue::from_maybe_shared(Bytes::from(signature))
    {
        v.set_sensitive(true);
        out.append(WEBHOOK_SIGNATURE, v);
    }
    for (name, value) in &sub.headers {
        let parsed = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.expose().as_bytes()),
        );
        match parsed {
            (Ok(name), Ok(mut value)) => {
                value.set_sensitive(true);
                out.append(name, value);
            }
            _ => tracing::warn!(
                subscription = %sub.name,
                header = %name,
                "invalid subscription header left out"
            ),
        }
    }
    out
}

/// What an attempt got, owned; [`AttemptOutcome::as_outcome`] borrows it for
/// [`super::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The receiver answered.
    Status {
        /// HTTP status code.
        code: u16,
        /// `Retry-After`, if present and printable (at most 2 KiB).
        retry_after: Option<String>,
    },
    /// No answer.
    Error {
        /// What went wrong.
        kind: ErrorKind,
    },
}

impl AttemptOutcome {
    /// A bounded label for logs and metrics: the status code, or the failure kind
    /// (`timeout`, `connect`, `tls`, `body`, `other`).
    pub fn label(&self) -> std::borrow::Cow<'static, str> {
        match self {
            AttemptOutcome::Status { code, .. } => code.to_string().into(),
            AttemptOutcome::Error { kind } => kind.as_str().into(),
        }
    }

    /// The borrowed form the retry policy takes.
    pub fn as_outcome(&self) -> Outcome<'_> {
        match self {
            AttemptOutcome::Status { code, retry_after } => Outcome::Status {
                code: *code,
                retry_after: retry_after.as_deref(),
            },
            AttemptOutcome::Error { kind } => Outcome::Error { kind: *kind },
        }
    }
}

/// The result of one POST. Holds no request data; `response_head` is the receiver's
/// text and is for the store only, never for logs or metric labels.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Status (and `Retry-After`), or the kind of failure.
    pub outcome: AttemptOutcome,
    /// The first [`HEAD_KEPT`] bytes of the response body, lossily UTF-8 (an incomplete
    /// character at the cut is dropped). Empty on errors.
    pub response_head: String,
    /// Bytes of the response body read, at most [`MAX_BODY_READ`].
    pub body_read: usize,
    /// The `Location` header of a 3xx answer (never followed).
    pub location: Option<String>,
    /// A short description of a failure, e.g. `timeout after 10s`, `connection
    /// refused`, `tls: invalid peer certificate: UnknownIssuer`. Never holds the URL.
    /// With a status it describes a failure reading the body (the status still counts).
    pub error: Option<String>,
    /// From sending the request to the end of reading the body.
    pub elapsed: Duration,
}

impl Attempt {
    /// The borrowed outcome for [`super::decide`].
    pub fn outcome(&self) -> Outcome<'_> {
        self.outcome.as_outcome()
    }
}

/// The client pair a dispatcher shares: one that checks receiver certificates and one
/// for subscriptions with `tls_insecure = true`. Build once; cloning is cheap.
#[derive(Debug, Clone)]
pub struct HttpClients {
    verified: HttpClient,
    insecure: HttpClient,
}

impl HttpClients {
    /// Builds both clients, with `[delivery]`'s proxy when it names one.
    pub fn new(delivery: &DeliveryConfig) -> Result<HttpClients, DeliveryError> {
        let proxy = delivery.proxy.as_ref().map(|url| url.expose());
        if let Some(proxy) = delivery.proxy_redacted() {
            tracing::info!(proxy = %proxy, "webhooks go through the configured proxy");
        }
        Ok(HttpClients {
            verified: HttpClient::new(false, proxy)?,
            insecure: HttpClient::new(true, proxy)?,
        })
    }

    /// The client for `sub` (its `tls_insecure`).
    pub fn for_subscription(&self, sub: &SubscriptionConfig) -> &HttpClient {
        if sub.tls_insecure {
            &self.insecure
        } else {
            &self.verified
        }
    }
}

/// A pooled outbound client. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    /// No proxy is configured: requests go through the target's own connection pool
    /// ([`pool`], see the module docs).
    direct: bool,
    /// TLS of the direct path to `https://` receivers.
    tls: Arc<rustls::ClientConfig>,
}

impl HttpClient {
    /// Builds a client: rustls with the system's and the webpki root certificates,
    /// keep-alive connections, no redirects; HTTP/1.1 on the direct path ([`pool`]),
    /// HTTP/1.1 or HTTP/2 (ALPN) through reqwest. With `tls_insecure`, receiver
    /// certificates and host names are not checked.
    ///
    /// Every request goes through `proxy` when given (HTTP requests in absolute form,
    /// HTTPS through `CONNECT`), and straight to the receiver otherwise: the proxy
    /// environment variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`)
    /// are never read, so a variable meant for other programs cannot divert webhooks.
    pub fn new(tls_insecure: bool, proxy: Option<&Url>) -> Result<HttpClient, DeliveryError> {
        let builder = match proxy {
            Some(url) => reqwest::Client::builder()
                .proxy(reqwest::Proxy::all(url.as_str()).map_err(|_| DeliveryError::Proxy)?),
            None => reqwest::Client::builder().no_proxy(),
        };
        let client = builder
            .use_rustls_tls()
            .user_agent(USER_AGENT)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .tcp_nodelay(true)
            .danger_accept_invalid_certs(tls_insecure)
            .build()
            .map_err(DeliveryError::HttpClient)?;
        Ok(HttpClient {
            client,
            direct: proxy.is_none(),
            tls: receiver_tls(tls_insecure),
        })
    }

    /// POSTs `body` with `headers` (see [`request_headers`]) to `target`. `timeout` bounds
    /// the whole attempt: connecting, the answer and reading the body. Redirects are
    /// returned, not followed. At most [`MAX_BODY_READ`] bytes of the body are read;
    /// a longer body is cut off (its connection is then closed, not pooled).
    ///
    /// Never fails: every failure is an [`Attempt`] with [`AttemptOutcome::Error`].
    /// Logs nothing.
    pub async fn post(
        &self,
        target: &Target,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Attempt {
        let start = Instant::now();
        if self.direct
            && let Some(pool) = &target.pool
        {
            return pool.post(&self.tls, headers, body, timeout, start).await;
        }
        let sent = self
            .client
            .post(target.url.clone())
            .headers(headers)
            .timeout(timeout)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            Err(err) => {
                let (kind, error) = classify(&err, timeout);
                return failed(kind, error, start);
            }
        };
        let answer = AnswerHead::of(response.status(), response.headers());
        let mut buf = Vec::new();
        let mut error = None;
        while buf.len() < MAX_BODY_READ {
            match response.chunk().await {
                Ok(Some(chunk)) => keep(&mut buf, &chunk),
                Ok(None) => break,
                Err(err) => {
                    let (_, e) = classify(&err, timeout);
                    error = Some(format!("reading body: {e}"));
                    break;
                }
            }
        }
        drop(response);
        answer.attempt(&buf, error, start)
    }
}

/// What an attempt keeps of an answer's head: the status, `Retry-After`, and
/// `Location` of a redirect (each at most [`MAX_HEADER_KEPT`] characters).
struct AnswerHead {
    code: u16,
    retry_after: Option<String>,
    location: Option<String>,
}

impl AnswerHead {
    fn of(status: hyper::StatusCode, headers: &HeaderMap) -> AnswerHead {
        let text = |name: HeaderName| {
            headers.get(name).map(|v| {
                let s = String::from_utf8_lossy(v.as_bytes());
                s.chars().take(MAX_HEADER_KEPT).collect::<String>()
            })
        };
        AnswerHead {
            code: status.as_u16(),
            retry_after: text(header::RETRY_AFTER),
            location: status
                .is_redirection()
                .then(|| text(header::LOCATION))
                .flatten(),
        }
    }

    /// The attempt that got this answer, `body` read of it (`error` when reading
    /// stopped early).
    fn attempt(self, body: &[u8], error: Option<String>, start: Instant) -> Attempt {
        Attempt {
            outcome: AttemptOutcome::Status {
                code: self.code,
                retry_after: self.retry_after,
            },
            response_head: head(body),
            body_read: body.len(),
            location: self.location,
            error,
            elapsed: start.elapsed(),
        }
    }
}

/// An attempt that got no answer.
fn failed(kind: ErrorKind, error: String, start: Instant) -> Attempt {
    Attempt {
        outcome: AttemptOutcome::Error { kind },
        response_head: String::new(),
        body_read: 0,
        location: None,
        error: Some(error),
        elapsed: start.elapsed(),
    }
}

/// Appends what of `chunk` fits under [`MAX_BODY_READ`].
fn keep(buf: &mut Vec<u8>, chunk: &[u8]) {
    let take = chunk.len().min(MAX_BODY_READ - buf.len());
    buf.extend_from_slice(&chunk[..take]);
}

/// Where a subscription's requests go: its URL and, for an `http://` or `https://` URL
/// without credentials (reqwest turns those into an `Authorization` header) or a
/// fragment, the pool of connections to it ([`pool`]), made once per dispatcher rather
/// than per request. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct Target {
    url: Url,
    /// `None` sends requests through reqwest.
    pool: Option<Arc<pool::Pool>>,
}

impl Target {
    pub fn new(url: &Url) -> Target {
        let pooled =
            url.username().is_empty() && url.password().is_none() && url.fragment().is_none();
        Target {
            url: url.clone(),
            pool: pooled.then(|| pool::Pool::new(url)).flatten().map(Arc::new),
        }
    }

    /// A target whose idle connections close after `idle_timeout`.
    #[cfg(test)]
    fn with_idle_timeout(url: &Url, idle_timeout: Duration) -> Target {
        let pool = pool::Pool::new(url).expect("an http:// or https:// URL");
        Target {
            pool: Some(Arc::new(pool.with_idle_timeout(idle_timeout))),
            ..Target::new(url)
        }
    }
}

/// rustls for `https://` receivers on the direct path: the webpki roots and the
/// system's, as reqwest's were; any certificate for any name with `tls_insecure`;
/// HTTP/1.1 by ALPN (the pool's connections speak nothing else).
fn receiver_tls(tls_insecure: bool) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = if tls_insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::pg::tls::NoVerify::new(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        builder.with_root_certificates(roots)
    };
    let mut config = builder.with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The first [`HEAD_KEPT`] bytes as text, without a character cut in half; invalid
/// UTF-8 and NUL become U+FFFD.
fn head(body: &[u8]) -> String {
    let mut bytes = &body[..body.len().min(HEAD_KEPT)];
    if bytes.len() < body.len()
        && let Err(e) = std::str::from_utf8(bytes)
    {
        // Only an incomplete sequence at the very end: the cut split a character.
        if e.error_len().is_none() {
            bytes = &bytes[..e.valid_up_to()];
        }
    }
    // PostgreSQL text cannot hold NUL: it would make recording the attempt fail.
    String::from_utf8_lossy(bytes).replace('\0', "\u{fffd}")
}

/// The kind and a short description of a failed request. Never prints the URL.
fn classify(err: &reqwest::Error, timeout: Duration) -> (ErrorKind, String) {
    if err.is_timeout() {
        return (ErrorKind::Timeout, format!("timeout after {timeout:?}"));
    }
    describe(err, kind_of(err), || without_url(err))
}

/// The kind and a short description of `err`, whose kind is `kind` unless a cause
/// says better (a TLS error, a refused connection, a reset, an early close); `text`
/// when no cause has a text of its own. Never prints the URL.
fn describe(
    err: &(dyn std::error::Error + 'static),
    kind: ErrorKind,
    text: impl FnOnce() -> String,
) -> (ErrorKind, String) {
    let mut innermost: Option<String> = None;
    for e in chain(err) {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return (ErrorKind::Tls, short(format!("tls: {tls}")));
        }
        innermost = Some(e.to_string());
    }
    for e in chain(err) {
        let Some(io) = e.downcast_ref::<std::io::Error>() else {
            continue;
        };
        use std::io::ErrorKind as Io;
        let known = match io.kind() {
            Io::ConnectionRefused => Some((ErrorKind::Connect, "connection refused")),
            Io::ConnectionReset => Some((kind, "connection reset")),
            Io::ConnectionAborted => Some((kind, "connection aborted")),
            Io::TimedOut => Some((ErrorKind::Timeout, "timed out")),
            Io::UnexpectedEof => Some((kind, "connection closed early")),
            _ => None,
        };
        if let Some((kind, text)) = known {
            return (kind, text.to_string());
        }
    }
    let text = match innermost {
        Some(inner) => format!("{}: {inner}", kind.as_str()),
        None => text(),
    };
    (kind, short(text))
}

/// The causes of `err`, outermost first. `io::Error::source` skips the error an
/// `io::Error` wraps, so that one is visited explicitly (`err`'s own too).
fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    let mut next = cause(err);
    while let Some(e) = next {
        out.push(e);
        next = cause(e);
        if out.len() > 16 {
            break;
        }
    }
    out
}

/// What `e` wraps: an `io::Error`'s inner error, otherwise its source.
fn cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    match e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
        None => e.source(),
    }
}

fn kind_of(err: &reqwest::Error) -> ErrorKind {
    if err.is_connect() {
        ErrorKind::Connect
    } else if err.is_body() || err.is_decode() {
        ErrorKind::Body
    } else {
        ErrorKind::Other
    }
}

/// The error's own text with the URL removed (receiver URLs may embed tokens).
fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    if let Some(url) = err.url() {
        text = text.replace(url.as_str(), "[url]");
    }
    text
}

fn short(mut text: String) -> String {
    if text.len() > MAX_ERROR_KEPT {
        let mut end = MAX_ERROR_KEPT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

mod pool;

#[cfg(test)]
mod tests;
