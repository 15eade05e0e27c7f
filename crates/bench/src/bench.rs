//! `sandwarden-bench`: measurements taken side by side in one run, reported as percentiles and
//! ratios (timings on shared machines are noisy; never assert on them in tests).
//!
//! `bench harness` measures the in-sandbox server: start to listening and to ready, idle memory,
//! PTY keystroke echo round trip and PTY throughput, each against the PTY used directly.

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use sandwarden_proto::harness_client::HarnessClient;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

pub(crate) const TOKEN: &str = "bench-token-0123456789";
/// A program that echoes every byte at once: the PTY in raw mode, `cat` copying input to output.
pub(crate) const ECHO_PROGRAM: &str = "sh -c 'stty raw -echo; exec cat'";

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    #[arg(value_enum, default_value = "harness")]
    pub scenario: Scenario,
    /// Harness starts to time (each one a fresh process).
    #[arg(long, env = "SANDWARDEN_BENCH_STARTS", default_value_t = 20)]
    pub starts: usize,
    /// Keystroke round trips per path.
    #[arg(long, env = "SANDWARDEN_BENCH_ROUND_TRIPS", default_value_t = 5000)]
    pub round_trips: usize,
    /// Bytes the program writes in each throughput run.
    #[arg(long, env = "SANDWARDEN_BENCH_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub bytes: u64,
    /// Cold starts per agent CLI (`bench harnesses`; each boots the CLI, seconds apiece).
    #[arg(long, env = "SANDWARDEN_BENCH_COLD_STARTS", default_value_t = 5)]
    pub cold_starts: usize,
    /// Warm claims per agent CLI (`bench harnesses`; a pause between claims lets the pool refill).
    #[arg(long, env = "SANDWARDEN_BENCH_WARM_CLAIMS", default_value_t = 8)]
    pub warm_claims: usize,
    /// Turns per path in the sandwarden vs sandbox-agent comparison (`bench harnesses`).
    #[arg(long, env = "SANDWARDEN_BENCH_TURNS", default_value_t = 20)]
    pub turns: usize,
    /// The peer's `sandbox-agent` binary (`bench harnesses`); else PATH, else an npm install of
    /// @sandbox-agent/cli-linux-x64 into a scratch prefix under the temp dir.
    #[arg(long, env = "SANDWARDEN_BENCH_SANDBOX_AGENT")]
    pub sandbox_agent: Option<PathBuf>,
    /// The PostgreSQL server `bench postgres` makes its scratch database on (default:
    /// SANDWARDEN_TEST_POSTGRES, as scripts/start-postgres prints).
    #[arg(long, env = "SANDWARDEN_BENCH_POSTGRES", hide_env_values = true)]
    pub postgres: Option<String>,
    /// Sandboxes in the namespace (`bench controller`, `bench claims`).
    #[arg(long, default_value_t = 10_000)]
    pub sandboxes: usize,
    /// Idle sessions (each its own sandbox process), event streams and terminals (`bench density`).
    #[arg(long, env = "SANDWARDEN_BENCH_SESSIONS", default_value_t = 1000)]
    pub sessions: usize,
    /// Seconds a program floods a viewer that reads nothing (`bench tty`).
    #[arg(long, env = "SANDWARDEN_BENCH_FLOOD_SECS", default_value_t = 6)]
    pub flood_secs: u64,
    /// Connections the flooding tenant opens and keeps (`bench flood`).
    #[arg(long, env = "SANDWARDEN_BENCH_CONNECTIONS", default_value_t = 20_000)]
    pub connections: usize,
    /// Niceness of the flood's client processes (`bench flood`; 0: as serve). On one machine
    /// the flood's client takes CPU serve and the other tenant would have on their own
    /// machines; 19 gives them that CPU first, standing in for a client elsewhere.
    #[arg(long, env = "SANDWARDEN_BENCH_FLOOD_NICE", default_value_t = 0)]
    pub flood_nice: u8,
    /// Unary turns sent to each server (`bench peers`), or per route (`bench vendors`).
    #[arg(long, env = "SANDWARDEN_BENCH_PEER_TURNS", default_value_t = 1000)]
    pub peer_turns: usize,
    /// Where `bench peers` keeps the peers' virtualenvs (made once, from PyPI) and scratch
    /// folders (default: the temp dir's sandwarden-bench-peers).
    #[arg(long, env = "SANDWARDEN_BENCH_PEERS_DIR")]
    pub peers_dir: Option<PathBuf>,
    /// wetty's `build/main.js` (`bench tty`): adds wetty, run by `node`, as a third path.
    #[arg(long, env = "SANDWARDEN_BENCH_WETTY")]
    pub wetty: Option<PathBuf>,
    /// Replace this benchmark's section of this Markdown file with the results (e.g.
    /// docs/benchmarks.md).
    #[arg(long, env = "SANDWARDEN_BENCH_WRITE")]
    pub write: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The in-sandbox server: start, memory, PTY latency and throughput.
    Harness,
    /// The orchestrator: message path overhead, SSE first event, warm claims, memory.
    Serve,
    /// serve's terminal bridge (`tty_url`) against the harness WebSocket directly: keystroke
    /// round trip, throughput, memory under a flood to a viewer that does not read.
    Tty,
    /// Container sandboxes (`serve --runtime docker`, engine from DOCKER_HOST) against local
    /// processes: claims, cold starts, message and terminal latency, memory per sandbox.
    Docker,
    /// Kubernetes claims: a burst of concurrent claimers draining a warm pool on the in-memory
    /// API server with injected latency.
    Claims,
    /// The controller at scale: `serve --runtime kubernetes` with many Sandboxes on the
    /// in-memory API server: reconcile throughput and memory per cached Sandbox.
    Controller,
    /// The real agent CLIs (opencode, claude-agent-sdk, codex) against the fake model: cold
    /// starts, warm claim → first event, turns; one opencode ACP turn through sandwarden vs the
    /// peer sandbox-agent.
    Harnesses,
    /// Density: `serve`'s memory with many idle sessions, open event streams and attached
    /// terminals (each session its own local sandbox), and the sandboxes' harness servers.
    Density,
    /// Local sandboxes' start (warm claim, cold start) with `--isolation none` and `bwrap`
    /// side by side: what confinement costs.
    Isolation,
    /// The PostgreSQL store: message path against SQLite and the harness directly, and event
    /// fan-out delay between two replicas.
    Postgres,
    /// Issue 18's descriptor flood: one tenant opens `--connections` event streams and keeps
    /// them all; another tenant's message latency quiet and during it; serve's descriptors and
    /// memory.
    Flood,
    /// serve's peak memory for the largest history page the bounds allow, fetched by several
    /// clients at once.
    History,
    /// The seed platforms' own open servers beside serve (Karta's dev server from PyPI; Motus
    /// where Python 3.12 is on PATH): the same unary turn, interleaved; CPU, memory, start.
    Peers,
    /// The vendor-compatible APIs through the official SDKs (from PyPI) beside the native API:
    /// a message's post to its first streamed event.
    Vendors,
    /// The seed clients' mounts and the chat APIs beside the native message route: a whole
    /// turn with plain HTTP, as each client makes its calls.
    Mounts,
    /// One process of `bench flood`'s client (started by it).
    #[value(hide = true)]
    FloodWorker,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let (report, section) = match args.scenario {
        Scenario::Harness => (harness(&args).await?, "harness"),
        Scenario::Serve => (crate::serve::run(&args).await?, "serve"),
        Scenario::Tty => (crate::tty::run(&args).await?, "tty"),
        Scenario::Docker => (crate::docker::run(&args).await?, "docker"),
        Scenario::Claims => (crate::claims::run(&args).await?, "claims"),
        Scenario::Controller => (crate::controller::run(&args).await?, "controller"),
        Scenario::Harnesses => (crate::harnesses::run(&args).await?, "harnesses"),
        Scenario::Postgres => (crate::postgres::run(&args).await?, "postgres"),
        Scenario::Isolation => (crate::isolation::run(&args).await?, "isolation"),
        Scenario::Density => (crate::density::run(&args).await?, "density"),
        Scenario::Flood => (crate::flood::run(&args).await?, "flood"),
        Scenario::History => (crate::history::run(&args).await?, "history"),
        Scenario::Peers => (crate::peers::run(&args).await?, "peers"),
        Scenario::Vendors => (crate::vendors::run(&args).await?, "vendors"),
        Scenario::Mounts => (crate::mounts::run(&args).await?, "mounts"),
        Scenario::FloodWorker => (crate::flood::worker().await?, "flood-worker"),
    };
    // A flood worker has said what it had to on its own.
    if !report.is_empty() {
        println!("{report}");
    }
    if let Some(path) = &args.write {
        write_section(path, section, &report)?;
        eprintln!("wrote the {section} section of {}", path.display());
    }
    Ok(())
}

