//! A webhook receiver for tests: a real HTTP/1.1 server on 127.0.0.1:0 (keep-alive,
//! optionally over TLS with a self-signed certificate) that records every request and
//! answers what the test chooses per request: a status, extra headers, a body, a delay,
//! or no answer at all. It can be stopped (its port then refuses connections) and
//! started again on the same port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
    /// The status the receiver answered (or would have: see [`Reply::hang`]).
    pub status: u16,
    /// When the request (head and body) had arrived.
    pub at: Instant,
    /// The same moment on the wall clock (to compare with stored timestamps).
    pub wall: SystemTime,
    /// When the answer began to be written; `None` while not answered, or when writing
    /// it failed (the client never got it). Set before the first byte goes out, so a
    /// request the client sends because of this answer always arrives after it.
    pub answered_at: Option<Instant>,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("receiver got JSON")
    }
}

/// What the receiver answers to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// Extra response headers (`content-length` is added).
    pub headers: Vec<(String, String)>,
    /// The response body.
    pub body: Arc<Vec<u8>>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Never answer (the connection stays open until the client closes it).
    pub hang: bool,
}

impl Reply {
    /// `status` with the body `ok`, at once.
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Arc::new(b"ok".to_vec()),
            delay: Duration::ZERO,
            hang: false,
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: Arc<Vec<u8>>) -> Reply {
        self.body = body;
        self
    }

    /// Answers after `delay`.
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    /// Never answers.
    pub fn hang(mut self) -> Reply {
        self.hang = true;
        self
    }
}

type Answer = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

struct Shared {
    got: Mutex<Vec<Received>>,
    answered: Mutex<usize>,
    answer: Answer,
    tls: Option<TlsAcceptor>,
}

/// A running receiver.
pub struct Receiver {
    /// `http://127.0.0.1:PORT/hook` (`https://` with TLS).
    pub url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    running: Mutex<Option<CancellationToken>>,
}

impl Receiver {
    /// Starts a receiver answering each request with status `answer(request)`.
    pub async fn start(answer: impl Fn(&Received) -> u16 + Send + Sync + 'static) -> Receiver {
        Receiver::start_with(move |r| Reply::status(answer(r))).await
    }

    /// Starts a receiver answering each request with `answer(request)`.
    pub async fn start_with(
        answer: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> Receiver {
        Receiver::launch(Arc::new(answer), None).await
    }

    /// Starts an HTTPS receiver whose certificate (for `localhost` and 127.0.0.1) is
    /// self-signed, so a client that checks certificates refuses it.
    pub async fn start_tls(answer: impl Fn(&Received) -> u16 + Send + Sync + 'static) -> Receiver {
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("self-signed certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server certificate");
        let mut config = config;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        Receiver::launch(
            Arc::new(move |r: &Received| Reply::status(answer(r))),
            Some(acceptor),
        )
        .await
    }

    async fn launch(answer: Answer, tls: Option<TlsAcceptor>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let url = match tls {
            Some(_) => format!("https://{addr}/hook"),
            None => format!("http://{addr}/hook"),
        };
        let shared = Arc::new(Shared {
            got: Mutex::new(Vec::new()),
            answered: Mutex::new(0),
            answer,
            tls,
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), stop.clone()));
        Receiver {
            url,
            addr,
            shared,
            running: Mutex::new(Some(stop)),
        }
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.got.lock().unwrap().clone()
    }

    /// How many requests arrived so far (cheaper than `received().len()`).
    pub fn count(&self) -> usize {
        self.shared.got.lock().unwrap().len()
    }

    /// How many answers were written completely.
    pub fn answered(&self) -> usize {
        *self.shared.answered.lock().unwrap()
    }

    /// Stops listening and closes every open connection: the port refuses connections.
    pub fn stop(&self) {
        if let Some(stop) = self.running.lock().unwrap().take() {
            stop.cancel();
        }
    }

    /// Listens again on the same port after [`Receiver::stop`].
    pub async fn restart(&self) {
        assert!(
            self.running.lock().unwrap().is_none(),
            "receiver restarted while running"
        );
        let listener = TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("bind receiver again on {}: {e}", self.addr));
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, self.shared.clone(), stop.clone()));
        *self.running.lock().unwrap() = Some(stop);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
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
        // Answers go out in one write, but without this a reply after a delay can still
        // wait for a delayed ACK (Nagle), adding ~40 ms per request.
        let _ = socket.set_nodelay(true);
        let (shared, stop) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            let conn = async {
                match &shared.tls {
                    Some(acceptor) => {
                        // A client that refuses the certificate ends the handshake here.
                        if let Ok(tls) = acceptor.accept(socket).await {
                            connection(tls, &shared).await;
                        }
                    }
                    None => connection(socket, &shared).await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

/// Serves keep-alive requests on one connection until it closes.
async fn connection<S: AsyncRead + AsyncWrite>(stream: S, shared: &Shared) {
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if read.read_line(&mut h).await.unwrap_or(0) == 0 {
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
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut req = Received {
            headers,
            body,
            status: 0,
            at: Instant::now(),
            wall: SystemTime::now(),
            answered_at: None,
        };
        let reply = (shared.answer)(&req);
        req.status = reply.status;
        let index = {
            let mut got = shared.got.lock().unwrap();
            got.push(req);
            got.len() - 1
        };
        if reply.hang {
            std::future::pending::<()>().await;
        }
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", reply.body.len()));
        let mut out = head.into_bytes();
        out.extend_from_slice(&reply.body);
        shared.got.lock().unwrap()[index].answered_at = Some(Instant::now());
        if write.write_all(&out).await.is_err() || write.flush().await.is_err() {
            shared.got.lock().unwrap()[index].answered_at = None;
            return;
        }
        *shared.answered.lock().unwrap() += 1;
    }
}
