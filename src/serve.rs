//! `sandwarden serve`: wires the store, the runtime, the orchestrator and the API together and
//! runs them until a signal.

use crate::api;
use crate::controller::leader::{Elector, Timings};
use crate::k8s::crd::SandboxTemplate;
use crate::runtime::docker::DockerRuntime;
use crate::runtime::kubernetes::KubernetesRuntime;
use crate::runtime::local::{Isolation, LocalRuntime};
use crate::session::{Config, Orchestrator};
use crate::store::{Location, Store};
use crate::template::{Template, builtin_templates};
use crate::tokens::Tokens;
use anyhow::Context;
use kube::ResourceExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeKind {
    /// Sandboxes are `sandwarden harness` processes on loopback ports.
    Local,
    /// Sandboxes are containers of harness images, through the Docker Engine API (Docker, or
    /// Podman's API service); `DOCKER_HOST` names the engine.
    Docker,
    /// Sandboxes are `Sandbox` resources run as Pods by the controller in this process (when it
    /// holds the leader Lease); templates and warm pools are the namespace's SandboxTemplates
    /// and SandboxWarmPools. The cluster is the in-cluster service account's, or KUBECONFIG's.
    Kubernetes,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks one; the address is printed on stdout as JSON).
    #[arg(long, env = "SANDWARDEN_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A second address serving only /healthz, /readyz and /metrics, for Kubernetes probes and
    /// scrapers: new connections there are accepted at once while a flood of API connections
    /// waits in `--listen`'s backlog (see --refused-pace-ms). Printed as `probes` in the listen
    /// line. Unset: the probes are on `--listen` only.
    #[arg(long, env = "SANDWARDEN_PROBE_LISTEN")]
    pub probe_listen: Option<SocketAddr>,
    /// Where the store, the server secret and sandbox working directories live.
    #[arg(long, env = "SANDWARDEN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where sandboxes run.
    #[arg(long, env = "SANDWARDEN_RUNTIME", value_enum, default_value = "local")]
    pub runtime: RuntimeKind,
    /// How local sandboxes are confined: `auto` (bubblewrap where it works, else plain
    /// processes with a warning), `bwrap` (refuse to start without it), or `none` (plain
    /// processes, no boundary at all). docs/security.md says what each holds.
    #[arg(long, env = "SANDWARDEN_ISOLATION", value_enum, default_value = "auto")]
    pub isolation: Isolation,
    /// Lets sandboxes reach HOST[:PORT] although it is a loopback, private or link-local
    /// address (a model server on the LAN or on this machine; repeatable). A loopback address
    /// with a port is reachable inside a sandbox (local or container) at the same address.
    #[arg(
        long = "egress-allow",
        env = "SANDWARDEN_EGRESS_ALLOW",
        value_delimiter = ','
    )]
    pub egress_allow: Vec<String>,
    /// Gives every local sandbox this variable of serve's environment (repeatable). Nothing
    /// else of it reaches a sandbox but the locale and time zone.
    #[arg(long = "pass-env", env = "SANDWARDEN_PASS_ENV", value_delimiter = ',')]
    pub pass_env: Vec<String>,
    /// A JSON file with an array of templates that add to or replace the built-in ones by name.
    #[arg(long, env = "SANDWARDEN_TEMPLATES")]
    pub templates: Option<PathBuf>,
    /// Warm pool size per template, as NAME=N (repeat, or comma-separate in the variable).
    #[arg(long = "pool", env = "SANDWARDEN_POOL", value_delimiter = ',')]
    pub pools: Vec<String>,
    /// The template of sessions created without naming one: the seed platforms' clients and
    /// the chat APIs name none (default: none; such a create is refused saying so).
    #[arg(long, env = "SANDWARDEN_DEFAULT_TEMPLATE")]
    pub default_template: Option<String>,
    /// The URL clients reach this server at, for `tty_url` (default: http://LISTEN).
    #[arg(long, env = "SANDWARDEN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Let webhooks reach loopback, private and link-local addresses (refused by default).
    #[arg(long, env = "SANDWARDEN_ALLOW_PRIVATE_WEBHOOKS")]
    pub allow_private_webhooks: bool,
    /// Browser Origins allowed to attach terminals, besides the server's own (repeatable).
    #[arg(
        long = "allowed-origin",
        env = "SANDWARDEN_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Serve the web console's files from this directory instead of the copy built into the
    /// binary (to try changes to it without rebuilding).
    #[arg(long, env = "SANDWARDEN_CONSOLE_DIR")]
    pub console_dir: Option<std::path::PathBuf>,
    /// The namespace of Sandboxes and their Pods (kubernetes runtime; default: the service
    /// account's or the kubeconfig context's).
    #[arg(long, env = "SANDWARDEN_NAMESPACE")]
    pub namespace: Option<String>,
    /// This replica's name in leader election (kubernetes runtime; default: POD_NAME, else the
    /// host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Lifetime of the token in a session's `tty_url`, in seconds.
    #[arg(long, env = "SANDWARDEN_TTY_TOKEN_TTL", default_value_t = 600)]
    pub tty_token_ttl: u64,
    /// Where sessions, turns and events are stored: unset for an SQLite file in the data dir
    /// (one replica), or a `postgres://user:password@host/db` URL that several replicas share.
    #[arg(long, env = "SANDWARDEN_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// PostgreSQL: most connections this replica opens.
    #[arg(long, env = "SANDWARDEN_STORE_MAX_CONNECTIONS", default_value_t = 16)]
    pub store_max_connections: u32,
    /// PostgreSQL: seconds a request waits for a connection before it is answered 503.
    #[arg(long, env = "SANDWARDEN_STORE_ACQUIRE_TIMEOUT", default_value_t = 3)]
    pub store_acquire_timeout: u64,
    /// PostgreSQL: seconds any one statement may run (`statement_timeout`).
    #[arg(long, env = "SANDWARDEN_STORE_STATEMENT_TIMEOUT", default_value_t = 15)]
    pub store_statement_timeout: u64,
    /// This replica's id, recorded on the sandboxes it starts and the turns it runs (default:
    /// made once and kept in DATA_DIR/replica). Every replica needs its own.
    #[arg(long, env = "SANDWARDEN_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds a replica's claim on a webhook delivery lasts unrenewed; after that another
    /// replica takes the delivery over.
    #[arg(long, env = "SANDWARDEN_WEBHOOK_LEASE", default_value_t = 30)]
    pub webhook_lease: u64,
    /// Seconds this replica's heartbeat in the store lasts; the turns of a replica silent for
    /// longer (crashed, or removed) are ended as interrupted by another replica.
    #[arg(long, env = "SANDWARDEN_REPLICA_LEASE", default_value_t = 15)]
    pub replica_lease: u64,
    /// Live sessions a tenant may hold, unless its key says otherwise (0: no limit).
    #[arg(long, env = "SANDWARDEN_TENANT_SESSIONS", default_value_t = 100)]
    pub tenant_sessions: u64,
    /// Turns a tenant may run at once on this replica, unless its key says otherwise (0: no
    /// limit).
    #[arg(long, env = "SANDWARDEN_TENANT_TURNS", default_value_t = 50)]
    pub tenant_turns: u64,
    /// Event streams and terminals a tenant may hold open at once on this replica, unless its
    /// key says otherwise (0: no limit).
    #[arg(long, env = "SANDWARDEN_TENANT_STREAMS", default_value_t = 500)]
    pub tenant_streams: u64,
    /// MiB of memory a tenant's live sandboxes may be given together (each counts its
    /// template's `container.memory_mib`), unless its key says otherwise (0: no limit beyond
    /// the session quota).
    #[arg(
        long,
        env = "SANDWARDEN_TENANT_SANDBOX_MEMORY_MIB",
        default_value_t = 0
    )]
    pub tenant_sandbox_memory_mib: u64,
    /// Client connections counted against a tenant at once on this replica (from a
    /// connection's first request with the tenant's key until it closes), unless its key says
    /// otherwise (0: no limit). Over it the request is answered 429 and the connection closed.
    #[arg(long, env = "SANDWARDEN_TENANT_CONNECTIONS", default_value_t = 1000)]
    pub tenant_connections: u64,
    /// Requests of a tenant being answered at once on this replica (an event stream counts only
    /// until its headers), unless its key says otherwise (0: no limit).
    #[arg(long, env = "SANDWARDEN_TENANT_REQUESTS", default_value_t = 500)]
    pub tenant_requests: u64,
    /// Requests a second each API key may send, sustained, on this replica, unless its key
    /// says otherwise (0: no limit). Over it the request is answered 429 `rate_limited` with
    /// `Retry-After`.
    #[arg(long, env = "SANDWARDEN_KEY_REQUEST_RATE", default_value_t = 100)]
    pub key_request_rate: u64,
    /// Requests each key may send at once above its rate before it is held to it (0: twice the
    /// rate).
    #[arg(long, env = "SANDWARDEN_KEY_REQUEST_BURST", default_value_t = 0)]
    pub key_request_burst: u64,
    /// MiB of history and event pages a tenant may have being answered at once on this
    /// replica (a page counts twice its stored size until its answer is sent), unless its key
    /// says otherwise (0: no limit). Over it the request is answered 429.
    #[arg(long, env = "SANDWARDEN_TENANT_ANSWER_MIB", default_value_t = 128)]
    pub tenant_answer_mib: u64,
    /// MiB of history and event pages being answered at once, all tenants together (0: no
    /// cap). A page that does not fit waits for others to be sent, as long as a client may pause
    /// (`--client-timeout`), then is answered 503.
    #[arg(long, env = "SANDWARDEN_ANSWER_MEMORY_MIB", default_value_t = 512)]
    pub answer_memory_mib: u64,
    /// Client connections of everyone together (default: three quarters of the open-file
    /// limit, the rest kept for the store, sandboxes and logs; 0: no cap). At the cap no more are
    /// accepted until one closes; new ones wait in the listen backlog.
    #[arg(long, env = "SANDWARDEN_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// While at least three in four new connections are refused (401, 429), accept at most one
    /// per this many milliseconds (0: as fast as they come). A flood of connections that will
    /// only be told no then waits in the listen backlog instead of taking the CPU from other
    /// tenants' requests; established connections are not slowed.
    #[arg(long, env = "SANDWARDEN_REFUSED_PACE_MS", default_value_t = 1)]
    pub refused_pace_ms: u64,
    /// Live sessions of all tenants together (0: no limit).
    #[arg(long, env = "SANDWARDEN_MAX_SESSIONS", default_value_t = 2000)]
    pub max_sessions: u64,
    /// Record this server's secret as the one the store checks every replica against,
    /// replacing the one it was set up with (see docs/replicas.md: changing the secret).
    #[arg(long, env = "SANDWARDEN_ACCEPT_NEW_SECRET")]
    pub accept_new_secret: bool,
    /// Seconds a client may take to send a request's headers, or pause within its body, or leave
    /// a terminal's output unread; slower clients are disconnected (headers, terminals) or
    /// answered 408 (body).
    #[arg(long, env = "SANDWARDEN_CLIENT_TIMEOUT", default_value_t = 30)]
    pub client_timeout: u64,
}

