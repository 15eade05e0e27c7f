//! `bench mounts`: what each seed client's mount and each chat API adds to a whole turn over the
//! native unary message, with plain HTTP as each client makes its calls (the server's share,
//! not the clients' own work); each route on an echo session of its own, turns interleaved one
//! by one in one run.

use crate::bench::{BenchArgs, fmt_added, fmt_us, load_average, machine_line};
use anyhow::Context;
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::time::Instant;

/// One route's way of running a turn, and the session (or id) it runs on.
struct Route {
    name: &'static str,
    id: String,
    /// Where Everruns' event stream is read (kept open the whole run).
    events: Option<futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>>,
    hist: Histogram<u64>,
}

async fn call(
    http: &reqwest::Client,
    key: &str,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> anyhow::Result<reqwest::Response> {
    let mut req = http.request(method, &url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url}: {}",
        resp.status().as_u16()
    );
    Ok(resp)
}

/// Reads the open Everruns stream until a `turn.completed` frame.
async fn until_turn_completed(
    events: &mut futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
) -> anyhow::Result<()> {
    let mut buf = String::new();
    while let Some(chunk) = events.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if block.contains("event: turn.completed") {
                return Ok(());
            }
        }
    }
    anyhow::bail!("the Everruns stream ended")
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let turns = args.peer_turns.max(100);
    let serve = crate::serve::start_serve(8)?;
    let http = reqwest::Client::new();
    let base = serve.base.clone();
    let key: Value = call(
        &http,
        crate::serve::KEY,
        reqwest::Method::POST,
        format!("{base}/v1/api-keys"),
        Some(json!({"tenant": "bench-mounts"})),
    )
    .await?
    .json()
    .await?;
    let key = key["key"].as_str().context("a tenant key")?.to_string();
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    let mut routes = Vec::new();
    for name in [
        "native",
        "karta",
        "lap",
        "motus",
        "everruns",
        "chat",
        "responses",
        "messages",
    ] {
        // Where each client creates its session, what it sends and where the id is in the answer.
        // The chat routes' sessions are kept native ones, named by the header (the Responses
        // API's by the previous response, set after its first turn).
        let (path, body, field) = match name {
            "lap" => (
                "/api/v1/managed_agents/agents/echo/session",
                Some(json!({"title": "bench"})),
                "id",
            ),
            "motus" => ("/compat/motus/echo/sessions", None, "session_id"),
            "everruns" => ("/compat/everruns/echo/sessions", Some(json!({})), "id"),
            _ => ("/v1/sessions", Some(json!({"harness": "echo"})), "id"),
        };
        let s: Value = call(&http, &key, post.clone(), format!("{base}{path}"), body)
            .await?
            .json()
            .await?;
        let id = s[field]
            .as_str()
            .with_context(|| format!("{name}: no {field} in {s}"))?
            .to_string();
        let events = if name == "everruns" {
            let resp = http
                .get(format!("{base}/compat/everruns/echo/sessions/{id}/sse"))
                .bearer_auth(&key)
                .send()
                .await?;
            Some(resp.bytes_stream().boxed())
        } else {
            None
        };
        routes.push(Route {
            name,
            id,
            events,
            hist: Histogram::<u64>::new(3)?,
        });
    }
    let load = load_average();
    let mut previous: Option<String> = None;
    for i in 0..turns + 20 {
        for r in &mut routes {
            let text = format!("bench {i}");
            let id = r.id.clone();
            let started = Instant::now();
            match r.name {
                "native" | "karta" => {
                    let body = if r.name == "karta" {
                        json!({"text": text, "participant_name": "bench", "stream": false})
                    } else {
                        json!({"text": text})
                    };
                    call(
                        &http,
                        &key,
                        post.clone(),
                        format!("{base}/v1/sessions/{id}/messages"),
                        Some(body),
                    )
                    .await?
                    .bytes()
                    .await?;
                }
                "lap" => {
                    call(
                        &http,
                        &key,
                        post.clone(),
                        format!("{base}/api/v1/managed_agents/sessions/{id}/message"),
                        Some(json!({"text": text})),
                    )
                    .await?
                    .bytes()
                    .await?;
                }
                "motus" => {
                    call(
                        &http,
                        &key,
                        post.clone(),
                        format!("{base}/compat/motus/echo/sessions/{id}/messages"),
                        Some(json!({"content": text})),
                    )
                    .await?
                    .bytes()
                    .await?;
                    loop {
                        let s: Value = call(
                            &http,
                            &key,
                            get.clone(),
                            format!("{base}/compat/motus/echo/sessions/{id}?wait=true"),
                            None,
                        )
                        .await?
                        .json()
                        .await?;
                        if s["status"] != "running" {
                            break;
                        }
                    }
                }
                "everruns" => {
                    call(
                        &http,
                        &key,
                        post.clone(),
                        format!("{base}/compat/everruns/echo/sessions/{id}/messages"),
                        Some(json!({"message": {"role": "user",
                                                "content": [{"type": "text", "text": text}]}})),
                    )
                    .await?
                    .bytes()
                    .await?;
                    let events = r.events.as_mut().context("the Everruns stream")?;
                    until_turn_completed(events).await?;
                }
                "chat" => {
                    http.post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&key)
                        .header("x-sandwarden-session", &id)
                        .json(&json!({"model": "echo",
                                      "messages": [{"role": "user", "content": text}]}))
                        .send()
                        .await?
                        .error_for_status()?
                        .bytes()
                        .await?;
                }
                "messages" => {
                    http.post(format!("{base}/v1/messages"))
                        .bearer_auth(&key)
                        .header("x-sandwarden-session", &id)
                        .json(&json!({"model": "echo", "max_tokens": 64,
                                      "messages": [{"role": "user", "content": text}]}))
                        .send()
                        .await?
                        .error_for_status()?
                        .bytes()
                        .await?;
                }
                _ => {
                    let mut req = http
                        .post(format!("{base}/v1/responses"))
                        .bearer_auth(&key)
                        .json(&json!({"model": "echo", "input": text,
                                      "previous_response_id": previous}));
                    if previous.is_none() {
                        req = req.header("x-sandwarden-session", &id);
                    }
                    let resp: Value = req.send().await?.error_for_status()?.json().await?;
                    previous = resp["id"].as_str().map(String::from);
                }
            }
            if i >= 20 {
                r.hist.record(started.elapsed().as_micros() as u64)?;
            }
        }
    }
    let native = routes[0].hist.clone();
    let mut report = format!(
        "Command: `sandwarden-bench mounts --peer-turns {turns}` (release build; {turns} turns \
         per route after 20 to warm up, interleaved one by one). Machine: {}; load average at \
         the start {load}.\n\n\
         A whole unary turn on an echo session of each route's own, as each client makes its \
         calls, with plain HTTP (the server's share; the clients' own work is not in it): the \
         native `POST …/messages`; Karta's (the native route with its fields); LAP's \
         `…/message`; Motus' `POST …/messages` (202) and `GET …?wait=true` until not \
         `running`; Everruns' send (201) until `turn.completed` on its open SSE stream; Chat \
         Completions and Anthropic Messages on a kept session (`X-Sandwarden-Session`); \
         Responses continued by `previous_response_id`.\n\n\
         | route | p50 | p99 | added to native, p50 | added to native, p99 |\n|---|---|---|---|---|\n",
        machine_line()
    );
    for r in &routes {
        report.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.name,
            fmt_us(r.hist.value_at_quantile(0.5)),
            fmt_us(r.hist.value_at_quantile(0.99)),
            fmt_added(&r.hist, &native, 0.5),
            fmt_added(&r.hist, &native, 0.99),
        ));
    }
    drop(serve);
    Ok(report)
}
