//! The GitHub Action (`action.yml`) run for real: a real `qgjob server` and simulated agents
//! (named as such), then the action's own step scripts, read from `action.yml`, executed with
//! bash the way the Actions runner does (inputs mapped through each step's `env`, and
//! `GITHUB_ACTIONS`, `GITHUB_STEP_SUMMARY`, `GITHUB_OUTPUT`, `GITHUB_PATH` pointing at temp
//! files). Also checks that the action and the workflows parse and reference only inputs,
//! steps and outputs that exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_yaml::Value;

mod common;

use common::{start_agent, start_server, BIN};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn load_yaml(rel: &str) -> Value {
    let path = repo_root().join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel} does not parse: {e}"))
}

/// Every `${{ ... }}` expression in a string.
fn expressions(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${{") {
        let after = &rest[i + 3..];
        let Some(j) = after.find("}}") else { break };
        out.push(after[..j].trim().to_string());
        rest = &after[j + 2..];
    }
    out
}

fn all_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Sequence(seq) => seq.iter().for_each(|x| all_strings(x, out)),
        Value::Mapping(m) => m.iter().for_each(|(k, x)| {
            all_strings(k, out);
            all_strings(x, out)
        }),
        _ => {}
    }
}

fn action_inputs(action: &Value) -> BTreeMap<String, (bool, Option<String>)> {
    action["inputs"]
        .as_mapping()
        .expect("inputs")
        .iter()
        .map(|(k, v)| {
            let required = v["required"].as_bool().unwrap_or(false);
            let default = v["default"].as_str().map(str::to_string);
            (k.as_str().expect("name").to_string(), (required, default))
        })
        .collect()
}

#[test]
fn action_and_workflows_parse_and_reference_only_what_exists() {
    let action = load_yaml("action.yml");
    assert_eq!(action["runs"]["using"].as_str(), Some("composite"));
    let inputs = action_inputs(&action);
    for name in [
        "server",
        "token",
        "org-id",
        "app-version-id",
        "app-path",
        "tests",
        "target",
        "priority",
        "timeout",
    ] {
        assert!(inputs.contains_key(name), "input {name} missing");
    }
    assert_eq!(
        inputs["tests"].1.as_deref(),
        Some("tests/**/*.spec.{js,ts}")
    );
    let steps = action["runs"]["steps"].as_sequence().expect("steps");
    let step_ids: Vec<&str> = steps.iter().filter_map(|s| s["id"].as_str()).collect();
    let mut strings = Vec::new();
    all_strings(&action, &mut strings);
    for expr in strings.iter().flat_map(|s| expressions(s)) {
        for word in expr.split(|c: char| c.is_whitespace() || c == '|' || c == '&') {
            if let Some(name) = word.strip_prefix("inputs.") {
                assert!(inputs.contains_key(name), "unknown input {name} in {expr}");
            }
            if let Some(rest) = word.strip_prefix("steps.") {
                let id = rest.split('.').next().unwrap_or_default();
                assert!(step_ids.contains(&id), "unknown step {id} in {expr}");
            }
        }
    }
    // Every run step is bash and uses no expression inside its script: inputs reach it
    // through `env`, so a value can never be spliced into shell code.
    for s in steps {
        if let Some(run) = s["run"].as_str() {
            assert_eq!(s["shell"].as_str(), Some("bash"));
            assert!(expressions(run).is_empty(), "expression in script: {run}");
        }
    }

    // The workflows parse; the one using the action passes only its inputs, and every
    // required one.
    let wf = load_yaml(".github/workflows/appwright.yml");
    let mut used = false;
    for (_, job) in wf["jobs"].as_mapping().expect("jobs") {
        for step in job["steps"].as_sequence().expect("steps") {
            if step["uses"].as_str() == Some("./") {
                used = true;
                let with = step["with"].as_mapping().expect("with");
                for (k, _) in with {
                    let k = k.as_str().expect("key");
                    assert!(inputs.contains_key(k), "workflow passes unknown input {k}");
                }
                for (name, (required, _)) in &inputs {
                    if *required {
                        assert!(
                            with.contains_key(Value::String(name.clone())),
                            "workflow misses required input {name}"
                        );
                    }
                }
            }
        }
    }
    assert!(used, "appwright.yml uses the action");
    let ci = load_yaml(".github/workflows/ci.yml");
    let mut ci_strings = Vec::new();
    all_strings(&ci, &mut ci_strings);
    assert!(
        ci_strings.iter().any(|s| s.contains("bash .ci/run")),
        "ci.yml runs .ci/run"
    );
}

/// What one run of the action's steps left behind.
struct ActionRun {
    code: i32,
    stdout: String,
    summary: String,
    outputs: BTreeMap<String, String>,
    workspace: PathBuf,
}

