//! `sandwarden-fake-model`: a scriptable stand-in for the Anthropic Messages, OpenAI Chat
//! Completions and OpenAI Responses APIs on loopback, so real agent CLIs run offline in tests.
//!
//! It answers from the conversation alone (directives in the last user message, see
//! `docs/fake-model.md`), logs every request, and never runs the tools it asks for nor calls a
//! real model. It depends on nothing of the orchestrator.
//!
//! Layout: the pure middle (reading a request into a [`Conversation`], deciding an [`Answer`],
//! rendering it as one provider's JSON or SSE frames) has unit tests; the HTTP layer at the bottom
//! only extracts, records and sends.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// The model id listed by `/v1/models` and used when a request names none.
pub const MODEL: &str = "fake-model";
/// The start of every default reply.
pub const GREETING: &str = "Hello from the fake model!";
/// The reply once a tool result comes back.
pub const TOOL_DONE: &str = "Tool done.";
/// The reply to a title-generation request.
pub const TITLE: &str = "Fake session title";
/// Longest a `SLOW` reply may stream, in total.
pub const SLOW_MAX_TOTAL: Duration = Duration::from_secs(60);
/// Deltas a plain reply is split into.
const TEXT_DELTAS: usize = 4;
/// Pieces a tool call's JSON arguments are streamed in.
const ARG_DELTAS: usize = 3;
/// Longest prompt echo in a default reply, in characters.
const ECHO_MAX_CHARS: usize = 200;
/// Longest non-JSON body kept in the request log, in characters.
const LOGGED_RAW_BODY_CHARS: usize = 4096;

#[derive(Debug, Clone, clap::Args)]
pub struct FakeModelArgs {
    /// Address to listen on, loopback only (port 0 picks a free port; the chosen address is
    /// printed on stdout as `{"listening":"127.0.0.1:PORT"}`).
    #[arg(
        long,
        env = "SANDWARDEN_FAKE_MODEL_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    pub listen: SocketAddr,
    /// Append every request as one JSON line to this file.
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_LOG")]
    pub log: Option<PathBuf>,
    /// How many recent requests `GET /_fake/requests` keeps.
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_KEEP", default_value_t = 1000)]
    pub keep: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Allow a non-loopback `--listen`: only inside a container, whose network is private to
    /// the sandboxes (how the container tests reach it from harness containers).
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_IN_CONTAINER")]
    pub in_container: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FakeModelError {
    #[error(
        "--listen {0} is not a loopback address: the fake model only listens on 127.0.0.1 or ::1 \
         (inside a container, add --in-container)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the request log {}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

// ---------------------------------------------------------------------------------------------
// Reading a request (pure)
// ---------------------------------------------------------------------------------------------

/// The three wire dialects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Anthropic,
    Chat,
    Responses,
}

impl Api {
    pub fn name(self) -> &'static str {
        match self {
            Api::Anthropic => "anthropic",
            Api::Chat => "chat",
            Api::Responses => "responses",
        }
    }
}

/// A tool the client offered: its name and JSON schema (`Value::Null` when it has none).
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub schema: Value,
}

/// What the fake needs to know about one request, the same for every dialect.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    pub model: String,
    pub stream: bool,
    /// Text of the last user message, with `<tag>…</tag>` wrapper blocks removed.
    pub prompt: String,
    /// The conversation ends with a tool result (ignoring system messages).
    pub after_tool_result: bool,
    /// A title-generation side request (opencode, codex TUI).
    pub title_request: bool,
    pub tools: Vec<Tool>,
    pub input_tokens: u64,
}

/// Phrases that mark title-generation requests in a user message.
const TITLE_MARKERS: &[&str] = &["Generate a title", "Generate a concise"];

