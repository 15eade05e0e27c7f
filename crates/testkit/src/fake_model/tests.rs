//! The pure middle's unit tests: reading, deciding and rendering.

use super::*;

fn conv(api: Api, body: Value) -> Conversation {
    Conversation::read(api, &body)
}

fn reply<'a>(conv: &'a Conversation, answer: &'a Answer) -> Reply<'a> {
    Reply {
        conv,
        answer,
        seq: 7,
        created: 1_700_000_000,
    }
}

fn events(frames: &[SseFrame]) -> Vec<&str> {
    frames.iter().filter_map(|f| f.event.as_deref()).collect()
}

fn data(frame: &SseFrame) -> Value {
    serde_json::from_str(&frame.data).unwrap_or(Value::Null)
}

#[test]
fn plain_text_is_a_reply() {
    assert_eq!(
        Directive::parse("  hello there \n"),
        Directive::Reply("hello there".into())
    );
}

#[test]
fn writefile_takes_a_path_and_the_rest_of_the_line() {
    assert_eq!(
        Directive::parse("please\nWRITEFILE /tmp/a b.txt  two words \nmore"),
        Directive::WriteFile {
            path: "/tmp/a".into(),
            content: "b.txt  two words".into()
        }
    );
    assert_eq!(
        Directive::parse("WRITEFILE /tmp/empty"),
        Directive::WriteFile {
            path: "/tmp/empty".into(),
            content: String::new()
        }
    );
    // Without a path it is no directive.
    assert_eq!(
        Directive::parse("WRITEFILE"),
        Directive::Reply("WRITEFILE".into())
    );
}

#[test]
fn bash_error_and_lowercase_words() {
    assert_eq!(
        Directive::parse("BASH ls -la /tmp"),
        Directive::Bash("ls -la /tmp".into())
    );
    assert_eq!(Directive::parse("ERROR 429"), Directive::Error(429));
    assert_eq!(Directive::parse("ERROR"), Directive::Error(500));
    assert_eq!(Directive::parse("ERROR 200"), Directive::Error(500));
    assert_eq!(
        Directive::parse("error 429"),
        Directive::Reply("error 429".into())
    );
}

#[test]
fn slow_has_defaults_and_stays_under_a_minute() {
    assert_eq!(
        Directive::parse("SLOW"),
        Directive::Slow {
            delay_ms: 500,
            deltas: 10
        }
    );
    assert_eq!(
        Directive::parse("SLOW 50 3"),
        Directive::Slow {
            delay_ms: 50,
            deltas: 3
        }
    );
    assert_eq!(
        Directive::parse("SLOW 10000 100"),
        Directive::Slow {
            delay_ms: 10_000,
            deltas: 6
        }
    );
    assert_eq!(
        Directive::parse("SLOW 999999"),
        Directive::Slow {
            delay_ms: 60_000,
            deltas: 1
        }
    );
}

#[test]
fn wrappers_at_line_start_are_removed_inline_tags_kept() {
    let text = "<system-reminder>\nignore WRITEFILE /x\n</system-reminder>\nhi <b>there</b>\n  <environment_context>cwd</environment_context>";
    assert_eq!(strip_wrappers(text), "hi <b>there</b>");
    assert_eq!(strip_wrappers("<open> never closed"), "<open> never closed");
}

#[test]
fn a_prompt_sent_after_an_interruption_is_read_without_the_interrupted_one() {
    let c = conv(
        Api::Anthropic,
        json!({
            "model": "claude-x",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "SLOW 500 40\n"},
                {"type": "text", "text": "[Request interrupted by user]\n"},
                {"type": "text", "text": "second words bluejay"}]}],
        }),
    );
    assert_eq!(c.prompt, "second words bluejay");
    assert_eq!(after_interruption("no marker\nhere"), "no marker\nhere");
}

