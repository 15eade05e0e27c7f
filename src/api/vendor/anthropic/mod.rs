//! Anthropic's Managed Agents API (`client.beta.agents`, `.environments`, `.sessions` of the
//! official SDK), served under `/anthropic`: a client sets `base_url` to `http://HOST/anthropic`
//! and its API key to a sandwarden key.
//!
//! Agents and environments are stored objects (agents versioned); an Anthropic session is a
//! native session plus a stored record of the agent version and environment it was made from.
//! Its events are the native event log translated (`translate`): the history and the live
//! stream run the same translation, so an event has the same id in both.

mod files;
mod translate;

use super::*;
use crate::api::session_path;
use crate::session::SessionError;
use crate::status::SessionStatus;
use crate::store::{StoreError, VendorObject};
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};
use translate::Translator;

const ENVIRONMENT: &str = "anthropic.environment";
const AGENT: &str = "anthropic.agent";
const SESSION: &str = "anthropic.session";

/// Held while a session record is read and written back (its title, metadata, resources,
/// archive), so two changes on this replica cannot lose one another.
static RECORDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The metadata key naming the harness template an agent (or its environment) runs on.
const HARNESS_KEY: &str = "sandwarden.harness";

/// The routes, relative to the `/anthropic` mount.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/environments",
            post(create_environment).get(list_of::<Environments>),
        )
        .route(
            "/v1/environments/{id}",
            get(get_of::<Environments>)
                .post(update_environment)
                .delete(delete_environment),
        )
        .route(
            "/v1/environments/{id}/archive",
            post(archive_of::<Environments>),
        )
        .route("/v1/agents", post(create_agent).get(list_of::<Agents>))
        .route("/v1/agents/{id}", get(get_of::<Agents>).post(update_agent))
        .route("/v1/agents/{id}/archive", post(archive_of::<Agents>))
        .route("/v1/agents/{id}/versions", get(agent_versions))
        .route("/v1/sessions", post(create_session).get(list_sessions))
        .route(
            "/v1/sessions/{id}",
            get(get_session).post(update_session).delete(delete_session),
        )
        .route("/v1/sessions/{id}/archive", post(archive_session))
        .route(
            "/v1/sessions/{id}/events",
            post(send_events).get(list_events),
        )
        .route("/v1/sessions/{id}/events/stream", get(stream_events))
        .route(
            "/v1/sessions/{id}/resources",
            post(files::add_resource).get(files::list_resources),
        )
        .route(
            "/v1/sessions/{id}/resources/{resource_id}",
            get(files::get_resource)
                .post(files::update_resource)
                .delete(files::delete_resource),
        )
        .route("/v1/files", post(files::upload_file).get(files::list_files))
        .route(
            "/v1/files/{id}",
            get(files::get_file).delete(files::delete_file),
        )
        .route("/v1/files/{id}/content", get(files::file_content))
        .fallback(unsupported)
}

// ---- errors

async fn unsupported(req: Request) -> Problem {
    unsupported_route(
        &req,
        "Anthropic Managed Agents API (environments, agents, sessions, their events and \
         resources, files)",
        "docs/anthropic.md",
    )
}

/// Answers under `/anthropic` in Anthropic's error shape (`vendor_shape`).
pub async fn errors(req: Request, next: Next) -> Response {
    vendor_shape(req, next, error_body).await
}

fn error_body(status: StatusCode, doc: &Value, request_id: Option<String>) -> Value {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    };
    json!({
        "type": "error",
        "error": {
            "type": kind,
            "message": doc["detail"].as_str().unwrap_or("the request failed"),
            "details": {"error_code": doc["type"]},
        },
        "request_id": request_id,
    })
}

#[derive(Deserialize, Default)]
struct PageQuery {
    limit: Option<i64>,
    page: Option<String>,
    include_archived: Option<bool>,
    order: Option<String>,
}

/// An object list's page token: the last object's creation time and id.
fn object_cursor(page: Option<&str>) -> Result<Option<(String, String)>, Problem> {
    page.map(|p| {
        p.split_once('|')
            .map(|(t, id)| (t.to_string(), id.to_string()))
            .ok_or_else(|| invalid("`page` is a token from a previous page's `next_page`"))
    })
    .transpose()
}

/// A page of stored objects in Anthropic's list shape (`data`, `next_page`).
async fn object_page(
    orch: &AppState,
    tenant: &str,
    kind: &str,
    q: &PageQuery,
    default_desc: bool,
) -> Result<(Vec<VendorObject>, Option<String>), Problem> {
    let limit = limit_of(q.limit, 20, 100)?;
    let desc = match q.order.as_deref() {
        None => default_desc,
        Some("desc") => true,
        Some("asc") => false,
        Some(_) => return Err(invalid("`order` is `asc` or `desc`")),
    };
    let mut objects = orch
        .store
        .list_objects(
            tenant,
            kind,
            object_cursor(q.page.as_deref())?,
            desc,
            q.include_archived.unwrap_or(false),
            limit + 1,
        )
        .await
        .map_err(store_problem)?;
    let next = if objects.len() as i64 > limit {
        objects.truncate(limit as usize);
        objects.last().map(|o| format!("{}|{}", o.created_at, o.id))
    } else {
        None
    };
    Ok((objects, next))
}

fn list_answer(data: Vec<Value>, next_page: Option<String>) -> Response {
    Json(json!({"data": data, "next_page": next_page})).into_response()
}

/// A kind of stored object with the same list, retrieve and archive routes.
trait Kind {
    const NAME: &'static str;
}

struct Environments;
impl Kind for Environments {
    const NAME: &'static str = ENVIRONMENT;
}

