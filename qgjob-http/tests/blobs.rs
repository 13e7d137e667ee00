//! The artifact storage contract ([`Blobs`]), run against every backend: a directory,
//! memory and PostgreSQL (a fresh schema on `QGJOB_TEST_PG_URL`; no server answering is a
//! failure unless `QGJOB_SKIP_PG=1`), plus what only PostgreSQL does: parts, the sweep of
//! unfinished uploads, and importing a directory an earlier release wrote.

mod common;

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use futures_util::StreamExt;
use qgjob_http::blobs::{Blobs, Stored, HEAD_BYTES, PART_BYTES};
use sha2::{Digest, Sha256};

use common::{pg_url, Guard};

/// Fresh PostgreSQL storage in its own schema (with the schema's name). No server
/// answering is a failure (CI starts one), unless `QGJOB_SKIP_PG=1` asks to leave it out.
async fn pg_blobs() -> Option<(Blobs, Guard, String)> {
    let (store, guard, schema) = common::fresh_pg_store("blob tests").await?;
    Some((Blobs::postgres(&store), guard, schema))
}

/// Every backend, each fresh, with what keeps its backing alive.
async fn backends() -> Vec<(&'static str, Blobs, Guard)> {
    let dir = tempfile::tempdir().unwrap();
    let mut out = vec![
        (
            "dir",
            Blobs::dir(dir.path().join("artifacts")).unwrap(),
            Guard::Dir(dir),
        ),
        ("memory", Blobs::memory(), Guard::None),
    ];
    if let Some((b, g, _)) = pg_blobs().await {
        out.push(("postgres", b, g));
    }
    out
}

/// Deterministic, non-repeating-looking content.
fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `data` as a body split into chunks of the given sizes, repeated.
fn chunked(data: &[u8], sizes: &[usize]) -> Body {
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < data.len() {
        let n = sizes[i % sizes.len()].min(data.len() - at);
        chunks.push(Ok::<_, std::io::Error>(Bytes::copy_from_slice(
            &data[at..at + n],
        )));
        at += n;
        i += 1;
    }
    Body::from_stream(futures_util::stream::iter(chunks))
}

