//! The shared vocabulary: turn requests, normalized events, health and terminal control frames.
//!
//! Every layer (the in-sandbox harness server, the orchestrator, the CLI client) speaks these types.
//! This module holds data and pure helpers only; it must not do I/O or know any harness protocol.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The kinds of event a turn produces, whatever agent runs behind the harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    Text,
    Reasoning,
    ToolUse,
    ToolResult,
    StepStart,
    StepFinish,
    InputRequired,
    Error,
    Done,
}

impl EventType {
    /// The name used on the wire (`event:` line of SSE, `type` field of JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Text => "text",
            EventType::Reasoning => "reasoning",
            EventType::ToolUse => "tool_use",
            EventType::ToolResult => "tool_result",
            EventType::StepStart => "step_start",
            EventType::StepFinish => "step_finish",
            EventType::InputRequired => "input_required",
            EventType::Error => "error",
            EventType::Done => "done",
        }
    }

    /// `done` and `error` end a turn; nothing follows them.
    pub fn is_terminal(self) -> bool {
        matches!(self, EventType::Done | EventType::Error)
    }
}

/// One event of a turn as the harness server emits it. The orchestrator wraps it in the session
/// envelope (`id`, `seq`, `session_id`) when it records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnEvent {
    pub turn_id: String,
    /// Position within the turn, from 0, gap-free.
    pub index: u64,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// RFC 3339 time the harness server produced the event.
    pub ts: String,
    pub data: serde_json::Value,
}

/// Token counts of a turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

/// Stable codes carried by `error` events (`data.code`).
pub mod error_code {
    /// The agent process exited while the turn ran.
    pub const AGENT_EXITED: &str = "agent_exited";
    /// The agent answered the prompt with an error.
    pub const AGENT_ERROR: &str = "agent_error";
    /// The turn ran past its timeout and was cancelled.
    pub const TIMEOUT: &str = "timeout";
    /// A client cancelled the turn and the agent did not acknowledge it in time.
    pub const CANCELLED: &str = "cancelled";
    /// The harness server is shutting down.
    pub const SHUTDOWN: &str = "shutdown";
}

/// `text` cut to at most `max` bytes on a character boundary, with `…` marking a cut: for text
/// that comes from a sandbox (stderr lines, reasons) and is kept or shown.
pub fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The harness's problem type for a turn sent to an agent that could not start or has died
/// (`503`, with its reason in `detail`): the orchestrator takes it to mean the session is dead.
pub const AGENT_FAILED: &str = "agent_failed";

/// The harness's problem type for a cancel that found no turn running (`409`).
pub const NO_TURN_RUNNING: &str = "no_turn_running";

/// One part of a user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Part {
    Text {
        text: String,
    },
    /// An image, inline (`data`: base64) or by reference (`url`).
    Image {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mime_type: Option<String>,
    },
    /// A file, inline as UTF-8 `text` or base64 `data`, or by `url`.
    File {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mime_type: Option<String>,
    },
}

/// `POST /v1/turns` on the harness server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRequest {
    /// Chosen by the caller so it can correlate; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<String>,
    pub parts: Vec<Part>,
    /// Overrides the server's turn timeout for this turn (capped by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// Agent settings to apply before the prompt; they stay in force for later turns.
    #[serde(default, skip_serializing_if = "TurnOptions::is_empty")]
    pub options: TurnOptions,
}

/// The per-message agent settings of the public API, passed through to the harness, which maps
/// them onto the agent's advertised ACP session configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnOptions {
    /// A model the agent offers, by its id or its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Extended thinking on or off, where the agent offers a thought-level setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<bool>,
    /// An agent mode the agent offers (e.g. "plan"), by its id or its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl TurnOptions {
    pub fn is_empty(&self) -> bool {
        self.model.is_none() && self.thinking.is_none() && self.agent.is_none()
    }

    /// Checks what serde cannot: returns a message saying how to fix the request.
    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [("model", &self.model), ("agent", &self.agent)] {
            if let Some(v) = value
                && (v.trim().is_empty() || v.len() > 200)
            {
                return Err(format!(
                    "`{field}` must be 1 to 200 characters: the id or name of a {field} the agent offers"
                ));
            }
        }
        Ok(())
    }
}

