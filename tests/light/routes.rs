//! The API's routes in one process: the router called with `oneshot` (no socket, no `serve`
//! process), over an orchestrator whose runtime hosts each sandbox's harness server as a task of
//! this test (`sandwarden_harness::serve`) on a Unix socket. Only the echo agent is a process of
//! its own. This is the middle of the test pyramid: fast enough to try a route's every answer,
//! real enough that a session, a turn and the store are the product's own.

use crate::common::ADMIN_KEY;
use crate::common::in_process::{self, InProcess};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use sandwarden::tokens::Tokens;
use serde_json::{Value, json};
use std::sync::Arc;
use tower::ServiceExt;

const ACME_KEY: &str = "acme-key-for-route-tests-0123456789";

/// The router over a fresh store and the in-process runtime, with the admin key and acme's.
struct App {
    router: axum::Router,
    runtime: Arc<InProcess>,
    _dir: tempfile::TempDir,
}

impl App {
    async fn new() -> App {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = in_process::store_with_keys(
            dir.path(),
            &[("default", ADMIN_KEY, true), ("acme", ACME_KEY, false)],
        )
        .await;
        let tokens = Tokens::new(b"route-test-secret".to_vec());
        let runtime = Arc::new(InProcess::new(tokens.clone(), dir.path().join("sandboxes")));
        let templates = in_process::templates(&["echo"]);
        let orch = in_process::orchestrator(
            store,
            runtime.clone(),
            tokens,
            templates,
            "http://127.0.0.1:1",
        )
        .await;
        App {
            router: sandwarden::api::router(orch),
            runtime,
            _dir: dir,
        }
    }

    /// One request through the router: the status, the JSON body, and the response's
    /// `X-Request-Id`.
    async fn call(&self, key: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"));
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status().as_u16();
        assert!(
            resp.headers().contains_key("x-request-id"),
            "{method} {path}: no x-request-id"
        );
        let bytes = axum::body::to_bytes(resp.into_body(), 64 * 1024 * 1024)
            .await
            .expect("body");
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, json)
    }

    async fn ready_session(&self, key: &str, name: &str) -> String {
        let (status, s) = self
            .call(
                key,
                "POST",
                "/v1/sessions",
                Some(json!({"harness": "echo", "id": name})),
            )
            .await;
        assert_eq!(status, 201, "{s}");
        let id = s["id"].as_str().expect("id").to_string();
        let (_, s) = self
            .call(
                key,
                "GET",
                &format!("/v1/sessions/{id}?wait=true&timeout=30"),
                None,
            )
            .await;
        assert_eq!(s["status"], "ready", "{s}");
        id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_answers_its_own_messages_and_no_other_tenants() {
    let app = App::new().await;
    let mine = app.ready_session(ACME_KEY, "routes-1").await;
    let admins = app.ready_session(ADMIN_KEY, "routes-1").await;
    assert_ne!(mine, admins, "one name in two tenants is two sessions");

    for (key, id, text) in [
        (ACME_KEY, &mine, "acme asks about herons"),
        (ADMIN_KEY, &admins, "the admin asks about owls"),
    ] {
        let (status, reply) = app
            .call(
                key,
                "POST",
                &format!("/v1/sessions/{id}/messages"),
                Some(json!({"text": text})),
            )
            .await;
        assert_eq!(
            (status, reply["text"].as_str()),
            (200, Some(text)),
            "{reply}"
        );
    }
    let (status, history) = app
        .call(ACME_KEY, "GET", "/v1/sessions/routes-1/messages", None)
        .await;
    assert_eq!(status, 200, "{history}");
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(
        texts.iter().all(|t| t.contains("herons")) && texts.len() == 2,
        "{texts:?}"
    );

    // Another tenant's session is not found, whatever the route.
    for (method, path, body) in [
        ("GET", format!("/v1/sessions/{admins}"), None),
        ("DELETE", format!("/v1/sessions/{admins}"), None),
        (
            "POST",
            format!("/v1/sessions/{admins}/messages"),
            Some(json!({"text": "not yours"})),
        ),
        ("GET", format!("/v1/sessions/{admins}/events"), None),
        ("POST", format!("/v1/sessions/{admins}/cancel"), None),
    ] {
        let (status, p) = app.call(ACME_KEY, method, &path, body).await;
        assert_eq!(
            (status, p["type"].as_str()),
            (404, Some("session_not_found")),
            "{method} {path}: {p}"
        );
    }

    // Deleting stops the sandbox through the runtime.
    let (status, s) = app
        .call(ACME_KEY, "DELETE", &format!("/v1/sessions/{mine}"), None)
        .await;
    assert_eq!(
        (status, s["status"].as_str()),
        (200, Some("deleted")),
        "{s}"
    );
    let sandboxes = app.runtime.running();
    assert_eq!(sandboxes, 1, "the admin's sandbox alone is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_route_cannot_take_are_refused_with_how_to_fix_them() {
    let app = App::new().await;
    let id = app.ready_session(ACME_KEY, "routes-2").await;
    let cases: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        ("GET", "/v1/nowhere".into(), None, 404, "not_found"),
        (
            "PUT",
            "/v1/sessions".into(),
            None,
            405,
            "method_not_allowed",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(json!({"harness": "echo", "colour": "blue"})),
            422,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(json!({"harness": "nonesuch"})),
            422,
            "unknown_harness",
        ),
        (
            "POST",
            "/v1/sessions".into(),
            Some(json!({"harness": "echo", "idle_timeout_s": 0})),
            422,
            "invalid_session",
        ),
        (
            "POST",
            format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "a", "parts": [{"type": "text", "text": "b"}]})),
            422,
            "invalid_message",
        ),
        (
            "GET",
            format!("/v1/sessions/{id}/messages?cursor=bogus"),
            None,
            400,
            "invalid_cursor",
        ),
        (
            "GET",
            "/v1/sessions/bad%20id".into(),
            None,
            400,
            "invalid_id",
        ),
        ("GET", "/v1/api-keys".into(), None, 403, "forbidden"),
    ];
    for (method, path, body, want, kind) in cases {
        let (status, p) = app.call(ACME_KEY, method, &path, body).await;
        assert_eq!(
            (status, p["type"].as_str()),
            (want, Some(kind)),
            "{method} {path}: {p}"
        );
        assert_eq!(p["status"].as_u64(), Some(u64::from(want)), "{p}");
        assert!(
            p["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{method} {path}: a detail saying how to fix it: {p}"
        );
    }
    // Nothing the refused requests asked for was made.
    let (_, listed) = app.call(ACME_KEY, "GET", "/v1/sessions", None).await;
    assert_eq!(
        listed["sessions"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let (status, _) = app
        .call("wrong-key-0123456789", "GET", "/v1/sessions", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED.as_u16());
}