async fn read_all(body: Body) -> Vec<u8> {
    let mut out = Vec::new();
    let mut s = body.into_data_stream();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

/// Rows in `table` of `schema`.
async fn count(schema: &str, table: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {schema}.{table}"))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// Parts that no `blobs` row names.
async fn orphan_parts(schema: &str) -> i64 {
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM {schema}.blob_parts p \
         WHERE NOT EXISTS (SELECT 1 FROM {schema}.blobs b WHERE b.upload = p.upload)"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

/// What a failed upload may leave: temp files in a directory (PostgreSQL is checked with
/// [`orphan_parts`]).
fn leftovers(guard: &Guard) -> usize {
    match guard {
        Guard::Dir(d) => std::fs::read_dir(d.path().join("artifacts/tmp"))
            .unwrap()
            .count(),
        _ => 0,
    }
}

/// After a refused upload of `data`: it is not stored, and nothing of it is left behind.
async fn assert_nothing_stored(name: &str, blobs: &Blobs, data: &[u8], guard: &Guard) {
    assert!(!blobs.exists(&sha(data)).await.unwrap(), "{name}");
    assert_eq!(leftovers(guard), 0, "{name}");
    if let Guard::Schema(schema) = guard {
        assert_eq!(count(schema, "blob_parts").await, 0);
        assert_eq!(count(schema, "blobs").await, 0);
    }
}

#[tokio::test]
async fn round_trip_in_odd_chunks_and_dedup() {
    // Three and a bit parts, so parts are full, split across chunks, and short at the end.
    let data = content(3 * PART_BYTES + 12_345, 1);
    let digest = sha(&data);
    for (name, blobs, guard) in backends().await {
        let seen = std::sync::Mutex::new(Vec::new());
        let stored = blobs
            .put(
                chunked(&data, &[7, 1, 65_537, 333_333, 1_048_579]),
                u64::MAX,
                Some(&digest.to_uppercase()),
                |head| {
                    seen.lock().unwrap().push(head.to_vec());
                    Ok(())
                },
            )
            .await
            .unwrap();
        assert_eq!(
            stored,
            Stored {
                sha256: digest.clone(),
                size: data.len() as u64,
                created: true
            },
            "{name}"
        );
        // check_head saw the first HEAD_BYTES once, though the first chunks were shorter.
        assert_eq!(
            *seen.lock().unwrap(),
            vec![data[..HEAD_BYTES].to_vec()],
            "{name}"
        );
        assert!(blobs.exists(&digest).await.unwrap(), "{name}");
        let (body, size) = blobs.get(&digest).await.unwrap().unwrap();
        assert_eq!(size, data.len() as u64, "{name}");
        let back = read_all(body).await;
        assert!(back == data, "{name}: content differs");
        assert_eq!(sha(&back), digest, "{name}");

        // The same content again, split otherwise: stored once.
        let again = blobs
            .put(chunked(&data, &[PART_BYTES + 1, 3]), u64::MAX, None, |_| {
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            again,
            Stored {
                sha256: digest.clone(),
                size: data.len() as u64,
                created: false
            },
            "{name}"
        );
        assert_eq!(leftovers(&guard), 0, "{name}");
        if let Guard::Schema(schema) = &guard {
            assert_eq!(count(schema, "blobs").await, 1);
            assert_eq!(count(schema, "blob_parts").await, 4);
            assert_eq!(
                orphan_parts(schema).await,
                0,
                "the second upload's parts stay"
            );
        }
        let back = read_all(blobs.get(&digest).await.unwrap().unwrap().0).await;
        assert!(
            back == data,
            "{name}: content differs after the second upload"
        );
    }
}

#[tokio::test]
async fn short_and_empty_uploads() {
    for (name, blobs, _guard) in backends().await {
        for data in [Vec::new(), b"abc".to_vec()] {
            let seen = std::sync::Mutex::new(Vec::new());
            let stored = blobs
                .put(Body::from(data.clone()), 10, None, |head| {
                    seen.lock().unwrap().push(head.to_vec());
                    Ok(())
                })
                .await
                .unwrap();
            assert_eq!(stored.sha256, sha(&data), "{name}");
            assert_eq!(stored.size, data.len() as u64, "{name}");
            // A shorter upload shows check_head all of it.
            assert_eq!(*seen.lock().unwrap(), vec![data.clone()], "{name}");
            let (body, size) = blobs.get(&stored.sha256).await.unwrap().unwrap();
            assert_eq!(size, data.len() as u64, "{name}");
            assert_eq!(read_all(body).await, data, "{name}");
        }
    }
}

#[tokio::test]
async fn over_the_limit_is_413_and_leaves_nothing() {
    let data = content(3 * PART_BYTES, 2);
    for (name, blobs, guard) in backends().await {
        // Two full parts are written before the limit is passed.
        let limit = (2 * PART_BYTES + 100) as u64;
        let e = blobs
            .put(chunked(&data, &[100_003]), limit, None, |_| Ok(()))
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE, "{name}");
        assert_eq!(e.code, "too_large", "{name}");
        assert_nothing_stored(name, &blobs, &data, &guard).await;
    }
}

#[tokio::test]
async fn a_wrong_digest_is_422_and_leaves_nothing() {
    let data = content(2 * PART_BYTES + 7, 3);
    let wrong = sha(b"something else");
    for (name, blobs, guard) in backends().await {
        let e = blobs
            .put(
                chunked(&data, &[65_536]),
                u64::MAX,
                Some(&wrong),
                |_| Ok(()),
            )
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{name}");
        assert_eq!(e.code, "invalid_field", "{name}");
        assert_eq!(e.field.as_deref(), Some("sha256"), "{name}");
        assert!(!blobs.exists(&wrong).await.unwrap(), "{name}");
        assert_nothing_stored(name, &blobs, &data, &guard).await;
    }
}

#[tokio::test]
async fn a_refused_head_and_a_broken_body_leave_nothing() {
    let data = content(3 * PART_BYTES + 7, 4);
    for (name, blobs, guard) in backends().await {
        let e = blobs
            .put(chunked(&data, &[5, 5, 5, 5]), u64::MAX, None, |_| {
                Err(qgjob_http::ApiError::invalid("body", "not a gzip"))
            })
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("body"), "{name}");

        // The client goes away after two and a half parts.
        let mut chunks: Vec<Result<Bytes, std::io::Error>> = data[..PART_BYTES * 5 / 2]
            .chunks(77_777)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        chunks.push(Err(std::io::Error::other("connection reset")));
        let e = blobs
            .put(
                Body::from_stream(futures_util::stream::iter(chunks)),
                u64::MAX,
                None,
                |_| Ok(()),
            )
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{name}");
        assert_nothing_stored(name, &blobs, &data, &guard).await;
    }
}

#[tokio::test]
async fn unknown_and_malformed_digests_are_absent() {
    for (name, blobs, _guard) in backends().await {
        let unknown = sha(b"never stored");
        assert!(!blobs.exists(&unknown).await.unwrap(), "{name}");
        assert!(blobs.get(&unknown).await.unwrap().is_none(), "{name}");
        for bad in ["", "abc", "../etc/passwd", &unknown.to_uppercase()] {
            assert!(!blobs.exists(bad).await.unwrap(), "{name} {bad:?}");
            assert!(blobs.get(bad).await.unwrap().is_none(), "{name} {bad:?}");
        }
        let stored = blobs
            .put(Body::from("hello"), 100, None, |_| Ok(()))
            .await
            .unwrap();
        assert!(blobs.exists(&stored.sha256).await.unwrap(), "{name}");
        assert!(!blobs.exists(&unknown).await.unwrap(), "{name}");
    }
}

/// An upload whose body arrives through a channel, so a test can act between chunks.
fn channel_body() -> (
    tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    Body,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (tx, body)
}

async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, f: impl Fn() -> F) {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_cancelled_upload_removes_its_parts() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    let (tx, body) = channel_body();
    let b = blobs.clone();
    let task = tokio::spawn(async move { b.put(body, u64::MAX, None, |_| Ok(())).await });
    let data = content(2 * PART_BYTES + 1, 5);
    for c in data.chunks(65_536) {
        tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
    }
    wait_until("two parts are written", || async {
        count(&schema, "blob_parts").await == 2
    })
    .await;
    // What hyper does to a request whose connection closed: the handler future is dropped.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    wait_until("the parts are removed", || async {
        count(&schema, "blob_parts").await == 0
    })
    .await;
    assert_eq!(count(&schema, "blobs").await, 0);
    drop(guard);
}

