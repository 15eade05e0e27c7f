//! The orchestrator through its public surface: a real `sandwarden serve` on 127.0.0.1:0 with real
//! harness processes, reached with real HTTP and WebSocket clients.

use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test]
async fn a_unary_message_returns_one_json_reply() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let id = id.as_str();
    let (status, reply) = api.say(id, "hello sandwarden").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["session_id"], id);
    assert_eq!(reply["text"], "hello sandwarden");
    assert_eq!(reply["usage"]["total_tokens"], 4);
    let roles: Vec<&str> = reply["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["role"].as_str())
        .collect();
    assert_eq!(roles, vec!["user", "assistant"]);
    assert!(
        reply["turn_id"]
            .as_str()
            .is_some_and(|t| t.starts_with("turn_"))
    );
    // Every seed shape is accepted.
    for body in [
        json!({"parts": [{"type": "text", "text": "p"}]}),
        json!({"message": "m"}),
        json!({"content": "c", "role": "user"}),
        json!({"message": {"role": "user", "content": [{"type": "text", "text": "e"}]}}),
    ] {
        let (status, reply) = api
            .call(
                "POST",
                &format!("/v1/sessions/{id}/messages"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, 200, "{body}: {reply}");
    }
    let (_, history) = api
        .call("GET", &format!("/v1/sessions/{id}/messages"), None)
        .await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(10));
}

/// Local sandboxes run the slim `sandwarden-harness` of this build (cargo builds it beside
/// `sandwarden`), and the echo agent it starts as `sandwarden echo-agent` is the full binary.
#[tokio::test]
async fn local_sandboxes_run_the_slim_harness_binary() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (status, reply) = api.say(&id, "ping").await;
    assert_eq!(status, 200, "{reply}");
    let exe_name = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    // Under bubblewrap the sandbox's command line is `sandwarden sandbox-exec`'s and bwrap's;
    // the harness runs below them.
    let harnesses: Vec<u32> =
        sandwarden::procfs::pids_matching(&["harness --listen", &serve.data.to_string_lossy()])
            .into_iter()
            .flat_map(|pid| {
                let pid = pid as u32;
                std::iter::once(pid).chain(sandwarden::procfs::descendants(pid))
            })
            .filter(|pid| {
                exe_name(*pid).as_deref() != Some("bwrap")
                    && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        let c = String::from_utf8_lossy(&c);
                        c.contains("--listen") && !c.contains("sandbox-exec")
                    })
            })
            .collect();
    assert!(!harnesses.is_empty(), "no harness process found");
    for pid in harnesses {
        let pid = pid as i32;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
        assert_eq!(
            exe.file_name().and_then(|n| n.to_str()),
            Some("sandwarden-harness"),
            "{}",
            exe.display()
        );
        let agents = children(pid);
        assert!(!agents.is_empty(), "harness {pid} runs no agent");
        for agent in agents {
            let exe = std::fs::read_link(format!("/proc/{agent}/exe")).expect("exe");
            assert_eq!(exe.file_name().and_then(|n| n.to_str()), Some("sandwarden"));
        }
    }
}

#[tokio::test]
async fn a_streamed_message_is_sse_ending_in_done() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let events = api
        .sse(
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "/tool a file", "stream": true})),
            None,
            100,
        )
        .await;
    let types: Vec<&str> = events.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(types.first(), Some(&"step_start"));
    assert_eq!(types.last(), Some(&"done"), "{types:?}");
    assert!(types.contains(&"tool_use") && types.contains(&"tool_result"));
    let seqs: Vec<i64> = events
        .iter()
        .map(|(_, _, e)| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap-free seq: {seqs:?}"
    );
    assert_eq!(events[0].0, seqs[0].to_string(), "SSE id is the seq");
}

#[tokio::test]
async fn an_async_message_is_202_then_long_poll_and_events() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let resp = api
        .http
        .post(serve.url(&format!("/v1/sessions/{id}/messages")))
        .bearer_auth(ADMIN_KEY)
        .header("prefer", "respond-async")
        .json(&json!({"text": "/slow 5 later"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 202);
    let location = resp
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("Location")
        .to_string();
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["status"], "running");
    let (_, turn) = api
        .call("GET", &format!("{location}?wait=true&timeout=30"), None)
        .await;
    assert_eq!(turn["status"], "completed", "{turn}");
    assert!(turn["text"].as_str().unwrap_or("").contains("later 4"));
    let (_, session) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(session["status"], "ready");
}

/// Checks `X-Sandwarden-Signature` against `token`. The signature covers the exact bytes sent;
/// re-serializing the parsed body preserves them for these payloads.
fn assert_signed(headers: &axum::http::HeaderMap, body: &serde_json::Value, token: &str) {
    let sig = headers
        .get("x-sandwarden-signature")
        .and_then(|v| v.to_str().ok())
        .expect("signature");
    let ts: u64 = sig
        .split(',')
        .next()
        .and_then(|t| t.strip_prefix("t="))
        .and_then(|t| t.parse().ok())
        .expect("timestamp");
    let body_text = serde_json::to_string(body).expect("body");
    assert_eq!(
        sig,
        sandwarden::session::webhook::signature(token, ts, body_text.as_bytes())
    );
}

/// A local webhook receiver: fails the first `fail_first` deliveries with 500.
pub(crate) async fn receiver(
    fail_first: usize,
) -> (
    String,
    Arc<Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>>,
) {
    let got: Arc<Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>> = Arc::default();
    let seen = got.clone();
    let calls = Arc::new(Mutex::new(0usize));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| {
                let seen = seen.clone();
                let calls = calls.clone();
                async move {
                    let n = {
                        let mut c = calls.lock().expect("lock");
                        *c += 1;
                        *c
                    };
                    if n <= fail_first {
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    seen.lock().expect("lock").push((headers, body.0));
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    (crate::common::serve_hook(app).await, got)
}

#[tokio::test]
async fn a_webhook_is_signed_delivered_and_retried_after_a_failure() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (url, got) = receiver(1).await;
    let (status, accepted) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "hooked", "async": true, "webhook": {"url": url, "token": "hook-secret", "include_messages": true}})),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");
    let turn_id = accepted["turn_id"].as_str().expect("turn id");
    let mut delivered = None;
    for _ in 0..200 {
        if let Some(d) = got.lock().expect("lock").first().cloned() {
            delivered = Some(d);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (headers, body) = delivered.expect("the webhook arrived");
    assert_eq!(body["turn_id"], turn_id);
    assert_eq!(body["text"], "hooked");
    assert_eq!(body["type"], "turn.completed");
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        headers.get("authorization").and_then(|v| v.to_str().ok()),
        Some("Bearer hook-secret")
    );
    assert_signed(&headers, &body, "hook-secret");
    let (_, turn) = api
        .call("GET", &format!("/v1/sessions/{id}/turns/{turn_id}"), None)
        .await;
    let d = &turn["webhook_deliveries"][0];
    assert_eq!(d["status"], "delivered", "{turn}");
    assert_eq!(d["attempts"], 2, "one failure, then success: {d}");
}

