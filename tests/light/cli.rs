//! The CLI client against a real `sandwarden serve`: the commands a person types.

use crate::common::*;
use std::io::Write;
use std::process::{Command, Stdio};

/// The CLI with `args`, pointed at `serve` with the admin key; stdin empty.
fn cli_command(serve: &Serve, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sandwarden"));
    command
        .args(args)
        .env("SANDWARDEN_URL", &serve.base)
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
        .stdin(Stdio::null());
    command
}

fn cli(serve: &Serve, args: &[&str]) -> (bool, String, String) {
    let out = cli_command(serve, args).output().expect("run the CLI");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn session_commands_and_send() {
    let serve = Serve::start(&[]);
    let (ok, out, err) = tokio::task::block_in_place(|| {
        cli(
            &serve,
            &["session", "create", "echo", "--title", "from-cli", "--wait"],
        )
    });
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect("session JSON");
    assert_eq!(s["status"], "ready");
    let id = s["id"].as_str().expect("id").to_string();

    let (ok, out, err) =
        tokio::task::block_in_place(|| cli(&serve, &["send", &id, "/tool streamed reply"]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "streamed reply");
    assert!(err.contains("[tool]"), "tool activity on stderr: {err}");

    let (ok, out, _) = tokio::task::block_in_place(|| cli(&serve, &["session", "list"]));
    assert!(ok && out.contains(&id) && out.contains("from-cli"), "{out}");

    let (ok, out, _) = tokio::task::block_in_place(|| cli(&serve, &["session", "get", &id]));
    assert!(ok && out.contains("\"ready\""), "{out}");

    let (ok, _, err) = tokio::task::block_in_place(|| cli(&serve, &["send", &id, "/fail nope"]));
    assert!(
        !ok && err.contains("agent_error"),
        "a failed turn exits non-zero: {err}"
    );

    let (ok, out, _) = tokio::task::block_in_place(|| cli(&serve, &["session", "delete", &id]));
    assert!(ok && out.contains("\"deleted\""), "{out}");

    let (ok, _, err) =
        tokio::task::block_in_place(|| cli(&serve, &["send", "no-such-session", "hi"]));
    assert!(!ok && err.contains("404"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_and_attach_over_pipes() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let echo = api.ready("echo").await;
    let mut child = cli_command(&serve, &["chat", &echo])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"first line\nsecond line\n")
        .expect("write");
    let out = tokio::task::block_in_place(|| child.wait_with_output()).expect("chat ends at EOF");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("first line") && stdout.contains("second line"),
        "{stdout}"
    );

    let sh = api.ready("sh").await;
    let mut child = cli_command(&serve, &["attach", &sh])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("attach");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("lock").extend_from_slice(&buf[..n]);
        }
    });
    stdin.write_all(b"echo attached-$((7*6))\n").expect("write");
    let mut arrived = false;
    for _ in 0..400 {
        if String::from_utf8_lossy(&seen.lock().expect("lock")).contains("attached-42") {
            arrived = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(
        arrived,
        "output arrived: {:?}",
        String::from_utf8_lossy(&seen.lock().expect("lock"))
    );
    stdin
        .write_all(&[sandwarden::client::DETACH_KEY])
        .expect("detach");
    let out =
        tokio::task::block_in_place(|| child.wait_with_output()).expect("attach ends on Ctrl-]");
    let _ = reader.join();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("[detached"));
    // The program kept running after the detach.
    let s = api.wait_status(&sh, "ready").await;
    assert_eq!(s["kind"], "tui");
}

