//! The agent runtime end to end in one process: `Agent` + `LocalLink` + `GroupedScheduler`
//! with simulated devices, under paused tokio time (so minutes of device work take no wall
//! time and every instant is exact).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use qgjob_core::agent::{
    Agent, AgentConfig, AgentCounters, AgentError, AgentLink, LinkError, LocalLink,
    SharedScheduler, Shutdown, TokioClock,
};
use qgjob_core::device::{CancelWatch, Device};
use qgjob_core::simdevice::{SimDevice, SimDeviceConfig, SimOutcome};
use qgjob_core::*;

type Shared = SharedScheduler<GroupedScheduler>;

fn build(org: &str, v: &str) -> BuildRef {
    BuildRef {
        org_id: OrgId::new(org).unwrap(),
        app_version_id: AppVersionId::new(v).unwrap(),
    }
}

fn spec(org: &str, v: &str, test: &str) -> JobSpec {
    JobSpec::new(
        OrgId::new(org).unwrap(),
        AppVersionId::new(v).unwrap(),
        vec![test.to_string()],
    )
}

fn shared(cfg: SchedulerConfig) -> Shared {
    SharedScheduler::new(GroupedScheduler::new(cfg), Arc::new(TokioClock::default()))
}

fn sim(id: &str, install_ms: u64, run_ms: u64) -> SimDeviceConfig {
    let mut c = SimDeviceConfig::new(DeviceId::new(id).unwrap(), Target::Emulator);
    c.install_ms = install_ms;
    c.run_ms = run_ms;
    c
}

fn agent_cfg() -> AgentConfig {
    AgentConfig {
        max_batch: 2,
        heartbeat_interval: Duration::from_secs(5),
        lease_wait: Duration::from_secs(60),
        ..AgentConfig::default()
    }
}

/// Waits (in virtual time) until `pred` holds; a generous virtual deadline turns a hang
/// into a failure instead of a stuck test.
async fn wait(s: &Shared, what: &str, pred: impl FnMut(&GroupedScheduler) -> bool) {
    if tokio::time::timeout(Duration::from_secs(24 * 3600), s.wait_until(pred))
        .await
        .is_err()
    {
        panic!("never happened: {what}");
    }
}

/// Awaits an agent's end, with the same generous virtual deadline as [`wait`].
async fn ended<T>(what: &str, handle: tokio::task::JoinHandle<T>) -> T {
    match tokio::time::timeout(Duration::from_secs(24 * 3600), handle).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!("never ended: {what}"),
    }
}

fn all_final(ids: &[JobId]) -> impl FnMut(&GroupedScheduler) -> bool + '_ {
    move |s| {
        ids.iter()
            .all(|j| s.get(*j).is_some_and(|j| j.state.is_final()))
    }
}

fn spawn_agent(
    link: Arc<dyn AgentLink>,
    devices: &[Arc<SimDevice>],
    cfg: AgentConfig,
) -> (
    Shutdown,
    tokio::task::JoinHandle<Result<AgentCounters, qgjob_core::agent::AgentError>>,
) {
    spawn_built(with_devices(Agent::new(link, cfg), devices))
}

fn with_devices(mut agent: Agent, devices: &[Arc<SimDevice>]) -> Agent {
    for d in devices {
        agent.add_device(Arc::clone(d) as Arc<dyn Device>);
    }
    agent
}

fn spawn_built(
    agent: Agent,
) -> (
    Shutdown,
    tokio::task::JoinHandle<Result<AgentCounters, qgjob_core::agent::AgentError>>,
) {
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(agent.run(shutdown.signal()));
    (shutdown, handle)
}

#[tokio::test(start_paused = true)]
async fn two_builds_on_two_devices_finish_with_the_right_outcomes() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let scripted = vec![
        ("fail_".to_string(), SimOutcome::Fail),
        ("flaky_".to_string(), SimOutcome::Flaky),
        ("crash_".to_string(), SimOutcome::InfraError),
    ];
    let devices: Vec<Arc<SimDevice>> = ["emu-1", "emu-2"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut c = sim(id, 45_000, 20_000);
            c.run_jitter = 0.2;
            c.seed = i as u64 + 1;
            c.scripted = scripted.clone();
            Arc::new(SimDevice::new(c))
        })
        .collect();

    let mut expect: Vec<(JobId, JobState, bool)> = Vec::new();
    for (v, test, state, flaky) in [
        ("v1", "tests/login.spec.js", JobState::Passed, false),
        ("v1", "tests/fail_checkout.spec.js", JobState::Failed, false),
        ("v1", "tests/flaky_search.spec.js", JobState::Passed, true),
        ("v1", "tests/profile.spec.js", JobState::Passed, false),
        ("v2", "tests/onboarding.spec.js", JobState::Passed, false),
        ("v2", "tests/settings.spec.js", JobState::Passed, false),
        ("v2", "tests/crash_upload.spec.js", JobState::Error, false),
        ("v2", "tests/logout.spec.js", JobState::Passed, false),
    ] {
        let mut sp = spec("acme", v, test);
        sp.max_attempts = 2;
        expect.push((s.submit(sp).unwrap().job_id, state, flaky));
    }
    let ids: Vec<JobId> = expect.iter().map(|e| e.0).collect();

    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &devices, agent_cfg());
    wait(&s, "all jobs final", all_final(&ids)).await;

    for (id, state, flaky) in &expect {
        let job = s.get(*id).unwrap();
        assert_eq!(job.state, *state, "{}", job.spec.tests[0]);
        let outcome = job.outcome.clone().unwrap();
        assert_eq!(outcome.flaky, *flaky, "{}", job.spec.tests[0]);
        match state {
            JobState::Failed => {
                assert_eq!(outcome.counts.failed, 1);
                assert_eq!(outcome.tests[0].title, "fail_checkout");
                assert!(outcome.error.unwrap().contains("simulated failure"));
            }
            JobState::Error => {
                assert_eq!(
                    job.attempt, 2,
                    "an infra error is retried up to max_attempts"
                );
                assert!(outcome.error.unwrap().contains("simulated runner crash"));
            }
            _ => assert_eq!(outcome.counts.passed, 1),
        }
    }

    // Installs: what the devices did, what the agent counted and what the leases asked for.
    let sched_installs: u64 = s.read(|s| s.devices().iter().map(|d| d.installs).sum());
    let device_installs: u64 = devices.iter().map(|d| d.stats().installs).sum();
    shutdown.trigger();
    let counters = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(counters.installs, sched_installs);
    assert_eq!(device_installs, sched_installs);
    assert!(sched_installs >= 2, "two builds need at least two installs");
    // Eight jobs, one of them reported twice (its retried infrastructure error).
    assert_eq!(counters.jobs_run, 9);
    assert_eq!(counters.infra_failures, 2);
    assert_eq!(counters.failed, 1);
    assert_eq!(counters.passed, 6);
    assert_eq!(counters.stale_leases, 0);
    // Graceful shutdown unregistered both devices.
    assert!(s.read(|s| s.devices().is_empty()));
}

#[tokio::test(start_paused = true)]
async fn a_long_polling_agent_gets_a_job_submitted_while_it_waits() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 2_000)));
    let mut cfg = agent_cfg();
    cfg.lease_wait = Duration::from_secs(600);
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&dev)], cfg);

    wait(&s, "device registered", |s| s.devices().len() == 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    wait(&s, "job final", all_final(&[id])).await;

    let job = s.get(id).unwrap();
    assert_eq!(job.state, JobState::Passed);
    // Virtual time is exact: the waiting poll was woken by the submit itself, not by its
    // 600 s timeout running out.
    assert_eq!(job.created_at, Time(5_000));
    assert_eq!(job.started_at, Some(job.created_at));
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(c.leases, 1);
    assert_eq!(c.installs, 1);
}

