//! The API kind through its real surface: a `sandwarden harness` process on 127.0.0.1:0 driving
//! a real `sandwarden echo-agent` over ACP, reached with a real HTTP client.

use crate::common::*;
use futures::StreamExt;
use sandwarden_proto::event::{BindFile, BindRequest, Decision, EventType, InputAnswer, TurnEvent};
use sandwarden_proto::harness_client::ClientError;

fn refused(e: ClientError) -> sandwarden_proto::problem::Problem {
    match e {
        ClientError::Refused(p) => p,
        other => panic!("expected a problem answer, got {other:?}"),
    }
}

#[tokio::test]
async fn a_turn_streams_events_in_order_ending_in_done() {
    let h = Harness::api(&[]);
    h.wait_phase("ready").await;
    let text = "the quick brown fox jumps over the lazy dog";
    let events = h.client.turn_to_end(&text_turn(text)).await.expect("turn");
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&EventType::StepStart), "{k:?}");
    assert_eq!(k.last(), Some(&EventType::Done), "{k:?}");
    assert_eq!(k[k.len() - 2], EventType::StepFinish);
    assert!(
        k.iter().filter(|k| **k == EventType::Text).count() >= 3,
        "streams in chunks: {k:?}"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.index, i as u64, "gap-free, ordered indices");
        assert_eq!(e.turn_id, events[0].turn_id);
    }
    assert_eq!(texts(&events), text);
    let done = &events.last().expect("done").data;
    assert_eq!(done["stop_reason"], "end_turn");
    assert_eq!(done["usage"]["input_tokens"], 9);
    assert_eq!(done["usage"]["total_tokens"], 18);
    assert!(done["duration_ms"].is_u64());
    let health = h.wait_phase("ready").await;
    assert_eq!(health["used"], true);
    assert!(
        health.get("turn_id").is_none(),
        "no turn left running: {health}"
    );
}

#[tokio::test]
async fn tool_calls_and_reasoning_are_mapped() {
    let h = Harness::api(&[]);
    let events = h
        .client
        .turn_to_end(&text_turn("/tool file body"))
        .await
        .expect("turn");
    let k = kinds(&events);
    let use_at = k
        .iter()
        .position(|k| *k == EventType::ToolUse)
        .expect("tool_use");
    let result_at = k
        .iter()
        .position(|k| *k == EventType::ToolResult)
        .expect("tool_result");
    assert!(use_at < result_at);
    assert_eq!(events[use_at].data["kind"], "read");
    assert_eq!(events[result_at].data["output"], "file body");
    assert_eq!(events[result_at].data["id"], events[use_at].data["id"]);

    let events = h
        .client
        .turn_to_end(&text_turn("/think deep"))
        .await
        .expect("turn");
    let reasoning = events
        .iter()
        .find(|e| e.kind == EventType::Reasoning)
        .expect("reasoning");
    assert_eq!(reasoning.data["text"], "thinking about: deep");
    assert_eq!(texts(&events), "deep");
}

/// Starts a slow turn and returns its stream after the first text event.
async fn slow_turn(
    h: &Harness,
) -> (
    String,
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<TurnEvent, ClientError>> + Send>>,
) {
    let mut stream = Box::pin(
        h.client
            .turn(&text_turn("/slow 200 tick"))
            .await
            .expect("turn"),
    );
    loop {
        let e = stream.next().await.expect("event").expect("valid event");
        if e.kind == EventType::Text {
            return (e.turn_id, stream);
        }
    }
}

async fn rest(
    mut stream: std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<TurnEvent, ClientError>> + Send>,
    >,
) -> Vec<TurnEvent> {
    let mut out = Vec::new();
    while let Some(e) = stream.next().await {
        out.push(e.expect("valid event"));
    }
    out
}

#[tokio::test]
async fn cancel_ends_a_running_turn_as_cancelled() {
    let h = Harness::api(&[]);
    let (turn_id, stream) = slow_turn(&h).await;
    let answer = h.client.cancel().await.expect("cancel accepted");
    assert_eq!(answer["turn_id"], turn_id.as_str());
    let events = rest(stream).await;
    let last = events.last().expect("a terminal event");
    let said_cancelled = match last.kind {
        EventType::Done => last.data["stop_reason"] == "cancelled",
        EventType::Error => last.data["code"] == "cancelled",
        _ => false,
    };
    assert!(said_cancelled, "ends saying cancelled: {last:?}");
    let ticks = events.iter().filter(|e| e.kind == EventType::Text).count();
    assert!(
        ticks < 150,
        "the agent stopped early ({ticks} of 200 chunks)"
    );
    // Nothing left running: cancel again is a clear 409 and a new turn works.
    let p = refused(h.client.cancel().await.expect_err("nothing to cancel"));
    assert_eq!((p.status, p.kind.as_str()), (409, "no_turn_running"));
    let events = h
        .client
        .turn_to_end(&text_turn("again"))
        .await
        .expect("turn");
    assert_eq!(texts(&events), "again");
}

