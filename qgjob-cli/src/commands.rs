//! The user commands (submit, status, wait, list, cancel, logs, app upload): blocking, no
//! async runtime, so they start in a few milliseconds.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use qgjob_core::{AppVersionId, Job, JobSpec, JobState, OrgId, Priority};

use crate::bundle;
use crate::cli::{
    AppUploadArgs, CancelArgs, ListArgs, LogsArgs, StatusArgs, SubmitArgs, WaitArgs, Which,
};
use crate::client::{Client, ListQuery};
use crate::error::{CliError, Result, EXIT_INFRA, EXIT_OK};
use crate::report;
use crate::util::{fmt_ms, paint, use_color, use_progress};

/// Prints a line to stdout, ignoring a closed pipe (`qgjob list | head` must not fail).
macro_rules! out {
    ($($t:tt)*) => {{
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, $($t)*);
    }};
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let s = serde_json::to_string(v).map_err(|e| CliError::Other(format!("encoding JSON: {e}")))?;
    out!("{s}");
    Ok(())
}

fn invalid(e: qgjob_core::InvalidSpec) -> CliError {
    // Name the flag the user typed, not the API field behind it.
    let flag = match e.field {
        "timeout_ms" => "timeout".to_string(),
        "tests" => "test".to_string(),
        // The flag is repeated once per label.
        "labels" => "label".to_string(),
        other => other.replace('_', "-"),
    };
    CliError::Usage(format!("invalid --{flag}: {}", e.message))
}

/// Builds the job specs of a submission (one per test file), validated locally so bad input
/// fails before anything is uploaded.
pub fn build_specs(
    a: &SubmitArgs,
    tests: &[String],
    bundle: Option<String>,
) -> Result<Vec<JobSpec>> {
    let org = OrgId::new(a.org_id.clone()).map_err(invalid)?;
    let app = AppVersionId::new(a.app_version_id.clone()).map_err(invalid)?;
    let mut specs = Vec::with_capacity(tests.len());
    for t in tests {
        let mut s = JobSpec::new(org.clone(), app.clone(), vec![t.clone()]);
        s.target = a.target.parse().map_err(invalid)?;
        s.priority = Priority(a.priority);
        if let Some(m) = a.max_attempts {
            s.max_attempts = m;
        }
        if let Some(t) = a.timeout {
            s.timeout_ms = t.as_millis() as u64;
        }
        s.retry_failed_tests = a.retry_failed_tests;
        s.labels = a.labels.iter().cloned().collect();
        s.bundle = bundle.clone();
        s.idempotency_key = match (&a.idempotency_key, tests.len()) {
            (None, _) => None,
            (Some(k), 1) => Some(k.clone()),
            // Each job of a run needs its own key; derive them so a resubmission matches.
            (Some(k), _) => Some(format!("{k}:{t}")),
        };
        s.validate().map_err(invalid)?;
        specs.push(s);
    }
    Ok(specs)
}

