//! The long-running local commands: `qgjob server`, `qgjob up` (server + simulated agents
//! for every target in one process) and `qgjob demo` (the same, plus a sample run, its
//! results and the schedule's figures against the lower bound).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qgjob_core::agent::{Agent, AgentConfig, Shutdown};
use qgjob_core::device::Device;
use qgjob_core::sim::{lower_bound, BoundJob};
use qgjob_core::simdevice::{SimDevice, SimDeviceConfig, SimOutcome};
use qgjob_core::{
    AppVersionId, DeviceId, Job, JobSpec, JobState, OrgId, Priority, SchedulerConfig, Target,
};
use qgjob_http::{ServerOptions, StoreKind as HttpStore};
use serde::Serialize;

use crate::agent::{drop_runtime, forced, run_until_stopped, runtime, secs_to_ms, Ended};
use crate::cli::{DemoArgs, ServerArgs, StoreKind, UpArgs};
use crate::client::Client;
use crate::error::{CliError, Result, EXIT_OK};
use crate::link::HttpLink;
use crate::report;
use crate::util::{fmt_ms, use_color, use_progress};

/// The three built-in targets, in display order.
pub const TARGETS: [Target; 3] = [Target::Emulator, Target::Device, Target::Browserstack];

fn parse_addr(s: &str) -> Result<SocketAddr> {
    s.parse().map_err(|_| {
        CliError::Usage(format!(
            "invalid address {s:?} (expected IP:PORT, e.g. 127.0.0.1:7878)"
        ))
    })
}

/// Logs to stderr (`RUST_LOG` overrides `default`), coloured only on a terminal without
/// `NO_COLOR`.
fn init_logs(default: &str) {
    let ansi =
        crate::util::stderr_is_tty() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The store `qgjob server` opens: `--store` as given, else PostgreSQL when a database URL
/// is set, else the embedded one. A URL beside a store that uses no database is refused
/// rather than ignored (the server would run on another store than the one meant).
fn store_kind(store: Option<StoreKind>, database_url: Option<&str>) -> Result<StoreKind> {
    // An empty variable (`QGJOB_DATABASE_URL=`) names no database.
    let url = database_url.is_some_and(|u| !u.is_empty());
    let without_db = |name: &str| {
        CliError::Usage(format!(
            "--store {name} and --database-url (or QGJOB_DATABASE_URL) contradict each other: \
             the {name} store uses no database (drop one of them, or use --store postgres)"
        ))
    };
    match (store, url) {
        (None, false) => Ok(StoreKind::Embedded),
        (None, true) => Ok(StoreKind::Postgres),
        (Some(kind), false) if kind != StoreKind::Postgres => Ok(kind),
        (Some(StoreKind::Postgres), true) => Ok(StoreKind::Postgres),
        (Some(StoreKind::Postgres), false) => Err(CliError::Usage(
            "--store postgres needs --database-url (or QGJOB_DATABASE_URL)".into(),
        )),
        (Some(StoreKind::Memory), _) => Err(without_db("memory")),
        (Some(StoreKind::Embedded), _) => Err(without_db("embedded")),
    }
}

/// `qgjob server`.
pub fn server(a: &ServerArgs) -> Result<u8> {
    let kind = store_kind(a.store, a.database_url.as_deref())?;
    if a.standby && kind != StoreKind::Postgres {
        return Err(CliError::Usage(
            "--standby needs the PostgreSQL store (--database-url): only servers on one \
             database can take over from each other"
                .into(),
        ));
    }
    if a.fsync && kind != StoreKind::Embedded {
        // PostgreSQL's durability is its own setting, and memory has nothing to sync.
        return Err(CliError::Usage(
            "--fsync applies to the embedded store only (PostgreSQL's durability is set in \
             PostgreSQL)"
                .into(),
        ));
    }
    if kind == StoreKind::Memory && a.data_dir.is_some() {
        // It would be ignored: nothing of a memory store touches the disk.
        return Err(CliError::Usage(
            "--store memory keeps nothing on disk: drop --data-dir (or use the embedded store)"
                .into(),
        ));
    }
    let opts = ServerOptions {
        addr: parse_addr(&a.addr)?,
        data_dir: Some(
            a.data_dir
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from("qgjob-data")),
        ),
        store: match kind {
            StoreKind::Embedded => HttpStore::Sqlite,
            StoreKind::Memory => HttpStore::Memory,
            StoreKind::Postgres => HttpStore::Postgres,
        },
        postgres_url: a.database_url.clone(),
        tokens_file: a.tokens_file.clone(),
        standby: a.standby,
        synchronous: if a.fsync {
            qgjob_http::Synchronous::Full
        } else {
            qgjob_http::Synchronous::Normal
        },
        ..ServerOptions::default()
    };
    // Installed first, so the server's own default subscriber is not used.
    init_logs("info");
    let rt = runtime()?;
    rt.block_on(qgjob_http::run_server(opts))
        .map_err(server_error)?;
    Ok(EXIT_OK)
}

