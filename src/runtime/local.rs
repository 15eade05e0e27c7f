//! The local runtime: each sandbox is a `sandwarden harness` child process on a loopback port,
//! with its own token and working directory under the data dir.
//!
//! Sandboxes lead their own process group and outlive a restart of `serve`, which adopts them again
//! from the store. Exits of children started here are reported at once on a channel.

use super::{Runtime, RuntimeError, Sandbox, Template, Tokens};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_secs(3);

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
}

impl LocalRuntime {
    /// Sandboxes live under `data_dir/sandboxes/<id>`; the id of every child that exits is sent
    /// on `exits`.
    pub fn new(
        data_dir: &std::path::Path,
        tokens: Tokens,
        exits: mpsc::UnboundedSender<String>,
    ) -> Self {
        LocalRuntime {
            root: data_dir.join("sandboxes"),
            homes: data_dir.join("homes"),
            tokens,
            exits,
        }
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
        let me = std::env::current_exe()?;
        let mut cmd = tokio::process::Command::new(me);
        cmd.arg("harness")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--kind", &t.kind])
            .arg(if t.kind == "api" {
                "--agent"
            } else {
                "--command"
            })
            .arg(&t.command)
            .arg("--workdir")
            .arg(&workdir)
            .args(["--start", &t.start])
            .args(["--turn-timeout", &t.turn_timeout_s.to_string()])
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
        if let Some(pid) = sandbox.pid {
            signal_group(pid, Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while crate::procfs::alive(pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            signal_group(pid, Signal::SIGKILL);
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
        sandbox.pid.is_some_and(crate::procfs::alive)
    }
}
