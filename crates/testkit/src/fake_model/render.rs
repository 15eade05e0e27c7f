//! Rendering (pure): an `Answer` as one provider's JSON body or SSE frames.

use super::*;

/// One server-sent event, sent after `delay`.
#[derive(Debug, Clone, PartialEq)]
pub struct SseFrame {
    pub event: Option<String>,
    pub data: String,
    pub delay: Duration,
}

impl SseFrame {
    pub(crate) fn named(event: &str, data: &Value) -> SseFrame {
        SseFrame {
            event: Some(event.to_string()),
            data: data.to_string(),
            delay: Duration::ZERO,
        }
    }

    pub(crate) fn data(data: impl Into<String>) -> SseFrame {
        SseFrame {
            event: None,
            data: data.into(),
            delay: Duration::ZERO,
        }
    }

    fn after(mut self, delay: Duration) -> SseFrame {
        self.delay = delay;
        self
    }

    /// `event: NAME\ndata: LINE\n…\n\n`; each line of the data gets its own `data:` field.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(event) = &self.event {
            out.push_str("event: ");
            out.push_str(event);
            out.push('\n');
        }
        for line in self.data.split('\n') {
            out.push_str("data: ");
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        out
    }
}

/// Everything a renderer needs besides the answer.
#[derive(Debug, Clone)]
pub struct Reply<'a> {
    pub conv: &'a Conversation,
    pub answer: &'a Answer,
    /// The request's sequence number: ids derive from it, so they are unique and predictable.
    pub seq: u64,
    /// Unix seconds.
    pub created: u64,
}

