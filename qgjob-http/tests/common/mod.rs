//! Test helpers: a server on 127.0.0.1:0 in a background thread, and a small blocking HTTP
//! client (ureq) that returns status and JSON without treating 4xx as errors.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qgjob_http::{serve, ServerError, ServerOptions, StoreKind};
use serde_json::Value;

/// A server running on its own runtime until stopped (or dropped).
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// Starts a server with `opts` on 127.0.0.1:0 and waits until `/healthz` answers 200.
    pub fn start(opts: ServerOptions) -> TestServer {
        let s = Self::spawn(opts);
        // serve() opens the store before accepting; wait until it answers.
        let c = s.client(None);
        let t0 = Instant::now();
        while c.get("/readyz").0 != 200 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "server never came up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// Starts a server with `opts` on 127.0.0.1:0 without waiting for it to serve (a
    /// standby answers 503 until it takes over).
    pub fn spawn(opts: ServerOptions) -> TestServer {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let _ = addr_tx.send(Ok(listener.local_addr()?));
                serve(listener, opts, async move {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server thread reports its address")
            .expect("bind");
        TestServer {
            base: format!("http://{addr}"),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// A client, optionally with a bearer token.
    pub fn client(&self, token: Option<&str>) -> Client {
        Client::new(&self.base, token)
    }

    /// Whether `serve` has returned (the server failed, or was stopped).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the server gracefully and returns what `serve` returned.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().expect("server thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Options for an in-memory server with no tokens (open, as on loopback).
pub fn memory_opts() -> ServerOptions {
    ServerOptions {
        store: StoreKind::Memory,
        data_dir: None,
        ..ServerOptions::default()
    }
}

/// Options for a SQLite server under `dir`.
pub fn sqlite_opts(dir: &std::path::Path) -> ServerOptions {
    ServerOptions {
        store: StoreKind::Sqlite,
        data_dir: Some(dir.to_path_buf()),
        ..ServerOptions::default()
    }
}

/// A blocking JSON client.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client for `base`.
    pub fn new(base: &str, token: Option<&str>) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            agent,
            base: base.to_string(),
            token: token.map(str::to_string),
        }
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn finish(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
        let mut resp = resp.expect("request reaches the server");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    /// GET returning status and JSON, or `None` when no server answers (it stopped).
    pub fn try_get(&self, path: &str) -> Option<(u16, Value)> {
        let mut r = self.agent.get(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        let resp = r.call().ok()?;
        Some(Self::finish(Ok(resp)))
    }

    /// POST JSON returning status and JSON, or `None` when the request got no answer.
    pub fn try_post(&self, path: &str, body: &Value) -> Option<(u16, Value)> {
        let mut r = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        let resp = r.send_json(body).ok()?;
        Some(Self::finish(Ok(resp)))
    }

    /// GET returning status and JSON (or the text as a JSON string).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut r = self.agent.get(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        Self::finish(r.call())
    }

    /// A request with extra headers (which replace the token's `Authorization` when they
    /// name it) and an optional JSON body.
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut b = ureq::http::Request::builder().method(method).uri(url);
        if let Some(a) = self.auth() {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            {
                b = b.header("Authorization", a);
            }
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let bytes = body.map(|v| v.to_string()).unwrap_or_default();
        if body.is_some() {
            b = b.header("Content-Type", "application/json");
        }
        let req = b.body(bytes).expect("a valid request");
        Self::finish(self.agent.run(req))
    }

    /// GET returning status, headers and raw bytes.
    pub fn get_raw(&self, path: &str) -> (u16, ureq::http::HeaderMap, Vec<u8>) {
        let mut r = self.agent.get(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        let mut resp = r.call().expect("request reaches the server");
        let h = resp.headers().clone();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .unwrap_or_default();
        (resp.status().as_u16(), h, body)
    }

    /// POST a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        Self::finish(r.send_json(body))
    }

    /// POST raw bytes.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let mut r = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        Self::finish(r.send(body))
    }

    /// POST with no body.
    pub fn post_empty(&self, path: &str) -> (u16, Value) {
        let mut r = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        Self::finish(r.send_empty())
    }

    /// PUT raw bytes with optional extra headers.
    pub fn put_raw(&self, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Value) {
        let mut r = self.agent.put(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        Self::finish(r.send(body))
    }

    /// DELETE.
    pub fn delete(&self, path: &str) -> (u16, Value) {
        let mut r = self.agent.delete(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        Self::finish(r.call())
    }

    /// Opens an SSE stream and returns the `data:` payloads of `job` events until the
    /// stream ends (or `max` events, a bound so a broken server cannot hang the test).
    pub fn sse_events(&self, path: &str, max: usize) -> (u16, Vec<Value>) {
        let mut r = self.agent.get(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            r = r.header("Authorization", a);
        }
        let mut resp = r.call().expect("request reaches the server");
        let status = resp.status().as_u16();
        if status != 200 {
            return (status, Vec::new());
        }
        let reader = BufReader::new(resp.body_mut().as_reader());
        let mut out = Vec::new();
        let mut event = String::new();
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if let Some(e) = line.strip_prefix("event:") {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data:") {
                if event == "job" {
                    out.push(serde_json::from_str(d.trim()).expect("event data is JSON"));
                    if out.len() >= max {
                        break;
                    }
                }
            }
        }
        (status, out)
    }
}

/// A job spec as JSON.
pub fn spec(org: &str, app: &str, test: &str) -> Value {
    serde_json::json!({"org_id": org, "app_version_id": app, "tests": [test]})
}

/// A device registration as JSON.
pub fn device(id: &str) -> Value {
    serde_json::json!({"id": id, "target": "emulator"})
}

/// Polls `f` until it returns `Some` (at most `secs` seconds; panics after).
pub fn eventually<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "condition not met within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The PostgreSQL server the tests use (a fresh schema per test):
/// `QGJOB_TEST_PG_URL`, by default the local server with trust auth.
pub fn pg_url() -> String {
    std::env::var("QGJOB_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Keeps a store's backing alive during a test and removes it afterwards.
pub enum Guard {
    /// Nothing to keep (memory).
    None,
    /// A temporary directory.
    Dir(#[allow(dead_code)] tempfile::TempDir),
    /// A PostgreSQL schema, dropped with the guard.
    Schema(String),
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Guard::Schema(schema) = self {
            let schema = schema.clone();
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(pool) = sqlx::PgPool::connect(&pg_url()).await {
                        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                            .execute(&pool)
                            .await;
                        pool.close().await;
                    }
                });
            })
            .join();
        }
    }
}

/// A PostgreSQL store in a fresh schema, with its guard and the schema's name. No server
/// answering is a failure (CI starts one), unless `QGJOB_SKIP_PG=1` asks to leave
/// PostgreSQL out: then `None`, with a notice naming `what`.
pub async fn fresh_pg_store(what: &str) -> Option<(qgjob_http::store::PgStore, Guard, String)> {
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).unwrap();
    let schema = format!("qgjob_test_{}", hex::encode(rnd));
    match qgjob_http::store::PgStore::connect(&pg_url(), Some(&schema)).await {
        Ok(s) => Some((s, Guard::Schema(schema.clone()), schema)),
        Err(e) if std::env::var("QGJOB_SKIP_PG").is_ok_and(|v| v == "1") => {
            eprintln!(
                "QGJOB_SKIP_PG=1: skipping the PostgreSQL {what} ({} : {e})",
                pg_url()
            );
            None
        }
        Err(e) => panic!(
            "PostgreSQL not reachable at {} ({e}); start it, point QGJOB_TEST_PG_URL at one, \
             or set QGJOB_SKIP_PG=1 to leave it out",
            pg_url()
        ),
    }
}
