//! A sandbox's network boundary, shared by the local and docker runtimes: the harness's socket
//! taken over out of the sandbox's reach, the per-sandbox egress proxy, and the flags and
//! environment that point a sandbox at its way out.
//!
//! A sandbox holds loopback only. `serve` reaches its harness over a Unix socket the harness makes
//! in a directory of the sandbox's, moved once it listens into `DATA_DIR/run/` (which no sandbox
//! sees). Its one way out is `crate::egress`'s proxy on a socket in `DATA_DIR/egress/<id>/`. This
//! module knows paths and sockets; it must not know templates, sessions or how a sandbox is started.

use super::RuntimeError;
use crate::egress::EgressPolicy;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where the harness makes its socket, inside a sandbox.
pub const SOCKETS_INSIDE: &str = "/run/sandwarden/harness";
/// Where the egress proxy's socket's directory is mounted (read-only), inside a sandbox.
pub const EGRESS_INSIDE: &str = "/run/sandwarden/egress";
/// The harness's socket, in `SOCKETS_INSIDE` and in the sandbox's sockets dir outside.
pub const HARNESS_SOCKET: &str = "h.sock";
/// The egress proxy's socket, in `EGRESS_INSIDE` and in the sandbox's egress dir outside.
pub const EGRESS_SOCKET: &str = "e.sock";
/// The HTTP proxy's address inside a sandbox (`HTTPS_PROXY`).
pub const PROXY_INSIDE: &str = "127.0.0.1:3128";

/// The longest path a Unix socket address holds (`sun_path`, with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// A sandbox id's length: `sbx_` and 32 hex digits (as `session` makes them).
const SANDBOX_ID_LEN: usize = 36;

/// Creates `dir` (and its parents) readable by its owner only.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The data dir's places for sandboxes' sockets: where each harness makes its socket
/// (`sockets/<id>/`), where `serve` moves it (`run/<id>.sock`) and where each egress proxy
/// listens (`egress/<id>/`).
#[derive(Debug, Clone)]
pub struct SocketDirs {
    pub sockets: PathBuf,
    pub run: PathBuf,
    pub egress: PathBuf,
}

impl SocketDirs {
    /// Makes the three directories under `data_dir` (private), after checking that a sandbox's
    /// socket path fits a socket address.
    pub fn create(data_dir: &Path) -> std::io::Result<SocketDirs> {
        let run = data_dir.join("run");
        // `sockets/<sandbox id>/h.sock` (where a harness makes it), `egress/<sandbox id>/e.sock`
        // and `run/<sandbox id>.sock` must fit a socket address.
        let longest = MAX_SOCKET_PATH
            - SANDBOX_ID_LEN
            - 1
            - ("/sockets/".len() + HARNESS_SOCKET.len())
                .max("/egress/".len() + EGRESS_SOCKET.len());
        if data_dir.as_os_str().len() > longest {
            return Err(std::io::Error::other(format!(
                "the data dir {} is too long for the sandboxes' sockets (at most {longest} characters); choose a shorter --data-dir",
                data_dir.display(),
            )));
        }
        let dirs = SocketDirs {
            sockets: data_dir.join("sockets"),
            run,
            egress: data_dir.join("egress"),
        };
        for dir in [&dirs.sockets, &dirs.run, &dirs.egress] {
            private_dir(dir)?;
        }
        Ok(dirs)
    }

    /// The directory sandbox `id`'s harness makes its socket in.
    pub fn harness_dir(&self, id: &str) -> PathBuf {
        self.sockets.join(id)
    }

    /// Where `serve` keeps sandbox `id`'s harness socket once taken over.
    pub fn taken(&self, id: &str) -> PathBuf {
        self.run.join(format!("{id}.sock"))
    }

    /// Whether the harness of sandbox `id` has made its socket (not yet taken over).
    pub fn harness_made(&self, id: &str) -> bool {
        std::fs::symlink_metadata(self.harness_dir(id).join(HARNESS_SOCKET)).is_ok()
    }

