//! An in-memory Kubernetes API server for tests and benchmarks: enough of the REST API for the
//! controller and the claim path (get, list with label and field selectors, watch with a bounded history
//! and `410 Gone` past it, create, replace, merge and server-side-apply patches with
//! `resourceVersion` preconditions, status subresources, delete with owner-reference cascade),
//! served to a real `kube::Client` through a tower service or over HTTP on loopback, with optional
//! injected latency and a log of every write. No cluster exists on these machines; this stands in
//! for one.
//!
//! It keeps objects as JSON and knows no schemas: it checks what the controller relies on
//! (existence, conflicts, preconditions), not validation.

use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Key = (String, String, String); // (collection path without namespace, namespace, name)

/// Changes kept for watches to resume from; older resource versions get `410 Gone`.
const HISTORY: usize = 100_000;

/// One change, as a watch reports it.
#[derive(Clone)]
struct Change {
    rv: u64,
    key: Key,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    /// The uids of `objects`, for the garbage collector's owner check.
    uids: std::collections::HashSet<String>,
    resource_version: u64,
    writes: Vec<String>,
    history: std::collections::VecDeque<Change>,
    /// Resource versions at or below this are compacted away.
    compacted: u64,
}

/// The fake API server; clones share one state.
#[derive(Clone)]
pub struct FakeKube {
    state: Arc<Mutex<State>>,
    latency: Duration,
    /// Wakes watches when something changed.
    changed: Arc<tokio::sync::Notify>,
    /// Bumped to end every open watch (as an API server restart or a load balancer would).
    generation: Arc<tokio::sync::watch::Sender<u64>>,
    /// Lists held back by tests (`hold_lists`).
    holds: Arc<Mutex<Vec<ListHold>>>,
}

/// Lists of one collection, with or without a label selector, held back until released: lets a
/// test choose which of a controller's caches fills first. Watches are never held.
#[derive(Clone)]
pub struct ListHold {
    collection: String,
    labelled: bool,
    released: Arc<tokio::sync::watch::Sender<bool>>,
    /// Lists waiting on this hold so far.
    parked: Arc<tokio::sync::watch::Sender<usize>>,
}

impl ListHold {
    /// Waits until a list is being held.
    pub async fn parked(&self) {
        let mut rx = self.parked.subscribe();
        let _ = rx.wait_for(|n| *n > 0).await;
    }

    /// Lets every held list, and every later one, through.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    async fn pass(&self) {
        let mut rx = self.released.subscribe();
        if *rx.borrow() {
            return;
        }
        self.parked.send_modify(|n| *n += 1);
        let _ = rx.wait_for(|released| *released).await;
    }
}

impl Default for FakeKube {
    fn default() -> Self {
        FakeKube {
            state: Arc::default(),
            latency: Duration::ZERO,
            changed: Arc::default(),
            generation: Arc::new(tokio::sync::watch::channel(0).0),
            holds: Arc::default(),
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    respond(code, &body)
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// A 409 when `body` names a `resourceVersion` other than the stored object's (optimistic
/// concurrency, as the real API server does for updates and patches).
fn stale(name: &str, current: &Value, body: &Value) -> Option<Response<Body>> {
    let rv = body["metadata"]["resourceVersion"].as_str()?;
    (current["metadata"]["resourceVersion"].as_str() != Some(rv)).then(|| {
        status(
            StatusCode::CONFLICT,
            "Conflict",
            format!("{name}: the object has been modified since resourceVersion {rv}"),
        )
    })
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// A parsed request path.
struct Target {
    collection: String,
    namespace: String,
    name: Option<String>,
    status: bool,
}

/// `/api/v1/namespaces/NS/PLURAL[/NAME[/status]]` or `/apis/G/V/namespaces/NS/PLURAL[/…]`.
fn parse(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *parts.first()? {
        "api" => (parts.get(..2)?.join("/"), parts.get(2..)?),
        "apis" => (parts.get(..3)?.join("/"), parts.get(3..)?),
        _ => return None,
    };
    if rest.first()? != &"namespaces" {
        return None;
    }
    let namespace = rest.get(1)?.to_string();
    let plural = rest.get(2)?;
    Some(Target {
        collection: format!("{prefix}/{plural}"),
        namespace,
        name: rest.get(3).map(|s| s.to_string()),
        status: rest.get(4) == Some(&"status"),
    })
}

fn selector_matches(obj: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k.trim_end_matches('=')].as_str() == Some(v),
        None => obj["metadata"]["labels"].get(term).is_some(),
    })
}

/// A field selector (`metadata.name=a`, `metadata.name!=a`, comma-separated terms): each term
/// compares the string at that dotted path of the object. `kube::runtime::wait::await_condition`
/// watches one object by `metadata.name`; without this every object's events would reach it.
fn fields_match(obj: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (path, want, equal) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once("==") {
            (p, v, true)
        } else if let Some((p, v)) = term.split_once('=') {
            (p, v, true)
        } else {
            return false;
        };
        let value = path.split('.').fold(obj, |o, k| &o[k]);
        (value.as_str().unwrap_or_default() == want) == equal
    })
}

