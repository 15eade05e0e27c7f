//! Pure mapping from ACP messages to sandwarden's event model. No I/O, no state.

use crate::event::{EventType, Usage};
use agent_client_protocol::v1::schema::{
    ContentBlock, EmbeddedResourceResource, PromptResponse, RequestPermissionRequest,
    SessionUpdate, StopReason, ToolCallContent, ToolCallStatus,
};
use serde_json::{Value, json};

/// Text a content block shows to a person; non-text blocks get a short placeholder.
pub fn block_text(block: &ContentBlock) -> String {
    match block {
        ContentBlock::Text(t) => t.text.clone(),
        ContentBlock::Image(i) => format!("[image {}]", i.mime_type),
        ContentBlock::Audio(a) => format!("[audio {}]", a.mime_type),
        ContentBlock::ResourceLink(link) => link.uri.clone(),
        ContentBlock::Resource(r) => match &r.resource {
            EmbeddedResourceResource::TextResourceContents(t) => t.text.clone(),
            EmbeddedResourceResource::BlobResourceContents(b) => format!("[resource {}]", b.uri),
            _ => "[resource]".to_string(),
        },
        _ => "[content]".to_string(),
    }
}

fn tool_content_text(content: &[ToolCallContent]) -> String {
    let mut out = Vec::new();
    for c in content {
        match c {
            ToolCallContent::Content(c) => out.push(block_text(&c.content)),
            ToolCallContent::Diff(d) => out.push(format!("[diff {}]", d.path.display())),
            ToolCallContent::Terminal(t) => out.push(format!("[terminal {}]", t.terminal_id)),
            _ => {}
        }
    }
    out.join("\n")
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Maps one `session/update` to zero or one event. Updates with no place in the event model
/// (available commands, modes, config options, the user's own message) map to nothing.
pub fn map_update(update: &SessionUpdate) -> Option<(EventType, Value)> {
    match update {
        SessionUpdate::AgentMessageChunk(chunk) => {
            let mut data = json!({ "text": block_text(&chunk.content) });
            if let Some(id) = &chunk.message_id {
                data["message_id"] = to_json(id);
            }
            Some((EventType::Text, data))
        }
        SessionUpdate::AgentThoughtChunk(chunk) => Some((
            EventType::Reasoning,
            json!({ "text": block_text(&chunk.content) }),
        )),
        SessionUpdate::ToolCall(call) => Some((
            EventType::ToolUse,
            json!({
                "id": call.tool_call_id.to_string(),
                "title": call.title,
                "name": call.name.clone().unwrap_or_else(|| call.title.clone()),
                "kind": to_json(&call.kind),
                "status": to_json(&call.status),
                "input": call.raw_input.clone().unwrap_or(Value::Null),
                "locations": to_json(&call.locations),
            }),
        )),
        SessionUpdate::ToolCallUpdate(update) => {
            let f = &update.fields;
            let id = update.tool_call_id.to_string();
            match f.status {
                Some(status @ (ToolCallStatus::Completed | ToolCallStatus::Failed)) => {
                    let mut data = json!({
                        "id": id,
                        "status": to_json(&status),
                        "output": f.content.as_deref().map(tool_content_text).unwrap_or_default(),
                    });
                    if let Some(raw) = &f.raw_output {
                        data["raw_output"] = raw.clone();
                    }
                    if let Some(title) = &f.title {
                        data["title"] = json!(title);
                    }
                    Some((EventType::ToolResult, data))
                }
                _ => {
                    let mut data = json!({ "id": id, "update": true });
                    if let Some(status) = f.status {
                        data["status"] = to_json(&status);
                    }
                    if let Some(title) = &f.title {
                        data["title"] = json!(title);
                    }
                    if let Some(kind) = &f.kind {
                        data["kind"] = to_json(kind);
                    }
                    if let Some(input) = &f.raw_input {
                        data["input"] = input.clone();
                    }
                    if let Some(content) = f.content.as_deref() {
                        data["output"] = json!(tool_content_text(content));
                    }
                    Some((EventType::ToolUse, data))
                }
            }
        }
        SessionUpdate::Plan(plan) => {
            let lines: Vec<String> = plan
                .entries
                .iter()
                .map(|e| {
                    let status = to_json(&e.status);
                    format!("- [{}] {}", status.as_str().unwrap_or("?"), e.content)
                })
                .collect();
            Some((
                EventType::Reasoning,
                json!({ "text": format!("plan:\n{}", lines.join("\n")), "plan": to_json(&plan.entries) }),
            ))
        }
        _ => None,
    }
}

/// The `input_required` event for a permission request the agent sent.
pub fn input_required(request_id: &str, req: &RequestPermissionRequest) -> Value {
    let f = &req.tool_call.fields;
    json!({
        "request_id": request_id,
        "tool": {
            "id": req.tool_call.tool_call_id.to_string(),
            "title": f.title,
            "kind": f.kind.as_ref().map(to_json),
            "input": f.raw_input,
        },
        "options": req.options.iter().map(|o| json!({
            "id": o.option_id.to_string(),
            "name": o.name,
            "kind": to_json(&o.kind),
        })).collect::<Vec<_>>(),
    })
}

/// The snake_case name a protocol enum has on the wire.
pub fn wire_name<T: serde::Serialize>(value: &T) -> String {
    to_json(value).as_str().unwrap_or("unknown").to_string()
}

pub fn stop_reason(reason: StopReason) -> String {
    wire_name(&reason)
}

/// Token usage an agent reported with its prompt response, if any.
pub fn usage(response: &PromptResponse) -> Usage {
    match &response.usage {
        Some(u) => Usage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            total_tokens: u.total_tokens,
        },
        None => Usage::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: Value) -> SessionUpdate {
        serde_json::from_value(json).expect("valid session update")
    }

    #[test]
    fn message_and_thought_chunks_become_text_and_reasoning() {
        let (kind, data) = map_update(&update(json!({
            "sessionUpdate": "agent_message_chunk",
            "content": {"type": "text", "text": "hel"}
        })))
        .expect("mapped");
        assert_eq!(kind, EventType::Text);
        assert_eq!(data["text"], "hel");
        let (kind, data) = map_update(&update(json!({
            "sessionUpdate": "agent_thought_chunk",
            "content": {"type": "text", "text": "hmm"}
        })))
        .expect("mapped");
        assert_eq!(kind, EventType::Reasoning);
        assert_eq!(data["text"], "hmm");
    }

    #[test]
    fn tool_call_then_completed_update_become_use_and_result() {
        let (kind, data) = map_update(&update(json!({
            "sessionUpdate": "tool_call", "toolCallId": "t1", "title": "write a.txt",
            "kind": "edit", "status": "pending", "rawInput": {"path": "a.txt"}
        })))
        .expect("mapped");
        assert_eq!(kind, EventType::ToolUse);
        assert_eq!(data["id"], "t1");
        assert_eq!(data["kind"], "edit");
        assert_eq!(data["input"]["path"], "a.txt");

        let (kind, data) = map_update(&update(json!({
            "sessionUpdate": "tool_call_update", "toolCallId": "t1", "status": "completed",
            "content": [{"type": "content", "content": {"type": "text", "text": "wrote 3 bytes"}}]
        })))
        .expect("mapped");
        assert_eq!(kind, EventType::ToolResult);
        assert_eq!(data["status"], "completed");
        assert_eq!(data["output"], "wrote 3 bytes");
    }

    #[test]
    fn in_progress_update_is_a_tool_use_update() {
        let (kind, data) = map_update(&update(json!({
            "sessionUpdate": "tool_call_update", "toolCallId": "t1", "status": "in_progress"
        })))
        .expect("mapped");
        assert_eq!(kind, EventType::ToolUse);
        assert_eq!(data["update"], true);
        assert_eq!(data["status"], "in_progress");
    }

    #[test]
    fn failed_update_is_a_failed_result() {
        let (kind, data) = map_update(&update(json!({
            "sessionUpdate": "tool_call_update", "toolCallId": "t2", "status": "failed"
        })))
        .expect("mapped");
        assert_eq!(kind, EventType::ToolResult);
        assert_eq!(data["status"], "failed");
    }

    #[test]
    fn bookkeeping_updates_map_to_nothing() {
        assert!(
            map_update(&update(json!({
                "sessionUpdate": "available_commands_update", "availableCommands": []
            })))
            .is_none()
        );
        assert!(
            map_update(&update(json!({
                "sessionUpdate": "user_message_chunk", "content": {"type": "text", "text": "hi"}
            })))
            .is_none()
        );
    }

    #[test]
    fn plan_becomes_reasoning() {
        let (kind, data) = map_update(&update(json!({
            "sessionUpdate": "plan",
            "entries": [{"content": "read the code", "priority": "high", "status": "pending"}]
        })))
        .expect("mapped");
        assert_eq!(kind, EventType::Reasoning);
        assert!(
            data["text"]
                .as_str()
                .unwrap_or("")
                .contains("[pending] read the code")
        );
    }

    #[test]
    fn permission_request_lists_its_options() {
        let req: RequestPermissionRequest = serde_json::from_value(json!({
            "sessionId": "s", "toolCall": {"toolCallId": "t", "title": "rm -rf build", "kind": "execute"},
            "options": [
                {"optionId": "yes", "name": "Allow", "kind": "allow_once"},
                {"optionId": "no", "name": "Deny", "kind": "reject_once"}
            ]
        }))
        .expect("valid request");
        let data = input_required("r1", &req);
        assert_eq!(data["request_id"], "r1");
        assert_eq!(data["tool"]["title"], "rm -rf build");
        assert_eq!(data["options"][0]["kind"], "allow_once");
        assert_eq!(data["options"][1]["id"], "no");
    }

    #[test]
    fn prompt_response_usage_and_stop_reason() {
        let resp: PromptResponse = serde_json::from_value(json!({
            "stopReason": "end_turn",
            "usage": {"inputTokens": 3, "outputTokens": 4, "totalTokens": 7}
        }))
        .expect("valid response");
        assert_eq!(
            usage(&resp),
            Usage {
                input_tokens: 3,
                output_tokens: 4,
                total_tokens: 7
            }
        );
        assert_eq!(stop_reason(resp.stop_reason), "end_turn");
        assert_eq!(stop_reason(StopReason::Cancelled), "cancelled");
    }
}
