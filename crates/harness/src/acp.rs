//! The API kind: one ACP agent process over stdio, one ACP session, one turn at a time.
//!
//! Owns the agent's lifecycle (start, late-bound restart, exit, stop) and turns (prompt, stream,
//! cancel, timeout, permission requests). It speaks to routes through plain values and channels and
//! must not know about HTTP beyond the `Problem` it returns.

use super::bind::{self, CheckedBind};
use super::config::{self, Change, Choices};
use super::map;
use super::process::{GroupHandle, StderrTail, child_env, not_found_reason};
use super::{HarnessConfig, StartMode};
use crate::event::{
    Decision, EventType, ExitStatus, Health, InputAnswer, Part, Phase, TurnEvent, TurnRequest,
    error_code,
};
use crate::problem::Problem;
use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::schema::{
    BlobResourceContents, CancelNotification, ContentBlock, EmbeddedResource,
    EmbeddedResourceResource, EnvVariable, HttpHeader, ImageContent, Implementation,
    InitializeRequest, McpCapabilities, McpServer, McpServerHttp, McpServerSse, McpServerStdio,
    NewSessionRequest, PermissionOption, PermissionOptionKind, PromptCapabilities, PromptRequest,
    RequestPermissionOutcome, RequestPermissionRequest, RequestPermissionResponse, ResourceLink,
    SelectedPermissionOutcome, SessionId, SessionNotification, SessionUpdate,
    SetSessionConfigOptionRequest, SetSessionModeRequest, TextContent, TextResourceContents,
};
use agent_client_protocol::v1::{ConnectionTo, Responder};
use agent_client_protocol::{Agent, ByteStreams, Client};
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

/// Events buffered per turn between the agent and a slow reader; past that the agent waits.
const TURN_EVENT_BUFFER: usize = 256;
/// Longest a turn waits, each time round, for a reaped agent's failure to be recorded (that
/// waits up to 300 ms for its last stderr lines).
const AGENT_FAILURE_GRACE: Duration = Duration::from_secs(1);
/// After the prompt fails on a closed connection, how long to wait for the exit to be reaped
/// so the error can carry the exit status and stderr.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(1);

/// What health reports; one value, replaced whole on every transition.
#[derive(Debug, Clone)]
pub struct Status {
    pub phase: Phase,
    pub reason: Option<String>,
    pub exit: Option<ExitStatus>,
    pub stderr_tail: Vec<String>,
    /// Incremented on every (re)start so a superseded process's exit is not taken for a failure.
    pub generation: u64,
    pub agent_info: Option<Value>,
}

/// The live ACP connection and session of the current generation.
#[derive(Clone)]
struct Live {
    cx: ConnectionTo<Agent>,
    session: SessionId,
    caps: PromptCapabilities,
    /// The MCP transports beyond stdio the agent said it takes.
    mcp: McpCapabilities,
}

struct ActiveTurn {
    id: String,
    sink: Arc<Sink>,
    cancel: CancellationToken,
}

/// The `session/prompt` the agent has not answered yet. Every update the agent sends belongs to
/// it, also after its turn was ended for the client (a cancel that outlived its grace), until the
/// agent answers it: only then may another prompt be sent.
struct InFlight {
    turn_id: String,
    sink: Arc<Sink>,
    /// Updates routed to it, to spot an answer that carried none.
    updates: u64,
}

struct PendingInput {
    turn_id: String,
    waiter: Waiter,
}

/// Who waits on an `input_required`: the agent's permission request, or a call of a client tool
/// (its MCP request, answered with the client's result; dropped, the call fails).
enum Waiter {
    Permission {
        responder: Box<Responder<RequestPermissionResponse>>,
        options: Vec<PermissionOption>,
    },
    Tool(tokio::sync::oneshot::Sender<(String, bool)>),
}

struct Inner {
    generation: u64,
    live: Option<Live>,
    child: Option<GroupHandle>,
    turn: Option<ActiveTurn>,
    prompt: Option<InFlight>,
    inputs: HashMap<String, PendingInput>,
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    /// MCP servers given at binding, handed to the agent in `session/new`.
    mcp_servers: Vec<crate::event::McpServerSpec>,
    /// Tools the client runs, offered through `client_endpoint`'s MCP server.
    client_tools: Vec<crate::event::ClientToolSpec>,
    client_endpoint: Option<crate::client_tools::Endpoint>,
    /// Standing instructions given at binding, added to the agent's system prompt.
    instructions: Option<String>,
    bound: bool,
    used: bool,
    /// The settings the agent of the current generation offers, kept current from its updates.
    choices: Choices,
}

pub struct ApiAgent {
    cfg: Arc<HarnessConfig>,
    inner: Mutex<Inner>,
    status: watch::Sender<Status>,
    /// Whether a prompt is in flight (`Inner::prompt`), for a next turn that waits for it.
    prompt_busy: watch::Sender<bool>,
    shutdown: CancellationToken,
}

/// Hands a turn's events out in order, numbering them, and closes after `done`/`error`.
pub struct Sink {
    turn_id: String,
    state: tokio::sync::Mutex<(u64, Option<mpsc::Sender<TurnEvent>>)>,
}

impl Sink {
    fn new(turn_id: String, tx: mpsc::Sender<TurnEvent>) -> Self {
        Sink {
            turn_id,
            state: tokio::sync::Mutex::new((0, Some(tx))),
        }
    }