struct Agents;
impl Kind for Agents {
    const NAME: &'static str = AGENT;
}

async fn list_of<K: Kind>(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let (objects, next) = object_page(&orch, &caller.tenant, K::NAME, &q, false).await?;
    Ok(list_answer(
        objects.into_iter().map(|o| o.body).collect(),
        next,
    ))
}

#[derive(Deserialize)]
struct VersionQuery {
    version: Option<i64>,
}

/// An object's newest version, or `?version=` (agents keep every version).
async fn get_of<K: Kind>(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<VersionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    Ok(Json(
        object(&orch, &caller.tenant, K::NAME, &id, q.version)
            .await?
            .body,
    )
    .into_response())
}

async fn archive_of<K: Kind>(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let o = object(&orch, &caller.tenant, K::NAME, &id, None).await?;
    Ok(Json(archive(&orch, o).await?).into_response())
}

// ---- environments

#[derive(Deserialize)]
struct EnvironmentBody {
    name: Option<String>,
    description: Option<String>,
    config: Option<Value>,
    metadata: Option<Value>,
    scope: Option<String>,
}

/// The hosts `allow_package_managers` opens: the public registries of the package managers
/// Anthropic's environments name (apt, cargo, gem, go, npm, pip).
const PACKAGE_REGISTRIES: [&str; 13] = [
    "registry.npmjs.org",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "rubygems.org",
    "proxy.golang.org",
    "sum.golang.org",
    "deb.debian.org",
    "security.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
];

/// An environment's `config`: a `cloud` container with no packages is what a sandwarden template
/// is, and `limited` networking narrows the session's sandbox's egress (`narrows`: whether this
/// server's sandboxes can be narrowed); the rest has no counterpart per session and is refused.
fn checked_config(config: Option<&Value>, narrows: bool) -> Result<Value, Problem> {
    let default = json!({"type": "cloud", "networking": {"type": "unrestricted"},
                         "packages": {}});
    let Some(config) = config.filter(|c| !c.is_null()) else {
        return Ok(default);
    };
    match config["type"].as_str() {
        Some("cloud") => {}
        Some("self_hosted") => {
            return Err(invalid(
                "self_hosted environments are not supported: sandwarden runs the sandbox itself \
                 (use a `cloud` config)",
            ));
        }
        _ => return Err(invalid("`config.type` is `cloud`")),
    }
    let networking = match config["networking"]["type"].as_str() {
        None | Some("unrestricted") => json!({"type": "unrestricted"}),
        Some("limited") => {
            let n = &config["networking"];
            let hosts: Vec<String> = match &n["allowed_hosts"] {
                Value::Null => Vec::new(),
                Value::Array(list) => list
                    .iter()
                    .map(|h| h.as_str().map(String::from))
                    .collect::<Option<_>>()
                    .ok_or_else(|| invalid("`allowed_hosts` are host names"))?,
                _ => return Err(invalid("`allowed_hosts` is a list of host names")),
            };
            let mut counted = hosts.clone();
            if n["allow_package_managers"] == true {
                counted.extend(PACKAGE_REGISTRIES.iter().map(|h| h.to_string()));
            }
            crate::egress::Narrowing::parse(&counted).map_err(|e| {
                invalid(format!(
                    "`config.networking.allowed_hosts` (with the {} package registries \
                     `allow_package_managers` adds) {e}",
                    PACKAGE_REGISTRIES.len()
                ))
            })?;
            if !narrows {
                return Err(invalid(
                    "`limited` networking narrows a sandbox's egress through serve's egress \
                     proxy, which this server's sandboxes do not go through (docs/security.md): \
                     use `unrestricted`, or run confined sandboxes (bwrap, docker)",
                ));
            }
            json!({"type": "limited", "allowed_hosts": hosts,
                   "allow_mcp_servers": n["allow_mcp_servers"].as_bool().unwrap_or(false),
                   "allow_package_managers": n["allow_package_managers"].as_bool().unwrap_or(false)})
        }
        Some(other) => {
            return Err(invalid(format!(
                "`config.networking.type` is `unrestricted` or `limited`, not {other:?}"
            )));
        }
    };
    // Checked against the session's template when a session names it (nothing is installed).
    let packages = wanted_packages(&config["packages"], &[])?;
    Ok(json!({"type": "cloud", "networking": networking, "packages": packages}))
}

/// The hosts a session's sandbox may reach under its environment's `limited` networking (the
/// agent's MCP servers' and the package registries' hosts when it says so); `None` when
/// unrestricted.
fn egress_allow(config: &Value, agent: &Value) -> Option<Vec<String>> {
    let n = &config["networking"];
    if n["type"] != "limited" {
        return None;
    }
    let mut hosts: Vec<String> = n["allowed_hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h.as_str().map(String::from))
        .collect();
    if n["allow_mcp_servers"] == true {
        hosts.extend(
            agent["mcp_servers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| reqwest::Url::parse(s["url"].as_str()?).ok())
                .filter_map(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?))),
        );
    }
    if n["allow_package_managers"] == true {
        hosts.extend(PACKAGE_REGISTRIES.iter().map(|h| h.to_string()));
    }
    hosts.sort();
    hosts.dedup();
    Some(hosts)
}

