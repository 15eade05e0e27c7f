//! Shared helpers: start a real `sandwarden harness` process on 127.0.0.1:0 and talk to it.
#![allow(dead_code)]

pub mod fake_model;
pub mod in_process;
pub mod kube;
pub mod load;
pub mod shell;

use sandwarden_proto::event::{EventType, Part, TurnEvent, TurnRequest};
use sandwarden_proto::harness_client::HarnessClient;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const TOKEN: &str = "test-token-0123456789";

/// The slim `sandwarden-harness` of this build, beside `sandwarden` in the same target dir. It is
/// another package's binary (crates/harness), which cargo builds for `cargo build` and `cargo
/// test` of the workspace but not for `cargo test --test NAME` alone: when it is missing or from
/// other sources (its `--version` is the build id `sandwarden` carries too), it is built here,
/// once per test binary, so `serve` in these tests runs it as it would in production.
pub fn harness_exe() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let sandwarden = std::path::Path::new(env!("CARGO_BIN_EXE_sandwarden"));
            let harness = sandwarden.with_file_name("sandwarden-harness");
            let version = |exe: &std::path::Path| {
                Command::new(exe).arg("--version").output().ok().map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .last()
                        .map(String::from)
                })
            };
            if version(&harness).flatten() != version(sandwarden).flatten() {
                build_workspace_bin("sandwarden-harness", "sandwarden-harness");
            }
            harness
        })
        .clone()
}

/// `sandwarden-fake-model` (crates/testkit) of this build, beside `sandwarden`. `cargo test` of
/// the workspace builds it; `cargo test --test NAME` alone does not, so it is built here, once per
/// test binary, when it is missing or older than the test kit's sources. (Building it with `-p`
/// when it is up to date is not free: cargo then resolves the package's features alone and
/// rebuilds its dependencies, a minute on 2 cores.)
#[allow(dead_code)]
pub fn fake_model_exe() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::path::Path::new(env!("CARGO_BIN_EXE_sandwarden"))
                .with_file_name("sandwarden-fake-model");
            let built = std::fs::metadata(&exe).and_then(|m| m.modified()).ok();
            let sources = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/testkit");
            if built.is_none_or(|b| newest_change(&sources).is_some_and(|s| s > b)) {
                build_workspace_bin("sandwarden-testkit", "sandwarden-fake-model");
            }
            exe
        })
        .clone()
}

/// The latest modification time of a file under `dir`.
#[allow(dead_code)]
fn newest_change(dir: &std::path::Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_change(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(time);
    }
    newest
}

/// `cargo build -p PACKAGE --bin BIN` in the profile `sandwarden` was built in.
fn build_workspace_bin(package: &str, bin: &str) {
    let sandwarden = std::path::Path::new(env!("CARGO_BIN_EXE_sandwarden"));
    let release = sandwarden
        .parent()
        .and_then(|d| d.file_name())
        .is_some_and(|d| d == "release");
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build.args(["build", "-p", package, "--bin", bin]);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("run cargo build -p {package}: {e}"));
    assert!(status.success(), "cargo build -p {package} failed");
}

/// Spawns `cmd` (stdout piped) and reads the `{"listening": ADDR}` line every sandwarden server
/// prints first; returns the child and ADDR.
pub fn spawn_listening(cmd: &mut Command, what: &str) -> (Child, String) {
    let (child, line) = spawn_listening_line(cmd, what);
    let addr = line["listening"]
        .as_str()
        .expect("listening address")
        .to_string();
    (child, addr)
}

/// `spawn_listening`, returning the whole listen line.
pub fn spawn_listening_line(cmd: &mut Command, what: &str) -> (Child, serde_json::Value) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listen line");
    let v: serde_json::Value = serde_json::from_str(&line).expect("listen line is JSON");
    (child, v)
}

pub struct Harness {
    child: Child,
    pub addr: String,
    pub client: HarnessClient,
    pub workdir: tempfile::TempDir,
}

