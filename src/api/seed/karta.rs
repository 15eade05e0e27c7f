//! Karta's consumer routes: the native ones (a create that names no harness takes the default
//! template or resumes `session_id`, a unary reply names its `agent`, text events carry
//! `data.part`, inputs are also answered with `PUT`), and the same under
//! `/v1/projects/{ref}/…`. A project is a grouping of a tenant's sessions with a pinned template
//! (its "active release"): a project with none refuses new sessions (`409`), and a session of
//! one project is `403` under another's routes. docs/seed-clients.md has the mapping.

use crate::api::{AppState, Caller, session_path};
use crate::session::CreateRequest;
use crate::store::VendorObject;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use sandwarden_proto::event::{InputAnswer, validate_id};
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use serde_json::{Value, json};

const KIND: &str = "project";
/// The metadata key naming a session's project (set only through a project's routes).
pub const PROJECT_KEY: &str = "sandwarden.project";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/projects", post(create_project).get(list_projects))
        .route(
            "/v1/projects/{project}",
            get(get_project)
                .patch(change_project)
                .delete(delete_project),
        )
        .route("/v1/projects/{project}/sessions", post(create_session))
        .route(
            "/v1/projects/{project}/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route(
            "/v1/projects/{project}/sessions/{id}/messages",
            post(post_message).get(get_messages),
        )
        .route("/v1/projects/{project}/sessions/{id}/events", get(events))
        .route("/v1/projects/{project}/sessions/{id}/cancel", post(cancel))
        .route(
            "/v1/projects/{project}/sessions/{id}/inputs/{request_id}",
            post(answer).put(answer),
        )
}

fn project_view(o: &VendorObject) -> Value {
    json!({
        "ref": o.id, "template": o.body["template"], "created_at": o.created_at,
        "updated_at": o.body["updated_at"],
    })
}

async fn project(orch: &AppState, caller: &Caller, r: &str) -> Result<VendorObject, Problem> {
    validate_id("project", r)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    orch.store
        .get_object(&caller.tenant, KIND, r, None)
        .await
        .map_err(crate::session::SessionError::from)?
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "project_not_found",
                format!("no project {r:?}; create it with POST /v1/projects"),
            )
        })
}