/// The label and field selectors of a list or watch.
#[derive(Clone, Default)]
struct Selectors {
    labels: Option<String>,
    fields: Option<String>,
}

impl Selectors {
    fn of(query: &str) -> Selectors {
        Selectors {
            labels: query_param(query, "labelSelector"),
            fields: query_param(query, "fieldSelector"),
        }
    }

    fn matches(&self, obj: &Value) -> bool {
        selector_matches(obj, self.labels.as_deref()) && fields_match(obj, self.fields.as_deref())
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            url::form_urlencoded::parse(format!("v={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
    })
}

impl FakeKube {
    pub fn new() -> FakeKube {
        FakeKube::default()
    }

    /// Every request waits this long first (a remote API server's round trip).
    pub fn with_latency(mut self, latency: Duration) -> FakeKube {
        self.latency = latency;
        self
    }

    /// Holds back every list (not watch) of `collection`, with a label selector (`labelled`) or
    /// without, until the returned hold is released.
    pub fn hold_lists(&self, collection: &str, labelled: bool) -> ListHold {
        let hold = ListHold {
            collection: collection.to_string(),
            labelled,
            released: Arc::new(tokio::sync::watch::channel(false).0),
            parked: Arc::new(tokio::sync::watch::channel(0).0),
        };
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hold.clone());
        hold
    }

    /// A `kube::Client` talking to this fake.
    pub fn client(&self) -> kube::Client {
        let me = self.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let me = me.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// The writes made so far, as `METHOD path` lines.
    pub fn writes(&self) -> Vec<String> {
        lock(&self.state).writes.clone()
    }

    /// An object by collection path (e.g. `api/v1/pods`), namespace and name.
    pub fn object(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.state)
            .objects
            .get(&(collection.into(), namespace.into(), name.into()))
            .cloned()
    }

    /// Puts an object as if another client had (status included), bypassing the API. A new
    /// object gets a uid, like one the API made.
    pub fn put(&self, collection: &str, mut object: Value) {
        let ns = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let key = (collection.to_string(), ns, name);
        let mut s = lock(&self.state);
        if object["metadata"]["uid"].is_null() {
            let uid = match s.objects.get(&key) {
                Some(prev) => prev["metadata"]["uid"].clone(),
                None => json!(format!("uid-put-{}", s.resource_version + 1)),
            };
            object["metadata"]["uid"] = uid;
        }
        s.set(key, object);
        drop(s);
        self.changed.notify_waiters();
    }

    /// Deletes an object as if another client had (its dependents go too).
    pub fn remove(&self, collection: &str, namespace: &str, name: &str) {
        lock(&self.state).delete(&(collection.into(), namespace.into(), name.into()));
        self.changed.notify_waiters();
    }

