//! The OpenAPI document in docs/openapi.json is exactly what the Rust types generate (regenerate
//! with `cargo run -- openapi > docs/openapi.json` after changing the API), and `serve` serves
//! the same at `/v1/openapi.json` without a key.

use crate::common::*;

fn generated() -> serde_json::Value {
    let text = sandwarden::api::openapi::document()
        .to_pretty_json()
        .expect("the document as JSON");
    serde_json::from_str(&text).expect("JSON")
}

#[test]
fn the_committed_openapi_document_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("docs/openapi.json"))
            .expect("docs/openapi.json is JSON");
    assert!(
        committed == generated(),
        "docs/openapi.json is stale: regenerate it with `cargo run -- openapi > docs/openapi.json`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_its_openapi_document_without_a_key() {
    let serve = Serve::start(&[]);
    let resp = reqwest::get(serve.url("/v1/openapi.json"))
        .await
        .expect("openapi.json");
    assert_eq!(resp.status(), 200);
    let doc: serde_json::Value = resp.json().await.expect("JSON");
    assert_eq!(doc, generated());
    assert_eq!(doc["openapi"], "3.1.0");
    // The native routes with their types, and every mount by route.
    for path in [
        "/v1/sessions",
        "/v1/sessions/{id}/messages",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/compat/motus/{template}/sessions",
        "/compat/everruns/{template}/sessions/{id}/sse",
        "/compat/stewrd/{template}/v1/agent",
        "/api/v1/managed_agents/agents/{agent_id}/session",
        "/v1/projects/{project}/sessions",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not described");
    }
    assert_eq!(
        doc["paths"]["/v1/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["$ref"],
        "#/components/schemas/CreateRequest"
    );
}