#[tokio::test(start_paused = true)]
async fn canceling_a_running_job_stops_it_on_the_device() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 600_000)));
    let mut cfg = agent_cfg();
    cfg.heartbeat_interval = Duration::from_secs(1);
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&dev)], cfg);

    let id = s
        .submit(spec("acme", "v1", "tests/long.spec.js"))
        .unwrap()
        .job_id;
    wait(&s, "job running", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let asked = s.now();
    assert_eq!(s.cancel(id).unwrap(), CancelOutcome::Requested);
    wait(&s, "job final", all_final(&[id])).await;

    let job = s.get(id).unwrap();
    assert_eq!(job.state, JobState::Canceled);
    // The device stopped at the next heartbeat, long before the job's 600 s would end.
    assert!(job.finished_at.unwrap() <= asked.plus_ms(1_000));
    let st = dev.stats();
    assert_eq!((st.canceled, st.passed, st.failed), (1, 0, 0));
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert!(s.read(|s| s.devices().is_empty()));
    // A cancel is not an infrastructure failure.
    assert_eq!((c.canceled, c.infra_failures), (1, 0), "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_device_loses_its_lease_and_another_finishes_the_job() {
    let cfg = SchedulerConfig {
        lease_ttl_ms: 10_000,
        ..SchedulerConfig::default()
    };
    let s = shared(cfg);
    let ticker = s.spawn_ticker();
    let a = Arc::new(SimDevice::new(sim("emu-a", 1_000, 300_000)));
    let b = Arc::new(SimDevice::new(sim("emu-b", 1_000, 5_000)));
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;

    let (_sa, agent_a) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&a)], agent_cfg());
    wait(&s, "running on a", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    assert_eq!(s.get(id).unwrap().device.unwrap().as_str(), "emu-a");
    tokio::time::sleep(Duration::from_secs(20)).await;
    // The agent dies without a word: no report, no unregister, no more heartbeats.
    agent_a.abort();
    assert!(agent_a.await.unwrap_err().is_cancelled());
    let _ = s.take_events();

    let (sb, agent_b) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&b)], agent_cfg());
    wait(&s, "job final", all_final(&[id])).await;
    let job = s.get(id).unwrap();
    assert_eq!(job.state, JobState::Passed);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.device.as_ref().unwrap().as_str(), "emu-b");
    let events = s.take_events();
    assert!(events
        .iter()
        .any(|e| e.job_id == id && e.state == JobState::Queued && e.attempt == 2));
    let lost: Vec<bool> = s.read(|s| {
        s.devices()
            .into_iter()
            .filter(|d| d.info.id.as_str() == "emu-a")
            .map(|d| d.lost)
            .collect()
    });
    assert_eq!(lost, vec![true]);
    assert_eq!(a.stats().passed, 0);
    assert_eq!(b.stats().passed, 1);
    sb.trigger();
    agent_b.await.unwrap().unwrap();
    ticker.abort();
}

/// Submits a job, runs it on an agent with one slow device (`emu-a`), and kills the agent
/// (no report, no unregister) `after` the job started; returns the job and the agent's
/// session.
async fn killed_mid_job(s: &Shared, after: Duration) -> (JobId, String) {
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    let slow = Arc::new(SimDevice::new(sim("emu-a", 1_000, 300_000)));
    let agent = with_devices(Agent::new(Arc::new(s.link()), agent_cfg()), &[slow]);
    let session = agent.session().to_string();
    let (_stop, run) = spawn_built(agent);
    wait(s, "running", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    tokio::time::sleep(after).await;
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    (id, session)
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_takes_its_device_back_without_waiting_out_the_old_lease() {
    // A long TTL, so waiting it out would show.
    let cfg = SchedulerConfig {
        lease_ttl_ms: 600_000,
        ..SchedulerConfig::default()
    };
    let s = shared(cfg);
    let ticker = s.spawn_ticker();
    let (id, predecessor) = killed_mid_job(&s, Duration::from_secs(20)).await;
    let old_deadline = s.get(id).unwrap().lease_deadline.expect("leased");

    // It starts again, with the same device, and names the run it follows (as `qgjob
    // agent` does from its cache dir's lock), so the device is not held from it.
    let again = Arc::new(SimDevice::new(sim("emu-a", 1_000, 5_000)));
    let agent = Agent::new(Arc::new(s.link()), agent_cfg()).replacing(Some(predecessor));
    let (s2, second) = spawn_built(with_devices(agent, &[Arc::clone(&again)]));
    wait(&s, "job final", all_final(&[id])).await;
    let job = s.get(id).unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Passed, 2));
    assert_eq!(job.device.as_ref().unwrap().as_str(), "emu-a");
    // Virtual time: the retry ran long before the old lease would have expired.
    assert!(
        job.finished_at.unwrap() < old_deadline,
        "finished {:?}, old lease ran to {old_deadline:?}",
        job.finished_at
    );
    assert_eq!(again.stats().passed, 1);
    s2.trigger();
    second.await.unwrap().unwrap();
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_that_cannot_name_its_predecessor_waits_until_it_is_silent() {
    let cfg = SchedulerConfig {
        lease_ttl_ms: 20_000,
        ..SchedulerConfig::default()
    };
    let s = shared(cfg);
    let ticker = s.spawn_ticker();
    let (id, _) = killed_mid_job(&s, Duration::from_secs(12)).await;
    let killed = s.now();

    let again = Arc::new(SimDevice::new(sim("emu-a", 1_000, 5_000)));
    let (s2, second) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&again)], agent_cfg());
    wait(&s, "job final", all_final(&[id])).await;
    let job = s.get(id).unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Passed, 2));
    // The killed agent's last heartbeat came at most 5 s before it died; the device was
    // refused to the new session until that was a TTL old.
    assert!(
        job.started_at.unwrap().since(killed) >= 15_000,
        "restarted {:?} after the kill at {killed:?}",
        job.started_at
    );
    s2.trigger();
    let c = second.await.unwrap().unwrap();
    assert!(c.held >= 1, "{c:?}");
    assert_eq!(c.jobs_run, 1);
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn a_second_agent_under_the_same_name_stops_and_leaves_the_first_alone() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let ids: Vec<JobId> = (0..6)
        .map(|i| {
            s.submit(spec("acme", "v1", &format!("tests/{i}.spec.js")))
                .unwrap()
                .job_id
        })
        .collect();
    let mine = Arc::new(SimDevice::new(sim("emu-a", 1_000, 10_000)));
    let (s1, first) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&mine)], agent_cfg());
    wait(&s, "running", |s| {
        s.get(ids[0]).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    let started = tokio::time::Instant::now();
    let twin = Arc::new(SimDevice::new(sim("emu-a", 1_000, 10_000)));
    let (_s2, second) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&twin)], agent_cfg());
    match ended("the twin", second).await {
        Err(AgentError::Register { device, message }) => {
            assert_eq!(device.as_str(), "emu-a");
            assert!(message.contains("registered by another agent"), "{message}");
        }
        other => panic!("the twin should stop: {other:?}"),
    }
    // It gave the holder the whole patience to go quiet (virtual time).
    assert!(started.elapsed() >= AgentConfig::default().held_patience);
    assert_eq!(twin.stats().passed, 0);

    wait(&s, "all final", all_final(&ids)).await;
    for id in &ids {
        let j = s.get(*id).unwrap();
        assert_eq!((j.state, j.attempt), (JobState::Passed, 1), "{j:?}");
    }
    s1.trigger();
    let c = first.await.unwrap().unwrap();
    assert_eq!((c.jobs_run, c.infra_failures, c.stale_leases), (6, 0, 0));
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn an_agent_whose_device_was_taken_while_it_was_cut_off_stops() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let net = Arc::new(TestNet::new(s.link()));
    let cfg = AgentConfig {
        lease_wait: Duration::from_secs(1),
        ..agent_cfg()
    };
    let gone = Arc::new(SimDevice::new(sim("emu-a", 1_000, 10_000)));
    let agent = with_devices(
        Agent::new(Arc::clone(&net) as Arc<dyn AgentLink>, cfg),
        &[gone],
    );
    let cut_off = agent.session().to_string();
    let (_s1, first) = spawn_built(agent);
    wait(&s, "registered", |s| !s.devices().is_empty()).await;
    // Cut off for longer than a TTL: another agent may then take the device.
    net.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(35)).await;
    let taker = Arc::new(SimDevice::new(sim("emu-a", 1_000, 10_000)));
    let (s2, second) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&taker)], agent_cfg());
    wait(&s, "taken over", |s| {
        s.devices()
            .iter()
            .any(|d| d.info.session.as_ref().is_some_and(|x| *x != cut_off))
    })
    .await;
    net.down.store(false, Ordering::SeqCst);
    // Back in touch, the first agent learns from its next poll that the device is no
    // longer its own, and stops rather than take leases from the agent that has it now.
    match ended("the cut-off agent", first).await {
        Err(AgentError::Register { device, .. }) => assert_eq!(device.as_str(), "emu-a"),
        other => panic!("the cut-off agent should stop: {other:?}"),
    }
    let ids: Vec<JobId> = (0..3)
        .map(|i| {
            s.submit(spec("acme", "v1", &format!("tests/{i}.spec.js")))
                .unwrap()
                .job_id
        })
        .collect();
    wait(&s, "all final", all_final(&ids)).await;
    for id in &ids {
        let j = s.get(*id).unwrap();
        assert_eq!((j.state, j.attempt), (JobState::Passed, 1), "{j:?}");
    }
    s2.trigger();
    let c = second.await.unwrap().unwrap();
    assert_eq!((c.jobs_run, c.infra_failures), (3, 0));
    ticker.abort();
}