#[test]
fn anthropic_reads_system_blocks_mid_conversation_system_and_reminders() {
    let c = conv(
        Api::Anthropic,
        json!({
            "model": "claude-x", "stream": true,
            "system": [{"type": "text", "text": "You are Claude Code."}],
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "<system-reminder>\nctx\n</system-reminder>"},
                    {"type": "text", "text": "BASH ls"}]},
                {"role": "system", "content": "late system text"},
            ],
            "tools": [{"name": "Bash", "input_schema": {"properties": {"command": {"type": "string"}}}}],
        }),
    );
    assert_eq!(c.model, "claude-x");
    assert!(c.stream);
    assert_eq!(c.prompt, "BASH ls");
    assert!(!c.after_tool_result);
    assert!(!c.title_request);
    assert_eq!(c.tools.len(), 1);
    assert_eq!(
        Answer::decide(Api::Anthropic, &c),
        Answer::Tool(ToolCall {
            name: "Bash".into(),
            arguments: json!({"command": "ls"})
        })
    );
    let string_system = conv(
        Api::Anthropic,
        json!({"system": "plain", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(string_system.model, MODEL);
    assert_eq!(string_system.prompt, "hi");
    // "plain" + "hi": 7 characters, 2 tokens.
    assert_eq!(string_system.input_tokens, 2);
}

#[test]
fn a_tool_result_ends_the_tool_round_with_tool_done() {
    let c = conv(
        Api::Anthropic,
        json!({"messages": [
            {"role": "user", "content": "WRITEFILE /tmp/x hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "Write", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"},
                                          {"type": "text", "text": "<system-reminder>\nx\n</system-reminder>"}]},
            {"role": "system", "content": "noise"},
        ]}),
    );
    assert!(c.after_tool_result);
    assert_eq!(Answer::decide(Api::Anthropic, &c).full_text(), TOOL_DONE);

    let chat = conv(
        Api::Chat,
        json!({"messages": [{"role": "user", "content": "BASH ls"},
                            {"role": "assistant", "tool_calls": []},
                            {"role": "tool", "tool_call_id": "c", "content": "a b"}]}),
    );
    assert!(chat.after_tool_result);
    let responses = conv(
        Api::Responses,
        json!({"input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "BASH ls"}]},
                         {"type": "function_call", "call_id": "c", "name": "exec_command", "arguments": "{}"},
                         {"type": "function_call_output", "call_id": "c", "output": "a b"}]}),
    );
    assert!(responses.after_tool_result);
    assert_eq!(responses.prompt, "BASH ls");
}

#[test]
fn title_requests_get_a_title_and_ignore_directives() {
    let opencode = conv(
        Api::Chat,
        json!({"messages": [
            {"role": "system", "content": "You are a title generator."},
            {"role": "user", "content": "Generate a title for this conversation:\n"},
            {"role": "user", "content": "WRITEFILE /tmp/x hi"},
        ]}),
    );
    assert!(opencode.title_request);
    assert_eq!(Answer::decide(Api::Chat, &opencode).full_text(), TITLE);
    let codex = conv(
        Api::Responses,
        json!({"input": [{"role": "user", "content": [{"type": "input_text",
            "text": "Generate a concise, single-line title for: ERROR 500"}]}]}),
    );
    assert!(codex.title_request);
    assert_eq!(Answer::decide(Api::Responses, &codex).full_text(), TITLE);
}

#[test]
fn writefile_uses_the_offered_tool_and_its_parameter_names() {
    let opencode = conv(
        Api::Chat,
        json!({
            "messages": [{"role": "user", "content": "WRITEFILE /w/a.txt hi there"}],
            "tools": [
                {"type": "function", "function": {"name": "bash", "parameters": {}}},
                {"type": "function", "function": {"name": "write", "parameters": {
                    "type": "object",
                    "properties": {"content": {"type": "string"}, "filePath": {"type": "string"}},
                    "required": ["content", "filePath"]}}},
            ],
        }),
    );
    assert_eq!(
        Answer::decide(Api::Chat, &opencode),
        Answer::Tool(ToolCall {
            name: "write".into(),
            arguments: json!({"filePath": "/w/a.txt", "content": "hi there"})
        })
    );
    let no_tools = conv(
        Api::Anthropic,
        json!({"messages": [{"role": "user", "content": "WRITEFILE /w/a.txt hi"}]}),
    );
    assert_eq!(
        Answer::decide(Api::Anthropic, &no_tools),
        Answer::Tool(ToolCall {
            name: "Write".into(),
            arguments: json!({"file_path": "/w/a.txt", "content": "hi"})
        })
    );
}

#[test]
fn calltool_calls_the_clients_tool_by_its_own_or_its_prefixed_name() {
    let claude = conv(
        Api::Anthropic,
        json!({
            "messages": [{"role": "user", "content": "CALLTOOL lookup {\"q\": \"heron 7\"}"}],
            "tools": [
                {"name": "Bash", "input_schema": {}},
                {"name": "mcp__client__lookup", "input_schema": {"type": "object"}},
            ],
        }),
    );
    assert_eq!(
        Answer::decide(Api::Anthropic, &claude),
        Answer::Tool(ToolCall {
            name: "mcp__client__lookup".into(),
            arguments: json!({"q": "heron 7"})
        })
    );
    // Not offered: the name as written; arguments that are no JSON object: `{}`.
    let bare = conv(
        Api::Chat,
        json!({"messages": [{"role": "user", "content": "CALLTOOL other [1]"}]}),
    );
    assert_eq!(
        Answer::decide(Api::Chat, &bare),
        Answer::Tool(ToolCall {
            name: "other".into(),
            arguments: json!({})
        })
    );
    assert_eq!(
        Directive::parse("CALLTOOL"),
        Directive::Reply("CALLTOOL".into())
    );
}

