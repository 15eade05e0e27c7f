//! Stewrd (`stewrd`): its client's one-shot `POST /v1/agent` against
//! `/compat/stewrd/{template}` as the base URL. Each request runs one turn in a sandbox of its
//! own (a session of the template, made for it and deleted after it), with the request's
//! `files` written into the working directory first, and answers with the agent's reply and the
//! files the turn wrote. Streamed, the reply comes as Stewrd's `token`, `tool_start`, `tool_end`
//! and a last `done` (or `error`).
//!
//! Client-side `tools` and `capabilities` have no counterpart (the agent runs its own tools)
//! and are refused. docs/seed-clients.md has the mapping.

use super::{Ephemeral, create_as, unsupported, until_ready};
use crate::api::{AppState, Caller, Follow, holding, native_events, sse};
use crate::session::CreateRequest;
use crate::session::message::MessageRequest;
use crate::status::TurnStatus;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use sandwarden_proto::event::BindFile;
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Instant;

const DOC: &str = "docs/seed-clients.md (Stewrd)";
/// The most files an answer returns, the bytes of one, and of all together.
const MAX_FILES: usize = 32;
const MAX_FILE_BYTES: u64 = 256 << 10;
const MAX_FILES_BYTES: u64 = 2 << 20;

#[derive(Deserialize)]
pub struct AgentBody {
    message: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    files: Vec<InputFile>,
    #[serde(default)]
    tools: Vec<Value>,
}

#[derive(Deserialize)]
struct InputFile {
    name: String,
    content: String,
}

/// `POST …/v1/agent {message, stream, files}`.
pub async fn agent(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(template): Path<String>,
    body: Result<Json<AgentBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(body) = body?;
    if !body.tools.is_empty() {
        return Err(unsupported(
            "`tools` (client-side tools; the agent runs its own, in its sandbox)",
            DOC,
        ));
    }
    if !body.capabilities.is_empty() {
        return Err(unsupported(
            "`capabilities` (what an agent can do is its template's)",
            DOC,
        ));
    }
    let slot = crate::api::stream_slot(&orch, &caller, body.stream)?;
    let files = body
        .files
        .into_iter()
        .map(|f| BindFile {
            path: f.name,
            content: Some(f.content),
            content_base64: None,
            mode: None,
        })
        .collect();
    let req = CreateRequest {
        harness: template,
        files,
        ..Default::default()
    };
    let (session, _) = create_as(&orch, &caller, req, None).await?;
    let ephemeral = Ephemeral {
        orch: orch.clone(),
        tenant: caller.tenant.clone(),
        id: session.id.clone(),
    };
    // A cold sandbox is still starting: its files are there once it is ready.
    let session = until_ready(&orch, &caller, &session.id).await?;
    let before = sizes(&orch, &caller, &session.id).await?;
    let message = MessageRequest {
        text: Some(body.message),
        ..Default::default()
    };
    let started_at = Instant::now();
    let mode = if body.stream { "stream" } else { "json" };
    // Nobody can answer the agent's questions here: each is refused (docs/seed/stewrd.md).
    let questions = orch.hub.subscribe(&session.id);
    let started = orch
        .start_turn(&caller.tenant, &session.id, message, mode, &caller.limits)
        .await?;
    super::deny_questions(
        &orch,
        &caller,
        questions,
        session.id.clone(),
        started.turn_id.clone(),
    );
    if let Some(slot) = slot {
        return Ok(streamed(
            orch, caller, started, ephemeral, before, started_at, slot,
        ));
    }
    let outcome = started.outcome().await?.succeeded()?;
    let files = written(&orch, &caller, &session.id, &before).await?;
    drop(ephemeral);
    let tokens = outcome.usage["total_tokens"].as_u64().unwrap_or(0);
    Ok(Json(json!({
        "id": outcome.turn_id, "object": "agent.response",
        "status": if outcome.status == TurnStatus::Cancelled { "cancelled" } else { "completed" },
        "message": outcome.text, "tool_calls": [], "capabilities_used": [], "files": files,
        "usage": {"credits_this_request": 0, "credits_remaining": 0, "tokens_used": tokens},
        "meta": {"duration_ms": started_at.elapsed().as_millis() as u64, "project_id": "",
                 "plan": ""},
    }))
    .into_response())
}

