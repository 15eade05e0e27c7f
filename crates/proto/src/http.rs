//! The HTTP/1.1 accept loop both servers (`serve` and the in-sandbox `harness`) run, with bounds
//! on slow and hostile clients that `axum::serve` does not set: a deadline for a request's
//! headers (slowloris, and idle keep-alive connections), for each piece of its body, and a cap on
//! open connections. It knows nothing of routes or sessions: what the app keeps per connection
//! (serve: the tenant it counts against) is an opaque `ConnectionState`.

use axum::Router;
use axum::http::{Request, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::any::Any;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// How long a client may take over things it alone controls.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// From the connection opening (or the previous response) to the end of the request's
    /// headers; a client past it is disconnected without a response.
    pub headers: Duration,
    /// Longest pause between two pieces of a request body; the request then fails with 408.
    pub body_idle: Duration,
    /// Most connections open at once; at the cap no more are accepted until one closes (new ones
    /// wait in the kernel's listen backlog). `None`: no cap.
    pub max_connections: Option<usize>,
    /// Most connections accepted but not yet settled (their first request answered, or let
    /// through by the app, see `ConnectionState::settle`); at the cap no more are accepted until
    /// one settles or closes. A flood of new connections then waits in the kernel's backlog
    /// instead of filling the runtime's queue ahead of established connections' requests.
    /// `None`: no cap.
    pub max_unsettled: Option<usize>,
    /// While most new connections are refused (see `Intake`), at most one is accepted per this
    /// long: a flood of connections that will only be told no waits in the kernel's backlog,
    /// where it costs no CPU, instead of taking the cores from established connections' requests.
    /// `None`: accept as fast as connections come.
    pub refused_pace: Option<Duration>,
}

impl ClientLimits {
    /// Both time bounds set to `secs` seconds (at least one), no cap on connections.
    pub fn seconds(secs: u64) -> Self {
        let d = Duration::from_secs(secs.max(1));
        ClientLimits {
            headers: d,
            body_idle: d,
            max_connections: None,
            max_unsettled: None,
            refused_pace: None,
        }
    }
}

/// How the first answers of recent new connections went: refused (`401` or `429`, the
/// connection closed with it) or not. A window over about the last `INTAKE_WINDOW`
/// connections, halved as it fills so older ones weigh less, and started over after
/// `INTAKE_QUIET` without a new connection (a flood that stopped paces nothing after it).
#[derive(Default)]
struct Intake {
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    refused: u32,
    all: u32,
    last: Option<std::time::Instant>,
}

/// A pause in new connections after which `Intake` forgets what came before it.
const INTAKE_QUIET: Duration = Duration::from_secs(2);

/// Connections `Intake` looks back over.
const INTAKE_WINDOW: u32 = 256;
/// Fewest recent connections `Intake` judges by: a few refusals on a quiet server pace nothing.
const INTAKE_MIN: u32 = 64;

impl Intake {
    fn record(&self, refused: bool) {
        self.record_at(refused, std::time::Instant::now());
    }

    fn record_at(&self, refused: bool, now: std::time::Instant) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.last
            .is_some_and(|at| now.saturating_duration_since(at) > INTAKE_QUIET)
        {
            *w = Window::default();
        }
        w.last = Some(now);
        w.refused += u32::from(refused);
        w.all += 1;
        if w.all >= INTAKE_WINDOW {
            (w.refused, w.all) = (w.refused / 2, w.all / 2);
        }
    }

    /// Whether at least three in four recent new connections were refused.
    fn mostly_refused(&self) -> bool {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        w.all >= INTAKE_MIN && w.refused * 4 >= w.all * 3
    }

    #[cfg(test)]
    fn counts(&self) -> (u32, u32) {
        let w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        (w.refused, w.all)
    }
}

/// What the app keeps about one connection while it is open: every request on the connection
/// carries the same one as an extension, and it is dropped when the socket closes (after a
/// WebSocket upgrade too).
#[derive(Clone, Default)]
pub struct ConnectionState {
    kept: Arc<Mutex<Option<Box<dyn Any + Send>>>>,
    unsettled: Arc<Mutex<Option<OwnedSemaphorePermit>>>,
    /// Where the connection's first answer is counted, until it has been.
    first_answer: Arc<Mutex<Option<Arc<Intake>>>>,
}

