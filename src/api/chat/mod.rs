//! Chat APIs as consumers of sandboxed agents: OpenAI Chat Completions (`/v1/chat/completions`),
//! OpenAI Responses (`/v1/responses`) and Anthropic Messages (`/v1/messages`), so any chat client
//! of those APIs talks to an agent. `model` names the template (`TEMPLATE`, or
//! `TEMPLATE/MODEL` to pick the agent's model too). The session is chosen by the
//! `X-Sandwarden-Session` header (a session's id, or `new` for a new one that is kept), or for
//! Responses by `previous_response_id`; without either a request runs in a session of its own,
//! deleted after it. docs/chat.md has the mapping and what is refused.

pub mod completions;
pub mod messages;
pub mod responses;

use super::seed::{Ephemeral, until_ready};
use super::{AppState, Caller, session_path};
use crate::session::message::MessageRequest;
use crate::session::turn::{Outcome, Started};
use crate::session::{CreateRequest, SessionError};
use crate::store::Session;
use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use sandwarden_proto::problem::Problem;
use serde_json::{Value, json};
use std::sync::Arc;

/// The header naming the session a chat request runs in.
pub const SESSION_HEADER: &str = "x-sandwarden-session";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(completions::create))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::retrieve))
        .route("/v1/messages", post(messages::create))
}

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
}

