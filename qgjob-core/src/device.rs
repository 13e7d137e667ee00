//! The [`Device`] trait: what an agent needs from a device (emulator, USB device, cloud slot
//! or simulation) to run leased jobs.

use async_trait::async_trait;
use tokio::sync::watch;

use crate::model::{BuildRef, DeviceInfo, InfraFailure, JobId, LeasedJob, RunReport};

/// How one job of a batch ended on the device.
pub type JobRun = Result<RunReport, InfraFailure>;

/// Lets a running batch learn which jobs were canceled (the agent fills it from heartbeat
/// answers). Devices should poll [`CancelWatch::is_canceled`] or await [`CancelWatch::changed`]
/// and stop those jobs' processes.
#[derive(Debug, Clone)]
pub struct CancelWatch {
    rx: watch::Receiver<Vec<JobId>>,
}

/// The sending half of a [`CancelWatch`], held by the agent.
#[derive(Debug)]
pub struct CancelSender {
    tx: watch::Sender<Vec<JobId>>,
}

impl CancelWatch {
    /// A linked sender/watch pair with nothing canceled.
    pub fn channel() -> (CancelSender, CancelWatch) {
        let (tx, rx) = watch::channel(Vec::new());
        (CancelSender { tx }, CancelWatch { rx })
    }

    /// Whether `job` was canceled.
    pub fn is_canceled(&self, job: JobId) -> bool {
        self.rx.borrow().contains(&job)
    }

    /// Waits until the set of canceled jobs changes (or the sender is gone).
    pub async fn changed(&mut self) {
        if self.rx.changed().await.is_err() {
            // The agent dropped the sender: nothing more will be canceled; never resolve.
            std::future::pending::<()>().await;
        }
    }

    /// Resolves once `job` is canceled (never, if it is not canceled before the sender goes).
    /// Race it against the job's work with `tokio::select!` to stop promptly.
    pub async fn canceled(&mut self, job: JobId) {
        while !self.is_canceled(job) {
            self.changed().await;
        }
    }
}

impl CancelSender {
    /// Marks `jobs` as canceled (idempotent).
    pub fn cancel(&self, jobs: &[JobId]) {
        self.tx.send_modify(|set| {
            for j in jobs {
                if !set.contains(j) {
                    set.push(*j);
                }
            }
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

    /// Runs a batch of jobs of the installed build, returning one result per job in the same
    /// order. Canceled jobs should be stopped and reported as
    /// [`crate::model::InfraErrorKind::Other`] failures (the scheduler ends them canceled).
    async fn run(&self, build: &BuildRef, jobs: &[LeasedJob], cancel: CancelWatch) -> Vec<JobRun>;

    /// Whether the device can take work now (e.g. `adb get-state` says `device`). The agent
    /// asks before registering the device and after a job reported it lost, and takes no
    /// work for it until this says yes: a dead device must not take every queued job and
    /// burn its attempts in seconds. The default says yes.
    async fn healthy(&self) -> bool {
        true
    }
}
