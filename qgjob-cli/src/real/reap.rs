//! Kills the test processes a killed agent left running.
//!
//! The agent kills a test command's process group when the job ends, times out or is
//! canceled; an agent killed with SIGKILL (or by the OOM killer) cannot, and its test
//! commands run on, driving the device under the next agent's jobs. So every command the
//! agent starts (test runs and npm installs) carries [`MARK_VAR`] = the agent's cache dir in
//! its environment, and an agent that takes a cache dir over (see
//! [`super::cache::ArtifactCache::open`]: no live agent holds it then) kills the process
//! group of every process still carrying that mark. Process groups alone would not do: the
//! kernel reuses their ids, while the mark is inherited by everything the command starts.
//! Linux only (it reads `/proc`); elsewhere nothing is found.

use std::collections::BTreeSet;
use std::path::Path;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgrp, Pid};

/// The environment variable that marks a command as started by the agent of a cache dir.
pub const MARK_VAR: &str = "QGJOB_AGENT_DIR";

/// The mark for the agent of `cache_dir` (an absolute path, so agents started from
/// different folders agree).
pub fn mark(cache_dir: &Path) -> (String, String) {
    (MARK_VAR.to_string(), cache_dir.display().to_string())
}

/// Kills (SIGKILL) the process group of every process whose environment holds `MARK_VAR`
/// with this value, except this process's own group; returns how many groups it killed.
pub fn reap(value: &str) -> usize {
    let wanted = format!("{MARK_VAR}={value}");
    let me = std::process::id();
    let own_group = getpgrp().as_raw();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut groups = BTreeSet::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // Unreadable (another user's, or gone): not ours.
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ.split(|b| *b == 0).any(|e| e == wanted.as_bytes()) {
            continue;
        }
        if let Some(g) = process_group(pid) {
            if g > 1 && g != own_group {
                groups.insert(g);
            }
        }
    }
    groups
        .into_iter()
        .filter(|g| killpg(Pid::from_raw(*g), Signal::SIGKILL).is_ok())
        .count()
}

/// The process group of `pid`, from `/proc/<pid>/stat` (`pid (comm) state ppid pgrp ...`;
/// the command name may hold spaces and parentheses, so fields are counted from the last
/// `)`).
fn process_group(pid: u32) -> Option<i32> {
    group_in_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn group_in_stat(stat: &str) -> Option<i32> {
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command};
    use std::time::Duration;

    fn spawn_marked(value: &str) -> Child {
        Command::new("sh")
            .args(["-c", "sleep 60 & wait"])
            .env(MARK_VAR, value)
            .process_group(0)
            .spawn()
            .expect("sh")
    }

    fn exited(c: &mut Child) -> bool {
        for _ in 0..100 {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn kills_the_groups_carrying_its_mark_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_, ours) = mark(&dir.path().join("cache"));
        let (_, theirs) = mark(&dir.path().join("other-cache"));
        let mut a = spawn_marked(&ours);
        let mut b = spawn_marked(&theirs);
        // The shell and its sleep both carry the mark; they are one group.
        assert_eq!(reap(&ours), 1);
        assert!(exited(&mut a), "the marked group survived");
        assert!(matches!(b.try_wait(), Ok(None)), "an unmarked group died");
        assert_eq!(reap(&ours), 0, "nothing left to kill");
        assert_eq!(reap(&theirs), 1);
        assert!(exited(&mut b));
    }

    #[test]
    fn reads_the_group_past_a_command_name_with_parentheses() {
        assert_eq!(group_in_stat("42 (a) b (c)) S 1 777 777 0 -1"), Some(777));
        assert_eq!(group_in_stat("42 (node) S"), None);
        assert_eq!(process_group(std::process::id()), Some(getpgrp().as_raw()));
    }
}
