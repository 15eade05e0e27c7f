//! The local runtime: each sandbox is a `sandwarden harness` child process reached over a Unix
//! socket, with its own token, working directory and HOME under the data dir.
//!
//! Sandboxes lead their own process group. Exits of children started here are reported at once
//! on a channel. Plain sandboxes (`--isolation none`) outlive a restart of `serve`, which adopts
//! them again from the store; confined ones end with `serve`.
//!
//! Under bubblewrap (the default where it works) a sandbox is built for itself alone: a file
//! system of the system's directories read-only, its own working dir, HOME and `/tmp`, and nothing
//! else of the host or the data dir; its own PID, network, IPC and UTS namespaces; no capability
//! and no way to gain one (a user of its own when `serve` runs as root, a user namespace when it
//! does not); memory, process and CPU limits from cgroups where `serve` may make them. Its only
//! way out is the egress proxy's socket (`crate::egress`). docs/security.md is the threat model.

use super::cgroup::Cgroups;
use super::sandbox_net::{
    EGRESS_INSIDE, EgressProxies, HARNESS_SOCKET, SOCKETS_INSIDE, SocketDirs, egress_flags,
    private_dir, proxy_env,
};
use super::{Runtime, RuntimeError, Sandbox};
use crate::egress::EgressPolicy;
use crate::template::Template;
use crate::tokens::Tokens;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use sandwarden_harness::binary::HarnessProgram;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const LISTEN_TIMEOUT: Duration = Duration::from_secs(15);
const STOP_GRACE: Duration = Duration::from_secs(3);

/// How local sandboxes are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// Plain child processes: the agent can do what the user running `serve` can.
    None,
    /// Under bubblewrap (`bwrap`, Debian package `bubblewrap`); `serve` refuses to start if it
    /// does not work here.
    Bwrap,
    /// bubblewrap when it works here, plain processes (with a warning) otherwise.
    Auto,
}

impl Isolation {
    /// The name reported at start and on every session.
    pub fn name(self) -> &'static str {
        match self {
            Isolation::None => "none",
            Isolation::Bwrap => "bwrap",
            Isolation::Auto => "auto",
        }
    }

    /// Settles `auto` and checks `bwrap` by starting a sandbox built as real ones are (every
    /// namespace, and the user switch when `serve` runs as root); the error says how to fix it.
    pub async fn resolve(self) -> Result<Isolation, String> {
        if self == Isolation::None {
            return Ok(self);
        }
        let problem = match probe().await {
            Ok(()) => return Ok(Isolation::Bwrap),
            Err(problem) => problem,
        };
        match self {
            Isolation::Auto => {
                tracing::warn!(
                    reason = %problem,
                    "SANDBOXES ARE NOT ISOLATED: bubblewrap cannot confine them here, so every agent \
                     runs as a plain process that can read and do whatever this user can (install \
                     the bubblewrap package, or use --runtime docker)"
                );
                Ok(Isolation::None)
            }
            _ => Err(format!(
                "{problem} (or start serve with --isolation none to run sandboxes as plain processes)"
            )),
        }
    }
}

/// `name` on `serve`'s `PATH`, as an absolute path.
fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_absolute() && p.is_file())
    })
}

/// bubblewrap, and (when `serve` runs as root) util-linux's setpriv, which must be where a
/// sandbox sees it: under a system directory.
fn confinement_programs() -> Result<(PathBuf, PathBuf), String> {
    let bwrap = find_program("bwrap").ok_or_else(|| {
        "bwrap cannot be run (it is not on PATH); install the bubblewrap package".to_string()
    })?;
    let setpriv = find_program("setpriv")
        .filter(|p| SYSTEM_DIRS.iter().any(|d| p.starts_with(d)))
        .ok_or_else(|| {
            "setpriv (util-linux) is not in a system directory on PATH; install util-linux"
                .to_string()
        })?;
    Ok((bwrap, setpriv))
}

