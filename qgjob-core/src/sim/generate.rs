//! Seeded workload generator: workloads of a few recognisable shapes, for tests, benches and
//! policy comparisons. The same shape and seed always give the same workload.

use std::fmt;
use std::str::FromStr;

use super::workload::{SimOutcome, Workload, WorkloadJob, WorkloadPool};
use crate::error::InvalidSpec;
use crate::model::{AppVersionId, OrgId, Target};
use crate::rng::Rng;

/// The kind of workload to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    /// A few builds with hundreds of jobs each, submitted as whole runs (nightly suites).
    FewBigGroups,
    /// Many builds with a handful of jobs each, arriving over time (pull-request smoke tests).
    ManySmallGroups,
    /// Jobs of a moderate number of builds, each arriving at a uniformly random time.
    Uniform,
    /// One org's huge low-priority run at the start, then bursts of small urgent runs from
    /// other orgs, with some medium runs of middling priority.
    Bursty,
    /// A few builds of a few jobs each (2 to 24), each job about an install long, arriving
    /// tens of seconds apart on small pools: a team's afternoon, like the sample workload
    /// of the brief. Every other shape has hundreds of jobs or more.
    Small,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 5] = [
        Shape::FewBigGroups,
        Shape::ManySmallGroups,
        Shape::Uniform,
        Shape::Bursty,
        Shape::Small,
    ];

    /// The shape's name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::FewBigGroups => "few-big-groups",
            Shape::ManySmallGroups => "many-small-groups",
            Shape::Uniform => "uniform",
            Shape::Bursty => "bursty",
            Shape::Small => "small",
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Shape {
    type Err = InvalidSpec;
    fn from_str(s: &str) -> Result<Self, InvalidSpec> {
        Shape::ALL
            .into_iter()
            .find(|sh| sh.as_str() == s)
            .ok_or_else(|| {
                InvalidSpec::new(
                    "shape",
                    "must be few-big-groups, many-small-groups, uniform, bursty or small",
                )
            })
    }
}

/// Fewest and most jobs a generated workload has.
const MIN_JOBS: usize = 100;
const MAX_JOBS: usize = 3000;

/// Generates a workload of `shape` from `seed`: 1–3 target pools of 2–16 devices with
/// installs of 10–120 s, 100–3000 jobs of 5–300 s (most short, a long tail), about 4%
/// `failed` and 3% `infra_error_once`; [`Shape::Small`] differs (see `small`).
pub fn generate(shape: Shape, seed: u64) -> Workload {
    // Mix the shape into the seed so seed 1 of two shapes are unrelated workloads.
    let salt = match shape {
        Shape::FewBigGroups => 0x1111,
        Shape::ManySmallGroups => 0x2222,
        Shape::Uniform => 0x3333,
        Shape::Bursty => 0x4444,
        Shape::Small => 0x5555,
    };
    let mut g = Gen(Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt));
    let mut plan = Plan::default();
    let pools = if shape == Shape::Small {
        small(&mut g, &mut plan)
    } else {
        g.pools()
    };
    match shape {
        Shape::FewBigGroups => few_big_groups(&mut g, &pools, &mut plan),
        Shape::ManySmallGroups => many_small_groups(&mut g, &pools, &mut plan),
        Shape::Uniform => uniform(&mut g, &pools, &mut plan),
        Shape::Bursty => bursty(&mut g, &pools, &mut plan),
        // Planned with its pools.
        Shape::Small => {}
    }
    plan.into_workload(format!("{shape}-{seed}"), pools)
}

/// The seeded RNG with the few draws the generator needs.
struct Gen(Rng);

impl Gen {
    /// An integer in `lo..=hi`.
    fn int(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.0.next_u64() % (hi - lo + 1)
    }

    fn usize(&mut self, lo: usize, hi: usize) -> usize {
        self.int(lo as u64, hi as u64) as usize
    }

    /// A float in `[lo, hi)`.
    fn float(&mut self, lo: f64, hi: f64) -> f64 {
        lo + self.0.next_f64() * (hi - lo)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.0.next_f64() < p
    }

