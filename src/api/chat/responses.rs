//! OpenAI Responses: `POST /v1/responses` (streamed or not) and `GET /v1/responses/{id}`. A
//! response's id names its session and turn, so `previous_response_id` continues the session
//! that answered it. A response is kept (its session lives on) unless `store` is `false`.

use super::{Said, Target, Wanted, finished, open, prompt, start, tokens, unix_now};
use crate::api::{AppState, Caller, Follow, native_events, session_path};
use crate::status::TurnStatus;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use futures::StreamExt;
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;

/// How long a session made for a stored response (by default) waits idle for its next turn.
const STORED_IDLE_S: u64 = 600;

#[derive(Deserialize)]
pub struct Request {
    model: String,
    input: Value,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    #[serde(default)]
    stream: bool,
    store: Option<bool>,
    tools: Option<Value>,
}

/// A response's id: its session and turn.
fn response_id(session_id: &str, turn_id: &str) -> String {
    let raw = format!("{session_id}\n{turn_id}");
    format!(
        "resp_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

/// The id of a response of `target`'s: one that is not stored (its session goes with the
/// request) names nothing, so it is neither retrieved nor continued.
fn target_response_id(target: &Target, turn_id: &str) -> String {
    if target.kept {
        response_id(&target.session.id, turn_id)
    } else {
        format!("resp_{}", uuid::Uuid::new_v4().simple())
    }
}

fn parse_response_id(id: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(id.strip_prefix("resp_")?)
        .ok()?;
    let (session, turn) = String::from_utf8(raw)
        .ok()?
        .split_once('\n')
        .map(|(s, t)| (s.to_string(), t.to_string()))?;
    Some((session, turn))
}

fn no_response(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "response_not_found",
        format!("no response {id:?}"),
    )
}

/// The conversation `input` holds: a string, or message items.
fn said_of(input: Value) -> Result<Vec<Said>, Problem> {
    match input {
        Value::String(text) => Ok(vec![Said {
            role: "user".into(),
            content: Value::String(text),
        }]),
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let kind = item["type"].as_str().unwrap_or("message");
                let role = item["role"].as_str();
                match (kind, role) {
                    ("message", Some(role)) => Ok(Said {
                        role: role.to_string(),
                        content: item["content"].clone(),
                    }),
                    _ => Err(super::invalid(format!(
                        "input[{i}]: only message items ({{role, content}}) are taken; a {kind:?} \
                         item has no counterpart here (the agent runs its own tools)"
                    ))),
                }
            })
            .collect(),
        _ => Err(super::invalid(
            "`input` is a string or an array of messages",
        )),
    }
}