impl Reply<'_> {
    fn model(&self) -> &str {
        &self.conv.model
    }

    fn input_tokens(&self) -> u64 {
        self.conv.input_tokens
    }

    fn output_tokens(&self) -> u64 {
        self.answer.output_tokens()
    }

    // --- Anthropic Messages -------------------------------------------------------------------

    fn anthropic_usage(&self, output_tokens: u64) -> Value {
        json!({
            "input_tokens": self.input_tokens(),
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        })
    }

    fn anthropic_stop_reason(&self) -> &'static str {
        match self.answer {
            Answer::Tool(_) => "tool_use",
            _ => "end_turn",
        }
    }

    fn tool_use_id(&self) -> String {
        format!("toolu_fake{}", self.seq)
    }

    pub fn anthropic_message(&self) -> Value {
        let content = match self.answer {
            Answer::Tool(call) => json!([{
                "type": "tool_use", "id": self.tool_use_id(), "name": call.name,
                "input": call.arguments,
            }]),
            _ => json!([{"type": "text", "text": self.answer.full_text()}]),
        };
        json!({
            "id": format!("msg_fake{}", self.seq),
            "type": "message",
            "role": "assistant",
            "model": self.model(),
            "content": content,
            "stop_reason": self.anthropic_stop_reason(),
            "stop_sequence": null,
            "usage": self.anthropic_usage(self.output_tokens()),
        })
    }

    pub fn anthropic_stream(&self) -> Vec<SseFrame> {
        let mut message = self.anthropic_message();
        message["content"] = json!([]);
        message["stop_reason"] = Value::Null;
        message["usage"] = self.anthropic_usage(1);
        let mut frames = vec![
            SseFrame::named(
                "message_start",
                &json!({"type": "message_start", "message": message}),
            ),
            SseFrame::named("ping", &json!({"type": "ping"})),
        ];
        let (block, deltas, delay) = match self.answer {
            Answer::Tool(call) => (
                json!({"type": "tool_use", "id": self.tool_use_id(), "name": call.name, "input": {}}),
                split_even(&call.arguments.to_string(), ARG_DELTAS)
                    .into_iter()
                    .map(|piece| json!({"type": "input_json_delta", "partial_json": piece}))
                    .collect::<Vec<_>>(),
                Duration::ZERO,
            ),
            Answer::Text { deltas, delay } => (
                json!({"type": "text", "text": ""}),
                deltas
                    .iter()
                    .map(|d| json!({"type": "text_delta", "text": d}))
                    .collect(),
                *delay,
            ),
            Answer::Error { .. } => (
                json!({"type": "text", "text": ""}),
                Vec::new(),
                Duration::ZERO,
            ),
        };
        frames.push(SseFrame::named(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block": block}),
        ));
        for delta in deltas {
            frames.push(
                SseFrame::named(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0, "delta": delta}),
                )
                .after(delay),
            );
        }
        frames.push(SseFrame::named(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ));
        frames.push(SseFrame::named(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {"stop_reason": self.anthropic_stop_reason(), "stop_sequence": null},
                "usage": self.anthropic_usage(self.output_tokens()),
            }),
        ));
        frames.push(SseFrame::named(
            "message_stop",
            &json!({"type": "message_stop"}),
        ));
        frames
    }

    // --- OpenAI Chat Completions --------------------------------------------------------------

    fn chat_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.input_tokens(),
            "completion_tokens": self.output_tokens(),
            "total_tokens": self.input_tokens() + self.output_tokens(),
        })
    }

    fn chat_finish_reason(&self) -> &'static str {
        match self.answer {
            Answer::Tool(_) => "tool_calls",
            _ => "stop",
        }
    }

    fn call_id(&self) -> String {
        format!("call_fake{}", self.seq)
    }

    pub fn chat_completion(&self) -> Value {
        let message = match self.answer {
            Answer::Tool(call) => json!({
                "role": "assistant", "content": null,
                "tool_calls": [{"id": self.call_id(), "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments.to_string()}}],
            }),
            _ => json!({"role": "assistant", "content": self.answer.full_text()}),
        };
        json!({
            "id": format!("chatcmpl-fake{}", self.seq),
            "object": "chat.completion",
            "created": self.created,
            "model": self.model(),
            "choices": [{"index": 0, "message": message, "logprobs": null,
                         "finish_reason": self.chat_finish_reason()}],
            "usage": self.chat_usage(),
        })
    }

    /// `data:` chunks ending in `data: [DONE]`; with `include_usage` a last chunk with no
    /// choices carries the usage (and every other chunk has `"usage": null`, as OpenAI does).
    pub fn chat_stream(&self, include_usage: bool) -> Vec<SseFrame> {
        let chunk = |delta: Value, finish: Value| {
            let mut c = json!({
                "id": format!("chatcmpl-fake{}", self.seq),
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model(),
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            if include_usage {
                c["usage"] = Value::Null;
            }
            SseFrame::data(c.to_string())
        };
        let mut frames = vec![chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        )];
        match self.answer {
            Answer::Tool(call) => {
                frames.push(chunk(
                    json!({"tool_calls": [{"index": 0, "id": self.call_id(), "type": "function",
                        "function": {"name": call.name, "arguments": ""}}]}),
                    Value::Null,
                ));
                for piece in split_even(&call.arguments.to_string(), ARG_DELTAS) {
                    frames.push(chunk(
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                        Value::Null,
                    ));
                }
            }
            Answer::Text { deltas, delay } => {
                for d in deltas {
                    frames.push(chunk(json!({"content": d}), Value::Null).after(*delay));
                }
            }
            Answer::Error { .. } => {}
        }
        frames.push(chunk(json!({}), self.chat_finish_reason().into()));
        if include_usage {
            frames.push(SseFrame::data(
                json!({
                    "id": format!("chatcmpl-fake{}", self.seq),
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model(),
                    "choices": [],
                    "usage": self.chat_usage(),
                })
                .to_string(),
            ));
        }
        frames.push(SseFrame::data("[DONE]"));
        frames
    }

    // --- OpenAI Responses ---------------------------------------------------------------------

    fn responses_usage(&self) -> Value {
        json!({
            "input_tokens": self.input_tokens(),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens(),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens() + self.output_tokens(),
        })
    }

    fn response_object(&self, status: &str, output: Vec<Value>, usage: Value) -> Value {
        json!({
            "id": format!("resp_fake{}", self.seq),
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model(),
            "output": output,
            "usage": usage,
            "error": null,
            "incomplete_details": null,
        })
    }

    /// The one output item, finished (`done`) or just added.
    fn output_item(&self, done: bool) -> Value {
        let status = if done { "completed" } else { "in_progress" };
        match self.answer {
            Answer::Tool(call) => json!({
                "type": "function_call",
                "id": format!("fc_fake{}", self.seq),
                "call_id": self.call_id(),
                "name": call.name,
                "arguments": if done { call.arguments.to_string() } else { String::new() },
                "status": status,
            }),
            _ => json!({
                "type": "message",
                "id": format!("msg_fake{}", self.seq),
                "status": status,
                "role": "assistant",
                "content": if done {
                    json!([{"type": "output_text", "text": self.answer.full_text(), "annotations": []}])
                } else {
                    json!([])
                },
            }),
        }
    }

    pub fn response(&self) -> Value {
        self.response_object(
            "completed",
            vec![self.output_item(true)],
            self.responses_usage(),
        )
    }

    /// `event: TYPE` + `data: {"type": TYPE, "sequence_number": n, …}` frames, ending in
    /// `response.completed`.
    pub fn responses_stream(&self) -> Vec<SseFrame> {
        let mut frames = Vec::new();
        let mut push = |kind: &str, data: Value, delay: Duration| {
            // `type` and `sequence_number` first, as the real API writes them.
            let mut event = Map::new();
            event.insert("type".into(), kind.into());
            event.insert("sequence_number".into(), frames.len().into());
            if let Value::Object(fields) = data {
                event.extend(fields);
            }
            frames.push(SseFrame::named(kind, &Value::Object(event)).after(delay));
        };
        let zero = Duration::ZERO;
        let pending = self.response_object("in_progress", Vec::new(), Value::Null);
        push("response.created", json!({"response": pending}), zero);
        push("response.in_progress", json!({"response": pending}), zero);
        let item_id = self.output_item(false)["id"].clone();
        push(
            "response.output_item.added",
            json!({"output_index": 0, "item": self.output_item(false)}),
            zero,
        );
        match self.answer {
            Answer::Tool(call) => {
                let arguments = call.arguments.to_string();
                for piece in split_even(&arguments, ARG_DELTAS) {
                    push(
                        "response.function_call_arguments.delta",
                        json!({"item_id": item_id, "output_index": 0, "delta": piece}),
                        zero,
                    );
                }
                push(
                    "response.function_call_arguments.done",
                    json!({"item_id": item_id, "output_index": 0, "arguments": arguments}),
                    zero,
                );
            }
            Answer::Text { deltas, delay } => {
                let at = json!({"item_id": item_id, "output_index": 0, "content_index": 0});
                let with = |extra: Value| {
                    let mut v = at.clone();
                    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
                        v.extend(extra);
                    }
                    v
                };
                let text = self.answer.full_text();
                push(
                    "response.content_part.added",
                    with(json!({"part": {"type": "output_text", "text": "", "annotations": []}})),
                    zero,
                );
                for d in deltas {
                    push(
                        "response.output_text.delta",
                        with(json!({"delta": d})),
                        *delay,
                    );
                }
                push(
                    "response.output_text.done",
                    with(json!({"text": text})),
                    zero,
                );
                push(
                    "response.content_part.done",
                    with(json!({"part": {"type": "output_text", "text": text, "annotations": []}})),
                    zero,
                );
            }
            Answer::Error { .. } => {}
        }
        push(
            "response.output_item.done",
            json!({"output_index": 0, "item": self.output_item(true)}),
            zero,
        );
        push(
            "response.completed",
            json!({"response": self.response()}),
            zero,
        );
        frames
    }
}

/// The provider's error body for `status`.
pub fn error_body(api: Api, status: u16, message: &str) -> Value {
    match api {
        Api::Anthropic => {
            let kind = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Api::Chat | Api::Responses => {
            let kind = match status {
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                429 => "rate_limit_exceeded",
                400..=499 => "invalid_request_error",
                _ => "server_error",
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
        }
    }
}

/// Headers whose values are secrets: kept in the log by name only.
pub(crate) fn is_secret_header(name: &str) -> bool {
    [
        "authorization",
        "api-key",
        "apikey",
        "token",
        "secret",
        "cookie",
    ]
    .iter()
    .any(|s| name.contains(s))
}

/// Headers as a JSON object, secrets redacted (the auth scheme is kept: tests may check it).
pub fn redacted_headers(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let value = if is_secret_header(name.as_str()) {
            match value.split_once(' ') {
                Some((scheme, _)) => format!("{scheme} [redacted]"),
                None => "[redacted]".to_string(),
            }
        } else {
            value
        };
        match out.get_mut(name.as_str()) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                out.insert(name.as_str().to_string(), value.into());
            }
        }
    }
    Value::Object(out)
}
