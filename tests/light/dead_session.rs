//! Dead sessions when nothing watches the sandbox: a runtime whose sandboxes can vanish unnoticed
//! (as a remote one's can). Real harness processes, a real API server on 127.0.0.1:0; the only
//! stand-in is the runtime's liveness check, which always says "alive".

use crate::common::*;
use sandwarden::runtime::{Runtime, RuntimeError, Sandbox};
use sandwarden::template::Template;
use sandwarden::tokens::Tokens;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// Starts real harness processes but cannot see them exit.
struct Unwatched {
    tokens: Tokens,
    children: Mutex<Vec<Child>>,
}

#[async_trait::async_trait]
impl Runtime for Unwatched {
    fn isolation(&self) -> &'static str {
        "none"
    }
    fn name(&self) -> &'static str {
        "unwatched"
    }

    async fn create(&self, id: &str, t: &Template) -> Result<Sandbox, RuntimeError> {
        let (kind, program) = match t.kind {
            sandwarden_proto::kind::HarnessKind::Api => ("api", "--agent"),
            sandwarden_proto::kind::HarnessKind::Tui => ("tui", "--command"),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
            .args([
                "harness",
                "--listen",
                "127.0.0.1:0",
                "--kind",
                kind,
                program,
                &t.command,
            ])
            .env("SANDWARDEN_TOKEN", self.tokens.for_sandbox(id))
            .env("SANDWARDEN_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(RuntimeError::Io)?;
        let mut line = String::new();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| RuntimeError::Start("no stdout".into()))?;
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(RuntimeError::Io)?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| RuntimeError::Start(e.to_string()))?;
        let addr = v["listening"].as_str().unwrap_or_default().to_string();
        self.children.lock().expect("lock").push(child);
        Ok(Sandbox {
            id: id.into(),
            template: t.name.clone(),
            endpoint: format!("http://{addr}"),
            pid: None,
        })
    }

    async fn destroy(&self, _sandbox: &Sandbox) {}

    async fn alive(&self, _sandbox: &Sandbox) -> bool {
        true
    }
}

impl Drop for Unwatched {
    fn drop(&mut self) {
        for c in self.children.lock().expect("lock").iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// serve's router over an orchestrator on the unwatched runtime, with `templates`, on
/// 127.0.0.1:0; the runtime (to kill its sandboxes), a client, and the shutdown token.
async fn unwatched_serve(
    dir: &std::path::Path,
    names: &[&str],
) -> (Arc<Unwatched>, Api, tokio_util::sync::CancellationToken) {
    let store = in_process::store_with_keys(dir, &[("default", ADMIN_KEY, true)]).await;
    let tokens = Tokens::new(b"test-secret".to_vec());
    let runtime = Arc::new(Unwatched {
        tokens: tokens.clone(),
        children: Mutex::new(Vec::new()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let templates = in_process::templates(names);
    let orch = in_process::orchestrator(store, runtime.clone(), tokens, templates, &base).await;
    let shutdown = orch.shutdown.clone();
    let app = sandwarden::api::router(orch);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let api = Api {
        base,
        key: ADMIN_KEY.into(),
        http: reqwest::Client::new(),
    };
    (runtime, api, shutdown)
}

#[tokio::test]
async fn a_connect_failure_answers_502_and_marks_the_session_dead_in_that_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (runtime, api, shutdown) = unwatched_serve(dir.path(), &["echo"]).await;
    let id = api.ready("echo").await;
    assert_eq!(api.say(&id, "alive").await.1["text"], "alive");
    // The sandbox vanishes; nothing notices.
    for c in runtime.children.lock().expect("lock").iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (status, p) = api.say(&id, "are you there?").await;
    assert_eq!(
        (status, p["type"].as_str()),
        (502, Some("harness_unreachable")),
        "{p}"
    );
    // Dead already, in the same request: no waiting.
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "dead", "{s}");
    assert!(
        s["failure_reason"]
            .as_str()
            .unwrap_or("")
            .contains("could not be reached"),
        "{s}"
    );
    let (status, p) = api.say(&id, "again").await;
    assert_eq!(
        (status, p["type"].as_str()),
        (409, Some("session_not_usable")),
        "{p}"
    );
    // The turn that found it dead is recorded as failed, with the user's message kept.
    let texts = api.history_texts(&id).await;
    assert_eq!(texts, vec!["alive", "alive", "are you there?"]);
    shutdown.cancel();
}

/// The terminal path applies the same rule: attaching to a session whose sandbox vanished is
/// `502 harness_unreachable`, and the session is dead in that request, with the same reason.
#[tokio::test]
async fn a_terminal_that_cannot_reach_its_sandbox_finds_the_session_dead_as_a_message_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (runtime, api, shutdown) = unwatched_serve(dir.path(), &["shell"]).await;
    let id = api.ready("shell").await;
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();
    for c in runtime.children.lock().expect("lock").iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let err = tokio_tungstenite::connect_async(&tty_url)
        .await
        .expect_err("the attach is refused");
    assert!(err.to_string().contains("502"), "{err}");
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "dead", "{s}");
    assert!(
        s["failure_reason"]
            .as_str()
            .unwrap_or("")
            .contains("could not be reached"),
        "{s}"
    );
    shutdown.cancel();
}
