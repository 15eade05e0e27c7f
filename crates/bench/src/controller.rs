//! `sandwarden-bench controller`: what the controller and the claim cache cost with many
//! Sandboxes. A real `serve --runtime kubernetes` (leading, so running the controllers) against
//! the in-memory API server over HTTP, first with an empty namespace, then with N Sandboxes of a
//! template: the time until every one has its Pod, the time until every one is Ready once its
//! Pod is, and the server's resident memory at rest in each case (both watch caches hold every
//! Sandbox).

use crate::serve::{Serve, start_serve_args};
use sandwarden_testkit::fake_kube::FakeKube;
use serde_json::json;
use std::time::{Duration, Instant};

const NS: &str = "bench";
const SANDBOXES: &str = "apis/sandwarden.dev/v1alpha1/sandboxes";
const PODS: &str = "api/v1/pods";

async fn start(fake: &FakeKube) -> anyhow::Result<Serve> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(fake.clone().serve_http(listener));
    let kubeconfig = std::env::temp_dir().join(format!(
        "sandwarden-bench-kubeconfig-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&kubeconfig, FakeKube::kubeconfig(addr, NS))?;
    let serve = start_serve_args(
        |_| Ok(vec!["--runtime".into(), "kubernetes".into()]),
        &[
            (
                "KUBECONFIG".into(),
                kubeconfig.to_string_lossy().into_owned(),
            ),
            ("POD_NAME".into(), "bench".into()),
        ],
    );
    let _ = std::fs::remove_file(&kubeconfig); // read at start
    serve
}

/// Waits (bounded) until `check` holds; returns how long it took.
async fn until(what: &str, limit: Duration, check: impl Fn() -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !check() {
        anyhow::ensure!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(started.elapsed())
}

/// Resident memory once it has stopped moving (within 1% over a second).
async fn settled_rss(pid: u32) -> u64 {
    let mut last = sandwarden::procfs::rss_kib(pid);
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sandwarden::procfs::rss_kib(pid);
        if now.abs_diff(last) * 100 <= last {
            return now;
        }
        last = now;
    }
    last
}

fn seed(fake: &FakeKube, n: usize) {
    fake.put(
        "apis/sandwarden.dev/v1alpha1/sandboxtemplates",
        json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxTemplate",
               "metadata": {"name": "echo", "namespace": NS},
               "spec": {"kind": "api", "command": "sandwarden echo-agent"}}),
    );
    for i in 0..n {
        fake.put(
            SANDBOXES,
            json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "Sandbox",
                   "metadata": {"name": format!("sbx-{i:05}"), "namespace": NS,
                                "labels": {"sandwarden.dev/template": "echo"}},
                   "spec": {"templateRef": {"name": "echo"}}}),
        );
    }
}

pub async fn run(args: &crate::bench::BenchArgs) -> anyhow::Result<String> {
    let n = args.sandboxes;
    let limit = Duration::from_secs(600);

    let empty = FakeKube::new();
    seed(&empty, 0);
    let serve = start(&empty).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // elected, caches listed
    let rss_empty = settled_rss(serve.child.id()).await;
    drop(serve);

    let fake = FakeKube::new();
    seed(&fake, n);
    let serve = start(&fake).await?;
    let pods_made = until("a Pod for every Sandbox", limit, || {
        fake.list(PODS, NS).len() >= n
    })
    .await?;
    // The kubelet's part, all at once: every Pod running and ready.
    for (i, mut pod) in fake.list(PODS, NS).into_iter().enumerate() {
        pod["status"] = json!({"phase": "Running", "podIP": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
            "conditions": [{"type": "Ready", "status": "True"}]});
        fake.put(PODS, pod);
    }
    let all_ready = until("every Sandbox Ready", limit, || {
        fake.list(SANDBOXES, NS)
            .iter()
            .filter(|s| s["status"]["phase"] == "Ready")
            .count()
            >= n
    })
    .await?;
    let rss_full = settled_rss(serve.child.id()).await;
    let writes = fake.writes().len();
    drop(serve);

    let per = (rss_full.saturating_sub(rss_empty)) as f64 / n.max(1) as f64;
    let mut out = String::new();
    out.push_str(&format!(
        "Controller at scale: `sandwarden-bench controller --sandboxes {n}` ({}). One `serve --runtime kubernetes` (the Lease holder) against the in-memory API server over HTTP on loopback, no injected latency.\n\n",
        crate::bench::machine_line()
    ));
    out.push_str("| measure | value |\n|---|---|\n");
    out.push_str(&format!("| Sandboxes | {n} |\n"));
    out.push_str(&format!(
        "| start → a Pod (and token Secret) for every Sandbox | {:.1} s ({:.0} Sandboxes/s) |\n",
        pods_made.as_secs_f64(),
        n as f64 / pods_made.as_secs_f64().max(0.001)
    ));
    out.push_str(&format!(
        "| every Pod ready → every Sandbox Ready | {:.1} s |\n",
        all_ready.as_secs_f64()
    ));
    out.push_str(&format!(
        "| API writes in all (Secret, Pod, status per Sandbox) | {writes} ({:.1} per Sandbox) |\n",
        writes as f64 / n.max(1) as f64
    ));
    out.push_str(&format!(
        "| serve RSS, empty namespace | {:.1} MiB |\n",
        rss_empty as f64 / 1024.0
    ));
    out.push_str(&format!(
        "| serve RSS, {n} Sandboxes cached and reconciled | {:.1} MiB |\n",
        rss_full as f64 / 1024.0
    ));
    out.push_str(&format!("| per Sandbox | {per:.1} KiB |\n"));
    Ok(out)
}
