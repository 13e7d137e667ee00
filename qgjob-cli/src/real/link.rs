//! Glue between real devices and the server: [`LoggingLink`] forwards job logs through an
//! [`AgentLink`] (which needs the lease a job runs under, something a `Device` never sees),
//! and [`HttpArtifacts`] downloads builds and bundles from `qgjob server` by hash.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::client::Client;
use async_trait::async_trait;
use qgjob_core::agent::{AgentLink, LinkError};
use qgjob_core::{
    BuildRef, DeviceId, DeviceInfo, HeartbeatAck, InfraFailure, JobId, JobState, Lease, LeaseId,
    RunReport,
};
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
    leases: Mutex<Leases>,
    tx: mpsc::UnboundedSender<LogMsg>,
}

/// Which lease each running job is under, and which jobs each device's lease holds.
#[derive(Default)]
struct Leases {
    of_job: HashMap<JobId, LeaseId>,
    /// A device runs one lease at a time: when it asks for the next, the jobs of its last
    /// one are forgotten, also those whose reports never got through (given up, or the
    /// lease went stale) and that nothing else would remove.
    of_device: HashMap<DeviceId, (LeaseId, Vec<JobId>)>,
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
                                Err(LinkError::Transport(_) | LinkError::Busy(_))
                                    if attempt < 2 =>
                                {
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
            leases: Mutex::new(Leases::default()),
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
            m.of_job.remove(&job);
        }
    }

    /// Jobs whose lease is remembered.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.leases.lock().map(|m| m.of_job.len()).unwrap_or(0)
    }
}

