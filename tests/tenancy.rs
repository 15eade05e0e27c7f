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

/// Runs the CLI against `serve` with `key`; returns (exit code, stdout, stderr).
fn cli(serve: &Serve, key: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .args(args)
        .env("SANDWARDEN_URL", &serve.base)
        .env("SANDWARDEN_API_KEY", key)
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An admin's key lifecycle through the CLI (`keys create|list|revoke`) and the API: a
/// tenant's key works until revoked, then is refused at once; listing shows keys without the
/// keys; only the admin may do any of it; the admin reads and deletes a tenant's sessions with
/// `?tenant=`, which a tenant's key may not use for another tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_listed_and_revoked_and_the_admin_acts_for_any_tenant() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (code, acme_key, err) = cli(&serve, ADMIN_KEY, &["keys", "create", "--tenant", "acme"]);
    assert_eq!(code, 0, "{err}");
    let acme_key = acme_key.trim().to_string();
    let (code, umbra_key, err) = cli(&serve, ADMIN_KEY, &["keys", "create", "--tenant", "umbra"]);
    assert_eq!(code, 0, "{err}");
    let umbra_key = umbra_key.trim().to_string();
    let acme = admin.with_key(&acme_key);
    let id = acme.ready("echo").await;
    let (status, reply) = acme.say(&id, "acme says heron").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("acme says heron"))
    );

    // Listing: every key, marked, never a key or a hash.
    let (status, list) = admin.call("GET", "/v1/api-keys", None).await;
    assert_eq!(status, 200, "{list}");
    let text = list.to_string();
    assert!(
        !text.contains(&acme_key) && !text.contains("key_hash"),
        "{text}"
    );
    let acme_id = list["api_keys"]
        .as_array()
        .expect("api_keys")
        .iter()
        .find(|k| k["tenant"] == "acme")
        .and_then(|k| k["id"].as_str())
        .expect("acme's key listed")
        .to_string();
    let (code, table, _) = cli(&serve, ADMIN_KEY, &["keys", "list", "--tenant", "acme"]);
    assert!(
        code == 0 && table.contains(&acme_id) && !table.contains(&acme_key),
        "{table}"
    );
    for (method, path) in [
        ("GET", "/v1/api-keys".to_string()),
        ("DELETE", format!("/v1/api-keys/{acme_id}")),
    ] {
        let (status, p) = acme.call(method, &path, None).await;
        assert_eq!(
            (status, p["type"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}: {p}"
        );
    }

    // The admin acts for acme; umbra may not.
    let (_, listed) = admin.call("GET", "/v1/sessions?tenant=acme", None).await;
    assert_eq!(
        listed["sessions"][0]["id"].as_str(),
        Some(id.as_str()),
        "{listed}"
    );
    let (_, mine) = admin.call("GET", "/v1/sessions", None).await;
    assert_eq!(mine["sessions"].as_array().map(Vec::len), Some(0), "{mine}");
    let umbra = admin.with_key(&umbra_key);
    let (status, _) = umbra.call("GET", "/v1/sessions?tenant=acme", None).await;
    assert_eq!(status, 403);
    let (status, _) = umbra.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(status, 404, "another tenant's session is not found");

    // Revoked: refused from the next request on, and shown as revoked.
    let (code, out, err) = cli(&serve, ADMIN_KEY, &["keys", "revoke", &acme_id]);
    assert_eq!(code, 0, "{out}{err}");
    let (status, p) = acme.call("GET", "/v1/sessions", None).await;
    assert_eq!(
        (status, p["type"].as_str()),
        (401, Some("unauthorized")),
        "{p}"
    );
    let (_, list) = admin.call("GET", "/v1/api-keys?tenant=acme", None).await;
    assert!(list["api_keys"][0]["revoked_at"].is_string(), "{list}");
    assert!(list["api_keys"][0]["last_used_at"].is_string(), "{list}");
    let (status, _) = admin
        .call("DELETE", &format!("/v1/sessions/{id}?tenant=acme"), None)
        .await;
    assert_eq!(status, 200);
    let (status, p) = admin
        .call("DELETE", "/v1/api-keys/key_nonesuch", None)
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (404, Some("key_not_found")),
        "{p}"
    );
}

