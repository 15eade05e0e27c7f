//! The CLI client against a real `sandwarden serve`: the commands a person types.

use crate::common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn cli(serve: &Serve, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .args(args)
        .env("SANDWARDEN_URL", &serve.base)
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI");
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .args(["chat", &echo])
        .env("SANDWARDEN_URL", &serve.base)
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .args(["attach", &sh])
        .env("SANDWARDEN_URL", &serve.base)
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("[detached]"));
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
