//! Anthropic Messages: `POST /v1/messages`, streamed (`message_start` … `message_stop`) or not.

use super::{Said, Target, Wanted, finished, name_session, open, prompt, start, tokens};
use crate::api::{AppState, Caller, Follow, native_events};
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;

#[derive(Deserialize)]
pub struct Request {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default)]
    system: Value,
    #[serde(default)]
    stream: bool,
    tools: Option<Value>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Value,
}

pub async fn create(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<Request>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(req) = body?;
    super::refuse_tools(req.tools.as_ref())?;
    let wanted = Wanted::from_headers(&headers)?;
    let system = super::text_of(&req.system);
    let instructions = (!system.is_empty()).then_some(system);
    let said: Vec<Said> = req
        .messages
        .into_iter()
        .map(|m| Said {
            role: m.role,
            content: m.content,
        })
        .collect();
    // The conversation is checked before a session is made for it.
    prompt(&said, true)?;
    let slot = crate::api::stream_slot(&orch, &caller, req.stream)?;
    let mut target = open(&orch, &caller, &req.model, wanted, instructions).await?;
    let content = prompt(&said, target.continuing)?;
    if let Some(slot) = slot {
        let started = start(&orch, &caller, &target, content, "stream").await?;
        return Ok(streamed(orch, caller, target, started, req.model, slot));
    }
    let started = start(&orch, &caller, &target, content, "json").await?;
    let outcome = finished(started).await?;
    let (input, output) = tokens(&outcome.usage);
    let mut response = Json(json!({
        "id": format!("msg_{}", outcome.turn_id), "type": "message", "role": "assistant",
        "model": req.model, "content": [{"type": "text", "text": outcome.text}],
        "stop_reason": stop_reason(outcome.stop_reason.as_deref()), "stop_sequence": null,
        "usage": {"input_tokens": input, "output_tokens": output},
    }))
    .into_response();
    name_session(&mut response, &mut target);
    Ok(response)
}

/// The agent's stop reason in Anthropic's words.
fn stop_reason(native: Option<&str>) -> &'static str {
    match native {
        Some("max_tokens") => "max_tokens",
        Some("refusal") => "refusal",
        _ => "end_turn",
    }
}

fn event(name: &str, data: Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

fn streamed(
    orch: AppState,
    caller: Caller,
    target: Target,
    started: crate::session::turn::Started,
    model: String,
    slot: crate::session::quota::Slot,
) -> Response {
    let id = format!("msg_{}", started.turn_id);
    let natives = native_events(
        orch,
        &caller,
        target.session.id.clone(),
        started.events,
        Follow::Turn(started.turn_id.clone()),
    );
    let opening = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    let frames = natives.flat_map(move |e| {
        let frames = match e.kind.as_str() {
            "text" => vec![event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0,
                       "delta": {"type": "text_delta", "text": e.data["text"]}}),
            )],
            "done" => {
                let (_, output) = tokens(&e.data["usage"]);
                vec![
                    event(
                        "content_block_stop",
                        json!({"type": "content_block_stop", "index": 0}),
                    ),
                    event(
                        "message_delta",
                        json!({"type": "message_delta",
                               "delta": {"stop_reason": stop_reason(e.data["stop_reason"].as_str()),
                                         "stop_sequence": null},
                               "usage": {"output_tokens": output}}),
                    ),
                    event("message_stop", json!({"type": "message_stop"})),
                ]
            }
            "error" => vec![event(
                "error",
                json!({"type": "error", "error": {"type": "api_error",
                                                  "message": e.data["message"]}}),
            )],
            _ => Vec::new(),
        };
        futures::stream::iter(frames)
    });
    let stream = futures::stream::iter(opening)
        .chain(frames)
        .map(Ok::<_, Infallible>);
    super::stream_response(stream, slot, target)
}
