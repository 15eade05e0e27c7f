//! `GET /v1/sessions/{id}/tty`: bridges a client WebSocket to the session's harness PTY.
//!
//! Authorized by the API key or by the short-lived token in the session's `tty_url`; browser
//! upgrades must come from an allowed Origin. Frames pass through unchanged both ways.

use super::{AppState, caller_from};
use crate::session::SessionError;
use axum::extract::ws::{CloseFrame, Message as AxMessage, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message as TMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as TCloseFrame;
use tokio_util::sync::CancellationToken;

/// How long the close frame to a viewer being let go may take (it is behind unread output).
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// WebSocket read buffer per side of the bridge. Terminal frames are small; the 128 KiB default
/// would cost a quarter MiB per attached terminal.
const WS_BUFFER: usize = 8 * 1024;

fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(1024 * 1024))
}

#[derive(Deserialize)]
pub struct TtyQuery {
    token: Option<String>,
}

fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true; // not a browser
    };
    if allowed.iter().any(|a| a == origin || a == "*") {
        return true;
    }
    // Same origin: the Origin's host:port is the Host the request was sent to.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| !host.is_empty() && rest == host)
}

pub async fn attach(
    State(orch): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<TtyQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, Problem> {
    // A tty token is for the session's id; with a key, the tenant's name for it works too.
    sandwarden_proto::event::validate_id("session id", &id)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    // Terminals opened with a tty token count against the server's default limit; with a key,
    // against the key's.
    let mut max_streams = orch.config.default_limits.open_streams;
    // The key a terminal was opened with, if any: its revocation ends the terminal.
    let mut key_hash = None;
    let session = match &q.token {
        Some(token) => {
            if !orch.check_tty_token(&id, token) {
                return Err(Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the tty token is wrong or expired; fetch the session again for a fresh tty_url",
                ));
            }
            orch.store
                .get_session_any(&id)
                .await?
                .ok_or_else(|| SessionError::NotFound(id.clone()))?
        }
        None => {
            let caller = caller_from(&orch, &headers).await?;
            max_streams = caller.limits.open_streams;
            key_hash = Some(caller.key_hash.clone());
            orch.get(&caller.tenant, &super::session_path(&caller.tenant, &id)?)
                .await?
        }
    };
    if !origin_allowed(&headers, &orch.config.allowed_origins) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not attach terminals; an operator can allow it with --allowed-origin",
        ));
    }
    if session.kind != "tui" {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not_a_terminal",
            "this session runs an API agent; send it messages with POST /v1/sessions/{id}/messages",
        ));
    }
    if !session.status.is_live() {
        return Err(crate::session::turn::not_usable(&session).into());
    }
    let ws = ws.map_err(|e| {
        Problem::new(
            e.status(),
            "websocket_required",
            "this route is a WebSocket; connect with a WebSocket client",
        )
    })?;
    let (Some(sandbox_id), Some(endpoint)) = (&session.sandbox_id, &session.endpoint) else {
        return Err(SessionError::NotFound(id).into());
    };
    let slot = orch.streams.open(&session.tenant, max_streams)?;
    let client = orch.client_for(sandbox_id, endpoint);
    let upstream = match client.tty_connect(ws_config()).await {
        Ok(upstream) => upstream,
        // The same rule as on the message path: probe the harness, dead if it cannot connect.
        Err(tokio_tungstenite::tungstenite::Error::Io(e)) => {
            if orch.probe_dead(&session).await {
                return Err(SessionError::Unreachable { turn_id: None }.into());
            }
            return Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "harness_error",
                format!("the session's terminal could not be opened ({e}); try again"),
            ));
        }
        Err(e) => {
            // Refused because its program could not be run or has ended: the session is dead.
            if orch.check_agent(&session).await {
                let dead = orch.store.get_session_any(&session.id).await;
                if let Ok(Some(dead)) = dead {
                    return Err(crate::session::turn::not_usable(&dead).into());
                }
            }
            return Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "harness_error",
                format!("the terminal could not be opened: {e}"),
            ));
        }
    };
    let session_id = session.id.clone();
    Ok(ws
        .max_message_size(1024 * 1024)
        .read_buffer_size(WS_BUFFER)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            orch.viewer_attached(&session_id);
            let _ = orch.store.touch(&session_id).await;
            // The replica that owns the sandbox reaps idle sessions and cannot see viewers
            // attached here: a watched session stays active in the shared store instead.
            let keep_active = orch.store.is_shared().then(|| {
                let store = orch.store.clone();
                let id = session_id.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                    loop {
                        tick.tick().await;
                        let _ = store.touch(&id).await;
                    }
                })
            });
            // Serve stopping or, for a terminal opened with a key, the key's revocation.
            let stop = orch.shutdown.child_token();
            let _watching = key_hash.map(|hash| orch.on_revocation(hash, stop.clone()));
            let (c_tx, c_rx) = socket.split();
            let (u_tx, u_rx) = upstream.split();
            tracing::Instrument::instrument(
                pump(
                    Client { tx: c_tx, rx: c_rx },
                    Client { tx: u_tx, rx: u_rx },
                    orch.config.client_timeout,
                    Stop {
                        token: stop,
                        shutdown: orch.shutdown.clone(),
                    },
                ),
                tracing::info_span!("terminal", session_id = %session_id),
            )
            .await;
            if let Some(task) = keep_active {
                task.abort();
            }
            // The terminal closes when its program ends: then the session is dead.
            orch.check_agent(&session).await;
            let _ = orch.store.touch(&session_id).await;
            orch.viewer_detached(&session_id);
        })
        .into_response())
}