impl Conversation {
    pub fn read(api: Api, body: &Value) -> Conversation {
        let model = body["model"].as_str().unwrap_or(MODEL).to_string();
        let stream = body["stream"].as_bool().unwrap_or(false);
        let empty = Vec::new();
        let (messages, tools): (Vec<Message>, Vec<Tool>) = match api {
            Api::Anthropic => (
                body["messages"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .map(Message::anthropic)
                    .collect(),
                read_tools(&body["tools"], "input_schema"),
            ),
            Api::Chat => (
                body["messages"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .map(Message::chat)
                    .collect(),
                read_tools(&body["tools"], "parameters"),
            ),
            Api::Responses => (
                match &body["input"] {
                    Value::String(s) => vec![Message {
                        role: "user".into(),
                        texts: vec![s.clone()],
                        tool_result: false,
                    }],
                    Value::Array(items) => items.iter().map(Message::responses).collect(),
                    _ => Vec::new(),
                },
                read_tools(&body["tools"], "parameters"),
            ),
        };
        let conversational = |m: &&Message| m.role != "system" && m.role != "developer";
        let after_tool_result = messages
            .iter()
            .rfind(conversational)
            .is_some_and(|m| m.tool_result);
        let prompt = messages
            .iter()
            .rfind(|m| m.role == "user")
            .map(|m| after_interruption(&strip_wrappers(&m.texts.join("\n"))).to_string())
            .unwrap_or_default();
        let title_request = messages
            .iter()
            .filter(|m| m.role == "user" || m.role == "developer")
            .flat_map(|m| &m.texts)
            .any(|t| TITLE_MARKERS.iter().any(|marker| t.contains(marker)));
        let input_chars = ["system", "messages", "input", "instructions"]
            .iter()
            .map(|k| text_chars(&body[*k]))
            .sum::<usize>();
        Conversation {
            model,
            stream,
            prompt,
            after_tool_result,
            title_request,
            tools,
            input_tokens: tokens(input_chars),
        }
    }

    fn tool(&self, names: &[&str]) -> Option<&Tool> {
        names.iter().find_map(|wanted| {
            self.tools
                .iter()
                .find(|t| t.name.eq_ignore_ascii_case(wanted))
        })
    }
}

/// One message reduced to what the fake looks at.
struct Message {
    role: String,
    texts: Vec<String>,
    tool_result: bool,
}

impl Message {
    fn anthropic(m: &Value) -> Message {
        Message {
            role: m["role"].as_str().unwrap_or_default().to_string(),
            texts: content_texts(&m["content"]),
            tool_result: blocks(&m["content"]).any(|b| b["type"] == "tool_result"),
        }
    }

    fn chat(m: &Value) -> Message {
        let role = m["role"].as_str().unwrap_or_default().to_string();
        Message {
            tool_result: role == "tool" || role == "function",
            texts: content_texts(&m["content"]),
            role,
        }
    }

    fn responses(item: &Value) -> Message {
        let kind = item["type"].as_str().unwrap_or("message");
        if kind == "message" {
            Message {
                role: item["role"].as_str().unwrap_or_default().to_string(),
                texts: content_texts(&item["content"]),
                tool_result: false,
            }
        } else {
            // function_call, function_call_output, reasoning, …: not text the user typed.
            Message {
                role: kind.to_string(),
                texts: Vec::new(),
                tool_result: kind.ends_with("_output"),
            }
        }
    }
}

fn blocks(content: &Value) -> impl Iterator<Item = &Value> {
    content.as_array().into_iter().flatten()
}

/// The texts of a message's content: a plain string, or the text blocks of a block list.
fn content_texts(content: &Value) -> Vec<String> {
    match content {
        Value::String(s) => vec![s.clone()],
        _ => blocks(content)
            .filter(|b| {
                matches!(
                    b["type"].as_str(),
                    None | Some("text" | "input_text" | "output_text")
                )
            })
            .filter_map(|b| b["text"].as_str().map(str::to_string))
            .collect(),
    }
}

/// Tools from `[{name, <schema_key>}]` or the Chat API's `[{type:"function", function:{…}}]`.
fn read_tools(tools: &Value, schema_key: &str) -> Vec<Tool> {
    blocks(tools)
        .filter_map(|t| {
            let def = if t["function"].is_object() {
                &t["function"]
            } else {
                t
            };
            Some(Tool {
                name: def["name"].as_str()?.to_string(),
                schema: def[schema_key].clone(),
            })
        })
        .collect()
}

/// Removes blocks like `<system-reminder>…</system-reminder>` that CLIs add around the user's
/// text. Only a tag that opens a line and has a matching close is removed.
pub fn strip_wrappers(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some((before, tag, after_open)) = next_wrapper(rest) {
        let close = format!("</{tag}>");
        match after_open.find(&close) {
            Some(end) => {
                out.push_str(before);
                rest = &after_open[end + close.len()..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.trim().to_string()
}

/// What follows the last interruption marker: claude-code ends an interrupted prompt with
/// `[Request interrupted by user]` and sends the next prompt in the same user message, so only
/// the text after the marker is the prompt being asked.
pub fn after_interruption(text: &str) -> &str {
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        at += line.len();
        if line.trim_start().starts_with(INTERRUPTED) {
            start = at;
        }
    }
    text[start..].trim()
}

/// The line claude-code adds to a prompt it was interrupted answering.
const INTERRUPTED: &str = "[Request interrupted by user";

/// The next `<tag>` at the start of a line: (text before it, tag name, text after it).
fn next_wrapper(text: &str) -> Option<(&str, &str, &str)> {
    let mut line_start = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(inner) = trimmed.strip_prefix('<')
            && let Some(end) = inner.find('>')
        {
            let tag = &inner[..end];
            if !tag.is_empty()
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                let open = line_start + indent;
                return Some((&text[..open], tag, &text[open + tag.len() + 2..]));
            }
        }
        line_start += line.len();
    }
    None
}

/// Characters in every string under `v` except the `role` and `type` tags (the deterministic
/// base of the usage numbers).
fn text_chars(v: &Value) -> usize {
    match v {
        Value::String(s) => s.chars().count(),
        Value::Array(items) => items.iter().map(text_chars).sum(),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| *k != "role" && *k != "type")
            .map(|(_, v)| text_chars(v))
            .sum(),
        _ => 0,
    }
}

/// About four characters a token, at least one.
pub fn tokens(chars: usize) -> u64 {
    (chars.div_ceil(4) as u64).max(1)
}

// ---------------------------------------------------------------------------------------------
// Deciding the answer (pure)
// ---------------------------------------------------------------------------------------------

/// What the last user message asks of the fake; see `docs/fake-model.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// No directive: greet and echo the prompt.
    Reply(String),
    WriteFile {
        path: String,
        content: String,
    },
    Bash(String),
    Slow {
        delay_ms: u64,
        deltas: u32,
    },
    Error(u16),
}

const SLOW_DEFAULT_MS: u64 = 500;
const SLOW_DEFAULT_DELTAS: u32 = 10;

impl Directive {
    /// The first line that starts with a directive word wins; otherwise a plain reply.
    pub fn parse(prompt: &str) -> Directive {
        for line in prompt.lines() {
            let line = line.trim();
            let (word, rest) = match line.split_once(char::is_whitespace) {
                Some((w, r)) => (w, r.trim_start()),
                None => (line, ""),
            };
            let parsed = match word {
                "WRITEFILE" => {
                    let (path, content) = match rest.split_once(char::is_whitespace) {
                        Some((p, c)) => (p, c.trim_start()),
                        None => (rest, ""),
                    };
                    (!path.is_empty()).then(|| Directive::WriteFile {
                        path: path.to_string(),
                        content: content.to_string(),
                    })
                }
                "BASH" => (!rest.is_empty()).then(|| Directive::Bash(rest.to_string())),
                "SLOW" => Some(Directive::slow(rest)),
                "ERROR" => Some(Directive::Error(
                    rest.split_whitespace()
                        .next()
                        .and_then(|s| s.parse::<u16>().ok())
                        .filter(|s| (400..=599).contains(s))
                        .unwrap_or(500),
                )),
                _ => None,
            };
            if let Some(directive) = parsed {
                return directive;
            }
        }
        Directive::Reply(prompt.trim().to_string())
    }

