//! The official vendor SDKs as unchanged clients of sandwarden's vendor-compatible APIs: each
//! Python client under tests/sdk/ runs its SDK's whole flow against `serve` with only the base
//! URL and the API key changed, and fails on the first expectation that does not hold.

use crate::common::*;
use serde_json::json;
use std::path::PathBuf;

/// The Python of the virtualenv holding the pinned SDKs (scripts/install-sdks).
fn sdk_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SANDWARDEN_SDK_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv/bin/python");
    venv.exists().then_some(venv)
}

/// Runs `tests/sdk/SCRIPT` against `serve` as tenant `tenant`; its output.
async fn run_client(serve: &Serve, script: &str, tenant: &str) -> Option<String> {
    let Some(python) = sdk_python() else {
        assert!(
            std::env::var_os("SANDWARDEN_REQUIRE_SDKS").is_none(),
            "the vendor SDKs are required but target/sdk-venv is missing: run scripts/install-sdks"
        );
        eprintln!("SKIPPED: the vendor SDKs are not installed (run scripts/install-sdks)");
        return None;
    };
    let api = serve.client();
    let (status, key) = api
        .call("POST", "/v1/api-keys", Some(json!({ "tenant": tenant })))
        .await;
    assert_eq!(status, 201, "{key}");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .env("SANDWARDEN_URL", &serve.base)
        .env("SANDWARDEN_KEY", key["key"].as_str().expect("key"))
        .output()
        .await
        .expect("run the SDK client");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        out.status
    );
    Some(stdout)
}

/// The session a client script names on its `session ID` line.
fn client_session(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("session "))
        .expect("the client names its session")
        .to_string()
}

/// Each `GET` of `paths` as a tenant of its own: status and body.
async fn as_another_tenant(serve: &Serve, paths: &[String]) -> Vec<(u16, serde_json::Value)> {
    let api = serve.client();
    let (_, other) = api
        .call(
            "POST",
            "/v1/api-keys",
            Some(json!({ "tenant": "sdk-other" })),
        )
        .await;
    let other = api.with_key(other["key"].as_str().expect("key"));
    let mut answers = Vec::new();
    for path in paths {
        answers.push(other.call("GET", path, None).await);
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_runs_a_managed_agent_session_end_to_end() {
    let serve = Serve::start(&[]);
    let Some(out) = run_client(&serve, "anthropic_managed_agents.py", "sdk-anthropic").await else {
        return;
    };
    // Another tenant's key finds nothing of it, and is told so in Anthropic's shape.
    let session = client_session(&out);
    for (status, body) in as_another_tenant(
        &serve,
        &[
            format!("/anthropic/v1/sessions/{session}"),
            format!("/anthropic/v1/sessions/{session}/events"),
        ],
    )
    .await
    {
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_runs_an_agents_session_end_to_end() {
    let serve = Serve::start(&[]);
    let Some(out) = run_client(&serve, "openai_agents.py", "sdk-openai").await else {
        return;
    };
    let session = client_session(&out);
    for (status, body) in as_another_tenant(
        &serve,
        &[
            format!("/openai/v1/agents/sessions/{session}"),
            format!("/openai/v1/agents/sessions/{session}/items"),
            format!("/openai/v1/agents/sessions/{session}/turns"),
        ],
    )
    .await
    {
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    }
}