/// Runs the action's `run:` steps in order, like the Actions runner: `${{ inputs.* }}` and
/// the few `github.*` values resolved in each step's `env`, the step script run with
/// `bash -e`, stopping at the first failing step. `uses:` steps are GitHub's own and are not
/// run here: the test plays the cache step's part by restoring the `qgjob` binary this test
/// run built into the cached folder (so the install step finds it cached, as on a warm
/// runner, instead of spending minutes in `cargo install`).
fn run_action(workspace: &Path, with: &[(&str, &str)]) -> ActionRun {
    let action = load_yaml("action.yml");
    let mut values: BTreeMap<String, String> = action_inputs(&action)
        .into_iter()
        .map(|(k, (_, d))| (k, d.unwrap_or_default()))
        .collect();
    for (k, v) in with {
        values.insert((*k).to_string(), (*v).to_string());
    }
    let gh = workspace.join("_github");
    std::fs::create_dir_all(&gh).expect("mkdir");
    let (summary, output, path_file) = (
        gh.join("step_summary.md"),
        gh.join("output"),
        gh.join("path"),
    );
    for f in [&summary, &output, &path_file] {
        std::fs::write(f, "").expect("touch");
    }
    // The runner's home: the install step puts qgjob under it.
    let home = gh.join("home");
    let cached = home.join(".qgjob-action/bin");
    std::fs::create_dir_all(&cached).expect("cache dir");
    std::fs::copy(BIN, cached.join("qgjob")).expect("restore the cached binary");
    let resolve = |text: &str| -> String {
        let mut out = text.to_string();
        for expr in expressions(text) {
            let value = if let Some(name) = expr.strip_prefix("inputs.") {
                values.get(name).cloned().unwrap_or_default()
            } else if expr == "github.action_path" {
                repo_root().to_string_lossy().into_owned()
            } else {
                panic!("the test does not know how to resolve ${{{{ {expr} }}}}")
            };
            out = out.replace(&format!("${{{{ {expr} }}}}"), &value);
        }
        out
    };
    let mut extra_path: Vec<String> = Vec::new();
    let mut stdout = String::new();
    let mut code = 0;
    for step in action["runs"]["steps"].as_sequence().expect("steps") {
        let Some(script) = step["run"].as_str() else {
            continue;
        };
        let mut cmd = Command::new("bash");
        cmd.arg("-e")
            .arg("-c")
            .arg(script)
            .current_dir(workspace)
            .env_remove("QGJOB_SERVER")
            .env_remove("QGJOB_TOKEN")
            .env_remove("QGJOB_CONFIG")
            .env("HOME", &home)
            .env("NO_COLOR", "1")
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_STEP_SUMMARY", &summary)
            .env("GITHUB_OUTPUT", &output)
            .env("GITHUB_PATH", &path_file)
            .stdin(Stdio::null());
        // PATH as the runner builds it: the lines steps appended to GITHUB_PATH first.
        let base_path = std::env::var("PATH").unwrap_or_default();
        let mut path = extra_path.clone();
        path.push(base_path);
        cmd.env("PATH", path.join(":"));
        if let Some(env) = step["env"].as_mapping() {
            for (k, v) in env {
                let k = k.as_str().expect("env name");
                let v = v.as_str().map(str::to_string).unwrap_or_default();
                cmd.env(k, resolve(&v));
            }
        }
        let out = cmd.output().expect("bash runs");
        stdout.push_str(&String::from_utf8_lossy(&out.stdout));
        let err = String::from_utf8_lossy(&out.stderr);
        code = out.status.code().expect("exit code");
        let name = step["name"].as_str().unwrap_or("?");
        eprintln!("step {name:?} exited {code}; stderr:\n{err}");
        extra_path = std::fs::read_to_string(&path_file)
            .expect("GITHUB_PATH")
            .lines()
            .rev()
            .map(str::to_string)
            .collect();
        if code != 0 {
            break;
        }
    }
    let outputs = std::fs::read_to_string(&output)
        .expect("GITHUB_OUTPUT")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ActionRun {
        code,
        stdout,
        summary: std::fs::read_to_string(&summary).expect("summary"),
        outputs,
        workspace: workspace.to_path_buf(),
    }
}

/// (tests, failures, errors) counted from a JUnit file, which must parse as XML.
fn junit_counts(path: &Path) -> (usize, usize, usize) {
    use quick_xml::events::Event;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut reader = quick_xml::Reader::from_str(&text);
    let (mut tests, mut failures, mut errors) = (0, 0, 0);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => match e.name().as_ref() {
                b"testcase" => tests += 1,
                b"failure" => failures += 1,
                b"error" => errors += 1,
                _ => {}
            },
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => panic!("JUnit is not XML: {e}\n{text}"),
        }
    }
    (tests, failures, errors)
}

fn workspace_with_specs() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for f in [
        "tests/onboarding.spec.js",
        "tests/auth/login.spec.ts",
        "tests/cart.spec.js",
    ] {
        let p = d.path().join(f);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, "test('works', async () => {});\n").expect("write");
    }
    std::fs::write(d.path().join("package.json"), "{\"name\": \"app-tests\"}\n").expect("write");
    d
}

