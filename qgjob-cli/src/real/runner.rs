//! The command runner every real device shares: runs the test command (AppWright by
//! default) for one job in its own process group, streams its output as job logs, enforces
//! the job's timeout and cancel by killing the whole group, and turns Playwright's JSON
//! report into the job's result.
//!
//! Outcome rules (what the scheduler is told):
//! - a report with tests → `Ok(RunReport)`; `passed` only when every test passed (flaky and
//!   skipped count as passing), nothing failed outside a test and the command exited 0;
//! - a report with no tests but errors pointing at a spec (one that does not load) or
//!   "No tests found" → `Ok(RunReport { passed: false })`: retrying would fail the same way;
//! - a report with no tests and errors pointing at no spec (AppWright's global setup not
//!   finding the device, SDK or Appium; a broken config) → `Err(RunnerCrashed)`: the
//!   machine's fault, retried;
//! - timeout → `Err(Timeout)`; cancel → `Err(Other, "canceled")`;
//! - no report, an unreadable one, or a command killed by a signal → `Err(RunnerCrashed)`
//!   (retried by the scheduler).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use qgjob_core::{InfraErrorKind, InfraFailure, RunReport};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::playwright::parse_report;

/// The default test command: AppWright with Playwright's JSON reporter.
pub const DEFAULT_COMMAND: &str =
    "npx appwright test {test_filters} --project {project} --reporter=json --output {output}";

/// Most stdout kept to look for a JSON report printed there (when no report file appears).
const MAX_CAPTURE: usize = 64 * 1024 * 1024;
/// Longest single log line forwarded; longer lines are cut (the report has its own path).
const MAX_LINE: usize = 64 * 1024;
/// Logs are sent in chunks of at most this size...
const LOG_CHUNK: usize = 32 * 1024;
/// ...or at least this often while output flows.
const LOG_FLUSH: Duration = Duration::from_millis(250);
/// Most bytes of a command's output forwarded as the job's log.
const MAX_LOG: usize = 32 * 1024 * 1024;
/// Largest JSON report read.
const MAX_REPORT: u64 = 256 * 1024 * 1024;
/// How long to wait for output pipes after the process group is gone (a process that left
/// the group may still hold them).
const PIPE_DRAIN: Duration = Duration::from_secs(2);

/// A command template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TemplateError {
    /// The template has no words.
    #[error("the test command is empty")]
    Empty,
    /// A quote was opened and never closed.
    #[error("unterminated {0} quote in the test command")]
    Unterminated(char),
    /// The template never mentions `{tests}` or `{test_filters}`, so the job's tests would
    /// not be passed.
    #[error("the test command must contain {{tests}} or {{test_filters}}")]
    NoTests,
}

/// A test command with `{tests}`, `{test_filters}` and `{project}` placeholders, split into
/// words without a shell (single and double quotes and backslash escapes group words,
/// nothing else is interpreted). A word that is exactly `{tests}` becomes one word per test
/// file; inside a longer word (typically a `sh -c '…'` script) `{tests}` becomes the files
/// shell-quoted and joined by spaces, so a submitter's file name cannot inject shell
/// syntax. A word that is exactly `{test_filters}` becomes one Playwright filter per test
/// (see [`playwright_filter`]): what the default command passes. `{output}` is a folder of
/// the job's own for the runner's artifacts (Playwright's `--output`): jobs running at once
/// in one `--project-dir` would otherwise share, and wipe, its `test-results/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandTemplate {
    words: Vec<String>,
}

impl Default for CommandTemplate {
    fn default() -> Self {
        CommandTemplate {
            words: DEFAULT_COMMAND.split(' ').map(str::to_string).collect(),
        }
    }
}

impl std::str::FromStr for CommandTemplate {
    type Err = TemplateError;
    fn from_str(s: &str) -> Result<Self, TemplateError> {
        CommandTemplate::parse(s)
    }
}

impl CommandTemplate {
    /// Parses a template such as `npx playwright test {tests} --reporter=json`.
    pub fn parse(s: &str) -> Result<Self, TemplateError> {
        let words = split_words(s)?;
        if words.is_empty() {
            return Err(TemplateError::Empty);
        }
        if !words
            .iter()
            .any(|w| w.contains("{tests}") || w == "{test_filters}")
        {
            return Err(TemplateError::NoTests);
        }
        Ok(CommandTemplate { words })
    }

