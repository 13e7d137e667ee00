//! The [`Scheduler`] trait: the operations every scheduler offers, as a deterministic state
//! machine. Every mutating call takes `now`; decisions come back as values; state changes
//! are queued as [`JobEvent`]s for the caller to persist and publish.

use serde::{Deserialize, Serialize};

use crate::error::{CancelError, DeviceError, ReportError, SubmitError};
use crate::model::{
    DeviceId, DeviceInfo, GroupSummary, HeartbeatAck, InfraFailure, Job, JobEvent, JobFilter,
    JobId, JobState, Lease, LeaseId, RunReport, StateCounts, Target, Time,
};
use crate::policy::PolicyKind;

/// The result of a submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    /// The job's id (the existing one when the idempotency key matched).
    pub job_id: JobId,
    /// False when an earlier job with the same idempotency key was returned instead.
    pub created: bool,
    /// The job's state now.
    pub state: JobState,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    /// The job was queued and is now canceled.
    Canceled,
    /// The job is running; its device is told on its next heartbeat.
    Requested,
}

/// A device as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    /// What the device registered as (with its current install).
    pub info: DeviceInfo,
    /// The lease it holds, if busy.
    pub lease: Option<LeaseId>,
    /// Set when its lease expired: it must register again before it gets work.
    pub lost: bool,
    /// Builds installed on it since it registered.
    pub installs: u64,
}

/// Tunables of the in-memory scheduler. Defaults suit a real lab; the simulator overrides
/// backoff to zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Which dispatch policy to use.
    pub policy: PolicyKind,
    /// How long a lease lives without a heartbeat.
    pub lease_ttl_ms: u64,
    /// Base of the exponential retry backoff (attempt 2 waits this long, attempt 3 twice...).
    pub backoff_base_ms: u64,
    /// Ceiling of the retry backoff.
    pub backoff_max_ms: u64,
    /// Jitter as a fraction of the backoff (0.2 = ±20%), drawn from the seeded RNG.
    pub backoff_jitter: f64,
    /// Aging: a queued job gains one priority level per this many ms of waiting.
    pub aging_ms_per_level: u64,
    /// Install time assumed for a pool until a device reports its own.
    pub default_install_ms: u64,
    /// Job run time assumed for a group until jobs of that pool have been measured.
    pub default_job_ms: u64,
    /// Largest batch a device may ask for.
    pub max_batch_limit: usize,
    /// Seed of the RNG used for ids and jitter.
    pub seed: u64,
    /// A running job whose cancel was requested and that its agent has not reported this
    /// long after is ended canceled by the scheduler itself (its lease no longer holds it,
    /// so a late report is refused): an agent that cannot stop it must not keep it
    /// "running" until its timeout.
    #[serde(default = "default_cancel_grace_ms")]
    pub cancel_grace_ms: u64,
    /// A device without a lease whose agent has been silent this long (no registration,
    /// poll or heartbeat) is forgotten by [`Scheduler::tick`], as if unregistered: its agent
    /// was killed or cut off, and a dead device must not count as capacity or as serving
    /// its build. Its agent, if it comes back, registers it again. `None` (the default, and
    /// what the simulator needs: its devices ask only when something happens) keeps
    /// devices until they unregister.
    #[serde(default)]
    pub forget_silent_devices_ms: Option<u64>,
}

fn default_cancel_grace_ms() -> u64 {
    60_000
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            policy: PolicyKind::Grouped,
            lease_ttl_ms: 30_000,
            backoff_base_ms: 2_000,
            backoff_max_ms: 120_000,
            backoff_jitter: 0.2,
            aging_ms_per_level: 600_000,
            default_install_ms: 30_000,
            default_job_ms: 60_000,
            max_batch_limit: 64,
            seed: 0x5eed,
            cancel_grace_ms: default_cancel_grace_ms(),
            forget_silent_devices_ms: None,
        }
    }
}

/// A job scheduler: a deterministic state machine driven by explicit calls.
///
/// Implementations must not read a clock, spawn tasks or use a global RNG: the same calls
/// with the same `now`s give the same decisions and the same events.
pub trait Scheduler {
    /// Queues one job. With an idempotency key already used by the same org for an equal
    /// spec, returns that job instead (`created = false`).
    fn submit(&mut self, now: Time, spec: crate::model::JobSpec) -> Result<Submitted, SubmitError>;

