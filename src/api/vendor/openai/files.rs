//! OpenAI's Files API (`/files`) and a session's hosted environment (`/agents/environments/
//! {id}`, its `files`), over the stored files and the native session files
//! (`super::super::files`).
//!
//! A session's environment is the session's sandbox: its id is `env_` and the session's id.
//! Staging a file (`environments.files.create`, or the SDK's `files.upload(environment_id, …)`)
//! writes it into the session's working directory, where `/workspace/` is that directory, and
//! listing the environment's files lists the directory.

use super::*;
use crate::api::vendor::files::{self, Files};
use axum::extract::Multipart;

const FILES: Files = Files {
    meta: "openai.file",
    content: "openai.file_content",
};

/// The prefix of an environment id; the session's id follows it.
const ENVIRONMENT: &str = "env_";

/// The environment id of a session.
pub(super) fn environment_id(session_id: &str) -> String {
    format!("{ENVIRONMENT}{session_id}")
}

pub(super) async fn upload_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, Problem> {
    let (upload, _held) = files::read_upload(&orch, &caller, &headers, multipart).await?;
    let purpose = upload
        .fields
        .get("purpose")
        .ok_or_else(|| invalid("`purpose` is required (`user_data` for agents' files)"))?;
    const PURPOSES: [&str; 5] = ["user_data", "assistants", "vision", "batch", "fine-tune"];
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(invalid(format!(
            "`purpose` is one of {}",
            PURPOSES.join(", ")
        )));
    }
    let now = crate::store::now();
    let meta = json!({
        "object": "file", "id": new_id("file"), "bytes": upload.bytes.len(),
        "created_at": unix(&now), "filename": upload.filename, "purpose": purpose,
        "status": "processed", "expires_at": null, "status_details": null,
        "mime_type": upload.mime_type,
    });
    FILES
        .store(&orch, &caller.tenant, meta.clone(), &upload.bytes, now)
        .await?;
    Ok(Json(shown(meta)).into_response())
}

/// A stored file's metadata as OpenAI shows it (the media type is kept for downloads only).
fn shown(mut meta: Value) -> Value {
    if let Some(m) = meta.as_object_mut() {
        m.remove("mime_type");
    }
    meta
}

#[derive(Deserialize, Default)]
pub(super) struct FileListQuery {
    after: Option<String>,
    limit: Option<i64>,
    order: Option<String>,
    purpose: Option<String>,
}

pub(super) async fn list_files(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<FileListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let list = ListQuery {
        after: q.after,
        limit: q.limit,
        order: q.order,
        agent_id: None,
    };
    let (objects, more) = object_list(&orch, &caller.tenant, FILES.meta, &list).await?;
    let data = objects
        .into_iter()
        .map(|o| shown(o.body))
        .filter(|m| {
            q.purpose
                .as_ref()
                .is_none_or(|p| m["purpose"] == p.as_str())
        })
        .collect();
    Ok(Json(cursor_page(data, more)).into_response())
}

pub(super) async fn get_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let meta = FILES.meta(&orch, &caller.tenant, &id).await?;
    Ok(Json(shown(meta)).into_response())
}

pub(super) async fn file_content(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let meta = FILES.meta(&orch, &caller.tenant, &id).await?;
    let size = meta["bytes"].as_u64().unwrap_or(0) as usize;
    let mime = meta["mime_type"]
        .as_str()
        .unwrap_or("application/octet-stream");
    FILES.download(&orch, &caller, &id, size, mime).await
}

