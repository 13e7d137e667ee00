//! [`SimDevice`]: a *simulated* device for demos, the simulator and tests. It sleeps with
//! `tokio::time` instead of installing and running anything, and draws outcomes from a
//! seeded RNG, so under paused tokio time a whole lab runs instantly and reproducibly.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::device::{CancelWatch, Device, JobRun};
use crate::model::{
    BuildRef, Capabilities, DeviceId, DeviceInfo, InfraErrorKind, InfraFailure, LeasedJob,
    RunReport, Target, TestResult, TestStatus,
};
use crate::rng::Rng;

/// How a simulated job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimOutcome {
    /// Every test passes.
    Pass,
    /// One test fails.
    Fail,
    /// One test fails, then passes on retry (the job passes, flagged flaky).
    Flaky,
    /// The runner crashes half way (an infrastructure failure).
    InfraError,
}

/// What a [`SimDevice`] is and how it behaves. Rates are probabilities per job, drawn in the
/// order infra error, fail, flaky.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimDeviceConfig {
    /// Device id.
    pub id: DeviceId,
    /// Its pool.
    pub target: Target,
    /// What it claims to be.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// How long an install takes, ms.
    pub install_ms: u64,
    /// How long a job takes, ms (before jitter).
    pub run_ms: u64,
    /// Run-time jitter as a fraction (0.1 = ±10%).
    #[serde(default)]
    pub run_jitter: f64,
    /// Chance that a job fails a test.
    #[serde(default)]
    pub fail_rate: f64,
    /// Chance that a job passes only on a retry of one test.
    #[serde(default)]
    pub flaky_rate: f64,
    /// Chance that a job ends in an infrastructure failure.
    #[serde(default)]
    pub infra_error_rate: f64,
    /// RNG seed.
    #[serde(default)]
    pub seed: u64,
    /// Fixed outcomes: a job any of whose test paths contains the pattern ends this way,
    /// whatever the rates say (first match wins). For tests that need to know the answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scripted: Vec<(String, SimOutcome)>,
}

impl SimDeviceConfig {
    /// A well-behaved device: 30 s installs, 20 s jobs, no jitter, no failures.
    pub fn new(id: DeviceId, target: Target) -> Self {
        SimDeviceConfig {
            id,
            target,
            capabilities: Capabilities::default(),
            install_ms: 30_000,
            run_ms: 20_000,
            run_jitter: 0.0,
            fail_rate: 0.0,
            flaky_rate: 0.0,
            infra_error_rate: 0.0,
            seed: 0,
            scripted: Vec::new(),
        }
    }
}

/// Counts of what a [`SimDevice`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimDeviceStats {
    /// Builds installed.
    pub installs: u64,
    /// Jobs started.
    pub jobs: u64,
    /// Jobs whose tests all passed (flaky included).
    pub passed: u64,
    /// Jobs with a failing test.
    pub failed: u64,
    /// Jobs that passed only after a retry.
    pub flaky: u64,
    /// Jobs that ended in a simulated infrastructure failure.
    pub infra_errors: u64,
    /// Jobs stopped because they were canceled.
    pub canceled: u64,
    /// Jobs stopped because they ran past their timeout (the agent enforces it for a
    /// simulated device).
    #[serde(default)]
    pub timed_out: u64,
}

#[derive(Debug)]
struct SimState {
    installed: Option<BuildRef>,
    rng: Rng,
    stats: SimDeviceStats,
}

/// A simulated device (no hardware): see the [module docs](self).
#[derive(Debug)]
pub struct SimDevice {
    cfg: SimDeviceConfig,
    state: Mutex<SimState>,
}

/// How a job the watch told to stop ends, counted in `stats`: a cancel, or its timeout.
fn stopped(job: &LeasedJob, cancel: &CancelWatch, stats: &mut SimDeviceStats) -> InfraFailure {
    if cancel.timed_out(job.id) {
        stats.timed_out += 1;
        InfraFailure::timed_out(
            Duration::from_millis(job.spec.timeout_ms),
            "the simulated run was stopped",
        )
    } else {
        stats.canceled += 1;
        InfraFailure {
            kind: InfraErrorKind::Other,
            message: "canceled".into(),
        }
    }
}

/// A test's title from its path: the file name without its extensions
/// (`tests/onboarding.spec.js` → `onboarding`).
fn title_of(path: &str) -> String {
    let file = path.rsplit(['/', '\\']).next().unwrap_or(path);
    let stem = file.split('.').next().unwrap_or(file);
    if stem.is_empty() {
        file.to_string()
    } else {
        stem.to_string()
    }
}

