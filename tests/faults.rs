//! Load and faults: real `serve` and harness processes on 127.0.0.1, with sandboxes SIGKILLed or
//! SIGSTOPped, `serve` itself SIGKILLed, its writes made to fail, and its warm pool drained. Each
//! scenario ends with `audit`, which checks the store through the public API: every accepted turn
//! ended (completed, or failed with a reason), nothing is duplicated, every session's status
//! matches its sandbox, and no sandbox process is left behind.
//!
//! Small in CI; `SANDWARDEN_FAULTS_SCALE=long` runs the longer mode (see docs/reliability.md).

mod common;

use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn long_mode() -> bool {
    std::env::var("SANDWARDEN_FAULTS_SCALE").as_deref() == Ok("long")
}

/// Picks `small` in CI and `long` under `SANDWARDEN_FAULTS_SCALE=long`.
fn scale(small: usize, long: usize) -> usize {
    if long_mode() { long } else { small }
}

/// Every `sandwarden harness` process whose command line names `data` (its sandbox directory).
fn harness_pids(data: &Path) -> Vec<i32> {
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
        if cmd.contains(" harness ") && cmd.contains(&needle) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// The harness process of sandbox `sandbox` (its `--workdir` is `DATA/sandboxes/<id>`).
fn sandbox_pid(data: &Path, sandbox: &str) -> Option<i32> {
    let needle = format!("{}/sandboxes/{sandbox} ", data.to_string_lossy());
    harness_pids(data).into_iter().find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                format!("{} ", String::from_utf8_lossy(&c).replace('\0', " ")).contains(&needle)
            })
            .unwrap_or(false)
    })
}

/// Which sandbox serves session `id`: the echo agent's HOME is `DATA/homes/<sandbox id>`.
async fn sandbox_of(api: &Api, id: &str) -> String {
    let (status, reply) = api.say(id, "/env HOME").await;
    assert_eq!(status, 200, "{reply}");
    let home = reply["text"].as_str().expect("HOME").trim().to_string();
    home.rsplit('/').next().expect("sandbox id").to_string()
}

/// Waits (bounded, 10 s) until `cond` holds; false if it never did.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cond()
}

fn kill_group(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
}

/// How one request for a turn ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    /// Answered with a finished turn (or, async, a turn id to follow).
    Completed,
    /// Accepted, then failed with a reason.
    Failed,
    /// Refused before a turn began (e.g. 409 session_not_usable).
    Refused,
}

/// One turn request in one of the three response modes; returns the turn id when one began.
async fn turn(api: &Api, id: &str, mode: usize, text: &str) -> (Seen, Option<String>) {
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
                // The sandbox was found gone when the turn was dialled: failed at once.
                502 => {
                    assert_eq!(accepted["type"], "harness_unreachable", "{accepted}");
                    let turn_id = accepted["turn_id"].as_str().map(String::from);
                    return (Seen::Failed, turn_id);
                }
                _ => assert_eq!(status, 202, "{accepted}"),
            }
            let turn_id = accepted["turn_id"].as_str().expect("turn id").to_string();
            let t = api.finished_turn(id, &turn_id).await;
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
fn text_reply(text: &str) -> String {
    match text.strip_prefix("/slow ") {
        Some(rest) => {
            let (n, word) = rest.split_once(' ').expect("/slow N word");
            let n: usize = n.parse().expect("N");
            (0..n).map(|i| format!("{word} {i}\n")).collect()
        }
        None => text.to_string(),
    }
}

fn assert_failed_with_reason(body: &Value) {
    let error = &body["error"];
    assert!(
        error["code"].as_str().is_some_and(|c| !c.is_empty())
            && error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a failed turn says why: {body}"
    );
}

