//! What can go wrong with a session request, in the session's own words: which rule refused it
//! and the values a client needs to act. The API layer (`api::error`) alone decides the HTTP
//! status, the problem's `type` and its fields; nothing here knows them.

use crate::status::SessionStatus;
use crate::store::StoreError;
use sandwarden_proto::problem::Problem;
use serde_json::Value;
use std::borrow::Cow;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The request itself is unusable; `code` names what (`invalid_session`, `unknown_harness`,
    /// `invalid_message`, or the code the harness gave for an option its agent does not offer).
    #[error("{detail}")]
    Invalid {
        code: Cow<'static, str>,
        detail: String,
    },
    /// No session of the caller's by that id or name.
    #[error("no session {0:?}")]
    NotFound(String),
    /// No turn by that id in the session.
    #[error("no turn {0:?} in this session")]
    TurnNotFound(String),
    /// The tenant already has a session of that name.
    #[error("a session named {0:?} exists")]
    Exists(String),
    /// The Idempotency-Key was used with a different request.
    #[error("the idempotency key was used with a different request")]
    IdempotencyKeyReused,
    /// The session is dead, failed or deleted.
    #[error("the session is {status}")]
    NotUsable {
        status: SessionStatus,
        reason: Option<String>,
    },
    /// The session runs a terminal program: it takes no messages.
    #[error("the session runs a terminal program")]
    Terminal { tty_url: Option<String> },
    /// A turn runs on the session (named when known).
    #[error("a turn is running on this session")]
    TurnInProgress { turn_id: Option<String> },
    /// A cancel found no turn running.
    #[error("no turn is running on this session")]
    NoTurnRunning,
    /// The previous turn has ended but its end is not yet in the store.
    #[error("the previous turn's end is not yet recorded")]
    PreviousTurnUnrecorded { previous_turn_id: String },
    /// Over one of the tenant's (or the server's) limits; `hint` says what to do.
    #[error("over the {limit} limit ({used} of {max})")]
    Quota {
        limit: &'static str,
        used: u64,
        max: u64,
        hint: String,
    },
    /// The key sent its burst of requests faster than its rate refills it.
    #[error("over this key's request rate ({rate} a second, bursts of {burst})")]
    RateLimited {
        rate: u64,
        burst: u64,
        /// Whole seconds until the key may send again.
        retry_after_s: u64,
    },
    /// The tenant's budget of `budget` is used up.
    #[error("the {budget} budget is used up ({used} of {max})")]
    Budget {
        budget: &'static str,
        used: u64,
        max: u64,
    },
    /// The server's memory for answers stayed taken for as long as a page may wait.
    #[error("the memory for answers stayed taken")]
    AnswersBusy,
    /// The session's sandbox could not be reached: the session is now dead.
    #[error(
        "the session's sandbox could not be reached; the session is now dead, create a new one"
    )]
    Unreachable { turn_id: Option<String> },
    /// The harness failed a request (`refused`: the code it refused with, when it answered).
    #[error("{detail}")]
    Harness {
        detail: String,
        refused: Option<String>,
        turn_id: Option<String>,
    },
    /// The harness's own answer to a request it refused as the client's mistake (an unknown
    /// input request, an answer it cannot take), passed on as it came.
    #[error("the harness refused: {}", .0.detail)]
    HarnessRefused(Problem),
    /// The turn ran and failed.
    #[error("{}", .0.message)]
    TurnFailed(Box<FailedTurn>),
    /// The store failed the request.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A turn that ran and failed, with what it wrote before it did.
#[derive(Debug)]
pub struct FailedTurn {
    /// Past its time limit, or the harness fell silent.
    pub timed_out: bool,
    pub message: String,
    pub session_id: String,
    pub turn_id: String,
    /// The turn's `error` as recorded (`code`, `message`).
    pub error: Value,
    pub text: String,
}

impl SessionError {
    /// Over `limit`: `used` of `max`, and what to do about it.
    pub fn quota(limit: &'static str, used: u64, max: u64, hint: impl Into<String>) -> Self {
        SessionError::Quota {
            limit,
            used,
            max,
            hint: hint.into(),
        }
    }

    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        SessionError::Invalid {
            code: Cow::Borrowed(code),
            detail: detail.into(),
        }
    }

    /// The same error with the turn it happened to, where it names one.
    pub fn in_turn(self, turn: &str) -> Self {
        match self {
            SessionError::Harness {
                detail, refused, ..
            } => SessionError::Harness {
                detail,
                refused,
                turn_id: Some(turn.to_string()),
            },
            SessionError::Unreachable { .. } => SessionError::Unreachable {
                turn_id: Some(turn.to_string()),
            },
            other => other,
        }
    }
}
