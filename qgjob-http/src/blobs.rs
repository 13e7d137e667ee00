//! Content-addressed artifact storage (app builds and test bundles), by sha256.
//!
//! One contract ([`Blobs::put`], [`Blobs::exists`], [`Blobs::get`]), three backends:
//!
//! - **Dir** (the SQLite store): `DATA_DIR/artifacts/sha256/<hex>`, written to a temp file
//!   while hashing the stream, then renamed into place, so a reader never sees a partial file
//!   and a crash leaves at most a stray temp file.
//! - **Postgres** (`--store postgres`): in the database, so a standby on another machine
//!   finds every artifact the primary stored. An upload is written as it arrives, in parts of
//!   [`PART_BYTES`], to `blob_parts(upload, n, data)` under a fresh random upload key; once it
//!   is complete and its digest known, one transaction inserts `blobs(sha256, upload, size)`,
//!   which names the upload holding that content. A reader looks only through `blobs`, so it
//!   never sees a partial artifact. Parts no `blobs` row names are leftovers: a failed or
//!   cancelled upload removes its own, and [`Blobs::sweep_unfinished`] removes those a crash
//!   left. Reads fetch one part at a time, so neither side ever holds a whole artifact in
//!   memory; the part buffers of all uploads share [`UPLOAD_BUFFER_BYTES`], so many at once
//!   do not either. Parts are usually [`PART_BYTES`], shorter when the budget ran short.
//!
//!   A request can be dropped at any await (its client went away), even while its COMMIT is
//!   on the wire, so whether the upload was stored is unknown when its cleanup starts. The
//!   cleanup therefore takes the blob lock exclusively (finishing holds it shared for its
//!   whole transaction, so the cleanup waits for a commit in flight) and removes only parts
//!   no `blobs` row names: it never takes the parts of a stored artifact. Each part is
//!   written by a task of its own that the cleanup waits for, so a part whose INSERT was in
//!   flight when the request was dropped is removed too. Known limit: the cleanup runs in
//!   the background; if it fails, or the server stops first, the parts stay until the next
//!   start-up sweep.
//!
//!   Defence in depth: a `blobs` row whose parts are missing or do not add up to its size
//!   (a database restored in part, a hand-made delete) counts as absent for
//!   [`Blobs::exists`], makes [`Blobs::get`] fail (500) rather than stream short, and is
//!   repaired by the next upload of that content, which takes its place.
//! - **Memory** (`--store memory`).
//!
//! Identical uploads are stored once. The server unpacks nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::store::{PgStore, StoreError};

/// Where artifacts live.
#[derive(Debug, Clone)]
pub enum Blobs {
    /// Files under a directory.
    Dir(PathBuf),
    /// In memory (for `--store memory`).
    Memory(Arc<Mutex<HashMap<String, Bytes>>>),
    /// In the PostgreSQL database of a [`PgStore`] (tables `blobs` and `blob_parts`), with
    /// the budget of uploads' part buffers in KiB (see [`UPLOAD_BUFFER_BYTES`]).
    Postgres(PgPool, Arc<Semaphore>),
}

/// The result of storing an upload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stored {
    /// Hex sha256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// False when identical content was already stored.
    pub created: bool,
}

/// How much of an upload `check_head` sees.
pub const HEAD_BYTES: usize = 16;

/// The size of one stored part on PostgreSQL (the last part of an upload may be shorter):
/// what an upload buffers before it writes, and what a read fetches at a time.
pub const PART_BYTES: usize = 1024 * 1024;

/// Most bytes PostgreSQL uploads hold in their part buffers at once, until each part's
/// INSERT is done (it holds about as much again while it is encoded). Counted by the bytes
/// an upload has actually received, so slow uploads do not keep out others: a thousand
/// clients each sending most of a megabyte and going silent would otherwise hold 2 GB until
/// the stall limit cut them off, and a count of buffers instead let 64 clients trickling a
/// byte at a time hold every buffer. An upload that finds the budget spent writes what it
/// buffered as a short part and only then waits, holding nothing, so uploads never wait
/// for each other in a circle.
pub const UPLOAD_BUFFER_BYTES: usize = 128 * 1024 * 1024;

/// The unit of [`UPLOAD_BUFFER_BYTES`]' semaphore (whose permits are `u32`).
const BUFFER_UNIT: usize = 1024;

