//! End-to-end tests of real execution: the real Playwright test runner (`@playwright/test`
//! from npm, running specs that use no browser) driven by the adb and BrowserStack devices
//! under the real agent runtime and scheduler. No real device or BrowserStack exists here:
//! `adb` is a fake script that records its calls, and BrowserStack's upload API is a local
//! HTTP stand-in; both are named as such below.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod common;

use common::{qgjob, start_server, Proc};
use qgjob_cli::real::cache::DirSource;
use qgjob_cli::real::exec::MemoryLogs;
use qgjob_cli::real::{build_devices, RealArgs, RealDevices};
use qgjob_core::agent::{Agent, AgentConfig, SharedScheduler, Shutdown, SystemClock};
use qgjob_core::{
    BuildRef, GroupedScheduler, Job, JobId, JobSpec, JobState, SchedulerConfig, Target, TestStatus,
};

// ---------- fixtures ----------

/// A folder under the test target dir with `@playwright/test` installed from npm (once;
/// reused by later runs). Every agent dir of these tests lives inside it, so specs and
/// `npx playwright` resolve the package by walking up, as in a project checkout.
fn pw_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("real_exec_playwright");
        std::fs::create_dir_all(&root).expect("create the playwright folder");
        let marker = root.join("node_modules/@playwright/test/package.json");
        if !marker.exists() {
            std::fs::write(
                root.join("package.json"),
                r#"{"name": "qgjob-real-exec", "private": true}"#,
            )
            .expect("package.json");
            let out = Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--ignore-scripts",
                    "@playwright/test@1",
                ])
                .current_dir(&root)
                .output()
                .expect("npm must be installed to run these tests");
            assert!(
                out.status.success() && marker.exists(),
                "npm install @playwright/test failed (these tests need it):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        root
    })
}

fn targz(files: &[(&str, String)]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, text) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes())
            .expect("append");
    }
    b.into_inner().expect("tar").finish().expect("gzip")
}

/// One test's world: an artifact source, logs, a dir the specs write into, and a cache.
struct Lab {
    dir: tempfile::TempDir,
    src: Arc<DirSource>,
    logs: Arc<MemoryLogs>,
}

impl Lab {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("lab-")
            .tempdir_in(pw_root())
            .expect("lab dir");
        std::fs::create_dir_all(dir.path().join("out")).expect("out dir");
        let src = Arc::new(DirSource::new(dir.path().join("server")));
        Lab {
            dir,
            src,
            logs: Arc::new(MemoryLogs::default()),
        }
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    fn args(&self) -> RealArgs {
        RealArgs {
            command: "npx playwright test {tests} --reporter=json".into(),
            cache_dir: self.dir.path().join("cache"),
            kill_grace_s: 1.0,
            ..RealArgs::default()
        }
    }

    /// The test bundle every test uses (see [`Lab::specs`]).
    fn bundle(&self) -> String {
        self.src
            .add_bundle(&targz(&self.specs()))
            .expect("add bundle")
    }

    /// Specs that need no browser: passing ones (one of them records the environment it
    /// saw), a failing one, one that hangs with a grandchild process, and a slow one that
    /// records when it ran.
    fn specs(&self) -> Vec<(&'static str, String)> {
        let out = self.out();
        let out = out.display();
        vec![
            (
                "tests/pass.spec.js",
                format!(
                    r#"const {{ test, expect }} = require('@playwright/test');
const fs = require('fs');
test('adds numbers', async () => {{ expect(1 + 1).toBe(2); }});
test.describe('device', () => {{
  test('sees its environment', async () => {{
    const e = process.env;
    const build = e.QGJOB_BUILD_PATH && !e.QGJOB_BUILD_PATH.startsWith('bs://')
      ? fs.readFileSync(e.QGJOB_BUILD_PATH, 'utf8') : null;
    fs.writeFileSync('{out}/' + e.QGJOB_JOB_ID + '.env.json', JSON.stringify({{
      serial: e.QGJOB_DEVICE_SERIAL, build_path: e.QGJOB_BUILD_PATH, build,
      app_url: e.QGJOB_APP_URL || null, attempt: e.QGJOB_ATTEMPT, target: e.QGJOB_TARGET,
      project: e.QGJOB_PROJECT }}));
    console.log('spec ran for job ' + e.QGJOB_JOB_ID);
    expect(e.QGJOB_JOB_ID).toBeTruthy();
  }});
}});
"#
                ),
            ),
            (
                "tests/fail.spec.js",
                r#"const { test, expect } = require('@playwright/test');
test('checkout total', async () => { expect(2 + 2).toBe(5); });
test('still passes', async () => { expect(true).toBe(true); });
"#
                .to_string(),
            ),
            (
                "tests/hang.spec.js",
                format!(
                    r#"const {{ test }} = require('@playwright/test');
const {{ spawn }} = require('child_process');
const fs = require('fs');
test('hangs with a grandchild', async () => {{
  test.setTimeout(600000);
  const child = spawn('sleep', ['300'], {{ stdio: 'ignore' }});
  fs.writeFileSync('{out}/' + process.env.QGJOB_JOB_ID + '.pid', String(child.pid));
  await new Promise(r => setTimeout(r, 300000));
}});
"#
                ),
            ),
            (
                "tests/hang_once.spec.js",
                format!(
                    r#"const {{ test }} = require('@playwright/test');
const {{ spawn }} = require('child_process');
const fs = require('fs');
test('hangs on its first attempt only', async () => {{
  test.setTimeout(600000);
  if (process.env.QGJOB_ATTEMPT !== '1') return;
  const child = spawn('sleep', ['300'], {{ stdio: 'ignore' }});
  fs.writeFileSync('{out}/' + process.env.QGJOB_JOB_ID + '.pid', String(child.pid));
  await new Promise(r => setTimeout(r, 300000));
}});
"#
                ),
            ),
            (
                "tests/slow.spec.js",
                format!(
                    r#"const {{ test, expect }} = require('@playwright/test');
const fs = require('fs');
test('takes a while', async () => {{
  const start = Date.now();
  await new Promise(r => setTimeout(r, 1500));
  fs.appendFileSync('{out}/sessions.txt', start + ' ' + Date.now() + '\n');
  expect(1).toBe(1);
}});
"#
                ),
            ),
        ]
    }

    fn env_of(&self, job: JobId) -> serde_json::Value {
        let text = std::fs::read_to_string(self.out().join(format!("{job}.env.json")))
            .expect("the spec wrote its environment");
        serde_json::from_str(&text).expect("json")
    }
}

fn build(v: &str) -> BuildRef {
    BuildRef {
        org_id: "qualgent".parse().expect("org"),
        app_version_id: v.parse().expect("version"),
    }
}