/// Rotating the admin key: restarted with a new SANDWARDEN_API_KEY, `serve` no longer takes
/// the old one; the last valid admin key cannot be revoked through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_admin_key_from_the_environment_retires_the_old_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = ("old-admin-key-0123456789", "new-admin-key-9876543210");
    let mut serve =
        Serve::start_in_with_env(dir.path(), &[], &[("SANDWARDEN_API_KEY", old.into())]);
    let (status, list) = serve
        .client()
        .with_key(old)
        .call("GET", "/v1/api-keys", None)
        .await;
    assert_eq!(status, 200);
    let admin_id = list["api_keys"][0]["id"].as_str().expect("id").to_string();
    let (status, p) = serve
        .client()
        .with_key(old)
        .call("DELETE", &format!("/v1/api-keys/{admin_id}"), None)
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (409, Some("last_admin_key")),
        "{p}"
    );
    serve.stop();
    let serve = Serve::start_in_with_env(dir.path(), &[], &[("SANDWARDEN_API_KEY", new.into())]);
    let (status, _) = serve
        .client()
        .with_key(old)
        .call("GET", "/v1/sessions", None)
        .await;
    assert_eq!(status, 401, "the old admin key is retired");
    let (status, _) = serve
        .client()
        .with_key(new)
        .call("GET", "/v1/sessions", None)
        .await;
    assert_eq!(status, 200);
    drop(serve);
    kill_sandboxes_under(dir.path());
}