#[tokio::test(start_paused = true)]
async fn a_report_under_a_stale_lease_is_refused_and_changes_nothing() {
    let cfg = SchedulerConfig {
        lease_ttl_ms: 10_000,
        backoff_base_ms: 0,
        ..SchedulerConfig::default()
    };
    let s = shared(cfg);
    let link = s.link();
    let dev = DeviceInfo {
        id: DeviceId::new("emu-1").unwrap(),
        target: Target::Emulator,
        capabilities: Capabilities::default(),
        installed: None,
        install_estimate_ms: None,
        idle: false,
        session: None,
        replaces: None,
    };
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    link.register(dev.clone()).await.unwrap();
    let first = link
        .lease(&dev.id, None, 1, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.jobs[0].id, id);

    tokio::time::sleep(Duration::from_secs(11)).await;
    s.tick();
    let after_expiry = s.get(id).unwrap();
    assert_eq!(after_expiry.state, JobState::Queued);
    assert_eq!(after_expiry.attempt, 2);

    let pass = RunReport {
        passed: true,
        tests: vec![],
        duration_ms: 1,
        error: None,
    };
    assert_eq!(
        link.complete(first.id, id, pass.clone()).await,
        Err(LinkError::Stale)
    );
    assert_eq!(link.heartbeat(first.id).await, Err(LinkError::Stale));
    assert_eq!(s.get(id).unwrap(), after_expiry);

    // The device was marked lost: it registers again and gets the second attempt.
    assert!(matches!(
        link.lease(&dev.id, None, 1, Duration::ZERO).await,
        Err(LinkError::Rejected(_))
    ));
    link.register(dev.clone()).await.unwrap();
    let second = link
        .lease(&dev.id, None, 1, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.jobs[0].attempt, 2);
    let failure = InfraFailure {
        kind: InfraErrorKind::DeviceLost,
        message: "late".into(),
    };
    let before = s.get(id).unwrap();
    assert_eq!(
        link.fail(first.id, id, failure).await,
        Err(LinkError::Stale)
    );
    assert_eq!(s.get(id).unwrap(), before);
    assert_eq!(
        link.complete(second.id, id, pass).await,
        Ok(JobState::Passed)
    );
}

#[tokio::test(start_paused = true)]
async fn an_agent_abandons_a_stale_lease_and_recovers() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 60_000)));
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&dev)], agent_cfg());
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    wait(&s, "running", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    // The operator removes the device behind the agent's back: its lease goes stale.
    let dev_id = DeviceId::new("emu-1").unwrap();
    s.update(|s, now| s.unregister_device(now, &dev_id))
        .unwrap();
    assert_eq!(s.get(id).unwrap().state, JobState::Queued);

    wait(&s, "job final", all_final(&[id])).await;
    let job = s.get(id).unwrap();
    assert_eq!(job.state, JobState::Passed);
    assert_eq!(job.attempt, 2);
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    // First attempt: stopped on the device and never reported; second: run and reported.
    assert_eq!(c.stale_leases, 1);
    assert_eq!(c.jobs_run, 1);
    assert!(
        c.rejected >= 1,
        "the unknown device was refused, then re-registered"
    );
    let st = dev.stats();
    assert_eq!((st.canceled, st.passed), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_the_running_batch_finish_and_report() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 10_000, 30_000)));
    let ids: Vec<JobId> = (0..2)
        .map(|i| {
            s.submit(spec("acme", "v1", &format!("tests/t{i}.spec.js")))
                .unwrap()
                .job_id
        })
        .collect();
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&dev)], agent_cfg());
    wait(&s, "running", |s| {
        ids.iter()
            .all(|j| s.get(*j).is_some_and(|j| j.state == JobState::Running))
    })
    .await;
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    for id in &ids {
        assert_eq!(s.get(*id).unwrap().state, JobState::Passed);
    }
    assert_eq!(c.jobs_run, 2);
    assert!(s.read(|s| s.devices().is_empty()));
}

/// A link over a pretend network. By default it passes every call to the scheduler; its
/// knobs lose requests (a flaky network), delay lease answers (dropping the poll part-way
/// would lose the lease), refuse a device for good (as a server refuses a wrong token)
/// after failing its first registrations with transport errors, or answer some jobs'
/// reports with a server error while every other call goes through (a server bug on one
/// job). It keeps the log lines it is sent.
struct TestNet {
    inner: LocalLink<GroupedScheduler>,
    /// Lose one request in three, and every job's first report.
    lossy: bool,
    calls: AtomicU64,
    failed_once: Mutex<BTreeSet<JobId>>,
    /// How long a lease answer takes to arrive after the scheduler granted it.
    lease_delay: Duration,
    /// A device whose registration is refused.
    refuse: Option<DeviceId>,
    /// Registrations (of other devices) that fail with a transport error first.
    transport_failures: AtomicU64,
    /// The scheduler is unreachable: every call fails with a transport error.
    down: std::sync::atomic::AtomicBool,
    /// Jobs whose `complete` reports fail with a server error.
    refuse_complete: Mutex<BTreeSet<JobId>>,
    /// Jobs whose `fail` reports fail with a server error.
    refuse_fail: Mutex<BTreeSet<JobId>>,
    /// Jobs whose `complete` reports are answered "busy" (an overloaded server).
    busy_complete: Mutex<BTreeSet<JobId>>,
    /// Log lines sent, by job.
    logs: Mutex<Vec<(JobId, String)>>,
}

impl TestNet {
    fn new(inner: LocalLink<GroupedScheduler>) -> Self {
        TestNet {
            inner,
            lossy: false,
            calls: AtomicU64::new(0),
            failed_once: Mutex::new(BTreeSet::new()),
            lease_delay: Duration::ZERO,
            refuse: None,
            transport_failures: AtomicU64::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
            refuse_complete: Mutex::new(BTreeSet::new()),
            refuse_fail: Mutex::new(BTreeSet::new()),
            busy_complete: Mutex::new(BTreeSet::new()),
            logs: Mutex::new(Vec::new()),
        }
    }

