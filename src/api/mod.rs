//! The public API under `/v1`: routes, API-key auth, problem+json errors, SSE and the terminal
//! bridge. Handlers translate HTTP to the orchestrator and back; they hold no state of their own.

mod chat;
mod console;
mod error;
pub mod openapi;
mod seed;
mod tty;
mod vendor;

use crate::session::message::MessageRequest;
use crate::session::quota::{Held, Rates, Slot};
use crate::session::view::SessionView;
use crate::session::{CreateRequest, Orchestrator, SessionError};
use crate::store::{Event, HistoryFrom, Session, SessionFilter};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use futures::{Stream, StreamExt};
use sandwarden_proto::event::{InputAnswer, validate_id};
use sandwarden_proto::http::ConnectionState;
use sandwarden_proto::problem::Problem;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Largest request body (messages with inline images).
const MAX_BODY: usize = 16 * 1024 * 1024;
const MAX_WAIT: Duration = Duration::from_secs(60);

/// Who is calling, from their API key.
#[derive(Clone, Debug)]
pub struct Caller {
    pub tenant: String,
    pub admin: bool,
    /// The id of the key the request came with.
    pub key_id: String,
    /// The SHA-256 of that key (streams look it up again when keys are revoked).
    pub key_hash: String,
    /// The tenant's quotas: its key's, else the server's defaults.
    pub limits: crate::session::quota::Limits,
}

pub type AppState = Arc<Orchestrator>;

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub fn router(orch: Arc<Orchestrator>) -> Router {
    let gate = Gate {
        orch: orch.clone(),
        rates: Rates::default(),
        connections: Held::new(
            "open_connections",
            "close idle connections or reuse fewer (a connection counts until it closes)",
        ),
        requests: Held::new(
            "concurrent_requests",
            "wait for answers before sending more requests",
        ),
    };
    let v1 = Router::new()
        .route("/v1/sessions", post(create_session).get(list_sessions))
        .route("/v1/sessions/{id}", get(get_session).delete(delete_session))
        .route(
            "/v1/sessions/{id}/messages",
            post(post_message).get(get_messages),
        )
        .route("/v1/sessions/{id}/events", get(get_events))
        .route("/v1/sessions/{id}/turns", get(list_turns))
        .route("/v1/sessions/{id}/turns/{turn_id}", get(get_turn))
        .route("/v1/sessions/{id}/cancel", post(cancel))
        .route("/v1/sessions/{id}/options", get(agent_options))
        .route("/v1/sessions/{id}/files", get(list_files))
        .route(
            "/v1/sessions/{id}/files/{*path}",
            get(read_file).put(write_file),
        )
        .route("/v1/sessions/{id}/inputs", get(pending_inputs))
        .route(
            "/v1/sessions/{id}/inputs/{request_id}",
            post(answer_input).put(answer_input),
        )
        .route("/v1/api-keys", post(create_key).get(list_keys))
        .route("/v1/usage", get(usage))
        .route("/v1/templates", get(list_templates))
        .route("/v1/events", get(watch_sessions))
        .route("/v1/api-keys/{id}", delete(revoke_key).patch(change_key))
        .nest("/anthropic", vendor::anthropic::router())
        .nest("/openai/v1", vendor::openai::router())
        .merge(seed::router())
        .merge(chat::router())
        .layer(middleware::from_fn_with_state(gate, require_key));
    Router::new()
        .merge(v1)
        .merge(seed::open_router())
        .merge(console::router())
        .route("/v1/openapi.json", get(openapi::serve_document))
        .route("/v1/sessions/{id}/tty", get(tty::attach))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; the API is under /v1 (see the README)",
            )
        })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(vendor_errors))
        // A bug that panics in a handler answers 500 (the connection and the server live on).
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(middleware::map_response(close_when_refused))
        .layer(middleware::from_fn_with_state(orch.clone(), count_requests))
        .layer(middleware::from_fn(request_span))
        .with_state(orch)
}

fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked; answered 500");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "the server failed on this request; the server log has the cause",
    )
    .into_response()
}

/// Answers under a vendor API's mount (and the chat APIs of that vendor) carry that vendor's
/// error shape, whoever refused the request (the key check, the rate limit, the route).
async fn vendor_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.starts_with("/anthropic/") || path == "/v1/messages" {
        vendor::anthropic::errors(req, next).await
    } else if path.starts_with("/openai/")
        || path.starts_with("/v1/chat/")
        || path.starts_with("/v1/responses")
    {
        vendor::openai::errors(req, next).await
    } else if path.starts_with("/compat/") {
        seed::errors(req, next).await
    } else {
        next.run(req).await
    }
}

/// Only the probes and metrics (`/healthz`, `/readyz`, `/metrics`), for `serve --probe-listen`:
/// a listener of their own, which a flood of API connections does not queue behind.
pub fn probe_router(orch: Arc<Orchestrator>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(orch)
}

/// The header carrying a request's id: the client's, when it sent a usable one, else a new one;
/// the answer always has it, and every log line written while the request runs names it.
pub const REQUEST_ID: &str = "x-request-id";