/// A key revoked through one replica is refused by the other too (its cache is dropped on the
/// store's notice), within a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_one_replica_is_refused_by_the_other() {
    let Some(db) = postgres_database().await else {
        return;
    };
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let env = [("SANDWARDEN_STORE", db), ("SANDWARDEN_SECRET", secret)];
    let a = Serve::start_with_env(&[], &env);
    let b = Serve::start_with_env(&[], &env);
    let (_, k) = a
        .client()
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": "acme"})),
        )
        .await;
    let key = k["key"].as_str().expect("key").to_string();
    let on_b = b.client().with_key(&key);
    let (status, _) = on_b.call("GET", "/v1/sessions", None).await;
    assert_eq!(status, 200, "b knows the key (and caches it)");
    let id = k["id"].as_str().expect("id");
    let (status, _) = a
        .client()
        .call("DELETE", &format!("/v1/api-keys/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let started = std::time::Instant::now();
    let mut refused = false;
    while started.elapsed() < std::time::Duration::from_secs(5) {
        if on_b.call("GET", "/v1/sessions", None).await.0 == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(refused, "b still takes the revoked key after 5 s");
    eprintln!(
        "FIGURES revoke_across_replicas: refused by the other replica after {:?}",
        started.elapsed()
    );
}

/// Quotas set on a tenant's key: over a limit the request is answered `429 quota_exceeded`
/// naming the limit, the use and the maximum, and changes nothing; other tenants are not
/// held back; `PATCH` changes a limit from the next request on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_quota_is_refused_and_others_are_not() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let limits = serde_json::json!({
        "live_sessions": 2, "concurrent_turns": 1, "open_streams": 1, "message_parts": 2
    });
    let (status, k) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": "tight", "limits": limits})),
        )
        .await;
    assert_eq!(status, 201, "{k}");
    let tight = admin.with_key(k["key"].as_str().expect("key"));
    let key_id = k["id"].as_str().expect("id").to_string();
    let (_, other) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": "roomy"})),
        )
        .await;
    let roomy = admin.with_key(other["key"].as_str().expect("key"));

    // live_sessions: two, then refused, with nothing created.
    let (a, b) = (tight.ready("echo").await, tight.ready("echo").await);
    let (status, p) = tight
        .call(
            "POST",
            "/v1/sessions",
            Some(serde_json::json!({"harness": "echo"})),
        )
        .await;
    assert_eq!(
        (
            status,
            p["type"].as_str(),
            p["limit"].as_str(),
            p["used"].as_u64(),
            p["max"].as_u64()
        ),
        (
            429,
            Some("quota_exceeded"),
            Some("live_sessions"),
            Some(2),
            Some(2)
        ),
        "{p}"
    );
    let (_, list) = tight.call("GET", "/v1/sessions", None).await;
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(2), "{list}");
    roomy.ready("echo").await;

    // message_parts.
    let parts: Vec<_> = (0..3)
        .map(|i| serde_json::json!({"type": "text", "text": format!("part {i}")}))
        .collect();
    let (status, p) = tight
        .call(
            "POST",
            &format!("/v1/sessions/{a}/messages"),
            Some(serde_json::json!({"parts": parts})),
        )
        .await;
    assert_eq!(
        (status, p["limit"].as_str()),
        (429, Some("message_parts")),
        "{p}"
    );
    assert!(tight.history_texts(&a).await.is_empty(), "nothing recorded");

    // concurrent_turns: a slow turn on one session holds the other back.
    let slow = tight
        .post_async(&a, serde_json::json!({"text": "/slow 3 kestrel"}))
        .await;
    let (status, p) = tight.say(&b, "while kestrel runs").await;
    assert_eq!(
        (status, p["limit"].as_str()),
        (429, Some("concurrent_turns")),
        "{p}"
    );
    let (status, _) = roomy
        .say(&roomy.ready("echo").await, "roomy is not held back")
        .await;
    assert_eq!(status, 200);
    tight.finished_turn(&a, &slow).await;
    let (status, reply) = tight.say(&b, "after kestrel").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("after kestrel"))
    );

    // open_streams: one event stream open, the second refused until the first closes.
    let url = serve.url(&format!("/v1/sessions/{a}/events"));
    let key = k["key"].as_str().expect("key").to_string();
    let open = || {
        reqwest::Client::new()
            .get(&url)
            .bearer_auth(&key)
            .header("accept", "text/event-stream")
            .send()
    };
    let first = open().await.expect("first stream");
    assert_eq!(first.status().as_u16(), 200);
    let second = open().await.expect("second stream");
    assert_eq!(second.status().as_u16(), 429);
    drop(first);
    let mut reopened = 0;
    for _ in 0..100 {
        let r = open().await.expect("stream");
        reopened = r.status().as_u16();
        if reopened == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        reopened, 200,
        "the slot came back when the first stream closed"
    );

    // PATCH raises a limit from the next request on; limits of 0 are refused.
    let (status, p) = admin
        .call(
            "PATCH",
            &format!("/v1/api-keys/{key_id}"),
            Some(serde_json::json!({"limits": {"live_sessions": 0}})),
        )
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (422, Some("invalid_limits")),
        "{p}"
    );
    let (status, changed) = admin
        .call(
            "PATCH",
            &format!("/v1/api-keys/{key_id}"),
            Some(serde_json::json!({"limits": {"live_sessions": 3}})),
        )
        .await;
    assert_eq!(
        (status, changed["limits"]["live_sessions"].as_u64()),
        (200, Some(3)),
        "{changed}"
    );
    let (status, p) = tight
        .call(
            "POST",
            "/v1/sessions",
            Some(serde_json::json!({"harness": "echo"})),
        )
        .await;
    assert_eq!(status, 201, "{p}");
}

