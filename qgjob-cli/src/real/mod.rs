//! Real devices for `qgjob agent`: the AppWright command runner, Android (adb) devices and
//! BrowserStack sessions.
//!
//! Every real device runs each job the same way ([`exec::JobRunner`]): the job's test
//! bundle is fetched by hash from the server, verified, cached ([`cache`]) and unpacked
//! safely ([`bundle`]), its npm dependencies installed once per bundle hash; a fresh work
//! dir gets a copy; the test command (default [`runner::DEFAULT_COMMAND`], i.e.
//! `npx appwright test {test_filters} --project {project} --reporter=json --output {output}`)
//! runs there in its own process group, its output streamed to the server as the job's
//! log; timeout and cancel
//! kill the whole group; Playwright's JSON report ([`playwright`]) gives per-test results.
//!
//! Environment of the test command (the agent's own, without its secrets: see
//! [`runner::SCRUBBED_ENV`]; BrowserStack devices pass the account's credentials back in,
//! for AppWright's sessions), plus:
//!
//! | variable | value |
//! |---|---|
//! | `QGJOB_JOB_ID`, `QGJOB_ATTEMPT` | the job and its attempt (1-based) |
//! | `QGJOB_JOB_IDS` | all jobs of a shared run (see below), comma-separated |
//! | `QGJOB_TARGET` | `emulator`, `device` or `browserstack` |
//! | `QGJOB_PROJECT` | the AppWright project (`--project`, default: the target's name) |
//! | `QGJOB_ORG_ID`, `QGJOB_APP_VERSION_ID` | the build under test |
//! | `QGJOB_DEVICE_SERIAL` | adb serial (`ANDROID_SERIAL` too), or the BrowserStack slot id |
//! | `QGJOB_BUILD_PATH` | the local APK (adb), or the `bs://` app URL (BrowserStack) |
//! | `QGJOB_APP_URL` | the `bs://` app URL (BrowserStack only) |
//! | `PLAYWRIGHT_JSON_OUTPUT_NAME` | where the JSON report is written |
//! | `CI=1`, `FORCE_COLOR=0` | plain, non-interactive output |
//! | `QGJOB_AGENT_DIR` | the agent's cache dir: a restarted agent kills what a killed one left running ([`reap`]) |
//!
//! A lease of several jobs (`--max-batch`) on an adb device runs them in one invocation of
//! the test command when they share a bundle and name distinct spec files, saving the
//! runner's start-up per job; results are split by spec file, and anything that cannot be
//! attributed falls back to one run per job ([`exec::JobRunner::run_batch`]).
//!
//! Targets: `emulator` and `device` ([`adb`]; iOS is not implemented), `browserstack`
//! ([`browserstack`]). [`run_real_agent`] is what `qgjob agent` calls without `--simulate`.

pub mod adb;
pub mod browserstack;
pub mod bundle;
pub mod cache;
pub mod exec;
pub mod link;
pub mod playwright;
pub mod reap;
pub mod runner;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qgjob_core::agent::{Agent, AgentConfig, AgentCounters, AgentLink, ShutdownSignal};
use qgjob_core::device::Device;
use qgjob_core::Target;
use thiserror::Error;

use cache::{ArtifactCache, ArtifactSource, NpmConfig};
use exec::{JobRunner, LogSink, SelfTimed};
use runner::{CommandTemplate, TemplateError};

