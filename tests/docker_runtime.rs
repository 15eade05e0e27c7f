//! `serve --runtime docker` against a real container engine (Docker, or Podman's API service named
//! by `DOCKER_HOST`), through the public API: sessions in containers, messages, terminals, dead
//! containers, warm claims, restarts that adopt containers and remove orphans, and the limits.
//!
//! Needs the images `harness-images/build.sh base echo shell` builds from this build's binary.
//! Without an engine or the images the test says so loudly and skips; with
//! `SANDWARDEN_REQUIRE_DOCKER=1` (set by scripts/test once it has set both up) it fails instead.

mod common;

use bollard::Docker;
use bollard::query_parameters::{
    InspectContainerOptions, KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
};
use common::fake_model::FakeModel;
use common::shell::*;
use common::*;
use futures::{SinkExt, StreamExt};
use sandwarden::k8s::labels::{OWNER as LABEL_OWNER, SANDBOX as LABEL_SANDBOX};
use sandwarden::runtime::docker::container_name;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The tests share one engine and clean up what appeared while they ran: one at a time.
static ENGINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The engine, when it answers and has the images; otherwise skip (or fail when required).
async fn engine() -> Option<Docker> {
    let required = std::env::var("SANDWARDEN_REQUIRE_DOCKER").as_deref() == Ok("1");
    let problem = match Docker::connect_with_defaults() {
        Err(e) => format!("no container engine ({e})"),
        Ok(docker) => match docker.ping().await {
            Err(e) => format!("the container engine does not answer ({e}); set DOCKER_HOST"),
            Ok(_) => {
                let mut missing = Vec::new();
                for name in ["echo", "shell"] {
                    let image = format!("sandwarden/harness-{name}:{VERSION}");
                    if docker.inspect_image(&image).await.is_err() {
                        missing.push(image);
                    }
                }
                if missing.is_empty() {
                    return Some(docker);
                }
                format!(
                    "images missing: {} (build them with harness-images/build.sh --binary target/debug/sandwarden base echo shell)",
                    missing.join(", ")
                )
            }
        },
    };
    assert!(
        !required,
        "the docker runtime test is required but {problem}"
    );
    eprintln!("\n*** SKIPPED docker runtime test: {problem} ***\n");
    None
}

/// The owner label of the containers one `serve` runs (all its containers share it).
async fn owner_of(docker: &Docker, sandbox_ids: &[String]) -> String {
    for id in sandbox_ids {
        if let Ok(c) = docker
            .inspect_container(&container_name(id), None::<InspectContainerOptions>)
            .await
            && let Some(owner) = c
                .config
                .and_then(|c| c.labels)
                .and_then(|l| l.get(LABEL_OWNER).cloned())
        {
            return owner;
        }
    }
    panic!("no container found for {sandbox_ids:?}");
}

/// Lists containers with `label`, retrying while Podman reports a container in its transient
/// `stopped` state, which bollard cannot read.
async fn list(docker: &Docker, label: String) -> Vec<bollard::models::ContainerSummary> {
    let filters = HashMap::from([("label".to_string(), vec![label])]);
    let mut last = None;
    for _ in 0..50 {
        match docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
        {
            Ok(list) => return list,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("listing containers failed: {last:?}");
}

async fn containers_of(docker: &Docker, owner: &str) -> Vec<(String, bool)> {
    list(docker, format!("{LABEL_OWNER}={owner}"))
        .await
        .into_iter()
        .map(|c| {
            let id = c
                .labels
                .and_then(|l| l.get(LABEL_SANDBOX).cloned())
                .unwrap_or_default();
            (id, c.state.is_some_and(|s| s.to_string() == "running"))
        })
        .collect()
}

async fn remove(docker: &Docker, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        let _ = docker
            .remove_container(
                &container_name(&id),
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
    }
}

/// The sandbox ids of every labelled container on the engine.
async fn sandbox_ids(docker: &Docker) -> Vec<String> {
    list(docker, LABEL_SANDBOX.to_string())
        .await
        .into_iter()
        .filter_map(|c| c.labels.and_then(|l| l.get(LABEL_SANDBOX).cloned()))
        .collect()
}

/// Removes, even when the test fails, the containers that appeared during it.
struct Cleanup {
    docker: Docker,
    before: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let before = std::mem::take(&mut self.before);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Runtime::new() else {
                return;
            };
            rt.block_on(async {
                let new = sandbox_ids(&docker).await;
                remove(&docker, new.into_iter().filter(|id| !before.contains(id))).await;
            });
        })
        .join();
    }
}