    /// `SLOW [ms] [deltas]`, bounded so the whole reply takes at most [`SLOW_MAX_TOTAL`].
    fn slow(rest: &str) -> Directive {
        let mut numbers = rest.split_whitespace().map(|s| s.parse::<u64>().ok());
        let max_ms = SLOW_MAX_TOTAL.as_millis() as u64;
        let delay_ms = numbers
            .next()
            .flatten()
            .unwrap_or(SLOW_DEFAULT_MS)
            .min(max_ms);
        let deltas = numbers
            .next()
            .flatten()
            .unwrap_or(u64::from(SLOW_DEFAULT_DELTAS))
            .clamp(1, 1000);
        // A zero delay has no total to bound.
        let deltas = match max_ms.checked_div(delay_ms) {
            Some(fit) => deltas.min(fit).max(1),
            None => deltas,
        };
        Directive::Slow {
            delay_ms,
            deltas: u32::try_from(deltas).unwrap_or(SLOW_DEFAULT_DELTAS),
        }
    }
}

/// A tool call the fake asks the client to make.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// The fake's answer to one request, before any wire format.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Text streamed as `deltas` (their concatenation is the text), each after `delay`.
    Text {
        deltas: Vec<String>,
        delay: Duration,
    },
    Tool(ToolCall),
    Error {
        status: u16,
    },
}

