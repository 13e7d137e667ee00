//! qgjob-http: the axum server around the qgjob scheduler — user API, agent protocol, live
//! events, artifacts, auth, metrics — and its durable store.
//!
//! Entry points: [`run_server`] (binds, prints `qgjob server listening on http://ADDR`,
//! stops on SIGTERM/ctrl-c; what `qgjob server` calls), [`serve`] (runs on an already-bound
//! listener until a shutdown future resolves; what tests use with `127.0.0.1:0`) and
//! [`app`] (the router for given state).
//!
//! # Design
//!
//! - **Scheduler**: one [`qgjob_core::GroupedScheduler`] behind a `std::sync::Mutex`, never
//!   held across `.await`; every mutating call gets `now` = Unix milliseconds.
//! - **Persist before answering**: after each change the handler drains the scheduler's
//!   events and queues the changed jobs (full serde JSON plus indexed columns) to a single
//!   writer task while still holding the lock, then awaits its own acknowledgement. The
//!   writer group-commits every pending request in one SQLite transaction, then publishes the
//!   events (SSE) in commit order. That is what makes durable submissions fast.
//! - **Durability level**: SQLite in WAL mode with `synchronous=NORMAL` by default: a
//!   committed write survives `kill -9` of the server, but not necessarily a power cut.
//!   [`Synchronous::Full`] (`ServerOptions::synchronous`) fsyncs every commit.
//! - **Restart**: the scheduler is rebuilt with `GroupedScheduler::restore` from every
//!   unfinished job, jobs finished within the retention window (so idempotency keys and fresh
//!   reads keep working), and the job with the highest seq (so seqs never repeat). Queued
//!   jobs keep their order. Running jobs keep their leases, with the deadline pushed to at
//!   least one lease TTL after the restart: agents could not heartbeat while the server was
//!   down. Heartbeats are therefore not persisted. Devices are not persisted: agents
//!   register again (a device that held a lease gets it back).
//! - **Lease fencing across restarts**: every store write also raises a persisted
//!   high-water mark of lease ids (`Store::lease_high_water`), and a restarted scheduler
//!   issues ids above it, so no lease id is ever issued twice, even when the jobs that held
//!   the newest leases finished long before the restart and are not restored.
//! - **Idempotency** keys are deduplicated by the scheduler among the jobs it holds, and
//!   through an indexed store lookup for jobs it forgot (finished before the retention
//!   window, `Limits::retention_ms`, one hour).
//! - **Reads**: a job is read from the scheduler when it holds it, else from the store;
//!   listings and runs come from the store (everything acknowledged is there).
//! - **Logs** are stored in the database, appended per job, size-limited.
//! - **Artifacts** are files under `DATA_DIR/artifacts/sha256/<hex>`, rows of 1 MiB parts
//!   in the database on PostgreSQL (so any server of the store has them), or in memory with
//!   `--store memory`; the build registry maps (org, app version) to a digest.
//! - **Store trait**: [`store::Store`], implemented by [`store::SqliteStore`] (default),
//!   [`store::PgStore`] (PostgreSQL) and [`store::MemoryStore`]; one generic test suite runs
//!   against all three. Several servers do not serve one store at once: each holds its own
//!   scheduler in memory. A server therefore locks its data dir (`DATA_DIR/lock`) or, on
//!   PostgreSQL, takes an advisory lock on the store's schema; a second server on the same
//!   store is refused before it listens ([`ServerError::Unavailable`]).
//! - **Standby** ([`ServerOptions::standby`], PostgreSQL only): the second server waits for
//!   the lock instead, answering every request `503 standby`, and then starts as a restarted
//!   server would. A serving server checks every few seconds that it still holds the lock
//!   and stops when it does not, so it never answers beside the one that took over.
//! - **Start-up order**: [`run_server`] binds, opens and locks the store, loads the tokens
//!   and restores the scheduler, and only then prints its `listening` line, so a script or
//!   supervisor waiting for that line never sees a server that is about to fail.
//!
//! # Known limits
//!
//! - A failed store write is answered 500, but the scheduler in memory keeps the change.
//! - Figures (`cargo bench -p qgjob-http --bench load`) are measured, not asserted.
#![warn(missing_docs)]

