//! The message endpoint's body: every seed shape (`text`; `parts[]`; `message`; `content` + `role`)
//! normalized to parts, plus the turn options. Pure: parsing and checks only.

use sandwarden_proto::event::Part;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where to deliver a turn's result.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    pub url: String,
    /// Sent as `Authorization: Bearer` and used as the HMAC key of `X-Sandwarden-Signature`.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    #[serde(default)]
    pub include_messages: bool,
    /// The payload's shape for a client of another platform (set by its mount, never taken
    /// from a request body; see `webhook::payload`).
    #[serde(skip)]
    pub shape: Option<String>,
}

/// `POST /v1/sessions/{id}/messages`. Fields other platforms send that have no meaning here
/// (`user_params`, `tags`, `controls`, …) are accepted and ignored.
#[derive(utoipa::ToSchema, Debug, Clone, Default, Deserialize)]
pub struct MessageRequest {
    pub text: Option<String>,
    #[serde(default, deserialize_with = "sandwarden_proto::event::capped_parts")]
    pub parts: Option<Vec<Value>>,
    #[serde(default, deserialize_with = "sandwarden_proto::event::capped")]
    pub message: Option<Value>,
    #[serde(default, deserialize_with = "sandwarden_proto::event::capped")]
    pub content: Option<Value>,
    pub role: Option<String>,
    pub base64_image: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, rename = "async")]
    pub async_: bool,
    pub webhook: Option<WebhookSpec>,
    pub model: Option<String>,
    pub thinking: Option<bool>,
    pub agent: Option<String>,
    pub participant_name: Option<String>,
    pub participant_type: Option<String>,
    #[serde(default, deserialize_with = "sandwarden_proto::event::capped")]
    pub metadata: Option<Value>,
    /// The turn's id, chosen ahead by this server (a vendor API's queued message); never
    /// taken from a request body.
    #[serde(skip)]
    pub turn_id: Option<String>,
}

impl MessageRequest {
    /// The agent settings this message asks for.
    pub fn turn_options(&self) -> sandwarden_proto::event::TurnOptions {
        sandwarden_proto::event::TurnOptions {
            model: self.model.clone(),
            thinking: self.thinking,
            agent: self.agent.clone(),
        }
    }

    /// The message as parts; the error says how to fix the body.
    pub fn parts(&self) -> Result<Vec<Part>, String> {
        let given = [
            self.text.is_some(),
            self.parts.is_some(),
            self.message.is_some(),
            self.content.as_ref().is_some_and(|c| !c.is_null()),
        ];
        match given.iter().filter(|g| **g).count() {
            0 => {
                return Err(
                    "send the message as `text`, `parts`, `message` or `content`, e.g. \
                            {\"text\":\"hello\"}"
                        .into(),
                );
            }
            1 => {}
            _ => {
                return Err(
                    "send the message in one field only: `text`, `parts`, `message` or `content`"
                        .into(),
                );
            }
        }
        if let Some(role) = &self.role
            && role != "user"
        {
            return Err(format!(
                "`role` {role:?} cannot be sent to an agent; only \"user\" messages are accepted"
            ));
        }
        if let Some(pt) = &self.participant_type
            && pt != "human"
            && pt != "ai"
        {
            return Err("`participant_type` is \"human\" or \"ai\"".into());
        }
        if let Some(m) = &self.metadata
            && !m.is_object()
        {
            return Err("`metadata` must be a JSON object".into());
        }
        let mut parts = if let Some(text) = &self.text {
            vec![Part::Text { text: text.clone() }]
        } else if let Some(parts) = &self.parts {
            parts_from_values(parts)?
        } else if let Some(message) = &self.message {
            from_message(message)?
        } else {
            from_content(self.content.as_ref().unwrap_or(&Value::Null))?
        };
        if let Some(img) = &self.base64_image {
            parts.push(image_from_data_or_url(img, None));
        }
        let checked = sandwarden_proto::event::TurnRequest {
            turn_id: None,
            parts,
            timeout_s: None,
            options: self.turn_options(),
        };
        checked.validate()?;
        Ok(checked.parts)
    }
}

fn from_message(message: &Value) -> Result<Vec<Part>, String> {
    match message {
        Value::String(s) => Ok(vec![Part::Text { text: s.clone() }]),
        Value::Object(o) => {
            if let Some(role) = o.get("role").and_then(Value::as_str)
                && role != "user"
            {
                return Err(format!(
                    "`message.role` {role:?} cannot be sent; use \"user\""
                ));
            }
            match o.get("content").or_else(|| o.get("parts")) {
                Some(c) => from_content(c),
                None => Err("`message` needs `content` (a string or an array of parts)".into()),
            }
        }
        _ => Err("`message` must be a string or {\"role\":\"user\",\"content\":…}".into()),
    }
}

fn from_content(content: &Value) -> Result<Vec<Part>, String> {
    match content {
        Value::String(s) => Ok(vec![Part::Text { text: s.clone() }]),
        Value::Array(items) => parts_from_values(items),
        _ => Err("`content` must be a string or an array of parts".into()),
    }
}

/// A `data:` URL becomes inline base64; anything else stays a URL.
fn image_from_data_or_url(value: &str, mime: Option<String>) -> Part {
    if let Some(rest) = value.strip_prefix("data:")
        && let Some((meta, data)) = rest.split_once(',')
        && let Some(mime_type) = meta.strip_suffix(";base64")
    {
        return Part::Image {
            data: Some(data.to_string()),
            url: None,
            mime_type: Some(mime_type.to_string()),
        };
    }
    if value.starts_with("http://") || value.starts_with("https://") {
        return Part::Image {
            data: None,
            url: Some(value.to_string()),
            mime_type: mime,
        };
    }
    Part::Image {
        data: Some(value.to_string()),
        url: None,
        mime_type: Some(mime.unwrap_or_else(|| "image/png".into())),
    }
}

