//! `sandwarden-bench density`: `serve`'s memory at scale. One release `serve` on the local
//! runtime; N terminal sessions, each its own sandbox (a `sandwarden harness` process running
//! `sh` under a PTY), created with bounded concurrency. serve's memory is read from /proc at rest
//! in these states, each adding to the one before: empty, N idle sessions, one open event stream
//! (SSE, `GET /v1/sessions/{id}/events`) per session held by this process, one attached terminal
//! (the session's `tty_url` WebSocket) per session, and all of that once serve's idle
//! connections to the harnesses have closed. The sandboxes' harness servers are read too.

use crate::bench::{BenchArgs, Ws, load_average, machine_line};
use crate::serve::{KEY, create, delete_session, start_serve_with, wait_ready_session};
use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use sandwarden::procfs::Memory;
use std::time::{Duration, Instant};

/// Session creations (create, then wait for `ready`) and attaches in flight at once.
const CONCURRENCY: usize = 16;
/// Pause before reading memory after a state is reached, so in-flight work has finished.
const SETTLE: Duration = Duration::from_secs(2);
/// How long after the creations serve's idle keep-alive connections to the harnesses are gone
/// (`harness_client::http_client` drops them after 15 s unused).
const POOL_IDLE_WAIT: Duration = Duration::from_secs(20);
/// Samples per reading (the median by RSS is kept), this far apart.
const SAMPLES: usize = 5;
const SAMPLE_GAP: Duration = Duration::from_millis(200);
/// The sessions' template: a terminal running `sh`, no warm pool.
const TEMPLATES: &str = r#"[{"name":"sh","kind":"tui","command":"sh","pool":0}]"#;
/// Issue 6's targets, KiB of `serve` memory per item.
const TARGET_SESSION_KIB: f64 = 50.0;
const TARGET_STREAM_KIB: f64 = 64.0;
const TARGET_TERMINAL_KIB: f64 = 64.0;
/// File descriptors to allow per session: serve holds a connection or two to each harness, the
/// event stream's socket and both sides of the terminal bridge; this process holds the client
/// ends.
const FDS_PER_SESSION: u64 = 8;

/// serve's memory in one state, with its open file count.
#[derive(Clone, Copy)]
struct Reading {
    mem: Memory,
    fds: usize,
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let n = args.sessions;
    anyhow::ensure!(n > 0, "--sessions must be at least 1");
    let (nofile, nofile_hard) = sandwarden::serve::raise_nofile(n as u64 * FDS_PER_SESSION + 1024)?;
    anyhow::ensure!(
        nofile >= n as u64 * FDS_PER_SESSION / 2,
        "the open-file limit is {nofile} (hard {nofile_hard}), too few for {n} sessions \
         (about {} per session for serve and this process); raise the hard limit \
         (`ulimit -Hn`, /etc/security/limits.conf) or pass a smaller --sessions",
        FDS_PER_SESSION / 2
    );
    let ptys_free = read_number("/proc/sys/kernel/pty/max")
        .zip(read_number("/proc/sys/kernel/pty/nr"))
        .map(|(max, used)| max.saturating_sub(used));
    if let Some(free) = ptys_free {
        anyhow::ensure!(
            free >= n as u64,
            "only {free} pseudo-terminals are free (kernel.pty.max); each session's `sh` needs one: \
             raise kernel.pty.max or pass a smaller --sessions"
        );
    }
    let available_before = meminfo_kib("MemAvailable:");
    let mut out = format!(
        "Command: `sandwarden-bench density --sessions {n}` (release build; {CONCURRENCY} creations \
         in flight). Machine: {}, {:.1} GiB RAM, {:.1} GiB available at the start; load average \
         at the start {}; open-file limit {nofile}.\n\n",
        machine_line(),
        meminfo_kib("MemTotal:").unwrap_or(0) as f64 / 1024.0 / 1024.0,
        available_before.unwrap_or(0) as f64 / 1024.0 / 1024.0,
        load_average(),
    );

    let serve = start_serve_with(0, "local", TEMPLATES)?;
    let pid = serve.child.id();
    let base = serve.base.clone();
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;

    // Warm-up: one session through every path, then deleted, so what serve sets up once (store
    // connections, thread stacks, the first use of each code path) is in the empty reading.
    let isolation = {
        let id = ready_session(&http, &base).await?;
        let session = get_session(&http, &base, &id).await?;
        let isolation = session["isolation"].as_str().unwrap_or("none").to_string();
        let stream = open_stream(&http, &base, &id).await?;
        let ws = attach(&http, &base, &id).await?;
        drop((stream, ws));
        delete_session(&http, &base, &id).await;
        isolation
    };
    let empty = reading(pid).await;