    /// Sends one event; after a terminal event the sink is closed and further events are dropped.
    pub async fn emit(&self, kind: EventType, data: Value) {
        let mut state = self.state.lock().await;
        let (next, tx) = &mut *state;
        let Some(sender) = tx.as_ref() else {
            tracing::debug!(turn_id = %self.turn_id, event = kind.as_str(), "an event after the turn's end was dropped");
            return;
        };
        let event = TurnEvent {
            turn_id: self.turn_id.clone(),
            index: *next,
            kind,
            ts: now_rfc3339(),
            data,
        };
        *next += 1;
        // A reader that went away does not stop the turn; its events are simply not delivered.
        let _ = sender.send(event).await;
        if kind.is_terminal() {
            *tx = None;
        }
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a turn's wait ended.
enum Outcome {
    Response(
        Result<agent_client_protocol::v1::schema::PromptResponse, agent_client_protocol::Error>,
    ),
    GraceExpired,
    Shutdown,
    AgentGone(Status),
}

impl ApiAgent {
    pub fn new(cfg: Arc<HarnessConfig>, shutdown: CancellationToken) -> Arc<Self> {
        let (status, _) = watch::channel(Status {
            phase: Phase::Standby,
            reason: None,
            exit: None,
            stderr_tail: Vec::new(),
            generation: 0,
            agent_info: None,
        });
        let agent = Arc::new(ApiAgent {
            inner: Mutex::new(Inner {
                generation: 0,
                live: None,
                child: None,
                turn: None,
                prompt: None,
                inputs: HashMap::new(),
                env: BTreeMap::new(),
                cwd: cfg.workdir.clone(),
                mcp_servers: Vec::new(),
                client_tools: Vec::new(),
                client_endpoint: None,
                instructions: None,
                bound: false,
                used: false,
                choices: Choices::default(),
            }),
            cfg,
            status,
            prompt_busy: watch::channel(false).0,
            shutdown,
        });
        if agent.cfg.start == StartMode::Boot {
            agent.start();
        }
        agent
    }

    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// The settings a message may choose, as the agent last reported them.
    pub fn agent_options(&self) -> crate::event::AgentOptions {
        crate::config::offered(&lock(&self.inner).choices)
    }

    pub fn health(&self) -> Health {
        let s = self.status.borrow().clone();
        let g = lock(&self.inner);
        Health {
            phase: s.phase,
            kind: "api".into(),
            reason: s.reason,
            exit: s.exit,
            stderr_tail: s.stderr_tail,
            turn_id: g.turn.as_ref().map(|t| t.id.clone()),
            bound: g.bound,
            used: g.used,
            viewers: None,
            agent: s.agent_info,
        }
    }

    /// Starts a new generation of the agent process. The caller has stopped any previous one.
    fn start(self: &Arc<Self>) {
        let (generation, env, cwd) = {
            let mut g = lock(&self.inner);
            g.generation += 1;
            g.live = None;
            (g.generation, g.env.clone(), g.cwd.clone())
        };
        // The old process's unanswered prompt, if any, will never be answered.
        self.end_prompt(None);
        self.status.send_replace(Status {
            phase: Phase::Starting,
            reason: None,
            exit: None,
            stderr_tail: Vec::new(),
            generation,
            agent_info: None,
        });
        tokio::spawn(self.clone().run_generation(generation, env, cwd));
    }

    async fn run_generation(
        self: Arc<Self>,
        generation: u64,
        env: BTreeMap<String, String>,
        cwd: PathBuf,
    ) {
        let argv = &self.cfg.argv;
        let mut child_env = child_env(&env);
        let instructions = lock(&self.inner).instructions.clone();
        if let Some(text) = instructions {
            match write_instructions(&child_env, &cwd, &text) {
                Ok(path) => child_env.push((
                    crate::launch::INSTRUCTIONS_FILE_ENV.into(),
                    path.display().to_string(),
                )),
                Err(e) => {
                    self.fail(
                        generation,
                        format!("writing the session's instructions for the agent failed: {e}"),
                        None,
                        Vec::new(),
                    );
                    return;
                }
            }
        }
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(&cwd)
            .env_clear()
            .envs(child_env)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                self.fail(
                    generation,
                    format!("cannot start the agent {:?}: {e}", argv[0]),
                    None,
                    Vec::new(),
                );
                return;
            }
        };
        let (exited_tx, exited_rx) = watch::channel(false);
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            self.fail(
                generation,
                "the agent's stdio could not be captured".into(),
                None,
                Vec::new(),
            );
            return;
        };
        {
            let mut g = lock(&self.inner);
            if g.generation != generation {
                return; // superseded while spawning; kill_on_drop stops it
            }
            g.child = Some(GroupHandle::new(pid, exited_rx));
        }
        tracing::info!(pid, generation, agent = %argv[0], "agent started");
        let tail = StderrTail::default();
        let stderr_task = tokio::spawn(tail.clone().collect(stderr));
        let conn_task = tokio::spawn(self.clone().connect(generation, stdin, stdout));
        let status = child.wait().await;
        let _ = exited_tx.send(true);
        // Give the last stderr lines a moment to arrive (grandchildren may keep the pipe open).
        let _ = tokio::time::timeout(Duration::from_millis(300), stderr_task).await;
        conn_task.abort();
        let exit = status.ok().map(ExitStatus::from);
        let lines = tail.lines();
        // 127: the agent CLI is not installed; its own line says which and how to install it.
        let reason = match (not_found_reason(exit, &lines), exit) {
            (Some(line), _) => line,
            (None, Some(e)) => format!("the agent exited ({e})"),
            (None, None) => "the agent exited (status unknown)".to_string(),
        };
        self.fail(generation, reason, exit, lines);
    }

    /// Marks `generation` failed, keeping the first reason if it already failed, and drops the
    /// connection. Superseded generations and shutdown are not failures.
    fn fail(&self, generation: u64, reason: String, exit: Option<ExitStatus>, tail: Vec<String>) {
        {
            let mut g = lock(&self.inner);
            if g.generation != generation {
                return;
            }
            g.live = None;
        }
        if self.shutdown.is_cancelled() {
            return;
        }
        self.status.send_if_modified(|s| {
            if s.generation != generation {
                return false;
            }
            if s.phase != Phase::Failed {
                tracing::warn!(generation, %reason, "agent failed");
                s.reason = Some(reason);
            }
            s.phase = Phase::Failed;
            if exit.is_some() {
                s.exit = exit;
            }
            if !tail.is_empty() {
                s.stderr_tail = tail;
            }
            true
        });
    }

    async fn connect(
        self: Arc<Self>,
        generation: u64,
        stdin: tokio::process::ChildStdin,
        stdout: tokio::process::ChildStdout,
    ) {
        let on_update = self.clone();
        let on_permission = self.clone();
        let me = self.clone();
        let boot_timeout = self.cfg.boot_timeout;
        let (cwd, mcp_specs, instructions) = {
            let g = lock(&self.inner);
            let mut specs = g.mcp_servers.clone();
            if let Some(endpoint) = g
                .client_endpoint
                .as_ref()
                .filter(|_| !g.client_tools.is_empty())
            {
                specs.push(client_tools_server(endpoint));
            }
            (g.cwd.clone(), specs, g.instructions.clone())
        };
        let mcp_servers: Vec<McpServer> = mcp_specs.iter().map(acp_mcp_server).collect();
        let result = Client
            .v1()
            .name("sandwarden-harness")
            .on_receive_notification(
                async move |n: SessionNotification, _cx| {
                    on_update.on_update(n).await;
                    Ok(())
                },
                agent_client_protocol::on_receive_notification!(),
            )
            .on_receive_request(
                async move |r: RequestPermissionRequest, responder, _cx| {
                    on_permission.on_permission(r, responder).await;
                    Ok(())
                },
                agent_client_protocol::on_receive_request!(),
            )
            .connect_with(
                ByteStreams::new(stdin.compat_write(), stdout.compat()),
                async move |cx: ConnectionTo<Agent>| {
                    let init = InitializeRequest::new(ProtocolVersion::V1)
                        .client_info(Implementation::new("sandwarden", env!("CARGO_PKG_VERSION")));
                    let init =
                        tokio::time::timeout(boot_timeout, cx.send_request(init).block_task())
                            .await
                            .map_err(|_| {
                                agent_client_protocol::Error::internal_error().data(format!(
                                    "no answer to ACP initialize within {} s",
                                    boot_timeout.as_secs()
                                ))
                            })??;
                    // A cold start binds before the agent said what it takes: checked here.
                    if let Err(p) = refuse_unsupported_mcp(
                        &mcp_specs,
                        &init.agent_capabilities.mcp_capabilities,
                    ) {
                        // The reason, before the agent's exit on the closed connection says less.
                        me.fail(generation, p.detail.clone(), None, Vec::new());
                        return Err(
                            agent_client_protocol::Error::invalid_params().data(p.detail.clone())
                        );
                    }
                    let new_session = with_instructions(
                        NewSessionRequest::new(cwd).mcp_servers(mcp_servers),
                        instructions.as_deref(),
                        &init.agent_capabilities,
                    );
                    let session = tokio::time::timeout(
                        boot_timeout,
                        cx.send_request(new_session).block_task(),
                    )
                    .await
                    .map_err(|_| {
                        agent_client_protocol::Error::internal_error().data(format!(
                            "no answer to ACP session/new within {} s",
                            boot_timeout.as_secs()
                        ))
                    })??;
                    let info = init
                        .agent_info
                        .as_ref()
                        .and_then(|i| serde_json::to_value(i).ok());
                    let choices = Choices {
                        options: session.config_options.unwrap_or_default(),
                        modes: session.modes,
                    };
                    me.ready(
                        generation,
                        Live {
                            cx: cx.clone(),
                            session: session.session_id,
                            caps: init.agent_capabilities.prompt_capabilities.clone(),
                            mcp: init.agent_capabilities.mcp_capabilities.clone(),
                        },
                        choices,
                        info,
                    );
                    cx.incoming_closed().await;
                    Ok(())
                },
            )
            .await;
        if let Err(e) = result {
            let starting = {
                let s = self.status.borrow();
                s.generation == generation && s.phase == Phase::Starting
            };
            if starting {
                // A closed transport is usually the agent's exit: when it exits soon, its exit
                // (status, stderr, "cannot run …") is the reason, reported by `run_generation`.
                let child = lock(&self.inner).child.clone();
                if let Some(child) = &child
                    && child.wait_exit(EXIT_REPORT_WAIT).await
                {
                    return;
                }
                self.fail(
                    generation,
                    format!("the ACP handshake failed: {e}"),
                    None,
                    Vec::new(),
                );
                if let Some(child) = child {
                    child.stop(self.cfg.shutdown_grace).await;
                }
            }
        }
    }

    fn ready(&self, generation: u64, live: Live, choices: Choices, info: Option<Value>) {
        {
            let mut g = lock(&self.inner);
            if g.generation != generation {
                return;
            }
            g.live = Some(live);
            g.choices = choices;
        }
        self.status.send_if_modified(|s| {
            if s.generation != generation || s.phase != Phase::Starting {
                return false;
            }
            s.phase = Phase::Ready;
            s.agent_info = info;
            true
        });
        tracing::info!(generation, "agent ready");
    }

    /// The sink of the prompt in flight, which every update belongs to.
    fn prompt_sink(&self) -> Option<Arc<Sink>> {
        let mut g = lock(&self.inner);
        let p = g.prompt.as_mut()?;
        p.updates += 1;
        Some(p.sink.clone())
    }

    /// The agent answered the prompt of `turn_id` (any prompt when `None`): updates stop going
    /// to it and the next prompt may be sent. Returns how many updates it received.
    fn end_prompt(&self, turn_id: Option<&str>) -> Option<u64> {
        let ended = {
            let mut g = lock(&self.inner);
            if g.prompt
                .as_ref()
                .is_some_and(|p| turn_id.is_none_or(|id| p.turn_id == id))
            {
                g.prompt.take()
            } else {
                None
            }
        };
        if ended.is_some() {
            self.prompt_busy.send_replace(false);
        }
        ended.map(|p| p.updates)
    }

    /// Waits (at most the cancel grace) until no prompt is in flight. A cancelled turn whose
    /// agent has not answered its prompt yet still owns the agent's updates; a prompt sent now
    /// would have its answer mixed with them.
    async fn wait_prompt_answered(&self) -> Result<(), Problem> {
        let mut busy = self.prompt_busy.subscribe();
        let answered = tokio::time::timeout(self.cfg.cancel_grace, busy.wait_for(|b| !*b)).await;
        if matches!(answered, Ok(Ok(_))) {
            return Ok(());
        }
        let turn_id = lock(&self.inner)
            .prompt
            .as_ref()
            .map(|p| p.turn_id.clone())
            .unwrap_or_default();
        Err(Problem::new(
            StatusCode::CONFLICT,
            "turn_in_progress",
            format!(
                "the agent has not yet stopped cancelled turn {turn_id} (its prompt is unanswered after {} s); retry later",
                self.cfg.cancel_grace.as_secs()
            ),
        )
        .with("turn_id", turn_id))
    }

    async fn on_update(&self, n: SessionNotification) {
        match &n.update {
            SessionUpdate::ConfigOptionUpdate(u) => {
                lock(&self.inner).choices.options = u.config_options.clone();
            }
            SessionUpdate::CurrentModeUpdate(u) => {
                if let Some(modes) = &mut lock(&self.inner).choices.modes {
                    modes.current_mode_id = u.current_mode_id.clone();
                }
            }
            _ => {}
        }
        let Some((kind, data)) = map::map_update(&n.update) else {
            return;
        };
        match self.prompt_sink() {
            Some(sink) => sink.emit(kind, data).await,
            None => {
                tracing::debug!(
                    event = kind.as_str(),
                    "an update with no prompt in flight was dropped"
                )
            }
        }
    }

    async fn on_permission(
        &self,
        req: RequestPermissionRequest,
        responder: Responder<RequestPermissionResponse>,
    ) {
        let request_id = format!("perm-{}", uuid::Uuid::new_v4().simple());
        let data = map::input_required(&request_id, &req);
        let sink = {
            let mut g = lock(&self.inner);
            match g.turn.as_ref().map(|t| (t.id.clone(), t.sink.clone())) {
                Some((turn_id, sink)) => {
                    g.inputs.insert(
                        request_id,
                        PendingInput {
                            turn_id,
                            waiter: Waiter::Permission {
                                responder: Box::new(responder),
                                options: req.options,
                            },
                        },
                    );
                    Some(sink)
                }
                None => {
                    // Nobody could answer it: refuse rather than leave the agent waiting.
                    let _ = responder.respond(RequestPermissionResponse::new(
                        RequestPermissionOutcome::Cancelled,
                    ));
                    None
                }
            }
        };
        if let Some(sink) = sink {
            sink.emit(EventType::InputRequired, data).await;
        }
    }

    /// Waits up to `within` for the agent's failure to be recorded.
    async fn wait_failed(&self, within: Duration) {
        let mut rx = self.status.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|s| s.phase == Phase::Failed)).await;
    }

    /// Waits until the agent is ready (starting it if it waits for a bind), or says why not.
    async fn wait_ready(self: &Arc<Self>) -> Result<(), Problem> {
        let mut rx = self.status.subscribe();
        let deadline = tokio::time::Instant::now() + self.cfg.boot_timeout;
        loop {
            let phase = rx.borrow_and_update().clone();
            match phase.phase {
                Phase::Ready => return Ok(()),
                Phase::Standby => self.start(),
                Phase::Failed | Phase::Exited => return Err(failed_problem(&phase)),
                Phase::Starting => {}
            }
            if self.shutdown.is_cancelled() {
                return Err(shutting_down());
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(Problem::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "agent_starting",
                        format!(
                            "the agent is still starting after {} s; retry later",
                            self.cfg.boot_timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }

    /// Starts a turn; returns its id and the receiving end of its events.
    pub async fn start_turn(
        self: &Arc<Self>,
        req: TurnRequest,
    ) -> Result<(String, TurnStream), Problem> {
        req.validate()
            .map_err(|m| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_turn", m))?;
        loop {
            self.wait_ready().await?;
            self.wait_prompt_answered().await?;
            let ended = lock(&self.inner)
                .child
                .as_ref()
                .is_some_and(GroupHandle::has_ended);
            if ended {
                // Dead (reaped, or a zombie about to be), and its failure is being recorded
                // (after its last stderr lines): a prompt now would go to no one. Wait for the
                // failure, then refuse as for it.
                self.wait_failed(AGENT_FAILURE_GRACE).await;
                continue;
            }
            let (tx, rx) = mpsc::channel(TURN_EVENT_BUFFER);
            let turn_id = req
                .turn_id
                .clone()
                .unwrap_or_else(|| format!("turn-{}", uuid::Uuid::new_v4().simple()));
            let cancel = CancellationToken::new();
            let sink = Arc::new(Sink::new(turn_id.clone(), tx));
            let (live, generation) = {
                let mut g = lock(&self.inner);
                if let Some(t) = &g.turn {
                    return Err(Problem::new(
                        StatusCode::CONFLICT,
                        "turn_in_progress",
                        format!(
                            "turn {} is still running; wait for its `done` or cancel it with POST /v1/turns/cancel",
                            t.id
                        ),
                    )
                    .with("turn_id", t.id.clone()));
                }
                let Some(live) = g.live.clone() else {
                    // Restarted or died between the wait and now: wait again.
                    continue;
                };
                if g.prompt.is_some() {
                    // Another turn's prompt went out between the wait and now.
                    continue;
                }
                let blocks = prompt_blocks(&req.parts, &live.caps).map_err(|m| {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "unsupported_part", m)
                })?;
                let changes = config::plan(&g.choices, &req.options).map_err(|m| {
                    Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "unsupported_option", m)
                })?;
                g.used = true;
                g.turn = Some(ActiveTurn {
                    id: turn_id.clone(),
                    sink: sink.clone(),
                    cancel: cancel.clone(),
                });
                g.prompt = Some(InFlight {
                    turn_id: turn_id.clone(),
                    sink: sink.clone(),
                    updates: 0,
                });
                self.prompt_busy.send_replace(true);
                ((live, blocks, changes), g.generation)
            };
            let limit = req
                .timeout_s
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.turn_timeout)
                .min(self.cfg.turn_timeout);
            tracing::info!(turn_id = %turn_id, "turn started");
            tokio::spawn(self.clone().drive_turn(
                turn_id.clone(),
                sink,
                cancel.clone(),
                live,
                generation,
                limit,
            ));
            return Ok((turn_id, TurnStream::new(rx, cancel)));
        }
    }

    async fn drive_turn(
        self: Arc<Self>,
        turn_id: String,
        sink: Arc<Sink>,
        cancel: CancellationToken,
        (live, blocks, changes): (Live, Vec<ContentBlock>, Vec<Change>),
        generation: u64,
        limit: Duration,
    ) {
        let started = Instant::now();
        let mut status_rx = self.status.subscribe();
        if let Err(message) = self.configure(&live, changes).await {
            self.end_prompt(Some(&turn_id));
            self.finish_turn(&turn_id);
            let data = json!({ "code": error_code::AGENT_ERROR, "message": message,
                               "duration_ms": started.elapsed().as_millis() as u64 });
            sink.emit(EventType::Error, data).await;
            return;
        }
        sink.emit(EventType::StepStart, json!({})).await;
        let response = live
            .cx
            .send_request(PromptRequest::new(live.session.clone(), blocks))
            .block_task();
        tokio::pin!(response);
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        let mut cancelling: Option<&'static str> = None;
        let grace = tokio::time::sleep(Duration::MAX);
        tokio::pin!(grace);
        let outcome = loop {
            tokio::select! {
                biased;
                r = &mut response => break Outcome::Response(r),
                () = &mut deadline, if cancelling.is_none() => {
                    cancelling = Some(error_code::TIMEOUT);
                    self.cancel_agent(&live, &turn_id);
                    grace.as_mut().reset(tokio::time::Instant::now() + self.cfg.cancel_grace);
                }
                () = cancel.cancelled(), if cancelling.is_none() => {
                    cancelling = Some(error_code::CANCELLED);
                    self.cancel_agent(&live, &turn_id);
                    grace.as_mut().reset(tokio::time::Instant::now() + self.cfg.cancel_grace);
                }
                () = &mut grace => break Outcome::GraceExpired,
                () = self.shutdown.cancelled() => break Outcome::Shutdown,
                s = status_rx.wait_for(|s| s.generation != generation || s.phase == Phase::Failed) => {
                    match s {
                        Ok(s) => break Outcome::AgentGone(s.clone()),
                        Err(_) => break Outcome::Shutdown,
                    }
                }
            }
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        // Past the grace the client hears `cancelled`, but the prompt stays in flight until the
        // agent answers it: its late updates must not reach the next turn.
        let unanswered = matches!(outcome, Outcome::GraceExpired);
        if !unanswered {
            let updates = self.end_prompt(Some(&turn_id));
            if let (Outcome::Response(Ok(resp)), Some(0)) = (&outcome, updates)
                && cancelling.is_none()
                && map::usage(resp).total_tokens == 0
            {
                // The signature of an agent that ended this prompt on a leftover of the
                // previous (cancelled) one (docs/harness.md, "Cancelling").
                tracing::warn!(turn_id = %turn_id, "the agent answered the prompt at once with nothing: no update and no token used");
            }
        }
        let (kind, data) = match outcome {
            Outcome::Response(Ok(resp)) if cancelling == Some(error_code::TIMEOUT) => {
                let _ = resp;
                timeout_error(limit)
            }
            Outcome::Response(Ok(resp)) => {
                let stop = map::stop_reason(resp.stop_reason);
                sink.emit(EventType::StepFinish, json!({ "stop_reason": stop }))
                    .await;
                (
                    EventType::Done,
                    json!({
                        "stop_reason": stop,
                        "usage": map::usage(&resp),
                        "duration_ms": duration_ms,
                    }),
                )
            }
            Outcome::Response(Err(e)) => {
                // A prompt that failed because the connection closed is the agent dying: wait
                // briefly for the exit so the error says how it ended.
                let connection_lost = live.cx.is_incoming_closed()
                    || agent_client_protocol::is_incoming_transport_closed(&e)
                    || agent_client_protocol::is_connection_terminated(&e);
                let gone = if connection_lost && !self.shutdown.is_cancelled() {
                    tokio::time::timeout(
                        EXIT_REPORT_WAIT,
                        status_rx
                            .wait_for(|s| s.generation != generation || s.phase == Phase::Failed),
                    )
                    .await
                    .ok()
                    .and_then(|s| s.ok().map(|s| s.clone()))
                } else {
                    None
                };
                match gone {
                    Some(s) => agent_gone_error(&s),
                    None if self.shutdown.is_cancelled() => shutdown_error(),
                    None if cancelling == Some(error_code::CANCELLED) => cancelled_error(),
                    None => (
                        EventType::Error,
                        json!({ "code": error_code::AGENT_ERROR, "message": format!("the agent failed the turn: {e}") }),
                    ),
                }
            }
            Outcome::GraceExpired => match cancelling {
                Some(error_code::TIMEOUT) => timeout_error(limit),
                _ => cancelled_error(),
            },
            Outcome::Shutdown => shutdown_error(),
            Outcome::AgentGone(s) => agent_gone_error(&s),
        };
        let mut data = data;
        if kind == EventType::Error {
            data["duration_ms"] = json!(duration_ms);
        }
        // Unlock first, so a client that starts its next turn on `done` is not refused.
        self.finish_turn(&turn_id);
        sink.emit(kind, data).await;
        tracing::info!(turn_id = %turn_id, duration_ms, outcome = kind.as_str(), "turn ended");
        if unanswered {
            // Bounded by the turn's limit: an agent that never answers must not lock the
            // session for good (the next prompt then risks its late updates, said in the log).
            let answered = tokio::select! {
                r = &mut response => r.is_ok(),
                () = tokio::time::sleep(limit) => {
                    tracing::warn!(turn_id = %turn_id, "the agent never answered the cancelled prompt; sending the next one anyway");
                    false
                }
                () = self.shutdown.cancelled() => false,
                _ = status_rx.wait_for(|s| s.generation != generation || s.phase == Phase::Failed) => false,
            };
            tracing::info!(turn_id = %turn_id, answered, "the cancelled prompt is over");
            self.end_prompt(Some(&turn_id));
        }
    }

    /// Applies a turn's settings before its prompt, one request at a time, each within the boot
    /// timeout; the agent's answer replaces what we know of its settings.
    async fn configure(&self, live: &Live, changes: Vec<Change>) -> Result<(), String> {
        for change in changes {
            let limit = self.cfg.boot_timeout;
            let (what, answer) = match change {
                Change::Option { id, value } => {
                    let request =
                        SetSessionConfigOptionRequest::new(live.session.clone(), id.clone(), value);
                    let answer =
                        tokio::time::timeout(limit, live.cx.send_request(request).block_task())
                            .await;
                    if let Ok(Ok(r)) = &answer {
                        lock(&self.inner).choices.options = r.config_options.clone();
                    }
                    (id, answer.map(|r| r.map(drop)))
                }
                Change::Mode(mode) => {
                    let request = SetSessionModeRequest::new(live.session.clone(), mode.clone());
                    let answer =
                        tokio::time::timeout(limit, live.cx.send_request(request).block_task())
                            .await;
                    if let Ok(Ok(_)) = &answer
                        && let Some(modes) = &mut lock(&self.inner).choices.modes
                    {
                        modes.current_mode_id = mode.clone().into();
                    }
                    (format!("mode {mode}"), answer.map(|r| r.map(drop)))
                }
            };
            match answer {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(format!("the agent refused to set {what}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "the agent did not answer setting {what} within {} s",
                        limit.as_secs()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Asks the agent to stop the turn, and withdraws its open permission requests (ACP requires
    /// the client to answer them with `cancelled`).
    fn cancel_agent(&self, live: &Live, turn_id: &str) {
        let _ = live
            .cx
            .send_notification(CancelNotification::new(live.session.clone()));
        self.withdraw_inputs(turn_id);
    }

    /// A cancelled turn's permission requests are answered cancelled at once (ACP asks it); its
    /// client tool calls stay open until the turn ends, so the agent learns of the cancel before
    /// any call fails.
    fn withdraw_inputs(&self, turn_id: &str) {
        let pending = take_inputs(&mut lock(&self.inner), turn_id, true);
        answer_withdrawn(pending);
    }

    fn finish_turn(&self, turn_id: &str) {
        // The turn ends and its open inputs go under one lock: a tool call arriving in between
        // would otherwise be recorded for a turn that no longer runs, and never answered.
        let pending = {
            let mut g = lock(&self.inner);
            if g.turn.as_ref().is_some_and(|t| t.id == turn_id) {
                g.turn = None;
            }
            take_inputs(&mut g, turn_id, false)
        };
        answer_withdrawn(pending);
    }

    /// Cancels the running turn; its stream ends with `done` (stop_reason `cancelled`) or an
    /// `error` with code `cancelled`.
    pub fn cancel_turn(&self) -> Result<String, Problem> {
        let g = lock(&self.inner);
        match &g.turn {
            Some(t) => {
                t.cancel.cancel();
                Ok(t.id.clone())
            }
            None => Err(Problem::new(
                StatusCode::CONFLICT,
                sandwarden_proto::event::NO_TURN_RUNNING,
                "no turn is running, so there is nothing to cancel",
            )),
        }
    }

    /// Answers an `input_required` event. Nothing changes when the answer is refused.
    pub fn answer_input(&self, request_id: &str, answer: &InputAnswer) -> Result<Value, Problem> {
        let not_found = || {
            Problem::new(
                StatusCode::NOT_FOUND,
                "input_not_found",
                format!(
                    "no open input request {request_id:?}: it was answered, withdrawn, or never existed"
                ),
            )
        };
        let mut g = lock(&self.inner);
        let invalid = |m: &str| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_answer", m);
        let option_id = match &g.inputs.get(request_id).ok_or_else(not_found)?.waiter {
            Waiter::Permission { options, .. } => {
                if answer.output.is_some() {
                    return Err(invalid(
                        "this is a permission request: answer with `decision` or `option_id`, \
                         not `output`",
                    ));
                }
                Some(choose_option(options, answer).map_err(|m| invalid(&m))?)
            }
            Waiter::Tool(_) => {
                if answer.output.is_none()
                    || answer.decision.is_some()
                    || answer.option_id.is_some()
                {
                    return Err(invalid(
                        "this is a client tool call: answer with its result, `output` (and \
                         `is_error` when the tool failed)",
                    ));
                }
                None
            }
        };
        let pending = g.inputs.remove(request_id).ok_or_else(not_found)?;
        drop(g);
        match (pending.waiter, option_id) {
            (Waiter::Permission { responder, .. }, Some(option_id)) => {
                responder
                    .respond(RequestPermissionResponse::new(
                        RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(
                            option_id.clone(),
                        )),
                    ))
                    .map_err(|e| {
                        Problem::new(
                            StatusCode::BAD_GATEWAY,
                            "agent_unreachable",
                            format!("the answer could not be delivered to the agent: {e}"),
                        )
                    })?;
                Ok(json!({ "request_id": request_id, "option_id": option_id }))
            }
            (Waiter::Tool(reply), _) => {
                let output = answer.output.clone().unwrap_or_default();
                reply.send((output, answer.is_error)).map_err(|_| {
                    Problem::new(
                        StatusCode::GONE,
                        "input_not_found",
                        "the agent stopped waiting for this tool call",
                    )
                })?;
                Ok(json!({ "request_id": request_id, "is_error": answer.is_error }))
            }
            (Waiter::Permission { .. }, None) => Err(not_found()),
        }
    }

    /// The client tools offered to the agent.
    pub fn client_tools(&self) -> Vec<crate::event::ClientToolSpec> {
        lock(&self.inner).client_tools.clone()
    }

    /// A client tool called by the agent: an `input_required` event for the running turn, then
    /// the client's answer (text, whether it is an error). An error when no turn runs, the tool
    /// is unknown, or the turn ends first.
    pub async fn call_client_tool(
        &self,
        name: &str,
        input: Value,
    ) -> Result<(String, bool), String> {
        if !input.is_object() {
            return Err(format!("the arguments of {name:?} must be a JSON object"));
        }
        let request_id = format!("tool-{}", uuid::Uuid::new_v4().simple());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sink = {
            let mut g = lock(&self.inner);
            if !g.client_tools.iter().any(|t| t.name == name) {
                return Err(format!("no client tool {name:?}"));
            }
            let Some((turn_id, sink)) = g.turn.as_ref().map(|t| (t.id.clone(), t.sink.clone()))
            else {
                return Err("no turn is running: the client cannot answer now".into());
            };
            g.inputs.insert(
                request_id.clone(),
                PendingInput {
                    turn_id,
                    waiter: Waiter::Tool(tx),
                },
            );
            sink
        };
        let data = json!({
            "request_id": request_id,
            "tool": {"id": request_id, "title": name, "kind": "client_tool", "input": input},
            "options": [],
            "client_tool": {"name": name, "input": input},
        });
        // Dropped with the MCP request (the agent gave up on it), the call is withdrawn too.
        let _open = OpenCall {
            inner: &self.inner,
            request_id: &request_id,
        };
        sink.emit(EventType::InputRequired, data).await;
        rx.await
            .map_err(|_| "the turn ended before the client answered this tool call".to_string())
    }

    /// Late binding: checks, writes files, and restarts the agent with the new env and cwd.
    pub async fn bind(self: &Arc<Self>, checked: CheckedBind) -> Result<Health, Problem> {
        let old = {
            let mut g = lock(&self.inner);
            if g.used || g.turn.is_some() {
                return Err(already_used());
            }
            if let Some(live) = &g.live {
                refuse_unsupported_mcp(&checked.mcp_servers, &live.mcp)?;
                if !checked.client_tools.is_empty() && !live.mcp.http {
                    return Err(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_bind",
                        "client tools are offered over an HTTP MCP server, which this agent does \
                         not take (its ACP mcpCapabilities)",
                    ));
                }
            }
            bind::write_files(&checked).map_err(|e| {
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "bind_failed",
                    format!("writing the bound files failed: {e}"),
                )
            })?;
            g.env = checked.env;
            g.cwd = checked.cwd;
            g.mcp_servers = checked.mcp_servers;
            g.client_tools = checked.client_tools;
            g.instructions = checked.instructions;
            g.bound = true;
            // Supersede the running generation so its exit is not reported as a failure.
            g.generation += 1;
            g.live = None;
            g.child.take()
        };
        if let Some(child) = old {
            child.stop(self.cfg.shutdown_grace).await;
        }
        let needs_endpoint = {
            let g = lock(&self.inner);
            !g.client_tools.is_empty() && g.client_endpoint.is_none()
        };
        if needs_endpoint {
            let endpoint = crate::client_tools::start(self.clone())
                .await
                .map_err(|e| {
                    Problem::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "bind_failed",
                        format!("the client tools' MCP server could not listen: {e}"),
                    )
                })?;
            lock(&self.inner).client_endpoint = Some(endpoint);
        }
        self.start();
        tracing::info!(
            vars = lock(&self.inner).env.len(),
            "bound per-session values"
        );
        Ok(self.health())
    }

    /// Stops the agent's process group (SIGTERM, then SIGKILL after the grace period).
    pub async fn stop(&self) {
        let child = lock(&self.inner).child.clone();
        if let Some(child) = child {
            child.stop(self.cfg.shutdown_grace).await;
        }
    }
}

pub fn already_used() -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "already_used",
        "this sandbox has already run a turn or had a terminal attached; bind only before first use",
    )
}

pub fn shutting_down() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the harness server is shutting down",
    )
}

