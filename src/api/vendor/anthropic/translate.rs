//! The native event log read as Anthropic Managed Agents events (see `vendor` for how a
//! translation keeps its ids stable).

use crate::api::vendor::{Out, Place, Translate};
use crate::store::{Event, Message};
use serde_json::{Value, json};
use std::collections::HashMap;

/// An Anthropic event's id.
pub fn id_of(out: &Out) -> &str {
    out.event["id"].as_str().unwrap_or("")
}

/// The id of the `user.message` event that opens a turn (also what sending it answers).
pub fn user_message_id(turn_id: &str) -> String {
    format!("sevt_{turn_id}")
}

/// The id of an event emitted at `place`.
fn place_id((seq, k): Place) -> String {
    format!("sevt_{seq}_{k}")
}

/// The native `seq` an `agent.tool_use` id was emitted at (a confirmation names it).
pub fn seq_of_tool_use(id: &str) -> Option<i64> {
    let rest = id.strip_prefix("sevt_")?;
    let (seq, k) = rest.split_once('_')?;
    k.parse::<u32>().ok()?;
    seq.parse().ok().filter(|seq| *seq >= 1)
}

struct TextRun {
    id: String,
    text: String,
}

struct Call {
    name: String,
    input: Value,
    /// The id of its `agent.tool_use`, once emitted.
    emitted: Option<String>,
}

/// The translator's state: what the current turn holds back.
#[derive(Default)]
pub struct Translator {
    deltas: bool,
    turn: Option<String>,
    text: Option<TextRun>,
    thinking: bool,
    calls: HashMap<String, Call>,
    /// The turn waits on a confirmation (its last status event was `requires_action`).
    /// The events the session waits on since the turn last went on (parallel calls ask together).
    asked: Vec<Value>,
    out: Vec<Out>,
    place: Place,
}

impl Translator {
    /// `deltas`: emit `event_start`/`event_delta` previews of `agent.message` (the stream's
    /// `event_deltas[]=agent.message`).
    pub fn new(deltas: bool) -> Self {
        Translator {
            deltas,
            ..Translator::default()
        }
    }

    fn emit(&mut self, event: Value) -> String {
        let id = place_id(self.place);
        self.emit_with(id.clone(), event, false);
        id
    }

    fn emit_with(&mut self, id: String, mut event: Value, preview: bool) {
        if !preview {
            event["id"] = json!(id);
            if event.get("processed_at").is_none() {
                event["processed_at"] = Value::Null;
            }
        }
        self.out.push(Out {
            place: self.place,
            preview,
            event,
        });
        self.place.1 += 1;
    }

    /// Ends the current run of text (as one `agent.message`) and of thinking.
    fn close_runs(&mut self, ts: &Value) {
        self.thinking = false;
        if let Some(run) = self.text.take() {
            let event = json!({
                "type": "agent.message",
                "content": [{"type": "text", "text": run.text}],
                "processed_at": ts,
            });
            self.emit_with(run.id, event, false);
        }
    }

    fn tool_use(&mut self, call_id: &str, permission: &str, ts: &Value) -> String {
        if let Some(id) = self.calls.get(call_id).and_then(|c| c.emitted.clone()) {
            return id;
        }
        let (name, input) = self
            .calls
            .get(call_id)
            .map(|c| (c.name.clone(), c.input.clone()))
            .unwrap_or_else(|| ("tool".to_string(), json!({})));
        let evaluation = if permission == "ask" {
            "always_ask"
        } else {
            "always_allow"
        };
        let id = self.emit(json!({
            "type": "agent.tool_use",
            "name": name,
            "input": if input.is_object() { input } else { json!({"value": input}) },
            "evaluated_permission": permission,
            "evaluation": {"type": evaluation},
            "processed_at": ts,
        }));
        let call = self.calls.entry(call_id.to_string()).or_insert(Call {
            name: String::new(),
            input: Value::Null,
            emitted: None,
        });
        call.emitted = Some(id.clone());
        id
    }

    fn turn_over(&mut self) {
        self.text = None;
        self.thinking = false;
        self.calls.clear();
        self.asked.clear();
    }
}

impl Translate for Translator {
    fn opens_turn(&self, e: &Event) -> bool {
        e.turn_id.is_some() && e.turn_id != self.turn
    }

    fn ended(&self, session_id: &str, _status: &str) -> Vec<Value> {
        vec![
            json!({"type": "session.status_terminated", "id": format!("sevt_end_{session_id}"),
                    "processed_at": crate::store::now()}),
        ]
    }

