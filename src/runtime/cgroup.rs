//! Memory, process and CPU bounds for local sandboxes, from the kernel's control groups: a group
//! per sandbox under a `sandwarden` group that `serve` creates, with cgroup v2 (a unified tree
//! whose controllers `serve` may enable) or cgroup v1 (the memory, pids and cpu hierarchies).
//! The first process of a sandbox joins its groups before it runs anything (`sandbox-exec`), so
//! nothing it starts is outside them, and deleting the sandbox kills whatever is left in them.
//!
//! It knows paths and numbers only; which sandbox gets which limits is the runtime's business.

use crate::template::ContainerSpec;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";
const PARENT: &str = "sandwarden";
const CPU_PERIOD_US: u64 = 100_000;

/// The cgroup trees sandboxes' groups are made in.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// Groups under `parent` in the unified hierarchy, with memory, pids and cpu enabled.
    V2 { parent: PathBuf },
    /// Groups under `sandwarden` in each of the three v1 hierarchies.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

fn make_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(std::io::Error::new(
            e.kind(),
            format!("creating {}: {e}", path.display()),
        )),
        _ => Ok(()),
    }
}

impl Cgroups {
    /// The trees this process may make sandboxes' groups in; the error says why there are none.
    /// A group is made and removed to be sure (the parent may exist, made by another user).
    pub fn detect() -> Result<Cgroups, String> {
        let cgroups = Self::detect_at(Path::new(ROOT))?;
        let probe = format!("probe-{}", std::process::id());
        let made = cgroups.groups(&probe).iter().try_for_each(|g| make_dir(g));
        for g in cgroups.groups(&probe) {
            let _ = std::fs::remove_dir(g);
        }
        made.map_err(|e| e.to_string())?;
        Ok(cgroups)
    }

    fn detect_at(root: &Path) -> Result<Cgroups, String> {
        let v1 = ["memory", "pids", "cpu"].map(|c| root.join(c));
        if v1.iter().all(|d| d.join("cgroup.procs").is_file()) {
            let groups = v1.map(|d| d.join(PARENT));
            for g in &groups {
                make_dir(g).map_err(|e| e.to_string())?;
            }
            let [memory, pids, cpu] = groups;
            return Ok(Cgroups::V1 { memory, pids, cpu });
        }
        let controllers =
            std::fs::read_to_string(root.join("cgroup.controllers")).map_err(|_| {
                format!(
                    "no cgroup v1 memory/pids/cpu or cgroup v2 tree at {}",
                    root.display()
                )
            })?;
        for needed in ["memory", "pids", "cpu"] {
            if !controllers.split_whitespace().any(|c| c == needed) {
                return Err(format!(
                    "the cgroup v2 tree at {} lacks the {needed} controller",
                    root.display()
                ));
            }
        }
        let parent = root.join(PARENT);
        let enable = "+memory +pids +cpu";
        write(&root.join("cgroup.subtree_control"), enable)
            .and_then(|()| make_dir(&parent))
            .and_then(|()| write(&parent.join("cgroup.subtree_control"), enable))
            .map_err(|e| e.to_string())?;
        Ok(Cgroups::V2 { parent })
    }