impl ConnectionState {
    /// Runs `f` on what is kept for this connection (`None` until the app keeps something).
    pub fn with<R>(&self, f: impl FnOnce(&mut Option<Box<dyn Any + Send>>) -> R) -> R {
        f(&mut self.kept.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The connection is known now (the app let its request through, or it was answered): it
    /// no longer counts under `ClientLimits::max_unsettled`.
    pub fn settle(&self) {
        self.unsettled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// The connection's response: settles it, and counts its first as `refused()` or not
    /// (asked of the first alone).
    fn answered(&self, refused: impl FnOnce() -> bool) {
        self.settle();
        let first = self
            .first_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(intake) = first {
            intake.record(refused());
        }
    }
}

/// An accepted socket with what lives exactly as long as it: its place under the connection cap
/// and the app's state for it.
struct Held {
    io: Accepted,
    _permit: Option<OwnedSemaphorePermit>,
    _state: ConnectionState,
}

/// Runs `$call` on the accepted socket, whichever kind it is.
macro_rules! on_socket {
    ($held:expr, |$io:ident| $call:expr) => {
        match &mut $held.io {
            Accepted::Tcp($io) => $call,
            Accepted::Unix($io) => $call,
        }
    };
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        on_socket!(self, |io| Pin::new(io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        on_socket!(self, |io| Pin::new(io).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        on_socket!(self, |io| Pin::new(io).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Accepted::Tcp(io) => io.is_write_vectored(),
            Accepted::Unix(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_socket!(self, |io| Pin::new(io).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        on_socket!(self, |io| Pin::new(io).poll_shutdown(cx))
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
    // HTTP/1.1 only. hyper's own HTTP/1 connection, not hyper-util's `auto` one: `auto` first
    // reads the request's opening bytes to tell the HTTP version, with no deadline, so a
    // connection that sent nothing was never closed; here the header deadline runs from the start.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.headers);
    let connections = TaskTracker::new();
    let listener = listener.into();
    let cap = limits.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let unsettled = limits.max_unsettled.map(|n| Arc::new(Semaphore::new(n)));
    let intake = Arc::new(Intake::default());
    let mut warned: Option<std::time::Instant> = None;
    loop {
        if let Some(pace) = limits.refused_pace
            && intake.mostly_refused()
        {
            tokio::select! {
                () = tokio::time::sleep(pace) => {}
                () = shutdown.cancelled() => break,
            }
        }
        let permit = match &cap {
            None => None,
            Some(cap) => tokio::select! {
                permit = room(cap, &mut warned) => permit,
                () = shutdown.cancelled() => break,
            },
        };
        let new_one = match &unsettled {
            None => None,
            Some(unsettled) => tokio::select! {
                permit = unsettled.clone().acquire_owned() => permit.ok(),
                () = shutdown.cancelled() => break,
            },
        };
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
        if let Accepted::Tcp(tcp) = &accepted
            && let Err(e) = tcp.set_nodelay(true)
        {
            tracing::trace!(error = %e, "setting TCP_NODELAY failed");
        }
        let state = ConnectionState {
            unsettled: Arc::new(Mutex::new(new_one)),
            first_answer: Arc::new(Mutex::new(Some(intake.clone()))),
            ..ConnectionState::default()
        };
        let (for_requests, for_responses) = (state.clone(), state.clone());
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(move |req: Request<Incoming>| {
                    let mut req = req.map(axum::body::Body::new);
                    req.extensions_mut().insert(for_requests.clone());
                    req
                })
                .map_response(move |response: axum::response::Response| {
                    for_responses.answered(|| refuses(&response));
                    response
                }),
        );
        let io = Held {
            io: accepted,
            _permit: permit,
            _state: state,
        };
        let conn = builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = stop.cancelled() => {
                    // Let the request in progress finish, then close.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Most connections the kernel holds for `serve` before it accepts them (it caps this at
/// `net.core.somaxconn`). A flood waits here while serve paces or caps its accepts; with too
/// short a queue, the kernel drops the flood's handshakes and clients retry after backing off
/// for seconds (a new client's connection among them).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Whether `response` refuses its client: `401` or `429`, closing the connection with it.
fn refuses(response: &axum::response::Response) -> bool {
    matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
    ) && response
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
}

/// A TCP listener on `addr` with `LISTEN_BACKLOG` (tokio's `bind` gives 1,024).
pub fn listen_tcp(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A place under the connection cap: at once when there is one, else once a connection closes
/// (saying so at most every 10 s). Meanwhile nothing is accepted, so new connections wait in the
/// kernel's backlog instead of failing for want of file descriptors.
async fn room(
    cap: &Arc<Semaphore>,
    warned: &mut Option<std::time::Instant>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = cap.clone().try_acquire_owned() {
        return Some(permit);
    }
    if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(10)) {
        tracing::warn!("at the connection cap (--max-connections): waiting for one to close");
        *warned = Some(std::time::Instant::now());
    }
    cap.clone().acquire_owned().await.ok()
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
    announce_with(addr, None);
}

/// The listen line with the probes' own address too, when they have one.
pub fn announce_with(addr: &str, probes: Option<&str>) {
    use std::io::Write;
    let mut line = serde_json::json!({ "listening": addr });
    if let Some(probes) = probes {
        line["probes"] = probes.into();
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_paces_only_while_most_new_connections_are_refused() {
        let intake = Intake::default();
        for _ in 0..INTAKE_MIN - 1 {
            intake.record(true);
        }
        assert!(!intake.mostly_refused(), "too few to judge by");
        intake.record(true);
        assert!(intake.mostly_refused(), "all refused");
        // Connections let through outweigh the refusals again: pacing stops.
        for _ in 0..INTAKE_MIN {
            intake.record(false);
        }
        assert!(!intake.mostly_refused(), "half let through");
        // A long quiet stretch fills the window and halves it; old refusals fade.
        for _ in 0..4 * INTAKE_WINDOW {
            intake.record(false);
        }
        let (refused, all) = intake.counts();
        assert!(all < INTAKE_WINDOW && refused < 4, "{refused} of {all}");
    }

    #[test]
    fn a_pause_in_new_connections_starts_the_window_over() {
        let intake = Intake::default();
        let t0 = std::time::Instant::now();
        for _ in 0..INTAKE_MIN {
            intake.record_at(true, t0);
        }
        assert!(intake.mostly_refused());
        intake.record_at(false, t0 + INTAKE_QUIET + Duration::from_millis(1));
        assert!(
            !intake.mostly_refused(),
            "the flood before the pause is forgotten"
        );
        assert_eq!(intake.counts(), (0, 1));
    }

    #[test]
    fn a_connection_counts_once_at_its_first_answer() {
        let intake = Arc::new(Intake::default());
        let state = ConnectionState {
            first_answer: Arc::new(Mutex::new(Some(intake.clone()))),
            ..ConnectionState::default()
        };
        // Let through before its handler refused it: the answer is what counts.
        state.settle();
        state.answered(|| true);
        state.answered(|| panic!("only the first answer is looked at"));
        assert_eq!(intake.counts(), (1, 1));
    }
}
