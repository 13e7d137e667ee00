//! The server's shared state and its two background tasks.
//!
//! - The scheduler ([`GroupedScheduler`]) sits behind a `std::sync::Mutex` that is never
//!   held across an `.await`. [`App::mutate`] runs one change at the current Unix time,
//!   drains the scheduler's events, and — still under the lock, so the writer sees changes
//!   in the order they happened — queues the changed jobs for the writer. The request then
//!   waits for its own acknowledgement: nothing is answered before it is on disk.
//! - The writer task group-commits: it takes every pending request at once, writes them in
//!   one store transaction, then publishes their events (SSE) in order and acknowledges.
//!   A write that keeps failing (a full disk, a database that refuses, a store another
//!   server took over) stops the server: the scheduler in memory already holds the
//!   unwritten changes and cannot take them back, so it must not answer from them. The
//!   writer retries for a few seconds first (a database restart is a blip), then records the
//!   failure in [`Fatal`]; from then on every request gets 503 and the server shuts down,
//!   to be started again from what the store holds.
//! - The timer task sleeps until the scheduler's next deadline (or a kick), then ticks it:
//!   that expires leases, times jobs out and releases retries. It also makes the scheduler
//!   forget jobs finished longer ago than the retention window (the store keeps them).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qgjob_core::{
    GroupedScheduler, Job, JobEvent, JobId, JobState, Lease, LeaseId, Scheduler, Target, Time,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};

use crate::auth::Auth;
use crate::blobs::Blobs;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{RunRecord, Store, StoreError, WriteBatch};

/// How long after a lease ends its agent may still append log lines.
pub const LOG_GRACE_MS: u64 = 120_000;

/// The shared state handlers get.
pub type AppState = Arc<App>;

/// Size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest JSON request body.
    pub body_bytes: usize,
    /// Largest batch (`POST /v1/runs`) body.
    pub run_body_bytes: usize,
    /// Largest app build or test bundle.
    pub artifact_bytes: u64,
    /// Largest log of one job.
    pub log_bytes: u64,
    /// How long finished jobs stay in the scheduler's memory (ms).
    pub retention_ms: u64,
    /// How long a connection may take to send a request's headers, and how long an idle
    /// keep-alive connection stays open (ms).
    pub header_read_timeout_ms: u64,
    /// Most connections open at once (lowered to fit the open-files limit).
    pub max_connections: usize,
    /// How long a request's body (not an upload's) may take to arrive, in ms (408 after).
    pub body_timeout_ms: u64,
    /// Most bytes all request bodies in flight (not uploads) may hold together; a body that
    /// would pass it is refused with 503.
    pub intake_bytes: usize,
    /// How long an upload (`PUT`) may go without receiving a byte, in ms (408 after). An
    /// upload has no overall deadline (a 2 GB build on a slow link takes long), but one
    /// whose client went silent must not hold its connection and buffers forever.
    pub upload_stall_ms: u64,
    /// How long a stopping server waits for requests in flight (ms) before it closes their
    /// connections (see [`crate::conn::DRAIN_LIMIT`]).
    pub drain_ms: u64,
}

/// How long the writer keeps retrying a failed write (delays between tries) before it
/// stops the server.
const WRITE_RETRY_DELAYS_MS: [u64; 6] = [50, 200, 500, 1_000, 2_000, 4_000];

/// A store failure that stopped the server (see the module docs).
#[derive(Default)]
pub struct Fatal {
    message: std::sync::OnceLock<String>,
    notify: Notify,
}

impl Fatal {
    /// Records the failure (the first one wins) and wakes [`Fatal::wait`].
    pub(crate) fn set(&self, message: String) {
        if self.message.set(message).is_ok() {
            // Every waiter: the shutdown and a writer retrying may both wait.
            self.notify.notify_waiters();
        }
    }

    /// The failure, once there is one.
    pub fn get(&self) -> Option<&str> {
        self.message.get().map(String::as_str)
    }

    /// Resolves once there is a failure, with its message.
    pub async fn wait(&self) -> String {
        loop {
            // Registered before the check, so a failure recorded in between still wakes it.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(m) = self.get() {
                return m.to_string();
            }
            notified.await;
        }
    }

    /// The answer every request gets once the store failed (the detail is in the
    /// server's log, not sent: it may name server internals).
    pub fn error(&self) -> Option<ApiError> {
        self.get().map(|_| store_failed())
    }
}

