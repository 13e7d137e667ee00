//! The data model: ids, job specs, jobs, states, targets, devices, leases and outcomes.
//!
//! Every public type here is plain data with serde, so the server can persist it and send
//! it over the wire unchanged. Times are [`Time`] (milliseconds on a clock the caller
//! chooses: Unix time in the server, virtual time in the simulator).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::InvalidSpec;

/// A point in time, in milliseconds. The scheduler never reads a clock: callers pass it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    /// Zero, the start of a simulation.
    pub const ZERO: Time = Time(0);

    /// Milliseconds since the clock's origin.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// This time plus `ms` milliseconds (saturating).
    pub fn plus_ms(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

macro_rules! uuid_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Builds a version-7 id from a millisecond timestamp and 10 random bytes, so
            /// callers with a seeded RNG get reproducible ids.
            pub fn from_parts(ms: u64, random: [u8; 10]) -> Self {
                $name(uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name)
            }
        }
    };
}

uuid_id!(
    /// Identifies a job (uuid v7: sortable by creation time).
    JobId
);
uuid_id!(
    /// Identifies a run: the jobs one CI build submitted together.
    RunId
);

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        // Shared, not owned: ids are cloned into every lease, event and index entry, and a
        // clone is then a reference count, not an allocation (a fifth of a lease decision's
        // time at 10^6 queued jobs went to copying names).
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates and wraps a name: 1–128 characters from `[A-Za-z0-9._:@/-]`.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidSpec> {
                let s = s.into();
                validate_name(&s, $what)?;
                Ok($name(Arc::from(s)))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidSpec;
            fn try_from(s: String) -> Result<Self, InvalidSpec> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                String::from(&*v.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidSpec;
            fn from_str(s: &str) -> Result<Self, InvalidSpec> {
                $name::new(s)
            }
        }
    };
}

string_id!(
    /// An organisation (tenant). Jobs, builds and fairness are per org.
    OrgId,
    "org_id"
);
string_id!(
    /// An app build's version id, as the submitter names it (unique within an org).
    AppVersionId,
    "app_version_id"
);
string_id!(
    /// A device known to the scheduler (an emulator, a USB device or a BrowserStack slot).
    DeviceId,
    "device_id"
);

fn validate_name(s: &str, field: &'static str) -> Result<(), InvalidSpec> {
    if s.is_empty() || s.len() > 128 {
        return Err(InvalidSpec::new(field, "must be 1 to 128 characters long"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '/'))
    {
        return Err(InvalidSpec::new(
            field,
            "may contain only letters, digits and . _ - : @ /",
        ));
    }
    Ok(())
}

/// A lease: one device's right to run a batch of jobs until a deadline. Lease ids only grow,
/// so a report carrying an older lease than the job's current one is recognisably stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a job runs. The three built-in pools plus any other lower-case name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Target {
    /// An Android or iOS emulator/simulator driven by an agent.
    #[default]
    Emulator,
    /// A real device on USB.
    Device,
    /// A BrowserStack App Automate session.
    Browserstack,
    /// Another pool, named in lower case (e.g. `lambdatest`).
    Other(String),
}

impl Target {
    /// The target's name as used on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Target::Emulator => "emulator",
            Target::Device => "device",
            Target::Browserstack => "browserstack",
            Target::Other(s) => s,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Target {
    type Err = InvalidSpec;
    fn from_str(s: &str) -> Result<Self, InvalidSpec> {
        Ok(match s {
            "emulator" => Target::Emulator,
            "device" => Target::Device,
            "browserstack" => Target::Browserstack,
            other => {
                let ok = !other.is_empty()
                    && other.len() <= 32
                    && other
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !ok {
                    return Err(InvalidSpec::new(
                        "target",
                        "must be emulator, device, browserstack or another lower-case name",
                    ));
                }
                Target::Other(other.to_string())
            }
        })
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Job priority: higher is more urgent. Queued jobs also age, so low priority never starves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Priority(pub i32);

impl Priority {
    /// The priority a job gets when the submitter names none.
    pub const DEFAULT: Priority = Priority(0);
    /// The most urgent priority accepted.
    pub const MAX: i32 = 1000;
    /// The least urgent priority accepted.
    pub const MIN: i32 = -1000;
}

impl Default for Priority {
    fn default() -> Self {
        Priority::DEFAULT
    }
}

/// A device platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Android.
    Android,
    /// iOS.
    Ios,
}

/// What a device is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// The platform; `None` for a device that runs either (e.g. a pooled cloud slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// The device model, e.g. `Pixel 8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The OS version, e.g. `14`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
}

/// What a job needs from a device. Every field that is set must equal the device's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Requirements {
    /// Required platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Required device model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Required OS version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
}

