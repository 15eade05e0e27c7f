//! `sandwarden-bench peers`: `serve` beside the seed platforms' own open servers, the same unary
//! turn sent to each by the same client, interleaved in one run. Karta's dev server
//! (`karta-runtime dev-serve`, from PyPI, with its stub harness) runs from a virtualenv this
//! benchmark makes once; Motus' server needs Python 3.12 or later and is run only when such a
//! Python is on PATH. A benchmark, not a test: it downloads from PyPI.

use crate::bench::{BenchArgs, fmt_us, histogram, load_average, machine_line, row};
use crate::serve::{Serve, create, start_serve, start_serve_env, unary_turn, wait_ready_session};
use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Karta release measured (its dev server and stub harness).
const KARTA: &str = "karta-runtime==0.6.76";
/// The Motus release whose server `bench peers` would run beside serve.
const MOTUS: &str = "lithosai-motus==0.4.3";
/// Turns sent to each server before measuring.
const WARM_UP: usize = 50;
/// Most turns measured on Motus (about 0.1 s each).
const MOTUS_TURNS: usize = 300;

/// A peer server process, stopped when dropped.
struct Peer {
    child: Child,
    base: String,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// Where the Python benchmarks keep their virtualenvs and scratch folders (`--peers-dir`, else
/// the temp dir's sandwarden-bench-peers), made if missing.
pub(crate) fn scratch_dir(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    let scratch = args
        .peers_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("sandwarden-bench-peers"));
    std::fs::create_dir_all(&scratch)?;
    Ok(scratch)
}

