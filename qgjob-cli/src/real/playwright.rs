//! Parses Playwright's JSON report (what `--reporter=json` writes, AppWright included) into
//! per-test results.
//!
//! The report's top level is `{config, suites, errors, stats}`. Suites nest: a file is a
//! top-level suite and every `describe` block is a child suite. Each spec has `tests[]` (one
//! per project) and each test has `results[]` (one per retry) with `status`, `duration`,
//! `error.message` and `errors[]`. Messages carry ANSI colour codes, which are stripped here.

use qgjob_core::{TestResult, TestStatus};
use serde::Deserialize;
use thiserror::Error;

/// Longest error message kept per test; the full text stays in the job's logs.
const MAX_MESSAGE: usize = 4096;

/// The report could not be read.
#[derive(Debug, Error)]
#[error("unreadable Playwright JSON report: {0}")]
pub struct ReportParseError(#[from] serde_json::Error);

/// What a report says, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedReport {
    /// One entry per test (per project when a spec ran in several).
    pub tests: Vec<TestResult>,
    /// Errors outside any test (a spec that does not load, "No tests found", a global
    /// setup failure), colour codes stripped.
    pub errors: Vec<String>,
    /// The whole run's wall time in milliseconds, as Playwright measured it.
    pub duration_ms: u64,
    /// No test ran because the run failed before any spec could: errors outside tests that
    /// point at no spec file and are not "No tests found" (AppWright's global setup not
    /// finding the device or SDK, a broken config). That is the machine's fault, not the
    /// tests'. A spec that does not load points at its file and is not counted here.
    pub setup_failed: bool,
}

impl ParsedReport {
    /// Whether every test passed (flaky and skipped tests count as passing) and nothing
    /// failed outside a test. A report without any test does not pass.
    pub fn passed(&self) -> bool {
        !self.tests.is_empty()
            && self.errors.is_empty()
            && self.tests.iter().all(|t| {
                matches!(
                    t.status,
                    TestStatus::Passed | TestStatus::Flaky | TestStatus::Skipped
                )
            })
    }

    /// A one-line summary of why the run did not pass: the first failing test and its
    /// message, or the first error outside tests.
    pub fn failure_summary(&self) -> Option<String> {
        if let Some(t) = self.tests.iter().find(|t| {
            !matches!(
                t.status,
                TestStatus::Passed | TestStatus::Flaky | TestStatus::Skipped
            )
        }) {
            let msg = t
                .error
                .as_deref()
                .and_then(|m| m.lines().find(|l| !l.trim().is_empty()))
                .unwrap_or("");
            return Some(
                format!("{}: {}", t.title, msg.trim())
                    .trim_end_matches([':', ' '])
                    .to_string(),
            );
        }
        if let Some(e) = self.errors.first() {
            return Some(e.lines().next().unwrap_or("").trim().to_string());
        }
        if self.tests.is_empty() {
            return Some("the report lists no tests".to_string());
        }
        None
    }
}

#[derive(Deserialize)]
struct RawReport {
    #[serde(default)]
    suites: Vec<RawSuite>,
    #[serde(default)]
    errors: Vec<RawError>,
    #[serde(default)]
    stats: Option<RawStats>,
}

#[derive(Deserialize)]
struct RawStats {
    #[serde(default)]
    duration: f64,
}

#[derive(Deserialize)]
struct RawSuite {
    #[serde(default)]
    title: String,
    #[serde(default)]
    file: String,
    #[serde(default)]
    specs: Vec<RawSpec>,
    #[serde(default)]
    suites: Vec<RawSuite>,
}

#[derive(Deserialize)]
struct RawSpec {
    #[serde(default)]
    title: String,
    #[serde(default)]
    file: String,
    #[serde(default)]
    tests: Vec<RawTest>,
}

