//! Sessions: the state machine, claims of warm or cold sandboxes, dead-marking, supervision and
//! reaping. Turns are in `turn`, event numbering in `hub`, webhooks in `webhook`.
//!
//! It talks to sandboxes through the runtime trait and the harness client; it must not know HTTP
//! routing (it returns `Problem`s, which the API layer renders).

pub mod exit;
pub mod hub;
pub mod message;
pub mod quota;
pub mod turn;
pub mod view;
pub mod webhook;

use crate::metrics::Metrics;
use crate::pool::PoolIndex;
use crate::runtime::{Runtime, Sandbox};
use crate::status::SessionStatus;
use crate::store::{self, SandboxRow, Session, SessionFilter, Store};
use crate::template::Template;
use crate::tokens::Tokens;
use axum::http::StatusCode;
use backon::{ExponentialBuilder, Retryable};
use sandwarden_proto::event::{BindFile, BindRequest, Phase, validate_id};
use sandwarden_proto::harness_client::{ClientError, HarnessClient};
use sandwarden_proto::problem::Problem;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// How long a cold sandbox may take to become ready.
const COLD_START_TIMEOUT: Duration = Duration::from_secs(120);
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);
/// On the changes channel: every session may have changed (notices from other replicas were
/// missed), so every waiter re-reads.
const ANY_SESSION: &str = "*";

/// How every session id the server makes begins; ids a client picks may not.
pub const GENERATED_ID_PREFIX: &str = "ses_";

/// The session id that `given` (from a URL or a create request) means for `tenant`. An id the
/// server made stands for itself; any other is a name the tenant picked, and its id is derived
/// from the tenant and the name. So each tenant has its own namespace of names, and a name
/// another tenant took is neither refused nor found (no way to learn it exists).
pub fn scoped_id(tenant: &str, given: &str) -> String {
    if given.starts_with(GENERATED_ID_PREFIX) {
        return given.to_string();
    }
    let digest = Sha256::new()
        .chain_update(tenant.as_bytes())
        .chain_update([0])
        .chain_update(given.as_bytes())
        .finalize();
    format!("{GENERATED_ID_PREFIX}{}", hex::encode(&digest[..16]))
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub harness: String,
    pub id: Option<String>,
    pub title: Option<String>,
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub files: Vec<BindFile>,
    pub cwd: Option<String>,
    pub idle_timeout_s: Option<u64>,
}

impl CreateRequest {
    /// A digest of what identifies the request for `Idempotency-Key`, without secret values.
    fn fingerprint(&self) -> String {
        let shape = serde_json::json!({
            "harness": self.harness, "id": self.id, "title": self.title, "metadata": self.metadata,
            "env": self.env.keys().collect::<Vec<_>>(),
            "files": self.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
            "cwd": self.cwd, "idle_timeout_s": self.idle_timeout_s,
        });
        hex::encode(Sha256::digest(shape.to_string().as_bytes()))
    }

    fn bind(&self) -> BindRequest {
        BindRequest {
            env: self.env.clone(),
            files: self.files.clone(),
            cwd: self.cwd.clone(),
        }
    }
}

pub struct Config {
    /// Base URL clients reach this server at (for `tty_url`).
    pub public_url: String,
    /// Let webhooks target loopback, private and link-local addresses.
    pub allow_private_webhooks: bool,
    /// Lifetime of the token in `tty_url`.
    pub tty_token_ttl: Duration,
    /// Origins allowed to open terminal WebSockets from a browser (empty: same origin only).
    pub allowed_origins: Vec<String>,
    /// How long a replica's claim on a webhook delivery lasts without renewal; another replica
    /// takes the delivery over after that (the claimer renews while it delivers).
    pub webhook_lease: Duration,
    /// How long a replica's heartbeat in the store lasts; a running turn of a replica silent for
    /// longer is ended by another.
    pub replica_lease: Duration,
    /// How long a client may leave data unread before it is disconnected (a terminal viewer
    /// that stops reading), as for a request's headers (`--client-timeout`).
    pub client_timeout: Duration,
    /// Every tenant's quotas where its key sets none.
    pub default_limits: quota::Limits,
    /// Live sessions of all tenants together.
    pub max_live_sessions: Option<u64>,
    /// MiB of history and event pages being answered at once, all tenants together
    /// (`--answer-memory-mib`; see `quota::Answers`).
    pub answer_memory_mib: Option<u64>,
}

/// An API key seen valid (see `Orchestrator::cached_key`).
#[derive(Clone)]
pub struct CachedKey {
    pub id: String,
    pub tenant: String,
    pub admin: bool,
    pub limits: quota::Limits,
    touched: Instant,
}

/// How often a key in use has its `last_used_at` written.
const KEY_TOUCH_EVERY: Duration = Duration::from_secs(60);

struct RunningTurn {
    turn_id: String,
    tenant: String,
    /// The harness is done; the turn's end is being recorded (waiting for the store).
    ending: bool,
}

/// Whether a session's turn lock is free, held by a running turn, or held by a turn whose end
/// is being recorded.
pub(crate) enum TurnLock {
    Taken,
    Running(String),
    Ending(String),
    /// The tenant already runs this many turns (its `concurrent_turns` limit).
    Quota(u64),
}