fn failed_problem(s: &Status) -> Problem {
    let mut p = Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        crate::event::AGENT_FAILED,
        s.reason
            .clone()
            .unwrap_or_else(|| "the agent is not running".into()),
    );
    if let Some(exit) = s.exit {
        p = p.with("exit", serde_json::to_value(exit).unwrap_or(Value::Null));
    }
    if !s.stderr_tail.is_empty() {
        p = p.with("stderr_tail", s.stderr_tail.clone());
    }
    p
}

fn agent_gone_error(s: &Status) -> (EventType, Value) {
    (
        EventType::Error,
        json!({
            "code": error_code::AGENT_EXITED,
            "message": s.reason.clone().unwrap_or_else(|| "the agent was restarted".into()),
            "exit": s.exit,
            "stderr_tail": s.stderr_tail,
        }),
    )
}

fn shutdown_error() -> (EventType, Value) {
    (
        EventType::Error,
        json!({ "code": error_code::SHUTDOWN, "message": "the harness server is shutting down" }),
    )
}

fn cancelled_error() -> (EventType, Value) {
    (
        EventType::Error,
        json!({ "code": error_code::CANCELLED, "message": "the turn was cancelled" }),
    )
}

fn timeout_error(limit: Duration) -> (EventType, Value) {
    (
        EventType::Error,
        json!({
            "code": error_code::TIMEOUT,
            "message": format!("the turn ran past its {} s timeout and was cancelled", limit.as_secs()),
        }),
    )
}

