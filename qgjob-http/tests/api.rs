//! HTTP tests of the user API and agent protocol, each against a real server on
//! 127.0.0.1:0 (in-memory store unless the test is about durability).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;

use common::{device, eventually, memory_opts, spec, sqlite_opts, Client, TestServer};
use qgjob_core::SchedulerConfig;
use qgjob_http::{ServerOptions, TokenKind, TokenSpec};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Waits until the scheduler has forgotten every (finished) job: only the store has them.
fn all_forgotten(c: &Client) {
    eventually(20, || {
        let (_, m) = c.get("/metrics");
        m.as_str()
            .unwrap()
            .contains("qgjob_jobs_in_memory 0")
            .then_some(())
    });
}

/// Asserts an error answer with this status that names this field; returns the body.
fn assert_field((st, v): (u16, Value), status: u16, field: &str) -> Value {
    assert_eq!(
        (st, v["error"]["field"].clone()),
        (status, json!(field)),
        "{v}"
    );
    v
}

fn submit(c: &Client, org: &str, app: &str, test: &str) -> String {
    let (st, v) = c.post("/v1/jobs", &spec(org, app, test));
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["status"], "queued");
    assert_eq!(v["created"], true);
    v["job_id"].as_str().expect("job id").to_string()
}

fn lease(c: &Client, dev: &str, wait_ms: u64) -> (u16, Value) {
    c.post(
        "/v1/agent/lease",
        &json!({"device_id": dev, "max_batch": 1, "wait_ms": wait_ms}),
    )
}

fn job_state(c: &Client, id: &str) -> Value {
    let (st, v) = c.get(&format!("/v1/jobs/{id}"));
    assert_eq!(st, 200, "{v}");
    v
}

#[test]
fn submit_lease_heartbeat_complete() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let id = submit(&c, "qualgent", "xyz123", "tests/onboarding.spec.js");
    assert_eq!(job_state(&c, &id)["state"], "queued");

    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let (st, l) = lease(&c, "emu-1", 1000);
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["jobs"][0]["id"], id.as_str());
    assert_eq!(l["install"], true);
    let lid = l["id"].as_u64().expect("lease id");
    assert_eq!(job_state(&c, &id)["state"], "running");

    let (st, hb) = c.post_empty(&format!("/v1/agent/leases/{lid}/heartbeat"));
    assert_eq!(st, 200, "{hb}");
    assert!(hb["deadline"].as_u64().unwrap() >= l["deadline"].as_u64().unwrap());
    assert_eq!(hb["cancel"], json!([]));

    let (st, _) = c.post_raw(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/logs"),
        b"installing\nrunning 1 test\n",
    );
    assert_eq!(st, 204);
    let report = json!({"passed": true, "duration_ms": 1234, "tests": [
        {"title": "onboarding › signs up", "file": "tests/onboarding.spec.js",
         "status": "passed", "duration_ms": 1200}]});
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
        &report,
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "passed");

    let j = job_state(&c, &id);
    assert_eq!(j["state"], "passed");
    assert_eq!(j["attempt"], 1);
    // Log lines may trail the report; a lease that never held the job may not write.
    let (st, _) = c.post_raw(&format!("/v1/agent/leases/{lid}/jobs/{id}/logs"), b"done\n");
    assert_eq!(st, 204);
    let (st, v) = c.post_raw(
        &format!("/v1/agent/leases/{}/jobs/{id}/logs", lid + 1),
        b"x",
    );
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("stale_lease"))
    );
    let (st, r) = c.get(&format!("/v1/jobs/{id}/results"));
    assert_eq!(st, 200);
    assert_eq!(r["state"], "passed");
    assert_eq!(r["tests"][0]["title"], "onboarding › signs up");
    assert_eq!(r["counts"]["passed"], 1);

    let (st, h, body) = c.get_raw(&format!("/v1/jobs/{id}/logs"));
    assert_eq!(st, 200);
    assert_eq!(body, b"installing\nrunning 1 test\ndone\n");
    assert_eq!(h.get("x-qgjob-log-size").unwrap(), "31");
    let (_, _, tail) = c.get_raw(&format!("/v1/jobs/{id}/logs?offset=11"));
    assert_eq!(tail, b"running 1 test\ndone\n");

    // After the job ended the device is free again and there is no more work.
    let (st, _) = lease(&c, "emu-1", 0);
    assert_eq!(st, 204);
}

/// A job for a pool no device serves (a typo, or no agent started yet) is queued, and the
/// answer says so; once a device of that pool registers, the warning goes away.
#[test]
fn submits_warn_when_no_agent_serves_the_target() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let mut typo = spec("qualgent", "v1", "tests/a.spec.js");
    typo["target"] = json!("emualtor");
    let (st, v) = c.post("/v1/jobs", &typo);
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["status"], "queued");
    let w = v["warning"].as_str().unwrap_or_default();
    assert!(w.contains("no agent serves target emualtor"), "{v}");

    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let (st, v) = c.post("/v1/jobs", &spec("qualgent", "v1", "tests/b.spec.js"));
    assert_eq!(st, 201, "{v}");
    assert!(v.get("warning").is_none(), "{v}");

    // A run names only the pools nobody serves.
    let mut dev = spec("qualgent", "v2", "tests/c.spec.js");
    dev["target"] = json!("device");
    let runs = json!({"jobs": [spec("qualgent", "v2", "tests/d.spec.js"), dev]});
    let (st, v) = c.post("/v1/runs", &runs);
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        v["warning"], "no agent serves target device now; the jobs wait until one registers",
        "{v}"
    );
}

#[test]
fn long_poll_wakes_on_submit() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let agent = c.clone();
    // The agent waits up to 20 s; a server that only answered at the end of the wait
    // would make this a 204.
    let waiter = std::thread::spawn(move || lease(&agent, "emu-1", 20_000));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let (st, l) = waiter.join().unwrap();
    assert_eq!(st, 200, "{l}");
    assert_eq!(l["jobs"][0]["id"], id.as_str());
}

#[test]
fn long_poll_times_out_with_204() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let (st, v) = lease(&c, "emu-1", 50);
    assert_eq!(st, 204, "{v}");
}

fn short_ttl_opts() -> ServerOptions {
    ServerOptions {
        scheduler: SchedulerConfig {
            lease_ttl_ms: 300,
            backoff_base_ms: 0,
            backoff_max_ms: 0,
            ..SchedulerConfig::default()
        },
        ..memory_opts()
    }
}

#[test]
fn lease_expiry_requeues_and_old_lease_is_stale() {
    let s = TestServer::start(short_ttl_opts());
    let c = s.client(None);
    // Agents learn the TTL from the health answer (see `held_patience` in the CLI).
    assert_eq!(c.get("/healthz").1["lease_ttl_ms"], 300);
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let (_, l) = lease(&c, "emu-1", 1000);
    let old = l["id"].as_u64().unwrap();
    // No heartbeat: the timer task expires the lease and the job comes back.
    let j = eventually(20, || {
        let j = job_state(&c, &id);
        (j["state"] == "queued").then_some(j)
    });
    assert_eq!(j["attempt"], 2);

    // The old lease's report is refused and changes nothing.
    let report = json!({"passed": true});
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{old}/jobs/{id}/complete"),
        &report,
    );
    assert_eq!(st, 409, "{v}");
    assert_eq!(v["error"]["code"], "stale_lease");
    let (st, _) = c.post_empty(&format!("/v1/agent/leases/{old}/heartbeat"));
    assert_eq!(st, 409);
    assert_eq!(job_state(&c, &id)["state"], "queued");
    // The job's log says why its first attempt ended.
    let log = eventually(5, || {
        let (_, _, body) = c.get_raw(&format!("/v1/jobs/{id}/logs"));
        let log = String::from_utf8_lossy(&body).into_owned();
        log.contains("lease expired").then_some(log)
    });
    assert!(
        log.contains("lease expired: device emu-1 stopped heartbeating; it will be retried"),
        "{log}"
    );
    assert!(!log.contains("lease expired: lease expired"), "{log}");

    // The device was marked lost; once it registers again it gets the job's attempt 2.
    let (st, v) = lease(&c, "emu-1", 0);
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("device_lost"))
    );
    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let (st, l2) = lease(&c, "emu-1", 1000);
    assert_eq!(st, 200);
    assert_eq!(l2["jobs"][0]["attempt"], 2);
    assert!(l2["id"].as_u64().unwrap() > old);

    let (_, m) = c.get("/metrics");
    let m = m.as_str().unwrap().to_string();
    assert!(m.contains("qgjob_lease_expirations_total 1"), "{m}");
    assert!(m.contains("qgjob_stale_reports_total 2"), "{m}");
    assert!(m.contains("qgjob_retries_total 1"), "{m}");
}

#[test]
fn stale_and_duplicate_reports_get_409() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    let ok = json!({"passed": true});
    // A lease id that was never handed out.
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{}/jobs/{id}/complete", lid + 7),
        &ok,
    );
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("stale_lease"))
    );
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/fail"),
        &json!({"kind": "device_lost", "message": "usb unplugged"}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["state"], "queued");
    // The same lease reporting again after it failed the job is stale.
    let (st, v) = c.post(&format!("/v1/agent/leases/{lid}/jobs/{id}/complete"), &ok);
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("stale_lease"))
    );
    assert_eq!(job_state(&c, &id)["state"], "queued");
    assert_eq!(job_state(&c, &id)["attempt"], 2);
}

#[test]
fn cancel_queued_and_running() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let queued = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let (st, v) = c.post_empty(&format!("/v1/jobs/{queued}/cancel"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["result"], "canceled");
    assert_eq!(job_state(&c, &queued)["state"], "canceled");
    let (st, v) = c.post_empty(&format!("/v1/jobs/{queued}/cancel"));
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("already_final"))
    );

    let running = submit(&c, "qualgent", "v1", "tests/b.spec.js");
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    let (st, v) = c.post_empty(&format!("/v1/jobs/{running}/cancel"));
    assert_eq!(st, 200);
    assert_eq!(v["result"], "requested");
    assert_eq!(job_state(&c, &running)["cancel_requested"], true);
    let (_, hb) = c.post_empty(&format!("/v1/agent/leases/{lid}/heartbeat"));
    assert_eq!(hb["cancel"], json!([running]));
    let (_, v) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{running}/complete"),
        &json!({"passed": false, "error": "killed"}),
    );
    assert_eq!(v["state"], "canceled");
    assert_eq!(job_state(&c, &running)["state"], "canceled");
}

#[test]
fn idempotent_submit() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let mut sp = spec("qualgent", "v1", "tests/a.spec.js");
    sp["idempotency_key"] = json!("ci-build-42/a");
    let (st1, v1) = c.post("/v1/jobs", &sp);
    let (st2, v2) = c.post("/v1/jobs", &sp);
    assert_eq!((st1, st2), (201, 200));
    assert_eq!(v1["job_id"], v2["job_id"]);
    assert_eq!(v2["created"], false);
    // Same key, different spec: a conflict, not a silent second job.
    sp["tests"] = json!(["tests/other.spec.js"]);
    let (st, v) = c.post("/v1/jobs", &sp);
    assert_eq!((st, v["error"]["code"].clone()), (409, json!("conflict")));
    let (_, list) = c.get("/v1/jobs?org_id=qualgent");
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
}

#[test]
fn run_aggregation_and_run_cancel() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let jobs: Vec<Value> = (0..3)
        .map(|i| spec("qualgent", "v7", &format!("tests/t{i}.spec.js")))
        .collect();
    let (st, r) = c.post(
        "/v1/runs",
        &json!({"jobs": jobs, "labels": {"branch": "main"}}),
    );
    assert_eq!(st, 201, "{r}");
    let run = r["run_id"].as_str().unwrap().to_string();
    let ids: Vec<String> = r["job_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let (_, v) = c.get(&format!("/v1/runs/{run}"));
    assert_eq!(v["status"], "queued");
    assert_eq!(v["counts"]["queued"], 3);
    assert_eq!(v["labels"]["branch"], "main");
    assert_eq!(job_state(&c, &ids[0])["spec"]["run_id"], run.as_str());

    c.post("/v1/agent/devices", &device("emu-1"));
    let mut outcomes = vec![true, false];
    for _ in 0..2 {
        let (_, l) = lease(&c, "emu-1", 1000);
        let lid = l["id"].as_u64().unwrap();
        let jid = l["jobs"][0]["id"].as_str().unwrap().to_string();
        let passed = outcomes.remove(0);
        let (st, _) = c.post(
            &format!("/v1/agent/leases/{lid}/jobs/{jid}/complete"),
            &json!({"passed": passed}),
        );
        assert_eq!(st, 200);
    }
    let (_, v) = c.get(&format!("/v1/runs/{run}"));
    assert_eq!(v["status"], "running");
    assert_eq!(v["counts"]["passed"], 1);
    assert_eq!(v["counts"]["failed"], 1);
    assert_eq!(v["counts"]["queued"], 1);

    let (st, v) = c.post_empty(&format!("/v1/runs/{run}/cancel"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["canceled"].clone(), v["requested"].clone()),
        (json!(1), json!(0))
    );
    let (_, v) = c.get(&format!("/v1/runs/{run}"));
    assert_eq!(v["status"], "failed");
    assert_eq!(v["jobs"].as_array().unwrap().len(), 3);

    let (_, list) = c.get(&format!("/v1/jobs?run_id={run}&state=canceled"));
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
}

