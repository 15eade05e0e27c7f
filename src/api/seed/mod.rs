//! The seed platforms' own clients, each under a mount of its own (`/compat/<platform>/…`) that
//! speaks that client's routes, shapes, status words, events and defaults over the native
//! sessions. Nothing is kept per platform: a mount reads and writes native sessions, turns and
//! events, so a session made through one is also the native API's (docs/seed-clients.md).
//!
//! Where a client asks for what has no counterpart here, its mount refuses it in the platform's
//! error shape and the docs say so; nothing is accepted and dropped.

pub mod everruns;
pub mod karta;
pub mod lap;
pub mod motus;
pub mod stewrd;

use super::{AppState, Caller, session_path};
use crate::session::{CreateRequest, Orchestrator};
use crate::status::SessionStatus;
use crate::store::Session;
use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use sandwarden_proto::problem::Problem;
use serde_json::Value;

/// The keyed routes of every mount.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(karta::router())
        .nest("/api/v1/managed_agents", lap::router())
        .nest("/compat/motus/{template}", motus::router())
        .nest("/compat/everruns/{template}", everruns::router())
        .route(
            "/compat/everruns/{template}",
            axum::routing::get(everruns::card),
        )
        .route(
            "/compat/stewrd/{template}/v1/agent",
            axum::routing::post(stewrd::agent),
        )
        .route(
            "/compat/stewrd/{template}/v1/agent/{id}/tool-outputs",
            axum::routing::post(stewrd::tool_outputs),
        )
}

/// The routes a client calls without a key (Motus' health check).
pub fn open_router() -> Router<AppState> {
    Router::new().route(
        "/compat/motus/{template}/health",
        axum::routing::get(motus::health),
    )
}

/// Problem documents answered under `/compat/` also carry `error {code, message}`, the shape
/// these clients read into their exceptions (the document itself is unchanged).
pub async fn errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if !is_problem {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let mut doc: Value = serde_json::from_slice(&bytes).unwrap_or_else(|_| serde_json::json!({}));
    if let Some(map) = doc.as_object_mut() {
        let code = map.get("type").cloned().unwrap_or(Value::Null);
        let message = map.get("detail").cloned().unwrap_or(Value::Null);
        map.insert(
            "error".into(),
            serde_json::json!({ "code": code, "message": message }),
        );
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    Response::from_parts(parts, axum::body::Body::from(doc.to_string()))
}

/// A new session of the mount's template for the caller (`name`: the id the client picked).
async fn create(
    orch: &AppState,
    caller: &Caller,
    template: &str,
    name: Option<String>,
    title: Option<String>,
    idempotency_key: Option<String>,
) -> Result<(Session, bool), Problem> {
    let req = CreateRequest {
        harness: template.to_string(),
        id: name,
        title,
        ..Default::default()
    };
    create_as(orch, caller, req, idempotency_key).await
}

async fn create_as(
    orch: &AppState,
    caller: &Caller,
    req: CreateRequest,
    idempotency_key: Option<String>,
) -> Result<(Session, bool), Problem> {
    Ok(orch
        .create(&caller.tenant, req, idempotency_key, &caller.limits)
        .await?)
}

/// The caller's session `id` under a mount of `template`: one that is deleted, or of another
/// template, is not there (404), as a platform's own server would not know it.
async fn mounted(
    orch: &Orchestrator,
    caller: &Caller,
    template: &str,
    id: &str,
) -> Result<Session, Problem> {
    let scoped = session_path(&caller.tenant, id)?;
    let session = orch.get(&caller.tenant, &scoped).await?;
    if session.status == SessionStatus::Deleted || session.harness != template {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            format!("no session {id:?} here"),
        ));
    }
    Ok(session)
}

/// The id a client knows a session by: the one it picked, else the server's.
fn client_id(s: &Session) -> &str {
    s.name.as_deref().unwrap_or(&s.id)
}

/// Refuses a field a platform's client may send that has no counterpart here.
fn unsupported(what: &str, doc: &str) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "not_supported",
        format!("{what} has no counterpart in sandwarden ({doc} says what is mapped)"),
    )
}

/// The session a request runs in, deleted when the request is done with it (also when its
/// client goes away).
pub(crate) struct Ephemeral {
    pub orch: AppState,
    pub tenant: String,
    pub id: String,
}

impl Ephemeral {
    /// Keeps the session after all (its client was given its id).
    pub(crate) fn disarm(mut self) {
        self.id.clear();
    }
}

impl Drop for Ephemeral {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        let (orch, tenant, id) = (self.orch.clone(), self.tenant.clone(), self.id.clone());
        tokio::spawn(async move {
            if let Err(e) = orch.delete(&tenant, &id).await {
                tracing::warn!(session_id = %id, error = %e, "deleting a one-shot session failed");
            }
        });
    }
}

/// The session once it is ready (a cold sandbox starts first); why not, when it fails to.
pub(crate) async fn until_ready(
    orch: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<Session, Problem> {
    let session = orch
        .wait(&caller.tenant, id, crate::session::COLD_START_TIMEOUT)
        .await?;
    if session.status != SessionStatus::Ready {
        return Err(crate::session::turn::not_usable(&session).into());
    }
    Ok(session)
}

/// Answers `deny` to every question a turn asks (a permission; a client tool's call fails):
/// the clients of the one-shot and chat routes have no way to answer one, and a question left
/// open would hold the turn until its timeout. `rx` is a subscription to the session's events
/// taken before the turn started; the task ends with the turn.
pub(crate) fn deny_questions(
    orch: &AppState,
    caller: &Caller,
    rx: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::store::Event>>,
    session_id: String,
    turn_id: String,
) {
    use futures::StreamExt;
    let events = super::native_events(
        orch.clone(),
        caller,
        session_id.clone(),
        rx,
        super::Follow::Turn(turn_id),
    );
    let (orch, tenant) = (orch.clone(), caller.tenant.clone());
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        while let Some(e) = events.next().await {
            if e.kind != "input_required" {
                continue;
            }
            let Some(request_id) = e.data["request_id"].as_str() else {
                continue;
            };
            let answer = if e.data["client_tool"].is_object() {
                sandwarden_proto::event::InputAnswer {
                    output: Some("this client runs no tools".into()),
                    is_error: true,
                    ..Default::default()
                }
            } else {
                sandwarden_proto::event::InputAnswer {
                    decision: Some(sandwarden_proto::event::Decision::Deny),
                    ..Default::default()
                }
            };
            if let Err(e) = orch.answer(&tenant, &session_id, request_id, &answer).await {
                tracing::warn!(session_id = %session_id, error = %e, "refusing an agent's question failed");
            }
        }
    });
}
