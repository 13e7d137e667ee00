//! Invariants of every simulation over generated workloads: 30 seeds of each shape under
//! each policy. Whatever the policy decides, every job finishes, no schedule beats the lower
//! bound, and no pool installs fewer builds than it has.

use qgjob_core::sim::{self, Report, Shape, Workload};
use qgjob_core::PolicyKind;

const SEEDS: u64 = 30;

fn check(w: &Workload, r: &Report) {
    let ctx = format!("{} under {}", w.name, r.policy);
    assert_eq!(r.jobs, w.jobs.len() as u64, "{ctx}");
    assert_eq!(r.finished, r.jobs, "{ctx}: every job finishes");
    assert!(
        r.makespan_s >= r.lower_bound_s,
        "{ctx}: makespan {} below the lower bound {}",
        r.makespan_s,
        r.lower_bound_s
    );
    assert!(r.installs >= r.min_installs, "{ctx}");
    assert!(
        r.utilization > 0.0 && r.utilization <= 1.0,
        "{ctx}: {}",
        r.utilization
    );
    assert!(
        r.wait_s.p50 <= r.wait_s.p95 && r.wait_s.p95 <= r.wait_s.max,
        "{ctx}"
    );
    assert_eq!(r.pools.len(), w.pools.len(), "{ctx}");
    let mut jobs = 0;
    for p in &r.pools {
        let pctx = format!("{ctx}, pool {}", p.target);
        jobs += p.jobs;
        assert_eq!(p.finished, p.jobs, "{pctx}");
        assert!(p.makespan_s >= p.lower_bound_s, "{pctx}");
        assert!(p.installs >= p.min_installs, "{pctx}");
        assert!(p.makespan_s <= r.makespan_s, "{pctx}");
        assert!(p.lower_bound_s <= r.lower_bound_s, "{pctx}");
        assert!(p.utilization <= 1.0, "{pctx}: {}", p.utilization);
        if p.jobs > 0 {
            // Every job needs at least one install and its work before it can finish.
            assert!(p.min_installs >= 1 && p.lower_bound_s > 0.0, "{pctx}");
        }
    }
    assert_eq!(jobs, r.jobs, "{ctx}: pools account for every job");
    assert_eq!(
        r.installs,
        r.pools.iter().map(|p| p.installs).sum::<u64>(),
        "{ctx}"
    );
}

fn shape_holds(shape: Shape) {
    for seed in 0..SEEDS {
        let w = sim::generate(shape, seed);
        for policy in PolicyKind::ALL {
            let r = sim::run(&w, policy).unwrap();
            check(&w, &r);
        }
    }
}

#[test]
fn few_big_groups_hold() {
    shape_holds(Shape::FewBigGroups);
}

#[test]
fn many_small_groups_hold() {
    shape_holds(Shape::ManySmallGroups);
}

#[test]
fn uniform_holds() {
    shape_holds(Shape::Uniform);
}

#[test]
fn bursty_holds() {
    shape_holds(Shape::Bursty);
}