#[test]
fn run_of_all_passed_jobs_passes() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let jobs: Vec<Value> = (0..2)
        .map(|i| spec("qualgent", "v8", &format!("tests/t{i}.spec.js")))
        .collect();
    let (_, r) = c.post("/v1/runs", &json!({"jobs": jobs}));
    let run = r["run_id"].as_str().unwrap().to_string();
    c.post("/v1/agent/devices", &device("emu-1"));
    // One lease holding both jobs (batching within one build).
    let (_, l) = c.post(
        "/v1/agent/lease",
        &json!({"device_id": "emu-1", "max_batch": 8, "wait_ms": 1000}),
    );
    let lid = l["id"].as_u64().unwrap();
    assert_eq!(l["jobs"].as_array().unwrap().len(), 2);
    for j in l["jobs"].as_array().unwrap() {
        let jid = j["id"].as_str().unwrap();
        c.post(
            &format!("/v1/agent/leases/{lid}/jobs/{jid}/complete"),
            &json!({"passed": true}),
        );
    }
    let (_, v) = c.get(&format!("/v1/runs/{run}"));
    assert_eq!(v["status"], "passed");
}

#[test]
fn list_filters_and_cursor_pagination() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&c, "qualgent", "v1", &format!("tests/{i}.spec.js")));
    }
    let mut b = spec("qualgent", "v2", "tests/x.spec.js");
    b["target"] = json!("browserstack");
    let (_, other) = c.post("/v1/jobs", &b);
    submit(&c, "acme", "v1", "tests/a.spec.js");

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    for _ in 0..10 {
        pages += 1;
        let path = match &cursor {
            Some(cur) => format!("/v1/jobs?org_id=qualgent&app_version_id=v1&limit=2&cursor={cur}"),
            None => "/v1/jobs?org_id=qualgent&app_version_id=v1&limit=2".to_string(),
        };
        let (st, page) = c.get(&path);
        assert_eq!(st, 200, "{page}");
        for j in page["jobs"].as_array().unwrap() {
            seen.push(j["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(cur) => cursor = Some(cur.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids, "every job once, in submission order");
    assert_eq!(pages, 3, "2 + 2 + 1, and no empty page after the last");
    // A page that holds exactly what is left has no next page either.
    let (_, page) = c.get("/v1/jobs?org_id=qualgent&app_version_id=v1&limit=5");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 5);
    assert_eq!(page["next_cursor"], Value::Null, "{page}");

    let (_, page) = c.get("/v1/jobs?target=browserstack");
    let got: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![other["job_id"].as_str().unwrap()]);
    let (_, page) = c.get("/v1/jobs?org_id=acme&state=queued");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    let (_, page) = c.get("/v1/jobs?state=passed");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 0);
}

#[test]
fn users_never_see_the_server_wide_submission_counter() {
    // `seq` counts every org's submissions: its gaps would tell one org how many jobs the
    // others submitted. Jobs are shown without it and pages are cursored by job id.
    let s = authed_server();
    let acme = s.client(Some(ACME));
    let globex = s.client(Some(GLOBEX));
    let mine: Vec<String> = (0..3)
        .map(|i| submit(&acme, "acme", "v1", &format!("tests/{i}.spec.js")))
        .collect();
    let theirs = submit(&globex, "globex", "v1", "tests/g.spec.js");
    let (st, job) = acme.get(&format!("/v1/jobs/{}", mine[0]));
    assert_eq!(st, 200, "{job}");
    assert!(job.get("seq").is_none(), "{job}");
    assert_eq!(job["id"], mine[0].as_str());
    let (_, page) = acme.get("/v1/jobs?limit=2");
    assert!(page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j.get("seq").is_none()));
    assert_eq!(page["next_cursor"], mine[1].as_str(), "{page}");
    let (_, page) = acme.get(&format!("/v1/jobs?limit=2&cursor={}", mine[1]));
    let rest: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(rest, vec![mine[2].as_str()]);
    // Another org's job id is no cursor, nor is a number: the same answer as an unknown id.
    for cursor in [theirs.as_str(), "2", "0190b7c2-0000-7000-8000-000000000000"] {
        let (st, v) = acme.get(&format!("/v1/jobs?cursor={cursor}"));
        assert_eq!(st, 422, "{cursor}: {v}");
        assert_eq!(
            v["error"]["message"],
            "invalid cursor: pass the next_cursor of the previous page"
        );
    }
    // A run's jobs too.
    let (st, run) = acme.post(
        "/v1/runs",
        &json!({"jobs": [spec("acme", "v2", "tests/r.spec.js")]}),
    );
    assert_eq!(st, 201, "{run}");
    let (_, run) = acme.get(&format!("/v1/runs/{}", run["run_id"].as_str().unwrap()));
    assert!(run["jobs"][0].get("seq").is_none(), "{run}");
}

fn tok(kind: TokenKind, org: Option<&str>, token: &str) -> TokenSpec {
    TokenSpec {
        token: token.to_string(),
        kind,
        org_id: org.map(|o| o.parse().unwrap()),
    }
}

const ADMIN: &str = "admin-token-0123456789";
const AGENT: &str = "agent-token-0123456789";
const ACME: &str = "acme-token-0123456789ab";
const GLOBEX: &str = "globex-token-0123456789";

fn authed_server() -> TestServer {
    TestServer::start(ServerOptions {
        tokens: vec![
            tok(TokenKind::Admin, None, ADMIN),
            tok(TokenKind::Agent, None, AGENT),
            tok(TokenKind::Org, Some("acme"), ACME),
            tok(TokenKind::Org, Some("globex"), GLOBEX),
        ],
        ..memory_opts()
    })
}

#[test]
fn org_isolation() {
    let s = authed_server();
    let acme = s.client(Some(ACME));
    let globex = s.client(Some(GLOBEX));
    let job = submit(&acme, "acme", "v1", "tests/a.spec.js");
    let (_, r) = acme.post(
        "/v1/runs",
        &json!({"jobs": [spec("acme", "v1", "tests/b.spec.js")]}),
    );
    let run = r["run_id"].as_str().unwrap().to_string();
    submit(&globex, "globex", "v1", "tests/g.spec.js");

    // Read, list, cancel, watch, logs, results: all as if the job did not exist.
    for path in [
        format!("/v1/jobs/{job}"),
        format!("/v1/jobs/{job}/results"),
        format!("/v1/jobs/{job}/logs"),
        format!("/v1/runs/{run}"),
    ] {
        let (st, v) = globex.get(&path);
        assert_eq!(
            (st, v["error"]["code"].clone()),
            (404, json!("not_found")),
            "{path}"
        );
    }
    let (st, _) = globex.sse_events(&format!("/v1/jobs/{job}/events"), 1);
    assert_eq!(st, 404);
    let (st, _) = globex.sse_events(&format!("/v1/runs/{run}/events"), 1);
    assert_eq!(st, 404);
    assert_eq!(globex.post_empty(&format!("/v1/jobs/{job}/cancel")).0, 404);
    assert_eq!(globex.post_empty(&format!("/v1/runs/{run}/cancel")).0, 404);
    assert_eq!(job_state(&acme, &job)["state"], "queued");
    let (st, v) = globex.get("/v1/jobs?org_id=acme");
    assert_eq!((st, v["error"]["code"].clone()), (403, json!("forbidden")));
    let (_, v) = globex.get("/v1/jobs");
    let orgs: BTreeSet<String> = v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["spec"]["org_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(orgs, BTreeSet::from(["globex".to_string()]));
    // Submitting for another org is refused.
    let (st, _) = globex.post("/v1/jobs", &spec("acme", "v1", "tests/x.spec.js"));
    assert_eq!(st, 403);
    // Builds are per org too.
    assert_eq!(globex.put_raw("/v1/apps/acme/v1", b"apk", &[]).0, 403);

    // Token kinds: agents only speak the agent protocol; orgs cannot use it; admin does all.
    let agent = s.client(Some(AGENT));
    assert_eq!(agent.get(&format!("/v1/jobs/{job}")).0, 403);
    assert_eq!(acme.post("/v1/agent/devices", &device("emu-1")).0, 403);
    assert_eq!(agent.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let admin = s.client(Some(ADMIN));
    assert_eq!(admin.get(&format!("/v1/jobs/{job}")).0, 200);
    assert_eq!(
        acme.post(
            "/v1/admin/tokens",
            &json!({"kind": "org", "org_id": "acme"})
        )
        .0,
        403
    );
    let (st, t) = admin.post(
        "/v1/admin/tokens",
        &json!({"kind": "org", "org_id": "initech"}),
    );
    assert_eq!(st, 201, "{t}");
    let initech = s.client(Some(t["token"].as_str().unwrap()));
    submit(&initech, "initech", "v1", "tests/i.spec.js");
    assert_eq!(initech.get(&format!("/v1/jobs/{job}")).0, 404);

    // No token, unknown token.
    assert_eq!(s.client(None).get("/v1/jobs").0, 401);
    let (st, v) = s.client(Some("not-a-real-token-at-all")).get("/v1/jobs");
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (401, json!("unauthorized"))
    );
    // The scheme is case-insensitive.
    let lower = format!("bearer {ADMIN}");
    let (st, v) =
        s.client(None)
            .request_with("GET", "/v1/jobs", None, &[("Authorization", &lower)]);
    assert_eq!(st, 200, "{v}");
    // Only org tokens belong to an org.
    assert_field(
        admin.post(
            "/v1/admin/tokens",
            &json!({"kind": "agent", "org_id": "acme"}),
        ),
        422,
        "org_id",
    );
    // A server with tokens does not care where a request comes from: it needs a token.
    let (st, _) = admin.request_with(
        "GET",
        "/v1/jobs",
        None,
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(st, 200);
}

#[test]
fn an_open_server_refuses_web_pages_and_tokens() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let job = spec("qualgent", "v1", "tests/a.spec.js");
    // A cross-site form or fetch, and DNS rebinding (a site's name pointed at 127.0.0.1).
    for headers in [
        [("Origin", "http://evil.example")],
        [("Origin", "null")],
        [("Host", "evil.example:7878")],
    ] {
        let (st, v) = c.request_with("POST", "/v1/jobs", Some(&job), &headers);
        assert_eq!(
            (st, v["error"]["code"].clone()),
            (403, json!("forbidden")),
            "{v}"
        );
        let (st, _) = c.request_with("GET", "/v1/jobs", None, &headers);
        assert_eq!(st, 403);
    }
    let (_, page) = c.get("/v1/jobs");
    assert_eq!(
        page["jobs"].as_array().unwrap().len(),
        0,
        "nothing was queued"
    );
    // Pages of this machine, and programs (no Origin), are served.
    for headers in [
        [("Origin", "http://localhost:3000")],
        [("Host", "localhost:7878")],
    ] {
        let (st, v) = c.request_with("POST", "/v1/jobs", Some(&job), &headers);
        assert_eq!(st, 201, "{v}");
    }
    // A stored token would lock every client out at the next start.
    let (st, v) = c.post("/v1/admin/tokens", &json!({"kind": "agent"}));
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("conflict")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--tokens-file"),
        "{v}"
    );
}