    /// The argv for one job run in `cwd`, with its artifacts under `output`.
    pub fn expand(
        &self,
        tests: &[String],
        project: &str,
        cwd: &Path,
        output: &Path,
    ) -> Vec<String> {
        let mut argv = Vec::with_capacity(self.words.len() + tests.len());
        // Playwright reports specs by their physical path, as the kernel gives it its cwd.
        let cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_path_buf());
        for w in &self.words {
            if w == "{tests}" {
                argv.extend(tests.iter().cloned());
            } else if w == "{test_filters}" {
                argv.extend(tests.iter().map(|t| playwright_filter(&cwd, t)));
            } else {
                let quoted: Vec<String> = tests.iter().map(|t| shell_quote(t)).collect();
                argv.push(
                    w.replace("{project}", project)
                        .replace("{output}", &output.to_string_lossy())
                        .replace("{tests}", &quoted.join(" ")),
                );
            }
        }
        argv
    }
}

/// The Playwright filter for a job's test `test` run in `cwd`. Playwright reads each
/// positional argument as a case-insensitive regular expression searched anywhere in a
/// spec's absolute path: `a.spec.js` also ran `banana.spec.js`, `login.spec.js` also ran
/// `Login.spec.js`, and `price$5.spec.js` matched nothing. A `/…/` argument without flags
/// is taken as a case-sensitive expression, so a file becomes `/^<cwd>/<test>$/` (escaped)
/// and a folder `/^<cwd>/<test>//`, which match it alone. Anything else (a glob, a
/// `file:line` location, a pattern meant as one) passes through as the submitter wrote it.
pub fn playwright_filter(cwd: &Path, test: &str) -> String {
    let rel = test.trim_start_matches("./").trim_end_matches('/');
    let full = cwd.join(rel);
    // What follows the escaped path: the end (a file), or a separator (a folder's files).
    let end = if full.is_file() {
        "$"
    } else if full.is_dir() {
        "\\/"
    } else {
        return test.to_string();
    };
    let mut re = String::from("/^");
    for c in full.to_string_lossy().chars() {
        if "\\^$.|?*+()[]{}/".contains(c) {
            re.push('\\');
        }
        re.push(c);
    }
    re.push_str(end);
    re.push('/');
    re
}

/// Quotes `s` for a POSIX shell: unchanged when it only holds safe characters, else in
/// single quotes (with `'` written as `'\''`).
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-@+=:,%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn split_words(s: &str) -> Result<Vec<String>, TemplateError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(TemplateError::Unterminated('\'')),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => cur.push(c),
                            None => return Err(TemplateError::Unterminated('"')),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(TemplateError::Unterminated('"')),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// One run of the test command.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The program and its arguments (from [`CommandTemplate::expand`]).
    pub argv: Vec<String>,
    /// The work dir holding the unpacked test bundle.
    pub cwd: PathBuf,
    /// Extra environment (device, build, job); the agent's own environment is inherited.
    pub env: Vec<(String, String)>,
    /// The job's timeout.
    pub timeout: Duration,
    /// After SIGTERM, how long the group gets before SIGKILL.
    pub kill_grace: Duration,
    /// Where Playwright is told to write its JSON report (`PLAYWRIGHT_JSON_OUTPUT_NAME`).
    pub report_path: PathBuf,
    /// Where the command's process group is recorded while it runs, so that a later agent
    /// can kill it if this one is killed first (see [`super::reap`]).
    pub groups_dir: Option<PathBuf>,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It exited with this code.
    Exited(i32),
    /// A signal it did not get from us killed it.
    Signaled(i32),
    /// It ran past the timeout; its group was killed.
    TimedOut,
    /// It was canceled; its group was killed.
    Canceled,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How the command ended.
    pub ended: Ended,
    /// The JSON report's text: the report file, else a JSON object printed on stdout.
    pub report: Option<String>,
    /// The last lines of output, for error messages.
    pub tail: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

