//! Workload format v1: the pools of a simulated lab and the jobs submitted to it, with
//! validation that names the offending entry.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::bound::BoundJob;
use super::SimError;
use crate::model::{AppVersionId, BuildRef, OrgId, Priority, Target, Time};

/// Largest time or duration accepted, in seconds (about 31 years): keeps every millisecond
/// sum far from overflowing.
pub(crate) const MAX_SECONDS: f64 = 1e9;

/// Most devices a pool may have: every idle device asks for work at every event, so a
/// typo'd million-device pool would make a simulation crawl instead of failing fast.
pub const MAX_POOL_DEVICES: u32 = 10_000;

/// A simulated workload: pools of devices and the jobs submitted to them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawWorkload")]
pub struct Workload {
    /// A name for reports.
    pub name: String,
    /// The device pools, one per target.
    pub pools: Vec<WorkloadPool>,
    /// The jobs, in any order (jobs due at the same instant are submitted in this order).
    pub jobs: Vec<WorkloadJob>,
}

/// One target pool of identical devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadPool {
    /// The pool's target.
    pub target: Target,
    /// How many devices (at least 1).
    pub devices: u32,
    /// Seconds one install of a build takes on one of its devices.
    pub install_s: f64,
}

/// One job of a workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadJob {
    /// The submitting org.
    pub org_id: OrgId,
    /// The app build it tests.
    pub app_version_id: AppVersionId,
    /// Its pool.
    pub target: Target,
    /// Higher is more urgent (-1000 to 1000).
    pub priority: i32,
    /// When it is submitted, seconds from the start.
    pub submit_s: f64,
    /// How long its tests run, seconds (install excluded).
    pub duration_s: f64,
    /// How it ends.
    pub outcome: SimOutcome,
}

impl WorkloadJob {
    /// The build this job tests.
    pub fn build(&self) -> BuildRef {
        BuildRef {
            org_id: self.org_id.clone(),
            app_version_id: self.app_version_id.clone(),
        }
    }

    /// The device time this job takes, ms: its duration, plus half of it again for
    /// `infra_error_once` (the failed first attempt).
    pub fn work_ms(&self) -> u64 {
        let d = to_ms(self.duration_s);
        match self.outcome {
            SimOutcome::InfraErrorOnce => d + d / 2,
            _ => d,
        }
    }
}

/// How a simulated job ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimOutcome {
    /// Its tests pass.
    Passed,
    /// A test fails after the full duration; not retried.
    Failed,
    /// The first attempt hits an infrastructure failure after half the duration; the retry
    /// passes.
    InfraErrorOnce,
}

impl SimOutcome {
    /// The outcome's name in the workload format.
    pub fn as_str(self) -> &'static str {
        match self {
            SimOutcome::Passed => "passed",
            SimOutcome::Failed => "failed",
            SimOutcome::InfraErrorOnce => "infra_error_once",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            SimOutcome::Passed,
            SimOutcome::Failed,
            SimOutcome::InfraErrorOnce,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }
}