/// Flags of `qgjob agent` for real devices (flatten them into the agent's arguments).
#[derive(Clone, clap::Args)]
pub struct RealArgs {
    /// adb serial of a device to drive (repeatable); default: every device `adb devices`
    /// lists for the target (emulator-* for emulator, the others for device).
    #[arg(long = "serial", value_name = "SERIAL")]
    pub serials: Vec<String>,
    /// The adb program.
    #[arg(long, env = "QGJOB_ADB", default_value = "adb", value_name = "PATH")]
    pub adb: PathBuf,
    /// Test command; {test_filters} becomes one exact Playwright filter per spec file of the
    /// job (Playwright reads bare file arguments as patterns), {tests} the spec files as
    /// they are (for commands that are not Playwright), {project} the project name, {output}
    /// a folder of the job's own for the runner's artifacts (pass it as Playwright's
    /// `--output` when jobs share a --project-dir).
    #[arg(long, value_name = "TEMPLATE", default_value = runner::DEFAULT_COMMAND)]
    pub command: String,
    /// AppWright project to run (default: the target's name).
    #[arg(long, value_name = "NAME")]
    pub project: Option<String>,
    /// Where jobs without a test bundle run (a checkout of the tests on this machine).
    #[arg(long, value_name = "DIR")]
    pub project_dir: Option<PathBuf>,
    /// BrowserStack: sessions run at once (one device slot each).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub parallel: usize,
    /// BrowserStack API base URL.
    #[arg(
        long,
        env = "QGJOB_BROWSERSTACK_URL",
        default_value = browserstack::DEFAULT_BASE_URL,
        value_name = "URL"
    )]
    pub browserstack_url: String,
    /// BrowserStack user name.
    #[arg(long, env = "BROWSERSTACK_USERNAME", value_name = "USER")]
    pub browserstack_username: Option<String>,
    /// BrowserStack access key (prefer the environment variable: flags show in `ps`).
    #[arg(
        long,
        env = "BROWSERSTACK_ACCESS_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub browserstack_access_key: Option<String>,
    /// BrowserStack: output that means the app URL expired (repeatable; added to the
    /// built-in BROWSERSTACK_APP_EXPIRED, BROWSERSTACK_INVALID_APP_CAP...).
    #[arg(long = "browserstack-expired-marker", value_name = "TEXT")]
    pub browserstack_expired_markers: Vec<String>,
    /// BrowserStack: re-upload an app once its URL is older than this many hours.
    #[arg(long, default_value_t = 29 * 24, value_name = "HOURS")]
    pub app_ttl_hours: u64,
    /// Where builds, bundles and work dirs are kept.
    #[arg(
        long,
        env = "QGJOB_CACHE_DIR",
        default_value = "qgjob-agent-cache",
        value_name = "DIR"
    )]
    pub cache_dir: PathBuf,
    /// Most megabytes of builds and bundles kept (least recently used go first).
    #[arg(long, default_value_t = 10_240, value_name = "MB")]
    pub cache_max_mb: u64,
    /// Seconds between SIGTERM and SIGKILL when a job times out or is canceled.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub kill_grace_s: f64,
    /// Don't run `npm ci`/`npm install` in test bundles.
    #[arg(long)]
    pub no_npm: bool,
}

impl std::fmt::Debug for RealArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The access key never reaches a log line.
        f.debug_struct("RealArgs")
            .field("serials", &self.serials)
            .field("adb", &self.adb)
            .field("command", &self.command)
            .field("project", &self.project)
            .field("project_dir", &self.project_dir)
            .field("parallel", &self.parallel)
            .field("browserstack_url", &self.browserstack_url)
            .field("browserstack_username", &self.browserstack_username)
            .field(
                "browserstack_access_key",
                &self.browserstack_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "browserstack_expired_markers",
                &self.browserstack_expired_markers,
            )
            .field("app_ttl_hours", &self.app_ttl_hours)
            .field("cache_dir", &self.cache_dir)
            .field("cache_max_mb", &self.cache_max_mb)
            .field("kill_grace_s", &self.kill_grace_s)
            .field("no_npm", &self.no_npm)
            .finish()
    }
}

impl Default for RealArgs {
    fn default() -> Self {
        RealArgs {
            serials: Vec::new(),
            adb: PathBuf::from("adb"),
            command: runner::DEFAULT_COMMAND.to_string(),
            project: None,
            project_dir: None,
            parallel: 1,
            browserstack_url: browserstack::DEFAULT_BASE_URL.to_string(),
            browserstack_username: None,
            browserstack_access_key: None,
            browserstack_expired_markers: Vec::new(),
            app_ttl_hours: 29 * 24,
            cache_dir: PathBuf::from("qgjob-agent-cache"),
            cache_max_mb: 10_240,
            kill_grace_s: 10.0,
            no_npm: false,
        }
    }
}