    /// Log-uniform in `[lo, hi)`: as many short values per octave as long ones.
    fn log_uniform(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + self.0.next_f64() * (hi.ln() - lo.ln())).exp()
    }

    /// 1 pool most of the time, sometimes 2 or 3.
    fn pools(&mut self) -> Vec<WorkloadPool> {
        let roll = self.0.next_f64();
        let n = if roll < 0.65 {
            1
        } else if roll < 0.9 {
            2
        } else {
            3
        };
        let all = [Target::Emulator, Target::Device, Target::Browserstack];
        let first = self.usize(0, 2);
        (0..n)
            .map(|k| WorkloadPool {
                target: all[(first + k) % 3].clone(),
                devices: self.int(2, 16) as u32,
                install_s: round_to(self.float(10.0, 120.0), 0.5),
            })
            .collect()
    }

    /// A typical run time for a build's tests, seconds.
    fn base_duration(&mut self) -> f64 {
        self.log_uniform(8.0, 150.0)
    }

    /// One job's run time around its build's typical one: within a factor of two, with an
    /// occasional long straggler; 5–300 s.
    fn duration(&mut self, base: f64) -> f64 {
        let mut d = base * 2f64.powf(self.float(-1.0, 1.0));
        if self.chance(0.08) {
            d *= self.float(1.5, 3.0);
        }
        round_to(d.clamp(5.0, 300.0), 0.1)
    }

    fn outcome(&mut self) -> SimOutcome {
        self.outcome_at(0.04, 0.03)
    }

    /// `failed` with probability `failed`, `infra_error_once` with `infra`, else `passed`.
    fn outcome_at(&mut self, failed: f64, infra: f64) -> SimOutcome {
        let r = self.0.next_f64();
        if r < failed {
            SimOutcome::Failed
        } else if r < failed + infra {
            SimOutcome::InfraErrorOnce
        } else {
            SimOutcome::Passed
        }
    }
}

fn round_to(v: f64, step: f64) -> f64 {
    // Round through an integer count of steps so the decimal form stays short.
    let n = (v / step).round();
    (n * step * 1000.0).round() / 1000.0
}

/// A build group being planned.
struct GroupPlan {
    org: usize,
    pool: usize,
    priority: i32,
    base_s: f64,
}

/// A job being planned.
struct JobPlan {
    group: usize,
    duration_s: f64,
    outcome: SimOutcome,
    submit_s: f64,
    /// Its own priority, where not its group's.
    priority: Option<i32>,
}

#[derive(Default)]
struct Plan {
    groups: Vec<GroupPlan>,
    jobs: Vec<JobPlan>,
}

impl Plan {
    /// Adds a group and returns its index.
    fn group(&mut self, g: &mut Gen, org: usize, pool: usize, priority: i32) -> usize {
        let base_s = g.base_duration();
        self.groups.push(GroupPlan {
            org,
            pool,
            priority,
            base_s,
        });
        self.groups.len() - 1
    }

    /// Adds `n` jobs of `group`, all submitted within `spread_s` after `at_s`.
    fn run(&mut self, g: &mut Gen, group: usize, n: usize, at_s: f64, spread_s: f64) {
        let base = self.groups[group].base_s;
        for _ in 0..n {
            let duration_s = g.duration(base);
            let outcome = g.outcome();
            let submit_s = round_to(at_s + g.float(0.0, spread_s), 0.1);
            self.jobs.push(JobPlan {
                group,
                duration_s,
                outcome,
                submit_s,
                priority: None,
            });
        }
    }

    /// The time the busiest pool needs to work through every planned job (runs plus one
    /// install per build), seconds: the scale for arrival times.
    fn horizon(&self, pools: &[WorkloadPool]) -> f64 {
        let mut work = vec![0f64; pools.len()];
        for j in &self.jobs {
            work[self.groups[j.group].pool] += j.duration_s;
        }
        for gr in &self.groups {
            work[gr.pool] += pools[gr.pool].install_s;
        }
        pools
            .iter()
            .zip(&work)
            .map(|(p, w)| w / f64::from(p.devices))
            .fold(0.0, f64::max)
    }

    fn into_workload(mut self, name: String, pools: Vec<WorkloadPool>) -> Workload {
        // Submission order, as a real trace would be written; stable for equal times.
        self.jobs.sort_by(|a, b| a.submit_s.total_cmp(&b.submit_s));
        let jobs = self
            .jobs
            .iter()
            .map(|j| {
                let gr = &self.groups[j.group];
                WorkloadJob {
                    // `org-<n>` and `build-<n>` are valid names whatever the seed.
                    org_id: OrgId::new(format!("org-{}", gr.org + 1)).expect("valid org name"),
                    app_version_id: AppVersionId::new(format!("build-{}", j.group + 1))
                        .expect("valid version name"),
                    target: pools[gr.pool].target.clone(),
                    priority: j.priority.unwrap_or(gr.priority),
                    submit_s: j.submit_s,
                    duration_s: j.duration_s,
                    outcome: j.outcome,
                }
            })
            .collect();
        Workload { name, pools, jobs }
    }
}

