//! The webhook receiver of `bench/run`: an HTTP/1.1 keep-alive server on 127.0.0.1 that
//! answers every POST at once with 204 and records its arrival (each event of a JSON
//! array, a walhook batch, as one arrival): a count, arrivals per
//! 100 ms since start, and, when the body has an `occurred_at` (walhook's envelope: the
//! commit time of the source transaction), the commit-to-receiver latency.
//!
//! Usage: `sink PORT [--tls]` (runs until killed; `--tls`: HTTPS with a self-signed
//! certificate for 127.0.0.1, for a subscription with `tls_insecure = true`). Control
//! requests, not counted as arrivals:
//! - `GET /stats`: JSON `{"received", "start_unix", "latency_ms": {"n", "p50", "p95",
//!   "p99", "max"}}`, latencies since the last reset;
//! - `GET /series`: JSON `{"bucket_ms": 100, "counts": [...]}`, arrivals per bucket since start;
//! - `POST /reset`: forget the latency samples (counts and series stay).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Width of one arrival-series bucket.
const BUCKET_MS: u128 = 100;

/// What the receiver has seen, shared by all connections.
struct Record {
    started: Instant,
    start_unix: f64,
    received: AtomicU64,
    /// Arrivals per [`BUCKET_MS`] since `started`.
    series: Mutex<Vec<u64>>,
    /// Commit-to-arrival latencies (ms) since the last reset.
    latencies: Mutex<Vec<f32>>,
}

impl Record {
    fn arrival(&self, occurred_at: Option<SystemTime>) {
        let arrived = SystemTime::now();
        self.received.fetch_add(1, Ordering::Relaxed);
        let bucket = (self.started.elapsed().as_millis() / BUCKET_MS) as usize;
        {
            let mut series = self.series.lock().unwrap();
            if series.len() <= bucket {
                series.resize(bucket + 1, 0);
            }
            series[bucket] += 1;
        }
        if let Some(commit) = occurred_at {
            let ms = arrived
                .duration_since(commit)
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0;
            self.latencies.lock().unwrap().push(ms as f32);
        }
    }

    fn stats(&self) -> serde_json::Value {
        let mut l = self.latencies.lock().unwrap().clone();
        l.sort_by(f32::total_cmp);
        let pct = |p: f64| {
            if l.is_empty() {
                0.0
            } else {
                l[((l.len() as f64 * p) as usize).min(l.len() - 1)] as f64
            }
        };
        serde_json::json!({
            "received": self.received.load(Ordering::Relaxed),
            "start_unix": self.start_unix,
            "latency_ms": {
                "n": l.len(), "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
                "max": l.last().copied().unwrap_or(0.0),
            },
        })
    }
}

/// The events of a body: one per `"occurred_at":"..."` value in a JSON array (a walhook
/// batch), else the body is one event, with the first such value if it has one. Found
/// without parsing the whole body.
fn events(body: &[u8]) -> Vec<Option<SystemTime>> {
    const KEY: &[u8] = b"\"occurred_at\":\"";
    let mut found = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.windows(KEY.len()).position(|w| w == KEY) {
        rest = &rest[at + KEY.len()..];
        let Some(len) = rest.iter().position(|&b| b == b'"') else {
            break;
        };
        let time = std::str::from_utf8(&rest[..len])
            .ok()
            .and_then(|text| chrono::DateTime::parse_from_rfc3339(text).ok())
            .map(SystemTime::from);
        found.push(time);
        if body.first() != Some(&b'[') {
            break;
        }
    }
    if found.is_empty() {
        found.push(None);
    }
    found
}

/// Serves one keep-alive connection until the peer closes it or sends garbage.
async fn serve(socket: impl AsyncRead + AsyncWrite, record: Arc<Record>) {
    let (read, mut write) = tokio::io::split(socket);
    let mut read = BufReader::with_capacity(64 * 1024, read);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut len = 0usize;
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        body.resize(len, 0);
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        let answer = match (method.as_str(), path.as_str()) {
            ("GET", "/stats") => json_response(&record.stats()),
            ("GET", "/series") => {
                let counts = record.series.lock().unwrap().clone();
                json_response(&serde_json::json!({ "bucket_ms": BUCKET_MS, "counts": counts }))
            }
            ("POST", "/reset") => {
                record.latencies.lock().unwrap().clear();
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
            }
            ("POST", _) => {
                for occurred_at in events(&body) {
                    record.arrival(occurred_at);
                }
                b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
            }
            _ => b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n".to_vec(),
        };
        if write.write_all(&answer).await.is_err() {
            return;
        }
    }
}

fn json_response(value: &serde_json::Value) -> Vec<u8> {
    let body = value.to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match args.first().map(|p| p.parse::<u16>()) {
        Some(Ok(port)) if args.len() == 1 || (args.len() == 2 && args[1] == "--tls") => port,
        _ => {
            eprintln!(
                "usage: sink PORT [--tls]  (the receiver of bench/run; see examples/sink.rs)"
            );
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| {
            eprintln!("sink: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        });
    let record = Arc::new(Record {
        started: Instant::now(),
        start_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        received: AtomicU64::new(0),
        series: Mutex::new(Vec::new()),
        latencies: Mutex::new(Vec::new()),
    });
    let tls = (args.len() == 2).then(acceptor);
    eprintln!("sink: listening on 127.0.0.1:{port}");
    loop {
        match listener.accept().await {
            Ok((socket, _)) => {
                let _ = socket.set_nodelay(true);
                let record = record.clone();
                match &tls {
                    None => tokio::spawn(serve(socket, record)),
                    Some(tls) => {
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            if let Ok(socket) = tls.accept(socket).await {
                                serve(socket, record).await;
                            }
                        })
                    }
                };
            }
            Err(e) => eprintln!("sink: accept failed: {e}"),
        }
    }
}

/// TLS with a self-signed certificate for 127.0.0.1 and localhost.
fn acceptor() -> tokio_rustls::TlsAcceptor {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("self-signed certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .expect("certificate and key");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
