//! The simulator proper: drives the real scheduler through the [`Scheduler`] trait in
//! virtual time and gathers the [`Report`]. The rules it follows are in the
//! [module docs](super).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};

use super::bound::lower_bound_ms;
use super::workload::{to_ms, SimOutcome, Workload};
use super::SimError;
use crate::grouped::GroupedScheduler;
use crate::model::{
    DeviceId, DeviceInfo, InfraErrorKind, InfraFailure, JobId, JobSpec, LeaseId, Priority,
    RunReport, Target, Time,
};
use crate::policy::PolicyKind;
use crate::scheduler::{Scheduler, SchedulerConfig};

/// Wait-time figures, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct WaitStats {
    /// Median (nearest rank).
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// Largest.
    pub max: f64,
}

impl WaitStats {
    /// Figures of a set of samples in ms (any order); all 0 without samples.
    fn of(samples: &mut [u64]) -> WaitStats {
        samples.sort_unstable();
        let rank = |p: f64| -> f64 {
            let n = samples.len();
            if n == 0 {
                return 0.0;
            }
            // Nearest rank: the smallest value with at least p·n samples at or below it.
            let r = ((p * n as f64).ceil() as usize).clamp(1, n);
            samples[r - 1] as f64 / 1000.0
        };
        WaitStats {
            p50: rank(0.50),
            p95: rank(0.95),
            max: rank(1.0),
        }
    }
}

/// One target pool's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolReport {
    /// The pool's target.
    pub target: Target,
    /// Its devices.
    pub devices: u32,
    /// Jobs submitted to it.
    pub jobs: u64,
    /// Jobs that reached a final state.
    pub finished: u64,
    /// Finish time of its last job, seconds from the start.
    pub makespan_s: f64,
    /// No schedule could have finished its jobs earlier ([`super::lower_bound`]).
    pub lower_bound_s: f64,
    /// Installs its devices did.
    pub installs: u64,
    /// Distinct builds among its jobs: the fewest installs possible.
    pub min_installs: u64,
    /// Busy device time over `devices × makespan`.
    pub utilization: f64,
    /// Wait from release to start, one sample per attempt.
    pub wait_s: WaitStats,
    /// The same, by job priority.
    pub wait_s_by_priority: BTreeMap<i32, WaitStats>,
}

/// What a simulation found: the JSON object `qgjob simulate --json` prints. Figures are
/// defined in the [module docs](super).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The policy simulated.
    pub policy: PolicyKind,
    /// Jobs in the workload.
    pub jobs: u64,
    /// Jobs that reached a final state.
    pub finished: u64,
    /// Finish time of the last job, seconds from the start.
    pub makespan_s: f64,
    /// The largest of the pools' lower bounds.
    pub lower_bound_s: f64,
    /// Installs over all pools.
    pub installs: u64,
    /// Sum of the pools' minimum installs.
    pub min_installs: u64,
    /// Busy device time over `all devices × makespan`.
    pub utilization: f64,
    /// Wait from release to start, one sample per attempt.
    pub wait_s: WaitStats,
    /// The same, by job priority.
    pub wait_s_by_priority: BTreeMap<i32, WaitStats>,
    /// Per target pool, in workload order.
    pub pools: Vec<PoolReport>,
}

impl Report {
    /// The figures of the pool of `target`, if the workload has one.
    pub fn pool(&self, target: &Target) -> Option<&PoolReport> {
        self.pools.iter().find(|p| &p.target == target)
    }
}

/// One attempt of a job as the simulation ran it (see [`run_traced`]). Times are virtual
/// milliseconds from t = 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The job's position in the workload's `jobs`.
    pub job: usize,
    /// The attempt number (1-based).
    pub attempt: u32,
    /// The device that ran it.
    pub device: DeviceId,
    /// When the attempt became ready (the job's submit, or the failure that requeued it).
    pub released_ms: u64,
    /// When the device got it.
    pub start_ms: u64,
    /// Whether the device installed the job's build first.
    pub install: bool,
    /// When the attempt reported.
    pub end_ms: u64,
    /// How it ended.
    pub result: AttemptResult,
}

/// How a simulated attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptResult {
    /// Its tests passed.
    Passed,
    /// A test failed.
    Failed,
    /// An infrastructure error; the job was requeued.
    InfraError,
}