/// Starts `true` in a sandbox confined as real ones are.
async fn probe() -> Result<(), String> {
    let (bwrap, setpriv) = confinement_programs()?;
    let dir = std::env::temp_dir().join(format!(
        "sandwarden-probe-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    private_dir(&dir).map_err(|e| format!("cannot make a probe directory: {e}"))?;
    let as_root = nix::unistd::geteuid().is_root();
    let confinement = Confinement {
        hostname: "probe",
        setpriv: &setpriv,
        as_root,
        uid: if as_root { PROBE_UID } else { 0 },
        workdir: &dir,
        home: &dir,
        sockets: &dir,
        egress: None,
        binds: &[],
    };
    let mut args = confinement.bwrap_args();
    args.push("true".into());
    let out = tokio::process::Command::new(&bwrap)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .await;
    let _ = std::fs::remove_dir_all(&dir);
    match out {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "bwrap cannot create a sandbox here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!(
            "bwrap cannot be run ({e}); install the bubblewrap package"
        )),
    }
}

/// Variables that would point an agent CLI at the operator's own config and state; a sandbox gets
/// its own under its HOME instead.
const RELOCATING_VARS: &[&str] = &[
    "CODEX_HOME",
    "CLAUDE_CONFIG_DIR",
    "OPENCODE_CONFIG",
    "OPENCODE_CONFIG_DIR",
    "OPENCODE_CONFIG_CONTENT",
];

/// Variables of the operator's that every sandbox gets when set: the locale and the time zone.
/// Nothing else of the operator's environment reaches a sandbox unless `--pass-env` names it.
const BASE_VARS: &[&str] = &["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ"];

/// The host's directories a confined sandbox sees, read-only (those that exist).
const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// Where a confined sandbox finds things, inside.
const WORKDIR_INSIDE: &str = "/work";
const HOME_INSIDE: &str = "/home/sandbox";
const BIN_INSIDE: &str = "/opt/sandwarden/bin";
const PATH_INSIDE: &str = "/opt/sandwarden/path";

/// Users that confined sandboxes run as when `serve` runs as root: one per sandbox, picked from
/// this range by the sandbox id, far above any real user or subordinate-id range.
const UID_BASE: u32 = 3_000_000_000;
const UID_RANGE: u32 = 1_000_000_000;
const PROBE_UID: u32 = UID_BASE;

/// The user a sandbox runs as when `serve` runs as root.
fn sandbox_uid(id: &str) -> u32 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    UID_BASE + n % UID_RANGE
}

/// What one confined sandbox is built from (host paths), as bubblewrap's arguments.
struct Confinement<'a> {
    hostname: &'a str,
    setpriv: &'a Path,
    /// `serve` runs as root: bubblewrap runs privileged and the harness as `uid`, with no
    /// capability left; otherwise bubblewrap makes a user namespace and drops every capability.
    as_root: bool,
    uid: u32,
    workdir: &'a Path,
    home: &'a Path,
    /// Where the harness makes its socket.
    sockets: &'a Path,
    /// The egress proxy's socket's directory (mounted read-only).
    egress: Option<&'a Path>,
    /// Further read-only binds: (host path, path inside).
    binds: &'a [(PathBuf, PathBuf)],
}