impl Requirements {
    /// Whether a device with `caps` satisfies these requirements.
    pub fn matches(&self, caps: &Capabilities) -> bool {
        fn ok<T: PartialEq>(want: &Option<T>, have: &Option<T>) -> bool {
            match (want, have) {
                (None, _) => true,
                (Some(w), Some(h)) => w == h,
                (Some(_), None) => false,
            }
        }
        // A device with no declared platform serves either platform.
        let platform_ok = match (self.platform, caps.platform) {
            (Some(w), Some(h)) => w == h,
            _ => true,
        };
        platform_ok && ok(&self.model, &caps.model) && ok(&self.os_version, &caps.os_version)
    }

    /// True when nothing is required.
    pub fn is_empty(&self) -> bool {
        self.platform.is_none() && self.model.is_none() && self.os_version.is_none()
    }
}

/// An app build: one org's app version. What a device installs, and what jobs group by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BuildRef {
    /// The org that uploaded the build.
    pub org_id: OrgId,
    /// The version id the org gave it.
    pub app_version_id: AppVersionId,
}

impl fmt::Display for BuildRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.org_id, self.app_version_id)
    }
}

/// Default number of attempts for infrastructure failures.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default per-job timeout: 30 minutes.
pub const DEFAULT_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

/// What a submitter asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The submitting org.
    pub org_id: OrgId,
    /// The app build to test.
    pub app_version_id: AppVersionId,
    /// Test files (paths inside the test bundle), e.g. `tests/onboarding.spec.js`.
    pub tests: Vec<String>,
    /// The device pool.
    #[serde(default)]
    pub target: Target,
    /// Higher is more urgent.
    #[serde(default)]
    pub priority: Priority,
    /// Device requirements beyond the target.
    #[serde(default, skip_serializing_if = "Requirements::is_empty")]
    pub requires: Requirements,
    /// Attempts allowed for infrastructure failures (1 = no retry).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Per-attempt timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Also retry when a test fails (a later pass marks the job flaky).
    #[serde(default)]
    pub retry_failed_tests: bool,
    /// Submitting the same key again (same org) returns the existing job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Free-form labels, e.g. `branch=main`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The run this job belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// Content hash (sha256 hex) of the test bundle holding the tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

