//! The background jobs: recovering after a restart, supervising live sessions and their
//! sandboxes, reaping idle ones, following other replicas and keeping warm pools topped up.

use super::*;

impl Orchestrator {
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
            let health = match self.runtime.alive(&sandbox).await {
                true => self
                    .client_for(&sandbox.id, &sandbox.endpoint)
                    .health()
                    .await
                    .ok(),
                false => None,
            };
            let alive = health.is_some();
            if alive {
                self.runtime.adopt(&sandbox).await;
            }
            // An unclaimed sandbox that a session's setup had begun on (its values bound, its
            // egress narrowed) when the last `serve` stopped holds that session's: it goes.
            let fresh = health.as_ref().is_some_and(|h| !h.bound && !h.used)
                && !self.runtime.is_narrowed(&sandbox.id);
            match (&row.session_id, alive) {
                (None, true) if fresh => lock(&self.pool).adopt(&row.template, sandbox),
                (None, true) => {
                    tracing::info!(sandbox = %sandbox.id, "a sandbox a session's setup had begun on is stopped, not pooled");
                    self.discard(sandbox).await;
                }
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
        let result = self.provision(t, &BindRequest::default(), None, want).await;
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
}
