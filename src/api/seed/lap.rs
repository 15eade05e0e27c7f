//! The LiteLLM Agent Platform's clients (`lap.mjs`, `@litellm/agent-sdk`) against
//! `/api/v1/managed_agents/…`: its agents are the templates, its sessions native sessions known
//! by a UUID (its CLI resumes only UUIDs). A LAP session is a record (`lap.session`) naming the
//! native session it runs on, so `restart` can give a dead or failed session a fresh sandbox
//! under the same id, replaying its conversation as the first message. docs/seed-clients.md has
//! the mapping.

use super::unsupported;
use crate::api::{AppState, Caller, Follow, holding, native_events, sse};
use crate::session::CreateRequest;
use crate::session::message::MessageRequest;
use crate::status::SessionStatus;
use crate::store::{Session, VendorObject};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::StreamExt;
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::convert::Infallible;

const KIND: &str = "lap.session";
const DOC: &str = "docs/seed-clients.md (LiteLLM Agent Platform)";
/// The most of a dead session's conversation a restart replays (its newest messages).
const REPLAY_BYTES: usize = 64 << 10;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", get(agents))
        .route("/agents/{agent_id}/session", post(create_session))
        .route("/sessions", get(list_sessions))
        .route("/sessions/{id}", get(get_session).delete(delete_session))
        .route("/sessions/{id}/message", post(message))
        .route("/sessions/{id}/message_stream", post(message_stream))
        .route("/sessions/{id}/events", get(events))
        .route("/sessions/{id}/messages", get(messages))
        .route("/sessions/{id}/abort", post(abort))
        .route("/sessions/{id}/restart", post(restart))
}

/// `GET …/agents`: the templates, as LAP agents.
async fn agents(State(orch): State<AppState>, Extension(_caller): Extension<Caller>) -> Response {
    let data: Vec<Value> = orch
        .templates()
        .values()
        .map(|t| {
            let tui = t.kind == sandwarden_proto::kind::HarnessKind::Tui;
            json!({"id": t.name, "name": t.name, "harness_id": t.name, "supports_tui": tui})
        })
        .collect();
    Json(json!({ "data": data })).into_response()
}

/// The caller's LAP session `id` and the native session it runs on now.
async fn record(orch: &AppState, caller: &Caller, id: &str) -> Result<VendorObject, Problem> {
    if uuid::Uuid::parse_str(id).is_err() {
        return Err(not_found(id));
    }
    orch.store
        .get_object(&caller.tenant, KIND, id, None)
        .await
        .map_err(crate::session::SessionError::from)?
        .ok_or_else(|| not_found(id))
}

fn not_found(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "session_not_found",
        format!("no session {id:?}"),
    )
}

async fn native(orch: &AppState, caller: &Caller, r: &VendorObject) -> Result<Session, Problem> {
    let id = r.body["native"].as_str().unwrap_or_default();
    Ok(orch.get(&caller.tenant, id).await?)
}