/// The turn as Stewrd's events. A task of its own reads it, so the one-shot session is deleted
/// when the turn ends even if the client went away first (the turn is cancelled then).
fn streamed(
    orch: AppState,
    caller: Caller,
    started: crate::session::turn::Started,
    ephemeral: Ephemeral,
    before: HashMap<String, u64>,
    started_at: Instant,
    slot: crate::session::quota::Slot,
) -> Response {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SseEvent>(64);
    let session_id = started.session.id.clone();
    let turn_id = started.turn_id.clone();
    let natives = native_events(
        orch.clone(),
        &caller,
        session_id.clone(),
        started.events,
        Follow::Turn(turn_id.clone()),
    );
    tokio::spawn(async move {
        let _ephemeral = ephemeral;
        let mut natives = std::pin::pin!(natives);
        let mut tools: HashMap<String, String> = HashMap::new();
        let mut text = String::new();
        loop {
            // A client gone while the turn says nothing is noticed too: the turn is cancelled
            // and the session deleted, not left to the turn's timeout.
            let e = tokio::select! {
                e = natives.next() => match e {
                    Some(e) => e,
                    None => break,
                },
                () = tx.closed() => {
                    let _ = orch.cancel(&caller.tenant, &session_id).await;
                    break;
                }
            };
            let frame = match e.kind.as_str() {
                "text" => {
                    let chunk = e.data["text"].as_str().unwrap_or_default();
                    text.push_str(chunk);
                    Some(("token", json!({ "text": chunk })))
                }
                "tool_use" if e.data.get("update").is_none() => {
                    let name = e.data["name"].as_str().unwrap_or("tool").to_string();
                    let id = e.data["id"].as_str().unwrap_or_default().to_string();
                    tools.insert(id, name.clone());
                    Some(("tool_start", json!({ "tool": name })))
                }
                "tool_result" => {
                    let id = e.data["id"].as_str().unwrap_or_default();
                    let name = tools.get(id).cloned().unwrap_or_else(|| "tool".into());
                    Some(("tool_end", json!({ "tool": name })))
                }
                "done" => {
                    let files = match written(&orch, &caller, &session_id, &before).await {
                        Ok(f) => f,
                        Err(p) => {
                            tracing::warn!(detail = %p.detail, "reading a one-shot turn's files failed");
                            Vec::new()
                        }
                    };
                    let tokens = e.data["usage"]["total_tokens"].as_u64().unwrap_or(0);
                    Some((
                        "done",
                        json!({
                            "request_id": turn_id, "message": text, "files": files,
                            "tokens_used": tokens,
                            "duration_ms": started_at.elapsed().as_millis() as u64,
                        }),
                    ))
                }
                "error" => Some((
                    "error",
                    json!({
                        "code": e.data["code"], "message": e.data["message"],
                    }),
                )),
                _ => None,
            };
            if let Some((name, data)) = frame {
                let event = SseEvent::default().event(name).data(data.to_string());
                if tx.send(event).await.is_err() {
                    // The client went away: the turn has no reader left.
                    let _ = orch.cancel(&caller.tenant, &session_id).await;
                    break;
                }
            }
        }
    });
    let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok::<_, Infallible>);
    sse(holding(frames, slot))
}

/// The sizes of the files in the session's working directory, by path.
async fn sizes(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
) -> Result<HashMap<String, u64>, Problem> {
    let files =
        crate::api::vendor::files::session_files(orch, &caller.tenant, session_id, None).await?;
    Ok(files.into_iter().map(|f| (f.path, f.size)).collect())
}

/// The files the turn wrote (new, or of another size than before it), with their text: at most
/// `MAX_FILES`, each read whole up to `MAX_FILE_BYTES` and `MAX_FILES_BYTES` in all (past that a
/// file is listed with its size and no content). Bytes that are not UTF-8 come as base64.
async fn written(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
    before: &HashMap<String, u64>,
) -> Result<Vec<Value>, Problem> {
    let now =
        crate::api::vendor::files::session_files(orch, &caller.tenant, session_id, None).await?;
    let changed: Vec<_> = now
        .into_iter()
        .filter(|f| before.get(&f.path) != Some(&f.size))
        .take(MAX_FILES)
        .collect();
    let mut budget = MAX_FILES_BYTES;
    let total: u64 = changed
        .iter()
        .map(|f| f.size.min(MAX_FILE_BYTES))
        .sum::<u64>()
        .min(MAX_FILES_BYTES);
    let _admitted = orch
        .admit_answer(
            &caller.tenant,
            &caller.limits,
            usize::try_from(total).unwrap_or(usize::MAX),
        )
        .await?;
    let mut out = Vec::new();
    for f in changed {
        let mut file = json!({ "name": f.path, "size": f.size, "content": null, "url": null });
        if f.size <= MAX_FILE_BYTES && f.size <= budget {
            budget -= f.size;
            let bytes = read_whole(orch, caller, session_id, &f.path, f.size).await?;
            match String::from_utf8(bytes) {
                Ok(text) => file["content"] = json!(text),
                Err(e) => {
                    use base64::Engine;
                    file["content_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()));
                }
            }
        }
        out.push(file);
    }
    Ok(out)
}

/// A file of the working directory, refused past `max` bytes (it may have grown since listed).
async fn read_whole(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
    path: &str,
    max: u64,
) -> Result<Vec<u8>, Problem> {
    let mut from = orch.read_file(&caller.tenant, session_id, path).await?;
    let mut bytes = Vec::new();
    let unreadable = || {
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "harness_error",
            "a file the agent wrote could not be read from its sandbox",
        )
    };
    while let Some(chunk) = from.chunk().await.map_err(|_| unreadable())? {
        if (bytes.len() + chunk.len()) as u64 > max {
            return Err(unreadable());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// `POST …/v1/agent/{id}/tool-outputs`: there are no client-side tool calls to answer.
pub async fn tool_outputs() -> Problem {
    unsupported(
        "`tool-outputs` (no request here waits on client-side tools: `tools` are refused)",
        DOC,
    )
}