pub mod agent;
pub mod api;
pub mod auth;
pub mod blobs;
pub mod conn;
pub mod error;
pub mod intake;
pub mod metrics;
pub mod ops;
pub mod state;
pub mod store;

use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;
use qgjob_core::{GroupedScheduler, LeaseId, SchedulerConfig, Time};
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

pub use auth::TokenSpec;
pub use error::{ApiError, ServerError};
pub use state::{App, AppState, Limits};
pub use store::{Synchronous, TokenKind};

use crate::auth::Auth;
use crate::blobs::Blobs;
use crate::store::{MemoryStore, PgStore, SqliteStore, Store};

/// Which store the server keeps its state in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// The embedded SQLite database under the data dir (durable).
    #[default]
    Sqlite,
    /// Memory only: everything is lost when the server stops.
    Memory,
    /// PostgreSQL at `ServerOptions::postgres_url`, artifacts included (the data dir is
    /// only read once, for artifacts an earlier release kept there).
    Postgres,
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Where [`run_server`] binds (ignored by [`serve`], which gets a listener).
    pub addr: SocketAddr,
    /// Where the SQLite store and artifacts live (default `./qgjob-data`). On PostgreSQL,
    /// only where artifacts an earlier release kept on disk are imported from.
    pub data_dir: Option<PathBuf>,
    /// Which store.
    pub store: StoreKind,
    /// The database URL for [`StoreKind::Postgres`], e.g.
    /// `postgres://postgres@127.0.0.1:5432/qgjob`.
    pub postgres_url: Option<String>,
    /// Tokens accepted, besides those in `tokens_file` and those created via the admin API.
    pub tokens: Vec<TokenSpec>,
    /// A file of tokens (`admin TOKEN`, `agent TOKEN`, `org ORG_ID TOKEN` per line).
    pub tokens_file: Option<PathBuf>,
    /// Scheduler tunables.
    pub scheduler: SchedulerConfig,
    /// SQLite durability level.
    pub synchronous: Synchronous,
    /// Size limits and the retention of finished jobs in memory.
    pub limits: Limits,
    /// With [`StoreKind::Postgres`]: when another server holds the store, stand by
    /// (answering every request 503 `standby`) and take over once it stops, rather than
    /// refusing to start. A server that finds the store free starts at once either way.
    pub standby: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 7878)),
            data_dir: Some(PathBuf::from("./qgjob-data")),
            store: StoreKind::Sqlite,
            postgres_url: None,
            tokens: Vec::new(),
            tokens_file: None,
            scheduler: SchedulerConfig {
                // Agents poll or heartbeat every few seconds: a device silent for three
                // lease TTLs has no agent any more.
                forget_silent_devices_ms: Some(3 * SchedulerConfig::default().lease_ttl_ms),
                ..SchedulerConfig::default()
            },
            synchronous: Synchronous::Normal,
            limits: Limits::default(),
            standby: false,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes: 1024 * 1024,
            run_body_bytes: 64 * 1024 * 1024,
            artifact_bytes: 2 * 1024 * 1024 * 1024,
            log_bytes: 16 * 1024 * 1024,
            retention_ms: 3600 * 1000,
            header_read_timeout_ms: conn::HEADER_READ_TIMEOUT.as_millis() as u64,
            body_timeout_ms: 60_000,
            intake_bytes: 256 * 1024 * 1024,
            upload_stall_ms: 60_000,
            max_connections: conn::MAX_CONNECTIONS,
            drain_ms: conn::DRAIN_LIMIT.as_millis() as u64,
        }
    }
}

