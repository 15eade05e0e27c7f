//! `sandwarden attach ID`: this terminal on a terminal (TUI) session's PTY, over the tty
//! WebSocket. Ctrl-] detaches; when the program ends, attach ends with its exit status.

use super::{Client, Connection, ExitStatus};
use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The key that detaches `attach` (Ctrl-]), as in telnet.
pub const DETACH_KEY: u8 = 0x1d;

/// How often an idle attach pings, so proxies keep the connection.
const PING_EVERY: Duration = Duration::from_secs(30);

/// Attaches this terminal to a TUI session: raw mode, resize on window change, Ctrl-] detaches.
pub async fn attach(conn: &Connection, id: &str) -> anyhow::Result<()> {
    let c = Client::new(conn)?;
    let ws_url = format!(
        "{}/v1/sessions/{}/tty",
        c.base.replacen("http", "ws", 1),
        super::seg(id)
    );
    let asked = format!("GET {ws_url}");
    let mut req = ws_url.into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", c.key).parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| refused(e, id, &c.base, &asked))?;
    let (mut tx, mut rx) = ws.split();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let raw = if tty { Some(RawMode::enable()?) } else { None };
    if tty {
        eprint!("[attached to {id}; Ctrl-] detaches]\r\n");
        if let Ok((cols, rows)) = crossterm::terminal::size() {
            tx.send(resize(cols, rows)).await?;
        }
    }
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 8192];
    let mut stdin_open = true;
    let mut exit: Option<i64> = None;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                let n = n?;
                if n == 0 { stdin_open = false; continue; }
                let input = &buf[..n];
                if let Some(pos) = input.iter().position(|b| *b == DETACH_KEY) {
                    if pos > 0 { tx.send(Message::Binary(input[..pos].to_vec().into())).await?; }
                    let _ = tx.send(Message::Close(None)).await;
                    eprint!("\r\n[detached; the program goes on: `sandwarden attach {id}` comes back]\r\n");
                    return Ok(());
                }
                tx.send(Message::Binary(input.to_vec().into())).await?;
            }
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => { stdout.write_all(&b).await?; stdout.flush().await?; }
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or_default();
                    if v["type"] == "exit" {
                        exit = Some(v["code"].as_i64().unwrap_or(1));
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    drop(raw);
                    return ended(exit, frame.map(|f| f.reason.to_string()));
                }
                None => {
                    drop(raw);
                    return ended(exit, None);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    drop(raw);
                    if exit.is_some() {
                        return ended(exit, None);
                    }
                    bail!("the terminal connection broke: {e}; `sandwarden attach {id}` re-attaches");
                }
            },
            _ = winch.recv() => {
                if let Ok((cols, rows)) = crossterm::terminal::size() {
                    tx.send(resize(cols, rows)).await?;
                }
            }
            () = tokio::time::sleep(PING_EVERY) => {
                tx.send(Message::Text(r#"{"type":"ping"}"#.into())).await?;
            }
        }
    }
}

fn resize(cols: u16, rows: u16) -> Message {
    Message::Text(
        json!({"type": "resize", "cols": cols, "rows": rows})
            .to_string()
            .into(),
    )
}

/// How attach ends once the server closed the terminal: with the program's exit status when it
/// ended, else as the close says.
fn ended(exit: Option<i64>, reason: Option<String>) -> anyhow::Result<()> {
    match exit {
        Some(0) => {
            eprintln!("[the program exited: 0]");
            Ok(())
        }
        Some(code) => Err(ExitStatus {
            // Exit statuses are 0–255; anything else (a signal's, negative) reads as a failure.
            code: u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1),
            message: format!("the program exited: {code}"),
        }
        .into()),
        None => bail!(
            "the server closed the terminal{}",
            reason
                .filter(|r| !r.is_empty())
                .map(|r| format!(": {}", super::printable(&r)))
                .unwrap_or_default()
        ),
    }
}

/// Why the WebSocket could not be opened, in CLI terms.
fn refused(
    e: tokio_tungstenite::tungstenite::Error,
    id: &str,
    base: &str,
    asked: &str,
) -> anyhow::Error {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Http(resp) => {
            let v: Value = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or_default();
            super::refusal(base, resp.status().as_u16(), &v, Some(id), asked)
        }
        Error::Io(io) => anyhow::anyhow!(
            "cannot reach sandwarden at {base} ({io}): is `sandwarden serve` running there? Set SANDWARDEN_URL or pass --url [{asked}]"
        ),
        other => anyhow::anyhow!("cannot attach: {other} [{asked}]"),
    }
}

/// Raw terminal mode for the life of the value.
pub(super) struct RawMode;

impl RawMode {
    pub(super) fn enable() -> anyhow::Result<RawMode> {
        crossterm::terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}