impl Confinement<'_> {
    /// Everything up to and including the program to run (the caller appends it and its args).
    fn bwrap_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&dyn AsRef<std::ffi::OsStr>]| {
            a.extend(parts.iter().map(|p| p.as_ref().to_os_string()));
        };
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    if let Ok(target) = std::fs::read_link(path) {
                        push(&[&"--symlink", &target, &path]);
                    }
                }
                Ok(m) if m.is_dir() => push(&[&"--ro-bind", &path, &path]),
                _ => {}
            }
        }
        push(&[&"--proc", &"/proc", &"--dev", &"/dev"]);
        // A private /tmp and /var/tmp the sandbox's user may write (sticky, as on a host).
        for tmp in ["/tmp", "/var/tmp"] {
            push(&[&"--perms", &"1777", &"--tmpfs", &tmp]);
        }
        // The directories above the mounts below: bubblewrap makes them 0700 otherwise, which
        // the sandbox's user could not pass through.
        for dir in [
            "/run",
            "/run/sandwarden",
            "/opt",
            "/opt/sandwarden",
            BIN_INSIDE,
            PATH_INSIDE,
            "/home",
        ] {
            push(&[&"--perms", &"0755", &"--dir", &dir]);
        }
        push(&[&"--bind", &self.workdir, &WORKDIR_INSIDE]);
        push(&[&"--bind", &self.home, &HOME_INSIDE]);
        push(&[&"--bind", &self.sockets, &SOCKETS_INSIDE]);
        if let Some(egress) = self.egress {
            push(&[&"--ro-bind", &egress, &EGRESS_INSIDE]);
        }
        for (host, inside) in self.binds {
            if let Some(parent) = inside.parent()
                && parent.starts_with(PATH_INSIDE)
                && parent != Path::new(PATH_INSIDE)
            {
                push(&[&"--perms", &"0755", &"--dir", &parent]);
            }
            push(&[&"--ro-bind", host, inside]);
        }
        // The host name is the sandbox's id: nothing secret, and it tells sandboxes apart.
        push(&[&"--chdir", &WORKDIR_INSIDE, &"--hostname", &self.hostname]);
        // bwrap's parent is `sandbox-exec --stay`, which outlives `serve` (a restart adopts the
        // sandbox) and dies with the sandbox's process group: then bwrap ends everything inside.
        push(&[
            &"--die-with-parent",
            &"--unshare-pid",
            &"--unshare-net",
            &"--unshare-ipc",
            &"--unshare-uts",
            &"--unshare-cgroup-try",
            // No TIOCSTI into a terminal outside.
            &"--new-session",
        ]);
        if self.as_root {
            // bubblewrap keeps no capability by default; setpriv needs these three to become
            // the sandbox's user, and drops them with every other one as it does.
            push(&[
                &"--cap-add",
                &"CAP_SETUID",
                &"--cap-add",
                &"CAP_SETGID",
                &"--cap-add",
                &"CAP_SETPCAP",
                &"--",
                &self.setpriv,
            ]);
            let id = self.uid.to_string();
            push(&[
                &format!("--reuid={id}"),
                &format!("--regid={id}"),
                &"--clear-groups",
                &"--no-new-privs",
                &"--inh-caps=-all",
                &"--bounding-set=-all",
                &"--",
            ]);
        } else {
            push(&[
                &"--unshare-user",
                &"--disable-userns",
                &"--cap-drop",
                &"ALL",
                &"--",
            ]);
        }
        a
    }
}

/// The sandbox's `PATH` and the binds it needs: this build's binaries first, then the
/// operator's `PATH`, where a directory outside the system's is mounted read-only under
/// `/opt/sandwarden/path/N` (a `node_modules/.bin` with its whole `node_modules`, which its
/// links point into, at `/opt/sandwarden/path/N/node_modules`). The sandbox sees those directories and nothing else around them.
fn sandbox_path(operator_path: &str) -> (String, Vec<(PathBuf, PathBuf)>) {
    let mut entries = vec![BIN_INSIDE.to_string()];
    let mut binds = Vec::new();
    for (i, entry) in operator_path.split(':').enumerate() {
        let dir = Path::new(entry);
        if !dir.is_absolute() || !dir.is_dir() {
            continue;
        }
        if SYSTEM_DIRS.iter().any(|s| dir.starts_with(s)) {
            entries.push(entry.to_string());
            continue;
        }
        let Ok(real) = dir.canonicalize() else {
            continue;
        };
        let inside = PathBuf::from(PATH_INSIDE).join(i.to_string());
        match real.parent() {
            // Mounted under its own name: node looks for packages in directories so named.
            Some(modules)
                if real.file_name().is_some_and(|n| n == ".bin")
                    && modules.file_name().is_some_and(|n| n == "node_modules") =>
            {
                let inside = inside.join("node_modules");
                entries.push(inside.join(".bin").display().to_string());
                binds.push((modules.to_path_buf(), inside));
            }
            _ => {
                entries.push(inside.display().to_string());
                binds.push((real, inside));
            }
        }
    }
    (entries.join(":"), binds)
}

/// Settings for the local runtime besides where its data lives.
#[derive(Debug, Clone, Default)]
pub struct LocalOptions {
    /// Operator variables every sandbox gets (`--pass-env`).
    pub pass_env: Vec<String>,
    /// Where confined sandboxes may connect.
    pub egress: EgressPolicy,
}