/// Runs each request in a `request` span (its id, method and path; never the query string,
/// where a terminal's token travels) and returns the id in `X-Request-Id`.
async fn request_span(req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| validate_id("request id", v).is_ok() && v.len() <= 64)
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let span = tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    let value = header::HeaderValue::from_str(&id).ok();
    let mut req = req;
    if let Some(v) = &value {
        // Inner layers (a vendor API's error shape) name the request by the same id.
        req.headers_mut().insert(REQUEST_ID, v.clone());
    }
    let mut response = next.run(req).instrument(span).await;
    if let Some(v) = value {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

async fn count_requests(State(orch): State<AppState>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    orch.metrics
        .http_requests
        .get_or_create(&crate::metrics::StatusLabel {
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

/// The API key a request carries: `Authorization: Bearer`, or `x-api-key` (what Anthropic's
/// clients send).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

pub async fn caller_from(orch: &Orchestrator, headers: &HeaderMap) -> Result<Caller, Problem> {
    let Some(key) = bearer(headers) else {
        return Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <API key>` (the key `serve` printed, or SANDWARDEN_API_KEY)",
        ));
    };
    let hash = hash_key(key);
    let defaults = &orch.config.default_limits;
    if let Some(key) = orch.cached_key(&hash) {
        return Ok(Caller {
            tenant: key.tenant,
            admin: key.admin,
            key_id: key.id,
            key_hash: hash,
            limits: key.limits.or(defaults),
        });
    }
    match orch.store.find_key(&hash).await? {
        Some(key) => {
            orch.cache_key(hash.clone(), &key);
            Ok(Caller {
                limits: key.limits.or(defaults),
                tenant: key.tenant,
                admin: key.admin,
                key_id: key.id,
                key_hash: hash,
            })
        }
        None => Err(Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this API key is not valid",
        )),
    }
}

/// What keyed requests pass before their handler: the caller's key, its request rate, then the
/// tenant's caps on connections and on requests in flight (this replica's counts).
#[derive(Clone)]
struct Gate {
    orch: AppState,
    rates: Rates,
    connections: Held,
    requests: Held,
}

async fn require_key(State(gate): State<Gate>, mut req: Request, next: Next) -> Response {
    let caller = match caller_from(&gate.orch, req.headers()).await {
        Ok(caller) => caller,
        Err(p) => return p.into_response(),
    };
    if let Err(e) = gate.rates.take(&caller.key_id, &caller.limits) {
        return Problem::from(e).into_response();
    }
    if let Some(conn) = req.extensions().get::<ConnectionState>()
        && let Err(p) = attribute(conn, &caller, &gate.connections)
    {
        return p.into_response();
    }
    let _in_flight = match gate
        .requests
        .take(&caller.tenant, caller.limits.concurrent_requests)
    {
        Ok(slot) => slot,
        Err(e) => return Problem::from(e).into_response(),
    };
    if let Some(conn) = req.extensions().get::<ConnectionState>() {
        // Within its tenant's caps: a long request (a turn, a long-poll) does not hold up
        // accepting new connections.
        conn.settle();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Counts the connection against the caller's tenant from its first keyed request until it
/// closes; a request with another tenant's key moves it (a proxy may carry several tenants).
/// Refused when the tenant already holds its `open_connections`.
fn attribute(conn: &ConnectionState, caller: &Caller, connections: &Held) -> Result<(), Problem> {
    conn.with(|kept| {
        let counted_for = kept
            .as_ref()
            .and_then(|k| k.downcast_ref::<Slot>())
            .map(Slot::tenant);
        if counted_for == Some(caller.tenant.as_str()) {
            return Ok(());
        }
        let slot = connections.take(&caller.tenant, caller.limits.open_connections)?;
        *kept = Some(Box::new(slot));
        Ok(())
    })
}

/// A refused caller (no valid key, or over a quota) loses its connection: an idle keep-alive
/// connection of a client told to back off would hold a file descriptor for nothing.
async fn close_when_refused(mut response: Response) -> Response {
    if matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
    ) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

async fn readyz(State(orch): State<AppState>) -> Response {
    if orch.is_synced() {
        (StatusCode::OK, "ready").into_response()
    } else {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the runtime is still being synced",
        )
        .into_response()
    }
}

async fn metrics(State(orch): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        orch.metrics.encode(),
    )
        .into_response()
}

/// The session a URL's `{id}` names for `tenant`: its id, or the name the tenant picked for it
/// (see `session::scoped_id`).
pub(crate) fn session_path(tenant: &str, id: &str) -> Result<String, Problem> {
    validate_id("session id", id)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    Ok(crate::session::scoped_id(tenant, id))
}

/// A session as the API shows it: the stored fields plus `tty_url` for terminal sessions.
fn view(orch: &Orchestrator, s: &Session) -> SessionView {
    view_with(orch, s, orch.tty_url(s))
}

/// A session as clients see it, with this `tty_url` (`None`: its token left out).
fn view_with(orch: &Orchestrator, s: &Session, tty_url: Option<String>) -> SessionView {
    SessionView::new(
        s,
        orch.runtime.isolation(),
        tty_url,
        orch.running_turn(&s.id),
    )
}

// ---- templates

/// The harness templates sessions can name: what a client picks from (never their commands,
/// environment or container settings, which are the operator's).
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, description = "the templates sessions can name", body = openapi::TemplateList)))]
async fn list_templates(State(orch): State<AppState>) -> Response {
    let templates = orch
        .templates()
        .values()
        .map(|t| openapi::TemplateView {
            name: t.name.clone(),
            kind: t.kind.to_string(),
            start: serde_json::to_value(t.start)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            warm_pool: t.pool,
            idle_timeout_s: t.idle_timeout_s,
            turn_timeout_s: t.turn_timeout_s,
        })
        .collect();
    Json(openapi::TemplateList { templates }).into_response()
}

// ---- sessions

#[utoipa::path(post, path = "/v1/sessions", tag = "sessions", request_body = CreateRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key and body answer the first session again")),
    responses((status = 201, description = "created", body = SessionView),
              (status = 200, description = "the session an Idempotency-Key or `session_id` names", body = SessionView),
              (status = 422, description = "the body says what to fix", body = sandwarden_proto::problem::ProblemDoc),
              (status = 429, description = "a quota, named in the body", body = sandwarden_proto::problem::ProblemDoc)))]
async fn create_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(req) = body?;
    if let Some(given) = &req.session_id {
        let id = session_path(&caller.tenant, given)?;
        let session = orch.get(&caller.tenant, &id).await?;
        return Ok(Json(view(&orch, &session)).into_response());
    }
    if req
        .metadata
        .as_ref()
        .is_some_and(|m| m.get(seed::karta::PROJECT_KEY).is_some())
    {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_session",
            format!(
                "`metadata.{}` is set by creating the session under /v1/projects/{{ref}}/sessions",
                seed::karta::PROJECT_KEY
            ),
        ));
    }
    let key = idempotency_key(&headers)?;
    let (session, created) = orch
        .create(&caller.tenant, req, key, &caller.limits)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (status, Json(view(&orch, &session))).into_response();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/sessions/{}", session.id)) {
        response.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(response)
}

/// A create's `Idempotency-Key` header, if it sent one.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(String::from))
        .transpose()
        .map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                "Idempotency-Key must be ASCII",
            )
        })
}

#[derive(Deserialize)]
struct ListQuery {
    tenant: Option<String>,
    status: Option<String>,
    harness: Option<String>,
    order: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

#[utoipa::path(get, path = "/v1/sessions", tag = "sessions",
    params(("status" = Option<String>, Query, description = "only sessions in this status"),
           ("harness" = Option<String>, Query, description = "only sessions of this template"),
           ("limit" = Option<i64>, Query, description = "1 to 500 (50)"),
           ("cursor" = Option<String>, Query, description = "the `next_cursor` of the page before"),
           ("order" = Option<String>, Query, description = "`oldest` (the default) or `newest` first"),
           ("tenant" = Option<String>, Query, description = "another tenant's (admin keys)")),
    responses((status = 200, body = openapi::SessionPage), (status = 400, body = sandwarden_proto::problem::ProblemDoc)))]
async fn list_sessions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let limit = page_limit(q.limit, 50, 500)?;
    if let Some(s) = &q.status
        && crate::status::SessionStatus::parse(s).is_none()
    {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!(
                "`status` is one of {}",
                crate::status::SessionStatus::ALL
                    .map(|s| s.as_str())
                    .join(", ")
            ),
        ));
    }
    let newest_first = match q.order.as_deref() {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(_) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "`order` is `oldest` (the default) or `newest`",
            ));
        }
    };
    let after = after_cursor(q.cursor.as_deref())?;
    let filter = SessionFilter {
        status: q.status,
        present: false,
        harness: q.harness,
        after,
        newest_first,
        limit: limit + 1,
    };
    let tenant = acting_tenant(&caller, q.tenant)?;
    let mut sessions = orch.list(&tenant, &filter).await?;
    let next_cursor = if sessions.len() as i64 > limit {
        sessions.truncate(limit as usize);
        sessions.last().map(|s| encode_cursor(&s.created_at, &s.id))
    } else {
        None
    };
    let items: Vec<SessionView> = sessions.iter().map(|s| view(&orch, s)).collect();
    Ok(Json(openapi::SessionPage {
        sessions: items,
        next_cursor,
    })
    .into_response())
}

#[derive(Deserialize)]
struct WatchQuery {
    tenant: Option<String>,
}

/// The caller's sessions as they change, as SSE: `watching` once the stream is listening (a
/// client lists the sessions after it, so nothing changed in between is missed), then a
/// `session` event with a session's new state each time one changes (created, ready, a turn
/// starting or ending, waiting for input, dead, deleted). A reader that falls behind gets
/// `resync`: list again. Counts as one of the tenant's open streams.
#[utoipa::path(get, path = "/v1/events", tag = "sessions",
    params(("tenant" = Option<String>, Query, description = "another tenant's (admin keys)")),
    responses((status = 200, description = "SSE: `watching`, then `session` events (each `data:` a SessionView) and `resync`")))]
async fn watch_sessions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<WatchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let tenant = acting_tenant(&caller, q.tenant)?;
    let slot = stream_slot(&orch, &caller, true)?;
    let stop = orch.shutdown.child_token();
    let watch = Watch {
        orch: orch.clone(),
        tenant,
        changes: orch.changes(),
        stop: stop.clone(),
        _watching: orch.on_revocation(caller.key_hash.clone(), stop),
        foreign: std::collections::HashSet::new(),
        started: false,
    };
    let events = futures::stream::unfold(watch, |mut w| async move {
        let event = w.next().await?;
        Some((Ok::<_, Infallible>(event), w))
    });
    Ok(sse(holding(events, slot)))
}

struct Watch {
    orch: Arc<Orchestrator>,
    tenant: String,
    changes: broadcast::Receiver<String>,
    /// Cancelled when serve stops or the watcher's key is revoked: the watch ends.
    stop: tokio_util::sync::CancellationToken,
    _watching: tokio_util::sync::DropGuard,
    /// Sessions seen to be another tenant's (their changes cost no store read again), bounded.
    foreign: std::collections::HashSet<String>,
    started: bool,
}

/// How many other tenants' session ids a watch remembers.
const WATCH_FOREIGN_MAX: usize = 4096;

impl Watch {
    /// The next event of a sessions watch; `None` ends the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        if !self.started {
            self.started = true;
            return Some(SseEvent::default().event("watching").data("{}"));
        }
        let resync = || Some(SseEvent::default().event("resync").data("{}"));
        loop {
            let changed = tokio::select! {
                changed = self.changes.recv() => changed,
                () = self.stop.cancelled() => return None,
            };
            let id = match changed {
                Ok(id) if id == crate::session::ANY_SESSION => return resync(),
                Ok(id) if self.foreign.contains(&id) => continue,
                Ok(id) => id,
                Err(broadcast::error::RecvError::Lagged(_)) => return resync(),
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            match self.orch.store.get_session_any(&id).await {
                Ok(Some(s)) if s.tenant == self.tenant => {
                    // A terminal's `tty_url` carries a token: a watcher fetches the session
                    // (with its key, checked then) when it wants to attach.
                    let data = serde_json::to_string(&view_with(&self.orch, &s, None)).ok()?;
                    return Some(SseEvent::default().event("session").data(data));
                }
                Ok(Some(_)) => {
                    if self.foreign.len() >= WATCH_FOREIGN_MAX {
                        self.foreign.clear();
                    }
                    self.foreign.insert(id);
                }
                // Not recorded (yet): nothing to say.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "a sessions watch could not read a session; ending it");
                    return None;
                }
            }
        }
    }
}

/// A route's query string, or `400 invalid_query` saying what is wrong with it.
pub(crate) fn query_of<T>(
    query: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, Problem> {
    query
        .map(|Query(q)| q)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))
}

/// A page size from the query: `default` when absent, else between 1 and `max`.
fn page_limit(given: Option<i64>, default: i64, max: i64) -> Result<i64, Problem> {
    let limit = given.unwrap_or(default);
    if !(1..=max).contains(&limit) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("`limit` is between 1 and {max}"),
        ));
    }
    Ok(limit)
}

pub(crate) fn encode_cursor(created_at: &str, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}|{id}"))
}

/// Where a page starts, from the `cursor` a previous page gave out.
fn after_cursor(cursor: Option<&str>) -> Result<Option<(String, String)>, Problem> {
    cursor
        .map(|c| {
            decode_cursor(c).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_cursor",
                    "`cursor` is not one this server gave out; start without it",
                )
            })
        })
        .transpose()
}

pub(crate) fn decode_cursor(c: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (a, b) = text.split_once('|')?;
    Some((a.to_string(), b.to_string()))
}

#[derive(Deserialize)]
struct WaitQuery {
    tenant: Option<String>,
    wait: Option<bool>,
    timeout: Option<f64>,
}

fn wait_for(q: &WaitQuery) -> Result<Option<Duration>, Problem> {
    if q.wait != Some(true) {
        return Ok(None);
    }
    let secs = q.timeout.unwrap_or(30.0);
    if !(0.0..=MAX_WAIT.as_secs_f64()).contains(&secs) || secs.is_nan() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`timeout` is between 0 and 60 seconds",
        ));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path), ("wait" = Option<bool>, Query, description = "long-poll while creating or running"),
           ("timeout" = Option<f64>, Query, description = "seconds to wait, 0 to 60 (30)"),
           ("tenant" = Option<String>, Query)),
    responses((status = 200, body = SessionView), (status = 404, body = sandwarden_proto::problem::ProblemDoc)))]
async fn get_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let tenant = acting_tenant(&caller, q.tenant.clone())?;
    let id = session_path(&tenant, &id)?;
    let session = match wait_for(&q)? {
        Some(t) => orch.wait(&tenant, &id, t).await?,
        None => orch.get(&tenant, &id).await?,
    };
    Ok(Json(view(&orch, &session)).into_response())
}

#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    params(("id" = String, Path), ("tenant" = Option<String>, Query)),
    responses((status = 200, description = "deleted (again: idempotent)", body = SessionView), (status = 404, body = sandwarden_proto::problem::ProblemDoc)))]
async fn delete_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let tenant = acting_tenant(&caller, q.tenant)?;
    let id = session_path(&tenant, &id)?;
    let session = orch.delete(&tenant, &id).await?;
    Ok(Json(view(&orch, &session)).into_response())
}

// ---- messages and turns

#[utoipa::path(post, path = "/v1/sessions/{id}/messages", tag = "messages", request_body = MessageRequest,
    params(("id" = String, Path), ("Prefer" = Option<String>, Header, description = "`respond-async` for a 202")),
    responses((status = 200, description = "the turn's outcome (unary)", body = crate::session::turn::Outcome),
              (status = 202, description = "started (`async`)", body = openapi::Accepted),
              (status = 409, description = "a turn runs, or the session is not ready", body = sandwarden_proto::problem::ProblemDoc),
              (status = 422, body = sandwarden_proto::problem::ProblemDoc), (status = 502, description = "the turn failed", body = sandwarden_proto::problem::ProblemDoc)))]
async fn post_message(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<MessageRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let id = session_path(&caller.tenant, &id)?;
    let Json(req) = body?;
    let prefer_async = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == "respond-async"));
    let is_async = req.async_ || prefer_async;
    if is_async && req.stream {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_message",
            "choose one response mode: `stream` (SSE) or `async` (202), not both",
        ));
    }
    let mode = if is_async {
        "async"
    } else if req.stream {
        "stream"
    } else {
        "json"
    };
    // A streamed reply holds one of the tenant's stream slots while it is open.
    let slot = stream_slot(&orch, &caller, mode == "stream")?;
    // A unary message's whole time in serve after its key was checked, a step of the profile.
    let _step = (mode == "json").then(|| crate::step!("message"));
    // The agent (mode) the turn runs in, named in a unary reply as Karta's clients read it.
    let agent = req.agent.clone().unwrap_or_else(|| "default".into());
    let started = orch
        .start_turn(&caller.tenant, &id, req, mode, &caller.limits)
        .await?;
    match mode {
        "async" => {
            let location = format!("/v1/sessions/{id}/turns/{}", started.turn_id);
            let mut response = (
                StatusCode::ACCEPTED,
                Json(openapi::Accepted {
                    session_id: id.clone(),
                    turn_id: started.turn_id.clone(),
                    status: "running".into(),
                    turn_url: location.clone(),
                    events_url: format!("/v1/sessions/{id}/events"),
                }),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, v);
            }
            Ok(response)
        }
        "stream" => {
            let stream = event_stream(
                orch.clone(),
                &caller,
                id.clone(),
                started.events,
                Follow::Turn(started.turn_id.clone()),
            );
            let mut response = sse(holding(stream, slot));
            if let Ok(v) = HeaderValue::from_str(&started.turn_id) {
                response.headers_mut().insert("x-turn-id", v);
            }
            Ok(response)
        }
        _ => {
            let outcome = started.outcome().await?;
            let mut reply = outcome.into_reply()?;
            reply["agent"] = json!(agent);
            Ok(Json(reply).into_response())
        }
    }
}

/// `stream`, holding `slot` (a tenant's stream quota) until it ends or its reader goes away.
/// `stream`, keeping `held` (a quota slot, a share of memory) until the stream is dropped.
pub(crate) fn holding<T, H: Send + 'static>(
    stream: impl Stream<Item = T> + Send + 'static,
    held: H,
) -> impl Stream<Item = T> + Send + 'static {
    stream.map(move |item| {
        let _held = &held;
        item
    })
}

/// One of the tenant's stream slots when the answer is a stream (`wanted`), taken before
/// anything else is done for it, so a tenant over its quota costs nothing more.
pub(crate) fn stream_slot(
    orch: &Orchestrator,
    caller: &Caller,
    wanted: bool,
) -> Result<Option<Slot>, Problem> {
    if !wanted {
        return Ok(None);
    }
    Ok(Some(
        orch.streams
            .open(&caller.tenant, caller.limits.open_streams)?,
    ))
}

pub(crate) fn sse(
    stream: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Response {
    let mut response = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("heartbeat"),
        )
        .into_response();
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A page of the history, oldest first: `limit` messages (100 by default, at most 500) and no
/// more than `HISTORY_PAGE_BYTES` of them; `next_cursor` fetches the next page.
#[derive(Deserialize)]
pub(crate) struct HistoryQuery {
    tenant: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
    newest: Option<bool>,
}

#[utoipa::path(get, path = "/v1/sessions/{id}/messages", tag = "messages",
    params(("id" = String, Path), ("limit" = Option<i64>, Query), ("cursor" = Option<String>, Query),
           ("newest" = Option<bool>, Query, description = "start at the newest page; `next_cursor` then leads to older ones"),
           ("tenant" = Option<String>, Query, description = "another tenant's (admin keys)")),
    responses((status = 200, body = openapi::MessagesPage), (status = 404, body = sandwarden_proto::problem::ProblemDoc)))]
async fn get_messages(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let tenant = acting_tenant(&caller, q.tenant.clone())?;
    let id = session_path(&tenant, &id)?;
    let limit = page_limit(q.limit, 100, 500)?;
    let place = match &q.cursor {
        None if q.newest == Some(true) => HistoryFrom::Before(i64::MAX),
        None => HistoryFrom::After(0),
        Some(c) => decode_cursor(c)
            .and_then(|(kind, seq)| {
                let seq = seq.parse::<i64>().ok()?;
                match kind.as_str() {
                    "messages" => Some(HistoryFrom::After(seq)),
                    "messages-before" => Some(HistoryFrom::Before(seq)),
                    _ => None,
                }
            })
            .ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_cursor",
                    "`cursor` is not one this route gave out; start without it",
                )
            })?,
    };
    let kind = match place {
        HistoryFrom::After(_) => "messages",
        HistoryFrom::Before(_) => "messages-before",
    };
    let page = orch
        .history(&tenant, &caller.limits, &id, place, limit)
        .await?;
    let next_cursor = page.next.map(|seq| encode_cursor(kind, &seq.to_string()));
    let answer = openapi::MessagesPage {
        session_id: id,
        messages: page.items,
        has_more: next_cursor.is_some(),
        next_cursor,
    };
    Ok(json_holding(&answer, page.admitted))
}

/// A JSON answer whose body keeps `held` (a page's share of the answer memory) until it has
/// been sent, serialized straight from `value` (no intermediate `Value`).
pub(crate) fn json_holding<H: Send + 'static>(value: &impl Serialize, held: H) -> Response {
    let bytes = match serde_json::to_vec(value) {
        Ok(bytes) => bytes::Bytes::from(bytes),
        Err(e) => {
            tracing::error!(error = %e, "encoding an answer failed");
            return Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding_failed",
                "the answer could not be encoded; the server log has the cause",
            )
            .into_response();
        }
    };
    let len = bytes.len();
    let body = axum::body::Body::from_stream(holding(
        futures::stream::once(async move { Ok::<_, Infallible>(bytes) }),
        held,
    ));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TurnsQuery {
    tenant: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/sessions/{id}/turns`: the session's turns, oldest first, paged.
#[utoipa::path(get, path = "/v1/sessions/{id}/turns", tag = "messages",
    params(("id" = String, Path), ("limit" = Option<i64>, Query), ("cursor" = Option<String>, Query), ("tenant" = Option<String>, Query)),
    responses((status = 200, body = openapi::TurnPage), (status = 404, body = sandwarden_proto::problem::ProblemDoc)))]
async fn list_turns(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<TurnsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let tenant = acting_tenant(&caller, q.tenant)?;
    let id = session_path(&tenant, &id)?;
    let limit = page_limit(q.limit, 50, 500)?;
    let after = after_cursor(q.cursor.as_deref())?;
    let mut turns = orch.list_turns(&tenant, &id, after, limit + 1).await?;
    let next_cursor = if turns.len() as i64 > limit {
        turns.truncate(limit as usize);
        turns
            .last()
            .map(|t| encode_cursor(&t.created_at, &t.turn_id))
    } else {
        None
    };
    Ok(Json(openapi::TurnPage { turns, next_cursor }).into_response())
}

#[utoipa::path(get, path = "/v1/sessions/{id}/turns/{turn_id}", tag = "messages",
    params(("id" = String, Path), ("turn_id" = String, Path), ("wait" = Option<bool>, Query), ("timeout" = Option<f64>, Query)),
    responses((status = 200, description = "the turn: its outcome, mode, times and webhook deliveries", body = crate::session::turn::Outcome),
              (status = 404, body = sandwarden_proto::problem::ProblemDoc)))]
async fn get_turn(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, turn_id)): Path<(String, String)>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let id = session_path(&caller.tenant, &id)?;
    validate_id("turn id", &turn_id)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    let q = query_of(query)?;
    let view = match wait_for(&q)? {
        Some(t) => orch.wait_turn(&caller.tenant, &id, &turn_id, t).await?,
        None => orch.turn_view(&caller.tenant, &id, &turn_id).await?,
    };
    Ok(Json(view).into_response())
}

