//! The Kubernetes runtime: sandboxes are `Sandbox` resources whose Pods the controller runs. A
//! claim hands a ready, unclaimed one of a `SandboxWarmPool` to a claimer with a single
//! compare-and-set write, chosen from a watch cache; with none left, a Sandbox is created for the
//! claimer (cold). The same watch reports claimed sandboxes that fail or vanish, so their
//! sessions are marked dead.
//!
//! It knows Sandboxes and who claimed them (an opaque claimer id); it must not know sessions.

use super::{Runtime, RuntimeError};
use crate::k8s::labels;

use crate::k8s::crd::{Sandbox, SandboxSpec, SandboxTemplate, TemplateRef};
use crate::k8s::member::{Member, claim_order, member};
use crate::template::Template;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The sandboxes this server is claiming right now. Claims from one server never race each other:
/// a claimer reserves a candidate here before its write, and others skip it. The write's
/// `resourceVersion` precondition still guards against other servers (replicas).
#[derive(Debug, Clone, Default)]
pub struct Reservations(Arc<Mutex<HashSet<String>>>);

impl Reservations {
    /// Reserves `name` unless another claimer holds it; released when the guard drops (also when
    /// a claim is abandoned midway).
    fn take(&self, name: &str) -> Option<Reserved<'_>> {
        let fresh = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        fresh.then(|| Reserved {
            book: self,
            name: name.to_string(),
        })
    }
}

struct Reserved<'a> {
    book: &'a Reservations,
    name: String,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.book
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// Candidates tried per claim: past that the caller's cache is stale and should be read again.
const TRIES: usize = 3;

/// A claim's result: the sandbox won (if any) and how many races were lost on the way.
#[derive(Debug)]
pub struct Claimed {
    pub sandbox: Option<Sandbox>,
    pub conflicts: u32,
}

/// The ready, unclaimed sandboxes of `template`, from the API (the server keeps this from its
/// watch cache; this is the uncached form).
pub async fn candidates(api: &Api<Sandbox>, template: &str) -> Result<Vec<Sandbox>, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("{}={template}", labels::TEMPLATE)))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|s| {
            let m = member(s);
            m.ready && !m.claimed && !m.deleting
        })
        .collect())
}

