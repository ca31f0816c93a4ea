//! `bench/run --smoke` with the binaries of this build: every stage of the benchmark runs
//! (tiny sizes, no peers) and results.json holds every figure as a positive number.
//! Nothing here is timed; the figures of a smoke run mean nothing.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::walhook_bin;

/// Every figure `bench/run` measures without `--peers`.
const FIGURES: &[&str] = &[
    "http.rps",
    "write_single.changes_per_s",
    "write_batch.changes_per_s",
    "backlog.changes",
    "backlog.write_changes_per_s",
    "recvlogical.changes_per_s",
    "tail.lines",
    "tail.changes_per_s",
    "ingest.events",
    "ingest.events_per_s",
    "ingest.cpu_us_per_event",
    "dispatch.events_per_s",
    "dispatch.cpu_us_per_event",
    "dispatch_batched.events_per_s",
    "dispatch_batched.cpu_us_per_event",
    "dispatch_tls.events_per_s",
    "dispatch_tls.cpu_us_per_event",
    "ingest_dispatch.peak_rss_mib",
    "e2e.events_per_s",
    "e2e.cpu_us_per_event",
    "e2e.peak_rss_mib",
    "latency_single.changes_per_s",
    "latency_single.samples",
    "latency_single.p50_ms",
    "latency_single.p95_ms",
    "latency_single.p99_ms",
    "latency_batch.changes_per_s",
    "latency_batch.samples",
    "latency_batch.p50_ms",
    "latency_batch.p95_ms",
    "latency_batch.p99_ms",
    "peak_rss_mib",
];

/// The ratios `bench/run` always reports a value for (the peer ratios need `--peers`).
const RATIOS: &[&str] = &[
    "ingest_vs_recvlogical",
    "tail_vs_recvlogical",
    "p99_at_1k",
    "p99_at_5k",
    "cpu_per_event",
    "peak_rss",
];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn bench_run_smoke_reports_every_figure() {
    let walhook = walhook_bin();
    let sink = walhook.parent().unwrap().join("examples").join("sink");
    assert!(
        sink.exists(),
        "{} is not built; a plain `cargo test` builds the examples (or: cargo build --example sink)",
        sink.display()
    );
    let out = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/run");
    let mut child = Command::new(&script)
        // Batches too: the sink counts each event of an array, or the run would stall.
        .args(["--smoke", "--batch-size", "10", "--out"])
        .arg(out.path())
        .env("WALHOOK", &walhook)
        .env("SINK", &sink)
        .env("BENCH_PORT", free_port().to_string())
        .env("SINK_PORT", free_port().to_string())
        .env("TLS_PORT", free_port().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bench/run");
    let deadline = Instant::now() + Duration::from_secs(600);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("timed out after 600 s waiting for bench/run --smoke to finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "bench/run --smoke failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let text = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    let results: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in FIGURES {
        let value = results["metrics"][key].as_f64();
        assert!(
            value.is_some_and(|v| v > 0.0),
            "results.json metrics.{key} is {value:?}, not a positive number:\n{text}"
        );
    }
    for key in RATIOS {
        let value = results["ratios"][key]["value"].as_f64();
        assert!(
            value.is_some_and(|v| v > 0.0),
            "results.json ratios.{key} is {value:?}, not a positive number"
        );
    }
    assert_eq!(
        results["metrics"]["ingest.events"], results["metrics"]["tail.lines"],
        "walhook tail and walhook run saw different numbers of changes"
    );
    assert_eq!(
        results["config"]["batch_size"].as_f64(),
        Some(10.0),
        "{text}"
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("| dispatch alone, batch_size = 10:")
            && table.contains("| dispatch alone, batch_size = 100: the same ")
            && table.contains("| end to end from the backlog, batch_size = 10:"),
        "{table}"
    );
    assert!(out.path().join("chart.svg").exists());
}