#[utoipa::path(post, path = "/v1/sessions/{id}/cancel", tag = "messages",
    params(("id" = String, Path)),
    responses((status = 202, description = "`{session_id, turn_id, cancelling}`", body = Object),
              (status = 409, description = "no turn runs", body = sandwarden_proto::problem::ProblemDoc)))]
async fn cancel(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let id = session_path(&caller.tenant, &id)?;
    let v = orch.cancel(&caller.tenant, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}

/// `GET /v1/sessions/{id}/inputs`: the questions the running turn waits on (its unanswered
/// `input_required` events), for a client that opens the session while one waits.
#[utoipa::path(get, path = "/v1/sessions/{id}/inputs", tag = "messages",
    params(("id" = String, Path), ("tenant" = Option<String>, Query, description = "another tenant's (admin keys)")),
    responses((status = 200, body = openapi::PendingInputs)))]
async fn pending_inputs(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let tenant = acting_tenant(&caller, query_of(query)?.tenant)?;
    let id = session_path(&tenant, &id)?;
    let session = orch.get(&tenant, &id).await?;
    let inputs = orch.pending_inputs(&session).await?;
    Ok(Json(openapi::PendingInputs {
        session_id: session.id,
        inputs,
    })
    .into_response())
}

#[utoipa::path(post, path = "/v1/sessions/{id}/inputs/{request_id}", tag = "messages",
    request_body = sandwarden_proto::event::InputAnswer,
    params(("id" = String, Path), ("request_id" = String, Path)),
    responses((status = 200, description = "answered (PUT does the same)", body = Object),
              (status = 404, description = "nothing waits under that id", body = sandwarden_proto::problem::ProblemDoc)))]