/// Picks the agent's option that matches an answer. Pure; the message says what was offered.
pub fn choose_option(options: &[PermissionOption], answer: &InputAnswer) -> Result<String, String> {
    let offered = || {
        options
            .iter()
            .map(|o| format!("{} ({})", o.option_id, map::wire_name(&o.kind)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (answer.decision, &answer.option_id) {
        (Some(_), Some(_)) | (None, None) => Err(
            "send exactly one of `decision` (approve_once, approve_session, deny) or `option_id`"
                .into(),
        ),
        (None, Some(id)) => options
            .iter()
            .find(|o| o.option_id.to_string() == *id)
            .map(|o| o.option_id.to_string())
            .ok_or_else(|| format!("option {id:?} was not offered; offered: {}", offered())),
        (Some(decision), None) => {
            let kinds: &[PermissionOptionKind] = match decision {
                Decision::ApproveOnce => &[
                    PermissionOptionKind::AllowOnce,
                    PermissionOptionKind::AllowAlways,
                ],
                Decision::ApproveSession => &[PermissionOptionKind::AllowAlways],
                Decision::Deny => &[
                    PermissionOptionKind::RejectOnce,
                    PermissionOptionKind::RejectAlways,
                ],
            };
            kinds
                .iter()
                .find_map(|k| options.iter().find(|o| o.kind == *k))
                .map(|o| o.option_id.to_string())
                .ok_or_else(|| {
                    format!(
                        "the agent offered no option for {decision:?}; offered: {}",
                        offered()
                    )
                })
        }
    }
}

/// Converts message parts to ACP content blocks, within what the agent said it accepts.
pub fn prompt_blocks(
    parts: &[Part],
    caps: &PromptCapabilities,
) -> Result<Vec<ContentBlock>, String> {
    let mut blocks = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let block = match part {
            Part::Text { text } => ContentBlock::Text(TextContent::new(text.clone())),
            Part::Image {
                data: Some(data),
                mime_type,
                ..
            } => {
                if !caps.image {
                    return Err(format!("parts[{i}]: this agent does not accept images"));
                }
                ContentBlock::Image(ImageContent::new(
                    data.clone(),
                    mime_type.clone().unwrap_or_else(|| "image/png".into()),
                ))
            }
            Part::Image {
                url: Some(url),
                mime_type,
                ..
            } => {
                if !caps.image {
                    return Err(format!("parts[{i}]: this agent does not accept images"));
                }
                ContentBlock::ResourceLink(
                    ResourceLink::new("image", url.clone()).mime_type(mime_type.clone()),
                )
            }
            Part::File {
                url: Some(url),
                name,
                mime_type,
                ..
            } => ContentBlock::ResourceLink(
                ResourceLink::new(name.clone().unwrap_or_else(|| "file".into()), url.clone())
                    .mime_type(mime_type.clone()),
            ),
            Part::File {
                text: Some(text),
                name,
                mime_type,
                ..
            } => {
                let name = name.clone().unwrap_or_else(|| "attachment.txt".into());
                if caps.embedded_context {
                    ContentBlock::Resource(EmbeddedResource::new(
                        EmbeddedResourceResource::TextResourceContents(
                            TextResourceContents::new(text.clone(), format!("file:///{name}"))
                                .mime_type(mime_type.clone()),
                        ),
                    ))
                } else {
                    ContentBlock::Text(TextContent::new(format!("File {name}:\n{text}")))
                }
            }
            Part::File {
                data: Some(data),
                name,
                mime_type,
                ..
            } => {
                if !caps.embedded_context {
                    return Err(format!(
                        "parts[{i}]: this agent does not accept binary files; send the file as `text` or by `url`"
                    ));
                }
                let name = name.clone().unwrap_or_else(|| "attachment.bin".into());
                ContentBlock::Resource(EmbeddedResource::new(
                    EmbeddedResourceResource::BlobResourceContents(
                        BlobResourceContents::new(data.clone(), format!("file:///{name}"))
                            .mime_type(mime_type.clone()),
                    ),
                ))
            }
            _ => return Err(format!("parts[{i}] has no content")),
        };
        blocks.push(block);
    }
    Ok(blocks)
}

/// A turn's events as a stream. Dropped before the end (the client went away), it cancels the
/// turn so the agent does not keep working for nobody.
pub struct TurnStream {
    rx: mpsc::Receiver<TurnEvent>,
    cancel: CancellationToken,
    ended: bool,
}

impl TurnStream {
    fn new(rx: mpsc::Receiver<TurnEvent>, cancel: CancellationToken) -> Self {
        TurnStream {
            rx,
            cancel,
            ended: false,
        }
    }
}

impl futures::Stream for TurnStream {
    type Item = TurnEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<TurnEvent>> {
        let polled = self.rx.poll_recv(cx);
        if let std::task::Poll::Ready(Some(event)) = &polled
            && event.kind.is_terminal()
        {
            self.ended = true;
        }
        if let std::task::Poll::Ready(None) = &polled {
            self.ended = true;
        }
        polled
    }
}

impl Drop for TurnStream {
    fn drop(&mut self) {
        if !self.ended {
            self.cancel.cancel();
        }
    }
}

/// The MCP server of the session's client tools, as the agent is given it.
fn client_tools_server(endpoint: &crate::client_tools::Endpoint) -> crate::event::McpServerSpec {
    crate::event::McpServerSpec {
        name: crate::event::CLIENT_TOOLS_SERVER.into(),
        kind: Some("http".into()),
        command: None,
        args: Vec::new(),
        env: Default::default(),
        url: Some(endpoint.url.clone()),
        headers: [(
            "Authorization".to_string(),
            format!("Bearer {}", endpoint.token),
        )]
        .into(),
    }
}

/// Removes a turn's open inputs (only its permission requests, with `permissions_only`).
fn take_inputs(g: &mut Inner, turn_id: &str, permissions_only: bool) -> Vec<PendingInput> {
    let ids: Vec<String> = g
        .inputs
        .iter()
        .filter(|(_, p)| {
            p.turn_id == turn_id && !(permissions_only && matches!(p.waiter, Waiter::Tool(_)))
        })
        .map(|(id, _)| id.clone())
        .collect();
    ids.iter().filter_map(|id| g.inputs.remove(id)).collect()
}

/// Tells the waiters of withdrawn inputs: a permission request is cancelled; a tool call's
/// sender is dropped, so its MCP request answers that the turn ended.
fn answer_withdrawn(pending: Vec<PendingInput>) {
    for p in pending {
        if let Waiter::Permission { responder, .. } = p.waiter {
            let _ = responder.respond(RequestPermissionResponse::new(
                RequestPermissionOutcome::Cancelled,
            ));
        }
    }
}

/// A client tool call in flight: its open input goes when the call is over or abandoned.
struct OpenCall<'a> {
    inner: &'a Mutex<Inner>,
    request_id: &'a str,
}

impl Drop for OpenCall<'_> {
    fn drop(&mut self) {
        lock(self.inner).inputs.remove(self.request_id);
    }
}

