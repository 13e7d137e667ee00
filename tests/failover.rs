//! End-to-end failover through the real `qgjob` binary on PostgreSQL: a second
//! `qgjob server --standby` waits while the first serves, the first is killed with
//! SIGKILL, and the standby takes over with every job the first acknowledged; a simulated
//! agent and a `qgjob wait` pointed at the standby all along then see them to the end.
//! Clients given both addresses move from one server to the other by themselves.
//!
//! Needs PostgreSQL (`QGJOB_TEST_PG_URL`, by default 127.0.0.1:5432 with trust auth); the
//! test fails when none answers, unless `QGJOB_SKIP_PG=1` says to leave it out.

use std::time::{Duration, Instant};

mod common;

use common::{qgjob, spawn_server, start_agent, Proc};

/// A fresh schema on the test database, dropped when this is dropped.
struct Schema {
    rt: tokio::runtime::Runtime,
    base: String,
    name: String,
}

impl Schema {
    /// `None` when PostgreSQL is out and `QGJOB_SKIP_PG=1` allows that.
    fn create(tag: &str) -> Option<Schema> {
        let base = std::env::var("QGJOB_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let name = format!("qgjob_failover_{tag}_{}", std::process::id());
        let made = rt.block_on(async {
            let pool = sqlx::PgPool::connect(&base).await?;
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .execute(&pool)
                .await?;
            sqlx::query(&format!("CREATE SCHEMA {name}"))
                .execute(&pool)
                .await?;
            pool.close().await;
            Ok::<_, sqlx::Error>(())
        });
        if let Err(e) = made {
            if std::env::var("QGJOB_SKIP_PG").is_ok_and(|v| v == "1") {
                eprintln!("QGJOB_SKIP_PG=1: skipping the failover test ({base}: {e})");
                return None;
            }
            panic!(
                "PostgreSQL not reachable at {base} ({e}); start it, point QGJOB_TEST_PG_URL \
                 at one, or set QGJOB_SKIP_PG=1 to leave it out"
            );
        }
        Some(Schema { rt, base, name })
    }

    /// The database URL the servers use: the schema as their search path.
    fn url(&self) -> String {
        format!("{}?options[search_path]={}", self.base, self.name)
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        self.rt.block_on(async move {
            if let Ok(pool) = sqlx::PgPool::connect(&base).await {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .execute(&pool)
                    .await;
                pool.close().await;
            }
        });
    }
}

/// Status of `GET url`, `None` while nothing answers.
fn status_of(url: &str) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent.get(url).call().ok().map(|r| r.status().as_u16())
}

/// A loopback port free right now (the standby must be told its address in advance: the
/// agent points at it before it serves).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A serving server on a fresh schema and a standby on a known address, started in a
/// thread that returns once the standby has taken over and printed its `listening` line.
struct Pair {
    work: tempfile::TempDir,
    primary: Proc,
    primary_url: String,
    standby: std::thread::JoinHandle<(Proc, String)>,
    standby_url: String,
}

impl Pair {
    fn start(schema: &Schema) -> Pair {
        let url = schema.url();
        let work = tempfile::tempdir().expect("temp dir");
        let (dir_a, dir_b) = (work.path().join("a"), work.path().join("b"));
        std::fs::create_dir_all(&dir_a).expect("dir a");
        std::fs::create_dir_all(&dir_b).expect("dir b");
        let (primary, primary_url) =
            spawn_server(&dir_a, &["--addr", "127.0.0.1:0", "--database-url", &url]);
        let standby_addr = format!("127.0.0.1:{}", free_port());
        let standby_url = format!("http://{standby_addr}");
        let standby = std::thread::spawn(move || {
            spawn_server(
                &dir_b,
                &["--addr", &standby_addr, "--database-url", &url, "--standby"],
            )
        });
        let t0 = Instant::now();
        while status_of(&format!("{standby_url}/readyz")) != Some(503) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the standby never stood by"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Pair {
            work,
            primary,
            primary_url,
            standby,
            standby_url,
        }
    }

    /// Submits `n` jobs through `server`; returns their ids.
    fn submit(&self, server: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let o = qgjob(Some(server), self.work.path())
                    .args([
                        "submit",
                        "--org-id=qualgent",
                        &format!("--app-version-id=v{}", i % 2),
                        &format!("--test=tests/t{i}.spec.js"),
                        "--json",
                    ])
                    .output()
                    .expect("submit runs");
                assert!(o.status.success(), "{o:?}");
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
                v["job_id"].as_str().expect("a job id").to_string()
            })
            .collect()
    }

    /// Kills the serving server with SIGKILL and waits for the standby's `listening` line;
    /// returns the standby's process.
    fn kill_primary(self) -> (Proc, tempfile::TempDir) {
        let Pair {
            work,
            mut primary,
            standby,
            standby_url,
            ..
        } = self;
        primary.0.kill().expect("SIGKILL the primary");
        let killed = Instant::now();
        let _ = primary.0.wait();
        let (proc, announced) = standby.join().expect("the standby thread");
        eprintln!(
            "standby announced {:.2} s after the primary was killed",
            killed.elapsed().as_secs_f64()
        );
        assert_eq!(announced, standby_url);
        (proc, work)
    }
}

