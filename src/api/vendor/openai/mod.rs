//! OpenAI's Agents sessions API (`client.beta.agents` of the official SDK), served under
//! `/openai/v1`: a client sets `base_url` to `http://HOST/openai/v1` and its API key to a
//! sandwarden key. Agents are stored objects; a session is a native session plus a stored
//! record; its events, items and turns are the native log and turns translated (`translate`).

mod files;
mod translate;

use super::*;
use crate::api::session_path;
use crate::session::SessionError;
use crate::status::SessionStatus;
use crate::store::{StoreError, VendorObject};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use translate::{Translator, unix};

const AGENT: &str = "openai.agent";
const SESSION: &str = "openai.session";
/// An accepted input's `Idempotency-Key` (per session), so a retried input is not run twice.
const INPUT: &str = "openai.input";

/// The metadata key naming the harness template a session (or its agent) runs on.
const HARNESS_KEY: &str = "sandwarden.harness";

/// The routes, relative to the `/openai/v1` mount.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agents", post(create_agent).get(list_agents))
        .route(
            "/agents/{id}",
            get(get_agent).post(update_agent).delete(delete_agent),
        )
        .route("/agents/sessions", post(create_session).get(list_sessions))
        .route(
            "/agents/sessions/{id}",
            get(get_session).post(update_session).delete(delete_session),
        )
        .route(
            "/agents/sessions/{id}/events",
            post(send_events).get(stream_events),
        )
        .route("/agents/sessions/{id}/items", get(list_items))
        .route("/files", post(files::upload_file).get(files::list_files))
        .route(
            "/files/{id}",
            get(files::get_file).delete(files::delete_file),
        )
        .route("/files/{id}/content", get(files::file_content))
        .route("/agents/environments/{id}", get(files::get_environment))
        .route(
            "/agents/environments/{id}/files",
            post(files::stage_file).get(files::list_environment_files),
        )
        .route("/agents/sessions/{id}/turns", get(list_turns))
        .route("/agents/sessions/{id}/turns/{turn_id}", get(get_turn))
        .route(
            "/agents/sessions/{id}/turns/{turn_id}/items",
            get(turn_items),
        )
        .fallback(unsupported)
}

async fn unsupported(req: Request) -> Problem {
    unsupported_route(
        &req,
        "OpenAI Agents API (agents, sessions, their events, items and turns, a session's \
         environment and its files) and the Files API",
        "docs/openai.md",
    )
}

/// Answers under `/openai/` in OpenAI's error shape (`vendor_shape`; `code` is sandwarden's
/// problem type).
pub async fn errors(req: Request, next: Next) -> Response {
    vendor_shape(req, next, error_body).await
}

fn error_body(status: StatusCode, doc: &Value, _request_id: Option<String>) -> Value {
    let kind = match status.as_u16() {
        400 | 413 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    json!({"error": {
        "message": doc["detail"].as_str().unwrap_or("the request failed"),
        "type": kind, "param": doc["param"], "code": doc["type"],
    }})
}

/// A cursor page in OpenAI's shape: `data`, `has_more`, and the first and last ids.
fn cursor_page(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().map(|d| d["id"].clone());
    let last = data.last().map(|d| d["id"].clone());
    json!({"object": "list", "data": data, "has_more": has_more,
           "first_id": first, "last_id": last})
}

#[derive(Deserialize, Default)]
struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
    order: Option<String>,
    agent_id: Option<String>,
}

fn descending(order: Option<&str>) -> Result<bool, Problem> {
    match order {
        None | Some("desc") => Ok(true),
        Some("asc") => Ok(false),
        Some(_) => Err(invalid("`order` is `asc` or `desc`")),
    }
}

/// A page of stored objects after the object `after`, newest first unless `order=asc`.
async fn object_list(
    orch: &AppState,
    tenant: &str,
    kind: &str,
    q: &ListQuery,
) -> Result<(Vec<VendorObject>, bool), Problem> {
    let limit = limit_of(q.limit, 20, 100)?;
    let desc = descending(q.order.as_deref())?;
    let cursor = match &q.after {
        Some(after) => {
            let o = object(orch, tenant, kind, after, None).await?;
            Some((o.created_at, o.id))
        }
        None => None,
    };
    let mut objects = orch
        .store
        .list_objects(tenant, kind, cursor, desc, false, limit + 1)
        .await
        .map_err(store_problem)?;
    let more = objects.len() as i64 > limit;
    objects.truncate(limit as usize);
    Ok((objects, more))
}

// ---- agents

#[derive(Deserialize)]
struct AgentBody {
    model: Option<String>,
    name: Option<String>,
    instructions: Option<String>,
    tools: Option<Vec<Value>>,
    metadata: Option<Value>,
}

