//! Hostile input through the public surface of both servers: a real `serve` and a real `harness`
//! get oversized, deeply nested, malformed and slowly sent requests. Each is refused with a clear
//! problem (or the connection is closed in bounded time), and the server keeps working after.

use crate::common::*;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn host_port(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Sends `request` as raw bytes on a new connection and reads until the server closes it (or
/// `bound` passes, which fails the test). Returns everything the server sent.
async fn raw(addr: &str, request: &[u8], bound: Duration) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before reading all of a large request: not an error here.
    let _ = tcp.write_all(request).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(bound, async {
        let mut buf = [0u8; 8192];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server neither answered nor closed within {bound:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of a raw HTTP/1.1 response.
fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

/// The JSON document (a problem, or a reply) in a raw response's body.
fn problem_of(response: &str) -> serde_json::Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|_| panic!("no JSON body in {response:?}"))
}

/// A POST with `body` as raw bytes, closing the connection after the answer.
fn post(path: &str, token: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// Opens a connection that sends a request's headers one byte every 100 ms and never finishes
/// them; returns whether the server closed it before 30 s of dripping.
async fn slowloris_is_cut_off(addr: &str, path: &str) -> bool {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").as_bytes())
        .await
        .expect("request line");
    let mut buf = [0u8; 1024];
    for _ in 0..300 {
        if tcp.write_all(b"a").await.is_err() {
            return true;
        }
        // Whatever the server says first (a 408, say), it must then close.
        let read = tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return true;
        }
    }
    false
}

/// Sends the headers and the first bytes of a body that never completes; returns the answer.
async fn stalled_body(addr: &str, path: &str, token: &str) -> String {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"te"
    );
    raw(addr, head.as_bytes(), Duration::from_secs(30)).await
}

/// Request headers far beyond any real client's: one 1 MiB header, and then 10,000 small ones.
async fn assert_huge_headers_refused(addr: &str) {
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let answer = raw(addr, big.as_bytes(), Duration::from_secs(30)).await;
    assert_eq!(status_of(&answer), 431, "one huge header: {answer:.200}");
    let mut many = String::from("GET /healthz HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..10_000 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    let answer = raw(addr, many.as_bytes(), Duration::from_secs(30)).await;
    assert_eq!(status_of(&answer), 431, "many headers: {answer:.200}");
}

/// Well-formed JSON with 100,000 nested arrays between `prefix` and `suffix`.
fn deep_json(prefix: &str, suffix: &str) -> Vec<u8> {
    let mut body = prefix.as_bytes().to_vec();
    body.extend(std::iter::repeat_n(b'[', 100_000));
    body.extend(std::iter::repeat_n(b']', 100_000));
    body.extend_from_slice(suffix.as_bytes());
    body
}

#[tokio::test]
async fn serve_refuses_malformed_and_oversized_bodies_clearly_and_keeps_serving() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let addr = host_port(&serve.base);
    let id = api.ready("echo").await;
    let messages = format!("/v1/sessions/{id}/messages");

    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        (
            "deeply nested JSON in a part",
            deep_json(r#"{"parts":["#, "]}"),
            400,
            "invalid_json",
            "recursion limit",
        ),
        (
            "deeply nested JSON, unclosed",
            deep_json(r#"{"text":"x","user_params":"#, ""),
            400,
            "invalid_json",
            "EOF while parsing",
        ),
        (
            "invalid UTF-8 in a string",
            b"{\"text\":\"\xff\xfe\xfd\"}".to_vec(),
            400,
            "invalid_json",
            "invalid unicode",
        ),
        (
            "truncated JSON",
            br#"{"text":"#.to_vec(),
            400,
            "invalid_json",
            "not valid JSON",
        ),
        (
            "not JSON at all",
            b"\x00\x01\x02binary".to_vec(),
            400,
            "invalid_json",
            "not valid JSON",
        ),
        (
            "the wrong shape",
            br#"{"text":5}"#.to_vec(),
            422,
            "invalid_body",
            "does not match",
        ),
    ];
    for (what, body, status, kind, says) in cases {
        let answer = raw(
            &addr,
            &post(&messages, ADMIN_KEY, &body),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(status_of(&answer), status, "{what}: {answer:.300}");
        let p = problem_of(&answer);
        assert_eq!(p["type"], kind, "{what}: {p}");
        assert!(
            p["detail"].as_str().is_some_and(|d| d.contains(says)),
            "{what}: the detail says what is wrong: {p}"
        );
    }
    // Unknown fields are skipped without recursion, so nesting there is harmless: the message
    // is an ordinary one.
    let answer = raw(
        &addr,
        &post(
            &messages,
            ADMIN_KEY,
            &deep_json(r#"{"text":"deep but ignored","user_params":{"a":"#, "}}"),
        ),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer:.300}");
    assert_eq!(problem_of(&answer)["text"], "deep but ignored");

    // The same on session creation.
    let answer = raw(
        &addr,
        &post(
            "/v1/sessions",
            ADMIN_KEY,
            &deep_json(r#"{"harness":"echo","env":"#, "}"),
        ),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(status_of(&answer), 422, "{answer:.300}");
    assert_eq!(problem_of(&answer)["type"], "invalid_body");

    // One byte over the 16 MiB limit.
    let big = json!({"text": "a".repeat(16 * 1024 * 1024)});
    let (status, p) = api.call("POST", &messages, Some(big)).await;
    assert_eq!(
        (status, p["type"].as_str()),
        (413, Some("body_too_large")),
        "{p}"
    );
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("send less"))
    );

    assert_huge_headers_refused(&addr).await;

    // Nothing above reached the session or hurt the server.
    let health = reqwest::get(serve.url("/healthz")).await.expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(
        api.history_texts(&id).await,
        ["deep but ignored", "deep but ignored"],
        "only the one well-formed message became a turn (the user's text and the echo)"
    );
    let (status, reply) = api.say(&id, "still here").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("still here")),
        "{reply}"
    );
}

#[tokio::test]
async fn serve_cuts_off_slow_clients() {
    let serve = Serve::start(&["--client-timeout", "1"]);
    let api = serve.client();
    let addr = host_port(&serve.base);
    assert!(
        slowloris_is_cut_off(&addr, "/healthz").await,
        "a client dribbling its headers was still connected after 30 s"
    );
    let answer = stalled_body(&addr, "/v1/sessions", ADMIN_KEY).await;
    assert_eq!(status_of(&answer), 408, "{answer:.300}");
    let p = problem_of(&answer);
    assert_eq!(p["type"], "body_timeout", "{p}");

    // Many slow clients at once do not stop an ordinary one.
    let mut slow = Vec::new();
    for _ in 0..50 {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            slowloris_is_cut_off(&addr, "/healthz").await
        }));
    }
    let id = api.ready("echo").await;
    let (status, reply) = api.say(&id, "not starved").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("not starved")),
        "{reply}"
    );
    for s in slow {
        assert!(
            s.await.expect("slow client task"),
            "every slow client is cut off"
        );
    }
}

