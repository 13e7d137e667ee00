//! End-to-end tests of how `qgjob agent` starts and stops: a server that refuses the agent's
//! token ends it at once with one line (exit 2), an idle agent stops within about a second
//! of SIGTERM or SIGINT (and unregisters its devices), a busy one finishes its job first
//! unless a second signal says otherwise, an agent whose server goes away (or is not there
//! yet) says so and waits for it, and a second agent under the same name stops. An agent
//! whose adb cannot run, or whose `--name` is invalid, stops at once with one line.
//!
//! Bounds on time are generous on purpose (the machines running these are shared); each test
//! prints what it measured.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

mod common;

use common::{qgjob, start_server, Proc};

const AGENT_TOKEN: &str = "agent-token-0123456789";
const ORG_TOKEN: &str = "acme-token-0123456789";

/// A project directory with one spec file, and a tokens file for the server.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let spec = d.path().join("tests/a.spec.js");
    std::fs::create_dir_all(spec.parent().expect("parent")).expect("mkdir");
    std::fs::write(&spec, "test('works', async () => {});\n").expect("write");
    std::fs::write(
        d.path().join("tokens"),
        format!("agent {AGENT_TOKEN}\norg acme {ORG_TOKEN}\nadmin admin-token-0123456789\n"),
    )
    .expect("write");
    d
}

fn server_with_tokens(dir: &Path) -> (Proc, String) {
    let tokens = dir.join("tokens");
    start_server(dir, &["--tokens-file", tokens.to_str().expect("utf-8")])
}

/// A simulated agent named `vm` with `token` (if any) and `extra` flags; its stderr lines
/// arrive on the receiver as they are printed.
fn agent(url: &str, dir: &Path, token: Option<&str>, extra: &[&str]) -> (Proc, Receiver<String>) {
    let mut c = qgjob(Some(url), dir);
    if let Some(t) = token {
        c.args(["--token", t]);
    }
    c.args(["agent", "--simulate", "--name", "vm"]).args(extra);
    spawn_with_lines(&mut c)
}

/// Starts `c`; its stderr lines arrive on the receiver as they are printed.
fn spawn_with_lines(c: &mut std::process::Command) -> (Proc, Receiver<String>) {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent starts");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Proc(child), rx)
}

/// Waits for the next stderr line containing `what`, returning the lines up to it.
fn wait_for_line(rx: &Receiver<String>, what: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(what);
                seen.push(line);
                if hit {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {what:?} within {within:?}; saw {seen:?}"),
        }
    }
}

