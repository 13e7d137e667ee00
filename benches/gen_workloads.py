#!/usr/bin/env python3
"""A second workload generator for qgjob's simulator (format v1), written apart from
`qgjob_core::sim::generate` so that the grouped policy can be checked on workloads its
tuning did not shape:

  python3 benches/gen_workloads.py --out /tmp/wl --count 300 --seed 1
  cargo run --release -p qgjob-core --example compare -- --quiet /tmp/wl/*.json

Usage:
  python3 gen_workloads.py --out DIR --count N --seed S [--pick cycle|random]
  python3 gen_workloads.py --check DIR

Each workload is a JSON object:
  {"name", "pools": [{"target","devices","install_s"}],
   "jobs": [{"org_id","app_version_id","target","priority","submit_s","duration_s","outcome"}]}

Families: sample-like, ci-day, release-crunch, multi-org, trickle, random-mix.
Every workload has its own random.Random seeded from (seed, index, family), so the
output is deterministic for a given --seed/--count/--pick.  Standard library only.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import random
import sys
from collections import Counter, defaultdict

TARGETS = ("emulator", "device", "browserstack")
# install seconds per target (browserstack is slowest: upload + session start)
INSTALL_RANGE = {"emulator": (15.0, 75.0), "device": (30.0, 110.0), "browserstack": (60.0, 150.0)}
# plausible device counts per target (intersected with a family's range)
DEVICE_RANGE = {"emulator": (1, 16), "device": (1, 12), "browserstack": (1, 10)}
OUTCOMES = ("passed", "failed", "infra_error_once")
MAX_JOBS = 3000
MIN_DUR, MAX_DUR = 5.0, 600.0
ORG_NAMES = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell",
             "cyberdyne", "soylent", "wonka", "aperture", "monarch", "vandelay", "gringotts",
             "oscorp")
FAMILIES = ("sample-like", "ci-day", "release-crunch", "multi-org", "trickle", "random-mix")

JOB_KEYS = ("org_id", "app_version_id", "target", "priority", "submit_s", "duration_s", "outcome")
POOL_KEYS = ("target", "devices", "install_s")


def r1(x):
    return round(float(x), 1)


def loguniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def partition(rng, total, parts, minimum):
    """Split `total` into `parts` positive sizes (each >= minimum if possible), skewed."""
    parts = max(1, min(parts, max(1, total // max(1, minimum))))
    weights = [rng.uniform(0.3, 3.0) for _ in range(parts)]
    s = sum(weights)
    sizes = [max(minimum, int(total * wt / s)) for wt in weights]
    return sizes


def burst_times(rng, t0, n, spread):
    """n submissions at t0 (spread==0) or within [t0, t0+spread]."""
    if spread <= 0:
        return [t0] * n
    return sorted(t0 + rng.uniform(0.0, spread) for _ in range(n))


def stream_times(rng, t0, n, mean_gap):
    """n submissions one by one with exponential gaps (Poisson stream)."""
    out, t = [], t0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(1.0 / mean_gap)
    return out


def prio_scheme(rng):
    """Return a function giving (priority, per-job jitter) for a new build of an org."""
    kind = rng.choice(["fixed", "tiers", "range", "jitter"])
    if kind == "fixed":
        p = rng.randint(0, 10)
        return lambda: (p, 0)
    if kind == "tiers":
        tiers = rng.choice([[1, 3, 5], [1, 2, 3], [0, 5, 10], [2, 4, 6, 8]])
        return lambda: (rng.choice(tiers), 0)
    if kind == "range":
        lo = rng.randint(0, 4)
        hi = rng.randint(lo + 1, 10)
        return lambda: (rng.randint(lo, hi), 0)
    base = rng.randint(2, 8)
    return lambda: (base, rng.randint(1, 2))


class Workload:
    def __init__(self, name, rng):
        self.name = name
        self.rng = rng
        self.pools = {}
        self.jobs = []
        self.build_no = rng.randint(1, 300)
        self.fail_p = rng.uniform(0.005, 0.05)
        self.infra_p = rng.uniform(0.0, 0.035)
        self.keep_idle = False

    # ---- pools ---------------------------------------------------------
    def add_pools(self, targets, dev=(1, 16)):
        for t in targets:
            if t in self.pools:
                continue
            lo = max(dev[0], DEVICE_RANGE[t][0])
            hi = max(lo, min(dev[1], DEVICE_RANGE[t][1]))
            ilo, ihi = INSTALL_RANGE[t]
            self.pools[t] = {"target": t, "devices": self.rng.randint(lo, hi),
                             "install_s": r1(self.rng.uniform(ilo, ihi))}

    def targets_for_build(self, second_p=0.12, prefer=None):
        rng = self.rng
        ts = list(self.pools)
        first = prefer if prefer in self.pools else rng.choice(ts)
        if len(ts) > 1 and rng.random() < second_p:
            return [first, rng.choice([t for t in ts if t != first])]
        return [first]

    # ---- durations / outcomes -----------------------------------------
    def dur_model(self, mean_lo=20.0, mean_hi=200.0, sig=(0.25, 0.8), lo=MIN_DUR, hi=MAX_DUR):
        return (loguniform(self.rng, mean_lo, mean_hi), self.rng.uniform(*sig), lo, hi)

    def draw_dur(self, model):
        mean, s, lo, hi = model
        mu = math.log(mean) - s * s / 2.0
        for _ in range(20):  # truncated lognormal (resample), avoids pile-ups at the bounds
            x = self.rng.lognormvariate(mu, s)
            if lo <= x <= hi:
                return r1(x)
        return r1(min(hi, max(lo, x)))

    def room(self):
        return MAX_JOBS - len(self.jobs)

    # ---- one build -----------------------------------------------------
    def build(self, org, targets, times, prio, model, prio_jitter=0):
        rng = self.rng
        n = min(len(times), self.room())
        if n <= 0:
            return 0
        self.build_no += rng.randint(1, 3)
        bid = "build-%d" % self.build_no
        fail_p = self.fail_p
        if rng.random() < 0.04:  # an occasionally broken build
            fail_p = rng.uniform(0.15, 0.45)
        w_first = rng.uniform(0.35, 0.75)
        for t in times[:n]:
            target = targets[0] if len(targets) == 1 or rng.random() < w_first else targets[1]
            p = prio + (rng.randint(-prio_jitter, prio_jitter) if prio_jitter else 0)
            u = rng.random()
            outcome = ("failed" if u < fail_p else
                       "infra_error_once" if u < fail_p + self.infra_p else "passed")
            self.jobs.append({"org_id": org, "app_version_id": bid, "target": target,
                              "priority": int(max(0, p)), "submit_s": r1(max(0.0, t)),
                              "duration_s": self.draw_dur(model), "outcome": outcome})
        return n

    def finalize(self):
        if not self.jobs:  # never expected, but keep the workload valid
            t = next(iter(self.pools))
            self.build("acme", [t], [0.0], 1, self.dur_model())
        order = sorted(range(len(self.jobs)), key=lambda i: (self.jobs[i]["submit_s"], i))
        jobs = [self.jobs[i] for i in order]
        used = {j["target"] for j in jobs}
        pools = [p for t, p in self.pools.items() if t in used or self.keep_idle]
        return {"name": self.name, "pools": pools, "jobs": jobs}


# ---------------------------------------------------------------------------
# features (building blocks shared by families)
# ---------------------------------------------------------------------------

def feat_bursts(w, orgs, t0, nb, gap=(15, 45), n=(2, 12), spread=(1, 8), prios=(1, 3, 5),
                model=(25, 70, (0.2, 0.55), 12, 100), second_p=0.1):
    """Builds arriving one after another, each a short burst of jobs."""
    rng, t = w.rng, t0
    for _ in range(nb):
        m = w.dur_model(model[0], model[1], model[2], model[3], model[4])
        w.build(rng.choice(orgs), w.targets_for_build(second_p),
                burst_times(rng, t, rng.randint(*n), rng.uniform(*spread)), rng.choice(prios), m)
        t += rng.uniform(*gap)
    return t


def feat_pushes(w, orgs, t0, T, budget, n=(5, 40), diurnal=True):
    """Poisson PR pushes from several orgs over [t0, t0+T]; each push = new build, all specs at once."""
    rng = w.rng
    org_w = [loguniform(rng, 0.3, 3.0) for _ in orgs]
    org_prio = {o: rng.randint(2, 6) for o in orgs}
    org_pref = {o: (rng.choice(list(w.pools)) if rng.random() < 0.7 else None) for o in orgs}
    mean_n = (n[0] + n[1]) / 2.0
    rate = max(budget, mean_n) / mean_n / T  # pushes per second (average)
    peak = rate / (0.4 + 0.6 * 2 / math.pi) if diurnal else rate
    t, used = 0.0, 0
    while used < budget and w.room() > 0:
        t += rng.expovariate(peak)
        if t > T:
            break
        if diurnal and rng.random() > (0.4 + 0.6 * math.sin(math.pi * t / T)) :
            continue
        o = rng.choices(orgs, weights=org_w)[0]
        k = min(rng.randint(*n), budget - used)
        if k <= 0:
            break
        prio = org_prio[o] + (1 if rng.random() < 0.1 else 0)
        spread = 0.0 if rng.random() < 0.6 else rng.uniform(0.1, 3.0)
        used += w.build(o, w.targets_for_build(0.15, org_pref[o]), burst_times(rng, t0 + t, k, spread),
                        prio, w.dur_model(15, 180, (0.3, 0.8)))
    return used


def feat_nightly(w, orgs, t0, size, prio=None):
    """One big low-priority regression run."""
    rng = w.rng
    p = rng.choice([0, 1]) if prio is None else prio
    spread = 0.0 if rng.random() < 0.5 else rng.uniform(1, 30)
    return w.build(rng.choice(orgs), w.targets_for_build(0.35), burst_times(rng, t0, size, spread),
                   p, w.dur_model(30, 200, (0.4, 0.9)))


def feat_big(w, orgs, t0, budget, nbig, stagger=(0, 900)):
    """A few big builds (hundreds of jobs), each submitted in 1-4 shards."""
    rng, t, used = w.rng, t0, 0
    for size in partition(rng, budget, nbig, 60):
        if w.room() <= 0:
            break
        targets = w.targets_for_build(0.3)
        prio = rng.randint(1, 3)
        model = w.dur_model(30, 240, (0.4, 0.9))
        shards = rng.randint(1, 4)
        ts = 0.0
        left = size
        for k in range(shards):
            sz = left if k == shards - 1 else max(1, size // shards)
            left -= sz
            if sz <= 0:
                continue
            times = burst_times(rng, t + ts, sz, rng.uniform(0, 5))
            # shards of a build share the same app_version_id: do it by hand
            used += _extend_build(w, targets, times, prio, model, first=(k == 0), org=rng.choice(orgs) if k == 0 else None)
            ts += rng.uniform(5, 120)
        t += rng.uniform(*stagger)
    return used


def _extend_build(w, targets, times, prio, model, first, org):
    """Like Workload.build but continues the previous build (same id/org) when first is False."""
    if first:
        return w.build(org, targets, times, prio, model)
    last = w.jobs[-1] if w.jobs else None
    if last is None:
        return 0
    rng = w.rng
    n = min(len(times), w.room())
    for t in times[:n]:
        target = rng.choice(targets)
        u = rng.random()
        outcome = ("failed" if u < w.fail_p else
                   "infra_error_once" if u < w.fail_p + w.infra_p else "passed")
        w.jobs.append({"org_id": last["org_id"], "app_version_id": last["app_version_id"],
                       "target": target, "priority": prio, "submit_s": r1(t),
                       "duration_s": w.draw_dur(model), "outcome": outcome})
    return max(0, n)


def feat_hotfix(w, orgs, k, frac=(0.15, 0.7), fallback=(0.0, 600.0)):
    """Urgent smoke runs: high priority, 3-10 short jobs, arriving while their pool is busy
    (at a fraction `frac` of the estimated backlog span of the chosen target)."""
    rng, used = w.rng, 0
    work, start = defaultdict(float), {}
    for j in w.jobs:
        work[j["target"]] += j["duration_s"]
        start[j["target"]] = min(start.get(j["target"], j["submit_s"]), j["submit_s"])
    ts = list(w.pools)
    weights = [work.get(t, 0.0) + 1.0 for t in ts]
    for _ in range(k):
        tgt = rng.choices(ts, weights=weights)[0]
        if work.get(tgt):
            span = max(300.0, work[tgt] / w.pools[tgt]["devices"])
            th = start[tgt] + rng.uniform(*frac) * span
        else:
            th = rng.uniform(*fallback)
        used += w.build(rng.choice(orgs), [tgt], burst_times(rng, th, rng.randint(3, 10), rng.uniform(0, 3)),
                        rng.randint(8, 10), w.dur_model(10, 60, (0.2, 0.5)))
    return used


def feat_trickle(w, orgs, t0, budget, nb):
    """Several builds whose jobs arrive one by one (Poisson streams), overlapping in time."""
    rng, used = w.rng, 0
    sizes = partition(rng, budget, nb, 5)
    gaps = [rng.uniform(2, 60) for _ in sizes]
    spans = sorted(s * g for s, g in zip(sizes, gaps))
    horizon = rng.uniform(0.1, 0.8) * spans[len(spans) // 2]
    schemes = {o: prio_scheme(rng) for o in orgs}
    for size, gap in zip(sizes, gaps):
        o = rng.choice(orgs)
        p, jit = schemes[o]()
        used += w.build(o, w.targets_for_build(0.15), stream_times(rng, t0 + rng.uniform(0, horizon), size, gap),
                        p, w.dur_model(10, 240, (0.3, 0.8)), jit)
    return used


def feat_org_runs(w, org, T, budget, nb, t0=0.0, min_size=2):
    """One org's builds of varied size scattered over [t0, t0+T], with its own priority scheme."""
    rng, used = w.rng, 0
    scheme = prio_scheme(rng)
    pref = rng.choice(list(w.pools)) if rng.random() < 0.6 else None
    for size in partition(rng, budget, nb, min_size):
        p, jit = scheme()
        spread = 0.0 if rng.random() < 0.4 else loguniform(rng, 0.5, 60)
        used += w.build(org, w.targets_for_build(0.15, pref), burst_times(rng, t0 + rng.uniform(0, T), size, spread),
                        p, w.dur_model(10, 300, (0.3, 0.9)), jit)
    return used


