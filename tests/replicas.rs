//! Two real `sandwarden serve` replicas on one PostgreSQL database (each test its own database),
//! sharing a server secret, each with its own data dir and local sandboxes, and no sticky
//! routing: whatever one replica did, the other sees and honours.
//!
//! Needs `SANDWARDEN_TEST_POSTGRES` (scripts/start-postgres); skips without it unless
//! `SANDWARDEN_REQUIRE_POSTGRES=1` (set by scripts/test).

mod common;

use common::Serve;
use futures::StreamExt;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Replicas {
    a: Serve,
    b: Serve,
    db: String,
}

/// Two replicas on a fresh database, with `extra` flags for both.
async fn replicas(extra: &[&str]) -> Option<Replicas> {
    let db = common::postgres_database().await?;
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let env = [
        ("SANDWARDEN_STORE", db.clone()),
        ("SANDWARDEN_SECRET", secret),
    ];
    let a = Serve::start_with_env(extra, &env);
    let b = Serve::start_with_env(extra, &env);
    Some(Replicas { a, b, db })
}

/// The session's events as the store has them, checked gap-free from 1.
async fn stored_seqs(api: &common::Api, id: &str) -> Vec<(i64, String)> {
    let (_, events) = api
        .call("GET", &format!("/v1/sessions/{id}/events?limit=1000"), None)
        .await;
    let list: Vec<(i64, String)> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64().expect("seq"),
                e["type"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let seqs: Vec<i64> = list.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=list.len() as i64).collect::<Vec<_>>(),
        "gap-free from 1"
    );
    list
}

#[tokio::test]
async fn one_turn_at_a_time_holds_across_replicas_and_seq_continues() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let id = a.ready("echo").await;
    let turn = a.post_async(&id, json!({"text": "/slow 20 first"})).await;
    let (status, problem) = b.say(&id, "second").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["type"], "turn_in_progress");
    assert_eq!(problem["turn_id"], turn, "names the turn running on A");
    // B's long-poll of A's turn wakes when A ends it.
    let finished = b.finished_turn(&id, &turn).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    // A turn on B after A's: its events continue the session's seq.
    let (status, reply) = b.say(&id, "on b").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("on b")),
        "{reply}"
    );
    let (status, reply) = a.say(&id, "on a again").await;
    assert_eq!(status, 200, "{reply}");
    let events = stored_seqs(&a, &id).await;
    assert_eq!(
        events.iter().filter(|(_, k)| k == "done").count(),
        3,
        "three turns, each ended once"
    );
    let texts = a.history_texts(&id).await;
    assert_eq!(
        texts[2..],
        ["on b", "on b", "on a again", "on a again"].map(String::from),
        "{texts:?}"
    );
}

/// Reads a session's SSE stream until `done_count` turns ended; returns (seq, type).
async fn follow(
    api: &common::Api,
    id: &str,
    last_event_id: Option<&str>,
    done_count: usize,
) -> Vec<(i64, String)> {
    use eventsource_stream::Eventsource;
    let mut req = api
        .http
        .get(api.base.clone() + &format!("/v1/sessions/{id}/events"))
        .header("accept", "text/event-stream")
        .bearer_auth(&api.key);
    if let Some(l) = last_event_id {
        req = req.header("last-event-id", l);
    }
    let resp = req.send().await.expect("sse");
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    let mut done = 0;
    while done < done_count {
        let e = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| panic!("SSE stalled after {out:?}"))
            .expect("stream open")
            .expect("event");
        if e.event == "done" {
            done += 1;
        }
        out.push((e.id.parse().expect("numeric id"), e.event));
    }
    out
}