/// An attempt in progress on a device.
#[derive(Debug, Clone, Copy)]
struct Attempt {
    lease: LeaseId,
    job: JobId,
    idx: usize,
    run_ms: u64,
    /// Reports an infrastructure failure instead of completing.
    fails: bool,
}

#[derive(Debug)]
struct SimDevice {
    id: DeviceId,
    pool: usize,
    running: Option<Attempt>,
}

/// Per-pool tallies while running.
#[derive(Debug, Default, Clone)]
struct PoolTally {
    installs: u64,
    busy_ms: u128,
    makespan_ms: u64,
    finished: u64,
    waits: Vec<u64>,
    waits_by_prio: BTreeMap<i32, Vec<u64>>,
}

/// Simulates `workload` under `policy` and reports the figures. Deterministic: the same
/// workload and policy always give the same report.
///
/// ```
/// use qgjob_core::sim::{run, Workload};
/// use qgjob_core::PolicyKind;
///
/// let w = Workload::from_json(r#"{"name": "two",
///   "pools": [{"target": "emulator", "devices": 1, "install_s": 10}],
///   "jobs": [
///     {"org_id": "acme", "app_version_id": "v1", "target": "emulator",
///      "priority": 0, "submit_s": 0, "duration_s": 30, "outcome": "passed"},
///     {"org_id": "acme", "app_version_id": "v1", "target": "emulator",
///      "priority": 0, "submit_s": 0, "duration_s": 20, "outcome": "failed"}]}"#)?;
/// let r = run(&w, PolicyKind::Grouped)?;
/// assert_eq!((r.makespan_s, r.installs, r.lower_bound_s), (60.0, 1, 60.0));
/// # Ok::<(), qgjob_core::sim::SimError>(())
/// ```
pub fn run(workload: &Workload, policy: PolicyKind) -> Result<Report, SimError> {
    simulate(workload, policy, None)
}

/// [`run`], also returning every attempt in the order the devices started them: to see why
/// a policy scored as it did (who waited, which device installed what, when).
pub fn run_traced(
    workload: &Workload,
    policy: PolicyKind,
) -> Result<(Report, Vec<AttemptRecord>), SimError> {
    let mut trace = Vec::new();
    let report = simulate(workload, policy, Some(&mut trace))?;
    Ok((report, trace))
}

