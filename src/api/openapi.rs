//! The API's OpenAPI 3.1 document, generated from its types: the native routes with their
//! request and answer types, and every mount (the vendor APIs, the seed platforms' clients, the
//! chat APIs) by route, each pointing to the page that maps it. Served at `/v1/openapi.json`
//! (without a key); `sandwarden openapi` prints it, and docs/openapi.json is checked against it.

use crate::session::view::{MessageView, SessionView, TurnSummary};
use crate::store::Event;
use serde::Serialize;
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::{Content, HttpMethod, ObjectBuilder, Ref, ResponseBuilder};

/// `GET /v1/sessions`: a page of the caller's sessions, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SessionPage {
    pub sessions: Vec<SessionView>,
    /// Where the next page starts (`?cursor=`), when more follow.
    pub next_cursor: Option<String>,
}

/// A template sessions can name.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TemplateView {
    pub name: String,
    /// `api` or `tui`.
    pub kind: String,
    /// `warm` or `cold`.
    pub start: String,
    pub warm_pool: usize,
    pub idle_timeout_s: u64,
    pub turn_timeout_s: u64,
}

/// `GET /v1/templates`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateView>,
}

/// `GET /v1/sessions/{id}/turns`: a page of the session's turns, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TurnPage {
    pub turns: Vec<TurnSummary>,
    pub next_cursor: Option<String>,
}

/// `202` to an asynchronous message: where to follow the turn.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub session_id: String,
    pub turn_id: String,
    /// `running`.
    pub status: String,
    pub turn_url: String,
    pub events_url: String,
}

/// A page of the history, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MessagesPage {
    pub session_id: String,
    pub messages: Vec<MessageView>,
    pub has_more: bool,
    pub next_cursor: Option<String>,
}

/// A page of the session's events after `since`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EventsPage {
    pub session_id: String,
    pub events: Vec<Event>,
    /// The `since` of the next page.
    pub next_since: i64,
    pub has_more: bool,
}

/// The questions of a session's running turn that wait for an answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PendingInputs {
    pub session_id: String,
    /// Their `input_required` events, the oldest first.
    pub inputs: Vec<Event>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sandwarden",
        description = "AI coding agents in sandboxes behind one API. The native API is under \
                       /v1; the mounts for other platforms' clients are described by route and \
                       mapped in the pages their descriptions name.",
    ),
    paths(
        super::create_session,
        super::list_sessions,
        super::watch_sessions,
        super::agent_options,
        super::pending_inputs,
        super::get_session,
        super::delete_session,
        super::post_message,
        super::get_messages,
        super::get_events,
        super::list_turns,
        super::get_turn,
        super::cancel,
        super::answer_input,
        super::list_files,
        super::list_templates,
    ),
    components(schemas(sandwarden_proto::problem::ProblemDoc)),
    modifiers(&Security, &Problems, &Mounts),
    security(("api_key" = [])),
)]
struct ApiDoc;

/// Every keyed route takes the API key as a bearer token (or in `x-api-key`).
struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            utoipa::openapi::security::SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build(),
            ),
        );
        components.add_security_scheme(
            "x_api_key",
            utoipa::openapi::security::SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new(
                "x-api-key",
            ))),
        );
    }
}

/// Every native operation may answer a problem document (`application/problem+json`) with any
/// error status (a quota's `429`, a body too large, the store down); those that stream answer
/// `text/event-stream` too.
struct Problems;

impl utoipa::Modify for Problems {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let problem = || {
            ResponseBuilder::new()
                .description("a problem document: `type` names it, `detail` says what to do")
                .content(
                    "application/problem+json",
                    Content::new(Some(Ref::from_schema_name("ProblemDoc"))),
                )
                .build()
        };
        for (path, item) in api.paths.paths.iter_mut() {
            // A message's `stream: true` and the events' SSE.
            let streaming = if path.ends_with("/messages") {
                item.post.as_mut()
            } else if path.ends_with("/events") || path == "/v1/events" {
                item.get.as_mut()
            } else {
                None
            };
            if let Some(op) = streaming
                && let Some(utoipa::openapi::RefOr::T(ok)) = op.responses.responses.get_mut("200")
            {
                ok.content.insert(
                    "text/event-stream".into(),
                    Content::new(Some(
                        ObjectBuilder::new()
                            .description(Some("SSE: each `data:` an event (see Event)"))
                            .build(),
                    )),
                );
            }
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                op.responses
                    .responses
                    .insert("default".into(), problem().into());
                // Problems, not the types, answer the documented error statuses.
                for (status, response) in op.responses.responses.iter_mut() {
                    if status.starts_with('4') || status.starts_with('5') {
                        *response = problem().into();
                    }
                }
            }
        }
    }
}