    fn push(&mut self, e: &Event, user: Option<&Message>) -> Vec<Out> {
        self.place = (e.seq, 0);
        let ts = json!(e.ts);
        if e.turn_id.is_some() && e.turn_id != self.turn {
            // A new turn: what the last one held back is gone with it (it ended).
            self.text = None;
            self.thinking = false;
            self.calls.clear();
            self.asked.clear();
            self.turn = e.turn_id.clone();
            if let Some(turn_id) = &e.turn_id {
                let content = user.map(user_content).unwrap_or_default();
                self.emit_with(
                    user_message_id(turn_id),
                    json!({"type": "user.message", "content": content,
                           "processed_at": user.map(|m| m.created_at.clone())}),
                    false,
                );
                self.emit(json!({"type": "session.status_running", "processed_at": ts}));
            }
        } else if !self.asked.is_empty() && e.kind != "input_required" {
            // The confirmation was answered: the turn goes on.
            self.asked.clear();
            self.emit(json!({"type": "session.status_running", "processed_at": ts}));
        }
        let data = &e.data;
        match e.kind.as_str() {
            "text" => {
                self.thinking = false;
                let chunk = data["text"].as_str().unwrap_or("");
                match &mut self.text {
                    Some(run) => run.text.push_str(chunk),
                    None => {
                        let id = place_id(self.place);
                        self.place.1 += 1;
                        if self.deltas {
                            self.emit_with(
                                String::new(),
                                json!({"type": "event_start",
                                       "event": {"type": "agent.message", "id": id}}),
                                true,
                            );
                        }
                        self.text = Some(TextRun {
                            id,
                            text: chunk.to_string(),
                        });
                    }
                }
                if self.deltas
                    && let Some(run) = &self.text
                {
                    let event_id = run.id.clone();
                    self.emit_with(
                        String::new(),
                        json!({"type": "event_delta", "event_id": event_id,
                               "delta": {"type": "content_delta", "index": 0,
                                         "content": {"type": "text", "text": chunk}}}),
                        true,
                    );
                }
            }
            "reasoning" => {
                if self.text.is_some() {
                    self.close_runs(&ts);
                }
                if !self.thinking {
                    self.thinking = true;
                    self.emit(json!({"type": "agent.thinking", "processed_at": ts}));
                }
            }
            "tool_use" => {
                self.close_runs(&ts);
                let call_id = data["id"].as_str().unwrap_or("").to_string();
                let call = self.calls.entry(call_id.clone()).or_insert(Call {
                    name: String::new(),
                    input: Value::Null,
                    emitted: None,
                });
                if let Some(kind) = data["kind"].as_str() {
                    call.name = tool_name(kind, data["title"].as_str().unwrap_or(kind));
                } else if call.name.is_empty()
                    && let Some(title) = data["title"].as_str()
                {
                    call.name = title.to_string();
                }
                if !data["input"].is_null() {
                    call.input = data["input"].clone();
                }
                // Running or done without a question: the agent was allowed to.
                if matches!(data["status"].as_str(), Some("in_progress" | "completed")) {
                    self.tool_use(&call_id, "allow", &ts);
                }
            }
            "input_required" if data["client_tool"].is_object() => {
                // A custom tool the client runs: the session waits on its result.
                self.close_runs(&ts);
                let call = &data["client_tool"];
                let id = self.emit(json!({
                    "type": "agent.custom_tool_use",
                    "name": call["name"],
                    "input": if call["input"].is_object() { call["input"].clone() } else { json!({}) },
                    "processed_at": ts,
                }));
                self.asked.push(json!(id));
                let ids = self.asked.clone();
                self.emit(json!({
                    "type": "session.status_idle",
                    "stop_reason": {"type": "requires_action", "event_ids": ids},
                    "processed_at": ts,
                }));
            }
            "input_required" => {
                self.close_runs(&ts);
                let tool = &data["tool"];
                let call_id = tool["id"].as_str().unwrap_or("").to_string();
                let call = self.calls.entry(call_id.clone()).or_insert(Call {
                    name: String::new(),
                    input: Value::Null,
                    emitted: None,
                });
                if call.name.is_empty() {
                    call.name = tool_name(
                        tool["kind"].as_str().unwrap_or(""),
                        tool["title"].as_str().unwrap_or("tool"),
                    );
                }
                if call.input.is_null() && !tool["input"].is_null() {
                    call.input = tool["input"].clone();
                }
                // Asked about again (the same call), it is a new question: a new event.
                if let Some(c) = self.calls.get_mut(&call_id) {
                    c.emitted = None;
                }
                let id = self.tool_use(&call_id, "ask", &ts);
                self.asked.push(json!(id));
                let ids = self.asked.clone();
                self.emit(json!({
                    "type": "session.status_idle",
                    "stop_reason": {"type": "requires_action", "event_ids": ids},
                    "processed_at": ts,
                }));
            }
            "tool_result" => {
                self.close_runs(&ts);
                let call_id = data["id"].as_str().unwrap_or("").to_string();
                let tool_use_id = self.tool_use(&call_id, "allow", &ts);
                self.emit(json!({
                    "type": "agent.tool_result",
                    "tool_use_id": tool_use_id,
                    "content": [{"type": "text", "text": data["output"].as_str().unwrap_or("")}],
                    "is_error": data["status"].as_str() == Some("failed"),
                    "processed_at": ts,
                }));
            }
            "done" => {
                self.close_runs(&ts);
                let stop = match data["stop_reason"].as_str() {
                    Some("refusal") => "refusal",
                    _ => "end_turn",
                };
                let usage = &data["usage"];
                self.emit(json!({
                    "type": "session.usage",
                    "usage": {
                        "input_tokens": usage["input_tokens"].as_u64().unwrap_or(0),
                        "output_tokens": usage["output_tokens"].as_u64().unwrap_or(0),
                    },
                    "processed_at": ts,
                }));
                self.emit(json!({
                    "type": "session.status_idle",
                    "stop_reason": {"type": stop},
                    "processed_at": ts,
                }));
                self.turn_over();
            }
            "error" => {
                self.close_runs(&ts);
                let code = data["code"].as_str().unwrap_or("");
                let terminal = matches!(code, "agent_exited" | "harness_lost");
                let kind = match code {
                    "timeout" | "agent_error" => "model_request_failed_error",
                    _ => "unknown_error",
                };
                self.emit(json!({
                    "type": "session.error",
                    "error": {
                        "type": kind,
                        "message": data["message"].as_str().unwrap_or("the turn failed"),
                        "retry_status": {"type": if terminal { "terminal" } else { "exhausted" }},
                    },
                    "processed_at": ts,
                }));
                if !terminal {
                    self.emit(json!({
                        "type": "session.status_idle",
                        "stop_reason": {"type": "retries_exhausted"},
                        "processed_at": ts,
                    }));
                }
                self.turn_over();
            }
            "session_dead" => {
                self.close_runs(&ts);
                self.emit(json!({"type": "session.status_terminated", "processed_at": ts}));
            }
            // step_start / step_finish carry nothing this API shows.
            _ => {}
        }
        std::mem::take(&mut self.out)
    }
}

