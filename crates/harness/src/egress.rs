//! The sandbox's side of its only way out. A local sandbox under bubblewrap has a network of its
//! own with nothing in it but loopback; outside it, `serve` runs an egress proxy on a Unix socket
//! that is mounted into the sandbox. This relay carries connections made inside the sandbox to
//! that socket: an HTTP proxy port (for `HTTPS_PROXY`), and loopback ports forwarded to the same
//! address outside (a model server on the host's loopback that the operator allowed).
//!
//! It decides nothing: the proxy outside applies the policy, and whatever runs in the sandbox
//! could speak to the socket directly. It must not hold anything the sandbox may not see.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

/// The longest proxy answer head the relay reads before giving up on a forward.
const MAX_HEAD: usize = 8 * 1024;
/// How long the proxy outside may take to answer a forward's CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// The egress proxy's socket, as the sandbox sees it.
    pub socket: PathBuf,
    /// Loopback addresses inside the sandbox carried to the same address outside.
    pub forwards: Vec<SocketAddr>,
    /// Where the HTTP proxy listens inside the sandbox.
    pub proxy: Option<SocketAddr>,
}

impl Relay {
    /// Binds every listener (so an error is reported before the server says it listens) and
    /// serves them in the background.
    pub async fn start(&self) -> std::io::Result<()> {
        if let Some(addr) = self.proxy {
            let listener = bind(addr).await?;
            let socket = self.socket.clone();
            tokio::spawn(accept_loop(listener, move |inside| {
                let socket = socket.clone();
                async move {
                    let outside = UnixStream::connect(&socket).await?;
                    splice(inside, outside, Vec::new()).await
                }
            }));
        }
        for &addr in &self.forwards {
            let listener = bind(addr).await?;
            let socket = self.socket.clone();
            tokio::spawn(accept_loop(listener, move |inside| {
                let socket = socket.clone();
                async move {
                    let (outside, early) = connect_through(&socket, addr).await?;
                    splice(inside, outside, early).await
                }
            }));
        }
        Ok(())
    }
}

async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("listening on {addr}: {e}")))
}

async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                let task = handle(tcp);
                tokio::spawn(async move {
                    if let Err(e) = task.await {
                        tracing::debug!(error = %e, "an egress connection ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting an egress connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Opens a tunnel to `target` through the proxy; returns it with any bytes the proxy sent past
/// its answer's head.
async fn connect_through(
    socket: &std::path::Path,
    target: SocketAddr,
) -> std::io::Result<(UnixStream, Vec<u8>)> {
    let mut outside = UnixStream::connect(socket).await?;
    outside
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let read = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            if let Some(end) = find_head_end(&head) {
                return Ok(end);
            }
            if head.len() > MAX_HEAD {
                return Err(refused("the egress proxy's answer is too long"));
            }
            let n = outside.read(&mut buf).await?;
            if n == 0 {
                return Err(refused("the egress proxy closed the connection"));
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .map_err(|_| refused("the egress proxy did not answer"))??;
    let status = head.split(|&b| b == b' ').nth(1).unwrap_or_default();
    if status != b"200" {
        let line =
            String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or(&[])).into_owned();
        return Err(refused(&format!(
            "the egress proxy refused {target}: {line}"
        )));
    }
    Ok((outside, head.split_off(read)))
}

fn refused(why: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, why.to_string())
}

/// Where the head of an HTTP message ends (just past its blank line), if it has.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Copies both ways until either side is done, after handing `early` to the inside.
async fn splice(
    mut inside: TcpStream,
    mut outside: UnixStream,
    early: Vec<u8>,
) -> std::io::Result<()> {
    if !early.is_empty() {
        inside.write_all(&early).await?;
    }
    tokio::io::copy_bidirectional(&mut inside, &mut outside).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_ends_after_the_blank_line() {
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n\r\nrest"), Some(19));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\n"), None);
    }

    #[tokio::test]
    async fn a_forward_reaches_its_target_only_after_the_proxy_says_200() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("egress.sock");
        let proxy = tokio::net::UnixListener::bind(&socket).expect("bind");
        // A proxy that accepts one tunnel, answers with early bytes, then echoes.
        tokio::spawn(async move {
            let (mut conn, _) = proxy.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 256];
            while find_head_end(&head).is_none() {
                let n = conn.read(&mut buf).await.expect("read");
                head.extend_from_slice(&buf[..n]);
            }
            assert!(head.starts_with(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n"));
            conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\nhello ")
                .await
                .expect("write");
            let n = conn.read(&mut buf).await.expect("read");
            conn.write_all(&buf[..n]).await.expect("echo");
        });
        let target: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let (mut outside, early) = connect_through(&socket, target).await.expect("tunnel");
        assert_eq!(early, b"hello ");
        outside.write_all(b"world").await.expect("write");
        let mut got = [0u8; 5];
        outside.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"world");
    }

    #[tokio::test]
    async fn a_refused_forward_says_what_the_proxy_said() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("egress.sock");
        let proxy = tokio::net::UnixListener::bind(&socket).expect("bind");
        tokio::spawn(async move {
            let (mut conn, _) = proxy.accept().await.expect("accept");
            let mut buf = [0u8; 256];
            let _ = conn.read(&mut buf).await;
            let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
        });
        let target: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let err = connect_through(&socket, target).await.expect_err("refused");
        assert!(err.to_string().contains("403 Forbidden"), "{err}");
    }
}