impl Answer {
    pub fn decide(api: Api, conv: &Conversation) -> Answer {
        if conv.title_request {
            return Answer::text(TITLE);
        }
        if conv.after_tool_result {
            return Answer::text(TOOL_DONE);
        }
        match Directive::parse(&conv.prompt) {
            Directive::Reply(prompt) => Answer::text(&greeting(&prompt)),
            Directive::WriteFile { path, content } => {
                Answer::Tool(write_file_call(api, conv, &path, &content))
            }
            Directive::Bash(command) => Answer::Tool(shell_call(api, conv, &command)),
            Directive::Slow { delay_ms, deltas } => Answer::Text {
                deltas: (1..=deltas)
                    .map(|i| {
                        if i == 1 {
                            "tick 1".to_string()
                        } else {
                            format!(" tick {i}")
                        }
                    })
                    .collect(),
                delay: Duration::from_millis(delay_ms),
            },
            Directive::Error(status) => Answer::Error { status },
        }
    }

    fn text(text: &str) -> Answer {
        Answer::Text {
            deltas: split_words(text, TEXT_DELTAS),
            delay: Duration::ZERO,
        }
    }

    pub fn full_text(&self) -> String {
        match self {
            Answer::Text { deltas, .. } => deltas.concat(),
            _ => String::new(),
        }
    }

    pub fn output_tokens(&self) -> u64 {
        match self {
            Answer::Text { deltas, .. } => tokens(deltas.iter().map(|d| d.chars().count()).sum()),
            Answer::Tool(call) => tokens(call.arguments.to_string().chars().count()),
            Answer::Error { .. } => 0,
        }
    }

    /// A summary for the request log.
    fn summary(&self) -> Value {
        match self {
            Answer::Text { delay, .. } => json!({
                "kind": "text",
                "text": self.full_text(),
                "delay_ms": delay.as_millis() as u64,
            }),
            Answer::Tool(call) => {
                json!({"kind": "tool_call", "name": call.name, "arguments": call.arguments})
            }
            Answer::Error { status } => json!({"kind": "error", "status": status}),
        }
    }
}

/// `Hello from the fake model! You said: <prompt>` with the prompt on one line, shortened.
pub fn greeting(prompt: &str) -> String {
    let one_line = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return GREETING.to_string();
    }
    let echo: String = one_line.chars().take(ECHO_MAX_CHARS).collect();
    format!("{GREETING} You said: {echo}")
}

/// Splits text into at most `n` pieces at word boundaries; the pieces concatenate to the text.
pub fn split_words(text: &str, n: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    if words.is_empty() {
        return vec![String::new()];
    }
    let per = words.len().div_ceil(n.max(1));
    words.chunks(per).map(|c| c.concat()).collect()
}

/// Splits text into at most `n` pieces of about equal length, on character boundaries.
pub fn split_even(text: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let per = chars.len().div_ceil(n.max(1));
    chars.chunks(per).map(|c| c.iter().collect()).collect()
}

const WRITE_TOOLS: &[&str] = &["Write", "write", "write_file", "create_file"];
const SHELL_TOOLS: &[&str] = &["Bash", "bash", "exec_command", "shell", "shell_command"];

/// A call that writes `content` to `path`: the client's write tool if it offers one, else its
/// shell tool, else the dialect's usual tool (Anthropic `Write`, Chat `write`, Responses
/// `exec_command`).
fn write_file_call(api: Api, conv: &Conversation, path: &str, content: &str) -> ToolCall {
    let command = format!(
        "printf '%s' {} > {}",
        shell_words::quote(content),
        shell_words::quote(path)
    );
    if let Some(tool) = conv.tool(WRITE_TOOLS) {
        return write_call(api, tool, path, content);
    }
    if let Some(tool) = conv.tool(SHELL_TOOLS) {
        return shell_args(tool, &command);
    }
    match api {
        Api::Responses => shell_args(&bare_tool("exec_command"), &command),
        Api::Anthropic => write_call(api, &bare_tool("Write"), path, content),
        Api::Chat => write_call(api, &bare_tool("write"), path, content),
    }
}

