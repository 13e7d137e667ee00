//! [`SqliteStore`]: the embedded durable store (one SQLite file in WAL mode, via sqlx with
//! runtime queries only, so nothing needs a database at build time).
//!
//! Durability: with [`Synchronous::Normal`] (the default) a committed transaction survives
//! `kill -9` of the server (it is in the WAL file, which the OS holds) but the last
//! transactions may be lost on power failure. [`Synchronous::Full`] fsyncs every commit and
//! survives power loss too, at a cost in throughput. Group commit (one transaction per
//! batch of requests) keeps either fast.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use qgjob_core::{AppVersionId, Job, JobFilter, JobId, OrgId, RunId, Time};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::{
    batch_lease_high_water, check_all_written, decode_job, encode_batch, i64_of, BuildRecord,
    RunRecord, Store, StoreError, TokenKind, TokenRecord, WriteBatch, DEFAULT_LIST_LIMIT,
    LEASE_HIGH_WATER,
};

/// How hard SQLite works to keep commits on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// WAL + `synchronous=NORMAL`: durable against a crash of the process, not of the OS.
    #[default]
    Normal,
    /// WAL + `synchronous=FULL`: every commit is fsynced; durable against power loss.
    Full,
}

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY,
        id BLOB NOT NULL UNIQUE,
        org TEXT NOT NULL,
        state TEXT NOT NULL,
        run BLOB,
        app TEXT NOT NULL,
        target TEXT NOT NULL,
        finished_at INTEGER,
        idem TEXT,
        body TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS jobs_org ON jobs(org, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run) WHERE run IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS jobs_idem ON jobs(org, idem) WHERE idem IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS runs (
        id BLOB PRIMARY KEY,
        org TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        body TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS job_logs (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        job BLOB NOT NULL,
        data BLOB NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS job_logs_job ON job_logs(job, n)",
    "CREATE TABLE IF NOT EXISTS builds (
        org TEXT NOT NULL,
        app TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (org, app)
    )",
    "CREATE TABLE IF NOT EXISTS bundles (
        org TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (org, sha256)
    )",
    "CREATE TABLE IF NOT EXISTS tokens (
        hash TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        org TEXT
    )",
    "CREATE TABLE IF NOT EXISTS meta (
        k TEXT PRIMARY KEY,
        v BIGINT NOT NULL
    )",
];

/// Rows per multi-row upsert statement: 10 binds each, well under SQLite's variable limit.
const CHUNK: usize = 500;

/// The embedded SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file `path`.
    pub async fn open(path: &Path, sync: Synchronous) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match sync {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10))
            // Checkpoint less often during bursts of submissions (the WAL may reach ~32 MiB),
            // and keep the hot index pages cached.
            .pragma("wal_autocheckpoint", "8192")
            .pragma("cache_size", "-8192");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        sqlx::query(SCHEMA[0]).execute(&pool).await?;
        // Databases made before the idempotency column existed get it now; on newer ones
        // this fails harmlessly (duplicate column).
        let _ = sqlx::query("ALTER TABLE jobs ADD COLUMN idem TEXT")
            .execute(&pool)
            .await;
        for stmt in &SCHEMA[1..] {
            sqlx::query(stmt).execute(&pool).await?;
        }
        // A database written before the lease high-water mark was kept: take it from the
        // job bodies, once.
        if stored_lease_high_water(&pool).await?.is_none() {
            sqlx::query(
                "INSERT INTO meta (k, v) SELECT ?, COALESCE(MAX(MAX(COALESCE(json_extract(body, '$.lease'), 0), \
                 COALESCE(json_extract(body, '$.last_lease'), 0))), 0) FROM jobs WHERE true \
                 ON CONFLICT (k) DO NOTHING",
            )
            .bind(LEASE_HIGH_WATER)
            .execute(&pool)
            .await?;
        }
        Ok(SqliteStore { pool })
    }

    /// Closes the pool, checkpointing the WAL.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// The stored lease high-water mark; `None` in a database written before it was kept.
async fn stored_lease_high_water(pool: &SqlitePool) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar("SELECT v FROM meta WHERE k = ?")
        .bind(LEASE_HIGH_WATER)
        .fetch_optional(pool)
        .await?)
}

