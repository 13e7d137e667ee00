//! Compares the grouped policy with the FIFO and per-group baselines on generated workloads
//! of every shape, and checks the acceptance rules per pool.
//!
//! ```text
//! cargo run --release -p qgjob-core --example compare -- [--seeds N] [--first-seed S] [--shape NAME] [--quiet]
//! cargo run --release -p qgjob-core --example compare -- [--quiet] FILE…
//! ```
//!
//! Seeds `S..S+N` (default `0..10`) of each shape. A policy change is best judged on seeds it
//! was not tuned on: tune on one range, confirm on another. Given workload files (format v1,
//! or `--workload FILE`) it checks those instead of generated ones: your own traffic,
//! or workloads from another generator.
//!
//! For each shape and seed it prints one row per target pool: makespan / lower bound,
//! installs / minimum installs and the p95 wait of the pool's highest priority, for each
//! policy, then PASS or the rules grouped broke:
//! 1. grouped makespan ≤ 1.20 × lower bound;
//! 2. grouped makespan ≤ 1.05 × the better baseline's;
//! 3. grouped installs ≤ 0.5 × FIFO's;
//! 4. grouped's p95 wait of the highest priority ≤ per-group's.
//!
//! A failing row is marked `infeasible` when no schedule at all can meet rules 1–3 there
//! together, and `infeasible online` when no policy that only knows the jobs submitted so
//! far can meet them on the pool and on its prefixes (see `installs_proof`), whichever rules
//! grouped broke.
//!
//! It ends with a summary per shape (with `open`, the failing rows nothing is proved
//! about), the count of passing rows, and the share of them among the rows no proof rules
//! out: the pass rate a policy can be held to. The exit code is 0 even
//! when rows fail: this is a measuring tool, not a gate.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use qgjob_core::sim::{self, PoolReport, Shape};
use qgjob_core::{BuildRef, PolicyKind};

/// Rule thresholds (see the file docs).
const MAX_OVER_BOUND: f64 = 1.20;
const MAX_OVER_BASELINE: f64 = 1.05;
const MAX_INSTALLS_VS_FIFO: f64 = 0.5;

struct Args {
    seeds: u64,
    first_seed: u64,
    shapes: Vec<Shape>,
    workloads: Vec<String>,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seeds: 10,
        first_seed: 0,
        shapes: Shape::ALL.to_vec(),
        workloads: Vec::new(),
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seeds" => {
                let v = it.next().ok_or("--seeds needs a number")?;
                args.seeds = v
                    .parse()
                    .map_err(|_| format!("--seeds: not a number: {v}"))?;
            }
            "--first-seed" => {
                let v = it.next().ok_or("--first-seed needs a number")?;
                args.first_seed = v
                    .parse()
                    .map_err(|_| format!("--first-seed: not a number: {v}"))?;
            }
            "--shape" => {
                let v = it.next().ok_or("--shape needs a name")?;
                args.shapes = vec![v.parse().map_err(|e| format!("--shape: {e}"))?];
            }
            "--workload" => args
                .workloads
                .push(it.next().ok_or("--workload needs a file")?),
            "--quiet" => args.quiet = true,
            "-h" | "--help" => {
                return Err(
                    "usage: compare [--seeds N] [--first-seed S] [--shape few-big-groups|many-small-groups|uniform|bursty] [--quiet] [FILE...]"
                        .into(),
                )
            }
            file if !file.starts_with('-') => args.workloads.push(file.to_string()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// One policy's figures for one pool.
#[derive(Clone, Copy)]
struct Fig {
    mk_over_lb: f64,
    makespan: f64,
    installs: u64,
    inst_over_min: f64,
    p95_top: f64,
}

fn fig(p: &PoolReport) -> Fig {
    let top = p
        .wait_s_by_priority
        .iter()
        .next_back()
        .map_or(0.0, |(_, w)| w.p95);
    Fig {
        mk_over_lb: ratio(p.makespan_s, p.lower_bound_s),
        makespan: p.makespan_s,
        installs: p.installs,
        inst_over_min: ratio(p.installs as f64, p.min_installs as f64),
        p95_top: top,
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        1.0
    }
}

/// Which rules grouped broke on a row (empty: PASS).
fn broken(g: Fig, f: Fig, pg: Fig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if g.mk_over_lb > MAX_OVER_BOUND {
        out.push("bound");
    }
    if g.makespan > MAX_OVER_BASELINE * f.makespan.min(pg.makespan) {
        out.push("baseline");
    }
    if g.installs as f64 > MAX_INSTALLS_VS_FIFO * f.installs as f64 {
        out.push("installs");
    }
    if g.p95_top > pg.p95_top {
        out.push("urgent-wait");
    }
    out
}

/// What is proved about a pool where grouped broke a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Nothing: a better policy might meet every rule.
    None,
    /// No schedule at all meets the installs rule and the makespan rules together.
    AnySchedule,
    /// No policy that only knows the jobs submitted so far meets every rule both on the pool
    /// and on its prefixes (the jobs submitted before some build arrived: themselves
    /// workloads the rules apply to).
    AnyOnlinePolicy,
}