/// The command could not be started.
#[derive(Debug, Error)]
#[error("cannot start {program}: {source}")]
pub struct SpawnError {
    /// The program.
    pub program: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Kills a process group when dropped, so an abandoned run (its future dropped) leaves no
/// processes behind; while it lives, the group is recorded (its id, as a file in the
/// groups dir) for a later agent to find if this one dies without dropping it.
struct GroupGuard(Pid, Option<PathBuf>);

impl GroupGuard {
    fn new(pgid: Pid, groups_dir: Option<&Path>) -> Self {
        let record = groups_dir.map(|d| d.join(pgid.as_raw().to_string()));
        // Best effort: without the record, only a crash of this agent would leak the group.
        let record = record.filter(|r| std::fs::write(r, b"").is_ok());
        GroupGuard(pgid, record)
    }

    fn signal(&self, sig: Signal) {
        // ESRCH (the group is already gone) is the normal case at the end of a run.
        let _ = killpg(self.0, sig);
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(r) = &self.1 {
            let _ = std::fs::remove_file(r);
        }
    }
}

/// The agent's secrets, kept out of every command it runs: test code comes from users and
/// its output is the job's log. A device that needs one for its tests (BrowserStack's
/// credentials, for AppWright to open sessions) passes it in [`Invocation::env`].
pub const SCRUBBED_ENV: [&str; 4] = [
    "QGJOB_TOKEN",
    "QGJOB_DATABASE_URL",
    "BROWSERSTACK_USERNAME",
    "BROWSERSTACK_ACCESS_KEY",
];

/// The command for `inv`: the agent's environment without [`SCRUBBED_ENV`], plus the
/// invocation's own, in a process group of its own.
fn command(inv: &Invocation) -> Command {
    let mut cmd = Command::new(inv.argv.first().map_or("", String::as_str));
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    cmd.args(inv.argv.iter().skip(1))
        .current_dir(&inv.cwd)
        .env("PLAYWRIGHT_JSON_OUTPUT_NAME", &inv.report_path)
        // Readable logs: Playwright and most Node tools honour this. NO_COLOR beside it
        // makes Node print a warning into every job's log.
        .env("FORCE_COLOR", "0")
        .env_remove("NO_COLOR")
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so timeout/cancel can kill everything it started.
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// Runs `inv`, sending its output to `log` in chunks (stdout and stderr interleaved as they
/// arrive), until it exits, times out or `cancel` resolves.
pub async fn run_command<C>(
    inv: &Invocation,
    log: &(dyn Fn(&str) + Send + Sync),
    cancel: C,
) -> Result<RunOutcome, SpawnError>
where
    C: Future<Output = ()>,
{
    let program = inv.argv.first().cloned().unwrap_or_default();
    let _ = std::fs::remove_file(&inv.report_path);
    let mut cmd = command(inv);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| SpawnError {
        program: program.clone(),
        source,
    })?;
    let guard = child
        .id()
        .map(|id| GroupGuard::new(Pid::from_raw(id as i32), inv.groups_dir.as_deref()));

    let (tx, mut rx) = mpsc::unbounded_channel::<(bool, String)>();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(read_lines(out, true, tx.clone()));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(read_lines(err, false, tx.clone()));
    }
    drop(tx);

    let mut logs = LogBuffer::new(log);
    let mut stdout = String::new();
    let deadline = tokio::time::sleep(inv.timeout);
    tokio::pin!(deadline);
    tokio::pin!(cancel);
    let mut flush = tokio::time::interval(LOG_FLUSH);
    let mut killed: Option<Ended> = None;
    let mut pipes_open = true;

