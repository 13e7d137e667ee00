//! Reports over finished jobs, as pure functions of the server's `Job` JSON: the summary
//! table, JUnit XML, the GitHub Actions job summary and annotations, and the exit code.

use std::fmt::Write as _;

use qgjob_core::{Job, JobState, TestResult, TestStatus};

use crate::error::{EXIT_INFRA, EXIT_OK, EXIT_TEST_FAILED};
use crate::real::playwright::strip_ansi;
use crate::util::{fmt_ms, paint};

/// One line of the summary table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The job's test files.
    pub test: String,
    /// The app version it tested.
    pub app: String,
    /// Its target pool.
    pub target: String,
    /// The device that ran its last attempt, or `-`.
    pub device: String,
    /// Attempts used.
    pub attempts: u32,
    /// Duration of the last attempt in ms (None when it never ran to the end).
    pub duration_ms: Option<u64>,
    /// Its state (`passed`, `failed`, …), `flaky` noted.
    pub result: String,
    /// The state itself, for colouring.
    pub state: JobState,
}

/// How long the job's last attempt took, when it has both ends.
pub fn job_duration_ms(job: &Job) -> Option<u64> {
    match (job.started_at, job.finished_at) {
        (Some(s), Some(f)) => Some(f.since(s)),
        _ => None,
    }
}

/// The summary row of one job.
pub fn row(job: &Job) -> Row {
    let flaky = job.outcome.as_ref().is_some_and(|o| o.flaky);
    Row {
        test: job.spec.tests.join(", "),
        app: job.spec.app_version_id.to_string(),
        target: job.spec.target.to_string(),
        device: job
            .device
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_else(|| "-".into()),
        attempts: job.attempt,
        duration_ms: job_duration_ms(job),
        result: if flaky && job.state == JobState::Passed {
            "passed (flaky)".into()
        } else {
            job.state.to_string()
        },
        state: job.state,
    }
}

fn state_colour(s: JobState) -> &'static str {
    match s {
        JobState::Passed => "32",
        JobState::Failed | JobState::Error => "31",
        JobState::Canceled => "33",
        JobState::Queued | JobState::Running => "36",
    }
}

/// The summary table (test, app, target, device, attempts, duration, result) with a totals
/// line.
/// `colour` paints results; widths are computed from the plain text so columns line up.
pub fn summary_table(jobs: &[Job], colour: bool) -> String {
    let rows: Vec<Row> = jobs.iter().map(row).collect();
    let header = [
        "TEST", "APP", "TARGET", "DEVICE", "ATTEMPTS", "DURATION", "RESULT",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.test.clone(),
                r.app.clone(),
                r.target.clone(),
                r.device.clone(),
                r.attempts.to_string(),
                r.duration_ms.map(fmt_ms).unwrap_or_else(|| "-".into()),
                r.result.clone(),
            ]
        })
        .collect();
    let mut w = header.map(|h| h.len());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, c: &[String; 7], paint_last: Option<JobState>| {
        for (i, s) in c.iter().enumerate() {
            let pad = w[i].saturating_sub(s.chars().count());
            if i == 6 {
                match paint_last {
                    Some(st) => out.push_str(&paint(s, state_colour(st), colour)),
                    None => out.push_str(s),
                }
            } else {
                out.push_str(s);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(&mut out, &header.map(String::from), None);
    for (c, r) in cells.iter().zip(&rows) {
        line(&mut out, c, Some(r.state));
    }
    let _ = writeln!(out, "{}", totals_line(jobs));
    out
}

/// `N jobs: P passed, F failed, E error, C canceled` (zero counts left out).
pub fn totals_line(jobs: &[Job]) -> String {
    let mut counts = [0usize; 6];
    for j in jobs {
        let i = JobState::ALL
            .iter()
            .position(|s| *s == j.state)
            .unwrap_or(0);
        counts[i] += 1;
    }
    let parts: Vec<String> = JobState::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    format!(
        "{} job{}: {}",
        jobs.len(),
        if jobs.len() == 1 { "" } else { "s" },
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    )
}

/// The exit code for a set of jobs: 0 all passed, 1 a test failed, 3 otherwise (error,
/// canceled, or not finished).
pub fn exit_code(jobs: &[Job]) -> u8 {
    if jobs.iter().any(|j| j.state == JobState::Failed) {
        EXIT_TEST_FAILED
    } else if !jobs.is_empty() && jobs.iter().all(|j| j.state == JobState::Passed) {
        EXIT_OK
    } else {
        EXIT_INFRA
    }
}

/// Escapes text for XML attributes and content; drops ANSI escape codes (test runners
/// colour titles and messages; dropping only the ESC byte left `[31m` behind) and
/// characters XML 1.0 forbids.
pub fn xml_escape(s: &str) -> String {
    let s = strip_ansi(s);
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\t' | '\n' | '\r' => o.push(c),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {}
            c => o.push(c),
        }
    }
    o
}

