//! Runs one leased job on a real device: fetches its test bundle, makes a fresh work dir,
//! runs the test command there with the device's environment, streams the logs, and
//! judges the result. Shared by the adb and BrowserStack devices.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use qgjob_core::device::{CancelWatch, Device, JobRun};
use qgjob_core::{
    BuildRef, DeviceInfo, InfraErrorKind, InfraFailure, JobId, LeasedJob, RunReport, Target,
    TestResult,
};

use super::cache::{ArtifactCache, Pinned, WorkDir};
use super::playwright::{parse_report, ParsedReport};
use super::runner::{judge, run_command, CommandTemplate, Ended, Invocation};

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
        if let Some(bad) = job.spec.tests.iter().find(|t| bad_test_path(t)) {
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
        let prepared = match self.prepare(job.spec.bundle.as_deref(), &name, &sink).await {
            Ok(p) => p,
            Err(msg) => return fail(InfraErrorKind::Other, msg),
        };
        let (work, cwd) = (&prepared.work, prepared.cwd.clone());
        let project = self.project_for(target);
        let mut env = self.job_env(target, &project, job);
        env.extend(device_env.iter().cloned());
        let timeout = Duration::from_millis(job.spec.timeout_ms);
        let inv = Invocation {
            argv: self.command.expand(
                &job.spec.tests,
                &project,
                &cwd,
                &work.path().join("test-results"),
            ),
            cwd,
            env,
            timeout,
            kill_grace: self.kill_grace,
            report_path: work.path().join(".qgjob-report.json"),
            groups_dir: Some(self.cache.groups_dir()),
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
        drop(prepared);
        Attempt { run, output }
    }

    /// Runs a batch of jobs of one build. Jobs that can share one runner process (same
    /// bundle, distinct spec files: see [`can_share`]) run in a single invocation of the
    /// test command, which saves the runner's start-up (an Appium session) per job; their
    /// results are split by spec file. Otherwise, and whenever the shared run cannot be
    /// attributed job by job (errors outside tests, a job without results), jobs run one
    /// after the other. In a shared run `QGJOB_JOB_ID`/`QGJOB_ATTEMPT` are the first job's
    /// and `QGJOB_JOB_IDS` lists all; the timeout is the sum of the jobs' timeouts; every
    /// job's log gets the whole output.
    pub async fn run_batch(
        &self,
        target: &Target,
        device_env: &[(String, String)],
        jobs: &[LeasedJob],
        cancel: CancelWatch,
    ) -> Vec<Attempt> {
        if !can_share(jobs) || jobs.iter().any(|j| cancel.is_canceled(j.id)) {
            let mut out = Vec::with_capacity(jobs.len());
            for job in jobs {
                out.push(self.run_job(target, device_env, job, cancel.clone()).await);
            }
            return out;
        }
        let sink = |text: &str| {
            for j in jobs {
                self.logs.log(j.id, j.attempt, text);
            }
        };
        let first = &jobs[0];
        let name = format!("{}-{}-batch", first.id, first.attempt);
        let prepared = match self
            .prepare(first.spec.bundle.as_deref(), &name, &sink)
            .await
        {
            Ok(p) => p,
            Err(msg) => {
                return jobs
                    .iter()
                    .map(|_| Attempt {
                        run: Err(infra(InfraErrorKind::Other, msg.clone())),
                        output: msg.clone(),
                    })
                    .collect()
            }
        };
        let project = self.project_for(target);
        let mut env = self.job_env(target, &project, first);
        env.push((
            "QGJOB_JOB_IDS".into(),
            jobs.iter()
                .map(|j| j.id.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ));
        env.extend(device_env.iter().cloned());
        let tests: Vec<String> = jobs.iter().flat_map(|j| j.spec.tests.clone()).collect();
        let timeout = Duration::from_millis(
            jobs.iter()
                .map(|j| j.spec.timeout_ms)
                .fold(0u64, u64::saturating_add),
        );
        let inv = Invocation {
            argv: self.command.expand(
                &tests,
                &project,
                &prepared.cwd,
                &prepared.work.path().join("test-results"),
            ),
            cwd: prepared.cwd.clone(),
            env,
            timeout,
            kill_grace: self.kill_grace,
            report_path: prepared.work.path().join(".qgjob-report.json"),
            groups_dir: Some(self.cache.groups_dir()),
        };
        sink(&format!(
            "qgjob: running {} jobs in one runner on {}: {}\n",
            jobs.len(),
            target,
            inv.argv.join(" ")
        ));
        // A cancel stops the shared process at once (a job is often canceled because it
        // hangs, and the device must come free); the others then run again on their own,
        // within this lease, so they keep their attempt.
        let any_canceled = async {
            let mut c = cancel.clone();
            loop {
                if jobs.iter().any(|j| c.is_canceled(j.id)) {
                    return;
                }
                c.changed().await;
            }
        };
        let out = match run_command(&inv, &sink, any_canceled).await {
            Ok(o) => o,
            Err(e) => {
                let msg = e.to_string();
                return jobs
                    .iter()
                    .map(|_| Attempt {
                        run: Err(infra(InfraErrorKind::RunnerCrashed, msg.clone())),
                        output: msg.clone(),
                    })
                    .collect();
            }
        };
        drop(prepared);
        if out.ended == Ended::Canceled {
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                if cancel.is_canceled(job.id) {
                    results.push(Attempt {
                        run: canceled_run(),
                        output: out.tail.clone(),
                    });
                } else {
                    sink(&format!(
                        "qgjob: a job sharing the runner was canceled; running {} alone\n",
                        job.id
                    ));
                    results.push(self.run_job(target, device_env, job, cancel.clone()).await);
                }
            }
            return results;
        }
        let whole = judge(&out, timeout);
        let report = match (&whole, out.report.as_deref().map(parse_report)) {
            (Ok(_), Some(Ok(r))) => r,
            _ => {
                // Timeout or crash: every job of the run shares the failure.
                let run = match whole {
                    Err(f) => Err(f),
                    Ok(_) => Err(infra(InfraErrorKind::RunnerCrashed, "unreadable report")),
                };
                return jobs
                    .iter()
                    .map(|_| Attempt {
                        run: run.clone(),
                        output: out.tail.clone(),
                    })
                    .collect();
            }
        };
        let mut per_job: Vec<Vec<TestResult>> = vec![Vec::new(); jobs.len()];
        for t in report.tests {
            if let Some(i) = owner(&t.file, jobs) {
                per_job[i].push(t);
            }
        }
        let mut results = Vec::with_capacity(jobs.len());
        for (job, tests) in jobs.iter().zip(per_job) {
            if cancel.is_canceled(job.id) {
                results.push(Attempt {
                    run: canceled_run(),
                    output: out.tail.clone(),
                });
                continue;
            }
            if !report.errors.is_empty() || tests.is_empty() {
                // Not attributable (a spec that does not load, a file that matched
                // nothing): run this job on its own.
                sink(&format!(
                    "qgjob: the shared run did not give {} its own results; running it alone\n",
                    job.id
                ));
                results.push(self.run_job(target, device_env, job, cancel.clone()).await);
                continue;
            }
            let one = ParsedReport {
                tests,
                errors: Vec::new(),
                duration_ms: 0,
                setup_failed: false,
            };
            let passed = one.passed();
            let mut output = out.tail.clone();
            for t in &one.tests {
                if let Some(e) = &t.error {
                    output.push('\n');
                    output.push_str(e);
                }
            }
            let error = if passed { None } else { one.failure_summary() };
            results.push(Attempt {
                run: Ok(RunReport {
                    passed,
                    duration_ms: one.tests.iter().map(|t| t.duration_ms).sum(),
                    tests: one.tests,
                    error,
                }),
                output,
            });
        }
        results
    }

    /// Fetches the bundle (or picks the project dir) and makes the work dir.
    async fn prepare(
        &self,
        bundle: Option<&str>,
        name: &str,
        sink: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Prepared, String> {
        match (bundle, &self.project_dir) {
            (Some(sha), _) => {
                let pinned = self
                    .cache
                    .bundle(sha, sink)
                    .await
                    .map_err(|e| e.to_string())?;
                let work = self
                    .cache
                    .work_dir(pinned.path(), name)
                    .map_err(|e| e.to_string())?;
                let cwd = work.path().to_path_buf();
                Ok(Prepared {
                    _pinned: Some(pinned),
                    work,
                    cwd,
                })
            }
            (None, Some(dir)) => Ok(Prepared {
                _pinned: None,
                work: self.cache.scratch_dir(name).map_err(|e| e.to_string())?,
                cwd: dir.clone(),
            }),
            (None, None) => {
                Err("the job has no test bundle and this agent has no --project-dir".into())
            }
        }
    }

    fn job_env(&self, target: &Target, project: &str, job: &LeasedJob) -> Vec<(String, String)> {
        vec![
            ("QGJOB_JOB_ID".into(), job.id.to_string()),
            ("QGJOB_ATTEMPT".into(), job.attempt.to_string()),
            ("QGJOB_TARGET".into(), target.to_string()),
            ("QGJOB_PROJECT".into(), project.to_string()),
            ("QGJOB_ORG_ID".into(), job.spec.org_id.to_string()),
            (
                "QGJOB_APP_VERSION_ID".into(),
                job.spec.app_version_id.to_string(),
            ),
            ("CI".into(), "1".into()),
            self.cache.process_mark(),
        ]
    }
}

/// A real device, whose jobs run through a [`JobRunner`]: the runner holds each job to its
/// timeout itself (from the start of the test command, so a bundle's download and npm
/// install do not count, and a batch sharing one runner process gets the sum of its jobs'
/// timeouts), so the agent is told not to (see [`Device::enforces_timeouts`]). Declared
/// here, for every kind of real device at once, because it is the runner's doing.
pub struct SelfTimed<D>(pub D);

#[async_trait]
impl<D: Device> Device for SelfTimed<D> {
    fn info(&self) -> DeviceInfo {
        self.0.info()
    }

    async fn install(&self, build: &BuildRef) -> Result<(), InfraFailure> {
        self.0.install(build).await
    }

    async fn run(&self, build: &BuildRef, jobs: &[LeasedJob], cancel: CancelWatch) -> Vec<JobRun> {
        self.0.run(build, jobs, cancel).await
    }

    async fn healthy(&self) -> bool {
        self.0.healthy().await
    }

    fn enforces_timeouts(&self) -> bool {
        true
    }
}

/// A work dir with the bundle it was copied from (pinned while the job runs).
struct Prepared {
    _pinned: Option<Pinned>,
    work: WorkDir,
    cwd: PathBuf,
}

/// Whether a test path is unusable as a runner argument: a flag, absolute, or climbing out
/// of the project.
fn bad_test_path(t: &str) -> bool {
    t.starts_with('-') || t.starts_with('/') || t.split('/').any(|c| c == "..")
}

fn base_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Whether `jobs` can run in one runner process: more than one, one bundle, valid paths,
/// and spec files whose names are distinct across the batch (results are attributed by
/// file, and Playwright reports files relative to its test dir, so names must not clash).
pub fn can_share(jobs: &[LeasedJob]) -> bool {
    if jobs.len() < 2 {
        return false;
    }
    let bundle = &jobs[0].spec.bundle;
    let mut names = std::collections::HashSet::new();
    jobs.iter().all(|j| {
        j.spec.bundle == *bundle
            && j.spec
                .tests
                .iter()
                .all(|t| !bad_test_path(t) && names.insert(base_name(t).to_string()))
    })
}

/// The job of the batch whose spec file is `file` (as Playwright reports it: relative to
/// its test dir or root dir).
fn owner(file: &str, jobs: &[LeasedJob]) -> Option<usize> {
    let file = file.trim_start_matches("./");
    jobs.iter().position(|j| {
        j.spec.tests.iter().any(|t| {
            let t = t.trim_start_matches("./");
            t == file || t.ends_with(&format!("/{file}")) || file.ends_with(&format!("/{t}"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgjob_core::JobSpec;

    fn job(tests: &[&str], bundle: Option<&str>) -> LeasedJob {
        let mut spec = JobSpec::new(
            "acme".parse().expect("org"),
            "v1".parse().expect("version"),
            tests.iter().map(|t| t.to_string()).collect(),
        );
        spec.bundle = bundle.map(str::to_string);
        LeasedJob {
            id: JobId::from_parts(1, [tests.len() as u8; 10]),
            attempt: 1,
            spec,
        }
    }

    #[test]
    fn only_distinct_spec_files_of_one_bundle_share_a_runner() {
        let b = Some("ab");
        assert!(!can_share(&[job(&["tests/a.spec.ts"], b)]));
        assert!(can_share(&[
            job(&["tests/a.spec.ts"], b),
            job(&["tests/b.spec.ts", "tests/c.spec.ts"], b)
        ]));
        // Same file name in two folders: Playwright may report both as `a.spec.ts`.
        assert!(!can_share(&[
            job(&["tests/a.spec.ts"], b),
            job(&["other/a.spec.ts"], b)
        ]));
        assert!(!can_share(&[
            job(&["tests/a.spec.ts"], b),
            job(&["tests/b.spec.ts"], Some("cd"))
        ]));
        assert!(!can_share(&[
            job(&["tests/a.spec.ts"], b),
            job(&["--config=/etc/x"], b)
        ]));
    }

    #[test]
    fn results_go_to_the_job_that_named_the_file() {
        let jobs = [
            job(&["tests/onboarding.spec.ts"], None),
            job(&["./tests/search.spec.ts"], None),
        ];
        // Relative to the project root, or to an AppWright testDir of `./tests`.
        assert_eq!(owner("tests/onboarding.spec.ts", &jobs), Some(0));
        assert_eq!(owner("onboarding.spec.ts", &jobs), Some(0));
        assert_eq!(owner("search.spec.ts", &jobs), Some(1));
        assert_eq!(owner("cart.spec.ts", &jobs), None);
    }
}
