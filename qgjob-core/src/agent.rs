//! The agent runtime: the async edge that drives [`Device`]s through an [`AgentLink`].
//!
//! * [`AgentLink`] is the small protocol between an agent and a scheduler (register, long-poll
//!   for a lease, heartbeat, report). [`LocalLink`] speaks it to an in-process scheduler; an
//!   HTTP client can speak it to `qgjob server` with the same loop.
//! * [`SharedScheduler`] puts any [`Scheduler`] behind a mutex with a [`Clock`] and a
//!   [`Notify`], so long-polling agents wake the moment work arrives, and
//!   [`SharedScheduler::spawn_ticker`] expires leases and releases retries on time.
//! * [`Agent`] runs one loop per device: lease, install if asked, run the batch while
//!   heartbeating (cancels from the heartbeat reach the device) and, unless the device
//!   does it itself, stopping jobs that run past their timeouts (see
//!   [`Device::enforces_timeouts`]), report every job (within
//!   [`AgentConfig::report_patience`] when the scheduler answers but refuses one), repeat;
//!   shutdown stops leasing, lets in-flight batches finish and report, then unregisters.
//!   A device the scheduler refuses to register stops the whole agent with an error.
//!
//! The scheduler itself stays free of tokio and clocks: only this module reads time.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};

use crate::device::{CancelSender, CancelWatch, Device, JobRun};
use crate::error::{CancelError, DeviceError, ReportError, SubmitError};
use crate::model::{
    DeviceId, DeviceInfo, HeartbeatAck, InfraErrorKind, InfraFailure, Job, JobEvent, JobId,
    JobSpec, JobState, Lease, LeaseId, LeasedJob, RunReport, Time,
};
use crate::scheduler::{CancelOutcome, Scheduler, Submitted};

// ----- the link -----

/// Why an [`AgentLink`] call failed, and so what the agent does about it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkError {
    /// The lease is no longer current (expired, superseded or unknown): abandon it without
    /// reporting; the scheduler has already moved its jobs on.
    #[error("the lease is no longer current")]
    Stale,
    /// The scheduler could not be reached or answered with a server error: retry with backoff.
    #[error("transport error: {0}")]
    Transport(String),
    /// The scheduler is overloaded and asked to be asked again later (HTTP 408, 429, 503
    /// `unavailable`): retry with backoff, as for [`LinkError::Transport`]. It says nothing
    /// about the request itself, so it does not count against
    /// [`AgentConfig::report_patience`].
    #[error("busy: {0}")]
    Busy(String),
    /// The request was refused as invalid (unknown or lost device, job not in the lease, a
    /// missing or wrong token...): retrying the same request cannot help. Log it and move on;
    /// a refused registration stops the agent.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A registration was refused because another agent session holds the device and is
    /// still in touch with the scheduler. The device is free once that agent has been silent
    /// for a lease TTL, so the agent retries for [`AgentConfig::held_patience`] before it
    /// gives up: a restarted agent waits out its killed predecessor this way, while a second
    /// agent running under the same name stops with this message.
    #[error("held by another agent: {0}")]
    Held(String),
}

/// The interface between an agent and a scheduler: [`LocalLink`] in process, an HTTP client
/// against `qgjob server` (see `docs/http-api.md`, agent protocol).
#[async_trait]
pub trait AgentLink: Send + Sync {
    /// Adds or refreshes a device (also how a device marked lost comes back).
    async fn register(&self, device: DeviceInfo) -> Result<(), LinkError>;

    /// Removes a device; jobs it still held are requeued by the scheduler. With a
    /// `session`, refused when another agent session has registered the device since (it is
    /// no longer ours to remove).
    async fn unregister(&self, device: &DeviceId, session: Option<&str>) -> Result<(), LinkError>;

    /// Long-polls for work: returns as soon as the scheduler has a lease for the device, or
    /// `None` once `wait` has passed without one. With a `session`, refused when another
    /// agent session has registered the device since; while it waits, the poll keeps the
    /// device in touch (see [`Scheduler::touch_device`]).
    async fn lease(
        &self,
        device: &DeviceId,
        session: Option<&str>,
        max_batch: usize,
        wait: Duration,
    ) -> Result<Option<Lease>, LinkError>;

    /// Whether dropping a [`AgentLink::lease`] future part-way can never lose a lease the
    /// scheduler granted. When true the agent abandons a long poll the moment it shuts down.
    /// When false (the default: over a network the grant may already be on its way) it gives
    /// the poll [`AgentConfig::shutdown_grace`] to answer and runs whatever lease that
    /// brings; after that it abandons the poll and unregisters the device, which makes the
    /// scheduler requeue a lease granted to the abandoned poll at once rather than when it
    /// expires (either way as an infrastructure failure, which costs the job an attempt).
    /// Waiting out the whole poll instead made an idle agent take up to `lease_wait` to stop,
    /// to save that attempt only when work arrived in the last round trip before it stopped.
    fn lease_is_cancel_safe(&self) -> bool {
        false
    }

    /// Extends a lease; the answer lists jobs to stop.
    async fn heartbeat(&self, lease: LeaseId) -> Result<HeartbeatAck, LinkError>;

    /// Reports a job whose tests ran to the end.
    async fn complete(
        &self,
        lease: LeaseId,
        job: JobId,
        report: RunReport,
    ) -> Result<JobState, LinkError>;

    /// Reports a job that hit an infrastructure failure.
    async fn fail(
        &self,
        lease: LeaseId,
        job: JobId,
        failure: InfraFailure,
    ) -> Result<JobState, LinkError>;

    /// Appends log text to a job. The default drops it (an in-process link has no log store).
    async fn log(&self, lease: LeaseId, job: JobId, text: &str) -> Result<(), LinkError> {
        let _ = (lease, job, text);
        Ok(())
    }
}

// ----- clocks -----

/// Where the shared scheduler gets `now` from.
pub trait Clock: Send + Sync {
    /// The current time in milliseconds.
    fn now(&self) -> Time;
}