/// How much of a file one read takes (serving from a directory, importing).
const FILE_READ_BYTES: usize = 256 * 1024;

/// Serialises finishing uploads (shared) against sweeping unfinished ones (exclusive) on
/// one schema, so a sweep never removes the parts of an upload that is being finished.
const BLOB_LOCK_KEY: &str = "hashtext('qgjob:blobs:' || current_schema())::bigint";

pub use qgjob_core::is_sha256_hex;

impl Blobs {
    /// Storage under `dir` (created if missing).
    pub fn dir(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("sha256"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        Ok(Blobs::Dir(dir))
    }

    /// In-memory storage.
    pub fn memory() -> Self {
        Blobs::Memory(Arc::default())
    }

    /// Storage in the database of `store` (its tables exist once the store is connected),
    /// on the store's pool for artifact transfers, so that they never hold back job writes.
    pub fn postgres(store: &PgStore) -> Self {
        Self::postgres_with_buffers(store, UPLOAD_BUFFER_BYTES)
    }

    /// [`Blobs::postgres`] with at most `bytes` in part buffers (at least one part's).
    pub fn postgres_with_buffers(store: &PgStore, bytes: usize) -> Self {
        Blobs::Postgres(
            store.blob_pool().clone(),
            Arc::new(Semaphore::new(bytes.max(PART_BYTES) / BUFFER_UNIT)),
        )
    }

    /// Streams `body` into storage, hashing as it goes; refuses more than `limit` bytes
    /// (413) and, when `expect` is given, content whose digest differs (422).
    /// `check_head` sees the first [`HEAD_BYTES`] bytes, or all of a shorter upload (e.g. to
    /// check a gzip header), however the body was split into chunks.
    /// Nothing of a refused or failed upload stays stored.
    pub async fn put(
        &self,
        body: Body,
        limit: u64,
        expect: Option<&str>,
        check_head: impl Fn(&[u8]) -> Result<(), ApiError>,
    ) -> Result<Stored, ApiError> {
        let stream = body.into_data_stream().map(|c| {
            c.map_err(|e| {
                // A body the intake guard cut off (stalled) says so with its own status.
                Failure::Refused(
                    crate::intake::refused_body(&e)
                        .unwrap_or_else(|| ApiError::bad_request(format!("upload: {e}"))),
                )
            })
        });
        self.put_stream(stream, limit, expect, check_head)
            .await
            .map_err(Failure::into_api)
    }

    /// [`Blobs::put`] for any stream of chunks, with the cause of a failure kept.
    async fn put_stream(
        &self,
        stream: impl Stream<Item = Result<Bytes, Failure>>,
        limit: u64,
        expect: Option<&str>,
        check_head: impl Fn(&[u8]) -> Result<(), ApiError>,
    ) -> Result<Stored, Failure> {
        let mut stream = std::pin::pin!(stream);
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut head: Vec<u8> = Vec::with_capacity(HEAD_BYTES);
        let mut checked = false;
        let mut sink = match self {
            Blobs::Dir(dir) => {
                let tmp = dir.join("tmp").join(random_hex::<12>()?);
                let f = tokio::fs::File::create(&tmp).await?;
                Sink::File {
                    f,
                    tmp,
                    dir: dir.clone(),
                }
            }
            Blobs::Memory(m) => Sink::Mem {
                buf: Vec::new(),
                map: m.clone(),
            },
            Blobs::Postgres(pool, buffers) => {
                Sink::Pg(PgUpload::new(pool.clone(), Arc::clone(buffers))?)
            }
        };
        let res: Result<(), Failure> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                if !checked {
                    let take = chunk.len().min(HEAD_BYTES - head.len());
                    head.extend_from_slice(&chunk[..take]);
                    if head.len() == HEAD_BYTES {
                        check_head(&head)?;
                        checked = true;
                    }
                }
                size += chunk.len() as u64;
                if size > limit {
                    return Err(ApiError::too_large(format!("upload exceeds {limit} bytes")).into());
                }
                hasher.update(&chunk);
                sink.write(&chunk).await?;
            }
            if !checked {
                check_head(&head)?;
            }
            Ok(())
        }
        .await;
        let sha256 = hex::encode(hasher.finalize());
        let res = res.and_then(|()| match expect {
            Some(e) if !e.eq_ignore_ascii_case(&sha256) => Err(ApiError::invalid(
                "sha256",
                format!("content hashes to {sha256}, not {e}"),
            )
            .into()),
            _ => Ok(()),
        });
        let created = sink.finish(res, &sha256, size).await?;
        Ok(Stored {
            sha256,
            size,
            created,
        })
    }

    /// Whether content with this digest is stored whole; an error when the storage cannot
    /// say (so a caller answers 5xx, not "absent"). On PostgreSQL a row whose parts are
    /// missing or do not add up to its size counts as absent (logged): [`Blobs::get`]
    /// could not serve it, and an upload of that content repairs it.
    pub async fn exists(&self, sha256: &str) -> Result<bool, StoreError> {
        if !is_sha256_hex(sha256) {
            return Ok(false);
        }
        match self {
            Blobs::Dir(dir) => Ok(tokio::fs::try_exists(dir.join("sha256").join(sha256)).await?),
            Blobs::Memory(m) => Ok(m
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(sha256)),
            Blobs::Postgres(pool, _) => Ok(match stored_row(pool, sha256).await? {
                None => false,
                Some(row) if row.whole() => true,
                Some(row) => {
                    tracing::error!(sha256, upload = %row.upload, stored = row.bytes, size = row.size, "artifact is incomplete: its parts are missing");
                    false
                }
            }),
        }
    }

    /// The content with this digest as a streaming body and its size, or `None`.
    pub async fn get(&self, sha256: &str) -> Result<Option<(Body, u64)>, ApiError> {
        if !is_sha256_hex(sha256) {
            return Ok(None);
        }
        match self {
            Blobs::Dir(dir) => {
                let path = dir.join("sha256").join(sha256);
                let f = match tokio::fs::File::open(&path).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(ApiError::internal(e)),
                };
                let size = f.metadata().await.map_err(ApiError::internal)?.len();
                Ok(Some((Body::from_stream(file_chunks(f)), size)))
            }
            Blobs::Memory(m) => {
                let g = m.lock().unwrap_or_else(|e| e.into_inner());
                Ok(g.get(sha256)
                    .map(|b| (Body::from(b.clone()), b.len() as u64)))
            }
            Blobs::Postgres(pool, _) => {
                let Some(row) = stored_row(pool, sha256).await.map_err(ApiError::internal)? else {
                    return Ok(None);
                };
                // Checked before answering: once the headers are out, missing parts could
                // only show as a body cut short under its Content-Length.
                if !row.whole() {
                    return Err(ApiError::internal(format!(
                        "artifact {sha256}: only {} of {} bytes are stored (upload {})",
                        row.bytes, row.size, row.upload
                    )));
                }
                let size = u64::try_from(row.size).map_err(|_| {
                    ApiError::internal(format!("artifact {sha256}: negative size {}", row.size))
                })?;
                let parts = PartCursor {
                    pool: pool.clone(),
                    sha256: sha256.to_string(),
                    upload: row.upload,
                    after: -1,
                    sent: 0,
                    size,
                };
                Ok(Some((Body::from_stream(parts.into_stream()), size)))
            }
        }
    }

    /// Removes what uploads that never finished left behind: on PostgreSQL every part no
    /// `blobs` row names, in a directory every temp file. Returns how many parts or files
    /// it removed.
    ///
    /// **Precondition**: call it only at start-up, before serving, from the one server that
    /// holds the store's lock ([`PgStore::lock_exclusive`], or the data dir's lock). It
    /// cannot tell an upload in progress elsewhere from an abandoned one, and removes both;
    /// an upload whose parts it removed fails when it finishes (500), it never stores a
    /// partial artifact.
    pub async fn sweep_unfinished(&self) -> Result<u64, StoreError> {
        match self {
            Blobs::Dir(dir) => {
                let mut removed = 0;
                let mut entries = match tokio::fs::read_dir(dir.join("tmp")).await {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                    Err(e) => return Err(e.into()),
                };
                while let Some(entry) = entries.next_entry().await? {
                    if entry.file_type().await?.is_file() {
                        tokio::fs::remove_file(entry.path()).await?;
                        removed += 1;
                    }
                }
                Ok(removed)
            }
            Blobs::Memory(_) => Ok(0),
            Blobs::Postgres(pool, _) => {
                let mut tx = pool.begin().await?;
                // Waits for uploads being finished, so the delete below (its own statement,
                // hence its own snapshot) sees their `blobs` rows.
                sqlx::query(&format!("SELECT pg_advisory_xact_lock({BLOB_LOCK_KEY})"))
                    .execute(&mut *tx)
                    .await?;
                let done = sqlx::query(
                    "DELETE FROM blob_parts p \
                     WHERE NOT EXISTS (SELECT 1 FROM blobs b WHERE b.upload = p.upload)",
                )
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            }
        }
    }

    /// Imports every file `dir/sha256/<hex>` whose digest is not stored yet (for artifacts an
    /// earlier release kept under the data dir), streaming each. A file whose content does not
    /// hash to its name is skipped with a warning, as is a name that is not a lowercase hex
    /// sha256. Returns how many artifacts it stored; a missing `dir/sha256` imports none.
    pub async fn import_dir(&self, dir: &Path) -> Result<usize, StoreError> {
        let src = dir.join("sha256");
        let mut entries = match tokio::fs::read_dir(&src).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut imported = 0;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| is_sha256_hex(n)) else {
                tracing::warn!(path = %path.display(), "not importing: the name is not a sha256");
                continue;
            };
            if !entry.file_type().await?.is_file() || self.exists(name).await? {
                continue;
            }
            let f = tokio::fs::File::open(&path).await?;
            let chunks = file_chunks(f).map(|c| c.map_err(Failure::Io));
            match self
                .put_stream(chunks, u64::MAX, Some(name), |_| Ok(()))
                .await
            {
                Ok(stored) => imported += usize::from(stored.created),
                Err(Failure::Refused(e)) if e.status == StatusCode::UNPROCESSABLE_ENTITY => {
                    tracing::warn!(path = %path.display(), reason = %e.message, "not importing: the content does not match its name");
                }
                Err(e) => return Err(e.into_store()),
            }
        }
        Ok(imported)
    }
}