/// A streamed turn: the status and, for 200, every event until the stream ends.
async fn sse_turn(api: &Api, id: &str, text: &str) -> (u16, Vec<Value>) {
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
async fn all_events(api: &Api, id: &str) -> Vec<Value> {
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
struct Figures {
    sessions: usize,
    ready: usize,
    dead: usize,
    turns: usize,
    completed: usize,
    failed: usize,
    events: usize,
}

/// The end-of-scenario check (see the module doc). `accepted` lists, per session, the turn ids
/// the client was given; `sandboxes` maps sessions to their sandbox ids; `pool` is how many warm
/// sandboxes may outlive every session.
async fn audit(
    api: &Api,
    data: &Path,
    accepted: &BTreeMap<String, Vec<String>>,
    sandboxes: &BTreeMap<String, String>,
    pool: usize,
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
                Some("completed" | "cancelled") => f.completed += 1,
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
                assert!(sandbox_pid(data, sandbox).is_some(), "{id}'s sandbox runs");
            }
            Some("dead") => {
                f.dead += 1;
                assert!(
                    s["failure_reason"].as_str().is_some_and(|r| !r.is_empty()),
                    "a dead session says why: {s}"
                );
                assert!(
                    eventually(|| sandbox_pid(data, sandbox).is_none()).await,
                    "dead session {id}'s sandbox {sandbox} is gone"
                );
            }
            _ => panic!("session {id} is neither ready nor dead: {s}"),
        }
    }
    // No sandbox outlives its session: delete them all; only the warm pool may remain.
    for id in sandboxes.keys() {
        let (status, s) = api
            .call("DELETE", &format!("/v1/sessions/{id}"), None)
            .await;
        assert_eq!(status, 200, "{s}");
    }
    let left = || harness_pids(data).len() <= pool;
    assert!(
        eventually(left).await,
        "sandboxes leaked: {} harness processes, pool {pool}",
        harness_pids(data).len()
    );
    f
}

/// Creates `n` sessions of `harness` concurrently and waits until all are ready; returns their
/// ids and sandboxes.
async fn ready_sessions(api: &Arc<Api>, harness: &str, n: usize) -> BTreeMap<String, String> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let api = api.clone();
            let harness = harness.to_string();
            tokio::spawn(async move {
                let id = api.ready(&harness).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_survive_sandboxes_killed_at_random() {
    let sessions = scale(40, 200);
    let turns_each = scale(3, 6);
    let kills = scale(8, 40);
    // No warm pool: every harness process under the data dir belongs to a session.
    let serve = Serve::start(&["--pool", "echo=0"]);
    let api = Arc::new(serve.client());
    let sandboxes = ready_sessions(&api, "echo", sessions).await;
    assert_eq!(harness_pids(&serve.data).len(), sessions);

    // The victims, chosen at random, die while the load runs.
    let ids: Vec<String> = sandboxes.keys().cloned().collect();
    let victims: BTreeSet<String> = {
        use rand::seq::IndexedRandom;
        ids.choose_multiple(&mut rand::rng(), kills)
            .cloned()
            .collect()
    };
    let mut load = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let api = api.clone();
        let id = id.clone();
        load.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for j in 0..turns_each {
                // Slow turns keep work in flight when the kills land.
                let text = format!("/slow 3 s{i}t{j}");
                seen.push(turn(&api, &id, i + j, &text).await);
            }
            (id, seen)
        }));
    }
    let killer = {
        let data = serve.data.clone();
        let victims: Vec<(String, String)> = victims
            .iter()
            .map(|v| (v.clone(), sandboxes[v].clone()))
            .collect();
        tokio::spawn(async move {
            for (_, sandbox) in victims {
                let delay = rand::random_range(0..200);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let pid = sandbox_pid(&data, &sandbox).expect("victim runs");
                kill_group(pid, nix::sys::signal::Signal::SIGKILL);
            }
        })
    };
    killer.await.expect("killer");
    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut outcomes: BTreeMap<Seen, usize> = BTreeMap::new();
    for task in load {
        let (id, seen) = task.await.expect("load task");
        for (outcome, turn_id) in seen {
            *outcomes.entry(outcome).or_default() += 1;
            if !victims.contains(&id) {
                assert_eq!(outcome, Seen::Completed, "{id} was not killed");
            }
            if let Some(t) = turn_id {
                accepted.entry(id.clone()).or_default().push(t);
            }
        }
    }
    // Every victim ends dead, whether or not a turn of it was in flight.
    for v in &victims {
        let s = api.wait_status(v, "dead").await;
        assert!(
            s["failure_reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{s}"
        );
    }
    let f = audit(&api, &serve.data, &accepted, &sandboxes, 0).await;
    assert_eq!((f.dead, f.ready), (kills, sessions - kills), "{f:?}");
    eprintln!(
        "FIGURES concurrent_kills: sessions {sessions} turns/session {turns_each} kills {kills} outcomes {outcomes:?} audit {f:?}"
    );
}

