//! `sandwarden-fake-model` end to end: the real binary on 127.0.0.1:0, driven with reqwest the
//! way the agent CLIs drive it (see docs/fake-model.md).

use crate::common::fake_model::FakeModel;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// One parsed server-sent event: its `event:` name (if any) and its data.
#[derive(Debug)]
struct Sse {
    event: Option<String>,
    data: String,
}

impl Sse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

fn parse_sse(text: &str) -> Vec<Sse> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            Sse {
                event,
                data: data.join("\n"),
            }
        })
        .collect()
}

async fn post(url: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .timeout(Duration::from_secs(30))
        .header("x-api-key", "sk-ant-secret-key")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .expect("request sent")
}

/// POSTs and returns the parsed event stream, checking it is one.
async fn stream(url: &str, body: Value) -> Vec<Sse> {
    let resp = post(url, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap_or_default(),
        "text/event-stream"
    );
    parse_sse(&resp.text().await.expect("stream body"))
}

fn names(events: &[Sse]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.event.as_deref().unwrap_or(""))
        .collect()
}

/// Claude Code's request shape: system blocks, a reminder before the prompt, a mid-conversation
/// system message, tools.
fn claude_request(prompt: &str) -> Value {
    json!({
        "model": "claude-opus-4-8",
        "max_tokens": 64000,
        "stream": true,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>\nSome context.\n</system-reminder>"},
                {"type": "text", "text": prompt},
            ]},
            {"role": "system", "content": "Available agent types: none."},
        ],
        "tools": [
            {"name": "Bash", "input_schema": {"type": "object",
                "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
                "required": ["command"]}},
            {"name": "Write", "input_schema": {"type": "object",
                "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["file_path", "content"]}},
        ],
    })
}

#[tokio::test]
async fn root_answers_head_and_get() {
    let fake = FakeModel::start(&[]);
    let http = reqwest::Client::new();
    let head = http.head(fake.url("/")).send().await.expect("HEAD /");
    assert_eq!(head.status(), 200);
    let get = http.get(fake.url("/")).send().await.expect("GET /");
    assert_eq!(get.status(), 200);
    let log = fake.requests().await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[0]["method"], "HEAD");
    assert_eq!(log[0]["path"], "/");
}

