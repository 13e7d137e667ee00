//! Glue between real devices and the server: [`LoggingLink`] forwards job logs through an
//! [`AgentLink`] (which needs the lease a job runs under, something a `Device` never sees),
//! and [`HttpArtifacts`] downloads builds and bundles from `qgjob server` by hash.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use qgjob_core::agent::{AgentLink, LinkError};
use qgjob_core::{
    BuildRef, DeviceId, DeviceInfo, HeartbeatAck, InfraFailure, JobId, JobState, Lease, LeaseId,
    RunReport,
};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use super::cache::{ArtifactError, ArtifactSource};
use super::exec::LogSink;

enum LogMsg {
    Text(LeaseId, JobId, String),
    Flush(oneshot::Sender<()>),
}

/// An [`AgentLink`] decorator that remembers which lease each job runs under, so device
/// logs ([`LogSink`]) reach the server's `POST /v1/agent/leases/{lease}/jobs/{job}/logs`.
/// Logs are sent in order by one background task, and a job's logs are flushed before its
/// result is reported.
pub struct LoggingLink {
    inner: Arc<dyn AgentLink>,
    leases: Mutex<HashMap<JobId, LeaseId>>,
    tx: mpsc::UnboundedSender<LogMsg>,
}

impl LoggingLink {
    /// Wraps `inner`. Must be called inside a tokio runtime (it spawns the sender task).
    pub fn new(inner: Arc<dyn AgentLink>) -> Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<LogMsg>();
        let sender = Arc::clone(&inner);
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                match msg {
                    LogMsg::Text(lease, job, text) => {
                        // Logs are best effort: a stale lease or a lost connection must not
                        // hold up the job itself.
                        for attempt in 0..3u32 {
                            match sender.log(lease, job, &text).await {
                                Err(LinkError::Transport(_)) if attempt < 2 => {
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                                _ => break,
                            }
                        }
                    }
                    LogMsg::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Arc::new(LoggingLink {
            inner,
            leases: Mutex::new(HashMap::new()),
            tx,
        })
    }

    async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(LogMsg::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(30), wait).await;
        }
    }

    fn forget(&self, job: JobId) {
        if let Ok(mut m) = self.leases.lock() {
            m.remove(&job);
        }
    }
}

impl LogSink for LoggingLink {
    fn log(&self, job: JobId, _attempt: u32, text: &str) {
        let lease = self.leases.lock().ok().and_then(|m| m.get(&job).copied());
        if let Some(lease) = lease {
            let _ = self.tx.send(LogMsg::Text(lease, job, text.to_string()));
        }
    }
}

#[async_trait]
impl AgentLink for LoggingLink {
    async fn register(&self, device: DeviceInfo) -> Result<(), LinkError> {
        self.inner.register(device).await
    }

    async fn unregister(&self, device: &DeviceId, session: Option<&str>) -> Result<(), LinkError> {
        self.inner.unregister(device, session).await
    }

    async fn lease(
        &self,
        device: &DeviceId,
        session: Option<&str>,
        max_batch: usize,
        wait: Duration,
    ) -> Result<Option<Lease>, LinkError> {
        let got = self.inner.lease(device, session, max_batch, wait).await?;
        if let Some(lease) = &got {
            if let Ok(mut m) = self.leases.lock() {
                for j in &lease.jobs {
                    m.insert(j.id, lease.id);
                }
            }
        }
        Ok(got)
    }

    async fn heartbeat(&self, lease: LeaseId) -> Result<HeartbeatAck, LinkError> {
        self.inner.heartbeat(lease).await
    }

    async fn complete(
        &self,
        lease: LeaseId,
        job: JobId,
        report: RunReport,
    ) -> Result<JobState, LinkError> {
        self.flush().await;
        let r = self.inner.complete(lease, job, report).await;
        if !matches!(r, Err(LinkError::Transport(_))) {
            self.forget(job);
        }
        r
    }

    async fn fail(
        &self,
        lease: LeaseId,
        job: JobId,
        failure: InfraFailure,
    ) -> Result<JobState, LinkError> {
        self.flush().await;
        let r = self.inner.fail(lease, job, failure).await;
        if !matches!(r, Err(LinkError::Transport(_))) {
            self.forget(job);
        }
        r
    }

    async fn log(&self, lease: LeaseId, job: JobId, text: &str) -> Result<(), LinkError> {
        self.inner.log(lease, job, text).await
    }
}

