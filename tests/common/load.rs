//! Load-and-fault helpers shared by the scenarios of tests/faults.rs on every backend: turns in
//! the three response modes as a client sees them, and the end-of-scenario audit of the store
//! through the public API.

use super::{Api, alive};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub fn long_mode() -> bool {
    std::env::var("SANDWARDEN_FAULTS_SCALE").as_deref() == Ok("long")
}

/// Picks `small` in CI and `long` under `SANDWARDEN_FAULTS_SCALE=long`.
pub fn scale(small: usize, long: usize) -> usize {
    if long_mode() { long } else { small }
}

/// Every harness server (`sandwarden harness` or `sandwarden-harness`) whose command line names
/// `data` (its sandbox directory).
pub fn harness_pids(data: &Path) -> Vec<i32> {
    let needle = data.to_string_lossy().to_string();
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("harness --listen") && cmd.contains(&needle) && alive(pid) {
            out.push(pid);
        }
    }
    // Under bubblewrap its command line is bwrap's, which runs twice (outside, and as PID 1
    // inside): one sandbox is the process whose parent is not one of them.
    let all = out.clone();
    out.retain(|pid| parent(*pid).is_none_or(|p| !all.contains(&p)));
    out
}

fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name's closing parenthesis: state, then the parent's pid.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The harness process of sandbox `sandbox` (its `--workdir` is `DATA/sandboxes/<id>`).
pub fn sandbox_pid(data: &Path, sandbox: &str) -> Option<i32> {
    let needle = format!("{}/sandboxes/{sandbox} ", data.to_string_lossy());
    harness_pids(data).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                format!("{} ", String::from_utf8_lossy(&c).replace('\0', " ")).contains(&needle)
            })
            .unwrap_or(false)
    })
}

/// Which sandbox serves session `id`: a plain sandbox's HOME is `DATA/homes/<sandbox id>`; a
/// confined one's host name is its id.
pub async fn sandbox_of(api: &Api, id: &str) -> String {
    let (status, reply) = api.say(id, "/env HOME").await;
    assert_eq!(status, 200, "{reply}");
    let home = reply["text"].as_str().expect("HOME").trim().to_string();
    if home != "/home/sandbox" {
        return home.rsplit('/').next().expect("sandbox id").to_string();
    }
    let (status, reply) = api.say(id, "/cat /proc/sys/kernel/hostname").await;
    assert_eq!(status, 200, "{reply}");
    reply["text"]
        .as_str()
        .expect("host name")
        .trim()
        .to_string()
}

/// Waits (bounded, 10 s) until `cond` holds; false if it never did.
pub async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cond()
}

