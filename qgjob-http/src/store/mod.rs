//! The durable store behind the server: the [`Store`] trait and its implementations
//! ([`SqliteStore`], embedded and durable; [`PgStore`], PostgreSQL for servers sharing a
//! database; [`MemoryStore`], for `--store memory` and tests).
//!
//! The store keeps what the scheduler cannot lose: every job (as its serde JSON plus the
//! columns listings filter on), runs, job logs, the build registry and admin-created tokens.
//! The scheduler in memory is the source of truth while the server runs; the store is what
//! it is rebuilt from after a restart, and what answers for jobs the scheduler forgot.
//!
//! Every implementation runs the same generic tests (`tests/store.rs`).

mod memory;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use qgjob_core::{AppVersionId, Job, JobFilter, JobId, OrgId, RunId, Time};
use serde::{Deserialize, Serialize};

pub use memory::MemoryStore;
pub use postgres::{PgLock, PgStore};
pub use sqlite::{SqliteStore, Synchronous};

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored record could not be decoded (corruption or an incompatible version).
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The log of a job would grow past its size limit.
    #[error("log of job {job} would exceed {limit} bytes")]
    LogFull {
        /// The job.
        job: JobId,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file-system operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Another server has written to this store (its lock was lost): writing on would
    /// overwrite that server's jobs, so nothing was written.
    #[error("this server no longer owns the store: {0}")]
    Fenced(String),
}

/// A run: the jobs one CI build submitted together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The run's id.
    pub id: RunId,
    /// The org that submitted it (every job of a run belongs to it).
    pub org_id: OrgId,
    /// When it was submitted.
    pub created_at: Time,
    /// Free-form labels given at submission.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many jobs it holds.
    pub job_count: u64,
}

/// What a bearer token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Manages tokens, and may do everything.
    Admin,
    /// Sees and changes one org's jobs, runs, builds and bundles.
    Org,
    /// Uses the agent protocol only.
    Agent,
}

/// A stored token: only its sha256 is kept, so a leaked database leaks no usable token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Hex sha256 of the token.
    pub hash: String,
    /// What it may do.
    pub kind: TokenKind,
    /// Its org, for `org` tokens.
    pub org_id: Option<OrgId>,
}

/// One group-committed write: jobs to upsert and runs to insert, applied atomically.
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    /// Jobs in their newest state (a job may appear once; later copies win).
    pub jobs: Vec<Job>,
    /// New runs.
    pub runs: Vec<RunRecord>,
}

/// A build registered for an org's app version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Hex sha256 of the build's bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Persistence for the server. Implementations must make a successful [`Store::write`]
/// survive a crash of the process (the server acknowledges clients only after it).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies one batch atomically: every job is upserted by id, every run inserted.
    async fn write(&self, batch: &WriteBatch) -> Result<(), StoreError>;

    /// Jobs to rebuild the scheduler from: every unfinished job, jobs finished at or after
    /// `finished_since`, and the job with the highest `seq` (so new jobs never reuse a seq).
    async fn load_for_restore(&self, finished_since: Time) -> Result<Vec<Job>, StoreError>;

    /// The highest lease id any written job ever carried (0 when none did). Every
    /// [`Store::write`] keeps it, so it outlives the jobs that held those leases; a restored
    /// scheduler issues lease ids above it (fencing across restarts).
    async fn lease_high_water(&self) -> Result<u64, StoreError>;

    /// One job.
    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError>;

    /// The job an org submitted with this idempotency key, if any (the newest one).
    async fn find_idempotent(&self, org: &OrgId, key: &str) -> Result<Option<Job>, StoreError>;

    /// Jobs passing `filter` in `seq` order (cursor `after_seq`), at most `filter.limit`
    /// (100 when unset).
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError>;

    /// One run.
    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>, StoreError>;

    /// Every job of a run, in `seq` order.
    async fn run_jobs(&self, id: RunId) -> Result<Vec<Job>, StoreError>;

    /// Appends to a job's log, refusing (and appending nothing) past `limit` bytes in all.
    /// Returns the log's new size.
    async fn append_log(&self, job: JobId, data: &[u8], limit: u64) -> Result<u64, StoreError>;

    /// At most `max` bytes of a job's log from byte `offset`, and the log's total size.
    async fn read_log(
        &self,
        job: JobId,
        offset: u64,
        max: usize,
    ) -> Result<(Vec<u8>, u64), StoreError>;

    /// Registers (or replaces) the build of an org's app version.
    async fn put_build(
        &self,
        org: &OrgId,
        app: &AppVersionId,
        build: &BuildRecord,
    ) -> Result<(), StoreError>;

    /// The build registered for an org's app version.
    async fn get_build(
        &self,
        org: &OrgId,
        app: &AppVersionId,
    ) -> Result<Option<BuildRecord>, StoreError>;

    /// Records that `org` uploaded the test bundle `sha256`; returns whether this is the
    /// org's first upload of it. Bundles are stored once whoever uploads them; this record
    /// is what lets an org use one (and say whether it was new) without learning what
    /// other orgs uploaded.
    async fn add_bundle(&self, org: &OrgId, sha256: &str) -> Result<bool, StoreError>;

    /// Whether `org` uploaded the test bundle `sha256`.
    async fn has_bundle(&self, org: &OrgId, sha256: &str) -> Result<bool, StoreError>;

    /// Stores a token created through the admin API.
    async fn add_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// Every stored token.
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Deletes the stored token with this hash; returns whether there was one.
    async fn remove_token(&self, hash: &str) -> Result<bool, StoreError>;
}