#[tokio::test]
async fn webhooks_to_private_addresses_are_refused_by_default() {
    let serve = Serve::start_strict(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    for url in [
        "http://127.0.0.1:9/x",
        "http://169.254.169.254/latest",
        "ftp://example.com/x",
        "not a url",
    ] {
        let (status, p) = api
            .call(
                "POST",
                &format!("/v1/sessions/{id}/messages"),
                Some(json!({"text": "x", "async": true, "webhook": {"url": url}})),
            )
            .await;
        assert_eq!(
            (status, p["type"].as_str()),
            (422, Some("invalid_webhook")),
            "{url}: {p}"
        );
    }
    let (_, history) = api
        .call("GET", &format!("/v1/sessions/{id}/messages"), None)
        .await;
    assert_eq!(
        history["messages"],
        json!([]),
        "refused messages changed nothing"
    );
}

#[tokio::test]
async fn a_concurrent_turn_gets_409_and_cancel_ends_the_running_one() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let turn_id = api.post_async(&id, json!({"text": "/slow 200 t"})).await;
    let (status, p) = api.say(&id, "me too").await;
    assert_eq!(status, 409, "{p}");
    assert_eq!(p["type"], "turn_in_progress");
    assert_eq!(p["turn_id"], turn_id.as_str());
    let (status, c) = api
        .call("POST", &format!("/v1/sessions/{id}/cancel"), None)
        .await;
    assert_eq!(status, 202, "{c}");
    let turn = api.finished_turn(&id, &turn_id).await;
    assert!(
        turn["status"] == "cancelled" || turn["error"]["code"] == "cancelled",
        "{turn}"
    );
    api.wait_status(&id, "ready").await;
    let (status, _) = api
        .call("POST", &format!("/v1/sessions/{id}/cancel"), None)
        .await;
    assert_eq!(status, 409, "nothing left to cancel");
}

#[tokio::test]
async fn an_approval_round_trips_through_the_api() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let turn_id = api.post_async(&id, json!({"text": "/ask deploy?"})).await;
    let s = api.wait_status(&id, "input_required").await;
    assert_eq!(s["turn_id"], turn_id.as_str());
    let (_, events) = api
        .call("GET", &format!("/v1/sessions/{id}/events"), None)
        .await;
    let asked = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|e| e["type"] == "input_required")
        .expect("input_required")
        .clone();
    let request_id = asked["data"]["request_id"].as_str().expect("request id");
    let (status, p) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/inputs/{request_id}"),
            Some(json!({"decision": "maybe"})),
        )
        .await;
    assert_eq!(status, 422, "{p}");
    let (status, a) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/inputs/{request_id}"),
            Some(json!({"decision": "approve_once"})),
        )
        .await;
    assert_eq!(status, 200, "{a}");
    let turn = api.finished_turn(&id, &turn_id).await;
    assert_eq!(turn["text"], "permission granted (allow-once)", "{turn}");
}

#[tokio::test]
async fn history_and_event_streams_survive_a_restart_of_serve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = Serve::start_in(dir.path(), &[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (status, _) = api.say(&id, "before restart").await;
    assert_eq!(status, 200);
    let (_, before) = api
        .call("GET", &format!("/v1/sessions/{id}/events"), None)
        .await;
    let last = before["next_since"].as_i64().expect("seq");
    serve.stop();

    let serve = Serve::start_in(dir.path(), &[]);
    let api = serve.client();
    let texts = api.history_texts(&id).await;
    assert_eq!(texts, vec!["before restart", "before restart"]);
    // The sandbox was adopted: the session still works.
    let (status, reply) = api.say(&id, "after restart").await;
    assert_eq!(status, 200, "{reply}");
    // Resume the event stream from the last seq seen before the restart: gap-free continuation.
    let resumed = api
        .sse(
            &format!("/v1/sessions/{id}/events"),
            None,
            Some(&last.to_string()),
            3,
        )
        .await;
    let seqs: Vec<i64> = resumed
        .iter()
        .map(|(_, _, e)| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, vec![last + 1, last + 2, last + 3]);
    drop(serve);
    kill_sandboxes_under(dir.path());
}

#[tokio::test]
async fn warm_claims_are_ready_at_once_and_cold_starts_become_ready() {
    let serve = Serve::start(&["--pool", "echo=2"]);
    let api = serve.client();
    // Give the pool a moment to fill (bounded).
    // Wait (bounded) until the pool has filled, by creating sessions until one is ready at once.
    let mut warm_seen = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if api.create("echo").await["status"] == "ready" {
            warm_seen = true;
            break;
        }
    }
    assert!(warm_seen, "the warm pool filled");
    // Let it top up again after that claim (bounded).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let warm = api.create("echo").await;
    assert_eq!(warm["status"], "ready", "{warm}");
    let cold = api.create("echo-cold").await;
    assert_eq!(cold["status"], "creating", "{cold}");
    let id = cold["id"].as_str().expect("id");
    let (_, s) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}?wait=true&timeout=30"),
            None,
        )
        .await;
    assert_eq!(s["status"], "ready", "{s}");
    let (status, reply) = api.say(id, "cold but working").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("cold but working"))
    );
}