/// Signals `pid`'s process group and every process below `pid`: a confined sandbox's harness
/// runs in a session of its own under bubblewrap.
pub fn kill_group(pid: i32, sig: nix::sys::signal::Signal) {
    let below = u32::try_from(pid)
        .map(sandwarden::procfs::descendants)
        .unwrap_or_default();
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
    for p in below.into_iter().filter_map(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

/// How one request for a turn ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seen {
    /// Answered with a finished turn (or, async, a turn id to follow).
    Completed,
    /// Accepted, then failed with a reason.
    Failed,
    /// Refused before a turn began (e.g. 409 session_not_usable).
    Refused,
    /// `503 store_unavailable`: the store could not be reached; retry after a moment. Carries a
    /// turn id when the turn had begun.
    Unavailable,
}

/// A `503` for an unreachable store, as a problem saying so; the turn id in it, if any.
fn unavailable(body: &Value) -> (Seen, Option<String>) {
    assert_eq!(body["type"], "store_unavailable", "{body}");
    (
        Seen::Unavailable,
        body["turn_id"].as_str().map(String::from),
    )
}

/// Long-polls a turn until it ends, asking again while the store is unavailable (bounded, 60 s).
pub async fn finished_turn(api: &Api, id: &str, turn_id: &str) -> Value {
    let mut t = Value::Null;
    for _ in 0..300 {
        t = api.finished_turn(id, turn_id).await;
        if t["type"] != "store_unavailable" {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t
}

/// One turn request in one of the three response modes; returns the turn id when one began.
pub async fn turn(api: &Api, id: &str, mode: usize, text: &str) -> (Seen, Option<String>) {
    match mode % 3 {
        0 => {
            let (status, body) = api.say(id, text).await;
            let turn_id = body["turn_id"].as_str().map(String::from);
            match status {
                200 => {
                    assert_eq!(body["text"], text_reply(text), "{body}");
                    (Seen::Completed, turn_id)
                }
                409 => (Seen::Refused, None),
                503 => unavailable(&body),
                502 | 504 => {
                    // A problem (`type`, `detail`) naming the turn that failed.
                    assert!(
                        body["type"].as_str().is_some_and(|t| !t.is_empty())
                            && body["detail"].as_str().is_some_and(|d| !d.is_empty()),
                        "a failed turn says why: {body}"
                    );
                    (Seen::Failed, turn_id)
                }
                _ => panic!("unexpected answer {status}: {body}"),
            }
        }
        1 => {
            let (status, events) = sse_turn(api, id, text).await;
            match status {
                409 => return (Seen::Refused, None),
                503 => return unavailable(&events[0]),
                502 => {
                    assert_eq!(events[0]["type"], "harness_unreachable", "{events:?}");
                    let turn_id = events[0]["turn_id"].as_str().map(String::from);
                    return (Seen::Failed, turn_id);
                }
                _ => assert_eq!(status, 200, "{events:?}"),
            }
            let turn_id = events
                .iter()
                .find_map(|e| e["turn_id"].as_str().map(String::from));
            let last = events.last().cloned().unwrap_or_default();
            match last["type"].as_str() {
                Some("done") => (Seen::Completed, turn_id),
                Some("error") => {
                    assert!(
                        last["data"]["code"].as_str().is_some_and(|c| !c.is_empty()),
                        "{last}"
                    );
                    (Seen::Failed, turn_id)
                }
                _ => panic!("the stream ended without done or error: {events:?}"),
            }
        }
        _ => {
            let (status, accepted) = api
                .call(
                    "POST",
                    &format!("/v1/sessions/{id}/messages"),
                    Some(json!({"text": text, "async": true})),
                )
                .await;
            match status {
                409 => return (Seen::Refused, None),
                503 => return unavailable(&accepted),
                // The sandbox was found gone when the turn was dialled: failed at once.
                502 => {
                    assert_eq!(accepted["type"], "harness_unreachable", "{accepted}");
                    let turn_id = accepted["turn_id"].as_str().map(String::from);
                    return (Seen::Failed, turn_id);
                }
                _ => assert_eq!(status, 202, "{accepted}"),
            }
            let turn_id = accepted["turn_id"].as_str().expect("turn id").to_string();
            let t = finished_turn(api, id, &turn_id).await;
            match t["status"].as_str() {
                Some("completed") => (Seen::Completed, Some(turn_id)),
                Some("failed") => {
                    assert_failed_with_reason(&t);
                    (Seen::Failed, Some(turn_id))
                }
                _ => panic!("the turn did not end: {t}"),
            }
        }
    }
}

/// What the echo agent answers to `text` (`/slow N word` streams N lines `word i`).
pub fn text_reply(text: &str) -> String {
    match text.strip_prefix("/slow ") {
        Some(rest) => {
            let (n, word) = rest.split_once(' ').expect("/slow N word");
            let n: usize = n.parse().expect("N");
            (0..n).map(|i| format!("{word} {i}\n")).collect()
        }
        None => text.to_string(),
    }
}

pub fn assert_failed_with_reason(body: &Value) {
    let error = &body["error"];
    assert!(
        error["code"].as_str().is_some_and(|c| !c.is_empty())
            && error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a failed turn says why: {body}"
    );
}

/// A streamed turn: the status and, for 200, every event until the stream ends.
pub async fn sse_turn(api: &Api, id: &str, text: &str) -> (u16, Vec<Value>) {
    use eventsource_stream::Eventsource;
    let resp = api
        .http
        .post(format!("{}/v1/sessions/{id}/messages", api.base))
        .bearer_auth(&api.key)
        .json(&json!({"text": text, "stream": true}))
        .send()
        .await
        .expect("sse request");
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.json::<Value>().await.unwrap_or_default();
        return (status, vec![body]);
    }
    let mut stream = resp.bytes_stream().eventsource();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(e))) => out.push(serde_json::from_str(&e.data).unwrap_or_default()),
            Ok(Some(Err(e))) => panic!("the stream broke after {out:?}: {e}"),
            Ok(None) => break,
            Err(_) => panic!("SSE stalled after {} events", out.len()),
        }
    }
    (status, out)
}

