//! The controller against the in-memory Kubernetes API (`sandwarden::fake_kube`), through a real
//! `kube::Client`: the exact writes of each Sandbox pass, from a new sandbox to a ready one, a
//! failed Pod recreated (or not, when claimed), a missing template, a sandbox past its
//! shutdownTime; racing claimers; then the controllers running from watches: a warm pool filling,
//! handing over claimed sandboxes, scaling down unready-first, a crash mid-scale-up and expired
//! watches (410) without over-creation or loss; and leader election over a Lease.

use kube::api::Api;
use sandwarden::controller::sandbox::reconcile;
use sandwarden::k8s::crd::{
    Sandbox, SandboxSpec, SandboxTemplate, SandboxTemplateSpec, TemplateRef,
};
use sandwarden::tokens::Tokens;
use sandwarden_testkit::fake_kube::FakeKube;
use serde_json::{Value, json};
use std::time::Duration;

const NS: &str = "agents";
const SANDBOXES: &str = "apis/sandwarden.dev/v1alpha1/sandboxes";
const PODS: &str = "api/v1/pods";

/// The `echo` SandboxTemplate in the test namespace.
fn put_template(fake: &FakeKube) {
    let spec: SandboxTemplateSpec =
        serde_json::from_value(json!({"kind": "api", "command": "sandwarden echo-agent"}))
            .expect("template");
    let mut t = serde_json::to_value(SandboxTemplate::new("echo", spec)).expect("json");
    t["metadata"]["namespace"] = json!(NS);
    fake.put("apis/sandwarden.dev/v1alpha1/sandboxtemplates", t);
}

fn setup(template: bool) -> FakeKube {
    let fake = FakeKube::new();
    if template {
        put_template(&fake);
    }
    let mut s = sandbox_json("sbx-1");
    s["metadata"]["uid"] = json!("uid-sbx-1");
    fake.put(SANDBOXES, s);
    fake
}

/// A Sandbox of the `echo` template in the test namespace, as JSON.
fn sandbox_json(name: &str) -> Value {
    let sandbox = Sandbox::new(
        name,
        SandboxSpec {
            template_ref: TemplateRef {
                name: "echo".into(),
            },
            env: Default::default(),
            shutdown_time: None,
        },
    );
    let mut s = serde_json::to_value(sandbox).expect("json");
    s["metadata"]["namespace"] = json!(NS);
    s
}

/// One pass on the sandbox as stored now; returns the writes it made.
async fn pass(fake: &FakeKube) -> Vec<String> {
    let before = fake.writes().len();
    let client = fake.client();
    let sandbox = Api::<Sandbox>::namespaced(client.clone(), NS)
        .get("sbx-1")
        .await
        .expect("sandbox");
    reconcile(
        &client,
        &sandbox,
        &Tokens::new(b"test".to_vec()).for_sandbox("sbx-1"),
    )
    .await
    .expect("reconcile");
    fake.writes()[before..].to_vec()
}

fn status(fake: &FakeKube) -> Value {
    fake.object(SANDBOXES, NS, "sbx-1").expect("sandbox")["status"].clone()
}

fn set_pod_status(fake: &FakeKube, status: Value) {
    let mut pod = fake.object(PODS, NS, "sbx-1").expect("pod");
    pod["status"] = status;
    fake.put(PODS, pod);
}

#[tokio::test]
async fn a_new_sandbox_gets_a_secret_and_a_pod_then_becomes_ready() {
    let fake = setup(true);
    assert_eq!(
        pass(&fake).await,
        vec![
            "POST /api/v1/namespaces/agents/secrets".to_string(),
            "PATCH /api/v1/namespaces/agents/pods/sbx-1".to_string(),
            "PATCH /apis/sandwarden.dev/v1alpha1/namespaces/agents/sandboxes/sbx-1/status"
                .to_string(),
        ]
    );
    let pod = fake.object(PODS, NS, "sbx-1").expect("pod");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "Sandbox");
    assert_eq!(pod["metadata"]["labels"]["sandwarden.dev/template"], "echo");
    let secret = fake
        .object("api/v1/secrets", NS, "sbx-1-harness-token")
        .expect("secret");
    assert_eq!(
        secret["stringData"]["token"].as_str(),
        Some(Tokens::new(b"test".to_vec()).for_sandbox("sbx-1").as_str()),
        "the token the API derives for this sandbox"
    );
    assert_eq!(status(&fake)["phase"], "Starting");
    assert_eq!(status(&fake)["conditions"][0]["status"], "False");

    // The next pass sees the Pod (status only); then it has converged: no writes at all.
    assert_eq!(pass(&fake).await.len(), 1);
    assert_eq!(pass(&fake).await, Vec::<String>::new());

    set_pod_status(
        &fake,
        json!({"phase": "Running", "podIP": "10.1.2.3",
               "conditions": [{"type": "Ready", "status": "True"}]}),
    );
    assert_eq!(pass(&fake).await.len(), 1, "only the status");
    let s = status(&fake);
    assert_eq!(s["phase"], "Ready");
    assert_eq!(s["endpoint"], "http://10.1.2.3:7000");
    assert_eq!(s["conditions"][0]["status"], "True");
}