pub struct Orchestrator {
    pub store: Store,
    pub hub: hub::Hub,
    pub runtime: Arc<dyn Runtime>,
    pub tokens: Tokens,
    /// The templates by name (replaced whole when the runtime reports a change).
    templates: std::sync::RwLock<Arc<BTreeMap<String, Template>>>,
    pub metrics: Metrics,
    pub config: Config,
    pool: Mutex<PoolIndex<Sandbox>>,
    pool_wake: Notify,
    clients: Mutex<HashMap<String, HarnessClient>>,
    http: reqwest::Client,
    /// Open event streams and terminals per tenant (their quota).
    pub streams: quota::Streams,
    /// Memory for history and event pages being answered, per tenant and in all.
    answers: quota::Answers,
    /// API keys seen valid, by hash; emptied when a key is revoked (here or, through the
    /// store's notices, on another replica) and when notices may have been missed.
    keys: Mutex<HashMap<String, CachedKey>>,
    /// Templates whose warm start failed since the pool loop last looked (for backoff).
    pool_failures: Mutex<Vec<String>>,
    turns: Mutex<HashMap<String, RunningTurn>>,
    viewers: Mutex<HashMap<String, usize>>,
    /// Webhook deliveries this replica is delivering now.
    delivering: Arc<Mutex<std::collections::HashSet<String>>>,
    changed: broadcast::Sender<String>,
    pub shutdown: CancellationToken,
    synced: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A store failure as the API reports it: `503` (with `Retry-After`) while the database cannot
/// be reached, `500` for anything else. The detail never carries the cause (it may name hosts or
/// values); the log does.
pub fn store_error(e: store::StoreError) -> Problem {
    tracing::error!(error = %e, source = ?std::error::Error::source(&e), "store failure");
    if let Some(why) = e.unavailable() {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            why.detail(),
        )
    } else {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            "the session store failed this request; the server log has the cause",
        )
    }
}

/// Why a store failure stopped a sandbox, in words for the session's `failure_reason`: the
/// kind of failure, not the database's own message (the server log has that).
fn store_reason(e: &store::StoreError) -> String {
    tracing::error!(error = %e, source = ?std::error::Error::source(e), "store failure");
    if let Some(why) = e.unavailable() {
        format!("recording the new sandbox failed: {}", why.detail())
    } else {
        "the session store refused the sandbox's record (the server log has the cause)".into()
    }
}