fn checked_agent(b: &AgentBody) -> Result<(), Problem> {
    short("name", b.name.as_deref(), 256)?;
    short("model", b.model.as_deref(), 256)?;
    checked_instructions("instructions", b.instructions.as_deref())?;
    if b.tools.as_ref().is_some_and(|t| t.len() > 32) {
        return Err(invalid("an agent has at most 32 tools"));
    }
    let mut names = std::collections::BTreeSet::new();
    for tool in b.tools.iter().flatten() {
        if !names.insert(tool["name"].as_str().unwrap_or_default()) {
            return Err(invalid(format!("tool {} is given twice", tool["name"])));
        }
        if tool["type"].as_str() != Some("function") {
            return Err(invalid(format!(
                "tools of type {} are not supported: the agent CLI's own tools run in the \
                 sandbox, and `function` tools are the client's",
                tool["type"].as_str().unwrap_or("(none)")
            )));
        }
        function_tool(tool).validate().map_err(invalid)?;
    }
    Ok(())
}

/// A `function` tool (the client runs it) as the native session's client tool.
fn function_tool(tool: &Value) -> sandwarden_proto::event::ClientToolSpec {
    sandwarden_proto::event::ClientToolSpec {
        name: tool["name"].as_str().unwrap_or_default().to_string(),
        description: tool["description"].as_str().unwrap_or_default().to_string(),
        input_schema: if tool["parameters"].is_null() {
            json!({"type": "object"})
        } else {
            tool["parameters"].clone()
        },
    }
}

/// An agent's function tools as stored.
fn function_tools(tools: Option<&[Value]>) -> Value {
    tools
        .unwrap_or_default()
        .iter()
        .map(|t| {
            let spec = function_tool(t);
            json!({"type": "function", "name": spec.name, "description": spec.description,
                   "parameters": spec.input_schema})
        })
        .collect()
}

fn agent_view(id: &str, b: &AgentBody, now: &str) -> Result<Value, Problem> {
    Ok(json!({
        "object": "agent", "id": id, "model": b.model, "name": b.name,
        "instructions": b.instructions, "tools": function_tools(b.tools.as_deref()),
        "metadata": checked_metadata(b.metadata.as_ref())?,
        "reasoning": {}, "created_at": unix(now), "updated_at": unix(now),
    }))
}

async fn create_agent(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<AgentBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    checked_agent(&b)?;
    if b.model.as_deref().is_none_or(|m| m.trim().is_empty()) {
        return Err(invalid("`model` is required"));
    }
    let now = crate::store::now();
    let id = new_id("agent");
    let body = agent_view(&id, &b, &now)?;
    check_room(&orch, &caller.tenant, AGENT, &body).await?;
    let o = first_version(&caller.tenant, AGENT, id.clone(), body, now);
    orch.store.put_object(&o).await.map_err(store_problem)?;
    Ok(Json(o.body).into_response())
}

async fn get_agent(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    Ok(Json(object(&orch, &caller.tenant, AGENT, &id, None).await?.body).into_response())
}

async fn update_agent(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<AgentBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    checked_agent(&b)?;
    let mut o = object(&orch, &caller.tenant, AGENT, &id, None).await?;
    if let Some(model) = &b.model {
        o.body["model"] = json!(model);
    }
    if let Some(name) = &b.name {
        o.body["name"] = json!(name);
    }
    if b.tools.is_some() {
        o.body["tools"] = function_tools(b.tools.as_deref());
    }
    if b.metadata.is_some() {
        o.body["metadata"] = merged_metadata(&o.body["metadata"], b.metadata.as_ref())?;
    }
    o.body["updated_at"] = json!(unix(&crate::store::now()));
    check_size(&o.body)?;
    orch.store.update_object(&o).await.map_err(store_problem)?;
    Ok(Json(o.body).into_response())
}

async fn list_agents(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let (objects, more) = object_list(&orch, &caller.tenant, AGENT, &q).await?;
    Ok(Json(cursor_page(
        objects.into_iter().map(|o| o.body).collect(),
        more,
    ))
    .into_response())
}

async fn delete_agent(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    if !orch
        .store
        .delete_object(&caller.tenant, AGENT, &id)
        .await
        .map_err(store_problem)?
    {
        return Err(not_found("agent", &id));
    }
    Ok(Json(json!({"id": id, "object": "agent.deleted", "deleted": true})).into_response())
}

// ---- sessions