/// Wall-clock time: milliseconds since the Unix epoch (what the server persists).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Time {
        // A clock set before 1970 reads as the epoch rather than failing.
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Time(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// Time as tokio sees it, counted from when the clock was made (plus `base`). Under
/// `tokio::time::pause()` it is virtual, so tests and simulations run instantly and exactly.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
    base: Time,
}

impl TokioClock {
    /// A clock reading `base` now.
    pub fn starting_at(base: Time) -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
            base,
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::starting_at(Time::ZERO)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Time {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.base.plus_ms(ms)
    }
}

/// A clock that only moves when told to (for code that drives time by hand).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `t`.
    pub fn new(t: Time) -> Self {
        ManualClock(AtomicU64::new(t.0))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock (never backwards: the scheduler expects `now` to grow).
    pub fn set(&self, t: Time) {
        self.0.fetch_max(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Time {
        Time(self.0.load(Ordering::SeqCst))
    }
}

// ----- the shared scheduler -----

struct Shared<S> {
    sched: Mutex<S>,
    clock: Arc<dyn Clock>,
    /// Wakes long-polling leases, waiters and the ticker after every state change.
    changed: Notify,
}

/// A [`Scheduler`] shared between tasks: a mutex (never held across an `.await`), a clock for
/// `now`, and a notification so long polls and waiters react to changes at once.
///
/// Events accumulate inside the scheduler until someone calls
/// [`SharedScheduler::take_events`]; a long-running embedder should drain them.
pub struct SharedScheduler<S> {
    inner: Arc<Shared<S>>,
}

impl<S> Clone for SharedScheduler<S> {
    fn clone(&self) -> Self {
        SharedScheduler {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Scheduler + Send + 'static> SharedScheduler<S> {
    /// Shares `sched`, reading time from `clock`.
    pub fn new(sched: S, clock: Arc<dyn Clock>) -> Self {
        SharedScheduler {
            inner: Arc::new(Shared {
                sched: Mutex::new(sched),
                clock,
                changed: Notify::new(),
            }),
        }
    }

    /// The clock's current time.
    pub fn now(&self) -> Time {
        self.inner.clock.now()
    }

    fn lock(&self) -> MutexGuard<'_, S> {
        // A panic while holding the lock cannot leave the state machine half-updated in a
        // way later calls trip over (every call validates first), so carry on.
        self.inner
            .sched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the scheduler.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the scheduler at the clock's `now`, then wakes everyone waiting for a change.
    pub fn update<R>(&self, f: impl FnOnce(&mut S, Time) -> R) -> R {
        let r = {
            let mut s = self.lock();
            let now = self.now();
            f(&mut s, now)
        };
        self.inner.changed.notify_waiters();
        r
    }

    /// Wakes long polls and waiters (after a change made some other way).
    pub fn notify(&self) {
        self.inner.changed.notify_waiters();
    }

    /// Queues one job.
    pub fn submit(&self, spec: JobSpec) -> Result<Submitted, SubmitError> {
        self.update(|s, now| s.submit(now, spec))
    }

    /// Queues many jobs atomically.
    pub fn submit_many(&self, specs: Vec<JobSpec>) -> Result<Vec<Submitted>, SubmitError> {
        self.update(|s, now| s.submit_many(now, specs))
    }

    /// Cancels a job (at once when queued, at its device's next heartbeat when running).
    pub fn cancel(&self, job: JobId) -> Result<CancelOutcome, CancelError> {
        self.update(|s, now| s.cancel(now, job))
    }

    /// A copy of one job.
    pub fn get(&self, job: JobId) -> Option<Job> {
        self.read(|s| s.get(job).cloned())
    }

    /// Runs the scheduler's timers at the clock's `now` (expired leases, ended backoffs).
    /// Wakes waiters only when something was due, so a ticker does not wake itself forever.
    pub fn tick(&self) {
        let due = {
            let mut s = self.lock();
            let now = self.now();
            let due = s.next_wakeup().is_some_and(|t| t <= now);
            if due {
                s.tick(now);
            }
            due
        };
        if due {
            self.inner.changed.notify_waiters();
        }
    }

    /// When the scheduler next has timer work.
    pub fn next_wakeup(&self) -> Option<Time> {
        self.read(|s| s.next_wakeup())
    }

    /// Takes the state changes recorded since the last call.
    pub fn take_events(&self) -> Vec<JobEvent> {
        self.lock().take_events()
    }

    /// Waits until `pred` holds (checked now and after every change).
    pub async fn wait_until(&self, mut pred: impl FnMut(&S) -> bool) {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            // Register before checking, so a change between check and wait is not missed.
            notified.as_mut().enable();
            if self.read(&mut pred) {
                return;
            }
            notified.await;
        }
    }

    /// An [`AgentLink`] to this scheduler.
    pub fn link(&self) -> LocalLink<S> {
        LocalLink {
            shared: self.clone(),
        }
    }

    /// Drives [`Scheduler::tick`] from [`Scheduler::next_wakeup`] forever: sleeps until the
    /// next deadline or until a change (which may bring an earlier one), then ticks.
    pub async fn run_ticker(self) {
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.tick();
            let Some(wake) = self.next_wakeup() else {
                notified.await;
                continue;
            };
            let ms = wake.since(self.now());
            if ms == 0 {
                // Due already (the clock moved on since the tick above): tick again after a
                // millisecond, which also keeps a misbehaving scheduler from spinning a core.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            }
        }
    }

    /// Spawns [`SharedScheduler::run_ticker`] on the current tokio runtime. Abort the handle
    /// to stop it.
    pub fn spawn_ticker(&self) -> JoinHandle<()> {
        tokio::spawn(self.clone().run_ticker())
    }
}

/// An [`AgentLink`] to a [`SharedScheduler`] in the same process.
pub struct LocalLink<S> {
    shared: SharedScheduler<S>,
}

impl<S> Clone for LocalLink<S> {
    fn clone(&self) -> Self {
        LocalLink {
            shared: self.shared.clone(),
        }
    }
}

/// How often a long poll re-asks, so that a waiting agent stays in touch: a third of the
/// lease TTL, at least 10 ms.
pub fn touch_interval(lease_ttl_ms: u64) -> Duration {
    Duration::from_millis((lease_ttl_ms / 3).max(10))
}

fn device_err(e: DeviceError) -> LinkError {
    match e {
        DeviceError::Held { .. } => LinkError::Held(e.to_string()),
        other => LinkError::Rejected(other.to_string()),
    }
}

fn report_err(e: ReportError) -> LinkError {
    match e {
        // As the HTTP server answers both (409 stale_lease).
        ReportError::StaleLease(_) | ReportError::NotInLease { .. } => LinkError::Stale,
    }
}

#[async_trait]
impl<S: Scheduler + Send + 'static> AgentLink for LocalLink<S> {
    async fn register(&self, device: DeviceInfo) -> Result<(), LinkError> {
        self.shared
            .update(|s, now| s.register_device(now, device))
            .map_err(device_err)
    }

    async fn unregister(&self, device: &DeviceId, session: Option<&str>) -> Result<(), LinkError> {
        self.shared
            .update(|s, now| {
                s.touch_device(now, device, session)?;
                s.unregister_device(now, device)
            })
            .map_err(device_err)
    }

    async fn lease(
        &self,
        device: &DeviceId,
        session: Option<&str>,
        max_batch: usize,
        wait: Duration,
    ) -> Result<Option<Lease>, LinkError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.shared.inner.changed.notified();
            tokio::pin!(notified);
            // Register interest before asking, so a submit right after the ask still wakes us.
            notified.as_mut().enable();
            let (got, ttl) = {
                let mut s = self.shared.lock();
                let now = self.shared.now();
                s.touch_device(now, device, session).map_err(device_err)?;
                let got = s.lease(now, device, max_batch).map_err(device_err)?;
                (got, s.lease_ttl_ms())
            };
            if let Some(lease) = got {
                self.shared.notify();
                return Ok(Some(lease));
            }
            // Ask again well within a lease TTL, which keeps the device in touch while idle.
            let touch = tokio::time::Instant::now() + touch_interval(ttl);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(touch.min(deadline)) => {
                    if touch >= deadline {
                        return Ok(None);
                    }
                }
            }
        }
    }

    fn lease_is_cancel_safe(&self) -> bool {
        // The lease is taken and returned within one poll, under the lock.
        true
    }

    async fn heartbeat(&self, lease: LeaseId) -> Result<HeartbeatAck, LinkError> {
        // A heartbeat changes only a deadline, which the ticker re-reads when it wakes.
        let r = {
            let mut s = self.shared.lock();
            let now = self.shared.now();
            s.heartbeat(now, lease)
        };
        r.map_err(report_err)
    }

    async fn complete(
        &self,
        lease: LeaseId,
        job: JobId,
        report: RunReport,
    ) -> Result<JobState, LinkError> {
        self.shared
            .update(|s, now| s.complete(now, lease, job, report))
            .map_err(report_err)
    }

    async fn fail(
        &self,
        lease: LeaseId,
        job: JobId,
        failure: InfraFailure,
    ) -> Result<JobState, LinkError> {
        self.shared
            .update(|s, now| s.fail(now, lease, job, failure))
            .map_err(report_err)
    }
}

