//! The vendors' Files APIs and what maps them onto a session's working directory.
//!
//! An uploaded file is two stored objects of the tenant: its metadata as the vendor shows it, and
//! its bytes (base64 in a separate object, so listings never read them). A file named at session
//! creation or added to a live session is written into the session's working directory through
//! the native files API; a file the agent wrote is offered for download under an id that names
//! the session and the path (`output_id`), read from the sandbox when asked for.

use super::*;
use axum::extract::Multipart;
use axum::http::HeaderValue;
use axum::http::header;
use axum::response::IntoResponse;
use base64::Engine;

/// The largest file one upload may carry.
pub const MAX_FILE_BYTES: usize = 8 << 20;
/// The most a tenant's uploaded files may take in the store, all together (as stored: base64).
pub const MAX_TENANT_FILE_BYTES: i64 = 256 << 20;
/// The kinds holding every vendor's uploaded bytes: a tenant's quota counts them together.
const CONTENT_KINDS: [&str; 2] = ["anthropic.file_content", "openai.file_content"];
/// The largest file listing read from a sandbox (the harness bounds its own at 1 MiB).
const MAX_LISTING_BYTES: usize = 2 << 20;
/// The longest path a vendor may give for a file in the sandbox.
pub const MAX_PATH_BYTES: usize = 1024;

/// Uploads are stored one at a time per replica, so two cannot both pass the quota's check.
static STORING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The most files a session may be given at creation, and their bytes together.
pub const MAX_SESSION_FILES: usize = 100;
pub const MAX_SESSION_FILE_BYTES: usize = 8 << 20;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64_URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// An upload, read from a `multipart/form-data` body: the `file` part and the text fields.
pub struct Upload {
    pub filename: String,
    pub mime_type: String,
    pub bytes: Vec<u8>,
    pub fields: std::collections::BTreeMap<String, String>,
}

/// Reads the upload, refusing what is not one (no `file` part, a part over its bound). What it
/// holds while read and stored (the bytes, their base64, the row) counts against the tenant's
/// answer memory from the start, by the body's declared length (else the largest upload).
pub async fn read_upload(
    orch: &AppState,
    caller: &Caller,
    headers: &axum::http::HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(Upload, crate::session::quota::Admitted), Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(MAX_FILE_BYTES)
        .min(MAX_FILE_BYTES + (64 << 10));
    let admitted = orch
        .admit_answer(&caller.tenant, &caller.limits, declared.saturating_mul(3))
        .await?;
    let mut multipart = multipart.map_err(|e| {
        invalid(format!(
            "send the file as multipart/form-data with a `file` part: {e}"
        ))
    })?;
    let mut upload = None;
    let mut fields = std::collections::BTreeMap::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(invalid(format!("the multipart body is malformed: {e}"))),
        };
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            // Only the last component of the name the client gave is kept.
            let filename = field
                .file_name()
                .and_then(|n| n.rsplit(['/', '\\']).next())
                .filter(|n| !n.is_empty() && !n.chars().any(char::is_control))
                .unwrap_or("unnamed")
                .chars()
                .take(255)
                .collect::<String>();
            let mime_type = field
                .content_type()
                .filter(|t| t.len() <= 255)
                .unwrap_or("application/octet-stream")
                .to_string();
            let bytes = read_bounded(field, MAX_FILE_BYTES).await?;
            upload = Some((filename, mime_type, bytes));
        } else {
            if fields.len() >= 16 {
                return Err(invalid("at most 16 form fields besides `file`"));
            }
            let value = read_bounded(field, 1024).await?;
            let value = String::from_utf8(value)
                .map_err(|_| invalid(format!("the form field `{name}` is not UTF-8 text")))?;
            fields.insert(name, value);
        }
    }
    let (filename, mime_type, bytes) =
        upload.ok_or_else(|| invalid("the multipart body has no `file` part"))?;
    Ok((
        Upload {
            filename,
            mime_type,
            bytes,
            fields,
        },
        admitted,
    ))
}

/// A part's bytes, refused past `max` without reading the rest.
async fn read_bounded(
    mut field: axum::extract::multipart::Field<'_>,
    max: usize,
) -> Result<Vec<u8>, Problem> {
    let name = field.name().unwrap_or_default().to_string();
    let mut bytes = Vec::new();
    loop {
        match field.chunk().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > max {
                    return Err(Problem::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "file_too_large",
                        format!("the part `{name}` is over {max} bytes"),
                    )
                    .with("max", max));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(bytes),
            Err(e) => return Err(invalid(format!("reading the part `{name}` failed: {e}"))),
        }
    }
}

/// One vendor's stored files: the kinds of their metadata and of their bytes.
pub struct Files {
    pub meta: &'static str,
    pub content: &'static str,
}

