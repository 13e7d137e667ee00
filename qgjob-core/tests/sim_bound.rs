//! The lower bound against the true optimum: on tiny random instances, an exhaustive search
//! over every assignment of jobs to devices and every order finds the best makespan; the
//! bound must never exceed it, and no simulated policy may beat it.

use qgjob_core::rng::Rng;
use qgjob_core::sim::{
    self, lower_bound, min_installs_by, BoundJob, SimOutcome, Workload, WorkloadJob, WorkloadPool,
};
use qgjob_core::{AppVersionId, BuildRef, OrgId, PolicyKind, Target, Time};

/// A tiny instance: (submit ms, work ms, build index) per job.
type Inst = Vec<(u64, u64, usize)>;

fn build(b: usize) -> BuildRef {
    BuildRef {
        org_id: OrgId::new("acme").unwrap(),
        app_version_id: AppVersionId::new(format!("b{b}")).unwrap(),
    }
}

/// Makespan of one device running `seq` in order, starting each job as early as allowed:
/// after its submit and the device's previous job, installing when the build changes.
fn run_seq(inst: &Inst, seq: &[usize], install: u64) -> u64 {
    let (mut t, mut installed) = (0u64, None);
    for &j in seq {
        let (submit, work, b) = inst[j];
        let start = t.max(submit);
        let inst_ms = if installed == Some(b) { 0 } else { install };
        installed = Some(b);
        t = start + inst_ms + work;
    }
    t
}

/// Best makespan over every split of the jobs among the devices and every order on each.
fn optimum(inst: &Inst, devices: usize, install: u64) -> u64 {
    let n = inst.len();
    let mut best = u64::MAX;
    let assignments = devices.pow(n as u32);
    for code in 0..assignments {
        let span = split(code, n, devices)
            .iter_mut()
            .map(|jobs| best_order(inst, jobs, install))
            .max()
            .unwrap_or(0);
        best = best.min(span);
    }
    best
}

/// Calls `f` with every order of `a` (Heap's algorithm); once with `a` as it is when empty.
fn for_each_order(a: &mut [usize], f: &mut impl FnMut(&[usize])) {
    fn go(a: &mut [usize], k: usize, f: &mut impl FnMut(&[usize])) {
        if k <= 1 {
            f(a);
            return;
        }
        for i in 0..k {
            go(a, k - 1, f);
            let j = if k.is_multiple_of(2) { i } else { 0 };
            a.swap(j, k - 1);
        }
    }
    let k = a.len();
    go(a, k, f);
}

/// Best makespan of one device over every order of `jobs`.
fn best_order(inst: &Inst, jobs: &mut [usize], install: u64) -> u64 {
    let mut best = u64::MAX;
    for_each_order(jobs, &mut |a| best = best.min(run_seq(inst, a, install)));
    best
}

fn bound_jobs(inst: &Inst) -> Vec<BoundJob> {
    inst.iter()
        .map(|&(s, w, b)| BoundJob {
            submit: Time(s),
            work_ms: w,
            build: build(b),
        })
        .collect()
}

/// The `code`-th way (of `devices^n`) to split `n` jobs among the devices.
fn split(code: usize, n: usize, devices: usize) -> Vec<Vec<usize>> {
    let mut per: Vec<Vec<usize>> = vec![Vec::new(); devices];
    let mut c = code;
    for j in 0..n {
        per[c % devices].push(j);
        c /= devices;
    }
    per
}

fn random_instance(rng: &mut Rng) -> (Inst, usize, u64) {
    let n = 1 + (rng.next_u64() % 6) as usize;
    let devices = 1 + (rng.next_u64() % 3) as usize;
    let builds = 1 + (rng.next_u64() % 3) as usize;
    let install = 1_000 * (rng.next_u64() % 20);
    let inst = (0..n)
        .map(|_| {
            let submit = 1_000 * (rng.next_u64() % 30);
            let work = 1_000 * (1 + rng.next_u64() % 20);
            (submit, work, (rng.next_u64() % builds as u64) as usize)
        })
        .collect();
    (inst, devices, install)
}

