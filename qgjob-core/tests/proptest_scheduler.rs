//! State-machine property test of [`GroupedScheduler`] under all three policies: random
//! sequences of submits, device registrations, leases, heartbeats, reports (current and
//! stale), cancels and clock advances are applied both to the scheduler and to a small
//! reference model written here, and the queue invariants are checked after every step.
//!
//! The model predicts every state transition (which job ends how, attempts, leases, lost
//! devices, heartbeat answers). It does not re-implement the dispatch policy: for a lease it
//! checks the policy's choice against the rules every policy must obey (target and
//! capabilities, one group per lease, age order, never idle while an unserved group waits),
//! and it accepts the backoff the scheduler drew after checking it lies within the jitter.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use qgjob_core::*;

const TTL: u64 = 3_000;
/// How long a running job may stay cancel-requested before the scheduler ends it (shorter
/// than a lease here, so that the grace, not a lease expiry, ends many such jobs).
const CANCEL_GRACE: u64 = 1_500;
const AGING: u64 = 60_000;

/// One step of the scenario. Indexes pick from what exists at that point (modulo).
#[derive(Debug, Clone)]
enum Op {
    Submit(SpecArgs),
    /// A batch, all or nothing; `invalid` makes one spec of it invalid.
    SubmitMany {
        specs: Vec<SpecArgs>,
        invalid: Option<usize>,
    },
    /// The server restarts: a new scheduler is rebuilt from the jobs alone; devices must
    /// register again (a device that held a lease gets it back).
    Restore,
    /// The server drops final jobs from memory once stored (`forget_finished(now)`).
    Forget,
    /// `idle`: the agent says it runs nothing there, so a lease the device still holds is
    /// given back at once.
    Register {
        dev: usize,
        idle: bool,
    },
    Unregister {
        dev: usize,
    },
    Lease {
        dev: usize,
        batch: usize,
    },
    /// `live`: a lease that is live now, if any; else any lease ever issued.
    Heartbeat {
        lease: usize,
        live: bool,
    },
    /// `lease: None` reports a running job under its current lease; `Some(k)` reports any
    /// job under some lease ever issued (usually stale) or an id never issued.
    Complete {
        job: usize,
        lease: Option<usize>,
        passed: bool,
    },
    Fail {
        job: usize,
        lease: Option<usize>,
    },
    Cancel {
        job: usize,
        unknown: bool,
    },
    Advance {
        ms: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => spec_strategy().prop_map(Op::Submit),
        1 => (proptest::collection::vec(spec_strategy(), 1..4), proptest::option::weighted(0.2, 0usize..4))
            .prop_map(|(specs, invalid)| Op::SubmitMany { specs, invalid }),
        1 => Just(Op::Restore),
        1 => Just(Op::Forget),
        1 => (0usize..DEVICES.len(), any::<bool>()).prop_map(|(dev, idle)| Op::Register { dev, idle }),
        1 => (0usize..DEVICES.len()).prop_map(|dev| Op::Unregister { dev }),
        5 => (0usize..DEVICES.len(), 1usize..=3).prop_map(|(dev, batch)| Op::Lease { dev, batch }),
        2 => (0usize..64, proptest::bool::weighted(0.8)).prop_map(|(lease, live)| Op::Heartbeat { lease, live }),
        4 => (0usize..64, proptest::option::weighted(0.3, 0usize..64), any::<bool>())
            .prop_map(|(job, lease, passed)| Op::Complete { job, lease, passed }),
        2 => (0usize..64, proptest::option::weighted(0.3, 0usize..64))
            .prop_map(|(job, lease)| Op::Fail { job, lease }),
        1 => (0usize..64, proptest::bool::weighted(0.1)).prop_map(|(job, unknown)| Op::Cancel { job, unknown }),
        3 => (1u64..4_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// The inputs of one generated job spec.
#[derive(Debug, Clone)]
struct SpecArgs {
    org: u8,
    build: u8,
    target: u8,
    prio: i32,
    max_attempts: u32,
    key: Option<u8>,
    req: u8,
    retry_failed: bool,
    timeout_s: u64,
}

fn spec_strategy() -> impl Strategy<Value = SpecArgs> {
    (
        0u8..2,
        0u8..3,
        0u8..4,
        -2i32..=2,
        1u32..=3,
        proptest::option::of(0u8..3),
        0u8..6,
        any::<bool>(),
        2u64..8,
    )
        .prop_map(
            |(org, build, target, prio, max_attempts, key, req, retry_failed, timeout_s)| {
                SpecArgs {
                    org,
                    build,
                    target,
                    prio,
                    max_attempts,
                    key,
                    req,
                    retry_failed,
                    timeout_s,
                }
            },
        )
}

impl SpecArgs {
    fn spec(&self) -> JobSpec {
        let mut spec = JobSpec::new(
            OrgId::new(format!("org{}", self.org)).unwrap(),
            AppVersionId::new(format!("v{}", self.build)).unwrap(),
            vec!["tests/x.spec.js".into()],
        );
        spec.target = target(self.target);
        spec.priority = Priority(self.prio);
        spec.max_attempts = self.max_attempts;
        spec.idempotency_key = self.key.map(|k| format!("k{k}"));
        spec.requires = requirements(self.req);
        spec.retry_failed_tests = self.retry_failed;
        spec.timeout_ms = self.timeout_s * 1000;
        spec
    }
}

/// The device lab: id, target, platform, model.
const DEVICES: [(&str, u8, Option<Platform>, Option<&str>); 5] = [
    ("emu-a", 0, Some(Platform::Android), Some("Pixel")),
    ("emu-b", 0, Some(Platform::Ios), None),
    ("emu-c", 0, None, None),
    ("dev-d", 1, Some(Platform::Android), Some("Pixel")),
    ("bs-e", 2, None, None),
];

fn target(t: u8) -> Target {
    match t {
        1 => Target::Device,
        2 => Target::Browserstack,
        _ => Target::Emulator,
    }
}

fn caps(dev: usize) -> Capabilities {
    let (_, _, platform, model) = DEVICES[dev];
    Capabilities {
        platform,
        model: model.map(str::to_string),
        os_version: None,
    }
}

fn requirements(r: u8) -> Requirements {
    match r {
        1 => Requirements {
            platform: Some(Platform::Android),
            ..Default::default()
        },
        2 => Requirements {
            platform: Some(Platform::Ios),
            ..Default::default()
        },
        3 => Requirements {
            model: Some("Pixel".into()),
            ..Default::default()
        },
        _ => Requirements::default(),
    }
}

/// The model's own reading of "this device satisfies these requirements" (independent of
/// `Requirements::matches`): a device without a platform serves either platform; a
/// required model must be declared and equal.
fn fits(req: &Requirements, dev: usize) -> bool {
    let (_, _, platform, model) = DEVICES[dev];
    let platform_ok = match (req.platform, platform) {
        (Some(w), Some(h)) => w == h,
        _ => true,
    };
    let model_ok = match (&req.model, model) {
        (None, _) => true,
        (Some(w), Some(h)) => w == h,
        (Some(_), None) => false,
    };
    platform_ok && model_ok
}

#[derive(Debug, Clone)]
struct MJob {
    id: JobId,
    spec: JobSpec,
    state: JobState,
    attempt: u32,
    lease: Option<LeaseId>,
    cancel_requested: bool,
    /// While running and cancel-requested: when the scheduler ends it itself.
    cancel_deadline: Option<Time>,
    had_failure: bool,
    /// Queued and waiting out a backoff until then.
    not_before: Option<Time>,
    /// Requeued in this step with a backoff the scheduler draws: (now, attempt that failed).
    backoff_pending: Option<(Time, u32)>,
    /// The scheduler's job as it was when it became final: it must never change again.
    final_snapshot: Option<Job>,
    final_events: u32,
}

impl MJob {
    fn group(&self) -> (Target, BuildRef, Requirements) {
        (
            self.spec.target.clone(),
            self.spec.build(),
            self.spec.requires.clone(),
        )
    }
    fn ready(&self) -> bool {
        self.state == JobState::Queued && self.not_before.is_none()
    }
}

#[derive(Debug, Clone)]
struct MLease {
    device: usize,
    pending: Vec<JobId>,
    deadline: Time,
    hard: Time,
}

#[derive(Debug, Clone, Default)]
struct MDev {
    registered: bool,
    lost: bool,
    lease: Option<LeaseId>,
    installed: Option<BuildRef>,
}

struct Model {
    cfg: SchedulerConfig,
    now: Time,
    jobs: Vec<MJob>,
    by_id: HashMap<JobId, usize>,
    idem: HashMap<(OrgId, String), usize>,
    leases: BTreeMap<LeaseId, MLease>,
    issued: Vec<LeaseId>,
    devs: Vec<MDev>,
    /// Jobs whose state changed in the current step.
    touched: BTreeSet<JobId>,
    /// New lease ids must exceed this: the last one issued, or after a restore the highest
    /// one any restored job ever held (see `restore_never_reuses_a_lease_id`).
    lease_floor: Option<LeaseId>,
}

impl Model {
    fn new(cfg: SchedulerConfig) -> Self {
        Model {
            cfg,
            now: Time(0),
            jobs: Vec::new(),
            by_id: HashMap::new(),
            idem: HashMap::new(),
            leases: BTreeMap::new(),
            issued: Vec::new(),
            devs: vec![MDev::default(); DEVICES.len()],
            touched: BTreeSet::new(),
            lease_floor: None,
        }
    }

    fn add_job(&mut self, sub: Submitted, spec: JobSpec) {
        assert!(sub.created);
        assert_eq!(sub.state, JobState::Queued);
        assert!(!self.by_id.contains_key(&sub.job_id), "fresh id");
        let idx = self.jobs.len();
        if let Some(k) = &spec.idempotency_key {
            self.idem.insert((spec.org_id.clone(), k.clone()), idx);
        }
        self.by_id.insert(sub.job_id, idx);
        self.jobs.push(MJob {
            id: sub.job_id,
            spec,
            state: JobState::Queued,
            attempt: 1,
            lease: None,
            cancel_requested: false,
            cancel_deadline: None,
            had_failure: false,
            not_before: None,
            backoff_pending: None,
            final_snapshot: None,
            final_events: 0,
        });
        self.touched.insert(sub.job_id);
    }

    fn job(&mut self, id: JobId) -> &mut MJob {
        let i = self.by_id[&id];
        &mut self.jobs[i]
    }

    fn dev_index(&self, id: &DeviceId) -> usize {
        DEVICES
            .iter()
            .position(|d| d.0 == id.as_str())
            .expect("a device of the lab")
    }

    fn set_state(&mut self, id: JobId, state: JobState) {
        self.touched.insert(id);
        self.job(id).state = state;
    }

    /// Takes a job off its lease; the lease ends with its last job.
    fn detach(&mut self, lease: LeaseId, job: JobId) {
        let done = match self.leases.get_mut(&lease) {
            Some(l) => {
                l.pending.retain(|j| *j != job);
                l.pending.is_empty()
            }
            None => false,
        };
        self.job(job).lease = None;
        if done {
            self.end_lease(lease);
        }
    }

    fn end_lease(&mut self, lease: LeaseId) {
        if let Some(l) = self.leases.remove(&lease) {
            let d = &mut self.devs[l.device];
            if d.lease == Some(lease) {
                d.lease = None;
            }
        }
    }

    /// `test_failed`: the attempt failed a test (not the infrastructure), which makes a
    /// later pass flaky.
    fn retry(&mut self, id: JobId, test_failed: bool) {
        let now = self.now;
        let zero = self.cfg.backoff_base_ms == 0;
        self.set_state(id, JobState::Queued);
        let j = self.job(id);
        let failed_attempt = j.attempt;
        j.attempt += 1;
        j.had_failure |= test_failed;
        j.not_before = None;
        if !zero {
            j.backoff_pending = Some((now, failed_attempt));
        }
    }

    fn infra_failure(&mut self, id: JobId) -> JobState {
        let j = self.job(id);
        if j.cancel_requested {
            self.set_state(id, JobState::Canceled);
            JobState::Canceled
        } else if j.attempt < j.spec.max_attempts {
            self.retry(id, false);
            JobState::Queued
        } else {
            self.set_state(id, JobState::Error);
            JobState::Error
        }
    }

    fn expire(&mut self, lease: LeaseId, lost: bool) {
        let Some(l) = self.leases.get(&lease).cloned() else {
            return;
        };
        for j in l.pending {
            self.detach(lease, j);
            self.infra_failure(j);
        }
        self.end_lease(lease);
        if lost && self.devs[l.device].registered {
            self.devs[l.device].lost = true;
        }
    }

    /// Whether some live device serves the group: has its build installed, is not lost and
    /// meets its requirements.
    fn served(&self, g: &(Target, BuildRef, Requirements)) -> bool {
        self.devs.iter().enumerate().any(|(i, d)| {
            d.registered
                && !d.lost
                && target(DEVICES[i].1) == g.0
                && d.installed.as_ref() == Some(&g.1)
                && fits(&g.2, i)
        })
    }
}

/// Runs `ops` on a fresh scheduler and the model, checking invariants after every step;
/// returns a trace of every answer and event (for the determinism check).
fn run(policy: PolicyKind, seed: u64, backoff_base_ms: u64, ops: &[Op]) -> Vec<String> {
    let cfg = SchedulerConfig {
        policy,
        lease_ttl_ms: TTL,
        backoff_base_ms,
        backoff_max_ms: 2_000,
        backoff_jitter: 0.2,
        aging_ms_per_level: AGING,
        seed,
        cancel_grace_ms: CANCEL_GRACE,
        ..SchedulerConfig::default()
    };
    let mut s = GroupedScheduler::new(cfg.clone());
    let mut m = Model::new(cfg);
    let mut trace = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        m.touched.clear();
        let line = apply(&mut s, &mut m, op);
        let events = s.take_events();
        check(&s, &mut m, &events, step, op);
        trace.push(format!("{line} | {events:?}"));
    }
    trace
}

fn report(passed: bool) -> RunReport {
    RunReport {
        passed,
        tests: vec![TestResult {
            title: "x".into(),
            file: "tests/x.spec.js".into(),
            status: if passed {
                TestStatus::Passed
            } else {
                TestStatus::Failed
            },
            duration_ms: 10,
            error: (!passed).then(|| "assertion failed".to_string()),
        }],
        duration_ms: 10,
        error: (!passed).then(|| "assertion failed".to_string()),
    }
}

/// Picks a job to report on: a running one when `running` and there is one.
fn pick_job(m: &Model, k: usize, running: bool) -> JobId {
    let live: Vec<JobId> = m
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Running)
        .map(|j| j.id)
        .collect();
    if running && !live.is_empty() {
        live[k % live.len()]
    } else {
        m.jobs[k % m.jobs.len()].id
    }
}

/// Picks the lease a report goes under, and whether the model expects it to be accepted.
fn pick_lease(m: &Model, job: JobId, lease: Option<usize>) -> (LeaseId, bool) {
    let l = match lease {
        None => m.jobs[m.by_id[&job]]
            .lease
            .unwrap_or(LeaseId(100_000 + job.0.as_u128() as u64 % 1000)),
        Some(k) if !m.issued.is_empty() => m.issued[k % m.issued.len()],
        Some(k) => LeaseId(200_000 + k as u64),
    };
    let ok = m.leases.get(&l).is_some_and(|r| r.pending.contains(&job));
    (l, ok)
}

fn apply(s: &mut GroupedScheduler, m: &mut Model, op: &Op) -> String {
    let now = m.now;
    match op {
        Op::Submit(args) => {
            let spec = args.spec();
            let got = s.submit(now, spec.clone());
            let existing = spec
                .idempotency_key
                .as_ref()
                .and_then(|k| m.idem.get(&(spec.org_id.clone(), k.clone())).copied());
            match existing {
                Some(i) if m.jobs[i].spec == spec => {
                    let j = &m.jobs[i];
                    assert_eq!(
                        got,
                        Ok(Submitted {
                            job_id: j.id,
                            created: false,
                            state: j.state
                        })
                    );
                }
                Some(i) => {
                    assert!(
                        matches!(&got, Err(SubmitError::IdempotencyConflict { existing, .. }) if *existing == m.jobs[i].id),
                        "{got:?}"
                    );
                }
                None => {
                    let sub = got.clone().expect("a valid spec is accepted");
                    m.add_job(sub, spec);
                }
            }
            format!("submit {got:?}")
        }
        Op::SubmitMany { specs, invalid } => {
            let mut specs: Vec<JobSpec> = specs.iter().map(SpecArgs::spec).collect();
            if let Some(i) = invalid {
                let n = specs.len();
                specs[i % n].tests.clear();
            }
            let got = s.submit_many(now, specs.clone());
            // The first refusal, in the scheduler's order: the spec itself, a key already
            // used for another spec, a key used twice in the batch for different specs.
            let mut refusal = None;
            let mut seen: HashMap<(OrgId, String), usize> = HashMap::new();
            for (i, spec) in specs.iter().enumerate() {
                if spec.tests.is_empty() {
                    refusal = Some(format!("invalid {i}"));
                    break;
                }
                if let Some(k) = &spec.idempotency_key {
                    let key = (spec.org_id.clone(), k.clone());
                    if let Some(&e) = m.idem.get(&key) {
                        if m.jobs[e].spec != *spec {
                            refusal = Some(format!("conflict {}", m.jobs[e].id));
                            break;
                        }
                    }
                    if let Some(prev) = seen.insert(key, i) {
                        if specs[prev] != *spec {
                            refusal = Some(format!("invalid {i}"));
                            break;
                        }
                    }
                }
            }
            match (refusal, &got) {
                (Some(r), Err(SubmitError::Invalid { index, .. })) => {
                    assert_eq!(r, format!("invalid {index}"))
                }
                (Some(r), Err(SubmitError::IdempotencyConflict { existing, .. })) => {
                    assert_eq!(r, format!("conflict {existing}"))
                }
                (None, Ok(subs)) => {
                    assert_eq!(subs.len(), specs.len());
                    for (sub, spec) in subs.iter().zip(specs) {
                        let existing = spec
                            .idempotency_key
                            .as_ref()
                            .and_then(|k| m.idem.get(&(spec.org_id.clone(), k.clone())).copied());
                        match existing {
                            Some(e) => {
                                let j = &m.jobs[e];
                                assert_eq!(
                                    *sub,
                                    Submitted {
                                        job_id: j.id,
                                        created: false,
                                        state: j.state
                                    }
                                );
                            }
                            None => m.add_job(*sub, spec),
                        }
                    }
                }
                (want, got) => panic!("submit_many: expected {want:?}, got {got:?}"),
            }
            format!("submit_many {got:?}")
        }
        Op::Forget => {
            let gone = s.forget_finished(now);
            let keep: Vec<bool> = m
                .jobs
                .iter()
                .map(|j| {
                    let finished = j.final_snapshot.as_ref().and_then(|f| f.finished_at);
                    finished.is_none_or(|t| t >= now)
                })
                .collect();
            assert_eq!(gone, keep.iter().filter(|k| !**k).count(), "forgotten jobs");
            let mut it = keep.iter();
            m.jobs.retain(|_| *it.next().expect("same length"));
            m.by_id = m.jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
            // A forgotten job's idempotency key is free again.
            m.idem = m
                .jobs
                .iter()
                .enumerate()
                .filter_map(|(i, j)| {
                    let k = j.spec.idempotency_key.clone()?;
                    Some(((j.spec.org_id.clone(), k), i))
                })
                .collect();
            format!("forget {gone}")
        }
        Op::Restore => {
            let jobs: Vec<Job> = s
                .list(&JobFilter {
                    limit: Some(usize::MAX),
                    ..Default::default()
                })
                .into_iter()
                .cloned()
                .collect();
            let restored_floor = jobs.iter().filter_map(|j| j.last_lease.max(j.lease)).max();
            *s = GroupedScheduler::restore(m.cfg.clone(), jobs).expect("restore");
            // Restored leases keep their deadline; their backstop is recomputed from each
            // job's start and timeout.
            let ids: Vec<LeaseId> = m.leases.keys().copied().collect();
            for id in ids {
                let hard = m.leases[&id]
                    .pending
                    .iter()
                    .filter_map(|j| {
                        let job = s.get(*j)?;
                        Some(job.started_at?.plus_ms(job.spec.timeout_ms).plus_ms(TTL))
                    })
                    .max()
                    .expect("a live lease holds jobs");
                if let Some(l) = m.leases.get_mut(&id) {
                    l.hard = hard;
                }
            }
            // A restored cancel request gets its grace from its lease's deadline.
            for j in &mut m.jobs {
                if j.state == JobState::Running && j.cancel_requested {
                    let deadline = s.get(j.id).and_then(|job| job.lease_deadline);
                    j.cancel_deadline = deadline.map(|d| d.plus_ms(CANCEL_GRACE));
                }
            }
            for d in &mut m.devs {
                *d = MDev::default();
            }
            m.lease_floor = m.leases.keys().next_back().copied().max(restored_floor);
            "restore".to_string()
        }
        Op::Register { dev, idle } => {
            let d = &m.devs[*dev];
            let info = DeviceInfo {
                id: DeviceId::new(DEVICES[*dev].0).unwrap(),
                target: target(DEVICES[*dev].1),
                capabilities: caps(*dev),
                installed: if d.registered {
                    d.installed.clone()
                } else {
                    None
                },
                install_estimate_ms: None,
                idle: *idle,
                session: None,
                replaces: None,
            };
            let got = s.register_device(now, info);
            assert_eq!(got, Ok(()));
            // A device new to this scheduler gets back a lease it held before a restart,
            // unless it comes back idle: then that lease's jobs go back to the queue.
            let held = if d.registered {
                d.lease
            } else {
                m.leases
                    .iter()
                    .find(|(_, l)| l.device == *dev)
                    .map(|(id, _)| *id)
            };
            let held = match held {
                Some(l) if *idle => {
                    m.expire(l, false);
                    None
                }
                other => other,
            };
            let d = &mut m.devs[*dev];
            if !d.registered {
                d.installed = None;
            }
            d.lease = held;
            d.registered = true;
            d.lost = false;
            format!("register {dev} idle={idle} {got:?}")
        }
        Op::Unregister { dev } => {
            let id = DeviceId::new(DEVICES[*dev].0).unwrap();
            let got = s.unregister_device(now, &id);
            if !m.devs[*dev].registered {
                assert_eq!(got, Err(DeviceError::UnknownDevice(id)));
            } else {
                assert_eq!(got, Ok(()));
                if let Some(l) = m.devs[*dev].lease {
                    m.expire(l, false);
                }
                m.devs[*dev] = MDev::default();
            }
            format!("unregister {dev} {got:?}")
        }
        Op::Lease { dev, batch } => {
            let id = DeviceId::new(DEVICES[*dev].0).unwrap();
            let got = s.lease(now, &id, *batch);
            let d = m.devs[*dev].clone();
            if !d.registered {
                assert_eq!(got, Err(DeviceError::UnknownDevice(id)));
            } else if d.lost {
                assert_eq!(got, Err(DeviceError::Lost(id)));
            } else if let Some(l) = d.lease {
                assert_eq!(
                    got,
                    Err(DeviceError::Busy {
                        device: id,
                        lease: l
                    })
                );
            } else {
                match got.clone().expect("a free device may ask") {
                    None => check_idle(m, *dev),
                    Some(lease) => take_lease(m, *dev, *batch, lease),
                }
            }
            format!("lease {dev} {got:?}")
        }
        Op::Heartbeat { lease, live } => {
            let l = if *live && !m.leases.is_empty() {
                *m.leases
                    .keys()
                    .nth(lease % m.leases.len())
                    .expect("in range")
            } else if m.issued.is_empty() {
                LeaseId(300_000)
            } else {
                m.issued[lease % m.issued.len()]
            };
            let got = s.heartbeat(now, l);
            match m.leases.get_mut(&l) {
                None => assert_eq!(got, Err(ReportError::StaleLease(l))),
                Some(rec) => {
                    rec.deadline = rec.deadline.max(now.plus_ms(TTL));
                    let rec = rec.clone();
                    let cancel: Vec<JobId> = rec
                        .pending
                        .iter()
                        .copied()
                        .filter(|j| m.jobs[m.by_id[j]].cancel_requested)
                        .collect();
                    assert_eq!(
                        got,
                        Ok(HeartbeatAck {
                            deadline: rec.deadline,
                            cancel
                        })
                    );
                }
            }
            format!("heartbeat {l} {got:?}")
        }
        Op::Complete { job, lease, passed } => {
            if m.jobs.is_empty() {
                return "complete: no job".into();
            }
            let jid = pick_job(m, *job, lease.is_none());
            let (l, ok) = pick_lease(m, jid, *lease);
            let before = s.get(jid).cloned();
            let got = s.complete(now, l, jid, report(*passed));
            if !ok {
                refused(s, m, l, jid, before, got.clone().map(|_| ()));
            } else {
                m.detach(l, jid);
                let j = m.jobs[m.by_id[&jid]].clone();
                let expect = if j.cancel_requested {
                    m.set_state(jid, JobState::Canceled);
                    JobState::Canceled
                } else if *passed {
                    m.set_state(jid, JobState::Passed);
                    JobState::Passed
                } else if j.spec.retry_failed_tests && j.attempt < j.spec.max_attempts {
                    m.retry(jid, true);
                    JobState::Queued
                } else {
                    m.set_state(jid, JobState::Failed);
                    JobState::Failed
                };
                assert_eq!(got, Ok(expect));
                if expect == JobState::Passed {
                    let flaky = s.get(jid).and_then(|j| j.outcome.as_ref()).map(|o| o.flaky);
                    assert_eq!(
                        flaky,
                        Some(j.had_failure),
                        "a pass after a failed test is flaky; after an infrastructure error not"
                    );
                }
            }
            format!("complete {l} {jid} {got:?}")
        }
        Op::Fail { job, lease } => {
            if m.jobs.is_empty() {
                return "fail: no job".into();
            }
            let jid = pick_job(m, *job, lease.is_none());
            let (l, ok) = pick_lease(m, jid, *lease);
            let before = s.get(jid).cloned();
            let failure = InfraFailure {
                kind: InfraErrorKind::RunnerCrashed,
                message: "boom".into(),
            };
            let got = s.fail(now, l, jid, failure);
            if !ok {
                refused(s, m, l, jid, before, got.clone().map(|_| ()));
            } else {
                m.detach(l, jid);
                let expect = m.infra_failure(jid);
                assert_eq!(got, Ok(expect));
            }
            format!("fail {l} {jid} {got:?}")
        }
        Op::Cancel { job, unknown } => {
            if m.jobs.is_empty() || *unknown {
                let id = JobId::from_parts(1, [0xee; 10]);
                let got = s.cancel(now, id);
                assert_eq!(got, Err(CancelError::NotFound(id)));
                return format!("cancel unknown {got:?}");
            }
            let jid = m.jobs[job % m.jobs.len()].id;
            let got = s.cancel(now, jid);
            let state = m.jobs[m.by_id[&jid]].state;
            match state {
                JobState::Queued => {
                    assert_eq!(got, Ok(CancelOutcome::Canceled));
                    m.set_state(jid, JobState::Canceled);
                    m.job(jid).not_before = None;
                }
                JobState::Running => {
                    assert_eq!(got, Ok(CancelOutcome::Requested));
                    let j = m.job(jid);
                    if !j.cancel_requested {
                        j.cancel_requested = true;
                        j.cancel_deadline = Some(now.plus_ms(CANCEL_GRACE));
                    }
                }
                st => assert_eq!(got, Err(CancelError::AlreadyFinal { id: jid, state: st })),
            }
            format!("cancel {jid} {got:?}")
        }
        Op::Advance { ms } => {
            m.now = now.plus_ms(*ms);
            let now = m.now;
            s.tick(now);
            // Backoffs that ended release their jobs first...
            for j in &mut m.jobs {
                if j.state == JobState::Queued && j.not_before.is_some_and(|t| t <= now) {
                    j.not_before = None;
                }
            }
            // ...then leases past their hard deadline time out (the device stays)...
            let mut hard: Vec<(Time, LeaseId)> = m
                .leases
                .iter()
                .filter(|(_, l)| l.hard <= now)
                .map(|(id, l)| (l.hard, *id))
                .collect();
            hard.sort();
            for (_, l) in hard {
                m.expire(l, false);
            }
            // ...then leases without a recent heartbeat expire and their devices are lost.
            let mut late: Vec<(Time, LeaseId)> = m
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, l)| (l.deadline, *id))
                .collect();
            late.sort();
            for (_, l) in late {
                m.expire(l, true);
            }
            // ...and last, cancel-requested jobs their agents never stopped end canceled.
            let mut due: Vec<(Time, JobId)> = m
                .jobs
                .iter()
                .filter_map(|j| Some((j.cancel_deadline?, j.id)))
                .filter(|(t, _)| *t <= now)
                .collect();
            due.sort();
            for (_, id) in due {
                m.job(id).cancel_deadline = None;
                let j = m.job(id);
                if let (JobState::Running, Some(l)) = (j.state, j.lease) {
                    m.detach(l, id);
                    m.set_state(id, JobState::Canceled);
                }
            }
            format!("advance to {now:?}")
        }
    }
}