/// Why real devices could not be set up.
#[derive(Debug, Error)]
pub enum RealError {
    /// The test command is malformed.
    #[error("--command: {0}")]
    Command(#[from] TemplateError),
    /// adb failed.
    #[error(transparent)]
    Adb(#[from] adb::AdbError),
    /// No device to drive.
    #[error("no {0} found: pass --serial or start one (adb devices lists none)")]
    NoDevices(Target),
    /// BrowserStack credentials are missing.
    #[error("set BROWSERSTACK_USERNAME and BROWSERSTACK_ACCESS_KEY for --target browserstack")]
    Credentials,
    /// The cache dir cannot be used.
    #[error(transparent)]
    Cache(#[from] cache::ArtifactError),
    /// The target has no real device implementation.
    #[error("no real devices for target {0} (use --simulate)")]
    Unsupported(Target),
    /// A bad option value.
    #[error("{0}")]
    Invalid(String),
    /// The agent stopped with an error.
    #[error(transparent)]
    Agent(#[from] qgjob_core::agent::AgentError),
}

/// The devices built for an agent, with the shared state worth watching.
pub struct RealDevices {
    /// The devices, to add to an [`Agent`].
    pub devices: Vec<Arc<dyn Device>>,
    /// The artifact cache.
    pub cache: Arc<ArtifactCache>,
    /// adb install counters.
    pub installs: Arc<adb::InstallStats>,
    /// BrowserStack uploads and sessions (for `--target browserstack`).
    pub browserstack: Option<Arc<browserstack::Shared>>,
}

/// Builds the real devices of `target` for agent `agent_name`.
pub async fn build_devices(
    target: &Target,
    agent_name: &str,
    args: &RealArgs,
    source: Arc<dyn ArtifactSource>,
    logs: Arc<dyn LogSink>,
) -> Result<RealDevices, RealError> {
    let command = CommandTemplate::parse(&args.command)?;
    if !(args.kill_grace_s.is_finite() && args.kill_grace_s >= 0.0) {
        return Err(RealError::Invalid("--kill-grace-s must be >= 0".into()));
    }
    let cache = ArtifactCache::open(
        &args.cache_dir,
        args.cache_max_mb.saturating_mul(1 << 20),
        source,
        NpmConfig {
            enabled: !args.no_npm,
            ..NpmConfig::default()
        },
    )?;
    let runner = Arc::new(JobRunner {
        cache: Arc::clone(&cache),
        command,
        project: args.project.clone(),
        project_dir: args.project_dir.clone(),
        logs,
        kill_grace: Duration::from_secs_f64(args.kill_grace_s),
    });
    let installs = Arc::new(adb::InstallStats::default());
    let mut devices: Vec<Arc<dyn Device>> = Vec::new();
    let mut bs = None;
    match target {
        Target::Emulator | Target::Device => {
            let serials = if args.serials.is_empty() {
                adb::discover(&args.adb, target).await?
            } else {
                // Not listing them lets a device come later, but adb itself must run.
                adb::check_runs(&args.adb).await?;
                args.serials.clone()
            };
            if serials.is_empty() {
                return Err(RealError::NoDevices(target.clone()));
            }
            for s in serials {
                let dev = adb::AdbDevice::new(
                    agent_name,
                    &s,
                    target.clone(),
                    args.adb.clone(),
                    Arc::clone(&runner),
                    Arc::clone(&installs),
                )?;
                devices.push(Arc::new(SelfTimed(dev.probe().await)));
            }
        }
        Target::Browserstack => {
            let username = args.browserstack_username.clone().unwrap_or_default();
            let access_key = args.browserstack_access_key.clone().unwrap_or_default();
            if username.is_empty() || access_key.is_empty() {
                return Err(RealError::Credentials);
            }
            if args.parallel == 0 || args.parallel > 1000 {
                return Err(RealError::Invalid("--parallel must be 1 to 1000".into()));
            }
            let apps = browserstack::Apps::new(
                browserstack::Credentials {
                    username,
                    access_key,
                    base_url: args.browserstack_url.clone(),
                },
                Duration::from_secs(args.app_ttl_hours.saturating_mul(3600)),
                cache.dir(),
            )
            .with_markers(&args.browserstack_expired_markers);
            let shared = browserstack::Shared::new(apps, args.parallel);
            for n in 1..=args.parallel {
                devices.push(Arc::new(SelfTimed(
                    browserstack::BrowserStackDevice::new(
                        agent_name,
                        n,
                        Arc::clone(&runner),
                        Arc::clone(&shared),
                    )
                    .map_err(RealError::Invalid)?,
                )));
            }
            bs = Some(shared);
        }
        other => return Err(RealError::Unsupported(other.clone())),
    }
    Ok(RealDevices {
        devices,
        cache,
        installs,
        browserstack: bs,
    })
}

/// Everything `qgjob agent` needs without `--simulate`: wraps `link` so device logs reach
/// the server, downloads artifacts from `server` (with `token`), builds the devices of
/// `target` and runs them until `shutdown`. Once the devices are built, `started` gets the
/// agent's live counters and the number of devices (for the command's banner and
/// warnings).
#[allow(clippy::too_many_arguments)]
pub async fn run_real_agent(
    link: Arc<dyn AgentLink>,
    client: crate::client::Client,
    target: &Target,
    agent_name: &str,
    args: &RealArgs,
    cfg: AgentConfig,
    shutdown: ShutdownSignal,
    started: &std::sync::OnceLock<(Arc<qgjob_core::agent::AgentStats>, u64)>,
) -> Result<AgentCounters, RealError> {
    let logging = link::LoggingLink::new(link);
    let source: Arc<dyn ArtifactSource> = Arc::new(Arc::new(link::HttpArtifacts::new(client)));
    let built = build_devices(
        target,
        agent_name,
        args,
        source,
        Arc::clone(&logging) as Arc<dyn LogSink>,
    )
    .await?;
    let orphans = built
        .cache
        .stats
        .orphans_killed
        .load(std::sync::atomic::Ordering::Relaxed);
    if orphans > 0 {
        eprintln!(
            "qgjob agent: killed {orphans} test process group(s) that an earlier agent of {} left running",
            built.cache.dir().display()
        );
    }
    // The agent that held the cache dir before has ended (we hold its lock now): its
    // devices are ours at once, without waiting until it has been silent for a lease TTL.
    let mut agent =
        Agent::new(logging as Arc<dyn AgentLink>, cfg).replacing(built.cache.previous_session());
    built.cache.record_session(agent.session())?;
    let n = built.devices.len() as u64;
    for d in built.devices {
        agent.add_device(d);
    }
    let _ = started.set((agent.stats(), n));
    let counters = agent.run(shutdown).await?;
    eprintln!(
        "{}",
        summary(&built.cache, &built.installs, built.browserstack.as_deref())
    );
    Ok(counters)
}

/// One line of what the real devices did: installs, uploads, downloads, npm installs.
pub fn summary(
    cache: &ArtifactCache,
    installs: &adb::InstallStats,
    bs: Option<&browserstack::Shared>,
) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    // BrowserStack agents install nothing with adb: their uploads are counted below.
    let adb = if bs.is_some() {
        String::new()
    } else {
        format!(
            "adb installs {} (skipped {}, failed {}); ",
            installs.installs.load(Relaxed),
            installs.skipped.load(Relaxed),
            installs.failures.load(Relaxed),
        )
    };
    let mut s = format!(
        "qgjob agent: {adb}downloads: {} builds, {} bundles; npm installs {}; cache {} MB",
        cache.stats.build_downloads.load(Relaxed),
        cache.stats.bundle_downloads.load(Relaxed),
        cache.stats.npm_installs.load(Relaxed),
        cache.size() >> 20,
    );
    if let Some(bs) = bs {
        s.push_str(&format!(
            "; BrowserStack uploads {} (re-uploads {}, reused {}), peak sessions {}",
            bs.apps.stats.uploads.load(Relaxed),
            bs.apps.stats.reuploads.load(Relaxed),
            bs.apps.stats.reused.load(Relaxed),
            bs.peak.load(Relaxed),
        ));
    }
    s
}
