//! The makespan lower bound of one target pool: no schedule of its jobs on its devices can
//! finish earlier, whatever the policy.

use std::collections::BTreeMap;

use super::SimError;
use crate::model::{BuildRef, Time};

/// One job as the lower bound sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundJob {
    /// When it was submitted (from the same origin as the makespan it is compared with).
    pub submit: Time,
    /// Its work: the run time of every attempt, ms (install excluded).
    pub work_ms: u64,
    /// Its build: the first job of a build seen at or after a time costs one install after it.
    pub build: BuildRef,
}

/// The makespan lower bound, in seconds, of `jobs` on a pool of `devices` devices where an
/// install takes `install_ms`:
///
/// `max( max_j(max(submit_j, first_b(j) + I) + work_j),
///       max over submit times t of t + (W(t) + I × G(t)) / m,
///       max over first-seen times t of t + (N(t) + I × max(G(t), m)) / m,
///       the least T with W(t) + I × Σ_{f_b ≥ t} ⌈W_b / (T − f_b − I)⌉ ≤ m × (T − t) for all t )`
///
/// where `first_b(j)` is the submit time of the first job of `j`'s build, `W(t)` the work
/// of the jobs submitted at or after `t`, `G(t)` the number of builds whose first job is
/// submitted at or after `t` and `N(t)` the work of all jobs of those builds.
///
/// * The first term holds because a job runs after its submit and on a device where its
///   build is installed, which cannot happen before the build's first job arrived plus one
///   install.
/// * The second because from `t` on, the `m` devices must still do that work and at least
///   one install of each of those builds.
/// * The third because a build's jobs only run after an install of it begun at or after its
///   first job's arrival. Say `k ≤ m` devices run jobs of the builds first seen at or after
///   `t`: from `t` on they are busy for at least `N(t)` of work plus one install per such
///   build and one per device, so the last ends no earlier than
///   `t + (N(t) + I × max(G(t), k)) / k`, which only shrinks as `k` grows to `m`. At the
///   first submit this says what the second term misses when a pool has more devices than
///   builds: every device that helps pays its own install.
/// * The fourth because finishing by `T` takes each build `b` (first seen at `f_b`, work
///   `W_b`) on at least `⌈W_b / (T − f_b − I)⌉` devices, each paying an install after
///   `f_b`, and from `t` on the pool must do that many installs and the work submitted
///   since (see `Demand`). It lifts the bound when a build arrives late with more work
///   than one device can finish in time. Found by bisection over whole milliseconds.
///
/// Devices start with nothing installed, as in the simulator. 0 without jobs. Time and
/// work are taken in ms; the answer is `ms / 1000`.
///
/// The first term is not `submit_j + I + work_j`: a job submitted after its build was
/// installed somewhere may start at once without an install, so that sum can exceed a
/// makespan that a real schedule achieves. The two agree whenever every job is submitted
/// together with the first job of its build.
///
/// ```
/// use qgjob_core::sim::{lower_bound, BoundJob};
/// use qgjob_core::{AppVersionId, BuildRef, OrgId, Time};
///
/// let build = BuildRef { org_id: OrgId::new("acme")?, app_version_id: AppVersionId::new("v1")? };
/// let jobs: Vec<BoundJob> = (0..4)
///     .map(|_| BoundJob { submit: Time(0), work_ms: 10_000, build: build.clone() })
///     .collect();
/// // Two devices: 40 s of work, and each device that helps installs the build once (5 s).
/// assert_eq!(lower_bound(2, 5_000, &jobs)?, 25.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn lower_bound(devices: u32, install_ms: u64, jobs: &[BoundJob]) -> Result<f64, SimError> {
    Ok(lower_bound_ms(devices, install_ms, jobs)? / 1000.0)
}