#[test]
fn writefile_through_codex_is_a_quoted_shell_command() {
    let codex = conv(
        Api::Responses,
        json!({
            "input": [{"type": "message", "role": "user",
                       "content": [{"type": "input_text", "text": "WRITEFILE /w/it's.txt it's done"}]}],
            "tools": [{"type": "function", "name": "exec_command",
                       "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}},
                                      "required": ["cmd"]}}],
        }),
    );
    assert_eq!(
        Answer::decide(Api::Responses, &codex),
        Answer::Tool(ToolCall {
            name: "exec_command".into(),
            arguments: json!({"cmd": "printf '%s' 'it'\\''s done' > '/w/it'\\''s.txt'"})
        })
    );
    let old_shell = conv(
        Api::Responses,
        json!({"input": "BASH ls", "tools": [{"type": "function", "name": "shell",
            "parameters": {"properties": {"command": {"type": "array"}}}}]}),
    );
    assert_eq!(
        Answer::decide(Api::Responses, &old_shell),
        Answer::Tool(ToolCall {
            name: "shell".into(),
            arguments: json!({"command": ["bash", "-lc", "ls"]})
        })
    );
}

#[test]
fn bash_fills_required_string_parameters() {
    let opencode = conv(
        Api::Chat,
        json!({
            "messages": [{"role": "user", "content": "BASH touch x"}],
            "tools": [{"type": "function", "function": {"name": "bash", "parameters": {
                "properties": {"command": {"type": "string"}, "description": {"type": "string"},
                               "timeout": {"type": "number"}},
                "required": ["command", "description", "timeout"]}}}],
        }),
    );
    let Answer::Tool(call) = Answer::decide(Api::Chat, &opencode) else {
        panic!("expected a tool call");
    };
    assert_eq!(call.name, "bash");
    assert_eq!(
        call.arguments,
        json!({"command": "touch x", "description": "requested by the fake model"})
    );
}

#[test]
fn the_default_reply_greets_and_echoes_one_line() {
    assert_eq!(
        greeting("  two\n lines  "),
        "Hello from the fake model! You said: two lines"
    );
    assert_eq!(greeting(""), GREETING);
    assert_eq!(greeting(&"x".repeat(500)).len(), GREETING.len() + 11 + 200);
}

#[test]
fn splitting_keeps_every_character() {
    let text = "one two three four five";
    let parts = split_words(text, 4);
    assert!(parts.len() > 1 && parts.len() <= 4);
    assert_eq!(parts.concat(), text);
    let json = "{\"a\":\"ünïcode\"}";
    let pieces = split_even(json, 3);
    assert_eq!(pieces.len(), 3);
    assert_eq!(pieces.concat(), json);
    assert_eq!(split_words("", 4), vec![String::new()]);
}

#[test]
fn sse_frames_encode_event_and_each_data_line() {
    let frame = SseFrame::named("ping", &json!({"type": "ping"}));
    assert_eq!(frame.encode(), "event: ping\ndata: {\"type\":\"ping\"}\n\n");
    assert_eq!(SseFrame::data("[DONE]").encode(), "data: [DONE]\n\n");
    assert_eq!(SseFrame::data("a\nb").encode(), "data: a\ndata: b\n\n");
}

