//! Runtimes start and stop sandboxes: one `sandwarden harness` each, reachable over HTTP with a
//! per-sandbox token. The API layer uses the `Runtime` trait without knowing which one runs.
//!
//! A runtime knows templates and processes (or containers, Pods); it must not know sessions.

pub mod cgroup;
pub mod docker;
pub mod kubernetes;
pub mod local;
pub mod sandbox_net;

use crate::template::Template;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("starting the sandbox failed: {0}")]
    Start(String),
    #[error("the sandbox did not start listening within {0} s")]
    StartTimeout(u64),
    /// The cause is shown too: it is what a failed session's `failure_reason` says.
    #[error("sandbox I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A running sandbox as the orchestrator reaches it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub id: String,
    pub template: String,
    /// `http://host:port` of its harness server.
    pub endpoint: String,
    /// Process id (local runtime), for liveness checks and stopping adopted sandboxes.
    pub pid: Option<i64>,
}

#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// How its sandboxes are confined, as each session reports it (`isolation`): `bwrap` or
    /// `none` for local sandboxes, `container`, `pod`.
    fn isolation(&self) -> &'static str;
    /// Starts a sandbox of `template`; returns once its harness server listens.
    async fn create(&self, id: &str, template: &Template) -> Result<Sandbox, RuntimeError>;
    /// Hands over a ready sandbox of `template` that the runtime keeps warm itself (Kubernetes:
    /// a `SandboxWarmPool` member), recording `claimer`; `None` when it has none.
    async fn claim(&self, _template: &Template, _claimer: &str) -> Option<Sandbox> {
        None
    }
    /// Whether every replica of the API reaches and watches this runtime's sandboxes (a
    /// cluster), rather than only the replica that started them (local processes, a host's
    /// containers).
    fn shared(&self) -> bool {
        false
    }
    /// The egress proxies its sandboxes' only way out goes through, when it has them (local
    /// sandboxes under bubblewrap, containers): what a session's `egress_allow` narrows.
    fn egress_proxies(&self) -> Option<&sandbox_net::EgressProxies> {
        None
    }
    /// Whether a session can narrow its sandbox's egress to hosts it names.
    fn narrows_egress(&self) -> bool {
        self.egress_proxies().is_some()
    }
    /// Whether sandbox `id` is held to a session's narrowing (so no other session may take it).
    fn is_narrowed(&self, id: &str) -> bool {
        self.egress_proxies().is_some_and(|p| p.is_narrowed(id))
    }
    /// Narrows sandbox `id`'s egress to `to`, or lifts its narrowing (`None`); the error says
    /// why it cannot.
    fn narrow_egress(&self, id: &str, to: Option<crate::egress::Narrowing>) -> Result<(), String> {
        match self.egress_proxies() {
            Some(proxies) => proxies.narrow(id, to).map_err(|e| e.to_string()),
            None => Err(format!(
                "the {} runtime's sandboxes (isolation {}) do not go out through serve's egress \
                 proxy",
                self.name(),
                self.isolation()
            )),
        }
    }
    /// Takes back a sandbox a previous `serve` started that still runs (after a restart).
    async fn adopt(&self, _sandbox: &Sandbox) {}
    /// Stops a sandbox and removes what it left (idempotent).
    async fn destroy(&self, sandbox: &Sandbox);
    /// Whether the sandbox still runs, by a cheap check (no request to the harness).
    async fn alive(&self, sandbox: &Sandbox) -> bool;
    /// The ids of the sandboxes this server owns that the runtime still has, so a restart can
    /// remove the ones nothing records (orphans). Runtimes that cannot leak return none.
    async fn owned(&self) -> Vec<String> {
        Vec::new()
    }
}