impl JobSpec {
    /// A spec with defaults for everything but org, build and tests.
    pub fn new(org_id: OrgId, app_version_id: AppVersionId, tests: Vec<String>) -> Self {
        JobSpec {
            org_id,
            app_version_id,
            tests,
            target: Target::default(),
            priority: Priority::default(),
            requires: Requirements::default(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            retry_failed_tests: false,
            idempotency_key: None,
            labels: BTreeMap::new(),
            run_id: None,
            bundle: None,
        }
    }

    /// The build this job tests.
    pub fn build(&self) -> BuildRef {
        BuildRef {
            org_id: self.org_id.clone(),
            app_version_id: self.app_version_id.clone(),
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        if self.tests.is_empty() {
            return Err(InvalidSpec::new(
                "tests",
                "at least one test file is required",
            ));
        }
        if self.tests.len() > 10_000 {
            return Err(InvalidSpec::new(
                "tests",
                "at most 10000 test files per job",
            ));
        }
        for t in &self.tests {
            if t.is_empty() || t.len() > 1024 || t.contains('\0') {
                return Err(InvalidSpec::new(
                    "tests",
                    "each test path must be 1 to 1024 characters without NUL",
                ));
            }
            if t.starts_with('-') {
                // The runner would read it as one of its own flags.
                return Err(InvalidSpec::new(
                    "tests",
                    "a test path cannot start with '-'",
                ));
            }
            // With a bundle the paths name files in it; without one, the agent's own
            // project, where any path the agent's operator set up is fair.
            let escapes = t.starts_with('/')
                || t.starts_with('\\')
                || t.split(['/', '\\']).any(|c| c == "..");
            if self.bundle.is_some() && escapes {
                return Err(InvalidSpec::new(
                    "tests",
                    "with a bundle, test paths are relative to its root: no absolute paths \
                     or '..'",
                ));
            }
        }
        if !(Priority::MIN..=Priority::MAX).contains(&self.priority.0) {
            return Err(InvalidSpec::new(
                "priority",
                "must be between -1000 and 1000",
            ));
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(InvalidSpec::new("max_attempts", "must be between 1 and 20"));
        }
        if self.timeout_ms < 1000 || self.timeout_ms > 24 * 3600 * 1000 {
            return Err(InvalidSpec::new(
                "timeout_ms",
                "must be between 1 second and 24 hours",
            ));
        }
        if let Some(k) = &self.idempotency_key {
            // Stores keep the key in a text column of its own: PostgreSQL refuses NUL there.
            if k.is_empty() || k.len() > 256 || k.chars().any(char::is_control) {
                return Err(InvalidSpec::new(
                    "idempotency_key",
                    "must be 1 to 256 characters, none of them control characters",
                ));
            }
        }
        validate_labels(&self.labels)?;
        if let Some(b) = &self.bundle {
            if !is_sha256_hex(b) {
                return Err(InvalidSpec::new(
                    "bundle",
                    "must be a lower-case sha256 hex digest",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `s` is a lower-case sha256 hex digest: how bundles and builds are named, on the
/// server (where it also keeps paths safe) and in an agent's cache.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Checks labels (of a job or a run): at most 64, keys of 1 to 64 characters, values of
/// at most 256.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), InvalidSpec> {
    if labels.len() > 64 {
        return Err(InvalidSpec::new("labels", "at most 64 labels"));
    }
    if labels
        .iter()
        .any(|(k, v)| k.is_empty() || k.chars().count() > 64 || v.chars().count() > 256)
    {
        return Err(InvalidSpec::new(
            "labels",
            "keys must be 1 to 64 and values at most 256 characters",
        ));
    }
    Ok(())
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a device (also while waiting out a retry backoff, with attempt > 1).
    Queued,
    /// Leased to a device.
    Running,
    /// Final: every test passed.
    Passed,
    /// Final: a test failed.
    Failed,
    /// Final: infrastructure failed on the last attempt.
    Error,
    /// Final: canceled.
    Canceled,
}

impl JobState {
    /// Whether the state is final (no further change is possible).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Passed | JobState::Failed | JobState::Error | JobState::Canceled
        )
    }

    /// All states, in lifecycle order.
    pub const ALL: [JobState; 6] = [
        JobState::Queued,
        JobState::Running,
        JobState::Passed,
        JobState::Failed,
        JobState::Error,
        JobState::Canceled,
    ];

    /// The state's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Passed => "passed",
            JobState::Failed => "failed",
            JobState::Error => "error",
            JobState::Canceled => "canceled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = InvalidSpec;
    fn from_str(s: &str) -> Result<Self, InvalidSpec> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                InvalidSpec::new(
                    "state",
                    "must be queued, running, passed, failed, error or canceled",
                )
            })
    }
}

/// One test's result status, as Playwright reports it (plus `flaky`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TestStatus {
    /// Passed on its first try.
    Passed,
    /// Failed.
    Failed,
    /// Skipped.
    Skipped,
    /// Ran out of time.
    TimedOut,
    /// Failed, then passed on a retry.
    Flaky,
    /// Interrupted (the run was stopped).
    Interrupted,
}

/// One test's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    /// The test's full title (describe blocks joined with ` › `).
    pub title: String,
    /// The spec file.
    #[serde(default)]
    pub file: String,
    /// How it ended.
    pub status: TestStatus,
    /// Duration in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// The first error message, with colour codes stripped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Counts of test results in a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TestCounts {
    /// Passed tests (flaky ones included).
    pub passed: u32,
    /// Failed or timed-out tests.
    pub failed: u32,
    /// Skipped tests.
    pub skipped: u32,
    /// Tests that passed only on a retry.
    pub flaky: u32,
}

impl TestCounts {
    /// Counts a list of results.
    pub fn of(results: &[TestResult]) -> Self {
        let mut c = TestCounts::default();
        for r in results {
            match r.status {
                TestStatus::Passed => c.passed += 1,
                TestStatus::Flaky => {
                    c.passed += 1;
                    c.flaky += 1
                }
                TestStatus::Failed | TestStatus::TimedOut | TestStatus::Interrupted => {
                    c.failed += 1
                }
                TestStatus::Skipped => c.skipped += 1,
            }
        }
        c
    }
}

