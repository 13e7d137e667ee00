//! The command-line grammar (clap derive). Flags here are a public contract: extend, don't
//! change.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::util::parse_duration;

fn duration(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn target(s: &str) -> Result<String, String> {
    s.parse::<qgjob_core::Target>()
        .map(|t| t.to_string())
        .map_err(|e| e.message)
}

fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// An id of the kind `what` (`job`, `run`): a UUID, given back in its canonical form. An
/// empty or malformed one is a usage error naming the flag, not a request for a path the
/// server does not have.
fn uuid_of<T: std::str::FromStr + std::fmt::Display>(
    what: &str,
    s: &str,
) -> Result<String, String> {
    if s.is_empty() {
        return Err(format!("a {what} id is needed, and this one is empty"));
    }
    s.parse::<T>().map(|id| id.to_string()).map_err(|_| {
        format!("not a {what} id: ids are UUIDs, such as 0193a000-0000-7000-8000-000000000001, as `qgjob submit` prints them")
    })
}

fn job_id(s: &str) -> Result<String, String> {
    uuid_of::<qgjob_core::JobId>("job", s)
}

fn run_id(s: &str) -> Result<String, String> {
    uuid_of::<qgjob_core::RunId>("run", s)
}

fn label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| "labels are KEY=VALUE".to_string())
}

/// qgjob: queue, group and run mobile end-to-end tests (AppWright) on emulators, devices and
/// BrowserStack.
#[derive(Debug, Parser)]
#[command(
    name = "qgjob",
    version,
    about,
    long_about = None,
    after_help = "Server address: --server, then QGJOB_SERVER, then the config file \
($QGJOB_CONFIG, else $XDG_CONFIG_HOME/qgjob/config.toml or ~/.config/qgjob/config.toml; keys \
`server` and `token`), then \
http://127.0.0.1:7878. An https server is checked against Mozilla's roots, or against the \
CA certificates of the PEM file named by QGJOB_CA_CERT.\nExit codes: 0 all passed, 1 a test failed, 2 usage or input error, \
3 server or infrastructure error (also error/canceled jobs and timeouts).\nTry it all locally: qgjob demo"
)]
pub struct Cli {
    /// Connection flags given before the command.
    #[command(flatten)]
    pub conn: Conn,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Where the server is and how to authenticate. Client commands and `agent` take these
/// flags after the command name; before it (`qgjob --server URL status …`) they are
/// accepted too, as they always were. They are not global flags, so `server`, `simulate`,
/// `demo` and `up` do not list flags they would ignore. The environment is read in
/// [`crate::config::resolve`], not by clap, so that a flag in either place beats it.
#[derive(Debug, Clone, Default, Args)]
pub struct Conn {
    /// Server URL (else QGJOB_SERVER, the config file, or http://127.0.0.1:7878); a
    /// comma-separated list names a server and its standbys, tried in turn.
    #[arg(long, value_name = "URL[,URL…]", help_heading = "Connection")]
    pub server: Option<String>,
    /// Bearer token (else QGJOB_TOKEN or the config file).
    #[arg(long, value_name = "TOKEN", help_heading = "Connection")]
    pub token: Option<String>,
}

impl Conn {
    /// The flags given after the command, else those given before it.
    pub fn or(&self, before: &Conn) -> Conn {
        Conn {
            server: self.server.clone().or_else(|| before.server.clone()),
            token: self.token.clone().or_else(|| before.token.clone()),
        }
    }