/// Why an upload failed, kept apart until the caller says what it becomes: an answer for
/// [`Blobs::put`], a [`StoreError`] for [`Blobs::import_dir`].
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Refused for what was sent (too large, wrong digest, bad head, broken body).
    #[error("{}", .0.message)]
    Refused(ApiError),
    /// A file operation failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// The stored upload is not what was written (its parts were swept meanwhile, or
    /// writing a part was cut off).
    #[error("{0}")]
    Lost(String),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Refused(e)
    }
}

impl Failure {
    fn into_api(self) -> ApiError {
        match self {
            Failure::Refused(e) => e,
            other => ApiError::internal(other),
        }
    }

    fn into_store(self) -> StoreError {
        match self {
            Failure::Io(e) => StoreError::Io(e),
            Failure::Db(e) => StoreError::Db(e),
            Failure::Refused(e) => StoreError::Corrupt(e.message),
            Failure::Lost(m) => StoreError::Corrupt(m),
        }
    }
}

/// `N` random bytes as hex (temp file names, upload keys).
fn random_hex<const N: usize>() -> Result<String, Failure> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Failure::Io(std::io::Error::other(e.to_string())))?;
    Ok(hex::encode(b))
}

/// A file's content as a stream of chunks.
fn file_chunks(f: tokio::fs::File) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::unfold(Some(f), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; FILE_READ_BYTES];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Where an upload's bytes go while it streams in.
enum Sink {
    File {
        f: tokio::fs::File,
        tmp: PathBuf,
        dir: PathBuf,
    },
    Mem {
        buf: Vec<u8>,
        map: Arc<Mutex<HashMap<String, Bytes>>>,
    },
    Pg(PgUpload),
}