def pick_orgs(rng, k):
    return rng.sample(ORG_NAMES, k)


# ---------------------------------------------------------------------------
# families
# ---------------------------------------------------------------------------

def fam_sample_like(w):
    rng = w.rng
    w.add_pools(rng.sample(TARGETS, rng.randint(1, 3)), dev=(1, 6))
    orgs = pick_orgs(rng, rng.choice([1, 1, 1, 2]))
    prios = rng.choice([(1, 3, 5), (1, 3, 5), (1, 2, 3), (0, 5, 10)])
    feat_bursts(w, orgs, rng.uniform(0, 10), rng.randint(2, 8), prios=prios)


def fam_ci_day(w):
    rng = w.rng
    w.add_pools(rng.sample(TARGETS, rng.randint(2, 3)), dev=(2, 16))
    orgs = pick_orgs(rng, rng.randint(3, 6))
    T = rng.uniform(4, 10) * 3600
    total = int(loguniform(rng, 300, 2500))
    nightly = int(loguniform(rng, 100, 600))
    feat_nightly(w, orgs, rng.uniform(0, 20), min(nightly, total - 50))
    feat_pushes(w, orgs, rng.uniform(30, 600), T, max(200, total - nightly))


def fam_release_crunch(w):
    rng = w.rng
    w.add_pools(rng.sample(TARGETS, rng.randint(2, 3)), dev=(3, 16))
    orgs = pick_orgs(rng, rng.randint(1, 2))
    nbig = rng.randint(2, 5)
    budget = min(MAX_JOBS - 60, int(loguniform(rng, 100 * nbig, 2500)))
    feat_big(w, orgs, rng.uniform(0, 60), budget, nbig)
    feat_hotfix(w, orgs, rng.randint(1, 5))


