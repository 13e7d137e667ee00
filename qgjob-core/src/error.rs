//! Error types of the scheduling library, one enum per kind of operation.

use serde::Serialize;
use thiserror::Error;

use crate::model::{DeviceId, JobId, JobState, LeaseId};

/// A field of a spec or request is invalid. Names the field, so the HTTP layer can answer 422.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize)]
#[error("invalid {field}: {message}")]
pub struct InvalidSpec {
    /// The offending field, e.g. `priority`.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl InvalidSpec {
    /// Makes an error for `field`.
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidSpec {
            field,
            message: message.into(),
        }
    }
}

/// Why a submission was refused. Nothing is queued when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmitError {
    /// A field is invalid; `index` is the position in a batch.
    #[error("job {index}: {source}")]
    Invalid {
        /// Position of the bad spec in the batch (0 for a single submit).
        index: usize,
        /// What is wrong.
        #[source]
        source: InvalidSpec,
    },
    /// The same idempotency key was reused with a different spec.
    #[error("idempotency key {key:?} was already used for job {existing} with a different spec")]
    IdempotencyConflict {
        /// The key.
        key: String,
        /// The job it belongs to.
        existing: JobId,
    },
    /// The job id is already taken (only when restoring or with caller-chosen ids).
    #[error("job {0} already exists")]
    Duplicate(JobId),
}

/// Why a device operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DeviceError {
    /// No such device is registered.
    #[error("device {0} is not registered")]
    UnknownDevice(DeviceId),
    /// The device already holds a lease and must finish it first.
    #[error("device {device} already holds lease {lease}")]
    Busy {
        /// The device.
        device: DeviceId,
        /// Its lease.
        lease: LeaseId,
    },
    /// The device's lease expired: it must register again before it gets work.
    #[error("device {0} was marked lost; register it again")]
    Lost(DeviceId),
    /// Another agent session registered the device and is still in touch with the scheduler:
    /// most likely two running agents share a name. It becomes free once that agent has
    /// been silent for a lease TTL (or unregisters the device).
    #[error(
        "device {device} is registered by another agent, which was in touch {quiet_ms} ms ago; \
         it is free once that agent has been silent for {ttl_ms} ms"
    )]
    Held {
        /// The device.
        device: DeviceId,
        /// How long ago the holding agent was last heard from.
        quiet_ms: u64,
        /// How long it must stay silent before the device can be taken over.
        ttl_ms: u64,
    },
    /// The device was registered since by another agent session: this agent no longer has
    /// it.
    #[error("device {0} was registered since by another agent")]
    TakenOver(DeviceId),
    /// A registration field is invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
}

/// Why a report (heartbeat, complete, fail) was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReportError {
    /// The lease is not (or no longer) current: expired, finished or superseded.
    #[error("lease {0} is stale or unknown")]
    StaleLease(LeaseId),
    /// The job is not part of that lease, or already reported under it.
    #[error("job {job} is not held by lease {lease}")]
    NotInLease {
        /// The lease.
        lease: LeaseId,
        /// The job.
        job: JobId,
    },
}

/// Why a cancel was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CancelError {
    /// No such job.
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The job already ended.
    #[error("job {id} is already {state}")]
    AlreadyFinal {
        /// The job.
        id: JobId,
        /// Its final state.
        state: JobState,
    },
}

/// Why restoring a scheduler from persisted jobs failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RestoreError {
    /// Two records share a job id.
    #[error("job {0} appears twice")]
    Duplicate(JobId),
    /// A record is inconsistent (e.g. running without a lease).
    #[error("job {id} is inconsistent: {reason}")]
    Inconsistent {
        /// The job.
        id: JobId,
        /// What is wrong.
        reason: String,
    },
}