/// The template and agent model `model` names.
fn template_of(orch: &AppState, model: &str) -> Result<(String, Option<String>), Problem> {
    let (template, agent_model) = match model.split_once('/') {
        Some((t, m)) if !m.is_empty() => (t, Some(m.to_string())),
        _ => (model, None),
    };
    let templates = orch.templates();
    if templates.contains_key(template) {
        return Ok((template.to_string(), agent_model));
    }
    if template == "sandwarden"
        && let Some(default) = &orch.config.default_template
    {
        return Ok((default.clone(), agent_model));
    }
    Err(Problem::new(
        StatusCode::NOT_FOUND,
        "model_not_found",
        format!(
            "`model` {model:?} names no template; use one of {} (or TEMPLATE/MODEL to pick the \
             agent's model too)",
            templates.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    ))
}

/// The session a chat request runs in.
pub struct Target {
    pub session: Session,
    /// Whether the session holds the conversation already (only the newest message is sent).
    pub continuing: bool,
    /// Whether it is kept after the request (its id is answered in `X-Sandwarden-Session`).
    pub kept: bool,
    /// The agent's model the request asked for.
    pub model: Option<String>,
    /// A session made for the request, deleted when this is dropped unless it is kept and its
    /// client was answered (a request refused or failed leaves nothing behind).
    made: Option<Ephemeral>,
}

impl Target {
    /// The client is answered: a kept session stays (its id is in the answer).
    pub fn answered(&mut self) {
        if self.kept
            && let Some(made) = self.made.take()
        {
            made.disarm();
        }
    }
}

/// What a request asks of its session: an existing one by id, a new kept one, or one of its own.
pub enum Wanted {
    Existing(String),
    /// A new session kept after the request, idle for at most this long when given.
    Kept(Option<u64>),
    OneShot,
}

impl Wanted {
    /// From the `X-Sandwarden-Session` header: absent, an id, or `new`.
    pub fn from_headers(headers: &HeaderMap) -> Result<Wanted, Problem> {
        match headers.get(SESSION_HEADER).map(HeaderValue::to_str) {
            None => Ok(Wanted::OneShot),
            Some(Ok("new")) => Ok(Wanted::Kept(None)),
            Some(Ok(id)) if !id.is_empty() => Ok(Wanted::Existing(id.to_string())),
            _ => Err(invalid(format!(
                "`{SESSION_HEADER}` is a session's id, or `new`"
            ))),
        }
    }
}

/// Opens the session a request runs in: an existing one (checked to be the caller's, ready, and
/// of `model`'s template), or a new one of that template given `instructions`, once ready.
pub async fn open(
    orch: &AppState,
    caller: &Caller,
    model: &str,
    wanted: Wanted,
    instructions: Option<String>,
) -> Result<Target, Problem> {
    let (template, agent_model) = template_of(orch, model)?;
    if let Wanted::Existing(id) = wanted {
        let scoped = session_path(&caller.tenant, &id)?;
        let session = orch.get(&caller.tenant, &scoped).await?;
        if session.status == crate::status::SessionStatus::Deleted {
            return Err(SessionError::NotFound(id).into());
        }
        if session.harness != template {
            return Err(invalid(format!(
                "session {id:?} runs {:?}, not the template `model` names ({template:?})",
                session.harness
            )));
        }
        return Ok(Target {
            session,
            continuing: true,
            kept: true,
            model: agent_model,
            made: None,
        });
    }
    let (kept, idle_timeout_s) = match wanted {
        Wanted::Kept(idle) => (true, idle),
        _ => (false, None),
    };
    let req = CreateRequest {
        harness: template,
        instructions,
        idle_timeout_s,
        ..Default::default()
    };
    let (session, _) = orch
        .create(&caller.tenant, req, None, &caller.limits)
        .await?;
    let made = Ephemeral {
        orch: orch.clone(),
        tenant: caller.tenant.clone(),
        id: session.id.clone(),
    };
    let session = until_ready(orch, caller, &session.id).await?;
    Ok(Target {
        session,
        continuing: false,
        kept,
        model: agent_model,
        made: Some(made),
    })
}

/// One message of a client's conversation: its role and content (a string or parts).
pub struct Said {
    pub role: String,
    pub content: Value,
}

/// The text of a content (a string, or the text parts of an array).
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// What the turn is sent: the newest user message for a session that holds the conversation;
/// for a new one, that message alone when it is the whole conversation, else the conversation
/// before it as text followed by it. Images of earlier messages are not carried.
pub fn prompt(said: &[Said], continuing: bool) -> Result<Value, Problem> {
    let Some((last, before)) = said.split_last() else {
        return Err(invalid("the conversation holds no message"));
    };
    if last.role != "user" {
        return Err(invalid(format!(
            "the last message is the {:?}'s; the agent answers a user's message",
            last.role
        )));
    }
    if continuing || before.is_empty() {
        return Ok(last.content.clone());
    }
    let history: Vec<String> = before
        .iter()
        .map(|m| format!("{}: {}", m.role, text_of(&m.content)))
        .collect();
    let intro = format!(
        "The conversation so far:\n\n{}\n\nThe user now says:\n\n",
        history.join("\n")
    );
    let mut parts = vec![json!({"type": "text", "text": intro})];
    match &last.content {
        Value::Array(items) => parts.extend(items.iter().cloned()),
        other => parts.push(json!({"type": "text", "text": text_of(other)})),
    }
    Ok(Value::Array(parts))
}

/// Starts the turn of `content` in the target's session.
pub async fn start(
    orch: &AppState,
    caller: &Caller,
    target: &Target,
    content: Value,
    mode: &str,
) -> Result<Started, Problem> {
    let req = MessageRequest {
        content: Some(content),
        model: target.model.clone(),
        stream: mode == "stream",
        ..Default::default()
    };
    // A chat client cannot answer the agent's questions: each is refused (docs/chat.md).
    let questions = orch.hub.subscribe(&target.session.id);
    let started = orch
        .start_turn(
            &caller.tenant,
            &target.session.id,
            req,
            mode,
            &caller.limits,
        )
        .await?;
    super::seed::deny_questions(
        orch,
        caller,
        questions,
        target.session.id.clone(),
        started.turn_id.clone(),
    );
    Ok(started)
}

/// The outcome of a started turn; a failed turn is the error.
pub async fn finished(started: Started) -> Result<Arc<Outcome>, Problem> {
    Ok(started.outcome().await?.succeeded()?)
}

/// Tokens in and out of a turn's usage.
pub fn tokens(usage: &Value) -> (u64, u64) {
    (
        usage["input_tokens"].as_u64().unwrap_or(0),
        usage["output_tokens"].as_u64().unwrap_or(0),
    )
}

/// Names a kept session in the answer's `X-Sandwarden-Session` (the client is answered: the
/// session stays).
pub fn name_session(response: &mut Response, target: &mut Target) {
    target.answered();
    if target.kept
        && let Ok(v) = HeaderValue::from_str(&target.session.id)
    {
        response.headers_mut().insert(SESSION_HEADER, v);
    }
}

/// Refuses what a chat request may carry that has no counterpart: tools the client runs.
pub fn refuse_tools(tools: Option<&Value>) -> Result<(), Problem> {
    if tools
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty())
    {
        return Err(invalid(
            "`tools` run by the client are not supported here: the agent runs its own tools in \
             its sandbox (docs/chat.md)",
        ));
    }
    Ok(())
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A turn's stream as the answer, holding the stream quota's `slot` and the target (a session
/// of the request's own lives as long as its stream), naming a kept session.
pub fn stream_response(
    stream: impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
    + Send
    + 'static,
    slot: crate::session::quota::Slot,
    target: Target,
) -> Response {
    let mut target = target;
    target.answered();
    let kept = target
        .kept
        .then(|| HeaderValue::from_str(&target.session.id).ok())
        .flatten();
    let mut response = super::sse(super::holding(stream, (slot, target)));
    if let Some(v) = kept {
        response.headers_mut().insert(SESSION_HEADER, v);
    }
    response
}