/// [`lower_bound`] in milliseconds.
pub(crate) fn lower_bound_ms(
    devices: u32,
    install_ms: u64,
    jobs: &[BoundJob],
) -> Result<f64, SimError> {
    if jobs.is_empty() {
        return Ok(0.0);
    }
    if devices == 0 {
        return Err(SimError::NoDevices);
    }
    // u128 sums: a million jobs of a million seconds each still fit.
    let install = u128::from(install_ms);

    // Work submitted at each instant; when each build was first seen and its work.
    let mut work_at: BTreeMap<u64, u128> = BTreeMap::new();
    for j in jobs {
        *work_at.entry(j.submit.as_millis()).or_default() += u128::from(j.work_ms);
    }
    let per_build = per_build(jobs);
    let single = jobs
        .iter()
        .map(|j| {
            let submit = u128::from(j.submit.as_millis());
            let first = per_build
                .get(&j.build)
                .map_or(submit, |&(f, _)| u128::from(f));
            submit.max(first + install) + u128::from(j.work_ms)
        })
        .max()
        .unwrap_or(0);
    // Builds first seen at each instant, and the work of all their jobs.
    let mut groups_at: BTreeMap<u64, u128> = BTreeMap::new();
    let mut new_work_at: BTreeMap<u64, u128> = BTreeMap::new();
    for &(first, work) in per_build.values() {
        *groups_at.entry(first).or_default() += 1;
        *new_work_at.entry(first).or_default() += work;
    }

    // Walk the submit times from the last: suffix sums give W(t) and G(t).
    let m = f64::from(devices);
    let mut best = single as f64;
    let (mut work, mut groups) = (0u128, 0u128);
    for (&t, &w) in work_at.iter().rev() {
        work += w;
        groups += groups_at.get(&t).copied().unwrap_or(0);
        let bound = t as f64 + (work + install * groups) as f64 / m;
        best = best.max(bound);
    }

    // The first-seen times walked from the last: N(t) and G(t).
    let (mut new_work, mut new_groups) = (0u128, 0u128);
    for (&t, &w) in new_work_at.iter().rev() {
        new_work += w;
        new_groups += groups_at.get(&t).copied().unwrap_or(0);
        let installs = new_groups.max(u128::from(devices));
        let bound = t as f64 + (new_work + install * installs) as f64 / m;
        best = best.max(bound);
    }

    // The fourth term: the first makespan whose installs fit (see `fits`). Integer ms,
    // because every schedule's makespan is one; `fits` only gets easier as `T` grows.
    let builds: Vec<(u64, u128)> = per_build.into_values().collect();
    let demand = Demand {
        devices: u128::from(devices),
        install,
        work_at: &work_at,
        builds: &builds,
    };
    let mut lo = best.ceil() as u128;
    // An end that always fits: after the last first sighting, time for all the work and
    // one install per build, so each build needs one device.
    let last = builds.iter().map(|b| u128::from(b.0)).max().unwrap_or(0);
    let all_work: u128 = work_at.values().sum();
    let mut hi = last + install * (builds.len() as u128 + 1) + all_work + 1;
    if !demand.fits(lo) && demand.fits(hi) {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if demand.fits(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        best = best.max(hi as f64);
    }
    Ok(best)
}

/// The fourth term of [`lower_bound`]: what meeting a makespan `T` demands of the devices.
///
/// A build `b` first seen at `f_b` with work `W_b` runs on some `d_b` devices, each after an
/// install begun at or after `f_b`; the one with the largest share ends no earlier than
/// `f_b + I + W_b / d_b`, so finishing by `T` takes `d_b ≥ k_b(T) = ⌈W_b / (T − f_b − I)⌉`
/// devices, each paying an install. From any submit time `t` on, the `m` devices must then
/// do the work `W(t)` submitted at or after `t` and `I × Σ k_b(T)` of installs of the builds
/// first seen at or after `t`: `W(t) + I × Σ_{f_b ≥ t} k_b(T) ≤ m × (T − t)`. With every
/// `k_b = 1` this is the second term; a late big build that needs several devices to end by
/// `T` makes it stronger.
struct Demand<'a> {
    devices: u128,
    install: u128,
    /// Work submitted at each instant.
    work_at: &'a BTreeMap<u64, u128>,
    /// (first seen, work) of each build.
    builds: &'a [(u64, u128)],
}

