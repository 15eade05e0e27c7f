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
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    Some(run_script(serve, &python, &script, tenant).await)
}

/// Runs the Python client `script` with `python` against `serve` as a new key of `tenant`
/// (`SANDWARDEN_URL`, `SANDWARDEN_KEY`); its output, or a failure with what it printed.
pub(crate) async fn run_script(
    serve: &Serve,
    python: &std::path::Path,
    script: &std::path::Path,
    tenant: &str,
) -> String {
    let api = serve.client();
    let (status, key) = api
        .call("POST", "/v1/api-keys", Some(json!({ "tenant": tenant })))
        .await;
    assert_eq!(status, 201, "{key}");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .env("SANDWARDEN_URL", &serve.base)
        .env("SANDWARDEN_KEY", key["key"].as_str().expect("key"))
        // Whether this serve's sandboxes go out through its egress proxy (bubblewrap works).
        .env("SANDWARDEN_NARROWS", if bwrap_works() { "1" } else { "0" })
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
    stdout
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
    let other = crate::tenancy::tenant_client(&serve.client(), "sdk-other").await;
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

/// An Anthropic environment and an agent on the echo harness, made as `api`: their records.
async fn echo_environment_and_agent(api: &Api) -> (serde_json::Value, serde_json::Value) {
    let (status, env) = api
        .call(
            "POST",
            "/anthropic/v1/environments",
            Some(json!({"name": "e"})),
        )
        .await;
    assert_eq!(status, 200, "{env}");
    let (status, agent) = api
        .call(
            "POST",
            "/anthropic/v1/agents",
            Some(json!({"name": "a", "model": "echo-small",
                        "metadata": {"sandwarden.harness": "echo"}})),
        )
        .await;
    assert_eq!(status, 200, "{agent}");
    (env, agent)
}

/// What a hostile or careless client sends the vendor APIs is refused whole, in the vendor's
/// error shape, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_api_refusals_change_nothing() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let post = |path: &str, body: serde_json::Value| {
        let api = &api;
        let path = path.to_string();
        async move { api.call("POST", &path, Some(body)).await }
    };
    let (env, agent) = echo_environment_and_agent(&api).await;
    let (env, agent) = (env["id"].clone(), agent["id"].clone());

    // A first message the agent cannot take (a model it does not offer) leaves no session.
    let (_, wrong) = post(
        "/anthropic/v1/agents",
        json!({"name": "w", "model": "no-such-model", "metadata": {"sandwarden.harness": "echo"}}),
    )
    .await;
    let (status, body) = post(
        "/anthropic/v1/sessions",
        json!({"agent": wrong["id"], "environment_id": env, "initial_events": [
            {"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(body["request_id"].is_string(), "{body}");
    let (_, listed) = api
        .call("GET", "/anthropic/v1/sessions?include_archived=true", None)
        .await;
    assert_eq!(listed["data"], json!([]), "{listed}");
    let (_, native) = api.call("GET", "/v1/sessions?status=ready", None).await;
    assert_eq!(native["sessions"], json!([]), "{native}");

    let (status, session) = post(
        "/anthropic/v1/sessions",
        json!({"agent": agent, "environment_id": env}),
    )
    .await;
    assert_eq!(status, 200, "{session}");
    let events = format!(
        "/anthropic/v1/sessions/{}/events",
        session["id"].as_str().expect("id")
    );
    let text = |t: &str| json!({"type": "user.message", "content": [{"type": "text", "text": t}]});
    for (body, what) in [
        (
            json!({"events": [text("one"), text("two")]}),
            "two messages at once",
        ),
        (
            json!({"events": [text("one"), {"type": "user.tool_confirmation",
                "tool_use_id": "sevt_-9223372036854775808_0", "result": "allow"}]}),
            "a tool use id no event can have",
        ),
        (
            json!({"events": (0..51).map(|_| json!({"type": "user.interrupt"})).collect::<Vec<_>>()}),
            "more than 50 events",
        ),
    ] {
        let (status, answer) = post(&events, body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_eq!(answer["type"], "error", "{what}: {answer}");
    }
    let (_, history) = api.call("GET", &events, None).await;
    assert_eq!(
        history["data"],
        json!([]),
        "nothing was acted on: {history}"
    );

    // Objects are bounded; an archived agent is archived in every version.
    let (status, body) = post(
        "/anthropic/v1/agents",
        json!({"name": "big", "model": "m", "metadata": {"k": "x".repeat(600)}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(
        "/anthropic/v1/agents",
        json!({"name": "big", "model": "m", "description": "x".repeat(5000)}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let agent_id = agent.as_str().expect("agent id");
    let (status, _) = post(
        &format!("/anthropic/v1/agents/{agent_id}"),
        json!({"name": "b"}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = post(
        &format!("/anthropic/v1/agents/{agent_id}/archive"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post(
        "/anthropic/v1/sessions",
        json!({"agent": {"type": "agent", "id": agent_id, "version": 1}, "environment_id": env}),
    )
    .await;
    assert_eq!(status, 400, "an archived agent's old version: {body}");

    // OpenAI: the same bounds, in its shape.
    let (status, body) = post(
        "/openai/v1/agents/sessions",
        json!({"environment": {"type": "openai_hosted"}, "agent": {"model": "echo-small"},
               "metadata": {"sandwarden.harness": "sh"}}),
    )
    .await;
    assert_eq!(status, 400, "a terminal harness: {body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    let (status, s) = post(
        "/openai/v1/agents/sessions",
        json!({"environment": {"type": "openai_hosted"}, "agent": {"model": "echo-small"},
               "metadata": {"sandwarden.harness": "echo"}}),
    )
    .await;
    assert_eq!(status, 200, "{s}");
    let input = |t: &str| {
        json!({"type": "agent.session.input.message",
               "input": [{"role": "user", "content": [{"type": "input_text", "text": t}]}]})
    };
    let (status, body) = post(
        &format!(
            "/openai/v1/agents/sessions/{}/events",
            s["id"].as_str().expect("id")
        ),
        json!({"events": [input("one"), input("two")]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (_, turns) = api
        .call(
            "GET",
            &format!(
                "/openai/v1/agents/sessions/{}/turns",
                s["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(turns["data"], json!([]), "{turns}");
}

/// Client tools on the native API: the agent calls a tool through the MCP server its harness
/// hosts; the call is an `input_required` carrying `client_tool`, answered with `output`; the
/// server answers no one without the session's token. Confined (bubblewrap, when here) and not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_tool_call_is_answered_through_the_native_api() {
    client_tool_call(&[], false).await;
    client_tool_call(&["--isolation", "none"], true).await;
}

/// `reachable`: the sandbox shares this machine's loopback, so the server must refuse (401).
async fn client_tool_call(flags: &[&str], reachable: bool) {
    let serve = Serve::start(flags);
    let api = serve.client();
    let (status, s) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(
                json!({"harness": "echo", "client_tools": [{"name": "lookup",
                "description": "looks a word up",
                "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    api.wait_status(&id, "ready").await;

    let turn = api
        .post_async(
            &id,
            json!({"text": r#"/calltool lookup {"q": "kestrel-4f1"}"#}),
        )
        .await;
    let asked = loop {
        let (_, e) = api
            .call("GET", &format!("/v1/sessions/{id}/events?limit=1000"), None)
            .await;
        if let Some(asked) = e["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == "input_required" && e["turn_id"] == turn.as_str())
        {
            break asked.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(asked["data"]["client_tool"]["name"], "lookup", "{asked}");
    assert_eq!(
        asked["data"]["client_tool"]["input"]["q"], "kestrel-4f1",
        "{asked}"
    );
    api.wait_status(&id, "input_required").await;
    let request = asked["data"]["request_id"].as_str().expect("request id");
    let answer = |body: serde_json::Value| {
        let api = &api;
        let path = format!("/v1/sessions/{id}/inputs/{request}");
        async move { api.call("POST", &path, Some(body)).await }
    };
    // A permission's answer does not answer a tool call; nothing changes.
    let (status, p) = answer(json!({"decision": "approve_once"})).await;
    assert_eq!(status, 422, "{p}");
    let (status, a) = answer(json!({"output": "osprey-4f1"})).await;
    assert_eq!(status, 200, "{a}");
    let done = api.finished_turn(&id, &turn).await;
    assert_eq!(done["text"], "tool lookup answered: osprey-4f1", "{done}");
    let (status, _) = answer(json!({"output": "twice"})).await;
    assert_eq!(status, 404, "answered once");

    // A cancel while the call waits ends the turn cancelled, and withdraws the call.
    let turn = api
        .post_async(&id, json!({"text": r#"/calltool lookup {"q": "never"}"#}))
        .await;
    api.wait_status(&id, "input_required").await;
    let (status, c) = api
        .call("POST", &format!("/v1/sessions/{id}/cancel"), None)
        .await;
    assert_eq!(status, 202, "{c}");
    let ended = api.finished_turn(&id, &turn).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    api.wait_status(&id, "ready").await;

    // The tools' MCP server, on the sandbox's loopback, refuses a caller without the token.
    let (_, mcp) = api.say(&id, "/mcp").await;
    let mcp = mcp["text"].as_str().unwrap_or_default().to_string();
    let url = mcp
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("the client tools' server: {mcp}"));
    // Under bubblewrap the sandbox's loopback is its own: the server is not even reachable.
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "lookup", "arguments": {}}});
    let tried = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("client")
        .post(url)
        .json(&call)
        .send()
        .await;
    match tried {
        Ok(refused) => assert_eq!(refused.status().as_u16(), 401, "{url}"),
        Err(e) => assert!(!reachable && e.is_connect(), "{url}: {e}"),
    }

    // A terminal session takes no client tools.
    let (status, p) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"harness": "sh", "client_tools": [{"name": "lookup"}]})),
        )
        .await;
    assert_eq!(status, 422, "{p}");
}

/// A message sent during a turn waits in the store: serve killed mid-turn and started again,
/// the queued message still runs, as the turn its send named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_survives_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = Serve::start_in(dir.path(), &[]);
    let api = serve.client();
    let (env, agent) = echo_environment_and_agent(&api).await;
    let (status, session) = api
        .call(
            "POST",
            "/anthropic/v1/sessions",
            Some(json!({"agent": agent["id"], "environment_id": env["id"]})),
        )
        .await;
    assert_eq!(status, 200, "{session}");
    let events = format!(
        "/anthropic/v1/sessions/{}/events",
        session["id"].as_str().expect("id")
    );
    let text = |t: &str| {
        json!({"events": [{"type": "user.message",
                                            "content": [{"type": "text", "text": t}]}]})
    };
    let (status, first) = api.call("POST", &events, Some(text("/slow 40 long"))).await;
    assert_eq!(status, 200, "{first}");
    let (status, queued) = api
        .call("POST", &events, Some(text("queued after a crash 7c2")))
        .await;
    assert_eq!(status, 200, "a message during a turn is queued: {queued}");
    let queued_id = queued["data"][0]["id"].clone();
    serve.kill();

    let serve = Serve::start_in(dir.path(), &[]);
    let api = serve.client();
    let (status, _) = api
        .call(
            "GET",
            &format!(
                "/anthropic/v1/sessions/{}",
                session["id"].as_str().expect("id")
            ),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let mut history = json!(null);
    for _ in 0..300 {
        let (_, h) = api.call("GET", &format!("{events}?limit=1000"), None).await;
        history = h;
        let answered = history["data"].as_array().into_iter().flatten().any(|e| {
            e["type"] == "agent.message" && e["content"][0]["text"] == "queued after a crash 7c2"
        });
        if answered {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let data = history["data"].as_array().cloned().unwrap_or_default();
    let opened = data
        .iter()
        .filter(|e| e["type"] == "user.message" && e["id"] == queued_id)
        .count();
    assert_eq!(
        opened, 1,
        "the queued turn opens once, as its send named it: {history}"
    );
    assert!(
        data.iter().any(|e| e["type"] == "agent.message"
            && e["content"][0]["text"] == "queued after a crash 7c2"),
        "the queued message was answered after the restart: {history}"
    );
    // The second serve does not own the data dir: its sandboxes are stopped here.
    drop(serve);
    kill_sandboxes_under(dir.path());
}

/// A `multipart/form-data` body with the given text fields and, when `file` is given, a `file`
/// part (its name and bytes); and its content type.
fn multipart(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (Vec<u8>, String) {
    let boundary = "sandwarden-test-boundary-7b1e";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    if let Some((name, bytes)) = file {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"{name}\"\r\nContent-Type: text/plain\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={boundary}"))
}

/// Posts a multipart body as `api`: status and JSON answer.
async fn upload(api: &Api, path: &str, form: (Vec<u8>, String)) -> (u16, serde_json::Value) {
    let reply = api
        .http
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.key)
        .header("content-type", form.1)
        .body(form.0)
        .send()
        .await
        .expect("upload");
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or_default())
}

/// The vendors' files: an upload without a file or past its bound is refused and stores nothing;
/// another tenant finds none of a tenant's files (uploaded, or a session's, even by an id naming
/// the session), and a file of one vendor API is not one of the other's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_files_are_bounded_and_stay_with_their_tenant() {
    let serve = Serve::start(&[]);
    let admin = serve.client();
    let owner = crate::tenancy::tenant_client(&admin, "files-owner").await;
    let other = crate::tenancy::tenant_client(&admin, "files-other").await;

    for (path, fields) in [
        ("/anthropic/v1/files", vec![]),
        ("/openai/v1/files", vec![("purpose", "user_data")]),
    ] {
        let (status, body) = upload(&owner, path, multipart(&fields, None)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.to_string().contains("no `file` part"), "{body}");
        let big = vec![b'x'; 8 * 1024 * 1024 + 1];
        let (status, body) =
            upload(&owner, path, multipart(&fields, Some(("big.txt", &big)))).await;
        assert_eq!(status, 413, "{path}: {body}");
        let (_, listed) = owner.call("GET", path, None).await;
        assert_eq!(
            listed["data"],
            json!([]),
            "{path}: nothing stored: {listed}"
        );
    }
    let (status, body) = upload(
        &owner,
        "/openai/v1/files",
        multipart(&[("purpose", "payroll")], Some(("a.txt", b"a"))),
    )
    .await;
    assert_eq!(status, 400, "an unknown purpose: {body}");

    let (status, file) = upload(
        &owner,
        "/anthropic/v1/files",
        multipart(&[], Some(("secret.txt", b"owner's secret"))),
    )
    .await;
    assert_eq!(status, 200, "{file}");
    let id = file["id"].as_str().expect("id").to_string();
    let (env, agent) = echo_environment_and_agent(&owner).await;
    let (status, session) = owner
        .call(
            "POST",
            "/anthropic/v1/sessions",
            Some(
                json!({"agent": agent["id"], "environment_id": env["id"], "resources": [
                {"type": "file", "file_id": id, "mount_path": "/workspace/secret.txt"}]}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{session}");
    let sid = session["id"].as_str().expect("id").to_string();
    let (_, outputs) = owner
        .call("GET", &format!("/anthropic/v1/files?scope_id={sid}"), None)
        .await;
    let output = outputs["data"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a session file: {outputs}"))
        .to_string();
    let (status, _) = owner
        .call("GET", &format!("/anthropic/v1/files/{output}"), None)
        .await;
    assert_eq!(status, 200);

    for (method, path) in [
        ("GET", format!("/anthropic/v1/files/{id}")),
        ("GET", format!("/anthropic/v1/files/{id}/content")),
        ("DELETE", format!("/anthropic/v1/files/{id}")),
        ("GET", format!("/anthropic/v1/files/{output}")),
        ("GET", format!("/anthropic/v1/files/{output}/content")),
        ("GET", format!("/anthropic/v1/files?scope_id={sid}")),
        ("GET", format!("/anthropic/v1/sessions/{sid}/resources")),
        ("GET", format!("/openai/v1/agents/environments/env_{sid}")),
        (
            "GET",
            format!("/openai/v1/agents/environments/env_{sid}/files"),
        ),
    ] {
        let (status, body) = other.call(method, &path, None).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(!body.to_string().contains("owner's secret"), "{body}");
    }
    let (_, listed) = other.call("GET", "/anthropic/v1/files", None).await;
    assert_eq!(listed["data"], json!([]), "{listed}");
    // An Anthropic file is not an OpenAI one, even for its own tenant.
    let (status, _) = owner
        .call("GET", &format!("/openai/v1/files/{id}"), None)
        .await;
    assert_eq!(status, 404);
    // The owner still has it, whole, as a download a browser would not render.
    let reply = owner
        .http
        .get(format!("{}/anthropic/v1/files/{id}/content", owner.base))
        .bearer_auth(&owner.key)
        .send()
        .await
        .expect("download");
    assert_eq!(reply.status().as_u16(), 200);
    assert_eq!(reply.headers()["content-disposition"], "attachment");
    assert_eq!(reply.headers()["x-content-type-options"], "nosniff");
    assert_eq!(reply.text().await.expect("body"), "owner's secret");

    // Pages past any length, a long mount path, too many of a session's files at once: refused.
    let forged: Vec<String> = (0..11)
        .map(|i| {
            use base64::Engine;
            let named = format!("{sid}\nf{i}.txt");
            format!(
                "file_s{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(named)
            )
        })
        .collect();
    let (status, oai) = owner
        .call(
            "POST",
            "/openai/v1/agents/sessions",
            Some(json!({"environment": {"type": "openai_hosted"},
                        "agent": {"model": "echo-small"},
                        "metadata": {"sandwarden.harness": "echo"}})),
        )
        .await;
    assert_eq!(status, 200, "{oai}");
    let oai_env = oai["environment"]["id"].as_str().expect("environment id");
    for path in [
        format!("/anthropic/v1/files?scope_id={sid}&page=page_18446744073709551615"),
        format!("/anthropic/v1/sessions/{sid}/resources?page=page_18446744073709551615"),
        format!("/openai/v1/agents/environments/{oai_env}/files?page=p18446744073709551615"),
        format!("/anthropic/v1/files?ids={}", forged.join(",")),
    ] {
        let (status, body) = owner.call("GET", &path, None).await;
        assert_eq!(status, 400, "{path}: {body}");
    }
    let long = format!("/workspace/{}x.txt", "./".repeat(600));
    let (status, body) = owner
        .call(
            "POST",
            &format!("/anthropic/v1/sessions/{sid}/resources"),
            Some(json!({"type": "file", "file_id": id, "mount_path": long})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // Resources added at once are all kept.
    let adds: Vec<_> = (0..8)
        .map(|i| {
            let owner = owner.with_key(&owner.key);
            let (sid, id) = (sid.clone(), id.clone());
            tokio::spawn(async move {
                owner
                    .call(
                        "POST",
                        &format!("/anthropic/v1/sessions/{sid}/resources"),
                        Some(json!({"type": "file", "file_id": id,
                                    "mount_path": format!("/workspace/copy-{i}.txt")})),
                    )
                    .await
            })
        })
        .collect();
    for add in adds {
        let (status, body) = add.await.expect("add");
        assert_eq!(status, 200, "{body}");
    }
    let (_, listed) = owner
        .call(
            "GET",
            &format!("/anthropic/v1/sessions/{sid}/resources"),
            None,
        )
        .await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(9), "{listed}");
}

/// An environment's `packages` are what the session's template says its image provides: a
/// session asking for those runs (OpenAI's `python` and `system` being pip and apt), one asking
/// for more is refused naming what is missing and what the template has, and leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_packages_are_what_the_template_provides() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("templates.json"),
        r#"[{"name":"echo-py","kind":"api","command":"sandwarden echo-agent","pool":0,
             "packages":{"pip":["requests"],"apt":["git"]}}]"#,
    )
    .expect("templates");
    let _sweep = Sweep(dir.path().to_path_buf());
    let serve = Serve::start_in(dir.path(), &[]);
    let api = serve.client();
    let meta = json!({"sandwarden.harness": "echo-py"});
    let (_, agent) = api
        .call(
            "POST",
            "/anthropic/v1/agents",
            Some(json!({"name": "a", "model": "echo-small", "metadata": meta})),
        )
        .await;
    for (packages, ok) in [
        (json!({"pip": ["requests"], "apt": ["git"]}), true),
        (json!({"pip": ["requests", "numpy"]}), false),
    ] {
        let (status, env) = api
            .call(
                "POST",
                "/anthropic/v1/environments",
                Some(json!({"name": "e", "config": {"type": "cloud", "packages": packages}})),
            )
            .await;
        assert_eq!(status, 200, "{env}");
        let (status, s) = api
            .call(
                "POST",
                "/anthropic/v1/sessions",
                Some(json!({"agent": agent["id"], "environment_id": env["id"]})),
            )
            .await;
        if ok {
            assert_eq!(status, 200, "{s}");
        } else {
            assert_eq!(status, 400, "{s}");
            let said = s["error"]["message"].as_str().unwrap_or_default();
            assert!(
                said.contains("pip numpy") && said.contains("pip requests, apt git")
                    || said.contains("pip numpy") && said.contains("apt git, pip requests"),
                "{s}"
            );
        }
    }
    for (packages, ok) in [
        (json!({"python": ["requests"], "system": ["git"]}), true),
        (json!({"npm": ["left-pad"]}), false),
    ] {
        let (status, s) = api
            .call(
                "POST",
                "/openai/v1/agents/sessions",
                Some(
                    json!({"environment": {"type": "openai_hosted", "packages": packages},
                            "agent": {"model": "echo-small"}, "metadata": meta}),
                ),
            )
            .await;
        assert_eq!(status, if ok { 200 } else { 400 }, "{s}");
    }
    let (_, listed) = api.call("GET", "/v1/sessions", None).await;
    assert_eq!(
        listed["sessions"].as_array().map(Vec::len),
        Some(2),
        "only the two sessions whose packages the template has: {listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_clients_talk_to_sandboxed_agents() {
    let serve = Serve::start(&[]);
    let Some(out) = run_client(&serve, "chat_clients.py", "sdk-chat").await else {
        return;
    };
    assert!(out.contains("chat: ok"), "{out}");
    // A kept session is another tenant's to nobody.
    let session = client_session(&out);
    let other = crate::tenancy::tenant_client(&serve.client(), "sdk-chat-other").await;
    let (status, body) = other
        .http
        .post(format!("{}/v1/chat/completions", serve.base))
        .bearer_auth(&other.key)
        .header("x-sandwarden-session", &session)
        .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "mine?"}]}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("sent");
    assert_eq!(status, 404, "{:?}", body.text().await);
    // Only the kept sessions are live: every one-shot request's session was deleted.
    let live: Vec<String> = crate::seed_clients::live_sessions(&serve.client(), "sdk-chat", 4)
        .await
        .iter()
        .map(|s| s["id"].as_str().unwrap_or_default().to_string())
        .collect();
    // The kept chat session, and the Responses API's three stored conversations (continued,
    // streamed, the helper's).
    assert_eq!(live.len(), 4, "live sessions: {live:?}");
    assert!(live.contains(&session));
}