pub struct LocalRuntime {
    root: PathBuf,
    /// Each sandbox's HOME, `data_dir/homes/<id>`: the CLIs write their config, caches and
    /// transcripts there, never in the operator's home nor in the session's working directory.
    homes: PathBuf,
    /// Where each sandbox's harness makes its socket (`data_dir/sockets/<id>/`), where `serve`
    /// moves it once it listens (`data_dir/run/<id>.sock`: a directory no sandbox sees, so none
    /// can swap the socket `serve` dials for a link), and its egress proxy's socket
    /// (`data_dir/egress/<id>/`).
    net: SocketDirs,
    tokens: Tokens,
    exits: mpsc::UnboundedSender<String>,
    isolation: Isolation,
    /// The harness server's program: the slim `sandwarden-harness` of this build when present.
    program: HarnessProgram,
    /// This build's `sandwarden` (the echo agent's, and `sandbox-exec`'s, binary).
    me: PathBuf,
    as_root: bool,
    /// bubblewrap's and setpriv's paths (when confined).
    programs: (PathBuf, PathBuf),
    cgroups: Option<Cgroups>,
    /// A confined sandbox's PATH and the binds behind it.
    path: (String, Vec<(PathBuf, PathBuf)>),
    options: LocalOptions,
    proxies: EgressProxies,
}

/// The variable every sandbox process is started with, naming its sandbox.
const SANDBOX_VAR: &str = "SANDWARDEN_SANDBOX";

/// `SANDWARDEN_SANDBOX=<id>`: how the runtime recognises a sandbox's processes in /proc.
fn mark(id: &str) -> String {
    format!("{SANDBOX_VAR}={id}")
}

impl LocalRuntime {
    /// Sandboxes live under `data_dir/sandboxes/<id>`; the id of every child that exits is sent
    /// on `exits`. `isolation` has been resolved (`Isolation::resolve`).
    pub fn new(
        data_dir: &Path,
        tokens: Tokens,
        exits: mpsc::UnboundedSender<String>,
        isolation: Isolation,
        options: LocalOptions,
    ) -> std::io::Result<Self> {
        let program = HarnessProgram::for_this_binary()?;
        tracing::info!(program = %program.path.display(), "local sandboxes run this harness");
        let net = SocketDirs::create(data_dir)?;
        let as_root = nix::unistd::geteuid().is_root();
        let programs = if isolation == Isolation::Bwrap {
            confinement_programs().map_err(std::io::Error::other)?
        } else {
            (PathBuf::new(), PathBuf::new())
        };
        let cgroups = if isolation == Isolation::Bwrap || as_root {
            match Cgroups::detect() {
                Ok(c) => {
                    tracing::info!(cgroups = %c.describe(), "local sandboxes get memory, process and CPU limits");
                    Some(c)
                }
                Err(why) => {
                    tracing::warn!(
                        reason = %why,
                        "local sandboxes get no memory or CPU limits: serve cannot make cgroups here \
                         (run it as root, or where it owns a delegated cgroup v2 subtree){}",
                        if as_root { "; processes are still limited per sandbox user" } else { "" }
                    );
                    None
                }
            }
        } else {
            None
        };
        for dir in ["sandboxes", "homes"] {
            private_dir(&data_dir.join(dir))?;
        }
        let path = sandbox_path(&std::env::var("PATH").unwrap_or_default());
        for name in &options.pass_env {
            if std::env::var_os(name).is_none() {
                tracing::warn!(variable = %name, "--pass-env names a variable that is not set; sandboxes will not get it");
            }
        }
        Ok(LocalRuntime {
            root: data_dir.join("sandboxes"),
            homes: data_dir.join("homes"),
            proxies: EgressProxies::new(net.egress.clone(), options.egress.clone()),
            net,
            tokens,
            exits,
            isolation,
            program,
            me: std::env::current_exe()?,
            as_root,
            programs,
            cgroups,
            path,
            options,
        })
    }

    fn confined(&self) -> bool {
        self.isolation == Isolation::Bwrap
    }