    /// Objects of a collection in a namespace.
    pub fn list(&self, collection: &str, namespace: &str) -> Vec<Value> {
        lock(&self.state)
            .objects
            .iter()
            .filter(|((c, ns, _), _)| c == collection && ns == namespace)
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Forgets the change history, as etcd compaction does after other writes: every watch
    /// resuming from a resource version it holds gets `410 Gone` and must list again.
    pub fn compact(&self) {
        {
            let mut s = lock(&self.state);
            s.history.clear();
            s.resource_version += 1; // an unrelated write, past every version a client holds
            s.compacted = s.resource_version;
        }
        // Open watches behind the compaction find out now, as they would at their next event.
        self.changed.notify_waiters();
    }

    /// Ends every open watch; clients reconnect from their last resource version.
    pub fn drop_watches(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Serves the fake over HTTP on `listener` (for a separate process, e.g. `serve` with a
    /// kubeconfig pointing here) until the task is dropped.
    pub async fn serve_http(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let me = self.clone();
            async move { me.handle(req).await }
        });
        axum::serve(listener, app).await
    }

    /// A kubeconfig (YAML) for a client of `serve_http` at `addr`, namespace `namespace`.
    pub fn kubeconfig(addr: std::net::SocketAddr, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        )
    }

    /// A watch: the changes after `since` that match, then new ones as they happen, until the
    /// client goes, `timeout` passes or `drop_watches` is called. `410 Gone` if `since` is
    /// older than the history.
    fn watch(
        &self,
        target: &Target,
        since: u64,
        selectors: Selectors,
        timeout: Duration,
    ) -> Response<Body> {
        let expired = |seen: u64| {
            json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {seen}"), "reason": "Expired", "code": 410,
            }})
        };
        let gone = lock(&self.state).compacted > since;
        let mut lines: Vec<Value> = Vec::new();
        if gone {
            lines.push(expired(since));
        }
        let me = self.clone();
        let collection = target.collection.clone();
        let namespace = target.namespace.clone();
        let mut ended = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = async_stream::stream! {
            for line in lines {
                yield Ok::<_, std::convert::Infallible>(bytes::Bytes::from(format!("{line}\n")));
            }
            if gone {
                return;
            }
            let mut seen = since;
            loop {
                let woken = me.changed.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let batch: Option<Vec<Change>> = {
                    let s = lock(&me.state);
                    // Changes after `seen` were compacted away while this watch lagged: as the
                    // API server does, it ends with 410 rather than skip them.
                    (s.compacted <= seen).then(|| {
                        // The history is in resource-version order: start past what was seen.
                        let from = s.history.partition_point(|c| c.rv <= seen);
                        s.history.range(from..).cloned().collect()
                    })
                };
                let Some(batch) = batch else {
                    yield Ok(bytes::Bytes::from(format!("{}\n", expired(seen))));
                    return;
                };
                for c in batch {
                    seen = c.rv;
                    if c.key.0 == collection
                        && c.key.1 == namespace
                        && selectors.matches(&c.object)
                    {
                        let line = json!({"type": c.kind, "object": c.object});
                        yield Ok(bytes::Bytes::from(format!("{line}\n")));
                    }
                }
                tokio::select! {
                    _ = &mut woken => {}
                    _ = ended.changed() => return,
                    _ = tokio::time::sleep_until(deadline) => return,
                }
            }
        };
        let mut resp = Response::new(Body::from_stream(stream));
        resp.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(Body::new(body), 16 << 20).await {
            Ok(b) => b,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
        };
        let Some(target) = parse(parts.uri.path()) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the fake API serves no {}", parts.uri.path()),
            );
        };
        let query = parts.uri.query().unwrap_or_default();
        if parts.method == Method::GET
            && target.name.is_none()
            && query_param(query, "watch").as_deref() == Some("true")
        {
            let since = query_param(query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = query_param(query, "timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .map_or(Duration::from_secs(290), Duration::from_secs);
            return self.watch(&target, since, Selectors::of(query), timeout);
        }
        if parts.method == Method::GET && target.name.is_none() {
            let labelled = query_param(query, "labelSelector").is_some_and(|l| !l.is_empty());
            let hold = self
                .holds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|h| h.collection == target.collection && h.labelled == labelled)
                .cloned();
            if let Some(hold) = hold {
                hold.pass().await;
            }
        }
        let content_type = parts
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()),
            }
        };
        let response = self.apply(&parts, &target, query, &content_type, body);
        if parts.method != Method::GET {
            self.changed.notify_waiters();
        }
        response
    }

    /// Serves one non-watch request against the state.
    fn apply(
        &self,
        parts: &axum::http::request::Parts,
        target: &Target,
        query: &str,
        content_type: &str,
        body: Value,
    ) -> Response<Body> {
        let mut s = lock(&self.state);
        if parts.method != Method::GET {
            s.writes
                .push(format!("{} {}", parts.method, parts.uri.path()));
        }
        let key = |name: &str| {
            (
                target.collection.clone(),
                target.namespace.clone(),
                name.to_string(),
            )
        };
        match (&parts.method, &target.name) {
            (&Method::GET, None) => {
                let selectors = Selectors::of(query);
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((c, ns, _), o)| {
                        c == &target.collection && ns == &target.namespace && selectors.matches(o)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                let rv = s.resource_version.to_string();
                respond(
                    StatusCode::OK,
                    &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
                )
            }
            (&Method::GET, Some(name)) => match s.objects.get(&key(name)) {
                Some(o) => respond(StatusCode::OK, o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                ),
            },
            (&Method::POST, None) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if s.objects.contains_key(&key(&name)) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{name} already exists"),
                    );
                }
                let created = s.store(key(&name), body, None, true);
                respond(StatusCode::CREATED, &created)
            }
            (&Method::PUT, Some(name)) => {
                let Some(current) = s.objects.get(&key(name)).cloned() else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{name} not found"),
                    );
                };
                if let Some(stale) = stale(name, &current, &body) {
                    return stale;
                }
                let replaced = s.store(key(name), body, Some(&current), false);
                respond(StatusCode::OK, &replaced)
            }
            (&Method::PATCH, Some(name)) => {
                let current = s.objects.get(&key(name)).cloned();
                let apply = content_type.starts_with("application/apply-patch");
                if !apply && !content_type.starts_with("application/merge-patch") {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        format!("the fake API takes merge and apply patches, not {content_type}"),
                    );
                }
                let Some(mut object) = current.clone().or_else(|| apply.then(|| json!({}))) else {
                    return status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{name} not found"),
                    );
                };
                if let Some(stale) = stale(name, &object, &body) {
                    return stale;
                }
                let mut patch = body;
                if target.status {
                    patch = json!({"status": patch["status"].clone()});
                } else if let Some(obj) = patch.as_object_mut() {
                    obj.remove("status");
                }
                merge(&mut object, &patch);
                let created = current.is_none();
                let stored = s.store(key(name), object, current.as_ref(), created);
                respond(
                    if created {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    &stored,
                )
            }
            (&Method::DELETE, Some(name)) => match s.delete(&key(name)) {
                Some(o) => respond(StatusCode::OK, &o),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{name} not found"),
                ),
            },
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{} {}", parts.method, parts.uri.path()),
            ),
        }
    }
}