impl Sink {
    async fn write(&mut self, chunk: &[u8]) -> Result<(), Failure> {
        match self {
            Sink::File { f, .. } => f.write_all(chunk).await?,
            Sink::Mem { buf, .. } => buf.extend_from_slice(chunk),
            Sink::Pg(up) => up.write(chunk).await?,
        }
        Ok(())
    }

    /// Stores the upload under `sha256` when `res` is Ok, else removes what was written.
    /// Returns whether the content is new.
    async fn finish(
        self,
        res: Result<(), Failure>,
        sha256: &str,
        size: u64,
    ) -> Result<bool, Failure> {
        match self {
            Sink::File { mut f, tmp, dir } => {
                let done = async {
                    res?;
                    f.flush().await?;
                    // The file must be on disk before the registry points at it.
                    f.sync_all().await?;
                    drop(f);
                    let path = dir.join("sha256").join(sha256);
                    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                        Ok(false)
                    } else {
                        tokio::fs::rename(&tmp, &path).await?;
                        Ok(true)
                    }
                }
                .await;
                // Whatever happened, no temp file stays behind (already gone after rename).
                let _ = tokio::fs::remove_file(&tmp).await;
                done
            }
            Sink::Mem { buf, map } => {
                res?;
                let mut g = map.lock().unwrap_or_else(|e| e.into_inner());
                let created = !g.contains_key(sha256);
                if created {
                    g.insert(sha256.to_string(), Bytes::from(buf));
                }
                Ok(created)
            }
            Sink::Pg(mut up) => {
                let done = match res {
                    Ok(()) => up.commit(sha256, size).await,
                    Err(e) => Err(e),
                };
                match done {
                    Ok(created) => {
                        up.pending = false;
                        Ok(created)
                    }
                    Err(e) => {
                        up.discard().await;
                        Err(e)
                    }
                }
            }
        }
    }
}

