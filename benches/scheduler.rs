//! Criterion benches of the core scheduler: submit and lease decisions at scale.

use criterion::{criterion_group, criterion_main, Criterion};
use qgjob_core::*;

fn spec(org: &str, app: &str) -> JobSpec {
    JobSpec::new(
        OrgId::new(org).expect("valid org"),
        AppVersionId::new(app).expect("valid app"),
        vec!["tests/a.spec.js".into()],
    )
}

fn bench_submit(c: &mut Criterion) {
    c.bench_function("submit", |b| {
        let mut s = GroupedScheduler::new(SchedulerConfig::default());
        let mut t = 0u64;
        b.iter(|| {
            t += 1;
            s.submit(Time(t), spec("acme", "v1")).expect("submit")
        })
    });
}

criterion_group!(benches, bench_submit);
criterion_main!(benches);