pub(super) async fn delete_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    if !FILES.delete(&orch, &caller.tenant, &id).await? {
        return Err(not_found("file", &id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
}

/// A file to stage (`{type: "file_id", file_id, path}` or `{type: "inline", data, path}`): its
/// path in the working directory and its bytes.
pub(super) async fn staged(
    orch: &AppState,
    tenant: &str,
    f: &Value,
) -> Result<(String, Vec<u8>), Problem> {
    let path = f["path"]
        .as_str()
        .ok_or_else(|| invalid("a file to stage needs `path` (under /workspace/)"))?;
    if !path.starts_with("/workspace/") {
        return Err(invalid(format!(
            "the path {path:?} must be under /workspace/ (the session's working directory)"
        )));
    }
    let relative = files::workdir_path(path)?;
    let bytes = match f["type"].as_str() {
        Some("inline") => files::inline_bytes(
            "data",
            f["data"]
                .as_str()
                .ok_or_else(|| invalid("an inline file needs `data` (base64)"))?,
        )?,
        Some("file_id") => {
            let id = f["file_id"]
                .as_str()
                .ok_or_else(|| invalid("a `file_id` file needs `file_id`"))?;
            FILES.bytes(orch, tenant, id).await?
        }
        other => {
            return Err(invalid(format!(
                "files to stage are `file_id` or `inline`, not {}",
                other.unwrap_or("(none)")
            )));
        }
    };
    if bytes.len() > files::MAX_FILE_BYTES {
        return Err(invalid(format!(
            "a staged file is at most {} MiB",
            files::MAX_FILE_BYTES >> 20
        )));
    }
    Ok((relative, bytes))
}

/// The session an environment id names (of the caller's tenant).
async fn environment_session(
    orch: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<VendorObject, Problem> {
    let session = id
        .strip_prefix(ENVIRONMENT)
        .ok_or_else(|| not_found("environment", id))?;
    session_record(orch, caller, session)
        .await
        .map_err(|_| not_found("environment", id))
}

pub(super) async fn get_environment(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let record = environment_session(&orch, &caller, &id).await?;
    let native = orch
        .store
        .get_session(&caller.tenant, &record.id)
        .await
        .map_err(store_problem)?;
    let status = match native.map(|s| s.status) {
        Some(SessionStatus::Failed | SessionStatus::Dead) => "failed",
        Some(SessionStatus::Deleted) | None => "expired",
        Some(_) => "connected",
    };
    Ok(Json(json!({
        "object": "agent.environment", "id": id, "type": "openai_hosted", "status": status,
        "files": [], "plugins": [], "skills": [],
    }))
    .into_response())
}

pub(super) async fn stage_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let f = body_of(body)?;
    let record = environment_session(&orch, &caller, &id).await?;
    // What staging holds: the inline data (already read) or the stored file's size.
    let size = match f["file_id"].as_str() {
        Some(id) => FILES.meta(&orch, &caller.tenant, id).await?["bytes"]
            .as_u64()
            .unwrap_or(0) as usize,
        None => f["data"].as_str().map_or(0, str::len),
    };
    let _held = files::hold_for_files(&orch, &caller, size).await?;
    let (relative, bytes) = staged(&orch, &caller.tenant, &f).await?;
    let size = bytes.len();
    files::write_session_file(&orch, &caller.tenant, &record.id, &relative, bytes).await?;
    Ok(Json(environment_file(&id, &relative, size as u64)).into_response())
}

fn environment_file(environment: &str, relative: &str, size: u64) -> Value {
    json!({"object": "agent.environment.file", "environment_id": environment,
           "path": format!("/workspace/{relative}"), "size_bytes": size})
}

#[derive(Deserialize, Default)]
pub(super) struct EnvironmentFilesQuery {
    limit: Option<i64>,
    order: Option<String>,
    page: Option<String>,
    path: Option<String>,
}

/// The files of the session's working directory (under `path`, a directory), by path.
pub(super) async fn list_environment_files(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<EnvironmentFilesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let record = environment_session(&orch, &caller, &id).await?;
    let limit = limit_of(q.limit, 20, 100)? as usize;
    let desc = descending(q.order.as_deref())?;
    let start = match &q.page {
        None => 0,
        Some(p) => p
            .strip_prefix("p")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= 1_000_000)
            .ok_or_else(|| invalid("`page` is a token from a previous page's `next`"))?,
    };
    let under = match q.path.as_deref() {
        None | Some("/workspace") | Some("/workspace/") => None,
        Some(p) => Some(files::workdir_path(p)?),
    };
    let mut all = files::session_files(&orch, &caller.tenant, &record.id, under.as_deref()).await?;
    all.sort_by(|a, b| a.path.cmp(&b.path));
    if desc {
        all.reverse();
    }
    let data: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|f| environment_file(&id, &f.path, f.size))
        .collect();
    let end = start.saturating_add(limit);
    let more = end < all.len();
    Ok(Json(json!({
        "object": "list", "data": data, "has_more": more,
        "next": more.then(|| format!("p{end}")),
    }))
    .into_response())
}