#[tokio::test]
async fn per_session_env_and_files_reach_a_warm_sandbox() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let (status, s) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"harness": "echo", "env": {"TOKEN_FOR_AGENT": "t-123", "NEVER_ECHOED": "zq-secret-77"}, "files": [{"path": "w/a.txt", "content": "file!"}], "cwd": "w"})),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().expect("id");
    assert_eq!(api.say(id, "/env TOKEN_FOR_AGENT").await.1["text"], "t-123");
    assert_eq!(api.say(id, "/cat a.txt").await.1["text"], "file!");
    // Secrets are not stored.
    let db = std::fs::read(serve.data.join("sandwarden.db")).expect("db");
    let wal = std::fs::read(serve.data.join("sandwarden.db-wal")).unwrap_or_default();
    let hay = [db, wal].concat();
    // (The agent's own reply is stored, so only check a value it never printed.)
    assert!(
        !hay.windows(12).any(|w| w == b"zq-secret-77"),
        "env values never reach the store"
    );
}

#[tokio::test]
async fn a_killed_sandbox_makes_the_session_dead_with_a_clear_error() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let harnesses = children(serve.pid());
    assert!(!harnesses.is_empty());
    // Kill every sandbox of this server (the warm one and the claimed one).
    for pid in harnesses.iter().copied() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // SIGKILL lands asynchronously: wait (bounded) until the processes are gone.
    for _ in 0..200 {
        if harnesses.iter().all(|pid| !alive(*pid)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, p) = api.say(&id, "are you there?").await;
    // Either the supervisor saw the exit first (409, dead) or this request found the harness
    // unreachable (502, marked dead in the same request).
    assert!(
        (status == 409 && p["type"] == "session_not_usable")
            || (status == 502 && p["type"] == "harness_unreachable"),
        "{status} {p}"
    );
    let s = api.wait_status(&id, "dead").await;
    assert!(
        s["failure_reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{s}"
    );
    let (status, p) = api.say(&id, "again").await;
    assert_eq!(
        (status, p["type"].as_str()),
        (409, Some("session_not_usable")),
        "{p}"
    );
    assert!(p["detail"].as_str().unwrap_or("").contains("dead"));
}

#[tokio::test]
async fn other_tenants_sessions_are_404() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let id = admin.ready("echo").await;
    let (status, k) = admin
        .call("POST", "/v1/api-keys", Some(json!({"tenant": "acme"})))
        .await;
    assert_eq!(status, 201, "{k}");
    let acme = admin.with_key(k["key"].as_str().expect("key"));
    for (method, path) in [
        ("GET", format!("/v1/sessions/{id}")),
        ("DELETE", format!("/v1/sessions/{id}")),
        ("GET", format!("/v1/sessions/{id}/messages")),
        ("GET", format!("/v1/sessions/{id}/events")),
        ("POST", format!("/v1/sessions/{id}/cancel")),
    ] {
        let (status, p) = acme.call(method, &path, None).await;
        assert_eq!(
            (status, p["type"].as_str()),
            (404, Some("session_not_found")),
            "{method} {path}"
        );
    }
    let (status, p) = acme.say(&id, "hi").await;
    assert_eq!(status, 404, "{p}");
    let (_, list) = acme.call("GET", "/v1/sessions", None).await;
    assert_eq!(list["sessions"], json!([]));
    let (status, _) = acme
        .call("POST", "/v1/api-keys", Some(json!({"tenant": "x"})))
        .await;
    assert_eq!(status, 403, "only admins create keys");
    let (status, _) = admin
        .with_key("sk_sw_not_a_key")
        .call("GET", "/v1/sessions", None)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn bad_input_gets_clear_4xx_and_changes_nothing() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let msgs = format!("/v1/sessions/{id}/messages");
    let raw = |path: String, body: &'static str| {
        let http = api.http.clone();
        let url = serve.url(&path);
        async move {
            let resp = http
                .post(url)
                .bearer_auth(ADMIN_KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("sent");
            let status = resp.status().as_u16();
            (
                status,
                resp.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    for (path, body, status, kind) in [
        (msgs.clone(), "{oops", 400, "invalid_json"),
        (msgs.clone(), r#"{"text": 5}"#, 422, "invalid_body"),
        (msgs.clone(), r#"{"text": ""}"#, 422, "invalid_message"),
        (msgs.clone(), r#"{}"#, 422, "invalid_message"),
        (
            msgs.clone(),
            r#"{"text":"x","stream":true,"async":true}"#,
            422,
            "invalid_message",
        ),
        (
            "/v1/sessions".to_string(),
            r#"{"harness":"nope"}"#,
            422,
            "unknown_harness",
        ),
        (
            "/v1/sessions".to_string(),
            r#"{"harness":"echo","id":"bad id!"}"#,
            422,
            "invalid_session",
        ),
        (
            "/v1/sessions".to_string(),
            r#"{"harness":"echo","files":[{"path":"../x","content":"y"}]}"#,
            422,
            "invalid_session",
        ),
        (
            "/v1/sessions".to_string(),
            r#"{"harness":"echo","env":{"SANDWARDEN_TOKEN":"x"}}"#,
            422,
            "invalid_session",
        ),
        (
            "/v1/sessions".to_string(),
            r#"{"harness":"echo","bogus":1}"#,
            422,
            "invalid_body",
        ),
        (
            "/v1/sessions/bad%20id/messages".to_string(),
            r#"{"text":"x"}"#,
            400,
            "invalid_id",
        ),
        (
            "/v1/sessions/nope/messages".to_string(),
            r#"{"text":"x"}"#,
            404,
            "session_not_found",
        ),
    ] {
        let (got, p) = raw(path.clone(), body).await;
        assert_eq!(
            (got, p["type"].as_str()),
            (status, Some(kind)),
            "{path} {body}: {p}"
        );
        assert!(p["detail"].as_str().is_some_and(|d| d.len() > 10), "{p}");
    }
    // Its own connection: the server answers 413 and closes it without reading the rest.
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(17 * 1024 * 1024));
    let resp = reqwest::Client::new()
        .post(serve.url(&msgs))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 413);
    let (status, _) = api.call("GET", "/v1/sessions?limit=0", None).await;
    assert_eq!(status, 400);
    let (status, _) = api.call("GET", "/v1/sessions?cursor=zzz", None).await;
    assert_eq!(status, 400);
    let (_, history) = api.call("GET", &msgs, None).await;
    assert_eq!(history["messages"], json!([]));
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "ready");
}

#[tokio::test]
async fn sessions_list_paginates_and_delete_is_idempotent() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, s) = api
            .call(
                "POST",
                "/v1/sessions",
                Some(json!({"harness": "sh", "title": format!("t{i}")})),
            )
            .await;
        assert_eq!(status, 201, "{s}");
        ids.push(s["id"].as_str().expect("id").to_string());
    }
    // Every page, oldest first and (`order=newest`) newest first.
    let listed = |order: &'static str| {
        let api = &api;
        async move {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!("/v1/sessions?harness=sh&limit=2&order={order}");
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let (status, page) = api.call("GET", &path, None).await;
                assert_eq!(status, 200, "{page}");
                seen.extend(
                    page["sessions"]
                        .as_array()
                        .expect("page")
                        .iter()
                        .filter_map(|s| s["id"].as_str().map(String::from)),
                );
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => return seen,
                }
            }
        }
    };
    assert_eq!(listed("oldest").await, ids);
    let newest: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(listed("newest").await, newest);
    let (status, body) = api.call("GET", "/v1/sessions?order=sideways", None).await;
    assert_eq!(status, 400, "{body}");
    let (status, s) = api
        .call("DELETE", &format!("/v1/sessions/{}", ids[0]), None)
        .await;
    assert_eq!((status, s["status"].as_str()), (200, Some("deleted")));
    let (status, s) = api
        .call("DELETE", &format!("/v1/sessions/{}", ids[0]), None)
        .await;
    assert_eq!(
        (status, s["status"].as_str()),
        (200, Some("deleted")),
        "idempotent"
    );
    // Idempotency-Key: a retry returns the same session.
    let create = |key: &'static str| {
        api.http
            .post(serve.url("/v1/sessions"))
            .bearer_auth(ADMIN_KEY)
            .header("idempotency-key", key)
            .json(&json!({"harness": "echo"}))
            .send()
    };
    let a: serde_json::Value = create("k-1")
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    let b = create("k-1").await.expect("sent");
    assert_eq!(b.status().as_u16(), 200);
    let b: serde_json::Value = b.json().await.expect("json");
    assert_eq!(a["id"], b["id"]);
}

