//! The cluster suite: the CRDs and the controller against a real Kubernetes API server. It runs
//! when a kubeconfig is present (`KUBECONFIG`, or `~/.kube/config`) and is skipped, saying so,
//! otherwise; `SANDWARDEN_REQUIRE_CLUSTER=1` turns the skip into a failure. No cluster can run
//! on the machines CI uses, so there it skips; operators run it against theirs (kind, k3d, a
//! test namespace of a real cluster) as docs/kubernetes.md describes.
//!
//! It installs the CRDs (server-side apply), works in a fresh namespace it deletes afterwards,
//! and checks what the in-memory API server cannot: the schemas and CEL rules as the API server
//! enforces them, server-side apply and the status and scale subresources, owner-reference
//! garbage collection, and (when the harness images are loadable, `SANDWARDEN_CLUSTER_IMAGES=1`)
//! Pods that really become Ready and sandboxes a warm pool keeps.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use sandwarden::k8s::crd::{Sandbox, SandboxTemplate, SandboxWarmPool};
use serde_json::json;
use std::time::{Duration, Instant};

/// A client for the cluster the kubeconfig names, or `None` (the suite is skipped) without one.
async fn cluster() -> Option<kube::Client> {
    let configured = std::env::var_os("KUBECONFIG").is_some()
        || dirs::home_dir().is_some_and(|h| h.join(".kube/config").exists());
    let required = std::env::var("SANDWARDEN_REQUIRE_CLUSTER").as_deref() == Ok("1");
    if !configured {
        assert!(
            !required,
            "SANDWARDEN_REQUIRE_CLUSTER=1 but no kubeconfig (KUBECONFIG or ~/.kube/config)"
        );
        eprintln!(
            "SKIPPED: the cluster suite needs a kubeconfig (KUBECONFIG or ~/.kube/config); none here"
        );
        return None;
    }
    match kube::Client::try_default().await {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(!required, "the kubeconfig does not give a client: {e}");
            eprintln!("SKIPPED: the kubeconfig does not give a client: {e}");
            None
        }
    }
}

/// A fresh namespace with the CRDs installed; deleted when dropped.
struct Scratch {
    client: kube::Client,
    ns: String,
}

impl Scratch {
    async fn new(client: kube::Client) -> Scratch {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in [
            SandboxTemplate::crd(),
            Sandbox::crd(),
            SandboxWarmPool::crd(),
        ] {
            crds.patch(
                &crd.name_any(),
                &PatchParams::apply("sandwarden-cluster-tests").force(),
                &Patch::Apply(&crd),
            )
            .await
            .expect("install the CRDs");
            let name = crd.name_any();
            wait("the CRD established", || async {
                crds.get(&name).await.ok().is_some_and(|c| {
                    c.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
            })
            .await;
        }
        let ns = format!(
            "sandwarden-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(ns.clone());
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("create the test namespace");
        Scratch { client, ns }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let (client, ns) = (self.client.clone(), self.ns.clone());
        // Best effort, off the test's runtime (which may be shutting down).
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let _ = Api::<Namespace>::all(client)
                        .delete(&ns, &DeleteParams::default())
                        .await;
                });
            }
        })
        .join();
    }
}

async fn wait<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(180);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 180 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn template(name: &str) -> SandboxTemplate {
    serde_json::from_value(json!({
        "apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxTemplate",
        "metadata": {"name": name},
        "spec": {"kind": "api", "command": "sandwarden echo-agent"}
    }))
    .expect("template")
}

fn sandbox(name: &str, template: &str) -> Sandbox {
    serde_json::from_value(json!({
        "apiVersion": "sandwarden.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": name},
        "spec": {"templateRef": {"name": template}}
    }))
    .expect("sandbox")
}

