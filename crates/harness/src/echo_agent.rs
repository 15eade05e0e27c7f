//! `sandwarden echo-agent`: a deterministic ACP agent over stdio, for tests and for trying
//! sandwarden without a model key.
//!
//! It echoes the user's text back in several chunks. A message that starts with one of these
//! commands does something else instead (documented in the README):
//!
//! | command        | what the agent does                                                        |
//! |----------------|----------------------------------------------------------------------------|
//! | `/tool TEXT`   | a `read` tool call with its result, then echoes TEXT                       |
//! | `/ask TEXT`    | asks permission (`session/request_permission`), reports the answer         |
//! | `/think TEXT`  | streams a thought (reasoning) before the echo                              |
//! | `/slow N TEXT` | streams N chunks 100 ms apart (default 50): something to cancel            |
//! | `/fail TEXT`   | answers the prompt with a JSON-RPC error carrying TEXT                     |
//! | `/crash [N]`   | writes a line to stderr and exits with code N (default 3)                  |
//! | `/env NAME`    | replies with the value of environment variable NAME (late-binding tests)   |
//! | `/cwd`         | replies with its working directory                                         |
//! | `/cat PATH`    | replies with the contents of PATH                                          |
//! | `/write P TEXT`| writes TEXT to the file P of its working directory                        |
//! | `/config`      | replies with its current settings, e.g. `model=echo-small thinking=off ...`|
//! | `/mcp`         | replies with the MCP servers its session was given (names, transports, and  |
//! |                | how many args, env vars and headers: never their values)                   |
//! | `/system`      | replies with the system prompt its session was given (ACP `systemPrompt`,  |
//! |                | mode `append`), or says there is none                                      |
//!
//! It offers three ACP session settings so clients' `model`, `thinking` and `agent` options can
//! be tested: `model` (`echo-small`, `echo-large`), `thinking` (`off`, `low`, `high`) and `mode`
//! (`default`, `plan`).
//!
//! It must not depend on anything of the orchestrator: it is a stand-in for a third-party agent.

use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::ConnectionTo;
use agent_client_protocol::v1::schema::Implementation;
use agent_client_protocol::v1::schema::{
    AgentCapabilities, CancelNotification, ContentBlock, ContentChunk, InitializeRequest,
    InitializeResponse, McpCapabilities, McpServer, NewSessionRequest, NewSessionResponse,
    PermissionOption, PermissionOptionKind, PromptCapabilities, PromptRequest, PromptResponse,
    RequestPermissionOutcome, RequestPermissionRequest, SessionCapabilities, SessionConfigKind,
    SessionConfigOption, SessionConfigOptionCategory, SessionConfigSelect,
    SessionConfigSelectOption, SessionNotification, SessionSystemPromptCapabilities, SessionUpdate,
    SetSessionConfigOptionRequest, SetSessionConfigOptionResponse, StopReason, SystemPromptMode,
    TextContent, ToolCall, ToolCallContent, ToolCallStatus, ToolCallUpdate, ToolCallUpdateFields,
    ToolKind, Usage,
};
use agent_client_protocol::{Agent, ByteStreams, Client};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

/// Delay between chunks of `/slow`.
const SLOW_CHUNK_DELAY: Duration = Duration::from_millis(100);

/// What a prompt asks the echo agent to do, parsed from its text. Pure, so it has unit tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    Echo(String),
    Tool(String),
    Ask(String),
    Think(String),
    Slow {
        chunks: u32,
        text: String,
    },
    Fail(String),
    Crash(i32),
    Env(String),
    Cwd,
    Cat(String),
    Config,
    Mcp,
    System,
    /// Writes a file of its working directory: path, text.
    Write(String, String),
    /// Calls a client tool through the session's client-tools MCP server: name, JSON input.
    CallTool(String, String),
}