/// A refused report: an error (stale exactly when the lease is not live) and no change.
fn refused(
    s: &GroupedScheduler,
    m: &Model,
    lease: LeaseId,
    job: JobId,
    before: Option<Job>,
    got: Result<(), ReportError>,
) {
    let err = got.expect_err("a report under a lease that does not hold the job is refused");
    if m.leases.contains_key(&lease) {
        assert!(matches!(err, ReportError::NotInLease { .. }), "{err:?}");
    } else {
        assert_eq!(err, ReportError::StaleLease(lease));
    }
    assert_eq!(
        s.get(job).cloned(),
        before,
        "a refused report changes nothing"
    );
}

/// The scheduler left a free device idle: no policy may do that while a job of the
/// device's own build waits, or while a group nobody serves waits, except that grouped
/// may leave such a group to another free device that fits it and has no job of its own
/// build waiting (a spare one, so the device can keep a build that still gets jobs);
/// FIFO never idles while any job it could run waits.
fn check_idle(m: &Model, dev: usize) {
    let t = target(DEVICES[dev].1);
    let installed = m.devs[dev].installed.clone();
    for j in m.jobs.iter().filter(|j| j.ready()) {
        if j.spec.target != t || !fits(&j.spec.requires, dev) {
            continue;
        }
        assert!(
            m.cfg.policy != PolicyKind::Fifo,
            "fifo idled a device while job {} waits",
            j.id
        );
        assert!(
            installed.as_ref() != Some(&j.spec.build()),
            "idle while a job of the installed build waits"
        );
        let spare = m.cfg.policy == PolicyKind::Grouped
            && (0..DEVICES.len()).any(|o| {
                let d = &m.devs[o];
                o != dev
                    && d.registered
                    && !d.lost
                    && d.lease.is_none()
                    && target(DEVICES[o].1) == t
                    && fits(&j.spec.requires, o)
                    && !m.jobs.iter().any(|k| {
                        k.ready()
                            && k.spec.target == t
                            && d.installed.as_ref() == Some(&k.spec.build())
                            && fits(&k.spec.requires, o)
                    })
            });
        assert!(
            m.served(&j.group()) || spare,
            "idle while group {:?} waits unserved and no other free device could take it",
            j.group()
        );
    }
}

