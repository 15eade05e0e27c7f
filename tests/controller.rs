//! The Sandbox reconciler against the in-memory Kubernetes API (`sandwarden::fake_kube`), through a
//! real `kube::Client`: the exact writes of each pass, from a new sandbox to a ready one, a failed
//! Pod recreated (or not, when claimed), a missing template, and a sandbox past its shutdownTime.

use kube::api::Api;
use sandwarden::controller::sandbox::reconcile;
use sandwarden::crd::{Sandbox, SandboxSpec, SandboxTemplate, SandboxTemplateSpec, TemplateRef};
use sandwarden::fake_kube::FakeKube;
use serde_json::{Value, json};

const NS: &str = "agents";
const SANDBOXES: &str = "apis/sandwarden.dev/v1alpha1/sandboxes";
const PODS: &str = "api/v1/pods";

fn setup(template: bool) -> FakeKube {
    let fake = FakeKube::new();
    if template {
        let spec: SandboxTemplateSpec =
            serde_json::from_value(json!({"kind": "api", "command": "sandwarden echo-agent"}))
                .expect("template");
        let mut t = serde_json::to_value(SandboxTemplate::new("echo", spec)).expect("json");
        t["metadata"]["namespace"] = json!(NS);
        fake.put("apis/sandwarden.dev/v1alpha1/sandboxtemplates", t);
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
    reconcile(&client, &sandbox).await.expect("reconcile");
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
        secret["stringData"]["token"].as_str().map(str::len),
        Some(64)
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