/// One upload streaming into `blob_parts` on PostgreSQL.
struct PgUpload {
    pool: PgPool,
    /// The random key its parts are stored under.
    key: String,
    /// Bytes not yet written (less than [`PART_BYTES`]).
    buf: Vec<u8>,
    /// Where `permit` comes from.
    buffers: Arc<Semaphore>,
    /// What `buf` holds of the budget; it goes with the part to its INSERT.
    permit: Option<OwnedSemaphorePermit>,
    /// Parts written so far, which is the next part's number.
    parts: i32,
    /// The part INSERT under way, if any. It runs as a task of its own, so a dropped upload
    /// can hand it to its cleanup to wait for: a dropped statement may still land.
    inflight: Option<tokio::task::JoinHandle<Result<(), sqlx::Error>>>,
    /// Whether parts of it may be stored that nothing will remove unless it does: true
    /// until it is stored or discarded, so a dropped (cancelled) upload cleans up too.
    pending: bool,
}

impl PgUpload {
    fn new(pool: PgPool, buffers: Arc<Semaphore>) -> Result<Self, Failure> {
        Ok(PgUpload {
            pool,
            key: random_hex::<16>()?,
            buf: Vec::new(),
            buffers,
            permit: None,
            parts: 0,
            inflight: None,
            pending: true,
        })
    }

    /// Buffers `data`, writing each full part as soon as it is full.
    async fn write(&mut self, mut data: &[u8]) -> Result<(), Failure> {
        while !data.is_empty() {
            let take = (PART_BYTES - self.buf.len()).min(data.len());
            self.reserve(take).await?;
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == PART_BYTES {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Makes the budget this upload holds cover `more` bytes on top of its buffer. When the
    /// budget is short it first writes the buffer out as a part (which gives back what the
    /// buffer held once written), so it waits only while holding nothing.
    async fn reserve(&mut self, more: usize) -> Result<(), Failure> {
        let closed = |e: &dyn std::fmt::Display| Failure::Lost(format!("upload buffers: {e}"));
        // Units still needed for the buffer plus `more` (at most a part's: 1024).
        let need = |up: &Self| {
            let held = up.permit.as_ref().map_or(0, |p| p.num_permits());
            u32::try_from(
                (up.buf.len() + more)
                    .div_ceil(BUFFER_UNIT)
                    .saturating_sub(held),
            )
        };
        let n = need(self).map_err(|e| closed(&e))?;
        if n == 0 {
            return Ok(());
        }
        let got = match Arc::clone(&self.buffers).try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // Written out, the buffer holds nothing; then wait for `more` alone.
                self.flush().await?;
                let n = need(self).map_err(|e| closed(&e))?;
                Arc::clone(&self.buffers)
                    .acquire_many_owned(n)
                    .await
                    .map_err(|e| closed(&e))?
            }
            Err(e) => return Err(closed(&e)),
        };
        match &mut self.permit {
            Some(p) => p.merge(got),
            None => self.permit = Some(got),
        }
        Ok(())
    }

    /// Writes the buffered bytes as the next part.
    async fn flush(&mut self) -> Result<(), Failure> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self
            .parts
            .checked_add(1)
            .ok_or_else(|| Failure::Lost("upload has too many parts".into()))?;
        let (pool, key, n, data, permit) = (
            self.pool.clone(),
            self.key.clone(),
            self.parts,
            std::mem::take(&mut self.buf),
            self.permit.take(),
        );
        self.inflight = Some(tokio::spawn(async move {
            let done = sqlx::query("INSERT INTO blob_parts (upload, n, data) VALUES ($1, $2, $3)")
                .bind(key)
                .bind(n)
                .bind(data)
                .execute(&pool)
                .await
                .map(drop);
            // The part's bytes are gone only now (also when its upload was dropped).
            drop(permit);
            done
        }));
        self.settle().await?;
        self.parts = next;
        Ok(())
    }

