//! The harness server's flags (`sandwarden harness`, `sandwarden-harness`): every one can also be
//! set by a `SANDWARDEN_*` environment variable, and `into_config` checks them into a
//! `HarnessConfig` whose errors name the flag to fix.

use crate::{HarnessConfig, HarnessKind, StartMode};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct HarnessArgs {
    /// Address to listen on: HOST:PORT (port 0 picks a free port) or unix:PATH; the address is
    /// printed on stdout.
    #[arg(long, env = "SANDWARDEN_LISTEN", default_value = "127.0.0.1:7600")]
    pub listen: crate::ListenAddr,
    /// Bearer token every request must carry. Prefer the environment variable or --token-file:
    /// a flag is visible to other users in `ps`.
    #[arg(long, env = "SANDWARDEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token (trailing whitespace is ignored).
    #[arg(long, env = "SANDWARDEN_TOKEN_FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// `api`: an ACP agent over stdio; `tui`: a program under a PTY.
    #[arg(long, env = "SANDWARDEN_KIND", value_enum)]
    pub kind: HarnessKind,
    /// The ACP agent's command line (api kind), e.g. "sandwarden echo-agent" or "opencode acp".
    #[arg(long, env = "SANDWARDEN_AGENT")]
    pub agent: Option<String>,
    /// The program's command line (tui kind), e.g. "bash" or "claude".
    #[arg(long, env = "SANDWARDEN_COMMAND")]
    pub command: Option<String>,
    /// Working directory of the agent or program (default: the current directory).
    #[arg(long, env = "SANDWARDEN_WORKDIR")]
    pub workdir: Option<PathBuf>,
    /// When to start the agent or program.
    #[arg(long, env = "SANDWARDEN_START", value_enum, default_value = "boot")]
    pub start: StartMode,
    /// Longest a turn may run, in seconds; a request may ask for less.
    #[arg(long, env = "SANDWARDEN_TURN_TIMEOUT", default_value_t = 1800)]
    pub turn_timeout: u64,
    /// Longest the agent may take to answer ACP initialize and session/new, in seconds.
    #[arg(long, env = "SANDWARDEN_BOOT_TIMEOUT", default_value_t = 120)]
    pub boot_timeout: u64,
    /// How long a cancelled turn may take to stop before it is ended as cancelled, in seconds.
    #[arg(long, env = "SANDWARDEN_CANCEL_GRACE", default_value_t = 5)]
    pub cancel_grace: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SANDWARDEN_MAX_REQUEST_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Seconds a client may take to send a request's headers, or pause within its body.
    #[arg(long, env = "SANDWARDEN_CLIENT_TIMEOUT", default_value_t = 30)]
    pub client_timeout: u64,
    /// Recent terminal output kept for re-attaching clients, in bytes (at least 65536).
    #[arg(long, env = "SANDWARDEN_REPLAY_BYTES", default_value_t = 256 * 1024)]
    pub replay_bytes: usize,
    /// Terminal size before any client sets one, as COLSxROWS.
    #[arg(long, env = "SANDWARDEN_TTY_SIZE", default_value = "120x40")]
    pub tty_size: String,
    /// On SIGTERM, how long the agent's process group gets before SIGKILL, in seconds.
    #[arg(long, env = "SANDWARDEN_SHUTDOWN_GRACE", default_value_t = 5)]
    pub shutdown_grace: u64,
    /// A sandbox whose network is its own reaches out only through this Unix socket, an egress
    /// proxy outside the sandbox that applies the egress policy (a local sandbox under bubblewrap).
    #[arg(long, env = "SANDWARDEN_EGRESS_SOCKET")]
    pub egress_socket: Option<PathBuf>,
    /// With --egress-socket: listen on this loopback address inside the sandbox and carry each
    /// connection to the same address outside (repeatable; e.g. a model server on 127.0.0.1).
    #[arg(
        long = "egress-forward",
        env = "SANDWARDEN_EGRESS_FORWARD",
        value_delimiter = ',',
        requires = "egress_socket"
    )]
    pub egress_forwards: Vec<SocketAddr>,
    /// With --egress-socket: an HTTP proxy (CONNECT, or absolute-form http://) on this loopback
    /// address inside the sandbox; HTTPS_PROXY should name it.
    #[arg(long, env = "SANDWARDEN_EGRESS_PROXY", requires = "egress_socket")]
    pub egress_proxy: Option<SocketAddr>,
}

