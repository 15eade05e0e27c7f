//! Motus (`lithosai-motus`): its `motus serve` CLI against `/compat/motus/{template}`, the
//! template standing for the agent a Motus server would serve.
//!
//! Motus' words: a session is `idle`, `running`, `interrupted` (waiting on an approval) or
//! `error`; a message is accepted with `202` and the client long-polls the session until it is
//! no longer `running`, so a session waiting on nothing is never reported in any other word
//! (its CLI polls again at once on a word it does not know). Histories and listings are bare
//! lists. docs/seed-clients.md has the mapping and what is refused.

use super::{client_id, create, mounted, unsupported};
use crate::api::{AppState, Caller, json_holding};
use crate::session::message::MessageRequest;
use crate::status::{SessionStatus, TurnStatus};
use crate::store::{Event, Session, SessionFilter};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use sandwarden_proto::event::{Decision, InputAnswer};
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use std::time::Duration;

const DOC: &str = "docs/seed-clients.md (Motus)";
/// The longest a `?wait=true` holds the request (a longer `timeout` is cut to it).
const MAX_WAIT: Duration = Duration::from_secs(60);
/// The most messages a history answers (Motus' list is not paged).
const MAX_HISTORY: usize = 5_000;
/// The most sessions a listing answers (Motus' list is not paged).
const MAX_SESSIONS: i64 = 1_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sessions", post(create_session).get(list_sessions))
        .route(
            "/sessions/{id}",
            get(get_session).put(put_session).delete(delete_session),
        )
        .route("/sessions/{id}/messages", post(send).get(history))
        .route("/sessions/{id}/resume", post(resume))
}

/// `GET …/health`, which the CLI calls without a key: whether the mount's template exists.
pub async fn health(State(orch): State<AppState>, Path(template): Path<String>) -> Response {
    if orch.templates().contains_key(&template) {
        Json(json!({ "status": "ok" })).into_response()
    } else {
        no_template(&template).into_response()
    }
}

fn no_template(template: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "unknown_harness",
        format!("no template {template:?}; GET /v1/templates lists them"),
    )
}

fn location(template: &str, s: &Session) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "/compat/motus/{template}/sessions/{}",
        client_id(s)
    ))
    .ok()
}

/// A session in Motus' words (`SessionResponse`).
async fn view(orch: &AppState, s: &Session) -> Result<Value, Problem> {
    let mut out = json!({
        "session_id": client_id(s), "status": "running",
        "response": null, "error": null, "interrupts": null,
    });
    match s.status {
        SessionStatus::Creating | SessionStatus::Running => {}
        SessionStatus::InputRequired => {
            let pending = orch.pending_inputs(s).await?;
            // Answered, and the agent has not gone on yet: still running to Motus.
            if !pending.is_empty() {
                out["status"] = json!("interrupted");
                out["interrupts"] = pending.iter().map(interrupt).collect();
            }
        }
        SessionStatus::Ready => {
            out["status"] = json!("idle");
            if let Some(turn) = orch.store.last_turn(&s.id).await? {
                if turn.status == TurnStatus::Failed {
                    out["status"] = json!("error");
                    out["error"] = turn
                        .error
                        .as_ref()
                        .and_then(|e| e["message"].as_str())
                        .map_or(json!("the turn failed"), |m| json!(m));
                } else {
                    out["response"] = json!({
                        "role": "assistant", "content": turn.text.unwrap_or_default(),
                    });
                }
            }
        }
        SessionStatus::Failed | SessionStatus::Dead | SessionStatus::Deleted => {
            out["status"] = json!("error");
            out["error"] = json!(
                s.failure_reason
                    .clone()
                    .unwrap_or_else(|| format!("the session is {}", s.status.as_str()))
            );
        }
    }
    Ok(out)
}

/// A native `input_required` as a Motus interrupt (a tool approval).
fn interrupt(e: &Event) -> Value {
    let tool = &e.data["tool"];
    json!({
        "interrupt_id": e.data["request_id"],
        "type": "tool_approval",
        "payload": {
            "tool_name": tool["title"].as_str().or(tool["kind"].as_str()).unwrap_or("tool"),
            "tool_args": if tool["input"].is_object() { tool["input"].clone() } else { json!({}) },
        },
    })
}

/// `POST …/sessions`: no body (the CLI sends none and no Content-Type), `{}`, or `{state: []}`.
async fn create_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(template): Path<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    if !body.iter().all(u8::is_ascii_whitespace) {
        let given: Value = serde_json::from_slice(&body).map_err(|e| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not JSON ({e}); send none, or {{}}"),
            )
        })?;
        if given["state"].as_array().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported(
                "`state` (a conversation to start from; an agent starts from its own)",
                DOC,
            ));
        }
    }
    created(&orch, &caller, &template, None).await
}

/// `PUT …/sessions/{uuid}`: a session under the id the client picked.
async fn put_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "a session id picked by the client is a UUID",
        ));
    }
    created(&orch, &caller, &template, Some(id)).await
}

