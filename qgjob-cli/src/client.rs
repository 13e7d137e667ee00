//! A blocking HTTP client for the qgjob API (user API and agent protocol), on ureq.
//!
//! Blocking keeps `qgjob status` cheap: no async runtime is built for user commands. Every
//! failure becomes one [`CliError`] line with the right exit code.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ureq::tls::{PemItem, RootCerts, TlsConfig};

use qgjob_core::{
    DeviceId, DeviceInfo, HeartbeatAck, InfraFailure, Job, JobEvent, JobId, JobSpec, JobState,
    Lease, LeaseId, RunId, RunReport, StateCounts, TestResult, Time,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CliError, Result};

/// Ceiling for ordinary calls; long polls and streams get their own.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Answer to `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSubmitted {
    /// The job's id.
    pub job_id: JobId,
    /// Always `queued` for a new job.
    pub status: String,
    /// False when an idempotency key returned an existing job.
    #[serde(default = "yes")]
    pub created: bool,
    /// Set when no agent serves the job's target yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

fn yes() -> bool {
    true
}

/// Answer to `POST /v1/runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSubmitted {
    /// The run's id.
    pub run_id: RunId,
    /// Its jobs, in the order given.
    pub job_ids: Vec<JobId>,
    /// `queued` for a new run; for a repeat, the earlier run's status now.
    pub status: String,
    /// False when the idempotency keys named an earlier run: this is that run again.
    #[serde(default = "created_default")]
    pub created: bool,
    /// Set when no agent serves one of the jobs' targets yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

fn created_default() -> bool {
    true
}

/// A run as `GET /v1/runs/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    /// The run's id.
    pub run_id: RunId,
    /// Its org.
    pub org_id: String,
    /// `queued`/`running` until every job is final, then `passed`/`failed`/`error`/`canceled`.
    pub status: String,
    /// Jobs per state.
    pub counts: StateCounts,
    /// When it was submitted.
    pub created_at: Time,
    /// Its labels (`submit --label`); a server that does not send them has none.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its jobs.
    pub jobs: Vec<Job>,
}

/// A page of `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobPage {
    /// The jobs, in submission order.
    pub jobs: Vec<Job>,
    /// Cursor of the next page, if any.
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// Answer to a job cancel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCanceled {
    /// The job.
    pub job_id: JobId,
    /// `canceled` (it was queued) or `requested` (it is running).
    pub result: String,
}

/// Answer to a run cancel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCanceled {
    /// The run.
    pub run_id: RunId,
    /// Queued jobs canceled at once.
    pub canceled: u64,
    /// Running jobs told to stop.
    pub requested: u64,
}

/// Answer to an app or bundle upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Uploaded {
    /// Content hash (sha256 hex).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// False when the same content was already stored.
    #[serde(default)]
    pub created: bool,
}

/// Answer to `GET /v1/jobs/{id}/results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResults {
    /// The job.
    pub job_id: JobId,
    /// Its state.
    pub state: JobState,
    /// Per-test results.
    pub tests: Vec<TestResult>,
}

#[derive(Deserialize)]
struct DeviceRegistered {
    device_id: DeviceId,
}

#[derive(Deserialize)]
struct ReportAnswer {
    state: JobState,
}

#[derive(Deserialize)]
struct ErrorDoc {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
}

/// Filters for `GET /v1/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this org.
    pub org_id: Option<String>,
    /// Only this state.
    pub state: Option<String>,
    /// Only this app version.
    pub app_version_id: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Only this run.
    pub run_id: Option<String>,
    /// Page cursor.
    pub cursor: Option<String>,
    /// Page size.
    pub limit: Option<usize>,
}

/// A connection to a qgjob server: one, or a list of servers of which one serves at a time
/// (a server and its standbys). Cheap to clone (the connection pool and the choice of
/// server are shared).
#[derive(Clone)]
pub struct Client {
    servers: Arc<Servers>,
    token: Option<String>,
    agent: ureq::Agent,
}

/// The servers of a [`Client`] and which one answered last.
#[derive(Debug)]
struct Servers {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of debug output (it may end up in logs).
        f.debug_struct("Client")
            .field("servers", &self.servers.urls)
            .finish()
    }
}

/// Whether a request failed before anything of it reached a server, so sending it to
/// another one cannot make it happen twice.
fn not_sent(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Resolve | ureq::Timeout::Connect),
        _ => false,
    }
}

