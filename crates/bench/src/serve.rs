//! `sandwarden-bench serve`: the orchestrator's cost on the message path, measured against the
//! harness server reached directly, with the same HTTP client, interleaved in one run; warm claim
//! latency. (serve's memory at scale is `bench density`'s.)

use crate::bench::{
    BenchArgs, TOKEN, fmt_added, fmt_us, histogram, load_average, machine_line, row, start_harness,
    wait_ready,
};
use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use sandwarden_proto::harness_client::HarnessClient;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) const KEY: &str = "bench-admin-key-0123456789";

pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) base: String,
    /// The probes' own address (`--probe-listen`), when given one.
    pub(crate) probes: Option<String>,
    pub(crate) dir: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        // Claimed sandboxes outlive `serve` by design; the benchmark stops its own.
        sandwarden::procfs::kill_groups_matching(&[&self.dir.to_string_lossy()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn start_serve(pool: usize) -> anyhow::Result<Serve> {
    start_serve_with(
        pool,
        "local",
        r#"[{"name":"sh","kind":"tui","command":"sh","pool":0},
            {"name":"echo-cold","kind":"api","command":"sandwarden echo-agent","pool":0}]"#,
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
    let mut child = Command::new(crate::bench::sibling("sandwarden")?)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(&dir)
        // Benchmarks measure capacity: no tenant quota stands in their way.
        .envs(
            [
                "SANDWARDEN_TENANT_SESSIONS",
                "SANDWARDEN_TENANT_TURNS",
                "SANDWARDEN_TENANT_STREAMS",
                "SANDWARDEN_MAX_SESSIONS",
                "SANDWARDEN_KEY_REQUEST_RATE",
            ]
            .map(|k| (k, "0")),
        )
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
    let probes = v["probes"].as_str().map(String::from);
    Ok(Serve {
        child,
        base,
        probes,
        dir,
    })
}

pub(crate) async fn create(
    http: &reqwest::Client,
    base: &str,
    harness: &str,
) -> anyhow::Result<serde_json::Value> {
    create_as(http, base, KEY, harness).await
}

/// `create` with another key (a tenant's).
pub(crate) async fn create_as(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    harness: &str,
) -> anyhow::Result<serde_json::Value> {
    let v: serde_json::Value = http
        .post(format!("{base}/v1/sessions"))
        .bearer_auth(key)
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
    unary_turn_as(http, base, KEY, id, text).await
}

/// `unary_turn` with another key (a tenant's).
pub(crate) async fn unary_turn_as(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    text: &str,
) -> anyhow::Result<(u64, bytes::Bytes)> {
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/v1/sessions/{id}/messages"))
        .bearer_auth(key)
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

/// The session as `GET /v1/sessions/{id}` shows it to `key` (`id` may carry a query).
pub(crate) async fn get_session_as(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
) -> anyhow::Result<serde_json::Value> {
    Ok(http
        .get(format!("{base}/v1/sessions/{id}"))
        .bearer_auth(key)
        .send()
        .await?
        .json()
        .await?)
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

/// Concurrent clients in the closed-loop load (each on its own session / harness).
const LOAD_CLIENTS: usize = 8;
/// Alternating load rounds per proxy.
const LOAD_ROUNDS: usize = 3;

/// One whole turn on a harness server (POST /v1/turns, SSE to `done`) at `base`, which may be a
/// proxy in front of it: the time to the first event and to the end.
async fn harness_turn(
    http: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
) -> anyhow::Result<(u64, u64)> {
    let t0 = Instant::now();
    let r = http
        .post(format!("{base}/v1/turns"))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "turn failed: {}", r.status());
    let first = read_sse(r, t0, "done").await?;
    Ok((first, t0.elapsed().as_micros() as u64))
}

/// A bounded closed loop: `clients` tasks, each sending `per_client` requests one after another
/// with `turn(client index)`; returns the latencies and the wall time.
async fn closed_loop<F, Fut>(
    clients: usize,
    per_client: usize,
    turn: F,
) -> anyhow::Result<(Histogram<u64>, Duration)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let t0 = Instant::now();
    let runs = (0..clients).map(|i| {
        let turn = &turn;
        async move {
            let mut took = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                took.push(turn(i).await?);
            }
            anyhow::Ok(took)
        }
    });
    let all = futures::future::try_join_all(runs).await?;
    let wall = t0.elapsed();
    let mut h = histogram()?;
    for us in all.into_iter().flatten() {
        h.record(us)?;
    }
    Ok((h, wall))
}

/// Totals of one proxy's closed-loop rounds.
#[derive(Default)]
struct Load {
    requests: u64,
    wall: Duration,
    cpu: f64,
    latency: Option<Histogram<u64>>,
}

impl Load {
    fn add(&mut self, h: Histogram<u64>, wall: Duration, cpu: f64) -> anyhow::Result<()> {
        self.requests += h.len();
        self.wall += wall;
        self.cpu += cpu;
        match &mut self.latency {
            Some(all) => all.add(&h)?,
            None => self.latency = Some(h),
        }
        Ok(())
    }

    fn per_cpu_second(&self) -> f64 {
        self.requests as f64 / self.cpu.max(0.01)
    }

    fn table_row(&self, name: &str) -> String {
        let q = |p: f64| {
            self.latency
                .as_ref()
                .map(|h| fmt_us(h.value_at_quantile(p)))
                .unwrap_or_default()
        };
        format!(
            "| {name} | {} | {:.0} | {:.2} s | {:.0} | {} | {} |",
            self.requests,
            self.requests as f64 / self.wall.as_secs_f64().max(1e-6),
            self.cpu,
            self.per_cpu_second(),
            q(0.5),
            q(0.99),
        )
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let turns = (args.round_trips / 5).max(200);
    // Enough turns that the proxies' CPU time is well above /proc's 10 ms resolution.
    let load_per_client = (turns / 2).max(25);
    let mut out = format!(
        "Command: `sandwarden-bench serve --round-trips {}` (release build; {turns} turns per path; \
         load: {LOAD_ROUNDS} alternating rounds of {LOAD_CLIENTS} clients × {load_per_client} turns per proxy). \
         Machine: {}; load average at the start {}.\n\n",
        args.round_trips,
        machine_line(),
        load_average(),
    );
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;

    // The direct baseline: harness servers with the echo agent, reached with the same client;
    // nginx proxies to them; serve runs its own echo sandboxes from a pool.
    let mut direct = Vec::new();
    for _ in 0..LOAD_CLIENTS {
        let h = start_harness(&["--kind", "api", "--agent", "sandwarden echo-agent"])?;
        wait_ready(&HarnessClient::new(format!("http://{}", h.addr), TOKEN)).await?;
        direct.push(h);
    }
    let direct_base = format!("http://{}", direct[0].addr);
    let addrs: Vec<String> = direct.iter().map(|h| h.addr.clone()).collect();
    let nginx = match crate::nginx::start(&addrs) {
        Ok(n) => Some(n),
        Err(e) => {
            out.push_str(&format!(
                "**nginx column skipped**: {e:#}. Install Debian's nginx to compare.\n\n"
            ));
            None
        }
    };
    let nginx_base = |i: usize| nginx.as_ref().map(|n| format!("{}/h{i}", n.base));
    let serve = start_serve(LOAD_CLIENTS)?;
    let mut sids = Vec::new();
    for _ in 0..LOAD_CLIENTS {
        let session = create(&http, &serve.base, "echo").await?;
        let sid = session["id"].as_str().context("session id")?.to_string();
        wait_ready_session(&http, &serve.base, &sid).await?;
        sids.push(sid);
    }
    let sid = sids[0].clone();

    let body_direct = json!({"parts": [{"type": "text", "text": "ping"}]});
    let body_stream = json!({"text": "ping", "stream": true});
    let (mut d_full, mut s_unary, mut n_full) = (histogram()?, histogram()?, histogram()?);
    let (mut d_first, mut s_first, mut n_first) = (histogram()?, histogram()?, histogram()?);
    // Warm up connections and caches.
    for _ in 0..20 {
        harness_turn(&http, &direct_base, &body_direct).await?;
        unary_turn(&http, &serve.base, &sid, "ping").await?;
        if let Some(base) = nginx_base(0) {
            harness_turn(&http, &base, &body_direct).await?;
        }
    }
    let steps_before = crate::steps::scrape(&http, &serve.base).await?;
    let block = 20;
    let mut done = 0;
    while done < turns {
        for _ in 0..block {
            let (first, full) = harness_turn(&http, &direct_base, &body_direct).await?;
            d_full.record(full)?;
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
        if let Some(base) = nginx_base(0) {
            for _ in 0..block {
                let (first, full) = harness_turn(&http, &base, &body_direct).await?;
                n_full.record(full)?;
                n_first.record(first)?;
            }
        }
        done += block;
    }
    out.push_str("### Message path: the harness directly vs through `serve` vs through nginx\n\n");
    out.push_str("| path | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    let mut rows = vec![
        row(
            "harness directly: whole turn (POST /v1/turns, SSE to `done`)",
            &d_full,
        ),
        row(
            "through serve: unary JSON message (auth, store, events, reply)",
            &s_unary,
        ),
    ];
    if nginx.is_some() {
        rows.push(row(
            "through nginx: whole turn (same request as direct)",
            &n_full,
        ));
    }
    rows.push(row("harness directly: time to first event", &d_first));
    rows.push(row(
        "through serve: SSE message, time to first event",
        &s_first,
    ));
    if nginx.is_some() {
        rows.push(row("through nginx: time to first event", &n_first));
    }
    out.push_str(&rows.join("\n"));
    out.push_str("\n\n");
    out.push_str(&format!(
        "Added by serve on a short unary turn: p50 {}, p99 {}, p99.9 {} (targets 100 µs / 500 µs). \
         Added to the first SSE event: p50 {}, p99 {}, p99.9 {} (target 200 µs). Ratio of p50 turn times: {:.2}×.\n\n",
        fmt_added(&s_unary, &d_full, 0.5),
        fmt_added(&s_unary, &d_full, 0.99),
        fmt_added(&s_unary, &d_full, 0.999),
        fmt_added(&s_first, &d_first, 0.5),
        fmt_added(&s_first, &d_first, 0.99),
        fmt_added(&s_first, &d_first, 0.999),
        s_unary.value_at_quantile(0.5) as f64 / d_full.value_at_quantile(0.5).max(1) as f64,
    ));
    if nginx.is_some() {
        out.push_str(&format!(
            "Added by nginx on the same turn: p50 {}, p99 {}, p99.9 {}; to the first event: p50 {}, p99 {}, p99.9 {}.\n\n",
            fmt_added(&n_full, &d_full, 0.5),
            fmt_added(&n_full, &d_full, 0.99),
            fmt_added(&n_full, &d_full, 0.999),
            fmt_added(&n_first, &d_first, 0.5),
            fmt_added(&n_first, &d_first, 0.99),
            fmt_added(&n_first, &d_first, 0.999),
        ));
    }

    let steps_after = crate::steps::scrape(&http, &serve.base).await?;
    out.push_str(&format!(
        "### Where serve's time goes: its step spans, the turns above\n\n\
         From serve's own `sandwarden_step_duration_seconds` (its spans of target \
         `sandwarden::steps`), read before and after the {turns} unary and {turns} SSE turns \
         above. `message` is a unary message's whole time in serve after its key is checked; \
         `turn.begin` the commit of the user's turn; `turn.dial` until the harness answers the \
         turn's POST; `turn.harness` its events up to the last; `turn.finish` the commit of the \
         outcome with the `done` event. The turn steps count SSE turns too.\n\n{}\n",
        crate::steps::table(&steps_before, &steps_after)
    ));

    // Throughput per core: the same closed-loop load through serve and through nginx, in
    // alternating rounds, each proxy's CPU time read from /proc around its rounds.
    let serve_pid = serve.child.id();
    let (mut through_serve, mut through_nginx) = (Load::default(), Load::default());
    let steps_before = crate::steps::scrape(&http, &serve.base).await?;
    for _ in 0..LOAD_ROUNDS {
        let cpu0 = sandwarden::procfs::cpu_seconds(serve_pid);
        let (h, wall) = closed_loop(LOAD_CLIENTS, load_per_client, |i| {
            let (http, base, sid) = (&http, &serve.base, &sids[i]);
            async move { Ok(unary_turn(http, base, sid, "ping").await?.0) }
        })
        .await?;
        through_serve.add(h, wall, sandwarden::procfs::cpu_seconds(serve_pid) - cpu0)?;
        if let Some(n) = &nginx {
            let cpu0 = n.cpu_seconds();
            let (h, wall) = closed_loop(LOAD_CLIENTS, load_per_client, |i| {
                let (http, base, body) = (&http, format!("{}/h{i}", n.base), &body_direct);
                async move { Ok(harness_turn(http, &base, body).await?.1) }
            })
            .await?;
            through_nginx.add(h, wall, n.cpu_seconds() - cpu0)?;
        }
    }
    let steps_after = crate::steps::scrape(&http, &serve.base).await?;
    out.push_str(&format!(
        "### Throughput per core: {LOAD_CLIENTS} concurrent clients, closed loop\n\n\
         Each client has its own echo sandbox (a harness serves one turn at a time). The proxy's \
         CPU time is its own (utime + stime from /proc; nginx: master and workers); the harnesses \
         and the client share the same 2 cores, so wall-clock rates are bounded by them.\n\n\
         | proxy | turns | turns/s (wall) | proxy CPU | turns per proxy CPU-second | p50 | p99 |\n\
         |---|---|---|---|---|---|---|\n{}\n",
        through_serve.table_row("serve (unary message: auth, store, events)")
    ));
    if nginx.is_some() {
        out.push_str(&through_nginx.table_row("nginx (POST /v1/turns, SSE passed through)"));
        out.push_str("\n\n");
        out.push_str(&format!(
            "serve's turns per CPU-second: {:.0}% of nginx's (target ≥ 60%).\n\n",
            100.0 * through_serve.per_cpu_second() / through_nginx.per_cpu_second().max(1e-9)
        ));
    } else {
        out.push('\n');
    }
    out.push_str(&format!(
        "serve's steps under this load (its spans, as above):\n\n{}\n",
        crate::steps::table(&steps_before, &steps_after)
    ));
    // The WAL starts over once a checkpoint has copied it all; under a steady load that needs
    // the writer's own checkpoint (store/sqlite.rs), or the file grows for as long as the load
    // lasts. With it, the file stays at its high-water mark, at most the size limit.
    let wal = std::fs::metadata(serve.dir.join("sandwarden.db-wal")).map_or(0, |m| m.len());
    let mib = |bytes: i64| bytes / (1024 * 1024);
    out.push_str(&format!(
        "SQLite WAL file after the load: {:.1} MiB (the writer starts it over once it passes \
         {} MiB, after the next background checkpoint, every {} ms; the file is cut back to \
         {} MiB only when it grew past that).\n\n",
        wal as f64 / (1024.0 * 1024.0),
        mib(sandwarden::store::RESTART_FRAMES * sandwarden::store::PAGE_BYTES),
        sandwarden::store::CHECKPOINT_EVERY.as_millis(),
        mib(sandwarden::store::WAL_SIZE_LIMIT),
    ));
    drop(nginx);
    drop(direct);

    // Warm claims: create → ready with a pool; pauses let the pool refill.
    let mut warm = histogram()?;
    let mut cold = histogram()?;
    let mut missed = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let t0 = Instant::now();
        let s = create(&http, &serve.base, "echo").await?;
        if s["status"] == "ready" {
            warm.record(t0.elapsed().as_micros() as u64)?;
        } else {
            // The pool had not refilled: a cold start, measured below on its own.
            missed += 1;
            let id = s["id"].as_str().context("id")?;
            wait_ready_session(&http, &serve.base, id).await?;
        }
    }
    // Cold starts: a template with no pool, so each create starts a sandbox (harness server,
    // echo agent, ACP handshake) before the session is ready.
    for _ in 0..10 {
        let t0 = Instant::now();
        let s = create(&http, &serve.base, "echo-cold").await?;
        let id = s["id"].as_str().context("id")?;
        wait_ready_session(&http, &serve.base, id).await?;
        cold.record(t0.elapsed().as_micros() as u64)?;
    }
    out.push_str("### Session create → ready\n\n| claim | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("warm (a pooled sandbox)", &warm));
    out.push('\n');
    out.push_str(&row(
        "cold (no pool: start a sandbox, echo agent, ACP handshake)",
        &cold,
    ));
    out.push('\n');
    out.push_str(&format!(
        "\nTarget: warm p99 under 20 ms. Cold/warm p50 ratio: {:.0}×. Creates that found the \
         pool not yet refilled (not counted as warm): {missed} of 30.\n\n",
        cold.value_at_quantile(0.5) as f64 / warm.value_at_quantile(0.5).max(1) as f64
    ));
    drop(serve);

    // serve's memory per session, event stream and terminal is `bench density`'s (1,000 of
    // each by default, where this benchmark used to measure 50).
    out.push_str(
        "Memory of `serve` per idle session, open event stream and attached terminal: see \
         `bench density` below.\n",
    );
    Ok(out)
}
