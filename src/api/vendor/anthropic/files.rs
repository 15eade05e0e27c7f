//! Anthropic's Files API (`/v1/files`) and a session's file resources (`/v1/sessions/{id}/
//! resources`), over the stored files and the native session files (`super::super::files`).
//!
//! An uploaded file is stored per tenant. A session's `resources` write it into the session's
//! working directory (at creation, or added later), at `mount_path` taken relative to that
//! directory. `GET /v1/files?scope_id=<session>` lists the files of the session's working
//! directory (what the agent wrote included) under ids that name the session and the path, so
//! the client downloads them with `GET /v1/files/{id}/content`.

use super::*;
use crate::api::vendor::files::{self, Files};
use axum::extract::Multipart;

const FILES: Files = Files {
    meta: "anthropic.file",
    content: "anthropic.file_content",
};

/// The prefix of ids naming a session's file (`files::output_id`); uploads are `file_…`.
const OUTPUT: &str = "file_s";

#[derive(Deserialize, Default)]
pub(super) struct FileListQuery {
    limit: Option<i64>,
    page: Option<String>,
    scope_id: Option<String>,
    ids: Option<String>,
}

/// Whether a stored file's `expires_at` has passed (its bytes are unavailable from then on).
fn expired(meta: &Value) -> bool {
    meta["expires_at"]
        .as_str()
        .is_some_and(|at| at <= crate::store::now().as_str())
}

/// A stored file, or `404` when it is unknown or has expired.
async fn stored_meta(orch: &AppState, tenant: &str, id: &str) -> Result<Value, Problem> {
    let meta = FILES.meta(orch, tenant, id).await?;
    if expired(&meta) {
        FILES.delete(orch, tenant, id).await?;
        return Err(not_found("file", id));
    }
    Ok(meta)
}

pub(super) async fn upload_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, Problem> {
    let (upload, _held) = files::read_upload(&orch, &caller, &headers, multipart).await?;
    let now = crate::store::now();
    let expires_at = match upload.fields.get("expires_in_seconds") {
        None => None,
        Some(s) => {
            let secs = s
                .parse::<u64>()
                .ok()
                .filter(|s| (3600..=7_776_000).contains(s))
                .ok_or_else(|| {
                    invalid("`expires_in_seconds` is between 3600 (an hour) and 7776000 (90 days)")
                })?;
            Some(
                humantime::format_rfc3339_micros(
                    std::time::SystemTime::now() + std::time::Duration::from_secs(secs),
                )
                .to_string(),
            )
        }
    };
    let meta = json!({
        "type": "file", "id": new_id("file"), "filename": upload.filename,
        "mime_type": upload.mime_type, "size_bytes": upload.bytes.len(), "created_at": now,
        "downloadable": true, "expires_at": expires_at, "scope": null,
    });
    FILES
        .store(&orch, &caller.tenant, meta.clone(), &upload.bytes, now)
        .await?;
    Ok(Json(meta).into_response())
}

pub(super) async fn list_files(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<FileListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    if let Some(session) = &q.scope_id {
        return session_outputs(&orch, &caller, session, &q).await;
    }
    if let Some(ids) = &q.ids {
        // At most 100, one page; ids that name nothing visible are left out.
        let ids: std::collections::BTreeSet<&str> = ids.split(',').collect();
        if ids.len() > 100 {
            return Err(invalid("`ids` names at most 100 files"));
        }
        // Each of a session's files is looked up in its sandbox.
        if ids
            .iter()
            .filter(|id| files::parse_output_id(OUTPUT, id).is_some())
            .count()
            > 10
        {
            return Err(invalid(
                "`ids` names at most 10 of a session's files (list them with `scope_id`)",
            ));
        }
        let mut data = Vec::new();
        for id in ids {
            if let Ok(meta) = file_meta(&orch, &caller, id).await {
                data.push(meta);
            }
        }
        return Ok(list_answer(data, None));
    }
    let page = PageQuery {
        limit: q.limit,
        page: q.page.clone(),
        include_archived: None,
        order: Some("desc".into()),
    };
    let (objects, next) = object_page(&orch, &caller.tenant, FILES.meta, &page, true).await?;
    let mut data = Vec::new();
    for o in objects {
        if expired(&o.body) {
            // Its bytes go as soon as it is seen expired, and no longer count.
            FILES.delete(&orch, &caller.tenant, &o.id).await?;
        } else {
            data.push(o.body);
        }
    }
    Ok(list_answer(data, next))
}