impl Files {
    /// Stores an upload under `meta`'s `id` (the vendor's metadata object), within the tenant's
    /// count and bytes.
    pub async fn store(
        &self,
        orch: &AppState,
        tenant: &str,
        meta: Value,
        bytes: &[u8],
        now: String,
    ) -> Result<(), Problem> {
        let id = meta["id"].as_str().unwrap_or_default().to_string();
        let encoded = B64.encode(bytes);
        // The check and the insert, one upload at a time: a burst cannot pass the check together.
        let _one_at_a_time = STORING.lock().await;
        check_room(orch, tenant, self.meta, &meta).await?;
        let mut held = 0;
        for kind in CONTENT_KINDS {
            held += orch
                .store
                .object_bytes(tenant, kind)
                .await
                .map_err(store_problem)?;
        }
        if held + encoded.len() as i64 > MAX_TENANT_FILE_BYTES {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "storage_quota_exceeded",
                format!(
                    "the tenant's files take {} MiB of the {} MiB they may: delete some first",
                    held >> 20,
                    MAX_TENANT_FILE_BYTES >> 20
                ),
            ));
        }
        let content = first_version(
            tenant,
            self.content,
            id.clone(),
            json!({ "data": encoded }),
            now.clone(),
        );
        orch.store
            .put_object(&content)
            .await
            .map_err(store_problem)?;
        let record = first_version(tenant, self.meta, id.clone(), meta, now);
        if let Err(e) = orch.store.put_object(&record).await {
            let _ = orch.store.delete_object(tenant, self.content, &id).await;
            return Err(store_problem(e));
        }
        Ok(())
    }

    /// A stored file's metadata.
    pub async fn meta(&self, orch: &AppState, tenant: &str, id: &str) -> Result<Value, Problem> {
        Ok(object(orch, tenant, self.meta, id, None).await?.body)
    }

    /// A stored file's bytes, for a download: what reading them holds counts against the
    /// tenant's answer memory before they are read (`size`: the file's size).
    pub async fn download(
        &self,
        orch: &AppState,
        caller: &Caller,
        id: &str,
        size: usize,
        mime_type: &str,
    ) -> Result<Response, Problem> {
        // The row (base64) and the bytes decoded from it.
        let admitted = orch
            .admit_answer(&caller.tenant, &caller.limits, size.saturating_mul(3))
            .await?;
        let bytes = self.bytes(orch, &caller.tenant, id).await?;
        Ok(bytes_holding(bytes, mime_type, admitted))
    }

    /// A stored file's bytes.
    pub async fn bytes(&self, orch: &AppState, tenant: &str, id: &str) -> Result<Vec<u8>, Problem> {
        let content = object(orch, tenant, self.content, id, None).await?;
        B64.decode(content.body["data"].as_str().unwrap_or_default())
            .map_err(|e| {
                tracing::error!(file = %id, error = %e, "a stored file's bytes do not decode");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store_error",
                    "the file's stored bytes are damaged; upload it again",
                )
            })
    }

    /// Deletes a stored file; whether there was one.
    pub async fn delete(&self, orch: &AppState, tenant: &str, id: &str) -> Result<bool, Problem> {
        let found = orch
            .store
            .delete_object(tenant, self.meta, id)
            .await
            .map_err(store_problem)?;
        orch.store
            .delete_object(tenant, self.content, id)
            .await
            .map_err(store_problem)?;
        Ok(found)
    }
}

/// A path a vendor gives for a file in the sandbox, as a path in the session's working
/// directory: an absolute path is taken relative to it (`/workspace/` is the directory itself,
/// as OpenAI's hosted environments have it; any other `/a/b` is `a/b` in it).
pub fn workdir_path(path: &str) -> Result<String, Problem> {
    if path.len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "a file path in the sandbox is at most {MAX_PATH_BYTES} bytes"
        )));
    }
    let relative = path
        .strip_prefix("/workspace/")
        .unwrap_or(path)
        .trim_start_matches('/');
    if !sandwarden_proto::event::is_inside(relative) || relative.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{path:?} is not a file path in the sandbox: give a path without `..` or control \
             characters (an absolute path is placed under the session's working directory)"
        )));
    }
    Ok(relative.to_string())
}

/// The id under which a file of a session's working directory is offered for download.
pub fn output_id(prefix: &str, session_id: &str, path: &str) -> String {
    format!(
        "{prefix}{}",
        B64_URL.encode(format!("{session_id}\n{path}"))
    )
}

/// The session and path an `output_id` names.
pub fn parse_output_id(prefix: &str, id: &str) -> Option<(String, String)> {
    let text = String::from_utf8(B64_URL.decode(id.strip_prefix(prefix)?).ok()?).ok()?;
    let (session, path) = text.split_once('\n')?;
    Some((session.to_string(), path.to_string()))
}