async fn create_environment(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<EnvironmentBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    checked_texts(b.name.as_deref(), b.description.as_deref())?;
    let name = b
        .name
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| invalid("`name` is required"))?;
    let now = crate::store::now();
    let id = new_id("env");
    let body = json!({
        "type": "environment", "id": id, "name": name, "description": b.description,
        "config": checked_config(b.config.as_ref(), orch.runtime.narrows_egress())?,
        "metadata": checked_metadata(b.metadata.as_ref())?,
        "scope": b.scope.unwrap_or_else(|| "organization".into()),
        "created_at": now, "updated_at": now, "archived_at": null,
    });
    check_room(&orch, &caller.tenant, ENVIRONMENT, &body).await?;
    let o = first_version(&caller.tenant, ENVIRONMENT, id, body, now);
    orch.store.put_object(&o).await.map_err(store_problem)?;
    Ok(Json(o.body).into_response())
}

async fn update_environment(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<EnvironmentBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    checked_texts(b.name.as_deref(), b.description.as_deref())?;
    if b.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(invalid("`name` cannot be empty"));
    }
    let mut o = object(&orch, &caller.tenant, ENVIRONMENT, &id, None).await?;
    if let Some(name) = b.name {
        o.body["name"] = json!(name);
    }
    if let Some(d) = b.description {
        o.body["description"] = json!(d);
    }
    if b.config.is_some() {
        o.body["config"] = checked_config(b.config.as_ref(), orch.runtime.narrows_egress())?;
    }
    if b.metadata.is_some() {
        o.body["metadata"] = merged_metadata(&o.body["metadata"], b.metadata.as_ref())?;
    }
    o.body["updated_at"] = json!(crate::store::now());
    check_size(&o.body)?;
    orch.store.update_object(&o).await.map_err(store_problem)?;
    Ok(Json(o.body).into_response())
}

async fn delete_environment(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let found = orch
        .store
        .delete_object(&caller.tenant, ENVIRONMENT, &id)
        .await
        .map_err(store_problem)?;
    if !found {
        return Err(not_found("environment", &id));
    }
    Ok(Json(json!({"id": id, "type": "environment_deleted"})).into_response())
}

// ---- agents

#[derive(Deserialize)]
struct AgentBody {
    name: Option<String>,
    model: Option<Value>,
    description: Option<String>,
    system: Option<String>,
    tools: Option<Vec<Value>>,
    mcp_servers: Option<Vec<Value>>,
    skills: Option<Vec<Value>>,
    metadata: Option<Value>,
    multiagent: Option<Value>,
    execution_identity: Option<Value>,
    version: Option<i64>,
}

/// A `custom` tool (the client runs it) as the native session's client tool.
fn custom_tool(tool: &Value) -> sandwarden_proto::event::ClientToolSpec {
    sandwarden_proto::event::ClientToolSpec {
        name: tool["name"].as_str().unwrap_or_default().to_string(),
        description: tool["description"].as_str().unwrap_or_default().to_string(),
        input_schema: if tool["input_schema"].is_null() {
            json!({"type": "object"})
        } else {
            tool["input_schema"].clone()
        },
    }
}

/// An agent's MCP servers as stored: `{type, name, url}` only.
fn mcp_servers(given: Option<&[Value]>) -> Value {
    given
        .unwrap_or_default()
        .iter()
        .map(|s| json!({"type": "url", "name": s["name"], "url": s["url"]}))
        .collect()
}

/// `name` and `description` within their bounds.
fn checked_texts(name: Option<&str>, description: Option<&str>) -> Result<(), Problem> {
    short("name", name, 256)?;
    short("description", description, 2048)
}

/// The model as Anthropic's agent shows it (`{id, …}`), from a string or an object.
fn checked_model(model: &Value) -> Result<Value, Problem> {
    let id = match model {
        Value::String(s) => s.clone(),
        Value::Object(m) => m
            .get("id")
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| invalid("`model.id` is required"))?,
        _ => return Err(invalid("`model` is a model id or `{id}`")),
    };
    if id.trim().is_empty() {
        return Err(invalid("`model` is required"));
    }
    Ok(json!({"id": id, "speed": "standard"}))
}

/// What an agent may say here, each refusal naming why.
fn checked_agent_fields(b: &AgentBody) -> Result<(), Problem> {
    checked_texts(b.name.as_deref(), b.description.as_deref())?;
    if b.tools.as_ref().is_some_and(|t| t.len() > 20)
        || b.mcp_servers.as_ref().is_some_and(|m| m.len() > 20)
    {
        return Err(invalid(
            "an agent has at most 20 `tools` and 20 `mcp_servers`",
        ));
    }
    checked_instructions("system", b.system.as_deref())?;
    for tool in b.tools.iter().flatten() {
        match tool["type"].as_str() {
            Some("agent_toolset_20260401") => {
                if tool.get("configs").is_some_and(|c| !c.is_null())
                    || tool.get("default_config").is_some_and(|c| !c.is_null())
                {
                    return Err(invalid(
                        "`tools[].configs` / `default_config` are not supported: the agent CLI's \
                         own tools and permission policy apply, and every permission it asks \
                         arrives as `agent.tool_use` with `evaluated_permission: ask`",
                    ));
                }
            }
            Some("custom") => {
                custom_tool(tool).validate().map_err(invalid)?;
            }
            other => {
                return Err(invalid(format!(
                    "tools of type {} are not supported: only `agent_toolset_20260401`",
                    other.unwrap_or("(none)")
                )));
            }
        }
    }
    let mut custom = std::collections::BTreeSet::new();
    for tool in b.tools.iter().flatten().filter(|t| t["type"] == "custom") {
        if !custom.insert(tool["name"].as_str().unwrap_or_default()) {
            return Err(invalid(format!(
                "custom tool {} is given twice",
                tool["name"]
            )));
        }
    }
    for server in b.mcp_servers.iter().flatten() {
        if server["name"] == sandwarden_proto::event::CLIENT_TOOLS_SERVER {
            return Err(invalid(format!(
                "MCP server name {:?} is taken by the agent's custom tools: rename it",
                sandwarden_proto::event::CLIENT_TOOLS_SERVER
            )));
        }
        if server["type"].as_str() != Some("url")
            || server["name"].as_str().is_none()
            || server["url"].as_str().is_none()
        {
            return Err(invalid(
                "`mcp_servers[]` are `{type: \"url\", name, url}` (streamable HTTP)",
            ));
        }
        let url = server["url"].as_str().unwrap_or("");
        let userinfo = url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'));
        if userinfo
            || server
                .get("authorization_token")
                .is_some_and(|t| !t.is_null())
        {
            return Err(invalid(
                "`mcp_servers[]` with credentials (`authorization_token`, a user in the URL) are \
                 not supported: sandwarden stores no credentials with an agent",
            ));
        }
    }
    if b.skills.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("`skills` are not supported"));
    }
    if b.multiagent.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(invalid("`multiagent` is not supported"));
    }
    if b.execution_identity.as_ref().is_some_and(|m| !m.is_null()) {
        return Err(invalid("`execution_identity` is not supported"));
    }
    Ok(())
}

