//! OpenAI Chat Completions: `POST /v1/chat/completions`, streamed (`chat.completion.chunk`s, then
//! `[DONE]`) or not.

use super::{Said, Target, Wanted, finished, name_session, open, prompt, start, tokens, unix_now};
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
    messages: Vec<ChatMessage>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<Value>,
    tools: Option<Value>,
    n: Option<u32>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Value,
}

/// `system` and `developer` messages are the session's instructions; the rest its conversation.
fn split(messages: Vec<ChatMessage>) -> (Option<String>, Vec<Said>) {
    let mut instructions = Vec::new();
    let mut said = Vec::new();
    for m in messages {
        if m.role == "system" || m.role == "developer" {
            instructions.push(super::text_of(&m.content));
        } else {
            said.push(Said {
                role: m.role,
                content: m.content,
            });
        }
    }
    let instructions = (!instructions.is_empty()).then(|| instructions.join("\n\n"));
    (instructions, said)
}

pub async fn create(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<Request>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(req) = body?;
    super::refuse_tools(req.tools.as_ref())?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(super::invalid("`n` is 1: an agent gives one answer a turn"));
    }
    let wanted = Wanted::from_headers(&headers)?;
    let (instructions, said) = split(req.messages);
    // The conversation is checked before a session is made for it.
    prompt(&said, true)?;
    let slot = crate::api::stream_slot(&orch, &caller, req.stream)?;
    let mut target = open(&orch, &caller, &req.model, wanted, instructions).await?;
    let content = prompt(&said, target.continuing)?;
    let model = req.model;
    if let Some(slot) = slot {
        let started = start(&orch, &caller, &target, content, "stream").await?;
        let usage_chunk = req
            .stream_options
            .as_ref()
            .is_some_and(|o| o["include_usage"] == true);
        return Ok(streamed(
            orch,
            caller,
            target,
            started,
            model,
            usage_chunk,
            slot,
        ));
    }
    let started = start(&orch, &caller, &target, content, "json").await?;
    let outcome = finished(started).await?;
    let (input, output) = tokens(&outcome.usage);
    let mut response = Json(json!({
        "id": format!("chatcmpl-{}", outcome.turn_id), "object": "chat.completion",
        "created": unix_now(), "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                     "message": {"role": "assistant", "content": outcome.text, "refusal": null}}],
        "usage": {"prompt_tokens": input, "completion_tokens": output,
                  "total_tokens": input + output},
    }))
    .into_response();
    name_session(&mut response, &mut target);
    Ok(response)
}

fn chunk(id: &str, model: &str, delta: Value, finish: Value) -> SseEvent {
    SseEvent::default().data(
        json!({"id": id, "object": "chat.completion.chunk", "created": unix_now(),
               "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                            "logprobs": null}]})
        .to_string(),
    )
}

fn streamed(
    orch: AppState,
    caller: Caller,
    target: Target,
    started: crate::session::turn::Started,
    model: String,
    usage_chunk: bool,
    slot: crate::session::quota::Slot,
) -> Response {
    let id = format!("chatcmpl-{}", started.turn_id);
    let natives = native_events(
        orch,
        &caller,
        target.session.id.clone(),
        started.events,
        Follow::Turn(started.turn_id.clone()),
    );
    let first = chunk(
        &id,
        &model,
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    );
    let frames = natives.flat_map(move |e| {
        let frames = match e.kind.as_str() {
            "text" => vec![chunk(
                &id,
                &model,
                json!({"content": e.data["text"]}),
                Value::Null,
            )],
            "done" => {
                let mut out = vec![chunk(&id, &model, json!({}), json!("stop"))];
                if usage_chunk {
                    let (input, output) = tokens(&e.data["usage"]);
                    out.push(
                        SseEvent::default().data(
                            json!({"id": id, "object": "chat.completion.chunk",
                               "created": unix_now(), "model": model, "choices": [],
                               "usage": {"prompt_tokens": input, "completion_tokens": output,
                                         "total_tokens": input + output}})
                            .to_string(),
                        ),
                    );
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
            "error" => vec![
                SseEvent::default().data(
                    json!({"error": {"message": e.data["message"], "type": "server_error",
                                     "code": e.data["code"]}})
                    .to_string(),
                ),
                SseEvent::default().data("[DONE]"),
            ],
            _ => Vec::new(),
        };
        futures::stream::iter(frames)
    });
    let stream = futures::stream::once(async move { first })
        .chain(frames)
        .map(Ok::<_, Infallible>);
    super::stream_response(stream, slot, target)
}