/// The virtualenv at `dir` with `packages` installed: made with `python` and pip the first
/// time, reused after.
pub(crate) fn venv(
    python: &str,
    dir: &Path,
    packages: &[&str],
    program: &str,
) -> anyhow::Result<PathBuf> {
    let bin = dir.join("bin");
    let package = packages.join(" ");
    let marker = dir.join(format!(".installed-{}", packages.join("-")));
    if marker.exists() && bin.join(program).exists() {
        return Ok(bin);
    }
    let made = Command::new(python)
        .args(["-m", "venv"])
        .arg(dir)
        .status()
        .with_context(|| format!("running {python} -m venv"))?;
    anyhow::ensure!(made.success(), "{python} -m venv {} failed", dir.display());
    eprintln!("installing {package} from PyPI into {}", dir.display());
    let installed = Command::new(bin.join("pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .status()
        .context("running pip")?;
    anyhow::ensure!(installed.success(), "pip install {package} failed");
    std::fs::write(&marker, "")?;
    Ok(bin)
}

/// Polls `url` until it answers 200; the time that took.
async fn until_ok(http: &reqwest::Client, url: &str, started: Instant) -> anyhow::Result<Duration> {
    let deadline = started + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} did not answer within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `program` from the virtualenv's `bin`, in an environment of its own (PATH with `bin` first,
/// `home` as HOME; the caller adds the rest), output discarded.
fn peer_command(bin: &Path, program: &str, home: &Path) -> Command {
    let mut command = Command::new(bin.join(program));
    command
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

/// Starts a peer server listening on `port`; returns once `health` answers, with the time that
/// took.
async fn spawn_peer(
    http: &reqwest::Client,
    mut command: Command,
    port: u16,
    health: &str,
) -> anyhow::Result<(Peer, Duration)> {
    let started = Instant::now();
    let peer = Peer {
        child: command.spawn()?,
        base: format!("http://127.0.0.1:{port}"),
    };
    let ready = until_ok(http, &format!("{}{health}", peer.base), started).await?;
    Ok((peer, ready))
}

/// Karta's dev server with its stub harness on a free port, in a scratch agent folder, with an
/// environment of its own (no control plane, no API keys: its documented open dev mode).
async fn start_karta(
    http: &reqwest::Client,
    bin: &Path,
    scratch: &Path,
) -> anyhow::Result<(Peer, Duration)> {
    let (agent, home, tmp) = (
        scratch.join("agent"),
        scratch.join("home"),
        scratch.join("tmp"),
    );
    for d in [&agent, &home, &tmp] {
        std::fs::create_dir_all(d)?;
    }
    let port = crate::nginx::free_port()?;
    let mut command = peer_command(bin, "karta-runtime", &home);
    command
        .arg("dev-serve")
        .arg(&agent)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("TMPDIR", &tmp)
        .env("KARTA_USE_STUB_HARNESS", "1");
    spawn_peer(http, command, port, "/healthz")
        .await
        .context("starting karta-runtime dev-serve")
}

/// One unary turn on a Karta session: microseconds, and the reply's text.
async fn karta_turn(
    http: &reqwest::Client,
    base: &str,
    session: &str,
    text: &str,
) -> anyhow::Result<(u64, String)> {
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/v1/sessions/{session}/messages"))
        .json(&json!({ "text": text }))
        .send()
        .await?;
    let status = r.status();
    let body: serde_json::Value = r.json().await?;
    let took = t0.elapsed().as_micros() as u64;
    anyhow::ensure!(status.is_success(), "Karta turn failed: {status} {body}");
    Ok((took, body["text"].as_str().unwrap_or_default().to_string()))
}

/// The echo agent Motus' server runs: Motus has no built-in stub, so this is the smallest
/// agent its server takes (a function of the message and the history).
const MOTUS_ECHO_AGENT: &str = r#"from motus.models import ChatMessage


def echo(message: ChatMessage, state: list[ChatMessage]):
    reply = ChatMessage.assistant_message(content=f"echo: {message.content}")
    return reply, state + [message, reply]
"#;
/// Motus' server (`motus serve start`) with the echo agent, one worker, on a free port.
async fn start_motus(
    http: &reqwest::Client,
    bin: &Path,
    scratch: &Path,
) -> anyhow::Result<(Peer, Duration)> {
    let (agent, home) = (scratch.join("motus-agent"), scratch.join("motus-home"));
    for d in [&agent, &home] {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(agent.join("echo_agent.py"), MOTUS_ECHO_AGENT)?;
    let port = crate::nginx::free_port()?;
    let mut command = peer_command(bin, "motus", &home);
    command
        .args(["serve", "start", "echo_agent:echo", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string(), "--workers", "1"])
        .args(["--log-level", "warning"])
        .current_dir(&agent);
    spawn_peer(http, command, port, "/health")
        .await
        .context("starting motus serve")
}

/// One turn on a Motus session, as its client does it: the message (202), then long-polls
/// until the session is no longer `running`; microseconds, and the reply's text.
async fn motus_turn(
    http: &reqwest::Client,
    base: &str,
    session: &str,
    text: &str,
) -> anyhow::Result<(u64, String)> {
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/sessions/{session}/messages"))
        .json(&json!({ "content": text }))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().as_u16() == 202,
        "Motus refused the message: {}",
        r.status()
    );
    loop {
        let v: serde_json::Value = http
            .get(format!("{base}/sessions/{session}?wait=true&timeout=30"))
            .send()
            .await?
            .json()
            .await?;
        match v["status"].as_str() {
            Some("running") => continue,
            Some("idle") => {
                let took = t0.elapsed().as_micros() as u64;
                let reply = v["response"]["content"].as_str().unwrap_or_default();
                return Ok((took, reply.to_string()));
            }
            _ => anyhow::bail!("Motus turn failed: {v}"),
        }
    }
}

/// Motus' server with a session on it.
async fn motus_under_test(
    http: &reqwest::Client,
    bin: &Path,
    scratch: &Path,
) -> anyhow::Result<UnderTest> {
    let (motus, ready) = start_motus(http, bin, scratch).await?;
    let v: serde_json::Value = http
        .post(format!("{}/sessions", motus.base))
        .send()
        .await?
        .json()
        .await?;
    let session = v["session_id"]
        .as_str()
        .with_context(|| format!("no Motus session id in {v}"))?
        .to_string();
    UnderTest::peer(
        "Motus serve, echo agent",
        Protocol::Motus,
        motus,
        ready,
        session,
    )
}

/// `pid`, every process below it, and the processes whose command line names `dir` (serve's
/// sandboxes run on their own, outside its process tree).
fn processes(pid: u32, dir: Option<&Path>) -> Vec<u32> {
    let mut all: Vec<u32> = std::iter::once(pid)
        .chain(sandwarden::procfs::descendants(pid))
        .collect();
    if let Some(dir) = dir {
        for sandbox in sandwarden::procfs::pids_matching(&[&dir.to_string_lossy()]) {
            if let Ok(sandbox) = u32::try_from(sandbox) {
                all.push(sandbox);
                all.extend(sandwarden::procfs::descendants(sandbox));
            }
        }
    }
    all.sort_unstable();
    all.dedup();
    all
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&p| sandwarden::procfs::cpu_seconds(p))
        .sum()
}

fn rss_of(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| sandwarden::procfs::rss_kib(p)).sum()
}

/// A Python of at least 3.12 that runs, for Motus: on PATH, else one of pyenv's versions
/// (pyenv's shims exist on PATH even when they cannot run that version).
fn python_312() -> Option<String> {
    let runs = |python: &str| {
        Command::new(python)
            .args(["-c", "import sys; sys.exit(sys.version_info < (3, 12))"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let on_path = ["python3.14", "python3.13", "python3.12"].map(String::from);
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .and_then(|root| std::fs::read_dir(root.join("versions")).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin/python3").to_string_lossy().into_owned());
    on_path.into_iter().chain(pyenv).find(|p| runs(p))
}

/// How to send one server a unary turn.
enum Protocol {
    /// sandwarden's `POST /v1/sessions/{id}/messages` with the bench's key.
    Sandwarden,
    /// Karta's `POST /v1/sessions/{id}/messages`, no key.
    Karta,
    /// Motus': `POST /sessions/{id}/messages` (202), then `GET /sessions/{id}?wait=true` while
    /// it is `running` (it has no synchronous reply).
    Motus,
}

/// A server under test: its process (kept running while this lives), a session on it, and
/// what was measured.
struct UnderTest {
    name: String,
    protocol: Protocol,
    base: String,
    session: String,
    /// The server's own process, and it with what it runs (sandboxes, children).
    pid: u32,
    pids: Vec<u32>,
    /// A directory the command lines of processes it runs outside its tree name.
    dir: Option<PathBuf>,
    ready: Duration,
    latency: Histogram<u64>,
    /// Turns measured, and the CPU seconds they took: with what it runs, and its own.
    turns: usize,
    cpu: f64,
    own_cpu: f64,
    _process: Box<dyn std::any::Any>,
}

impl UnderTest {
    /// A peer server (its process and what it starts) with `session` on it.
    fn peer(
        name: &str,
        protocol: Protocol,
        peer: Peer,
        ready: Duration,
        session: String,
    ) -> anyhow::Result<UnderTest> {
        Ok(UnderTest {
            name: name.into(),
            protocol,
            base: peer.base.clone(),
            session,
            pid: peer.child.id(),
            pids: Vec::new(),
            dir: None,
            ready,
            latency: histogram()?,
            turns: 0,
            cpu: 0.0,
            own_cpu: 0.0,
            _process: Box::new(peer),
        })
    }

    /// One unary turn with a prompt of its own: microseconds, checked to answer that prompt.
    async fn turn(&self, http: &reqwest::Client, i: usize) -> anyhow::Result<u64> {
        let text = format!("peers turn {i} for {}", self.name);
        let (us, reply) = match self.protocol {
            Protocol::Sandwarden => {
                let (us, body) = unary_turn(http, &self.base, &self.session, &text).await?;
                let reply: serde_json::Value = serde_json::from_slice(&body)?;
                (us, reply["text"].as_str().unwrap_or_default().to_string())
            }
            Protocol::Karta => karta_turn(http, &self.base, &self.session, &text).await?,
            Protocol::Motus => motus_turn(http, &self.base, &self.session, &text).await?,
        };
        anyhow::ensure!(
            reply.contains(&text),
            "{} answered another prompt: {reply}",
            self.name
        );
        Ok(us)
    }
}

/// Turns with prompts of their own to `servers`, after `WARM_UP` each, interleaved one by one
/// (rotating which goes first, so none always runs right after another); each reply must answer
/// its own prompt, so no server is timed on errors.
async fn measure(
    http: &reqwest::Client,
    servers: &mut [UnderTest],
    turns: usize,
) -> anyhow::Result<()> {
    for i in 0..WARM_UP {
        for s in servers.iter() {
            s.turn(http, i).await?;
        }
    }
    let mut before = Vec::new();
    for s in servers.iter_mut() {
        // After the warm-up: what each runs for its turns has started by now.
        s.pids = processes(s.pid, s.dir.as_deref());
        before.push((cpu_of(&s.pids), cpu_of(&[s.pid])));
    }
    let n = servers.len();
    for i in WARM_UP..WARM_UP + turns {
        for k in 0..n {
            let s = &mut servers[(i + k) % n];
            let us = s.turn(http, i).await?;
            s.latency.record(us)?;
        }
    }
    for (s, (all, own)) in servers.iter_mut().zip(before) {
        s.turns = turns;
        s.cpu = cpu_of(&s.pids) - all;
        s.own_cpu = cpu_of(&[s.pid]) - own;
    }
    Ok(())
}

/// A started serve with a ready echo session on it.
async fn sandwarden_under_test(
    http: &reqwest::Client,
    serve: Serve,
    name: &str,
    started: Instant,
) -> anyhow::Result<UnderTest> {
    let ready = until_ok(http, &format!("{}/readyz", serve.base), started).await?;
    let created = create(http, &serve.base, "echo").await?;
    let session = created["id"].as_str().context("session id")?.to_string();
    wait_ready_session(http, &serve.base, &session).await?;
    let pid = serve.child.id();
    Ok(UnderTest {
        name: name.into(),
        protocol: Protocol::Sandwarden,
        base: serve.base.clone(),
        session,
        pid,
        pids: Vec::new(),
        dir: Some(serve.dir.clone()),
        ready,
        latency: histogram()?,
        turns: 0,
        cpu: 0.0,
        own_cpu: 0.0,
        _process: Box::new(serve),
    })
}

/// Karta's dev server with a session on it.
async fn karta_under_test(
    http: &reqwest::Client,
    bin: &Path,
    scratch: &Path,
) -> anyhow::Result<UnderTest> {
    let (karta, ready) = start_karta(http, bin, scratch).await?;
    let k: serde_json::Value = http
        .post(format!("{}/v1/sessions", karta.base))
        .json(&json!({}))
        .send()
        .await?
        .json()
        .await?;
    let session = k["id"]
        .as_str()
        .with_context(|| format!("no Karta session id in {k}"))?
        .to_string();
    UnderTest::peer(
        "Karta dev-serve, stub harness",
        Protocol::Karta,
        karta,
        ready,
        session,
    )
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let turns = args.peer_turns.max(100);
    let scratch = scratch_dir(args)?;
    let karta_bin = venv(
        "python3",
        &scratch.join("karta-venv"),
        &[KARTA],
        "karta-runtime",
    )?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let mut out = format!(
        "Command: `sandwarden-bench peers --peer-turns {turns}` (release build; {turns} unary \
         turns to each server after {WARM_UP} to warm up, interleaved one by one, one keep-alive \
         client each). Machine: {}; load average at the start {}.\n\n\
         - **sandwarden**: `serve` with its defaults (SQLite, API key, every turn durable before \
         the harness is dialled and before the reply), the `echo` template's sandbox (harness \
         server and echo agent, local processes).\n\
         - **Karta** (`{KARTA}`, PyPI): `karta-runtime dev-serve` with \
         `KARTA_USE_STUB_HARNESS=1` (its stub answers in-process), no API key (its open dev \
         mode), sessions in memory.\n",
        machine_line(),
        load_average(),
    );
    let motus_bin = match python_312() {
        Some(python) => {
            out.push_str(&format!(
                "- **Motus** (`{MOTUS}`, PyPI, on {python}): `motus serve start` with an echo \
                 agent of a few lines (Motus has no stub), one worker; a turn is its client's \
                 `POST …/messages` (202) and `GET /sessions/{{id}}?wait=true` until it is no \
                 longer `running`.\n"
            ));
            Some(venv(
                &python,
                &scratch.join("motus-venv"),
                &[MOTUS],
                "motus",
            )?)
        }
        None => {
            out.push_str(&format!(
                "- **Motus** (`{MOTUS}`): not run. It needs Python 3.12 or later and none was \
                 found (on PATH or in pyenv).\n"
            ));
            None
        }
    };

    let mut servers = Vec::new();
    // serve, timed from the spawn to its first `/readyz` 200; no warm pool, so the one sandbox
    // measured is the session's own.
    let started = Instant::now();
    let serve = start_serve(0)?;
    servers.push(sandwarden_under_test(&http, serve, "sandwarden serve, SQLite", started).await?);
    let postgres = args
        .postgres
        .clone()
        .or_else(|| std::env::var("SANDWARDEN_TEST_POSTGRES").ok());
    match &postgres {
        Some(server) => {
            let db = sandwarden::store::Store::scratch_database(server).await?;
            let started = Instant::now();
            let serve = start_serve_env(
                0,
                "local",
                "[]",
                &[("SANDWARDEN_STORE".into(), db)],
            )?;
            servers.push(
                sandwarden_under_test(&http, serve, "sandwarden serve, PostgreSQL", started)
                    .await?,
            );
        }
        None => out.push_str(
            "- **sandwarden on PostgreSQL**: not run (no `--postgres URL` or SANDWARDEN_TEST_POSTGRES).\n",
        ),
    }
    // Karta last: the ratios are taken against it.
    servers.push(karta_under_test(&http, &karta_bin, &scratch).await?);
    out.push('\n');
    measure(&http, &mut servers, turns).await?;
    let n = servers.len();
    // Motus after the others, alone: each of its turns starts a Python process, which would
    // take the cores from the turn interleaved after it.
    if let Some(bin) = &motus_bin {
        let mut motus = motus_under_test(&http, bin, &scratch).await?;
        measure(
            &http,
            std::slice::from_mut(&mut motus),
            turns.min(MOTUS_TURNS),
        )
        .await?;
        servers.insert(n - 1, motus);
    }

    out.push_str(&format!(
        "### One unary turn, the same client, interleaved (Motus: {} turns after the others, \
         alone)\n\n",
        turns.min(MOTUS_TURNS)
    ));
    out.push_str("| server | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    for s in &servers {
        out.push_str(&row(&s.name, &s.latency));
        out.push('\n');
    }
    out.push('\n');
    let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64;
    let karta = servers.last().context("Karta")?;
    for s in servers[..servers.len() - 1]
        .iter()
        .filter(|s| matches!(s.protocol, Protocol::Sandwarden))
    {
        out.push_str(&format!(
            "{} / Karta: p50 **{:.2}×**, p99 **{:.2}×**.\n",
            s.name,
            q(&s.latency, 0.5) / q(&karta.latency, 0.5).max(1.0),
            q(&s.latency, 0.99) / q(&karta.latency, 0.99).max(1.0),
        ));
    }
    out.push_str(
        "\nTargets (issue 23): on SQLite at or below 1× Karta at p50 and p99; on PostgreSQL \
         within 1.5× of that.\n\n",
    );
    let per_turn = |secs: f64, turns: usize| format!("{:.2} ms", secs * 1000.0 / turns as f64);
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    out.push_str(
        "| server | CPU per turn (the server and what it runs) | of it, the server process \
         alone | resident memory after the run (the server alone) | start: spawn → first 200 \
         |\n|---|---|---|---|---|\n",
    );
    for s in &servers {
        out.push_str(&format!(
            "| {} | {} | {} | {} ({}) | {} |\n",
            s.name,
            per_turn(s.cpu, s.turns),
            per_turn(s.own_cpu, s.turns),
            mib(rss_of(&s.pids)),
            mib(sandwarden::procfs::rss_kib(s.pid)),
            fmt_us(s.ready.as_micros() as u64),
        ));
    }
    out.push_str(
        "\nsandwarden's CPU and memory count serve, the sandbox's harness server and the echo \
         agent (and bubblewrap); Karta's stub harness runs inside its one process; Motus' count \
         its forkserver and the process each turn runs in (their CPU once they exit). Start: to \
         the first `/readyz` 200 for serve, `/healthz` for Karta, `/health` for Motus.\n",
    );
    Ok(out)
}
