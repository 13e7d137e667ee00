//! Android emulators and USB devices driven through `adb`.
//!
//! Each device installs a build once (`adb -s SERIAL install -r APK`) and remembers which
//! build (by content hash) it holds, in memory and in `installed/<serial>.json` under the
//! cache dir, so a job whose build is already on the device skips the install, also after
//! an agent restart. Devices are named on the command line (`--serial`) or discovered with
//! `adb devices` (serials starting with `emulator-` are emulators, the rest USB devices).
//! When the test command crashes, `adb -s SERIAL get-state` tells a lost device (the job
//! fails with `device_lost`) from a runner crash.
//!
//! iOS: simulators (`xcrun simctl install`) and USB devices (`ideviceinstaller -i`) fit the
//! same shape (install once, pass the UDID) but are not implemented here.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use qgjob_core::device::{CancelWatch, Device, JobRun};
use qgjob_core::{
    BuildRef, Capabilities, DeviceId, DeviceInfo, InfraErrorKind, InfraFailure, LeasedJob,
    Platform, Target,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::process::Command;

use crate::real::cache::Pinned;

use super::exec::{can_share, JobRunner};

/// `adb` could not be run or answered nonsense.
#[derive(Debug, Error)]
#[error("adb: {0}")]
pub struct AdbError(pub String);

/// Counters shared by an agent's adb devices.
#[derive(Debug, Default)]
pub struct InstallStats {
    /// Builds installed with `adb install`.
    pub installs: AtomicU64,
    /// Installs skipped because the device already had the build.
    pub skipped: AtomicU64,
    /// Installs that failed.
    pub failures: AtomicU64,
}

/// A device listed by `adb devices`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The serial.
    pub serial: String,
    /// Its state (`device` when usable; `offline`, `unauthorized`...).
    pub state: String,
}

impl Listed {
    /// Whether this is an emulator (by adb's naming).
    pub fn is_emulator(&self) -> bool {
        self.serial.starts_with("emulator-")
    }
}

/// Parses the output of `adb devices`.
pub fn parse_devices(out: &str) -> Vec<Listed> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("List of devices") && !l.starts_with('*'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let serial = parts.next()?.to_string();
            let state = parts.next()?.to_string();
            Some(Listed { serial, state })
        })
        .collect()
}