/// The limit a listing uses when the filter names none.
pub const DEFAULT_LIST_LIMIT: usize = 100;

/// A stored job body back to a job.
pub(crate) fn decode_job(body: &str) -> Result<Job, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(format!("job: {e}")))
}

/// A record as the JSON body the SQL stores keep.
pub(crate) fn encode<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A sequence number or time for a signed 64-bit SQL column (saturating; never reached).
pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A write batch with its bodies encoded, jobs deduplicated: done before a SQL store opens
/// its transaction, so the transaction is held as briefly as possible.
pub(crate) type EncodedBatch<'a> = (Vec<(&'a Job, String)>, Vec<(&'a RunRecord, String)>);

/// Encodes a write batch for the SQL stores.
pub(crate) fn encode_batch(batch: &WriteBatch) -> Result<EncodedBatch<'_>, StoreError> {
    let jobs = dedup_jobs(&batch.jobs)
        .into_iter()
        .map(|j| Ok((j, encode(j)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let runs = batch
        .runs
        .iter()
        .map(|r| Ok((r, encode(r)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok((jobs, runs))
}

/// Checks that a job upsert wrote every row of `chunk`. The SQL stores' upsert updates a
/// row only when its sequence number belongs to the same job: a row it skipped belongs to
/// a job of another server on this store, which this one must not overwrite.
pub(crate) fn check_all_written(rows: u64, chunk: &[(&Job, String)]) -> Result<(), StoreError> {
    if rows >= chunk.len() as u64 {
        return Ok(());
    }
    let first = chunk.first().map_or(0, |(j, _)| j.seq);
    Err(StoreError::Fenced(format!(
        "{} of {} job rows (from seq {first}) belong to jobs another server wrote",
        chunk.len() as u64 - rows,
        chunk.len()
    )))
}

/// The meta-table key under which the SQL stores keep [`Store::lease_high_water`].
pub(crate) const LEASE_HIGH_WATER: &str = "lease_high_water";

/// The highest lease id in a batch (current or last held), if any job carries one.
pub(crate) fn batch_lease_high_water(jobs: &[Job]) -> Option<u64> {
    jobs.iter()
        .flat_map(|j| [j.lease, j.last_lease])
        .flatten()
        .map(|l| l.0)
        .max()
}

/// Keeps only the last copy of each job in a batch, in first-seen order: the writer may
/// merge several requests that touched the same job.
pub(crate) fn dedup_jobs(jobs: &[Job]) -> Vec<&Job> {
    let mut last: std::collections::HashMap<JobId, usize> =
        std::collections::HashMap::with_capacity(jobs.len());
    for (i, j) in jobs.iter().enumerate() {
        last.insert(j.id, i);
    }
    jobs.iter()
        .enumerate()
        .filter(|(i, j)| last.get(&j.id) == Some(i))
        .map(|(_, j)| j)
        .collect()
}

/// Which stored log chunks a read of `max` bytes from `offset` needs, given every chunk's
/// sequence number and length in order: the log's total size, and the first and last chunk
/// to load with the bytes to skip in the first (none when the read is past the end). Only
/// those chunks are loaded, so a reader near the end of a 16 MiB log does not cost 16 MiB.
pub(crate) fn log_window(
    chunks: &[(i64, u64)],
    offset: u64,
    max: usize,
) -> (u64, Option<(i64, i64, usize)>) {
    let total = chunks.iter().map(|c| c.1).sum();
    let end = offset.saturating_add(max as u64);
    let (mut at, mut first, mut last) = (0u64, None, None);
    for &(n, len) in chunks {
        let (from, to) = (at, at + len);
        if to > offset && from < end && len > 0 {
            first.get_or_insert((n, usize::try_from(offset.saturating_sub(from)).unwrap_or(0)));
            last = Some(n);
        }
        at = to;
    }
    let window = match (first, last) {
        (Some((a, skip)), Some(b)) => Some((a, b, skip)),
        _ => None,
    };
    (total, window)
}