    /// How they are shown at start.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { parent } => format!("cgroup v2 under {}", parent.display()),
            Cgroups::V1 { memory, .. } => {
                format!("cgroup v1 (memory, pids, cpu) under {}", memory.display())
            }
        }
    }

    fn groups(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { parent } => vec![parent.join(id)],
            Cgroups::V1 { memory, pids, cpu } => {
                vec![memory.join(id), pids.join(id), cpu.join(id)]
            }
        }
    }

    /// Makes the sandbox's groups with `limits`; returns the `cgroup.procs` files its first
    /// process must join.
    pub fn create(&self, id: &str, limits: &ContainerSpec) -> std::io::Result<Vec<PathBuf>> {
        let memory = (limits.memory_mib * 1024 * 1024).to_string();
        let pids = limits.pids.to_string();
        let quota = ((limits.cpus * CPU_PERIOD_US as f64) as u64).max(1000);
        let groups = self.groups(id);
        for g in &groups {
            make_dir(g)?;
        }
        match self {
            Cgroups::V2 { .. } => {
                let g = &groups[0];
                write(&g.join("memory.max"), &memory)?;
                write(&g.join("pids.max"), &pids)?;
                write(&g.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            Cgroups::V1 { .. } => {
                write(&groups[0].join("memory.limit_in_bytes"), &memory)?;
                write(&groups[1].join("pids.max"), &pids)?;
                write(
                    &groups[2].join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(&groups[2].join("cpu.cfs_quota_us"), &quota.to_string())?;
            }
        }
        Ok(groups.iter().map(|g| g.join("cgroup.procs")).collect())
    }

    /// The processes still in the sandbox's groups.
    pub fn members(&self, id: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .groups(id)
            .iter()
            .filter_map(|g| std::fs::read_to_string(g.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills every process left in the sandbox's groups, then removes them (bounded: a group
    /// whose processes will not die within a second or so is left, and said so).
    pub async fn remove(&self, id: &str) {
        for _ in 0..50 {
            let left = self.members(id);
            if left.is_empty() {
                break;
            }
            for pid in left {
                if pid > 0 {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for g in self.groups(id) {
            if let Err(e) = std::fs::remove_dir(&g)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(group = %g.display(), error = %e, "a sandbox's cgroup could not be removed");
            }
        }
    }
}

/// `sandwarden sandbox-exec`: joins `procs` (cgroup.procs files), sets `nproc` as this user's
/// process limit if given, then runs `argv` (bubblewrap, or the harness itself). It runs outside
/// the sandbox, before anything of the sandbox runs.
///
/// With `stay`, it stays as the program's parent instead of becoming it, and ends with it:
/// bubblewrap, started with `--die-with-parent`, then ends the whole sandbox when this process
/// is killed (what `serve` does to a sandbox's process group), yet lives on when `serve` stops
/// (a restart adopts it). Termination signals are swallowed here: the sandbox's harness gets its
/// own from `serve` and stops gracefully, which ends bubblewrap and then this process.
pub fn sandbox_exec(
    procs: &[PathBuf],
    nproc: Option<u64>,
    stay: bool,
    argv: &[String],
) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let me = std::process::id().to_string();
    for file in procs {
        if let Err(e) = write(file, &me) {
            return e;
        }
    }
    if let Some(n) = nproc
        && let Err(e) =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NPROC, n, n)
    {
        return std::io::Error::other(format!("setting the process limit: {e}"));
    }
    // `serve` keeps what it writes private (umask 077); a sandbox's own files and the mount
    // points bubblewrap makes get the usual modes (its directories are private already).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let Some((program, args)) = argv.split_first() else {
        return std::io::Error::other("sandbox-exec needs a program to run");
    };
    if !stay {
        return std::process::Command::new(program).args(args).exec();
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return e,
    };
    let code = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Handlers, not "ignore": the program starts with the default dispositions again.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut child = tokio::process::Command::new(program).args(args).spawn()?;
        loop {
            tokio::select! {
                status = child.wait() => return Ok::<_, std::io::Error>(status?.code().unwrap_or(1)),
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        }
    });
    match code {
        Ok(code) => std::process::exit(code),
        Err(e) => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_groups_get_the_templates_limits() {
        let root = tempfile::tempdir().expect("tempdir");
        for c in ["memory", "pids", "cpu"] {
            std::fs::create_dir(root.path().join(c)).expect("dir");
            std::fs::write(root.path().join(c).join("cgroup.procs"), "").expect("procs");
        }
        let cgroups = Cgroups::detect_at(root.path()).expect("v1");
        let limits = ContainerSpec {
            memory_mib: 64,
            cpus: 0.5,
            pids: 32,
            ..ContainerSpec::default()
        };
        let procs = cgroups.create("sbx_1", &limits).expect("create");
        assert_eq!(procs.len(), 3);
        let read = |p: &str| std::fs::read_to_string(root.path().join(p)).expect(p);
        assert_eq!(
            read("memory/sandwarden/sbx_1/memory.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(read("pids/sandwarden/sbx_1/pids.max"), "32");
        assert_eq!(read("cpu/sandwarden/sbx_1/cpu.cfs_quota_us"), "50000");
    }

    #[test]
    fn no_tree_says_why() {
        let root = tempfile::tempdir().expect("tempdir");
        let err = Cgroups::detect_at(root.path()).expect_err("none");
        assert!(err.contains("no cgroup"), "{err}");
    }
}
