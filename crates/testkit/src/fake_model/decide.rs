//! Deciding the answer (pure): the directive in the last user message, and the tool calls it
//! needs in the client's own tools.

use super::*;

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
    /// A call of the client's tool named (or ending in `__`/`_` and) `name`, with `arguments`.
    CallTool {
        name: String,
        arguments: Value,
    },
    Slow {
        delay_ms: u64,
        deltas: u32,
    },
    Error(u16),
}

pub(crate) const SLOW_DEFAULT_MS: u64 = 500;
pub(crate) const SLOW_DEFAULT_DELTAS: u32 = 10;

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
                "CALLTOOL" => {
                    let (name, args) = match rest.split_once(char::is_whitespace) {
                        Some((n, a)) => (n, a.trim_start()),
                        None => (rest, ""),
                    };
                    let arguments = serde_json::from_str::<Value>(args)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    (!name.is_empty()).then(|| Directive::CallTool {
                        name: name.to_string(),
                        arguments,
                    })
                }
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
            Directive::CallTool { name, arguments } => Answer::Tool(ToolCall {
                // MCP tools reach the model prefixed with their server (`mcp__client__lookup`
                // from claude-code, `client_lookup` from opencode): the client's own name wins.
                name: conv
                    .tools
                    .iter()
                    .map(|t| t.name.as_str())
                    .find(|t| {
                        *t == name
                            || t.ends_with(&format!("__{name}"))
                            || t.ends_with(&format!("_{name}"))
                    })
                    .unwrap_or(&name)
                    .to_string(),
                arguments,
            }),
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
    pub(crate) fn summary(&self) -> Value {
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

pub(crate) const WRITE_TOOLS: &[&str] = &["Write", "write", "write_file", "create_file"];
pub(crate) const SHELL_TOOLS: &[&str] = &["Bash", "bash", "exec_command", "shell", "shell_command"];

/// A call that writes `content` to `path`: the client's write tool if it offers one, else its
/// shell tool, else the dialect's usual tool (Anthropic `Write`, Chat `write`, Responses
/// `exec_command`).
pub(crate) fn write_file_call(
    api: Api,
    conv: &Conversation,
    path: &str,
    content: &str,
) -> ToolCall {
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

pub(crate) fn write_call(api: Api, tool: &Tool, path: &str, content: &str) -> ToolCall {
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

pub(crate) fn shell_call(api: Api, conv: &Conversation, command: &str) -> ToolCall {
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
pub(crate) fn shell_args(tool: &Tool, command: &str) -> ToolCall {
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

pub(crate) fn bare_tool(name: &str) -> Tool {
    Tool {
        name: name.to_string(),
        schema: Value::Null,
    }
}

/// Gives every required string parameter we did not set a short value (opencode's `bash` requires
/// a `description`), so the client's argument validation passes.
pub(crate) fn fill_required(mut args: Map<String, Value>, schema: &Value) -> Value {
    for name in blocks(&schema["required"]).filter_map(Value::as_str) {
        if !args.contains_key(name) && schema["properties"][name]["type"] == "string" {
            args.insert(name.to_string(), "requested by the fake model".into());
        }
    }
    Value::Object(args)
}