// ----- shutdown -----

/// Tells agents to stop: no new leases; in-flight batches finish and report; devices
/// unregister. Dropping it without triggering never stops anything.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

/// The receiving side of a [`Shutdown`], cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownSignal {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// A shutdown switch, not yet triggered.
    pub fn new() -> Self {
        Shutdown {
            tx: watch::channel(false).0,
        }
    }

    /// A signal to hand to an agent.
    pub fn signal(&self) -> ShutdownSignal {
        ShutdownSignal {
            rx: self.tx.subscribe(),
        }
    }

    /// Triggers the shutdown (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl ShutdownSignal {
    /// A signal that never fires.
    pub fn never() -> Self {
        ShutdownSignal {
            rx: watch::channel(false).1,
        }
    }

    /// Whether shutdown was triggered.
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is triggered (never, if the [`Shutdown`] was dropped untriggered).
    pub async fn triggered(&mut self) {
        if self.rx.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl From<watch::Receiver<bool>> for ShutdownSignal {
    fn from(rx: watch::Receiver<bool>) -> Self {
        ShutdownSignal { rx }
    }
}

// ----- the agent -----

/// How an [`Agent`] behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Most jobs asked for per lease (run in one runner process).
    pub max_batch: usize,
    /// How often a running lease is heartbeated; keep it well under the scheduler's lease TTL.
    pub heartbeat_interval: Duration,
    /// How long one lease long-poll waits.
    pub lease_wait: Duration,
    /// First delay after a transport error (doubles up to `retry_max`).
    pub retry_min: Duration,
    /// Longest delay between retries.
    pub retry_max: Duration,
    /// Attempts at delivering one report once the agent is stopping (the lease then
    /// expires and the scheduler requeues the job; see [`AgentCounters::unreported`]). While
    /// it runs, the agent keeps trying while the scheduler is unreachable: a finished test's
    /// result outlives a server restart (the server extends restored leases), and the device
    /// has nothing better to do. Also the attempts at the infrastructure failure sent in
    /// place of a verdict the scheduler kept refusing (see `report_patience`).
    pub report_attempts: u32,
    /// How long a lease's reports may keep failing with transport errors (a 5xx, no answer;
    /// not [`LinkError::Busy`]) while the scheduler answers the lease's heartbeats, before the
    /// agent stops retrying the one it is sending. The clock is the batch's: it restarts when
    /// the scheduler takes one of the batch's own reports, so once the server has refused for this long, each
    /// later job of the batch gets one try (then its failure, as below) rather than a
    /// patience of its own, and a batch whose every report is refused ends in about one
    /// patience, not one per job.
    /// Without a bound, a report the server keeps refusing (a bug on one job, a report it
    /// cannot store) held the device and the job until the lease's hard deadline (the sum
    /// of its jobs' timeouts, 30 min each by default), since the heartbeats kept the lease
    /// alive. Time while the heartbeats fail too does not count (roughly: from the
    /// first failed heartbeat to the next answered one): the scheduler is then unreachable,
    /// and a result should outlive an outage or a restart.
    ///
    /// When it runs out on a verdict, the agent reports an [`InfraErrorKind::Other`] failure
    /// instead, saying the result could not be delivered and why (at most `report_attempts`
    /// tries), so the scheduler retries the job by its usual rules and the job's error tells
    /// the user; see [`AgentCounters::undelivered`]. If that fails too, or the refused
    /// report was a failure already, the agent gives the job up
    /// ([`AgentCounters::unreported`]) and goes on with the batch; once the batch is done, it
    /// stops heartbeating the lease and registers the device idle, which makes the
    /// scheduler requeue what the lease still holds at once rather than keep the device busy.
    pub report_patience: Duration,
    /// On shutdown, how long a long poll that is not cancel-safe (see
    /// [`AgentLink::lease_is_cancel_safe`]) still gets to answer, so that a lease whose answer
    /// is already on its way is run rather than handed back. Keep it above the link's round
    /// trip and well under `lease_wait`: it is how long an idle agent takes to stop.
    pub shutdown_grace: Duration,
    /// How long a device whose registration is refused as held by another agent session
    /// ([`LinkError::Held`]) keeps trying before the agent stops with that error. Keep it
    /// above the scheduler's lease TTL: a restarted agent that cannot name its predecessor
    /// (see [`Agent::replacing`]) waits until the killed one has been silent that long.
    pub held_patience: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            max_batch: 1,
            heartbeat_interval: Duration::from_secs(5),
            lease_wait: Duration::from_secs(30),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(5),
            report_attempts: 10,
            report_patience: Duration::from_secs(300),
            shutdown_grace: Duration::from_millis(500),
            held_patience: Duration::from_secs(60),
        }
    }
}

