//! [`GroupedScheduler`]: the in-memory scheduler, a deterministic state machine whose
//! indexes make a dispatch decision cost O(log n) in queued jobs.
//!
//! Jobs are kept in groups (target × build × requirements). Each group orders its ready jobs
//! by urgency key; each target pool indexes its groups by whether some device serves them
//! (has the build installed). The [`crate::policy`] module decides from those indexes.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{CancelError, DeviceError, ReportError, RestoreError, SubmitError};
use crate::model::{
    BuildRef, DeviceId, DeviceInfo, GroupSummary, HeartbeatAck, InfraErrorKind, InfraFailure, Job,
    JobEvent, JobFilter, JobId, JobSpec, JobState, Lease, LeaseId, LeasedJob, OrgId, Outcome,
    Requirements, RunReport, StateCounts, Target, TestCounts, TestStatus, Time,
};
use crate::policy::{self, Choice, GroupIdx, GroupView, OrgCandidate, PoolView, UrgencyKey};
use crate::rng::Rng;
use crate::scheduler::{CancelOutcome, DeviceStatus, Scheduler, SchedulerConfig, Submitted};

/// Default number of jobs a listing returns.
const DEFAULT_LIST_LIMIT: usize = 100;
/// Weight of the newest sample in the run-time and install-time moving averages.
const EWMA_WEIGHT: f64 = 0.2;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct GroupKey {
    target: Target,
    build: BuildRef,
    requires: Requirements,
}

/// A ready job's place in its group: (urgency, seq).
type ReadyKey = (UrgencyKey, u64);

#[derive(Debug, Clone)]
struct Group {
    key: GroupKey,
    /// Submission seq of the group's first job: arrival order for the per-group baseline.
    first_seq: u64,
    /// Ready jobs with their priority (which, with the key's urgency, gives the submit time
    /// too), so that the group's head is known without a look in the job table.
    ready: BTreeMap<ReadyKey, (JobId, i32)>,
    running: u64,
    /// Non-lost devices of this pool with the build installed and matching capabilities.
    serving: u32,
    /// Measured run time of this group's jobs (moving average), ms.
    job_ms: Option<f64>,
    /// When its latest job was submitted.
    last_submit: Time,
    /// Where the group currently sits in its pool's indexes (to remove it again).
    indexed: Option<Indexed>,
    /// What the policy reads of the head of `ready`, kept here so that a decision never
    /// looks a job up in the (large, cache-cold) job table; refreshed by `reindex`.
    head: Option<Head>,
}

/// The most urgent ready job of a group, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    key: ReadyKey,
    priority: i32,
    created_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Indexed {
    head: ReadyKey,
    served: bool,
}

#[derive(Debug, Clone, Default)]
struct Pool {
    /// Every group with ready jobs, by its most urgent job.
    by_urgency: BTreeSet<(ReadyKey, GroupIdx)>,
    /// Unserved ready groups per org, by urgency.
    unserved_by_org: BTreeMap<OrgId, BTreeSet<(ReadyKey, GroupIdx)>>,
    /// Unserved ready groups by arrival.
    unserved_by_arrival: BTreeSet<(u64, GroupIdx)>,
    /// Served ready groups.
    served_ready: BTreeSet<GroupIdx>,
    /// Devices currently leased, per org (fair share).
    busy_by_org: BTreeMap<OrgId, u32>,
    /// Install time estimate, ms (moving average of what devices report).
    install_ms: Option<f64>,
    /// Run time estimate of any job in the pool, ms.
    job_ms: Option<f64>,
    counts: StateCounts,
}

#[derive(Debug, Clone)]
struct Dev {
    info: DeviceInfo,
    lease: Option<LeaseId>,
    lost: bool,
    installs: u64,
    /// When its agent was last heard from (register, poll, heartbeat): another agent
    /// session may take the device over only once this is a lease TTL old.
    seen: Time,
}

#[derive(Debug, Clone)]
struct LeaseRec {
    device: DeviceId,
    org: OrgId,
    target: Target,
    /// Jobs not yet reported, in lease order.
    pending: Vec<JobId>,
    deadline: Time,
    /// Backstop: the lease fails its remaining jobs as timed out after this.
    hard_deadline: Time,
    /// The agent session it was granted to; `None` when unknown (restored after a restart,
    /// or granted to an agent that names no session).
    session: Option<String>,
    /// When its agent was last heard from (the grant, a heartbeat; for a restored lease, its
    /// extended deadline minus a TTL): while the scheduler has forgotten the device (after
    /// a restart), this keeps another session from registering it.
    seen: Time,
}

/// The in-memory scheduler. See the [crate docs](crate) for the contract.
///
/// ```
/// use qgjob_core::*;
///
/// let mut s = GroupedScheduler::new(SchedulerConfig::default());
/// let spec = JobSpec::new(
///     OrgId::new("qualgent").unwrap(),
///     AppVersionId::new("xyz123").unwrap(),
///     vec!["tests/onboarding.spec.js".into()],
/// );
/// let job = s.submit(Time(0), spec).unwrap().job_id;
/// let dev = DeviceInfo {
///     id: DeviceId::new("emu-1").unwrap(),
///     target: Target::Emulator,
///     capabilities: Capabilities::default(),
///     installed: None,
///     install_estimate_ms: None,
///     idle: false,
///     session: None,
///     replaces: None,
/// };
/// s.register_device(Time(0), dev.clone()).unwrap();
/// let lease = s.lease(Time(1), &dev.id, 1).unwrap().expect("work");
/// assert!(lease.install);
/// let report = RunReport { passed: true, tests: vec![], duration_ms: 5, error: None };
/// assert_eq!(s.complete(Time(9), lease.id, job, report).unwrap(), JobState::Passed);
/// ```
#[derive(Debug, Clone)]
pub struct GroupedScheduler {
    cfg: SchedulerConfig,
    rng: Rng,
    next_seq: u64,
    next_lease: u64,
    /// Boxed: the table stays small (a hash table runs half empty after it grows, and a
    /// half-empty table of whole jobs cost about 500 bytes per job at a million jobs).
    jobs: HashMap<JobId, Box<Job>>,
    by_seq: BTreeMap<u64, JobId>,
    idempotency: HashMap<(OrgId, String), JobId>,
    groups: Vec<Group>,
    group_index: HashMap<GroupKey, GroupIdx>,
    /// Groups of one build on one target (several when requirements differ).
    build_groups: HashMap<(Target, BuildRef), Vec<GroupIdx>>,
    pools: BTreeMap<Target, Pool>,
    devices: BTreeMap<DeviceId, Dev>,
    leases: BTreeMap<LeaseId, LeaseRec>,
    lease_deadlines: BTreeSet<(Time, LeaseId)>,
    hard_deadlines: BTreeSet<(Time, LeaseId)>,
    /// When running jobs whose cancel was requested are ended by the scheduler if their
    /// agent has not reported them (see `SchedulerConfig::cancel_grace_ms`).
    cancel_deadlines: BTreeSet<(Time, JobId)>,
    backoff: BTreeSet<(Time, u64, JobId)>,
    /// Final jobs by finish time (what `forget_finished` walks).
    finished: BTreeSet<(Time, u64, JobId)>,
    /// When `tick` next looks for silent devices (with `forget_silent_devices_ms`).
    next_sweep: Option<Time>,
    events: Vec<JobEvent>,
}

impl GroupedScheduler {
    /// An empty scheduler.
    pub fn new(cfg: SchedulerConfig) -> Self {
        let rng = Rng::new(cfg.seed);
        GroupedScheduler {
            cfg,
            rng,
            next_seq: 1,
            next_lease: 1,
            jobs: HashMap::new(),
            by_seq: BTreeMap::new(),
            idempotency: HashMap::new(),
            groups: Vec::new(),
            group_index: HashMap::new(),
            build_groups: HashMap::new(),
            pools: BTreeMap::new(),
            devices: BTreeMap::new(),
            leases: BTreeMap::new(),
            lease_deadlines: BTreeSet::new(),
            hard_deadlines: BTreeSet::new(),
            cancel_deadlines: BTreeSet::new(),
            backoff: BTreeSet::new(),
            finished: BTreeSet::new(),
            next_sweep: None,
            events: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// The pool of a registered device.
    pub fn device_target(&self, id: &DeviceId) -> Option<&Target> {
        self.devices.get(id).map(|d| &d.info.target)
    }

    /// Whether a registered device (not lost) serves `target`: a job for a pool no device
    /// serves waits until an agent for it registers.
    pub fn serves_target(&self, target: &Target) -> bool {
        self.devices
            .values()
            .any(|d| !d.lost && d.info.target == *target)
    }

    /// With `forget_silent_devices_ms`, drops devices without a lease whose agent has been
    /// silent that long. A sweep over the devices, at most twice per that time: devices
    /// number in the thousands at most, and polls then only stamp a time.
    fn forget_silent_devices(&mut self, now: Time) {
        let Some(after) = self.cfg.forget_silent_devices_ms else {
            return;
        };
        if self.next_sweep.is_some_and(|t| now < t) {
            return;
        }
        self.next_sweep = Some(now.plus_ms((after / 2).max(1)));
        let silent: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, d)| d.lease.is_none() && now.since(d.seen) >= after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            if let Some(d) = self.devices.remove(&id) {
                if !d.lost {
                    self.adjust_serving(&d.info, -1);
                }
            }
        }
    }

