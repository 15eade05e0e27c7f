//! `sandwarden-bench tty`: the terminal bridge in `serve` (`GET /v1/sessions/{id}/tty`, reached
//! by the session's `tty_url`) against the harness WebSocket reached directly, in one run:
//! keystroke echo round trip, output throughput, and memory while a program floods a viewer
//! that does not read. With `--wetty PATH`, wetty (node-pty and socket.io) runs the same
//! programs as a third path, driven by the same client over socket.io's WebSocket transport.

use crate::bench::{
    BenchArgs, ECHO_PROGRAM, TOKEN, Ws, drain_ws, fmt_added, histogram, load_average, machine_line,
    row, start_harness, wait_ready, ws_round_trip, ws_throughput,
};
use crate::serve::{KEY, Serve, create, start_serve_with, wait_ready_session};
use anyhow::Context;
use futures::{SinkExt, StreamExt};
use sandwarden_proto::harness_client::HarnessClient;
use serde_json::json;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// How often RSS is sampled during the flood.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

fn writer(bytes: u64) -> String {
    format!("sh -c 'read x; head -c {bytes} /dev/zero'")
}

/// A ready terminal session of `template`, attached through serve by its `tty_url`.
async fn attach_session(
    http: &reqwest::Client,
    serve: &Serve,
    template: &str,
) -> anyhow::Result<Ws> {
    let s = create(http, &serve.base, template).await?;
    let id = s["id"].as_str().context("session id")?.to_string();
    wait_ready_session(http, &serve.base, &id).await?;
    let s: serde_json::Value = http
        .get(format!("{}/v1/sessions/{id}", serve.base))
        .bearer_auth(KEY)
        .send()
        .await?
        .json()
        .await?;
    let url = s["tty_url"].as_str().context("no tty_url on the session")?;
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    Ok(ws)
}

/// A harness server running `program` under a PTY, attached directly.
async fn attach_direct(program: &str) -> anyhow::Result<(crate::bench::Started, Ws)> {
    let started = start_harness(&["--kind", "tui", "--command", program])?;
    let client = HarnessClient::new(format!("http://{}", started.addr), TOKEN);
    wait_ready(&client).await?;
    let (ws, _) = tokio_tungstenite::connect_async(client.tty_request()?).await?;
    Ok((started, ws))
}

