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
        std::env::var_os("SANDWARDEN_REQUIRE_SDKS").is_none(),
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
    let api = serve.client();
    let mut live = Vec::new();
    for _ in 0..50 {
        let (_, page) = api
            .call("GET", "/v1/sessions?tenant=seed-stewrd&limit=100", None)
            .await;
        live = page["sessions"]
            .as_array()
            .expect("sessions")
            .iter()
            .filter(|s| s["status"] != "deleted")
            .cloned()
            .collect::<Vec<_>>();
        if live.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
    let (ok, out) = run(v(&["chat", &url, "/ask may I", "--session", &id]), "y\n").await;
    assert!(ok && out.contains("permission granted"), "{out}");
    let (ok, out) = run(v(&["chat", &url, "/ask may I", "--session", &id]), "n\n").await;
    assert!(ok && out.contains("permission denied"), "{out}");
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

    let (ok, out) = run(v(&["delete", &url, &id]), "").await;
    assert!(ok, "{out}");
    let (ok, out) = run(v(&["get", &url, &id]), "").await;
    assert!(!ok && out.contains("404"), "{out}");
}