/// The files of a session's working directory, as file metadata scoped to the session.
async fn session_outputs(
    orch: &AppState,
    caller: &Caller,
    session: &str,
    q: &FileListQuery,
) -> Result<Response, Problem> {
    let record = session_record(orch, caller, session).await?;
    let limit = limit_of(q.limit, 20, 1000)? as usize;
    let start = page_start(q.page.as_deref())?;
    let all = files::session_files(orch, &caller.tenant, &record.id, None).await?;
    let data: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|f| output_meta(&record, &f.path, f.size))
        .collect();
    Ok(list_answer(data, next_page(start, limit, all.len())))
}

/// Where a page of a list read whole starts: `page_N` from the last page's `next_page`.
fn page_start(page: Option<&str>) -> Result<usize, Problem> {
    match page {
        None => Ok(0),
        Some(p) => p
            .strip_prefix("page_")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= 1_000_000)
            .ok_or_else(|| invalid("`page` is a token from a previous page's `next_page`")),
    }
}

/// The next page's token, when there is more after `start + limit` of `len`.
fn next_page(start: usize, limit: usize, len: usize) -> Option<String> {
    let end = start.saturating_add(limit);
    (end < len).then(|| format!("page_{end}"))
}

/// A file of the session's working directory as Anthropic's file metadata.
fn output_meta(record: &VendorObject, path: &str, size: u64) -> Value {
    json!({
        "type": "file", "id": files::output_id(OUTPUT, &record.id, path),
        "filename": path.rsplit('/').next().unwrap_or(path), "mime_type": mime_of(path),
        "size_bytes": size, "created_at": record.created_at, "downloadable": true,
        "expires_at": null, "scope": {"type": "session", "id": record.id},
    })
}

/// The media type a file name suggests (what a client would display it as).
fn mime_of(path: &str) -> &'static str {
    match path
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
    {
        Some(ext) => match ext.as_str() {
            "txt" | "log" => "text/plain",
            "md" => "text/markdown",
            "csv" => "text/csv",
            "json" => "application/json",
            "html" => "text/html",
            "py" => "text/x-python",
            "pdf" => "application/pdf",
            "png" => "image/png",
            "jpg" | "jpeg" => "image/jpeg",
            "gif" => "image/gif",
            "webp" => "image/webp",
            _ => "application/octet-stream",
        },
        None => "application/octet-stream",
    }
}

/// The metadata of an uploaded file or of a session's file.
async fn file_meta(orch: &AppState, caller: &Caller, id: &str) -> Result<Value, Problem> {
    if let Some((session, path)) = files::parse_output_id(OUTPUT, id) {
        let record = session_record(orch, caller, &session).await?;
        // Only the file's own directory is listed.
        let dir = path.rsplit_once('/').map(|(dir, _)| dir);
        let size = files::session_files(orch, &caller.tenant, &record.id, dir)
            .await?
            .into_iter()
            .find(|f| f.path == path)
            .map(|f| f.size)
            .ok_or_else(|| not_found("file", id))?;
        return Ok(output_meta(&record, &path, size));
    }
    stored_meta(orch, &caller.tenant, id).await
}

pub(super) async fn get_file(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    Ok(Json(file_meta(&orch, &caller, &id).await?).into_response())
}

