//! Sharing one service safely (issue 18): one `serve` per data dir, bounds on what a request
//! may ask for, and answers that say which status is whose.

use crate::common::*;
use sandwarden_testkit::flood::{Held, flood, hold};
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// A session's turns are listed oldest first in pages (`limit`, `next_cursor`): every turn once,
/// each with its own status and stop reason and without its text; a failed and a cancelled turn
/// among them; another tenant finds no such session, and a cursor the server did not give is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_turns_are_listed_in_pages() {
    turns_listed(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_sessions_turns_are_listed_in_pages() {
    let Some(db) = postgres_database().await else {
        return;
    };
    turns_listed(&[("SANDWARDEN_STORE", db)]).await;
}

async fn turns_listed(env: &[(&str, String)]) {
    let serve = Serve::start_with_env(&[], env);
    let api = serve.client();
    let id = api.ready("echo").await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let (status, reply) = api.say(&id, &format!("turn list {i} plover")).await;
        assert_eq!(status, 200, "{reply}");
        sent.push((
            reply["turn_id"].as_str().expect("turn_id").to_string(),
            "completed",
        ));
    }
    let (status, reply) = api.say(&id, "/fail the listed failure").await;
    assert_eq!(status, 502, "{reply}");
    sent.push((
        reply["turn_id"].as_str().expect("turn_id").to_string(),
        "failed",
    ));
    let slow = api
        .post_async(&id, serde_json::json!({"text": "/slow 30 cancelled one"}))
        .await;
    let (status, _) = api
        .call("POST", &format!("/v1/sessions/{id}/cancel"), None)
        .await;
    assert_eq!(status, 202);
    api.finished_turn(&id, &slow).await;
    sent.push((slow, "cancelled"));
    for limit in [1, 2, 50] {
        let mut got = Vec::new();
        let mut cursor = String::new();
        loop {
            let (status, page) = api
                .call(
                    "GET",
                    &format!("/v1/sessions/{id}/turns?limit={limit}{cursor}"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{page}");
            let turns = page["turns"].as_array().expect("turns");
            assert!(turns.len() <= limit, "{page}");
            for t in turns {
                assert!(t.get("text").is_none(), "{t}");
                got.push((
                    t["turn_id"].as_str().expect("turn_id").to_string(),
                    t["status"].as_str().expect("status").to_string(),
                ));
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        let want: Vec<(String, String)> = sent
            .iter()
            .map(|(t, s)| (t.clone(), s.to_string()))
            .collect();
        assert_eq!(got, want, "paged by {limit}");
    }
    let (_, page) = api
        .call("GET", &format!("/v1/sessions/{id}/turns"), None)
        .await;
    assert_eq!(page["turns"][0]["stop_reason"], "end_turn", "{page}");
    let other = tenant_client(&api, "elsewhere").await;
    let (status, _) = other
        .call("GET", &format!("/v1/sessions/{id}/turns"), None)
        .await;
    assert_eq!(status, 404);
    let (status, p) = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}/turns?cursor=bm90LW91cnM"),
            None,
        )
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (400, Some("invalid_cursor")),
        "{p}"
    );
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

/// Creates a key for `tenant` (the server's default limits) and returns a client with it.
pub(crate) async fn tenant_client(admin: &Api, tenant: &str) -> Api {
    tenant_with(admin, tenant, serde_json::json!({})).await.0
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

/// A key for a new tenant with `limits`, and a client that uses it.
async fn tenant_with(admin: &Api, tenant: &str, limits: serde_json::Value) -> (Api, String) {
    let (status, k) = admin
        .call(
            "POST",
            "/v1/api-keys",
            Some(serde_json::json!({"tenant": tenant, "limits": limits})),
        )
        .await;
    assert_eq!(status, 201, "{k}");
    let key = k["key"].as_str().expect("key").to_string();
    (admin.with_key(&key), key)
}

/// A response header's value, when it is text.
fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// serve's open file descriptors, and its soft limit on them.
fn descriptors(pid: i32) -> (usize, u64) {
    let open = sandwarden::procfs::open_files(pid as u32);
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .expect("serve's open-file limit");
    (open, soft)
}

/// Issue 18's descriptor flood at CI scale: one tenant opens thousands of connections (event
/// streams, then ordinary requests) and never hangs up, while another tenant talks to its session.
/// The flooder gets its streams and connections up to its caps and `429` beyond them, each refusal
/// closing the connection; serve never holds more connections than `--max-connections`, so its
/// descriptors stay below its limit; `/healthz` answers, the other tenant's messages all succeed
/// and no session dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_connection_flood_is_refused_and_others_are_served() {
    const STREAMS: usize = 20;
    const CONNECTIONS: usize = 60;
    const MAX_CONNECTIONS: usize = 150;
    const SSE_FLOOD: usize = 2000;
    const PLAIN_FLOOD: usize = 1000;
    // This process keeps every flood connection's socket.
    let (files, hard) = sandwarden::serve::raise_nofile(4096).expect("open-file limit");
    assert!(
        files as usize > SSE_FLOOD + PLAIN_FLOOD + 200,
        "the test needs about {} open files (hard limit {hard}): raise `ulimit -Hn`",
        SSE_FLOOD + PLAIN_FLOOD + 200
    );
    let serve = Serve::start(&[
        "--max-connections",
        &MAX_CONNECTIONS.to_string(),
        "--probe-listen",
        "127.0.0.1:0",
    ]);
    let addr = serve.base.trim_start_matches("http://").to_string();
    let probes = serve.probes.clone().expect("the probes' address");
    let admin = serve.client();
    let limits = serde_json::json!({
        "open_streams": STREAMS, "open_connections": CONNECTIONS, "concurrent_requests": 20
    });
    let (flooder, flood_key) = tenant_with(&admin, "flooder", limits).await;
    let (steady, _) = tenant_with(&admin, "steady", serde_json::json!({})).await;
    let target = flooder.ready("echo").await;
    let own = steady.ready("echo").await;
    let (status, _) = steady.say(&own, "before").await;
    assert_eq!(status, 200);
    let pid = serve.pid();
    let (before, soft) = descriptors(pid);

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(descriptors(pid).0);
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let talker = {
        let (done, steady, own) = (done.clone(), steady.with_key(&steady.key), own.clone());
        async move {
            let mut replies = Vec::new();
            for i in 0..10_000 {
                if done.load(std::sync::atomic::Ordering::Relaxed) && i >= 20 {
                    break;
                }
                let text = format!("during the flood {i}");
                let (status, reply) = steady.say(&own, &text).await;
                replies.push((status, reply["text"].as_str() == Some(text.as_str())));
            }
            replies
        }
    };
    let flooding = async {
        let events = format!("/v1/sessions/{target}/events");
        let streams = flood(&addr, &events, &flood_key, true, SSE_FLOOD, 300).await;
        let session = format!("/v1/sessions/{target}");
        let plain = flood(&addr, &session, &flood_key, false, PLAIN_FLOOD, 300).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (streams, plain)
    };
    // The probes' listener answers all along, each probe on a fresh connection.
    let probing = {
        let (done, probes) = (done.clone(), probes.clone());
        async move {
            let mut answers = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) || answers.is_empty() {
                let fresh = reqwest::Client::new();
                let status = fresh
                    .get(format!("{probes}/healthz"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16());
                answers.push(status.map_err(|e| e.to_string()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answers
        }
    };
    let (replies, (streams, plain), probed) = tokio::join!(talker, flooding, probing);
    let peak = sampler.join().expect("sampler");
    assert!(
        probed.iter().all(|a| a.as_ref().is_ok_and(|&s| s == 200)),
        "every probe answered during the flood: {probed:?}"
    );

    // The other tenant was served all along.
    assert!(
        replies
            .iter()
            .all(|&(status, echoed)| status == 200 && echoed),
        "every message of the other tenant succeeds: {:?}",
        replies
            .iter()
            .filter(|r| r.0 != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    let fresh = reqwest::Client::new();
    let health = fresh
        .get(serve.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status().as_u16(), 200);

    // The flooder got up to its caps, and 429 naming a limit beyond them, each refusal closing
    // its connection.
    let refused = |held: &[Held], limit: &str| {
        held.iter()
            .filter(|h| h.status == Some(429) && h.limit.as_deref() == Some(limit))
            .count()
    };
    for (name, held) in [("streams", &streams), ("requests", &plain)] {
        for h in held.iter().filter(|h| h.status != Some(200)) {
            assert_eq!(
                h.status,
                Some(429),
                "{name}: only 200 or 429 ({:?})",
                h.error
            );
            assert!(h.closes, "{name}: a refusal closes the connection");
            assert!(
                matches!(
                    h.limit.as_deref(),
                    Some("open_streams" | "open_connections" | "concurrent_requests")
                ),
                "{name}: refused for {:?}",
                h.limit
            );
        }
    }
    let ok = |held: &[Held]| held.iter().filter(|h| h.status == Some(200)).count();
    assert_eq!(ok(&streams), STREAMS, "streams up to open_streams");
    assert!(refused(&streams, "open_streams") > 0);
    assert_eq!(
        ok(&plain),
        CONNECTIONS - STREAMS,
        "kept connections up to open_connections (the streams hold the rest)"
    );
    assert!(refused(&plain, "open_connections") > 0);

    // Descriptors: never past the connection cap (plus what serve holds of its own), and the
    // refused connections, still open on this side, hold none in serve.
    assert!(
        peak < soft as usize,
        "serve's descriptors peaked at {peak}, its limit is {soft}"
    );
    assert!(
        peak <= before + MAX_CONNECTIONS + 64,
        "serve held {peak} descriptors at the peak ({before} before, cap {MAX_CONNECTIONS})"
    );
    let (after, _) = descriptors(pid);
    assert!(
        after <= before + CONNECTIONS + 16,
        "{after} descriptors with the flood held ({before} before): refused connections were \
         not closed"
    );

    // No session of either tenant died (the flooder's key has no connection to spare: the admin
    // looks).
    for (tenant, id) in [("flooder", &target), ("steady", &own)] {
        let (_, s) = admin
            .call("GET", &format!("/v1/sessions/{id}?tenant={tenant}"), None)
            .await;
        assert_eq!(s["status"], "ready", "{s}");
    }

    // Once the flooder hangs up, its slots come back.
    drop((streams, plain));
    let mut reopened = None;
    for _ in 0..200 {
        let h = hold(
            &addr,
            &format!("/v1/sessions/{target}/events"),
            &flood_key,
            true,
        )
        .await;
        if h.status == Some(200) {
            reopened = Some(h);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reopened.is_some(), "a stream opens once the flood has gone");
}

/// `concurrent_requests`: with two long-polls of a tenant in flight a third request is refused
/// (`429`, the connection closed), another tenant is not; once they are answered the tenant's
/// requests pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_requests_in_flight_are_capped() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (busy, _) = tenant_with(
        &admin,
        "busy",
        serde_json::json!({"concurrent_requests": 2}),
    )
    .await;
    let id = busy.ready("echo").await;
    busy.post_async(&id, serde_json::json!({"text": "/slow 300 osprey"}))
        .await;
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let (api, id) = (busy.with_key(&busy.key), id.clone());
            tokio::spawn(async move {
                // A long-poll that arrives while one of the probes below is in flight is
                // itself the one refused: it asks again until it is the one held.
                loop {
                    let answer = api
                        .call(
                            "GET",
                            &format!("/v1/sessions/{id}?wait=true&timeout=60"),
                            None,
                        )
                        .await;
                    if answer.0 != 429 {
                        return answer;
                    }
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        })
        .collect();
    let mut refused = None;
    for _ in 0..500 {
        let resp = reqwest::Client::new()
            .get(serve.url(&format!("/v1/sessions/{id}")))
            .bearer_auth(&busy.key)
            .send()
            .await
            .expect("sent");
        if resp.status().as_u16() == 429 {
            refused = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let refused = refused.expect("a third request in flight is refused");
    assert_eq!(header(&refused, "connection"), Some("close"));
    let p: serde_json::Value = refused.json().await.expect("problem");
    assert_eq!(
        (p["limit"].as_str(), p["used"].as_u64(), p["max"].as_u64()),
        (Some("concurrent_requests"), Some(2), Some(2)),
        "{p}"
    );
    let (status, _) = admin.call("GET", "/v1/sessions", None).await;
    assert_eq!(status, 200, "another tenant is not held back");

    // Deleting the session answers the long-polls; then the tenant's requests pass again.
    let (status, _) = admin
        .call("DELETE", &format!("/v1/sessions/{id}?tenant=busy"), None)
        .await;
    assert_eq!(status, 200);
    for poll in polls {
        let (status, _) = poll.await.expect("long-poll");
        assert_eq!(status, 200);
    }
    let (status, p) = busy.call("GET", "/v1/sessions", None).await;
    assert_eq!(status, 200, "{p}");
}

/// A key sending requests faster than its rate is refused `429 rate_limited` with `Retry-After`
/// once its burst is spent, changing nothing; another key of the same tenant and another tenant
/// are served meanwhile; the rate refills; an admin raises one key's rate with `PATCH`, and
/// `0` is refused as a limit. (A client polling in a tight loop, as `motus serve chat` does
/// against a status it does not know, can no longer take the server's CPU.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_request_rate_is_refused_with_retry_after_and_others_are_not() {
    let serve = Serve::start(&["--key-request-rate", "5", "--key-request-burst", "8"]);
    let admin = serve.client();
    let (poller, _) = tenant_with(&admin, "poller", serde_json::json!({})).await;
    let (sibling, _) = tenant_with(&admin, "poller", serde_json::json!({})).await;
    let (other, _) = tenant_with(&admin, "other", serde_json::json!({})).await;
    // A tight loop of distinct requests: the burst passes, then the bucket is empty.
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    let mut refused = None;
    for k in 0..12 {
        let resp = http
            .get(serve.url(&format!("/v1/sessions?limit={}", k + 1)))
            .bearer_auth(&poller.key)
            .send()
            .await
            .expect("sent");
        statuses.push(resp.status().as_u16());
        if resp.status().as_u16() == 429 && refused.is_none() {
            refused = Some(resp);
        }
    }
    let passed = statuses.iter().filter(|s| **s == 200).count();
    // 8 at once, and at most one more refilled while the loop ran (5 a second).
    assert!((8..=9).contains(&passed), "{statuses:?}");
    let refused = refused.expect("a request past the burst is refused");
    assert_eq!(header(&refused, "retry-after"), Some("1"));
    assert_eq!(header(&refused, "connection"), Some("close"));
    let p: serde_json::Value = refused.json().await.expect("problem");
    assert_eq!(p["type"], "rate_limited", "{p}");
    assert_eq!(p["status"], 429, "{p}");
    assert_eq!(
        (p["limit"].as_str(), p["max"].as_u64(), p["burst"].as_u64()),
        (Some("request_rate"), Some(5), Some(8)),
        "{p}"
    );
    assert!(p["detail"].as_str().unwrap_or("").contains("PATCH"), "{p}");
    // Refused means nothing happened: a create past the rate makes no session.
    let (status, p) = poller
        .call(
            "POST",
            "/v1/sessions",
            Some(serde_json::json!({"harness": "echo"})),
        )
        .await;
    assert_eq!(status, 429, "{p}");
    let (status, list) = admin.call("GET", "/v1/sessions?tenant=poller", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["sessions"].as_array().map(Vec::len), Some(0), "{list}");
    // The rate is per key: the same tenant's other key and another tenant are served.
    assert_eq!(sibling.call("GET", "/v1/sessions", None).await.0, 200);
    assert_eq!(other.call("GET", "/v1/sessions", None).await.0, 200);
    // After the wait it said, the key is served again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(poller.call("GET", "/v1/sessions", None).await.0, 200);

    // An admin raises one key's rate; 0 is not a limit.
    let (status, keys) = admin.call("GET", "/v1/api-keys", None).await;
    assert_eq!(status, 200, "{keys}");
    let id = keys["api_keys"]
        .as_array()
        .and_then(|ks| {
            ks.iter()
                .find(|k| k["tenant"] == "other")
                .and_then(|k| k["id"].as_str())
        })
        .expect("other's key id")
        .to_string();
    let (status, p) = admin
        .call(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(serde_json::json!({"limits": {"request_rate": 0}})),
        )
        .await;
    assert_eq!(status, 422, "{p}");
    let (status, p) = admin
        .call(
            "PATCH",
            &format!("/v1/api-keys/{id}"),
            Some(serde_json::json!({"limits": {"request_rate": 1000, "request_burst": 100}})),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    for k in 0..40 {
        let (status, p) = other
            .call("GET", &format!("/v1/sessions?limit={}", k % 50 + 1), None)
            .await;
        assert_eq!(status, 200, "request {k} at the raised rate: {p}");
    }
}

/// A connection that sends no request, and a keep-alive connection left idle after one, are
/// closed by serve after `--client-timeout`, so neither holds a descriptor for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let serve = Serve::start(&["--client-timeout", "1"]);
    let addr = serve.base.trim_start_matches("http://").to_string();
    let mut silent = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut idle = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    idle.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.ends_with(b"ok") {
        let n = idle.read(&mut chunk).await.expect("read");
        assert!(n > 0, "answered: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    for (name, socket) in [("silent", &mut silent), ("idle", &mut idle)] {
        let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("the {name} connection was still open after 20 s"));
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the {name} connection is closed"
        );
    }
}

/// Opens a raw connection asking for `path` with `key` and reads only the answer's headers,
/// leaving its body unread (so serve cannot finish sending it); returns the connection and the
/// status line.
async fn unread_answer(serve: &Serve, key: &str, path: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = serve.url("").trim_start_matches("http://").to_string();
    let addr = addr.trim_end_matches('/');
    // A small receive buffer: serve's socket takes little of the answer before it blocks.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut conn = socket
        .connect(addr.parse().expect("serve's address"))
        .await
        .expect("connect");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut byte))
            .await
            .expect("headers in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "closed before the headers: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head.lines().next().unwrap_or_default().to_string();
    (conn, status)
}

/// History and event pages count against the memory for answers, per tenant (`answer_mib`,
/// refused with 429 naming it) and server-wide (`--answer-memory-mib`, waited for, then 503),
/// from before they are read until their answer has been sent; a page a client has not read
/// keeps its share, and closing the connection gives it back. Event pages are bounded by size
/// as history pages are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_in_flight_are_bounded_per_tenant_and_in_all() {
    let serve = Serve::start(&[
        "--answer-memory-mib",
        "66",
        "--tenant-answer-mib",
        "40",
        "--client-timeout",
        "3",
    ]);
    let admin = serve.client();
    let mut tenants = Vec::new();
    // Each tenant's history: its own 8 MiB message and the echo of it (16 MiB of JSON per
    // page of one message, counting 32 MiB), and a small one for the third tenant.
    for (tenant, fill, size) in [
        ("avocet", 'a', 8 << 20),
        ("bittern", 'b', 8 << 20),
        ("crake", 'c', 1 << 20),
    ] {
        let (api, key) = tenant_with(&admin, tenant, serde_json::json!({})).await;
        let id = api.ready("echo").await;
        let text = format!("{tenant} {}", fill.to_string().repeat(size));
        let (status, _) = api.say(&id, &text).await;
        assert_eq!(status, 200);
        tenants.push((api, key, id, text));
    }
    let page = |id: &str| format!("/v1/sessions/{id}/messages?limit=1");
    let (avocet, bittern, crake) = (&tenants[0], &tenants[1], &tenants[2]);

    // avocet's first page, unread: it holds 32 of its 40 MiB, so a second page is refused.
    let (held_a, status) = unread_answer(&serve, &avocet.1, &page(&avocet.2)).await;
    assert!(status.contains(" 200 "), "{status}");
    let (status, p) = avocet.0.call("GET", &page(&avocet.2), None).await;
    assert_eq!(
        (status, p["limit"].as_str()),
        (429, Some("answer_mib")),
        "{p}"
    );
    assert_eq!(p["max"], 40, "{p}");
    assert!(
        p["used"].as_u64().is_some_and(|u| (32..=34).contains(&u)),
        "{p}"
    );

    // bittern has its own allowance: 64 of the server's 66 MiB are now held.
    let (held_b, status) = unread_answer(&serve, &bittern.1, &page(&bittern.2)).await;
    assert!(status.contains(" 200 "), "{status}");
    // crake's small page does not fit in what is left: it waits for memory, not refused...
    let waiting = {
        let (api, id) = (crake.0.with_key(&crake.1), crake.2.clone());
        tokio::spawn(async move {
            api.call("GET", &format!("/v1/sessions/{id}/messages?limit=1"), None)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "crake's page waits for the server's memory"
    );
    // ...and is answered, in full and its own, once avocet's connection goes.
    drop(held_a);
    let (status, got) = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("answered once memory came back")
        .expect("joined");
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["messages"][0]["text"].as_str(), Some(crake.3.as_str()));

    // With the server's memory held again, a page waits no longer than --client-timeout, then
    // is answered 503 with Retry-After; nothing is lost.
    let (held_a, _) = unread_answer(&serve, &avocet.1, &page(&avocet.2)).await;
    let resp = reqwest::Client::new()
        .get(serve.url(&page(&crake.2)))
        .bearer_auth(&crake.1)
        .send()
        .await
        .expect("sent");
    expect_retry_later(resp, "server_busy").await;
    drop((held_a, held_b));

    // Once answers are sent, each tenant reads its whole history, its own text only.
    for (api, _, id, text) in &tenants {
        let all = api.history(id, 1).await;
        let texts: Vec<&str> = all
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(texts, [text.as_str(), text.as_str()]);
    }

    // Event pages are bounded by size: avocet's two 8 MiB echoes never share a page, and
    // following `next_since` reads every event once.
    let (status, _) = avocet
        .0
        .say(&avocet.2, &format!("avocet again {}", "z".repeat(8 << 20)))
        .await;
    assert_eq!(status, 200);
    let (mut since, mut seqs, mut pages) = (0, Vec::new(), 0);
    loop {
        let (status, p) = avocet
            .0
            .call(
                "GET",
                &format!("/v1/sessions/{}/events?since={since}&limit=1000", avocet.2),
                None,
            )
            .await;
        assert_eq!(status, 200, "{p}");
        let events = p["events"].as_array().cloned().unwrap_or_default();
        let bytes: usize = events.iter().map(|e| e["data"].to_string().len()).sum();
        assert!(
            events.len() == 1 || bytes <= 5 << 20,
            "a page past the size bound: {bytes}"
        );
        seqs.extend(events.iter().filter_map(|e| e["seq"].as_i64()));
        pages += 1;
        since = p["next_since"].as_i64().expect("next_since");
        if p["has_more"] != true {
            break;
        }
    }
    let want: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, want, "every event once, in order");
    assert!(pages >= 2, "the two echoes are on different pages");

    // An event stream resuming from the start reads the same pages from the store, and they
    // count too: with avocet's unread page holding 32 of its 40 MiB, the stream ends before the
    // first 8 MiB event (the client resumes later with Last-Event-ID)...
    let stream_body = |limit: usize| {
        let (key, id, url) = (avocet.1.clone(), avocet.2.clone(), serve.base.clone());
        async move {
            let mut resp = reqwest::Client::new()
                .get(format!("{url}/v1/sessions/{id}/events?since=0"))
                .bearer_auth(key)
                .header("accept", "text/event-stream")
                .send()
                .await
                .expect("stream");
            assert_eq!(resp.status().as_u16(), 200);
            let mut got = 0usize;
            while got < limit {
                match tokio::time::timeout(Duration::from_secs(30), resp.chunk()).await {
                    Ok(Ok(Some(chunk))) => got += chunk.len(),
                    Ok(Ok(None) | Err(_)) => return (got, true),
                    Err(_) => panic!("the stream stalled after {got} bytes"),
                }
            }
            (got, false)
        }
    };
    let (held_a, _) = unread_answer(&serve, &avocet.1, &page(&avocet.2)).await;
    let (got, ended) = stream_body(8 << 20).await;
    assert!(
        ended && got < 1 << 20,
        "the stream ended before the large event: {got} bytes"
    );
    // ...and once the page is read (its connection gone), the stream carries it.
    drop(held_a);
    let (got, ended) = stream_body(8 << 20).await;
    assert!(!ended && got >= 8 << 20, "{got} bytes, ended: {ended}");
}

/// Creates sent at once are counted one after another: a tenant allowed two live sessions gets
/// two of ten parallel creates, whatever route they come through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_creates_never_pass_the_live_sessions_limit() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let (tenant, _) =
        tenant_with(&admin, "two-live", serde_json::json!({"live_sessions": 2})).await;
    let creates = (0..10).map(|i| {
        let tenant = &tenant;
        async move {
            let (path, body) = if i % 2 == 0 {
                ("/v1/sessions", Some(serde_json::json!({"harness": "echo"})))
            } else {
                ("/compat/motus/echo/sessions", None)
            };
            tenant.call("POST", path, body).await.0
        }
    });
    let statuses = futures::future::join_all(creates).await;
    let created = statuses.iter().filter(|s| **s == 201).count();
    assert_eq!(created, 2, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 429),
        "{statuses:?}"
    );
}
