//! The physics of the simulated lab, checked attempt by attempt on generated workloads: a
//! device runs one attempt at a time, installs exactly when its build changes, attempts take
//! install + run time, retries follow failures at once, and the report's figures are what
//! the trace shows.

use std::collections::BTreeMap;

use qgjob_core::sim::{self, AttemptRecord, AttemptResult, Shape, SimOutcome, Workload};
use qgjob_core::{BuildRef, DeviceId, PolicyKind, Target};

fn ms(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

fn check(w: &Workload, policy: PolicyKind) {
    let (report, trace) = sim::run_traced(w, policy).unwrap();
    let ctx = format!("{} under {policy}", w.name);
    let infra = w
        .jobs
        .iter()
        .filter(|j| j.outcome == SimOutcome::InfraErrorOnce)
        .count();
    assert_eq!(
        trace.len(),
        w.jobs.len() + infra,
        "{ctx}: one attempt per job, two for infra"
    );
    assert_eq!(
        trace.iter().filter(|a| a.install).count() as u64,
        report.installs,
        "{ctx}"
    );
    assert!(
        trace.windows(2).all(|p| p[0].start_ms <= p[1].start_ms),
        "{ctx}: start order"
    );

    let pool_of = |t: &Target| w.pools.iter().find(|p| &p.target == t).unwrap();

    // Each attempt: on a device of its pool, after its release, for install + run time.
    for a in &trace {
        let j = &w.jobs[a.job];
        let pool = pool_of(&j.target);
        assert!(
            a.device.as_str().starts_with(&format!("{}-", j.target)),
            "{ctx}: job {} ran on {}",
            a.job,
            a.device
        );
        assert!(a.start_ms >= a.released_ms, "{ctx}: {a:?}");
        let d = ms(j.duration_s);
        let run = if a.result == AttemptResult::InfraError {
            d / 2
        } else {
            d
        };
        let install = if a.install { ms(pool.install_s) } else { 0 };
        assert_eq!(a.end_ms, a.start_ms + install + run, "{ctx}: {a:?}");
        let want = match (j.outcome, a.attempt) {
            (SimOutcome::InfraErrorOnce, 1) => AttemptResult::InfraError,
            (SimOutcome::Failed, 1) => AttemptResult::Failed,
            (SimOutcome::Passed, 1) | (SimOutcome::InfraErrorOnce, 2) => AttemptResult::Passed,
            other => panic!("{ctx}: unexpected attempt {other:?}"),
        };
        assert_eq!(a.result, want, "{ctx}: {a:?}");
    }

    // Per job: attempt 1 released at submit; the retry released when attempt 1 failed.
    let mut by_job: BTreeMap<usize, Vec<&AttemptRecord>> = BTreeMap::new();
    for a in &trace {
        by_job.entry(a.job).or_default().push(a);
    }
    assert_eq!(by_job.len(), w.jobs.len(), "{ctx}: every job ran");
    for (j, atts) in &by_job {
        assert_eq!(atts[0].attempt, 1);
        assert_eq!(atts[0].released_ms, ms(w.jobs[*j].submit_s), "{ctx}");
        for p in atts.windows(2) {
            assert_eq!(p[1].attempt, p[0].attempt + 1, "{ctx}");
            assert_eq!(p[1].released_ms, p[0].end_ms, "{ctx}: no backoff");
        }
    }

    // Per device: one attempt at a time; an install exactly when the build changes.
    let mut by_dev: BTreeMap<&DeviceId, Vec<&AttemptRecord>> = BTreeMap::new();
    for a in &trace {
        by_dev.entry(&a.device).or_default().push(a);
    }
    for (dev, atts) in &by_dev {
        let mut installed: Option<BuildRef> = None;
        let mut free_at = 0;
        for a in atts {
            assert!(
                a.start_ms >= free_at,
                "{ctx}: {dev} overlaps at {}",
                a.start_ms
            );
            free_at = a.end_ms;
            let build = w.jobs[a.job].build();
            assert_eq!(
                a.install,
                installed.as_ref() != Some(&build),
                "{ctx}: {dev} install flag at {}",
                a.start_ms
            );
            installed = Some(build);
        }
    }

    // The report's makespan and waits are the trace's.
    for p in &report.pools {
        let mine: Vec<&AttemptRecord> = trace
            .iter()
            .filter(|a| w.jobs[a.job].target == p.target)
            .collect();
        let end = mine.iter().map(|a| a.end_ms).max().unwrap_or(0);
        assert_eq!(p.makespan_s, end as f64 / 1000.0, "{ctx}: {}", p.target);
        let mut waits: Vec<u64> = mine.iter().map(|a| a.start_ms - a.released_ms).collect();
        waits.sort_unstable();
        let max = waits.last().copied().unwrap_or(0);
        assert_eq!(p.wait_s.max, max as f64 / 1000.0, "{ctx}");
        if !waits.is_empty() {
            let rank = (0.95 * waits.len() as f64).ceil() as usize;
            assert_eq!(p.wait_s.p95, waits[rank - 1] as f64 / 1000.0, "{ctx}");
        }
        let busy: u64 = mine.iter().map(|a| a.end_ms - a.start_ms).sum();
        if end > 0 {
            let util = busy as f64 / (f64::from(p.devices) * end as f64);
            assert!((p.utilization - util).abs() < 1e-9, "{ctx}");
        }
    }
}

#[test]
fn traces_obey_the_lab_rules() {
    for shape in Shape::ALL {
        for seed in 100..106 {
            let w = sim::generate(shape, seed);
            for p in PolicyKind::ALL {
                check(&w, p);
            }
        }
    }
}

#[test]
fn the_trace_does_not_change_the_report() {
    let w = sim::generate(Shape::Bursty, 5);
    for p in PolicyKind::ALL {
        let (r, _) = sim::run_traced(&w, p).unwrap();
        assert_eq!(r, sim::run(&w, p).unwrap());
    }
}
