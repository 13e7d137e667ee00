//! Server figures (a measurement command, not a test): submissions/s with 1 and 32
//! keep-alive clients on the durable store, jobs/s for batch submits, submit → idle-agent
//! lease latency p50/p99, status-query latency p50, and RSS per queued job at 10^6 jobs.
//!
//! Run: `cargo bench -p qgjob-http --bench load` (add `-- --quick` for small counts,
//! `-- --no-rss` to skip the 10^6-job memory figure). The server runs in-process on
//! 127.0.0.1:0 with its own 2-thread runtime; clients are blocking ureq agents, one
//! connection each. Counts are fixed, so every run is bounded.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Client, TestServer};
use qgjob_http::{ServerOptions, StoreKind, Synchronous};
use serde_json::{json, Value};

fn opts(dir: &std::path::Path, sync: Synchronous) -> ServerOptions {
    ServerOptions {
        store: StoreKind::Sqlite,
        data_dir: Some(dir.to_path_buf()),
        synchronous: sync,
        ..ServerOptions::default()
    }
}

fn spec(i: usize, c: usize) -> Value {
    json!({"org_id": "bench", "app_version_id": format!("v{}", i % 8),
           "tests": [format!("tests/c{c}/t{i}.spec.js")]})
}

/// Single submissions from `clients` threads, `per` each; returns submissions/s.
fn submissions(base: &str, clients: usize, per: usize) -> f64 {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (base, barrier) = (base.to_string(), barrier.clone());
            std::thread::spawn(move || {
                let cl = Client::new(&base, None);
                // Warm the connection before the clock starts.
                cl.get("/healthz");
                barrier.wait();
                for i in 0..per {
                    let (st, v) = cl.post("/v1/jobs", &spec(i, c));
                    assert_eq!(st, 201, "{v}");
                }
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    (clients * per) as f64 / t0.elapsed().as_secs_f64()
}

/// Batch submissions (`POST /v1/runs`) of `batch` jobs, `runs` per client; returns jobs/s.
fn batches(base: &str, clients: usize, runs: usize, batch: usize) -> f64 {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (base, barrier) = (base.to_string(), barrier.clone());
            std::thread::spawn(move || {
                let cl = Client::new(&base, None);
                let bodies: Vec<Value> = (0..runs)
                    .map(|r| {
                        json!({"jobs": (0..batch).map(|i| spec(r * batch + i, c)).collect::<Vec<_>>()})
                    })
                    .collect();
                barrier.wait();
                for b in &bodies {
                    let (st, v) = cl.post("/v1/runs", b);
                    assert_eq!(st, 201, "{v}");
                }
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    (clients * runs * batch) as f64 / t0.elapsed().as_secs_f64()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Submit → lease latency seen by an idle long-polling agent, in ms (sorted samples).
fn dispatch(base: &str, samples: usize) -> Vec<f64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (got_tx, got_rx) = std::sync::mpsc::channel::<Instant>();
    let b = base.to_string();
    let agent = std::thread::spawn(move || {
        let cl = Client::new(&b, None);
        let (st, _) = cl.post(
            "/v1/agent/devices",
            &json!({"id": "bench-dev", "target": "emulator"}),
        );
        assert_eq!(st, 200);
        for _ in 0..samples {
            ready_tx.send(()).unwrap();
            let (st, l) = cl.post(
                "/v1/agent/lease",
                &json!({"device_id": "bench-dev", "max_batch": 1, "wait_ms": 30000}),
            );
            let at = Instant::now();
            assert_eq!(st, 200, "{l}");
            got_tx.send(at).unwrap();
            let (lid, jid) = (
                l["id"].as_u64().unwrap(),
                l["jobs"][0]["id"].as_str().unwrap().to_string(),
            );
            let (st, _) = cl.post(
                &format!("/v1/agent/leases/{lid}/jobs/{jid}/complete"),
                &json!({"passed": true}),
            );
            assert_eq!(st, 200);
        }
    });
    let cl = Client::new(base, None);
    let mut lat = Vec::with_capacity(samples);
    for i in 0..samples {
        ready_rx.recv().unwrap();
        // Let the agent's request reach the server and start waiting.
        std::thread::sleep(Duration::from_millis(3));
        let t0 = Instant::now();
        let (st, _) = cl.post(
            "/v1/jobs",
            &json!({"org_id": "bench", "app_version_id": "dispatch",
                                                  "tests": [format!("d{i}.spec.js")]}),
        );
        assert_eq!(st, 201);
        let at = got_rx.recv().unwrap();
        lat.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
    }
    agent.join().unwrap();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat
}

/// `GET /v1/jobs/{id}` latency in ms (sorted samples).
fn status_queries(base: &str, samples: usize) -> Vec<f64> {
    let cl = Client::new(base, None);
    let (_, v) = cl.post("/v1/jobs", &spec(0, 999));
    let id = v["job_id"].as_str().unwrap().to_string();
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        let (st, _) = cl.get(&format!("/v1/jobs/{id}"));
        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(st, 200);
    }
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    lat
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let rss = !args.iter().any(|a| a == "--no-rss");
    let scale = if quick { 10 } else { 1 };
    let mut out = serde_json::Map::new();

    for (name, sync) in [("normal", Synchronous::Normal), ("full", Synchronous::Full)] {
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start(opts(dir.path(), sync));
        let one = submissions(&s.base, 1, 3000 / scale);
        let many = submissions(&s.base, 32, 20_000 / 32 / scale);
        println!("submit/s [{name}]: 1 client {one:.0}, 32 clients {many:.0}");
        out.insert(format!("submit_per_s_1_{name}"), json!(one.round()));
        out.insert(format!("submit_per_s_32_{name}"), json!(many.round()));
        if sync == Synchronous::Normal {
            let b = batches(&s.base, 2, 50 / scale, 1000);
            println!("batch jobs/s [{name}]: {b:.0} (runs of 1000, 2 clients)");
            out.insert("batch_jobs_per_s".into(), json!(b.round()));
        }
        s.stop().unwrap();
    }

    {
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start(opts(dir.path(), Synchronous::Normal));
        let d = dispatch(&s.base, 500 / scale);
        let q = status_queries(&s.base, 3000 / scale);
        println!(
            "dispatch submit→lease ms: p50 {:.3}, p99 {:.3}, max {:.3} ({} samples)",
            pct(&d, 0.5),
            pct(&d, 0.99),
            pct(&d, 1.0),
            d.len()
        );
        println!(
            "status query ms: p50 {:.3}, p99 {:.3}",
            pct(&q, 0.5),
            pct(&q, 0.99)
        );
        out.insert("dispatch_ms_p50".into(), json!(pct(&d, 0.5)));
        out.insert("dispatch_ms_p99".into(), json!(pct(&d, 0.99)));
        out.insert("status_ms_p50".into(), json!(pct(&q, 0.5)));
        s.stop().unwrap();
    }

    if rss {
        let n_jobs: usize = if quick { 100_000 } else { 1_000_000 };
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start(opts(dir.path(), Synchronous::Normal));
        let before = rss_kib();
        let runs = n_jobs / 1000 / 2;
        let b = batches(&s.base, 2, runs, 1000);
        let after = rss_kib();
        let per_job = (after.saturating_sub(before) as f64 * 1024.0) / n_jobs as f64;
        let depth = Client::new(&s.base, None).get("/metrics").1;
        let queued = depth
            .as_str()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("qgjob_jobs{target=\"emulator\",state=\"queued\"}"))
                    .and_then(|l| l.split_whitespace().last())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        println!(
            "RSS: {before} KiB before, {after} KiB with {queued} queued jobs: {per_job:.0} bytes/job (batch {b:.0} jobs/s)"
        );
        out.insert("rss_bytes_per_queued_job".into(), json!(per_job.round()));
        out.insert("queued_jobs".into(), json!(queued));
        s.stop().unwrap();
    }
    println!("{}", Value::Object(out));
}
