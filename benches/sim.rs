//! Criterion benches of the simulator: one whole simulation of a generated workload per
//! shape, under the grouped policy.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qgjob_core::sim::{self, Shape};
use qgjob_core::PolicyKind;

fn bench_sim(c: &mut Criterion) {
    let mut g = c.benchmark_group("simulate");
    for shape in Shape::ALL {
        let w = sim::generate(shape, 1);
        let id = BenchmarkId::new(shape.as_str(), format!("{}_jobs", w.jobs.len()));
        g.bench_function(id, |b| {
            b.iter(|| black_box(sim::run(&w, PolicyKind::Grouped).expect("simulate")))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Small samples keep the whole `cargo bench -p qgjob-core` within a few minutes.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench_sim
}
criterion_main!(benches);
