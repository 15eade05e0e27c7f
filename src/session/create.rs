//! Creating a session: the tenant's quotas checked, a warm sandbox claimed or a cold one
//! started, the session's values bound into it, and the session recorded.

use super::*;

/// `POST /v1/sessions`.
#[derive(utoipa::ToSchema, Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The template; absent: the server's default template (`--default-template`).
    #[serde(default)]
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
    /// MCP servers for the agent (API sessions), handed over at binding and never stored.
    #[serde(default)]
    pub mcp_servers: Vec<sandwarden_proto::event::McpServerSpec>,
    /// Tools the client runs itself, offered to the agent (API sessions; never stored).
    #[serde(default)]
    pub client_tools: Vec<sandwarden_proto::event::ClientToolSpec>,
    /// Standing instructions added to the agent's system prompt (API sessions; handed over at
    /// binding and never stored).
    pub instructions: Option<String>,
    /// The public hosts the sandbox may reach (`host`, `host:port`, `*.domain`), besides the
    /// operator's exceptions; `[]` for none. Absent: every public host, as the policy has it.
    pub egress_allow: Option<Vec<String>>,
    /// Resumes: names a session of the caller's to answer with instead of creating one
    /// (Karta's clients resume this way); `404` when there is none.
    #[serde(default)]
    pub session_id: Option<String>,
}

impl CreateRequest {
    /// A digest of what identifies the request for `Idempotency-Key`, without secret values.
    fn fingerprint(&self) -> String {
        let shape = serde_json::json!({
            "harness": self.harness, "id": self.id, "title": self.title, "metadata": self.metadata,
            "env": self.env.keys().collect::<Vec<_>>(),
            "files": self.files.iter().map(|f| &f.path).collect::<Vec<_>>(),
            "cwd": self.cwd, "idle_timeout_s": self.idle_timeout_s,
            "mcp_servers": self.mcp_servers.iter().map(|m| &m.name).collect::<Vec<_>>(),
            "client_tools": self.client_tools,
            "instructions": self.instructions.as_deref().map(|t| hex::encode(Sha256::digest(t))),
            "egress_allow": self.egress_allow,
        });
        hex::encode(Sha256::digest(shape.to_string().as_bytes()))
    }

    fn bind(&self) -> BindRequest {
        BindRequest {
            env: self.env.clone(),
            files: self.files.clone(),
            cwd: self.cwd.clone(),
            mcp_servers: self.mcp_servers.clone(),
            client_tools: self.client_tools.clone(),
            instructions: self.instructions.clone(),
        }
    }
}

enum AttachError {
    /// The harness refused the bind (bad values); nothing changed there.
    Refused(SessionError),
    /// The sandbox could not be used.
    Lost(String),
}

impl Orchestrator {
    /// The template of a session whose client names none (`--default-template`).
    pub fn default_template(&self) -> Result<String, SessionError> {
        self.config.default_template.clone().ok_or_else(|| {
            SessionError::invalid(
                "no_default_template",
                "name the harness (`harness`, or the template in the mount's path); this server \
                 has no default template (serve --default-template NAME)",
            )
        })
    }

