//! Secrets given to a session (per-session env, a webhook token) reach the agent and the receiver
//! and nothing else: not serve's or the harness's logs (at trace level), nor a sandbox's token, not the store, not the
//! events, not any answer of the API, including the errors for a bad request that carried them.

use crate::common::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `serve` with debug logs from itself and its sandboxes, its stderr and stdout kept in files
/// outside the data dir.
struct LoggedServe {
    child: Child,
    base: String,
    data: tempfile::TempDir,
    logs: tempfile::TempDir,
    stdout: Option<std::thread::JoinHandle<()>>,
}

impl LoggedServe {
    fn start() -> LoggedServe {
        let data = tempfile::tempdir().expect("data dir");
        let logs = tempfile::tempdir().expect("log dir");
        let stderr = std::fs::File::create(logs.path().join("stderr")).expect("stderr file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--allow-private-webhooks"])
            .arg("--data-dir")
            .arg(data.path())
            .env("SANDWARDEN_API_KEY", ADMIN_KEY)
            .env("SANDWARDEN_LOG", "trace")
            .env("SANDWARDEN_SANDBOX_LOG", "trace")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("listen line");
        let v: serde_json::Value = serde_json::from_str(&line).expect("listen line is JSON");
        let base = format!("http://{}", v["listening"].as_str().expect("address"));
        let rest = logs.path().join("stdout");
        let stdout = std::thread::spawn(move || {
            let mut all = line.into_bytes();
            let _ = stdout.read_to_end(&mut all);
            let _ = std::fs::write(rest, all);
        });
        LoggedServe {
            child,
            base,
            data,
            logs,
            stdout: Some(stdout),
        }
    }

    fn client(&self) -> Api {
        Api {
            base: self.base.clone(),
            key: ADMIN_KEY.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// SIGTERM, a bounded wait, and the sandboxes stopped: every log line is written after this.
    fn stop(&mut self) {
        terminate(&mut self.child);
        kill_sandboxes_under(self.data.path());
        if let Some(t) = self.stdout.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LoggedServe {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every file under `dir`, but for the directories named in `skip` (at the top level).
fn files_under(dir: &Path, skip: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let path = entry.path();
            if d == dir && skip.iter().any(|s| entry.file_name() == *s) {
                continue;
            }
            if path.is_dir() {
                todo.push(path);
            } else if path.is_file() {
                out.push(path); // not the sandboxes' sockets
            }
        }
    }
    out
}

fn secret(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

/// Asserts none of `secrets` occurs in `hay`, naming `place` otherwise.
fn assert_absent(place: &str, hay: &[u8], secrets: &[&str]) {
    for s in secrets {
        let found = hay.windows(s.len()).any(|w| w == s.as_bytes());
        assert!(!found, "{s} leaked into {place}");
    }
}

#[tokio::test]
async fn session_secrets_never_reach_logs_store_events_or_answers() {
    let hidden = secret("hidden");
    let shown = secret("shown");
    let hook_token = secret("hook");
    let rejected = secret("rejected");
    let mcp_env = secret("mcp-env");
    let mcp_header = secret("mcp-header");
    let mut serve = LoggedServe::start();
    let api = serve.client();
    let mut answers: Vec<String> = Vec::new();

    let (status, s) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({
                "harness": "echo", "env": {"HIDDEN_TOKEN": hidden, "SHOWN_TOKEN": shown},
                "mcp_servers": [
                    {"name": "repo-tools", "command": "/usr/bin/true", "env": {"MCP_TOKEN": mcp_env}},
                    {"name": "docs", "type": "http", "url": "http://127.0.0.1:9/mcp",
                     "headers": {"Authorization": format!("Bearer {mcp_header}")}},
                ],
            })),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    answers.push(s.to_string());
    let id = s["id"].as_str().expect("id").to_string();
    answers.push(api.wait_status(&id, "ready").await.to_string());

    // The agent does get the values.
    let (status, reply) = api.say(&id, "/env SHOWN_TOKEN").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some(shown.as_str()))
    );
    let shown_turn = reply["turn_id"].as_str().expect("turn id").to_string();
    // And its MCP servers, whose env and headers it was handed (the echo agent counts them).
    let (status, reply) = api.say(&id, "/mcp").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (
            200,
            Some(
                "mcp: repo-tools stdio /usr/bin/true args=0 env=1; docs http http://127.0.0.1:9/mcp headers=1"
            )
        ),
        "{reply}"
    );
    let (status, reply) = api.say(&id, "plain").await;
    assert_eq!(status, 200, "{reply}");
    answers.push(reply.to_string());
    let streamed = api
        .sse(
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "streamed", "stream": true})),
            None,
            1000,
        )
        .await;
    answers.extend(streamed.iter().map(|e| e.2.to_string()));

    // A webhook with a token: the receiver gets it, nothing else keeps it in the clear.
    let (url, got) = hook_receiver().await;
    let turn_id = api
        .post_async(
            &id,
            json!({"text": "hooked", "webhook": {"url": url, "token": hook_token}}),
        )
        .await;
    let mut delivered = false;
    for _ in 0..200 {
        let (_, turn) = api
            .call("GET", &format!("/v1/sessions/{id}/turns/{turn_id}"), None)
            .await;
        if turn["webhook_deliveries"][0]["status"] == "delivered" {
            answers.push(turn.to_string());
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(delivered, "the webhook was delivered");
    assert_eq!(
        got.lock().expect("lock").as_deref(),
        Some(format!("Bearer {hook_token}").as_str()),
        "the receiver got the token"
    );

    // Requests refused for their env or files, each carrying a secret value.
    for body in [
        json!({"harness": "echo", "env": {"BAD=NAME": rejected}}),
        json!({"harness": "echo", "env": {"SANDWARDEN_TOKEN": rejected}}),
        json!({"harness": "echo", "env": {"NUL": format!("{rejected}\u{0}")}}),
        json!({"harness": "echo", "env": {"OK": rejected}, "files": [{"path": "../x", "content": rejected}]}),
        json!({"harness": "echo", "env": {"OK": rejected}, "cwd": "no/such/dir"}),
        json!({"harness": "no-such-harness", "env": {"OK": rejected}}),
    ] {
        let (status, p) = api.call("POST", "/v1/sessions", Some(body.clone())).await;
        assert!(
            (400..500).contains(&status),
            "{body} was refused, not {status}: {p}"
        );
        assert_absent("an error body", p.to_string().as_bytes(), &[&rejected]);
        answers.push(p.to_string());
    }

    // Everything the API shows about the session. The history and the `/env` turn hold the
    // agent's answer, so the shown value, by request.
    for path in [format!("/v1/sessions/{id}"), "/v1/sessions".to_string()] {
        answers.push(api.call("GET", &path, None).await.1.to_string());
    }
    let mut with_agent_output = Vec::new();
    for path in [
        format!("/v1/sessions/{id}/messages"),
        format!("/v1/sessions/{id}/turns/{shown_turn}"),
    ] {
        with_agent_output.push(api.call("GET", &path, None).await.1.to_string());
    }
    let (_, events) = api
        .call("GET", &format!("/v1/sessions/{id}/events?limit=1000"), None)
        .await;
    let events = events["events"].as_array().expect("events").clone();
    assert!(events.len() > 10, "a session's worth of events: {events:?}");
    // The agent's own answer to `/env SHOWN_TOKEN` holds that value, by request; all else may not.
    let all_secrets = [
        hidden.as_str(),
        shown.as_str(),
        hook_token.as_str(),
        rejected.as_str(),
        mcp_env.as_str(),
        mcp_header.as_str(),
    ];
    let never_shown = [
        hidden.as_str(),
        hook_token.as_str(),
        rejected.as_str(),
        mcp_env.as_str(),
        mcp_header.as_str(),
    ];
    for e in &events {
        let agent_output = e["turn_id"] == shown_turn.as_str()
            && ["text", "done", "message"].contains(&e["type"].as_str().unwrap_or(""));
        let secrets: &[&str] = if agent_output {
            &never_shown
        } else {
            &all_secrets
        };
        assert_absent(&format!("event {e}"), e.to_string().as_bytes(), secrets);
    }
    for a in &answers {
        assert_absent(&format!("an answer: {a}"), a.as_bytes(), &all_secrets);
    }
    for a in &with_agent_output {
        assert_absent(&format!("an answer: {a}"), a.as_bytes(), &never_shown);
    }

    // Every sandbox's bearer token, from the server secret and the sandbox ids: none may be
    // logged or stored either.
    let secret_hex = std::fs::read_to_string(serve.data.path().join("secret")).expect("secret");
    let keyring = sandwarden::tokens::Tokens::new(hex::decode(secret_hex.trim()).expect("hex"));
    let sandbox_tokens: Vec<String> = std::fs::read_dir(serve.data.path().join("sandboxes"))
        .expect("sandboxes dir")
        .flatten()
        .map(|d| keyring.for_sandbox(&d.file_name().to_string_lossy()))
        .collect();
    assert!(!sandbox_tokens.is_empty(), "the sandboxes are found");
    // A terminal attached with its `tty_url`: the token in the URL's query must not reach the
    // logs either (the request's span names the path, never the query).
    let api = Api {
        base: serve.base.clone(),
        key: ADMIN_KEY.to_string(),
        http: reqwest::Client::new(),
    };
    let shell = api.ready("shell").await;
    let (tty_url, mut ws) = api.attach_tty(&shell).await;
    let tty_token = tty_url
        .split_once("token=")
        .map(|(_, t)| t.split('&').next().unwrap_or(t).to_string())
        .expect("a token in the tty_url");
    {
        use futures::SinkExt;
        ws.send(tokio_tungstenite::tungstenite::Message::Binary(
            b"echo attached\n".to_vec().into(),
        ))
        .await
        .expect("type into the terminal");
        let _ = ws.close(None).await;
    }
    let tokens: Vec<&str> = sandbox_tokens
        .iter()
        .map(String::as_str)
        .chain([tty_token.as_str()])
        .collect();

    // The logs and the store, after a clean stop (every line written, the WAL checkpointed or
    // not: both are read). Sandbox directories and homes belong to the agent.
    serve.stop();
    let stderr = std::fs::read(serve.logs.path().join("stderr")).expect("stderr");
    assert!(
        String::from_utf8_lossy(&stderr).contains("TRACE"),
        "the logs are at trace level, or this proves little"
    );
    assert_absent(
        "serve's stderr (with the sandboxes')",
        &stderr,
        &all_secrets,
    );
    assert_absent("serve's stderr (with the sandboxes')", &stderr, &tokens);
    let stdout = std::fs::read(serve.logs.path().join("stdout")).expect("stdout");
    assert_absent("serve's stdout", &stdout, &all_secrets);
    assert_absent("serve's stdout", &stdout, &tokens);
    let stored = files_under(serve.data.path(), &["sandboxes", "homes"]);
    assert!(
        stored.iter().any(|p| p.ends_with("sandwarden.db")),
        "the store is among {stored:?}"
    );
    let mut agent_answer_found = false;
    for path in stored {
        let bytes = std::fs::read(&path).expect("read a stored file");
        // The agent's answer to `/env SHOWN_TOKEN` is in the history, by request.
        assert_absent(&path.display().to_string(), &bytes, &never_shown);
        assert_absent(&path.display().to_string(), &bytes, &tokens);
        agent_answer_found |= bytes.windows(shown.len()).any(|w| w == shown.as_bytes());
    }
    assert!(
        agent_answer_found,
        "the agent's stored answer is found: the search reads what the store wrote"
    );
}

/// A local webhook receiver that keeps the Authorization header it got.
async fn hook_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Option<String>>>) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(None));
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let kept = kept.clone();
            async move {
                *kept.lock().expect("lock") = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                axum::http::StatusCode::OK
            }
        }),
    );
    (crate::common::serve_hook(app).await, got)
}