#[derive(Deserialize)]
struct RawTest {
    #[serde(default, rename = "projectName")]
    project_name: String,
    /// Playwright's verdict: expected, unexpected, flaky or skipped.
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    results: Vec<RawResult>,
}

#[derive(Deserialize)]
struct RawResult {
    #[serde(default)]
    status: String,
    #[serde(default)]
    duration: f64,
    #[serde(default)]
    error: Option<RawError>,
    #[serde(default)]
    errors: Vec<RawError>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    value: Option<String>,
    /// Where the error happened; set when a spec file is at fault.
    #[serde(default)]
    location: Option<serde_json::Value>,
}

impl RawError {
    fn text(&self) -> Option<String> {
        self.message
            .as_deref()
            .or(self.value.as_deref())
            .map(clean_message)
    }
}

/// Parses a report from its JSON text.
pub fn parse_report(json: &str) -> Result<ParsedReport, ReportParseError> {
    let raw: RawReport = serde_json::from_str(json)?;
    let mut tests = Vec::new();
    for suite in &raw.suites {
        // A top-level suite is the spec file; its title is the file name, not part of the
        // test's title (Playwright's own reporters show `describe › test`).
        walk(suite, &mut Vec::new(), &suite.file, &mut tests);
    }
    let errors: Vec<String> = raw.errors.iter().filter_map(RawError::text).collect();
    let setup_failed = tests.is_empty()
        && !raw.errors.is_empty()
        && raw.errors.iter().all(|e| e.location.is_none())
        && !errors
            .iter()
            .all(|e| e.starts_with("Error: No tests found"));
    Ok(ParsedReport {
        tests,
        errors,
        duration_ms: raw.stats.map(|s| ms(s.duration)).unwrap_or(0),
        setup_failed,
    })
}

fn walk(suite: &RawSuite, path: &mut Vec<String>, file: &str, out: &mut Vec<TestResult>) {
    for spec in &suite.specs {
        let spec_file = if spec.file.is_empty() {
            file
        } else {
            &spec.file
        };
        let several = spec.tests.len() > 1;
        for test in &spec.tests {
            let mut parts: Vec<&str> = Vec::new();
            if several && !test.project_name.is_empty() {
                parts.push(&test.project_name);
            }
            parts.extend(path.iter().map(String::as_str));
            parts.push(&spec.title);
            out.push(TestResult {
                title: parts.join(" › "),
                file: spec_file.to_string(),
                status: test_status(test),
                duration_ms: test.results.iter().map(|r| ms(r.duration)).sum(),
                error: first_error(test),
            });
        }
    }
    for child in &suite.suites {
        let child_file = if child.file.is_empty() {
            file
        } else {
            &child.file
        };
        path.push(child.title.clone());
        walk(child, path, child_file, out);
        path.pop();
    }
}

fn ms(f: f64) -> u64 {
    if f.is_finite() && f > 0.0 {
        f.round() as u64
    } else {
        0
    }
}

fn result_status(s: &str) -> TestStatus {
    match s {
        "passed" => TestStatus::Passed,
        "skipped" => TestStatus::Skipped,
        "timedOut" => TestStatus::TimedOut,
        "interrupted" => TestStatus::Interrupted,
        _ => TestStatus::Failed,
    }
}

fn test_status(test: &RawTest) -> TestStatus {
    let last = test.results.last().map(|r| r.status.as_str());
    match test.status.as_deref() {
        Some("flaky") => TestStatus::Flaky,
        Some("skipped") => TestStatus::Skipped,
        // "expected" also covers `test.fail()` tests whose failure was expected.
        Some("expected") => match last {
            Some("skipped") => TestStatus::Skipped,
            _ => TestStatus::Passed,
        },
        Some("unexpected") => match last.map(result_status) {
            // An unexpected pass (a `test.fail()` that passed) is a failure.
            Some(TestStatus::Passed) | None => TestStatus::Failed,
            Some(s) => s,
        },
        // No verdict (older or foreign reports): judge from the results themselves.
        _ => {
            let Some(last) = last else {
                return TestStatus::Skipped;
            };
            let last = result_status(last);
            let failed_before = test.results.iter().any(|r| {
                !matches!(
                    result_status(&r.status),
                    TestStatus::Passed | TestStatus::Skipped
                )
            });
            if last == TestStatus::Passed && failed_before {
                TestStatus::Flaky
            } else {
                last
            }
        }
    }
}