/// Downloads builds and bundles from `qgjob server` (agent protocol routes
/// `GET /v1/agent/apps/{org}/{app_version_id}`, `/v1/agent/builds/{sha256}`,
/// `/v1/agent/bundles/{sha256}`), streaming them to disk.
pub struct HttpArtifacts {
    /// The servers (a server and its standbys), tried in turn from the last that answered.
    bases: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    token: Option<String>,
    agent: ureq::Agent,
}

#[derive(Deserialize)]
struct AppInfo {
    sha256: String,
}

fn enc(s: &str) -> String {
    // Ids are `[A-Za-z0-9._:@/-]`; only `/` and `:`/`@` need escaping in a path segment.
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl HttpArtifacts {
    /// A source for the server at `base` (e.g. `http://127.0.0.1:7878`, or a
    /// comma-separated list of a server and its standbys) with an agent token.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(crate::client::server_tls())
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            // A server that stops answering must not hang the job forever; a big build
            // still has half an hour to arrive.
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(Some(Duration::from_secs(1800)))
            .build()
            .into();
        HttpArtifacts {
            bases: base
                .split(',')
                .map(|b| b.trim().trim_end_matches('/').to_string())
                .filter(|b| !b.is_empty())
                .collect(),
            current: std::sync::atomic::AtomicUsize::new(0),
            token,
            agent,
        }
    }

    /// GETs `path` from the server that answered last; a download changes nothing, so when
    /// that server is down or away (502-504, a standby) the others are asked in turn.
    fn get(&self, path: &str) -> Result<ureq::http::Response<ureq::Body>, String> {
        use std::sync::atomic::Ordering;
        let n = self.bases.len();
        if n == 0 {
            return Err("no server address given".into());
        }
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for k in 0..n {
            let i = (first + k) % n;
            match self.get_from(&self.bases[i], path) {
                Ok(r) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(r);
                }
                Err((away, e)) if away => last = e,
                Err((_, e)) => return Err(e),
            }
        }
        Err(last)
    }

    /// One GET from the server at `base`; on failure, whether the server was away and why.
    fn get_from(
        &self,
        base: &str,
        path: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, (bool, String)> {
        let mut req = self.agent.get(format!("{base}{path}"));
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req.call().map_err(|e| (true, e.to_string()))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            Ok(resp)
        } else {
            let mut resp = resp;
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            // The server's JSON error says what is wrong in words; show those.
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            Err((
                (502..=504).contains(&status),
                format!(
                    "HTTP {status}: {}",
                    message.chars().take(300).collect::<String>()
                ),
            ))
        }
    }

    fn download(&self, kind: &str, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
        let what = format!("{kind}/{sha}");
        let fetch = |m: String| ArtifactError::Fetch {
            what: what.clone(),
            message: m,
        };
        let resp = self
            .get(&format!("/v1/agent/{kind}/{}", enc(sha)))
            .map_err(fetch)?;
        let mut reader = resp.into_body().into_reader();
        let mut file = std::fs::File::create(dest)?;
        std::io::copy(&mut reader, &mut file).map_err(|e| fetch(e.to_string()))?;
        file.flush()?;
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArtifactError> + Send + 'static,
) -> Result<T, ArtifactError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ArtifactError::Io(std::io::Error::other(e.to_string())))?
}

#[async_trait]
impl ArtifactSource for Arc<HttpArtifacts> {
    async fn build_sha(&self, build: &BuildRef) -> Result<String, ArtifactError> {
        let me = Arc::clone(self);
        let build = build.clone();
        blocking(move || {
            let fetch = |m: String| ArtifactError::Fetch {
                what: format!("build {build}"),
                message: m,
            };
            let mut resp = me
                .get(&format!(
                    "/v1/agent/apps/{}/{}",
                    enc(build.org_id.as_str()),
                    enc(build.app_version_id.as_str())
                ))
                .map_err(fetch)?;
            let info: AppInfo = resp
                .body_mut()
                .read_json()
                .map_err(|e| fetch(e.to_string()))?;
            Ok(info.sha256)
        })
        .await
    }

    async fn fetch_build(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
        let (me, sha, dest) = (Arc::clone(self), sha.to_string(), dest.to_path_buf());
        blocking(move || me.download("builds", &sha, &dest)).await
    }

    async fn fetch_bundle(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
        let (me, sha, dest) = (Arc::clone(self), sha.to_string(), dest.to_path_buf());
        blocking(move || me.download("bundles", &sha, &dest)).await
    }
}
