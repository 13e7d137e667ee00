//! Operations endpoints: `/healthz`, `/readyz`, Prometheus `/metrics`, and `/openapi.json` (a
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
    // Agents size their patience with a device another agent holds from the TTL.
    let ttl = app.lock().lease_ttl_ms();
    Json(json!({"status": status, "lease_ttl_ms": ttl}))
}

/// `GET /readyz`: 200 while the server serves; 503 while it stops, and on a standby (which
/// answers it with code `standby`). For a load balancer's check; `/healthz` is liveness.
pub async fn readyz(State(app): State<AppState>) -> Response {
    if *app.shutdown.borrow() {
        crate::error::ApiError::unavailable("the server is stopping").into_response()
    } else {
        Json(json!({"status": "ok"})).into_response()
    }
}

/// The `qgjob_standby` gauge: 1 on a standby (its only metric), 0 on a serving server.
pub fn standby_metric(standing_by: bool) -> String {
    format!(
        "# HELP qgjob_standby 1 while this server stands by for another on the same store, \
         0 while it serves.\n# TYPE qgjob_standby gauge\nqgjob_standby {}\n",
        u8::from(standing_by)
    )
}

/// The `target` label of `qgjob_jobs`: the built-in pools and those a device serves keep
/// their names; jobs of every other target (a name any org may invent when it submits)
/// are summed under `_other`, so the number of series stays bounded.
fn metric_targets(
    depth: Vec<(qgjob_core::Target, qgjob_core::StateCounts)>,
    served: &std::collections::BTreeSet<&str>,
) -> Vec<(String, qgjob_core::StateCounts)> {
    let mut out: Vec<(String, qgjob_core::StateCounts)> = Vec::new();
    let mut other = qgjob_core::StateCounts::default();
    let mut any_other = false;
    for (t, c) in depth {
        let name = t.as_str();
        if matches!(name, "emulator" | "device" | "browserstack") || served.contains(name) {
            out.push((name.to_string(), c));
        } else {
            any_other = true;
            other.merge(&c);
        }
    }
    if any_other {
        out.push(("_other".to_string(), other));
    }
    out
}

/// `GET /metrics`.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let (depth, leases, devices, in_memory) = {
        let s = app.lock();
        let devs = s.devices();
        let leases = devs.iter().filter(|d| d.lease.is_some()).count() as u64;
        let served: std::collections::BTreeSet<&str> =
            devs.iter().map(|d| d.info.target.as_str()).collect();
        let depth = metric_targets(s.queue_depth(), &served);
        (depth, leases, devs.len() as u64, s.len() as u64)
    };
    let mut body = app.metrics.render(&depth, leases, devices, in_memory);
    if !body.ends_with('\n') {
        body.push('\n');
    }
    body.push_str(&standby_metric(false));
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
        "/v1/admin/tokens/revoke",
        "admin",
        "Revoke a token created through the API (409 for a configured one)",
        "RevokeToken",
        "204",
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
    (
        "get",
        "/healthz",
        "none",
        "Liveness (also 200 on a standby, with status standby)",
        "",
        "200",
    ),
    (
        "get",
        "/readyz",
        "none",
        "Readiness: 503 while stopping, and on a standby",
        "",
        "200",
    ),
    ("get", "/metrics", "none", "Prometheus metrics", "", "200"),
    ("get", "/openapi.json", "none", "This document", "", "200"),
];