#[test]
fn anthropic_text_stream_has_the_real_event_sequence() {
    let c = conv(
        Api::Anthropic,
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    );
    let answer = Answer::decide(Api::Anthropic, &c);
    let frames = reply(&c, &answer).anthropic_stream();
    let deltas = frames.len() - 6;
    let mut expected = vec!["message_start", "ping", "content_block_start"];
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(events(&frames), expected);
    assert!(deltas >= 2, "several deltas");
    let text: String = frames
        .iter()
        .map(data)
        .filter(|d| d["delta"]["type"] == "text_delta")
        .filter_map(|d| d["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "Hello from the fake model! You said: hi");
    let start = data(&frames[0]);
    assert_eq!(start["message"]["id"], "msg_fake7");
    assert_eq!(start["message"]["model"], "m");
    let end = data(&frames[frames.len() - 2]);
    assert_eq!(end["delta"]["stop_reason"], "end_turn");
    assert_eq!(end["usage"]["output_tokens"], answer.output_tokens());
    // Every event's data names its own type.
    for f in &frames {
        assert_eq!(data(f)["type"].as_str(), f.event.as_deref());
    }
}

#[test]
fn anthropic_tool_stream_rebuilds_the_input_json() {
    let c = conv(
        Api::Anthropic,
        json!({"messages": [{"role": "user", "content": "WRITEFILE /w/f.txt abc"}]}),
    );
    let answer = Answer::decide(Api::Anthropic, &c);
    let frames = reply(&c, &answer).anthropic_stream();
    let block = data(&frames[2]);
    assert_eq!(
        block["content_block"],
        json!({"type": "tool_use", "id": "toolu_fake7", "name": "Write", "input": {}})
    );
    let partial: String = frames
        .iter()
        .map(data)
        .filter(|d| d["delta"]["type"] == "input_json_delta")
        .filter_map(|d| d["delta"]["partial_json"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&partial).unwrap_or_default(),
        json!({"file_path": "/w/f.txt", "content": "abc"})
    );
    assert_eq!(
        data(&frames[frames.len() - 2])["delta"]["stop_reason"],
        "tool_use"
    );
}

#[test]
fn slow_deltas_carry_the_delay() {
    let c = conv(
        Api::Chat,
        json!({"messages": [{"role": "user", "content": "SLOW 20 3"}]}),
    );
    let answer = Answer::decide(Api::Chat, &c);
    assert_eq!(answer.full_text(), "tick 1 tick 2 tick 3");
    let frames = reply(&c, &answer).chat_stream(false);
    let delayed: Vec<_> = frames.iter().filter(|f| !f.delay.is_zero()).collect();
    assert_eq!(delayed.len(), 3);
    assert!(delayed.iter().all(|f| f.delay == Duration::from_millis(20)));
}

#[test]
fn chat_stream_ends_with_usage_then_done() {
    let c = conv(
        Api::Chat,
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    let answer = Answer::decide(Api::Chat, &c);
    let frames = reply(&c, &answer).chat_stream(true);
    assert!(frames.iter().all(|f| f.event.is_none()));
    assert_eq!(frames[frames.len() - 1].data, "[DONE]");
    let usage = data(&frames[frames.len() - 2]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], answer.output_tokens());
    let finish = data(&frames[frames.len() - 3]);
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["usage"], Value::Null);
    // Without include_usage: no usage chunk and no usage key.
    let plain = reply(&c, &answer).chat_stream(false);
    assert_eq!(plain.len(), frames.len() - 1);
    assert!(data(&plain[0]).get("usage").is_none());
}

#[test]
fn responses_stream_numbers_events_and_completes() {
    let c = conv(Api::Responses, json!({"input": "hi"}));
    let answer = Answer::decide(Api::Responses, &c);
    let frames = reply(&c, &answer).responses_stream();
    let names = events(&frames);
    assert_eq!(
        names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let deltas = names.len() - 8;
    assert!(deltas >= 2, "several deltas");
    assert!(
        names[4..4 + deltas]
            .iter()
            .all(|n| *n == "response.output_text.delta")
    );
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(data(f)["sequence_number"], i);
    }
    let done = data(&frames[frames.len() - 1]);
    assert_eq!(done["response"]["status"], "completed");
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        "Hello from the fake model! You said: hi"
    );
    assert_eq!(
        done["response"]["usage"]["output_tokens"],
        answer.output_tokens()
    );
}

#[test]
fn secrets_are_redacted_but_the_scheme_is_kept() {
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_static("Bearer sk-123"));
    headers.insert("x-api-key", HeaderValue::from_static("sk-456"));
    headers.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    let v = redacted_headers(&headers);
    assert_eq!(v["authorization"], "Bearer [redacted]");
    assert_eq!(v["x-api-key"], "[redacted]");
    assert_eq!(v["anthropic-version"], "2023-06-01");
}

#[test]
fn errors_use_each_providers_shape() {
    assert_eq!(
        error_body(Api::Anthropic, 529, "m"),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "m"}})
    );
    assert_eq!(
        error_body(Api::Chat, 400, "m")["error"]["type"],
        "invalid_request_error"
    );
    assert_eq!(
        error_body(Api::Responses, 503, "m")["error"]["type"],
        "server_error"
    );
}