/// The router for a running state.
pub fn app(state: AppState) -> Router {
    let limits = state.limits;
    let user = Router::new()
        .route("/v1/jobs", post(api::submit_job).get(api::list_jobs))
        .route("/v1/jobs/{job_id}", get(api::get_job))
        .route("/v1/jobs/{job_id}/cancel", post(api::cancel_job))
        .route("/v1/jobs/{job_id}/logs", get(api::job_logs))
        .route("/v1/jobs/{job_id}/results", get(api::job_results))
        .route("/v1/jobs/{job_id}/events", get(api::job_events))
        .route("/v1/runs/{run_id}", get(api::get_run))
        .route("/v1/runs/{run_id}/cancel", post(api::cancel_run))
        .route("/v1/runs/{run_id}/events", get(api::run_events))
        .route(
            "/v1/apps/{org_id}/{app_version_id}",
            put(api::put_app).get(api::get_app),
        )
        .route(
            "/v1/apps/{org_id}/{app_version_id}/build",
            get(api::download_app),
        )
        .route("/v1/bundles", put(api::put_bundle))
        .route("/v1/admin/tokens", post(api::create_token))
        .route("/v1/admin/tokens/revoke", post(api::revoke_token))
        .route("/v1/agent/devices", post(agent::register_device))
        .route(
            "/v1/agent/devices/{device_id}",
            delete(agent::unregister_device),
        )
        .route("/v1/agent/lease", post(agent::lease))
        .route(
            "/v1/agent/leases/{lease_id}/heartbeat",
            post(agent::heartbeat),
        )
        .route(
            "/v1/agent/leases/{lease_id}/jobs/{job_id}/complete",
            post(agent::complete),
        )
        .route(
            "/v1/agent/leases/{lease_id}/jobs/{job_id}/fail",
            post(agent::fail),
        )
        .route(
            "/v1/agent/leases/{lease_id}/jobs/{job_id}/logs",
            post(agent::upload_logs),
        )
        .route("/v1/agent/builds/{sha256}", get(agent::download_blob))
        .route("/v1/agent/bundles/{sha256}", get(agent::download_blob))
        .route(
            "/v1/agent/apps/{org_id}/{app_version_id}",
            get(agent::app_build),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .layer(DefaultBodyLimit::max(limits.body_bytes));
    // Batches are bigger than single requests; uploads stream and count their own bytes.
    let runs = Router::new()
        .route("/v1/runs", post(api::submit_run))
        .layer(DefaultBodyLimit::max(limits.run_body_bytes));
    user.merge(runs)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::open_guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            refuse_after_store_failure,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(intake::Intake::new(
                limits.intake_bytes,
                std::time::Duration::from_millis(limits.body_timeout_ms),
                std::time::Duration::from_millis(limits.upload_stall_ms),
            )),
            intake::guard,
        ))
        .layer(axum::middleware::from_fn(error::log_refusals))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Once a store write failed for good the scheduler holds changes the store does not, so
/// nothing is answered from it any more (reads included) while the server stops.
async fn refuse_after_store_failure(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match state.fatal.error() {
        Some(e) => axum::response::IntoResponse::into_response(e),
        None => next.run(req).await,
    }
}