#[derive(Deserialize)]
struct SessionBody {
    environment: Option<Value>,
    agent_id: Option<String>,
    agent: Option<AgentBody>,
    input: Option<Value>,
    metadata: Option<Value>,
    #[serde(default)]
    stream: bool,
    review: Option<String>,
    spend_control: Option<Value>,
    #[serde(default)]
    vault_ids: Vec<Value>,
}

/// What an `openai_hosted` environment says that a sandwarden session can honour: its `env`
/// (the sandbox's environment variables), `files` under `/workspace`, and its `network` (the
/// hosts the sandbox may reach; `narrows`: whether this server's sandboxes can be narrowed).
type Environment = (
    std::collections::BTreeMap<String, String>,
    Vec<Value>,
    Option<Vec<String>>,
);

fn checked_environment(env: &Value, narrows: bool) -> Result<Environment, Problem> {
    match env["type"].as_str() {
        Some("openai_hosted") => {}
        Some(other) => {
            return Err(invalid(format!(
                "environments of type {other} are not supported: use `openai_hosted` (the \
                 session's sandbox)"
            )));
        }
        None => return Err(invalid("`environment.type` is required (`openai_hosted`)")),
    }
    for key in [
        "environment_id",
        "environment_template_id",
        "setup_commands",
        "skills",
        "plugins",
        "capability_directories",
        "desktop",
    ] {
        if env.get(key).is_some_and(|v| !v.is_null()) {
            return Err(invalid(format!(
                "`environment.{key}` is not supported: a sandbox is what its template makes it \
                 (image, egress policy); only `env` and inline `files` apply per session"
            )));
        }
    }
    let mut vars = std::collections::BTreeMap::new();
    if let Some(map) = env["env"].as_object() {
        for (k, v) in map {
            let v = v
                .as_str()
                .ok_or_else(|| invalid(format!("`environment.env.{k}` is a string")))?;
            vars.insert(k.clone(), v.to_string());
        }
    }
    let files = env["files"].as_array().cloned().unwrap_or_default();
    if files.len() > super::files::MAX_SESSION_FILES {
        return Err(invalid(format!(
            "`environment.files` holds at most {} files",
            super::files::MAX_SESSION_FILES
        )));
    }
    let network = &env["network"];
    let egress = match network["access"].as_str() {
        None if network.is_null() => None,
        Some("enabled") => None,
        Some("disabled") => Some(Vec::new()),
        Some("restricted") => Some(
            network["allowed_domains"]
                .as_array()
                .ok_or_else(|| invalid("`network.allowed_domains` lists the hosts to allow"))?
                .iter()
                .map(|h| h.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("`network.allowed_domains` are host names"))?,
        ),
        _ => {
            return Err(invalid(
                "`network.access` is `enabled`, `disabled` or `restricted`",
            ));
        }
    };
    if let Some(hosts) = &egress {
        crate::egress::Narrowing::parse(hosts)
            .map_err(|e| invalid(format!("`network.allowed_domains` {e}")))?;
        if !narrows {
            return Err(invalid(
                "`network` narrows a sandbox's egress through serve's egress proxy, which this \
                 server's sandboxes do not go through (docs/security.md): leave it out (or \
                 `enabled`), or run confined sandboxes (bwrap, docker)",
            ));
        }
    }
    Ok((vars, files, egress))
}

/// The files an environment stages at creation, read (inline, or from the Files API) and checked,
/// every one before the session is made.
async fn staged_files(
    orch: &AppState,
    tenant: &str,
    specs: &[Value],
) -> Result<Vec<sandwarden_proto::event::BindFile>, Problem> {
    use base64::Engine;
    let (mut bind, mut total) = (Vec::new(), 0usize);
    for f in specs {
        let (path, bytes) = files::staged(orch, tenant, f).await?;
        total += bytes.len();
        if total > super::files::MAX_SESSION_FILE_BYTES {
            return Err(invalid(format!(
                "`environment.files` hold at most {} MiB at creation: stage more with \
                 environments.files.create once the session runs",
                super::files::MAX_SESSION_FILE_BYTES >> 20
            )));
        }
        bind.push(sandwarden_proto::event::BindFile {
            path,
            content: None,
            content_base64: Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
            mode: None,
        });
    }
    Ok(bind)
}

/// The session's status in OpenAI's words.
fn status_word(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Creating | SessionStatus::Ready => "idle",
        SessionStatus::Running => "in_progress",
        SessionStatus::InputRequired => "requires_action",
        SessionStatus::Failed | SessionStatus::Dead | SessionStatus::Deleted => "failed",
    }
}