    fn server_error(refused: &Mutex<BTreeSet<JobId>>, job: JobId) -> Result<(), LinkError> {
        if refused.lock().unwrap().contains(&job) {
            Err(LinkError::Transport(
                "500 internal: store write failed".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn drop_this_one(&self) -> bool {
        self.lossy && self.calls.fetch_add(1, Ordering::SeqCst) % 3 == 1
    }

    fn unreachable(&self) -> Result<(), LinkError> {
        if self.down.load(Ordering::SeqCst) {
            Err(LinkError::Transport("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl AgentLink for TestNet {
    async fn register(&self, device: DeviceInfo) -> Result<(), LinkError> {
        self.unreachable()?;
        if self.refuse.as_ref() == Some(&device.id) {
            return Err(LinkError::Rejected("unknown token".into()));
        }
        let left = self.transport_failures.load(Ordering::SeqCst);
        if left > 0 {
            self.transport_failures.store(left - 1, Ordering::SeqCst);
            return Err(LinkError::Transport("connection refused".into()));
        }
        self.inner.register(device).await
    }
    async fn unregister(&self, device: &DeviceId, session: Option<&str>) -> Result<(), LinkError> {
        self.unreachable()?;
        self.inner.unregister(device, session).await
    }
    async fn lease(
        &self,
        device: &DeviceId,
        session: Option<&str>,
        max_batch: usize,
        wait: Duration,
    ) -> Result<Option<Lease>, LinkError> {
        self.unreachable()?;
        if self.drop_this_one() {
            return Err(LinkError::Transport("connection reset".into()));
        }
        let got = self.inner.lease(device, session, max_batch, wait).await;
        if !self.lease_delay.is_zero() {
            tokio::time::sleep(self.lease_delay).await;
        }
        got
    }
    async fn heartbeat(&self, lease: LeaseId) -> Result<HeartbeatAck, LinkError> {
        self.unreachable()?;
        if self.drop_this_one() {
            return Err(LinkError::Transport("timed out".into()));
        }
        self.inner.heartbeat(lease).await
    }
    async fn complete(
        &self,
        lease: LeaseId,
        job: JobId,
        report: RunReport,
    ) -> Result<JobState, LinkError> {
        self.unreachable()?;
        // With a lossy network, every first report is lost on the way.
        if self.lossy && self.failed_once.lock().unwrap().insert(job) {
            return Err(LinkError::Transport("502 bad gateway".into()));
        }
        Self::server_error(&self.refuse_complete, job)?;
        if self.busy_complete.lock().unwrap().contains(&job) {
            return Err(LinkError::Busy("503 unavailable: retry shortly".into()));
        }
        self.inner.complete(lease, job, report).await
    }
    async fn fail(
        &self,
        lease: LeaseId,
        job: JobId,
        failure: InfraFailure,
    ) -> Result<JobState, LinkError> {
        self.unreachable()?;
        Self::server_error(&self.refuse_fail, job)?;
        self.inner.fail(lease, job, failure).await
    }
    async fn log(&self, lease: LeaseId, job: JobId, text: &str) -> Result<(), LinkError> {
        self.unreachable()?;
        self.logs.lock().unwrap().push((job, text.to_string()));
        self.inner.log(lease, job, text).await
    }
}

/// A scheduler whose leases outlive a long outage, as a restarted server's do (it extends
/// the leases it restores), with one job on an agent that reaches it through a [`TestNet`].
async fn one_job_behind_a_network() -> (Shared, Arc<TestNet>, JobId) {
    let s = shared(SchedulerConfig {
        lease_ttl_ms: 3_600_000,
        ..SchedulerConfig::default()
    });
    let net = Arc::new(TestNet::new(s.link()));
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    (s, net, id)
}

#[tokio::test(start_paused = true)]
async fn a_finished_job_is_reported_after_a_long_outage() {
    let (s, net, id) = one_job_behind_a_network().await;
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 10_000)));
    let (shutdown, handle) =
        spawn_agent(Arc::clone(&net) as Arc<dyn AgentLink>, &[dev], agent_cfg());
    wait(&s, "running", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    // The server goes away while the test runs, and comes back ten minutes later.
    net.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(600)).await;
    net.down.store(false, Ordering::SeqCst);
    wait(&s, "job final", all_final(&[id])).await;
    let job = s.get(id).unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Passed, 1), "{job:?}");
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!((c.passed, c.unreported), (1, 0), "{c:?}");
    assert!(c.transport_errors > 20, "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn an_agent_stopping_during_an_outage_gives_up_and_counts_what_it_could_not_report() {
    let (s, net, id) = one_job_behind_a_network().await;
    let mut ids = vec![id];
    for t in ["tests/b.spec.js", "tests/c.spec.js"] {
        ids.push(s.submit(spec("acme", "v1", t)).unwrap().job_id);
    }
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 100)));
    let cfg = AgentConfig {
        max_batch: 3,
        ..agent_cfg()
    };
    let (shutdown, handle) = spawn_agent(Arc::clone(&net) as Arc<dyn AgentLink>, &[dev], cfg);
    wait(&s, "running", |s| {
        ids.iter()
            .all(|id| s.get(*id).is_some_and(|j| j.state == JobState::Running))
    })
    .await;
    net.down.store(true, Ordering::SeqCst);
    shutdown.trigger();
    let stopping = tokio::time::Instant::now();
    let c = handle.await.unwrap().unwrap();
    assert_eq!((c.jobs_run, c.unreported), (0, 3), "{c:?}");
    for id in &ids {
        assert_eq!(s.get(*id).unwrap().state, JobState::Running);
    }
    // Virtual time: one job's retries (about 26 s), not three times that.
    assert!(
        stopping.elapsed() < Duration::from_secs(40),
        "took {:?}",
        stopping.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_verdict_the_server_keeps_refusing_ends_as_an_infra_failure_and_the_device_moves_on() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let net = Arc::new(TestNet::new(s.link()));
    let mut sp = spec("acme", "v1", "tests/a.spec.js");
    sp.max_attempts = 2;
    let stuck = s.submit(sp).unwrap().job_id;
    let others: Vec<JobId> = ["tests/b.spec.js", "tests/c.spec.js"]
        .iter()
        .map(|t| s.submit(spec("acme", "v1", t)).unwrap().job_id)
        .collect();
    // A server bug on one job: its verdict is answered with a 500, every time, while the
    // heartbeats (and everything else) go through.
    net.refuse_complete.lock().unwrap().insert(stuck);
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 10_000)));
    let cfg = AgentConfig {
        max_batch: 1,
        ..agent_cfg()
    };
    let patience = cfg.report_patience;
    let (shutdown, handle) = spawn_agent(Arc::clone(&net) as Arc<dyn AgentLink>, &[dev], cfg);

    wait(&s, "the refused job retried", |s| {
        s.get(stuck).is_some_and(|j| j.attempt == 2)
    })
    .await;
    let retried = s.get(stuck).unwrap();
    // Retried by the usual rules, and the reason is the job's to show.
    let why = retried.last_error.clone().unwrap_or_default();
    assert!(
        why.contains("could not be delivered") && why.contains("500 internal"),
        "{why}"
    );
    // Not before the patience ran out after the run (virtual time: install and run 11 s).
    assert!(
        retried.released_at.0 >= 11_000 + patience.as_millis() as u64,
        "{retried:?}"
    );

    let mut all = others.clone();
    all.push(stuck);
    wait(&s, "all final", all_final(&all)).await;
    // The device went on to the other jobs, and the stuck one ended within its attempts.
    for id in &others {
        let j = s.get(*id).unwrap();
        assert_eq!((j.state, j.attempt), (JobState::Passed, 1), "{j:?}");
    }
    let j = s.get(stuck).unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Error, 2), "{j:?}");
    let err = j.outcome.unwrap().error.unwrap();
    assert!(
        err.starts_with("infrastructure error: the tests' result (passed) could not be delivered"),
        "{err}"
    );
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(
        (
            c.jobs_run,
            c.passed,
            c.infra_failures,
            c.undelivered,
            c.unreported
        ),
        (4, 2, 2, 2, 0),
        "{c:?}"
    );
    assert!(c.transport_errors >= 2, "{c:?}");
    assert!(s.read(|s| s.devices().is_empty()));
}

#[tokio::test(start_paused = true)]
async fn a_job_whose_every_report_is_refused_is_given_up_and_its_lease_handed_back() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let net = Arc::new(TestNet::new(s.link()));
    let ids: Vec<JobId> = ["tests/a.spec.js", "tests/b.spec.js"]
        .iter()
        .map(|t| s.submit(spec("acme", "v1", t)).unwrap().job_id)
        .collect();
    let stuck = ids[0];
    // Neither its verdict nor the failure sent in its place gets through.
    net.refuse_complete.lock().unwrap().insert(stuck);
    net.refuse_fail.lock().unwrap().insert(stuck);
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 10_000)));
    let (shutdown, handle) =
        spawn_agent(Arc::clone(&net) as Arc<dyn AgentLink>, &[dev], agent_cfg());
    wait(&s, "both running in one lease", |s| {
        ids.iter()
            .all(|id| s.get(*id).is_some_and(|j| j.state == JobState::Running))
    })
    .await;

    // Its batch mate is still reported, after the stuck one is given up.
    wait(&s, "the batch mate passed", |s| {
        s.get(ids[1]).is_some_and(|j| j.state == JobState::Passed)
    })
    .await;
    let reported = tokio::time::Instant::now();
    // Then the device hands the lease back rather than keep it alive: the stuck job goes
    // back to the queue at once (virtual time), not once the lease would have expired.
    wait(&s, "the stuck job requeued", |s| {
        s.get(stuck).is_some_and(|j| j.attempt == 2)
    })
    .await;
    assert!(
        reported.elapsed() < Duration::from_secs(1),
        "{:?}",
        reported.elapsed()
    );
    let j = s.get(stuck).unwrap();
    let why = j.last_error.unwrap_or_default();
    assert!(why.contains("came back idle"), "{why}");
    // Why is in the job's log.
    let logs = net.logs.lock().unwrap().clone();
    assert!(
        logs.iter().any(|(job, text)| *job == stuck
            && text.contains("gave up reporting this attempt")
            && text.contains("could not be delivered")),
        "{logs:?}"
    );

    // The server is fixed: the next attempt is reported as usual.
    net.refuse_complete.lock().unwrap().clear();
    net.refuse_fail.lock().unwrap().clear();
    wait(&s, "all final", all_final(&ids)).await;
    let j = s.get(stuck).unwrap();
    assert_eq!((j.state, j.attempt), (JobState::Passed, 2), "{j:?}");
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(
        (
            c.jobs_run,
            c.passed,
            c.undelivered,
            c.unreported,
            c.registrations
        ),
        (2, 2, 0, 1, 2),
        "{c:?}"
    );
    assert_eq!(c.stale_leases, 0, "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn a_batch_whose_every_verdict_is_refused_waits_one_patience_not_one_per_job() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let net = Arc::new(TestNet::new(s.link()));
    let ids: Vec<JobId> = ["tests/a.spec.js", "tests/b.spec.js", "tests/c.spec.js"]
        .iter()
        .map(|t| s.submit(spec("acme", "v1", t)).unwrap().job_id)
        .collect();
    // The server takes failures but answers every verdict with a 500.
    net.refuse_complete
        .lock()
        .unwrap()
        .extend(ids.iter().copied());
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 10_000)));
    let cfg = AgentConfig {
        max_batch: 3,
        ..agent_cfg()
    };
    let patience = cfg.report_patience;
    let (shutdown, handle) = spawn_agent(Arc::clone(&net) as Arc<dyn AgentLink>, &[dev], cfg);
    wait(&s, "all three retried", |s| {
        ids.iter()
            .all(|id| s.get(*id).is_some_and(|j| j.attempt == 2))
    })
    .await;
    let last = ids
        .iter()
        .map(|id| s.get(*id).unwrap().released_at.0)
        .max()
        .unwrap();
    // Virtual time: install and run (11 s), one patience, then a try of each later
    // verdict and its failure; a patience per job would be 15 minutes and more.
    assert!(
        last < 11_000 + patience.as_millis() as u64 + 60_000,
        "the last job went back at {last} ms"
    );
    for id in &ids {
        let why = s.get(*id).unwrap().last_error.unwrap_or_default();
        assert!(why.contains("could not be delivered"), "{why}");
    }
    // The server is fixed: the retries are reported as usual.
    net.refuse_complete.lock().unwrap().clear();
    wait(&s, "all final", all_final(&ids)).await;
    for id in &ids {
        let j = s.get(*id).unwrap();
        assert_eq!((j.state, j.attempt), (JobState::Passed, 2), "{j:?}");
    }
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(
        (c.jobs_run, c.passed, c.undelivered, c.unreported),
        (6, 3, 3, 0),
        "{c:?}"
    );
}