/// A store to close on shutdown.
enum Closer {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// What keeps a second server off this one's state until this one stops: a lock on the
/// data dir, or on PostgreSQL a lock in the database. Two servers on one store would
/// each restore their own scheduler and hand out the same sequence numbers, so one's
/// acknowledged jobs would overwrite the other's.
#[derive(Default)]
struct Guards {
    _dir: Option<std::fs::File>,
    pg: Option<store::PgLock>,
}

/// The store, artifacts, what to close and what to hold while serving.
struct Opened {
    store: Arc<dyn Store>,
    blobs: Blobs,
    closer: Option<Closer>,
    guards: Guards,
}

/// Creates the data dir and takes its lock (`DATA_DIR/lock`), which the OS releases when
/// the server exits, however it exits.
fn lock_data_dir(opts: &ServerOptions) -> Result<(PathBuf, std::fs::File), ServerError> {
    let dir = opts
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("./qgjob-data"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| ServerError::Config(format!("data dir {}: {e}", dir.display())))?;
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ServerError::Config(format!("data dir {}: {e}", dir.display())))?;
    match file.try_lock() {
        Ok(()) => Ok((dir, file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServerError::Unavailable(format!(
            "data dir {} is in use by another qgjob server (stop it, or give this one its own --data-dir)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(ServerError::Io(e)),
    }
}

/// The database URL (or key=value connection string) without its credentials, for
/// messages: no user info, and no `password=` value, whether in a query or a DSN.
fn redact(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_string(),
    };
    let mut from = 0;
    while let Some(i) = out[from..].to_ascii_lowercase().find("password=") {
        let start = from + i + "password=".len();
        let end = out[start..]
            .find(|c: char| c == '&' || c.is_whitespace())
            .map_or(out.len(), |e| start + e);
        out.replace_range(start..end, "***");
        from = start + 3;
    }
    out
}

/// What a server waiting on its store stops for: the shutdown it was given.
type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Opens and locks the store. `None` when a standby was told to stop before it took over.
async fn open_store(
    opts: &ServerOptions,
    listener: &TcpListener,
    shutdown: &mut Shutdown,
    configured_tokens: usize,
) -> Result<Option<Opened>, ServerError> {
    if opts.standby && opts.store != StoreKind::Postgres {
        return Err(ServerError::Config(
            "standing by needs the PostgreSQL store: servers on other stores cannot share it"
                .into(),
        ));
    }
    let opened = match opts.store {
        StoreKind::Memory => Opened {
            store: Arc::new(MemoryStore::new()),
            blobs: Blobs::memory(),
            closer: None,
            guards: Guards::default(),
        },
        StoreKind::Sqlite => {
            let (dir, lock) = lock_data_dir(opts)?;
            let db = SqliteStore::open(&dir.join("qgjob.sqlite3"), opts.synchronous).await?;
            let blobs = Blobs::dir(dir.join("artifacts"))?;
            Opened {
                store: Arc::new(db.clone()),
                blobs,
                closer: Some(Closer::Sqlite(db)),
                guards: Guards {
                    _dir: Some(lock),
                    pg: None,
                },
            }
        }
        StoreKind::Postgres => {
            let url = opts.postgres_url.as_deref().ok_or_else(|| {
                ServerError::Config("the postgres store needs a database URL".into())
            })?;
            let (db, started) = start_pg(url, opts.standby).await?;
            let mut pg = match started {
                PgStart::Locked(pg) => pg,
                PgStart::Held { stored_tokens } if opts.standby => {
                    // What would stop it when it takes over is checked now: a standby
                    // that cannot serve is no standby.
                    open_mode(listener.local_addr()?, configured_tokens + stored_tokens)?;
                    match stand_by(&db, listener, &opts.limits, &redact(url), shutdown).await {
                        Some(pg) => pg,
                        None => {
                            db.close().await;
                            return Ok(None);
                        }
                    }
                }
                PgStart::Held { .. } => {
                    return Err(ServerError::Unavailable(format!(
                        "the PostgreSQL store at {} is in use by another qgjob server \
                         (start this one with --standby to take over when it stops)",
                        redact(url)
                    )))
                }
            };
            let ended = db.take_over(&mut pg).await?;
            if ended > 0 {
                tracing::info!(
                    sessions = ended,
                    "ended the sessions an earlier server left"
                );
            }
            // Artifacts live in the database too, so whichever server holds the store has
            // them all (a standby on another machine included); the data dir is only read
            // for what an earlier release kept there.
            let blobs = Blobs::postgres(&db);
            let swept = blobs.sweep_unfinished().await?;
            if swept > 0 {
                tracing::info!(parts = swept, "removed the parts of unfinished uploads");
            }
            if let Some(dir) = &opts.data_dir {
                let old = dir.join("artifacts");
                let imported = blobs.import_dir(&old).await?;
                if imported > 0 {
                    tracing::info!(
                        artifacts = imported,
                        from = %old.display(),
                        "imported artifacts an earlier release kept on disk into the database"
                    );
                }
            }
            Opened {
                store: Arc::new(db.clone()),
                blobs,
                closer: Some(Closer::Postgres(db)),
                guards: Guards {
                    _dir: None,
                    pg: Some(pg),
                },
            }
        }
    };
    Ok(Some(opened))
}

/// Where a server starting on PostgreSQL stands once it has tried the store's lock.
enum PgStart {
    /// It holds the lock.
    Locked(store::PgLock),
    /// Another server does. For a standby, how many tokens the store holds (its
    /// configuration is checked before it stands by); 0 for a server that will not wait.
    Held { stored_tokens: usize },
}

/// How many times a server starts on PostgreSQL when a takeover keeps ending its sessions
/// (see [`start_pg`]).
const START_TRIES: u32 = 5;

/// Connects to the PostgreSQL store at `url` (creating its tables if needed) and tries its
/// lock once; a `standby` that finds it held also counts the stored tokens.
///
/// Until it holds the lock or stands by, a server works on pooled connections named like
/// a serving server's, and a server taking the store over meanwhile ends them with the
/// rest (SQLSTATE 57P01). Renaming them instead would leave connections in the pool that a
/// later takeover could not end once this server serves, and ending a serving server's
/// writes is what fences it. These steps are reads, and the schema's DDL in one
/// transaction, so on that error alone they start again on fresh connections, at most
/// [`START_TRIES`] times; once the lock is held nothing is retried.
async fn start_pg(url: &str, standby: bool) -> Result<(PgStore, PgStart), ServerError> {
    let mut tries = 0;
    loop {
        tries += 1;
        // The error, and whether it came while connecting (the database is unavailable).
        let (e, connecting) = match PgStore::connect(url, None).await {
            Err(e) => (e, true),
            Ok(db) => {
                let first_steps = async {
                    Ok::<_, store::StoreError>(match db.lock_exclusive().await? {
                        Some(pg) => PgStart::Locked(pg),
                        None if standby => PgStart::Held {
                            stored_tokens: db.tokens().await?.len(),
                        },
                        None => PgStart::Held { stored_tokens: 0 },
                    })
                };
                match first_steps.await {
                    Ok(started) => return Ok((db, started)),
                    Err(e) => {
                        db.close().await;
                        (e, false)
                    }
                }
            }
        };
        if tries < START_TRIES && PgStore::session_ended(&e) {
            tracing::warn!(
                error = %e,
                attempt = tries,
                "the database ended a session of this starting server (another server taking \
                 the store over does that); starting again"
            );
            continue;
        }
        return Err(if connecting {
            ServerError::Unavailable(format!("PostgreSQL at {}: {e}", redact(url)))
        } else {
            e.into()
        });
    }
}

/// How often a standby asks for the store's lock.
const STANDBY_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// How often a server on PostgreSQL checks it still holds the store's lock.
const LOCK_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits for the store's lock while answering every request on `listener` with 503
/// `standby` (so a load balancer's health check skips this server and a client is told
/// why). `None` when `shutdown` came first.
async fn stand_by(
    db: &PgStore,
    listener: &TcpListener,
    limits: &Limits,
    what: &str,
    shutdown: &mut Shutdown,
) -> Option<store::PgLock> {
    tracing::info!(
        store = what,
        "another qgjob server holds the store: standing by, answering 503 until it stops"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = Router::new()
        // Alive, but not ready: a liveness probe leaves it be, a load balancer passes it
        // over.
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "standby"})) }),
        )
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    ops::standby_metric(true),
                )
            }),
        )
        .fallback(|| async { standby_answer() });
    let accepting = conn::accept(
        listener,
        router,
        conn::connection_cap().min(limits.max_connections),
        std::time::Duration::from_millis(limits.header_read_timeout_ms),
        async {
            let _ = stop_rx.await;
        },
    );
    let waiting = async {
        let got = tokio::select! {
            l = db.lock_when_free(STANDBY_POLL, |e| {
                tracing::warn!(error = %e, "standby: cannot reach the store; still waiting");
            }) => Some(l),
            () = &mut *shutdown => None,
        };
        let _ = stop_tx.send(());
        got
    };
    let (draining, got) = tokio::join!(accepting, waiting);
    // Its answers are instant 503s: a client that holds a connection open (half a request
    // head, say) must not delay the takeover by the serving drain limit.
    draining.finish(std::time::Duration::from_secs(1)).await;
    if got.is_some() {
        tracing::info!(store = what, "the store is free: taking over");
    }
    got
}

