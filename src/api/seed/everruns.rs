//! Everruns (`everruns-sdk`): its `AgentClient` against `/compat/everruns/{template}` as the
//! agent URL, the template standing for the agent.
//!
//! A message is answered at once with the user message it created (`201`); the turn's output
//! comes as Everruns events (`input.message`, `turn.started`, `output.message.delta`,
//! `output.message.completed`, `tool.started`, `tool.completed`, `turn.completed|failed|cancelled`,
//! `session.idled`), translated from the native event log like the vendor APIs' histories, so
//! the list and the live stream agree. An event's `id` is its place in the log (`seq.k`) and its
//! `sequence` that place as one number (`seq * 8 + k`). docs/seed-clients.md has the mapping and
//! what is refused.

use super::{client_id, create, mounted, unsupported};
use crate::api::vendor::{Opening, Out, Place, Translate, history, live, parse_place};
use crate::api::{AppState, Caller, json_holding, query_of};
use crate::session::message::MessageRequest;
use crate::status::SessionStatus;
use crate::store::{Event, Message, Session, SessionFilter};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use sandwarden_proto::event::{Decision, InputAnswer};
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};

const DOC: &str = "docs/seed-clients.md (Everruns)";
/// Events one native event may become at most (`sequence = seq * SPREAD + k`).
const SPREAD: i64 = 8;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/sessions", post(create_session).get(list_sessions))
        .route("/sessions/{id}", get(get_session).delete(delete_session))
        .route("/sessions/{id}/messages", post(send).get(messages))
        .route("/sessions/{id}/events", get(events))
        .route("/sessions/{id}/sse", get(sse))
        .route("/sessions/{id}/cancel", post(cancel))
        .route("/sessions/{id}/tool-approvals", post(tool_approvals))
        .route("/sessions/{id}/question-answers", post(question_answers))
        .route("/runtime-auth", post(runtime_auth))
}

/// `GET {agent_url}`: the agent card.
pub async fn card(
    State(orch): State<AppState>,
    Extension(_caller): Extension<Caller>,
    Path(template): Path<String>,
) -> Result<Response, Problem> {
    let templates = orch.templates();
    let Some(t) = templates.get(&template) else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_harness",
            format!("no template {template:?}; GET /v1/templates lists them"),
        ));
    };
    Ok(Json(json!({
        "name": t.name,
        "description": format!("the {} harness in a sandwarden sandbox", t.name),
        "accepts": ["text", "image"],
        "conversation_starters": [],
    }))
    .into_response())
}

/// Everruns' session status: `started` (being made), `active` (a turn runs), `idle`, and
/// `waitingfortoolresults` (the agent waits on an approval).
fn status_word(s: &Session) -> &'static str {
    match s.status {
        SessionStatus::Creating => "started",
        SessionStatus::Running => "active",
        SessionStatus::InputRequired => "waitingfortoolresults",
        _ => "idle",
    }
}

async fn session_view(orch: &AppState, s: &Session) -> Result<Value, Problem> {
    let approvals: Vec<Value> = orch
        .pending_inputs(s)
        .await?
        .iter()
        .map(|e| {
            let tool = &e.data["tool"];
            json!({
                "approval_id": e.data["request_id"],
                "tool_call": {"id": tool["id"], "name": tool["title"], "arguments": tool["input"]},
                "options": ["approve", "approve_session", "reject"],
            })
        })
        .collect();
    Ok(json!({
        "id": client_id(s), "title": s.title, "status": status_word(s),
        "created_at": s.created_at, "updated_at": s.updated_at,
        "last_active_at": s.last_active_at,
        "ended": !s.status.is_live(), "failure_reason": s.failure_reason,
        "pending_approvals": approvals, "pending_questions": [],
    }))
}

#[derive(Deserialize, Default)]
struct CreateBody {
    title: Option<String>,
}

/// `POST …/sessions {title?}`.
async fn create_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(template): Path<String>,
    headers: HeaderMap,
    body: Result<Json<CreateBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(body) = body?;
    let key = crate::api::idempotency_key(&headers)?;
    let (session, created) = create(&orch, &caller, &template, None, body.title, key).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(session_view(&orch, &session).await?)).into_response())
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<i64>,
    page_token: Option<String>,
}