/// Runs one job whose verdict `refuse` keeps the server from taking for `refused` after
/// the job started (while heartbeats are answered), and checks the verdict then got
/// through as it was: passed on attempt 1, nothing given up or noted in its log.
async fn verdict_delivered_after(
    refuse: impl Fn(&TestNet) -> &Mutex<BTreeSet<JobId>>,
    refused: Duration,
) {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let net = Arc::new(TestNet::new(s.link()));
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    refuse(&net).lock().unwrap().insert(id);
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 10_000)));
    let (shutdown, handle) =
        spawn_agent(Arc::clone(&net) as Arc<dyn AgentLink>, &[dev], agent_cfg());
    wait(&s, "running", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    tokio::time::sleep(refused).await;
    assert_eq!(s.get(id).unwrap().state, JobState::Running);
    refuse(&net).lock().unwrap().clear();
    wait(&s, "job final", all_final(&[id])).await;
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    let job = s.get(id).unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Passed, 1), "{job:?}");
    assert_eq!(
        (c.jobs_run, c.passed, c.undelivered, c.unreported),
        (1, 1, 0, 0),
        "{c:?}"
    );
    assert!(c.transport_errors > 10, "{c:?}");
    assert!(net.logs.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_refused_verdict_that_gets_through_within_the_patience_counts_as_it_was() {
    // The refusals last most of the patience (the run takes 11 s of it), then stop.
    let patience = agent_cfg().report_patience;
    verdict_delivered_after(|n| &n.refuse_complete, patience - Duration::from_secs(30)).await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_server_does_not_use_up_the_patience() {
    // Overloaded for twice the patience: the verdict still gets through as it was.
    let patience = agent_cfg().report_patience;
    verdict_delivered_after(|n| &n.busy_complete, 2 * patience).await;
}

#[tokio::test(start_paused = true)]
async fn a_forgotten_device_registers_again_at_once() {
    let s = shared(SchedulerConfig::default());
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 1_000)));
    let cfg = AgentConfig {
        lease_wait: Duration::from_secs(1),
        ..agent_cfg()
    };
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &[dev], cfg.clone());
    wait(&s, "registered", |s| s.devices().len() == 1).await;
    // The scheduler forgets it (as a restarted server forgets every device).
    s.update(|s, now| s.unregister_device(now, &DeviceId::new("emu-1").unwrap()))
        .unwrap();
    let forgot = tokio::time::Instant::now();
    wait(&s, "registered again", |s| s.devices().len() == 1).await;
    // Virtual time: the waiting poll's refusal, then straight to registering, no backoff.
    assert!(
        forgot.elapsed() < cfg.retry_min,
        "took {:?}",
        forgot.elapsed()
    );
    shutdown.trigger();
    handle.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn transport_errors_are_retried_until_every_job_is_reported() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let link = Arc::new(TestNet {
        lossy: true,
        ..TestNet::new(s.link())
    });
    let dev = Arc::new(SimDevice::new(sim("emu-1", 5_000, 10_000)));
    let ids: Vec<JobId> = (0..5)
        .map(|i| {
            s.submit(spec("acme", "v1", &format!("tests/t{i}.spec.js")))
                .unwrap()
                .job_id
        })
        .collect();
    let mut cfg = agent_cfg();
    cfg.max_batch = 1;
    let (shutdown, handle) = spawn_agent(link, &[Arc::clone(&dev)], cfg);
    wait(&s, "all final", all_final(&ids)).await;
    for id in &ids {
        let job = s.get(*id).unwrap();
        assert_eq!((job.state, job.attempt), (JobState::Passed, 1));
    }
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(c.jobs_run, 5);
    assert!(c.transport_errors >= 5, "{c:?}");
    assert_eq!(dev.stats().installs, 1);
}

#[tokio::test(start_paused = true)]
async fn sim_device_rates_are_seeded_and_roughly_right() {
    let run = |seed: u64| async move {
        let mut c = sim("emu-1", 0, 1_000);
        c.seed = seed;
        c.fail_rate = 0.2;
        c.flaky_rate = 0.1;
        c.infra_error_rate = 0.1;
        c.run_jitter = 0.5;
        let d = SimDevice::new(c);
        let b = build("acme", "v1");
        d.install(&b).await.unwrap();
        let jobs: Vec<LeasedJob> = (0..400)
            .map(|i| LeasedJob {
                id: JobId::from_parts(i, [i as u8; 10]),
                attempt: 1,
                spec: {
                    let mut sp = spec("acme", "v1", "tests/a.spec.js");
                    sp.tests.push("tests/b.spec.js".into());
                    sp
                },
            })
            .collect();
        let (_tx, watch) = CancelWatch::channel();
        let out = d.run(&b, &jobs, watch).await;
        (out, d.stats())
    };
    let (out, st) = run(7).await;
    let (again, _) = run(7).await;
    assert_eq!(out, again, "same seed, same results");
    assert_eq!(out.len(), 400);
    assert_eq!(st.jobs, 400);
    assert_eq!(st.passed + st.failed + st.infra_errors, 400);
    // Binomial(400, p) stays well within these bounds for any reasonable seed.
    assert!((40..=120).contains(&st.failed), "{st:?}");
    assert!((15..=70).contains(&st.flaky), "{st:?}");
    assert!((15..=70).contains(&st.infra_errors), "{st:?}");
    for r in out.iter().flatten() {
        assert_eq!(r.tests.len(), 2);
        assert_eq!(r.tests[0].title, "a");
        assert_eq!(r.tests[1].title, "b");
        assert!((500..=1_500).contains(&r.duration_ms));
        let failed = r
            .tests
            .iter()
            .filter(|t| t.status == TestStatus::Failed)
            .count();
        assert_eq!(r.passed, failed == 0);
        assert_eq!(r.error.is_some(), failed == 1);
    }
    // A device asked to run a build it does not have refuses every job.
    let d = SimDevice::new(sim("emu-2", 0, 1_000));
    let (_tx, watch) = CancelWatch::channel();
    let job = LeasedJob {
        id: JobId::from_parts(1, [1; 10]),
        attempt: 1,
        spec: spec("acme", "v1", "tests/a.spec.js"),
    };
    let out = d.run(&build("acme", "v1"), &[job], watch).await;
    assert!(matches!(&out[0], Err(f) if f.kind == InfraErrorKind::InstallFailed));
}

/// What the hand-written test devices below say they are: an emulator, nothing installed.
fn emulator_info(id: &str) -> DeviceInfo {
    DeviceInfo {
        id: DeviceId::new(id).unwrap(),
        target: Target::Emulator,
        capabilities: Capabilities::default(),
        installed: None,
        install_estimate_ms: Some(1_000),
        idle: false,
        session: None,
        replaces: None,
    }
}

/// A passing report of a run that took `ms`.
fn passed_after(ms: u64) -> RunReport {
    RunReport {
        passed: true,
        tests: Vec::new(),
        duration_ms: ms,
        error: None,
    }
}

/// A test device whose installs always fail (no real hardware involved).
struct BrokenInstaller;