#[tokio::test]
async fn a_second_turn_while_one_runs_gets_409_naming_it() {
    let h = Harness::api(&[]);
    let (turn_id, stream) = slow_turn(&h).await;
    let p = refused(
        h.client
            .turn(&text_turn("me too"))
            .await
            .map(|_| ())
            .expect_err("second turn refused"),
    );
    assert_eq!(p.status, 409);
    assert_eq!(p.kind, "turn_in_progress");
    assert_eq!(p.extra["turn_id"], turn_id.as_str());
    h.client.cancel().await.expect("cancel");
    rest(stream).await;
}

#[tokio::test]
async fn a_permission_request_round_trips() {
    let h = Harness::api(&[]);
    for (decision, expect) in [
        (Decision::ApproveOnce, "permission granted (allow-once)"),
        (
            Decision::ApproveSession,
            "permission granted (allow-always)",
        ),
        (Decision::Deny, "permission denied (reject-once)"),
    ] {
        let mut stream = Box::pin(
            h.client
                .turn(&text_turn("/ask delete build/?"))
                .await
                .expect("turn"),
        );
        let asked = loop {
            let e = stream.next().await.expect("event").expect("valid");
            if e.kind == EventType::InputRequired {
                break e;
            }
        };
        let request_id = asked.data["request_id"]
            .as_str()
            .expect("request id")
            .to_string();
        assert_eq!(asked.data["tool"]["title"], "delete build/?");
        assert_eq!(asked.data["options"].as_array().map(Vec::len), Some(3));

        // A refused answer changes nothing: the request stays open.
        let bad = InputAnswer {
            option_id: Some("maybe".into()),
            ..Default::default()
        };
        let p = refused(
            h.client
                .answer(&request_id, &bad)
                .await
                .expect_err("unknown option"),
        );
        assert_eq!((p.status, p.kind.as_str()), (422, "invalid_answer"));
        assert!(
            p.detail.contains("allow-once"),
            "lists what was offered: {}",
            p.detail
        );

        let good = InputAnswer {
            decision: Some(decision),
            ..Default::default()
        };
        h.client
            .answer(&request_id, &good)
            .await
            .expect("answer accepted");
        let events = rest(stream).await;
        assert_eq!(texts(&events), expect);
        assert_eq!(events.last().map(|e| e.kind), Some(EventType::Done));
        // Answered once; a second answer is 404.
        let p = refused(
            h.client
                .answer(&request_id, &good)
                .await
                .expect_err("already answered"),
        );
        assert_eq!(p.status, 404);
    }
}

#[tokio::test]
async fn an_agent_killed_mid_turn_ends_the_turn_and_fails_health() {
    let h = Harness::api(&[]);
    let (_, stream) = slow_turn(&h).await;
    let agents = children(h.pid());
    assert_eq!(agents.len(), 1, "one agent process: {agents:?}");
    signal(agents[0], nix::sys::signal::Signal::SIGKILL);
    let events = rest(stream).await;
    let last = events.last().expect("terminal event");
    assert_eq!(last.kind, EventType::Error, "{last:?}");
    assert_eq!(last.data["code"], "agent_exited");
    assert_eq!(last.data["exit"]["signal"], 9);
    // Health already says failed when the error arrives (no polling needed).
    let health = h.client.health().await.expect("health");
    let health = serde_json::to_value(health).expect("json");
    assert_eq!(health["phase"], "failed", "{health}");
    assert_eq!(health["exit"]["signal"], 9);
    // Further turns are refused with the reason.
    let p = refused(
        h.client
            .turn(&text_turn("hello"))
            .await
            .map(|_| ())
            .expect_err("agent is gone"),
    );
    assert_eq!((p.status, p.kind.as_str()), (503, "agent_failed"));
}

#[tokio::test]
async fn a_crashing_agent_reports_its_exit_code_and_stderr() {
    let h = Harness::api(&[]);
    let events = h
        .client
        .turn_to_end(&text_turn("/crash 7"))
        .await
        .expect("turn");
    let last = events.last().expect("terminal");
    assert_eq!(last.data["code"], "agent_exited", "{last:?}");
    assert_eq!(last.data["exit"]["code"], 7);
    let health = h.wait_phase("failed").await;
    assert_eq!(health["exit"]["code"], 7);
    let tail = health["stderr_tail"].as_array().expect("stderr tail");
    assert!(
        tail.iter()
            .any(|l| l.as_str().unwrap_or("").contains("crashing on request")),
        "{health}"
    );
    assert!(
        health["reason"]
            .as_str()
            .unwrap_or("")
            .contains("exit code 7")
    );
}

