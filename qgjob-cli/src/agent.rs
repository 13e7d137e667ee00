//! `qgjob agent`: runs devices (simulated ones with `--simulate`) against a server through
//! [`HttpLink`], until ctrl-c or SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use qgjob_core::agent::{Agent, AgentConfig, Shutdown};
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

/// A device-id-safe name for this machine.
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

fn secs_to_ms(s: f64, what: &str) -> Result<u64> {
    if !s.is_finite() || !(0.0..=86_400.0).contains(&s) {
        return Err(CliError::Usage(format!(
            "{what} must be between 0 and 86400 seconds"
        )));
    }
    Ok((s * 1000.0).round() as u64)
}

/// Resolves when ctrl-c or SIGTERM arrives.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut t) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = t.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A multi-threaded runtime for the long-running commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
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
        name: a.name.clone().unwrap_or_else(default_agent_name),
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
    // Fail fast with a clean message when the server is not there at all.
    client.health()?;
    let rt = runtime()?;
    let base = client.base().to_string();
    let link = Arc::new(HttpLink::new(client));
    let cfg = AgentConfig {
        max_batch: a.max_batch,
        lease_wait: Duration::from_secs(20),
        ..AgentConfig::default()
    };
    let mut agent = Agent::new(link, cfg);
    for d in devices {
        agent.add_device(d);
    }
    eprintln!(
        "qgjob agent {}: {} simulated {} device{} serving {base} (ctrl-c to stop)",
        spec.name,
        spec.devices,
        spec.target,
        if spec.devices == 1 { "" } else { "s" }
    );
    let counters = rt.block_on(async move {
        let shutdown = Shutdown::new();
        let run = tokio::spawn(agent.run(shutdown.signal()));
        stop_signal().await;
        eprintln!("qgjob agent: stopping (finishing running jobs)");
        shutdown.trigger();
        run.await
    });
    match counters {
        Ok(Ok(c)) => {
            eprintln!(
                "qgjob agent: stopped after {} jobs ({} passed, {} failed, {} infra failures), {} installs",
                c.jobs_run, c.passed, c.failed, c.infra_failures, c.installs
            );
            Ok(EXIT_OK)
        }
        Ok(Err(e)) => Err(CliError::Other(e.to_string())),
        Err(e) => Err(CliError::Other(format!("agent task failed: {e}"))),
    }
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
    let name = a.name.clone().unwrap_or_else(default_agent_name);
    client.health()?;
    let base = client.base().to_string();
    let token = client.token().map(String::from);
    let link: Arc<dyn qgjob_core::agent::AgentLink> = Arc::new(HttpLink::new(client));
    let cfg = AgentConfig {
        max_batch: a.max_batch,
        lease_wait: Duration::from_secs(20),
        ..AgentConfig::default()
    };
    let rt = runtime()?;
    eprintln!("qgjob agent {name}: {target} devices serving {base} (ctrl-c to stop)");
    let res = rt.block_on(async move {
        let shutdown = Shutdown::new();
        let run = run_real_agent(
            link,
            &base,
            token,
            &target,
            &name,
            &a.real,
            cfg,
            shutdown.signal(),
        );
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r,
            _ = stop_signal() => {
                eprintln!("qgjob agent: stopping (finishing running jobs)");
                shutdown.trigger();
                run.await
            }
        }
    });
    match res {
        Ok(c) => {
            eprintln!(
                "qgjob agent: stopped after {} jobs ({} passed, {} failed, {} infra failures), {} installs",
                c.jobs_run, c.passed, c.failed, c.infra_failures, c.installs
            );
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
        Err(e) => Err(CliError::Other(e.to_string())),
    }
}