#[tokio::test]
async fn events_of_a_turn_on_one_replica_stream_from_the_other_gap_free_and_resumable() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let id = a.ready("echo").await;
    let b_id = id.clone();
    let b_api = r.b.client();
    let watcher = tokio::spawn(async move { follow(&b_api, &b_id, None, 2).await });
    // The stream on B is subscribed once it sent its headers; turns start after a moment's
    // grace either way, since B catches up from the store first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = a.post_async(&id, json!({"text": "/slow 5 one"})).await;
    assert_eq!(a.finished_turn(&id, &t1).await["status"], "completed");
    let t2 = a.post_async(&id, json!({"text": "/slow 5 two"})).await;
    assert_eq!(a.finished_turn(&id, &t2).await["status"], "completed");
    let seen = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("B streamed both turns")
        .expect("watcher");
    let stored = stored_seqs(&a, &id).await;
    assert_eq!(seen, stored, "B streamed exactly what A stored, in order");
    // Resuming on B from the middle gives the rest.
    let middle = stored[stored.len() / 2].0;
    let rest = follow(&b, &id, Some(&middle.to_string()), 1).await;
    assert_eq!(rest, stored[stored.len() / 2 + 1..].to_vec());
}

#[tokio::test]
async fn a_long_poll_on_one_replica_wakes_on_a_change_made_by_the_other() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let id = a.ready("echo").await;
    a.post_async(&id, json!({"text": "/slow 15 busy"})).await;
    let (_, s) = b.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "running");
    // A poll that timed out would answer the `running` it last read; `ready` means A's change
    // woke it.
    let (_, s) = b
        .call(
            "GET",
            &format!("/v1/sessions/{id}?wait=true&timeout=60"),
            None,
        )
        .await;
    assert_eq!(s["status"], "ready", "{s}");
}

