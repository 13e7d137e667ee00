//! Server figures (a measurement command, not a test): submissions/s with 1 and 32
//! keep-alive clients on the durable store, jobs/s for batch submits, submit → idle-agent
//! lease latency p50/p99, status-query latency p50, and RSS per queued job at 10^6 jobs.
//!
//! Run: `cargo bench -p qgjob-http --bench load` (add `-- --quick` for small counts,
//! `-- --no-rss` to skip the 10^6-job memory figure, `-- --postgres=URL` to measure
//! submissions on PostgreSQL too, in a scratch database made and dropped through `URL`). The server runs in-process on
//! 127.0.0.1:0 with its own 2-thread runtime. Throughput clients are async keep-alive
//! connections on one thread (see `RawConn`); latency probes use the blocking test client.
//! Counts are fixed, so every run is bounded.

#[path = "../tests/common/mod.rs"]
mod common;

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

/// A minimal HTTP/1.1 keep-alive client on one TCP connection, async, so 32 clients cost
/// 32 tasks on one thread rather than 32 OS threads competing with the server for the
/// machine's 2 cores (a load generator like wrk, not a general client).
struct RawConn {
    r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl RawConn {
    async fn connect(base: &str) -> RawConn {
        let addr = base.trim_start_matches("http://");
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (r, w) = s.into_split();
        RawConn {
            r: tokio::io::BufReader::new(r),
            w,
        }
    }

    async fn post(&mut self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.w.write_all(&req).await.unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).await.unwrap();
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line).await.unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut buf = vec![0u8; len];
        self.r.read_exact(&mut buf).await.unwrap();
        (status, buf)
    }
}

