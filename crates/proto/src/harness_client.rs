//! A client for the harness server's contract: health, turns as an event stream, cancel, inputs,
//! bind, and the terminal WebSocket request. Used by the orchestrator, the benchmarks and tests.
//!
//! It knows the wire format only (`event`, `problem`); nothing of who runs the sandbox.

use crate::event::{BindRequest, Health, InputAnswer, TurnEvent, TurnRequest};
use crate::problem::Problem;
use futures::{Stream, StreamExt};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made (refused, unreachable, timed out): the sandbox is
    /// likely gone.
    #[error("cannot connect to the harness at {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The harness answered with a problem document.
    #[error("the harness refused the request: {} ({})", .0.detail, .0.kind)]
    Refused(Problem),
    /// Anything else on a live connection (bad body, stream cut).
    #[error("talking to the harness failed")]
    Transport(#[source] reqwest::Error),
    #[error("the harness sent an event that is not valid JSON")]
    BadEvent(#[source] serde_json::Error),
    #[error("the harness event stream broke: {0}")]
    Stream(String),
}

impl ClientError {
    /// True when the harness could not be reached at all (the case that marks a session dead).
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

/// The HTTP client settings for talking to harnesses: short connect timeout, no Nagle delay.
fn http_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Drop idle connections before the harness does (it closes a connection that sends no
        // request head for `--client-timeout`, 30 s by default), so a request never races a close.
        .pool_idle_timeout(Duration::from_secs(15))
}

/// A client with the harness settings, for harnesses on TCP (one per process is plenty).
pub fn http_client() -> reqwest::Client {
    http_builder().build().unwrap_or_default()
}

/// Longest a file request to a harness may take, its body included (16 MiB at a slow pace).
pub const FILES_TIMEOUT: Duration = Duration::from_secs(120);

/// The prefix of a harness endpoint that is a Unix socket: `unix:/path/to/harness.sock`.
const UNIX: &str = "unix:";

/// A connection to a harness, over TCP or a Unix socket.
pub enum HarnessIo {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl tokio::io::AsyncRead for HarnessIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            HarnessIo::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            HarnessIo::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for HarnessIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            HarnessIo::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            HarnessIo::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            HarnessIo::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            HarnessIo::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            HarnessIo::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            HarnessIo::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The most a small JSON answer of a harness (health, options, an answer's receipt) may hold: a
/// sandbox is not trusted, and serve reads these bodies whole.
const SMALL_ANSWER: usize = 1024 * 1024;

/// The most of a refusal's body that is read; the rest is left unread.
const REFUSAL_BODY: usize = 64 * 1024;

/// The most of a refusal's `detail` that is kept (it may go on to a client, a log or the store).
const REFUSAL_DETAIL: usize = 1024;

/// How long a small request to a harness (its options) may take in all.
pub const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A small answer's body, read no further than `SMALL_ANSWER`.
async fn small_body(resp: reqwest::Response) -> Result<Vec<u8>, ClientError> {
    let (body, whole) = body_upto(resp, SMALL_ANSWER).await?;
    if !whole {
        return Err(ClientError::Stream(format!(
            "the harness's answer is larger than {SMALL_ANSWER} bytes"
        )));
    }
    Ok(body)
}

/// A small answer's body as JSON of the type wanted.
async fn small_json<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<T, ClientError> {
    let status = resp.status();
    let body = small_body(resp).await?;
    serde_json::from_slice(&body).map_err(|_| {
        ClientError::Stream(format!(
            "the harness answered {status} with a body that is not the JSON expected"
        ))
    })
}

/// Up to `max` bytes of a body, and whether that was all of it.
async fn body_upto(resp: reqwest::Response, max: usize) -> Result<(Vec<u8>, bool), ClientError> {
    use futures::StreamExt;
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(ClientError::Transport)?;
        if body.len() + chunk.len() > max {
            body.extend_from_slice(&chunk[..max - body.len()]);
            return Ok((body, false));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, true))
}

/// An answer that was not a success: its problem document, or one describing the body; its
/// `detail` no longer than `REFUSAL_DETAIL`.
fn refused(status: reqwest::StatusCode, body: &[u8]) -> ClientError {
    let problem: Problem = serde_json::from_slice(body).unwrap_or_else(|_| {
        Problem::new(status, "unexpected_response", String::from_utf8_lossy(body))
    });
    if problem.detail.len() <= REFUSAL_DETAIL {
        return ClientError::Refused(problem);
    }
    let detail = crate::event::clip(problem.detail.clone(), REFUSAL_DETAIL);
    ClientError::Refused(problem.with_detail(detail))
}

#[derive(Clone)]
pub struct HarnessClient {
    /// The endpoint as given: `http://host:port` or `unix:PATH`.
    endpoint: String,
    /// What request URLs start with (`http://sandbox` for a Unix socket).
    base: String,
    token: String,
    http: reqwest::Client,
}

impl HarnessClient {
    /// `endpoint` is `http://host:port` or `unix:PATH` (a local sandbox's socket).
    pub fn new(endpoint: impl Into<String>, token: impl Into<String>) -> Self {
        Self::with_http(http_client(), endpoint, token)
    }

    /// A client sharing `http`'s connection pool for a TCP endpoint; a Unix socket gets a pool
    /// of its own (the socket is a setting of the pool).
    pub fn with_http(
        http: reqwest::Client,
        endpoint: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        let endpoint = endpoint.into().trim_end_matches('/').to_string();
        let (base, http) = match endpoint.strip_prefix(UNIX) {
            Some(path) => (
                "http://sandbox".to_string(),
                http_builder()
                    .unix_socket(std::path::Path::new(path))
                    .build()
                    .unwrap_or(http),
            ),
            None => (endpoint.clone(), http),
        };
        HarnessClient {
            endpoint,
            base,
            token: token.into(),
            http,
        }
    }

    /// The endpoint this client was made for.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends with the token; a failure to connect is told apart from other transport errors.
    async fn dispatch(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        req.bearer_auth(&self.token).send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::Connect {
                    url: url.to_string(),
                    source: e,
                }
            } else {
                ClientError::Transport(e)
            }
        })
    }

    /// Sends and returns a successful response; any other answer becomes its problem document.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = self.dispatch(req, url).await?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let (body, _) = body_upto(resp, REFUSAL_BODY).await?;
        Err(refused(status, &body))
    }

    /// Health; a `503` with a health body (starting, failed) is returned as a value, not an error.
    pub async fn health(&self) -> Result<Health, ClientError> {
        let url = self.url("/healthz");
        let resp = self.dispatch(self.http.get(&url), &url).await?;
        let status = resp.status();
        let body = small_body(resp).await?;
        serde_json::from_slice::<Health>(&body).map_err(|_| refused(status, &body))
    }

    /// The settings a message may choose and what the agent offers for them.
    pub async fn agent_options(&self) -> Result<crate::event::AgentOptions, ClientError> {
        let url = self.url("/v1/options");
        let req = self.http.get(&url).timeout(SMALL_REQUEST_TIMEOUT);
        let resp = self.send(req, &url).await?;
        let status = resp.status();
        let body = small_body(resp).await?;
        serde_json::from_slice(&body).map_err(|_| refused(status, &body))
    }

    /// Starts a turn and returns its events as they arrive; the stream ends after `done`/`error`.
    pub async fn turn(
        &self,
        req: &TurnRequest,
    ) -> Result<impl Stream<Item = Result<TurnEvent, ClientError>> + Send + 'static, ClientError>
    {
        use eventsource_stream::Eventsource;
        let url = self.url("/v1/turns");
        let resp = self.send(self.http.post(&url).json(req), &url).await?;
        Ok(crate::event::without_bom(resp.bytes_stream())
            .eventsource()
            .map(|item| match item {
                Ok(event) => {
                    serde_json::from_str::<TurnEvent>(&event.data).map_err(ClientError::BadEvent)
                }
                Err(e) => Err(ClientError::Stream(e.to_string())),
            }))
    }

    /// Runs a turn to its end and returns every event.
    pub async fn turn_to_end(&self, req: &TurnRequest) -> Result<Vec<TurnEvent>, ClientError> {
        let stream = self.turn(req).await?;
        futures::pin_mut!(stream);
        let mut events = Vec::new();
        while let Some(event) = stream.next().await {
            let event = event?;
            let last = event.kind.is_terminal();
            events.push(event);
            if last {
                break;
            }
        }
        Ok(events)
    }

    pub async fn cancel(&self) -> Result<serde_json::Value, ClientError> {
        let url = self.url("/v1/turns/cancel");
        let resp = self.send(self.http.post(&url), &url).await?;
        small_json(resp).await
    }

    pub async fn answer(
        &self,
        request_id: &str,
        answer: &InputAnswer,
    ) -> Result<serde_json::Value, ClientError> {
        let url = self.segment_url("/v1/inputs", request_id);
        let resp = self.send(self.http.post(&url).json(answer), &url).await?;
        small_json(resp).await
    }

    pub async fn bind(&self, req: &BindRequest) -> Result<Health, ClientError> {
        let url = self.url("/v1/bind");
        let resp = self.send(self.http.post(&url).json(req), &url).await?;
        small_json(resp).await
    }

    /// `/v1/files/PATH` with each of `path`'s segments percent-encoded.
    /// `base` with one more path segment, `segment` percent-encoded (it cannot leave `base`).
    fn segment_url(&self, base: &str, segment: &str) -> String {
        let mut url = match reqwest::Url::parse(&self.url(base)) {
            Ok(url) => url,
            Err(_) => return self.url(base),
        };
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.push(segment);
        }
        url.into()
    }

    fn file_url(&self, path: &str) -> String {
        let mut url = match reqwest::Url::parse(&self.url("/v1/files")) {
            Ok(url) => url,
            Err(_) => return self.url("/v1/files/"),
        };
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.extend(path.split('/'));
        }
        url.into()
    }

    /// The sandbox's working directory, listed (`under`: a directory in it): the answer, its
    /// JSON body not yet read.
    pub async fn list_files(&self, under: Option<&str>) -> Result<reqwest::Response, ClientError> {
        let mut url = self.url("/v1/files");
        if let Some(under) = under
            && let Ok(mut parsed) = reqwest::Url::parse(&url)
        {
            parsed.query_pairs_mut().append_pair("under", under);
            url = parsed.into();
        }
        self.send(self.http.get(&url).timeout(FILES_TIMEOUT), &url)
            .await
    }

    /// A file of the working directory: the answer, its body not yet read.
    pub async fn read_file(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let url = self.file_url(path);
        self.send(self.http.get(&url).timeout(FILES_TIMEOUT), &url)
            .await
    }

    /// Writes a file of the working directory from `body` (passed through as it arrives);
    /// whether it is new, and the harness's answer.
    pub async fn write_file(
        &self,
        path: &str,
        body: reqwest::Body,
    ) -> Result<(bool, serde_json::Value), ClientError> {
        let url = self.file_url(path);
        let req = self.http.put(&url).timeout(FILES_TIMEOUT).body(body);
        let resp = self.send(req, &url).await?;
        let created = resp.status() == reqwest::StatusCode::CREATED;
        Ok((created, small_json(resp).await?))
    }

    /// A WebSocket handshake request for `GET /v1/tty`, carrying the token.
    pub fn tty_request(
        &self,
    ) -> Result<
        tokio_tungstenite::tungstenite::handshake::client::Request,
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let ws_base = self.base.replacen("http", "ws", 1);
        let mut req = format!("{ws_base}/v1/tty").into_client_request()?;
        let value = format!("Bearer {}", self.token).parse().map_err(|_| {
            tokio_tungstenite::tungstenite::Error::Url(
                tokio_tungstenite::tungstenite::error::UrlError::NoHostName,
            )
        })?;
        req.headers_mut().insert("authorization", value);
        Ok(req)
    }

    /// Opens the terminal WebSocket, over TCP or the sandbox's Unix socket. A failure to
    /// connect at all is `Error::Io`, as `connect_async` reports it.
    pub async fn tty_connect(
        &self,
        config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
    ) -> Result<tokio_tungstenite::WebSocketStream<HarnessIo>, tokio_tungstenite::tungstenite::Error>
    {
        use tokio_tungstenite::tungstenite::Error;
        let request = self.tty_request()?;
        let io = match self.endpoint.strip_prefix(UNIX) {
            Some(path) => HarnessIo::Unix(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(Error::Io)?,
            ),
            None => {
                let authority = request
                    .uri()
                    .authority()
                    .map(|a| a.as_str().to_string())
                    .ok_or(Error::Url(
                        tokio_tungstenite::tungstenite::error::UrlError::NoHostName,
                    ))?;
                let tcp = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(authority),
                )
                .await
                .map_err(|_| Error::Io(std::io::ErrorKind::TimedOut.into()))?
                .map_err(Error::Io)?;
                let _ = tcp.set_nodelay(true);
                HarnessIo::Tcp(tcp)
            }
        };
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, io, Some(config)).await?;
        Ok(ws)
    }
}