/// Whether the installs rule contradicts the makespan rules on a pool, so that no policy
/// meets rules 1–3 together there, whichever of them grouped broke. Let the budget be
/// half of FIFO's installs and the deadline the earliest makespan the rules allow.
/// * [`Proof::AnySchedule`], shown two ways: a schedule within the budget runs jobs on at
///   most that many devices, so it finishes no earlier than the pool's lower bound cut down
///   to that many devices; or [`sim::min_installs_by`] the deadline exceeds the budget.
/// * [`Proof::AnyOnlinePolicy`]: see [`online_contradiction`].
fn installs_proof(w: &sim::Workload, pool: &sim::WorkloadPool, f: Fig, pg: Fig, lb: f64) -> Proof {
    let budget = (MAX_INSTALLS_VS_FIFO * f.installs as f64).floor() as u64;
    let deadline_s = (MAX_OVER_BASELINE * f.makespan.min(pg.makespan)).min(MAX_OVER_BOUND * lb);
    let jobs = w.bound_jobs(&pool.target);
    let install_ms = (pool.install_s * 1000.0).round() as u64;
    let cut = u32::try_from(budget).unwrap_or(u32::MAX).min(pool.devices);
    let too_few_devices = budget == 0
        || sim::lower_bound(cut, install_ms, &jobs).is_ok_and(|cut_lb| cut_lb > deadline_s);
    let deadline_ms = (deadline_s * 1000.0).floor() as u64;
    let too_few_installs = sim::min_installs_by(pool.devices, install_ms, &jobs, deadline_ms)
        .is_none_or(|need| need > budget);
    if too_few_devices || too_few_installs {
        Proof::AnySchedule
    } else if online_contradiction(w, pool, &jobs, budget, deadline_ms) {
        Proof::AnyOnlinePolicy
    } else {
        Proof::None
    }
}