#[tokio::test]
async fn the_api_server_enforces_the_schemas_and_cel_rules() {
    let Some(client) = cluster().await else {
        return;
    };
    let s = Scratch::new(client).await;
    let templates: Api<SandboxTemplate> = s.api();
    templates
        .create(&PostParams::default(), &template("echo"))
        .await
        .expect("a valid template");
    let mut bad = template("bad-port");
    bad.spec.port = 80;
    let refused = templates.create(&PostParams::default(), &bad).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("port")),
        "a privileged port is refused by its CEL rule: {refused:?}"
    );

    let sandboxes: Api<Sandbox> = s.api();
    sandboxes
        .create(&PostParams::default(), &sandbox("one", "echo"))
        .await
        .expect("a sandbox");
    let moved = sandboxes
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"templateRef": {"name": "other"}}})),
        )
        .await;
    assert!(
        matches!(&moved, Err(kube::Error::Api(e)) if e.code == 422),
        "templateRef is immutable: {moved:?}"
    );

    // The scale subresource, as `kubectl scale` and an HPA use it.
    let pools: Api<SandboxWarmPool> = s.api();
    let pool: SandboxWarmPool = serde_json::from_value(json!({
        "apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxWarmPool",
        "metadata": {"name": "echo"},
        "spec": {"templateRef": {"name": "echo"}, "replicas": 0}
    }))
    .expect("pool");
    pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("a pool");
    pools
        .patch_scale(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("scale");
    assert_eq!(pools.get("echo").await.expect("pool").spec.replicas, 3);
}

#[tokio::test]
async fn the_controller_runs_sandboxes_and_keeps_a_pool_on_a_real_api_server() {
    let Some(client) = cluster().await else {
        return;
    };
    let s = Scratch::new(client.clone()).await;
    s.api::<SandboxTemplate>()
        .create(&PostParams::default(), &template("echo"))
        .await
        .expect("template");
    let stop = tokio_util::sync::CancellationToken::new();
    let (ns, leader) = (s.ns.clone(), stop.clone());
    let controllers = tokio::spawn(async move {
        sandwarden::controller::run(
            client,
            &ns,
            sandwarden::tokens::Tokens::new(b"cluster-suite".to_vec()),
            "cluster-suite",
            leader,
        )
        .await
    });
    let sandboxes: Api<Sandbox> = s.api();
    sandboxes
        .create(&PostParams::default(), &sandbox("one", "echo"))
        .await
        .expect("sandbox");
    let pods: Api<Pod> = s.api();
    wait("its Pod, owned by the Sandbox", || async {
        pods.get_opt("one").await.ok().flatten().is_some_and(|p| {
            p.owner_references()
                .iter()
                .any(|o| o.kind == "Sandbox" && o.name == "one")
        })
    })
    .await;
    let pod = pods.get("one").await.expect("pod");
    let spec = pod.spec.clone().expect("pod spec");
    assert_eq!(spec.automount_service_account_token, Some(false));
    let c = &spec.containers[0];
    assert_eq!(
        c.security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem),
        Some(true)
    );

    if std::env::var("SANDWARDEN_CLUSTER_IMAGES").as_deref() == Ok("1") {
        wait("the Sandbox Ready with an endpoint", || async {
            sandboxes.get("one").await.ok().is_some_and(|s| {
                s.status
                    .is_some_and(|st| st.phase.as_deref() == Some("Ready") && st.endpoint.is_some())
            })
        })
        .await;
        let pools: Api<SandboxWarmPool> = s.api();
        let pool: SandboxWarmPool = serde_json::from_value(json!({
            "apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxWarmPool",
            "metadata": {"name": "echo"},
            "spec": {"templateRef": {"name": "echo"}, "replicas": 2}
        }))
        .expect("pool");
        pools
            .create(&PostParams::default(), &pool)
            .await
            .expect("pool");
        wait("two ready pool members", || async {
            pools
                .get("echo")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|st| st.ready_replicas == 2)
        })
        .await;
    } else {
        eprintln!(
            "not waiting for Ready Pods: set SANDWARDEN_CLUSTER_IMAGES=1 once the harness images are loadable by the cluster"
        );
    }

    // Deleting the Sandbox takes its Pod and token Secret with it (garbage collection).
    sandboxes
        .delete("one", &DeleteParams::foreground())
        .await
        .expect("delete");
    wait("the Pod collected", || async {
        pods.get_opt("one").await.ok().flatten().is_none()
    })
    .await;
    stop.cancel();
    let _ = controllers.await;
}
