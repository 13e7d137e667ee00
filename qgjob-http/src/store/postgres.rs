//! [`PgStore`]: the store on PostgreSQL (sqlx, runtime queries only), for servers that
//! share one database. Same schema and semantics as the SQLite store; ids are `uuid`.
//! It also holds artifacts (tables `blobs` and `blob_parts`, written and read by
//! [`crate::blobs::Blobs::postgres`]), so every server on the database finds them.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use qgjob_core::{AppVersionId, Job, JobFilter, JobId, OrgId, RunId, Time};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, QueryBuilder, Row};

use super::{
    batch_lease_high_water, check_all_written, decode_job, encode_batch, i64_of, BuildRecord,
    RunRecord, Store, StoreError, TokenKind, TokenRecord, WriteBatch, DEFAULT_LIST_LIMIT,
    LEASE_HIGH_WATER,
};

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS jobs (
        seq BIGINT PRIMARY KEY,
        id UUID NOT NULL UNIQUE,
        org TEXT NOT NULL,
        state TEXT NOT NULL,
        run UUID,
        app TEXT NOT NULL,
        target TEXT NOT NULL,
        finished_at BIGINT,
        idem TEXT,
        body TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS jobs_org ON jobs(org, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run) WHERE run IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS jobs_idem ON jobs(org, idem) WHERE idem IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS runs (
        id UUID PRIMARY KEY,
        org TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        body TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS job_logs (
        n BIGSERIAL PRIMARY KEY,
        job UUID NOT NULL,
        data BYTEA NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS job_logs_job ON job_logs(job, n)",
    "CREATE TABLE IF NOT EXISTS builds (
        org TEXT NOT NULL,
        app TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        size BIGINT NOT NULL,
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
    // Artifacts (crate::blobs): a stored digest names the upload whose parts hold it.
    "CREATE TABLE IF NOT EXISTS blobs (
        sha256 TEXT PRIMARY KEY,
        upload TEXT NOT NULL UNIQUE,
        size BIGINT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS blob_parts (
        upload TEXT NOT NULL,
        n INT NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (upload, n)
    )",
];

/// Rows per multi-row upsert statement (10 parameters each, far below PostgreSQL's limit).
const CHUNK: usize = 500;

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// See [`PgStore::blob_pool`].
    blob_pool: PgPool,
    /// The session holding [`PgLock`] (backend pid, lock key, the database's start time),
    /// once taken: every write checks it still holds it.
    lock: Arc<OnceLock<Holder>>,
    /// This server's name among the sessions of the database (see [`app_name_sql`]).
    instance: Arc<str>,
}

/// Holds a PostgreSQL session-level advisory lock on the store's schema: while one server
/// holds it, no other can open the same store (their schedulers would hand out the same
/// sequence numbers). Dropping it closes its connection, which releases the lock.
#[derive(Debug)]
pub struct PgLock {
    conn: sqlx::PgConnection,
}

impl PgLock {
    /// Holds the lock until `stop` resolves, checking every `every` that this session
    /// still has it. When a check fails, times out or finds the lock gone (the database
    /// ended the session, or an operator did), `lost` is told why, once: another server
    /// may own the store by then, so this one must stop. Returns when `stop` resolves,
    /// releasing the lock.
    pub async fn hold(
        mut self,
        every: std::time::Duration,
        stop: impl std::future::Future<Output = ()>,
        lost: impl FnOnce(String),
    ) {
        tokio::pin!(stop);
        let mut lost = Some(lost);
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(every) => {}
            }
            if lost.is_none() {
                continue;
            }
            // Generous: a database pausing for a checkpoint must not stop a server that
            // still holds its lock (writes are fenced meanwhile, see `PgStore::take_over`).
            let check = tokio::time::timeout(every.max(LOCK_CHECK_TIMEOUT), async {
                let (pid, key, started): (i32, i64, f64) = sqlx::query_as(
                    "SELECT pg_backend_pid(), hashtext('qgjob:' || current_schema())::bigint, \
                     extract(epoch FROM pg_postmaster_start_time())::float8",
                )
                .fetch_one(&mut self.conn)
                .await?;
                lock_held(&mut self.conn, &Holder { pid, key, started }).await
            })
            .await;
            let why = match check {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => {
                    "the database no longer gives this server the store's lock".to_string()
                }
                Ok(Err(e)) => format!("cannot check the store's lock: {e}"),
                Err(_) => "the store's lock did not answer a check in time".to_string(),
            };
            if let Some(f) = lost.take() {
                f(why);
            }
        }
        // Closing the connection releases the lock.
        let _ = sqlx::Connection::close(self.conn).await;
    }
}