/// Claims one of `candidates` for `claimer`: tries up to three of them in an order drawn from
/// `seed` (random per claim), skipping those another claimer of this server has reserved, each
/// with one status patch carrying the `resourceVersion` it was seen at. A conflict means another
/// server won that one (or it changed), so another is tried; after three the caller reads its
/// cache again. One write per claim when servers do not collide.
pub async fn claim<S: Borrow<Sandbox>>(
    api: &Api<Sandbox>,
    candidates: &[S],
    claimer: &str,
    seed: usize,
    reservations: &Reservations,
) -> Result<Claimed, kube::Error> {
    let members: Vec<Member> = candidates.iter().map(|s| member(s.borrow())).collect();
    let mut conflicts = 0;
    let mut tried = 0;
    for name in claim_order(&members, seed) {
        if tried == TRIES {
            break;
        }
        let Some(seen) = candidates
            .iter()
            .map(Borrow::borrow)
            .find(|s: &&Sandbox| s.metadata.name.as_deref() == Some(name))
        else {
            continue;
        };
        let Some(reserved) = reservations.take(name) else {
            continue;
        };
        tried += 1;
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": seen.metadata.resource_version },
            "status": { "claimedBy": claimer, "claimedAt": Time(k8s_openapi::chrono::Utc::now()) },
        });
        let written = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        drop(reserved);
        match written {
            Ok(won) => {
                return Ok(Claimed {
                    sandbox: Some(won),
                    conflicts,
                });
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => conflicts += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(Claimed {
        sandbox: None,
        conflicts,
    })
}

/// The warm candidates of each template (ready, unclaimed, not being deleted), kept from the
/// Sandbox watch's events, so a claim reads its template's few candidates instead of scanning
/// every Sandbox of the namespace (most of them claimed, at one per live session).
#[derive(Debug)]
pub struct WarmIndex {
    /// Template → name → the Sandbox as last seen.
    warm: HashMap<String, BTreeMap<String, Arc<Sandbox>>>,
    /// While the watch lists again (after a restart, or a 410 Gone): the new list, which takes
    /// the old one's place when it is complete, as the watch cache's own store does.
    relisting: Option<HashMap<String, BTreeMap<String, Arc<Sandbox>>>>,
    /// True once the first complete list is in.
    listed: tokio::sync::watch::Sender<bool>,
}

impl Default for WarmIndex {
    fn default() -> Self {
        WarmIndex {
            warm: HashMap::new(),
            relisting: None,
            listed: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl WarmIndex {
    /// Takes in one watch event (after the watch cache has).
    pub fn observe(&mut self, event: &watcher::Event<Sandbox>) {
        match event {
            watcher::Event::Apply(s) => {
                let name = s.name_any();
                for sandboxes in self.warm.values_mut() {
                    sandboxes.remove(&name);
                }
                self.warm.retain(|_, sandboxes| !sandboxes.is_empty());
                if let Some(template) = warm_template(s) {
                    self.warm
                        .entry(template)
                        .or_default()
                        .insert(name, Arc::new(s.clone()));
                }
            }
            watcher::Event::Delete(s) => {
                let name = s.name_any();
                for sandboxes in self.warm.values_mut() {
                    sandboxes.remove(&name);
                }
                self.warm.retain(|_, sandboxes| !sandboxes.is_empty());
            }
            watcher::Event::Init => self.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(s) => {
                if let (Some(list), Some(template)) = (self.relisting.as_mut(), warm_template(s)) {
                    list.entry(template)
                        .or_default()
                        .insert(s.name_any(), Arc::new(s.clone()));
                }
            }
            watcher::Event::InitDone => {
                if let Some(list) = self.relisting.take() {
                    self.warm = list;
                }
                self.listed.send_replace(true);
            }
        }
    }

    /// The warm candidates of `template`.
    pub fn candidates(&self, template: &str) -> Vec<Arc<Sandbox>> {
        self.warm
            .get(template)
            .map(|sandboxes| sandboxes.values().cloned().collect())
            .unwrap_or_default()
    }

    /// How many warm candidates it holds, over every template.
    pub fn len(&self) -> usize {
        self.warm.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Says when the first complete list is in.
    pub fn listed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.listed.subscribe()
    }
}

/// The template a Sandbox is a warm candidate of, if it is one.
fn warm_template(s: &Sandbox) -> Option<String> {
    let m = member(s);
    if !m.ready || m.claimed || m.deleting {
        return None;
    }
    s.labels().get(labels::TEMPLATE).cloned()
}

/// How long a cold sandbox may take to become Ready (image pulls included).
const COLD_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// A claimed sandbox no session records, claimed longer ago than this, is an orphan (a claim in
/// flight is recorded within seconds).
const ORPHAN_AFTER: Duration = Duration::from_secs(120);

/// A Sandbox name from a sandbox id (`sbx_<hex>` → `sbx-<hex>`: DNS-1123).
pub fn resource_name(id: &str) -> String {
    id.to_ascii_lowercase().replace('_', "-")
}

fn sandbox_of(s: &Sandbox, template: &str) -> Option<super::Sandbox> {
    let status = s.status.as_ref()?;
    Some(super::Sandbox {
        id: s.name_any(),
        template: template.to_string(),
        endpoint: status.endpoint.clone()?,
        pid: None,
    })
}

/// Sandboxes in one namespace, through a watch cache.
pub struct KubernetesRuntime {
    api: Api<Sandbox>,
    namespace: String,
    cache: Store<Sandbox>,
    warm: Arc<Mutex<WarmIndex>>,
    reservations: Reservations,
}

impl KubernetesRuntime {
    /// Starts the Sandbox watch. Claimed sandboxes that fail or vanish are sent on `exits`.
    pub fn start(
        client: kube::Client,
        namespace: &str,
        exits: mpsc::UnboundedSender<String>,
        stop: CancellationToken,
    ) -> Self {
        let api: Api<Sandbox> = Api::namespaced(client, namespace);
        let claimed = |s: &Sandbox| s.status.as_ref().is_some_and(|st| st.claimed_by.is_some());
        let warm = Arc::new(Mutex::new(WarmIndex::default()));
        let index = warm.clone();
        let cache = cached_watch(api.clone(), "Sandboxes", stop, move |_, event| {
            index
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(&event);
            match event {
                watcher::Event::Apply(s) => {
                    let failed =
                        s.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Failed");
                    if claimed(&s) && (failed || s.metadata.deletion_timestamp.is_some()) {
                        let _ = exits.send(s.name_any());
                    }
                }
                watcher::Event::Delete(s) if claimed(&s) => {
                    let _ = exits.send(s.name_any());
                }
                _ => {}
            }
        });
        KubernetesRuntime {
            api,
            namespace: namespace.to_string(),
            cache,
            warm,
            reservations: Reservations::default(),
        }
    }

    /// Waits (bounded) for the first list of the watch, in the cache and the warm index.
    async fn cache_ready(&self) -> bool {
        let mut listed = self.warm_index().listed();
        tokio::time::timeout(Duration::from_secs(10), listed.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn warm_index(&self) -> std::sync::MutexGuard<'_, WarmIndex> {
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One Sandbox from the watch cache, by key (the supervisor asks for every session's).
    fn cached(&self, name: &str) -> Option<Arc<Sandbox>> {
        self.cache
            .get(&ObjectRef::new(name).within(&self.namespace))
    }
}

/// The SandboxTemplates of `namespace`, as the API's templates, kept current by a watch that
/// calls `update` with the whole set after every change.
pub fn watch_templates(
    client: kube::Client,
    namespace: &str,
    update: impl Fn(BTreeMap<String, Template>) + Send + 'static,
    stop: CancellationToken,
) {
    let api: Api<SandboxTemplate> = Api::namespaced(client, namespace);
    cached_watch(api, "SandboxTemplates", stop, move |cache, event| {
        // The cache holds a full list only once it is done (InitDone), and after each change.
        if let watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_) =
            event
        {
            update(
                cache
                    .state()
                    .iter()
                    .map(|t| (t.name_any(), t.to_template()))
                    .collect(),
            );
        }
    });
}

/// A watch cache of `api`'s objects, fed until `stop`; `on_event` sees each event after the
/// cache has taken it in. Failures are retried with backoff (and logged as about `what`).
fn cached_watch<K>(
    api: Api<K>,
    what: &'static str,
    stop: CancellationToken,
    mut on_event: impl FnMut(&Store<K>, watcher::Event<K>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (cache, writer) = reflector::store();
    let events =
        reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
    let reader = cache.clone();
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = events.next() => next,
            };
            match next {
                Some(Ok(event)) => on_event(&reader, event),
                Some(Err(e)) => tracing::warn!(error = %e, "watching {what} failed; retrying"),
                None => return,
            }
        }
    });
    cache
}

#[async_trait::async_trait]
impl Runtime for KubernetesRuntime {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn isolation(&self) -> &'static str {
        "pod"
    }

    fn shared(&self) -> bool {
        true
    }

    async fn claim(&self, template: &Template, claimer: &str) -> Option<super::Sandbox> {
        if !self.cache_ready().await {
            return None;
        }
        let candidates = self.warm_index().candidates(&template.name);
        if candidates.is_empty() {
            return None;
        }
        match claim(
            &self.api,
            &candidates,
            claimer,
            rand::random_range(0..usize::MAX),
            &self.reservations,
        )
        .await
        {
            Ok(Claimed {
                sandbox: Some(won), ..
            }) => {
                // Out of the index now, not when the watch shows the claim: this server's next
                // claim would only lose a conflict on it.
                self.warm_index()
                    .observe(&watcher::Event::Apply(won.clone()));
                sandbox_of(&won, &template.name)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, template = %template.name, "claiming a warm sandbox failed; starting one");
                None
            }
        }
    }

    async fn create(&self, id: &str, template: &Template) -> Result<super::Sandbox, RuntimeError> {
        let name = resource_name(id);
        let mut labels = BTreeMap::new();
        labels.insert(labels::TEMPLATE.to_string(), template.name.clone());
        labels.insert(labels::MANAGED_BY.to_string(), "sandwarden".to_string());
        let sandbox = Sandbox {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: SandboxSpec {
                template_ref: TemplateRef {
                    name: template.name.clone(),
                },
                env: Default::default(),
                shutdown_time: None,
            },
            status: None,
        };
        let start = |e: kube::Error| RuntimeError::Start(format!("creating Sandbox {name}: {e}"));
        self.api
            .create(&PostParams::default(), &sandbox)
            .await
            .map_err(start)?;
        // Claimed from birth: a failure ends its session instead of a silent recreation.
        let patch = serde_json::json!({
            "status": { "claimedBy": name, "claimedAt": Time(k8s_openapi::chrono::Utc::now()) },
        });
        self.api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(start)?;
        let ready =
            kube::runtime::wait::await_condition(self.api.clone(), &name, |s: Option<&Sandbox>| {
                s.and_then(|s| s.status.as_ref())
                    .and_then(|st| st.phase.as_deref())
                    .is_some_and(|p| p == "Ready" || p == "Failed")
            });
        let seen = tokio::time::timeout(COLD_READY_TIMEOUT, ready)
            .await
            .map_err(|_| RuntimeError::StartTimeout(COLD_READY_TIMEOUT.as_secs()))?
            .map_err(|e| RuntimeError::Start(format!("watching Sandbox {name}: {e}")))?;
        let Some(seen) = seen else {
            return Err(RuntimeError::Start(format!(
                "Sandbox {name} was deleted while starting"
            )));
        };
        let status = seen.status.clone().unwrap_or_default();
        if status.phase.as_deref() == Some("Failed") {
            let why = status
                .conditions
                .first()
                .map(|c| c.message.clone())
                .unwrap_or_default();
            return Err(RuntimeError::Start(format!("Sandbox {name} failed: {why}")));
        }
        sandbox_of(&seen, &template.name).ok_or_else(|| {
            RuntimeError::Start(format!("Sandbox {name} is Ready without an endpoint"))
        })
    }

    async fn destroy(&self, sandbox: &super::Sandbox) {
        let name = resource_name(&sandbox.id);
        match self.api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(error = %e, sandbox = %name, "deleting the Sandbox failed"),
        }
    }

    async fn alive(&self, sandbox: &super::Sandbox) -> bool {
        if !self.cache_ready().await {
            return true; // cannot tell yet; the watch reports deaths when it can
        }
        self.cached(&resource_name(&sandbox.id)).is_some_and(|s| {
            s.metadata.deletion_timestamp.is_none()
                && s.status.as_ref().and_then(|st| st.phase.as_deref()) != Some("Failed")
        })
    }

    async fn owned(&self) -> Vec<String> {
        if !self.cache_ready().await {
            return Vec::new();
        }
        let now = k8s_openapi::chrono::Utc::now();
        self.cache
            .state()
            .iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.claimed_at.as_ref())
                    .is_some_and(|Time(at)| {
                        (now - *at).to_std().is_ok_and(|age| age > ORPHAN_AFTER)
                    })
            })
            .map(|s| s.name_any())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::SandboxStatus;

    fn sandbox(name: &str, template: &str, phase: &str, claimed: bool) -> Sandbox {
        let mut s = Sandbox::new(
            name,
            SandboxSpec {
                template_ref: TemplateRef {
                    name: template.into(),
                },
                env: Default::default(),
                shutdown_time: None,
            },
        );
        s.metadata.labels = Some(BTreeMap::from([(
            labels::TEMPLATE.to_string(),
            template.to_string(),
        )]));
        s.status = Some(SandboxStatus {
            phase: Some(phase.into()),
            claimed_by: claimed.then(|| "ses_1".to_string()),
            ..Default::default()
        });
        s
    }

    fn names(index: &WarmIndex, template: &str) -> Vec<String> {
        index
            .candidates(template)
            .iter()
            .map(|s| s.name_any())
            .collect()
    }

    #[test]
    fn the_warm_index_holds_ready_unclaimed_sandboxes_by_template() {
        let mut index = WarmIndex::default();
        let apply = |index: &mut WarmIndex, s: Sandbox| index.observe(&watcher::Event::Apply(s));
        apply(&mut index, sandbox("a", "echo", "Pending", false));
        assert!(index.is_empty(), "not ready yet");
        apply(&mut index, sandbox("a", "echo", "Ready", false));
        apply(&mut index, sandbox("b", "echo", "Ready", false));
        apply(&mut index, sandbox("c", "other", "Ready", false));
        assert_eq!(names(&index, "echo"), ["a", "b"]);
        assert_eq!(names(&index, "other"), ["c"]);
        apply(&mut index, sandbox("a", "echo", "Ready", true));
        assert_eq!(names(&index, "echo"), ["b"], "claimed");
        let mut going = sandbox("b", "echo", "Ready", false);
        going.metadata.deletion_timestamp = Some(Time(k8s_openapi::chrono::Utc::now()));
        apply(&mut index, going);
        assert!(names(&index, "echo").is_empty(), "being deleted");
        index.observe(&watcher::Event::Delete(sandbox(
            "c", "other", "Ready", false,
        )));
        assert!(index.is_empty());
        assert!(index.candidates("nope").is_empty());
    }

    #[test]
    fn a_relist_replaces_the_warm_index_when_it_is_complete() {
        let mut index = WarmIndex::default();
        let listed = index.listed();
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(sandbox(
            "a", "echo", "Ready", false,
        )));
        assert!(!*listed.borrow(), "not listed before InitDone");
        index.observe(&watcher::Event::InitDone);
        assert!(*listed.borrow());
        assert_eq!(names(&index, "echo"), ["a"]);
        // The watch lists again (say after a 410): "a" was claimed and "b" came meanwhile. Until
        // the list is complete, claims still see the old candidates.
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(sandbox(
            "a", "echo", "Ready", true,
        )));
        index.observe(&watcher::Event::InitApply(sandbox(
            "b", "echo", "Ready", false,
        )));
        assert_eq!(names(&index, "echo"), ["a"]);
        index.observe(&watcher::Event::InitDone);
        assert_eq!(names(&index, "echo"), ["b"]);
    }
}
