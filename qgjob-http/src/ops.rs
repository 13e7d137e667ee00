//! Operations endpoints: `/healthz`, Prometheus `/metrics`, and `/openapi.json` (a
//! hand-written OpenAPI 3.1 document listing every endpoint, kept next to the router).

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use qgjob_core::Scheduler;
use serde_json::{json, Map, Value};

use crate::state::AppState;

/// `GET /healthz`.
pub async fn healthz(State(app): State<AppState>) -> Json<Value> {
    let status = if *app.shutdown.borrow() {
        "shutting_down"
    } else {
        "ok"
    };
    Json(json!({"status": status}))
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let (depth, leases, devices, in_memory) = {
        let s = app.lock();
        let devs = s.devices();
        let leases = devs.iter().filter(|d| d.lease.is_some()).count() as u64;
        (s.queue_depth(), leases, devs.len() as u64, s.len() as u64)
    };
    let body = app.metrics.render(&depth, leases, devices, in_memory);
    let mut resp = body.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// Every route: method, path, auth kind, summary, request body kind, success status.
pub const ROUTES: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "post",
        "/v1/jobs",
        "org",
        "Submit one job",
        "JobSpec",
        "201",
    ),
    (
        "get",
        "/v1/jobs",
        "org",
        "List jobs (filters, cursor pagination)",
        "",
        "200",
    ),
    (
        "post",
        "/v1/runs",
        "org",
        "Submit a run of many jobs",
        "RunSubmit",
        "201",
    ),
    ("get", "/v1/jobs/{job_id}", "org", "Get a job", "", "200"),
    (
        "get",
        "/v1/runs/{run_id}",
        "org",
        "Get a run with its jobs and aggregate status",
        "",
        "200",
    ),
    (
        "post",
        "/v1/jobs/{job_id}/cancel",
        "org",
        "Cancel a job",
        "",
        "200",
    ),
    (
        "post",
        "/v1/runs/{run_id}/cancel",
        "org",
        "Cancel every job of a run",
        "",
        "200",
    ),
    (
        "get",
        "/v1/jobs/{job_id}/logs",
        "org",
        "A job's log (text) from ?offset",
        "",
        "200",
    ),
    (
        "get",
        "/v1/jobs/{job_id}/results",
        "org",
        "A job's per-test results",
        "",
        "200",
    ),
    (
        "get",
        "/v1/jobs/{job_id}/events",
        "org",
        "Live job events (Server-Sent Events)",
        "",
        "200",
    ),
    (
        "get",
        "/v1/runs/{run_id}/events",
        "org",
        "Live run events (Server-Sent Events)",
        "",
        "200",
    ),
    (
        "put",
        "/v1/apps/{org_id}/{app_version_id}",
        "org",
        "Upload an app build (raw bytes)",
        "binary",
        "200",
    ),
    (
        "get",
        "/v1/apps/{org_id}/{app_version_id}",
        "org",
        "The build registered for a version",
        "",
        "200",
    ),
    (
        "get",
        "/v1/apps/{org_id}/{app_version_id}/build",
        "org",
        "Download a version's build",
        "",
        "200",
    ),
    (
        "put",
        "/v1/bundles",
        "org",
        "Upload a test bundle (.tar.gz)",
        "binary",
        "200",
    ),
    (
        "post",
        "/v1/admin/tokens",
        "admin",
        "Create a token",
        "NewToken",
        "201",
    ),
    (
        "post",
        "/v1/agent/devices",
        "agent",
        "Register or refresh a device",
        "DeviceInfo",
        "200",
    ),
    (
        "delete",
        "/v1/agent/devices/{device_id}",
        "agent",
        "Unregister a device",
        "",
        "204",
    ),
    (
        "post",
        "/v1/agent/lease",
        "agent",
        "Long-poll for a lease",
        "LeaseRequest",
        "200",
    ),
    (
        "post",
        "/v1/agent/leases/{lease_id}/heartbeat",
        "agent",
        "Extend a lease; learn cancels",
        "",
        "200",
    ),
    (
        "post",
        "/v1/agent/leases/{lease_id}/jobs/{job_id}/complete",
        "agent",
        "Report a job's tests ran",
        "RunReport",
        "200",
    ),
    (
        "post",
        "/v1/agent/leases/{lease_id}/jobs/{job_id}/fail",
        "agent",
        "Report an infrastructure failure",
        "InfraFailure",
        "200",
    ),
    (
        "post",
        "/v1/agent/leases/{lease_id}/jobs/{job_id}/logs",
        "agent",
        "Append to a job's log",
        "text",
        "204",
    ),
    (
        "get",
        "/v1/agent/builds/{sha256}",
        "agent",
        "Download a build by digest",
        "",
        "200",
    ),
    (
        "get",
        "/v1/agent/bundles/{sha256}",
        "agent",
        "Download a bundle by digest",
        "",
        "200",
    ),
    (
        "get",
        "/v1/agent/apps/{org_id}/{app_version_id}",
        "agent",
        "The build of a version",
        "",
        "200",
    ),
    ("get", "/healthz", "none", "Liveness", "", "200"),
    ("get", "/metrics", "none", "Prometheus metrics", "", "200"),
    ("get", "/openapi.json", "none", "This document", "", "200"),
];

/// The OpenAPI document.
pub fn openapi_doc() -> Value {
    let mut paths = Map::new();
    for (method, path, auth, summary, body, ok) in ROUTES {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = json!({
            "summary": summary,
            "parameters": params,
            "responses": {
                *ok: {"description": "success"},
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        if *auth != "none" {
            op["security"] = json!([{ "bearer": [] }]);
            op["x-qgjob-token"] = json!(auth);
        }
        match *body {
            "" => {}
            "binary" => {
                op["requestBody"] = json!({"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}})
            }
            "text" => {
                op["requestBody"] =
                    json!({"content": {"text/plain": {"schema": {"type": "string"}}}})
            }
            name => {
                op["requestBody"] = json!({"content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}})
            }
        }
        entry[*method] = op;
    }
    let obj = |desc: &str| json!({"type": "object", "description": desc});
    json!({
        "openapi": "3.1.0",
        "info": {"title": "qgjob", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Test-job orchestrator for mobile end-to-end tests. See docs/http-api.md."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}}}}},
                "JobSpec": obj("qgjob_core::JobSpec: org_id, app_version_id, tests, target, priority, requires, max_attempts, timeout_ms, retry_failed_tests, idempotency_key, labels, bundle"),
                "RunSubmit": {"type": "object", "required": ["jobs"], "properties": {
                    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/JobSpec"}},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "NewToken": {"type": "object", "required": ["kind"], "properties": {
                    "kind": {"enum": ["admin", "org", "agent"]}, "org_id": {"type": "string"}}},
                "DeviceInfo": obj("qgjob_core::DeviceInfo: id, target, capabilities, installed, install_estimate_ms"),
                "LeaseRequest": {"type": "object", "required": ["device_id"], "properties": {
                    "device_id": {"type": "string"}, "max_batch": {"type": "integer"}, "wait_ms": {"type": "integer"}}},
                "RunReport": obj("qgjob_core::RunReport: passed, tests, duration_ms, error"),
                "InfraFailure": obj("qgjob_core::InfraFailure: kind, message")
            }
        }
    })
}

/// `GET /openapi.json`.
pub async fn openapi() -> Json<Value> {
    Json(openapi_doc())
}