fn simulate(
    workload: &Workload,
    policy: PolicyKind,
    mut trace: Option<&mut Vec<AttemptRecord>>,
) -> Result<Report, SimError> {
    workload.validate()?;
    let cfg = SchedulerConfig {
        policy,
        backoff_base_ms: 0,
        // Simulated devices never stop heartbeating: leases must never expire.
        lease_ttl_ms: u64::MAX / 4,
        ..SchedulerConfig::default()
    };
    let mut sched = GroupedScheduler::new(cfg);
    let sch = |e: &dyn std::fmt::Display| SimError::Scheduler(e.to_string());

    let install_ms: Vec<u64> = workload.pools.iter().map(|p| to_ms(p.install_s)).collect();

    // Devices, in id order: the order in which idle devices ask for work.
    let mut devices: Vec<SimDevice> = Vec::new();
    for (pi, p) in workload.pools.iter().enumerate() {
        let width = p.devices.to_string().len();
        for n in 1..=p.devices {
            let id = DeviceId::new(format!("{}-{:0width$}", p.target, n)).map_err(|e| sch(&e))?;
            devices.push(SimDevice {
                id,
                pool: pi,
                running: None,
            });
        }
    }
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    for d in &devices {
        let info = DeviceInfo {
            id: d.id.clone(),
            target: workload.pools[d.pool].target.clone(),
            capabilities: Default::default(),
            installed: None,
            install_estimate_ms: Some(install_ms[d.pool]),
            idle: false,
            session: None,
            replaces: None,
        };
        sched
            .register_device(Time::ZERO, info)
            .map_err(|e| sch(&e))?;
    }

    // Jobs in submission order: by time, then workload order.
    let jobs = &workload.jobs;
    let submit_ms: Vec<u64> = jobs.iter().map(|j| to_ms(j.submit_s)).collect();
    let duration_ms: Vec<u64> = jobs.iter().map(|j| to_ms(j.duration_s)).collect();
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| (submit_ms[i], i));
    let mut next_submit = 0usize;

    let mut idx_of: HashMap<JobId, usize> = HashMap::with_capacity(jobs.len());
    // When each job's current attempt was released (submit, or the failure that requeued it).
    let mut released_ms: Vec<u64> = submit_ms.clone();
    let mut tally = vec![PoolTally::default(); workload.pools.len()];
    // Attempts in progress, by (end time, device position): device positions follow id order.
    let mut ends: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();

    loop {
        let next_end = ends.peek().map(|Reverse((t, _))| *t);
        let next_sub = order.get(next_submit).map(|&i| submit_ms[i]);
        let now = match (next_end, next_sub) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => break,
        };

        // 1. Attempts ending now report, in device id order.
        while let Some(&Reverse((t, di))) = ends.peek() {
            if t != now {
                break;
            }
            ends.pop();
            let Some(a) = devices[di].running.take() else {
                continue;
            };
            let pool = &mut tally[devices[di].pool];
            if a.fails {
                let failure = InfraFailure {
                    kind: InfraErrorKind::Other,
                    message: "simulated infrastructure error".into(),
                };
                sched
                    .fail(Time(now), a.lease, a.job, failure)
                    .map_err(|e| sch(&e))?;
                released_ms[a.idx] = now;
            } else {
                let passed = jobs[a.idx].outcome != SimOutcome::Failed;
                let report = RunReport {
                    passed,
                    tests: Vec::new(),
                    duration_ms: a.run_ms,
                    error: (!passed).then(|| "simulated test failure".to_string()),
                };
                let state = sched
                    .complete(Time(now), a.lease, a.job, report)
                    .map_err(|e| sch(&e))?;
                if state.is_final() {
                    pool.finished += 1;
                    pool.makespan_ms = pool.makespan_ms.max(now);
                }
            }
        }

        // 2. Jobs due now are submitted, in workload order.
        while let Some(&i) = order.get(next_submit) {
            if submit_ms[i] != now {
                break;
            }
            next_submit += 1;
            let j = &jobs[i];
            let mut spec = JobSpec::new(
                j.org_id.clone(),
                j.app_version_id.clone(),
                vec![format!("tests/job-{i}.spec.js")],
            );
            spec.target = j.target.clone();
            spec.priority = Priority(j.priority);
            spec.max_attempts = 3;
            spec.retry_failed_tests = false;
            let sub = sched.submit(Time(now), spec).map_err(|e| sch(&e))?;
            idx_of.insert(sub.job_id, i);
        }

        // 3. Time advances.
        sched.tick(Time(now));

        // 4. Every idle device asks once, in id order.
        for (di, dev) in devices.iter_mut().enumerate() {
            if dev.running.is_some() {
                continue;
            }
            let Some(lease) = sched.lease(Time(now), &dev.id, 1).map_err(|e| sch(&e))? else {
                continue;
            };
            let [leased] = lease.jobs.as_slice() else {
                return Err(SimError::Scheduler(format!(
                    "asked for one job, got a lease of {}",
                    lease.jobs.len()
                )));
            };
            let idx = *idx_of
                .get(&leased.id)
                .ok_or_else(|| SimError::Scheduler(format!("leased unknown job {}", leased.id)))?;
            let pi = dev.pool;
            let fails = jobs[idx].outcome == SimOutcome::InfraErrorOnce && leased.attempt == 1;
            let run_ms = if fails {
                duration_ms[idx] / 2
            } else {
                duration_ms[idx]
            };
            let install = if lease.install { install_ms[pi] } else { 0 };
            let pool = &mut tally[pi];
            if lease.install {
                pool.installs += 1;
            }
            pool.busy_ms += u128::from(install + run_ms);
            let wait = now.saturating_sub(released_ms[idx]);
            pool.waits.push(wait);
            pool.waits_by_prio
                .entry(jobs[idx].priority)
                .or_default()
                .push(wait);
            if let Some(t) = trace.as_deref_mut() {
                t.push(AttemptRecord {
                    job: idx,
                    attempt: leased.attempt,
                    device: dev.id.clone(),
                    released_ms: released_ms[idx],
                    start_ms: now,
                    install: lease.install,
                    end_ms: now + install + run_ms,
                    result: match jobs[idx].outcome {
                        _ if fails => AttemptResult::InfraError,
                        SimOutcome::Failed => AttemptResult::Failed,
                        _ => AttemptResult::Passed,
                    },
                });
            }
            dev.running = Some(Attempt {
                lease: lease.id,
                job: leased.id,
                idx,
                run_ms,
                fails,
            });
            ends.push(Reverse((now + install + run_ms, di)));
        }
        // Events are only for live listeners; dropping them keeps memory flat.
        drop(sched.take_events());
    }

    Ok(report(workload, policy, &tally))
}