    // N idle sessions.
    let t0 = Instant::now();
    let ids: Vec<String> = futures::stream::iter(0..n)
        .map(|i| {
            let (http, base) = (&http, &base);
            async move {
                ready_session(http, base)
                    .await
                    .with_context(|| format!("creating session {} of {n}", i + 1))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let create_wall = t0.elapsed();
    let idle = reading(pid).await;
    let sandboxes_dir = format!("{}/sandboxes/", serve.dir.to_string_lossy());
    let harness_idle = sandbox_memory(&sandboxes_dir);
    anyhow::ensure!(
        harness_idle.harness.len() == n,
        "found {} harness processes for {n} sessions",
        harness_idle.harness.len()
    );

    // One open event stream per session, held here.
    let streams: Vec<reqwest::Response> = futures::stream::iter(&ids)
        .map(|id| open_stream(&http, &base, id))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let with_streams = reading(pid).await;

    // One attached terminal per session on top.
    let terminals: Vec<Ws> = futures::stream::iter(&ids)
        .map(|id| attach(&http, &base, id))
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    let with_terminals = reading(pid).await;
    // Everything left as it is until serve has closed its idle connections to the harnesses
    // (read last: the heap they free is reused by whatever is allocated next, which would make
    // streams or terminals measured after it look cheaper than they are).
    tokio::time::sleep(POOL_IDLE_WAIT).await;
    let later = reading(pid).await;
    let harness_attached = sandbox_memory(&sandboxes_dir);
    let available_loaded = meminfo_kib("MemAvailable:");

    let per_item = |a: &Reading, b: &Reading, f: fn(&Memory) -> u64| {
        (f(&b.mem) as f64 - f(&a.mem) as f64) / n as f64
    };
    out.push_str(&format!(
        "### Memory of `serve` (its own process; every sandbox is a separate process)\n\n\
         Read from /proc/PID/smaps_rollup {}s after each state is reached (median of {SAMPLES} \
         samples). RSS counts shared file pages (the binary, libraries) too; private is the pages \
         only serve maps; anonymous is heap, stacks and buffers.\n\n\
         | state | RSS | private | anonymous | open files |\n|---|---|---|---|---|\n",
        SETTLE.as_secs()
    ));
    for (name, r) in [
        (
            "empty (after one warm-up session, deleted)".to_string(),
            &empty,
        ),
        (format!("{n} idle sessions"), &idle),
        (format!("+ {n} open event streams (SSE)"), &with_streams),
        (
            format!("+ {n} attached terminals (`tty_url`)"),
            &with_terminals,
        ),
        (
            format!(
                "the same, {} s later (serve's idle keep-alive connections to the harnesses closed)",
                POOL_IDLE_WAIT.as_secs()
            ),
            &later,
        ),
    ] {
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            mib(r.mem.rss),
            mib(r.mem.private),
            mib(r.mem.anonymous),
            r.fds
        ));
    }
    out.push_str("\n| per | RSS | private | anonymous | target |\n|---|---|---|---|---|\n");
    let mut verdicts = Vec::new();
    for (name, a, b, target) in [
        (
            "idle session".to_string(),
            &empty,
            &idle,
            TARGET_SESSION_KIB,
        ),
        (
            "open event stream".to_string(),
            &idle,
            &with_streams,
            TARGET_STREAM_KIB,
        ),
        (
            "attached terminal".to_string(),
            &with_streams,
            &with_terminals,
            TARGET_TERMINAL_KIB,
        ),
    ] {
        let rss = per_item(a, b, |m| m.rss);
        out.push_str(&format!(
            "| {name} | {rss:.1} KiB | {:.1} KiB | {:.1} KiB | ≤ {target:.0} KiB |\n",
            per_item(a, b, |m| m.private),
            per_item(a, b, |m| m.anonymous),
        ));
        verdicts.push(format!(
            "{name} {rss:.0} KiB ({})",
            if rss <= target { "met" } else { "not met" }
        ));
    }
    out.push_str(&format!(
        "\nAgainst the targets, by RSS: {}.\n\n",
        verdicts.join(", ")
    ));
    out.push_str(&format!(
        "{n} sessions created in {:.1} s ({:.0} per second, each a new sandbox process, \
         {CONCURRENCY} at a time).\n\n",
        create_wall.as_secs_f64(),
        n as f64 / create_wall.as_secs_f64().max(1e-6),
    ));

    out.push_str(&format!(
        "### The sandboxes: {n} harness servers\n\n\
         Each sandbox is a harness server process (the table; `sandwarden-harness` when built) and the `sh` it runs under a \
         PTY; confined ({isolation}), also the processes that hold it: `sandwarden sandbox-exec --stay` \
         (bubblewrap's parent) and bubblewrap's two. PSS divides each shared page among the processes \
         mapping it, so it is each process's fair share of the machine's memory; RSS counts the \
         shared binary in full in every process.\n\n\
         | harness server | RSS (median) | PSS (median) | private (median) | whole sandbox PSS, total | confinement PSS per sandbox |\n\
         |---|---|---|---|---|---|\n{}\n{}\n\n",
        harness_idle.row("idle"),
        harness_attached.row("with a terminal attached through serve"),
    ));
    if let (Some(before), Some(loaded)) = (available_before, available_loaded) {
        out.push_str(&format!(
            "MemAvailable fell by {:.2} GiB from the start to the loaded state ({n} sandboxes, \
             their streams and terminals, serve and this client).\n",
            before.saturating_sub(loaded) as f64 / 1024.0 / 1024.0
        ));
    }
    drop(terminals);
    drop(streams);
    drop(serve);
    Ok(out)
}

fn read_number(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A field of /proc/meminfo, in KiB.
fn meminfo_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// serve's memory at rest: after `SETTLE`, the median by RSS of `SAMPLES` readings.
async fn reading(pid: u32) -> Reading {
    tokio::time::sleep(SETTLE).await;
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        samples.push(sandwarden::procfs::memory(pid).unwrap_or_default());
        tokio::time::sleep(SAMPLE_GAP).await;
    }
    samples.sort_by_key(|m| m.rss);
    let fds = sandwarden::procfs::open_files(pid);
    Reading {
        mem: samples[SAMPLES / 2],
        fds,
    }
}

/// A new terminal session, once it is `ready`.
async fn ready_session(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let s = create(http, base, "sh").await?;
    let id = s["id"]
        .as_str()
        .with_context(|| format!("no session id in {s}"))?
        .to_string();
    wait_ready_session(http, base, &id).await?;
    Ok(id)
}

/// The session's event stream, open (headers received), its body left to arrive.
async fn open_stream(
    http: &reqwest::Client,
    base: &str,
    id: &str,
) -> anyhow::Result<reqwest::Response> {
    let r = http
        .get(format!("{base}/v1/sessions/{id}/events"))
        .bearer_auth(KEY)
        .header("accept", "text/event-stream")
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success()
            && r.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream")),
        "the event stream of {id} did not open: {}",
        r.status()
    );
    Ok(r)
}