impl Demand<'_> {
    /// Whether a schedule finishing by `t_end` ms could meet every demand.
    fn fits(&self, t_end: u128) -> bool {
        // Devices each build needs, summed per first-seen instant.
        let mut need_at: BTreeMap<u64, u128> = BTreeMap::new();
        for &(first, work) in self.builds {
            let Some(k) = devices_to_finish(first, work, self.install, self.devices, t_end) else {
                return false;
            };
            *need_at.entry(first).or_default() += k;
        }
        let (mut work, mut need) = (0u128, 0u128);
        let mut needs = need_at.iter().rev().peekable();
        for (&t, &w) in self.work_at.iter().rev() {
            work += w;
            while let Some((_, &k)) = needs.next_if(|(&f, _)| f >= t) {
                need += k;
            }
            let t = u128::from(t);
            if t_end < t || work + self.install * need > self.devices * (t_end - t) {
                return false;
            }
        }
        true
    }
}

/// The fewest installs with which any schedule of `jobs` on a pool of `devices` devices can
/// finish by `deadline_ms`, or `None` when none can.
///
/// Each build `b` first seen at `f_b` with work `W_b` must be installed on some `d_b`
/// devices, each at or after `f_b`, and the one with the largest share ends no earlier than
/// `f_b + I + W_b / d_b`. Meeting the deadline `T` so needs `d_b ≥ ⌈W_b / (T − f_b − I)⌉`
/// devices (at most `devices`) and as many installs; the sum over builds is the answer.
/// Used to tell when a cap on installs and a cap on makespan cannot both be met.
pub fn min_installs_by(
    devices: u32,
    install_ms: u64,
    jobs: &[BoundJob],
    deadline_ms: u64,
) -> Option<u64> {
    let (install, devices) = (u128::from(install_ms), u128::from(devices));
    per_build(jobs)
        .into_values()
        .map(|(first, work)| {
            devices_to_finish(first, work, install, devices, u128::from(deadline_ms))
        })
        .sum::<Option<u128>>()
        .and_then(|total| u64::try_from(total).ok())
}

/// Per build: when its first job was submitted (ms) and the work of all its jobs.
fn per_build(jobs: &[BoundJob]) -> BTreeMap<&BuildRef, (u64, u128)> {
    let mut out: BTreeMap<&BuildRef, (u64, u128)> = BTreeMap::new();
    for j in jobs {
        let t = j.submit.as_millis();
        let e = out.entry(&j.build).or_insert((t, 0));
        e.0 = e.0.min(t);
        e.1 += u128::from(j.work_ms);
    }
    out
}