def fam_multi_org(w):
    rng = w.rng
    w.add_pools(rng.sample(TARGETS, rng.randint(2, 3)), dev=(2, 16))
    orgs = pick_orgs(rng, rng.randint(3, 8))
    T = loguniform(rng, 1800, 6 * 3600)
    for o in orgs[1:]:  # small orgs first, the whale gets what is left
        nb = rng.randint(1, 6)
        feat_org_runs(w, o, T, sum(int(loguniform(rng, 2, 60)) for _ in range(nb)), nb)
    whale_n = min(w.room(), int(loguniform(rng, 500, 2400)))
    feat_org_runs(w, orgs[0], T, whale_n, rng.randint(3, 20), min_size=5)


def fam_trickle(w):
    rng = w.rng
    w.add_pools(rng.sample(TARGETS, rng.randint(1, 3)), dev=(1, 12))
    orgs = pick_orgs(rng, rng.randint(1, 4))
    feat_trickle(w, orgs, rng.uniform(0, 30), int(loguniform(rng, 40, 1500)), rng.randint(2, 8))


def fam_random_mix(w):
    rng = w.rng
    w.add_pools(rng.sample(TARGETS, rng.randint(1, 3)), dev=(1, 16))
    w.keep_idle = rng.random() < 0.3
    if w.keep_idle and len(w.pools) < 3:  # an extra pool that may stay idle
        w.add_pools([rng.choice([t for t in TARGETS if t not in w.pools])])
    orgs = pick_orgs(rng, rng.randint(1, 8))
    feats = rng.sample(["bursts", "pushes", "nightly", "big", "hotfix", "trickle", "whale"], rng.randint(2, 4))
    T = loguniform(rng, 900, 8 * 3600)
    budget = int(loguniform(rng, 50, MAX_JOBS))
    shares = {f: rng.uniform(0.2, 1.0) for f in feats}
    s = sum(shares.values())
    for f in sorted(feats, key=lambda f: f == "hotfix"):  # hotfix last, into existing load
        b = max(5, int(budget * shares[f] / s))
        t0 = rng.uniform(0, 0.3 * T)
        if f == "bursts":
            feat_bursts(w, orgs, t0, rng.randint(2, 12), gap=(5, 120), n=(2, 20),
                        prios=rng.choice([(1, 3, 5), tuple(range(0, 11))]))
        elif f == "pushes":
            feat_pushes(w, orgs, t0, T, max(5, b), diurnal=rng.random() < 0.5)
        elif f == "nightly":
            feat_nightly(w, orgs, t0, max(20, min(b, 800)))
        elif f == "big":
            feat_big(w, orgs, t0, max(60, b), rng.randint(1, 4))
        elif f == "trickle":
            feat_trickle(w, orgs, t0, max(10, b), rng.randint(1, 6))
        elif f == "whale":
            feat_org_runs(w, rng.choice(orgs), T, max(10, b), rng.randint(2, 12))
        elif f == "hotfix":
            feat_hotfix(w, orgs, rng.randint(1, 4), frac=(0.1, 0.8), fallback=(t0, t0 + T))