fn take_lease(m: &mut Model, dev: usize, batch: usize, lease: Lease) {
    let now = m.now;
    assert!(
        m.lease_floor.is_none_or(|l| lease.id > l),
        "lease ids only grow"
    );
    assert!(!m.leases.contains_key(&lease.id));
    assert_eq!(lease.device.as_str(), DEVICES[dev].0);
    assert!(!lease.jobs.is_empty() && lease.jobs.len() <= batch);
    assert_eq!(lease.deadline, now.plus_ms(TTL));
    assert_eq!(
        lease.install,
        m.devs[dev].installed.as_ref() != Some(&lease.build)
    );
    let first = m.jobs[m.by_id[&lease.jobs[0].id]].group();
    let mut hard = now.plus_ms(TTL);
    for lj in &lease.jobs {
        let j = &m.jobs[m.by_id[&lj.id]];
        assert!(
            j.ready(),
            "leased job {} was not ready: {:?}",
            j.id,
            j.state
        );
        assert_eq!(j.spec.target, target(DEVICES[dev].1), "wrong target");
        assert!(
            fits(&j.spec.requires, dev),
            "requirements not met by device"
        );
        assert_eq!(j.group(), first, "one group per lease");
        assert_eq!(j.spec.build(), lease.build);
        assert_eq!(lj.attempt, j.attempt);
        assert_eq!(lj.spec, j.spec);
        hard = hard.plus_ms(j.spec.timeout_ms);
        // Age order within group and priority: nothing older of the same priority is left.
        for other in &m.jobs {
            if other.ready()
                && other.group() == first
                && other.spec.priority == j.spec.priority
                && !lease.jobs.iter().any(|x| x.id == other.id)
            {
                assert!(
                    m.by_id[&other.id] > m.by_id[&j.id],
                    "job {} leased before older job {} of its group and priority",
                    j.id,
                    other.id
                );
            }
        }
    }
    // Within the lease, same-priority jobs come oldest first.
    for w in lease.jobs.windows(2) {
        let (a, b) = (&m.jobs[m.by_id[&w[0].id]], &m.jobs[m.by_id[&w[1].id]]);
        if a.spec.priority == b.spec.priority {
            assert!(m.by_id[&a.id] < m.by_id[&b.id], "batch out of age order");
        }
    }
    for lj in &lease.jobs {
        m.set_state(lj.id, JobState::Running);
        m.job(lj.id).lease = Some(lease.id);
    }
    m.leases.insert(
        lease.id,
        MLease {
            device: dev,
            pending: lease.jobs.iter().map(|j| j.id).collect(),
            deadline: lease.deadline,
            hard,
        },
    );
    m.issued.push(lease.id);
    m.lease_floor = Some(lease.id);
    let d = &mut m.devs[dev];
    d.lease = Some(lease.id);
    d.installed = Some(lease.build);
}

