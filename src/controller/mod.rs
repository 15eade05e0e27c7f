//! The Kubernetes controller: reconciles `Sandbox` resources into Pods and keeps warm pools
//! topped up. Reconciling is a pipeline with a pure middle: observe (I/O), decide what should
//! exist (the pure functions here, unit-tested), apply with server-side apply (I/O).
//!
//! It must not know sessions: the API layer claims sandboxes; the controller only runs them.

pub mod pod;
pub mod sandbox;
pub mod warm_pool;

/// The field manager of every server-side apply the controller makes.
pub mod leader;

use crate::k8s::crd::{Sandbox, SandboxWarmPool};
use crate::k8s::labels::{FIELD_MANAGER, MANAGED};
use crate::tokens::Tokens;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What the reconcilers share.
struct Context {
    client: kube::Client,
    tokens: Tokens,
    recorder: Recorder,
    sandboxes: Store<Sandbox>,
    expectations: Mutex<HashMap<ObjectRef<SandboxWarmPool>, warm_pool::Expectations>>,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Failed(#[from] sandbox::Error);

#[tracing::instrument(name = "reconcile", skip_all, fields(sandbox = %s.name_any()))]
async fn reconcile_sandbox(s: Arc<Sandbox>, ctx: Arc<Context>) -> Result<Action, Failed> {
    let token = ctx.tokens.for_sandbox(&s.name_any());
    let pass = sandbox::reconcile(&ctx.client, &s, &token).await?;
    if let Some(t) = pass.transition {
        let warning = matches!(t.to.as_str(), "Failed");
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: if t.reason.is_empty() {
                t.to.clone()
            } else {
                t.reason.clone()
            },
            note: Some(format!(
                "{} → {}: {}",
                t.from.as_deref().unwrap_or("New"),
                t.to,
                t.message
            )),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &s.object_ref(&())).await {
            tracing::debug!(error = %e, sandbox = %s.name_any(), "publishing an Event failed");
        }
    }
    Ok(Action::requeue(pass.requeue))
}

#[tracing::instrument(name = "reconcile", skip_all, fields(pool = %pool.name_any()))]
async fn reconcile_pool(pool: Arc<SandboxWarmPool>, ctx: Arc<Context>) -> Result<Action, Failed> {
    // Sizing from a cache that has not finished its first list would over-create. `run` starts
    // this controller only once the cache is ready, so this returns at once; bounded all the
    // same, so a cache that is somehow not ready shows in the log instead of stalling.
    let ready = tokio::time::timeout(Duration::from_secs(5), ctx.sandboxes.wait_until_ready());
    if !matches!(ready.await, Ok(Ok(()))) {
        tracing::warn!(pool = %pool.name_any(), "the Sandbox cache is not ready; sizing the pool later");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let key = ObjectRef::from_obj(pool.as_ref());
    let mut expectations = ctx
        .expectations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&key)
        .unwrap_or_default();
    let result = warm_pool::reconcile(&ctx.client, &pool, &ctx.sandboxes, &mut expectations).await;
    ctx.expectations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, expectations);
    Ok(Action::requeue(result?))
}

fn retry<K>(object: Arc<K>, error: &Failed, _ctx: Arc<Context>) -> Action
where
    K: Resource,
{
    tracing::warn!(object = %object.meta().name.as_deref().unwrap_or_default(), error = %error, cause = ?std::error::Error::source(&error.0), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the Sandbox and SandboxWarmPool controllers for `namespace` until `stop`. Level-
/// triggered from watches (a 410 or a restart relists and loses nothing); every Sandbox is also
/// looked at again on a timer.
pub async fn run(
    client: kube::Client,
    namespace: &str,
    tokens: Tokens,
    identity: &str,
    stop: CancellationToken,
) {
    let sandboxes: Api<Sandbox> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pools: Api<SandboxWarmPool> = Api::namespaced(client.clone(), namespace);
    let sandbox_controller = Controller::new(sandboxes.clone(), watcher::Config::default())
        .owns(pods, watcher::Config::default().labels(MANAGED));
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        ),
        client,
        tokens,
        sandboxes: sandbox_controller.store(),
        expectations: Mutex::default(),
    });
    let sandbox_run = sandbox_controller
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(reconcile_sandbox, retry, ctx.clone())
        .for_each(|_| async {});
    // The pools are sized from the Sandbox cache, so their controller starts once that cache
    // has its first list, and the wait happens here, in the task that also runs the Sandbox
    // controller. kube-runtime's readiness signal wakes only the task that polled it last (a
    // oneshot receiver keeps one waker), and the Sandbox controller polls it on every wake-up:
    // a pool reconcile waiting on it in its own task was never woken, and the pool was not
    // sized until a timeout (docs/reliability.md).
    let ready = ctx.sandboxes.clone();
    let pool_run = async move {
        tokio::select! {
            r = ready.wait_until_ready() => if r.is_err() { return },
            () = stop.cancelled() => return,
        }
        Controller::new(pools, watcher::Config::default())
            .owns(sandboxes, watcher::Config::default().labels(MANAGED))
            .graceful_shutdown_on(stop.cancelled_owned())
            .run(reconcile_pool, retry, ctx)
            .for_each(|_| async {})
            .await;
    };
    tokio::join!(sandbox_run, pool_run);
}
