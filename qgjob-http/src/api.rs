//! The user API under `/v1`: jobs, runs, listing, cancel, logs, results, live events
//! (Server-Sent Events), app builds and test bundles; plus the admin token endpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::str::FromStr;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use qgjob_core::{
    validate_labels, AppVersionId, GroupedScheduler, Job, JobEvent, JobFilter, JobId, JobSpec,
    JobState, OrgId, RunId, Scheduler, StateCounts, SubmitError, Target, Time,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::auth::{new_token, Caller};
use crate::blobs::Stored;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::{wall_ms, AppState};
use crate::store::{BuildRecord, RunRecord, TokenKind, TokenRecord};

/// Most jobs a listing returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// Parses a job id from a path; an unparsable id names no job (404, like an unknown one).
pub(crate) fn parse_job_id(s: &str) -> Result<JobId, ApiError> {
    JobId::from_str(s).map_err(|_| ApiError::not_found(format!("job {} not found", shown(s))))
}

fn parse_run_id(s: &str) -> Result<RunId, ApiError> {
    RunId::from_str(s).map_err(|_| ApiError::not_found(format!("run {} not found", shown(s))))
}

/// A caller's string as an error message repeats it: at most 80 characters.
pub(crate) fn shown(s: &str) -> String {
    match s.char_indices().nth(80) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The job, if it exists and the caller may see it; 404 otherwise (no existence leak).
async fn visible_job(app: &AppState, caller: &Caller, id: &str) -> Result<Job, ApiError> {
    caller.user_scope()?;
    let id = parse_job_id(id)?;
    match app.job(id).await? {
        Some(j) if caller.sees(&j.spec.org_id) => Ok(j),
        _ => Err(ApiError::not_found(format!("job {id} not found"))),
    }
}

async fn visible_run(app: &AppState, caller: &Caller, id: &str) -> Result<RunRecord, ApiError> {
    caller.user_scope()?;
    let id = parse_run_id(id)?;
    match app.store.get_run(id).await? {
        Some(r) if caller.sees(&r.org_id) => Ok(r),
        _ => Err(ApiError::not_found(format!("run {id} not found"))),
    }
}

/// `POST /v1/jobs`.
pub async fn submit_job(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(spec): ApiJson<JobSpec>,
) -> Result<Response, ApiError> {
    caller.require_org(&spec.org_id)?;
    if spec.run_id.is_some() {
        return Err(ApiError::invalid(
            "run_id",
            "jobs join a run only through POST /v1/runs",
        ));
    }
    spec.validate()
        .map_err(|e| ApiError::invalid(e.field, e.to_string()))?;
    check_bundle(&app, &caller, &spec, "bundle").await?;
    if let Some(old) = forgotten_match(&app, &spec, "idempotency_key").await? {
        return Ok((
            StatusCode::OK,
            Json(json!({"job_id": old.id, "status": old.state, "created": false})),
        )
            .into_response());
    }
    let targets = BTreeSet::from([spec.target.clone()]);
    let (sub, warning) = app
        .mutate(Vec::new(), true, |s, now, _| {
            let sub = s.submit(now, spec).map_err(ApiError::from)?;
            Ok((sub, unserved_warning(s, &targets)))
        })
        .await?;
    if sub.created {
        app.metrics
            .submitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::debug!(job_id = %sub.job_id, created = sub.created, "job submitted");
    let status = if sub.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut answer = json!({"job_id": sub.job_id, "status": sub.state, "created": sub.created});
    if let Some(w) = warning {
        answer["warning"] = json!(w);
    }
    Ok((status, Json(answer)).into_response())
}

/// A job's bundle must have been uploaded: otherwise every agent would fail the job, and
/// only after it had waited for a device.
/// A job's bundle must be one its org uploaded: bundles are stored once for everyone, and
/// an org must neither run another org's tests by their hash nor learn which hashes exist.
/// An admin (or an open server) may name any stored bundle.
async fn check_bundle(
    app: &AppState,
    caller: &Caller,
    spec: &JobSpec,
    field: &str,
) -> Result<(), ApiError> {
    let Some(b) = &spec.bundle else {
        return Ok(());
    };
    let uploaded = match caller {
        Caller::Org(org) => app.store.has_bundle(org, b).await?,
        // A storage failure is the server's (5xx), never "not uploaded" (422).
        _ => app.blobs.exists(b).await?,
    };
    if uploaded {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "no bundle {b} was uploaded for org {} (PUT /v1/bundles first)",
                spec.org_id
            ),
        ))
    }
}