impl TurnRequest {
    /// Checks what serde cannot: returns a message saying how to fix the request.
    pub fn validate(&self) -> Result<(), String> {
        if self.parts.is_empty() {
            return Err("`parts` is empty: send at least one part, e.g. \
                        {\"parts\":[{\"type\":\"text\",\"text\":\"hello\"}]}"
                .into());
        }
        if self.parts.len() > MAX_PARTS {
            return Err(too_many_parts());
        }
        if let Some(id) = &self.turn_id {
            validate_id("turn_id", id)?;
        }
        if self.timeout_s == Some(0) {
            return Err("`timeout_s` must be at least 1 second".into());
        }
        self.options.validate()?;
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Text { text } if text.trim().is_empty() => {
                    return Err(format!("parts[{i}]: `text` is empty; send some text"));
                }
                Part::Image { data, url, .. } => {
                    if data.is_some() == url.is_some() {
                        return Err(format!(
                            "parts[{i}]: an image needs exactly one of `data` (base64) or `url`"
                        ));
                    }
                    if data.is_some()
                        && !matches!(part, Part::Image { mime_type: Some(m), .. } if m.starts_with("image/"))
                    {
                        return Err(format!(
                            "parts[{i}]: an inline image needs `mime_type`, e.g. \"image/png\""
                        ));
                    }
                }
                Part::File {
                    text, data, url, ..
                } => {
                    let given = [text.is_some(), data.is_some(), url.is_some()];
                    if given.iter().filter(|g| **g).count() != 1 {
                        return Err(format!(
                            "parts[{i}]: a file needs exactly one of `text`, `data` (base64) or `url`"
                        ));
                    }
                }
                Part::Text { .. } => {}
            }
        }
        Ok(())
    }
}

/// Compares secrets without an early exit, so timing does not reveal how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Ids chosen by callers end up in URLs and logs: keep them short and plain.
/// The most parts one message may have (text, images, files): a message of many tiny parts
/// costs far more memory than its bytes.
pub const MAX_PARTS: usize = 256;

fn too_many_parts() -> String {
    format!(
        "a message has at most {MAX_PARTS} parts; join texts into one part, or send fewer files"
    )
}

/// Most members of one JSON object in a message body.
const MAX_MEMBERS: usize = 1024;

/// Any JSON value whose arrays have at most `MAX_PARTS` elements and whose objects at most
/// `MAX_MEMBERS` members: one past the bound is refused as it is read, before the rest is
/// parsed (a body of 400,000 tiny parts would otherwise take 70 times its size in memory).
pub struct Capped(pub serde_json::Value);