async fn template_of(docker: &Docker, sandbox_id: &str) -> Option<String> {
    docker
        .inspect_container(&container_name(sandbox_id), None::<InspectContainerOptions>)
        .await
        .ok()
        .and_then(|c| c.config)
        .and_then(|c| c.labels)
        .and_then(|l| l.get("sandwarden.dev/template").cloned())
}

async fn tty_echo(url: &str, line: &str, marker: &str) -> String {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("attach");
    ws.send(Message::Binary(format!("{line}\n").into_bytes().into()))
        .await
        .expect("send");
    let mut out = String::new();
    while !out.contains(marker) {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal ended early: {other:?} after {out:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_run_in_containers_through_the_public_api() {
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("templates.json"),
        json!([
            {"name": "echo", "kind": "api", "command": "sandwarden echo-agent", "pool": 1},
            {"name": "sh", "kind": "tui", "command": "bash --noprofile --norc", "pool": 0,
             "container": {"image": format!("sandwarden/harness-shell:{VERSION}"),
                           "memory_mib": 256, "pids": 128}},
        ])
        .to_string(),
    )
    .expect("templates");
    let before: Vec<String> = sandbox_ids(&docker).await;
    let _cleanup = Cleanup {
        docker: docker.clone(),
        before: before.clone(),
    };
    let mut serve = Serve::start_in(dir.path(), &["--runtime", "docker"]);
    let api = serve.client();

    // A warm claim hands over the pre-started container; a message round-trips through it.
    let mut warm = false;
    for _ in 0..600 {
        for id in sandbox_ids(&docker).await {
            if !before.contains(&id) && template_of(&docker, &id).await.as_deref() == Some("echo") {
                warm = true;
            }
        }
        if warm {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(warm, "the warm pool started a container");
    tokio::time::sleep(Duration::from_millis(1000)).await; // until its harness answers
    let echo = api.create("echo").await;
    assert_eq!(
        echo["status"], "ready",
        "a warm claim is ready at once: {echo}"
    );
    let echo = echo["id"].as_str().expect("id").to_string();
    let (status, reply) = api.say(&echo, "hello container").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("hello container")),
        "{reply}"
    );

    // The session's files are the container's working directory: a client's file is read by
    // the agent in the container and comes back whole; `..` is refused.
    let (status, put) = api
        .call_bytes(
            "PUT",
            &format!("/v1/sessions/{echo}/files/in/cormorant-5e.txt"),
            b"cormorant 5e".to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&put));
    let (status, reply) = api.say(&echo, "/cat in/cormorant-5e.txt").await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["text"]
            .as_str()
            .unwrap_or("")
            .contains("cormorant 5e"),
        "{reply}"
    );
    let (status, got) = api
        .call_bytes(
            "GET",
            &format!("/v1/sessions/{echo}/files/in/cormorant-5e.txt"),
            Vec::new(),
        )
        .await;
    assert_eq!((status, got.as_slice()), (200, &b"cormorant 5e"[..]));
    let (status, _) = api
        .call_bytes(
            "GET",
            &format!("/v1/sessions/{echo}/files/..%2Fetc%2Fpasswd"),
            Vec::new(),
        )
        .await;
    assert_eq!(status, 422);

    // A terminal in a container: typed input reaches bash as the template's user.
    let sh = api.ready("sh").await;
    let (_, s) = api.call("GET", &format!("/v1/sessions/{sh}"), None).await;
    let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();
    let out = tty_echo(&tty_url, "echo uid=\"\"$(id -u)", "uid=1").await;
    assert!(out.contains("uid=10001"), "{out:?}");

    let ours: Vec<String> = sandbox_ids(&docker)
        .await
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    let owner = owner_of(&docker, &ours).await;

    // The limits are what the template says, with the secure defaults.
    let mut sh_container = None;
    for (id, _) in containers_of(&docker, &owner).await {
        if template_of(&docker, &id).await.as_deref() == Some("sh") {
            sh_container = Some(id);
        }
    }
    let sh_container = sh_container.expect("the shell's container");
    let info = docker
        .inspect_container(
            &container_name(&sh_container),
            None::<InspectContainerOptions>,
        )
        .await
        .expect("inspect");
    let host = info.host_config.expect("host config");
    assert_eq!(host.memory, Some(256 * 1024 * 1024));
    assert_eq!(host.pids_limit, Some(128));
    assert_eq!(host.readonly_rootfs, Some(true));
    let dropped = host.cap_drop.unwrap_or_default();
    assert!(
        dropped.iter().any(|c| c.eq_ignore_ascii_case("all")) || dropped.len() > 10,
        "all capabilities dropped: {dropped:?}"
    );
    assert_eq!(
        info.config.and_then(|c| c.user).as_deref(),
        Some("10001:10001")
    );

    // A restart adopts the running containers and removes orphans (one a crash left behind).
    serve.kill();
    let orphan = "sbx_orphan_left_by_a_crash";
    docker
        .create_container(
            Some(bollard::query_parameters::CreateContainerOptions {
                name: Some(container_name(orphan)),
                ..Default::default()
            }),
            bollard::models::ContainerCreateBody {
                image: Some(format!("sandwarden/harness-echo:{VERSION}")),
                labels: Some(HashMap::from([
                    (LABEL_OWNER.to_string(), owner.clone()),
                    (LABEL_SANDBOX.to_string(), orphan.to_string()),
                ])),
                ..Default::default()
            },
        )
        .await
        .expect("orphan created");
    let mut serve = Serve::start_in(dir.path(), &["--runtime", "docker"]);
    let api = serve.client();
    let (status, reply) = api.say(&echo, "after restart").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("after restart")),
        "{reply}"
    );
    let left: Vec<String> = containers_of(&docker, &owner)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(
        !left.contains(&orphan.to_string()),
        "the orphan is removed: {left:?}"
    );

    // Killing the container marks the session dead at once; the next message says so.
    let (_, s) = api.call("GET", &format!("/v1/sessions/{echo}"), None).await;
    assert_eq!(s["status"], "ready");
    for (id, running) in containers_of(&docker, &owner).await {
        if running && id != sh_container {
            let _ = docker
                .kill_container(&container_name(&id), None::<KillContainerOptions>)
                .await;
        }
    }
    let dead = api.wait_status(&echo, "dead").await;
    assert_eq!(dead["status"], "dead", "{dead}");
    let (status, problem) = api.say(&echo, "anyone there?").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["type"], "session_not_usable", "{problem}");

    // Deleting sessions removes their containers; stopping serve removes the warm ones.
    let (status, _) = api
        .call("DELETE", &format!("/v1/sessions/{sh}"), None)
        .await;
    assert!(status == 200 || status == 204);
    serve.stop();
    let mut left = containers_of(&docker, &owner).await;
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = containers_of(&docker, &owner).await;
    }
    remove(&docker, left.iter().map(|(id, _)| id.clone())).await;
    assert!(left.is_empty(), "no container is leaked: {left:?}");
}