fn write_call(api: Api, tool: &Tool, path: &str, content: &str) -> ToolCall {
    let props = &tool.schema["properties"];
    let path_key = ["file_path", "filePath", "path"]
        .into_iter()
        .find(|k| props.get(k).is_some())
        .unwrap_or(match api {
            Api::Anthropic => "file_path",
            Api::Chat => "filePath",
            Api::Responses => "path",
        });
    let content_key = ["content", "contents", "text"]
        .into_iter()
        .find(|k| props.get(k).is_some())
        .unwrap_or("content");
    let mut args = Map::new();
    args.insert(path_key.into(), path.into());
    args.insert(content_key.into(), content.into());
    ToolCall {
        name: tool.name.clone(),
        arguments: fill_required(args, &tool.schema),
    }
}

fn shell_call(api: Api, conv: &Conversation, command: &str) -> ToolCall {
    match conv.tool(SHELL_TOOLS) {
        Some(tool) => shell_args(tool, command),
        None => shell_args(
            &bare_tool(match api {
                Api::Anthropic => "Bash",
                Api::Chat => "bash",
                Api::Responses => "exec_command",
            }),
            command,
        ),
    }
}

/// `{cmd}` (codex `exec_command`), `{command: [argv]}` (codex `shell`) or `{command}`.
fn shell_args(tool: &Tool, command: &str) -> ToolCall {
    let props = &tool.schema["properties"];
    let no_schema = !props.is_object();
    let mut args = Map::new();
    if props.get("cmd").is_some() || (no_schema && tool.name == "exec_command") {
        args.insert("cmd".into(), command.into());
    } else if props["command"]["type"] == "array" || (no_schema && tool.name == "shell") {
        args.insert("command".into(), json!(["bash", "-lc", command]));
    } else {
        args.insert("command".into(), command.into());
    }
    ToolCall {
        name: tool.name.clone(),
        arguments: fill_required(args, &tool.schema),
    }
}

fn bare_tool(name: &str) -> Tool {
    Tool {
        name: name.to_string(),
        schema: Value::Null,
    }
}

/// Gives every required string parameter we did not set a short value (opencode's `bash` requires
/// a `description`), so the client's argument validation passes.
fn fill_required(mut args: Map<String, Value>, schema: &Value) -> Value {
    for name in blocks(&schema["required"]).filter_map(Value::as_str) {
        if !args.contains_key(name) && schema["properties"][name]["type"] == "string" {
            args.insert(name.to_string(), "requested by the fake model".into());
        }
    }
    Value::Object(args)
}

// ---------------------------------------------------------------------------------------------
// Rendering (pure)
// ---------------------------------------------------------------------------------------------

/// One server-sent event, sent after `delay`.
#[derive(Debug, Clone, PartialEq)]
pub struct SseFrame {
    pub event: Option<String>,
    pub data: String,
    pub delay: Duration,
}

impl SseFrame {
    fn named(event: &str, data: &Value) -> SseFrame {
        SseFrame {
            event: Some(event.to_string()),
            data: data.to_string(),
            delay: Duration::ZERO,
        }
    }