/// The session as `GET /v1/sessions/{id}` shows it.
async fn get_session(
    http: &reqwest::Client,
    base: &str,
    id: &str,
) -> anyhow::Result<serde_json::Value> {
    crate::serve::get_session_as(http, base, KEY, id).await
}

/// The session's terminal, attached through serve by its `tty_url`.
async fn attach(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<Ws> {
    let s = get_session(http, base, id).await?;
    let url = s["tty_url"]
        .as_str()
        .with_context(|| format!("no tty_url on session {id}: {s}"))?;
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("attaching to the terminal of {id}"))?;
    Ok(ws)
}

/// The memory of every sandbox under one `serve`: each harness server, the total PSS of each
/// sandbox's processes, and the part of it that is confinement (`sandbox-exec`, bubblewrap).
struct Sandboxes {
    harness: Vec<Memory>,
    total_pss: u64,
    confinement_pss: u64,
}

fn sandbox_memory(sandboxes_dir: &str) -> Sandboxes {
    let needles = [sandboxes_dir, "harness --listen"];
    let matches = |pid: u32| sandwarden::procfs::command_matches(i64::from(pid), &needles);
    let mut out = Sandboxes {
        harness: Vec::new(),
        total_pss: 0,
        confinement_pss: 0,
    };
    // A sandbox's root is the first process of its chain whose command line names it (its
    // parent is `serve`); under bubblewrap the chain is sandbox-exec → bwrap → bwrap → harness,
    // and the harness server is the last process of it whose command line starts a harness.
    let roots = sandwarden::procfs::pids_matching(&needles)
        .into_iter()
        .filter_map(|pid| u32::try_from(pid).ok())
        .filter(|pid| !sandwarden::procfs::parent(*pid).is_some_and(matches));
    for root in roots {
        let tree: Vec<u32> = std::iter::once(root)
            .chain(sandwarden::procfs::descendants(root))
            .collect();
        let Some(harness) = tree.iter().copied().find(|pid| {
            sandwarden::procfs::command_matches(i64::from(*pid), &["harness --listen"])
                && !sandwarden::procfs::children(*pid).into_iter().any(|c| {
                    sandwarden::procfs::command_matches(i64::from(c), &["harness --listen"])
                })
        }) else {
            continue;
        };
        let Some(m) = sandwarden::procfs::memory(harness) else {
            continue;
        };
        out.harness.push(m);
        let below: Vec<u32> = std::iter::once(harness)
            .chain(sandwarden::procfs::descendants(harness))
            .collect();
        for pid in tree {
            let pss = sandwarden::procfs::memory(pid).map_or(0, |m| m.pss);
            out.total_pss += pss;
            if !below.contains(&pid) {
                out.confinement_pss += pss;
            }
        }
    }
    out
}

impl Sandboxes {
    fn median(&self, f: fn(&Memory) -> u64) -> u64 {
        let mut v: Vec<u64> = self.harness.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    fn row(&self, state: &str) -> String {
        let count = self.harness.len().max(1) as f64;
        format!(
            "| {state} ({} processes) | {} | {} | {} | {:.2} GiB ({:.1} MiB per sandbox) | {:.0} KiB |",
            self.harness.len(),
            mib(self.median(|m| m.rss)),
            mib(self.median(|m| m.pss)),
            mib(self.median(|m| m.private)),
            self.total_pss as f64 / 1024.0 / 1024.0,
            self.total_pss as f64 / 1024.0 / count,
            self.confinement_pss as f64 / count,
        )
    }
}