/// `GET …/sessions?limit=&page_token=`: `{data, next_page_token}`, oldest first.
async fn list_sessions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(template): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`limit` is between 1 and 100",
        ));
    }
    let after = q
        .page_token
        .as_deref()
        .map(|t| {
            crate::api::decode_cursor(t).ok_or_else(|| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_cursor",
                    "`page_token` is not one this server gave out; start without it",
                )
            })
        })
        .transpose()?;
    let filter = SessionFilter {
        status: None,
        present: true,
        harness: Some(template),
        after,
        newest_first: false,
        limit: limit + 1,
    };
    let mut sessions = orch.list(&caller.tenant, &filter).await?;
    let next = if sessions.len() as i64 > limit {
        sessions.truncate(limit as usize);
        sessions
            .last()
            .map(|s| crate::api::encode_cursor(&s.created_at, &s.id))
    } else {
        None
    };
    let mut data = Vec::new();
    for s in &sessions {
        data.push(session_view(&orch, s).await?);
    }
    Ok(Json(json!({ "data": data, "next_page_token": next })).into_response())
}

async fn get_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let s = mounted(&orch, &caller, &template, &id).await?;
    Ok(Json(session_view(&orch, &s).await?).into_response())
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

/// A stored message as an Everruns message.
fn message_view(m: &Message) -> Value {
    let role = if m.role == "assistant" {
        "agent"
    } else {
        m.role.as_str()
    };
    let mut content: Vec<Value> = m
        .parts
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(content_part)
        .collect();
    if content.is_empty() && !m.text.is_empty() {
        content.push(json!({"type": "text", "text": m.text}));
    }
    json!({
        "id": m.id, "session_id": m.session_id, "role": role, "content": content,
        "created_at": m.created_at, "turn_id": m.turn_id,
    })
}

/// A native part as an Everruns content part (reasoning is not a message part there).
fn content_part(p: &Value) -> Option<Value> {
    match p["type"].as_str()? {
        "text" => Some(json!({"type": "text", "text": p["text"]})),
        "image" => Some(
            json!({"type": "image", "media_type": p["mime_type"], "data": p["data"],
                               "url": p["url"]}),
        ),
        "tool_use" => Some(
            json!({"type": "tool_call", "id": p["id"], "name": p["name"],
                                  "arguments": p["input"]}),
        ),
        "tool_result" => Some(json!({"type": "tool_result", "tool_call_id": p["id"],
                                     "result": p["output"], "status": p["status"]})),
        _ => None,
    }
}

/// `POST …/sessions/{id}/messages {message: {role, content}}`: starts a turn and answers `201`
/// with the user message it created; the output follows as events. A message while a turn runs
/// is refused (`409`): a running turn is not steered here.
async fn send(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    body: Result<Json<MessageRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(mut req) = body?;
    let s = mounted(&orch, &caller, &template, &id).await?;
    req.stream = false;
    req.async_ = true;
    let started = orch
        .start_turn(&caller.tenant, &s.id, req, "async", &caller.limits)
        .await?;
    Ok((StatusCode::CREATED, Json(message_view(&started.prompt))).into_response())
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<i64>,
    page_token: Option<String>,
}

/// `GET …/sessions/{id}/messages`: `{data, next_page_token}`, oldest first.
async fn messages(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let s = mounted(&orch, &caller, &template, &id).await?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`limit` is between 1 and 500",
        ));
    }
    let after = match &q.page_token {
        None => 0,
        Some(t) => t.parse::<i64>().map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_cursor",
                "`page_token` is not one this server gave out; start without it",
            )
        })?,
    };
    let page = orch
        .history(
            &caller.tenant,
            &caller.limits,
            &s.id,
            crate::store::HistoryFrom::After(after),
            limit,
        )
        .await?;
    let data: Vec<Value> = page
        .items
        .iter()
        .map(|m| {
            message_view(&Message {
                id: m.id.clone(),
                session_id: s.id.clone(),
                turn_id: m.turn_id.clone(),
                role: m.role.clone(),
                text: m.text.clone(),
                parts: m.parts.clone(),
                metadata: Value::Null,
                created_at: m.created_at.clone(),
            })
        })
        .collect();
    let answer = json!({ "data": data, "next_page_token": page.next.map(|n| n.to_string()) });
    Ok(json_holding(&answer, page.admitted))
}

/// Where a client's `after_sequence` or `since_id` points: after that event.
fn place_of(after_sequence: Option<i64>, since_id: Option<&str>) -> Result<Option<Place>, Problem> {
    if let Some(id) = since_id {
        return parse_place(id).map(Some).ok_or_else(|| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                "`since_id` is an event id this server gave out",
            )
        });
    }
    match after_sequence {
        None => Ok(None),
        Some(n) if n < 0 => Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`after_sequence` is 0 or more",
        )),
        Some(n) => Ok(Some((n / SPREAD, u32::try_from(n % SPREAD).unwrap_or(0)))),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    after_sequence: Option<i64>,
    since_id: Option<String>,
    limit: Option<i64>,
}

