//! A session's and a turn's status, one type each for the store's rows, the orchestrator's
//! decisions and the API: the words are the API's (`input_required`), the variants what the code
//! compares.

use serde::{Deserialize, Serialize};

/// Where a session is in its life.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Its sandbox is being started or attached.
    Creating,
    Ready,
    /// A turn is running.
    Running,
    /// A running turn waits for the client's answer.
    InputRequired,
    /// It never became ready (see `failure_reason`).
    Failed,
    /// Its sandbox was lost, or its agent or terminal program ended.
    Dead,
    /// Deleted, or reaped after `idle_timeout_s` idle.
    Deleted,
}

impl SessionStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [SessionStatus; 7] = [
        SessionStatus::Creating,
        SessionStatus::Ready,
        SessionStatus::Running,
        SessionStatus::InputRequired,
        SessionStatus::Failed,
        SessionStatus::Dead,
        SessionStatus::Deleted,
    ];
    /// The statuses in which a session's sandbox must be kept (a `creating` one is being
    /// attached): the first four.
    pub const SUPERVISED: &'static [SessionStatus] = Self::ALL.split_at(4).0;
    /// The statuses in which a session holds a live sandbox: the supervised ones but `creating`.
    pub const LIVE: &'static [SessionStatus] = Self::SUPERVISED.split_at(1).1;
    /// The statuses a session can be deleted from: all but `deleted`, the last.
    pub const DELETABLE: &'static [SessionStatus] = Self::ALL.split_at(Self::ALL.len() - 1).0;

    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Creating => "creating",
            SessionStatus::Ready => "ready",
            SessionStatus::Running => "running",
            SessionStatus::InputRequired => "input_required",
            SessionStatus::Failed => "failed",
            SessionStatus::Dead => "dead",
            SessionStatus::Deleted => "deleted",
        }
    }

    /// Whether the session holds a live sandbox.
    pub fn is_live(self) -> bool {
        Self::LIVE.contains(&self)
    }

    /// The status a stored or asked-for word names, if any.
    pub fn parse(word: &str) -> Option<SessionStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

impl std::fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a turn is: running, then how it ended.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TurnStatus {
    Running,
    /// The agent ended it (its `done`).
    Completed,
    /// The client cancelled it and the agent stopped.
    Cancelled,
    /// It failed: the agent or the sandbox failed, or its replica went away (`error.code`).
    Failed,
}

impl TurnStatus {
    pub const ALL: [TurnStatus; 4] = [
        TurnStatus::Running,
        TurnStatus::Completed,
        TurnStatus::Cancelled,
        TurnStatus::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TurnStatus::Running => "running",
            TurnStatus::Completed => "completed",
            TurnStatus::Cancelled => "cancelled",
            TurnStatus::Failed => "failed",
        }
    }

    /// The status a stored word names, if any.
    pub fn parse(word: &str) -> Option<TurnStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

impl std::fmt::Display for TurnStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_turn_status_reads_back_from_its_word_and_its_json() {
        for s in TurnStatus::ALL {
            assert_eq!(TurnStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_string(&s).expect("json"), format!("\"{s}\""));
        }
        assert_eq!(TurnStatus::parse("done"), None);
    }

    #[test]
    fn every_status_reads_back_from_its_word_and_its_json() {
        for s in SessionStatus::ALL {
            assert_eq!(SessionStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).expect("json");
            assert_eq!(json, format!("\"{s}\""));
        }
        assert_eq!(SessionStatus::parse("idle"), None);
        assert!(
            SessionStatus::DELETABLE
                .iter()
                .all(|s| *s != SessionStatus::Deleted)
        );
        assert_eq!(
            SessionStatus::LIVE,
            [
                SessionStatus::Ready,
                SessionStatus::Running,
                SessionStatus::InputRequired
            ]
        );
        assert_eq!(SessionStatus::SUPERVISED[0], SessionStatus::Creating);
        assert_eq!(SessionStatus::DELETABLE.len(), 6);
    }
}