impl LogSink for LoggingLink {
    fn log(&self, job: JobId, _attempt: u32, text: &str) {
        let lease = self
            .leases
            .lock()
            .ok()
            .and_then(|m| m.of_job.get(&job).copied());
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
        if let Ok(mut m) = self.leases.lock() {
            if let Some((last, jobs)) = m.of_device.remove(device) {
                for job in jobs {
                    // Only while it is still that lease's: a job requeued from it may be
                    // running on another device of this agent already.
                    if m.of_job.get(&job) == Some(&last) {
                        m.of_job.remove(&job);
                    }
                }
            }
        }
        let got = self.inner.lease(device, session, max_batch, wait).await?;
        if let Some(lease) = &got {
            if let Ok(mut m) = self.leases.lock() {
                for j in &lease.jobs {
                    m.of_job.insert(j.id, lease.id);
                }
                m.of_device.insert(
                    device.clone(),
                    (lease.id, lease.jobs.iter().map(|j| j.id).collect()),
                );
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
        if !matches!(r, Err(LinkError::Transport(_) | LinkError::Busy(_))) {
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
        if !matches!(r, Err(LinkError::Transport(_) | LinkError::Busy(_))) {
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
/// `/v1/agent/bundles/{sha256}`), streaming them to disk, through the agent's [`Client`]
/// (so they go to the server its other requests go to, and move on past one that is down
/// or standing by like them).
pub struct HttpArtifacts {
    client: Client,
}

impl HttpArtifacts {
    /// A source that downloads through `client` (the agent's, with its agent token).
    pub fn new(client: Client) -> Self {
        HttpArtifacts { client }
    }

    fn download(&self, kind: &str, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
        let mut file = std::fs::File::create(dest)?;
        self.client
            .download(kind, sha, &mut file)
            .map_err(|e| ArtifactError::Fetch {
                what: format!("{kind}/{sha}"),
                message: e.to_string(),
            })?;
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
            me.client
                .agent_build_sha(build.org_id.as_str(), build.app_version_id.as_str())
                .map_err(|e| ArtifactError::Fetch {
                    what: format!("build {build}"),
                    message: e.to_string(),
                })
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

#[cfg(test)]
mod tests {
    use super::*;
    use qgjob_core::{AppVersionId, JobSpec, OrgId};
    use std::collections::VecDeque;

    /// A server stand-in: each lease poll takes the next entry of `script` (a job number
    /// for a one-job lease, or no lease), lease ids count up, every report is refused and
    /// every log line is recorded.
    struct Stub {
        script: Mutex<VecDeque<Option<u64>>>,
        next_lease: std::sync::atomic::AtomicU64,
        logs: Mutex<Vec<(LeaseId, JobId)>>,
    }

    impl Stub {
        fn new(script: impl IntoIterator<Item = Option<u64>>) -> Arc<Stub> {
            Arc::new(Stub {
                script: Mutex::new(script.into_iter().collect()),
                next_lease: std::sync::atomic::AtomicU64::new(1),
                logs: Mutex::new(Vec::new()),
            })
        }
    }

    fn job(n: u64) -> JobId {
        JobId::from_parts(n, [n as u8; 10])
    }

    #[async_trait]
    impl AgentLink for Stub {
        async fn register(&self, _: DeviceInfo) -> Result<(), LinkError> {
            Ok(())
        }
        async fn unregister(&self, _: &DeviceId, _: Option<&str>) -> Result<(), LinkError> {
            Ok(())
        }
        async fn lease(
            &self,
            device: &DeviceId,
            _: Option<&str>,
            _: usize,
            _: Duration,
        ) -> Result<Option<Lease>, LinkError> {
            let Some(n) = self.script.lock().unwrap().pop_front().flatten() else {
                return Ok(None);
            };
            let id = self
                .next_lease
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let build = BuildRef {
                org_id: OrgId::new("acme").unwrap(),
                app_version_id: AppVersionId::new("v1").unwrap(),
            };
            let spec = JobSpec::new(
                build.org_id.clone(),
                build.app_version_id.clone(),
                vec!["tests/a.spec.js".into()],
            );
            Ok(Some(Lease {
                id: LeaseId(id),
                device: device.clone(),
                build,
                install: false,
                jobs: vec![qgjob_core::LeasedJob {
                    id: job(n),
                    attempt: 1,
                    spec,
                }],
                deadline: qgjob_core::Time(0),
            }))
        }
        async fn heartbeat(&self, _: LeaseId) -> Result<HeartbeatAck, LinkError> {
            Err(LinkError::Stale)
        }
        async fn complete(
            &self,
            _: LeaseId,
            _: JobId,
            _: RunReport,
        ) -> Result<JobState, LinkError> {
            Err(LinkError::Transport("503".into()))
        }
        async fn fail(&self, _: LeaseId, _: JobId, _: InfraFailure) -> Result<JobState, LinkError> {
            Err(LinkError::Transport("503".into()))
        }
        async fn log(&self, lease: LeaseId, job: JobId, _: &str) -> Result<(), LinkError> {
            self.logs.lock().unwrap().push((lease, job));
            Ok(())
        }
    }

    fn device(name: &str) -> DeviceId {
        DeviceId::new(name).unwrap()
    }

    #[tokio::test]
    async fn jobs_never_reported_are_forgotten_at_the_next_lease() {
        let link = LoggingLink::new(Stub::new((1..=100).map(Some)));
        let (a, b) = (device("a"), device("b"));
        for _ in 0..50 {
            for d in [&a, &b] {
                let lease = link
                    .lease(d, None, 1, Duration::ZERO)
                    .await
                    .unwrap()
                    .unwrap();
                // Its report never gets through, and it is not retried forever.
                let failure = InfraFailure {
                    kind: qgjob_core::InfraErrorKind::Other,
                    message: "m".into(),
                };
                assert!(link
                    .fail(lease.id, lease.jobs[0].id, failure)
                    .await
                    .is_err());
            }
        }
        // Only the last lease of each device is remembered.
        assert_eq!(link.tracked(), 2);
    }

    #[tokio::test]
    async fn a_job_requeued_to_another_device_keeps_its_logs() {
        // Device a's lease of job 7 expired and b got the job; then a polls again.
        let stub = Stub::new([Some(7), Some(7), None]);
        let link = LoggingLink::new(Arc::clone(&stub) as Arc<dyn AgentLink>);
        let first = link.lease(&device("a"), None, 1, Duration::ZERO).await;
        let second = link.lease(&device("b"), None, 1, Duration::ZERO).await;
        let (first, second) = (first.unwrap().unwrap(), second.unwrap().unwrap());
        assert!(link
            .lease(&device("a"), None, 1, Duration::ZERO)
            .await
            .unwrap()
            .is_none());
        // The job's log, now from b, still reaches the server under b's lease.
        LogSink::log(&*link, job(7), 2, "line");
        link.flush().await;
        assert_ne!(first.id, second.id);
        assert_eq!(*stub.logs.lock().unwrap(), vec![(second.id, job(7))]);
    }
}