/// A warning for the targets no registered device serves (a typo such as `emualtor`, or
/// no agent started for that pool yet): the jobs are queued and wait for one. Called under
/// the lock the submit already holds, once per distinct target.
fn unserved_warning(s: &GroupedScheduler, targets: &BTreeSet<Target>) -> Option<String> {
    let missing: Vec<&str> = targets
        .iter()
        .filter(|t| !s.serves_target(t))
        .map(Target::as_str)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "no agent serves target {} now; the jobs wait until one registers",
            missing.join(", ")
        )
    })
}

/// The scheduler deduplicates idempotency keys among the jobs it holds; a job it forgot
/// (finished before the retention window) is looked up in the store. Returns that job when
/// `spec` repeats it, 409 when the key was used for a different spec, `None` otherwise.
async fn forgotten_match(
    app: &AppState,
    spec: &JobSpec,
    field: &str,
) -> Result<Option<Job>, ApiError> {
    let Some(key) = &spec.idempotency_key else {
        return Ok(None);
    };
    let Some(old) = app.store.find_idempotent(&spec.org_id, key).await? else {
        return Ok(None);
    };
    if app.lock().get(old.id).is_some() {
        // Still in memory: the scheduler decides, as for any other repeat.
        return Ok(None);
    }
    let (mut a, mut b) = (old.spec.clone(), spec.clone());
    a.run_id = None;
    b.run_id = None;
    if a == b {
        Ok(Some(old))
    } else {
        Err(ApiError::conflict(
            "conflict",
            format!(
                "{field}: idempotency key {key:?} was already used for job {} with a different spec",
                old.id
            ),
        ))
    }
}

/// Body of `POST /v1/runs`.
#[derive(Debug, Deserialize)]
pub struct RunSubmit {
    /// The jobs (all of one org).
    pub jobs: Vec<JobSpec>,
    /// Labels of the run.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn batch_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Invalid { index, source } => ApiError::invalid(
            format!("jobs[{index}].{}", source.field),
            source.to_string(),
        ),
        other => other.into(),
    }
}

/// What a run submission turned out to be.
enum RunSubmitted {
    /// A new run of these jobs.
    New {
        ids: Vec<JobId>,
        created: u64,
        warning: Option<String>,
    },
    /// A repeat of run `run`, whose jobs these keys name (a retried CI step).
    Repeat { run: RunId, ids: Vec<JobId> },
}

