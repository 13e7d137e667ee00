//! Workload format v1: the documented sample parses and runs, bad workloads are refused with an
//! error naming the offending entry, and the report has exactly the documented fields.

use qgjob_core::sim::{self, SimError, SimOutcome, Workload};
use qgjob_core::{PolicyKind, Target};

const SAMPLE: &str = r#"{ "name": "w1",
  "pools": [ {"target": "emulator", "devices": 8, "install_s": 45.0} ],
  "jobs":  [ {"org_id": "acme", "app_version_id": "v1", "target": "emulator",
              "priority": 3, "submit_s": 0.0, "duration_s": 32.5, "outcome": "passed"} ] }"#;

/// The sample with one substitution applied (to break exactly one thing).
fn sample_with(from: &str, to: &str) -> String {
    assert!(SAMPLE.contains(from), "{from} not in sample");
    SAMPLE.replacen(from, to, 1)
}

#[test]
fn documented_sample_parses_and_runs() {
    let w = Workload::from_json(SAMPLE).unwrap();
    assert_eq!(w.name, "w1");
    assert_eq!(w.pools.len(), 1);
    assert_eq!(w.pools[0].target, Target::Emulator);
    assert_eq!(w.pools[0].devices, 8);
    assert_eq!(w.jobs[0].priority, 3);
    assert_eq!(w.jobs[0].outcome, SimOutcome::Passed);
    for policy in PolicyKind::ALL {
        let r = sim::run(&w, policy).unwrap();
        assert_eq!(r.policy, policy);
        assert_eq!(
            (r.jobs, r.finished, r.installs, r.min_installs),
            (1, 1, 1, 1)
        );
        // One job: 45 s install + 32.5 s run, which is also the lower bound.
        assert_eq!(r.makespan_s, 77.5);
        assert_eq!(r.lower_bound_s, 77.5);
        assert_eq!(r.wait_s.max, 0.0);
        // One device of eight busy the whole time.
        assert_eq!(r.utilization, 1.0 / 8.0);
        assert_eq!(r.pools[0].makespan_s, 77.5);
    }
}

#[test]
fn report_json_has_exactly_the_documented_fields() {
    let w = Workload::from_json(SAMPLE).unwrap();
    let r = sim::run(&w, PolicyKind::Grouped).unwrap();
    let v = serde_json::to_value(&r).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let mut figures = vec![
        "jobs",
        "finished",
        "makespan_s",
        "lower_bound_s",
        "installs",
        "min_installs",
        "utilization",
        "wait_s",
        "wait_s_by_priority",
    ];
    let mut top: Vec<String> = figures.iter().map(|s| s.to_string()).collect();
    top.extend(["policy".to_string(), "pools".to_string()]);
    top.sort();
    assert_eq!(keys(&v), top);
    assert_eq!(v["policy"], "grouped");
    assert_eq!(keys(&v["wait_s"]), ["max", "p50", "p95"]);
    assert_eq!(keys(&v["wait_s_by_priority"]), ["3"]);
    assert_eq!(keys(&v["wait_s_by_priority"]["3"]), ["max", "p50", "p95"]);
    figures.extend(["target", "devices"]);
    let mut pool_keys: Vec<String> = figures.iter().map(|s| s.to_string()).collect();
    pool_keys.sort();
    assert_eq!(keys(&v["pools"][0]), pool_keys);
    assert_eq!(v["pools"][0]["target"], "emulator");
    assert_eq!(v["pools"][0]["devices"], 8);
    // And it reads back.
    let back: sim::Report = serde_json::from_value(v).unwrap();
    assert_eq!(back, r);
    assert_eq!(
        sim::run(&w, PolicyKind::PerGroup)
            .unwrap()
            .policy
            .to_string(),
        "per-group"
    );
}

