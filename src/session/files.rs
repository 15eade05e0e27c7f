//! A session's files: its sandbox's working directory, listed, read and written through the
//! harness server inside the sandbox, which resolves every path inside that directory (see
//! `sandwarden_harness::files`). serve checks the path's shape first and streams a file's bytes
//! through without holding them.

use super::turn::not_usable;
use super::{Orchestrator, SessionError};
use crate::store::Session;
use sandwarden_proto::event::is_inside;
use sandwarden_proto::harness_client::{ClientError, HarnessClient};
use serde_json::Value;

impl Orchestrator {
    /// The harness of a live session of `tenant`, to reach its files.
    async fn files_of(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<(Session, HarnessClient), SessionError> {
        let session = self.get(tenant, session_id).await?;
        if !session.status.is_live() {
            return Err(not_usable(&session));
        }
        match self.session_client(&session) {
            Some(client) => Ok((session, client)),
            // Still `creating`: no sandbox yet.
            None => Err(SessionError::invalid(
                "session_not_ready",
                "the session has no sandbox yet: wait until it is ready \
                 (GET /v1/sessions/{id}?wait=true)",
            )),
        }
    }

    /// A failed file request: the harness's own refusal (a missing file, a path out of the
    /// working directory) as it came; anything else as any harness failure.
    async fn file_failure(&self, session: &Session, e: ClientError) -> SessionError {
        match e {
            // Only the answers a files route gives about the path; a harness that claims
            // anything else (a 401, a 429) is not passed on as if serve had said it.
            ClientError::Refused(p) if matches!(p.status, 403 | 404 | 409 | 413 | 422) => {
                SessionError::HarnessRefused(p)
            }
            e => self.harness_failure(session, e).await,
        }
    }

    /// The entries of the session's working directory (under `under`, a directory in it).
    pub async fn list_files(
        &self,
        tenant: &str,
        session_id: &str,
        under: Option<&str>,
    ) -> Result<reqwest::Response, SessionError> {
        if let Some(under) = under.filter(|u| !u.is_empty() && *u != ".") {
            check_path(under)?;
        }
        let (session, client) = self.files_of(tenant, session_id).await?;
        match client.list_files(under).await {
            Ok(resp) => Ok(resp),
            Err(e) => Err(self.file_failure(&session, e).await),
        }
    }

    /// A file of the session's working directory, its body still to be read from the harness.
    pub async fn read_file(
        &self,
        tenant: &str,
        session_id: &str,
        path: &str,
    ) -> Result<reqwest::Response, SessionError> {
        check_path(path)?;
        let (session, client) = self.files_of(tenant, session_id).await?;
        match client.read_file(path).await {
            Ok(resp) => Ok(resp),
            Err(e) => Err(self.file_failure(&session, e).await),
        }
    }

    /// Writes a file of the session's working directory, whole; whether it is new.
    pub async fn write_file(
        &self,
        tenant: &str,
        session_id: &str,
        path: &str,
        body: reqwest::Body,
    ) -> Result<(bool, Value), SessionError> {
        check_path(path)?;
        let (session, client) = self.files_of(tenant, session_id).await?;
        match client.write_file(path, body).await {
            Ok(written) => Ok(written),
            Err(e) => Err(self.file_failure(&session, e).await),
        }
    }
}

/// A path inside the working directory: relative, without `..` or NUL.
fn check_path(path: &str) -> Result<(), SessionError> {
    if is_inside(path) && !path.chars().any(char::is_control) {
        return Ok(());
    }
    Err(SessionError::invalid(
        "invalid_path",
        format!(
            "{path:?} is not a path inside the session's working directory: give a relative path without `..` or control characters"
        ),
    ))
}