async fn answer_input(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, request_id)): Path<(String, String)>,
    body: Result<Json<InputAnswer>, JsonRejection>,
) -> Result<Response, Problem> {
    let id = session_path(&caller.tenant, &id)?;
    validate_id("request id", &request_id)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    let Json(answer) = body?;
    Ok(Json(
        orch.answer(&caller.tenant, &id, &request_id, &answer)
            .await?,
    )
    .into_response())
}

// ---- events

#[derive(Deserialize)]
struct EventsQuery {
    tenant: Option<String>,
    since: Option<i64>,
    tail: Option<bool>,
    limit: Option<i64>,
    stream: Option<bool>,
}

#[utoipa::path(get, path = "/v1/sessions/{id}/events", tag = "messages",
    params(("id" = String, Path), ("since" = Option<i64>, Query, description = "events after this seq"),
           ("tail" = Option<bool>, Query, description = "start after the newest event (instead of `since`)"),
           ("limit" = Option<i64>, Query), ("stream" = Option<bool>, Query, description = "SSE (also with Accept: text/event-stream)"),
           ("tenant" = Option<String>, Query, description = "another tenant's (admin keys)"),
           ("Last-Event-ID" = Option<String>, Header)),
    responses((status = 200, description = "a page, or the events as SSE", body = openapi::EventsPage),
              (status = 404, body = sandwarden_proto::problem::ProblemDoc)))]