/// A session as LAP's `ApiSession`.
async fn view(orch: &AppState, r: &VendorObject, s: &Session) -> Result<Value, Problem> {
    let status = match s.status {
        SessionStatus::Creating => "creating",
        SessionStatus::Failed => "failed",
        SessionStatus::Dead | SessionStatus::Deleted => "dead",
        _ => "ready",
    };
    let response = match orch.store.last_turn(&s.id).await {
        Ok(Some(t)) => t.text,
        _ => None,
    };
    Ok(json!({
        "id": r.id, "agent_id": r.body["agent_id"], "title": r.body["title"],
        "harness_session_id": s.id, "sandbox_url": null,
        "tty_url": orch.tty_url(s), "tty_token": null, "supports_tui": s.kind == "tui",
        "status": status, "phase": s.phase, "phase_detail": null,
        "failure_reason": s.failure_reason, "response": response,
        "created_at": r.created_at, "last_seen_at": s.last_active_at,
        "idle_timeout_ms": s.idle_timeout_s.saturating_mul(1000),
        "restarts": r.body["restarts"],
    }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    title: Option<String>,
    initial_prompt: Option<String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    #[serde(default)]
    initial_attachments: Vec<Value>,
    #[serde(default)]
    skill_ids: Vec<Value>,
}

/// `POST …/agents/{agent_id}/session {title?, initial_prompt?, env_vars?}`: answered at once
/// (`creating` while a cold sandbox starts); an initial prompt runs as the first turn once the
/// session is ready, its reply in `response`.
async fn create_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(agent_id): Path<String>,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(body) = body?;
    if !body.initial_attachments.is_empty() || !body.skill_ids.is_empty() {
        return Err(unsupported(
            "`initial_attachments` and `skill_ids` (send images in a message's `parts`; skills \
             are the template's)",
            DOC,
        ));
    }
    let id = uuid::Uuid::new_v4().to_string();
    let req = CreateRequest {
        harness: agent_id.clone(),
        title: body.title.clone(),
        env: body.env_vars,
        metadata: Some(json!({ "lap_session": id })),
        ..Default::default()
    };
    let (session, _) = super::create_as(&orch, &caller, req, None).await?;
    let now = crate::store::now();
    let r = VendorObject {
        tenant: caller.tenant.clone(),
        kind: KIND.into(),
        id: id.clone(),
        version: 1,
        body: json!({"id": id, "native": session.id, "agent_id": agent_id,
                     "title": body.title, "restarts": 0}),
        created_at: now,
        archived_at: None,
    };
    if let Err(e) = orch.store.put_object(&r).await {
        let _ = orch.delete(&caller.tenant, &session.id).await;
        return Err(crate::session::SessionError::from(e).into());
    }
    if let Some(prompt) = body.initial_prompt
        && let Err(p) = first_turn(&orch, &caller, &session.id, prompt).await
    {
        // Refused: nothing is left of the request.
        let _ = orch.delete(&caller.tenant, &session.id).await;
        let _ = orch.store.delete_object(&caller.tenant, KIND, &id).await;
        return Err(p);
    }
    Ok((StatusCode::CREATED, Json(view(&orch, &r, &session).await?)).into_response())
}

/// Starts `text` as the session's first turn, without waiting for it (it waits for a cold
/// sandbox first).
async fn first_turn(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
    text: String,
) -> Result<(), Problem> {
    let req = MessageRequest {
        text: Some(text),
        async_: true,
        ..Default::default()
    };
    orch.start_turn(&caller.tenant, session_id, req, "async", &caller.limits)
        .await?;
    Ok(())
}

#[derive(Deserialize)]
struct ListQuery {
    agent_id: Option<String>,
    limit: Option<i64>,
}

/// `GET …/sessions?agent_id=&limit=`: newest first (50 by default, at most 200).
async fn list_sessions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = crate::api::query_of(query)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`limit` is between 1 and 200",
        ));
    }
    let records = orch
        .store
        .list_objects(&caller.tenant, KIND, None, true, false, limit)
        .await
        .map_err(crate::session::SessionError::from)?;
    let mut data = Vec::new();
    for r in records.iter().filter(|r| {
        q.agent_id
            .as_ref()
            .is_none_or(|a| r.body["agent_id"] == a.as_str())
    }) {
        if let Ok(s) = native(&orch, &caller, r).await {
            data.push(view(&orch, r, &s).await?);
        }
    }
    Ok(Json(json!({ "data": data })).into_response())
}

async fn get_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let r = record(&orch, &caller, &id).await?;
    let s = native(&orch, &caller, &r).await?;
    Ok(Json(view(&orch, &r, &s).await?).into_response())
}