impl<'de> Deserialize<'de> for Capped {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        use serde_json::Value;
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Capped;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<Capped, E> {
                Ok(Capped(Value::Bool(v)))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Capped, E> {
                Ok(Capped(v.into()))
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<Capped, E> {
                Ok(Capped(v.into()))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<Capped, E> {
                Ok(Capped(v.into()))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Capped, E> {
                Ok(Capped(Value::String(v.to_string())))
            }
            fn visit_string<E: Error>(self, v: String) -> Result<Capped, E> {
                Ok(Capped(Value::String(v)))
            }
            fn visit_unit<E: Error>(self) -> Result<Capped, E> {
                Ok(Capped(Value::Null))
            }
            fn visit_none<E: Error>(self) -> Result<Capped, E> {
                Ok(Capped(Value::Null))
            }
            fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Capped, D2::Error> {
                Capped::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Capped, A::Error> {
                let mut out = Vec::new();
                while let Some(Capped(v)) = seq.next_element()? {
                    if out.len() == MAX_PARTS {
                        return Err(A::Error::custom(too_many_parts()));
                    }
                    out.push(v);
                }
                Ok(Capped(Value::Array(out)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Capped, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((k, Capped(v))) = map.next_entry::<String, Capped>()? {
                    if out.len() == MAX_MEMBERS {
                        return Err(A::Error::custom(format!(
                            "an object in a message has at most {MAX_MEMBERS} members"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(Capped(Value::Object(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// An optional JSON value read as `Capped` (`message`, `content`).
pub fn capped<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde_json::Value>, D::Error> {
    Ok(Option::<Capped>::deserialize(d)?.map(|c| c.0))
}

/// An optional JSON array of parts read as `Capped`.
pub fn capped_parts<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<serde_json::Value>>, D::Error> {
    match capped(d)? {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Array(parts)) => Ok(Some(parts)),
        Some(_) => Err(serde::de::Error::custom(
            "`parts` must be an array of parts, e.g. [{\"type\":\"text\",\"text\":\"hello\"}]",
        )),
    }
}

pub fn validate_id(field: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{field}` must be 1-128 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

/// A setting a message may choose (its `model`, `agent` or `thinking`) and what the agent offers
/// for it, as the agent last reported (`GET /v1/options` of the harness).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOption {
    /// The message field that chooses it: `model`, `agent` or `thinking`.
    pub id: String,
    /// The agent's name for the setting.
    pub name: String,
    /// The value in force now (an id of `values`), when the agent says.
    #[serde(default)]
    pub current: Option<String>,
    /// What may be chosen (by id or, case-insensitively, by name).
    pub values: Vec<OptionValue>,
}

/// One choice of an [`AgentOption`].
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionValue {
    pub id: String,
    pub name: String,
}

/// What an API session's agent offers.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOptions {
    pub options: Vec<AgentOption>,
}

/// How a client answers an `input_required` event.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Allow this one action.
    ApproveOnce,
    /// Allow this action and the like of it for the rest of the session.
    ApproveSession,
    /// Refuse it.
    Deny,
}

/// `POST /v1/inputs/{request_id}`: a permission request's answer (a decision or one of the
/// offered option ids), or a client tool call's result (`output`, with `is_error`).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub option_id: Option<String>,
    /// A client tool call's result, as text for the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Whether `output` reports the tool's failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_error: bool,
}

/// Most client tools one session may offer its agent.
pub const MAX_CLIENT_TOOLS: usize = 32;

/// The name of the MCP server a session's client tools are offered under.
pub const CLIENT_TOOLS_SERVER: &str = "client";

/// A tool the client defines and runs itself (Anthropic `custom`, OpenAI `function`): offered
/// to the agent through an MCP server the harness hosts for the session. A call becomes an
/// `input_required` event carrying `client_tool {name, input}`, answered with the result
/// (`InputAnswer.output`).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientToolSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the tool's input (an object schema).
    #[serde(default = "empty_object_schema")]
    pub input_schema: serde_json::Value,
}

fn empty_object_schema() -> serde_json::Value {
    serde_json::json!({"type": "object"})
}

impl ClientToolSpec {
    /// Checks the name (1-64 of `[A-Za-z0-9_-]`), the description and the schema's size.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(format!(
                "client tool name {:?}: 1-64 letters, digits, '_' or '-'",
                self.name
            ));
        }
        if self.description.len() > 4096 {
            return Err(format!(
                "client tool {}: the description is over 4 KiB",
                self.name
            ));
        }
        let object_type =
            self.input_schema["type"].is_null() || self.input_schema["type"] == "object";
        if !self.input_schema.is_object()
            || !object_type
            || self.input_schema.to_string().len() > 16 * 1024
        {
            return Err(format!(
                "client tool {}: input_schema is a JSON Schema object of at most 16 KiB",
                self.name
            ));
        }
        Ok(())
    }
}

/// A file written into the sandbox by late binding.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindFile {
    /// Relative to the working directory; `..` is refused.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// Unix permission bits, e.g. 384 (0o600). Default 0o644.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// Why a terminal session takes no `mcp_servers`.
pub const TUI_MCP: &str = "mcp_servers are handed to API agents over ACP; a terminal program \
    reads its MCP configuration from its own files (write them with `files`)";

/// Why a terminal session takes no client tools.
pub const TUI_CLIENT_TOOLS: &str = "client_tools are offered to API agents through an MCP server; \
    a terminal program has no turn for a client to answer a call in";

/// Why a terminal session takes no instructions.
pub const TUI_INSTRUCTIONS: &str = "instructions are handed to API agents over ACP; a terminal \
    program reads its standing instructions from its own files (write them with `files`, e.g. \
    CLAUDE.md or AGENTS.md)";

/// The largest `instructions` a session may be given, in bytes (escaped for an agent's
/// command line, e.g. codex's `-c`, they stay within one argument's 128 KiB).
pub const MAX_INSTRUCTIONS_BYTES: usize = 32 * 1024;

/// Most MCP servers one session may be given.
pub const MAX_MCP_SERVERS: usize = 20;

/// An MCP server the agent is given when its session starts (ACP `session/new`'s `mcpServers`):
/// a program the agent starts in the sandbox (`stdio`: `command`, `args`, `env`), or a server it
/// reaches over the network (`http` or `sse`: `url`, `headers`), which the sandbox's egress policy
/// governs as any connection. `env` values and `headers` may be secrets: never logged or stored.
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerSpec {
    pub name: String,
    /// `stdio` (the default), `http` or `sse`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl McpServerSpec {
    /// `stdio`, `http` or `sse`, checked against the fields given; the message says what to fix.
    pub fn transport(&self) -> Result<&'static str, String> {
        let name = &self.name;
        let kind = match self.kind.as_deref() {
            None | Some("stdio") => "stdio",
            Some("http") => "http",
            Some("sse") => "sse",
            Some(other) => {
                return Err(format!(
                    "mcp_servers {name:?}: type {other:?} is not one of stdio, http, sse"
                ));
            }
        };
        if kind == "stdio" {
            if self.command.as_deref().is_none_or(|c| c.trim().is_empty()) {
                return Err(format!(
                    "mcp_servers {name:?}: a stdio server needs `command` (or give `type` http \
                     or sse with a `url`)"
                ));
            }
            if self.url.is_some() || !self.headers.is_empty() {
                return Err(format!(
                    "mcp_servers {name:?}: `url` and `headers` are for http and sse servers"
                ));
            }
        } else {
            let url = self.url.as_deref().unwrap_or("");
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
                return Err(format!(
                    "mcp_servers {name:?}: a {kind} server needs an http:// or https:// `url`"
                ));
            }
            if self.command.is_some() || !self.args.is_empty() || !self.env.is_empty() {
                return Err(format!(
                    "mcp_servers {name:?}: `command`, `args` and `env` are for stdio servers"
                ));
            }
        }
        Ok(kind)
    }
}

impl std::fmt::Debug for McpServerSpec {
    // Env values and headers may be secrets: names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServerSpec")
            .field("name", &self.name)
            .field("type", &self.kind)
            .field("command", &self.command)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// `POST /v1/bind`: per-session values handed to a warm sandbox at claim time. Never logged.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindRequest {
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub files: Vec<BindFile>,
    /// Working directory for the agent; relative paths are under the server's workdir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// MCP servers for the agent's session (API sandboxes only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_servers: Vec<McpServerSpec>,
    /// Tools the client runs itself, offered to the agent (API sandboxes only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_tools: Vec<ClientToolSpec>,
    /// Standing instructions for the agent, added to its own system prompt (API sandboxes only;
    /// docs/harness.md says how each agent gets them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
}

/// A non-empty relative path that stays inside the directory it is relative to: no `..`, no
/// root, no NUL.
pub fn is_inside(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && std::path::Path::new(path).components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

impl BindRequest {
    /// Checks names, paths and contents (what needs no sandbox); the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        use base64::Engine;
        for (name, value) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(format!(
                    "env name {name:?} is not valid: names are non-empty and hold no '=' or NUL"
                ));
            }
            if name.starts_with("SANDWARDEN_") {
                return Err(format!(
                    "env name {name:?} is reserved: SANDWARDEN_* variables never reach the agent"
                ));
            }
            if value.contains('\0') {
                return Err(format!("env {name}: the value holds a NUL byte"));
            }
        }
        for (i, file) in self.files.iter().enumerate() {
            if !is_inside(&file.path) {
                return Err(format!(
                    "files[{i}].path {:?} must be a relative path inside the working directory (no '..', not absolute)",
                    file.path
                ));
            }
            let names_a_file = file.path.len() <= 1024
                && !file.path.ends_with('/')
                && std::path::Path::new(&file.path)
                    .components()
                    .next_back()
                    .is_some_and(|c| matches!(c, std::path::Component::Normal(_)))
                && file.path.split('/').all(|c| c.len() <= 255);
            if !names_a_file {
                return Err(format!(
                    "files[{i}].path must name a file (not `.` or a directory), at most 1024 \
                     bytes with names of at most 255: {:?}",
                    file.path.chars().take(64).collect::<String>()
                ));
            }
            match (&file.content, &file.content_base64) {
                (Some(_), None) => {}
                (None, Some(b64)) => {
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| {
                            format!("files[{i}].content_base64 is not valid base64: {e}")
                        })?;
                }
                _ => {
                    return Err(format!(
                        "files[{i}] needs exactly one of `content` (UTF-8) or `content_base64`"
                    ));
                }
            }
            if file.mode.is_some_and(|m| m > 0o7777) {
                return Err(format!(
                    "files[{i}].mode is not a permission mode (at most 0o7777 = 4095)"
                ));
            }
        }
        if let Some(cwd) = &self.cwd
            && !is_inside(cwd)
        {
            return Err(
                "`cwd` must be a relative path inside the sandbox's working directory (no '..', not absolute), e.g. \"src/app\""
                    .into(),
            );
        }
        if self.mcp_servers.len() > MAX_MCP_SERVERS {
            return Err(format!(
                "at most {MAX_MCP_SERVERS} mcp_servers per session ({} given)",
                self.mcp_servers.len()
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for server in &self.mcp_servers {
            let name = &server.name;
            if name.trim().is_empty() || name.len() > 64 || name.contains('\0') {
                return Err(format!(
                    "mcp_servers name {name:?} is not valid: 1 to 64 characters, no NUL"
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(format!("mcp_servers name {name:?} is given twice"));
            }
            server.transport()?;
            let texts = server.args.iter().chain(server.env.values());
            if server
                .env
                .keys()
                .chain(server.headers.keys())
                .chain(texts)
                .any(|t| t.contains('\0'))
            {
                return Err(format!("mcp_servers {name:?}: a value holds a NUL byte"));
            }
        }
        if !self.client_tools.is_empty() && names.contains(CLIENT_TOOLS_SERVER) {
            return Err(format!(
                "mcp_servers name {CLIENT_TOOLS_SERVER:?} is taken by the client tools: rename it"
            ));
        }
        if self.client_tools.len() > MAX_CLIENT_TOOLS {
            return Err(format!(
                "at most {MAX_CLIENT_TOOLS} client_tools per session ({} given)",
                self.client_tools.len()
            ));
        }
        let mut tools = std::collections::BTreeSet::new();
        for tool in &self.client_tools {
            tool.validate()?;
            if !tools.insert(tool.name.as_str()) {
                return Err(format!("client tool {:?} is given twice", tool.name));
            }
        }
        if let Some(text) = &self.instructions {
            if text.len() > MAX_INSTRUCTIONS_BYTES {
                return Err(format!(
                    "`instructions` are at most {} KiB ({} bytes given)",
                    MAX_INSTRUCTIONS_BYTES / 1024,
                    text.len()
                ));
            }
            if text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
            {
                return Err(
                    "`instructions` hold a control character (only newlines and tabs may be in \
                     them)"
                        .into(),
                );
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.env.is_empty()
            && self.files.is_empty()
            && self.cwd.is_none()
            && self.mcp_servers.is_empty()
            && self.client_tools.is_empty()
            && self.instructions.is_none()
    }
}

impl std::fmt::Debug for BindRequest {
    // Values may be secrets: show names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BindRequest")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field(
                "files",
                &self.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
            )
            .field("cwd", &self.cwd)
            .field("mcp_servers", &self.mcp_servers)
            .field(
                "client_tools",
                &self
                    .client_tools
                    .iter()
                    .map(|t| &t.name)
                    .collect::<Vec<_>>(),
            )
            .field(
                "instructions_bytes",
                &self.instructions.as_ref().map(String::len),
            )
            .finish()
    }
}

/// Boot phase reported by the harness server's health route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The server is up; the agent waits for `/v1/bind` (templates that start at claim time).
    Standby,
    /// The agent or program is being started.
    Starting,
    /// Ready for turns (API) or attaches (TUI).
    Ready,
    /// The agent could not start or died; see `reason`.
    Failed,
    /// The TUI program ended by itself; see `exit`.
    Exited,
}

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitStatus {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(sig)) => write!(f, "killed by signal {sig}"),
            (None, None) => write!(f, "unknown exit status"),
        }
    }
}

/// `GET /healthz` of the harness server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub phase: Phase,
    /// `api` or `tui`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    /// Last lines the agent wrote to stderr (API kind, when it failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stderr_tail: Vec<String>,
    /// The turn running now, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<String>,
    /// Whether per-session values were bound, and whether the sandbox has been used yet.
    pub bound: bool,
    pub used: bool,
    /// Terminal clients attached now (TUI kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewers: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<serde_json::Value>,
}

/// Drops a UTF-8 byte-order mark from the start of an SSE byte stream, however it is split
/// across chunks. eventsource-stream 0.2.3 (the latest) panics on one: it slices one byte off a
/// three-byte character. The stream comes from another process (a sandbox, a server), so its
/// first bytes are outside input. Found by tests/light/fuzz.rs (`sse_decode`).
pub fn without_bom<S, E>(stream: S) -> impl futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
{
    use futures::StreamExt;
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    struct State<S, E> {
        stream: S,
        /// Bytes held back while the start is undecided (fewer than a BOM, all of a BOM so far).
        head: Vec<u8>,
        decided: bool,
        /// Whether the one BOM the format allows was dropped.
        stripped: bool,
        /// What the stream said after the head: handed on once the head is.
        queued: Option<Result<bytes::Bytes, E>>,
        ended: bool,
    }
    let start = State {
        stream,
        head: Vec::new(),
        decided: false,
        stripped: false,
        queued: None,
        ended: false,
    };
    Box::pin(futures::stream::unfold(start, |mut st| async move {
        loop {
            if let Some(item) = st.queued.take() {
                return Some((item, st));
            }
            if st.ended {
                return None;
            }
            if st.decided {
                let item = st.stream.next().await?;
                return Some((item, st));
            }
            let more = match st.stream.next().await {
                Some(Ok(chunk)) => {
                    st.head.extend_from_slice(&chunk);
                    true
                }
                Some(Err(e)) => {
                    st.queued = Some(Err(e));
                    false
                }
                None => {
                    st.ended = true;
                    false
                }
            };
            if !st.stripped && st.head.starts_with(BOM) {
                st.head.drain(..BOM.len());
                st.stripped = true;
            }
            if more && st.head.len() < BOM.len() && BOM.starts_with(&st.head) {
                continue;
            }
            st.decided = true;
            let mut head = std::mem::take(&mut st.head);
            if head.starts_with(BOM) {
                // A second BOM is text, the start of a field name no event has: the line is
                // ignored. As a comment line it is ignored the same way, without the panic.
                head.insert(0, b':');
            }
            if !head.is_empty() {
                return Some((Ok(bytes::Bytes::from(head)), st));
            }
        }
    }))
}

#[cfg(test)]
mod bom_tests {
    use super::without_bom;
    use futures::StreamExt;

    fn run(chunks: &[&[u8]]) -> Vec<u8> {
        let items: Vec<Result<bytes::Bytes, ()>> = chunks
            .iter()
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        futures::executor::block_on(
            without_bom(futures::stream::iter(items))
                .map(|c| c.expect("no errors here").to_vec())
                .concat(),
        )
    }

    #[test]
    fn a_leading_bom_is_dropped_however_it_is_split() {
        let whole: &[u8] = b"\xEF\xBB\xBFdata: x\n\n";
        assert_eq!(run(&[whole]), b"data: x\n\n");
        assert_eq!(
            run(&[&whole[..1], &whole[1..2], &whole[2..]]),
            b"data: x\n\n"
        );
        assert_eq!(run(&[&whole[..2], &[], &whole[2..]]), b"data: x\n\n");
        assert_eq!(run(&[&whole[..3]]), b"");
        assert_eq!(
            run(&[b"\xEF\xBB"]),
            b"\xEF\xBB",
            "half a BOM at the end is kept"
        );
        assert_eq!(
            run(&[b"da", b"ta: \xEF\xBB\xBF\n"]),
            b"data: \xEF\xBB\xBF\n"
        );
        assert_eq!(run(&[]), b"");
        let two: &[u8] = b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n";
        assert_eq!(
            run(&[two]),
            b":\xEF\xBB\xBFdata: x\n",
            "a second BOM is a comment"
        );
        assert_eq!(run(&[&two[..4], &two[4..]]), b":\xEF\xBB\xBFdata: x\n");
    }

    #[test]
    fn errors_still_arrive_after_the_head() {
        let items: Vec<Result<bytes::Bytes, &str>> =
            vec![Ok(bytes::Bytes::from_static(b"\xEF")), Err("reset")];
        let got: Vec<Result<bytes::Bytes, &str>> =
            futures::executor::block_on(without_bom(futures::stream::iter(items)).collect());
        assert_eq!(
            got,
            vec![Ok(bytes::Bytes::from_static(b"\xEF")), Err("reset")]
        );
    }
}

/// JSON control frames on the terminal WebSocket (text frames; binary frames are raw bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Client → server: set the terminal size.
    Resize { cols: u16, rows: u16 },
    /// Client → server: liveness; answered with `pong`.
    Ping,
    /// Server → client.
    Pong,
    /// Server → client: the program ended; a normal close follows.
    Exit {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
    },
    /// Server → client: a control frame was not understood; the connection stays open.
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(json: &str) -> TurnRequest {
        serde_json::from_str(json).expect("valid turn json")
    }

    #[test]
    fn accepts_text_and_images() {
        let t = turn(
            r#"{"parts":[{"type":"text","text":"hi"},
                {"type":"image","data":"aGk=","mime_type":"image/png"},
                {"type":"image","url":"https://example.com/a.png"}]}"#,
        );
        assert_eq!(t.validate(), Ok(()));
    }

    #[test]
    fn rejects_empty_parts_and_blank_text() {
        assert!(
            turn(r#"{"parts":[]}"#)
                .validate()
                .expect_err("should be refused")
                .contains("empty")
        );
        assert!(
            turn(r#"{"parts":[{"type":"text","text":"  "}]}"#)
                .validate()
                .expect_err("should be refused")
                .contains("parts[0]")
        );
    }

    #[test]
    fn rejects_image_without_a_source_or_type() {
        let e = turn(r#"{"parts":[{"type":"image"}]}"#)
            .validate()
            .expect_err("should be refused");
        assert!(e.contains("exactly one of"), "{e}");
        let e = turn(r#"{"parts":[{"type":"image","data":"aGk="}]}"#)
            .validate()
            .expect_err("should be refused");
        assert!(e.contains("mime_type"), "{e}");
    }

    #[test]
    fn rejects_bad_turn_ids() {
        let e = turn(r#"{"turn_id":"a b","parts":[{"type":"text","text":"x"}]}"#)
            .validate()
            .expect_err("should be refused");
        assert!(e.contains("turn_id"), "{e}");
    }

    #[test]
    fn bind_debug_hides_values() {
        let b = BindRequest {
            env: [("API_KEY".to_string(), "sk-secret".to_string())].into(),
            ..Default::default()
        };
        let shown = format!("{b:?}");
        assert!(
            shown.contains("API_KEY") && !shown.contains("sk-secret"),
            "{shown}"
        );
    }

    #[test]
    fn control_frames_round_trip() {
        let c: Control = serde_json::from_str(r#"{"type":"resize","cols":120,"rows":40}"#)
            .expect("resize parses");
        assert_eq!(
            c,
            Control::Resize {
                cols: 120,
                rows: 40
            }
        );
        let exit = serde_json::to_string(&Control::Exit {
            code: Some(0),
            signal: None,
        })
        .expect("serializes");
        assert_eq!(exit, r#"{"type":"exit","code":0}"#);
    }
}