async fn get_events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let tenant = acting_tenant(&caller, q.tenant.clone())?;
    let id = session_path(&tenant, &id)?;
    let wants_sse = q.stream == Some(true)
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/event-stream"));
    // A stream's slot is taken before anything is read, so a tenant over its quota costs the
    // store nothing.
    let slot = stream_slot(&orch, &caller, wants_sse)?;
    let session = orch.get(&tenant, &id).await?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim().parse::<i64>().map_err(|_| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_header",
                    "Last-Event-ID must be an event seq (a number)",
                )
            })
        })
        .transpose()?;
    let since = match last_event_id.or(q.since) {
        Some(since) => since,
        None if q.tail == Some(true) => {
            // Events are written in batches: the newest one is the newest committed.
            orch.store.flush().await.map_err(SessionError::from)?;
            orch.store
                .last_seq(&session.id)
                .await
                .map_err(SessionError::from)?
        }
        None => 0,
    };
    if since < 0 {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`since` is a seq, 0 or more",
        ));
    }
    if let Some(slot) = slot {
        let rx = orch.hub.subscribe(&session.id);
        return Ok(sse(holding(
            event_stream(orch.clone(), &caller, session.id, rx, Follow::Since(since)),
            slot,
        )));
    }
    let limit = page_limit(q.limit, 100, 1000)?;
    let page = orch
        .event_page(&tenant, &caller.limits, &session.id, since, limit)
        .await?;
    let answer = openapi::EventsPage {
        session_id: session.id,
        next_since: page.items.last().map_or(since, |e| e.seq),
        has_more: page.next.is_some(),
        events: page.items,
    };
    Ok(json_holding(&answer, page.admitted))
}