impl State {
    /// Sets `object` under `key` with the next resource version, recording the change.
    fn set(&mut self, key: Key, mut object: Value) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        if let Some(uid) = object["metadata"]["uid"].as_str() {
            self.uids.insert(uid.to_string());
        }
        self.objects.insert(key.clone(), object.clone());
        self.record(key.clone(), kind, object.clone());
        // As the garbage collector would, soon after: an object whose owners are all gone (made
        // from a stale cache after its owner was deleted) is deleted.
        let orphaned = object["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|refs| {
                !refs.is_empty()
                    && refs
                        .iter()
                        .all(|r| r["uid"].as_str().is_none_or(|u| !self.uids.contains(u)))
            });
        if orphaned {
            self.delete(&key);
        }
        object
    }

    fn record(&mut self, key: Key, kind: &'static str, object: Value) {
        if self.history.len() == HISTORY
            && let Some(old) = self.history.pop_front()
        {
            self.compacted = old.rv;
        }
        self.history.push_back(Change {
            rv: self.resource_version,
            key,
            kind,
            object,
        });
    }

    /// Deletes `key` and, as the garbage collector would, everything it owns (recursively).
    /// Returns the deleted object.
    fn delete(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        if let Some(uid) = object["metadata"]["uid"].as_str() {
            self.uids.remove(uid);
        }
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.record(key.clone(), "DELETED", object.clone());
        if let Some(uid) = object["metadata"]["uid"].as_str() {
            let owned: Vec<Key> = self
                .objects
                .iter()
                .filter(|((_, ns, _), o)| {
                    ns == &key.1
                        && o["metadata"]["ownerReferences"]
                            .as_array()
                            .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in owned {
                self.delete(&k);
            }
        }
        Some(object)
    }

    /// Stores `object` under `key` with server-set metadata, returning what was stored.
    fn store(
        &mut self,
        key: Key,
        mut object: Value,
        previous: Option<&Value>,
        created: bool,
    ) -> Value {
        let meta = &mut object["metadata"];
        meta["namespace"] = json!(key.1);
        meta["name"] = json!(key.2);
        if created {
            meta["uid"] = json!(format!("uid-{}", self.resource_version + 1));
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            meta["generation"] = json!(1);
        } else if let Some(prev) = previous {
            for field in ["uid", "creationTimestamp"] {
                meta[field] = prev["metadata"][field].clone();
            }
            let generation = prev["metadata"]["generation"].as_i64().unwrap_or(1);
            let spec_changed = prev.get("spec") != object.get("spec");
            object["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
        }
        self.set(key, object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams, PostParams};

    #[tokio::test]
    async fn create_get_patch_with_preconditions_and_delete() {
        let fake = FakeKube::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("a".into());
        let created = api
            .create(&PostParams::default(), &cm)
            .await
            .expect("create");
        let rv = created.metadata.resource_version.clone().expect("rv");
        assert!(
            api.create(&PostParams::default(), &cm).await.is_err(),
            "exists"
        );
        let patch = json!({"metadata": {"resourceVersion": rv}, "data": {"k": "v"}});
        api.patch("a", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("first patch wins");
        let stale = api
            .patch("a", &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        assert!(
            matches!(stale, Err(kube::Error::Api(e)) if e.code == 409),
            "stale rv conflicts"
        );
        let got = api.get("a").await.expect("get");
        assert_eq!(
            got.data.and_then(|d| d.get("k").cloned()).as_deref(),
            Some("v")
        );
        api.delete("a", &Default::default()).await.expect("delete");
        assert!(api.get_opt("a").await.expect("get_opt").is_none());
        assert_eq!(fake.writes().len(), 5);
    }

    #[tokio::test]
    async fn field_selectors_pick_one_object_in_lists_and_watches() {
        use kube::api::ListParams;
        use kube::runtime::wait::await_condition;
        let fake = FakeKube::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        for name in ["a", "b"] {
            let mut cm = ConfigMap::default();
            cm.metadata.name = Some(name.into());
            api.create(&PostParams::default(), &cm)
                .await
                .expect("create");
        }
        let names = |l: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
            l.items
                .into_iter()
                .filter_map(|c| c.metadata.name)
                .collect()
        };
        let only_b = api
            .list(&ListParams::default().fields("metadata.name=b"))
            .await
            .expect("list");
        assert_eq!(names(only_b), ["b"]);
        let not_b = api
            .list(&ListParams::default().fields("metadata.name!=b"))
            .await
            .expect("list");
        assert_eq!(names(not_b), ["a"]);
        // Waiting for `b` to get data: `a` getting it first does not end the wait.
        let has_data = |c: Option<&ConfigMap>| c.is_some_and(|c| c.data.is_some());
        let waiting = tokio::spawn(await_condition(api.clone(), "b", has_data));
        let patch = |v: &str| Patch::Merge(json!({"data": {"k": v}}));
        api.patch("a", &PatchParams::default(), &patch("first"))
            .await
            .expect("patch a");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "a change to a ended the wait for b");
        api.patch("b", &PatchParams::default(), &patch("second"))
            .await
            .expect("patch b");
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the wait ended")
            .expect("task")
            .expect("await_condition")
            .expect("b");
        assert_eq!(got.metadata.name.as_deref(), Some("b"));
    }

    /// The names a watcher's next full list delivers (up to its `InitDone`), sorted.
    async fn relisted(
        events: &mut futures::stream::BoxStream<
            '_,
            kube::runtime::watcher::Result<kube::runtime::watcher::Event<ConfigMap>>,
        >,
    ) -> Vec<String> {
        use futures::StreamExt;
        use kube::runtime::watcher::Event;
        let mut names = Vec::new();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(Event::InitApply(cm)) => names.push(cm.metadata.name.unwrap_or_default()),
                Ok(Event::InitDone) => break,
                _ => {}
            }
        }
        names.sort();
        names
    }

    #[tokio::test]
    async fn watches_resume_relist_after_410_and_deletes_cascade() {
        use futures::StreamExt;
        use kube::runtime::watcher;
        let fake = FakeKube::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        let mut owner = ConfigMap::default();
        owner.metadata.name = Some("owner".into());
        let owner = api
            .create(&PostParams::default(), &owner)
            .await
            .expect("create owner");
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        // The initial list: Init, the owner, InitDone.
        let mut names = Vec::new();
        while let Some(ev) = events.next().await {
            match ev.expect("watch event") {
                watcher::Event::InitApply(cm) => names.push(cm.metadata.name.unwrap_or_default()),
                watcher::Event::InitDone => break,
                _ => {}
            }
        }
        assert_eq!(names, ["owner"]);

        let mut child = ConfigMap::default();
        child.metadata.name = Some("child".into());
        child.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "ConfigMap".into(),
                name: "owner".into(),
                uid: owner.metadata.uid.clone().expect("uid"),
                ..Default::default()
            },
        ]);
        api.create(&PostParams::default(), &child)
            .await
            .expect("create child");
        match events.next().await.expect("event").expect("ok") {
            watcher::Event::Apply(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("child")),
            other => panic!("expected the child's creation, got {other:?}"),
        }

        // History compacted and the watch dropped: the watcher gets 410, lists again, and
        // still sees everything.
        fake.compact();
        fake.drop_watches();
        assert_eq!(relisted(&mut events).await, ["child", "owner"]);

        // Compacted under an open watch (one that has delivered an event), which is not
        // dropped: it ends with 410 instead of resuming past the changes it never saw, so the
        // watcher lists again.
        let mut late = ConfigMap::default();
        late.metadata.name = Some("late".into());
        api.create(&PostParams::default(), &late)
            .await
            .expect("create late");
        match events.next().await.expect("event").expect("ok") {
            watcher::Event::Apply(cm) => assert_eq!(cm.metadata.name.as_deref(), Some("late")),
            other => panic!("expected the late one's creation, got {other:?}"),
        }
        fake.compact();
        late.metadata.name = Some("later".into());
        api.create(&PostParams::default(), &late)
            .await
            .expect("create later");
        let again = tokio::time::timeout(Duration::from_secs(10), relisted(&mut events))
            .await
            .expect("the open watch ended with 410 and the watcher listed again");
        assert_eq!(again, ["child", "late", "later", "owner"]);
        for name in ["late", "later"] {
            api.delete(name, &Default::default()).await.expect("delete");
            match events.next().await.expect("event").expect("ok") {
                watcher::Event::Delete(cm) => assert_eq!(cm.metadata.name.as_deref(), Some(name)),
                other => panic!("expected {name}'s deletion, got {other:?}"),
            }
        }

        // Deleting the owner takes its dependents along, and the watch reports both.
        api.delete("owner", &Default::default())
            .await
            .expect("delete");
        let mut deleted = Vec::new();
        while deleted.len() < 2 {
            if let Ok(watcher::Event::Delete(cm)) = events.next().await.expect("event") {
                deleted.push(cm.metadata.name.unwrap_or_default());
            }
        }
        assert_eq!(deleted, ["owner", "child"]);
        assert!(fake.list("api/v1/configmaps", "ns").is_empty());

        // A dependent made after its owner was deleted (from a stale cache) is collected too.
        api.create(&PostParams::default(), &child)
            .await
            .expect("create the late child");
        assert!(
            fake.list("api/v1/configmaps", "ns").is_empty(),
            "an object whose owners are all gone is garbage"
        );
    }
}
