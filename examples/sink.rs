//! A webhook sink for `bench/deliver.sh`: an HTTP/1.1 server on 127.0.0.1 that answers
//! 200 at once and measures, per request, the time from the event's commit
//! (`occurred_at` in the body) to its arrival. Prints a summary line every second and
//! the final figures after N requests.
//!
//! Usage: cargo run --release --example sink -- PORT N (stops after N requests, or 5 s
//! after the last one)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(18080);
    let total: usize = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    // First and last arrival.
    let span: Arc<Mutex<Option<(Instant, Instant)>>> = Arc::new(Mutex::new(None));
    let (l, f) = (latencies.clone(), span.clone());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (l, f) = (l.clone(), f.clone());
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut read = BufReader::new(read);
                loop {
                    let mut line = String::new();
                    if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if read.read_line(&mut h).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if read.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let arrived = SystemTime::now();
                    if write
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let occurred = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v["occurred_at"].as_str().map(str::to_owned))
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok());
                    if let Some(t) = occurred {
                        let commit = SystemTime::from(t);
                        let ms = arrived
                            .duration_since(commit)
                            .unwrap_or_default()
                            .as_secs_f64()
                            * 1000.0;
                        let now = Instant::now();
                        f.lock().unwrap().get_or_insert((now, now)).1 = now;
                        l.lock().unwrap().push(ms);
                    }
                }
            });
        }
    });
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n = latencies.lock().unwrap().len();
        eprintln!("sink: {n} received");
        // Done at N, or when nothing arrived for 5 s (the load made fewer changes).
        let idle = span
            .lock()
            .unwrap()
            .is_some_and(|(_, last)| last.elapsed() > Duration::from_secs(5));
        if n >= total || idle {
            break;
        }
    }
    let elapsed = span
        .lock()
        .unwrap()
        .map(|(first, last)| (last - first).as_secs_f64().max(0.001))
        .unwrap_or(1.0);
    let mut l = latencies.lock().unwrap().clone();
    l.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    println!(
        "received {} in {:.2} s = {:.0}/s; commit-to-receiver latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.len(),
        elapsed,
        l.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        l[l.len() - 1]
    );
}