    /// Rebuilds a scheduler from persisted jobs (any order). Queued jobs queue again in their
    /// original order; running jobs keep their leases until those expire or their devices
    /// register again and report. Devices are not restored: agents register again.
    pub fn restore(
        cfg: SchedulerConfig,
        jobs: impl IntoIterator<Item = Job>,
    ) -> Result<Self, RestoreError> {
        let cfg_ttl = cfg.lease_ttl_ms;
        let mut s = GroupedScheduler::new(cfg);
        let mut all: Vec<Job> = jobs.into_iter().collect();
        all.sort_by_key(|j| j.seq);
        // Advance the RNG past restored history, so new ids differ from restored ones.
        let salt = all.len() as u64 ^ all.last().map_or(0, |j| j.seq);
        s.rng = Rng::new(s.cfg.seed ^ salt.rotate_left(17));
        for job in all {
            if s.jobs.contains_key(&job.id) {
                return Err(RestoreError::Duplicate(job.id));
            }
            s.next_seq = s.next_seq.max(job.seq + 1);
            for l in [job.lease, job.last_lease].into_iter().flatten() {
                s.next_lease = s.next_lease.max(l.0 + 1);
            }
            if let Some(k) = &job.spec.idempotency_key {
                s.idempotency
                    .insert((job.spec.org_id.clone(), k.clone()), job.id);
            }
            let gi = s.group_of(&job.spec, job.seq);
            s.pool_mut(&job.spec.target).counts.add(job.state);
            match job.state {
                JobState::Queued => {
                    let id = job.id;
                    let (seq, nb) = (job.seq, job.not_before);
                    s.by_seq.insert(seq, id);
                    s.jobs.insert(id, Box::new(job));
                    match nb {
                        Some(t) => {
                            s.backoff.insert((t, seq, id));
                        }
                        None => s.make_ready(id),
                    }
                }
                JobState::Running => {
                    let (Some(lease), Some(deadline), Some(device)) =
                        (job.lease, job.lease_deadline, job.device.clone())
                    else {
                        return Err(RestoreError::Inconsistent {
                            id: job.id,
                            reason: "running without lease, deadline or device".into(),
                        });
                    };
                    s.next_lease = s.next_lease.max(lease.0 + 1);
                    s.groups[gi].running += 1;
                    let started = job.started_at.unwrap_or(deadline);
                    let hard = started
                        .plus_ms(job.spec.timeout_ms)
                        .plus_ms(s.cfg.lease_ttl_ms);
                    let rec = s.leases.entry(lease).or_insert_with(|| LeaseRec {
                        device,
                        org: job.spec.org_id.clone(),
                        target: job.spec.target.clone(),
                        pending: Vec::new(),
                        deadline,
                        hard_deadline: hard,
                        session: None,
                        seen: Time(deadline.0.saturating_sub(cfg_ttl)),
                    });
                    rec.pending.push(job.id);
                    rec.deadline = rec.deadline.max(deadline);
                    rec.hard_deadline = rec.hard_deadline.max(hard);
                    if job.cancel_requested {
                        // The request's time is not kept: the grace runs from the lease's
                        // deadline, which a restarting server extends for its agents.
                        s.cancel_deadlines
                            .insert((deadline.plus_ms(s.cfg.cancel_grace_ms), job.id));
                    }
                    s.by_seq.insert(job.seq, job.id);
                    s.jobs.insert(job.id, Box::new(job));
                }
                _ => {
                    let done = job.finished_at.unwrap_or(job.created_at);
                    s.finished.insert((done, job.seq, job.id));
                    s.by_seq.insert(job.seq, job.id);
                    s.jobs.insert(job.id, Box::new(job));
                }
            }
        }
        let recs: Vec<(LeaseId, Time, Time, Target, OrgId)> = s
            .leases
            .iter()
            .map(|(id, r)| {
                (
                    *id,
                    r.deadline,
                    r.hard_deadline,
                    r.target.clone(),
                    r.org.clone(),
                )
            })
            .collect();
        for (id, deadline, hard, target, org) in recs {
            s.lease_deadlines.insert((deadline, id));
            s.hard_deadlines.insert((hard, id));
            *s.pool_mut(&target).busy_by_org.entry(org).or_default() += 1;
        }
        Ok(s)
    }

    /// Makes every lease issued from now on carry an id above `issued`. A restored server
    /// passes the highest lease id it ever persisted: [`GroupedScheduler::restore`] only
    /// sees the leases of the jobs it is given, and a lease of a job left out (finished
    /// long ago) must not be issued again, or a late heartbeat from that lease's agent
    /// would extend someone else's lease. Never lowers the next id.
    pub fn reserve_lease_ids_through(&mut self, issued: LeaseId) {
        self.next_lease = self.next_lease.max(issued.0.saturating_add(1));
    }

    /// The id the next lease will carry.
    pub fn next_lease_id(&self) -> LeaseId {
        LeaseId(self.next_lease)
    }

    /// Number of jobs the scheduler holds (all states).
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// True when it holds no job.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Jobs queued and ready to run now (not backing off), over all pools.
    pub fn ready_len(&self) -> usize {
        self.groups.iter().map(|g| g.ready.len()).sum()
    }

    /// Forgets final jobs that finished before `before`, returning how many went. Keeps
    /// memory bounded in a long-running server once the store holds them.
    pub fn forget_finished(&mut self, before: Time) -> usize {
        let mut gone = 0;
        // Walks only the final jobs old enough to go, via their finish-time index.
        while let Some(&(t, seq, id)) = self.finished.first() {
            if t >= before {
                break;
            }
            self.finished.remove(&(t, seq, id));
            self.by_seq.remove(&seq);
            if let Some(j) = self.jobs.remove(&id) {
                if let Some(k) = j.spec.idempotency_key {
                    self.idempotency.remove(&(j.spec.org_id.clone(), k));
                }
                self.pool_mut(&j.spec.target).counts.remove(j.state);
                gone += 1;
            }
        }
        gone
    }

    // ----- internals -----

    fn pool_mut(&mut self, target: &Target) -> &mut Pool {
        if !self.pools.contains_key(target) {
            self.pools.insert(target.clone(), Pool::default());
        }
        self.pools.get_mut(target).expect("inserted above")
    }

    fn urgency(&self, job: &Job) -> UrgencyKey {
        job.created_at.as_millis() as i64
            - i64::from(job.spec.priority.0) * self.cfg.aging_ms_per_level as i64
    }

    /// The group for a spec, created on first sight.
    fn group_of(&mut self, spec: &JobSpec, seq: u64) -> GroupIdx {
        let key = GroupKey {
            target: spec.target.clone(),
            build: spec.build(),
            requires: spec.requires.clone(),
        };
        if let Some(&gi) = self.group_index.get(&key) {
            return gi;
        }
        let gi = self.groups.len();
        let serving = self
            .devices
            .values()
            .filter(|d| Self::serves(d, &key))
            .count() as u32;
        self.groups.push(Group {
            key: key.clone(),
            first_seq: seq,
            ready: BTreeMap::new(),
            running: 0,
            serving,
            job_ms: None,
            last_submit: Time::ZERO,
            indexed: None,
            head: None,
        });
        self.build_groups
            .entry((key.target.clone(), key.build.clone()))
            .or_default()
            .push(gi);
        self.group_index.insert(key, gi);
        gi
    }

    fn serves(d: &Dev, key: &GroupKey) -> bool {
        !d.lost
            && d.info.target == key.target
            && d.info.installed.as_ref() == Some(&key.build)
            && key.requires.matches(&d.info.capabilities)
    }

    fn group_idx(&self, spec: &JobSpec) -> Option<GroupIdx> {
        self.group_index
            .get(&GroupKey {
                target: spec.target.clone(),
                build: spec.build(),
                requires: spec.requires.clone(),
            })
            .copied()
    }

    /// Puts a queued job into its group's ready set.
    fn make_ready(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let key = (self.urgency(job), job.seq);
        let Some(gi) = self.group_idx(&job.spec) else {
            return;
        };
        let priority = job.spec.priority.0;
        self.groups[gi].ready.insert(key, (id, priority));
        self.reindex(gi);
    }

    /// Re-files a group in its pool's indexes after its ready set or serving count changed.
    fn reindex(&mut self, gi: GroupIdx) {
        let level = self.cfg.aging_ms_per_level as i64;
        let g = &mut self.groups[gi];
        let first = g.ready.iter().next().map(|(&key, &(_, priority))| Head {
            key,
            priority,
            // The inverse of `urgency`.
            created_ms: (key.0 + i64::from(priority) * level) as u64,
        });
        g.head = first;
        let g = &self.groups[gi];
        let now_idx = first.map(|h| Indexed {
            head: h.key,
            served: g.serving > 0,
        });
        if now_idx == g.indexed {
            return;
        }
        let old = g.indexed;
        let org = g.key.build.org_id.clone();
        let first_seq = g.first_seq;
        let target = g.key.target.clone();
        let pool = self.pool_mut(&target);
        if let Some(o) = old {
            pool.by_urgency.remove(&(o.head, gi));
            if o.served {
                pool.served_ready.remove(&gi);
            } else {
                if let Some(set) = pool.unserved_by_org.get_mut(&org) {
                    set.remove(&(o.head, gi));
                    if set.is_empty() {
                        pool.unserved_by_org.remove(&org);
                    }
                }
                pool.unserved_by_arrival.remove(&(first_seq, gi));
            }
        }
        if let Some(n) = now_idx {
            pool.by_urgency.insert((n.head, gi));
            if n.served {
                pool.served_ready.insert(gi);
            } else {
                pool.unserved_by_org
                    .entry(org)
                    .or_default()
                    .insert((n.head, gi));
                pool.unserved_by_arrival.insert((first_seq, gi));
            }
        }
        self.groups[gi].indexed = now_idx;
    }

    /// Adjusts `serving` of every group of the device's installed build by `delta`.
    fn adjust_serving(&mut self, dev: &DeviceInfo, delta: i32) {
        let Some(build) = dev.installed.clone() else {
            return;
        };
        let Some(gis) = self.build_groups.get(&(dev.target.clone(), build)).cloned() else {
            return;
        };
        for gi in gis {
            if self.groups[gi].key.requires.matches(&dev.capabilities) {
                let s = &mut self.groups[gi].serving;
                *s = s.saturating_add_signed(delta);
                self.reindex(gi);
            }
        }
    }

    fn emit(&mut self, id: JobId, at: Time) {
        if let Some(j) = self.jobs.get(&id) {
            self.events.push(JobEvent {
                job_id: id,
                run_id: j.spec.run_id,
                org_id: j.spec.org_id.clone(),
                state: j.state,
                attempt: j.attempt,
                at,
            });
        }
    }

    fn set_state(&mut self, id: JobId, state: JobState) {
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        let old = j.state;
        j.state = state;
        let target = j.spec.target.clone();
        let counts = &mut self.pool_mut(&target).counts;
        counts.remove(old);
        counts.add(state);
    }

