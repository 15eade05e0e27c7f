//! Agents that end: a session whose agent exited or whose terminal program ended is `dead`, with
//! the reason its harness gives, and its event stream says so.
//!
//! Serve learns of it where it talks to the harness (a turn that ends `agent_exited`, a turn the
//! harness refuses because its agent failed, a terminal that closes or cannot open); it does not
//! poll. It must not know HTTP routing.

use super::Orchestrator;
use crate::store::Session;
use sandwarden_proto::event::Phase;
use serde_json::json;

/// The event type that tells a session's readers it died; `data: {reason}`, no `turn_id`.
pub const SESSION_DEAD: &str = "session_dead";
/// The longest reason kept from a harness (its words are sandbox output).
const REASON_MAX: usize = 600;

impl Orchestrator {
    /// The session's agent or program ended, as its harness said: the session is dead, with that
    /// reason. Whether this call made the transition.
    pub async fn agent_ended(&self, session: &Session, reason: &str) -> bool {
        let mut reason = sandwarden_proto::event::clip(reason.trim().to_string(), REASON_MAX);
        if reason.is_empty() {
            reason = "its agent ended".into();
        }
        self.mark_dead(session, &reason).await
    }

    /// Asks the session's harness whether its agent or program has ended (health `failed` or
    /// `exited`); if so the session is dead with the harness's reason. Whether it is now dead
    /// by this call.
    pub async fn check_agent(&self, session: &Session) -> bool {
        let Some(client) = self.session_client(session) else {
            return false;
        };
        match client.health().await {
            Ok(h) if matches!(h.phase, Phase::Failed | Phase::Exited) => {
                let reason = h.reason.unwrap_or_default();
                self.agent_ended(session, &reason).await
            }
            _ => false,
        }
    }

    /// Tells the session's event stream it died (after the transition was recorded).
    pub(super) async fn publish_dead(&self, session_id: &str, reason: &str) {
        // The session's last events may have been numbered on another replica (flushed first,
        // so events of this replica still queued count).
        if self.store.flush().await.is_ok()
            && let Ok(last) = self.store.last_seq(session_id).await
        {
            self.hub.set_seq(session_id, last).await;
        }
        if let Err(e) = self
            .hub
            .publish(
                session_id,
                None,
                SESSION_DEAD,
                crate::store::now(),
                json!({ "status": "dead", "reason": reason }),
            )
            .await
        {
            tracing::error!(error = %e, %session_id, "recording that the session died failed");
        }
    }
}
