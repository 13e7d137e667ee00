//! Discrete-event simulation of a device lab: runs a workload through the real
//! [`GroupedScheduler`](crate::GroupedScheduler) in virtual time and reports how well the
//! policy did against a lower bound.
//!
//! * [`Workload`] is the JSON format v1 that `qgjob simulate` reads (pools and jobs);
//!   [`Workload::from_json`] validates it and names what is wrong.
//! * [`run`] simulates it under one [`PolicyKind`](crate::PolicyKind) and returns a
//!   [`Report`], the JSON object `qgjob simulate --json` prints; [`run_traced`] also returns
//!   every attempt (device, start, install, end).
//! * [`generate`] makes seeded workloads of a few [`Shape`]s for tests, benches and the
//!   `compare` example.
//! * [`lower_bound`] is the makespan lower bound, public so a real run can be judged the same
//!   way.
//!
//! # The simulated lab
//!
//! Virtual time is integer milliseconds from t = 0 (seconds in the workload are rounded to
//! the nearest millisecond). Each pool of `devices` devices registers them at t = 0 with
//! nothing installed and `install_estimate_ms = install_s × 1000`; device ids are
//! `<target>-<n>` with `n` zero-padded, so id order is target name, then number. The
//! scheduler runs with zero retry backoff and leases that never expire.
//!
//! At every instant where something happens the simulator, in this order: reports the
//! attempts that end then (by device id), submits the jobs due then (in workload order),
//! calls `tick(now)`, and lets every idle device ask `lease(now, device, 1)` once, in device
//! id order. A device that gets nothing stays idle until the next instant where something
//! happens. An attempt takes the pool's install time when the lease says `install`, then its
//! run time: `duration_s` for `passed` and `failed`; for `infra_error_once` the first attempt
//! reports an infrastructure failure after half the duration (integer ms, rounded down) and
//! the retry, released at that moment with no backoff, passes after the full duration. Jobs
//! are submitted with `max_attempts = 3` so the retry happens, and `retry_failed_tests` off so
//! a `failed` job is final.
//!
//! # The figures
//!
//! * `makespan_s`: the finish time of the last job, from t = 0 (per pool: of its jobs).
//! * `installs`: leases that had to install; `min_installs`: the distinct builds
//!   (org + app version) of each pool, summed over pools — no schedule installs fewer.
//! * `utilization`: busy device time (installs + runs, failed attempts included) divided by
//!   `devices × makespan` (0 when the makespan is 0).
//! * `wait_s`: one sample per attempt start: the time from the attempt's release (the job's
//!   submit for the first attempt, the failure that requeued it for a retry) to its start.
//!   `p50`/`p95` are nearest-rank percentiles (the value at rank ⌈p·n⌉ of the sorted
//!   samples), `max` the largest; all 0 without samples. `wait_s_by_priority` splits the
//!   samples by the job's priority (keys are the priority as a string).
//! * `lower_bound_s`: see [`lower_bound`]; the workload's is the largest of its pools'. Its
//!   per-job term waits for the first install of the job's build, not for an install after
//!   the job's own submit: a late job of a build already installed somewhere can start at
//!   once, so `submit + install + work` would overstate the bound. A further term charges
//!   one install per device that helps with builds not yet seen (devices start empty).
//! * `finished`: jobs in a final state; less than `jobs` only when the policy left work
//!   undone with every device idle (a stall), which the tests treat as a bug.

mod bound;
mod generate;
mod run;
mod workload;

pub use bound::{lower_bound, min_installs_by, BoundJob};
pub use generate::{generate, Shape};
pub use run::{run, run_traced, AttemptRecord, AttemptResult, PoolReport, Report, WaitStats};
pub use workload::{SimOutcome, Workload, WorkloadJob, WorkloadPool, MAX_POOL_DEVICES};

use thiserror::Error;

/// Why a workload cannot be simulated (or a lower bound computed).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    /// The text is not JSON of the workload's shape (a field missing or of the wrong type).
    #[error("workload is not valid JSON of format v1: {0}")]
    Json(String),
    /// A pool entry is invalid.
    #[error("pools[{index}].{field}: {message}")]
    InvalidPool {
        /// Position in `pools`.
        index: usize,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Two pools have the same target.
    #[error("pools[{index}]: target {target} is declared twice")]
    DuplicatePool {
        /// Position of the second declaration in `pools`.
        index: usize,
        /// The target.
        target: String,
    },
    /// A job entry is invalid.
    #[error("jobs[{index}].{field}: {message}")]
    InvalidJob {
        /// Position in `jobs`.
        index: usize,
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A job's outcome is not `passed`, `failed` or `infra_error_once`.
    #[error("jobs[{index}].outcome: unknown outcome {value:?} (expected passed, failed or infra_error_once)")]
    UnknownOutcome {
        /// Position in `jobs`.
        index: usize,
        /// The outcome given.
        value: String,
    },
    /// A job's target has no pool in the workload.
    #[error("jobs[{index}].target: no pool serves target {target}")]
    NoPool {
        /// Position in `jobs`.
        index: usize,
        /// The target.
        target: String,
    },
    /// A lower bound was asked for a pool without devices.
    #[error("a pool needs at least one device")]
    NoDevices,
    /// The scheduler refused a call the simulator made (a bug in one of them).
    #[error("scheduler refused a simulated call: {0}")]
    Scheduler(String),
}