fn first_error(test: &RawTest) -> Option<String> {
    test.results.iter().find_map(|r| {
        r.error
            .as_ref()
            .and_then(RawError::text)
            .or_else(|| r.errors.iter().find_map(RawError::text))
    })
}

/// Strips ANSI codes, trims, and caps the length of a message (at a char boundary).
fn clean_message(s: &str) -> String {
    let mut out = strip_ansi(s).trim().to_string();
    if out.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Removes ANSI escape sequences (CSI such as colours, OSC such as hyperlinks, and
/// two-byte escapes) from `s`.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            Some('[') => {
                chars.next();
                // Parameters and intermediates, up to a final byte in @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                chars.next();
                // Operating system command: ends with BEL or ESC \.
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' {
                        if chars.peek() == Some(&'\\') {
                            chars.next();
                        }
                        break;
                    }
                }
            }
            Some(_) => {
                chars.next();
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = include_str!("testdata/playwright-report.json");
    const LOAD_ERROR: &str = include_str!("testdata/playwright-load-error.json");
    /// A real report of `npx appwright test --project emulator` on a machine without an
    /// Android SDK: AppWright's global setup fails before any test.
    const APPWRIGHT_SETUP: &str = include_str!("testdata/appwright-global-setup-error.json");

    #[test]
    fn strips_colour_and_hyperlink_codes() {
        assert_eq!(
            strip_ansi("\u{1b}[2mexpect(\u{1b}[22m\u{1b}[31mreceived\u{1b}[39m)"),
            "expect(received)"
        );
        assert_eq!(
            strip_ansi("see \u{1b}]8;;http://x\u{7}link\u{1b}]8;;\u{7} now"),
            "see link now"
        );
        assert_eq!(strip_ansi("plain ✓ text"), "plain ✓ text");
        assert_eq!(strip_ansi("dangling \u{1b}"), "dangling ");
    }

    /// The fixture is a real report of `npx playwright test --retries=1` over a spec with a
    /// passing, a failing, a skipped (nested describe) and a flaky test.
    #[test]
    fn parses_a_real_report() {
        let r = parse_report(REPORT).expect("parses");
        let by_title = |t: &str| {
            r.tests
                .iter()
                .find(|x| x.title == t)
                .unwrap_or_else(|| panic!("no test {t:?} in {:?}", r.tests))
        };
        assert_eq!(r.tests.len(), 4);
        assert!(r.errors.is_empty());
        assert!(r.duration_ms > 0);

        let adds = by_title("adds");
        assert_eq!(adds.status, TestStatus::Passed);
        assert_eq!(adds.file, "tests/a.spec.js");
        assert_eq!(adds.error, None);

        let fails = by_title("group › fails");
        assert_eq!(fails.status, TestStatus::Failed);
        let msg = fails.error.as_deref().expect("error message");
        assert!(
            msg.starts_with("Error: expect(received).toBe(expected)"),
            "{msg}"
        );
        assert!(msg.contains("Expected: 3"), "{msg}");
        assert!(!msg.contains('\u{1b}'), "colour codes left in {msg:?}");

        assert_eq!(
            by_title("group › inner › skipped").status,
            TestStatus::Skipped
        );

        let flaky = by_title("flaky");
        assert_eq!(flaky.status, TestStatus::Flaky);
        assert!(
            flaky.error.is_some(),
            "the failed first try's message is kept"
        );

        assert!(!r.passed());
        assert!(r
            .failure_summary()
            .expect("summary")
            .starts_with("group › fails: Error: expect(received)"));
    }

    #[test]
    fn a_spec_that_does_not_load_is_a_top_level_error() {
        let r = parse_report(LOAD_ERROR).expect("parses");
        assert!(r.tests.is_empty());
        assert_eq!(r.errors.len(), 2);
        assert!(r.errors[0].starts_with("SyntaxError:"), "{:?}", r.errors);
        assert!(!r.passed());
        assert!(r
            .failure_summary()
            .expect("summary")
            .starts_with("SyntaxError:"));
    }

    #[test]
    fn appwright_failing_to_reach_the_device_is_a_setup_failure() {
        let r = parse_report(APPWRIGHT_SETUP).expect("parses");
        assert!(r.tests.is_empty());
        assert!(r.setup_failed);
        assert!(r.errors[0].starts_with("Error: The ANDROID_HOME environment variable is not set"));
        // A spec that does not load is the spec's fault, and so is naming no test at all.
        assert!(!parse_report(LOAD_ERROR).expect("parses").setup_failed);
        let none = r#"{"suites":[],"errors":[{"message":"Error: No tests found."}]}"#;
        assert!(!parse_report(none).expect("parses").setup_failed);
    }

    #[test]
    fn without_verdicts_the_results_decide() {
        let json = r#"{"suites":[{"title":"a.spec.ts","file":"a.spec.ts","specs":[
            {"title":"retried","tests":[{"results":[{"status":"failed","duration":5,
              "errors":[{"message":"boom"}]},{"status":"passed","duration":7}]}]},
            {"title":"slow","tests":[{"results":[{"status":"timedOut","duration":1000.4,
              "error":{"message":"Test timeout of 1000ms exceeded."}}]}]},
            {"title":"both","tests":[
              {"projectName":"android","status":"expected","results":[{"status":"passed"}]},
              {"projectName":"ios","status":"expected","results":[{"status":"passed"}]}]}
        ]}],"errors":[]}"#;
        let r = parse_report(json).expect("parses");
        let titles: Vec<_> = r
            .tests
            .iter()
            .map(|t| (t.title.as_str(), t.status))
            .collect();
        assert_eq!(
            titles,
            vec![
                ("retried", TestStatus::Flaky),
                ("slow", TestStatus::TimedOut),
                ("android › both", TestStatus::Passed),
                ("ios › both", TestStatus::Passed),
            ]
        );
        assert_eq!(r.tests[0].duration_ms, 12);
        assert_eq!(r.tests[0].error.as_deref(), Some("boom"));
        assert_eq!(r.tests[1].duration_ms, 1000);
        assert_eq!(r.tests[0].file, "a.spec.ts");
    }

    #[test]
    fn an_unexpected_pass_is_a_failure_and_an_expected_failure_passes() {
        let json = r#"{"suites":[{"title":"f","file":"f","specs":[
            {"title":"should fail","tests":[{"status":"unexpected","results":[{"status":"passed"}]}]},
            {"title":"fails as told","tests":[{"status":"expected","results":[{"status":"failed"}]}]}
        ]}]}"#;
        let r = parse_report(json).expect("parses");
        assert_eq!(r.tests[0].status, TestStatus::Failed);
        assert_eq!(r.tests[1].status, TestStatus::Passed);
    }

    #[test]
    fn garbage_and_empty_reports() {
        assert!(parse_report("Running 3 tests using 1 worker").is_err());
        assert!(parse_report("").is_err());
        let empty = parse_report("{}").expect("an empty object is a report");
        assert!(!empty.passed());
        assert_eq!(
            empty.failure_summary().as_deref(),
            Some("the report lists no tests")
        );
    }

    #[test]
    fn long_messages_are_capped_on_a_char_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let m = clean_message(&long);
        assert!(m.len() <= MAX_MESSAGE + '…'.len_utf8());
        assert!(m.ends_with('…'));
    }
}