impl Script {
    pub fn parse(text: &str) -> Script {
        let text = text.trim();
        let (command, rest) = match text.split_once(char::is_whitespace) {
            Some((c, r)) => (c, r.trim()),
            None => (text, ""),
        };
        let rest_or = |default: &str| {
            if rest.is_empty() {
                default.to_string()
            } else {
                rest.to_string()
            }
        };
        match command {
            "/tool" => Script::Tool(rest_or("tool done")),
            "/ask" => Script::Ask(rest_or("may I?")),
            "/think" => Script::Think(rest_or("thought about it")),
            "/slow" => {
                let (n, text) = match rest.split_once(char::is_whitespace) {
                    Some((n, t)) => (n, t.trim()),
                    None => (rest, ""),
                };
                match n.parse::<u32>() {
                    Ok(chunks) => Script::Slow {
                        chunks: chunks.clamp(1, 10_000),
                        text: if text.is_empty() {
                            "tick".into()
                        } else {
                            text.into()
                        },
                    },
                    Err(_) => Script::Slow {
                        chunks: 50,
                        text: rest_or("tick"),
                    },
                }
            }
            "/fail" => Script::Fail(rest_or("the echo agent was asked to fail")),
            "/crash" => Script::Crash(rest.parse().unwrap_or(3)),
            "/env" => Script::Env(rest.to_string()),
            "/cwd" => Script::Cwd,
            "/cat" => Script::Cat(rest.to_string()),
            "/write" => {
                let (path, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                Script::Write(path.to_string(), text.trim().to_string())
            }
            "/config" => Script::Config,
            "/mcp" => Script::Mcp,
            "/system" => Script::System,
            "/calltool" => {
                let (name, input) = rest.split_once(char::is_whitespace).unwrap_or((rest, "{}"));
                Script::CallTool(name.to_string(), input.trim().to_string())
            }
            _ => Script::Echo(text.to_string()),
        }
    }
}

/// Splits text into up to `n` chunks at word boundaries, keeping every byte.
pub fn chunks(text: &str, n: usize) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    if words.is_empty() {
        return Vec::new();
    }
    let per = words.len().div_ceil(n.max(1));
    words.chunks(per).map(|c| c.concat()).collect()
}

fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The settings the agent offers: id, category, values (the first is the default).
const SETTINGS: [(&str, SessionConfigOptionCategory, &[&str]); 3] = [
    (
        "model",
        SessionConfigOptionCategory::Model,
        &["echo-small", "echo-large"],
    ),
    (
        "thinking",
        SessionConfigOptionCategory::ThoughtLevel,
        &["off", "low", "high"],
    ),
    (
        "mode",
        SessionConfigOptionCategory::Mode,
        &["default", "plan"],
    ),
];

type Settings = BTreeMap<&'static str, String>;

fn default_settings() -> Settings {
    SETTINGS
        .iter()
        .map(|(id, _, values)| (*id, values[0].to_string()))
        .collect()
}

/// The settings as ACP advertises them, with their current values.
fn config_options(current: &Settings) -> Vec<SessionConfigOption> {
    SETTINGS
        .iter()
        .map(|(id, category, values)| {
            let choices: Vec<SessionConfigSelectOption> = values
                .iter()
                .map(|v| SessionConfigSelectOption::new(*v, *v))
                .collect();
            let value = current
                .get(id)
                .cloned()
                .unwrap_or_else(|| values[0].to_string());
            SessionConfigOption::new(
                *id,
                *id,
                SessionConfigKind::Select(SessionConfigSelect::new(value, choices)),
            )
            .category(category.clone())
        })
        .collect()
}

#[derive(Default)]
struct State {
    next_session: AtomicU64,
    /// Cancellation of the prompt running in each session.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Each session's settings.
    settings: Mutex<HashMap<String, Settings>>,
    /// The MCP servers each session was given, described.
    mcp: Mutex<HashMap<String, String>>,
    /// Each session's client-tools MCP server: its URL and headers.
    client_tools: Mutex<HashMap<String, ToolServer>>,
    /// The system prompt each session was given, if any.
    system: Mutex<HashMap<String, String>>,
}

/// What a session was given at its start, for the commands that report it.
struct Given {
    mcp: String,
    tools: Option<ToolServer>,
    system: Option<String>,
}

/// Where a session's client tools are called.
#[derive(Clone, Default)]
struct ToolServer {
    url: String,
    headers: Vec<(String, String)>,
}