/// Every answer of a standby.
fn standby_answer() -> axum::response::Response {
    let mut r = axum::response::IntoResponse::into_response(ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "standby",
        "this qgjob server is a standby: another server holds the store, and this one \
         takes over when it stops; retry shortly",
    ));
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from_static("1"),
    );
    r
}

/// A fresh random value from the standard library's per-process hash keys (seeded by the
/// OS), mixed with the clock: job ids of two server runs must not repeat each other.
fn entropy() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Whether the server runs open (no auth): only with no tokens at all, and only on a
/// loopback address; anywhere else having no tokens is a configuration error.
pub fn open_mode(local: SocketAddr, tokens: usize) -> Result<bool, ServerError> {
    if tokens > 0 {
        return Ok(false);
    }
    if local.ip().is_loopback() {
        Ok(true)
    } else {
        Err(ServerError::Config(format!(
            "refusing to listen on {local} without tokens: configure tokens or bind a loopback address"
        )))
    }
}

/// Runs the server on `listener` until `shutdown` resolves, then stops gracefully: new
/// connections are refused, long polls and event streams end, in-flight requests finish
/// and every acknowledged change is on disk before this returns.
///
/// With [`ServerOptions::standby`], a server that finds its store held stands by on
/// `listener` (see the field) until it can take over, or until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_announced(listener, opts, Box::pin(shutdown), |_| Ok(())).await
}

