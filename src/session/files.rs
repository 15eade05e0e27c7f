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

    /// Runs one file request on the harness of a live session of `tenant`. A refusal about the
    /// path (a missing file, a path out of the working directory) is passed on as it came, but
    /// only as one of the statuses the files routes give: a harness that claims anything else
    /// (a 401, a 429) is not passed on as if serve had said it. Any other failure is any harness
    /// failure's.
    async fn on_files<T, F, Fut>(
        &self,
        tenant: &str,
        session_id: &str,
        request: F,
    ) -> Result<T, SessionError>
    where
        F: FnOnce(HarnessClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let (session, client) = self.files_of(tenant, session_id).await?;
        match request(client).await {
            Ok(answer) => Ok(answer),
            Err(ClientError::Refused(p)) if matches!(p.status, 403 | 404 | 409 | 413 | 422) => {
                Err(SessionError::HarnessRefused(p))
            }
            Err(e) => Err(self.harness_failure(&session, e).await),
        }
    }

    /// The settings a message to an API session may choose (`model`, `agent`, `thinking`) and
    /// what its agent offers for them.
    pub async fn agent_options(
        &self,
        tenant: &str,
        session_id: &str,
    ) -> Result<sandwarden_proto::event::AgentOptions, SessionError> {
        let session = self.get(tenant, session_id).await?;
        if session.kind == "tui" && session.status.is_live() {
            return Err(SessionError::Terminal {
                tty_url: self.tty_url(&session),
            });
        }
        self.on_files(tenant, session_id, |client| async move {
            client.agent_options().await
        })
        .await
    }

    /// The entries of the session's working directory (under `under`, a directory in it): the
    /// harness's answer, its JSON body still to be read.
    pub async fn list_files(
        &self,
        tenant: &str,
        session_id: &str,
        under: Option<&str>,
    ) -> Result<reqwest::Response, SessionError> {
        if let Some(under) = under.filter(|u| !u.is_empty() && *u != ".") {
            check_path(under)?;
        }
        self.on_files(tenant, session_id, |client| async move {
            client.list_files(under).await
        })
        .await
    }

    /// A file of the session's working directory, its body still to be read from the harness.
    pub async fn read_file(
        &self,
        tenant: &str,
        session_id: &str,
        path: &str,
    ) -> Result<reqwest::Response, SessionError> {
        check_path(path)?;
        self.on_files(tenant, session_id, |client| async move {
            client.read_file(path).await
        })
        .await
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
        self.on_files(tenant, session_id, |client| async move {
            client.write_file(path, body).await
        })
        .await
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