    let status = loop {
        tokio::select! {
            st = child.wait() => break st,
            line = rx.recv(), if pipes_open => match line {
                Some((is_out, l)) => {
                    if is_out && stdout.len() + l.len() < MAX_CAPTURE {
                        stdout.push_str(&l);
                    }
                    logs.push(&l);
                }
                None => pipes_open = false,
            },
            _ = flush.tick() => logs.flush(),
            _ = &mut deadline, if killed.is_none() => {
                logs.note(&format!("qgjob: timed out after {} s; killing the process group\n", inv.timeout.as_secs_f64()));
                killed = Some(Ended::TimedOut);
                if let Some(g) = &guard { g.signal(Signal::SIGTERM); }
                break terminate(&mut child, guard.as_ref(), inv.kill_grace).await;
            }
            _ = &mut cancel, if killed.is_none() => {
                logs.note("qgjob: canceled; killing the process group\n");
                killed = Some(Ended::Canceled);
                if let Some(g) = &guard { g.signal(Signal::SIGTERM); }
                break terminate(&mut child, guard.as_ref(), inv.kill_grace).await;
            }
        }
    };
    let elapsed = started.elapsed();
    // Whatever the command left running in its group (an Appium server, a device log
    // reader) goes with it.
    if let Some(g) = &guard {
        g.signal(Signal::SIGKILL);
    }
    // Drain what is left in the pipes, but do not wait forever on a process that escaped.
    let drain_until = tokio::time::Instant::now() + PIPE_DRAIN;
    while pipes_open {
        match tokio::time::timeout_at(drain_until, rx.recv()).await {
            Ok(Some((is_out, l))) => {
                if is_out && stdout.len() + l.len() < MAX_CAPTURE {
                    stdout.push_str(&l);
                }
                logs.push(&l);
            }
            _ => pipes_open = false,
        }
    }

    let ended = match killed {
        Some(k) => k,
        None => match status {
            Ok(st) => {
                use std::os::unix::process::ExitStatusExt;
                match (st.code(), st.signal()) {
                    (Some(c), _) => Ended::Exited(c),
                    (None, Some(s)) => Ended::Signaled(s),
                    (None, None) => Ended::Signaled(0),
                }
            }
            Err(_) => Ended::Signaled(0),
        },
    };
    let status_line = match ended {
        Ended::Exited(c) => format!("qgjob: test command exited with code {c}\n"),
        Ended::Signaled(s) => format!("qgjob: test command killed by signal {s}\n"),
        Ended::TimedOut => "qgjob: test command timed out\n".to_string(),
        Ended::Canceled => "qgjob: test command canceled\n".to_string(),
    };
    logs.note(&status_line);
    let tail = logs.tail();
    logs.flush();

    let too_big = tokio::fs::metadata(&inv.report_path)
        .await
        .is_ok_and(|m| m.len() > MAX_REPORT);
    let report = if too_big {
        None
    } else {
        match tokio::fs::read_to_string(&inv.report_path).await {
            Ok(s) if !s.trim().is_empty() => Some(s),
            _ => json_on_stdout(&stdout),
        }
    };
    Ok(RunOutcome {
        ended,
        report,
        tail,
        elapsed,
    })
}

/// After SIGTERM was sent: waits up to `grace` for the child, then SIGKILLs the group.
async fn terminate(
    child: &mut tokio::process::Child,
    guard: Option<&GroupGuard>,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(st) => st,
        Err(_) => {
            if let Some(g) = guard {
                g.signal(Signal::SIGKILL);
            }
            child.wait().await
        }
    }
}

/// A JSON report printed on stdout: from the first line that starts with `{` to the end.
fn json_on_stdout(stdout: &str) -> Option<String> {
    let mut offset = 0;
    for line in stdout.split_inclusive('\n') {
        if line.starts_with('{') {
            let rest = stdout[offset..].trim();
            return (rest.ends_with('}')).then(|| rest.to_string());
        }
        offset += line.len();
    }
    None
}

async fn read_lines<R: AsyncRead + Unpin>(
    r: R,
    is_out: bool,
    tx: mpsc::UnboundedSender<(bool, String)>,
) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let mut line = String::from_utf8_lossy(&buf).into_owned();
                if line.len() > MAX_LINE && !is_out {
                    let mut cut = MAX_LINE;
                    while !line.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    line.truncate(cut);
                    line.push_str("…\n");
                }
                if tx.send((is_out, line)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Batches log lines into chunks for the sink and keeps the last lines for error messages.
struct LogBuffer<'a> {
    sink: &'a (dyn Fn(&str) + Send + Sync),
    pending: String,
    tail: std::collections::VecDeque<String>,
    /// Bytes of the command's output forwarded so far.
    sent: usize,
    /// Most bytes of output forwarded ([`MAX_LOG`]).
    max: usize,
    truncated: bool,
}

impl<'a> LogBuffer<'a> {
    const TAIL_LINES: usize = 20;