/// The fewest devices that can run a build first seen at `first` with `work` ms of work by
/// `t_end`, each after its own install (`⌈work / (t_end − first − install)⌉`, at least
/// one), or `None` when more than `devices` (or any number) would be needed.
fn devices_to_finish(
    first: u64,
    work: u128,
    install: u128,
    devices: u128,
    t_end: u128,
) -> Option<u128> {
    let room = t_end.checked_sub(u128::from(first) + install)?;
    let need = match (work, room) {
        (0, _) => 1,
        (_, 0) => return None,
        _ => work.div_ceil(room),
    };
    (need <= devices).then_some(need)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AppVersionId, OrgId};

    fn build(v: &str) -> BuildRef {
        BuildRef {
            org_id: OrgId::new("acme").unwrap(),
            app_version_id: AppVersionId::new(v).unwrap(),
        }
    }

    fn job(t: u64, w: u64, v: &str) -> BoundJob {
        BoundJob {
            submit: Time(t),
            work_ms: w,
            build: build(v),
        }
    }

    #[test]
    fn one_long_job_dominates() {
        // 3 devices; the long job alone needs 1 s install + 100 s.
        let jobs = [job(0, 100_000, "a"), job(0, 1_000, "b"), job(0, 1_000, "a")];
        assert_eq!(lower_bound_ms(3, 1_000, &jobs).unwrap(), 101_000.0);
    }

    #[test]
    fn late_work_counts_from_its_submit_time() {
        // Two devices, 10 s installs; 10 s of work of a and b at 0, then at 50 s 20 s of a
        // new build c and 10 s more of a.
        let jobs = [
            job(0, 5_000, "a"),
            job(0, 5_000, "b"),
            job(50_000, 10_000, "c"),
            job(50_000, 10_000, "c"),
            job(50_000, 10_000, "a"),
        ];
        // Second term, t=50 s: 50 + (30 s of work + 1 install of c) / 2 = 70 s; the first
        // agrees (50 + 10 + 10). A build seen before t does not count again.
        // Fourth: by 70 s, c (first seen at 50 s, 20 s of work) needs ⌈20 / (70 − 50 − 10)⌉
        // = 2 devices and so 2 installs: 30 + 2 × 10 > 2 × (70 − 50). The first makespan
        // where it fits is 75 s (c still needs 2 devices: 30 + 20 = 2 × 25).
        assert_eq!(lower_bound_ms(2, 10_000, &jobs).unwrap(), 75_000.0);
        // (The best schedule ends at 80 s: one device keeps a, the other installs c.)
    }

    #[test]
    fn builds_that_need_a_second_device_pay_its_install() {
        // Three devices, 10 s installs, two builds of 4 × 10 s each at 0. The third term
        // says (80 + 3 × 10) / 3 ≈ 36.7 s; but to end before 40 s each build needs
        // ⌈40 / (T − 10)⌉ = 2 devices, and 80 s of work + 4 installs does not fit in
        // 3 × T. At 40 s it does, and a schedule meets it: one device per build runs three
        // jobs, the third installs a, runs one, installs b, runs one.
        let mut jobs: Vec<BoundJob> = (0..4).map(|_| job(0, 10_000, "a")).collect();
        jobs.extend((0..4).map(|_| job(0, 10_000, "b")));
        assert_eq!(lower_bound_ms(3, 10_000, &jobs).unwrap(), 40_000.0);
    }

    #[test]
    fn a_late_job_of_an_installed_build_needs_no_install() {
        // Build a first seen at 0: installed by 10 s at the earliest. A job of it submitted
        // at 100 s can start at once: 100 + 5 = 105 s, not 100 + 10 + 5.
        let jobs = [job(0, 1_000, "a"), job(100_000, 5_000, "a")];
        assert_eq!(lower_bound_ms(4, 10_000, &jobs).unwrap(), 105_000.0);
        // Submitted 2 s after the first, it still waits for that first install to end.
        let jobs = [job(0, 1_000, "a"), job(2_000, 5_000, "a")];
        assert_eq!(lower_bound_ms(4, 10_000, &jobs).unwrap(), 15_000.0);
    }

    #[test]
    fn installs_needed_to_meet_a_deadline() {
        // Build a: 40 s of work at 0; build b: 20 s at 10 s; install 5 s.
        let jobs = [
            job(0, 20_000, "a"),
            job(0, 20_000, "a"),
            job(10_000, 20_000, "b"),
        ];
        // By 45 s: a on one device (5 + 40), b on one (10 + 5 + 20).
        assert_eq!(min_installs_by(4, 5_000, &jobs, 45_000), Some(2));
        // By 25 s: a needs two devices (5 + 40 / 2), b two (10 + 5 + 20 / 2).
        assert_eq!(min_installs_by(4, 5_000, &jobs, 25_000), Some(4));
        // One device cannot give a its two.
        assert_eq!(min_installs_by(1, 5_000, &jobs, 25_000), None);
        // Before b's install could even end: none.
        assert_eq!(min_installs_by(4, 5_000, &jobs, 14_000), None);
    }

    #[test]
    fn empty_and_deviceless() {
        assert_eq!(lower_bound_ms(0, 5, &[]).unwrap(), 0.0);
        assert_eq!(
            lower_bound_ms(0, 5, &[job(0, 1, "a")]),
            Err(SimError::NoDevices)
        );
    }
}