/// The session object: its record, with the native status, pending approvals and usage.
async fn session_view(
    orch: &AppState,
    caller: &Caller,
    record: &VendorObject,
) -> Result<Value, Problem> {
    let mut body = record.body.clone();
    let Some(native) = orch
        .store
        .get_session(&record.tenant, &record.id)
        .await
        .map_err(store_problem)?
    else {
        body["status"] = json!("failed");
        return Ok(body);
    };
    body["status"] = json!(status_word(native.status));
    body["last_active_at"] = json!(unix(&native.last_active_at));
    if native.status == SessionStatus::InputRequired {
        body["required_actions"] = pending_actions(orch, caller, &native.id).await?;
    }
    let (input, output) = session_usage(orch, &native.id)
        .await
        .map_err(store_problem)?;
    body["usage"] =
        json!({"input_tokens": input, "output_tokens": output, "total_tokens": input + output});
    Ok(body)
}

/// The approvals the running turn waits on, as `required_actions`: its events translated from
/// its first one.
async fn pending_actions(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
) -> Result<Value, Problem> {
    let Some(turn) = orch
        .store
        .running_turn(session_id)
        .await
        .map_err(store_problem)?
    else {
        return Ok(json!([]));
    };
    let Some(first) = orch
        .store
        .turn_first_seq(session_id, &turn)
        .await
        .map_err(store_problem)?
    else {
        return Ok(json!([]));
    };
    let (outs, _) = history(
        orch,
        caller,
        session_id,
        Some((first, 0)),
        (usize::MAX, ITEMS_BYTES),
        |o: &Out| o.kind() == "agent.session.requires_action",
        Translator::new(json!({"id": session_id})),
    )
    .await?;
    Ok(outs
        .last()
        .map(|o| o.event["session"]["required_actions"].clone())
        .unwrap_or(json!([])))
}

async fn session_record(
    orch: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<VendorObject, Problem> {
    let native_id = session_path(&caller.tenant, id)?;
    orch.store
        .get_object(&caller.tenant, SESSION, &native_id, None)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| not_found("session", id))
}

/// An `input` (a string, or messages of `input_text`/`input_image` parts) as native parts.
fn input_parts(input: &Value) -> Result<Vec<Value>, Problem> {
    if let Some(text) = input.as_str() {
        if text.is_empty() {
            return Err(invalid("`input` is empty"));
        }
        return Ok(vec![json!({"type": "text", "text": text})]);
    }
    let messages = input
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("`input` is a string or a list of user messages"))?;
    let mut parts = Vec::new();
    for m in messages {
        if m["role"].as_str().is_some_and(|r| r != "user") {
            return Err(invalid("input messages have `role: user`"));
        }
        let content = match &m["content"] {
            Value::String(text) => vec![json!({"type": "input_text", "text": text})],
            Value::Array(c) => c.clone(),
            _ => return Err(invalid("a message's `content` is text or a list of parts")),
        };
        for c in content {
            parts.push(match c["type"].as_str() {
                Some("input_text") => json!({"type": "text", "text": c["text"]}),
                Some("input_image") => json!({"type": "image", "url": c["image_url"]}),
                other => {
                    return Err(invalid(format!(
                        "content parts are `input_text` or `input_image`, not {}",
                        other.unwrap_or("(none)")
                    )));
                }
            });
        }
    }
    Ok(parts)
}

