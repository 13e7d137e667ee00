//! The agent's on-disk artifact cache: app builds and test bundles, content-addressed by
//! sha256, fetched once from an [`ArtifactSource`] (the server), verified, and kept under a
//! size bound with least-recently-used eviction. A bundle is unpacked (safely) and its npm
//! dependencies installed once per hash (`npm ci --ignore-scripts` with a lockfile,
//! `npm install --ignore-scripts` without), then every job gets a fresh work dir with a
//! copy of the bundle's files and a link to its `node_modules`.
//!
//! Layout under the cache dir: `builds/<sha256>` (files), `bundles/<sha256>/` (unpacked
//! trees), `tmp/` (downloads in flight), `work/<job>-<attempt>/` (per-job work dirs,
//! removed after the job), `groups/` (process groups of running commands, see
//! [`super::reap`]) and `agent.lock`: the running agent holds an exclusive lock on it for as
//! long as the cache is open, and writes its pid and its scheduler session there, so the
//! next agent of this dir knows the previous one has ended and which session it ran.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use qgjob_core::BuildRef;
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::bundle::{self, BundleError, Limits};

/// Why an artifact is not available.
#[derive(Debug, Error)]
pub enum ArtifactError {
    /// The source could not provide it (server unreachable, 404...).
    #[error("cannot fetch {what}: {message}")]
    Fetch {
        /// Which artifact.
        what: String,
        /// Why.
        message: String,
    },
    /// The bytes do not hash to the expected sha256.
    #[error("{what} is corrupt: expected sha256 {expected}, got {actual}")]
    HashMismatch {
        /// Which artifact.
        what: String,
        /// The requested hash.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// A hash is not 64 hex digits (refused before it becomes a file name).
    #[error("invalid sha256 {0:?}")]
    BadHash(String),
    /// Unpacking the bundle failed or it is unsafe.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Installing the bundle's npm dependencies failed.
    #[error("npm failed for bundle {sha}: {message}")]
    Npm {
        /// The bundle.
        sha: String,
        /// npm's exit status and last output.
        message: String,
    },
    /// A local file operation failed.
    #[error("artifact cache: {0}")]
    Io(#[from] std::io::Error),
    /// Another live agent process uses the same cache dir (it would remove this one's work
    /// dirs at start, and both would fetch the same files).
    #[error("cache dir {dir} is in use by process {pid}; give each agent its own --cache-dir")]
    InUse {
        /// The cache dir.
        dir: PathBuf,
        /// The other agent's process id.
        pid: i32,
    },
}

/// Where builds and bundles come from. The agent's implementation talks to the server
/// ([`super::link::HttpArtifacts`]); tests can serve files from anywhere.
#[async_trait]
pub trait ArtifactSource: Send + Sync {
    /// The sha256 of the build uploaded for `build`.
    async fn build_sha(&self, build: &BuildRef) -> Result<String, ArtifactError>;
    /// Writes the build with hash `sha` to `dest`.
    async fn fetch_build(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError>;
    /// Writes the bundle (`.tar.gz`) with hash `sha` to `dest`.
    async fn fetch_bundle(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError>;
}

/// How bundles get their dependencies.
#[derive(Debug, Clone)]
pub struct NpmConfig {
    /// The npm program.
    pub npm: PathBuf,
    /// Whether to install at all (off when the test command needs no packages).
    pub enabled: bool,
    /// How long an install may take.
    pub timeout: Duration,
}

impl Default for NpmConfig {
    fn default() -> Self {
        NpmConfig {
            npm: PathBuf::from("npm"),
            enabled: true,
            timeout: Duration::from_secs(600),
        }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Builds downloaded from the source.
    pub build_downloads: AtomicU64,
    /// Bundles downloaded from the source.
    pub bundle_downloads: AtomicU64,
    /// npm installs run.
    pub npm_installs: AtomicU64,
    /// Entries evicted to stay under the size bound.
    pub evictions: AtomicU64,
    /// Process groups a killed agent of this cache dir had left running, killed at open.
    pub orphans_killed: AtomicU64,
}

#[derive(Debug, Clone)]
struct Entry {
    size: u64,
    last_used: u64,
    pins: u32,
}

#[derive(Debug, Default)]
struct Index {
    entries: HashMap<PathBuf, Entry>,
    clock: u64,
}

/// The cache. Share it (`Arc`) between all devices of an agent.
pub struct ArtifactCache {
    dir: PathBuf,
    /// `agent.lock`, locked while the cache is open (the lock goes with the file).
    lock: File,
    /// What the previous holder of the dir wrote there, if anything.
    previous: Option<Holder>,
    max_bytes: u64,
    source: Arc<dyn ArtifactSource>,
    npm: NpmConfig,
    limits: Limits,
    index: Mutex<Index>,
    /// One lock per artifact key, so two jobs needing the same bundle fetch it once.
    locks: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
    /// Counters.
    pub stats: CacheStats,
}

/// Keeps a cached artifact from being evicted while a job uses it.
pub struct Pinned {
    cache: Arc<ArtifactCache>,
    path: PathBuf,
}

impl Pinned {
    /// The artifact's path (a build file or an unpacked bundle directory).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Ok(mut idx) = self.cache.index.lock() {
            if let Some(e) = idx.entries.get_mut(&self.path) {
                e.pins = e.pins.saturating_sub(1);
            }
        }
    }
}

/// What an agent wrote in `agent.lock`: `<pid> <session or -> <boot id or ->`. The session
/// is the one whose devices the scheduler may still hold for this dir: the holder's own once
/// it has one, else the one it took over (an agent that died starting up passes it on).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    pid: i32,
    session: Option<String>,
    boot: Option<String>,
}

impl Holder {
    fn parse(text: &str) -> Option<Holder> {
        let mut words = text.split_whitespace();
        let pid = words.next()?.parse().ok()?;
        let word = |w: Option<&str>| w.filter(|w| *w != "-").map(String::from);
        Some(Holder {
            pid,
            session: word(words.next()),
            boot: word(words.next()),
        })
    }

    /// The session to take over: only one written since this machine booted. A cache dir
    /// copied from another machine (a cloned disk) names a session that may be running
    /// there, and taking over its devices would stop it.
    fn session_to_replace(&self) -> Option<String> {
        let boot = boot_id()?;
        (self.boot.as_deref() == Some(boot.as_str()))
            .then(|| self.session.clone())
            .flatten()
    }
}

/// This boot of this machine (Linux); `None` where it cannot be told.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
}

/// An agent of a release before `agent.lock` recorded itself in `agent.pid` instead: one
/// still running there holds the dir.
fn legacy_holder(dir: &Path) -> Option<i32> {
    let pid = std::fs::read_to_string(dir.join("agent.pid"))
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    // EPERM: the process exists, under another user.
    let alive = pid > 0
        && pid != std::process::id() as i32
        && matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Ok(()) | Err(nix::errno::Errno::EPERM)
        );
    alive.then_some(pid)
}