impl HarnessArgs {
    /// Turns flags into a checked configuration; every error says which flag to fix.
    pub fn into_config(self) -> anyhow::Result<HarnessConfig> {
        let token = match (self.token, self.token_file) {
            (Some(t), None) => t,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .with_context(|| format!("reading --token-file {}", path.display()))?
                .trim_end()
                .to_string(),
            _ => anyhow::bail!(
                "a bearer token is required: set SANDWARDEN_TOKEN, --token-file or --token"
            ),
        };
        anyhow::ensure!(
            token.len() >= 8,
            "the token must be at least 8 characters long"
        );
        let (kind, line) = match (self.kind, self.agent, self.command) {
            (HarnessKind::Api, Some(agent), None) => (HarnessKind::Api, agent),
            (HarnessKind::Tui, None, Some(command)) => (HarnessKind::Tui, command),
            (HarnessKind::Api, _, _) => {
                anyhow::bail!("--kind api needs --agent \"CMD ARGS\" (and no --command)")
            }
            (HarnessKind::Tui, _, _) => {
                anyhow::bail!("--kind tui needs --command \"CMD ARGS\" (and no --agent)")
            }
        };
        let argv = crate::process::parse_command_line(&line)?;
        let workdir = match self.workdir {
            Some(dir) => dir,
            None => std::env::current_dir().context("reading the current directory")?,
        };
        anyhow::ensure!(
            workdir.is_dir(),
            "--workdir {} is not a directory",
            workdir.display()
        );
        anyhow::ensure!(
            self.replay_bytes >= 64 * 1024,
            "--replay-bytes must be at least 65536"
        );
        anyhow::ensure!(self.turn_timeout >= 1, "--turn-timeout must be at least 1");
        let tty_size = parse_size(&self.tty_size)?;
        Ok(HarnessConfig {
            listen: self.listen,
            token,
            kind,
            argv,
            workdir,
            start: self.start,
            turn_timeout: Duration::from_secs(self.turn_timeout),
            boot_timeout: Duration::from_secs(self.boot_timeout),
            cancel_grace: Duration::from_secs(self.cancel_grace),
            max_request_bytes: self.max_request_bytes,
            client_timeout: Duration::from_secs(self.client_timeout.max(1)),
            replay_bytes: self.replay_bytes,
            tty_size,
            shutdown_grace: Duration::from_secs(self.shutdown_grace),
            egress: self.egress_socket.map(|socket| crate::egress::Relay {
                socket,
                forwards: self.egress_forwards,
                proxy: self.egress_proxy,
            }),
        })
    }
}

fn parse_size(s: &str) -> anyhow::Result<(u16, u16)> {
    let parsed = s
        .split_once('x')
        .and_then(|(c, r)| Some((c.parse::<u16>().ok()?, r.parse::<u16>().ok()?)));
    match parsed {
        Some((cols, rows)) if cols > 0 && rows > 0 => Ok((cols, rows)),
        _ => anyhow::bail!("--tty-size must look like 120x40 (columns x rows), got {s:?}"),
    }
}

/// `sandwarden harness` and the `sandwarden-harness` binary.
pub fn run_harness(args: HarnessArgs) -> anyhow::Result<()> {
    sandwarden_proto::logs::init();
    // The agent runs as this process's user, in its sandbox: not dumpable, this process's
    // /proc/PID/environ (its token) and memory need CAP_SYS_PTRACE, which the agent never holds.
    // The agent's own process is dumpable again (exec resets it), as any program.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "could not make the harness undumpable");
    }
    let config = args.into_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(crate::run(config))
}
