//! The vendor APIs' input queue: their clients may send a message while a turn runs (the native
//! API answers `409` then). Such a message is kept in the store, with the id of the turn it will
//! be, and a drainer starts it once the running turn has ended, in the order they came.
//!
//! A queued message survives a restart: the queue is drained again when the session is next used
//! through a vendor API (a message, a stream, a read). A message that can no longer start (the
//! session died; the agent refuses it) is dropped, said in the log; the session's status says why.

use super::{AppState, Caller};
use crate::session::SessionError;
use crate::store::VendorObject;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Most messages queued on one session.
const MAX_QUEUED: usize = 50;

/// The store kind of a session's queue (one kind per session, so its head is one lookup).
fn kind(session_id: &str) -> String {
    format!("vendor.queue:{session_id}")
}

/// Sessions whose queue a drainer of this process is draining.
fn draining() -> &'static Mutex<HashSet<String>> {
    static DRAINING: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    DRAINING.get_or_init(Mutex::default)
}

fn message(
    parts: &[Value],
    model: Option<&str>,
    turn_id: &str,
) -> Result<crate::session::message::MessageRequest, SessionError> {
    let mut req: crate::session::message::MessageRequest =
        serde_json::from_value(json!({"parts": parts, "async": true, "model": model}))
            .map_err(|e| SessionError::invalid("invalid_message", e.to_string()))?;
    req.turn_id = Some(turn_id.to_string());
    Ok(req)
}

/// Starts a turn with `parts` at once, or queues it behind the running turn (and the messages
/// queued before it). The id of the turn it is or will be.
pub(super) async fn send(
    orch: &AppState,
    caller: &Caller,
    session_id: &str,
    parts: &[Value],
    model: Option<&str>,
) -> Result<String, SessionError> {
    let turn_id = format!("turn_{}", uuid::Uuid::now_v7().simple());
    let queued = orch
        .store
        .list_objects(
            &caller.tenant,
            &kind(session_id),
            None,
            false,
            true,
            MAX_QUEUED as i64,
        )
        .await?;
    if queued.is_empty() {
        let req = message(parts, model, &turn_id)?;
        match orch
            .start_turn(&caller.tenant, session_id, req, "async", &caller.limits)
            .await
        {
            Ok(started) => return Ok(started.turn_id),
            Err(SessionError::TurnInProgress { .. }) => {}
            Err(e) => return Err(e),
        }
    } else if queued.len() >= MAX_QUEUED {
        return Err(SessionError::invalid(
            "queue_full",
            format!("{MAX_QUEUED} messages wait on this session already: wait for its turns"),
        ));
    }
    let now = crate::store::now();
    let item = VendorObject {
        tenant: caller.tenant.clone(),
        kind: kind(session_id),
        id: turn_id.clone(),
        version: 1,
        body: json!({"parts": parts, "model": model}),
        created_at: now,
        archived_at: None,
    };
    orch.store.put_object(&item).await?;
    drain(orch, caller, session_id);
    Ok(turn_id)
}

/// Makes sure a drainer runs for the session's queue (a no-op when one does, or it is empty).
pub(super) fn drain(orch: &AppState, caller: &Caller, session_id: &str) {
    if !lock(draining()).insert(session_id.to_string()) {
        return;
    }
    let (orch, caller, session_id) = (orch.clone(), caller.clone(), session_id.to_string());
    tokio::spawn(async move {
        if let Err(e) = run(&orch, &caller, &session_id).await {
            tracing::warn!(session_id, error = %e, "a session's queued messages could not be sent; they wait for its next use");
        }
        lock(draining()).remove(&session_id);
    });
}

async fn run(orch: &AppState, caller: &Caller, session_id: &str) -> Result<(), SessionError> {
    let kind = kind(session_id);
    loop {
        if orch.shutdown.is_cancelled() {
            return Ok(());
        }
        let Some(head) = orch
            .store
            .list_objects(&caller.tenant, &kind, None, false, true, 1)
            .await?
            .pop()
        else {
            return Ok(());
        };
        // Started before a crash kept it from being removed: it is done.
        if orch.store.get_turn(session_id, &head.id).await?.is_some() {
            orch.store
                .delete_object(&caller.tenant, &kind, &head.id)
                .await?;
            continue;
        }
        if let Some(running) = orch.store.running_turn(session_id).await? {
            let _ = orch
                .wait_turn(
                    &caller.tenant,
                    session_id,
                    &running,
                    Duration::from_secs(30),
                )
                .await;
            continue;
        }
        let parts = head.body["parts"].as_array().cloned().unwrap_or_default();
        let req = message(&parts, head.body["model"].as_str(), &head.id)?;
        match orch
            .start_turn(&caller.tenant, session_id, req, "async", &caller.limits)
            .await
        {
            Ok(_) => {}
            // Another message got there first: wait for its turn.
            Err(SessionError::TurnInProgress { .. }) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                let problem = sandwarden_proto::problem::Problem::from(e);
                if problem.status >= 500 {
                    return Err(SessionError::invalid(
                        "queue_stalled",
                        problem.detail.clone(),
                    ));
                }
                // The client's to fix, not something a retry mends: dropped, said in the log.
                tracing::warn!(session_id, turn_id = %head.id, reason = %problem.detail, "a queued message was dropped: it cannot start");
            }
        }
        orch.store
            .delete_object(&caller.tenant, &kind, &head.id)
            .await?;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