/// `serve` refuses bad store settings before it starts anything, saying what to fix and never
/// echoing a secret.
#[test]
fn serve_refuses_a_malformed_secret_or_store_url_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .envs(env.iter().copied())
            .env("SANDWARDEN_API_KEY", ADMIN_KEY)
            .stdin(Stdio::null())
            .output()
            .expect("run serve");
        assert!(!out.status.success(), "serve must refuse {env:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&[("SANDWARDEN_SECRET", "not-hex-and-short-hunter2")]);
    assert!(
        err.contains("SANDWARDEN_SECRET must be 64 hex characters"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the value is not repeated: {err}");
    let err = run(&[("SANDWARDEN_STORE", "mysql://u:hunter2@db/sw")]);
    assert!(err.contains("neither a postgres:// URL"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the password is not repeated: {err}"
    );
}

/// `GET /v1/templates` and `sandwarden templates`: what a session can be created from, for any
/// tenant, without the operator's commands, environment or container settings.
#[tokio::test(flavor = "multi_thread")]
async fn templates_are_listed_for_clients() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let tenant = crate::tenancy::tenant_client(&api, "templates-reader").await;
    let (status, list) = tenant.call("GET", "/v1/templates", None).await;
    assert_eq!(status, 200, "{list}");
    let templates = list["templates"].as_array().cloned().unwrap_or_default();
    let kind_of = |name: &str| {
        templates
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["kind"].clone())
    };
    assert_eq!(kind_of("echo"), Some(serde_json::json!("api")), "{list}");
    assert_eq!(kind_of("sh"), Some(serde_json::json!("tui")), "{list}");
    for t in &templates {
        for private in ["command", "env", "container"] {
            assert!(t.get(private).is_none(), "{private} is the operator's: {t}");
        }
    }
    let (status, _) = api
        .with_key("sk-not-a-key")
        .call("GET", "/v1/templates", None)
        .await;
    assert_eq!(status, 401);

    let (ok, out, err) = tokio::task::block_in_place(|| cli(&serve, &["templates"]));
    assert!(ok, "{err}");
    let echo = out
        .lines()
        .find(|l| l.starts_with("echo\t"))
        .unwrap_or_else(|| panic!("echo listed: {out}"));
    assert!(echo.starts_with("echo\tapi\t"), "{echo}");
    assert!(out.lines().any(|l| l.starts_with("sh\ttui\t")), "{out}");
}

/// A program under a real terminal: a tmux server of its own (its own socket, no user
/// configuration), one window running `sandwarden ARGS` against `serve`, then printing its exit
/// status as `EXIT=N`.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(serve: &Serve, args: &[&str]) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().is_err() {
            assert!(
                std::env::var_os("SANDWARDEN_REQUIRE_TMUX").is_none(),
                "tmux is required for the CLI's terminal tests (scripts/test installs it)"
            );
            eprintln!("SKIPPED: tmux is not installed (apt-get install tmux)");
            return None;
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let socket = format!(
            "sw-cli-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut command = vec![env!("CARGO_BIN_EXE_sandwarden").to_string()];
        command.extend(args.iter().map(|a| format!("'{a}'")));
        let script = format!("{}; echo EXIT=$?; sleep 600", command.join(" "));
        let status = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-x", "160", "-y", "50", "-s", "cli"])
            .args(["-e", &format!("SANDWARDEN_URL={}", serve.base)])
            .args(["-e", &format!("SANDWARDEN_API_KEY={ADMIN_KEY}")])
            .arg(script)
            .status()
            .expect("tmux");
        assert!(status.success());
        Some(Tmux { socket })
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).into()
    }

    /// Types `text` as it is.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "cli", "-l", text]);
    }

    /// Presses keys by tmux's names (`Enter`, `C-c`, …).
    fn press(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "cli"];
        args.extend(keys);
        self.tmux(&args);
    }

    /// The screen and its scrollback, lines joined.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-J", "-S", "-500", "-t", "cli"])
    }

    /// Waits (20 s at most) until the screen shows `needle` `times` times.
    fn wait_for(&self, needle: &str, times: usize) -> String {
        for _ in 0..400 {
            let screen = self.screen();
            if screen.matches(needle).count() >= times {
                return screen;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{needle:?} ×{times} never showed:\n{}", self.screen());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        self.tmux(&["kill-server"]);
    }
}

async fn history_texts(api: &Api, id: &str) -> Vec<String> {
    let (_, page) = api
        .call("GET", &format!("/v1/sessions/{id}/messages"), None)
        .await;
    role_texts(&page)
}

/// `chat` on a real terminal: answers stream back, the agent's questions are answered inline,
/// Ctrl-C cancels the running turn (and a second one leaves), what is typed during a turn is
/// held for the next prompt rather than sent, and a failed turn makes the exit status 1.
#[tokio::test(flavor = "multi_thread")]
async fn chat_on_a_terminal_cancels_approves_and_holds_input() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let Some(t) = tokio::task::block_in_place(|| Tmux::start(&serve, &["chat", &id])) else {
        return;
    };
    tokio::task::block_in_place(|| {
        t.wait_for("Enter sends", 1);
        t.type_text("first words for the chat");
        t.press(&["Enter"]);
        t.wait_for("first words for the chat", 2);
        // Two questions, each answered at the prompt: approved once, then denied.
        t.type_text("/ask may I remove build-7?");
        t.press(&["Enter"]);
        t.wait_for("answer (a/s/d)>", 1);
        // Text typed ahead is no answer: the question goes on waiting.
        t.type_text("deploy it");
        t.press(&["Enter"]);
        t.wait_for("[answer a (approve once)", 1);
        t.type_text("a");
        t.press(&["Enter"]);
        t.wait_for("permission granted (allow-once)", 2);
        t.type_text("/ask may I remove build-8?");
        t.press(&["Enter"]);
        t.wait_for("[approval] may I remove build-8?", 1);
        t.type_text("d");
        t.press(&["Enter"]);
        t.wait_for("permission denied (reject-once)", 2);
        // A slow turn; text typed meanwhile is held; Ctrl-C cancels the turn.
        t.type_text("/slow 400 tick");
        t.press(&["Enter"]);
        t.wait_for("tick 2", 1);
        t.type_text("held while ticking");
        t.press(&["C-c"]);
        t.wait_for("[cancelled]", 1);
        t.wait_for("> held while ticking", 1);
    });
    let texts = history_texts(&api, &id).await;
    assert!(
        !texts.iter().any(|m| m.contains("held while ticking")),
        "held input was sent: {texts:?}"
    );
    let (_, turns) = api
        .call("GET", &format!("/v1/sessions/{id}/turns"), None)
        .await;
    let statuses: Vec<&str> = turns["turns"]
        .as_array()
        .expect("turns")
        .iter()
        .map(|t| t["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        ["completed", "completed", "completed", "cancelled"]
    );
    tokio::task::block_in_place(|| {
        // The held text is the prompt's: Enter sends it now.
        t.press(&["Enter"]);
        t.wait_for("held while ticking", 2);
        t.type_text("/fail on purpose");
        t.press(&["Enter"]);
        t.wait_for("error: the turn failed", 1);
        // Ctrl-C during a turn cancels it; the second leaves at once.
        t.type_text("/slow 400 tock");
        t.press(&["Enter"]);
        t.wait_for("tock 2", 1);
        t.press(&["C-c"]);
        t.wait_for("Ctrl-C again leaves", 1);
        t.press(&["C-c"]);
        let screen = t.wait_for("EXIT=", 1);
        assert!(screen.contains("1 turn(s) failed in this chat"), "{screen}");
        assert!(screen.contains("EXIT=1"), "{screen}");
    });
    let texts = history_texts(&api, &id).await;
    assert!(
        texts.contains(&"user: held while ticking".to_string())
            && texts.contains(&"assistant: held while ticking".to_string()),
        "{texts:?}"
    );
    let s = api.wait_status(&id, "ready").await;
    assert_eq!(
        s["status"], "ready",
        "the leaving chat's turn was cancelled"
    );
}

/// `attach` ends when the terminal program ends, with the program's exit status.
#[tokio::test(flavor = "multi_thread")]
async fn attach_exits_with_the_programs_status() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let sh = api.ready("sh").await;
    let Some(t) = tokio::task::block_in_place(|| Tmux::start(&serve, &["attach", &sh])) else {
        return;
    };
    tokio::task::block_in_place(|| {
        t.wait_for("Ctrl-] detaches", 1);
        t.type_text("echo attached-$((6*7))");
        t.press(&["Enter"]);
        t.wait_for("attached-42", 1);
        t.type_text("exit 7");
        t.press(&["Enter"]);
        let screen = t.wait_for("EXIT=", 1);
        assert!(screen.contains("the program exited: 7"), "{screen}");
        assert!(screen.contains("EXIT=7"), "{screen}");
    });
    let s = api.wait_status(&sh, "dead").await;
    assert_eq!(s["status"], "dead");
}