/// `POST /v1/runs`.
///
/// Idempotency: a run whose jobs all carry keys of jobs already submitted, all of one
/// earlier run and all of that run's jobs, is that run again (200, its id, nothing
/// recorded). Any other mix of known and new keys is refused with 409: a job belongs to
/// one run, so a new run cannot take in an earlier run's jobs, and leaving them out would
/// give a run that waits on nothing.
pub async fn submit_run(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<RunSubmit>,
) -> Result<Response, ApiError> {
    let Some(first) = body.jobs.first() else {
        return Err(ApiError::invalid("jobs", "a run needs at least one job"));
    };
    let org = first.org_id.clone();
    caller.require_org(&org)?;
    let mut keys: HashMap<&str, usize> = HashMap::new();
    let mut bundles = BTreeSet::new();
    for (i, j) in body.jobs.iter().enumerate() {
        // A bad spec is named before anything else is said about the run.
        j.validate().map_err(|source| {
            ApiError::invalid(format!("jobs[{i}].{}", source.field), source.to_string())
        })?;
        if j.org_id != org {
            return Err(ApiError::invalid(
                format!("jobs[{i}].org_id"),
                "every job of a run must belong to the same org",
            ));
        }
        if let Some(k) = j.idempotency_key.as_deref() {
            if let Some(before) = keys.insert(k, i) {
                return Err(ApiError::invalid(
                    format!("jobs[{i}].idempotency_key"),
                    format!("repeats the key of jobs[{before}]: each job of a run needs its own"),
                ));
            }
        }
        if bundles.insert(&j.bundle) {
            check_bundle(&app, &caller, j, &format!("jobs[{i}].bundle")).await?;
        }
    }
    validate_labels(&body.labels).map_err(|e| ApiError::invalid("labels", e.to_string()))?;
    let now = wall_ms();
    let mut rnd = [0u8; 10];
    getrandom::fill(&mut rnd).map_err(ApiError::internal)?;
    let run_id = RunId::from_parts(now, rnd);
    let total = body.jobs.len();
    // Jobs repeating a forgotten (finished and cleared) job's key: that job, from the store.
    let mut forgotten: Vec<Option<Job>> = Vec::with_capacity(total);
    for (i, s) in body.jobs.iter().enumerate() {
        forgotten.push(forgotten_match(&app, s, &format!("jobs[{i}].idempotency_key")).await?);
    }
    let record = RunRecord {
        id: run_id,
        org_id: org.clone(),
        created_at: Time(now),
        labels: body.labels,
        job_count: total as u64,
    };
    let targets: BTreeSet<Target> = body.jobs.iter().map(|j| j.target.clone()).collect();
    let specs = body.jobs;
    let outcome = app
        .mutate_runs(true, |s, now, _| {
            // For each job: the earlier job its key names, and that job's run.
            let prior: Vec<Option<(JobId, Option<RunId>)>> = specs
                .iter()
                .zip(&forgotten)
                .map(|(sp, old)| match old {
                    Some(old) => Some((old.id, old.spec.run_id)),
                    None => {
                        let id = s.job_by_idempotency_key(&org, sp.idempotency_key.as_deref()?)?;
                        Some((id, s.get(id).and_then(|j| j.spec.run_id)))
                    }
                })
                .collect();
            if prior.iter().all(Option::is_none) {
                let specs = specs
                    .into_iter()
                    .map(|mut sp| {
                        sp.run_id = Some(run_id);
                        sp
                    })
                    .collect();
                let subs = s.submit_many(now, specs).map_err(batch_error)?;
                let created = subs.iter().filter(|x| x.created).count() as u64;
                let ids = subs.iter().map(|x| x.job_id).collect();
                let warning = unserved_warning(s, &targets);
                return Ok((
                    RunSubmitted::New {
                        ids,
                        created,
                        warning,
                    },
                    vec![record],
                ));
            }
            let run = prior.iter().flatten().find_map(|(_, r)| *r);
            let alone = prior.iter().position(|p| matches!(p, Some((_, None))));
            let other_run = prior
                .iter()
                .position(|p| matches!(p, Some((_, Some(r))) if Some(*r) != run));
            let new = prior.iter().position(Option::is_none);
            if let (Some(run), None, None, None) = (run, alone, other_run, new) {
                // The same keys again: the scheduler checks that the specs match too.
                let in_memory: Vec<JobSpec> = specs
                    .into_iter()
                    .zip(&forgotten)
                    .filter(|(_, old)| old.is_none())
                    .map(|(mut sp, _)| {
                        sp.run_id = Some(run);
                        sp
                    })
                    .collect();
                s.submit_many(now, in_memory).map_err(batch_error)?;
                let ids = prior.iter().flatten().map(|(id, _)| *id).collect();
                return Ok((RunSubmitted::Repeat { run, ids }, Vec::new()));
            }
            // A mix: name the first job that does not fit the others.
            let i = alone.or(other_run).or(new).unwrap_or(0);
            let what = match prior[i] {
                Some((id, Some(r))) => format!("jobs[{i}]'s key names job {id} of run {r}"),
                Some((id, None)) => format!("jobs[{i}]'s key names job {id}, submitted on its own"),
                None => format!("jobs[{i}] is new"),
            };
            let why = match run {
                Some(r) if prior[i].is_none_or(|(_, own)| own != Some(r)) => {
                    format!("{what}, while other keys name jobs of run {r}")
                }
                _ => what,
            };
            Err(ApiError::invalid_conflict(
                format!("jobs[{i}].idempotency_key"),
                format!("{why}: submit a run again whole, with the same keys, or with new keys"),
            ))
        })
        .await?;
    match outcome {
        RunSubmitted::New {
            ids,
            created,
            warning,
        } => {
            app.metrics
                .submitted
                .fetch_add(created, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(run_id = %run_id, jobs = ids.len(), created, "run submitted");
            let mut answer =
                json!({"run_id": run_id, "job_ids": ids, "status": "queued", "created": true});
            if let Some(w) = warning {
                answer["warning"] = json!(w);
            }
            Ok((StatusCode::CREATED, Json(answer)).into_response())
        }
        RunSubmitted::Repeat { run, ids } => {
            let jobs = run_jobs(&app, run).await?;
            if jobs.len() != ids.len() {
                return Err(ApiError::conflict(
                    "conflict",
                    format!(
                        "these keys name {} of the {} jobs of run {run}: resubmit a run whole \
                         with the same keys, or use new keys",
                        ids.len(),
                        jobs.len()
                    ),
                ));
            }
            tracing::info!(run_id = %run, jobs = ids.len(), "run submitted again");
            let status = run_status(&state_counts(&jobs));
            let answer = json!({"run_id": run, "job_ids": ids, "status": status,
                                "created": false});
            Ok((StatusCode::OK, Json(answer)).into_response())
        }
    }
}

/// A job as users see it: without `seq`, the server-wide submission counter, whose gaps
/// would tell one org how many jobs the others submitted.
fn user_job(job: &Job) -> Value {
    let mut v = serde_json::to_value(job).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("seq");
    }
    v
}

