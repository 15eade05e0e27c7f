//! The native event log read as OpenAI Agents session events: the turn lifecycle, items with
//! their `item.added`/`item.done` pair, text deltas, and the session status events the SDK's
//! helpers wait on (see `vendor` for how a translation keeps its ids stable).

use crate::api::vendor::{Out, Place, Translate};
use crate::store::{Event, Message};
use serde_json::{Value, json};
use std::collections::HashMap;

/// The server label an agent's tool calls carry (ACP tools have no server of their own).
pub const SERVER_LABEL: &str = "agent";

/// Unix seconds of an RFC 3339 time (0 when it cannot be read).
pub fn unix(ts: &str) -> u64 {
    humantime::parse_rfc3339_weak(ts.trim_end_matches('Z'))
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// The id of the user message item that opens a turn.
pub fn user_item_id(turn_id: &str) -> String {
    format!("msg_{turn_id}")
}

/// The item for a turn's user message.
pub fn user_item(turn_id: &str, m: Option<&Message>) -> Value {
    let content: Vec<Value> = m
        .and_then(|m| m.parts.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|p| match p["type"].as_str() {
            Some("image") => json!({"type": "input_image",
                "image_url": p["url"].as_str().map(String::from).unwrap_or_else(|| format!(
                    "data:{};base64,{}", p["mime_type"].as_str().unwrap_or("image/png"),
                    p["data"].as_str().unwrap_or(""))) }),
            _ => json!({"type": "input_text", "text": p["text"].as_str().unwrap_or("")}),
        })
        .collect();
    json!({"type": "message", "id": user_item_id(turn_id), "role": "user", "status": "completed",
           "content": content, "turn_id": turn_id})
}

struct Run {
    item_id: String,
    output_index: u64,
    text: String,
}

struct Call {
    output_index: u64,
    item: Value,
}

/// The translator: `session` is the session object the status events carry (its `status` and
/// `required_actions` set per event).
pub struct Translator {
    session: Value,
    agent_id: Value,
    turn: Option<String>,
    turn_created: u64,
    outputs: u64,
    text: Option<Run>,
    reasoning: Option<Run>,
    calls: HashMap<String, Call>,
    /// The actions the session waits on since the turn last went on (parallel calls ask
    /// together).
    asked: Vec<Value>,
    out: Vec<Out>,
    place: Place,
}

impl Translator {
    pub fn new(session: Value) -> Self {
        let agent_id = session["agent"]["id"].clone();
        Translator {
            session,
            agent_id,
            turn: None,
            turn_created: 0,
            outputs: 0,
            text: None,
            reasoning: None,
            calls: HashMap::new(),
            asked: Vec::new(),
            out: Vec::new(),
            place: (0, 0),
        }
    }

    fn emit(&mut self, mut event: Value) {
        event["event_id"] = json!(format!("evt_{}_{}", self.place.0, self.place.1));
        self.out.push(Out {
            place: self.place,
            preview: false,
            event,
        });
        self.place.1 += 1;
    }

    /// A fresh id for an item that starts here.
    fn item_id(&mut self, prefix: &str) -> String {
        let id = format!("{prefix}_{}_{}", self.place.0, self.place.1);
        self.place.1 += 1;
        id
    }

    fn session_status(&mut self, kind: &str, status: &str, actions: Value) {
        let mut session = self.session.clone();
        session["status"] = json!(status);
        session["required_actions"] = actions;
        self.emit(json!({"type": kind, "session": session}));
    }

    fn turn_object(&self, status: &str, ts: &str, usage: Value, error: Value) -> Value {
        let done = matches!(status, "completed" | "failed" | "cancelled");
        json!({
            "object": "agent.session.turn", "id": self.turn, "session_id": self.session["id"],
            "agent_id": self.agent_id, "subagent_id": null, "status": status,
            "created_at": self.turn_created, "started_at": self.turn_created,
            "completed_at": if done { json!(unix(ts)) } else { Value::Null },
            "usage": usage, "error": error,
        })
    }

    fn item_event(&mut self, kind: &str, item: Value, output_index: u64) {
        let turn_id = self.turn.clone();
        self.emit(
            json!({"type": kind, "session_id": self.session["id"], "turn_id": turn_id,
                         "item": item, "output_index": output_index}),
        );
    }

    /// Ends the runs of text and reasoning; `final_answer` when the turn ends with it.
    fn close_runs(&mut self, final_answer: bool) {
        if let Some(run) = self.reasoning.take() {
            let item = json!({"type": "reasoning", "id": run.item_id, "status": "completed",
                "summary": [{"type": "summary_text", "text": run.text}], "turn_id": self.turn});
            self.item_event("agent.session.turn.item.done", item, run.output_index);
        }
        if let Some(run) = self.text.take() {
            let part = json!({"type": "output_text", "text": run.text, "annotations": []});
            let common = json!({"session_id": self.session["id"], "turn_id": self.turn,
                "item_id": run.item_id, "output_index": run.output_index, "content_index": 0});
            let mut done = common.clone();
            done["type"] = json!("agent.session.turn.output_text.done");
            done["text"] = json!(run.text);
            self.emit(done);
            let mut part_done = common;
            part_done["type"] = json!("agent.session.turn.content_part.done");
            part_done["part"] = part.clone();
            self.emit(part_done);
            let item = json!({"type": "message", "id": run.item_id, "role": "assistant",
                "status": "completed", "content": [part], "turn_id": self.turn,
                "phase": if final_answer { "final_answer" } else { "commentary" }});
            self.item_event("agent.session.turn.item.done", item, run.output_index);
        }
    }

    /// The item a tool call is shown as: a command for the agent's shell tool, an MCP call for
    /// the rest.
    fn call_item(item_id: &str, data: &Value, turn: &Option<String>) -> Value {
        let input = &data["input"];
        if data["kind"].as_str() == Some("execute") {
            let command = input["command"]
                .as_str()
                .or(data["title"].as_str())
                .unwrap_or("");
            json!({"type": "command_execution", "id": item_id, "command": command, "cwd": null,
                   "status": "in_progress", "output": null, "exit_code": null, "turn_id": turn})
        } else {
            json!({"type": "mcp_call", "id": item_id, "server_label": SERVER_LABEL,
                   "name": data["title"].as_str().or(data["name"].as_str()).unwrap_or("tool"),
                   "arguments": input.to_string(), "status": "in_progress", "output": null,
                   "error": null, "turn_id": turn})
        }
    }

    fn end_turn(&mut self) {
        self.text = None;
        self.reasoning = None;
        self.calls.clear();
        self.asked.clear();
    }
}

impl Translate for Translator {
    fn ended(&self, session_id: &str, status: &str) -> Vec<Value> {
        let mut session = self.session.clone();
        session["id"] = json!(session_id);
        session["status"] = json!("failed");
        session["required_actions"] = json!([]);
        session["error"] = json!({"code": format!("session_{status}"), "message": format!(
            "the session has ended ({status}): its sandbox is gone")});
        vec![json!({"type": "agent.session.failed", "session": session})]
    }

    fn opens_turn(&self, e: &Event) -> bool {
        e.turn_id.is_some() && e.turn_id != self.turn
    }

    fn push(&mut self, e: &Event, user: Option<&Message>) -> Vec<Out> {
        self.place = (e.seq, 0);
        let data = &e.data;
        if let Some(turn_id) = e.turn_id.clone().filter(|_| self.opens_turn(e)) {
            self.end_turn();
            self.turn = Some(turn_id.clone());
            self.turn_created = user.map_or_else(|| unix(&e.ts), |m| unix(&m.created_at));
            self.outputs = 0;
            let turn = self.turn_object("in_progress", &e.ts, Value::Null, Value::Null);
            self.emit(
                json!({"type": "agent.session.turn.created", "session_id": self.session["id"],
                             "turn_id": turn_id, "turn": turn}),
            );
            self.session_status("agent.session.in_progress", "in_progress", json!([]));
            let item = user_item(&turn_id, user);
            self.emit(json!({"type": "agent.session.turn.item.added",
                             "session_id": self.session["id"], "turn_id": turn_id, "item": item}));
        } else if !self.asked.is_empty() && e.kind != "input_required" {
            self.asked.clear();
            self.session_status("agent.session.in_progress", "in_progress", json!([]));
        }
        match e.kind.as_str() {
            "text" => {
                if self.reasoning.is_some() {
                    self.close_runs(false);
                }
                let chunk = data["text"].as_str().unwrap_or("").to_string();
                if self.text.is_none() {
                    let item_id = self.item_id("msg");
                    let output_index = self.outputs;
                    self.outputs += 1;
                    let item = json!({"type": "message", "id": item_id, "role": "assistant",
                        "status": "in_progress", "content": [], "turn_id": self.turn});
                    self.item_event("agent.session.turn.item.added", item, output_index);
                    self.emit(json!({"type": "agent.session.turn.content_part.added",
                        "session_id": self.session["id"], "turn_id": self.turn, "item_id": item_id,
                        "output_index": output_index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": []}}));
                    self.text = Some(Run {
                        item_id,
                        output_index,
                        text: String::new(),
                    });
                }
                if let Some(run) = &mut self.text {
                    run.text.push_str(&chunk);
                    let event = json!({"type": "agent.session.turn.output_text.delta",
                        "session_id": self.session["id"], "turn_id": self.turn,
                        "item_id": run.item_id, "output_index": run.output_index,
                        "content_index": 0, "delta": chunk});
                    self.emit(event);
                }
            }
            "reasoning" => {
                if self.text.is_some() {
                    self.close_runs(false);
                }
                let chunk = data["text"].as_str().unwrap_or("");
                match &mut self.reasoning {
                    Some(run) => run.text.push_str(chunk),
                    None => {
                        let item_id = self.item_id("rs");
                        let output_index = self.outputs;
                        self.outputs += 1;
                        let item = json!({"type": "reasoning", "id": item_id,
                            "status": "in_progress", "summary": [], "turn_id": self.turn});
                        self.item_event("agent.session.turn.item.added", item, output_index);
                        self.reasoning = Some(Run {
                            item_id,
                            output_index,
                            text: chunk.to_string(),
                        });
                    }
                }
            }
            "tool_use" => {
                self.close_runs(false);
                let call_id = data["id"].as_str().unwrap_or("").to_string();
                if let Some(call) = self.calls.get_mut(&call_id) {
                    // An update: what it adds is kept for the item's end.
                    if let Some(command) = data["input"]["command"].as_str()
                        && call.item["type"] == "command_execution"
                    {
                        call.item["command"] = json!(command);
                    }
                } else {
                    let item_id = self.item_id(if data["kind"].as_str() == Some("execute") {
                        "ce"
                    } else {
                        "mcp"
                    });
                    let output_index = self.outputs;
                    self.outputs += 1;
                    let item = Self::call_item(&item_id, data, &self.turn);
                    self.item_event("agent.session.turn.item.added", item.clone(), output_index);
                    self.calls.insert(call_id, Call { output_index, item });
                }
            }
            "input_required" if data["client_tool"].is_object() => {
                // A function the client runs: a `function_call` item, and the session waits
                // on its result (the call id is the native request id).
                self.close_runs(false);
                let call = &data["client_tool"];
                let item_id = self.item_id("fc");
                let output_index = self.outputs;
                self.outputs += 1;
                let arguments = call["input"].to_string();
                let item = json!({"type": "function_call", "id": item_id,
                    "call_id": data["request_id"], "name": call["name"],
                    "arguments": arguments, "status": "completed", "turn_id": self.turn});
                self.item_event("agent.session.turn.item.added", item.clone(), output_index);
                self.item_event("agent.session.turn.item.done", item, output_index);
                let action = json!({"type": "function_call", "call_id": data["request_id"],
                    "name": call["name"], "arguments": arguments, "turn_id": self.turn});
                self.asked.push(action);
                let actions = Value::Array(self.asked.clone());
                self.session_status("agent.session.requires_action", "requires_action", actions);
            }
            "input_required" => {
                self.close_runs(false);
                let tool = &data["tool"];
                let title = tool["title"].as_str().unwrap_or("tool");
                let action = json!({
                    "type": "mcp_approval_request",
                    "request_id": data["request_id"],
                    "turn_id": self.turn,
                    "request": {"type": "mcp_tool_call", "server_label": SERVER_LABEL,
                                "name": title, "arguments": tool["input"].to_string(),
                                "message": title},
                });
                self.asked.push(action);
                let actions = Value::Array(self.asked.clone());
                self.session_status("agent.session.requires_action", "requires_action", actions);
            }
            "tool_result" => {
                self.close_runs(false);
                let call_id = data["id"].as_str().unwrap_or("");
                let failed = data["status"].as_str() == Some("failed");
                let output = data["output"].as_str().unwrap_or("");
                let (item, output_index) = match self.calls.remove(call_id) {
                    Some(call) => (call.item, call.output_index),
                    None => {
                        let item_id = self.item_id("mcp");
                        let index = self.outputs;
                        self.outputs += 1;
                        (Self::call_item(&item_id, data, &self.turn), index)
                    }
                };
                let mut item = item;
                item["status"] = json!(if failed { "failed" } else { "completed" });
                item["output"] = json!(output);
                if item["type"] == "mcp_call" && failed {
                    item["error"] = json!(output);
                }
                self.item_event("agent.session.turn.item.done", item, output_index);
            }
            "done" => {
                self.close_runs(true);
                let usage = &data["usage"];
                let usage = json!({
                    "input_tokens": usage["input_tokens"].as_u64().unwrap_or(0),
                    "output_tokens": usage["output_tokens"].as_u64().unwrap_or(0),
                    "total_tokens": usage["total_tokens"].as_u64().unwrap_or(0),
                });
                let (kind, status) = if data["stop_reason"].as_str() == Some("cancelled") {
                    ("agent.session.turn.cancelled", "cancelled")
                } else {
                    ("agent.session.turn.completed", "completed")
                };
                let turn = self.turn_object(status, &e.ts, usage.clone(), Value::Null);
                let turn_id = self.turn.clone();
                self.emit(json!({"type": kind, "session_id": self.session["id"],
                                 "turn_id": turn_id, "turn": turn, "usage": usage}));
                self.session_status("agent.session.idle", "idle", json!([]));
                self.end_turn();
            }
            "error" => {
                self.close_runs(false);
                let code = data["code"].as_str().unwrap_or("server_error");
                let message = data["message"].as_str().unwrap_or("the turn failed");
                let terminal = matches!(code, "agent_exited" | "harness_lost");
                self.emit(json!({"type": "error", "session_id": self.session["id"],
                    "error": {"type": "server_error", "code": code, "message": message,
                              "param": null}}));
                let error = json!({"code": "server_error", "message": message});
                let turn = self.turn_object("failed", &e.ts, Value::Null, error);
                let turn_id = self.turn.clone();
                self.emit(json!({"type": "agent.session.turn.failed",
                                 "session_id": self.session["id"], "turn_id": turn_id,
                                 "turn": turn}));
                if terminal {
                    self.session_status("agent.session.failed", "failed", json!([]));
                } else {
                    self.session_status("agent.session.idle", "idle", json!([]));
                }
                self.end_turn();
            }
            "session_dead" => {
                self.close_runs(false);
                self.session_status("agent.session.failed", "failed", json!([]));
            }
            _ => {}
        }
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, kind: &str, data: Value) -> Event {
        Event {
            id: seq.to_string(),
            seq,
            session_id: "s".into(),
            turn_id: Some("t1".into()),
            kind: kind.into(),
            ts: "2026-12-04T00:00:10Z".into(),
            data,
        }
    }

    fn run(events: &[Event]) -> Vec<Out> {
        let mut t = Translator::new(json!({"object": "agent.session", "id": "s",
                                           "agent": {"id": "ag_1"}}));
        let user = Message {
            id: "m".into(),
            session_id: "s".into(),
            turn_id: "t1".into(),
            role: "user".into(),
            text: "hi".into(),
            parts: json!([{"type": "text", "text": "hi"}]),
            metadata: json!({}),
            created_at: "2026-12-04T00:00:09Z".into(),
        };
        let mut out = Vec::new();
        for (i, e) in events.iter().enumerate() {
            out.extend(t.push(e, (i == 0).then_some(&user)));
        }
        out
    }

    fn kinds(out: &[Out]) -> Vec<&str> {
        out.iter().map(Out::kind).collect()
    }

    #[test]
    fn a_turn_is_created_streams_its_text_and_completes_then_idles() {
        let out = run(&[
            ev(1, "text", json!({"text": "hel"})),
            ev(2, "text", json!({"text": "lo"})),
            ev(
                3,
                "done",
                json!({"stop_reason": "end_turn",
                "usage": {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}}),
            ),
        ]);
        assert_eq!(
            kinds(&out),
            [
                "agent.session.turn.created",
                "agent.session.in_progress",
                "agent.session.turn.item.added",
                "agent.session.turn.item.added",
                "agent.session.turn.content_part.added",
                "agent.session.turn.output_text.delta",
                "agent.session.turn.output_text.delta",
                "agent.session.turn.output_text.done",
                "agent.session.turn.content_part.done",
                "agent.session.turn.item.done",
                "agent.session.turn.completed",
                "agent.session.idle",
            ]
        );
        assert_eq!(out[2].event["item"]["role"], "user");
        assert_eq!(out[2].event["item"]["content"][0]["text"], "hi");
        let done = &out[9].event["item"];
        assert_eq!(done["content"][0]["text"], "hello");
        assert_eq!(done["phase"], "final_answer");
        assert_eq!(done["id"], out[3].event["item"]["id"]);
        assert_eq!(out[10].event["turn"]["status"], "completed");
        assert_eq!(out[10].event["usage"]["total_tokens"], 3);
        assert_eq!(
            out[0].event["turn"]["created_at"],
            unix("2026-12-04T00:00:09Z")
        );
        let ids: std::collections::HashSet<_> = out
            .iter()
            .map(|o| o.event["event_id"].to_string())
            .collect();
        assert_eq!(ids.len(), out.len());
    }

    #[test]
    fn a_question_requires_action_with_the_native_request_id() {
        let out = run(&[
            ev(
                1,
                "tool_use",
                json!({"id": "c1", "title": "rm -rf build", "kind": "execute",
                "status": "pending", "input": {"command": "rm -rf build"}}),
            ),
            ev(
                2,
                "input_required",
                json!({"request_id": "perm-7",
                "tool": {"id": "c1", "title": "rm -rf build", "input": {"command": "rm -rf build"}}}),
            ),
            ev(
                3,
                "tool_result",
                json!({"id": "c1", "status": "failed", "output": "denied"}),
            ),
            ev(4, "done", json!({"stop_reason": "cancelled"})),
        ]);
        let asked = out
            .iter()
            .find(|o| o.kind() == "agent.session.requires_action")
            .expect("requires_action");
        let action = &asked.event["session"]["required_actions"][0];
        assert_eq!(action["type"], "mcp_approval_request");
        assert_eq!(action["request_id"], "perm-7");
        assert_eq!(asked.event["session"]["status"], "requires_action");
        let item = out
            .iter()
            .find(|o| o.kind() == "agent.session.turn.item.done")
            .expect("item done");
        assert_eq!(item.event["item"]["type"], "command_execution");
        assert_eq!(item.event["item"]["status"], "failed");
        assert!(kinds(&out).contains(&"agent.session.turn.cancelled"));
        assert_eq!(out.last().map(Out::kind), Some("agent.session.idle"));
    }
}
