//! The real agent CLIs behind the public API: `serve` → harness server → the CLI (opencode,
//! claude-agent-acp, codex-acp, claude, codex) → the fake model on 127.0.0.1. The templates are the
//! built-in ones, given the fake model's address through their env, as an operator would.
//!
//! The CLIs come from `scripts/install-harnesses` (harnesses/node_modules/.bin) or PATH. When one
//! is missing the test says so loudly and returns; with SANDWARDEN_REQUIRE_HARNESSES=1 (set by
//! scripts/test when npm exists) a missing CLI fails the test instead.

mod common;

use common::fake_model::FakeModel;
use common::{Api, Serve, children, kill_sandboxes_under};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The CLIs are heavy (opencode alone peaks near 0.6 GB); one harness at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest any one harness test may take before it fails (never a hang).
const TEST_LIMIT: Duration = Duration::from_secs(420);

fn project_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("harnesses/node_modules/.bin")
}

/// PATH with the project-local CLIs first.
fn search_path() -> String {
    let mut dirs = vec![project_bin()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn on_path(program: &str) -> bool {
    std::env::split_paths(&search_path()).any(|dir| dir.join(program).is_file())
}

/// Whether the programs are installed; if not, a loud skip (or a failure when required).
fn installed(harness: &str, programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !on_path(p)).collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "real harness {harness}: {} not installed (looked in {} and PATH); run scripts/install-harnesses",
        missing.join(", "),
        project_bin().display()
    );
    if std::env::var("SANDWARDEN_REQUIRE_HARNESSES").as_deref() == Ok("1") {
        panic!("{msg} (SANDWARDEN_REQUIRE_HARNESSES=1)");
    }
    // Straight to the stderr stream: libtest would swallow eprintln! output of a passing test.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n"
    );
    false
}

/// The fake model plus `serve` with the built-in template `harness`, its env extended by `env`.
struct Rig {
    fake: FakeModel,
    serve: Serve,
    api: Api,
    data: tempfile::TempDir,
    /// Whether sessions run under bubblewrap, where their working directory is `/work`.
    confined: std::sync::atomic::AtomicBool,
}