/// Whether `image` exists; when it does not, skip loudly, or fail if `required`.
async fn image_or_skip(docker: &Docker, image: &str, required: bool) -> bool {
    if docker.inspect_image(image).await.is_ok() {
        return true;
    }
    assert!(!required, "{image} is required but missing");
    eprintln!("\n*** SKIPPED: {image} is not built (harness-images/build.sh node <harness>) ***\n");
    false
}

/// The model settings a harness's template gets, pointing at the fake model at `url`.
fn model_env(template: &str, url: &str) -> Vec<(String, String)> {
    let pairs: Vec<(&str, String)> = if template.starts_with("claude") {
        vec![
            ("ANTHROPIC_BASE_URL", url.to_string()),
            ("ANTHROPIC_API_KEY", "sk-ant-fake-in-container-0123".into()),
            ("ANTHROPIC_MODEL", "fake-model".into()),
        ]
    } else {
        vec![
            ("OPENAI_BASE_URL", format!("{url}/v1")),
            ("OPENAI_API_KEY", "sk-fake-in-container-0123".into()),
            ("OPENAI_MODEL", "fake-model".into()),
        ]
    };
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Starts `serve --runtime docker` with the built-in `template` pointed at a fake model on the
/// host's loopback (allowed with `--egress-allow`, reached through the container's egress relay),
/// waits for a session, and checks one exchange: a turn's reply for API harnesses, the program's
/// screen for terminal ones.
async fn drive_image(docker: &Docker, template: &str) {
    let before = sandbox_ids(docker).await;
    let _cleanup = Cleanup {
        docker: docker.clone(),
        before: before.clone(),
    };
    let model = FakeModel::start(&[]);
    let allow = model.base.trim_start_matches("http://").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut t = sandwarden::template::builtin_templates()
        .into_iter()
        .find(|t| t.name == template)
        .expect("a built-in template");
    t.env.extend(model_env(template, &model.base));
    std::fs::write(
        dir.path().join("templates.json"),
        serde_json::to_string(&[&t]).expect("template JSON"),
    )
    .expect("templates");
    let serve = Serve::start_in(
        dir.path(),
        &["--runtime", "docker", "--egress-allow", &allow],
    );
    let api = serve.client();
    let id = api.create(template).await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let ready = api
        .call(
            "GET",
            &format!("/v1/sessions/{id}?wait=true&timeout=60"),
            None,
        )
        .await
        .1;
    assert_eq!(ready["status"], "ready", "{template}: {ready}");
    if t.kind == sandwarden_harness::HarnessKind::Tui {
        let url = ready["tty_url"].as_str().expect("tty_url").to_string();
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("attach");
        let mut screen = Vec::new();
        while screen.len() < 200 {
            match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => screen.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                other => panic!("{template}: the terminal showed nothing: {other:?}"),
            }
        }
        drop(serve);
        return;
    }
    let (status, reply) = api.say(&id, "hello from a container").await;
    assert_eq!(status, 200, "{template}: {reply}");
    let text = reply["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("Hello from the fake model"),
        "{template}: {reply}"
    );
    let asked = serde_json::Value::from(model.requests().await).to_string();
    assert!(
        asked.contains("hello from a container"),
        "{template}: the prompt reached the model: {asked}"
    );
    drop(serve);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_harness_image_talks_to_the_fake_model_from_a_container() {
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    let required = std::env::var("SANDWARDEN_REQUIRE_DOCKER_HARNESS").as_deref() == Ok("1");
    if image_or_skip(
        &docker,
        &format!("sandwarden/harness-opencode:{VERSION}"),
        required,
    )
    .await
    {
        drive_image(&docker, "opencode").await;
    }
}

/// The rest of the image matrix, by flag (`SANDWARDEN_DOCKER_MATRIX=1`, after
/// `harness-images/build.sh` without names): every harness image against the fake model.
#[tokio::test(flavor = "multi_thread")]
async fn the_image_matrix_runs_by_flag() {
    if std::env::var("SANDWARDEN_DOCKER_MATRIX").as_deref() != Ok("1") {
        eprintln!("\n*** SKIPPED: the image matrix runs with SANDWARDEN_DOCKER_MATRIX=1 ***\n");
        return;
    }
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    for template in ["claude-agent-sdk", "codex", "claude-code", "codex-tui"] {
        if image_or_skip(
            &docker,
            &format!("sandwarden/harness-{template}:{VERSION}"),
            true,
        )
        .await
        {
            eprintln!("image matrix: {template}");
            drive_image(&docker, template).await;
            eprintln!("image matrix: {template} passed");
        }
    }
}

/// Writes `templates` (JSON) into a fresh data dir for `serve --runtime docker`.
fn data_dir_with(templates: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("templates.json"), templates.to_string()).expect("templates");
    dir
}