/// How long a check that this server still holds the store's lock may take.
const LOCK_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Settings every connection of a server asks for at start-up. The keepalives (probe after
/// 10 s of silence, every 5 s, give up after 3) and the user timeout (unacknowledged data
/// for 25 s) make PostgreSQL end the sessions of a server whose machine vanished (no TCP
/// reset) in about 25 s instead of the system's two hours: its lock is released, so a
/// standby can take over. The idle-in-transaction timeout ends a transaction its server
/// stopped driving (a partition mid-write), so nothing it holds blocks the next server.
const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "25000"),
    ("idle_in_transaction_session_timeout", "30000"),
];

/// The advisory lock every write transaction holds shared, and a server taking over the
/// store takes exclusively once (see [`PgStore::take_over`]).
const WRITE_FENCE_KEY: &str = "hashtext('qgjob:write:' || current_schema())::bigint";

/// The schema this release writes; a database that records it needs no DDL at start-up
/// (which would lock the tables a running server uses, see `PgStore::connect`).
const SCHEMA_VERSION: i64 = 1;

/// The `meta` key of [`SCHEMA_VERSION`].
const SCHEMA_VERSION_KEY: &str = "schema_version";

/// `application_name` of a server's connections, for [`PgStore::take_over`]: the store (a
/// hash of its schema; several stores may share a database) and the server's instance, and
/// for a standby's lock connection the word `standby` (a standby is never ended).
fn app_name_sql(standby: bool) -> String {
    format!(
        "SELECT set_config('application_name', 'qgjob ' || left(md5(current_schema()), 8) || \
         '{}' || $1, false)",
        if standby { " standby " } else { " " }
    )
}

impl PgStore {
    /// Takes the store's exclusive lock on a connection of its own, or `Ok(None)` when
    /// another session holds it.
    pub async fn lock_exclusive(&self) -> Result<Option<PgLock>, StoreError> {
        let mut conn = self.lock_connection().await?;
        Ok(self
            .try_lock_on(&mut conn)
            .await?
            .then_some(PgLock { conn }))
    }