/// What an event stream follows: one turn to its end, or the whole session from a seq on.
pub(crate) enum Follow {
    Turn(String),
    Since(i64),
}

struct StreamState {
    orch: Arc<Orchestrator>,
    /// Whose answer memory a page read from the store counts against, and its limits.
    tenant: String,
    limits: crate::session::quota::Limits,
    /// The share of the answer memory the events in `backlog` read from the store hold.
    admitted: Option<crate::session::quota::Admitted>,
    session_id: String,
    rx: broadcast::Receiver<Arc<Event>>,
    last: i64,
    backlog: VecDeque<Arc<Event>>,
    /// Whether stored history after `last` may still hold events not yet sent.
    catch_up: bool,
    turn: Option<String>,
    finished: bool,
    /// Cancelled when serve stops or the reader's key is revoked: the stream ends.
    stop: tokio_util::sync::CancellationToken,
    _watching: tokio_util::sync::DropGuard,
}

/// How long a turn's event stream waits before it asks again for answer memory it was refused.
const TURN_STREAM_RETRY: Duration = Duration::from_millis(250);

/// Session events as SSE: stored history first (when resuming), then live events; a subscriber
/// that falls behind the live buffer catches up from the store. Gap-free by `seq`. Each page
/// read from the store counts against the caller's answer memory (`quota::Answers`) until it
/// has been sent; a page refused there ends a session's stream (the client resumes with
/// `Last-Event-ID`), while a turn's stream, which cannot be resumed, waits and asks again.
pub(crate) fn native_events(
    orch: Arc<Orchestrator>,
    caller: &Caller,
    session_id: String,
    rx: broadcast::Receiver<Arc<Event>>,
    follow: Follow,
) -> impl Stream<Item = Arc<Event>> + Send + 'static {
    let (turn, last, catch_up) = match follow {
        Follow::Turn(t) => (Some(t), 0, false),
        Follow::Since(s) => (None, s, true),
    };
    let stop = orch.shutdown.child_token();
    let watching = orch.on_revocation(caller.key_hash.clone(), stop.clone());
    let state = StreamState {
        orch,
        tenant: caller.tenant.clone(),
        limits: caller.limits.clone(),
        admitted: None,
        session_id,
        rx,
        last,
        backlog: VecDeque::new(),
        catch_up,
        turn,
        finished: false,
        stop,
        _watching: watching,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.finished {
                return None;
            }
            if let Some(e) = st.backlog.pop_front() {
                if e.seq <= st.last {
                    continue;
                }

                if let Some(t) = &st.turn
                    && e.turn_id.as_deref() != Some(t.as_str())
                {
                    continue;
                }
                st.last = e.seq;
                if st.turn.is_some() && (e.kind == "done" || e.kind == "error") {
                    st.finished = true;
                }
                return Some((e, st));
            }
            // Everything read from the store has been sent: its share goes back.
            st.admitted = None;
            if st.catch_up {
                st.catch_up = false;
                let page = st
                    .orch
                    .event_page(&st.tenant, &st.limits, &st.session_id, st.last, 1000)
                    .await;
                match page {
                    Ok(page) => {
                        st.catch_up = page.next.is_some();
                        st.admitted = page.admitted;
                        st.backlog.extend(page.items.into_iter().map(Arc::new));
                    }
                    // A stream of one turn cannot be resumed: it waits for memory and tries
                    // again. A session's stream ends; its client resumes with Last-Event-ID.
                    Err(e) if st.turn.is_some() && !matches!(e, SessionError::Store(_)) => {
                        tracing::debug!(error = %e, "a turn's stream waits to read its next page");
                        st.catch_up = true;
                        let stop = st.stop.clone();
                        tokio::select! {
                            () = tokio::time::sleep(TURN_STREAM_RETRY) => {}
                            () = stop.cancelled() => return None,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "an event stream could not read its next page; ending it");
                        return None;
                    }
                }
                continue;
            }
            let stop = st.stop.clone();
            tokio::select! {
                received = st.rx.recv() => match received {
                    // A live event ahead of what this stream sent (events fanned in from another
                    // replica after missed notices): the store has it and the gap, read them.
                    Ok(e) if st.turn.is_none() && e.seq > st.last + 1 => st.catch_up = true,
                    Ok(e) => st.backlog.push_back(e),
                    Err(broadcast::error::RecvError::Lagged(_)) => st.catch_up = true,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = stop.cancelled() => return None,
            }
        }
    })
}

