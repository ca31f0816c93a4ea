//! `http://` and `https://` receivers reached without a proxy: walhook's own keep-alive
//! pool of hyper HTTP/1.1 client connections (over rustls for `https://`), one pool per
//! [`Target`](super::Target) (so per subscription's dispatcher), taken LIFO and never
//! shared between receivers.
//!
//! Why not `hyper_util`'s `legacy::Client`, which walhook used here before: for every
//! HTTP/1 request it spawns a task that waits for the connection to become idle again
//! and hands it back to its pool, keyed by scheme and authority under a lock. Here the
//! connection goes back inline once the answer's body has been read to its end. On the
//! 2-core development machine, 300,000 POSTs of 400 bytes, 64 at a time, into
//! `examples/sink`: legacy client 9.4-9.7 µs of CPU per POST, hyper's connections
//! driven directly 6.7-6.9 µs.
//!
//! HTTPS went through reqwest until this pool carried it too. Same machine, 1M
//! pending events dispatched into `examples/sink --tls` (`bench/ingest-loop dispatch`
//! with `SINK_TLS=1`), 64 in flight, alternated: reqwest 29.4/30.6/30.5 µs of walhook
//! CPU per event (38.8k/37.9k/38.2k events/s), this pool 18.4/19.6 µs (54.5k/51.1k);
//! plain HTTP over the pool 16.7-16.9. TLS is rustls with the webpki and the system's
//! roots, as reqwest's was; ALPN offers HTTP/1.1 only (reqwest offered HTTP/2 too), so
//! an HTTPS receiver gets up to `max_in_flight` kept connections, as a plain-HTTP one
//! always did.
//!
//! What the legacy client did that is kept: TCP nodelay, TCP keep-alive probes after
//! 60 s, idle connections closed after 90 s, a request that a pooled connection gives
//! back unsent (the receiver closed it meanwhile) goes out on another one, and the Host
//! header (the URL's host, and its port when not the scheme's default).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use reqwest::header::{self, HeaderMap, HeaderValue};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use url::{Host, Url};

use super::{AnswerHead, Attempt, MAX_BODY_READ, describe, failed, keep, short};
use crate::delivery::policy::ErrorKind;

/// An idle connection is closed after this long unused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// TCP keep-alive probes start after this long without traffic.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

type Sender = SendRequest<Full<Bytes>>;