/// Assembles the report from the tallies.
fn report(workload: &Workload, policy: PolicyKind, tally: &[PoolTally]) -> Report {
    let mut pools = Vec::with_capacity(workload.pools.len());
    let mut all_waits = Vec::new();
    let mut all_by_prio: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    let mut lb_ms = 0f64;
    for (pi, p) in workload.pools.iter().enumerate() {
        let t = &tally[pi];
        let bound_jobs = workload.bound_jobs(&p.target);
        // Validation guarantees devices ≥ 1, so this cannot fail.
        let lb = lower_bound_ms(p.devices, to_ms(p.install_s), &bound_jobs).unwrap_or(0.0);
        lb_ms = lb_ms.max(lb);
        let builds: BTreeSet<_> = bound_jobs.iter().map(|b| &b.build).collect();
        let mut waits = t.waits.clone();
        all_waits.extend_from_slice(&waits);
        let mut by_prio = BTreeMap::new();
        for (prio, w) in &t.waits_by_prio {
            all_by_prio.entry(*prio).or_default().extend_from_slice(w);
            by_prio.insert(*prio, WaitStats::of(&mut w.clone()));
        }
        pools.push(PoolReport {
            target: p.target.clone(),
            devices: p.devices,
            jobs: bound_jobs.len() as u64,
            finished: t.finished,
            makespan_s: t.makespan_ms as f64 / 1000.0,
            lower_bound_s: lb / 1000.0,
            installs: t.installs,
            min_installs: builds.len() as u64,
            utilization: utilization(t.busy_ms, u64::from(p.devices), t.makespan_ms),
            wait_s: WaitStats::of(&mut waits),
            wait_s_by_priority: by_prio,
        });
    }
    let makespan_ms = tally.iter().map(|t| t.makespan_ms).max().unwrap_or(0);
    let busy: u128 = tally.iter().map(|t| t.busy_ms).sum();
    let all_devices: u64 = workload.pools.iter().map(|p| u64::from(p.devices)).sum();
    Report {
        policy,
        jobs: workload.jobs.len() as u64,
        finished: tally.iter().map(|t| t.finished).sum(),
        makespan_s: makespan_ms as f64 / 1000.0,
        lower_bound_s: lb_ms / 1000.0,
        installs: tally.iter().map(|t| t.installs).sum(),
        min_installs: pools.iter().map(|p| p.min_installs).sum(),
        utilization: utilization(busy, all_devices, makespan_ms),
        wait_s: WaitStats::of(&mut all_waits),
        wait_s_by_priority: all_by_prio
            .into_iter()
            .map(|(p, mut w)| (p, WaitStats::of(&mut w)))
            .collect(),
        pools,
    }
}

/// A job's work: its duration, plus the failed first half-attempt for `infra_error_once`.
/// Uses the same rounding as the simulation, so the bound and the schedule agree exactly.
fn utilization(busy_ms: u128, devices: u64, makespan_ms: u64) -> f64 {
    let cap = u128::from(devices) * u128::from(makespan_ms);
    if cap == 0 {
        0.0
    } else {
        busy_ms as f64 / cap as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<u64> = (1..=20).map(|s| s * 1000).collect();
        let w = WaitStats::of(&mut v);
        // n = 20: p50 is rank 10, p95 rank 19.
        assert_eq!((w.p50, w.p95, w.max), (10.0, 19.0, 20.0));
        let mut one = vec![7_000];
        let w = WaitStats::of(&mut one);
        assert_eq!((w.p50, w.p95, w.max), (7.0, 7.0, 7.0));
        assert_eq!(WaitStats::of(&mut []), WaitStats::default());
    }

    #[test]
    fn utilization_guards_zero() {
        assert_eq!(utilization(0, 3, 0), 0.0);
        assert_eq!(utilization(3_000, 3, 2_000), 0.5);
    }
}