    /// Waits for the part INSERT under way, if any. Cancel-safe: dropped while waiting,
    /// the task stays in `inflight` for the cleanup.
    async fn settle(&mut self) -> Result<(), Failure> {
        if let Some(task) = self.inflight.as_mut() {
            let res = task.await;
            self.inflight = None;
            res.map_err(|e| Failure::Lost(format!("writing part {}: {e}", self.parts)))??;
        }
        Ok(())
    }

    /// Writes the last part, then makes the upload the content of `sha256` unless that
    /// is stored whole already (then its parts go). Returns whether the content is new,
    /// which it also is when it replaces a stored row whose parts were missing.
    async fn commit(&mut self, sha256: &str, size: u64) -> Result<bool, Failure> {
        self.flush().await?;
        self.buf = Vec::new();
        let size = i64::try_from(size).map_err(|_| Failure::Lost(format!("size {size}")))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!(
            "SELECT pg_advisory_xact_lock_shared({BLOB_LOCK_KEY})"
        ))
        .execute(&mut *tx)
        .await?;
        // Under the lock no sweep runs; one that ran before may have removed these parts
        // (it took the store from this server): then nothing partial may be stored.
        let (count, bytes) = part_totals(&mut *tx, &self.key).await?;
        if count != i64::from(self.parts) || bytes != size {
            return Err(Failure::Lost(format!(
                "upload {} of {sha256}: {count} of {} parts, {bytes} of {size} bytes are stored \
                 (swept by a server that took the store?)",
                self.key, self.parts
            )));
        }
        let inserted = sqlx::query(
            "INSERT INTO blobs (sha256, upload, size) VALUES ($1, $2, $3) \
             ON CONFLICT (sha256) DO NOTHING",
        )
        .bind(sha256)
        .bind(&self.key)
        .bind(size)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let created = if inserted {
            true
        } else {
            // Stored already: trusted only if its parts are all there. FOR UPDATE makes
            // concurrent uploads of this content take turns, the later one seeing the
            // earlier one's repair.
            let (old, old_size): (String, i64) =
                sqlx::query_as("SELECT upload, size FROM blobs WHERE sha256 = $1 FOR UPDATE")
                    .bind(sha256)
                    .fetch_one(&mut *tx)
                    .await?;
            let (_, old_bytes) = part_totals(&mut *tx, &old).await?;
            if old_size == size && old_bytes == size {
                delete_parts(&mut *tx, &self.key).await?;
                false
            } else {
                tracing::warn!(sha256, upload = %old, stored = old_bytes, size = old_size, "repairing an incomplete artifact with a new upload of it");
                sqlx::query("UPDATE blobs SET upload = $2, size = $3 WHERE sha256 = $1")
                    .bind(sha256)
                    .bind(&self.key)
                    .bind(size)
                    .execute(&mut *tx)
                    .await?;
                delete_parts(&mut *tx, &old).await?;
                true
            }
        };
        tx.commit().await?;
        Ok(created)
    }

    /// Removes the parts of this upload (on failure) unless it was stored after all (a
    /// commit whose answer was lost). Should that fail too, it is logged and tried once
    /// more when the upload is dropped; the next start-up sweep removes whatever is left.
    async fn discard(&mut self) {
        self.buf = Vec::new();
        self.permit = None;
        if let Err(e) = self.settle().await {
            tracing::warn!(error = %e, upload = %self.key, "a part of a failed upload may not be removed");
        }
        match remove_unless_stored(&self.pool, &self.key).await {
            Ok(()) => self.pending = false,
            Err(e) => {
                tracing::warn!(error = %e, upload = %self.key, "cannot remove the parts of a failed upload")
            }
        }
    }
}

