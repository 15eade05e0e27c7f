//! `sandwarden-bench history`: serve's peak memory for the largest answer the bounds allow. A
//! history page holds at most 4 MiB of messages but always at least one, so the largest page is
//! one message of the largest size a request may carry (the 16 MiB body bound, in 256 parts,
//! the most a message has). One echo session's history is filled with such messages; then
//! several clients fetch that page at once, a few rounds, and serve's resident memory is read
//! before and at its peak (`VmHWM`, reset before each set of fetches). serve runs with its
//! default memory for answers in flight (`--answer-memory-mib`) and no per-tenant share of it,
//! so the server-wide bound is what holds the peak when many fetch at once.

use crate::bench::{BenchArgs, load_average, machine_line};
use crate::serve::{KEY, create, start_serve_args, wait_ready_session};
use anyhow::Context;
use serde_json::json;
use std::time::{Duration, Instant};

/// The body bound of `serve`'s API (`api::MAX_BODY`), less room for the JSON around the parts so
/// that the turn request to the harness, which carries the parts, fits its own 16 MiB bound.
const BODY: usize = 16 * 1024 * 1024 - 64 * 1024;
/// Largest messages sent (each is echoed, so the history holds twice as many).
const MESSAGES: usize = 4;
/// Fetches of the largest page at once (one set of rounds each), and rounds of them.
const AT_ONCE: [usize; 2] = [8, 64];
const ROUNDS: usize = 3;

/// A message of `MAX_PARTS` text parts filling `BODY` bytes of JSON.
fn largest_message() -> serde_json::Value {
    let parts = sandwarden_proto::event::MAX_PARTS;
    let per_part = (BODY - parts * 32) / parts;
    let parts: Vec<_> = (0..parts)
        .map(|i| {
            let letter = char::from(b'a' + (i % 26) as u8);
            json!({"type": "text", "text": letter.to_string().repeat(per_part)})
        })
        .collect();
    json!({ "parts": parts })
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Resets `pid`'s resident high-water mark (`VmHWM`) to its current resident memory.
fn reset_peak(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting VmHWM through /proc/{pid}/clear_refs"))
}

pub async fn run(_args: &BenchArgs) -> anyhow::Result<String> {
    let serve = start_serve_args(
        |_| {
            Ok(vec![
                "--pool".into(),
                "echo=1".into(),
                "--tenant-answer-mib".into(),
                "0".into(),
            ])
        },
        &[],
    )?;
    let pid = serve.child.id();
    let base = serve.base.clone();
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let s = create(&http, &base, "echo").await?;
    let id = s["id"].as_str().context("session id")?.to_string();
    wait_ready_session(&http, &base, &id).await?;

    let body = serde_json::to_vec(&largest_message())?;
    let t0 = Instant::now();
    for i in 0..MESSAGES {
        let r = http
            .post(format!("{base}/v1/sessions/{id}/messages"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = r.status();
        let text = r.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "message {} of {MESSAGES} failed: {status} {}",
            i + 1,
            String::from_utf8_lossy(&text[..text.len().min(500)])
        );
    }
    let fill = t0.elapsed();
    // Let the filling's buffers go back before reading the resting memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = sandwarden::procfs::rss_kib(pid);
    let before_anon = sandwarden::procfs::rss_anon_kib(pid);

    let page = format!("{base}/v1/sessions/{id}/messages?limit=1");
    let mut page_bytes = 0;
    let mut rows = String::new();
    for at_once in AT_ONCE {
        reset_peak(pid)?;
        let start = sandwarden::procfs::rss_kib(pid);
        let t0 = Instant::now();
        let mut refused = 0;
        for _ in 0..ROUNDS {
            let fetches = (0..at_once).map(|_| async {
                let r = http.get(&page).bearer_auth(KEY).send().await?;
                let status = r.status();
                let body = r.bytes().await?;
                anyhow::ensure!(
                    status.is_success() || status.as_u16() == 503,
                    "page: {status} {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                );
                Ok(status.is_success().then_some(body.len()))
            });
            for got in futures::future::join_all(fetches).await {
                match got? {
                    Some(n) => page_bytes = n,
                    None => refused += 1,
                }
            }
        }
        let fetch = t0.elapsed();
        let peak = sandwarden::procfs::peak_rss_kib(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let settled = sandwarden::procfs::rss_kib(pid);
        let added = peak.saturating_sub(start);
        rows += &format!(
            "| {at_once} | {:.1} s | {refused} | {} | {} | {} ({:.1}× the answer) | {} |\n",
            fetch.as_secs_f64(),
            mib(start),
            mib(peak),
            mib(added),
            (added * 1024) as f64 / page_bytes.max(1) as f64,
            mib(settled),
        );
    }

    Ok(format!(
        "Command: `sandwarden-bench history` (release build). Machine: {}; load average at the \
         start {}.\n\n\
         The largest page: one message of {} parts in a {:.1} MiB request body ({MESSAGES} sent, \
         each echoed, in {:.1} s); the page's answer is {:.1} MiB of JSON, counting {:.0} MiB of \
         the memory for answers (512 MiB by default). serve's resident memory with the history \
         filled and settled: {} ({} of it anonymous). Clients fetched the page at once, {ROUNDS} rounds per row:\n\n\
         | at once | time | answered 503 | resident before | peak (`VmHWM`) | added at the peak | 2 s after |\n\
         |---|---|---|---|---|---|---|\n{rows}\n",
        machine_line(),
        load_average(),
        sandwarden_proto::event::MAX_PARTS,
        body.len() as f64 / 1024.0 / 1024.0,
        fill.as_secs_f64(),
        page_bytes as f64 / 1024.0 / 1024.0,
        2.0 * page_bytes as f64 / 1024.0 / 1024.0,
        mib(before),
        mib(before_anon),
    ))
}