/// Bodies from this size on (about what a socket takes before the sender must wait) are
/// sent only once the server asks for them
/// (`Expect: 100-continue`): a standby, which reads no body, answers 503 at once, and the
/// client moves on without the server closing the connection under a half-sent body
/// (which would fail the request as a broken pipe).
const EXPECT_CONTINUE_BYTES: usize = 16 * 1024;

/// `req`, asking the server before it sends a body of `len` bytes when that is large.
fn expect_continue<B>(req: ureq::RequestBuilder<B>, len: usize) -> ureq::RequestBuilder<B> {
    if len >= EXPECT_CONTINUE_BYTES {
        req.header("expect", "100-continue")
    } else {
        req
    }
}

/// A standby's answer: it did nothing with the request.
fn is_standby(e: &CliError) -> bool {
    matches!(e, CliError::Api { status: 503, code, .. } if code == "standby")
}

/// A 404 that is not about a job, run or build (the server has no such endpoint, or what
/// answered is not a qgjob server) most likely means a wrong server address: say which URL
/// was not found and what the address should be.
fn no_endpoint(e: CliError, base: &str, path: &str) -> CliError {
    match e {
        CliError::Api {
            status: 404,
            code,
            message,
        } if code == "http" || message == "no such endpoint" => {
            let path = path.split('?').next().unwrap_or(path);
            let base = without_credentials(base);
            CliError::Api {
                status: 404,
                message: format!(
                    "no such endpoint: {base}{path} was not found (is {base} the qgjob \
                     server's base URL? Give the server's address alone, e.g. \
                     http://127.0.0.1:7878, without /v1 or another API path)"
                ),
                code,
            }
        }
        other => other,
    }
}

/// `url` without user info (`http://user:pass@host` → `http://host`), for messages.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host_end = rest.find('/').unwrap_or(rest.len());
            match rest[..host_end].rfind('@') {
                Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// The environment variable naming a PEM file of CA certificates to trust for an https
/// server instead of the built-in (Mozilla) roots: a server behind a private CA, or with a
/// self-signed certificate.
pub const CA_CERT_ENV: &str = "QGJOB_CA_CERT";

static SERVER_ROOTS: OnceLock<RootCerts> = OnceLock::new();

/// Reads [`CA_CERT_ENV`] once, before the first client is made; a file that cannot be read
/// or holds no certificate is a usage error (exit 2) rather than a failed TLS handshake
/// later.
pub fn load_server_roots() -> Result<()> {
    if SERVER_ROOTS.get().is_some() {
        return Ok(());
    }
    let Some(path) = std::env::var_os(CA_CERT_ENV).filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let shown = std::path::Path::new(&path).display().to_string();
    let pem =
        std::fs::read(&path).map_err(|e| CliError::Usage(format!("{CA_CERT_ENV} {shown}: {e}")))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(CliError::Usage(format!(
                    "{CA_CERT_ENV} {shown}: not a PEM certificate file: {e}"
                )))
            }
        }
    }
    if certs.is_empty() {
        return Err(CliError::Usage(format!(
            "{CA_CERT_ENV} {shown}: holds no certificate"
        )));
    }
    let _ = SERVER_ROOTS.set(RootCerts::new_with_certs(&certs));
    Ok(())
}