/// The invariants, after every step.
fn check(s: &GroupedScheduler, m: &mut Model, events: &[JobEvent], step: usize, op: &Op) {
    let ctx = format!("after step {step} ({op:?})");
    // Events: only for jobs that changed, the last one per job is its state, and exactly one
    // final event per job ever.
    let mut last: BTreeMap<JobId, JobState> = BTreeMap::new();
    for e in events {
        assert!(
            m.by_id.contains_key(&e.job_id),
            "{ctx}: event for unknown job"
        );
        last.insert(e.job_id, e.state);
        if e.state.is_final() {
            let j = m.job(e.job_id);
            j.final_events += 1;
            assert_eq!(
                j.final_events, 1,
                "{ctx}: second final event for {}",
                e.job_id
            );
        }
    }
    let changed: BTreeSet<JobId> = last.keys().copied().collect();
    assert_eq!(changed, m.touched, "{ctx}: events vs state changes");
    for (id, st) in &last {
        assert_eq!(*st, m.jobs[m.by_id[id]].state, "{ctx}: last event of {id}");
    }

    // Every job is there exactly once, in submission order, in the model's state.
    assert_eq!(s.len(), m.jobs.len(), "{ctx}: job count");
    let listed: Vec<JobId> = s
        .list(&JobFilter {
            limit: Some(usize::MAX),
            ..Default::default()
        })
        .iter()
        .map(|j| j.id)
        .collect();
    let ids: Vec<JobId> = m.jobs.iter().map(|j| j.id).collect();
    assert_eq!(listed, ids, "{ctx}: jobs lost, duplicated or reordered");

    let base = m.cfg.backoff_base_ms;
    let now = m.now;
    for mj in &mut m.jobs {
        let j = s.get(mj.id).expect("listed");
        assert_eq!(j.state, mj.state, "{ctx}: state of {}", mj.id);
        assert_eq!(j.attempt, mj.attempt, "{ctx}: attempt of {}", mj.id);
        assert!(j.attempt <= j.spec.max_attempts, "{ctx}: attempts exceeded");
        assert_eq!(j.lease, mj.lease, "{ctx}: lease of {}", mj.id);
        assert_eq!(j.state == JobState::Running, mj.lease.is_some());
        assert_eq!(j.cancel_requested, mj.cancel_requested);
        if let Some((at, failed)) = mj.backoff_pending.take() {
            // The scheduler drew the backoff: exponential in the attempt, capped, ±20%.
            let exp = (base << (failed - 1).min(20)).min(2_000) as f64;
            let nb = j.not_before.expect("a retry with backoff waits");
            let d = nb.since(at) as f64;
            assert!(
                d >= (exp * 0.8).floor() && d <= (exp * 1.2).ceil() && nb > now,
                "{ctx}: backoff {d} for attempt {failed}"
            );
            mj.not_before = Some(nb);
        }
        if j.state == JobState::Queued {
            assert_eq!(
                j.not_before, mj.not_before,
                "{ctx}: not_before of {}",
                mj.id
            );
        }
        if j.state.is_final() {
            assert_eq!(
                mj.final_events, 1,
                "{ctx}: {} final without its event",
                mj.id
            );
            match &mj.final_snapshot {
                None => mj.final_snapshot = Some(j.clone()),
                Some(snap) => assert_eq!(snap, j, "{ctx}: a final job changed"),
            }
            assert_eq!(j.outcome.as_ref().map(|o| o.state), Some(j.state));
        }
        if let Some(l) = mj.lease {
            let rec = &m.leases[&l];
            assert_eq!(
                j.device.as_ref().map(|d| d.as_str()),
                Some(DEVICES[rec.device].0),
                "{ctx}: running on the lease's device"
            );
        }
    }

    // The ready set holds every ready job exactly once.
    let ready = m.jobs.iter().filter(|j| j.ready()).count();
    assert_eq!(s.ready_len(), ready, "{ctx}: ready jobs");
    let groups = s.groups();
    assert_eq!(
        groups.iter().map(|g| g.ready as usize).sum::<usize>(),
        ready,
        "{ctx}: ready per group"
    );
    let running = m
        .jobs
        .iter()
        .filter(|j| j.state == JobState::Running)
        .count();
    assert_eq!(
        groups.iter().map(|g| g.running as usize).sum::<usize>(),
        running,
        "{ctx}: running per group"
    );
    let mut counts: BTreeMap<Target, StateCounts> = BTreeMap::new();
    for j in &m.jobs {
        counts
            .entry(j.spec.target.clone())
            .or_default()
            .add(j.state);
    }
    for (t, c) in s.queue_depth() {
        assert_eq!(
            c,
            counts.get(&t).copied().unwrap_or_default(),
            "{ctx}: counts of {t}"
        );
    }

    // Devices: registered, lost, lease and install as the model says; a lease belongs to
    // exactly one device and every live lease holds running jobs.
    let devs = s.devices();
    let registered: Vec<&str> = DEVICES
        .iter()
        .zip(&m.devs)
        .filter(|(_, d)| d.registered)
        .map(|(x, _)| x.0)
        .collect();
    let mut got: Vec<&str> = devs.iter().map(|d| d.info.id.as_str()).collect();
    got.sort();
    let mut want = registered.clone();
    want.sort();
    assert_eq!(got, want, "{ctx}: registered devices");
    for d in &devs {
        let md = &m.devs[m.dev_index(&d.info.id)];
        assert_eq!(d.lost, md.lost, "{ctx}: lost flag of {}", d.info.id);
        assert_eq!(d.lease, md.lease, "{ctx}: lease of {}", d.info.id);
        assert_eq!(
            d.info.installed, md.installed,
            "{ctx}: install of {}",
            d.info.id
        );
    }
    let held: BTreeSet<LeaseId> = devs.iter().filter_map(|d| d.lease).collect();
    assert_eq!(
        held.len(),
        devs.iter().filter(|d| d.lease.is_some()).count(),
        "{ctx}: a lease held by two devices"
    );
    for (id, l) in &m.leases {
        // After a restart a lease lives on until its device registers again or it expires.
        assert_eq!(
            held.contains(id),
            m.devs[l.device].registered,
            "{ctx}: live lease {id} and its device"
        );
        for j in &l.pending {
            assert_eq!(m.jobs[m.by_id[j]].lease, Some(*id));
        }
    }
}