/// Waits (bounded) until `n` unclaimed sandboxes are recorded and each one's harness reports
/// `ready`, asked with the token serve derives for it from `DATA/secret`.
async fn warm_sandboxes_ready(data: &Path, n: usize) -> bool {
    let secret = std::fs::read_to_string(data.join("secret")).expect("the server secret");
    let tokens =
        sandwarden::runtime::Tokens::new(hex::decode(secret.trim()).expect("a hex secret"));
    for _ in 0..200 {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, endpoint FROM sandboxes WHERE session_id IS NULL")
                .fetch_all(&mut read_store(data).await)
                .await
                .unwrap_or_default();
        let mut ready = 0;
        for (id, endpoint) in &rows {
            let client = sandwarden::harness_client::HarnessClient::new(
                endpoint.as_str(),
                tokens.for_sandbox(id),
            );
            if client
                .health()
                .await
                .is_ok_and(|h| serde_json::to_value(&h).expect("health")["phase"] == "ready")
            {
                ready += 1;
            }
        }
        if ready >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_creates_drains_the_warm_pool_and_falls_back_to_cold_starts() {
    let burst = scale(20, 60);
    let serve = Serve::start(&["--pool", "echo=2"]);
    let api = Arc::new(serve.client());
    assert!(
        warm_sandboxes_ready(&serve.data, 2).await,
        "the pool filled"
    );
    let creates: Vec<_> = (0..burst)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.create("echo").await })
        })
        .collect();
    let mut warm = 0;
    let mut ids = Vec::new();
    for c in creates {
        let s = c.await.expect("create");
        match s["status"].as_str() {
            Some("ready") => warm += 1,
            Some("creating") => {}
            other => panic!("a create answered {other:?}: {s}"),
        }
        ids.push(s["id"].as_str().expect("id").to_string());
    }
    assert!(
        warm >= 1 && warm < burst,
        "warm {warm} of {burst}: the pool drained and cold starts followed"
    );
    let mut sandboxes = BTreeMap::new();
    for id in &ids {
        let s = api.wait_status(id, "ready").await;
        assert_eq!(s["status"], "ready");
        sandboxes.insert(id.clone(), sandbox_of(&api, id).await);
    }
    let distinct: BTreeSet<&String> = sandboxes.values().collect();
    assert_eq!(
        distinct.len(),
        burst,
        "no sandbox claimed twice: {sandboxes:?}"
    );
    let f = audit(&api, &serve.data, &BTreeMap::new(), &sandboxes, 2).await;
    assert_eq!(f.ready, burst, "{f:?}");
    eprintln!(
        "FIGURES pool_burst: burst {burst} pool 2 warm {warm} cold {} audit {f:?}",
        burst - warm
    );
}

/// Kills the sandboxes under a data dir when dropped, so a failing test leaves none behind
/// (`Serve::start_in` leaves them, as a restart needs).
struct Sweep(std::path::PathBuf);

impl Drop for Sweep {
    fn drop(&mut self) {
        kill_sandboxes_under(&self.0);
    }
}