/// `GET …/sessions/{id}/events?after_sequence=&limit=`: `{data}`, oldest first.
async fn events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let s = mounted(&orch, &caller, &template, &id).await?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`limit` is between 1 and 1000",
        ));
    }
    let after = place_of(q.after_sequence, q.since_id.as_deref())?.filter(|p| *p > (0, 0));
    let (outs, has_more) = history(
        &orch,
        &caller,
        &s.id,
        after,
        (usize::try_from(limit).unwrap_or(100), 4 << 20),
        |_| true,
        Translator::default(),
    )
    .await?;
    let data: Vec<Value> = outs.into_iter().map(|o| o.event).collect();
    let answer = json!({ "data": data, "has_more": has_more });
    crate::api::vendor::admitted_json(&orch, &caller, &answer).await
}

#[derive(Deserialize)]
struct SseQuery {
    after_sequence: Option<i64>,
    since_id: Option<String>,
}

/// `GET …/sessions/{id}/sse?since_id=|after_sequence=`: the events after that place (from now
/// on without either), live; `event: connected` first.
async fn sse(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    query: Result<Query<SseQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let after = place_of(q.after_sequence, q.since_id.as_deref())?;
    let slot = orch
        .streams
        .open(&caller.tenant, caller.limits.open_streams)?;
    let s = mounted(&orch, &caller, &template, &id).await?;
    let connected = SseEvent::default()
        .event("connected")
        .data(json!({"session_id": client_id(&s)}).to_string());
    live(
        &orch,
        &caller,
        s.id,
        slot,
        Translator::default(),
        frame,
        Opening {
            first: vec![connected],
            after,
        },
    )
    .await
}

fn frame(out: &Out) -> SseEvent {
    SseEvent::default()
        .event(out.kind())
        .id(out.event["id"].as_str().unwrap_or_default())
        .data(out.event.to_string())
}

