//! A misbehaving webhook receiver for the chaos test: a real HTTP/1.1 server on
//! 127.0.0.1 that, when flaky, answers at random 500, 503 with `Retry-After`, never
//! (until the client gives up), or resets the connection; it can also go down and come
//! back on the same port. It records every request with the moment it arrived and,
//! for a 2xx, the moment the answer started to go out, which is what the order check
//! (G5) and the at-least-once check (G4) read.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How the receiver answered one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok,
    ServerError,
    /// 503 with `Retry-After: 1`.
    Busy,
    /// No answer: the connection stays open until the client closes it.
    Hang,
    /// The connection reset (RST) instead of an answer.
    Reset,
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Request {
    /// `webhook-id`: the event id.
    pub webhook_id: String,
    pub entity: String,
    pub entity_id: String,
    pub revision: i64,
    pub arrived: Instant,
    pub answer: Answer,
    /// For a 2xx written completely: when it started to go out.
    pub answered_ok: Option<Instant>,
}

struct Shared {
    requests: Mutex<Vec<Request>>,
    flaky: AtomicBool,
    rng: AtomicU64,
}

/// A running (or stopped) chaos receiver.
pub struct ChaosReceiver {
    /// `http://127.0.0.1:PORT/hook`.
    pub url: String,
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Mutex<Option<CancellationToken>>,
}

impl ChaosReceiver {
    /// Starts a receiver that answers 200 until [`ChaosReceiver::set_flaky`].
    pub async fn start(seed: u64) -> ChaosReceiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            flaky: AtomicBool::new(false),
            rng: AtomicU64::new(seed.max(1)),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), stop.clone()));
        ChaosReceiver {
            url: format!("http://{addr}/hook"),
            addr,
            shared,
            running: Mutex::new(Some(stop)),
        }
    }

    /// Flaky: answers at random (about 55 % 200); otherwise always 200.
    pub fn set_flaky(&self, flaky: bool) {
        self.shared.flaky.store(flaky, Ordering::Relaxed);
    }

    /// Whether it listens.
    pub fn is_up(&self) -> bool {
        self.running.lock().unwrap().is_some()
    }

    /// Stops listening and closes every connection: the port refuses connections.
    pub fn go_down(&self) {
        if let Some(stop) = self.running.lock().unwrap().take() {
            stop.cancel();
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&self) {
        if self.is_up() {
            return;
        }
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("bind receiver again on {}: {e}", self.addr));
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, self.shared.clone(), stop.clone()));
        *self.running.lock().unwrap() = Some(stop);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// The event ids answered 2xx at least once.
    pub fn delivered_ids(&self) -> HashSet<String> {
        self.shared
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.answered_ok.is_some())
            .map(|r| r.webhook_id.clone())
            .collect()
    }

    /// G5 with `ordering = "entity"`: every request for revision n+1 of an entity
    /// arrived after a 2xx for revision n had started to go out. Returns the first few
    /// violations.
    pub fn order_violations(&self) -> Vec<String> {
        let requests = self.requests();
        let mut ok_at: HashMap<(&str, &str, i64), Instant> = HashMap::new();
        for r in &requests {
            if let Some(at) = r.answered_ok {
                let first = ok_at
                    .entry((r.entity.as_str(), r.entity_id.as_str(), r.revision))
                    .or_insert(at);
                *first = (*first).min(at);
            }
        }
        let mut violations = Vec::new();
        for r in &requests {
            if r.revision <= 1 {
                continue;
            }
            let previous = ok_at.get(&(r.entity.as_str(), r.entity_id.as_str(), r.revision - 1));
            if previous.is_none_or(|at| *at > r.arrived) {
                violations.push(format!(
                    "{}:{} revision {} arrived before revision {} was answered 2xx",
                    r.entity,
                    r.entity_id,
                    r.revision,
                    r.revision - 1
                ));
                if violations.len() >= 5 {
                    break;
                }
            }
        }
        violations
    }
}

impl Drop for ChaosReceiver {
    fn drop(&mut self) {
        self.go_down();
    }
}

fn next_answer(shared: &Shared) -> Answer {
    if !shared.flaky.load(Ordering::Relaxed) {
        return Answer::Ok;
    }
    // xorshift64 on an atomic: only the distribution matters here, not the sequence.
    let mut x = shared.rng.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    shared.rng.store(x, Ordering::Relaxed);
    match x % 100 {
        0..55 => Answer::Ok,
        55..70 => Answer::ServerError,
        70..82 => Answer::Busy,
        82..90 => Answer::Hang,
        _ => Answer::Reset,
    }
}

/// Accepts connections until `stop`; each connection also ends at `stop`.
async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let socket = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(_) => return,
            },
        };
        let _ = socket.set_nodelay(true);
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection(socket, &shared) => {}
            }
        });
    }
}

/// Serves keep-alive requests on one connection until it closes.
async fn connection(socket: TcpStream, shared: &Shared) {
    let mut stream = BufReader::new(socket);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if stream.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let arrived = Instant::now();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let answer = next_answer(shared);
        let index = {
            let mut requests = shared.requests.lock().unwrap();
            requests.push(Request {
                webhook_id: headers.get("webhook-id").cloned().unwrap_or_default(),
                entity: json["entity"].as_str().unwrap_or_default().to_owned(),
                entity_id: json["entity_id"].as_str().unwrap_or_default().to_owned(),
                revision: json["revision"].as_i64().unwrap_or(0),
                arrived,
                answer,
                answered_ok: None,
            });
            requests.len() - 1
        };
        let head = match answer {
            Answer::Ok => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            Answer::ServerError => "HTTP/1.1 500 X\r\ncontent-length: 2\r\n\r\nno",
            Answer::Busy => "HTTP/1.1 503 X\r\nretry-after: 1\r\ncontent-length: 2\r\n\r\nno",
            Answer::Hang => {
                // Until the client gives up (its timeout) and closes the connection.
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
                return;
            }
            Answer::Reset => {
                let _ = stream.get_ref().set_zero_linger();
                return;
            }
        };
        let sending = Instant::now();
        if stream.write_all(head.as_bytes()).await.is_err() || stream.flush().await.is_err() {
            return;
        }
        if answer == Answer::Ok {
            shared.requests.lock().unwrap()[index].answered_ok = Some(sending);
        }
    }
}
