//! End-to-end crash test through the real `qgjob` binary: several clients submit jobs (and
//! an agent finishes some) while the server is killed with SIGKILL; after a restart on the
//! same data dir every job whose submit got a 2xx is there, every completion that got a 2xx
//! is still final, and then every job finishes. Finally SIGTERM stops the server cleanly.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

/// A `qgjob server` child process and the address it printed.
struct Server {
    child: Child,
    base: String,
    // Kept open so a later write to stdout never hits a closed pipe.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Drop for Server {
    // A failing assertion must not leave the server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(data: &Path) -> Server {
    start_server_on(data, "127.0.0.1:0")
}

fn start_server_on(data: &Path, addr: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qgjob"))
        .args(["server", "--addr", addr, "--data-dir"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qgjob server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    let mut reader = BufReader::new(stdout);
    reader.read_line(&mut line).expect("read the first line");
    let addr = line
        .trim()
        .strip_prefix("qgjob server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Server {
        child,
        base: addr,
        _stdout: reader,
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// POST JSON; `None` when the server is unreachable (it was killed).
fn post(a: &ureq::Agent, url: &str, body: &Value) -> Option<(u16, Value)> {
    let mut resp = a.post(url).send_json(body).ok()?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().ok()?;
    Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

fn get(a: &ureq::Agent, url: &str) -> (u16, Value) {
    let mut resp = a.get(url).call().expect("server answers");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn acknowledged_jobs_survive_kill_9_and_then_finish() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = start_server(&data);
    let base = server.base.clone();

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let completed: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));

    // Four submitting clients; one in two uses batch runs. Bounded in count and time.
    let mut clients = Vec::new();
    for c in 0..4 {
        let (base, acked, stop, count) = (base.clone(), acked.clone(), stop.clone(), count.clone());
        clients.push(std::thread::spawn(move || {
            let a = agent();
            let t0 = Instant::now();
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) || t0.elapsed() > Duration::from_secs(60) {
                    break;
                }
                let spec = |k: usize| {
                    json!({"org_id": "crash", "app_version_id": format!("v{}", c % 2),
                           "tests": [format!("tests/c{c}-{i}-{k}.spec.js")]})
                };
                let got = if c % 2 == 0 {
                    post(&a, &format!("{base}/v1/jobs"), &spec(0)).map(|(st, v)| {
                        (
                            st,
                            vec![v["job_id"].as_str().unwrap_or_default().to_string()],
                        )
                    })
                } else {
                    post(
                        &a,
                        &format!("{base}/v1/runs"),
                        &json!({"jobs": [spec(0), spec(1), spec(2)]}),
                    )
                    .map(|(st, v)| {
                        let ids = v["job_ids"]
                            .as_array()
                            .map(|ids| {
                                ids.iter()
                                    .map(|x| x.as_str().unwrap_or_default().to_string())
                                    .collect()
                            })
                            .unwrap_or_default();
                        (st, ids)
                    })
                };
                match got {
                    Some((st, ids)) if (200..300).contains(&st) => {
                        count.fetch_add(ids.len(), Ordering::Relaxed);
                        acked.lock().unwrap().extend(ids);
                    }
                    Some((st, v)) => panic!("unexpected answer {st}: {v:?}"),
                    // The server is gone: this request was never acknowledged.
                    None => break,
                }
            }
        }));
    }

    // An agent finishing jobs during the load: its acknowledged completions must stick.
    let agent_thread = {
        let (base, completed, stop) = (base.clone(), completed.clone(), stop.clone());
        std::thread::spawn(move || {
            let a = agent();
            if post(
                &a,
                &format!("{base}/v1/agent/devices"),
                &json!({"id": "emu-crash", "target": "emulator"}),
            )
            .is_none()
            {
                return;
            }
            for _ in 0..10_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let Some((st, l)) = post(
                    &a,
                    &format!("{base}/v1/agent/lease"),
                    &json!({"device_id": "emu-crash", "max_batch": 4, "wait_ms": 200}),
                ) else {
                    break;
                };
                if st != 200 {
                    continue;
                }
                let lid = l["id"].as_u64().unwrap();
                for j in l["jobs"].as_array().unwrap() {
                    let jid = j["id"].as_str().unwrap().to_string();
                    match post(
                        &a,
                        &format!("{base}/v1/agent/leases/{lid}/jobs/{jid}/complete"),
                        &json!({"passed": true}),
                    ) {
                        Some((200, _)) => completed.lock().unwrap().push(jid),
                        Some(_) => {}
                        None => return,
                    }
                }
            }
        })
    };

    // Kill the server mid-load (after some acknowledgements, so the test means something).
    let t0 = Instant::now();
    while count.load(Ordering::Relaxed) < 300 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    server.child.kill().expect("SIGKILL the server");
    server.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    agent_thread.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    let completed = completed.lock().unwrap().clone();
    assert!(acked.len() >= 300, "only {} jobs acknowledged", acked.len());
    eprintln!(
        "killed mid-load: {} submissions and {} completions acknowledged",
        acked.len(),
        completed.len()
    );

    // Restart on the same data dir: everything acknowledged is there.
    let mut server = start_server(&data);
    let base = server.base.clone();
    let a = agent();
    for id in &acked {
        let (st, j) = get(&a, &format!("{base}/v1/jobs/{id}"));
        assert_eq!(st, 200, "acknowledged job {id} is missing after the crash");
        assert_eq!(j["spec"]["org_id"], "crash");
    }
    for id in &completed {
        let (_, j) = get(&a, &format!("{base}/v1/jobs/{id}"));
        assert_eq!(
            j["state"], "passed",
            "completion of {id} was acknowledged but lost"
        );
    }

    // The crashed agent's device comes back (getting its restored lease) and is removed,
    // as an agent restarting would do: its running jobs go back to the queue at once
    // instead of waiting for their leases to expire.
    let dev = json!({"id": "emu-crash", "target": "emulator"});
    let (st, _) = post(&a, &format!("{base}/v1/agent/devices"), &dev).expect("server up");
    assert_eq!(st, 200);
    let mut resp = a
        .delete(format!("{base}/v1/agent/devices/emu-crash"))
        .call()
        .expect("server up");
    assert_eq!(
        resp.status().as_u16(),
        204,
        "{:?}",
        resp.body_mut().read_to_string()
    );

    // And then they all finish: a fresh device works through the queue.
    let (st, _) = post(
        &a,
        &format!("{base}/v1/agent/devices"),
        &json!({"id": "emu-after", "target": "emulator"}),
    )
    .expect("server up");
    assert_eq!(st, 200);
    let t0 = Instant::now();
    loop {
        let (_, page) = get(
            &a,
            &format!("{base}/v1/jobs?org_id=crash&state=queued&limit=1"),
        );
        let (_, running) = get(
            &a,
            &format!("{base}/v1/jobs?org_id=crash&state=running&limit=1"),
        );
        let queued_left = !page["jobs"].as_array().unwrap().is_empty();
        let running_left = !running["jobs"].as_array().unwrap().is_empty();
        if !queued_left && !running_left {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "jobs did not finish after restart"
        );
        let (st, l) = post(
            &a,
            &format!("{base}/v1/agent/lease"),
            &json!({"device_id": "emu-after", "max_batch": 64, "wait_ms": 1000}),
        )
        .expect("server up");
        if st == 409 {
            // Lost after an expiry while we were idle: register again.
            post(
                &a,
                &format!("{base}/v1/agent/devices"),
                &json!({"id": "emu-after", "target": "emulator"}),
            );
            continue;
        }
        if st != 200 {
            continue;
        }
        let lid = l["id"].as_u64().unwrap();
        for j in l["jobs"].as_array().unwrap() {
            let jid = j["id"].as_str().unwrap();
            let (st, v) = post(
                &a,
                &format!("{base}/v1/agent/leases/{lid}/jobs/{jid}/complete"),
                &json!({"passed": true}),
            )
            .expect("server up");
            assert_eq!(st, 200, "{v}");
        }
    }
    for id in &acked {
        let (_, j) = get(&a, &format!("{base}/v1/jobs/{id}"));
        assert_eq!(j["state"], "passed", "job {id}");
    }

    // SIGTERM: a graceful stop with a zero exit status.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "server exit status {status}");
}