    pub async fn create(
        self: &Arc<Self>,
        tenant: &str,
        req: CreateRequest,
        idempotency_key: Option<String>,
        limits: &quota::Limits,
    ) -> Result<(Session, bool), SessionError> {
        let started = Instant::now();
        let invalid = |m: String| SessionError::invalid("invalid_session", m);
        let templates = self.templates();
        let mut req = req;
        if req.harness.is_empty() {
            req.harness = self.default_template()?;
        }
        let Some(template) = templates.get(&req.harness).cloned() else {
            return Err(SessionError::invalid(
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
        if template.kind == sandwarden_proto::kind::HarnessKind::Tui && !bind.mcp_servers.is_empty()
        {
            return Err(invalid(sandwarden_proto::event::TUI_MCP.into()));
        }
        if template.kind == sandwarden_proto::kind::HarnessKind::Tui
            && !bind.client_tools.is_empty()
        {
            return Err(invalid(sandwarden_proto::event::TUI_CLIENT_TOOLS.into()));
        }
        if template.kind == sandwarden_proto::kind::HarnessKind::Tui && bind.instructions.is_some()
        {
            return Err(invalid(sandwarden_proto::event::TUI_INSTRUCTIONS.into()));
        }

        let narrowing = match &req.egress_allow {
            None => None,
            Some(hosts) => {
                let n = crate::egress::Narrowing::parse(hosts)
                    .map_err(|e| invalid(format!("`egress_allow` {e}")))?;
                if !self.runtime.narrows_egress() {
                    return Err(invalid(format!(
                        "`egress_allow` narrows what a sandbox reaches through serve's egress \
                         proxy, which this server's sandboxes ({} runtime, isolation {}) do not \
                         go through: leave it out, or run confined sandboxes (bwrap, docker)",
                        self.runtime.name(),
                        self.runtime.isolation()
                    )));
                }
                Some(n)
            }
        };
        let fingerprint = req.fingerprint();
        if let Some(key) = &idempotency_key
            && let Some(existing) = self.store.find_idempotent(tenant, key).await?
        {
            if existing.request_hash.as_deref() == Some(fingerprint.as_str()) {
                return Ok((existing, false));
            }
            return Err(SessionError::IdempotencyKeyReused);
        }

        // Counting and recording are one step for the tenant's quotas: two creates counted at
        // once would both pass a limit with room for one. Held for a few store calls, not for
        // the sandbox's start (this replica's creates; docs/api.md says what is per replica).
        let admission = self.admission(tenant);
        let admitted = admission.lock.lock().await;
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
                return Err(SessionError::Exists(
                    session.name.clone().unwrap_or(session.id),
                ));
            }
            Err(e) => return Err(e.into()),
        }
        drop(admitted);
        drop(admission);

        // Warm claim: a ready sandbox of the template, bound to this session's values.
        loop {
            let claimed = lock(&self.pool).claim(&template.name);
            let Some(sandbox) = claimed else { break };
            self.pool_wake.notify_one();
            match self
                .attach_sandbox(&session, &sandbox, &bind, narrowing.as_ref())
                .await
            {
                Ok(()) => return self.claimed_warm(session, started).await,
                Err(AttachError::Refused(p)) => {
                    // The bind was refused and changed nothing: the sandbox stays warm (unless
                    // its egress was narrowed for this session), and the refused request leaves
                    // no session behind.
                    // Its narrowing for this session is lifted first; failing that, it goes.
                    let lifted = narrowing.is_none()
                        || self.runtime.narrow_egress(&sandbox.id, None).is_ok();
                    if lifted {
                        lock(&self.pool).adopt(&template.name, sandbox);
                    } else {
                        self.discard(sandbox).await;
                    }
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
                Ok(()) => {
                    self.attach_sandbox(&session, &sandbox, &bind, narrowing.as_ref())
                        .await
                }
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
            me.cold_start(cold, template, (bind, narrowing), started)
                .await;
        });
        session.phase = Some("starting_sandbox".into());
        Ok((session, true))
    }

    /// The answer to a create that a warm sandbox served: the session as stored now (`ready`).
    async fn claimed_warm(
        &self,
        session: Session,
        started: Instant,
    ) -> Result<(Session, bool), SessionError> {
        self.metrics.claim("warm");
        self.metrics
            .claim_duration
            .observe(started.elapsed().as_secs_f64());
        let fresh = self.store.get_session_any(&session.id).await?;
        self.notify(&session.id);
        Ok((fresh.unwrap_or(session), true))
    }

    /// Binds a sandbox to a session and records it; the session becomes `ready`. The sandbox's
    /// egress is narrowed first, so the agent the bind starts is held to it from its start.
    async fn attach_sandbox(
        &self,
        session: &Session,
        sandbox: &Sandbox,
        bind: &BindRequest,
        narrowing: Option<&crate::egress::Narrowing>,
    ) -> Result<(), AttachError> {
        let client = self.client_for(&sandbox.id, &sandbox.endpoint);
        if let Some(n) = narrowing {
            self.runtime
                .narrow_egress(&sandbox.id, Some(n.clone()))
                .map_err(AttachError::Lost)?;
        }
        if !bind.is_empty() || narrowing.is_some() {
            match client.bind(bind).await {
                Ok(_) => {}
                Err(ClientError::Refused(p)) if p.is_invalid_request() => {
                    return Err(AttachError::Refused(SessionError::invalid(
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
        (bind, narrowing): (BindRequest, Option<crate::egress::Narrowing>),
        started: Instant,
    ) {
        if !bind.is_empty() || narrowing.is_some() {
            // Start the agent once, with the session's values (and held to its narrowing from
            // its start), instead of twice.
            template.start = sandwarden_proto::kind::StartMode::Bind;
        }
        let provisioned = self
            .provision(&template, &bind, narrowing.as_ref(), Phase::Ready)
            .await;
        let result = match provisioned {
            Ok(sandbox) => match self
                .attach_sandbox(&session, &sandbox, &BindRequest::default(), None)
                .await
            {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.discard(sandbox).await;
                    Err(match e {
                        AttachError::Refused(e) => e.to_string(),
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
    pub(super) async fn provision(
        &self,
        t: &Template,
        bind: &BindRequest,
        narrowing: Option<&crate::egress::Narrowing>,
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
            if let Some(n) = narrowing {
                self.runtime.narrow_egress(&sandbox.id, Some(n.clone()))?;
            }
            if !bind.is_empty() || narrowing.is_some() {
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
    pub(super) async fn discard(&self, sandbox: Sandbox) {
        lock(&self.clients).remove(&sandbox.id);
        self.runtime.destroy(&sandbox).await;
        let _ = self.store.delete_sandbox(&sandbox.id).await;
    }

    /// Refuses a new session when the tenant, or the server, holds as many live sessions as
    /// it may.
    async fn check_live_sessions(
        &self,
        tenant: &str,
        max: Option<u64>,
    ) -> Result<(), SessionError> {
        if let Some(max) = max {
            let used = self.store.live_sessions(Some(tenant)).await?;
            if used >= max {
                return Err(SessionError::quota(
                    "live_sessions",
                    used,
                    max,
                    "delete a session you no longer need first",
                ));
            }
        }
        if let Some(max) = self.config.max_live_sessions {
            let used = self.store.live_sessions(None).await?;
            if used >= max {
                return Err(SessionError::quota(
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
    ) -> Result<(), SessionError> {
        let per_harness = self.store.live_per_harness(tenant).await?;
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
            return Err(SessionError::quota(
                "sandbox_memory_mib",
                used,
                max,
                format!(
                    "a {:?} sandbox needs {wanted} MiB more; delete a session you no longer need \
                     first",
                    template.name
                ),
            ));
        }
        Ok(())
    }
}