pub fn not_found(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "session_not_found",
        format!("no session {id:?}; list yours with GET /v1/sessions"),
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Orchestrator {
    pub fn new(
        store: Store,
        runtime: Arc<dyn Runtime>,
        tokens: Tokens,
        templates: BTreeMap<String, Template>,
        config: Config,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Orchestrator {
            answers: quota::Answers::new(config.answer_memory_mib, config.client_timeout),
            hub: hub::Hub::new(store.clone()),
            store,
            runtime,
            tokens,
            templates: std::sync::RwLock::new(Arc::new(templates)),
            metrics: Metrics::default(),
            config,
            pool: Mutex::new(PoolIndex::default()),
            pool_wake: Notify::new(),
            clients: Mutex::new(HashMap::new()),
            http: sandwarden_proto::harness_client::http_client(),
            keys: Mutex::new(HashMap::new()),
            streams: quota::Streams::default(),
            pool_failures: Mutex::new(Vec::new()),
            turns: Mutex::new(HashMap::new()),
            viewers: Mutex::new(HashMap::new()),
            delivering: Arc::default(),
            changed: broadcast::channel(1024).0,
            shutdown,
            synced: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The owner recorded for a new sandbox: every replica's when the runtime is shared, else
    /// this replica's (the store fills it in).
    fn sandbox_owner(&self) -> Option<String> {
        self.runtime
            .shared()
            .then(|| store::SHARED_OWNER.to_string())
    }

    /// The templates sessions can name now.
    pub fn templates(&self) -> Arc<BTreeMap<String, Template>> {
        self.templates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the templates (Kubernetes: the namespace's SandboxTemplates changed).
    pub fn set_templates(&self, templates: BTreeMap<String, Template>) {
        *self.templates.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(templates);
    }

    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A key seen valid, by hash. Its `last_used_at` is brought up to date about once a minute.
    pub fn cached_key(&self, hash: &str) -> Option<CachedKey> {
        let mut keys = lock(&self.keys);
        let key = keys.get_mut(hash)?;
        if key.touched.elapsed() > KEY_TOUCH_EVERY {
            key.touched = Instant::now();
            let (store, id) = (self.store.clone(), key.id.clone());
            tokio::spawn(async move { store.touch_key(&id).await });
        }
        Some(key.clone())
    }

    /// Remembers a key just found valid in the store (and records its use).
    pub fn cache_key(&self, hash: String, key: &store::ApiKey) {
        let (store, id) = (self.store.clone(), key.id.clone());
        tokio::spawn(async move { store.touch_key(&id).await });
        lock(&self.keys).insert(
            hash,
            CachedKey {
                id: key.id.clone(),
                tenant: key.tenant.clone(),
                admin: key.admin,
                limits: key.limits.clone(),
                touched: Instant::now(),
            },
        );
    }

    /// Forgets every cached key: one was revoked.
    pub fn forget_keys(&self) {
        lock(&self.keys).clear();
    }

    /// The client of a sandbox's harness; one per sandbox so connections are reused.
    pub fn client_for(&self, sandbox_id: &str, endpoint: &str) -> HarnessClient {
        let mut clients = lock(&self.clients);
        if let Some(c) = clients.get(sandbox_id)
            && c.endpoint() == endpoint
        {
            return c.clone();
        }
        let c = HarnessClient::with_http(
            self.http.clone(),
            endpoint,
            self.tokens.for_sandbox(sandbox_id),
        );
        clients.insert(sandbox_id.to_string(), c.clone());
        c
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

    fn session_client(&self, s: &Session) -> Option<HarnessClient> {
        match (&s.sandbox_id, &s.endpoint) {
            (Some(id), Some(ep)) => Some(self.client_for(id, ep)),
            _ => None,
        }
    }

    /// Wakes long-polls of a session, here and (through the store) on other replicas.
    fn notify(&self, session_id: &str) {
        self.notify_here(session_id);
        self.store.announce(session_id);
    }

    /// Wakes long-polls of a session on this replica only: after a store write that announces
    /// itself to other replicas (a turn's start and end).
    fn notify_here(&self, session_id: &str) {
        let _ = self.changed.send(session_id.to_string());
    }

    /// Relays what other replicas did (shared store only): their events to this replica's
    /// subscribers, their session changes to its long-polls.
    async fn follow_replicas(self: Arc<Self>) {
        let Some(mut notices) = self.store.notices() else {
            return;
        };
        loop {
            let notice = tokio::select! {
                n = notices.recv() => n,
                () = self.shutdown.cancelled() => return,
            };
            match notice {
                Ok(store::Notice::Events {
                    session_id,
                    first,
                    last,
                }) => self.hub.feed(&session_id, first, last).await,
                Ok(store::Notice::Changed(what)) if what == store::KEYS_CHANGED => {
                    self.forget_keys();
                }
                Ok(store::Notice::Changed(session_id)) => {
                    let _ = self.changed.send(session_id);
                }
                Ok(store::Notice::Lost) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    self.forget_keys();
                    self.hub.feed_all().await;
                    let _ = self.changed.send(ANY_SESSION.to_string());
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// The `tty_url` of a TUI session: a short-lived token so a browser can attach without the key.
    pub fn tty_url(&self, s: &Session) -> Option<String> {
        if s.kind != "tui" || !s.status.is_live() {
            return None;
        }
        let exp = unix_now() + self.config.tty_token_ttl.as_secs();
        let mac = self.tokens.derive("tty", &format!("{}.{exp}", s.id));
        let ws = self.config.public_url.replacen("http", "ws", 1);
        Some(format!("{ws}/v1/sessions/{}/tty?token={exp}.{mac}", s.id))
    }

    /// Checks a `tty_url` token for `session_id`.
    pub fn check_tty_token(&self, session_id: &str, token: &str) -> bool {
        let Some((exp, mac)) = token.split_once('.') else {
            return false;
        };
        let Ok(exp_n) = exp.parse::<u64>() else {
            return false;
        };
        let want = self.tokens.derive("tty", &format!("{session_id}.{exp}"));
        exp_n >= unix_now()
            && sandwarden_proto::event::constant_time_eq(want.as_bytes(), mac.as_bytes())
    }

    // ---- sessions

    pub async fn create(
        self: &Arc<Self>,
        tenant: &str,
        req: CreateRequest,
        idempotency_key: Option<String>,
        limits: &quota::Limits,
    ) -> Result<(Session, bool), Problem> {
        let started = Instant::now();
        let invalid =
            |m: String| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_session", m);
        let templates = self.templates();
        let Some(template) = templates.get(&req.harness).cloned() else {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_harness",
                format!(
                    "no harness {:?}; available: {}",
                    req.harness,
                    templates.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        if let Some(name) = &req.id {
            validate_id("id", name).map_err(invalid)?;
            if name.starts_with(GENERATED_ID_PREFIX) {
                return Err(invalid(format!(
                    "ids starting with {GENERATED_ID_PREFIX:?} are the server's; pick another \
                     id or leave `id` out"
                )));
            }
        }
        if let Some(key) = &idempotency_key {
            validate_id("Idempotency-Key", key).map_err(invalid)?;
        }
        if req.title.as_ref().is_some_and(|t| t.len() > 500) {
            return Err(invalid("`title` is at most 500 characters".into()));
        }
        match &req.metadata {
            Some(m) if !m.is_object() => {
                return Err(invalid("`metadata` must be a JSON object".into()));
            }
            Some(m) if m.to_string().len() > 16 * 1024 => {
                return Err(invalid("`metadata` is at most 16 KiB of JSON".into()));
            }
            _ => {}
        }
        if let Some(t) = req.idle_timeout_s
            && !(1..=crate::template::MAX_IDLE_TIMEOUT_S).contains(&t)
        {
            return Err(invalid(format!(
                "`idle_timeout_s` is between 1 and {} (30 days); {t} is outside",
                crate::template::MAX_IDLE_TIMEOUT_S
            )));
        }
        let bind = req.bind();
        bind.validate().map_err(invalid)?;

        let fingerprint = req.fingerprint();
        if let Some(key) = &idempotency_key
            && let Some(existing) = self
                .store
                .find_idempotent(tenant, key)
                .await
                .map_err(store_error)?
        {
            if existing.request_hash.as_deref() == Some(fingerprint.as_str()) {
                return Ok((existing, false));
            }
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request; use a new key",
            ));
        }

        self.check_live_sessions(tenant, limits.live_sessions)
            .await?;
        if let Some(max) = limits.sandbox_memory_mib {
            self.check_sandbox_memory(tenant, &template, max, &templates)
                .await?;
        }
        let now = store::now();
        let mut session = Session {
            id: match &req.id {
                Some(name) => scoped_id(tenant, name),
                None => format!("{GENERATED_ID_PREFIX}{}", uuid::Uuid::now_v7().simple()),
            },
            name: req.id.clone(),
            tenant: tenant.to_string(),
            harness: template.name.clone(),
            kind: template.kind.to_string(),
            status: SessionStatus::Creating,
            phase: Some("creating".into()),
            failure_reason: None,
            title: req.title.clone(),
            metadata: req
                .metadata
                .clone()
                .unwrap_or_else(|| serde_json::json!({})),
            sandbox_id: None,
            endpoint: None,
            idle_timeout_s: req.idle_timeout_s.unwrap_or(template.idle_timeout_s) as i64,
            idempotency_key: idempotency_key.clone(),
            request_hash: Some(fingerprint),
            created_at: now.clone(),
            updated_at: now.clone(),
            last_active_at: now,
        };
        match self.store.insert_session(&session).await {
            Ok(()) => {}
            Err(store::StoreError::Conflict) => {
                // Either the id is taken or a concurrent request with the same key won the race.
                if let Some(key) = &idempotency_key
                    && let Ok(Some(existing)) = self.store.find_idempotent(tenant, key).await
                {
                    return Ok((existing, false));
                }
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "session_exists",
                    format!(
                        "you already have a session with id {:?}; pick another id",
                        session.name.as_deref().unwrap_or(&session.id)
                    ),
                ));
            }
            Err(e) => return Err(store_error(e)),
        }

        // Warm claim: a ready sandbox of the template, bound to this session's values.
        loop {
            let claimed = lock(&self.pool).claim(&template.name);
            let Some(sandbox) = claimed else { break };
            self.pool_wake.notify_one();
            match self.attach_sandbox(&session, &sandbox, &bind).await {
                Ok(()) => return self.claimed_warm(session, started).await,
                Err(AttachError::Refused(p)) => {
                    // The bind was refused and changed nothing: the sandbox stays warm, and the
                    // refused request leaves no session behind.
                    lock(&self.pool).adopt(&template.name, sandbox);
                    let _ = self.store.forget_creating(&session.id).await;
                    return Err(p);
                }
                Err(AttachError::Lost(reason)) => {
                    tracing::warn!(sandbox = %sandbox.id, %reason, "warm sandbox unusable; trying another");
                    self.discard(sandbox).await;
                }
            }
        }

        // A sandbox the runtime keeps warm itself (Kubernetes: a SandboxWarmPool member).
        if let Some(sandbox) = self.runtime.claim(&template, &session.id).await {
            let row = SandboxRow {
                id: sandbox.id.clone(),
                template: template.name.clone(),
                endpoint: sandbox.endpoint.clone(),
                pid: None,
                session_id: None,
                owner: self.sandbox_owner(),
            };
            let attached = match self.store.insert_sandbox(&row).await {
                Ok(()) => self.attach_sandbox(&session, &sandbox, &bind).await,
                Err(e) => Err(AttachError::Lost(e.to_string())),
            };
            match attached {
                Ok(()) => return self.claimed_warm(session, started).await,
                Err(AttachError::Refused(p)) => {
                    // Claimed for this request only: it goes (its pool makes another).
                    self.discard(sandbox).await;
                    let _ = self.store.forget_creating(&session.id).await;
                    return Err(p);
                }
                Err(AttachError::Lost(reason)) => {
                    tracing::warn!(sandbox = %sandbox.id, %reason, "claimed sandbox unusable; starting one");
                    self.discard(sandbox).await;
                }
            }
        }

        // Cold start in the background; the session is `creating` until it is ready.
        self.metrics.claim("cold");
        let me = self.clone();
        let cold = session.clone();
        tokio::spawn(async move {
            me.cold_start(cold, template, bind, started).await;
        });
        session.phase = Some("starting_sandbox".into());
        Ok((session, true))
    }

    /// The answer to a create that a warm sandbox served: the session as stored now (`ready`).
    async fn claimed_warm(
        &self,
        session: Session,
        started: Instant,
    ) -> Result<(Session, bool), Problem> {
        self.metrics.claim("warm");
        self.metrics
            .claim_duration
            .observe(started.elapsed().as_secs_f64());
        let fresh = self
            .store
            .get_session_any(&session.id)
            .await
            .map_err(store_error)?;
        self.notify(&session.id);
        Ok((fresh.unwrap_or(session), true))
    }

    /// Binds a sandbox to a session and records it; the session becomes `ready`.
    async fn attach_sandbox(
        &self,
        session: &Session,
        sandbox: &Sandbox,
        bind: &BindRequest,
    ) -> Result<(), AttachError> {
        let client = self.client_for(&sandbox.id, &sandbox.endpoint);
        if !bind.is_empty() {
            match client.bind(bind).await {
                Ok(_) => {}
                Err(ClientError::Refused(p)) if p.status == 422 => {
                    return Err(AttachError::Refused(Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_session",
                        p.detail.clone(),
                    )));
                }
                Err(e) => return Err(AttachError::Lost(e.to_string())),
            }
        }
        let claimed = self
            .store
            .claim_sandbox(&sandbox.id, &session.id)
            .await
            .map_err(|e| AttachError::Lost(e.to_string()))?;
        if !claimed {
            return Err(AttachError::Lost("already claimed".into()));
        }
        self.store
            .set_sandbox(&session.id, &sandbox.id, &sandbox.endpoint)
            .await
            .map_err(|e| AttachError::Lost(e.to_string()))?;
        self.store
            .transition(
                &session.id,
                &[SessionStatus::Creating],
                SessionStatus::Ready,
                None,
            )
            .await
            .map_err(|e| AttachError::Lost(e.to_string()))?;
        Ok(())
    }

    async fn cold_start(
        self: Arc<Self>,
        session: Session,
        mut template: Template,
        bind: BindRequest,
        started: Instant,
    ) {
        if !bind.is_empty() {
            // Start the agent once, with the session's values, instead of twice.
            template.start = sandwarden_proto::kind::StartMode::Bind;
        }
        let result = match self.provision(&template, &bind, Phase::Ready).await {
            Ok(sandbox) => match self
                .attach_sandbox(&session, &sandbox, &BindRequest::default())
                .await
            {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.discard(sandbox).await;
                    Err(match e {
                        AttachError::Refused(p) => p.detail.clone(),
                        AttachError::Lost(r) => r,
                    })
                }
            },
            Err(reason) => Err(reason),
        };
        match result {
            Ok(()) => {
                self.metrics
                    .claim_duration
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(session_id = %session.id, "cold sandbox ready");
            }
            Err(reason) => {
                tracing::warn!(session_id = %session.id, %reason, "cold start failed");
                let reason = format!("the sandbox could not start: {reason}");
                let _ = self
                    .store
                    .transition(
                        &session.id,
                        &[SessionStatus::Creating],
                        SessionStatus::Failed,
                        Some(&reason),
                    )
                    .await;
            }
        }
        self.notify(&session.id);
    }

    /// Starts a sandbox of `t`, records it, hands it `bind` (if any) and waits until its harness
    /// reports `want`. On any failure the sandbox is stopped and forgotten.
    async fn provision(
        &self,
        t: &Template,
        bind: &BindRequest,
        want: Phase,
    ) -> Result<Sandbox, String> {
        let id = format!("sbx_{}", uuid::Uuid::now_v7().simple());
        let sandbox = match self.runtime.create(&id, t).await {
            Ok(sandbox) => sandbox,
            Err(e) => {
                // Whatever it left (a working directory) goes too.
                self.runtime
                    .destroy(&Sandbox {
                        id,
                        template: t.name.clone(),
                        endpoint: String::new(),
                        pid: None,
                    })
                    .await;
                return Err(e.to_string());
            }
        };
        let ready = async {
            let row = SandboxRow {
                id: sandbox.id.clone(),
                template: t.name.clone(),
                endpoint: sandbox.endpoint.clone(),
                pid: sandbox.pid,
                session_id: None,
                owner: self.sandbox_owner(),
            };
            // A burst of cold starts can find the store's connections all busy for a moment:
            // the sandbox is already running, so wait for the store rather than fail the session.
            (|| self.store.insert_sandbox(&row))
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(2))
                        .with_max_times(5),
                )
                .when(store::StoreError::is_unavailable)
                .notify(|e, after| {
                    tracing::warn!(error = %e, retry_in = ?after, "recording a new sandbox waits for the store");
                })
                .await
                .map_err(|e| store_reason(&e))?;
            let client = self.client_for(&sandbox.id, &sandbox.endpoint);
            if !bind.is_empty() {
                client.bind(bind).await.map_err(|e| e.to_string())?;
            }
            wait_healthy(&client, &[want], COLD_START_TIMEOUT).await
        }
        .await;
        match ready {
            Ok(()) => Ok(sandbox),
            Err(reason) => {
                self.discard(sandbox).await;
                Err(reason)
            }
        }
    }

    /// Stops a sandbox and forgets it.
    async fn discard(&self, sandbox: Sandbox) {
        lock(&self.clients).remove(&sandbox.id);
        self.runtime.destroy(&sandbox).await;
        let _ = self.store.delete_sandbox(&sandbox.id).await;
    }

    pub async fn get(&self, tenant: &str, id: &str) -> Result<Session, Problem> {
        self.store
            .get_session(tenant, id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| not_found(id))
    }

    /// Long-poll: returns when the session is no longer `creating`/`running` or at `timeout`.
    pub async fn wait(
        &self,
        tenant: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<Session, Problem> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.get(tenant, id).await?;
            if s.status != SessionStatus::Creating && s.status != SessionStatus::Running {
                return Ok(s);
            }
            if !changed(&mut changes, id, deadline).await {
                return Ok(s);
            }
        }
    }

    /// Waits for any change of a session (long-poll of turns uses it).
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changed.subscribe()
    }

    pub async fn list(
        &self,
        tenant: &str,
        filter: &SessionFilter,
    ) -> Result<Vec<Session>, Problem> {
        self.store
            .list_sessions(tenant, filter)
            .await
            .map_err(store_error)
    }

    /// Deletes a session (idempotent): stops its sandbox; history stays readable.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<Session, Problem> {
        let s = self.get(tenant, id).await?;
        if s.status != SessionStatus::Deleted {
            self.store
                .transition(id, SessionStatus::DELETABLE, SessionStatus::Deleted, None)
                .await
                .map_err(store_error)?;
            self.release(&s).await;
            self.hub.forget(id);
            self.notify(id);
        }
        self.get(tenant, id).await
    }

    /// Stops a session's sandbox and drops its turn lock. A sandbox another replica started is
    /// left to that replica: its supervisor stops sandboxes whose session has ended.
    async fn release(&self, s: &Session) {
        lock(&self.turns).remove(&s.id);
        if let Some(sandbox_id) = &s.sandbox_id
            && let Ok(Some(row)) = self.store.get_sandbox(sandbox_id).await
            && self.store.owns(&row)
        {
            self.discard(Sandbox::from(row)).await;
        }
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

    // ---- turn lock

    /// Takes the session's turn lock, or names the turn holding it.
    fn lock_turn(
        &self,
        tenant: &str,
        session_id: &str,
        turn_id: &str,
        max_turns: Option<u64>,
    ) -> TurnLock {
        let mut turns = lock(&self.turns);
        match turns.get(session_id) {
            Some(t) if t.ending => TurnLock::Ending(t.turn_id.clone()),
            Some(t) => TurnLock::Running(t.turn_id.clone()),
            None => {
                if let Some(max) = max_turns {
                    let running = turns.values().filter(|t| t.tenant == tenant).count() as u64;
                    if running >= max {
                        return TurnLock::Quota(running);
                    }
                }
                turns.insert(
                    session_id.to_string(),
                    RunningTurn {
                        turn_id: turn_id.to_string(),
                        tenant: tenant.to_string(),
                        ending: false,
                    },
                );
                TurnLock::Taken
            }
        }
    }

    /// Refuses a new session when the tenant, or the server, holds as many live sessions as
    /// it may.
    async fn check_live_sessions(&self, tenant: &str, max: Option<u64>) -> Result<(), Problem> {
        if let Some(max) = max {
            let used = self
                .store
                .live_sessions(Some(tenant))
                .await
                .map_err(store_error)?;
            if used >= max {
                return Err(quota::exceeded(
                    "live_sessions",
                    used,
                    max,
                    "delete a session you no longer need first",
                ));
            }
        }
        if let Some(max) = self.config.max_live_sessions {
            let used = self.store.live_sessions(None).await.map_err(store_error)?;
            if used >= max {
                return Err(quota::exceeded(
                    "server_live_sessions",
                    used,
                    max,
                    "the server holds as many sessions as it may for all tenants; retry later",
                ));
            }
        }
        Ok(())
    }

    /// Refuses a session of `template` when the tenant's live sandboxes together with it would
    /// be given more than `max` MiB of memory.
    async fn check_sandbox_memory(
        &self,
        tenant: &str,
        template: &Template,
        max: u64,
        templates: &BTreeMap<String, Template>,
    ) -> Result<(), Problem> {
        let per_harness = self
            .store
            .live_per_harness(tenant)
            .await
            .map_err(store_error)?;
        // A session whose template is gone counts as the default size.
        let used: u64 = per_harness
            .iter()
            .map(|(harness, n)| {
                let mib = templates
                    .get(harness)
                    .map_or(crate::template::ContainerSpec::default().memory_mib, |t| {
                        t.container.memory_mib
                    });
                n.saturating_mul(mib)
            })
            .sum();
        let wanted = template.container.memory_mib;
        if used.saturating_add(wanted) > max {
            return Err(quota::exceeded(
                "sandbox_memory_mib",
                used,
                max,
                &format!(
                    "a {:?} sandbox needs {wanted} MiB more; delete a session you no longer need \
                     first",
                    template.name
                ),
            ));
        }
        Ok(())
    }

    /// The harness has ended the turn; only recording it is left.
    fn turn_ending(&self, session_id: &str, turn_id: &str) {
        if let Some(t) = lock(&self.turns).get_mut(session_id)
            && t.turn_id == turn_id
        {
            t.ending = true;
        }
    }

    fn unlock_turn(&self, session_id: &str, turn_id: &str) {
        let mut turns = lock(&self.turns);
        if turns.get(session_id).is_some_and(|t| t.turn_id == turn_id) {
            turns.remove(session_id);
        }
    }

    pub fn running_turn(&self, session_id: &str) -> Option<String> {
        lock(&self.turns).get(session_id).map(|t| t.turn_id.clone())
    }

    /// Marks a webhook delivery in flight on this replica until the guard drops; `None` when it
    /// already is.
    fn delivering(&self, id: &str) -> Option<InFlight> {
        if !lock(&self.delivering).insert(id.to_string()) {
            return None;
        }
        Some(InFlight {
            set: self.delivering.clone(),
            id: id.to_string(),
        })
    }

    // ---- terminals

    pub fn viewer_attached(&self, session_id: &str) {
        *lock(&self.viewers)
            .entry(session_id.to_string())
            .or_insert(0) += 1;
    }

    pub fn viewer_detached(&self, session_id: &str) {
        let mut v = lock(&self.viewers);
        if let Some(n) = v.get_mut(session_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                v.remove(session_id);
            }
        }
    }

    // ---- background work

    /// Recovers after a restart, then supervises sandboxes, reaps idle sessions and keeps the
    /// warm pools topped up until shutdown.
    /// Reconciles the store with the runtime after a (re)start. Call before serving requests.
    pub async fn sync(self: &Arc<Self>) {
        self.recover().await;
        webhook::resume(self, true).await;
        self.synced
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn run_background(self: Arc<Self>, mut exits: mpsc::UnboundedReceiver<String>) {
        let pool = tokio::spawn(self.clone().keep_pools());
        let replicas = tokio::spawn(self.clone().follow_replicas());
        let mut tick = tokio::time::interval(SUPERVISE_EVERY);
        let mut hooks = tokio::time::interval(self.config.webhook_lease.max(SUPERVISE_EVERY));
        hooks.tick().await;
        let mut beats = tokio::time::interval(self.config.replica_lease / 3);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => break,
                Some(sandbox_id) = exits.recv() => self.sandbox_exited(&sandbox_id).await,
                _ = tick.tick() => self.supervise().await,
                _ = beats.tick() => self.watch_replicas().await,
                // Deliveries whose replica died (its claim ran out) are taken over.
                _ = hooks.tick() => webhook::resume(&self, false).await,
            }
        }
        pool.abort();
        replicas.abort();
        // Warm sandboxes nobody holds are stopped; claimed ones keep running for the next start.
        let warm = lock(&self.pool).drain();
        for sandbox in warm {
            self.discard(sandbox).await;
        }
    }

    async fn recover(&self) {
        // Turns that were running when `serve` stopped cannot be resumed (the harness cancels a
        // turn whose client went away): they end as failed, with a reason.
        let _ = self.store.heartbeat(self.config.replica_lease).await;
        if let Ok(turns) = self.store.running_turns().await {
            for t in turns {
                self.end_interrupted(t, "the server restarted while the turn ran")
                    .await;
            }
        }
        let mut rows = self.store.list_sandboxes().await.unwrap_or_default();
        // Sandboxes the runtime still has that nothing records (a crash between starting one
        // and recording it) are removed.
        let known: std::collections::HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        // Other replicas' sandboxes are theirs (their processes): neither adopted nor stopped.
        rows.retain(|r| self.store.owns(r));
        for orphan in self.runtime.owned().await {
            if !known.contains(orphan.as_str()) {
                tracing::info!(sandbox = %orphan, "removing an orphaned sandbox");
                self.runtime
                    .destroy(&Sandbox {
                        id: orphan,
                        template: String::new(),
                        endpoint: String::new(),
                        pid: None,
                    })
                    .await;
            }
        }
        for row in rows {
            let sandbox = Sandbox::from(row.clone());
            let alive = self.runtime.alive(&sandbox).await
                && self
                    .client_for(&sandbox.id, &sandbox.endpoint)
                    .health()
                    .await
                    .is_ok();
            if alive {
                self.runtime.adopt(&sandbox).await;
            }
            match (&row.session_id, alive) {
                (None, true) => lock(&self.pool).adopt(&row.template, sandbox),
                (None, false) => self.discard(sandbox).await,
                (Some(_), true) => {}
                (Some(session_id), false) => {
                    if let Ok(Some(s)) = self.store.get_session_any(session_id).await
                        && !self
                            .mark_dead(&s, "its sandbox was gone after a restart")
                            .await
                    {
                        self.discard(sandbox).await;
                    }
                }
            }
        }
        if let Ok(creating) = self
            .store
            .sessions_with_status(&[SessionStatus::Creating])
            .await
        {
            // With a shared store another replica may be creating a session right now: only
            // those older than any cold start are abandoned.
            let stuck_before =
                humantime::format_rfc3339_micros(std::time::SystemTime::now() - COLD_START_TIMEOUT)
                    .to_string();
            for s in creating {
                if self.store.is_shared() && s.created_at > stuck_before {
                    continue;
                }
                let _ = self
                    .store
                    .transition(
                        &s.id,
                        &[SessionStatus::Creating],
                        SessionStatus::Failed,
                        Some("the server restarted while the sandbox was starting"),
                    )
                    .await;
            }
        }
    }

    /// Ends a turn nobody runs any more as failed, with a reason; its session takes turns again.
    async fn end_interrupted(&self, mut t: store::Turn, why: &str) {
        let error = serde_json::json!({"code": "interrupted", "message": why});
        t.status = crate::status::TurnStatus::Failed;
        t.error = Some(error.clone());
        t.finished_at = Some(store::now());
        // Its event stream ends as every turn's does, for readers resuming it; numbered after
        // what the store has (the turn may have run on another replica).
        if let Ok(last) = self.store.last_seq(&t.session_id).await {
            self.hub.set_seq(&t.session_id, last).await;
        }
        self.end_turn(
            &t,
            None,
            sandwarden_proto::event::EventType::Error,
            store::now(),
            error,
            || {},
        )
        .await;
        let _ = self
            .store
            .transition(
                &t.session_id,
                &[SessionStatus::Running, SessionStatus::InputRequired],
                SessionStatus::Ready,
                None,
            )
            .await;
        self.notify(&t.session_id);
    }

    /// Beats this replica's heart in the store, and ends the turns of replicas that stopped.
    async fn watch_replicas(&self) {
        if let Err(e) = self.store.heartbeat(self.config.replica_lease).await {
            tracing::warn!(error = %e, "recording this replica's heartbeat failed");
            return;
        }
        let Ok(orphans) = self.store.orphaned_turns().await else {
            return;
        };
        for t in orphans {
            if self.store.take_over_turn(&t.id).await.unwrap_or(false) {
                tracing::warn!(turn_id = %t.id, session_id = %t.session_id, "ending a turn whose replica stopped");
                self.end_interrupted(t, "the server running the turn stopped")
                    .await;
            }
        }
    }

    async fn sandbox_exited(&self, sandbox_id: &str) {
        let warm: Vec<Sandbox> = lock(&self.pool).remove_where(|s| s.id == sandbox_id);
        for s in warm {
            self.discard(s).await;
            self.pool_wake.notify_one();
        }
        if let Ok(Some(s)) = self.store.session_by_sandbox(sandbox_id).await {
            self.mark_dead(&s, "its sandbox exited").await;
        }
    }

    async fn supervise(&self) {
        // One read of the sandboxes per tick, not one per session; before the sessions, so a
        // sandbox claimed in between has its session in the second read.
        let Ok(rows) = self.store.list_sandboxes().await else {
            return;
        };
        let Ok(mut live) = self
            .store
            .sessions_with_status(SessionStatus::SUPERVISED)
            .await
        else {
            return;
        };
        // This replica's sandboxes whose session ended on another replica are stopped here.
        let holding: std::collections::HashSet<&str> = live.iter().map(|s| s.id.as_str()).collect();
        let ended: Vec<SandboxRow> = rows
            .iter()
            .filter(|r| {
                self.store.owns(r)
                    && r.session_id
                        .as_deref()
                        .is_some_and(|s| !holding.contains(s))
            })
            .cloned()
            .collect();
        for row in ended {
            tracing::info!(sandbox = %row.id, "stopping a sandbox whose session ended elsewhere");
            self.discard(Sandbox::from(row)).await;
        }
        live.retain(|s| s.status != SessionStatus::Creating);
        let sandboxes: HashMap<String, (bool, Sandbox)> = rows
            .into_iter()
            .map(|r| (r.id.clone(), (self.store.owns(&r), Sandbox::from(r))))
            .collect();
        let now = std::time::SystemTime::now();
        for s in live {
            let Some(sandbox_id) = &s.sandbox_id else {
                continue;
            };
            let Some((mine, sandbox)) = sandboxes.get(sandbox_id) else {
                self.mark_dead(&s, "its sandbox is gone").await;
                continue;
            };
            if !mine {
                // Its replica watches its process and reaps it.
                continue;
            }
            if !self.runtime.alive(sandbox).await {
                self.mark_dead(&s, "its sandbox exited").await;
                continue;
            }
            let idle_for = humantime::parse_rfc3339(&s.last_active_at)
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            let watched = lock(&self.viewers).contains_key(&s.id);
            if s.status == SessionStatus::Ready
                && !watched
                && idle_for.as_secs() as i64 > s.idle_timeout_s
            {
                let reason = format!("reaped after {} s idle", s.idle_timeout_s);
                if self
                    .store
                    .transition(
                        &s.id,
                        &[SessionStatus::Ready],
                        SessionStatus::Deleted,
                        Some(&reason),
                    )
                    .await
                    .unwrap_or(false)
                {
                    tracing::info!(session_id = %s.id, "reaped idle session");
                    self.release(&s).await;
                    self.hub.forget(&s.id);
                    self.notify(&s.id);
                }
            }
        }
    }

    /// Keeps every template's warm pool at its size.
    async fn keep_pools(self: Arc<Self>) {
        let mut backoff: HashMap<String, (Instant, Duration)> = HashMap::new();
        loop {
            let now = Instant::now();
            for t in self.templates().values().filter(|t| t.pool > 0) {
                if backoff.get(&t.name).is_some_and(|(until, _)| *until > now) {
                    continue;
                }
                let n = lock(&self.pool).plan(&t.name, t.pool);
                for _ in 0..n {
                    let me = self.clone();
                    let t = t.clone();
                    tokio::spawn(async move {
                        if !me.start_warm(&t).await {
                            lock(&me.pool_failures).push(t.name.clone());
                        }
                        me.pool_wake.notify_one();
                    });
                }
            }
            let failed: Vec<String> = std::mem::take(&mut *lock(&self.pool_failures));
            for name in failed {
                let delay = backoff.get(&name).map_or(Duration::from_secs(1), |(_, d)| {
                    (*d * 2).min(Duration::from_secs(60))
                });
                tracing::warn!(template = %name, retry_in = ?delay, "warm sandbox failed to start");
                backoff.insert(name, (Instant::now() + delay, delay));
            }
            tokio::select! {
                () = self.pool_wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn start_warm(&self, t: &Template) -> bool {
        let want = if t.start == sandwarden_proto::kind::StartMode::Bind {
            Phase::Standby
        } else {
            Phase::Ready
        };
        let result = self.provision(t, &BindRequest::default(), want).await;
        match result {
            Ok(sandbox) => {
                lock(&self.pool).started(&t.name, Some(sandbox));
                true
            }
            Err(reason) => {
                tracing::warn!(template = %t.name, %reason, "warm sandbox failed");
                lock(&self.pool).started(&t.name, None);
                false
            }
        }
    }
}

/// A delivery in flight on this replica; forgotten when dropped.
struct InFlight {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.id);
    }
}