/// The harness server of a sandbox serve started: a process whose command line runs
/// `sandwarden harness` under serve's data dir.
fn sandbox_harnesses(serve: &Serve) -> Vec<u32> {
    let dir = serve.dir.to_string_lossy();
    sandwarden::procfs::pids_matching(&[&dir, "harness"])
        .into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .filter(|&p| p != serve.child.id())
        .collect()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The sample taken nearest `at` seconds into the flood, one sample every `SAMPLE_EVERY`.
fn sample_at(samples: &[u64], at: f64) -> Option<u64> {
    let i = (at / SAMPLE_EVERY.as_secs_f64()).round() as usize;
    samples.get(i.min(samples.len().saturating_sub(1))).copied()
}

/// wetty (`node build/main.js`) on a loopback port, running `program` for each connection.
struct Wetty {
    child: Child,
    port: u16,
}

impl Drop for Wetty {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        // Up to 2 s for node to exit on SIGTERM, then SIGKILL.
        for _ in 0..40 {
            if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts wetty on 127.0.0.1 with `program` as its command (wetty runs it with `env -S` when it
/// runs as root and the host is local; otherwise it would ssh to the host).
async fn start_wetty(main_js: &Path, program: &str) -> anyhow::Result<Wetty> {
    // /proc/self belongs to the process's effective user.
    let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
    anyhow::ensure!(
        euid == 0,
        "wetty runs its --command locally only as root (otherwise it logs in over ssh), and \
         this benchmark runs it as its own user"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("node")
        .arg(main_js)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--base",
            WETTY_BASE,
        ])
        .args(["--command", program, "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting wetty with node")?;
    let mut wetty = Wetty { child, port };
    for _ in 0..200 {
        if let Some(status) = wetty.child.try_wait()? {
            anyhow::bail!("wetty exited at start: {status}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(wetty);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("wetty did not listen on 127.0.0.1:{port} within 10 s")
}

/// A socket.io client of wetty over the WebSocket transport (Engine.IO 4): `42[...]` events,
/// `2`/`3` pings, and wetty's flow control (`commit` what was received, or it pauses the PTY).
struct WettyClient {
    ws: Ws,
    uncommitted: usize,
}

/// What wetty's output arrives as: decoded `data` events, or the end of the program.
enum WettyEvent {
    Data(String),
    Logout,
}

/// The path wetty serves under (its default); socket.io listens at `{WETTY_BASE}/socket.io`.
const WETTY_BASE: &str = "/wetty";

/// wetty pauses the program once 2 MiB are uncommitted; its browser client commits every 256 KiB.
const WETTY_COMMIT_EVERY: usize = 256 * 1024;

impl WettyClient {
    async fn connect(wetty: &Wetty) -> anyhow::Result<Self> {
        let url = format!(
            "ws://127.0.0.1:{}{WETTY_BASE}/socket.io/?EIO=4&transport=websocket",
            wetty.port
        );
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        let mut c = WettyClient { ws, uncommitted: 0 };
        let open = c.next_text().await?;
        anyhow::ensure!(open.starts_with('0'), "no Engine.IO open packet: {open:?}");
        c.ws.send(Message::Text("40".into())).await?;
        for _ in 0..16 {
            if c.next_text().await?.starts_with("40") {
                return Ok(c);
            }
        }
        anyhow::bail!("wetty did not accept the socket.io connection")
    }

    /// The next text frame, answering pings on the way.
    async fn next_text(&mut self) -> anyhow::Result<String> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(120), self.ws.next())
                .await
                .context("wetty sent nothing for 120 s")?;
            match msg {
                Some(Ok(Message::Text(t))) if t.as_str() == "2" => {
                    self.ws.send(Message::Text("3".into())).await?;
                }
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
                Some(Ok(Message::Close(f))) => anyhow::bail!("wetty closed the socket: {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("wetty closed the socket"),
            }
        }
    }

    /// The next `data` or `logout` event; commits received output as wetty's client does.
    async fn next_event(&mut self) -> anyhow::Result<WettyEvent> {
        loop {
            let text = self.next_text().await?;
            let Some(payload) = text.strip_prefix("42") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(payload)
                .with_context(|| format!("a socket.io event that is not JSON: {payload:.80}"))?;
            match v.get(0).and_then(|n| n.as_str()) {
                Some("data") => {
                    let data = v.get(1).and_then(|d| d.as_str()).unwrap_or_default();
                    // wetty counts JavaScript string lengths: UTF-16 code units.
                    self.uncommitted += data.encode_utf16().count();
                    if self.uncommitted >= WETTY_COMMIT_EVERY {
                        let commit = format!("42[\"commit\",{}]", self.uncommitted);
                        self.ws.send(Message::Text(commit.into())).await?;
                        self.uncommitted = 0;
                    }
                    return Ok(WettyEvent::Data(data.to_string()));
                }
                Some("logout") => return Ok(WettyEvent::Logout),
                _ => {}
            }
        }
    }

    async fn input(&mut self, text: &str) -> anyhow::Result<()> {
        let frame = format!("42{}", json!(["input", text]));
        self.ws.send(Message::Text(frame.into())).await?;
        Ok(())
    }

    /// Waits for the program's first output (the PTY in raw mode, or a prompt), then for quiet.
    async fn settle(&mut self) {
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(300), self.next_event()).await
        {}
    }

    async fn round_trip(&mut self, byte: u8) -> anyhow::Result<u64> {
        let ch = char::from(byte);
        let t0 = Instant::now();
        self.input(&ch.to_string()).await?;
        loop {
            match self.next_event().await? {
                WettyEvent::Data(d) if d.contains(ch) => {
                    return Ok(t0.elapsed().as_micros() as u64);
                }
                WettyEvent::Data(_) => {}
                WettyEvent::Logout => anyhow::bail!("the program ended during the benchmark"),
            }
        }
    }

    /// As `ws_throughput`: "go", then the bytes of output until the program ends.
    async fn throughput(&mut self) -> anyhow::Result<f64> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t0 = Instant::now();
        self.input("go\n").await?;
        let mut total = 0u64;
        let mut last = t0;
        // Until `logout`: the program has ended.
        while let WettyEvent::Data(d) = self.next_event().await? {
            total += d.len() as u64;
            last = Instant::now();
        }
        // wetty batches output for 2 ms before sending it, so the last batch may follow `logout`.
        while let Ok(Ok(WettyEvent::Data(d))) =
            tokio::time::timeout(Duration::from_millis(200), self.next_event()).await
        {
            total += d.len() as u64;
            last = Instant::now();
        }
        Ok(total as f64 / last.duration_since(t0).as_secs_f64().max(1e-9) / 1e6)
    }
}

/// Keystroke round trips over the three paths, interleaved in blocks.
struct Latency {
    direct: hdrhistogram::Histogram<u64>,
    serve: hdrhistogram::Histogram<u64>,
    wetty: Option<hdrhistogram::Histogram<u64>>,
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let round_trips = args.round_trips;
    let bytes = args.bytes;
    let flood = Duration::from_secs(args.flood_secs.max(1));
    let wetty_js = args.wetty.as_deref();
    let mut out = format!(
        "Command: `sandwarden-bench tty --round-trips {round_trips} --bytes {bytes} --flood-secs {}{}` \
         (release build). Machine: {}; load average at the start {}.\n\n",
        flood.as_secs(),
        if wetty_js.is_some() {
            " --wetty …/wetty/build/main.js"
        } else {
            ""
        },
        machine_line(),
        load_average()
    );
    // wetty is optional: a run without it, or where it cannot start, says so in the section.
    let wetty_js = match args.wetty.as_deref() {
        Some(js) => match probe_wetty(js).await {
            Ok(versions) => {
                out.push_str(&format!("wetty: {versions}.\n\n"));
                Some(js)
            }
            Err(e) => {
                out.push_str(&format!(
                    "wetty was given but could not run here, so it has no figures: {e:#}.\n\n"
                ));
                None
            }
        },
        None => {
            out.push_str("wetty was not run (it is optional; see below).\n\n");
            None
        }
    };
    out.push_str(&format!(
        "wetty is not a dependency of sandwarden: install it with `npm install --prefix DIR \
         wetty@{WETTY_VERSION}` (node-pty builds from source; needs python3, make and a C++ \
         compiler) and pass `--wetty DIR/node_modules/wetty/build/main.js`. It runs the same \
         programs through `env -S` under node-pty and is driven by the same Rust client over \
         socket.io's WebSocket transport (Engine.IO 4), committing output every 256 KiB as its \
         browser client does.\n\n"
    ));
    let templates = json!([
        {"name": "echo-tty", "kind": "tui", "command": ECHO_PROGRAM, "pool": 0},
        {"name": "writer", "kind": "tui", "command": writer(bytes), "pool": 0},
        {"name": "yes", "kind": "tui", "command": "yes", "pool": 0},
    ])
    .to_string();
    let serve = start_serve_with(0, "local", &templates)?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;

    // 1. Keystroke echo round trip, interleaved blocks.
    let (direct_harness, mut direct) = attach_direct(ECHO_PROGRAM).await?;
    let mut bridged = attach_session(&http, &serve, "echo-tty").await?;
    let mut wetty_echo = match wetty_js {
        Some(js) => {
            let w = start_wetty(js, ECHO_PROGRAM).await?;
            let mut c = WettyClient::connect(&w).await?;
            c.settle().await;
            Some((w, c))
        }
        None => None,
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain_ws(&mut direct).await;
    drain_ws(&mut bridged).await;
    let mut lat = Latency {
        direct: histogram()?,
        serve: histogram()?,
        wetty: if wetty_echo.is_some() {
            Some(histogram()?)
        } else {
            None
        },
    };
    let block = 100;
    let mut done = 0;
    while done < round_trips {
        for i in 0..block {
            lat.direct
                .record(ws_round_trip(&mut direct, b'a' + (i % 26) as u8).await?)?;
        }
        for i in 0..block {
            lat.serve
                .record(ws_round_trip(&mut bridged, b'a' + (i % 26) as u8).await?)?;
        }
        if let (Some((_, c)), Some(h)) = (wetty_echo.as_mut(), lat.wetty.as_mut()) {
            for i in 0..block {
                h.record(c.round_trip(b'a' + (i % 26) as u8).await?)?;
            }
        }
        done += block;
    }
    drop((direct, bridged, direct_harness, wetty_echo));
    let added = |other: &hdrhistogram::Histogram<u64>, q: f64| fmt_added(other, &lat.direct, q);
    out.push_str("### Keystroke echo round trip (one byte, `stty raw; cat`)\n\n");
    out.push_str("| path | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("harness WebSocket directly", &lat.direct));
    out.push('\n');
    out.push_str(&row("through serve's bridge (`tty_url`)", &lat.serve));
    out.push('\n');
    if let Some(h) = &lat.wetty {
        out.push_str(&row("wetty (socket.io over its WebSocket transport)", h));
        out.push('\n');
    }
    out.push_str(&format!(
        "\nAdded by serve: p50 {}, p99 {}, p99.9 {} (target: p99 ≤ 1 ms added).",
        added(&lat.serve, 0.5),
        added(&lat.serve, 0.99),
        added(&lat.serve, 0.999),
    ));
    if let Some(h) = &lat.wetty {
        let ratio =
            |q: f64| h.value_at_quantile(q) as f64 / lat.serve.value_at_quantile(q).max(1) as f64;
        out.push_str(&format!(
            " wetty / through serve: p50 {:.1}×, p99 {:.1}×.",
            ratio(0.5),
            ratio(0.99)
        ));
    }
    out.push_str("\n\n");

    // 2. Throughput: a program writes `bytes` to one reader; alternating runs, median of 3.
    let wetty_writer = match wetty_js {
        Some(js) => Some(start_wetty(js, &writer(bytes)).await?),
        None => None,
    };
    let (mut d_rates, mut s_rates, mut w_rates) = (Vec::new(), Vec::new(), Vec::new());
    // CPU seconds of wetty's node and of this process (the client) during wetty's runs.
    let mut wetty_cpu = (0.0, 0.0);
    let cpu_now = |w: &Wetty| {
        (
            sandwarden::procfs::cpu_seconds(w.child.id()),
            sandwarden::procfs::cpu_seconds(std::process::id()),
        )
    };
    for _ in 0..3 {
        let (started, mut ws) = attach_direct(&writer(bytes)).await?;
        d_rates.push(ws_throughput(&mut ws).await?);
        drop((ws, started));
        let mut ws = attach_session(&http, &serve, "writer").await?;
        s_rates.push(ws_throughput(&mut ws).await?);
        drop(ws);
        if let Some(w) = &wetty_writer {
            let mut c = WettyClient::connect(w).await?;
            // wetty says `login` once the program runs; its `read` then waits for "go".
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (node0, client0) = cpu_now(w);
            w_rates.push(c.throughput().await?);
            let (node1, client1) = cpu_now(w);
            wetty_cpu.0 += node1 - node0;
            wetty_cpu.1 += client1 - client0;
        }
    }
    drop(wetty_writer);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (d, s) = (median(&mut d_rates), median(&mut s_rates));
    out.push_str(&format!(
        "### Output throughput to one reader (`head -c {bytes} /dev/zero`, median of 3)\n\n\
         | path | MB/s |\n|---|---|\n| harness WebSocket directly | {d:.0} |\n\
         | through serve's bridge | {s:.0} |\n"
    ));
    if !w_rates.is_empty() {
        let w = median(&mut w_rates);
        out.push_str(&format!(
            "| wetty (bytes of terminal output decoded from its `data` events) | {w:.0} |\n\n\
             Through serve: {:.0}% of the direct rate (target ≥ 100 MB/s). wetty: {:.0}% of \
             the rate through serve. wetty sends output as JSON strings in socket.io events, so \
             each NUL byte of `/dev/zero` is 6 bytes (`\\u0000`) on its wire; the harness sends \
             binary frames. During wetty's runs node used {:.1} CPU-s and this benchmark's \
             client (JSON decoding included) {:.1} CPU-s.\n\n",
            100.0 * s / d.max(1e-9),
            100.0 * w / s.max(1e-9),
            wetty_cpu.0,
            wetty_cpu.1
        ));
    } else {
        out.push_str(&format!(
            "\nThrough serve: {:.0}% of the direct rate (target ≥ 100 MB/s).\n\n",
            100.0 * s / d.max(1e-9)
        ));
    }

    // 3. A flood to a viewer that does not read: `yes` writes while the client holds its frames.
    out.push_str(&flood_section(&http, &serve, wetty_js, flood).await?);
    Ok(out)
}

/// RSS over time of each process on a path where `yes` floods a viewer that reads nothing.
struct Track {
    name: &'static str,
    pid: Option<u32>,
    /// KiB, one sample every `SAMPLE_EVERY` from the start of the flood.
    samples: Vec<u64>,
}

impl Track {
    fn new(name: &'static str, pid: Option<u32>) -> Self {
        Track {
            name,
            pid,
            samples: Vec::new(),
        }
    }

    fn sample(&mut self) {
        if let Some(pid) = self.pid {
            self.samples.push(sandwarden::procfs::rss_kib(pid));
        }
    }
}

/// Rows of the flood table: every 5 s (every second for floods shorter than 10 s).
fn row_times(secs: u64) -> Vec<u64> {
    let step = if secs >= 10 { 5 } else { 1 };
    let mut at: Vec<u64> = (0..=secs).step_by(step as usize).collect();
    if at.last() != Some(&secs) {
        at.push(secs);
    }
    at
}

/// Growth between the flood's midpoint and its end, in KiB (negative when it shrank).
fn second_half_growth(samples: &[u64]) -> Option<i64> {
    let mid = *samples.get(samples.len() / 2)?;
    let max_late = *samples[samples.len() / 2..].iter().max()?;
    Some(max_late as i64 - mid as i64)
}

async fn flood_section(
    http: &reqwest::Client,
    serve: &Serve,
    wetty_js: Option<&Path>,
    flood: Duration,
) -> anyhow::Result<String> {
    let (direct_yes, direct_ws) = attach_direct("yes").await?;
    let direct_client = HarnessClient::new(format!("http://{}", direct_yes.addr), TOKEN);
    let before = sandbox_harnesses(serve);
    let bridged_ws = attach_session(http, serve, "yes").await?;
    // serve's end of the unread viewer's connection, to see whether (and when) serve lets go.
    let bridged_socket = match bridged_ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => {
            sandwarden::procfs::tcp_inode(tcp.peer_addr()?.port(), tcp.local_addr()?.port())
        }
        _ => None,
    };
    let sandbox_pid = sandbox_harnesses(serve)
        .into_iter()
        .find(|p| !before.contains(p));
    let wetty_yes = match wetty_js {
        Some(js) => {
            let w = start_wetty(js, "yes").await?;
            let c = WettyClient::connect(&w).await?;
            Some((w, c))
        }
        None => None,
    };
    let wetty_pid = wetty_yes.as_ref().map(|(w, _)| w.child.id());
    let mut tracks = vec![
        Track::new(
            "serve (bridging to the unread viewer)",
            Some(serve.child.id()),
        ),
        Track::new("the sandbox's harness server behind serve", sandbox_pid),
        Track::new(
            "a harness server with the unread viewer attached directly",
            Some(direct_yes.child.id()),
        ),
    ];
    if wetty_pid.is_some() {
        tracks.push(Track::new("wetty (node) with the unread viewer", wetty_pid));
    }
    let mut direct_dropped_at = None;
    let mut serve_dropped_at = None;
    let mut wetty_dropped_at = None;
    // node-pty starts the program just after the socket.io connection; seen once, then gone.
    let mut wetty_program_seen = false;
    let t0 = Instant::now();
    let mut next = t0;
    // Bounded by `flood`: one sample per `SAMPLE_EVERY`, health checks time out well within it.
    while t0.elapsed() < flood {
        for t in &mut tracks {
            t.sample();
        }
        if direct_dropped_at.is_none()
            && let Ok(Ok(h)) = tokio::time::timeout(SAMPLE_EVERY, direct_client.health()).await
            && h.viewers == Some(0)
        {
            direct_dropped_at = Some(t0.elapsed());
        }
        if serve_dropped_at.is_none()
            && let Some(inode) = &bridged_socket
            && !sandwarden::procfs::holds_socket(serve.child.id(), inode)
        {
            serve_dropped_at = Some(t0.elapsed());
        }
        // wetty kills the program when it drops the viewer (socket.io's ping timeout).
        if let Some(pid) = wetty_pid
            && wetty_dropped_at.is_none()
        {
            let runs = !sandwarden::procfs::children(pid).is_empty();
            if runs {
                wetty_program_seen = true;
            } else if wetty_program_seen {
                wetty_dropped_at = Some(t0.elapsed());
            }
        }
        next += SAMPLE_EVERY;
        tokio::time::sleep_until(next.into()).await;
    }
    drop((direct_ws, bridged_ws, direct_yes, wetty_yes));

    let secs = flood.as_secs();
    let mut out = format!(
        "### Memory under a flood to a slow reader (`yes`, the viewer reads nothing for {secs} s)\n\n\
         RSS sampled every {} ms; shown at these times into the flood, then the largest sample:\n\n\
         | time |",
        SAMPLE_EVERY.as_millis()
    );
    for t in &tracks {
        out.push_str(&format!(" {} |", t.name));
    }
    out.push_str("\n|---|");
    for _ in &tracks {
        out.push_str("---|");
    }
    out.push('\n');
    let cell = |t: &Track, value: Option<u64>| match (t.pid, value) {
        (None, _) => "not found".to_string(),
        (Some(_), Some(v)) => mib(v),
        (Some(_), None) => "–".to_string(),
    };
    for at in row_times(secs) {
        out.push_str(&format!("| {at} s |"));
        for t in &tracks {
            out.push_str(&format!(" {} |", cell(t, sample_at(&t.samples, at as f64))));
        }
        out.push('\n');
    }
    out.push_str("| max |");
    for t in &tracks {
        out.push_str(&format!(" {} |", cell(t, t.samples.iter().max().copied())));
    }
    out.push_str(
        "\n\nGrowth over the second half (largest sample after the midpoint − the midpoint):",
    );
    for t in &tracks {
        if let Some(g) = second_half_growth(&t.samples) {
            out.push_str(&format!(" {}: {:+.1} MiB;", t.name, g as f64 / 1024.0));
        }
    }
    out.pop();
    out.push_str(".\n\n");
    out.push_str(&format!(
        "The harness server attached directly {}.",
        match direct_dropped_at {
            Some(t) => format!(
                "let its unread viewer go after {:.1} s (its health showed no viewers)",
                t.as_secs_f64()
            ),
            None => "still had its unread viewer at the end".into(),
        }
    ));
    out.push_str(&format!(
        " serve {}.",
        match (&bridged_socket, serve_dropped_at) {
            (None, _) => "had a viewer connection this benchmark could not find".into(),
            (Some(_), Some(t)) => format!(
                "let its unread viewer go after {:.1} s (its `--client-timeout`, 30 s by \
                 default, after the harness had let serve go as a slow viewer)",
                t.as_secs_f64()
            ),
            (Some(_), None) => "still held its unread viewer at the end".into(),
        }
    ));
    if wetty_pid.is_some() {
        out.push_str(&format!(
            " wetty {}.",
            match wetty_dropped_at {
                Some(t) => format!(
                    "dropped its unread viewer and ended the program after {:.1} s (socket.io \
                     closes a client that answers no ping: interval 3 s, timeout 7 s)",
                    t.as_secs_f64()
                ),
                None if wetty_program_seen => {
                    "still ran the program for its unread viewer at the end".into()
                }
                None => "ran no program this benchmark could see as its child".into(),
            }
        ));
    }
    out.push_str(
        " Flat means the bounded channels and socket buffers hold the backlog and the program is \
         paused by its full PTY (or the viewer is let go), not queued in memory.\n",
    );
    Ok(out)
}

/// The wetty release the figures in docs/benchmarks.md were taken with.
const WETTY_VERSION: &str = "3.2.0";

/// Versions of wetty and node, after checking that wetty starts, accepts a client and echoes
/// a keystroke.
async fn probe_wetty(main_js: &Path) -> anyhow::Result<String> {
    let versions = wetty_versions(main_js)?;
    let wetty = start_wetty(main_js, ECHO_PROGRAM).await?;
    let mut client = WettyClient::connect(&wetty).await?;
    client.settle().await;
    tokio::time::timeout(Duration::from_secs(10), client.round_trip(b'x'))
        .await
        .context("wetty did not echo a keystroke within 10 s")??;
    Ok(versions)
}

/// "wetty X, node Y, node-pty Z", read from the package files next to `main_js`.
fn wetty_versions(main_js: &Path) -> anyhow::Result<String> {
    let package = main_js
        .parent()
        .and_then(Path::parent)
        .context("--wetty names wetty's build/main.js")?;
    let version = |p: &Path| -> String {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["version"].as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
    };
    let wetty = version(&package.join("package.json"));
    let pty = version(
        &package
            .parent()
            .map(|m| m.join("node-pty/package.json"))
            .unwrap_or_default(),
    );
    let node = Command::new("node")
        .arg("--version")
        .output()
        .context("running node --version")?;
    Ok(format!(
        "npm `wetty` {wetty} (node-pty {pty}, built from source against the node headers), \
         node {}",
        String::from_utf8_lossy(&node.stdout).trim()
    ))
}