/// [`serve`], calling `announce` once the server is about to serve (after any standby).
async fn serve_announced(
    listener: TcpListener,
    opts: ServerOptions,
    mut shutdown: Shutdown,
    announce: impl FnOnce(SocketAddr) -> std::io::Result<()>,
) -> Result<(), ServerError> {
    let local = listener.local_addr()?;
    let configured = configured_tokens(&opts)?;
    let Some(opened) = open_store(&opts, &listener, &mut shutdown, configured.len()).await? else {
        tracing::info!("stopped while standing by");
        return Ok(());
    };
    let ready = prepare(local, opts, opened, configured).await?;
    announce(local)?;
    run_prepared(listener, ready, shutdown).await
}

/// A server whose store is open and locked and whose scheduler is restored: everything
/// that can fail on a bad configuration has been checked.
struct Prepared {
    sched: GroupedScheduler,
    opened: Opened,
    auth: Auth,
    limits: Limits,
}

/// The tokens of the options and of the tokens file: read before the store is opened, so
/// a bad file stops a standby at once rather than when it takes over.
fn configured_tokens(opts: &ServerOptions) -> Result<Vec<store::TokenRecord>, ServerError> {
    let mut specs = opts.tokens.clone();
    if let Some(f) = &opts.tokens_file {
        specs.extend(TokenSpec::load_file(f)?);
    }
    specs.iter().map(TokenSpec::record).collect()
}

async fn prepare(
    local: SocketAddr,
    mut opts: ServerOptions,
    opened: Opened,
    configured: Vec<store::TokenRecord>,
) -> Result<Prepared, ServerError> {
    let store = &opened.store;

    // Tokens: configured ones plus those created through the admin API earlier.
    let mut records = configured;
    records.extend(store.tokens().await?);
    let open = open_mode(local, records.len())?;
    if open {
        tracing::warn!(
            addr = %local,
            "no tokens configured: the server is open to anyone who can reach this loopback address"
        );
    }

    // Rebuild the scheduler from the store.
    let now = state::wall_ms();
    let mut jobs = store
        .load_for_restore(Time(now.saturating_sub(opts.limits.retention_ms)))
        .await?;
    let grace = Time(now).plus_ms(opts.scheduler.lease_ttl_ms);
    for j in jobs.iter_mut() {
        if let Some(d) = j.lease_deadline {
            // Agents could not heartbeat while the server was down.
            j.lease_deadline = Some(d.max(grace));
        }
    }
    let restored = jobs.len();
    // The scheduler is deterministic for a given seed; a server wants ids no earlier run
    // of it handed out, so each start gets a fresh one.
    opts.scheduler.seed ^= entropy();
    let mut sched = GroupedScheduler::restore(opts.scheduler.clone(), jobs)?;
    // Leases of jobs not restored (finished long ago) must not be issued again.
    sched.reserve_lease_ids_through(LeaseId(store.lease_high_water().await?));
    tracing::info!(jobs = restored, addr = %local, "scheduler restored from the store");
    Ok(Prepared {
        sched,
        auth: Auth::new(records, open),
        limits: opts.limits,
        opened,
    })
}

