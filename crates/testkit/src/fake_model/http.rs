//! The HTTP layer: extracts, records and sends; no decisions.

use super::*;

pub(crate) struct Inner {
    seq: AtomicU64,
    recent: Mutex<VecDeque<Value>>,
    keep: usize,
    log: Option<tokio::sync::Mutex<tokio::fs::File>>,
}

#[derive(Clone)]
pub struct FakeModel(Arc<Inner>);

/// The pieces of a request every handler records (an extractor, so handlers take it whole).
pub(crate) struct Incoming {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Incoming {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let (method, uri, headers) = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        );
        let body = Bytes::from_request(axum::extract::Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Incoming {
            method,
            uri,
            headers,
            body,
        })
    }
}

impl FakeModel {
    /// A fake model that keeps `keep` requests in memory and appends them to `log` if given.
    pub async fn new(keep: usize, log: Option<PathBuf>) -> Result<FakeModel, FakeModelError> {
        let log = match log {
            Some(path) => Some(tokio::sync::Mutex::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await
                    .map_err(|source| FakeModelError::OpenLog { path, source })?,
            )),
            None => None,
        };
        Ok(FakeModel(Arc::new(Inner {
            seq: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            keep,
            log,
        })))
    }

    pub fn router(self, max_body_bytes: usize) -> Router {
        Router::new()
            .route("/", get(root))
            .route("/v1/messages", post(anthropic))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route("/v1/chat/completions", post(chat))
            .route("/chat/completions", post(chat))
            .route("/v1/responses", post(responses))
            .route("/responses", post(responses))
            .route("/v1/models", get(models))
            .route("/models", get(models))
            .route("/_fake/requests", get(list_requests).delete(clear_requests))
            .fallback(unknown)
            .layer(DefaultBodyLimit::max(max_body_bytes))
            .with_state(self)
    }

    fn next_seq(&self) -> u64 {
        self.0.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Keeps the record in memory and appends it to the log file.
    async fn record(&self, mut entry: Value, seq: u64, req: &Incoming, body: Value) {
        entry["seq"] = seq.into();
        entry["time_ms"] = (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64)
            .into();
        entry["method"] = req.method.as_str().into();
        entry["path"] = req.uri.path().into();
        entry["query"] = req.uri.query().map_or(Value::Null, Value::from);
        entry["headers"] = redacted_headers(&req.headers);
        entry["body"] = body;
        {
            let mut recent = lock(&self.0.recent);
            recent.push_back(entry.clone());
            while recent.len() > self.0.keep {
                recent.pop_front();
            }
        }
        if let Some(log) = &self.0.log {
            let mut line = entry.to_string();
            line.push('\n');
            let mut file = log.lock().await;
            // tokio's file hands a write to a blocking thread and returns: the flush waits until
            // the line is in the file, so a reader who got the answer also finds its line.
            let written = match file.write_all(line.as_bytes()).await {
                Ok(()) => file.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, "appending to the request log failed");
            }
        }
    }

    /// Records a request that is not a model call.
    async fn record_plain(&self, req: &Incoming) {
        let seq = self.next_seq();
        let body = body_for_log(&req.body);
        self.record(json!({}), seq, req, body).await;
    }

    async fn model_call(&self, api: Api, req: Incoming) -> Response {
        let seq = self.next_seq();
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let entry = json!({"api": api.name(), "answer": {"kind": "error", "status": 400}});
                self.record(entry, seq, &req, body_for_log(&req.body)).await;
                return error_response(api, 400, "the request body must be a JSON object");
            }
        };
        let conv = Conversation::read(api, &body);
        let answer = Answer::decide(api, &conv);
        let entry = json!({
            "api": api.name(),
            "model": conv.model,
            "stream": conv.stream,
            "title_request": conv.title_request,
            "answer": answer.summary(),
        });
        let include_usage = body["stream_options"]["include_usage"] == true;
        self.record(entry, seq, &req, body).await;
        if let Answer::Error { status } = answer {
            return error_response(
                api,
                status,
                &format!("the fake model was asked to fail with {status}"),
            );
        }
        let reply = Reply {
            conv: &conv,
            answer: &answer,
            seq,
            created: unix_seconds(),
        };
        if conv.stream {
            let frames = match api {
                Api::Anthropic => reply.anthropic_stream(),
                Api::Chat => reply.chat_stream(include_usage),
                Api::Responses => reply.responses_stream(),
            };
            return sse_response(frames);
        }
        // Non-streaming: the same pacing, then the whole body.
        if let Answer::Text { deltas, delay } = &answer {
            tokio::time::sleep(delay.saturating_mul(deltas.len() as u32)).await;
        }
        let body = match api {
            Api::Anthropic => reply.anthropic_message(),
            Api::Chat => reply.chat_completion(),
            Api::Responses => reply.response(),
        };
        axum::Json(body).into_response()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The body as JSON if it is JSON, else as (shortened) text, else null.