async fn create_agent(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<AgentBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    checked_agent_fields(&b)?;
    let name = b
        .name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| invalid("`name` is required"))?;
    let model = checked_model(
        b.model
            .as_ref()
            .ok_or_else(|| invalid("`model` is required"))?,
    )?;
    let now = crate::store::now();
    let id = new_id("agent");
    let body = json!({
        "type": "agent", "id": id, "version": 1, "name": name,
        "description": b.description, "model": model, "system": b.system,
        "tools": b.tools.unwrap_or_default(), "mcp_servers": mcp_servers(b.mcp_servers.as_deref()),
        "skills": [], "metadata": checked_metadata(b.metadata.as_ref())?,
        "multiagent": null, "execution_identity": null,
        "created_at": now, "updated_at": now, "archived_at": null,
    });
    check_room(&orch, &caller.tenant, AGENT, &body).await?;
    let o = first_version(&caller.tenant, AGENT, id, body, now);
    orch.store.put_object(&o).await.map_err(store_problem)?;
    Ok(Json(o.body).into_response())
}

/// A new version of the agent: the fields given replace the old ones (`metadata` is patched).
/// `version`, when given, must be the current one.
async fn update_agent(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<AgentBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    checked_agent_fields(&b)?;
    let old = object(&orch, &caller.tenant, AGENT, &id, None).await?;
    if let Some(v) = b.version
        && v != old.version
    {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "version_conflict",
            format!(
                "the agent is at version {}, not {v}: retrieve it and apply the change again",
                old.version
            ),
        ));
    }
    if old.version >= MAX_VERSIONS {
        return Err(invalid(format!(
            "an agent keeps at most {MAX_VERSIONS} versions: create a new agent"
        )));
    }
    let mut body = old.body.clone();
    let version = old.version + 1;
    if let Some(name) = &b.name {
        body["name"] = json!(name);
    }
    if let Some(model) = &b.model {
        body["model"] = checked_model(model)?;
    }
    if let Some(d) = &b.description {
        body["description"] = json!(d);
    }
    if let Some(tools) = &b.tools {
        body["tools"] = json!(tools);
    }
    if b.mcp_servers.is_some() {
        body["mcp_servers"] = mcp_servers(b.mcp_servers.as_deref());
    }
    if b.metadata.is_some() {
        body["metadata"] = merged_metadata(&body["metadata"], b.metadata.as_ref())?;
    }
    let now = crate::store::now();
    body["version"] = json!(version);
    body["updated_at"] = json!(now);
    check_size(&body)?;
    let o = VendorObject {
        version,
        body: body.clone(),
        ..old
    };
    match orch.store.put_object(&o).await {
        Err(StoreError::Conflict) => Err(Problem::new(
            StatusCode::CONFLICT,
            "version_conflict",
            "the agent changed meanwhile: retrieve it and apply the change again",
        )),
        other => other.map_err(store_problem),
    }?;
    Ok(Json(body).into_response())
}

async fn agent_versions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    object(&orch, &caller.tenant, AGENT, &id, None).await?;
    let limit = limit_of(q.limit, 20, 100)?;
    let after = match q.page.as_deref() {
        None => 0,
        Some(p) => p
            .parse()
            .map_err(|_| invalid("`page` is a token from a previous page's `next_page`"))?,
    };
    let mut versions = orch
        .store
        .object_versions(&caller.tenant, AGENT, &id, after, limit + 1)
        .await
        .map_err(store_problem)?;
    let next = if versions.len() as i64 > limit {
        versions.truncate(limit as usize);
        versions.last().map(|o| o.version.to_string())
    } else {
        None
    };
    Ok(list_answer(
        versions.into_iter().map(|o| o.body).collect(),
        next,
    ))
}

// ---- sessions

#[derive(Deserialize)]
struct SessionBody {
    agent: Option<Value>,
    environment_id: Option<String>,
    title: Option<String>,
    metadata: Option<Value>,
    #[serde(default)]
    resources: Vec<Value>,
    #[serde(default)]
    initial_events: Vec<Value>,
    #[serde(default)]
    vault_ids: Vec<Value>,
    budget: Option<Value>,
}

/// The session's status in Anthropic's words.
fn status_word(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Running => "running",
        SessionStatus::Creating | SessionStatus::Ready | SessionStatus::InputRequired => "idle",
        SessionStatus::Failed | SessionStatus::Dead | SessionStatus::Deleted => "terminated",
    }
}