#[test]
fn error_statuses_have_the_json_shape() {
    let s = TestServer::start(ServerOptions {
        limits: qgjob_http::Limits {
            body_bytes: 4096,
            ..qgjob_http::Limits::default()
        },
        ..memory_opts()
    });
    let c = s.client(None);
    let check = |(st, v): (u16, Value), want: u16, code: &str| {
        assert_eq!(st, want, "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    };
    // 400: not JSON, and JSON of the wrong type.
    check(c.post_raw("/v1/jobs", b"{not json"), 400, "malformed_json");
    let mut bad = spec("qualgent", "v1", "tests/a.spec.js");
    bad["priority"] = json!("high");
    check(c.post("/v1/jobs", &bad), 400, "bad_request");
    // 404: unknown job, unknown run, malformed id, unknown route.
    check(
        c.get("/v1/jobs/0190b2a4-1c1f-7a31-9b5e-3c1d2e4f5a6b"),
        404,
        "not_found",
    );
    check(
        c.get("/v1/runs/0190b2a4-1c1f-7a31-9b5e-3c1d2e4f5a6b"),
        404,
        "not_found",
    );
    check(c.get("/v1/jobs/not-a-uuid"), 404, "not_found");
    check(c.get("/v1/nothing-here"), 404, "not_found");
    // 413: body over the limit.
    let mut big = spec("qualgent", "v1", "tests/a.spec.js");
    big["labels"] = json!({"x": "y".repeat(8000)});
    check(c.post("/v1/jobs", &big), 413, "too_large");
    // 422 naming the field: validation in the type, in the spec, a missing field, a batch.
    assert_field(
        c.post("/v1/jobs", &spec("bad org!", "v1", "tests/a.spec.js")),
        422,
        "org_id",
    );
    let mut p = spec("qualgent", "v1", "tests/a.spec.js");
    p["priority"] = json!(5000);
    let v = assert_field(c.post("/v1/jobs", &p), 422, "priority");
    assert_eq!(v["error"]["code"], "invalid_field");
    // A NUL in a key the stores index (PostgreSQL refuses it: a 500 before).
    let mut p = spec("qualgent", "v1", "tests/a.spec.js");
    p["idempotency_key"] = json!("ci\u{0}42");
    assert_field(c.post("/v1/jobs", &p), 422, "idempotency_key");
    assert_field(
        c.post(
            "/v1/jobs",
            &json!({"org_id": "qualgent", "app_version_id": "v1"}),
        ),
        422,
        "tests",
    );
    assert_field(c.post(
        "/v1/runs",
        &json!({"jobs": [spec("qualgent", "v1", "a"), {"org_id": "qualgent", "app_version_id": "v1", "tests": []}]}),
    ), 422, "jobs[1].tests");
    let v = assert_field(c.get("/v1/jobs?state=exploded"), 422, "state");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(msg.matches("invalid state").count(), 1, "{msg}");
    assert_field(c.get("/v1/jobs?limit=5000"), 422, "limit");
    // A numeric parameter's message names it too.
    for (q, name) in [("limit=abc", "limit"), ("cursor=-1", "cursor")] {
        let (st, v) = c.get(&format!("/v1/jobs?{q}"));
        assert_eq!(st, 422, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.starts_with(&format!("invalid {name}")), "{msg}");
    }
    // A path that is not UTF-8: the JSON shape too.
    check(c.get("/v1/jobs/%FF"), 400, "bad_request");
    check(c.get("/v1/agent/builds/%FF%FE"), 400, "bad_request");
    // A long id is not echoed whole.
    let (st, v) = c.get(&format!("/v1/jobs/{}", "x".repeat(5000)));
    assert_eq!(st, 404);
    assert!(v["error"]["message"].as_str().unwrap().len() < 200, "{v}");
    // Test paths are never runner flags; a bundle must be a lower-case digest that was
    // uploaded; an app build is not empty.
    let mut flag = spec("qualgent", "v1", "--config=/etc/evil.js");
    assert_field(c.post("/v1/jobs", &flag), 422, "tests");
    flag["tests"] = json!(["tests/a.spec.js"]);
    flag["bundle"] = json!("AB".repeat(32));
    assert_field(c.post("/v1/jobs", &flag), 422, "bundle");
    flag["bundle"] = json!("ab".repeat(32));
    let v = assert_field(c.post("/v1/jobs", &flag), 422, "bundle");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PUT /v1/bundles"),
        "{v}"
    );
    assert_field(
        c.post(
            "/v1/runs",
            &json!({"jobs": [spec("qualgent", "v1", "a"), flag]}),
        ),
        422,
        "jobs[1].bundle",
    );
    assert_field(c.put_raw("/v1/apps/qualgent/empty", b"", &[]), 422, "body");
    // 409: covered by stale lease / idempotency / already final tests; one more here.
    c.post("/v1/agent/devices", &device("emu-1"));
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let (_, l) = lease(&c, "emu-1", 1000);
    check(lease(&c, "emu-1", 0), 409, "conflict");
    let lid = l["id"].as_u64().unwrap();
    check(
        c.post(
            &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
            &json!({"tests": 3}),
        ),
        400,
        "bad_request",
    );
    assert_field(
        c.post(
            &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
            &json!({"passed": true, "tests": [
            {"title": "a", "file": "tests/a.spec.js", "status": "passed", "duration_ms": 1},
            {"title": "b", "file": "tests/a.spec.js", "status": "failed", "duration_ms": 1}]}),
        ),
        422,
        "tests[1].status",
    );
    // Nothing above changed the job.
    assert_eq!(job_state(&c, &id)["state"], "running");
    // A bad log offset is a 422 naming it, like a bad listing limit.
    let logged = submit(&c, "qualgent", "v1", "tests/logged.spec.js");
    assert_field(
        c.get(&format!("/v1/jobs/{logged}/logs?offset=abc")),
        422,
        "offset",
    );
}

#[test]
fn open_only_on_loopback_without_tokens() {
    use std::net::SocketAddr;
    let lo: SocketAddr = "127.0.0.1:7878".parse().unwrap();
    let lo6: SocketAddr = "[::1]:7878".parse().unwrap();
    let any: SocketAddr = "0.0.0.0:7878".parse().unwrap();
    let lan: SocketAddr = "192.168.1.20:7878".parse().unwrap();
    assert!(qgjob_http::open_mode(lo, 0).unwrap());
    assert!(qgjob_http::open_mode(lo6, 0).unwrap());
    assert!(!qgjob_http::open_mode(lo, 2).unwrap());
    assert!(!qgjob_http::open_mode(any, 1).unwrap());
    let err = qgjob_http::open_mode(any, 0).expect_err("must refuse");
    assert!(err.to_string().contains("without tokens"), "{err}");
    assert!(qgjob_http::open_mode(lan, 0).is_err());
}

fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut t = tar::Builder::new(enc);
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        t.append_data(&mut h, name, *data).unwrap();
    }
    t.into_inner().unwrap().finish().unwrap()
}

#[test]
fn artifact_round_trip_with_hash_check() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(sqlite_opts(dir.path()));
    let c = s.client(None);
    // Bigger than the JSON body limit: uploads stream under their own limit.
    let build: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = hex::encode(Sha256::digest(&build));
    let (st, v) = c.put_raw("/v1/apps/qualgent/xyz123", &build, &[]);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sha256"], digest.as_str());
    assert_eq!(v["size"], build.len());
    assert_eq!(v["created"], true);
    // Same bytes for another version: stored once.
    let (_, v) = c.put_raw("/v1/apps/qualgent/xyz124", &build, &[]);
    assert_eq!(v["created"], false);
    assert!(dir.path().join("artifacts/sha256").join(&digest).is_file());
    let (_, meta) = c.get("/v1/apps/qualgent/xyz123");
    assert_eq!(meta["sha256"], digest.as_str());
    let (_, meta) = c.get("/v1/agent/apps/qualgent/xyz124");
    assert_eq!(meta["sha256"], digest.as_str());
    let (st, h, got) = c.get_raw(&format!("/v1/agent/builds/{digest}"));
    assert_eq!(st, 200);
    assert_eq!(hex::encode(Sha256::digest(&got)), digest);
    assert_eq!(h.get("content-length").unwrap(), &build.len().to_string());
    let (_, _, got) = c.get_raw("/v1/apps/qualgent/xyz123/build");
    assert_eq!(got, build);

    // A declared digest that does not match the bytes is refused, and nothing is stored.
    let wrong = "0".repeat(64);
    assert_field(
        c.put_raw(
            "/v1/apps/qualgent/bad",
            b"other",
            &[("x-qgjob-sha256", &wrong)],
        ),
        422,
        "sha256",
    );
    assert_eq!(c.get("/v1/apps/qualgent/bad").0, 404);
    let tmp: Vec<_> = std::fs::read_dir(dir.path().join("artifacts/tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "no temp file is left behind");

    // Bundles: gzip only, content-addressed.
    let bundle = tar_gz(&[("tests/onboarding.spec.js", b"test('x', async () => {});")]);
    let bd = hex::encode(Sha256::digest(&bundle));
    let (st, v) = c.put_raw("/v1/bundles", &bundle, &[("x-qgjob-sha256", &bd)]);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["sha256"], bd.as_str());
    let (_, _, got) = c.get_raw(&format!("/v1/agent/bundles/{bd}"));
    assert_eq!(got, bundle);
    assert_field(
        c.put_raw("/v1/bundles", b"plain text is no bundle", &[]),
        422,
        "body",
    );
    assert_eq!(
        c.get_raw(&format!("/v1/agent/bundles/{}", "a".repeat(64)))
            .0,
        404
    );
    assert_eq!(c.get_raw("/v1/agent/bundles/..%2F..%2Fetc%2Fpasswd").0, 404);

    // The artifacts survive a restart.
    s.stop().unwrap();
    let s = TestServer::start(sqlite_opts(dir.path()));
    let c = s.client(None);
    let (_, meta) = c.get("/v1/apps/qualgent/xyz123");
    assert_eq!(meta["sha256"], digest.as_str());
    let (_, _, got) = c.get_raw(&format!("/v1/agent/builds/{digest}"));
    assert_eq!(got, build);
}

#[test]
fn job_events_are_pushed_until_final() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let watcher = c.clone();
    let path = format!("/v1/jobs/{id}/events");
    let w = std::thread::spawn(move || watcher.sse_events(&path, 10));
    // Wait until the watcher has its first event, so later changes are pushed to it.
    std::thread::sleep(std::time::Duration::from_millis(200));
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
        &json!({"passed": false, "error": "assertion failed"}),
    );
    let (st, events) = w.join().unwrap();
    assert_eq!(st, 200);
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["queued", "running", "failed"]);
    assert!(events.iter().all(|e| e["job_id"] == id.as_str()));

    // A watcher arriving after the end gets the final state and the stream ends.
    let (_, events) = c.sse_events(&format!("/v1/jobs/{id}/events"), 10);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["state"], "failed");
}

#[test]
fn run_events_end_when_every_job_is_final() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let (_, r) = c.post(
        "/v1/runs",
        &json!({"jobs": [spec("qualgent", "v1", "a.spec.js"), spec("qualgent", "v1", "b.spec.js")]}),
    );
    let run = r["run_id"].as_str().unwrap().to_string();
    let watcher = c.clone();
    let path = format!("/v1/runs/{run}/events");
    let w = std::thread::spawn(move || watcher.sse_events(&path, 50));
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (st, v) = c.post_empty(&format!("/v1/runs/{run}/cancel"));
    assert_eq!(st, 200, "{v}");
    let (_, events) = w.join().unwrap();
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["queued", "queued", "canceled", "canceled"]);
}

#[test]
fn restart_restores_queue_order_and_running_leases() {
    let dir = tempfile::tempdir().unwrap();
    restart_check(sqlite_opts(dir.path()));
}

/// The same restart check on PostgreSQL, in a fresh schema.
#[test]
fn restart_restores_from_postgres() {
    with_pg_schema("restart test", |pg_url, dir| {
        restart_check(pg_opts(pg_url, dir));
    });
}

/// Options for a server on PostgreSQL at `pg_url` with its artifacts under `dir`.
fn pg_opts(pg_url: &str, dir: &std::path::Path) -> ServerOptions {
    ServerOptions {
        store: qgjob_http::StoreKind::Postgres,
        postgres_url: Some(pg_url.to_string()),
        data_dir: Some(dir.to_path_buf()),
        ..ServerOptions::default()
    }
}

/// Runs `test` with the URL of a fresh PostgreSQL schema on `QGJOB_TEST_PG_URL` and a
/// temporary dir, then drops the schema. No server answering fails the test unless
/// `QGJOB_SKIP_PG=1` says to leave PostgreSQL out.
fn with_pg_schema(what: &str, test: impl FnOnce(&str, &std::path::Path)) {
    let url = common::pg_url();
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).unwrap();
    let schema = format!("qgjob_test_{}", hex::encode(rnd));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let made = rt.block_on(qgjob_http::store::PgStore::connect(&url, Some(&schema)));
    if let Err(e) = made {
        if std::env::var("QGJOB_SKIP_PG").is_ok_and(|v| v == "1") {
            eprintln!("QGJOB_SKIP_PG=1: skipping the PostgreSQL {what} ({url}: {e})");
            return;
        }
        panic!(
            "PostgreSQL not reachable at {url} ({e}); start it, point QGJOB_TEST_PG_URL at \
             one, or set QGJOB_SKIP_PG=1 to leave it out"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let pg_url = format!("{url}?options[search_path]={schema}");
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&pg_url, dir.path())));
    rt.block_on(async {
        if let Ok(pool) = sqlx::PgPool::connect(&url).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&pool)
                .await;
        }
    });
    if let Err(p) = res {
        std::panic::resume_unwind(p);
    }
}

/// Starts a server with `opts` and stops it at once: `Ok` when it could open its store.
fn try_serve(opts: ServerOptions) -> Result<(), qgjob_http::ServerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        qgjob_http::serve(listener, opts, async {}).await
    })
}

/// Two servers on one store would each restore their own scheduler and hand out the same
/// sequence numbers, so one's acknowledged jobs would overwrite the other's rows. The
/// second is refused while the first runs, loses nothing of the first's, and starts once
/// the first has stopped.
fn one_server_per_store(first_opts: ServerOptions, second_opts: ServerOptions) {
    let first = TestServer::start(first_opts.clone());
    let c = first.client(None);
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let err = try_serve(second_opts).expect_err("a second server on the same store");
    assert!(
        matches!(err, qgjob_http::ServerError::Unavailable(_)),
        "wrong error: {err}"
    );
    assert!(
        err.to_string().contains("in use by another qgjob server"),
        "{err}"
    );
    assert_eq!(job_state(&c, &id)["state"], "queued");
    first.stop().unwrap();
    let again = TestServer::start(first_opts);
    assert_eq!(job_state(&again.client(None), &id)["state"], "queued");
}

#[test]
fn a_data_dir_serves_one_server_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    one_server_per_store(sqlite_opts(dir.path()), sqlite_opts(dir.path()));
}

#[test]
fn a_postgres_store_serves_one_server_at_a_time() {
    with_pg_schema("lock test", |pg_url, dir| {
        // Separate data dirs: the lock in the database is what stops the second.
        let other = tempfile::tempdir().unwrap();
        one_server_per_store(pg_opts(pg_url, dir), pg_opts(pg_url, other.path()));
    });
}

/// A standby beside the server on `pg_url` (its own temporary dir, returned to be kept),
/// once it stands by.
fn standby_on(pg_url: &str) -> (TestServer, Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let standby = TestServer::spawn(ServerOptions {
        standby: true,
        ..pg_opts(pg_url, dir.path())
    });
    let c = standby.client(None);
    eventually(30, || (c.get("/readyz").0 == 503).then_some(()));
    (standby, c, dir)
}

/// The schema `pg_url` names, a runtime, and a pool on the database without that schema
/// (to look at or end sessions of the servers on it).
fn admin(pg_url: &str) -> (String, tokio::runtime::Runtime, sqlx::PgPool) {
    let schema = pg_url.rsplit('=').next().unwrap().to_string();
    let base = pg_url.split('?').next().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = rt.block_on(sqlx::PgPool::connect(&base)).unwrap();
    (schema, rt, pool)
}

/// Ends the session holding the store lock of the schema `pg_url` names; returns how many
/// sessions that was.
fn end_lock_session(pg_url: &str) -> i64 {
    let (schema, rt, pool) = admin(pg_url);
    rt.block_on(async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
             AND objid::bigint = (hashtext('qgjob:' || $1)::bigint & 4294967295)",
        )
        .bind(&schema)
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        n
    })
}