impl Rig {
    fn start(harness: &str, env: impl Fn(&FakeModel) -> Vec<(&'static str, String)>) -> Rig {
        let fake = FakeModel::start(&[]);
        let data = tempfile::tempdir().expect("tempdir");
        let mut template = sandwarden::template::builtin_templates()
            .into_iter()
            .find(|t| t.name == harness)
            .expect("a built-in template");
        template
            .env
            .extend(env(&fake).into_iter().map(|(k, v)| (k.to_string(), v)));
        template.turn_timeout_s = 120;
        std::fs::write(
            data.path().join("templates.json"),
            serde_json::to_string(&[template]).expect("json"),
        )
        .expect("templates");
        // Sandboxes reach nothing on this machine's loopback but the fake model, allowed here as
        // an operator allows a local model server.
        let allow = fake.base.trim_start_matches("http://").to_string();
        let serve = Serve::start_in_with_env(
            data.path(),
            &["--egress-allow", &allow],
            &[("PATH", search_path())],
        );
        let api = serve.client();
        Rig {
            fake,
            serve,
            api,
            data,
            confined: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A ready session with a marker file, so its working directory can be found.
    /// `extra` may carry `env` and more `files`.
    async fn session(&self, harness: &str, extra: Value) -> (String, PathBuf) {
        let marker = format!("marker-{}", uuid::Uuid::new_v4().simple());
        let mut files = vec![json!({"path": marker, "content": ""})];
        files.extend(extra["files"].as_array().cloned().unwrap_or_default());
        let env = extra.get("env").cloned().unwrap_or_else(|| json!({}));
        let mut body = json!({"harness": harness, "env": env, "files": files});
        if let Some(instructions) = extra.get("instructions") {
            body["instructions"] = instructions.clone();
        }
        let (status, s) = self.api.call("POST", "/v1/sessions", Some(body)).await;
        assert_eq!(status, 201, "{s}");
        let id = s["id"].as_str().expect("id").to_string();
        let (_, s) = self
            .api
            .call(
                "GET",
                &format!("/v1/sessions/{id}?wait=true&timeout=60"),
                None,
            )
            .await;
        assert_eq!(s["status"], "ready", "{s}");
        self.confined.store(
            s["isolation"] == "bwrap",
            std::sync::atomic::Ordering::Relaxed,
        );
        let workdir = std::fs::read_dir(self.data.path().join("sandboxes"))
            .expect("sandboxes dir")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join(&marker).exists())
            .expect("the session's working directory");
        (id, workdir)
    }

    async fn events(&self, id: &str) -> Vec<Value> {
        let (_, e) = self
            .api
            .call("GET", &format!("/v1/sessions/{id}/events?limit=1000"), None)
            .await;
        e["events"].as_array().cloned().unwrap_or_default()
    }

    /// The agent process behind the session whose working directory is `workdir`.
    fn agent_pid(&self, workdir: &Path) -> i32 {
        let needle = workdir.to_string_lossy().to_string();
        let harness = children(self.serve.pid())
            .into_iter()
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
            .expect("the session's sandbox process");
        // Under bubblewrap the harness runs below `sandbox-exec`, bwrap (outside) and bwrap
        // (PID 1 inside).
        let mut tree = std::iter::once(harness as u32)
            .chain(sandwarden::procfs::descendants(harness as u32))
            .map(|p| p as i32);
        let harness = tree
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let argv0 = c.split(|b| *b == 0).next().unwrap_or_default();
                    let line = String::from_utf8_lossy(&c);
                    !argv0.ends_with(b"bwrap")
                        && line.contains("--listen")
                        && !line.contains("sandbox-exec")
                })
            })
            .expect("the session's harness process");
        *children(harness).first().expect("the agent process")
    }

    /// `host`, a path in a session's working directory, as the agent sees it: under bubblewrap
    /// the working directory is `/work`.
    fn seen_by_agent(&self, workdir: &std::path::Path, host: &std::path::Path) -> String {
        if !self.confined.load(std::sync::atomic::Ordering::Relaxed) {
            return host.display().to_string();
        }
        let rest = host.strip_prefix(workdir).unwrap_or(host);
        std::path::Path::new("/work")
            .join(rest)
            .display()
            .to_string()
    }

    /// The text of every request the fake model received (bodies, as JSON text).
    async fn model_saw(&self) -> String {
        self.fake
            .requests()
            .await
            .iter()
            .map(|r| {
                let b = &r["body"];
                let convo = [&b["messages"], &b["input"]]
                    .into_iter()
                    .find(|v| v.is_array())
                    .unwrap_or(b);
                format!("{} -> {}", convo, r["answer"])
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.serve.stop();
        kill_sandboxes_under(self.data.path());
    }
}

/// How one API harness is exercised.
struct ApiCase {
    harness: &'static str,
    programs: &'static [&'static str],
    model_env: fn(&FakeModel) -> Vec<(&'static str, String)>,
    /// Message options that let a tool run without asking (for the file-write turn).
    write_options: fn() -> Value,
    /// Session settings (`env`, `files`) and message options under which a write asks for
    /// permission first.
    ask_session: fn() -> Value,
    ask_options: fn() -> Value,
}

fn opencode_env(fake: &FakeModel) -> Vec<(&'static str, String)> {
    vec![
        ("OPENAI_BASE_URL", fake.url("/v1")),
        ("OPENAI_API_KEY", "sk-fake-opencode-0123456789".into()),
        ("OPENAI_MODEL", "fake-model".into()),
    ]
}

fn anthropic_env(fake: &FakeModel) -> Vec<(&'static str, String)> {
    vec![
        ("ANTHROPIC_BASE_URL", fake.base.clone()),
        (
            "ANTHROPIC_API_KEY",
            "sk-ant-fake-0123456789abcdefghij".into(),
        ),
        ("ANTHROPIC_MODEL", "fake-model".into()),
    ]
}

fn codex_env(fake: &FakeModel) -> Vec<(&'static str, String)> {
    vec![
        ("OPENAI_BASE_URL", fake.url("/v1")),
        ("OPENAI_API_KEY", "sk-fake-codex-0123456789".into()),
        ("OPENAI_MODEL", "fake-model".into()),
    ]
}

fn none() -> Value {
    json!({})
}

fn text_of(reply: &Value) -> String {
    reply["text"].as_str().unwrap_or_default().to_string()
}

async fn exercise_api_harness(case: ApiCase) {
    let _serial = SERIAL.lock().await;
    if !installed(case.harness, case.programs) {
        return;
    }
    tokio::time::timeout(TEST_LIMIT, api_scenarios(&case))
        .await
        .unwrap_or_else(|_| panic!("{}: the scenarios took over {TEST_LIMIT:?}", case.harness));
}

async fn api_scenarios(case: &ApiCase) {
    let h = case.harness;
    let rig = Rig::start(h, case.model_env);
    let api = &rig.api;
    // The session's instructions, which each CLI gets its own way (docs/harness.md).
    let marker = format!("standing-order-{}", uuid::Uuid::new_v4().simple());
    let (id, workdir) = rig
        .session(h, json!({"instructions": format!("Obey {marker}.")}))
        .await;

    // 1. A text turn, JSON reply.
    let (status, reply) = api.say(&id, "first words pelican").await;
    assert_eq!(status, 200, "{h}: {reply}");
    assert!(
        text_of(&reply).contains("Hello from the fake model! You said:")
            && text_of(&reply).contains("pelican"),
        "{h}: {reply}"
    );
    assert!(
        rig.fake
            .requests()
            .await
            .iter()
            .any(|r| r["body"].to_string().contains(&marker)),
        "{h}: the model never saw the session's instructions: {}",
        tail(&rig.model_saw().await, 3000)
    );

    // 2. The same as SSE: events end with done, and the text arrives in them.
    let events = api
        .sse(
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "streamed words heron", "stream": true})),
            None,
            10_000,
        )
        .await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.last(), Some(&"done"), "{h}: {kinds:?}");
    let streamed: String = events
        .iter()
        .filter(|(_, k, _)| k == "text")
        .filter_map(|(_, _, d)| d["data"]["text"].as_str().or(d["text"].as_str()))
        .collect();
    assert!(streamed.contains("heron"), "{h}: {events:?}");

    // 3. Async: 202, then long-poll. Its request to the model carries the first turn (history).
    let turn = api
        .post_async(&id, json!({"text": "third words ibis"}))
        .await;
    let done = api.finished_turn(&id, &turn).await;
    assert_eq!(done["status"], "completed", "{h}: {done}");
    assert!(text_of(&done).contains("ibis"), "{h}: {done}");
    let last = rig
        .fake
        .requests()
        .await
        .into_iter()
        .rev()
        .find(|r| r["title_request"] == false && r["body"].to_string().contains("ibis"))
        .expect("the third turn's model request");
    assert!(
        last["body"].to_string().contains("pelican"),
        "{h}: the second turn's request lacks the first turn: {}",
        last["body"]
    );

    // 4. A tool call that writes a file in the session's working directory.
    let target = workdir.join("written-by-agent.txt");
    let mut msg = json!({"text": format!("WRITEFILE {} contents from {h}", rig.seen_by_agent(&workdir, &target))});
    merge(&mut msg, (case.write_options)());
    let (status, reply) = api
        .call("POST", &format!("/v1/sessions/{id}/messages"), Some(msg))
        .await;
    assert_eq!(status, 200, "{h}: {reply}");
    assert!(text_of(&reply).contains("Tool done."), "{h}: {reply}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap_or_default(),
        format!("contents from {h}"),
        "{h}: {reply}\nthe model saw: {}",
        tail(&rig.model_saw().await, 3000)
    );
    let kinds: Vec<String> = rig
        .events(&id)
        .await
        .iter()
        .filter_map(|e| e["type"].as_str().map(String::from))
        .collect();
    assert!(kinds.iter().any(|k| k == "tool_use"), "{h}: {kinds:?}");

    // 5. Cancel a slow turn (A); the next turns (B, C) each hold their own prompt's answer, never
    //    an empty one nor another prompt's.
    let turn = api.post_async(&id, json!({"text": "SLOW 500 40"})).await;
    wait_for_event(&rig, &id, &turn, "text").await;
    let (status, c) = api
        .call("POST", &format!("/v1/sessions/{id}/cancel"), None)
        .await;
    assert_eq!(status, 202, "{h}: {c}");
    let ended = api.finished_turn(&id, &turn).await;
    assert!(
        ended["status"] == "cancelled" || ended["error"]["code"] == "cancelled",
        "{h}: {ended}"
    );
    api.wait_status(&id, "ready").await;
    let (status, b) = api.say(&id, "after cancel egret").await;
    assert_eq!(status, 200, "{h}: {b}");
    let (status, c) = api.say(&id, "then cormorant").await;
    assert_eq!(status, 200, "{h}: {c}");
    let (b, c) = (text_of(&b), text_of(&c));
    let saw = || async { tail(&rig.model_saw().await, 3000).to_string() };
    assert!(
        b.contains("You said: after cancel egret") && !b.contains("tick"),
        "{h}: turn B holds {b:?}, not its own answer alone; C holds {c:?}\nthe model saw: {}",
        saw().await
    );
    assert!(
        c.contains("You said: then cormorant") && !c.contains("egret") && !c.contains("tick"),
        "{h}: turn C holds {c:?}, not its own answer alone; B holds {b:?}\nthe model saw: {}",
        saw().await
    );

    // 6. A permission request surfaces as input_required and is approved through the API.
    let (id2, workdir2) = rig.session(h, (case.ask_session)()).await;
    let target = workdir2.join("approved.txt");
    let mut msg = json!({"text": format!("WRITEFILE {} approved by the API", rig.seen_by_agent(&workdir2, &target))});
    merge(&mut msg, (case.ask_options)());
    let turn = api.post_async(&id2, msg).await;
    let asked = wait_for_event(&rig, &id2, &turn, "input_required").await;
    let s = api.wait_status(&id2, "input_required").await;
    assert_eq!(s["turn_id"], turn.as_str(), "{h}: {s}");
    let request_id = asked["data"]["request_id"].as_str().expect("request id");
    let (status, a) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id2}/inputs/{request_id}"),
            Some(json!({"decision": "approve_once"})),
        )
        .await;
    assert_eq!(status, 200, "{h}: {a}");
    let done = api.finished_turn(&id2, &turn).await;
    assert_eq!(done["status"], "completed", "{h}: {done}");
    assert_eq!(
        std::fs::read_to_string(&target).unwrap_or_default(),
        "approved by the API",
        "{h}: {done}"
    );

    // 7. Killing the CLI mid-turn ends the turn with an error and the session is never stuck.
    let (id3, workdir3) = rig.session(h, json!({})).await;
    let turn = api.post_async(&id3, json!({"text": "SLOW 500 40"})).await;
    wait_for_event(&rig, &id3, &turn, "text").await;
    let agent = rig.agent_pid(&workdir3);
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    );
    let ended = api.finished_turn(&id3, &turn).await;
    assert_eq!(ended["status"], "failed", "{h}: {ended}");
    assert!(ended["error"]["code"].is_string(), "{h}: {ended}");
    let (status, p) = api.say(&id3, "still there?").await;
    assert!(
        status == 502 || status == 409 || status == 503,
        "{h}: a dead agent answers at once with an error: {status} {p}"
    );
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id3}"), None).await;
    assert!(
        ["dead", "failed", "ready"].contains(&s["status"].as_str().unwrap_or("")),
        "{h}: {s}"
    );
}

