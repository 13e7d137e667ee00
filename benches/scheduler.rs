//! Criterion benches of the core scheduler: submit (single and batches of 1000), the lease
//! decision with 10^3–10^6 queued jobs spread over 10–10^4 build groups, and the clean-up of
//! finished jobs with 10^5 and 10^6 queued.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use qgjob_core::*;

/// Devices asking for work in the lease bench: enough that some serve groups and the
/// policy weighs affinity, spreading and unserved groups.
const DEVICES: usize = 16;
/// Orgs the groups belong to (the fair-share index iterates orgs).
const ORGS: usize = 8;

fn spec(org: &str, app: &str) -> JobSpec {
    JobSpec::new(
        OrgId::new(org).expect("valid org"),
        AppVersionId::new(app).expect("valid app"),
        vec!["tests/a.spec.js".into()],
    )
}

/// The spec of the `i`-th job of group `g`: a few priorities, orgs by group.
fn group_spec(g: usize, i: usize) -> JobSpec {
    let mut s = spec(&format!("org-{}", g % ORGS), &format!("build-{g}"));
    s.priority = Priority((i % 3) as i32);
    s
}

fn bench_submit(c: &mut Criterion) {
    // One submit into a scheduler that grows to the sample's iteration count; a fresh
    // scheduler per sample keeps memory bounded.
    c.bench_function("submit", |b| {
        b.iter_custom(|iters| {
            let mut s = GroupedScheduler::new(SchedulerConfig::default());
            let specs: Vec<JobSpec> = (0..iters).map(|_| spec("acme", "v1")).collect();
            let start = Instant::now();
            for (t, sp) in specs.into_iter().enumerate() {
                black_box(s.submit(Time(t as u64), sp).expect("submit"));
            }
            start.elapsed()
        })
    });

    let batch: Vec<JobSpec> = (0..1000).map(|i| group_spec(i % 10, i)).collect();
    c.bench_function("submit_many/1000", |b| {
        b.iter_batched(
            || {
                (
                    GroupedScheduler::new(SchedulerConfig::default()),
                    batch.clone(),
                )
            },
            |(mut s, specs)| {
                black_box(s.submit_many(Time(1), specs).expect("submit_many"));
                // Returned so that dropping it is not measured.
                s
            },
            BatchSize::LargeInput,
        )
    });
}

/// A scheduler with `jobs` queued jobs over `groups` groups and [`DEVICES`] registered
/// devices, half of which already hold a build (so some groups are served).
fn queued(jobs: usize, groups: usize) -> (GroupedScheduler, Vec<DeviceId>) {
    let mut s = GroupedScheduler::new(SchedulerConfig::default());
    let chunk = 10_000;
    let mut i = 0;
    while i < jobs {
        let n = chunk.min(jobs - i);
        let specs: Vec<JobSpec> = (i..i + n).map(|k| group_spec(k % groups, k)).collect();
        s.submit_many(Time(i as u64 / 100), specs)
            .expect("submit_many");
        i += n;
    }
    let devices: Vec<DeviceId> = (0..DEVICES)
        .map(|d| DeviceId::new(format!("emu-{d:02}")).expect("valid device id"))
        .collect();
    for (d, id) in devices.iter().enumerate() {
        let installed = (d % 2 == 0).then(|| BuildRef {
            org_id: OrgId::new(format!("org-{}", d % groups % ORGS)).expect("valid org"),
            app_version_id: AppVersionId::new(format!("build-{}", d % groups)).expect("valid app"),
        });
        let info = DeviceInfo {
            id: id.clone(),
            target: Target::Emulator,
            capabilities: Capabilities::default(),
            installed,
            install_estimate_ms: Some(45_000),
            idle: false,
            session: None,
            replaces: None,
        };
        s.register_device(Time(0), info).expect("register");
    }
    s.take_events();
    (s, devices)
}

fn bench_lease(c: &mut Criterion) {
    let report = RunReport {
        passed: true,
        tests: Vec::new(),
        duration_ms: 30_000,
        error: None,
    };
    for jobs in [1_000usize, 10_000, 100_000, 1_000_000] {
        for groups in [10usize, 1_000, 10_000] {
            if groups > jobs {
                continue;
            }
            let (mut s, devices) = queued(jobs, groups);
            let mut now = 1_000_000u64;
            let mut k = 0usize;
            let mut g = c.benchmark_group("lease_decision");
            // Two measures on the same queue: the decision with the job put back (lease,
            // complete, resubmit), and the lease call alone (the put-back runs untimed).
            for only_lease in [false, true] {
                let name = if only_lease {
                    "lease_only"
                } else {
                    "lease+putback"
                };
                let id =
                    BenchmarkId::new(format!("{name}/{jobs}_jobs"), format!("{groups}_groups"));
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut took = Duration::ZERO;
                        let mut start = Instant::now();
                        for _ in 0..iters {
                            // One decision for the next device; then the job goes back as a new
                            // one of the same build, so the queue keeps its size and shape.
                            now += 1;
                            k += 1;
                            let dev = &devices[k % DEVICES];
                            if only_lease {
                                start = Instant::now();
                            }
                            let lease = s.lease(Time(now), dev, 1).expect("lease");
                            if only_lease {
                                took += start.elapsed();
                            }
                            if let Some(lease) = lease {
                                for j in &lease.jobs {
                                    s.complete(Time(now), lease.id, j.id, report.clone())
                                        .expect("complete");
                                    s.submit(Time(now), j.spec.clone()).expect("resubmit");
                                }
                            }
                        }
                        if !only_lease {
                            took = start.elapsed();
                        }
                        // Events are dropped outside the measured time. Finished jobs stay:
                        // `forget_finished` scans every job (about 0.5 s at 10^6), and a pause
                        // that long between samples wrecks criterion's iteration estimate.
                        s.take_events();
                        took
                    })
                });
            }
            g.finish();
            assert_eq!(s.ready_len(), jobs, "the queue kept its size");

            // What the server's periodic clean-up costs with this many jobs queued: it holds
            // the scheduler for the whole call. 100 jobs finish (untimed) before each call.
            if groups == 10 && jobs >= 100_000 {
                let mut f = c.benchmark_group("forget_finished");
                f.bench_function(format!("{jobs}_queued"), |b| {
                    b.iter_custom(|iters| {
                        let mut took = Duration::ZERO;
                        for _ in 0..iters {
                            for _ in 0..100 {
                                now += 1;
                                k += 1;
                                let dev = &devices[k % DEVICES];
                                if let Some(lease) = s.lease(Time(now), dev, 1).expect("lease") {
                                    for j in &lease.jobs {
                                        s.complete(Time(now), lease.id, j.id, report.clone())
                                            .expect("complete");
                                        s.submit(Time(now), j.spec.clone()).expect("resubmit");
                                    }
                                }
                            }
                            s.take_events();
                            let start = Instant::now();
                            black_box(s.forget_finished(Time(now + 1)));
                            took += start.elapsed();
                        }
                        took
                    })
                });
                f.finish();
            }
        }
    }
}

fn config() -> Criterion {
    // Small samples keep the whole `cargo bench -p qgjob-core` within a few minutes.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_submit, bench_lease
}
criterion_main!(benches);
