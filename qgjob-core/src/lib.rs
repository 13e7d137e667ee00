//! qgjob-core: an embeddable, install-aware scheduler for mobile end-to-end test jobs.
//!
//! Jobs ([`model::JobSpec`]) are grouped by app build so a device installs a build once and
//! runs many tests on it.
//!
//! * [`scheduler::Scheduler`] is a deterministic state machine: every mutating call takes
//!   `now`, nothing reads a clock or a global RNG, and decisions come back as values (leases
//!   with fencing ids, [`model::JobEvent`]s). [`grouped::GroupedScheduler`] is the in-memory
//!   implementation; [`policy`] holds the pure dispatch decision.
//! * [`device::Device`] is what an agent drives: implement it for your hardware.
//!   [`simdevice::SimDevice`] is a simulated one for demos and tests.
//! * [`agent`] is the async edge: [`agent::Agent`] drives devices through an
//!   [`agent::AgentLink`]; [`agent::SharedScheduler`] and [`agent::LocalLink`] run a scheduler
//!   in the same process (the HTTP server offers the same link over the network).
//!
//! A device of your own, driving the grouped scheduler in process until two jobs finish:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use async_trait::async_trait;
//! use qgjob_core::agent::{Agent, AgentConfig, Shutdown, SharedScheduler, TokioClock};
//! use qgjob_core::device::{CancelWatch, Device, JobRun};
//! use qgjob_core::*;
//!
//! /// A "device" that passes every test at once.
//! struct InstantDevice;
//!
//! #[async_trait]
//! impl Device for InstantDevice {
//!     fn info(&self) -> DeviceInfo {
//!         DeviceInfo {
//!             id: DeviceId::new("instant-1").unwrap(),
//!             target: Target::Emulator,
//!             capabilities: Capabilities::default(),
//!             installed: None,
//!             install_estimate_ms: Some(0),
//!             idle: false,
//!             session: None,
//!             replaces: None,
//!         }
//!     }
//!     async fn install(&self, _build: &BuildRef) -> Result<(), InfraFailure> {
//!         Ok(())
//!     }
//!     async fn run(&self, _b: &BuildRef, jobs: &[LeasedJob], _c: CancelWatch) -> Vec<JobRun> {
//!         jobs.iter()
//!             .map(|_| Ok(RunReport { passed: true, tests: vec![], duration_ms: 1, error: None }))
//!             .collect()
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let shared = SharedScheduler::new(
//!     GroupedScheduler::new(SchedulerConfig::default()),
//!     Arc::new(TokioClock::default()),
//! );
//! let spec = |test: &str| JobSpec::new(
//!     OrgId::new("qualgent").unwrap(),
//!     AppVersionId::new("xyz123").unwrap(),
//!     vec![test.to_string()],
//! );
//! let a = shared.submit(spec("tests/onboarding.spec.js")).unwrap().job_id;
//! let b = shared.submit(spec("tests/login.spec.js")).unwrap().job_id;
//!
//! let shutdown = Shutdown::new();
//! let cfg = AgentConfig { max_batch: 2, lease_wait: Duration::from_millis(200), ..Default::default() };
//! let agent = Agent::new(Arc::new(shared.link()), cfg).with_device(Arc::new(InstantDevice));
//! let running = tokio::spawn(agent.run(shutdown.signal()));
//!
//! let finished = |s: &GroupedScheduler| [a, b].iter().all(|j| s.get(*j).is_some_and(|j| j.state.is_final()));
//! shared.wait_until(finished).await;
//! shutdown.trigger();
//! let counters = running.await.unwrap().unwrap();
//! assert_eq!(counters.jobs_run, 2);
//! assert_eq!(counters.installs, 1);
//! assert_eq!(shared.get(a).unwrap().state, JobState::Passed);
//! assert_eq!(shared.get(b).unwrap().state, JobState::Passed);
//! # }
//! ```
#![warn(missing_docs)]

pub mod agent;
pub mod device;
pub mod error;
pub mod grouped;
pub mod model;
pub mod policy;
pub mod rng;
pub mod scheduler;
pub mod sim;
pub mod simdevice;

pub use error::{CancelError, DeviceError, InvalidSpec, ReportError, RestoreError, SubmitError};
pub use grouped::GroupedScheduler;
pub use model::*;
pub use policy::PolicyKind;
pub use scheduler::{CancelOutcome, DeviceStatus, Scheduler, SchedulerConfig, Submitted};
