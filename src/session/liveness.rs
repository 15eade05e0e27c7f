//! The one rule for a session whose sandbox cannot be reached, on every path (a message, an
//! answer to the agent, a terminal, a turn whose connection broke): a connection that cannot be
//! made marks the session dead at once; any other failure but the harness's own refusal is
//! probed with a fresh connection, which marks it dead if it cannot connect.

use super::*;

impl Orchestrator {
    /// Applies the rule after `e` on a request to the session's harness; whether the session is
    /// now dead.
    pub async fn unreachable(&self, session: &Session, e: &ClientError) -> bool {
        match e {
            // The harness answered: it is there.
            ClientError::Refused(_) => false,
            _ if e.is_connect() => {
                self.mark_dead(session, &format!("its harness could not be reached ({e})"))
                    .await;
                true
            }
            _ => self.probe_dead(session).await,
        }
    }

    /// After a failure on a live-looking connection: is the harness really gone? Probes with a
    /// fresh connection, and marks the session dead if it cannot connect.
    pub async fn probe_dead(&self, session: &Session) -> bool {
        /// Health checks before a harness whose connections break is taken for alive.
        const PROBES: u32 = 3;
        const PROBE_PAUSE: Duration = Duration::from_millis(50);
        let (Some(id), Some(endpoint)) = (&session.sandbox_id, &session.endpoint) else {
            return false;
        };
        let fresh = HarnessClient::new(endpoint.as_str(), self.tokens.for_sandbox(id));
        for attempt in 1..=PROBES {
            match fresh.health().await {
                Err(e) if e.is_connect() => {
                    self.mark_dead(session, &format!("its harness could not be reached ({e})"))
                        .await;
                    return true;
                }
                // A connection that breaks: a killed harness's port can still take connections
                // for a moment while the process ends, so look again before saying it lives.
                Err(ClientError::Transport(e)) if !e.is_timeout() && attempt < PROBES => {
                    tokio::time::sleep(PROBE_PAUSE).await;
                }
                _ => return false,
            }
        }
        false
    }

    /// Marks a session dead (compare-and-set from a live status) and releases its sandbox.
    /// Returns whether this call made the transition.
    pub async fn mark_dead(&self, session: &Session, reason: &str) -> bool {
        let changed = self
            .store
            .transition(
                &session.id,
                &[
                    SessionStatus::Creating,
                    SessionStatus::Ready,
                    SessionStatus::Running,
                    SessionStatus::InputRequired,
                ],
                SessionStatus::Dead,
                Some(reason),
            )
            .await
            .unwrap_or(false);
        if changed {
            tracing::warn!(session_id = %session.id, %reason, "session dead");
            self.metrics.dead_sessions.inc();
            self.publish_dead(&session.id, reason).await;
            self.release(session).await;
            self.notify(&session.id);
        }
        changed
    }
}