/// TLS settings for talking to the qgjob server: the roots [`load_server_roots`] read, or
/// the built-in ones.
pub fn server_tls() -> TlsConfig {
    TlsConfig::builder()
        .root_certs(SERVER_ROOTS.get().cloned().unwrap_or(RootCerts::WebPki))
        .build()
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:7878`, or an https URL),
    /// or for any of a comma-separated list of them (a server and its standbys: each
    /// request goes to the one that answered last, and moves on to the next when that one
    /// is down or standing by).
    pub fn new(base: impl Into<String>, token: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(server_tls())
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .user_agent(concat!("qgjob/", env!("CARGO_PKG_VERSION")))
            .max_idle_connections_per_host(16)
            .build()
            .into();
        let base = base.into();
        let mut urls: Vec<String> = base
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            // Refused with a clear message at the first request.
            urls.push(base);
        }
        Client {
            servers: Arc::new(Servers {
                urls,
                current: AtomicUsize::new(0),
            }),
            token,
            agent,
        }
    }

    /// The base URL of the server in use (the one that answered last).
    pub fn base(&self) -> &str {
        let urls = &self.servers.urls;
        &urls[self.servers.current.load(Ordering::Relaxed) % urls.len()]
    }

    /// Every server's base URL, comma-separated, as the client was given them.
    pub fn servers(&self) -> String {
        self.servers.urls.join(",")
    }

    /// The bearer token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Sends the request `call` makes for a full URL, to the server in use. With several
    /// servers, one that refuses the connection or answers as a standby is passed over for
    /// the next (nothing of the request reached it); after any other sign of a server
    /// away (see [`CliError::is_server_away`]) the error is returned, since the request
    /// may have been carried out, and the next request starts with the next server.
    ///
    /// An `idempotent` request (a GET, a content-addressed upload, a DELETE) is passed on
    /// after any sign of a server away: sending it twice changes nothing.
    fn send(
        &self,
        path: &str,
        idempotent: bool,
        call: impl Fn(String) -> std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let urls = &self.servers.urls;
        let n = urls.len();
        let first = self.servers.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            let res = call(format!("{}{path}", urls[i]));
            let unsent = matches!(&res, Err(e) if not_sent(e));
            match self
                .check_at(&urls[i], res)
                .map_err(|e| no_endpoint(e, &urls[i], path))
            {
                Ok(r) => {
                    self.servers.current.store(i, Ordering::Relaxed);
                    return Ok(r);
                }
                Err(e)
                    if n > 1 && (unsent || is_standby(&e) || idempotent && e.is_server_away()) =>
                {
                    // A standby's answer says less than the failure of the server before it.
                    if last.is_none() || !is_standby(&e) {
                        last = Some(e);
                    }
                }
                Err(e) => {
                    if n > 1 && e.is_server_away() {
                        self.servers.current.store((i + 1) % n, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| CliError::Usage("no server address given".into())))
    }

    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => req.header("authorization", format!("Bearer {t}")),
            None => req,
        }
    }

    /// A transport failure talking to the server at `base`, as the error the commands show.
    fn transport_at(&self, base: &str, e: ureq::Error) -> CliError {
        let tls = match &e {
            ureq::Error::Rustls(r) => Some(r.to_string()),
            ureq::Error::Tls(t) => Some((*t).to_string()),
            ureq::Error::Io(io) => io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .map(ToString::to_string),
            _ => None,
        };
        if let Some(reason) = tls {
            return CliError::Tls {
                url: without_credentials(base),
                reason,
            };
        }
        let reason = match &e {
            ureq::Error::Io(io) => match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                std::io::ErrorKind::ConnectionReset => "connection reset".to_string(),
                std::io::ErrorKind::TimedOut => "timed out".to_string(),
                _ => io.to_string(),
            },
            ureq::Error::Timeout(_) => "timed out".to_string(),
            ureq::Error::HostNotFound => "host not found".to_string(),
            ureq::Error::ConnectionFailed => "connection failed".to_string(),
            ureq::Error::BadUri(u) => {
                return CliError::Usage(format!("invalid server address {base}: {u}"))
            }
            other => other.to_string(),
        };
        CliError::Unreachable {
            url: without_credentials(base),
            reason,
        }
    }

    /// Turns the response of the server at `base` into `Ok(response)` for 2xx and a
    /// [`CliError::Api`] otherwise.
    fn check_at(
        &self,
        base: &str,
        res: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let mut res = res.map_err(|e| self.transport_at(base, e))?;
        let status = res.status().as_u16();
        if status < 400 {
            return Ok(res);
        }
        let text = res
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        Err(match serde_json::from_str::<ErrorDoc>(&text) {
            Ok(doc) => CliError::Api {
                status,
                code: doc.error.code,
                message: match doc.error.field {
                    Some(f) if !doc.error.message.contains(&f) => {
                        format!("{} ({f})", doc.error.message)
                    }
                    _ => doc.error.message,
                },
            },
            Err(_) => CliError::Api {
                status,
                code: "http".into(),
                message: format!(
                    "server answered {status}{}",
                    if text.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", text.trim().lines().next().unwrap_or(""))
                    }
                ),
            },
        })
    }

    fn json<T: DeserializeOwned>(&self, mut res: ureq::http::Response<ureq::Body>) -> Result<T> {
        res.body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_json()
            .map_err(|e| CliError::Protocol(format!("unexpected answer from the server: {e}")))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let res = self.send(path, true, |url| {
            self.auth(self.agent.get(url))
                .config()
                .timeout_global(Some(CALL_TIMEOUT))
                .build()
                .call()
        })?;
        self.json(res)
    }

    fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| CliError::Protocol(format!("cannot encode the request: {e}")))?;
        let res = self.send(path, false, |url| {
            expect_continue(
                self.auth(self.agent.post(url))
                    .header("content-type", "application/json"),
                bytes.len(),
            )
            .config()
            .timeout_global(Some(CALL_TIMEOUT))
            .build()
            .send(&bytes[..])
        })?;
        self.json(res)
    }

    fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let res = self.send(path, false, |url| {
            self.auth(self.agent.post(url))
                .config()
                .timeout_global(Some(CALL_TIMEOUT))
                .build()
                .send_empty()
        })?;
        self.json(res)
    }

    fn put_bytes<T: DeserializeOwned>(&self, path: &str, bytes: &[u8]) -> Result<T> {
        let res = self.send(path, true, |url| {
            expect_continue(
                self.auth(self.agent.put(url))
                    .header("content-type", "application/octet-stream"),
                bytes.len(),
            )
            .config()
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .send(bytes)
        })?;
        self.json(res)
    }

    // ---- user API ----

    /// `GET /healthz`.
    pub fn health(&self) -> Result<serde_json::Value> {
        self.get("/healthz")
    }

    /// Submits one job.
    pub fn submit_job(&self, spec: &JobSpec) -> Result<JobSubmitted> {
        self.post("/v1/jobs", spec)
    }

    /// Submits several jobs as one run.
    pub fn submit_run(&self, jobs: &[JobSpec]) -> Result<RunSubmitted> {
        self.submit_run_labelled(jobs, &BTreeMap::new())
    }

    /// Submits several jobs as one run with these labels (the run's own, shown with it).
    pub fn submit_run_labelled(
        &self,
        jobs: &[JobSpec],
        labels: &BTreeMap<String, String>,
    ) -> Result<RunSubmitted> {
        self.post(
            "/v1/runs",
            &serde_json::json!({ "jobs": jobs, "labels": labels }),
        )
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Job> {
        self.get(&format!("/v1/jobs/{}", enc(id)))
    }

    /// One run with its jobs.
    pub fn run(&self, id: &str) -> Result<RunView> {
        self.get(&format!("/v1/runs/{}", enc(id)))
    }

    /// A page of jobs.
    pub fn list(&self, q: &ListQuery) -> Result<JobPage> {
        let pairs = [
            ("org_id", q.org_id.clone()),
            ("state", q.state.clone()),
            ("app_version_id", q.app_version_id.clone()),
            ("target", q.target.clone()),
            ("run_id", q.run_id.clone()),
            ("cursor", q.cursor.clone()),
            ("limit", q.limit.map(|l| l.to_string())),
        ];
        let res = self.send("/v1/jobs", true, |url| {
            let mut req = self.auth(self.agent.get(url));
            for (k, v) in &pairs {
                if let Some(v) = v {
                    req = req.query(*k, v);
                }
            }
            req.config()
                .timeout_global(Some(CALL_TIMEOUT))
                .build()
                .call()
        })?;
        self.json(res)
    }

    /// Cancels a job.
    pub fn cancel_job(&self, id: &str) -> Result<JobCanceled> {
        self.post_empty(&format!("/v1/jobs/{}/cancel", enc(id)))
    }

    /// Cancels every unfinished job of a run.
    pub fn cancel_run(&self, id: &str) -> Result<RunCanceled> {
        self.post_empty(&format!("/v1/runs/{}/cancel", enc(id)))
    }

    /// A job's per-test results.
    pub fn results(&self, id: &str) -> Result<JobResults> {
        self.get(&format!("/v1/jobs/{}/results", enc(id)))
    }

    /// A job's log bytes from `offset`; returns them and the log's total size.
    pub fn logs(&self, id: &str, offset: u64) -> Result<(Vec<u8>, u64)> {
        let mut res = self.send(&format!("/v1/jobs/{}/logs", enc(id)), true, |url| {
            self.auth(self.agent.get(url).query("offset", offset.to_string()))
                .config()
                .timeout_global(Some(CALL_TIMEOUT))
                .build()
                .call()
        })?;
        let size_header = res
            .headers()
            .get("x-qgjob-log-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let bytes = res
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_to_vec()
            .map_err(|e| CliError::Protocol(format!("reading logs: {e}")))?;
        let size = size_header.unwrap_or(offset + bytes.len() as u64);
        Ok((bytes, size))
    }

    /// Uploads an app build for `org`/`version`.
    pub fn upload_app(&self, org: &str, version: &str, bytes: &[u8]) -> Result<Uploaded> {
        self.put_bytes(&format!("/v1/apps/{}/{}", enc(org), enc(version)), bytes)
    }

    /// Uploads a test bundle (`.tar.gz`).
    pub fn upload_bundle(&self, bytes: &[u8]) -> Result<Uploaded> {
        self.put_bytes("/v1/bundles", bytes)
    }

    /// Opens the live event stream of a job (`run = false`) or a run. `timeout` bounds the
    /// whole stream (None: until it ends).
    pub fn events(&self, id: &str, run: bool, timeout: Option<Duration>) -> Result<EventStream> {
        let path = if run {
            format!("/v1/runs/{}/events", enc(id))
        } else {
            format!("/v1/jobs/{}/events", enc(id))
        };
        let res = self.send(&path, true, |url| {
            self.auth(self.agent.get(url))
                .header("accept", "text/event-stream")
                .config()
                .timeout_global(timeout)
                .build()
                .call()
        })?;
        Ok(EventStream {
            reader: Box::new(BufReader::new(res.into_body().into_reader())),
            base: self.base().to_string(),
        })
    }

    // ---- agent protocol ----

    /// Registers (or refreshes) a device.
    pub fn register_device(&self, info: &DeviceInfo) -> Result<DeviceId> {
        let r: DeviceRegistered = self.post("/v1/agent/devices", info)?;
        Ok(r.device_id)
    }

    /// Removes a device.
    pub fn unregister_device(&self, id: &DeviceId, session: Option<&str>) -> Result<()> {
        let mut path = format!("/v1/agent/devices/{}", enc(id.as_str()));
        if let Some(s) = session {
            path.push_str(&format!("?session={}", enc(s)));
        }
        self.send(&path, true, |url| {
            self.auth(self.agent.delete(url))
                .config()
                .timeout_global(Some(CALL_TIMEOUT))
                .build()
                .call()
        })?;
        Ok(())
    }

    /// Long-polls for work: `None` when nothing came within `wait`.
    pub fn lease(
        &self,
        device: &DeviceId,
        session: Option<&str>,
        max_batch: usize,
        wait: Duration,
    ) -> Result<Option<Lease>> {
        let body = serde_json::json!({
            "device_id": device,
            "session": session,
            "max_batch": max_batch,
            "wait_ms": wait.as_millis() as u64,
        });
        let res = self.send("/v1/agent/lease", false, |url| {
            self.auth(self.agent.post(url))
                .config()
                .timeout_global(Some(wait + Duration::from_secs(15)))
                .build()
                .send_json(&body)
        })?;
        if res.status().as_u16() == 204 {
            return Ok(None);
        }
        self.json(res).map(Some)
    }

    /// Extends a lease.
    pub fn heartbeat(&self, lease: LeaseId) -> Result<HeartbeatAck> {
        self.post_empty(&format!("/v1/agent/leases/{lease}/heartbeat"))
    }

    /// Reports a job whose tests ran to the end.
    pub fn complete(&self, lease: LeaseId, job: JobId, report: &RunReport) -> Result<JobState> {
        let r: ReportAnswer = self.post(
            &format!("/v1/agent/leases/{lease}/jobs/{job}/complete"),
            report,
        )?;
        Ok(r.state)
    }

    /// Reports an infrastructure failure.
    pub fn fail(&self, lease: LeaseId, job: JobId, failure: &InfraFailure) -> Result<JobState> {
        let r: ReportAnswer = self.post(
            &format!("/v1/agent/leases/{lease}/jobs/{job}/fail"),
            failure,
        )?;
        Ok(r.state)
    }

    /// Appends log text to a job.
    pub fn append_log(&self, lease: LeaseId, job: JobId, text: &str) -> Result<()> {
        self.send(
            &format!("/v1/agent/leases/{lease}/jobs/{job}/logs"),
            false,
            |url| {
                self.auth(self.agent.post(url))
                    .header("content-type", "text/plain; charset=utf-8")
                    .config()
                    .timeout_global(Some(CALL_TIMEOUT))
                    .build()
                    .send(text.as_bytes())
            },
        )?;
        Ok(())
    }

    /// The sha256 of the build an org registered for an app version (agent protocol).
    pub fn agent_build_sha(&self, org: &str, app_version: &str) -> Result<String> {
        #[derive(Deserialize)]
        struct AppInfo {
            sha256: String,
        }
        let info: AppInfo =
            self.get(&format!("/v1/agent/apps/{}/{}", enc(org), enc(app_version)))?;
        Ok(info.sha256)
    }

    /// Streams a build or bundle by hash (`kind` is `builds` or `bundles`) into `out`;
    /// returns its size. A server that stops answering must not hang a job for ever, while
    /// a big build still has half an hour to arrive.
    pub fn download(&self, kind: &str, sha256: &str, out: &mut impl Write) -> Result<u64> {
        let res = self.send(&format!("/v1/agent/{kind}/{}", enc(sha256)), true, |url| {
            self.auth(self.agent.get(url))
                .config()
                .timeout_recv_response(Some(Duration::from_secs(60)))
                .timeout_recv_body(Some(Duration::from_secs(1800)))
                .build()
                .call()
        })?;
        std::io::copy(&mut res.into_body().into_reader(), out).map_err(|e| CliError::Io {
            context: format!("downloading {kind}/{sha256}"),
            source: e,
        })
    }
}

/// Percent-encodes a path segment (ids are usually safe already; this guards odd input).
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Server-Sent Events stream of [`JobEvent`]s, read line by line.
pub struct EventStream {
    reader: Box<dyn BufRead + Send>,
    base: String,
}

impl EventStream {
    /// Builds a stream over any reader (used by tests).
    pub fn from_reader(r: impl Read + Send + 'static) -> Self {
        EventStream {
            reader: Box::new(BufReader::new(r)),
            base: String::new(),
        }
    }

    /// The next `job` event, or `None` when the server ended the stream.
    pub fn next_event(&mut self) -> Result<Option<JobEvent>> {
        let mut event = String::new();
        let mut data = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut
                    || e.to_string().to_lowercase().contains("timeout")
                {
                    CliError::Timeout("waiting for events".into())
                } else {
                    CliError::Unreachable {
                        url: without_credentials(&self.base),
                        reason: format!("event stream broke: {e}"),
                    }
                }
            })?;
            if n == 0 {
                return Ok(None);
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                // End of one event: dispatch it if it is a job event.
                if !data.is_empty() && (event.is_empty() || event == "job") {
                    let ev = serde_json::from_str::<JobEvent>(&data).map_err(|e| {
                        CliError::Protocol(format!("unexpected event from the server: {e}"))
                    })?;
                    return Ok(Some(ev));
                }
                event.clear();
                data.clear();
                continue;
            }
            if l.starts_with(':') {
                continue; // comment / keep-alive
            }
            let (field, value) = match l.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (l, ""),
            };
            match field {
                "event" => event = value.to_string(),
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn server_urls_in_messages_carry_no_credentials() {
        assert_eq!(
            super::without_credentials("http://u:pw@lab:7878/base"),
            "http://lab:7878/base"
        );
        assert_eq!(
            super::without_credentials("http://lab:7878/a@b"),
            "http://lab:7878/a@b"
        );
        assert_eq!(super::without_credentials("lab:7878"), "lab:7878");
    }

    use super::*;

    #[test]
    fn parses_sse_job_events_and_skips_others() {
        let id = "0193a000-0000-7000-8000-000000000001";
        let text = format!(
            ": hello\n\nevent: ping\ndata: {{}}\n\nevent: job\ndata: {{\"job_id\":\"{id}\",\"org_id\":\"acme\",\"state\":\"queued\",\"attempt\":1,\"at\":5}}\n\nevent: job\r\ndata: {{\"job_id\":\"{id}\",\"org_id\":\"acme\",\"state\":\"passed\",\"attempt\":1,\"at\":9}}\r\n\r\n"
        );
        let mut s = EventStream::from_reader(std::io::Cursor::new(text.into_bytes()));
        let a = s.next_event().unwrap().unwrap();
        assert_eq!(a.state, JobState::Queued);
        assert_eq!(a.at, Time(5));
        let b = s.next_event().unwrap().unwrap();
        assert_eq!(b.state, JobState::Passed);
        assert!(s.next_event().unwrap().is_none());
    }

    #[test]
    fn encodes_path_segments() {
        assert_eq!(enc("abc-1.2"), "abc-1.2");
        assert_eq!(enc("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn unreachable_server_is_one_clean_line() {
        // Port 1 on loopback is essentially never listening: a refused connection.
        let c = Client::new("http://127.0.0.1:1", None);
        let e = c.health().unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot reach qgjob server at http://127.0.0.1:1: connection refused"
        );
        assert_eq!(e.exit_code(), 3);
    }
}

#[cfg(test)]
mod server_list_tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::Client;

    /// A one-thread HTTP stand-in on 127.0.0.1 that answers every request with `status`
    /// and `body` (or, with `status` 0, closes the connection after reading the request),
    /// counting the requests it got.
    fn stand_in(status: u16, body: &'static str) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&seen);
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                count.fetch_add(1, Ordering::SeqCst);
                if status == 0 {
                    continue; // dropped: the connection closes unanswered
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, seen)
    }

    /// A port nothing listens on.
    fn refused() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    #[test]
    fn a_request_moves_past_a_refusing_server_and_a_standby() {
        let (standby, standby_seen) = stand_in(
            503,
            r#"{"error":{"code":"standby","message":"standing by"}}"#,
        );
        let (serving, serving_seen) = stand_in(200, r#"{"status":"ok"}"#);
        let c = Client::new(format!("{},{standby},{serving}/", refused()), None);
        assert_eq!(c.health().unwrap()["status"], "ok");
        assert_eq!(c.base(), serving);
        // The next request goes straight to the server that answered.
        c.health().unwrap();
        assert_eq!(standby_seen.load(Ordering::SeqCst), 1);
        assert_eq!(serving_seen.load(Ordering::SeqCst), 2);
    }

    /// A server that reads a whole request (answering `100 Continue` when asked) before
    /// it answers 200 with `body`; returns its URL and how many bytes of bodies it read.
    fn reading_stand_in(body: &'static str) -> (String, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let read = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&read);
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if head.contains("expect: 100-continue") {
                    let _ = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                let mut got = vec![0u8; len];
                if s.read_exact(&mut got).is_ok() {
                    count.fetch_add(len, Ordering::SeqCst);
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (url, read)
    }

    #[test]
    fn a_big_upload_passes_a_standby_over() {
        // The standby answers as soon as it has the request head, as a real one does, and
        // closes the connection: a client still sending the body would see a broken pipe.
        let (standby, _) = stand_in(
            503,
            r#"{"error":{"code":"standby","message":"standing by"}}"#,
        );
        let (serving, read) = reading_stand_in(r#"{"sha256":"ab","size":3000000}"#);
        let c = Client::new(format!("{standby},{serving}"), None);
        let build = vec![7u8; 3_000_000];
        let up = c.upload_app("acme", "v1", &build).unwrap();
        assert_eq!(up.size, 3_000_000);
        assert_eq!(read.load(Ordering::SeqCst), build.len());
        assert_eq!(c.base(), serving);
    }

    #[test]
    fn a_request_that_may_have_been_carried_out_is_not_sent_again() {
        // The first server reads the submit, then drops the connection: it may have
        // stored the job, so sending it to the next server could make it twice.
        let (dropping, dropping_seen) = stand_in(0, "");
        let (serving, serving_seen) = stand_in(201, r#"{"job_id":"x","status":"queued"}"#);
        let c = Client::new(format!("{dropping},{serving}"), None);
        let spec = qgjob_core::JobSpec::new(
            qgjob_core::OrgId::new("acme").unwrap(),
            qgjob_core::AppVersionId::new("v1").unwrap(),
            vec!["a.spec.js".into()],
        );
        let err = c.submit_job(&spec).unwrap_err();
        assert!(err.is_server_away(), "{err}");
        assert_eq!(dropping_seen.load(Ordering::SeqCst), 1);
        assert_eq!(serving_seen.load(Ordering::SeqCst), 0);
        // The next request starts with the other server.
        assert_eq!(c.base(), serving);
    }
}