/// Creates the data dir (and its parents) and makes it readable by this user only.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making the data dir {} private (0700)", dir.display()))
}

/// Holds `DIR/serve.lock` for as long as this `serve` runs: two servers on one data dir would
/// share its store, sockets and replica id and number one session's events twice. The lock is
/// the kernel's (`flock`), so it goes with the process however that ends; the file names the
/// holder's pid for the message a second server gives.
pub struct DataDirLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl DataDirLock {
    pub fn take(dir: &Path) -> anyhow::Result<DataDirLock> {
        use std::io::{Read, Seek, Write};
        let path = dir.join("serve.lock");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)?;
                lock.rewind()?;
                lock.write_all(std::process::id().to_string().as_bytes())?;
                Ok(DataDirLock(lock))
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                anyhow::bail!(
                    "another sandwarden serve{} is using the data dir {}: stop it first, or give                      this one its own --data-dir (every replica needs its own data dir, even when                      they share a PostgreSQL store)",
                    if holder.is_empty() {
                        String::new()
                    } else {
                        format!(" (pid {holder})")
                    },
                    dir.display()
                )
            }
            Err((_, e)) => Err(anyhow::anyhow!(
                "locking {} failed: {e}; the data dir must be on a file system that supports                  flock (a local disk, not NFS)",
                path.display()
            )),
        }
    }
}

