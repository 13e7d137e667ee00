//! `qgjob simulate`: runs a workload (format v1, see the README) through the real scheduler in
//! virtual time, or generates one.

use std::io::Write;

use qgjob_core::sim::{self, Report, Workload};
use qgjob_core::PolicyKind;

use crate::cli::{PolicyArg, SimulateArgs};
use crate::error::{CliError, Result, EXIT_OK};

/// The core policy for a `--policy` value.
pub fn policy(p: PolicyArg) -> PolicyKind {
    match p {
        PolicyArg::Grouped => PolicyKind::Grouped,
        PolicyArg::Fifo => PolicyKind::Fifo,
        PolicyArg::PerGroup => PolicyKind::PerGroup,
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// A human-readable rendering of a report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let w = &r.wait_s;
    s.push_str(&format!(
        "policy {}: {} jobs, {} finished\nmakespan {:.1} s (lower bound {:.1} s, ratio {})\ninstalls {} (minimum {}, ratio {})\nutilization {:.0}%\nwait p50 {:.1} s, p95 {:.1} s, max {:.1} s\n",
        r.policy.as_str(),
        r.jobs,
        r.finished,
        r.makespan_s,
        r.lower_bound_s,
        ratio(r.makespan_s, r.lower_bound_s),
        r.installs,
        r.min_installs,
        ratio(r.installs as f64, r.min_installs as f64),
        r.utilization * 100.0,
        w.p50,
        w.p95,
        w.max
    ));
    for (prio, w) in r.wait_s_by_priority.iter().rev() {
        s.push_str(&format!(
            "  priority {prio:>4}: wait p50 {:.1} s, p95 {:.1} s, max {:.1} s\n",
            w.p50, w.p95, w.max
        ));
    }
    for p in &r.pools {
        s.push_str(&format!(
            "pool {} ({} devices): {} jobs, makespan {:.1} s (bound {:.1} s), installs {} (min {}), utilization {:.0}%\n",
            p.target,
            p.devices,
            p.jobs,
            p.makespan_s,
            p.lower_bound_s,
            p.installs,
            p.min_installs,
            p.utilization * 100.0
        ));
    }
    s
}

/// `qgjob simulate`.
pub fn simulate(a: &SimulateArgs) -> Result<u8> {
    let mut out = std::io::stdout().lock();
    if let Some(shape) = a.generate {
        let w = sim::generate(shape, a.seed);
        let _ = writeln!(out, "{}", w.to_json());
        return Ok(EXIT_OK);
    }
    let Some(path) = &a.workload else {
        return Err(CliError::Usage(
            "give --workload FILE or --generate SHAPE".into(),
        ));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::input(format!("reading {}", path.display()), e))?;
    let w = Workload::from_json(&text)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let r = sim::run(&w, policy(a.policy))
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    if a.json {
        let s = serde_json::to_string(&r)
            .map_err(|e| CliError::Other(format!("encoding the report: {e}")))?;
        let _ = writeln!(out, "{s}");
    } else {
        let _ = out.write_all(render(&r).as_bytes());
    }
    Ok(EXIT_OK)
}
