//! `bench isolation`: what confining local sandboxes costs their start. Two `serve`s run side by
//! side, one with `--isolation none` (plain processes) and one with `--isolation bwrap` (the
//! default where bubblewrap works: namespaces, a user of its own, cgroups, the egress proxy), and
//! the same creates alternate between them: warm claims from a pool, and cold starts.

use crate::bench::{histogram, row};
use crate::serve::{Serve, create, start_serve_env, wait_ready_session};
use anyhow::Context;
use std::time::{Duration, Instant};

const TEMPLATES: &str =
    r#"[{"name":"echo-cold","kind":"api","command":"sandwarden echo-agent","pool":0}]"#;

pub async fn run(args: &crate::bench::BenchArgs) -> anyhow::Result<String> {
    let levels = ["none", "bwrap"];
    let serves: Vec<Serve> = levels
        .iter()
        .map(|level| {
            start_serve_env(
                1,
                "local",
                TEMPLATES,
                &[("SANDWARDEN_ISOLATION".into(), level.to_string())],
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let mut warm = [histogram()?, histogram()?];
    let mut cold = [histogram()?, histogram()?];
    let mut missed = [0usize; 2];
    let claims = args.starts.max(10) + 10;
    for _ in 0..claims {
        for (i, serve) in serves.iter().enumerate() {
            // Lets the pool refill (a confined start takes longer than a plain one).
            tokio::time::sleep(Duration::from_millis(250)).await;
            let t0 = Instant::now();
            let s = create(&http, &serve.base, "echo").await?;
            if s["status"] == "ready" {
                warm[i].record(t0.elapsed().as_micros() as u64)?;
            } else {
                missed[i] += 1;
                let id = s["id"].as_str().context("id")?;
                wait_ready_session(&http, &serve.base, id).await?;
            }
        }
    }
    for _ in 0..args.starts.max(5) {
        for (i, serve) in serves.iter().enumerate() {
            let t0 = Instant::now();
            let s = create(&http, &serve.base, "echo-cold").await?;
            let id = s["id"].as_str().context("id")?;
            wait_ready_session(&http, &serve.base, id).await?;
            cold[i].record(t0.elapsed().as_micros() as u64)?;
        }
    }
    let mut out = String::from(
        "Local sandboxes' session create → ready, `--isolation none` and `--isolation bwrap` side \
         by side (alternating creates on two `serve`s, echo agent).\n\n\
         | isolation, claim | p50 | p99 | p99.9 | samples |\n|---|---|---|---|---|\n",
    );
    for (i, level) in levels.iter().enumerate() {
        out.push_str(&row(&format!("{level}, warm (pooled)"), &warm[i]));
        out.push('\n');
        out.push_str(&row(&format!("{level}, cold (start a sandbox)"), &cold[i]));
        out.push('\n');
    }
    let ratio = |h: &[hdrhistogram::Histogram<u64>; 2], q: f64| {
        h[1].value_at_quantile(q) as f64 / h[0].value_at_quantile(q).max(1) as f64
    };
    out.push_str(&format!(
        "\nbwrap / none: cold p50 {:.2}×, p99 {:.2}×; warm p50 {:.2}×, p99 {:.2}×. Target: warm p99 \
         under 20 ms. Creates that found the pool not yet refilled (not counted as warm): none {}, \
         bwrap {} of {claims}.\n",
        ratio(&cold, 0.5),
        ratio(&cold, 0.99),
        ratio(&warm, 0.5),
        ratio(&warm, 0.99),
        missed[0],
        missed[1],
    ));
    Ok(out)
}