/// A receiver and its idle connections.
#[derive(Debug)]
pub(super) struct Pool {
    /// The request target in origin form: path and query.
    path: hyper::Uri,
    /// The `Host` header.
    host: HeaderValue,
    /// The host to connect to: a name to resolve, or an address (IPv6 without brackets).
    host_name: String,
    port: u16,
    /// The name the certificate must be for, for an `https://` receiver; `None` for
    /// plain HTTP.
    tls: Option<ServerName<'static>>,
    /// Most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// [`IDLE_TIMEOUT`], shorter in tests.
    idle_timeout: Duration,
    /// Whether the task closing idle connections runs.
    sweeping: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// Why a request got no answer.
type Failure = (ErrorKind, String);

impl Pool {
    /// The receiver at `url` (`http://` or `https://`, without credentials or a
    /// fragment), or `None` when its parts cannot make a request.
    pub(super) fn new(url: &Url) -> Option<Pool> {
        let port = url.port_or_known_default()?;
        let host_name = match url.host()? {
            Host::Domain(d) => d.to_string(),
            Host::Ipv4(ip) => ip.to_string(),
            Host::Ipv6(ip) => ip.to_string(),
        };
        // `Url` leaves the scheme's default port out.
        let authority = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str()?),
            None => url.host_str()?.to_string(),
        };
        let path = match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_string(),
        };
        let tls = match url.scheme() {
            "http" => None,
            "https" => Some(ServerName::try_from(host_name.clone()).ok()?),
            _ => return None,
        };
        Some(Pool {
            path: hyper::Uri::try_from(path).ok()?,
            host: HeaderValue::from_str(&authority).ok()?,
            host_name,
            port,
            tls,
            idle: Mutex::new(Vec::new()),
            idle_timeout: IDLE_TIMEOUT,
            sweeping: AtomicBool::new(false),
        })
    }

    /// Closes idle connections after `idle_timeout` instead of [`IDLE_TIMEOUT`].
    #[cfg(test)]
    pub(super) fn with_idle_timeout(self, idle_timeout: Duration) -> Pool {
        Pool {
            idle_timeout,
            ..self
        }
    }

    /// [`super::HttpClient::post`] to this receiver: the same attempt, the same limits
    /// (`timeout` over the whole exchange, connecting included; at most
    /// [`MAX_BODY_READ`] body bytes) and the same error kinds and texts. `tls` is the
    /// client's TLS setup, for an `https://` receiver.
    pub(super) async fn post(
        self: &Arc<Pool>,
        tls: &Arc<ClientConfig>,
        mut headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
        start: Instant,
    ) -> Attempt {
        headers.insert(header::HOST, self.host.clone());
        let mut request = hyper::Request::new(Full::new(body));
        *request.method_mut() = hyper::Method::POST;
        *request.uri_mut() = self.path.clone();
        *request.headers_mut() = headers;
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || format!("timeout after {timeout:?}");
        let (response, sender) =
            match tokio::time::timeout_at(deadline, self.send(tls, request)).await {
                Err(_) => return failed(ErrorKind::Timeout, timed_out(), start),
                Ok(Err((kind, error))) => return failed(kind, error, start),
                Ok(Ok(sent)) => sent,
            };
        let (parts, mut incoming) = response.into_parts();
        let answer = AnswerHead::of(parts.status, &parts.headers);
        let mut buf = Vec::new();
        let mut error = None;
        let mut ended = false;
        while buf.len() < MAX_BODY_READ {
            match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Err(_) => {
                    error = Some(format!("reading body: {}", timed_out()));
                    break;
                }
                Ok(None) => {
                    ended = true;
                    break;
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(chunk) = frame.into_data() {
                        keep(&mut buf, &chunk);
                    }
                }
                Ok(Some(Err(err))) => {
                    let (_, e) = describe(&err, ErrorKind::Body, || err.to_string());
                    error = Some(format!("reading body: {e}"));
                    break;
                }
            }
        }
        // Only a connection whose answer was read to its end can carry another request;
        // one cut off, failed or timed out is closed by dropping it.
        if ended {
            self.put_back(sender);
        }
        answer.attempt(&buf, error, start)
    }

    /// Sends `request` on an idle connection, or a new one when none is left, and
    /// returns the answer's head with the connection it came on.
    async fn send(
        &self,
        tls: &Arc<ClientConfig>,
        mut request: hyper::Request<Full<Bytes>>,
    ) -> Result<(hyper::Response<hyper::body::Incoming>, Sender), Failure> {
        while let Some(mut sender) = self.take_idle() {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection closed meanwhile; try another.
                    Some(unsent) => request = unsent,
                    None => return Err(request_failure(&e.into_error())),
                },
            }
        }
        // Boxed: the TLS handshake's state is kilobytes, and an attempt, whose future
        // is moved into a task of its own, rarely connects.
        let mut sender = Box::pin(self.connect(tls)).await?;
        match sender.send_request(request).await {
            Ok(response) => Ok((response, sender)),
            Err(e) => Err(request_failure(&e)),
        }
    }

    /// The most recently used idle connection that is still open and not timed out.
    fn take_idle(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("idle connections lock");
        while let Some(Idle { sender, since }) = idle.pop() {
            if since.elapsed() >= self.idle_timeout {
                // The rest are older still.
                idle.clear();
                return None;
            }
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    fn put_back(self: &Arc<Pool>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        self.idle.lock().expect("idle connections lock").push(Idle {
            sender,
            since: Instant::now(),
        });
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// A new connection: resolves the host (an address resolves to itself, without
    /// asking DNS), connects to its addresses in turn, shakes hands over TLS for an
    /// `https://` receiver, and starts the connection's task.
    async fn connect(&self, tls: &Arc<ClientConfig>) -> Result<Sender, Failure> {
        let addrs = tokio::net::lookup_host((self.host_name.as_str(), self.port))
            .await
            .map_err(|e| {
                (
                    ErrorKind::Connect,
                    short(format!("connect: dns error: {e}")),
                )
            })?;
        let mut failure = (ErrorKind::Connect, "no address to connect to".to_string());
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(stream) => {
                    set_options(&stream);
                    let Some(name) = &self.tls else {
                        return start_connection(stream).await;
                    };
                    let stream = TlsConnector::from(tls.clone())
                        .connect(name.clone(), stream)
                        .await
                        .map_err(|e| {
                            // What rustls refused (`tls: invalid peer certificate:
                            // UnknownIssuer`), or the connection's own failure.
                            describe(&e, ErrorKind::Connect, || short(format!("connect: {e}")))
                        })?;
                    return start_connection(stream).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    failure = (ErrorKind::Connect, "connection refused".to_string());
                }
                Err(e) => failure = (ErrorKind::Connect, short(format!("connect: {e}"))),
            }
        }
        Err(failure)
    }
}

/// walhook's socket settings: no Nagle delay, keep-alive probes. Best effort, as in
/// reqwest's connector: a socket that refuses these still works.
fn set_options(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// HTTP/1.1 over `stream`; the connection's task runs until the connection closes or
/// its last [`Sender`] is dropped.
async fn start_connection<S>(stream: S) -> Result<Sender, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| request_failure(&e))?;
    // A failure of the connection reaches the request on it.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

fn request_failure(err: &hyper::Error) -> Failure {
    describe(err, ErrorKind::Other, || short(err.to_string()))
}

/// Closes connections idle for the receiver's idle timeout, until its [`Pool`] is gone.
async fn sweep(pool: Weak<Pool>) {
    loop {
        let Some(every) = pool.upgrade().map(|p| p.idle_timeout / 3) else {
            return;
        };
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let timeout = pool.idle_timeout;
        pool.idle
            .lock()
            .expect("idle connections lock")
            .retain(|i| i.since.elapsed() < timeout && !i.sender.is_closed());
    }
}