/// The schema of a route's success answer: a component name, or `text`, `binary`, `sse`,
/// `log` (UTF-8 text or, when the bytes are not UTF-8, binary).
fn answer_schema(method: &str, path: &str) -> Option<&'static str> {
    Some(match (method, path) {
        ("post", "/v1/jobs") => "Submitted",
        ("get", "/v1/jobs") => "JobPage",
        ("post", "/v1/runs") => "RunSubmitted",
        ("get", "/v1/jobs/{job_id}") => "Job",
        ("get", "/v1/runs/{run_id}") => "RunView",
        ("post", "/v1/jobs/{job_id}/cancel") => "CancelAnswer",
        ("post", "/v1/runs/{run_id}/cancel") => "RunCancelAnswer",
        ("get", "/v1/jobs/{job_id}/logs") => "log",
        ("get", "/v1/jobs/{job_id}/results") => "Results",
        (_, p) if p.ends_with("/events") => "sse",
        ("put", _) => "Stored",
        ("get", "/v1/apps/{org_id}/{app_version_id}") => "BuildRecord",
        ("get", "/v1/agent/apps/{org_id}/{app_version_id}") => "BuildRecord",
        ("get", p) if p.ends_with("/build") || p.starts_with("/v1/agent/b") => "binary",
        ("post", "/v1/admin/tokens") => "TokenAnswer",
        ("post", "/v1/agent/devices") => "DeviceAnswer",
        ("post", "/v1/agent/lease") => "Lease",
        ("post", p) if p.ends_with("/heartbeat") => "HeartbeatAck",
        ("post", p) if p.ends_with("/complete") || p.ends_with("/fail") => "StateAnswer",
        ("get", "/healthz") | ("get", "/readyz") => "Health",
        ("get", "/metrics") => "text",
        _ => return None,
    })
}

fn string() -> Value {
    json!({"type": "string"})
}

fn int() -> Value {
    json!({"type": "integer", "minimum": 0})
}

