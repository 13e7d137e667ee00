//! `qgjob agent`: runs devices (simulated ones with `--simulate`) against a server through
//! [`HttpLink`], until ctrl-c or SIGTERM (a second one stops at once).
//!
//! A device the server refuses to register (a missing or wrong token, a bad description)
//! ends the command at once with that error (exit 2); an unreachable server is retried, with
//! a warning now and then so the agent is not silent.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qgjob_core::agent::{Agent, AgentConfig, AgentError, AgentStats, Shutdown};
use qgjob_core::device::Device;
use qgjob_core::simdevice::{SimDevice, SimDeviceConfig, SimOutcome};
use qgjob_core::{DeviceId, Target};

use crate::cli::AgentArgs;
use crate::client::Client;
use crate::error::{CliError, Result, EXIT_OK};
use crate::link::HttpLink;

/// How simulated devices of one target behave.
#[derive(Debug, Clone)]
pub struct SimSpec {
    /// Prefix of the device ids.
    pub name: String,
    /// Their pool.
    pub target: Target,
    /// How many.
    pub devices: u32,
    /// Install time, ms.
    pub install_ms: u64,
    /// Run time per job, ms.
    pub run_ms: u64,
    /// Run-time jitter fraction.
    pub run_jitter: f64,
    /// Chance a job fails a test.
    pub fail_rate: f64,
    /// Chance a job passes only on a retry.
    pub flaky_rate: f64,
    /// Chance of an infrastructure failure.
    pub infra_error_rate: f64,
    /// Seed (each device gets its own derived from it).
    pub seed: u64,
    /// Fixed outcomes by test-path pattern.
    pub scripted: Vec<(String, SimOutcome)>,
}

/// Builds the simulated devices of `spec`.
pub fn sim_devices(spec: &SimSpec) -> Result<Vec<Arc<dyn Device>>> {
    let mut out: Vec<Arc<dyn Device>> = Vec::new();
    for i in 1..=spec.devices {
        let id = DeviceId::new(format!("{}/{}-{i}", spec.name, spec.target)).map_err(|e| {
            CliError::Usage(format!("invalid agent name {:?}: {}", spec.name, e.message))
        })?;
        let mut cfg = SimDeviceConfig::new(id, spec.target.clone());
        cfg.install_ms = spec.install_ms;
        cfg.run_ms = spec.run_ms;
        cfg.run_jitter = spec.run_jitter;
        cfg.fail_rate = spec.fail_rate;
        cfg.flaky_rate = spec.flaky_rate;
        cfg.infra_error_rate = spec.infra_error_rate;
        cfg.seed = spec.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        cfg.scripted = spec.scripted.clone();
        out.push(Arc::new(SimDevice::new(cfg)));
    }
    Ok(out)
}