    /// Whether either flag was given.
    pub fn is_set(&self) -> bool {
        self.server.is_some() || self.token.is_some()
    }
}

/// Every command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit test files: one test makes a job, several make a run.
    Submit(SubmitArgs),
    /// Show a job's or run's state (--watch follows it live).
    Status(StatusArgs),
    /// Wait until a job or run is final; print a summary; exit 0/1/3.
    Wait(WaitArgs),
    /// List jobs.
    List(ListArgs),
    /// Cancel a job or every unfinished job of a run.
    Cancel(CancelArgs),
    /// Print a job's logs (--follow to stream them).
    Logs(LogsArgs),
    /// Manage app builds.
    #[command(subcommand)]
    App(AppCommand),
    /// Run the qgjob server.
    Server(ServerArgs),
    /// Run an agent that executes jobs on devices: adb emulators/USB devices, BrowserStack,
    /// or simulated ones (--simulate).
    Agent(AgentArgs),
    /// Run a workload through the scheduler in virtual time, or generate one.
    Simulate(SimulateArgs),
    /// Start a server and simulated agents for every target in one process.
    Up(UpArgs),
    /// Start everything locally, run a sample run, print results and figures, exit.
    Demo(DemoArgs),
    /// Print shell completions.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// Whether the command talks to a server (so `--server`/`--token` mean something).
    pub fn uses_server(&self) -> bool {
        !matches!(
            self,
            Command::Server(_)
                | Command::Simulate(_)
                | Command::Up(_)
                | Command::Demo(_)
                | Command::Completions { .. }
        )
    }

    /// The command's name on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Submit(_) => "submit",
            Command::Status(_) => "status",
            Command::Wait(_) => "wait",
            Command::List(_) => "list",
            Command::Cancel(_) => "cancel",
            Command::Logs(_) => "logs",
            Command::App(_) => "app",
            Command::Server(_) => "server",
            Command::Agent(_) => "agent",
            Command::Simulate(_) => "simulate",
            Command::Up(_) => "up",
            Command::Demo(_) => "demo",
            Command::Completions { .. } => "completions",
        }
    }
}

/// `qgjob submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// The submitting organisation.
    #[arg(long, value_name = "ORG")]
    pub org_id: String,
    /// The app build's version id (jobs are grouped by it).
    #[arg(long, value_name = "V")]
    pub app_version_id: String,
    /// A spec file, folder or glob (repeatable), relative to the current directory (the
    /// project root).
    #[arg(long = "test", value_name = "PATH|GLOB", required = true,
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub tests: Vec<String>,
    /// Priority, -1000..1000 (higher runs sooner).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Device pool: emulator, device, browserstack, or another pool's lower-case name (a job
    /// for a pool no agent serves waits, with a note).
    #[arg(long, default_value = "emulator", value_parser = target)]
    pub target: String,
    /// Attempts allowed for infrastructure failures (1 to 20; default 3).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(qgjob_core::MAX_ATTEMPTS_LIMIT)))]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout (e.g. 90s, 10m; default 30m).
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Submitting the same key again returns the same job.
    #[arg(long, value_name = "K")]
    pub idempotency_key: Option<String>,
    /// Retry failing tests too (a later pass marks the job flaky).
    #[arg(long)]
    pub retry_failed_tests: bool,
    /// A label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = label, value_name = "KEY=VALUE")]
    pub labels: Vec<(String, String)>,
    /// Don't pack and upload the spec files: submit the paths as they are (the agents
    /// already have the project).
    #[arg(long)]
    pub no_bundle: bool,
    /// Wait for the result afterwards, like `qgjob wait`.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: give up after this long (exit 3).
    #[arg(long, value_parser = duration, value_name = "DURATION", requires = "wait")]
    pub wait_timeout: Option<Duration>,
    /// With --wait: write JUnit XML here.
    #[arg(long, value_name = "FILE", requires = "wait")]
    pub junit: Option<PathBuf>,
    /// With --wait: write a GitHub Actions job summary and annotations (on by default when
    /// GITHUB_ACTIONS=true).
    #[arg(long, requires = "wait")]
    pub github: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A job or a run.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// A job id (a UUID, as `submit` prints it).
    #[arg(long, value_name = "ID", value_parser = job_id)]
    pub job_id: Option<String>,
    /// A run id (a UUID, as `submit` prints it).
    #[arg(long, value_name = "ID", value_parser = run_id)]
    pub run_id: Option<String>,
}