/// Why an agent stopped early.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AgentError {
    /// A device could not register: the scheduler refused it (its description, or the
    /// agent's credentials). Retrying cannot help, so the agent stops.
    #[error("device {device} could not register: {message}")]
    Register {
        /// The device.
        device: DeviceId,
        /// The scheduler's answer.
        message: String,
    },
    /// A device task panicked (a bug in a `Device` implementation).
    #[error("a device task panicked: {0}")]
    Panicked(String),
}

/// Live counters of an agent (shared with whoever watches it).
#[derive(Debug, Default)]
pub struct AgentStats {
    registrations: AtomicU64,
    leases: AtomicU64,
    installs: AtomicU64,
    jobs_run: AtomicU64,
    passed: AtomicU64,
    failed: AtomicU64,
    canceled: AtomicU64,
    infra_failures: AtomicU64,
    unreported: AtomicU64,
    undelivered: AtomicU64,
    stale_leases: AtomicU64,
    transport_errors: AtomicU64,
    unhealthy: AtomicU64,
    rejected: AtomicU64,
    held: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A snapshot of [`AgentStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCounters {
    /// Successful device registrations (one per device at start, more after the scheduler
    /// forgot a device, e.g. across a server restart). Watch it to learn when every device
    /// is registered.
    #[serde(default)]
    pub registrations: u64,
    /// Leases received.
    pub leases: u64,
    /// Builds installed (successfully).
    pub installs: u64,
    /// Jobs run and reported (accepted by the scheduler).
    pub jobs_run: u64,
    /// Of those, reports that ended the job passed.
    pub passed: u64,
    /// Of those, reports that ended the job failed.
    pub failed: u64,
    /// Of those, jobs stopped because they were canceled.
    #[serde(default)]
    pub canceled: u64,
    /// Infrastructure failures reported (the scheduler may have retried them); cancels are
    /// not counted here.
    pub infra_failures: u64,
    /// Results that could not be delivered: before the agent stopped (the scheduler was
    /// unreachable), or at all while the scheduler kept refusing them (see
    /// [`AgentConfig::report_patience`]). Their jobs run again once their leases end.
    #[serde(default)]
    pub unreported: u64,
    /// Verdicts the scheduler kept refusing for [`AgentConfig::report_patience`], reported
    /// instead as an infrastructure failure that says so, so that the scheduler retried the
    /// job (also counted in `jobs_run`, and in `infra_failures` unless it was canceled).
    #[serde(default)]
    pub undelivered: u64,
    /// Leases abandoned because the scheduler no longer knew them.
    pub stale_leases: u64,
    /// Transport errors seen, busy answers included (each one retried).
    pub transport_errors: u64,
    /// Requests the scheduler rejected.
    pub rejected: u64,
    /// Times a device was found unhealthy (at start, or after a job reported it lost) and
    /// taken off the scheduler until it was back.
    #[serde(default)]
    pub unhealthy: u64,
    /// Registrations refused because another agent session held the device (two agents
    /// sharing a name, or this agent's killed predecessor not yet silent for a lease TTL).
    #[serde(default)]
    pub held: u64,
}

impl AgentStats {
    /// The counters now.
    pub fn snapshot(&self) -> AgentCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AgentCounters {
            registrations: g(&self.registrations),
            leases: g(&self.leases),
            installs: g(&self.installs),
            jobs_run: g(&self.jobs_run),
            passed: g(&self.passed),
            failed: g(&self.failed),
            canceled: g(&self.canceled),
            infra_failures: g(&self.infra_failures),
            unreported: g(&self.unreported),
            undelivered: g(&self.undelivered),
            stale_leases: g(&self.stale_leases),
            transport_errors: g(&self.transport_errors),
            rejected: g(&self.rejected),
            unhealthy: g(&self.unhealthy),
            held: g(&self.held),
        }
    }

    /// The last transport error or rejection, for logs and status pages.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn bump(a: &AtomicU64) {
        a.fetch_add(1, Ordering::Relaxed);
    }

    fn note(&self, e: &LinkError) {
        match e {
            LinkError::Transport(_) | LinkError::Busy(_) => Self::bump(&self.transport_errors),
            LinkError::Rejected(_) => Self::bump(&self.rejected),
            LinkError::Stale => Self::bump(&self.stale_leases),
            LinkError::Held(_) => Self::bump(&self.held),
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
    }
}

/// Capped exponential backoff for transport retries.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(cfg: &AgentConfig) -> Self {
        let min = cfg.retry_min.max(Duration::from_millis(1));
        Backoff {
            next: min,
            min,
            max: cfg.retry_max.max(min),
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Runs devices against a scheduler through an [`AgentLink`]; see the [module docs](self).
pub struct Agent {
    link: Arc<dyn AgentLink>,
    devices: Vec<Arc<dyn Device>>,
    cfg: AgentConfig,
    stats: Arc<AgentStats>,
    session: Arc<str>,
    replaces: Option<Arc<str>>,
}

/// Everything one device loop needs, cheap to clone into its task.
#[derive(Clone)]
struct Ctx {
    link: Arc<dyn AgentLink>,
    device: Arc<dyn Device>,
    cfg: AgentConfig,
    stats: Arc<AgentStats>,
    /// The device loop's stop switch (reports give up only once it is on).
    stopping: ShutdownSignal,
    session: Arc<str>,
    replaces: Option<Arc<str>>,
}

impl Agent {
    /// An agent with no devices yet, under a fresh session (a version-7 UUID): its devices
    /// register under it, and the scheduler refuses them to any other running agent.
    pub fn new(link: Arc<dyn AgentLink>, cfg: AgentConfig) -> Self {
        Agent {
            link,
            devices: Vec::new(),
            cfg,
            stats: Arc::new(AgentStats::default()),
            session: uuid::Uuid::now_v7().to_string().into(),
            replaces: None,
        }
    }

    /// This run's session, to record where the next run can find it (see
    /// [`Agent::replacing`]).
    pub fn session(&self) -> &str {
        &self.session
    }

    /// Names the session of this agent's previous run, which the caller knows has ended
    /// (e.g. it now holds a lock that run held): devices that run still holds are taken over
    /// at once instead of once it has been silent for a lease TTL. Naming a session that is
    /// still running takes its devices from it, so only name one known to be over.
    pub fn replacing(mut self, previous: Option<String>) -> Self {
        self.replaces = previous.map(Into::into);
        self
    }

    /// Adds a device (builder style).
    pub fn with_device(mut self, device: Arc<dyn Device>) -> Self {
        self.devices.push(device);
        self
    }

    /// Adds a device.
    pub fn add_device(&mut self, device: Arc<dyn Device>) {
        self.devices.push(device);
    }

    /// The agent's counters (keep the `Arc` to watch them while it runs).
    pub fn stats(&self) -> Arc<AgentStats> {
        Arc::clone(&self.stats)
    }

    /// Runs every device until `shutdown` fires, then lets in-flight batches finish and
    /// report, unregisters the devices and returns the final counters. If a device stops with
    /// an error (the scheduler refused to register it), the other devices stop the same
    /// graceful way and the first error is returned, so a caller learns of it at once rather
    /// than at its own shutdown. Dropping (or aborting) the future stops every device at
    /// once, without reporting: the scheduler then expires their leases and requeues the jobs.
    pub async fn run(self, mut shutdown: ShutdownSignal) -> Result<AgentCounters, AgentError> {
        // The devices watch this switch rather than `shutdown` so that one device's error can
        // stop the others too.
        let stop = Shutdown::new();
        let mut tasks = JoinSet::new();
        for device in self.devices {
            let ctx = Ctx {
                link: Arc::clone(&self.link),
                device,
                cfg: self.cfg.clone(),
                stats: Arc::clone(&self.stats),
                stopping: stop.signal(),
                session: Arc::clone(&self.session),
                replaces: self.replaces.clone(),
            };
            tasks.spawn(device_loop(ctx, stop.signal()));
        }
        let mut first_err = None;
        let mut forwarded = false;
        loop {
            let done = tokio::select! {
                done = tasks.join_next() => done,
                () = shutdown.triggered(), if !forwarded => {
                    forwarded = true;
                    stop.trigger();
                    continue;
                }
            };
            let Some(done) = done else { break };
            let err = match done {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(e) => Some(AgentError::Panicked(e.to_string())),
            };
            if first_err.is_none() && err.is_some() {
                first_err = err;
                stop.trigger();
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(self.stats.snapshot()),
        }
    }
}

/// Sleeps `d` unless shutdown comes first; returns false on shutdown.
async fn pause(d: Duration, shutdown: &mut ShutdownSignal) -> bool {
    tokio::select! {
        _ = shutdown.triggered() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Registers the device, retrying transport errors (a scheduler that is down or restarting
/// comes back; the agent must outlive it). Ok(false) when shutdown came first.
async fn register(ctx: &Ctx, shutdown: &mut ShutdownSignal) -> Result<bool, AgentError> {
    let mut backoff = Backoff::new(&ctx.cfg);
    // When a refusal as held by another session began.
    let mut held_since: Option<tokio::time::Instant> = None;
    loop {
        // The agent registers a device only between leases (at start, after the device came
        // back, after the scheduler forgot it), so it runs nothing there: a lease the
        // scheduler still holds for it belongs to a previous run of this agent, or was
        // granted to a poll whose answer never arrived. Saying so requeues its jobs now
        // rather than after the lease TTL, while the device sits refused as busy.
        let info = DeviceInfo {
            idle: true,
            session: Some(ctx.session.to_string()),
            replaces: ctx.replaces.as_deref().map(String::from),
            ..ctx.device.info()
        };
        // Not abandoned on shutdown: a registration that lands after we stop listening
        // would leave a device the scheduler counts as idle and spare.
        match ctx.link.register(info.clone()).await {
            Ok(()) => {
                AgentStats::bump(&ctx.stats.registrations);
                return Ok(true);
            }
            Err(e @ (LinkError::Transport(_) | LinkError::Busy(_))) => {
                ctx.stats.note(&e);
                if !pause(backoff.next(), shutdown).await {
                    return Ok(false);
                }
            }
            // Another session holds the device: our killed predecessor, whose silence
            // frees it within a lease TTL, or another live agent under the same name,
            // which will not. Wait for the first; stop for the second.
            Err(LinkError::Held(m))
                if held_since
                    .get_or_insert_with(tokio::time::Instant::now)
                    .elapsed()
                    < ctx.cfg.held_patience =>
            {
                ctx.stats.note(&LinkError::Held(m));
                if !pause(backoff.next(), shutdown).await {
                    return Ok(false);
                }
            }
            Err(e) => {
                ctx.stats.note(&e);
                // The scheduler's own words, without our "rejected: " prefix: this is what
                // the operator reads.
                let message = match e {
                    LinkError::Rejected(m) | LinkError::Held(m) => m,
                    other => other.to_string(),
                };
                return Err(AgentError::Register {
                    device: info.id,
                    message,
                });
            }
        }
    }
}

async fn device_loop(ctx: Ctx, mut shutdown: ShutdownSignal) -> Result<(), AgentError> {
    let id = ctx.device.info().id;
    if !until_healthy(&ctx, &mut shutdown).await || !register(&ctx, &mut shutdown).await? {
        return Ok(());
    }
    let mut backoff = Backoff::new(&ctx.cfg);
    // Whether the last step was a registration after a refused poll.
    let mut reregistered = false;
    while !shutdown.is_triggered() {
        let poll = ctx.link.lease(
            &id,
            Some(&ctx.session),
            ctx.cfg.max_batch,
            ctx.cfg.lease_wait,
        );
        let polled = if ctx.link.lease_is_cancel_safe() {
            tokio::select! {
                biased;
                _ = shutdown.triggered() => break,
                r = poll => r,
            }
        } else {
            tokio::pin!(poll);
            tokio::select! {
                biased;
                r = &mut poll => r,
                _ = shutdown.triggered() => {
                    // A lease granted just before the shutdown may be on its way: give the
                    // answer a moment and run what it brings. Past that the poll is most
                    // likely idle and would hold the agent for up to `lease_wait`: abandon
                    // it; the unregister below hands back anything granted meanwhile.
                    match tokio::time::timeout(ctx.cfg.shutdown_grace, &mut poll).await {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                }
            }
        };
        match polled {
            Ok(None) => backoff.reset(),
            Ok(Some(lease)) => {
                backoff.reset();
                let ended = run_lease(&ctx, lease).await;
                if ended.device_lost && !ctx.device.healthy().await {
                    // Gone: off the scheduler (so its jobs and its build's group go to other
                    // devices, or wait) until it is back.
                    let _ = ctx.link.unregister(&id, Some(&ctx.session)).await;
                    if !until_healthy(&ctx, &mut shutdown).await
                        || !register(&ctx, &mut shutdown).await?
                    {
                        break;
                    }
                } else if ended.jobs_left && !shutdown.is_triggered() {
                    // The lease still holds jobs we could not report, and nothing heartbeats
                    // it any more. Registering the device idle hands them back now (to be
                    // retried, by the scheduler's rules), rather than leaving the device
                    // refused as busy until the lease expires. (A stopping agent unregisters
                    // below, which does the same.)
                    if !register(&ctx, &mut shutdown).await? {
                        break;
                    }
                }
            }
            Err(e @ (LinkError::Transport(_) | LinkError::Busy(_))) => {
                ctx.stats.note(&e);
                if !pause(backoff.next(), &mut shutdown).await {
                    break;
                }
            }
            Err(e) => {
                // Most likely the device was marked lost (a missed heartbeat) or forgotten
                // (a server restart): register again at once and carry on. Only a refusal
                // right after registering (something else is wrong) waits, with backoff,
                // so a scheduler that keeps refusing is not hammered.
                ctx.stats.note(&e);
                if reregistered && !pause(backoff.next(), &mut shutdown).await {
                    break;
                }
                if !register(&ctx, &mut shutdown).await? {
                    break;
                }
                reregistered = true;
                continue;
            }
        }
        reregistered = false;
    }
    // Best effort: if this fails the scheduler still expires the device's leases.
    let mut backoff = Backoff::new(&ctx.cfg);
    for _ in 0..3 {
        match ctx.link.unregister(&id, Some(&ctx.session)).await {
            Err(e @ (LinkError::Transport(_) | LinkError::Busy(_))) => {
                ctx.stats.note(&e);
                tokio::time::sleep(backoff.next()).await;
            }
            Err(e) => {
                ctx.stats.note(&e);
                break;
            }
            Ok(()) => break,
        }
    }
    Ok(())
}

/// Heartbeats `lease` every interval, passing cancels to the device; returns when the lease
/// is stale. Transport errors are retried at the next interval (the TTL spans several).
/// `answering` says whether the last heartbeat was answered (see
/// [`AgentConfig::report_patience`]).
async fn heartbeat_loop(ctx: &Ctx, lease: LeaseId, cancel: &CancelSender, answering: &AtomicBool) {
    let every = ctx.cfg.heartbeat_interval.max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match ctx.link.heartbeat(lease).await {
            Ok(ack) => {
                answering.store(true, Ordering::Relaxed);
                if !ack.cancel.is_empty() {
                    cancel.cancel(&ack.cancel);
                }
            }
            Err(LinkError::Stale) => return,
            Err(e) => {
                answering.store(false, Ordering::Relaxed);
                ctx.stats.note(&e);
            }
        }
    }
}

/// How a lease ended for the device loop.
struct LeaseEnd {
    /// A job reported the device lost.
    device_lost: bool,
    /// The lease still holds jobs whose reports were given up or refused.
    jobs_left: bool,
}

/// Installs if asked, runs the batch while heartbeating, reports every job.
async fn run_lease(ctx: &Ctx, lease: Lease) -> LeaseEnd {
    AgentStats::bump(&ctx.stats.leases);
    let (cancel_tx, cancel_rx) = CancelWatch::channel();
    let job_ids: Vec<JobId> = lease.jobs.iter().map(|j| j.id).collect();
    let work = async {
        if lease.install {
            ctx.device.install(&lease.build).await?;
            AgentStats::bump(&ctx.stats.installs);
        }
        let run = ctx.device.run(&lease.build, &lease.jobs, cancel_rx);
        let runs = if ctx.device.enforces_timeouts() {
            run.await
        } else {
            hold_to_timeouts(run, &lease.jobs, &cancel_tx).await
        };
        Ok::<Vec<JobRun>, InfraFailure>(runs)
    };
    // The lease poll was just answered.
    let answering = AtomicBool::new(true);
    let heartbeat = heartbeat_loop(ctx, lease.id, &cancel_tx, &answering);
    tokio::pin!(work, heartbeat);

    let outcome = tokio::select! {
        r = &mut work => Some(r),
        () = &mut heartbeat => None,
    };
    let Some(outcome) = outcome else {
        // The scheduler gave these jobs up (lease expired or device removed): stop them and
        // report nothing; another attempt may already be running elsewhere.
        ctx.stats.note(&LinkError::Stale);
        cancel_tx.cancel(&job_ids);
        let _ = work.await;
        return LeaseEnd {
            device_lost: false,
            jobs_left: false,
        };
    };
    let results: Vec<(JobId, JobRun)> = match outcome {
        Err(install_failure) => job_ids
            .iter()
            .map(|id| (*id, Err(install_failure.clone())))
            .collect(),
        Ok(runs) => {
            let mut runs = runs.into_iter();
            lease
                .jobs
                .iter()
                .map(|job| {
                    let run = runs.next().unwrap_or_else(|| {
                        Err(InfraFailure {
                            kind: InfraErrorKind::RunnerCrashed,
                            message: "the device returned no result for this job".into(),
                        })
                    });
                    (job.id, timed_out_as_such(job, run, &cancel_tx))
                })
                .collect()
        }
    };
    let device_lost = results
        .iter()
        .any(|(_, r)| matches!(r, Err(f) if f.kind == InfraErrorKind::DeviceLost));
    let reports = report_all(ctx, lease.id, results, &answering);
    tokio::pin!(reports);
    // The heartbeats go on while the reports are sent, and end with them.
    let jobs_left = tokio::select! {
        left = &mut reports => left,
        () = &mut heartbeat => {
            // The scheduler has moved the lease's jobs on: nothing is left to hand back.
            ctx.stats.note(&LinkError::Stale);
            false
        }
    };
    LeaseEnd {
        device_lost,
        jobs_left,
    }
}

/// Runs `run`, a device's batch of `jobs`, holding the jobs to their timeouts for a device
/// that does not (see [`Device::enforces_timeouts`]): counting from now, each job gets its
/// own timeout plus those of the jobs ahead of it, and one not done by then is told to stop
/// through `stop`. The budgets add up because a device runs a batch's jobs one after
/// another and the agent cannot see when each starts; a job stopped at its budget has had
/// at least its own timeout, since the ones ahead of it were stopped at theirs.
async fn hold_to_timeouts<F>(run: F, jobs: &[LeasedJob], stop: &CancelSender) -> Vec<JobRun>
where
    F: Future<Output = Vec<JobRun>>,
{
    let start = tokio::time::Instant::now();
    let mut budget = Duration::ZERO;
    tokio::pin!(run);
    for job in jobs {
        budget = budget.saturating_add(Duration::from_millis(job.spec.timeout_ms));
        // Past what the clock can express (timeouts are at most a day each): no deadline.
        let Some(at) = start.checked_add(budget) else {
            break;
        };
        tokio::select! {
            runs = &mut run => return runs,
            () = tokio::time::sleep_until(at) => stop.time_out(&[job.id]),
        }
    }
    run.await
}

/// `run`, or, when the agent stopped `job` for its timeout and the device reported it
/// stopped (an `Other` failure, as for a cancel), the timeout failure the real executor
/// reports too. A verdict stands (the job may have finished before the stop reached it), and
/// so does a failure the device named itself (its own timeout, a lost device).
fn timed_out_as_such(job: &LeasedJob, run: JobRun, stop: &CancelSender) -> JobRun {
    match run {
        Err(f) if f.kind == InfraErrorKind::Other && stop.timed_out(job.id) => {
            Err(InfraFailure::timed_out(
                Duration::from_millis(job.spec.timeout_ms),
                "the agent stopped them",
            ))
        }
        other => other,
    }
}

/// Waits until the device is healthy, asking every `HEALTH_EVERY`; false when shutdown
/// came first.
async fn until_healthy(ctx: &Ctx, shutdown: &mut ShutdownSignal) -> bool {
    let mut noted = false;
    loop {
        if ctx.device.healthy().await {
            return true;
        }
        if !noted {
            AgentStats::bump(&ctx.stats.unhealthy);
            noted = true;
        }
        if !pause(HEALTH_EVERY, shutdown).await {
            return false;
        }
    }
}

/// How often an unhealthy device is asked again.
const HEALTH_EVERY: Duration = Duration::from_secs(3);

/// Reports each job, retrying transport errors; a job the lease no longer holds is skipped.
/// Returns whether the lease still holds jobs whose reports were given up or refused.
async fn report_all(
    ctx: &Ctx,
    lease: LeaseId,
    results: Vec<(JobId, JobRun)>,
    answering: &AtomicBool,
) -> bool {
    let mut batch = BatchReports {
        answering,
        stopping_gave_up: false,
        refused_for: Duration::ZERO,
    };
    let mut jobs_left = false;
    for (job, run) in results {
        let mut sent = deliver(ctx, lease, job, &run, Budget::Patience, &mut batch).await;
        // Why the first report was given up, once the agent reports something else instead.
        let mut instead = None;
        if let (Ok(report), Sent::Undelivered(e)) = (&run, &sent) {
            if !ctx.stopping.is_triggered() {
                // The scheduler answers but keeps refusing this verdict: say so as an
                // infrastructure failure, which the scheduler retries by its usual rules
                // and which shows the user why the job ran again.
                let failure = InfraFailure {
                    kind: InfraErrorKind::Other,
                    message: format!(
                        "the tests' result ({}) could not be delivered: {}",
                        if report.passed { "passed" } else { "failed" },
                        refused(ctx.cfg.report_patience, e)
                    ),
                };
                instead = Some(failure.message.clone());
                sent = deliver(ctx, lease, job, &Err(failure), Budget::Attempts, &mut batch).await;
            }
        }
        match sent {
            Sent::Accepted(state) => {
                AgentStats::bump(&ctx.stats.jobs_run);
                if instead.is_some() {
                    AgentStats::bump(&ctx.stats.undelivered);
                }
                // What was delivered: the verdict, or a failure (its own or one instead).
                let verdict = run.is_ok() && instead.is_none();
                match (verdict, state) {
                    (false, JobState::Canceled) => AgentStats::bump(&ctx.stats.canceled),
                    (false, _) => AgentStats::bump(&ctx.stats.infra_failures),
                    (true, JobState::Passed) => AgentStats::bump(&ctx.stats.passed),
                    (true, JobState::Failed) => AgentStats::bump(&ctx.stats.failed),
                    _ => {}
                }
            }
            // This job is no longer the lease's (the scheduler ended it, e.g. a cancel's
            // grace ran out); the others may still be: go on.
            Sent::Stale => {}
            Sent::Rejected => {
                jobs_left = true;
                if instead.is_some() {
                    AgentStats::bump(&ctx.stats.unreported);
                }
            }
            Sent::Undelivered(e) => {
                AgentStats::bump(&ctx.stats.unreported);
                jobs_left = true;
                if !ctx.stopping.is_triggered() {
                    // Best effort, once: the job's log is where the user looks for why it
                    // ran again, and the scheduler's note on requeueing it cannot know.
                    let why = instead.unwrap_or_else(|| refused(ctx.cfg.report_patience, &e));
                    let note = format!("qgjob agent: gave up reporting this attempt: {why}\n");
                    let _ = ctx.link.log(lease, job, &note).await;
                }
            }
        }
    }
    jobs_left
}

/// What the reports of one batch share.
struct BatchReports<'a> {
    /// Whether the lease's last heartbeat was answered.
    answering: &'a AtomicBool,
    /// Once a stopping agent gave up one report, the scheduler is unreachable: the rest of
    /// the batch gets one try each, so the agent does not wait out every job's retries.
    stopping_gave_up: bool,
    /// How long the scheduler has refused this batch's reports while the heartbeats were
    /// answered, since it last took one (other than a failure sent in a verdict's place). The patience is the batch's, not each job's: a
    /// server refusing every report would otherwise hold the device for the patience
    /// times the batch size.
    refused_for: Duration,
}

/// How long [`deliver`] retries transport errors while the agent runs.
#[derive(Debug, Clone, Copy)]
enum Budget {
    /// Until the batch's reports were refused for [`AgentConfig::report_patience`] while
    /// heartbeats were answered.
    Patience,
    /// [`AgentConfig::report_attempts`] tries.
    Attempts,
}

/// How one report ended.
enum Sent {
    /// The scheduler took it; the job's state after it.
    Accepted(JobState),
    /// The lease no longer holds the job.
    Stale,
    /// Refused as invalid: sending it again cannot help.
    Rejected,
    /// Given up after transport errors (the last one).
    Undelivered(LinkError),
}

/// Sends one report, retrying transport errors within `budget` (or, once the agent is
/// stopping, [`AgentConfig::report_attempts`]).
async fn deliver(
    ctx: &Ctx,
    lease: LeaseId,
    job: JobId,
    run: &JobRun,
    budget: Budget,
    batch: &mut BatchReports<'_>,
) -> Sent {
    let mut backoff = Backoff::new(&ctx.cfg);
    let mut attempts: u32 = 0;
    // Only refusals while the heartbeats are answered count toward the patience: an
    // unreachable scheduler (an outage, a restart) does not use it up.
    let mut since = tokio::time::Instant::now();
    loop {
        attempts = attempts.saturating_add(1);
        let sent = match run {
            Ok(report) => ctx.link.complete(lease, job, report.clone()).await,
            Err(failure) => ctx.link.fail(lease, job, failure.clone()).await,
        };
        match sent {
            Ok(state) => {
                // A failure sent in place of a refused verdict getting through says nothing
                // about the next verdict.
                if matches!(budget, Budget::Patience) {
                    batch.refused_for = Duration::ZERO;
                }
                return Sent::Accepted(state);
            }
            Err(LinkError::Stale) => {
                ctx.stats.note(&LinkError::Stale);
                return Sent::Stale;
            }
            Err(e @ (LinkError::Transport(_) | LinkError::Busy(_))) => {
                ctx.stats.note(&e);
                let now = tokio::time::Instant::now();
                if batch.answering.load(Ordering::Relaxed) && matches!(e, LinkError::Transport(_)) {
                    batch.refused_for += now - since;
                }
                since = now;
                let spent = if ctx.stopping.is_triggered() {
                    batch.stopping_gave_up || attempts >= ctx.cfg.report_attempts
                } else {
                    match budget {
                        Budget::Patience => batch.refused_for >= ctx.cfg.report_patience,
                        Budget::Attempts => attempts >= ctx.cfg.report_attempts,
                    }
                };
                if spent {
                    batch.stopping_gave_up |= ctx.stopping.is_triggered();
                    return Sent::Undelivered(e);
                }
                tokio::time::sleep(backoff.next()).await;
            }
            Err(e) => {
                ctx.stats.note(&e);
                return Sent::Rejected;
            }
        }
    }
}

/// Why a report was given up while the scheduler answered heartbeats, in words.
fn refused(patience: Duration, last: &LinkError) -> String {
    format!(
        "the server refused it for {patience:?} while it answered the agent's heartbeats \
         (last: {last})"
    )
}

/// Runs `fut` with the scheduler's timers driven in the background, stopping the ticker
/// afterwards. Convenience for demos and tests.
pub async fn with_ticker<S, F>(shared: &SharedScheduler<S>, fut: F) -> F::Output
where
    S: Scheduler + Send + 'static,
    F: Future,
{
    let ticker = shared.spawn_ticker();
    let out = fut.await;
    ticker.abort();
    out
}