/// Runs `clients` connections each sending its `bodies` to `path` in order; returns the
/// wall time from the first request to the last answer. Every answer must be 201.
fn drive(base: &str, path: &str, bodies: Vec<Vec<Vec<u8>>>) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..bodies.len() {
            conns.push(RawConn::connect(base).await);
        }
        let t0 = Instant::now();
        let tasks: Vec<_> = conns
            .into_iter()
            .zip(bodies)
            .map(|(mut c, bs)| {
                let path = path.to_string();
                tokio::spawn(async move {
                    for b in bs {
                        let (st, v) = c.post(&path, &b).await;
                        assert_eq!(st, 201, "{}", String::from_utf8_lossy(&v));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        t0.elapsed()
    })
}

/// Single submissions over `clients` keep-alive connections, `per` each; returns
/// submissions/s.
fn submissions(base: &str, clients: usize, per: usize) -> f64 {
    let bodies: Vec<Vec<Vec<u8>>> = (0..clients)
        .map(|c| {
            (0..per)
                .map(|i| spec(i, c).to_string().into_bytes())
                .collect()
        })
        .collect();
    let t = drive(base, "/v1/jobs", bodies);
    (clients * per) as f64 / t.as_secs_f64()
}

/// Batch submissions (`POST /v1/runs`) of `batch` jobs, `runs` per client; returns jobs/s.
fn batches(base: &str, clients: usize, runs: usize, batch: usize) -> f64 {
    let bodies: Vec<Vec<Vec<u8>>> = (0..clients)
        .map(|c| {
            (0..runs)
                .map(|r| {
                    json!({"jobs": (0..batch).map(|i| spec(r * batch + i, c)).collect::<Vec<_>>()})
                        .to_string()
                        .into_bytes()
                })
                .collect()
        })
        .collect();
    let t = drive(base, "/v1/runs", bodies);
    (clients * runs * batch) as f64 / t.as_secs_f64()
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

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs this bench binary again as a server-only child (so its RSS is the server's alone)
/// and returns it with its base URL.
fn child_server(dir: &std::path::Path) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .arg(format!("--child-server={}", dir.display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("qgjob server listening on ")
        .unwrap()
        .to_string();
    (child, base)
}

/// Submissions/s (1 and 32 clients) on a server whose store is a scratch PostgreSQL
/// database, created through `admin_url` (whose database it replaces) and dropped after.
fn postgres_submissions(admin_url: &str, scale: usize) -> (f64, f64) {
    let db = format!("qgjob_load_{}", std::process::id());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin = |sql: String| {
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(admin_url).await.unwrap();
            sqlx::query(&sql).execute(&pool).await.unwrap();
            pool.close().await;
        })
    };
    admin(format!("CREATE DATABASE {db}"));
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(ServerOptions {
        store: StoreKind::Postgres,
        postgres_url: Some(format!("{base}/{db}")),
        ..opts(dir.path(), Synchronous::Normal)
    });
    let one = submissions(&s.base, 1, 3000 / scale);
    let many = submissions(&s.base, 32, 20_000 / 32 / scale);
    s.stop().unwrap();
    admin(format!("DROP DATABASE {db}"));
    (one, many)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(dir) = args.iter().find_map(|a| a.strip_prefix("--child-server=")) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let o = ServerOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..opts(std::path::Path::new(dir), Synchronous::Normal)
        };
        rt.block_on(qgjob_http::run_server(o)).unwrap();
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let rss = !args.iter().any(|a| a == "--no-rss");
    let scale = if quick { 10 } else { 1 };
    // `--only=submit|batch|dispatch|rss` runs one part (for profiling).
    let only = args
        .iter()
        .find_map(|a| a.strip_prefix("--only="))
        .map(str::to_string);
    let part = |p: &str| only.as_deref().is_none_or(|o| o == p);
    let mut out = serde_json::Map::new();

    for (name, sync) in [("normal", Synchronous::Normal), ("full", Synchronous::Full)] {
        let dir = tempfile::tempdir().unwrap();
        let s = TestServer::start(opts(dir.path(), sync));
        if part("submit") {
            let one = submissions(&s.base, 1, 3000 / scale);
            let many = submissions(&s.base, 32, 20_000 / 32 / scale);
            println!("submit/s [{name}]: 1 client {one:.0}, 32 clients {many:.0}");
            out.insert(format!("submit_per_s_1_{name}"), json!(one.round()));
            out.insert(format!("submit_per_s_32_{name}"), json!(many.round()));
        }
        if sync == Synchronous::Normal && part("batch") {
            let b = batches(&s.base, 2, 50 / scale, 1000);
            println!("batch jobs/s [{name}]: {b:.0} (runs of 1000, 2 clients)");
            out.insert("batch_jobs_per_s".into(), json!(b.round()));
        }
        s.stop().unwrap();
    }

    if let Some(url) = args.iter().find_map(|a| a.strip_prefix("--postgres=")) {
        if part("submit") {
            let (one, many) = postgres_submissions(url, scale);
            println!("submit/s [postgres]: 1 client {one:.0}, 32 clients {many:.0}");
            out.insert("submit_per_s_1_postgres".into(), json!(one.round()));
            out.insert("submit_per_s_32_postgres".into(), json!(many.round()));
        }
    }

    if part("dispatch") {
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

    if rss && part("rss") {
        let n_jobs: usize = if quick { 100_000 } else { 1_000_000 };
        let dir = tempfile::tempdir().unwrap();
        let (mut child, base) = child_server(dir.path());
        let pid = child.id();
        let before = rss_kib(pid);
        // Bodies are built per request here (not all up front) to keep the client small;
        // the server is measured alone anyway.
        let t0 = Instant::now();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = RawConn::connect(&base).await;
            for r in 0..n_jobs / 1000 {
                let body =
                    json!({"jobs": (0..1000).map(|i| spec(r * 1000 + i, 0)).collect::<Vec<_>>()});
                let (st, v) = c.post("/v1/runs", body.to_string().as_bytes()).await;
                assert_eq!(st, 201, "{}", String::from_utf8_lossy(&v));
            }
        });
        let rate = n_jobs as f64 / t0.elapsed().as_secs_f64();
        let after = rss_kib(pid);
        let per_job = (after.saturating_sub(before) as f64 * 1024.0) / n_jobs as f64;
        let depth = Client::new(&base, None).get("/metrics").1;
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
            "server RSS: {before} KiB idle, {after} KiB with {queued} queued jobs: {per_job:.0} bytes/job (1 client, runs of 1000: {rate:.0} jobs/s)"
        );
        out.insert("rss_bytes_per_queued_job".into(), json!(per_job.round()));
        out.insert("queued_jobs".into(), json!(queued));
        let _ = child.kill();
        let _ = child.wait();
    }
    if part("core-rss") {
        // The same jobs in a bare GroupedScheduler (no server): how much of the per-job
        // memory is the scheduler's own.
        use qgjob_core::Scheduler;
        let n_jobs: usize = if quick { 100_000 } else { 1_000_000 };
        let me = std::process::id();
        let before = rss_kib(me);
        let mut sched = qgjob_core::GroupedScheduler::new(qgjob_core::SchedulerConfig::default());
        for r in 0..n_jobs / 1000 {
            let specs: Vec<qgjob_core::JobSpec> = (0..1000)
                .map(|i| serde_json::from_value(spec(r * 1000 + i, 0)).unwrap())
                .collect();
            sched
                .submit_many(qgjob_core::Time(r as u64), specs)
                .unwrap();
            sched.take_events();
        }
        let after = rss_kib(me);
        let per_job = (after.saturating_sub(before) as f64 * 1024.0) / n_jobs as f64;
        println!(
            "bare scheduler RSS: {per_job:.0} bytes/job ({} jobs; size_of::<Job>() = {})",
            sched.len(),
            std::mem::size_of::<qgjob_core::Job>()
        );
        out.insert("core_rss_bytes_per_job".into(), json!(per_job.round()));
    }
    println!("{}", Value::Object(out));
}