impl Drop for PgUpload {
    fn drop(&mut self) {
        if !self.pending {
            return;
        }
        // Dropped before it finished: the request was cancelled (its client went away),
        // perhaps while its commit was on the wire. Nothing can be awaited here, so the
        // parts are removed in the background, after the part INSERT under way if any, and
        // only if no commit stored them.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let pool = self.pool.clone();
            let key = std::mem::take(&mut self.key);
            let inflight = self.inflight.take();
            rt.spawn(async move {
                if let Some(task) = inflight {
                    // Its outcome does not matter: whatever landed is removed below.
                    let _ = task.await;
                }
                if let Err(e) = remove_unless_stored(&pool, &key).await {
                    tracing::warn!(error = %e, upload = %key, "cannot remove the parts of a cancelled upload");
                }
            });
        }
    }
}

/// Deletes the parts of an upload that failed or was cancelled, unless a `blobs` row names
/// it: a commit may have landed although its caller never learnt so (cancelled while
/// awaiting it, or its answer lost).
async fn remove_unless_stored(pool: &PgPool, upload: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Exclusive: waits for every upload being finished (they hold it shared until their
    // transaction ends), so the delete below, a statement of its own and hence with its own
    // snapshot, sees a `blobs` row such a commit made.
    sqlx::query(&format!("SELECT pg_advisory_xact_lock({BLOB_LOCK_KEY})"))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "DELETE FROM blob_parts WHERE upload = $1 \
         AND NOT EXISTS (SELECT 1 FROM blobs WHERE upload = $1)",
    )
    .bind(upload)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// How many parts of `upload` are stored and how many bytes they hold (`octet_length`
/// reads no TOASTed data, so this is cheap).
async fn part_totals<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    upload: &str,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(octet_length(data)), 0)::BIGINT \
         FROM blob_parts WHERE upload = $1",
    )
    .bind(upload)
    .fetch_one(conn)
    .await
}

/// A `blobs` row and what its parts hold.
struct StoredRow {
    upload: String,
    /// The recorded size.
    size: i64,
    /// The bytes its parts hold.
    bytes: i64,
}

impl StoredRow {
    /// Whether its parts add up to its size (an empty artifact has none).
    fn whole(&self) -> bool {
        self.bytes == self.size
    }
}

/// The `blobs` row of `sha256` with the bytes its parts hold, in one query.
async fn stored_row(pool: &PgPool, sha256: &str) -> Result<Option<StoredRow>, sqlx::Error> {
    let row: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT b.upload, b.size, \
         (SELECT COALESCE(SUM(octet_length(p.data)), 0)::BIGINT \
          FROM blob_parts p WHERE p.upload = b.upload) \
         FROM blobs b WHERE b.sha256 = $1",
    )
    .bind(sha256)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(upload, size, bytes)| StoredRow {
        upload,
        size,
        bytes,
    }))
}

/// Deletes the parts of `upload`.
async fn delete_parts<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    upload: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM blob_parts WHERE upload = $1")
        .bind(upload)
        .execute(conn)
        .await?;
    Ok(())
}

/// Reads a stored artifact's parts one at a time, in order.
struct PartCursor {
    pool: PgPool,
    sha256: String,
    upload: String,
    /// The number of the last part sent (-1 before the first).
    after: i32,
    sent: u64,
    size: u64,
}

impl PartCursor {
    /// The parts as a body stream. Each step looks up the next part by number, so parts
    /// of any size read back, and it checks the bytes add up to the recorded size.
    fn into_stream(self) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        futures_util::stream::unfold(Some(self), |c| async move {
            let mut c = c?;
            let row: Result<Option<(i32, Vec<u8>)>, _> = sqlx::query_as(
                "SELECT n, data FROM blob_parts WHERE upload = $1 AND n > $2 ORDER BY n LIMIT 1",
            )
            .bind(&c.upload)
            .bind(c.after)
            .fetch_optional(&c.pool)
            .await;
            let err = |msg: String| {
                tracing::error!(sha256 = %c.sha256, error = %msg, "cannot read an artifact");
                Some((Err(std::io::Error::other(msg)), None))
            };
            match row {
                Err(e) => err(format!("database error: {e}")),
                Ok(None) if c.sent == c.size => None,
                Ok(None) => err(format!("only {} of {} bytes are stored", c.sent, c.size)),
                Ok(Some((n, data))) => {
                    c.sent += data.len() as u64;
                    if c.sent > c.size {
                        return err(format!(
                            "more than the recorded {} bytes are stored",
                            c.size
                        ));
                    }
                    c.after = n;
                    Some((Ok(Bytes::from(data)), Some(c)))
                }
            }
        })
    }
}