#[test]
fn bad_pools_are_named() {
    let cases: [(&str, &str, &str); 4] = [
        (r#""devices": 8"#, r#""devices": 0"#, "devices"),
        (r#""devices": 8"#, r#""devices": 10001"#, "devices"),
        (r#""devices": 8"#, r#""devices": -2"#, "devices"),
        (r#""install_s": 45.0"#, r#""install_s": -1"#, "install_s"),
    ];
    for (from, to, want) in cases {
        match Workload::from_json(&sample_with(from, to)) {
            Err(SimError::InvalidPool {
                index: 0, field, ..
            }) => assert_eq!(field, want),
            other => panic!("{to}: expected InvalidPool({want}), got {other:?}"),
        }
    }
    let bad_target = sample_with(
        r#""target": "emulator", "devices""#,
        r#""target": "Emu!", "devices""#,
    );
    assert!(matches!(
        Workload::from_json(&bad_target),
        Err(SimError::InvalidPool {
            index: 0,
            field: "target",
            ..
        })
    ));
}

#[test]
fn duplicate_pool_is_refused() {
    let dup = sample_with(
        r#"{"target": "emulator", "devices": 8, "install_s": 45.0} ]"#,
        r#"{"target": "emulator", "devices": 8, "install_s": 45.0},
            {"target": "device", "devices": 1, "install_s": 1.0},
            {"target": "emulator", "devices": 2, "install_s": 5.0} ]"#,
    );
    assert_eq!(
        Workload::from_json(&dup),
        Err(SimError::DuplicatePool {
            index: 2,
            target: "emulator".into()
        })
    );
}

#[test]
fn bad_jobs_are_named() {
    let cases: [(&str, &str, &str); 7] = [
        (r#""org_id": "acme""#, r#""org_id": "ac me""#, "org_id"),
        (
            r#""app_version_id": "v1""#,
            r#""app_version_id": """#,
            "app_version_id",
        ),
        (r#""priority": 3"#, r#""priority": 5000"#, "priority"),
        (r#""submit_s": 0.0"#, r#""submit_s": -0.5"#, "submit_s"),
        (r#""duration_s": 32.5"#, r#""duration_s": -3"#, "duration_s"),
        (
            r#""duration_s": 32.5"#,
            r#""duration_s": 1e12"#,
            "duration_s",
        ),
        (
            r#""target": "emulator",
              "priority""#,
            r#""target": "not a target",
              "priority""#,
            "target",
        ),
    ];
    for (from, to, want) in cases {
        match Workload::from_json(&sample_with(from, to)) {
            Err(SimError::InvalidJob {
                index: 0,
                field,
                message,
            }) => {
                assert_eq!(field, want, "{to}: {message}")
            }
            other => panic!("{to}: expected InvalidJob({want}), got {other:?}"),
        }
    }
}

#[test]
fn unknown_outcome_and_missing_pool() {
    assert_eq!(
        Workload::from_json(&sample_with(r#""passed""#, r#""flaky""#)),
        Err(SimError::UnknownOutcome {
            index: 0,
            value: "flaky".into()
        })
    );
    let other = sample_with(
        r#""target": "emulator",
              "priority""#,
        r#""target": "browserstack",
              "priority""#,
    );
    assert_eq!(
        Workload::from_json(&other),
        Err(SimError::NoPool {
            index: 0,
            target: "browserstack".into()
        })
    );
}

#[test]
fn malformed_json_is_a_json_error() {
    for text in [
        "",
        "[]",
        "{\"name\": \"x\"}",
        &sample_with(r#""devices": 8"#, r#""devices": 2.5"#),
        &sample_with(r#""priority": 3, "#, ""),
    ] {
        assert!(
            matches!(Workload::from_json(text), Err(SimError::Json(_))),
            "{text}"
        );
    }
}

#[test]
fn programmatic_workloads_are_checked_by_run() {
    let mut w = Workload::from_json(SAMPLE).unwrap();
    w.jobs[0].duration_s = f64::NAN;
    assert!(matches!(
        sim::run(&w, PolicyKind::Grouped),
        Err(SimError::InvalidJob {
            field: "duration_s",
            ..
        })
    ));
    let mut w = Workload::from_json(SAMPLE).unwrap();
    w.pools[0].install_s = f64::INFINITY;
    assert!(matches!(
        w.validate(),
        Err(SimError::InvalidPool {
            field: "install_s",
            ..
        })
    ));
    let mut w = Workload::from_json(SAMPLE).unwrap();
    w.pools[0].devices = 0;
    assert!(sim::run(&w, PolicyKind::Fifo).is_err());
}

#[test]
fn errors_read_well() {
    let e = Workload::from_json(&sample_with(r#""devices": 8"#, r#""devices": 0"#)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "pools[0].devices: must be at least 1 (got 0)"
    );
    let e = Workload::from_json(&sample_with(r#""passed""#, r#""flaky""#)).unwrap_err();
    assert!(e
        .to_string()
        .starts_with("jobs[0].outcome: unknown outcome \"flaky\""));
}

#[test]
fn an_empty_workload_reports_zeros() {
    let w = Workload::from_json(r#"{"name":"e","pools":[],"jobs":[]}"#).unwrap();
    let r = sim::run(&w, PolicyKind::Grouped).unwrap();
    assert_eq!((r.jobs, r.finished, r.installs), (0, 0, 0));
    assert_eq!(
        (r.makespan_s, r.lower_bound_s, r.utilization),
        (0.0, 0.0, 0.0)
    );
    assert!(r.pools.is_empty() && r.wait_s_by_priority.is_empty());
}
