//! `sandwarden bench tty`: the terminal bridge in `serve` (`GET /v1/sessions/{id}/tty`, reached
//! by the session's `tty_url`) against the harness WebSocket reached directly, in one run:
//! keystroke echo round trip, output throughput, and memory while a program floods a viewer
//! that does not read.

use crate::bench::{
    BenchArgs, ECHO_PROGRAM, TOKEN, Ws, drain_ws, fmt_us, histogram, load_average, machine_line,
    row, start_harness, wait_ready, ws_round_trip,
};
use crate::bench_serve::{KEY, Serve, create, start_serve_with, wait_ready_session};
use crate::harness_client::HarnessClient;
use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// How long the slow reader holds its frames unread while the program writes.
const FLOOD_FOR: Duration = Duration::from_secs(6);
/// Longest a throughput run may take before the benchmark gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(120);

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

/// Sends "go" to a program waiting for a line, then counts its output until it exits: MB/s.
async fn throughput(ws: &mut Ws) -> anyhow::Result<f64> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    ws.send(Message::Binary(b"go\n".to_vec().into())).await?;
    let mut total = 0u64;
    while let Some(msg) = tokio::time::timeout(RUN_LIMIT, ws.next())
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

/// The harness server of a sandbox serve started: a process whose command line runs
/// `sandwarden harness` under serve's data dir.
fn sandbox_harnesses(serve: &Serve) -> Vec<u32> {
    let dir = serve.dir.to_string_lossy();
    crate::procfs::pids_matching(&[&dir, "harness"])
        .into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .filter(|&p| p != serve.child.id())
        .collect()
}

/// RSS samples (KiB) as "first / max / last".
fn first_max_last(samples: &[u64]) -> String {
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    match (samples.first(), samples.iter().max(), samples.last()) {
        (Some(f), Some(m), Some(l)) => format!("{} / {} / {}", mib(*f), mib(*m), mib(*l)),
        _ => "–".into(),
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let round_trips = args.round_trips;
    let bytes = args.bytes;
    let mut out = format!(
        "Command: `sandwarden bench tty --round-trips {round_trips} --bytes {bytes}` (release build). \
         Machine: {}; load average at the start {}.\n\n",
        machine_line(),
        load_average()
    );
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    drain_ws(&mut direct).await;
    drain_ws(&mut bridged).await;
    let (mut via_direct, mut via_serve) = (histogram()?, histogram()?);
    let block = 100;
    let mut done = 0;
    while done < round_trips {
        for i in 0..block {
            via_direct.record(ws_round_trip(&mut direct, b'a' + (i % 26) as u8).await?)?;
        }
        for i in 0..block {
            via_serve.record(ws_round_trip(&mut bridged, b'a' + (i % 26) as u8).await?)?;
        }
        done += block;
    }
    drop((direct, bridged, direct_harness));
    let added = |q: f64| {
        via_serve
            .value_at_quantile(q)
            .saturating_sub(via_direct.value_at_quantile(q))
    };
    out.push_str("### Keystroke echo round trip (one byte, `stty raw; cat`)\n\n");
    out.push_str("| path | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("harness WebSocket directly", &via_direct));
    out.push('\n');
    out.push_str(&row("through serve's bridge (`tty_url`)", &via_serve));
    out.push_str(&format!(
        "\n\nAdded by serve: p50 {}, p99 {}, p99.9 {} (target: p99 ≤ 1 ms added).\n\n",
        fmt_us(added(0.5)),
        fmt_us(added(0.99)),
        fmt_us(added(0.999)),
    ));

    // 2. Throughput: a program writes `bytes` to one reader; alternating runs, median of 3.
    let (mut d_rates, mut s_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (started, mut ws) = attach_direct(&writer(bytes)).await?;
        d_rates.push(throughput(&mut ws).await?);
        drop((ws, started));
        let mut ws = attach_session(&http, &serve, "writer").await?;
        s_rates.push(throughput(&mut ws).await?);
    }
    d_rates.sort_by(f64::total_cmp);
    s_rates.sort_by(f64::total_cmp);
    let (d, s) = (d_rates[1], s_rates[1]);
    out.push_str(&format!(
        "### Output throughput to one reader (`head -c {bytes} /dev/zero`, median of 3)\n\n\
         | path | MB/s |\n|---|---|\n| harness WebSocket directly | {d:.0} |\n\
         | through serve's bridge | {s:.0} |\n\n\
         Through serve: {:.0}% of the direct rate (target ≥ 100 MB/s).\n\n",
        100.0 * s / d.max(1e-9)
    ));

    // 3. A flood to a viewer that does not read: `yes` writes while the client holds its frames.
    let serve_pid = serve.child.id();
    let (direct_yes, direct_ws) = attach_direct("yes").await?;
    let before = sandbox_harnesses(&serve);
    let bridged_ws = attach_session(&http, &serve, "yes").await?;
    let sandbox_pid = sandbox_harnesses(&serve)
        .into_iter()
        .find(|p| !before.contains(p));
    let (mut serve_rss, mut sandbox_rss, mut direct_rss) = (Vec::new(), Vec::new(), Vec::new());
    let t0 = Instant::now();
    while t0.elapsed() < FLOOD_FOR {
        serve_rss.push(crate::procfs::rss_kib(serve_pid));
        direct_rss.push(crate::procfs::rss_kib(direct_yes.child.id()));
        if let Some(pid) = sandbox_pid {
            sandbox_rss.push(crate::procfs::rss_kib(pid));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop((direct_ws, bridged_ws, direct_yes));
    out.push_str(&format!(
        "### Memory under a flood to a slow reader (`yes`, the viewer reads nothing for {} s)\n\n\
         RSS sampled every 250 ms, first / max / last:\n\n| process | RSS |\n|---|---|\n\
         | serve (bridging to the unread viewer) | {} |\n\
         | the sandbox's harness server behind serve | {} |\n\
         | a harness server with the unread viewer attached directly | {} |\n\n\
         Flat means the bounded channels and socket buffers hold the backlog and the program is \
         paused by its full PTY, not queued in memory.\n",
        FLOOD_FOR.as_secs(),
        first_max_last(&serve_rss),
        if sandbox_pid.is_some() {
            first_max_last(&sandbox_rss)
        } else {
            "not found (no harness under serve's data dir)".into()
        },
        first_max_last(&direct_rss),
    ));
    Ok(out)
}
