//! A Kubernetes cluster without a cluster, for tests of `serve --runtime kubernetes`: the
//! in-memory API server (`sandwarden::fake_kube`) served over HTTP through a kubeconfig, and a
//! stand-in kubelet that runs each Pod's harness command line as a real process on its own
//! loopback address (127.0.0.N, the Pod IP) with the Pod's env and token Secret.

use super::{ADMIN_KEY, Api, spawn_listening, terminate};
use sandwarden_testkit::fake_kube::FakeKube;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NS: &str = "agents";
pub const PODS: &str = "api/v1/pods";
pub const SANDBOXES: &str = "apis/sandwarden.dev/v1alpha1/sandboxes";
pub const POOLS: &str = "apis/sandwarden.dev/v1alpha1/sandboxwarmpools";
pub const TEMPLATES: &str = "apis/sandwarden.dev/v1alpha1/sandboxtemplates";

/// Runs Pods as local processes: starts each new Pod's harness on its own loopback address and
/// marks it Running and ready; marks it Failed when the process dies; stops processes whose Pod
/// is gone.
pub struct Kubelet {
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
    pub fn start(fake: &FakeKube, scratch: &std::path::Path) -> Kubelet {
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
                        // The images' entrypoint, given the Pod's args.
                        let (child, _addr) = spawn_listening(
                            Command::new(super::harness_exe())
                                .args(&args)
                                .env_clear()
                                .env("PATH", &path)
                                .envs(env_of(&fake, &container, &workdir)),
                            "a Pod's harness",
                        );
                        // A Pod recreated under the same name between two polls: its old
                        // process goes, or it would outlive the test unseen.
                        if let Some(mut old) = procs_now.insert(name, child) {
                            terminate(&mut old);
                        }
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
    pub fn pid(&self, pod: &str) -> Option<i32> {
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
pub async fn until(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match check() {
            Ok(()) => return,
            Err(seen) if Instant::now() > deadline => panic!("{what}: {seen}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

pub struct Cluster {
    pub fake: FakeKube,
    pub kubeconfig: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

pub async fn cluster(port: u16) -> Cluster {
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
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

pub fn serve(c: &Cluster, data: &std::path::Path, identity: &str) -> (Server, Api) {
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
            // As `Serve`: the load scenarios send hundreds of requests a second with one key.
            .env("SANDWARDEN_KEY_REQUEST_RATE", "0")
            .env(
                "SANDWARDEN_LOG",
                std::env::var("SANDWARDEN_TEST_SERVE_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        "sandwarden serve --runtime kubernetes",
    );
    let api = Api {
        base: format!("http://{addr}"),
        key: ADMIN_KEY.to_string(),
        http: reqwest::Client::new(),
    };
    (Server(child), api)
}

pub fn pool_ready(fake: &FakeKube, n: i64) -> Result<(), String> {
    let status = fake
        .object(POOLS, NS, "echo")
        .map(|p| p["status"].clone())
        .unwrap_or_default();
    (status["readyReplicas"].as_i64() == Some(n))
        .then_some(())
        .ok_or(status.to_string())
}

/// One `serve --runtime kubernetes` on a fresh fake cluster, with the stand-in kubelet running
/// its Pods and, when `pool` > 0, an echo SandboxWarmPool of that size filled and ready.
pub struct Kube {
    pub server: Server,
    pub api: Arc<Api>,
    pub kubelet: Kubelet,
    pub cluster: Cluster,
    pub scratch: tempfile::TempDir,
    pub data: tempfile::TempDir,
}

impl Kube {
    pub async fn start(pool: i64) -> Kube {
        let port = 20_000 + rand::random_range(0..20_000u16);
        let cluster = cluster(port).await;
        let scratch = tempfile::tempdir().expect("scratch");
        let kubelet = Kubelet::start(&cluster.fake, scratch.path());
        let data = tempfile::tempdir().expect("data");
        let (server, api) = serve(&cluster, data.path(), "replica-a");
        if pool > 0 {
            cluster.fake.put(
                POOLS,
                json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxWarmPool",
                       "metadata": {"name": "echo", "namespace": NS},
                       "spec": {"templateRef": {"name": "echo"}, "replicas": pool}}),
            );
            until("the elected controller fills the pool", || {
                pool_ready(&cluster.fake, pool)
            })
            .await;
        }
        Kube {
            server,
            api: Arc::new(api),
            kubelet,
            cluster,
            scratch,
            data,
        }
    }

    /// SIGKILLs `serve` (a crash) and starts it again on the same data dir, cluster and identity.
    pub fn crash_and_restart(&mut self) {
        let _ = self.server.0.kill();
        let _ = self.server.0.wait();
        let (server, api) = serve(&self.cluster, self.data.path(), "replica-a");
        self.server = server;
        self.api = Arc::new(api);
    }

    /// Whether the harness process of Pod `name` (a Sandbox's Pod has its name) runs.
    pub fn runs(&self, name: &str) -> bool {
        self.kubelet.pid(name).is_some_and(super::alive)
    }

    /// The Sandboxes that are claimed, by name, with their `claimedBy`.
    pub fn claimed(&self) -> BTreeMap<String, String> {
        self.cluster
            .fake
            .list(SANDBOXES, NS)
            .into_iter()
            .filter_map(|s| {
                let by = s["status"]["claimedBy"].as_str()?.to_string();
                Some((s["metadata"]["name"].as_str()?.to_string(), by))
            })
            .collect()
    }

    /// Every session's Sandbox is accounted for: each one in `sandboxes` (session → Sandbox) is
    /// claimed, no two sessions share one, and no claimed Sandbox lacks a session.
    pub fn assert_accounted_for(&self, sandboxes: &BTreeMap<String, String>) {
        let claimed = self.claimed();
        let ours: BTreeSet<&String> = sandboxes.values().collect();
        assert_eq!(
            ours.len(),
            sandboxes.len(),
            "a Sandbox claimed twice: {sandboxes:?}"
        );
        for (session, sandbox) in sandboxes {
            assert!(
                claimed.contains_key(sandbox),
                "{session}'s Sandbox {sandbox} is claimed: {claimed:?}"
            );
        }
        let stray: Vec<&String> = claimed.keys().filter(|n| !ours.contains(n)).collect();
        assert!(
            stray.is_empty(),
            "claimed Sandboxes without a session: {stray:?}"
        );
    }

    /// After every session was deleted: none of their Sandboxes or Pods is left, nothing is
    /// claimed, at most the `pool` warm Sandboxes, Pods and harness processes remain.
    pub async fn assert_nothing_leaked(&self, sandboxes: &BTreeMap<String, String>, pool: usize) {
        let ours: BTreeSet<&String> = sandboxes.values().collect();
        until("no Sandbox, Pod or harness process outlives its session", || {
            let name = |o: &Value| o["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let all = self.cluster.fake.list(SANDBOXES, NS);
            let pods = self.cluster.fake.list(PODS, NS);
            let left: Vec<String> = all
                .iter()
                .chain(pods.iter())
                .map(name)
                .filter(|n| ours.contains(n))
                .collect();
            let claimed = self.claimed();
            let procs = super::load::harness_pids(self.scratch.path()).len();
            if left.is_empty()
                && claimed.is_empty()
                && all.len() <= pool
                && pods.len() <= pool
                && procs <= pool
            {
                Ok(())
            } else {
                Err(format!(
                    "left {left:?}, claimed {claimed:?}, {} Sandboxes, {} Pods, {procs} harness processes (pool {pool})",
                    all.len(),
                    pods.len()
                ))
            }
        })
        .await;
    }
}
