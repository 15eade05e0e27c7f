//! Reading a request (pure): one provider's JSON into a `Conversation`, the same for every
//! dialect.

use super::*;

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
pub(crate) const TITLE_MARKERS: &[&str] = &["Generate a title", "Generate a concise"];

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

    pub(crate) fn tool(&self, names: &[&str]) -> Option<&Tool> {
        names.iter().find_map(|wanted| {
            self.tools
                .iter()
                .find(|t| t.name.eq_ignore_ascii_case(wanted))
        })
    }
}

/// One message reduced to what the fake looks at.
pub(crate) struct Message {
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

pub(crate) fn blocks(content: &Value) -> impl Iterator<Item = &Value> {
    content.as_array().into_iter().flatten()
}

/// The texts of a message's content: a plain string, or the text blocks of a block list.
pub(crate) fn content_texts(content: &Value) -> Vec<String> {
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
pub(crate) fn read_tools(tools: &Value, schema_key: &str) -> Vec<Tool> {
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
pub(crate) const INTERRUPTED: &str = "[Request interrupted by user";

/// The next `<tag>` at the start of a line: (text before it, tag name, text after it).
pub(crate) fn next_wrapper(text: &str) -> Option<(&str, &str, &str)> {
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
pub(crate) fn text_chars(v: &Value) -> usize {
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