/// `qgjob status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// The job or run.
    #[command(flatten)]
    pub which: Which,
    /// Print each state change as it happens, until the final state.
    #[arg(long)]
    pub watch: bool,
    /// Print JSON (with --watch: one event per line).
    #[arg(long)]
    pub json: bool,
}

/// `qgjob wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// The job or run.
    #[command(flatten)]
    pub which: Which,
    /// Give up after this long (exit 3).
    #[arg(long, value_parser = duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Write JUnit XML here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write a GitHub Actions job summary and annotations (on by default when
    /// GITHUB_ACTIONS=true).
    #[arg(long)]
    pub github: bool,
    /// Print the final jobs as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `qgjob list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// Only this org.
    #[arg(long, value_name = "ORG")]
    pub org_id: Option<String>,
    /// Only this state (queued, running, passed, failed, error, canceled).
    #[arg(long)]
    pub state: Option<String>,
    /// Only this app version.
    #[arg(long, value_name = "V")]
    pub app_version_id: Option<String>,
    /// Only this target.
    #[arg(long, value_parser = target)]
    pub target: Option<String>,
    /// Only this run.
    #[arg(long, value_name = "ID", value_parser = run_id)]
    pub run_id: Option<String>,
    /// At most this many jobs (1..1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
    /// Start after this cursor: the `next_cursor` of the previous page (jobs come in
    /// submission order).
    #[arg(long, value_name = "CURSOR")]
    pub cursor: Option<String>,
    /// Print JSON (the server's page: {"jobs": [...], "next_cursor": ...}).
    #[arg(long)]
    pub json: bool,
}

/// `qgjob cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// The job or run.
    #[command(flatten)]
    pub which: Which,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qgjob logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// The job (a UUID, as `submit` prints it).
    #[arg(long, value_name = "ID", value_parser = job_id)]
    pub job_id: String,
    /// Keep printing new output until the job is final.
    #[arg(long, short)]
    pub follow: bool,
    /// Print JSON: one object {"job_id", "offset", "text"} holding the whole log; with
    /// --follow, one such object per piece of output as it arrives (one per line of
    /// stdout). `offset` is where `text` starts in the log, in bytes; the texts, joined,
    /// are the log (bytes that are not UTF-8 become U+FFFD).
    #[arg(long)]
    pub json: bool,
}

/// `qgjob app …`.
#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Upload an app build (content-addressed; prints its sha256).
    Upload(AppUploadArgs),
}

/// `qgjob app upload`.
#[derive(Debug, Args)]
pub struct AppUploadArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// The org.
    #[arg(long, value_name = "ORG")]
    pub org_id: String,
    /// The version id jobs will name.
    #[arg(long, value_name = "V")]
    pub app_version_id: String,
    /// The build (.apk, .ipa, .zip).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where the server keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// The embedded durable store (SQLite) in --data-dir (default).
    #[value(alias = "sqlite")]
    Embedded,
    /// Memory only: everything is lost at exit (tests, demos).
    Memory,
    /// PostgreSQL at --database-url, uploads included.
    #[value(alias = "postgresql")]
    Postgres,
}

/// `qgjob server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: String,
    /// Where the embedded store and uploads live (default: qgjob-data; the memory store
    /// keeps nothing on disk and takes none; on PostgreSQL, uploads an earlier release
    /// kept here are imported into the database).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store kind (default: embedded, or postgres when --database-url is given).
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// PostgreSQL URL for --store postgres, e.g. postgres://postgres@127.0.0.1:5432/qgjob
    /// (setting it alone implies --store postgres).
    #[arg(
        long,
        env = "QGJOB_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// A file of tokens (`admin TOKEN`, `agent TOKEN`, `org ORG_ID TOKEN` per line);
    /// without tokens the server only runs on a loopback address.
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
    /// PostgreSQL store only: when another server holds the store, stand by (answering
    /// 503) and take over when it stops, instead of exiting.
    #[arg(long)]
    pub standby: bool,
    /// Embedded store only: fsync every commit (SQLite synchronous=FULL), so acknowledged
    /// jobs survive a power loss, not only a crash of the server; about half the
    /// single-submission rate.
    #[arg(long)]
    pub fsync: bool,
}