impl State {
    /// Sets one setting; the error says what is offered.
    fn set(&self, req: &SetSessionConfigOptionRequest) -> Result<Settings, String> {
        let id = &*req.config_id.0;
        let (key, _, values) = SETTINGS
            .iter()
            .find(|(k, _, _)| *k == id)
            .ok_or_else(|| format!("no setting {id:?}"))?;
        let value = req
            .value
            .as_value_id()
            .map(|v| v.0.to_string())
            .filter(|v| values.contains(&v.as_str()))
            .ok_or_else(|| format!("{id} must be one of {values:?}"))?;
        let mut all = lock(&self.settings);
        let current = all
            .entry(req.session_id.to_string())
            .or_insert_with(default_settings);
        current.insert(key, value);
        Ok(current.clone())
    }

    fn describe(&self, session: &str) -> String {
        let all = lock(&self.settings);
        let current = all.get(session).cloned().unwrap_or_else(default_settings);
        current
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Runs the echo agent on this process's stdin/stdout until stdin closes.
pub async fn run() -> anyhow::Result<()> {
    let state = Arc::new(State::default());
    let transport = ByteStreams::new(
        tokio::io::stdout().compat_write(),
        tokio::io::stdin().compat(),
    );
    let on_prompt = state.clone();
    let on_cancel = state.clone();
    Agent
        .v1()
        .name("sandwarden-echo-agent")
        .on_receive_request(
            async move |init: InitializeRequest, responder, _cx| {
                let version = if init.protocol_version > ProtocolVersion::V1 {
                    ProtocolVersion::V1
                } else {
                    init.protocol_version
                };
                responder.respond(
                    InitializeResponse::new(version)
                        .agent_capabilities(
                            AgentCapabilities::new()
                                .prompt_capabilities(PromptCapabilities::new().image(true))
                                // HTTP MCP servers but not SSE, so both answers can be tested.
                                .mcp_capabilities(McpCapabilities::new().http(true))
                                // ACP's `systemPrompt` in `session/new`, mode `append`.
                                .session_capabilities(
                                    SessionCapabilities::new()
                                        .system_prompt(SessionSystemPromptCapabilities::new()),
                                ),
                        )
                        .agent_info(Implementation::new(
                            "sandwarden-echo-agent",
                            env!("CARGO_PKG_VERSION"),
                        )),
                )
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |req: NewSessionRequest, responder, _cx| {
                    let n = state.next_session.fetch_add(1, Ordering::Relaxed);
                    let current = default_settings();
                    let id = format!("echo-{n}");
                    lock(&state.mcp).insert(id.clone(), describe_mcp(&req.mcp_servers));
                    let tools = req.mcp_servers.iter().find_map(|s| match s {
                        McpServer::Http(h) if h.name == crate::event::CLIENT_TOOLS_SERVER => {
                            Some(ToolServer {
                                url: h.url.clone(),
                                headers: h
                                    .headers
                                    .iter()
                                    .map(|x| (x.name.clone(), x.value.clone()))
                                    .collect(),
                            })
                        }
                        _ => None,
                    });
                    if let Some(tools) = tools {
                        lock(&state.client_tools).insert(id.clone(), tools);
                    }
                    if let Some(system) = &req.system_prompt {
                        if system.mode != SystemPromptMode::Append {
                            return responder.respond_with_error(
                                agent_client_protocol::Error::invalid_params()
                                    .data("this agent takes system prompts in mode `append` only"),
                            );
                        }
                        let text = system
                            .content
                            .iter()
                            .filter_map(|b| match b {
                                ContentBlock::Text(t) => Some(t.text.as_str()),
                                _ => None,
                            })
                            .collect::<Vec<_>>()
                            .join("\n");
                        lock(&state.system).insert(id.clone(), text);
                    }
                    lock(&state.settings).insert(id.clone(), current.clone());
                    responder.respond(
                        NewSessionResponse::new(id).config_options(config_options(&current)),
                    )
                }
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |req: SetSessionConfigOptionRequest, responder, _cx| match state
                    .set(&req)
                {
                    Ok(current) => responder.respond(SetSessionConfigOptionResponse::new(
                        config_options(&current),
                    )),
                    Err(message) => responder.respond_with_error(
                        agent_client_protocol::Error::invalid_params().data(message),
                    ),
                }
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_request(
            async move |req: PromptRequest, responder, cx: ConnectionTo<Client>| {
                let state = on_prompt.clone();
                let session = req.session_id.to_string();
                let cancel = CancellationToken::new();
                lock(&state.running).insert(session.clone(), cancel.clone());
                // Prompts stream and may wait on the client: run them off the dispatch loop.
                let settings = state.describe(&session);
                let mcp = lock(&state.mcp).get(&session).cloned().unwrap_or_default();
                let given = Given {
                    mcp,
                    tools: lock(&state.client_tools).get(&session).cloned(),
                    system: lock(&state.system).get(&session).cloned(),
                };
                cx.clone().spawn(async move {
                    let result = prompt(&cx, req, &cancel, settings, given).await;
                    lock(&state.running).remove(&session);
                    match result {
                        Ok(response) => responder.respond(response),
                        Err(message) => responder.respond_with_error(
                            agent_client_protocol::Error::internal_error().data(message),
                        ),
                    }
                })
            },
            agent_client_protocol::on_receive_request!(),
        )
        .on_receive_notification(
            async move |cancel: CancelNotification, _cx| {
                if let Some(token) = lock(&on_cancel.running).get(&cancel.session_id.to_string()) {
                    token.cancel();
                }
                Ok(())
            },
            agent_client_protocol::on_receive_notification!(),
        )
        .connect_to(transport)
        .await?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Cx = ConnectionTo<Client>;

fn send(cx: &Cx, session: &PromptRequest, update: SessionUpdate) -> Result<(), String> {
    cx.send_notification(SessionNotification::new(session.session_id.clone(), update))
        .map_err(|e| format!("sending an update failed: {e}"))
}

fn text_block(text: impl Into<String>) -> ContentBlock {
    ContentBlock::Text(TextContent::new(text.into()))
}

fn say(cx: &Cx, req: &PromptRequest, text: &str, n_chunks: usize) -> Result<(), String> {
    for chunk in chunks(text, n_chunks) {
        send(
            cx,
            req,
            SessionUpdate::AgentMessageChunk(ContentChunk::new(text_block(chunk))),
        )?;
    }
    Ok(())
}

/// Calls `name` with `input` (JSON text) on the session's client-tools MCP server, as an MCP
/// client does (`initialize`, then `tools/call`); what the client answered, as the reply.
async fn call_client_tool(server: Option<&ToolServer>, name: &str, input: &str) -> String {
    let Some(server) = server else {
        return format!("tool {name}: this session has no client tools");
    };
    let input: serde_json::Value = match serde_json::from_str(input) {
        Ok(v) => v,
        Err(e) => return format!("tool {name}: the input is not JSON: {e}"),
    };
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-03-26", "capabilities": {},
                   "clientInfo": {"name": "echo-agent", "version": "1"}}});
    if let Err(e) = mcp_post(server, &init).await {
        return format!("tool {name}: the MCP server did not answer: {e}");
    }
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": name, "arguments": input}});
    match mcp_post(server, &call).await {
        Ok(answer) => {
            let result = &answer["result"];
            let text: String = result["content"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["text"].as_str())
                .collect();
            if result["isError"] == true {
                format!("tool {name} failed: {text}")
            } else if result.is_null() {
                format!("tool {name}: {}", answer["error"]["message"])
            } else {
                format!("tool {name} answered: {text}")
            }
        }
        Err(e) => format!("tool {name}: the call failed: {e}"),
    }
}

/// One JSON-RPC request to an MCP server over plain HTTP/1.1 (the sandbox's loopback).
async fn mcp_post(
    server: &ToolServer,
    body: &serde_json::Value,
) -> Result<serde_json::Value, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = server
        .url
        .strip_prefix("http://")
        .ok_or("only http:// servers")?;
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/".to_string()),
    };
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| e.to_string())?;
    let body = body.to_string();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for (k, v) in &server.headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))
}

