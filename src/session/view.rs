//! What clients see of the store's rows: the session, message and webhook-delivery views the API,
//! replies and webhooks serialize. Store rows carry what the server keeps to itself (the tenant,
//! the sandbox's endpoint, a sealed token); a view names each field a client may read, so a new
//! column stays private until a view shows it.

use crate::status::SessionStatus;
use crate::status::TurnStatus;
use crate::store::{Delivery, Message, Session, Turn};
use serde::Serialize;

/// A session as the API shows it.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct SessionView {
    pub id: String,
    /// The id the client picked at create, if it did.
    pub name: Option<String>,
    pub harness: String,
    pub kind: String,
    pub status: SessionStatus,
    pub phase: Option<String>,
    pub failure_reason: Option<String>,
    pub title: Option<String>,
    pub metadata: serde_json::Value,
    pub idle_timeout_s: i64,
    pub created_at: String,
    pub updated_at: String,
    pub last_active_at: String,
    /// How its sandbox is confined (`bwrap`, `container`, `pod`, `none`).
    pub isolation: String,
    /// Where to attach its terminal (a terminal session that is live).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tty_url: Option<String>,
    /// The turn running now, if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn_id: Option<String>,
}

impl SessionView {
    pub fn new(
        s: &Session,
        isolation: &str,
        tty_url: Option<String>,
        turn_id: Option<String>,
    ) -> SessionView {
        SessionView {
            id: s.id.clone(),
            name: s.name.clone(),
            harness: s.harness.clone(),
            kind: s.kind.clone(),
            status: s.status,
            phase: s.phase.clone(),
            failure_reason: s.failure_reason.clone(),
            title: s.title.clone(),
            metadata: s.metadata.clone(),
            idle_timeout_s: s.idle_timeout_s,
            created_at: s.created_at.clone(),
            updated_at: s.updated_at.clone(),
            last_active_at: s.last_active_at.clone(),
            isolation: isolation.to_string(),
            tty_url,
            turn_id,
        }
    }
}

/// A message of the history, as pages, replies and webhooks show it.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize)]
pub struct MessageView {
    pub id: String,
    pub turn_id: String,
    pub role: String,
    pub text: String,
    pub parts: serde_json::Value,
    pub metadata: serde_json::Value,
    pub created_at: String,
}

impl From<Message> for MessageView {
    fn from(m: Message) -> MessageView {
        MessageView {
            id: m.id,
            turn_id: m.turn_id,
            role: m.role,
            text: m.text,
            parts: m.parts,
            metadata: m.metadata,
            created_at: m.created_at,
        }
    }
}

/// A webhook delivery, as the turn resource shows it (never its payload or the client's token).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct DeliveryView {
    pub id: String,
    pub turn_id: String,
    pub session_id: String,
    pub url: String,
    pub status: String,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> DeliveryView {
        DeliveryView {
            id: d.id,
            turn_id: d.turn_id,
            session_id: d.session_id,
            url: d.url,
            status: d.status,
            attempts: d.attempts,
            last_status: d.last_status,
            last_error: d.last_error,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

/// A turn as a session's turn list shows it: without its text (as large as its answer; the
/// turn's own resource and the history carry it).
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct TurnSummary {
    pub turn_id: String,
    pub session_id: String,
    pub status: TurnStatus,
    pub stop_reason: Option<String>,
    pub mode: String,
    pub usage: Option<serde_json::Value>,
    pub error: Option<serde_json::Value>,
    pub created_at: String,
    pub finished_at: Option<String>,
}

impl From<Turn> for TurnSummary {
    fn from(t: Turn) -> TurnSummary {
        TurnSummary {
            turn_id: t.id,
            session_id: t.session_id,
            status: t.status,
            stop_reason: t.stop_reason,
            mode: t.mode,
            usage: t.usage,
            error: t.error,
            created_at: t.created_at,
            finished_at: t.finished_at,
        }
    }
}