fn scenario() -> impl Strategy<Value = (u64, u64, Vec<Op>)> {
    (
        any::<u64>(),
        prop_oneof![Just(0u64), Just(400u64)],
        proptest::collection::vec(op_strategy(), 1..56),
    )
        .prop_map(|(seed, backoff, ops)| {
            // Start with the whole lab registered, so most steps do something.
            let mut all: Vec<Op> = (0..DEVICES.len())
                .map(|dev| Op::Register { dev, idle: true })
                .collect();
            all.extend(ops);
            (seed, backoff, all)
        })
}

fn check_policy(policy: PolicyKind, seed: u64, backoff: u64, ops: &[Op]) {
    let first = run(policy, seed, backoff, ops);
    // Determinism: the same calls on a fresh scheduler with the same seed give the same
    // answers (leases, ids, backoffs) and the same events.
    let again = run(policy, seed, backoff, ops);
    assert_eq!(first, again, "replay differs");
}

proptest! {
    // Failures are kept in qgjob-core/proptest-regressions/ (cargo runs tests from the
    // package root) and replayed first on every run.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/proptest_scheduler.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn grouped_policy_keeps_the_invariants((seed, backoff, ops) in scenario()) {
        check_policy(PolicyKind::Grouped, seed, backoff, &ops);
    }

    #[test]
    fn fifo_policy_keeps_the_invariants((seed, backoff, ops) in scenario()) {
        check_policy(PolicyKind::Fifo, seed, backoff, &ops);
    }

    #[test]
    fn per_group_policy_keeps_the_invariants((seed, backoff, ops) in scenario()) {
        check_policy(PolicyKind::PerGroup, seed, backoff, &ops);
    }
}

