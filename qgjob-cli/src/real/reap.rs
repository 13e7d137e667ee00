//! Kills the test processes a killed agent left running.
//!
//! The agent kills a test command's process group when the job ends, times out or is
//! canceled; an agent killed with SIGKILL (or by the OOM killer) cannot, and its test
//! commands run on, driving the device under the next agent's jobs. So while a command
//! runs, its process group is recorded in the cache dir's `groups/` folder (a file named
//! by the group id, removed when the agent is done with it), and every command carries
//! [`MARK_VAR`] = the agent's cache dir in its environment. An agent that takes a cache dir
//! over (see [`super::cache::ArtifactCache::open`]: no live agent holds it then) kills each
//! recorded group that still has a process carrying the mark: the record alone could name a
//! reused group id, and the mark alone would also hit daemons a test started that left its
//! group (an adb server, which calls `setsid`), shared with other agents. Linux only (it
//! reads `/proc`); elsewhere nothing is found.

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

/// Kills (SIGKILL) every process group recorded in `groups_dir` that still has a process
/// whose environment holds `MARK_VAR` with this value (never this process's own group),
/// and clears the records; returns how many groups it killed.
pub fn reap(value: &str, groups_dir: &Path) -> usize {
    let Ok(records) = std::fs::read_dir(groups_dir) else {
        return 0;
    };
    let recorded: BTreeSet<i32> = records
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok());
            let _ = std::fs::remove_file(e.path());
            id
        })
        .filter(|g| *g > 1 && *g != getpgrp().as_raw())
        .collect();
    if recorded.is_empty() {
        return 0;
    }
    marked_groups(value)
        .intersection(&recorded)
        .filter(|g| killpg(Pid::from_raw(**g), Signal::SIGKILL).is_ok())
        .count()
}

/// The process groups of the processes (other than this one) whose environment holds
/// `MARK_VAR=value`.
fn marked_groups(value: &str) -> BTreeSet<i32> {
    let wanted = format!("{MARK_VAR}={value}");
    let me = std::process::id();
    let mut groups = BTreeSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return groups;
    };
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
            groups.insert(g);
        }
    }
    groups
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

    fn spawn_marked(value: &str, groups: &Path) -> Child {
        let c = Command::new("sh")
            .args(["-c", "sleep 60 & wait"])
            .env(MARK_VAR, value)
            .process_group(0)
            .spawn()
            .expect("sh");
        // As the runner records the groups it starts.
        std::fs::write(groups.join(c.id().to_string()), b"").expect("record");
        c
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
    fn kills_recorded_groups_carrying_its_mark_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let (groups, other_groups) = (dir.path().join("groups"), dir.path().join("g2"));
        std::fs::create_dir_all(&groups).expect("mkdir");
        std::fs::create_dir_all(&other_groups).expect("mkdir");
        let (_, ours) = mark(&dir.path().join("cache"));
        let (_, theirs) = mark(&dir.path().join("other-cache"));
        let mut a = spawn_marked(&ours, &groups);
        let mut b = spawn_marked(&theirs, &other_groups);
        // Marked but never recorded: a daemon a test started in a group of its own.
        let mut daemon = Command::new("sh")
            .args(["-c", "sleep 60 & wait"])
            .env(MARK_VAR, &ours)
            .process_group(0)
            .spawn()
            .expect("sh");
        // The shell and its sleep both carry the mark; they are one group.
        assert_eq!(reap(&ours, &groups), 1);
        assert!(exited(&mut a), "the recorded group survived");
        assert!(
            matches!(b.try_wait(), Ok(None)),
            "another agent's group died"
        );
        assert!(
            matches!(daemon.try_wait(), Ok(None)),
            "an unrecorded group died"
        );
        assert_eq!(reap(&ours, &groups), 0, "records are cleared");
        assert_eq!(reap(&theirs, &other_groups), 1);
        assert!(exited(&mut b));
        let _ = killpg(Pid::from_raw(daemon.id() as i32), Signal::SIGKILL);
        let _ = daemon.wait();
    }

    #[test]
    fn reads_the_group_past_a_command_name_with_parentheses() {
        assert_eq!(group_in_stat("42 (a) b (c)) S 1 777 777 0 -1"), Some(777));
        assert_eq!(group_in_stat("42 (node) S"), None);
        assert_eq!(process_group(std::process::id()), Some(getpgrp().as_raw()));
    }
}