fn spec(target: Target, v: &str, test: &str, bundle: &str) -> JobSpec {
    let mut s = JobSpec::new(
        "qualgent".parse().expect("org"),
        v.parse().expect("version"),
        vec![test.to_string()],
    );
    s.target = target;
    s.bundle = Some(bundle.to_string());
    s.timeout_ms = 120_000;
    s
}

/// A fake `adb` (a shell script, not a device) that appends its arguments to a log and
/// answers like adb with two devices attached.
fn fake_adb(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let log = dir.join("adb-calls.log");
    let script = bin.join("adb");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
# Fake adb for tests: records every call, installs nothing. Files next to the log switch
# on failures: `unplugged` (the device is gone), `install-fails` (no space left).
echo "$*" >> '{log}'
case "$*" in
  devices) printf 'List of devices attached\nemulator-5554\tdevice\nR58M1234\tdevice\n' ;;
  *"getprop ro.product.model"*) echo 'Pixel 8' ;;
  *"getprop ro.build.version.release"*) echo 14 ;;
  *get-state*)
    if [ -e '{dir}/unplugged' ]; then echo "error: device not found" >&2; exit 1; fi
    echo device ;;
  *" install "*)
    # Like adb's own check: it installs only files named *.apk (or *.apex).
    case "$*" in
      *.apk|*.apex) ;;
      *) echo "adb: filename doesn't end .apk or .apex" >&2; exit 1 ;;
    esac
    echo 'Performing Streamed Install'
    if [ -e '{dir}/install-fails' ]; then
      echo 'adb: failed to install: Failure [INSTALL_FAILED_INSUFFICIENT_STORAGE]'; exit 1
    fi
    echo Success ;;
esac
"#,
            log = log.display(),
            dir = dir.display()
        ),
    )
    .expect("write fake adb");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (script, log)
}

fn installs_in(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" install "))
        .map(str::to_string)
        .collect()
}

/// The real scheduler and agent runtime, in process, driving `devices`.
struct Running {
    shared: SharedScheduler<GroupedScheduler>,
    shutdown: Shutdown,
    agent: tokio::task::JoinHandle<()>,
    ticker: tokio::task::JoinHandle<()>,
}

fn start(devices: Vec<Arc<dyn qgjob_core::device::Device>>) -> Running {
    let shared = SharedScheduler::new(
        GroupedScheduler::new(SchedulerConfig {
            backoff_base_ms: 100,
            backoff_max_ms: 200,
            ..SchedulerConfig::default()
        }),
        Arc::new(SystemClock),
    );
    let ticker = shared.spawn_ticker();
    let mut agent = Agent::new(
        Arc::new(shared.link()),
        AgentConfig {
            heartbeat_interval: Duration::from_millis(200),
            lease_wait: Duration::from_millis(500),
            ..AgentConfig::default()
        },
    );
    for d in devices {
        agent.add_device(d);
    }
    let shutdown = Shutdown::new();
    let signal = shutdown.signal();
    let agent = tokio::spawn(async move {
        agent.run(signal).await.expect("agent runs");
    });
    Running {
        shared,
        shutdown,
        agent,
        ticker,
    }
}

impl Running {
    fn submit(&self, s: JobSpec) -> JobId {
        self.shared.submit(s).expect("submit").job_id
    }

    /// Waits for the jobs to end (bounded, so a hang fails instead of blocking CI).
    async fn finish(&self, ids: &[JobId]) -> Vec<Job> {
        let want: HashSet<JobId> = ids.iter().copied().collect();
        let waited = tokio::time::timeout(
            Duration::from_secs(240),
            self.shared.wait_until(|s| {
                use qgjob_core::Scheduler;
                want.iter()
                    .all(|id| s.get(*id).is_some_and(|j| j.state.is_final()))
            }),
        )
        .await;
        let jobs: Vec<Job> = ids
            .iter()
            .map(|id| self.shared.get(*id).expect("job exists"))
            .collect();
        assert!(
            waited.is_ok(),
            "jobs did not finish: {:?}",
            jobs.iter()
                .map(|j| (j.id, j.state, j.attempt))
                .collect::<Vec<_>>()
        );
        jobs
    }

    async fn stop(self) {
        self.shutdown.trigger();
        let _ = tokio::time::timeout(Duration::from_secs(60), self.agent).await;
        self.ticker.abort();
    }
}

async fn devices(lab: &Lab, target: Target, args: RealArgs) -> RealDevices {
    build_devices(&target, "lab", &args, lab.src.clone(), lab.logs.clone())
        .await
        .expect("devices")
}

/// One emulator, `emulator-5554`, behind a fake `adb`, running `command` (the lab's when
/// `None`); also the fake adb's log.
async fn one_emulator(lab: &Lab, command: Option<&str>) -> (RealDevices, PathBuf) {
    let (adb, adb_log) = fake_adb(lab.dir.path());
    let mut args = RealArgs {
        adb,
        serials: vec!["emulator-5554".into()],
        ..lab.args()
    };
    if let Some(c) = command {
        args.command = c.into();
    }
    (devices(lab, Target::Emulator, args).await, adb_log)
}