/// A limit from a flag: 0 means none.
fn nonzero(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

/// Raises this process's soft open-file limit towards `want` (never past the hard limit);
/// processes it starts inherit it. Returns the soft and hard limits now.
pub fn raise_nofile(want: u64) -> anyhow::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
    let new = want.min(hard).max(soft);
    if new > soft {
        setrlimit(Resource::RLIMIT_NOFILE, new, hard).context("raising RLIMIT_NOFILE")?;
    }
    Ok((new, hard))
}

/// The cap on client connections (0: none): as given, else three quarters of the open-file
/// limit, keeping the rest for what serve opens itself (the store, sandboxes' pipes and
/// sockets, logs, webhooks). A cap past the limit is lowered to it, with a warning: beyond it
/// accepting would fail anyway, and the store with it.
fn connection_cap(given: Option<u64>, open_files: u64) -> u64 {
    let reserve = (open_files / 4).max(RESERVED_FILES.min(open_files / 2));
    let most = open_files.saturating_sub(reserve);
    match given {
        None => most,
        Some(0) => 0,
        Some(n) if n > most => {
            tracing::warn!(
                given = n,
                used = most,
                open_files,
                "--max-connections is more than the open-file limit leaves for connections; \
                 raise the hard limit (ulimit -Hn) to allow more"
            );
            most
        }
        Some(n) => n,
    }
}

