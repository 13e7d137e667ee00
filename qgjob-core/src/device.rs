//! The [`Device`] trait: what an agent needs from a device (emulator, USB device, cloud slot
//! or simulation) to run leased jobs.

use async_trait::async_trait;
use tokio::sync::watch;

use crate::model::{BuildRef, DeviceInfo, InfraFailure, JobId, LeasedJob, RunReport};

/// How one job of a batch ended on the device.
pub type JobRun = Result<RunReport, InfraFailure>;

/// Lets a running batch learn which jobs must stop: those canceled (the agent fills it from
/// heartbeat answers) and, for a device whose timeouts the agent enforces (see
/// [`Device::enforces_timeouts`]), those past their timeout. Devices should poll
/// [`CancelWatch::is_canceled`] or await [`CancelWatch::changed`] and stop those jobs'
/// processes.
#[derive(Debug, Clone)]
pub struct CancelWatch {
    rx: watch::Receiver<Vec<(JobId, Stop)>>,
}

/// The sending half of a [`CancelWatch`], held by the agent.
#[derive(Debug)]
pub struct CancelSender {
    tx: watch::Sender<Vec<(JobId, Stop)>>,
}

/// Why a job was told to stop. The first reason sticks: a job canceled and then timed out
/// (or the other way round) ends the way it was first stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Canceled,
    TimedOut,
}

impl CancelWatch {
    /// A linked sender/watch pair with nothing canceled.
    pub fn channel() -> (CancelSender, CancelWatch) {
        let (tx, rx) = watch::channel(Vec::new());
        (CancelSender { tx }, CancelWatch { rx })
    }

    /// Whether `job` must stop: it was canceled, or it ran past its timeout (see
    /// [`CancelWatch::timed_out`]). Either way the device stops it.
    pub fn is_canceled(&self, job: JobId) -> bool {
        self.rx.borrow().iter().any(|(j, _)| *j == job)
    }

    /// Whether `job` was stopped because it ran past its timeout, rather than canceled. A
    /// device may report it as an [`crate::model::InfraErrorKind::Timeout`] failure
    /// ([`crate::model::InfraFailure::timed_out`]); one that reports it like a cancel gets
    /// the same report from the agent.
    pub fn timed_out(&self, job: JobId) -> bool {
        self.rx
            .borrow()
            .iter()
            .any(|(j, why)| *j == job && *why == Stop::TimedOut)
    }

    /// Waits until the set of canceled jobs changes (or the sender is gone).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The agent dropped the sender: nothing more will be canceled; never resolve.
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once `job` must stop (canceled or timed out; never, if neither happens before
    /// the sender goes). Race it against the job's work with `tokio::select!` to stop
    /// promptly.
    pub async fn canceled(&mut self, job: JobId) {
        while !self.is_canceled(job) {
            self.changed().await;
        }
    }
}

impl CancelSender {
    /// Marks `jobs` as canceled (idempotent; a job already told to stop keeps its reason).
    pub fn cancel(&self, jobs: &[JobId]) {
        self.stop(jobs, Stop::Canceled);
    }

    /// Marks `jobs` as past their timeout (idempotent; a job already told to stop keeps its
    /// reason).
    pub fn time_out(&self, jobs: &[JobId]) {
        self.stop(jobs, Stop::TimedOut);
    }

    /// Whether `job` was stopped because it ran past its timeout.
    pub fn timed_out(&self, job: JobId) -> bool {
        self.tx
            .borrow()
            .iter()
            .any(|(j, why)| *j == job && *why == Stop::TimedOut)
    }

    fn stop(&self, jobs: &[JobId], why: Stop) {
        self.tx.send_if_modified(|set| {
            let before = set.len();
            for j in jobs {
                if !set.iter().any(|(s, _)| s == j) {
                    set.push((*j, why));
                }
            }
            set.len() != before
        });
    }
}

/// A device an agent drives. Implement it for your hardware.
#[async_trait]
pub trait Device: Send + Sync {
    /// What the device is: id, target, capabilities and the build installed now.
    fn info(&self) -> DeviceInfo;

    /// Installs `build`, replacing whatever was installed. An error is an infrastructure
    /// failure of every job in the lease.
    async fn install(&self, build: &BuildRef) -> Result<(), InfraFailure>;

    /// Runs a batch of jobs of the installed build, one after another in the given order
    /// (or side by side), returning one result per job in the same order. Jobs the watch
    /// says must stop should be stopped and reported as
    /// [`crate::model::InfraErrorKind::Other`] failures (the scheduler ends canceled ones
    /// canceled; the agent reports timed-out ones as timeouts), or, for a timed-out one, as
    /// [`crate::model::InfraFailure::timed_out`].
    async fn run(&self, build: &BuildRef, jobs: &[LeasedJob], cancel: CancelWatch) -> Vec<JobRun>;

    /// Whether the device itself stops each job that runs past its timeout
    /// ([`crate::model::JobSpec::timeout_ms`]) and reports it as an
    /// [`crate::model::InfraErrorKind::Timeout`] failure.
    ///
    /// When false (the default), the agent does it, so that every device keeps the per-job
    /// timeout: counting from the start of [`Device::run`], it gives each job its own
    /// timeout plus those of the jobs ahead of it in the batch, and tells a job still
    /// running then to stop through the [`CancelWatch`] ([`CancelWatch::timed_out`]). A job
    /// the device then reports stopped (an `Other` failure) is reported as timed out; a
    /// verdict or a failure of another kind stands. So a lone job is stopped at its timeout,
    /// and a job of a batch never before it has had its own timeout (the jobs ahead of it
    /// were stopped at theirs), while the jobs that finished keep their verdicts. A job that
    /// starts after quick ones may run past its timeout by the time they left unused: the
    /// agent cannot see when the device starts each job. What the device does to set a job
    /// up counts against the job's timeout.
    ///
    /// Say true when the device measures more precisely: the agent then never stops a job
    /// for its timeout, so the two cannot race, and the scheduler's deadline for the lease
    /// (its jobs' timeouts plus a lease TTL) stays the backstop. qgjob's real executor does:
    /// its clock starts with the test command, after the test bundle is fetched and its
    /// dependencies installed, and a batch sharing one runner process gets the sum of its
    /// jobs' timeouts; an agent clock starting earlier would cut those short.
    fn enforces_timeouts(&self) -> bool {
        false
    }

    /// Whether the device can take work now (e.g. `adb get-state` says `device`). The agent
    /// asks before registering the device and after a job reported it lost, and takes no
    /// work for it until this says yes: a dead device must not take every queued job and
    /// burn its attempts in seconds. The default says yes.
    async fn healthy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_job_keeps_the_reason_it_was_first_stopped_for() {
        let (tx, watch) = CancelWatch::channel();
        let (a, b, c) = (
            JobId::from_parts(1, [1; 10]),
            JobId::from_parts(2, [2; 10]),
            JobId::from_parts(3, [3; 10]),
        );
        tx.cancel(&[a]);
        tx.time_out(&[a, b]);
        tx.cancel(&[b]);
        assert!(watch.is_canceled(a) && !watch.timed_out(a) && !tx.timed_out(a));
        assert!(watch.is_canceled(b) && watch.timed_out(b) && tx.timed_out(b));
        assert!(!watch.is_canceled(c) && !watch.timed_out(c));
    }
}