fn reference(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn array_of(v: Value) -> Value {
    json!({"type": "array", "items": v})
}

/// An object schema with these properties, the first `required` of them required.
fn object(props: &[(&str, Value)], required: usize) -> Value {
    let mut p = Map::new();
    for (k, v) in props {
        p.insert((*k).to_string(), v.clone());
    }
    let req: Vec<&str> = props.iter().take(required).map(|(k, _)| *k).collect();
    json!({"type": "object", "required": req, "properties": p})
}

/// Component schemas: the serde forms of the core types and of the server's answers.
fn schemas() -> Value {
    let state = json!({"enum": ["queued", "running", "passed", "failed", "error", "canceled"]});
    let target = json!({"type": "string", "description": "emulator, device, browserstack or another lower-case pool name"});
    let labels = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let requirements = object(
        &[
            ("platform", json!({"enum": ["android", "ios"]})),
            ("model", string()),
            ("os_version", string()),
        ],
        0,
    );
    let job_spec = object(
        &[
            ("org_id", string()),
            ("app_version_id", string()),
            ("tests", array_of(string())),
            ("target", target.clone()),
            (
                "priority",
                json!({"type": "integer", "minimum": -1000, "maximum": 1000}),
            ),
            ("requires", requirements.clone()),
            (
                "max_attempts",
                json!({"type": "integer", "minimum": 1, "maximum": 20}),
            ),
            (
                "timeout_ms",
                json!({"type": "integer", "minimum": 1000, "maximum": 86_400_000}),
            ),
            ("retry_failed_tests", json!({"type": "boolean"})),
            ("idempotency_key", string()),
            ("labels", labels.clone()),
            ("run_id", string()),
            (
                "bundle",
                json!({"type": "string", "description": "sha256 hex of the test bundle"}),
            ),
        ],
        3,
    );
    let test_result = object(
        &[
            ("title", string()),
            (
                "status",
                json!({"enum": ["passed", "failed", "skipped", "timedOut", "flaky", "interrupted"]}),
            ),
            ("file", string()),
            ("duration_ms", int()),
            ("error", string()),
        ],
        2,
    );
    let counts = object(
        &[
            ("passed", int()),
            ("failed", int()),
            ("skipped", int()),
            ("flaky", int()),
        ],
        0,
    );
    let state_counts = object(
        &[
            ("queued", int()),
            ("running", int()),
            ("passed", int()),
            ("failed", int()),
            ("error", int()),
            ("canceled", int()),
        ],
        6,
    );
    let outcome = object(
        &[
            ("state", state.clone()),
            ("flaky", json!({"type": "boolean"})),
            ("counts", counts.clone()),
            ("tests", array_of(reference("TestResult"))),
            ("error", string()),
        ],
        1,
    );
    let job = object(
        &[
            ("id", string()),
            ("spec", reference("JobSpec")),
            ("state", state.clone()),
            ("attempt", int()),
            ("created_at", int()),
            ("released_at", int()),
            ("started_at", int()),
            ("finished_at", int()),
            ("not_before", int()),
            ("device", string()),
            ("lease", int()),
            ("lease_deadline", int()),
            ("installed", json!({"type": "boolean"})),
            ("cancel_requested", json!({"type": "boolean"})),
            ("had_failure", json!({"type": "boolean"})),
            ("last_error", string()),
            ("outcome", outcome),
        ],
        6,
    );
    let build_ref = object(&[("org_id", string()), ("app_version_id", string())], 2);
    let device_info = object(
        &[
            ("id", string()),
            ("target", target),
            (
                "capabilities",
                object(
                    &[
                        ("platform", json!({"enum": ["android", "ios"]})),
                        ("model", string()),
                        ("os_version", string()),
                    ],
                    0,
                ),
            ),
            ("installed", build_ref.clone()),
            ("install_estimate_ms", int()),
            ("idle", json!({"type": "boolean"})),
            ("session", string()),
            ("replaces", string()),
        ],
        2,
    );
    let lease = object(
        &[
            ("id", int()),
            ("device", string()),
            ("build", build_ref),
            ("install", json!({"type": "boolean"})),
            (
                "jobs",
                array_of(object(
                    &[
                        ("id", string()),
                        ("attempt", int()),
                        ("spec", reference("JobSpec")),
                    ],
                    3,
                )),
            ),
            ("deadline", int()),
        ],
        6,
    );
    let job_event = object(
        &[
            ("job_id", string()),
            ("org_id", string()),
            ("state", state.clone()),
            ("attempt", int()),
            ("at", int()),
            ("run_id", string()),
        ],
        5,
    );
    json!({
        "Error": {"type": "object", "required": ["error"], "properties": {"error": object(
            &[("code", string()), ("message", string()), ("field", string())], 2)}},
        "JobSpec": job_spec,
        "Job": job,
        "TestResult": test_result,
        "StateCounts": state_counts,
        "JobEvent": job_event,
        "DeviceInfo": device_info,
        "Lease": lease,
        "RunSubmit": object(&[("jobs", array_of(reference("JobSpec"))), ("labels", labels.clone())], 1),
        "NewToken": object(&[("kind", json!({"enum": ["admin", "org", "agent"]})), ("org_id", string())], 1),
        "RevokeToken": object(&[("token", string())], 1),
        "LeaseRequest": object(&[("device_id", string()), ("session", string()), ("max_batch", int()), ("wait_ms", int())], 1),
        "RunReport": object(
            &[("passed", json!({"type": "boolean"})), ("tests", array_of(reference("TestResult"))),
              ("duration_ms", int()), ("error", string())],
            1,
        ),
        "InfraFailure": object(
            &[("kind", json!({"enum": ["device_lost", "install_failed", "timeout", "lease_expired", "runner_crashed", "other"]})),
              ("message", string())],
            2,
        ),
        "Submitted": object(&[("job_id", string()), ("status", state.clone()), ("created", json!({"type": "boolean"})), ("warning", string())], 3),
        "RunSubmitted": object(&[("run_id", string()), ("job_ids", array_of(string())), ("status", string()), ("created", json!({"type": "boolean"})), ("warning", string())], 4),
        "JobPage": object(&[("jobs", array_of(reference("Job"))), ("next_cursor", json!({"type": ["string", "null"]}))], 2),
        "RunView": object(
            &[("run_id", string()), ("org_id", string()),
              ("status", json!({"enum": ["queued", "running", "passed", "failed", "error", "canceled"]})),
              ("counts", reference("StateCounts")), ("created_at", int()), ("jobs", array_of(reference("Job"))),
              ("labels", labels)],
            6,
        ),
        "CancelAnswer": object(&[("job_id", string()), ("result", json!({"enum": ["canceled", "requested"]}))], 2),
        "RunCancelAnswer": object(&[("run_id", string()), ("canceled", int()), ("requested", int())], 3),
        "Results": object(
            &[("job_id", string()), ("state", state.clone()), ("tests", array_of(reference("TestResult"))),
              ("counts", counts), ("flaky", json!({"type": "boolean"})), ("error", string())],
            3,
        ),
        "Stored": object(&[("sha256", string()), ("size", int()), ("created", json!({"type": "boolean"}))], 3),
        "BuildRecord": object(&[("sha256", string()), ("size", int())], 2),
        "TokenAnswer": object(&[("token", string()), ("kind", string()), ("org_id", string())], 2),
        "DeviceAnswer": object(&[("device_id", string())], 1),
        "HeartbeatAck": object(&[("deadline", int()), ("cancel", array_of(string()))], 2),
        "StateAnswer": object(&[("state", state)], 1),
        "Health": object(
            &[
                ("status", json!({"enum": ["ok", "shutting_down", "standby"]})),
                (
                    "lease_ttl_ms",
                    json!({"type": "integer", "description": "how long a lease lasts without a heartbeat (absent on a standby)"}),
                ),
            ],
            1
        )
    })
}

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
        match answer_schema(method, path) {
            Some("text") => {
                op["responses"][*ok]["content"] =
                    json!({"text/plain": {"schema": {"type": "string"}}});
            }
            Some("log") => {
                op["responses"][*ok]["content"] = json!({
                    "text/plain; charset=utf-8": {"schema": {"type": "string",
                        "description": "the log's bytes when they are UTF-8 (a character split \
                                        by the answer's bounds aside)"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                        "description": "the log's bytes as the agent wrote them, when they are \
                                        not UTF-8"}}});
            }
            Some("binary") => {
                op["responses"][*ok]["content"] = json!({"application/octet-stream":
                    {"schema": {"type": "string", "format": "binary"}}});
            }
            Some("sse") => {
                op["responses"][*ok]["content"] = json!({"text/event-stream": {"schema": {
                    "type": "string",
                    "description": "`event: job` with `data:` a JobEvent, one per change"}},
                    "x-event-data": {"schema": {"$ref": "#/components/schemas/JobEvent"}}});
            }
            Some(name) => {
                op["responses"][*ok]["content"] = json!({"application/json":
                    {"schema": {"$ref": format!("#/components/schemas/{name}")}}});
            }
            None => {}
        }
        if matches!(
            (*method, *path),
            ("post", "/v1/jobs") | ("post", "/v1/runs")
        ) {
            // Idempotency keys that matched answer 200 with the existing job or run.
            let mut again = op["responses"][*ok].clone();
            again["description"] = json!("already submitted under these idempotency keys");
            op["responses"]["200"] = again;
        }
        if (*method, *path) == ("post", "/v1/agent/lease") {
            op["responses"]["204"] = json!({"description": "no work within wait_ms"});
        }
        if path.starts_with("/v1/agent/devices") || *path == "/v1/agent/lease" {
            op["responses"]["409"] = json!({"description":
                "device_held: another agent session holds the device and is in touch; \
                 device_taken: another session registered it since (also device_lost, \
                 conflict)"});
        }
        let query: &[(&str, Value)] = match (*method, *path) {
            ("get", "/v1/jobs") => &[
                ("org_id", string()),
                (
                    "state",
                    json!({"enum": ["queued", "running", "passed", "failed", "error", "canceled"]}),
                ),
                ("app_version_id", string()),
                ("target", string()),
                ("run_id", string()),
                ("cursor", string()),
                (
                    "limit",
                    json!({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}),
                ),
            ],
            ("get", "/v1/jobs/{job_id}/logs") => &[("offset", int())],
            ("delete", "/v1/agent/devices/{device_id}") => &[("session", string())],
            _ => &[],
        };
        if let Some(ps) = op["parameters"].as_array_mut() {
            for (name, schema) in query {
                ps.push(json!({"name": name, "in": "query", "required": false, "schema": schema}));
            }
        }
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
    json!({
        "openapi": "3.1.0",
        "info": {"title": "qgjob", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Test-job orchestrator for mobile end-to-end tests. See docs/http-api.md."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas()
        }
    })
}

/// `GET /openapi.json`.
pub async fn openapi() -> Json<Value> {
    Json(openapi_doc())
}