/// `wait` and `status --watch` outlive a server restart: the server is durable, so they
/// reconnect (saying so once on stderr) and report the job's end as if nothing happened.
#[test]
fn wait_and_watch_reconnect_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The same address before and after the restart: take a free port and give it back.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let mut server = start_server_on(&data, &addr);
    let base = server.base.clone();
    let (st, v) = post(
        &agent(),
        &format!("{base}/v1/jobs"),
        &json!({"org_id": "acme", "app_version_id": "v1", "tests": ["tests/a.spec.js"]}),
    )
    .expect("server answers");
    assert_eq!(st, 201, "{v}");
    let id = v["job_id"].as_str().expect("job id").to_string();

    let follow = |args: &[&str]| {
        common::Proc(
            common::qgjob(Some(&base), dir.path())
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("qgjob runs"),
        )
    };
    let mut waiting = follow(&["wait", &format!("--job-id={id}"), "--timeout=120s"]);
    let mut watching = follow(&["status", &format!("--job-id={id}"), "--watch"]);
    std::thread::sleep(Duration::from_secs(1));

    server.child.kill().expect("SIGKILL");
    server.child.wait().expect("reaped");
    std::thread::sleep(Duration::from_secs(1));
    let server = start_server_on(&data, &addr);
    let _agent = common::start_agent(&server.base, dir.path(), "emulator", &[]);

    for (what, p) in [("wait", &mut waiting), ("status --watch", &mut watching)] {
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = p.0.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "{what} did not finish"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read as _;
        p.0.stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .unwrap();
        p.0.stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(status.code(), Some(0), "{what}: {out}{err}");
        assert!(out.contains("passed"), "{what}: {out}");
        assert!(err.contains("reconnecting"), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
    }
}