    fn insert_job(&mut self, now: Time, spec: JobSpec) -> JobId {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut id = JobId::from_parts(now.as_millis(), self.rng.bytes10());
        // A restored scheduler may replay its seeded RNG: never hand out an id in use.
        while self.jobs.contains_key(&id) {
            id = JobId::from_parts(now.as_millis(), self.rng.bytes10());
        }
        if let Some(k) = &spec.idempotency_key {
            self.idempotency
                .insert((spec.org_id.clone(), k.clone()), id);
        }
        let gi = self.group_of(&spec, seq);
        self.groups[gi].last_submit = self.groups[gi].last_submit.max(now);
        let target = spec.target.clone();
        let job = Job {
            id,
            seq,
            spec,
            state: JobState::Queued,
            attempt: 1,
            created_at: now,
            released_at: now,
            started_at: None,
            finished_at: None,
            not_before: None,
            device: None,
            lease: None,
            last_lease: None,
            lease_deadline: None,
            installed: false,
            cancel_requested: false,
            had_failure: false,
            last_error: None,
            outcome: None,
        };
        self.jobs.insert(id, Box::new(job));
        self.by_seq.insert(seq, id);
        self.pool_mut(&target).counts.add(JobState::Queued);
        self.make_ready(id);
        self.emit(id, now);
        id
    }

    /// The job an org submitted with this idempotency key, while the scheduler holds it.
    pub fn job_by_idempotency_key(&self, org: &OrgId, key: &str) -> Option<JobId> {
        self.idempotency
            .get(&(org.clone(), key.to_string()))
            .copied()
    }

    /// Existing job for the spec's idempotency key, or a conflict.
    fn idempotent_match(&self, spec: &JobSpec) -> Result<Option<JobId>, SubmitError> {
        let Some(k) = &spec.idempotency_key else {
            return Ok(None);
        };
        let Some(&existing) = self.idempotency.get(&(spec.org_id.clone(), k.clone())) else {
            return Ok(None);
        };
        let same = self.jobs.get(&existing).is_some_and(|j| {
            let mut a = j.spec.clone();
            let mut b = spec.clone();
            a.run_id = None;
            b.run_id = None;
            a == b
        });
        if same {
            Ok(Some(existing))
        } else {
            Err(SubmitError::IdempotencyConflict {
                key: k.clone(),
                existing,
            })
        }
    }

    fn submitted(&self, id: JobId, created: bool) -> Submitted {
        Submitted {
            job_id: id,
            created,
            state: self.jobs.get(&id).map_or(JobState::Queued, |j| j.state),
        }
    }

    fn check_lease(&self, lease: LeaseId, job: JobId) -> Result<(), ReportError> {
        let rec = self
            .leases
            .get(&lease)
            .ok_or(ReportError::StaleLease(lease))?;
        // A job leaves `pending` when it reports, so a second report lands here too.
        if rec.pending.contains(&job) {
            Ok(())
        } else {
            Err(ReportError::NotInLease { lease, job })
        }
    }

    /// Takes `job` off its lease; ends the lease when it was the last one.
    fn detach(&mut self, lease: LeaseId, job: JobId) {
        let Some(rec) = self.leases.get_mut(&lease) else {
            return;
        };
        rec.pending.retain(|j| *j != job);
        let done = rec.pending.is_empty();
        if let Some(j) = self.jobs.get(&job) {
            if let Some(gi) = self.group_idx(&j.spec) {
                let g = &mut self.groups[gi];
                g.running = g.running.saturating_sub(1);
            }
        }
        if let Some(j) = self.jobs.get_mut(&job) {
            j.lease = None;
            j.lease_deadline = None;
        }
        if done {
            self.end_lease(lease);
        }
    }

    fn end_lease(&mut self, lease: LeaseId) {
        let Some(rec) = self.leases.remove(&lease) else {
            return;
        };
        self.lease_deadlines.remove(&(rec.deadline, lease));
        self.hard_deadlines.remove(&(rec.hard_deadline, lease));
        let pool = self.pool_mut(&rec.target);
        if let Some(n) = pool.busy_by_org.get_mut(&rec.org) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                pool.busy_by_org.remove(&rec.org);
            }
        }
        if let Some(d) = self.devices.get_mut(&rec.device) {
            if d.lease == Some(lease) {
                d.lease = None;
            }
        }
    }

    fn finish(&mut self, now: Time, id: JobId, outcome: Outcome) {
        let state = outcome.state;
        self.set_state(id, state);
        if let Some(j) = self.jobs.get_mut(&id) {
            j.finished_at = Some(now);
            j.not_before = None;
            j.outcome = Some(outcome);
            self.finished.insert((now, j.seq, id));
        }
        self.emit(id, now);
    }

    /// Requeues a job for another attempt after a backoff. `test_failed`: the attempt
    /// failed a test, so a later pass is flaky (an infrastructure error is not the test's).
    fn retry(&mut self, now: Time, id: JobId, error: Option<String>, test_failed: bool) {
        let Some(attempt) = self.jobs.get(&id).map(|j| j.attempt) else {
            return;
        };
        let delay = self.backoff_ms(attempt);
        self.set_state(id, JobState::Queued);
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        j.attempt += 1;
        j.had_failure |= test_failed;
        j.released_at = now.plus_ms(delay);
        j.last_error = error;
        j.device = None;
        if delay == 0 {
            j.not_before = None;
            self.make_ready(id);
        } else {
            let t = now.plus_ms(delay);
            j.not_before = Some(t);
            let seq = j.seq;
            self.backoff.insert((t, seq, id));
        }
        self.emit(id, now);
    }

    fn backoff_ms(&mut self, attempt: u32) -> u64 {
        if self.cfg.backoff_base_ms == 0 {
            return 0;
        }
        let exp = self
            .cfg
            .backoff_base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
            .min(self.cfg.backoff_max_ms);
        let jitter = (self.rng.next_f64() * 2.0 - 1.0) * self.cfg.backoff_jitter;
        ((exp as f64) * (1.0 + jitter)).max(0.0) as u64
    }

    /// Ends a job after an infrastructure failure: retry, error, or canceled if asked.
    fn on_infra_failure(&mut self, now: Time, id: JobId, failure: &InfraFailure) -> JobState {
        let Some(j) = self.jobs.get(&id) else {
            return JobState::Error;
        };
        if j.cancel_requested {
            self.finish(now, id, canceled_outcome("canceled while running"));
            return JobState::Canceled;
        }
        let msg = format!("{}: {}", failure.kind, failure.message);
        if j.attempt < j.spec.max_attempts {
            self.retry(now, id, Some(msg), false);
            JobState::Queued
        } else {
            let outcome = Outcome {
                state: JobState::Error,
                flaky: false,
                counts: TestCounts::default(),
                tests: Vec::new(),
                error: Some(msg),
            };
            self.finish(now, id, outcome);
            JobState::Error
        }
    }

    fn expire_lease(&mut self, now: Time, lease: LeaseId, kind: InfraErrorKind) {
        let Some(rec) = self.leases.get(&lease).cloned() else {
            return;
        };
        let failure = InfraFailure {
            kind,
            message: match kind {
                InfraErrorKind::Timeout => "job ran past its timeout".into(),
                _ => format!("device {} stopped heartbeating", rec.device),
            },
        };
        for job in rec.pending.clone() {
            self.detach(lease, job);
            self.on_infra_failure(now, job, &failure);
        }
        self.end_lease(lease);
        if kind == InfraErrorKind::LeaseExpired {
            self.mark_lost(&rec.device);
        }
    }

    /// Ends `lease` because its device will not run it: every job still in it fails as
    /// [`InfraErrorKind::DeviceLost`] (retried or, out of attempts, `error`).
    fn abandon_lease(&mut self, now: Time, lease: LeaseId, message: &str) {
        let Some(rec) = self.leases.get(&lease).cloned() else {
            return;
        };
        let failure = InfraFailure {
            kind: InfraErrorKind::DeviceLost,
            message: message.to_string(),
        };
        for job in rec.pending {
            self.detach(lease, job);
            self.on_infra_failure(now, job, &failure);
        }
        self.end_lease(lease);
    }

    fn mark_lost(&mut self, id: &DeviceId) {
        let Some(d) = self.devices.get(id) else {
            return;
        };
        if d.lost {
            return;
        }
        let info = d.info.clone();
        self.adjust_serving(&info, -1);
        if let Some(d) = self.devices.get_mut(id) {
            d.lost = true;
        }
    }

    fn estimate_job_ms(&self, gi: GroupIdx) -> u64 {
        let g = &self.groups[gi];
        g.job_ms
            .or_else(|| self.pools.get(&g.key.target).and_then(|p| p.job_ms))
            .map_or(self.cfg.default_job_ms, |v| v as u64)
    }

    fn group_view(&self, gi: GroupIdx) -> Option<GroupView> {
        let g = &self.groups[gi];
        let head = g.head.filter(|_| !g.ready.is_empty())?;
        debug_assert_eq!(g.ready.keys().next(), Some(&head.key), "stale group head");
        Some(GroupView {
            idx: gi,
            urgency: head.key.0,
            ready: g.ready.len() as u64,
            ready_work_ms: g.ready.len() as u64 * self.estimate_job_ms(gi),
            serving: g.serving,
            priority: head.priority,
            created_ms: head.created_ms,
            measured: g.job_ms.is_some(),
        })
    }

    fn observe_run(&mut self, id: JobId, ms: u64) {
        let Some(j) = self.jobs.get(&id) else { return };
        let target = j.spec.target.clone();
        if let Some(gi) = self.group_idx(&j.spec) {
            let g = &mut self.groups[gi];
            g.job_ms = Some(ewma(g.job_ms, ms as f64));
        }
        let p = self.pool_mut(&target);
        p.job_ms = Some(ewma(p.job_ms, ms as f64));
    }
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        None => sample,
        Some(o) => o + EWMA_WEIGHT * (sample - o),
    }
}

fn canceled_outcome(why: &str) -> Outcome {
    Outcome {
        state: JobState::Canceled,
        flaky: false,
        counts: TestCounts::default(),
        tests: Vec::new(),
        error: Some(why.to_string()),
    }
}

/// The policy's window onto one pool, for one asking device.
struct View<'a> {
    s: &'a GroupedScheduler,
    now: Time,
    pool: Option<&'a Pool>,
    dev: &'a Dev,
}

