//! The one error shape every HTTP surface returns: RFC 9457 problem+json with a stable `type`.
//!
//! Shared vocabulary, like `event`: data and rendering only, no knowledge of who failed.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// A problem document (boxed: it travels in `Result`s on every path and should stay small there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Problem(Box<ProblemDoc>);

impl std::ops::Deref for Problem {
    type Target = ProblemDoc;
    fn deref(&self) -> &ProblemDoc {
        &self.0
    }
}

/// `type` is a stable, machine-readable code (`turn_in_progress`); `detail` tells a person how to
/// fix the request (4xx) or what failed on our side (5xx).
#[cfg_attr(feature = "utoipa", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemDoc {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Extra machine-readable fields (`turn_id`, `tty_url`, …), flattened into the document.
    #[serde(flatten, default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    pub fn new(status: StatusCode, kind: &str, detail: impl Into<String>) -> Self {
        Problem(Box::new(ProblemDoc {
            kind: kind.to_string(),
            title: status.canonical_reason().unwrap_or("error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            extra: serde_json::Map::new(),
        }))
    }

    /// Adds a machine-readable field next to the standard ones. A standard member's name
    /// (`type`, `title`, `status`, `detail`) is never overwritten nor repeated: such a field is
    /// named `extra_NAME` instead, so `status` is always the HTTP status.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        let key = match key {
            "type" | "title" | "status" | "detail" => format!("extra_{key}"),
            _ => key.to_string(),
        };
        self.0.extra.insert(key, value.into());
        self
    }

    /// The same problem with another `detail`.
    pub fn with_detail(mut self, detail: String) -> Self {
        self.0.detail = detail;
        self
    }

    /// Whether the answerer found the request itself unusable (`422`): the caller's mistake.
    pub fn is_invalid_request(&self) -> bool {
        self.status == StatusCode::UNPROCESSABLE_ENTITY.as_u16()
    }

    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.extra.get("retry_after_s").and_then(|v| v.as_u64()) {
            // A wait the problem names itself (a rate limit) is also said as HTTP says it.
            if let Ok(v) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            // Unavailability here is short-lived (a restarting database, a server starting).
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<axum::extract::rejection::JsonRejection> for Problem {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        use axum::extract::rejection::JsonRejection as J;
        let (kind, hint) = match &rejection {
            J::JsonSyntaxError(_) => ("invalid_json", "the body is not valid JSON"),
            J::JsonDataError(_) => (
                "invalid_body",
                "the JSON does not match what this route takes",
            ),
            J::MissingJsonContentType(_) => (
                "unsupported_media_type",
                "send the header `Content-Type: application/json`",
            ),
            _ => ("invalid_body", "the body could not be read"),
        };
        let status = rejection.status();
        // The body stalled past the server's limit (see `http::ClientLimits`).
        let stalled = std::iter::successors(
            Some(&rejection as &(dyn std::error::Error + 'static)),
            |e| e.source(),
        )
        .any(|e| e.is::<tower_http::timeout::TimeoutError>());
        if stalled {
            return Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body stopped arriving before it was complete; send the whole body \
                 without long pauses, and a Content-Length that matches it",
            );
        }
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return Problem::new(
                status,
                "body_too_large",
                "the request body is larger than this server accepts; send less (e.g. smaller or fewer images)",
            );
        }
        Problem::new(status, kind, format!("{hint}: {}", rejection.body_text()))
    }
}