/// A response object; `text` is its output when it has one.
fn response_object(
    id: &str,
    model: &str,
    status: &str,
    text: Option<&str>,
    usage: &Value,
    previous: Option<&str>,
) -> Value {
    let output = match text {
        Some(text) => json!([{
            "type": "message", "id": format!("msg_{}", id.trim_start_matches("resp_")),
            "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }]),
        None => json!([]),
    };
    let (input, out) = tokens(usage);
    json!({
        "id": id, "object": "response", "created_at": unix_now(), "status": status,
        "model": model, "output": output, "previous_response_id": previous,
        "error": null, "incomplete_details": null, "parallel_tool_calls": false,
        "tool_choice": "auto", "tools": [], "metadata": {},
        "usage": {"input_tokens": input, "output_tokens": out, "total_tokens": input + out,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 0}},
    })
}

pub async fn create(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<Request>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(req) = body?;
    super::refuse_tools(req.tools.as_ref())?;
    let said = said_of(req.input)?;
    let (mut instructions, said): (Vec<String>, Vec<Said>) =
        said.into_iter()
            .fold((Vec::new(), Vec::new()), |(mut ins, mut rest), m| {
                if m.role == "system" || m.role == "developer" {
                    ins.push(super::text_of(&m.content));
                } else {
                    rest.push(m);
                }
                (ins, rest)
            });
    instructions.extend(req.instructions.clone());
    let instructions = (!instructions.is_empty()).then(|| instructions.join("\n\n"));
    // The conversation is checked before a session is made for it.
    prompt(&said, true)?;
    let wanted = match &req.previous_response_id {
        Some(previous) => {
            let (session, _) = parse_response_id(previous).ok_or_else(|| no_response(previous))?;
            Wanted::Existing(session)
        }
        None => match Wanted::from_headers(&headers)? {
            // Stored by default, as OpenAI's are, so `previous_response_id` can continue it;
            // idle for at most 10 minutes unless the client asked for a kept session itself.
            Wanted::OneShot if req.store != Some(false) => Wanted::Kept(Some(STORED_IDLE_S)),
            w => w,
        },
    };
    let slot = crate::api::stream_slot(&orch, &caller, req.stream)?;
    let mut target = open(&orch, &caller, &req.model, wanted, instructions.clone())
        .await
        .map_err(|p| match (&req.previous_response_id, p.status) {
            (Some(previous), 404) => no_response(previous),
            _ => p,
        })?;
    let mut content = prompt(&said, target.continuing)?;
    // Instructions sent again with a continued response: the agent's system prompt was set
    // when its session started, so they come with the turn instead.
    if target.continuing
        && let Some(text) = &instructions
    {
        let mut parts = vec![json!({"type": "text",
            "text": format!("<instructions>\n{text}\n</instructions>\n\n")})];
        match content {
            Value::Array(items) => parts.extend(items),
            other => parts.push(json!({"type": "text", "text": super::text_of(&other)})),
        }
        content = Value::Array(parts);
    }
    let previous = req.previous_response_id;
    if let Some(slot) = slot {
        let started = start(&orch, &caller, &target, content, "stream").await?;
        return Ok(streamed(
            orch, caller, target, started, req.model, previous, slot,
        ));
    }
    let started = start(&orch, &caller, &target, content, "json").await?;
    let outcome = finished(started).await?;
    let id = target_response_id(&target, &outcome.turn_id);
    let mut response = Json(response_object(
        &id,
        &req.model,
        "completed",
        Some(&outcome.text),
        &outcome.usage,
        previous.as_deref(),
    ))
    .into_response();
    super::name_session(&mut response, &mut target);
    Ok(response)
}

/// `GET /v1/responses/{id}`: a kept response, from its turn.
pub async fn retrieve(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let (session_id, turn_id) = parse_response_id(&id).ok_or_else(|| no_response(&id))?;
    let scoped = session_path(&caller.tenant, &session_id).map_err(|_| no_response(&id))?;
    let session = orch
        .get(&caller.tenant, &scoped)
        .await
        .map_err(|_| no_response(&id))?;
    let turn = orch
        .store
        .get_turn(&session.id, &turn_id)
        .await
        .map_err(crate::session::SessionError::from)?
        .ok_or_else(|| no_response(&id))?;
    let (status, text) = match turn.status {
        TurnStatus::Running => ("in_progress", None),
        TurnStatus::Completed => ("completed", turn.text.clone()),
        TurnStatus::Cancelled => ("cancelled", turn.text.clone()),
        TurnStatus::Failed => ("failed", None),
    };
    let model = turn.options["model"]
        .as_str()
        .map_or(session.harness.clone(), |m| {
            format!("{}/{m}", session.harness)
        });
    let mut object = response_object(
        &id,
        &model,
        status,
        text.as_deref(),
        turn.usage.as_ref().unwrap_or(&Value::Null),
        None,
    );
    if let Some(e) = &turn.error {
        object["error"] = json!({"code": e["code"], "message": e["message"]});
    }
    Ok(Json(object).into_response())
}

fn streamed(
    orch: AppState,
    caller: Caller,
    target: Target,
    started: crate::session::turn::Started,
    model: String,
    previous: Option<String>,
    slot: crate::session::quota::Slot,
) -> Response {
    let id = target_response_id(&target, &started.turn_id);
    let item_id = format!("msg_{}", id.trim_start_matches("resp_"));
    let natives = native_events(
        orch,
        &caller,
        target.session.id.clone(),
        started.events,
        Follow::Turn(started.turn_id.clone()),
    );
    let mut seq = 0u64;
    let mut text = String::new();
    let mut next = move |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(seq);
        seq += 1;
        SseEvent::default().event(kind).data(data.to_string())
    };
    let pending = response_object(
        &id,
        &model,
        "in_progress",
        None,
        &Value::Null,
        previous.as_deref(),
    );
    let item = json!({"type": "message", "id": item_id, "status": "in_progress",
                      "role": "assistant", "content": []});
    let part = json!({"type": "output_text", "text": "", "annotations": []});
    let opening = vec![
        next("response.created", json!({"response": pending})),
        next("response.in_progress", json!({"response": pending})),
        next(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        ),
        next(
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part}),
        ),
    ];
    let frames = natives.flat_map(move |e| {
        let frames = match e.kind.as_str() {
            "text" => {
                let delta = e.data["text"].as_str().unwrap_or_default();
                text.push_str(delta);
                vec![next(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                           "delta": delta, "logprobs": []}),
                )]
            }
            "done" => {
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let item = json!({"type": "message", "id": item_id, "status": "completed",
                                  "role": "assistant", "content": [part]});
                let done = response_object(
                    &id,
                    &model,
                    "completed",
                    Some(&text),
                    &e.data["usage"],
                    previous.as_deref(),
                );
                vec![
                    next(
                        "response.output_text.done",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                               "text": text, "logprobs": []}),
                    ),
                    next(
                        "response.content_part.done",
                        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                               "part": part}),
                    ),
                    next(
                        "response.output_item.done",
                        json!({"output_index": 0, "item": item}),
                    ),
                    next("response.completed", json!({"response": done})),
                ]
            }
            "error" => {
                let mut failed = response_object(
                    &id,
                    &model,
                    "failed",
                    None,
                    &Value::Null,
                    previous.as_deref(),
                );
                failed["error"] = json!({"code": "server_error", "message": e.data["message"]});
                vec![next("response.failed", json!({"response": failed}))]
            }
            _ => Vec::new(),
        };
        futures::stream::iter(frames)
    });
    let stream = futures::stream::iter(opening)
        .chain(frames)
        .map(Ok::<_, Infallible>);
    super::stream_response(stream, slot, target)
}