async fn created(
    orch: &AppState,
    caller: &Caller,
    template: &str,
    name: Option<String>,
) -> Result<Response, Problem> {
    let (session, _) = create(orch, caller, template, name, None, None).await?;
    let mut response = (StatusCode::CREATED, Json(view(orch, &session).await?)).into_response();
    if let Some(loc) = location(template, &session) {
        response.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(response)
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<bool>,
    timeout: Option<f64>,
}

/// `GET …/sessions/{id}[?wait=true&timeout=S]`: with `wait`, answers when the session is no
/// longer `running` in Motus' words, or at the timeout (30 s by default, 60 s at most).
async fn get_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = crate::api::query_of(query)?;
    let wait = match (q.wait, q.timeout) {
        (Some(true), None) => Duration::from_secs(30),
        (Some(true), Some(t)) if t.is_finite() && t >= 0.0 => {
            Duration::from_secs_f64(t.min(MAX_WAIT.as_secs_f64()))
        }
        (Some(true), Some(_)) => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "`timeout` is a number of seconds, 0 or more",
            ));
        }
        _ => Duration::ZERO,
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = orch.changes();
    loop {
        let s = mounted(&orch, &caller, &template, &id).await?;
        let answer = view(&orch, &s).await?;
        if answer["status"] != "running"
            || !crate::session::changed(&mut changes, &s.id, deadline).await
        {
            return Ok(Json(answer).into_response());
        }
    }
}

async fn delete_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let s = mounted(&orch, &caller, &template, &id).await?;
    orch.delete(&caller.tenant, &s.id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET …/sessions`: the caller's sessions of this template (at most 1,000), a bare list.
async fn list_sessions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(template): Path<String>,
) -> Result<Response, Problem> {
    let filter = SessionFilter {
        status: None,
        present: true,
        harness: Some(template.clone()),
        after: None,
        newest_first: false,
        limit: MAX_SESSIONS,
    };
    let sessions = orch.list(&caller.tenant, &filter).await?;
    let counts = orch
        .store
        .message_counts(&caller.tenant, &template)
        .await
        .map_err(crate::session::SessionError::from)?;
    let mut out = Vec::new();
    for s in sessions
        .iter()
        .filter(|s| s.status != SessionStatus::Deleted)
    {
        // The listing's status needs no turn read: a session that is `ready` is idle to it.
        let status = match s.status {
            SessionStatus::Ready => "idle",
            SessionStatus::InputRequired => "interrupted",
            SessionStatus::Creating | SessionStatus::Running => "running",
            _ => "error",
        };
        out.push(json!({
            "session_id": client_id(s), "status": status,
            "total_messages": counts.get(&s.id).copied().unwrap_or(0),
        }));
    }
    Ok(Json(out).into_response())
}

/// `POST …/sessions/{id}/messages {content, role, user_params}`: starts a turn, `202`.
async fn send(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    body: Result<Json<MessageRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(mut req) = body?;
    let s = mounted(&orch, &caller, &template, &id).await?;
    // Its webhook is delivered in Motus' payload shape (`WebhookPayload`).
    if let Some(hook) = &mut req.webhook {
        hook.shape = Some(json!({ "dialect": "motus", "session_id": client_id(&s) }).to_string());
    }
    req.stream = false;
    req.async_ = true;
    orch.start_turn(&caller.tenant, &s.id, req, "async", &caller.limits)
        .await?;
    let mut response = (
        StatusCode::ACCEPTED,
        Json(json!({ "session_id": client_id(&s), "status": "running" })),
    )
        .into_response();
    if let Some(loc) = location(&template, &s) {
        response.headers_mut().insert(header::LOCATION, loc);
    }
    Ok(response)
}

/// `GET …/sessions/{id}/messages`: the conversation as a bare list of chat messages.
async fn history(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let s = mounted(&orch, &caller, &template, &id).await?;
    let mut out = Vec::new();
    let mut held = Vec::new();
    let mut after = 0;
    loop {
        let page = orch
            .history(
                &caller.tenant,
                &caller.limits,
                &s.id,
                crate::store::HistoryFrom::After(after),
                500,
            )
            .await?;
        out.extend(
            page.items
                .iter()
                .map(|m| json!({ "role": m.role, "content": m.text })),
        );
        held.push(page.admitted);
        if out.len() > MAX_HISTORY {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "history_too_long",
                format!(
                    "the session holds more than {MAX_HISTORY} messages, more than one unpaged \
                     list answers; page it at /v1/sessions/{}/messages",
                    client_id(&s)
                ),
            ));
        }
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    Ok(json_holding(&out, held))
}

#[derive(Deserialize)]
struct ResumeBody {
    interrupt_id: String,
    #[serde(default)]
    value: Value,
}

/// `POST …/sessions/{id}/resume {interrupt_id, value: {approved}}`: answers a tool approval.
async fn resume(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    body: Result<Json<ResumeBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(body) = body?;
    let s = mounted(&orch, &caller, &template, &id).await?;
    let pending = orch.pending_inputs(&s).await?;
    if pending.is_empty() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not_interrupted",
            "the session waits on no interrupt",
        ));
    }
    if !pending
        .iter()
        .any(|e| e.data["request_id"] == body.interrupt_id.as_str())
    {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "interrupt_not_found",
            format!("the session waits on no interrupt {:?}", body.interrupt_id),
        ));
    }
    let decision = match body.value.get("approved").and_then(Value::as_bool) {
        Some(true) => Decision::ApproveOnce,
        Some(false) => Decision::Deny,
        None if body.value.get("answers").is_some() => {
            return Err(unsupported(
                "`value.answers` (the agents here ask for approvals, not answers)",
                DOC,
            ));
        }
        None => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_resume",
                "send `value: {\"approved\": true}` or `{\"approved\": false}`",
            ));
        }
    };
    let answer = InputAnswer {
        decision: Some(decision),
        ..Default::default()
    };
    orch.answer(&caller.tenant, &s.id, &body.interrupt_id, &answer)
        .await?;
    Ok(Json(json!({ "session_id": client_id(&s), "status": "running" })).into_response())
}