/// A template a project pins: one the server has.
fn check_template(orch: &AppState, template: &Value) -> Result<(), Problem> {
    match template {
        Value::Null => Ok(()),
        Value::String(t) if orch.templates().contains_key(t) => Ok(()),
        other => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_harness",
            format!(
                "`template` {other} is not a template here (GET /v1/templates lists them), or \
                 null for none"
            ),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectBody {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    template: Value,
}

/// `POST /v1/projects {ref, template?}`.
async fn create_project(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<ProjectBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(body) = body?;
    validate_id("ref", &body.reference)
        .map_err(|m| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_id", m))?;
    check_template(&orch, &body.template)?;
    let count = orch
        .store
        .count_objects(&caller.tenant, KIND)
        .await
        .map_err(crate::session::SessionError::from)?;
    if count >= 1_000 {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "project_limit",
            "a tenant has at most 1000 projects; delete one first",
        ));
    }
    let now = crate::store::now();
    let o = VendorObject {
        tenant: caller.tenant.clone(),
        kind: KIND.into(),
        id: body.reference.clone(),
        version: 1,
        body: json!({ "template": body.template, "updated_at": now }),
        created_at: now,
        archived_at: None,
    };
    orch.store.put_object(&o).await.map_err(|e| match e {
        crate::store::StoreError::Conflict => Problem::new(
            StatusCode::CONFLICT,
            "project_exists",
            format!("project {:?} exists already", body.reference),
        ),
        e => crate::session::SessionError::from(e).into(),
    })?;
    Ok((StatusCode::CREATED, Json(project_view(&o))).into_response())
}

async fn list_projects(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, Problem> {
    let all = orch
        .store
        .list_objects(&caller.tenant, KIND, None, false, false, 1_000)
        .await
        .map_err(crate::session::SessionError::from)?;
    let projects: Vec<Value> = all.iter().map(project_view).collect();
    Ok(Json(json!({ "projects": projects })).into_response())
}

async fn get_project(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(r): Path<String>,
) -> Result<Response, Problem> {
    Ok(Json(project_view(&project(&orch, &caller, &r).await?)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectChange {
    template: Value,
}

/// `PATCH /v1/projects/{ref} {template}`: pins another template (`null`: none) for the
/// sessions created from now on.
async fn change_project(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(r): Path<String>,
    body: Result<Json<ProjectChange>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(change) = body?;
    check_template(&orch, &change.template)?;
    let mut o = project(&orch, &caller, &r).await?;
    o.version += 1;
    o.body["template"] = change.template;
    o.body["updated_at"] = json!(crate::store::now());
    orch.store.put_object(&o).await.map_err(|e| match e {
        crate::store::StoreError::Conflict => Problem::new(
            StatusCode::CONFLICT,
            "project_changed",
            "the project changed meanwhile; read it and try again",
        ),
        e => crate::session::SessionError::from(e).into(),
    })?;
    Ok(Json(project_view(&o)).into_response())
}

/// `DELETE /v1/projects/{ref}`: the project goes; its sessions stay (the native routes reach
/// them).
async fn delete_project(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(r): Path<String>,
) -> Result<Response, Problem> {
    project(&orch, &caller, &r).await?;
    orch.store
        .delete_object(&caller.tenant, KIND, &r)
        .await
        .map_err(crate::session::SessionError::from)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The caller's session `id`, checked to be of project `r`: `403` when it is another's.
async fn in_project(orch: &AppState, caller: &Caller, r: &str, id: &str) -> Result<(), Problem> {
    project(orch, caller, r).await?;
    let scoped = session_path(&caller.tenant, id)?;
    let s = orch.get(&caller.tenant, &scoped).await?;
    if s.metadata[PROJECT_KEY] != r {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "other_project",
            format!("session {id:?} is not of project {r:?}"),
        ));
    }
    Ok(())
}

/// `POST /v1/projects/{ref}/sessions {metadata?, session_id?}`: a session of the project's
/// template (`409` when it pins none), or the project's session `session_id` resumed.
async fn create_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(r): Path<String>,
    headers: HeaderMap,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(mut req) = body?;
    let p = project(&orch, &caller, &r).await?;
    if let Some(given) = req.session_id.clone() {
        in_project(&orch, &caller, &r, &given).await?;
        return crate::api::create_session(State(orch), Extension(caller), headers, Ok(Json(req)))
            .await;
    }
    let Some(template) = p.body["template"].as_str() else {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "no_active_template",
            format!(
                "project {r:?} pins no template; PATCH /v1/projects/{r} {{\"template\": NAME}}"
            ),
        ));
    };
    if !req.harness.is_empty() && req.harness != template {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_session",
            format!("project {r:?} runs {template:?}; leave `harness` out"),
        ));
    }
    req.harness = template.to_string();
    let mut metadata = match req.metadata.take() {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_session",
                "`metadata` must be a JSON object",
            ));
        }
    };
    metadata.insert(PROJECT_KEY.into(), json!(r));
    req.metadata = Some(Value::Object(metadata));
    let key = crate::api::idempotency_key(&headers)?;
    let (session, created) = orch
        .create(&caller.tenant, req, key, &caller.limits)
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(crate::api::view(&orch, &session))).into_response())
}

async fn get_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((r, id)): Path<(String, String)>,
    query: Result<Query<crate::api::WaitQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    in_project(&orch, &caller, &r, &id).await?;
    crate::api::get_session(State(orch), Extension(caller), Path(id), query).await
}

async fn delete_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((r, id)): Path<(String, String)>,
    query: Result<Query<crate::api::TenantQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    in_project(&orch, &caller, &r, &id).await?;
    crate::api::delete_session(State(orch), Extension(caller), Path(id), query).await
}

async fn post_message(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((r, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Json<crate::session::message::MessageRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    in_project(&orch, &caller, &r, &id).await?;
    crate::api::post_message(State(orch), Extension(caller), Path(id), headers, body).await
}

async fn get_messages(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((r, id)): Path<(String, String)>,
    query: Result<Query<crate::api::HistoryQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    in_project(&orch, &caller, &r, &id).await?;
    crate::api::get_messages(State(orch), Extension(caller), Path(id), query).await
}

async fn events(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((r, id)): Path<(String, String)>,
    headers: HeaderMap,
    query: Result<Query<crate::api::EventsQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    in_project(&orch, &caller, &r, &id).await?;
    crate::api::get_events(State(orch), Extension(caller), Path(id), headers, query).await
}

async fn cancel(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((r, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    in_project(&orch, &caller, &r, &id).await?;
    crate::api::cancel(State(orch), Extension(caller), Path(id)).await
}

async fn answer(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((r, id, request_id)): Path<(String, String, String)>,
    body: Result<Json<InputAnswer>, JsonRejection>,
) -> Result<Response, Problem> {
    in_project(&orch, &caller, &r, &id).await?;
    crate::api::answer_input(State(orch), Extension(caller), Path((id, request_id)), body).await
}