/// The Anthropic session: its record, with the native session's status and the usage of its
/// turns.
async fn session_view(orch: &AppState, record: &VendorObject) -> Result<Value, Problem> {
    let native = orch
        .store
        .get_session(&record.tenant, &record.id)
        .await
        .map_err(store_problem)?;
    let mut body = record.body.clone();
    let Some(native) = native else {
        body["status"] = json!("terminated");
        return Ok(body);
    };
    let (input, output) = session_usage(orch, &native.id)
        .await
        .map_err(store_problem)?;
    body["status"] = json!(status_word(native.status));
    body["updated_at"] = json!(native.updated_at);
    body["usage"] = json!({"input_tokens": input, "output_tokens": output,
                           "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0});
    body["stats"] = json!({});
    Ok(body)
}

/// The Anthropic session record of `id` (a native session made through this API).
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

/// The agent version a session names: an id (its latest version) or `{type: "agent", id,
/// version}`.
async fn resolve_agent(orch: &AppState, tenant: &str, agent: &Value) -> Result<Value, Problem> {
    let (id, version) = match agent {
        Value::String(id) => (id.clone(), None),
        Value::Object(a) => {
            if a.get("type").and_then(Value::as_str) == Some("agent_with_overrides") {
                return Err(invalid(
                    "`agent_with_overrides` is not supported: create a new agent version instead",
                ));
            }
            let id = a
                .get("id")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("`agent.id` is required"))?;
            (id.to_string(), a.get("version").and_then(Value::as_i64))
        }
        _ => {
            return Err(invalid(
                "`agent` is an agent id or `{type: \"agent\", id, version}`",
            ));
        }
    };
    // Archiving marks the newest version: an older one named explicitly is archived too.
    if object(orch, tenant, AGENT, &id, None)
        .await?
        .archived_at
        .is_some()
    {
        return Err(invalid(format!("agent {id:?} is archived")));
    }
    Ok(object(orch, tenant, AGENT, &id, version).await?.body)
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
    if b.budget.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(invalid(
            "`budget` is not supported: a tenant's budget is set on its API key",
        ));
    }
    let agent = resolve_agent(
        &orch,
        &caller.tenant,
        b.agent
            .as_ref()
            .ok_or_else(|| invalid("`agent` is required"))?,
    )
    .await?;
    let environment_id = b
        .environment_id
        .ok_or_else(|| invalid("`environment_id` is required"))?;
    let environment = object(&orch, &caller.tenant, ENVIRONMENT, &environment_id, None).await?;
    if environment.archived_at.is_some() {
        return Err(invalid(format!(
            "environment {environment_id:?} is archived"
        )));
    }
    let harness = agent["metadata"][HARNESS_KEY]
        .as_str()
        .or(environment.body["metadata"][HARNESS_KEY].as_str())
        .map(String::from)
        .ok_or_else(|| {
            let names: Vec<String> = orch.templates().keys().cloned().collect();
            invalid(format!(
                "say which harness runs this agent: set metadata {{\"{HARNESS_KEY}\": \"<template>\"}} \
                 on the agent or the environment (templates here: {})",
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
    check_packages(
        &orch,
        &harness,
        &wanted_packages(&environment.body["config"]["packages"], &[])?,
    )?;
    short("title", b.title.as_deref(), 512)?;
    let initial = checked_inputs(&b.initial_events)?;
    if initial.iter().any(|i| !matches!(i, UserInput::Message(_))) {
        return Err(invalid("`initial_events` hold `user.message` events only"));
    }
    let mcp_servers = agent["mcp_servers"]
        .as_array()
        .map(|servers| {
            servers
                .iter()
                .map(|s| sandwarden_proto::event::McpServerSpec {
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    kind: Some("http".into()),
                    command: None,
                    args: Vec::new(),
                    env: Default::default(),
                    url: s["url"].as_str().map(String::from),
                    headers: Default::default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let metadata = checked_metadata(b.metadata.as_ref())?;
    // The files `resources` name are written into the working directory before the agent starts.
    let _held = match b.resources.is_empty() {
        true => None,
        false => Some(
            super::files::hold_for_files(&orch, &caller, super::files::MAX_SESSION_FILE_BYTES)
                .await?,
        ),
    };
    let (bind_files, resources) = files::session_files(&orch, &caller.tenant, &b.resources).await?;
    let request = crate::session::CreateRequest {
        harness,
        id: None,
        title: b.title.clone(),
        metadata: Some(
            json!({"anthropic.agent_id": agent["id"], "anthropic.environment_id": environment_id}),
        ),
        env: Default::default(),
        files: bind_files,
        cwd: None,
        idle_timeout_s: None,
        mcp_servers,
        session_id: None,
        client_tools: agent["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["type"] == "custom")
            .map(custom_tool)
            .collect(),
        // Added to the agent CLI's own system prompt (docs/anthropic.md says how, per harness).
        instructions: agent["system"]
            .as_str()
            .filter(|s| !s.trim().is_empty())
            .map(String::from),
        egress_allow: match egress_allow(&environment.body["config"], &agent) {
            Some(hosts) => {
                // The agent's MCP servers' hosts join the environment's here, so check them all.
                crate::egress::Narrowing::parse(&hosts).map_err(|e| {
                    invalid(format!(
                        "the environment's `limited` networking with this agent's MCP servers \
                         (`allow_mcp_servers`) {e}"
                    ))
                })?;
                Some(hosts)
            }
            None => None,
        },
    };
    let (session, _) = orch
        .create(&caller.tenant, request, None, &caller.limits)
        .await?;
    let now = crate::store::now();
    let body = json!({
        "type": "session", "id": session.id, "status": "idle", "agent": agent,
        "environment_id": environment_id, "title": b.title, "metadata": metadata,
        "resources": resources, "vault_ids": [], "budget": null, "outcome_evaluations": [],
        "stats": {}, "usage": {"input_tokens": 0, "output_tokens": 0},
        "created_at": now, "updated_at": now, "archived_at": null, "deployment_id": null,
    });
    let record = first_version(&caller.tenant, SESSION, session.id.clone(), body, now);
    // (The native session quota bounds how many of these a tenant makes.)
    if let Err(e) = orch.store.put_object(&record).await {
        // The native session must not outlive a record that was never written.
        let _ = orch.delete(&caller.tenant, &session.id).await;
        return Err(store_problem(e));
    }
    for input in initial {
        if let UserInput::Message(content) = input
            && let Err(p) = send_message(&orch, &caller, &record, &content).await
        {
            // A session whose first message was refused is not left behind unseen.
            let _ = discard_session(&orch, &caller, SESSION, &session.id).await;
            return Err(p);
        }
    }
    Ok(Json(session_view(&orch, &record).await?).into_response())
}

async fn get_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = session_record(&orch, &caller, &id).await?;
    // Messages queued before a restart go on when the session is next used.
    super::queue::drain(&orch, &caller, &record.id);
    Ok(Json(session_view(&orch, &record).await?).into_response())
}

#[derive(Deserialize)]
struct SessionUpdate {
    title: Option<String>,
    metadata: Option<Value>,
    agent: Option<Value>,
    budget: Option<Value>,
    vault_ids: Option<Value>,
}

async fn update_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SessionUpdate>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    if b.agent.is_some() || b.budget.is_some() || b.vault_ids.is_some() {
        return Err(invalid(
            "only `title` and `metadata` of a session can change here (`agent`, `budget` and \
             `vault_ids` are not supported)",
        ));
    }
    let _records = RECORDS.lock().await;
    let mut record = session_record(&orch, &caller, &id).await?;
    if let Some(title) = b.title {
        record.body["title"] = json!(title);
    }
    if b.metadata.is_some() {
        record.body["metadata"] = merged_metadata(&record.body["metadata"], b.metadata.as_ref())?;
    }
    record.body["updated_at"] = json!(crate::store::now());
    orch.store
        .update_object(&record)
        .await
        .map_err(store_problem)?;
    Ok(Json(session_view(&orch, &record).await?).into_response())
}

#[derive(Deserialize, Default)]
struct SessionListQuery {
    limit: Option<i64>,
    page: Option<String>,
    include_archived: Option<bool>,
    order: Option<String>,
    agent_id: Option<String>,
}

async fn list_sessions(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<SessionListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let page = PageQuery {
        limit: q.limit,
        page: q.page,
        include_archived: q.include_archived,
        order: q.order,
    };
    let (records, next) = object_page(&orch, &caller.tenant, SESSION, &page, true).await?;
    let mut data = Vec::with_capacity(records.len());
    for r in records {
        if q.agent_id
            .as_deref()
            .is_some_and(|a| r.body["agent"]["id"].as_str() != Some(a))
        {
            continue;
        }
        data.push(session_view(&orch, &r).await?);
    }
    Ok(Json(json!({"data": data, "next_page": next, "prev_page": null})).into_response())
}

async fn archive_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = session_record(&orch, &caller, &id).await?;
    stop_native(&orch, &caller, &record.id).await?;
    let _records = RECORDS.lock().await;
    let record = session_record(&orch, &caller, &id).await?;
    let body = archive(&orch, record.clone()).await?;
    let record = VendorObject { body, ..record };
    Ok(Json(session_view(&orch, &record).await?).into_response())
}

/// Deletes the session: its sandbox stops and it is gone from this API (`404` from then on).
async fn delete_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = session_record(&orch, &caller, &id).await?;
    discard_session(&orch, &caller, SESSION, &record.id).await?;
    Ok(Json(json!({"id": id, "type": "session_deleted"})).into_response())
}

// ---- events: input

/// The events of one request, every one checked before any is acted on: at most 50, and at
/// most one message (a second could only meet the first's turn).
fn checked_inputs(events: &[Value]) -> Result<Vec<UserInput>, Problem> {
    if events.len() > 50 {
        return Err(invalid("send at most 50 events at once"));
    }
    let inputs: Vec<UserInput> = events
        .iter()
        .map(UserInput::parse)
        .collect::<Result<_, _>>()?;
    if inputs
        .iter()
        .filter(|i| matches!(i, UserInput::Message(_)))
        .count()
        > 1
    {
        return Err(invalid(
            "send one `user.message` at a time: the next waits for `session.status_idle`",
        ));
    }
    Ok(inputs)
}

/// One input event a client sends.
enum UserInput {
    /// Native message parts.
    Message(Vec<Value>),
    Interrupt,
    Confirmation {
        tool_use_id: String,
        allow: bool,
    },
    ToolResult {
        custom_tool_use_id: String,
        output: String,
        is_error: bool,
    },
}

impl UserInput {
    fn parse(e: &Value) -> Result<UserInput, Problem> {
        match e["type"].as_str() {
            Some("user.message") => {
                let content = e["content"]
                    .as_array()
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| invalid("`user.message` needs `content` blocks"))?;
                content
                    .iter()
                    .map(native_part)
                    .collect::<Result<_, _>>()
                    .map(UserInput::Message)
            }
            Some("user.interrupt") => Ok(UserInput::Interrupt),
            Some("user.custom_tool_result") => {
                let id = e["custom_tool_use_id"]
                    .as_str()
                    .filter(|id| translate::seq_of_tool_use(id).is_some())
                    .ok_or_else(|| {
                        invalid(
                            "`user.custom_tool_result` needs the `custom_tool_use_id` of an \
                             `agent.custom_tool_use`",
                        )
                    })?;
                let output = match &e["content"] {
                    Value::String(text) => text.clone(),
                    Value::Array(blocks) => blocks
                        .iter()
                        .map(|b| match b["type"].as_str() {
                            Some("text") => Ok(b["text"].as_str().unwrap_or("").to_string()),
                            _ => Err(invalid("a custom tool result's content is text blocks")),
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .join("\n"),
                    Value::Null => String::new(),
                    _ => return Err(invalid("`content` is a list of text blocks")),
                };
                Ok(UserInput::ToolResult {
                    custom_tool_use_id: id.to_string(),
                    output,
                    is_error: e["is_error"].as_bool().unwrap_or(false),
                })
            }
            Some("user.tool_confirmation") => {
                let tool_use_id = e["tool_use_id"]
                    .as_str()
                    .filter(|id| translate::seq_of_tool_use(id).is_some())
                    .ok_or_else(|| {
                        invalid(
                            "`user.tool_confirmation` needs the `tool_use_id` of an \
                             `agent.tool_use` (from `session.status_idle.stop_reason.event_ids`)",
                        )
                    })?;
                let allow = match e["result"].as_str() {
                    Some("allow") => true,
                    Some("deny") => false,
                    _ => return Err(invalid("`result` is `allow` or `deny`")),
                };
                Ok(UserInput::Confirmation {
                    tool_use_id: tool_use_id.to_string(),
                    allow,
                })
            }
            Some(kind @ ("user.tool_result" | "user.define_outcome" | "system.message")) => {
                Err(invalid(format!(
                    "`{kind}` events are not supported: self-hosted tools, outcomes and system \
                 messages have no counterpart here yet (docs/anthropic.md)"
                )))
            }
            other => Err(invalid(format!(
                "unknown event type {}: send `user.message`, `user.interrupt` or \
                 `user.tool_confirmation`",
                other.unwrap_or("(none)")
            ))),
        }
    }
}

/// An Anthropic content block as a native message part.
fn native_part(block: &Value) -> Result<Value, Problem> {
    let source = &block["source"];
    let media = source["media_type"].as_str();
    match block["type"].as_str() {
        Some("text") => Ok(json!({"type": "text",
            "text": block["text"].as_str().ok_or_else(|| invalid("a text block needs `text`"))?})),
        Some(kind @ ("image" | "document")) => {
            let part_type = if kind == "image" { "image" } else { "file" };
            let mut part = match source["type"].as_str() {
                Some("base64") => json!({"type": part_type, "data": source["data"]}),
                Some("url") => json!({"type": part_type, "url": source["url"]}),
                Some("text") if kind == "document" => {
                    json!({"type": "file", "text": source["data"]})
                }
                Some("file") => {
                    return Err(invalid(
                        "content from the Files API (`source.type: file`) is not supported: send \
                         it as base64",
                    ));
                }
                _ => return Err(invalid(format!("a {kind} block needs a `source`"))),
            };
            if let Some(m) = media {
                part["mime_type"] = json!(m);
            }
            if let Some(title) = block["title"].as_str() {
                part["name"] = json!(title);
            }
            Ok(part)
        }
        other => Err(invalid(format!(
            "content blocks are `text`, `image` or `document`, not {}",
            other.unwrap_or("(none)")
        ))),
    }
}

/// Starts a turn with the message (the agent's model applied); the `user.message` event it
/// will open, with its id.
async fn send_message(
    orch: &AppState,
    caller: &Caller,
    record: &VendorObject,
    parts: &[Value],
) -> Result<Value, Problem> {
    let model = record.body["agent"]["model"]["id"].as_str();
    // Sent now, or queued behind the running turn.
    let turn_id = super::queue::send(orch, caller, &record.id, parts, model).await?;
    Ok(json!({
        "id": translate::user_message_id(&turn_id),
        "type": "user.message",
        "content": record_content(parts),
        "processed_at": null,
    }))
}

/// Native parts shown back as Anthropic content blocks.
fn record_content(parts: &[Value]) -> Vec<Value> {
    parts
        .iter()
        .map(|p| match p["type"].as_str() {
            Some("text") => json!({"type": "text", "text": p["text"]}),
            Some("image") => json!({"type": "image"}),
            _ => json!({"type": "document"}),
        })
        .collect()
}

#[derive(Deserialize)]
struct SendBody {
    events: Vec<Value>,
}

async fn send_events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SendBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    if b.events.is_empty() {
        return Err(invalid("`events` holds at least one event"));
    }
    // Every event is checked before any is acted on.
    let inputs = checked_inputs(&b.events)?;
    let record = session_record(&orch, &caller, &id).await?;
    let mut sent = Vec::with_capacity(inputs.len());
    for input in inputs {
        let event = match input {
            UserInput::Message(parts) => send_message(&orch, &caller, &record, &parts).await?,
            UserInput::Interrupt => {
                match orch.cancel(&caller.tenant, &record.id).await {
                    Ok(_) | Err(SessionError::NoTurnRunning) => {}
                    Err(e) => return Err(e.into()),
                }
                json!({"id": new_id("sevt"), "type": "user.interrupt", "processed_at": null})
            }
            UserInput::ToolResult {
                custom_tool_use_id,
                output,
                is_error,
            } => {
                let answer = sandwarden_proto::event::InputAnswer {
                    output: Some(output),
                    is_error,
                    ..Default::default()
                };
                answer_request(&orch, &caller, &record.id, &custom_tool_use_id, &answer).await?;
                json!({"id": new_id("sevt"), "type": "user.custom_tool_result",
                       "custom_tool_use_id": custom_tool_use_id, "is_error": is_error,
                       "processed_at": null})
            }
            UserInput::Confirmation { tool_use_id, allow } => {
                let answer = sandwarden_proto::event::InputAnswer {
                    decision: Some(if allow {
                        sandwarden_proto::event::Decision::ApproveOnce
                    } else {
                        sandwarden_proto::event::Decision::Deny
                    }),
                    ..Default::default()
                };
                answer_request(&orch, &caller, &record.id, &tool_use_id, &answer).await?;
                json!({"id": new_id("sevt"), "type": "user.tool_confirmation",
                       "tool_use_id": tool_use_id, "result": if allow { "allow" } else { "deny" },
                       "processed_at": null})
            }
        };
        sent.push(event);
    }
    Ok(Json(json!({"data": sent})).into_response())
}

/// Answers the request behind an `agent.tool_use` asked about or an `agent.custom_tool_use`
/// (`event_id`): the native `input_required` its id names. One answered already is not an error
/// (a client retrying).
async fn answer_request(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
    event_id: &str,
    answer: &sandwarden_proto::event::InputAnswer,
) -> Result<(), Problem> {
    let unknown = || {
        invalid(format!(
            "{event_id:?} is not an event of this session awaiting an answer (take it from \
             `session.status_idle.stop_reason.event_ids`)"
        ))
    };
    let seq = translate::seq_of_tool_use(event_id).ok_or_else(unknown)?;
    // Streams get an event when it is queued for the store's writer, before its commit: one
    // a client answers at once may not be readable yet, so the writer's queue is committed
    // (`flush`) before it is looked for again.
    let read = || async {
        orch.store
            .list_events(session_id, seq - 1, 1)
            .await
            .map(|mut e| e.pop().filter(|e| e.seq == seq))
            .map_err(store_problem)
    };
    let event = match read().await? {
        Some(event) => event,
        None => {
            orch.store.flush().await.map_err(store_problem)?;
            read().await?.ok_or_else(unknown)?
        }
    };
    if event.kind != "input_required" {
        tracing::warn!(seq, kind = %event.kind, "an answer names an event that asks nothing");
        return Err(unknown());
    }
    // A confirmation answers a permission request; a tool result, a client tool call.
    if event.data["client_tool"].is_object() != answer.output.is_some() {
        tracing::warn!(
            seq,
            "an answer is of the other kind than its event's question"
        );
        return Err(unknown());
    }
    let request_id = event.data["request_id"].as_str().ok_or_else(unknown)?;
    match orch
        .answer(&caller.tenant, session_id, request_id, answer)
        .await
    {
        Ok(_) => Ok(()),
        Err(SessionError::HarnessRefused(p)) if p.status == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// ---- events: history and stream

/// The session's history, oldest first, paged by `page`/`next_page`. A turn still running shows
/// what it has completed (a message appears once its text run has ended).
async fn list_events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let pairs = query_of(query)?;
    // Arrays come as `types[]=a&types[]=b`, which a struct cannot take: read the pairs.
    let (mut limit, mut page, mut types) = (None, None, Vec::new());
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => limit = Some(v.parse().map_err(|_| invalid("`limit` is a number"))?),
            "page" => page = Some(v),
            "order" if v != "asc" => {
                return Err(invalid("events are listed oldest first only (`order=asc`)"));
            }
            "types[]" | "types" => types.push(v),
            _ => {}
        }
    }
    let limit = limit_of(limit, 20, 1000)?;
    let after = page
        .as_deref()
        .map(|p| parse_place(p).ok_or_else(|| invalid("`page` is a token from `next_page`")))
        .transpose()?;
    let record = session_record(&orch, &caller, &id).await?;
    let keep = |o: &Out| types.is_empty() || types.iter().any(|t| t == o.kind());
    let (outs, more) = history(
        &orch,
        &caller,
        &record.id,
        after,
        (limit as usize, PAGE_BYTES),
        keep,
        Translator::new(false),
    )
    .await?;
    let next_page = more
        .then(|| outs.last().map(|o| place_token(o.place)))
        .flatten();
    let data: Vec<Value> = outs.into_iter().map(|o| o.event).collect();
    admitted_json(
        &orch,
        &caller,
        &json!({"data": data, "next_page": next_page}),
    )
    .await
}

/// The live stream: events completed from now on, each as an SSE frame whose `event:` is its
/// type (the SDK drops frames without one), with previews of `agent.message` when asked
/// (`event_deltas[]=agent.message`). A turn running when the stream opens is replayed from its
/// start, silently, so what it completes later is whole and carries its history id.
async fn stream_events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let pairs = query_of(query)?;
    let deltas = pairs
        .iter()
        .any(|(k, v)| (k == "event_deltas[]" || k == "event_deltas") && v == "agent.message");
    let slot = orch
        .streams
        .open(&caller.tenant, caller.limits.open_streams)?;
    let record = session_record(&orch, &caller, &id).await?;
    super::queue::drain(&orch, &caller, &record.id);
    live(
        &orch,
        &caller,
        record.id,
        slot,
        Translator::new(deltas),
        frame,
        super::Opening::default(),
    )
    .await
}

fn frame(out: &Out) -> SseEvent {
    let mut frame = SseEvent::default().event(out.kind());
    if !out.preview {
        frame = frame.id(translate::id_of(out));
    }
    frame.json_data(&out.event).unwrap_or_default()
}