#[tokio::test]
async fn harness_refuses_hostile_requests_and_keeps_serving() {
    let h = Harness::api(&["--client-timeout", "1", "--max-request-bytes", "1048576"]);
    h.wait_phase("ready").await;
    let addr = h.addr.clone();

    for (path, body, status) in [
        ("/v1/turns", deep_json(r#"{"parts":["#, "]}"), 422),
        (
            "/v1/turns",
            b"{\"parts\":[{\"type\":\"text\",\"text\":\"\xff\"}]}".to_vec(),
            400,
        ),
        ("/v1/turns", br#"{"parts":"#.to_vec(), 400),
        ("/v1/bind", deep_json(r#"{"env":"#, "}"), 422),
        (
            "/v1/turns",
            format!(
                r#"{{"parts":[{{"type":"text","text":"{}"}}]}}"#,
                "a".repeat(2 * 1024 * 1024)
            )
            .into_bytes(),
            413,
        ),
    ] {
        let answer = raw(&addr, &post(path, TOKEN, &body), Duration::from_secs(30)).await;
        assert_eq!(status_of(&answer), status, "{path}: {answer:.300}");
        let p = problem_of(&answer);
        assert!(
            p["detail"].as_str().is_some_and(|d| d.len() > 20),
            "{path}: a problem that says what is wrong: {p}"
        );
        eprintln!("{path} ({status}): {}", p["detail"]);
    }
    assert_huge_headers_refused(&addr).await;
    let events = h
        .client
        .turn_to_end(&text_turn("between"))
        .await
        .expect("turn");
    assert_eq!(
        texts(&events),
        "between",
        "nothing above started a turn or broke one"
    );
    assert!(
        slowloris_is_cut_off(&addr, "/healthz").await,
        "a client dribbling its headers was still connected after 30 s"
    );
    let answer = stalled_body(&addr, "/v1/turns", TOKEN).await;
    assert_eq!(status_of(&answer), 408, "{answer:.300}");
    assert_eq!(problem_of(&answer)["type"], "body_timeout");

    h.wait_phase("ready").await;
    let events = h
        .client
        .turn_to_end(&text_turn("still here"))
        .await
        .expect("turn");
    assert_eq!(texts(&events), "still here");
}

/// A local receiver: answers every POST to /hook with `answer` (and `location`, if any);
/// returns its URL and a count of the requests it got.
async fn receiver(
    answer: u16,
    location: Option<String>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counted = counted.clone();
            let location = location.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut response = axum::response::Response::new(axum::body::Body::empty());
                *response.status_mut() =
                    axum::http::StatusCode::from_u16(answer).expect("a status code");
                if let Some(l) = location {
                    response.headers_mut().insert(
                        axum::http::header::LOCATION,
                        l.parse().expect("a header value"),
                    );
                }
                response
            }
        }),
    );
    (crate::common::serve_hook(app).await, hits)
}

#[tokio::test]
async fn webhooks_do_not_follow_a_redirect_from_an_allowed_target() {
    use std::sync::atomic::Ordering;
    // Private targets are allowed here so that the first hop (a local receiver) is reachable;
    // the redirect it answers with, to what stands for a private service, must not be followed.
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (inner, inner_hits) = receiver(200, None).await;
    let (outer, outer_hits) = receiver(307, Some(inner)).await;
    let turn_id = api
        .post_async(&id, json!({"text": "hooked", "webhook": {"url": outer}}))
        .await;
    let mut delivery = serde_json::Value::Null;
    for _ in 0..200 {
        let (_, turn) = api
            .call("GET", &format!("/v1/sessions/{id}/turns/{turn_id}"), None)
            .await;
        delivery = turn["webhook_deliveries"][0].clone();
        if delivery["status"] == "failed" || delivery["status"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delivery["status"], "failed", "{delivery}");
    assert_eq!(delivery["last_status"], 307, "{delivery}");
    assert!(
        delivery["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("do not follow redirects")),
        "the record says why: {delivery}"
    );
    assert_eq!(
        outer_hits.load(Ordering::SeqCst),
        1,
        "one attempt, no retry"
    );
    assert_eq!(
        inner_hits.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
}

#[tokio::test]
async fn webhooks_to_private_targets_are_refused_in_every_spelling() {
    let serve = Serve::start_strict(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    for url in [
        "http://localhost:9/hook",
        "http://LocalHost:9/hook",
        "http://[::1]:9/hook",
        "http://[::ffff:169.254.169.254]/latest/meta-data",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data",
        "http://2130706433/hook",
        "http://0x7f.0.0.1/hook",
        "http://10.0.0.1/hook",
        "http://[fd00::1]/hook",
        "http://[fe80::1]/hook",
    ] {
        let (status, p) = api
            .call(
                "POST",
                &format!("/v1/sessions/{id}/messages"),
                Some(json!({"text": "x", "async": true, "webhook": {"url": url}})),
            )
            .await;
        assert_eq!(
            (status, p["type"].as_str()),
            (422, Some("invalid_webhook")),
            "{url}: {p}"
        );
        assert!(
            p["detail"]
                .as_str()
                .is_some_and(|d| d.contains("--allow-private-webhooks")),
            "{url}: says how to allow it: {p}"
        );
    }
    assert_eq!(api.history_texts(&id).await, Vec::<String>::new());
}

/// A hostile harness answering serve's small requests: one answer per connection, chosen by
/// the request's path.
async fn hostile_harness() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let (status, size) = match path.as_str() {
                    // A refusal of 32 MiB, and an answer of 2 MiB.
                    "/v1/options" if head.contains("x-case: refusal") => ("500 Oops", 32 << 20),
                    "/v1/options" if head.contains("x-case: huge") => ("200 OK", 2 << 20),
                    // Never answers.
                    _ => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
                );
                if tcp.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'A'; 64 * 1024];
                let mut sent = 0;
                while sent < size {
                    if tcp.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
            });
        }
    });
    format!("http://{addr}")
}

