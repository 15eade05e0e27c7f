//! `sandwarden harness`: the small server inside every sandbox.
//!
//! It drives one agent over ACP (api kind) or one program under a PTY (tui kind) and exposes both
//! behind a bearer token. It depends only on the shared vocabulary (`sandwarden-proto`), never on
//! the orchestrator: the compiler holds it to that. `echo_agent` and `launch` run inside the
//! sandbox too.

pub mod acp;
pub mod args;
pub mod binary;
pub mod bind;
pub mod client_tools;
pub mod config;
pub mod echo_agent;
pub mod egress;
pub mod files;
pub mod launch;
pub mod map;
pub mod process;
pub mod pty;
pub mod routes;

use sandwarden_proto::http::{announce, cancel_on_signals};
pub use sandwarden_proto::kind::{HarnessKind, StartMode};
pub(crate) use sandwarden_proto::{event, http, problem};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where the harness server listens: a TCP address (containers, Pods), or a Unix socket (a local
/// sandbox, whose network namespace `serve` cannot reach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path, e.g. unix:/run/harness.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse()
            .map(ListenAddr::Tcp)
            .map_err(|_| format!("{s:?} is neither HOST:PORT (e.g. 127.0.0.1:7600) nor unix:PATH"))
    }
}

/// Everything the harness server needs, checked by the CLI layer.
#[derive(Clone)]
pub struct HarnessConfig {
    pub listen: ListenAddr,
    pub token: String,
    pub kind: HarnessKind,
    pub argv: Vec<String>,
    pub workdir: PathBuf,
    pub start: StartMode,
    pub turn_timeout: Duration,
    pub boot_timeout: Duration,
    pub cancel_grace: Duration,
    pub max_request_bytes: usize,
    /// Longest a client may take over a request's headers, or pause within its body.
    pub client_timeout: Duration,
    pub replay_bytes: usize,
    pub tty_size: (u16, u16),
    pub shutdown_grace: Duration,
    /// The sandbox's way out, when its network is its own (a local sandbox under bubblewrap).
    pub egress: Option<egress::Relay>,
}

impl std::fmt::Debug for HarnessConfig {
    // The token is a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HarnessConfig")
            .field("listen", &self.listen)
            .field("kind", &self.kind)
            .field("argv", &self.argv)
            .field("workdir", &self.workdir)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// The one driver this server runs.
#[derive(Clone)]
pub enum Driver {
    Api(Arc<acp::ApiAgent>),
    Tui(Arc<pty::Terminal>),
}

impl Driver {
    async fn stop(&self) {
        match self {
            Driver::Api(a) => a.stop().await,
            Driver::Tui(t) => t.stop().await,
        }
    }
}

/// Runs the server until SIGTERM/SIGINT; a second signal exits at once.
pub async fn run(cfg: HarnessConfig) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone())?;
    serve(cfg, shutdown).await
}

/// Runs the server until `shutdown` is cancelled, then stops the agent or program and gives
/// open responses a moment. `run` cancels it on a signal; a test hosting the server in its own
/// process cancels it itself.
pub async fn serve(cfg: HarnessConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener: crate::http::Listener = match &cfg.listen {
        ListenAddr::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
            let addr = listener.local_addr()?;
            announce(&addr.to_string());
            tracing::info!(%addr, kind = ?cfg.kind, "harness server listening");
            listener.into()
        }
        ListenAddr::Unix(path) => {
            let listener = tokio::net::UnixListener::bind(path).map_err(|e| {
                anyhow::anyhow!("cannot listen on the socket {}: {e}", path.display())
            })?;
            let shown = format!("unix:{}", path.display());
            announce(&shown);
            tracing::info!(addr = %shown, kind = ?cfg.kind, "harness server listening");
            listener.into()
        }
    };
    if let Some(relay) = &cfg.egress {
        relay
            .start()
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the sandbox's way out: {e}"))?;
    }

    let cfg = Arc::new(cfg);
    let driver = match cfg.kind {
        HarnessKind::Api => Driver::Api(acp::ApiAgent::new(cfg.clone(), shutdown.clone())),
        HarnessKind::Tui => Driver::Tui(pty::Terminal::new(cfg.clone(), shutdown.clone())),
    };
    let app = routes::router(cfg.clone(), driver.clone());

    let limits = crate::http::ClientLimits {
        headers: cfg.client_timeout,
        body_idle: cfg.client_timeout,
        // serve is the only client, and holds few connections to a sandbox.
        max_connections: None,
        max_unsettled: None,
        refused_pace: None,
    };
    let server = tokio::spawn(crate::http::serve(listener, app, limits, shutdown.clone()));
    shutdown.cancelled().await;
    driver.stop().await;
    // Turns end and viewers are closed by the shutdown token; give the responses a moment.
    match tokio::time::timeout(Duration::from_secs(3), server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
        Err(_) => tracing::warn!("connections still open after shutdown; closing them"),
    }
    Ok(())
}
