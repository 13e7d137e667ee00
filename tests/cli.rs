//! End-to-end tests of the `qgjob` binary: a real `qgjob server` (memory store, 127.0.0.1
//! port 0) and `qgjob agent --simulate` children (simulated devices, named as such), driven
//! through the same commands a user types.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::{qgjob, spawn_server, start_agent, start_server, Proc, BIN};

fn run(server: Option<&str>, cwd: &Path, args: &[&str]) -> Output {
    qgjob(server, cwd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("qgjob runs")
}

/// [`run`] without a server, for a command expected to end by itself: fails the test
/// instead of waiting for ever if it does not end within a minute.
fn run_bounded(cwd: &Path, args: &[&str]) -> Output {
    run_bounded_on(None, cwd, args)
}

/// [`run_bounded`] against `server`.
fn run_bounded_on(server: Option<&str>, cwd: &Path, args: &[&str]) -> Output {
    let child = qgjob(server, cwd)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qgjob runs");
    let mut p = Proc(child);
    exit_code_of(&mut p, &format!("qgjob {args:?}"));
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(mut s) = p.0.stdout.take() {
        s.read_to_end(&mut out).expect("stdout");
    }
    if let Some(mut s) = p.0.stderr.take() {
        s.read_to_end(&mut err).expect("stderr");
    }
    Output {
        status: p.0.wait().expect("exit status"),
        stdout: out,
        stderr: err,
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited normally")
}

/// A project directory holding AppWright-style spec files.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for f in [
        "tests/onboarding.spec.js",
        "tests/auth/login.spec.js",
        "tests/auth/logout.spec.js",
        "tests/cart.spec.js",
    ] {
        let p = d.path().join(f);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, format!("// {f}\ntest('works', async () => {{}});\n")).expect("write");
    }
    std::fs::write(d.path().join("package.json"), "{\"name\": \"app-tests\"}\n").expect("write");
    d
}

fn json(o: &Output) -> Value {
    serde_json::from_str(stdout(o).trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {:?}", stdout(o), stderr(o)))
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
    k.sort();
    k
}

/// Reads lines from a child's stdout until `done` says so (bounded by time and count).
fn read_lines_until(out: ChildStdout, done: impl Fn(&str) -> bool) -> Vec<String> {
    recv_until(&line_channel(out), done)
}

/// The lines a child writes to `out`, as they come.
fn line_channel(out: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines from `rx` up to the first that `done` accepts (bounded: a minute, 100 lines, or
/// the end of the output).
fn recv_until(rx: &Receiver<String>, done: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while lines.len() < 100 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let stop = done(&l);
                lines.push(l);
                if stop {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    lines
}

/// Waits (bounded) for a child to exit; its exit code.
fn exit_code_of(p: &mut Proc, what: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = p.0.try_wait().expect("try_wait") {
            return s
                .code()
                .unwrap_or_else(|| panic!("{what} died of a signal: {s:?}"));
        }
        assert!(Instant::now() < deadline, "{what} did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `sig` to a child.
fn signal(p: &Proc, sig: nix::sys::signal::Signal) {
    let pid = i32::try_from(p.0.id()).expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal sent");
}

#[test]
fn original_readme_flow_submit_then_watch_queued_running_passed() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);

    // The original README's commands, verbatim (the server comes from QGJOB_SERVER).
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=qualgent",
            "--app-version-id=xyz123",
            "--test=tests/onboarding.spec.js",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words.len(), 3, "{out}");
    assert_eq!(words[0], "job");
    assert_eq!(words[2], "queued");
    let id = words[1].to_string();

    // Watch before any agent exists, so the first state is `queued`.
    let mut watch = qgjob(Some(&url), dir.path())
        .args(["status", &format!("--job-id={id}"), "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("watch starts");
    let out = watch.stdout.take().expect("stdout");
    let watch = Proc(watch);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        read_lines_until(out, |l| {
            let _ = tx.send(l.to_string());
            ["passed", "failed", "error", "canceled"]
                .iter()
                .any(|s| l.starts_with(s))
        })
    });
    // Start the agent once the watcher has shown the queued state.
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("first watch line");
    assert_eq!(first, "queued");
    let _agent = start_agent(&url, dir.path(), "emulator", &[]);
    let lines = reader.join().expect("reader");
    assert_eq!(lines, vec!["queued", "running", "passed"]);
    drop(watch);

    // status (not watching) shows the final state; --json is the server's Job.
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={id}")],
    );
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("state     passed"), "{}", stdout(&o));
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={id}"), "--json"],
    );
    let v = json(&o);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["state"], "passed");
    assert_eq!(v["spec"]["tests"][0], "tests/onboarding.spec.js");
    assert_eq!(v["spec"]["target"], "emulator");
    // The spec file was packed into a bundle whose hash the job carries.
    assert_eq!(v["spec"]["bundle"].as_str().map(str::len), Some(64));
}

#[test]
fn a_job_past_its_timeout_is_stopped_and_ends_in_error() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    // Simulated jobs take 30 s; the job allows 2.
    let _agent = Proc(
        qgjob(Some(&url), dir.path())
            .args(["agent", "--target", "emulator", "--simulate"])
            .args(["--devices", "1", "--install-s", "0.1", "--run-s", "30"])
            .args(["--name", "test-slow"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent starts"),
    );
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/onboarding.spec.js",
            "--target=emulator",
            "--timeout=2s",
            "--max-attempts=1",
            "--wait",
            "--wait-timeout=120s",
            "--json",
        ],
    );
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    let last = stdout(&o).lines().last().unwrap_or_default().to_string();
    let v: Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{e}: {last:?}"));
    let id = v["jobs"][0]["id"].as_str().expect("job id").to_string();
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={id}"), "--json"],
    );
    let job = json(&o);
    assert_eq!(job["state"], "error", "{job}");
    let err = job["outcome"]["error"].as_str().unwrap_or_default();
    assert!(
        err.starts_with("timed out: the tests ran past the job's timeout of 2 s"),
        "{job}"
    );
}

#[test]
fn a_retried_ci_step_waits_on_the_run_it_submitted_before() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let _agent = start_agent(&url, dir.path(), "emulator", &[]);
    // `qgjob submit` of acme/v1's `test` with idempotency key `key`, plus `extra`: must
    // succeed.
    let submit_keyed = |test: &str, key: &str, extra: &[&str]| {
        let base = [
            "submit".to_string(),
            "--org-id=acme".into(),
            "--app-version-id=v1".into(),
            format!("--test={test}"),
            format!("--idempotency-key={key}"),
        ];
        let base: Vec<&str> = base.iter().map(String::as_str).collect();
        let o = run(Some(&url), dir.path(), &[&base[..], extra].concat());
        assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
        o
    };
    let submit = |extra: &[&str]| stdout(&submit_keyed("tests/auth", "ci-42", extra));
    let step = || {
        let out = submit(&["--wait", "--wait-timeout=60s", "--json"]);
        // Two documents: the submit's answer, then the wait's.
        let v: Value = serde_json::from_str(out.lines().last().expect("a line")).expect("JSON");
        let mut ids: Vec<String> = v["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["id"].as_str().expect("id").to_string())
            .collect();
        ids.sort();
        assert_eq!(ids.len(), 2, "{v}");
        ids
    };
    // The step runs again (a CI re-run): the same jobs, already passed, exit 0.
    let first = step();
    assert_eq!(step(), first);
    let out = submit(&[]);
    assert!(out.contains("(2 jobs, submitted before)"), "{out}");

    // One test makes one job, not a run; a repeat says it is the earlier job, in JSON as
    // the server does and in words.
    let one = |extra: &[&str]| submit_keyed("tests/cart.spec.js", "ci-43", extra);
    let v = json(&one(&["--json"]));
    assert_eq!(keys(&v), vec!["created", "job_id", "status"]);
    assert_eq!(v["created"], true, "{v}");
    let id = v["job_id"].as_str().expect("id").to_string();
    let again = json(&one(&["--json"]));
    assert_eq!(keys(&again), vec!["created", "job_id", "status"]);
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["job_id"], id.as_str());
    let out = stdout(&one(&[]));
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(&words[..2], &["job", id.as_str()], "{out}");
    assert!(out.trim_end().ends_with(" (submitted before)"), "{out}");
}