/// Seconds to whole milliseconds. Callers validate first, so the value is finite, ≥ 0 and
/// at most [`MAX_SECONDS`].
pub(crate) fn to_ms(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

/// Checks that a time or duration is finite, not negative and not absurdly large.
fn check_seconds(v: f64) -> Result<(), String> {
    if !v.is_finite() {
        return Err("must be a finite number".into());
    }
    if v < 0.0 {
        return Err(format!("must not be negative (got {v})"));
    }
    if v > MAX_SECONDS {
        return Err(format!("must be at most {MAX_SECONDS} seconds (got {v})"));
    }
    Ok(())
}

impl Workload {
    /// The jobs of the pool of `target` as [`super::lower_bound`] sees them, in workload
    /// order: to compute the bound of that pool under other assumptions (say, fewer devices).
    pub fn bound_jobs(&self, target: &Target) -> Vec<BoundJob> {
        self.jobs
            .iter()
            .filter(|j| &j.target == target)
            .map(|j| BoundJob {
                submit: Time(to_ms(j.submit_s)),
                work_ms: j.work_ms(),
                build: j.build(),
            })
            .collect()
    }

    /// Parses and validates a workload in format v1.
    ///
    /// ```
    /// let w = qgjob_core::sim::Workload::from_json(r#"{"name": "w1",
    ///   "pools": [{"target": "emulator", "devices": 8, "install_s": 45.0}],
    ///   "jobs": [{"org_id": "acme", "app_version_id": "v1", "target": "emulator",
    ///             "priority": 3, "submit_s": 0.0, "duration_s": 32.5, "outcome": "passed"}]}"#)
    ///     .unwrap();
    /// assert_eq!(w.jobs.len(), 1);
    /// ```
    pub fn from_json(text: &str) -> Result<Workload, SimError> {
        let raw: RawWorkload =
            serde_json::from_str(text).map_err(|e| SimError::Json(e.to_string()))?;
        Workload::from_raw(raw)
    }

    /// The workload as pretty-printed JSON (format v1).
    pub fn to_json(&self) -> String {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the rules that the types alone do not: 1 to [`MAX_POOL_DEVICES`] devices per
    /// pool, one pool per target, finite non-negative times, priorities in range, and a pool
    /// for every job's target. The error names the first offending entry.
    pub fn validate(&self) -> Result<(), SimError> {
        let mut targets = BTreeSet::new();
        for (index, p) in self.pools.iter().enumerate() {
            if p.devices == 0 || p.devices > MAX_POOL_DEVICES {
                return Err(SimError::InvalidPool {
                    index,
                    field: "devices",
                    message: format!(
                        "must be between 1 and {MAX_POOL_DEVICES} (got {})",
                        p.devices
                    ),
                });
            }
            check_seconds(p.install_s).map_err(|message| SimError::InvalidPool {
                index,
                field: "install_s",
                message,
            })?;
            if !targets.insert(p.target.clone()) {
                return Err(SimError::DuplicatePool {
                    index,
                    target: p.target.to_string(),
                });
            }
        }
        for (index, j) in self.jobs.iter().enumerate() {
            if !(Priority::MIN..=Priority::MAX).contains(&j.priority) {
                return Err(SimError::InvalidJob {
                    index,
                    field: "priority",
                    message: format!(
                        "must be between {} and {} (got {})",
                        Priority::MIN,
                        Priority::MAX,
                        j.priority
                    ),
                });
            }
            check_seconds(j.submit_s).map_err(|message| SimError::InvalidJob {
                index,
                field: "submit_s",
                message,
            })?;
            check_seconds(j.duration_s).map_err(|message| SimError::InvalidJob {
                index,
                field: "duration_s",
                message,
            })?;
            if !targets.contains(&j.target) {
                return Err(SimError::NoPool {
                    index,
                    target: j.target.to_string(),
                });
            }
        }
        Ok(())
    }

    fn from_raw(raw: RawWorkload) -> Result<Workload, SimError> {
        let mut pools = Vec::with_capacity(raw.pools.len());
        for (index, p) in raw.pools.into_iter().enumerate() {
            let bad = |field: &'static str, message: String| SimError::InvalidPool {
                index,
                field,
                message,
            };
            let target: Target = p
                .target
                .parse()
                .map_err(|e: crate::InvalidSpec| bad("target", e.message))?;
            if p.devices < 1 {
                return Err(bad(
                    "devices",
                    format!("must be at least 1 (got {})", p.devices),
                ));
            }
            let devices = u32::try_from(p.devices)
                .map_err(|_| bad("devices", format!("too many devices ({})", p.devices)))?;
            pools.push(WorkloadPool {
                target,
                devices,
                install_s: p.install_s,
            });
        }
        let mut jobs = Vec::with_capacity(raw.jobs.len());
        for (index, j) in raw.jobs.into_iter().enumerate() {
            let bad = |field: &'static str, message: String| SimError::InvalidJob {
                index,
                field,
                message,
            };
            let org_id = OrgId::new(j.org_id).map_err(|e| bad("org_id", e.message))?;
            let app_version_id = AppVersionId::new(j.app_version_id)
                .map_err(|e| bad("app_version_id", e.message))?;
            let target: Target = j
                .target
                .parse()
                .map_err(|e: crate::InvalidSpec| bad("target", e.message))?;
            let priority = i32::try_from(j.priority)
                .ok()
                .filter(|p| (Priority::MIN..=Priority::MAX).contains(p))
                .ok_or_else(|| {
                    bad(
                        "priority",
                        format!(
                            "must be between {} and {} (got {})",
                            Priority::MIN,
                            Priority::MAX,
                            j.priority
                        ),
                    )
                })?;
            let outcome = SimOutcome::parse(&j.outcome).ok_or(SimError::UnknownOutcome {
                index,
                value: j.outcome.clone(),
            })?;
            jobs.push(WorkloadJob {
                org_id,
                app_version_id,
                target,
                priority,
                submit_s: j.submit_s,
                duration_s: j.duration_s,
                outcome,
            });
        }
        let w = Workload {
            name: raw.name,
            pools,
            jobs,
        };
        w.validate()?;
        Ok(w)
    }
}