/// A token budget on a tenant's key, counted from the agent's reported usage: turns run until
/// it is used up, then the next is refused `402 budget_exhausted` before anything runs;
/// `GET /v1/usage` shows the accounting per tenant and session (a tenant sees only its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_past_its_token_budget_is_refused_and_usage_is_accounted() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (_, k) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": "frugal", "limits": {"budget": {"tokens": 12}}})),
        )
        .await;
    let frugal = admin.with_key(k["key"].as_str().expect("key"));
    let (_, other) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": "lavish"})),
        )
        .await;
    let lavish = admin.with_key(other["key"].as_str().expect("key"));
    let id = frugal.ready("echo").await;
    // The echo agent reports one input token per word and one output token per word echoed:
    // three words cost six tokens.
    let (status, _) = frugal.say(&id, "one two three").await;
    assert_eq!(status, 200);
    let (status, _) = frugal.say(&id, "four five six").await;
    assert_eq!(status, 200);
    let (status, p) = frugal.say(&id, "seven eight nine").await;
    assert_eq!(
        (
            status,
            p["type"].as_str(),
            p["budget"].as_str(),
            p["used"].as_u64(),
            p["max"].as_u64()
        ),
        (
            402,
            Some("budget_exhausted"),
            Some("tokens"),
            Some(12),
            Some(12)
        ),
        "{p}"
    );
    let texts = frugal.history_texts(&id).await;
    assert!(
        !texts.iter().any(|t| t.contains("seven")),
        "nothing of the refused turn: {texts:?}"
    );
    let lavish_id = lavish.ready("echo").await;
    assert_eq!(lavish.say(&lavish_id, "not held back").await.0, 200);

    let (status, usage) = frugal.call("GET", "/v1/usage", None).await;
    assert_eq!(status, 200, "{usage}");
    let tenants = usage["tenants"].as_array().expect("tenants");
    assert_eq!(tenants.len(), 1, "a tenant sees only its own: {usage}");
    assert_eq!(tenants[0]["tenant"], "frugal");
    assert_eq!(
        (
            tenants[0]["input_tokens"].as_i64(),
            tenants[0]["output_tokens"].as_i64(),
            tenants[0]["turns"].as_i64()
        ),
        (Some(6), Some(6), Some(2)),
        "{usage}"
    );
    assert_eq!(
        tenants[0]["sessions"][0]["session_id"].as_str(),
        Some(id.as_str())
    );
    assert!(
        tenants[0]["sandbox_seconds"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "the session's sandbox time is counted: {usage}"
    );
    let (_, all) = admin.call("GET", "/v1/usage?since=2000-01-01", None).await;
    let names: Vec<&str> = all["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .filter_map(|t| t["tenant"].as_str())
        .collect();
    assert_eq!(names, ["frugal", "lavish"], "{all}");
    let (_, none) = admin.call("GET", "/v1/usage?since=2999-01-01", None).await;
    assert_eq!(none["tenants"].as_array().map(Vec::len), Some(0), "{none}");
    let (status, _) = frugal.call("GET", "/v1/usage?tenant=lavish", None).await;
    assert_eq!(status, 403);
    let (status, _) = admin.call("GET", "/v1/usage?since=yesterday", None).await;
    assert_eq!(status, 400);
}

/// Creates a key for `tenant` with the admin's client and returns a client with it.
async fn tenant_client(admin: &Api, tenant: &str) -> Api {
    let (status, k) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": tenant})),
        )
        .await;
    assert_eq!(status, 201, "{k}");
    admin.with_key(k["key"].as_str().expect("key"))
}