/// A standby on the same PostgreSQL store answers every request 503 `standby` (changing
/// nothing) while the primary runs, and takes over when it stops: acknowledged jobs, a
/// running lease and its log are all there, and the agent's next report under that lease
/// is accepted.
#[test]
fn a_standby_takes_over_when_the_primary_stops() {
    with_pg_schema("standby test", |pg_url, dir| {
        let primary = TestServer::start(pg_opts(pg_url, dir));
        let c = primary.client(None);
        let (ids, lid) = first_job_running_with_log(&c, 3, b"before the failover\n");
        // A build of several 1 MiB parts, which the standby must serve too.
        let build: Vec<u8> = (0..2_500_000u32).map(|i| (i * 13 % 251) as u8).collect();
        assert_eq!(c.put_raw("/v1/apps/qualgent/v1", &build, &[]).0, 200);

        let (standby, sc, _other) = standby_on(pg_url);
        let (_, ready) = sc.get("/readyz");
        assert_eq!(ready["error"]["code"], "standby", "{ready}");
        // Alive all the same (a liveness probe must not restart it), and it says so.
        let (st, health) = sc.get("/healthz");
        assert_eq!((st, health["status"].as_str()), (200, Some("standby")));
        let (st, _, metrics) = sc.get_raw("/metrics");
        assert_eq!(st, 200);
        assert!(String::from_utf8_lossy(&metrics).contains("qgjob_standby 1"));
        let (st, v) = sc.post("/v1/jobs", &spec("qualgent", "v1", "tests/lost.spec.js"));
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (503, Some("standby")),
            "{v}"
        );
        let (st, _, _) = sc.get_raw(&format!("/v1/jobs/{}", ids[1]));
        assert_eq!(st, 503);
        // The primary still serves, alone.
        assert_eq!(job_state(&c, &ids[1])["state"], "queued");

        primary.stop().unwrap();
        // Taking over, the standby starts like a restarted server: a keep-alive connection
        // from its standby time may be closed under a request, which a client retries.
        eventually(30, || (sc.try_get("/readyz")?.0 == 200).then_some(()));
        let (_, _, metrics) = sc.get_raw("/metrics");
        assert!(String::from_utf8_lossy(&metrics).contains("qgjob_standby 0"));
        assert_eq!(job_state(&sc, &ids[0])["state"], "running");
        assert_eq!(job_state(&sc, &ids[1])["state"], "queued");
        let (_, _, log) = sc.get_raw(&format!("/v1/jobs/{}/logs", ids[0]));
        assert_eq!(log, b"before the failover\n");
        let (st, _, got) = sc.get_raw("/v1/apps/qualgent/v1/build");
        assert_eq!(st, 200);
        assert!(
            got == build,
            "the standby serves the build the primary stored"
        );
        // The agent finds the new server and reports under the lease it had.
        sc.post("/v1/agent/devices", &device("emu-1"));
        let (st, v) = sc.post(
            &format!("/v1/agent/leases/{lid}/jobs/{}/complete", ids[0]),
            &json!({"passed": true}),
        );
        assert_eq!(st, 200, "{v}");
        assert_eq!(job_state(&sc, &ids[0])["state"], "passed");
        // What the standby refused was not created.
        let (_, page) = sc.get("/v1/jobs?limit=100");
        assert_eq!(page["jobs"].as_array().unwrap().len(), 3, "{page}");
        standby.stop().unwrap();
    });
}

/// On PostgreSQL artifacts live in the database; those an earlier release kept under the
/// data dir are imported at start, so builds uploaded before the upgrade still download.
#[test]
fn a_postgres_server_imports_artifacts_an_earlier_release_kept_on_disk() {
    with_pg_schema("artifact import test", |pg_url, dir| {
        let build = b"an apk uploaded before the upgrade".to_vec();
        let digest = hex::encode(Sha256::digest(&build));
        let old = dir.join("artifacts/sha256");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join(&digest), &build).unwrap();
        let s = TestServer::start(pg_opts(pg_url, dir));
        let c = s.client(None);
        let (st, _, got) = c.get_raw(&format!("/v1/agent/builds/{digest}"));
        assert_eq!((st, got), (200, build.clone()));
        s.stop().unwrap();
        // From the database now: the files are not needed any more.
        std::fs::remove_dir_all(dir.join("artifacts")).unwrap();
        let s = TestServer::start(pg_opts(pg_url, dir));
        let (st, _, got) = s
            .client(None)
            .get_raw(&format!("/v1/agent/builds/{digest}"));
        assert_eq!((st, got), (200, build));
    });
}

/// A write the first server began before it lost the store (it passed its lock check,
/// then stalled) must not commit behind the standby's back: the standby ends the first
/// server's sessions and waits for its transactions before it restores, so the stalled
/// submit is never acknowledged, and the standby's own writes go on.
#[test]
fn a_write_in_flight_when_the_store_changes_hands_is_not_acknowledged() {
    use sqlx::Connection as _;
    with_pg_schema("takeover race test", |pg_url, dir| {
        let first = TestServer::start(pg_opts(pg_url, dir));
        let c = first.client(None);
        let before = submit(&c, "qualgent", "v1", "tests/before.spec.js");
        let (standby, sc, _other) = standby_on(pg_url);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Stall the first server's next run submission after its jobs are inserted: the
        // run row waits on this lock.
        let mut admin = rt.block_on(sqlx::PgConnection::connect(pg_url)).unwrap();
        rt.block_on(async {
            sqlx::query("BEGIN").execute(&mut admin).await.unwrap();
            sqlx::query("LOCK TABLE runs IN SHARE MODE")
                .execute(&mut admin)
                .await
                .unwrap();
        });
        let base_url = first.base.clone();
        let stalled = std::thread::spawn(move || {
            let c = Client::new(&base_url, None);
            c.try_post(
                "/v1/runs",
                &json!({"jobs": [spec("qualgent", "v1", "tests/stalled.spec.js")]}),
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        // The stalled write holds the write fence, shared.
        let schema = pg_url.rsplit('=').next().unwrap().to_string();
        let fenced: i64 = rt.block_on(async {
            let mut c = sqlx::PgConnection::connect(pg_url).await.unwrap();
            sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND mode = 'ShareLock' AND objsubid = 1 \
                 AND objid::bigint = (hashtext('qgjob:write:' || $1)::bigint & 4294967295)",
            )
            .bind(&schema)
            .fetch_one(&mut c)
            .await
            .unwrap()
        });
        assert_eq!(fenced, 1, "the stalled write holds the fence");
        // The first server's lock session ends (as when its machine drops off the network).
        assert_eq!(end_lock_session(pg_url), 1);
        eventually(30, || (sc.get("/readyz").0 == 200).then_some(()));
        rt.block_on(async {
            sqlx::query("ROLLBACK").execute(&mut admin).await.unwrap();
        });
        let answer = stalled.join().unwrap();
        assert!(
            answer.as_ref().is_none_or(|(st, _)| *st >= 500),
            "the stalled submit was acknowledged: {answer:?}"
        );
        // Only what the first server acknowledged is there, and the standby goes on.
        let (_, page) = sc.get("/v1/jobs?limit=100");
        let ids: Vec<&str> = page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [before.as_str()], "{page}");
        let after = submit(&sc, "qualgent", "v1", "tests/after.spec.js");
        assert_eq!(job_state(&sc, &after)["state"], "queued");
        assert_eq!(sc.get("/readyz").0, 200);
        let _ = first.stop();
        standby.stop().unwrap();
    });
}

/// A standby whose configuration could not serve (here a bad tokens file) is refused when
/// it starts, not when it is needed.
#[test]
fn a_misconfigured_standby_is_refused_at_once() {
    with_pg_schema("standby config test", |pg_url, dir| {
        let primary = TestServer::start(pg_opts(pg_url, dir));
        let other = tempfile::tempdir().unwrap();
        let tokens = other.path().join("tokens");
        std::fs::write(&tokens, "superuser x\n").unwrap();
        let err = try_serve(ServerOptions {
            standby: true,
            tokens_file: Some(tokens),
            ..pg_opts(pg_url, other.path())
        })
        .expect_err("a bad tokens file");
        assert!(
            matches!(err, qgjob_http::ServerError::Config(_)),
            "wrong error: {err}"
        );
        primary.stop().unwrap();
    });
}

/// A standby told to stop before it took over stops at once and cleanly, and leaves the
/// primary serving.
#[test]
fn a_standby_stops_while_standing_by() {
    with_pg_schema("standby stop test", |pg_url, dir| {
        let primary = TestServer::start(pg_opts(pg_url, dir));
        let (standby, _, _other) = standby_on(pg_url);
        standby.stop().unwrap();
        let c = primary.client(None);
        submit(&c, "qualgent", "v1", "tests/a.spec.js");
        primary.stop().unwrap();
    });
}

/// A server whose database session (and with it the store's lock) ends stops within a
/// few seconds, even with nothing to write, so it never answers beside the standby that
/// takes over; the standby then serves everything the first acknowledged.
#[test]
fn a_server_that_loses_the_store_lock_stops_and_the_standby_takes_over() {
    with_pg_schema("lock loss test", |pg_url, dir| {
        let first = TestServer::start(pg_opts(pg_url, dir));
        let c = first.client(None);
        let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
        let (standby, sc, _other) = standby_on(pg_url);

        // End the lock holder's session, as the database does when the server's machine
        // stops answering its keepalives.
        assert_eq!(
            end_lock_session(pg_url),
            1,
            "exactly one session held the store's lock"
        );

        // The first server stops on its own, saying why.
        eventually(30, || {
            c.try_get("/readyz")
                .is_none_or(|(st, _)| st != 200)
                .then_some(())
        });
        let err = first.stop().expect_err("stops on losing the lock");
        assert!(err.to_string().contains("lost the store's lock"), "{err}");
        eventually(30, || (sc.get("/readyz").0 == 200).then_some(()));
        assert_eq!(job_state(&sc, &id)["state"], "queued");
        standby.stop().unwrap();
    });
}

/// The sessions on which standbys of the store `pg_url` names wait for its lock (their
/// `application_name` says `standby`), each with the time its last query began, and the
/// database's clock; with `end`, ends them (and returns those it ended).
fn standby_sessions(pg_url: &str, end: bool) -> (f64, BTreeMap<i32, f64>) {
    let (schema, rt, pool) = admin(pg_url);
    rt.block_on(async {
        let now: f64 = sqlx::query_scalar("SELECT extract(epoch FROM clock_timestamp())::float8")
            .fetch_one(&pool)
            .await
            .unwrap();
        let rows: Vec<(i32, f64, bool)> = sqlx::query_as(
            "SELECT pid, extract(epoch FROM query_start)::float8, \
             CASE WHEN $2 THEN pg_terminate_backend(pid) ELSE true END \
             FROM pg_stat_activity \
             WHERE application_name LIKE 'qgjob ' || left(md5($1), 8) || ' standby %'",
        )
        .bind(&schema)
        .bind(end)
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        assert!(rows.iter().all(|(_, _, ok)| *ok), "{rows:?}");
        (now, rows.into_iter().map(|(pid, q, _)| (pid, q)).collect())
    })
}

/// The pids of [`standby_sessions`].
fn pids(sessions: &BTreeMap<i32, f64>) -> BTreeSet<i32> {
    sessions.keys().copied().collect()
}

/// Asserts that the server `c` talks to stands by.
fn stands_by(c: &Client) {
    let (st, v) = c.get("/readyz");
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (503, Some("standby")),
        "{v}"
    );
    let (st, v) = c.get("/healthz");
    assert_eq!((st, v["status"].as_str()), (200, Some("standby")), "{v}");
}

/// One server and two standbys on one store. When the server stops, exactly one standby
/// takes over. It ends the store's sessions that are not its own (the other standby's
/// pooled connection among them) but not the other standby's lock session: that one goes
/// on standing by, and gets over its lock session ending too. When the second server
/// loses its lock, that standby takes over with every job either server acknowledged.
#[test]
fn two_standbys_take_over_one_after_the_other() {
    with_pg_schema("two standbys test", |pg_url, dir| {
        let first = TestServer::start(pg_opts(pg_url, dir));
        let c = first.client(None);
        let mut ids: Vec<String> = (0..3)
            .map(|i| submit(&c, "qualgent", "v1", &format!("tests/first-{i}.spec.js")))
            .collect();
        let (s1, c1, _d1) = standby_on(pg_url);
        let (s2, c2, _d2) = standby_on(pg_url);
        // Their lock sessions: the two that ask for the lock from now on (the session
        // each tried the lock on as it started may still be listed, ending).
        let (since, _) = standby_sessions(pg_url, false);
        let waiting = eventually(30, || {
            let (_, s) = standby_sessions(pg_url, false);
            (s.len() == 2 && s.values().all(|q| *q > since)).then(|| pids(&s))
        });
        stands_by(&c1);
        stands_by(&c2);
        // The first server still serves, alone.
        ids.push(submit(&c, "qualgent", "v1", "tests/first-3.spec.js"));

        first.stop().unwrap();
        let one = eventually(30, || match (c1.get("/readyz").0, c2.get("/readyz").0) {
            (200, 200) => panic!("two standbys serve one store"),
            (200, _) => Some(true),
            (_, 200) => Some(false),
            _ => None,
        });
        let (second, sc, last, lc) = if one {
            (s1, c1, s2, c2)
        } else {
            (s2, c2, s1, c1)
        };
        // The other still stands by, on the same lock session: the takeover did not end it.
        stands_by(&lc);
        let left = pids(&standby_sessions(pg_url, false).1);
        assert_eq!(left.len(), 1, "{left:?} of {waiting:?}");
        assert!(left.is_subset(&waiting), "{left:?} of {waiting:?}");
        for id in &ids {
            assert_eq!(job_state(&sc, id)["state"], "queued");
        }
        ids.extend(
            (0..2).map(|i| submit(&sc, "qualgent", "v1", &format!("tests/second-{i}.spec.js"))),
        );
        stands_by(&lc);

        // Its lock session ends (the database or an operator ended it): it asks again on
        // a new one.
        assert_eq!(pids(&standby_sessions(pg_url, true).1), left);
        stands_by(&lc);
        eventually(30, || {
            let s = pids(&standby_sessions(pg_url, false).1);
            (s.len() == 1 && s.is_disjoint(&left)).then_some(())
        });
        stands_by(&lc);
        ids.push(submit(&sc, "qualgent", "v1", "tests/second-2.spec.js"));

        // The second server loses its lock: it stops, and the last standby takes over.
        assert_eq!(end_lock_session(pg_url), 1);
        eventually(30, || {
            sc.try_get("/readyz")
                .is_none_or(|(st, _)| st != 200)
                .then_some(())
        });
        let err = second.stop().expect_err("stops on losing the lock");
        assert!(err.to_string().contains("lost the store's lock"), "{err}");
        eventually(30, || (lc.get("/readyz").0 == 200).then_some(()));
        for id in &ids {
            assert_eq!(job_state(&lc, id)["state"], "queued");
        }
        let (_, page) = lc.get("/v1/jobs?limit=100");
        assert_eq!(page["jobs"].as_array().unwrap().len(), ids.len(), "{page}");
        let id = submit(&lc, "qualgent", "v1", "tests/last.spec.js");
        assert_eq!(job_state(&lc, &id)["state"], "queued");
        last.stop().unwrap();
    });
}

