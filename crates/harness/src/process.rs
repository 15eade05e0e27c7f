//! Child processes of the harness server: command lines, environment, process groups, stderr.
//!
//! Knows nothing about ACP or PTYs; it starts, watches and stops processes.

use crate::event::clip;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// How many stderr lines a failed agent reports, and how long each may be.
const STDERR_TAIL_LINES: usize = 40;
const STDERR_LINE_MAX: usize = 400;

/// Splits a command line the way a POSIX shell would (quotes, escapes), without running a shell.
/// The program `sandwarden` means this build's binary, so `sandwarden echo-agent` works
/// uninstalled (`binary::sandwarden_exe`).
pub fn parse_command_line(line: &str) -> anyhow::Result<Vec<String>> {
    let mut argv = shell_words::split(line)
        .map_err(|e| anyhow::anyhow!("cannot parse the command line {line:?}: {e}"))?;
    anyhow::ensure!(!argv.is_empty(), "the command line is empty");
    if argv[0] == "sandwarden"
        && let Some(exe) = super::binary::sandwarden_exe()
    {
        argv[0] = exe.display().to_string();
    }
    Ok(argv)
}

/// The environment a child starts with: ours, minus every `SANDWARDEN_*` variable (the bearer
/// token must never reach the agent), plus the per-session values bound at claim time.
pub fn child_env(bound: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("SANDWARDEN_"))
        .collect();
    env.extend(bound.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().collect()
}

/// The exit code of a program that could not be run because it (or the program it runs, for
/// `sandwarden launch`) was not found: the shell's convention, which `launch` follows.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Why a program could not be run, when it exited `EXIT_NOT_FOUND`: the line of its last output
/// that says so ("cannot run …" from `sandwarden launch`, "… not found" from a shell), else its
/// last line, else a sentence. `None` for any other exit. `lines` is output of the sandbox, so
/// the answer is one bounded line.
pub fn not_found_reason(
    exit: Option<crate::event::ExitStatus>,
    lines: &[String],
) -> Option<String> {
    if exit?.code? != EXIT_NOT_FOUND {
        return None;
    }
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let said = lines
        .iter()
        .rev()
        .find(|l| l.contains("cannot run") || l.contains("not found"))
        .or(lines.last());
    Some(match said {
        Some(line) => {
            let line = line.strip_prefix("sandwarden: ").unwrap_or(line);
            clip(line.to_string(), STDERR_LINE_MAX)
        }
        None => format!("the program was not found (exit code {EXIT_NOT_FOUND})"),
    })
}

/// The text lines of terminal output, without escape sequences and control characters, for
/// reading a message out of it (`not_found_reason`).
pub fn terminal_lines(output: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(output);
    let mut lines = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            // CSI (ESC [ … final byte) and other two-byte escapes.
            '\u{1b}' => {
                if chars.next_if_eq(&'[').is_some() {
                    while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
                } else {
                    chars.next();
                }
            }
            '\n' | '\r' => lines.push(String::new()),
            c if c.is_control() => {}
            c => {
                if let Some(line) = lines.last_mut() {
                    line.push(c);
                }
            }
        }
    }
    lines.retain(|l| !l.trim().is_empty());
    lines
}

/// The last lines a process wrote to stderr, kept in a bounded buffer.
#[derive(Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<String>>>);

