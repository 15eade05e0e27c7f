//! Sessions: the orchestrator's state and the session lifecycle, split by job: creating
//! (`create`: quotas, warm claims, cold starts, binding), liveness (`liveness`: the one rule for
//! an unreachable sandbox), the background jobs (`supervise`: recovery, supervision, reaping,
//! replicas, warm pools), an agent's exit (`exit`), turns (`turn`), event numbering (`hub`),
//! webhooks (`webhook`), quotas (`quota`) and what clients see (`view`). This file keeps the
//! `Orchestrator` itself, reads, deletes and the bookkeeping of running turns and viewers.
//!
//! It talks to sandboxes through the runtime trait and the harness client; it must not know HTTP
//! routing: it returns `SessionError`s, which the API layer (`api::error`) alone maps to HTTP.

mod create;
pub mod error;
pub mod exit;
mod files;
pub mod hub;
pub mod liveness;
pub mod message;
pub mod quota;
mod supervise;
pub mod turn;
pub mod view;
pub mod webhook;

pub use create::CreateRequest;
pub use error::SessionError;

use crate::metrics::Metrics;
use crate::pool::PoolIndex;
use crate::runtime::{Runtime, Sandbox};
use crate::status::SessionStatus;
use crate::store::{self, SandboxRow, Session, SessionFilter, Store};
use crate::template::Template;
use crate::tokens::Tokens;
use backon::{ExponentialBuilder, Retryable};
use sandwarden_proto::event::{BindFile, BindRequest, Phase, validate_id};
use sandwarden_proto::harness_client::{ClientError, HarnessClient};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// How long a cold sandbox may take to become ready.
pub const COLD_START_TIMEOUT: Duration = Duration::from_secs(120);
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);
/// On the changes channel: every session may have changed (notices from other replicas were
/// missed), so every waiter re-reads.
pub(crate) const ANY_SESSION: &str = "*";

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

pub struct Config {
    /// Base URL clients reach this server at (for `tty_url`).
    pub public_url: String,
    /// Let webhooks target loopback, private and link-local addresses.
    pub allow_private_webhooks: bool,
    /// Lifetime of the token in `tty_url`.
    pub tty_token_ttl: Duration,
    /// Origins allowed to open terminal WebSockets from a browser (empty: same origin only).
    pub allowed_origins: Vec<String>,
    /// Where the web console's files are read from instead of the copy built in (`None`: the
    /// built-in one).
    pub console_dir: Option<std::path::PathBuf>,
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
    /// The template of sessions created without naming one (`--default-template`): clients
    /// that never name a harness (the seed platforms' own, the chat APIs) get it.
    pub default_template: Option<String>,
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
    /// The `input_required` requests answered through this replica: the harness may go on
    /// asking nothing for a while, and the questions stay the last events until it does.
    answered: Vec<String>,
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
    /// Counts the times the cached keys were forgotten (a key revoked or changed): long-lived
    /// streams look again at their key when it moves.
    key_epoch: tokio::sync::watch::Sender<u64>,
    /// Templates whose warm start failed since the pool loop last looked (for backoff).
    pool_failures: Mutex<Vec<String>>,
    turns: Mutex<HashMap<String, RunningTurn>>,
    /// Per tenant, held from a create's quota checks to its record (see `create`): one
    /// tenant's creates are counted one after another, other tenants' are not held up.
    admission: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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
            key_epoch: tokio::sync::watch::Sender::new(0),
            streams: quota::Streams::default(),
            pool_failures: Mutex::new(Vec::new()),
            turns: Mutex::new(HashMap::new()),
            admission: Mutex::new(HashMap::new()),
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
        self.key_epoch.send_modify(|epoch| *epoch += 1);
    }

    /// For a stream that outlives the request its key was checked for: cancels `revoked` when
    /// the key of this hash is revoked (looked at each time keys change). Watching stops when
    /// the guard is dropped (the stream ended).
    pub fn on_revocation(
        self: &Arc<Self>,
        hash: String,
        revoked: CancellationToken,
    ) -> tokio_util::sync::DropGuard {
        let done = CancellationToken::new();
        let watching = done.clone();
        let orch = self.clone();
        let mut changes = self.key_epoch.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = watching.cancelled() => return,
                    moved = changes.changed() => {
                        if moved.is_err() || !orch.key_still_valid(&hash).await {
                            revoked.cancel();
                            return;
                        }
                    }
                }
            }
        });
        done.drop_guard()
    }

    /// Whether the key of this hash is still valid (not revoked). A store that cannot be asked
    /// says no: a stream that cannot show its key is good ends, and its client reconnects.
    async fn key_still_valid(&self, hash: &str) -> bool {
        if self.cached_key(hash).is_some() {
            return true;
        }
        match self.store.find_key(hash).await {
            Ok(Some(key)) => {
                self.cache_key(hash.to_string(), &key);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not check a stream's key; ending the stream");
                false
            }
        }
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

    pub async fn get(&self, tenant: &str, id: &str) -> Result<Session, SessionError> {
        self.store
            .get_session(tenant, id)
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_string()))
    }

    /// Long-poll: returns when the session is no longer `creating`/`running` or at `timeout`.
    /// A session still `input_required` whose questions were all answered is as good as
    /// `running` (its agent has not gone on yet): answering it at once would have a polling
    /// client spin.
    pub async fn wait(
        &self,
        tenant: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<Session, SessionError> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.get(tenant, id).await?;
            let settled = match s.status {
                SessionStatus::Creating | SessionStatus::Running => false,
                SessionStatus::InputRequired => !self.pending_inputs(&s).await?.is_empty(),
                _ => true,
            };
            if settled {
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
    ) -> Result<Vec<Session>, SessionError> {
        self.store
            .list_sessions(tenant, filter)
            .await
            .map_err(SessionError::from)
    }

    /// Deletes a session (idempotent): stops its sandbox; history stays readable.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<Session, SessionError> {
        let s = self.get(tenant, id).await?;
        if s.status != SessionStatus::Deleted {
            self.store
                .transition(id, SessionStatus::DELETABLE, SessionStatus::Deleted, None)
                .await?;
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
                        answered: Vec::new(),
                    },
                );
                TurnLock::Taken
            }
        }
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

    /// The tenant's admission lock (see `create`), forgotten when no create holds it.
    fn admission(&self, tenant: &str) -> Admission<'_> {
        let lock = lock(&self.admission)
            .entry(tenant.to_string())
            .or_default()
            .clone();
        Admission {
            orch: self,
            tenant: tenant.to_string(),
            lock,
        }
    }

    /// Notes that the running turn's request `request_id` was answered.
    fn note_answered(&self, session_id: &str, request_id: &str) {
        if let Some(t) = lock(&self.turns).get_mut(session_id)
            && t.answered.len() < 256
        {
            t.answered.push(request_id.to_string());
        }
    }

    /// Whether the running turn's request `request_id` was answered through this replica.
    fn was_answered(&self, session_id: &str, request_id: &str) -> bool {
        lock(&self.turns)
            .get(session_id)
            .is_some_and(|t| t.answered.iter().any(|a| a == request_id))
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
}

/// A tenant's admission lock, to be held; its entry goes when the last holder drops it.
struct Admission<'a> {
    orch: &'a Orchestrator,
    tenant: String,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        let mut all = lock(&self.orch.admission);
        // Two references: the map's and this one.
        if Arc::strong_count(&self.lock) <= 2 {
            all.remove(&self.tenant);
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