impl View<'_> {
    /// For the build installed on a device, over its groups the device can run: whether
    /// any has ready jobs, and the devices serving the one submitted to last and how long
    /// ago (ms). `None` when nothing is installed or no such group exists.
    fn installed_activity(&self, info: &DeviceInfo) -> Option<(bool, u32, u64)> {
        let build = info.installed.clone()?;
        let gis = self.s.build_groups.get(&(info.target.clone(), build))?;
        let groups = gis
            .iter()
            .map(|&gi| &self.s.groups[gi])
            .filter(|g| g.key.requires.matches(&info.capabilities));
        let mut ready = false;
        let mut latest: Option<(u32, u64)> = None;
        for g in groups {
            ready |= !g.ready.is_empty();
            let since = self.now.since(g.last_submit);
            if latest.is_none_or(|(_, l)| since < l) {
                latest = Some((g.serving, since));
            }
        }
        latest.map(|(serving, since)| (ready, serving, since))
    }

    /// The other idle devices of the asking device's pool with the same capabilities, so
    /// that every group it could take, they can take too. One look per device: pools hold
    /// tens of devices, and only the rarer paths of a decision ask.
    fn idle_peers(&self) -> impl Iterator<Item = &Dev> + '_ {
        let me = &self.dev.info;
        self.s.devices.values().filter(move |d| {
            d.info.id != me.id
                && d.info.target == me.target
                && d.lease.is_none()
                && !d.lost
                && d.info.capabilities == me.capabilities
        })
    }

    fn fits(&self, gi: GroupIdx) -> bool {
        self.s.groups[gi]
            .key
            .requires
            .matches(&self.dev.info.capabilities)
    }
}

impl PoolView for View<'_> {
    fn own_group(&self) -> Option<OrgCandidate> {
        let build = self.dev.info.installed.clone()?;
        let busy = self
            .pool
            .and_then(|p| p.busy_by_org.get(&build.org_id).copied())
            .unwrap_or(0);
        let gis = self
            .s
            .build_groups
            .get(&(self.dev.info.target.clone(), build))?;
        let group = gis
            .iter()
            .filter(|&&gi| self.fits(gi))
            .filter_map(|&gi| self.s.group_view(gi))
            .min_by_key(|g| (g.urgency, g.idx))?;
        Some(OrgCandidate { busy, group })
    }

    fn spare_device(&self, warm_ms: u64) -> bool {
        // Only for a device keeping a warm build while a new group waits.
        self.idle_peers()
            .any(|d| match self.installed_activity(&d.info) {
                None => true,
                Some((true, _, _)) => false,
                Some((false, serving, since)) => serving >= 2 || since >= warm_ms,
            })
    }

    fn idle_peer(&self) -> bool {
        // Asked once per decision, and only by an idle device with nothing of its own to
        // do and no waiting group to take.
        self.idle_peers().next().is_some()
    }

    fn own_idle(&self) -> Option<(u32, u64)> {
        self.installed_activity(&self.dev.info)
            .map(|(_, serving, since)| (serving, since))
    }

    fn unserved_by_org(&self) -> impl Iterator<Item = OrgCandidate> + '_ {
        self.pool
            .into_iter()
            .flat_map(|pool| {
                pool.unserved_by_org
                    .iter()
                    .map(move |(org, set)| (pool, org, set))
            })
            .filter_map(|(pool, org, set)| {
                let (_, gi) = set.iter().find(|(_, gi)| self.fits(*gi))?;
                Some(OrgCandidate {
                    busy: pool.busy_by_org.get(org).copied().unwrap_or(0),
                    group: self.s.group_view(*gi)?,
                })
            })
    }

    fn oldest_unserved(&self) -> Option<GroupView> {
        let pool = self.pool?;
        pool.unserved_by_arrival
            .iter()
            .find(|(_, gi)| self.fits(*gi))
            .and_then(|(_, gi)| self.s.group_view(*gi))
    }

    fn most_urgent(&self) -> Option<GroupView> {
        let pool = self.pool?;
        pool.by_urgency
            .iter()
            .find(|(_, gi)| self.fits(*gi))
            .and_then(|(_, gi)| self.s.group_view(*gi))
    }

    fn served_ready(&self) -> Vec<GroupView> {
        let Some(pool) = self.pool else {
            return Vec::new();
        };
        pool.served_ready
            .iter()
            .filter(|gi| self.fits(**gi))
            .filter_map(|gi| self.s.group_view(*gi))
            .collect()
    }

    fn install_ms(&self) -> u64 {
        self.pool
            .and_then(|p| p.install_ms)
            .map_or(self.s.cfg.default_install_ms, |v| v as u64)
    }

    fn level_ms(&self) -> u64 {
        self.s.cfg.aging_ms_per_level
    }

    fn now_ms(&self) -> u64 {
        self.now.as_millis()
    }
}

impl Scheduler for GroupedScheduler {
    fn submit(&mut self, now: Time, spec: JobSpec) -> Result<Submitted, SubmitError> {
        spec.validate()
            .map_err(|source| SubmitError::Invalid { index: 0, source })?;
        if let Some(existing) = self.idempotent_match(&spec)? {
            return Ok(self.submitted(existing, false));
        }
        let id = self.insert_job(now, spec);
        Ok(self.submitted(id, true))
    }