    /// Waits until the store's exclusive lock is free and takes it, asking every `poll` on
    /// one connection of its own (a standby). A failed attempt (the database restarting,
    /// say) is reported to `failed` and tried again with a fresh connection.
    pub async fn lock_when_free(
        &self,
        poll: std::time::Duration,
        mut failed: impl FnMut(&StoreError),
    ) -> PgLock {
        let mut conn: Option<sqlx::PgConnection> = None;
        loop {
            let attempt = async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(self.lock_connection().await?),
                };
                self.try_lock_on(c).await
            };
            match attempt.await {
                Ok(true) => {
                    if let Some(conn) = conn {
                        return PgLock { conn };
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    failed(&e);
                    conn = None;
                }
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// A connection outside the pool for the lock (with the pool's [`SESSION_SETTINGS`]),
    /// named as a standby's until it has the lock.
    async fn lock_connection(&self) -> Result<sqlx::PgConnection, StoreError> {
        let mut conn = self.pool.acquire().await?.detach();
        sqlx::query(&app_name_sql(true))
            .bind(&*self.instance)
            .execute(&mut conn)
            .await?;
        Ok(conn)
    }

    /// Tries the lock on `conn` once; on success, every later write checks this session
    /// still holds it.
    async fn try_lock_on(&self, conn: &mut sqlx::PgConnection) -> Result<bool, StoreError> {
        let (got, key, pid, started): (bool, i64, i32, f64) = sqlx::query_as(
            "SELECT pg_try_advisory_lock(k), k, pg_backend_pid(), \
             extract(epoch FROM pg_postmaster_start_time())::float8 \
             FROM (SELECT hashtext('qgjob:' || current_schema())::bigint AS k) q",
        )
        .fetch_one(&mut *conn)
        .await?;
        if got {
            // The holder is not a standby any more: a later server may end its session.
            sqlx::query(&app_name_sql(false))
                .bind(&*self.instance)
                .execute(&mut *conn)
                .await?;
            // A store locks once: a standby's store has no lock until it takes one.
            // Recorded after the renaming: had that failed, the caller drops this session
            // (the lock with it) and may lock again on another, the one writes must check.
            let _ = self.lock.set(Holder { pid, key, started });
        }
        Ok(got)
    }

    /// Whether `e` is PostgreSQL ending the session on request (SQLSTATE 57P01,
    /// `terminating connection due to administrator command`): `pg_terminate_backend`, as
    /// a server taking the store over does to the sessions of the store's other servers
    /// (see [`PgStore::take_over`]), or the database shutting down.
    pub fn session_ended(e: &StoreError) -> bool {
        matches!(e, StoreError::Db(sqlx::Error::Database(d)) if d.code().as_deref() == Some("57P01"))
    }

    /// Makes the store this server's alone, once it holds the lock and before it reads
    /// anything: ends every session an earlier server of this store left (a server cut
    /// off from the database may still have a write in flight, and its transactions may
    /// hold locks this server would wait on), then waits until no write transaction that
    /// began before is still open. Every write holds `WRITE_FENCE_KEY` shared and checks
    /// the lock inside its transaction, so a write of an earlier server either committed
    /// before this returns, and is restored, or fails its check. Returns how many sessions
    /// it ended. Ending them needs the same database role (or `pg_signal_backend`); without
    /// it this only waits, for at most the earlier server's idle-in-transaction timeout.
    /// Servers still starting beside it work on connections named alike and lose them
    /// too; they start again (`start_pg` in the crate root).
    pub async fn take_over(&self, lock: &mut PgLock) -> Result<u64, StoreError> {
        let ended = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND application_name LIKE 'qgjob ' || left(md5(current_schema()), 8) || ' %' \
             AND application_name NOT LIKE 'qgjob ' || left(md5(current_schema()), 8) || ' standby %' \
             AND application_name <> 'qgjob ' || left(md5(current_schema()), 8) || ' ' || $1",
        )
        .bind(&*self.instance)
        .fetch_one(&mut lock.conn)
        .await;
        let ended = match ended {
            Ok(n) => u64::try_from(n).unwrap_or(0),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot end the sessions an earlier server left; waiting for them instead"
                );
                0
            }
        };
        let barrier = async {
            sqlx::query(&format!("SELECT pg_advisory_lock({WRITE_FENCE_KEY})"))
                .execute(&mut lock.conn)
                .await?;
            sqlx::query(&format!("SELECT pg_advisory_unlock({WRITE_FENCE_KEY})"))
                .execute(&mut lock.conn)
                .await?;
            Ok::<_, StoreError>(())
        };
        tokio::pin!(barrier);
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(10), &mut barrier).await {
                Ok(r) => break r?,
                Err(_) => {
                    tracing::warn!("waiting for the write transactions of an earlier server to end")
                }
            }
        }
        Ok(ended)
    }

    /// A transaction that, once this store holds the lock, holds the write fence shared
    /// until it ends: a server taking the store over waits for it before it restores (see
    /// [`PgStore::take_over`]). Taken with `BEGIN`, in the same round trip.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        Ok(if self.lock.get().is_some() {
            self.pool
                .begin_with(format!(
                    "BEGIN; SELECT pg_advisory_xact_lock_shared({WRITE_FENCE_KEY})"
                ))
                .await?
        } else {
            self.pool.begin().await?
        })
    }

    /// A transaction for a write: it holds the write fence shared and, once this store
    /// holds the lock, fails with [`StoreError::Fenced`] unless it still does.
    async fn fenced(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(holder) = self.lock.get() {
            if !lock_held(&mut tx, holder).await? {
                tx.rollback().await?;
                return Err(StoreError::Fenced(format!(
                    "its lock on the PostgreSQL store (session {}) was lost",
                    holder.pid
                )));
            }
        }
        Ok(tx)
    }

    /// Connects to `url` (e.g. `postgres://postgres@127.0.0.1:5432/qgjob`), using `schema`
    /// when given (created if missing), and creates the tables if needed.
    pub async fn connect(url: &str, schema: Option<&str>) -> Result<Self, StoreError> {
        // Without this, every start logs a NOTICE per `CREATE ... IF NOT EXISTS` it skips.
        let mut opts =
            PgConnectOptions::from_str(url)?.options([("client_min_messages", "warning")]);
        if let Some(s) = schema {
            if !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || s.is_empty() {
                return Err(StoreError::Corrupt(format!("bad schema name {s:?}")));
            }
            // Create the schema on a plain connection first, then pin every pooled
            // connection's search_path to it.
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(opts.clone())
                .await?;
            sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {s}"))
                .execute(&admin)
                .await?;
            admin.close().await;
            opts = opts.options([("search_path", s)]);
        }
        opts = opts.options(SESSION_SETTINGS);
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd)
            .map_err(|e| StoreError::Corrupt(format!("no randomness for an instance name: {e}")))?;
        let instance: Arc<str> = hex::encode(rnd).into();
        let named = |pool: PgPoolOptions| {
            let instance = Arc::clone(&instance);
            pool.after_connect(move |conn, _| {
                let instance = Arc::clone(&instance);
                Box::pin(async move {
                    sqlx::query(&app_name_sql(false))
                        .bind(&*instance)
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            })
        };
        // Fail in seconds, not the default half minute, when the database is unreachable:
        // the server opens its store before it listens.
        let pool = named(PgPoolOptions::new())
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(opts.clone())
            .await?;
        let blob_pool = named(PgPoolOptions::new())
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(30))
            .connect_lazy_with(opts);
        // `ALTER TABLE` locks its table even when there is nothing to do, and `CREATE INDEX
        // IF NOT EXISTS` may too: a standby (re)starting beside a serving server must not
        // stall its writes, so a database at this schema version gets no DDL.
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT v FROM meta WHERE to_regclass('meta') IS NOT NULL AND k = $1",
        )
        .bind(SCHEMA_VERSION_KEY)
        .fetch_optional(&pool)
        .await
        .or_else(|e| match &e {
            // No `meta` table at all: a new database.
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Ok(None),
            _ => Err(e),
        })?;
        if let Some(v) = current.filter(|v| *v > SCHEMA_VERSION) {
            pool.close().await;
            return Err(StoreError::Corrupt(format!(
                "the database was written by a newer qgjob release (schema {v}; this one \
                 knows {SCHEMA_VERSION}): run that release, or a newer one"
            )));
        }
        if current == Some(SCHEMA_VERSION) {
            return Ok(PgStore {
                pool,
                blob_pool,
                lock: Arc::new(OnceLock::new()),
                instance,
            });
        }
        // Two servers started together on a new database (a server and its standby) would
        // race in `CREATE TABLE IF NOT EXISTS`, which is not safe against itself: one
        // transaction under a lock of its own makes the schema one server's at a time.
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('qgjob:schema:' || current_schema()))")
            .execute(&mut *tx)
            .await?;
        sqlx::query(SCHEMA[0]).execute(&mut *tx).await?;
        // Databases made before the idempotency column existed get it now.
        sqlx::query("ALTER TABLE jobs ADD COLUMN IF NOT EXISTS idem TEXT")
            .execute(&mut *tx)
            .await?;
        for stmt in &SCHEMA[1..] {
            sqlx::query(stmt).execute(&mut *tx).await?;
        }
        // A database written before the lease high-water mark was kept: take it from the
        // job bodies, once.
        let high_water: Option<i64> = sqlx::query_scalar("SELECT v FROM meta WHERE k = $1")
            .bind(LEASE_HIGH_WATER)
            .fetch_optional(&mut *tx)
            .await?;
        if high_water.is_none() {
            sqlx::query(
                "INSERT INTO meta (k, v) SELECT $1, COALESCE(MAX(GREATEST(COALESCE((body::jsonb->>'lease')::bigint, 0), \
                 COALESCE((body::jsonb->>'last_lease')::bigint, 0))), 0) FROM jobs \
                 ON CONFLICT (k) DO NOTHING",
            )
            .bind(LEASE_HIGH_WATER)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO meta (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        )
        .bind(SCHEMA_VERSION_KEY)
        .bind(SCHEMA_VERSION)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(PgStore {
            pool,
            blob_pool,
            lock: Arc::new(OnceLock::new()),
            instance,
        })
    }

    /// The connections artifact transfers use: a pool of their own, so that uploads and
    /// downloads never hold back a job write.
    pub(crate) fn blob_pool(&self) -> &PgPool {
        &self.blob_pool
    }

    /// Closes the pools, leaving behind after `CLOSE_LIMIT` a connection that does not
    /// answer. A connection given back mid-query (a write abandoned when its server stops)
    /// is first checked with a query of its own, with no time limit; when the database's
    /// answers no longer arrive (its network cut: no reset), that waits until TCP gives up,
    /// a quarter of an hour later, and the pool's close with it. Exiting closes the socket.
    pub async fn close(&self) {
        let closing = async {
            self.blob_pool.close().await;
            self.pool.close().await;
        };
        if tokio::time::timeout(CLOSE_LIMIT, closing).await.is_err() {
            tracing::warn!(
                limit_s = CLOSE_LIMIT.as_secs(),
                "PostgreSQL did not answer while its connections closed; leaving them"
            );
        }
    }
}