    /// The harness's socket, moved out of the sandbox's reach: `run/<id>.sock`. Refuses
    /// anything but a socket of the sandbox's own user `uid` (a link put in its place, say).
    pub fn take_socket(&self, id: &str, uid: u32) -> Result<PathBuf, RuntimeError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let made = self.harness_dir(id).join(HARNESS_SOCKET);
        let socket = self.taken(id);
        std::fs::rename(&made, &socket).map_err(|e| {
            RuntimeError::Start(format!("the harness's socket could not be taken over: {e}"))
        })?;
        let meta = std::fs::symlink_metadata(&socket)?;
        if !meta.file_type().is_socket() || meta.uid() != uid {
            let _ = std::fs::remove_file(&socket);
            return Err(RuntimeError::Start(
                "the sandbox put something other than its harness's socket in its place".into(),
            ));
        }
        Ok(socket)
    }

    /// Removes sandbox `id`'s socket directories and its taken-over socket (idempotent).
    pub async fn remove(&self, id: &str) {
        for (base, dir) in [
            (&self.sockets, self.sockets.join(id)),
            (&self.egress, self.egress.join(id)),
        ] {
            if dir.starts_with(base) && dir != *base {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
        let _ = tokio::fs::remove_file(self.taken(id)).await;
    }
}

/// The egress proxies of a runtime's sandboxes, one per sandbox, deciding by one policy.
pub struct EgressProxies {
    dir: PathBuf,
    policy: Arc<EgressPolicy>,
    running: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Each running proxy's narrowing, which its sandbox's session may set.
    narrowings: Mutex<HashMap<String, Arc<crate::egress::NarrowingCell>>>,
}

impl EgressProxies {
    /// Proxies listening under `dir` (`DATA_DIR/egress`), deciding by `policy`.
    pub fn new(dir: PathBuf, policy: EgressPolicy) -> EgressProxies {
        EgressProxies {
            dir,
            policy: Arc::new(policy),
            running: Mutex::new(HashMap::new()),
            narrowings: Mutex::new(HashMap::new()),
        }
    }

    /// Where sandbox `id`'s narrowing is kept, so a restarted `serve` holds an adopted sandbox
    /// to it: beside the directory mounted into the sandbox, not in it.
    fn narrowing_file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.narrowing.json"))
    }

    /// Narrows sandbox `id`'s egress to `to` (or, with `None`, lifts a narrowing), ending the
    /// connections its proxy holds, and keeps it for a restarted `serve`.
    pub fn narrow(&self, id: &str, to: Option<crate::egress::Narrowing>) -> std::io::Result<()> {
        let cell = lock(&self.narrowings).get(id).cloned().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("sandbox {id} has no egress proxy"),
            )
        })?;
        match &to {
            Some(to) => {
                let text = serde_json::to_string(to.given()).unwrap_or_else(|_| "[]".into());
                std::fs::write(self.narrowing_file(id), text)?;
            }
            None => match std::fs::remove_file(self.narrowing_file(id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            },
        }
        cell.set(to);
        Ok(())
    }

    /// Whether sandbox `id` is held to a narrowing (its session's, kept across a restart).
    pub fn is_narrowed(&self, id: &str) -> bool {
        self.narrowing_file(id).exists()
    }

    /// The narrowing kept for sandbox `id`, if its session set one before a restart.
    fn kept_narrowing(&self, id: &str) -> Option<crate::egress::Narrowing> {
        let text = std::fs::read_to_string(self.narrowing_file(id)).ok()?;
        let given: Vec<String> = match serde_json::from_str(&text) {
            Ok(given) => given,
            Err(e) => {
                // Unreadable: the narrowest reading (the operator's hosts only), never a wider one.
                tracing::warn!(sandbox = %id, error = %e, "a kept egress narrowing is unreadable; allowing none of the public hosts");
                Vec::new()
            }
        };
        Some(crate::egress::Narrowing::parse(&given).unwrap_or_default())
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// Starts the egress proxy for sandbox `id` on a socket in its own directory, owned by `uid`
    /// (else by `serve`'s user); returns the directory, to be mounted read-only into the
    /// sandbox. A proxy already running for `id` is replaced (an adopted sandbox's).
    pub fn open(&self, id: &str, uid: Option<u32>) -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.join(id);
        private_dir(&dir)?;
        // The sandbox's user passes through the directory to reach the socket, which is its own.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        let listener = crate::egress::bind(&dir.join(EGRESS_SOCKET), uid)?;
        let cell = crate::egress::NarrowingCell::new(self.kept_narrowing(id));
        lock(&self.narrowings).insert(id.to_string(), cell.clone());
        let task = crate::egress::serve(listener, id.to_string(), self.policy.clone(), cell);
        if let Some(old) = lock(&self.running).insert(id.to_string(), task) {
            old.abort();
        }
        Ok(dir)
    }

    /// Stops sandbox `id`'s proxy, if one runs, and forgets its narrowing.
    pub fn close(&self, id: &str) {
        if let Some(proxy) = lock(&self.running).remove(id) {
            proxy.abort();
        }
        lock(&self.narrowings).remove(id);
        let _ = std::fs::remove_file(self.narrowing_file(id));
    }
}

