//! Outbound proxies are explicit: without `[delivery] proxy` the daemon ignores
//! `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` in its environment and posts straight to
//! the receiver; with it, every webhook goes through that proxy (absolute-form request
//! line, `Proxy-Authorization` from the URL's credentials, never logged).

use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{WAIT, subscription};
use crate::support::daemon::{Workdir, users_config, wait_leading};
use crate::support::pg::users_db;
use crate::support::receiver::Receiver;
use crate::support::wait_for;

/// One request as the proxy saw it.
#[derive(Debug, Clone)]
struct Proxied {
    /// e.g. `POST http://receiver.invalid/hook HTTP/1.1`.
    request_line: String,
    /// The `Proxy-Authorization` header, if any.
    authorization: Option<String>,
}

/// A minimal HTTP proxy on `127.0.0.1:0` that forwards nothing: it records each
/// request and answers `200` itself, on keep-alive connections.
struct RecordingProxy {
    url: String,
    seen: Arc<Mutex<Vec<Proxied>>>,
}

impl RecordingProxy {
    async fn start() -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, record.clone()));
            }
        });
        RecordingProxy { url, seen }
    }

    fn seen(&self) -> Vec<Proxied> {
        self.seen.lock().unwrap().clone()
    }
}

/// Answers every request on `sock` with `200`, recording it, until the client closes.
async fn serve(mut sock: TcpStream, seen: Arc<Mutex<Vec<Proxied>>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let mut length = 0;
        let mut authorization = None;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "proxy-authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
        }
        while buf.len() < head_end + length {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        seen.lock().unwrap().push(Proxied {
            request_line,
            authorization,
        });
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        if sock.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// The proxy variables reqwest would read, all pointing at `url`, and `NO_PROXY`
/// removed; plus the test log level.
fn proxy_env(url: &str) -> Vec<(&'static str, Option<&str>)> {
    let mut env = vec![("WALHOOK_LOG", Some("info,walhook=debug"))];
    for name in [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        env.push((name, Some(url)));
    }
    env.push(("NO_PROXY", None));
    env.push(("no_proxy", None));
    env
}

#[tokio::test]
async fn proxy_variables_in_the_environment_are_ignored_without_delivery_proxy() {
    let db = users_db().await;
    let receiver = Receiver::start(|_| 200).await;
    // A live proxy, so that a webhook sent to it would be answered 200 and lost to the
    // receiver: the test fails on the receiver's count, and shows the proxy's.
    let proxy = RecordingProxy::start().await;
    let work = Workdir::new(&users_config(
        &db,
        &subscription("crm", &receiver.url, "[\"user.*\"]"),
    ));
    let mut daemon = work.spawn_run_env(0, &proxy_env(&proxy.url));
    wait_leading(&db, &mut daemon).await;
    for i in 0..3 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    wait_for(
        "3 webhooks at the receiver, straight past HTTP(S)_PROXY",
        WAIT,
        || async { receiver.received().len() >= 3 },
    )
    .await;
    assert_eq!(receiver.received().len(), 3);
    assert!(
        proxy.seen().is_empty(),
        "the environment's proxy got {:?}",
        proxy.seen()
    );
    assert!(
        !daemon.log().contains("configured proxy"),
        "{}",
        daemon.log()
    );
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}

#[tokio::test]
async fn delivery_proxy_carries_every_webhook_with_its_credentials_unlogged() {
    let db = users_db().await;
    let proxy = RecordingProxy::start().await;
    let with_credentials = proxy.url.replace("http://", "http://walhook:pr0xy-pass@");
    // The receiver's host does not resolve: only the proxy can deliver to it.
    let work = Workdir::new(&users_config(
        &db,
        &format!(
            "[delivery]\nproxy = \"{with_credentials}\"\n{}",
            subscription("crm", "http://receiver.invalid/hook", "[\"user.*\"]")
        ),
    ));
    let mut daemon = work.spawn_run(0);
    wait_leading(&db, &mut daemon).await;
    for i in 0..3 {
        db.batch(&format!("INSERT INTO users VALUES ({i}, 'u{i}@x', 0)"))
            .await;
    }
    let client = db.client().await;
    wait_for("3 deliveries delivered through the proxy", WAIT, || async {
        client
            .query_one(
                "SELECT count(*) FROM walhook.deliveries WHERE status = 'delivered'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 3)
            .unwrap_or(false)
    })
    .await;
    let seen = proxy.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("walhook:pr0xy-pass")
    );
    for request in &seen {
        assert_eq!(
            request.request_line, "POST http://receiver.invalid/hook HTTP/1.1",
            "absolute form, as a proxy gets it"
        );
        assert_eq!(request.authorization.as_deref(), Some(basic.as_str()));
    }
    let log = daemon.log();
    let port = proxy.url.rsplit(':').next().unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("configured proxy") && l.contains(port)),
        "the proxy is logged at start, without credentials:\n{log}"
    );
    assert!(!log.contains("pr0xy-pass"), "a proxy password was logged");
    daemon.signal(libc::SIGTERM);
    assert!(daemon.wait_exit(WAIT).success(), "{}", daemon.log());
}