pub(crate) fn body_for_log(body: &Bytes) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body).unwrap_or_else(|_| {
        Value::String(
            String::from_utf8_lossy(body)
                .chars()
                .take(LOGGED_RAW_BODY_CHARS)
                .collect(),
        )
    })
}

pub(crate) fn error_response(api: Api, status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(error_body(api, status, message))).into_response()
}

pub(crate) fn sse_response(frames: Vec<SseFrame>) -> Response {
    use futures::StreamExt;
    let stream = futures::stream::iter(frames).then(|frame| async move {
        if !frame.delay.is_zero() {
            tokio::time::sleep(frame.delay).await;
        }
        Ok::<_, std::convert::Infallible>(Bytes::from(frame.encode()))
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub(crate) async fn root(State(fake): State<FakeModel>, req: Incoming) -> &'static str {
    fake.record_plain(&req).await;
    "sandwarden fake model\n"
}

pub(crate) async fn anthropic(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.model_call(Api::Anthropic, req).await
}

pub(crate) async fn chat(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.model_call(Api::Chat, req).await
}

pub(crate) async fn responses(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.model_call(Api::Responses, req).await
}

pub(crate) async fn count_tokens(State(fake): State<FakeModel>, req: Incoming) -> Response {
    let seq = fake.next_seq();
    let Ok(parsed @ Value::Object(_)) = serde_json::from_slice::<Value>(&req.body) else {
        fake.record(
            json!({"api": "anthropic"}),
            seq,
            &req,
            body_for_log(&req.body),
        )
        .await;
        return error_response(
            Api::Anthropic,
            400,
            "the request body must be a JSON object",
        );
    };
    let input_tokens = Conversation::read(Api::Anthropic, &parsed).input_tokens;
    fake.record(json!({"api": "anthropic"}), seq, &req, parsed)
        .await;
    axum::Json(json!({"input_tokens": input_tokens})).into_response()
}

/// One model, in a shape both the Anthropic and the OpenAI clients accept.
pub(crate) async fn models(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.record_plain(&req).await;
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": MODEL, "object": "model", "type": "model", "display_name": "Fake Model",
            "created": 0, "created_at": "1970-01-01T00:00:00Z", "owned_by": "sandwarden",
        }],
        "has_more": false,
        "first_id": MODEL,
        "last_id": MODEL,
    }))
    .into_response()
}

pub(crate) async fn list_requests(State(fake): State<FakeModel>) -> Response {
    let recent: Vec<Value> = lock(&fake.0.recent).iter().cloned().collect();
    axum::Json(recent).into_response()
}

pub(crate) async fn clear_requests(State(fake): State<FakeModel>) -> StatusCode {
    lock(&fake.0.recent).clear();
    StatusCode::NO_CONTENT
}

pub(crate) async fn unknown(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.record_plain(&req).await;
    let message = format!(
        "the fake model does not serve {} {}",
        req.method,
        req.uri.path()
    );
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "type": "error",
            "error": {"type": "not_found_error", "message": message},
        })),
    )
        .into_response()
}

/// Serves until `shutdown` is cancelled; open streams get a moment to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), FakeModelError> {
    let stopping = shutdown.clone();
    let server = axum::serve(sandwarden_proto::http::no_delay(listener), app)
        .with_graceful_shutdown(async move { stopping.cancelled().await });
    let server = tokio::spawn(async move { server.await });
    shutdown.cancelled().await;
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(result)) => result.map_err(FakeModelError::Serve),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "server task failed");
            Ok(())
        }
        Err(_) => {
            tracing::info!("streams still open at shutdown; closing them");
            Ok(())
        }
    }
}

/// `sandwarden-fake-model`: binds, prints the listen line, serves until SIGTERM/SIGINT.
pub async fn run(args: FakeModelArgs) -> Result<(), FakeModelError> {
    if !args.listen.ip().is_loopback() && !args.in_container {
        return Err(FakeModelError::NotLoopback(args.listen));
    }
    let fake = FakeModel::new(args.keep, args.log).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| FakeModelError::Bind {
            addr: args.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| FakeModelError::Bind {
            addr: args.listen,
            source,
        })?;
    sandwarden_proto::http::announce(&addr.to_string());
    tracing::info!(%addr, "fake model listening");
    let shutdown = CancellationToken::new();
    sandwarden_proto::http::cancel_on_signals(shutdown.clone()).map_err(FakeModelError::Signals)?;
    serve(listener, fake.router(args.max_body_bytes), shutdown).await
}