/// The sessions of servers of the store `pg_url` names (named like a serving server's,
/// not a standby's lock session) that wait for a table lock.
fn server_sessions_waiting_on_a_lock(pg_url: &str) -> BTreeSet<i32> {
    let (schema, rt, pool) = admin(pg_url);
    rt.block_on(async {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND application_name LIKE 'qgjob ' || left(md5($1), 8) || ' %' \
             AND application_name NOT LIKE 'qgjob ' || left(md5($1), 8) || ' standby %'",
        )
        .bind(&schema)
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        pids.into_iter().collect()
    })
}

/// A standby still starting when another server takes the store over works on pooled
/// connections named like a serving server's, so the takeover ends them (here while the
/// standby reads the schema version, held up by a lock on `meta`). It starts again and
/// stands by rather than exit, and takes over in its turn.
#[test]
fn a_standby_starting_during_a_takeover_stands_by() {
    with_pg_schema("starting standby test", |pg_url, dir| {
        let first = TestServer::start(pg_opts(pg_url, dir));
        let id = submit(&first.client(None), "qualgent", "v1", "tests/a.spec.js");
        let (s1, c1, _d1) = standby_on(pg_url);

        // Held open: a server starting now waits in its schema-version check.
        let (schema, rt, pool) = admin(pg_url);
        let mut meta = rt.block_on(pool.begin()).unwrap();
        rt.block_on(
            sqlx::query(&format!(
                "LOCK TABLE {schema}.meta IN ACCESS EXCLUSIVE MODE"
            ))
            .execute(&mut *meta),
        )
        .unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let s2 = TestServer::spawn(ServerOptions {
            standby: true,
            ..pg_opts(pg_url, d2.path())
        });
        let starting = eventually(30, || {
            let s = server_sessions_waiting_on_a_lock(pg_url);
            (s.len() == 1).then_some(s)
        });

        // The first server stops; the standby takes over and ends the starting one's
        // session (then waits for `meta` itself, to restore).
        first.stop().unwrap();
        eventually(30, || {
            server_sessions_waiting_on_a_lock(pg_url)
                .is_disjoint(&starting)
                .then_some(())
        });
        rt.block_on(meta.rollback()).unwrap();
        rt.block_on(pool.close());

        eventually(30, || (c1.get("/readyz").0 == 200).then_some(()));
        assert_eq!(job_state(&c1, &id)["state"], "queued");
        let c2 = s2.client(None);
        eventually(30, || {
            if s2.finished() {
                return Some(());
            }
            c2.try_get("/readyz")
                .is_some_and(|(st, _)| st == 503)
                .then_some(())
        });
        if s2.finished() {
            panic!("the starting standby stopped: {:?}", s2.stop());
        }
        stands_by(&c2);

        s1.stop().unwrap();
        eventually(30, || (c2.get("/readyz").0 == 200).then_some(()));
        assert_eq!(job_state(&c2, &id)["state"], "queued");
        s2.stop().unwrap();
    });
}

/// The scheduler's id generator is seeded: a server seeds it afresh on every start, so
/// the random part of job ids does not repeat from one run (or one server) to the next.
#[test]
fn job_ids_do_not_repeat_between_server_runs() {
    let random_part = |id: &str| id[14..].to_string();
    let first: Vec<String> = (0..2)
        .map(|_| {
            let s = TestServer::start(memory_opts());
            random_part(&submit(
                &s.client(None),
                "qualgent",
                "v1",
                "tests/a.spec.js",
            ))
        })
        .collect();
    assert_ne!(first[0], first[1]);
}

/// Submits `n` jobs, leases the first to device `emu-1` and appends `log` to it; returns
/// the jobs' ids and the lease id.
fn first_job_running_with_log(c: &Client, n: usize, log: &[u8]) -> (Vec<String>, u64) {
    let ids: Vec<String> = (0..n)
        .map(|i| submit(c, "qualgent", "v1", &format!("tests/{i}.spec.js")))
        .collect();
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    assert_eq!(l["jobs"][0]["id"], ids[0].as_str());
    let (st, _) = c.post_raw(&format!("/v1/agent/leases/{lid}/jobs/{}/logs", ids[0]), log);
    assert_eq!(st, 204);
    (ids, lid)
}

/// The content type of a log answer.
fn content_type(h: &ureq::http::HeaderMap) -> &str {
    h.get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
}

/// A log answer says UTF-8 only when its bytes are: an agent may write any bytes (a device
/// printing Latin-1, a binary dump), and those are served as they are, as
/// `application/octet-stream`. A UTF-8 log stays text however it is cut into pieces, by an
/// `offset` or by the answer's size limit, even mid-character.
#[test]
fn logs_are_labelled_utf8_only_when_they_are() {
    const TEXT: &str = "utf-8";
    const BYTES: &str = "application/octet-stream";
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let utf8 = "héllo wörld ✓ 😀\n".as_bytes();
    let (ids, lid) = first_job_running_with_log(&c, 1, utf8);
    let logs = format!("/v1/jobs/{}/logs", ids[0]);
    // Every offset, including those inside a character.
    for off in 0..=utf8.len() {
        let (st, h, body) = c.get_raw(&format!("{logs}?offset={off}"));
        assert_eq!((st, body.as_slice()), (200, &utf8[off..]), "offset {off}");
        assert_eq!(
            content_type(&h),
            "text/plain; charset=utf-8",
            "offset {off}"
        );
    }
    // A log still being written may end mid-character: `é` is 0xC3 0xA9.
    let upload = format!("/v1/agent/leases/{lid}/jobs/{}/logs", ids[0]);
    assert_eq!(c.post_raw(&upload, b"caf\xc3").0, 204);
    let (_, h, _) = c.get_raw(&logs);
    assert!(content_type(&h).ends_with(TEXT), "{h:?}");
    assert_eq!(c.post_raw(&upload, b"\xa9\n").0, 204);

    // Latin-1 (`è` is 0xE8 there), then valid text again.
    let latin1 = b"cr\xe8me br\xfbl\xe9e\n";
    assert_eq!(c.post_raw(&upload, latin1).0, 204);
    assert_eq!(c.post_raw(&upload, b"done\n").0, 204);
    let mut whole = utf8.to_vec();
    whole.extend_from_slice("café\n".as_bytes());
    whole.extend_from_slice(latin1);
    whole.extend_from_slice(b"done\n");
    let (st, h, body) = c.get_raw(&logs);
    assert_eq!((st, &body), (200, &whole));
    assert_eq!(content_type(&h), BYTES);
    let at_latin1 = whole.len() - latin1.len() - 5;
    let (_, h, body) = c.get_raw(&format!("{logs}?offset={at_latin1}"));
    assert_eq!(body, [&latin1[..], b"done\n"].concat());
    assert_eq!(content_type(&h), BYTES);
    // Each answer is judged on its own bytes: the piece after the Latin-1 is text.
    let (_, h, body) = c.get_raw(&format!("{logs}?offset={}", whole.len() - 5));
    assert_eq!(body, b"done\n");
    assert!(content_type(&h).ends_with(TEXT), "{h:?}");

    // A UTF-8 log longer than one answer, split inside `é` by the answer's size limit:
    // both pieces are text.
    let max = qgjob_http::api::MAX_LOG_ANSWER;
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let (ids, lid) = first_job_running_with_log(&c, 1, &vec![b'a'; max - 1]);
    let upload = format!("/v1/agent/leases/{lid}/jobs/{}/logs", ids[0]);
    assert_eq!(c.post_raw(&upload, "éé\n".as_bytes()).0, 204);
    let logs = format!("/v1/jobs/{}/logs", ids[0]);
    let (_, h, first) = c.get_raw(&logs);
    assert_eq!((first.len(), first.last()), (max, Some(&0xC3)));
    assert!(content_type(&h).ends_with(TEXT), "{h:?}");
    let (_, h, rest) = c.get_raw(&format!("{logs}?offset={max}"));
    assert_eq!(rest, b"\xa9\xc3\xa9\n");
    assert!(content_type(&h).ends_with(TEXT), "{h:?}");

    // The OpenAPI document names both answers.
    let (_, doc) = c.get("/openapi.json");
    let answer = &doc["paths"]["/v1/jobs/{job_id}/logs"]["get"]["responses"]["200"]["content"];
    assert!(answer["text/plain; charset=utf-8"].is_object(), "{answer}");
    assert!(answer[BYTES].is_object(), "{answer}");
}

fn restart_check(opts: ServerOptions) {
    let s = TestServer::start(opts.clone());
    let c = s.client(None);
    let (ids, lid) = first_job_running_with_log(&c, 4, b"hello\n");
    s.stop().unwrap();

    let s = TestServer::start(opts);
    let c = s.client(None);
    assert_eq!(job_state(&c, &ids[0])["state"], "running");
    for id in &ids[1..] {
        assert_eq!(job_state(&c, id)["state"], "queued");
    }
    let (_, _, log) = c.get_raw(&format!("/v1/jobs/{}/logs", ids[0]));
    assert_eq!(log, b"hello\n");
    // The agent comes back: its device registers again and reports under the old lease.
    c.post("/v1/agent/devices", &device("emu-1"));
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{}/complete", ids[0]),
        &json!({"passed": true}),
    );
    assert_eq!(st, 200, "{v}");
    // Queued jobs come out in their original order; new jobs get new, later seqs.
    let newer = submit(&c, "qualgent", "v1", "tests/new.spec.js");
    let mut order = Vec::new();
    for _ in 0..4 {
        let (_, l) = lease(&c, "emu-1", 1000);
        let lid = l["id"].as_u64().unwrap();
        let jid = l["jobs"][0]["id"].as_str().unwrap().to_string();
        c.post(
            &format!("/v1/agent/leases/{lid}/jobs/{jid}/complete"),
            &json!({"passed": true}),
        );
        order.push(jid);
    }
    let mut want: Vec<String> = ids[1..].to_vec();
    want.push(newer);
    assert_eq!(order, want);
    // Listed in submission order, the job submitted after the restart last.
    let (_, page) = c.get("/v1/jobs?limit=1000");
    let listed: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    let mut all = ids.clone();
    all.push(want[want.len() - 1].clone());
    assert_eq!(listed, all);
}

#[test]
fn tokens_file_and_admin_tokens_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("tokens");
    let mut f = std::fs::File::create(&tf).unwrap();
    writeln!(f, "# operators\nadmin {ADMIN}\nagent {AGENT}").unwrap();
    drop(f);
    let opts = ServerOptions {
        tokens_file: Some(tf.clone()),
        ..sqlite_opts(&dir.path().join("data"))
    };
    let s = TestServer::start(opts.clone());
    let admin = s.client(Some(ADMIN));
    let (st, t) = admin.post(
        "/v1/admin/tokens",
        &json!({"kind": "org", "org_id": "acme"}),
    );
    assert_eq!(st, 201);
    let token = t["token"].as_str().unwrap().to_string();
    s.stop().unwrap();
    // The database holds only the digest of the token.
    let db = std::fs::read(dir.path().join("data/qgjob.sqlite3")).unwrap();
    let wal = std::fs::read(dir.path().join("data/qgjob.sqlite3-wal")).unwrap_or_default();
    let needle = token.as_bytes();
    assert!(!db.windows(needle.len()).any(|w| w == needle));
    assert!(!wal.windows(needle.len()).any(|w| w == needle));

    let s = TestServer::start(opts);
    let acme = s.client(Some(&token));
    submit(&acme, "acme", "v1", "tests/a.spec.js");
    drop(s);

    // One secret listed twice (here as admin and as an org's) is a configuration error.
    let mut f = std::fs::File::create(&tf).unwrap();
    writeln!(f, "admin {ADMIN}\norg acme {ADMIN}").unwrap();
    drop(f);
    let e = qgjob_http::TokenSpec::load_file(&tf)
        .unwrap_err()
        .to_string();
    assert!(e.contains(":2:") && e.contains("already listed"), "{e}");
}