FAMILY_FN = {"sample-like": fam_sample_like, "ci-day": fam_ci_day, "release-crunch": fam_release_crunch,
             "multi-org": fam_multi_org, "trickle": fam_trickle, "random-mix": fam_random_mix}


# ---------------------------------------------------------------------------
# output, generation, checking
# ---------------------------------------------------------------------------

def derive_seed(seed, i, family):
    h = hashlib.sha256(("gen3|%d|%d|%s" % (seed, i, family)).encode()).digest()
    return int.from_bytes(h[:8], "big")


def make_workload(seed, i, family):
    name = "%s-%d" % (family, i)
    w = Workload(name, random.Random(derive_seed(seed, i, family)))
    FAMILY_FN[family](w)
    return w.finalize()


def dumps(wl):
    out = ['{"name": %s,' % json.dumps(wl["name"]), ' "pools": [']
    out.append(",\n".join("  " + json.dumps(p) for p in wl["pools"]))
    out.append(' ],')
    out.append(' "jobs": [')
    out.append(",\n".join("  " + json.dumps(j) for j in wl["jobs"]))
    out.append(' ]}')
    return "\n".join(out) + "\n"


def generate(out, count, seed, pick):
    os.makedirs(out, exist_ok=True)
    for fam in FAMILIES:  # drop stale files from an earlier run
        for p in glob.glob(os.path.join(out, fam + "-*.json")):
            os.remove(p)
    chooser = random.Random(derive_seed(seed, -1, "pick"))
    for i in range(count):
        fam = FAMILIES[i % len(FAMILIES)] if pick == "cycle" else chooser.choice(FAMILIES)
        wl = make_workload(seed, i, fam)
        errs = check_workload(wl, wl["name"])
        if errs:
            raise SystemExit("generated invalid workload %s: %s" % (wl["name"], errs[:5]))
        with open(os.path.join(out, wl["name"] + ".json"), "w") as f:
            f.write(dumps(wl))


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _tenth(x):
    return abs(x * 10 - round(x * 10)) < 1e-6


