//! The simulator on tiny hand-computed workloads (exact makespan, installs, waits and lower
//! bound), plus determinism.

use qgjob_core::sim::{self, Workload};
use qgjob_core::{PolicyKind, Target};

fn workload(json: &str) -> Workload {
    Workload::from_json(json).unwrap()
}

/// One device, install 5 s; builds A, B, A submitted at t=0 in that order (10, 20, 30 s).
const ABA: &str = r#"{"name": "aba",
  "pools": [{"target": "emulator", "devices": 1, "install_s": 5}],
  "jobs": [
    {"org_id": "acme", "app_version_id": "a", "target": "emulator", "priority": 0,
     "submit_s": 0, "duration_s": 10, "outcome": "passed"},
    {"org_id": "acme", "app_version_id": "b", "target": "emulator", "priority": 0,
     "submit_s": 0, "duration_s": 20, "outcome": "passed"},
    {"org_id": "acme", "app_version_id": "a", "target": "emulator", "priority": 0,
     "submit_s": 0, "duration_s": 30, "outcome": "passed"}]}"#;

#[test]
fn affinity_saves_an_install_on_one_device() {
    let w = workload(ABA);
    // Lower bound: all 60 s of work plus two installs on one device.
    // FIFO runs A, B, A: three installs, 5+10+5+20+5+30 = 75 s.
    let fifo = sim::run(&w, PolicyKind::Fifo).unwrap();
    assert_eq!((fifo.makespan_s, fifo.installs), (75.0, 3));
    assert_eq!(fifo.lower_bound_s, 70.0);
    // Waits: A1 starts at 0, B at 15, A2 at 40.
    assert_eq!(
        (fifo.wait_s.p50, fifo.wait_s.p95, fifo.wait_s.max),
        (15.0, 40.0, 40.0)
    );
    assert_eq!(fifo.utilization, 1.0);
    // Grouped and per-group keep the device on A: A, A, B = 5+10+30+5+20 = 70 s, 2 installs.
    for p in [PolicyKind::Grouped, PolicyKind::PerGroup] {
        let r = sim::run(&w, p).unwrap();
        assert_eq!(
            (r.makespan_s, r.installs, r.min_installs),
            (70.0, 2, 2),
            "{p}"
        );
        assert_eq!(r.lower_bound_s, 70.0);
        // Waits 0 (A1), 15 (A2), 45 (B).
        assert_eq!((r.wait_s.p50, r.wait_s.max), (15.0, 45.0), "{p}");
    }
}

/// One device, install 4 s: X (10 s, infra error once) then Y (6 s), same build, at t=0.
const RETRY: &str = r#"{"name": "retry",
  "pools": [{"target": "device", "devices": 1, "install_s": 4}],
  "jobs": [
    {"org_id": "acme", "app_version_id": "v1", "target": "device", "priority": 2,
     "submit_s": 0, "duration_s": 10, "outcome": "infra_error_once"},
    {"org_id": "acme", "app_version_id": "v1", "target": "device", "priority": 0,
     "submit_s": 0, "duration_s": 6, "outcome": "passed"}]}"#;

#[test]
fn infra_error_once_fails_after_half_then_retries() {
    let w = workload(RETRY);
    for p in PolicyKind::ALL {
        let r = sim::run(&w, p).unwrap();
        // X: install 4 + 5 (fails at 9), retried at once (X is more urgent than Y):
        // 9..19; Y: 19..25. One install.
        assert_eq!((r.jobs, r.finished), (2, 2));
        assert_eq!(
            (r.makespan_s, r.installs, r.min_installs),
            (25.0, 1, 1),
            "{p}"
        );
        // Bound: 15 + 6 of work + one install = 25 s.
        assert_eq!(r.lower_bound_s, 25.0);
        assert_eq!(r.utilization, 1.0);
        // Samples: X attempt 1 waits 0, its retry 0 (released at 9, started at 9), Y 19.
        let x = r.wait_s_by_priority[&2];
        assert_eq!((x.p50, x.p95, x.max), (0.0, 0.0, 0.0));
        let y = r.wait_s_by_priority[&0];
        assert_eq!((y.p50, y.max), (19.0, 19.0));
        assert_eq!(
            (r.wait_s.p50, r.wait_s.p95, r.wait_s.max),
            (0.0, 19.0, 19.0)
        );
    }
}

/// Two pools never share devices; late submissions wait for their time.
const TWO_POOLS: &str = r#"{"name": "two-pools",
  "pools": [{"target": "emulator", "devices": 2, "install_s": 10},
            {"target": "browserstack", "devices": 1, "install_s": 30}],
  "jobs": [
    {"org_id": "a", "app_version_id": "v1", "target": "emulator", "priority": 0,
     "submit_s": 0, "duration_s": 20, "outcome": "passed"},
    {"org_id": "b", "app_version_id": "v9", "target": "emulator", "priority": 0,
     "submit_s": 0, "duration_s": 40, "outcome": "failed"},
    {"org_id": "a", "app_version_id": "v1", "target": "browserstack", "priority": 5,
     "submit_s": 100, "duration_s": 12.5, "outcome": "passed"}]}"#;

#[test]
fn pools_are_separate_and_late_jobs_wait_for_their_time() {
    let w = workload(TWO_POOLS);
    for p in PolicyKind::ALL {
        let r = sim::run(&w, p).unwrap();
        let emu = r.pool(&Target::Emulator).unwrap();
        let bs = r.pool(&Target::Browserstack).unwrap();
        // Emulators: one build per device, both start at 0: finishes at 30 and 50.
        assert_eq!(
            (emu.makespan_s, emu.installs, emu.min_installs),
            (50.0, 2, 2),
            "{p}"
        );
        assert_eq!(emu.lower_bound_s, 50.0);
        assert_eq!(emu.utilization, 80.0 / 100.0);
        assert_eq!((emu.jobs, emu.finished, emu.devices), (2, 2, 2));
        // BrowserStack: submitted at 100, 30 s upload, 12.5 s run.
        assert_eq!((bs.makespan_s, bs.installs), (142.5, 1), "{p}");
        assert_eq!(bs.lower_bound_s, 142.5);
        assert_eq!(bs.wait_s.max, 0.0);
        // Its utilization counts from t=0, like the makespan.
        assert_eq!(bs.utilization, 42.5 / 142.5);
        // Overall: the last finish anywhere; min installs summed over pools.
        assert_eq!((r.makespan_s, r.lower_bound_s), (142.5, 142.5));
        assert_eq!((r.installs, r.min_installs, r.finished), (3, 3, 3));
        assert_eq!(r.utilization, (80.0 + 42.5) / (3.0 * 142.5));
        assert_eq!(r.pools[0].target, Target::Emulator, "workload order");
    }
}

#[test]
fn same_input_same_report() {
    for shape in sim::Shape::ALL {
        let w = sim::generate(shape, 3);
        for p in PolicyKind::ALL {
            let a = sim::run(&w, p).unwrap();
            let b = sim::run(&w.clone(), p).unwrap();
            assert_eq!(a, b, "{shape} {p}");
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                serde_json::to_string(&b).unwrap()
            );
        }
    }
}

#[test]
fn a_workload_survives_a_json_round_trip_with_the_same_report() {
    let w = sim::generate(sim::Shape::Bursty, 11);
    let back = Workload::from_json(&w.to_json()).unwrap();
    assert_eq!(back, w);
    assert_eq!(
        sim::run(&w, PolicyKind::Grouped).unwrap(),
        sim::run(&back, PolicyKind::Grouped).unwrap()
    );
}