    /// The environment a sandbox starts with: the base set, what `--pass-env` names, the
    /// template's, the way out, and its own credential. Nothing else of `serve`'s.
    fn environment(&self, t: &Template, id: &str, home: &Path) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        let operator = |name: &str| std::env::var(name).ok().map(|v| (name.to_string(), v));
        env.extend(BASE_VARS.iter().filter_map(|n| operator(n)));
        if !env.iter().any(|(k, _)| k == "LANG") {
            env.push(("LANG".into(), "C.UTF-8".into()));
        }
        let path = if self.confined() {
            self.path.0.clone()
        } else {
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into())
        };
        env.push(("PATH".into(), path));
        env.push(("HOME".into(), home.display().to_string()));
        for (var, sub) in [
            ("XDG_CONFIG_HOME", ".config"),
            ("XDG_DATA_HOME", ".local/share"),
            ("XDG_STATE_HOME", ".local/state"),
            ("XDG_CACHE_HOME", ".cache"),
        ] {
            env.push((var.into(), home.join(sub).display().to_string()));
        }
        env.extend(
            self.options
                .pass_env
                .iter()
                .filter(|n| !n.starts_with("SANDWARDEN_") && !RELOCATING_VARS.contains(&n.as_str()))
                .filter_map(|n| operator(n)),
        );
        env.extend(t.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if self.confined() {
            env.extend(proxy_env());
        }
        env.push(("SANDWARDEN_TOKEN".into(), self.tokens.for_sandbox(id)));
        // Tells this sandbox's processes from later ones that reuse their numbers (`mark`).
        env.push((SANDBOX_VAR.into(), id.into()));
        env.push((
            "SANDWARDEN_LOG".into(),
            std::env::var("SANDWARDEN_SANDBOX_LOG").unwrap_or_else(|_| "warn".into()),
        ));
        env
    }

    /// The harness program's path and the `sandwarden` binary's, as the sandbox sees them, and
    /// the binds that put them there.
    fn binaries(&self) -> (PathBuf, Vec<(PathBuf, PathBuf)>) {
        if !self.confined() {
            return (self.program.path.clone(), Vec::new());
        }
        let inside = |host: &Path| {
            PathBuf::from(BIN_INSIDE)
                .join(host.file_name().unwrap_or_else(|| "sandwarden".as_ref()))
        };
        let harness = inside(&self.program.path);
        let mut binds = vec![(self.program.path.clone(), harness.clone())];
        if self.program.path != self.me {
            binds.push((
                self.me.clone(),
                PathBuf::from(BIN_INSIDE).join("sandwarden"),
            ));
        }
        (harness, binds)
    }

    /// Makes the sandbox's directories, owned by `uid` when `serve` runs as root.
    fn make_dirs(&self, id: &str, uid: Option<u32>) -> std::io::Result<[PathBuf; 3]> {
        let dirs = [
            self.root.join(id),
            self.homes.join(id),
            self.net.harness_dir(id),
        ];
        for dir in &dirs {
            private_dir(dir)?;
            if let Some(uid) = uid {
                std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
            }
        }
        Ok(dirs)
    }

    /// The command that starts sandbox `id`: `sandbox-exec` (cgroups, process limit), then
    /// bubblewrap (when confined), then the harness with `flags`.
    fn command(
        &self,
        t: &Template,
        id: &str,
        dirs: &[PathBuf; 3],
        uid: u32,
        egress: Option<&Path>,
    ) -> std::io::Result<tokio::process::Command> {
        let (harness, mut binds) = self.binaries();
        let confined = self.confined();
        let (workdir, home, socket) = if confined {
            (
                PathBuf::from(WORKDIR_INSIDE),
                PathBuf::from(HOME_INSIDE),
                Path::new(SOCKETS_INSIDE).join(HARNESS_SOCKET),
            )
        } else {
            (
                dirs[0].clone(),
                dirs[1].clone(),
                dirs[2].join(HARNESS_SOCKET),
            )
        };
        let workdir_str = workdir.to_str().ok_or_else(|| {
            std::io::Error::other(format!(
                "the sandbox directory {} is not valid UTF-8; choose a --data-dir with a UTF-8 path",
                workdir.display()
            ))
        })?;
        let mut argv: Vec<OsString> = Vec::new();
        let procs = match &self.cgroups {
            Some(c) => c.create(id, &t.container)?,
            None => Vec::new(),
        };
        argv.push(self.me.clone().into());
        argv.push("sandbox-exec".into());
        for p in &procs {
            argv.push("--join".into());
            argv.push(p.into());
        }
        if confined && self.as_root {
            argv.push("--nproc".into());
            argv.push(t.container.pids.to_string().into());
        }
        if confined {
            argv.push("--stay".into());
        }
        argv.push("--".into());
        if confined {
            binds.extend(self.path.1.iter().cloned());
            let confinement = Confinement {
                hostname: id,
                setpriv: &self.programs.1,
                as_root: self.as_root,
                uid,
                workdir: &dirs[0],
                home: &dirs[1],
                sockets: &dirs[2],
                egress,
                binds: &binds,
            };
            argv.push(self.programs.0.clone().into());
            argv.extend(confinement.bwrap_args());
        }
        argv.push(harness.into());
        argv.extend(self.program.leading.iter().map(OsString::from));
        argv.extend(
            t.harness_flags(&format!("unix:{}", socket.display()), workdir_str)
                .into_iter()
                .map(OsString::from),
        );
        if egress.is_some() {
            argv.extend(
                egress_flags(self.proxies.policy())
                    .into_iter()
                    .map(OsString::from),
            );
        }
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(self.environment(t, id, &home))
            .current_dir(&dirs[0]);
        Ok(cmd)
    }
}