impl Harness {
    /// Starts `sandwarden harness` with `args` (plus listen, token and workdir).
    pub fn start(args: &[&str]) -> Harness {
        let workdir = tempfile::tempdir().expect("tempdir");
        let (child, addr) = spawn_listening(
            Command::new(env!("CARGO_BIN_EXE_sandwarden"))
                .arg("harness")
                .args(["--listen", "127.0.0.1:0"])
                .args(["--workdir", workdir.path().to_str().expect("utf8 path")])
                .args(args)
                .env("SANDWARDEN_TOKEN", TOKEN)
                .env("SANDWARDEN_LOG", "warn"),
            "sandwarden harness",
        );
        let client = HarnessClient::new(format!("http://{addr}"), TOKEN);
        Harness {
            child,
            addr,
            client,
            workdir,
        }
    }

    pub fn api(extra: &[&str]) -> Harness {
        let mut args = vec!["--kind", "api", "--agent", "sandwarden echo-agent"];
        args.extend_from_slice(extra);
        Harness::start(&args)
    }

    pub fn tui(command: &str, extra: &[&str]) -> Harness {
        let mut args = vec!["--kind", "tui", "--command", command];
        args.extend_from_slice(extra);
        Harness::start(&args)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (bounded) until health reports `phase`.
    pub async fn wait_phase(&self, phase: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        for _ in 0..200 {
            if let Ok(h) = self.client.health().await {
                last = serde_json::to_value(&h).expect("health json");
                if last["phase"] == phase {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("health never reached {phase}; last: {last}");
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("harness did not exit within 5 s of SIGTERM");
    }
}

/// SIGTERM, a bounded wait (2 s), then SIGKILL.
pub fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id() as i32, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Harness {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

pub fn alive(pid: i32) -> bool {
    sandwarden::procfs::alive(i64::from(pid))
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    sandwarden::procfs::rss_kib(pid as u32)
}

pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

/// Direct children of a process, from /proc.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    out
}

pub fn text_turn(text: &str) -> TurnRequest {
    TurnRequest {
        turn_id: None,
        parts: vec![Part::Text { text: text.into() }],
        timeout_s: None,
        options: Default::default(),
    }
}

pub fn texts(events: &[TurnEvent]) -> String {
    events
        .iter()
        .filter(|e| e.kind == EventType::Text)
        .filter_map(|e| e.data["text"].as_str())
        .collect()
}

pub fn kinds(events: &[TurnEvent]) -> Vec<EventType> {
    events.iter().map(|e| e.kind).collect()
}

pub async fn post_json(url: &str, token: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

pub const ADMIN_KEY: &str = "admin-key-for-tests-0123456789";

/// A real `sandwarden serve` on 127.0.0.1:0 with its own data dir.
pub struct Serve {
    child: Child,
    pub base: String,
    /// `http://` and the probes' own address, when serve was given `--probe-listen`.
    pub probes: Option<String>,
    pub data: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Serve {
    /// Webhooks may target this machine (the tests' receivers listen on 127.0.0.1).
    pub fn start(extra: &[&str]) -> Serve {
        Serve::in_temp_dir(extra, true)
    }

    /// As an operator would run it: private webhook targets refused.
    pub fn start_strict(extra: &[&str]) -> Serve {
        Serve::in_temp_dir(extra, false)
    }

    fn in_temp_dir(extra: &[&str], allow_private: bool) -> Serve {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().to_path_buf();
        let mut s = Serve::launch(&data, extra, allow_private);
        s._dir = Some(dir);
        s
    }

    /// In a fresh temp dir (owned, its sandboxes stopped on drop), with extra environment.
    pub fn start_with_env(extra: &[&str], env: &[(&str, String)]) -> Serve {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().to_path_buf();
        let mut s = Serve::launch_with_env(&data, extra, true, env);
        s._dir = Some(dir);
        s
    }

    /// Starts on an existing data dir (a restart); the caller keeps the dir alive.
    pub fn start_in(data: &std::path::Path, extra: &[&str]) -> Serve {
        Serve::launch(data, extra, true)
    }

    /// Like `start_in`, with extra environment for `serve` and its sandboxes (e.g. PATH).
    pub fn start_in_with_env(
        data: &std::path::Path,
        extra: &[&str],
        env: &[(&str, String)],
    ) -> Serve {
        Serve::launch_with_env(data, extra, true, env)
    }

    fn launch(data: &std::path::Path, extra: &[&str], allow_private: bool) -> Serve {
        Serve::launch_with_env(data, extra, allow_private, &[])
    }

    fn launch_with_env(
        data: &std::path::Path,
        extra: &[&str],
        allow_private: bool,
        env: &[(&str, String)],
    ) -> Serve {
        harness_exe();
        let templates = data.join("templates.json");
        if !templates.exists() {
            std::fs::write(
                &templates,
                r#"[{"name":"sh","kind":"tui","command":"bash --noprofile --norc","pool":0},
                    {"name":"echo-cold","kind":"api","command":"sandwarden echo-agent","pool":0}]"#,
            )
            .expect("templates");
        }
        let (child, line) = spawn_listening_line(
            Command::new(env!("CARGO_BIN_EXE_sandwarden"))
                .arg("serve")
                .args(["--listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(data)
                .arg("--templates")
                .arg(&templates)
                .args(allow_private.then_some("--allow-private-webhooks"))
                .args(extra)
                .env("SANDWARDEN_API_KEY", ADMIN_KEY)
                .env("SANDWARDEN_LOG", "warn")
                // The suites' load and fault loops send hundreds of requests a second with one
                // key by design; the request rate is tested on its own (tenancy.rs), with the
                // flags, which win over this.
                .env("SANDWARDEN_KEY_REQUEST_RATE", "0")
                .envs(env.iter().map(|(k, v)| (k, v))),
            "sandwarden serve",
        );
        let base = format!("http://{}", line["listening"].as_str().expect("address"));
        Serve {
            child,
            base,
            probes: line["probes"].as_str().map(|a| format!("http://{a}")),
            data: data.to_path_buf(),
            _dir: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM and wait (bounded).
    pub fn stop(&mut self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGTERM);
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL: a crash, with no chance to finish anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn client(&self) -> Api {
        Api {
            base: self.base.clone(),
            key: ADMIN_KEY.to_string(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
        if self._dir.is_some() {
            kill_sandboxes_under(&self.data);
        }
    }
}

/// Kills the sandboxes under a data dir when dropped, so a failing test leaves none behind
/// (`Serve::start_in` leaves them, as a restart needs).
pub struct Sweep(pub std::path::PathBuf);

impl Drop for Sweep {
    fn drop(&mut self) {
        kill_sandboxes_under(&self.0);
    }
}

/// Sandboxes outlive `serve` by design; tests stop the ones under their data dir.
pub fn kill_sandboxes_under(data: &std::path::Path) {
    sandwarden::procfs::kill_groups_matching(&["harness --listen", &data.to_string_lossy()]);
}

/// A small JSON client for the public API.
pub struct Api {
    pub base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    /// A new key of `tenant` (made with this admin key): a client with it, and the key's record
    /// (`id`, `key`, …).
    pub async fn tenant_key(&self, tenant: &str) -> (Api, serde_json::Value) {
        let (status, made) = self
            .call(
                "POST",
                "/v1/api-keys",
                Some(serde_json::json!({ "tenant": tenant })),
            )
            .await;
        assert_eq!(status, 201, "{made}");
        (self.with_key(made["key"].as_str().expect("key")), made)
    }

    pub fn with_key(&self, key: &str) -> Api {
        Api {
            base: self.base.clone(),
            key: key.to_string(),
            http: self.http.clone(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    pub async fn create(&self, harness: &str) -> serde_json::Value {
        let (status, s) = self
            .call(
                "POST",
                "/v1/sessions",
                Some(serde_json::json!({"harness": harness})),
            )
            .await;
        assert_eq!(status, 201, "{s}");
        s
    }

    /// Creates a session and waits until it is ready.
    pub async fn ready(&self, harness: &str) -> String {
        let s = self.create(harness).await;
        let id = s["id"].as_str().expect("id").to_string();
        let (_, s) = self
            .call(
                "GET",
                &format!("/v1/sessions/{id}?wait=true&timeout=30"),
                None,
            )
            .await;
        assert_eq!(s["status"], "ready", "{s}");
        id
    }

    /// Attaches to a terminal session through a fresh `tty_url`; returns the URL too.
    pub async fn attach_tty(&self, id: &str) -> (String, shell::Ws) {
        let (_, s) = self.call("GET", &format!("/v1/sessions/{id}"), None).await;
        let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();
        let (ws, _) = tokio_tungstenite::connect_async(&tty_url)
            .await
            .expect("attach");
        (tty_url, ws)
    }

    /// A request with a raw body (empty for none), answered with its status and raw body.
    pub async fn call_bytes(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let resp = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
            .body(body)
            .send()
            .await
            .expect("sent");
        let status = resp.status().as_u16();
        (status, resp.bytes().await.expect("body").to_vec())
    }

    pub async fn say(&self, id: &str, text: &str) -> (u16, serde_json::Value) {
        self.call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(serde_json::json!({"text": text})),
        )
        .await
    }

    /// Sends a message in async mode; returns the turn id.
    pub async fn post_async(&self, id: &str, body: serde_json::Value) -> String {
        let mut body = body;
        body["async"] = serde_json::Value::Bool(true);
        let (status, accepted) = self
            .call("POST", &format!("/v1/sessions/{id}/messages"), Some(body))
            .await;
        assert_eq!(status, 202, "{accepted}");
        accepted["turn_id"].as_str().expect("turn id").to_string()
    }

    /// Long-polls a turn until it ends (bounded by the server's 30 s).
    pub async fn finished_turn(&self, id: &str, turn_id: &str) -> serde_json::Value {
        self.call(
            "GET",
            &format!("/v1/sessions/{id}/turns/{turn_id}?wait=true&timeout=30"),
            None,
        )
        .await
        .1
    }

    /// The texts of a session's durable history, in order.
    pub async fn history_texts(&self, id: &str) -> Vec<String> {
        self.history(id, 100)
            .await
            .iter()
            .filter_map(|m| m["text"].as_str().map(String::from))
            .collect()
    }

    /// A session's whole history, read page by page (`limit` messages a page at most).
    pub async fn history(&self, id: &str, limit: usize) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let path = match &cursor {
                None => format!("/v1/sessions/{id}/messages?limit={limit}"),
                Some(c) => format!("/v1/sessions/{id}/messages?limit={limit}&cursor={c}"),
            };
            let (status, page) = self.call("GET", &path, None).await;
            assert_eq!(status, 200, "{page}");
            out.extend(
                page["messages"]
                    .as_array()
                    .expect("messages")
                    .iter()
                    .cloned(),
            );
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
        panic!("the history of {id} did not end");
    }

    /// Waits (bounded, 60 s: cold starts under load are slow) until the session has `status`.
    pub async fn wait_status(&self, id: &str, status: &str) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        for _ in 0..1200 {
            let (_, s) = self.call("GET", &format!("/v1/sessions/{id}"), None).await;
            if s["status"] == status {
                return s;
            }
            last = s;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("session {id} never became {status}: {last}");
    }

    /// An SSE request; returns the parsed events (id, type, data) until the stream ends or `stop`.
    pub async fn sse(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
        last_event_id: Option<&str>,
        stop: usize,
    ) -> Vec<(String, String, serde_json::Value)> {
        use eventsource_stream::Eventsource;
        use futures::StreamExt;
        let mut req = match body {
            Some(b) => self.http.post(format!("{}{path}", self.base)).json(&b),
            None => self
                .http
                .get(format!("{}{path}", self.base))
                .header("accept", "text/event-stream"),
        }
        .bearer_auth(&self.key);
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.expect("sse request");
        assert_eq!(resp.status().as_u16(), 200, "sse status");
        let mut stream = resp.bytes_stream().eventsource();
        let mut out = Vec::new();
        while out.len() < stop {
            match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
                Ok(Some(Ok(e))) => out.push((
                    e.id,
                    e.event,
                    serde_json::from_str(&e.data).unwrap_or_default(),
                )),
                Ok(_) => break,
                Err(_) => panic!("SSE stalled after {} events", out.len()),
            }
        }
        out
    }
}

/// The PostgreSQL server for tests (`SANDWARDEN_TEST_POSTGRES`, from scripts/start-postgres);
/// `None` when unset (the caller skips, saying so), a failure with `SANDWARDEN_REQUIRE_POSTGRES=1`.
pub fn postgres_server() -> Option<String> {
    match std::env::var("SANDWARDEN_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("SANDWARDEN_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "SANDWARDEN_REQUIRE_POSTGRES=1 but SANDWARDEN_TEST_POSTGRES is unset: run scripts/start-postgres"
            );
            eprintln!(
                "SKIPPED: SANDWARDEN_TEST_POSTGRES is unset (eval \"$(scripts/start-postgres)\" to run)"
            );
            None
        }
    }
}

/// A fresh, empty database of its own on the test PostgreSQL server (tests run in parallel).
pub async fn postgres_database() -> Option<String> {
    let server = postgres_server()?;
    Some(
        sandwarden::store::Store::scratch_database(&server)
            .await
            .expect("creating a scratch database"),
    )
}

/// Serves `app` (a webhook receiver) on 127.0.0.1:0 until the test ends; returns its `/hook` URL.
pub async fn serve_hook(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hook")
}

/// A PostgreSQL cluster of this test's own (scripts/start-postgres on another port), so stopping
/// it does not disturb the other tests.
pub struct OwnCluster {
    port: u16,
    dir: tempfile::TempDir,
}

impl OwnCluster {
    /// On a free port, in a fresh directory; `None` (skipped, saying so) without a test
    /// PostgreSQL (see `postgres_server`). Not started yet.
    pub fn new() -> Option<OwnCluster> {
        postgres_server()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("addr")
            .port();
        let dir = tempfile::tempdir().expect("tempdir");
        // As root the cluster's owner (postgres) must reach its directory.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .expect("chmod");
        Some(OwnCluster { port, dir })
    }

    /// Runs scripts/start-postgres for this cluster with `args` (`stop`); returns its output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/start-postgres"
        ))
        .args(args)
        .env("SANDWARDEN_TEST_POSTGRES_PORT", self.port.to_string())
        .env("SANDWARDEN_TEST_POSTGRES_DIR", self.dir.path().join("pg"))
        .output()
        .expect("scripts/start-postgres");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Starts (or restarts) the cluster; returns its server URL.
    pub fn start(&self) -> String {
        let line = self.ctl(&[]);
        line.trim()
            .trim_start_matches("export SANDWARDEN_TEST_POSTGRES=")
            .to_string()
    }
}

impl Drop for OwnCluster {
    /// Stops the cluster, also when a test fails while it runs.
    fn drop(&mut self) {
        let _ = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/start-postgres"
        ))
        .arg("stop")
        .env("SANDWARDEN_TEST_POSTGRES_PORT", self.port.to_string())
        .env("SANDWARDEN_TEST_POSTGRES_DIR", self.dir.path().join("pg"))
        .output();
    }
}

/// Whether bubblewrap works here; when it must (`SANDWARDEN_REQUIRE_BWRAP=1`, set by
/// scripts/test after installing it), its absence fails the test instead of skipping it.
pub fn bwrap_works() -> bool {
    let works = Command::new("bwrap")
        .args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"])
        .args(["--unshare-pid", "--", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        assert!(
            std::env::var("SANDWARDEN_REQUIRE_BWRAP").as_deref() != Ok("1"),
            "bubblewrap is required (SANDWARDEN_REQUIRE_BWRAP=1) but `bwrap` does not work here"
        );
        eprintln!(
            "\n*** SKIPPED: bubblewrap (`bwrap`) is not installed or cannot create sandboxes here; install the bubblewrap package to run the isolation tests ***\n"
        );
    }
    works
}

/// Asserts `resp` is `503` with `Retry-After: 1` and problem type `kind`; returns the problem.
#[allow(dead_code)]
pub async fn expect_retry_later(resp: reqwest::Response, kind: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let problem: serde_json::Value = resp.json().await.expect("problem");
    assert_eq!(problem["type"], kind, "{problem}");
    problem
}

/// A history page's messages as `role: text` lines, in order.
pub fn role_texts(page: &serde_json::Value) -> Vec<String> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| {
            format!(
                "{}: {}",
                m["role"].as_str().unwrap_or(""),
                m["text"].as_str().unwrap_or("")
            )
        })
        .collect()
}
