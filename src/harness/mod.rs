//! `sandwarden harness`: the small server inside every sandbox.
//!
//! It drives one agent over ACP (api kind) or one program under a PTY (tui kind) and exposes both
//! behind a bearer token. It depends only on the shared vocabulary (`event`, `problem`), never on
//! the orchestrator.

pub mod acp;
pub mod binary;
pub mod bind;
pub mod config;
pub mod egress;
pub mod map;
pub mod process;
pub mod pty;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Api,
    Tui,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Start the agent with the server.
    Boot,
    /// Start it at `POST /v1/bind` (or at the first turn/attach if no bind comes).
    Bind,
}

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
    pub kind: Kind,
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

    let shutdown = CancellationToken::new();
    let cfg = Arc::new(cfg);
    let driver = match cfg.kind {
        Kind::Api => Driver::Api(acp::ApiAgent::new(cfg.clone(), shutdown.clone())),
        Kind::Tui => Driver::Tui(pty::Terminal::new(cfg.clone(), shutdown.clone())),
    };
    let app = routes::router(cfg.clone(), driver.clone());

    cancel_on_signals(shutdown.clone())?;

    let limits = crate::http::ClientLimits {
        headers: cfg.client_timeout,
        body_idle: cfg.client_timeout,
        // serve is the only client, and holds few connections to a sandbox.
        max_connections: None,
        max_unsettled: None,
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

/// Accepted connections send small writes at once: SSE events and terminal echo must not wait
/// for Nagle's algorithm and the peer's delayed ACK (a 40 ms stall per event otherwise).
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::trace!(error = %e, "setting TCP_NODELAY failed");
        }
    })
}

/// One machine-readable line on stdout, so whoever started us learns the address. If nobody
/// reads it any more (the parent went away), that is not our failure.
pub fn announce(addr: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::json!({ "listening": addr }));
    let _ = out.flush();
}

/// The first SIGTERM/SIGINT cancels `shutdown` (a graceful stop); a second exits at once.
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut signals = Signals::new()?;
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("shutting down");
        shutdown.cancel();
        signals.next().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(())
}

/// SIGTERM and SIGINT, registered once so a second signal is never confused with the first.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