/// A binary of this build beside `sandwarden-bench` (`sandwarden`, `sandwarden-fake-model`).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding this binary")?;
    let path = me.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build the whole workspace first (`cargo build --release`)",
        path.display()
    );
    Ok(path)
}

/// A `sandwarden harness` child started for measuring.
pub(crate) struct Started {
    pub(crate) child: Child,
    pub(crate) addr: String,
    listen_after: Duration,
}

impl Drop for Started {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

pub(crate) fn start_harness(args: &[&str]) -> anyhow::Result<Started> {
    start_harness_with_env(args, &[])
}

/// `start_harness` with extra environment for the harness and its agent.
pub(crate) fn start_harness_with_env(
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<Started> {
    // The program local sandboxes run: the slim binary when it is from this build.
    let program = sandwarden_harness::binary::HarnessProgram::beside(&sibling("sandwarden")?);
    let t0 = Instant::now();
    let mut child = Command::new(&program.path)
        .args(&program.leading)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("SANDWARDEN_TOKEN", TOKEN)
        .env("SANDWARDEN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting sandwarden harness")?;
    let stdout = child.stdout.take().context("harness stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let listen_after = t0.elapsed();
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("unexpected first line {line:?}"))?;
    let addr = v["listening"]
        .as_str()
        .context("no listening address")?
        .to_string();
    Ok(Started {
        child,
        addr,
        listen_after,
    })
}

pub(crate) async fn wait_ready(client: &HarnessClient) -> anyhow::Result<()> {
    for _ in 0..20_000 {
        if let Ok(h) = client.health().await
            && h.phase == sandwarden_proto::event::Phase::Ready
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    anyhow::bail!("the harness did not become ready")
}

pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// p50 / p99 / p99.9 of a histogram of microseconds, as a table row.
pub(crate) fn row(name: &str, h: &Histogram<u64>) -> String {
    format!(
        "| {name} | {} | {} | {} | {} |",
        fmt_us(h.value_at_quantile(0.5)),
        fmt_us(h.value_at_quantile(0.99)),
        fmt_us(h.value_at_quantile(0.999)),
        h.len()
    )
}

/// What `via` adds to `base` at quantile `q`, formatted: negative (noise between the runs) when
/// `via` came out faster there.
pub(crate) fn fmt_added(via: &Histogram<u64>, base: &Histogram<u64>, q: f64) -> String {
    let (a, b) = (via.value_at_quantile(q), base.value_at_quantile(q));
    if a >= b {
        fmt_us(a - b)
    } else {
        format!("−{}", fmt_us(b - a))
    }
}

pub(crate) fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

async fn harness(args: &BenchArgs) -> anyhow::Result<String> {
    let mut out = String::new();
    let machine = machine_line();
    let server = sandwarden_harness::binary::HarnessProgram::for_this_binary()?.name();
    out.push_str(&format!(
        "Command: `sandwarden-bench harness --starts {} --round-trips {} --bytes {}` \
         (release build). Machine: {machine}. The harness server measured is the program local \
         sandboxes run: `{}`.\n\n",
        args.starts, args.round_trips, args.bytes, server,
    ));

    // 1. Start time and idle memory.
    let mut listen = histogram()?;
    let mut ready_api = histogram()?;
    let mut ready_tui = histogram()?;
    let mut rss_api = Vec::new();
    let mut rss_tui = Vec::new();
    for i in 0..args.starts {
        let api = i % 2 == 0;
        let t0 = Instant::now();
        let started = if api {
            start_harness(&["--kind", "api", "--agent", "sandwarden echo-agent"])?
        } else {
            start_harness(&["--kind", "tui", "--command", "sh"])?
        };
        listen.record(started.listen_after.as_micros() as u64)?;
        let client = HarnessClient::new(format!("http://{}", started.addr), TOKEN);
        wait_ready(&client).await?;
        let ready_after = t0.elapsed().as_micros() as u64;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = sandwarden::procfs::rss_kib(started.child.id());
        if api {
            ready_api.record(ready_after)?;
            rss_api.push(rss);
        } else {
            ready_tui.record(ready_after)?;
            rss_tui.push(rss);
        }
    }
    rss_api.sort_unstable();
    rss_tui.sort_unstable();
    let median = |v: &[u64]| v.get(v.len() / 2).copied().unwrap_or(0);
    out.push_str("### Harness server start and idle memory\n\n");
    out.push_str("| measure | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("process start → listening (line on stdout)", &listen));
    out.push('\n');
    out.push_str(&row(
        "start → ready, api kind (echo agent, ACP handshake done)",
        &ready_api,
    ));
    out.push('\n');
    out.push_str(&row(
        "start → ready, tui kind (`sh` under a PTY)",
        &ready_tui,
    ));
    out.push_str("\n\n");
    out.push_str(&format!(
        "Idle RSS of the harness server (agent or program not included), median: api {:.1} MiB, \
         tui {:.1} MiB. Targets: listening under 50 ms, idle RSS under 10 MiB; the peer \
         sandbox-agent 0.4.2 measured 71–104 ms to healthy and 13.6 MB idle on this kind of \
         machine (shared/reference/harnesses.md).\n\n",
        median(&rss_api) as f64 / 1024.0,
        median(&rss_tui) as f64 / 1024.0,
    ));

    // 2. Keystroke echo round trip: the PTY directly vs through the harness WebSocket, interleaved.
    let started = start_harness(&["--kind", "tui", "--command", ECHO_PROGRAM])?;
    let client = HarnessClient::new(format!("http://{}", started.addr), TOKEN);
    wait_ready(&client).await?;
    let (mut ws, _) = tokio_tungstenite::connect_async(client.tty_request()?).await?;
    let mut direct = DirectPty::spawn(ECHO_PROGRAM)?;
    // Let both programs switch to raw mode before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain_ws(&mut ws).await;
    let mut via_direct = histogram()?;
    let mut via_harness = histogram()?;
    let block = 100;
    let mut done = 0;
    while done < args.round_trips {
        for i in 0..block {
            let byte = b'a' + (i % 26) as u8;
            via_direct.record(direct.round_trip(byte).await?)?;
        }
        for i in 0..block {
            let byte = b'a' + (i % 26) as u8;
            via_harness.record(ws_round_trip(&mut ws, byte).await?)?;
        }
        done += block;
    }
    drop(ws);
    drop(direct);
    drop(started);
    out.push_str("### PTY keystroke echo round trip (one byte, `stty raw; cat`)\n\n");
    out.push_str("| path | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("PTY master directly (baseline)", &via_direct));
    out.push('\n');
    out.push_str(&row(&format!("WebSocket through `{server}`"), &via_harness));
    out.push_str("\n\n");
    let added = |q: f64| fmt_added(&via_harness, &via_direct, q);
    out.push_str(&format!(
        "Added by the harness: p50 {}, p99 {}, p99.9 {} (target: p99 under 1 ms added).\n\n",
        added(0.5),
        added(0.99),
        added(0.999)
    ));

    // 3. Throughput of program output to one client.
    let program = format!("sh -c 'read x; head -c {} /dev/zero'", args.bytes);
    let mut direct_rates = Vec::new();
    let mut harness_rates = Vec::new();
    for _ in 0..3 {
        direct_rates.push(direct_throughput(&program).await?);
        harness_rates.push(harness_throughput(&program).await?);
    }
    direct_rates.sort_by(f64::total_cmp);
    harness_rates.sort_by(f64::total_cmp);
    let (d, h) = (direct_rates[1], harness_rates[1]);
    out.push_str("### PTY throughput to one client (median of 3 runs)\n\n");
    out.push_str("| path | MB/s |\n|---|---|\n");
    out.push_str(&format!("| PTY master directly (baseline) | {d:.0} |\n"));
    out.push_str(&format!("| WebSocket through `{server}` | {h:.0} |\n\n"));
    out.push_str(&format!(
        "Through the harness: {:.0}% of reading the PTY directly (target: over 100 MB/s). The \
         baseline is a plain read loop; the harness also takes whatever output is already \
         waiting before it sends a frame, which is why it can come out ahead.\n",
        100.0 * h / d
    ));
    Ok(out)
}

/// A program under a PTY opened by this process: the baseline without the harness.
struct DirectPty {
    _child: tokio::process::Child,
    pty: pty_process::Pty,
}

impl DirectPty {
    fn spawn(line: &str) -> anyhow::Result<Self> {
        let argv = sandwarden_harness::process::parse_command_line(line)?;
        let (pty, pts) = pty_process::open()?;
        pty.resize(pty_process::Size::new(40, 120))?;
        let child = pty_process::Command::new(&argv[0])
            .args(&argv[1..])
            .kill_on_drop(true)
            .spawn(pts)?;
        Ok(DirectPty { _child: child, pty })
    }

    async fn round_trip(&mut self, byte: u8) -> anyhow::Result<u64> {
        let mut buf = [0u8; 64];
        let t0 = Instant::now();
        self.pty.write_all(&[byte]).await?;
        loop {
            let n = self.pty.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the program closed the PTY");
            if buf[..n].contains(&byte) {
                return Ok(t0.elapsed().as_micros() as u64);
            }
        }
    }
}

pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub(crate) async fn drain_ws(ws: &mut Ws) {
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), ws.next()).await {}
}

pub(crate) async fn ws_round_trip(ws: &mut Ws, byte: u8) -> anyhow::Result<u64> {
    let t0 = Instant::now();
    ws.send(Message::Binary(vec![byte].into())).await?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.contains(&byte) => {
                return Ok(t0.elapsed().as_micros() as u64);
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("the terminal closed during the benchmark: {other:?}"),
        }
    }
}

async fn direct_throughput(program: &str) -> anyhow::Result<f64> {
    let mut pty = DirectPty::spawn(program)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut buf = vec![0u8; 64 * 1024];
    let t0 = Instant::now();
    pty.pty.write_all(b"go\n").await?;
    let mut total = 0u64;
    loop {
        match pty.pty.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64() / 1e6)
}

async fn harness_throughput(program: &str) -> anyhow::Result<f64> {
    let started = start_harness(&["--kind", "tui", "--command", program])?;
    let client = HarnessClient::new(format!("http://{}", started.addr), TOKEN);
    wait_ready(&client).await?;
    let (mut ws, _) = tokio_tungstenite::connect_async(client.tty_request()?).await?;
    ws_throughput(&mut ws).await
}

/// Longest a throughput run may wait for the program's next output before giving up on it.
const OUTPUT_STALL_LIMIT: Duration = Duration::from_secs(120);

/// Sends "go" to a terminal program waiting for a line (`read x; head -c N /dev/zero`), then
/// counts the bytes of its output until it exits or the socket closes: MB/s.
pub(crate) async fn ws_throughput(ws: &mut Ws) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    ws.send(Message::Binary(b"go\n".to_vec().into())).await?;
    let mut total = 0u64;
    while let Some(msg) = tokio::time::timeout(OUTPUT_STALL_LIMIT, ws.next())
        .await
        .context("the program's output stalled")?
    {
        match msg? {
            Message::Binary(b) => total += b.len() as u64,
            Message::Text(t) if t.contains("\"exit\"") => break,
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64() / 1e6)
}

/// The 1-minute load average, to say how busy the shared machine was.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}")
}

/// Replaces (or appends) one section of a Markdown file, leaving the rest alone.
fn write_section(path: &std::path::Path, name: &str, report: &str) -> anyhow::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let (begin, end) = (
        format!("<!-- bench:{name} -->"),
        format!("<!-- /bench:{name} -->"),
    );
    let section = format!("{begin}\n{report}{end}");
    let updated = match (existing.find(&begin), existing.find(&end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{section}{}", &existing[..a], &existing[b + end.len()..])
        }
        _ => format!("{existing}\n## {name}\n\n{section}\n"),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}