/// Every CLI failure exits non-zero and says what to do, in CLI verbs, and what was asked of
/// which server.
#[tokio::test(flavor = "multi_thread")]
async fn cli_errors_say_what_to_do() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let echo = api.ready("echo").await;
    let sh = api.ready("sh").await;
    let run = |url: &str, key: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
            .args(args)
            .env("SANDWARDEN_URL", url)
            .env("SANDWARDEN_API_KEY", key)
            .stdin(Stdio::null())
            .output()
            .expect("run the CLI");
        assert!(!out.status.success(), "{args:?} exited 0");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let base = serve.base.clone();
    let host = base.trim_start_matches("http://").to_string();
    let cases: Vec<(String, &str, Vec<&str>, Vec<String>)> = vec![
        (
            format!("{base}/v1"),
            ADMIN_KEY,
            vec!["templates"],
            vec![
                "ends in /v1".into(),
                format!("give the server's root, {base}"),
            ],
        ),
        (
            host.clone(),
            ADMIN_KEY,
            vec!["templates"],
            vec!["has no scheme".into(), format!("http://{host}")],
        ),
        (
            "http://127.0.0.1:9".into(),
            ADMIN_KEY,
            vec!["session", "list"],
            vec![
                "cannot reach sandwarden at http://127.0.0.1:9".into(),
                "SANDWARDEN_URL".into(),
            ],
        ),
        (
            base.clone(),
            "not-a-key-of-this-server",
            vec!["session", "list"],
            vec![
                "the API key was refused".into(),
                format!("GET {base}/v1/sessions"),
            ],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["send", &sh, "hello"],
            vec![
                format!("`sandwarden attach {sh}`"),
                "409 tui_session".into(),
            ],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["chat", &sh],
            vec![format!("`sandwarden attach {sh}`")],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["attach", &echo],
            vec![
                format!("`sandwarden chat {echo}`"),
                "409 not_a_terminal".into(),
            ],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["cancel", &echo],
            vec!["no turn is running".into()],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["send", "no-such-session", "hi"],
            vec![
                "`sandwarden session list`".into(),
                "404 session_not_found".into(),
            ],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["approve", &echo, "perm-none"],
            vec![
                "not waiting for an answer".into(),
                format!("`sandwarden events {echo}`"),
            ],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["session", "create", "no-such-template"],
            vec!["`sandwarden templates`".into()],
        ),
        (
            base.clone(),
            ADMIN_KEY,
            vec!["send", &echo, "/fail failing on purpose"],
            vec!["failing on purpose".into()],
        ),
    ];
    for (url, key, args, wanted) in cases {
        let err = tokio::task::block_in_place(|| run(&url, key, &args));
        for w in wanted {
            assert!(
                err.contains(&w),
                "{args:?} with {url}: {w:?} not in {err:?}"
            );
        }
        assert!(!err.contains(ADMIN_KEY), "the key was printed: {err}");
    }
}

