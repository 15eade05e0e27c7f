//! `sandwarden serve --runtime kubernetes` end to end, with no cluster: the in-memory API server
//! (`sandwarden::fake_kube`) served over HTTP to a real `serve` process through a kubeconfig, and
//! a stand-in kubelet in this test that runs each Pod's harness command line as a real process on
//! its own loopback address (127.0.0.N, the Pod IP) with the Pod's env and token Secret. What is
//! real: `serve`, its controller (elected through the Lease), the claim path, the harness and
//! echo agent processes and every HTTP call between them.

use crate::common::kube::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_claim_warm_pods_late_bind_and_die_with_their_pod() {
    let port = 20_000 + rand::random_range(0..20_000u16);
    let c = cluster(port).await;
    let scratch = tempfile::tempdir().expect("scratch");
    let kubelet = Kubelet::start(&c.fake, scratch.path());
    let data = tempfile::tempdir().expect("data");
    let (server, api) = serve(&c, data.path(), "replica-a");
    c.fake.put(
        POOLS,
        json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxWarmPool",
               "metadata": {"name": "echo", "namespace": NS},
               "spec": {"templateRef": {"name": "echo"}, "replicas": 2}}),
    );
    until("the elected controller fills the pool", || {
        pool_ready(&c.fake, 2)
    })
    .await;
    let lease = c
        .fake
        .object(
            "apis/coordination.k8s.io/v1/leases",
            NS,
            "sandwarden-controller",
        )
        .expect("the leader Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "replica-a");

    // A warm claim: ready at once, with the session's env bound through the harness.
    let (status, session) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(json!({"harness": "echo", "env": {"GREETING": "hello from the session"}})),
        )
        .await;
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["status"], "ready", "warm: {session}");
    let id = session["id"].as_str().expect("id").to_string();
    let sandbox_name = session["sandbox_id"]
        .as_str()
        .map(String::from)
        .or_else(|| {
            c.fake.list(SANDBOXES, NS).into_iter().find_map(|s| {
                (s["status"]["claimedBy"] == id.as_str())
                    .then(|| s["metadata"]["name"].as_str().map(String::from))
                    .flatten()
            })
        })
        .expect("the claimed Sandbox");
    let claimed = c
        .fake
        .object(SANDBOXES, NS, &sandbox_name)
        .expect("sandbox");
    assert_eq!(claimed["status"]["claimedBy"], id.as_str());
    let (status, reply) = api.say(&id, "/env GREETING").await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply.to_string().contains("hello from the session"),
        "late-bound env reached the agent: {reply}"
    );
    until("the pool refills behind the claim", || {
        pool_ready(&c.fake, 2)
    })
    .await;

    // The Pod's process dies: the Pod fails, the claimed Sandbox fails, the session is dead.
    let pid = kubelet
        .pid(&sandbox_name)
        .expect("the claimed Pod's process");
    crate::common::signal(pid, nix::sys::signal::Signal::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
        if s["status"] == "dead" {
            break;
        }
        assert!(Instant::now() < deadline, "not marked dead: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = api.say(&id, "hello?").await;
    assert!(status == 409 || status == 410, "{status} {body}");

    // No warm sandbox left: a cold one is created for the session.
    let mut pool = c.fake.object(POOLS, NS, "echo").expect("pool");
    pool["spec"]["replicas"] = json!(0);
    c.fake.put(POOLS, pool);
    until("the pool drained", || pool_ready(&c.fake, 0)).await;
    let cold = api.ready("echo").await;
    let (status, reply) = api.say(&cold, "ping").await;
    assert_eq!(status, 200, "{reply}");

    // Deleting the session deletes its Sandbox (and, through ownership, its Pod).
    let (status, _) = api
        .call("DELETE", &format!("/v1/sessions/{cold}"), None)
        .await;
    assert!(status == 200 || status == 204, "{status}");
    until("the cold Sandbox deleted", || {
        let left: Vec<Value> = c
            .fake
            .list(SANDBOXES, NS)
            .into_iter()
            .filter(|s| {
                s["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("sbx-"))
            })
            .collect();
        left.is_empty().then_some(()).ok_or(format!("{left:?}"))
    })
    .await;
    drop(server);
    drop(kubelet);
}