async fn run_prepared(
    listener: TcpListener,
    ready: Prepared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Prepared {
        sched,
        opened,
        auth,
        limits,
    } = ready;
    let Opened {
        store,
        blobs,
        closer,
        mut guards,
    } = opened;
    let (sd_tx, sd_rx) = tokio::sync::watch::channel(false);
    let (state, bg) = App::start(sched, store, blobs, auth, limits, sd_rx);
    // On PostgreSQL the lock is checked while serving: a server that lost it (its session
    // ended) may already have a successor, so it stops rather than answer from memory.
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = guards.pg.take().map(|pg| {
        let fatal = Arc::clone(&state.fatal);
        tokio::spawn(pg.hold(
            LOCK_CHECK,
            async {
                let _ = release_rx.await;
            },
            move |why| {
                tracing::error!(reason = %why, "lost the store's lock");
                fatal.set(format!("it lost the store's lock: {why}"));
            },
        ))
    });
    let router = app(state.clone());
    let fatal = Arc::clone(&state.fatal);
    let cap = conn::connection_cap().min(limits.max_connections);
    let header_timeout = std::time::Duration::from_millis(limits.header_read_timeout_ms);
    let drain = std::time::Duration::from_millis(limits.drain_ms);
    conn::serve(listener, router, cap, header_timeout, drain, async move {
        tokio::select! {
            () = shutdown => {
                tracing::info!("shutting down: finishing in-flight requests");
            }
            m = fatal.wait() => {
                tracing::error!(reason = %m, "shutting down: the store cannot be trusted from here");
            }
        }
        let _ = sd_tx.send(true);
    })
    .await;
    bg.finish(&state).await;
    match closer {
        Some(Closer::Sqlite(db)) => db.close().await,
        Some(Closer::Postgres(db)) => db.close().await,
        None => {}
    }
    // Only now may another server open this store.
    let _ = release_tx.send(());
    if let Some(h) = holder {
        let _ = h.await;
    }
    drop(guards);
    tracing::info!("server stopped");
    match state.fatal.get() {
        Some(m) => Err(ServerError::Unavailable(format!(
            "stopped because {m} (nothing unwritten was acknowledged; \
             start the server again once the store is writable)"
        ))),
        None => Ok(()),
    }
}

/// Binds `opts.addr`, prints `qgjob server listening on http://ADDR` (the bound address)
/// as the first line on stdout, logs to stderr, and serves until SIGTERM or ctrl-c.
pub async fn run_server(opts: ServerOptions) -> Result<(), ServerError> {
    // The CLI may have installed a subscriber already; then this does nothing.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let listener = TcpListener::bind(opts.addr)
        .await
        // The address is taken or not ours to bind: the machine's state, not a bad flag.
        .map_err(|e| ServerError::Unavailable(format!("cannot listen on {}: {e}", opts.addr)))?;
    // Announce only a server that will serve: the store is open and the config checked
    // (a standby announces when it takes over).
    serve_announced(listener, opts, Box::pin(shutdown_signal()), |addr| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "qgjob server listening on http://{addr}")?;
        out.flush()
    })
    .await
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_drops_every_form_of_database_password() {
        assert_eq!(
            redact("postgres://bob:s3cret@db:5432/q"),
            "postgres://db:5432/q"
        );
        assert_eq!(
            redact("postgres://db/q?user=bob&password=s3cret&sslmode=require"),
            "postgres://db/q?user=bob&password=***&sslmode=require"
        );
        assert_eq!(
            redact("host=db PASSWORD=s3cret dbname=q"),
            "host=db PASSWORD=*** dbname=q"
        );
        assert_eq!(redact("postgres://db/q"), "postgres://db/q");
    }
}
