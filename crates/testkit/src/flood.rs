//! A flooding client: connections of their own, each asking once and kept open whatever the
//! answer, as a tenant that never hangs up keeps them (`bench flood`, tests/light/tenancy.rs).

use futures::StreamExt;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for one flood connection's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(120);
/// Most bytes read of an answer's head, or of a refusal's body.
const MAX_ANSWER: usize = 64 * 1024;

/// One request on a connection of its own, kept open whatever the answer, as a flooder that never
/// hangs up keeps it.
pub struct Held {
    /// The answer's status; `None` when the connection failed or closed before one.
    pub status: Option<u16>,
    /// A refusal's `limit` (from the 429's problem body).
    pub limit: Option<String>,
    /// Whether the answer said the server closes the connection (`Connection: close`), and it
    /// did (end of file after a refusal's body).
    pub closes: bool,
    /// What went wrong when there was no answer.
    pub error: Option<String>,
    _socket: Option<TcpStream>,
}

/// `GET path` with `key` (and `Accept: text/event-stream` when `sse`) on a new connection to
/// `addr`; reads the answer's head, and a refusal's body to the end; keeps the socket.
pub async fn hold(addr: &str, path: &str, key: &str, sse: bool) -> Held {
    let mut socket = None;
    match tokio::time::timeout(ANSWER_WITHIN, ask(addr, path, key, sse, &mut socket)).await {
        Ok(Ok((status, limit, closes))) => Held {
            status: Some(status),
            limit,
            closes,
            error: None,
            _socket: socket,
        },
        Ok(Err(e)) => Held {
            status: None,
            limit: None,
            closes: false,
            error: Some(e.to_string()),
            _socket: socket,
        },
        Err(_) => Held {
            status: None,
            limit: None,
            closes: false,
            error: Some(format!("no answer within {ANSWER_WITHIN:?}")),
            _socket: socket,
        },
    }
}

async fn ask(
    addr: &str,
    path: &str,
    key: &str,
    sse: bool,
    kept: &mut Option<TcpStream>,
) -> std::io::Result<(u16, Option<String>, bool)> {
    let socket = kept.insert(TcpStream::connect(addr).await?);
    let accept = if sse {
        "Accept: text/event-stream\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n{accept}\r\n"
    );
    socket.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = socket.read(&mut chunk).await?;
        if n == 0 || got.len() > MAX_ANSWER {
            return Err(std::io::Error::other(
                "the connection closed before a whole answer",
            ));
        }
        got.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
    let mut closes = head.contains("\r\nconnection: close\r\n");
    let mut limit = None;
    if status == 429 {
        // The problem body, then (when the server closes) the end of the stream.
        let mut ended = false;
        while got.len() <= MAX_ANSWER {
            let n = socket.read(&mut chunk).await?;
            if n == 0 {
                ended = true;
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if !closes && serde_json::from_slice::<serde_json::Value>(&got[head_end..]).is_ok() {
                break;
            }
        }
        closes &= ended;
        let problem: serde_json::Value =
            serde_json::from_slice(&got[head_end..]).unwrap_or_default();
        limit = problem["limit"].as_str().map(String::from);
    }
    Ok((status, limit, closes))
}

/// `count` connections from `hold`, `in_flight` being opened at once; all kept.
pub async fn flood(
    addr: &str,
    path: &str,
    key: &str,
    sse: bool,
    count: usize,
    in_flight: usize,
) -> Vec<Held> {
    futures::stream::iter(0..count)
        .map(|_| hold(addr, path, key, sse))
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await
}

/// How the flood's connections were answered: by status and refusal limit, with a count each.
pub fn outcomes(held: &[Held]) -> BTreeMap<String, (usize, usize)> {
    let mut by = BTreeMap::new();
    for h in held {
        let name = match (h.status, &h.limit, &h.error) {
            (Some(200), ..) => "200, event stream open".to_string(),
            (Some(s), Some(limit), _) => format!("{s} quota_exceeded, limit `{limit}`"),
            (Some(s), None, _) => format!("{s}"),
            (None, _, Some(e)) => format!("no answer: {e}"),
            (None, _, None) => "no answer".to_string(),
        };
        let entry: &mut (usize, usize) = by.entry(name).or_default();
        entry.0 += 1;
        entry.1 += usize::from(h.closes);
    }
    by
}