/// What a device reports when a job's tests ran to the end (whatever they found).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Whether every test passed.
    pub passed: bool,
    /// Per-test results (may be empty for a simulated device).
    #[serde(default)]
    pub tests: Vec<TestResult>,
    /// Wall time the tests took, in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// A summary of the failure, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The kinds of infrastructure failure (retried, unlike a failing test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InfraErrorKind {
    /// The device went away mid-job.
    DeviceLost,
    /// Installing the build failed.
    InstallFailed,
    /// The job ran past its timeout.
    Timeout,
    /// The lease expired without heartbeats.
    LeaseExpired,
    /// The test runner crashed or produced no report.
    RunnerCrashed,
    /// Anything else outside the tests' control.
    Other,
}

impl InfraErrorKind {
    /// The kind in words, as users read it in a job's error (`device lost: …`).
    pub fn as_words(self) -> &'static str {
        match self {
            InfraErrorKind::DeviceLost => "device lost",
            InfraErrorKind::InstallFailed => "install failed",
            InfraErrorKind::Timeout => "timed out",
            InfraErrorKind::LeaseExpired => "lease expired",
            InfraErrorKind::RunnerCrashed => "test runner crashed",
            InfraErrorKind::Other => "infrastructure error",
        }
    }
}

impl std::fmt::Display for InfraErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_words())
    }
}

/// An infrastructure failure as a device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfraFailure {
    /// What kind of failure.
    pub kind: InfraErrorKind,
    /// A human-readable message.
    pub message: String,
}

impl InfraFailure {
    /// A job that ran past `timeout` and was stopped; `then` says how (`the process group
    /// was killed`). Every path that stops a job at its timeout (the agent, the real
    /// executor, a simulated device) reports it in these words, so users read one thing.
    pub fn timed_out(timeout: std::time::Duration, then: &str) -> Self {
        InfraFailure {
            kind: InfraErrorKind::Timeout,
            message: format!(
                "the tests ran past the job's timeout of {} s; {then}",
                timeout.as_secs_f64()
            ),
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The final state (never `queued` or `running`).
    pub state: JobState,
    /// Passed only after a failed attempt (or with flaky tests).
    #[serde(default)]
    pub flaky: bool,
    /// Test counts.
    #[serde(default)]
    pub counts: TestCounts,
    /// Per-test results of the last attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestResult>,
    /// Why it failed, errored or was canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A job: its spec plus everything the scheduler knows about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The job's id.
    pub id: JobId,
    /// Submission order within this scheduler (stable tiebreak, listing order). One
    /// counter for every org, so the HTTP API keeps it to itself (it would tell an org how
    /// many jobs the others submit); 0 when read back from such an answer.
    #[serde(default)]
    pub seq: u64,
    /// What was asked for.
    pub spec: JobSpec,
    /// Current state.
    pub state: JobState,
    /// The attempt running or about to run (1-based).
    pub attempt: u32,
    /// When the job was submitted.
    pub created_at: Time,
    /// When it last became ready to run (submit, or the failure that requeued it).
    pub released_at: Time,
    /// When the current (or last) attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the job reached its final state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// A queued retry does not run before this time (its backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Time>,
    /// The device running it, or that ran its last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    /// The current lease while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseId>,
    /// The last lease the job was given (kept after it ends, so a restored scheduler never
    /// hands out that id again and a late report from it stays stale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_lease: Option<LeaseId>,
    /// The lease's deadline while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_deadline: Option<Time>,
    /// Whether the running attempt had to install the build first.
    #[serde(default)]
    pub installed: bool,
    /// Cancel was asked for while running; the device is told on its next heartbeat.
    #[serde(default)]
    pub cancel_requested: bool,
    /// An earlier attempt failed a test (for the flaky flag; an infrastructure error does
    /// not count: the test did nothing flaky).
    #[serde(default)]
    pub had_failure: bool,
    /// The last infrastructure error, kept while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set once the job is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

/// A device as it registers with the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Unique id (e.g. `agent-1/emulator-5554`).
    pub id: DeviceId,
    /// Its pool.
    pub target: Target,
    /// What it is.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// The build it has installed now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed: Option<BuildRef>,
    /// How long an install takes on it, in ms, as the agent measured or configured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_estimate_ms: Option<u64>,
    /// The registering agent runs nothing on the device now. A lease the scheduler still
    /// holds for it was then abandoned (its agent was killed and restarted, or the answer
    /// that granted it never arrived), so its jobs go back to the queue at once, as an
    /// infrastructure failure, instead of when the lease expires. False (the default) keeps
    /// such a lease with the device: an agent re-registering while it still runs the jobs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idle: bool,
    /// The registering agent's session: a name it picks afresh each time it starts (a
    /// UUID). While the device's agent stays in touch (within one lease TTL), a registration
    /// from another session is refused ([`DeviceError::Held`](crate::DeviceError::Held)), and
    /// once another session holds the device, leasing for it under the old one is refused:
    /// two agents given the same name would otherwise take each other's leases. `None`
    /// (older agents) skips both checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The session of this agent's previous run, known to have ended (the agent holds a lock
    /// its predecessor held). A device that session holds is taken over at once instead of
    /// once it has been silent for a lease TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl DeviceInfo {
    /// Checks the fields a scheduler cannot check by type: the session names, and the
    /// capability strings (at most 128 characters, none of them control characters, so one
    /// registration cannot hold megabytes of the scheduler's memory).
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        for (field, value) in [
            ("capabilities.model", &self.capabilities.model),
            ("capabilities.os_version", &self.capabilities.os_version),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| v.len() > 128 || v.chars().any(char::is_control))
            {
                return Err(InvalidSpec::new(
                    field,
                    "must be at most 128 characters, none of them control characters",
                ));
            }
        }
        if let Some(s) = &self.session {
            validate_name(s, "session")?;
        }
        if let Some(s) = &self.replaces {
            validate_name(s, "replaces")?;
        }
        Ok(())
    }
}