impl StderrTail {
    /// Reads `stream` to its end, keeping the last lines. Returns when the stream closes.
    pub async fn collect(self, stream: impl AsyncRead + Unpin) {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = clip(line, STDERR_LINE_MAX);
            let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// A running child that leads its own process group, so stopping it stops what it started.
#[derive(Clone)]
pub struct GroupHandle {
    pub pid: i32,
    exited: watch::Receiver<bool>,
}

impl GroupHandle {
    /// `exited` must turn true once the child has been reaped.
    pub fn new(pid: i32, exited: watch::Receiver<bool>) -> Self {
        GroupHandle { pid, exited }
    }

    fn signal(&self, signal: Signal) {
        // Pid 0 would mean our own process group: never signal it.
        if self.pid <= 0 {
            return;
        }
        // ESRCH (already gone) is the expected outcome of a race with exit; nothing to do.
        let _ = killpg(Pid::from_raw(self.pid), signal);
    }

    /// Whether the child has been reaped.
    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Whether the child has ended: reaped, or dead and not yet reaped (a zombie, or no longer
    /// in /proc), so that anything sent to it now would go to no one. A failure of its own to
    /// read /proc says it has not.
    pub fn has_ended(&self) -> bool {
        if self.has_exited() {
            return true;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // The state follows the command name, which may itself hold ") ".
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }

    /// Waits up to `within` for the child to be reaped; whether it was.
    pub async fn wait_exit(&self, within: Duration) -> bool {
        let mut exited = self.exited.clone();
        tokio::time::timeout(within, exited.wait_for(|e| *e))
            .await
            .is_ok()
    }

    /// SIGTERM to the group, then SIGKILL after `grace`. Returns once the child is reaped
    /// (or after a further second if even SIGKILL did not reap it).
    pub async fn stop(&self, grace: Duration) {
        self.stop_with(&[Signal::SIGTERM], grace).await;
    }

    /// Like `stop`, for a program on a terminal: SIGHUP first (what a hangup sends; interactive
    /// shells ignore SIGTERM), then SIGTERM, then SIGKILL after `grace`.
    pub async fn hang_up(&self, grace: Duration) {
        self.stop_with(&[Signal::SIGHUP, Signal::SIGCONT, Signal::SIGTERM], grace)
            .await;
    }

    async fn stop_with(&self, first: &[Signal], grace: Duration) {
        if *self.exited.borrow() {
            self.signal(Signal::SIGKILL); // stray grandchildren
            return;
        }
        for signal in first {
            self.signal(*signal);
        }
        if !self.wait_exit(grace).await {
            self.signal(Signal::SIGKILL);
            self.wait_exit(Duration::from_secs(1)).await;
        }
        self.signal(Signal::SIGKILL);
    }
}

/// Resolves `cwd` (relative to `base`) for a bound session; it must exist.
pub fn resolve_dir(base: &std::path::Path, cwd: Option<&str>) -> Result<PathBuf, String> {
    let dir = match cwd {
        None => return Ok(base.to_path_buf()),
        Some(c) if !crate::event::is_inside(c) => {
            return Err(format!(
                "`cwd` {c:?} must be a relative path inside the working directory (no '..', not absolute)"
            ));
        }
        Some(c) => base.join(c),
    };
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(format!(
            "`cwd` {:?} is not a directory in the sandbox; create it with `files` or pick another",
            cwd.unwrap_or_default()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_killed_child_not_yet_reaped_has_ended() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = i32::try_from(child.id()).expect("pid");
        let (_tx, exited) = watch::channel(false);
        let handle = GroupHandle::new(pid, exited);
        assert!(!handle.has_ended(), "running");
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        // Not reaped (nobody waits yet): a zombie, which has ended all the same.
        let ended = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            handle.has_ended()
        });
        assert!(ended && !handle.has_exited());
        let _ = child.wait();
    }

    #[test]
    fn parses_quotes_and_resolves_self() {
        let argv = parse_command_line(r#"opencode acp --title "two words""#).expect("parses");
        assert_eq!(argv, vec!["opencode", "acp", "--title", "two words"]);
        let me = parse_command_line("sandwarden echo-agent").expect("parses");
        assert_ne!(me[0], "sandwarden");
        assert_eq!(me[1], "echo-agent");
        assert!(parse_command_line("").is_err());
        assert!(parse_command_line("bash -c 'unterminated").is_err());
    }

    #[test]
    fn child_env_drops_our_variables_and_adds_bound_ones() {
        // Our own test process may not have SANDWARDEN_TOKEN set; the filter is what matters.
        let bound: BTreeMap<String, String> = [("SECRET".into(), "v".into())].into();
        let env = child_env(&bound);
        assert!(env.iter().all(|(k, _)| !k.starts_with("SANDWARDEN_")));
        assert!(env.contains(&("SECRET".to_string(), "v".to_string())));
    }

    #[test]
    fn a_program_not_found_is_told_by_its_own_line() {
        let exit = |code| {
            Some(crate::event::ExitStatus {
                code: Some(code),
                signal: None,
            })
        };
        let launch = vec![
            "sandwarden: cannot run \"opencode\": No such file or directory (os error 2). Install the harness CLIs".to_string(),
        ];
        assert_eq!(
            not_found_reason(exit(127), &launch).as_deref(),
            Some(
                "cannot run \"opencode\": No such file or directory (os error 2). Install the harness CLIs"
            )
        );
        assert_eq!(not_found_reason(exit(1), &launch), None);
        let shell = terminal_lines(
            b"\x1b[1;31mwelcome\x1b[0m\r\nbash: line 1: nosuch: command not found\r\n",
        );
        assert_eq!(
            shell,
            vec!["welcome", "bash: line 1: nosuch: command not found"]
        );
        assert_eq!(
            not_found_reason(exit(127), &shell).as_deref(),
            Some("bash: line 1: nosuch: command not found")
        );
        assert!(not_found_reason(exit(127), &[]).is_some_and(|r| r.contains("127")));
    }

    #[tokio::test]
    async fn stderr_tail_keeps_the_last_lines() {
        let input: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = StderrTail::default();
        tail.clone().collect(input.as_bytes()).await;
        let lines = tail.lines();
        assert_eq!(lines.len(), STDERR_TAIL_LINES);
        assert_eq!(lines.last().map(String::as_str), Some("line 99"));
    }
}
