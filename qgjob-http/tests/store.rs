//! The store contract, run against every [`Store`] implementation: SQLite, memory and
//! PostgreSQL (a fresh schema on `QGJOB_TEST_PG_URL`; skipped with a notice when no server
//! answers). Jobs come from a real scheduler so the
//! records are the ones the server writes.

mod common;

use std::sync::Arc;

use common::{pg_url, Guard};
use qgjob_core::{
    AppVersionId, DeviceId, DeviceInfo, GroupedScheduler, Job, JobFilter, JobSpec, JobState,
    LeaseId, OrgId, RunId, RunReport, Scheduler, SchedulerConfig, Target, Time,
};
use qgjob_http::store::{
    BuildRecord, MemoryStore, PgStore, RunRecord, SqliteStore, Store, StoreError, Synchronous,
    TokenKind, TokenRecord, WriteBatch,
};

fn spec(org: &str, app: &str, test: &str) -> JobSpec {
    JobSpec::new(
        OrgId::new(org).unwrap(),
        AppVersionId::new(app).unwrap(),
        vec![test.to_string()],
    )
}

/// A fresh PostgreSQL store in its own schema. No server answering is a failure (CI starts
/// one), unless `QGJOB_SKIP_PG=1` asks explicitly to leave PostgreSQL out.
async fn pg_store() -> Option<(PgStore, Guard)> {
    let (store, guard, _) = common::fresh_pg_store("store tests").await?;
    Some((store, guard))
}

/// Every store under test, each fresh, with what keeps its backing alive.
async fn stores() -> Vec<(&'static str, Arc<dyn Store>, Guard)> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("t.sqlite3"), Synchronous::Normal)
        .await
        .unwrap();
    let mut out: Vec<(&'static str, Arc<dyn Store>, Guard)> = vec![
        ("sqlite", Arc::new(sqlite), Guard::Dir(dir)),
        ("memory", Arc::new(MemoryStore::new()), Guard::None),
    ];
    if let Some((pg, guard)) = pg_store().await {
        out.push(("postgres", Arc::new(pg), guard));
    }
    out
}

/// A scheduler with `n` jobs: orgs alternate acme/globex, app versions v0/v1/v2.
fn scheduler_with(n: usize, run: Option<RunId>) -> (GroupedScheduler, Vec<Job>) {
    let mut s = GroupedScheduler::new(SchedulerConfig::default());
    for i in 0..n {
        let org = if i % 2 == 0 { "acme" } else { "globex" };
        let mut sp = spec(org, &format!("v{}", i % 3), &format!("t{i}.spec.js"));
        sp.run_id = run;
        if i % 4 == 3 {
            sp.target = Target::Browserstack;
        }
        s.submit(Time(1000 + i as u64), sp).unwrap();
    }
    let jobs: Vec<Job> = s
        .list(&JobFilter {
            limit: Some(usize::MAX),
            ..Default::default()
        })
        .into_iter()
        .cloned()
        .collect();
    s.take_events();
    (s, jobs)
}

#[tokio::test]
async fn write_get_and_upsert() {
    for (name, st, _dir) in stores().await {
        let (mut s, jobs) = scheduler_with(3, None);
        st.write(&WriteBatch {
            jobs: jobs.clone(),
            runs: vec![],
        })
        .await
        .unwrap();
        for j in &jobs {
            assert_eq!(st.get_job(j.id).await.unwrap().as_ref(), Some(j), "{name}");
        }
        // A later state of the same job replaces the earlier one (even within one batch).
        let dev = DeviceInfo {
            id: DeviceId::new("emu-1").unwrap(),
            target: Target::Emulator,
            capabilities: Default::default(),
            installed: None,
            install_estimate_ms: None,
            idle: false,
            session: None,
            replaces: None,
        };
        s.register_device(Time(2000), dev.clone()).unwrap();
        let lease = s.lease(Time(2001), &dev.id, 1).unwrap().unwrap();
        let jid = lease.jobs[0].id;
        let running = s.get(jid).unwrap().clone();
        s.complete(
            Time(2002),
            lease.id,
            jid,
            RunReport {
                passed: true,
                tests: vec![],
                duration_ms: 1,
                error: None,
            },
        )
        .unwrap();
        let passed = s.get(jid).unwrap().clone();
        st.write(&WriteBatch {
            jobs: vec![running, passed.clone()],
            runs: vec![],
        })
        .await
        .unwrap();
        let got = st.get_job(jid).await.unwrap().unwrap();
        assert_eq!(got.state, JobState::Passed, "{name}");
        assert_eq!(got, passed, "{name}");
        let all = st.list_jobs(&JobFilter::default()).await.unwrap();
        assert_eq!(all.len(), 3, "{name}: upsert must not duplicate");
    }
}

