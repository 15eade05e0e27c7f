//! The local runtime: each sandbox is a `sandwarden harness` child process on a loopback port,
//! with its own token and working directory under the data dir.
//!
//! Sandboxes lead their own process group and outlive a restart of `serve`, which adopts them again
//! from the store. Exits of children started here are reported at once on a channel.
//!
//! With `--isolation bwrap` each sandbox runs under bubblewrap: the file system is read-only except
//! the sandbox's own working directory and HOME and a private `/tmp`, with its own PID, IPC and UTS namespaces. The
//! network is shared, since `serve` reaches the harness on a loopback port.

use super::{Runtime, RuntimeError, Sandbox, Template, Tokens};
use crate::harness::binary::HarnessProgram;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How local sandboxes are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// Plain child processes (the default): the agent can do what the user running `serve` can.
    None,
    /// Under bubblewrap (`bwrap`, Debian package `bubblewrap`); `serve` refuses to start if it
    /// does not work here.
    Bwrap,
    /// bubblewrap when it is installed and works here, plain processes otherwise.
    Auto,
}

impl Isolation {
    /// Settles `auto` and checks `bwrap` by running a trivial sandbox; the error says how to fix it.
    pub async fn resolve(self) -> Result<Isolation, String> {
        if self == Isolation::None {
            return Ok(self);
        }
        let probe = tokio::process::Command::new("bwrap")
            .args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"])
            .args(["--unshare-pid", "--die-with-parent", "--", "true"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .await;
        let problem = match probe {
            Ok(out) if out.status.success() => return Ok(Isolation::Bwrap),
            Ok(out) => format!(
                "bwrap cannot create a sandbox here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => format!("bwrap cannot be run ({e}); install the bubblewrap package"),
        };
        match self {
            Isolation::Auto => {
                tracing::info!(reason = %problem, "local sandboxes run without bubblewrap");
                Ok(Isolation::None)
            }
            _ => Err(format!(
                "{problem} (or start serve with --isolation none to run sandboxes as plain processes)"
            )),
        }
    }
}

/// Variables that would point an agent CLI at the operator's own config and state; a sandbox gets
/// its own under its HOME instead.
const RELOCATING_VARS: &[&str] = &[
    "CODEX_HOME",
    "CLAUDE_CONFIG_DIR",
    "OPENCODE_CONFIG",
    "OPENCODE_CONFIG_DIR",
    "OPENCODE_CONFIG_CONTENT",
];

pub struct LocalRuntime {
    root: PathBuf,
    /// Each sandbox's HOME, `data_dir/homes/<id>`: the CLIs write their config, caches and
    /// transcripts there, never in the operator's home nor in the session's working directory.
    homes: PathBuf,
    tokens: Tokens,
    exits: mpsc::UnboundedSender<String>,
    isolation: Isolation,
    /// The harness server's program: the slim `sandwarden-harness` of this build when present.
    program: HarnessProgram,
}

/// The variable every sandbox process is started with, naming its sandbox.
const SANDBOX_VAR: &str = "SANDWARDEN_SANDBOX";

/// `SANDWARDEN_SANDBOX=<id>`: how the runtime recognises a sandbox's processes in /proc.
fn mark(id: &str) -> String {
    format!("{SANDBOX_VAR}={id}")
}

impl LocalRuntime {
    /// Sandboxes live under `data_dir/sandboxes/<id>`; the id of every child that exits is sent
    /// on `exits`.
    /// `isolation` has been resolved (`Isolation::resolve`).
    pub fn new(
        data_dir: &std::path::Path,
        tokens: Tokens,
        exits: mpsc::UnboundedSender<String>,
        isolation: Isolation,
    ) -> std::io::Result<Self> {
        let program = HarnessProgram::for_this_binary()?;
        tracing::info!(program = %program.path.display(), "local sandboxes run this harness");
        Ok(LocalRuntime {
            root: data_dir.join("sandboxes"),
            homes: data_dir.join("homes"),
            tokens,
            exits,
            isolation,
            program,
        })
    }

    /// The program to start: the harness itself, or bubblewrap around it.
    fn command(
        &self,
        workdir: &std::path::Path,
        home: &std::path::Path,
    ) -> std::io::Result<tokio::process::Command> {
        let program = &self.program.path;
        if self.isolation != Isolation::Bwrap {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(&self.program.leading);
            return Ok(cmd);
        }
        let mut cmd = tokio::process::Command::new("bwrap");
        cmd.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"])
            .args(["--tmpfs", "/tmp"]);
        // Visible again over the private /tmp, wherever they were built: the harness, and the
        // `sandwarden` binary an agent's command line may name (the echo agent).
        let me = std::env::current_exe()?;
        for binary in std::collections::BTreeSet::from([program, &me]) {
            cmd.arg("--ro-bind").arg(binary).arg(binary);
        }
        cmd.arg("--bind")
            .arg(workdir)
            .arg(workdir)
            .arg("--bind")
            .arg(home)
            .arg(home)
            .arg("--chdir")
            .arg(workdir)
            // Killing bwrap (the group leader `destroy` signals) ends everything inside.
            .args([
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--die-with-parent",
            ])
            .arg("--")
            .arg(program)
            .args(&self.program.leading);
        Ok(cmd)
    }
}

fn signal_group(pid: i64, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

#[async_trait::async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(&self, id: &str, t: &Template) -> Result<Sandbox, RuntimeError> {
        let workdir = self.root.join(id);
        std::fs::create_dir_all(&workdir)?;
        let home = self.homes.join(id);
        std::fs::create_dir_all(&home)?;
        let mut cmd = self.command(&workdir, &home)?;
        let workdir_str = workdir.to_str().ok_or_else(|| {
            RuntimeError::Start(format!(
                "the sandbox directory {} is not valid UTF-8; choose a --data-dir with a UTF-8 path",
                workdir.display()
            ))
        })?;
        cmd.args(t.harness_flags("127.0.0.1:0", workdir_str))
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| {
                !k.starts_with("SANDWARDEN_") && !RELOCATING_VARS.contains(&k.as_str())
            }))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_DATA_HOME", home.join(".local/share"))
            .env("XDG_STATE_HOME", home.join(".local/state"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .envs(&t.env)
            .env("SANDWARDEN_TOKEN", self.tokens.for_sandbox(id))
            // Tells this sandbox's processes from later ones that reuse their numbers (`mark`).
            .env(SANDBOX_VAR, id)
            .env(
                "SANDWARDEN_LOG",
                std::env::var("SANDWARDEN_SANDBOX_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .current_dir(&workdir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            // Its own process group: a Ctrl-C to `serve` does not reach it, and stopping the group
            // stops the agent too.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Start(e.to_string()))?;
        let pid = child.id().map(i64::from);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| RuntimeError::Start("no stdout".into()))?;
        let mut line = String::new();
        let read = tokio::time::timeout(LISTEN_TIMEOUT, async {
            BufReader::new(stdout).read_line(&mut line).await
        })
        .await;
        let addr = match read {
            Ok(Ok(_)) => serde_json::from_str::<serde_json::Value>(&line)
                .ok()
                .and_then(|v| v["listening"].as_str().map(String::from)),
            _ => None,
        };
        let Some(addr) = addr else {
            let _ = child.start_kill();
            return Err(match read {
                Err(_) => RuntimeError::StartTimeout(LISTEN_TIMEOUT.as_secs()),
                _ => RuntimeError::Start(format!(
                    "the harness did not report its address (it printed {:?})",
                    line.trim()
                )),
            });
        };
        let exits = self.exits.clone();
        let sandbox_id = id.to_string();
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = exits.send(sandbox_id);
        });
        Ok(Sandbox {
            id: id.to_string(),
            template: t.name.clone(),
            endpoint: format!("http://{addr}"),
            pid,
        })
    }

    async fn destroy(&self, sandbox: &Sandbox) {
        // Only a group that is still this sandbox's: once its processes are gone and reaped, the
        // number may belong to another sandbox's group.
        let mark = mark(&sandbox.id);
        if let Some(pid) = sandbox.pid
            && crate::procfs::group_runs_with_env(pid, &mark)
        {
            signal_group(pid, Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while crate::procfs::runs_with_env(pid, &mark) && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if crate::procfs::group_runs_with_env(pid, &mark) {
                signal_group(pid, Signal::SIGKILL);
            }
        }
        for (base, dir) in [
            (&self.root, self.root.join(&sandbox.id)),
            (&self.homes, self.homes.join(&sandbox.id)),
        ] {
            if dir.starts_with(base) && dir != *base {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
    }

    async fn alive(&self, sandbox: &Sandbox) -> bool {
        let mark = mark(&sandbox.id);
        sandbox
            .pid
            .is_some_and(|pid| crate::procfs::runs_with_env(pid, &mark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn sleeper(env: Option<(&str, &str)>) -> std::process::Child {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30").process_group(0);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("sleep");
        // `spawn` returns once the exec has begun, before the kernel has laid out the new
        // program's environment: until then /proc/PID/environ reads empty. Bounded: 200 × 10 ms.
        for _ in 0..200 {
            if std::fs::read(format!("/proc/{}/environ", child.id()))
                .is_ok_and(|env| !env.is_empty())
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    fn recorded(id: &str, pid: u32) -> Sandbox {
        Sandbox {
            id: id.into(),
            template: "echo".into(),
            endpoint: "http://127.0.0.1:9".into(),
            pid: Some(i64::from(pid)),
        }
    }

    #[tokio::test]
    async fn a_sandbox_is_recognised_by_its_processes_not_by_a_reused_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exits, _) = mpsc::unbounded_channel();
        let runtime = LocalRuntime::new(
            dir.path(),
            Tokens::new(b"secret".to_vec()),
            exits,
            Isolation::None,
        )
        .expect("runtime");

        // Another group that got the number of a sandbox whose processes are gone.
        let mut other = sleeper(None);
        let stale = recorded("sbx_gone", other.id());
        assert!(
            !runtime.alive(&stale).await,
            "someone else's process is not the sandbox"
        );
        runtime.destroy(&stale).await;
        assert!(
            crate::procfs::alive(i64::from(other.id())),
            "destroying the stale sandbox must not signal the group that reused its number"
        );

        // The sandbox's own group is recognised and stopped.
        let mut own = sleeper(Some((SANDBOX_VAR, "sbx_own")));
        let sandbox = recorded("sbx_own", own.id());
        assert!(runtime.alive(&sandbox).await);
        runtime.destroy(&sandbox).await;
        let status = own.wait().expect("wait");
        assert!(
            !status.success(),
            "the sandbox's group was signalled: {status:?}"
        );

        let _ = other.kill();
        let _ = other.wait();
    }
}