/// Fencing across a restart: a lease id issued before the restart must never be issued
/// again, or a report from the old attempt's (zombie) device is taken for the new attempt.
/// Every job keeps its last lease id (`Job::last_lease`), and `restore` continues after the
/// highest, so an id whose lease had already ended is never handed out again.
#[test]
fn restore_never_reuses_a_lease_id() {
    let cfg = SchedulerConfig::default();
    let mut s = GroupedScheduler::new(cfg.clone());
    let spec = |v: &str| {
        JobSpec::new(
            OrgId::new("acme").unwrap(),
            AppVersionId::new(v).unwrap(),
            vec!["tests/a.spec.js".into()],
        )
    };
    let dev = |id: &str| DeviceInfo {
        id: DeviceId::new(id).unwrap(),
        target: Target::Emulator,
        capabilities: Capabilities::default(),
        installed: None,
        install_estimate_ms: None,
        idle: false,
        session: None,
        replaces: None,
    };
    s.submit(Time(0), spec("v1")).unwrap();
    let b = s.submit(Time(0), spec("v2")).unwrap().job_id;
    s.register_device(Time(0), dev("d1")).unwrap();
    s.register_device(Time(0), dev("d2")).unwrap();
    let l1 = s.lease(Time(0), &dev("d1").id, 1).unwrap().unwrap();
    let l2 = s.lease(Time(0), &dev("d2").id, 1).unwrap().unwrap();
    assert_eq!(l2.jobs[0].id, b);
    // d2 goes silent: its lease expires and b waits for a second attempt.
    s.heartbeat(Time(29_000), l1.id).unwrap();
    s.tick(Time(31_000));
    assert_eq!(s.get(b).unwrap().state, JobState::Queued);

    let jobs: Vec<Job> = s.list(&JobFilter::default()).into_iter().cloned().collect();
    let mut r = GroupedScheduler::restore(cfg, jobs).unwrap();
    r.register_device(Time(40_000), dev("d3")).unwrap();
    r.tick(Time(40_000));
    let l3 = r.lease(Time(40_000), &dev("d3").id, 1).unwrap().unwrap();
    assert_eq!(l3.jobs[0].id, b);
    assert!(
        l3.id > l2.id,
        "lease {} issued again after the restart",
        l2.id
    );
    // What goes wrong otherwise: the zombie d2 reports its old attempt and it is accepted.
    let zombie = RunReport {
        passed: false,
        tests: vec![],
        duration_ms: 1,
        error: Some("from the first attempt".into()),
    };
    assert_eq!(
        r.complete(Time(40_001), l2.id, b, zombie),
        Err(ReportError::StaleLease(l2.id))
    );
}