/// A few builds of hundreds of jobs, each submitted at once, most at the start.
fn few_big_groups(g: &mut Gen, pools: &[WorkloadPool], plan: &mut Plan) {
    let total = g.usize(300, MAX_JOBS);
    let n_groups = g.usize(2, 6);
    let orgs = g.usize(1, 3);
    let weights: Vec<f64> = (0..n_groups).map(|_| g.float(0.5, 1.5)).collect();
    let sum: f64 = weights.iter().sum();
    let mut groups = Vec::new();
    for (k, w) in weights.iter().enumerate() {
        let prio = if g.chance(0.25) {
            g.int(1, 5) as i32
        } else {
            0
        };
        let pool = g.usize(0, pools.len() - 1);
        let gi = plan.group(g, k % orgs, pool, prio);
        let n = ((total as f64 * w / sum) as usize).max(20);
        plan.run(g, gi, n, 0.0, 0.0);
        groups.push((gi, plan.jobs.len() - n, n));
    }
    // Now that the size is known, start some runs later (within half the horizon).
    let h = plan.horizon(pools);
    for (k, &(_, start, n)) in groups.iter().enumerate() {
        let at = if k == 0 || g.chance(0.5) {
            0.0
        } else {
            g.float(0.0, h * 0.5)
        };
        let spread = g.float(0.0, 10.0);
        for j in &mut plan.jobs[start..start + n] {
            j.submit_s = round_to(at + g.float(0.0, spread), 0.1);
        }
    }
    cap(plan);
}

/// Many builds of 1–12 jobs, each build's jobs together, builds arriving over time.
fn many_small_groups(g: &mut Gen, pools: &[WorkloadPool], plan: &mut Plan) {
    let target_groups = g.usize(40, 300);
    let orgs = g.usize(3, 10);
    let mut runs = Vec::new();
    while (plan.groups.len() < target_groups || plan.jobs.len() < MIN_JOBS)
        && plan.jobs.len() < MAX_JOBS
    {
        let prio = if g.chance(0.15) {
            g.int(4, 8) as i32
        } else {
            g.int(0, 3) as i32
        };
        let pool = g.usize(0, pools.len() - 1);
        let org = g.usize(0, orgs - 1);
        let gi = plan.group(g, org, pool, prio);
        let n = g.usize(1, 12).min(MAX_JOBS - plan.jobs.len());
        let start = plan.jobs.len();
        plan.run(g, gi, n, 0.0, 0.0);
        runs.push((start, n));
    }
    let h = plan.horizon(pools) * g.float(0.3, 1.0);
    for &(start, n) in &runs {
        let at = g.float(0.0, h);
        let spread = g.float(0.0, 3.0);
        for j in &mut plan.jobs[start..start + n] {
            j.submit_s = round_to(at + g.float(0.0, spread), 0.1);
        }
    }
}

/// Jobs of 5–30 builds, each job at its own uniformly random time.
fn uniform(g: &mut Gen, pools: &[WorkloadPool], plan: &mut Plan) {
    let total = g.usize(200, 2000);
    let n_groups = g.usize(5, 30);
    let orgs = g.usize(2, 6);
    for k in 0..n_groups {
        let prio = g.int(0, 2) as i32;
        let pool = g.usize(0, pools.len() - 1);
        plan.group(g, k % orgs, pool, prio);
    }
    for _ in 0..total {
        let gi = g.usize(0, n_groups - 1);
        plan.run(g, gi, 1, 0.0, 0.0);
    }
    let h = plan.horizon(pools) * g.float(0.5, 1.2);
    for j in &mut plan.jobs {
        j.submit_s = round_to(g.float(0.0, h), 0.1);
    }
}

/// One org's huge low-priority run at t = 0, a few medium runs, and bursts of small urgent
/// runs from the other orgs.
fn bursty(g: &mut Gen, pools: &[WorkloadPool], plan: &mut Plan) {
    let orgs = g.usize(3, 6);
    let huge = plan.group(g, 0, 0, 0);
    let n_huge = g.usize(500, 2000);
    plan.run(g, huge, n_huge, 0.0, 5.0);
    let h = plan.horizon(pools);

    let mediums = g.usize(2, 5);
    for _ in 0..mediums {
        let org = g.usize(1, orgs - 1);
        let pool = g.usize(0, pools.len() - 1);
        let prio = g.int(1, 3) as i32;
        let gi = plan.group(g, org, pool, prio);
        let n = g.usize(20, 100);
        let at = g.float(0.0, h * 0.6);
        plan.run(g, gi, n, at, 5.0);
    }

    let bursts = g.usize(3, 8);
    for _ in 0..bursts {
        let at = g.float(0.0, h * 0.8);
        for _ in 0..g.usize(2, 5) {
            let org = g.usize(1, orgs - 1);
            let pool = g.usize(0, pools.len() - 1);
            let prio = g.int(5, 10) as i32;
            let gi = plan.group(g, org, pool, prio);
            let n = g.usize(5, 30);
            plan.run(g, gi, n, at, 2.0);
        }
    }
    cap(plan);
}

