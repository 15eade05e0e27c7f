//! A tenant's terminal session driven as a person (or a hostile agent) at its prompt would, and the
//! services on the host's loopback that attacks aim at: shared by the sandbox boundary tests of
//! every runtime.

use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A terminal session's shell, driven as a person (or a hostile agent) at its prompt would.
pub struct Shell {
    ws: Ws,
    n: usize,
}

impl Shell {
    pub async fn attach(tty_url: &str) -> Shell {
        let (mut ws, _) = tokio_tungstenite::connect_async(tty_url)
            .await
            .expect("attach to the terminal");
        ws.send(Message::Text(
            json!({"type": "resize", "cols": 400, "rows": 50})
                .to_string()
                .into(),
        ))
        .await
        .expect("resize");
        Shell { ws, n: 0 }
    }

    /// Runs `cmd` and returns what it printed and its exit status.
    pub async fn run(&mut self, cmd: &str) -> (String, i32) {
        self.n += 1;
        let end = format!("@@{}", self.n);
        let line = format!("{cmd}; echo \"@@rc=$?@@{}\"\n", self.n);
        self.ws
            .send(Message::Binary(line.into_bytes().into()))
            .await
            .expect("type");
        let mut out = String::new();
        let re = regex_lite(&end);
        loop {
            if let Some((before, rc)) = re(&out) {
                return (plain(&before), rc);
            }
            match tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                other => {
                    panic!("the terminal ended while running {cmd:?}: {other:?} after {out:?}")
                }
            }
        }
    }
}

/// Terminal output without escape sequences (bracketed paste, colours) or carriage returns.
pub fn plain(out: &str) -> String {
    let mut text = String::with_capacity(out.len());
    let mut chars = out.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if c.is_ascii_alphabetic() || c == '~' {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => text.push(c),
        }
    }
    text
}

/// Finds `@@rc=<digits>@@<end>` (the typed command shows `$?` there, never digits) and returns
/// the output before it and the status.
fn regex_lite(end: &str) -> impl Fn(&str) -> Option<(String, i32)> + '_ {
    move |out: &str| {
        let mut from = 0;
        while let Some(i) = out[from..].find("@@rc=") {
            let start = from + i;
            let rest = &out[start + 5..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !digits.is_empty() && rest[digits.len()..].starts_with(&format!("@@{}", &end[2..])) {
                return Some((out[..start].to_string(), digits.parse().unwrap_or(-1)));
            }
            from = start + 5;
        }
        None
    }
}

/// A loopback service on the host that no sandbox may reach; counts the connections it gets.
pub async fn forbidden_service() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nLEAKED")
                .await;
        }
    });
    (port, hits)
}

/// The allowed "model server" on the host's loopback: answers every request with `model-ok`.
pub async fn allowed_service() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nmodel-ok")
                    .await;
            });
        }
    });
    port
}

/// A bash one-liner that sends one HTTP request to HOST:PORT over /dev/tcp and prints the
/// answer's first line (no curl needed in the sandbox).
pub fn http_get(host: &str, port: u16, request_target: &str) -> String {
    format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port} && printf \"GET {request_target} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n\" >&3 && cat <&3' 2>&1 | tr -d '\\r' | head -5"
    )
}