fn user_jobs(jobs: &[Job]) -> Vec<Value> {
    jobs.iter().map(user_job).collect()
}

/// `GET /v1/jobs/{job_id}`.
pub async fn get_job(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(user_job(&visible_job(&app, &caller, &id).await?)))
}

/// A run's aggregate status from its jobs' states.
pub fn run_status(counts: &StateCounts) -> &'static str {
    if counts.queued + counts.running > 0 {
        return if counts.running > 0 || counts.total() > counts.queued {
            "running"
        } else {
            "queued"
        };
    }
    if counts.total() == 0 {
        "queued"
    } else if counts.failed > 0 {
        "failed"
    } else if counts.error > 0 {
        "error"
    } else if counts.passed == counts.total() {
        "passed"
    } else {
        "canceled"
    }
}

/// How many of `jobs` are in each state.
fn state_counts(jobs: &[Job]) -> StateCounts {
    let mut counts = StateCounts::default();
    for j in jobs {
        counts.add(j.state);
    }
    counts
}

async fn run_jobs(app: &AppState, id: RunId) -> Result<Vec<Job>, ApiError> {
    let mut jobs = app.store.run_jobs(id).await?;
    app.overlay(&mut jobs);
    Ok(jobs)
}

/// `GET /v1/runs/{run_id}`.
pub async fn get_run(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let run = visible_run(&app, &caller, &id).await?;
    let jobs = run_jobs(&app, run.id).await?;
    let counts = state_counts(&jobs);
    Ok(Json(json!({
        "run_id": run.id,
        "org_id": run.org_id,
        "status": run_status(&counts),
        "counts": counts,
        "created_at": run.created_at,
        "labels": run.labels,
        "jobs": user_jobs(&jobs),
    })))
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    org_id: Option<String>,
    state: Option<String>,
    app_version_id: Option<String>,
    target: Option<String>,
    run_id: Option<String>,
    cursor: Option<String>,
    limit: Option<String>,
}

fn opt_parse<T: FromStr>(v: &Option<String>, field: &str) -> Result<Option<T>, ApiError>
where
    T::Err: std::fmt::Display,
{
    match v.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|e: T::Err| {
            // Some parse errors already say "invalid <field>…"; don't say it twice.
            let m = e.to_string();
            let m = if m.starts_with(&format!("invalid {field}")) {
                m
            } else {
                format!("invalid {field}: {m}")
            };
            ApiError::invalid(field, m)
        }),
    }
}

/// `GET /v1/jobs`.
pub async fn list_jobs(
    State(app): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let scope = caller.user_scope()?.cloned();
    let org: Option<OrgId> = opt_parse(&q.org_id, "org_id")?;
    let org = match (scope, org) {
        (Some(mine), Some(asked)) if mine != asked => {
            return Err(ApiError::forbidden(format!(
                "this token may not list org {asked}"
            )))
        }
        (Some(mine), _) => Some(mine),
        (None, asked) => asked,
    };
    let limit: usize = opt_parse(&q.limit, "limit")?.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::invalid(
            "limit",
            "limit must be between 1 and 1000",
        ));
    }
    let filter = JobFilter {
        org_id: org,
        state: opt_parse::<JobState>(&q.state, "state")?,
        app_version_id: opt_parse::<AppVersionId>(&q.app_version_id, "app_version_id")?,
        target: opt_parse::<Target>(&q.target, "target")?,
        run_id: opt_parse::<RunId>(&q.run_id, "run_id")?,
        after_seq: after_cursor(&app, &caller, q.cursor.as_deref()).await?,
        // One more than asked: whether it exists says whether there is a next page, so
        // the last page never points at an empty one.
        limit: Some(limit + 1),
    };
    let mut jobs = app.store.list_jobs(&filter).await?;
    let more = jobs.len() > limit;
    jobs.truncate(limit);
    // The cursor is the last job's id, not its `seq` (see `user_job`).
    let next = more
        .then(|| jobs.last().map(|j| j.id.to_string()))
        .flatten();
    Ok(Json(json!({"jobs": user_jobs(&jobs), "next_cursor": next})))
}