/// The answer to a request whose change could not be stored, and to every request after.
fn store_failed() -> ApiError {
    ApiError::unavailable(
        "the server could not store a change and is stopping (its log says why); \
         nothing unstored was acknowledged: retry once it runs again",
    )
}

struct WriteReq {
    batch: WriteBatch,
    events: Vec<JobEvent>,
    ack: Option<oneshot::Sender<Result<(), String>>>,
}

/// Everything the handlers share.
pub struct App {
    sched: Mutex<GroupedScheduler>,
    /// The durable store.
    pub store: Arc<dyn Store>,
    /// Artifact storage.
    pub blobs: Blobs,
    /// Tokens.
    pub auth: Auth,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Job state changes, published after they are committed.
    pub events: broadcast::Sender<JobEvent>,
    /// Woken when work may be available in any pool (the timer's expiries and retries).
    pub work: Notify,
    /// Woken when a job of that pool changed: a long poll waits on its device's pool's
    /// (and on `work`), so a change in one pool does not wake every idle device of the lab.
    /// Entries are made by the long polls only, so a target no device polls costs nothing.
    pub work_by_target: Mutex<HashMap<Target, Arc<Notify>>>,
    /// Woken when the timer should look at the deadlines again.
    pub timer: Notify,
    /// Flips to true when the server begins shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// Limits.
    pub limits: Limits,
    /// Set when the store failed for good: the server answers nothing more and stops.
    pub fatal: Arc<Fatal>,
    writer: mpsc::UnboundedSender<WriteReq>,
    last_now: AtomicU64,
    /// Leases granted lately: which jobs each held and until when (ms) it is remembered.
    /// Lets an agent's last log lines arrive just after it reported the job.
    recent_leases: Mutex<HashMap<LeaseId, (Vec<JobId>, u64)>>,
}

/// Handles to the background tasks, to stop them in order on shutdown.
pub struct Background {
    writer: tokio::task::JoinHandle<()>,
    timer: tokio::task::JoinHandle<()>,
}

/// Milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl App {
    /// Builds the state and starts the writer and timer tasks.
    pub fn start(
        sched: GroupedScheduler,
        store: Arc<dyn Store>,
        blobs: Blobs,
        auth: Auth,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
    ) -> (AppState, Background) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(16 * 1024);
        let metrics = Arc::new(Metrics::default());
        let fatal = Arc::new(Fatal::default());
        let app = Arc::new(App {
            sched: Mutex::new(sched),
            store: store.clone(),
            blobs,
            auth,
            metrics: metrics.clone(),
            events: events.clone(),
            work: Notify::new(),
            work_by_target: Mutex::new(HashMap::new()),
            timer: Notify::new(),
            shutdown,
            limits,
            fatal: Arc::clone(&fatal),
            writer: tx,
            last_now: AtomicU64::new(wall_ms()),
            recent_leases: Mutex::new(HashMap::new()),
        });
        let writer = tokio::spawn(writer_task(rx, store, events, metrics, fatal));
        let timer = tokio::spawn(timer_task(Arc::downgrade(&app), app.shutdown.clone()));
        (app, Background { writer, timer })
    }

    /// The notify a long poll for a device of `target` waits on (made on first use).
    pub fn target_work(&self, target: &Target) -> Arc<Notify> {
        let mut m = self
            .work_by_target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            m.entry(target.clone())
                .or_insert_with(|| Arc::new(Notify::new())),
        )
    }

    /// Wakes the long polls of these pools.
    fn wake_targets(&self, targets: &BTreeSet<Target>) {
        if targets.is_empty() {
            return;
        }
        let m = self
            .work_by_target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for t in targets {
            if let Some(n) = m.get(t) {
                n.notify_waiters();
            }
        }
    }

    /// Locks the scheduler. A panic while it was held leaves a consistent-enough state for
    /// reads, so a poisoned lock is used rather than turned into more panics.
    pub fn lock(&self) -> MutexGuard<'_, GroupedScheduler> {
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current time for the scheduler: wall clock, never going backwards.
    fn now(&self) -> Time {
        let w = wall_ms();
        let prev = self.last_now.fetch_max(w, Ordering::Relaxed);
        Time(prev.max(w))
    }

    /// Runs one change on the scheduler and waits until it is durable.
    ///
    /// `f` gets the scheduler, `now`, and a list to which it adds jobs it changed without
    /// an event (e.g. a cancel request on a running job). On `Err` the scheduler promises
    /// it changed nothing, so nothing is written. With `barrier`, the call also waits for
    /// everything queued before it (e.g. an idempotent repeat of a not-yet-committed submit).
    pub async fn mutate<R>(
        &self,
        runs: Vec<RunRecord>,
        barrier: bool,
        f: impl FnOnce(&mut GroupedScheduler, Time, &mut Vec<JobId>) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        self.mutate_runs(barrier, |s, now, touched| Ok((f(s, now, touched)?, runs)))
            .await
    }

    /// [`App::mutate`] where `f` also decides which runs to record, from what it found
    /// under the lock (a repeated run submission records none).
    pub async fn mutate_runs<R>(
        &self,
        barrier: bool,
        f: impl FnOnce(
            &mut GroupedScheduler,
            Time,
            &mut Vec<JobId>,
        ) -> Result<(R, Vec<RunRecord>), ApiError>,
    ) -> Result<R, ApiError> {
        let (r, ack, endings) = {
            let mut s = self.lock();
            // After a failed write the scheduler is ahead of the store: change nothing more.
            if let Some(e) = self.fatal.error() {
                return Err(e);
            }
            let now = self.now();
            let mut touched = Vec::new();
            let (r, runs) = f(&mut s, now, &mut touched)?;
            let events = s.take_events();
            if events.is_empty() && touched.is_empty() && runs.is_empty() && !barrier {
                return Ok(r);
            }
            // Any state change can change what the policy gives an idle device of its pool
            // (new work, or a group whose spread now allows one more device), so a change
            // wakes the long polls of that pool; they re-ask and go back to waiting if
            // nothing is theirs.
            let mut wake: BTreeSet<Target> = BTreeSet::new();
            let mut jobs: Vec<Job> = Vec::with_capacity(events.len() + touched.len());
            for e in &events {
                if let Some(j) = s.get(e.job_id) {
                    if !wake.contains(&j.spec.target) {
                        wake.insert(j.spec.target.clone());
                    }
                    jobs.push(j.clone());
                }
            }
            for id in &touched {
                if let Some(j) = s.get(*id) {
                    jobs.push(j.clone());
                }
            }
            for e in &events {
                if e.state == JobState::Queued && e.attempt > 1 {
                    self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                }
            }
            let endings = ended_attempts(&s, &events);
            let (tx, rx) = oneshot::channel();
            let req = WriteReq {
                batch: WriteBatch { jobs, runs },
                events,
                ack: Some(tx),
            };
            if self.writer.send(req).is_err() {
                return Err(ApiError::unavailable("the server is shutting down"));
            }
            drop(s);
            // Agents may lease the new work now: their lease commits after this write.
            self.wake_targets(&wake);
            (r, rx, endings)
        };
        match ack.await {
            Ok(Ok(())) => {
                // Best effort: the state change is stored; its log line follows it.
                for (id, text) in endings {
                    let _ = self
                        .store
                        .append_log(id, text.as_bytes(), self.limits.log_bytes)
                        .await;
                }
                Ok(r)
            }
            Ok(Err(e)) => {
                // Logged with its detail; the client learns it may retry once the server
                // is back (the change was not acknowledged).
                tracing::error!(error = %e, "store write failed");
                Err(store_failed())
            }
            Err(_) => Err(ApiError::unavailable("the server is shutting down")),
        }
    }

    /// A job by id: the scheduler's copy if it still holds the job, else the store's.
    pub async fn job(&self, id: JobId) -> Result<Option<Job>, ApiError> {
        if let Some(j) = self.lock().get(id).cloned() {
            return Ok(Some(j));
        }
        Ok(self.store.get_job(id).await?)
    }

    /// Remembers a granted lease for [`App::may_log`], until its jobs' timeouts plus a grace
    /// period have passed.
    pub fn remember_lease(&self, lease: &Lease) {
        let longest = lease
            .jobs
            .iter()
            .map(|j| j.spec.timeout_ms)
            .max()
            .unwrap_or(0);
        let until = wall_ms()
            .saturating_add(longest)
            .saturating_add(LOG_GRACE_MS)
            .max(lease.deadline.0.saturating_add(LOG_GRACE_MS));
        let jobs = lease.jobs.iter().map(|j| j.id).collect();
        self.recent_leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lease.id, (jobs, until));
    }

    /// Whether `lease` may append to `job`'s log: it holds the job now, or it held it lately
    /// and no newer attempt holds it (log lines may trail the report that ended the job).
    pub fn may_log(&self, lease: LeaseId, job: JobId) -> bool {
        let current = match self.lock().get(job) {
            Some(j) => j.lease,
            None => return false,
        };
        match current {
            Some(l) => l == lease,
            None => self
                .recent_leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&lease)
                .is_some_and(|(jobs, _)| jobs.contains(&job)),
        }
    }

    fn prune_leases(&self, now: u64) {
        self.recent_leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (_, until)| *until > now);
    }

    /// Replaces jobs read from the store by the scheduler's fresher copies.
    pub fn overlay(&self, jobs: &mut [Job]) {
        let s = self.lock();
        for j in jobs.iter_mut() {
            if let Some(fresh) = s.get(j.id) {
                if fresh != j {
                    *j = fresh.clone();
                }
            }
        }
    }
}