/// `qgjob agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Where the server is.
    #[command(flatten)]
    pub conn: Conn,
    /// Device pool this agent serves.
    #[arg(long, value_parser = target)]
    pub target: String,
    /// Drive simulated devices (no real device needed).
    #[arg(long)]
    pub simulate: bool,
    /// Simulated devices to run (1 to 1000).
    #[arg(long, default_value_t = 2, requires = "simulate")]
    pub devices: u32,
    /// Simulated install time in seconds.
    #[arg(long, default_value_t = 2.0, requires = "simulate")]
    pub install_s: f64,
    /// Simulated run time per job in seconds.
    #[arg(long, default_value_t = 1.0, requires = "simulate")]
    pub run_s: f64,
    /// Fraction of simulated jobs whose test fails (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction, requires = "simulate")]
    pub fail_rate: f64,
    /// Fraction of simulated jobs that fail a test once and pass on its retry (flaky).
    #[arg(long, default_value_t = 0.0, value_parser = fraction, requires = "simulate")]
    pub flaky_rate: f64,
    /// Fraction of simulated attempts that hit an infrastructure error (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction, requires = "simulate")]
    pub infra_fail_rate: f64,
    /// Seed of the simulated devices' randomness.
    #[arg(long, default_value_t = 1, requires = "simulate")]
    pub seed: u64,
    /// Agent name (prefix of its device ids); default: the host name.
    #[arg(long)]
    pub name: Option<String>,
    /// Most jobs of one build a device takes per lease (1 to 64).
    #[arg(long, default_value_t = 1)]
    pub max_batch: usize,
    /// Real-device options (ignored with --simulate).
    #[command(flatten)]
    pub real: crate::real::RealArgs,
}

/// Policies for the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Install-aware grouping (the default).
    Grouped,
    /// Plain FIFO, no affinity.
    Fifo,
    /// One device per group, groups in FIFO order.
    PerGroup,
}

/// The workload shapes of `simulate --generate`, from [`Shape::ALL`] so that the list in
/// `--help` and in errors is the generator's own.
///
/// [`Shape::ALL`]: qgjob_core::sim::Shape::ALL
fn shape() -> impl clap::builder::TypedValueParser<Value = qgjob_core::sim::Shape> {
    clap::builder::PossibleValuesParser::new(qgjob_core::sim::Shape::ALL.map(|s| s.as_str()))
        .try_map(|s| s.parse::<qgjob_core::sim::Shape>())
}

/// `qgjob simulate`: runs a workload (`--workload`, with `--policy` and `--json`) or
/// generates one (`--generate`, with `--seed`); a flag of the other mode is refused rather
/// than ignored.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).args(["workload", "generate"])))]
pub struct SimulateArgs {
    /// The workload to run (JSON, format v1).
    #[arg(long, value_name = "FILE", conflicts_with = "generate")]
    pub workload: Option<PathBuf>,
    /// Print a generated workload (JSON, format v1) of this shape instead of running one.
    #[arg(long, value_name = "SHAPE", value_parser = shape(),
          conflicts_with_all = ["policy", "json"])]
    pub generate: Option<qgjob_core::sim::Shape>,
    /// Seed for --generate (the same shape and seed give the same workload).
    #[arg(long, default_value_t = 1, conflicts_with = "workload")]
    pub seed: u64,
    /// Dispatch policy for --workload.
    #[arg(long, value_enum, default_value_t = PolicyArg::Grouped)]
    pub policy: PolicyArg,
    /// Print the --workload report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qgjob up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub addr: String,
    /// Where the embedded store lives.
    #[arg(long, default_value = "qgjob-data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Simulated devices per target (1 to 64).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub devices: u32,
    /// Simulated install time in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub install_s: f64,
    /// Simulated run time per job in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub run_s: f64,
}