/// One file of a session's working directory: its path and size.
pub struct SessionFile {
    pub path: String,
    pub size: u64,
}

/// The files of a session's working directory (not its directories or links), at most `max`.
pub async fn session_files(
    orch: &AppState,
    tenant: &str,
    session_id: &str,
    under: Option<&str>,
) -> Result<Vec<SessionFile>, Problem> {
    let mut from = orch.list_files(tenant, session_id, under).await?;
    // Read within a bound: the sandbox's harness is not trusted to keep its own.
    let mut body = Vec::new();
    let unreadable = |e: &dyn std::fmt::Display| {
        tracing::warn!(session_id, error = %e, "a sandbox's file listing could not be read");
        Problem::new(
            StatusCode::BAD_GATEWAY,
            "harness_error",
            "the sandbox's file listing could not be read",
        )
    };
    while let Some(chunk) = from.chunk().await.map_err(|e| unreadable(&e))? {
        if body.len() + chunk.len() > MAX_LISTING_BYTES {
            return Err(unreadable(&"the listing is over its bound"));
        }
        body.extend_from_slice(&chunk);
    }
    let listing: Value = serde_json::from_slice(&body).map_err(|e| unreadable(&e))?;
    Ok(listing["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["type"] == "file")
        .filter_map(|f| {
            Some(SessionFile {
                path: f["path"].as_str()?.to_string(),
                size: f["size"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// Writes `bytes` as `path` of the session's working directory.
pub async fn write_session_file(
    orch: &AppState,
    tenant: &str,
    session_id: &str,
    path: &str,
    bytes: Vec<u8>,
) -> Result<(), Problem> {
    orch.write_file(tenant, session_id, path, reqwest::Body::from(bytes))
        .await?;
    Ok(())
}

/// A file's bytes as the answer, holding `admitted` (the tenant's answer memory) until sent.
/// Never shown inline by a browser, whatever the uploader said the type was.
fn bytes_holding(
    bytes: Vec<u8>,
    mime_type: &str,
    admitted: crate::session::quota::Admitted,
) -> Response {
    let len = bytes.len();
    let body = axum::body::Body::from_stream(super::super::holding(
        futures::stream::once(async move { Ok::<_, Infallible>(axum::body::Bytes::from(bytes)) }),
        admitted,
    ));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(mime_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream")),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    attachment(headers);
    response
}

/// Marks a download as one: saved, not rendered, its type not sniffed.
fn attachment(headers: &mut axum::http::HeaderMap) {
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// A session file's bytes, passed from the sandbox to the client as they arrive (serve holds a
/// chunk at a time, as the native files route does).
pub async fn session_file_download(
    orch: &AppState,
    tenant: &str,
    session_id: &str,
    path: &str,
) -> Result<Response, Problem> {
    let file = orch.read_file(tenant, session_id, path).await?;
    let mut response = crate::api::passed_through(file, "application/octet-stream");
    attachment(response.headers_mut());
    Ok(response)
}

/// The tenant's answer memory for files read from the store to be written into a sandbox
/// (their rows, bytes and base64 for the harness), held while they are: at most `bytes` of files.
pub async fn hold_for_files(
    orch: &AppState,
    caller: &Caller,
    bytes: usize,
) -> Result<crate::session::quota::Admitted, Problem> {
    Ok(orch
        .admit_answer(&caller.tenant, &caller.limits, bytes.saturating_mul(3))
        .await?)
}

/// Decodes a file given inline as base64.
pub fn inline_bytes(field: &str, data: &str) -> Result<Vec<u8>, Problem> {
    B64.decode(data)
        .map_err(|e| invalid(format!("`{field}` is not valid base64: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_paths_land_in_the_working_directory() {
        assert_eq!(
            workdir_path("/workspace/data/a.csv").ok(),
            Some("data/a.csv".into())
        );
        assert_eq!(
            workdir_path("/mnt/session/uploads/file_1").ok(),
            Some("mnt/session/uploads/file_1".into())
        );
        assert_eq!(workdir_path("notes.txt").ok(), Some("notes.txt".into()));
        for bad in ["/workspace/../etc/passwd", "/", "a/../../b", "a\u{7}b", ""] {
            assert!(workdir_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_output_id_names_its_session_and_path() {
        let id = output_id("file_o", "ses_1", "out/report 1.md");
        assert_eq!(
            parse_output_id("file_o", &id),
            Some(("ses_1".into(), "out/report 1.md".into()))
        );
        assert_eq!(parse_output_id("file_o", "file_xyz"), None);
        assert_eq!(parse_output_id("file_o", "other"), None);
    }
}