    fn data(data: impl Into<String>) -> SseFrame {
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
fn is_secret_header(name: &str) -> bool {
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

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

struct Inner {
    seq: AtomicU64,
    recent: Mutex<VecDeque<Value>>,
    keep: usize,
    log: Option<tokio::sync::Mutex<tokio::fs::File>>,
}

#[derive(Clone)]
pub struct FakeModel(Arc<Inner>);

/// The pieces of a request every handler records (an extractor, so handlers take it whole).
struct Incoming {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl<S: Send + Sync> axum::extract::FromRequest<S> for Incoming {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let (parts, body) = req.into_parts();
        let (method, uri, headers) = (
            parts.method.clone(),
            parts.uri.clone(),
            parts.headers.clone(),
        );
        let body = Bytes::from_request(axum::extract::Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(Incoming {
            method,
            uri,
            headers,
            body,
        })
    }
}

impl FakeModel {
    /// A fake model that keeps `keep` requests in memory and appends them to `log` if given.
    pub async fn new(keep: usize, log: Option<PathBuf>) -> Result<FakeModel, FakeModelError> {
        let log = match log {
            Some(path) => Some(tokio::sync::Mutex::new(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .await
                    .map_err(|source| FakeModelError::OpenLog { path, source })?,
            )),
            None => None,
        };
        Ok(FakeModel(Arc::new(Inner {
            seq: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            keep,
            log,
        })))
    }

    pub fn router(self, max_body_bytes: usize) -> Router {
        Router::new()
            .route("/", get(root))
            .route("/v1/messages", post(anthropic))
            .route("/v1/messages/count_tokens", post(count_tokens))
            .route("/v1/chat/completions", post(chat))
            .route("/chat/completions", post(chat))
            .route("/v1/responses", post(responses))
            .route("/responses", post(responses))
            .route("/v1/models", get(models))
            .route("/models", get(models))
            .route("/_fake/requests", get(list_requests).delete(clear_requests))
            .fallback(unknown)
            .layer(DefaultBodyLimit::max(max_body_bytes))
            .with_state(self)
    }

    fn next_seq(&self) -> u64 {
        self.0.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Keeps the record in memory and appends it to the log file.
    async fn record(&self, mut entry: Value, seq: u64, req: &Incoming, body: Value) {
        entry["seq"] = seq.into();
        entry["time_ms"] = (SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64)
            .into();
        entry["method"] = req.method.as_str().into();
        entry["path"] = req.uri.path().into();
        entry["query"] = req.uri.query().map_or(Value::Null, Value::from);
        entry["headers"] = redacted_headers(&req.headers);
        entry["body"] = body;
        {
            let mut recent = lock(&self.0.recent);
            recent.push_back(entry.clone());
            while recent.len() > self.0.keep {
                recent.pop_front();
            }
        }
        if let Some(log) = &self.0.log {
            let mut line = entry.to_string();
            line.push('\n');
            let mut file = log.lock().await;
            // tokio's file hands a write to a blocking thread and returns: the flush waits until
            // the line is in the file, so a reader who got the answer also finds its line.
            let written = match file.write_all(line.as_bytes()).await {
                Ok(()) => file.flush().await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, "appending to the request log failed");
            }
        }
    }

    /// Records a request that is not a model call.
    async fn record_plain(&self, req: &Incoming) {
        let seq = self.next_seq();
        let body = body_for_log(&req.body);
        self.record(json!({}), seq, req, body).await;
    }

    async fn model_call(&self, api: Api, req: Incoming) -> Response {
        let seq = self.next_seq();
        let body: Value = match serde_json::from_slice(&req.body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let entry = json!({"api": api.name(), "answer": {"kind": "error", "status": 400}});
                self.record(entry, seq, &req, body_for_log(&req.body)).await;
                return error_response(api, 400, "the request body must be a JSON object");
            }
        };
        let conv = Conversation::read(api, &body);
        let answer = Answer::decide(api, &conv);
        let entry = json!({
            "api": api.name(),
            "model": conv.model,
            "stream": conv.stream,
            "title_request": conv.title_request,
            "answer": answer.summary(),
        });
        let include_usage = body["stream_options"]["include_usage"] == true;
        self.record(entry, seq, &req, body).await;
        if let Answer::Error { status } = answer {
            return error_response(
                api,
                status,
                &format!("the fake model was asked to fail with {status}"),
            );
        }
        let reply = Reply {
            conv: &conv,
            answer: &answer,
            seq,
            created: unix_seconds(),
        };
        if conv.stream {
            let frames = match api {
                Api::Anthropic => reply.anthropic_stream(),
                Api::Chat => reply.chat_stream(include_usage),
                Api::Responses => reply.responses_stream(),
            };
            return sse_response(frames);
        }
        // Non-streaming: the same pacing, then the whole body.
        if let Answer::Text { deltas, delay } = &answer {
            tokio::time::sleep(delay.saturating_mul(deltas.len() as u32)).await;
        }
        let body = match api {
            Api::Anthropic => reply.anthropic_message(),
            Api::Chat => reply.chat_completion(),
            Api::Responses => reply.response(),
        };
        axum::Json(body).into_response()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The body as JSON if it is JSON, else as (shortened) text, else null.
fn body_for_log(body: &Bytes) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body).unwrap_or_else(|_| {
        Value::String(
            String::from_utf8_lossy(body)
                .chars()
                .take(LOGGED_RAW_BODY_CHARS)
                .collect(),
        )
    })
}

fn error_response(api: Api, status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(error_body(api, status, message))).into_response()
}

fn sse_response(frames: Vec<SseFrame>) -> Response {
    use futures::StreamExt;
    let stream = futures::stream::iter(frames).then(|frame| async move {
        if !frame.delay.is_zero() {
            tokio::time::sleep(frame.delay).await;
        }
        Ok::<_, std::convert::Infallible>(Bytes::from(frame.encode()))
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn root(State(fake): State<FakeModel>, req: Incoming) -> &'static str {
    fake.record_plain(&req).await;
    "sandwarden fake model\n"
}

async fn anthropic(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.model_call(Api::Anthropic, req).await
}

async fn chat(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.model_call(Api::Chat, req).await
}

async fn responses(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.model_call(Api::Responses, req).await
}

async fn count_tokens(State(fake): State<FakeModel>, req: Incoming) -> Response {
    let seq = fake.next_seq();
    let Ok(parsed @ Value::Object(_)) = serde_json::from_slice::<Value>(&req.body) else {
        fake.record(
            json!({"api": "anthropic"}),
            seq,
            &req,
            body_for_log(&req.body),
        )
        .await;
        return error_response(
            Api::Anthropic,
            400,
            "the request body must be a JSON object",
        );
    };
    let input_tokens = Conversation::read(Api::Anthropic, &parsed).input_tokens;
    fake.record(json!({"api": "anthropic"}), seq, &req, parsed)
        .await;
    axum::Json(json!({"input_tokens": input_tokens})).into_response()
}

/// One model, in a shape both the Anthropic and the OpenAI clients accept.
async fn models(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.record_plain(&req).await;
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": MODEL, "object": "model", "type": "model", "display_name": "Fake Model",
            "created": 0, "created_at": "1970-01-01T00:00:00Z", "owned_by": "sandwarden",
        }],
        "has_more": false,
        "first_id": MODEL,
        "last_id": MODEL,
    }))
    .into_response()
}