/// How long [`PgStore::close`] waits for the store's connections to close.
const CLOSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The session holding a store's lock. A backend pid alone does not name a session: after
/// the database restarts (a fresh pid namespace, a reboot) another server's session may get
/// the same pid, and its lock would pass for this one's. With the database's start time it
/// does (a pid is not reused while the database runs, short of a wraparound, and a taker
/// ends the old server's sessions anyway). Cheaper than matching `application_name`, which
/// needs `pg_stat_activity` in every write: that cost single-client submits 15%.
#[derive(Debug, Clone)]
struct Holder {
    pid: i32,
    key: i64,
    /// `pg_postmaster_start_time()` in seconds: a number, so that no session setting
    /// (time zone, date style) changes how it compares.
    started: f64,
}

/// Pushes a condition true while session `holder` holds its advisory lock (a bigint key
/// shows in `pg_locks` as its high and low 32 bits, `objsubid` 1).
fn push_lock_held(qb: &mut QueryBuilder<'_, Postgres>, holder: &Holder) {
    qb.push("extract(epoch FROM pg_postmaster_start_time())::float8 = ")
        .push_bind(holder.started)
        .push(
            " AND EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND objsubid = 1 AND pid = ",
        )
        .push_bind(holder.pid)
        .push(" AND classid::bigint = (")
        .push_bind(holder.key)
        .push(" >> 32) & 4294967295 AND objid::bigint = ")
        .push_bind(holder.key)
        .push(" & 4294967295)");
}