    fn new(sink: &'a (dyn Fn(&str) + Send + Sync)) -> Self {
        LogBuffer {
            sink,
            pending: String::new(),
            tail: Default::default(),
            sent: 0,
            max: MAX_LOG,
            truncated: false,
        }
    }

    /// A line of qgjob's own (status, timeout, cancel): always forwarded.
    fn note(&mut self, line: &str) {
        self.append(line);
    }

    /// A line of the command's output, forwarded up to [`MAX_LOG`] bytes.
    fn push(&mut self, line: &str) {
        if !self.truncated && self.sent + line.len() > self.max {
            // A runaway test must not flood the server: keep the start, say so, and keep
            // reading (the pipe must drain or the command would block).
            self.truncated = true;
            let max = self.max;
            self.append(&format!("qgjob: log truncated after {max} bytes\n"));
        }
        if self.truncated {
            // The end still matters for error messages.
            self.remember(line);
            return;
        }
        self.sent += line.len();
        self.append(line);
    }

    fn append(&mut self, line: &str) {
        // Very long stdout lines (a report printed on stdout) are cut in the logs only.
        let shown = if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            format!("{}…\n", &line[..cut])
        } else {
            line.to_string()
        };
        self.remember(&shown);
        self.pending.push_str(&shown);
        if !self.pending.ends_with('\n') {
            self.pending.push('\n');
        }
        if self.pending.len() >= LOG_CHUNK {
            self.flush();
        }
    }

    /// Keeps `line` among the last lines (for error messages).
    fn remember(&mut self, line: &str) {
        if line.trim().is_empty() {
            return;
        }
        if self.tail.len() == Self::TAIL_LINES {
            self.tail.pop_front();
        }
        let mut l = line.trim_end().to_string();
        if l.len() > 1024 {
            let mut cut = 1024;
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
        }
        self.tail.push_back(l);
    }

    fn flush(&mut self) {
        if !self.pending.is_empty() {
            (self.sink)(&self.pending);
            self.pending.clear();
        }
    }

    fn tail(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Turns a run into the job's result (see the module docs for the rules).
pub fn judge(out: &RunOutcome, timeout: Duration) -> Result<RunReport, InfraFailure> {
    let crashed = |why: String| InfraFailure {
        kind: InfraErrorKind::RunnerCrashed,
        message: format!("{why}; last output:\n{}", out.tail),
    };
    match out.ended {
        Ended::TimedOut => {
            return Err(InfraFailure::timed_out(
                timeout,
                "the process group was killed",
            ))
        }
        Ended::Canceled => {
            return Err(InfraFailure {
                kind: InfraErrorKind::Other,
                message: "canceled".to_string(),
            })
        }
        Ended::Signaled(s) => {
            return Err(crashed(format!(
                "the test command was killed by signal {s}"
            )))
        }
        Ended::Exited(_) => {}
    }
    let code = match out.ended {
        Ended::Exited(c) => c,
        _ => -1,
    };
    let Some(text) = &out.report else {
        return Err(crashed(format!(
            "the test command exited with code {code} without a JSON report"
        )));
    };
    let report = match parse_report(text) {
        Ok(r) => r,
        Err(e) => return Err(crashed(format!("exit code {code}: {e}"))),
    };
    if report.setup_failed {
        return Err(crashed(format!(
            "exit code {code}: the test runner failed before any test ran: {}",
            report.errors.first().map(String::as_str).unwrap_or("")
        )));
    }
    if report.tests.is_empty() && report.errors.is_empty() {
        return Err(crashed(format!(
            "exit code {code}: the report lists neither tests nor errors"
        )));
    }
    let passed = report.passed() && code == 0;
    let error = if passed {
        None
    } else {
        Some(
            report
                .failure_summary()
                .unwrap_or_else(|| format!("the test command exited with code {code}")),
        )
    };
    Ok(RunReport {
        passed,
        tests: report.tests,
        duration_ms: u64::try_from(out.elapsed.as_millis()).unwrap_or(u64::MAX),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn playwright_filters_match_a_file_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical");
        std::fs::create_dir_all(root.join("tests")).expect("mkdir");
        for f in ["tests/a.spec.js", "tests/price$5 (v2).spec.js"] {
            std::fs::write(root.join(f), "").expect("write");
        }
        let esc = |p: &Path| {
            p.to_string_lossy()
                .chars()
                .flat_map(|c| {
                    let e = "\\^$.|?*+()[]{}/".contains(c).then_some('\\');
                    e.into_iter().chain([c])
                })
                .collect::<String>()
        };
        let r = esc(&root);
        assert_eq!(
            playwright_filter(&root, "tests/a.spec.js"),
            format!("/^{r}\\/tests\\/a\\.spec\\.js$/")
        );
        assert_eq!(
            playwright_filter(&root, "./tests/price$5 (v2).spec.js"),
            format!("/^{r}\\/tests\\/price\\$5 \\(v2\\)\\.spec\\.js$/")
        );
        assert_eq!(
            playwright_filter(&root, "tests"),
            format!("/^{r}\\/tests\\//")
        );
        assert_eq!(
            playwright_filter(&root, "tests/"),
            playwright_filter(&root, "tests")
        );
        // Not a file here (a glob, a location, a pattern): as the submitter wrote it.
        assert_eq!(
            playwright_filter(&root, "tests/a.spec.js:12"),
            "tests/a.spec.js:12"
        );
        assert_eq!(playwright_filter(&root, "login"), "login");
    }

    #[test]
    fn templates_split_without_a_shell() {
        let t = CommandTemplate::parse(r#"node "my dir/cli.js" test {tests} --grep 'a b' x\ y"#)
            .expect("parses");
        assert_eq!(
            t.expand(
                &["a.spec.ts".into(), "b c.spec.ts".into()],
                "android",
                Path::new("/"),
                Path::new("/out")
            ),
            vec![
                "node",
                "my dir/cli.js",
                "test",
                "a.spec.ts",
                "b c.spec.ts",
                "--grep",
                "a b",
                "x y"
            ]
        );
        // The default command passes exact filters: a file that does not exist passes as is.
        let d = CommandTemplate::default();
        assert_eq!(
            d.expand(
                &["t.spec.js".into()],
                "emulator",
                Path::new("/nonexistent"),
                Path::new("/work/1/test-results")
            ),
            vec![
                "npx",
                "appwright",
                "test",
                "t.spec.js",
                "--project",
                "emulator",
                "--reporter=json",
                "--output",
                "/work/1/test-results"
            ]
        );
        assert_eq!(
            CommandTemplate::parse("sh -c 'run {tests} on {project}'")
                .expect("parses")
                .expand(
                    &["a".into(), "b".into()],
                    "p",
                    Path::new("/"),
                    Path::new("/o")
                )[2],
            "run a b on p"
        );
        assert_eq!(
            CommandTemplate::parse("sh -c 'run {tests}'")
                .expect("parses")
                .expand(
                    &["ok.spec.js".into(), "x; rm -rf ~ 'q'.spec.js".into()],
                    "p",
                    Path::new("/"),
                    Path::new("/o")
                )[2],
            r#"run ok.spec.js 'x; rm -rf ~ '\''q'\''.spec.js'"#
        );
        assert_eq!(CommandTemplate::parse("  "), Err(TemplateError::Empty));
        assert_eq!(
            CommandTemplate::parse("npx 'x {tests}"),
            Err(TemplateError::Unterminated('\''))
        );
        assert_eq!(
            CommandTemplate::parse("npx playwright test"),
            Err(TemplateError::NoTests)
        );
    }

    #[test]
    fn logs_stop_at_the_cap_but_notes_and_the_tail_go_on() {
        let got = Mutex::new(String::new());
        let sink = |s: &str| got.lock().expect("lock").push_str(s);
        let mut b = LogBuffer::new(&sink);
        b.max = 100;
        for i in 0..50 {
            b.push(&format!("line {i:02}\n"));
        }
        b.note("qgjob: test command exited with code 0\n");
        b.flush();
        let got = got.lock().expect("lock").clone();
        assert!(got.starts_with("line 00\nline 01\n"), "{got}");
        assert!(
            got.contains("qgjob: log truncated after 100 bytes\n"),
            "{got}"
        );
        assert!(!got.contains("line 49"), "{got}");
        assert!(
            got.ends_with("qgjob: test command exited with code 0\n"),
            "{got}"
        );
        assert!(b.tail().contains("line 49"), "the tail keeps the end");
    }

    #[test]
    fn a_runner_that_fails_before_any_test_is_an_infrastructure_error() {
        let out = RunOutcome {
            ended: Ended::Exited(1),
            report: Some(include_str!("testdata/appwright-global-setup-error.json").to_string()),
            tail: "Error while running playwright test".into(),
            elapsed: Duration::from_secs(1),
        };
        let e = judge(&out, Duration::from_secs(60)).expect_err("infra");
        assert_eq!(e.kind, InfraErrorKind::RunnerCrashed);
        assert!(e.message.contains("ANDROID_HOME"), "{}", e.message);
        let out = RunOutcome {
            report: Some(include_str!("testdata/playwright-load-error.json").to_string()),
            ..out
        };
        let r = judge(&out, Duration::from_secs(60)).expect("the spec's fault");
        assert!(!r.passed);
        assert!(r.error.expect("error").starts_with("SyntaxError"));
    }

    #[test]
    fn finds_a_report_printed_on_stdout() {
        assert_eq!(
            json_on_stdout("npm notice\n{\n \"suites\": []\n}\n").as_deref(),
            Some("{\n \"suites\": []\n}")
        );
        assert_eq!(json_on_stdout("no report here\n"), None);
        assert_eq!(json_on_stdout("{ cut off"), None);
    }

    #[test]
    fn the_agents_secrets_stay_out_of_commands_unless_the_device_passes_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut i = inv(dir.path(), "true", Duration::from_secs(5));
        i.env
            .push(("BROWSERSTACK_ACCESS_KEY".into(), "for-appwright".into()));
        let cmd = command(&i);
        let envs: std::collections::HashMap<String, Option<String>> = cmd
            .as_std()
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        // Removed (None) from what the agent's own environment passes on.
        for k in ["QGJOB_TOKEN", "QGJOB_DATABASE_URL", "BROWSERSTACK_USERNAME"] {
            assert_eq!(envs.get(k), Some(&None), "{k}: {envs:?}");
        }
        assert_eq!(
            envs.get("BROWSERSTACK_ACCESS_KEY"),
            Some(&Some("for-appwright".to_string()))
        );
        assert_eq!(envs.get("QGJOB_JOB_ID"), Some(&Some("job-1".to_string())));
    }

    fn inv(dir: &std::path::Path, script: &str, timeout: Duration) -> Invocation {
        Invocation {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: dir.to_path_buf(),
            env: vec![("QGJOB_JOB_ID".into(), "job-1".into())],
            timeout,
            kill_grace: Duration::from_millis(500),
            report_path: dir.join("report.json"),
            groups_dir: None,
        }
    }

    #[tokio::test]
    async fn streams_output_and_reads_the_report_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = Mutex::new(String::new());
        let sink = |s: &str| logs.lock().expect("lock").push_str(s);
        let script = r#"echo "job $QGJOB_JOB_ID"; echo oops >&2;
            printf '{"suites":[{"title":"a","file":"a","specs":[{"title":"t","tests":[{"status":"expected","results":[{"status":"passed","duration":3}]}]}]}],"errors":[]}' > "$PLAYWRIGHT_JSON_OUTPUT_NAME""#;
        let out = run_command(
            &inv(dir.path(), script, Duration::from_secs(30)),
            &sink,
            std::future::pending(),
        )
        .await
        .expect("runs");
        assert_eq!(out.ended, Ended::Exited(0));
        let logs = logs.lock().expect("lock").clone();
        assert!(logs.contains("job job-1\n"), "{logs}");
        assert!(logs.contains("oops\n"), "{logs}");
        assert!(logs.contains("exited with code 0"), "{logs}");
        let r = judge(&out, Duration::from_secs(30)).expect("a report");
        assert!(r.passed);
        assert_eq!(r.tests.len(), 1);
        assert_eq!(r.tests[0].title, "t");
    }

    #[tokio::test]
    async fn quoted_tests_reach_a_shell_script_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = vec![
            "plain.spec.js".to_string(),
            "it's; touch pwned.spec.js".to_string(),
            "$(touch pwned2).spec.js".to_string(),
        ];
        let argv = CommandTemplate::parse("sh -c 'printf \"[%s]\\n\" {tests}'")
            .expect("parses")
            .expand(&names, "p", dir.path(), dir.path());
        let mut i = inv(dir.path(), "", Duration::from_secs(30));
        i.argv = argv;
        let logs = Mutex::new(String::new());
        let sink = |s: &str| logs.lock().expect("lock").push_str(s);
        run_command(&i, &sink, std::future::pending())
            .await
            .expect("runs");
        let logs = logs.lock().expect("lock").clone();
        for n in &names {
            assert!(
                logs.contains(&format!("[{n}]")),
                "{n} not passed intact: {logs}"
            );
        }
        assert!(!dir.path().join("pwned.spec.js").exists());
        assert!(!dir.path().join("pwned2").exists());
    }

    #[tokio::test]
    async fn no_report_is_a_runner_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = run_command(
            &inv(
                dir.path(),
                "echo 'cannot find module appwright' >&2; exit 1",
                Duration::from_secs(30),
            ),
            &|_: &str| {},
            std::future::pending(),
        )
        .await
        .expect("runs");
        assert_eq!(out.ended, Ended::Exited(1));
        let e = judge(&out, Duration::from_secs(30)).expect_err("infra failure");
        assert_eq!(e.kind, InfraErrorKind::RunnerCrashed);
        assert!(
            e.message.contains("cannot find module appwright"),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn a_missing_program_does_not_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut i = inv(dir.path(), "", Duration::from_secs(1));
        i.argv = vec!["/nonexistent/qgjob-test-program".into()];
        let e = run_command(&i, &|_: &str| {}, std::future::pending())
            .await
            .expect_err("spawn fails");
        assert!(e.to_string().contains("/nonexistent/qgjob-test-program"));
    }

    fn alive(pid: i32) -> bool {
        // Signal 0 probes; a zombie still answers, so also look at its state.
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(s) => !s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    async fn gone_soon(pid: i32) -> bool {
        // Killed grandchildren can linger briefly until reaped: poll instead of asserting
        // at once.
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("grandchild.pid");
        // The grandchild ignores SIGTERM, so only the SIGKILL after the grace period ends it.
        let script = format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; exec sleep 300' & wait",
            pidfile.display()
        );
        let out = run_command(
            &inv(dir.path(), &script, Duration::from_millis(700)),
            &|_: &str| {},
            std::future::pending(),
        )
        .await
        .expect("runs");
        assert_eq!(out.ended, Ended::TimedOut);
        let e = judge(&out, Duration::from_millis(700)).expect_err("timeout");
        assert_eq!(e.kind, InfraErrorKind::Timeout);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("grandchild wrote its pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(gone_soon(pid).await, "grandchild {pid} survived");
    }

    #[tokio::test]
    async fn cancel_kills_the_group_and_reports_canceled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("child.pid");
        let script = format!("echo $$ > {}; sleep 300", pidfile.display());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let pf = pidfile.clone();
        tokio::spawn(async move {
            while !pf.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = tx.send(());
        });
        let out = run_command(
            &inv(dir.path(), &script, Duration::from_secs(60)),
            &|_: &str| {},
            async {
                let _ = rx.await;
            },
        )
        .await
        .expect("runs");
        assert_eq!(out.ended, Ended::Canceled);
        let e = judge(&out, Duration::from_secs(60)).expect_err("canceled");
        assert_eq!(e.kind, InfraErrorKind::Other);
        assert_eq!(e.message, "canceled");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(gone_soon(pid).await, "process {pid} survived cancel");
    }

    #[tokio::test]
    async fn failing_report_with_exit_code_one_is_a_failed_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = r#"cat <<'EOF'
{"suites":[{"title":"a","file":"a","specs":[{"title":"bad","tests":[{"status":"unexpected","results":[{"status":"failed","duration":3,"error":{"message":"Error: nope"}}]}]}]}],"errors":[]}
EOF
exit 1"#;
        let mut i = inv(dir.path(), script, Duration::from_secs(30));
        // No report file: the JSON printed on stdout is used.
        i.report_path = dir.path().join("never-written.json");
        let out = run_command(&i, &|_: &str| {}, std::future::pending())
            .await
            .expect("runs");
        let r = judge(&out, Duration::from_secs(30)).expect("a report");
        assert!(!r.passed);
        assert_eq!(r.error.as_deref(), Some("bad: Error: nope"));
    }
}
