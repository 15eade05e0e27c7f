//! `sandwarden-bench harnesses`: the real agent CLIs (opencode, claude-agent-sdk, codex) behind
//! `serve` (local runtime) with the fake model answering: cold starts, warm claim → first event,
//! turn times; then one opencode ACP turn through sandwarden against the same agent driven through
//! the peer product sandbox-agent 0.4.2, interleaved, and both servers' start time and idle memory.
//!
//! The CLIs come from `scripts/install-harnesses` (harnesses/node_modules/.bin) or PATH, the peer
//! from `--sandbox-agent`, PATH or an npm install into a scratch prefix. When one is missing the
//! benchmark fails and says how to install it; it never reports figures it did not measure.

use crate::bench::{BenchArgs, TOKEN, histogram, machine_line, start_harness_with_env, wait_ready};
use crate::serve::{
    KEY, Serve, create, delete_session, start_serve_env, unary_turn, wait_ready_session,
};
use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use sandwarden_proto::harness_client::HarnessClient;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The peer's pinned version and its npm package for this platform.
const PEER_PACKAGE: &str = "@sandbox-agent/cli-linux-x64@0.4.2";
/// Longest wait for a sandbox, a turn or a server; a CLI that hangs fails the run instead.
const LIMIT: Duration = Duration::from_secs(120);

/// One API harness: its built-in template, the programs it needs and how it finds the model.
struct Cli {
    harness: &'static str,
    programs: &'static [&'static str],
    model_env: fn(&str) -> Vec<(String, String)>,
}

fn openai_env(fake: &str) -> Vec<(String, String)> {
    vec![
        ("OPENAI_BASE_URL".into(), format!("{fake}/v1")),
        ("OPENAI_API_KEY".into(), "sk-fake-bench-0123456789".into()),
        ("OPENAI_MODEL".into(), "fake-model".into()),
    ]
}

fn anthropic_env(fake: &str) -> Vec<(String, String)> {
    vec![
        ("ANTHROPIC_BASE_URL".into(), fake.to_string()),
        (
            "ANTHROPIC_API_KEY".into(),
            "sk-ant-fake-bench-0123456789abcdef".into(),
        ),
        ("ANTHROPIC_MODEL".into(), "fake-model".into()),
    ]
}

const CLIS: [Cli; 3] = [
    Cli {
        harness: "opencode",
        programs: &["opencode"],
        model_env: openai_env,
    },
    Cli {
        harness: "claude-agent-sdk",
        programs: &["claude-agent-acp"],
        model_env: anthropic_env,
    },
    Cli {
        harness: "codex",
        programs: &["codex-acp"],
        model_env: openai_env,
    },
];