/// New connections serve works on at once before their first request is let through or
/// answered (`http::ClientLimits::max_unsettled`): a flood of new connections waits in the
/// listen backlog, and established connections' requests do not queue behind it. 16, not 64:
/// `bench flood --connections 20000` on a 2-core machine with other jobs running (load 2.7-7), four
/// runs each, gave the other tenant's p99 during the flood 10.7-27.0 ms (3.0-6.2x quiet) at 16
/// against 21.0-57.4 ms (6.2-12.3x) at 64, the flood taking 6.6-14.5 s against 5.0-6.1 s; 4 and 1
/// were no better than 16 (8.7-27.5 ms). None meets the 2x target on that machine.
const UNSETTLED_CONNECTIONS: usize = 16;

/// Connections `--probe-listen` holds at once.
const PROBE_CONNECTIONS: usize = 64;
/// Seconds a connection to `--probe-listen` has to send its request's headers.
const PROBE_CLIENT_TIMEOUT_S: u64 = 2;

/// Fewest file descriptors kept for serve's own use when the limit allows it.
const RESERVED_FILES: u64 = 256;

fn default_data_dir() -> PathBuf {
    dirs::data_local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("sandwarden")
}

/// The server secret tokens are derived from: `SANDWARDEN_SECRET` (64 hex characters, the same
/// on every replica), else `DIR/secret`, created once, readable by its owner only.
fn load_secret(dir: &Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(text) = std::env::var("SANDWARDEN_SECRET") {
        return parse_secret(&text);
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("secret");
    match std::fs::read_to_string(&path) {
        Ok(text) => hex::decode(text.trim()).with_context(|| format!("{} is corrupt; delete it to make a new one (running sandboxes will need restarting)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = rand::random();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.write_all(hex::encode(secret).as_bytes())?;
            Ok(secret.to_vec())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `SANDWARDEN_SECRET`: 32 bytes as 64 hex characters (e.g. `openssl rand -hex 32`). The message
/// never repeats the value.
fn parse_secret(text: &str) -> anyhow::Result<Vec<u8>> {
    let text = text.trim();
    anyhow::ensure!(
        text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()),
        "SANDWARDEN_SECRET must be 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`; \
         the value given has {} characters{}",
        text.len(),
        if text.bytes().all(|b| b.is_ascii_hexdigit()) {
            ""
        } else {
            " and some are not hex digits"
        }
    );
    Ok(hex::decode(text)?)
}

/// This replica's id: given, or made once and kept in `DIR/replica`.
fn load_replica_id(given: Option<&str>, dir: &Path) -> anyhow::Result<String> {
    if let Some(id) = given.map(str::trim).filter(|s| !s.is_empty()) {
        anyhow::ensure!(
            id.len() <= 64 && !id.contains(char::is_whitespace),
            "--replica-id must be at most 64 characters without spaces"
        );
        return Ok(id.to_string());
    }
    let path = dir.join("replica");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = format!("r_{}", uuid::Uuid::new_v4().simple());
            std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
    }
}

fn load_templates(args: &ServeArgs) -> anyhow::Result<BTreeMap<String, Template>> {
    let mut templates: BTreeMap<String, Template> = builtin_templates()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    if let Some(path) = &args.templates {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --templates {}", path.display()))?;
        let extra: Vec<Template> = serde_json::from_str(&text).with_context(|| {
            format!(
                "--templates {} must be a JSON array of templates",
                path.display()
            )
        })?;
        for t in extra {
            t.validate()
                .map_err(|m| anyhow::anyhow!("--templates {}: {m}", path.display()))?;
            templates.insert(t.name.clone(), t);
        }
    }
    for entry in &args.pools {
        let (name, n) = entry
            .split_once('=')
            .and_then(|(name, n)| Some((name, n.parse::<usize>().ok()?)))
            .ok_or_else(|| {
                anyhow::anyhow!("--pool {entry:?} must look like NAME=N, e.g. echo=2")
            })?;
        let t = templates
            .get_mut(name)
            .ok_or_else(|| anyhow::anyhow!("--pool {entry:?}: there is no template {name:?}"))?;
        anyhow::ensure!(n <= 100, "--pool {entry:?}: at most 100");
        t.pool = n;
    }
    if let Some(name) = &args.default_template
        && args.runtime != RuntimeKind::Kubernetes
    {
        anyhow::ensure!(
            templates.contains_key(name),
            "--default-template {name:?}: there is no such template; available: {}",
            templates.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(templates)
}

/// Makes sure an admin key exists: SANDWARDEN_API_KEY if set (retiring any earlier key from
/// the environment: changing the variable and restarting rotates the admin key), else a
/// generated one printed once.
async fn ensure_admin_key(store: &Store) -> anyhow::Result<()> {
    match std::env::var("SANDWARDEN_API_KEY") {
        Ok(key) if !key.is_empty() => {
            anyhow::ensure!(
                key.len() >= 16,
                "SANDWARDEN_API_KEY must be at least 16 characters"
            );
            let hash = api::hash_key(&key);
            store
                .insert_key("default", &hash, true, "env", &Default::default())
                .await?;
            let retired = store.retire_env_keys(&hash).await?;
            if retired > 0 {
                tracing::info!(
                    retired,
                    "SANDWARDEN_API_KEY changed: the earlier admin key no longer works"
                );
            }
        }
        _ => {
            if !store.has_admin_key().await? {
                let key = api::new_key();
                store
                    .insert_key(
                        "default",
                        &api::hash_key(&key),
                        true,
                        "generated",
                        &Default::default(),
                    )
                    .await?;
                eprintln!(
                    "sandwarden: created the admin API key (shown only now; only its hash is stored):\n\n    export SANDWARDEN_API_KEY={key}\n"
                );
            }
        }
    }
    Ok(())
}

/// The cluster side of `--runtime kubernetes`.
struct Kubernetes {
    client: kube::Client,
    namespace: String,
    identity: String,
}

impl Kubernetes {
    async fn connect(args: &ServeArgs) -> anyhow::Result<Self> {
        let client = kube::Client::try_default().await.context(
            "cannot reach Kubernetes: run in a Pod with a service account, or set KUBECONFIG",
        )?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!(
                "{}-{}",
                host.trim(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            )
        });
        Ok(Kubernetes {
            client,
            namespace,
            identity,
        })
    }

    /// The namespace's SandboxTemplates, read once before serving (a watch keeps them current).
    async fn templates(&self) -> anyhow::Result<BTreeMap<String, Template>> {
        let api: kube::Api<SandboxTemplate> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let list = api.list(&Default::default()).await.with_context(|| {
            format!(
                "cannot list SandboxTemplates in namespace {:?}: are the CRDs installed (kubectl apply -k crds/) and may this service account read them?",
                self.namespace
            )
        })?;
        Ok(list
            .items
            .iter()
            .map(|t| (t.name_any(), t.to_template()))
            .collect())
    }

    /// Keeps the templates current, and runs the controllers while this replica leads.
    fn run(self, orch: Arc<Orchestrator>, tokens: Tokens, shutdown: CancellationToken) {
        crate::runtime::kubernetes::watch_templates(
            self.client.clone(),
            &self.namespace,
            move |templates| orch.set_templates(templates),
            shutdown.clone(),
        );
        let elector = Elector::new(
            kube::Api::namespaced(self.client.clone(), &self.namespace),
            crate::k8s::labels::LEASE,
            &self.identity,
            Timings::default(),
        );
        tracing::info!(namespace = %self.namespace, identity = %self.identity, "kubernetes runtime; electing a controller leader");
        tokio::spawn(elector.run(shutdown, move |stop| {
            let (client, namespace, tokens, identity) = (
                self.client.clone(),
                self.namespace.clone(),
                tokens.clone(),
                self.identity.clone(),
            );
            async move {
                crate::controller::run(client, &namespace, tokens, &identity, stop).await;
            }
        }));
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Settings are checked before anything is created.
    let egress =
        crate::egress::EgressPolicy::parse(&args.egress_allow).map_err(|m| anyhow::anyhow!(m))?;
    let isolation = match args.runtime {
        RuntimeKind::Local => args
            .isolation
            .resolve()
            .await
            .map_err(|m| anyhow::anyhow!(m))?,
        _ => Isolation::None,
    };
    // Every connection is a file descriptor: take all the kernel allows (the soft limit is
    // often 1024 of a hard 1,048,576), so a flood meets the per-tenant caps, not the limit.
    let open_files = match raise_nofile(u64::MAX) {
        Ok((soft, _)) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(1024, |(soft, _)| soft)
        }
    };
    let max_connections = connection_cap(args.max_connections, open_files);
    tracing::info!(
        open_files,
        max_connections,
        "open-file limit and connection cap"
    );
    // Everything serve writes (the store, the secret, sandboxes' directories) is its own.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    create_private_dir(&data_dir)?;
    let _lock = DataDirLock::take(&data_dir)?;
    let mut templates = load_templates(&args)?;
    let kubernetes = match args.runtime {
        RuntimeKind::Kubernetes => {
            anyhow::ensure!(
                args.templates.is_none() && args.pools.is_empty(),
                "with --runtime kubernetes, templates and warm pools are SandboxTemplate and SandboxWarmPool resources: drop --templates and --pool"
            );
            let k = Kubernetes::connect(&args).await?;
            templates = k.templates().await?;
            Some(k)
        }
        _ => None,
    };
    let tokens = Tokens::new(load_secret(&data_dir)?);
    let location = Location::parse(args.store.as_deref(), &data_dir)?;
    let options = crate::store::Options {
        replica: load_replica_id(args.replica_id.as_deref(), &data_dir)?,
        max_connections: args.store_max_connections.max(2),
        acquire_timeout: Duration::from_secs(args.store_acquire_timeout.max(1)),
        statement_timeout: Duration::from_secs(args.store_statement_timeout.max(1)),
    };
    let store = Store::connect(&location, &options)
        .await
        .with_context(|| format!("opening the store at {}", location.display()))?;
    tracing::info!(store = %location.display(), replica = %options.replica, "store open");
    if let Some(stored) = store
        .check_secret_fingerprint(&tokens.fingerprint(), args.accept_new_secret)
        .await?
    {
        anyhow::bail!(
            "this server's secret is not the one the store {} was set up with (fingerprint {} \
             here, {stored} in the store): sandboxes, terminal links and sealed webhook tokens \
             made under the other one would fail. Give every replica the same secret \
             (SANDWARDEN_SECRET, or the data dir's `secret` file); to replace the secret on \
             purpose, stop every replica and start one with --accept-new-secret (running \
             sandboxes then need restarting)",
            location.display(),
            tokens.fingerprint(),
        );
    }
    ensure_admin_key(&store).await?;

    let listener = sandwarden_proto::http::listen_tcp(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let probe_listener = match args.probe_listen {
        Some(at) => Some(
            sandwarden_proto::http::listen_tcp(at)
                .with_context(|| format!("cannot listen on {at} (--probe-listen)"))?,
        ),
        None => None,
    };
    let probe_addr = probe_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()?;

    let shutdown = CancellationToken::new();
    let (exits_tx, exits_rx) = tokio::sync::mpsc::unbounded_channel();
    let runtime = match args.runtime {
        RuntimeKind::Local => {
            tracing::info!(isolation = isolation.name(), "local sandboxes");
            if isolation == Isolation::None {
                tracing::warn!(
                    "local sandboxes are plain processes (--isolation none): an agent can read and \
                     do whatever this user can, including other sessions' data"
                );
            }
            Arc::new(LocalRuntime::new(
                &data_dir,
                tokens.clone(),
                exits_tx,
                isolation,
                crate::runtime::local::LocalOptions {
                    pass_env: args.pass_env.clone(),
                    egress,
                },
            )?) as Arc<dyn crate::runtime::Runtime>
        }
        RuntimeKind::Kubernetes => match &kubernetes {
            Some(k) => Arc::new(KubernetesRuntime::start(
                k.client.clone(),
                &k.namespace,
                exits_tx,
                shutdown.clone(),
            )),
            None => anyhow::bail!("the Kubernetes client is missing"),
        },
        RuntimeKind::Docker => Arc::new(
            DockerRuntime::connect(tokens.clone(), exits_tx, &data_dir, egress)
                .await
                .map_err(|m| anyhow::anyhow!(m))?,
        ),
    };
    let config = Config {
        public_url: args
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"))
            .trim_end_matches('/')
            .to_string(),
        allow_private_webhooks: args.allow_private_webhooks,
        default_template: args.default_template.clone(),
        tty_token_ttl: Duration::from_secs(args.tty_token_ttl.max(1)),
        allowed_origins: args.allowed_origins.clone(),
        console_dir: args.console_dir.clone(),
        webhook_lease: Duration::from_secs(args.webhook_lease.max(1)),
        replica_lease: Duration::from_secs(args.replica_lease.max(2)),
        client_timeout: Duration::from_secs(args.client_timeout.max(1)),
        default_limits: crate::session::quota::Limits {
            live_sessions: nonzero(args.tenant_sessions),
            concurrent_turns: nonzero(args.tenant_turns),
            open_streams: nonzero(args.tenant_streams),
            open_connections: nonzero(args.tenant_connections),
            concurrent_requests: nonzero(args.tenant_requests),
            message_parts: None,
            message_bytes: None,
            sandbox_memory_mib: nonzero(args.tenant_sandbox_memory_mib),
            answer_mib: nonzero(args.tenant_answer_mib),
            request_rate: nonzero(args.key_request_rate),
            request_burst: nonzero(args.key_request_burst),
            budget: None,
        },
        max_live_sessions: nonzero(args.max_sessions),
        answer_memory_mib: nonzero(args.answer_memory_mib),
    };
    let orch = Orchestrator::new(
        store,
        runtime,
        tokens.clone(),
        templates,
        config,
        shutdown.clone(),
    );
    if let Some(k) = kubernetes {
        k.run(orch.clone(), tokens, shutdown.clone());
    }
    orch.sync().await;
    let background = tokio::spawn(orch.clone().run_background(exits_rx));

    sandwarden_proto::http::announce_with(
        &addr.to_string(),
        probe_addr.map(|a| a.to_string()).as_deref(),
    );
    tracing::info!(%addr, data_dir = %data_dir.display(), runtime = ?args.runtime, "sandwarden serve listening");
    sandwarden_proto::http::cancel_on_signals(shutdown.clone())?;

    let app = api::router(orch.clone());
    let stopping = shutdown.clone();
    let limits = sandwarden_proto::http::ClientLimits {
        max_connections: nonzero(max_connections).map(|n| n as usize),
        max_unsettled: Some(UNSETTLED_CONNECTIONS),
        refused_pace: (args.refused_pace_ms > 0)
            .then(|| Duration::from_millis(args.refused_pace_ms)),
        ..sandwarden_proto::http::ClientLimits::seconds(args.client_timeout)
    };
    if let Some(probe_listener) = probe_listener {
        // Probes and scrapers hold a connection or two each and send their request at once: a
        // small cap, a short deadline (so idle sockets cannot hold the cap), no pacing.
        let probe_limits = sandwarden_proto::http::ClientLimits {
            max_connections: Some(PROBE_CONNECTIONS),
            ..sandwarden_proto::http::ClientLimits::seconds(PROBE_CLIENT_TIMEOUT_S)
        };
        tokio::spawn(sandwarden_proto::http::serve(
            probe_listener,
            api::probe_router(orch.clone()),
            probe_limits,
            shutdown.clone(),
        ));
    }
    let server = tokio::spawn(sandwarden_proto::http::serve(
        listener, app, limits, stopping,
    ));
    shutdown.cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), background).await;
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(())) => {}
        _ => tracing::warn!("connections still open at shutdown; closing them"),
    }
    if let Err(e) = orch.store.flush().await {
        tracing::error!(error = %e, "flushing the store at shutdown failed");
    }
    Ok(())
}