#[tokio::test]
async fn list_filters_and_cursor() {
    for (name, st, _dir) in stores().await {
        let (_, jobs) = scheduler_with(12, None);
        st.write(&WriteBatch {
            jobs: jobs.clone(),
            runs: vec![],
        })
        .await
        .unwrap();
        let acme = OrgId::new("acme").unwrap();
        let f = JobFilter {
            org_id: Some(acme.clone()),
            ..Default::default()
        };
        let got = st.list_jobs(&f).await.unwrap();
        let want: Vec<&Job> = jobs.iter().filter(|j| f.matches(j)).collect();
        assert_eq!(got.iter().collect::<Vec<_>>(), want, "{name}");
        assert_eq!(got.len(), 6);

        let f = JobFilter {
            app_version_id: Some(AppVersionId::new("v1").unwrap()),
            target: Some(Target::Emulator),
            ..Default::default()
        };
        let got = st.list_jobs(&f).await.unwrap();
        assert!(!got.is_empty());
        assert!(got.iter().all(|j| f.matches(j)), "{name}");
        assert_eq!(
            got.len(),
            jobs.iter().filter(|j| f.matches(j)).count(),
            "{name}"
        );

        // Pages of 5 by cursor cover everything once, in seq order.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = st
                .list_jobs(&JobFilter {
                    after_seq: after,
                    limit: Some(5),
                    ..Default::default()
                })
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|j| j.seq);
            seen.extend(page.into_iter().map(|j| j.id));
        }
        assert_eq!(
            seen,
            jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
            "{name}"
        );
        let f = JobFilter {
            state: Some(JobState::Passed),
            ..Default::default()
        };
        assert!(st.list_jobs(&f).await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn runs_and_their_jobs() {
    for (name, st, _dir) in stores().await {
        let run = RunId::from_parts(5000, [7; 10]);
        let (_, jobs) = scheduler_with(4, Some(run));
        let (_, others) = scheduler_with(2, None);
        let rec = RunRecord {
            id: run,
            org_id: OrgId::new("acme").unwrap(),
            created_at: Time(5000),
            labels: [("branch".to_string(), "main".to_string())].into(),
            job_count: 4,
        };
        // Different schedulers reuse seqs; shift the others past ours.
        let others: Vec<Job> = others
            .into_iter()
            .map(|mut j| {
                // Same seed, same ids: give them their own.
                j.seq += 100;
                j.id = qgjob_core::JobId::from_parts(9000 + j.seq, [9; 10]);
                j
            })
            .collect();
        st.write(&WriteBatch {
            jobs: jobs.iter().chain(&others).cloned().collect(),
            runs: vec![rec.clone()],
        })
        .await
        .unwrap();
        assert_eq!(st.get_run(run).await.unwrap(), Some(rec), "{name}");
        assert_eq!(
            st.get_run(RunId::from_parts(1, [0; 10])).await.unwrap(),
            None
        );
        assert_eq!(st.run_jobs(run).await.unwrap(), jobs, "{name}");
        assert_eq!(
            st.list_jobs(&JobFilter::default()).await.unwrap().len(),
            6,
            "{name}"
        );
        let f = JobFilter {
            run_id: Some(run),
            limit: Some(2),
            ..Default::default()
        };
        assert_eq!(
            st.list_jobs(&f).await.unwrap(),
            jobs[..2].to_vec(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn restore_set_is_unfinished_recent_and_last() {
    for (name, st, _dir) in stores().await {
        let (_, jobs) = scheduler_with(5, None);
        let mut jobs = jobs;
        // 0: finished long ago, 1: finished recently, 4 (the last seq): finished long ago.
        for (i, t) in [(0usize, 10u64), (1, 9_000), (4, 20)] {
            jobs[i].state = JobState::Passed;
            jobs[i].finished_at = Some(Time(t));
        }
        st.write(&WriteBatch {
            jobs: jobs.clone(),
            runs: vec![],
        })
        .await
        .unwrap();
        let got = st.load_for_restore(Time(5_000)).await.unwrap();
        let mut ids: Vec<u64> = got.iter().map(|j| j.seq).collect();
        ids.sort();
        let want: Vec<u64> = [1usize, 2, 3, 4].iter().map(|i| jobs[*i].seq).collect();
        assert_eq!(ids, want, "{name}");
        // And a scheduler restored from it keeps the queued jobs queued.
        let s = GroupedScheduler::restore(SchedulerConfig::default(), got).unwrap();
        assert_eq!(s.get(jobs[2].id).unwrap().state, JobState::Queued);
    }
}

#[tokio::test]
async fn logs_append_read_and_limit() {
    for (name, st, _dir) in stores().await {
        let (_, jobs) = scheduler_with(2, None);
        let (a, b) = (jobs[0].id, jobs[1].id);
        assert_eq!(st.append_log(a, b"hello ", 16).await.unwrap(), 6, "{name}");
        assert_eq!(st.append_log(a, b"world\n", 16).await.unwrap(), 12);
        assert_eq!(st.append_log(b, b"other", 16).await.unwrap(), 5);
        match st.append_log(a, b"too much", 16).await {
            Err(StoreError::LogFull { limit: 16, .. }) => {}
            other => panic!("{name}: expected LogFull, got {other:?}"),
        }
        assert_eq!(
            st.read_log(a, 0, usize::MAX).await.unwrap(),
            (b"hello world\n".to_vec(), 12),
            "{name}"
        );
        assert_eq!(
            st.read_log(a, 6, usize::MAX).await.unwrap(),
            (b"world\n".to_vec(), 12)
        );
        assert_eq!(
            st.read_log(a, 99, usize::MAX).await.unwrap(),
            (Vec::new(), 12)
        );
        assert_eq!(
            st.read_log(jobs[1].id, 0, usize::MAX).await.unwrap().0,
            b"other".to_vec()
        );
        // At most `max` bytes, from any offset, across chunk boundaries.
        for offset in 0..=12u64 {
            for max in [0, 1, 3, 5, 6, 7, 100] {
                let want = &b"hello world\n"[(offset as usize).min(12)..];
                let want = &want[..want.len().min(max)];
                assert_eq!(
                    st.read_log(a, offset, max).await.unwrap(),
                    (want.to_vec(), 12),
                    "{name}: offset {offset}, max {max}"
                );
            }
        }
    }
}

#[tokio::test]
async fn builds_and_tokens() {
    for (name, st, _dir) in stores().await {
        let org = OrgId::new("acme").unwrap();
        let v1 = AppVersionId::new("v1").unwrap();
        assert_eq!(st.get_build(&org, &v1).await.unwrap(), None);
        let b1 = BuildRecord {
            sha256: "a".repeat(64),
            size: 10,
        };
        let b2 = BuildRecord {
            sha256: "b".repeat(64),
            size: 20,
        };
        st.put_build(&org, &v1, &b1).await.unwrap();
        assert_eq!(st.get_build(&org, &v1).await.unwrap(), Some(b1), "{name}");
        st.put_build(&org, &v1, &b2).await.unwrap();
        assert_eq!(
            st.get_build(&org, &v1).await.unwrap(),
            Some(b2.clone()),
            "{name}"
        );
        let other = OrgId::new("globex").unwrap();
        assert_eq!(st.get_build(&other, &v1).await.unwrap(), None, "{name}");

        let t = TokenRecord {
            hash: "c".repeat(64),
            kind: TokenKind::Org,
            org_id: Some(org.clone()),
        };
        let a = TokenRecord {
            hash: "d".repeat(64),
            kind: TokenKind::Agent,
            org_id: None,
        };
        st.add_token(&t).await.unwrap();
        st.add_token(&a).await.unwrap();
        let mut got = st.tokens().await.unwrap();
        got.sort_by(|x, y| x.hash.cmp(&y.hash));
        assert_eq!(got, vec![t.clone(), a.clone()], "{name}");
        assert!(st.remove_token(&t.hash).await.unwrap(), "{name}");
        assert!(
            !st.remove_token(&t.hash).await.unwrap(),
            "{name}: removed twice"
        );
        assert_eq!(st.tokens().await.unwrap(), vec![a], "{name}");
    }
}

#[tokio::test]
async fn sqlite_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite3");
    let (_, jobs) = scheduler_with(3, None);
    {
        let st = SqliteStore::open(&path, Synchronous::Full).await.unwrap();
        st.write(&WriteBatch {
            jobs: jobs.clone(),
            runs: vec![],
        })
        .await
        .unwrap();
        st.append_log(jobs[0].id, b"x", 10).await.unwrap();
        // No close: as after a crash, the WAL holds the commits.
    }
    let st = SqliteStore::open(&path, Synchronous::Normal).await.unwrap();
    assert_eq!(st.list_jobs(&JobFilter::default()).await.unwrap(), jobs);
    assert_eq!(st.read_log(jobs[0].id, 0, usize::MAX).await.unwrap().1, 1);
}

#[tokio::test]
async fn idempotency_lookup() {
    for (name, st, _guard) in stores().await {
        let (_, mut jobs) = scheduler_with(3, None);
        jobs[0].spec.idempotency_key = Some("k1".into());
        jobs[2].spec.idempotency_key = Some("k1".into());
        st.write(&WriteBatch {
            jobs: jobs.clone(),
            runs: vec![],
        })
        .await
        .unwrap();
        let acme = OrgId::new("acme").unwrap();
        let globex = OrgId::new("globex").unwrap();
        // Jobs 0 and 2 are acme's; the newest with the key wins.
        let got = st.find_idempotent(&acme, "k1").await.unwrap();
        assert_eq!(got.map(|j| j.id), Some(jobs[2].id), "{name}");
        assert_eq!(
            st.find_idempotent(&globex, "k1").await.unwrap(),
            None,
            "{name}"
        );
        assert_eq!(
            st.find_idempotent(&acme, "k2").await.unwrap(),
            None,
            "{name}"
        );
    }
}

#[tokio::test]
async fn lease_high_water_outlives_the_jobs_that_held_it() {
    for (name, st, _dir) in stores().await {
        let mark_after = |jobs: Vec<Job>| {
            let st = st.clone();
            async move {
                st.write(&WriteBatch { jobs, runs: vec![] }).await.unwrap();
                st.lease_high_water().await.unwrap()
            }
        };
        assert_eq!(st.lease_high_water().await.unwrap(), 0, "{name}");
        let (_, mut jobs) = scheduler_with(3, None);
        jobs[0].last_lease = Some(LeaseId(7));
        jobs[1].lease = Some(LeaseId(5));
        assert_eq!(mark_after(jobs.clone()).await, 7, "{name}");
        // The job that held lease 7 moves on to a lower one (never happens in the server,
        // but the mark must not follow it down), then a job gets a higher one.
        jobs[0].last_lease = Some(LeaseId(2));
        assert_eq!(mark_after(vec![jobs[0].clone()]).await, 7, "{name}");
        jobs[2].lease = Some(LeaseId(9));
        assert_eq!(mark_after(vec![jobs[2].clone()]).await, 9, "{name}");
    }
}

/// A database written before the mark was kept gets it from the job bodies when opened.
#[tokio::test]
async fn lease_high_water_is_recovered_from_older_databases() {
    let (_, mut jobs) = scheduler_with(3, None);
    jobs[1].last_lease = Some(LeaseId(11));
    jobs[2].lease = Some(LeaseId(4));
    let batch = WriteBatch { jobs, runs: vec![] };

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite3");
    let st = SqliteStore::open(&path, Synchronous::Normal).await.unwrap();
    st.write(&batch).await.unwrap();
    st.close().await;
    let raw = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("DROP TABLE meta").execute(&raw).await.unwrap();
    raw.close().await;
    let st = SqliteStore::open(&path, Synchronous::Normal).await.unwrap();
    assert_eq!(st.lease_high_water().await.unwrap(), 11, "sqlite");

    if let Some((pg, guard)) = pg_store().await {
        pg.write(&batch).await.unwrap();
        pg.close().await;
        let Guard::Schema(schema) = &guard else {
            unreachable!("pg_store returns a schema guard")
        };
        let raw = sqlx::PgPool::connect(&pg_url()).await.unwrap();
        sqlx::query(&format!("DROP TABLE {schema}.meta"))
            .execute(&raw)
            .await
            .unwrap();
        raw.close().await;
        let pg = PgStore::connect(&pg_url(), Some(schema)).await.unwrap();
        assert_eq!(pg.lease_high_water().await.unwrap(), 11, "postgres");
        pg.close().await;
    }
}

/// Jobs of a second scheduler: the same sequence numbers as [`scheduler_with`]'s, other ids
/// (a second server on the same store would hand out exactly these).
fn other_server_jobs(n: usize) -> Vec<Job> {
    let mut s = GroupedScheduler::new(SchedulerConfig {
        seed: 0x5eed,
        ..SchedulerConfig::default()
    });
    for i in 0..n {
        s.submit(
            Time(2000 + i as u64),
            spec("acme", "v9", &format!("o{i}.spec.js")),
        )
        .unwrap();
    }
    s.list(&JobFilter::default()).into_iter().cloned().collect()
}

#[tokio::test]
async fn a_job_row_of_another_server_is_never_overwritten() {
    let (_, ours) = scheduler_with(3, None);
    let theirs = other_server_jobs(3);
    assert_eq!(ours[0].seq, theirs[0].seq);
    assert_ne!(ours[0].id, theirs[0].id);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.sqlite3");
    let a = SqliteStore::open(&path, Synchronous::Normal).await.unwrap();
    let b = SqliteStore::open(&path, Synchronous::Normal).await.unwrap();
    // Two servers' handles on one store, with what keeps the store alive.
    type Pair = (&'static str, Arc<dyn Store>, Arc<dyn Store>, Guard);
    let mut pairs: Vec<Pair> = vec![("sqlite", Arc::new(a), Arc::new(b), Guard::Dir(dir))];
    if let Some((pa, guard)) = pg_store().await {
        let Guard::Schema(schema) = &guard else {
            unreachable!("pg_store returns a schema guard")
        };
        let pb = PgStore::connect(&pg_url(), Some(schema)).await.unwrap();
        pairs.push(("postgres", Arc::new(pa), Arc::new(pb), guard));
    }
    for (name, a, b, _guard) in pairs {
        let batch = |jobs: &[Job]| WriteBatch {
            jobs: jobs.to_vec(),
            runs: vec![],
        };
        a.write(&batch(&ours)).await.unwrap();
        let e = b.write(&batch(&theirs)).await.expect_err(name);
        assert!(matches!(e, StoreError::Fenced(_)), "{name}: {e}");
        // Nothing of the refused batch landed; the first server's rows are whole.
        assert_eq!(
            a.list_jobs(&JobFilter::default()).await.unwrap(),
            ours,
            "{name}"
        );
        // The owner still updates its own rows.
        let mut moved = ours.clone();
        moved[0].attempt = 2;
        a.write(&batch(&moved)).await.unwrap();
        assert_eq!(
            a.get_job(moved[0].id).await.unwrap().as_ref(),
            Some(&moved[0])
        );
    }
}

#[tokio::test]
async fn a_postgres_store_that_lost_its_lock_writes_nothing() {
    let Some((a, guard)) = pg_store().await else {
        return;
    };
    let Guard::Schema(schema) = &guard else {
        unreachable!("pg_store returns a schema guard")
    };
    let _lock = a.lock_exclusive().await.unwrap().expect("a free store");
    let (_, ours) = scheduler_with(2, None);
    let batch = |jobs: &[Job]| WriteBatch {
        jobs: jobs.to_vec(),
        runs: vec![],
    };
    a.write(&batch(&ours)).await.unwrap();

    // The lock's session ends under the server (a database restart, a killed connection).
    let raw = sqlx::PgPool::connect(&pg_url()).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l \
         CROSS JOIN (SELECT hashtext('qgjob:' || $1)::bigint AS k) q \
         WHERE l.locktype = 'advisory' AND l.objsubid = 1 \
         AND l.classid::bigint = (q.k >> 32) & 4294967295 AND l.objid::bigint = q.k & 4294967295",
    )
    .bind(schema.as_str())
    .fetch_all(&raw)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    raw.close().await;

    // A second server takes the store and writes its jobs.
    let b = PgStore::connect(&pg_url(), Some(schema)).await.unwrap();
    let mut lock_b = None;
    for _ in 0..100 {
        lock_b = b.lock_exclusive().await.unwrap();
        if lock_b.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(lock_b.is_some(), "the lock was never released");
    let theirs = other_server_jobs(3);
    let e = b
        .write(&batch(&theirs))
        .await
        .expect_err("rows of the first server");
    assert!(matches!(e, StoreError::Fenced(_)), "{e}");
    b.write(&batch(&theirs[2..])).await.unwrap();

    // The first server writes nothing more, not even to its own rows.
    let mut moved = ours.clone();
    moved[0].attempt = 2;
    let e = a.write(&batch(&moved)).await.expect_err("lock lost");
    assert!(e.to_string().contains("lock"), "{e}");
    assert_eq!(
        a.get_job(ours[0].id).await.unwrap().as_ref(),
        Some(&ours[0])
    );
    // Closed while this runtime runs, before the guard drops the schema under them.
    drop(lock_b);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn bundles_are_recorded_per_org() {
    for (name, st, _dir) in stores().await {
        let (acme, globex) = (OrgId::new("acme").unwrap(), OrgId::new("globex").unwrap());
        let sha = "c".repeat(64);
        assert!(!st.has_bundle(&acme, &sha).await.unwrap(), "{name}");
        assert!(st.add_bundle(&acme, &sha).await.unwrap(), "{name}");
        assert!(
            !st.add_bundle(&acme, &sha).await.unwrap(),
            "{name}: second upload"
        );
        assert!(st.has_bundle(&acme, &sha).await.unwrap(), "{name}");
        assert!(!st.has_bundle(&globex, &sha).await.unwrap(), "{name}");
        assert!(st.add_bundle(&globex, &sha).await.unwrap(), "{name}");
    }
}

/// A server and its standby started together on a new database both create the tables:
/// neither may fail on the other's `CREATE TABLE IF NOT EXISTS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn servers_starting_together_on_a_new_database_both_open_it() {
    // The schema exists; its tables do not yet.
    let Some((first, guard)) = pg_store().await else {
        return;
    };
    let Guard::Schema(schema) = &guard else {
        unreachable!("pg_store guards a schema")
    };
    first.close().await;
    for round in 0..5 {
        let fresh = format!("{schema}_{round}");
        let admin = sqlx::PgPool::connect(&pg_url()).await.unwrap();
        sqlx::query(&format!("CREATE SCHEMA {fresh}"))
            .execute(&admin)
            .await
            .unwrap();
        let url = format!("{}?options[search_path]={fresh}", pg_url());
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { PgStore::connect(&url, None).await })
            })
            .collect();
        let mut failures = Vec::new();
        for o in opens {
            match o.await.unwrap() {
                Ok(s) => s.close().await,
                Err(e) => failures.push(e.to_string()),
            }
        }
        sqlx::query(&format!("DROP SCHEMA {fresh} CASCADE"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        assert!(failures.is_empty(), "round {round}: {failures:?}");
    }
}

/// A server (a standby, say) opening a store another one is writing to must not lock its
/// tables: `ALTER TABLE` would wait behind the writer's transaction, and every later write
/// of the serving server behind it. A database at this release's schema gets no DDL.
#[tokio::test]
async fn opening_a_current_store_does_not_wait_on_its_writers() {
    use sqlx::Connection as _;
    let Some((first, guard)) = pg_store().await else {
        return;
    };
    let Guard::Schema(schema) = &guard else {
        unreachable!("pg_store guards a schema")
    };
    let url = format!("{}?options[search_path]={schema}", pg_url());
    // A writer's transaction, as the serving server's job insert holds it.
    let mut writer = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut writer).await.unwrap();
    sqlx::query("LOCK TABLE jobs IN ROW EXCLUSIVE MODE")
        .execute(&mut writer)
        .await
        .unwrap();
    let opened = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        PgStore::connect(&url, None),
    )
    .await
    .expect("opening the store waited on the writer's transaction")
    .unwrap();
    sqlx::query("ROLLBACK").execute(&mut writer).await.unwrap();
    opened.close().await;
    first.close().await;
}

/// A release does not open a database that a newer release wrote: it would run on a
/// schema it does not know.
#[tokio::test]
async fn a_database_of_a_newer_release_is_refused() {
    let Some((first, guard)) = pg_store().await else {
        return;
    };
    let Guard::Schema(schema) = &guard else {
        unreachable!("pg_store guards a schema")
    };
    first.close().await;
    let url = format!("{}?options[search_path]={schema}", pg_url());
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE meta SET v = v + 1 WHERE k = 'schema_version'")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let err = PgStore::connect(&url, None)
        .await
        .expect_err("a newer schema is refused");
    assert!(err.to_string().contains("newer qgjob release"), "{err}");
}

/// A TCP relay to the test database that can go silent: once cut, it passes nothing on in
/// either direction and closes nothing, like a network that vanished (no reset, no answer).
/// Dropping it closes every connection.
struct Relay {
    addr: std::net::SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    /// Relays to `upstream` (`host:port`).
    async fn start(upstream: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let accepting = tokio::spawn({
            let (cut, tasks) = (Arc::clone(&cut), Arc::clone(&tasks));
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut t = tasks.lock().unwrap();
                    t.push(tokio::spawn(Self::pass(cr, sw, Arc::clone(&cut))));
                    t.push(tokio::spawn(Self::pass(sr, cw, Arc::clone(&cut))));
                }
            }
        });
        tasks.lock().unwrap().push(accepting);
        Relay { addr, cut, tasks }
    }

    async fn pass(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        cut: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await.unwrap_or(0);
            let silent = cut.load(std::sync::atomic::Ordering::SeqCst);
            if n == 0 {
                if silent {
                    // Not even the close gets through.
                    std::future::pending::<()>().await;
                }
                return;
            }
            if !silent && to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `url` (a PostgreSQL URL) through this relay.
    fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let user = rest[..end]
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        format!("{scheme}://{user}{}{}", self.addr, &rest[end..])
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// `host:port` of a PostgreSQL URL.
fn host_port(url: &str) -> String {
    let rest = url.split_once("://").expect("a URL").1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else {
        format!("{host}:5432")
    }
}

/// A server cut off from its database while a write waits for its answer (its machine's
/// network gone: no reset, nothing) abandons the write when it stops, and then closes its
/// store. sqlx checks a connection given back with a query of its own, which is never
/// answered either; closing the store must not wait for it (TCP gives up only after many
/// minutes), or the cut-off server never exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_store_cut_off_mid_write_does_not_wait_for_the_database() {
    use sqlx::Connection as _;
    let Some((first, guard)) = pg_store().await else {
        return;
    };
    let Guard::Schema(schema) = &guard else {
        unreachable!("pg_store guards a schema")
    };
    first.close().await;
    let direct = format!("{}?options[search_path]={schema}", pg_url());
    let relay = Relay::start(host_port(&pg_url())).await;
    let store = Arc::new(PgStore::connect(&relay.url(&direct), None).await.unwrap());

    // A write held up in the database by a table lock, so that it is on the wire when the
    // network goes silent; the lock then goes, and its answer is lost.
    let mut blocker = sqlx::PgConnection::connect(&direct).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE jobs IN EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();
    let (_, jobs) = scheduler_with(1, None);
    let writing = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.write(&WriteBatch { jobs, runs: vec![] }).await }
    });
    let mut waiting = false;
    for _ in 0..200 {
        waiting = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = 'jobs'::regclass)",
        )
        .fetch_one(&mut blocker)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(waiting, "the write never reached the table lock");
    relay.cut();
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    blocker.close().await.unwrap();

    // The server stops: its writer is abandoned (the connection goes back to the pool,
    // which checks it), then the store closes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !writing.is_finished(),
        "the write's answer got through the cut"
    );
    writing.abort();
    let _ = writing.await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(30), store.close())
        .await
        .expect("closing the store waited for a database that no longer answers");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // Ends the database's side of the relayed connections before the guard drops the schema.
    drop(relay);
}