fn tail(s: &str, n: usize) -> &str {
    let mut cut = s.len().saturating_sub(n);
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    &s[cut..]
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// Waits (bounded) until the turn has emitted an event of `kind` (for `text`, a non-empty one:
/// the model is streaming); returns it.
async fn wait_for_event(rig: &Rig, id: &str, turn: &str, kind: &str) -> Value {
    for _ in 0..600 {
        if let Some(e) = rig.events(id).await.into_iter().find(|e| {
            e["turn_id"] == turn
                && e["type"] == kind
                && (kind != "text" || e["data"]["text"].as_str().is_some_and(|t| !t.is_empty()))
        }) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no {kind} event in turn {turn} within 60 s: {:?}",
        rig.events(id).await
    );
}

#[tokio::test]
async fn opencode_runs_behind_the_api() {
    exercise_api_harness(ApiCase {
        harness: "opencode",
        programs: &["opencode"],
        model_env: opencode_env,
        write_options: none,
        ask_session: || json!({"env": {"OPENCODE_PERMISSION": r#"{"edit":"ask","bash":"ask"}"#}}),
        ask_options: none,
    })
    .await;
}

#[tokio::test]
async fn claude_agent_sdk_runs_behind_the_api() {
    exercise_api_harness(ApiCase {
        harness: "claude-agent-sdk",
        programs: &["claude-agent-acp"],
        model_env: anthropic_env,
        write_options: || json!({"agent": "acceptEdits"}),
        ask_session: none,
        ask_options: none,
    })
    .await;
}

#[tokio::test]
async fn codex_runs_behind_the_api() {
    exercise_api_harness(ApiCase {
        harness: "codex",
        programs: &["codex-acp"],
        model_env: codex_env,
        write_options: none,
        // A project config in the working directory, as a session's files can bring one.
        ask_session: || {
            json!({"files": [{"path": ".codex/config.toml",
                              "content": "approval_policy = \"untrusted\"\n"}]})
        },
        ask_options: none,
    })
    .await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A terminal viewer: the WebSocket and a screen the output is rendered on.
struct Viewer {
    ws: Socket,
    screen: vt100::Parser,
}

impl Viewer {
    async fn attach(tty_url: &str, cols: u16, rows: u16) -> Viewer {
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(20),
            tokio_tungstenite::connect_async(tty_url),
        )
        .await
        .expect("attach within 20 s")
        .expect("attach");
        Viewer {
            ws,
            screen: vt100::Parser::new(rows, cols, 0),
        }
    }

    fn text(&self) -> String {
        self.screen.screen().contents()
    }

    /// Renders output until the screen shows one of `wanted` (bounded); returns the screen.
    async fn wait_for(&mut self, wanted: &[&str], what: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.text();
            if wanted.iter().any(|w| text.contains(w)) {
                return text;
            }
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => self.screen.process(&b),
                Ok(Some(Ok(_))) => {}
                other => panic!("{what}: no {wanted:?} on the screen ({other:?}):\n{text}"),
            }
        }
    }

    /// Reads whatever arrives within `quiet` of silence (bounded overall); returns the byte count.
    async fn drain(&mut self, quiet: Duration) -> usize {
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(quiet, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    n += b.len();
                    self.screen.process(&b);
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        n
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .expect("send input");
    }

    async fn resize(&mut self, cols: u16, rows: u16) {
        self.ws
            .send(Message::Text(
                json!({"type": "resize", "cols": cols, "rows": rows})
                    .to_string()
                    .into(),
            ))
            .await
            .expect("send resize");
        self.screen.screen_mut().set_size(rows, cols);
    }
}

/// How one TUI harness is exercised.
struct TuiCase {
    harness: &'static str,
    programs: &'static [&'static str],
    model_env: fn(&FakeModel) -> Vec<(&'static str, String)>,
    /// Text that shows the program's main screen is up.
    ready_marks: &'static [&'static str],
}

async fn exercise_tui_harness(case: TuiCase) {
    let _serial = SERIAL.lock().await;
    if !installed(case.harness, case.programs) {
        return;
    }
    tokio::time::timeout(TEST_LIMIT, tui_scenario(&case))
        .await
        .unwrap_or_else(|_| panic!("{}: the scenario took over {TEST_LIMIT:?}", case.harness));
}

async fn tui_scenario(case: &TuiCase) {
    let h = case.harness;
    let rig = Rig::start(h, case.model_env);
    let (id, _) = rig.session(h, json!({})).await;
    let (_, s) = rig
        .api
        .call("GET", &format!("/v1/sessions/{id}"), None)
        .await;
    let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();

    // The program's screen appears.
    let mut v = Viewer::attach(&tty_url, 120, 40).await;
    v.wait_for(case.ready_marks, &format!("{h} start screen"))
        .await;
    v.drain(Duration::from_millis(1500)).await;

    // Resize: the program redraws for the new size.
    v.resize(100, 30).await;
    let redrawn = v.drain(Duration::from_millis(1500)).await;
    assert!(
        redrawn > 0,
        "{h}: nothing redrawn after a resize:\n{}",
        v.text()
    );
    v.wait_for(case.ready_marks, &format!("{h} after resize"))
        .await;

    // Typed input reaches it and the model's reply is rendered.
    v.send(b"hello tui kestrel").await;
    v.wait_for(&["kestrel"], &format!("{h} echo of typed input"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    v.send(b"\r").await;
    let screen = v
        .wait_for(&["Hello from the fake model"], &format!("{h} reply"))
        .await;
    let asked = rig.model_saw().await;
    assert!(
        asked.contains("kestrel"),
        "{h}: the model never saw the input"
    );
    v.drain(Duration::from_millis(500)).await;

    // Detach, re-attach: the replay rebuilds the screen.
    let _ = v.ws.close(None).await;
    drop(v);
    let mut again = Viewer::attach(&tty_url, 100, 30).await;
    again
        .wait_for(&["Hello from the fake model"], &format!("{h} replay"))
        .await;
    assert!(
        screen.contains("kestrel"),
        "{h}: the first screen showed the input:\n{screen}"
    );
}

#[tokio::test]
async fn claude_code_runs_in_a_terminal() {
    exercise_tui_harness(TuiCase {
        harness: "claude-code",
        programs: &["claude"],
        model_env: anthropic_env,
        ready_marks: &["for shortcuts", "Claude Code"],
    })
    .await;
}

#[tokio::test]
async fn codex_tui_runs_in_a_terminal() {
    exercise_tui_harness(TuiCase {
        harness: "codex-tui",
        programs: &["codex"],
        model_env: codex_env,
        ready_marks: &["OpenAI Codex", "for shortcuts"],
    })
    .await;
}

/// The official Anthropic and OpenAI SDKs (tests/sdk/real_agent.py) in front of claude-agent-sdk:
/// a turn answered with its own prompt, a command allowed and one denied through each vendor's
/// confirmation, an interrupt, through the vendor APIs alone.
#[tokio::test]
async fn claude_agent_sdk_behind_the_vendor_sdks() {
    let _serial = SERIAL.lock().await;
    if !installed("claude-agent-sdk", &["claude-agent-acp"]) {
        return;
    }
    let python = std::env::var_os("SANDWARDEN_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv/bin/python")
        });
    if !python.exists() {
        assert!(
            std::env::var_os("SANDWARDEN_REQUIRE_SDKS").is_none(),
            "the vendor SDKs are required but {} is missing: run scripts/install-sdks",
            python.display()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED: the vendor SDKs are not installed (scripts/install-sdks) !!!!!!!!\n"
        );
        return;
    }
    let rig = Rig::start("claude-agent-sdk", anthropic_env);
    let (status, key) = rig
        .api
        .call(
            "POST",
            "/v1/api-keys",
            Some(json!({"tenant": "vendor-sdks"})),
        )
        .await;
    assert_eq!(status, 201, "{key}");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/real_agent.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .env("SANDWARDEN_URL", &rig.serve.base)
        .env("SANDWARDEN_KEY", key["key"].as_str().expect("key"))
        .env("SANDWARDEN_HARNESS", "claude-agent-sdk")
        .env("SANDWARDEN_MODEL", "default")
        .output();
    let out = tokio::time::timeout(TEST_LIMIT, run)
        .await
        .expect("the SDK clients finished in time")
        .expect("run the SDK clients");
    assert!(
        out.status.success(),
        "claude-agent-sdk behind the vendor SDKs:\n{}\n{}\nthe model saw: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&rig.model_saw().await, 3000)
    );
    // What the script says the model must have seen: the two system prompts (the agent's
    // `system`, the OpenAI agent's `instructions`) in the request's system prompt, and the two
    // client tools' answers in the conversation.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let wanted: Vec<&str> = summary["model_saw"]
        .as_array()
        .map(|v| v.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(wanted.len(), 4, "{stdout}");
    let requests = rig.fake.requests().await;
    for (i, marker) in wanted.iter().enumerate() {
        let part = if i < 2 { "system" } else { "messages" };
        assert!(
            requests
                .iter()
                .any(|r| r["body"][part].to_string().contains(marker)),
            "the model never saw {marker:?} in a request's {part}: {}",
            tail(&rig.model_saw().await, 3000)
        );
    }
}

/// The seed platforms' own clients (tests/seed/real_agent.py: the motus CLI, everruns-sdk,
/// stewrd) and a chat client in front of claude-agent-sdk against the fake model: each turn gets
/// the model's answer to its own prompt.
#[tokio::test]
async fn claude_agent_sdk_behind_the_seed_clients() {
    let _serial = SERIAL.lock().await;
    if !installed("claude-agent-sdk", &["claude-agent-acp"]) {
        return;
    }
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/seed-venv/bin/python");
    if !python.exists() {
        assert!(
            std::env::var_os("SANDWARDEN_REQUIRE_SEED_CLIENTS").is_none(),
            "the seed clients are required but {} is missing: run scripts/install-sdks",
            python.display()
        );
        eprintln!(
            "\n!!!!!!!! SKIPPED: the seed clients are not installed (scripts/install-sdks) !!!!!!!!\n"
        );
        return;
    }
    let rig = Rig::start("claude-agent-sdk", anthropic_env);
    let (status, key) = rig
        .api
        .call("POST", "/v1/api-keys", Some(json!({"tenant": "seed-real"})))
        .await;
    assert_eq!(status, 201, "{key}");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seed/real_agent.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .env("SANDWARDEN_URL", &rig.serve.base)
        .env("SANDWARDEN_KEY", key["key"].as_str().expect("key"))
        .env("SANDWARDEN_HARNESS", "claude-agent-sdk")
        .output();
    let out = tokio::time::timeout(TEST_LIMIT, run)
        .await
        .expect("the seed clients finished in time")
        .expect("run the seed clients");
    assert!(
        out.status.success(),
        "claude-agent-sdk behind the seed clients:\n{}\n{}\nthe model saw: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&rig.model_saw().await, 3000)
    );
}