/// The mounts, by route: (method, path, what it is, the page that maps it).
const MOUNTS: &[(&str, &str, &str, &str)] = &[
    (
        "post",
        "/v1/chat/completions",
        "OpenAI Chat Completions",
        "docs/chat.md",
    ),
    ("post", "/v1/responses", "OpenAI Responses", "docs/chat.md"),
    (
        "get",
        "/v1/responses/{id}",
        "OpenAI Responses: a stored response",
        "docs/chat.md",
    ),
    ("post", "/v1/messages", "Anthropic Messages", "docs/chat.md"),
    (
        "get",
        "/compat/motus/{template}/health",
        "Motus: health (no key)",
        "docs/seed/motus.md",
    ),
    (
        "post",
        "/compat/motus/{template}/sessions",
        "Motus: create",
        "docs/seed/motus.md",
    ),
    (
        "get",
        "/compat/motus/{template}/sessions",
        "Motus: list",
        "docs/seed/motus.md",
    ),
    (
        "get",
        "/compat/motus/{template}/sessions/{id}",
        "Motus: get, long-poll",
        "docs/seed/motus.md",
    ),
    (
        "put",
        "/compat/motus/{template}/sessions/{id}",
        "Motus: create with a UUID",
        "docs/seed/motus.md",
    ),
    (
        "delete",
        "/compat/motus/{template}/sessions/{id}",
        "Motus: delete",
        "docs/seed/motus.md",
    ),
    (
        "post",
        "/compat/motus/{template}/sessions/{id}/messages",
        "Motus: send",
        "docs/seed/motus.md",
    ),
    (
        "get",
        "/compat/motus/{template}/sessions/{id}/messages",
        "Motus: history",
        "docs/seed/motus.md",
    ),
    (
        "post",
        "/compat/motus/{template}/sessions/{id}/resume",
        "Motus: answer an interrupt",
        "docs/seed/motus.md",
    ),
    (
        "get",
        "/compat/everruns/{template}",
        "Everruns: the agent card",
        "docs/seed/everruns.md",
    ),
    (
        "post",
        "/compat/everruns/{template}/sessions",
        "Everruns: create",
        "docs/seed/everruns.md",
    ),
    (
        "get",
        "/compat/everruns/{template}/sessions",
        "Everruns: list",
        "docs/seed/everruns.md",
    ),
    (
        "get",
        "/compat/everruns/{template}/sessions/{id}",
        "Everruns: get",
        "docs/seed/everruns.md",
    ),
    (
        "delete",
        "/compat/everruns/{template}/sessions/{id}",
        "Everruns: delete",
        "docs/seed/everruns.md",
    ),
    (
        "post",
        "/compat/everruns/{template}/sessions/{id}/messages",
        "Everruns: send",
        "docs/seed/everruns.md",
    ),
    (
        "get",
        "/compat/everruns/{template}/sessions/{id}/messages",
        "Everruns: messages",
        "docs/seed/everruns.md",
    ),
    (
        "get",
        "/compat/everruns/{template}/sessions/{id}/events",
        "Everruns: events",
        "docs/seed/everruns.md",
    ),
    (
        "get",
        "/compat/everruns/{template}/sessions/{id}/sse",
        "Everruns: live events (SSE)",
        "docs/seed/everruns.md",
    ),
    (
        "post",
        "/compat/everruns/{template}/sessions/{id}/cancel",
        "Everruns: cancel",
        "docs/seed/everruns.md",
    ),
    (
        "post",
        "/compat/everruns/{template}/sessions/{id}/tool-approvals",
        "Everruns: approvals",
        "docs/seed/everruns.md",
    ),
    (
        "post",
        "/compat/stewrd/{template}/v1/agent",
        "Stewrd: a one-shot turn",
        "docs/seed/stewrd.md",
    ),
    (
        "get",
        "/api/v1/managed_agents/agents",
        "LAP: agents",
        "docs/seed/lap.md",
    ),
    (
        "post",
        "/api/v1/managed_agents/agents/{agent_id}/session",
        "LAP: create",
        "docs/seed/lap.md",
    ),
    (
        "get",
        "/api/v1/managed_agents/sessions",
        "LAP: list",
        "docs/seed/lap.md",
    ),
    (
        "get",
        "/api/v1/managed_agents/sessions/{id}",
        "LAP: get",
        "docs/seed/lap.md",
    ),
    (
        "delete",
        "/api/v1/managed_agents/sessions/{id}",
        "LAP: delete",
        "docs/seed/lap.md",
    ),
    (
        "post",
        "/api/v1/managed_agents/sessions/{id}/message",
        "LAP: a turn",
        "docs/seed/lap.md",
    ),
    (
        "post",
        "/api/v1/managed_agents/sessions/{id}/message_stream",
        "LAP: a streamed turn",
        "docs/seed/lap.md",
    ),
    (
        "get",
        "/api/v1/managed_agents/sessions/{id}/events",
        "LAP: events (SSE)",
        "docs/seed/lap.md",
    ),
    (
        "get",
        "/api/v1/managed_agents/sessions/{id}/messages",
        "LAP: the conversation",
        "docs/seed/lap.md",
    ),
    (
        "post",
        "/api/v1/managed_agents/sessions/{id}/abort",
        "LAP: abort",
        "docs/seed/lap.md",
    ),
    (
        "post",
        "/api/v1/managed_agents/sessions/{id}/restart",
        "LAP: restart",
        "docs/seed/lap.md",
    ),
    (
        "post",
        "/v1/projects",
        "Karta: a project",
        "docs/seed/karta.md",
    ),
    (
        "get",
        "/v1/projects",
        "Karta: projects",
        "docs/seed/karta.md",
    ),
    (
        "get",
        "/v1/projects/{project}",
        "Karta: a project",
        "docs/seed/karta.md",
    ),
    (
        "patch",
        "/v1/projects/{project}",
        "Karta: pin a template",
        "docs/seed/karta.md",
    ),
    (
        "delete",
        "/v1/projects/{project}",
        "Karta: delete a project",
        "docs/seed/karta.md",
    ),
    (
        "post",
        "/v1/projects/{project}/sessions",
        "Karta: a project's session",
        "docs/seed/karta.md",
    ),
    (
        "get",
        "/v1/projects/{project}/sessions/{id}",
        "Karta: get",
        "docs/seed/karta.md",
    ),
    (
        "post",
        "/v1/projects/{project}/sessions/{id}/messages",
        "Karta: a message",
        "docs/seed/karta.md",
    ),
    (
        "get",
        "/anthropic/v1/agents",
        "Anthropic managed agents (and the rest under /anthropic)",
        "docs/anthropic.md",
    ),
    (
        "get",
        "/openai/v1/agents",
        "OpenAI agents (and the rest under /openai/v1)",
        "docs/openai.md",
    ),
];