impl Background {
    /// Stops the timer, waits until every queued write is committed, then stops the writer.
    pub async fn finish(self, app: &AppState) {
        self.timer.abort();
        let _ = self.timer.await;
        // A barrier: once it is acknowledged, every earlier write is on disk.
        let _ = app.mutate(Vec::new(), true, |_, _, _| Ok(())).await;
        self.writer.abort();
        let _ = self.writer.await;
    }
}

async fn writer_task(
    mut rx: mpsc::UnboundedReceiver<WriteReq>,
    store: Arc<dyn Store>,
    events: broadcast::Sender<JobEvent>,
    metrics: Arc<Metrics>,
    fatal: Arc<Fatal>,
) {
    let mut reqs = Vec::with_capacity(1024);
    loop {
        reqs.clear();
        if rx.recv_many(&mut reqs, 8192).await == 0 {
            return;
        }
        if let Some(m) = fatal.get() {
            // Nothing more is written once a write failed for good: these changes may
            // build on the ones that were lost.
            for r in reqs.drain(..) {
                if let Some(ack) = r.ack {
                    let _ = ack.send(Err(m.to_string()));
                }
            }
            continue;
        }
        let mut batch = WriteBatch::default();
        for r in reqs.iter_mut() {
            batch.jobs.append(&mut r.batch.jobs);
            batch.runs.append(&mut r.batch.runs);
        }
        let res = if batch.jobs.is_empty() && batch.runs.is_empty() {
            Ok(())
        } else {
            write_retrying(store.as_ref(), &batch, &fatal).await
        };
        match res {
            Ok(()) => {
                metrics.commits.fetch_add(1, Ordering::Relaxed);
                metrics
                    .committed_jobs
                    .fetch_add(batch.jobs.len() as u64, Ordering::Relaxed);
                for r in reqs.drain(..) {
                    for e in r.events {
                        // No subscriber is fine: nobody is watching.
                        let _ = events.send(e);
                    }
                    if let Some(ack) = r.ack {
                        let _ = ack.send(Ok(()));
                    }
                }
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    jobs = batch.jobs.len(),
                    "store write failed; stopping the server (it restarts from what is stored)"
                );
                let msg = e.to_string();
                fatal.set(format!("a store write failed: {msg}"));
                for r in reqs.drain(..) {
                    if let Some(ack) = r.ack {
                        let _ = ack.send(Err(msg.clone()));
                    }
                }
            }
        }
    }
}

/// Writes `batch`, trying again after each of [`WRITE_RETRY_DELAYS_MS`] while it fails,
/// except when the store was taken over (trying again cannot help).
/// Stops early once the server is stopping on a failure (`fatal`), such as a lost store
/// lock: a write retried past that moment could land after another server took the store.
async fn write_retrying(
    store: &dyn Store,
    batch: &WriteBatch,
    fatal: &Fatal,
) -> Result<(), StoreError> {
    let mut delays = WRITE_RETRY_DELAYS_MS.iter();
    loop {
        match store.write(batch).await {
            Ok(()) => return Ok(()),
            Err(e @ StoreError::Fenced(_)) => return Err(e),
            Err(e) => match delays.next() {
                Some(_) | None if fatal.get().is_some() => return Err(e),
                Some(ms) => {
                    tracing::warn!(error = %e, retry_in_ms = ms, "store write failed; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(*ms)) => {}
                        _ = fatal.wait() => return Err(e),
                    }
                }
                None => return Err(e),
            },
        }
    }
}