/// A session's MCP server as ACP carries it.
fn acp_mcp_server(spec: &crate::event::McpServerSpec) -> McpServer {
    let headers = || {
        spec.headers
            .iter()
            .map(|(k, v)| HttpHeader::new(k, v))
            .collect::<Vec<_>>()
    };
    let url = spec.url.clone().unwrap_or_default();
    match spec.kind.as_deref() {
        Some("http") => McpServer::Http(McpServerHttp::new(&spec.name, url).headers(headers())),
        Some("sse") => McpServer::Sse(McpServerSse::new(&spec.name, url).headers(headers())),
        _ => McpServer::Stdio(
            McpServerStdio::new(&spec.name, spec.command.clone().unwrap_or_default())
                .args(spec.args.clone())
                .env(
                    spec.env
                        .iter()
                        .map(|(k, v)| EnvVariable::new(k, v))
                        .collect(),
                ),
        ),
    }
}

/// Adds the session's instructions to `session/new`: as ACP's `systemPrompt` (mode `append`)
/// when the agent offers it, else as `_meta.systemPrompt.append`, which claude-agent-acp reads
/// (agents that know neither ignore `_meta`; `sandwarden launch` gives opencode and codex the
/// same text through their own configuration).
fn with_instructions(
    request: NewSessionRequest,
    instructions: Option<&str>,
    caps: &agent_client_protocol::v1::schema::AgentCapabilities,
) -> NewSessionRequest {
    let Some(text) = instructions else {
        return request;
    };
    if caps.session_capabilities.system_prompt.is_some() {
        return request.system_prompt(agent_client_protocol::v1::schema::SystemPrompt::new(vec![
            ContentBlock::Text(TextContent::new(text)),
        ]));
    }
    let mut meta = agent_client_protocol::v1::schema::Meta::new();
    meta.insert("systemPrompt".into(), json!({ "append": text }));
    request.meta(meta)
}