#[tokio::test]
async fn sweep_removes_orphan_parts_only() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    let data = content(PART_BYTES + 10, 6);
    let stored = blobs
        .put(chunked(&data, &[4096]), u64::MAX, None, |_| Ok(()))
        .await
        .unwrap();
    // What a crash mid-upload leaves: parts under a key no `blobs` row names.
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    for n in 0..3 {
        sqlx::query(&format!(
            "INSERT INTO {schema}.blob_parts (upload, n, data) VALUES ('crashed', $1, $2)"
        ))
        .bind(n)
        .bind(vec![n as u8; 1000])
        .execute(&pool)
        .await
        .unwrap();
    }
    pool.close().await;
    assert_eq!(orphan_parts(&schema).await, 3);
    assert_eq!(blobs.sweep_unfinished().await.unwrap(), 3);
    assert_eq!(orphan_parts(&schema).await, 0);
    assert_eq!(count(&schema, "blob_parts").await, 2);
    let (body, size) = blobs.get(&stored.sha256).await.unwrap().unwrap();
    assert_eq!(size, data.len() as u64);
    assert!(read_all(body).await == data);
    // Nothing left to sweep.
    assert_eq!(blobs.sweep_unfinished().await.unwrap(), 0);
    drop(guard);
}

#[tokio::test]
async fn an_upload_swept_midway_fails_rather_than_store_a_partial_artifact() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    let (tx, body) = channel_body();
    let b = blobs.clone();
    let task = tokio::spawn(async move { b.put(body, u64::MAX, None, |_| Ok(())).await });
    let data = content(3 * PART_BYTES, 7);
    let (first, rest) = data.split_at(2 * PART_BYTES);
    for c in first.chunks(65_536) {
        tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
    }
    wait_until("two parts are written", || async {
        count(&schema, "blob_parts").await == 2
    })
    .await;
    // Another server took the store and swept while this upload was under way.
    assert_eq!(blobs.sweep_unfinished().await.unwrap(), 2);
    for c in rest.chunks(65_536) {
        tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
    }
    drop(tx);
    let e = task.await.unwrap().unwrap_err();
    assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!blobs.exists(&sha(&data)).await.unwrap());
    assert_eq!(count(&schema, "blobs").await, 0);
    assert_eq!(count(&schema, "blob_parts").await, 0);
    drop(guard);
}

