//! The seed platforms' own clients, unchanged, against their mounts: the `motus serve` CLI of
//! `lithosai-motus`, `everruns-sdk`'s `AgentClient` and the `stewrd` client, pinned in
//! target/seed-venv (scripts/install-sdks). Only the base URL and the key are theirs to set.

use crate::common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The virtualenv holding the seed clients, or `None` (skipped unless they are required).
fn seed_venv() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/seed-venv");
    if venv.join("bin/python").exists() {
        return Some(venv);
    }
    assert!(
        std::env::var_os("SANDWARDEN_REQUIRE_SEED_CLIENTS").is_none(),
        "the seed clients are required but target/seed-venv is missing: run scripts/install-sdks"
    );
    eprintln!("SKIPPED: the seed clients are not installed (run scripts/install-sdks)");
    None
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/seed")
        .join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everruns_agent_client_runs_unchanged() {
    let Some(venv) = seed_venv() else { return };
    let serve = Serve::start(&[]);
    let out = crate::vendor_sdks::run_script(
        &serve,
        &venv.join("bin/python"),
        &script("everruns_agent.py"),
        "seed-everruns",
    )
    .await;
    assert!(out.contains("everruns: ok"), "{out}");
    // Another tenant finds none of it.
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .expect("the client names its session");
    let other = crate::tenancy::tenant_client(&serve.client(), "seed-other").await;
    let (status, _) = other
        .call(
            "GET",
            &format!("/compat/everruns/echo/sessions/{id}/events"),
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stewrd_client_runs_one_shot_turns_each_in_a_sandbox_of_its_own() {
    let Some(venv) = seed_venv() else { return };
    let serve = Serve::start(&[]);
    let out = crate::vendor_sdks::run_script(
        &serve,
        &venv.join("bin/python"),
        &script("stewrd_agent.py"),
        "seed-stewrd",
    )
    .await;
    assert!(out.contains("stewrd: ok"), "{out}");
    // Every request's session is deleted once it is answered.
    let live = live_sessions(&serve.client(), "seed-stewrd", 0).await;
    assert!(live.is_empty(), "one-shot sessions left: {live:?}");
}

/// Runs `motus serve ARGS…` with the tenant's key; its exit status and output.
async fn motus(venv: &Path, key: &str, home: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(venv.join("bin/motus"))
        .arg("serve")
        .args(args)
        .env("LITHOSAI_API_KEY", key)
        .env("HOME", home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run motus");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).await.expect("stdin");
    drop(input);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("motus finished within 60 s")
        .expect("motus ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn json_of(out: &str) -> Value {
    let start = out.find(['{', '[']).unwrap_or(0);
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The requests `serve` has answered so far (its `/metrics`).
async fn requests_answered(serve: &Serve) -> u64 {
    let text = reqwest::get(serve.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with("sandwarden_http_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn motus_cli_runs_unchanged_and_polls_a_bounded_number_of_times() {
    let Some(venv) = seed_venv() else { return };
    let serve = Serve::start(&[]);
    let api = serve.client();
    let (_, key) = api
        .call(
            "POST",
            "/v1/api-keys",
            Some(json!({"tenant": "seed-motus"})),
        )
        .await;
    let key = key["key"].as_str().expect("key").to_string();
    let home = tempfile::tempdir().expect("home");
    let url = format!("{}/compat/motus/echo", serve.base);
    let run = |args: Vec<String>, stdin: &'static str| {
        let (venv, key, home) = (venv.clone(), key.clone(), home.path().to_path_buf());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            motus(&venv, &key, &home, &args, stdin).await
        }
    };
    let v = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();

    let (ok, out) = run(v(&["health", &url]), "").await;
    assert!(ok && out.contains("Status: ok"), "{out}");
    let (ok, out) = run(v(&["create", &url]), "").await;
    assert!(ok, "{out}");
    let created = json_of(&out);
    assert_eq!(created["status"], "idle", "{out}");
    let id = created["session_id"].as_str().expect("id").to_string();

    let nonce = || uuid::Uuid::new_v4().simple().to_string();
    let (first, second) = (format!("first {}", nonce()), format!("second {}", nonce()));
    let (ok, out) = run(v(&["send", &url, &id, &first, "--wait"]), "").await;
    assert!(ok, "{out}");
    let got = json_of(&out);
    assert_eq!(got["status"], "idle", "{out}");
    assert_eq!(got["response"]["content"], first.as_str(), "{out}");
    let (ok, out) = run(v(&["send", &url, &id, &second]), "").await;
    assert!(ok && json_of(&out)["status"] == "running", "{out}");
    let (ok, out) = run(v(&["get", &url, &id, "--wait", "--timeout", "20"]), "").await;
    assert!(ok, "{out}");
    assert_eq!(
        json_of(&out)["response"]["content"],
        second.as_str(),
        "{out}"
    );

    let (ok, out) = run(v(&["messages", &url, &id]), "").await;
    assert!(ok, "{out}");
    let said: Vec<(String, String)> = json_of(&out)
        .as_array()
        .expect("a bare list")
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default().to_string(),
                m["content"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("user", &first),
        ("assistant", &first),
        ("user", &second),
        ("assistant", &second),
    ]
    .iter()
    .map(|(r, t)| (r.to_string(), t.to_string()))
    .collect();
    assert_eq!(said, want);
    let (ok, out) = run(v(&["sessions", &url]), "").await;
    assert!(ok, "{out}");
    let listed = json_of(&out);
    assert_eq!(listed[0]["session_id"], id.as_str(), "{out}");
    assert_eq!(listed[0]["total_messages"], 4, "{out}");

    // The chat loop's approvals, answered at its prompt.
    for (answer, verdict) in [("y\n", "permission granted"), ("n\n", "permission denied")] {
        let asked = format!("/ask may I {}", nonce());
        let (ok, out) = run(v(&["chat", &url, &asked, "--session", &id]), answer).await;
        let question = asked.trim_start_matches("/ask ");
        assert!(
            ok && out.contains(question) && out.contains(verdict),
            "{out}"
        );
    }
    let (_, out) = run(
        v(&["chat", &url, "/fail motus broke", "--session", &id]),
        "",
    )
    .await;
    assert!(
        out.contains("Error:") && out.contains("motus broke"),
        "{out}"
    );

    // A turn of about two seconds costs the chat loop a bounded number of requests: its
    // long-poll waits for the turn rather than being answered at once.
    let before = requests_answered(&serve).await;
    let (ok, out) = run(v(&["chat", &url, "/slow 20 tick", "--session", &id]), "").await;
    let used = requests_answered(&serve).await - before - 1;
    assert!(ok && out.contains("tick 19"), "{out}");
    eprintln!("motus chat: {used} requests for one two-second turn");
    assert!(used <= 4, "the chat loop sent {used} requests for one turn");

    // Ids the client picks are UUIDs; another tenant finds nothing.
    let picked = uuid::Uuid::new_v4().to_string();
    let motus_api = api.with_key(&key);
    let (status, body) = motus_api
        .call(
            "PUT",
            &format!("/compat/motus/echo/sessions/{picked}"),
            None,
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["session_id"], picked.as_str());
    let (status, _) = motus_api
        .call(
            "PUT",
            &format!("/compat/motus/echo/sessions/{picked}"),
            None,
        )
        .await;
    assert_eq!(status, 409);
    let (status, body) = motus_api
        .call("PUT", "/compat/motus/echo/sessions/not-a-uuid", None)
        .await;
    assert_eq!(status, 400, "{body}");
    let other = crate::tenancy::tenant_client(&api, "seed-motus-other").await;
    let (status, _) = other
        .call("GET", &format!("/compat/motus/echo/sessions/{id}"), None)
        .await;
    assert_eq!(status, 404);
    // A session of another template is not under this mount.
    let (status, _) = motus_api
        .call("GET", &format!("/compat/motus/shell/sessions/{id}"), None)
        .await;
    assert_eq!(status, 404);

    // A message's webhook comes in Motus' payload shape, with its token, and Motus' own model
    // reads it.
    let (hook, got) = crate::serve_api::receiver(0).await;
    let hooked = format!("hooked {}", nonce());
    let (ok, out) = run(
        v(&[
            "send",
            &url,
            &id,
            &hooked,
            "--webhook-url",
            &hook,
            "--webhook-token",
            "motus-tok",
            "--webhook-include-messages",
            "--wait",
        ]),
        "",
    )
    .await;
    assert!(ok, "{out}");
    let mut delivered = None;
    for _ in 0..100 {
        if let Some(d) = got.lock().expect("lock").first().cloned() {
            delivered = Some(d);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (headers, payload) = delivered.expect("the webhook was delivered");
    assert_eq!(headers["authorization"], "Bearer motus-tok");
    assert_eq!(payload["session_id"], id.as_str(), "{payload}");
    assert_eq!(payload["status"], "idle", "{payload}");
    assert_eq!(payload["response"]["content"], hooked.as_str(), "{payload}");
    let check = tokio::process::Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import json, sys; from motus.serve.schemas import WebhookPayload; \
             p = WebhookPayload.model_validate(json.loads(sys.argv[1])); \
             print(p.status, p.response.content, len(p.messages))",
            &payload.to_string(),
        ])
        .output()
        .await
        .expect("python");
    let read = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && read.contains(&hooked),
        "Motus' WebhookPayload: {read}{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let (ok, out) = run(v(&["delete", &url, &id]), "").await;
    assert!(ok, "{out}");
    let (ok, out) = run(v(&["get", &url, &id]), "").await;
    assert!(!ok && out.contains("404"), "{out}");
}

/// Reads SSE `data:` frames from `resp` until `until` holds for one (or 20 s pass).
async fn sse_frames(resp: reqwest::Response, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let (mut buf, mut frames) = (String::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(deadline, body.next()).await {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(data) = line.strip_prefix("data: ")
                    && let Ok(v) = serde_json::from_str::<Value>(data)
                {
                    let stop = until(&v);
                    frames.push(v);
                    if stop {
                        return frames;
                    }
                }
            }
        }
    }
    frames
}

/// The LiteLLM Agent Platform publishes no client: its CLI's (`lap.mjs`) and SDK's calls,
/// replayed as they make them, against `/api/v1/managed_agents`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lap_clients_calls_replayed_against_its_mount() {
    let serve = Serve::start(&[]);
    let api = crate::tenancy::tenant_client(&serve.client(), "seed-lap").await;
    let base = "/api/v1/managed_agents";
    let nonce = || uuid::Uuid::new_v4().simple().to_string();

    // lap.mjs resolves an agent by name from the list, then creates a session of it.
    let (status, agents) = api.call("GET", &format!("{base}/agents"), None).await;
    assert_eq!(status, 200, "{agents}");
    let echo = agents["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|a| a["name"] == "echo")
        .expect("echo is an agent")
        .clone();
    assert_eq!(echo["supports_tui"], false);
    let (status, created) = api
        .call(
            "POST",
            &format!("{base}/agents/{}/session", echo["id"].as_str().expect("id")),
            Some(json!({"title": "lap-cli"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "a UUID: {id}");
    // It polls the session until `ready`.
    let mut session = created.clone();
    for _ in 0..60 {
        if session["status"] == "ready" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        session = api
            .call("GET", &format!("{base}/sessions/{id}"), None)
            .await
            .1;
    }
    assert_eq!(session["status"], "ready", "{session}");

    // The REPL's message: a synchronous turn whose `parts` hold the reply.
    let said = format!("lap {}", nonce());
    let (status, reply) = api
        .call(
            "POST",
            &format!("{base}/sessions/{id}/message"),
            Some(json!({ "text": said })),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    let text: Vec<&str> = reply["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert_eq!(text.concat(), said);
    let (status, _) = api
        .call(
            "POST",
            &format!("{base}/sessions/{id}/message"),
            Some(json!({ "parts": [{"type": "text", "text": "parts form"}] })),
        )
        .await;
    assert_eq!(status, 200);

    // message_stream: ready, the turn's events, done.
    let streamed = format!("streamed {}", nonce());
    let resp = api
        .http
        .post(format!("{}{base}/sessions/{id}/message_stream", api.base))
        .bearer_auth(&api.key)
        .json(&json!({ "text": streamed }))
        .send()
        .await
        .expect("message_stream");
    assert_eq!(resp.status(), 200);
    let frames = sse_frames(resp, |f| f["type"] == "done" || f["type"] == "error").await;
    let kinds: Vec<&Value> = frames.iter().map(|f| &f["type"]).collect();
    assert_eq!(kinds[0], "ready", "{kinds:?}");
    assert_eq!(kinds.last().copied(), Some(&json!("done")), "{kinds:?}");
    let streamed_text: String = frames
        .iter()
        .filter(|f| f["event"]["type"] == "text")
        .filter_map(|f| f["event"]["data"]["text"].as_str())
        .collect();
    assert_eq!(streamed_text, streamed);

    // The events tail follows what happens next; abort ends a running turn, and is idempotent.
    let tail = api
        .http
        .get(format!("{}{base}/sessions/{id}/events", api.base))
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("events");
    assert_eq!(tail.status(), 200);
    let running = api
        .http
        .post(format!("{}{base}/sessions/{id}/message_stream", api.base))
        .bearer_auth(&api.key)
        .json(&json!({ "text": "/slow 100 tick" }))
        .send()
        .await
        .expect("message_stream");
    assert_eq!(running.status(), 200);
    let (status, aborted) = api
        .call("POST", &format!("{base}/sessions/{id}/abort"), None)
        .await;
    assert_eq!(status, 200, "{aborted}");
    let frames = sse_frames(tail, |f| f["event"]["type"] == "done").await;
    let last = frames.last().map(|f| f["event"]["data"].clone());
    assert_eq!(
        last.as_ref().map(|d| &d["stop_reason"]),
        Some(&json!("cancelled")),
        "the tail saw the aborted turn end ({} frames, the last: {last:?})",
        frames.len()
    );
    let frames = sse_frames(running, |f| f["type"] == "done").await;
    assert_eq!(frames.last().map(|f| &f["type"]), Some(&json!("done")));
    let (status, again) = api
        .call("POST", &format!("{base}/sessions/{id}/abort"), None)
        .await;
    assert_eq!((status, &again["aborted"]), (200, &json!(false)), "{again}");
    let (status, thread) = api
        .call("GET", &format!("{base}/sessions/{id}/messages"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(thread["messages"][1]["text"], said.as_str(), "{thread}");

    // Another tenant, or an id that is no UUID, finds nothing.
    let other = crate::tenancy::tenant_client(&serve.client(), "seed-lap-other").await;
    assert_eq!(
        other
            .call("GET", &format!("{base}/sessions/{id}"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        api.call("GET", &format!("{base}/sessions/not-a-uuid"), None)
            .await
            .0,
        404
    );

    // A live session is not restarted; a deleted (dead) one is, under the same id, and its new
    // sandbox is told the conversation.
    assert_eq!(
        api.call("POST", &format!("{base}/sessions/{id}/restart"), None)
            .await
            .0,
        409
    );
    let (status, deleted) = api
        .call("DELETE", &format!("{base}/sessions/{id}"), None)
        .await;
    assert_eq!(
        (status, &deleted),
        (200, &json!({"id": id, "status": "deleted"}))
    );
    let (status, again) = api
        .call("DELETE", &format!("{base}/sessions/{id}"), None)
        .await;
    assert_eq!(status, 200, "idempotent: {again}");
    let (_, dead) = api
        .call("GET", &format!("{base}/sessions/{id}"), None)
        .await;
    assert_eq!(dead["status"], "dead");
    let (status, restarted) = api
        .call("POST", &format!("{base}/sessions/{id}/restart"), None)
        .await;
    assert_eq!(status, 200, "{restarted}");
    assert_eq!(restarted["id"], id.as_str());
    assert_ne!(restarted["harness_session_id"], dead["harness_session_id"]);
    let mut session = restarted;
    for _ in 0..100 {
        if session["status"] == "ready" && session["response"].is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        session = api
            .call("GET", &format!("{base}/sessions/{id}"), None)
            .await
            .1;
    }
    let replayed = session["response"].as_str().unwrap_or_default();
    assert!(
        replayed.contains("restarted") && replayed.contains(&said),
        "the new sandbox's first turn holds the conversation: {session}"
    );
    let (_, listed) = api
        .call("GET", &format!("{base}/sessions?agent_id=echo"), None)
        .await;
    assert_eq!(listed["data"][0]["id"], id.as_str(), "{listed}");

    // A terminal agent: its session's tty_url takes the terminal protocol lap.mjs speaks.
    let (status, tui) = api
        .call(
            "POST",
            &format!("{base}/agents/shell/session"),
            Some(json!({"title": "lap-cli"})),
        )
        .await;
    assert_eq!(status, 201, "{tui}");
    let tui_id = tui["id"].as_str().expect("id").to_string();
    let mut tui = tui;
    for _ in 0..100 {
        if tui["status"] == "ready" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        tui = api
            .call("GET", &format!("{base}/sessions/{tui_id}"), None)
            .await
            .1;
    }
    assert_eq!(tui["supports_tui"], true, "{tui}");
    let mut shell = shell::Shell::attach(tui["tty_url"].as_str().expect("tty_url")).await;
    let word = nonce();
    let (out, rc) = shell.run(&format!("echo {word}")).await;
    assert_eq!(rc, 0);
    assert!(out.contains(&word), "{out}");
}

/// POSTs `body` to `path` and reads its SSE frames (`event:` name and `data`) until `done` or
/// `error`.
async fn karta_stream(api: &Api, path: &str, body: Value) -> Vec<(String, Value)> {
    use futures::StreamExt;
    let resp = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.key)
        .json(&body)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let (mut buf, mut frames) = (String::new(), Vec::new());
    while let Ok(Some(Ok(chunk))) =
        tokio::time::timeout(std::time::Duration::from_secs(20), body.next()).await
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let name = block.lines().find_map(|l| l.strip_prefix("event: "));
            let data = block.lines().find_map(|l| l.strip_prefix("data: "));
            if let (Some(name), Some(data)) = (name, data) {
                let v: Value = serde_json::from_str(data).expect("JSON data");
                let end = name == "done" || name == "error";
                frames.push((name.to_string(), v));
                if end {
                    return frames;
                }
            }
        }
    }
    frames
}

/// Karta publishes no client: the calls its runtime's consumer API documents, replayed on the
/// native routes and under a project.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn karta_calls_replayed_on_the_native_and_project_routes() {
    let serve = Serve::start(&["--default-template", "echo"]);
    let api = crate::tenancy::tenant_client(&serve.client(), "seed-karta").await;
    let nonce = || uuid::Uuid::new_v4().simple().to_string();

    // A session without a harness takes the default template; `session_id` resumes it.
    let (status, s) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"metadata": {"user": "u1"}})),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    assert_eq!(s["harness"], "echo");
    let id = s["id"].as_str().expect("id").to_string();
    let (status, resumed) = api
        .call("POST", "/v1/sessions", Some(json!({"session_id": id})))
        .await;
    assert_eq!((status, &resumed["id"]), (200, &json!(id)), "{resumed}");
    let (status, _) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"session_id": "ses_unknown"})),
        )
        .await;
    assert_eq!(status, 404);

    // The unary reply names its agent; Karta's extra fields are taken.
    let said = format!("karta {}", nonce());
    let (status, reply) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(
                json!({"text": said, "participant_name": "ana", "participant_type": "human",
                        "thinking": false, "stream": false}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["text"], said.as_str());
    assert_eq!(reply["agent"], "default");
    assert_eq!(reply["session_id"], id.as_str());
    assert!(reply["usage"]["total_tokens"].as_u64().is_some(), "{reply}");

    // Streamed: text events carry `data.part`, the envelope `source` and `timestamp`.
    let streamed = format!("streamed {}", nonce());
    let frames = karta_stream(
        &api,
        &format!("/v1/sessions/{id}/messages"),
        json!({"text": streamed, "stream": true}),
    )
    .await;
    let text: String = frames
        .iter()
        .filter(|(name, _)| name == "text")
        .map(|(_, v)| {
            assert_eq!(v["source"], "agent", "{v}");
            assert!(v["timestamp"].as_u64().is_some(), "{v}");
            assert_eq!(v["data"]["part"]["type"], "text", "{v}");
            v["data"]["part"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(text, streamed);
    let (last, done) = frames.last().expect("frames");
    assert_eq!(last, "done");
    assert!(done["data"]["usage"].is_object(), "{done}");

    // Karta answers an approval with PUT.
    let (status, _) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "/ask may I", "async": true})),
        )
        .await;
    assert_eq!(status, 202);
    let mut request_id = None;
    for _ in 0..100 {
        let (_, page) = api
            .call(
                "GET",
                &format!("/v1/sessions/{id}/events?since=0&limit=1000"),
                None,
            )
            .await;
        request_id = page["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == "input_required")
            .and_then(|e| e["data"]["request_id"].as_str().map(String::from));
        if request_id.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let request_id = request_id.expect("the agent asked");
    let (status, answered) = api
        .call(
            "PUT",
            &format!("/v1/sessions/{id}/inputs/{request_id}"),
            Some(json!({"decision": "approve_once"})),
        )
        .await;
    assert_eq!(status, 200, "{answered}");
    let (_, s) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}?wait=true&timeout=10"),
            None,
        )
        .await;
    assert_eq!(s["status"], "ready", "{s}");

    // The history, a cancel of a running turn, delete.
    let (status, history) = api
        .call("GET", &format!("/v1/sessions/{id}/messages"), None)
        .await;
    assert_eq!(status, 200);
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert_eq!(&texts[..2], [said.as_str(), streamed.as_str()], "{history}");
    let (status, _) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "/slow 100 tick", "async": true})),
        )
        .await;
    assert_eq!(status, 202);
    let (status, cancelled) = api
        .call("POST", &format!("/v1/sessions/{id}/cancel"), None)
        .await;
    assert_eq!(status, 202, "{cancelled}");
    let (_, s) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}?wait=true&timeout=10"),
            None,
        )
        .await;
    assert_eq!(s["status"], "ready", "{s}");

    // Projects: a pinned template; none pinned refuses new sessions; a session of one project is
    // forbidden under another; the project key is not the client's to set.
    let (status, p) = api
        .call(
            "POST",
            "/v1/projects",
            Some(json!({"ref": "alpha", "template": "echo"})),
        )
        .await;
    assert_eq!(status, 201, "{p}");
    let (status, _) = api
        .call("POST", "/v1/projects", Some(json!({"ref": "alpha"})))
        .await;
    assert_eq!(status, 409);
    let (status, _) = api
        .call("POST", "/v1/projects", Some(json!({"ref": "beta"})))
        .await;
    assert_eq!(status, 201);
    let (status, refused) = api
        .call("POST", "/v1/projects/beta/sessions", Some(json!({})))
        .await;
    assert_eq!(status, 409, "{refused}");
    let (status, bad) = api
        .call(
            "POST",
            "/v1/projects",
            Some(json!({"ref": "gamma", "template": "nope"})),
        )
        .await;
    assert_eq!(status, 422, "{bad}");
    let (status, ps) = api
        .call(
            "POST",
            "/v1/projects/alpha/sessions",
            Some(json!({"metadata": {"k": "v"}})),
        )
        .await;
    assert_eq!(status, 201, "{ps}");
    let pid = ps["id"].as_str().expect("id").to_string();
    let in_alpha = format!("alpha {}", nonce());
    let (status, reply) = api
        .call(
            "POST",
            &format!("/v1/projects/alpha/sessions/{pid}/messages"),
            Some(json!({"text": in_alpha})),
        )
        .await;
    assert_eq!((status, &reply["text"]), (200, &json!(in_alpha)), "{reply}");
    for (method, path) in [
        ("GET", format!("/v1/projects/beta/sessions/{pid}")),
        ("POST", format!("/v1/projects/beta/sessions/{pid}/messages")),
        ("GET", format!("/v1/projects/alpha/sessions/{id}")),
    ] {
        let (status, body) = api
            .call(method, &path, Some(json!({"text": "cross"})))
            .await;
        assert_eq!(status, 403, "{method} {path}: {body}");
    }
    let (status, _) = api
        .call(
            "POST",
            "/v1/projects/beta/sessions",
            Some(json!({"session_id": pid})),
        )
        .await;
    assert_eq!(status, 403, "resuming another project's session");
    let (status, _) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"metadata": {"sandwarden.project": "beta"}})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, _) = api
        .call(
            "PATCH",
            "/v1/projects/beta",
            Some(json!({"template": "echo"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call("POST", "/v1/projects/beta/sessions", Some(json!({})))
        .await;
    assert_eq!(status, 201);
    // Another tenant has no such project.
    let other = crate::tenancy::tenant_client(&serve.client(), "seed-karta-other").await;
    let (status, _) = other
        .call("GET", &format!("/v1/projects/alpha/sessions/{pid}"), None)
        .await;
    assert_eq!(status, 404);
    let (status, deleted) = api
        .call(
            "DELETE",
            &format!("/v1/projects/alpha/sessions/{pid}"),
            None,
        )
        .await;
    assert_eq!((status, &deleted["status"]), (200, &json!("deleted")));
}

/// The live sessions of `tenant` (not deleted), once there are at most `want` (one-shot sessions
/// go just after their answer) or 5 s have passed.
pub(crate) async fn live_sessions(admin: &Api, tenant: &str, want: usize) -> Vec<Value> {
    let mut live = Vec::new();
    for _ in 0..50 {
        let (_, page) = admin
            .call(
                "GET",
                &format!("/v1/sessions?tenant={tenant}&limit=500"),
                None,
            )
            .await;
        live = page["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .filter(|s| s["status"] != "deleted")
            .cloned()
            .collect();
        if live.len() <= want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    live
}

/// What a review from a hostile tenant found, held: refused or failed requests leave no session
/// behind, a quiet one-shot stream whose client goes is cleaned up, odd numbers are refused or
/// bounded, listings leave deleted sessions out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_abandoned_requests_leave_nothing_behind() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let api = crate::tenancy::tenant_client(&admin, "seed-review").await;
    let json_post = |path: &str, body: Value, header: Option<(&str, &str)>| {
        let mut req = api
            .http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&api.key)
            .json(&body);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        req.send()
    };
    // Chat requests refused or failed after their session was made.
    let resp = json_post(
        "/v1/responses",
        json!({"model": "echo", "input": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "x"}]}),
        None,
    )
    .await
    .expect("sent");
    assert_eq!(resp.status(), 400);
    let resp = json_post(
        "/v1/responses",
        json!({"model": "echo", "input": "/fail review"}),
        None,
    )
    .await
    .expect("sent");
    assert_eq!(resp.status(), 502);
    let resp = json_post(
        "/v1/chat/completions",
        json!({"model": "echo", "messages": [{"role": "user", "content": "/fail kept"}]}),
        Some(("x-sandwarden-session", "new")),
    )
    .await
    .expect("sent");
    assert_eq!(resp.status(), 502);
    // LAP's refused initial prompt, Stewrd's file that is no file.
    let (status, _) = api
        .call(
            "POST",
            "/api/v1/managed_agents/agents/echo/session",
            Some(json!({"initial_prompt": ""})),
        )
        .await;
    assert_eq!(status, 422);
    let (status, body) = api
        .call(
            "POST",
            "/compat/stewrd/echo/v1/agent",
            Some(json!({"message": "x", "files": [{"name": ".", "content": "x"}]})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    // A one-shot stream whose client goes while the turn is quiet.
    let quiet = json_post(
        "/compat/stewrd/echo/v1/agent",
        json!({"message": "/slow 600 tick", "stream": true}),
        None,
    )
    .await
    .expect("sent");
    assert_eq!(quiet.status(), 200);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(quiet);
    let live = live_sessions(&admin, "seed-review", 0).await;
    assert!(live.is_empty(), "sessions left: {live:?}");
    let (status, lap) = api
        .call("GET", "/api/v1/managed_agents/sessions", None)
        .await;
    assert_eq!((status, &lap["data"]), (200, &json!([])), "{lap}");

    // A long-poll's huge timeout is cut to its bound, not a server error.
    let (_, s) = api.call("POST", "/compat/motus/echo/sessions", None).await;
    let id = s["session_id"].as_str().expect("id").to_string();
    let (status, _) = api
        .call(
            "GET",
            &format!("/compat/motus/echo/sessions/{id}?wait=true&timeout=1e20"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    // Listings leave deleted sessions out.
    let (_, e) = api
        .call("POST", "/compat/everruns/echo/sessions", Some(json!({})))
        .await;
    let gone = e["id"].as_str().expect("id").to_string();
    assert_eq!(
        api.call("DELETE", &format!("/v1/sessions/{gone}"), None)
            .await
            .0,
        200
    );
    let (_, listed) = api
        .call("GET", "/compat/everruns/echo/sessions?limit=100", None)
        .await;
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert!(!ids.contains(&gone.as_str()), "{ids:?}");
}
