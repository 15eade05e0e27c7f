//! `sandwarden-bench docker`: container sandboxes (`serve --runtime docker`) next to local-process
//! sandboxes, measured in one run with the same client: warm claims and cold starts, the added
//! latency of a message and of a keystroke through a container, and `serve`'s memory per container.
//! Needs a container engine (`DOCKER_HOST`) and the images `harness-images/build.sh base echo shell`.

use crate::bench::{Ws, drain_ws, fmt_added, histogram, machine_line, row, ws_round_trip};
use crate::serve::{
    KEY, Serve, create, delete_session, start_serve_with, unary_turn, wait_ready_session,
};
use anyhow::Context;
use serde_json::json;
use std::time::{Duration, Instant};

fn templates(docker: bool) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let image = |name: &str| {
        if docker {
            json!({"image": format!("sandwarden/harness-{name}:{version}")})
        } else {
            json!({})
        }
    };
    json!([
        {"name": "echo-cold", "kind": "api", "command": "sandwarden echo-agent", "pool": 0,
         "container": image("echo")},
        {"name": "cat", "kind": "tui", "command": "cat", "pool": 0, "container": image("shell")},
    ])
    .to_string()
}

async fn delete(http: &reqwest::Client, serve: &Serve, ids: &[String]) {
    for id in ids {
        delete_session(http, &serve.base, id).await;
    }
}

async fn unary(http: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<u64> {
    Ok(unary_turn(http, base, id, "ping").await?.0)
}

async fn attach(base: &str, id: &str) -> anyhow::Result<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req =
        format!("{}/v1/sessions/{id}/tty", base.replacen("http", "ws", 1)).into_client_request()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(ws)
}

async fn ready_session(
    http: &reqwest::Client,
    serve: &Serve,
    harness: &str,
) -> anyhow::Result<String> {
    let s = create(http, &serve.base, harness).await?;
    let id = s["id"].as_str().context("session id")?.to_string();
    wait_ready_session(http, &serve.base, &id).await?;
    Ok(id)
}

pub async fn run(args: &crate::bench::BenchArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        std::env::var("DOCKER_HOST").is_ok()
            || std::path::Path::new("/var/run/docker.sock").exists(),
        "no container engine: set DOCKER_HOST (e.g. unix:///run/podman/podman.sock) and build the images with harness-images/build.sh base echo shell"
    );
    let turns = (args.round_trips / 10).max(200);
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let local = start_serve_with(1, "local", &templates(false))?;
    let docker = start_serve_with(1, "docker", &templates(true))?;
    let mut out = format!(
        "Command: `DOCKER_HOST=… sandwarden-bench docker --round-trips {}` (release build; engine: {}). Machine: {}.\n\n",
        args.round_trips,
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "/var/run/docker.sock".into()),
        machine_line()
    );

    // Message and keystroke latency: one session of each kind per runtime, interleaved blocks.
    let mut sessions: Vec<(&Serve, String)> = Vec::new();
    let l_echo = ready_session(&http, &local, "echo-cold").await?;
    let d_echo = ready_session(&http, &docker, "echo-cold").await?;
    let l_cat = ready_session(&http, &local, "cat").await?;
    let d_cat = ready_session(&http, &docker, "cat").await?;
    sessions.extend([
        (&local, l_echo.clone()),
        (&docker, d_echo.clone()),
        (&local, l_cat.clone()),
        (&docker, d_cat.clone()),
    ]);
    let mut l_ws = attach(&local.base, &l_cat).await?;
    let mut d_ws = attach(&docker.base, &d_cat).await?;
    drain_ws(&mut l_ws).await;
    drain_ws(&mut d_ws).await;
    for _ in 0..20 {
        unary(&http, &local.base, &l_echo).await?;
        unary(&http, &docker.base, &d_echo).await?;
    }
    let (mut l_msg, mut d_msg, mut l_key, mut d_key) =
        (histogram()?, histogram()?, histogram()?, histogram()?);
    let block = 20;
    let mut done = 0;
    while done < turns {
        for _ in 0..block {
            l_msg.record(unary(&http, &local.base, &l_echo).await?)?;
        }
        for _ in 0..block {
            d_msg.record(unary(&http, &docker.base, &d_echo).await?)?;
        }
        for i in 0..block {
            let byte = b'a' + (i % 26) as u8;
            l_key.record(ws_round_trip(&mut l_ws, byte).await?)?;
        }
        for i in 0..block {
            let byte = b'a' + (i % 26) as u8;
            d_key.record(ws_round_trip(&mut d_ws, byte).await?)?;
        }
        done += block;
    }
    drop((l_ws, d_ws));
    out.push_str(
        "### Message and terminal latency: container vs local process, both through `serve`\n\n",
    );
    out.push_str("| path | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    for (name, h) in [
        ("unary message, local-process sandbox", &l_msg),
        ("unary message, container sandbox", &d_msg),
        ("keystroke echo (`cat`), local-process sandbox", &l_key),
        ("keystroke echo (`cat`), container sandbox", &d_key),
    ] {
        out.push_str(&row(name, h));
        out.push('\n');
    }
    out.push_str(&format!(
        "\nAdded by the container: message p50 {}, p99 {}; keystroke p50 {}, p99 {}.\n\n",
        fmt_added(&d_msg, &l_msg, 0.5),
        fmt_added(&d_msg, &l_msg, 0.99),
        fmt_added(&d_key, &l_key, 0.5),
        fmt_added(&d_key, &l_key, 0.99),
    ));

    // Claims: warm (pool of 1, refilled between claims) and cold (no pool), containers only.
    let (mut warm, mut cold) = (histogram()?, histogram()?);
    let claims = 20;
    for _ in 0..claims {
        // Let the pool refill (a container start is ~0.5 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t0 = Instant::now();
        let s = create(&http, &docker.base, "echo").await?;
        let id = s["id"].as_str().context("id")?.to_string();
        if s["status"] == "ready" {
            warm.record(t0.elapsed().as_micros() as u64)?;
        } else {
            wait_ready_session(&http, &docker.base, &id).await?;
        }
        delete(&http, &docker, &[id]).await;
    }
    for _ in 0..claims / 2 {
        let t0 = Instant::now();
        let id = ready_session(&http, &docker, "echo-cold").await?;
        cold.record(t0.elapsed().as_micros() as u64)?;
        delete(&http, &docker, &[id]).await;
    }
    out.push_str("### Container sandboxes: session create → ready\n\n| claim | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n");
    out.push_str(&row("warm (a started container from the pool)", &warm));
    out.push('\n');
    out.push_str(&row(
        "cold (create and start a container, harness ready)",
        &cold,
    ));
    out.push_str(&format!(
        "\n\nTarget: warm p99 under 30 ms. Cold/warm p50 ratio: {:.0}×.\n\n",
        cold.value_at_quantile(0.5) as f64 / warm.value_at_quantile(0.5).max(1) as f64
    ));

    // Memory of serve per container sandbox (the containers' own memory is the engine's).
    let pid = docker.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = sandwarden::procfs::rss_kib(pid);
    let n = 20;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(ready_session(&http, &docker, "echo-cold").await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = sandwarden::procfs::rss_kib(pid);
    out.push_str(&format!(
        "### Memory of `serve` per container sandbox\n\n{n} idle container sessions: `serve` RSS {:.1} MiB → {:.1} MiB, {:.0} KiB per container sandbox.\n",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 / n as f64
    ));
    delete(&http, &docker, &ids).await;
    for (serve, id) in sessions {
        delete(&http, serve, &[id]).await;
    }
    drop(docker);
    drop(local);
    Ok(out)
}
