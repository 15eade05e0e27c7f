//! Load and faults: real `serve` and harness processes on 127.0.0.1, with sandboxes SIGKILLed or
//! SIGSTOPped, `serve` itself SIGKILLed, its writes made to fail, and its warm pool drained. Each
//! scenario ends with `audit`, which checks the store through the public API: every accepted turn
//! ended (completed, or failed with a reason), nothing is duplicated, every session's status
//! matches its sandbox, and no sandbox process is left behind.
//!
//! Small in CI; `SANDWARDEN_FAULTS_SCALE=long` runs the longer mode (see docs/reliability.md).

mod common;

use common::load::*;
use common::*;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where a scenario's sandboxes run, as the test reaches their processes.
trait Backend {
    /// SIGKILLs the harness of `sandbox` (with its agent).
    fn kill(&self, sandbox: &str);
    /// Every session's sandbox runs, is its own and (Kubernetes) is claimed for it alone.
    fn assert_claims(&self, sandboxes: &BTreeMap<String, String>);
    /// `audit_store`, then the backend's check that no sandbox outlived its session (beyond
    /// `pool` warm ones).
    async fn audit(
        &self,
        api: &Api,
        accepted: &BTreeMap<String, Vec<String>>,
        sandboxes: &BTreeMap<String, String>,
        pool: usize,
    ) -> Figures;
}

/// The local runtime: sandboxes are process groups whose command lines name the data dir.
struct Local<'a>(&'a Path);

impl Backend for Local<'_> {
    fn kill(&self, sandbox: &str) {
        let pid = sandbox_pid(self.0, sandbox).expect("the sandbox runs");
        kill_group(pid, nix::sys::signal::Signal::SIGKILL);
    }

    fn assert_claims(&self, sandboxes: &BTreeMap<String, String>) {
        let distinct: BTreeSet<&String> = sandboxes.values().collect();
        assert_eq!(
            distinct.len(),
            sandboxes.len(),
            "a sandbox serves two sessions: {sandboxes:?}"
        );
        for (id, sandbox) in sandboxes {
            assert!(
                sandbox_pid(self.0, sandbox).is_some(),
                "{id}'s sandbox {sandbox} runs"
            );
        }
    }

    async fn audit(
        &self,
        api: &Api,
        accepted: &BTreeMap<String, Vec<String>>,
        sandboxes: &BTreeMap<String, String>,
        pool: usize,
    ) -> Figures {
        audit(api, self.0, accepted, sandboxes, pool).await
    }
}

/// The Kubernetes runtime: sandboxes are Sandboxes whose Pods the stand-in kubelet runs.
impl Backend for kube::Kube {
    fn kill(&self, sandbox: &str) {
        let pid = self.kubelet.pid(sandbox).expect("the Pod's process");
        signal(pid, nix::sys::signal::Signal::SIGKILL);
    }

    fn assert_claims(&self, sandboxes: &BTreeMap<String, String>) {
        self.assert_accounted_for(sandboxes);
        for (id, sandbox) in sandboxes {
            assert!(self.runs(sandbox), "{id}'s Pod {sandbox} runs");
        }
    }