/// The adversary argument for a pool whose builds arrive one after another. Cut the pool's
/// jobs at the first arrival `c` of some build: the jobs submitted before `c` form a
/// workload of their own, the prefix. A policy that sees only what has been submitted acts
/// the same before `c` on the prefix and on the pool. To meet the makespan rules on the
/// prefix (deadline `D'`), the devices must do its work `W'`; one that starts installing
/// at or after `c` does at most `D' − c − I` of it, one that starts earlier at most
/// `D' − t0 − I`, so at least `k = ⌈(W' − m·(D' − c − I)) / (c − t0)⌉` devices install
/// before `c`. On the pool, the builds first seen at or after `c` then need
/// [`sim::min_installs_by`]'s installs for its deadline on top of those `k`. When the sum
/// exceeds the budget for some `c`, no such policy meets every rule on both workloads.
///
/// The same holds build by build, which catches builds that arrive one after another: a
/// build `b` of the prefix with work `W_b` (submitted before `c`) must be installed before
/// `c` on at least `⌈(W_b − m·L) / (D' − f_b − I − L)⌉` devices, `L = D' − c − I` (each of
/// them does at most `D' − f_b − I` of it, each of the others at most `L`). Installs of
/// different builds are different installs, so the pool needs, summed over builds, the
/// most any one cut (or the pool's own deadline) forces on each build; more than the
/// budget and no such policy meets every rule on the pool and all its prefixes.
fn online_contradiction(
    w: &sim::Workload,
    pool: &sim::WorkloadPool,
    bound_jobs: &[sim::BoundJob],
    budget: u64,
    deadline_ms: u64,
) -> bool {
    let mine: Vec<&sim::WorkloadJob> = w.jobs.iter().filter(|j| j.target == pool.target).collect();
    let submit_ms = |j: &sim::WorkloadJob| (j.submit_s * 1000.0).round() as u64;
    let Some(t0) = mine.iter().map(|j| submit_ms(j)).min() else {
        return false;
    };
    let install_ms = (pool.install_s * 1000.0).round() as u64;
    let m = u64::from(pool.devices);
    let mut first: BTreeMap<BuildRef, u64> = BTreeMap::new();
    for j in &mine {
        let e = first.entry(j.build()).or_insert(u64::MAX);
        *e = (*e).min(submit_ms(j));
    }
    let cuts: BTreeSet<u64> = first.values().copied().filter(|&c| c > t0).collect();
    // The second argument, build by build: installs of different builds are different
    // installs, so each build is charged the most devices any one cut forces on it.
    let mut forced = devices_needed(pool.devices, install_ms, bound_jobs, deadline_ms);
    for c in cuts {
        let prefix = sim::Workload {
            name: format!("{}-before-{c}", w.name),
            pools: vec![pool.clone()],
            jobs: mine
                .iter()
                .filter(|j| submit_ms(j) < c)
                .map(|j| (*j).clone())
                .collect(),
        };
        let (Ok(fifo), Ok(per_group)) = (
            sim::run(&prefix, PolicyKind::Fifo),
            sim::run(&prefix, PolicyKind::PerGroup),
        ) else {
            continue;
        };
        let best = fifo.makespan_s.min(per_group.makespan_s);
        let d_prefix_s = (MAX_OVER_BASELINE * best).min(MAX_OVER_BOUND * fifo.lower_bound_s);
        let d_prefix = (d_prefix_s * 1000.0).floor() as u64;
        let work: u64 = prefix.jobs.iter().map(sim::WorkloadJob::work_ms).sum();
        let late = d_prefix.saturating_sub(c.saturating_add(install_ms));
        let early = d_prefix.saturating_sub(t0.saturating_add(install_ms));
        if early <= late {
            continue;
        }
        let k = work
            .saturating_sub(m.saturating_mul(late))
            .div_ceil(early - late);
        if k > m {
            // The prefix alone cannot meet its deadline: the argument says nothing.
            continue;
        }
        let later: Vec<sim::BoundJob> = bound_jobs
            .iter()
            .filter(|j| first.get(&j.build).is_some_and(|&f| f >= c))
            .cloned()
            .collect();
        let after = sim::min_installs_by(pool.devices, install_ms, &later, deadline_ms);
        if after.is_none_or(|a| k + a > budget) {
            return true;
        }
        // Per build of the prefix: the devices that must install it before `c`.
        let mut prefix_work: BTreeMap<BuildRef, u64> = BTreeMap::new();
        for j in &prefix.jobs {
            *prefix_work.entry(j.build()).or_default() += j.work_ms();
        }
        let before_c: Option<Vec<(BuildRef, u64)>> = prefix_work
            .into_iter()
            .map(|(b, work)| {
                let f = first.get(&b).copied().unwrap_or(t0);
                // A device that installs it before `c` does at most `room` of its work, one
                // that installs it later at most `late`: x·room + (m − x)·late ≥ W_b.
                let room = d_prefix.checked_sub(f + install_ms).filter(|&r| r > late)?;
                let x = work
                    .saturating_sub(m.saturating_mul(late))
                    .div_ceil(room - late);
                (x <= m).then_some((b, x))
            })
            .collect();
        // `None`: the prefix alone cannot meet its deadline; the argument says nothing.
        for (b, x) in before_c.into_iter().flatten() {
            let e = forced.entry(b).or_default();
            *e = (*e).max(x);
        }
    }
    forced.values().sum::<u64>() > budget
}

/// Per build of a pool, the devices that must run it to finish by `deadline_ms`:
/// [`sim::min_installs_by`] of its jobs alone (1 where it says none can, which
/// `installs_proof` has ruled out before it gets here).
fn devices_needed(
    devices: u32,
    install_ms: u64,
    jobs: &[sim::BoundJob],
    deadline_ms: u64,
) -> BTreeMap<BuildRef, u64> {
    let mut by_build: BTreeMap<BuildRef, Vec<sim::BoundJob>> = BTreeMap::new();
    for j in jobs {
        by_build.entry(j.build.clone()).or_default().push(j.clone());
    }
    by_build
        .into_iter()
        .map(|(b, js)| {
            let need = sim::min_installs_by(devices, install_ms, &js, deadline_ms).unwrap_or(1);
            (b, need)
        })
        .collect()
}

