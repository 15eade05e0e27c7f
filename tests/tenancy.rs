//! Sharing one service safely (issue 18): one `serve` per data dir, bounds on what a request
//! may ask for, and answers that say which status is whose.

mod common;

use common::*;
use std::process::{Command, Stdio};

/// Runs `sandwarden serve` on `data` expecting it to refuse to start: returns its exit status
/// and what it wrote on stderr.
fn serve_refusal(data: &std::path::Path, env: &[(&str, String)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .args(["serve", "--listen", "127.0.0.1:0", "--isolation", "none"])
        .arg("--data-dir")
        .arg(data)
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
        .env("SANDWARDEN_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run serve");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_one_data_dir_refuses_to_start_naming_the_first() {
    let first = Serve::start(&[]);
    let id = first.client().ready("echo").await;
    let (code, stderr) = serve_refusal(&first.data, &[]);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {})", first.pid())) && stderr.contains("--data-dir"),
        "{stderr}"
    );
    // The first one is untouched and serves on.
    let (status, reply) = first.client().say(&id, "still here").await;
    assert_eq!((status, reply["text"].as_str()), (200, Some("still here")));
}

/// Two replicas on one PostgreSQL store with different server secrets: the second refuses to
/// start and says why (the fingerprints, never a secret); with `--accept-new-secret` it starts
/// and its secret becomes the store's, which the first one's then no longer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_secret_differs_from_the_stores_refuses_to_start() {
    let Some(db) = postgres_database().await else {
        return;
    };
    let (one, two) = (
        hex::encode(rand::random::<[u8; 32]>()),
        hex::encode(rand::random::<[u8; 32]>()),
    );
    let first = Serve::start_with_env(
        &[],
        &[
            ("SANDWARDEN_STORE", db.clone()),
            ("SANDWARDEN_SECRET", one.clone()),
        ],
    );
    let id = first.client().ready("echo").await;

    let elsewhere = tempfile::tempdir().expect("tempdir");
    let env = [
        ("SANDWARDEN_STORE", db.clone()),
        ("SANDWARDEN_SECRET", two.clone()),
    ];
    let (code, stderr) = serve_refusal(elsewhere.path(), &env);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("not the one the store") && stderr.contains("--accept-new-secret"),
        "{stderr}"
    );
    assert!(!stderr.contains(&one) && !stderr.contains(&two), "{stderr}");
    // The first replica serves on.
    let (status, _) = first.client().say(&id, "unchanged").await;
    assert_eq!(status, 200);

    let second = Serve::start_in_with_env(elsewhere.path(), &["--accept-new-secret"], &env);
    let (status, _) = second
        .client()
        .call("GET", &format!("/v1/sessions/{id}"), None)
        .await;
    assert_eq!(status, 200);
    drop(second);
    kill_sandboxes_under(elsewhere.path());
    let again = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = serve_refusal(
        again.path(),
        &[("SANDWARDEN_STORE", db), ("SANDWARDEN_SECRET", one)],
    );
    assert_ne!(code, 0, "the old secret is refused once replaced: {stderr}");
}

/// A turn's `stop_reason` is on the turn resource as on the reply; a problem's `status` is
/// always the HTTP status (the session's status is `session_status`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_resource_has_its_stop_reason_and_problems_one_status() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (status, reply) = api.say(&id, "a reason to stop").await;
    assert_eq!(status, 200, "{reply}");
    let stop = reply["stop_reason"]
        .as_str()
        .expect("stop_reason in the reply");
    let turn_id = reply["turn_id"].as_str().expect("turn_id");
    let (_, turn) = api
        .call("GET", &format!("/v1/sessions/{id}/turns/{turn_id}"), None)
        .await;
    assert_eq!(turn["stop_reason"].as_str(), Some(stop), "{turn}");

    let (status, _) = api
        .call("DELETE", &format!("/v1/sessions/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let url = serve.url(&format!("/v1/sessions/{id}/messages"));
    let resp = reqwest::Client::new()
        .post(&url)
        .bearer_auth(ADMIN_KEY)
        .json(&serde_json::json!({"text": "to a deleted session"}))
        .send()
        .await
        .expect("sent");
    let http_status = resp.status().as_u16();
    let body = resp.text().await.expect("body");
    assert_eq!(
        body.matches("\"status\"").count(),
        1,
        "one `status` member: {body}"
    );
    let problem: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        problem["status"].as_u64(),
        Some(u64::from(http_status)),
        "{body}"
    );
    assert_eq!(problem["session_status"], "deleted", "{body}");
}