async fn create_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<SessionBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    if !b.vault_ids.is_empty() {
        return Err(invalid("`vault_ids` are not supported"));
    }
    if b.review.as_deref().is_some_and(|r| r != "none") {
        return Err(invalid("`review` is not supported (only `none`)"));
    }
    if b.spend_control.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(invalid(
            "`spend_control` is not supported: a tenant's budget is set on its API key",
        ));
    }
    let (env, files, egress) = checked_environment(
        b.environment
            .as_ref()
            .ok_or_else(|| invalid("`environment` is required"))?,
        orch.runtime.narrows_egress(),
    )?;
    let stored = match &b.agent_id {
        Some(id) => Some(object(&orch, &caller.tenant, AGENT, id, None).await?.body),
        None => None,
    };
    if let Some(inline) = &b.agent {
        checked_agent(inline)?;
    }
    let model = b
        .agent
        .as_ref()
        .and_then(|a| a.model.clone())
        .or_else(|| {
            stored
                .as_ref()
                .and_then(|s| s["model"].as_str().map(String::from))
        })
        .ok_or_else(|| invalid("name the model: `agent.model`, or an `agent_id`"))?;
    let metadata = checked_metadata(b.metadata.as_ref())?;
    let harness = metadata
        .get(HARNESS_KEY)
        .and_then(Value::as_str)
        .or_else(|| stored.as_ref().and_then(|s| s["metadata"][HARNESS_KEY].as_str()))
        .map(String::from)
        .ok_or_else(|| {
            let names: Vec<String> = orch.templates().keys().cloned().collect();
            invalid(format!(
                "say which harness runs this session: metadata {{\"{HARNESS_KEY}\": \"<template>\"}} \
                 on the session or its agent (templates here: {})",
                names.join(", ")
            ))
        })?;
    if orch
        .templates()
        .get(&harness)
        .is_some_and(|t| t.kind == sandwarden_proto::kind::HarnessKind::Tui)
    {
        return Err(invalid(format!(
            "harness {harness:?} runs a terminal program, not an agent this API can talk to: \
             name an API harness"
        )));
    }
    // Checked against the template (nothing is installed per session): `python` is pip's,
    // `system` apt's.
    let packages = b
        .environment
        .as_ref()
        .map(|e| e["packages"].clone())
        .unwrap_or_default();
    check_packages(
        &orch,
        &harness,
        &wanted_packages(&packages, &[("python", "pip"), ("system", "apt")])?,
    )?;
    let first_input = b.input.as_ref().map(input_parts).transpose()?;
    // The inline agent's tools, else the stored agent's.
    let tools = match b.agent.as_ref().and_then(|a| a.tools.as_deref()) {
        Some(inline) => function_tools(Some(inline)),
        None => stored.as_ref().map_or(json!([]), |s| s["tools"].clone()),
    };
    // The inline agent's instructions, else the stored agent's.
    let instructions = b
        .agent
        .as_ref()
        .and_then(|a| a.instructions.clone())
        .or_else(|| {
            stored
                .as_ref()
                .and_then(|s| s["instructions"].as_str().map(String::from))
        })
        .filter(|t| !t.trim().is_empty());
    // The files' share of the tenant's answer memory, until the session holds them.
    let _held_files = match files.is_empty() {
        true => None,
        false => Some(
            super::files::hold_for_files(&orch, &caller, super::files::MAX_SESSION_FILE_BYTES)
                .await?,
        ),
    };
    let request = crate::session::CreateRequest {
        harness,
        id: None,
        title: None,
        metadata: Some(json!({"openai.agent_id": b.agent_id})),
        env,
        files: staged_files(&orch, &caller.tenant, &files).await?,
        cwd: None,
        idle_timeout_s: None,
        mcp_servers: Vec::new(),
        client_tools: tools
            .as_array()
            .into_iter()
            .flatten()
            .map(function_tool)
            .collect(),
        // Added to the agent CLI's own system prompt (docs/openai.md says how, per harness).
        instructions: instructions.clone(),
        egress_allow: egress,
        session_id: None,
    };
    let (session, _) = orch
        .create(&caller.tenant, request, None, &caller.limits)
        .await?;
    let now = crate::store::now();
    let agent_id = b.agent_id.clone().unwrap_or_else(|| new_id("agent"));
    let name = stored.as_ref().map(|s| s["name"].clone());
    let body = json!({
        "object": "agent.session", "id": session.id, "status": "idle",
        "agent": {"id": agent_id, "model": model, "name": name, "instructions": instructions,
                  "tools": tools, "reasoning": {}, "service_tier": "auto",
                  "multi_agent": {}, "text": {}},
        "environment": {"type": "openai_hosted", "id": files::environment_id(&session.id)},
        "metadata": metadata, "required_actions": [], "error": null, "vault_ids": [],
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        "spend_control": {"limit": null}, "review": "none",
        "created_at": unix(&now), "last_active_at": unix(&now),
    });
    let record = first_version(&caller.tenant, SESSION, session.id.clone(), body, now);
    if let Err(e) = orch.store.put_object(&record).await {
        let _ = orch.delete(&caller.tenant, &session.id).await;
        return Err(store_problem(e));
    }
    if b.stream {
        // The stream is open before the input is sent, so it sees the whole turn.
        let slot = orch
            .streams
            .open(&caller.tenant, caller.limits.open_streams)?;
        let created = json!({"type": "agent.session.created", "event_id": new_id("evt"),
                             "session": record.body});
        let response = live(
            &orch,
            &caller,
            record.id.clone(),
            slot,
            Translator::new(record.body.clone()),
            frame,
            super::Opening::first(vec![frame_of(&created)]),
        )
        .await?;
        if let Some(parts) = first_input {
            first_turn(&orch, &caller, &record, &parts).await?;
        }
        return Ok(response);
    }
    if let Some(parts) = first_input {
        first_turn(&orch, &caller, &record, &parts).await?;
    }
    Ok(Json(session_view(&orch, &caller, &record).await?).into_response())
}

async fn get_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = session_record(&orch, &caller, &id).await?;
    Ok(Json(session_view(&orch, &caller, &record).await?).into_response())
}