/// What serve asks a sandbox's harness for itself (its agent's options) is bounded: a refusal's
/// body is read no further than 64 KiB and its detail kept to 1 KiB, an answer over 1 MiB is
/// refused, and a harness that never answers is given up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_harness_cannot_flood_or_hold_serve() {
    use sandwarden_proto::harness_client::{ClientError, HarnessClient, SMALL_REQUEST_TIMEOUT};
    let base = hostile_harness().await;
    let client = |case: &str| {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-case", case.parse().expect("header"));
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("client");
        HarnessClient::with_http(http, base.clone(), "token")
    };
    match client("refusal").agent_options().await {
        Err(ClientError::Refused(p)) => {
            assert_eq!(p.status, 500);
            assert!(
                p.detail.len() <= 1024 + 4,
                "{} bytes of detail",
                p.detail.len()
            );
        }
        other => panic!("a refusal: {other:?}"),
    }
    match client("huge").agent_options().await {
        Err(ClientError::Stream(m)) => assert!(m.contains("larger than"), "{m}"),
        other => panic!("a refused answer: {other:?}"),
    }
    let started = tokio::time::Instant::now();
    let hung = tokio::time::timeout(SMALL_REQUEST_TIMEOUT * 3, client("silent").agent_options())
        .await
        .expect("serve gives up on a silent harness");
    assert!(hung.is_err(), "{hung:?}");
    eprintln!(
        "a silent harness was given up on after {:?}",
        started.elapsed()
    );
}