async fn list_requests(State(fake): State<FakeModel>) -> Response {
    let recent: Vec<Value> = lock(&fake.0.recent).iter().cloned().collect();
    axum::Json(recent).into_response()
}

async fn clear_requests(State(fake): State<FakeModel>) -> StatusCode {
    lock(&fake.0.recent).clear();
    StatusCode::NO_CONTENT
}

async fn unknown(State(fake): State<FakeModel>, req: Incoming) -> Response {
    fake.record_plain(&req).await;
    let message = format!(
        "the fake model does not serve {} {}",
        req.method,
        req.uri.path()
    );
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "type": "error",
            "error": {"type": "not_found_error", "message": message},
        })),
    )
        .into_response()
}

/// Serves until `shutdown` is cancelled; open streams get a moment to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: CancellationToken,
) -> Result<(), FakeModelError> {
    let stopping = shutdown.clone();
    let server = axum::serve(sandwarden_proto::http::no_delay(listener), app)
        .with_graceful_shutdown(async move { stopping.cancelled().await });
    let server = tokio::spawn(async move { server.await });
    shutdown.cancelled().await;
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(result)) => result.map_err(FakeModelError::Serve),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "server task failed");
            Ok(())
        }
        Err(_) => {
            tracing::info!("streams still open at shutdown; closing them");
            Ok(())
        }
    }
}

/// `sandwarden-fake-model`: binds, prints the listen line, serves until SIGTERM/SIGINT.
pub async fn run(args: FakeModelArgs) -> Result<(), FakeModelError> {
    if !args.listen.ip().is_loopback() && !args.in_container {
        return Err(FakeModelError::NotLoopback(args.listen));
    }
    let fake = FakeModel::new(args.keep, args.log).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| FakeModelError::Bind {
            addr: args.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| FakeModelError::Bind {
            addr: args.listen,
            source,
        })?;
    sandwarden_proto::http::announce(&addr.to_string());
    tracing::info!(%addr, "fake model listening");
    let shutdown = CancellationToken::new();
    sandwarden_proto::http::cancel_on_signals(shutdown.clone()).map_err(FakeModelError::Signals)?;
    serve(listener, fake.router(args.max_body_bytes), shutdown).await
}

#[cfg(test)]
mod tests {
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
}