/// `DELETE …/sessions/{id}`: idempotent, `200 {id, status: "deleted"}`.
async fn delete_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let r = record(&orch, &caller, &id).await?;
    let s = native(&orch, &caller, &r).await?;
    orch.delete(&caller.tenant, &s.id).await?;
    Ok(Json(json!({ "id": r.id, "status": "deleted" })).into_response())
}

/// The native session a message goes to: `404` when it is not ready (LAP's "not found or not
/// ready").
async fn ready(orch: &AppState, caller: &Caller, id: &str) -> Result<Session, Problem> {
    let r = record(orch, caller, id).await?;
    let s = native(orch, caller, &r).await?;
    if !s.status.is_live() || s.status == SessionStatus::Creating {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "session_not_ready",
            format!(
                "session {id:?} is {}; wait for `ready`{}",
                s.status.as_str(),
                if s.status.is_live() {
                    ""
                } else {
                    ", or restart it"
                }
            ),
        ));
    }
    Ok(s)
}

/// `POST …/sessions/{id}/message {text | parts}`: the whole turn, answered with its `parts`.
async fn message(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<MessageRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(mut req) = body?;
    let s = ready(&orch, &caller, &id).await?;
    req.stream = false;
    req.async_ = false;
    let started = orch
        .start_turn(&caller.tenant, &s.id, req, "json", &caller.limits)
        .await?;
    let outcome = started.outcome().await?;
    Ok(Json(outcome.into_reply()?).into_response())
}

/// A native event as LAP's frame.
fn frame(kind: &str, event: Value) -> SseEvent {
    let mut data = json!({ "type": kind });
    if !event.is_null() {
        data["event"] = event;
    }
    SseEvent::default().data(data.to_string())
}

/// `POST …/sessions/{id}/message_stream`: `{type: ready}`, then the turn's events as
/// `{type: harness_event, event}`, then `{type: done}` (or `{type: error, message}`).
async fn message_stream(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<MessageRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(mut req) = body?;
    let slot = orch
        .streams
        .open(&caller.tenant, caller.limits.open_streams)?;
    let s = ready(&orch, &caller, &id).await?;
    req.stream = true;
    req.async_ = false;
    let started = orch
        .start_turn(&caller.tenant, &s.id, req, "stream", &caller.limits)
        .await?;
    let events = native_events(
        orch.clone(),
        &caller,
        s.id,
        started.events,
        Follow::Turn(started.turn_id),
    )
    .flat_map(|e| {
        let mut frames = vec![frame("harness_event", json!(&*e))];
        match e.kind.as_str() {
            "done" => frames.push(frame("done", Value::Null)),
            "error" => frames.push(
                SseEvent::default().data(
                    json!({"type": "error", "message": e.data["message"], "code": e.data["code"]})
                        .to_string(),
                ),
            ),
            _ => {}
        }
        futures::stream::iter(frames)
    });
    let stream = futures::stream::once(async { frame("ready", Value::Null) })
        .chain(events)
        .map(Ok::<_, Infallible>);
    Ok(sse(holding(stream, slot)))
}

/// `GET …/sessions/{id}/events`: the session's events from now on, as `harness_event` frames;
/// `409` while it is being created.
async fn events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let r = record(&orch, &caller, &id).await?;
    let s = native(&orch, &caller, &r).await?;
    if s.status == SessionStatus::Creating {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "session_creating",
            "the session is being created; follow its events once it is `ready`",
        ));
    }
    let slot = orch
        .streams
        .open(&caller.tenant, caller.limits.open_streams)?;
    let rx = orch.hub.subscribe(&s.id);
    let now = orch
        .store
        .last_seq(&s.id)
        .await
        .map_err(crate::session::SessionError::from)?;
    let stream = native_events(orch.clone(), &caller, s.id, rx, Follow::Since(now))
        .map(|e| Ok::<_, Infallible>(frame("harness_event", json!(&*e))));
    Ok(sse(holding(stream, slot)))
}