/// Where a page starts: after the job a cursor names, which the caller must be able to see.
async fn after_cursor(
    app: &AppState,
    caller: &Caller,
    cursor: Option<&str>,
) -> Result<Option<u64>, ApiError> {
    let Some(cursor) = cursor else {
        return Ok(None);
    };
    let bad = || {
        ApiError::invalid(
            "cursor",
            "invalid cursor: pass the next_cursor of the previous page",
        )
    };
    let id: JobId = cursor.parse().map_err(|_| bad())?;
    match app.job(id).await? {
        Some(j) if caller.sees(&j.spec.org_id) => Ok(Some(j.seq)),
        _ => Err(bad()),
    }
}

/// `POST /v1/jobs/{job_id}/cancel`.
pub async fn cancel_job(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let job = visible_job(&app, &caller, &id).await?;
    if job.state.is_final() {
        return Err(ApiError::conflict(
            "already_final",
            format!("job {} is already {}", job.id, job.state),
        ));
    }
    let id = job.id;
    let outcome = app
        .mutate(Vec::new(), true, |s, now, touched| {
            let o = s.cancel(now, id)?;
            touched.push(id);
            Ok(o)
        })
        .await?;
    tracing::info!(job_id = %id, result = ?outcome, "job cancel");
    Ok(Json(json!({"job_id": id, "result": outcome})))
}

/// `POST /v1/runs/{run_id}/cancel`.
pub async fn cancel_run(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let run = visible_run(&app, &caller, &id).await?;
    let ids: Vec<JobId> = run_jobs(&app, run.id)
        .await?
        .into_iter()
        .filter(|j| !j.state.is_final())
        .map(|j| j.id)
        .collect();
    let (canceled, requested) = app
        .mutate(Vec::new(), true, |s, now, touched| {
            let (mut c, mut r) = (0u64, 0u64);
            for id in ids {
                match s.cancel(now, id) {
                    Ok(qgjob_core::CancelOutcome::Canceled) => c += 1,
                    Ok(qgjob_core::CancelOutcome::Requested) => {
                        r += 1;
                        touched.push(id);
                    }
                    // Finished meanwhile: nothing to cancel.
                    Err(_) => {}
                }
            }
            Ok((c, r))
        })
        .await?;
    tracing::info!(run_id = %run.id, canceled, requested, "run cancel");
    Ok(Json(
        json!({"run_id": run.id, "canceled": canceled, "requested": requested}),
    ))
}

/// Query of `GET /v1/jobs/{job_id}/logs`.
#[derive(Debug, Default, Deserialize)]
pub struct LogQuery {
    // A string, parsed below, so that a bad value is a 422 naming the field like `limit`.
    offset: Option<String>,
}

/// Most log bytes one answer carries; a reader asks again from where it got to (the
/// header `x-qgjob-log-size` says how far the log goes), so a slow reader holds at most this.
pub const MAX_LOG_ANSWER: usize = 1024 * 1024;