/// A template of the echo agent's image under another name (`start`, `pool`, `command` given).
fn echo_image_template(name: &str, command: &str, start: &str, pool: usize) -> serde_json::Value {
    json!({"name": name, "kind": "api", "command": command, "start": start, "pool": pool,
           "container": {"image": format!("sandwarden/harness-echo:{VERSION}")}})
}

/// Polls the session until it leaves `creating`, for at most `within`; returns it as last seen.
async fn settled(api: &Api, id: &str, within: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
        if s["status"] != "creating" || tokio::time::Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_with_env(api: &Api, harness: &str, env: serde_json::Value) -> serde_json::Value {
    let (status, s) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"harness": harness, "env": env})),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    s
}

/// What the echo agent of session `id` reads in its environment variable `name`.
async fn agent_env(api: &Api, id: &str, name: &str) -> String {
    let (status, reply) = api.say(id, &format!("/env {name}")).await;
    assert_eq!(status, 200, "{reply}");
    reply["text"].as_str().unwrap_or_default().to_string()
}

/// Waits until a container of `template` that was not there `before` has printed its harness's
/// listen line; returns its sandbox id.
async fn listening_container(docker: &Docker, before: &[String], template: &str) -> String {
    for _ in 0..600 {
        for id in sandbox_ids(docker).await {
            if before.contains(&id) || template_of(docker, &id).await.as_deref() != Some(template) {
                continue;
            }
            let mut logs = docker.logs(
                &container_name(&id),
                Some(bollard::query_parameters::LogsOptions {
                    stdout: true,
                    ..Default::default()
                }),
            );
            let mut out = String::new();
            while let Ok(Some(Ok(chunk))) =
                tokio::time::timeout(Duration::from_secs(2), logs.next()).await
            {
                out.push_str(&chunk.to_string());
            }
            if out.contains("listening") {
                return id;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no container of {template} started its harness");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_start_with_session_env_becomes_ready_and_its_agent_sees_the_env() {
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    let _cleanup = Cleanup {
        docker: docker.clone(),
        before: sandbox_ids(&docker).await,
    };
    // With env the session layer starts the template as `start: bind`: the harness waits in
    // `standby` (503 on /healthz) for the bind that starts the agent with the session's values.
    let dir = data_dir_with(json!([echo_image_template(
        "echo-cold",
        "sandwarden echo-agent",
        "boot",
        0
    )]));
    let serve = Serve::start_in(dir.path(), &["--runtime", "docker"]);
    let api = serve.client();
    let value = format!("cold-{}", uuid::Uuid::new_v4().simple());
    let created = create_with_env(&api, "echo-cold", json!({"GREETING": value})).await;
    assert_eq!(created["status"], "creating", "a cold start: {created}");
    let id = created["id"].as_str().expect("id").to_string();
    let s = settled(&api, &id, Duration::from_secs(40)).await;
    assert_eq!(
        s["status"], "ready",
        "the cold start with env is ready: {s}"
    );
    assert_eq!(agent_env(&api, &id, "GREETING").await, value);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bind_template_fills_its_warm_pool_and_a_claim_binds_the_session_env() {
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    let before = sandbox_ids(&docker).await;
    let _cleanup = Cleanup {
        docker: docker.clone(),
        before: before.clone(),
    };
    let dir = data_dir_with(json!([echo_image_template(
        "echo-bind",
        "sandwarden echo-agent",
        "bind",
        1
    )]));
    let serve = Serve::start_in(dir.path(), &["--runtime", "docker"]);
    let api = serve.client();
    listening_container(&docker, &before, "echo-bind").await;
    // The pool records the sandbox once serve has seen its harness answer (in `standby`); until
    // then a create is a cold start, which this test does not want: it is deleted and retried.
    let value = format!("warm-{}", uuid::Uuid::new_v4().simple());
    let mut warm = None;
    let mut last = serde_json::Value::Null;
    for _ in 0..60 {
        let s = create_with_env(&api, "echo-bind", json!({"GREETING": value})).await;
        let id = s["id"].as_str().expect("id").to_string();
        if s["status"] == "ready" {
            warm = Some(id);
            break;
        }
        let _ = api
            .call("DELETE", &format!("/v1/sessions/{id}"), None)
            .await;
        last = s;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let id = warm.unwrap_or_else(|| panic!("no create was a warm claim; last: {last}"));
    assert_eq!(
        agent_env(&api, &id, "GREETING").await,
        value,
        "the warm sandbox's agent started with the session's env"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_harness_that_fails_to_start_fails_the_session_at_once_with_its_reason() {
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    let _cleanup = Cleanup {
        docker: docker.clone(),
        before: sandbox_ids(&docker).await,
    };
    let missing = "/nonexistent/agent-for-the-failure-test";
    let dir = data_dir_with(json!([echo_image_template("broken", missing, "boot", 0)]));
    let serve = Serve::start_in(dir.path(), &["--runtime", "docker"]);
    let api = serve.client();
    let id = api.create("broken").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    // Well inside the 60 s a harness that never answers is given.
    let s = settled(&api, &id, Duration::from_secs(25)).await;
    assert_eq!(s["status"], "failed", "{s}");
    let reason = s["failure_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(missing),
        "the harness's reason reaches the session: {s}"
    );
}

/// The `SANDWARDEN_TOKEN` a container was started with.
async fn token_of(docker: &Docker, sandbox_id: &str) -> Option<String> {
    docker
        .inspect_container(&container_name(sandbox_id), None::<InspectContainerOptions>)
        .await
        .ok()?
        .config?
        .env?
        .into_iter()
        .find_map(|e| e.strip_prefix("SANDWARDEN_TOKEN=").map(String::from))
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_tokens_never_reach_serves_logs_even_at_trace() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    let before = sandbox_ids(&docker).await;
    let _cleanup = Cleanup {
        docker: docker.clone(),
        before: before.clone(),
    };
    let dir = data_dir_with(json!([
        {"name": "echo", "kind": "api", "command": "sandwarden echo-agent", "pool": 1},
    ]));
    let logs = tempfile::tempdir().expect("log dir");
    let stderr = std::fs::File::create(logs.path().join("stderr")).expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--runtime", "docker"])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--templates")
        .arg(dir.path().join("templates.json"))
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
        .env("SANDWARDEN_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("listen line");
    let v: serde_json::Value = serde_json::from_str(&line).expect("listen line is JSON");
    let api = Api {
        base: format!("http://{}", v["listening"].as_str().expect("address")),
        key: ADMIN_KEY.to_string(),
        http: reqwest::Client::new(),
    };
    let rest = std::thread::spawn(move || {
        let mut all = line.into_bytes();
        let _ = stdout.read_to_end(&mut all);
        all
    });

    // Containers created, inspected, bound and talked to: a plain session and one with env (each
    // a warm claim or a cold start, as the pool allows).
    let plain = api.ready("echo").await;
    let (status, reply) = api.say(&plain, "hello").await;
    assert_eq!(status, 200, "{reply}");
    let bound = create_with_env(&api, "echo", json!({"GREETING": "hi"})).await;
    let bound = bound["id"].as_str().expect("id").to_string();
    let s = settled(&api, &bound, Duration::from_secs(40)).await;
    assert_eq!(s["status"], "ready", "{s}");
    assert_eq!(agent_env(&api, &bound, "GREETING").await, "hi");

    let mut tokens = Vec::new();
    for id in sandbox_ids(&docker).await {
        if !before.contains(&id)
            && let Some(token) = token_of(&docker, &id).await
        {
            tokens.push(token);
        }
    }
    assert!(
        tokens.len() >= 2 && tokens.iter().all(|t| t.len() >= 16),
        "every sandbox has its token: {tokens:?}"
    );
    terminate(&mut child);
    let out = rest.join().expect("stdout reader");
    let err = std::fs::read(logs.path().join("stderr")).expect("stderr");
    // A positive control: serve did log below info, so a token in a record would have shown.
    let err_text = String::from_utf8_lossy(&err);
    assert!(
        err_text.contains("DEBUG"),
        "serve logged at debug: {}",
        &err_text[..err_text.len().min(2000)]
    );
    for (place, hay) in [("serve's stderr", &err), ("serve's stdout", &out)] {
        for token in &tokens {
            let found = hay.windows(token.len()).any(|w| w == token.as_bytes());
            assert!(!found, "a sandbox token leaked into {place}");
        }
    }
}

/// The `tty_url` of session `id`.
async fn tty_of(api: &Api, id: &str) -> String {
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    s["tty_url"].as_str().expect("tty_url").to_string()
}

/// The network boundary, tried from a tenant's terminal in a container: two tenants share one
/// `serve --runtime docker`; from A's shell, the host's loopback, serve, link-local and private
/// addresses and B's container are out of reach, directly and through the egress proxy, and the
/// address the operator allows is reachable both ways (the positive control).
#[tokio::test(flavor = "multi_thread")]
async fn a_tenants_container_reaches_only_what_the_egress_policy_allows() {
    let _one_at_a_time = ENGINE.lock().await;
    let Some(docker) = engine().await else {
        return;
    };
    let _cleanup = Cleanup {
        docker: docker.clone(),
        before: sandbox_ids(&docker).await,
    };
    let (forbidden_port, hits) = forbidden_service().await;
    let model_port = allowed_service().await;
    let dir = data_dir_with(json!([
        {"name": "sh", "kind": "tui", "command": "bash --noprofile --norc", "pool": 0,
         "container": {"image": format!("sandwarden/harness-shell:{VERSION}")}},
    ]));
    let allow = format!("127.0.0.1:{model_port}");
    let serve = Serve::start_in(
        dir.path(),
        &["--runtime", "docker", "--egress-allow", &allow],
    );
    let admin = serve.client();
    let mut tenants = Vec::new();
    for tenant in ["victim-b", "attacker-a"] {
        let (status, k) = admin
            .call("POST", "/v1/api-keys", Some(json!({"tenant": tenant})))
            .await;
        assert_eq!(status, 201, "{k}");
        tenants.push(admin.with_key(k["key"].as_str().expect("key")));
    }
    let (victim, attacker) = (&tenants[0], &tenants[1]);

    // B runs a service on its own loopback (a harness server of the image's, with a token of
    // its own; any HTTP answer, even its 401, shows the service is reached).
    let victim_sh = victim.ready("sh").await;
    let mut victim_shell = Shell::attach(&tty_of(victim, &victim_sh).await).await;
    let victim_port = 18_181;
    let (out, rc) = victim_shell
        .run(&format!(
            "(SANDWARDEN_TOKEN=victim-b-0123456789abcdef sandwarden-harness --listen \
             127.0.0.1:{victim_port} --kind tui --command sh --workdir /tmp >/dev/null 2>&1 &) ; \
             sleep 1; {}",
            http_get("127.0.0.1", victim_port, "/healthz")
        ))
        .await;
    let answered = |out: &str| out.lines().any(|l| l.trim_start().starts_with("HTTP/1.1 "));
    assert!(
        rc == 0 && answered(&out),
        "B reaches its own service: {out}"
    );

    let attacker_sh = attacker.ready("sh").await;
    let (_, s) = attacker
        .call("GET", &format!("/v1/sessions/{attacker_sh}"), None)
        .await;
    assert_eq!(s["isolation"], "container", "{s}");
    let mut sh = Shell::attach(&tty_of(attacker, &attacker_sh).await).await;

    // Loopback is its only interface.
    let (out, _) = sh.run("cat /proc/net/dev").await;
    let interfaces: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim()))
        .filter(|name| !name.is_empty() && !name.contains(' '))
        .collect();
    assert_eq!(interfaces, ["lo"], "{out}");
    let (out, rc) = sh.run("command -v ip >/dev/null && ip -o addr").await;
    if rc == 0 {
        assert!(
            out.lines()
                .all(|l| l.trim().is_empty() || l.contains(" lo ")),
            "{out}"
        );
    }
    let (out, _) = sh.run("echo \"proxy=[$HTTPS_PROXY]\"").await;
    assert!(out.contains("proxy=[http://127.0.0.1:3128]"), "{out}");

    // Not the host's loopback, not serve, not link-local or private, not B; the proxy refuses
    // each by address.
    let serve_port: u16 = serve
        .url("")
        .trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("serve's port");
    for (host, port) in [
        ("127.0.0.1", forbidden_port),
        ("127.0.0.1", serve_port),
        ("127.0.0.1", victim_port),
        ("169.254.169.254", 80),
        ("10.0.0.9", 80),
    ] {
        let (out, _) = sh.run(&http_get(host, port, "/")).await;
        // The typed command shows too; an answer is a line of its own.
        assert!(
            !out.lines().any(|l| l.trim_start().starts_with("HTTP/")),
            "{host}:{port} answered from inside A: {out}"
        );
    }
    for target in [
        format!("http://127.0.0.1:{forbidden_port}/"),
        format!("http://127.0.0.1:{serve_port}/healthz"),
        format!("http://127.0.0.1:{victim_port}/healthz"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.0.0.9/".to_string(),
    ] {
        let (out, _) = sh.run(&http_get("127.0.0.1", 3128, &target)).await;
        assert!(
            out.contains("403 Forbidden"),
            "the proxy must refuse {target}: {out}"
        );
    }
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the host's loopback service was reached"
    );

    // Positive control: the allowed address, directly (the relay) and through the proxy.
    let (out, _) = sh
        .run(&http_get("127.0.0.1", model_port, "/v1/models"))
        .await;
    assert!(out.contains("model-ok"), "the allowed address: {out}");
    let (out, _) = sh
        .run(&http_get(
            "127.0.0.1",
            3128,
            &format!("http://127.0.0.1:{model_port}/"),
        ))
        .await;
    assert!(out.contains("model-ok"), "and through the proxy: {out}");

    // B is untouched: its service answers it still, and serve still reaches its harness.
    let (out, _) = victim_shell
        .run(&http_get("127.0.0.1", victim_port, "/healthz"))
        .await;
    assert!(answered(&out), "{out}");

    // Deleting A's session removes its container, its sockets and its way out; B's (and the
    // built-in echo pool's) stay.
    let names = |sub: &str| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        name.trim_end_matches(".sock").to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let before = names("run");
    assert_eq!(before, names("sockets"));
    assert_eq!(before, names("egress"));
    drop(sh);
    let (status, _) = attacker
        .call("DELETE", &format!("/v1/sessions/{attacker_sh}"), None)
        .await;
    assert!(status == 200 || status == 204, "{status}");
    let after = names("run");
    let gone: Vec<&String> = before.iter().filter(|id| !after.contains(id)).collect();
    assert_eq!(gone.len(), 1, "A's socket is removed: {before:?} {after:?}");
    assert_eq!(after, names("sockets"), "and its socket directory");
    assert_eq!(after, names("egress"), "and its egress directory");
    assert!(
        !sandbox_ids(&docker).await.contains(gone[0]),
        "and its container"
    );
    let (out, _) = victim_shell.run("echo still-here").await;
    assert!(out.contains("still-here"), "{out}");
}