/// `qgjob submit`.
pub fn submit(client: &Client, a: &SubmitArgs) -> Result<u8> {
    // Found only after submitting, a bad report path would leave the jobs running with
    // no one waiting for them.
    if a.wait {
        check_report_paths(a.junit.as_deref(), a.github)?;
    }
    let root =
        std::env::current_dir().map_err(|e| CliError::io("reading the current directory", e))?;
    // The original tool sent test paths as they were: keep that working when none of the
    // named files exists here (the agents must then have the project themselves).
    let none_here = a
        .tests
        .iter()
        .all(|t| !root.join(t).exists() && !bundle::has_glob(t));
    if none_here && !a.no_bundle {
        eprintln!(
            "note: {} not found under {}; submitting the path{} without a test bundle",
            a.tests.join(", "),
            root.display(),
            if a.tests.len() == 1 { "" } else { "s" }
        );
    }
    let (tests, bundle_hash) = if a.no_bundle || none_here {
        (a.tests.clone(), None)
    } else {
        let tests = bundle::expand_tests(&root, &a.tests)?;
        // Validate before uploading anything.
        build_specs(a, &tests, None)?;
        let b = bundle::pack(&root, &tests)?;
        let up = client.upload_bundle(&b.bytes)?;
        if up.sha256 != b.sha256 {
            return Err(CliError::Protocol(format!(
                "the server stored the bundle as {} but it hashes to {}",
                up.sha256, b.sha256
            )));
        }
        (tests, Some(b.sha256))
    };
    let specs = build_specs(a, &tests, bundle_hash)?;
    let which = if specs.len() == 1 {
        let r = client.submit_job(&specs[0])?;
        if let Some(w) = &r.warning {
            eprintln!("note: {w}");
        }
        if a.json {
            // `created` as the server says it: false when --idempotency-key named an
            // earlier job, whose current state `status` then is.
            print_json(&serde_json::json!({
                "job_id": r.job_id,
                "status": r.status,
                "created": r.created,
            }))?;
        } else {
            let again = if r.created { "" } else { " (submitted before)" };
            out!("job {} {}{again}", r.job_id, r.status);
        }
        Which {
            job_id: Some(r.job_id.to_string()),
            run_id: None,
        }
    } else {
        // Each job carries the labels, and so does the run, as `GET /v1/runs/{id}` shows it.
        let labels = a.labels.iter().cloned().collect();
        let mut r = client.submit_run_labelled(&specs, &labels)?;
        // On stderr, so that the JSON on stdout keeps its shape.
        if let Some(w) = r.warning.take() {
            eprintln!("note: {w}");
        }
        if a.json {
            print_json(&r)?;
        } else {
            let again = if r.created { "" } else { ", submitted before" };
            out!(
                "run {} {} ({} jobs{again})",
                r.run_id,
                r.status,
                r.job_ids.len()
            );
            for (id, t) in r.job_ids.iter().zip(&tests) {
                out!("  job {id} {t}");
            }
        }
        Which {
            job_id: None,
            run_id: Some(r.run_id.to_string()),
        }
    };
    // A later step can cancel the run even when this one is killed while it waits (a
    // job's time limit): the id goes out now, not only once the wait ends.
    if a.wait && github_enabled(a.github) {
        write_github_outputs(which.run_id.as_deref().or(which.job_id.as_deref()), None)?;
    }
    if !a.wait {
        // A hint for people, never for scripts (stderr, and only on a terminal).
        if !a.json && crate::util::stderr_is_tty() {
            match (&which.job_id, &which.run_id) {
                (Some(j), _) => eprintln!("follow it: qgjob status --job-id={j} --watch"),
                (_, Some(r)) => eprintln!("follow it: qgjob status --run-id={r} --watch"),
                _ => {}
            }
        }
        return Ok(EXIT_OK);
    }
    wait(
        client,
        &WaitArgs {
            // The client is already resolved; these flags are not read again.
            conn: a.conn.clone(),
            which,
            timeout: a.wait_timeout,
            junit: a.junit.clone(),
            github: a.github,
            json: a.json,
        },
    )
}

/// The jobs of a job or run, and its overall status word.
fn fetch(client: &Client, which: &Which) -> Result<(String, Vec<Job>)> {
    if let Some(id) = &which.job_id {
        let j = client.job(id)?;
        Ok((j.state.to_string(), vec![j]))
    } else if let Some(id) = &which.run_id {
        let r = client.run(id)?;
        Ok((r.status, r.jobs))
    } else {
        Err(CliError::Usage("give --job-id or --run-id".into()))
    }
}

fn all_final(jobs: &[Job]) -> bool {
    jobs.iter().all(|j| j.state.is_final())
}

/// Blocks until every job of `which` is final (or `timeout`), following the server's event
/// stream so it wakes as soon as the last job ends. Returns the status word and the jobs.
pub fn wait_final(
    client: &Client,
    which: &Which,
    timeout: Option<Duration>,
) -> Result<(String, Vec<Job>)> {
    wait_final_with(client, which, timeout, |_, _| {})
}

/// [`wait_final`], calling `progress(jobs, event)` with the jobs first seen and then with
/// every event (for a progress display).
pub fn wait_final_with(
    client: &Client,
    which: &Which,
    timeout: Option<Duration>,
    mut progress: impl FnMut(&[Job], Option<&qgjob_core::JobEvent>),
) -> Result<(String, Vec<Job>)> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let is_run = which.run_id.is_some();
    let id = which
        .job_id
        .as_deref()
        .or(which.run_id.as_deref())
        .unwrap_or_default()
        .to_string();
    let timed_out = || {
        CliError::Timeout(
            timeout
                .map(|t| fmt_ms(t.as_millis() as u64))
                .unwrap_or_default(),
        )
    };
    let mut link = Reconnect::default();
    loop {
        let Some((status, jobs)) = link.attempt(fetch(client, which), deadline, timed_out)? else {
            continue;
        };
        if all_final(&jobs) {
            return Ok((status, jobs));
        }
        progress(&jobs, None);
        let remaining = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(r) if !r.is_zero() => Some(r),
                _ => return Err(timed_out()),
            },
            None => None,
        };
        match client.events(&id, is_run, remaining) {
            Ok(mut stream) => loop {
                match stream.next_event() {
                    Ok(Some(ev)) if !is_run && ev.state.is_final() => break,
                    Ok(Some(ev)) => progress(&[], Some(&ev)),
                    Ok(None) => break,
                    // A broken stream (server restart, proxy): the fetch above decides
                    // whether to reconnect.
                    Err(_) => break,
                }
            },
            Err(e) if e.is_server_away() => {
                link.pause(e, deadline, timed_out)?;
                continue;
            }
            Err(e @ CliError::Api { .. }) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(timed_out());
                }
                return Err(e);
            }
            Err(_) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let (status, jobs) = fetch(client, which)?;
            if all_final(&jobs) {
                return Ok((status, jobs));
            }
            return Err(timed_out());
        }
        // The stream ended without the final state (server restart, proxy): re-check soon.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long `wait`, `status --watch` and `logs --follow` keep trying to reach a server they