/// A log line for every attempt that `events` show ending without its tests' verdict being
/// final: a retry (`queued` past attempt 1) or an infrastructure `error`. Whatever ended it
/// (an agent's report, an expired lease, a timeout, a device that went or came back idle),
/// the job's log then tells why, also for an attempt that failed before printing anything.
fn ended_attempts(s: &GroupedScheduler, events: &[JobEvent]) -> Vec<(JobId, String)> {
    events
        .iter()
        .filter_map(|e| {
            let j = s.get(e.job_id)?;
            let (why, then) = match e.state {
                JobState::Queued if e.attempt > 1 => {
                    (j.last_error.clone(), "it will be retried".to_string())
                }
                JobState::Error => (
                    j.outcome.as_ref().and_then(|o| o.error.clone()),
                    "the job is now error".to_string(),
                ),
                _ => return None,
            };
            let why = why.unwrap_or_else(|| "the attempt failed".to_string());
            Some((e.job_id, format!("qgjob: {why}; {then}\n")))
        })
        .collect()
}

async fn timer_task(app: std::sync::Weak<App>, mut shutdown: watch::Receiver<bool>) {
    let mut last_forget = wall_ms();
    loop {
        let Some(a) = app.upgrade() else { return };
        if a.fatal.get().is_some() {
            // Nothing can be stored any more; the server is stopping.
            return;
        }
        let now = wall_ms();
        let next = a.lock().next_wakeup();
        let due = next.is_some_and(|t| t.0 <= now);
        if due {
            let res = a
                .mutate(Vec::new(), false, |s, now, _| {
                    // A tick never starts a job, so every running job it removes was a
                    // lease expiry or a timeout, or a cancel its agent did not carry out
                    // in time (those end canceled, and are not expirations).
                    let counts = |s: &GroupedScheduler| -> (u64, u64) {
                        s.queue_depth()
                            .iter()
                            .fold((0, 0), |(r, c), (_, n)| (r + n.running, c + n.canceled))
                    };
                    let (running_before, canceled_before) = counts(s);
                    s.tick(now);
                    let (running_after, canceled_after) = counts(s);
                    let gone = running_before.saturating_sub(running_after);
                    let canceled = canceled_after.saturating_sub(canceled_before);
                    let expired = gone.saturating_sub(canceled);
                    if expired > 0 {
                        tracing::info!(jobs = expired, "leases expired or jobs timed out");
                    }
                    if canceled > 0 {
                        tracing::info!(
                            jobs = canceled,
                            "canceled jobs ended: their agents did not stop them in time"
                        );
                    }
                    a.metrics.expirations.fetch_add(expired, Ordering::Relaxed);
                    Ok(())
                })
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e.message, "timer tick failed to persist");
            }
            a.work.notify_waiters();
            continue;
        }
        // Forget at least twice per retention window (and at most every 30 s).
        let every = (a.limits.retention_ms / 2).clamp(100, 30_000);
        if now.saturating_sub(last_forget) >= every {
            last_forget = now;
            let before = Time(now.saturating_sub(a.limits.retention_ms));
            a.prune_leases(now);
            // forget_finished scans every job under the lock: skip it when nothing is final.
            let mut s = a.lock();
            let finished: u64 = s
                .queue_depth()
                .iter()
                .map(|(_, c)| c.total() - c.queued - c.running)
                .sum();
            let n = if finished > 0 {
                s.forget_finished(before)
            } else {
                0
            };
            drop(s);
            if n > 0 {
                tracing::debug!(jobs = n, "forgot finished jobs (the store keeps them)");
            }
        }
        let wait = next
            .map_or(1000, |t| t.0.saturating_sub(now))
            .clamp(1, 1000)
            .min(every);
        let timer = a.timer.notified();

        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = timer => {}
            _ = shutdown.changed() => return,
        }
    }
}
