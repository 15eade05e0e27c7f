//! An agent or terminal program that ends, or that was never installed: the session says so.
//! Real `serve`, real harness servers and agents, driven through the public API and `tty_url`.

use crate::common::load::{sandbox_of, sandbox_pid};
use crate::common::*;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// A `serve` whose templates add agents and programs that are not installed, run the way the
/// built-in templates run theirs (`sandwarden launch`).
fn serve_with_missing_clis() -> (tempfile::TempDir, Sweep, Serve) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("templates.json"),
        r#"[{"name":"sh","kind":"tui","command":"bash --noprofile --norc","pool":0},
            {"name":"echo-cold","kind":"api","command":"sandwarden echo-agent","pool":0},
            {"name":"acp-missing","kind":"api","pool":0,
             "command":"sandwarden launch opencode -- sandwarden-test-no-such-acp-cli acp"},
            {"name":"tui-missing","kind":"tui","pool":0,
             "command":"sandwarden launch claude -- sandwarden-test-no-such-tui-cli --flag"}]"#,
    )
    .expect("templates");
    let sweep = Sweep(dir.path().to_path_buf());
    let serve = Serve::start_in(dir.path(), &[]);
    (dir, sweep, serve)
}

/// Waits (bounded, 60 s) until the session is no longer `creating`.
async fn settled(api: &Api, id: &str) -> Value {
    for _ in 0..1200 {
        let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
        if s["status"] != "creating" {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {id} stayed creating");
}

/// Waits (bounded, 10 s) until the session is `dead` or `failed`.
async fn ended(api: &Api, id: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
        if s["status"] == "dead" || s["status"] == "failed" {
            return s;
        }
        last = s;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("session {id} never ended: {last}");
}

/// The session's stored events.
async fn events(api: &Api, id: &str) -> Vec<Value> {
    let (status, body) = api
        .call("GET", &format!("/v1/sessions/{id}/events?limit=1000"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().cloned().unwrap_or_default()
}

/// The reason in the session's last event, which must say it died.
async fn dead_event_reason(api: &Api, id: &str) -> String {
    let events = events(api, id).await;
    let last = events.last().cloned().unwrap_or_default();
    assert_eq!(last["type"], "session_dead", "{events:?}");
    assert!(last["turn_id"].is_null(), "{last}");
    last["data"]["reason"]
        .as_str()
        .expect("a reason")
        .to_string()
}

/// A message to the session is refused as to any dead session, saying why it died.
async fn refused_as_dead(api: &Api, id: &str, text: &str, why: &str) {
    let (status, refused) = api.say(id, text).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["type"], "session_not_usable", "{refused}");
    assert_eq!(refused["session_status"], "dead", "{refused}");
    let detail = refused["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(why), "{refused}");
}

/// The session is dead because of `why`: its status and reason, and its event stream's last
/// event; `refused`, a message sent to it, left no trace.
async fn assert_dead_because(api: &Api, id: &str, why: &str, refused: &str) {
    let s = ended(api, id).await;
    assert_eq!(s["status"], "dead", "{s}");
    let reason = s["failure_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(why), "{s}");
    assert!(dead_event_reason(api, id).await.contains(why));
    let texts = api.history_texts(id).await;
    assert!(
        !texts.iter().any(|t| t == refused),
        "a refused message leaves no trace: {texts:?}"
    );
}

/// Reads a terminal until its exit frame; returns the exit code it reported.
async fn read_to_exit(ws: &mut shell::Ws) -> i64 {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] == "exit" {
                    return v["code"].as_i64().expect("an exit code");
                }
            }
            Ok(Some(Ok(Message::Close(f)))) => panic!("closed before the exit frame: {f:?}"),
            Ok(Some(Ok(_))) => {}
            other => panic!("the terminal ended without an exit frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_crashes_in_a_turn_leaves_its_session_dead_with_its_exit() {
    let (_dir, _sweep, serve) = serve_with_missing_clis();
    let api = serve.client();
    let id = api.ready("echo-cold").await;
    assert_eq!(
        api.say(&id, "before the crash").await.1["text"],
        "before the crash"
    );

    let (status, body) = api.say(&id, "/crash 5").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "agent_exited", "{body}");

    // Dead at once: the answer to the crashing turn came after the transition.
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "dead", "{s}");
    refused_as_dead(&api, &id, "after the crash", "exit code 5").await;
    assert_dead_because(&api, &id, "exit code 5", "after the crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_dies_between_turns_makes_the_next_message_find_the_session_dead() {
    let (_dir, _sweep, serve) = serve_with_missing_clis();
    let api = serve.client();
    let id = api.ready("echo-cold").await;
    let sandbox = sandbox_of(&api, &id).await;
    let harness = sandbox_pid(&serve.data, &sandbox).expect("its harness runs");
    let agent = descendants(harness)
        .into_iter()
        // The agent, not a harness (or bubblewrap) whose `--agent` names it.
        .find(|pid| {
            let cmd = cmdline(*pid);
            cmd.contains("echo-agent") && !cmd.contains("harness")
        })
        .expect("its echo agent runs");
    signal(agent, nix::sys::signal::Signal::SIGKILL);
    // The harness reaps it and reports it failed.
    assert!(crate::common::load::eventually(|| !alive(agent)).await);

    // At once, without waiting for the harness to record the failure (it waits for the last
    // stderr lines): the message is refused as to any dead session, and leaves no trace.
    refused_as_dead(&api, &id, "to a killed agent", "signal 9").await;
    assert_dead_because(&api, &id, "signal 9", "to a killed agent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_that_exits_leaves_its_session_dead_with_its_exit_code() {
    let (_dir, _sweep, serve) = serve_with_missing_clis();
    let api = serve.client();
    let id = api.ready("sh").await;
    let (tty_url, mut ws) = api.attach_tty(&id).await;
    ws.send(Message::Binary(b"exit 7\n".to_vec().into()))
        .await
        .expect("type");
    assert_eq!(read_to_exit(&mut ws).await, 7);
    drop(ws);

    // Attaching again and sending a message are refused as for any dead session.
    assert_dead_because(&api, &id, "exit code 7", "to a dead terminal").await;
    let err = tokio_tungstenite::connect_async(&tty_url)
        .await
        .expect_err("a dead session's terminal is refused");
    assert!(err.to_string().contains("409"), "{err}");
    refused_as_dead(&api, &id, "to a dead terminal", "exit code 7").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_agent_cli_fails_its_session_saying_how_to_install_it() {
    let (_dir, _sweep, serve) = serve_with_missing_clis();
    let api = serve.client();

    // ACP: the agent exits during the handshake; its own line is the reason.
    let acp = api.create("acp-missing").await;
    let acp_id = acp["id"].as_str().expect("id").to_string();
    let s = settled(&api, &acp_id).await;
    assert_eq!(s["status"], "failed", "{s}");
    let reason = s["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cannot run \"sandwarden-test-no-such-acp-cli\"")
            && reason.contains("Install the harness CLIs"),
        "{s}"
    );

    // TUI: the terminal is ready as soon as the program starts, so the session may be `ready`
    // for a moment; an attach then finds the program gone (refused), or sees it end (127).
    let tui = api.create("tui-missing").await;
    let tui_id = tui["id"].as_str().expect("id").to_string();
    let s = settled(&api, &tui_id).await;
    if s["status"] == "ready" {
        let tty_url = s["tty_url"].as_str().expect("tty_url");
        match tokio_tungstenite::connect_async(tty_url).await {
            Ok((mut ws, _)) => assert_eq!(read_to_exit(&mut ws).await, 127),
            Err(e) => assert!(e.to_string().contains("409"), "{e}"),
        }
    }
    let s = ended(&api, &tui_id).await;
    let reason = s["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cannot run \"sandwarden-test-no-such-tui-cli\"")
            && reason.contains("Install the harness CLIs"),
        "{s}"
    );
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

/// Every process below `pid`.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}
