//! The HTTP/1.1 accept loop both servers (`serve` and the in-sandbox `harness`) run, with bounds
//! on slow and hostile clients that `axum::serve` does not set: a deadline for a request's
//! headers (slowloris) and for each piece of its body. It knows nothing of routes or sessions.

use axum::Router;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a client may take over things it alone controls.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// From the connection opening (or the previous response) to the end of the request's
    /// headers; a client past it is disconnected without a response.
    pub headers: Duration,
    /// Longest pause between two pieces of a request body; the request then fails with 408.
    pub body_idle: Duration,
}

impl ClientLimits {
    /// Both bounds set to `secs` seconds (at least one).
    pub fn seconds(secs: u64) -> Self {
        let d = Duration::from_secs(secs.max(1));
        ClientLimits {
            headers: d,
            body_idle: d,
        }
    }
}

/// Where a server takes connections: a TCP port, or a Unix socket (a local sandbox's harness,
/// which has no network of its own that `serve` could reach).
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

/// An accepted connection of either kind.
enum Accepted {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(tcp, _)| Accepted::Tcp(tcp)),
            Listener::Unix(l) => l.accept().await.map(|(unix, _)| Accepted::Unix(unix)),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets open requests finish (the caller bounds
/// how long it waits). Accepted TCP sockets send small writes at once (`TCP_NODELAY`): SSE events
/// and terminal echo must not wait for Nagle's algorithm and the peer's delayed ACK.
pub async fn serve(
    listener: impl Into<Listener>,
    app: Router,
    limits: ClientLimits,
    shutdown: CancellationToken,
) {
    let app = app.layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
        limits.body_idle,
    ));
    // HTTP/1.1 only, as before: the header deadline below is an HTTP/1 setting.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.headers);
    let graceful = GracefulShutdown::new();
    let listener = listener.into();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: Request<Incoming>| req.map(axum::body::Body::new)),
        );
        match accepted {
            Accepted::Tcp(tcp) => {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::trace!(error = %e, "setting TCP_NODELAY failed");
                }
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                tokio::spawn(finish(graceful.watch(conn.into_owned())));
            }
            Accepted::Unix(unix) => {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(unix), service);
                tokio::spawn(finish(graceful.watch(conn.into_owned())));
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Runs one connection to its end; how it ended matters only when tracing.
async fn finish<E: std::fmt::Display>(conn: impl std::future::Future<Output = Result<(), E>>) {
    if let Err(e) = conn.await {
        tracing::trace!(error = %e, "connection ended with an error");
    }
}

/// Accepted connections send small writes at once: SSE events and terminal echo must not wait
/// for Nagle's algorithm and the peer's delayed ACK (a 40 ms stall per event otherwise).
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
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