#[tokio::test]
async fn a_terminal_session_attaches_over_websocket() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("sh").await;
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();
    let (status, p) = api.say(&id, "hello").await;
    assert_eq!((status, p["type"].as_str()), (409, Some("tui_session")));
    assert!(p["tty_url"].is_string());
    // Through tty_url's token, without the API key (what a browser does).
    let (mut ws, _) = tokio_tungstenite::connect_async(&tty_url)
        .await
        .expect("attach");
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        b"echo via-$((20+3))\n".to_vec().into(),
    ))
    .await
    .expect("send");
    let mut out = String::new();
    while !out.contains("via-23") {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b)))) => {
                out.push_str(&String::from_utf8_lossy(&b))
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal ended early: {other:?} after {out:?}"),
        }
    }
    // A forged token is refused.
    let forged = tty_url.replace("token=", "token=1.");
    assert!(tokio_tungstenite::connect_async(&forged).await.is_err());
}

/// A viewer that stops reading while the program floods it is let go after `--client-timeout`:
/// serve closes its connection rather than stay blocked on it for as long as it is connected.
#[tokio::test]
async fn a_terminal_viewer_that_stops_reading_is_let_go() {
    let serve = Serve::start(&["--client-timeout", "1"]);
    let api = serve.client();
    let id = api.ready("sh").await;
    let (_, mut ws) = api.attach_tty(&id).await;
    let (client_port, serve_port) = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => (
            tcp.local_addr().expect("local").port(),
            tcp.peer_addr().expect("peer").port(),
        ),
        _ => panic!("a plain TCP connection"),
    };
    let inode = sandwarden::procfs::tcp_inode(serve_port, client_port)
        .expect("serve's end of the connection");
    assert!(
        sandwarden::procfs::holds_socket(serve.pid() as u32, &inode),
        "serve holds the viewer"
    );
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        b"exec yes flood\n".to_vec().into(),
    ))
    .await
    .expect("send");
    // From here on nothing is read. Bounded: 200 polls, 100 ms apart.
    let mut held = true;
    for _ in 0..200 {
        held = sandwarden::procfs::holds_socket(serve.pid() as u32, &inode);
        if !held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !held,
        "serve still holds a viewer that has read nothing for 20 s"
    );
    // Reading again, the viewer finds the output it was sent, then the end.
    let drained = async {
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), drained)
        .await
        .expect("the connection ends once the backlog is read");
}

#[tokio::test]
async fn idle_sessions_are_reaped() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let (status, s) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"harness": "echo", "idle_timeout_s": 1})),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().expect("id");
    let s = api.wait_status(id, "deleted").await;
    assert!(
        s["failure_reason"].as_str().unwrap_or("").contains("idle"),
        "{s}"
    );
}

#[tokio::test]
async fn ops_endpoints() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    api.say(&id, "count me").await;
    let health = reqwest::get(serve.url("/healthz")).await.expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let ready = reqwest::get(serve.url("/readyz")).await.expect("readyz");
    assert_eq!(ready.status().as_u16(), 200);
    let metrics = reqwest::get(serve.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("sandwarden_turns_total{outcome=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sandwarden_claims_total{kind="),
        "{metrics}"
    );
    assert!(
        metrics.contains("sandwarden_turn_duration_seconds"),
        "{metrics}"
    );
    // The message path's step spans, one of each for the one unary message.
    for step in [
        "message",
        "turn.begin",
        "turn.dial",
        "turn.harness",
        "turn.finish",
    ] {
        let count = format!("sandwarden_step_duration_seconds_count{{step=\"{step}\"}} 1\n");
        assert!(metrics.contains(&count), "no {count:?} in {metrics}");
    }
}

#[tokio::test]
async fn a_harness_error_on_a_live_connection_is_502_and_the_session_lives() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (status, p) = api.say(&id, "/fail the model is down").await;
    assert_eq!(
        (status, p["type"].as_str()),
        (502, Some("turn_failed")),
        "{p}"
    );
    assert_eq!(p["error"]["code"], "agent_error");
    assert!(
        p["detail"]
            .as_str()
            .unwrap_or("")
            .contains("the model is down"),
        "{p}"
    );
    assert!(p["turn_id"].is_string());
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "ready", "the session lives on: {s}");
    let (status, reply) = api.say(&id, "still here").await;
    assert_eq!((status, reply["text"].as_str()), (200, Some("still here")));
    let turn_id = p["turn_id"].as_str().expect("turn id");
    let (_, turn) = api
        .call("GET", &format!("/v1/sessions/{id}/turns/{turn_id}"), None)
        .await;
    assert_eq!(turn["status"], "failed", "{turn}");
}