/// Writes the instructions where the agent's launcher finds them: `$HOME/.config/sandwarden/
/// instructions.md` in the agent's environment (its working directory's `.sandwarden/` when it
/// has no HOME), readable by the agent's user only.
fn write_instructions(
    env: &[(String, String)],
    cwd: &std::path::Path,
    text: &str,
) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = env
        .iter()
        .find(|(k, v)| k == "HOME" && !v.is_empty())
        .map_or_else(
            || cwd.join(".sandwarden"),
            |(_, home)| PathBuf::from(home).join(".config/sandwarden"),
        );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("instructions.md");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(text.as_bytes())?;
    Ok(path)
}

/// Refuses MCP servers over a transport the agent did not say it takes (`initialize`'s
/// `mcpCapabilities`; every agent takes stdio).
fn refuse_unsupported_mcp(
    servers: &[crate::event::McpServerSpec],
    caps: &McpCapabilities,
) -> Result<(), Problem> {
    for server in servers {
        let (kind, taken) = match server.kind.as_deref() {
            Some("http") => ("http", caps.http),
            Some("sse") => ("sse", caps.sse),
            _ => ("stdio", true),
        };
        if !taken {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_bind",
                format!(
                    "mcp_servers {:?}: this agent does not take {kind} MCP servers (its ACP \
                     mcpCapabilities); give it a stdio server instead",
                    server.name
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Vec<PermissionOption> {
        vec![
            PermissionOption::new("yes", "Allow", PermissionOptionKind::AllowOnce),
            PermissionOption::new("always", "Always", PermissionOptionKind::AllowAlways),
            PermissionOption::new("no", "Deny", PermissionOptionKind::RejectOnce),
        ]
    }

    fn answer(decision: Option<Decision>, option_id: Option<&str>) -> InputAnswer {
        InputAnswer {
            decision,
            option_id: option_id.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn decisions_pick_options_by_kind() {
        let o = options();
        assert_eq!(
            choose_option(&o, &answer(Some(Decision::ApproveOnce), None)),
            Ok("yes".into())
        );
        assert_eq!(
            choose_option(&o, &answer(Some(Decision::ApproveSession), None)),
            Ok("always".into())
        );
        assert_eq!(
            choose_option(&o, &answer(Some(Decision::Deny), None)),
            Ok("no".into())
        );
        assert_eq!(
            choose_option(&o, &answer(None, Some("no"))),
            Ok("no".into())
        );
    }

    #[test]
    fn bad_answers_say_what_was_offered() {
        let o = options();
        let e = choose_option(&o, &answer(None, Some("maybe"))).expect_err("should be refused");
        assert!(e.contains("yes (allow_once)"), "{e}");
        assert!(choose_option(&o, &answer(None, None)).is_err());
        let only_once = vec![PermissionOption::new(
            "y",
            "Allow",
            PermissionOptionKind::AllowOnce,
        )];
        assert!(choose_option(&only_once, &answer(Some(Decision::ApproveSession), None)).is_err());
    }

    #[test]
    fn parts_respect_agent_capabilities() {
        let image = vec![Part::Image {
            data: Some("aGk=".into()),
            url: None,
            mime_type: Some("image/png".into()),
        }];
        assert!(prompt_blocks(&image, &PromptCapabilities::new()).is_err());
        assert!(prompt_blocks(&image, &PromptCapabilities::new().image(true)).is_ok());
        let file = vec![Part::File {
            name: Some("a.txt".into()),
            text: Some("body".into()),
            data: None,
            url: None,
            mime_type: None,
        }];
        let blocks = prompt_blocks(&file, &PromptCapabilities::new()).expect("text fallback");
        assert!(matches!(&blocks[0], ContentBlock::Text(t) if t.text.contains("body")));
    }
}
