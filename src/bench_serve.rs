//! `sandwarden bench serve`: the orchestrator's cost on the message path, measured against the
//! harness server reached directly, with the same HTTP client, interleaved in one run; warm claim
//! latency; memory per idle session and per attached terminal.

use crate::bench::{
    BenchArgs, TOKEN, fmt_us, histogram, machine_line, row, start_harness, wait_ready,
};
use crate::harness_client::HarnessClient;
use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const KEY: &str = "bench-admin-key-0123456789";

pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) base: String,
    dir: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        // Claimed sandboxes outlive `serve` by design; the benchmark stops its own.
        crate::procfs::kill_groups_matching(&[&self.dir.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_serve(pool: usize) -> anyhow::Result<Serve> {
    start_serve_with(
        pool,
        "local",
        r#"[{"name":"sh","kind":"tui","command":"sh","pool":0}]"#,
    )
}

/// A `serve` on a fresh data dir with `runtime`, extra `templates` (JSON) and an echo pool.
pub(crate) fn start_serve_with(
    pool: usize,
    runtime: &str,
    templates_json: &str,
) -> anyhow::Result<Serve> {
    start_serve_env(pool, runtime, templates_json, &[])
}

/// `start_serve_with` plus extra environment for `serve` and the sandboxes it starts.
pub(crate) fn start_serve_env(
    pool: usize,
    runtime: &str,
    templates_json: &str,
    env: &[(String, String)],
) -> anyhow::Result<Serve> {
    start_serve_args(
        |dir| {
            let templates = dir.join("templates.json");
            std::fs::write(&templates, templates_json)?;
            Ok(vec![
                "--runtime".into(),
                runtime.into(),
                "--pool".into(),
                format!("echo={pool}"),
                "--templates".into(),
                templates.to_string_lossy().into_owned(),
            ])
        },
        env,
    )
}

/// A `serve` on a fresh data dir with the arguments `args` makes for that dir.
pub(crate) fn start_serve_args(
    args: impl FnOnce(&std::path::Path) -> anyhow::Result<Vec<String>>,
    env: &[(String, String)],
) -> anyhow::Result<Serve> {
    let dir = std::env::temp_dir().join(format!(
        "sandwarden-bench-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let extra = args(&dir)?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(&dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("SANDWARDEN_API_KEY", KEY)
        .env("SANDWARDEN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting sandwarden serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(&line).context("listen line")?;
    let base = format!("http://{}", v["listening"].as_str().context("address")?);
    Ok(Serve { child, base, dir })
}

pub(crate) async fn create(
    http: &reqwest::Client,
    base: &str,
    harness: &str,
) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value = http
        .post(format!("{base}/v1/sessions"))
        .bearer_auth(KEY)
        .json(&json!({"harness": harness}))
        .send()
        .await?
        .json()
        .await?;
    Ok(v)
}

/// Longest wait for a session to become ready (agent CLIs take seconds to boot).
const READY_LIMIT: Duration = Duration::from_secs(120);

/// Long-polls a session until it is ready; the API waits at most 60 s per call, so this asks
/// again while it is still `creating`, up to `READY_LIMIT`.
pub(crate) async fn wait_ready_session(
    http: &reqwest::Client,
    base: &str,
    id: &str,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let v: serde_json::Value = http
            .get(format!("{base}/v1/sessions/{id}?wait=true&timeout=60"))
            .bearer_auth(KEY)
            .send()
            .await?
            .json()
            .await?;
        if v["status"] == "ready" {
            return Ok(());
        }
        anyhow::ensure!(
            v["status"] == "creating" && t0.elapsed() < READY_LIMIT,
            "session did not become ready: {v}"
        );
    }
}

/// Deletes a session (best effort: benchmarks clean up what they made).
pub(crate) async fn delete_session(http: &reqwest::Client, base: &str, id: &str) {
    let _ = http
        .delete(format!("{base}/v1/sessions/{id}"))
        .bearer_auth(KEY)
        .send()
        .await;
}

/// One unary message: the time from the POST to the whole reply, and the reply.
pub(crate) async fn unary_turn(
    http: &reqwest::Client,
    base: &str,
    id: &str,
    text: &str,
) -> anyhow::Result<(u64, bytes::Bytes)> {
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/v1/sessions/{id}/messages"))
        .bearer_auth(KEY)
        .json(&json!({ "text": text }))
        .send()
        .await?;
    let status = r.status();
    let body = r.bytes().await?;
    let took = t0.elapsed().as_micros() as u64;
    anyhow::ensure!(
        status.is_success(),
        "message failed: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok((took, body))
}

/// Reads an SSE response until the event `until`, returning the time to the first event.
async fn read_sse(resp: reqwest::Response, t0: Instant, until: &str) -> anyhow::Result<u64> {
    use eventsource_stream::Eventsource;
    let mut first = None;
    let mut events = resp.bytes_stream().eventsource();
    while let Some(e) = events.next().await {
        let e = e.map_err(|e| anyhow::anyhow!("{e}"))?;
        if first.is_none() {
            first = Some(t0.elapsed().as_micros() as u64);
        }
        if e.event == until || e.event == "error" {
            break;
        }
    }
    first.context("no event arrived")
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let turns = (args.round_trips / 5).max(200);
    let mut out = format!(
        "Command: `sandwarden bench serve --round-trips {}` (release build; {turns} turns per path). Machine: {}.\n\n",
        args.round_trips,
        machine_line()
    );
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;

    // The direct baseline: a harness server with the echo agent, reached with the same client.
    let direct = start_harness(&["--kind", "api", "--agent", "sandwarden echo-agent"])?;
    let direct_base = format!("http://{}", direct.addr);
    wait_ready(&HarnessClient::new(direct_base.clone(), TOKEN)).await?;
    let serve = start_serve(2)?;
    let session = create(&http, &serve.base, "echo").await?;
    let sid = session["id"].as_str().context("session id")?.to_string();
    wait_ready_session(&http, &serve.base, &sid).await?;

    let body_direct = json!({"parts": [{"type": "text", "text": "ping"}]});
    let body_stream = json!({"text": "ping", "stream": true});
    let (mut d_full, mut s_unary) = (histogram()?, histogram()?);
    let (mut d_first, mut s_first) = (histogram()?, histogram()?);
    // Warm up connections and caches.
    for _ in 0..20 {
        let r = http
            .post(format!("{direct_base}/v1/turns"))
            .bearer_auth(TOKEN)
            .json(&body_direct)
            .send()
            .await?;
        read_sse(r, Instant::now(), "done").await?;
        unary_turn(&http, &serve.base, &sid, "ping").await?;
    }
    let block = 20;
    let mut done = 0;
    while done < turns {
        for _ in 0..block {
            let t0 = Instant::now();
            let r = http
                .post(format!("{direct_base}/v1/turns"))
                .bearer_auth(TOKEN)
                .json(&body_direct)
                .send()
                .await?;
            let first = read_sse(r, t0, "done").await?;
            d_full.record(t0.elapsed().as_micros() as u64)?;
            d_first.record(first)?;
        }
        for _ in 0..block {
            s_unary.record(unary_turn(&http, &serve.base, &sid, "ping").await?.0)?;
        }
        for _ in 0..block {
            let t0 = Instant::now();
            let r = http
                .post(format!("{}/v1/sessions/{sid}/messages", serve.base))
                .bearer_auth(KEY)
                .json(&body_stream)
                .send()
                .await?;
            s_first.record(read_sse(r, t0, "done").await?)?;
        }
        done += block;
    }
    let added = |a: &Histogram<u64>, b: &Histogram<u64>, q: f64| {
        a.value_at_quantile(q)
            .saturating_sub(b.value_at_quantile(q))
    };
    out.push_str("### Message path: through `serve` vs the harness directly\n\n");
    out.push_str("| path | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row(
        "harness directly: whole turn (POST /v1/turns, SSE to `done`)",
        &d_full,
    ));
    out.push('\n');
    out.push_str(&row(
        "through serve: unary JSON message (auth, store, events, reply)",
        &s_unary,
    ));
    out.push('\n');
    out.push_str(&row("harness directly: time to first event", &d_first));
    out.push('\n');
    out.push_str(&row(
        "through serve: SSE message, time to first event",
        &s_first,
    ));
    out.push_str("\n\n");
    out.push_str(&format!(
        "Added by serve on a short unary turn: p50 {}, p99 {} (targets 100 µs / 500 µs). \
         Added to the first SSE event: p50 {}, p99 {} (target 200 µs). Ratio of p50 turn times: {:.2}×.\n\n",
        fmt_us(added(&s_unary, &d_full, 0.5)),
        fmt_us(added(&s_unary, &d_full, 0.99)),
        fmt_us(added(&s_first, &d_first, 0.5)),
        fmt_us(added(&s_first, &d_first, 0.99)),
        s_unary.value_at_quantile(0.5) as f64 / d_full.value_at_quantile(0.5).max(1) as f64,
    ));
    drop(direct);

    // Warm claims: create → ready with a pool; pauses let the pool refill.
    let mut warm = histogram()?;
    let mut cold = histogram()?;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t0 = Instant::now();
        let s = create(&http, &serve.base, "echo").await?;
        if s["status"] == "ready" {
            warm.record(t0.elapsed().as_micros() as u64)?;
        } else {
            let id = s["id"].as_str().context("id")?;
            wait_ready_session(&http, &serve.base, id).await?;
            cold.record(t0.elapsed().as_micros() as u64)?;
        }
    }
    out.push_str("### Session create → ready\n\n| claim | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("warm (a pooled sandbox)", &warm));
    out.push('\n');
    if !cold.is_empty() {
        out.push_str(&row("cold (pool empty: start a sandbox)", &cold));
        out.push('\n');
    }
    out.push_str("\nTarget: warm p99 under 20 ms.\n\n");
    drop(serve);

    // Memory: serve's own RSS with idle sessions and with attached terminals.
    let serve = start_serve(0)?;
    let pid = serve.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_rss = crate::procfs::rss_kib(pid);
    let n_sessions = 50;
    let mut shells = Vec::new();
    for _ in 0..n_sessions {
        let s = create(&http, &serve.base, "sh").await?;
        shells.push(s["id"].as_str().context("id")?.to_string());
    }
    for id in &shells {
        wait_ready_session(&http, &serve.base, id).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let with_sessions = crate::procfs::rss_kib(pid);
    let mut sockets = Vec::new();
    for id in &shells {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!(
            "{}/v1/sessions/{id}/tty",
            serve.base.replacen("http", "ws", 1)
        )
        .into_client_request()?;
        req.headers_mut()
            .insert("authorization", format!("Bearer {KEY}").parse()?);
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_terminals = crate::procfs::rss_kib(pid);
    let per_session = with_sessions.saturating_sub(base_rss) as f64 / n_sessions as f64;
    let per_terminal = with_terminals.saturating_sub(with_sessions) as f64 / n_sessions as f64;
    out.push_str(&format!(
        "### Memory of `serve` (its own RSS; sandboxes are separate processes)\n\n\
         | state | RSS |\n|---|---|\n| idle, no sessions | {:.1} MiB |\n| {n_sessions} idle sessions | {:.1} MiB |\n\
         | {n_sessions} attached terminals | {:.1} MiB |\n\n\
         Per idle session: {per_session:.0} KiB (target ≤ 50 KiB); per attached terminal: {per_terminal:.0} KiB \
         (target ≤ 64 KiB). Sessions here are terminal sessions; each sandbox's own harness server is \
         measured in the harness section.\n",
        base_rss as f64 / 1024.0,
        with_sessions as f64 / 1024.0,
        with_terminals as f64 / 1024.0,
    ));
    drop(sockets);
    Ok(out)
}