#[test]
fn openapi_lists_every_endpoint_and_metrics_render() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let (st, doc) = c.get("/openapi.json");
    assert_eq!(st, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path) in [
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs"),
        ("post", "/v1/runs"),
        ("get", "/v1/jobs/{job_id}/events"),
        ("post", "/v1/agent/lease"),
        ("post", "/v1/agent/leases/{lease_id}/jobs/{job_id}/complete"),
        ("put", "/v1/bundles"),
        ("get", "/metrics"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    // The agent protocol's sessions are described.
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("DeviceInfo", "session"),
        ("DeviceInfo", "replaces"),
        ("LeaseRequest", "session"),
    ] {
        assert!(
            schemas[schema]["properties"][field].is_object(),
            "{schema}.{field}"
        );
    }
    let delete = &doc["paths"]["/v1/agent/devices/{device_id}"]["delete"];
    assert!(
        delete["parameters"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["name"] == "session")),
        "{delete}"
    );
    // Every documented route is really served: no fallback 404 or 405 for any of them.
    let uuid = "0190b2a4-1c1f-7a31-9b5e-3c1d2e4f5a6b";
    for (method, path, _, _, body, _) in qgjob_http::ops::ROUTES {
        let p = path
            .replace("{job_id}", uuid)
            .replace("{run_id}", uuid)
            .replace("{lease_id}", "1")
            .replace("{org_id}", "qualgent")
            .replace("{app_version_id}", "v1")
            .replace("{device_id}", "emu-9")
            .replace("{sha256}", &"a".repeat(64));
        let (st, v) = match *method {
            "get" if p.ends_with("/events") => (c.sse_events(&p, 1).0, Value::Null),
            "get" => c.get(&p),
            // Bodies only where the endpoint reads one (an unread body may cost the
            // connection).
            "post" if body.is_empty() => c.post_empty(&p),
            "post" => c.post_raw(&p, b"{}"),
            "put" => c.put_raw(&p, b"x", &[]),
            "delete" => c.delete(&p),
            other => panic!("unexpected method {other}"),
        };
        assert_ne!(st, 405, "{method} {path}: {v}");
        assert_ne!(v["error"]["message"], "no such endpoint", "{method} {path}");
    }
    assert_eq!(c.get("/healthz").1["status"], "ok");

    submit(&c, "qualgent", "v1", "tests/a.spec.js");
    c.post("/v1/agent/devices", &device("emu-1"));
    lease(&c, "emu-1", 1000);
    let (st, m) = c.get("/metrics");
    assert_eq!(st, 200);
    let m = m.as_str().unwrap();
    assert!(
        m.contains("qgjob_jobs{target=\"emulator\",state=\"running\"} 1"),
        "{m}"
    );
    assert!(m.contains("qgjob_jobs_submitted_total 1"));
    assert!(m.contains("qgjob_installs_total 1"));
    assert!(m.contains("qgjob_active_leases 1"));
    assert!(m.contains("qgjob_dispatch_latency_seconds_count 1"));
}

#[test]
fn graceful_shutdown_ends_long_polls_and_streams_and_keeps_acknowledged_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(sqlite_opts(dir.path()));
    let c = s.client(None);
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    c.post("/v1/agent/devices", &device("emu-1"));
    c.post("/v1/agent/devices", &device("emu-2"));
    let (_, l) = lease(&c, "emu-1", 1000);
    assert_eq!(l["jobs"][0]["id"], id.as_str());
    // A watcher on a running job and an idle agent's long poll, both open at shutdown.
    let w = {
        let c = c.clone();
        let path = format!("/v1/jobs/{id}/events");
        std::thread::spawn(move || c.sse_events(&path, 10))
    };
    let p = {
        let c = c.clone();
        std::thread::spawn(move || lease(&c, "emu-2", 50_000))
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    s.stop().expect("clean stop");
    let (st, events) = w.join().unwrap();
    assert_eq!(st, 200);
    assert_eq!(
        events.len(),
        1,
        "only the current state was sent: {events:?}"
    );
    assert_eq!(p.join().unwrap().0, 204);

    let s = TestServer::start(sqlite_opts(dir.path()));
    assert_eq!(job_state(&s.client(None), &id)["state"], "running");
}

#[test]
fn uploads_over_the_limit_get_413_and_store_nothing() {
    let s = TestServer::start(ServerOptions {
        limits: qgjob_http::Limits {
            artifact_bytes: 1000,
            log_bytes: 10,
            ..qgjob_http::Limits::default()
        },
        ..memory_opts()
    });
    let c = s.client(None);
    let (st, v) = c.put_raw("/v1/apps/qualgent/big", &[7u8; 5000], &[]);
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (413, json!("too_large")),
        "{v}"
    );
    assert_eq!(c.get("/v1/apps/qualgent/big").0, 404);
    let digest = hex::encode(Sha256::digest([7u8; 5000]));
    assert_eq!(c.get_raw(&format!("/v1/agent/builds/{digest}")).0, 404);
    // Exactly at the limit is fine.
    assert_eq!(c.put_raw("/v1/apps/qualgent/ok", &[7u8; 1000], &[]).0, 200);

    // A job's log stops at its limit; what was appended stays.
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    let path = format!("/v1/agent/leases/{lid}/jobs/{id}/logs");
    assert_eq!(c.post_raw(&path, b"12345678").0, 204);
    let (st, v) = c.post_raw(&path, b"too much");
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (413, json!("too_large")),
        "{v}"
    );
    assert_eq!(c.get_raw(&format!("/v1/jobs/{id}/logs")).2, b"12345678");
}

/// A SQLite server whose scheduler forgets finished jobs at once (retention 0), so only the
/// store can answer for them.
fn forgetful_sqlite_opts(dir: &std::path::Path) -> ServerOptions {
    ServerOptions {
        limits: qgjob_http::Limits {
            retention_ms: 0,
            ..qgjob_http::Limits::default()
        },
        ..sqlite_opts(dir)
    }
}

/// Lease ids are fencing tokens: after a restart, none is issued again, even when the jobs
/// that held the newest ones finished long ago and are not restored.
#[test]
fn lease_ids_are_never_reissued_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = forgetful_sqlite_opts(dir.path());
    let s = TestServer::start(opts.clone());
    let c = s.client(None);
    let ids: Vec<String> = (0..3)
        .map(|i| submit(&c, "qualgent", "v1", &format!("tests/{i}.spec.js")))
        .collect();
    c.post("/v1/agent/devices", &device("emu-1"));
    let mut old = Vec::new();
    for id in &ids[..2] {
        let (_, l) = lease(&c, "emu-1", 1000);
        let lid = l["id"].as_u64().unwrap();
        assert_eq!(l["jobs"][0]["id"], id.as_str());
        let (st, v) = c.post(
            &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
            &json!({"passed": true}),
        );
        assert_eq!(st, 200, "{v}");
        old.push(lid);
    }
    s.stop().unwrap();
    // Retention 0: only the queued third job is restored, and it never held a lease.
    std::thread::sleep(std::time::Duration::from_millis(5));

    let s = TestServer::start(opts);
    let c = s.client(None);
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(&c, "emu-1", 1000);
    assert_eq!(l["jobs"][0]["id"], ids[2].as_str());
    let lid = l["id"].as_u64().unwrap();
    assert!(
        old.iter().all(|&o| lid > o),
        "lease {lid} reissued after {old:?}"
    );
    // A late heartbeat from an agent still holding an old lease extends nothing.
    for o in &old {
        let (st, _) = c.post_empty(&format!("/v1/agent/leases/{o}/heartbeat"));
        assert_eq!(st, 409, "old lease {o}");
    }
}

#[test]
fn finished_jobs_forgotten_by_the_scheduler_are_served_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(forgetful_sqlite_opts(dir.path()));
    let c = s.client(None);
    let (_, r) = c.post(
        "/v1/runs",
        &json!({"jobs": [spec("qualgent", "v1", "a.spec.js")]}),
    );
    let run = r["run_id"].as_str().unwrap().to_string();
    let id = r["job_ids"][0].as_str().unwrap().to_string();
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    let report = json!({"passed": true, "tests": [{"title": "t", "status": "passed"}]});
    c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
        &report,
    );
    // The timer drops the finished job from memory...
    all_forgotten(&c);
    // ...and every read still finds it, from the store.
    let j = job_state(&c, &id);
    assert_eq!(j["state"], "passed");
    assert_eq!(
        c.get(&format!("/v1/jobs/{id}/results")).1["tests"][0]["title"],
        "t"
    );
    assert_eq!(c.get(&format!("/v1/runs/{run}")).1["status"], "passed");
    let (_, page) = c.get("/v1/jobs?state=passed");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    let (st, v) = c.post_empty(&format!("/v1/jobs/{id}/cancel"));
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("already_final"))
    );
    let (_, events) = c.sse_events(&format!("/v1/jobs/{id}/events"), 5);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["state"], "passed");
}

#[test]
fn idempotency_keys_still_match_jobs_the_scheduler_forgot() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(forgetful_sqlite_opts(dir.path()));
    let c = s.client(None);
    let mut sp = spec("qualgent", "v1", "tests/a.spec.js");
    sp["idempotency_key"] = json!("build-7/a");
    let (st, v) = c.post("/v1/jobs", &sp);
    assert_eq!(st, 201);
    let id = v["job_id"].as_str().unwrap().to_string();
    c.post("/v1/agent/devices", &device("emu-1"));
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
        &json!({"passed": true}),
    );
    all_forgotten(&c);
    // The same submit again: the finished job, not a new one.
    let (st, v) = c.post("/v1/jobs", &sp);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["job_id"], id.as_str());
    assert_eq!(
        (v["created"].clone(), v["status"].clone()),
        (json!(false), json!("passed"))
    );
    // The same key for another spec is a conflict.
    let mut other = sp.clone();
    other["tests"] = json!(["tests/b.spec.js"]);
    let (st, v) = c.post("/v1/jobs", &other);
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("conflict")),
        "{v}"
    );
    // A run cannot take in a job submitted on its own (a job belongs to one run), so a run
    // mixing it with a new job is refused, naming it; a bad job is named by its place in
    // the request.
    let fresh = spec("qualgent", "v1", "tests/c.spec.js");
    let (st, r) = c.post("/v1/runs", &json!({"jobs": [fresh, sp]}));
    assert_eq!(
        (st, r["error"]["code"].clone()),
        (409, json!("conflict")),
        "{r}"
    );
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("jobs[1]") && msg.contains("on its own"),
        "{msg}"
    );
    assert_eq!(r["error"]["field"], "jobs[1].idempotency_key");
    let bad = json!({"org_id": "qualgent", "app_version_id": "v1", "tests": []});
    assert_field(
        c.post("/v1/runs", &json!({"jobs": [sp, bad]})),
        422,
        "jobs[1].tests",
    );
    let (_, page) = c.get("/v1/jobs?limit=1000");
    assert_eq!(
        page["jobs"].as_array().unwrap().len(),
        1,
        "nothing was queued"
    );
    // A forgotten run's jobs, submitted again with their keys: that run.
    let mut a = spec("qualgent", "v2", "tests/a.spec.js");
    a["idempotency_key"] = json!("ci-9:a");
    let mut b = spec("qualgent", "v2", "tests/b.spec.js");
    b["idempotency_key"] = json!("ci-9:b");
    let (st, r) = c.post("/v1/runs", &json!({"jobs": [a, b]}));
    assert_eq!(st, 201, "{r}");
    c.post("/v1/agent/devices", &device("emu-2"));
    for _ in 0..2 {
        let (_, l) = lease(&c, "emu-2", 1000);
        let (lid, jid) = (l["id"].as_u64().unwrap(), l["jobs"][0]["id"].clone());
        let jid = jid.as_str().unwrap();
        c.post(
            &format!("/v1/agent/leases/{lid}/jobs/{jid}/complete"),
            &json!({"passed": true}),
        );
    }
    all_forgotten(&c);
    let (st, again) = c.post("/v1/runs", &json!({"jobs": [a, b]}));
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["run_id"], r["run_id"]);
    assert_eq!(again["job_ids"], r["job_ids"]);
    assert_eq!(
        (again["status"].clone(), again["created"].clone()),
        (json!("passed"), json!(false))
    );
}

#[test]
fn a_run_submitted_again_with_the_same_keys_is_the_same_run() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let keyed = |test: &str, key: &str| {
        let mut sp = spec("qualgent", "v1", test);
        sp["idempotency_key"] = json!(key);
        sp
    };
    let (a, b) = (
        keyed("tests/a.spec.js", "ci-42:a"),
        keyed("tests/b.spec.js", "ci-42:b"),
    );
    let (st, first) = c.post("/v1/runs", &json!({"jobs": [a, b]}));
    assert_eq!(
        (st, first["created"].clone()),
        (201, json!(true)),
        "{first}"
    );
    let run = first["run_id"].as_str().unwrap();
    // A CI retry of the same step: the same run, whose jobs the caller can wait on.
    let (st, again) = c.post("/v1/runs", &json!({"jobs": [a, b]}));
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["run_id"], run);
    assert_eq!(again["job_ids"], first["job_ids"]);
    assert_eq!(again["created"], json!(false));
    let (_, view) = c.get(&format!("/v1/runs/{run}"));
    assert_eq!(view["jobs"].as_array().unwrap().len(), 2, "{view}");
    // Part of the run, the run with one more job, or one job changed: refused, nothing
    // queued.
    let (st, v) = c.post("/v1/runs", &json!({"jobs": [a]}));
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 of the 2 jobs"),
        "{v}"
    );
    let c_new = keyed("tests/c.spec.js", "ci-42:c");
    let (st, v) = c.post("/v1/runs", &json!({"jobs": [a, b, c_new]}));
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("jobs[2]"),
        "{v}"
    );
    let mut b2 = b.clone();
    b2["priority"] = json!(5);
    let (st, v) = c.post("/v1/runs", &json!({"jobs": [a, b2]}));
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("conflict")),
        "{v}"
    );
    // One key twice in one run; labels a job could not carry.
    assert_field(
        c.post("/v1/runs", &json!({"jobs": [c_new, c_new]})),
        422,
        "jobs[1].idempotency_key",
    );
    assert_field(
        c.post(
            "/v1/runs",
            &json!({"jobs": [spec("qualgent", "v1", "tests/d.spec.js")], "labels": {"": "x"}}),
        ),
        422,
        "labels",
    );
    let long = "x".repeat(300);
    assert_field(
        c.post(
            "/v1/runs",
            &json!({"jobs": [spec("qualgent", "v1", "tests/d.spec.js")], "labels": {"k": long}}),
        ),
        422,
        "labels",
    );
    let (_, page) = c.get("/v1/jobs?limit=1000");
    assert_eq!(
        page["jobs"].as_array().unwrap().len(),
        2,
        "nothing more queued"
    );
}