/// The MCP servers a session was given, as `/mcp` says them: `none`, or one entry each, in the
/// order given, with counts instead of values.
fn describe_mcp(servers: &[McpServer]) -> String {
    if servers.is_empty() {
        return "mcp: none".into();
    }
    let each: Vec<String> = servers
        .iter()
        .map(|s| match s {
            McpServer::Stdio(s) => format!(
                "{} stdio {} args={} env={}",
                s.name,
                s.command.display(),
                s.args.len(),
                s.env.len()
            ),
            McpServer::Http(s) => format!("{} http {} headers={}", s.name, s.url, s.headers.len()),
            McpServer::Sse(s) => format!("{} sse {} headers={}", s.name, s.url, s.headers.len()),
            _ => "unknown".into(),
        })
        .collect();
    format!("mcp: {}", each.join("; "))
}

async fn prompt(
    cx: &Cx,
    req: PromptRequest,
    cancel: &CancellationToken,
    settings: String,
    given: Given,
) -> Result<PromptResponse, String> {
    let Given { mcp, tools, system } = given;
    let mut text = String::new();
    let mut images = 0;
    for block in &req.prompt {
        match block {
            ContentBlock::Text(t) => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&t.text);
            }
            ContentBlock::Image(_) => images += 1,
            _ => {}
        }
    }
    let input_tokens = word_count(&text) + images;
    let mut reply = String::new();
    let mut stop = StopReason::EndTurn;
    match Script::parse(&text) {
        Script::Echo(t) => reply = t,
        Script::Think(t) => {
            send(
                cx,
                &req,
                SessionUpdate::AgentThoughtChunk(ContentChunk::new(text_block(format!(
                    "thinking about: {t}"
                )))),
            )?;
            reply = t;
        }
        Script::Tool(t) => {
            let id = "echo-tool-1";
            send(
                cx,
                &req,
                SessionUpdate::ToolCall(
                    ToolCall::new(id, "read echo.txt")
                        .kind(ToolKind::Read)
                        .status(ToolCallStatus::InProgress)
                        .raw_input(serde_json::json!({"path": "echo.txt"})),
                ),
            )?;
            send(
                cx,
                &req,
                SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
                    id,
                    ToolCallUpdateFields::new()
                        .status(ToolCallStatus::Completed)
                        .content(vec![ToolCallContent::from(text_block(t.clone()))])
                        .raw_output(serde_json::json!({"content": t})),
                )),
            )?;
            reply = t;
        }
        Script::Ask(question) => {
            let id = "echo-ask-1";
            let tool = ToolCallUpdate::new(
                id,
                ToolCallUpdateFields::new()
                    .title(question.clone())
                    .kind(ToolKind::Execute)
                    .status(ToolCallStatus::Pending)
                    .raw_input(serde_json::json!({"question": question})),
            );
            send(
                cx,
                &req,
                SessionUpdate::ToolCall(
                    ToolCall::new(id, question.clone())
                        .kind(ToolKind::Execute)
                        .status(ToolCallStatus::Pending),
                ),
            )?;
            let options = vec![
                PermissionOption::new("allow-once", "Allow once", PermissionOptionKind::AllowOnce),
                PermissionOption::new(
                    "allow-always",
                    "Allow for this session",
                    PermissionOptionKind::AllowAlways,
                ),
                PermissionOption::new("reject-once", "Deny", PermissionOptionKind::RejectOnce),
            ];
            let asked = cx.send_request(RequestPermissionRequest::new(
                req.session_id.clone(),
                tool,
                options,
            ));
            let outcome = tokio::select! {
                answer = asked.block_task() => answer.map_err(|e| format!("permission request failed: {e}"))?.outcome,
                () = cancel.cancelled() => RequestPermissionOutcome::Cancelled,
            };
            let (status, verdict) = match outcome {
                RequestPermissionOutcome::Selected(chosen) => {
                    let id = chosen.option_id.to_string();
                    if id.starts_with("allow") {
                        (
                            ToolCallStatus::Completed,
                            format!("permission granted ({id})"),
                        )
                    } else {
                        (ToolCallStatus::Failed, format!("permission denied ({id})"))
                    }
                }
                _ => {
                    stop = StopReason::Cancelled;
                    (
                        ToolCallStatus::Failed,
                        "permission request cancelled".to_string(),
                    )
                }
            };
            send(
                cx,
                &req,
                SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
                    id,
                    ToolCallUpdateFields::new()
                        .status(status)
                        .content(vec![ToolCallContent::from(text_block(verdict.clone()))]),
                )),
            )?;
            reply = verdict;
        }
        Script::Slow { chunks: n, text: t } => {
            for i in 0..n {
                tokio::select! {
                    () = cancel.cancelled() => { stop = StopReason::Cancelled; break; }
                    () = tokio::time::sleep(SLOW_CHUNK_DELAY) => {}
                }
                let piece = format!("{t} {i}\n");
                send(
                    cx,
                    &req,
                    SessionUpdate::AgentMessageChunk(ContentChunk::new(text_block(piece.clone()))),
                )?;
                reply.push_str(&piece);
            }
            return Ok(finish(stop, input_tokens, word_count(&reply)));
        }
        Script::Fail(message) => return Err(message),
        Script::Crash(code) => {
            eprintln!("echo-agent: crashing on request with exit code {code}");
            std::process::exit(code);
        }
        Script::Env(name) => reply = std::env::var(&name).unwrap_or_default(),
        Script::Cwd => {
            reply = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        }
        Script::Config => reply = settings,
        Script::Mcp => reply = mcp,
        Script::System => {
            reply = match system {
                Some(text) => format!("system prompt: {text}"),
                None => "no system prompt".into(),
            }
        }
        Script::CallTool(name, input) => {
            let called = call_client_tool(tools.as_ref(), &name, &input);
            reply = tokio::select! {
                answer = called => answer,
                () = cancel.cancelled() => format!("tool {name} was not answered: cancelled"),
            };
            // A cancel also withdraws the call, whose failure may come back first.
            if cancel.is_cancelled() {
                stop = StopReason::Cancelled;
            }
        }
        Script::Cat(path) => {
            reply =
                std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?
        }
        Script::Write(path, text) => {
            if let Some(dir) = std::path::Path::new(&path).parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot write {path}: {e}"))?;
            }
            std::fs::write(&path, &text).map_err(|e| format!("cannot write {path}: {e}"))?;
            reply = format!("wrote {path}");
        }
    }
    if images > 0 {
        reply.push_str(&format!(" [{images} image(s) received]"));
    }
    if stop == StopReason::EndTurn && !reply.is_empty() {
        say(cx, &req, &reply, 4)?;
    }
    Ok(finish(stop, input_tokens, word_count(&reply)))
}