/// Plans a small workload and returns its pools: at one of three sizes, 3–6, 3–12 or 3–18
/// builds of 2–8, 2–16 or 2–24 jobs, each build's jobs submitted within 6 s, builds 3 to
/// 85 s apart (a mean gap of 10–50 s). Jobs take 15–90 s, uniformly, whatever their build;
/// priorities 1, 3 or 5; 85% pass, 8% `failed`, 7% `infra_error_once`. One to three pools:
/// emulators and USB devices (2 to 5, 10 or 15 devices by size, installs of 20–60 s), or
/// BrowserStack (2–4 sessions, installs of 60–120 s). Every pool gets a build.
fn small(g: &mut Gen, plan: &mut Plan) -> Vec<WorkloadPool> {
    let scale = g.usize(1, 3);
    let n_pools = [1, 2, 2, 3][g.usize(0, 3)];
    let all = [Target::Emulator, Target::Device, Target::Browserstack];
    let first = g.usize(0, 2);
    let pools: Vec<WorkloadPool> = (0..n_pools)
        .map(|k| {
            let target = all[(first + k) % 3].clone();
            let (devices, installs) = if target == Target::Browserstack {
                (g.int(2, 4), [60.0, 90.0, 120.0].as_slice())
            } else {
                (
                    g.int(2, 5 * scale as u64),
                    [20.0, 30.0, 45.0, 60.0].as_slice(),
                )
            };
            let install_s = installs[g.usize(0, installs.len() - 1)];
            WorkloadPool {
                target,
                devices: devices as u32,
                install_s,
            }
        })
        .collect();
    let orgs = g.usize(1, 3);
    let builds = g.usize(3, 6 * scale);
    let mut at = g.float(0.0, 10.0);
    let gap = g.float(10.0, 50.0);
    for b in 0..builds {
        // The first builds go one to each pool, so that none is left empty.
        let pool = if b < pools.len() {
            b
        } else {
            g.usize(0, pools.len() - 1)
        };
        let org = g.usize(0, orgs - 1);
        // The group's own priority is not used: each job draws its own.
        let gi = plan.group(g, org, pool, 0);
        for _ in 0..g.usize(2, 8 * scale) {
            let outcome = g.outcome_at(0.08, 0.07);
            plan.jobs.push(JobPlan {
                group: gi,
                duration_s: round_to(g.float(15.0, 90.0), 0.1),
                outcome,
                submit_s: round_to(at + g.float(0.0, 6.0), 0.1),
                priority: Some([1, 3, 5][g.usize(0, 2)]),
            });
        }
        at += g.float(0.3, 1.7) * gap;
    }
    pools
}

/// Keeps a plan within [`MAX_JOBS`] by dropping its last-planned jobs.
fn cap(plan: &mut Plan) {
    plan.jobs.truncate(MAX_JOBS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_round_trip() {
        for s in Shape::ALL {
            assert_eq!(s.to_string().parse::<Shape>(), Ok(s));
        }
        assert!("huge".parse::<Shape>().is_err());
    }

    #[test]
    fn same_seed_same_workload_and_seeds_differ() {
        for s in Shape::ALL {
            assert_eq!(generate(s, 7), generate(s, 7));
            assert_ne!(generate(s, 7).jobs, generate(s, 8).jobs);
        }
    }

    #[test]
    fn generated_workloads_are_valid_and_in_range() {
        for s in Shape::ALL {
            for seed in 0..20 {
                let w = generate(s, seed);
                w.validate().unwrap();
                let jobs = if s == Shape::Small {
                    6..=432
                } else {
                    MIN_JOBS..=MAX_JOBS
                };
                assert!(
                    jobs.contains(&w.jobs.len()),
                    "{s} seed {seed}: {} jobs",
                    w.jobs.len()
                );
                for p in &w.pools {
                    assert!((2..=16).contains(&p.devices));
                    assert!((10.0..=120.0).contains(&p.install_s));
                }
                for j in &w.jobs {
                    assert!((5.0..=300.0).contains(&j.duration_s));
                }
                assert!(w.jobs.windows(2).all(|p| p[0].submit_s <= p[1].submit_s));
            }
        }
    }

    #[test]
    fn rounding_keeps_short_decimals() {
        assert_eq!(round_to(12.345, 0.1), 12.3);
        assert_eq!(round_to(44.76, 0.5), 45.0);
    }
}