#[tokio::test]
async fn model_thinking_and_agent_options_reach_the_agent_and_unknown_ones_change_nothing() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let path = format!("/v1/sessions/{id}/messages");
    let (status, reply) = api.say(&id, "/config").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["text"], "mode=default model=echo-small thinking=off");
    // Settings are matched by id or name and stay in force for later turns.
    let body = json!({"text": "/config", "model": "echo-large", "thinking": true, "agent": "PLAN"});
    let (status, reply) = api.call("POST", &path, Some(body)).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["text"], "mode=plan model=echo-large thinking=low");
    let (_, reply) = api.say(&id, "/config").await;
    assert_eq!(reply["text"], "mode=plan model=echo-large thinking=low");
    let body = json!({"text": "/config", "thinking": false});
    let (_, reply) = api.call("POST", &path, Some(body)).await;
    assert_eq!(reply["text"], "mode=plan model=echo-large thinking=off");
    let before = api.history_texts(&id).await;

    // A model the agent does not offer is the client's mistake: 422 naming what is offered,
    // and the message leaves no trace in the history.
    let (status, problem) = api
        .call("POST", &path, Some(json!({"text": "hi", "model": "gpt-9"})))
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["type"], "unsupported_option");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("echo-small, echo-large"), "{detail}");
    let (status, problem) = api
        .call("POST", &path, Some(json!({"text": "hi", "model": " "})))
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(api.history_texts(&id).await, before);
    let (_, session) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(session["status"], "ready", "{session}");
    let (status, reply) = api.say(&id, "still here").await;
    assert_eq!((status, reply["text"].as_str()), (200, Some("still here")));
}