#[derive(Deserialize)]
struct SessionUpdate {
    metadata: Option<Value>,
    agent: Option<Value>,
}

async fn update_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SessionUpdate>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    let mut record = session_record(&orch, &caller, &id).await?;
    if let Some(agent) = &b.agent {
        let model = agent
            .get("model")
            .and_then(Value::as_str)
            .filter(|_| agent.as_object().is_some_and(|a| a.len() == 1))
            .ok_or_else(|| {
                invalid("of `agent`, only `model` can change here (applies to later turns)")
            })?;
        record.body["agent"]["model"] = json!(model);
    }
    if b.metadata.is_some() {
        record.body["metadata"] = merged_metadata(&record.body["metadata"], b.metadata.as_ref())?;
    }
    orch.store
        .update_object(&record)
        .await
        .map_err(store_problem)?;
    Ok(Json(session_view(&orch, &caller, &record).await?).into_response())
}

async fn list_sessions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let (records, more) = object_list(&orch, &caller.tenant, SESSION, &q).await?;
    let mut data = Vec::with_capacity(records.len());
    for r in records {
        if q.agent_id
            .as_deref()
            .is_some_and(|a| r.body["agent"]["id"].as_str() != Some(a))
        {
            continue;
        }
        data.push(session_view(&orch, &caller, &r).await?);
    }
    Ok(Json(cursor_page(data, more)).into_response())
}

/// Deletes the session: its sandbox stops and it is gone from this API.
async fn delete_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = session_record(&orch, &caller, &id).await?;
    discard_session(&orch, &caller, SESSION, &record.id).await?;
    Ok(Json(json!({"id": id, "object": "agent.session.deleted", "deleted": true})).into_response())
}

// ---- events

/// Starts a turn with `parts` under the session's model.
async fn send_message(
    orch: &AppState,
    caller: &Caller,
    record: &VendorObject,
    parts: &[Value],
) -> Result<(), Problem> {
    let model = record.body["agent"]["model"].as_str();
    // Sent now, or queued behind the running turn.
    super::queue::send(orch, caller, &record.id, parts, model).await?;
    Ok(())
}

/// The session's first turn; a session whose first input was refused is not left behind.
async fn first_turn(
    orch: &AppState,
    caller: &Caller,
    record: &VendorObject,
    parts: &[Value],
) -> Result<(), Problem> {
    let sent = send_message(orch, caller, record, parts).await;
    if sent.is_err() {
        let _ = discard_session(orch, caller, SESSION, &record.id).await;
    }
    sent
}

enum Input {
    Message(Vec<Value>),
    Cancel,
    Approval {
        request_id: String,
        approve: bool,
    },
    ToolResult {
        call_id: String,
        output: String,
        is_error: bool,
    },
}

/// A function's output as text: a string, or content parts whose texts are joined.
fn output_text(output: &Value) -> String {
    match output {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

fn parse_input(e: &Value) -> Result<Input, Problem> {
    match e["type"].as_str() {
        Some("agent.session.input.message") => Ok(Input::Message(input_parts(&e["input"])?)),
        Some("agent.session.input.cancel") => Ok(Input::Cancel),
        Some("agent.session.input.mcp_approval_request_result") => {
            let request_id = e["request_id"]
                .as_str()
                .ok_or_else(|| invalid("`request_id` is required"))?;
            let approve = match e["response"]["decision"].as_str() {
                Some("approve") => true,
                // `cancel` dismisses the request; the agent is told no.
                Some("deny" | "cancel") => false,
                _ => return Err(invalid("`response.decision` is approve, deny or cancel")),
            };
            Ok(Input::Approval {
                request_id: request_id.to_string(),
                approve,
            })
        }
        Some("agent.session.input.tool_result") => {
            let call_id = e["call_id"]
                .as_str()
                .ok_or_else(|| invalid("`call_id` is required"))?;
            let success = e["success"].as_bool().unwrap_or(true);
            let output = output_text(if success { &e["output"] } else { &e["error"] });
            Ok(Input::ToolResult {
                call_id: call_id.to_string(),
                output,
                is_error: !success,
            })
        }
        Some(kind @ "agent.session.input.computer_use_approval_request_result") => {
            Err(invalid(format!(
                "`{kind}` is not supported: computer use has no counterpart here (docs/openai.md)"
            )))
        }
        other => Err(invalid(format!(
            "unknown input type {}: send agent.session.input.message, .cancel or \
             .mcp_approval_request_result",
            other.unwrap_or("(none)")
        ))),
    }
}

#[derive(Deserialize)]
struct SendBody {
    events: Vec<Value>,
}

/// Input events: `202` once accepted. An `Idempotency-Key` seen before on this session is
/// accepted again without acting twice.
async fn send_events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<SendBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    if b.events.is_empty() {
        return Err(invalid("`events` holds at least one event"));
    }
    if b.events.len() > 50 {
        return Err(invalid("send at most 50 events at once"));
    }
    let inputs: Vec<Input> = b.events.iter().map(parse_input).collect::<Result<_, _>>()?;
    if inputs
        .iter()
        .filter(|i| matches!(i, Input::Message(_)))
        .count()
        > 1
    {
        return Err(invalid(
            "send one input message at a time: the next waits for `agent.session.idle`",
        ));
    }
    let record = session_record(&orch, &caller, &id).await?;
    let key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 256)
                .map(String::from)
                .ok_or_else(|| invalid("`Idempotency-Key` is 1-256 visible ASCII characters"))
        })
        .transpose()?;
    let claim = key.map(|k| {
        let id = format!(
            "{}:{}",
            record.id,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(k.as_bytes()))
        );
        first_version(&caller.tenant, INPUT, id, json!({}), crate::store::now())
    });
    if let Some(claim) = &claim {
        match orch.store.put_object(claim).await {
            Err(StoreError::Conflict) => return Ok(StatusCode::ACCEPTED.into_response()),
            other => other.map_err(store_problem)?,
        }
    }
    if let Err(p) = act(&orch, &caller, &record, inputs).await {
        // Not acted on: the same key may be tried again.
        if let Some(claim) = &claim {
            let _ = orch
                .store
                .delete_object(&claim.tenant, INPUT, &claim.id)
                .await;
        }
        return Err(p);
    }
    Ok(StatusCode::ACCEPTED.into_response())
}