/// `GET …/sessions/{id}/messages`: the conversation (the native history's first page shape).
async fn messages(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let r = record(&orch, &caller, &id).await?;
    let s = native(&orch, &caller, &r).await?;
    let page = orch
        .history(
            &caller.tenant,
            &caller.limits,
            &s.id,
            crate::store::HistoryFrom::After(0),
            500,
        )
        .await?;
    let answer = json!({ "id": r.id, "messages": page.items, "has_more": page.next.is_some() });
    Ok(crate::api::json_holding(&answer, page.admitted))
}

/// `POST …/sessions/{id}/abort`: cancels the running turn, if one runs.
async fn abort(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let r = record(&orch, &caller, &id).await?;
    let s = native(&orch, &caller, &r).await?;
    let aborted = match orch.cancel(&caller.tenant, &s.id).await {
        Ok(_) => true,
        Err(crate::session::SessionError::NoTurnRunning) => false,
        Err(e) => return Err(e.into()),
    };
    Ok(Json(json!({ "id": r.id, "aborted": aborted })).into_response())
}

/// `POST …/sessions/{id}/restart`: a dead or failed session gets a fresh sandbox of its agent
/// under the same id; its conversation (the newest 64 KiB of it) is the new sandbox's first
/// message. A live session is refused (`409`).
async fn restart(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let mut r = record(&orch, &caller, &id).await?;
    let old = native(&orch, &caller, &r).await?;
    if old.status.is_live() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "session_live",
            format!(
                "session {id:?} is {}: only a dead or failed session is restarted",
                old.status.as_str()
            ),
        ));
    }
    let replay = conversation(&orch, &caller, &old.id).await?;
    let req = CreateRequest {
        harness: old.harness.clone(),
        title: old.title.clone(),
        metadata: Some(json!({ "lap_session": r.id })),
        ..Default::default()
    };
    let (session, _) = super::create_as(&orch, &caller, req, None).await?;
    r.version += 1;
    r.body["native"] = json!(session.id);
    r.body["restarts"] = json!(r.body["restarts"].as_i64().unwrap_or(0) + 1);
    if let Err(e) = orch.store.put_object(&r).await {
        let _ = orch.delete(&caller.tenant, &session.id).await;
        return Err(match e {
            crate::store::StoreError::Conflict => Problem::new(
                StatusCode::CONFLICT,
                "restart_in_progress",
                "the session was restarted by another request at the same time",
            ),
            e => crate::session::SessionError::from(e).into(),
        });
    }
    if let Some(text) = replay {
        first_turn(&orch, &caller, &session.id, text).await?;
    }
    Ok(Json(view(&orch, &r, &session).await?).into_response())
}

/// The session's conversation as one message for a new sandbox, or `None` when it had none.
async fn conversation(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
) -> Result<Option<String>, Problem> {
    // The newest lines within the bound, kept as the pages are read.
    let mut kept: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut bytes = 0;
    let mut after = 0;
    loop {
        let page = orch
            .history(
                &caller.tenant,
                &caller.limits,
                session_id,
                crate::store::HistoryFrom::After(after),
                500,
            )
            .await?;
        for m in &page.items {
            let mut line = format!("{}: {}", m.role, m.text);
            if line.len() > REPLAY_BYTES {
                let mut end = REPLAY_BYTES;
                while !line.is_char_boundary(end) {
                    end -= 1;
                }
                line.truncate(end);
            }
            bytes += line.len() + 1;
            kept.push_back(line);
            while bytes > REPLAY_BYTES && kept.len() > 1 {
                bytes -= kept.pop_front().map_or(0, |l| l.len() + 1);
            }
        }
        match page.next {
            Some(n) => after = n,
            None => break,
        }
    }
    if kept.is_empty() {
        return Ok(None);
    }
    let kept: Vec<String> = kept.into();
    Ok(Some(format!(
        "Your sandbox was restarted. The conversation so far:\n\n{}",
        kept.join("\n")
    )))
}
