//! Local sandboxes under bubblewrap (`serve --isolation bwrap`), through the public API: the agent
//! runs, the terminal works, writes outside the sandbox's directory fail, and deleting the
//! session leaves no process behind.

use crate::common::*;
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Types `line` into the terminal and returns the output up to the end of the line that follows
/// the echo of `marker` (write markers split by quotes, `out""side=`, so the command's echo does not match).
async fn run<S>(ws: &mut S, line: &str, marker: &str) -> String
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
        + futures::Sink<Message>
        + Unpin,
{
    let _ = ws
        .send(Message::Binary(format!("{line}\n").into_bytes().into()))
        .await;
    let mut out = String::new();
    let done = |out: &str| {
        out.rsplit_once(marker)
            .is_some_and(|(_, rest)| rest.contains('\n') || rest.contains('\r'))
    };
    while !done(&out) {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal ended early: {other:?} after {out:?}"),
        }
    }
    out
}

fn processes_under(data: &std::path::Path) -> usize {
    let needle = data.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .map(|procs| {
            procs
                .flatten()
                .filter(|p| p.file_name().to_string_lossy().parse::<i32>().is_ok())
                .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
                .filter(|c| String::from_utf8_lossy(c).contains(&needle))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn sandboxes_under_bubblewrap_are_confined_and_cleaned_up() {
    if !bwrap_works() {
        return;
    }
    let serve = Serve::start(&["--isolation", "bwrap"]);
    let api = serve.client();

    // An agent works as usual.
    let echo = api.ready("echo").await;
    let (status, reply) = api.say(&echo, "inside a bubble").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("inside a bubble"))
    );

    let sh = api.ready("sh").await;
    let (_, s) = api.call("GET", &format!("/v1/sessions/{sh}"), None).await;
    let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();
    let (mut ws, _) = tokio_tungstenite::connect_async(&tty_url)
        .await
        .expect("attach");
    let out = run(
        &mut ws,
        "touch /sandwarden-escape 2>/dev/null; echo out\"\"side=$?",
        "outside=",
    )
    .await;
    assert!(
        out.contains("outside=1"),
        "writing outside the sandbox must fail: {out:?}"
    );
    assert!(!std::path::Path::new("/sandwarden-escape").exists());
    let out = run(&mut ws, "touch ./mine; echo in\"\"side=$?", "inside=").await;
    assert!(out.contains("inside=0"), "{out:?}");
    let out = run(&mut ws, "echo pid\"\"1=$(cat /proc/1/comm)", "pid1=").await;
    assert!(out.contains("pid1=bwrap"), "its own PID namespace: {out:?}");
    drop(ws);
    // The shell's sandbox is the directory holding the file it wrote.
    let shell_dir = std::fs::read_dir(serve.data.join("sandboxes"))
        .expect("sandboxes dir")
        .flatten()
        .map(|d| d.path())
        .find(|d| d.join("mine").exists())
        .expect("the shell's sandbox directory");
    assert!(processes_under(&shell_dir) > 0);

    // Deleting the session stops bwrap and everything inside it.
    let (status, _) = api
        .call("DELETE", &format!("/v1/sessions/{sh}"), None)
        .await;
    assert!(status == 200 || status == 204, "delete: {status}");
    let mut left = usize::MAX;
    for _ in 0..200 {
        left = processes_under(&shell_dir);
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(left, 0, "no process of the deleted sandbox is left");
}

#[test]
fn asking_for_bubblewrap_where_it_cannot_run_refuses_to_start_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .args(["serve", "--listen", "127.0.0.1:0", "--isolation", "bwrap"])
        .arg("--data-dir")
        .arg(&data)
        .env("PATH", dir.path()) // no bwrap on it
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bubblewrap") && err.contains("--isolation none"),
        "{err}"
    );
    assert!(!data.exists(), "a refused start creates nothing");
}