#[tokio::test]
async fn an_idempotency_key_holds_across_replicas() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let create = |api: &common::Api| {
        api.http
            .post(format!("{}/v1/sessions", api.base))
            .bearer_auth(&api.key)
            .header("Idempotency-Key", "create-once-1")
            .json(&json!({"harness": "echo", "title": "once"}))
            .send()
    };
    // Both replicas at once, then each again: one session, the same answer everywhere.
    let (first, second) = tokio::join!(create(&a), create(&b));
    let mut ids = Vec::new();
    for resp in [first, second, create(&a).await, create(&b).await] {
        let resp = resp.expect("create sent");
        assert!(resp.status().is_success(), "{}", resp.status());
        let body: serde_json::Value = resp.json().await.expect("session");
        ids.push(body["id"].as_str().expect("id").to_string());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one session for one key: {ids:?}");
    let (_, list) = b.call("GET", "/v1/sessions", None).await;
    let titled = list["sessions"]
        .as_array()
        .map(|l| l.iter().filter(|s| s["title"] == "once").count());
    assert_eq!(titled, Some(1), "{list}");
    // The same key with a different request is refused on either replica.
    let (status, _) = a
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"harness": "echo", "title": "other"})),
        )
        .await;
    assert_eq!(status, 201, "no key, a new session");
    let reused = b
        .http
        .post(format!("{}/v1/sessions", b.base))
        .bearer_auth(&b.key)
        .header("Idempotency-Key", "create-once-1")
        .json(&json!({"harness": "echo", "title": "different"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(reused.status().as_u16(), 422);
}

fn dead_count(metrics: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with("sandwarden_dead_sessions_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_lost_sandbox_seen_by_both_replicas_is_one_dead_transition() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let id = a.ready("echo").await;
    let pool = sqlx::PgPool::connect(&r.db).await.expect("connect");
    let pid: i64 = sqlx::query_scalar("SELECT pid FROM sandboxes WHERE session_id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .expect("the sandbox row");
    // The harness's whole process group goes, as a crashed sandbox would.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the sandbox");
    let (ra, rb) = tokio::join!(a.say(&id, "anyone?"), b.say(&id, "anyone?"));
    for (status, body) in [ra, rb] {
        assert!(
            status == 502 || status == 409,
            "a dead or dying session: {status} {body}"
        );
    }
    a.wait_status(&id, "dead").await;
    let mut total = 0;
    for serve in [&r.a, &r.b] {
        let text = reqwest::get(serve.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        total += dead_count(&text);
    }
    assert_eq!(total, 1, "one transition across both replicas");
}

/// A webhook receiver that answers 500 while `failing`, counting successful deliveries.
async fn flaky_receiver() -> (
    String,
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Arc<Mutex<Vec<String>>>,
) {
    let failing = Arc::new(AtomicBool::new(true));
    let delivered = Arc::new(AtomicUsize::new(0));
    let tokens: Arc<Mutex<Vec<String>>> = Arc::default();
    let (f, d, t) = (failing.clone(), delivered.clone(), tokens.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let (f, d, t) = (f.clone(), d.clone(), t.clone());
            async move {
                if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
                    t.lock().expect("lock").push(auth.to_string());
                }
                if f.load(Ordering::SeqCst) {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                d.fetch_add(1, Ordering::SeqCst);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), failing, delivered, tokens)
}

#[tokio::test]
async fn a_webhook_is_delivered_once_and_taken_over_after_its_replica_is_killed() {
    let Some(mut r) = replicas(&["--webhook-lease", "2"]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let (url, failing, delivered, tokens) = flaky_receiver().await;

    // Both alive: delivered once, by one replica.
    failing.store(false, Ordering::SeqCst);
    let id = a.ready("echo").await;
    let turn = a
        .post_async(
            &id,
            json!({"text": "hi", "webhook": {"url": url, "token": "hook-token"}}),
        )
        .await;
    a.finished_turn(&id, &turn).await;
    for _ in 0..200 {
        if delivered.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Long enough for the other replica to have tried taking it over had it been free.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        delivered.load(Ordering::SeqCst),
        1,
        "delivered exactly once"
    );

    // A fails to deliver, then dies; B takes the delivery over once A's claim runs out.
    failing.store(true, Ordering::SeqCst);
    let attempts_before = tokens.lock().expect("lock").len();
    let turn = a
        .post_async(
            &id,
            json!({"text": "again", "webhook": {"url": url, "token": "hook-token"}}),
        )
        .await;
    a.finished_turn(&id, &turn).await;
    for _ in 0..200 {
        if tokens.lock().expect("lock").len() > attempts_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tokens.lock().expect("lock").len() > attempts_before,
        "A tried"
    );
    r.a.kill();
    failing.store(false, Ordering::SeqCst);
    let mut record = serde_json::Value::Null;
    for _ in 0..400 {
        let (_, t) = b
            .call("GET", &format!("/v1/sessions/{id}/turns/{turn}"), None)
            .await;
        record = t["webhook_deliveries"][0].clone();
        if record["status"] == "delivered" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(record["status"], "delivered", "{record}");
    assert_eq!(delivered.load(Ordering::SeqCst), 2);
    // B opened A's sealed token with the shared secret.
    assert!(
        tokens
            .lock()
            .expect("lock")
            .iter()
            .all(|t| t == "Bearer hook-token")
    );
}

#[tokio::test]
async fn a_turn_running_on_one_replica_is_cancelled_through_the_other() {
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let id = a.ready("echo").await;
    let turn = a.post_async(&id, json!({"text": "/slow 100 long"})).await;
    // The harness starts the turn just after the 202; cancel until it has one to cancel.
    let mut answer = serde_json::Value::Null;
    for _ in 0..100 {
        let (status, body) = b
            .call("POST", &format!("/v1/sessions/{id}/cancel"), None)
            .await;
        assert!(status == 200 || status == 202, "{status} {body}");
        answer = body;
        if answer["cancelling"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer["turn_id"], turn, "{answer}");
    assert_eq!(answer["cancelling"], true, "{answer}");
    let finished = a.finished_turn(&id, &turn).await;
    assert_eq!(finished["status"], "cancelled", "{finished}");
}

#[tokio::test]
async fn the_database_going_away_mid_turn_answers_503_then_recovers_with_nothing_lost() {
    let Some(cluster) = common::OwnCluster::new() else {
        return;
    };
    let server = cluster.start();
    let db = sandwarden::store::Store::scratch_database(&server)
        .await
        .expect("database");
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let env = [("SANDWARDEN_STORE", db), ("SANDWARDEN_SECRET", secret)];
    let serve = Serve::start_with_env(&["--store-acquire-timeout", "1"], &env);
    let other = Serve::start_with_env(&["--store-acquire-timeout", "1"], &env);
    let api = serve.client();
    let id = api.ready("echo").await;
    assert_eq!(api.say(&id, "before").await.0, 200);

    // A turn streams while the database stops under it.
    let turn = api
        .post_async(&id, json!({"text": "/slow 20 during"}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.ctl(&["stop"]);
    let resp = api
        .http
        .get(serve.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("request");
    let problem = common::expect_retry_later(resp, "store_unavailable").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("cannot be reached")),
        "{problem}"
    );
    let (status, problem) = api.say(&id, "refused").await;
    assert_eq!(status, 503, "{problem}");

    // Back, without restarting serve: the turn ends with every event, nothing twice.
    cluster.start();
    let finished = api.finished_turn(&id, &turn).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    let mut reply = (0, serde_json::Value::Null);
    for _ in 0..100 {
        reply = api.say(&id, "after").await;
        if reply.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reply.0, 200, "{}", reply.1);
    let texts = api.history_texts(&id).await;
    let users: Vec<&String> = texts.iter().step_by(2).collect();
    assert_eq!(users, ["before", "/slow 20 during", "after"], "{texts:?}");
    let events = stored_seqs(&api, &id).await;
    assert_eq!(events.iter().filter(|(_, k)| k == "done").count(), 3);

    // The other replica's LISTEN connection came back too: it streams the next turn live.
    let last = events.last().map(|(s, _)| s.to_string()).expect("events");
    let (b_api, b_id) = (other.client(), id.clone());
    let watcher = tokio::spawn(async move { follow(&b_api, &b_id, Some(&last), 1).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.say(&id, "fanned out").await.0, 200);
    let seen = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the other replica streamed the turn")
        .expect("watcher");
    assert_eq!(seen, stored_seqs(&api, &id).await[events.len()..].to_vec());
    cluster.ctl(&["stop"]);
}

#[tokio::test]
async fn a_terminal_started_on_one_replica_attaches_through_the_other() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let Some(r) = replicas(&[]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let id = a.ready("sh").await;
    let (_, s) = b.call("GET", &format!("/v1/sessions/{id}"), None).await;
    let tty_url = s["tty_url"].as_str().expect("tty_url from B");
    // The token B issued, on B's address: B dials A's sandbox from the endpoint in the store.
    assert!(
        tty_url.starts_with(&r.b.base.replacen("http", "ws", 1)),
        "{tty_url}"
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(tty_url)
        .await
        .expect("attach through B");
    ws.send(Message::Binary(b"echo across-$((40+2))\n".to_vec().into()))
        .await
        .expect("send");
    let mut out = String::new();
    while !out.contains("across-42") {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal ended early: {other:?} after {out:?}"),
        }
    }
    // A token A issued works on B too: the secret is shared.
    let (_, s) = a.call("GET", &format!("/v1/sessions/{id}"), None).await;
    let from_a = s["tty_url"].as_str().expect("tty_url from A");
    let on_b = from_a.replace(
        &r.a.base.replacen("http", "ws", 1),
        &r.b.base.replacen("http", "ws", 1),
    );
    tokio_tungstenite::connect_async(&on_b)
        .await
        .expect("A's token accepted by B");
}

#[tokio::test]
async fn a_turn_whose_replica_dies_is_ended_by_the_other_and_the_session_takes_turns_again() {
    let Some(mut r) = replicas(&["--replica-lease", "2"]).await else {
        return;
    };
    let (a, b) = (r.a.client(), r.b.client());
    let id = a.ready("echo").await;
    let turn = a
        .post_async(&id, json!({"text": "/slow 100 orphaned"}))
        .await;
    let (_, s) = b.call("GET", &format!("/v1/sessions/{id}"), None).await;
    assert_eq!(s["status"], "running");
    r.a.kill();
    // B notices A's silence, ends A's turn as interrupted and frees the session.
    let ended = b.finished_turn(&id, &turn).await;
    assert_eq!(ended["status"], "failed", "{ended}");
    assert_eq!(ended["error"]["code"], "interrupted", "{ended}");
    b.wait_status(&id, "ready").await;
    // The sandbox lives on (it is A's process, which outlives A), so B can run the next turn.
    let (status, reply) = b.say(&id, "after a").await;
    assert_eq!(
        (status, reply["text"].as_str()),
        (200, Some("after a")),
        "{reply}"
    );
    let events = stored_seqs(&b, &id).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k)| k.as_str()).collect();
    assert!(kinds.contains(&"error"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
}

/// Every pooled connection held (by requests waiting on a table lock taken from outside): the
/// requests that cannot get one answer `503` naming that cause, a cold start whose sandbox record
/// cannot get one fails with the same cause, and once the lock goes everything answers again.
#[tokio::test]
async fn a_store_with_every_connection_busy_says_so_and_recovers() {
    let Some(db) = common::postgres_database().await else {
        return;
    };
    let serve = Serve::start_with_env(
        &[
            "--store-max-connections",
            "2",
            "--store-acquire-timeout",
            "1",
            "--store-statement-timeout",
            "60",
        ],
        &[("SANDWARDEN_STORE", db.clone())],
    );
    let api = serve.client();
    let id = api.ready("echo").await;
    let locker = sqlx::PgPool::connect(&db).await.expect("connect");
    let busy = "every connection to the session store stayed busy";

    // Reads block on a locked `sessions` table, holding both connections; the rest wait for one.
    let mut lock = locker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let reads = futures::future::join_all((0..6).map(|_| api.call("GET", "/v1/sessions", None)));
    let (answers, ()) = tokio::join!(reads, async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        lock.rollback().await.expect("unlock");
    });
    let refused: Vec<_> = answers.iter().filter(|(s, _)| *s == 503).collect();
    assert!(!refused.is_empty(), "{answers:?}");
    for (_, problem) in &refused {
        assert_eq!(problem["type"], "store_unavailable", "{problem}");
        assert!(
            problem["detail"].as_str().is_some_and(|d| d.contains(busy)),
            "{problem}"
        );
    }
    assert!(
        answers.iter().all(|(s, _)| *s == 200 || *s == 503),
        "{answers:?}"
    );
    assert_eq!(api.say(&id, "after").await.0, 200);

    // Cold starts whose sandbox records block on a locked `sandboxes` table: two hold both
    // connections, the third cannot record its sandbox and fails saying why (or, if its create
    // came too late for a connection, the create itself says so).
    let mut lock = locker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE sandboxes IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let creates = futures::future::join_all((0..3).map(|_| {
        api.call(
            "POST",
            "/v1/sessions",
            Some(json!({"harness": "echo-cold"})),
        )
    }))
    .await;
    // Retried for about 3 s after each 1 s wait for a connection; then the session fails.
    tokio::time::sleep(Duration::from_secs(10)).await;
    lock.rollback().await.expect("unlock");
    let mut failed_busy = 0;
    for (status, body) in &creates {
        if *status == 503 {
            assert!(
                body["detail"].as_str().is_some_and(|d| d.contains(busy)),
                "{body}"
            );
            continue;
        }
        assert_eq!(*status, 201, "{body}");
        let sid = body["id"].as_str().expect("id");
        let (_, s) = api
            .call(
                "GET",
                &format!("/v1/sessions/{sid}?wait=true&timeout=30"),
                None,
            )
            .await;
        match s["status"].as_str() {
            Some("ready") => {}
            Some("failed") => {
                let reason = s["failure_reason"].as_str().unwrap_or_default();
                assert!(reason.contains(busy), "{s}");
                failed_busy += 1;
            }
            _ => panic!("neither ready nor failed: {s}"),
        }
    }
    assert!(
        failed_busy >= 1 || creates.iter().any(|(s, _)| *s == 503),
        "{creates:?}"
    );
    assert_eq!(api.say(&id, "still here").await.0, 200);
}
