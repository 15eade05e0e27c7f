//! The docker runtime: each sandbox is a container of a harness image, driven through the Docker
//! Engine API (Docker, or Podman's compatible socket) with bollard.
//!
//! Containers carry labels naming the server that owns them (a digest of its secret), the sandbox
//! and the template, so a restarted `serve` finds its containers again. The engine's event stream
//! reports deaths at once. The runtime knows templates and containers; it must not know sessions.
//!
//! Each container holds the network boundary of a confined local sandbox (`super::sandbox_net`):
//! network mode `none` (loopback only), the harness on a Unix socket in a directory of the
//! container's user that `serve` takes over once it appears, and the egress proxy's socket,
//! mounted read-only, as its one way out. docs/security.md is the threat model.

use super::sandbox_net::{
    EGRESS_INSIDE, EgressProxies, HARNESS_SOCKET, SOCKETS_INSIDE, SocketDirs, egress_flags,
    private_dir, proxy_env,
};
use super::{Runtime, RuntimeError, Sandbox};
use crate::egress::EgressPolicy;
use crate::k8s::labels;
use crate::template::Template;
use crate::tokens::Tokens;
use backon::{ExponentialBuilder, Retryable};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CreateContainerOptions, EventsOptions, InspectContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions,
};
use futures::StreamExt;
use sandwarden_proto::event::Phase;
use sandwarden_proto::harness_client::HarnessClient;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Where the sandbox's writable working directory (a volume) is mounted; also its HOME.
pub const WORKDIR: &str = "/work";

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT_S: i32 = 3;
/// The longest failure reason taken from a harness.
const REASON_MAX_CHARS: usize = 1024;

pub struct DockerRuntime {
    docker: Docker,
    tokens: Tokens,
    /// The value of the owner label on this server's containers.
    owner: String,
    http: reqwest::Client,
    /// Each container's harness socket directory (`DATA_DIR/sockets/<id>`), where `serve` moves
    /// the socket (`DATA_DIR/run/<id>.sock`), and its egress socket's (`DATA_DIR/egress/<id>`).
    net: SocketDirs,
    proxies: EgressProxies,
}

/// The numeric user and group of a template's `container.user` (`uid:gid`, or `uid`): the owner
/// of the container's socket directory, and of the harness's socket `serve` takes over.
fn container_ids(user: &str) -> Result<(u32, u32), RuntimeError> {
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    match (uid.trim().parse(), gid.trim().parse()) {
        (Ok(uid), Ok(gid)) => Ok((uid, gid)),
        _ => Err(RuntimeError::Start(format!(
            "the docker runtime needs a numeric container.user (\"uid:gid\", e.g. \"10001:10001\"), not {user:?}"
        ))),
    }
}

