//! Runs one leased job on a real device: fetches its test bundle, makes a fresh work dir,
//! runs the test command there with the device's environment, streams the logs, and
//! judges the result. Shared by the adb and BrowserStack devices.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qgjob_core::device::{CancelWatch, JobRun};
use qgjob_core::{InfraErrorKind, InfraFailure, JobId, LeasedJob, RunReport, Target};

use super::cache::ArtifactCache;
use super::runner::{judge, run_command, CommandTemplate, Invocation};

/// Where a job's log text goes (the agent forwards it to the server; see
/// [`super::link::LoggingLink`]).
pub trait LogSink: Send + Sync {
    /// Appends `text` to the log of `job`'s attempt `attempt`.
    fn log(&self, job: JobId, attempt: u32, text: &str);
}

/// A sink that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLogs;

impl LogSink for NoLogs {
    fn log(&self, _job: JobId, _attempt: u32, _text: &str) {}
}

/// A sink that keeps logs in memory, per job (for tests and local runs).
#[derive(Debug, Default)]
pub struct MemoryLogs {
    logs: std::sync::Mutex<std::collections::HashMap<JobId, String>>,
}

impl MemoryLogs {
    /// The log of `job` so far.
    pub fn get(&self, job: JobId) -> String {
        self.logs
            .lock()
            .map(|l| l.get(&job).cloned().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl LogSink for MemoryLogs {
    fn log(&self, job: JobId, _attempt: u32, text: &str) {
        if let Ok(mut l) = self.logs.lock() {
            l.entry(job).or_default().push_str(text);
        }
    }
}

/// How jobs are run; one per agent, shared by its devices.
pub struct JobRunner {
    /// Builds and bundles.
    pub cache: Arc<ArtifactCache>,
    /// The test command.
    pub command: CommandTemplate,
    /// The AppWright project to run (`{project}`); `None` uses the target's name.
    pub project: Option<String>,
    /// Where jobs without a bundle run (an agent-side checkout of the tests).
    pub project_dir: Option<PathBuf>,
    /// Where logs go.
    pub logs: Arc<dyn LogSink>,
    /// SIGTERM → SIGKILL grace period on timeout and cancel.
    pub kill_grace: Duration,
}

/// One job's result plus the output it left, for devices that look for known errors.
pub struct Attempt {
    /// The job's result.
    pub run: JobRun,
    /// The last lines of output and the report's error messages.
    pub output: String,
}

fn infra(kind: InfraErrorKind, message: impl Into<String>) -> InfraFailure {
    InfraFailure {
        kind,
        message: message.into(),
    }
}

/// Resolves once `job` is canceled.
pub async fn canceled(mut cancel: CancelWatch, job: JobId) {
    loop {
        if cancel.is_canceled(job) {
            return;
        }
        cancel.changed().await;
    }
}

/// The result of a canceled job (the scheduler ends it canceled).
pub fn canceled_run() -> JobRun {
    Err(infra(InfraErrorKind::Other, "canceled"))
}

impl JobRunner {
    /// The project name for `target`.
    pub fn project_for(&self, target: &Target) -> String {
        self.project
            .clone()
            .unwrap_or_else(|| target.as_str().to_string())
    }

    /// Runs `job`. `device_env` describes the device and build (serial, build path or app
    /// URL); the job's own variables are added here.
    pub async fn run_job(
        &self,
        target: &Target,
        device_env: &[(String, String)],
        job: &LeasedJob,
        cancel: CancelWatch,
    ) -> Attempt {
        let fail = |kind, msg: String| Attempt {
            run: Err(infra(kind, msg.clone())),
            output: msg,
        };
        if cancel.is_canceled(job.id) {
            return Attempt {
                run: canceled_run(),
                output: String::new(),
            };
        }
        let sink = |text: &str| self.logs.log(job.id, job.attempt, text);
        // Test paths become arguments: one that looks like a flag could change what the
        // runner does, and one that climbs out of the bundle is not a test of it.
        if let Some(bad) =
            job.spec.tests.iter().find(|t| {
                t.starts_with('-') || t.starts_with('/') || t.split('/').any(|c| c == "..")
            })
        {
            let msg = format!("invalid test path {bad:?}: must be relative to the project");
            sink(&format!("qgjob: {msg}\n"));
            return Attempt {
                run: Ok(RunReport {
                    passed: false,
                    tests: Vec::new(),
                    duration_ms: 0,
                    error: Some(msg.clone()),
                }),
                output: msg,
            };
        }
        let name = format!("{}-{}", job.id, job.attempt);
        // Keep the pinned bundle alive for the whole run, so eviction cannot remove it.
        let (_pinned, work, cwd) = match (&job.spec.bundle, &self.project_dir) {
            (Some(sha), _) => {
                let pinned = match self.cache.bundle(sha, &sink).await {
                    Ok(p) => p,
                    Err(e) => return fail(InfraErrorKind::Other, e.to_string()),
                };
                let work = match self.cache.work_dir(pinned.path(), &name) {
                    Ok(w) => w,
                    Err(e) => return fail(InfraErrorKind::Other, e.to_string()),
                };
                let cwd = work.path().to_path_buf();
                (Some(pinned), work, cwd)
            }
            (None, Some(dir)) => {
                let work = match self.cache.scratch_dir(&name) {
                    Ok(w) => w,
                    Err(e) => return fail(InfraErrorKind::Other, e.to_string()),
                };
                (None, work, dir.clone())
            }
            (None, None) => {
                return fail(
                    InfraErrorKind::Other,
                    "the job has no test bundle and this agent has no --project-dir".into(),
                )
            }
        };
        let project = self.project_for(target);
        let mut env: Vec<(String, String)> = vec![
            ("QGJOB_JOB_ID".into(), job.id.to_string()),
            ("QGJOB_ATTEMPT".into(), job.attempt.to_string()),
            ("QGJOB_TARGET".into(), target.to_string()),
            ("QGJOB_PROJECT".into(), project.clone()),
            ("QGJOB_ORG_ID".into(), job.spec.org_id.to_string()),
            (
                "QGJOB_APP_VERSION_ID".into(),
                job.spec.app_version_id.to_string(),
            ),
            ("CI".into(), "1".into()),
        ];
        env.extend(device_env.iter().cloned());
        let timeout = Duration::from_millis(job.spec.timeout_ms);
        let inv = Invocation {
            argv: self.command.expand(&job.spec.tests, &project),
            cwd,
            env,
            timeout,
            kill_grace: self.kill_grace,
            report_path: work.path().join(".qgjob-report.json"),
        };
        sink(&format!(
            "qgjob: running {} (attempt {}) on {}: {}\n",
            job.id,
            job.attempt,
            target,
            inv.argv.join(" ")
        ));
        let out = match run_command(&inv, &sink, canceled(cancel, job.id)).await {
            Ok(o) => o,
            Err(e) => return fail(InfraErrorKind::RunnerCrashed, e.to_string()),
        };
        let run = judge(&out, timeout);
        let mut output = out.tail.clone();
        match &run {
            Ok(r) => {
                for t in &r.tests {
                    if let Some(e) = &t.error {
                        output.push('\n');
                        output.push_str(e);
                    }
                }
                sink(&format!(
                    "qgjob: {} tests, {}\n",
                    r.tests.len(),
                    if r.passed { "passed" } else { "failed" }
                ));
            }
            Err(f) => sink(&format!("qgjob: infrastructure failure ({:?})\n", f.kind)),
        }
        drop(work);
        Attempt { run, output }
    }
}