/// Every `$ref` in the document points at a schema it defines.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap().to_string());
                } else {
                    refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// The required properties of `schema` are present in `v` (one level deep).
fn conforms(doc: &Value, schema: &str, v: &Value) {
    let sch = &doc["components"]["schemas"][schema];
    assert!(sch.is_object(), "no schema {schema}");
    for r in sch["required"].as_array().unwrap() {
        let k = r.as_str().unwrap();
        assert!(v.get(k).is_some(), "{schema}: answer lacks {k}: {v}");
    }
}

#[test]
fn openapi_schemas_resolve_and_match_real_answers() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    let (_, doc) = c.get("/openapi.json");
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20);
    for r in &all {
        let name = r.strip_prefix("#/components/schemas/").unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling {r}"
        );
    }
    let (_, sub) = c.post("/v1/jobs", &spec("qualgent", "v1", "tests/a.spec.js"));
    conforms(&doc, "Submitted", &sub);
    // Both documented answers of a submit: 201 created, 200 for a matched idempotency key.
    for code in ["201", "200"] {
        assert_eq!(
            doc["paths"]["/v1/jobs"]["post"]["responses"][code]["content"]["application/json"]
                ["schema"]["$ref"],
            "#/components/schemas/Submitted",
            "{code}"
        );
    }
    let id = sub["job_id"].as_str().unwrap();
    let (_, job) = c.get(&format!("/v1/jobs/{id}"));
    conforms(&doc, "Job", &job);
    conforms(&doc, "JobSpec", &job["spec"]);
    let (_, run) = c.post("/v1/runs", &json!({"jobs": [spec("qualgent", "v1", "b")]}));
    conforms(&doc, "RunSubmitted", &run);
    let (_, view) = c.get(&format!("/v1/runs/{}", run["run_id"].as_str().unwrap()));
    conforms(&doc, "RunView", &view);
    conforms(&doc, "StateCounts", &view["counts"]);
    conforms(&doc, "JobPage", &c.get("/v1/jobs").1);
    let (_, dev) = c.post("/v1/agent/devices", &device("emu-1"));
    conforms(&doc, "DeviceAnswer", &dev);
    let (_, l) = lease(&c, "emu-1", 1000);
    conforms(&doc, "Lease", &l);
    let lid = l["id"].as_u64().unwrap();
    let (_, hb) = c.post_empty(&format!("/v1/agent/leases/{lid}/heartbeat"));
    conforms(&doc, "HeartbeatAck", &hb);
    let jid = l["jobs"][0]["id"].as_str().unwrap();
    let (_, st) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{jid}/complete"),
        &json!({"passed": true}),
    );
    conforms(&doc, "StateAnswer", &st);
    conforms(
        &doc,
        "Results",
        &c.get(&format!("/v1/jobs/{jid}/results")).1,
    );
    let (_, stored) = c.put_raw("/v1/apps/qualgent/v1", b"apk", &[]);
    conforms(&doc, "Stored", &stored);
    conforms(&doc, "BuildRecord", &c.get("/v1/apps/qualgent/v1").1);
    let (_, err) = c.get("/v1/jobs/nope");
    conforms(&doc, "Error", &err);
    conforms(&doc, "Health", &c.get("/healthz").1);
    let (_, events) = c.sse_events(&format!("/v1/jobs/{jid}/events"), 1);
    conforms(&doc, "JobEvent", &events[0]);
}

#[test]
fn a_bundle_is_checked_whatever_its_chunks() {
    use std::io::Read as _;
    let s = TestServer::start(memory_opts());
    let addr = s.base.trim_start_matches("http://").to_string();
    // The gzip magic split over two chunks, the first a single byte, as a slow client or
    // proxy may send it; then a body that is not gzip at all.
    let put = |chunks: &[&[u8]]| {
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            conn,
            "PUT /v1/bundles HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        for c in chunks {
            write!(conn, "{:x}\r\n", c.len()).unwrap();
            conn.write_all(c).unwrap();
            conn.write_all(b"\r\n").unwrap();
            conn.flush().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        conn.write_all(b"0\r\n\r\n").unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    };
    let ok = put(&[b"\x1f", b"\x8b\x08\x00rest of a gzip stream"]);
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // Shorter than the head the server checks, so it answers once the body has ended.
    let bad = put(&[b"P", b"K\x03\x04zip"]);
    assert!(bad.starts_with("HTTP/1.1 422"), "{bad}");
}

#[test]
fn a_running_job_whose_agent_ignores_the_cancel_ends_canceled() {
    let s = TestServer::start(ServerOptions {
        scheduler: SchedulerConfig {
            cancel_grace_ms: 300,
            ..SchedulerConfig::default()
        },
        ..memory_opts()
    });
    let c = s.client(None);
    c.post("/v1/agent/devices", &device("emu-1"));
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    let (st, v) = c.post_empty(&format!("/v1/jobs/{id}/cancel"));
    assert_eq!((st, v["result"].clone()), (200, json!("requested")), "{v}");
    // The agent heartbeats on but never stops the job: the server ends it after the grace.
    let v = eventually(20, || {
        c.post_empty(&format!("/v1/agent/leases/{lid}/heartbeat"));
        let v = job_state(&c, &id);
        (v["state"] == "canceled").then_some(v)
    });
    assert!(
        v["outcome"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not stop")),
        "{v}"
    );
    // Its report, when it comes, is refused and changes nothing.
    let (st, _) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
        &json!({"passed": true}),
    );
    assert_eq!(st, 409);
    assert_eq!(job_state(&c, &id)["state"], "canceled");
    // Ended by the server, but not a lease expiry.
    let (_, _, m) = c.get_raw("/metrics");
    let m = String::from_utf8(m).unwrap();
    assert!(m.contains("qgjob_lease_expirations_total 0"), "{m}");
}

#[test]
fn a_device_registered_idle_gives_back_the_lease_it_held() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    c.post("/v1/agent/devices", &device("emu-1"));
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let (_, l) = lease(&c, "emu-1", 1000);
    let old = l["id"].as_u64().unwrap();
    // Registering again without `idle` (an agent still running the job) keeps the lease.
    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    assert_eq!(job_state(&c, &id)["state"], "running");
    assert_eq!(lease(&c, "emu-1", 0).0, 409);
    // Its agent restarted: the job goes back to the queue now, not when the lease expires.
    let mut idle = device("emu-1");
    idle["idle"] = json!(true);
    assert_eq!(c.post("/v1/agent/devices", &idle).0, 200);
    let j = job_state(&c, &id);
    assert_eq!(
        (j["state"].clone(), j["attempt"].clone()),
        (json!("queued"), json!(2)),
        "{j}"
    );
    let (st, _) = c.post_empty(&format!("/v1/agent/leases/{old}/heartbeat"));
    assert_eq!(st, 409);
    let (_, _, body) = c.get_raw(&format!("/v1/jobs/{id}/logs"));
    let log = String::from_utf8_lossy(&body);
    assert!(
        log.contains(
            "device lost: device emu-1 came back idle while running it \
             (its agent restarted or gave the job up); it will be retried"
        ),
        "{log}"
    );
}

#[test]
fn an_infrastructure_failure_is_written_to_the_job_log() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    c.post("/v1/agent/devices", &device("emu-1"));
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let (_, l) = lease(&c, "emu-1", 1000);
    let lid = l["id"].as_u64().unwrap();
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/fail"),
        &json!({"kind": "install_failed", "message": "adb: device offline"}),
    );
    assert_eq!((st, v["state"].clone()), (200, json!("queued")), "{v}");
    let (st, _, body) = c.get_raw(&format!("/v1/jobs/{id}/logs"));
    assert_eq!(st, 200);
    let log = String::from_utf8_lossy(&body);
    assert!(
        log.contains("install failed: adb: device offline; it will be retried"),
        "{log}"
    );
}

/// Runs `sql` on the server's SQLite database from outside, as an operator (or a failing
/// disk) would change it under the running server.
fn sqlite_exec(dir: &std::path::Path, sql: &str) {
    let url = format!("sqlite://{}", dir.join("qgjob.sqlite3").display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.unwrap();
        pool.close().await;
    });
}

#[test]
fn a_store_that_refuses_writes_stops_the_server_and_nothing_unstored_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(sqlite_opts(dir.path()));
    let c = s.client(None);
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    c.post("/v1/agent/devices", &device("emu-1"));
    let (st, l) = lease(&c, "emu-1", 1000);
    assert_eq!(st, 200, "{l}");
    let lid = l["id"].as_u64().unwrap();

    // From now on the database refuses to store a passed job (as a full disk or a broken
    // database would refuse every write).
    sqlite_exec(
        dir.path(),
        "CREATE TRIGGER refuse BEFORE UPDATE ON jobs WHEN NEW.state = 'passed' \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    );
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
        &json!({"passed": true}),
    );
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (503, json!("unavailable")),
        "{v}"
    );
    // The scheduler had applied the report before the write failed: nothing may be
    // answered from it now, reads included (503 while the server stops, then no answer).
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    if let Ok(mut r) = agent.get(format!("{}/v1/jobs/{id}", s.base)).call() {
        let v: Value = r.body_mut().read_json().unwrap();
        assert_eq!(
            (r.status().as_u16(), v["error"]["code"].clone()),
            (503, json!("unavailable")),
            "{v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("could not store")),
            "{v}"
        );
    }
    // The server stops by itself, and says why.
    let err = s
        .stop()
        .expect_err("a server whose store failed stops with an error");
    assert!(err.to_string().contains("store write failed"), "{err}");

    // Started again on what the store holds: the job is still running under its lease,
    // and the report, sent again, lands once the store takes it.
    sqlite_exec(dir.path(), "DROP TRIGGER refuse");
    let s = TestServer::start(sqlite_opts(dir.path()));
    let c = s.client(None);
    assert_eq!(job_state(&c, &id)["state"], "running");
    let (st, v) = c.post(
        &format!("/v1/agent/leases/{lid}/jobs/{id}/complete"),
        &json!({"passed": true}),
    );
    assert_eq!((st, v["state"].clone()), (200, json!("passed")), "{v}");
}

#[test]
fn an_org_uses_only_the_bundles_it_uploaded_and_learns_nothing_of_others() {
    let s = authed_server();
    let acme = s.client(Some(ACME));
    let globex = s.client(Some(GLOBEX));
    let bundle = tar_gz(&[("tests/secret.spec.js", b"test('acme only')")]);
    let (st, up) = acme.put_raw("/v1/bundles", &bundle, &[]);
    assert_eq!((st, up["created"].clone()), (200, json!(true)), "{up}");
    let sha = up["sha256"].as_str().unwrap().to_string();
    let with_bundle = |org: &str| {
        let mut sp = spec(org, "v1", "tests/secret.spec.js");
        sp["bundle"] = json!(sha);
        sp
    };
    // Acme runs its bundle; globex cannot run it by its hash, and is told exactly what it
    // would be told of a hash nobody uploaded.
    assert_eq!(acme.post("/v1/jobs", &with_bundle("acme")).0, 201);
    let (st, v) = globex.post("/v1/jobs", &with_bundle("globex"));
    let refused = assert_field((st, v), 422, "bundle");
    let unknown = "0".repeat(64);
    let mut sp = spec("globex", "v1", "tests/secret.spec.js");
    sp["bundle"] = json!(unknown);
    let (st, v) = globex.post("/v1/jobs", &sp);
    let never = assert_field((st, v), 422, "bundle");
    assert_eq!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&sha, "H"),
        never["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&unknown, "H")
    );
    let (st, v) = globex.post("/v1/runs", &json!({"jobs": [with_bundle("globex")]}));
    assert_field((st, v), 422, "jobs[0].bundle");
    // Uploading the same bytes is new for globex (and then usable), not a sign of acme's.
    let (_, up) = globex.put_raw("/v1/bundles", &bundle, &[]);
    assert_eq!(up["created"], true, "{up}");
    assert_eq!(globex.post("/v1/jobs", &with_bundle("globex")).0, 201);
    let (_, up) = globex.put_raw("/v1/bundles", &bundle, &[]);
    assert_eq!(up["created"], false, "{up}");
    // An app build is not a bundle.
    let (_, b) = acme.put_raw("/v1/apps/acme/v2", b"apk-bytes", &[]);
    let mut sp = spec("acme", "v2", "tests/a.spec.js");
    sp["bundle"] = b["sha256"].clone();
    assert_field(acme.post("/v1/jobs", &sp), 422, "bundle");
    // Builds: the same bytes under another org's version are new to that org.
    let (_, b) = globex.put_raw("/v1/apps/globex/v2", b"apk-bytes", &[]);
    assert_eq!(b["created"], true, "{b}");
    let (_, b) = globex.put_raw("/v1/apps/globex/v2", b"apk-bytes", &[]);
    assert_eq!(b["created"], false, "{b}");
}

#[test]
fn an_admin_revokes_a_created_token_for_good_but_not_a_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("tokens");
    std::fs::write(&tf, format!("admin {ADMIN}\norg acme {ACME}\n")).unwrap();
    let opts = ServerOptions {
        tokens_file: Some(tf),
        ..sqlite_opts(&dir.path().join("data"))
    };
    let s = TestServer::start(opts.clone());
    let admin = s.client(Some(ADMIN));
    let (_, t) = admin.post(
        "/v1/admin/tokens",
        &json!({"kind": "org", "org_id": "globex"}),
    );
    let token = t["token"].as_str().unwrap().to_string();
    let globex = s.client(Some(&token));
    submit(&globex, "globex", "v1", "tests/a.spec.js");
    // Only an admin revokes.
    let acme = s.client(Some(ACME));
    let (st, _) = acme.post("/v1/admin/tokens/revoke", &json!({"token": token}));
    assert_eq!(st, 403);
    let (st, v) = admin.post("/v1/admin/tokens/revoke", &json!({"token": token}));
    assert_eq!(st, 204, "{v}");
    // It stops working at once, and stays revoked across a restart.
    assert_eq!(globex.get("/v1/jobs").0, 401);
    let (st, v) = admin.post("/v1/admin/tokens/revoke", &json!({"token": token}));
    assert_eq!((st, v["error"]["code"].clone()), (404, json!("not_found")));
    // A configured token would come back at the next start: refused, and still valid.
    let (st, v) = admin.post("/v1/admin/tokens/revoke", &json!({"token": ACME}));
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("conflict")),
        "{v}"
    );
    assert_eq!(acme.get("/v1/jobs").0, 200);
    s.stop().unwrap();
    let s = TestServer::start(opts);
    assert_eq!(s.client(Some(&token)).get("/v1/jobs").0, 401);
    assert_eq!(s.client(Some(ACME)).get("/v1/jobs").0, 200);
}

