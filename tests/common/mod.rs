//! Helpers shared by the end-to-end tests of the `qgjob` binary: a command with a clean
//! environment, child processes that cannot outlive a test, and a server and simulated
//! agents on 127.0.0.1.

// Each test crate that includes this module uses its own subset of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_qgjob");

/// A child process stopped (and reaped) when dropped, so a failing test leaves nothing
/// behind: SIGTERM first, so an agent can stop its test commands' process groups, then
/// SIGKILL after five seconds.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // A child the test already reaped keeps its status here; its pid may be reused.
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for _ in 0..50 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `qgjob` command run in `cwd` with a clean environment (no inherited server, token,
/// config, database, GitHub or colour settings), talking to `server` when given.
pub fn qgjob(server: Option<&str>, cwd: &Path) -> Command {
    qgjob_via(Command::new(BIN), server, cwd)
}

/// [`qgjob`] run through another command: `wrapper` already names the program (and its
/// own arguments) that runs `qgjob`, e.g. `setpriv … -- /path/to/qgjob`.
pub fn qgjob_via(mut c: Command, server: Option<&str>, cwd: &Path) -> Command {
    c.current_dir(cwd)
        .env_remove("QGJOB_SERVER")
        .env_remove("QGJOB_TOKEN")
        .env_remove("QGJOB_CONFIG")
        .env_remove("QGJOB_DATABASE_URL")
        .env_remove("QGJOB_CA_CERT")
        .env_remove("GITHUB_ACTIONS")
        .env("HOME", cwd)
        .env("XDG_CONFIG_HOME", cwd.join(".config"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    if let Some(s) = server {
        c.env("QGJOB_SERVER", s);
    }
    c
}

/// A server (memory store, plus `extra` flags) on a free loopback port; returns it with its
/// base URL, read from the first line it prints.
pub fn start_server(dir: &Path, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--addr", "127.0.0.1:0", "--store", "memory"];
    args.extend_from_slice(extra);
    spawn_server(dir, &args)
}

/// `qgjob server ARGS` in `dir`; returns it with the base URL from the `listening` line,
/// the first it prints.
pub fn spawn_server(dir: &Path, args: &[&str]) -> (Proc, String) {
    let mut child = qgjob(None, dir)
        .arg("server")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("server starts");
    let out = child.stdout.take().expect("stdout");
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .trim()
        .strip_prefix("qgjob server listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    (proc, url)
}

/// A simulated agent (two simulated devices, 0.2 s installs and runs) for `target`, plus
/// `extra` flags.
pub fn start_agent(url: &str, dir: &Path, target: &str, extra: &[&str]) -> Proc {
    let child = qgjob(Some(url), dir)
        .args([
            "agent",
            "--target",
            target,
            "--simulate",
            "--devices",
            "2",
            "--install-s",
            "0.2",
            "--run-s",
            "0.2",
            "--name",
            &format!("test-{target}"),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent starts");
    Proc(child)
}
