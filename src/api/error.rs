//! The one place a session error becomes HTTP: its status, its problem `type`, the detail a
//! client reads and the fields it can act on. A store failure's cause goes to the log, never to
//! the client (it may name hosts or values).

use crate::session::SessionError;
use crate::session::error::FailedTurn;
use axum::http::StatusCode;
use sandwarden_proto::problem::Problem;

impl From<SessionError> for Problem {
    fn from(e: SessionError) -> Problem {
        use SessionError as E;
        let detail = e.to_string();
        match e {
            E::Invalid { code, detail } => {
                Problem::new(StatusCode::UNPROCESSABLE_ENTITY, &code, detail)
            }
            E::NotFound(id) => Problem::new(
                StatusCode::NOT_FOUND,
                "session_not_found",
                format!("no session {id:?}; list yours with GET /v1/sessions"),
            ),
            E::TurnNotFound(_) => Problem::new(StatusCode::NOT_FOUND, "turn_not_found", detail),
            E::Exists(name) => Problem::new(
                StatusCode::CONFLICT,
                "session_exists",
                format!("you already have a session with id {name:?}; pick another id"),
            ),
            E::IdempotencyKeyReused => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request; use a new key",
            ),
            E::NotUsable { status, reason } => Problem::new(
                StatusCode::CONFLICT,
                "session_not_usable",
                format!(
                    "the session is {status}{}; create a new session",
                    reason.map(|r| format!(" ({r})")).unwrap_or_default()
                ),
            )
            .with("session_status", status.as_str()),
            E::Terminal { tty_url } => {
                let p = Problem::new(
                    StatusCode::CONFLICT,
                    "tui_session",
                    "this session runs a terminal program; attach to its tty_url over WebSocket \
                     instead of sending messages",
                );
                match tty_url {
                    Some(url) => p.with("tty_url", url),
                    None => p,
                }
            }
            E::TurnInProgress { turn_id } => {
                let p = Problem::new(
                    StatusCode::CONFLICT,
                    "turn_in_progress",
                    "a turn is running on this session; wait for it to finish or cancel it",
                );
                match turn_id {
                    Some(t) => p.with("turn_id", t),
                    None => p,
                }
            }
            E::NoTurnRunning => Problem::new(StatusCode::CONFLICT, "no_turn_running", detail),
            E::PreviousTurnUnrecorded { previous_turn_id } => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the previous turn has ended but the store has not yet taken its end; retry in \
                 a moment",
            )
            .with("previous_turn_id", previous_turn_id),
            E::Quota {
                limit,
                used,
                max,
                hint,
            } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                format!("over this tenant's {limit} limit ({used} of {max}): {hint}"),
            )
            .with("limit", limit)
            .with("used", used)
            .with("max", max),
            E::RateLimited {
                rate,
                burst,
                retry_after_s,
            } => Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this key sent requests faster than its limit of {rate} a second (bursts of \
                     {burst}): wait {retry_after_s} s (Retry-After) and send fewer; an admin can \
                     raise `limits.request_rate` with PATCH /v1/api-keys/{{id}}"
                ),
            )
            .with("limit", "request_rate")
            .with("max", rate)
            .with("burst", burst)
            .with("retry_after_s", retry_after_s),
            E::Budget { budget, used, max } => Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "budget_exhausted",
                format!(
                    "this tenant's budget of {max} {} is used up ({used}); an admin can raise it \
                     with PATCH /v1/api-keys/{{id}}",
                    budget.replace('_', " ")
                ),
            )
            .with("budget", budget)
            .with("used", used)
            .with("max", max),
            E::AnswersBusy => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                "serve is answering as many large pages as its memory for answers allows \
                 (--answer-memory-mib); retry shortly",
            ),
            E::Unreachable { turn_id } => {
                let p = Problem::new(StatusCode::BAD_GATEWAY, "harness_unreachable", detail)
                    .with("session_status", "dead");
                match turn_id {
                    Some(t) => p.with("turn_id", t),
                    None => p,
                }
            }
            E::Harness {
                refused, turn_id, ..
            } => {
                let mut p = Problem::new(StatusCode::BAD_GATEWAY, "harness_error", detail);
                if let Some(code) = refused {
                    p = p.with("harness_error", code);
                }
                match turn_id {
                    Some(t) => p.with("turn_id", t),
                    None => p,
                }
            }
            E::HarnessRefused(p) => p,
            E::TurnFailed(turn) => {
                let status = if turn.timed_out {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::BAD_GATEWAY
                };
                let FailedTurn {
                    message,
                    session_id,
                    turn_id,
                    error,
                    text,
                    ..
                } = *turn;
                Problem::new(status, "turn_failed", message)
                    .with("turn_id", turn_id)
                    .with("session_id", session_id)
                    .with("error", error)
                    .with("text", text)
            }
            E::Store(e) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "store failure");
                match e.unavailable() {
                    Some(why) => Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        why.detail(),
                    ),
                    None => Problem::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "store_error",
                        "the session store failed this request; the server log has the cause",
                    ),
                }
            }
        }
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Problem {
        SessionError::Store(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::SessionStatus;
    use crate::store::StoreError;

    fn mapped(e: SessionError) -> (u16, String, Problem) {
        let p = Problem::from(e);
        (p.status, p.kind.clone(), p)
    }

    #[test]
    fn each_rule_has_its_status_and_type_and_says_what_to_do() {
        let cases = [
            (
                SessionError::invalid("invalid_message", "say something"),
                422,
                "invalid_message",
            ),
            (
                SessionError::NotFound("mine".into()),
                404,
                "session_not_found",
            ),
            (SessionError::Exists("mine".into()), 409, "session_exists"),
            (
                SessionError::NotUsable {
                    status: SessionStatus::Dead,
                    reason: Some("its sandbox vanished".into()),
                },
                409,
                "session_not_usable",
            ),
            (
                SessionError::TurnInProgress { turn_id: None },
                409,
                "turn_in_progress",
            ),
            (
                SessionError::quota("live_sessions", 3, 3, "delete one"),
                429,
                "quota_exceeded",
            ),
            (
                SessionError::Budget {
                    budget: "tokens",
                    used: 10,
                    max: 10,
                },
                402,
                "budget_exhausted",
            ),
            (SessionError::AnswersBusy, 503, "server_busy"),
            (
                SessionError::Unreachable { turn_id: None },
                502,
                "harness_unreachable",
            ),
            (
                SessionError::Store(StoreError::WriterGone),
                503,
                "store_unavailable",
            ),
            (
                SessionError::Store(StoreError::Conflict),
                500,
                "store_error",
            ),
        ];
        for (e, status, kind) in cases {
            let (got, got_kind, p) = mapped(e);
            assert_eq!((got, got_kind.as_str()), (status, kind), "{p:?}");
            assert!(!p.detail.is_empty(), "{p:?}");
        }
        // The fields a client acts on.
        let (_, _, p) = mapped(SessionError::NotUsable {
            status: SessionStatus::Dead,
            reason: Some("its sandbox vanished".into()),
        });
        assert_eq!(p.extra["session_status"], "dead");
        assert!(p.detail.contains("its sandbox vanished"), "{}", p.detail);
        let (_, _, p) = mapped(SessionError::quota("open_streams", 20, 20, "close one"));
        assert_eq!(
            (&p.extra["limit"], &p.extra["used"], &p.extra["max"]),
            (&"open_streams".into(), &20.into(), &20.into())
        );
        let (_, _, p) = mapped(SessionError::Unreachable { turn_id: None }.in_turn("turn_1"));
        assert_eq!(p.extra["turn_id"], "turn_1");
    }

    #[test]
    fn a_store_failure_never_tells_the_client_its_cause() {
        let cause = StoreError::Location("postgres-secret-host:5432".into());
        let (status, _, p) = mapped(SessionError::Store(cause));
        assert_eq!(status, 500);
        let body = serde_json::to_string(&p).expect("json");
        assert!(!body.contains("secret-host"), "{body}");
    }
}