/// `GET /v1/jobs/{job_id}/logs`. An agent may write any bytes to a log; the answer says
/// `text/plain; charset=utf-8` only for a piece that is UTF-8 (a character split by the
/// piece's bounds does not count against it) and `application/octet-stream` otherwise, so a
/// client decoding by the header is never told a charset the bytes do not have. The bytes
/// themselves are served as they are.
pub async fn job_logs(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let job = visible_job(&app, &caller, &id).await?;
    let offset: u64 = opt_parse(&q.offset, "offset")?.unwrap_or(0);
    let (bytes, size) = app.store.read_log(job.id, offset, MAX_LOG_ANSWER).await?;
    let content_type = if is_utf8_piece(&bytes, offset > 0) {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    let mut resp = Response::new(Body::from(bytes));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert("x-qgjob-log-size", HeaderValue::from(size));
    Ok(resp)
}

/// Whether `piece`, cut from a log at any byte offset, is UTF-8 text: valid UTF-8 once the
/// end of a character split by the cut at its start (when it starts past the log's first
/// byte) and the beginning of one split at its end are set aside. Every piece of a UTF-8 log
/// is then text, however a reader cuts it, and a log still being written may end mid-character.
/// Judged on the piece alone, so a few stray continuation bytes at its start pass for the end
/// of a split character.
fn is_utf8_piece(piece: &[u8], starts_past_0: bool) -> bool {
    let body = if starts_past_0 {
        // A character is at most 4 bytes: at most 3 continuation bytes (0b10xx_xxxx) end it.
        let split = piece
            .iter()
            .take(3)
            .take_while(|b| **b & 0xC0 == 0x80)
            .count();
        piece.get(split..).unwrap_or_default()
    } else {
        piece
    };
    match std::str::from_utf8(body) {
        Ok(_) => true,
        // No `error_len` means a character cut short by the end of the piece, not a bad byte.
        Err(e) => e.error_len().is_none(),
    }
}

/// `GET /v1/jobs/{job_id}/results`.
pub async fn job_results(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let job = visible_job(&app, &caller, &id).await?;
    let (tests, counts, flaky, error) = match &job.outcome {
        Some(o) => (json!(o.tests), json!(o.counts), o.flaky, json!(o.error)),
        None => (json!([]), Value::Null, false, Value::Null),
    };
    Ok(Json(json!({
        "job_id": job.id,
        "state": job.state,
        "tests": tests,
        "counts": counts,
        "flaky": flaky,
        "error": error,
    })))
}

fn event_of(job: &Job) -> JobEvent {
    JobEvent {
        job_id: job.id,
        run_id: job.spec.run_id,
        org_id: job.spec.org_id.clone(),
        state: job.state,
        attempt: job.attempt,
        at: job
            .finished_at
            .or(job.started_at)
            .unwrap_or(job.released_at),
    }
}

fn sse_event(e: &JobEvent) -> Event {
    Event::default()
        .event("job")
        .json_data(e)
        .unwrap_or_else(|_| Event::default().event("job").data("{}"))
}

/// Ends a stream when the server begins shutting down, so graceful shutdown never waits
/// on a watcher.
fn until_shutdown<S>(app: &AppState, s: S) -> impl Stream<Item = Result<Event, Infallible>>
where
    S: Stream<Item = Result<Event, Infallible>>,
{
    let mut sd = app.shutdown.clone();
    s.take_until(async move {
        let _ = sd.wait_for(|v| *v).await;
    })
}

/// `GET /v1/jobs/{job_id}/events`.
pub async fn job_events(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    // Subscribe before reading the state, so no change falls between the two.
    let rx = app.events.subscribe();
    let job = visible_job(&app, &caller, &id).await?;
    let first = event_of(&job);
    struct St {
        app: AppState,
        rx: broadcast::Receiver<JobEvent>,
        id: JobId,
        last: (JobState, u32),
        done: bool,
    }
    let done = first.state.is_final();
    let st = St {
        app: app.clone(),
        rx,
        id: job.id,
        last: (first.state, first.attempt),
        done,
    };
    let rest = stream::unfold(st, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let e = match st.rx.recv().await {
                Ok(e) if e.job_id == st.id => e,
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Missed some: re-read the job and report where it is now.
                    match st.app.job(st.id).await {
                        Ok(Some(j)) => event_of(&j),
                        _ => return None,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            if (e.state, e.attempt) == st.last {
                continue;
            }
            st.last = (e.state, e.attempt);
            st.done = e.state.is_final();
            return Some((Ok::<_, Infallible>(sse_event(&e)), st));
        }
    });
    let s = stream::once(async move { Ok::<_, Infallible>(sse_event(&first)) }).chain(rest);
    Ok(Sse::new(until_shutdown(&app, s))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// `GET /v1/runs/{run_id}/events`.
pub async fn run_events(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let rx = app.events.subscribe();
    let run = visible_run(&app, &caller, &id).await?;
    let jobs = run_jobs(&app, run.id).await?;
    let firsts: Vec<JobEvent> = jobs.iter().map(event_of).collect();
    let states: HashMap<JobId, (JobState, u32)> = firsts
        .iter()
        .map(|e| (e.job_id, (e.state, e.attempt)))
        .collect();
    struct St {
        app: AppState,
        rx: broadcast::Receiver<JobEvent>,
        run: RunId,
        states: HashMap<JobId, (JobState, u32)>,
    }
    fn all_final(states: &HashMap<JobId, (JobState, u32)>) -> bool {
        states.values().all(|(s, _)| s.is_final())
    }
    let st = St {
        app: app.clone(),
        rx,
        run: run.id,
        states,
    };
    let rest = stream::unfold(st, |mut st| async move {
        loop {
            if all_final(&st.states) {
                return None;
            }
            let evs: Vec<JobEvent> = match st.rx.recv().await {
                Ok(e) if e.run_id == Some(st.run) => vec![e],
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match run_jobs(&st.app, st.run).await {
                        Ok(jobs) => jobs.iter().map(event_of).collect(),
                        Err(_) => return None,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            let mut out = Vec::new();
            for e in evs {
                let prev = st.states.get(&e.job_id).copied();
                if prev == Some((e.state, e.attempt)) || prev.is_none() {
                    continue;
                }
                st.states.insert(e.job_id, (e.state, e.attempt));
                out.push(Ok::<_, Infallible>(sse_event(&e)));
            }
            if !out.is_empty() {
                return Some((stream::iter(out), st));
            }
        }
    })
    .flatten();
    let s = stream::iter(firsts.iter().map(|e| Ok(sse_event(e))).collect::<Vec<_>>()).chain(rest);
    Ok(Sse::new(until_shutdown(&app, s))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn expected_sha(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-qgjob-sha256")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn parse_build_path(org: &str, app: &str) -> Result<(OrgId, AppVersionId), ApiError> {
    let org = OrgId::new(org).map_err(|e| ApiError::invalid("org_id", e.to_string()))?;
    let app =
        AppVersionId::new(app).map_err(|e| ApiError::invalid("app_version_id", e.to_string()))?;
    Ok((org, app))
}

/// `PUT /v1/apps/{org_id}/{app_version_id}`: uploads an app build.
pub async fn put_app(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((org, ver)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Stored>, ApiError> {
    let (org, ver) = parse_build_path(&org, &ver)?;
    caller.require_org(&org)?;
    let expect = expected_sha(&headers);
    let mut stored = app
        .blobs
        .put(body, app.limits.artifact_bytes, expect.as_deref(), |head| {
            if head.is_empty() {
                Err(ApiError::invalid("body", "an app build cannot be empty"))
            } else {
                Ok(())
            }
        })
        .await?;
    // For an org, `created` says whether this version already had these bytes, never
    // whether another org uploaded them.
    if caller.user_scope()?.is_some() {
        let before = app.store.get_build(&org, &ver).await?;
        stored.created = before.is_none_or(|b| b.sha256 != stored.sha256);
    }
    app.store
        .put_build(
            &org,
            &ver,
            &BuildRecord {
                sha256: stored.sha256.clone(),
                size: stored.size,
            },
        )
        .await?;
    tracing::info!(org = %org, app_version_id = %ver, sha256 = %stored.sha256, size = stored.size, "build uploaded");
    Ok(Json(stored))
}

/// `GET /v1/apps/{org_id}/{app_version_id}`: the build registered for a version.
pub async fn get_app(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((org, ver)): ApiPath<(String, String)>,
) -> Result<Json<BuildRecord>, ApiError> {
    let (org, ver) = parse_build_path(&org, &ver)?;
    if caller.user_scope()?.is_some_and(|o| *o != org) {
        return Err(ApiError::not_found("no build for that version"));
    }
    app.store
        .get_build(&org, &ver)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no build for that version"))
}

/// `GET /v1/apps/{org_id}/{app_version_id}/build`: downloads the build's bytes.
pub async fn download_app(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((org, ver)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let Json(rec) = get_app(State(app.clone()), caller, ApiPath((org, ver))).await?;
    blob_response(&app, &rec.sha256).await
}

/// Streams a stored artifact.
pub async fn blob_response(app: &AppState, sha256: &str) -> Result<Response, ApiError> {
    let (body, size) = app
        .blobs
        .get(sha256)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no artifact {sha256}")))?;
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(sha256) {
        h.insert("x-qgjob-sha256", v);
    }
    Ok(resp)
}

/// `PUT /v1/bundles`: uploads a test bundle (`.tar.gz`).
pub async fn put_bundle(
    State(app): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Stored>, ApiError> {
    let org = caller.user_scope()?.cloned();
    let expect = expected_sha(&headers);
    let mut stored = app
        .blobs
        .put(body, app.limits.artifact_bytes, expect.as_deref(), |head| {
            // Only the gzip magic is checked: the server unpacks nothing.
            if head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b {
                Ok(())
            } else {
                Err(ApiError::invalid(
                    "body",
                    "a test bundle must be a gzip-compressed tar archive",
                ))
            }
        })
        .await?;
    // The org's own record: `created` says whether this org had uploaded it, not whether
    // another org had.
    if let Some(org) = org {
        stored.created = app.store.add_bundle(&org, &stored.sha256).await?;
    }
    Ok(Json(stored))
}

/// Body of `POST /v1/admin/tokens/revoke`.
#[derive(Debug, Deserialize)]
pub struct RevokeToken {
    token: String,
}

/// `POST /v1/admin/tokens/revoke`: deletes a token created through the API (admin only);
/// it stops working at once. A token from the server's configuration (tokens file, flags)
/// is refused with 409: it would come back at the next start.
pub async fn revoke_token(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<RevokeToken>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin()?;
    let hash = crate::auth::hash_token(&req.token);
    if !app.auth.knows(&hash) {
        return Err(ApiError::not_found("no such token"));
    }
    if !app.store.remove_token(&hash).await? {
        return Err(ApiError::conflict(
            "conflict",
            "this token comes from the server's configuration (tokens file or flags): \
             remove it there and restart the server",
        ));
    }
    app.auth.remove(&hash);
    tracing::info!("token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /v1/admin/tokens`.
#[derive(Debug, Deserialize)]
pub struct NewToken {
    kind: TokenKind,
    #[serde(default)]
    org_id: Option<OrgId>,
}

/// `POST /v1/admin/tokens`: creates a token (admin only). The token is shown once.
pub async fn create_token(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    caller.require_admin()?;
    if app.auth.is_open() {
        // The first stored token would close this server to every client at its next
        // start, with no admin token to get back in.
        return Err(ApiError::conflict(
            "conflict",
            "this server runs without tokens; start it with --tokens-file (an admin token \
             there) to create tokens through the API",
        ));
    }
    match (req.kind, &req.org_id) {
        (TokenKind::Org, None) => {
            return Err(ApiError::invalid("org_id", "an org token needs org_id"));
        }
        (TokenKind::Admin | TokenKind::Agent, Some(_)) => {
            return Err(ApiError::invalid(
                "org_id",
                "only org tokens belong to an org; admin and agent tokens serve every org",
            ));
        }
        _ => {}
    }
    let token = new_token()?;
    let spec = crate::auth::TokenSpec {
        token: token.clone(),
        kind: req.kind,
        org_id: req.org_id.clone(),
    };
    let rec: TokenRecord = spec.record().map_err(ApiError::internal)?;
    app.store.add_token(&rec).await?;
    app.auth.add(rec);
    tracing::info!(kind = ?req.kind, org_id = ?req.org_id, "token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": token, "kind": req.kind, "org_id": req.org_id})),
    ))
}

#[cfg(test)]
mod tests {
    use super::is_utf8_piece;

    #[test]
    fn a_piece_is_text_when_utf8_but_for_characters_split_at_its_bounds() {
        let emoji = "😀".as_bytes(); // 4 bytes
        for cut in 0..=emoji.len() {
            assert!(is_utf8_piece(&emoji[..cut], false), "head {cut}");
            assert!(is_utf8_piece(&emoji[cut..], cut > 0), "tail {cut}");
        }
        assert!(is_utf8_piece(b"", false));
        // Continuation bytes at the very start of a log split nothing.
        assert!(!is_utf8_piece(&emoji[1..], false));
        // Four continuation bytes end no character.
        assert!(!is_utf8_piece(b"\x80\x80\x80\x80", true));
        // A bad byte, or a sequence cut short before the end, is not UTF-8.
        assert!(!is_utf8_piece(b"caf\xe9 au lait", false));
        assert!(!is_utf8_piece(b"\xc3x", true));
        assert!(!is_utf8_piece(b"\xff", true));
    }
}