fn failed() -> Value {
    json!({"phase": "Failed", "containerStatuses": [{"name": "harness", "image": "x", "imageID": "",
           "ready": false, "restartCount": 0,
           "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]})
}

#[tokio::test]
async fn a_failed_pod_of_an_unclaimed_sandbox_is_recreated_with_backoff() {
    let fake = setup(true);
    pass(&fake).await;
    set_pod_status(&fake, failed());
    let writes = pass(&fake).await;
    assert!(
        writes.contains(&"DELETE /api/v1/namespaces/agents/pods/sbx-1".to_string()),
        "{writes:?}"
    );
    assert_eq!(status(&fake)["restarts"], 1);
    assert!(
        status(&fake)["conditions"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("OOMKilled")),
        "{}",
        status(&fake)
    );
    let writes = pass(&fake).await;
    assert!(
        writes.contains(&"PATCH /api/v1/namespaces/agents/pods/sbx-1".to_string()),
        "recreated: {writes:?}"
    );
}

#[tokio::test]
async fn a_claimed_sandbox_whose_pod_fails_is_failed_not_recreated() {
    let fake = setup(true);
    pass(&fake).await;
    let mut s = fake.object(SANDBOXES, NS, "sbx-1").expect("sandbox");
    s["status"]["claimedBy"] = json!("ses_1");
    fake.put(SANDBOXES, s);
    set_pod_status(&fake, failed());
    let writes = pass(&fake).await;
    assert!(
        !writes.iter().any(|w| w.starts_with("DELETE")),
        "{writes:?}"
    );
    assert_eq!(status(&fake)["phase"], "Failed");
    // It stays failed.
    fake.remove(PODS, NS, "sbx-1");
    let writes = pass(&fake).await;
    assert!(
        !writes.iter().any(|w| w.contains("/pods/")),
        "not recreated: {writes:?}"
    );
}

#[tokio::test]
async fn a_missing_template_fails_the_sandbox_and_a_past_shutdown_time_deletes_it() {
    let fake = setup(false);
    let writes = pass(&fake).await;
    assert_eq!(writes.len(), 1, "status only: {writes:?}");
    assert_eq!(status(&fake)["conditions"][0]["reason"], "TemplateNotFound");

    let fake = setup(true);
    let mut s = fake.object(SANDBOXES, NS, "sbx-1").expect("sandbox");
    s["spec"]["shutdownTime"] = json!("2020-01-01T00:00:00Z");
    fake.put(SANDBOXES, s);
    assert_eq!(
        pass(&fake).await,
        vec!["DELETE /apis/sandwarden.dev/v1alpha1/namespaces/agents/sandboxes/sbx-1".to_string()]
    );
}

fn ready_sandbox(fake: &FakeKube, name: &str) {
    let mut s = sandbox_json(name);
    s["metadata"]["labels"] = json!({"sandwarden.dev/template": "echo"});
    s["status"] = json!({"phase": "Ready", "endpoint": format!("http://{name}:7000")});
    fake.put(SANDBOXES, s);
}

#[tokio::test]
async fn concurrent_claimers_racing_for_one_sandbox_exactly_one_wins() {
    use sandwarden::runtime::kubernetes::{Reservations, candidates, claim};
    let fake = FakeKube::new();
    ready_sandbox(&fake, "only");
    let api: Api<Sandbox> = Api::namespaced(fake.client(), NS);
    // Both claimers saw the same cached candidate before either wrote.
    let seen = candidates(&api, "echo").await.expect("candidates");
    assert_eq!(seen.len(), 1);
    // Two replicas (their own reservations): the race reaches the API, whose precondition decides.
    let (replica_a, replica_b) = (Reservations::default(), Reservations::default());
    let (a, b) = tokio::join!(
        claim(&api, &seen, "ses_a", 0, &replica_a),
        claim(&api, &seen, "ses_b", 0, &replica_b)
    );
    let (a, b) = (a.expect("claim a"), b.expect("claim b"));
    assert_eq!(
        [a.sandbox.is_some(), b.sandbox.is_some()]
            .iter()
            .filter(|w| **w)
            .count(),
        1,
        "exactly one claimer wins"
    );
    assert_eq!(a.conflicts + b.conflicts, 1, "the loser saw one conflict");
    let winner = if a.sandbox.is_some() {
        "ses_a"
    } else {
        "ses_b"
    };
    let stored = fake.object(SANDBOXES, NS, "only").expect("sandbox");
    assert_eq!(stored["status"]["claimedBy"], winner);
    assert!(
        candidates(&api, "echo")
            .await
            .expect("candidates")
            .is_empty()
    );

    // Claimers of one server never collide, even starting at the same candidate: one write each.
    for n in 0..3 {
        ready_sandbox(&fake, &format!("pool-{n}"));
    }
    let seen = candidates(&api, "echo").await.expect("candidates");
    let writes_before = fake.writes().len();
    let book = Reservations::default();
    let (x, y, z) = tokio::join!(
        claim(&api, &seen, "ses_x", 0, &book),
        claim(&api, &seen, "ses_y", 0, &book),
        claim(&api, &seen, "ses_z", 0, &book)
    );
    let won: Vec<String> = [x, y, z]
        .into_iter()
        .map(|c| {
            c.expect("claim")
                .sandbox
                .and_then(|s| s.metadata.name)
                .expect("won")
        })
        .collect();
    let mut distinct = won.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{won:?}");
    assert_eq!(
        fake.writes().len() - writes_before,
        3,
        "one write per claim"
    );
}

#[tokio::test]
async fn a_claimed_sandbox_whose_running_pod_vanishes_fails() {
    let fake = setup(true);
    pass(&fake).await;
    set_pod_status(
        &fake,
        json!({"phase": "Running", "podIP": "10.1.2.3",
               "conditions": [{"type": "Ready", "status": "True"}]}),
    );
    pass(&fake).await;
    let mut s = fake.object(SANDBOXES, NS, "sbx-1").expect("sandbox");
    s["status"]["claimedBy"] = json!("ses_1");
    fake.put(SANDBOXES, s);
    fake.remove(PODS, NS, "sbx-1");
    let writes = pass(&fake).await;
    assert!(
        !writes.iter().any(|w| w.contains("/pods/")),
        "not recreated without the session's state: {writes:?}"
    );
    assert_eq!(status(&fake)["phase"], "Failed");
    assert_eq!(status(&fake)["conditions"][0]["reason"], "PodVanished");
    pass(&fake).await;
    assert_eq!(
        status(&fake)["conditions"][0]["reason"],
        "PodVanished",
        "a settled failure keeps its reason"
    );
}

// --- The controllers running against the fake API, fed by watches. ---

const POOLS: &str = "apis/sandwarden.dev/v1alpha1/sandboxwarmpools";

/// Plays the kubelet: every Pod without a phase starts running and becomes ready.
fn kubelet(fake: &FakeKube) -> tokio::task::JoinHandle<()> {
    let fake = fake.clone();
    tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            for mut pod in fake.list(PODS, NS) {
                if pod["status"]["phase"].is_null() {
                    n += 1;
                    pod["status"] = json!({"phase": "Running", "podIP": format!("10.0.{}.{}", n / 250, n % 250 + 1),
                        "conditions": [{"type": "Ready", "status": "True"}]});
                    fake.put(PODS, pod);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
}

fn pool_json(replicas: i32) -> Value {
    json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxWarmPool",
           "metadata": {"name": "echo", "namespace": NS, "generation": 1},
           "spec": {"templateRef": {"name": "echo"}, "replicas": replicas}})
}

fn scale(fake: &FakeKube, replicas: i32) {
    let mut pool = fake.object(POOLS, NS, "echo").expect("pool");
    pool["spec"]["replicas"] = json!(replicas);
    fake.put(POOLS, pool);
}

/// The pool's members: its unclaimed sandboxes, and how many of them are Ready.
fn members(fake: &FakeKube) -> (usize, usize) {
    let owned: Vec<Value> = fake
        .list(SANDBOXES, NS)
        .into_iter()
        .filter(|s| s["metadata"]["labels"]["sandwarden.dev/pool"] == "echo")
        .collect();
    let ready = owned
        .iter()
        .filter(|s| s["status"]["phase"] == "Ready")
        .count();
    (owned.len(), ready)
}

/// Waits (bounded) until `check` holds, saying what was last seen when it does not.
async fn until(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match check() {
            Ok(()) => return,
            Err(seen) if std::time::Instant::now() > deadline => panic!("{what}: {seen}"),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// Waits (bounded) until the pool has `want` members (all, ready).
async fn until_members(fake: &FakeKube, what: &str, want: (usize, usize)) {
    until(what, || {
        let seen = members(fake);
        (seen == want).then_some(()).ok_or_else(|| {
            let writes = fake.writes();
            let last: Vec<&String> = writes.iter().rev().take(8).collect();
            format!(
                "{seen:?}; pool status {}; {} writes, the last {last:?}",
                fake.object(POOLS, NS, "echo")
                    .map(|p| p["status"].clone())
                    .unwrap_or_default(),
                writes.len()
            )
        })
    })
    .await;
}

fn start_controllers(
    fake: &FakeKube,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sandwarden::controller::run(
        fake.client(),
        NS,
        Tokens::new(b"test".to_vec()),
        "test-replica",
        stop.clone(),
    ));
    (stop, task)
}

fn sandbox_posts(fake: &FakeKube) -> usize {
    fake.writes()
        .iter()
        .filter(|w| **w == format!("POST /apis/sandwarden.dev/v1alpha1/namespaces/{NS}/sandboxes"))
        .count()
}

#[tokio::test]
async fn a_warm_pool_fills_scales_down_unready_first_and_refills_after_a_claim() {
    let fake = setup(true);
    fake.remove(SANDBOXES, NS, "sbx-1");
    fake.put(POOLS, pool_json(3));
    let kubelet = kubelet(&fake);
    let (stop, task) = start_controllers(&fake);
    until_members(&fake, "three ready members", (3, 3)).await;
    until("the pool's status counts them", || {
        let s = fake.object(POOLS, NS, "echo").expect("pool")["status"].clone();
        (s["readyReplicas"] == 3 && s["selector"] == "sandwarden.dev/pool=echo")
            .then_some(())
            .ok_or(s.to_string())
    })
    .await;
    assert_eq!(sandbox_posts(&fake), 3, "no over-creation");
    assert!(
        fake.list("apis/events.k8s.io/v1/events", NS)
            .iter()
            .any(|e| e["reason"] == "Ready"),
        "transitions are published as Events"
    );

    // A claim hands the sandbox over: it leaves the pool (so deleting the pool spares it) and
    // the pool makes a replacement.
    let api: Api<Sandbox> = Api::namespaced(fake.client(), NS);
    let seen = sandwarden::runtime::kubernetes::candidates(&api, "echo")
        .await
        .expect("candidates");
    let claimed =
        sandwarden::runtime::kubernetes::claim(&api, &seen, "ses_1", 7, &Default::default())
            .await
            .expect("claim")
            .sandbox
            .and_then(|s| s.metadata.name)
            .expect("won");
    until("the claimed sandbox leaves the pool, which refills", || {
        let s = fake.object(SANDBOXES, NS, &claimed).expect("claimed");
        let released = s["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|o| o.is_empty());
        (released && members(&fake) == (3, 3))
            .then_some(())
            .ok_or(format!("{:?} {}", members(&fake), s["metadata"]))
    })
    .await;

    // Scaling down removes the surplus; an unready member goes before ready ones.
    kubelet.abort();
    scale(&fake, 4);
    until_members(&fake, "a fourth, unready member", (4, 3)).await;
    scale(&fake, 3);
    until_members(&fake, "the unready one removed", (3, 3)).await;

    // Deleting the pool takes its members, not the claimed sandbox.
    fake.remove(POOLS, NS, "echo");
    assert_eq!(members(&fake), (0, 0));
    assert!(fake.object(SANDBOXES, NS, &claimed).is_some());
    stop.cancel();
    task.await.expect("controllers stop");
}

#[tokio::test]
async fn a_restart_mid_scale_up_and_a_410_neither_over_create_nor_lose_a_sandbox() {
    let fake = FakeKube::new().with_latency(std::time::Duration::from_millis(3));
    put_template(&fake);
    fake.put(POOLS, pool_json(20));
    let (stop, task) = start_controllers(&fake);
    until("the scale-up under way", || {
        let n = members(&fake).0;
        (n >= 3).then_some(()).ok_or(n.to_string())
    })
    .await;
    // It dies mid-pass (a crash, or losing the lease), with creations made and more to come.
    task.abort();
    let _ = task.await;
    drop(stop);
    let made = members(&fake).0;
    assert!(made < 20, "stopped mid-way ({made})");

    // A new leader: its cache lists what the first made, so it makes only the rest.
    let kubelet = kubelet(&fake);
    let (stop, task) = start_controllers(&fake);
    until_members(&fake, "twenty ready members", (20, 20)).await;
    assert_eq!(
        sandbox_posts(&fake),
        20,
        "no over-creation across the restart"
    );

    // Watches expire (410 Gone on resume): the controllers list again and converge.
    fake.compact();
    fake.drop_watches();
    scale(&fake, 22);
    until_members(&fake, "two more after the relist", (22, 22)).await;
    // A sandbox deleted behind the controllers' back is replaced.
    let victim = fake
        .list(SANDBOXES, NS)
        .into_iter()
        .find_map(|s| s["metadata"]["name"].as_str().map(String::from))
        .expect("a member");
    fake.remove(SANDBOXES, NS, &victim);
    until_members(&fake, "the lost member replaced", (22, 22)).await;
    assert_eq!(sandbox_posts(&fake), 23);
    kubelet.abort();
    stop.cancel();
    task.await.expect("controllers stop");
}

#[tokio::test]
async fn one_leader_at_a_time_and_a_successor_when_it_stops() {
    use sandwarden::controller::leader::{Elector, Timings};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fake = FakeKube::new();
    let timings = Timings {
        lease: std::time::Duration::from_millis(600),
        retry: std::time::Duration::from_millis(50),
        renew_deadline: std::time::Duration::from_millis(400),
    };
    let leading = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut replicas = Vec::new();
    for who in ["a", "b", "c"] {
        let elector = Elector::new(
            Api::namespaced(fake.client(), NS),
            "sandwarden-controller",
            who,
            timings,
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let (leading, most) = (leading.clone(), most.clone());
        let task = tokio::spawn(elector.run(stop.clone(), move |lost| {
            let (leading, most) = (leading.clone(), most.clone());
            async move {
                let now = leading.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                lost.cancelled().await;
                leading.fetch_sub(1, Ordering::SeqCst);
            }
        }));
        replicas.push((who, stop, task));
    }
    let holder = || {
        fake.object(
            "apis/coordination.k8s.io/v1/leases",
            NS,
            "sandwarden-controller",
        )
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
    };
    until("a leader", || {
        (leading.load(Ordering::SeqCst) == 1)
            .then_some(())
            .ok_or(format!("{:?}", holder()))
    })
    .await;
    let first = holder().expect("a holder");
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    assert_eq!(
        holder().as_deref(),
        Some(first.as_str()),
        "the leader renews"
    );
    // The leader shuts down and releases the lease: another takes over.
    let (_, stop, task) = replicas
        .iter()
        .position(|(who, _, _)| *who == first)
        .map(|i| replicas.remove(i))
        .expect("the leader's replica");
    stop.cancel();
    task.await.expect("stops");
    until("a successor", || {
        let h = holder();
        (leading.load(Ordering::SeqCst) == 1 && h.is_some() && h.as_deref() != Some(first.as_str()))
            .then_some(())
            .ok_or(format!("{h:?}"))
    })
    .await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "never two leaders at once");
    for (_, stop, task) in replicas {
        stop.cancel();
        task.await.expect("stops");
    }
}

#[tokio::test]
async fn a_pool_is_sized_as_soon_as_the_sandbox_cache_fills_even_when_it_fills_last() {
    // The order a loaded machine once produced: the pool's own lists finish first, its
    // reconcile starts and waits for the Sandbox cache, the Sandbox controller wakes (its Pods
    // listed) before its Sandboxes are listed, and only then the Sandbox list completes.
    let fake = setup(true);
    fake.remove(SANDBOXES, NS, "sbx-1");
    fake.put(POOLS, pool_json(2));
    let sandbox_list = fake.hold_lists(SANDBOXES, false);
    let pod_list = fake.hold_lists(PODS, true);
    let (stop, task) = start_controllers(&fake);
    sandbox_list.parked().await;
    pod_list.parked().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pod_list.release();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = std::time::Instant::now();
    sandbox_list.release();
    until("the pool's two members created", || {
        (sandbox_posts(&fake) == 2)
            .then_some(())
            .ok_or(format!("{} created", sandbox_posts(&fake)))
    })
    .await;
    // The pool is sized from the filled cache at once; it used to wait for a 5 s guard (and
    // before that guard, for good). Seconds of slack for a loaded machine, not a benchmark.
    let waited = released.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "the pool was sized {waited:?} after the Sandbox cache filled"
    );
    stop.cancel();
    task.await.expect("controllers stop");
}