/// A child process stopped (its whole process group) when dropped, with a scratch dir removed.
struct Guarded {
    child: Child,
    scratch: Option<PathBuf>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `harnesses/node_modules/.bin` (from the project root) first, then PATH.
fn search_path() -> String {
    let mut dirs = vec![PathBuf::from("harnesses/node_modules/.bin")];
    if let Ok(cwd) = std::env::current_dir() {
        dirs[0] = cwd.join(&dirs[0]);
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn find_program(path: &str, program: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn scratch_dir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "sandwarden-bench-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn start_fake_model() -> anyhow::Result<(Guarded, String)> {
    let mut child = Command::new(crate::bench::sibling("sandwarden-fake-model")?)
        .args(["--listen", "127.0.0.1:0"])
        .env("SANDWARDEN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .context("starting sandwarden-fake-model")?;
    let stdout = child.stdout.take().context("fake-model stdout")?;
    let guard = Guarded {
        child,
        scratch: None,
    };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("fake-model's first line {line:?}"))?;
    let addr = v["listening"].as_str().context("fake-model address")?;
    Ok((guard, format!("http://{addr}")))
}

/// The built-in template `harness`, renamed, with its pool and the fake model in its env.
fn template(
    cli: &Cli,
    name: &str,
    pool: usize,
    fake: &str,
) -> anyhow::Result<sandwarden::template::Template> {
    let mut t = sandwarden::template::builtin_templates()
        .into_iter()
        .find(|t| t.name == cli.harness)
        .with_context(|| format!("no built-in template {}", cli.harness))?;
    t.name = name.to_string();
    t.pool = pool;
    t.turn_timeout_s = LIMIT.as_secs();
    t.env.extend((cli.model_env)(fake));
    Ok(t)
}

fn serve_with(templates: &[sandwarden::template::Template], path: &str) -> anyhow::Result<Serve> {
    start_serve_env(
        0,
        "local",
        &serde_json::to_string(templates)?,
        &[("PATH".into(), path.to_string())],
    )
}

/// Times of one streamed turn, in microseconds from the POST.
struct Streamed {
    first_event: u64,
    first_text: u64,
    done: u64,
}

async fn streamed_turn(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    text: &str,
) -> anyhow::Result<Streamed> {
    use eventsource_stream::Eventsource;
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/v1/sessions/{id}/messages"))
        .bearer_auth(KEY)
        .json(&json!({"text": text, "stream": true}))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "message failed: {}", r.status());
    let (mut first_event, mut first_text) = (None, None);
    let mut events = r.bytes_stream().eventsource();
    while let Some(e) = events.next().await {
        let e = e.map_err(|e| anyhow::anyhow!("reading the event stream: {e}"))?;
        let at = t0.elapsed().as_micros() as u64;
        first_event.get_or_insert(at);
        match e.event.as_str() {
            "text" => {
                first_text.get_or_insert(at);
            }
            "error" => anyhow::bail!("the turn failed: {}", e.data),
            "done" => {
                return Ok(Streamed {
                    first_event: first_event.unwrap_or(at),
                    first_text: first_text.context("the turn ended without text")?,
                    done: at,
                });
            }
            _ => {}
        }
    }
    anyhow::bail!("the event stream ended before `done`")
}

/// A unary turn that must be the fake model's answer; returns its time.
async fn model_turn(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    text: &str,
) -> anyhow::Result<u64> {
    let (took, body) = unary_turn(http, base, id, text).await?;
    let v: Value = serde_json::from_slice(&body)?;
    anyhow::ensure!(
        v["text"]
            .as_str()
            .is_some_and(|t| t.contains("Hello from the fake model")),
        "unexpected reply (is the fake model answering?): {v}"
    );
    Ok(took)
}

/// Figures for one harness.
struct HarnessFigures {
    cold: Histogram<u64>,
    claim: Histogram<u64>,
    first_event: Histogram<u64>,
    first_text: Histogram<u64>,
    first_turn: Histogram<u64>,
    second_turn: Histogram<u64>,
    missed: usize,
}

async fn measure_harness(
    args: &BenchArgs,
    http: &reqwest::Client,
    cli: &Cli,
    fake: &str,
    path: &str,
) -> anyhow::Result<HarnessFigures> {
    let h = cli.harness;
    // Cold starts: no pool, every session starts a sandbox and boots the CLI.
    let cold_name = format!("{h}-cold");
    let serve = serve_with(&[template(cli, &cold_name, 0, fake)?], path)?;
    let mut cold = histogram()?;
    for _ in 0..args.cold_starts {
        let t0 = Instant::now();
        let s = create(http, &serve.base, &cold_name).await?;
        let id = s["id"]
            .as_str()
            .with_context(|| format!("{h}: create failed: {s}"))?
            .to_string();
        wait_ready_session(http, &serve.base, &id)
            .await
            .with_context(|| format!("{h}: cold start"))?;
        cold.record(t0.elapsed().as_micros() as u64)?;
        delete_session(http, &serve.base, &id).await;
    }
    drop(serve);

    // Warm claims from a pool of one; the pause lets it refill (a refill is a cold start).
    let warm_name = format!("{h}-warm");
    let serve = serve_with(&[template(cli, &warm_name, 1, fake)?], path)?;
    let pause =
        Duration::from_micros(cold.value_at_quantile(0.99) * 3 / 2) + Duration::from_secs(1);
    let mut figures = HarnessFigures {
        cold,
        claim: histogram()?,
        first_event: histogram()?,
        first_text: histogram()?,
        first_turn: histogram()?,
        second_turn: histogram()?,
        missed: 0,
    };
    for i in 0..args.warm_claims {
        tokio::time::sleep(pause).await;
        let t0 = Instant::now();
        let s = create(http, &serve.base, &warm_name).await?;
        let claimed = t0.elapsed().as_micros() as u64;
        let id = s["id"]
            .as_str()
            .with_context(|| format!("{h}: create failed: {s}"))?
            .to_string();
        if s["status"] != "ready" {
            // The pool had not refilled: not a warm claim; keep it out of the figures.
            figures.missed += 1;
            delete_session(http, &serve.base, &id).await;
            continue;
        }
        figures.claim.record(claimed)?;
        let first = streamed_turn(http, &serve.base, &id, &format!("first words {i}"))
            .await
            .with_context(|| format!("{h}: first turn"))?;
        figures.first_event.record(first.first_event)?;
        figures.first_text.record(first.first_text)?;
        figures.first_turn.record(first.done)?;
        let second = streamed_turn(http, &serve.base, &id, &format!("second words {i}"))
            .await
            .with_context(|| format!("{h}: second turn"))?;
        figures.second_turn.record(second.done)?;
        delete_session(http, &serve.base, &id).await;
    }
    Ok(figures)
}

/// The peer's binary: the flag, PATH, or an npm install of the pinned package into a scratch
/// prefix (the binary is never part of this repository).
fn sandbox_agent_binary(args: &BenchArgs, path: &str) -> anyhow::Result<PathBuf> {
    const HOW: &str = "install it with `npm install --prefix /tmp/sandbox-agent \
        @sandbox-agent/cli-linux-x64@0.4.2` and pass --sandbox-agent \
        /tmp/sandbox-agent/node_modules/@sandbox-agent/cli-linux-x64/bin/sandbox-agent \
        (or SANDWARDEN_BENCH_SANDBOX_AGENT), or put sandbox-agent on PATH";
    if let Some(bin) = &args.sandbox_agent {
        anyhow::ensure!(
            bin.is_file(),
            "--sandbox-agent {}: no such file; {HOW}",
            bin.display()
        );
        return Ok(bin.clone());
    }
    if let Some(bin) = find_program(path, "sandbox-agent") {
        return Ok(bin);
    }
    let prefix = std::env::temp_dir().join("sandwarden-bench-peer");
    let bin = prefix.join("node_modules/@sandbox-agent/cli-linux-x64/bin/sandbox-agent");
    if !bin.is_file() {
        anyhow::ensure!(
            find_program(path, "npm").is_some(),
            "sandbox-agent not found and npm is not installed; {HOW}"
        );
        eprintln!("installing {PEER_PACKAGE} into {}", prefix.display());
        let status = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&prefix)
            .arg(PEER_PACKAGE)
            .stdin(Stdio::null())
            .status()
            .context("running npm")?;
        anyhow::ensure!(
            status.success() && bin.is_file(),
            "npm install {PEER_PACKAGE} failed ({status}); {HOW}"
        );
    }
    // Its postinstall script (chmod +x) may not run under npm's install-script policy.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", bin.display()))?;
    Ok(bin)
}

/// The environment opencode gets under sandbox-agent: the same template env and the same
/// generated config (`sandwarden launch opencode` writes it) as under sandwarden, its own HOME.
fn peer_env(fake: &str, path: &str, home: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let t = template(&CLIS[0], "opencode", 0, fake)?;
    let mut env: Vec<(String, String)> = t.env.clone().into_iter().collect();
    let plan = sandwarden_harness::launch::plan(
        sandwarden_harness::launch::Preset::Opencode,
        &t.env,
        &sandwarden_harness::launch::Found {
            home,
            cwd: home,
            claude_json: None,
            instructions: None,
        },
    )?;
    for (file, content) in &plan.files {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(file, content).with_context(|| format!("writing {}", file.display()))?;
    }
    env.extend(plan.env);
    env.extend([
        ("PATH".into(), path.to_string()),
        ("HOME".into(), home.display().to_string()),
        (
            "XDG_CONFIG_HOME".into(),
            home.join(".config").display().to_string(),
        ),
        (
            "XDG_DATA_HOME".into(),
            home.join(".local/share").display().to_string(),
        ),
        (
            "XDG_STATE_HOME".into(),
            home.join(".local/state").display().to_string(),
        ),
        (
            "XDG_CACHE_HOME".into(),
            home.join(".cache").display().to_string(),
        ),
    ]);
    Ok(env)
}

struct Peer {
    guard: Guarded,
    base: String,
    started_after: u64,
}

async fn start_peer(
    bin: &Path,
    env: &[(String, String)],
    http: &reqwest::Client,
) -> anyhow::Result<Peer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let t0 = Instant::now();
    let child = Command::new(bin)
        .args(["server", "-H", "127.0.0.1", "-p", &port.to_string()])
        .args(["--no-token", "--no-telemetry"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut guard = Guarded {
        child,
        scratch: None,
    };
    let base = format!("http://127.0.0.1:{port}");
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(r) = http.get(format!("{base}/v1/health")).send().await
            && r.status().is_success()
        {
            return Ok(Peer {
                guard,
                base,
                started_after: t0.elapsed().as_micros() as u64,
            });
        }
        if let Some(status) = guard.child.try_wait()? {
            anyhow::bail!("sandbox-agent exited at start: {status}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    anyhow::bail!("sandbox-agent did not answer /v1/health within 10 s")
}

/// One JSON-RPC request on sandbox-agent's ACP transport; the result, or the error it names.
async fn acp(
    http: &reqwest::Client,
    url: &str,
    id: u64,
    method: &str,
    params: Value,
) -> anyhow::Result<Value> {
    let r = http
        .post(url)
        .header("accept", "application/json")
        .json(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
        .send()
        .await?;
    let status = r.status();
    let body = r.text().await?;
    anyhow::ensure!(
        status.is_success(),
        "sandbox-agent {method}: {status} {body}"
    );
    let v: Value = serde_json::from_str(&body)
        .with_context(|| format!("sandbox-agent {method}: not JSON: {body}"))?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("sandbox-agent {method}: {e}");
    }
    Ok(v["result"].clone())
}

/// RSS of every descendant of `pid` (the agent processes), in KiB. Found by parent id: a
/// thread's `children` file lists only what that one thread spawned.
fn descendants_rss_kib(pid: u32) -> u64 {
    let parent_of = |p: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let mut family = vec![pid];
    let mut total = 0;
    while let Some(parent) = family.pop() {
        for &p in &pids {
            if parent_of(p) == Some(parent) {
                total += sandwarden::procfs::rss_kib(p);
                family.push(p);
            }
        }
    }
    total
}

fn secs(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2} s", us as f64 / 1e6)
    } else {
        format!("{:.1} ms", us as f64 / 1000.0)
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// p50 and p99 of a small sample, as a table row (p99.9 of ten samples says nothing).
fn small_row(cells: &[&str], h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return format!("| {} | – | – | 0 |\n", cells.join(" | "));
    }
    format!(
        "| {} | {} | {} | {} |\n",
        cells.join(" | "),
        secs(h.value_at_quantile(0.5)),
        secs(h.value_at_quantile(0.99)),
        h.len()
    )
}

/// The pinned CLI versions, from harnesses/package.json.
fn pinned_versions() -> String {
    std::fs::read_to_string("harnesses/package.json")
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| {
            v["dependencies"].as_object().map(|deps| {
                deps.iter()
                    .map(|(k, v)| format!("{k} {}", v.as_str().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
        })
        .unwrap_or_else(|| "see harnesses/package.json".into())
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let path = search_path();
    let missing: Vec<&str> = CLIS
        .iter()
        .flat_map(|c| c.programs.iter().copied())
        .filter(|p| find_program(&path, p).is_none())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} not found in harnesses/node_modules/.bin or PATH: run scripts/install-harnesses from \
         the project root (it installs the pinned CLIs with npm), or put them on PATH",
        missing.join(", ")
    );
    let peer_bin = sandbox_agent_binary(args, &path)?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(LIMIT)
        .build()?;
    let (_fake_guard, fake) = start_fake_model()?;

    let peer_flag = args
        .sandbox_agent
        .as_ref()
        .map(|p| format!(" --sandbox-agent {}", p.display()))
        .unwrap_or_default();
    let mut out = format!(
        "Command: `sandwarden-bench harnesses --cold-starts {} --warm-claims {} --turns {}{peer_flag}` \
         (release build, run from the project root after scripts/install-harnesses; sandbox-agent \
         from npm `{PEER_PACKAGE}`). CLIs: {}. Model: `sandwarden-fake-model` on loopback. \
         Machine: {}.\n\n",
        args.cold_starts,
        args.warm_claims,
        args.turns,
        pinned_versions(),
        machine_line()
    );

    // 1. Each API harness through `serve`.
    out.push_str(
        "### Agent CLIs through `serve` (local runtime), the fake model answering\n\n\
         | harness | measure | p50 | p99 | samples |\n|---|---|---|---|---|\n",
    );
    let mut missed = Vec::new();
    for cli in &CLIS {
        eprintln!("measuring {}", cli.harness);
        let f = measure_harness(args, &http, cli, &fake, &path).await?;
        let h = cli.harness;
        for (name, hist) in [
            (
                "cold start: create → `ready` (sandbox, CLI boot, ACP handshake)",
                &f.cold,
            ),
            ("warm claim: create → `ready` (pool of 1)", &f.claim),
            (
                "warm-claimed session, first turn: POST (`stream: true`) → first SSE event",
                &f.first_event,
            ),
            ("… → first `text` event", &f.first_text),
            ("… → `done` (one turn's total)", &f.first_turn),
            ("second turn: POST → `done`", &f.second_turn),
        ] {
            out.push_str(&small_row(&[h, name], hist));
        }
        if f.missed > 0 {
            missed.push(format!("{h} {}", f.missed));
        }
    }
    out.push_str(
        "\nA cold start is a new sandbox (harness server, CLI boot, ACP `initialize` and \
         `session/new`); a warm claim takes a sandbox whose CLI is already up. The first turn of \
         a session includes the CLI's own first-turn work (opencode also asks the model for a \
         title).",
    );
    if !missed.is_empty() {
        out.push_str(&format!(
            " Claims that found the pool not yet refilled were left out: {}.",
            missed.join(", ")
        ));
    }
    out.push_str("\n\n");

    // 2. One opencode ACP turn: sandwarden vs sandbox-agent, interleaved, same fake model.
    eprintln!("measuring opencode through sandwarden and through sandbox-agent");
    let serve = serve_with(&[template(&CLIS[0], "opencode", 0, &fake)?], &path)?;
    let s = create(&http, &serve.base, "opencode").await?;
    let sid = s["id"]
        .as_str()
        .with_context(|| format!("create: {s}"))?
        .to_string();
    wait_ready_session(&http, &serve.base, &sid).await?;

    let home = scratch_dir("peer-home")?;
    let env = peer_env(&fake, &path, &home)?;
    let mut peer_starts = histogram()?;
    let mut peer_idle = Vec::new();
    for _ in 0..5 {
        let p = start_peer(&peer_bin, &env, &http).await?;
        peer_starts.record(p.started_after)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        peer_idle.push(sandwarden::procfs::rss_kib(p.guard.child.id()));
    }
    peer_idle.sort_unstable();
    let mut peer = start_peer(&peer_bin, &env, &http).await?;
    peer.guard.scratch = Some(home.clone());
    let url = format!("{}/v1/acp/bench?agent=opencode", peer.base);
    let mut rpc_id = 0u64;
    let mut next = || {
        rpc_id += 1;
        rpc_id
    };
    acp(
        &http,
        &url,
        next(),
        "initialize",
        json!({"protocolVersion": 1,
               "clientCapabilities": {"fs": {"readTextFile": false, "writeTextFile": false}, "terminal": false},
               "clientInfo": {"name": "sandwarden-bench", "version": env!("CARGO_PKG_VERSION")}}),
    )
    .await
    .context("sandbox-agent could not start `opencode acp`")?;
    let new = acp(
        &http,
        &url,
        next(),
        "session/new",
        json!({"cwd": home.display().to_string(), "mcpServers": []}),
    )
    .await?;
    let peer_session = new["sessionId"]
        .as_str()
        .with_context(|| format!("session/new returned no sessionId: {new}"))?
        .to_string();
    let peer_turn = |id: u64, text: String| {
        let (http, url, sid) = (&http, &url, &peer_session);
        async move {
            let t0 = Instant::now();
            let r = acp(
                http,
                url,
                id,
                "session/prompt",
                json!({"sessionId": sid, "prompt": [{"type": "text", "text": text}]}),
            )
            .await?;
            let took = t0.elapsed().as_micros() as u64;
            anyhow::ensure!(r["stopReason"] == "end_turn", "session/prompt: {r}");
            anyhow::Ok(took)
        }
    };
    // Warm-up: both sessions past their first turn (title request, first-turn setup).
    for i in 0..2 {
        model_turn(&http, &serve.base, &sid, &format!("warm-up {i}")).await?;
        peer_turn(next(), format!("warm-up {i}")).await?;
    }
    let (mut ours, mut theirs) = (histogram()?, histogram()?);
    for i in 0..args.turns {
        let text = format!("measured words {i}");
        if i % 2 == 0 {
            ours.record(model_turn(&http, &serve.base, &sid, &text).await?)?;
            theirs.record(peer_turn(next(), text).await?)?;
        } else {
            theirs.record(peer_turn(next(), text.clone()).await?)?;
            ours.record(model_turn(&http, &serve.base, &sid, &text).await?)?;
        }
    }
    let peer_pid = peer.guard.child.id();
    let peer_busy = sandwarden::procfs::rss_kib(peer_pid);
    let peer_agent = descendants_rss_kib(peer_pid);
    drop(peer);
    drop(serve);
    let ratio =
        |q: f64| ours.value_at_quantile(q) as f64 / theirs.value_at_quantile(q).max(1) as f64;
    out.push_str(&format!(
        "### One opencode ACP turn: sandwarden vs sandbox-agent 0.4.2\n\n\
         The same `opencode acp` with the same generated provider config against the same fake \
         model; each path has one already-started session (two warm-up turns each), and the \
         {} turns per path alternate between them.\n\n\
         | path | p50 | p99 | samples |\n|---|---|---|---|\n",
        args.turns
    ));
    out.push_str(&small_row(
        &["sandwarden: `POST /v1/sessions/{id}/messages` (JSON reply) → serve → harness → `opencode acp`"],
        &ours,
    ));
    out.push_str(&small_row(
        &["sandbox-agent: `POST /v1/acp/{server}` `session/prompt` → `opencode acp`"],
        &theirs,
    ));
    out.push_str(&format!(
        "\nRatio sandwarden / sandbox-agent: p50 {:.2}×, p99 {:.2}×. Sandwarden's turn also runs \
         the sandbox isolation (namespaces, its own HOME and /tmp), stores the turn and its \
         events and returns the reply text; sandbox-agent returns the `stopReason` (the text \
         went to its SSE stream, which this client did not open).\n\n",
        ratio(0.5),
        ratio(0.99)
    ));

    // 3. Start time and idle memory of the two servers (agent processes counted apart).
    let mut echo_ready = histogram()?;
    let mut echo_rss = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        let started =
            start_harness_with_env(&["--kind", "api", "--agent", "sandwarden echo-agent"], &[])?;
        wait_ready(&HarnessClient::new(
            format!("http://{}", started.addr),
            TOKEN,
        ))
        .await?;
        echo_ready.record(t0.elapsed().as_micros() as u64)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        echo_rss.push(sandwarden::procfs::rss_kib(started.child.id()));
    }
    echo_rss.sort_unstable();
    let oc_home = scratch_dir("harness-home")?;
    let oc_env = peer_env(&fake, &path, &oc_home)?;
    let t0 = Instant::now();
    let started = start_harness_with_env(
        &[
            "--kind",
            "api",
            "--agent",
            "sandwarden launch opencode -- opencode acp",
        ],
        &oc_env,
    )?;
    let client = HarnessClient::new(format!("http://{}", started.addr), TOKEN);
    tokio::time::timeout(LIMIT, async {
        // `wait_ready` polls for about 4 s; opencode's boot can take longer.
        while wait_ready(&client).await.is_err() {}
    })
    .await
    .context("the harness with opencode did not become ready")?;
    let oc_ready = t0.elapsed().as_micros() as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let oc_rss = sandwarden::procfs::rss_kib(started.child.id());
    let oc_agent = descendants_rss_kib(started.child.id());
    drop(started);
    let _ = std::fs::remove_dir_all(&oc_home);
    let median = |v: &[u64]| v.get(v.len() / 2).copied().unwrap_or(0);
    out.push_str(
        "### Start and memory: sandbox-agent vs the harness server\n\n\
         | server | start | its own RSS | agent processes' RSS |\n|---|---|---|---|\n",
    );
    out.push_str(&format!(
        "| sandbox-agent 0.4.2, idle (no agent) | spawn → `/v1/health` 200: p50 {} over {} | {} (median) | – |\n",
        secs(peer_starts.value_at_quantile(0.5)),
        peer_starts.len(),
        mib(median(&peer_idle))
    ));
    out.push_str(&format!(
        "| sandbox-agent 0.4.2 after the turns (one opencode session) | – | {} | {} |\n",
        mib(peer_busy),
        mib(peer_agent)
    ));
    out.push_str(&format!(
        "| `sandwarden harness`, echo agent | spawn → ready (ACP handshake done): p50 {} over {} | {} (median) | – |\n",
        secs(echo_ready.value_at_quantile(0.5)),
        echo_ready.len(),
        mib(median(&echo_rss))
    ));
    out.push_str(&format!(
        "| `sandwarden harness`, `opencode acp` | spawn → ready (opencode booted, ACP handshake done): {} | {} | {} |\n\n",
        secs(oc_ready),
        mib(oc_rss),
        mib(oc_agent)
    ));
    out.push_str(
        "sandbox-agent answers health before any agent runs (it starts `opencode acp` on the \
         first ACP request); the harness server's `ready` includes the agent's boot and handshake.\n",
    );
    Ok(out)
}