fn jobs_from_rows(rows: Vec<sqlx::sqlite::SqliteRow>) -> Result<Vec<Job>, StoreError> {
    rows.iter()
        .map(|r| decode_job(r.try_get::<&str, _>("body")?))
        .collect()
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let (rows, runs) = encode_batch(batch)?;
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(CHUNK) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO jobs (seq, id, org, state, run, app, target, finished_at, idem, body) ",
            );
            qb.push_values(chunk, |mut b, (j, body)| {
                b.push_bind(i64_of(j.seq))
                    .push_bind(j.id.0)
                    .push_bind(j.spec.org_id.as_str())
                    .push_bind(j.state.as_str())
                    .push_bind(j.spec.run_id.map(|r| r.0))
                    .push_bind(j.spec.app_version_id.as_str())
                    .push_bind(j.spec.target.as_str())
                    .push_bind(j.finished_at.map(|t| i64_of(t.0)))
                    .push_bind(j.spec.idempotency_key.as_deref())
                    .push_bind(body.as_str());
            });
            qb.push(
                " ON CONFLICT(seq) DO UPDATE SET state = excluded.state, \
                 finished_at = excluded.finished_at, body = excluded.body \
                 WHERE jobs.id = excluded.id",
            );
            let written = qb.build().persistent(true).execute(&mut *tx).await?;
            if let Err(e) = check_all_written(written.rows_affected(), chunk) {
                // Now, not whenever the pool next uses the connection: the write lock is
                // held until then.
                tx.rollback().await?;
                return Err(e);
            }
        }
        for (r, body) in runs {
            sqlx::query(
                "INSERT INTO runs (id, org, created_at, body) VALUES (?, ?, ?, ?) \
                 ON CONFLICT(id) DO UPDATE SET body = excluded.body",
            )
            .bind(r.id.0)
            .bind(r.org_id.as_str())
            .bind(i64_of(r.created_at.0))
            .bind(body)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(h) = batch_lease_high_water(&batch.jobs) {
            sqlx::query(
                "INSERT INTO meta (k, v) VALUES (?, ?) \
                 ON CONFLICT (k) DO UPDATE SET v = MAX(v, excluded.v)",
            )
            .bind(LEASE_HIGH_WATER)
            .bind(i64_of(h))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn lease_high_water(&self) -> Result<u64, StoreError> {
        let v = stored_lease_high_water(&self.pool).await?;
        Ok(v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
    }

    async fn load_for_restore(&self, finished_since: Time) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(
            "SELECT body FROM jobs WHERE finished_at IS NULL OR finished_at >= ? \
             OR seq = (SELECT MAX(seq) FROM jobs) ORDER BY seq",
        )
        .bind(i64_of(finished_since.0))
        .fetch_all(&self.pool)
        .await?;
        jobs_from_rows(rows)
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query("SELECT body FROM jobs WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some(decode_job(r.try_get::<&str, _>("body")?)?)),
            None => Ok(None),
        }
    }

    async fn find_idempotent(&self, org: &OrgId, key: &str) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(
            "SELECT body FROM jobs WHERE org = ? AND idem = ? ORDER BY seq DESC LIMIT 1",
        )
        .bind(org.as_str())
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some(decode_job(r.try_get::<&str, _>("body")?)?)),
            None => Ok(None),
        }
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let limit = filter.limit.unwrap_or(DEFAULT_LIST_LIMIT);
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT body FROM jobs WHERE seq > ");
        qb.push_bind(i64_of(filter.after_seq.unwrap_or(0)));
        if let Some(o) = &filter.org_id {
            qb.push(" AND org = ").push_bind(o.as_str().to_string());
        }
        if let Some(s) = filter.state {
            qb.push(" AND state = ").push_bind(s.as_str());
        }
        if let Some(a) = &filter.app_version_id {
            qb.push(" AND app = ").push_bind(a.as_str().to_string());
        }
        if let Some(t) = &filter.target {
            qb.push(" AND target = ").push_bind(t.as_str().to_string());
        }
        if let Some(r) = filter.run_id {
            qb.push(" AND run = ").push_bind(r.0);
        }
        qb.push(" ORDER BY seq LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = qb.build().fetch_all(&self.pool).await?;
        jobs_from_rows(rows)
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>, StoreError> {
        let row = sqlx::query("SELECT body FROM runs WHERE id = ?")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => serde_json::from_str(r.try_get::<&str, _>("body")?)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("run: {e}"))),
            None => Ok(None),
        }
    }

    async fn run_jobs(&self, id: RunId) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query("SELECT body FROM jobs WHERE run = ? ORDER BY seq")
            .bind(id.0)
            .fetch_all(&self.pool)
            .await?;
        jobs_from_rows(rows)
    }

    async fn append_log(&self, job: JobId, data: &[u8], limit: u64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let size: i64 =
            sqlx::query_scalar("SELECT COALESCE(SUM(length(data)), 0) FROM job_logs WHERE job = ?")
                .bind(job.0)
                .fetch_one(&mut *tx)
                .await?;
        let size = u64::try_from(size).unwrap_or(0);
        let new = size + data.len() as u64;
        if new > limit {
            return Err(StoreError::LogFull { job, limit });
        }
        if !data.is_empty() {
            sqlx::query("INSERT INTO job_logs (job, data) VALUES (?, ?)")
                .bind(job.0)
                .bind(data)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(new)
    }

    async fn read_log(
        &self,
        job: JobId,
        offset: u64,
        max: usize,
    ) -> Result<(Vec<u8>, u64), StoreError> {
        let sizes: Vec<(i64, i64)> =
            sqlx::query_as("SELECT n, length(data) FROM job_logs WHERE job = ? ORDER BY n")
                .bind(job.0)
                .fetch_all(&self.pool)
                .await?;
        let sizes: Vec<(i64, u64)> = sizes
            .into_iter()
            .map(|(n, len)| (n, u64::try_from(len).unwrap_or(0)))
            .collect();
        let (total, window) = super::log_window(&sizes, offset, max);
        let Some((first, last, skip)) = window else {
            return Ok((Vec::new(), total));
        };
        let rows =
            sqlx::query("SELECT data FROM job_logs WHERE job = ? AND n >= ? AND n <= ? ORDER BY n")
                .bind(job.0)
                .bind(first)
                .bind(last)
                .fetch_all(&self.pool)
                .await?;
        let mut out = Vec::new();
        for r in rows {
            out.extend_from_slice(r.try_get::<&[u8], _>("data")?);
        }
        let skip = skip.min(out.len());
        out.drain(..skip);
        out.truncate(max);
        Ok((out, total))
    }

    async fn put_build(
        &self,
        org: &OrgId,
        app: &AppVersionId,
        build: &BuildRecord,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO builds (org, app, sha256, size) VALUES (?, ?, ?, ?) \
             ON CONFLICT(org, app) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size",
        )
        .bind(org.as_str())
        .bind(app.as_str())
        .bind(&build.sha256)
        .bind(i64_of(build.size))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn get_build(
        &self,
        org: &OrgId,
        app: &AppVersionId,
    ) -> Result<Option<BuildRecord>, StoreError> {
        let row = sqlx::query("SELECT sha256, size FROM builds WHERE org = ? AND app = ?")
            .bind(org.as_str())
            .bind(app.as_str())
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok(Some(BuildRecord {
                sha256: r.try_get("sha256")?,
                size: u64::try_from(r.try_get::<i64, _>("size")?).unwrap_or(0),
            })),
            None => Ok(None),
        }
    }

    async fn add_bundle(&self, org: &OrgId, sha256: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query("INSERT INTO bundles (org, sha256) VALUES (?, ?) ON CONFLICT DO NOTHING")
                .bind(org.as_str())
                .bind(sha256)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn has_bundle(&self, org: &OrgId, sha256: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM bundles WHERE org = ? AND sha256 = ?")
            .bind(org.as_str())
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    async fn add_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let kind = match token.kind {
            TokenKind::Admin => "admin",
            TokenKind::Org => "org",
            TokenKind::Agent => "agent",
        };
        sqlx::query(
            "INSERT INTO tokens (hash, kind, org) VALUES (?, ?, ?) \
             ON CONFLICT(hash) DO UPDATE SET kind = excluded.kind, org = excluded.org",
        )
        .bind(&token.hash)
        .bind(kind)
        .bind(token.org_id.as_ref().map(|o| o.as_str().to_string()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_token(&self, hash: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM tokens WHERE hash = ?")
            .bind(hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query("SELECT hash, kind, org FROM tokens ORDER BY hash")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind = match r.try_get::<&str, _>("kind")? {
                "admin" => TokenKind::Admin,
                "org" => TokenKind::Org,
                "agent" => TokenKind::Agent,
                other => return Err(StoreError::Corrupt(format!("token kind {other:?}"))),
            };
            let org = match r.try_get::<Option<String>, _>("org")? {
                Some(o) => Some(
                    OrgId::from_str(&o)
                        .map_err(|e| StoreError::Corrupt(format!("token org: {e}")))?,
                ),
                None => None,
            };
            out.push(TokenRecord {
                hash: r.try_get("hash")?,
                kind,
                org_id: org,
            });
        }
        Ok(out)
    }
}