#[test]
fn wait_exit_codes_and_junit() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    // Simulated devices: emulators pass everything, browserstack fails every test.
    let _emu = start_agent(&url, dir.path(), "emulator", &[]);
    let _bs = start_agent(&url, dir.path(), "browserstack", &["--fail-rate", "1"]);
    let submit = |extra: &[&str]| {
        let mut args = vec![
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/onboarding.spec.js",
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = run(Some(&url), dir.path(), &args);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let v = json(&o);
        assert_eq!(keys(&v), vec!["created", "job_id", "status"]);
        assert_eq!(v["status"], "queued");
        assert_eq!(v["created"], true);
        v["job_id"].as_str().expect("id").to_string()
    };

    // 0: passed.
    let ok = submit(&[]);
    let o = run(
        Some(&url),
        dir.path(),
        &["wait", &format!("--job-id={ok}"), "--timeout=60s"],
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let table = stdout(&o);
    let header = table.lines().next().expect("header");
    for col in [
        "TEST", "APP", "TARGET", "DEVICE", "ATTEMPTS", "DURATION", "RESULT",
    ] {
        assert!(header.contains(col), "{header}");
    }
    assert!(
        table.lines().nth(1).expect("row").ends_with("passed"),
        "{table}"
    );
    assert!(table.contains("test-emulator/emulator-"), "{table}");

    // 1: a test failed.
    let bad = submit(&["--target=browserstack"]);
    let o = run(
        Some(&url),
        dir.path(),
        &["wait", &format!("--job-id={bad}")],
    );
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("failed"));
    // `status --watch` ends with the same code.
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={bad}"), "--watch"],
    );
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    assert_eq!(stdout(&o).lines().last(), Some("failed"), "{}", stdout(&o));

    // 3: no device serves `device`, so waiting times out...
    let stuck = submit(&["--target=device"]);
    // (Its log is empty so far, and may not be later.)
    let o = run(
        Some(&url),
        dir.path(),
        &["logs", &format!("--job-id={stuck}")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(stderr(&o), format!("(job {stuck} has no log output yet)\n"));
    let o = run(
        Some(&url),
        dir.path(),
        &["wait", &format!("--job-id={stuck}"), "--timeout=1s"],
    );
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).starts_with("error: timed out"), "{}", stderr(&o));
    // With --json a script still gets a document saying where the job stood.
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "wait",
            &format!("--job-id={stuck}"),
            "--timeout=1s",
            "--json",
        ],
    );
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    let v = json(&o);
    // The same keys as a finished wait's.
    assert_eq!(keys(&v), vec!["exit_code", "job_id", "jobs", "status"]);
    assert_eq!(v["status"], "timeout");
    assert_eq!(v["jobs"][0]["state"], "queued");
    // ...and once canceled it is final, and canceled is exit 3 too.
    let o = run(
        Some(&url),
        dir.path(),
        &["cancel", &format!("--job-id={stuck}"), "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(json(&o)["result"], "canceled");
    let o = run(
        Some(&url),
        dir.path(),
        &["wait", &format!("--job-id={stuck}")],
    );
    assert_eq!(code(&o), 3);
    assert!(stdout(&o).contains("canceled"));
    // Canceling it again is refused by the server: an input error, one line.
    let o = run(
        Some(&url),
        dir.path(),
        &["cancel", &format!("--job-id={stuck}")],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    // A run mixing a pass and a failure: exit 1 and a JUnit file that parses.
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v2",
            "--test=tests/auth/*.spec.js",
            "--target=browserstack",
            "--json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let failing_run = json(&o)["run_id"].as_str().expect("run id").to_string();
    let junit = dir.path().join("report.xml");
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "wait",
            &format!("--run-id={failing_run}"),
            "--junit",
            junit.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(code(&o), 1, "{}{}", stdout(&o), stderr(&o));
    let (suites, cases, failures) = parse_junit(&junit);
    assert_eq!(suites, 2);
    assert!(cases >= 2);
    assert!(failures >= 2, "every browserstack job failed a test");

    // Under GitHub Actions: a Markdown job summary and one `::error` annotation per failure.
    let summary = dir.path().join("summary.md");
    let o = qgjob(Some(&url), dir.path())
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .args(["wait", &format!("--run-id={failing_run}")])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 1);
    let annotations: Vec<String> = stdout(&o)
        .lines()
        .filter(|l| l.starts_with("::error "))
        .map(String::from)
        .collect();
    assert_eq!(annotations.len(), failures, "{}", stdout(&o));
    assert!(annotations.iter().all(|a| a.contains("file=tests/auth/")));
    let md = std::fs::read_to_string(&summary).expect("summary written");
    assert!(md.contains("| Test | App | Target |"), "{md}");
    assert_eq!(md.matches("| browserstack |").count(), 2, "{md}");
    // With --json stdout stays one JSON object per line: the annotations go to stderr,
    // where the runner reads workflow commands too.
    let o = qgjob(Some(&url), dir.path())
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .args(["wait", &format!("--run-id={failing_run}"), "--json"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert_eq!(json(&o)["status"], "failed");
    let on_stderr = stderr(&o)
        .lines()
        .filter(|l| l.starts_with("::error "))
        .count();
    assert_eq!(on_stderr, failures, "{}", stderr(&o));
}

/// A wait that times out under GitHub Actions still leaves every report behind (JUnit, job
/// summary, annotations, step outputs with the run id so a later step can cancel the run),
/// then exits 3 saying it timed out.
/// Under GitHub Actions, `submit --wait` hands out the run id as soon as the run exists, so
/// a later step can cancel it even when this one is killed mid-wait (a job time limit).
#[test]
fn submit_wait_gives_the_run_id_before_it_waits() {
    let dir = project();
    // No agent: the jobs stay queued and the wait goes on until it is killed.
    let (_server, url) = start_server(dir.path(), &[]);
    let output = dir.path().join("output");
    let child = qgjob(Some(&url), dir.path())
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_OUTPUT", &output)
        .args([
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/auth",
            "--wait",
            "--wait-timeout=10m",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("submit starts");
    let mut waiting = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        if let Some(id) = text.lines().find_map(|l| l.strip_prefix("run-id=")) {
            break id.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no run-id while waiting: {text:?}"
        );
        assert!(
            matches!(waiting.0.try_wait(), Ok(None)),
            "submit --wait ended before the run id was out"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    waiting.0.kill().expect("kill");
    // The id is the run's: a later step cancels it.
    let o = run(
        Some(&url),
        dir.path(),
        &["cancel", &format!("--run-id={run_id}")],
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
}

#[test]
fn a_timed_out_wait_still_writes_every_report() {
    let dir = project();
    // No agent serves `device`: the jobs stay queued.
    let (_server, url) = start_server(dir.path(), &[]);
    let gh = |name: &str| {
        let summary = dir.path().join(format!("{name}-summary.md"));
        let output = dir.path().join(format!("{name}-output"));
        let mut c = qgjob(Some(&url), dir.path());
        c.env("GITHUB_ACTIONS", "true")
            .env("GITHUB_STEP_SUMMARY", &summary)
            .env("GITHUB_OUTPUT", &output);
        (c, summary, output)
    };
    let check = |o: &Output, junit: &Path, summary: &Path, output: &Path| -> String {
        assert_eq!(code(o), 3, "{}{}", stdout(o), stderr(o));
        // (After a note that no agent serves the target.)
        let last = stderr(o).lines().last().unwrap_or_default().to_string();
        assert!(last.starts_with("error: timed out"), "{}", stderr(o));
        let (suites, cases, failures) = parse_junit(&junit.to_path_buf());
        assert_eq!((suites, cases, failures), (2, 2, 0));
        let xml = std::fs::read_to_string(junit).expect("junit");
        assert_eq!(
            xml.matches("did not finish (still queued)").count(),
            4,
            "{xml}"
        );
        let md = std::fs::read_to_string(summary).expect("summary written");
        assert!(md.contains("timed out"), "{md}");
        assert_eq!(md.matches("| queued |").count(), 2, "{md}");
        let annotations = stdout(o)
            .lines()
            .filter(|l| l.starts_with("::error "))
            .count();
        assert_eq!(annotations, 2, "{}", stdout(o));
        let outputs = std::fs::read_to_string(output).expect("step outputs written");
        let run_id = outputs
            .lines()
            .find_map(|l| l.strip_prefix("run-id="))
            .unwrap_or_else(|| panic!("no run-id in {outputs:?}"))
            .to_string();
        assert!(outputs.contains("passed=0\n"), "{outputs}");
        run_id
    };

    // `submit --wait` of a run nothing serves, plus `extra`.
    const SUBMIT: [&str; 6] = [
        "submit",
        "--org-id=acme",
        "--app-version-id=v1",
        "--test=tests/auth/*.spec.js",
        "--target=device",
        "--wait",
    ];
    let junit = dir.path().join("submit.xml");
    let (mut c, summary, output) = gh("submit");
    let o = c
        .args(SUBMIT)
        .args([
            "--wait-timeout=2s",
            "--junit",
            junit.to_str().expect("utf-8"),
        ])
        .output()
        .expect("runs");
    let run_id = check(&o, &junit, &summary, &output);
    assert!(
        stdout(&o).starts_with(&format!("run {run_id} queued")),
        "{}",
        stdout(&o)
    );

    // `qgjob wait` on the same run, with its own timeout.
    let junit = dir.path().join("wait.xml");
    let (mut c, summary, output) = gh("wait");
    let o = c
        .args([
            "wait",
            &format!("--run-id={run_id}"),
            "--timeout=1s",
            "--junit",
            junit.to_str().expect("utf-8"),
        ])
        .output()
        .expect("runs");
    assert_eq!(check(&o, &junit, &summary, &output), run_id);

    // `submit --wait --json`: two JSON lines on stdout, the annotations on stderr.
    let (mut c, _, _) = gh("json");
    let o = c
        .args(SUBMIT)
        .args(["--wait-timeout=1s", "--json"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&o));
    assert_eq!(lines[1]["status"], "timeout");
    let on_stderr = stderr(&o)
        .lines()
        .filter(|l| l.starts_with("::error "))
        .count();
    assert_eq!(on_stderr, 2, "{}", stderr(&o));
}

/// Counts testsuite, testcase and failure elements; panics on malformed XML.
fn parse_junit(path: &PathBuf) -> (usize, usize, usize) {
    let xml = std::fs::read_to_string(path).expect("junit written");
    let mut r = quick_xml::Reader::from_str(&xml);
    let (mut suites, mut cases, mut failures) = (0, 0, 0);
    let mut root = None;
    loop {
        match r.read_event().expect("well-formed JUnit XML") {
            quick_xml::events::Event::Eof => break,
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if root.is_none() {
                    root = Some(name.clone());
                }
                match name.as_str() {
                    "testsuite" => suites += 1,
                    "testcase" => cases += 1,
                    "failure" => failures += 1,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    assert_eq!(root.as_deref(), Some("testsuites"));
    (suites, cases, failures)
}

#[test]
fn glob_submits_a_run_and_json_shapes_are_stable() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let _agent = start_agent(&url, dir.path(), "emulator", &[]);

    // Human output: the run line, then one line per job.
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v7",
            "--test=tests/**/*.spec.js",
            "--priority=5",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("run ") && lines[0].ends_with("queued (4 jobs)"),
        "{out}"
    );
    assert_eq!(lines.len(), 5, "{out}");
    let mut tests: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().last().expect("test"))
        .collect();
    tests.sort();
    assert_eq!(
        tests,
        vec![
            "tests/auth/login.spec.js",
            "tests/auth/logout.spec.js",
            "tests/cart.spec.js",
            "tests/onboarding.spec.js"
        ]
    );
    let run_id = lines[0]
        .split_whitespace()
        .nth(1)
        .expect("run id")
        .to_string();

    // --wait --json: the submit document, then the wait document.
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v8",
            "--test=tests/auth/*.spec.js",
            "--json",
            "--wait",
            "--wait-timeout=60s",
        ],
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let docs: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(docs.len(), 2);
    assert_eq!(
        keys(&docs[0]),
        vec!["created", "job_ids", "run_id", "status"]
    );
    assert_eq!(docs[0]["created"], true);
    assert_eq!(docs[0]["job_ids"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        keys(&docs[1]),
        vec!["exit_code", "jobs", "run_id", "status"]
    );
    assert_eq!(docs[1]["status"], "passed");
    assert_eq!(docs[1]["exit_code"], 0);

    // Logs of a finished job: whatever the simulated device wrote (possibly nothing), and
    // --follow returns once the job is final.
    let first_job = docs[0]["job_ids"][0].as_str().expect("job id").to_string();
    let o = run(
        Some(&url),
        dir.path(),
        &["logs", &format!("--job-id={first_job}")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // No output at all is said on stderr, not left blank; the job is over, so no "yet".
    assert!(
        !stdout(&o).is_empty() || stderr(&o) == format!("(job {first_job} has no log output)\n"),
        "{}",
        stderr(&o)
    );
    let o = run(
        Some(&url),
        dir.path(),
        &["logs", &format!("--job-id={first_job}"), "--follow"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));

    // Watching a finished run without a terminal: one plain line per job, then the run.
    // (Finished for sure: the v8 run above can end before this one.)
    let o = run(
        Some(&url),
        dir.path(),
        &["wait", &format!("--run-id={run_id}"), "--timeout=60s"],
    );
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--run-id={run_id}"), "--watch"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[..4].iter().all(|l| l.ends_with(" passed")), "{out}");
    // Each line names the job's test, not just its id.
    assert!(lines[..4].iter().all(|l| l.contains(".spec.js ")), "{out}");
    assert_eq!(lines[4], format!("run {run_id} passed"));
    assert!(!out.contains('\x1b'), "no colour without a terminal");

    // Run status and the list.
    let o = run(
        Some(&url),
        dir.path(),
        &["wait", &format!("--run-id={run_id}"), "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--run-id={run_id}"), "--json"],
    );
    let v = json(&o);
    for k in ["run_id", "org_id", "status", "counts", "created_at", "jobs"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert_eq!(v["counts"]["passed"], 4);
    let o = run(
        Some(&url),
        dir.path(),
        &["list", "--org-id=acme", "--app-version-id=v7", "--json"],
    );
    let v = json(&o);
    assert_eq!(keys(&v), vec!["jobs", "next_cursor"]);
    assert_eq!(v["jobs"].as_array().map(Vec::len), Some(4));
    let o = run(
        Some(&url),
        dir.path(),
        &["list", "--state=passed", "--limit=3"],
    );
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    assert!(out.starts_with("JOB "), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" passed ")).count(),
        3,
        "{out}"
    );
    // Nothing matches: no table, a word on stderr.
    let none = run(Some(&url), dir.path(), &["list", "--org-id=nobody"]);
    assert_eq!(code(&none), 0, "{}", stderr(&none));
    assert!(stdout(&none).is_empty(), "{}", stdout(&none));
    assert_eq!(stderr(&none), "(no jobs match)\n");
    // The next page: the hint (on stderr, out of the table's way) names the cursor.
    let hint = stderr(&o);
    let cursor = hint
        .split("--cursor=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no cursor in {hint:?}"));
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "list",
            "--state=passed",
            "--limit=3",
            &format!("--cursor={cursor}"),
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let first: BTreeSet<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split(' ').next())
        .collect();
    let second = stdout(&o);
    let second: Vec<&str> = second
        .lines()
        .skip(1)
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(!second.is_empty(), "{}", stdout(&o));
    assert!(
        second.iter().all(|id| !first.contains(id)),
        "{first:?} {second:?}"
    );
}

#[test]
fn unreachable_server_and_bad_input_give_clean_errors() {
    let dir = project();
    // Nothing listens on port 1: one line, exit 3, no backtrace.
    let o = run(
        Some("http://127.0.0.1:1"),
        dir.path(),
        &["status", "--job-id=0193a000-0000-7000-8000-000000000001"],
    );
    assert_eq!(code(&o), 3);
    assert_eq!(
        stderr(&o),
        "error: cannot reach qgjob server at http://127.0.0.1:1: connection refused\n"
    );
    assert!(stdout(&o).is_empty());

    // Bad flags: clap's message, exit 2.
    for args in [
        vec!["submit", "--org-id=acme"],
        vec![
            "submit",
            "--org-id=a",
            "--app-version-id=b",
            "--test=x",
            "--target=moon base",
        ],
        vec!["wait", "--job-id=x", "--timeout=soon"],
        vec!["status"],
        vec!["frobnicate"],
        vec!["server", "--addr", "127.0.0.1:0", "--store", "postgres"],
        // Only servers on one database can take over from each other.
        vec!["server", "--addr", "127.0.0.1:0", "--standby"],
        // A database URL beside a store that uses none: refused, not ignored.
        vec![
            "server",
            "--addr",
            "127.0.0.1:0",
            "--store",
            "memory",
            "--database-url",
            "postgres://qgjob@127.0.0.1:1/qgjob",
        ],
        vec![
            "server",
            "--addr",
            "127.0.0.1:0",
            "--store",
            "embedded",
            "--database-url",
            "postgres://qgjob@127.0.0.1:1/qgjob",
        ],
        // fsync for a store whose durability is not ours to set: refused, not ignored.
        vec![
            "server",
            "--addr",
            "127.0.0.1:0",
            "--store",
            "memory",
            "--fsync",
        ],
        // A data dir for a store that keeps nothing on disk: refused, not ignored.
        vec![
            "server",
            "--addr",
            "127.0.0.1:0",
            "--store",
            "memory",
            "--data-dir",
            "somewhere",
        ],
        // An empty --test would otherwise submit every spec under the project.
        vec!["submit", "--org-id=a", "--app-version-id=b", "--test="],
        vec![
            "submit",
            "--org-id=a",
            "--app-version-id=b",
            "--test=x",
            "--max-attempts=0",
        ],
        // Local files the user named: input errors too.
        vec!["simulate", "--workload", "missing.json"],
        vec![
            "wait",
            "--job-id=0193a000-0000-7000-8000-000000000001",
            "--junit=missing-dir/report.xml",
        ],
    ] {
        // Bounded: a server that took its flags would otherwise serve forever.
        let o = run_bounded(dir.path(), &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with("error:"), "{args:?}: {}", stderr(&o));
        if args.contains(&"--database-url") {
            // One line naming both flags, so the user knows which two disagree.
            assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
            assert!(
                stderr(&o).contains("--store ") && stderr(&o).contains("--database-url"),
                "{}",
                stderr(&o)
            );
        }
    }

    // Input errors found by us or by the server: exit 2, one line.
    let (_server, url) = start_server(dir.path(), &[]);
    // A report that could not be written is refused before anything is submitted, so no
    // job is left running with no one waiting for it.
    let submit_wait = [
        "submit",
        "--org-id=acme",
        "--app-version-id=v1",
        "--test=tests/auth/*.spec.js",
        "--wait",
        // No agent runs here: bounded, should the check ever come too late.
        "--wait-timeout=5s",
    ];
    let missing = dir.path().join("missing-dir/x");
    for (junit, env) in [
        (Some("--junit=missing-dir/report.xml"), None),
        (Some("--junit=tests"), None),
        (None, Some(("GITHUB_OUTPUT", &missing))),
        (None, Some(("GITHUB_STEP_SUMMARY", &missing))),
    ] {
        let mut c = qgjob(Some(&url), dir.path());
        c.args(submit_wait).args(junit);
        if let Some((var, path)) = env {
            c.env("GITHUB_ACTIONS", "true").env(var, path);
        }
        let o = c.output().expect("runs");
        assert_eq!(code(&o), 2, "{junit:?} {env:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).starts_with("error: "), "{}", stderr(&o));
    }
    let o = run(Some(&url), dir.path(), &["list", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        json(&o)["jobs"],
        serde_json::json!([]),
        "nothing was submitted"
    );
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=nothing/*.spec.js",
        ],
    );
    assert_eq!(code(&o), 2);
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/cart.spec.js",
            "--priority=5000",
        ],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("priority"), "{}", stderr(&o));
    let o = run(
        Some(&url),
        dir.path(),
        &["status", "--job-id=0193a000-0000-7000-8000-000000000001"],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).starts_with("error: "));
    assert_eq!(stderr(&o).lines().count(), 1);
}

/// A job's test path is a UTF-8 string, so a spec file whose name is not UTF-8 cannot be
/// submitted: a folder or glob that takes it in is refused with one line naming it (exit 2),
/// rather than making a run without it. Arguments that do not take it in still work.
#[cfg(target_os = "linux")]
#[test]
fn a_spec_file_whose_name_is_not_utf8_is_refused_not_dropped() {
    use std::os::unix::ffi::OsStrExt;
    let dir = project();
    let odd = std::ffi::OsStr::from_bytes(b"\xfe.spec.js");
    std::fs::write(dir.path().join("tests").join(odd), "").expect("write");
    // Nothing listens there: an argument that expands gets as far as the upload (exit 3).
    let server = Some("http://127.0.0.1:1");
    for test in [
        "tests",
        ".",
        "tests/*.spec.js",
        "tests/**/*.spec.js",
        "tests/?.spec.js",
        "**/*.{js,ts}",
    ] {
        let o = run(
            server,
            dir.path(),
            &[
                "submit",
                "--org-id=acme",
                "--app-version-id=v1",
                &format!("--test={test}"),
            ],
        );
        assert_eq!(code(&o), 2, "{test}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{test}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with(r#"error: cannot submit "tests/\xFE.spec.js": "#)
                && stderr(&o).contains("UTF-8"),
            "{test}: {}",
            stderr(&o)
        );
    }
    for test in ["tests/auth", "tests/c*.spec.js"] {
        let o = run(
            server,
            dir.path(),
            &[
                "submit",
                "--org-id=acme",
                "--app-version-id=v1",
                &format!("--test={test}"),
            ],
        );
        assert_eq!(code(&o), 3, "{test}: {}", stderr(&o));
    }
}

/// `server --fsync` runs the embedded store with every commit fsynced: a job it acknowledged
/// is there after the server is killed with SIGKILL and started again on the same data dir.
#[test]
fn an_fsync_server_keeps_what_it_acknowledged_across_a_kill() {
    let dir = project();
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let (mut server, url) = spawn_server(
        dir.path(),
        &["--addr", "127.0.0.1:0", "--data-dir", data, "--fsync"],
    );
    let id = submit_cart(&url, dir.path());
    server.0.kill().expect("SIGKILL");
    server.0.wait().expect("reaped");
    let (_again, url) = spawn_server(dir.path(), &["--addr", "127.0.0.1:0", "--data-dir", data]);
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={id}"), "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let job: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["state"], "queued");
}

/// A server announces itself only once its store is open and its configuration checked,
/// and each start error is one line with the right exit code: a missing tokens file is a
/// usage error (2); a data dir another server holds is refused (3), because two servers on
/// one store would overwrite each other's acknowledged jobs; an address in use is 3 too.
#[test]
fn server_start_errors_are_one_line_and_announce_nothing() {
    let dir = project();
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let o = run(
        None,
        dir.path(),
        &[
            "server",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--tokens-file",
            "missing-tokens",
        ],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("missing-tokens"), "{}", stderr(&o));

    let (_first, _url) = spawn_server(dir.path(), &["--addr", "127.0.0.1:0", "--data-dir", data]);

    let o = run(
        None,
        dir.path(),
        &["server", "--addr", "127.0.0.1:0", "--data-dir", data],
    );
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is in use by another qgjob server"),
        "{}",
        stderr(&o)
    );

    // An address in use is the machine's state too, not a bad flag: 3, for `server` and
    // `up` alike.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = taken.local_addr().expect("its address").to_string();
    for cmd in ["server", "up"] {
        let other = dir.path().join(format!("data-{cmd}"));
        let other = other.to_str().expect("utf-8 path");
        let o = run_bounded(dir.path(), &[cmd, "--addr", &addr, "--data-dir", other]);
        assert_eq!(code(&o), 3, "{cmd}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{cmd}: {}", stdout(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{cmd}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with(&format!("error: server: cannot listen on {addr}: ")),
            "{cmd}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn config_file_names_the_server() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let cfg = dir.path().join("qgjob.toml");
    std::fs::write(&cfg, format!("server = \"{url}\"\n")).expect("write");
    let o = qgjob(None, dir.path())
        .env("QGJOB_CONFIG", &cfg)
        .args(["list", "--json"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(json(&o)["jobs"], Value::Array(vec![]));
    // The environment beats the file.
    let o = qgjob(Some("http://127.0.0.1:1"), dir.path())
        .env("QGJOB_CONFIG", &cfg)
        .args(["list"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 3);
    assert!(stderr(&o).contains("http://127.0.0.1:1"), "{}", stderr(&o));
    // A malformed file is an input error, not a silent fallback to the default server.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "server = [oops\n").expect("write");
    let o = qgjob(None, dir.path())
        .env("QGJOB_CONFIG", &broken)
        .args(["list"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 2);
    assert!(
        stderr(&o).starts_with("error: invalid config file"),
        "{}",
        stderr(&o)
    );
    // So is a file QGJOB_CONFIG names that is not there.
    let o = qgjob(None, dir.path())
        .env("QGJOB_CONFIG", dir.path().join("nowhere.toml"))
        .args(["list"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("nowhere.toml"), "{}", stderr(&o));
    // A flag beats the file.
    let o = qgjob(None, dir.path())
        .env("QGJOB_CONFIG", &cfg)
        .args(["list", "--server", "http://127.0.0.1:1"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 3);
}

#[test]
fn connection_flags_go_before_or_after_the_command_and_beat_the_environment() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let dead = "http://127.0.0.1:1";
    let list = |env: &str, args: &[&str]| {
        let o = qgjob(Some(env), dir.path())
            .args(args)
            .output()
            .expect("runs");
        (code(&o), stderr(&o))
    };
    // The environment names a dead server; a flag in either place wins…
    let (c, e) = list(dead, &["--server", &url, "list"]);
    assert_eq!(c, 0, "{e}");
    let (c, e) = list(dead, &["list", "--server", &url]);
    assert_eq!(c, 0, "{e}");
    // …and the other way round.
    let (c, e) = list(&url, &["--server", dead, "list"]);
    assert_eq!(c, 3, "{e}");
    let (c, e) = list(&url, &["list", "--server", dead]);
    assert_eq!(c, 3, "{e}");
    // After the command beats before it.
    let (c, e) = list(dead, &["--server", dead, "list", "--server", &url]);
    assert_eq!(c, 0, "{e}");
    // Commands that never talk to a server neither list the flags nor take them silently.
    for cmd in ["server", "simulate", "demo", "up"] {
        let o = qgjob(None, dir.path())
            .args([cmd, "--help"])
            .output()
            .expect("runs");
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(!help.contains("--server <"), "{cmd} --help: {help}");
        assert!(!help.contains("--token <"), "{cmd} --help: {help}");
    }
    for cmd in [
        "submit", "status", "wait", "list", "cancel", "logs", "agent",
    ] {
        let o = qgjob(None, dir.path())
            .args([cmd, "--help"])
            .output()
            .expect("runs");
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(
            help.contains("--server <URL[,URL…]>"),
            "{cmd} --help: {help}"
        );
    }
    let o = qgjob(None, dir.path())
        .args(["--server", &url, "simulate", "--generate", "uniform"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("not `simulate`"), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
}

#[test]
fn app_upload_prints_the_content_hash() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let apk = dir.path().join("app.apk");
    std::fs::write(&apk, b"not really an apk, but bytes all the same").expect("write");
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "app",
            "upload",
            "--org-id=acme",
            "--app-version-id=v1",
            "app.apk",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&apk).expect("read")))
    };
    assert_eq!(stdout(&o).trim(), want);
}

#[test]
fn demo_completes_with_consistent_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(None, dir.path(), &["demo", "--json"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = json(&o);
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert!(f("jobs") >= 20.0);
    assert_eq!(v["counts"]["queued"], 0);
    assert_eq!(v["counts"]["running"], 0);
    assert!(
        v["counts"]["failed"].as_u64() >= Some(1),
        "the demo has a failing test"
    );
    assert!(f("lower_bound_s") > 0.0);
    assert!(f("makespan_s") >= f("lower_bound_s"), "{v}");
    assert!((f("ratio") - f("makespan_s") / f("lower_bound_s")).abs() < 1e-9);
    assert!(f("installs") >= f("min_installs"), "{v}");
    assert!(
        f("min_installs") >= 6.0,
        "3 targets × at least 2 builds: {v}"
    );
}

#[test]
fn simulate_generates_and_reports_in_the_documented_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(
        None,
        dir.path(),
        &["simulate", "--generate", "few-big-groups", "--seed", "3"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let w = dir.path().join("w.json");
    std::fs::write(&w, &o.stdout).expect("write");
    let workload: Value = serde_json::from_slice(&o.stdout).expect("workload JSON");
    assert!(workload["jobs"].as_array().is_some_and(|j| !j.is_empty()));

    for policy in ["grouped", "fifo", "per-group"] {
        let o = run(
            None,
            dir.path(),
            &[
                "simulate",
                "--workload",
                "w.json",
                "--policy",
                policy,
                "--json",
            ],
        );
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        let r = json(&o);
        for k in [
            "policy",
            "jobs",
            "finished",
            "makespan_s",
            "lower_bound_s",
            "installs",
            "min_installs",
            "utilization",
            "wait_s",
            "wait_s_by_priority",
            "pools",
        ] {
            assert!(r.get(k).is_some(), "missing {k}");
        }
        assert_eq!(r["policy"], policy);
        assert_eq!(r["jobs"], r["finished"]);
        let ms = r["makespan_s"].as_f64().expect("makespan");
        assert!(
            ms >= r["lower_bound_s"].as_f64().expect("bound"),
            "{policy}: {r}"
        );
    }
    // Human output names the same figures.
    let o = run(None, dir.path(), &["simulate", "--workload", "w.json"]);
    assert!(stdout(&o).contains("makespan"), "{}", stdout(&o));
    // A bad workload is an input error.
    std::fs::write(dir.path().join("bad.json"), "{\"name\": 1}").expect("write");
    let o = run(None, dir.path(), &["simulate", "--workload", "bad.json"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn completions_and_help() {
    let dir = tempfile::tempdir().expect("tempdir");
    for shell in ["bash", "zsh", "fish"] {
        let o = run(None, dir.path(), &["completions", shell]);
        assert_eq!(code(&o), 0);
        assert!(stdout(&o).contains("submit"), "{shell}");
    }
    let o = run(None, dir.path(), &["--help"]);
    assert_eq!(code(&o), 0);
    for c in [
        "submit", "status", "wait", "list", "cancel", "logs", "server", "agent", "simulate", "up",
        "demo",
    ] {
        assert!(stdout(&o).contains(c), "{c}");
    }
    // Reading help must not need a server.
    let mut child = Command::new(BIN)
        .args(["status", "--help"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("runs");
    let mut s = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut s)
        .expect("read");
    assert!(child.wait().expect("wait").success());
    assert!(s.contains("--watch"));
}

#[test]
fn tokens_scope_users_and_agents() {
    let dir = project();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "org acme acme-token-0123456789\norg other other-token-0123456789\nagent agent-token-0123456789\n",
    )
    .expect("write");
    let (_server, url) = start_server(
        dir.path(),
        &["--tokens-file", tokens.to_str().expect("utf-8")],
    );
    let submit = |token: Option<&str>| {
        let mut c = qgjob(Some(&url), dir.path());
        if let Some(t) = token {
            c.env("QGJOB_TOKEN", t);
        }
        c.args([
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/cart.spec.js",
            "--json",
        ])
        .output()
        .expect("runs")
    };
    // No token: refused, one line, input error.
    let o = submit(None);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);
    // Another org's token cannot submit for acme.
    let o = submit(Some("other-token-0123456789"));
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // The org's own token can; a simulated agent with the agent token runs the job.
    let o = submit(Some("acme-token-0123456789"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let id = json(&o)["job_id"].as_str().expect("id").to_string();
    let _agent = {
        let child = qgjob(Some(&url), dir.path())
            .args(["--token", "agent-token-0123456789"])
            .args([
                "agent",
                "--target",
                "emulator",
                "--simulate",
                "--devices",
                "1",
            ])
            .args(["--install-s", "0.1", "--run-s", "0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent starts");
        Proc(child)
    };
    let o = qgjob(Some(&url), dir.path())
        .env("QGJOB_TOKEN", "acme-token-0123456789")
        .args(["wait", &format!("--job-id={id}"), "--timeout=60s"])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));
    // The other org does not even see it.
    let o = qgjob(Some(&url), dir.path())
        .env("QGJOB_TOKEN", "other-token-0123456789")
        .args(["status", &format!("--job-id={id}")])
        .output()
        .expect("runs");
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

/// `up` takes the simulated durations `agent --simulate` takes and refuses the others the
/// same way (one line, exit 2) before it starts anything: it used to show them, then run
/// with other values (0 s for a negative or NaN, 3600 s for anything larger).
#[test]
fn up_refuses_the_simulated_durations_an_agent_refuses() {
    let dir = project();
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 path");
    for (flag, value) in [
        ("--install-s", "-1"),
        ("--run-s", "NaN"),
        ("--run-s", "1e300"),
        ("--install-s", "inf"),
        ("--run-s", "86401"),
    ] {
        let arg = format!("{flag}={value}");
        let up = run_bounded(
            dir.path(),
            &["up", "--addr", "127.0.0.1:0", "--data-dir", data_arg, &arg],
        );
        assert_eq!(code(&up), 2, "{arg}: {}{}", stdout(&up), stderr(&up));
        assert_eq!(
            stderr(&up),
            format!("error: {flag} must be between 0 and 86400 seconds\n"),
            "{arg}"
        );
        assert!(stdout(&up).is_empty(), "{arg}: {}", stdout(&up));
        assert!(!data.exists(), "{arg}: nothing was started");
        let agent = run(
            Some("http://127.0.0.1:1"),
            dir.path(),
            &["agent", "--target", "emulator", "--simulate", &arg],
        );
        assert_eq!(code(&agent), 2, "{arg}: {}", stderr(&agent));
        assert_eq!(stderr(&agent), stderr(&up), "{arg}: the same refusal");
    }
}

/// `up` stops, and says why, when its embedded server stops because the store refused a
/// write (rather than running on with agents and no server).
#[test]
fn up_stops_when_its_server_cannot_store() {
    let dir = project();
    let (mut up, _, url) = start_up(dir.path(), "0.2", "0.2", Stdio::piped());
    let errs = line_channel(up.0.stderr.take().expect("stderr"));
    // The database refuses every new job, as a full disk would.
    let db = format!(
        "sqlite://{}",
        dir.path().join("data/qgjob.sqlite3").display()
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let pool = sqlx::SqlitePool::connect(&db)
                .await
                .expect("open the store");
            sqlx::query(
                "CREATE TRIGGER refuse BEFORE INSERT ON jobs \
                 BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
            )
            .execute(&pool)
            .await
            .expect("trigger");
            pool.close().await;
        });
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/cart.spec.js",
        ],
    );
    assert_eq!(code(&o), 3, "{}{}", stdout(&o), stderr(&o));
    assert_eq!(exit_code_of(&mut up, "qgjob up"), 3);
    let said = recv_until(&errs, |_| false);
    assert!(
        said.iter()
            .any(|l| l.contains("stopped because a store write failed")),
        "{said:?}"
    );
}

/// Submits acme/v1's `tests/cart.spec.js` from `dir`; returns the job id.
fn submit_cart(url: &str, dir: &Path) -> String {
    let o = run(
        Some(url),
        dir,
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/cart.spec.js",
            "--json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    json(&o)["job_id"].as_str().expect("id").to_string()
}

/// `qgjob up` in `dir` (data under `dir/data`) with these simulated install and run
/// seconds and its stderr going to `stderr`, once its banner is out: the process, the
/// banner's lines and the server's address.
fn start_up(
    dir: &Path,
    install_s: &str,
    run_s: &str,
    stderr: Stdio,
) -> (Proc, Vec<String>, String) {
    let mut child = qgjob(None, dir)
        .args(["up", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--install-s", install_s, "--run-s", run_s])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("up starts");
    let out = child.stdout.take().expect("stdout");
    let up = Proc(child);
    let lines = read_lines_until(out, |l| l.starts_with("ctrl-c"));
    let url = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("export QGJOB_SERVER="))
        .unwrap_or_else(|| panic!("no address in {lines:?}"))
        .to_string();
    (up, lines, url)
}

#[test]
fn up_serves_the_readme_flow_and_stops_on_sigterm() {
    let dir = project();
    let (mut up, lines, url) = start_up(dir.path(), "0.2", "0.2", Stdio::null());
    // The ready-to-paste submit line works as printed.
    let paste = lines
        .iter()
        .find(|l| l.trim().starts_with("qgjob submit "))
        .expect("a submit line")
        .trim()
        .to_string();
    let args: Vec<&str> = paste.split_whitespace().skip(1).collect();
    let o = run(Some(&url), dir.path(), &args);
    assert_eq!(code(&o), 0, "{paste}: {}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("passed"), "{}", stdout(&o));

    // SIGTERM: agents finish, the server stops, the process exits 0 (bounded wait).
    let pid = up.0.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = up.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "qgjob up did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// POSTs `body` (JSON, or text when it is a string) to the server as an agent would; the
/// status and the JSON answer (`null` when there is none).
fn agent_post(url: &str, body: &Value) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let res = match body {
        Value::String(text) => agent
            .post(url)
            .header("content-type", "text/plain; charset=utf-8")
            .send(text.as_bytes()),
        _ => agent.post(url).send_json(body),
    };
    let mut res = res.unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = res.status().as_u16();
    let text = res.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `logs --follow` outlives a server restart like `wait` does: it says once that it is
/// reconnecting, then goes on from the last byte it printed, so no line is printed twice
/// or lost.
#[test]
fn logs_follow_reconnects_across_a_server_restart() {
    let dir = project();
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    // The embedded store, so the job and its log outlive the restart.
    let (mut server, url) =
        spawn_server(dir.path(), &["--addr", "127.0.0.1:0", "--data-dir", data]);
    let id = submit_cart(&url, dir.path());

    // This test is the job's agent, so it decides what the log says and when.
    let (st, v) = agent_post(
        &format!("{url}/v1/agent/devices"),
        &serde_json::json!({"id": "logs-emu", "target": "emulator"}),
    );
    assert!((200..300).contains(&st), "{st} {v}");
    let (st, lease) = agent_post(
        &format!("{url}/v1/agent/lease"),
        &serde_json::json!({"device_id": "logs-emu", "max_batch": 1, "wait_ms": 10_000}),
    );
    assert_eq!(st, 200, "{lease}");
    assert_eq!(lease["jobs"][0]["id"], id.as_str(), "{lease}");
    let job_url =
        |base: &str, what: &str| format!("{base}/v1/agent/leases/{}/jobs/{id}/{what}", lease["id"]);
    let (st, v) = agent_post(&job_url(&url, "logs"), &Value::from("first line\n"));
    assert_eq!(st, 204, "{v}");

    let mut child = qgjob(Some(&url), dir.path())
        .args(["logs", &format!("--job-id={id}"), "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("logs starts");
    let out = line_channel(child.stdout.take().expect("stdout"));
    let errs = line_channel(child.stderr.take().expect("stderr"));
    let mut logs = Proc(child);
    assert_eq!(recv_until(&out, |l| l == "first line"), vec!["first line"]);

    // The server dies; the follower notices (it polls) and says it is reconnecting.
    server.0.kill().expect("SIGKILL");
    server.0.wait().expect("reaped");
    let said = recv_until(&errs, |l| l.contains("cannot reach"));
    // Refused, or reset on a pooled connection.
    let note = format!("note: cannot reach qgjob server at {url}: ");
    assert!(
        said.len() == 1 && said[0].starts_with(&note) && said[0].ends_with("; reconnecting"),
        "{said:?}"
    );

    // Back on the same address and data dir: the lease still holds the job.
    let addr = url.strip_prefix("http://").expect("http URL");
    let (_server, url2) = spawn_server(dir.path(), &["--addr", addr, "--data-dir", data]);
    assert_eq!(url2, url);
    let (st, v) = agent_post(&job_url(&url, "logs"), &Value::from("second line\n"));
    assert_eq!(st, 204, "{v}");
    let (st, v) = agent_post(
        &job_url(&url, "complete"),
        &serde_json::json!({"passed": true}),
    );
    assert_eq!(st, 200, "{v}");

    assert_eq!(exit_code_of(&mut logs, "qgjob logs --follow"), 0);
    let printed = recv_until(&out, |_| false);
    assert_eq!(printed, vec!["second line"]);
    // Said once, however long the restart took.
    let rest = recv_until(&errs, |_| false);
    assert!(rest.is_empty(), "{rest:?}");
}

/// ctrl-c on `up` says what it waits for and for how long; a second one stops it at once,
/// says so and exits 3, as `qgjob agent` does.
#[test]
fn up_says_what_it_waits_for_and_a_second_ctrl_c_stops_it_at_once() {
    let dir = project();
    // Jobs far longer than the test: one is still running at the second ctrl-c.
    let (mut up, _, url) = start_up(dir.path(), "0", "600", Stdio::piped());
    let errs = line_channel(up.0.stderr.take().expect("stderr"));
    let id = submit_cart(&url, dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = run(
            Some(&url),
            dir.path(),
            &["status", &format!("--job-id={id}"), "--json"],
        );
        if json(&o)["state"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(100));
    }

    signal(&up, nix::sys::signal::Signal::SIGINT);
    let said = recv_until(&errs, |l| l.contains("stopping"));
    let stopping = said.last().expect("a line");
    // 600 s × 1.3 (the most jitter) + 5 s to report.
    assert_eq!(
        stopping,
        "qgjob up: stopping (waiting up to 13m05s for running jobs to finish; ctrl-c again \
         to stop at once)"
    );
    signal(&up, nix::sys::signal::Signal::SIGINT);
    assert_eq!(exit_code_of(&mut up, "qgjob up"), 3);
    // Everything else it said, up to the end of its output.
    let rest = recv_until(&errs, |_| false);
    assert_eq!(
        rest,
        vec![
            "error: stopped at once: running jobs were abandoned (they are retried when the \
             server next runs)"
        ],
    );
}

#[test]
fn demo_human_output_ends_with_the_figures_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(None, dir.path(), &["demo"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("TEST "), "{out}");
    // makespan X s (lower bound Y s, ratio R); installs N (minimum M)
    let line = out
        .lines()
        .find(|l| l.starts_with("makespan "))
        .unwrap_or_else(|| panic!("no figures line in {out}"));
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter(|s| !s.is_empty() && *s != ".")
        .map(|s| s.parse().expect("number"))
        .collect();
    assert_eq!(nums.len(), 5, "{line}");
    let (makespan, bound, ratio, installs, min) = (nums[0], nums[1], nums[2], nums[3], nums[4]);
    assert!(makespan >= bound, "{line}");
    // The printed figures are rounded (0.1 s, 0.01): allow for that.
    assert!((ratio - makespan / bound).abs() < 0.05, "{line}");
    assert!(installs >= min, "{line}");
    // Without a terminal the progress is plain lines on stderr, one per finished job.
    let progress = stderr(&o).lines().filter(|l| l.starts_with('[')).count();
    assert_eq!(progress as f64, nums_jobs(&out), "{}", stderr(&o));
}

/// The job count from the table's totals line (`N jobs: …`).
fn nums_jobs(table: &str) -> f64 {
    table
        .lines()
        .find(|l| l.contains(" jobs: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a totals line")
}

/// The test TLS files: a CA, and a server certificate it signed for 127.0.0.1.
fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/tls")
        .join(name)
}

/// A TLS terminator on a free loopback port in front of the plain-HTTP server at
/// `backend` (`127.0.0.1:PORT`), serving the test certificate; returns its https URL. It
/// lives as long as the test process.
fn tls_front(backend: &str) -> String {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let pem = |name: &str| std::fs::read(tls_file(name)).expect("test TLS file");
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem("server.pem"))
        .collect::<std::result::Result<Vec<_>, _>>()
        .expect("certificate");
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem("server.key")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let backend = backend.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, backend) = (acceptor.clone(), backend.clone());
                tokio::spawn(async move {
                    // A client that refuses our certificate ends the handshake: fine.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Ok(mut plain) = tokio::net::TcpStream::connect(&backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
    });
    format!("https://127.0.0.1:{port}")
}

#[test]
fn an_https_server_is_checked_against_the_ca_the_user_names() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let https = tls_front(url.strip_prefix("http://").expect("http URL"));
    let ca = tls_file("ca.pem");

    // Our test CA is not one of the built-in roots: refused, one line, exit 3; an agent
    // stops at once too, since waiting cannot make the certificate trusted.
    let o = run(Some(&https), dir.path(), &["list"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!("error: TLS with qgjob server at {https} failed: "))
            && err.contains("UnknownIssuer")
            && err.contains("QGJOB_CA_CERT")
            && err.lines().count() == 1,
        "{err}"
    );
    let o = run_bounded(
        dir.path(),
        &[
            "agent",
            "--server",
            &https,
            "--target",
            "emulator",
            "--simulate",
        ],
    );
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(stderr(&o).contains("UnknownIssuer"), "{}", stderr(&o));

    // Named with QGJOB_CA_CERT, the whole flow runs over https: submit, an agent, wait.
    let with_ca = |args: &[&str]| {
        qgjob(Some(&https), dir.path())
            .env("QGJOB_CA_CERT", &ca)
            .args(args)
            .output()
            .expect("runs")
    };
    let o = with_ca(&[
        "submit",
        "--org-id=acme",
        "--app-version-id=v1",
        "--test=tests/onboarding.spec.js",
        "--json",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let id = json(&o)["job_id"].as_str().expect("id").to_string();
    let _agent = Proc(
        qgjob(Some(&https), dir.path())
            .env("QGJOB_CA_CERT", &ca)
            .args([
                "agent",
                "--target",
                "emulator",
                "--simulate",
                "--devices",
                "1",
            ])
            .args(["--install-s", "0.1", "--run-s", "0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("agent starts"),
    );
    let o = with_ca(&["wait", &format!("--job-id={id}"), "--timeout=60s"]);
    assert_eq!(code(&o), 0, "{}{}", stdout(&o), stderr(&o));

    // A CA file that is missing or holds no certificate is a usage error, said at once.
    let missing = dir.path().join("nope.pem");
    let key = tls_file("server.key");
    for (file, says) in [(&missing, "QGJOB_CA_CERT"), (&key, "holds no certificate")] {
        let o = qgjob(Some(&https), dir.path())
            .env("QGJOB_CA_CERT", file)
            .arg("list")
            .output()
            .expect("runs");
        assert_eq!(code(&o), 2, "{}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains(says) && err.lines().count() == 1, "{err}");
    }
}

/// A log longer than one answer (the server sends at most 1 MiB at a time) is printed
/// whole, by `logs` and by `logs --follow`.
#[test]
fn logs_print_a_log_longer_than_one_answer() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let id = submit_cart(&url, dir.path());
    let (st, v) = agent_post(
        &format!("{url}/v1/agent/devices"),
        &serde_json::json!({"id": "long-emu", "target": "emulator"}),
    );
    assert!((200..300).contains(&st), "{st} {v}");
    let (st, lease) = agent_post(
        &format!("{url}/v1/agent/lease"),
        &serde_json::json!({"device_id": "long-emu", "max_batch": 1, "wait_ms": 10_000}),
    );
    assert_eq!(st, 200, "{lease}");
    let logs = format!("{url}/v1/agent/leases/{}/jobs/{id}/logs", lease["id"]);
    // Three chunks of 900 KiB, each line numbered, so a lost or doubled piece shows.
    let mut want = String::new();
    for chunk in 0..3 {
        let mut text = String::new();
        let mut line = 0;
        while text.len() < 900 * 1024 {
            text.push_str(&format!(
                "chunk {chunk} line {line:06} {}\n",
                "x".repeat(40)
            ));
            line += 1;
        }
        let (st, v) = agent_post(&logs, &Value::from(text.clone()));
        assert_eq!(st, 204, "{v}");
        want.push_str(&text);
    }
    let o = run(Some(&url), dir.path(), &["logs", &format!("--job-id={id}")]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o) == want,
        "{} bytes printed of {}",
        o.stdout.len(),
        want.len()
    );
    // The job ends; --follow prints the same and stops.
    let (st, v) = agent_post(
        &format!("{url}/v1/agent/leases/{}/jobs/{id}/complete", lease["id"]),
        &serde_json::json!({"passed": true}),
    );
    assert_eq!(st, 200, "{v}");
    // (Not run_bounded: it reads the output only after the exit, and 2.7 MB would fill the
    // pipe first.)
    let o = run(
        Some(&url),
        dir.path(),
        &["logs", &format!("--job-id={id}"), "--follow"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o) == want,
        "{} bytes printed of {}",
        o.stdout.len(),
        want.len()
    );
}

/// Registers a device `name` for the emulator pool as an agent would, and takes a lease on
/// it (waiting up to ten seconds for a job): the lease.
fn lease_as_agent(url: &str, name: &str) -> Value {
    let (st, v) = agent_post(
        &format!("{url}/v1/agent/devices"),
        &serde_json::json!({"id": name, "target": "emulator"}),
    );
    assert!((200..300).contains(&st), "{st} {v}");
    let (st, lease) = agent_post(
        &format!("{url}/v1/agent/lease"),
        &serde_json::json!({"device_id": name, "max_batch": 1, "wait_ms": 10_000}),
    );
    assert_eq!(st, 200, "{lease}");
    lease
}

/// A job that passed on its second attempt, after an install failure, shows no error: the
/// first attempt's is shown as such, and the JSON keeps the server's fields.
#[test]
fn a_job_that_passed_on_a_retry_shows_no_error() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let id = submit_cart(&url, dir.path());
    // This test is the job's agent: the install fails once, then the job passes.
    let lease = lease_as_agent(&url, "retry-emu");
    assert_eq!(lease["jobs"][0]["id"], id.as_str(), "{lease}");
    let (st, v) = agent_post(
        &format!("{url}/v1/agent/leases/{}/jobs/{id}/fail", lease["id"]),
        &serde_json::json!({"kind": "install_failed", "message": "adb: device offline"}),
    );
    assert_eq!(st, 200, "{v}");
    // Queued for a retry: the reason is shown, as the earlier attempt's.
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={id}")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.lines().any(|l| l.starts_with("error")), "{out}");
    assert!(
        out.lines()
            .any(|l| l == "earlier   attempt 1: install failed: adb: device offline"),
        "{out}"
    );
    // The retry (after its backoff) passes.
    let lease = lease_as_agent(&url, "retry-emu");
    assert_eq!(lease["jobs"][0]["id"], id.as_str(), "{lease}");
    let (st, v) = agent_post(
        &format!("{url}/v1/agent/leases/{}/jobs/{id}/complete", lease["id"]),
        &serde_json::json!({"passed": true}),
    );
    assert_eq!(st, 200, "{v}");
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={id}")],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("state     passed (attempt 2)"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("error")), "{out}");
    assert!(
        out.lines()
            .any(|l| l == "earlier   attempt 1: install failed: adb: device offline"),
        "{out}"
    );
    // The JSON is the server's job, unchanged.
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--job-id={id}"), "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let j = json(&o);
    assert_eq!(j["state"], "passed", "{j}");
    assert_eq!(
        j["last_error"], "install failed: adb: device offline",
        "{j}"
    );
    assert!(j["outcome"].get("error").is_none(), "{j}");
}

/// `submit --label` on several specs labels the run as well as each job, as the API shows
/// it; a bad label names the flag the user typed.
#[test]
fn a_runs_labels_reach_the_run() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/auth/*.spec.js",
            "--label=branch=main",
            "--label",
            "pr=42",
            "--json",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let run_id = json(&o)["run_id"].as_str().expect("run id").to_string();
    let want = serde_json::json!({"branch": "main", "pr": "42"});
    let o = run(
        Some(&url),
        dir.path(),
        &["status", &format!("--run-id={run_id}"), "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(v["labels"], want, "{v}");
    assert_eq!(v["jobs"][0]["spec"]["labels"], want, "{v}");
    // The server's own view of the run, not only what the CLI prints.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let text = agent
        .get(format!("{url}/v1/runs/{run_id}"))
        .call()
        .expect("GET run")
        .body_mut()
        .read_to_string()
        .expect("body");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["labels"], want, "{v}");

    let o = run(
        Some(&url),
        dir.path(),
        &[
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/auth/*.spec.js",
            "--label==main",
        ],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).starts_with("error: invalid --label: "),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}

/// `logs --json`: one object for a plain read; with `--follow`, JSON lines whose texts,
/// joined, are the log.
#[test]
fn logs_json_prints_objects_whose_texts_are_the_log() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let id = submit_cart(&url, dir.path());
    let lease = lease_as_agent(&url, "json-emu");
    assert_eq!(lease["jobs"][0]["id"], id.as_str(), "{lease}");
    let job_url = |what: &str| format!("{url}/v1/agent/leases/{}/jobs/{id}/{what}", lease["id"]);
    let (st, v) = agent_post(&job_url("logs"), &Value::from("first line\ncafé \"ok\"\n"));
    assert_eq!(st, 204, "{v}");

    let o = run(
        Some(&url),
        dir.path(),
        &["logs", &format!("--job-id={id}"), "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = json(&o);
    assert_eq!(keys(&v), vec!["job_id", "offset", "text"]);
    assert_eq!(v["job_id"], id.as_str());
    assert_eq!(v["offset"], 0);
    assert_eq!(v["text"], "first line\ncafé \"ok\"\n");

    let (st, v) = agent_post(&job_url("logs"), &Value::from("last line\n"));
    assert_eq!(st, 204, "{v}");
    let (st, v) = agent_post(&job_url("complete"), &serde_json::json!({"passed": true}));
    assert_eq!(st, 200, "{v}");
    let o = run(
        Some(&url),
        dir.path(),
        &["logs", &format!("--job-id={id}"), "--follow", "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut text = String::new();
    for line in stdout(&o).lines() {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(keys(&v), vec!["job_id", "offset", "text"]);
        assert_eq!(v["offset"].as_u64(), Some(text.len() as u64), "{v}");
        text.push_str(v["text"].as_str().expect("text"));
    }
    assert_eq!(text, "first line\ncafé \"ok\"\nlast line\n");

    let help = run(None, dir.path(), &["logs", "--help"]);
    assert!(stdout(&help).contains("--json"), "{}", stdout(&help));
}

/// An empty or malformed id is a usage error naming its flag, and a server address with an
/// API path says which URL was not found; one ending in `/v1` (copied from an API path)
/// is taken as the base URL it contains.
#[test]
fn empty_ids_and_wrong_server_paths_say_what_is_wrong() {
    let dir = project();
    for args in [
        vec!["status", "--job-id="],
        vec!["status", "--run-id="],
        vec!["wait", "--run-id=nope"],
        vec!["cancel", "--job-id="],
        vec!["logs", "--job-id="],
        vec!["list", "--run-id="],
    ] {
        let o = run_bounded(dir.path(), &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        let err = stderr(&o);
        let flag = args[1].split('=').next().expect("flag");
        assert!(
            err.starts_with("error: ") && err.contains(flag),
            "{args:?}: {err}"
        );
        assert!(!err.contains("endpoint"), "{args:?}: {err}");
    }

    let (_server, url) = start_server(dir.path(), &[]);
    let id = submit_cart(&url, dir.path());
    for base in [format!("{url}/v1"), format!("{url}/v1/")] {
        let o = run(
            Some(&base),
            dir.path(),
            &["status", &format!("--job-id={id}")],
        );
        assert_eq!(code(&o), 0, "{base}: {}", stderr(&o));
        assert!(stdout(&o).contains("state     queued"), "{}", stdout(&o));
    }
    let o = run(
        Some(&format!("{url}/api")),
        dir.path(),
        &["status", &format!("--job-id={id}")],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: no such endpoint: {url}/api/v1/jobs/{id} was not found (is {url}/api the \
             qgjob server's base URL?"
        )),
        "{err}"
    );
    assert!(err.contains("without /v1"), "{err}");
}

/// `simulate` refuses a flag that would do nothing in the form given, rather than ignoring
/// it, and its help lists the shapes `--generate` takes.
#[test]
fn simulate_refuses_flags_it_would_ignore() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = run(None, dir.path(), &["simulate", "--generate", "small"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    std::fs::write(dir.path().join("w.json"), &o.stdout).expect("write");
    for (args, flag) in [
        (
            vec![
                "simulate",
                "--generate",
                "uniform",
                "--policy",
                "fifo",
                "--json",
            ],
            "--policy",
        ),
        (
            vec!["simulate", "--generate", "uniform", "--json"],
            "--json",
        ),
        (
            vec!["simulate", "--workload", "w.json", "--seed", "5"],
            "--seed",
        ),
        (vec!["simulate", "--generate", "lumpy"], "few-big-groups"),
    ] {
        let o = run(None, dir.path(), &args);
        assert_eq!(code(&o), 2, "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?}: {}", stdout(&o));
        let err = stderr(&o);
        assert!(
            err.starts_with("error: ") && err.contains(flag),
            "{args:?}: {err}"
        );
    }
    let o = run(
        None,
        dir.path(),
        &["simulate", "--workload", "w.json", "--json"],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = run(None, dir.path(), &["simulate", "--help"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        stdout(&o).contains("few-big-groups, many-small-groups, uniform, bursty, small"),
        "{}",
        stdout(&o)
    );
}

/// A link back to a folder being walked (`tests/loop -> ..`, here two of them) adds nothing
/// to a folder or `**` glob: the submit ends at once with one job per spec, where the walk
/// used to go round the links practically for ever.
#[test]
fn links_back_to_a_walked_folder_end_the_walk() {
    let dir = project();
    std::os::unix::fs::symlink("..", dir.path().join("tests/loop")).expect("symlink");
    std::os::unix::fs::symlink("../..", dir.path().join("tests/auth/up")).expect("symlink");
    let (_server, url) = start_server(dir.path(), &[]);
    for test in ["tests", "tests/**/*.spec.js"] {
        let started = Instant::now();
        let o = run_bounded_on(
            Some(&url),
            dir.path(),
            &[
                "submit",
                "--org-id=acme",
                "--app-version-id=v1",
                &format!("--test={test}"),
            ],
        );
        assert_eq!(code(&o), 0, "{test}: {}", stderr(&o));
        assert!(started.elapsed() < Duration::from_secs(20), "{test}");
        let out = stdout(&o);
        let mut tests: Vec<&str> = out
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().last().expect("test"))
            .collect();
        tests.sort();
        assert_eq!(
            tests,
            vec![
                "tests/auth/login.spec.js",
                "tests/auth/logout.spec.js",
                "tests/cart.spec.js",
                "tests/onboarding.spec.js"
            ],
            "{test}: {out}"
        );
    }
}

#[test]
fn a_folder_that_cannot_be_read_is_reported_not_skipped() {
    use std::os::unix::fs::PermissionsExt;
    let dir = project();
    let locked = dir.path().join("tests/locked");
    std::fs::create_dir_all(&locked).expect("mkdir");
    std::fs::write(locked.join("c.spec.js"), "").expect("write");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    // Root reads any folder: run qgjob as `nobody` then, from a copy it may execute, in a
    // project it may enter (all but the locked folder).
    let root = String::from_utf8_lossy(
        &Command::new("id")
            .arg("-u")
            .output()
            .expect("id runs")
            .stdout,
    )
    .trim()
        == "0";
    let bin = dir.path().join("qgjob-copy");
    if root {
        std::fs::copy(BIN, &bin).expect("copy qgjob");
        for p in [dir.path(), &dir.path().join("tests")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
    }
    for test in ["tests", "tests/**/*.spec.js"] {
        let args = [
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            &format!("--test={test}"),
        ];
        let cmd = if root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(&bin);
            common::qgjob_via(c, Some("http://127.0.0.1:1"), dir.path())
        } else {
            qgjob(Some("http://127.0.0.1:1"), dir.path())
        };
        let o = { cmd }.args(args).output().expect("qgjob runs");
        assert_eq!(code(&o), 2, "{test}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{test}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with("error: reading ") && stderr(&o).contains("locked"),
            "{test}: {}",
            stderr(&o)
        );
    }
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}