#[async_trait]
impl Device for BrokenInstaller {
    fn info(&self) -> DeviceInfo {
        emulator_info("broken-1")
    }
    async fn install(&self, _build: &BuildRef) -> Result<(), InfraFailure> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Err(InfraFailure {
            kind: InfraErrorKind::InstallFailed,
            message: "adb: INSTALL_FAILED_INSUFFICIENT_STORAGE".into(),
        })
    }
    async fn run(
        &self,
        _build: &BuildRef,
        _jobs: &[LeasedJob],
        _cancel: CancelWatch,
    ) -> Vec<qgjob_core::device::JobRun> {
        panic!("run must not be called after a failed install");
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_install_fails_every_job_of_the_lease() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let ids: Vec<JobId> = (0..2)
        .map(|i| {
            let mut sp = spec("acme", "v1", &format!("tests/t{i}.spec.js"));
            sp.max_attempts = 1;
            s.submit(sp).unwrap().job_id
        })
        .collect();
    let shutdown = Shutdown::new();
    let agent = Agent::new(Arc::new(s.link()), agent_cfg()).with_device(Arc::new(BrokenInstaller));
    let handle = tokio::spawn(agent.run(shutdown.signal()));
    wait(&s, "all final", all_final(&ids)).await;
    for id in &ids {
        let job = s.get(*id).unwrap();
        assert_eq!(job.state, JobState::Error);
        let err = job.outcome.unwrap().error.unwrap();
        assert!(err.contains("INSTALL_FAILED_INSUFFICIENT_STORAGE"), "{err}");
    }
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!((c.leases, c.installs, c.infra_failures), (1, 0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_devices_on_a_threaded_runtime_in_real_time() {
    // Real (short) times on two worker threads: the lock, the notifications and the
    // ticker must not deadlock or lose a wake-up when tasks really run in parallel.
    let s = shared(SchedulerConfig {
        lease_ttl_ms: 5_000,
        backoff_base_ms: 5,
        ..SchedulerConfig::default()
    });
    let ticker = s.spawn_ticker();
    let devices: Vec<Arc<SimDevice>> = (0..4)
        .map(|i| {
            let mut c = sim(&format!("emu-{i}"), 5, 2);
            c.seed = i;
            c.infra_error_rate = 0.2;
            Arc::new(SimDevice::new(c))
        })
        .collect();
    let specs: Vec<JobSpec> = (0..40)
        .map(|i| {
            let mut sp = spec(
                "acme",
                &format!("v{}", i % 3),
                &format!("tests/t{i}.spec.js"),
            );
            sp.max_attempts = 20;
            sp
        })
        .collect();
    let ids: Vec<JobId> = s
        .submit_many(specs)
        .unwrap()
        .into_iter()
        .map(|x| x.job_id)
        .collect();
    let cfg = AgentConfig {
        max_batch: 3,
        heartbeat_interval: Duration::from_millis(500),
        lease_wait: Duration::from_millis(200),
        ..AgentConfig::default()
    };
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &devices, cfg);
    // A hang guard in real time (the work itself takes well under a second).
    tokio::time::timeout(Duration::from_secs(120), s.wait_until(all_final(&ids)))
        .await
        .expect("all jobs final");
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    for id in &ids {
        assert_eq!(s.get(*id).unwrap().state, JobState::Passed);
    }
    let infra: u64 = devices.iter().map(|d| d.stats().infra_errors).sum();
    assert_eq!(c.jobs_run, 40 + infra);
    assert_eq!(c.infra_failures, infra);
    assert!(s.read(|s| s.devices().is_empty()));
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_a_network_long_poll_runs_the_lease_it_brings() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 5_000)));
    let link = Arc::new(TestNet {
        lease_delay: Duration::from_secs(2),
        ..TestNet::new(s.link())
    });
    // The answer arrives within the shutdown grace.
    let cfg = AgentConfig {
        shutdown_grace: Duration::from_secs(5),
        ..agent_cfg()
    };
    let (shutdown, handle) = spawn_agent(link, &[Arc::clone(&dev)], cfg);
    wait(&s, "registered", |s| s.devices().len() == 1).await;
    let mut sp = spec("acme", "v1", "tests/a.spec.js");
    sp.max_attempts = 1;
    let id = s.submit(sp).unwrap().job_id;
    // The scheduler has granted the lease; its answer is still on the way.
    wait(&s, "granted", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    let job = s.get(id).unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Passed, 1));
    assert_eq!((c.leases, c.jobs_run), (1, 1));
    assert!(s.read(|s| s.devices().is_empty()));
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_an_idle_network_long_poll_after_the_grace() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 5_000)));
    let link = Arc::new(TestNet {
        lease_delay: Duration::from_millis(50),
        ..TestNet::new(s.link())
    });
    let cfg = agent_cfg();
    let (lease_wait, grace) = (cfg.lease_wait, cfg.shutdown_grace);
    let (shutdown, handle) = spawn_agent(link, &[Arc::clone(&dev)], cfg);
    wait(&s, "registered", |s| s.devices().len() == 1).await;
    // Well into the first long poll.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = tokio::time::Instant::now();
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    let took = asked.elapsed();
    ticker.abort();
    // Waiting the poll out took up to `lease_wait` (60 s here; 20 s for `qgjob agent`).
    assert!(
        took <= grace + Duration::from_millis(100) && took < lease_wait,
        "stopped after {took:?}"
    );
    assert_eq!((c.registrations, c.leases), (1, 0));
    assert!(
        s.read(|s| s.devices().is_empty()),
        "the device unregistered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_granted_to_an_abandoned_poll_goes_back_to_the_queue_at_once() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 5_000)));
    // The answer takes longer than the grace, so the agent gives up on it.
    let link = Arc::new(TestNet {
        lease_delay: Duration::from_secs(30),
        ..TestNet::new(s.link())
    });
    let (shutdown, handle) = spawn_agent(link, &[Arc::clone(&dev)], agent_cfg());
    wait(&s, "registered", |s| s.devices().len() == 1).await;
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    wait(&s, "granted", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    let asked = tokio::time::Instant::now();
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(c.leases, 0, "the lease never reached the agent");
    // The unregister handed the job back without waiting for its lease to expire.
    assert!(s.read(|s| s.devices().is_empty()));
    let job = s.get(id).unwrap();
    assert_eq!(job.state, JobState::Queued, "{job:?}");
    // And another agent runs it.
    let other = Arc::new(SimDevice::new(sim("emu-2", 1_000, 5_000)));
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &[other], agent_cfg());
    wait(&s, "done", all_final(&[id])).await;
    shutdown.trigger();
    handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(s.get(id).unwrap().state, JobState::Passed);
}

#[tokio::test(start_paused = true)]
async fn a_refused_registration_stops_the_whole_agent_at_once() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let good = Arc::new(SimDevice::new(sim("emu-good", 1_000, 5_000)));
    let bad = Arc::new(SimDevice::new(sim("emu-bad", 1_000, 5_000)));
    let link = Arc::new(TestNet {
        refuse: Some(DeviceId::new("emu-bad").unwrap()),
        ..TestNet::new(s.link())
    });
    let (_shutdown, handle) = spawn_agent(link, &[good, bad], agent_cfg());
    // Nobody triggers the shutdown: the refusal alone must end the run.
    let err = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the agent stops by itself")
        .unwrap()
        .unwrap_err();
    ticker.abort();
    assert_eq!(
        err,
        AgentError::Register {
            device: DeviceId::new("emu-bad").unwrap(),
            message: "unknown token".into(),
        }
    );
    assert_eq!(
        err.to_string(),
        "device emu-bad could not register: unknown token"
    );
    assert!(
        s.read(|s| s.devices().is_empty()),
        "the device that did register unregistered again"
    );
}

#[tokio::test(start_paused = true)]
async fn registration_outlives_an_unreachable_scheduler() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 5_000)));
    let link = Arc::new(TestNet {
        transport_failures: AtomicU64::new(6),
        ..TestNet::new(s.link())
    });
    let stats_link = Arc::clone(&link);
    let mut agent = Agent::new(stats_link, agent_cfg());
    agent.add_device(Arc::clone(&dev) as Arc<dyn Device>);
    let stats = agent.stats();
    let shutdown = Shutdown::new();
    let handle = tokio::spawn(agent.run(shutdown.signal()));
    wait(&s, "registered", |s| s.devices().len() == 1).await;
    let c = stats.snapshot();
    assert_eq!((c.registrations, c.transport_errors), (1, 6));
    let id = s
        .submit(spec("acme", "v1", "tests/a.spec.js"))
        .unwrap()
        .job_id;
    wait(&s, "done", all_final(&[id])).await;
    shutdown.trigger();
    handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!(s.get(id).unwrap().state, JobState::Passed);
}

mod random_labs {
    //! Property: whatever the lab and the workload, every job ends exactly once in the state
    //! its scripted outcome (or an accepted cancel) says, and installs add up.

    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::FileFailurePersistence;

    #[derive(Debug, Clone)]
    struct Lab {
        policy: PolicyKind,
        emulators: usize,
        browserstack: usize,
        max_batch: usize,
        /// (build, outcome, on browserstack)
        jobs: Vec<(u8, u8, bool)>,
        /// (job index, virtual ms)
        cancels: Vec<(usize, u64)>,
        seed: u64,
    }

    fn lab() -> impl Strategy<Value = Lab> {
        (
            prop_oneof![
                Just(PolicyKind::Grouped),
                Just(PolicyKind::Fifo),
                Just(PolicyKind::PerGroup)
            ],
            1usize..4,
            0usize..3,
            1usize..4,
            proptest::collection::vec((0u8..3, 0u8..4, any::<bool>()), 1..25),
            proptest::collection::vec((0usize..25, 0u64..200_000), 0..4),
            any::<u64>(),
        )
            .prop_map(
                |(policy, emulators, browserstack, max_batch, jobs, cancels, seed)| Lab {
                    policy,
                    emulators,
                    browserstack,
                    max_batch,
                    jobs,
                    cancels,
                    seed,
                },
            )
    }

    const OUTCOMES: [(&str, JobState); 4] = [
        ("pass_", JobState::Passed),
        ("fail_", JobState::Failed),
        ("flaky_", JobState::Passed),
        ("crash_", JobState::Error),
    ];

