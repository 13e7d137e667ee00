//! BrowserStack App Automate sessions.
//!
//! Each build is uploaded once (multipart `POST {base}/app-automate/upload`, field `file`,
//! HTTP basic auth with `BROWSERSTACK_USERNAME`/`BROWSERSTACK_ACCESS_KEY`); the `bs://` app
//! URL BrowserStack answers is cached per build content hash (in memory and in
//! `browserstack-apps.json` under the cache dir) and handed to AppWright as its build path
//! (`QGJOB_BUILD_PATH` and `QGJOB_APP_URL`). At most `--parallel N` sessions run at once,
//! across all of an agent's BrowserStack slots.
//!
//! Expiry: BrowserStack deletes uploaded apps after 30 days. An app URL is re-uploaded
//! (a) before use once it is older than `app_ttl` (default 29 days), and (b) when a run
//! fails with output naming an expired or unknown app (any of [`EXPIRY_MARKERS`], the
//! codes expected from BrowserStack for an invalid or expired `app` capability; not
//! verified against the live service, so operators can add texts with
//! `--browserstack-expired-marker`): the cached URL is dropped, the build uploaded again
//! and the job run once more with the new URL.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use qgjob_core::device::{CancelWatch, Device, JobRun};
use qgjob_core::{
    BuildRef, Capabilities, DeviceId, DeviceInfo, InfraErrorKind, InfraFailure, LeasedJob, Target,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Semaphore;

use super::exec::{canceled_run, JobRunner};

/// BrowserStack's API.
pub const DEFAULT_BASE_URL: &str = "https://api-cloud.browserstack.com";

/// Output that means the app URL is no longer valid (matched case-insensitively).
pub const EXPIRY_MARKERS: &[&str] = &[
    "BROWSERSTACK_APP_EXPIRED",
    "BROWSERSTACK_INVALID_APP_CAP",
    "BROWSERSTACK_APP_NOT_FOUND",
    "app url is expired",
];

/// Account and endpoint.
#[derive(Clone)]
pub struct Credentials {
    /// `BROWSERSTACK_USERNAME`.
    pub username: String,
    /// `BROWSERSTACK_ACCESS_KEY` (never logged).
    pub access_key: String,
    /// API base URL (a local stand-in in tests).
    pub base_url: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("access_key", &"<redacted>")
            .field("base_url", &self.base_url)
            .finish()
    }
}

/// An upload failed.
#[derive(Debug, Error)]
#[error("BrowserStack upload failed: {0}")]
pub struct UploadError(pub String);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Upload {
    app_url: String,
    /// Unix seconds.
    uploaded_at: u64,
}

/// Counters of the uploads.
#[derive(Debug, Default)]
pub struct UploadStats {
    /// Uploads made (including re-uploads).
    pub uploads: AtomicU64,
    /// Re-uploads because an app URL expired.
    pub reuploads: AtomicU64,
    /// Uses of a cached app URL.
    pub reused: AtomicU64,
}

/// Uploads builds once and shares their app URLs between an agent's slots.
pub struct Apps {
    creds: Credentials,
    ttl: Duration,
    cache: Mutex<HashMap<String, Upload>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    file: PathBuf,
    /// Output that means an app URL is gone: [`EXPIRY_MARKERS`] plus the operator's own.
    markers: Vec<String>,
    /// Counters.
    pub stats: UploadStats,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

impl Apps {
    /// The account's credentials (for the sessions the tests open).
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// Upload state kept in `state_dir`; app URLs older than `ttl` are re-uploaded.
    pub fn new(creds: Credentials, ttl: Duration, state_dir: &Path) -> Self {
        let file = state_dir.join("browserstack-apps.json");
        let cache = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Apps {
            creds,
            ttl,
            cache: Mutex::new(cache),
            locks: Mutex::new(HashMap::new()),
            file,
            markers: EXPIRY_MARKERS
                .iter()
                .map(|m| m.to_ascii_lowercase())
                .collect(),
            stats: UploadStats::default(),
        }
    }

    /// Also treats output containing any of `extra` (case-insensitive) as an expired app.
    pub fn with_markers(mut self, extra: &[String]) -> Self {
        self.markers.extend(
            extra
                .iter()
                .filter(|m| !m.trim().is_empty())
                .map(|m| m.to_ascii_lowercase()),
        );
        self
    }

