//! Access control over every route, table-driven, through a real `serve`: no key, a wrong key and
//! another tenant's key on every `/v1` route; for terminals, a missing, forged, expired or other
//! session's token, and browser upgrades from a disallowed Origin.

use crate::common::*;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Every `/v1` route that takes the API key, with a body where it needs one.
fn routes(id: &str) -> Vec<(&'static str, String, Option<serde_json::Value>)> {
    vec![
        (
            "POST",
            "/v1/sessions".into(),
            Some(json!({"harness": "echo"})),
        ),
        ("GET", "/v1/sessions".into(), None),
        ("GET", format!("/v1/sessions/{id}"), None),
        ("DELETE", format!("/v1/sessions/{id}"), None),
        (
            "POST",
            format!("/v1/sessions/{id}/messages"),
            Some(json!({"text": "hi"})),
        ),
        ("GET", format!("/v1/sessions/{id}/messages"), None),
        ("GET", format!("/v1/sessions/{id}/events"), None),
        ("GET", format!("/v1/sessions/{id}/turns/turn_x"), None),
        ("POST", format!("/v1/sessions/{id}/cancel"), None),
        (
            "POST",
            format!("/v1/sessions/{id}/inputs/req_x"),
            Some(json!({"decision": "approve_once"})),
        ),
        ("POST", "/v1/api-keys".into(), Some(json!({"tenant": "t"}))),
    ]
}

async fn call(
    http: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    (method, path, body): &(&str, String, Option<serde_json::Value>),
) -> (u16, serde_json::Value) {
    let mut req = http.request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        format!("{base}{path}"),
    );
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn every_route_refuses_a_missing_or_wrong_key_and_hides_other_tenants_sessions() {
    let serve = Serve::start(&["--tty-token-ttl", "1"]);
    let admin = serve.client();
    let id = admin.ready("echo").await;
    let (_, k) = admin
        .call("POST", "/v1/api-keys", Some(json!({"tenant": "acme"})))
        .await;
    let other = k["key"].as_str().expect("key").to_string();
    let http = reqwest::Client::new();
    for route in routes(&id) {
        let what = format!("{} {}", route.0, route.1);
        for key in [None, Some("sk_sw_wrong_key_0123456789")] {
            let (status, p) = call(&http, &serve.base, key, &route).await;
            assert_eq!(
                (status, p["type"].as_str()),
                (401, Some("unauthorized")),
                "{what} with key {key:?}: {p}"
            );
        }
        let (status, p) = call(&http, &serve.base, Some(&other), &route).await;
        let expected = match (route.0, route.1.as_str()) {
            (_, "/v1/api-keys") => 403,
            ("POST", "/v1/sessions") => 201,
            ("GET", "/v1/sessions") => 200,
            _ => 404,
        };
        assert_eq!(status, expected, "{what} as another tenant: {p}");
        if expected == 404 {
            assert_eq!(p["type"], "session_not_found", "{what}: {p}");
        }
    }
    // Nothing the refused requests asked for happened.
    let (_, s) = admin.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "ready", "{s}");
    assert!(admin.history_texts(&id).await.is_empty());
}

async fn upgrade(url: &str, origin: Option<&str>) -> Result<(), u16> {
    let mut req = url.into_client_request().expect("request");
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", o.parse().expect("origin"));
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("upgrade failed unexpectedly: {e}"),
    }
}

#[tokio::test]
async fn terminals_need_their_own_fresh_token_and_an_allowed_origin() {
    let serve = Serve::start(&[
        "--tty-token-ttl",
        "2",
        "--allowed-origin",
        "https://ok.example",
    ]);
    let api = serve.client();
    let a = api.ready("sh").await;
    let b = api.ready("sh").await;
    let tty_url = |s: serde_json::Value| s["tty_url"].as_str().expect("tty_url").to_string();
    let url_a = tty_url(api.call("GET", &format!("/v1/sessions/{a}"), None).await.1);
    let url_b = tty_url(api.call("GET", &format!("/v1/sessions/{b}"), None).await.1);
    let token_a = url_a
        .split_once("token=")
        .map(|(_, t)| t.to_string())
        .expect("token");
    let bare_b = url_b
        .split_once('?')
        .map(|(u, _)| u.to_string())
        .expect("url");

    assert_eq!(upgrade(&url_a, None).await, Ok(()));
    assert_eq!(upgrade(&url_a, Some("https://ok.example")).await, Ok(()));
    assert_eq!(
        upgrade(&url_a, Some("https://evil.example")).await,
        Err(403)
    );
    assert_eq!(upgrade(&bare_b, None).await, Err(401), "no token, no key");
    assert_eq!(
        upgrade(&format!("{bare_b}?token={token_a}"), None).await,
        Err(401),
        "session a's token does not open session b"
    );
    let forged = url_a.replace("token=", "token=9");
    assert_eq!(upgrade(&forged, None).await, Err(401));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(upgrade(&url_a, None).await, Err(401), "expired");
}