fn secs(ms: u64) -> String {
    format!("{:.3}", ms as f64 / 1000.0)
}

/// What one JUnit test case records.
enum Case {
    Pass,
    Failure(String),
    Error(String),
    Skipped(String),
}

fn case_of_result(t: &TestResult) -> Case {
    match t.status {
        TestStatus::Passed | TestStatus::Flaky => Case::Pass,
        TestStatus::Skipped => Case::Skipped("skipped".into()),
        TestStatus::Failed | TestStatus::TimedOut | TestStatus::Interrupted => Case::Failure(
            t.error
                .clone()
                .unwrap_or_else(|| format!("{:?}", t.status).to_lowercase()),
        ),
    }
}

/// The error of an earlier attempt and that attempt's number: the server keeps the error
/// that made it retry the job (`last_error`) after the job moves on, so it never describes
/// the final attempt, and a job that passed on a retry still carries one.
pub fn earlier_attempt_error(job: &Job) -> Option<(u32, &str)> {
    let e = job.last_error.as_deref()?;
    // Set when attempt N failed and N + 1 began: the attempt before the current one.
    Some((job.attempt.saturating_sub(1).max(1), e))
}

fn case_of_job(job: &Job) -> Case {
    let err = || job.outcome.as_ref().and_then(|o| o.error.clone());
    // Only ever alongside the final attempt's own result, and labelled as earlier.
    let earlier = || earlier_attempt_error(job).map(|(n, e)| format!("earlier attempt {n}: {e}"));
    match job.state {
        JobState::Passed => Case::Pass,
        JobState::Failed => Case::Failure(err().unwrap_or_else(|| match earlier() {
            Some(e) => format!("a test failed ({e})"),
            None => "a test failed".into(),
        })),
        JobState::Error => Case::Error(
            err()
                .or_else(earlier)
                .unwrap_or_else(|| "infrastructure error".into()),
        ),
        // An error, not a skip: dashboards show skipped cases green, and a canceled run did
        // not pass.
        JobState::Canceled => Case::Error(match err().or_else(earlier) {
            Some(e) if e.contains("cancel") => e,
            Some(e) => format!("canceled ({e})"),
            None => "canceled before it finished".into(),
        }),
        JobState::Queued | JobState::Running => {
            Case::Error(format!("did not finish (still {})", job.state))
        }
    }
}