def check_workload(wl, stem):
    e = []
    if not isinstance(wl, dict) or set(wl) != {"name", "pools", "jobs"}:
        return ["top-level keys must be exactly name/pools/jobs"]
    if wl["name"] != stem:
        e.append("name %r != file stem %r" % (wl["name"], stem))
    pools, jobs = wl["pools"], wl["jobs"]
    if not isinstance(pools, list) or not pools:
        e.append("pools must be a non-empty list")
        pools = []
    if not isinstance(jobs, list) or not jobs:
        e.append("jobs must be a non-empty list")
        jobs = []
    if len(jobs) > MAX_JOBS:
        e.append("too many jobs: %d" % len(jobs))
    targets = set()
    for p in pools:
        if not isinstance(p, dict) or set(p) != set(POOL_KEYS):
            e.append("pool keys wrong: %r" % (p,))
            continue
        if not isinstance(p["target"], str) or not p["target"]:
            e.append("pool target must be a non-empty string")
        if p["target"] in targets:
            e.append("duplicate pool target %r" % p["target"])
        targets.add(p["target"])
        if not isinstance(p["devices"], int) or isinstance(p["devices"], bool) or p["devices"] < 1:
            e.append("pool %r devices must be int >= 1" % p["target"])
        if not _num(p["install_s"]) or p["install_s"] <= 0 or not _tenth(p["install_s"]):
            e.append("pool %r install_s must be > 0, rounded to 0.1" % p["target"])
    build_org, build_targets = {}, defaultdict(set)
    for k, j in enumerate(jobs):
        if not isinstance(j, dict) or set(j) != set(JOB_KEYS):
            e.append("job %d keys wrong" % k)
            continue
        for key in ("org_id", "app_version_id", "target"):
            if not isinstance(j[key], str) or not j[key]:
                e.append("job %d %s must be a non-empty string" % (k, key))
        if j["target"] not in targets:
            e.append("job %d target %r has no pool" % (k, j["target"]))
        if not isinstance(j["priority"], int) or isinstance(j["priority"], bool):
            e.append("job %d priority must be int" % k)
        if not _num(j["submit_s"]) or j["submit_s"] < 0 or not _tenth(j["submit_s"]):
            e.append("job %d submit_s must be >= 0, rounded to 0.1" % k)
        if not _num(j["duration_s"]) or j["duration_s"] <= 0 or not _tenth(j["duration_s"]):
            e.append("job %d duration_s must be > 0, rounded to 0.1" % k)
        if j["outcome"] not in OUTCOMES:
            e.append("job %d outcome %r" % (k, j["outcome"]))
        b = j["app_version_id"]
        if build_org.setdefault(b, j["org_id"]) != j["org_id"]:
            e.append("build %r has several orgs" % b)
        build_targets[b].add(j["target"])
    for b, ts in build_targets.items():
        if len(ts) > 2:
            e.append("build %r on more than two targets" % b)
    return e