#[tokio::test]
async fn an_agent_that_cannot_start_reports_failed() {
    let h = Harness::start(&["--kind", "api", "--agent", "/nonexistent/agent --acp"]);
    let health = h.wait_phase("failed").await;
    assert!(
        health["reason"]
            .as_str()
            .unwrap_or("")
            .contains("cannot start the agent"),
        "{health}"
    );
}

#[tokio::test]
async fn an_agent_error_is_a_turn_error_not_a_failure() {
    let h = Harness::api(&[]);
    let events = h
        .client
        .turn_to_end(&text_turn("/fail out of cheese"))
        .await
        .expect("turn");
    let last = events.last().expect("terminal");
    assert_eq!(last.kind, EventType::Error);
    assert_eq!(last.data["code"], "agent_error");
    assert!(
        last.data["message"]
            .as_str()
            .unwrap_or("")
            .contains("out of cheese")
    );
    h.wait_phase("ready").await;
    let events = h
        .client
        .turn_to_end(&text_turn("still here"))
        .await
        .expect("turn");
    assert_eq!(texts(&events), "still here");
}

#[tokio::test]
async fn a_turn_past_its_timeout_is_cancelled_with_a_timeout_error() {
    let h = Harness::api(&["--turn-timeout", "1"]);
    let events = h
        .client
        .turn_to_end(&text_turn("/slow 100 tick"))
        .await
        .expect("turn");
    let last = events.last().expect("terminal");
    assert_eq!(last.kind, EventType::Error, "{last:?}");
    assert_eq!(last.data["code"], "timeout");
    h.wait_phase("ready").await;
}