/// Takes the cache dir for this process: an exclusive lock on `agent.lock`, which the
/// kernel releases however the process ends, so a killed agent's dir is free at once and
/// two agents starting together cannot both have it. Returns the locked file and what the
/// previous holder (now certainly gone) wrote there.
fn claim(dir: &Path) -> Result<(File, Option<Holder>), ArtifactError> {
    let path = dir.join("agent.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let mut text = String::new();
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            // The holder writes its pid right after locking: a moment's race shows 0.
            let _ = file.read_to_string(&mut text);
            return Err(ArtifactError::InUse {
                dir: dir.to_path_buf(),
                pid: Holder::parse(&text).map_or(0, |h| h.pid),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
    }
    if let Some(pid) = legacy_holder(dir) {
        return Err(ArtifactError::InUse {
            dir: dir.to_path_buf(),
            pid,
        });
    }
    let _ = std::fs::remove_file(dir.join("agent.pid"));
    file.read_to_string(&mut text)?;
    let previous = Holder::parse(&text);
    // Until this agent has a session of its own, pass the previous one on.
    let carried = previous.as_ref().and_then(Holder::session_to_replace);
    write_holder(&file, carried.as_deref())?;
    Ok((file, previous))
}

fn write_holder(mut file: &File, session: Option<&str>) -> std::io::Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    let line = format!(
        "{} {} {}\n",
        std::process::id(),
        session.unwrap_or("-"),
        boot_id().as_deref().unwrap_or("-")
    );
    file.write_all(line.as_bytes())?;
    file.flush()
}

fn check_sha(sha: &str) -> Result<(), ArtifactError> {
    if qgjob_core::is_sha256_hex(sha) {
        Ok(())
    } else {
        Err(ArtifactError::BadHash(sha.to_string()))
    }
}

/// The sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn disk_size(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| disk_size(&e.path()))
                    .sum()
            })
            .unwrap_or(0)
    } else {
        meta.len()
    }
}