/// Every stored event of a session, paging through `since`.
pub async fn all_events(api: &Api, id: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut since = 0;
    for _ in 0..10_000 {
        let (status, page) = api
            .call(
                "GET",
                &format!("/v1/sessions/{id}/events?since={since}&limit=1000"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{page}");
        let events = page["events"].as_array().expect("events").clone();
        if events.is_empty() {
            return out;
        }
        since = events.last().and_then(|e| e["seq"].as_i64()).expect("seq");
        out.extend(events);
    }
    panic!("more events than expected");
}

/// What a scenario's audit counted.
#[derive(Debug, Default)]
pub struct Figures {
    pub sessions: usize,
    pub ready: usize,
    pub dead: usize,
    pub turns: usize,
    pub completed: usize,
    pub failed: usize,
    pub events: usize,
}

/// The end-of-scenario check on the local runtime: `audit_store`, with a sandbox's process found
/// under `data`; then no harness process may outlive the sessions beyond the `pool` warm ones.
pub async fn audit(
    api: &Api,
    data: &Path,
    accepted: &BTreeMap<String, Vec<String>>,
    sandboxes: &BTreeMap<String, String>,
    pool: usize,
) -> Figures {
    let f = audit_store(api, accepted, sandboxes, &|sandbox| {
        sandbox_pid(data, sandbox).is_some()
    })
    .await;
    let left = || harness_pids(data).len() <= pool;
    assert!(
        eventually(left).await,
        "sandboxes leaked: {} harness processes, pool {pool}",
        harness_pids(data).len()
    );
    f
}

/// The end-of-scenario check of the store, through the public API, on any backend. `accepted`
/// lists, per session, the turn ids the client was given; `sandboxes` maps sessions to their
/// sandbox ids; `runs` tells whether a sandbox's harness process runs. Every accepted turn (and
/// every turn in the history) ended, completed (its text events spelling its text) or failed with
/// a reason, its user message stored once; no message twice; event seqs `1..=n` with one `done`
/// or `error` per turn; a `ready`
/// session answers and its sandbox runs, a `dead` one says why and its sandbox is gone. Deletes
/// every session at the end (the caller then checks that nothing was left behind).
pub async fn audit_store(
    api: &Api,
    accepted: &BTreeMap<String, Vec<String>>,
    sandboxes: &BTreeMap<String, String>,
    runs: &(dyn Fn(&str) -> bool + Sync),
) -> Figures {
    let mut f = Figures::default();
    for (id, sandbox) in sandboxes {
        f.sessions += 1;
        let (status, s) = api
            .call(
                "GET",
                &format!("/v1/sessions/{id}?wait=true&timeout=30"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{s}");
        // History: no message twice, and every turn the client was given is in it.
        let (_, history) = api
            .call("GET", &format!("/v1/sessions/{id}/messages"), None)
            .await;
        let messages = history["messages"].as_array().expect("messages");
        let ids: BTreeSet<&str> = messages.iter().filter_map(|m| m["id"].as_str()).collect();
        assert_eq!(
            ids.len(),
            messages.len(),
            "a message stored twice: {history}"
        );
        let mut turns: BTreeSet<String> = messages
            .iter()
            .filter_map(|m| m["turn_id"].as_str().map(String::from))
            .collect();
        let mut user_messages: HashMap<String, usize> = HashMap::new();
        for m in messages.iter().filter(|m| m["role"] == "user") {
            if let Some(t) = m["turn_id"].as_str() {
                *user_messages.entry(t.to_string()).or_default() += 1;
            }
        }
        for t in accepted.get(id).into_iter().flatten() {
            assert_eq!(
                user_messages.get(t),
                Some(&1),
                "accepted turn {t} has its user message once: {history}"
            );
            turns.insert(t.clone());
        }
        // Events: seq 1..=n without gaps; each turn ends with exactly one done or error.
        let events = all_events(api, id).await;
        f.events += events.len();
        let seqs: Vec<i64> = events.iter().filter_map(|e| e["seq"].as_i64()).collect();
        let expected: Vec<i64> = (1..=events.len() as i64).collect();
        assert_eq!(seqs, expected, "session {id}: event seqs are 1..=n");
        let mut ends: HashMap<String, usize> = HashMap::new();
        for e in &events {
            if matches!(e["type"].as_str(), Some("done" | "error"))
                && let Some(t) = e["turn_id"].as_str()
            {
                *ends.entry(t.to_string()).or_default() += 1;
            }
        }
        // Every turn ended, once.
        for t in &turns {
            f.turns += 1;
            let turn = api.finished_turn(id, t).await;
            match turn["status"].as_str() {
                Some("completed") => {
                    f.completed += 1;
                    // No event of it was lost: its text events spell its text.
                    let streamed: String = events
                        .iter()
                        .filter(|e| e["turn_id"] == t.as_str() && e["type"] == "text")
                        .filter_map(|e| e["data"]["text"].as_str())
                        .collect();
                    assert_eq!(
                        Some(streamed.as_str()),
                        turn["text"].as_str(),
                        "turn {t} of {id}: its text events hold its text"
                    );
                }
                Some("cancelled") => f.completed += 1,
                Some("failed") => {
                    assert_failed_with_reason(&turn);
                    f.failed += 1;
                }
                _ => panic!("turn {t} of {id} did not end: {turn}"),
            }
            assert_eq!(
                ends.get(t),
                Some(&1),
                "turn {t} of {id} has one done or error event: {turn}"
            );
        }
        // The status matches the sandbox.
        match s["status"].as_str() {
            Some("ready") => {
                f.ready += 1;
                let (status, reply) = api.say(id, "audit").await;
                assert_eq!(
                    (status, reply["text"].as_str()),
                    (200, Some("audit")),
                    "{reply}"
                );
                assert!(runs(sandbox), "{id}'s sandbox runs");
            }
            Some("dead") => {
                f.dead += 1;
                assert!(
                    s["failure_reason"].as_str().is_some_and(|r| !r.is_empty()),
                    "a dead session says why: {s}"
                );
                assert!(
                    eventually(|| !runs(sandbox)).await,
                    "dead session {id}'s sandbox {sandbox} is gone"
                );
            }
            _ => panic!("session {id} is neither ready nor dead: {s}"),
        }
    }
    // No sandbox may outlive its session: delete them all.
    for id in sandboxes.keys() {
        let (status, s) = api
            .call("DELETE", &format!("/v1/sessions/{id}"), None)
            .await;
        assert_eq!(status, 200, "{s}");
    }
    f
}

/// Creates `n` sessions of `harness` concurrently and waits until all are ready; returns their
/// ids and sandboxes. A `503 store_unavailable` (an overloaded store's pool) is retried, as the
/// answer asks.
pub async fn ready_sessions(api: &Arc<Api>, harness: &str, n: usize) -> BTreeMap<String, String> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let api = api.clone();
            let harness = harness.to_string();
            tokio::spawn(async move {
                let id = ready_retrying(&api, &harness).await;
                let sandbox = sandbox_of(&api, &id).await;
                (id, sandbox)
            })
        })
        .collect();
    let mut out = BTreeMap::new();
    for t in tasks {
        let (id, sandbox) = t.await.expect("create task");
        out.insert(id, sandbox);
    }
    out
}

/// `call`, asked again (bounded, 60 s) while it answers `503 store_unavailable`.
pub async fn call_retrying(
    api: &Api,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut answer = (0, Value::Null);
    for _ in 0..120 {
        answer = api.call(method, path, body.clone()).await;
        if answer.0 != 503 {
            break;
        }
        assert_eq!(answer.1["type"], "store_unavailable", "{}", answer.1);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    answer
}

/// Creates a session and waits until it is ready, retrying `503 store_unavailable`.
pub async fn ready_retrying(api: &Api, harness: &str) -> String {
    let (status, s) = call_retrying(
        api,
        "POST",
        "/v1/sessions",
        Some(json!({"harness": harness})),
    )
    .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    let path = format!("/v1/sessions/{id}?wait=true&timeout=30");
    let (_, s) = call_retrying(api, "GET", &path, None).await;
    assert_eq!(s["status"], "ready", "{s}");
    id
}

/// Counts webhook POSTs per `X-Sandwarden-Delivery` id; answers 200.
pub async fn hook_counter() -> (String, Arc<std::sync::Mutex<HashMap<String, usize>>>) {
    let got: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    let seen = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let seen = seen.clone();
            async move {
                let id = headers
                    .get("x-sandwarden-delivery")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string();
                *seen.lock().expect("lock").entry(id).or_default() += 1;
                axum::http::StatusCode::OK
            }
        }),
    );
    (super::serve_hook(app).await, got)
}