/// Waits for the process to exit, at most `within`.
fn wait_exit(p: &mut Proc, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = p.0.try_wait().expect("try_wait") {
            return Some(st);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(p: &Proc, sig: Signal) {
    let pid = i32::try_from(p.0.id()).expect("pid");
    kill(Pid::from_raw(pid), sig).expect("signal");
}

/// The rest of the stderr lines, once the process has exited.
fn drain(rx: &Receiver<String>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        out.push(l);
    }
    out
}

/// The server's `qgjob_devices` gauge (registered devices).
fn registered_devices(url: &str) -> u64 {
    let mut resp = ureq::get(&format!("{url}/metrics"))
        .call()
        .expect("metrics");
    let text = resp.body_mut().read_to_string().expect("metrics text");
    text.lines()
        .find_map(|l| l.strip_prefix("qgjob_devices "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no qgjob_devices in {text}"))
}

fn job_state(url: &str, dir: &Path, id: &str) -> String {
    let o = qgjob(Some(url), dir)
        .args([
            "--token",
            ORG_TOKEN,
            "status",
            &format!("--job-id={id}"),
            "--json",
        ])
        .output()
        .expect("status runs");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("status not JSON ({e}): {o:?}"));
    v["state"].as_str().expect("state").to_string()
}

/// Waits (at most a minute) until job `id` has passed.
fn wait_passed(url: &str, dir: &Path, id: &str) {
    let t0 = Instant::now();
    while job_state(url, dir, id) != "passed" {
        assert!(t0.elapsed() < Duration::from_secs(60), "job never passed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent still runs; SIGTERM stops it, with success.
fn still_running_then_stop(p: &mut Proc, rx: &Receiver<String>) {
    assert!(p.0.try_wait().expect("try_wait").is_none(), "it still runs");
    signal(p, Signal::SIGTERM);
    let st = wait_exit(p, Duration::from_secs(30)).expect("the agent stops");
    assert!(st.success(), "{st:?} {:?}", drain(rx));
}

fn submit(url: &str, dir: &Path, target: &str) -> String {
    let o = qgjob(Some(url), dir)
        .args(["--token", ORG_TOKEN])
        .args([
            "submit",
            "--org-id=acme",
            "--app-version-id=v1",
            "--test=tests/a.spec.js",
            &format!("--target={target}"),
            "--json",
        ])
        .output()
        .expect("submit runs");
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    v["job_id"].as_str().expect("job_id").to_string()
}

#[test]
fn a_refused_token_ends_the_agent_at_once_with_one_line() {
    let dir = project();
    let (_server, url) = server_with_tokens(dir.path());
    let cases = [
        (None, "missing bearer token"),
        (Some("wrongwrongwrongwrong"), "unknown token"),
        (Some(ORG_TOKEN), "the agent protocol needs an agent token"),
    ];
    for (token, says) in cases {
        let started = Instant::now();
        let (mut p, rx) = agent(
            &url,
            dir.path(),
            token,
            &["--target", "emulator", "--devices", "1"],
        );
        // It used to announce itself and then wait for ctrl-c forever.
        let st = wait_exit(&mut p, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("token {token:?}: the agent is still running"));
        let took = started.elapsed();
        let lines = drain(&rx);
        eprintln!("token {token:?}: exit {:?} after {took:?}", st.code());
        assert_eq!(st.code(), Some(2), "token {token:?}: {lines:?}");
        assert_eq!(
            lines,
            vec![format!(
                "error: device vm/emulator-1 could not register: {says}"
            )],
            "token {token:?}"
        );
    }
}

#[test]
fn an_idle_agent_stops_soon_after_sigterm_or_sigint_and_unregisters() {
    let dir = project();
    let (_server, url) = server_with_tokens(dir.path());
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let (mut p, rx) = agent(
            &url,
            dir.path(),
            Some(AGENT_TOKEN),
            &["--target", "idlepool", "--devices", "2"],
        );
        // The banner comes once both devices are registered.
        let before = wait_for_line(&rx, "serving", Duration::from_secs(60));
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(registered_devices(&url), 2);
        // Well into the devices' 20 s long polls.
        std::thread::sleep(Duration::from_secs(3));
        let asked = Instant::now();
        signal(&p, sig);
        let st = wait_exit(&mut p, Duration::from_secs(30)).expect("the agent stops");
        let took = asked.elapsed();
        eprintln!("{sig}: idle agent stopped {took:?} after the signal (it used to take ~17 s)");
        assert!(st.success(), "{sig}: {st:?} {:?}", drain(&rx));
        assert!(took < Duration::from_secs(5), "{sig}: took {took:?}");
        let after = drain(&rx);
        assert!(
            after.iter().any(|l| l.contains("stopped after 0 jobs")),
            "{after:?}"
        );
        // It unregistered its devices on the way out rather than leaving them to expire.
        assert_eq!(registered_devices(&url), 0, "{sig}");
    }
}

/// Submits a job for `target` and waits until an agent runs it; returns its id.
fn submit_running(url: &str, dir: &Path, target: &str) -> String {
    let id = submit(url, dir, target);
    let deadline = Instant::now() + Duration::from_secs(20);
    while job_state(url, dir, &id) != "running" {
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    id
}

#[test]
fn a_busy_agent_finishes_its_job_then_a_second_signal_stops_at_once() {
    let dir = project();
    let (_server, url) = server_with_tokens(dir.path());

    // One signal: the running job finishes and is reported before the agent exits.
    let (mut p, rx) = agent(
        &url,
        dir.path(),
        Some(AGENT_TOKEN),
        &[
            "--target",
            "busypool",
            "--devices",
            "1",
            "--install-s",
            "0.1",
            "--run-s",
            "3",
        ],
    );
    wait_for_line(&rx, "serving", Duration::from_secs(60));
    let id = submit_running(&url, dir.path(), "busypool");
    signal(&p, Signal::SIGTERM);
    let st = wait_exit(&mut p, Duration::from_secs(60)).expect("the agent stops");
    let after = drain(&rx);
    assert!(st.success(), "{st:?} {after:?}");
    assert!(
        after
            .iter()
            .any(|l| l.contains("stopped after 1 jobs (1 passed")),
        "{after:?}"
    );
    assert_eq!(job_state(&url, dir.path(), &id), "passed");

    // Two signals: the second one does not wait for the (long) job.
    let (mut p, rx) = agent(
        &url,
        dir.path(),
        Some(AGENT_TOKEN),
        &["--target", "busypool", "--devices", "1", "--run-s", "600"],
    );
    wait_for_line(&rx, "serving", Duration::from_secs(60));
    submit_running(&url, dir.path(), "busypool");
    signal(&p, Signal::SIGINT);
    wait_for_line(&rx, "stopping", Duration::from_secs(10));
    let asked = Instant::now();
    signal(&p, Signal::SIGINT);
    let st = wait_exit(&mut p, Duration::from_secs(30)).expect("the agent stops");
    let took = asked.elapsed();
    eprintln!("second SIGINT: busy agent stopped {took:?} after it");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(st.code(), Some(3), "{:?}", drain(&rx));
}

#[test]
fn an_agent_whose_server_goes_away_warns_while_it_retries() {
    let dir = project();
    let (server, url) = server_with_tokens(dir.path());
    let (mut p, rx) = agent(
        &url,
        dir.path(),
        Some(AGENT_TOKEN),
        &["--target", "emulator", "--devices", "1"],
    );
    wait_for_line(&rx, "serving", Duration::from_secs(60));
    drop(server);
    let lines = wait_for_line(&rx, "warning:", Duration::from_secs(30));
    let warning = lines.last().expect("a line");
    assert!(warning.contains("retrying"), "{warning}");
    // Still running: a server restart must not end the agent.
    still_running_then_stop(&mut p, &rx);
}

#[test]
fn an_agent_started_before_its_server_waits_for_it() {
    let dir = project();
    // A loopback port nothing listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (mut p, rx) = agent(
        &url,
        dir.path(),
        Some(AGENT_TOKEN),
        &["--target", "emulator", "--devices", "1"],
    );
    let lines = wait_for_line(&rx, "warning:", Duration::from_secs(60));
    let warning = lines.last().expect("a line");
    assert!(
        warning.contains("cannot reach qgjob server") && warning.contains("retrying"),
        "{warning}"
    );
    assert!(p.0.try_wait().expect("try_wait").is_none(), "it waits");
    let tokens = dir.path().join("tokens");
    let addr = format!("127.0.0.1:{port}");
    let (_server, url2) = common::spawn_server(
        dir.path(),
        &[
            "--addr",
            &addr,
            "--store",
            "memory",
            "--tokens-file",
            tokens.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(url2, url);
    wait_for_line(&rx, "serving", Duration::from_secs(60));
    let id = submit(&url, dir.path(), "emulator");
    wait_passed(&url, dir.path(), &id);
    still_running_then_stop(&mut p, &rx);
}

/// Slow on purpose (about a minute): the second agent gives the first its whole patience
/// (`AgentConfig::held_patience`, 60 s) to go quiet before it stops.
#[test]
fn a_second_agent_under_the_same_name_stops_with_one_clear_line() {
    let dir = project();
    let (_server, url) = server_with_tokens(dir.path());
    let args = ["--target", "emulator", "--devices", "1"];
    let (mut first, first_rx) = agent(&url, dir.path(), Some(AGENT_TOKEN), &args);
    wait_for_line(&first_rx, "serving", Duration::from_secs(60));
    let t0 = Instant::now();
    let (mut twin, rx) = agent(&url, dir.path(), Some(AGENT_TOKEN), &args);
    let lines = wait_for_line(&rx, "warning:", Duration::from_secs(60));
    let warning = lines.last().expect("a line");
    assert!(
        warning.contains("vm/emulator-1 is registered by another agent"),
        "{warning}"
    );
    let st = wait_exit(&mut twin, Duration::from_secs(120)).expect("the twin stops");
    let took = t0.elapsed();
    let rest = drain(&rx);
    assert_eq!(st.code(), Some(2), "{rest:?}");
    let last = rest.last().expect("an error line");
    assert!(
        last.starts_with("error: device vm/emulator-1 could not register")
            && last.contains("same --name"),
        "{rest:?}"
    );
    eprintln!("the twin stopped after {took:?}");
    // The first agent still has its device and runs jobs.
    let id = submit(&url, dir.path(), "emulator");
    wait_passed(&url, dir.path(), &id);
    still_running_then_stop(&mut first, &first_rx);
}

/// A proxy in front of a server that is down answers 502: the agent waits, as for a
/// refused connection, rather than ending.
#[test]
fn an_agent_behind_a_proxy_whose_server_is_down_waits() {
    use std::io::{Read as _, Write as _};
    let dir = project();
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", proxy.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in proxy.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = "<html>502 Bad Gateway</html>";
            let _ = write!(
                conn,
                "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let (mut p, rx) = agent(
        &url,
        dir.path(),
        Some(AGENT_TOKEN),
        &["--target", "emulator", "--devices", "1"],
    );
    let lines = wait_for_line(&rx, "warning:", Duration::from_secs(60));
    let warning = lines.last().expect("a line");
    assert!(
        warning.contains("502") && warning.contains("retrying"),
        "{warning}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(p.0.try_wait().expect("try_wait").is_none(), "it waits");
    signal(&p, Signal::SIGTERM);
    wait_exit(&mut p, Duration::from_secs(30)).expect("the agent stops");
}

/// A real-device agent (`--target device`, cache under `dir`) whose `adb` is whatever PATH
/// `bin` holds, plus `extra` flags.
fn adb_agent(url: &str, dir: &Path, bin: &Path, extra: &[&str]) -> (Proc, Receiver<String>) {
    let mut c = qgjob(Some(url), dir);
    c.env("PATH", bin)
        .env_remove("QGJOB_ADB")
        .args(["agent", "--target", "device", "--name", "lab"])
        .arg("--cache-dir")
        .arg(dir.join("agent-cache"))
        .args(extra);
    spawn_with_lines(&mut c)
}

/// An agent whose adb cannot run at all stops at once with one line (exit 3), with
/// `--serial` as without: a missing adb is not a device that is not ready yet. One whose
/// adb runs but does not list the serial warns and waits for the device.
#[test]
fn an_agent_whose_adb_cannot_run_stops_with_one_line_even_with_serial() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let empty = dir.path().join("no-adb");
    std::fs::create_dir_all(&empty).expect("mkdir");
    for extra in [&[][..], &["--serial", "R58M1234"][..]] {
        let (mut p, rx) = adb_agent(&url, dir.path(), &empty, extra);
        // It used to warn that the device was not ready, and wait for ever.
        let st = wait_exit(&mut p, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("{extra:?}: still running: {:?}", drain(&rx)));
        let lines = drain(&rx);
        assert_eq!(st.code(), Some(3), "{extra:?}: {lines:?}");
        assert_eq!(lines.len(), 1, "{extra:?}: {lines:?}");
        assert!(
            lines[0].starts_with("error: adb: cannot run adb: No such file or directory"),
            "{extra:?}: {lines:?}"
        );
    }

    // A fake adb (a script, not a device) that runs and lists no device.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    let adb = bin.join("adb");
    std::fs::write(
        &adb,
        "#!/bin/sh\n\
         case \"$*\" in\n\
           devices) printf 'List of devices attached\\n' ;;\n\
           version) echo 'Android Debug Bridge version 1.0.41' ;;\n\
           *) echo \"error: device 'R58M1234' not found\" >&2; exit 1 ;;\n\
         esac\n",
    )
    .expect("write fake adb");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&adb, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (mut p, rx) = adb_agent(&url, dir.path(), &bin, &["--serial", "R58M1234"]);
    wait_for_line(&rx, "a device is not ready", Duration::from_secs(60));
    still_running_then_stop(&mut p, &rx);
}

/// An agent name is the first part of its device ids, so it must make valid ones on its
/// own: an empty name (devices `/emulator-1`), one with a `/`, a space or too many
/// characters is refused at once with one line saying what a name may be (exit 2), for
/// simulated and real devices alike, before the agent waits for its server.
#[test]
fn an_invalid_agent_name_is_refused_with_one_line() {
    let dir = project();
    let (_server, url) = start_server(dir.path(), &[]);
    let long = "x".repeat(65);
    for name in ["", "lab/1", "my lab", long.as_str()] {
        for real in [false, true] {
            let mut c = qgjob(Some(&url), dir.path());
            c.args(["agent", "--target", "device", "--name", name]);
            if real {
                c.args(["--serial", "R58M1234"])
                    .arg("--cache-dir")
                    .arg(dir.path().join("agent-cache"));
            } else {
                c.arg("--simulate");
            }
            let (mut p, rx) = spawn_with_lines(&mut c);
            let st = wait_exit(&mut p, Duration::from_secs(30))
                .unwrap_or_else(|| panic!("{name:?} (real: {real}): still running"));
            let lines = drain(&rx);
            assert_eq!(st.code(), Some(2), "{name:?} (real: {real}): {lines:?}");
            assert_eq!(lines.len(), 1, "{name:?} (real: {real}): {lines:?}");
            assert!(
                lines[0].starts_with(&format!("error: invalid agent name {name:?}: "))
                    && lines[0].contains("1 to 64"),
                "{name:?} (real: {real}): {lines:?}"
            );
        }
    }
    assert_eq!(registered_devices(&url), 0, "no device registered");
}
