//! `bench vendors`: what the vendor-compatible APIs add to a message's first streamed event.
//! The official SDKs (from PyPI, in a virtualenv of their own) post a message on an echo session
//! and wait for its first event on a stream they keep open, beside the native API doing the same
//! with plain HTTP; turns interleaved one by one in one run.

use crate::bench::{BenchArgs, fmt_added, fmt_us, load_average, machine_line};
use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::json;
use std::process::Command;

const SCRIPT: &str = include_str!("../scripts/vendor_latency.py");
const SDKS: [&str; 3] = ["anthropic==2.16.0", "openai==3.60.0", "httpx"];

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let turns = args.peer_turns.max(100);
    let scratch = crate::peers::scratch_dir(args)?;
    let bin = crate::peers::venv("python3", &scratch.join("sdk-venv"), &SDKS, "python")?;
    let script = scratch.join("vendor_latency.py");
    std::fs::write(&script, SCRIPT)?;
    let serve = crate::serve::start_serve(5)?;
    let http = reqwest::Client::new();
    let key: serde_json::Value = http
        .post(format!("{}/v1/api-keys", serve.base))
        .bearer_auth(crate::serve::KEY)
        .json(&json!({"tenant": "bench-vendors"}))
        .send()
        .await?
        .json()
        .await?;
    let key = key["key"].as_str().context("a tenant key")?.to_string();
    let load = load_average();
    let out = tokio::task::spawn_blocking({
        let base = serve.base.clone();
        move || {
            Command::new(bin.join("python"))
                .arg(&script)
                .env("SANDWARDEN_URL", base)
                .env("SANDWARDEN_KEY", key)
                .env("SANDWARDEN_TURNS", turns.to_string())
                .output()
        }
    })
    .await??;
    anyhow::ensure!(
        out.status.success(),
        "the SDK client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the SDK client's samples")?;
    let mut routes = Vec::new();
    for name in [
        "native",
        "anthropic_http",
        "openai_http",
        "anthropic",
        "openai",
    ] {
        let mut h = Histogram::<u64>::new(3)?;
        for us in samples[name].as_array().context("samples")? {
            h.record(us.as_u64().context("a sample")?)?;
        }
        routes.push((name, h));
    }
    let native = routes[0].1.clone();
    let mut report = format!(
        "Command: `sandwarden-bench vendors --peer-turns {turns}` (release build; {turns} turns \
         per route after 20 to warm up, interleaved one by one). Machine: {}; load average at \
         the start {load}.\n\n\
         From posting a message to its first streamed event, each route on an echo session of \
         its own whose event stream stays open the whole run: the native API with plain HTTP \
         (`httpx`: `POST …/messages` with `async`, the session's SSE), the Anthropic SDK \
         (`events.send`, then `events.stream`'s next event: the turn's `user.message`) and the \
         OpenAI SDK (`events.create`, then the next event: `agent.session.turn.created`), and the \
         two vendor routes with plain HTTP as the native one is timed (`anthropic_http`, \
         `openai_http`: what the server's translation adds). The SDK rows include the SDKs' \
         own work (building the request, parsing each event into its types).\n\n\
         | route | p50 | p99 | added to native, p50 | added to native, p99 |\n|---|---|---|---|---|\n",
        machine_line()
    );
    for (name, h) in &routes {
        report.push_str(&format!(
            "| {name} | {} | {} | {} | {} |\n",
            fmt_us(h.value_at_quantile(0.5)),
            fmt_us(h.value_at_quantile(0.99)),
            fmt_added(h, &native, 0.5),
            fmt_added(h, &native, 0.99),
        ));
    }
    drop(serve);
    Ok(report)
}
