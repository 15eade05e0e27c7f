//! `sandwarden serve --runtime kubernetes` end to end, with no cluster: the in-memory API server
//! (`sandwarden::fake_kube`) served over HTTP to a real `serve` process through a kubeconfig, and
//! a stand-in kubelet in this test that runs each Pod's harness command line as a real process on
//! its own loopback address (127.0.0.N, the Pod IP) with the Pod's env and token Secret. What is
//! real: `serve`, its controller (elected through the Lease), the claim path, the harness and
//! echo agent processes and every HTTP call between them.

mod common;

use common::{ADMIN_KEY, Api, spawn_listening, terminate};
use sandwarden::fake_kube::FakeKube;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NS: &str = "agents";
const PODS: &str = "api/v1/pods";
const SANDBOXES: &str = "apis/sandwarden.dev/v1alpha1/sandboxes";
const POOLS: &str = "apis/sandwarden.dev/v1alpha1/sandboxwarmpools";
const TEMPLATES: &str = "apis/sandwarden.dev/v1alpha1/sandboxtemplates";

/// Runs Pods as local processes: starts each new Pod's harness on its own loopback address and
/// marks it Running and ready; marks it Failed when the process dies; stops processes whose Pod
/// is gone.
struct Kubelet {
    running: Arc<Mutex<HashMap<String, Child>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn env_of(fake: &FakeKube, container: &Value, workdir: &std::path::Path) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or_default().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            let secret = fake.object("api/v1/secrets", NS, r["name"].as_str().unwrap_or_default());
            match secret {
                Some(s) => s["stringData"][r["key"].as_str().unwrap_or_default()]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                None => continue, // optional secrets that do not exist
            }
        } else {
            continue;
        };
        env.push((name, value));
    }
    for (k, v) in env.iter_mut() {
        if k == "HOME" {
            *v = workdir.to_string_lossy().into_owned();
        }
    }
    env
}

impl Kubelet {
    fn start(fake: &FakeKube, scratch: &std::path::Path) -> Kubelet {
        let running: Arc<Mutex<HashMap<String, Child>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (fake, scratch) = (fake.clone(), scratch.to_path_buf());
        let (procs, stopping) = (running.clone(), stop.clone());
        let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_sandwarden"))
            .parent()
            .expect("bin dir")
            .to_path_buf();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let thread = std::thread::spawn(move || {
            let mut next_ip = 2u32;
            while !stopping.load(Ordering::SeqCst) {
                let pods = fake.list(PODS, NS);
                let mut procs_now = procs.lock().expect("kubelet lock");
                // Pods gone: their processes go too.
                let names: Vec<String> = pods
                    .iter()
                    .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
                    .collect();
                let gone: Vec<String> = procs_now
                    .keys()
                    .filter(|k| !names.contains(k))
                    .cloned()
                    .collect();
                for name in gone {
                    if let Some(mut child) = procs_now.remove(&name) {
                        terminate(&mut child);
                    }
                }
                for mut pod in pods {
                    let name = pod["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    if pod["status"]["phase"].is_null() {
                        let ip = format!("127.0.{}.{}", next_ip / 250, next_ip % 250 + 1);
                        next_ip += 1;
                        let container = pod["spec"]["containers"][0].clone();
                        let workdir = scratch.join(&name);
                        std::fs::create_dir_all(&workdir).expect("workdir");
                        let args: Vec<String> = container["args"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|a| a.as_str())
                            .map(|a| {
                                if let Some(port) = a.strip_prefix("0.0.0.0:") {
                                    format!("{ip}:{port}")
                                } else if a == "/work" {
                                    workdir.to_string_lossy().into_owned()
                                } else {
                                    a.to_string()
                                }
                            })
                            .collect();
                        let (child, _addr) = spawn_listening(
                            Command::new(env!("CARGO_BIN_EXE_sandwarden"))
                                .args(&args)
                                .env_clear()
                                .env("PATH", &path)
                                .envs(env_of(&fake, &container, &workdir)),
                            "a Pod's harness",
                        );
                        procs_now.insert(name, child);
                        pod["status"] = json!({"phase": "Running", "podIP": ip,
                            "conditions": [{"type": "Ready", "status": "True"}]});
                        fake.put(PODS, pod);
                    } else if pod["status"]["phase"] == "Running"
                        && let Some(child) = procs_now.get_mut(&name)
                        && let Ok(Some(exit)) = child.try_wait()
                    {
                        pod["status"] = json!({"phase": "Failed", "containerStatuses": [{
                            "name": "harness", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                            "state": {"terminated": {"exitCode": exit.code().unwrap_or(137), "reason": "Error"}}}]});
                        fake.put(PODS, pod);
                    }
                }
                drop(procs_now);
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        Kubelet {
            running,
            stop,
            thread: Some(thread),
        }
    }

    /// The process id of a Pod's harness.
    fn pid(&self, pod: &str) -> Option<i32> {
        self.running
            .lock()
            .expect("kubelet lock")
            .get(pod)
            .map(|c| c.id() as i32)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for (_, mut child) in self.running.lock().expect("kubelet lock").drain() {
            terminate(&mut child);
        }
    }
}

/// Waits (bounded) until `check` holds, saying what was last seen when it does not.
async fn until(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match check() {
            Ok(()) => return,
            Err(seen) if Instant::now() > deadline => panic!("{what}: {seen}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

struct Cluster {
    fake: FakeKube,
    kubeconfig: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn cluster(port: u16) -> Cluster {
    let fake = FakeKube::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(fake.clone().serve_http(listener));
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, FakeKube::kubeconfig(addr, NS)).expect("kubeconfig");
    fake.put(
        TEMPLATES,
        json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxTemplate",
               "metadata": {"name": "echo", "namespace": NS},
               "spec": {"kind": "api", "command": "sandwarden echo-agent", "port": port}}),
    );
    Cluster {
        fake,
        kubeconfig,
        _dir: dir,
    }
}

/// A `serve` process, stopped when dropped (also when a test fails).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

fn serve(c: &Cluster, data: &std::path::Path, identity: &str) -> (Server, Api) {
    let (child, addr) = spawn_listening(
        Command::new(env!("CARGO_BIN_EXE_sandwarden"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--runtime",
                "kubernetes",
            ])
            .arg("--data-dir")
            .arg(data)
            .env("KUBECONFIG", &c.kubeconfig)
            .env("POD_NAME", identity)
            .env("SANDWARDEN_API_KEY", ADMIN_KEY)
            .env("SANDWARDEN_LOG", "warn"),
        "sandwarden serve --runtime kubernetes",
    );
    let api = Api {
        base: format!("http://{addr}"),
        key: ADMIN_KEY.to_string(),
        http: reqwest::Client::new(),
    };
    (Server(child), api)
}

fn pool_ready(fake: &FakeKube, n: i64) -> Result<(), String> {
    let status = fake
        .object(POOLS, NS, "echo")
        .map(|p| p["status"].clone())
        .unwrap_or_default();
    (status["readyReplicas"].as_i64() == Some(n))
        .then_some(())
        .ok_or(status.to_string())
}

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
    common::signal(pid, nix::sys::signal::Signal::SIGKILL);
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