fn finish(stop: StopReason, input: u64, output: u64) -> PromptResponse {
    PromptResponse::new(stop).usage(Usage::new(input + output, input, output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_echoes() {
        assert_eq!(
            Script::parse(" hello there "),
            Script::Echo("hello there".into())
        );
    }

    #[test]
    fn commands_parse_with_defaults() {
        assert_eq!(Script::parse("/tool"), Script::Tool("tool done".into()));
        assert_eq!(
            Script::parse("/slow 3 abc"),
            Script::Slow {
                chunks: 3,
                text: "abc".into()
            }
        );
        assert_eq!(
            Script::parse("/slow going"),
            Script::Slow {
                chunks: 50,
                text: "going".into()
            }
        );
        assert_eq!(Script::parse("/crash"), Script::Crash(3));
        assert_eq!(
            Script::parse("/write notes/a.txt two words"),
            Script::Write("notes/a.txt".into(), "two words".into())
        );
        assert_eq!(Script::parse("/crash 7"), Script::Crash(7));
        assert_eq!(Script::parse("/env HOME"), Script::Env("HOME".into()));
    }

    #[test]
    fn chunks_keep_every_byte() {
        let text = "one two three four five six seven";
        let parts = chunks(text, 4);
        assert_eq!(parts.len(), 4);
        assert_eq!(parts.concat(), text);
        assert_eq!(chunks("single", 4), vec!["single".to_string()]);
        assert!(chunks("", 4).is_empty());
    }
}