/// One job inside a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeasedJob {
    /// The job.
    pub id: JobId,
    /// Its attempt number under this lease.
    pub attempt: u32,
    /// Its spec (tests, timeout, bundle...).
    pub spec: JobSpec,
}

/// Work handed to a device: one or more jobs of one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The fencing token every report must carry.
    pub id: LeaseId,
    /// The device it was given to.
    pub device: DeviceId,
    /// The build to run against.
    pub build: BuildRef,
    /// Whether the device must install the build first.
    pub install: bool,
    /// The jobs, most urgent first.
    pub jobs: Vec<LeasedJob>,
    /// Heartbeat before this time or the lease expires.
    pub deadline: Time,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The lease's new deadline.
    pub deadline: Time,
    /// Jobs of this lease the device must stop (cancel asked for, or timed out).
    pub cancel: Vec<JobId>,
}

/// A job's state changed. The scheduler records these; callers drain them to persist the
/// job and push live updates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// The job.
    pub job_id: JobId,
    /// Its run, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<RunId>,
    /// Its org.
    pub org_id: OrgId,
    /// The new state.
    pub state: JobState,
    /// The attempt.
    pub attempt: u32,
    /// When.
    pub at: Time,
}

/// Queued/running/final counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StateCounts {
    /// Queued (ready or backing off).
    pub queued: u64,
    /// Running.
    pub running: u64,
    /// Passed.
    pub passed: u64,
    /// Failed.
    pub failed: u64,
    /// Error.
    pub error: u64,
    /// Canceled.
    pub canceled: u64,
}

impl StateCounts {
    /// Adds one job in `state`.
    pub fn add(&mut self, state: JobState) {
        *self.slot(state) += 1;
    }

    /// Removes one job in `state`.
    pub fn remove(&mut self, state: JobState) {
        let s = self.slot(state);
        *s = s.saturating_sub(1);
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &StateCounts) {
        for state in JobState::ALL {
            *self.slot(state) += other.get(state);
        }
    }

    /// The count for `state`.
    pub fn get(&self, state: JobState) -> u64 {
        match state {
            JobState::Queued => self.queued,
            JobState::Running => self.running,
            JobState::Passed => self.passed,
            JobState::Failed => self.failed,
            JobState::Error => self.error,
            JobState::Canceled => self.canceled,
        }
    }