fn with_session(id: &str, session: &str) -> Value {
    let mut d = device(id);
    d["session"] = json!(session);
    d["idle"] = json!(true);
    d
}

fn session_lease(c: &Client, dev: &str, session: &str, wait_ms: u64) -> (u16, Value) {
    c.post(
        "/v1/agent/lease",
        &json!({"device_id": dev, "session": session, "max_batch": 1, "wait_ms": wait_ms}),
    )
}

#[test]
fn a_device_is_refused_to_a_second_agent_session_while_its_agent_is_in_touch() {
    let s = TestServer::start(ServerOptions {
        scheduler: SchedulerConfig {
            backoff_base_ms: 0,
            backoff_max_ms: 0,
            ..SchedulerConfig::default()
        },
        ..memory_opts()
    });
    let c = s.client(None);
    assert_eq!(
        c.post("/v1/agent/devices", &with_session("emu-1", "a")).0,
        200
    );
    let id = submit(&c, "qualgent", "v1", "tests/a.spec.js");
    let (st, l) = session_lease(&c, "emu-1", "a", 1000);
    assert_eq!(st, 200, "{l}");

    // Another agent under the same name: refused, and the running job is left alone.
    let (st, v) = c.post("/v1/agent/devices", &with_session("emu-1", "b"));
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("device_held")),
        "{v}"
    );
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("registered by another agent"), "{msg}");
    assert_eq!(job_state(&c, &id)["state"], "running");

    // The same agent's next run, naming the one it follows, takes the device at once.
    let mut next = with_session("emu-1", "b");
    next["replaces"] = json!("a");
    assert_eq!(c.post("/v1/agent/devices", &next).0, 200);
    assert_eq!(job_state(&c, &id)["attempt"], 2);
    // The old session may neither poll for the device nor remove it any more.
    let (st, v) = session_lease(&c, "emu-1", "a", 0);
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("device_taken")),
        "{v}"
    );
    let (st, v) = c.delete("/v1/agent/devices/emu-1?session=a");
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("device_taken")),
        "{v}"
    );
    let (st, l) = session_lease(&c, "emu-1", "b", 1000);
    assert_eq!((st, l["jobs"][0]["id"].clone()), (200, json!(id)), "{l}");
    // A bad session name is a 422 naming the field.
    assert_field(
        c.post("/v1/agent/devices", &with_session("emu-2", "a b")),
        422,
        "session",
    );
}

#[test]
fn a_long_poll_keeps_its_device_in_touch() {
    // A 300 ms TTL against a 2 s poll: without the poll's own touches the device would
    // look silent, and free to take, long before the poll ends.
    let s = TestServer::start(short_ttl_opts());
    let c = s.client(None);
    assert_eq!(
        c.post("/v1/agent/devices", &with_session("emu-1", "a")).0,
        200
    );
    let poller = s.client(None);
    let poll = std::thread::spawn(move || session_lease(&poller, "emu-1", "a", 2000));
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let (st, v) = c.post("/v1/agent/devices", &with_session("emu-1", "b"));
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (409, json!("device_held")),
        "{v}"
    );
    assert_eq!(poll.join().unwrap().0, 204);
    // Once its agent stops polling, the device is free after a TTL.
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(
        c.post("/v1/agent/devices", &with_session("emu-1", "b")).0,
        200
    );
}

fn short_connection_limits(max_connections: usize) -> ServerOptions {
    let mut opts = memory_opts();
    opts.limits.header_read_timeout_ms = 500;
    opts.limits.max_connections = max_connections;
    opts
}

/// Reads until the server closes the connection (or 20 s pass); returns what it sent.
fn read_until_closed(stream: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read as _;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("timeout");
    let mut got = Vec::new();
    match stream.read_to_end(&mut got) {
        Ok(_) => Some(got),
        // Reset by the server counts as closed too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(got),
        Err(_) => None,
    }
}

#[test]
fn silent_and_half_sent_connections_are_closed() {
    let s = TestServer::start(short_connection_limits(64));
    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    // Nothing at all, half a request line with a header, and an idle keep-alive
    // connection after one answered request: each is closed once the timeout passes.
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    let mut half = std::net::TcpStream::connect(&addr).unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    assert!(
        read_until_closed(&mut silent).is_some(),
        "silent one closed"
    );
    assert!(
        read_until_closed(&mut half).is_some(),
        "half-sent one closed"
    );
    let answered = read_until_closed(&mut idle).expect("idle one closed");
    assert!(
        String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answered)
    );
}

#[test]
fn connections_past_the_cap_wait_for_one_to_close() {
    // The default 30 s header timeout, so only closing one of the silent connections can
    // make room.
    let mut opts = memory_opts();
    opts.limits.max_connections = 2;
    let s = TestServer::start(opts);
    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    let a = std::net::TcpStream::connect(&addr).unwrap();
    let _b = std::net::TcpStream::connect(&addr).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    // A third connection's request: the kernel accepts the connection, the server does
    // not take it up, so no answer comes while the cap is full.
    let mut third = std::net::TcpStream::connect(&addr).unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    match std::io::Read::read(&mut third, &mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("answered past the cap: {other:?}"),
    }
    // One silent connection goes away: the waiting one is served.
    drop(a);
    let answer = read_until_closed(&mut third).expect("answered");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Sends `head` and `first` of a body, then waits for the answer (at most 20 s).
fn send_partial(addr: &str, head: &str, first: &[u8]) -> String {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(first).unwrap();
    let got = read_until_closed(&mut conn).unwrap_or_default();
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_stalled_request_body_is_cut_off_and_a_greedy_one_refused() {
    let mut opts = memory_opts();
    opts.limits.body_timeout_ms = 500;
    opts.limits.intake_bytes = 64 * 1024;
    let s = TestServer::start(opts);
    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    // Half a body, then nothing: 408 once the deadline passes, in the JSON error shape.
    let answer = send_partial(
        &addr,
        &format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: 1000\r\nConnection: close\r\n\r\n"
        ),
        b"{\"org_id\": \"acme\",",
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");

    // A body bigger than what all bodies together may hold: 503, nothing submitted.
    let big = json!({"jobs": (0..2000)
        .map(|i| spec("qualgent", "v1", &format!("tests/{i}.spec.js")))
        .collect::<Vec<_>>()});
    let (st, v) = s.client(None).post("/v1/runs", &big);
    assert_eq!(
        (st, v["error"]["code"].clone()),
        (503, json!("unavailable")),
        "{v}"
    );
    let (_, page) = s.client(None).get("/v1/jobs");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 0);
    // An ordinary request still goes through.
    submit(&s.client(None), "qualgent", "v1", "tests/a.spec.js");
}

/// Starts an upload of a 2 MiB bundle, sends its first `sent` bytes and then nothing;
/// returns the server's answer.
fn stall_upload(s: &TestServer, sent: usize) -> String {
    let addr = s.base.strip_prefix("http://").unwrap().to_string();
    let mut body = vec![0x1f, 0x8b];
    body.resize(sent, 7);
    send_partial(
        &addr,
        &format!(
            "PUT /v1/bundles HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/gzip\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            2 * 1024 * 1024
        ),
        &body,
    )
}

#[test]
fn a_stalled_upload_is_cut_off_and_a_slow_one_is_not() {
    let mut opts = memory_opts();
    opts.limits.upload_stall_ms = 300;
    let s = TestServer::start(opts);
    let answer = stall_upload(&s, 1000);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(answer.contains("upload stalled"), "{answer}");
    // A slow upload that keeps sending is not cut off: a chunk every 100 ms for over a
    // second, three times the stall limit.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let _ = tx.send(vec![0x1f, 0x8b]);
        for _ in 0..12 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            if tx.send(vec![1; 100]).is_err() {
                return;
            }
        }
    });
    let resp = ureq::put(format!("{}/v1/bundles", s.base))
        .send(ureq::SendBody::from_reader(&mut ChunkReader {
            rx,
            left: Vec::new(),
        }))
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A reader over chunks arriving on a channel (ends when the sender does).
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    left: Vec<u8>,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left.is_empty() {
            match self.rx.recv() {
                Ok(c) => self.left = c,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.left.len());
        buf[..n].copy_from_slice(&self.left[..n]);
        self.left.drain(..n);
        Ok(n)
    }
}

/// On PostgreSQL the part already written goes too.
#[test]
fn a_stalled_upload_to_postgres_leaves_no_parts() {
    with_pg_schema("stalled upload test", |pg_url, dir| {
        let mut opts = pg_opts(pg_url, dir);
        opts.limits.upload_stall_ms = 3_000;
        let s = TestServer::start(opts);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let parts = || {
            rt.block_on(async {
                let pool = sqlx::PgPool::connect(pg_url).await.unwrap();
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM blob_parts")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                n
            })
        };
        let addr = s.base.strip_prefix("http://").unwrap().to_string();
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.write_all(
            format!(
                "PUT /v1/bundles HTTP/1.1\r\nHost: {addr}\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                2 * 1024 * 1024
            )
            .as_bytes(),
        )
        .unwrap();
        // More than one part: the first is in the database while the upload stalls.
        let mut body = vec![0x1f, 0x8b];
        body.resize(1024 * 1024 + 10, 7);
        conn.write_all(&body).unwrap();
        eventually(20, || (parts() == 1).then_some(()));
        let answer = String::from_utf8_lossy(&read_until_closed(&mut conn).unwrap()).into_owned();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        eventually(20, || (parts() == 0).then_some(()));
    });
}

#[test]
fn metrics_name_only_the_targets_the_lab_serves() {
    let s = TestServer::start(memory_opts());
    let c = s.client(None);
    for t in ["ipad", "watch-7", "typo"] {
        let mut sp = spec("qualgent", "v1", "tests/a.spec.js");
        sp["target"] = json!(t);
        assert_eq!(c.post("/v1/jobs", &sp).0, 201);
    }
    let metrics = |c: &Client| -> String {
        let (_, _, body) = c.get_raw("/metrics");
        String::from_utf8(body).unwrap()
    };
    let m = metrics(&c);
    // Targets any org may invent are summed, not a series each.
    assert!(
        m.contains("qgjob_jobs{target=\"_other\",state=\"queued\"} 3"),
        "{m}"
    );
    assert!(!m.contains("target=\"ipad\""), "{m}");
    // Once a device serves one, it has its own series.
    let mut d = device("ipad-1");
    d["target"] = json!("ipad");
    assert_eq!(c.post("/v1/agent/devices", &d).0, 200);
    let m = metrics(&c);
    assert!(
        m.contains("qgjob_jobs{target=\"ipad\",state=\"queued\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("qgjob_jobs{target=\"_other\",state=\"queued\"} 2"),
        "{m}"
    );
}

#[test]
fn a_waiting_long_poll_is_woken_by_work_for_its_pool() {
    // A long TTL, so the poll's own periodic re-ask (a third of it) cannot be what finds
    // the job: only the submit's wake-up can, before the poll's 20 s run out.
    let s = TestServer::start(ServerOptions {
        scheduler: SchedulerConfig {
            lease_ttl_ms: 600_000,
            ..SchedulerConfig::default()
        },
        ..memory_opts()
    });
    let c = s.client(None);
    assert_eq!(c.post("/v1/agent/devices", &device("emu-1")).0, 200);
    let poller = s.client(None);
    let poll = std::thread::spawn(move || lease(&poller, "emu-1", 20_000));
    std::thread::sleep(std::time::Duration::from_millis(300));
    // Work for another pool first: the emulator's poll goes on waiting.
    let mut other = spec("qualgent", "v1", "tests/a.spec.js");
    other["target"] = json!("browserstack");
    assert_eq!(c.post("/v1/jobs", &other).0, 201);
    let submitted = std::time::Instant::now();
    let id = submit(&c, "qualgent", "v1", "tests/b.spec.js");
    let (st, l) = poll.join().unwrap();
    assert_eq!((st, l["jobs"][0]["id"].clone()), (200, json!(id)), "{l}");
    // Not a speed check: a poll that was not woken re-asks only when its 20 s run out, so
    // an answer before then can only come from the wake-up.
    let took = submitted.elapsed();
    assert!(
        took < std::time::Duration::from_secs(19),
        "answered after {took:?}"
    );
}

/// A stopping server waits for requests in flight only up to its drain limit: a download
/// whose client stopped reading must not keep it (and its store's lock, which a standby
/// waits for) for ever.
#[test]
fn a_stalled_download_does_not_hold_up_a_stop() {
    use std::io::{Read as _, Write as _};
    let dir = tempfile::tempdir().unwrap();
    let mut opts = sqlite_opts(dir.path());
    opts.limits.drain_ms = 500;
    let s = TestServer::start(opts);
    let c = s.client(None);
    let build: Vec<u8> = (0..24_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.put_raw("/v1/apps/qualgent/v1", &build, &[]).0, 200);
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "GET /v1/apps/qualgent/v1/build HTTP/1.1\r\nhost: {addr}\r\n\r\n"
    )
    .unwrap();
    let mut first = [0u8; 1024];
    let got = stalled.read(&mut first).unwrap();
    assert!(got > 0, "the download started");
    // The client reads no more; the server stops.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(s.stop());
    });
    let stopped = done_rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the server stops although a download is stalled");
    stopped.unwrap();
    drop(stalled);
}