/// A server error as the command reports it: a flag or file to fix is a usage error
/// (exit 2), anything else an infrastructure one (exit 3). An address it cannot listen on
/// (a port in use, say) is the machine's state, like a data dir another server holds, so
/// 3 as well (the server reports it as unavailable). `server`, `up` and `demo` say the
/// same thing for the same cause.
fn server_error(e: qgjob_http::ServerError) -> CliError {
    match e {
        qgjob_http::ServerError::Config(m) => CliError::Usage(format!("server: {m}")),
        e => CliError::Other(format!("server: {e}")),
    }
}

/// A server and simulated agents running inside this process.
struct Lab {
    rt: tokio::runtime::Runtime,
    base: String,
    server_stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::result::Result<(), qgjob_http::ServerError>>>,
    agents_stop: Shutdown,
    agents: Vec<tokio::task::JoinHandle<()>>,
    devices: Vec<(Target, Arc<SimDevice>)>,
}

/// How the lab's simulated devices behave.
struct LabDevices {
    per_target: u32,
    install_ms: u64,
    run_ms: u64,
    run_jitter: f64,
    scripted: Vec<(String, SimOutcome)>,
}

impl Lab {
    fn start(addr: SocketAddr, opts: ServerOptions, devs: &LabDevices) -> Result<Lab> {
        let rt = runtime()?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            // As `server` reports it (exit 3).
            .map_err(|e| CliError::Other(format!("server: cannot listen on {addr}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| CliError::io("reading the bound address", e))?;
        let base = format!("http://{local}");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(qgjob_http::serve(listener, opts, async move {
            let _ = rx.await;
        }));
        // Agents talk to the server over loopback HTTP, exactly like remote ones.
        let client = Client::new(base.clone(), None);
        if let Err(e) = wait_healthy(&client, &server) {
            // A server that stopped says why (a data dir another server holds, say).
            if server.is_finished() {
                if let Ok(Err(why)) = rt.block_on(server) {
                    return Err(server_error(why));
                }
            }
            return Err(e);
        }
        let agents_stop = Shutdown::new();
        let mut agents = Vec::new();
        let mut devices = Vec::new();
        for (ti, target) in TARGETS.iter().enumerate() {
            let link = Arc::new(HttpLink::new(client.clone()));
            let cfg = AgentConfig {
                max_batch: 1,
                lease_wait: Duration::from_secs(5),
                heartbeat_interval: Duration::from_secs(2),
                ..AgentConfig::default()
            };
            let mut agent = Agent::new(link, cfg);
            for i in 1..=devs.per_target {
                let id = DeviceId::new(format!("local/{target}-{i}"))
                    .map_err(|e| CliError::Other(e.to_string()))?;
                let mut c = SimDeviceConfig::new(id, target.clone());
                c.install_ms = devs.install_ms;
                c.run_ms = devs.run_ms;
                c.run_jitter = devs.run_jitter;
                c.seed = 7 + 100 * ti as u64 + i as u64;
                c.scripted = devs.scripted.clone();
                let d = Arc::new(SimDevice::new(c));
                devices.push((target.clone(), Arc::clone(&d)));
                agent.add_device(d as Arc<dyn Device>);
            }
            let signal = agents_stop.signal();
            agents.push(rt.spawn(async move {
                if let Err(e) = agent.run(signal).await {
                    eprintln!("error: simulated agent stopped: {e}");
                }
            }));
        }
        Ok(Lab {
            rt,
            base,
            server_stop: Some(tx),
            server: Some(server),
            agents_stop,
            agents,
            devices,
        })
    }

    /// The lab's stop as a future that starts once `agents_stop` fires: the agents finish
    /// their running jobs (waiting at most `grace`) and unregister, then the server stops.
    fn stopping(&mut self, grace: Duration) -> impl Future<Output = Result<Stopped>> + 'static {
        let mut fired = self.agents_stop.signal();
        let agents = std::mem::take(&mut self.agents);
        let mut server = self.server.take();
        let stop = self.server_stop.take();
        let client = Client::new(self.base.clone(), None);
        async move {
            // The server may stop on its own first (its store refused a write): then the
            // lab is over, and its agents go with the runtime.
            if let Some(h) = server.as_mut() {
                tokio::select! {
                    () = fired.triggered() => {}
                    ended = h => {
                        return Err(match ended {
                            Ok(Err(e)) => server_error(e),
                            _ => CliError::Other("server: stopped unexpectedly".into()),
                        });
                    }
                }
            } else {
                fired.triggered().await;
            }
            let stopped = match tokio::time::timeout(grace, futures_join(agents)).await {
                Ok(()) => Stopped::Clean,
                Err(_) => {
                    // Asked while the server still runs; the client blocks, so off the
                    // async threads.
                    let left = tokio::task::spawn_blocking(move || running_jobs(&client))
                        .await
                        .ok()
                        .flatten();
                    match left {
                        // Agents slow to unregister leave no job behind.
                        Some(0) => Stopped::Clean,
                        n => Stopped::JobsLeft(n),
                    }
                }
            };
            if let Some(s) = stop {
                let _ = s.send(());
            }
            if let Some(h) = server {
                if let Ok(Ok(Err(e))) = tokio::time::timeout(SERVER_STOP, h).await {
                    return Err(server_error(e));
                }
            }
            Ok(stopped)
        }
    }

    /// Stops the lab now, without waiting for a signal (the demo, once its run is over):
    /// see [`Lab::stopping`].
    fn stop(mut self, grace: Duration) -> Result<Stopped> {
        self.agents_stop.trigger();
        let stopping = self.stopping(grace);
        let stopped = self.rt.block_on(stopping);
        // Abandoned long polls run on blocking threads; don't wait for them.
        drop_runtime(self.rt, Duration::from_millis(200));
        stopped
    }
}

/// How long the server gets to stop once the agents are done (it ends its event streams
/// and long polls itself; this only bounds a stop that hangs).
const SERVER_STOP: Duration = Duration::from_secs(10);

/// How a lab's stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// Every agent finished its running jobs and unregistered, and the server stopped.
    Clean,
    /// The wait ran out with jobs still running: this many, when the server could say.
    JobsLeft(Option<usize>),
}

/// How many jobs the server has running (`None` when it cannot say).
fn running_jobs(client: &Client) -> Option<usize> {
    let page = client
        .list(&crate::client::ListQuery {
            state: Some(JobState::Running.as_str().to_string()),
            limit: Some(1000),
            ..Default::default()
        })
        .ok()?;
    Some(page.jobs.len())
}

/// How long `up` waits for running jobs to finish once asked to stop: long enough for a
/// job leased just then to install, run (with the most jitter) and report, and at least
/// 10 s.
fn stop_grace(devs: &LabDevices) -> Duration {
    let run = devs.run_ms as f64 * (1.0 + devs.run_jitter.clamp(0.0, 1.0));
    let ms = devs
        .install_ms
        .saturating_add(run.ceil() as u64)
        .saturating_add(5_000);
    // Whole seconds: it is shown to people.
    Duration::from_secs(ms.div_ceil(1000).max(10))
}

async fn futures_join(hs: Vec<tokio::task::JoinHandle<()>>) {
    for h in hs {
        let _ = h.await;
    }
}

/// Waits (bounded) until the in-process server answers `/healthz`.
fn wait_healthy(
    client: &Client,
    server: &tokio::task::JoinHandle<std::result::Result<(), qgjob_http::ServerError>>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if server.is_finished() {
            return Err(CliError::Other("the server stopped during start-up".into()));
        }
        match client.health() {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(20) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `qgjob up`.
pub fn up(a: &UpArgs) -> Result<u8> {
    // Only errors: `up` prints its own status lines (RUST_LOG shows more).
    init_logs("error");
    let opts = ServerOptions {
        addr: parse_addr(&a.addr)?,
        data_dir: Some(a.data_dir.clone()),
        store: HttpStore::Sqlite,
        ..ServerOptions::default()
    };
    // Checked before anything starts, with `agent --simulate`'s limits.
    let devs = LabDevices {
        per_target: a.devices.clamp(1, 64),
        install_ms: secs_to_ms(a.install_s, "--install-s")?,
        run_ms: secs_to_ms(a.run_s, "--run-s")?,
        run_jitter: 0.3,
        scripted: Vec::new(),
    };
    let mut lab = Lab::start(opts.addr, opts, &devs)?;
    let mut banner = Some(format!(
        "qgjob up: server on {base} (API, /metrics, /openapi.json), data in {}\n\
         simulated agents: {n} emulator, {n} device, {n} browserstack (install {:.1} s, run {:.1} s)\n\
         try, in another terminal:\n  \
         export QGJOB_SERVER={base}\n  \
         qgjob submit --org-id=qualgent --app-version-id=xyz123 --test=tests/onboarding.spec.js --wait\n\
         ctrl-c stops everything",
        a.data_dir.display(),
        devs.install_ms as f64 / 1000.0,
        devs.run_ms as f64 / 1000.0,
        base = lab.base,
        n = devs.per_target
    ));
    let grace = stop_grace(&devs);
    let waited = fmt_ms(grace.as_millis() as u64);
    let stopping = lab.stopping(grace);
    let line = format!(
        "qgjob up: stopping (waiting up to {waited} for running jobs to finish; ctrl-c again \
         to stop at once)"
    );
    let ended = lab.rt.block_on(run_until_stopped(
        stopping,
        &lab.agents_stop,
        &line,
        // Printed on the first tick, once ctrl-c is caught: "ctrl-c stops everything" is
        // then true from the moment it is shown.
        || {
            if let Some(b) = banner.take() {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{b}");
                let _ = o.flush();
            }
        },
    ));
    // Simulated devices leave nothing behind when their tasks are dropped.
    let settle = match ended {
        Ended::Forced => Duration::ZERO,
        Ended::Returned(_) => Duration::from_millis(200),
    };
    drop_runtime(lab.rt, settle);
    match ended {
        Ended::Returned(Ok(Stopped::Clean)) => {
            eprintln!("qgjob up: stopped");
            Ok(EXIT_OK)
        }
        Ended::Returned(Ok(Stopped::JobsLeft(n))) => Err(CliError::Other(jobs_left(n, &waited))),
        Ended::Returned(Err(e)) => Err(e),
        Ended::Forced => Err(forced(UP_RETRIED)),
    }
}

/// When the jobs `up` leaves running are retried: its store keeps them, and its agents'
/// devices register idle at the next start, which hands their old leases back at once.
const UP_RETRIED: &str = "they are retried when the server next runs";

/// What `up` says when its wait for running jobs ran out after `waited`.
fn jobs_left(n: Option<usize>, waited: &str) -> String {
    let what = match n {
        Some(1) => "1 job still running was left behind (it is".to_string(),
        Some(n) => format!("{n} jobs still running were left behind (they are"),
        None => "jobs still running were left behind (they are".to_string(),
    };
    format!("stopped after waiting {waited}: {what} retried when the server next runs)")
}

/// The demo's run: several app versions, every target, one failing and one flaky test.
pub fn demo_specs() -> Result<Vec<JobSpec>> {
    let org = OrgId::new("qualgent").map_err(|e| CliError::Other(e.to_string()))?;
    let tests = [
        "tests/onboarding.spec.js",
        "tests/login.spec.js",
        "tests/search.spec.js",
        "tests/cart.spec.js",
        "tests/checkout.spec.js",
        "tests/profile.spec.js",
    ];
    // (version, target, priority, which tests)
    let plan: [(&str, Target, i32, &[usize]); 6] = [
        ("v2.4.0", Target::Emulator, 0, &[0, 1, 2, 3, 4, 5]),
        ("v2.5.0-rc1", Target::Emulator, 5, &[0, 1, 2, 3]),
        ("v2.4.0", Target::Device, 0, &[0, 1, 3, 5]),
        ("v2.5.0-rc1", Target::Device, 5, &[0, 2, 4]),
        ("v2.5.0-rc1", Target::Browserstack, 5, &[0, 1, 2, 3, 4, 5]),
        ("v2.3.9", Target::Browserstack, -5, &[0, 1, 5]),
    ];
    let mut specs = Vec::new();
    for (version, target, prio, which) in plan {
        let app = AppVersionId::new(version).map_err(|e| CliError::Other(e.to_string()))?;
        for &i in which {
            let mut s = JobSpec::new(org.clone(), app.clone(), vec![tests[i].to_string()]);
            s.target = target.clone();
            s.priority = Priority(prio);
            s.labels.insert("source".into(), "demo".into());
            specs.push(s);
        }
    }
    Ok(specs)
}

/// The demo's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    /// From the first submission to the last job's end, seconds.
    pub makespan_s: f64,
    /// No schedule could finish earlier (largest per-pool bound), seconds.
    pub lower_bound_s: f64,
    /// makespan / lower bound.
    pub ratio: f64,
    /// Installs the devices did.
    pub installs: u64,
    /// Distinct (target, build) pairs: the fewest installs possible.
    pub min_installs: u64,
}

/// Computes the figures of finished `jobs` on pools of `devices_per_target` devices with the
/// given install time, and the `installs` the devices actually did. Work per job is the
/// measured attempt time minus the install it paid for (leases here carry one job each).
pub fn figures(
    jobs: &[Job],
    devices_per_target: &BTreeMap<Target, u32>,
    install_ms: u64,
    installs: u64,
) -> Result<Figures> {
    let t0 = jobs.iter().map(|j| j.created_at).min().unwrap_or_default();
    let end = jobs
        .iter()
        .filter_map(|j| j.finished_at)
        .max()
        .unwrap_or(t0);
    let mut by_target: BTreeMap<Target, Vec<BoundJob>> = BTreeMap::new();
    let mut builds = BTreeSet::new();
    for j in jobs {
        builds.insert((j.spec.target.clone(), j.spec.build()));
        let span = report::job_duration_ms(j).unwrap_or(0);
        let work = if j.installed {
            span.saturating_sub(install_ms)
        } else {
            span
        };
        by_target
            .entry(j.spec.target.clone())
            .or_default()
            .push(BoundJob {
                submit: qgjob_core::Time(j.created_at.since(t0)),
                work_ms: work,
                build: j.spec.build(),
            });
    }
    let mut bound = 0f64;
    for (t, js) in &by_target {
        let m = devices_per_target.get(t).copied().unwrap_or(1).max(1);
        let b = lower_bound(m, install_ms, js).map_err(|e| CliError::Other(e.to_string()))?;
        bound = bound.max(b);
    }
    let makespan_s = end.since(t0) as f64 / 1000.0;
    Ok(Figures {
        makespan_s,
        lower_bound_s: bound,
        ratio: if bound > 0.0 { makespan_s / bound } else { 0.0 },
        installs,
        min_installs: builds.len() as u64,
    })
}

/// `qgjob demo`.
pub fn demo(a: &DemoArgs) -> Result<u8> {
    let install_ms = 1_500;
    let opts = ServerOptions {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        // A memory store keeps uploads in memory too: no directory to leave behind when
        // ctrl-c ends the demo at once.
        data_dir: None,
        store: HttpStore::Memory,
        scheduler: SchedulerConfig {
            // Short backoff keeps a retried job inside the demo's few seconds.
            backoff_base_ms: 200,
            backoff_max_ms: 1_000,
            default_install_ms: install_ms,
            default_job_ms: 800,
            ..SchedulerConfig::default()
        },
        ..ServerOptions::default()
    };
    let devs = LabDevices {
        per_target: a.devices.clamp(1, 16),
        install_ms,
        run_ms: 800,
        run_jitter: 0.6,
        scripted: vec![
            ("checkout".to_string(), SimOutcome::Fail),
            ("search".to_string(), SimOutcome::Flaky),
        ],
    };
    let human = !a.json;
    let lab = Lab::start(opts.addr, opts, &devs)?;
    let result = run_demo(&lab, &devs, human);
    // Jobs a failed demo leaves running die with its memory store: nothing to report.
    let stopped = lab.stop(stop_grace(&devs));
    let (jobs, figs, status, run_id) = result?;
    stopped?;
    if a.json {
        let v = serde_json::json!({
            "run_id": run_id,
            "status": status,
            "jobs": jobs.len(),
            "counts": count_states(&jobs),
            "makespan_s": figs.makespan_s,
            "lower_bound_s": figs.lower_bound_s,
            "ratio": figs.ratio,
            "installs": figs.installs,
            "min_installs": figs.min_installs,
        });
        let _ = writeln!(std::io::stdout().lock(), "{v}");
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(report::summary_table(&jobs, use_color()).as_bytes());
        let _ = writeln!(
            o,
            "makespan {:.1} s (lower bound {:.1} s, ratio {:.2}); installs {} (minimum {})",
            figs.makespan_s, figs.lower_bound_s, figs.ratio, figs.installs, figs.min_installs
        );
        let _ = writeln!(
            o,
            "(one failing and one flaky test are part of the demo; `qgjob up` keeps a lab running)"
        );
    }
    Ok(EXIT_OK)
}

fn count_states(jobs: &[Job]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for s in JobState::ALL {
        m.insert(s.as_str(), jobs.iter().filter(|j| j.state == s).count());
    }
    m
}

type DemoResult = (Vec<Job>, Figures, String, String);

fn run_demo(lab: &Lab, devs: &LabDevices, human: bool) -> Result<DemoResult> {
    let client = Client::new(lab.base.clone(), None);
    let specs = demo_specs()?;
    let total = specs.len();
    if human {
        eprintln!(
            "qgjob demo: server on {}, {} simulated devices per target; submitting {total} jobs \
             (3 app versions, emulator/device/browserstack)",
            lab.base, devs.per_target
        );
    }
    let run = client.submit_run(&specs)?;
    let run_id = run.run_id.to_string();
    let bar = (human && use_progress()).then(|| {
        let pb = indicatif::ProgressBar::new(total as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut state: BTreeMap<qgjob_core::JobId, JobState> = BTreeMap::new();
    'outer: loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CliError::Timeout(
                "2 minutes (the demo's jobs did not finish)".into(),
            ));
        }
        let mut stream = client.events(&run_id, true, Some(remaining))?;
        loop {
            let ev = match stream.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(CliError::Timeout(_)) => continue 'outer,
                Err(e) => return Err(e),
            };
            if state.get(&ev.job_id) == Some(&ev.state) {
                continue;
            }
            state.insert(ev.job_id, ev.state);
            let done = state.values().filter(|s| s.is_final()).count();
            if let Some(pb) = &bar {
                pb.set_position(done as u64);
                let n = |s: JobState| state.values().filter(|x| **x == s).count();
                pb.set_message(format!(
                    "{} running, {} passed, {} failed",
                    n(JobState::Running),
                    n(JobState::Passed),
                    n(JobState::Failed)
                ));
            } else if human && ev.state.is_final() {
                eprintln!("[{done:>2}/{total}] job {} {}", ev.job_id, ev.state);
            }
        }
        let view = client.run(&run_id)?;
        if view.jobs.iter().all(|j| j.state.is_final()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    let view = client.run(&run_id)?;
    let installs: u64 = lab.devices.iter().map(|(_, d)| d.stats().installs).sum();
    let mut per_target = BTreeMap::new();
    for (t, _) in &lab.devices {
        *per_target.entry(t.clone()).or_insert(0u32) += 1;
    }
    let figs = figures(&view.jobs, &per_target, devs.install_ms, installs)?;
    Ok((view.jobs, figs, view.status, run_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qgjob_core::{JobId, Time};

    fn job(n: u8, version: &str, target: Target, start: u64, end: u64, installed: bool) -> Job {
        let mut spec = JobSpec::new(
            OrgId::new("acme").unwrap(),
            AppVersionId::new(version).unwrap(),
            vec![format!("t{n}.spec.js")],
        );
        spec.target = target;
        Job {
            id: JobId::from_parts(n as u64, [n; 10]),
            seq: n as u64,
            spec,
            state: JobState::Passed,
            attempt: 1,
            created_at: Time(1_000),
            released_at: Time(1_000),
            started_at: Some(Time(start)),
            finished_at: Some(Time(end)),
            not_before: None,
            device: None,
            lease: None,
            last_lease: None,
            lease_deadline: None,
            installed,
            cancel_requested: false,
            had_failure: false,
            last_error: None,
            outcome: None,
        }
    }

    #[test]
    fn figures_measure_work_without_installs() {
        // One emulator, one build: install 1 s, then two jobs of 2 s each back to back.
        let jobs = vec![
            job(1, "v1", Target::Emulator, 1_000, 4_000, true),
            job(2, "v1", Target::Emulator, 4_000, 6_000, false),
        ];
        let devices = BTreeMap::from([(Target::Emulator, 1)]);
        let f = figures(&jobs, &devices, 1_000, 1).unwrap();
        assert_eq!(f.makespan_s, 5.0);
        // Work 2 s + 2 s plus one install on one device: 5 s, so this schedule is optimal.
        assert_eq!(f.lower_bound_s, 5.0);
        assert_eq!(f.ratio, 1.0);
        assert_eq!((f.installs, f.min_installs), (1, 1));
    }

    #[test]
    fn figures_take_the_slowest_pool_and_count_builds_per_target() {
        let jobs = vec![
            job(1, "v1", Target::Emulator, 1_000, 3_000, true),
            job(2, "v2", Target::Emulator, 3_000, 5_000, true),
            job(3, "v1", Target::Browserstack, 1_000, 2_500, true),
        ];
        let devices = BTreeMap::from([(Target::Emulator, 1), (Target::Browserstack, 1)]);
        let f = figures(&jobs, &devices, 1_000, 3).unwrap();
        assert_eq!(f.makespan_s, 4.0);
        // Emulator pool: 1 s + 1 s of work and two installs on one device = 4 s.
        assert_eq!(f.lower_bound_s, 4.0);
        assert_eq!(f.min_installs, 3);
    }

    /// A lab on a memory store with one simulated device per target whose jobs take
    /// `run_ms`.
    fn small_lab(run_ms: u64) -> Lab {
        let opts = ServerOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: None,
            store: HttpStore::Memory,
            ..ServerOptions::default()
        };
        let devs = LabDevices {
            per_target: 1,
            install_ms: 0,
            run_ms,
            run_jitter: 0.0,
            scripted: Vec::new(),
        };
        Lab::start(opts.addr, opts, &devs).unwrap()
    }

    /// Submits a job to `lab` and waits (bounded) until it runs.
    fn start_job(lab: &Lab) {
        let client = Client::new(lab.base.clone(), None);
        let spec = JobSpec::new(
            OrgId::new("acme").unwrap(),
            AppVersionId::new("v1").unwrap(),
            vec!["t.spec.js".into()],
        );
        let id = client.submit_job(&spec).unwrap().job_id.to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.job(&id).unwrap().state != JobState::Running {
            assert!(Instant::now() < deadline, "the job never started");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_stop_lets_running_jobs_finish_within_the_wait() {
        let lab = small_lab(300);
        start_job(&lab);
        assert_eq!(lab.stop(Duration::from_secs(60)).unwrap(), Stopped::Clean);
    }

    #[test]
    fn a_stop_whose_wait_runs_out_counts_the_jobs_left_running() {
        // A job far longer than the wait.
        let lab = small_lab(600_000);
        start_job(&lab);
        assert_eq!(
            lab.stop(Duration::from_millis(300)).unwrap(),
            Stopped::JobsLeft(Some(1))
        );
    }

    #[test]
    fn the_stop_wait_covers_a_whole_simulated_job_and_says_what_was_left() {
        let devs = |install_ms, run_ms| LabDevices {
            per_target: 1,
            install_ms,
            run_ms,
            run_jitter: 0.3,
            scripted: Vec::new(),
        };
        assert_eq!(stop_grace(&devs(2_000, 1_000)), Duration::from_secs(10));
        // 30 s install + 60 s × 1.3 + 5 s to report.
        assert_eq!(stop_grace(&devs(30_000, 60_000)), Duration::from_secs(113));
        assert_eq!(
            jobs_left(Some(1), "10.0s"),
            "stopped after waiting 10.0s: 1 job still running was left behind (it is retried \
             when the server next runs)"
        );
        assert_eq!(
            jobs_left(Some(3), "10.0s"),
            "stopped after waiting 10.0s: 3 jobs still running were left behind (they are \
             retried when the server next runs)"
        );
        assert!(jobs_left(None, "1m25s").starts_with("stopped after waiting 1m25s: jobs "));
    }

    #[test]
    fn store_flags_pick_one_store_or_are_refused_naming_both() {
        use StoreKind::{Embedded, Memory, Postgres};
        let url = Some("postgres://qgjob@db/qgjob");
        assert_eq!(store_kind(None, None).unwrap(), Embedded);
        assert_eq!(store_kind(None, Some("")).unwrap(), Embedded);
        assert_eq!(store_kind(None, url).unwrap(), Postgres);
        assert_eq!(store_kind(Some(Embedded), None).unwrap(), Embedded);
        assert_eq!(store_kind(Some(Memory), None).unwrap(), Memory);
        assert_eq!(store_kind(Some(Postgres), url).unwrap(), Postgres);
        let e = store_kind(Some(Postgres), None).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--database-url"), "{e}");
        for (kind, name) in [(Memory, "memory"), (Embedded, "embedded")] {
            let e = store_kind(Some(kind), url).unwrap_err();
            assert_eq!(e.exit_code(), 2);
            let m = e.to_string();
            assert!(
                m.starts_with(&format!("--store {name} and --database-url")),
                "{m}"
            );
        }
    }

    #[test]
    fn demo_run_covers_every_target_several_versions_and_the_scripted_tests() {
        let specs = demo_specs().unwrap();
        assert!((20..=40).contains(&specs.len()));
        for t in TARGETS {
            assert!(specs.iter().any(|s| s.target == t));
        }
        let versions: BTreeSet<&str> = specs.iter().map(|s| s.app_version_id.as_str()).collect();
        assert!(versions.len() >= 3);
        assert!(specs.iter().any(|s| s.tests[0].contains("checkout")));
        assert!(specs.iter().any(|s| s.tests[0].contains("search")));
        for s in &specs {
            s.validate().unwrap();
        }
    }
}
