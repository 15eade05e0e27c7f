//! Turns: the user's message is stored before the harness is dialled; the harness's events are
//! numbered, stored and fanned out; the outcome is stored with the assistant's message. One
//! machinery serves the three response modes (JSON, SSE, async).

use super::message::MessageRequest;
use super::view::{DeliveryView, MessageView};
use super::{Orchestrator, SessionError, quota};
use crate::status::{SessionStatus, TurnStatus};
use crate::store::{self, Event, Message, Session, Turn};
use futures::StreamExt;
use sandwarden_proto::event::{AGENT_FAILED, EventType, TurnEvent, TurnRequest, error_code};
use sandwarden_proto::harness_client::ClientError;
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};
use tracing::Instrument;

/// A template's turn limit when the session's template is gone (the templates' default).
const DEFAULT_TURN_LIMIT: Duration = Duration::from_secs(1800);
/// How long past the turn limit serve waits for the harness to report its own timeout.
const DEADLINE_GRACE: Duration = Duration::from_secs(5);
/// Why a turn ended when the harness said nothing by the deadline.
const HARNESS_SILENT: &str =
    "the harness did not answer within the turn timeout (it may be stopped or overloaded)";

/// How a turn ended, as the JSON reply, the turn resource and webhooks show it.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize)]
pub struct Outcome {
    pub session_id: String,
    pub turn_id: String,
    /// `completed`, `cancelled` or `failed`.
    pub status: TurnStatus,
    pub stop_reason: Option<String>,
    pub text: String,
    pub parts: Vec<Value>,
    pub messages: Vec<MessageView>,
    pub usage: Value,
    pub error: Option<Value>,
}

pub struct Started {
    pub session: Session,
    pub turn_id: String,
    /// Live session events, subscribed before the harness was dialled.
    pub events: broadcast::Receiver<Arc<store::Event>>,
    pub done: watch::Receiver<Option<Arc<Outcome>>>,
    /// The user's message the turn recorded.
    pub prompt: Message,
}

impl Started {
    /// How the turn ended, once it has.
    pub async fn outcome(self) -> Result<Arc<Outcome>, SessionError> {
        let mut done = self.done;
        done.wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|o| o.clone())
            .ok_or_else(|| SessionError::Harness {
                detail: "the turn ended without an outcome".into(),
                refused: None,
                turn_id: Some(self.turn_id),
            })
    }
}

/// Builds the assistant's parts from the turn's events: consecutive text chunks merge.
#[derive(Default)]
struct Reply {
    text: String,
    parts: Vec<Value>,
}

impl Reply {
    fn add(&mut self, kind: EventType, data: &Value) {
        match kind {
            EventType::Text | EventType::Reasoning => {
                let piece = data["text"].as_str().unwrap_or_default();
                let name = kind.as_str();
                if kind == EventType::Text {
                    self.text.push_str(piece);
                }
                if let Some(last) = self.parts.last_mut()
                    && last["type"] == name
                {
                    let joined = format!("{}{piece}", last["text"].as_str().unwrap_or_default());
                    last["text"] = Value::String(joined);
                    return;
                }
                self.parts.push(json!({ "type": name, "text": piece }));
            }
            EventType::ToolUse if data.get("update").is_none() => {
                self.parts.push(json!({ "type": "tool_use", "id": data["id"], "name": data["name"], "input": data["input"] }));
            }
            EventType::ToolResult => {
                self.parts.push(json!({ "type": "tool_result", "id": data["id"], "status": data["status"], "output": data["output"] }));
            }
            _ => {}
        }
    }
}

/// How many of a running turn's last events are read to find the questions it waits on (an
/// agent asks a few at once).
const PENDING_SCAN: i64 = 64;

/// The most text and parts one page of history carries (at least one message, whatever its
/// size): a client paging through a long history never makes `serve` hold it all at once.
pub const HISTORY_PAGE_BYTES: i64 = 4 * 1024 * 1024;

/// How long a message waits for the previous turn's end to be recorded before it is answered
/// `503` (the store is slow or down).
const ENDING_WAIT: Duration = Duration::from_secs(2);