/// The error message of a job's outcome, or "" without one.
fn error_of(job: &Job) -> String {
    job.outcome
        .as_ref()
        .and_then(|o| o.error.clone())
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie (state Z) has exited; it only waits for its parent to reap it.
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Killed grandchildren can linger for about a second: poll rather than assert at once.
async fn gone_soon(pid: i32) -> bool {
    for _ in 0..100 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn pid_of(lab: &Lab, job: JobId) -> i32 {
    let f = lab.out().join(format!("{job}.pid"));
    for _ in 0..1200 {
        if let Ok(s) = std::fs::read_to_string(&f) {
            if let Ok(p) = s.trim().parse() {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the hanging spec never started (no {})", f.display());
}

// ---------- adb devices with the real Playwright runner ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passing_and_failing_specs_give_per_test_results_outcomes_and_logs() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src
        .add_build(&build("xyz123"), b"apk-xyz123-bytes")
        .expect("build");
    let (built, adb_log) = one_emulator(&lab, None).await;
    let run = start(built.devices);
    let pass = run.submit(spec(
        Target::Emulator,
        "xyz123",
        "tests/pass.spec.js",
        &bundle,
    ));
    let fail = run.submit(spec(
        Target::Emulator,
        "xyz123",
        "tests/fail.spec.js",
        &bundle,
    ));
    let jobs = run.finish(&[pass, fail]).await;
    run.stop().await;

    let p = &jobs[0];
    assert_eq!(p.state, JobState::Passed, "{p:?}");
    let out = p.outcome.as_ref().expect("outcome");
    let mut titles: Vec<(&str, TestStatus, &str)> = out
        .tests
        .iter()
        .map(|t| (t.title.as_str(), t.status, t.file.as_str()))
        .collect();
    titles.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(
        titles,
        vec![
            ("adds numbers", TestStatus::Passed, "tests/pass.spec.js"),
            (
                "device › sees its environment",
                TestStatus::Passed,
                "tests/pass.spec.js"
            ),
        ]
    );
    assert_eq!(out.counts.passed, 2);

    let f = &jobs[1];
    assert_eq!(f.state, JobState::Failed, "{f:?}");
    assert_eq!(f.attempt, 1, "a failing test is not retried");
    let out = f.outcome.as_ref().expect("outcome");
    let total = out
        .tests
        .iter()
        .find(|t| t.title == "checkout total")
        .expect("the failing test is reported");
    assert_eq!(total.status, TestStatus::Failed);
    let msg = total.error.as_deref().expect("error message");
    assert!(
        msg.contains("Expected: 5") && msg.contains("Received: 4"),
        "{msg}"
    );
    assert!(!msg.contains('\u{1b}'), "colour codes stripped: {msg:?}");
    let other = out
        .tests
        .iter()
        .find(|t| t.title == "still passes")
        .expect("the other test");
    assert_eq!(other.status, TestStatus::Passed);
    assert_eq!((out.counts.passed, out.counts.failed), (1, 1));

    // The spec saw the device and the installed build in its environment.
    let env = lab.env_of(pass);
    assert_eq!(env["serial"], "emulator-5554");
    assert_eq!(env["build"], "apk-xyz123-bytes");
    // Appium (like adb) takes an app file by its .apk name.
    assert!(
        env["build_path"]
            .as_str()
            .is_some_and(|p| p.ends_with(".apk")),
        "{env}"
    );
    assert_eq!(env["attempt"], "1");
    assert_eq!(env["target"], "emulator");
    assert_eq!(env["project"], "emulator");

    // Logs: the command line, Playwright's own output and the exit status.
    let log = lab.logs.get(pass);
    assert!(
        log.contains("npx playwright test tests/pass.spec.js --reporter=json"),
        "{log}"
    );
    assert!(log.contains("exited with code 0"), "{log}");
    let log = lab.logs.get(fail);
    assert!(log.contains("exited with code 1"), "{log}");
    assert!(log.contains("checkout total"), "{log}");

    // One build, one device: one install.
    assert_eq!(
        installs_in(&adb_log).len(),
        1,
        "{:?}",
        installs_in(&adb_log)
    );
    assert_eq!(built.installs.installs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_runs_exactly_its_own_spec_file() {
    // Playwright reads a file argument as a case-insensitive pattern searched anywhere in
    // the path: `a.spec.js` would also run `banana.spec.js`, `login` also `Login`, and a
    // `$` or `(` in a name would match nothing. {test_filters} passes exact filters.
    let lab = Lab::new();
    let names = [
        "tests/a.spec.js",
        "tests/banana.spec.js",
        "tests/login.spec.js",
        "tests/Login.spec.js",
        "tests/price$5 (v2).spec.js",
    ];
    let files: Vec<(&str, String)> = names
        .iter()
        .map(|n| {
            let body = format!(
                "const {{ test }} = require('@playwright/test');\ntest({n:?}, async () => {{}});\n"
            );
            (*n, body)
        })
        .collect();
    let bundle = lab.src.add_bundle(&targz(&files)).expect("add bundle");
    lab.src
        .add_build(&build("xyz123"), b"apk-xyz123-bytes")
        .expect("build");
    let cmd = "npx playwright test {test_filters} --reporter=json";
    let (built, _) = one_emulator(&lab, Some(cmd)).await;
    let run = start(built.devices);
    let ids: Vec<JobId> = names
        .iter()
        .map(|n| run.submit(spec(Target::Emulator, "xyz123", n, &bundle)))
        .collect();
    let jobs = run.finish(&ids).await;
    run.stop().await;
    for (job, name) in jobs.iter().zip(names) {
        assert_eq!(job.state, JobState::Passed, "{name}: {}", error_of(job));
        let ran: Vec<&str> = job
            .outcome
            .as_ref()
            .expect("outcome")
            .tests
            .iter()
            .map(|t| t.title.as_str())
            .collect();
        assert_eq!(ran, vec![name], "the job for {name} ran {ran:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_installs_each_build_once() {
    let lab = Lab::new();
    let (adb, adb_log) = fake_adb(lab.dir.path());
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk-v1").expect("v1");
    lab.src.add_build(&build("v2"), b"apk-v2").expect("v2");
    // No --serial: the devices come from `adb devices` (emulator-* for the emulator pool).
    let built = devices(&lab, Target::Emulator, RealArgs { adb, ..lab.args() }).await;
    assert_eq!(built.devices.len(), 1, "only emulator-5554 is an emulator");
    // What the device registers as: its serial, and what `adb shell getprop` said.
    let info = built.devices[0].info();
    assert_eq!(info.id.as_str(), "lab/emulator-5554");
    assert_eq!(info.capabilities.model.as_deref(), Some("Pixel 8"));
    assert_eq!(info.capabilities.os_version.as_deref(), Some("14"));
    assert_eq!(info.installed, None);
    let device = Arc::clone(&built.devices[0]);
    let run = start(built.devices.clone());
    let ids: Vec<JobId> = (0..4)
        .map(|_| run.submit(spec(Target::Emulator, "v1", "tests/pass.spec.js", &bundle)))
        .collect();
    let jobs = run.finish(&ids).await;
    assert!(jobs.iter().all(|j| j.state == JobState::Passed), "{jobs:?}");
    let installs = installs_in(&adb_log);
    assert_eq!(
        installs.len(),
        1,
        "N jobs of one build on one device: {installs:?}"
    );
    assert!(
        installs[0].starts_with("-s emulator-5554 install -r "),
        "{installs:?}"
    );
    // The job record says which attempt had to install.
    assert_eq!(jobs.iter().filter(|j| j.installed).count(), 1, "{jobs:?}");
    // The job that installed says so in its log; the others say the build was there.
    let installed_logs = ids
        .iter()
        .filter(|id| {
            lab.logs
                .get(**id)
                .contains("installed qualgent/v1 on emulator-5554")
        })
        .count();
    assert_eq!(installed_logs, 1);
    let skipped_logs = ids
        .iter()
        .filter(|id| {
            lab.logs
                .get(**id)
                .contains("already installed on emulator-5554")
        })
        .count();
    assert_eq!(skipped_logs, 3);

    let v2 = run.submit(spec(Target::Emulator, "v2", "tests/pass.spec.js", &bundle));
    let jobs = run.finish(&[v2]).await;
    run.stop().await;
    assert_eq!(
        device.info().installed,
        Some(build("v2")),
        "the device reports what it holds"
    );
    assert_eq!(jobs[0].state, JobState::Passed);
    assert_eq!(lab.env_of(v2)["build"], "apk-v2");
    assert_eq!(installs_in(&adb_log).len(), 2, "two builds: two installs");
    assert_eq!(built.installs.installs.load(Ordering::SeqCst), 2);
    // Bundle and builds were each fetched once.
    assert_eq!(built.cache.stats.bundle_downloads.load(Ordering::SeqCst), 1);
    assert_eq!(built.cache.stats.build_downloads.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_distinct_specs_shares_one_runner_process() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk-v1").expect("build");
    let (built, adb_log) = one_emulator(&lab, None).await;
    let dev = &built.devices[0];
    let leased = |test: &str| qgjob_core::LeasedJob {
        id: JobId::from_parts(1, rand_bytes()),
        attempt: 1,
        spec: spec(Target::Emulator, "v1", test, &bundle),
    };
    let batch = vec![
        leased("tests/pass.spec.js"),
        leased("tests/fail.spec.js"),
        leased("tests/slow.spec.js"),
    ];
    let (_tx, cancel) = qgjob_core::device::CancelWatch::channel();
    dev.install(&build("v1")).await.expect("install");
    let runs = dev.run(&build("v1"), &batch, cancel.clone()).await;
    let reports: Vec<_> = runs.iter().map(|r| r.as_ref().expect("ran")).collect();
    // Results are split by spec file.
    let titles = |i: usize| {
        let mut t: Vec<String> = reports[i]
            .tests
            .iter()
            .map(|t| format!("{} {:?}", t.title, t.status))
            .collect();
        t.sort();
        t
    };
    assert!(reports[0].passed, "{:?}", reports[0]);
    assert_eq!(
        titles(0),
        vec![
            "adds numbers Passed",
            "device › sees its environment Passed"
        ]
    );
    assert!(!reports[1].passed);
    assert_eq!(
        titles(1),
        vec!["checkout total Failed", "still passes Passed"]
    );
    assert!(reports[2].passed);
    assert_eq!(titles(2), vec!["takes a while Passed"]);
    // One process ran all three: each job's log shows the one shared command line.
    for j in &batch {
        let log = lab.logs.get(j.id);
        assert_eq!(
            log.matches("running 3 jobs in one runner").count(),
            1,
            "{log}"
        );
        assert!(log.contains(
            "npx playwright test tests/pass.spec.js tests/fail.spec.js tests/slow.spec.js"
        ));
    }
    assert_eq!(installs_in(&adb_log).len(), 1);

    // Two jobs of the same spec cannot be told apart in one report: they run one by one.
    let same = vec![leased("tests/pass.spec.js"), leased("tests/pass.spec.js")];
    let runs = dev.run(&build("v1"), &same, cancel).await;
    assert!(runs.iter().all(|r| r.as_ref().is_ok_and(|r| r.passed)));
    for j in &same {
        let log = lab.logs.get(j.id);
        assert!(!log.contains("in one runner"), "{log}");
        assert!(
            log.contains(&format!("running {} (attempt 1)", j.id)),
            "{log}"
        );
    }
    assert_eq!(installs_in(&adb_log).len(), 1, "still one install");

    // Cancel of one job of a shared run stops the process at once: that job ends
    // canceled, and its companion runs again alone within the same lease (no attempt lost).
    let (tx, cancel) = qgjob_core::device::CancelWatch::channel();
    let shared = vec![leased("tests/hang.spec.js"), leased("tests/pass.spec.js")];
    let hang_id = shared[0].id;
    let b1 = build("v1");
    let run = dev.run(&b1, &shared, cancel);
    tokio::pin!(run);
    // The hanging spec writes its pid under the first job's id (QGJOB_JOB_ID).
    let pid = tokio::select! {
        p = pid_of(&lab, hang_id) => p,
        r = &mut run => panic!("ended before the cancel: {r:?}"),
    };
    tx.cancel(&[hang_id]);
    let runs = run.await;
    let e0 = runs[0].as_ref().expect_err("canceled");
    assert_eq!(e0.message, "canceled");
    let r1 = runs[1].as_ref().expect("ran again alone");
    assert!(r1.passed, "{r1:?}");
    let log = lab.logs.get(shared[1].id);
    assert!(
        log.contains(&format!("running {} alone", shared[1].id)),
        "{log}"
    );
    assert!(gone_soon(pid).await, "grandchild {pid} outlived the cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_process_group_and_is_an_infrastructure_error() {
    let lab = Lab::new();
    let (adb, _) = fake_adb(lab.dir.path());
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk").expect("build");
    let built = devices(
        &lab,
        Target::Device,
        RealArgs {
            adb,
            serials: vec!["R58M1234".into()],
            ..lab.args()
        },
    )
    .await;
    let run = start(built.devices);
    let mut s = spec(Target::Device, "v1", "tests/hang.spec.js", &bundle);
    // Long enough for Playwright to start on a busy machine; the spec then hangs.
    s.timeout_ms = 15_000;
    s.max_attempts = 1;
    let id = run.submit(s);
    let pid = pid_of(&lab, id).await;
    assert!(alive(pid), "the grandchild runs while the job does");
    let jobs = run.finish(&[id]).await;
    run.stop().await;
    assert_eq!(jobs[0].state, JobState::Error, "{:?}", jobs[0]);
    let err = error_of(&jobs[0]);
    assert!(err.contains("timeout"), "{err}");
    assert!(
        gone_soon(pid).await,
        "grandchild {pid} outlived the timeout"
    );
    assert!(
        lab.logs.get(id).contains("timed out"),
        "{}",
        lab.logs.get(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_a_running_job_kills_it_and_ends_canceled() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk").expect("build");
    let (built, _) = one_emulator(&lab, None).await;
    let run = start(built.devices);
    let id = run.submit(spec(Target::Emulator, "v1", "tests/hang.spec.js", &bundle));
    let pid = pid_of(&lab, id).await;
    assert_eq!(run.shared.get(id).expect("job").state, JobState::Running);
    run.shared.cancel(id).expect("cancel");
    let jobs = run.finish(&[id]).await;
    run.stop().await;
    assert_eq!(jobs[0].state, JobState::Canceled, "{:?}", jobs[0]);
    assert!(gone_soon(pid).await, "grandchild {pid} outlived the cancel");
    assert!(
        lab.logs.get(id).contains("canceled"),
        "{}",
        lab.logs.get(id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_with_package_json_gets_npm_install_once() {
    let lab = Lab::new();
    lab.src.add_build(&build("v1"), b"apk").expect("build");
    let bundle = lab
        .src
        .add_bundle(&targz(&[
            (
                "package.json",
                r#"{"name":"shop-tests","private":true,"devDependencies":{"@playwright/test":"^1"}}"#
                    .to_string(),
            ),
            (
                "tests/ok.spec.js",
                "const { test, expect } = require('@playwright/test');\n\
                 test('ok', async () => { expect(require.resolve('@playwright/test')).toContain('/bundles/'); });\n"
                    .to_string(),
            ),
        ]))
        .expect("bundle");
    let (built, _) = one_emulator(&lab, None).await;
    let run = start(built.devices);
    let a = run.submit(spec(Target::Emulator, "v1", "tests/ok.spec.js", &bundle));
    let b = run.submit(spec(Target::Emulator, "v1", "tests/ok.spec.js", &bundle));
    let jobs = run.finish(&[a, b]).await;
    run.stop().await;
    // The spec checks it resolved the bundle's own install (linked into the work dir).
    assert!(
        jobs.iter().all(|j| j.state == JobState::Passed),
        "{jobs:?}\n{}",
        lab.logs.get(a)
    );
    assert_eq!(built.cache.stats.npm_installs.load(Ordering::SeqCst), 1);
    let logs = format!("{}{}", lab.logs.get(a), lab.logs.get(b));
    assert_eq!(
        logs.matches("npm install --ignore-scripts").count(),
        1,
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_report_is_a_retried_infrastructure_error() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk").expect("build");
    // A runner that crashes before writing any report.
    let (built, _) = one_emulator(
        &lab,
        Some("sh -c 'echo runner exploded >&2; exit 3' {tests}"),
    )
    .await;
    let run = start(built.devices);
    let mut s = spec(Target::Emulator, "v1", "tests/pass.spec.js", &bundle);
    s.max_attempts = 2;
    let id = run.submit(s);
    let jobs = run.finish(&[id]).await;
    run.stop().await;
    assert_eq!(jobs[0].state, JobState::Error, "{:?}", jobs[0]);
    assert_eq!(jobs[0].attempt, 2, "retried once");
    let err = error_of(&jobs[0]);
    assert!(err.contains("runner exploded"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_goes_away_or_cannot_install_fails_as_infrastructure() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk").expect("build");
    // The runner dies the way it does when the device is unplugged mid-run.
    let (built, adb_log) = one_emulator(
        &lab,
        Some("sh -c 'echo lost connection to the device >&2; exit 2' {tests}"),
    )
    .await;
    let run = start(built.devices);

    std::fs::write(lab.dir.path().join("install-fails"), "").expect("switch");
    let mut s = spec(Target::Emulator, "v1", "tests/pass.spec.js", &bundle);
    s.max_attempts = 1;
    let full = run.submit(s.clone());
    let jobs = run.finish(&[full]).await;
    assert_eq!(jobs[0].state, JobState::Error, "{:?}", jobs[0]);
    let err = error_of(&jobs[0]);
    assert!(err.contains("INSTALL_FAILED_INSUFFICIENT_STORAGE"), "{err}");
    assert_eq!(built.installs.failures.load(Ordering::SeqCst), 1);

    std::fs::remove_file(lab.dir.path().join("install-fails")).expect("switch");
    std::fs::write(lab.dir.path().join("unplugged"), "").expect("switch");
    let gone = run.submit(s);
    let jobs = run.finish(&[gone]).await;
    run.stop().await;
    assert_eq!(jobs[0].state, JobState::Error, "{:?}", jobs[0]);
    let err = error_of(&jobs[0]);
    // The install succeeded, the runner crashed, and adb no longer sees the device.
    assert!(err.contains("went away"), "{err}");
    assert!(std::fs::read_to_string(&adb_log)
        .expect("log")
        .contains("-s emulator-5554 get-state"));
}

// ---------- BrowserStack, against a local stand-in of its upload API ----------

/// A local stand-in for BrowserStack's App Automate upload endpoint (not BrowserStack):
/// checks basic auth and the multipart body, answers `{"app_url": "bs://appN"}`, and
/// lists app URLs the test declared expired in a file the simulated session reads.
#[derive(Clone)]
struct BrowserStackStandIn {
    uploads: Arc<Mutex<Vec<(String, usize)>>>,
    expired_file: PathBuf,
}

impl BrowserStackStandIn {
    async fn start(dir: &Path) -> (Self, String) {
        use axum::http::{header, HeaderMap, StatusCode};
        use axum::routing::post;
        let st = BrowserStackStandIn {
            uploads: Arc::new(Mutex::new(Vec::new())),
            expired_file: dir.join("expired.txt"),
        };
        std::fs::write(&st.expired_file, "").expect("expired list");
        let app = axum::Router::new()
            .route(
                "/app-automate/upload",
                post(
                    |axum::extract::State(st): axum::extract::State<BrowserStackStandIn>,
                     headers: HeaderMap,
                     body: axum::body::Bytes| async move {
                        let auth = headers
                            .get(header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok());
                        // base64("qa-bot:k3y-secret")
                        if auth != Some("Basic cWEtYm90OmszeS1zZWNyZXQ=") {
                            return (
                                StatusCode::UNAUTHORIZED,
                                axum::Json(serde_json::json!({"error": "Authentication failed"})),
                            );
                        }
                        let multipart = headers
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|c| c.starts_with("multipart/form-data; boundary="));
                        let text = String::from_utf8_lossy(&body);
                        if !multipart || !text.contains("name=\"file\"") {
                            return (
                                StatusCode::UNPROCESSABLE_ENTITY,
                                axum::Json(serde_json::json!({"error": "file is missing"})),
                            );
                        }
                        let mut up = st.uploads.lock().expect("lock");
                        let url = format!("bs://app{}", up.len() + 1);
                        up.push((url.clone(), body.len()));
                        (
                            StatusCode::OK,
                            axum::Json(serde_json::json!({"app_url": url})),
                        )
                    },
                ),
            )
            .with_state(st.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (st, format!("http://{addr}"))
    }

    fn uploads(&self) -> Vec<String> {
        self.uploads
            .lock()
            .expect("lock")
            .iter()
            .map(|(u, _)| u.clone())
            .collect()
    }

    fn expire(&self, url: &str) {
        let mut f = std::fs::read_to_string(&self.expired_file).unwrap_or_default();
        f.push_str(url);
        f.push('\n');
        std::fs::write(&self.expired_file, f).expect("write");
    }
}

/// The test command for BrowserStack jobs: a simulated AppWright-on-BrowserStack session
/// (a shell script) that fails the way a session with an expired app URL does, and
/// otherwise runs the real Playwright runner.
fn session_script(dir: &Path, bs: &BrowserStackStandIn) -> String {
    let script = dir.join("bs-session.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
# Simulated BrowserStack session for tests (no BrowserStack here).
if grep -qxF "$QGJOB_APP_URL" '{expired}'; then
  echo "Error: [BROWSERSTACK_APP_EXPIRED] app $QGJOB_APP_URL is no longer available" >&2
  exit 1
fi
exec npx playwright test "$@" --reporter=json
"#,
            expired = bs.expired_file.display()
        ),
    )
    .expect("script");
    format!("sh {} {{tests}}", script.display())
}

fn bs_args(lab: &Lab, url: &str, command: String, parallel: usize) -> RealArgs {
    RealArgs {
        browserstack_url: url.to_string(),
        browserstack_username: Some("qa-bot".into()),
        browserstack_access_key: Some("k3y-secret".into()),
        parallel,
        command,
        ..lab.args()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browserstack_uploads_each_build_once_and_reuploads_when_expired() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk-v1").expect("build");
    let (bs, url) = BrowserStackStandIn::start(lab.dir.path()).await;
    let cmd = session_script(lab.dir.path(), &bs);
    let built = devices(&lab, Target::Browserstack, bs_args(&lab, &url, cmd, 2)).await;
    assert_eq!(built.devices.len(), 2, "one slot per --parallel session");
    let shared = built.browserstack.clone().expect("browserstack state");
    let run = start(built.devices);
    let ids: Vec<JobId> = (0..4)
        .map(|_| {
            run.submit(spec(
                Target::Browserstack,
                "v1",
                "tests/pass.spec.js",
                &bundle,
            ))
        })
        .collect();
    let jobs = run.finish(&ids).await;
    assert!(jobs.iter().all(|j| j.state == JobState::Passed), "{jobs:?}");
    assert_eq!(
        bs.uploads(),
        vec!["bs://app1"],
        "one upload however many jobs"
    );
    for id in &ids {
        let env = lab.env_of(*id);
        assert_eq!(env["app_url"], "bs://app1");
        assert_eq!(
            env["build_path"], "bs://app1",
            "AppWright gets the app URL as build path"
        );
        assert_eq!(env["target"], "browserstack");
    }

    // BrowserStack forgets the app: the next job re-uploads once and passes.
    bs.expire("bs://app1");
    let next = run.submit(spec(
        Target::Browserstack,
        "v1",
        "tests/pass.spec.js",
        &bundle,
    ));
    let jobs = run.finish(&[next]).await;
    assert_eq!(
        jobs[0].state,
        JobState::Passed,
        "{:?}\n{}",
        jobs[0],
        lab.logs.get(next)
    );
    assert_eq!(jobs[0].attempt, 1, "handled inside the attempt");
    assert_eq!(bs.uploads(), vec!["bs://app1", "bs://app2"]);
    assert_eq!(lab.env_of(next)["app_url"], "bs://app2");
    assert!(lab.logs.get(next).contains("uploading it again"));
    // And the new URL is reused afterwards.
    let after = run.submit(spec(
        Target::Browserstack,
        "v1",
        "tests/pass.spec.js",
        &bundle,
    ));
    let jobs = run.finish(&[after]).await;
    run.stop().await;
    assert_eq!(jobs[0].state, JobState::Passed);
    assert_eq!(bs.uploads().len(), 2);
    assert_eq!(shared.apps.stats.reuploads.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browserstack_runs_at_most_parallel_sessions() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk-v1").expect("build");
    let (bs, url) = BrowserStackStandIn::start(lab.dir.path()).await;
    let cmd = session_script(lab.dir.path(), &bs);
    let built = devices(&lab, Target::Browserstack, bs_args(&lab, &url, cmd, 2)).await;
    let shared = built.browserstack.clone().expect("browserstack state");
    let devs = built.devices;
    // Two slots, each handed a batch of three jobs at once (as a lease with max_batch 3
    // would): six sessions wanted, two allowed.
    let (_cancel_tx, cancel) = qgjob_core::device::CancelWatch::channel();
    let mk = |_: usize| qgjob_core::LeasedJob {
        id: JobId::from_parts(1, rand_bytes()),
        attempt: 1,
        spec: spec(Target::Browserstack, "v1", "tests/slow.spec.js", &bundle),
    };
    let batch_a: Vec<_> = (0..3).map(mk).collect();
    let batch_b: Vec<_> = (0..3).map(mk).collect();
    let b = build("v1");
    let (ra, rb) = tokio::join!(
        devs[0].run(&b, &batch_a, cancel.clone()),
        devs[1].run(&b, &batch_b, cancel.clone())
    );
    for r in ra.iter().chain(rb.iter()) {
        let r = r.as_ref().expect("ran");
        assert!(r.passed, "{r:?}");
    }
    assert_eq!(bs.uploads().len(), 1);
    // What the specs themselves saw: no instant with more than two sessions running.
    let spans: Vec<(u64, u64)> = std::fs::read_to_string(lab.out().join("sessions.txt"))
        .expect("sessions")
        .lines()
        .map(|l| {
            let mut p = l.split(' ').map(|x| x.parse::<u64>().expect("ms"));
            (p.next().expect("start"), p.next().expect("end"))
        })
        .collect();
    assert_eq!(spans.len(), 6);
    let mut edges: BTreeMap<u64, i64> = BTreeMap::new();
    for (s, e) in &spans {
        *edges.entry(*s).or_default() += 1;
        *edges.entry(*e).or_default() -= 1;
    }
    let mut cur = 0i64;
    let mut max = 0i64;
    for d in edges.values() {
        cur += d;
        max = max.max(cur);
    }
    assert!(
        max <= 2,
        "{max} sessions overlapped with --parallel 2: {spans:?}"
    );
    assert_eq!(
        shared.peak.load(Ordering::SeqCst),
        2,
        "both sessions were used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browserstack_refusing_the_upload_fails_the_job_as_an_install_failure() {
    let lab = Lab::new();
    let bundle = lab.bundle();
    lab.src.add_build(&build("v1"), b"apk-v1").expect("build");
    let (bs, url) = BrowserStackStandIn::start(lab.dir.path()).await;
    let cmd = session_script(lab.dir.path(), &bs);
    let mut args = bs_args(&lab, &url, cmd, 1);
    args.browserstack_access_key = Some("wrong-key".into());
    let built = devices(&lab, Target::Browserstack, args).await;
    let run = start(built.devices);
    let mut s = spec(Target::Browserstack, "v1", "tests/pass.spec.js", &bundle);
    s.max_attempts = 1;
    let id = run.submit(s);
    let jobs = run.finish(&[id]).await;
    run.stop().await;
    assert_eq!(jobs[0].state, JobState::Error, "{:?}", jobs[0]);
    let err = error_of(&jobs[0]);
    assert!(
        err.contains("HTTP 401") && err.contains("Authentication failed"),
        "{err}"
    );
    assert!(!err.contains("wrong-key"), "the key never shows: {err}");
    assert!(bs.uploads().is_empty());
}

fn rand_bytes() -> [u8; 10] {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::SeqCst).to_le_bytes();
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&n);
    b
}

// ---------- through the real binaries: `qgjob server` + `qgjob agent` + `qgjob submit` ----------

fn run_ok(c: &mut Command) -> String {
    let out = c.output().expect("qgjob runs");
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn get_json(url: &str) -> serde_json::Value {
    let mut resp = ureq::get(url).call().expect("GET");
    resp.body_mut().read_json().expect("json")
}

fn wait_exit(dir: &Path, server: &str, job: &str) -> i32 {
    qgjob(Some(server), dir)
        .args(["wait", "--job-id", job, "--timeout", "240s"])
        .output()
        .expect("wait runs")
        .status
        .code()
        .expect("exit code")
}

/// `qgjob agent` on the fake adb's emulator-5554 (cache under the lab dir), with what it
/// says on stderr collected as it says it.
fn spawn_real_agent(lab: &Lab, url: &str) -> (Proc, Arc<Mutex<Vec<String>>>) {
    // The agent finds `adb` on PATH: the fake one.
    let path = format!(
        "{}:{}",
        lab.dir.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut agent = Proc(
        qgjob(Some(url), lab.dir.path())
            .env("PATH", path)
            .args([
                "agent",
                "--target",
                "emulator",
                "--serial",
                "emulator-5554",
                "--name",
                "e2e",
                "--command",
                "npx playwright test {tests} --reporter=json",
                "--kill-grace-s",
                "1",
            ])
            .arg("--cache-dir")
            .arg(lab.dir.path().join("agent-cache"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("agent starts"),
    );
    let said = Arc::new(Mutex::new(Vec::<String>::new()));
    let err = agent.0.stderr.take().expect("stderr");
    let lines = Arc::clone(&said);
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line);
        }
    });
    (agent, said)
}

/// The project a developer submits from: the lab's specs, resolving @playwright/test from
/// the folder above (like a checkout with node_modules higher up); with `apk` uploaded as
/// the build of qualgent/`version`.
fn project_with_build(lab: &Lab, url: &str, version: &str, apk: &[u8]) -> PathBuf {
    let project = lab.dir.path().join("project");
    for (name, text) in lab.specs() {
        let p = project.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write spec");
    }
    let file = lab.dir.path().join("app-release.apk");
    std::fs::write(&file, apk).expect("apk");
    run_ok(
        qgjob(Some(url), &project)
            .args(["app", "upload", "--org-id=qualgent"])
            .arg(format!("--app-version-id={version}"))
            .arg(&file),
    );
    project
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_kills_what_its_killed_predecessor_left_and_retries_at_once() {
    let lab = Lab::new();
    let (_adb, _) = fake_adb(lab.dir.path());
    let (_server, url) = start_server(lab.dir.path(), &[]);
    let project = project_with_build(&lab, &url, "xyz123", b"apk-e2e-bytes");
    let (mut first, _) = spawn_real_agent(&lab, &url);
    let out = run_ok(qgjob(Some(&url), &project).args([
        "submit",
        "--org-id=qualgent",
        "--app-version-id=xyz123",
        "--test=tests/hang_once.spec.js",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let job = v["job_id"].as_str().expect("id").to_string();
    let pid = pid_of(&lab, job.parse().expect("uuid")).await;

    // kill -9: the agent cannot stop its test command, which runs on without it.
    first.0.kill().expect("kill");
    first.0.wait().expect("reaped");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        alive(pid),
        "the test's grandchild {pid} died with the agent"
    );

    let (_second, said) = spawn_real_agent(&lab, &url);
    assert!(gone_soon(pid).await, "{pid} outlived the restart");
    assert_eq!(wait_exit(&project, &url, &job), 0);
    let j = get_json(&format!("{url}/v1/jobs/{job}"));
    assert_eq!(
        (j["state"].as_str(), j["attempt"].as_u64()),
        (Some("passed"), Some(2)),
        "{j}"
    );
    // Requeued when the device came back, not when the old lease ran out.
    let logs = run_ok(qgjob(Some(&url), &project).args(["logs", "--job-id", &job]));
    assert!(logs.contains("came back idle"), "{logs}");
    assert!(!logs.contains("lease expired"), "{logs}");
    let said = said.lock().unwrap().clone();
    assert!(
        said.iter()
            .any(|l| l.contains("killed 1 test process group(s) that an earlier agent")),
        "{said:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_and_agent_run_playwright_specs_end_to_end() {
    let lab = Lab::new();
    let (_adb, adb_log) = fake_adb(lab.dir.path());
    let (_server, url) = start_server(lab.dir.path(), &[]);
    let project = project_with_build(&lab, &url, "xyz123", b"apk-e2e-bytes");

    let (_agent, said) = spawn_real_agent(&lab, &url);

    let submit = |test: &str, extra: &[&str]| -> String {
        let out = run_ok(
            qgjob(Some(&url), &project)
                .args([
                    "submit",
                    "--org-id=qualgent",
                    "--app-version-id=xyz123",
                    "--json",
                ])
                .arg(format!("--test={test}"))
                .args(extra),
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("submit json");
        assert_eq!(v["status"], "queued");
        v["job_id"].as_str().expect("job id").to_string()
    };

    // Passing spec: exit 0, per-test results, logs.
    let pass = submit("tests/pass.spec.js", &[]);
    assert_eq!(wait_exit(&project, &url, &pass), 0);
    // The device it found registered, and only then did it announce itself.
    let banner = "qgjob agent e2e: 1 emulator device serving ";
    let t0 = std::time::Instant::now();
    while !said.lock().unwrap().iter().any(|l| l.starts_with(banner)) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no banner in {:?}",
            said.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let job = get_json(&format!("{url}/v1/jobs/{pass}"));
    assert_eq!(job["state"], "passed", "{job}");
    let results = get_json(&format!("{url}/v1/jobs/{pass}/results"));
    let mut titles: Vec<String> = results["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .map(|t| {
            format!(
                "{}={}",
                t["title"].as_str().unwrap_or(""),
                t["status"].as_str().unwrap_or("")
            )
        })
        .collect();
    titles.sort();
    assert_eq!(
        titles,
        vec![
            "adds numbers=passed",
            "device › sees its environment=passed"
        ]
    );
    let logs = run_ok(qgjob(Some(&url), &project).args(["logs", "--job-id", &pass]));
    assert!(
        logs.contains("npx playwright test tests/pass.spec.js --reporter=json"),
        "{logs}"
    );
    assert!(logs.contains("exited with code 0"), "{logs}");
    let pass_id: JobId = pass.parse().expect("uuid");
    let env = lab.env_of(pass_id);
    assert_eq!(env["serial"], "emulator-5554");
    assert_eq!(
        env["build"], "apk-e2e-bytes",
        "the uploaded build was downloaded and installed"
    );

    // Failing spec: exit 1 (a test failed), the failure's message in the results.
    let fail = submit("tests/fail.spec.js", &[]);
    assert_eq!(wait_exit(&project, &url, &fail), 1);
    let results = get_json(&format!("{url}/v1/jobs/{fail}/results"));
    let failed = results["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .find(|t| t["title"] == "checkout total")
        .expect("failing test")
        .clone();
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("Expected: 5"),
        "{failed}"
    );

    // Cancel of a running job: its process group dies and it ends canceled.
    let hang = submit("tests/hang.spec.js", &[]);
    let pid = pid_of(&lab, hang.parse().expect("uuid")).await;
    run_ok(qgjob(Some(&url), &project).args(["cancel", "--job-id", &hang]));
    assert_eq!(wait_exit(&project, &url, &hang), 3);
    assert_eq!(
        get_json(&format!("{url}/v1/jobs/{hang}"))["state"],
        "canceled"
    );
    assert!(gone_soon(pid).await, "grandchild {pid} outlived the cancel");

    // Timeout: the group is killed and, out of attempts, the job ends in error.
    let slow = submit(
        "tests/hang.spec.js",
        &["--timeout", "15s", "--max-attempts", "1"],
    );
    let pid = pid_of(&lab, slow.parse().expect("uuid")).await;
    assert_eq!(wait_exit(&project, &url, &slow), 3);
    let job = get_json(&format!("{url}/v1/jobs/{slow}"));
    assert_eq!(job["state"], "error", "{job}");
    assert!(
        gone_soon(pid).await,
        "grandchild {pid} outlived the timeout"
    );

    // Four jobs of one build on one device: one install.
    assert_eq!(
        installs_in(&adb_log).len(),
        1,
        "{:?}",
        installs_in(&adb_log)
    );

    // A second build: one more install, and the spec sees that build.
    let apk2 = lab.dir.path().join("app-release-2.apk");
    std::fs::write(&apk2, b"apk-e2e-second").expect("apk");
    run_ok(
        qgjob(Some(&url), &project)
            .args([
                "app",
                "upload",
                "--org-id=qualgent",
                "--app-version-id=xyz456",
            ])
            .arg(&apk2),
    );
    let out = run_ok(qgjob(Some(&url), &project).args([
        "submit",
        "--org-id=qualgent",
        "--app-version-id=xyz456",
        "--test=tests/pass.spec.js",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let second = v["job_id"].as_str().expect("id").to_string();
    assert_eq!(wait_exit(&project, &url, &second), 0);
    assert_eq!(
        lab.env_of(second.parse().expect("uuid"))["build"],
        "apk-e2e-second"
    );
    assert_eq!(installs_in(&adb_log).len(), 2, "two builds: two installs");

    // Every job's work dir was cleaned up.
    let left: Vec<_> = std::fs::read_dir(lab.dir.path().join("agent-cache/work"))
        .expect("work dir root")
        .collect();
    assert!(left.is_empty(), "work dirs left behind: {left:?}");
    // And no record of a running process group is left for a later agent to act on.
    let groups: Vec<_> = std::fs::read_dir(lab.dir.path().join("agent-cache/groups"))
        .expect("groups dir")
        .collect();
    assert!(groups.is_empty(), "groups still recorded: {groups:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agent_on_browserstack_uploads_once_and_respects_parallel() {
    let lab = Lab::new();
    let (_server, url) = start_server(lab.dir.path(), &[]);
    let (bs, bs_url) = BrowserStackStandIn::start(lab.dir.path()).await;
    let project = project_with_build(&lab, &url, "bs1", b"apk-bs-bytes");
    let _agent = Proc(
        qgjob(Some(&url), lab.dir.path())
            .env("BROWSERSTACK_USERNAME", "qa-bot")
            .env("BROWSERSTACK_ACCESS_KEY", "k3y-secret")
            .args([
                "agent",
                "--target",
                "browserstack",
                "--parallel",
                "2",
                "--name",
                "e2e-bs",
                "--browserstack-url",
                &bs_url,
                "--command",
                &session_script(lab.dir.path(), &bs),
            ])
            .arg("--cache-dir")
            .arg(lab.dir.path().join("agent-cache"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent starts"),
    );
    // Four specs in one run: the CLI makes one job per spec.
    let out = run_ok(qgjob(Some(&url), &project).args([
        "submit",
        "--org-id=qualgent",
        "--app-version-id=bs1",
        "--target=browserstack",
        "--test=tests/slow.spec.js",
        "--test=tests/pass.spec.js",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("submit json");
    let ids: Vec<String> = v["job_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("a run: {v}"))
        .iter()
        .map(|j| j.as_str().expect("id").to_string())
        .collect();
    let run_id = v["run_id"].as_str().expect("run id").to_string();
    // And two more single jobs of the same build.
    let mut more = Vec::new();
    for _ in 0..2 {
        let out = run_ok(qgjob(Some(&url), &project).args([
            "submit",
            "--org-id=qualgent",
            "--app-version-id=bs1",
            "--target=browserstack",
            "--test=tests/slow.spec.js",
            "--json",
        ]));
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        more.push(v["job_id"].as_str().expect("id").to_string());
    }
    let code = qgjob(Some(&url), &project)
        .args(["wait", "--run-id", &run_id, "--timeout", "240s"])
        .output()
        .expect("wait")
        .status
        .code();
    assert_eq!(code, Some(0));
    for id in &more {
        assert_eq!(wait_exit(&project, &url, id), 0);
    }
    assert_eq!(ids.len(), 2);
    assert_eq!(bs.uploads(), vec!["bs://app1"], "one upload for six jobs");
    for id in ids.iter().chain(&more) {
        let job = get_json(&format!("{url}/v1/jobs/{id}"));
        assert_eq!(job["state"], "passed", "{job}");
    }
    let env = lab.env_of(ids[1].parse().expect("uuid"));
    assert_eq!(env["app_url"], "bs://app1");
    // Three slow sessions ran; never more than two at once.
    let spans: Vec<(u64, u64)> = std::fs::read_to_string(lab.out().join("sessions.txt"))
        .expect("sessions")
        .lines()
        .map(|l| {
            let mut p = l.split(' ').map(|x| x.parse::<u64>().expect("ms"));
            (p.next().expect("start"), p.next().expect("end"))
        })
        .collect();
    assert_eq!(spans.len(), 3);
    let overlap = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap_or(0);
    assert!(
        overlap <= 2,
        "{overlap} sessions at once with --parallel 2: {spans:?}"
    );
}