/// Waits (bounded) until the receiver has been called `n` times successfully.
async fn received(
    got: &Arc<Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>>,
    n: usize,
) -> Vec<(axum::http::HeaderMap, serde_json::Value)> {
    for _ in 0..400 {
        let seen = got.lock().expect("lock").clone();
        if seen.len() >= n {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the webhook did not arrive");
}

#[tokio::test]
async fn pending_webhooks_resume_after_serve_crashes_without_storing_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = Serve::start_in(dir.path(), &[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let other = api.ready("echo").await;
    // Fails three times: the delivery is mid-retry when serve dies.
    let (url, got) = receiver(3).await;
    let hook = json!({"url": url, "token": "hook-secret-4711"});
    let turn_id = api
        .post_async(&id, json!({"text": "hooked", "webhook": hook}))
        .await;
    // A turn still running when serve dies ends as failed, and its webhook says so.
    let (url2, got2) = receiver(0).await;
    let slow_turn = api
        .post_async(
            &other,
            json!({"text": "/slow 200", "webhook": {"url": url2}}),
        )
        .await;
    let path = format!("/v1/sessions/{id}/turns/{turn_id}");
    for _ in 0..400 {
        let (_, turn) = api.call("GET", &path, None).await;
        if turn["webhook_deliveries"][0]["attempts"].as_i64() >= Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    serve.kill();
    assert!(got.lock().expect("lock").is_empty(), "not delivered yet");
    for file in ["sandwarden.db", "sandwarden.db-wal"] {
        let bytes = std::fs::read(dir.path().join(file)).unwrap_or_default();
        let needle = b"hook-secret-4711";
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "the token is not stored in {file}"
        );
    }

    let serve = Serve::start_in(dir.path(), &[]);
    let api = serve.client();
    let (headers, body) = received(&got, 1).await.remove(0);
    assert_eq!(body["turn_id"], turn_id.as_str());
    assert_eq!(body["text"], "hooked");
    // Signed with the client's token, recovered after the crash.
    assert_signed(&headers, &body, "hook-secret-4711");
    let (_, turn) = api.call("GET", &path, None).await;
    let d = &turn["webhook_deliveries"][0];
    assert_eq!(d["status"], "delivered", "{turn}");
    assert_eq!(d["attempts"], 4, "attempts count across the restart: {d}");

    let (_, body) = received(&got2, 1).await.remove(0);
    assert_eq!(body["turn_id"], slow_turn.as_str());
    assert_eq!(body["type"], "turn.failed", "{body}");
    assert_eq!(body["error"]["code"], "interrupted", "{body}");
    // Its event stream ends with the error, for readers resuming it.
    let (_, events) = api
        .call("GET", &format!("/v1/sessions/{other}/events"), None)
        .await;
    let last = events["events"].as_array().and_then(|e| e.last()).cloned();
    let last = last.unwrap_or_default();
    assert_eq!(
        (last["type"].as_str(), last["turn_id"].as_str()),
        (Some("error"), Some(slow_turn.as_str())),
        "{events}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(got.lock().expect("lock").len(), 1, "delivered once");
    assert_eq!(got2.lock().expect("lock").len(), 1, "delivered once");
    drop(serve);
    kill_sandboxes_under(dir.path());
}

/// Every answer names its request in `X-Request-Id`: a fresh id per request, or the client's own
/// when it sent a usable one (a malformed one is replaced, never echoed).
#[tokio::test]
async fn every_answer_carries_its_request_id() {
    let serve = Serve::start(&[]);
    let http = reqwest::Client::new();
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let mut seen = std::collections::BTreeSet::new();
    for path in ["/healthz", "/v1/sessions", "/v1/nowhere"] {
        let r = http
            .get(serve.url(path))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .expect("request");
        let id = id_of(&r).unwrap_or_else(|| panic!("{path}: no x-request-id"));
        assert!(seen.insert(id), "{path}: an id used twice");
    }
    let r = http
        .get(serve.url("/v1/sessions"))
        .bearer_auth(ADMIN_KEY)
        .header("x-request-id", "client-trace-7f3a")
        .send()
        .await
        .expect("request");
    assert_eq!(id_of(&r).as_deref(), Some("client-trace-7f3a"));
    let r = http
        .get(serve.url("/v1/sessions"))
        .header("x-request-id", "no spaces, please")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 401);
    let id = id_of(&r).expect("an id on a refused request too");
    assert!(id != "no spaces, please" && !id.is_empty(), "{id}");
}

#[tokio::test]
async fn the_probe_listener_serves_the_probes_and_metrics_and_nothing_else() {
    let serve = Serve::start(&["--probe-listen", "127.0.0.1:0"]);
    let probes = serve
        .probes
        .clone()
        .expect("the listen line names the probes' address");
    assert_ne!(probes, serve.base);
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let (http, url) = (http.clone(), format!("{probes}{path}"));
        async move {
            let r = http
                .get(url)
                .bearer_auth(ADMIN_KEY)
                .send()
                .await
                .expect("probe");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok".to_string()));
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(metrics.contains("sandwarden_"), "{metrics}");
    // The API is on --listen only, even with the admin key.
    let (status, body) = get("/v1/sessions").await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = serve.client().call("GET", "/v1/sessions", None).await;
    assert_eq!(status, 200);
}

/// Instructions given at create reach the agent as its system prompt (ACP `systemPrompt`, mode
/// `append`), warm-claimed or cold-started, each session only its own; a terminal session, an
/// oversized text and a NUL are refused with what to fix, creating nothing.
#[tokio::test]
async fn instructions_given_at_create_reach_the_agent_as_its_system_prompt() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let create = |body: serde_json::Value| {
        let api = &api;
        async move { api.call("POST", "/v1/sessions", Some(body)).await }
    };
    let mut sessions = Vec::new();
    for (harness, text) in [
        ("echo", "Answer like a heron: briefly.\nNever delete files."),
        ("echo-cold", "Answer like a pelican, at length."),
    ] {
        let (status, s) = create(json!({"harness": harness, "instructions": text})).await;
        assert_eq!(status, 201, "{s}");
        let id = s["id"].as_str().expect("id").to_string();
        api.wait_status(&id, "ready").await;
        sessions.push((id, format!("system prompt: {text}")));
    }
    sessions.push((api.ready("echo").await, "no system prompt".into()));
    for (id, want) in &sessions {
        let (status, reply) = api.say(id, "/system").await;
        assert_eq!(
            (status, reply["text"].as_str()),
            (200, Some(want.as_str())),
            "{reply}"
        );
    }
    // Never stored: the session's record does not hold them.
    let (_, record) = api
        .call("GET", &format!("/v1/sessions/{}", sessions[0].0), None)
        .await;
    assert!(!record.to_string().contains("heron"), "{record}");

    let (_, before) = api.call("GET", "/v1/sessions", None).await;
    let before = before["sessions"].as_array().map(Vec::len);
    for (body, says) in [
        (
            json!({"harness": "sh", "instructions": "be brief"}),
            "terminal program",
        ),
        (
            json!({"harness": "echo", "instructions": "x".repeat(32 * 1024 + 1)}),
            "at most 32 KiB",
        ),
        (
            json!({"harness": "echo", "instructions": "a\u{0}b"}),
            "control character",
        ),
        (
            json!({"harness": "echo", "instructions": "a\u{7f}b"}),
            "control character",
        ),
    ] {
        let (status, p) = create(body).await;
        assert_eq!(status, 422, "{p}");
        assert!(p["detail"].as_str().unwrap_or("").contains(says), "{p}");
    }
    let (_, after) = api.call("GET", "/v1/sessions", None).await;
    assert_eq!(
        after["sessions"].as_array().map(Vec::len),
        before,
        "nothing was created"
    );
}

/// MCP servers given at create reach the agent's ACP session (`session/new`'s `mcpServers`),
/// warm-claimed or cold-started, each session only its own; a transport the agent did not
/// offer, a terminal session, and malformed servers are refused with what to fix, creating
/// nothing.
#[tokio::test]
async fn mcp_servers_given_at_create_reach_the_agents_session() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let create = |body: serde_json::Value| {
        let api = &api;
        async move { api.call("POST", "/v1/sessions", Some(body)).await }
    };
    let (status, warm) = create(json!({"harness": "echo", "mcp_servers": [
        {"name": "repo-tools", "command": "/usr/bin/true", "args": ["--root", "."]},
        {"name": "docs", "type": "http", "url": "http://127.0.0.1:9/mcp"},
    ]}))
    .await;
    assert_eq!(status, 201, "{warm}");
    let warm = warm["id"].as_str().expect("id").to_string();
    let (status, cold) = create(json!({"harness": "echo-cold", "mcp_servers": [
        {"name": "only-cold", "type": "stdio", "command": "mcp-cold", "env": {"A": "1", "B": "2"}},
    ]}))
    .await;
    assert_eq!(status, 201, "{cold}");
    let cold = cold["id"].as_str().expect("id").to_string();
    api.wait_status(&cold, "ready").await;
    let plain = api.ready("echo").await;
    for (id, want) in [
        (
            &warm,
            "mcp: repo-tools stdio /usr/bin/true args=2 env=0; docs http http://127.0.0.1:9/mcp headers=0",
        ),
        (&cold, "mcp: only-cold stdio mcp-cold args=0 env=2"),
        (&plain, "mcp: none"),
    ] {
        let (status, reply) = api.say(id, "/mcp").await;
        assert_eq!(
            (status, reply["text"].as_str()),
            (200, Some(want)),
            "{reply}"
        );
    }

    let (_, before) = api.call("GET", "/v1/sessions", None).await;
    let before = before["sessions"].as_array().map(Vec::len);
    let many: Vec<serde_json::Value> = (0..21)
        .map(|i| json!({"name": format!("s{i}"), "command": "x"}))
        .collect();
    for (body, says) in [
        (
            json!({"harness": "sh", "mcp_servers": [{"name": "t", "command": "x"}]}),
            "terminal program",
        ),
        (
            json!({"harness": "echo", "mcp_servers": [{"name": "a", "command": "x"}, {"name": "a", "command": "y"}]}),
            "given twice",
        ),
        (
            json!({"harness": "echo", "mcp_servers": [{"name": "a"}]}),
            "needs `command`",
        ),
        (
            json!({"harness": "echo", "mcp_servers": [{"name": "a", "type": "http", "url": "ftp://x"}]}),
            "http:// or https://",
        ),
        (
            json!({"harness": "echo", "mcp_servers": [{"name": "a", "type": "http", "url": "http://x", "command": "y"}]}),
            "are for stdio servers",
        ),
        (
            json!({"harness": "echo", "mcp_servers": many}),
            "at most 20",
        ),
        (
            json!({"harness": "echo", "mcp_servers": [{"name": "a", "command": "x", "cwd": "/"}]}),
            "cwd",
        ),
    ] {
        let (status, p) = create(body.clone()).await;
        assert_eq!(status, 422, "{body}: {p}");
        assert!(
            p["detail"].as_str().unwrap_or("").contains(says),
            "{body}: {p}"
        );
    }
    let (_, after) = api.call("GET", "/v1/sessions", None).await;
    assert_eq!(
        after["sessions"].as_array().map(Vec::len),
        before,
        "nothing was created"
    );

    // A transport the agent did not offer in `initialize` (the echo agent takes http, not sse):
    // refused at once when a warm sandbox's agent is there to ask, else the cold-started
    // session fails with the same reason.
    let (status, s) = create(json!({"harness": "echo", "mcp_servers": [
        {"name": "feed", "type": "sse", "url": "http://127.0.0.1:9/sse"},
    ]}))
    .await;
    let reason = match status {
        422 => s["detail"].as_str().unwrap_or("").to_string(),
        201 => {
            let id = s["id"].as_str().expect("id");
            let failed = api.wait_status(id, "failed").await;
            failed["failure_reason"].as_str().unwrap_or("").to_string()
        }
        _ => panic!("{s}"),
    };
    assert!(
        reason.contains("does not take sse"),
        "{status}: {s} / {reason}"
    );
    // A template with no pool always starts cold: the session fails, saying why.
    let (status, s) = create(json!({"harness": "echo-cold", "mcp_servers": [
        {"name": "feed", "type": "sse", "url": "http://127.0.0.1:9/sse"},
    ]}))
    .await;
    assert_eq!(status, 201, "{s}");
    let failed = api
        .wait_status(s["id"].as_str().expect("id"), "failed")
        .await;
    assert!(
        failed["failure_reason"]
            .as_str()
            .unwrap_or("")
            .contains("does not take sse"),
        "{failed}"
    );
}

/// Reads SSE `(event, data)` pairs from a response until `until` says stop (20 s at most).
async fn read_sse(
    resp: reqwest::Response,
    mut until: impl FnMut(&str, &serde_json::Value) -> bool,
) -> Vec<(String, serde_json::Value)> {
    use eventsource_stream::Eventsource;
    let mut events = resp.bytes_stream().eventsource();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while let Ok(Some(Ok(e))) = tokio::time::timeout_at(deadline, events.next()).await {
        let data: serde_json::Value = serde_json::from_str(&e.data).unwrap_or_default();
        let stop = until(&e.event, &data);
        seen.push((e.event, data));
        if stop {
            break;
        }
    }
    seen
}

/// Reads SSE `(event, data)` pairs until the server ends the stream (true) or 30 s pass (false).
async fn read_to_end(resp: reqwest::Response) -> (Vec<(String, serde_json::Value)>, bool) {
    use eventsource_stream::Eventsource;
    let mut events = resp.bytes_stream().eventsource();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Ok(Some(Ok(e))) => {
                let data = serde_json::from_str(&e.data).unwrap_or_default();
                seen.push((e.event, data));
            }
            Ok(_) => return (seen, true),
            Err(_) => return (seen, false),
        }
    }
}