/// Session events as native SSE frames (`id:` the seq, `event:` the type).
fn event_stream(
    orch: Arc<Orchestrator>,
    caller: &Caller,
    session_id: String,
    rx: broadcast::Receiver<Arc<Event>>,
    follow: Follow,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    native_events(orch, caller, session_id, rx, follow).map(|e| {
        Ok(SseEvent::default()
            .id(e.seq.to_string())
            .event(e.kind.clone())
            .json_data(Wire(&e))
            .unwrap_or_default())
    })
}

/// An event as the native streams send it: the stored envelope, plus what Karta's clients read
/// (`source`, `timestamp` in Unix milliseconds, and a text or reasoning chunk also as
/// `data.part {type, text}`).
struct Wire<'a>(&'a Event);

impl Serialize for Wire<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let e = self.0;
        let mut map = s.serialize_map(Some(9))?;
        map.serialize_entry("id", &e.id)?;
        map.serialize_entry("seq", &e.seq)?;
        map.serialize_entry("session_id", &e.session_id)?;
        map.serialize_entry("turn_id", &e.turn_id)?;
        map.serialize_entry("type", &e.kind)?;
        map.serialize_entry("ts", &e.ts)?;
        map.serialize_entry("source", "agent")?;
        let millis = humantime::parse_rfc3339(&e.ts)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        map.serialize_entry("timestamp", &millis)?;
        match (e.kind.as_str(), e.data.as_object()) {
            ("text" | "reasoning", Some(data)) => {
                map.serialize_entry("data", &WithPart(&e.kind, data))?
            }
            _ => map.serialize_entry("data", &e.data)?,
        }
        map.end()
    }
}

/// A text or reasoning event's data with its chunk also as `part`.
struct WithPart<'a>(&'a str, &'a serde_json::Map<String, Value>);

impl Serialize for WithPart<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.1.len() + 1))?;
        for (k, v) in self.1 {
            if k != "part" {
                map.serialize_entry(k, v)?;
            }
        }
        map.serialize_entry(
            "part",
            &json!({ "type": self.0, "text": self.1.get("text") }),
        )?;
        map.end()
    }
}

// ---- API keys

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRequest {
    tenant: String,
    limits: Option<crate::session::quota::Limits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyChange {
    limits: crate::session::quota::Limits,
}

/// Replaces a key's limits (`{"limits": {...}}`; left out: the server's default), in force on
/// every replica from the next request.
async fn change_key(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<KeyChange>, JsonRejection>,
) -> Result<Response, Problem> {
    require_admin(&caller, "change API keys")?;
    validate_id("key id", &id)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    let Json(change) = body?;
    change
        .limits
        .validate()
        .map_err(|m| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limits", m))?;
    if !orch.store.set_key_limits(&id, &change.limits).await? {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no API key {id:?}; GET /v1/api-keys lists them"),
        ));
    }
    orch.forget_keys();
    let key = orch.store.get_key(&id).await?;
    Ok(Json(json!(key)).into_response())
}

/// The tenant a request acts for: the caller's own, or with `?tenant=` (admin keys only) any
/// tenant's, so an operator can list, read and delete every tenant's sessions.
fn acting_tenant(caller: &Caller, asked: Option<String>) -> Result<String, Problem> {
    match asked {
        None => Ok(caller.tenant.clone()),
        Some(t) if t == caller.tenant => Ok(t),
        Some(t) => {
            require_admin(caller, "act for another tenant (`?tenant=`)")?;
            validate_id("tenant", &t)
                .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_tenant", m))?;
            Ok(t)
        }
    }
}

#[derive(Deserialize)]
struct UsageQuery {
    tenant: Option<String>,
    since: Option<String>,
}