    fn submit_many(
        &mut self,
        now: Time,
        specs: Vec<JobSpec>,
    ) -> Result<Vec<Submitted>, SubmitError> {
        // Validate everything first so a bad spec queues nothing.
        let mut seen_keys: HashMap<(OrgId, String), usize> = HashMap::new();
        let mut existing = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            spec.validate()
                .map_err(|source| SubmitError::Invalid { index, source })?;
            existing.push(self.idempotent_match(spec)?);
            if let Some(k) = &spec.idempotency_key {
                if let Some(prev) = seen_keys.insert((spec.org_id.clone(), k.clone()), index) {
                    if specs[prev] != *spec {
                        return Err(SubmitError::Invalid {
                            index,
                            source: crate::error::InvalidSpec::new(
                                "idempotency_key",
                                "used twice in one batch for different jobs",
                            ),
                        });
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(specs.len());
        for (spec, found) in specs.into_iter().zip(existing) {
            let found = found.or_else(|| {
                let k = spec.idempotency_key.clone()?;
                self.idempotency.get(&(spec.org_id.clone(), k)).copied()
            });
            match found {
                Some(id) => out.push(self.submitted(id, false)),
                None => {
                    let id = self.insert_job(now, spec);
                    out.push(self.submitted(id, true));
                }
            }
        }
        Ok(out)
    }

    fn register_device(&mut self, now: Time, device: DeviceInfo) -> Result<(), DeviceError> {
        device.validate()?;
        // The lease the device holds: its registration's, or, once a restart (of this
        // scheduler) forgot the device, one restored for it, which it gets back.
        let known = self.devices.get(&device.id);
        let restored = match known {
            Some(_) => None,
            None => self.leases.iter().find(|(_, r)| r.device == device.id),
        };
        if let Some(new) = &device.session {
            // Who holds the device: its registration, or a restored lease, whose session
            // is unknown (any session is then another one: the agent running it registers
            // only after reporting).
            let holder = match (known, restored) {
                (Some(d), _) => d.info.session.as_ref().map(|h| (Some(h), d.seen)),
                (None, Some((_, r))) => Some((r.session.as_ref(), r.seen)),
                (None, None) => None,
            };
            if let Some((held_by, seen)) = holder {
                let ttl = self.cfg.lease_ttl_ms;
                let quiet_ms = now.since(seen);
                let other = held_by.is_none_or(|h| h != new && device.replaces.as_ref() != Some(h));
                if other && quiet_ms < ttl {
                    return Err(DeviceError::Held {
                        device: device.id.clone(),
                        quiet_ms,
                        ttl_ms: ttl,
                    });
                }
            }
        }
        let held = match known {
            Some(d) => d.lease,
            None => restored.map(|(id, _)| *id),
        };
        let held = match held {
            Some(lease) if device.idle => {
                self.abandon_lease(
                    now,
                    lease,
                    &format!(
                        "device {} came back idle while running it (its agent restarted or gave the job up)",
                        device.id
                    ),
                );
                None
            }
            other => other,
        };
        if let Some(old) = self.devices.get(&device.id) {
            let (old_info, was_lost) = (old.info.clone(), old.lost);
            if !was_lost {
                self.adjust_serving(&old_info, -1);
            }
            if let Some(d) = self.devices.get_mut(&device.id) {
                d.info = device.clone();
                d.lost = false;
                d.seen = now;
            }
        } else {
            let lease = held;
            self.devices.insert(
                device.id.clone(),
                Dev {
                    info: device.clone(),
                    lease,
                    lost: false,
                    installs: 0,
                    seen: now,
                },
            );
        }
        if let (Some(after), None) = (self.cfg.forget_silent_devices_ms, self.next_sweep) {
            self.next_sweep = Some(now.plus_ms(after));
        }
        if let Some(ms) = device.install_estimate_ms {
            let p = self.pool_mut(&device.target);
            p.install_ms = Some(ewma(p.install_ms, ms as f64));
        }
        self.adjust_serving(&device, 1);
        Ok(())
    }

    fn touch_device(
        &mut self,
        now: Time,
        id: &DeviceId,
        session: Option<&str>,
    ) -> Result<(), DeviceError> {
        let d = self
            .devices
            .get_mut(id)
            .ok_or_else(|| DeviceError::UnknownDevice(id.clone()))?;
        if let (Some(ours), Some(holder)) = (session, d.info.session.as_deref()) {
            if ours != holder {
                return Err(DeviceError::TakenOver(id.clone()));
            }
        }
        d.seen = now;
        Ok(())
    }

    fn unregister_device(&mut self, now: Time, id: &DeviceId) -> Result<(), DeviceError> {
        let d = self
            .devices
            .get(id)
            .ok_or_else(|| DeviceError::UnknownDevice(id.clone()))?;
        let (info, lost, lease) = (d.info.clone(), d.lost, d.lease);
        if let Some(lease) = lease {
            self.abandon_lease(now, lease, &format!("device {id} was unregistered"));
        }
        if !lost {
            self.adjust_serving(&info, -1);
        }
        self.devices.remove(id);
        Ok(())
    }

    fn lease(
        &mut self,
        now: Time,
        device: &DeviceId,
        max_batch: usize,
    ) -> Result<Option<Lease>, DeviceError> {
        let dev = self
            .devices
            .get_mut(device)
            .ok_or_else(|| DeviceError::UnknownDevice(device.clone()))?;
        dev.seen = now;
        let dev = &self.devices[device];
        if dev.lost {
            return Err(DeviceError::Lost(device.clone()));
        }
        if let Some(lease) = dev.lease {
            return Err(DeviceError::Busy {
                device: device.clone(),
                lease,
            });
        }
        let view = View {
            s: self,
            now,
            pool: self.pools.get(&dev.info.target),
            dev,
        };
        let gi = match policy::choose(self.cfg.policy, &view) {
            Choice::Idle => return Ok(None),
            Choice::Group(gi) => gi,
        };
        // Only what the grant needs of the device: cloning its whole info cost several
        // allocations per decision, a measurable part of it at 10^6 queued jobs.
        let build = self.groups[gi].key.build.clone();
        let install = dev.info.installed.as_ref() != Some(&build);
        let (target, session) = (dev.info.target.clone(), dev.info.session.clone());
        // Don't let one device swallow jobs other serving devices could share.
        let g = &self.groups[gi];
        let sharers = (u64::from(g.serving) + u64::from(install)).max(1);
        let fair = (g.ready.len() as u64).div_ceil(sharers).max(1) as usize;
        let n = max_batch.clamp(1, self.cfg.max_batch_limit).min(fair);
        let picked: Vec<(ReadyKey, JobId)> = self.groups[gi]
            .ready
            .iter()
            .take(n)
            .map(|(k, &(id, _))| (*k, id))
            .collect();
        if picked.is_empty() {
            return Ok(None);
        }
        for (k, _) in &picked {
            self.groups[gi].ready.remove(k);
        }
        self.groups[gi].running += picked.len() as u64;
        self.reindex(gi);

        if install {
            let old_info = self.devices[device].info.clone();
            self.adjust_serving(&old_info, -1);
            let mut new_info = old_info;
            new_info.installed = Some(build.clone());
            self.adjust_serving(&new_info, 1);
            if let Some(d) = self.devices.get_mut(device) {
                d.info.installed = Some(build.clone());
                d.installs += 1;
            }
        }
        let id = LeaseId(self.next_lease);
        self.next_lease += 1;
        let deadline = now.plus_ms(self.cfg.lease_ttl_ms);
        let mut total_timeout = self.cfg.lease_ttl_ms;
        let mut jobs = Vec::with_capacity(picked.len());
        for (_, jid) in &picked {
            self.set_state(*jid, JobState::Running);
            if let Some(j) = self.jobs.get_mut(jid) {
                j.started_at = Some(now);
                j.device = Some(device.clone());
                j.lease = Some(id);
                j.last_lease = Some(id);
                j.lease_deadline = Some(deadline);
                j.installed = install;
                total_timeout = total_timeout.saturating_add(j.spec.timeout_ms);
                jobs.push(LeasedJob {
                    id: *jid,
                    attempt: j.attempt,
                    spec: j.spec.clone(),
                });
            }
            self.emit(*jid, now);
        }
        let hard_deadline = now.plus_ms(total_timeout);
        let org = build.org_id.clone();
        *self
            .pool_mut(&target)
            .busy_by_org
            .entry(org.clone())
            .or_default() += 1;
        self.leases.insert(
            id,
            LeaseRec {
                device: device.clone(),
                org,
                target,
                pending: picked.iter().map(|(_, j)| *j).collect(),
                deadline,
                hard_deadline,
                session,
                seen: now,
            },
        );
        self.lease_deadlines.insert((deadline, id));
        self.hard_deadlines.insert((hard_deadline, id));
        if let Some(d) = self.devices.get_mut(device) {
            d.lease = Some(id);
        }
        Ok(Some(Lease {
            id,
            device: device.clone(),
            build,
            install,
            jobs,
            deadline,
        }))
    }

    fn heartbeat(&mut self, now: Time, lease: LeaseId) -> Result<HeartbeatAck, ReportError> {
        let ttl = self.cfg.lease_ttl_ms;
        let rec = self
            .leases
            .get_mut(&lease)
            .ok_or(ReportError::StaleLease(lease))?;
        let old = rec.deadline;
        rec.deadline = rec.deadline.max(now.plus_ms(ttl));
        rec.seen = now;
        let deadline = rec.deadline;
        let pending = rec.pending.clone();
        if let Some(d) = self.devices.get_mut(&rec.device) {
            d.seen = now;
        }
        self.lease_deadlines.remove(&(old, lease));
        self.lease_deadlines.insert((deadline, lease));
        let mut cancel = Vec::new();
        for j in pending {
            if let Some(job) = self.jobs.get_mut(&j) {
                job.lease_deadline = Some(deadline);
                if job.cancel_requested {
                    cancel.push(j);
                }
            }
        }
        Ok(HeartbeatAck { deadline, cancel })
    }

    fn complete(
        &mut self,
        now: Time,
        lease: LeaseId,
        job: JobId,
        report: RunReport,
    ) -> Result<JobState, ReportError> {
        self.check_lease(lease, job)?;
        self.detach(lease, job);
        let Some(j) = self.jobs.get(&job) else {
            return Err(ReportError::NotInLease { lease, job });
        };
        let started = j.started_at.unwrap_or(now);
        let (cancel_requested, had_failure) = (j.cancel_requested, j.had_failure);
        let can_retry = j.spec.retry_failed_tests && j.attempt < j.spec.max_attempts;
        let ran = if report.duration_ms > 0 {
            report.duration_ms
        } else {
            now.since(started)
        };
        self.observe_run(job, ran);
        if cancel_requested {
            self.finish(now, job, canceled_outcome("canceled while running"));
            return Ok(JobState::Canceled);
        }
        let counts = TestCounts::of(&report.tests);
        if report.passed {
            let flaky = had_failure || report.tests.iter().any(|t| t.status == TestStatus::Flaky);
            self.finish(
                now,
                job,
                Outcome {
                    state: JobState::Passed,
                    flaky,
                    counts,
                    tests: report.tests,
                    error: None,
                },
            );
            return Ok(JobState::Passed);
        }
        if can_retry {
            self.retry(now, job, report.error, true);
            return Ok(JobState::Queued);
        }
        self.finish(
            now,
            job,
            Outcome {
                state: JobState::Failed,
                flaky: false,
                counts,
                tests: report.tests,
                error: report.error,
            },
        );
        Ok(JobState::Failed)
    }

    fn fail(
        &mut self,
        now: Time,
        lease: LeaseId,
        job: JobId,
        failure: InfraFailure,
    ) -> Result<JobState, ReportError> {
        self.check_lease(lease, job)?;
        self.detach(lease, job);
        Ok(self.on_infra_failure(now, job, &failure))
    }

    fn cancel(&mut self, now: Time, job: JobId) -> Result<CancelOutcome, CancelError> {
        let j = self.jobs.get(&job).ok_or(CancelError::NotFound(job))?;
        match j.state {
            JobState::Queued => {
                let (seq, nb, urgency) = (j.seq, j.not_before, self.urgency(j));
                if let Some(t) = nb {
                    self.backoff.remove(&(t, seq, job));
                } else if let Some(gi) = self.group_idx(&j.spec) {
                    self.groups[gi].ready.remove(&(urgency, seq));
                    self.reindex(gi);
                }
                self.finish(now, job, canceled_outcome("canceled while queued"));
                Ok(CancelOutcome::Canceled)
            }
            JobState::Running => {
                let grace = now.plus_ms(self.cfg.cancel_grace_ms);
                if let Some(j) = self.jobs.get_mut(&job) {
                    if !j.cancel_requested {
                        j.cancel_requested = true;
                        self.cancel_deadlines.insert((grace, job));
                    }
                }
                Ok(CancelOutcome::Requested)
            }
            state => Err(CancelError::AlreadyFinal { id: job, state }),
        }
    }

    fn tick(&mut self, now: Time) {
        while let Some(&(t, seq, id)) = self.backoff.first() {
            if t > now {
                break;
            }
            self.backoff.remove(&(t, seq, id));
            if let Some(j) = self.jobs.get_mut(&id) {
                j.not_before = None;
            }
            self.make_ready(id);
        }
        while let Some(&(t, lease)) = self.hard_deadlines.first() {
            if t > now {
                break;
            }
            self.hard_deadlines.remove(&(t, lease));
            self.expire_lease(now, lease, InfraErrorKind::Timeout);
        }
        while let Some(&(t, lease)) = self.lease_deadlines.first() {
            if t > now {
                break;
            }
            self.lease_deadlines.remove(&(t, lease));
            self.expire_lease(now, lease, InfraErrorKind::LeaseExpired);
        }
        // Last: a job whose lease ended above has already been ended canceled.
        while let Some(&(t, id)) = self.cancel_deadlines.first() {
            if t > now {
                break;
            }
            self.cancel_deadlines.remove(&(t, id));
            let Some(j) = self.jobs.get(&id) else {
                continue;
            };
            if let (JobState::Running, Some(lease)) = (j.state, j.lease) {
                self.detach(lease, id);
                let why = "canceled; its agent did not stop it in time";
                self.finish(now, id, canceled_outcome(why));
            }
        }
        self.forget_silent_devices(now);
    }

    fn lease_ttl_ms(&self) -> u64 {
        self.cfg.lease_ttl_ms
    }

    fn next_wakeup(&self) -> Option<Time> {
        [
            self.backoff.first().map(|x| x.0),
            self.lease_deadlines.first().map(|x| x.0),
            self.hard_deadlines.first().map(|x| x.0),
            self.cancel_deadlines.first().map(|x| x.0),
            self.next_sweep.filter(|_| !self.devices.is_empty()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn take_events(&mut self) -> Vec<crate::model::JobEvent> {
        std::mem::take(&mut self.events)
    }

    fn get(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id).map(|j| &**j)
    }

    fn list(&self, filter: &JobFilter) -> Vec<&Job> {
        let limit = filter.limit.unwrap_or(DEFAULT_LIST_LIMIT);
        let start = filter.after_seq.map_or(0, |s| s.saturating_add(1));
        self.by_seq
            .range(start..)
            .filter_map(|(_, id)| self.jobs.get(id).map(|j| &**j))
            .filter(|j| filter.matches(j))
            .take(limit)
            .collect()
    }

    fn groups(&self) -> Vec<GroupSummary> {
        let mut out: Vec<GroupSummary> = self
            .groups
            .iter()
            .filter(|g| !g.ready.is_empty() || g.running > 0)
            .map(|g| GroupSummary {
                build: g.key.build.clone(),
                target: g.key.target.clone(),
                ready: g.ready.len() as u64,
                running: g.running,
                devices: u64::from(g.serving),
            })
            .collect();
        out.sort_by(|a, b| (&a.target, &a.build).cmp(&(&b.target, &b.build)));
        out
    }

    fn queue_depth(&self) -> Vec<(Target, StateCounts)> {
        self.pools
            .iter()
            .map(|(t, p)| (t.clone(), p.counts))
            .collect()
    }

    fn devices(&self) -> Vec<DeviceStatus> {
        self.devices
            .values()
            .map(|d| DeviceStatus {
                info: d.info.clone(),
                lease: d.lease,
                lost: d.lost,
                installs: d.installs,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AppVersionId, Capabilities, Platform, Priority};

    fn spec(org: &str, app: &str, target: Target) -> JobSpec {
        let mut s = JobSpec::new(
            OrgId::new(org).expect("org"),
            AppVersionId::new(app).expect("app"),
            vec!["tests/a.spec.js".into()],
        );
        s.target = target;
        s
    }

    fn device(id: &str, target: Target) -> DeviceInfo {
        DeviceInfo {
            id: DeviceId::new(id).expect("id"),
            target,
            capabilities: Capabilities::default(),
            installed: None,
            install_estimate_ms: Some(30_000),
            idle: false,
            session: None,
            replaces: None,
        }
    }

    fn pass() -> RunReport {
        RunReport {
            passed: true,
            tests: vec![],
            duration_ms: 1000,
            error: None,
        }
    }

    fn sched() -> GroupedScheduler {
        GroupedScheduler::new(SchedulerConfig::default())
    }

    /// A scheduler where `sp`'s job, submitted at 0, is leased to emulator `d1` at 0.
    fn one_leased(sp: JobSpec) -> (GroupedScheduler, JobId, DeviceInfo, Lease) {
        let mut s = sched();
        let job = s.submit(Time(0), sp).expect("submit").job_id;
        let d = device("d1", Target::Emulator);
        s.register_device(Time(0), d.clone()).expect("reg");
        let l = s.lease(Time(0), &d.id, 1).expect("ok").expect("work");
        (s, job, d, l)
    }

    #[test]
    fn affinity_runs_a_group_on_one_install() {
        let mut s = sched();
        for _ in 0..5 {
            s.submit(Time(0), spec("acme", "v1", Target::Emulator))
                .expect("submit");
        }
        let d = device("d1", Target::Emulator);
        s.register_device(Time(0), d.clone()).expect("register");
        let mut installs = 0;
        let mut t = 1;
        while let Some(l) = s.lease(Time(t), &d.id, 1).expect("lease") {
            installs += u32::from(l.install);
            s.complete(Time(t + 1), l.id, l.jobs[0].id, pass())
                .expect("complete");
            t += 2;
        }
        assert_eq!(installs, 1);
        assert_eq!(s.list(&JobFilter::default()).len(), 5);
        assert!(s
            .list(&JobFilter::default())
            .iter()
            .all(|j| j.state == JobState::Passed));
    }

    #[test]
    fn a_small_org_is_not_held_back_by_a_big_one() {
        let mut s = sched();
        let devs: Vec<DeviceInfo> = (0..4)
            .map(|i| device(&format!("d{i}"), Target::Emulator))
            .collect();
        for d in &devs {
            s.register_device(Time(0), d.clone()).expect("register");
        }
        // A big org: 5000 jobs over 50 builds, each build served by one device alone.
        let specs: Vec<JobSpec> = (0..5000)
            .map(|i| spec("big", &format!("v{}", i % 50), Target::Emulator))
            .collect();
        s.submit_many(Time(0), specs).expect("batch");
        let mut leases: Vec<Lease> = devs
            .iter()
            .map(|d| s.lease(Time(1), &d.id, 1).expect("ok").expect("work"))
            .collect();
        let small = s
            .submit(Time(60_000), spec("small", "s1", Target::Emulator))
            .expect("submit")
            .job_id;
        // Every device keeps its build while the small job has waited only briefly…
        let l = leases.remove(0);
        s.complete(Time(61_000), l.id, l.jobs[0].id, pass())
            .expect("complete");
        let next = s
            .lease(Time(61_000), &l.device, 1)
            .expect("ok")
            .expect("work");
        assert_ne!(next.jobs[0].id, small);
        assert!(!next.install);
        // …but once it has waited five minutes, the next device to free up takes it, even
        // though every big group still has hundreds of jobs.
        let t = 60_000 + 5 * 60_000;
        s.complete(Time(t), next.id, next.jobs[0].id, pass())
            .expect("complete");
        let next = s.lease(Time(t), &l.device, 1).expect("ok").expect("work");
        assert_eq!(next.jobs[0].id, small);
        assert!(next.install);
    }

    #[test]
    fn targets_and_capabilities_are_respected() {
        let mut s = sched();
        let mut ios = spec("acme", "v1", Target::Browserstack);
        ios.requires.platform = Some(Platform::Ios);
        let ios_id = s.submit(Time(0), ios).expect("submit").job_id;
        s.submit(Time(0), spec("acme", "v1", Target::Emulator))
            .expect("submit");
        let mut android = device("bs-android", Target::Browserstack);
        android.capabilities.platform = Some(Platform::Android);
        s.register_device(Time(0), android.clone()).expect("reg");
        assert_eq!(s.lease(Time(1), &android.id, 4).expect("ok"), None);
        let mut iphone = device("bs-ios", Target::Browserstack);
        iphone.capabilities.platform = Some(Platform::Ios);
        s.register_device(Time(0), iphone.clone()).expect("reg");
        let l = s.lease(Time(1), &iphone.id, 4).expect("ok").expect("work");
        assert_eq!(l.jobs.len(), 1);
        assert_eq!(l.jobs[0].id, ios_id);
    }

    #[test]
    fn expired_lease_requeues_and_refuses_the_stale_report() {
        let (mut s, job, d, l) = one_leased(spec("acme", "v1", Target::Emulator));
        let ttl = s.config().lease_ttl_ms;
        s.tick(Time(ttl + 1));
        let j = s.get(job).expect("job");
        assert_eq!((j.state, j.attempt), (JobState::Queued, 2));
        let before = j.clone();
        assert_eq!(
            s.complete(Time(ttl + 2), l.id, job, pass()),
            Err(ReportError::StaleLease(l.id))
        );
        assert_eq!(s.get(job), Some(&before));
        // The device is lost until it registers again.
        assert_eq!(
            s.lease(Time(ttl + 2), &d.id, 1),
            Err(DeviceError::Lost(d.id.clone()))
        );
        s.register_device(Time(ttl + 3), d.clone()).expect("reg");
        s.tick(Time(ttl + 100_000));
        let l2 = s
            .lease(Time(ttl + 100_000), &d.id, 1)
            .expect("ok")
            .expect("work");
        assert_eq!(l2.jobs[0].attempt, 2);
        assert!(l2.id > l.id);
    }

    #[test]
    fn a_device_registering_idle_gives_its_lease_back_at_once() {
        let (mut s, job, d, l) = one_leased(spec("acme", "v1", Target::Emulator));
        // Registering again while running (idle unset) keeps the lease.
        s.register_device(Time(10), d.clone()).expect("reg");
        assert!(matches!(
            s.lease(Time(11), &d.id, 1),
            Err(DeviceError::Busy { .. })
        ));
        assert_eq!(s.get(job).map(|j| j.state), Some(JobState::Running));
        // Its agent restarted: the device comes back running nothing.
        let idle = DeviceInfo {
            idle: true,
            ..d.clone()
        };
        s.register_device(Time(20), idle).expect("reg");
        let j = s.get(job).expect("job").clone();
        assert_eq!((j.state, j.attempt), (JobState::Queued, 2));
        assert!(
            j.last_error
                .as_deref()
                .unwrap_or("")
                .contains("came back idle"),
            "{:?}",
            j.last_error
        );
        // The old run's report is stale and changes nothing.
        assert_eq!(
            s.complete(Time(21), l.id, job, pass()),
            Err(ReportError::StaleLease(l.id))
        );
        assert_eq!(s.get(job), Some(&j));
        // No lease TTL to wait out: the retry goes as soon as its backoff ends.
        let ready = j.not_before.unwrap_or(Time(21));
        assert!(ready.0 < s.config().lease_ttl_ms, "{ready:?}");
        s.tick(ready);
        let l2 = s.lease(ready, &d.id, 1).expect("ok").expect("work");
        assert_eq!((l2.jobs[0].id, l2.jobs[0].attempt), (job, 2));
    }

    #[test]
    fn a_restored_lease_goes_back_to_the_queue_when_its_device_comes_back_idle() {
        let (s, job, d, l) = one_leased(spec("acme", "v1", Target::Emulator));
        let saved: Vec<Job> = s.list(&JobFilter::default()).into_iter().cloned().collect();
        let mut r = GroupedScheduler::restore(s.config().clone(), saved).expect("restore");
        let idle = DeviceInfo {
            idle: true,
            ..d.clone()
        };
        r.register_device(Time(5), idle).expect("reg");
        assert_eq!(
            r.get(job).map(|j| (j.state, j.attempt)),
            Some((JobState::Queued, 2))
        );
        assert_eq!(
            r.heartbeat(Time(6), l.id).map(|_| ()),
            Err(ReportError::StaleLease(l.id))
        );
    }

    #[test]
    fn heartbeats_keep_a_lease_and_carry_cancel() {
        let (mut s, job, _, l) = one_leased(spec("acme", "v1", Target::Emulator));
        let ttl = s.config().lease_ttl_ms;
        let ack = s.heartbeat(Time(ttl - 1), l.id).expect("hb");
        assert!(ack.cancel.is_empty());
        s.tick(Time(ttl + 1));
        assert_eq!(s.get(job).map(|j| j.state), Some(JobState::Running));
        assert_eq!(s.cancel(Time(ttl + 2), job), Ok(CancelOutcome::Requested));
        let ack = s.heartbeat(Time(ttl + 3), l.id).expect("hb");
        assert_eq!(ack.cancel, vec![job]);
        let failure = InfraFailure {
            kind: InfraErrorKind::Other,
            message: "canceled".into(),
        };
        assert_eq!(
            s.fail(Time(ttl + 4), l.id, job, failure),
            Ok(JobState::Canceled)
        );
        assert!(matches!(
            s.cancel(Time(ttl + 5), job),
            Err(CancelError::AlreadyFinal { .. })
        ));
    }

    #[test]
    fn a_cancel_the_agent_ignores_ends_after_the_grace() {
        let (mut s, job, d, l) = one_leased(spec("acme", "v1", Target::Emulator));
        let grace = s.config().cancel_grace_ms;
        assert_eq!(s.cancel(Time(1_000), job), Ok(CancelOutcome::Requested));
        // Asking again does not move the deadline.
        assert_eq!(s.cancel(Time(2_000), job), Ok(CancelOutcome::Requested));
        assert_eq!(s.next_wakeup(), Some(Time(s.config().lease_ttl_ms)));
        // The agent heartbeats (so the lease lives) but never stops the job.
        let mut t = 1_000;
        while t < 1_000 + grace {
            s.tick(Time(t));
            assert_eq!(s.get(job).map(|j| j.state), Some(JobState::Running));
            s.heartbeat(Time(t), l.id).expect("heartbeat");
            t += 5_000;
        }
        s.tick(Time(1_000 + grace));
        let j = s.get(job).expect("job");
        assert_eq!(j.state, JobState::Canceled);
        assert!(j
            .outcome
            .as_ref()
            .and_then(|o| o.error.as_deref())
            .is_some_and(|e| e.contains("did not stop")));
        // Its report comes too late; the device is free and not lost.
        assert!(s.complete(Time(1_001 + grace), l.id, job, pass()).is_err());
        assert!(s.heartbeat(Time(1_001 + grace), l.id).is_err());
        s.submit(Time(1_002 + grace), spec("acme", "v1", Target::Emulator))
            .expect("submit");
        assert!(s
            .lease(Time(1_003 + grace), &d.id, 1)
            .expect("lease")
            .is_some());
    }

    #[test]
    fn a_cancel_outlives_a_restart() {
        let (mut s, job, _, l) = one_leased(spec("acme", "v1", Target::Emulator));
        assert_eq!(s.cancel(Time(1_000), job), Ok(CancelOutcome::Requested));
        let jobs: Vec<Job> = s.list(&JobFilter::default()).into_iter().cloned().collect();
        let mut r = GroupedScheduler::restore(s.config().clone(), jobs).expect("restore");
        // The grace runs from the restored lease's deadline.
        let from = r.get(job).and_then(|j| j.lease_deadline).expect("deadline");
        let end = from.plus_ms(r.config().cancel_grace_ms);
        let mut t = 2_000;
        while t < end.0 {
            r.heartbeat(Time(t), l.id).expect("heartbeat");
            r.tick(Time(t));
            assert_eq!(r.get(job).map(|j| j.state), Some(JobState::Running));
            t += 5_000;
        }
        r.tick(end);
        assert_eq!(r.get(job).map(|j| j.state), Some(JobState::Canceled));
    }

    #[test]
    fn infra_failures_retry_with_backoff_then_error() {
        let mut s = sched();
        let mut sp = spec("acme", "v1", Target::Emulator);
        sp.max_attempts = 2;
        let job = s.submit(Time(0), sp).expect("submit").job_id;
        let d = device("d1", Target::Emulator);
        s.register_device(Time(0), d.clone()).expect("reg");
        let failure = InfraFailure {
            kind: InfraErrorKind::InstallFailed,
            message: "adb: device offline".into(),
        };
        let l = s.lease(Time(0), &d.id, 1).expect("ok").expect("work");
        assert_eq!(
            s.fail(Time(10), l.id, job, failure.clone()),
            Ok(JobState::Queued)
        );
        let nb = s.get(job).and_then(|j| j.not_before).expect("backoff");
        assert!(nb > Time(10));
        assert_eq!(s.lease(Time(11), &d.id, 1).expect("ok"), None);
        s.tick(nb);
        let l = s.lease(nb, &d.id, 1).expect("ok").expect("work");
        assert_eq!(l.jobs[0].attempt, 2);
        assert_eq!(s.fail(nb, l.id, job, failure), Ok(JobState::Error));
        let out = s.get(job).and_then(|j| j.outcome.clone()).expect("outcome");
        // Users read the kind in words, not the enum's name.
        assert_eq!(
            out.error.as_deref(),
            Some("install failed: adb: device offline")
        );
    }

    #[test]
    fn a_pass_after_an_infrastructure_error_is_not_flaky() {
        let (mut s, job, d, l) = one_leased(spec("acme", "v1", Target::Emulator));
        let failure = InfraFailure {
            kind: InfraErrorKind::InstallFailed,
            message: "adb: device offline".into(),
        };
        assert_eq!(s.fail(Time(10), l.id, job, failure), Ok(JobState::Queued));
        s.tick(Time(10_000_000));
        let l = s
            .lease(Time(10_000_000), &d.id, 1)
            .expect("ok")
            .expect("work");
        assert_eq!(
            s.complete(Time(10_000_001), l.id, job, pass()),
            Ok(JobState::Passed)
        );
        let out = s.get(job).and_then(|j| j.outcome.clone()).expect("outcome");
        assert!(!out.flaky, "the install failed, not the test");
    }

    #[test]
    fn failed_tests_retry_only_on_request_and_mark_flaky() {
        let mut sp = spec("acme", "v1", Target::Emulator);
        sp.retry_failed_tests = true;
        let (mut s, job, d, l) = one_leased(sp);
        let failed = RunReport {
            passed: false,
            tests: vec![],
            duration_ms: 5,
            error: Some("expect(received).toBe(expected)".into()),
        };
        assert_eq!(s.complete(Time(5), l.id, job, failed), Ok(JobState::Queued));
        s.tick(Time(10_000_000));
        let l = s
            .lease(Time(10_000_000), &d.id, 1)
            .expect("ok")
            .expect("work");
        assert!(!l.install);
        assert_eq!(
            s.complete(Time(10_000_001), l.id, job, pass()),
            Ok(JobState::Passed)
        );
        assert_eq!(
            s.get(job).and_then(|j| j.outcome.as_ref()).map(|o| o.flaky),
            Some(true)
        );
    }

    #[test]
    fn idempotency_key_returns_the_existing_job() {
        let mut s = sched();
        let mut sp = spec("acme", "v1", Target::Emulator);
        sp.idempotency_key = Some("ci-123".into());
        let a = s.submit(Time(0), sp.clone()).expect("submit");
        let b = s.submit(Time(1), sp.clone()).expect("submit");
        assert_eq!((a.job_id, a.created, b.created), (b.job_id, true, false));
        sp.priority = Priority(5);
        assert!(matches!(
            s.submit(Time(2), sp),
            Err(SubmitError::IdempotencyConflict { .. })
        ));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_bad_spec_in_a_batch_queues_nothing() {
        let mut s = sched();
        let mut bad = spec("acme", "v1", Target::Emulator);
        bad.priority = Priority(5000);
        let err = s
            .submit_many(Time(0), vec![spec("acme", "v1", Target::Emulator), bad])
            .expect_err("invalid");
        assert!(matches!(err, SubmitError::Invalid { index: 1, .. }));
        assert!(s.is_empty());
    }

    #[test]
    fn batches_hold_one_build_and_priority_orders_within_a_group() {
        let mut s = sched();
        let low = s
            .submit(Time(0), spec("acme", "v1", Target::Emulator))
            .expect("submit")
            .job_id;
        let mut hi = spec("acme", "v1", Target::Emulator);
        hi.priority = Priority(3);
        let hi = s.submit(Time(1), hi).expect("submit").job_id;
        s.submit(Time(2), spec("acme", "v2", Target::Emulator))
            .expect("submit");
        let d = device("d1", Target::Emulator);
        s.register_device(Time(0), d.clone()).expect("reg");
        let l = s.lease(Time(3), &d.id, 8).expect("ok").expect("work");
        let ids: Vec<JobId> = l.jobs.iter().map(|j| j.id).collect();
        assert_eq!(ids, vec![hi, low]);
    }

    #[test]
    fn a_new_build_goes_to_an_empty_device_not_over_a_warm_build() {
        let mut s = sched();
        let (a, b) = (device("a", Target::Emulator), device("b", Target::Emulator));
        s.register_device(Time(0), a.clone()).expect("reg a");
        s.submit(Time(0), spec("acme", "v1", Target::Emulator))
            .expect("submit");
        let l = s.lease(Time(0), &a.id, 1).expect("ok").expect("work");
        s.complete(Time(10_000), l.id, l.jobs[0].id, pass())
            .expect("complete");
        s.register_device(Time(10_000), b.clone()).expect("reg b");
        // A new build arrives; `a` (v1, warm) asks first and leaves it to the empty `b`.
        let v2 = s
            .submit(Time(20_000), spec("acme", "v2", Target::Emulator))
            .expect("submit")
            .job_id;
        assert!(s.lease(Time(20_000), &a.id, 1).expect("ok").is_none());
        let l = s.lease(Time(20_000), &b.id, 1).expect("ok").expect("work");
        assert_eq!((l.jobs[0].id, l.install), (v2, true));
        // v1's next job finds its device without an install.
        s.submit(Time(30_000), spec("acme", "v1", Target::Emulator))
            .expect("submit");
        let l = s.lease(Time(30_000), &a.id, 1).expect("ok").expect("work");
        assert!(!l.install);
        // With no spare device, a warm build's device does take a new build.
        let v3 = s
            .submit(Time(40_000), spec("acme", "v3", Target::Emulator))
            .expect("submit")
            .job_id;
        s.complete(Time(40_000), l.id, l.jobs[0].id, pass())
            .expect("complete");
        let l = s.lease(Time(40_000), &a.id, 1).expect("ok").expect("work");
        assert_eq!((l.jobs[0].id, l.install), (v3, true));
    }

    #[test]
    fn reserved_lease_ids_are_never_issued_again() {
        let mut s = sched();
        s.reserve_lease_ids_through(LeaseId(41));
        // Reserving less never lowers the next id.
        s.reserve_lease_ids_through(LeaseId(7));
        assert_eq!(s.next_lease_id(), LeaseId(42));
        s.submit(Time(0), spec("acme", "v1", Target::Emulator))
            .expect("submit");
        let d = device("d1", Target::Emulator);
        s.register_device(Time(0), d.clone()).expect("reg");
        let l = s.lease(Time(0), &d.id, 1).expect("ok").expect("work");
        assert_eq!(l.id, LeaseId(42));
        assert_eq!(s.next_lease_id(), LeaseId(43));
        // A heartbeat on a reserved id that no job holds is refused.
        assert!(s.heartbeat(Time(1), LeaseId(41)).is_err());
    }

    #[test]
    fn restore_keeps_queue_order_and_running_leases() {
        let mut s = sched();
        let ids: Vec<JobId> = (0..4)
            .map(|i| {
                s.submit(Time(i), spec("acme", "v1", Target::Emulator))
                    .expect("submit")
                    .job_id
            })
            .collect();
        let d = device("d1", Target::Emulator);
        s.register_device(Time(0), d.clone()).expect("reg");
        let l = s.lease(Time(10), &d.id, 1).expect("ok").expect("work");
        assert_eq!(l.jobs[0].id, ids[0]);
        let saved: Vec<Job> = s.list(&JobFilter::default()).into_iter().cloned().collect();
        let mut r = GroupedScheduler::restore(SchedulerConfig::default(), saved).expect("restore");
        // The running job's lease survives: heartbeat and complete work after the restart.
        r.heartbeat(Time(20), l.id).expect("heartbeat");
        r.register_device(Time(20), d.clone()).expect("reg");
        assert!(matches!(
            r.lease(Time(21), &d.id, 1),
            Err(DeviceError::Busy { .. })
        ));
        assert_eq!(
            r.complete(Time(30), l.id, ids[0], pass()),
            Ok(JobState::Passed)
        );
        let next = r.lease(Time(31), &d.id, 1).expect("ok").expect("work");
        assert_eq!(next.jobs[0].id, ids[1]);
        assert!(next.id > l.id);
        let fresh = r
            .submit(Time(40), spec("acme", "v1", Target::Emulator))
            .expect("submit")
            .job_id;
        assert!(!ids.contains(&fresh));
    }

    #[test]
    fn same_calls_same_decisions() {
        let run = || {
            let mut s = sched();
            let mut out = Vec::new();
            for i in 0..20u64 {
                let sp = spec("acme", &format!("v{}", i % 3), Target::Emulator);
                out.push(format!("{:?}", s.submit(Time(i), sp)));
            }
            for i in 0..3 {
                s.register_device(Time(0), device(&format!("d{i}"), Target::Emulator))
                    .expect("reg");
            }
            for i in 0..3 {
                let id = DeviceId::new(format!("d{i}")).expect("id");
                out.push(format!("{:?}", s.lease(Time(100), &id, 2)));
            }
            out.push(format!("{:?}", s.take_events()));
            out
        };
        assert_eq!(run(), run());
    }

    fn with_session(id: &str, session: &str) -> DeviceInfo {
        DeviceInfo {
            session: Some(session.into()),
            idle: true,
            ..device(id, Target::Emulator)
        }
    }

    /// `s` as a server restart brings it back: from its jobs alone.
    fn restarted(s: &GroupedScheduler) -> GroupedScheduler {
        let jobs: Vec<Job> = s.list(&JobFilter::default()).into_iter().cloned().collect();
        GroupedScheduler::restore(s.config().clone(), jobs).expect("restore")
    }

    /// A job leased at 0 to emulator `d1`, registered under session `a`.
    fn leased_to_session_a() -> (GroupedScheduler, JobId, Lease) {
        let mut s = sched();
        let job = s
            .submit(Time(0), spec("acme", "v1", Target::Emulator))
            .expect("submit")
            .job_id;
        s.register_device(Time(0), with_session("d1", "a"))
            .expect("register");
        let l = s.lease(Time(0), &d("d1"), 1).expect("ok").expect("work");
        (s, job, l)
    }

    #[test]
    fn a_device_in_touch_is_refused_to_another_session() {
        let (mut s, job, l) = leased_to_session_a();
        let ttl = s.config().lease_ttl_ms;
        // Heartbeats keep the device in touch well past one TTL.
        s.heartbeat(Time(ttl - 1), l.id).expect("beat");
        let err = s
            .register_device(Time(ttl + 1), with_session("d1", "b"))
            .expect_err("held");
        assert_eq!(
            err,
            DeviceError::Held {
                device: d("d1"),
                quiet_ms: 2,
                ttl_ms: ttl
            }
        );
        // Nothing changed: the lease and its job are still the first agent's.
        assert_eq!(s.get(job).expect("job").state, JobState::Running);
        s.complete(Time(ttl + 2), l.id, job, pass())
            .expect("report");
        // The holder's own session registers again freely.
        s.register_device(Time(ttl + 3), with_session("d1", "a"))
            .expect("same session");
        // A session naming the holder as its predecessor takes over at once.
        s.register_device(
            Time(ttl + 4),
            DeviceInfo {
                replaces: Some("a".into()),
                ..with_session("d1", "b")
            },
        )
        .expect("successor");
        assert_eq!(
            s.touch_device(Time(ttl + 5), &d("d1"), Some("a")),
            Err(DeviceError::TakenOver(d("d1")))
        );
        s.touch_device(Time(ttl + 5), &d("d1"), Some("b"))
            .expect("holder");
        // Agents that name no session are not checked.
        s.touch_device(Time(ttl + 5), &d("d1"), None).expect("none");
        s.register_device(Time(ttl + 6), device("d1", Target::Emulator))
            .expect("no session");
    }

    #[test]
    fn a_silent_or_lost_device_goes_to_another_session() {
        let mut s = sched();
        let ttl = s.config().lease_ttl_ms;
        s.register_device(Time(0), with_session("d1", "a"))
            .expect("first");
        // Polling keeps it in touch...
        s.lease(Time(ttl), &d("d1"), 1).expect("poll");
        assert!(matches!(
            s.register_device(Time(2 * ttl - 1), with_session("d1", "b")),
            Err(DeviceError::Held { .. })
        ));
        // ...until it has been silent for a TTL.
        s.register_device(Time(2 * ttl), with_session("d1", "b"))
            .expect("silent");

        // A device whose lease expired (marked lost) was silent for a TTL: free.
        let job = s
            .submit(Time(2 * ttl), spec("acme", "v1", Target::Emulator))
            .expect("submit")
            .job_id;
        s.lease(Time(2 * ttl), &d("d1"), 1)
            .expect("ok")
            .expect("work");
        s.tick(Time(3 * ttl + 1));
        assert_eq!(s.get(job).expect("job").attempt, 2);
        s.register_device(Time(3 * ttl + 1), with_session("d1", "c"))
            .expect("lost");

        // Unregistering frees the name too.
        s.unregister_device(Time(3 * ttl + 2), &d("d1"))
            .expect("unregister");
        s.register_device(Time(3 * ttl + 3), with_session("d1", "a"))
            .expect("free");
    }

    #[test]
    fn a_restored_lease_keeps_its_device_from_other_sessions_while_it_is_heartbeated() {
        let (s, job, l) = leased_to_session_a();
        let ttl = s.config().lease_ttl_ms;
        // A restart: the lease comes back, the device does not.
        let mut s = restarted(&s);
        assert!(s.devices().is_empty());
        // Its agent keeps heartbeating the restored lease: another session is refused.
        s.heartbeat(Time(ttl / 2), l.id).expect("beat");
        assert!(matches!(
            s.register_device(Time(ttl), with_session("d1", "b")),
            Err(DeviceError::Held { .. })
        ));
        assert_eq!(s.get(job).expect("job").state, JobState::Running);
        s.complete(Time(ttl + 1), l.id, job, pass())
            .expect("report");
        // Once reported, the lease is gone and the device registers freely.
        s.register_device(Time(ttl + 2), with_session("d1", "a"))
            .expect("its own agent");

        // A restored lease nobody heartbeats is free a TTL after the restart.
        let (s, job, _) = leased_to_session_a();
        let mut s = restarted(&s);
        assert!(matches!(
            s.register_device(Time(ttl - 1), with_session("d1", "b")),
            Err(DeviceError::Held { .. })
        ));
        s.register_device(Time(ttl), with_session("d1", "b"))
            .expect("silent");
        let j = s.get(job).expect("job");
        assert_eq!((j.state, j.attempt), (JobState::Queued, 2));
    }

    #[test]
    fn silent_devices_are_forgotten_when_asked() {
        let mut s = GroupedScheduler::new(SchedulerConfig {
            forget_silent_devices_ms: Some(1_000),
            ..SchedulerConfig::default()
        });
        s.register_device(Time(0), device("quiet", Target::Emulator))
            .expect("register");
        s.register_device(Time(0), device("polling", Target::Emulator))
            .expect("register");
        s.register_device(Time(0), device("busy", Target::Emulator))
            .expect("register");
        s.submit(Time(0), spec("acme", "v1", Target::Emulator))
            .expect("submit");
        s.lease(Time(0), &d("busy"), 1).expect("ok").expect("work");
        // Polling keeps a device; a lease keeps it too (its expiry deals with silence).
        s.touch_device(Time(600), &d("polling"), None)
            .expect("touch");
        assert_eq!(s.next_wakeup(), Some(Time(1_000)), "the first sweep is due");
        s.tick(Time(1_000));
        let left = |s: &GroupedScheduler| -> Vec<String> {
            s.devices().iter().map(|d| d.info.id.to_string()).collect()
        };
        assert_eq!(left(&s), vec!["busy", "polling"]);
        s.tick(Time(2_000));
        assert!(s.serves_target(&Target::Emulator));
        assert_eq!(left(&s), vec!["busy"]);
        // A forgotten device's agent gets "unknown device" and registers it again.
        assert_eq!(
            s.lease(Time(2_001), &d("quiet"), 1),
            Err(DeviceError::UnknownDevice(d("quiet")))
        );
        s.register_device(Time(2_002), device("quiet", Target::Emulator))
            .expect("again");

        // Without the setting (the simulator's), nothing is forgotten.
        let mut s = sched();
        s.register_device(Time(0), device("quiet", Target::Emulator))
            .expect("register");
        s.tick(Time(10_000_000));
        assert_eq!(s.devices().len(), 1);
        assert_eq!(s.next_wakeup(), None);
    }

    #[test]
    fn session_names_are_checked() {
        let mut s = sched();
        let err = s
            .register_device(Time(0), with_session("d1", "has space"))
            .expect_err("invalid");
        assert!(
            matches!(err, DeviceError::Invalid(ref i) if i.field == "session"),
            "{err:?}"
        );
        let mut long = device("d1", Target::Emulator);
        long.capabilities.model = Some("x".repeat(129));
        let err = s.register_device(Time(0), long).expect_err("too long");
        assert!(
            matches!(err, DeviceError::Invalid(ref i) if i.field == "capabilities.model"),
            "{err:?}"
        );
        assert!(s.devices().is_empty());
    }

    fn d(id: &str) -> DeviceId {
        DeviceId::new(id).expect("id")
    }
}