    async fn audit(
        &self,
        api: &Api,
        accepted: &BTreeMap<String, Vec<String>>,
        sandboxes: &BTreeMap<String, String>,
        pool: usize,
    ) -> Figures {
        let f = audit_store(api, accepted, sandboxes, &|sandbox| self.runs(sandbox)).await;
        self.assert_nothing_leaked(sandboxes, pool).await;
        f
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_survive_sandboxes_killed_at_random() {
    // No warm pool: every harness process under the data dir belongs to a session. One tenant
    // holds them all (200 in long mode, past the default quota of 100).
    let serve = Serve::start(&["--pool", "echo=0", "--tenant-sessions", "0"]);
    let api = Arc::new(serve.client());
    let sessions = scale(40, 200);
    let sandboxes = ready_sessions(&api, "echo", sessions).await;
    assert_eq!(harness_pids(&serve.data).len(), sessions);
    let load = (scale(3, 6), scale(8, 40));
    concurrent_kills(&api, &Local(&serve.data), sandboxes, load, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_concurrent_sessions_survive_sandboxes_killed_at_random() {
    let Some(db) = postgres_database().await else {
        return;
    };
    // 200 cold starts at once (long mode) on a loaded machine outwait the default 3 s for one
    // of the pool's 16 connections; an operator expecting such bursts raises it.
    let serve = Serve::start_with_env(
        &[
            "--pool",
            "echo=0",
            "--store-acquire-timeout",
            "15",
            "--tenant-sessions",
            "0",
        ],
        &[("SANDWARDEN_STORE", db)],
    );
    let api = Arc::new(serve.client());
    let sessions = scale(40, 200);
    let sandboxes = ready_sessions(&api, "echo", sessions).await;
    assert_eq!(harness_pids(&serve.data).len(), sessions);
    let load = (scale(3, 6), scale(8, 40));
    concurrent_kills(&api, &Local(&serve.data), sandboxes, load, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_concurrent_sessions_survive_pods_killed_at_random() {
    let k = kube::Kube::start(0).await;
    let sandboxes = ready_sessions(&k.api, "echo", scale(12, 60)).await;
    let load = (scale(3, 6), scale(3, 15));
    concurrent_kills(&k.api, &k, sandboxes, load, "kubernetes").await;
}

/// Sessions take turns in every mode (`turns_each` each) while `kills` of their sandboxes,
/// chosen at random, are SIGKILLed at random moments.
async fn concurrent_kills(
    api: &Arc<Api>,
    backend: &impl Backend,
    sandboxes: BTreeMap<String, String>,
    (turns_each, kills): (usize, usize),
    label: &str,
) {
    let sessions = sandboxes.len();
    backend.assert_claims(&sandboxes);
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
    for v in &victims {
        let delay = rand::random_range(0..200);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        backend.kill(&sandboxes[v]);
    }
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
    let f = backend.audit(api, &accepted, &sandboxes, 0).await;
    assert_eq!((f.dead, f.ready), (kills, sessions - kills), "{f:?}");
    eprintln!(
        "FIGURES concurrent_kills ({label}): sessions {sessions} turns/session {turns_each} kills {kills} outcomes {outcomes:?} audit {f:?}"
    );
}

/// Waits (bounded) until `n` unclaimed sandboxes are recorded and each one's harness reports
/// `ready`, asked with the token serve derives for it from `DATA/secret`.
async fn warm_sandboxes_ready(data: &Path, n: usize) -> bool {
    let secret = std::fs::read_to_string(data.join("secret")).expect("the server secret");
    let tokens = sandwarden::tokens::Tokens::new(hex::decode(secret.trim()).expect("a hex secret"));
    for _ in 0..200 {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, endpoint FROM sandboxes WHERE session_id IS NULL")
                .fetch_all(&mut read_store(data).await)
                .await
                .unwrap_or_default();
        let mut ready = 0;
        for (id, endpoint) in &rows {
            let client = sandwarden_proto::harness_client::HarnessClient::new(
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
    let serve = Serve::start(&["--pool", "echo=2"]);
    let api = Arc::new(serve.client());
    assert!(
        warm_sandboxes_ready(&serve.data, 2).await,
        "the pool filled"
    );
    pool_burst(&api, &Local(&serve.data), scale(20, 60), 2, "local").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_a_burst_of_creates_drains_the_warm_pool_and_falls_back_to_cold_starts() {
    let k = kube::Kube::start(2).await;
    pool_burst(&k.api, &k, scale(10, 40), 2, "kubernetes").await;
}

/// `burst` concurrent creates against a full warm pool of `pool`: some claim warm sandboxes, the
/// rest start cold, all become ready on distinct sandboxes.
async fn pool_burst(
    api: &Arc<Api>,
    backend: &impl Backend,
    burst: usize,
    pool: usize,
    label: &str,
) {
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
        sandboxes.insert(id.clone(), sandbox_of(api, id).await);
    }
    assert_eq!(sandboxes.len(), burst);
    // No sandbox claimed twice.
    backend.assert_claims(&sandboxes);
    let f = backend.audit(api, &BTreeMap::new(), &sandboxes, pool).await;
    assert_eq!(f.ready, burst, "{f:?}");
    eprintln!(
        "FIGURES pool_burst ({label}): burst {burst} pool {pool} warm {warm} cold {} audit {f:?}",
        burst - warm
    );
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
    assert!(
        p["detail"]
            .as_str()
            .is_some_and(|d| d.contains("cannot write its data dir")),
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

/// A turn whose reply a client got: the session, the turn, the text sent and the answer.
type Acknowledged = (String, String, String, String);

/// `serve` SIGKILLed five times while its sessions send bursts of short turns, each with its
/// own text: after every restart each turn the store shows as ended has its last event (`done`
/// or `error`) stored, so an SSE reader sees every turn end, and the store is intact. (Before
/// the turn's end and its `done` were one commit, 4 runs in 5 left a completed turn without it.)
/// And every turn a client was answered `200` for is in the history after the restarts, read
/// through the API: its own prompt, its own answer, and its `done` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_during_bursts_leaves_no_ended_turn_without_its_last_event() {
    crash_bursts(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_serve_killed_during_bursts_keeps_every_acknowledged_turn_and_its_done() {
    let Some(db) = postgres_database().await else {
        return;
    };
    crash_bursts(Some(&db)).await;
}

/// Turns the store shows as ended without their last event (`done` or `error`), and how many
/// turns ended, read from the store itself (`postgres`, or the data dir's SQLite file).
async fn ended_turns(data: &Path, postgres: Option<&str>) -> (Vec<(String, String)>, i64) {
    use sqlx::Connection;
    const MISSING: &str = "SELECT t.id, t.status FROM turns t WHERE t.status <> 'running' AND \
        NOT EXISTS (SELECT 1 FROM events e WHERE e.session_id = t.session_id \
        AND e.turn_id = t.id AND e.type IN ('done', 'error'))";
    const ENDED: &str = "SELECT COUNT(*) FROM turns WHERE status <> 'running'";
    match postgres {
        None => {
            let mut conn = read_store(data).await;
            let missing = sqlx::query_as(MISSING).fetch_all(&mut conn).await;
            let ended = sqlx::query_scalar(ENDED).fetch_one(&mut conn).await;
            (missing.expect("query turns"), ended.expect("count turns"))
        }
        Some(url) => {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("postgres");
            let missing = sqlx::query_as(MISSING).fetch_all(&mut conn).await;
            let ended = sqlx::query_scalar(ENDED).fetch_one(&mut conn).await;
            (missing.expect("query turns"), ended.expect("count turns"))
        }
    }
}

/// The crash check on the SQLite store (`postgres` None) or on PostgreSQL.
async fn crash_bursts(postgres: Option<&str>) {
    let dir = data_dir_with_quick_template();
    let _sweep = Sweep(dir.path().to_path_buf());
    let env: Vec<(&str, String)> = postgres
        .map(|db| ("SANDWARDEN_STORE", db.to_string()))
        .into_iter()
        .collect();
    let mut ids: Vec<String> = Vec::new();
    let mut ended = 0;
    let acknowledged: Arc<std::sync::Mutex<Vec<Acknowledged>>> = Arc::default();
    for round in 0..=5 {
        let mut serve = Serve::start_in_with_env(dir.path(), &["--pool", "echo=0"], &env);
        let api = Arc::new(serve.client());
        if ids.is_empty() {
            ids = ready_sessions(&api, "echo", 4).await.into_keys().collect();
        }
        // What the previous round's crash left, read while this serve has the store open.
        let missing;
        (missing, ended) = ended_turns(dir.path(), postgres).await;
        assert!(
            missing.is_empty(),
            "after crash {round}: ended turns without their last event: {missing:?}"
        );
        if postgres.is_none() {
            assert_eq!(integrity(dir.path()).await, "ok", "after crash {round}");
        }
        if round == 5 {
            let acknowledged = acknowledged.lock().expect("acknowledged").clone();
            assert_acknowledged_kept(&api, &ids, &acknowledged).await;
            eprintln!(
                "FIGURES crash_acknowledged ({}): {} acknowledged turns, each in the history \
                 with its prompt, answer and done",
                postgres.map_or("sqlite", |_| "postgres"),
                acknowledged.len()
            );
            break;
        }
        let load: Vec<_> = ids
            .iter()
            .map(|id| {
                let (api, id, acknowledged) = (api.clone(), id.clone(), acknowledged.clone());
                tokio::spawn(async move {
                    let url = format!("{}/v1/sessions/{id}/messages", api.base);
                    for k in 0.. {
                        let text = format!("round {round} turn {k} of {id}");
                        let sent = api.http.post(&url).bearer_auth(&api.key);
                        // Refused or cut off when serve dies: the next round goes on.
                        let Ok(reply) = sent.json(&json!({ "text": text })).send().await else {
                            break;
                        };
                        if reply.status() != 200 {
                            continue;
                        }
                        // An answer cut off by the kill was never acknowledged.
                        let Ok(body) = reply.json::<serde_json::Value>().await else {
                            break;
                        };
                        let turn_id = body["turn_id"].as_str().unwrap_or_default().to_string();
                        let answer = body["text"].as_str().unwrap_or_default().to_string();
                        acknowledged.lock().expect("acknowledged").push((
                            id.clone(),
                            turn_id,
                            text,
                            answer,
                        ));
                    }
                })
            })
            .collect();
        let pause = 150 + rand::random::<u64>() % 450;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        serve.kill();
        for task in load {
            task.abort();
        }
    }
    assert!(ended > 0, "no turn ended in five rounds");
    let store = postgres.map_or("sqlite", |_| "postgres");
    eprintln!(
        "FIGURES crash_bursts ({store}): 5 SIGKILLs, {ended} ended turns, each with its last event"
    );
}

/// Every acknowledged turn, read back through the API: its user message holds the prompt sent,
/// its assistant message the answer the client got (the echo of that prompt), and a `done`
/// event of that turn is among the session's events.
async fn assert_acknowledged_kept(api: &Api, ids: &[String], acknowledged: &[Acknowledged]) {
    assert!(!acknowledged.is_empty(), "no turn was acknowledged");
    for id in ids {
        let history = api.history(id, 500).await;
        let done: BTreeSet<String> = all_events(api, id)
            .await
            .iter()
            .filter(|e| e["type"] == "done")
            .filter_map(|e| e["turn_id"].as_str().map(String::from))
            .collect();
        for (_, turn_id, text, answer) in acknowledged.iter().filter(|a| &a.0 == id) {
            let of_turn = |role: &str| {
                history
                    .iter()
                    .filter(|m| m["turn_id"] == turn_id.as_str() && m["role"] == role)
                    .filter_map(|m| m["text"].as_str())
                    .collect::<Vec<_>>()
            };
            assert_eq!(of_turn("user"), [text.as_str()], "turn {turn_id} of {id}");
            assert!(answer.contains(text.as_str()), "{turn_id}: {answer:?}");
            assert_eq!(
                of_turn("assistant"),
                [answer.as_str()],
                "turn {turn_id} of {id}"
            );
            assert!(done.contains(turn_id), "turn {turn_id} of {id} has no done");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_killed_mid_load_resumes_sessions_streams_webhooks_and_terminals() {
    serve_crash(&[], "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_serve_killed_mid_load_resumes_sessions_streams_webhooks_and_terminals() {
    let Some(db) = postgres_database().await else {
        return;
    };
    serve_crash(&[("SANDWARDEN_STORE", db)], "postgres").await;
}

/// `serve` SIGKILLed with turns and webhooks in flight, then restarted on the same data dir and
/// store (`env`): sessions adopted, webhooks delivered, streams resumed, the terminal re-attached.
async fn serve_crash(env: &[(&str, String)], store: &str) {
    let n = scale(10, 50);
    let dir = data_dir_with_quick_template();
    let _sweep = Sweep(dir.path().to_path_buf());
    let mut serve = Serve::start_in_with_env(dir.path(), &["--pool", "echo=0"], env);
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

    let serve = Serve::start_in_with_env(dir.path(), &["--pool", "echo=0"], env);
    let api = Arc::new(serve.client());
    assert_adopted_with_history(&api, &ids).await;
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
    let seqs = assert_resumes(&api, followed, seen_before).await;

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
        "FIGURES serve_crash ({store}): sessions {n}+1 terminal, in-flight turns {} webhooks delivered {delivered} resumed events {} audit {f:?}",
        hooked.len(),
        seqs.len()
    );
}

/// The session's event stream, resumed with `Last-Event-ID: seen`, gives every later event in
/// order and nothing else; returns their seqs.
async fn assert_resumes(api: &Api, id: &str, seen: i64) -> Vec<i64> {
    let total = all_events(api, id).await.len() as i64;
    let resumed = api
        .sse(
            &format!("/v1/sessions/{id}/events"),
            None,
            Some(&seen.to_string()),
            (total - seen) as usize,
        )
        .await;
    let seqs: Vec<i64> = resumed
        .iter()
        .map(|(_, _, e)| e["seq"].as_i64().expect("seq"))
        .collect();
    assert_eq!(seqs, ((seen + 1)..=total).collect::<Vec<_>>());
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kubernetes_serve_killed_mid_load_keeps_sessions_their_pods_and_history() {
    let n = scale(6, 30);
    let mut k = kube::Kube::start(0).await;
    let sandboxes = ready_sessions(&k.api, "echo", n).await;
    k.assert_claims(&sandboxes);
    let pids: BTreeMap<&String, Option<i32>> =
        sandboxes.values().map(|s| (s, k.kubelet.pid(s))).collect();
    let ids: Vec<String> = sandboxes.keys().cloned().collect();
    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for id in &ids {
        let (status, reply) = k.api.say(id, &format!("before {id}")).await;
        assert_eq!(status, 200, "{reply}");
        accepted
            .entry(id.clone())
            .or_default()
            .extend(reply["turn_id"].as_str().map(String::from));
    }
    let followed = ids[0].clone();
    let seen_before = all_events(&k.api, &followed).await.len() as i64;

    // Slow turns in flight when serve dies.
    let mut in_flight = Vec::new();
    for id in &ids {
        let turn_id = k.api.post_async(id, json!({"text": "/slow 30 w"})).await;
        accepted
            .entry(id.clone())
            .or_default()
            .push(turn_id.clone());
        in_flight.push((id.clone(), turn_id));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    k.crash_and_restart();
    let api = k.api.clone();

    // Every session is adopted on the Pod it had, with its history; the interrupted turns
    // ended with a reason.
    assert_adopted_with_history(&api, &ids).await;
    let mut interrupted = 0;
    for (id, turn_id) in &in_flight {
        let t = api.finished_turn(id, turn_id).await;
        match t["status"].as_str() {
            Some("completed") => {}
            Some("failed") => {
                assert_failed_with_reason(&t);
                interrupted += 1;
            }
            _ => panic!("the turn did not end: {t}"),
        }
    }
    for (sandbox, pid) in &pids {
        assert_eq!(
            &k.kubelet.pid(sandbox),
            pid,
            "{sandbox} kept its Pod's process"
        );
    }
    k.assert_claims(&sandboxes);
    let seqs = assert_resumes(&api, &followed, seen_before).await;
    let f = k.audit(&api, &accepted, &sandboxes, 0).await;
    assert_eq!(f.ready, n, "{f:?}");
    eprintln!(
        "FIGURES serve_crash (kubernetes): sessions {n}, in-flight turns {} (interrupted {interrupted}), resumed events {} audit {f:?}",
        in_flight.len(),
        seqs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_database_stopped_mid_load_answers_503_and_loses_nothing() {
    let Some(cluster) = OwnCluster::new() else {
        return;
    };
    let server = cluster.start();
    let db = sandwarden::store::Store::scratch_database(&server)
        .await
        .expect("database");
    let serve = Serve::start_with_env(
        &["--pool", "echo=0", "--store-acquire-timeout", "1"],
        &[("SANDWARDEN_STORE", db)],
    );
    let api = Arc::new(serve.client());
    let sessions = scale(8, 40);
    let mut sandboxes = ready_sessions(&api, "echo", sessions).await;
    // A session outside the load, to be refused while the database is down.
    let probe = api.ready("echo").await;

    // Every session takes turns in rotating modes until the database has been back a while,
    // asking again after each 503 with a new text (so a refused message can be told apart from
    // a kept one).
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, id) in sandboxes.keys().enumerate() {
        let (api, id, over) = (api.clone(), id.clone(), over.clone());
        load.push(tokio::spawn(async move {
            let (mut seen, mut refused) = (Vec::new(), Vec::new());
            for j in 0..1000 {
                if over.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let text = format!("/slow 3 s{i}t{j}");
                let (outcome, turn_id) = turn(&api, &id, i + j, &text).await;
                if outcome == Seen::Unavailable && turn_id.is_none() {
                    refused.push(text);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    seen.push((outcome, turn_id));
                }
            }
            (id, seen, refused)
        }));
    }
    // The database stops under the load, stays down a while, and comes back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| cluster.ctl(&["stop"]));
    let resp = api
        .http
        .get(serve.url(&format!(
            "/v1/sessions/{}",
            sandboxes.keys().next().expect("a session")
        )))
        .bearer_auth(&api.key)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 503);
    assert!(
        resp.headers().get("retry-after").is_some(),
        "503 says when to retry: {:?}",
        resp.headers()
    );
    let (status, p) = api.say(&probe, "while down").await;
    assert_eq!(
        (status, p["type"].as_str()),
        (503, Some("store_unavailable")),
        "{p}"
    );
    let (status, p) = api
        .call("POST", "/v1/sessions", Some(json!({"harness": "echo"})))
        .await;
    assert_eq!(
        (status, p["type"].as_str()),
        (503, Some("store_unavailable")),
        "{p}"
    );
    tokio::time::sleep(Duration::from_millis(scale(1500, 5000) as u64)).await;
    tokio::task::block_in_place(|| cluster.start());
    tokio::time::sleep(Duration::from_millis(scale(1500, 5000) as u64)).await;
    over.store(true, std::sync::atomic::Ordering::SeqCst);

    let mut accepted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut outcomes: BTreeMap<Seen, usize> = BTreeMap::new();
    let mut refused_total = 0;
    for task in load {
        let (id, seen, refused) = task.await.expect("load task");
        assert!(
            seen.iter().all(|(o, _)| *o != Seen::Refused),
            "{id}: {seen:?}"
        );
        for (outcome, turn_id) in seen {
            *outcomes.entry(outcome).or_default() += 1;
            accepted.entry(id.clone()).or_default().extend(turn_id);
        }
        // Nothing of a refused message was kept.
        let texts = api.history_texts(&id).await;
        for r in &refused {
            assert!(!texts.contains(r), "refused {r:?} was stored: {texts:?}");
        }
        refused_total += refused.len();
    }
    let texts = api.history_texts(&probe).await;
    assert!(
        texts.is_empty(),
        "the refused message was not kept: {texts:?}"
    );
    let (_, list) = api.call("GET", "/v1/sessions", None).await;
    assert_eq!(
        list["sessions"].as_array().map(Vec::len),
        Some(sessions + 1),
        "no session from the refused create: {list}"
    );
    sandboxes.insert(probe.clone(), sandbox_of(&api, &probe).await);
    let f = audit(&api, &serve.data, &accepted, &sandboxes, 0).await;
    assert_eq!(f.ready, sessions + 1, "{f:?}");
    eprintln!(
        "FIGURES database_stopped (postgres): sessions {sessions} outcomes {outcomes:?} refused with 503 {refused_total} audit {f:?}"
    );
}

/// After serve crashed and came back: every session is `ready` again with its history (each
/// had a turn saying `before <id>`).
async fn assert_adopted_with_history(api: &Api, ids: &[String]) {
    for id in ids {
        let s = api.wait_status(id, "ready").await;
        assert_eq!(s["status"], "ready", "adopted after the crash: {s}");
        let texts = api.history_texts(id).await;
        assert!(
            texts.contains(&format!("before {id}")),
            "history kept: {texts:?}"
        );
    }
}