/// What lets a viewer go from outside the bridge: `token`, cancelled when serve stops
/// (`shutdown`) or when the key the terminal was opened with is revoked.
struct Stop {
    token: CancellationToken,
    shutdown: CancellationToken,
}

impl Stop {
    fn why(&self) -> CloseFrame {
        if self.shutdown.is_cancelled() {
            CloseFrame {
                code: 1001,
                reason: "server shutting down".into(),
            }
        } else {
            CloseFrame {
                code: 1008,
                reason: "the API key was revoked".into(),
            }
        }
    }
}

/// One side of the bridge: where frames go to it, and where its frames come from (the halves of
/// a WebSocket; channels in the tests).
struct Client<Tx, Rx> {
    tx: Tx,
    rx: Rx,
}

/// Copies frames both ways until either side closes; a close is passed on with its code. A
/// client that leaves output unread for `stall` is let go (1013, as the harness does with a
/// viewer that falls behind): otherwise its connection, and this task, would stay blocked on it
/// for as long as it stays connected, and serve would still count it as a viewer.
async fn pump<CTx, CRx, CErr, UTx, URx, UErr>(
    client: Client<CTx, CRx>,
    upstream: Client<UTx, URx>,
    stall: std::time::Duration,
    stop: Stop,
) where
    CTx: futures::Sink<AxMessage> + Unpin,
    CRx: futures::Stream<Item = Result<AxMessage, CErr>> + Unpin,
    UTx: futures::Sink<TMessage> + Unpin,
    URx: futures::Stream<Item = Result<TMessage, UErr>> + Unpin,
{
    let (mut c_tx, mut c_rx) = (client.tx, client.rx);
    let (mut u_tx, mut u_rx) = (upstream.tx, upstream.rx);
    loop {
        tokio::select! {
            from_client = c_rx.next() => {
                let msg = match from_client {
                    Some(Ok(AxMessage::Binary(b))) => TMessage::Binary(b),
                    Some(Ok(AxMessage::Text(t))) => TMessage::Text(t.as_str().into()),
                    Some(Ok(AxMessage::Close(f))) => {
                        let _ = u_tx.send(TMessage::Close(f.map(|f| TCloseFrame { code: f.code.into(), reason: f.reason.as_str().into() }))).await;
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => { let _ = u_tx.send(TMessage::Close(None)).await; break; }
                };
                if u_tx.send(msg).await.is_err() { break; }
            }
            from_upstream = u_rx.next() => {
                let msg = match from_upstream {
                    Some(Ok(TMessage::Binary(b))) => AxMessage::Binary(b),
                    Some(Ok(TMessage::Text(t))) => AxMessage::Text(t.as_str().into()),
                    Some(Ok(TMessage::Close(f))) => {
                        let _ = c_tx.send(AxMessage::Close(f.map(|f| CloseFrame { code: f.code.into(), reason: f.reason.as_str().into() }))).await;
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => {
                        let _ = c_tx.send(AxMessage::Close(Some(CloseFrame { code: 1011, reason: "the terminal connection was lost".into() }))).await;
                        break;
                    }
                };
                tokio::select! {
                    sent = tokio::time::timeout(stall, c_tx.send(msg)) => match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break,
                        Err(_) => {
                            tracing::info!("letting go of a terminal viewer that stopped reading");
                            let close = AxMessage::Close(Some(CloseFrame { code: 1013, reason: "too slow: re-attach to replay the screen".into() }));
                            let _ = tokio::time::timeout(CLOSE_GRACE, c_tx.send(close)).await;
                            break;
                        }
                    },
                    () = stop.token.cancelled() => break,
                }
            }
            () = stop.token.cancelled() => {
                let _ = tokio::time::timeout(CLOSE_GRACE, c_tx.send(AxMessage::Close(Some(stop.why())))).await;
                let _ = u_tx.send(TMessage::Close(None)).await;
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use std::convert::Infallible;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// A bridge over channels: the client's and the harness's ends, and the pump's task.
    struct Bridge {
        /// What the client sends, and what reaches it.
        client_in: mpsc::Sender<AxMessage>,
        client_out: mpsc::Receiver<AxMessage>,
        /// What the harness sends, and what reaches it.
        harness_in: mpsc::Sender<TMessage>,
        harness_out: mpsc::Receiver<TMessage>,
        pump: tokio::task::JoinHandle<()>,
        shutdown: CancellationToken,
    }

    /// `room` frames fit in the client's outgoing channel before the pump waits on it.
    fn bridge(room: usize, stall: Duration) -> Bridge {
        let (client_in, c_rx) = mpsc::channel::<AxMessage>(8);
        let (c_tx, client_out) = mpsc::channel::<AxMessage>(room);
        let (harness_in, u_rx) = mpsc::channel::<TMessage>(8);
        let (u_tx, harness_out) = mpsc::channel::<TMessage>(8);
        let shutdown = CancellationToken::new();
        let pump = tokio::spawn(pump(
            Client {
                tx: c_tx,
                rx: c_rx.map(Ok::<_, Infallible>),
            },
            Client {
                tx: u_tx,
                rx: u_rx.map(Ok::<_, Infallible>),
            },
            stall,
            Stop {
                token: shutdown.clone(),
                shutdown: shutdown.clone(),
            },
        ));
        Bridge {
            client_in,
            client_out,
            harness_in,
            harness_out,
            pump,
            shutdown,
        }
    }

    fn close_code(m: &AxMessage) -> Option<u16> {
        match m {
            AxMessage::Close(Some(f)) => Some(f.code),
            _ => None,
        }
    }

    #[tokio::test]
    async fn frames_pass_both_ways_and_a_clients_close_reaches_the_harness() {
        let mut b = bridge(8, Duration::from_secs(30));
        b.client_in
            .send(AxMessage::Binary(b"ls\r".to_vec().into()))
            .await
            .expect("send");
        let got = b.harness_out.next().await.expect("to the harness");
        assert_eq!(got, TMessage::Binary(b"ls\r".to_vec().into()));
        b.harness_in
            .send(TMessage::Text("{\"type\":\"resize\"}".into()))
            .await
            .expect("send");
        b.harness_in
            .send(TMessage::Binary(b"a.txt\r\n".to_vec().into()))
            .await
            .expect("send");
        let text = b.client_out.next().await.expect("to the client");
        assert_eq!(text, AxMessage::Text("{\"type\":\"resize\"}".into()));
        let bytes = b.client_out.next().await.expect("to the client");
        assert_eq!(bytes, AxMessage::Binary(b"a.txt\r\n".to_vec().into()));
        b.client_in
            .send(AxMessage::Close(Some(CloseFrame {
                code: 1000,
                reason: "bye".into(),
            })))
            .await
            .expect("close");
        match b.harness_out.next().await {
            Some(TMessage::Close(Some(f))) => assert_eq!(u16::from(f.code), 1000),
            other => panic!("the close is passed on: {other:?}"),
        }
        b.pump.await.expect("the pump ends");
    }

    #[tokio::test]
    async fn a_lost_harness_connection_closes_the_client_with_1011() {
        let mut b = bridge(8, Duration::from_secs(30));
        drop(b.harness_in);
        let got = b.client_out.next().await.expect("a close");
        assert_eq!(close_code(&got), Some(1011), "{got:?}");
        b.pump.await.expect("the pump ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_viewer_that_stops_reading_is_let_go_after_the_stall() {
        let stall = Duration::from_secs(30);
        let mut b = bridge(0, stall);
        let started = tokio::time::Instant::now();
        // The client reads nothing: the first frame fills its channel, the next waits for it.
        for i in 0..3u8 {
            if b.harness_in
                .send(TMessage::Binary(vec![i].into()))
                .await
                .is_err()
            {
                break;
            }
        }
        b.pump.await.expect("the pump lets go");
        let waited = started.elapsed();
        assert!(
            waited >= stall && waited < stall + CLOSE_GRACE + Duration::from_secs(1),
            "let go after {waited:?}"
        );
        // What it had read before it stopped is there; nothing after.
        assert_eq!(
            b.client_out.next().await,
            Some(AxMessage::Binary(vec![0].into()))
        );
    }

    #[tokio::test]
    async fn shutting_down_closes_the_client_with_1001() {
        let mut b = bridge(8, Duration::from_secs(30));
        b.shutdown.cancel();
        let got = b.client_out.next().await.expect("a close");
        assert_eq!(close_code(&got), Some(1001), "{got:?}");
        b.pump.await.expect("the pump ends");
    }
}