/// `qgjob demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Simulated devices per target (1 to 16).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub devices: u32,
    /// Print the result (jobs and figures) as JSON.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn readme_submit_line_parses() {
        let c = Cli::try_parse_from([
            "qgjob",
            "submit",
            "--org-id=qualgent",
            "--app-version-id=xyz123",
            "--test=tests/onboarding.spec.js",
            "--priority=-5",
        ])
        .unwrap();
        match c.command {
            Command::Submit(s) => {
                assert_eq!(s.tests, vec!["tests/onboarding.spec.js"]);
                assert_eq!(s.target, "emulator");
                assert_eq!(s.priority, -5);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            vec!["qgjob", "submit", "--org-id=a", "--app-version-id=b"],
            vec![
                "qgjob",
                "submit",
                "--org-id=a",
                "--app-version-id=b",
                "--test=x",
                "--target=Nope!",
            ],
            vec!["qgjob", "status"],
            vec!["qgjob", "status", "--job-id=a", "--run-id=b"],
            vec!["qgjob", "wait", "--job-id=a", "--timeout=soon"],
            vec!["qgjob", "simulate"],
        ] {
            let e = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn simulate_refuses_flags_of_the_other_mode() {
        for (args, named) in [
            (
                vec![
                    "qgjob",
                    "simulate",
                    "--generate",
                    "uniform",
                    "--policy",
                    "fifo",
                ],
                "--policy",
            ),
            (
                vec!["qgjob", "simulate", "--generate", "uniform", "--json"],
                "--json",
            ),
            (
                vec!["qgjob", "simulate", "--workload", "w.json", "--seed", "5"],
                "--seed",
            ),
            (
                vec!["qgjob", "simulate", "--generate", "lumpy"],
                "few-big-groups",
            ),
        ] {
            let e = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(named), "{args:?}: {e}");
        }
        // Each mode with its own flags, and the defaults, still parse.
        for args in [
            vec!["qgjob", "simulate", "--generate", "small", "--seed", "5"],
            vec!["qgjob", "simulate", "--generate", "bursty"],
            vec![
                "qgjob",
                "simulate",
                "--workload",
                "w.json",
                "--policy",
                "fifo",
                "--json",
            ],
            vec!["qgjob", "simulate", "--workload", "w.json"],
        ] {
            Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        // Every shape the generator has is listed, and taken.
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("simulate")
            .map(|c| c.render_long_help().to_string())
            .unwrap_or_default();
        for s in qgjob_core::sim::Shape::ALL {
            assert!(help.contains(s.as_str()), "{s} missing from {help}");
            let c = Cli::try_parse_from(["qgjob", "simulate", "--generate", s.as_str()]).unwrap();
            match c.command {
                Command::Simulate(a) => assert_eq!(a.generate, Some(s)),
                other => panic!("parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn ids_are_uuids_and_an_empty_or_bad_one_names_its_flag() {
        for (args, flag) in [
            (vec!["qgjob", "status", "--job-id="], "--job-id"),
            (vec!["qgjob", "wait", "--run-id="], "--run-id"),
            (vec!["qgjob", "cancel", "--job-id=nope"], "--job-id"),
            (vec!["qgjob", "logs", "--job-id="], "--job-id"),
            (vec!["qgjob", "list", "--run-id=12"], "--run-id"),
        ] {
            let e = Cli::try_parse_from(&args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            let text = e.to_string();
            assert!(text.contains(flag), "{args:?}: {text}");
            assert!(
                text.contains("UUID") || text.contains("empty"),
                "{args:?}: {text}"
            );
        }
        // Any UUID spelling is taken, and given to the server in the canonical one.
        let c = Cli::try_parse_from([
            "qgjob",
            "status",
            "--job-id=0193A000-0000-7000-8000-000000000001",
        ])
        .unwrap();
        match c.command {
            Command::Status(s) => assert_eq!(
                s.which.job_id.as_deref(),
                Some("0193a000-0000-7000-8000-000000000001")
            ),
            other => panic!("parsed as {other:?}"),
        }
    }
}