/// `GET /v1/events` follows a tenant's sessions as they change, and only that tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_watch_follows_the_tenants_sessions_only() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let (other, _) = api.tenant_key("watch-other").await;
    let watch = reqwest::Client::new()
        .get(serve.url("/v1/events"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("watch");
    assert_eq!(watch.status(), 200);
    assert!(
        watch.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/event-stream")
    );
    // Changes the watcher must not see: another tenant's session.
    let theirs = other.ready("echo").await;
    let mine = api.ready("echo").await;
    let (status, _) = api.say(&mine, "watched words").await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call("DELETE", &format!("/v1/sessions/{mine}"), None)
        .await;
    assert_eq!(status, 200);
    let seen = read_sse(watch, |kind, data| {
        kind == "session" && data["status"] == "deleted"
    })
    .await;
    assert_eq!(seen[0].0, "watching", "{seen:?}");
    let statuses: Vec<&str> = seen
        .iter()
        .filter(|(kind, _)| kind == "session")
        .map(|(_, s)| {
            assert_eq!(s["id"], mine, "only the tenant's own sessions: {s}");
            assert_ne!(s["id"], theirs);
            s["status"].as_str().unwrap_or("")
        })
        .collect();
    for wanted in ["running", "deleted"] {
        assert!(statuses.contains(&wanted), "{wanted} not in {statuses:?}");
    }
}

/// `GET /v1/sessions/{id}/options` says what a message may choose and what the agent offers;
/// a choice made by a message shows as current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_agent_options_are_listed() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (status, listed) = api
        .call("GET", &format!("/v1/sessions/{id}/options"), None)
        .await;
    assert_eq!(status, 200, "{listed}");
    let current = |listed: &serde_json::Value, field: &str| {
        listed["options"]
            .as_array()
            .expect("options")
            .iter()
            .find(|o| o["id"] == field)
            .map(|o| o["current"].clone())
            .unwrap_or_default()
    };
    assert_eq!(current(&listed, "model"), "echo-small");
    assert_eq!(current(&listed, "agent"), "default");
    let models: Vec<&str> = listed["options"][0]["values"]
        .as_array()
        .expect("values")
        .iter()
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert_eq!(models, ["echo-small", "echo-large"]);
    let (status, reply) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "bigger please", "model": "echo-large", "agent": "plan"})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let (_, listed) = api
        .call("GET", &format!("/v1/sessions/{id}/options"), None)
        .await;
    assert_eq!(current(&listed, "model"), "echo-large");
    assert_eq!(current(&listed, "agent"), "plan");

    // A terminal session has none; another tenant's session is not found.
    let sh = api.ready("sh").await;
    let (status, body) = api
        .call("GET", &format!("/v1/sessions/{sh}/options"), None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["type"], "tui_session");
    let (other, _) = api.tenant_key("options-other").await;
    let (status, _) = other
        .call("GET", &format!("/v1/sessions/{id}/options"), None)
        .await;
    assert_eq!(status, 404);
}