impl SimDevice {
    /// A simulated device with nothing installed.
    pub fn new(cfg: SimDeviceConfig) -> Self {
        let rng = Rng::new(cfg.seed);
        SimDevice {
            cfg,
            state: Mutex::new(SimState {
                installed: None,
                rng,
                stats: SimDeviceStats::default(),
            }),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &SimDeviceConfig {
        &self.cfg
    }

    /// What it has done so far.
    pub fn stats(&self) -> SimDeviceStats {
        self.lock().stats
    }

    /// The build installed now.
    pub fn installed(&self) -> Option<BuildRef> {
        self.lock().installed.clone()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides one job's outcome, duration and which test it hits.
    fn plan(&self, job: &LeasedJob) -> (SimOutcome, u64, usize) {
        let mut st = self.lock();
        let u = st.rng.next_f64();
        let j = st.rng.next_f64();
        let pick = st.rng.next_u64();
        let scripted = self.cfg.scripted.iter().find_map(|(pat, out)| {
            job.spec
                .tests
                .iter()
                .any(|t| t.contains(pat.as_str()))
                .then_some(*out)
        });
        let c = &self.cfg;
        let outcome = scripted.unwrap_or(if u < c.infra_error_rate {
            SimOutcome::InfraError
        } else if u < c.infra_error_rate + c.fail_rate {
            SimOutcome::Fail
        } else if u < c.infra_error_rate + c.fail_rate + c.flaky_rate {
            SimOutcome::Flaky
        } else {
            SimOutcome::Pass
        });
        let jitter = c.run_jitter.clamp(0.0, 1.0) * (j * 2.0 - 1.0);
        let ms = ((c.run_ms as f64) * (1.0 + jitter)).max(0.0) as u64;
        let n = job.spec.tests.len().max(1);
        (outcome, ms, (pick % n as u64) as usize)
    }

    /// Runs one job: sleeps its duration unless told to stop first (canceled, or past its
    /// timeout: the agent says when), which ends it at once.
    async fn run_one(&self, job: &LeasedJob, cancel: &mut CancelWatch) -> JobRun {
        self.lock().stats.jobs += 1;
        let (outcome, ms, hit) = self.plan(job);
        // An infrastructure failure strikes half way through.
        let sleep_ms = if outcome == SimOutcome::InfraError {
            ms / 2
        } else {
            ms
        };
        let finished = tokio::select! {
            biased;
            _ = cancel.canceled(job.id) => false,
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => true,
        };
        let mut st = self.lock();
        if !finished {
            return Err(stopped(job, cancel, &mut st.stats));
        }
        if outcome == SimOutcome::InfraError {
            st.stats.infra_errors += 1;
            return Err(InfraFailure {
                kind: InfraErrorKind::RunnerCrashed,
                message: "simulated runner crash".into(),
            });
        }
        let n = job.spec.tests.len().max(1) as u64;
        let per_test = ms / n;
        let tests: Vec<TestResult> = job
            .spec
            .tests
            .iter()
            .enumerate()
            .map(|(i, path)| {
                let (status, error) = match outcome {
                    SimOutcome::Fail if i == hit => (
                        TestStatus::Failed,
                        Some(format!(
                            "simulated failure: expected element to be visible in {path}"
                        )),
                    ),
                    SimOutcome::Flaky if i == hit => (TestStatus::Flaky, None),
                    _ => (TestStatus::Passed, None),
                };
                TestResult {
                    title: title_of(path),
                    file: path.clone(),
                    status,
                    duration_ms: per_test,
                    error,
                }
            })
            .collect();
        let passed = outcome != SimOutcome::Fail;
        match outcome {
            SimOutcome::Fail => st.stats.failed += 1,
            SimOutcome::Flaky => {
                st.stats.flaky += 1;
                st.stats.passed += 1;
            }
            _ => st.stats.passed += 1,
        }
        Ok(RunReport {
            passed,
            error: tests.iter().find_map(|t| t.error.clone()),
            tests,
            duration_ms: ms,
        })
    }
}

#[async_trait]
impl Device for SimDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.cfg.id.clone(),
            target: self.cfg.target.clone(),
            capabilities: self.cfg.capabilities.clone(),
            installed: self.installed(),
            install_estimate_ms: Some(self.cfg.install_ms),
            idle: false,
            session: None,
            replaces: None,
        }
    }

    async fn install(&self, build: &BuildRef) -> Result<(), InfraFailure> {
        // The old build is gone as soon as an install starts.
        self.lock().installed = None;
        tokio::time::sleep(Duration::from_millis(self.cfg.install_ms)).await;
        let mut st = self.lock();
        st.installed = Some(build.clone());
        st.stats.installs += 1;
        Ok(())
    }

    async fn run(
        &self,
        build: &BuildRef,
        jobs: &[LeasedJob],
        mut cancel: CancelWatch,
    ) -> Vec<JobRun> {
        let installed = self.installed();
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            if installed.as_ref() != Some(build) {
                out.push(Err(InfraFailure {
                    kind: InfraErrorKind::InstallFailed,
                    message: format!("build {build} is not installed on {}", self.cfg.id),
                }));
                continue;
            }
            if cancel.is_canceled(job.id) {
                out.push(Err(stopped(job, &cancel, &mut self.lock().stats)));
                continue;
            }
            out.push(self.run_one(job, &mut cancel).await);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::title_of;

    #[test]
    fn titles_come_from_file_names() {
        assert_eq!(title_of("tests/onboarding.spec.js"), "onboarding");
        assert_eq!(title_of("a/b/checkout.test.ts"), "checkout");
        assert_eq!(title_of("plain"), "plain");
        assert_eq!(title_of(".hidden"), ".hidden");
    }
}