/// were talking to (a restart, a deploy, a standby taking over; see
/// [`CliError::is_server_away`]): the server is durable, so the job is still there when it
/// is back.
const RECONNECT_GRACE: Duration = Duration::from_secs(120);

/// Reconnection state of a command that follows a job or run.
#[derive(Default)]
struct Reconnect {
    /// Whether the server answered at least once: a wrong address fails at once.
    reached: bool,
    /// Since when it has not answered.
    lost: Option<Instant>,
    /// Whether the user was told we are reconnecting.
    noted: bool,
}

impl Reconnect {
    /// The outcome of one request: `Some(value)` when it was answered, `None` after a
    /// pause when the server did not answer and the caller should try again, or the error
    /// to give up with (see [`Reconnect::pause`]).
    fn attempt<T>(
        &mut self,
        r: Result<T>,
        deadline: Option<Instant>,
        timed_out: impl Fn() -> CliError,
    ) -> Result<Option<T>> {
        match r {
            Ok(v) => {
                self.reached = true;
                self.lost = None;
                self.noted = false;
                Ok(Some(v))
            }
            Err(e) if e.is_server_away() => {
                self.pause(e, deadline, timed_out)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// After `e` (the server did not answer): waits a little and returns `Ok` to try again,
    /// or gives up with `e` (never reached, or lost for [`RECONNECT_GRACE`]) or with
    /// `timed_out()` once the deadline has passed.
    fn pause(
        &mut self,
        e: CliError,
        deadline: Option<Instant>,
        timed_out: impl Fn() -> CliError,
    ) -> Result<()> {
        // Something answering 5xx is at the right address (a standby, a proxy whose server
        // restarts); nothing answering at the first try is more likely a wrong one.
        if !self.reached && matches!(e, CliError::Unreachable { .. }) {
            return Err(e);
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Err(timed_out());
        }
        let since = *self.lost.get_or_insert(now);
        if now.duration_since(since) >= RECONNECT_GRACE {
            return Err(e);
        }
        if !self.noted {
            eprintln!("note: {e}; reconnecting");
            self.noted = true;
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }
}

fn github_enabled(flag: bool) -> bool {
    flag || std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true")
}

/// Writes the GitHub job summary (to `$GITHUB_STEP_SUMMARY`, appended) and prints
/// annotations: on stderr with `json`, so stdout stays one JSON object per line (the runner
/// reads workflow commands from both).
fn write_github(title: &str, jobs: &[Job], json: bool) -> Result<()> {
    for a in report::github_annotations(jobs) {
        if json {
            eprintln!("{a}");
        } else {
            out!("{a}");
        }
    }
    if let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| CliError::io(format!("opening {}", Path::new(&path).display()), e))?;
        f.write_all(report::github_summary(title, jobs).as_bytes())
            .map_err(|e| CliError::io("writing the GitHub job summary", e))?;
    }
    Ok(())
}

/// Refuses, before anything is submitted or waited on, a report file that could not be
/// written afterwards: the `--junit` file, and under GitHub Actions the job summary and
/// step output files named by the environment.
fn check_report_paths(junit: Option<&Path>, github: bool) -> Result<()> {
    let check = |what: &str, path: &Path| {
        if path.is_dir() {
            return Err(CliError::Usage(format!(
                "{what}: {} is a folder, not a file",
                path.display()
            )));
        }
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(CliError::Usage(
                format!("{what}: folder {} does not exist", dir.display()),
            )),
            _ => Ok(()),
        }
    };
    if let Some(path) = junit {
        check("--junit", path)?;
    }
    if github_enabled(github) {
        for var in ["GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT"] {
            if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
                check(var, Path::new(&path))?;
            }
        }
    }
    Ok(())
}