async fn act(
    orch: &AppState,
    caller: &Caller,
    record: &VendorObject,
    inputs: Vec<Input>,
) -> Result<(), Problem> {
    for input in inputs {
        match input {
            Input::Message(parts) => send_message(orch, caller, record, &parts).await?,
            Input::Cancel => match orch.cancel(&caller.tenant, &record.id).await {
                Ok(_) | Err(SessionError::NoTurnRunning) => {}
                Err(e) => return Err(e.into()),
            },
            Input::ToolResult {
                call_id,
                output,
                is_error,
            } => {
                validate_request_id(&call_id)?;
                let answer = sandwarden_proto::event::InputAnswer {
                    output: Some(output),
                    is_error,
                    ..Default::default()
                };
                match orch
                    .answer(&caller.tenant, &record.id, &call_id, &answer)
                    .await
                {
                    Ok(_) => {}
                    // The SDK's own words for a call it may retry (or one answered already).
                    Err(SessionError::HarnessRefused(p)) if p.status == 404 => {
                        return Err(invalid(format!("Unknown pending tool call: {call_id}")));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Input::Approval {
                request_id,
                approve,
            } => {
                validate_request_id(&request_id)?;
                let answer = sandwarden_proto::event::InputAnswer {
                    decision: Some(if approve {
                        sandwarden_proto::event::Decision::ApproveOnce
                    } else {
                        sandwarden_proto::event::Decision::Deny
                    }),
                    option_id: None,
                    ..Default::default()
                };
                match orch
                    .answer(&caller.tenant, &record.id, &request_id, &answer)
                    .await
                {
                    Ok(_) => {}
                    Err(SessionError::HarnessRefused(p)) if p.status == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

fn validate_request_id(id: &str) -> Result<(), Problem> {
    sandwarden_proto::event::validate_id("request id", id).map_err(invalid)
}

fn frame_of(event: &Value) -> SseEvent {
    SseEvent::default()
        .event(event["type"].as_str().unwrap_or("message"))
        .json_data(event)
        .unwrap_or_default()
}

fn frame(out: &Out) -> SseEvent {
    frame_of(&out.event)
}

/// The live event stream (`GET …/events` with `Accept: text/event-stream`).
async fn stream_events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let slot = orch
        .streams
        .open(&caller.tenant, caller.limits.open_streams)?;
    let record = session_record(&orch, &caller, &id).await?;
    super::queue::drain(&orch, &caller, &record.id);
    let translator = Translator::new(record.body.clone());
    live(
        &orch,
        &caller,
        record.id,
        slot,
        translator,
        frame,
        super::Opening::default(),
    )
    .await
}

// ---- history: items and turns

/// Every item of the session in order (user messages as they opened turns, the rest as done).
/// The most of a session's items (their JSON) the items list reads to answer.
const ITEMS_BYTES: usize = 16 << 20;

async fn items_of(
    orch: &AppState,
    caller: &Caller,
    record: &VendorObject,
    turn: Option<&str>,
) -> Result<Vec<Value>, Problem> {
    let is_item = |o: &Out| {
        let item = &o.event["item"];
        (o.kind() == "agent.session.turn.item.done"
            || (o.kind() == "agent.session.turn.item.added" && item["role"] == "user"))
            && turn.is_none_or(|t| item["turn_id"].as_str() == Some(t))
    };
    let (outs, more) = history(
        orch,
        caller,
        &record.id,
        None,
        (usize::MAX, ITEMS_BYTES),
        is_item,
        Translator::new(record.body.clone()),
    )
    .await?;
    if more {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "history_too_large",
            format!(
                "this session's items are over {} MiB, more than this list reads at once: read \
                 its history page by page from GET /v1/sessions/{{id}}/events",
                ITEMS_BYTES >> 20
            ),
        ));
    }
    Ok(outs.into_iter().map(|o| o.event["item"].clone()).collect())
}

/// A page of `all` (oldest first) after the element whose id is `after`, in `order`.
fn page_after(
    mut all: Vec<Value>,
    q: &ListQuery,
    default_desc: bool,
) -> Result<(Vec<Value>, bool), Problem> {
    let limit = limit_of(q.limit, 20, 100)?;
    let desc = match q.order.as_deref() {
        None => default_desc,
        other => descending(other)?,
    };
    if desc {
        all.reverse();
    }
    let start = match &q.after {
        Some(after) => {
            all.iter()
                .position(|v| v["id"].as_str() == Some(after))
                .ok_or_else(|| invalid(format!("`after` {after:?} is not an id of this list")))?
                + 1
        }
        None => 0,
    };
    let rest: Vec<Value> = all.into_iter().skip(start).collect();
    let more = rest.len() as i64 > limit;
    Ok((rest.into_iter().take(limit as usize).collect(), more))
}

async fn list_items(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let record = session_record(&orch, &caller, &id).await?;
    let (data, more) = page_after(items_of(&orch, &caller, &record, None).await?, &q, true)?;
    admitted_json(&orch, &caller, &cursor_page(data, more)).await
}

async fn turn_items(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, turn_id)): Path<(String, String)>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let record = session_record(&orch, &caller, &id).await?;
    turn_of(&orch, &record, &turn_id).await?;
    let (data, more) = page_after(
        items_of(&orch, &caller, &record, Some(&turn_id)).await?,
        &q,
        false,
    )?;
    admitted_json(&orch, &caller, &cursor_page(data, more)).await
}

/// A native turn as OpenAI's `Turn`.
fn turn_view(record: &VendorObject, t: &crate::store::Turn) -> Value {
    let status = match t.status {
        crate::status::TurnStatus::Running => "in_progress",
        crate::status::TurnStatus::Completed => "completed",
        crate::status::TurnStatus::Cancelled => "cancelled",
        crate::status::TurnStatus::Failed => "failed",
    };
    let usage = t.usage.as_ref().map(|u| {
        json!({"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
               "total_tokens": u["total_tokens"]})
    });
    let error = t.error.as_ref().map(
        |e| json!({"code": "server_error", "message": e["message"].as_str().unwrap_or("failed")}),
    );
    json!({
        "object": "agent.session.turn", "id": t.id, "session_id": record.id,
        "agent_id": record.body["agent"]["id"], "subagent_id": null, "status": status,
        "created_at": unix(&t.created_at), "started_at": unix(&t.created_at),
        "completed_at": t.finished_at.as_deref().map(unix), "usage": usage, "error": error,
    })
}

async fn turn_of(
    orch: &AppState,
    record: &VendorObject,
    turn_id: &str,
) -> Result<crate::store::Turn, Problem> {
    orch.store
        .get_turn(&record.id, turn_id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| not_found("turn", turn_id))
}

async fn list_turns(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let record = session_record(&orch, &caller, &id).await?;
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let turns = orch
            .store
            .list_turns(&record.id, after.clone(), 500)
            .await
            .map_err(store_problem)?;
        all.extend(turns.iter().map(|t| turn_view(&record, t)));
        match turns.last() {
            Some(t) if turns.len() == 500 => after = Some((t.created_at.clone(), t.id.clone())),
            _ => break,
        }
    }
    let (data, more) = page_after(all, &q, true)?;
    Ok(Json(cursor_page(data, more)).into_response())
}

async fn get_turn(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, turn_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let record = session_record(&orch, &caller, &id).await?;
    let turn = turn_of(&orch, &record, &turn_id).await?;
    Ok(Json(turn_view(&record, &turn)).into_response())
}