/// `?tail=true` starts a session's event stream after its newest event: no replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_can_start_at_the_tail() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (status, _) = api.say(&id, "before the tail").await;
    assert_eq!(status, 200);
    let stream = reqwest::Client::new()
        .get(serve.url(&format!("/v1/sessions/{id}/events?stream=true&tail=true")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("events");
    assert_eq!(stream.status(), 200);
    let (status, _) = api.say(&id, "after the tail").await;
    assert_eq!(status, 200);
    let seen = read_sse(stream, |kind, _| kind == "done").await;
    let texts: String = seen
        .iter()
        .filter(|(kind, _)| kind == "text")
        .filter_map(|(_, e)| e["data"]["text"].as_str())
        .collect();
    assert_eq!(texts, "after the tail");
}

/// `?newest=true` pages the history from its newest end back: each page in order, the pages
/// together the whole history, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_pages_back_from_the_newest() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    for i in 0..7 {
        let (status, _) = api.say(&id, &format!("history line {i}")).await;
        assert_eq!(status, 200);
    }
    let texts = role_texts;
    let (status, forward) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}/messages?limit=500"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let all = texts(&forward);
    assert_eq!(all.len(), 14);
    let mut pages = Vec::new();
    let mut path = format!("/v1/sessions/{id}/messages?newest=true&limit=4");
    loop {
        let (status, page) = api.call("GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        pages.push(texts(&page));
        match page["next_cursor"].as_str() {
            Some(c) => {
                assert_eq!(page["has_more"], true);
                path = format!("/v1/sessions/{id}/messages?limit=4&cursor={c}");
            }
            None => break,
        }
    }
    assert_eq!(
        pages[0],
        all[10..].to_vec(),
        "the newest page first, in order"
    );
    let joined: Vec<String> = pages.iter().rev().flatten().cloned().collect();
    assert_eq!(joined, all);
    let (status, body) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}/messages?cursor=bm9wZXxub3Bl"),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

/// A revoked key's long-lived streams end: the sessions watch and a session's event stream. And
/// the watch never hands out a terminal's token (its `tty_url`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_keys_streams_end() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (own, k1) = admin.tenant_key("revoked-watch").await;
    let (other, _) = admin.tenant_key("revoked-watch").await;
    let key1 = k1["key"].as_str().expect("key").to_string();
    let echo = own.ready("echo").await;
    let open = |path: String| {
        let key = key1.clone();
        let url = serve.url(&path);
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(key)
                .header("accept", "text/event-stream")
                .send()
                .await
                .expect("stream")
        }
    };
    let watch = open("/v1/events".into()).await;
    let events = open(format!("/v1/sessions/{echo}/events?tail=true")).await;
    assert_eq!(
        (watch.status().as_u16(), events.status().as_u16()),
        (200, 200)
    );
    // A terminal session of the tenant shows on the watch without its token.
    let sh = other.ready("sh").await;
    let watched = tokio::spawn(read_to_end(watch));
    let followed = tokio::spawn(read_to_end(events));
    other.wait_status(&sh, "ready").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = admin
        .call(
            "DELETE",
            &format!("/v1/api-keys/{}", k1["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (watched, watch_ended) = watched.await.expect("watch reader");
    let (followed, events_ended) = followed.await.expect("events reader");
    assert!(
        watch_ended,
        "the watch ended when its key was revoked: {watched:?}"
    );
    assert!(
        events_ended,
        "the event stream ended when its key was revoked"
    );
    let terminal: Vec<&serde_json::Value> = watched
        .iter()
        .filter(|(kind, s)| kind == "session" && s["id"] == sh)
        .map(|(_, s)| s)
        .collect();
    assert!(!terminal.is_empty(), "{watched:?}");
    assert!(
        terminal.iter().all(|s| s["tty_url"].is_null()),
        "{terminal:?}"
    );
    assert!(
        followed.iter().all(|(kind, _)| kind != "error"),
        "{followed:?}"
    );
}

/// A terminal opened with a key is let go (1008) when the key is revoked; one opened with its
/// session's `tty_url` token is not the key's and lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_keys_terminal_is_let_go() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (tenant, k) = admin.tenant_key("revoked-tty").await;
    let key = k["key"].as_str().expect("key").to_string();
    let sh = tenant.ready("sh").await;
    let mut req = serve
        .url(&format!("/v1/sessions/{sh}/tty"))
        .replacen("http", "ws", 1)
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("header"),
    );
    let (mut keyed, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("attach with the key");
    let (_, mut by_token) = tenant.attach_tty(&sh).await;
    let (status, _) = admin
        .call(
            "DELETE",
            &format!("/v1/api-keys/{}", k["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(msg) = keyed.next().await {
            match msg {
                Ok(Message::Close(frame)) => {
                    return frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the keyed terminal is let go");
    assert_eq!(closed, Some((1008, "the API key was revoked".to_string())));
    // The token's terminal still works.
    by_token
        .send(Message::Binary(b"echo still-$((40+2))\n".to_vec().into()))
        .await
        .expect("type");
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        let mut seen = String::new();
        while let Some(Ok(msg)) = by_token.next().await {
            if let Message::Binary(b) = msg {
                seen.push_str(&String::from_utf8_lossy(&b));
                if seen.contains("still-42") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(seen, "the token's terminal lives on");
}

/// The admin key reads a tenant's history and events with `?tenant=`; a tenant's key may name
/// only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_reads_a_tenants_history_and_events() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (tenant, _) = admin.tenant_key("read-by-admin").await;
    let id = tenant.ready("echo").await;
    let (status, _) = tenant.say(&id, "for the admin to read").await;
    assert_eq!(status, 200);
    let (status, page) = admin
        .call("GET", &format!("/v1/sessions/{id}/messages"), None)
        .await;
    assert_eq!(
        status, 404,
        "without ?tenant= it is not the admin's: {page}"
    );
    let (status, page) = admin
        .call(
            "GET",
            &format!("/v1/sessions/{id}/messages?tenant=read-by-admin&newest=true"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        role_texts(&page),
        [
            "user: for the admin to read",
            "assistant: for the admin to read"
        ]
    );
    let (status, events) = admin
        .call(
            "GET",
            &format!("/v1/sessions/{id}/events?tenant=read-by-admin"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{events}");
    assert!(
        events["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["type"] == "done"))
    );
    let (status, _) = tenant
        .call(
            "GET",
            &format!("/v1/sessions/{id}/messages?tenant=default"),
            None,
        )
        .await;
    assert_eq!(status, 403);
}