/// `qgjob wait`.
pub fn wait(client: &Client, a: &WaitArgs) -> Result<u8> {
    // A report path that cannot be written should fail now, not after a long wait.
    check_report_paths(a.junit.as_deref(), a.github)?;
    // A live bar for runs on a terminal; CI logs and --json get nothing extra.
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut states: std::collections::HashMap<qgjob_core::JobId, JobState> =
        std::collections::HashMap::new();
    let show = a.which.run_id.is_some() && !a.json && use_progress();
    let res = wait_final_with(client, &a.which, a.timeout, |jobs, ev| {
        if !show {
            return;
        }
        for j in jobs {
            states.insert(j.id, j.state);
        }
        if let Some(ev) = ev {
            states.insert(ev.job_id, ev.state);
        }
        let pb = bar.get_or_insert_with(|| {
            let pb = indicatif::ProgressBar::new(states.len() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        });
        let n = |s: JobState| states.values().filter(|x| **x == s).count();
        pb.set_length(states.len() as u64);
        pb.set_position(states.values().filter(|s| s.is_final()).count() as u64);
        pb.set_message(format!(
            "{} running, {} passed, {} failed",
            n(JobState::Running),
            n(JobState::Passed),
            n(JobState::Failed)
        ));
    });
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    // With --json: what was waited on, its status, the exit code and the jobs, in one shape
    // whether the wait ended or timed out (then where every job stood, best effort).
    let document = |status: &str, code: u8, jobs: &[Job]| {
        let mut v = serde_json::json!({
            "status": status,
            "exit_code": code,
            "jobs": jobs,
        });
        if let Some(j) = &a.which.job_id {
            v["job_id"] = serde_json::json!(j);
        }
        if let Some(r) = &a.which.run_id {
            v["run_id"] = serde_json::json!(r);
        }
        v
    };
    let title = match (&a.which.job_id, &a.which.run_id) {
        (Some(j), _) => format!("job {j}"),
        (_, Some(r)) => format!("run {r}"),
        _ => String::new(),
    };
    let id = a.which.run_id.as_deref().or(a.which.job_id.as_deref());
    // A timeout still writes every report, with the jobs as they stand (unfinished ones
    // show as such), so CI keeps its JUnit, summary and the run id to cancel it; the
    // timeout error comes last.
    let (status, jobs, timed_out) = match res {
        Ok((status, jobs)) => (status, jobs, None),
        Err(e @ CliError::Timeout(_)) => match fetch(client, &a.which) {
            Ok((_, jobs)) => ("timeout".to_string(), jobs, Some(e)),
            Err(_) => {
                // The jobs are out of reach; the id alone still lets a later step cancel.
                if github_enabled(a.github) {
                    write_github_outputs(id, None)?;
                }
                return Err(e);
            }
        },
        Err(e) => return Err(e),
    };
    let code = match timed_out {
        Some(_) => EXIT_INFRA,
        None => report::exit_code(&jobs),
    };
    if a.json {
        print_json(&document(&status, code, &jobs))?;
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(report::summary_table(&jobs, use_color()).as_bytes());
    }
    if github_enabled(a.github) {
        let heading = match &timed_out {
            Some(e) => format!("{title} ({e})"),
            None => title.clone(),
        };
        write_github(&heading, &jobs, a.json)?;
        write_github_outputs(id, Some(&jobs))?;
    }
    // Last, so that the summary is printed even when the report cannot be written.
    if let Some(path) = &a.junit {
        std::fs::write(path, report::junit_xml(&title, &jobs))
            .map_err(|e| CliError::input(format!("writing {}", path.display()), e))?;
    }
    match timed_out {
        Some(e) => Err(e),
        None => Ok(code),
    }
}

/// Appends step outputs (`run-id`, and per-state counts when the jobs are known) to
/// `$GITHUB_OUTPUT`, for later steps.
fn write_github_outputs(id: Option<&str>, jobs: Option<&[Job]>) -> Result<()> {
    let Some(path) = std::env::var_os("GITHUB_OUTPUT").filter(|p| !p.is_empty()) else {
        return Ok(());
    };
    let mut text = String::new();
    if let Some(id) = id {
        text.push_str(&format!("run-id={id}\n"));
    }
    if let Some(jobs) = jobs {
        for s in [
            JobState::Passed,
            JobState::Failed,
            JobState::Error,
            JobState::Canceled,
        ] {
            let n = jobs.iter().filter(|j| j.state == s).count();
            text.push_str(&format!("{}={n}\n", s.as_str()));
        }
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| CliError::io(format!("writing {}", Path::new(&path).display()), e))
}

fn state_text(j: &Job, colour: bool) -> String {
    let s = paint(
        j.state.as_str(),
        match j.state {
            JobState::Passed => "32",
            JobState::Failed | JobState::Error => "31",
            JobState::Canceled => "33",
            _ => "36",
        },
        colour,
    );
    if j.attempt > 1 || (j.state == JobState::Running) {
        format!("{s} (attempt {})", j.attempt)
    } else {
        s
    }
}

/// `qgjob status`.
pub fn status(client: &Client, a: &StatusArgs) -> Result<u8> {
    if a.watch {
        return watch(client, a);
    }
    let colour = use_color();
    if let Some(id) = &a.which.job_id {
        let j = client.job(id)?;
        if a.json {
            print_json(&j)?;
            return Ok(EXIT_OK);
        }
        out!("job       {}", j.id);
        out!("state     {}", state_text(&j, colour));
        out!("org       {}", j.spec.org_id);
        out!("app       {}", j.spec.app_version_id);
        out!("target    {}", j.spec.target);
        out!("priority  {}", j.spec.priority.0);
        out!("tests     {}", j.spec.tests.join(", "));
        if let Some(d) = &j.device {
            out!("device    {d}");
        }
        if let Some(ms) = report::job_duration_ms(&j) {
            out!("duration  {}", fmt_ms(ms));
        }
        if let Some(o) = &j.outcome {
            let c = o.counts;
            if c.passed + c.failed + c.skipped > 0 {
                out!(
                    "results   {} passed, {} failed, {} skipped{}",
                    c.passed,
                    c.failed,
                    c.skipped,
                    if c.flaky > 0 {
                        format!(" ({} flaky)", c.flaky)
                    } else {
                        String::new()
                    }
                );
            }
        }
        if let Some(r) = j.spec.run_id {
            out!("run       {r}");
        }
        // `error` is the final attempt's: none for a job that passed. The server keeps the
        // error that made it retry the job; shown, it says which attempt it was.
        let err = j.outcome.as_ref().and_then(|o| o.error.as_deref());
        if let Some(e) = err {
            out!("error     {}", e.lines().next().unwrap_or(""));
        }
        if let Some((n, e)) = report::earlier_attempt_error(&j).filter(|(_, e)| Some(*e) != err) {
            out!("earlier   attempt {n}: {}", e.lines().next().unwrap_or(""));
        }
    } else if let Some(id) = &a.which.run_id {
        let r = client.run(id)?;
        if a.json {
            print_json(&r)?;
            return Ok(EXIT_OK);
        }
        let c = r.counts;
        out!(
            "run {} {} ({} jobs: {} queued, {} running, {} passed, {} failed, {} error, {} canceled)",
            r.run_id,
            r.status,
            c.total(),
            c.queued,
            c.running,
            c.passed,
            c.failed,
            c.error,
            c.canceled
        );
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(report::summary_table(&r.jobs, colour).as_bytes());
    }
    Ok(EXIT_OK)
}

/// `qgjob status --watch`: prints each state change pushed by the server until final.
fn watch(client: &Client, a: &StatusArgs) -> Result<u8> {
    let colour = use_color();
    let is_run = a.which.run_id.is_some();
    let id = a
        .which
        .job_id
        .as_deref()
        .or(a.which.run_id.as_deref())
        .unwrap_or_default()
        .to_string();
    // A run on a terminal gets a live bar; everything else gets plain lines.
    let bar = if is_run && !a.json && use_progress() {
        let r = client.run(&id)?;
        let pb = indicatif::ProgressBar::new(r.jobs.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        Some(pb)
    } else {
        None
    };
    let mut last: std::collections::HashMap<qgjob_core::JobId, (JobState, u32)> =
        std::collections::HashMap::new();
    // A run's lines name each job's tests too: ids alone say little to a person.
    let mut names: std::collections::HashMap<qgjob_core::JobId, String> =
        std::collections::HashMap::new();
    if is_run && !a.json && bar.is_none() {
        if let Ok((_, jobs)) = fetch(client, &a.which) {
            names = jobs
                .into_iter()
                .map(|j| (j.id, j.spec.tests.join(" ")))
                .collect();
        }
    }
    let mut link = Reconnect::default();
    let no_deadline = || CliError::Timeout(String::new());
    loop {
        let Some(mut stream) = link.attempt(client.events(&id, is_run, None), None, no_deadline)?
        else {
            continue;
        };
        let mut ended = false;
        loop {
            let ev = match stream.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                // A broken stream (server restart): reconnect below; states already
                // printed are not printed again.
                Err(CliError::Unreachable { .. }) => break,
                Err(e) => return Err(e),
            };
            if last.get(&ev.job_id) == Some(&(ev.state, ev.attempt)) {
                continue;
            }
            last.insert(ev.job_id, (ev.state, ev.attempt));
            if a.json {
                print_json(&ev)?;
            } else if let Some(pb) = &bar {
                let done = last.values().filter(|(s, _)| s.is_final()).count();
                let count = |st: JobState| last.values().filter(|(s, _)| *s == st).count();
                pb.set_position(done as u64);
                pb.set_message(format!(
                    "{} running, {} passed, {} failed, {} error",
                    count(JobState::Running),
                    count(JobState::Passed),
                    count(JobState::Failed),
                    count(JobState::Error)
                ));
            } else {
                let st = paint(
                    ev.state.as_str(),
                    match ev.state {
                        JobState::Passed => "32",
                        JobState::Failed | JobState::Error => "31",
                        JobState::Canceled => "33",
                        _ => "36",
                    },
                    colour,
                );
                let attempt = if ev.attempt > 1 {
                    format!(" (attempt {})", ev.attempt)
                } else {
                    String::new()
                };
                if is_run {
                    match names.get(&ev.job_id) {
                        Some(t) => out!("{} {t} {st}{attempt}", ev.job_id),
                        None => out!("{} {st}{attempt}", ev.job_id),
                    }
                } else {
                    out!("{st}{attempt}");
                }
            }
            if !is_run && ev.state.is_final() {
                ended = true;
                break;
            }
        }
        // The stream ended: make sure everything is final (reconnect if not).
        let Some((status, jobs)) = link.attempt(fetch(client, &a.which), None, no_deadline)? else {
            continue;
        };
        if ended || all_final(&jobs) {
            if let Some(pb) = &bar {
                pb.finish_and_clear();
            }
            if is_run && !a.json {
                out!("run {id} {status}");
                if bar.is_some() {
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(report::summary_table(&jobs, colour).as_bytes());
                }
            } else if !is_run && !ended && !a.json {
                // The final event came before we connected: print the final state.
                out!("{status}");
            }
            // Like `wait`: 0 all passed, 1 a test failed, 3 error or canceled.
            return Ok(report::exit_code(&jobs));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `qgjob list`.
pub fn list(client: &Client, a: &ListArgs) -> Result<u8> {
    if let Some(s) = &a.state {
        s.parse::<JobState>().map_err(invalid)?;
    }
    let page = client.list(&ListQuery {
        org_id: a.org_id.clone(),
        state: a.state.clone(),
        app_version_id: a.app_version_id.clone(),
        target: a.target.clone(),
        run_id: a.run_id.clone(),
        cursor: a.cursor.clone(),
        limit: Some(a.limit as usize),
    })?;
    if a.json {
        print_json(&page)?;
        return Ok(EXIT_OK);
    }
    if page.jobs.is_empty() {
        // On stderr: a script reading the table gets an empty one, a person gets a word.
        eprintln!("(no jobs match)");
        return Ok(EXIT_OK);
    }
    let colour = use_color();
    let rows: Vec<[String; 7]> = page
        .jobs
        .iter()
        .map(|j| {
            [
                j.id.to_string(),
                j.state.to_string(),
                j.spec.org_id.to_string(),
                j.spec.app_version_id.to_string(),
                j.spec.target.to_string(),
                j.spec.priority.0.to_string(),
                j.spec.tests.join(", "),
            ]
        })
        .collect();
    let header = ["JOB", "STATE", "ORG", "APP", "TARGET", "PRIO", "TESTS"].map(String::from);
    let mut w = header.clone().map(|h| h.len());
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let fmt = |r: &[String; 7], paint_state: bool| {
        let mut s = String::new();
        for (i, c) in r.iter().enumerate() {
            let cell = if i == 1 && paint_state {
                let st = c.parse::<JobState>().unwrap_or(JobState::Queued);
                paint(
                    c,
                    match st {
                        JobState::Passed => "32",
                        JobState::Failed | JobState::Error => "31",
                        JobState::Canceled => "33",
                        _ => "36",
                    },
                    colour,
                )
            } else {
                c.clone()
            };
            s.push_str(&cell);
            if i < 6 {
                s.push_str(&" ".repeat(w[i] - c.len() + 2));
            }
        }
        s
    };
    out!("{}", fmt(&header, false));
    for r in &rows {
        out!("{}", fmt(r, true));
    }
    if let Some(next) = &page.next_cursor {
        // On stderr: scripts read the table.
        eprintln!("(more jobs: add --cursor={next} for the next page, or filter)");
    }
    Ok(EXIT_OK)
}

/// `qgjob cancel`.
pub fn cancel(client: &Client, a: &CancelArgs) -> Result<u8> {
    if let Some(id) = &a.which.job_id {
        let r = client.cancel_job(id)?;
        if a.json {
            print_json(&r)?;
        } else {
            // `requested`: the job is running; its agent stops it at its next heartbeat.
            let what = if r.result == "requested" {
                "cancel requested (its agent stops it at the next heartbeat)"
            } else {
                r.result.as_str()
            };
            out!("job {} {what}", r.job_id);
        }
    } else if let Some(id) = &a.which.run_id {
        let r = client.cancel_run(id)?;
        if a.json {
            print_json(&r)?;
        } else {
            out!(
                "run {}: {} canceled, {} asked to stop",
                r.run_id,
                r.canceled,
                r.requested
            );
        }
    }
    Ok(EXIT_OK)
}

/// Where `qgjob logs` puts what it reads: the bytes as they are, or with `--json` objects
/// `{"job_id", "offset", "text"}` (`offset`: where `text` starts in the log, in bytes)
/// whose texts, joined, are the log. Without `--follow` that is one object for the whole
/// log; with it, one per piece of output as it arrives.
struct LogSink<'a, W: Write> {
    out: W,
    job_id: &'a str,
    json: bool,
    /// `--follow`: write as output arrives rather than once at the end.
    follow: bool,
    /// With `--json`: bytes not written yet (the whole log without `--follow`; else the
    /// start of a character an answer cut in two, kept until the rest arrives).
    held: Vec<u8>,
    /// With `--json`: where `held` starts in the log.
    held_at: u64,
}

impl<'a, W: Write> LogSink<'a, W> {
    fn new(out: W, job_id: &'a str, json: bool, follow: bool) -> Self {
        LogSink {
            out,
            job_id,
            json,
            follow,
            held: Vec::new(),
            held_at: 0,
        }
    }

    /// Takes the next bytes of the log.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if !self.json {
            // A closed pipe (`qgjob logs | head`) is not an error.
            let _ = self.out.write_all(bytes);
            let _ = self.out.flush();
            return Ok(());
        }
        self.held.extend_from_slice(bytes);
        if self.follow {
            let keep = unfinished_utf8(&self.held);
            let ready = self.held.len() - keep;
            self.emit(ready)?;
        }
        Ok(())
    }

    /// Writes what is held: the log's end has been read.
    fn finish(&mut self) -> Result<()> {
        if !self.json {
            return Ok(());
        }
        // Without --follow the object is written even for an empty log: one read, one object.
        if self.follow && self.held.is_empty() {
            return Ok(());
        }
        self.emit(self.held.len())
    }

    /// Writes the first `n` held bytes as one object.
    fn emit(&mut self, n: usize) -> Result<()> {
        if n == 0 && self.follow {
            return Ok(());
        }
        let rest = self.held.split_off(n);
        // A log is whatever the test printed: bytes that are not UTF-8 become U+FFFD.
        let v = serde_json::json!({
            "job_id": self.job_id,
            "offset": self.held_at,
            "text": String::from_utf8_lossy(&self.held),
        });
        let line = serde_json::to_string(&v)
            .map_err(|e| CliError::Other(format!("encoding JSON: {e}")))?;
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
        self.held_at += n as u64;
        self.held = rest;
        Ok(())
    }
}

/// How many bytes at the end of `b` begin a UTF-8 character that is not complete yet (0
/// when `b` ends on a whole character, or on bytes that are no UTF-8 at all).
fn unfinished_utf8(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let c = b[b.len() - back];
        if c & 0xC0 == 0x80 {
            // A continuation byte: its character starts further back.
            continue;
        }
        let len = match c {
            0xF0..=0xF7 => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        return if len > back { back } else { 0 };
    }
    0
}

/// `qgjob logs`.
pub fn logs(client: &Client, a: &LogsArgs) -> Result<u8> {
    // What has been read: after a reconnect, `--follow` goes on from here, so no byte is
    // printed twice or skipped.
    let mut offset = 0u64;
    // Like `wait`, `--follow` rides out a server restart (a single read has nothing to
    // ride out: it fails at once).
    let mut link = Reconnect::default();
    let no_deadline = || CliError::Timeout(String::new());
    let mut sink = LogSink::new(std::io::stdout(), &a.job_id, a.json, a.follow);
    loop {
        let Some((bytes, size)) =
            link.attempt(client.logs(&a.job_id, offset), None, no_deadline)?
        else {
            continue;
        };
        sink.write(&bytes)?;
        offset += bytes.len() as u64;
        // An answer carries at most 1 MiB: ask again while the log goes further.
        if !bytes.is_empty() && offset < size {
            continue;
        }
        if !a.follow {
            if offset == 0 && !a.json {
                // Simulated devices, for one, write no log: say so rather than nothing,
                // and promise nothing of a job that is over. (The JSON says it: "text": "".)
                let yet = if client.job(&a.job_id)?.state.is_final() {
                    ""
                } else {
                    " yet"
                };
                eprintln!("(job {} has no log output{yet})", a.job_id);
            }
            sink.finish()?;
            return Ok(EXIT_OK);
        }
        if !bytes.is_empty() {
            continue;
        }
        let Some(job) = link.attempt(client.job(&a.job_id), None, no_deadline)? else {
            continue;
        };
        if job.state.is_final() {
            // Last reads: output may have landed between the two calls.
            loop {
                let Some((rest, size)) =
                    link.attempt(client.logs(&a.job_id, offset), None, no_deadline)?
                else {
                    continue;
                };
                sink.write(&rest)?;
                offset += rest.len() as u64;
                if rest.is_empty() || offset >= size {
                    sink.finish()?;
                    return Ok(EXIT_OK);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `qgjob app upload`.
pub fn app_upload(client: &Client, a: &AppUploadArgs) -> Result<u8> {
    OrgId::new(a.org_id.clone()).map_err(invalid)?;
    AppVersionId::new(a.app_version_id.clone()).map_err(invalid)?;
    let bytes = std::fs::read(&a.file)
        .map_err(|e| CliError::input(format!("reading {}", a.file.display()), e))?;
    let r = client.upload_app(&a.org_id, &a.app_version_id, &bytes)?;
    if a.json {
        print_json(&r)?;
    } else {
        out!("{}", r.sha256);
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(extra: &[&str]) -> SubmitArgs {
        let mut v = vec![
            "qgjob",
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=x",
        ];
        v.extend_from_slice(extra);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Submit(s) => s,
            _ => unreachable!("parsed a submit"),
        }
    }

    /// The JSON objects of `logs --json`, parsed.
    fn log_objects(out: &[u8]) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn logs_json_is_one_object_or_one_per_piece_and_never_splits_a_character() {
        // "é" is two bytes; the first answer ends between them.
        let (a, b) = "caf\u{e9}\n".as_bytes().split_at(4);
        let mut out = Vec::new();
        let mut sink = LogSink::new(&mut out, "j1", true, true);
        sink.write(a).unwrap();
        sink.write(b).unwrap();
        sink.write(b"").unwrap();
        sink.write(b"next\n").unwrap();
        sink.finish().unwrap();
        let v = log_objects(&out);
        assert_eq!(v.len(), 3, "{v:?}");
        assert_eq!(
            v[0],
            serde_json::json!({"job_id": "j1", "offset": 0, "text": "caf"})
        );
        assert_eq!(v[1]["text"], "\u{e9}\n");
        assert_eq!(v[1]["offset"], 3);
        assert_eq!(
            v[2],
            serde_json::json!({"job_id": "j1", "offset": 6, "text": "next\n"})
        );

        // Without --follow: one object for the whole log, even an empty one.
        let mut out = Vec::new();
        let mut sink = LogSink::new(&mut out, "j1", true, false);
        sink.write(a).unwrap();
        sink.write(b).unwrap();
        sink.finish().unwrap();
        let v = log_objects(&out);
        assert_eq!(
            v,
            vec![serde_json::json!({"job_id": "j1", "offset": 0, "text": "caf\u{e9}\n"})]
        );
        let mut out = Vec::new();
        LogSink::new(&mut out, "j1", true, false).finish().unwrap();
        assert_eq!(log_objects(&out)[0]["text"], "");

        // A character cut off at the very end is still written, as U+FFFD.
        let mut out = Vec::new();
        let mut sink = LogSink::new(&mut out, "j1", true, true);
        sink.write(a).unwrap();
        sink.finish().unwrap();
        let v = log_objects(&out);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[1]["text"], "\u{fffd}");

        // Plain output: the bytes as they are.
        let mut out = Vec::new();
        let mut sink = LogSink::new(&mut out, "j1", false, true);
        sink.write(a).unwrap();
        sink.write(b).unwrap();
        sink.finish().unwrap();
        assert_eq!(out, "caf\u{e9}\n".as_bytes());

        assert_eq!(unfinished_utf8("€".as_bytes()), 0);
        assert_eq!(unfinished_utf8(&"€".as_bytes()[..2]), 2);
        assert_eq!(unfinished_utf8(&[b'a', 0xF0, 0x9F, 0x98]), 3);
        assert_eq!(unfinished_utf8(&[0x80, 0x80, 0x80]), 0);
    }

    #[test]
    fn specs_carry_every_flag() {
        let a = args(&[
            "--priority=7",
            "--target=browserstack",
            "--max-attempts=5",
            "--timeout=90s",
            "--retry-failed-tests",
            "--label=branch=main",
        ]);
        let s = build_specs(&a, &["tests/a.spec.js".into()], Some("ab".repeat(32))).unwrap();
        assert_eq!(s.len(), 1);
        let s = &s[0];
        assert_eq!(s.tests, vec!["tests/a.spec.js"]);
        assert_eq!(s.priority, Priority(7));
        assert_eq!(s.target.as_str(), "browserstack");
        assert_eq!(s.max_attempts, 5);
        assert_eq!(s.timeout_ms, 90_000);
        assert!(s.retry_failed_tests);
        assert_eq!(s.labels.get("branch").map(String::as_str), Some("main"));
        assert_eq!(s.bundle.as_deref().map(str::len), Some(64));
    }

    #[test]
    fn a_run_gets_one_job_per_test_and_distinct_idempotency_keys() {
        let a = args(&["--idempotency-key=ci-42"]);
        let tests = vec!["a.spec.js".to_string(), "b.spec.js".to_string()];
        let s = build_specs(&a, &tests, None).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].idempotency_key.as_deref(), Some("ci-42:a.spec.js"));
        assert_eq!(s[1].idempotency_key.as_deref(), Some("ci-42:b.spec.js"));
        let one = build_specs(&a, &tests[..1], None).unwrap();
        assert_eq!(one[0].idempotency_key.as_deref(), Some("ci-42"));
    }

    #[test]
    fn invalid_values_are_input_errors_naming_the_field() {
        let e = build_specs(&args(&["--priority=5000"]), &["a".into()], None).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("invalid --priority"), "{e}");
        // The flag's name, not the API field's (timeout_ms).
        let e = build_specs(&args(&["--timeout=0s"]), &["a".into()], None).unwrap_err();
        assert!(e.to_string().starts_with("invalid --timeout:"), "{e}");
        // The flag is --label, though the API field is `labels`.
        let e = build_specs(&args(&["--label==main"]), &["a".into()], None).unwrap_err();
        assert!(e.to_string().starts_with("invalid --label:"), "{e}");
        // Out-of-range attempts never get this far: the flag's own parser refuses them.
        let e = Cli::try_parse_from([
            "qgjob",
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=x",
            "--max-attempts=0",
        ])
        .map(|_| ())
        .unwrap_err();
        assert!(e.to_string().contains("max-attempts"), "{e}");
        assert!(e.to_string().contains("1..=20"), "{e}");
    }
}