    async fn run_lab(lab: Lab) {
        let s = shared(SchedulerConfig {
            policy: lab.policy,
            seed: lab.seed,
            ..SchedulerConfig::default()
        });
        let ticker = s.spawn_ticker();
        let scripted = vec![
            ("fail_".to_string(), SimOutcome::Fail),
            ("flaky_".to_string(), SimOutcome::Flaky),
            ("crash_".to_string(), SimOutcome::InfraError),
            ("pass_".to_string(), SimOutcome::Pass),
        ];
        let mut devices = Vec::new();
        for (target, n, prefix) in [
            (Target::Emulator, lab.emulators, "emu"),
            (Target::Browserstack, lab.browserstack, "bs"),
        ] {
            for i in 0..n {
                let mut c = SimDeviceConfig::new(
                    DeviceId::new(format!("{prefix}-{i}")).unwrap(),
                    target.clone(),
                );
                c.install_ms = 30_000;
                c.run_ms = 20_000;
                c.run_jitter = 0.5;
                c.seed = lab.seed ^ (i as u64 + 1);
                c.scripted = scripted.clone();
                devices.push(Arc::new(SimDevice::new(c)));
            }
        }
        let mut expect = Vec::new();
        for (i, (build, outcome, bs)) in lab.jobs.iter().enumerate() {
            let (prefix, state) = OUTCOMES[*outcome as usize];
            let mut sp = spec(
                "acme",
                &format!("v{build}"),
                &format!("tests/{prefix}{i}.spec.js"),
            );
            sp.max_attempts = 2;
            if *bs && lab.browserstack > 0 {
                sp.target = Target::Browserstack;
            }
            expect.push((s.submit(sp).unwrap().job_id, state));
        }
        let ids: Vec<JobId> = expect.iter().map(|e| e.0).collect();
        let cfg = AgentConfig {
            max_batch: lab.max_batch,
            ..agent_cfg()
        };
        let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &devices, cfg);
        // Cancels at virtual instants; remember which ones the scheduler accepted.
        let accepted = Arc::new(Mutex::new(BTreeSet::new()));
        let mut cancelers = Vec::new();
        for (k, at) in &lab.cancels {
            let (s2, acc, job, at) = (s.clone(), Arc::clone(&accepted), ids[k % ids.len()], *at);
            cancelers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(at)).await;
                if s2.cancel(job).is_ok() {
                    acc.lock().unwrap().insert(job);
                }
            }));
        }
        for c in cancelers {
            c.await.unwrap();
        }
        wait(&s, "all final", all_final(&ids)).await;
        let sched_installs: u64 = s.read(|s| s.devices().iter().map(|d| d.installs).sum());
        shutdown.trigger();
        let counters = handle.await.unwrap().unwrap();
        ticker.abort();

        let accepted = accepted.lock().unwrap().clone();
        let mut finals: BTreeMap<JobId, Vec<JobState>> = BTreeMap::new();
        for e in s.take_events() {
            if e.state.is_final() {
                finals.entry(e.job_id).or_default().push(e.state);
            }
        }
        let (mut passed, mut failed) = (0, 0);
        for (id, want) in &expect {
            let job = s.get(*id).unwrap();
            let want = if accepted.contains(id) {
                JobState::Canceled
            } else {
                *want
            };
            assert_eq!(job.state, want, "{}", job.spec.tests[0]);
            assert_eq!(finals.get(id), Some(&vec![want]), "one final event");
            passed += u64::from(want == JobState::Passed);
            failed += u64::from(want == JobState::Failed);
        }
        assert_eq!((counters.passed, counters.failed), (passed, failed));
        let device_installs: u64 = devices.iter().map(|d| d.stats().installs).sum();
        assert_eq!(counters.installs, sched_installs);
        assert_eq!(device_installs, sched_installs);
        // No lease went stale; the only refused reports are of canceled jobs the scheduler
        // ended itself after the cancel grace (one still waiting in a batch, say).
        assert!(
            counters.stale_leases <= accepted.len() as u64,
            "{} stale for {} canceled",
            counters.stale_leases,
            accepted.len()
        );
        assert!(s.read(|s| s.devices().is_empty()));
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 48,
            failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
                "proptest-regressions/agent.txt",
            ))),
            ..ProptestConfig::default()
        })]

        #[test]
        fn every_job_of_a_random_lab_ends_exactly_once_as_scripted(lab in lab()) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(run_lab(lab));
        }
    }
}

/// A test device that can be unplugged: while `plugged` is false its runs end "device
/// lost" and it says it is not healthy (no real hardware involved).
struct Unpluggable {
    plugged: std::sync::atomic::AtomicBool,
    runs: AtomicU64,
}

#[async_trait]
impl Device for Unpluggable {
    fn info(&self) -> DeviceInfo {
        emulator_info("usb-1")
    }
    async fn install(&self, _build: &BuildRef) -> Result<(), InfraFailure> {
        Ok(())
    }
    async fn run(
        &self,
        _build: &BuildRef,
        jobs: &[LeasedJob],
        _cancel: CancelWatch,
    ) -> Vec<qgjob_core::device::JobRun> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let plugged = self.plugged.load(Ordering::SeqCst);
        jobs.iter()
            .map(|_| {
                if plugged {
                    Ok(passed_after(1_000))
                } else {
                    Err(InfraFailure {
                        kind: InfraErrorKind::DeviceLost,
                        message: "device usb-1 not found".into(),
                    })
                }
            })
            .collect()
    }
    async fn healthy(&self) -> bool {
        self.plugged.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn an_unplugged_device_takes_no_jobs_until_it_is_back() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let dev = Arc::new(Unpluggable {
        plugged: std::sync::atomic::AtomicBool::new(false),
        runs: AtomicU64::new(0),
    });
    let ids: Vec<JobId> = (0..3)
        .map(|i| {
            s.submit(spec("acme", "v1", &format!("tests/t{i}.spec.js")))
                .unwrap()
                .job_id
        })
        .collect();
    let cfg = AgentConfig {
        max_batch: 1,
        ..agent_cfg()
    };
    let shutdown = Shutdown::new();
    let agent =
        Agent::new(Arc::new(s.link()), cfg).with_device(Arc::clone(&dev) as Arc<dyn Device>);
    let handle = tokio::spawn(agent.run(shutdown.signal()));
    // Unplugged from the start: it does not even register, so nothing runs.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(dev.runs.load(Ordering::SeqCst), 0);
    // Plugged in: it registers and runs one job; then it goes away mid-run.
    dev.plugged.store(true, Ordering::SeqCst);
    wait(&s, "one job passed", |s| {
        ids.iter()
            .any(|j| s.get(*j).is_some_and(|j| j.state == JobState::Passed))
    })
    .await;
    dev.plugged.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(600)).await;
    // At most the one job it held when it went: the others did not burn their attempts.
    let attempts: u32 = ids.iter().map(|j| s.get(*j).unwrap().attempt).sum();
    assert!(attempts <= 4, "attempts {attempts}");
    assert!(ids
        .iter()
        .all(|j| s.get(*j).unwrap().state != JobState::Error));
    // Back again: everything passes.
    dev.plugged.store(true, Ordering::SeqCst);
    wait(&s, "all final", all_final(&ids)).await;
    for id in &ids {
        assert_eq!(s.get(*id).unwrap().state, JobState::Passed);
    }
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert!(c.unhealthy >= 2, "{c:?}");
}

/// A test device that runs every batch for two minutes and ignores cancels (no real
/// hardware involved).
struct Stubborn;

