//! Facts about local processes read from /proc: liveness, resident memory, and finding processes
//! by command line. Used by the local runtime, the benchmarks and the tests.

/// Whether `pid` runs. A zombie (exited, not yet reaped) counts as gone. Only the kernel's
/// "no such process" says gone: a check that fails for a reason of its own (no file descriptor
/// left to read /proc with, say) says the process runs, so an overloaded `serve` never declares
/// live sandboxes dead.
pub fn alive(pid: i64) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    if let Err(nix::errno::Errno::ESRCH) =
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
    {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(e) => !gone(&e),
    }
}

/// Whether a failed read of /proc/PID/… means the process is gone (rather than that the read
/// itself failed).
fn gone(e: &std::io::Error) -> bool {
    let code = e.raw_os_error();
    code == Some(nix::errno::Errno::ENOENT as i32) || code == Some(nix::errno::Errno::ESRCH as i32)
}

/// Resident memory of `pid` in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most memory `pid` has had resident since it started (its high-water mark), in KiB (0
/// when it cannot be read).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// The anonymous part of `pid`'s resident memory (its heap and stacks, not mapped files), in KiB.
pub fn rss_anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

/// A `… kB` field of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// How many file descriptors `pid` has open (0 when it cannot be read).
pub fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// A process's memory from /proc/PID/smaps_rollup, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident pages, shared ones included (what `VmRSS` says).
    pub rss: u64,
    /// Proportional share: each resident page divided by the number of processes mapping it.
    pub pss: u64,
    /// Resident pages mapped by this process only (`Private_Clean` + `Private_Dirty`).
    pub private: u64,
    /// Anonymous resident pages: the heap, stacks and other memory not backed by a file.
    pub anonymous: u64,
}

/// `pid`'s memory by kind; `None` when /proc/PID/smaps_rollup cannot be read (gone, or a kernel
/// before 4.14).
pub fn memory(pid: u32) -> Option<Memory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(parse_smaps_rollup(&text))
}

fn parse_smaps_rollup(text: &str) -> Memory {
    let mut m = Memory::default();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => m.rss = kib,
            "Pss:" => m.pss = kib,
            "Private_Clean:" | "Private_Dirty:" => m.private += kib,
            "Anonymous:" => m.anonymous = kib,
            _ => {}
        }
    }
    m
}

/// Whether `pid` runs with `var` (`NAME=value`) in the environment it was started with. A pid
/// is reused once its process is reaped, so this tells a sandbox's process from a newer one that
/// happens to have the same number. `None` when that cannot be read now (the process runs, but
/// its environment could not be read: out of file descriptors, say).
pub fn env_check(pid: i64, var: &str) -> Option<bool> {
    if !alive(pid) {
        return Some(false);
    }
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => Some(env.split(|b| *b == 0).any(|v| v == var.as_bytes())),
        Err(e) if gone(&e) => Some(false),
        Err(_) => None,
    }
}

/// Whether `pid` surely runs with `var` (see `env_check`): what must hold before it is signalled.
pub fn runs_with_env(pid: i64, var: &str) -> bool {
    env_check(pid, var) == Some(true)
}

/// Whether `pid` may still run with `var`: false only when it surely does not (gone, or another
/// process), never because the check itself failed. What liveness checks use.
pub fn may_run_with_env(pid: i64, var: &str) -> bool {
    env_check(pid, var) != Some(false)
}

/// Whether any live process of process group `pgid` runs with `var` in its environment: the
/// group is still the one that was started with it (its leader may have exited, leaving the
/// rest), not a newer group that reused the number.
pub fn group_runs_with_env(pgid: i64, var: &str) -> bool {
    if runs_with_env(pgid, var) {
        return true;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_string_lossy().parse::<i64>().ok())
        .filter(|pid| process_group(*pid) == Some(pgid))
        .any(|pid| runs_with_env(pid, var))
}

/// The process group of `pid`, from /proc/PID/stat.
fn process_group(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name (which may hold spaces): state, ppid, pgrp.
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// The parent of `pid`, from /proc/PID/stat.
pub fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `pid`'s command line with its arguments joined by spaces (empty when it cannot be read).
pub fn command_line(pid: i64) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmd| String::from_utf8_lossy(&cmd).replace('\0', " "))
        .unwrap_or_default()
}

/// Whether `pid`'s command line contains all of `needles`.
pub fn command_matches(pid: i64, needles: &[&str]) -> bool {
    let cmd = command_line(pid);
    !cmd.is_empty() && needles.iter().all(|n| cmd.contains(n))
}

/// Every process whose command line contains all of `needles`.
pub fn pids_matching(needles: &[&str]) -> Vec<i32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| command_matches(i64::from(*pid), needles))
        .collect()
}

/// SIGKILLs the process group of every process whose command line contains all of `needles`.
/// For tools and tests that started sandboxes under a directory of their own.
pub fn kill_groups_matching(needles: &[&str]) {
    for pid in pids_matching(needles) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// CPU time (user + system) `pid` has used so far, in seconds; 0 when it cannot be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_ticks(pid, 2)
}

/// `cpu_seconds` plus what `pid`'s children that have exited and been waited for used.
pub fn cpu_seconds_with_reaped(pid: u32) -> f64 {
    cpu_ticks(pid, 4)
}

/// The first `fields` of utime, stime, cutime and cstime of `pid`, summed, in seconds. /proc
/// reports them in USER_HZ ticks, which Linux fixes at 100 per second for user space.
fn cpu_ticks(pid: u32, fields: usize) -> f64 {
    const USER_HZ: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces, so split after its closing paren):
    // state is the first; utime, stime, cutime and cstime are the 12th to the 15th.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(fields)
                .filter_map(|v| v.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    ticks as f64 / USER_HZ
}

/// The direct children of `pid` (e.g. nginx's workers under its master).
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every process below `pid`, children first.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut tree = children(pid);
    let mut i = 0;
    while i < tree.len() {
        let below = children(tree[i]);
        tree.extend(below);
        i += 1;
    }
    tree
}

/// The inode of the IPv4 TCP socket on this machine with local port `local_port` and remote
/// port `peer_port` (from /proc/net/tcp), to tell whether a process still holds a connection.
pub fn tcp_inode(local_port: u16, peer_port: u16) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        (port(cols.get(1)?)? == local_port && port(cols.get(2)?)? == peer_port)
            .then(|| cols.get(9).map(|s| s.to_string()))?
    })
}

/// Whether process `pid` has the socket `inode` (see `tcp_inode`) open.
pub fn holds_socket(pid: u32, inode: &str) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == want))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_is_summed_by_kind() {
        let text = "55d0c0a00000-7ffd5e1f0000 ---p 00000000 00:00 0                          [rollup]\n\
                    Rss:               11520 kB\n\
                    Pss:                4301 kB\n\
                    Pss_Anon:           2980 kB\n\
                    Shared_Clean:       7000 kB\n\
                    Private_Clean:       540 kB\n\
                    Private_Dirty:      2980 kB\n\
                    Anonymous:          2980 kB\n\
                    Swap:                  0 kB\n";
        assert_eq!(
            parse_smaps_rollup(text),
            Memory {
                rss: 11520,
                pss: 4301,
                private: 3520,
                anonymous: 2980
            }
        );
        assert_eq!(parse_smaps_rollup("garbage\n"), Memory::default());
    }

    #[test]
    fn own_memory_is_readable() {
        let m = memory(std::process::id()).expect("smaps_rollup of this process");
        assert!(m.rss > 0 && m.pss > 0 && m.pss <= m.rss && m.private <= m.rss);
    }
}