#[tokio::test]
async fn anthropic_stream_has_the_real_event_sequence_and_echoes_the_prompt() {
    let fake = FakeModel::start(&[]);
    let events = stream(
        &fake.url("/v1/messages?beta=true"),
        claude_request("hello fake"),
    )
    .await;
    let n = events.len();
    let mut expected = vec!["message_start", "ping", "content_block_start"];
    expected.extend(std::iter::repeat_n("content_block_delta", n - 6));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names(&events), expected);
    assert!(n - 6 >= 2, "the text arrives in several deltas");

    let start = events[0].json();
    assert_eq!(start["message"]["model"], "claude-opus-4-8");
    assert_eq!(start["message"]["role"], "assistant");
    assert!(start["message"]["usage"]["input_tokens"].as_u64() > Some(0));
    assert_eq!(
        events[2].json()["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events[3..n - 3]
        .iter()
        .map(|e| {
            let d = e.json();
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().expect("delta text").to_string()
        })
        .collect();
    assert_eq!(text, "Hello from the fake model! You said: hello fake");
    let delta = events[n - 2].json();
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert!(delta["usage"]["output_tokens"].as_u64() > Some(1));
    for e in &events {
        assert_eq!(e.json()["type"].as_str(), e.event.as_deref());
    }
}

#[tokio::test]
async fn anthropic_tool_use_round_trip_ends_with_tool_done() {
    let fake = FakeModel::start(&[]);
    let url = fake.url("/v1/messages?beta=true");
    let first = claude_request("WRITEFILE /work/dir/out.txt two words");
    let events = stream(&url, first.clone()).await;
    let block = events[2].json();
    assert_eq!(block["content_block"]["type"], "tool_use");
    assert_eq!(block["content_block"]["name"], "Write");
    let tool_id = block["content_block"]["id"]
        .as_str()
        .expect("tool_use id")
        .to_string();
    let partial: String = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .map(|e| {
            let d = e.json();
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"]
                .as_str()
                .expect("partial")
                .to_string()
        })
        .collect();
    let input: Value = serde_json::from_str(&partial).expect("input JSON");
    assert_eq!(
        input,
        json!({"file_path": "/work/dir/out.txt", "content": "two words"})
    );
    assert_eq!(
        events[events.len() - 2].json()["delta"]["stop_reason"],
        "tool_use"
    );

    // The client ran the tool and sends its result back (not streaming this time).
    let mut second = first;
    second["stream"] = json!(false);
    let messages = second["messages"].as_array_mut().expect("messages");
    messages.push(json!({"role": "assistant", "content": [
        {"type": "tool_use", "id": tool_id, "name": "Write", "input": input}]}));
    messages.push(json!({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": tool_id, "content": "File created"}]}));
    let resp = post(&url, second).await;
    assert_eq!(resp.status(), 200);
    let message: Value = resp.json().await.expect("message JSON");
    assert_eq!(message["type"], "message");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Tool done."}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert!(message["usage"]["output_tokens"].as_u64() > Some(0));
}

#[tokio::test]
async fn anthropic_bash_and_count_tokens_and_models() {
    let fake = FakeModel::start(&[]);
    let mut body = claude_request("BASH ls -la");
    body["stream"] = json!(false);
    let message: Value = post(&fake.url("/v1/messages"), body.clone())
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(message["content"][0]["name"], "Bash");
    assert_eq!(message["content"][0]["input"], json!({"command": "ls -la"}));

    let resp = post(&fake.url("/v1/messages/count_tokens"), body).await;
    assert_eq!(resp.status(), 200);
    let count: Value = resp.json().await.expect("JSON");
    assert_eq!(
        count["input_tokens"], message["usage"]["input_tokens"],
        "count_tokens agrees with the usage of the same request"
    );

    let models: Value = reqwest::get(fake.url("/v1/models"))
        .await
        .expect("models")
        .json()
        .await
        .expect("JSON");
    assert_eq!(models["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(models["data"][0]["id"], "fake-model");
}

fn opencode_request(prompt: &str) -> Value {
    json!({
        "model": "fake-model",
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 4096,
        "messages": [
            {"role": "system", "content": "You are opencode."},
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
        ],
        "tools": [
            {"type": "function", "function": {"name": "write", "parameters": {"type": "object",
                "properties": {"content": {"type": "string"}, "filePath": {"type": "string"}},
                "required": ["content", "filePath"]}}},
            {"type": "function", "function": {"name": "bash", "parameters": {"type": "object",
                "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
                "required": ["command", "description"]}}},
        ],
    })
}

#[tokio::test]
async fn chat_stream_ends_with_a_usage_chunk_then_done() {
    let fake = FakeModel::start(&[]);
    let events = stream(&fake.url("/chat/completions"), opencode_request("hi chat")).await;
    assert!(events.iter().all(|e| e.event.is_none()));
    let n = events.len();
    assert_eq!(events[n - 1].data, "[DONE]");
    let usage = events[n - 2].json();
    assert_eq!(usage["choices"], json!([]));
    let tokens = &usage["usage"];
    assert_eq!(
        tokens["total_tokens"].as_u64(),
        Some(
            tokens["prompt_tokens"].as_u64().unwrap_or(0)
                + tokens["completion_tokens"].as_u64().unwrap_or(0)
        )
    );
    assert!(tokens["completion_tokens"].as_u64() > Some(0));
    let finish = events[n - 3].json();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let first = events[0].json();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let text: String = events[1..n - 3]
        .iter()
        .map(|e| {
            e.json()["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content delta")
                .to_string()
        })
        .collect();
    assert_eq!(text, "Hello from the fake model! You said: hi chat");
    assert!(n - 4 >= 2, "several content deltas");
}

#[tokio::test]
async fn chat_tool_calls_stream_as_deltas_and_answer_after_the_result() {
    let fake = FakeModel::start(&[]);
    let url = fake.url("/v1/chat/completions");
    let mut body = opencode_request("WRITEFILE /w/a.txt hello");
    body["stream_options"] = json!({"include_usage": false});
    let events = stream(&url, body.clone()).await;
    let n = events.len();
    assert_eq!(events[n - 1].data, "[DONE]");
    assert_eq!(
        events[n - 2].json()["choices"][0]["finish_reason"],
        "tool_calls"
    );
    let head = &events[1].json()["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(head["function"]["name"], "write");
    assert_eq!(head["type"], "function");
    let call_id = head["id"].as_str().expect("call id").to_string();
    let arguments: String = events[2..n - 2]
        .iter()
        .map(|e| {
            e.json()["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .expect("argument piece")
                .to_string()
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).expect("arguments JSON"),
        json!({"filePath": "/w/a.txt", "content": "hello"})
    );

    body["stream"] = json!(false);
    let messages = body["messages"].as_array_mut().expect("messages");
    messages.push(
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": call_id,
        "type": "function", "function": {"name": "write", "arguments": arguments}}]}),
    );
    messages.push(
        json!({"role": "tool", "tool_call_id": call_id, "content": "Wrote file successfully."}),
    );
    let done: Value = post(&url, body).await.json().await.expect("JSON");
    assert_eq!(done["object"], "chat.completion");
    assert_eq!(done["choices"][0]["message"]["content"], "Tool done.");
    assert_eq!(done["choices"][0]["finish_reason"], "stop");
    assert!(done["usage"]["prompt_tokens"].as_u64() > Some(0));
}

#[tokio::test]
async fn title_requests_get_a_title_and_leave_directives_alone() {
    let fake = FakeModel::start(&[]);
    let body = json!({
        "model": "fake-model", "stream": false,
        "messages": [
            {"role": "system", "content": "You are a title generator."},
            {"role": "user", "content": "Generate a title for this conversation:\n"},
            {"role": "user", "content": "ERROR 500"},
        ],
    });
    let resp = post(&fake.url("/v1/chat/completions"), body).await;
    assert_eq!(resp.status(), 200);
    let title: Value = resp.json().await.expect("JSON");
    assert_eq!(
        title["choices"][0]["message"]["content"],
        "Fake session title"
    );
}

fn codex_request(prompt: &str) -> Value {
    json!({
        "model": "fake-model",
        "stream": true,
        "store": false,
        "tool_choice": "auto",
        "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are Codex."}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context>\n  <cwd>/w</cwd>\n</environment_context>"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]},
        ],
        "tools": [{"type": "function", "name": "exec_command", "parameters": {"type": "object",
            "properties": {"cmd": {"type": "string"}, "workdir": {"type": "string"}},
            "required": ["cmd"]}}],
    })
}

#[tokio::test]
async fn responses_stream_ends_in_response_completed() {
    let fake = FakeModel::start(&[]);
    let events = stream(&fake.url("/v1/responses"), codex_request("hi codex")).await;
    let n = events.len();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", n - 8));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names(&events), expected);
    assert!(n - 8 >= 2, "several text deltas");
    for (i, e) in events.iter().enumerate() {
        let d = e.json();
        assert_eq!(d["type"].as_str(), e.event.as_deref());
        assert_eq!(d["sequence_number"], i);
    }
    let text: String = events[4..n - 4]
        .iter()
        .map(|e| e.json()["delta"].as_str().expect("delta").to_string())
        .collect();
    assert_eq!(text, "Hello from the fake model! You said: hi codex");
    let done = events[n - 1].json();
    let response = &done["response"];
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][0]["type"], "message");
    assert_eq!(response["output"][0]["content"][0]["text"], text);
    let usage = &response["usage"];
    assert!(usage["input_tokens"].as_u64() > Some(0));
    assert!(usage["output_tokens"].as_u64() > Some(0));
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn responses_function_call_round_trip() {
    let fake = FakeModel::start(&[]);
    let url = fake.url("/responses");
    let mut body = codex_request("WRITEFILE /w/out.txt from codex");
    let events = stream(&url, body.clone()).await;
    assert_eq!(
        names(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let item = &events[7].json()["item"];
    assert_eq!(item["type"], "function_call");
    assert_eq!(item["name"], "exec_command");
    let arguments: Value =
        serde_json::from_str(item["arguments"].as_str().expect("arguments")).expect("JSON");
    assert_eq!(
        arguments,
        json!({"cmd": "printf '%s' 'from codex' > /w/out.txt"})
    );
    let call_id = item["call_id"].as_str().expect("call_id").to_string();

    let input = body["input"].as_array_mut().expect("input");
    input.push(item.clone());
    input.push(json!({"type": "function_call_output", "call_id": call_id, "output": ""}));
    let events = stream(&url, body).await;
    let done = events.last().expect("events").json();
    assert_eq!(done["type"], "response.completed");
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        "Tool done."
    );
}

#[tokio::test]
async fn error_directive_answers_each_providers_error() {
    let fake = FakeModel::start(&[]);
    let resp = post(
        &fake.url("/v1/messages?beta=true"),
        claude_request("ERROR 529"),
    )
    .await;
    assert_eq!(resp.status(), 529);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error");

    let resp = post(
        &fake.url("/v1/chat/completions"),
        opencode_request("ERROR 429"),
    )
    .await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");

    let resp = post(&fake.url("/v1/responses"), codex_request("ERROR 400")).await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let resp = reqwest::Client::new()
        .post(fake.url("/v1/messages"))
        .body("not json")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.expect("JSON");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn slow_directive_spaces_the_deltas() {
    let fake = FakeModel::start(&[]);
    let started = Instant::now();
    let resp = post(&fake.url("/v1/messages"), claude_request("SLOW 150 4")).await;
    assert_eq!(resp.status(), 200);
    let headers_after = started.elapsed();
    let events = parse_sse(&resp.text().await.expect("body"));
    let total = started.elapsed();
    assert!(
        headers_after < Duration::from_millis(500),
        "the stream starts at once"
    );
    assert!(
        total >= Duration::from_millis(600),
        "4 deltas 150 ms apart took {total:?}"
    );
    let text: String = events
        .iter()
        .filter(|e| e.event.as_deref() == Some("content_block_delta"))
        .map(|e| {
            e.json()["delta"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(text, "tick 1 tick 2 tick 3 tick 4");
}

#[tokio::test]
async fn every_request_is_logged_with_keys_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("requests.jsonl");
    let fake = FakeModel::start(&["--log", log.to_str().expect("utf8")]);
    stream(
        &fake.url("/v1/messages?beta=true"),
        claude_request("hi log"),
    )
    .await;
    let resp = reqwest::Client::new()
        .post(fake.url("/v1/responses"))
        .bearer_auth("sk-openai-secret")
        .json(&codex_request("BASH true"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    resp.text().await.expect("body");

    let recent = fake.requests().await;
    assert_eq!(recent.len(), 2);
    let claude = &recent[0];
    assert_eq!(claude["method"], "POST");
    assert_eq!(claude["path"], "/v1/messages");
    assert_eq!(claude["query"], "beta=true");
    assert_eq!(claude["api"], "anthropic");
    assert_eq!(claude["headers"]["x-api-key"], "[redacted]");
    assert_eq!(claude["headers"]["anthropic-version"], "2023-06-01");
    assert_eq!(claude["body"]["messages"][1]["role"], "system");
    assert_eq!(
        claude["answer"]["text"],
        "Hello from the fake model! You said: hi log"
    );
    let codex = &recent[1];
    assert_eq!(codex["headers"]["authorization"], "Bearer [redacted]");
    assert_eq!(codex["answer"]["kind"], "tool_call");
    assert_eq!(codex["answer"]["name"], "exec_command");
    assert_eq!(codex["answer"]["arguments"], json!({"cmd": "true"}));
    assert!(codex["seq"].as_u64() > claude["seq"].as_u64());

    let file = std::fs::read_to_string(&log).expect("log file");
    let lines: Vec<Value> = file
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines, recent);
    assert!(!file.contains("sk-openai-secret") && !file.contains("sk-ant-secret-key"));

    let cleared = reqwest::Client::new()
        .delete(fake.url("/_fake/requests"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(cleared.status(), 204);
    assert!(fake.requests().await.is_empty());
}

#[test]
fn refuses_to_listen_beyond_loopback() {
    let out = std::process::Command::new(crate::common::fake_model_exe())
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no listen line");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}