/// The error for a turn that ran and failed.
fn failed(o: &Outcome) -> SessionError {
    let code = o
        .error
        .as_ref()
        .and_then(|e| e["code"].as_str())
        .unwrap_or("turn_failed");
    SessionError::TurnFailed(Box::new(super::error::FailedTurn {
        timed_out: code == sandwarden_proto::event::error_code::TIMEOUT,
        message: o
            .error
            .as_ref()
            .and_then(|e| e["message"].as_str())
            .unwrap_or("the turn failed")
            .to_string(),
        session_id: o.session_id.clone(),
        turn_id: o.turn_id.clone(),
        error: o.error.clone().unwrap_or(Value::Null),
        text: o.text.clone(),
    }))
}

/// Using a session that is dead, failed or deleted: its status and why.
pub fn not_usable(session: &Session) -> SessionError {
    SessionError::NotUsable {
        status: session.status,
        reason: session.failure_reason.clone(),
    }
}

impl Outcome {
    /// A turn and its messages as the store holds them.
    fn stored(turn: Turn, messages: Vec<Message>) -> Outcome {
        let parts = messages
            .iter()
            .find(|m| m.role == "assistant")
            .and_then(|m| m.parts.as_array().cloned())
            .unwrap_or_default();
        Outcome {
            session_id: turn.session_id,
            turn_id: turn.id,
            status: turn.status,
            stop_reason: turn.stop_reason,
            text: turn.text.unwrap_or_default(),
            parts,
            messages: messages.into_iter().map(MessageView::from).collect(),
            usage: turn.usage.unwrap_or(Value::Null),
            error: turn.error,
        }
    }

    /// The outcome of a turn that did not fail, or the error for one that did.
    pub fn succeeded(self: Arc<Self>) -> Result<Arc<Self>, SessionError> {
        if self.status == TurnStatus::Failed {
            return Err(failed(&self));
        }
        Ok(self)
    }

    /// The JSON reply of a unary message, or the problem for a failed turn.
    pub fn into_reply(self: Arc<Self>) -> Result<Value, SessionError> {
        if self.status == TurnStatus::Failed {
            return Err(failed(&self));
        }
        Ok(serde_json::to_value(&*self).unwrap_or(Value::Null))
    }
}