/// Random tiny instances the exhaustive search checks.
const CASES: usize = 1000;

#[test]
fn the_bound_never_exceeds_the_optimum_and_no_policy_beats_it() {
    let mut rng = Rng::new(2026);
    let mut tight = 0;
    for case in 0..CASES {
        let (inst, devices, install) = random_instance(&mut rng);
        let opt = optimum(&inst, devices, install);
        let jobs = bound_jobs(&inst);
        let lb = lower_bound(devices as u32, install, &jobs).unwrap();
        let opt_s = opt as f64 / 1000.0;
        assert!(lb <= opt_s, "case {case}: bound {lb} above optimum {opt_s} for {inst:?} on {devices} devices, install {install}");
        if lb == opt_s {
            tight += 1;
        }

        let w = Workload {
            name: format!("tiny-{case}"),
            pools: vec![WorkloadPool {
                target: Target::Emulator,
                devices: devices as u32,
                install_s: install as f64 / 1000.0,
            }],
            jobs: inst
                .iter()
                .map(|&(s, d, b)| WorkloadJob {
                    org_id: OrgId::new("acme").unwrap(),
                    app_version_id: AppVersionId::new(format!("b{b}")).unwrap(),
                    target: Target::Emulator,
                    priority: 0,
                    submit_s: s as f64 / 1000.0,
                    duration_s: d as f64 / 1000.0,
                    outcome: SimOutcome::Passed,
                })
                .collect(),
        };
        for p in PolicyKind::ALL {
            let r = sim::run(&w, p).unwrap();
            assert!(
                r.makespan_s >= opt_s,
                "case {case}: {p} makespan {} beats the optimum {opt_s}",
                r.makespan_s
            );
            assert_eq!(
                r.lower_bound_s, lb,
                "case {case}: report and function agree"
            );
        }
    }
    // The bound is not vacuous: it is often exactly the optimum on instances this small.
    eprintln!("bound tight on {tight} of {CASES} cases");
    assert!(
        tight > CASES / 4,
        "bound tight on only {tight} of {CASES} cases"
    );
}

/// Every (finish, installs) one device can reach by running `jobs` in some order.
fn device_outcomes(inst: &Inst, jobs: &mut [usize], install: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for_each_order(jobs, &mut |a| {
        let installs = a
            .iter()
            .enumerate()
            .filter(|&(i, &j)| i == 0 || inst[a[i - 1]].2 != inst[j].2)
            .count() as u64;
        out.push((run_seq(inst, a, install), installs));
    });
    out
}

#[test]
fn no_schedule_meets_a_deadline_with_fewer_installs_than_the_bound_says() {
    let mut rng = Rng::new(11);
    for case in 0..300 {
        let (mut inst, devices, install) = random_instance(&mut rng);
        inst.truncate(5);
        let jobs = bound_jobs(&inst);
        let n = inst.len();
        for code in 0..devices.pow(n as u32) {
            let mut per = split(code, n, devices);
            // Every combination of one order per device.
            let mut combos: Vec<(u64, u64)> = vec![(0, 0)];
            for jobs_d in per.iter_mut() {
                let outs = device_outcomes(&inst, jobs_d, install);
                combos = combos
                    .iter()
                    .flat_map(|&(f, i)| outs.iter().map(move |&(f2, i2)| (f.max(f2), i + i2)))
                    .collect();
                combos.sort_unstable();
                combos.dedup();
            }
            for (finish, installs) in combos {
                let need = min_installs_by(devices as u32, install, &jobs, finish);
                assert!(
                    need.is_some_and(|k| k <= installs),
                    "case {case}: a schedule ends at {finish} with {installs} installs, \
                     but the bound says {need:?} for {inst:?} on {devices} devices, install {install}"
                );
            }
        }
    }
}
