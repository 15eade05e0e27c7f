//! An orchestrator in the test's own process, over a fresh store and a runtime the test brings:
//! the seam for tests that stand in for one part (a runtime that cannot see its sandboxes die,
//! harness servers hosted as tasks) and keep the rest the product's own.

use sandwarden::runtime::Runtime;
use sandwarden::session::{Config, Orchestrator};
use sandwarden::store::Store;
use sandwarden::template::Template;
use sandwarden::tokens::Tokens;
use std::sync::Arc;
use std::time::Duration;

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
        webhook_lease: Duration::from_secs(30),
        replica_lease: Duration::from_secs(15),
        client_timeout: Duration::from_secs(30),
        default_limits: Default::default(),
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