#[tokio::test]
async fn sweep_in_a_directory_removes_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = Blobs::dir(dir.path().join("artifacts")).unwrap();
    let stored = blobs
        .put(Body::from("kept"), 100, None, |_| Ok(()))
        .await
        .unwrap();
    std::fs::write(dir.path().join("artifacts/tmp/0123abcd"), b"half an upload").unwrap();
    assert_eq!(blobs.sweep_unfinished().await.unwrap(), 1);
    assert_eq!(leftovers(&Guard::Dir(dir)), 0);
    assert_eq!(Blobs::memory().sweep_unfinished().await.unwrap(), 0);
    let _ = stored;
}

#[tokio::test]
async fn import_dir_imports_good_files_and_skips_bad_ones() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    // What an earlier release left under DATA_DIR/artifacts.
    let old = tempfile::tempdir().unwrap();
    let src = old.path().join("sha256");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(old.path().join("tmp")).unwrap();
    let big = content(2 * PART_BYTES + 999, 8);
    let small = b"a small bundle".to_vec();
    for d in [&big, &small] {
        std::fs::write(src.join(sha(d)), d).unwrap();
    }
    // Content that does not hash to its name, and a name that is no digest.
    let liar = sha(b"what the name promises");
    std::fs::write(src.join(&liar), b"something else").unwrap();
    std::fs::write(src.join("README"), b"not an artifact").unwrap();
    // One is in the database already.
    blobs
        .put(Body::from(small.clone()), u64::MAX, None, |_| Ok(()))
        .await
        .unwrap();

    assert_eq!(blobs.import_dir(old.path()).await.unwrap(), 1);
    let (body, size) = blobs.get(&sha(&big)).await.unwrap().unwrap();
    assert_eq!(size, big.len() as u64);
    assert!(read_all(body).await == big);
    assert!(!blobs.exists(&liar).await.unwrap());
    assert_eq!(count(&schema, "blobs").await, 2);
    assert_eq!(orphan_parts(&schema).await, 0);
    // Again: nothing new.
    assert_eq!(blobs.import_dir(old.path()).await.unwrap(), 0);
    // No directory at all: nothing to import.
    assert_eq!(
        blobs.import_dir(&old.path().join("missing")).await.unwrap(),
        0
    );
    drop(guard);
}

#[tokio::test]
async fn import_dir_works_for_every_backend() {
    let old = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(old.path().join("sha256")).unwrap();
    let data = content(PART_BYTES / 2 + 3, 9);
    std::fs::write(old.path().join("sha256").join(sha(&data)), &data).unwrap();
    for (name, blobs, _guard) in backends().await {
        assert_eq!(blobs.import_dir(old.path()).await.unwrap(), 1, "{name}");
        let (body, _) = blobs.get(&sha(&data)).await.unwrap().unwrap();
        assert!(read_all(body).await == data, "{name}");
    }
}

/// A session-level advisory lock the test holds; triggers made with [`Gate::install`] wait
/// on it, so a test can stop the server's SQL at a chosen statement and act meanwhile.
struct Gate {
    conn: sqlx::PgConnection,
    key: i64,
}

impl Gate {
    /// A gate on a random key, closed (held by the test).
    async fn closed() -> Gate {
        use sqlx::Connection as _;
        let mut rnd = [0u8; 4];
        getrandom::fill(&mut rnd).unwrap();
        // Below 2^31, so pg_locks shows it as classid 0, objid = key.
        let key = i64::from(u32::from_le_bytes(rnd) >> 1) + 1;
        let mut conn = sqlx::PgConnection::connect(&pg_url()).await.unwrap();
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(key)
            .execute(&mut conn)
            .await
            .unwrap();
        Gate { conn, key }
    }