/// Runs `adb devices` and returns the usable devices of `target` (emulators for
/// `emulator`, the others for `device`).
pub async fn discover(adb: &Path, target: &Target) -> Result<Vec<String>, AdbError> {
    let out = Command::new(adb)
        .arg("devices")
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| AdbError(format!("cannot run {}: {e}", adb.display())))?;
    if !out.status.success() {
        return Err(AdbError(format!(
            "`adb devices` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let want_emulator = *target == Target::Emulator;
    Ok(parse_devices(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|d| d.state == "device" && d.is_emulator() == want_emulator)
        .map(|d| d.serial)
        .collect())
}

/// Makes sure `adb` can be run at all (`adb version`), for devices named with `--serial`,
/// which are otherwise only asked after in the background. A missing or unrunnable adb is
/// the machine's problem, not a device that is not ready yet: the agent would wait for
/// ever. What adb answers is not checked: a device that is absent or offline may still
/// come, and the agent warns about it then. Never waits more than 10 s.
pub async fn check_runs(adb: &Path) -> Result<(), AdbError> {
    let run = Command::new(adb)
        .arg("version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        Ok(Err(e)) => Err(AdbError(format!("cannot run {}: {e}", adb.display()))),
        // It ran (whatever it said), or it started and hangs: a slow adb is not a missing
        // one, and the devices' own checks will say if it never answers.
        Ok(Ok(_)) | Err(_) => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Installed {
    build: BuildRef,
    sha256: String,
}

/// One Android emulator or USB device.
pub struct AdbDevice {
    id: DeviceId,
    serial: String,
    target: Target,
    adb: PathBuf,
    runner: Arc<JobRunner>,
    installed: Mutex<Option<Installed>>,
    state_file: PathBuf,
    install_ms: AtomicU64,
    install_timeout: Duration,
    stats: Arc<InstallStats>,
    /// What the last `install` call did, for the log of the next job (an install happens
    /// before any job of the lease runs, so it has no job log of its own).
    install_note: Mutex<Option<String>>,
    /// Model and Android version, as `getprop` reported them (jobs may require them).
    props: (Option<String>, Option<String>),
}

impl AdbDevice {
    /// A device `serial` of `target` (emulator or device), named `{agent}/{serial}`.
    pub fn new(
        agent: &str,
        serial: &str,
        target: Target,
        adb: PathBuf,
        runner: Arc<JobRunner>,
        stats: Arc<InstallStats>,
    ) -> Result<Self, AdbError> {
        let id = DeviceId::new(format!("{agent}/{serial}"))
            .map_err(|e| AdbError(format!("device id for serial {serial:?}: {e}")))?;
        let safe: String = serial
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = runner.cache.dir().join("installed");
        let _ = std::fs::create_dir_all(&dir);
        let state_file = dir.join(format!("{safe}.json"));
        // What an earlier agent run installed; a stale record only costs one skipped
        // install (the app is then reinstalled on the next build change).
        let installed = std::fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Installed>(&b).ok());
        Ok(AdbDevice {
            id,
            serial: serial.to_string(),
            target,
            adb,
            runner,
            installed: Mutex::new(installed),
            state_file,
            install_ms: AtomicU64::new(0),
            install_timeout: Duration::from_secs(600),
            stats,
            install_note: Mutex::new(None),
            props: (None, None),
        })
    }

    /// Asks the device for its model and Android version (`adb shell getprop`), so jobs
    /// that require them can match. A device that does not answer keeps them unset.
    pub async fn probe(mut self) -> Self {
        let get = |prop: &'static str| {
            let dev = &self;
            async move {
                match dev
                    .adb(&["shell", "getprop", prop], Duration::from_secs(10))
                    .await
                {
                    Ok((true, out)) => {
                        // As reported ("Pixel 8"), so it equals what submitters require;
                        // control characters dropped and the length capped.
                        let v: String = out
                            .trim()
                            .chars()
                            .filter(|c| !c.is_control())
                            .take(64)
                            .collect();
                        (!v.is_empty()).then_some(v)
                    }
                    _ => None,
                }
            }
        };
        let model = get("ro.product.model").await;
        let version = get("ro.build.version.release").await;
        self.props = (model, version);
        self
    }

    /// The device's serial.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    fn installed(&self) -> Option<Installed> {
        self.installed.lock().ok().and_then(|g| g.clone())
    }

    fn set_installed(&self, v: Installed) {
        if let Ok(text) = serde_json::to_vec(&v) {
            let _ = std::fs::write(&self.state_file, text);
        }
        if let Ok(mut g) = self.installed.lock() {
            *g = Some(v);
        }
    }

    async fn adb(&self, args: &[&str], timeout: Duration) -> Result<(bool, String), AdbError> {
        let cmd = Command::new(&self.adb)
            .arg("-s")
            .arg(&self.serial)
            .args(args)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(timeout, cmd)
            .await
            .map_err(|_| AdbError(format!("adb {} timed out", args.join(" "))))?
            .map_err(|e| AdbError(format!("cannot run {}: {e}", self.adb.display())))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// Whether adb still sees the device as usable.
    pub async fn online(&self) -> bool {
        matches!(
            self.adb(&["get-state"], Duration::from_secs(10)).await,
            Ok((true, s)) if s.trim() == "device"
        )
    }

    /// Installs `build` unless the device already holds the same content. `note` receives
    /// progress lines for the job logs.
    async fn ensure(
        &self,
        build: &BuildRef,
        note: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(PathBuf, Pinned), InfraFailure> {
        let (sha, pinned) = self
            .runner
            .cache
            .build(build)
            .await
            .map_err(|e| InfraFailure {
                kind: InfraErrorKind::InstallFailed,
                message: e.to_string(),
            })?;
        let path =
            apk_name(self.runner.cache.dir(), &sha, pinned.path()).map_err(|e| InfraFailure {
                kind: InfraErrorKind::InstallFailed,
                message: format!("cannot name the build {sha} as an .apk: {e}"),
            })?;
        if self
            .installed()
            .is_some_and(|i| i.build == *build && i.sha256 == sha)
        {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            note(&format!(
                "qgjob: {build} is already installed on {}\n",
                self.serial
            ));
            return Ok((path, pinned));
        }
        let started = Instant::now();
        let apk = path.display().to_string();
        let res = self
            .adb(&["install", "-r", &apk], self.install_timeout)
            .await;
        let failed = |msg: String| {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            InfraFailure {
                kind: InfraErrorKind::InstallFailed,
                message: msg,
            }
        };
        match res {
            // adb prints "Failure [REASON]" and, on old versions, still exits 0.
            Ok((true, out)) if !out.contains("Failure") => {
                self.stats.installs.fetch_add(1, Ordering::Relaxed);
                let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                self.install_ms.store(ms.max(1), Ordering::Relaxed);
                self.set_installed(Installed {
                    build: build.clone(),
                    sha256: sha,
                });
                note(&format!(
                    "qgjob: installed {build} on {} in {ms} ms\n",
                    self.serial
                ));
                Ok((path, pinned))
            }
            Ok((_, out)) => {
                let lost = !self.online().await;
                let mut f = failed(format!(
                    "adb install on {} failed: {}",
                    self.serial,
                    out.trim()
                ));
                if lost {
                    f.kind = InfraErrorKind::DeviceLost;
                }
                Err(f)
            }
            Err(e) => Err(failed(e.to_string())),
        }
    }
}

#[async_trait]
impl Device for AdbDevice {
    async fn healthy(&self) -> bool {
        self.online().await
    }

    fn info(&self) -> DeviceInfo {
        let ms = self.install_ms.load(Ordering::Relaxed);
        DeviceInfo {
            id: self.id.clone(),
            target: self.target.clone(),
            capabilities: Capabilities {
                platform: Some(Platform::Android),
                model: self.props.0.clone(),
                os_version: self.props.1.clone(),
            },
            installed: self.installed().map(|i| i.build),
            install_estimate_ms: (ms > 0).then_some(ms),
            idle: false,
            session: None,
            replaces: None,
        }
    }

    async fn install(&self, build: &BuildRef) -> Result<(), InfraFailure> {
        let note = Mutex::new(String::new());
        let r = self
            .ensure(build, &|t: &str| {
                if let Ok(mut n) = note.lock() {
                    n.push_str(t);
                }
            })
            .await;
        if let (Ok(text), Ok(mut slot)) = (note.into_inner(), self.install_note.lock()) {
            *slot = Some(text);
        }
        r.map(|_| ())
    }

    async fn run(&self, build: &BuildRef, jobs: &[LeasedJob], cancel: CancelWatch) -> Vec<JobRun> {
        let install_note = self.install_note.lock().ok().and_then(|mut n| n.take());
        if can_share(jobs) {
            return self.run_shared(build, jobs, cancel, install_note).await;
        }
        let mut out = Vec::with_capacity(jobs.len());
        // One app runs on a device at a time: the batch's jobs go one after the other.
        for (i, job) in jobs.iter().enumerate() {
            let note = |t: &str| self.runner.logs.log(job.id, job.attempt, t);
            if i == 0 {
                if let Some(text) = &install_note {
                    note(text);
                }
            }
            // The scheduler may not know what is on the device (an agent restart, another
            // tool installing): make sure before running. Right after this lease's install,
            // "already installed" would only repeat it.
            let just_installed = i == 0 && install_note.is_some();
            let quiet = |_: &str| {};
            let ensure_note: &(dyn Fn(&str) + Send + Sync) =
                if just_installed { &quiet } else { &note };
            // The pin keeps the build out of cache eviction while the job may use it.
            let (apk, _pin) = match self.ensure(build, ensure_note).await {
                Ok(p) => p,
                Err(f) => {
                    note(&format!("qgjob: {}\n", f.message));
                    out.push(Err(f));
                    continue;
                }
            };
            let attempt = self
                .runner
                .run_job(&self.target, &self.env(&apk), job, cancel.clone())
                .await;
            out.push(self.lost_or(attempt.run).await);
        }
        out
    }
}

impl AdbDevice {
    fn env(&self, apk: &Path) -> Vec<(String, String)> {
        vec![
            ("QGJOB_DEVICE_SERIAL".to_string(), self.serial.clone()),
            ("ANDROID_SERIAL".to_string(), self.serial.clone()),
            ("QGJOB_BUILD_PATH".to_string(), apk.display().to_string()),
        ]
    }

    /// A runner crash on a device adb no longer sees is the device's loss.
    async fn lost_or(&self, run: JobRun) -> JobRun {
        match run {
            Err(f) if f.kind == InfraErrorKind::RunnerCrashed && !self.online().await => {
                Err(InfraFailure {
                    kind: InfraErrorKind::DeviceLost,
                    message: format!("device {} went away: {}", self.serial, f.message),
                })
            }
            other => other,
        }
    }

    /// A batch whose jobs share one runner process ([`JobRunner::run_batch`]).
    async fn run_shared(
        &self,
        build: &BuildRef,
        jobs: &[LeasedJob],
        cancel: CancelWatch,
        install_note: Option<String>,
    ) -> Vec<JobRun> {
        let first = &jobs[0];
        let note = |t: &str| self.runner.logs.log(first.id, first.attempt, t);
        if let Some(text) = &install_note {
            note(text);
        }
        let quiet = |_: &str| {};
        let ensure_note: &(dyn Fn(&str) + Send + Sync) = if install_note.is_some() {
            &quiet
        } else {
            &note
        };
        // The pin keeps the build out of cache eviction while the jobs may use it.
        let (apk, _pin) = match self.ensure(build, ensure_note).await {
            Ok(p) => p,
            Err(f) => {
                note(&format!("qgjob: {}\n", f.message));
                return jobs.iter().map(|_| Err(f.clone())).collect();
            }
        };
        let attempts = self
            .runner
            .run_batch(&self.target, &self.env(&apk), jobs, cancel)
            .await;
        let mut out = Vec::with_capacity(attempts.len());
        for a in attempts {
            out.push(self.lost_or(a.run).await);
        }
        out
    }
}

/// `adb install` refuses a file whose name does not end in `.apk` (and Appium's `app`
/// capability, which AppWright fills from `QGJOB_BUILD_PATH`, wants one too), while the
/// cache names builds by their digest alone. So the build gets a `<sha256>.apk` name under
/// `CACHE/apk/`: a symbolic link to the cached file, made once and shared by the devices.
fn apk_name(cache_dir: &Path, sha: &str, build: &Path) -> std::io::Result<PathBuf> {
    let dir = cache_dir.join("apk");
    std::fs::create_dir_all(&dir)?;
    let link = dir.join(format!("{sha}.apk"));
    match std::fs::read_link(&link) {
        Ok(target) if target == build => return Ok(link),
        Ok(_) => std::fs::remove_file(&link)?,
        Err(_) => {}
    }
    match std::os::unix::fs::symlink(build, &link) {
        // Another device of this agent made it at the same moment, to the same file.
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(link),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_adb_devices() {
        let out = "* daemon started successfully\nList of devices attached\nemulator-5554\tdevice\nR58M123\tdevice product:x model:Pixel_8\n0123\tunauthorized\n\n";
        let l = parse_devices(out);
        assert_eq!(
            l,
            vec![
                Listed {
                    serial: "emulator-5554".into(),
                    state: "device".into()
                },
                Listed {
                    serial: "R58M123".into(),
                    state: "device".into()
                },
                Listed {
                    serial: "0123".into(),
                    state: "unauthorized".into()
                },
            ]
        );
        assert!(l[0].is_emulator() && !l[1].is_emulator());
    }
}