/// `qgjob wait` for `id` through `server` exits 0 (the job passed).
fn assert_passes(server: &str, cwd: &std::path::Path, id: &str) {
    let o = qgjob(Some(server), cwd)
        .args(["wait", &format!("--job-id={id}"), "--timeout=60s"])
        .output()
        .expect("wait runs");
    assert_eq!(
        o.status.code(),
        Some(0),
        "job {id} did not pass: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_standby_takes_over_from_a_killed_server() {
    let Some(schema) = Schema::create("pointed") else {
        return;
    };
    let pair = Pair::start(&schema);
    let standby_url = pair.standby_url.clone();
    // The agent knows only the standby; it waits while the standby answers 503.
    let _agent = start_agent(&standby_url, pair.work.path(), "emulator", &[]);
    let ids = pair.submit(&pair.primary_url.clone(), 6);

    // A `wait` started against the standby waits through its 503s.
    let early_wait = qgjob(Some(&standby_url), pair.work.path())
        .args(["wait", &format!("--job-id={}", ids[0]), "--timeout=60s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("wait starts");
    std::thread::sleep(Duration::from_millis(500));

    let (_standby, work) = pair.kill_primary();
    let early = early_wait.wait_with_output().expect("wait ends");
    let said = String::from_utf8_lossy(&early.stderr);
    assert_eq!(early.status.code(), Some(0), "{said}");
    assert!(
        said.contains("standby") && said.contains("reconnecting"),
        "{said}"
    );
    for id in &ids {
        assert_passes(&standby_url, work.path(), id);
    }
}

/// Clients and an agent given both servers (`--server A,B`) work with the first, and when
/// it is killed in the middle of the jobs they move to the standby by themselves: every
/// job passes, on its first attempt (the running ones under the leases they had).
#[test]
fn clients_given_both_servers_follow_the_takeover() {
    let Some(schema) = Schema::create("listed") else {
        return;
    };
    let pair = Pair::start(&schema);
    let both = format!("{},{}", pair.primary_url, pair.standby_url);
    let _agent = Proc(
        qgjob(Some(&both), pair.work.path())
            .args([
                "agent",
                "--target=emulator",
                "--simulate",
                "--devices=2",
                "--install-s=0.2",
                "--run-s=1.5",
                "--name=both",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("agent starts"),
    );
    let ids = pair.submit(&both, 8);
    // A list that names the standby first: an upload passes it over for the serving
    // server. (Whether a standby closing the connection under a big body breaks the
    // upload depends on socket buffers; on loopback it did not, so the unit test
    // `a_big_upload_passes_a_standby_over` pins that case with a stand-in.)
    let build = pair.work.path().join("build.apk");
    std::fs::write(&build, vec![7u8; 3_000_000]).expect("a build file");
    let standby_first = format!("{},{}", pair.standby_url, pair.primary_url);
    let o = qgjob(Some(&standby_first), pair.work.path())
        .args([
            "app",
            "upload",
            "--org-id=qualgent",
            "--app-version-id=big",
            "build.apk",
        ])
        .output()
        .expect("upload runs");
    assert!(
        o.status.success(),
        "upload through the standby first: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Kill the primary while its agent is running jobs.
    let job_url = format!("{}/v1/jobs/{}", pair.primary_url, ids[0]);
    let t0 = Instant::now();
    loop {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let state = agent
            .get(&job_url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
            .map(|v| v["state"].as_str().unwrap_or_default().to_string());
        if state.as_deref() == Some("running") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no job started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let standby_url = pair.standby_url.clone();
    let (_standby, work) = pair.kill_primary();
    for id in &ids {
        assert_passes(&both, work.path(), id);
        let o = qgjob(Some(&standby_url), work.path())
            .args(["status", &format!("--job-id={id}"), "--json"])
            .output()
            .expect("status runs");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
        assert_eq!(v["attempt"], 1, "{v}");
    }
}