/// A data dir whose templates add `echo-quick`: the echo agent with a 2 s turn timeout.
fn data_dir_with_quick_template() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("templates.json"),
        r#"[{"name":"sh","kind":"tui","command":"bash --noprofile --norc","pool":0},
            {"name":"echo-quick","kind":"api","command":"sandwarden echo-agent","pool":0,"turn_timeout_s":2}]"#,
    )
    .expect("templates");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_hung_harness_times_out_its_turn_and_nothing_else() {
    let others = scale(3, 20);
    let dir = data_dir_with_quick_template();
    let _sweep = Sweep(dir.path().to_path_buf());
    let serve = Serve::start_in(dir.path(), &["--pool", "echo=0"]);
    let api = Arc::new(serve.client());
    let sandboxes = ready_sessions(&api, "echo-quick", 1 + others).await;
    let mut ids = sandboxes.keys().cloned();
    let victim = ids.next().expect("a session");
    let others: Vec<String> = ids.collect();
    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();

    // Slow: 60 chunks of 100 ms outlast the 2 s turn timeout.
    let (status, body) = api.say(&victim, "/slow 60 w").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{body}"
    );
    accepted
        .entry(victim.clone())
        .or_default()
        .push(body["turn_id"].as_str().expect("turn id").into());
    let (_, s) = api
        .call("GET", &format!("/v1/sessions/{victim}"), None)
        .await;
    assert_eq!(s["status"], "ready", "a slow harness is not dead: {s}");
    assert_eq!(api.say(&victim, "after slow").await.1["text"], "after slow");

    // Hung: the harness and its agent stopped mid-nothing; a turn sent to it times out.
    let pid = sandbox_pid(&serve.data, &sandboxes[&victim]).expect("victim runs");
    kill_group(pid, nix::sys::signal::Signal::SIGSTOP);
    let hung = {
        let api = api.clone();
        let victim = victim.clone();
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), api.say(&victim, "anyone?"))
                .await
                .expect("serve answers a turn to a hung harness within 60 s")
        })
    };
    // Meanwhile every other session works, in every mode.
    for (i, id) in others.iter().enumerate() {
        for mode in 0..3 {
            let (seen, turn_id) = turn(&api, id, i + mode, &format!("other {i} {mode}")).await;
            assert_eq!(seen, Seen::Completed, "{id} is unaffected");
            accepted.entry(id.clone()).or_default().extend(turn_id);
        }
    }
    let (status, body) = hung.await.expect("hung turn task");
    assert!(matches!(status, 502 | 504), "{status} {body}");
    accepted
        .entry(victim.clone())
        .or_default()
        .extend(body["turn_id"].as_str().map(String::from));
    let (_, s) = api
        .call("GET", &format!("/v1/sessions/{victim}"), None)
        .await;
    assert_ne!(s["status"], "dead", "a stopped harness is not dead: {s}");

    kill_group(pid, nix::sys::signal::Signal::SIGCONT);
    works_again(&api, &victim).await;

    // Hung mid-turn: stopped after its first words; serve ends the turn at its deadline.
    let turn_id = api
        .post_async(&victim, json!({"text": "/slow 100 z"}))
        .await;
    let path = format!("/v1/sessions/{victim}/events");
    let started = async {
        for _ in 0..200 {
            let (_, page) = api.call("GET", &path, None).await;
            let events = page["events"].as_array().cloned().unwrap_or_default();
            if events
                .iter()
                .any(|e| e["turn_id"] == turn_id.as_str() && e["type"] == "text")
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    };
    assert!(started.await, "the slow turn started");
    kill_group(pid, nix::sys::signal::Signal::SIGSTOP);
    let t = api.finished_turn(&victim, &turn_id).await;
    assert_eq!(
        (t["status"].as_str(), t["error"]["code"].as_str()),
        (Some("failed"), Some("timeout")),
        "{t}"
    );
    assert!(
        t["text"].as_str().is_some_and(|x| x.starts_with("z 0")),
        "partial text kept: {t}"
    );
    accepted.entry(victim.clone()).or_default().push(turn_id);
    let (_, s) = api
        .call("GET", &format!("/v1/sessions/{victim}"), None)
        .await;
    assert_ne!(s["status"], "dead", "a stopped harness is not dead: {s}");
    kill_group(pid, nix::sys::signal::Signal::SIGCONT);
    works_again(&api, &victim).await;
    let f = audit(&api, &serve.data, &accepted, &sandboxes, 0).await;
    assert_eq!(f.ready, sandboxes.len(), "{f:?}");
    eprintln!(
        "FIGURES hang_and_slow: sessions {} hung answer {status} audit {f:?}",
        sandboxes.len()
    );
}

/// After SIGCONT the harness may still be finishing the turn it was stopped in: bounded retries
/// until a turn completes.
async fn works_again(api: &Api, id: &str) {
    let mut back = (0, Value::Null);
    for _ in 0..100 {
        back = api.say(id, "back").await;
        if back.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (back.0, back.1["text"].as_str()),
        (200, Some("back")),
        "{}",
        back.1
    );
}

/// `serve` on `data` with SIGXFSZ ignored (as `sh`'s `trap "" XFSZ` leaves it across `exec`), so
/// a file-size limit makes its writes fail with EFBIG instead of killing it.
struct Fragile {
    child: std::process::Child,
    data: std::path::PathBuf,
    api: Api,
}