/// An id a client picks is a name within its tenant: two tenants may pick the same one, neither
/// learns that the other did (no `409` across tenants, no way to reach the other's session), and
/// each reaches its own by the name or by the id the server derived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_a_client_picks_are_scoped_to_its_tenant() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let acme = tenant_client(&admin, "acme").await;
    let umbra = tenant_client(&admin, "umbra").await;
    let pick = serde_json::json!({"harness": "echo", "id": "build-42"});

    let mut ids = Vec::new();
    for (who, text) in [(&acme, "acme's own words"), (&umbra, "umbra's own words")] {
        let (status, s) = who.call("POST", "/v1/sessions", Some(pick.clone())).await;
        assert_eq!(status, 201, "{s}");
        assert_eq!(s["name"], "build-42", "{s}");
        let id = s["id"].as_str().expect("id").to_string();
        assert!(id.starts_with("ses_"), "{s}");
        let (_, s) = who
            .call("GET", "/v1/sessions/build-42?wait=true&timeout=30", None)
            .await;
        assert_eq!(
            (s["status"].as_str(), s["id"].as_str()),
            (Some("ready"), Some(id.as_str()))
        );
        let (status, reply) = who.say("build-42", text).await;
        assert_eq!(
            (status, reply["text"].as_str()),
            (200, Some(text)),
            "{reply}"
        );
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "one name, two tenants, two sessions");

    // Each one's history holds its own words only, by name and by id.
    assert_eq!(
        acme.history_texts(&ids[0]).await,
        ["acme's own words", "acme's own words"]
    );
    assert_eq!(
        umbra.history_texts("build-42").await,
        ["umbra's own words", "umbra's own words"]
    );
    // The other's id is not found; the name again, in its own namespace, is taken.
    let (status, _) = umbra
        .call("GET", &format!("/v1/sessions/{}", ids[0]), None)
        .await;
    assert_eq!(status, 404);
    let (status, p) = acme.call("POST", "/v1/sessions", Some(pick.clone())).await;
    assert_eq!(
        (status, p["type"].as_str()),
        (409, Some("session_exists")),
        "{p}"
    );
    assert!(
        p["detail"].as_str().is_some_and(|d| d.contains("build-42")),
        "{p}"
    );
    // Ids the server makes cannot be picked.
    let (status, p) = acme
        .call(
            "POST",
            "/v1/sessions",
            Some(serde_json::json!({"harness": "echo", "id": ids[1]})),
        )
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (422, Some("invalid_session")),
        "{p}"
    );
    // The admin reaches a tenant's session by its name with `?tenant=`, and deletes it.
    let (status, s) = admin
        .call("DELETE", "/v1/sessions/build-42?tenant=umbra", None)
        .await;
    assert_eq!(
        (status, s["id"].as_str()),
        (200, Some(ids[1].as_str())),
        "{s}"
    );
    let (_, s) = acme.call("GET", "/v1/sessions/build-42", None).await;
    assert_eq!(s["status"], "ready", "acme's is untouched: {s}");
}

/// `limits.sandbox_memory_mib`: a tenant's live sandboxes together may be given that much memory
/// (each counts its template's limit, 2048 MiB for echo); past it a create is refused, naming the
/// use, and creates nothing; other tenants are not held back, and a delete makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_past_its_sandbox_memory_quota_is_refused_and_others_are_not() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (status, k) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": "lean", "limits": {"sandbox_memory_mib": 5000}})),
        )
        .await;
    assert_eq!(status, 201, "{k}");
    let lean = admin.with_key(k["key"].as_str().expect("key"));
    let other = tenant_client(&admin, "ample").await;

    let first = lean.ready("echo").await;
    lean.ready("echo").await;
    let (status, p) = lean
        .call(
            "POST",
            "/v1/sessions",
            Some(serde_json::json!({"harness": "echo"})),
        )
        .await;
    assert_eq!(
        (status, p["type"].as_str(), p["limit"].as_str()),
        (429, Some("quota_exceeded"), Some("sandbox_memory_mib")),
        "{p}"
    );
    assert_eq!(
        (p["used"].as_u64(), p["max"].as_u64()),
        (Some(4096), Some(5000)),
        "{p}"
    );
    let (_, listed) = lean.call("GET", "/v1/sessions", None).await;
    assert_eq!(
        listed["sessions"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );

    for _ in 0..3 {
        other.ready("echo").await;
    }
    let (status, _) = lean
        .call("DELETE", &format!("/v1/sessions/{first}"), None)
        .await;
    assert_eq!(status, 200);
    let id = lean.ready("echo").await;
    let (status, reply) = lean.say(&id, "room again").await;
    assert_eq!((status, reply["text"].as_str()), (200, Some("room again")));

    let (status, p) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": "zero", "limits": {"sandbox_memory_mib": 0}})),
        )
        .await;
    assert_eq!(status, 422, "{p}");
}