    /// Makes `trigger` (SQL with `{f}` where the function's name goes) wait for the gate.
    async fn install(&mut self, schema: &str, trigger: &str) {
        let f = format!("{schema}.wait_for_gate");
        sqlx::query(&format!(
            "CREATE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_advisory_xact_lock({}); RETURN NEW; END $$",
            self.key
        ))
        .execute(&mut self.conn)
        .await
        .unwrap();
        sqlx::query(&trigger.replace("{f}", &f))
            .execute(&mut self.conn)
            .await
            .unwrap();
    }

    async fn open(&mut self) {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(self.key)
            .execute(&mut self.conn)
            .await
            .unwrap();
    }

    /// Closes the gate again, once every session that was waiting at it went through
    /// (they queue ahead of this request) and ended its transaction.
    async fn close(&mut self) {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(self.key)
            .execute(&mut self.conn)
            .await
            .unwrap();
    }
}

/// Sessions waiting for the advisory lock `key` (below 2^31).
async fn waiting_at(key: i64) -> i64 {
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND classid::bigint = 0 AND objid::bigint = $1 AND objsubid = 1",
    )
    .bind(key)
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    n
}

/// A client that leaves while its upload's COMMIT is on the wire must not leave a broken
/// artifact: the COMMIT lands, so the cleanup of the dropped request must keep the parts
/// (before the fix it deleted them, leaving a `blobs` row with no parts).
#[tokio::test]
async fn a_client_leaving_during_the_commit_leaves_the_artifact_whole() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    let mut gate = Gate::closed().await;
    // The COMMIT of a new artifact waits at the gate (what a slow commit looks like).
    gate.install(
        &schema,
        &format!(
            "CREATE CONSTRAINT TRIGGER gate AFTER INSERT ON {schema}.blobs \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {{f}}()"
        ),
    )
    .await;
    let (tx, body) = channel_body();
    let b = blobs.clone();
    let task = tokio::spawn(async move { b.put(body, u64::MAX, None, |_| Ok(())).await });
    let data = content(2 * PART_BYTES + 5, 10);
    for c in data.chunks(65_536) {
        tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
    }
    drop(tx);
    let key = gate.key;
    wait_until("the commit is under way", || async move {
        waiting_at(key).await == 1
    })
    .await;
    // The client goes away: hyper drops the handler future, mid-COMMIT.
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    gate.open().await;
    wait_until("the commit lands", || async {
        count(&schema, "blobs").await == 1
    })
    .await;
    // Time for the cleanup of the dropped upload to do whatever it does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&schema, "blob_parts").await, 3, "the parts stay");
    assert_eq!(orphan_parts(&schema).await, 0);
    assert!(blobs.exists(&sha(&data)).await.unwrap());
    let (body, size) = blobs.get(&sha(&data)).await.unwrap().unwrap();
    assert_eq!(size, data.len() as u64);
    assert!(read_all(body).await == data, "content differs");
    // Uploading it again stores nothing new.
    let again = blobs
        .put(chunked(&data, &[65_536]), u64::MAX, None, |_| Ok(()))
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(count(&schema, "blob_parts").await, 3);
    drop(guard);
}

/// A part whose INSERT was in flight when its upload was cancelled lands after the
/// request is gone; the cleanup waits for it, so it does not stay behind.
#[tokio::test]
async fn a_cancelled_upload_also_removes_the_part_it_was_writing() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    let mut gate = Gate::closed().await;
    gate.install(
        &schema,
        &format!(
            "CREATE TRIGGER gate BEFORE INSERT ON {schema}.blob_parts \
             FOR EACH ROW EXECUTE FUNCTION {{f}}()"
        ),
    )
    .await;
    let (tx, body) = channel_body();
    let b = blobs.clone();
    let task = tokio::spawn(async move { b.put(body, u64::MAX, None, |_| Ok(())).await });
    // Exactly one part: the upload takes every chunk, then waits at the gate in its INSERT.
    let data = content(PART_BYTES, 12);
    for c in data.chunks(65_536) {
        tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
    }
    let key = gate.key;
    wait_until("the first part's INSERT is under way", || async move {
        waiting_at(key).await == 1
    })
    .await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    // Time for a cleanup that does not wait for the INSERT to run (and find nothing).
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.open().await;
    // Once the gate can be closed again, the INSERT has committed.
    gate.close().await;
    assert_eq!(waiting_at(gate.key).await, 0);
    wait_until("the landed part is removed", || async {
        count(&schema, "blob_parts").await == 0
    })
    .await;
    assert_eq!(count(&schema, "blobs").await, 0);
    drop(tx);
    drop(guard);
}