#[test]
fn the_action_passes_a_green_run_and_fails_a_red_one() {
    let ws = workspace_with_specs();
    let (_server, url) = start_server(ws.path(), &[]);
    let _emu = start_agent(&url, ws.path(), "emulator", &[]);
    let _bs = start_agent(&url, ws.path(), "browserstack", &["--fail-rate", "1"]);
    let base = [
        ("server", url.as_str()),
        ("org-id", "qualgent"),
        ("app-version-id", "xyz123"),
        ("timeout", "120s"),
    ];

    // Green: the default glob picks up all three specs (.js and .ts), all pass.
    let green = run_action(ws.path(), &base);
    assert_eq!(green.code, 0, "stdout:\n{}", green.stdout);
    assert!(
        !green.stdout.contains("::error"),
        "no annotations on a green run:\n{}",
        green.stdout
    );
    let junit = green.workspace.join(&green.outputs["junit"]);
    assert_eq!(junit_counts(&junit), (3, 0, 0));
    assert_eq!(green.outputs["passed"], "3");
    assert!(!green.outputs["run-id"].is_empty(), "{:?}", green.outputs);
    for spec in [
        "tests/onboarding.spec.js",
        "tests/auth/login.spec.ts",
        "tests/cart.spec.js",
    ] {
        assert!(
            green.summary.contains(spec),
            "summary lists {spec}:\n{}",
            green.summary
        );
    }
    assert!(green.summary.contains("passed"), "{}", green.summary);

    // Red: the same specs on a pool whose simulated devices fail every test.
    let mut red_with = base.to_vec();
    red_with.push(("target", "browserstack"));
    red_with.push(("tests", "tests/*.spec.js"));
    red_with.push(("junit-path", "red-junit.xml"));
    let red = run_action(ws.path(), &red_with);
    assert_eq!(
        red.code, 1,
        "a failing test fails the step:\n{}",
        red.stdout
    );
    let annotations: Vec<&str> = red
        .stdout
        .lines()
        .filter(|l| l.starts_with("::error "))
        .collect();
    assert_eq!(annotations.len(), 2, "{}", red.stdout);
    for spec in ["tests/onboarding.spec.js", "tests/cart.spec.js"] {
        assert!(
            annotations
                .iter()
                .any(|a| a.starts_with(&format!("::error file={spec},title="))),
            "{annotations:?}"
        );
    }
    assert_eq!(red.outputs["junit"], "red-junit.xml");
    assert_eq!(red.outputs["failed"], "2");
    let (tests, failures, _) = junit_counts(&red.workspace.join("red-junit.xml"));
    assert_eq!((tests, failures), (2, 2));
    assert!(red.summary.contains("failed"), "{}", red.summary);
    assert!(
        red.summary.contains("tests/cart.spec.js"),
        "{}",
        red.summary
    );
}

/// Runs the action's step `id` (a `run:` step whose only input is `github.action_path`)
/// against `action_path`; returns what it wrote to `GITHUB_OUTPUT`.
fn run_step_against(id: &str, action_path: &Path, scratch: &Path) -> String {
    let action = load_yaml("action.yml");
    let step = action["runs"]["steps"]
        .as_sequence()
        .expect("steps")
        .iter()
        .find(|s| s["id"].as_str() == Some(id))
        .unwrap_or_else(|| panic!("no step {id}"));
    let output = scratch.join("output");
    std::fs::write(&output, "").expect("touch");
    let out = Command::new("bash")
        .arg("-e")
        .arg("-c")
        .arg(step["run"].as_str().expect("run step"))
        .current_dir(scratch)
        .env("ACTION_PATH", action_path)
        .env("GITHUB_OUTPUT", &output)
        .stdin(Stdio::null())
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{out:?}");
    std::fs::read_to_string(&output).expect("GITHUB_OUTPUT")
}

/// The cached binary is keyed by the action's source, not by the ref it was used at: a
/// branch or a moved tag with new code must not get the old binary.
#[test]
fn the_cache_key_changes_exactly_when_the_source_does() {
    let action = load_yaml("action.yml");
    let steps = action["runs"]["steps"].as_sequence().expect("steps");
    let cache = steps
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("actions/cache"))
        })
        .expect("a cache step");
    let key = cache["with"]["key"].as_str().expect("key");
    assert!(key.contains("steps.source.outputs.hash"), "{key}");
    assert!(!key.contains("action_ref"), "{key}");

    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("action");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir_all(src.join("qgjob-cli/src")).expect("mkdir");
    std::fs::create_dir_all(src.join("target/release")).expect("mkdir");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    std::fs::write(src.join("Cargo.toml"), "[workspace]\n").expect("write");
    std::fs::write(src.join("qgjob-cli/src/main.rs"), "fn main() {}\n").expect("write");
    let first = run_step_against("source", &src, &scratch);
    assert!(
        first.starts_with("hash=") && first.trim().len() == 5 + 32,
        "{first:?}"
    );
    assert_eq!(run_step_against("source", &src, &scratch), first, "stable");
    // Build output does not count...
    std::fs::write(src.join("target/release/qgjob"), "binary").expect("write");
    assert_eq!(run_step_against("source", &src, &scratch), first);
    // ...a changed source file does.
    std::fs::write(src.join("qgjob-cli/src/main.rs"), "fn main() { }\n").expect("write");
    assert_ne!(run_step_against("source", &src, &scratch), first);
}
