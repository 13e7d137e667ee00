//! The agent protocol under `/v1/agent`: device registration, long-poll leasing, heartbeats,
//! complete/fail reports fenced by lease id, log upload, and artifact download.
//!
//! Long poll: an agent's lease request waits on a `Notify` that every change making work
//! available wakes, so an idle agent gets a new job as soon as it is queued — there is no
//! fixed polling interval.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use qgjob_core::agent::touch_interval;
use qgjob_core::{
    DeviceId, DeviceInfo, HeartbeatAck, InfraFailure, JobId, LeaseId, RunReport, Scheduler,
    TestStatus,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{blob_response, parse_job_id};
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::state::AppState;
use crate::store::BuildRecord;

/// Longest a lease request may wait for work.
pub const MAX_WAIT_MS: u64 = 60_000;

/// `POST /v1/agent/devices`.
pub async fn register_device(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(info): ApiJson<DeviceInfo>,
) -> Result<Json<Value>, ApiError> {
    caller.require_agent()?;
    let id = info.id.clone();
    app.mutate(Vec::new(), false, |s, now, _| {
        s.register_device(now, info).map_err(ApiError::from)
    })
    .await?;
    tracing::info!(device = %id, "device registered");
    Ok(Json(json!({"device_id": id})))
}

fn parse_device(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::new(s).map_err(|e| ApiError::invalid("device_id", e.to_string()))
}

/// Query of `DELETE /v1/agent/devices/{device_id}`.
#[derive(Debug, Deserialize)]
pub struct UnregisterQuery {
    /// The unregistering agent's session: refused (409 `device_taken`) when another session
    /// registered the device since.
    pub session: Option<String>,
}

/// `DELETE /v1/agent/devices/{device_id}`.
pub async fn unregister_device(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    query: Result<Query<UnregisterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_agent()?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = parse_device(&id)?;
    app.mutate(Vec::new(), true, |s, now, _| {
        s.touch_device(now, &id, q.session.as_deref())?;
        s.unregister_device(now, &id).map_err(ApiError::from)
    })
    .await?;
    app.timer.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

fn default_batch() -> usize {
    1
}
fn default_wait() -> u64 {
    30_000
}

/// Body of `POST /v1/agent/lease`.
#[derive(Debug, Deserialize)]
pub struct LeaseRequest {
    /// The device asking.
    pub device_id: DeviceId,
    /// The asking agent's session (as it registered the device): refused (409
    /// `device_taken`) when another session registered the device since.
    #[serde(default)]
    pub session: Option<String>,
    /// Most jobs wanted in one lease.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// How long to wait for work (ms, at most 60000).
    #[serde(default = "default_wait")]
    pub wait_ms: u64,
}

/// `POST /v1/agent/lease`: answers with a lease as soon as there is work, or 204 when
/// `wait_ms` passes (or the server shuts down) without any.
pub async fn lease(
    State(app): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<LeaseRequest>,
) -> Result<Response, ApiError> {
    caller.require_agent()?;
    if req.max_batch == 0 {
        return Err(ApiError::invalid("max_batch", "must be at least 1"));
    }
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(req.wait_ms.min(MAX_WAIT_MS));
    let mut shutdown = app.shutdown.clone();
    // The device's pool, whose changes wake this poll (an unknown device is refused by the
    // first lease below).
    let pool = app
        .lock()
        .device_target(&req.device_id)
        .map(|t| app.target_work(t));
    loop {
        // Register interest before looking, so a submit between the look and the wait
        // still wakes us.
        let notified = app.work.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let pool_notified = pool.as_ref().map(|n| n.notified());
        let mut pool_notified = pool_notified.map(Box::pin);
        if let Some(n) = pool_notified.as_mut() {
            n.as_mut().enable();
        }
        let metrics = app.metrics.clone();
        let mut ttl = 0;
        let got = app
            .mutate(Vec::new(), false, |s, now, _| {
                s.touch_device(now, &req.device_id, req.session.as_deref())?;
                ttl = s.lease_ttl_ms();
                let lease = s.lease(now, &req.device_id, req.max_batch)?;
                if let Some(l) = &lease {
                    for j in &l.jobs {
                        if let Some(job) = s.get(j.id) {
                            metrics.observe_dispatch(now.since(job.released_at));
                        }
                    }
                }
                Ok(lease)
            })
            .await?;
        if let Some(l) = got {
            app.remember_lease(&l);
            app.metrics.leases.fetch_add(1, Ordering::Relaxed);
            if l.install {
                app.metrics.installs.fetch_add(1, Ordering::Relaxed);
            }
            // The new lease's deadline may come before the timer's next wake-up.
            app.timer.notify_one();
            return Ok(Json(l).into_response());
        }
        if *shutdown.borrow() || tokio::time::Instant::now() >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        // Ask again well within a lease TTL even when nothing changes: that keeps a waiting
        // agent's device in touch, so no other agent session can take it over.
        let touch = tokio::time::Instant::now() + touch_interval(ttl);
        let pool_woke = async {
            match pool_notified.as_mut() {
                Some(n) => n.as_mut().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut notified => {}
            _ = pool_woke => {}
            _ = tokio::time::sleep_until(touch.min(deadline)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

fn parse_lease(s: &str) -> Result<LeaseId, ApiError> {
    u64::from_str(s)
        .map(LeaseId)
        .map_err(|_| ApiError::conflict("stale_lease", format!("lease {s} is stale or unknown")))
}

/// Counts stale-lease refusals on the way out.
fn count_stale(app: &AppState, e: ApiError) -> ApiError {
    if e.code == "stale_lease" {
        app.metrics.stale_rejections.fetch_add(1, Ordering::Relaxed);
    }
    e
}

/// `POST /v1/agent/leases/{lease_id}/heartbeat`.
pub async fn heartbeat(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(lease): ApiPath<String>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    caller.require_agent()?;
    let lease = parse_lease(&lease).map_err(|e| count_stale(&app, e))?;
    // Deadlines are not persisted: after a restart every running lease gets a fresh TTL.
    let ack = app
        .mutate(Vec::new(), false, |s, now, _| {
            s.heartbeat(now, lease).map_err(ApiError::from)
        })
        .await
        .map_err(|e| count_stale(&app, e))?;
    Ok(Json(ack))
}

/// `POST /v1/agent/leases/{lease_id}/jobs/{job_id}/complete`.
pub async fn complete(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((lease, job)): ApiPath<(String, String)>,
    ApiJson(report): ApiJson<RunReport>,
) -> Result<Json<Value>, ApiError> {
    if report.passed {
        // A pass with a failed test would end the job passed with failures counted: one
        // of the two is wrong, and CI must not go green on it.
        let failed = report.tests.iter().position(|t| {
            matches!(
                t.status,
                TestStatus::Failed | TestStatus::TimedOut | TestStatus::Interrupted
            )
        });
        if let Some(i) = failed {
            return Err(ApiError::invalid(
                format!("tests[{i}].status"),
                "the report says passed, but this test did not pass",
            ));
        }
    }
    let (_, state) = report_result(app, caller, &lease, &job, move |s, now, lease, job| {
        s.complete(now, lease, job, report)
    })
    .await?;
    Ok(Json(json!({ "state": state })))
}

/// `POST /v1/agent/leases/{lease_id}/jobs/{job_id}/fail`.
pub async fn fail(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((lease, job)): ApiPath<(String, String)>,
    ApiJson(failure): ApiJson<InfraFailure>,
) -> Result<Json<Value>, ApiError> {
    // The job's log gets the failure with the state change (see `App::mutate_runs`).
    let (_, state) = report_result(app, caller, &lease, &job, move |s, now, lease, job| {
        s.fail(now, lease, job, failure)
    })
    .await?;
    Ok(Json(json!({ "state": state })))
}

/// A job's result under a lease (complete or fail): fenced by the lease, counted when stale,
/// and followed by a timer nudge (a retry's backoff or a freed device is a new deadline).
async fn report_result(
    app: AppState,
    caller: Caller,
    lease: &str,
    job: &str,
    apply: impl FnOnce(
            &mut qgjob_core::GroupedScheduler,
            qgjob_core::Time,
            LeaseId,
            JobId,
        ) -> Result<qgjob_core::JobState, qgjob_core::ReportError>
        + Send
        + 'static,
) -> Result<(JobId, qgjob_core::JobState), ApiError> {
    caller.require_agent()?;
    let lease = parse_lease(lease).map_err(|e| count_stale(&app, e))?;
    let job = parse_job_id(job)?;
    let state = app
        .mutate(Vec::new(), true, move |s, now, _| {
            apply(s, now, lease, job).map_err(ApiError::from)
        })
        .await
        .map_err(|e| count_stale(&app, e))?;
    app.timer.notify_one();
    Ok((job, state))
}

/// `POST /v1/agent/leases/{lease_id}/jobs/{job_id}/logs`: appends raw text to the log.
pub async fn upload_logs(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((lease, job)): ApiPath<(String, String)>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<StatusCode, ApiError> {
    caller.require_agent()?;
    let lease = parse_lease(&lease)?;
    let job: JobId = parse_job_id(&job)?;
    let body = body.map_err(|e| {
        if let Some(refused) = crate::intake::refused_body(&e) {
            refused
        } else if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("log chunk is too large")
        } else {
            ApiError::bad_request(e.body_text())
        }
    })?;
    // Only the job's current (or just-ended) lease may write its log; an older attempt's
    // late writer is fenced off.
    if !app.may_log(lease, job) {
        return Err(count_stale(
            &app,
            ApiError::conflict(
                "stale_lease",
                format!("lease {lease} does not hold job {job}"),
            ),
        ));
    }
    app.store
        .append_log(job, &body, app.limits.log_bytes)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/agent/builds/{sha256}` and `GET /v1/agent/bundles/{sha256}`: builds and
/// bundles share one content-addressed blob store, so one handler serves both.
pub async fn download_blob(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath(sha): ApiPath<String>,
) -> Result<Response, ApiError> {
    caller.require_agent()?;
    blob_response(&app, &sha).await
}

/// `GET /v1/agent/apps/{org_id}/{app_version_id}`.
pub async fn app_build(
    State(app): State<AppState>,
    caller: Caller,
    ApiPath((org, ver)): ApiPath<(String, String)>,
) -> Result<Json<BuildRecord>, ApiError> {
    caller.require_agent()?;
    let org = qgjob_core::OrgId::new(org).map_err(ApiError::from)?;
    let ver = qgjob_core::AppVersionId::new(ver).map_err(ApiError::from)?;
    app.store
        .get_build(&org, &ver)
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no app build was uploaded for {org}/{ver} (qgjob app upload)"
            ))
        })
}