/// JUnit XML for `jobs`: one `<testsuite>` per job, one `<testcase>` per reported test (or
/// per spec file when the device reported no per-test results).
pub fn junit_xml(name: &str, jobs: &[Job]) -> String {
    let mut suites = String::new();
    let (mut t_all, mut f_all, mut e_all, mut s_all, mut ms_all) = (0, 0, 0, 0, 0u64);
    for job in jobs {
        let mut cases: Vec<(String, String, u64, Case)> = Vec::new();
        let tests = job
            .outcome
            .as_ref()
            .map(|o| o.tests.as_slice())
            .unwrap_or(&[]);
        if tests.is_empty() {
            let per = job_duration_ms(job).unwrap_or(0) / job.spec.tests.len().max(1) as u64;
            for f in &job.spec.tests {
                cases.push((f.clone(), f.clone(), per, case_of_job(job)));
            }
        } else {
            for t in tests {
                let class = if t.file.is_empty() {
                    job.spec.tests.join(", ")
                } else {
                    t.file.clone()
                };
                cases.push((t.title.clone(), class, t.duration_ms, case_of_result(t)));
            }
            // A job that errored after tests ran still needs a visible error.
            if matches!(job.state, JobState::Error | JobState::Canceled) {
                cases.push((
                    "(job)".into(),
                    job.spec.tests.join(", "),
                    0,
                    case_of_job(job),
                ));
            }
        }
        let (mut f, mut e, mut s) = (0, 0, 0);
        let mut body = String::new();
        for (title, class, ms, case) in &cases {
            let _ = write!(
                body,
                "    <testcase name=\"{}\" classname=\"{}\" time=\"{}\"",
                xml_escape(title),
                xml_escape(class),
                secs(*ms)
            );
            match case {
                Case::Pass => body.push_str("/>\n"),
                Case::Failure(m) => {
                    f += 1;
                    let first = m.lines().next().unwrap_or("");
                    let _ = write!(
                        body,
                        ">\n      <failure message=\"{}\" type=\"failed\">{}</failure>\n    </testcase>\n",
                        xml_escape(first),
                        xml_escape(m)
                    );
                }
                Case::Error(m) => {
                    e += 1;
                    let _ = write!(
                        body,
                        ">\n      <error message=\"{}\" type=\"error\">{}</error>\n    </testcase>\n",
                        xml_escape(m.lines().next().unwrap_or("")),
                        xml_escape(m)
                    );
                }
                Case::Skipped(m) => {
                    s += 1;
                    let _ = write!(
                        body,
                        ">\n      <skipped message=\"{}\"/>\n    </testcase>\n",
                        xml_escape(m)
                    );
                }
            }
        }
        let ms = job_duration_ms(job).unwrap_or(0);
        let _ = write!(
            suites,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\" errors=\"{e}\" skipped=\"{s}\" time=\"{}\">\n    <properties>\n",
            xml_escape(&job.spec.tests.join(", ")),
            cases.len(),
            secs(ms)
        );
        let props = [
            ("job_id", job.id.to_string()),
            ("org_id", job.spec.org_id.to_string()),
            ("app_version_id", job.spec.app_version_id.to_string()),
            ("target", job.spec.target.to_string()),
            (
                "device",
                job.device
                    .as_ref()
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
            ),
            ("attempts", job.attempt.to_string()),
            ("state", job.state.to_string()),
        ];
        for (k, v) in props {
            let _ = writeln!(
                suites,
                "      <property name=\"{k}\" value=\"{}\"/>",
                xml_escape(&v)
            );
        }
        suites.push_str("    </properties>\n");
        suites.push_str(&body);
        suites.push_str("  </testsuite>\n");
        t_all += cases.len();
        f_all += f;
        e_all += e;
        s_all += s;
        ms_all += ms;
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"{}\" tests=\"{t_all}\" failures=\"{f_all}\" errors=\"{e_all}\" skipped=\"{s_all}\" time=\"{}\">\n{suites}</testsuites>\n",
        xml_escape(name),
        secs(ms_all)
    )
}