    /// Whether a run's output says the app URL is no longer valid.
    pub fn says_expired(&self, output: &str) -> bool {
        let lower = output.to_ascii_lowercase();
        self.markers.iter().any(|m| lower.contains(m.as_str()))
    }

    fn lock_for(&self, sha: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = match self.locks.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        l.entry(sha.to_string()).or_default().clone()
    }

    fn save(&self, map: &HashMap<String, Upload>) {
        if let Ok(text) = serde_json::to_vec_pretty(map) {
            let _ = std::fs::write(&self.file, text);
        }
    }

    /// Forgets the app URL of `sha` if it is still `app_url` (another job may already
    /// have replaced it).
    pub fn expire(&self, sha: &str, app_url: &str) {
        if let Ok(mut m) = self.cache.lock() {
            if m.get(sha).is_some_and(|u| u.app_url == app_url) {
                m.remove(sha);
                self.save(&m);
            }
        }
    }

    /// The app URL of the build `sha` stored at `path`, uploading it unless a fresh one is
    /// cached. Concurrent callers for one build share one upload.
    pub async fn app_url(&self, sha: &str, path: &Path) -> Result<String, UploadError> {
        let lock = self.lock_for(sha);
        let _g = lock.lock().await;
        let cached = self.cache.lock().ok().and_then(|m| m.get(sha).cloned());
        if let Some(u) = &cached {
            if unix_now().saturating_sub(u.uploaded_at) < self.ttl.as_secs() {
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(u.app_url.clone());
            }
        }
        let creds = self.creds.clone();
        let p = path.to_path_buf();
        let url = tokio::task::spawn_blocking(move || upload(&creds, &p))
            .await
            .map_err(|e| UploadError(e.to_string()))??;
        self.stats.uploads.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.cache.lock() {
            m.insert(
                sha.to_string(),
                Upload {
                    app_url: url.clone(),
                    uploaded_at: unix_now(),
                },
            );
            self.save(&m);
        }
        Ok(url)
    }
}

#[derive(Deserialize)]
struct UploadAnswer {
    #[serde(default)]
    app_url: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// One multipart upload (blocking).
fn upload(creds: &Credentials, path: &Path) -> Result<String, UploadError> {
    let file = std::fs::File::open(path).map_err(|e| UploadError(e.to_string()))?;
    let boundary = format!("qgjob-{:016x}", unix_now() ^ u64::from(std::process::id()));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("app")
        .to_string();
    // BrowserStack tells app kinds by file extension; content-addressed cache files have
    // none, so look inside.
    let name = if name.contains('.') {
        name
    } else {
        format!("{name}.{}", guess_extension(path))
    };
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let body = std::io::Cursor::new(head.into_bytes())
        .chain(file)
        .chain(std::io::Cursor::new(tail.into_bytes()));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(1800)))
        .build()
        .into();
    let auth = format!(
        "Basic {}",
        base64(format!("{}:{}", creds.username, creds.access_key).as_bytes())
    );
    let url = format!(
        "{}/app-automate/upload",
        creds.base_url.trim_end_matches('/')
    );
    let mut resp = agent
        .post(&url)
        .header("Authorization", &auth)
        .header(
            "Content-Type",
            &format!("multipart/form-data; boundary={boundary}"),
        )
        .send(ureq::SendBody::from_owned_reader(body))
        .map_err(|e| UploadError(format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| UploadError(format!("{url}: {e}")))?;
    let answer: Option<UploadAnswer> = serde_json::from_str(&text).ok();
    match answer {
        Some(UploadAnswer {
            app_url: Some(u), ..
        }) if (200..300).contains(&status) && u.starts_with("bs://") => Ok(u),
        Some(UploadAnswer { error: Some(e), .. }) => {
            Err(UploadError(format!("HTTP {status}: {e}")))
        }
        _ => Err(UploadError(format!(
            "HTTP {status}: unexpected answer {:?}",
            text.chars().take(200).collect::<String>()
        ))),
    }
}

/// The extension BrowserStack expects for the app at `path`: `ipa` (an iOS archive holds
/// `Payload/`), `aab` (an Android App Bundle holds `BundleConfig.pb`) or `apk`.
pub fn guess_extension(path: &Path) -> &'static str {
    let Ok(mut f) = std::fs::File::open(path) else {
        return "apk";
    };
    let mut buf = vec![0u8; 1 << 16];
    // Keep a small overlap so a name split across two reads is still found.
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) | Err(_) => return "apk",
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let has = |needle: &[u8]| carry.windows(needle.len()).any(|w| w == needle);
        if has(b"Payload/") {
            return "ipa";
        }
        if has(b"BundleConfig.pb") {
            return "aab";
        }
        let keep = carry.len().saturating_sub(16);
        carry.drain(..keep);
    }
}