fn remove_path(path: &Path) {
    let _ = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => Ok(()),
    };
}

impl ArtifactCache {
    /// Opens (creating) a cache in `dir` holding at most `max_bytes` of artifacts. Entries
    /// left by an earlier run are adopted, oldest-modified first in eviction order.
    pub fn open(
        dir: impl Into<PathBuf>,
        max_bytes: u64,
        source: Arc<dyn ArtifactSource>,
        npm: NpmConfig,
    ) -> Result<Arc<Self>, ArtifactError> {
        let dir = dir.into();
        for sub in ["builds", "bundles", "tmp", "work", "groups"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        // Absolute, so the commands' mark (see `reap`) is the same from any folder.
        let dir = std::fs::canonicalize(&dir)?;
        let (lock, previous) = claim(&dir)?;
        // A killed agent's test commands may still run (and use the device, and their work
        // dirs): kill them first. Not when this process held the dir already.
        let stats = CacheStats::default();
        if previous.as_ref().map(|h| h.pid) != Some(std::process::id() as i32) {
            let killed = super::reap::reap(&super::reap::mark(&dir).1, &dir.join("groups"));
            stats.orphans_killed.store(killed as u64, Ordering::Relaxed);
        }
        // Leftovers of a crash: half-done downloads and abandoned work dirs.
        for sub in ["tmp", "work"] {
            for e in std::fs::read_dir(dir.join(sub))?.flatten() {
                remove_path(&e.path());
            }
        }
        let mut found: Vec<(SystemTime, PathBuf, u64)> = Vec::new();
        for sub in ["builds", "bundles"] {
            for e in std::fs::read_dir(dir.join(sub))?.flatten() {
                let p = e.path();
                let name_ok = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| check_sha(n).is_ok());
                if !name_ok {
                    remove_path(&p);
                    continue;
                }
                let mtime = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, p.clone(), disk_size(&p)));
            }
        }
        found.sort();
        let mut index = Index::default();
        for (_, p, size) in found {
            index.clock += 1;
            index.entries.insert(
                p,
                Entry {
                    size,
                    last_used: index.clock,
                    pins: 0,
                },
            );
        }
        Ok(Arc::new(ArtifactCache {
            dir,
            lock,
            previous,
            max_bytes,
            source,
            npm,
            limits: Limits::default(),
            index: Mutex::new(index),
            locks: Mutex::new(HashMap::new()),
            stats,
        }))
    }

    /// The cache's root directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The scheduler session of the agent that held this dir before, which has ended (the
    /// lock was free), if it ran since this machine booted: this agent takes over its
    /// devices at once ([`qgjob_core::agent::Agent::replacing`]).
    pub fn previous_session(&self) -> Option<String> {
        self.previous.as_ref().and_then(Holder::session_to_replace)
    }

    /// Writes this agent's scheduler session next to its pid, for the next agent of the dir.
    pub fn record_session(&self, session: &str) -> Result<(), ArtifactError> {
        Ok(write_holder(&self.lock, Some(session))?)
    }

    /// The environment variable every command the agent starts must carry, so that a later
    /// agent of this cache dir can find it if this one is killed (see [`super::reap`]).
    pub fn process_mark(&self) -> (String, String) {
        super::reap::mark(&self.dir)
    }

    /// Where the process groups of the commands running now are recorded
    /// ([`super::runner::Invocation::groups_dir`]).
    pub fn groups_dir(&self) -> PathBuf {
        self.dir.join("groups")
    }

    /// Total bytes of cached artifacts, as indexed.
    pub fn size(&self) -> u64 {
        self.index
            .lock()
            .map(|i| i.entries.values().map(|e| e.size).sum())
            .unwrap_or(0)
    }

    fn key_lock(&self, key: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = match self.locks.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        locks.entry(key.to_path_buf()).or_default().clone()
    }

    /// Marks `path` used and pinned if it is cached.
    fn pin_existing(self: &Arc<Self>, path: &Path) -> Option<Pinned> {
        let mut idx = self.index.lock().ok()?;
        idx.clock += 1;
        let now = idx.clock;
        let e = idx.entries.get_mut(path)?;
        if std::fs::symlink_metadata(path).is_err() {
            // Removed behind our back: forget it and fetch again.
            idx.entries.remove(path);
            return None;
        }
        e.last_used = now;
        e.pins += 1;
        Some(Pinned {
            cache: self.clone(),
            path: path.to_path_buf(),
        })
    }

    /// Records a new entry (pinned) and evicts least-recently-used unpinned entries while
    /// the cache is over its bound.
    fn insert(self: &Arc<Self>, path: PathBuf, size: u64) -> Pinned {
        let mut victims = Vec::new();
        if let Ok(mut idx) = self.index.lock() {
            idx.clock += 1;
            let now = idx.clock;
            idx.entries.insert(
                path.clone(),
                Entry {
                    size,
                    last_used: now,
                    pins: 1,
                },
            );
            let mut total: u64 = idx.entries.values().map(|e| e.size).sum();
            while total > self.max_bytes {
                let victim = idx
                    .entries
                    .iter()
                    .filter(|(_, e)| e.pins == 0)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(p, e)| (p.clone(), e.size));
                let Some((p, s)) = victim else { break };
                idx.entries.remove(&p);
                total -= s;
                victims.push(p);
            }
        }
        for v in victims {
            remove_path(&v);
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
        }
        Pinned {
            cache: self.clone(),
            path,
        }
    }

    fn tmp_path(&self, name: &str) -> PathBuf {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join("tmp")
            .join(format!("{name}.{}.{n}", std::process::id()))
    }

    /// The build for `build`, downloaded and verified if not cached. Returns its sha256
    /// and the pinned file.
    pub async fn build(
        self: &Arc<Self>,
        build: &BuildRef,
    ) -> Result<(String, Pinned), ArtifactError> {
        let sha = self.source.build_sha(build).await?.to_ascii_lowercase();
        check_sha(&sha)?;
        let path = self.dir.join("builds").join(&sha);
        let lock = self.key_lock(&path);
        let _g = lock.lock().await;
        if let Some(p) = self.pin_existing(&path) {
            return Ok((sha, p));
        }
        let tmp = self.tmp_path(&sha);
        let what = format!("build {build} ({sha})");
        let r = self.download(&sha, &tmp, &what, true).await;
        if let Err(e) = r {
            remove_path(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path)?;
        self.stats.build_downloads.fetch_add(1, Ordering::Relaxed);
        let size = disk_size(&path);
        Ok((sha, self.insert(path, size)))
    }

    async fn download(
        &self,
        sha: &str,
        tmp: &Path,
        what: &str,
        build: bool,
    ) -> Result<(), ArtifactError> {
        if build {
            self.source.fetch_build(sha, tmp).await?;
        } else {
            self.source.fetch_bundle(sha, tmp).await?;
        }
        let t = tmp.to_path_buf();
        let actual = tokio::task::spawn_blocking(move || sha256_file(&t))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        if actual != sha {
            return Err(ArtifactError::HashMismatch {
                what: what.to_string(),
                expected: sha.to_string(),
                actual,
            });
        }
        Ok(())
    }

    /// The bundle `sha`, unpacked and with its npm dependencies installed, fetching it if
    /// not cached. `log` receives npm's output.
    pub async fn bundle(
        self: &Arc<Self>,
        sha: &str,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Pinned, ArtifactError> {
        let sha = sha.to_ascii_lowercase();
        check_sha(&sha)?;
        let path = self.dir.join("bundles").join(&sha);
        let lock = self.key_lock(&path);
        let _g = lock.lock().await;
        if let Some(p) = self.pin_existing(&path) {
            return Ok(p);
        }
        let archive = self.tmp_path(&format!("{sha}.tar.gz"));
        let tree = self.tmp_path(&sha);
        let r = self.prepare_bundle(&sha, &archive, &tree, log).await;
        remove_path(&archive);
        if let Err(e) = r {
            remove_path(&tree);
            return Err(e);
        }
        std::fs::rename(&tree, &path)?;
        let size = disk_size(&path);
        Ok(self.insert(path, size))
    }

    async fn prepare_bundle(
        &self,
        sha: &str,
        archive: &Path,
        tree: &Path,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), ArtifactError> {
        self.download(sha, archive, &format!("bundle {sha}"), false)
            .await?;
        self.stats.bundle_downloads.fetch_add(1, Ordering::Relaxed);
        let (a, t, limits) = (archive.to_path_buf(), tree.to_path_buf(), self.limits);
        tokio::task::spawn_blocking(move || bundle::unpack(&a, &t, limits))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        if self.npm.enabled && tree.join("package.json").is_file() {
            self.npm_install(sha, tree, log).await?;
        }
        Ok(())
    }

    async fn npm_install(
        &self,
        sha: &str,
        tree: &Path,
        log: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<(), ArtifactError> {
        // Lifecycle scripts stay off: a bundle is user input, and appwright's postinstall
        // would download drivers on every agent.
        let args: &[&str] = if tree.join("package-lock.json").is_file() {
            &["ci", "--ignore-scripts", "--no-audit", "--no-fund"]
        } else {
            &["install", "--ignore-scripts", "--no-audit", "--no-fund"]
        };
        log(&format!(
            "qgjob: installing the bundle's dependencies: npm {}\n",
            args.join(" ")
        ));
        let inv = super::runner::Invocation {
            argv: std::iter::once(self.npm.npm.display().to_string())
                .chain(args.iter().map(|s| s.to_string()))
                .collect(),
            cwd: tree.to_path_buf(),
            env: vec![self.process_mark()],
            timeout: self.npm.timeout,
            kill_grace: Duration::from_secs(5),
            report_path: tree.join(".qgjob-npm-unused.json"),
            groups_dir: Some(self.groups_dir()),
        };
        let out = super::runner::run_command(&inv, log, std::future::pending())
            .await
            .map_err(|e| ArtifactError::Npm {
                sha: sha.to_string(),
                message: e.to_string(),
            })?;
        self.stats.npm_installs.fetch_add(1, Ordering::Relaxed);
        match out.ended {
            super::runner::Ended::Exited(0) => Ok(()),
            other => Err(ArtifactError::Npm {
                sha: sha.to_string(),
                message: format!("{other:?}: {}", out.tail),
            }),
        }
    }

    /// A fresh work dir for one job attempt: a copy of the bundle's files (so a job cannot
    /// change the cached bundle) with `node_modules` linked to the cached install.
    pub fn work_dir(&self, bundle: &Path, name: &str) -> Result<WorkDir, ArtifactError> {
        let dir = self.dir.join("work").join(name);
        remove_path(&dir);
        std::fs::create_dir_all(&dir)?;
        let guard = WorkDir { path: dir };
        copy_tree(bundle, &guard.path)?;
        Ok(guard)
    }

    /// An empty work dir (jobs without a bundle run in the project dir instead; this is for
    /// reports and scratch files).
    pub fn scratch_dir(&self, name: &str) -> Result<WorkDir, ArtifactError> {
        let dir = self.dir.join("work").join(name);
        remove_path(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(WorkDir { path: dir })
    }
}

/// A per-job work dir, removed when dropped.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        remove_path(&self.path);
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let src = e.path();
        let dst = to.join(e.file_name());
        let ft = e.file_type()?;
        if e.file_name() == "node_modules" && ft.is_dir() {
            // Installed once per bundle; linking keeps a work dir cheap.
            std::os::unix::fs::symlink(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if ft.is_dir() {
            std::fs::create_dir_all(&dst)?;
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// An [`ArtifactSource`] over local directories: `builds/<sha>`, `bundles/<sha>` and an
/// `apps.json` map of `org/app_version_id` → sha. For agents that share a file system with
/// the uploader, and for tests.
pub struct DirSource {
    root: PathBuf,
}

impl DirSource {
    /// A source reading from `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DirSource { root: root.into() }
    }

    /// Stores `bytes` as a build of `build`; returns its sha256.
    pub fn add_build(&self, build: &BuildRef, bytes: &[u8]) -> std::io::Result<String> {
        let sha = hex::encode(Sha256::digest(bytes));
        std::fs::create_dir_all(self.root.join("builds"))?;
        std::fs::write(self.root.join("builds").join(&sha), bytes)?;
        let map_path = self.root.join("apps.json");
        let mut map: HashMap<String, String> = std::fs::read(&map_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        map.insert(build.to_string(), sha.clone());
        let text = serde_json::to_vec(&map).map_err(std::io::Error::other)?;
        std::fs::write(map_path, text)?;
        Ok(sha)
    }

    /// Stores a bundle; returns its sha256.
    pub fn add_bundle(&self, bytes: &[u8]) -> std::io::Result<String> {
        let sha = hex::encode(Sha256::digest(bytes));
        std::fs::create_dir_all(self.root.join("bundles"))?;
        std::fs::write(self.root.join("bundles").join(&sha), bytes)?;
        Ok(sha)
    }

    fn copy(&self, kind: &str, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
        check_sha(sha)?;
        std::fs::copy(self.root.join(kind).join(sha), dest).map_err(|e| ArtifactError::Fetch {
            what: format!("{kind}/{sha}"),
            message: e.to_string(),
        })?;
        Ok(())
    }
}

#[async_trait]
impl ArtifactSource for DirSource {
    async fn build_sha(&self, build: &BuildRef) -> Result<String, ArtifactError> {
        let fetch = |m: String| ArtifactError::Fetch {
            what: format!("build {build}"),
            message: m,
        };
        let bytes = std::fs::read(self.root.join("apps.json")).map_err(|e| fetch(e.to_string()))?;
        let map: HashMap<String, String> =
            serde_json::from_slice(&bytes).map_err(|e| fetch(e.to_string()))?;
        map.get(&build.to_string())
            .cloned()
            .ok_or_else(|| fetch("no build uploaded for this app version".to_string()))
    }

    async fn fetch_build(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
        self.copy("builds", sha, dest)
    }

    async fn fetch_bundle(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
        self.copy("bundles", sha, dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;

    fn build(v: &str) -> BuildRef {
        BuildRef {
            org_id: "acme".parse().expect("org"),
            app_version_id: v.parse().expect("version"),
        }
    }

    fn targz(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    /// A source that counts fetches and can corrupt them.
    struct Counting {
        inner: DirSource,
        fetches: AtomicU64,
        corrupt: bool,
    }

    #[async_trait]
    impl ArtifactSource for Counting {
        async fn build_sha(&self, b: &BuildRef) -> Result<String, ArtifactError> {
            self.inner.build_sha(b).await
        }
        async fn fetch_build(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.inner.fetch_build(sha, dest).await?;
            if self.corrupt {
                std::fs::write(dest, b"tampered")?;
            }
            Ok(())
        }
        async fn fetch_bundle(&self, sha: &str, dest: &Path) -> Result<(), ArtifactError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            self.inner.fetch_bundle(sha, dest).await
        }
    }

    fn setup(corrupt: bool, max: u64) -> (tempfile::TempDir, Arc<Counting>, Arc<ArtifactCache>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = Arc::new(Counting {
            inner: DirSource::new(dir.path().join("src")),
            fetches: AtomicU64::new(0),
            corrupt,
        });
        let cache = ArtifactCache::open(
            dir.path().join("cache"),
            max,
            src.clone(),
            NpmConfig {
                enabled: false,
                ..NpmConfig::default()
            },
        )
        .expect("cache");
        (dir, src, cache)
    }

    #[tokio::test]
    async fn downloads_a_build_once_and_verifies_it() {
        let (_d, src, cache) = setup(false, 1 << 20);
        let sha = src
            .inner
            .add_build(&build("v1"), b"apk bytes")
            .expect("add");
        let (s1, p1) = cache.build(&build("v1")).await.expect("build");
        assert_eq!(s1, sha);
        assert_eq!(std::fs::read(p1.path()).expect("read"), b"apk bytes");
        let (_, p2) = cache.build(&build("v1")).await.expect("cached");
        assert_eq!(p1.path(), p2.path());
        assert_eq!(src.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats.build_downloads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_corrupt_download_is_refused_and_not_kept() {
        let (_d, src, cache) = setup(true, 1 << 20);
        src.inner
            .add_build(&build("v1"), b"apk bytes")
            .expect("add");
        let e = cache.build(&build("v1")).await.err().expect("mismatch");
        assert!(matches!(e, ArtifactError::HashMismatch { .. }), "{e}");
        assert_eq!(
            std::fs::read_dir(cache.dir().join("builds"))
                .expect("dir")
                .count(),
            0
        );
        assert_eq!(
            std::fs::read_dir(cache.dir().join("tmp"))
                .expect("dir")
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn evicts_least_recently_used_unpinned_entries() {
        let (_d, src, cache) = setup(false, 25);
        for v in ["v1", "v2", "v3"] {
            src.inner
                .add_build(&build(v), format!("{v}-0123456789").as_bytes())
                .expect("add");
        }
        let (_, p1) = cache.build(&build("v1")).await.expect("v1");
        let p1_path = p1.path().to_path_buf();
        drop(p1);
        let (_, p2) = cache.build(&build("v2")).await.expect("v2");
        // v1 (13 bytes) + v2 (13) > 25: v1 is the least recently used and unpinned.
        assert!(!p1_path.exists(), "v1 evicted");
        assert!(p2.path().exists());
        // v2 is pinned, so adding v3 cannot evict it even though the bound is exceeded.
        let (_, p3) = cache.build(&build("v3")).await.expect("v3");
        assert!(p2.path().exists() && p3.path().exists());
        assert_eq!(cache.stats.evictions.load(Ordering::SeqCst), 1);
        drop((p2, p3));
        // Fetching v1 again downloads it again and evicts the oldest of v2/v3.
        let _ = cache.build(&build("v1")).await.expect("v1 again");
        assert_eq!(src.fetches.load(Ordering::SeqCst), 4);
        assert!(cache.size() <= 25 + 13);
    }

    #[tokio::test]
    async fn bundles_unpack_once_and_work_dirs_are_fresh_copies() {
        let (_d, src, cache) = setup(false, 1 << 20);
        let sha = src
            .inner
            .add_bundle(&targz(&[
                ("tests/a.spec.js", b"spec"),
                ("node_modules/x/index.js", b"m"),
            ]))
            .expect("add");
        let b1 = cache.bundle(&sha, &|_: &str| {}).await.expect("bundle");
        let b2 = cache.bundle(&sha, &|_: &str| {}).await.expect("cached");
        assert_eq!(b1.path(), b2.path());
        assert_eq!(src.fetches.load(Ordering::SeqCst), 1);
        let w = cache.work_dir(b1.path(), "job-1").expect("work dir");
        assert_eq!(
            std::fs::read(w.path().join("tests/a.spec.js")).expect("copy"),
            b"spec"
        );
        assert!(std::fs::symlink_metadata(w.path().join("node_modules"))
            .expect("link")
            .file_type()
            .is_symlink());
        std::fs::write(w.path().join("tests/a.spec.js"), b"changed").expect("write");
        assert_eq!(
            std::fs::read(b1.path().join("tests/a.spec.js")).expect("cached"),
            b"spec"
        );
        let wp = w.path().to_path_buf();
        drop(w);
        assert!(!wp.exists(), "work dir removed");
    }

    #[test]
    fn a_cache_dir_held_by_an_open_cache_is_refused_and_free_once_it_closes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src: Arc<dyn ArtifactSource> = Arc::new(DirSource::new(dir.path().join("src")));
        let cache_dir = dir.path().join("cache");
        let open = || ArtifactCache::open(&cache_dir, 1 << 20, src.clone(), NpmConfig::default());
        let first = open().expect("first");
        assert_eq!(first.previous_session(), None);
        first.record_session("session-1").expect("record");
        // Each open takes its own lock, so a second one, in this process or another, fails.
        let me = std::process::id() as i32;
        match open() {
            Err(ArtifactError::InUse { pid, .. }) => assert_eq!(pid, me),
            other => panic!("expected InUse, got {:?}", other.err()),
        }
        drop(first);
        // Its holder is gone: the dir is taken over, and the old session is known.
        let second = open().expect("taken over");
        assert_eq!(second.previous_session().as_deref(), Some("session-1"));
        // An agent that ends before it has a session passes the old one on.
        drop(second);
        let third = open().expect("again");
        assert_eq!(third.previous_session().as_deref(), Some("session-1"));
        drop(third);
        // A session written on another boot (a disk copied from a running machine) is not
        // taken over: that agent may be running there.
        std::fs::write(cache_dir.join("agent.lock"), "1 session-1 another-boot\n").expect("write");
        assert_eq!(open().expect("open").previous_session(), None);
    }

    #[test]
    fn an_agent_of_the_pid_file_release_still_holds_its_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src: Arc<dyn ArtifactSource> = Arc::new(DirSource::new(dir.path().join("src")));
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).expect("mkdir");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        std::fs::write(cache_dir.join("agent.pid"), child.id().to_string()).expect("pid");
        let open = || ArtifactCache::open(&cache_dir, 1 << 20, src.clone(), NpmConfig::default());
        match open() {
            Err(ArtifactError::InUse { pid, .. }) => assert_eq!(pid, child.id() as i32),
            other => panic!("expected InUse, got {:?}", other.err()),
        }
        let _ = child.kill();
        let _ = child.wait();
        // Gone: the dir is taken over and the old file removed.
        let c = open().expect("taken over");
        assert!(!cache_dir.join("agent.pid").exists());
        drop(c);
    }

    #[test]
    fn a_killed_agent_leaves_its_cache_dir_free() {
        // A process of its own holds the lock (flock(1) from util-linux) and is killed.
        let dir = tempfile::tempdir().expect("tempdir");
        let src: Arc<dyn ArtifactSource> = Arc::new(DirSource::new(dir.path().join("src")));
        let cache_dir = dir.path().join("cache");
        std::fs::create_dir_all(&cache_dir).expect("mkdir");
        let lock = cache_dir.join("agent.lock");
        let boot = boot_id().expect("a Linux boot id");
        std::fs::write(&lock, format!("1 old-session {boot}\n")).expect("write");
        // --no-fork: the process that holds the lock is the one we kill.
        let mut holder = std::process::Command::new("flock")
            .arg("--no-fork")
            .arg(&lock)
            .args(["sleep", "30"])
            .spawn()
            .expect("flock(1)");
        let open = || ArtifactCache::open(&cache_dir, 1 << 20, src.clone(), NpmConfig::default());
        // Until flock(1) has the lock (a probe that does not touch the file's content).
        let probe = std::fs::File::open(&lock).expect("open");
        for _ in 0..500 {
            match probe.try_lock_shared() {
                Ok(()) => probe.unlock().expect("unlock"),
                Err(_) => break,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            matches!(open(), Err(ArtifactError::InUse { pid: 1, .. })),
            "a live holder's dir was taken"
        );
        holder.kill().expect("kill");
        holder.wait().expect("wait");
        let c = open().expect("free after the kill");
        assert_eq!(c.previous_session().as_deref(), Some("old-session"));
    }

    #[tokio::test]
    async fn bad_hashes_never_become_paths() {
        let (_d, _src, cache) = setup(false, 1 << 20);
        let e = cache
            .bundle("../../etc", &|_: &str| {})
            .await
            .err()
            .expect("refused");
        assert!(matches!(e, ArtifactError::BadHash(_)));
    }

    #[tokio::test]
    async fn reopening_adopts_cached_entries_and_clears_leftovers() {
        let (d, src, cache) = setup(false, 1 << 20);
        src.inner.add_build(&build("v1"), b"apk").expect("add");
        let (_, p) = cache.build(&build("v1")).await.expect("build");
        drop(p);
        std::fs::write(cache.dir().join("tmp").join("half"), b"x").expect("write");
        drop(cache);
        let cache = ArtifactCache::open(
            d.path().join("cache"),
            1 << 20,
            src.clone(),
            NpmConfig::default(),
        )
        .expect("reopen");
        let _ = cache.build(&build("v1")).await.expect("cached");
        assert_eq!(src.fetches.load(Ordering::SeqCst), 1);
        assert_eq!(
            std::fs::read_dir(cache.dir().join("tmp"))
                .expect("dir")
                .count(),
            0
        );
    }
}