/// Escapes a GitHub workflow-command message (ANSI codes dropped).
fn gh_data(s: &str) -> String {
    strip_ansi(s)
        .replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Escapes a GitHub workflow-command property value.
fn gh_prop(s: &str) -> String {
    gh_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// `::error` annotations (one per failed test or job) for GitHub Actions.
pub fn github_annotations(jobs: &[Job]) -> Vec<String> {
    let mut out = Vec::new();
    for job in jobs {
        let tests = job
            .outcome
            .as_ref()
            .map(|o| o.tests.as_slice())
            .unwrap_or(&[]);
        let failed: Vec<&TestResult> = tests
            .iter()
            .filter(|t| matches!(case_of_result(t), Case::Failure(_)))
            .collect();
        if !failed.is_empty() {
            for t in failed {
                let file = if t.file.is_empty() {
                    job.spec.tests.first().cloned().unwrap_or_default()
                } else {
                    t.file.clone()
                };
                out.push(format!(
                    "::error file={},title={}::{}",
                    gh_prop(&file),
                    gh_prop(&format!("{} ({})", t.title, job.spec.target)),
                    gh_data(t.error.as_deref().unwrap_or("test failed"))
                ));
            }
            continue;
        }
        let msg = match case_of_job(job) {
            Case::Pass | Case::Skipped(_) => continue,
            Case::Failure(m) | Case::Error(m) => m,
        };
        out.push(format!(
            "::error file={},title={}::{}",
            gh_prop(job.spec.tests.first().map(String::as_str).unwrap_or("")),
            gh_prop(&format!("qgjob {} {}", job.state, job.spec.target)),
            gh_data(&msg)
        ));
    }
    out
}

/// A Markdown job summary for `$GITHUB_STEP_SUMMARY`.
pub fn github_summary(title: &str, jobs: &[Job]) -> String {
    let mut s = String::new();
    let icon = match exit_code(jobs) {
        EXIT_OK => "✅",
        EXIT_TEST_FAILED => "❌",
        _ => "⚠️",
    };
    let _ = writeln!(s, "### {icon} qgjob {}\n", md(title));
    let _ = writeln!(s, "{}\n", totals_line(jobs));
    s.push_str("| Test | App | Target | Device | Attempts | Duration | Result |\n");
    s.push_str("|---|---|---|---|---:|---:|---|\n");
    for j in jobs {
        let r = row(j);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            md(&r.test),
            md(&r.app),
            md(&r.target),
            md(&r.device),
            r.attempts,
            r.duration_ms.map(fmt_ms).unwrap_or_else(|| "-".into()),
            md(&r.result)
        );
    }
    let failures: Vec<String> = jobs
        .iter()
        .flat_map(|j| {
            j.outcome
                .iter()
                .flat_map(|o| o.tests.iter())
                .filter(|t| matches!(case_of_result(t), Case::Failure(_)))
                .map(move |t| {
                    format!(
                        "- **{}** ({}): {}",
                        md(&t.title),
                        md(j.spec.target.as_str()),
                        md(t.error
                            .as_deref()
                            .unwrap_or("failed")
                            .lines()
                            .next()
                            .unwrap_or(""))
                    )
                })
        })
        .collect();
    if !failures.is_empty() {
        s.push_str("\n**Failures**\n\n");
        for f in failures {
            s.push_str(&f);
            s.push('\n');
        }
    }
    s
}

/// Escapes Markdown table cells (ANSI codes dropped).
fn md(s: &str) -> String {
    strip_ansi(s).replace('|', "\\|").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgjob_core::{AppVersionId, DeviceId, JobId, JobSpec, OrgId, Outcome, TestCounts, Time};

    fn job(n: u8, file: &str, state: JobState, tests: Vec<TestResult>) -> Job {
        let mut spec = JobSpec::new(
            OrgId::new("acme").unwrap(),
            AppVersionId::new("v1").unwrap(),
            vec![file.to_string()],
        );
        spec.target = "browserstack".parse().unwrap();
        Job {
            id: JobId::from_parts(1_000 + n as u64, [n; 10]),
            seq: n as u64,
            spec,
            state,
            attempt: 2,
            created_at: Time(1_000),
            released_at: Time(1_000),
            started_at: Some(Time(2_000)),
            finished_at: state.is_final().then_some(Time(4_500)),
            not_before: None,
            device: Some(DeviceId::new("sim/bs-1").unwrap()),
            lease: None,
            last_lease: None,
            lease_deadline: None,
            installed: true,
            cancel_requested: false,
            had_failure: false,
            last_error: None,
            outcome: state.is_final().then(|| Outcome {
                state,
                flaky: false,
                counts: TestCounts::of(&tests),
                tests: tests.clone(),
                error: (state != JobState::Passed).then(|| format!("job {state}")),
            }),
        }
    }

    fn failing_test() -> TestResult {
        TestResult {
            title: "login › rejects <bad> & \"wrong\" password".into(),
            file: "tests/login.spec.js".into(),
            status: TestStatus::Failed,
            duration_ms: 1200,
            error: Some("expected 1\nreceived 2".into()),
        }
    }

    #[test]
    fn exit_codes_follow_the_convention() {
        let p = job(1, "a.spec.js", JobState::Passed, vec![]);
        let f = job(2, "b.spec.js", JobState::Failed, vec![]);
        let e = job(3, "c.spec.js", JobState::Error, vec![]);
        let c = job(4, "d.spec.js", JobState::Canceled, vec![]);
        let q = job(5, "e.spec.js", JobState::Running, vec![]);
        assert_eq!(exit_code(std::slice::from_ref(&p)), 0);
        assert_eq!(exit_code(&[p.clone(), f.clone(), e.clone()]), 1);
        assert_eq!(exit_code(&[p.clone(), e]), 3);
        assert_eq!(exit_code(&[p.clone(), c]), 3);
        assert_eq!(exit_code(&[p, q]), 3);
        assert_eq!(exit_code(&[]), 3);
    }

    #[test]
    fn table_has_one_row_per_job_and_aligned_columns() {
        let jobs = vec![
            job(1, "tests/a.spec.js", JobState::Passed, vec![]),
            job(2, "tests/long/name.spec.js", JobState::Failed, vec![]),
        ];
        let t = summary_table(&jobs, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("TEST"));
        let col = lines[0].find("TARGET").unwrap();
        assert_eq!(&lines[1][col..col + 12], "browserstack");
        assert_eq!(&lines[2][col..col + 12], "browserstack");
        assert!(lines[1].contains("2.5s") && lines[1].ends_with("passed"));
        assert!(lines[2].ends_with("failed"));
        assert_eq!(lines[3], "2 jobs: 1 passed, 1 failed");
        assert!(!t.contains('\x1b'));
        assert!(summary_table(&jobs, true).contains("\x1b[31mfailed"));
    }

    /// One passed job, one whose test failed and one infrastructure error.
    fn passed_failed_error() -> Vec<Job> {
        vec![
            job(1, "tests/a.spec.js", JobState::Passed, vec![]),
            job(
                2,
                "tests/login.spec.js",
                JobState::Failed,
                vec![failing_test()],
            ),
            job(3, "tests/c.spec.js", JobState::Error, vec![]),
        ]
    }

    #[test]
    fn junit_is_well_formed_and_counts_failures() {
        let jobs = passed_failed_error();
        let xml = junit_xml("run x", &jobs);
        let mut r = quick_xml::Reader::from_str(&xml);
        let (mut suites, mut cases, mut failures, mut errors) = (0, 0, 0, 0);
        let mut failure_msg = String::new();
        loop {
            match r.read_event().expect("well-formed XML") {
                quick_xml::events::Event::Eof => break,
                quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                    match e.name().as_ref() {
                        b"testsuite" => suites += 1,
                        b"testcase" => cases += 1,
                        b"failure" => {
                            failures += 1;
                            failure_msg = e
                                .try_get_attribute("message")
                                .unwrap()
                                .unwrap()
                                .unescape_value()
                                .unwrap()
                                .into_owned();
                        }
                        b"error" => errors += 1,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        assert_eq!((suites, cases, failures, errors), (3, 3, 1, 1));
        assert_eq!(failure_msg, "expected 1");
        assert!(xml.contains("tests=\"3\" failures=\"1\" errors=\"1\" skipped=\"0\""));
        assert!(xml.contains("&lt;bad&gt; &amp; &quot;wrong&quot;"));
    }

    #[test]
    fn junit_reports_canceled_jobs_as_errors_and_strips_ansi() {
        let coloured = TestResult {
            title: "\u{1b}[1mlogin\u{1b}[22m › works".into(),
            file: "tests/login.spec.js".into(),
            status: TestStatus::Failed,
            duration_ms: 10,
            error: Some("\u{1b}[31mexpected\u{1b}[39m 1".into()),
        };
        let skipped = TestResult {
            title: "later".into(),
            status: TestStatus::Skipped,
            error: None,
            ..coloured.clone()
        };
        let jobs = vec![
            job(1, "tests/a.spec.js", JobState::Canceled, vec![]),
            job(2, "tests/login.spec.js", JobState::Failed, vec![coloured]),
            job(3, "tests/b.spec.js", JobState::Passed, vec![skipped]),
        ];
        let xml = junit_xml("run x", &jobs);
        assert!(
            xml.contains("tests=\"3\" failures=\"1\" errors=\"1\" skipped=\"1\""),
            "{xml}"
        );
        assert!(
            xml.contains("<error message=\"job canceled\" type=\"error\">"),
            "{xml}"
        );
        assert!(xml.contains("name=\"login › works\""), "{xml}");
        assert!(xml.contains("<failure message=\"expected 1\""), "{xml}");
        assert!(!xml.contains("[31m") && !xml.contains("[1m"), "{xml}");
        // A canceled job without a reason still says what happened.
        let mut bare = job(4, "tests/c.spec.js", JobState::Canceled, vec![]);
        bare.outcome = None;
        assert!(junit_xml("x", &[bare]).contains("<error message=\"canceled before it finished\""));
        let ann = github_annotations(&jobs);
        assert_eq!(ann.len(), 2, "{ann:?}");
        assert!(ann.iter().all(|a| !a.contains('\u{1b}')), "{ann:?}");
        let md = github_summary("run x", &jobs);
        assert!(md.contains("**login › works**"), "{md}");
    }

    /// The error that made the server retry a job belongs to that earlier attempt: it is
    /// never reported as the final attempt's failure, and a job that passed on a retry
    /// reports none.
    #[test]
    fn an_earlier_attempts_error_is_not_the_jobs_result() {
        let mut passed = job(1, "tests/a.spec.js", JobState::Passed, vec![]);
        passed.last_error = Some("install failed: adb: device offline".into());
        let mut failed = job(2, "tests/b.spec.js", JobState::Failed, vec![]);
        failed.last_error = Some("install failed: adb: device offline".into());
        if let Some(o) = failed.outcome.as_mut() {
            o.error = None;
        }
        let xml = junit_xml("run x", &[passed.clone(), failed.clone()]);
        assert!(
            xml.contains(
                "<failure message=\"a test failed (earlier attempt 1: install failed: adb: \
                 device offline)\""
            ),
            "{xml}"
        );
        assert!(xml.contains("failures=\"1\" errors=\"0\""), "{xml}");
        let ann = github_annotations(&[passed, failed]);
        assert_eq!(ann.len(), 1, "{ann:?}");
        assert!(
            ann[0].ends_with(
                "::a test failed (earlier attempt 1: install failed: adb: device offline)"
            ),
            "{ann:?}"
        );
    }

    #[test]
    fn github_outputs_name_failures() {
        let jobs = passed_failed_error();
        let ann = github_annotations(&jobs);
        assert_eq!(ann.len(), 2);
        assert!(ann[0].starts_with("::error file=tests/login.spec.js,title="));
        assert!(ann[0].ends_with("::expected 1%0Areceived 2"));
        assert!(ann[1].contains("job error"));
        let md = github_summary("run x", &jobs);
        assert!(md.starts_with("### ❌ qgjob run x"));
        assert_eq!(md.matches("| browserstack |").count(), 3);
        assert!(md.contains("**Failures**"));
    }
}