/// Defence in depth against a `blobs` row whose parts are gone (however that came about):
/// a download fails before it answers instead of streaming 0 bytes under the full
/// Content-Length, `exists` says absent, and a new upload of the content repairs the row.
#[tokio::test]
async fn an_artifact_missing_parts_is_refused_then_repaired_by_an_upload() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    let data = content(2 * PART_BYTES + 99, 11);
    let digest = sha(&data);
    let first = blobs
        .put(chunked(&data, &[65_536]), u64::MAX, None, |_| Ok(()))
        .await
        .unwrap();
    assert!(first.created);
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    for lost in ["TRUE", "n = 2"] {
        let gone = sqlx::query(&format!("DELETE FROM {schema}.blob_parts WHERE {lost}"))
            .execute(&pool)
            .await
            .unwrap();
        assert!(gone.rows_affected() > 0, "{lost}");
        let e = blobs.get(&digest).await.expect_err("a download fails");
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR, "{lost}");
        assert!(!blobs.exists(&digest).await.unwrap(), "{lost}");

        let again = blobs
            .put(chunked(&data, &[100_000]), u64::MAX, None, |_| Ok(()))
            .await
            .unwrap();
        assert!(again.created, "{lost}: the row is repaired, not trusted");
        assert!(blobs.exists(&digest).await.unwrap(), "{lost}");
        let (body, size) = blobs.get(&digest).await.unwrap().unwrap();
        assert_eq!(size, data.len() as u64, "{lost}");
        assert!(read_all(body).await == data, "{lost}: content differs");
        assert_eq!(count(&schema, "blobs").await, 1, "{lost}");
        assert_eq!(count(&schema, "blob_parts").await, 3, "{lost}");
        assert_eq!(orphan_parts(&schema).await, 0, "{lost}");
    }
    // Whole again: another upload is a duplicate.
    let third = blobs
        .put(chunked(&data, &[65_536]), u64::MAX, None, |_| Ok(()))
        .await
        .unwrap();
    assert!(!third.created);
    assert_eq!(count(&schema, "blob_parts").await, 3);
    pool.close().await;
    drop(guard);
}

/// A database failure is an error, never "not stored".
#[tokio::test]
async fn a_database_failure_is_an_error_not_absence() {
    let Some((blobs, guard, schema)) = pg_blobs().await else {
        return;
    };
    let stored = blobs
        .put(Body::from("kept"), 100, None, |_| Ok(()))
        .await
        .unwrap();
    assert!(blobs.exists(&stored.sha256).await.unwrap());
    let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    sqlx::query(&format!("ALTER TABLE {schema}.blobs RENAME TO blobs_gone"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(blobs.exists(&stored.sha256).await.is_err());
    let e = blobs.get(&stored.sha256).await.expect_err("get fails");
    assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
    drop(guard);
}

/// The same through the API: a submit naming a bundle gets a 5xx, not 422 "no bundle was
/// uploaded", when the database cannot say whether it was.
#[test]
fn a_submit_naming_a_bundle_gets_a_5xx_when_the_database_fails() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some((_, guard, schema)) = rt.block_on(pg_blobs()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = common::TestServer::start(qgjob_http::ServerOptions {
        store: qgjob_http::StoreKind::Postgres,
        postgres_url: Some(format!("{}?options[search_path]={schema}", pg_url())),
        data_dir: Some(dir.path().to_path_buf()),
        ..qgjob_http::ServerOptions::default()
    });
    let c = s.client(None);
    let mut sp = common::spec("qualgent", "v1", "tests/a.spec.js");
    sp["bundle"] = serde_json::json!("ab".repeat(32));
    let (st, v) = c.post("/v1/jobs", &sp);
    assert_eq!(st, 422, "never uploaded: {v}");
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&pg_url()).await.unwrap();
        sqlx::query(&format!("ALTER TABLE {schema}.blobs RENAME TO blobs_gone"))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    let (st, v) = c.post("/v1/jobs", &sp);
    assert_eq!(st, 500, "{v}");
    assert_eq!(v["error"]["code"], "internal", "{v}");
    s.stop().unwrap();
    drop(guard);
}

/// `fut`'s output, or a failure after 30 s (uploads waiting on each other would hang).
async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("finished within 30 s")
}