impl Fragile {
    fn start(data: &Path, log: &Path) -> Fragile {
        let (child, addr) = spawn_listening(
            std::process::Command::new("sh")
                .arg("-c")
                // Its log goes to a regular file, as an operator's often does: on a full disk
                // the log's writes fail too, and serve must carry on.
                .arg(r#"trap "" XFSZ; exec "$0" "$@" 2>>"$SERVE_LOG""#)
                .arg(env!("CARGO_BIN_EXE_sandwarden"))
                .args(["serve", "--listen", "127.0.0.1:0", "--pool", "echo=0"])
                .arg("--data-dir")
                .arg(data)
                .env("SANDWARDEN_API_KEY", ADMIN_KEY)
                .env("SERVE_LOG", log)
                .env("SANDWARDEN_LOG", "warn"),
            "sandwarden serve",
        );
        let api = Api {
            base: format!("http://{addr}"),
            key: ADMIN_KEY.into(),
            http: reqwest::Client::new(),
        };
        Fragile {
            child,
            data: data.to_path_buf(),
            api,
        }
    }

    /// The largest file `serve` may write (`None`: unlimited), set from outside with prlimit(1).
    fn limit_file_size(&self, bytes: Option<u64>) {
        let limit = bytes.map_or("unlimited".to_string(), |b| b.to_string());
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", self.child.id()))
            .arg(format!("--fsize={limit}:unlimited"))
            .status()
            .expect("prlimit runs");
        assert!(status.success(), "prlimit --fsize={limit}");
    }
}

impl Drop for Fragile {
    fn drop(&mut self) {
        terminate(&mut self.child);
        kill_sandboxes_under(&self.data);
    }
}

/// A read-only connection to the store's SQLite file (as another process reads it).
async fn read_store(data: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection;
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(data.join("sandwarden.db"))
        .read_only(true);
    sqlx::SqliteConnection::connect_with(&options)
        .await
        .expect("open the store read-only")
}

/// `PRAGMA integrity_check` on the store.
async fn integrity(data: &Path) -> String {
    let mut conn = read_store(data).await;
    sqlx::query_scalar::<_, String>("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .expect("integrity_check")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_answers_503_and_recovers_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = tempfile::tempdir().expect("tempdir");
    let serve = Fragile::start(dir.path(), &logs.path().join("serve.log"));
    let api = Arc::new(Api {
        base: serve.api.base.clone(),
        key: ADMIN_KEY.into(),
        http: reqwest::Client::new(),
    });
    let sandboxes = ready_sessions(&api, "echo", scale(3, 20)).await;
    let ids: Vec<String> = sandboxes.keys().cloned().collect();
    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in &ids {
        let (status, reply) = api.say(id, "before").await;
        assert_eq!(status, 200, "{reply}");
    }

    // Every write to a regular file now fails (EFBIG), as writes to a full disk fail (ENOSPC);
    // unlike chmod, this holds for root too.
    serve.limit_file_size(Some(0));
    let (status, p) = api
        .call("POST", "/v1/sessions", Some(json!({"harness": "echo"})))
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (503, Some("store_unavailable")),
        "{p}"
    );
    for (i, id) in ids.iter().enumerate() {
        let (status, p) = api.say(id, &format!("during {i}")).await;
        assert_eq!(
            (status, p["type"].as_str()),
            (503, Some("store_unavailable")),
            "{p}"
        );
        // Reads still answer.
        let (status, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
        assert_eq!((status, s["status"].as_str()), (200, Some("ready")), "{s}");
    }

    serve.limit_file_size(None);
    for (i, id) in ids.iter().enumerate() {
        let mut answer = (0, Value::Null);
        for _ in 0..100 {
            answer = api.say(id, &format!("after {i}")).await;
            if answer.0 != 503 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(answer.0, 200, "{}", answer.1);
        accepted
            .entry(id.clone())
            .or_default()
            .extend(answer.1["turn_id"].as_str().map(String::from));
        // Nothing of the refused message was kept.
        let texts = api.history_texts(id).await;
        assert!(!texts.iter().any(|t| t.starts_with("during")), "{texts:?}");
    }
    let fresh = api.ready("echo").await;
    let mut sandboxes = sandboxes;
    sandboxes.insert(fresh.clone(), sandbox_of(&api, &fresh).await);
    assert_eq!(integrity(dir.path()).await, "ok");
    let f = audit(&api, dir.path(), &accepted, &sandboxes, 0).await;
    assert_eq!(f.ready, sandboxes.len(), "{f:?}");
    drop(serve);
    assert_eq!(integrity(dir.path()).await, "ok", "after serve stopped");
    eprintln!(
        "FIGURES store_trouble: sessions {} audit {f:?}",
        sandboxes.len()
    );
}

/// Counts webhook POSTs per `X-Sandwarden-Delivery` id; answers 200.
async fn hook_counter() -> (String, Arc<std::sync::Mutex<HashMap<String, usize>>>) {
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
    (common::serve_hook(app).await, got)
}

/// Types `line` into a terminal and reads until `want` appears (bounded).
async fn tty_roundtrip(tty_url: &str, line: &str, want: &str) {
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(tty_url)
        .await
        .expect("attach");
    futures::SinkExt::send(&mut ws, Message::Binary(line.as_bytes().to_vec().into()))
        .await
        .expect("send");
    let mut out = String::new();
    while !out.contains(want) {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => out.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("terminal ended early: {other:?} after {out:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_load_resumes_sessions_streams_webhooks_and_terminals() {
    let n = scale(10, 50);
    let dir = data_dir_with_quick_template();
    let _sweep = Sweep(dir.path().to_path_buf());
    let mut serve = Serve::start_in(dir.path(), &["--pool", "echo=0"]);
    let api = Arc::new(serve.client());
    let sandboxes = ready_sessions(&api, "echo", n).await;
    let ids: Vec<String> = sandboxes.keys().cloned().collect();
    let shell = api.ready("sh").await;
    let (_, s) = api
        .call("GET", &format!("/v1/sessions/{shell}"), None)
        .await;
    let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();
    tty_roundtrip(
        &tty_url,
        "export KEPT=k-$((40+2)); echo set-$((1+1))\n",
        "set-2",
    )
    .await;

    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in &ids {
        let (status, reply) = api.say(id, &format!("before {id}")).await;
        assert_eq!(status, 200, "{reply}");
        accepted
            .entry(id.clone())
            .or_default()
            .extend(reply["turn_id"].as_str().map(String::from));
    }
    let followed = &ids[0];
    let seen_before = all_events(&api, followed).await.len() as i64;

    // Load in flight when serve dies: slow async turns, each with a webhook.
    let (url, hooks) = hook_counter().await;
    let mut hooked = Vec::new();
    for id in &ids {
        let turn_id = api
            .post_async(id, json!({"text": "/slow 30 w", "webhook": {"url": url}}))
            .await;
        accepted
            .entry(id.clone())
            .or_default()
            .push(turn_id.clone());
        hooked.push((id.clone(), turn_id));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    serve.kill();

    let serve = Serve::start_in(dir.path(), &["--pool", "echo=0"]);
    let api = Arc::new(serve.client());
    for id in &ids {
        let s = api.wait_status(id, "ready").await;
        assert_eq!(s["status"], "ready", "adopted after the crash: {s}");
        let texts = api.history_texts(id).await;
        assert!(
            texts.contains(&format!("before {id}")),
            "history kept: {texts:?}"
        );
    }
    // Every webhook is delivered, and each POST is backed by a recorded attempt.
    let mut delivered = 0;
    for (id, turn_id) in &hooked {
        let path = format!("/v1/sessions/{id}/turns/{turn_id}");
        let mut last = Value::Null;
        for _ in 0..400 {
            last = api.call("GET", &path, None).await.1;
            if last["webhook_deliveries"][0]["status"] == "delivered" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let d = &last["webhook_deliveries"][0];
        assert_eq!(d["status"], "delivered", "{last}");
        let attempts = d["attempts"].as_u64().expect("attempts") as usize;
        let posts = hooks
            .lock()
            .expect("lock")
            .get(d["id"].as_str().expect("delivery id"))
            .copied()
            .unwrap_or(0);
        assert!(
            posts >= 1 && posts <= attempts,
            "{posts} POSTs for {attempts} attempts: {d}"
        );
        delivered += 1;
    }
    assert_eq!(
        hooks.lock().expect("lock").len(),
        hooked.len(),
        "no stray deliveries"
    );

    // The event stream resumes from the last id read before the crash, gap-free.
    let total = all_events(&api, followed).await.len() as i64;
    let resumed = api
        .sse(
            &format!("/v1/sessions/{followed}/events"),
            None,
            Some(&seen_before.to_string()),
            (total - seen_before) as usize,
        )
        .await;
    let seqs: Vec<i64> = resumed
        .iter()
        .map(|(_, _, e)| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, ((seen_before + 1)..=total).collect::<Vec<_>>());

    // The terminal re-attaches to the same shell.
    let (_, s) = api
        .call("GET", &format!("/v1/sessions/{shell}"), None)
        .await;
    let tty_url = s["tty_url"].as_str().expect("tty_url").to_string();
    tty_roundtrip(&tty_url, "echo got-$KEPT\n", "got-k-42").await;
    let (status, _) = api
        .call("DELETE", &format!("/v1/sessions/{shell}"), None)
        .await;
    assert_eq!(status, 200);

    let f = audit(&api, dir.path(), &accepted, &sandboxes, 0).await;
    assert_eq!(f.ready, n, "{f:?}");
    eprintln!(
        "FIGURES serve_crash: sessions {n}+1 terminal, in-flight turns {} webhooks delivered {delivered} resumed events {} audit {f:?}",
        hooked.len(),
        seqs.len()
    );
}