pub(super) async fn file_content(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    if let Some((session, path)) = files::parse_output_id(OUTPUT, &id) {
        let record = session_record(&orch, &caller, &session).await?;
        return files::session_file_download(&orch, &caller.tenant, &record.id, &path).await;
    }
    let meta = stored_meta(&orch, &caller.tenant, &id).await?;
    let size = meta["size_bytes"].as_u64().unwrap_or(0) as usize;
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
    if files::parse_output_id(OUTPUT, &id).is_some() {
        return Err(invalid(
            "a session's files go with the session: delete the session, or have its agent \
             remove the file",
        ));
    }
    if !FILES.delete(&orch, &caller.tenant, &id).await? {
        return Err(not_found("file", &id));
    }
    Ok(Json(json!({"id": id, "type": "file_deleted"})).into_response())
}

// ---- a session's resources

/// A `{type: "file", file_id, mount_path?}` resource, checked: the file's id, where it goes in
/// the working directory, and the path as the session shows it.
struct FileResource {
    file_id: String,
    mount_path: String,
    relative: String,
}

fn checked_resource(r: &Value) -> Result<FileResource, Problem> {
    match r["type"].as_str() {
        Some("file") => {}
        Some(kind @ ("github_repository" | "memory_store")) => {
            return Err(invalid(format!(
                "`{kind}` resources are not supported: give files (`type: \"file\"`), or clone \
                 the repository in the session"
            )));
        }
        other => {
            return Err(invalid(format!(
                "resources are `{{type: \"file\", file_id, mount_path?}}`, not {}",
                other.unwrap_or("(none)")
            )));
        }
    }
    let file_id = r["file_id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| invalid("a file resource needs `file_id`"))?
        .to_string();
    let mount_path = match r["mount_path"].as_str() {
        Some(p) => p.to_string(),
        None => format!("/mnt/session/uploads/{file_id}"),
    };
    let relative = files::workdir_path(&mount_path)?;
    Ok(FileResource {
        file_id,
        mount_path,
        relative,
    })
}

/// A resource as the session lists it.
fn resource_view(r: &FileResource, now: &str) -> Value {
    json!({"type": "file", "id": new_id("sesrsc"), "file_id": r.file_id,
           "mount_path": r.mount_path, "created_at": now, "updated_at": now})
}

/// The files `resources` name, for the native session's creation, and the resources as the
/// session lists them. Every one is checked before any is read.
pub(super) async fn session_files(
    orch: &AppState,
    tenant: &str,
    resources: &[Value],
) -> Result<(Vec<sandwarden_proto::event::BindFile>, Vec<Value>), Problem> {
    use base64::Engine;
    if resources.len() > files::MAX_SESSION_FILES {
        return Err(invalid(format!(
            "a session is given at most {} resources",
            files::MAX_SESSION_FILES
        )));
    }
    let checked: Vec<FileResource> = resources
        .iter()
        .map(checked_resource)
        .collect::<Result<_, _>>()?;
    let now = crate::store::now();
    let (mut bind, mut views, mut total) = (Vec::new(), Vec::new(), 0usize);
    for r in &checked {
        stored_meta(orch, tenant, &r.file_id).await?;
        let bytes = FILES.bytes(orch, tenant, &r.file_id).await?;
        total += bytes.len();
        if total > files::MAX_SESSION_FILE_BYTES {
            return Err(invalid(format!(
                "a session's resources hold at most {} MiB at creation: add more with \
                 resources.add once it runs",
                files::MAX_SESSION_FILE_BYTES >> 20
            )));
        }
        bind.push(sandwarden_proto::event::BindFile {
            path: r.relative.clone(),
            content: None,
            content_base64: Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
            mode: None,
        });
        views.push(resource_view(r, &now));
    }
    Ok((bind, views))
}

pub(super) async fn add_resource(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(body)?;
    let r = checked_resource(&b)?;
    let size = stored_meta(&orch, &caller.tenant, &r.file_id).await?["size_bytes"]
        .as_u64()
        .unwrap_or(0) as usize;
    let now = crate::store::now();
    let view = resource_view(&r, &now);
    // Listed first, under the records' lock (no change is lost, and the lock is not held while
    // the sandbox is written), then written; taken off the list again if the write fails.
    let record = {
        let _records = RECORDS.lock().await;
        let mut record = session_record(&orch, &caller, &id).await?;
        let listed = record.body["resources"].as_array().map_or(0, Vec::len);
        if listed >= files::MAX_SESSION_FILES {
            return Err(invalid(format!(
                "a session lists at most {} resources: delete some first",
                files::MAX_SESSION_FILES
            )));
        }
        match record.body["resources"].as_array_mut() {
            Some(list) => list.push(view.clone()),
            None => record.body["resources"] = json!([view.clone()]),
        }
        record.body["updated_at"] = json!(now);
        check_size(&record.body)?;
        orch.store
            .update_object(&record)
            .await
            .map_err(store_problem)?;
        record
    };
    let written = async {
        let _held = files::hold_for_files(&orch, &caller, size).await?;
        let bytes = FILES.bytes(&orch, &caller.tenant, &r.file_id).await?;
        files::write_session_file(&orch, &caller.tenant, &record.id, &r.relative, bytes).await
    }
    .await;
    if let Err(p) = written {
        let _records = RECORDS.lock().await;
        if let Ok(mut record) = session_record(&orch, &caller, &id).await
            && let Some(list) = record.body["resources"].as_array_mut()
        {
            list.retain(|v| v["id"] != view["id"]);
            if let Err(e) = orch.store.update_object(&record).await {
                tracing::error!(error = %e, "taking a resource that was not written off its session failed");
            }
        }
        return Err(p);
    }
    Ok(Json(view).into_response())
}

pub(super) async fn list_resources(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let q = query_of(query)?;
    let record = session_record(&orch, &caller, &id).await?;
    let all = record.body["resources"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let limit = limit_of(q.limit, 1000, 1000)? as usize;
    let start = page_start(q.page.as_deref())?;
    let next = next_page(start, limit, all.len());
    Ok(list_answer(
        all.into_iter().skip(start).take(limit).collect(),
        next,
    ))
}

/// The session record and the index of its resource `resource_id`.
async fn resource_of(
    orch: &AppState,
    caller: &Caller,
    id: &str,
    resource_id: &str,
) -> Result<(VendorObject, usize), Problem> {
    let record = session_record(orch, caller, id).await?;
    let at = record.body["resources"]
        .as_array()
        .and_then(|list| list.iter().position(|r| r["id"] == resource_id))
        .ok_or_else(|| not_found("resource", resource_id))?;
    Ok((record, at))
}

pub(super) async fn get_resource(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, resource_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let (record, at) = resource_of(&orch, &caller, &id, &resource_id).await?;
    Ok(Json(record.body["resources"][at].clone()).into_response())
}

pub(super) async fn update_resource(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, resource_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    resource_of(&orch, &caller, &id, &resource_id).await?;
    Err(invalid(
        "a file resource has nothing to update (`authorization_token` is for GitHub \
         repositories, which are not supported): add the new file as another resource",
    ))
}

/// Takes the resource off the session's list. The file it wrote stays in the working
/// directory (the agent may have changed it, and there is no mount to take away).
pub(super) async fn delete_resource(
    State(orch): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((id, resource_id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    let _records = RECORDS.lock().await;
    let (mut record, at) = resource_of(&orch, &caller, &id, &resource_id).await?;
    if let Some(list) = record.body["resources"].as_array_mut() {
        list.remove(at);
    }
    record.body["updated_at"] = json!(crate::store::now());
    orch.store
        .update_object(&record)
        .await
        .map_err(store_problem)?;
    Ok(Json(json!({"id": resource_id, "type": "session_resource_deleted"})).into_response())
}