/// `POST …/sessions/{id}/cancel`: cancels the running turn; a session with none is left as it
/// is (Everruns' cancel may be sent whatever the state).
async fn cancel(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let s = mounted(&orch, &caller, &template, &id).await?;
    match orch.cancel(&caller.tenant, &s.id).await {
        Ok(v) => Ok((StatusCode::ACCEPTED, Json(v)).into_response()),
        Err(crate::session::SessionError::NoTurnRunning) => {
            Ok(Json(json!({ "session_id": client_id(&s), "cancelling": false })).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

/// `POST …/sessions/{id}/tool-approvals`: `{decisions: [{approval_id, decision}]}` (also
/// `approvals`, or a bare list; the id may be `approval_id`, `id` or `tool_call_id`; the decision
/// `approve`, `approve_session` or `reject`, or `approved: bool`).
async fn tool_approvals(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((template, id)): Path<(String, String)>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(body) = body?;
    let s = mounted(&orch, &caller, &template, &id).await?;
    let list = body
        .as_array()
        .or_else(|| body["decisions"].as_array())
        .or_else(|| body["approvals"].as_array())
        .filter(|l| !l.is_empty() && l.len() <= 64)
        .ok_or_else(|| {
            invalid_approvals("send `{\"decisions\": [{\"approval_id\", \"decision\"}]}`")
        })?;
    let pending = orch.pending_inputs(&s).await?;
    let mut answered = Vec::new();
    for item in list {
        let (request_id, decision) = approval(item, &pending)?;
        let answer = InputAnswer {
            decision: Some(decision),
            ..Default::default()
        };
        orch.answer(&caller.tenant, &s.id, &request_id, &answer)
            .await?;
        answered.push(request_id);
    }
    Ok(Json(json!({ "session_id": client_id(&s), "answered": answered })).into_response())
}

fn invalid_approvals(detail: &str) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_approvals", detail)
}

/// One decision: the pending request it answers and what it says.
fn approval(item: &Value, pending: &[Event]) -> Result<(String, Decision), Problem> {
    let id = ["approval_id", "id", "request_id", "tool_call_id"]
        .iter()
        .find_map(|k| item[*k].as_str())
        .ok_or_else(|| invalid_approvals("each decision names its `approval_id`"))?;
    let request = pending
        .iter()
        .find(|e| e.data["request_id"] == id || e.data["tool"]["id"] == id)
        .and_then(|e| e.data["request_id"].as_str())
        .ok_or_else(|| {
            Problem::new(
                StatusCode::CONFLICT,
                "no_pending_approval",
                format!("the session waits on no approval {id:?}"),
            )
        })?;
    let decision = match (item["decision"].as_str(), item["approved"].as_bool()) {
        (Some("approve" | "approve_once" | "allow" | "allow_once"), _) | (None, Some(true)) => {
            Decision::ApproveOnce
        }
        (Some("approve_session" | "allow_always" | "always"), _) => Decision::ApproveSession,
        (Some("reject" | "deny"), _) | (None, Some(false)) => Decision::Deny,
        _ => {
            return Err(invalid_approvals(
                "`decision` is `approve`, `approve_session` or `reject` (or send `approved`)",
            ));
        }
    };
    Ok((request.to_string(), decision))
}

async fn question_answers() -> Problem {
    unsupported(
        "`question-answers` (the agents here ask for tool approvals, not questions)",
        DOC,
    )
}

async fn runtime_auth() -> Problem {
    unsupported(
        "`runtime-auth` (mint a key for the end user with POST /v1/api-keys instead)",
        DOC,
    )
}

/// The native event log read as Everruns events.
#[derive(Default)]
pub struct Translator {
    turn: Option<String>,
    place: Place,
    input_message_id: Option<String>,
    /// The agent's text so far in the turn (its reply, said whole at the turn's end).
    text: String,
    out: Vec<Out>,
}

impl Translator {
    fn emit(&mut self, e: &Event, kind: &str, data: Value) {
        let (seq, k) = self.place;
        self.place.1 += 1;
        self.out.push(Out {
            place: (seq, k),
            preview: false,
            event: json!({
                "id": format!("{seq}.{k}"),
                "sequence": seq * SPREAD + i64::from(k),
                "type": kind, "ts": e.ts, "session_id": e.session_id,
                "context": {"turn_id": self.turn, "input_message_id": self.input_message_id},
                "data": data,
            }),
        });
    }

    /// The turn's reply said whole, then its end.
    fn end_turn(&mut self, e: &Event, kind: &str, data: Value) {
        let text = std::mem::take(&mut self.text);
        if !text.is_empty() {
            let message = json!({
                "id": format!("{}_reply", self.turn.as_deref().unwrap_or("turn")),
                "role": "agent", "content": [{"type": "text", "text": text}],
            });
            self.emit(e, "output.message.completed", json!({ "message": message }));
        }
        self.emit(e, kind, data);
        self.emit(e, "session.idled", json!({}));
    }
}

impl Translate for Translator {
    fn opens_turn(&self, e: &Event) -> bool {
        e.turn_id.is_some() && e.turn_id != self.turn
    }

    fn push(&mut self, e: &Event, user: Option<&Message>) -> Vec<Out> {
        self.place = (e.seq, 0);
        let data = &e.data;
        if self.opens_turn(e) {
            self.turn = e.turn_id.clone();
            self.text.clear();
            self.input_message_id = user.map(|m| m.id.clone());
            if let Some(m) = user {
                self.emit(e, "input.message", json!({ "message": message_view(m) }));
            }
            let turn = self.turn.clone();
            self.emit(e, "turn.started", json!({ "turn_id": turn }));
        }
        let turn = self.turn.clone();
        match e.kind.as_str() {
            "text" => {
                let chunk = data["text"].as_str().unwrap_or_default();
                self.text.push_str(chunk);
                self.emit(e, "output.message.delta", json!({ "delta": chunk }));
            }
            "reasoning" => {
                let chunk = data["text"].clone();
                self.emit(e, "reason.thinking.delta", json!({ "delta": chunk }));
            }
            "tool_use" if data.get("update").is_none() => {
                let call =
                    json!({"id": data["id"], "name": data["name"], "arguments": data["input"]});
                self.emit(e, "tool.started", json!({ "tool_call": call }));
            }
            "tool_result" => {
                let result = json!({"tool_call_id": data["id"], "status": data["status"],
                                    "result": data["output"]});
                self.emit(e, "tool.completed", result);
            }
            "input_required" => {
                let tool = &data["tool"];
                let approval = json!({
                    "approval_id": data["request_id"],
                    "tool_call": {"id": tool["id"], "name": tool["title"], "arguments": tool["input"]},
                });
                self.emit(e, "tool.approval_requested", approval);
            }
            "done" if data["stop_reason"] == "cancelled" => {
                self.end_turn(e, "turn.cancelled", json!({ "turn_id": turn }));
            }
            "done" => {
                let usage = data["usage"].clone();
                self.end_turn(
                    e,
                    "turn.completed",
                    json!({ "turn_id": turn, "usage": usage }),
                );
            }
            "error" => {
                let failed = json!({
                    "turn_id": turn, "error": data["message"], "error_code": data["code"],
                });
                if data["code"] == sandwarden_proto::event::error_code::CANCELLED {
                    self.end_turn(e, "turn.cancelled", json!({ "turn_id": turn }));
                } else {
                    self.end_turn(e, "turn.failed", failed);
                }
            }
            _ => {}
        }
        std::mem::take(&mut self.out)
    }

    fn ended(&self, _session_id: &str, _status: &str) -> Vec<Value> {
        Vec::new()
    }
}