/// A bind mount of `source` (a host directory) at `target`.
fn bind(source: &Path, target: &str, read_only: bool) -> Mount {
    Mount {
        target: Some(target.into()),
        source: Some(source.display().to_string()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// The container name of a sandbox.
pub fn container_name(sandbox_id: &str) -> String {
    format!("sandwarden-{sandbox_id}")
}

fn engine_error(what: &str, e: bollard::errors::Error) -> RuntimeError {
    RuntimeError::Start(format!("{what}: {e}"))
}

fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl DockerRuntime {
    /// Connects to the engine named by `DOCKER_HOST` (or the default socket), checks it answers,
    /// and starts reporting container deaths on `exits`. Sandboxes' sockets live under
    /// `data_dir`; their egress proxies decide by `egress`.
    pub async fn connect(
        tokens: Tokens,
        exits: mpsc::UnboundedSender<String>,
        data_dir: &Path,
        egress: EgressPolicy,
    ) -> Result<DockerRuntime, String> {
        // The engine mounts the sockets' directories by absolute path.
        let data_dir = data_dir
            .canonicalize()
            .map_err(|e| format!("cannot use the data dir {}: {e}", data_dir.display()))?;
        let net = SocketDirs::create(&data_dir).map_err(|e| e.to_string())?;
        let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "the default socket".into());
        let docker = Docker::connect_with_defaults()
            .map_err(|e| format!("cannot use the container engine at {host}: {e}"))?;
        docker.ping().await.map_err(|e| {
            format!(
                "the container engine at {host} does not answer ({e}); start Docker, or Podman's \
                 API service (`podman system service --time=0 unix:///run/podman/podman.sock`) \
                 and set DOCKER_HOST=unix:///run/podman/podman.sock"
            )
        })?;
        let owner = tokens.derive("owner", "")[..16].to_string();
        let runtime = DockerRuntime {
            docker,
            tokens,
            owner,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
            proxies: EgressProxies::new(net.egress.clone(), egress),
            net,
        };
        tokio::spawn(watch_deaths(
            runtime.docker.clone(),
            runtime.owner.clone(),
            exits,
        ));
        Ok(runtime)
    }

    fn labels(&self, id: &str, t: &Template) -> HashMap<String, String> {
        HashMap::from([
            ("app.kubernetes.io/name".into(), "sandwarden-sandbox".into()),
            ("app.kubernetes.io/component".into(), "harness".into()),
            (labels::MANAGED_BY.into(), labels::MANAGER.into()),
            ("app.kubernetes.io/instance".into(), id.to_string()),
            (labels::OWNER.into(), self.owner.clone()),
            (labels::SANDBOX.into(), id.to_string()),
            (labels::TEMPLATE.into(), t.name.clone()),
        ])
    }

    /// The container's definition: the template's image, command, env and limits, with the
    /// secure defaults of `ContainerSpec`; loopback only, with the harness's socket directory
    /// `sockets` and the egress proxy's `egress` mounted.
    fn definition(
        &self,
        id: &str,
        t: &Template,
        sockets: &Path,
        egress: &Path,
    ) -> ContainerCreateBody {
        let c = &t.container;
        let mut env: Vec<String> = t.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        env.extend(proxy_env().into_iter().map(|(k, v)| format!("{k}={v}")));
        env.push(format!("SANDWARDEN_TOKEN={}", self.tokens.for_sandbox(id)));
        env.push(format!("HOME={WORKDIR}"));
        env.push(format!(
            "SANDWARDEN_LOG={}",
            std::env::var("SANDWARDEN_SANDBOX_LOG").unwrap_or_else(|_| "warn".into())
        ));
        let listen = format!("unix:{SOCKETS_INSIDE}/{HARNESS_SOCKET}");
        let mut cmd = t.harness_flags(&listen, WORKDIR);
        cmd.extend(egress_flags(self.proxies.policy()));
        let memory = i64::try_from(c.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX);
        ContainerCreateBody {
            image: Some(t.image()),
            cmd: Some(cmd),
            env: Some(env),
            user: Some(c.user.clone()),
            working_dir: Some(WORKDIR.into()),
            labels: Some(self.labels(id, t)),
            // An anonymous volume: writable even with a read-only root, removed with the container.
            volumes: Some(vec![WORKDIR.into()]),
            stop_timeout: Some(i64::from(STOP_TIMEOUT_S)),
            host_config: Some(HostConfig {
                // Loopback only: the egress socket is the one way out.
                network_mode: Some("none".into()),
                mounts: Some(vec![
                    bind(sockets, SOCKETS_INSIDE, false),
                    bind(egress, EGRESS_INSIDE, true),
                ]),
                cap_drop: Some(vec!["ALL".into()]),
                security_opt: Some(vec!["no-new-privileges".into()]),
                readonly_rootfs: Some(c.read_only),
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_string(),
                    "rw,nosuid,nodev,size=256m".to_string(),
                )])),
                memory: Some(memory),
                nano_cpus: Some((c.cpus * 1e9) as i64),
                pids_limit: Some(c.pids),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The last lines the container printed, for a start failure's message.
    async fn tail(&self, name: &str) -> String {
        let mut logs = self.docker.logs(
            name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "20".into(),
                ..Default::default()
            }),
        );
        let mut out = String::new();
        while let Ok(Some(Ok(chunk))) =
            tokio::time::timeout(Duration::from_secs(2), logs.next()).await
        {
            out.push_str(&chunk.to_string());
        }
        out.trim().to_string()
    }

    /// Waits until the harness has made its socket, takes the socket over (it must be the
    /// container user `uid`'s), then waits until the harness answers its health check over it
    /// with a health body, in any phase but `failed`: a `start: bind` harness waits in `standby`
    /// (answering 503) for the bind that starts its agent, and a booting agent is `starting`; the
    /// session layer waits for the phase it needs. A harness that reports `failed` fails the
    /// start at once with its reason, and a container that stops fails it with what the container
    /// printed. Returns the endpoint (`unix:DATA_DIR/run/<id>.sock`).
    async fn wait_ready(&self, id: &str, name: &str, uid: u32) -> Result<String, RuntimeError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut client = None;
        loop {
            if client.is_none() && self.net.harness_made(id) {
                let socket = self.net.take_socket(id, uid)?;
                client = Some(HarnessClient::with_http(
                    self.http.clone(),
                    format!("unix:{}", socket.display()),
                    self.tokens.for_sandbox(id),
                ));
            }
            let health = match &client {
                Some(client) => Some(client.health().await),
                None => None,
            };
            match health {
                Some(Ok(health)) if health.phase == Phase::Failed => {
                    // The sandbox's words, kept short: they end up in the session's record.
                    let reason: String = health
                        .reason
                        .as_deref()
                        .unwrap_or("it gave no reason")
                        .chars()
                        .take(REASON_MAX_CHARS)
                        .collect();
                    return Err(RuntimeError::Start(format!("the harness failed: {reason}")));
                }
                Some(Ok(_)) => {
                    return Ok(client.map(|c| c.endpoint().to_string()).unwrap_or_default());
                }
                // Not listening yet, or not the harness (no health body): ask again.
                _ => {}
            }
            if !self.running(name).await.unwrap_or(true) {
                return Err(RuntimeError::Start(format!(
                    "the container stopped before its harness answered; it printed: {}",
                    self.tail(name).await
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::StartTimeout(READY_TIMEOUT.as_secs()));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Whether the container runs. A state bollard cannot read (Podman 4 reports a container
    /// between its death and its cleanup as `stopped`, which the Docker API does not know) is not
    /// running; an engine that cannot be asked is an error, not a death.
    async fn running(&self, name: &str) -> Result<bool, bollard::errors::Error> {
        match self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => Ok(info.state.and_then(|s| s.running).unwrap_or(false)),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(bollard::errors::Error::JsonDataError { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes sandbox `id`'s socket directory, owned by the container's user, and starts its
    /// egress proxy; returns both directories (to mount) and the user.
    fn open_net(&self, id: &str, t: &Template) -> Result<(PathBuf, PathBuf, u32), RuntimeError> {
        let (uid, gid) = container_ids(&t.container.user)?;
        let sockets = self.net.harness_dir(id);
        private_dir(&sockets)?;
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&sockets, Some(uid), Some(gid)).map_err(|e| {
                RuntimeError::Start(format!(
                    "cannot give the container's user {uid}:{gid} its socket directory ({e})"
                ))
            })?;
        } else {
            // `serve` cannot give the directory away: the container's user may write it, and
            // the data dir above it (0700) keeps everyone else on the host out.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o777))?;
        }
        let egress = self.proxies.open(id, Some(uid))?;
        Ok((sockets, egress, uid))
    }

    /// Ends what is left of sandbox `id` besides its container: its egress proxy, its socket
    /// directories and its harness's socket.
    async fn clean_up(&self, id: &str) {
        self.proxies.close(id);
        self.net.remove(id).await;
    }

    async fn remove(&self, name: &str) {
        let removed = self
            .docker
            .remove_container(
                name,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
        if let Err(e) = removed
            && !is_not_found(&e)
        {
            tracing::warn!(container = name, error = %e, "removing a container failed");
        }
    }
}

/// Reports the death (exit, OOM kill, removal) of this server's containers as it happens, by
/// sandbox id. Reconnects with backoff when the engine's stream ends.
async fn watch_deaths(docker: Docker, owner: String, exits: mpsc::UnboundedSender<String>) {
    let filters = HashMap::from([
        ("type".to_string(), vec!["container".to_string()]),
        (
            "event".to_string(),
            vec!["die".into(), "oom".into(), "destroy".into()],
        ),
        (
            "label".to_string(),
            vec![format!("{}={owner}", labels::OWNER)],
        ),
    ]);
    loop {
        let mut events = docker.events(Some(EventsOptions {
            filters: Some(filters.clone()),
            ..Default::default()
        }));
        while let Some(event) = events.next().await {
            let Ok(event) = event else { break };
            let sandbox = event
                .actor
                .and_then(|a| a.attributes)
                .and_then(|a| a.get(labels::SANDBOX).cloned());
            if let Some(id) = sandbox
                && exits.send(id).is_err()
            {
                return; // serve is stopping
            }
        }
        if exits.is_closed() {
            return;
        }
        // The engine restarted or the stream broke: reconnect once it answers again.
        let ping = || async { docker.ping().await };
        let _ = ping
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .without_max_times(),
            )
            .await;
    }
}

#[async_trait::async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn egress_proxies(&self) -> Option<&EgressProxies> {
        Some(&self.proxies)
    }

    fn isolation(&self) -> &'static str {
        "container"
    }

    async fn create(&self, id: &str, t: &Template) -> Result<Sandbox, RuntimeError> {
        let name = container_name(id);
        let (sockets, egress, uid) = match self.open_net(id, t) {
            Ok(opened) => opened,
            Err(e) => {
                self.clean_up(id).await;
                return Err(e);
            }
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                self.definition(id, t, &sockets, &egress),
            )
            .await;
        if let Err(e) = created {
            self.clean_up(id).await;
            let hint = if is_not_found(&e) {
                format!(
                    " (build it with `harness-images/build.sh {}`, or set the template's container.image)",
                    t.name
                )
            } else {
                String::new()
            };
            return Err(RuntimeError::Start(format!(
                "creating a container of {} failed: {e}{hint}",
                t.image()
            )));
        }
        let started = async {
            self.docker
                .start_container(&name, None)
                .await
                .map_err(|e| engine_error("starting the container failed", e))?;
            self.wait_ready(id, &name, uid).await
        }
        .await;
        match started {
            Ok(endpoint) => Ok(Sandbox {
                id: id.to_string(),
                template: t.name.clone(),
                endpoint,
                pid: None,
            }),
            Err(e) => {
                self.remove(&name).await;
                self.clean_up(id).await;
                Err(e)
            }
        }
    }

    async fn adopt(&self, sandbox: &Sandbox) {
        // The adopted container's way out died with the last `serve`: a new proxy on the same
        // socket path, which its mount of the directory shows it, owned by the container's user.
        let name = container_name(&sandbox.id);
        let user = match self
            .docker
            .inspect_container(&name, None::<InspectContainerOptions>)
            .await
        {
            Ok(info) => info.config.and_then(|c| c.user).unwrap_or_default(),
            Err(e) => {
                tracing::warn!(sandbox = %sandbox.id, error = %e, "cannot inspect the adopted container");
                return;
            }
        };
        let opened = container_ids(&user).and_then(|(uid, _)| {
            self.proxies
                .open(&sandbox.id, Some(uid))
                .map_err(Into::into)
        });
        if let Err(e) = opened {
            tracing::warn!(sandbox = %sandbox.id, error = %e, "the adopted container's egress proxy could not be opened");
        }
    }

    async fn destroy(&self, sandbox: &Sandbox) {
        self.remove(&container_name(&sandbox.id)).await;
        self.clean_up(&sandbox.id).await;
    }

    async fn alive(&self, sandbox: &Sandbox) -> bool {
        match self.running(&container_name(&sandbox.id)).await {
            Ok(running) => running,
            Err(e) => {
                // Deaths arrive on the event stream; an unreachable engine kills no session.
                tracing::warn!(sandbox = %sandbox.id, error = %e, "cannot ask the engine about a container");
                true
            }
        }
    }

    async fn owned(&self) -> Vec<String> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{}={}", labels::OWNER, self.owner)],
        )]);
        // Retried: a listing fails as a whole while any container is in Podman's transient
        // `stopped` state, which bollard cannot read.
        let list = || async {
            self.docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: Some(filters.clone()),
                    ..Default::default()
                }))
                .await
        };
        let listed = list
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(100))
                    .with_max_times(6),
            )
            .await;
        match listed {
            Ok(containers) => containers
                .into_iter()
                .filter_map(|c| c.labels.and_then(|l| l.get(labels::SANDBOX).cloned()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing containers failed");
                Vec::new()
            }
        }
    }
}