/// The state all slots of one agent share.
pub struct Shared {
    /// Uploads.
    pub apps: Apps,
    /// At most `--parallel` sessions at once.
    pub sessions: Semaphore,
    /// Sessions running now (for metrics and tests).
    pub running: AtomicU64,
    /// The most sessions seen running at once.
    pub peak: AtomicU64,
}

impl Shared {
    /// Shared state for `parallel` sessions.
    pub fn new(apps: Apps, parallel: usize) -> Arc<Self> {
        Arc::new(Shared {
            apps,
            sessions: Semaphore::new(parallel.max(1)),
            running: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }
}

struct Inner {
    id: DeviceId,
    runner: Arc<JobRunner>,
    shared: Arc<Shared>,
    installed: Mutex<Option<BuildRef>>,
}

/// One BrowserStack slot, registered as a device of target `browserstack`. Jobs of a batch
/// run concurrently, each holding one of the agent's `--parallel` session permits.
pub struct BrowserStackDevice {
    inner: Arc<Inner>,
}

fn install_failed(message: String) -> InfraFailure {
    InfraFailure {
        kind: InfraErrorKind::InstallFailed,
        message,
    }
}

impl BrowserStackDevice {
    /// Slot number `n` of agent `agent`, named `{agent}/browserstack-{n}`.
    pub fn new(
        agent: &str,
        n: usize,
        runner: Arc<JobRunner>,
        shared: Arc<Shared>,
    ) -> Result<Self, String> {
        let id = DeviceId::new(format!("{agent}/browserstack-{n}")).map_err(|e| e.to_string())?;
        Ok(BrowserStackDevice {
            inner: Arc::new(Inner {
                id,
                runner,
                shared,
                installed: Mutex::new(None),
            }),
        })
    }
}

impl Inner {
    async fn upload(&self, build: &BuildRef) -> Result<(String, String), InfraFailure> {
        let (sha, pinned) = self
            .runner
            .cache
            .build(build)
            .await
            .map_err(|e| install_failed(e.to_string()))?;
        let url = self
            .shared
            .apps
            .app_url(&sha, pinned.path())
            .await
            .map_err(|e| install_failed(e.to_string()))?;
        if let Ok(mut g) = self.installed.lock() {
            *g = Some(build.clone());
        }
        Ok((sha, url))
    }

    async fn run_one(
        self: Arc<Self>,
        build: BuildRef,
        job: LeasedJob,
        cancel: CancelWatch,
    ) -> JobRun {
        let note = |t: &str| self.runner.logs.log(job.id, job.attempt, t);
        let permit = tokio::select! {
            p = self.shared.sessions.acquire() => match p {
                Ok(p) => p,
                Err(_) => return canceled_run(),
            },
            _ = super::exec::canceled(cancel.clone(), job.id) => return canceled_run(),
        };
        let now = self.shared.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.peak.fetch_max(now, Ordering::SeqCst);
        let mut result = None;
        // One retry with a fresh upload when BrowserStack says the app URL is gone.
        for round in 0..2 {
            let (sha, url) = match self.upload(&build).await {
                Ok(v) => v,
                Err(f) => {
                    note(&format!("qgjob: {}\n", f.message));
                    result = Some(Err(f));
                    break;
                }
            };
            note(&format!("qgjob: {build} is {url} on BrowserStack\n"));
            // AppWright opens BrowserStack sessions with these credentials, so BrowserStack
            // tests get them (the agent keeps them from every other command).
            let creds = self.shared.apps.credentials();
            let env = vec![
                ("QGJOB_APP_URL".to_string(), url.clone()),
                ("QGJOB_BUILD_PATH".to_string(), url.clone()),
                ("QGJOB_DEVICE_SERIAL".to_string(), self.id.to_string()),
                ("BROWSERSTACK_USERNAME".to_string(), creds.username.clone()),
                (
                    "BROWSERSTACK_ACCESS_KEY".to_string(),
                    creds.access_key.clone(),
                ),
            ];
            let attempt = self
                .runner
                .run_job(&Target::Browserstack, &env, &job, cancel.clone())
                .await;
            let failed = !matches!(&attempt.run, Ok(r) if r.passed);
            let expired = failed && self.shared.apps.says_expired(&attempt.output);
            if expired && round == 0 {
                note("qgjob: BrowserStack no longer knows the app; uploading it again\n");
                self.shared.apps.expire(&sha, &url);
                self.shared
                    .apps
                    .stats
                    .reuploads
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            result = Some(attempt.run);
            break;
        }
        self.shared.running.fetch_sub(1, Ordering::SeqCst);
        drop(permit);
        result.unwrap_or_else(canceled_run)
    }
}

#[async_trait]
impl Device for BrowserStackDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.inner.id.clone(),
            target: Target::Browserstack,
            capabilities: Capabilities::default(),
            installed: self.inner.installed.lock().ok().and_then(|g| g.clone()),
            install_estimate_ms: None,
            idle: false,
            session: None,
            replaces: None,
        }
    }