impl From<SandboxRow> for Sandbox {
    fn from(r: SandboxRow) -> Self {
        Sandbox {
            id: r.id,
            template: r.template,
            endpoint: r.endpoint,
            pid: r.pid,
        }
    }
}

/// Waits until `session_id` changes (true) or `deadline` passes (false). A lagging receiver
/// counts as a change: the caller re-reads and finds out.
pub(crate) async fn changed(
    changes: &mut broadcast::Receiver<String>,
    session_id: &str,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        match tokio::time::timeout_at(deadline, changes.recv()).await {
            Err(_) => return false,
            Ok(Ok(id)) if id != session_id && id != ANY_SESSION => continue,
            Ok(_) => return true,
        }
    }
}

enum AttachError {
    /// The harness refused the bind (bad values); nothing changed there.
    Refused(Problem),
    /// The sandbox could not be used.
    Lost(String),
}

/// Polls a harness's health until it reports one of `want`, fails, or `within` passes.
pub async fn wait_healthy(
    client: &HarnessClient,
    want: &[Phase],
    within: Duration,
) -> Result<(), String> {
    use backon::{ConstantBuilder, Retryable};
    let attempts = (within.as_millis() / 20).max(1) as usize;
    let check = || async {
        match client.health().await {
            Ok(h) if want.contains(&h.phase) => Ok(Ok(())),
            Ok(h) if matches!(h.phase, Phase::Failed | Phase::Exited) => {
                Ok(Err(h.reason.unwrap_or_else(|| "the harness failed".into())))
            }
            Ok(h) => Err(format!("still {:?}", h.phase)),
            Err(e) => Err(e.to_string()),
        }
    };
    check
        .retry(
            ConstantBuilder::default()
                .with_delay(Duration::from_millis(20))
                .with_max_times(attempts),
        )
        .await
        .map_err(|last| format!("not ready within {} s ({last})", within.as_secs()))?
}