/// The harness flags that relay a sandbox's way out through the egress socket: the HTTP proxy at
/// `PROXY_INSIDE`, and each allowed loopback address with a port at the same address inside.
pub fn egress_flags(policy: &EgressPolicy) -> Vec<String> {
    let mut flags = vec![
        "--egress-socket".to_string(),
        Path::new(EGRESS_INSIDE)
            .join(EGRESS_SOCKET)
            .display()
            .to_string(),
        "--egress-proxy".to_string(),
        PROXY_INSIDE.to_string(),
    ];
    let proxy: Option<SocketAddr> = PROXY_INSIDE.parse().ok();
    for forward in policy.loopback_forwards() {
        if Some(forward) != proxy {
            flags.push("--egress-forward".into());
            flags.push(forward.to_string());
        }
    }
    flags
}

/// The variables that point a sandbox's clients at its proxy, and keep its loopback direct.
pub fn proxy_env() -> Vec<(String, String)> {
    let proxy = format!("http://{PROXY_INSIDE}");
    let mut env: Vec<(String, String)> = ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"]
        .iter()
        .map(|var| (var.to_string(), proxy.clone()))
        .collect();
    for var in ["NO_PROXY", "no_proxy"] {
        env.push((var.into(), "localhost,127.0.0.1,::1".into()));
    }
    env
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_egress_flags_relay_the_proxy_and_each_allowed_loopback_port() {
        let policy = EgressPolicy::parse(&[
            "127.0.0.1:8080".to_string(),
            "127.0.0.1:3128".to_string(),
            "example.com".to_string(),
        ])
        .expect("policy");
        assert_eq!(
            egress_flags(&policy),
            [
                "--egress-socket",
                "/run/sandwarden/egress/e.sock",
                "--egress-proxy",
                "127.0.0.1:3128",
                "--egress-forward",
                "127.0.0.1:8080",
            ]
        );
    }

    #[tokio::test]
    async fn a_narrowing_is_kept_for_the_next_serve_and_goes_with_the_sandbox() {
        let data = tempfile::tempdir().expect("tempdir");
        let narrowed = || {
            crate::egress::Narrowing::parse(&["allowed.example".to_string()]).expect("narrowing")
        };
        let first = EgressProxies::new(data.path().join("egress"), EgressPolicy::default());
        private_dir(&data.path().join("egress")).expect("dir");
        first.open("s1", None).expect("open");
        first.narrow("s1", Some(narrowed())).expect("narrow");
        assert!(first.narrow("unknown", Some(narrowed())).is_err());
        assert!(first.is_narrowed("s1"));
        // A restarted serve opens the adopted sandbox's proxy again: the narrowing holds.
        let second = EgressProxies::new(data.path().join("egress"), EgressPolicy::default());
        second.open("s1", None).expect("reopen");
        let cell = lock(&second.narrowings).get("s1").cloned().expect("cell");
        assert_eq!(cell.get(), Some(narrowed()));
        // Lifted, it is gone from the disk too.
        second.narrow("s1", None).expect("lift");
        assert_eq!(cell.get(), None);
        assert!(!second.is_narrowed("s1"));
        second.narrow("s1", Some(narrowed())).expect("narrow again");
        second.close("s1");
        assert!(!second.narrowing_file("s1").exists());
        first.close("s1");
    }

    #[test]
    fn a_taken_socket_must_be_the_sandboxs_own_socket() {
        let data = tempfile::tempdir().expect("tempdir");
        let dirs = SocketDirs::create(data.path()).expect("dirs");
        let me = nix::unistd::geteuid().as_raw();
        // A link in the socket's place is refused and removed.
        private_dir(&dirs.harness_dir("a")).expect("dir");
        std::os::unix::fs::symlink("/etc/passwd", dirs.harness_dir("a").join(HARNESS_SOCKET))
            .expect("link");
        assert!(dirs.take_socket("a", me).is_err());
        assert!(!dirs.taken("a").exists());
        // A socket of another user is refused; one of the sandbox's is taken over.
        private_dir(&dirs.harness_dir("b")).expect("dir");
        let _listener =
            std::os::unix::net::UnixListener::bind(dirs.harness_dir("b").join(HARNESS_SOCKET))
                .expect("bind");
        assert!(dirs.harness_made("b"));
        let taken = dirs.take_socket("b", me).expect("taken over");
        assert_eq!(taken, dirs.taken("b"));
        assert!(!dirs.harness_made("b"));
        private_dir(&dirs.harness_dir("c")).expect("dir");
        let _other =
            std::os::unix::net::UnixListener::bind(dirs.harness_dir("c").join(HARNESS_SOCKET))
                .expect("bind");
        assert!(dirs.take_socket("c", me.wrapping_add(1)).is_err());
    }
}