#[tokio::test]
async fn bad_requests_get_clear_4xx_and_change_nothing() {
    let h = Harness::api(&["--max-request-bytes", "4096"]);
    h.wait_phase("ready").await;
    let turns = h.url("/v1/turns");
    let cases: &[(&str, u16, &str)] = &[
        ("{not json", 400, "invalid_json"),
        (r#"{"parts":"hello"}"#, 422, "invalid_body"),
        (
            r#"{"parts":[{"type":"text","text":5}]}"#,
            422,
            "invalid_body",
        ),
        (
            r#"{"parts":[{"type":"video","url":"x"}]}"#,
            422,
            "invalid_body",
        ),
        (r#"{"text":"hi"}"#, 422, "invalid_body"),
        (r#"{"parts":[]}"#, 422, "invalid_turn"),
        (
            r#"{"parts":[{"type":"text","text":"   "}]}"#,
            422,
            "invalid_turn",
        ),
        (
            r#"{"parts":[{"type":"text","text":"x"}],"timeout_s":"soon"}"#,
            422,
            "invalid_body",
        ),
        (
            r#"{"turn_id":"has space","parts":[{"type":"text","text":"x"}]}"#,
            422,
            "invalid_turn",
        ),
    ];
    for (body, status, kind) in cases {
        let (got, problem) = post_json(&turns, Some(TOKEN), body).await;
        assert_eq!(got, *status, "{body} -> {problem}");
        assert_eq!(problem["type"], *kind, "{body} -> {problem}");
        assert!(
            problem["detail"].as_str().is_some_and(|d| d.len() > 10),
            "{problem}"
        );
    }
    let big = format!(
        r#"{{"parts":[{{"type":"text","text":"{}"}}]}}"#,
        "x".repeat(8192)
    );
    let (got, problem) = post_json(&turns, Some(TOKEN), &big).await;
    assert_eq!(
        (got, problem["type"].as_str()),
        (413, Some("body_too_large")),
        "{problem}"
    );

    let resp = reqwest::Client::new()
        .post(&turns)
        .bearer_auth(TOKEN)
        .body(r#"{"parts":[{"type":"text","text":"x"}]}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 415);

    let (got, _) = post_json(
        &h.url("/v1/inputs/bad%20id"),
        Some(TOKEN),
        r#"{"decision":"deny"}"#,
    )
    .await;
    assert_eq!(got, 400);
    let (got, p) = post_json(
        &h.url("/v1/inputs/nope"),
        Some(TOKEN),
        r#"{"decision":"maybe"}"#,
    )
    .await;
    assert_eq!(got, 422, "{p}");
    let (got, p) = post_json(
        &h.url("/v1/inputs/nope"),
        Some(TOKEN),
        r#"{"decision":"deny"}"#,
    )
    .await;
    assert_eq!((got, p["type"].as_str()), (404, Some("input_not_found")));
    let (got, p) = post_json(&h.url("/v1/nothing"), Some(TOKEN), "{}").await;
    assert_eq!((got, p["type"].as_str()), (404, Some("not_found")));
    let resp = reqwest::Client::new()
        .get(h.url("/v1/tty"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 409, "tty on an api harness");

    let health = h.wait_phase("ready").await;
    assert_eq!(
        health["used"], false,
        "no bad request started a turn: {health}"
    );
}

#[tokio::test]
async fn a_missing_or_wrong_token_gets_401() {
    let h = Harness::api(&[]);
    for path in [
        "/healthz",
        "/v1/turns",
        "/v1/bind",
        "/v1/tty",
        "/v1/unknown",
    ] {
        let (status, p) = post_json(&h.url(path), None, "{}").await;
        assert_eq!(status, 401, "{path}");
        assert_eq!(p["type"], "unauthorized");
        let (status, _) = post_json(&h.url(path), Some("wrong-token-value"), "{}").await;
        assert_eq!(status, 401, "{path}");
    }
    let resp = reqwest::Client::new()
        .get(h.url("/healthz"))
        .send()
        .await
        .expect("sent");
    assert_eq!(
        resp.headers().get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
}

#[tokio::test]
async fn late_binding_restarts_the_agent_with_session_env_and_files() {
    let h = Harness::api(&["--start", "bind"]);
    let health = h.wait_phase("standby").await;
    assert_eq!(health["bound"], false);
    assert!(children(h.pid()).is_empty(), "no agent before bind");

    // A bad bind changes nothing.
    let bad = BindRequest {
        files: vec![BindFile {
            path: "../escape".into(),
            content: Some("x".into()),
            content_base64: None,
            mode: None,
        }],
        ..Default::default()
    };
    let p = refused(h.client.bind(&bad).await.expect_err("refused"));
    assert_eq!((p.status, p.kind.as_str()), (422, "invalid_bind"));
    assert!(
        !h.workdir
            .path()
            .parent()
            .expect("parent")
            .join("escape")
            .exists()
    );

    let bind = BindRequest {
        env: [("SESSION_SECRET".to_string(), "s3cr3t-value".to_string())].into(),
        files: vec![BindFile {
            path: "proj/notes.txt".into(),
            content: Some("bound file".into()),
            content_base64: None,
            mode: Some(0o600),
        }],
        cwd: Some("proj".into()),
        ..Default::default()
    };
    h.client.bind(&bind).await.expect("bind");
    h.wait_phase("ready").await;
    let said = |events: Vec<TurnEvent>| texts(&events);
    assert_eq!(
        said(
            h.client
                .turn_to_end(&text_turn("/env SESSION_SECRET"))
                .await
                .expect("turn")
        ),
        "s3cr3t-value"
    );
    assert_eq!(
        said(
            h.client
                .turn_to_end(&text_turn("/cat notes.txt"))
                .await
                .expect("turn")
        ),
        "bound file"
    );
    let cwd = said(
        h.client
            .turn_to_end(&text_turn("/cwd"))
            .await
            .expect("turn"),
    );
    assert!(cwd.ends_with("/proj"), "{cwd}");
    // The harness token never reaches the agent.
    let events = h
        .client
        .turn_to_end(&text_turn("/env SANDWARDEN_TOKEN"))
        .await
        .expect("turn");
    assert_eq!(said(events), "");
    // After first use, binding again is refused.
    let p = refused(h.client.bind(&bind).await.expect_err("already used"));
    assert_eq!((p.status, p.kind.as_str()), (409, "already_used"));
    let health = h.wait_phase("ready").await;
    assert_eq!(health["bound"], true);
}

#[tokio::test]
async fn a_turn_on_a_standby_sandbox_starts_the_agent() {
    let h = Harness::api(&["--start", "bind"]);
    h.wait_phase("standby").await;
    let events = h
        .client
        .turn_to_end(&text_turn("wake up"))
        .await
        .expect("turn");
    assert_eq!(texts(&events), "wake up");
}

#[tokio::test]
async fn sigterm_ends_turns_and_stops_the_agent() {
    let mut h = Harness::api(&[]);
    let (_, stream) = slow_turn(&h).await;
    let agents = children(h.pid());
    assert_eq!(agents.len(), 1);
    let status = h.terminate();
    assert!(status.success(), "clean exit: {status:?}");
    let events = rest(stream).await;
    let last = events.last().expect("terminal");
    assert_eq!(last.kind, EventType::Error, "{last:?}");
    assert_eq!(last.data["code"], "shutdown");
    assert!(!alive(agents[0]), "the agent was stopped");
}
