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
use tokio::net::TcpListener;
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

/// Serves `app` on `listener` until `shutdown`, then lets open requests finish (the caller bounds
/// how long it waits). Accepted sockets send small writes at once (`TCP_NODELAY`): SSE events
/// and terminal echo must not wait for Nagle's algorithm and the peer's delayed ACK.
pub async fn serve(
    listener: TcpListener,
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
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::trace!(error = %e, "setting TCP_NODELAY failed");
        }
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: Request<Incoming>| req.map(axum::body::Body::new)),
        );
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
