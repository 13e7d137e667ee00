//! qgjob-core: an embeddable, install-aware scheduler for mobile end-to-end test jobs.
//!
//! Jobs ([`model::JobSpec`]) are grouped by app build so a device installs a build once and
//! runs many tests on it. The [`scheduler::Scheduler`] trait is a deterministic state
//! machine: every mutating call takes `now`, nothing reads a clock or a global RNG, and
//! decisions come back as values. [`grouped::GroupedScheduler`] is the in-memory
//! implementation; [`policy`] holds the pure dispatch decision; [`device::Device`] is what an
//! agent drives.
#![warn(missing_docs)]

pub mod device;
pub mod error;
pub mod grouped;
pub mod model;
pub mod policy;
pub mod rng;
pub mod scheduler;
pub mod sim;

pub use error::{CancelError, DeviceError, InvalidSpec, ReportError, RestoreError, SubmitError};
pub use grouped::GroupedScheduler;
pub use model::*;
pub use policy::PolicyKind;
pub use scheduler::{CancelOutcome, DeviceStatus, Scheduler, SchedulerConfig, Submitted};