    async fn install(&self, build: &BuildRef) -> Result<(), InfraFailure> {
        self.inner.upload(build).await.map(|_| ())
    }

    async fn run(&self, build: &BuildRef, jobs: &[LeasedJob], cancel: CancelWatch) -> Vec<JobRun> {
        let mut set = tokio::task::JoinSet::new();
        for (i, job) in jobs.iter().enumerate() {
            let inner = Arc::clone(&self.inner);
            let (b, j, c) = (build.clone(), job.clone(), cancel.clone());
            set.spawn(async move { (i, inner.run_one(b, j, c).await) });
        }
        let mut out: Vec<Option<JobRun>> = vec![None; jobs.len()];
        while let Some(done) = set.join_next().await {
            if let Ok((i, r)) = done {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some(r);
                }
            }
        }
        out.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(InfraFailure {
                        kind: InfraErrorKind::RunnerCrashed,
                        message: "the session task failed".into(),
                    })
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn guesses_the_app_kind_from_its_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, body: Vec<u8>| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).expect("write");
            p
        };
        // The marker straddles the 64 KiB read boundary.
        let mut ipa = vec![0u8; (1 << 16) - 4];
        ipa.extend_from_slice(b"Payload/App.app/Info.plist");
        assert_eq!(guess_extension(&write("a", ipa)), "ipa");
        assert_eq!(
            guess_extension(&write("b", b"PK..BundleConfig.pb..".to_vec())),
            "aab"
        );
        assert_eq!(
            guess_extension(&write("c", b"PK..AndroidManifest.xml".to_vec())),
            "apk"
        );
        assert_eq!(guess_extension(&dir.path().join("missing")), "apk");
    }

    #[test]
    fn recognises_expired_apps_by_built_in_and_operator_markers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = Credentials {
            username: "u".into(),
            access_key: "k".into(),
            base_url: DEFAULT_BASE_URL.into(),
        };
        let apps = Apps::new(creds, Duration::from_secs(60), dir.path())
            .with_markers(&["App not available anymore".to_string(), " ".to_string()]);
        assert!(apps.says_expired("WebDriverError: [browserstack_invalid_app_cap] bad app"));
        assert!(apps.says_expired("error: APP NOT AVAILABLE ANYMORE (bs://x)"));
        assert!(!apps.says_expired("Error: expect(received).toBe(expected)"));
        assert!(!apps.says_expired(""), "a blank marker matches nothing");
    }

    #[test]
    fn credentials_never_print_the_key() {
        let c = Credentials {
            username: "u".into(),
            access_key: "s3cret".into(),
            base_url: DEFAULT_BASE_URL.into(),
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