/// The mounts as operations: any JSON in and out, described by their page.
struct Mounts;

impl utoipa::Modify for Mounts {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let any = || {
            Content::new(Some(utoipa::openapi::RefOr::T(
                ObjectBuilder::new()
                    .description(Some("the client's own shape"))
                    .build()
                    .into(),
            )))
        };
        for (method, path, summary, doc) in MOUNTS {
            let method = match *method {
                "get" => HttpMethod::Get,
                "put" => HttpMethod::Put,
                "delete" => HttpMethod::Delete,
                "patch" => HttpMethod::Patch,
                _ => HttpMethod::Post,
            };
            let mut op = Operation::new();
            op.summary = Some((*summary).to_string());
            op.description = Some(format!("Mapped onto the native sessions: {doc}."));
            op.tags = Some(vec![path.split('/').nth(1).unwrap_or("mounts").to_string()]);
            if matches!(
                method,
                HttpMethod::Post | HttpMethod::Put | HttpMethod::Patch
            ) {
                let mut body = RequestBody::new();
                body.content.insert("application/json".into(), any());
                op.request_body = Some(body);
            }
            op.responses.responses.insert(
                "200".into(),
                ResponseBuilder::new()
                    .description("the client's own answer")
                    .content("application/json", any())
                    .build()
                    .into(),
            );
            op.responses.responses.insert(
                "default".into(),
                ResponseBuilder::new()
                    .description("a problem document (in the vendor's error shape on its mounts)")
                    .content(
                        "application/problem+json",
                        Content::new(Some(Ref::from_schema_name("ProblemDoc"))),
                    )
                    .build()
                    .into(),
            );
            let item = PathItem::new(method, op);
            match api.paths.paths.get_mut(*path) {
                Some(existing) => existing.merge_operations(item),
                None => {
                    api.paths.paths.insert((*path).to_string(), item);
                }
            }
        }
    }
}

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut api = ApiDoc::openapi();
    api.info.version = env!("CARGO_PKG_VERSION").to_string();
    api
}

/// `GET /v1/openapi.json`.
pub async fn serve_document() -> axum::response::Response {
    use axum::response::IntoResponse;
    axum::Json(document()).into_response()
}