/// Part buffers share a budget of bytes: a trickling upload holds only what it sent, an
/// upload that finds the budget spent waits without holding any of it, one that needs more
/// while others wait writes a short part instead, and every byte of budget comes back, also
/// from an upload dropped midway.
#[tokio::test]
async fn uploads_share_a_budget_of_buffered_bytes() {
    let Some((store, guard, _schema)) = common::fresh_pg_store("blob buffer tests").await else {
        return;
    };
    // The smallest budget: one part.
    let blobs = Blobs::postgres_with_buffers(&store, 0);
    let Blobs::Postgres(_, budget) = &blobs else {
        panic!("not PostgreSQL storage");
    };
    let budget = budget.clone();
    let all = budget.available_permits();
    assert_eq!(all * 1024, PART_BYTES);
    let put = |body: Body| {
        let b = blobs.clone();
        tokio::spawn(async move { b.put(body, u64::MAX, None, |_| Ok(())).await })
    };

    // A sends 100 bytes and goes quiet: a small upload still goes through at once.
    let a_data = content(PART_BYTES + 40 * 1024, 1);
    let (a_tx, a_body) = channel_body();
    let a = put(a_body);
    a_tx.send(Ok(Bytes::copy_from_slice(&a_data[..100])))
        .await
        .unwrap();
    wait_until("the first upload holds its bytes", || async {
        budget.available_permits() == all - 1
    })
    .await;
    let small = content(PART_BYTES / 2, 2);
    let stored = within(put(chunked(&small, &[65_536])))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.sha256, sha(&small));

    // A then holds all but 10 KiB: B, with 20 KiB to buffer, waits.
    let upto = PART_BYTES - 10 * 1024;
    a_tx.send(Ok(Bytes::copy_from_slice(&a_data[100..upto])))
        .await
        .unwrap();
    wait_until("the first upload holds nearly all", || async {
        budget.available_permits() == 10
    })
    .await;
    let b_data = content(20 * 1024, 3);
    let (b_tx, b_body) = channel_body();
    let b = put(b_body);
    b_tx.send(Ok(Bytes::copy_from_slice(&b_data)))
        .await
        .unwrap();
    drop(b_tx);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "the second upload did not wait");
    // A needs 20 KiB more with B waiting: it writes what it has as a short part, so both
    // get through rather than wait for each other.
    a_tx.send(Ok(Bytes::copy_from_slice(&a_data[upto..upto + 20 * 1024])))
        .await
        .unwrap();
    let stored_b = within(b).await.unwrap().unwrap();
    a_tx.send(Ok(Bytes::copy_from_slice(&a_data[upto + 20 * 1024..])))
        .await
        .unwrap();
    drop(a_tx);
    let stored_a = within(a).await.unwrap().unwrap();
    for (s, data) in [(&stored_a, &a_data), (&stored_b, &b_data)] {
        assert_eq!(s.sha256, sha(data));
        let (body, size) = blobs.get(&s.sha256).await.unwrap().unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(&read_all(body).await, data);
    }
    assert_eq!(budget.available_permits(), all);

    // Dropped while buffering: what it held comes back.
    let (c_tx, c_body) = channel_body();
    let c = put(c_body);
    c_tx.send(Ok(Bytes::from(vec![5; 3000]))).await.unwrap();
    wait_until("the third upload holds its bytes", || async {
        budget.available_permits() == all - 3
    })
    .await;
    c.abort();
    wait_until("the dropped upload's bytes are back", || async {
        budget.available_permits() == all
    })
    .await;
    drop(guard);
}