/// Waits until the server answers its health check. An agent may well start before its
/// server (both at boot), and must outlive the server anyway, so an unreachable server, or a
/// proxy in front of it answering 5xx, 408 or 429 while it is down, is retried with a
/// warning now and then (ctrl-c stops the agent meanwhile); anything else (a certificate the
/// agent does not trust, a URL that is not a qgjob server's) ends it. Returns the health
/// answer.
fn wait_for_server(client: &Client) -> Result<serde_json::Value> {
    let mut warned: Option<Instant> = None;
    loop {
        match client.health() {
            Ok(health) => return Ok(health),
            Err(
                e @ (CliError::Unreachable { .. }
                | CliError::Api {
                    status: 408 | 429 | 500..=599,
                    ..
                }),
            ) => {
                if warned.is_none_or(|t| t.elapsed() >= Watch::WARN_EVERY) {
                    eprintln!("warning: {e}; retrying until it answers (ctrl-c to stop)");
                    warned = Some(Instant::now());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a refused registration (`device_held`) is retried: a device's previous agent
/// counts as in touch for one lease TTL after it was last heard from, so twice the
/// server's TTL (from its health answer), and never less than the default. A server that
/// does not say (a standby, an older release) gets the default.
fn held_patience(health: &serde_json::Value) -> Duration {
    let default = AgentConfig::default().held_patience;
    health["lease_ttl_ms"].as_u64().map_or(default, |ttl| {
        default.max(Duration::from_millis(ttl.saturating_mul(2)))
    })
}

/// The longest agent name: a device id (at most 128 characters) is the agent's name, `/`
/// and the device's own part (an adb serial, `emulator-12`), which needs room too.
const AGENT_NAME_MAX: usize = 64;

/// The agent's name: `--name`, else the host's ([`default_agent_name`]). A name given is
/// checked on its own, not only inside the device ids it starts (where an empty one made
/// devices `/emulator-1`): 1 to 64 of the characters a device id may hold, except `/`, which
/// separates the agent's name from the device's part.
fn agent_name(given: Option<&str>) -> Result<String> {
    let Some(name) = given else {
        return Ok(default_agent_name());
    };
    if name.len() > AGENT_NAME_MAX || name.contains('/') || DeviceId::new(name).is_err() {
        return Err(CliError::Usage(format!(
            "invalid agent name {name:?}: --name must be 1 to {AGENT_NAME_MAX} letters, digits \
             and . _ - : @"
        )));
    }
    Ok(name.to_string())
}

/// A device-id-safe name for this machine (a valid `agent_name`).
pub fn default_agent_name() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    let clean: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if clean.is_empty() {
        "agent".into()
    } else {
        clean
    }
}

/// A simulated duration flag (`--install-s`, `--run-s`) in milliseconds; refuses what is not
/// a number of seconds from 0 to a day (NaN, infinities, negatives), so a typo is not run
/// as something else. `agent --simulate` and `up` share it, and so the same limits.
pub(crate) fn secs_to_ms(s: f64, what: &str) -> Result<u64> {
    if !s.is_finite() || !(0.0..=86_400.0).contains(&s) {
        return Err(CliError::Usage(format!(
            "{what} must be between 0 and 86400 seconds"
        )));
    }
    Ok((s * 1000.0).round() as u64)
}

/// Ctrl-c and SIGTERM, caught from the moment this is made (so one sent while the agent is
/// busy stopping is not lost), one [`StopListener::recv`] per signal.
struct StopListener {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl StopListener {
    /// Starts listening; must be called inside the runtime.
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            StopListener {
                int: signal(SignalKind::interrupt()).ok(),
                term: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            StopListener {}
        }
    }

    /// Resolves at the next signal.
    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            match (&mut self.int, &mut self.term) {
                (Some(i), Some(t)) => {
                    tokio::select! {
                        _ = i.recv() => {}
                        _ = t.recv() => {}
                    }
                }
                (Some(i), None) => {
                    let _ = i.recv().await;
                }
                (None, Some(t)) => {
                    let _ = t.recv().await;
                }
                (None, None) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How a run stopped by [`run_until_stopped`] ended, as far as the command is concerned.
pub(crate) enum Ended<T> {
    /// The run returned (after a shutdown, or on its own, say with an error).
    Returned(T),
    /// A second stop signal came while it was still finishing.
    Forced,
}

/// Runs `run` until it returns or a stop signal arrives; then prints `stopping` (what the
/// command now waits for), fires `stop` and waits for `run` to finish, unless a second
/// signal asks to stop at once. `tick` runs every 200 ms meanwhile (for the banner and
/// warnings). `qgjob agent` and `qgjob up` stop this way.
pub(crate) async fn run_until_stopped<T>(
    run: impl Future<Output = T>,
    stop: &Shutdown,
    stopping: &str,
    mut tick: impl FnMut(),
) -> Ended<T> {
    tokio::pin!(run);
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut signals = StopListener::new();
    loop {
        tokio::select! {
            r = &mut run => return Ended::Returned(r),
            () = signals.recv() => break,
            _ = ticks.tick() => tick(),
        }
    }
    eprintln!("{stopping}");
    stop.trigger();
    // Keep listening: tokio catches SIGINT/SIGTERM for good once asked to, so without this
    // a second signal would do nothing at all.
    loop {
        tokio::select! {
            r = &mut run => return Ended::Returned(r),
            () = signals.recv() => return Ended::Forced,
            _ = ticks.tick() => tick(),
        }
    }
}

/// What the agent says as it starts to stop.
const AGENT_STOPPING: &str =
    "qgjob agent: stopping (finishing running jobs; ctrl-c again to stop at once)";

/// What a command says after a forced stop; `retried` says when the abandoned jobs run again.
pub(crate) fn forced(retried: &str) -> CliError {
    CliError::Other(format!(
        "stopped at once: running jobs were abandoned ({retried})"
    ))
}

/// When the jobs an agent abandons run again.
const AGENT_RETRIED: &str = "the server retries them when their leases expire";

/// An agent error as a command error: a refused registration is the operator's to fix (a
/// token, a device description), so a usage error; anything else is infrastructure.
fn agent_error(e: AgentError) -> CliError {
    match e {
        AgentError::Register { ref message, .. } if message.contains(HELD) => CliError::Usage(
            format!("{e}; is another agent running under the same --name? Give each its own"),
        ),
        AgentError::Register { .. } => CliError::Usage(e.to_string()),
        AgentError::Panicked(_) => CliError::Other(e.to_string()),
    }
}

/// What the server says of a device another agent session holds.
const HELD: &str = "registered by another agent";

/// Watches an agent's counters from the command: prints the banner once every device has
/// registered, and a warning (at most every [`Watch::WARN_EVERY`]) while requests to the
/// server fail and are retried, so an agent waiting for its server is not silent.
struct Watch {
    stats: Arc<AgentStats>,
    devices: u64,
    banner: Option<String>,
    errors_seen: u64,
    last_warning: Option<Instant>,
    unhealthy_seen: u64,
    held_seen: bool,
}

impl Watch {
    const WARN_EVERY: Duration = Duration::from_secs(10);

    fn new(stats: Arc<AgentStats>, devices: u64, banner: Option<String>) -> Self {
        Watch {
            stats,
            devices,
            banner,
            errors_seen: 0,
            last_warning: None,
            unhealthy_seen: 0,
            held_seen: false,
        }
    }

    fn check(&mut self) {
        let c = self.stats.snapshot();
        if c.held > 0 && !self.held_seen {
            let last = self.stats.last_error().unwrap_or_default();
            let last = last
                .strip_prefix("held by another agent: ")
                .unwrap_or(&last);
            eprintln!(
                "warning: {last}; waiting for it (an agent killed a moment ago lets go within \
                 that time, another running agent under this --name never does)"
            );
            self.held_seen = true;
        }
        if c.unhealthy > self.unhealthy_seen {
            eprintln!(
                "warning: a device is not ready (for adb: not listed, or not in state \
                 `device`); it takes no jobs until it is"
            );
            self.unhealthy_seen = c.unhealthy;
        }
        if c.registrations >= self.devices {
            if let Some(b) = self.banner.take() {
                eprintln!("{b}");
            }
        }
        if c.transport_errors > self.errors_seen
            && self
                .last_warning
                .is_none_or(|t| t.elapsed() >= Self::WARN_EVERY)
        {
            let new = c.transport_errors - self.errors_seen;
            let last = self.stats.last_error().unwrap_or_default();
            let last = last.strip_prefix("transport error: ").unwrap_or(&last);
            eprintln!(
                "warning: {new} request{} to the server failed, retrying: {last}",
                if new == 1 { "" } else { "s" }
            );
            self.errors_seen = c.transport_errors;
            self.last_warning = Some(Instant::now());
        }
    }
}

/// Ends `rt` without waiting for its blocking threads: a long poll the agent abandoned on
/// shutdown may hold one for up to its whole wait, and its answer is no longer wanted.
/// `settle` is how long tasks still running may take to be dropped (real devices kill their
/// test commands when dropped); zero when nothing is left that needs it.
pub(crate) fn drop_runtime(rt: tokio::runtime::Runtime, settle: Duration) {
    if settle.is_zero() {
        rt.shutdown_background();
    } else {
        rt.shutdown_timeout(settle);
    }
}

/// A multi-threaded runtime for the long-running commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Each agent device may hold three blocking HTTP calls at once (a long poll of up
        // to 20 s, a heartbeat, a report). Past tokio's default of 512 threads, the
        // heartbeats of a big agent queued behind idle devices' polls. Threads are made
        // only when needed and leave after 10 s idle.
        .max_blocking_threads(4096)
        .build()
        .map_err(|e| CliError::io("starting the async runtime", e))
}

/// `qgjob agent`.
pub fn agent(client: Client, a: &AgentArgs) -> Result<u8> {
    if !a.simulate {
        return real_agent(client, a);
    }
    if a.max_batch == 0 || a.max_batch > 64 {
        return Err(CliError::Usage(
            "--max-batch must be between 1 and 64".into(),
        ));
    }
    let spec = SimSpec {
        name: agent_name(a.name.as_deref())?,
        target: a
            .target
            .parse()
            .map_err(|e: qgjob_core::InvalidSpec| CliError::Usage(e.message))?,
        devices: a.devices,
        install_ms: secs_to_ms(a.install_s, "--install-s")?,
        run_ms: secs_to_ms(a.run_s, "--run-s")?,
        run_jitter: 0.2,
        fail_rate: a.fail_rate,
        flaky_rate: a.flaky_rate,
        infra_error_rate: a.infra_fail_rate,
        seed: a.seed,
        scripted: Vec::new(),
    };
    if spec.devices == 0 || spec.devices > 1000 {
        return Err(CliError::Usage(
            "--devices must be between 1 and 1000".into(),
        ));
    }
    let devices = sim_devices(&spec)?;
    let health = wait_for_server(&client)?;
    let rt = runtime()?;
    let base = client.servers();
    let link = Arc::new(HttpLink::new(client));
    let cfg = AgentConfig {
        max_batch: a.max_batch,
        lease_wait: Duration::from_secs(20),
        held_patience: held_patience(&health),
        ..AgentConfig::default()
    };
    let mut agent = Agent::new(link, cfg);
    for d in devices {
        agent.add_device(d);
    }
    // Announced only once the server has taken every device: until then a refused token
    // ends the command, and an unreachable server gets warnings instead.
    let banner = format!(
        "qgjob agent {}: {} simulated device{} for target {} serving {base} (ctrl-c to stop)",
        spec.name,
        spec.devices,
        if spec.devices == 1 { "" } else { "s" },
        spec.target
    );
    let mut watch = Watch::new(agent.stats(), u64::from(spec.devices), Some(banner));
    let ended = rt.block_on(async move {
        let shutdown = Shutdown::new();
        let mut run = tokio::spawn(agent.run(shutdown.signal()));
        let ended = run_until_stopped(&mut run, &shutdown, AGENT_STOPPING, || watch.check()).await;
        if matches!(ended, Ended::Forced) {
            run.abort();
        }
        ended
    });
    // Simulated devices leave nothing behind, even when stopped at once.
    drop_runtime(rt, Duration::ZERO);
    match ended {
        Ended::Returned(Ok(Ok(c))) => {
            eprintln!("{}, {} installs", closing_line(&c), c.installs);
            Ok(EXIT_OK)
        }
        Ended::Returned(Ok(Err(e))) => Err(agent_error(e)),
        Ended::Returned(Err(e)) => Err(CliError::Other(format!("agent task failed: {e}"))),
        Ended::Forced => Err(forced(AGENT_RETRIED)),
    }
}

/// What the agent says when it stops: the jobs it reported, and the results it could not
/// deliver (the scheduler was unreachable until the end), if any.
fn closing_line(c: &qgjob_core::agent::AgentCounters) -> String {
    let mut s = format!(
        "qgjob agent: stopped after {} jobs ({} passed, {} failed, ",
        c.jobs_run, c.passed, c.failed
    );
    if c.canceled > 0 {
        s.push_str(&format!("{} canceled, ", c.canceled));
    }
    s.push_str(&format!("{} infra failures)", c.infra_failures));
    if c.unreported > 0 {
        s.push_str(&format!(
            "; {} results could not be reported (the server runs those jobs again)",
            c.unreported
        ));
    }
    s
}

/// `qgjob agent` without `--simulate`: adb devices or BrowserStack sessions.
fn real_agent(client: Client, a: &AgentArgs) -> Result<u8> {
    use crate::real::{run_real_agent, RealError};
    if a.max_batch == 0 || a.max_batch > 64 {
        return Err(CliError::Usage(
            "--max-batch must be between 1 and 64".into(),
        ));
    }
    let target: Target = a
        .target
        .parse()
        .map_err(|e: qgjob_core::InvalidSpec| CliError::Usage(e.message))?;
    let name = agent_name(a.name.as_deref())?;
    let health = wait_for_server(&client)?;
    let base = client.servers();
    let artifacts = client.clone();
    let link: Arc<dyn qgjob_core::agent::AgentLink> = Arc::new(HttpLink::new(client));
    let cfg = AgentConfig {
        max_batch: a.max_batch,
        lease_wait: Duration::from_secs(20),
        held_patience: held_patience(&health),
        ..AgentConfig::default()
    };
    let rt = runtime()?;
    // The devices are found (adb) or made (BrowserStack) inside the run; the banner waits
    // until every one of them has registered, as for simulated devices.
    let started = std::sync::OnceLock::new();
    let mut watch: Option<Watch> = None;
    let ended = rt.block_on(async {
        let shutdown = Shutdown::new();
        let run = run_real_agent(
            link,
            artifacts,
            &target,
            &name,
            &a.real,
            cfg,
            shutdown.signal(),
            &started,
        );
        // Dropping `run` on a forced stop drops its device tasks, and with them the test
        // commands' process-group guards, which kill what is still running.
        run_until_stopped(run, &shutdown, AGENT_STOPPING, || {
            if watch.is_none() {
                if let Some((stats, n)) = started.get() {
                    let banner = format!(
                        "qgjob agent {name}: {n} {target} device{} serving {base} (ctrl-c to stop)",
                        if *n == 1 { "" } else { "s" }
                    );
                    watch = Some(Watch::new(Arc::clone(stats), *n, Some(banner)));
                }
            }
            if let Some(w) = watch.as_mut() {
                w.check();
            }
        })
        .await
    });
    let settle = if matches!(ended, Ended::Forced) {
        Duration::from_secs(1)
    } else {
        Duration::ZERO
    };
    drop_runtime(rt, settle);
    let res = match ended {
        Ended::Returned(r) => r,
        Ended::Forced => return Err(forced(AGENT_RETRIED)),
    };
    match res {
        Ok(c) => {
            // Installs are counted by the devices' own summary above (adb installs, uploads):
            // a real device may install while it runs, which the lease does not see.
            eprintln!("{}", closing_line(&c));
            Ok(EXIT_OK)
        }
        // Setup problems the operator must fix are usage errors; the rest is infrastructure.
        Err(
            e @ (RealError::Command(_)
            | RealError::NoDevices(_)
            | RealError::Credentials
            | RealError::Unsupported(_)
            | RealError::Invalid(_)
            | RealError::Cache(crate::real::cache::ArtifactError::InUse { .. })),
        ) => Err(CliError::Usage(e.to_string())),
        Err(RealError::Agent(e)) => Err(agent_error(e)),
        Err(e) => Err(CliError::Other(e.to_string())),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn patience_with_a_held_device_follows_the_servers_lease_ttl() {
        use serde_json::json;
        let default = AgentConfig::default().held_patience;
        assert_eq!(super::held_patience(&json!({"status": "standby"})), default);
        assert_eq!(
            super::held_patience(&json!({"lease_ttl_ms": 30_000})),
            default
        );
        assert_eq!(
            super::held_patience(&json!({"lease_ttl_ms": 120_000})),
            Duration::from_secs(240)
        );
    }

    use super::*;

    #[test]
    fn an_agent_name_must_start_device_ids_on_its_own() {
        for ok in [
            "lab1",
            "ci-runner_2.local",
            "a",
            "user@host:1",
            &"x".repeat(64),
        ] {
            assert_eq!(agent_name(Some(ok)).unwrap(), ok);
        }
        for bad in ["", "lab/1", "/", "my lab", "caf\u{e9}", &"x".repeat(65)] {
            let e = agent_name(Some(bad)).unwrap_err();
            assert_eq!(e.exit_code(), crate::error::EXIT_USAGE, "{bad:?}");
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid agent name {bad:?}: --name must be 1 to 64 letters, digits and \
                     . _ - : @"
                )
            );
        }
        // The host's name, when none is given, is always a valid one.
        let host = agent_name(None).unwrap();
        assert_eq!(agent_name(Some(&host)).unwrap(), host);
    }

    #[test]
    fn the_closing_line_names_cancels_and_undelivered_results_only_when_there_are_some() {
        let mut c = qgjob_core::agent::AgentCounters {
            jobs_run: 3,
            passed: 2,
            failed: 1,
            ..qgjob_core::agent::AgentCounters::default()
        };
        assert_eq!(
            closing_line(&c),
            "qgjob agent: stopped after 3 jobs (2 passed, 1 failed, 0 infra failures)"
        );
        c.canceled = 1;
        c.unreported = 2;
        assert_eq!(
            closing_line(&c),
            "qgjob agent: stopped after 3 jobs (2 passed, 1 failed, 1 canceled, 0 infra failures); \
             2 results could not be reported (the server runs those jobs again)"
        );
    }
}