    fn slot(&mut self, state: JobState) -> &mut u64 {
        match state {
            JobState::Queued => &mut self.queued,
            JobState::Running => &mut self.running,
            JobState::Passed => &mut self.passed,
            JobState::Failed => &mut self.failed,
            JobState::Error => &mut self.error,
            JobState::Canceled => &mut self.canceled,
        }
    }

    /// Total jobs counted.
    pub fn total(&self) -> u64 {
        self.queued + self.running + self.passed + self.failed + self.error + self.canceled
    }
}

/// A summary of one group (jobs of one build on one target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// The build.
    pub build: BuildRef,
    /// The target pool.
    pub target: Target,
    /// Ready (not backing off) queued jobs.
    pub ready: u64,
    /// Jobs running now.
    pub running: u64,
    /// Devices with this build installed.
    pub devices: u64,
}

/// Which jobs a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFilter {
    /// Only this org.
    #[serde(default)]
    pub org_id: Option<OrgId>,
    /// Only this state.
    #[serde(default)]
    pub state: Option<JobState>,
    /// Only this app version.
    #[serde(default)]
    pub app_version_id: Option<AppVersionId>,
    /// Only this target.
    #[serde(default)]
    pub target: Option<Target>,
    /// Only this run.
    #[serde(default)]
    pub run_id: Option<RunId>,
    /// Only jobs with `seq` greater than this (cursor).
    #[serde(default)]
    pub after_seq: Option<u64>,
    /// At most this many (default 100).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl JobFilter {
    /// Whether `job` passes the filter (ignoring cursor and limit).
    pub fn matches(&self, job: &Job) -> bool {
        self.org_id.as_ref().is_none_or(|o| *o == job.spec.org_id)
            && self.state.is_none_or(|s| s == job.state)
            && self
                .app_version_id
                .as_ref()
                .is_none_or(|a| *a == job.spec.app_version_id)
            && self.target.as_ref().is_none_or(|t| *t == job.spec.target)
            && self.run_id.is_none_or(|r| Some(r) == job.spec.run_id)
            && self.after_seq.is_none_or(|s| job.seq > s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tests: &[&str], bundle: Option<&str>) -> JobSpec {
        let mut s = JobSpec::new(
            OrgId::new("acme").expect("org"),
            AppVersionId::new("v1").expect("version"),
            tests.iter().map(|t| t.to_string()).collect(),
        );
        s.bundle = bundle.map(str::to_string);
        s
    }

    fn field(s: &JobSpec) -> Option<&'static str> {
        s.validate().err().map(|e| e.field)
    }

    #[test]
    fn test_paths_are_never_flags_and_stay_inside_a_bundle() {
        let b = "ab".repeat(32);
        assert_eq!(field(&spec(&["tests/a.spec.js"], Some(&b))), None);
        assert_eq!(field(&spec(&["--config=/etc/x.js"], None)), Some("tests"));
        assert_eq!(field(&spec(&["-x"], Some(&b))), Some("tests"));
        for escaping in [
            "/etc/passwd",
            "../x.spec.js",
            "tests/../../x.spec.js",
            "\\x",
        ] {
            assert_eq!(
                field(&spec(&[escaping], Some(&b))),
                Some("tests"),
                "{escaping}"
            );
            // Without a bundle the agent's own project decides what a path means.
            assert_eq!(field(&spec(&[escaping], None)), None, "{escaping}");
        }
        // A file name with dots is not a parent directory.
        assert_eq!(field(&spec(&["tests/a..b.spec.js"], Some(&b))), None);
    }

    #[test]
    fn bundles_are_lower_case_digests_and_labels_are_bounded() {
        assert_eq!(
            field(&spec(&["a.spec.js"], Some(&"AB".repeat(32)))),
            Some("bundle")
        );
        assert_eq!(
            field(&spec(&["a.spec.js"], Some(&"ab".repeat(31)))),
            Some("bundle")
        );
        let mut labels = BTreeMap::new();
        labels.insert("branch".to_string(), "main".to_string());
        assert!(validate_labels(&labels).is_ok());
        labels.insert(String::new(), "x".to_string());
        assert!(validate_labels(&labels).is_err());
        let long = BTreeMap::from([("k".to_string(), "é".repeat(257))]);
        assert!(validate_labels(&long).is_err());
        let fits = BTreeMap::from([("k".to_string(), "é".repeat(256))]);
        assert!(validate_labels(&fits).is_ok(), "characters, not bytes");
    }
}