#[async_trait]
impl Device for Stubborn {
    fn info(&self) -> DeviceInfo {
        emulator_info("stubborn-1")
    }
    async fn install(&self, _build: &BuildRef) -> Result<(), InfraFailure> {
        Ok(())
    }
    async fn run(
        &self,
        _build: &BuildRef,
        jobs: &[LeasedJob],
        _cancel: CancelWatch,
    ) -> Vec<qgjob_core::device::JobRun> {
        tokio::time::sleep(Duration::from_secs(120)).await;
        jobs.iter().map(|_| Ok(passed_after(120_000))).collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_the_scheduler_ended_does_not_lose_its_batch_mates_reports() {
    let s = shared(SchedulerConfig {
        cancel_grace_ms: 10_000,
        ..SchedulerConfig::default()
    });
    let ticker = s.spawn_ticker();
    let ids: Vec<JobId> = (0..2)
        .map(|i| {
            s.submit(spec("acme", "v1", &format!("tests/t{i}.spec.js")))
                .unwrap()
                .job_id
        })
        .collect();
    let shutdown = Shutdown::new();
    let agent = Agent::new(Arc::new(s.link()), agent_cfg()).with_device(Arc::new(Stubborn));
    let handle = tokio::spawn(agent.run(shutdown.signal()));
    wait(&s, "both running", |s| {
        ids.iter()
            .all(|j| s.get(*j).is_some_and(|j| j.state == JobState::Running))
    })
    .await;
    // The device never stops the first job: the scheduler ends it after the grace.
    s.cancel(ids[0]).unwrap();
    wait(&s, "all final", all_final(&ids)).await;
    let (a, b) = (s.get(ids[0]).unwrap(), s.get(ids[1]).unwrap());
    assert_eq!(a.state, JobState::Canceled);
    // The first report is refused; the second still counts, on its first attempt.
    assert_eq!((b.state, b.attempt), (JobState::Passed, 1));
    shutdown.trigger();
    handle.await.unwrap().unwrap();
    ticker.abort();
}

// ----- per-job timeouts -----

/// A spec for `test` with a `timeout_s` timeout and a single attempt.
fn timed(test: &str, timeout_s: u64) -> JobSpec {
    let mut sp = spec("acme", "v1", test);
    sp.timeout_ms = timeout_s * 1_000;
    sp.max_attempts = 1;
    sp
}

/// How long a job of the test devices below runs: the seconds its test's name ends with
/// (`tests/b-30.spec.js` runs 30 s).
fn secs_of(job: &LeasedJob) -> u64 {
    let name = job.spec.tests[0].trim_end_matches(".spec.js");
    name.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

/// What a test device saw of a job: its test, whether the watch said it timed out, and
/// when the job ended (ms into the batch's run).
type Seen = Arc<Mutex<Vec<(String, bool, u128)>>>;

/// A device of a user's own that knows nothing of timeouts (no real hardware involved): it
/// runs a batch's jobs one after another, each for [`secs_of`] it, and stops a job the watch
/// says must stop, reporting it the way the trait asks for a cancel.
struct Plain {
    seen: Seen,
}

#[async_trait]
impl Device for Plain {
    fn info(&self) -> DeviceInfo {
        emulator_info("plain-1")
    }
    async fn install(&self, _build: &BuildRef) -> Result<(), InfraFailure> {
        Ok(())
    }
    async fn run(
        &self,
        _build: &BuildRef,
        jobs: &[LeasedJob],
        mut cancel: CancelWatch,
    ) -> Vec<qgjob_core::device::JobRun> {
        let start = tokio::time::Instant::now();
        let mut out = Vec::new();
        for job in jobs {
            let secs = secs_of(job);
            let finished = tokio::select! {
                () = cancel.canceled(job.id) => false,
                () = tokio::time::sleep(Duration::from_secs(secs)) => true,
            };
            self.seen.lock().unwrap().push((
                job.spec.tests[0].clone(),
                cancel.timed_out(job.id),
                start.elapsed().as_millis(),
            ));
            out.push(if finished {
                Ok(passed_after(secs * 1_000))
            } else {
                Err(InfraFailure {
                    kind: InfraErrorKind::Other,
                    message: "canceled".into(),
                })
            });
        }
        out
    }
}

#[tokio::test(start_paused = true)]
async fn a_job_past_its_timeout_is_stopped_at_it_retried_and_then_errors() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    // Jobs take 30 s on this device, which leaves timeouts to the agent.
    let dev = Arc::new(SimDevice::new(sim("emu-1", 1_000, 30_000)));
    let mut sp = timed("tests/slow.spec.js", 2);
    sp.max_attempts = 2;
    let id = s.submit(sp).unwrap().job_id;
    let (shutdown, handle) = spawn_agent(Arc::new(s.link()), &[Arc::clone(&dev)], agent_cfg());

    wait(&s, "first attempt running", |s| {
        s.get(id).is_some_and(|j| j.state == JobState::Running)
    })
    .await;
    let leased = s.get(id).unwrap().started_at.unwrap();
    wait(&s, "a second attempt", |s| {
        s.get(id).is_some_and(|j| j.attempt == 2)
    })
    .await;
    let job = s.get(id).unwrap();
    // Stopped 2 s into its run (after the 1 s install), as a timeout, and retried.
    let ended = s.now().since(leased);
    assert!(
        (3_000..3_010).contains(&ended),
        "ended {ended} ms after the lease"
    );
    let why = job.last_error.unwrap();
    assert!(
        why.starts_with("timed out: the tests ran past the job's timeout of 2 s"),
        "{why}"
    );

    wait(&s, "job final", all_final(&[id])).await;
    let job = s.get(id).unwrap();
    assert_eq!((job.state, job.attempt), (JobState::Error, 2));
    // The build stayed installed: the second attempt ran 2 s, not 30.
    let ran = job.finished_at.unwrap().since(job.started_at.unwrap());
    assert!((2_000..2_010).contains(&ran), "ran {ran} ms");
    let err = job.outcome.unwrap().error.unwrap();
    assert!(err.starts_with("timed out: "), "{err}");
    let st = dev.stats();
    assert_eq!((st.timed_out, st.canceled, st.passed), (2, 0, 0), "{st:?}");

    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!((c.infra_failures, c.canceled, c.passed), (2, 0, 0), "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn in_a_batch_only_the_job_past_its_timeout_is_stopped() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    // One after another in one lease: 1 s of a 5 s timeout, 30 s of a 2 s one, 1 s of 5 s.
    let ids: Vec<JobId> = [
        ("tests/a-1.spec.js", 5),
        ("tests/b-30.spec.js", 2),
        ("tests/c-1.spec.js", 5),
    ]
    .iter()
    .map(|(t, timeout)| s.submit(timed(t, *timeout)).unwrap().job_id)
    .collect();
    let seen = Seen::default();
    let mut cfg = agent_cfg();
    cfg.max_batch = 3;
    let agent = Agent::new(Arc::new(s.link()), cfg).with_device(Arc::new(Plain {
        seen: Arc::clone(&seen),
    }));
    let (shutdown, handle) = spawn_built(agent);
    wait(&s, "all final", all_final(&ids)).await;

    let jobs: Vec<Job> = ids.iter().map(|id| s.get(*id).unwrap()).collect();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            ("tests/a-1.spec.js".to_string(), false, 1_000),
            ("tests/b-30.spec.js".to_string(), true, 7_000),
            ("tests/c-1.spec.js".to_string(), false, 8_000),
        ],
        "one batch, in order; only b was told it timed out: once the batch had used a's \
         timeout and its own (so at least its own 2 s after a ended), and c still had its \
         own 5 s after that"
    );
    let leased = jobs[0].started_at.unwrap();
    assert!(
        jobs.iter().all(|j| j.started_at == Some(leased)),
        "one lease"
    );
    assert_eq!(jobs[0].state, JobState::Passed);
    assert_eq!(jobs[2].state, JobState::Passed);
    assert_eq!(jobs[1].state, JobState::Error);
    let err = jobs[1].outcome.clone().unwrap().error.unwrap();
    assert_eq!(
        err,
        "timed out: the tests ran past the job's timeout of 2 s; the agent stopped them"
    );
    shutdown.trigger();
    let c = handle.await.unwrap().unwrap();
    ticker.abort();
    assert_eq!((c.passed, c.infra_failures), (2, 1), "{c:?}");
}

/// A device that holds jobs to their timeouts itself, on a clock of its own that starts
/// after 5 s of set-up (as the real executor's starts with the test command): it reports
/// its own timeout failure (no real hardware involved).
struct OwnClock {
    told_timed_out: Arc<AtomicU64>,
}

#[async_trait]
impl Device for OwnClock {
    fn info(&self) -> DeviceInfo {
        emulator_info("own-clock-1")
    }
    async fn install(&self, _build: &BuildRef) -> Result<(), InfraFailure> {
        Ok(())
    }
    async fn run(
        &self,
        _build: &BuildRef,
        jobs: &[LeasedJob],
        mut cancel: CancelWatch,
    ) -> Vec<qgjob_core::device::JobRun> {
        let mut out = Vec::new();
        for job in jobs {
            let secs = secs_of(job);
            let timeout = Duration::from_millis(job.spec.timeout_ms);
            let run = async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                tokio::time::timeout(timeout, tokio::time::sleep(Duration::from_secs(secs))).await
            };
            let r = tokio::select! {
                () = cancel.canceled(job.id) => Err(InfraFailure {
                    kind: InfraErrorKind::Other,
                    message: "canceled".into(),
                }),
                r = run => match r {
                    Ok(()) => Ok(passed_after(secs * 1_000)),
                    Err(_) => Err(InfraFailure {
                        kind: InfraErrorKind::Timeout,
                        message: "own clock: killed at the job's timeout".into(),
                    }),
                },
            };
            if cancel.timed_out(job.id) {
                self.told_timed_out.fetch_add(1, Ordering::SeqCst);
            }
            out.push(r);
        }
        out
    }
    fn enforces_timeouts(&self) -> bool {
        true
    }
}

#[tokio::test(start_paused = true)]
async fn a_device_that_enforces_timeouts_itself_reports_its_own_failure() {
    let s = shared(SchedulerConfig::default());
    let ticker = s.spawn_ticker();
    let id = s.submit(timed("tests/slow-30.spec.js", 2)).unwrap().job_id;
    let told = Arc::new(AtomicU64::new(0));
    let agent = Agent::new(Arc::new(s.link()), agent_cfg()).with_device(Arc::new(OwnClock {
        told_timed_out: Arc::clone(&told),
    }));
    let (shutdown, handle) = spawn_built(agent);
    wait(&s, "job final", all_final(&[id])).await;

    let job = s.get(id).unwrap();
    assert_eq!(job.state, JobState::Error);
    let err = job.outcome.clone().unwrap().error.unwrap();
    assert_eq!(err, "timed out: own clock: killed at the job's timeout");
    // At its own 2 s after its 5 s of set-up: the agent did not stop it at 2 s.
    let ran = job.finished_at.unwrap().since(job.started_at.unwrap());
    assert_eq!(ran, 7_000);
    assert_eq!(told.load(Ordering::SeqCst), 0);

    shutdown.trigger();
    handle.await.unwrap().unwrap();
    ticker.abort();
}