/// Whether session `holder` still holds its advisory lock.
async fn lock_held(conn: &mut sqlx::PgConnection, holder: &Holder) -> Result<bool, StoreError> {
    let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT ");
    push_lock_held(&mut qb, holder);
    Ok(qb.build_query_scalar().fetch_one(conn).await?)
}

/// The stored lease high-water mark; `None` in a database written before it was kept.
async fn stored_lease_high_water(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    Ok(sqlx::query_scalar("SELECT v FROM meta WHERE k = $1")
        .bind(LEASE_HIGH_WATER)
        .fetch_optional(pool)
        .await?)
}

fn jobs_from_rows(rows: Vec<PgRow>) -> Result<Vec<Job>, StoreError> {
    rows.iter()
        .map(|r| decode_job(r.try_get::<&str, _>("body")?))
        .collect()
}

#[async_trait]
impl Store for PgStore {
    async fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let (rows, runs) = encode_batch(batch)?;
        let mut tx = self.begin_write().await?;
        for chunk in rows.chunks(CHUNK) {
            let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO jobs (seq, id, org, state, run, app, target, finished_at, idem, body) \
                 SELECT * FROM (",
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
            qb.push(") AS v (seq, id, org, state, run, app, target, finished_at, idem, body)");
            // The lock's session can end under a running server (a database restart or
            // failover, a killed connection), and another server may then take the store:
            // rows are written only while this server's session still holds the lock.
            // Checked in the statement itself, so it costs no extra round trip.
            if let Some(holder) = self.lock.get() {
                qb.push(" WHERE ");
                push_lock_held(&mut qb, holder);
            }
            qb.push(
                " ON CONFLICT (seq) DO UPDATE SET state = excluded.state, \
                 finished_at = excluded.finished_at, body = excluded.body \
                 WHERE jobs.id = excluded.id",
            );
            let written = qb.build().execute(&mut *tx).await?;
            if let Err(e) = check_all_written(written.rows_affected(), chunk) {
                // Say which guard it was: the lock, or rows of another server's jobs.
                let e = match self.lock.get() {
                    Some(holder) if !lock_held(&mut tx, holder).await? => {
                        StoreError::Fenced(format!(
                            "its lock on the PostgreSQL store (session {}) was lost",
                            holder.pid
                        ))
                    }
                    _ => e,
                };
                // Now, not whenever the pool next uses the connection: the insert holds
                // locks on the table until then.
                tx.rollback().await?;
                return Err(e);
            }
        }
        for (r, body) in runs {
            sqlx::query(
                "INSERT INTO runs (id, org, created_at, body) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
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
                "INSERT INTO meta (k, v) VALUES ($1, $2) \
                 ON CONFLICT (k) DO UPDATE SET v = GREATEST(meta.v, excluded.v)",
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
            "SELECT body FROM jobs WHERE finished_at IS NULL OR finished_at >= $1 \
             OR seq = (SELECT MAX(seq) FROM jobs) ORDER BY seq",
        )
        .bind(i64_of(finished_since.0))
        .fetch_all(&self.pool)
        .await?;
        jobs_from_rows(rows)
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query("SELECT body FROM jobs WHERE id = $1")
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
            "SELECT body FROM jobs WHERE org = $1 AND idem = $2 ORDER BY seq DESC LIMIT 1",
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
        let mut qb: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT body FROM jobs WHERE seq > ");
        qb.push_bind(i64_of(filter.after_seq.unwrap_or(0)));
        if let Some(o) = &filter.org_id {
            qb.push(" AND org = ").push_bind(o.as_str());
        }
        if let Some(s) = filter.state {
            qb.push(" AND state = ").push_bind(s.as_str());
        }
        if let Some(a) = &filter.app_version_id {
            qb.push(" AND app = ").push_bind(a.as_str());
        }
        if let Some(t) = &filter.target {
            qb.push(" AND target = ").push_bind(t.as_str());
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
        let row = sqlx::query("SELECT body FROM runs WHERE id = $1")
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
        let rows = sqlx::query("SELECT body FROM jobs WHERE run = $1 ORDER BY seq")
            .bind(id.0)
            .fetch_all(&self.pool)
            .await?;
        jobs_from_rows(rows)
    }

    async fn append_log(&self, job: JobId, data: &[u8], limit: u64) -> Result<u64, StoreError> {
        let mut tx = self.fenced().await?;
        // Serialise appends to one job's log, so two cannot both pass the size check.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 0))")
            .bind(job.0)
            .execute(&mut *tx)
            .await?;
        let size: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(length(data)), 0)::BIGINT FROM job_logs WHERE job = $1",
        )
        .bind(job.0)
        .fetch_one(&mut *tx)
        .await?;
        let new = u64::try_from(size).unwrap_or(0) + data.len() as u64;
        if new > limit {
            return Err(StoreError::LogFull { job, limit });
        }
        if !data.is_empty() {
            sqlx::query("INSERT INTO job_logs (job, data) VALUES ($1, $2)")
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
        let sizes: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT n, octet_length(data)::BIGINT FROM job_logs WHERE job = $1 ORDER BY n",
        )
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
        let rows = sqlx::query(
            "SELECT data FROM job_logs WHERE job = $1 AND n >= $2 AND n <= $3 ORDER BY n",
        )
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
        let mut tx = self.fenced().await?;
        sqlx::query(
            "INSERT INTO builds (org, app, sha256, size) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (org, app) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size",
        )
        .bind(org.as_str())
        .bind(app.as_str())
        .bind(&build.sha256)
        .bind(i64_of(build.size))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_build(
        &self,
        org: &OrgId,
        app: &AppVersionId,
    ) -> Result<Option<BuildRecord>, StoreError> {
        let row = sqlx::query("SELECT sha256, size FROM builds WHERE org = $1 AND app = $2")
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
        let mut tx = self.fenced().await?;
        let done =
            sqlx::query("INSERT INTO bundles (org, sha256) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(org.as_str())
                .bind(sha256)
                .execute(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn has_bundle(&self, org: &OrgId, sha256: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM bundles WHERE org = $1 AND sha256 = $2")
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
        let mut tx = self.fenced().await?;
        sqlx::query(
            "INSERT INTO tokens (hash, kind, org) VALUES ($1, $2, $3) \
             ON CONFLICT (hash) DO UPDATE SET kind = excluded.kind, org = excluded.org",
        )
        .bind(&token.hash)
        .bind(kind)
        .bind(token.org_id.as_ref().map(|o| o.as_str()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn remove_token(&self, hash: &str) -> Result<bool, StoreError> {
        let mut tx = self.fenced().await?;
        let done = sqlx::query("DELETE FROM tokens WHERE hash = $1")
            .bind(hash)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{TokenKind, TokenRecord};
    use qgjob_core::{GroupedScheduler, JobSpec, Scheduler, SchedulerConfig};

    /// The test database, as the integration tests name it (`QGJOB_TEST_PG_URL`).
    fn pg_url() -> String {
        std::env::var("QGJOB_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
    }

    /// A store in a fresh schema and the schema's name. No server answering is a failure
    /// (CI starts one), unless `QGJOB_SKIP_PG=1` asks to leave PostgreSQL out: then `None`.
    async fn fresh_store(what: &str) -> Option<(PgStore, Schema)> {
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).unwrap();
        let schema = format!("qgjob_test_{}", hex::encode(rnd));
        match PgStore::connect(&pg_url(), Some(&schema)).await {
            Ok(s) => Some((s, Schema(schema))),
            Err(e) if std::env::var("QGJOB_SKIP_PG").is_ok_and(|v| v == "1") => {
                eprintln!(
                    "QGJOB_SKIP_PG=1: skipping the PostgreSQL {what} ({} : {e})",
                    pg_url()
                );
                None
            }
            Err(e) => panic!(
                "PostgreSQL not reachable at {} ({e}); start it, point QGJOB_TEST_PG_URL at \
                 one, or set QGJOB_SKIP_PG=1 to leave it out",
                pg_url()
            ),
        }
    }

    /// Drops its schema when dropped, the test passing or not.
    struct Schema(String);

    impl Drop for Schema {
        fn drop(&mut self) {
            let schema = self.0.clone();
            // Dropped inside the test's runtime: a thread with its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok(pool) = PgPool::connect(&pg_url()).await {
                        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                            .execute(&pool)
                            .await;
                        pool.close().await;
                    }
                });
            })
            .join();
        }
    }

    /// A queued job, as a server writes it.
    fn a_job() -> Job {
        let mut s = GroupedScheduler::new(SchedulerConfig::default());
        let spec = JobSpec::new(
            OrgId::new("acme").unwrap(),
            AppVersionId::new("v1").unwrap(),
            vec!["t.spec.js".to_string()],
        );
        s.submit(Time(1000), spec).unwrap();
        s.list(&JobFilter::default())
            .into_iter()
            .next()
            .cloned()
            .unwrap()
    }

    /// The lock's holder is its session in this run of the database: the same backend pid
    /// and key recorded in another run (after a restart a new session, maybe another
    /// server's, can get that pid and hold the same lock) are not this server's lock, and
    /// a store that recorded them writes nothing. Neither is another session of this run,
    /// nor another key.
    #[tokio::test]
    async fn the_lock_holder_is_checked_with_the_database_start_time() {
        let Some((store, _schema)) = fresh_store("lock holder test").await else {
            return;
        };
        let lock = store.lock_exclusive().await.unwrap().expect("a free store");
        let holder = store
            .lock
            .get()
            .cloned()
            .expect("the store names its holder");
        let mut conn = store.pool.acquire().await.unwrap();
        assert!(lock_held(&mut conn, &holder).await.unwrap());

        // The holder's pid and key, in the run of the database before a restart.
        let earlier = Holder {
            started: holder.started - 3600.0,
            ..holder.clone()
        };
        assert!(!lock_held(&mut conn, &earlier).await.unwrap());
        // A session of this run that holds no lock, and a key the holder does not hold.
        let other: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_ne!(other, holder.pid);
        let not_holding = Holder {
            pid: other,
            ..holder.clone()
        };
        assert!(!lock_held(&mut conn, &not_holding).await.unwrap());
        let other_key = Holder {
            key: holder.key ^ 1,
            ..holder.clone()
        };
        assert!(!lock_held(&mut conn, &other_key).await.unwrap());
        drop(conn);

        // Writes check the holder the store recorded: with the earlier run's, none lands
        // (jobs are checked in their insert, the other tables when their transaction begins).
        let job = a_job();
        let batch = WriteBatch {
            jobs: vec![job.clone()],
            runs: vec![],
        };
        let token = TokenRecord {
            hash: "ab".repeat(32),
            kind: TokenKind::Admin,
            org_id: None,
        };
        let stale = PgStore {
            lock: Arc::new(OnceLock::from(earlier)),
            ..store.clone()
        };
        let e = stale.write(&batch).await.expect_err("a stale holder");
        assert!(matches!(e, StoreError::Fenced(_)), "{e}");
        let e = stale.add_token(&token).await.expect_err("a stale holder");
        assert!(matches!(e, StoreError::Fenced(_)), "{e}");
        assert_eq!(store.get_job(job.id).await.unwrap(), None);
        assert!(store.tokens().await.unwrap().is_empty());
        // With the holder as it is, they do.
        store.write(&batch).await.unwrap();
        store.add_token(&token).await.unwrap();
        assert_eq!(store.get_job(job.id).await.unwrap(), Some(job));
        assert_eq!(store.tokens().await.unwrap().len(), 1);

        // Closed while this runtime runs, before the schema is dropped under them.
        drop(lock);
        store.close().await;
    }
}
