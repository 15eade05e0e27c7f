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

/// schemathesis (pinned in target/st-venv by scripts/install-sdks) against a live `serve`, from
/// the document it serves: generated and mutated requests to the native routes, stateful
/// sequences following the answers, bounded in examples and time. No answer is a server error,
/// and every answer is one the document describes: its status, its content type, its schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let st =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/st-venv/bin/schemathesis");
    if !st.exists() {
        assert!(
            std::env::var_os("SANDWARDEN_REQUIRE_SDKS").is_none(),
            "schemathesis is required but target/st-venv is missing: run scripts/install-sdks"
        );
        eprintln!("SKIPPED: schemathesis is not installed (run scripts/install-sdks)");
        return;
    }
    let serve = Serve::start(&["--default-template", "echo", "--key-request-rate", "100000"]);
    let key = format!("Authorization: Bearer {ADMIN_KEY}");
    let cache = tempfile::tempdir().expect("a directory for schemathesis' cache");
    let out = tokio::process::Command::new(&st)
        .args(["run", &serve.url("/v1/openapi.json"), "-H", &key])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance,\
             status_code_conformance",
            "-n",
            "10",
            "--max-time",
            "90",
        ])
        .args([
            "--include-path-regex",
            "^/v1/(sessions|templates)",
            "--seed",
            "7",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its cache (.schemathesis/) goes to a directory of its own, not the work tree.
        .current_dir(&cache)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A schemathesis finding: answering an input of a deleted session reached for its (gone)
/// sandbox, marked the session dead and answered 502. It is refused now, and the session stays
/// deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_sessions_inputs_are_refused_without_reaching_for_its_sandbox() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    assert_eq!(
        api.call("DELETE", &format!("/v1/sessions/{id}"), None)
            .await
            .0,
        200
    );
    let (status, body) = api
        .call(
            "POST",
            &format!("/v1/sessions/{id}/inputs/4"),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "deleted", "{s}");
}