    /// Queues many jobs atomically: either every spec is valid and all are queued, or none.
    fn submit_many(
        &mut self,
        now: Time,
        specs: Vec<crate::model::JobSpec>,
    ) -> Result<Vec<Submitted>, SubmitError>;

    /// Adds a device (or refreshes it: a lost device comes back this way). A device that
    /// re-registers while holding a lease keeps it, unless it says it is idle. A device
    /// another agent session holds and still keeps in touch is refused
    /// ([`DeviceError::Held`]; see [`DeviceInfo::session`]).
    fn register_device(&mut self, now: Time, device: DeviceInfo) -> Result<(), DeviceError>;

    /// The device's agent is alive and polling under `session`: refused with
    /// [`DeviceError::TakenOver`] when another session has registered the device since.
    /// Agents call it with each lease poll (and during long polls), which keeps the device
    /// in touch; a lease or a heartbeat does too.
    /// The default, for schedulers that do not track sessions, accepts every agent.
    fn touch_device(
        &mut self,
        now: Time,
        id: &DeviceId,
        session: Option<&str>,
    ) -> Result<(), DeviceError> {
        let _ = (now, id, session);
        Ok(())
    }

    /// Removes a device; jobs it was running go back to the queue as infrastructure failures.
    fn unregister_device(&mut self, now: Time, id: &DeviceId) -> Result<(), DeviceError>;

    /// A free device asks for work: up to `max_batch` jobs of one build, or `None` when the
    /// policy has nothing for it now.
    fn lease(
        &mut self,
        now: Time,
        device: &DeviceId,
        max_batch: usize,
    ) -> Result<Option<Lease>, DeviceError>;

    /// Extends a lease; the answer lists jobs the device must stop.
    fn heartbeat(&mut self, now: Time, lease: LeaseId) -> Result<HeartbeatAck, ReportError>;

    /// A job's tests ran to the end. Returns the job's new state (queued again when a failed
    /// test is retried on request).
    fn complete(
        &mut self,
        now: Time,
        lease: LeaseId,
        job: JobId,
        report: RunReport,
    ) -> Result<JobState, ReportError>;

    /// A job hit an infrastructure failure: retried with backoff until its last attempt,
    /// then `error`. A job canceled meanwhile ends `canceled`.
    fn fail(
        &mut self,
        now: Time,
        lease: LeaseId,
        job: JobId,
        failure: InfraFailure,
    ) -> Result<JobState, ReportError>;

    /// Cancels a job: at once when queued, on the next heartbeat when running.
    fn cancel(&mut self, now: Time, job: JobId) -> Result<CancelOutcome, CancelError>;

    /// Advances time: expires leases past their deadline (jobs requeue with attempt + 1, the
    /// device is marked lost), fails jobs past their timeout, releases retries whose backoff
    /// ended.
    fn tick(&mut self, now: Time);

    /// The earliest time at which [`Scheduler::tick`] has something to do.
    fn next_wakeup(&self) -> Option<Time>;

    /// How long a lease lasts without a heartbeat, in ms; also how long a device's agent may
    /// stay silent before another agent session may register the device.
    fn lease_ttl_ms(&self) -> u64 {
        SchedulerConfig::default().lease_ttl_ms
    }

    /// Takes the state changes recorded since the last call, in order.
    fn take_events(&mut self) -> Vec<JobEvent>;

    /// One job.
    fn get(&self, id: JobId) -> Option<&Job>;

    /// Jobs passing `filter`, in submission order, at most `filter.limit` (default 100).
    fn list(&self, filter: &JobFilter) -> Vec<&Job>;

    /// One summary per group with queued or running jobs, in a stable order.
    fn groups(&self) -> Vec<GroupSummary>;

    /// Job counts by state, per target.
    fn queue_depth(&self) -> Vec<(Target, StateCounts)>;

    /// Every registered device.
    fn devices(&self) -> Vec<DeviceStatus>;
}