impl Orchestrator {
    /// Starts a turn on a session: checks, records the user's message, dials the harness.
    pub async fn start_turn(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        req: MessageRequest,
        mode: &str,
        limits: &super::quota::Limits,
    ) -> Result<Started, SessionError> {
        let parts = req
            .parts()
            .map_err(|m| SessionError::invalid("invalid_message", m))?;
        super::quota::check_message(&parts, limits)?;
        if let Some(budget) = &limits.budget {
            let used = self.store.tenant_usage(tenant).await?;
            super::quota::check_budget(budget, &used)?;
        }
        if let Some(hook) = &req.webhook {
            super::webhook::check_target(&hook.url, self.config.allow_private_webhooks)
                .await
                .map_err(|m| SessionError::invalid("invalid_webhook", m))?;
        }
        // A turn id chosen ahead (a vendor API's queued message) or a new one.
        let turn_id = req
            .turn_id
            .clone()
            .unwrap_or_else(|| format!("turn_{}", uuid::Uuid::now_v7().simple()));
        let waited = Instant::now();
        loop {
            match self.lock_turn(tenant, session_id, &turn_id, limits.concurrent_turns) {
                super::TurnLock::Taken => break,
                super::TurnLock::Quota(used) => {
                    return Err(SessionError::quota(
                        "concurrent_turns",
                        used,
                        limits.concurrent_turns.unwrap_or(used),
                        "wait for a running turn to end",
                    ));
                }
                super::TurnLock::Running(running) => {
                    // Only the session's owner learns that a turn runs on it.
                    self.get(tenant, session_id).await?;
                    return Err(SessionError::TurnInProgress {
                        turn_id: Some(running),
                    });
                }
                // The previous turn is over but not yet recorded: that is the store's delay,
                // not a turn in progress. Wait for it a little, then say so.
                super::TurnLock::Ending(ending) => {
                    if waited.elapsed() >= ENDING_WAIT {
                        self.get(tenant, session_id).await?;
                        return Err(SessionError::PreviousTurnUnrecorded {
                            previous_turn_id: ending,
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let started = self
            .record_and_dial(tenant, session_id, &turn_id, &req, parts, mode)
            .await;
        if started.is_err() {
            self.unlock_turn(session_id, &turn_id);
        }
        started
    }

    /// Why a session that is not `ready` takes no message.
    fn refusal(&self, session: &Session) -> SessionError {
        if session.kind == "tui" && session.status.is_live() {
            return SessionError::Terminal {
                tty_url: self.tty_url(session),
            };
        }
        match session.status {
            SessionStatus::Running | SessionStatus::InputRequired => {
                SessionError::TurnInProgress { turn_id: None }
            }
            _ => not_usable(session),
        }
    }

    /// Records the turn (the session moves to `running` in the same write, with no read before
    /// it), then dials the harness. A session that was not `ready` is read to say why; one still
    /// `creating` is waited for once.
    async fn record_and_dial(
        self: &Arc<Self>,
        tenant: &str,
        session_id: &str,
        turn_id: &str,
        req: &MessageRequest,
        parts: Vec<sandwarden_proto::event::Part>,
        mode: &str,
    ) -> Result<Started, SessionError> {
        let options = json!({
            "model": req.model, "thinking": req.thinking, "agent": req.agent,
            "participant_name": req.participant_name, "participant_type": req.participant_type,
            "webhook": req.webhook.as_ref().map(|w| &w.url),
        });
        let text: String = parts
            .iter()
            .filter_map(|p| match p {
                sandwarden_proto::event::Part::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let parts_value = serde_json::to_value(&parts).unwrap_or(Value::Null);
        let delivery = req
            .webhook
            .as_ref()
            .map(|hook| super::webhook::pending(self, hook, session_id, turn_id));
        let mut waited = false;
        let (session, mut turn, user) = loop {
            let now = store::now();
            let turn = Turn {
                id: turn_id.to_string(),
                session_id: session_id.to_string(),
                status: TurnStatus::Running,
                mode: mode.into(),
                options: options.clone(),
                text: None,
                usage: None,
                error: None,
                created_at: now.clone(),
                finished_at: None,
                stop_reason: None,
            };
            let user = Message {
                id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
                session_id: session_id.to_string(),
                turn_id: turn_id.to_string(),
                role: "user".into(),
                text: text.clone(),
                parts: parts_value.clone(),
                metadata: json!({
                    "participant_name": req.participant_name, "participant_type": req.participant_type,
                    "metadata": req.metadata,
                }),
                created_at: now,
            };
            let begun = self
                .store
                .begin_turn(tenant, &turn, &user, delivery.as_ref())
                .instrument(crate::step!("turn.begin"))
                .await?;
            if let Some(begun) = begun {
                if let Some(last) = begun.last_seq {
                    // The session's last turn may have run on another replica.
                    self.hub.set_seq(session_id, last).await;
                }
                self.hub.set_prompt(&user);
                break (begun.session, turn, user);
            }
            let session = self.get(tenant, session_id).await?;
            if session.status == SessionStatus::Creating && !waited {
                waited = true;
                self.wait(tenant, session_id, super::COLD_START_TIMEOUT)
                    .await?;
                continue;
            }
            if matches!(
                session.status,
                SessionStatus::Running | SessionStatus::InputRequired
            ) {
                // Held by a turn this replica may not know of (another replica runs it).
                let running = self.store.running_turn(session_id).await.ok().flatten();
                return Err(SessionError::TurnInProgress { turn_id: running });
            }
            return Err(self.refusal(&session));
        };
        let fail = |turn: &mut Turn, code: &str, message: String| {
            turn.status = TurnStatus::Failed;
            turn.error = Some(json!({ "code": code, "message": message }));
            turn.finished_at = Some(store::now());
        };
        let session = &session;
        self.notify_here(&session.id);
        let events = self.hub.subscribe(&session.id);
        let Some(client) = self.session_client(session) else {
            // A ready session always has a sandbox; if not, end the turn rather than strand it.
            fail(
                &mut turn,
                "harness_unreachable",
                "the session has no sandbox".into(),
            );
            self.record_failure(&turn).await;
            self.notify(&session.id);
            return Err(SessionError::NotFound(session.id.clone()));
        };
        let request = TurnRequest {
            turn_id: Some(turn_id.to_string()),
            parts,
            timeout_s: None,
            options: req.turn_options(),
        };
        // The harness enforces the template's turn timeout itself; this deadline, a little
        // later, covers a harness that cannot (stopped, or wedged) so the turn still ends.
        let deadline = tokio::time::Instant::now() + self.turn_deadline(&session.harness);
        let dial = client.turn(&request).instrument(crate::step!("turn.dial"));
        let dialled = match tokio::time::timeout_at(deadline, dial).await {
            Ok(dialled) => dialled,
            Err(_) => {
                fail(&mut turn, error_code::TIMEOUT, HARNESS_SILENT.into());
                self.record_failure(&turn).await;
                self.metrics.turn("failed");
                self.notify(&session.id);
                self.cancel_in_background(client);
                return Err(SessionError::TurnFailed(Box::new(
                    super::error::FailedTurn {
                        timed_out: true,
                        message: HARNESS_SILENT.into(),
                        session_id: session.id.clone(),
                        turn_id: turn_id.to_string(),
                        error: turn.error.clone().unwrap_or(Value::Null),
                        text: String::new(),
                    },
                )));
            }
        };
        let stream = match dialled {
            Ok(stream) => stream,
            // The harness found the request itself unusable (an option or a part the agent does
            // not offer): the client's mistake, so it leaves no trace.
            Err(ClientError::Refused(p)) if p.is_invalid_request() => {
                if let Err(e) = self.store.discard_turn(&session.id, turn_id).await {
                    tracing::error!(error = %e, turn_id, "discarding a refused turn failed");
                }
                self.notify(&session.id);
                return Err(SessionError::Invalid {
                    code: p.kind.clone().into(),
                    detail: p.detail.clone(),
                });
            }
            // The agent died while no turn ran: the session is dead, and this message is
            // refused as any message to a dead session is, leaving no trace.
            Err(ClientError::Refused(p)) if p.kind == AGENT_FAILED => {
                self.agent_ended(session, &p.detail).await;
                if let Err(e) = self.store.discard_turn(&session.id, turn_id).await {
                    tracing::error!(error = %e, turn_id, "discarding a turn for a dead agent failed");
                }
                self.notify(&session.id);
                let now = self.get(tenant, &session.id).await?;
                return Err(self.refusal(&now));
            }
            Err(e) => {
                let error = self.harness_failure(session, e).await;
                let code = match error {
                    SessionError::Unreachable { .. } => "harness_unreachable",
                    _ => "harness_error",
                };
                fail(&mut turn, code, error.to_string());
                // Also returns a running session to `ready` (a dead one stays dead).
                self.record_failure(&turn).await;
                self.metrics.turn("failed");
                self.notify(&session.id);
                return Err(error.in_turn(turn_id));
            }
        };
        let (done_tx, done) = watch::channel(None);
        let me = self.clone();
        let s = session.clone();
        let webhook = delivery.map(|d| (d, req.webhook.as_ref().and_then(|h| h.token.clone())));
        // The turn outlives the request that started it (async turns, a client that goes):
        // its own span, with the session and turn, follows it to its end.
        let span = tracing::info_span!("turn", session_id = %session.id, turn_id = %turn_id);
        let prompt = user.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let outcome = me.drive(s, turn, user, stream, webhook, deadline).await;
                let _ = done_tx.send(Some(outcome));
            },
            span,
        ));
        Ok(Started {
            session: session.clone(),
            turn_id: turn_id.to_string(),
            events,
            done,
            prompt,
        })
    }

    /// How long serve waits for a turn before ending it itself: the template's turn timeout
    /// (which the harness enforces) plus a grace for the harness to report it.
    fn turn_deadline(&self, harness: &str) -> Duration {
        let limit = self
            .templates()
            .get(harness)
            .map_or(DEFAULT_TURN_LIMIT, |t| {
                Duration::from_secs(t.turn_timeout_s)
            });
        limit + DEADLINE_GRACE
    }

    /// Asks the harness to cancel its turn, without waiting (it may never answer).
    fn cancel_in_background(&self, client: sandwarden_proto::harness_client::HarnessClient) {
        tokio::spawn(async move {
            let _ = tokio::time::timeout(DEADLINE_GRACE, client.cancel()).await;
        });
    }

    /// Records a turn that failed before the harness took it, and ends its event stream as
    /// every turn's ends: with an `error` event, so readers following the session see why.
    async fn record_failure(&self, turn: &Turn) {
        let error = turn.error.clone().unwrap_or(Value::Null);
        self.end_turn(turn, None, EventType::Error, store::now(), error, || {})
            .await;
    }

    /// Records a turn's end and its last event (`done` or `error`) in one commit, so a turn the
    /// store shows as ended always has that event, then fans the event out. `committed` runs
    /// between the two (so a client that acts on the event finds the turn over). Should the
    /// commit fail, the end and the event are handed to the store separately, as any event is.
    pub(super) async fn end_turn(
        &self,
        turn: &Turn,
        reply: Option<&Message>,
        kind: EventType,
        ts: String,
        data: Value,
        committed: impl FnOnce(),
    ) {
        let store = &self.store;
        let committed = std::sync::Mutex::new(Some(committed));
        let run_committed = || {
            let f = committed.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = f {
                f();
            }
        };
        let recorded = self
            .hub
            .publish_with(
                &turn.session_id,
                Some(&turn.id),
                kind.as_str(),
                ts.clone(),
                data.clone(),
                |event| async {
                    let event = event;
                    let stored = store
                        .finish_turn(turn, reply, Some(&event))
                        .instrument(crate::step!("turn.finish"))
                        .await;
                    if stored.is_ok() {
                        run_committed();
                    }
                    stored
                },
            )
            .await;
        if let Err(e) = recorded {
            tracing::error!(error = %e, turn_id = %turn.id, "recording the turn's end with its last event failed; recording them apart");
            if let Err(e) = self.store.finish_turn(turn, reply, None).await {
                tracing::error!(error = %e, turn_id = %turn.id, "recording the turn's end failed");
            }
            run_committed();
            if let Err(e) = self
                .hub
                .publish(&turn.session_id, Some(&turn.id), kind.as_str(), ts, data)
                .await
            {
                tracing::error!(error = %e, turn_id = %turn.id, "recording the turn's last event failed");
            }
        }
    }

    /// Consumes the harness's events to the end and records the outcome.
    async fn drive(
        self: Arc<Self>,
        session: Session,
        mut turn: Turn,
        user: Message,
        stream: impl futures::Stream<Item = Result<TurnEvent, ClientError>> + Send + 'static,
        webhook: Option<(store::Delivery, Option<String>)>,
        deadline: tokio::time::Instant,
    ) -> Arc<Outcome> {
        let started = Instant::now();
        futures::pin_mut!(stream);
        let mut reply = Reply::default();
        let mut terminal: Option<(EventType, String, Value)> = None;
        let mut waiting_input = false;
        let mut silent = false;
        let harness_step = crate::step!("turn.harness");
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, stream.next()).await else {
                silent = true;
                break;
            };
            let Some(item) = next else { break };
            let event = match item {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(session_id = %session.id, error = %e, "harness stream broke");
                    break;
                }
            };
            if event.kind == EventType::InputRequired {
                waiting_input = true;
                let _ = self
                    .store
                    .transition(
                        &session.id,
                        &[SessionStatus::Running],
                        SessionStatus::InputRequired,
                        None,
                    )
                    .await;
                self.notify(&session.id);
            } else if waiting_input {
                waiting_input = false;
                let _ = self
                    .store
                    .transition(
                        &session.id,
                        &[SessionStatus::InputRequired],
                        SessionStatus::Running,
                        None,
                    )
                    .await;
                self.notify(&session.id);
            }
            reply.add(event.kind, &event.data);
            if event.kind.is_terminal() {
                // Published after the turn is recorded and unlocked, so a client that sends its
                // next message on `done` finds the session ready.
                terminal = Some((event.kind, event.ts, event.data));
                break;
            }
            if let Err(e) = self
                .hub
                .publish(
                    &session.id,
                    Some(&turn.id),
                    event.kind.as_str(),
                    event.ts.clone(),
                    event.data.clone(),
                )
                .await
            {
                tracing::error!(error = %e, "recording an event failed");
            }
        }
        drop(harness_step);
        let (kind, ts, data) = match terminal {
            Some(t) => t,
            // Past the deadline without a word: the harness is alive but not answering (a
            // stopped process), which is not a dead session.
            None if silent => {
                if let Some(client) = self.session_client(&session) {
                    self.cancel_in_background(client);
                }
                let data = json!({ "code": error_code::TIMEOUT, "message": HARNESS_SILENT });
                (EventType::Error, store::now(), data)
            }
            None => {
                // The harness went away mid-turn: say so in the stream, and find out whether the
                // sandbox is gone.
                let data = json!({ "code": "harness_lost", "message": "the connection to the harness was lost during the turn" });
                self.probe_dead(&session).await;
                (EventType::Error, store::now(), data)
            }
        };
        let stop_reason = data["stop_reason"].as_str().map(String::from);
        let status = match (kind, stop_reason.as_deref()) {
            (EventType::Done, Some("cancelled")) => TurnStatus::Cancelled,
            (EventType::Done, _) => TurnStatus::Completed,
            _ => TurnStatus::Failed,
        };
        let usage = data
            .get("usage")
            .cloned()
            .unwrap_or_else(|| json!({"input_tokens":0,"output_tokens":0,"total_tokens":0}));
        turn.status = status;
        turn.stop_reason = stop_reason.clone();
        turn.text = Some(reply.text.clone());
        turn.usage = Some(usage.clone());
        turn.error = (kind == EventType::Error).then(|| data.clone());
        turn.finished_at = Some(store::now());
        let assistant = (!reply.parts.is_empty()).then(|| Message {
            id: format!("msg_{}", uuid::Uuid::now_v7().simple()),
            session_id: session.id.clone(),
            turn_id: turn.id.clone(),
            role: "assistant".into(),
            text: reply.text.clone(),
            parts: Value::Array(reply.parts.clone()),
            metadata: json!({}),
            created_at: store::now(),
        });
        self.turn_ending(&session.id, &turn.id);
        self.end_turn(&turn, assistant.as_ref(), kind, ts, data.clone(), || {
            self.unlock_turn(&session.id, &turn.id)
        })
        .await;
        self.metrics.turn(status.as_str());
        self.metrics
            .turn_duration
            .observe(started.elapsed().as_secs_f64());
        if kind == EventType::Error && data["code"] == error_code::AGENT_EXITED {
            let reason = data["message"].as_str().unwrap_or_default();
            self.agent_ended(&session, reason).await;
        }
        self.notify_here(&session.id);
        let mut messages = vec![user];
        messages.extend(assistant);
        let outcome = Arc::new(Outcome {
            session_id: session.id.clone(),
            turn_id: turn.id.clone(),
            status,
            stop_reason,
            text: reply.text,
            parts: reply.parts,
            messages: messages.into_iter().map(MessageView::from).collect(),
            usage,
            error: turn.error.clone(),
        });
        if let Some((record, token)) = webhook {
            let me = self.clone();
            let o = outcome.clone();
            tokio::spawn(async move { super::webhook::deliver(&me, record, token, Some(o)).await });
        }
        outcome
    }

    /// A turn's outcome from the store (for the turn resource and after restarts).
    /// A page of a session's turns, oldest first (see `Store::list_turns`): each as its own
    /// resource shows it, without the text and messages.
    pub async fn list_turns(
        &self,
        tenant: &str,
        session_id: &str,
        after: Option<(String, String)>,
        limit: i64,
    ) -> Result<Vec<super::view::TurnSummary>, SessionError> {
        let _ = self.get(tenant, session_id).await?;
        let turns = self.store.list_turns(session_id, after, limit).await?;
        Ok(turns.into_iter().map(Into::into).collect())
    }

    pub async fn turn_view(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: &str,
    ) -> Result<Value, SessionError> {
        let _ = self.get(tenant, session_id).await?;
        let turn = self
            .store
            .get_turn(session_id, turn_id)
            .await?
            .ok_or_else(|| SessionError::TurnNotFound(turn_id.to_string()))?;
        let messages = self.store.list_messages(session_id, Some(turn_id)).await?;
        let deliveries = self.store.deliveries(turn_id).await?;
        let (mode, created_at, finished_at) = (
            turn.mode.clone(),
            turn.created_at.clone(),
            turn.finished_at.clone(),
        );
        let mut view = serde_json::to_value(Outcome::stored(turn, messages)).unwrap_or_default();
        view["mode"] = json!(mode);
        view["created_at"] = json!(created_at);
        view["finished_at"] = json!(finished_at);
        let deliveries: Vec<DeliveryView> =
            deliveries.into_iter().map(DeliveryView::from).collect();
        view["webhook_deliveries"] = json!(deliveries);
        Ok(view)
    }

    /// The outcome of an ended turn, rebuilt from the store (to resume its webhook).
    pub async fn stored_outcome(&self, session_id: &str, turn_id: &str) -> Option<Outcome> {
        let turn = self.store.get_turn(session_id, turn_id).await.ok()??;
        if turn.status == TurnStatus::Running {
            return None;
        }
        let messages = self
            .store
            .list_messages(session_id, Some(turn_id))
            .await
            .ok()?;
        Some(Outcome::stored(turn, messages))
    }

    /// Long-polls a turn until it is no longer running or `timeout` passes.
    pub async fn wait_turn(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: &str,
        timeout: Duration,
    ) -> Result<Value, SessionError> {
        let mut changes = self.changes();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let view = self.turn_view(tenant, session_id, turn_id).await?;
            if view["status"] != "running" {
                return Ok(view);
            }
            if !super::changed(&mut changes, session_id, deadline).await {
                return Ok(view);
            }
        }
    }

    /// The questions a session in `input_required` waits on: the `input_required` events that
    /// end its running turn's events so far, less those answered already (none when it waits
    /// on nothing).
    pub async fn pending_inputs(&self, session: &Session) -> Result<Vec<Event>, SessionError> {
        if session.status != SessionStatus::InputRequired {
            return Ok(Vec::new());
        }
        let running = match self.running_turn(&session.id) {
            Some(t) => Some(t),
            None => self.store.running_turn(&session.id).await?,
        };
        let Some(turn_id) = running else {
            return Ok(Vec::new());
        };
        // Events reach their subscribers before the store's batched commit: commit first.
        self.store.flush().await?;
        let Some(first) = self.store.turn_first_seq(&session.id, &turn_id).await? else {
            return Ok(Vec::new());
        };
        let last = self.store.last_seq(&session.id).await?;
        let from = (first - 1).max(last - PENDING_SCAN);
        let events = self
            .store
            .list_events(&session.id, from, PENDING_SCAN)
            .await?;
        let waiting = events
            .iter()
            .rev()
            .take_while(|e| e.kind == EventType::InputRequired.as_str())
            .count();
        Ok(events[events.len() - waiting..]
            .iter()
            .filter(|e| {
                let id = e.data["request_id"].as_str().unwrap_or_default();
                !self.was_answered(&session.id, id)
            })
            .cloned()
            .collect())
    }

    /// Cancels the session's running turn through its harness.
    pub async fn cancel(&self, tenant: &str, session_id: &str) -> Result<Value, SessionError> {
        let session = self.get(tenant, session_id).await?;
        // A turn another replica runs is cancelled the same way: through the sandbox's harness,
        // which any replica can reach at the endpoint in the store.
        let running = match self.running_turn(&session.id) {
            Some(t) => Some(t),
            None => self.store.running_turn(&session.id).await?,
        };
        let Some(turn_id) = running else {
            return Err(SessionError::NoTurnRunning);
        };
        let client = self
            .session_client(&session)
            .ok_or_else(|| SessionError::NotFound(session_id.to_string()))?;
        match client.cancel().await {
            Ok(_) => {
                Ok(json!({ "session_id": session.id, "turn_id": turn_id, "cancelling": true }))
            }
            Err(ClientError::Refused(p)) if p.kind == sandwarden_proto::event::NO_TURN_RUNNING => {
                // The turn ended between our check and the harness's.
                Ok(json!({ "session_id": session.id, "turn_id": turn_id, "cancelling": false }))
            }
            Err(e) => Err(self.harness_failure(&session, e).await),
        }
    }

    /// Answers an `input_required` event through the harness.
    pub async fn answer(
        &self,
        tenant: &str,
        session_id: &str,
        request_id: &str,
        answer: &sandwarden_proto::event::InputAnswer,
    ) -> Result<Value, SessionError> {
        let session = self.get(tenant, session_id).await?;
        // An ended session's sandbox is gone: nothing waits there, and asking it would count
        // against the session as a failure to reach it.
        if !session.status.is_live() {
            return Err(not_usable(&session));
        }
        let client = self
            .session_client(&session)
            .ok_or_else(|| SessionError::NotFound(session_id.to_string()))?;
        match client.answer(request_id, answer).await {
            Ok(v) => {
                self.note_answered(&session.id, request_id);
                Ok(v)
            }
            // Only the refusals an answer can get are passed on as they came (a harness claiming a 401
            // or a 429 is not passed on as if serve had said it).
            Err(ClientError::Refused(p)) if matches!(p.status, 404 | 409 | 422) => {
                Err(SessionError::HarnessRefused(p))
            }
            Err(e) => Err(self.harness_failure(&session, e).await),
        }
    }

    /// What a failed request to the session's harness means, after the dead rule.
    pub(super) async fn harness_failure(&self, session: &Session, e: ClientError) -> SessionError {
        if self.unreachable(session, &e).await {
            return SessionError::Unreachable { turn_id: None };
        }
        match e {
            ClientError::Refused(p) => SessionError::Harness {
                detail: format!("the harness refused the request: {}", p.detail),
                refused: Some(p.kind.clone()),
                turn_id: None,
            },
            other => SessionError::Harness {
                detail: format!("the harness failed: {other}"),
                refused: None,
                turn_id: None,
            },
        }
    }

    /// A page of the session's history from `from` (see `Store::message_cut`), admitted to the
    /// answer memory before it is read (see `quota::Answers`); `next` is where the next page
    /// that way starts.
    pub async fn history(
        &self,
        tenant: &str,
        limits: &quota::Limits,
        session_id: &str,
        from: store::HistoryFrom,
        limit: i64,
    ) -> Result<Page<MessageView>, SessionError> {
        let s = self.get(tenant, session_id).await?;
        let cut = self
            .store
            .message_cut(&s.id, from, limit, HISTORY_PAGE_BYTES)
            .await?;
        let id = s.id.as_str();
        self.admitted_page(tenant, limits, cut, |last| async move {
            let (after, last) = from.span(last);
            let messages = self.store.messages_through(id, after, last).await?;
            Ok(messages.into_iter().map(MessageView::from).collect())
        })
        .await
    }

    /// A page of the session's events after `since` (see `Hub::cut`), admitted to the answer
    /// memory before it is read.
    /// Admits an answer of `bytes` built from the store (a vendor API's history page) to the
    /// tenant's and the server's answer memory, held until the answer has been sent.
    pub async fn admit_answer(
        &self,
        tenant: &str,
        limits: &quota::Limits,
        bytes: usize,
    ) -> Result<quota::Admitted, SessionError> {
        self.answers
            .admit(
                tenant,
                i64::try_from(bytes).unwrap_or(i64::MAX),
                limits.answer_mib,
            )
            .await
    }

    pub async fn event_page(
        &self,
        tenant: &str,
        limits: &quota::Limits,
        session_id: &str,
        since: i64,
        limit: i64,
    ) -> Result<Page<Event>, SessionError> {
        let cut = self.hub.cut(session_id, since, limit).await?;
        self.admitted_page(tenant, limits, cut, |last| {
            self.store.events_through(session_id, since, last)
        })
        .await
    }

    /// Admits a page the store has cut to the answer memory, then has `read` read it up to its
    /// last seq.
    async fn admitted_page<T, Fut>(
        &self,
        tenant: &str,
        limits: &quota::Limits,
        cut: Option<store::PageCut>,
        read: impl FnOnce(i64) -> Fut,
    ) -> Result<Page<T>, SessionError>
    where
        Fut: std::future::Future<Output = Result<Vec<T>, store::StoreError>>,
    {
        let Some(cut) = cut else {
            return Ok(Page::empty());
        };
        let admitted = self
            .answers
            .admit(tenant, cut.bytes, limits.answer_mib)
            .await?;
        let items = read(cut.last).await?;
        Ok(Page {
            items,
            next: cut.next(),
            admitted: Some(admitted),
        })
    }
}

/// A page of history or events, with its share of the answer memory: keep `admitted` until the
/// answer has been sent.
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts, when more follow.
    pub next: Option<i64>,
    pub admitted: Option<quota::Admitted>,
}

impl<T> Page<T> {
    fn empty() -> Page<T> {
        Page {
            items: Vec::new(),
            next: None,
            admitted: None,
        }
    }
}