def check_dir(d):
    files = sorted(glob.glob(os.path.join(d, "*.json")))
    fams, errors = Counter(), 0
    njobs, outc, idle, sizes = 0, Counter(), 0, defaultdict(list)
    for path in files:
        stem = os.path.basename(path)[:-5]
        try:
            with open(path) as f:
                wl = json.load(f)
        except (OSError, ValueError) as ex:
            print("%s: unreadable: %s" % (path, ex))
            errors += 1
            continue
        errs = check_workload(wl, stem)
        if errs:
            errors += 1
            print("%s: %d problem(s): %s" % (path, len(errs), "; ".join(errs[:5])))
            continue
        fam = stem.rsplit("-", 1)[0]
        fams[fam] += 1
        njobs += len(wl["jobs"])
        sizes[fam].append(len(wl["jobs"]))
        outc.update(j["outcome"] for j in wl["jobs"])
        idle += any(p["target"] not in {j["target"] for j in wl["jobs"]} for p in wl["pools"])
    print("%s: %d files, %d invalid, %d jobs total" % (d, len(files), errors, njobs))
    for fam in sorted(fams):
        s = sorted(sizes[fam])
        print("  %-15s %4d files  jobs min/median/max %d/%d/%d" % (fam, fams[fam], s[0], s[len(s) // 2], s[-1]))
    if njobs:
        print("  outcomes: " + ", ".join("%s %.1f%%" % (o, 100.0 * outc[o] / njobs) for o in OUTCOMES))
    print("  workloads with an idle pool: %d" % idle)
    return errors == 0 and len(files) > 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pick", choices=["cycle", "random"], default="cycle",
                    help="cycle through families (default) or choose at random from the seed")
    ap.add_argument("--check", metavar="DIR", help="validate every *.json in DIR and exit")
    a = ap.parse_args(argv)
    if a.check:
        return 0 if check_dir(a.check) else 1
    if not a.out:
        ap.error("--out or --check is required")
    generate(a.out, a.count, a.seed, a.pick)
    return 0 if check_dir(a.out) else 1


if __name__ == "__main__":
    sys.exit(main())