impl LocalRuntime {
    /// Ends what is left of sandbox `id`: its egress proxy, any process in its cgroups, its
    /// directories and sockets.
    async fn clean_up(&self, id: &str) {
        self.proxies.close(id);
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove(id).await;
        }
        for (base, dir) in [
            (&self.root, self.root.join(id)),
            (&self.homes, self.homes.join(id)),
        ] {
            if dir.starts_with(base) && dir != *base {
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
        }
        self.net.remove(id).await;
    }
}

fn signal_each(pids: &[u32], signal: Signal) {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid)
            && pid > 0
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
    }
}

fn signal_group(pid: i64, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

#[async_trait::async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    fn egress_proxies(&self) -> Option<&EgressProxies> {
        self.confined().then_some(&self.proxies)
    }

    fn isolation(&self) -> &'static str {
        self.isolation.name()
    }

    async fn create(&self, id: &str, t: &Template) -> Result<Sandbox, RuntimeError> {
        let confined = self.confined();
        let owner = (confined && self.as_root).then(|| sandbox_uid(id));
        let uid = owner.unwrap_or_else(|| nix::unistd::geteuid().as_raw());
        let dirs = self.make_dirs(id, owner)?;
        let egress = if confined {
            Some(self.proxies.open(id, owner)?)
        } else {
            None
        };
        let mut cmd = self.command(t, id, &dirs, uid, egress.as_deref())?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            // Its own process group: a Ctrl-C to `serve` does not reach it, and stopping the group
            // stops the agent too.
            .process_group(0);
        let started = async {
            let mut child = cmd
                .spawn()
                .map_err(|e| RuntimeError::Start(e.to_string()))?;
            let pid = child.id().map(i64::from);
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| RuntimeError::Start("no stdout".into()))?;
            let mut line = String::new();
            let read = tokio::time::timeout(LISTEN_TIMEOUT, async {
                BufReader::new(stdout).read_line(&mut line).await
            })
            .await;
            let listening = match read {
                Ok(Ok(_)) => serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .is_some_and(|v| v["listening"].is_string()),
                _ => false,
            };
            if !listening {
                let _ = child.start_kill();
                return Err(match read {
                    Err(_) => RuntimeError::StartTimeout(LISTEN_TIMEOUT.as_secs()),
                    _ => RuntimeError::Start(format!(
                        "the harness did not report its address (it printed {:?})",
                        line.trim()
                    )),
                });
            }
            let socket = match self.net.take_socket(id, uid) {
                Ok(socket) => socket,
                Err(e) => {
                    let _ = child.start_kill();
                    return Err(e);
                }
            };
            let exits = self.exits.clone();
            let sandbox_id = id.to_string();
            tokio::spawn(async move {
                let _ = child.wait().await;
                let _ = exits.send(sandbox_id);
            });
            Ok(Sandbox {
                id: id.to_string(),
                template: t.name.clone(),
                endpoint: format!("unix:{}", socket.display()),
                pid,
            })
        };
        let started = started.await;
        if started.is_err() {
            self.clean_up(id).await;
        }
        started
    }

    async fn adopt(&self, sandbox: &Sandbox) {
        // The adopted sandbox's way out died with the last `serve`: a new proxy on the same
        // socket path, which its mount of the directory shows it.
        if self.confined() {
            let owner = self.as_root.then(|| sandbox_uid(&sandbox.id));
            if let Err(e) = self.proxies.open(&sandbox.id, owner) {
                tracing::warn!(sandbox = %sandbox.id, error = %e, "the adopted sandbox's egress proxy could not be opened");
            }
        }
    }

    async fn destroy(&self, sandbox: &Sandbox) {
        // Only a group that is still this sandbox's: once its processes are gone and reaped, the
        // number may belong to another sandbox's group.
        let mark = mark(&sandbox.id);
        if let Some(pid) = sandbox.pid
            && crate::procfs::group_runs_with_env(pid, &mark)
        {
            // Under bubblewrap the harness leads a session of its own below bwrap (outside) and
            // bwrap's PID 1 (inside), all found by the mark their environment carries. The
            // harness alone is asked to stop: it ends its agent, then bwrap's PID 1 ends and the
            // kernel ends everything else in the sandbox's PID namespace. A signal to bwrap
            // would end the sandbox at once (`--die-with-parent` ends it with bwrap).
            let inside: Vec<u32> = u32::try_from(pid)
                .map(crate::procfs::descendants)
                .unwrap_or_default()
                .into_iter()
                .filter(|p| crate::procfs::runs_with_env(i64::from(*p), &mark))
                .collect();
            if self.confined() {
                let is_bwrap = |p: &u32| {
                    std::fs::read_link(format!("/proc/{p}/exe"))
                        .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "bwrap"))
                };
                let harness: Vec<u32> = inside.iter().copied().filter(|p| !is_bwrap(p)).collect();
                signal_each(&harness, Signal::SIGTERM);
            } else {
                signal_group(pid, Signal::SIGTERM);
            }
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            while crate::procfs::runs_with_env(pid, &mark) && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if crate::procfs::group_runs_with_env(pid, &mark) {
                signal_group(pid, Signal::SIGKILL);
            }
            signal_each(
                &inside
                    .into_iter()
                    .filter(|p| crate::procfs::runs_with_env(i64::from(*p), &mark))
                    .collect::<Vec<u32>>(),
                Signal::SIGKILL,
            );
        }
        self.clean_up(&sandbox.id).await;
    }

    async fn alive(&self, sandbox: &Sandbox) -> bool {
        let mark = mark(&sandbox.id);
        sandbox
            .pid
            .is_some_and(|pid| crate::procfs::may_run_with_env(pid, &mark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn sleeper(env: Option<(&str, &str)>) -> std::process::Child {
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30").process_group(0);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("sleep");
        // `spawn` returns once the exec has begun, before the kernel has laid out the new
        // program's environment: until then /proc/PID/environ reads empty. Bounded: 200 × 10 ms.
        for _ in 0..200 {
            if std::fs::read(format!("/proc/{}/environ", child.id()))
                .is_ok_and(|env| !env.is_empty())
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    fn recorded(id: &str, pid: u32) -> Sandbox {
        Sandbox {
            id: id.into(),
            template: "echo".into(),
            endpoint: "http://127.0.0.1:9".into(),
            pid: Some(i64::from(pid)),
        }
    }

    #[tokio::test]
    async fn a_sandbox_is_recognised_by_its_processes_not_by_a_reused_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (exits, _) = mpsc::unbounded_channel();
        let runtime = LocalRuntime::new(
            dir.path(),
            Tokens::new(b"secret".to_vec()),
            exits,
            Isolation::None,
            LocalOptions::default(),
        )
        .expect("runtime");

        // Another group that got the number of a sandbox whose processes are gone.
        let mut other = sleeper(None);
        let stale = recorded("sbx_gone", other.id());
        assert!(
            !runtime.alive(&stale).await,
            "someone else's process is not the sandbox"
        );
        runtime.destroy(&stale).await;
        assert!(
            crate::procfs::alive(i64::from(other.id())),
            "destroying the stale sandbox must not signal the group that reused its number"
        );

        // The sandbox's own group is recognised and stopped.
        let mut own = sleeper(Some((SANDBOX_VAR, "sbx_own")));
        let sandbox = recorded("sbx_own", own.id());
        assert!(runtime.alive(&sandbox).await);
        runtime.destroy(&sandbox).await;
        let status = own.wait().expect("wait");
        assert!(
            !status.success(),
            "the sandbox's group was signalled: {status:?}"
        );

        let _ = other.kill();
        let _ = other.wait();
    }
}