/// The API's verbs in the CLI: cancel, approve and deny (with the request id `send` shows),
/// history, events (and --follow), keys and usage.
#[tokio::test(flavor = "multi_thread")]
async fn every_api_verb_has_a_cli_verb() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let run = |args: &[&str]| tokio::task::block_in_place(|| cli(&serve, args));

    // A question, answered with `approve` using the request id `send` printed.
    let mut asking = cli_command(&serve, &["send", &id, "/ask may I touch cli-1?"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("send");
    let stderr = asking.stderr.take().expect("stderr");
    let (found, question) = std::sync::mpsc::channel();
    // Reads send's stderr to its end (a closed pipe would fail its later writes).
    let reader = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let line = line.expect("stderr");
            if let Some(rest) = line.split("`sandwarden approve ").nth(1) {
                let words: Vec<String> = rest.split_whitespace().map(String::from).collect();
                let _ = found.send(words);
            }
        }
    });
    let words = tokio::task::block_in_place(|| {
        question
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("send shows the question")
    });
    assert_eq!(words[0], id);
    let request_id = words[1].trim_end_matches('`').to_string();
    let (ok, out, err) = run(&["approve", &id, &request_id]);
    assert!(ok && out.contains("approved"), "{out} {err}");
    let out = tokio::task::block_in_place(|| asking.wait_with_output()).expect("send ends");
    let _ = reader.join();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("permission granted (allow-once)"));

    // Denied the same way.
    let asking = cli_command(&serve, &["send", &id, "/ask may I touch cli-2?"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("send");
    // The question waits: `GET …/inputs` lists it, and `deny` with no request id answers it.
    let waiting = loop {
        let (status, waiting) = api
            .call("GET", &format!("/v1/sessions/{id}/inputs"), None)
            .await;
        assert_eq!(status, 200, "{waiting}");
        if !waiting["inputs"].as_array().expect("inputs").is_empty() {
            break waiting;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        waiting["inputs"].as_array().map(Vec::len),
        Some(1),
        "{waiting}"
    );
    assert_eq!(
        waiting["inputs"][0]["data"]["tool"]["title"], "may I touch cli-2?",
        "{waiting}"
    );
    let request_id = waiting["inputs"][0]["data"]["request_id"]
        .as_str()
        .expect("request id")
        .to_string();
    let (ok, out, err) = run(&["deny", &id]);
    assert!(
        ok && out.contains(&format!("{request_id}: denied")),
        "{out} {err}"
    );
    let out = tokio::task::block_in_place(|| asking.wait_with_output()).expect("send ends");
    assert!(String::from_utf8_lossy(&out.stdout).contains("permission denied (reject-once)"));
    let (ok, _, err) = run(&["approve", &id]);
    assert!(!ok && err.contains("no question waits"), "{err}");

    // `cancel` stops a running turn.
    let (status, started) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(serde_json::json!({"text": "/slow 400 cli-tick", "async": true})),
        )
        .await;
    assert_eq!(status, 202, "{started}");
    let turn = started["turn_id"].as_str().expect("turn").to_string();
    let (ok, out, err) = run(&["cancel", &id]);
    assert!(ok && out.contains(&turn), "{out} {err}");
    let (_, t) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}/turns/{turn}?wait=true&timeout=30"),
            None,
        )
        .await;
    assert_eq!(t["status"], "cancelled", "{t}");

    // History and events.
    let (ok, out, _) = run(&["history", &id]);
    assert!(ok, "{out}");
    assert!(
        out.contains("user: /ask may I touch cli-1?")
            && out.contains("assistant: permission denied (reject-once)"),
        "{out}"
    );
    let (ok, out, _) = run(&["events", &id, "--since", "2"]);
    assert!(ok);
    let seqs: Vec<i64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("a JSON event")["seq"]
                .as_i64()
                .expect("seq")
        })
        .collect();
    assert_eq!(seqs.first(), Some(&3), "{out}");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap-free: {seqs:?}"
    );
    let last = *seqs.last().expect("events");
    let mut follow = cli_command(
        &serve,
        &["events", &id, "--follow", "--since", &last.to_string()],
    )
    .stdout(Stdio::piped())
    .spawn()
    .expect("events --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (status, _) = api.say(&id, "followed-words-9").await;
    assert_eq!(status, 200);
    let seen = tokio::task::block_in_place(|| {
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("stdout");
            let done = line.contains("\"done\"");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        seen.iter().any(|l| l.contains("followed-words-9")),
        "{seen:?}"
    );
    let first: serde_json::Value = serde_json::from_str(&seen[0]).expect("JSON");
    assert_eq!(first["seq"], last + 1, "--follow starts after --since");

    // Keys and usage.
    let (ok, key, err) = run(&["keys", "create", "--tenant", "cli-tenant"]);
    assert!(ok && key.trim().starts_with("sk_sw_"), "{key} {err}");
    let (ok, out, _) = run(&["keys", "list", "--tenant", "cli-tenant"]);
    let key_id = out
        .lines()
        .nth(1)
        .and_then(|l| l.split('\t').next())
        .expect("a key")
        .to_string();
    assert!(ok && key_id.starts_with("key_"), "{out}");
    assert!(!out.contains(key.trim()), "a listing never shows a key");
    let (ok, out, _) = run(&["keys", "revoke", &key_id]);
    assert!(ok && out.contains("revoked"), "{out}");
    let (ok, out, _) = run(&["usage"]);
    assert!(ok, "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("default\t"))
        .expect("the default tenant's row");
    let turns: i64 = row
        .split('\t')
        .nth(2)
        .and_then(|n| n.parse().ok())
        .expect("turns");
    assert!(turns >= 4, "{row}");
}

/// Every argument of every verb says what it is in `--help`.
#[test]
fn every_argument_has_help_text() {
    use clap::CommandFactory;
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() {
                continue;
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(&sandwarden::cli::Cli::command(), "sandwarden", &mut missing);
    assert!(
        missing.is_empty(),
        "arguments without help text: {missing:?}"
    );
}

/// `session create --wait` shows its progress on a line of its own and ends it.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_for_a_sandbox_ends_its_progress_line() {
    let serve = Serve::start(&["--pool", "echo=0"]);
    let (ok, out, err) =
        tokio::task::block_in_place(|| cli(&serve, &["session", "create", "echo", "--wait"]));
    assert!(ok, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect("session JSON");
    assert_eq!(s["status"], "ready");
    assert!(err.starts_with("waiting for the sandbox."), "{err:?}");
    assert!(err.ends_with(".\n"), "the progress line is ended: {err:?}");
}