fn str_field(o: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    o.get(key).and_then(Value::as_str).map(String::from)
}

/// Parts in the shapes the seeds use: `{type:"text",text}`, images as `data`/`url`/`source`/
/// `image_url`, files as `text`/`data`/`url`.
pub fn parts_from_values(values: &[Value]) -> Result<Vec<Part>, String> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let Some(o) = v.as_object() else {
            return Err(format!("parts[{i}] must be an object with a `type`"));
        };
        let kind = o.get("type").and_then(Value::as_str).unwrap_or("");
        let mime = str_field(o, "mime_type").or_else(|| str_field(o, "media_type"));
        let part = match kind {
            "text" | "input_text" => Part::Text {
                text: str_field(o, "text")
                    .ok_or_else(|| format!("parts[{i}]: a text part needs a string `text`"))?,
            },
            "image" | "image_url" | "input_image" => {
                if let Some(source) = o.get("source").and_then(Value::as_object) {
                    let mime = str_field(source, "media_type").or(mime);
                    match (str_field(source, "data"), str_field(source, "url")) {
                        (Some(data), _) => Part::Image {
                            data: Some(data),
                            url: None,
                            mime_type: mime,
                        },
                        (None, Some(url)) => image_from_data_or_url(&url, mime),
                        _ => {
                            return Err(format!(
                                "parts[{i}]: image `source` needs `data` or `url`"
                            ));
                        }
                    }
                } else if let Some(url) = o
                    .get("image_url")
                    .and_then(|u| {
                        u.as_str()
                            .map(String::from)
                            .or_else(|| u.get("url").and_then(Value::as_str).map(String::from))
                    })
                    .or_else(|| str_field(o, "url"))
                {
                    image_from_data_or_url(&url, mime)
                } else if let Some(data) = str_field(o, "data") {
                    Part::Image {
                        data: Some(data),
                        url: None,
                        mime_type: mime,
                    }
                } else {
                    return Err(format!(
                        "parts[{i}]: an image needs `data` (base64) or `url`"
                    ));
                }
            }
            "file" => Part::File {
                name: str_field(o, "name").or_else(|| str_field(o, "filename")),
                text: str_field(o, "text").or_else(|| str_field(o, "content")),
                data: str_field(o, "data"),
                url: str_field(o, "url"),
                mime_type: mime,
            },
            "" => return Err(format!("parts[{i}] needs a `type` (text, image or file)")),
            other => {
                return Err(format!(
                    "parts[{i}]: type {other:?} is not supported; use text, image or file"
                ));
            }
        };
        out.push(part);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> MessageRequest {
        serde_json::from_str(json).expect("valid body")
    }

    fn text_of(parts: &[Part]) -> String {
        parts
            .iter()
            .filter_map(|p| match p {
                Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn every_seed_shape_becomes_parts() {
        for body in [
            r#"{"text":"hi"}"#,
            r#"{"parts":[{"type":"text","text":"hi"}]}"#,
            r#"{"message":"hi"}"#,
            r#"{"message":{"role":"user","content":[{"type":"text","text":"hi"}]}}"#,
            r#"{"content":"hi","role":"user"}"#,
            r#"{"content":[{"type":"text","text":"hi"}]}"#,
        ] {
            let parts = req(body).parts().unwrap_or_else(|e| panic!("{body}: {e}"));
            assert_eq!(text_of(&parts), "hi", "{body}");
        }
    }

    #[test]
    fn images_in_their_many_shapes() {
        let parts = req(r#"{"parts":[{"type":"text","text":"look"},
                {"type":"image","source":{"type":"base64","media_type":"image/png","data":"aGk="}},
                {"type":"image_url","image_url":{"url":"data:image/jpeg;base64,aGk="}},
                {"type":"image","url":"https://example.com/x.png"}]}"#)
        .parts()
        .expect("valid");
        assert_eq!(parts.len(), 4);
        assert!(
            matches!(&parts[2], Part::Image { data: Some(_), mime_type: Some(m), .. } if m == "image/jpeg")
        );
        assert!(matches!(&parts[3], Part::Image { url: Some(_), .. }));
        let with_b64 = req(r#"{"content":"see","base64_image":"aGk="}"#)
            .parts()
            .expect("valid");
        assert_eq!(with_b64.len(), 2);
    }

    #[test]
    fn refusals_say_how_to_fix() {
        let cases = [
            (r#"{}"#, "send the message"),
            (r#"{"text":"a","content":"b"}"#, "one field only"),
            (r#"{"text":""}"#, "empty"),
            (r#"{"parts":[]}"#, "empty"),
            (r#"{"content":"x","role":"assistant"}"#, "only \"user\""),
            (r#"{"parts":[{"type":"video"}]}"#, "not supported"),
            (r#"{"parts":["x"]}"#, "must be an object"),
            (r#"{"text":"x","metadata":[1]}"#, "metadata"),
            (r#"{"message":5}"#, "must be a string"),
        ];
        for (body, expect) in cases {
            let e = req(body).parts().expect_err(body);
            assert!(e.contains(expect), "{body}: {e}");
        }
    }

    #[test]
    fn options_parse() {
        let r = req(
            r#"{"text":"x","stream":true,"async":false,"webhook":{"url":"https://h/x","token":"t"},"model":"m","thinking":true,"user_params":{"a":1}}"#,
        );
        assert!(r.stream && !r.async_);
        assert_eq!(r.webhook.map(|w| w.url), Some("https://h/x".into()));
    }
}