/// What tenants' turns used from a day on (`?since=YYYY-MM-DD`, UTC; default: all), per tenant
/// and session: a tenant's key sees its own, the admin key every tenant's (or `?tenant=`'s).
async fn usage(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let since = q.since.unwrap_or_else(|| "0000-01-01".into());
    let is_day = since.len() == 10
        && since.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !is_day {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`since` is a day, YYYY-MM-DD (UTC)",
        ));
    }
    let tenant = match q.tenant {
        None if caller.admin => None,
        asked => Some(acting_tenant(&caller, asked)?),
    };
    let rows = orch.store.usage(tenant.as_deref(), &since).await?;
    let mut tenants: Vec<Value> = Vec::new();
    // Rows come ordered by tenant: one entry per run of a tenant's sessions.
    for sessions in rows.chunk_by(|a, b| a.tenant == b.tenant) {
        let sum = |f: fn(&crate::store::Usage) -> i64| sessions.iter().map(f).sum::<i64>();
        tenants.push(json!({
            "tenant": sessions[0].tenant,
            "input_tokens": sum(|u| u.input_tokens),
            "output_tokens": sum(|u| u.output_tokens),
            "turns": sum(|u| u.turns),
            "turn_seconds": sessions.iter().map(|u| u.turn_seconds).sum::<f64>(),
            "sandbox_seconds": sessions.iter().map(|u| u.sandbox_seconds).sum::<f64>(),
            "sessions": sessions,
        }));
    }
    Ok(Json(json!({ "since": since, "tenants": tenants })).into_response())
}

/// Refuses a request that only an admin key may make.
fn require_admin(caller: &Caller, what: &str) -> Result<(), Problem> {
    if caller.admin {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("only an admin key can {what}"),
        ))
    }
}

async fn create_key(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<KeyRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    require_admin(&caller, "create API keys")?;
    let Json(req) = body?;
    validate_id("tenant", &req.tenant)
        .map_err(|m| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_tenant", m))?;
    let limits = req.limits.unwrap_or_default();
    limits
        .validate()
        .map_err(|m| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limits", m))?;
    let key = new_key();
    let id = orch
        .store
        .insert_key(&req.tenant, &hash_key(&key), false, "api", &limits)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "id": id, "tenant": req.tenant, "key": key, "limits": limits })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesQuery {
    tenant: Option<String>,
    under: Option<String>,
}

/// `GET /v1/sessions/{id}/files[?under=DIR]`: the working directory's entries.
#[utoipa::path(get, path = "/v1/sessions/{id}/files", tag = "files",
    params(("id" = String, Path), ("under" = Option<String>, Query), ("tenant" = Option<String>, Query)),
    responses((status = 200, description = "`{files: [{path, type, size}], truncated}`", body = Object),
              (status = 404, body = sandwarden_proto::problem::ProblemDoc)))]
async fn list_files(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<FilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let tenant = acting_tenant(&caller, q.tenant)?;
    let id = session_path(&tenant, &id)?;
    let listing = orch.list_files(&tenant, &id, q.under.as_deref()).await?;
    Ok(passed_through(listing, "application/json"))
}

/// `GET /v1/sessions/{id}/options`: what a message may choose (`model`, `agent`, `thinking`)
/// and what the session's agent offers for each, as the agent last reported.
#[utoipa::path(get, path = "/v1/sessions/{id}/options", tag = "messages",
    params(("id" = String, Path), ("tenant" = Option<String>, Query, description = "another tenant's (admin keys)")),
    responses((status = 200, body = sandwarden_proto::event::AgentOptions)))]
async fn agent_options(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let tenant = acting_tenant(&caller, query_of(query)?.tenant)?;
    let id = session_path(&tenant, &id)?;
    Ok(Json(orch.agent_options(&tenant, &id).await?).into_response())
}

/// A harness's answer body, streamed to the client as it arrives (serve holds a chunk at a time).
pub(crate) fn passed_through(from: reqwest::Response, content_type: &'static str) -> Response {
    let length = from.content_length();
    let mut response = axum::body::Body::from_stream(from.bytes_stream()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(n) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    response
}

/// `GET /v1/sessions/{id}/files/{path}`: a file's bytes, streamed from the sandbox.
async fn read_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let tenant = acting_tenant(&caller, query_of(query)?.tenant)?;
    let id = session_path(&tenant, &id)?;
    let file = orch.read_file(&tenant, &id, &path).await?;
    let mut answer = passed_through(file, "application/octet-stream");
    // What an agent wrote is never a page of this origin, whatever its bytes look like.
    console::policed(answer.headers_mut(), "default-src 'none'; sandbox");
    Ok(answer)
}

/// `PUT /v1/sessions/{id}/files/{path}`: writes the body as the file, whole. The body is passed
/// to the sandbox as it arrives (serve never holds it whole); the harness bounds it.
async fn write_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, Problem> {
    let tenant = acting_tenant(&caller, query_of(query)?.tenant)?;
    let id = session_path(&tenant, &id)?;
    // A body said to be past the bound is refused before a byte of it goes to the sandbox.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "file_too_large",
            format!("a file written through the API is at most {MAX_BODY} bytes"),
        )
        .with("max", MAX_BODY));
    }
    // The harness refuses a body past its own bound (413); serve holds a chunk at a time.
    let body = reqwest::Body::wrap_stream(body.into_data_stream());
    let (created, written) = orch.write_file(&tenant, &id, &path, body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(written)).into_response())
}

/// Every key (never the key itself, nor its hash), revoked ones marked; `?tenant=` for one.
async fn list_keys(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    require_admin(&caller, "list API keys")?;
    let q = query_of(query)?;
    let keys = orch.store.list_keys(q.tenant.as_deref()).await?;
    Ok(Json(json!({ "api_keys": keys })).into_response())
}

/// Revokes a key at once, on every replica. The last valid admin key cannot be revoked.
async fn revoke_key(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    require_admin(&caller, "revoke API keys")?;
    validate_id("key id", &id)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    let not_found = || {
        Problem::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no API key {id:?}; GET /v1/api-keys lists them"),
        )
    };
    orch.store.get_key(&id).await?.ok_or_else(not_found)?;
    if !orch.store.revoke_key(&id).await? {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "last_admin_key",
            "this is the only valid admin key; set a new SANDWARDEN_API_KEY and restart to \
             rotate it instead",
        ));
    }
    orch.forget_keys();
    let key = orch.store.get_key(&id).await?.ok_or_else(not_found)?;
    Ok(Json(json!(key)).into_response())
}

/// A new random API key (shown once; only its hash is stored).
pub fn new_key() -> String {
    let bytes: [u8; 24] = rand::random();
    format!("sk_sw_{}", hex::encode(bytes))
}