/// Anthropic's tool name for an ACP tool kind (its built-in tool set's names where one fits).
fn tool_name(kind: &str, title: &str) -> String {
    match kind {
        "execute" => "bash",
        "read" => "read",
        "edit" => "edit",
        "delete" | "move" => "write",
        "search" => "grep",
        "fetch" => "web_fetch",
        _ => title,
    }
    .to_string()
}

/// A stored user message's parts as Anthropic content blocks.
fn user_content(m: &Message) -> Vec<Value> {
    let parts = m.parts.as_array().cloned().unwrap_or_default();
    if parts.is_empty() {
        return vec![json!({"type": "text", "text": m.text})];
    }
    parts
        .iter()
        .map(|p| match p["type"].as_str() {
            Some("image") => {
                let source = match (p["data"].as_str(), p["url"].as_str()) {
                    (Some(data), _) => json!({"type": "base64", "data": data,
                        "media_type": p["mime_type"].as_str().unwrap_or("image/png")}),
                    (None, Some(url)) => json!({"type": "url", "url": url}),
                    _ => json!({"type": "url", "url": ""}),
                };
                json!({"type": "image", "source": source})
            }
            Some("file") => {
                let source = match (p["text"].as_str(), p["data"].as_str(), p["url"].as_str()) {
                    (Some(text), _, _) => json!({"type": "text", "data": text,
                        "media_type": "text/plain"}),
                    (None, Some(data), _) => json!({"type": "base64", "data": data,
                        "media_type": p["mime_type"].as_str().unwrap_or("application/pdf")}),
                    (None, None, url) => json!({"type": "url", "url": url.unwrap_or("")}),
                };
                json!({"type": "document", "source": source, "title": p["name"]})
            }
            _ => json!({"type": "text", "text": p["text"].as_str().unwrap_or("")}),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, turn: &str, kind: &str, data: Value) -> Event {
        Event {
            id: seq.to_string(),
            seq,
            session_id: "s".into(),
            turn_id: Some(turn.into()),
            kind: kind.into(),
            ts: format!("2026-12-04T00:00:{seq:02}Z"),
            data,
        }
    }

    fn user(turn: &str, text: &str) -> Message {
        Message {
            id: "m".into(),
            session_id: "s".into(),
            turn_id: turn.into(),
            role: "user".into(),
            text: text.into(),
            parts: json!([{"type": "text", "text": text}]),
            metadata: json!({}),
            created_at: "2026-12-04T00:00:00Z".into(),
        }
    }

    fn run(events: &[Event], deltas: bool) -> Vec<Out> {
        let mut t = Translator::new(deltas);
        let u = user("t1", "hello there");
        let mut out = Vec::new();
        for (i, e) in events.iter().enumerate() {
            out.extend(t.push(e, (i == 0).then_some(&u)));
        }
        out
    }

    fn kinds(out: &[Out]) -> Vec<&str> {
        out.iter().map(Out::kind).collect()
    }

    #[test]
    fn text_chunks_become_one_message_and_the_turn_ends_idle() {
        let events = [
            ev(1, "t1", "step_start", json!({})),
            ev(2, "t1", "text", json!({"text": "hel"})),
            ev(3, "t1", "text", json!({"text": "lo"})),
            ev(
                4,
                "t1",
                "done",
                json!({"stop_reason": "end_turn",
                "usage": {"input_tokens": 2, "output_tokens": 1}}),
            ),
        ];
        let out = run(&events, false);
        assert_eq!(
            kinds(&out),
            [
                "user.message",
                "session.status_running",
                "agent.message",
                "session.usage",
                "session.status_idle"
            ]
        );
        assert_eq!(out[0].event["content"][0]["text"], "hello there");
        assert_eq!(id_of(&out[0]), "sevt_t1");
        assert_eq!(out[2].event["content"][0]["text"], "hello");
        // The message's id is where its run began; it is emitted where the run ended.
        assert_eq!(id_of(&out[2]), "sevt_2_0");
        assert_eq!(out[2].place, (4, 0));
        assert_eq!(out[4].event["stop_reason"]["type"], "end_turn");
        let ids: std::collections::HashSet<_> = out.iter().map(id_of).collect();
        assert_eq!(ids.len(), out.len(), "every id is distinct");
    }

    #[test]
    fn previews_carry_the_final_message_id_and_stay_out_of_the_history() {
        let events = [
            ev(1, "t1", "text", json!({"text": "a "})),
            ev(2, "t1", "text", json!({"text": "b"})),
            ev(3, "t1", "done", json!({"stop_reason": "end_turn"})),
        ];
        let out = run(&events, true);
        let start = out
            .iter()
            .find(|o| o.kind() == "event_start")
            .expect("start");
        let message = out
            .iter()
            .find(|o| o.kind() == "agent.message")
            .expect("msg");
        assert_eq!(start.event["event"]["id"], message.event["id"]);
        let deltas: Vec<_> = out.iter().filter(|o| o.kind() == "event_delta").collect();
        assert_eq!(deltas.len(), 2);
        assert!(
            deltas
                .iter()
                .all(|d| d.preview && d.event["event_id"] == message.event["id"])
        );
        // Without previews the history events are the same, with the same ids and places.
        let plain = run(&events, false);
        let history: Vec<_> = out.iter().filter(|o| !o.preview).cloned().collect();
        assert_eq!(history, plain);
    }

    #[test]
    fn a_question_holds_the_tool_use_then_idles_requiring_action() {
        let events = [
            ev(
                1,
                "t1",
                "tool_use",
                json!({"id": "c1", "title": "rm -rf build",
                "kind": "execute", "status": "pending", "input": {"command": "rm -rf build"}}),
            ),
            ev(
                2,
                "t1",
                "input_required",
                json!({"request_id": "perm-1",
                "tool": {"id": "c1", "title": "rm -rf build", "kind": "execute"}}),
            ),
            ev(
                3,
                "t1",
                "tool_use",
                json!({"id": "c1", "update": true, "status": "in_progress"}),
            ),
            ev(
                4,
                "t1",
                "tool_result",
                json!({"id": "c1", "status": "completed", "output": "ok"}),
            ),
            ev(5, "t1", "done", json!({"stop_reason": "end_turn"})),
        ];
        let out = run(&events, false);
        assert_eq!(
            kinds(&out),
            [
                "user.message",
                "session.status_running",
                "agent.tool_use",
                "session.status_idle",
                "session.status_running",
                "agent.tool_result",
                "session.usage",
                "session.status_idle"
            ]
        );
        let tool_use = &out[2];
        assert_eq!(tool_use.event["name"], "bash");
        assert_eq!(tool_use.event["evaluated_permission"], "ask");
        assert_eq!(tool_use.event["input"]["command"], "rm -rf build");
        assert_eq!(
            out[3].event["stop_reason"]["event_ids"][0],
            tool_use.event["id"]
        );
        assert_eq!(seq_of_tool_use(id_of(tool_use)), Some(2));
        assert_eq!(out[5].event["tool_use_id"], tool_use.event["id"]);
    }

    #[test]
    fn a_client_tool_call_is_a_custom_tool_use_the_session_waits_on() {
        let events = [
            ev(
                1,
                "t1",
                "input_required",
                json!({"request_id": "tool-1", "options": [],
                "tool": {"id": "tool-1", "title": "lookup", "kind": "client_tool"},
                "client_tool": {"name": "lookup", "input": {"q": "osprey"}}}),
            ),
            ev(2, "t1", "text", json!({"text": "found"})),
            ev(3, "t1", "done", json!({"stop_reason": "end_turn"})),
        ];
        let out = run(&events, false);
        let call = out
            .iter()
            .find(|o| o.kind() == "agent.custom_tool_use")
            .expect("custom tool use");
        assert_eq!(call.event["name"], "lookup");
        assert_eq!(call.event["input"]["q"], "osprey");
        assert_eq!(seq_of_tool_use(id_of(call)), Some(1));
        let idle = &out[3];
        assert_eq!(idle.event["stop_reason"]["event_ids"][0], call.event["id"]);
        assert!(!out.iter().any(|o| o.kind() == "agent.tool_use"));
    }

    #[test]
    fn calls_asked_together_are_all_waited_on() {
        let call = |seq, id: &str| {
            ev(
                seq,
                "t1",
                "input_required",
                json!({"request_id": id, "options": [],
                "tool": {"id": id, "title": "lookup", "kind": "client_tool"},
                "client_tool": {"name": "lookup", "input": {}}}),
            )
        };
        let out = run(&[call(1, "tool-a"), call(2, "tool-b")], false);
        let calls: Vec<_> = out
            .iter()
            .filter(|o| o.kind() == "agent.custom_tool_use")
            .map(|o| o.event["id"].clone())
            .collect();
        let last_idle = out.last().expect("idle");
        assert_eq!(last_idle.event["stop_reason"]["event_ids"], json!(calls));
    }

    #[test]
    fn a_tool_run_without_a_question_is_allowed() {
        let events = [
            ev(
                1,
                "t1",
                "tool_use",
                json!({"id": "c1", "title": "read echo.txt",
                "kind": "read", "status": "in_progress", "input": {"path": "echo.txt"}}),
            ),
            ev(
                2,
                "t1",
                "tool_result",
                json!({"id": "c1", "status": "failed", "output": "no"}),
            ),
            ev(
                3,
                "t1",
                "error",
                json!({"code": "agent_exited", "message": "gone"}),
            ),
        ];
        let out = run(&events, false);
        assert_eq!(out[2].event["evaluated_permission"], "allow");
        assert_eq!(out[2].event["name"], "read");
        assert_eq!(out[3].event["is_error"], true);
        assert_eq!(out[4].event["error"]["retry_status"]["type"], "terminal");
        assert_eq!(out.len(), 5, "a dead agent's turn does not idle");
    }

    #[test]
    fn replaying_a_turn_gives_the_same_events() {
        let events = [
            ev(7, "t1", "reasoning", json!({"text": "hm"})),
            ev(8, "t1", "text", json!({"text": "x"})),
            ev(9, "t1", "done", json!({"stop_reason": "refusal"})),
        ];
        assert_eq!(run(&events, false), run(&events, false));
        let out = run(&events, false);
        assert_eq!(out[2].kind(), "agent.thinking");
        assert_eq!(
            out.last().map(|o| o.event["stop_reason"]["type"].clone()),
            Some(json!("refusal"))
        );
    }
}
