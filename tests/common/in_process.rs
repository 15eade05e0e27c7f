//! An orchestrator in the test's own process, over a fresh store and a runtime the test brings:
//! the seam for tests that stand in for one part (a runtime that cannot see its sandboxes die,
//! harness servers hosted as tasks) and keep the rest the product's own.

use sandwarden::runtime::{Runtime, RuntimeError, Sandbox};
use sandwarden::session::{Config, Orchestrator};
use sandwarden::store::Store;
use sandwarden::template::Template;
use sandwarden::tokens::Tokens;
use sandwarden_harness::{HarnessConfig, ListenAddr, StartMode};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A store in `dir` holding a key for each `(tenant, key, admin)`.
pub async fn store_with_keys(dir: &std::path::Path, keys: &[(&str, &str, bool)]) -> Store {
    let store = Store::open(dir).await.expect("store");
    for (tenant, key, admin) in keys {
        store
            .insert_key(
                tenant,
                &sandwarden::api::hash_key(key),
                *admin,
                "api",
                &Default::default(),
            )
            .await
            .expect("key");
    }
    store
}

/// The built-in templates named in `names`, with no warm pool.
pub fn templates(names: &[&str]) -> std::collections::BTreeMap<String, Template> {
    sandwarden::template::builtin_templates()
        .into_iter()
        .filter(|t| names.contains(&t.name.as_str()))
        .map(|mut t| {
            t.pool = 0;
            (t.name.clone(), t)
        })
        .collect()
}

/// An orchestrator with the server's defaults (no quotas), started and synced.
pub async fn orchestrator(
    store: Store,
    runtime: Arc<dyn Runtime>,
    tokens: Tokens,
    templates: std::collections::BTreeMap<String, Template>,
    public_url: &str,
) -> Arc<Orchestrator> {
    let config = Config {
        public_url: public_url.to_string(),
        allow_private_webhooks: true,
        tty_token_ttl: Duration::from_secs(60),
        allowed_origins: vec![],
        console_dir: None,
        webhook_lease: Duration::from_secs(30),
        replica_lease: Duration::from_secs(15),
        client_timeout: Duration::from_secs(30),
        default_limits: Default::default(),
        default_template: None,
        max_live_sessions: None,
        answer_memory_mib: None,
    };
    let orch = Orchestrator::new(
        store,
        runtime,
        tokens,
        templates,
        config,
        tokio_util::sync::CancellationToken::new(),
    );
    orch.sync().await;
    orch
}

/// Sandboxes as tasks of this process: each one a harness server on its own socket, stopped by
/// cancelling its token.
pub struct InProcess {
    tokens: Tokens,
    dir: PathBuf,
    running: Mutex<HashMap<String, CancellationToken>>,
}

#[async_trait::async_trait]
impl Runtime for InProcess {
    fn name(&self) -> &'static str {
        "in-process"
    }

    fn isolation(&self) -> &'static str {
        "none"
    }

    async fn create(&self, id: &str, t: &Template) -> Result<Sandbox, RuntimeError> {
        let socket = self.dir.join(format!("{id}.sock"));
        let workdir = self.dir.join(id);
        std::fs::create_dir_all(&workdir)?;
        // The echo agent is this build's `sandwarden echo-agent`; any other template runs its
        // own command line.
        let argv = match t.command.strip_prefix("sandwarden ") {
            Some(rest) => std::iter::once(env!("CARGO_BIN_EXE_sandwarden").to_string())
                .chain(rest.split_whitespace().map(String::from))
                .collect(),
            None => t.command.split_whitespace().map(String::from).collect(),
        };
        let config = HarnessConfig {
            listen: ListenAddr::Unix(socket.clone()),
            token: self.tokens.for_sandbox(id),
            kind: t.kind,
            argv,
            workdir,
            start: StartMode::Boot,
            turn_timeout: Duration::from_secs(t.turn_timeout_s),
            boot_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(2),
            max_request_bytes: 16 * 1024 * 1024,
            client_timeout: Duration::from_secs(30),
            replay_bytes: 64 * 1024,
            tty_size: (80, 24),
            shutdown_grace: Duration::from_secs(1),
            egress: None,
        };
        let stop = CancellationToken::new();
        tokio::spawn(sandwarden_harness::serve(config, stop.clone()));
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.running
            .lock()
            .expect("lock")
            .insert(id.to_string(), stop);
        Ok(Sandbox {
            id: id.into(),
            template: t.name.clone(),
            endpoint: format!("unix:{}", socket.display()),
            pid: None,
        })
    }

    async fn destroy(&self, sandbox: &Sandbox) {
        if let Some(stop) = self.running.lock().expect("lock").remove(&sandbox.id) {
            stop.cancel();
        }
    }

    async fn alive(&self, sandbox: &Sandbox) -> bool {
        self.running.lock().expect("lock").contains_key(&sandbox.id)
    }
}

impl InProcess {
    /// Sandboxes under `dir` (made here), each harness holding its token from `tokens`.
    pub fn new(tokens: Tokens, dir: PathBuf) -> InProcess {
        std::fs::create_dir_all(&dir).expect("sandboxes dir");
        InProcess {
            tokens,
            dir,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// How many sandboxes run now.
    pub fn running(&self) -> usize {
        self.running.lock().expect("lock").len()
    }

    /// Stops a sandbox's harness as a crash would, leaving the session to find it gone.
    pub fn kill(&self, sandbox_id: &str) {
        if let Some(stop) = self.running.lock().expect("lock").remove(sandbox_id) {
            stop.cancel();
        }
    }
}
