//! [`MemoryStore`]: the store for `--store memory` and tests. Nothing survives the process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use qgjob_core::{AppVersionId, Job, JobFilter, JobId, OrgId, RunId, Time};

use super::{
    batch_lease_high_water, dedup_jobs, BuildRecord, RunRecord, Store, StoreError, TokenRecord,
    WriteBatch, DEFAULT_LIST_LIMIT,
};

#[derive(Default)]
struct Inner {
    jobs: BTreeMap<u64, Job>,
    seq_of: HashMap<JobId, u64>,
    idem: HashMap<(OrgId, String), u64>,
    runs: HashMap<RunId, RunRecord>,
    logs: HashMap<JobId, Vec<u8>>,
    builds: HashMap<(OrgId, AppVersionId), BuildRecord>,
    bundles: std::collections::HashSet<(OrgId, String)>,
    tokens: Vec<TokenRecord>,
    lease_high_water: u64,
}

/// A store that keeps everything in memory (behind a mutex never held across an await).
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn write(&self, batch: &WriteBatch) -> Result<(), StoreError> {
        let mut g = self.lock();
        for j in dedup_jobs(&batch.jobs) {
            g.seq_of.insert(j.id, j.seq);
            if let Some(k) = &j.spec.idempotency_key {
                g.idem.insert((j.spec.org_id.clone(), k.clone()), j.seq);
            }
            g.jobs.insert(j.seq, j.clone());
        }
        for r in &batch.runs {
            g.runs.insert(r.id, r.clone());
        }
        if let Some(h) = batch_lease_high_water(&batch.jobs) {
            g.lease_high_water = g.lease_high_water.max(h);
        }
        Ok(())
    }

    async fn lease_high_water(&self) -> Result<u64, StoreError> {
        Ok(self.lock().lease_high_water)
    }

    async fn load_for_restore(&self, finished_since: Time) -> Result<Vec<Job>, StoreError> {
        let g = self.lock();
        let max = g.jobs.keys().next_back().copied();
        Ok(g.jobs
            .values()
            .filter(|j| {
                !j.state.is_final()
                    || j.finished_at.is_none_or(|t| t >= finished_since)
                    || Some(j.seq) == max
            })
            .cloned()
            .collect())
    }

    async fn get_job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let g = self.lock();
        Ok(g.seq_of.get(&id).and_then(|s| g.jobs.get(s)).cloned())
    }

    async fn find_idempotent(&self, org: &OrgId, key: &str) -> Result<Option<Job>, StoreError> {
        let g = self.lock();
        Ok(g.idem
            .get(&(org.clone(), key.to_string()))
            .and_then(|s| g.jobs.get(s))
            .cloned())
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let g = self.lock();
        let limit = filter.limit.unwrap_or(DEFAULT_LIST_LIMIT);
        let from = filter.after_seq.map_or(0, |s| s.saturating_add(1));
        Ok(g.jobs
            .range(from..)
            .map(|(_, j)| j)
            .filter(|j| filter.matches(j))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>, StoreError> {
        Ok(self.lock().runs.get(&id).cloned())
    }

    async fn run_jobs(&self, id: RunId) -> Result<Vec<Job>, StoreError> {
        let g = self.lock();
        Ok(g.jobs
            .values()
            .filter(|j| j.spec.run_id == Some(id))
            .cloned()
            .collect())
    }

    async fn append_log(&self, job: JobId, data: &[u8], limit: u64) -> Result<u64, StoreError> {
        let mut g = self.lock();
        let log = g.logs.entry(job).or_default();
        if (log.len() + data.len()) as u64 > limit {
            return Err(StoreError::LogFull { job, limit });
        }
        log.extend_from_slice(data);
        Ok(log.len() as u64)
    }

    async fn read_log(
        &self,
        job: JobId,
        offset: u64,
        max: usize,
    ) -> Result<(Vec<u8>, u64), StoreError> {
        let g = self.lock();
        let log = g.logs.get(&job).map(Vec::as_slice).unwrap_or_default();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(log.len());
        let end = start.saturating_add(max).min(log.len());
        Ok((log[start..end].to_vec(), log.len() as u64))
    }

    async fn put_build(
        &self,
        org: &OrgId,
        app: &AppVersionId,
        build: &BuildRecord,
    ) -> Result<(), StoreError> {
        self.lock()
            .builds
            .insert((org.clone(), app.clone()), build.clone());
        Ok(())
    }

    async fn get_build(
        &self,
        org: &OrgId,
        app: &AppVersionId,
    ) -> Result<Option<BuildRecord>, StoreError> {
        Ok(self.lock().builds.get(&(org.clone(), app.clone())).cloned())
    }

    async fn add_bundle(&self, org: &OrgId, sha256: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .bundles
            .insert((org.clone(), sha256.to_string())))
    }

    async fn has_bundle(&self, org: &OrgId, sha256: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .bundles
            .contains(&(org.clone(), sha256.to_string())))
    }

    async fn add_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let mut g = self.lock();
        g.tokens.retain(|t| t.hash != token.hash);
        g.tokens.push(token.clone());
        Ok(())
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.lock().tokens.clone())
    }

    async fn remove_token(&self, hash: &str) -> Result<bool, StoreError> {
        let mut g = self.lock();
        let before = g.tokens.len();
        g.tokens.retain(|t| t.hash != hash);
        Ok(g.tokens.len() < before)
    }
}
