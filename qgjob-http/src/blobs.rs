//! Content-addressed artifact storage (app builds and test bundles), by sha256.
//!
//! On disk: `DATA_DIR/artifacts/sha256/<hex>`, written to a temp file while hashing the
//! stream, then renamed into place, so a reader never sees a partial file and a crash leaves
//! at most a stray temp file. Identical uploads are stored once. The server unpacks nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::ApiError;

/// Where artifacts live.
#[derive(Debug, Clone)]
pub enum Blobs {
    /// Files under a directory.
    Dir(PathBuf),
    /// In memory (for `--store memory`).
    Memory(Arc<Mutex<HashMap<String, Bytes>>>),
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

    /// Streams `body` into storage, hashing as it goes; refuses more than `limit` bytes
    /// (413) and, when `expect` is given, content whose digest differs (422).
    /// `check_head` sees the first [`HEAD_BYTES`] bytes, or all of a shorter upload (e.g. to
    /// check a gzip header), however the body was split into chunks.
    pub async fn put(
        &self,
        body: Body,
        limit: u64,
        expect: Option<&str>,
        check_head: impl Fn(&[u8]) -> Result<(), ApiError>,
    ) -> Result<Stored, ApiError> {
        let mut stream = body.into_data_stream();
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut head: Vec<u8> = Vec::with_capacity(HEAD_BYTES);
        let mut checked = false;
        let mut sink = match self {
            Blobs::Dir(dir) => {
                let mut name = [0u8; 12];
                getrandom::fill(&mut name).map_err(ApiError::internal)?;
                let tmp = dir.join("tmp").join(hex::encode(name));
                let f = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(ApiError::internal)?;
                Sink::File(f, tmp)
            }
            Blobs::Memory(_) => Sink::Mem(Vec::new()),
        };
        let res: Result<(), ApiError> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| ApiError::bad_request(format!("upload: {e}")))?;
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
                    return Err(ApiError::too_large(format!("upload exceeds {limit} bytes")));
                }
                hasher.update(&chunk);
                match &mut sink {
                    Sink::File(f, _) => f.write_all(&chunk).await.map_err(ApiError::internal)?,
                    Sink::Mem(v) => v.extend_from_slice(&chunk),
                }
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
            )),
            _ => Ok(()),
        });
        match sink {
            Sink::File(mut f, tmp) => {
                let done = async {
                    res?;
                    f.flush().await.map_err(ApiError::internal)?;
                    // The file must be on disk before the registry points at it.
                    f.sync_all().await.map_err(ApiError::internal)?;
                    drop(f);
                    let Blobs::Dir(dir) = self else {
                        return Err(ApiError::internal("blob storage changed kind"));
                    };
                    let path = dir.join("sha256").join(&sha256);
                    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                        Ok(false)
                    } else {
                        tokio::fs::rename(&tmp, &path)
                            .await
                            .map_err(ApiError::internal)?;
                        Ok(true)
                    }
                }
                .await;
                // Whatever happened, no temp file stays behind (already gone after rename).
                let _ = tokio::fs::remove_file(&tmp).await;
                let created = done?;
                Ok(Stored {
                    sha256,
                    size,
                    created,
                })
            }
            Sink::Mem(v) => {
                res?;
                let Blobs::Memory(m) = self else {
                    return Err(ApiError::internal("blob storage changed kind"));
                };
                let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                let created = !g.contains_key(&sha256);
                if created {
                    g.insert(sha256.clone(), Bytes::from(v));
                }
                Ok(Stored {
                    sha256,
                    size,
                    created,
                })
            }
        }
    }

    /// Whether content with this digest is stored.
    pub async fn exists(&self, sha256: &str) -> bool {
        if !is_sha256_hex(sha256) {
            return false;
        }
        match self {
            Blobs::Dir(dir) => tokio::fs::try_exists(dir.join("sha256").join(sha256))
                .await
                .unwrap_or(false),
            Blobs::Memory(m) => m
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(sha256),
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
                let stream = futures_util::stream::unfold(Some(f), |f| async move {
                    let mut f = f?;
                    let mut buf = vec![0u8; 64 * 1024];
                    match f.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(f)))
                        }
                        Err(e) => Some((Err(e), None)),
                    }
                });
                Ok(Some((Body::from_stream(stream), size)))
            }
            Blobs::Memory(m) => {
                let g = m.lock().unwrap_or_else(|e| e.into_inner());
                Ok(g.get(sha256)
                    .map(|b| (Body::from(b.clone()), b.len() as u64)))
            }
        }
    }
}

enum Sink {
    File(tokio::fs::File, PathBuf),
    Mem(Vec<u8>),
}