/// The workload as JSON types, before validation: plain strings and numbers, so that each
/// bad value gets an error naming its entry rather than a generic parse error.
#[derive(Debug, Deserialize)]
struct RawWorkload {
    name: String,
    pools: Vec<RawPool>,
    jobs: Vec<RawJob>,
}

#[derive(Debug, Deserialize)]
struct RawPool {
    target: String,
    devices: i64,
    install_s: f64,
}

#[derive(Debug, Deserialize)]
struct RawJob {
    org_id: String,
    app_version_id: String,
    target: String,
    priority: i64,
    submit_s: f64,
    duration_s: f64,
    outcome: String,
}

impl TryFrom<RawWorkload> for Workload {
    type Error = SimError;
    fn try_from(raw: RawWorkload) -> Result<Self, SimError> {
        Workload::from_raw(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_counts_the_failed_half() {
        let job = |outcome| WorkloadJob {
            org_id: OrgId::new("acme").unwrap(),
            app_version_id: AppVersionId::new("v1").unwrap(),
            target: Target::Emulator,
            priority: 0,
            submit_s: 0.0,
            duration_s: 1.001,
            outcome,
        };
        assert_eq!(job(SimOutcome::Passed).work_ms(), 1001);
        assert_eq!(job(SimOutcome::Failed).work_ms(), 1001);
        assert_eq!(job(SimOutcome::InfraErrorOnce).work_ms(), 1501);
    }

    #[test]
    fn outcome_names_round_trip() {
        for o in [
            SimOutcome::Passed,
            SimOutcome::Failed,
            SimOutcome::InfraErrorOnce,
        ] {
            assert_eq!(SimOutcome::parse(o.as_str()), Some(o));
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
        }
        assert_eq!(SimOutcome::parse("flaky"), None);
    }

    #[test]
    fn seconds_are_checked_and_rounded() {
        assert!(check_seconds(0.0).is_ok());
        assert!(check_seconds(-0.001).is_err());
        assert!(check_seconds(f64::NAN).is_err());
        assert!(check_seconds(f64::INFINITY).is_err());
        assert!(check_seconds(2e9).is_err());
        assert_eq!(to_ms(32.5), 32_500);
        assert_eq!(to_ms(0.0004), 0);
        assert_eq!(to_ms(0.0006), 1);
    }

    #[test]
    fn serde_goes_through_validation() {
        let bad =
            r#"{"name":"x","pools":[{"target":"emulator","devices":0,"install_s":1}],"jobs":[]}"#;
        assert!(serde_json::from_str::<Workload>(bad).is_err());
        let good =
            r#"{"name":"x","pools":[{"target":"emulator","devices":2,"install_s":1}],"jobs":[]}"#;
        let w: Workload = serde_json::from_str(good).unwrap();
        let back = Workload::from_json(&w.to_json()).unwrap();
        assert_eq!(w, back);
    }
}