/// Inputs past the documented bounds are refused with a 422 that says the bound, and change
/// nothing: `idle_timeout_s` (1 s to 30 days; 2^64−1 once wrapped to −1 and was reaped at
/// once) and parts per message (256; 400,000 tiny parts once took 900 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeouts_and_parts_past_their_bounds_are_refused() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    for timeout in [
        "18446744073709551615",
        "9223372036854775807",
        "2592001",
        "0",
    ] {
        let body: serde_json::Value = serde_json::from_str(&format!(
            r#"{{"harness":"echo","idle_timeout_s":{timeout}}}"#
        ))
        .expect("json");
        let (status, p) = api.call("POST", "/v1/sessions", Some(body)).await;
        assert_eq!(status, 422, "idle_timeout_s {timeout}: {p}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap_or("")
                .contains("idle_timeout_s"),
            "{p}"
        );
    }
    let (_, list) = api.call("GET", "/v1/sessions", None).await;
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(0), "{list}");
    let (status, s) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(serde_json::json!({"harness": "echo", "idle_timeout_s": 2_592_000})),
        )
        .await;
    assert_eq!(status, 201, "30 days is within the bound: {s}");

    let id = api.ready("echo").await;
    let part = |i: usize| serde_json::json!({"type": "text", "text": format!("p{i}")});
    for (field, body) in [
        (
            "parts",
            serde_json::json!({ "parts": (0..257).map(part).collect::<Vec<_>>() }),
        ),
        (
            "content",
            serde_json::json!({ "role": "user", "content": (0..100_000).map(part).collect::<Vec<_>>() }),
        ),
    ] {
        let (status, p) = api
            .call("POST", &format!("/v1/sessions/{id}/messages"), Some(body))
            .await;
        assert_eq!(status, 422, "{field}: {p}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap_or("")
                .contains("at most 256 parts"),
            "{field}: {p}"
        );
    }
    assert!(
        api.history_texts(&id).await.is_empty(),
        "nothing was recorded"
    );
    let (status, reply) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(serde_json::json!({ "parts": (0..256).map(part).collect::<Vec<_>>() })),
        )
        .await;
    assert_eq!(status, 200, "256 parts are within the bound: {reply}");
}

/// The history comes in pages (`limit`, `next_cursor`), each also bounded in bytes, so reading
/// a long history never makes `serve` hold it whole; paged through, it is complete and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_paged_by_count_and_by_size() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let mut sent = Vec::new();
    for i in 0..7 {
        let text = format!(
            "message {i} {}",
            "x".repeat(if i == 3 { 3 << 20 } else { 10 })
        );
        let (status, _) = api.say(&id, &text).await;
        assert_eq!(status, 200);
        sent.push(text);
    }
    // Each turn is the user's message and the echo's answer with the same text.
    let want: Vec<String> = sent.iter().flat_map(|t| [t.clone(), t.clone()]).collect();
    for limit in [1, 3, 100] {
        let all = api.history(&id, limit).await;
        let texts: Vec<String> = all
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(texts, want, "paged by {limit}");
    }
    // The two 3 MiB messages never share a page (4 MiB per page).
    let (_, first) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}/messages?limit=100"),
            None,
        )
        .await;
    let n = first["messages"].as_array().map_or(0, Vec::len);
    assert!(
        n > 0 && n < want.len(),
        "the first page stops at the size bound: {n}"
    );
    assert_eq!(first["has_more"], true);
    let (status, p) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}/messages?cursor=bogus"),
            None,
        )
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (400, Some("invalid_cursor")),
        "{p}"
    );
    let (status, _) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}/messages?limit=501"),
            None,
        )
        .await;
    assert_eq!(status, 400);
}