/// Where a workload comes from.
enum Source {
    /// The generator's shape and seed.
    Generated(Shape, u64),
    /// A workload file (format v1).
    File(String),
}

impl Source {
    /// The workload, with the kind it is tallied under: the shape, or the workload's name
    /// without a trailing `-<number>` (so `ci-day-3` and `ci-day-7` share a summary row).
    fn load(&self) -> Result<(String, sim::Workload), String> {
        match self {
            Source::Generated(shape, seed) => {
                Ok((shape.as_str().to_string(), sim::generate(*shape, *seed)))
            }
            Source::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
                let w = sim::Workload::from_json(&text).map_err(|e| format!("{path}: {e}"))?;
                let kind = match w.name.rsplit_once('-') {
                    Some((stem, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                        stem.to_string()
                    }
                    _ => w.name.clone(),
                };
                Ok((kind, w))
            }
        }
    }
}

/// Per-kind tallies for the summary.
#[derive(Default)]
struct Tally {
    rows: u64,
    pass: u64,
    /// Failing rows where no policy can meet every rule ([`Proof::AnySchedule`])…
    infeasible: u64,
    /// …where no online policy can ([`Proof::AnyOnlinePolicy`])…
    infeasible_online: u64,
    /// …and where nothing is proved.
    unproved: u64,
    broken: BTreeMap<&'static str, u64>,
    mk_over_lb: [f64; 3],
    p95_top: [f64; 3],
    inst_over_min: [f64; 3],
    worst_grouped_mk_over_lb: f64,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let sources: Vec<Source> = if args.workloads.is_empty() {
        args.shapes
            .iter()
            .flat_map(|&shape| {
                (args.first_seed..args.first_seed.saturating_add(args.seeds))
                    .map(move |seed| Source::Generated(shape, seed))
            })
            .collect()
    } else {
        args.workloads.iter().cloned().map(Source::File).collect()
    };
    // Tallies in the order their kind first appears (shape order for generated workloads).
    let mut tallies: Vec<(String, Tally)> = Vec::new();
    for source in &sources {
        let (kind, w) = match source.load() {
            Ok(x) => x,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        };
        let at = match tallies.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                tallies.push((kind, Tally::default()));
                tallies.len() - 1
            }
        };
        let tally = &mut tallies[at].1;
        {
            let mut reports = Vec::new();
            for p in PolicyKind::ALL {
                match sim::run(&w, p) {
                    Ok(r) => reports.push(r),
                    Err(e) => {
                        eprintln!("{}: {p}: {e}", w.name);
                        return ExitCode::from(3);
                    }
                }
            }
            if !args.quiet {
                println!(
                    "\n{} ({} jobs)\n  {:<13}{:>4}{:>7} | {:^23} | {:^23} | {:^23} |",
                    w.name,
                    w.jobs.len(),
                    "pool",
                    "dev",
                    "inst",
                    "grouped",
                    "fifo",
                    "per-group"
                );
                let cols = "  mk/lb inst/min p95top ";
                println!("  {:<24} |{cols}|{cols}|{cols}| check", "");
            }
            for (pi, pool) in w.pools.iter().enumerate() {
                if reports[0].pools[pi].jobs == 0 {
                    continue;
                }
                let figs: Vec<Fig> = reports.iter().map(|r| fig(&r.pools[pi])).collect();
                let lb = reports[0].pools[pi].lower_bound_s;
                let bad = broken(figs[0], figs[1], figs[2]);
                let proof = if bad.is_empty() {
                    Proof::None
                } else {
                    installs_proof(&w, pool, figs[1], figs[2], lb)
                };
                tally.rows += 1;
                match proof {
                    _ if bad.is_empty() => tally.pass += 1,
                    Proof::None => tally.unproved += 1,
                    Proof::AnySchedule => tally.infeasible += 1,
                    Proof::AnyOnlinePolicy => tally.infeasible_online += 1,
                }
                for b in &bad {
                    *tally.broken.entry(b).or_default() += 1;
                }
                for (k, f) in figs.iter().enumerate() {
                    tally.mk_over_lb[k] += f.mk_over_lb;
                    tally.inst_over_min[k] += f.inst_over_min;
                    tally.p95_top[k] += f.p95_top;
                }
                tally.worst_grouped_mk_over_lb =
                    tally.worst_grouped_mk_over_lb.max(figs[0].mk_over_lb);
                if !args.quiet {
                    let cells: Vec<String> = figs
                        .iter()
                        .map(|f| {
                            format!(
                                " {:>5.3} {:>8.2} {:>6.0}s",
                                f.mk_over_lb, f.inst_over_min, f.p95_top
                            )
                        })
                        .collect();
                    let verdict = match proof {
                        _ if bad.is_empty() => "PASS".to_string(),
                        Proof::None => format!("FAIL ({})", bad.join(", ")),
                        Proof::AnySchedule => format!("FAIL ({}; infeasible)", bad.join(", ")),
                        Proof::AnyOnlinePolicy => {
                            format!("FAIL ({}; infeasible online)", bad.join(", "))
                        }
                    };
                    println!(
                        "  {:<13}{:>4}{:>6}s |{}|{}|{}| {}",
                        pool.target.as_str(),
                        pool.devices,
                        pool.install_s,
                        cells[0],
                        cells[1],
                        cells[2],
                        verdict
                    );
                }
            }
        }
    }

    if args.workloads.is_empty() {
        println!(
            "\nSummary (seeds {}..{} of each shape; means over pool rows)",
            args.first_seed,
            args.first_seed.saturating_add(args.seeds)
        );
    } else {
        println!(
            "\nSummary ({} workload files, by name without its trailing number; means over pool rows)",
            args.workloads.len()
        );
    }
    println!(
        "  {:<18} {:>5} {:>5} {:>5} | {:^26} | {:^26} | {:^26} | {:>7} | broken rules",
        if args.workloads.is_empty() {
            "shape"
        } else {
            "workload"
        },
        "rows",
        "pass",
        "open",
        "mk/lb grp / fifo / pergrp",
        "inst/min grp / fifo / pergrp",
        "p95top s grp / fifo / pergrp",
        "worst"
    );
    let mut all = Tally::default();
    for (kind, t) in &tallies {
        all.rows += t.rows;
        all.pass += t.pass;
        all.infeasible += t.infeasible;
        all.infeasible_online += t.infeasible_online;
        all.unproved += t.unproved;
        let n = t.rows.max(1) as f64;
        let broken: Vec<String> = t.broken.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!(
            "  {:<18} {:>5} {:>5} {:>5} | {:>7.3} {:>8.3} {:>8.3} | {:>7.2} {:>8.2} {:>8.2} | {:>7.0} {:>8.0} {:>8.0} | {:>7.3} | {}",
            kind,
            t.rows,
            t.pass,
            t.unproved,
            t.mk_over_lb[0] / n,
            t.mk_over_lb[1] / n,
            t.mk_over_lb[2] / n,
            t.inst_over_min[0] / n,
            t.inst_over_min[1] / n,
            t.inst_over_min[2] / n,
            t.p95_top[0] / n,
            t.p95_top[1] / n,
            t.p95_top[2] / n,
            t.worst_grouped_mk_over_lb,
            broken.join(", ")
        );
    }
    println!(
        "\n{} of {} pool rows PASS, {} FAIL: {} proved infeasible for any schedule, {} for any \
         online policy, {} open",
        all.pass,
        all.rows,
        all.rows - all.pass,
        all.infeasible,
        all.infeasible_online,
        all.unproved
    );
    // The rate that a policy can be held to: rows a proof rules out are lost to any policy.
    let possible = all.rows - all.infeasible - all.infeasible_online;
    println!(
        "{} of the {} rows no proof rules out PASS ({:.1}%)",
        all.pass,
        possible,
        100.0 * all.pass as f64 / possible.max(1) as f64
    );
    println!(
        "infeasible: provably no schedule with at most half of FIFO's installs meets the \
         makespan rules on that pool\n\
         infeasible online: provably no policy that sees only the jobs submitted so far meets \
         every rule on that pool and on each set of jobs it received before a new build arrived\n\
         open: failing rows where nothing is proved (a better policy might pass them)"
    );
    ExitCode::SUCCESS
}
