//! Prometheus metrics, kept as atomics and rendered as text on `GET /metrics`. Gauges that
//! the scheduler already knows (queue depth, leases) are read from it at render time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use qgjob_core::{JobState, StateCounts};

/// Upper bounds (seconds) of the dispatch latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// Counters and histograms.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Jobs submitted (created, not idempotent repeats).
    pub submitted: AtomicU64,
    /// Leases handed out.
    pub leases: AtomicU64,
    /// Leases handed out that required an install.
    pub installs: AtomicU64,
    /// Jobs whose lease expired (requeued or errored).
    pub expirations: AtomicU64,
    /// Reports refused as stale (409).
    pub stale_rejections: AtomicU64,
    /// Jobs requeued for another attempt.
    pub retries: AtomicU64,
    /// Store batches committed.
    pub commits: AtomicU64,
    /// Jobs written in those batches.
    pub committed_jobs: AtomicU64,
    dispatch_buckets: [AtomicU64; BUCKETS.len()],
    dispatch_count: AtomicU64,
    dispatch_sum_us: AtomicU64,
}

impl Metrics {
    /// Records one job's time from becoming ready to being leased.
    pub fn observe_dispatch(&self, ms: u64) {
        let s = ms as f64 / 1000.0;
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.dispatch_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.dispatch_count.fetch_add(1, Ordering::Relaxed);
        self.dispatch_sum_us
            .fetch_add(ms.saturating_mul(1000), Ordering::Relaxed);
    }

    /// Renders everything in the Prometheus text format.
    pub fn render(
        &self,
        depth: &[(String, StateCounts)],
        active_leases: u64,
        devices: u64,
        in_memory: u64,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        };
        let _ = writeln!(
            out,
            "# HELP qgjob_jobs Jobs the scheduler holds, by target and state.\n# TYPE qgjob_jobs gauge"
        );
        for (t, c) in depth {
            for st in JobState::ALL {
                let _ = writeln!(
                    out,
                    "qgjob_jobs{{target=\"{}\",state=\"{}\"}} {}",
                    t,
                    st.as_str(),
                    c.get(st)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP qgjob_active_leases Leases held by devices now.\n# TYPE qgjob_active_leases gauge\nqgjob_active_leases {active_leases}"
        );
        let _ = writeln!(
            out,
            "# HELP qgjob_devices Registered devices.\n# TYPE qgjob_devices gauge\nqgjob_devices {devices}"
        );
        let _ = writeln!(
            out,
            "# HELP qgjob_jobs_in_memory Jobs the scheduler holds in memory (finished ones are forgotten after the retention window).\n# TYPE qgjob_jobs_in_memory gauge\nqgjob_jobs_in_memory {in_memory}"
        );
        counter(
            &mut out,
            "qgjob_jobs_submitted_total",
            "Jobs created.",
            &self.submitted,
        );
        counter(
            &mut out,
            "qgjob_leases_total",
            "Leases handed out.",
            &self.leases,
        );
        counter(
            &mut out,
            "qgjob_installs_total",
            "Leases that required installing the build.",
            &self.installs,
        );
        counter(
            &mut out,
            "qgjob_lease_expirations_total",
            "Jobs whose lease expired.",
            &self.expirations,
        );
        counter(
            &mut out,
            "qgjob_stale_reports_total",
            "Reports refused because their lease was stale.",
            &self.stale_rejections,
        );
        counter(
            &mut out,
            "qgjob_retries_total",
            "Jobs requeued for another attempt.",
            &self.retries,
        );
        counter(
            &mut out,
            "qgjob_store_commits_total",
            "Group commits to the store.",
            &self.commits,
        );
        counter(
            &mut out,
            "qgjob_store_committed_jobs_total",
            "Job records written by group commits.",
            &self.committed_jobs,
        );
        let _ = writeln!(
            out,
            "# HELP qgjob_dispatch_latency_seconds Time from a job becoming ready to its lease.\n# TYPE qgjob_dispatch_latency_seconds histogram"
        );
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "qgjob_dispatch_latency_seconds_bucket{{le=\"{b}\"}} {}",
                self.dispatch_buckets[i].load(Ordering::Relaxed)
            );
        }
        let n = self.dispatch_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "qgjob_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {n}"
        );
        let _ = writeln!(
            out,
            "qgjob_dispatch_latency_seconds_sum {}",
            self.dispatch_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "qgjob_dispatch_latency_seconds_count {n}");
        out
    }
}
