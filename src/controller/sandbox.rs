//! Reconciling one `Sandbox`: observe its template, token Secret and Pod; decide (pure) what
//! should change; apply it (server-side apply of the Pod under one field manager, the Secret
//! created once, status as a merge patch). Level-triggered: every pass starts from what exists, so
//! a restart or a lost watch event loses nothing.

use super::pod::{TOKEN_KEY, desired_pod, labels, observe, owner_reference, token_secret_name};
use crate::k8s::crd::{FailurePolicy, Sandbox, SandboxStatus, SandboxTemplate};
use crate::k8s::labels::FIELD_MANAGER;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::chrono::{DateTime, Utc};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use std::time::Duration;

/// Longest wait between recreations of a failing Pod.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a sandbox is looked at again when nothing wakes it sooner.
const RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} failed")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing {what} failed")]
    Write {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the Sandbox has no namespace or name")]
    Unnamed,
}

/// What to do with the Pod.
#[derive(Debug, Clone, PartialEq)]
pub enum PodAction {
    Keep,
    Apply(Box<Pod>),
    Delete,
}

/// The outcome of deciding: the writes to make and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub delete_sandbox: bool,
    pub create_secret: bool,
    pub pod: PodAction,
    pub status: SandboxStatus,
    pub requeue: Duration,
}

fn condition(
    previous: &SandboxStatus,
    ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last = previous
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone());
    Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: last.unwrap_or(Time(now)),
    }
}

/// Decides what should change for `sandbox`, from what was observed. Pure.
pub fn decide(
    sandbox: &Sandbox,
    template: Option<&SandboxTemplate>,
    pod: Option<&Pod>,
    secret_exists: bool,
    now: DateTime<Utc>,
) -> Plan {
    let previous = sandbox.status.clone().unwrap_or_default();
    let generation = sandbox.metadata.generation;
    let mut status = previous.clone();
    status.observed_generation = generation;
    let mut plan = Plan {
        delete_sandbox: false,
        create_secret: false,
        pod: PodAction::Keep,
        status: status.clone(),
        requeue: RESYNC,
    };
    if let Some(Time(at)) = &sandbox.spec.shutdown_time
        && *at <= now
    {
        plan.delete_sandbox = true;
        return plan;
    }
    let Some(template) = template else {
        status.phase = Some("Failed".into());
        status.conditions = vec![condition(
            &previous,
            false,
            "TemplateNotFound",
            format!(
                "no SandboxTemplate {:?} in this namespace",
                sandbox.spec.template_ref.name
            ),
            generation,
            now,
        )];
        plan.status = status;
        plan.requeue = Duration::from_secs(30);
        return plan;
    };
    plan.create_secret = !secret_exists;
    let port = template.spec.port;
    let observed = observe(pod, port);
    status.pod_name = pod.and_then(|p| p.metadata.name.clone());
    status.pod_ip = observed.pod_ip.clone();
    status.endpoint = observed.endpoint.clone();
    let settled_failure = previous.phase.as_deref() == Some("Failed")
        && (template.spec.on_failure == FailurePolicy::Fail || previous.claimed_by.is_some());
    let (phase, ready, reason, message) = match (pod, observed.phase) {
        _ if settled_failure => {
            // Failed for good: keep saying why it failed.
            let why = previous.conditions.iter().find(|c| c.type_ == "Ready");
            (
                "Failed",
                false,
                why.map_or("Failed", |c| c.reason.as_str()),
                why.map_or_else(|| observed.reason.clone(), |c| c.message.clone()),
            )
        }
        (None, _) if previous.claimed_by.is_some() && previous.pod_ip.is_some() => (
            "Failed",
            false,
            "PodVanished",
            "its Pod disappeared after it was claimed, so its agent's state is lost".to_string(),
        ),
        (None, _) => {
            plan.pod = PodAction::Apply(Box::new(desired_pod(template, sandbox)));
            status.pod_name = sandbox.metadata.name.clone();
            plan.requeue = Duration::from_secs(10);
            (
                "Starting",
                false,
                "PodCreated",
                "creating its Pod".to_string(),
            )
        }
        (Some(_), "Failed") if previous.claimed_by.is_some() => (
            "Failed",
            false,
            "PodFailed",
            format!(
                "{}; it was claimed, so its agent's state is lost",
                observed.reason
            ),
        ),
        (Some(_), "Failed") if template.spec.on_failure == FailurePolicy::Fail => {
            ("Failed", false, "PodFailed", observed.reason.clone())
        }
        (Some(_), "Failed") => {
            plan.pod = PodAction::Delete;
            status.restarts = previous.restarts.saturating_add(1);
            let backoff = Duration::from_secs(1 << status.restarts.clamp(0, 9)).min(MAX_BACKOFF);
            plan.requeue = backoff;
            (
                "Starting",
                false,
                "Recreating",
                format!(
                    "{}; recreating it in {} s",
                    observed.reason,
                    backoff.as_secs()
                ),
            )
        }
        (Some(_), "Ready") => ("Ready", true, "Ready", observed.reason.clone()),
        (Some(_), other) => {
            plan.requeue = Duration::from_secs(10);
            (other, false, other, observed.reason.clone())
        }
    };
    status.phase = Some(phase.into());
    status.conditions = vec![condition(
        &previous, ready, reason, message, generation, now,
    )];
    plan.status = status;
    plan
}

/// The Secret holding a sandbox's harness token, owned by the sandbox.
fn token_secret(sandbox: &Sandbox, template: &str, token: &str) -> Secret {
    let name = sandbox.metadata.name.clone().unwrap_or_default();
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(&name)),
            namespace: sandbox.metadata.namespace.clone(),
            labels: Some(labels(&name, template)),
            owner_references: owner_reference(sandbox).map(|o| vec![o]),
            ..Default::default()
        },
        string_data: Some([(TOKEN_KEY.to_string(), token.to_string())].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// What a pass did: when to look again, and the phase change it wrote, if any (for an Event).
#[derive(Debug, Clone, PartialEq)]
pub struct Pass {
    pub requeue: Duration,
    pub transition: Option<Transition>,
}

/// A change of a Sandbox's phase, as its Ready condition explains it.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
    pub message: String,
}

/// One reconcile pass: observe, decide, apply. `token` is the harness token the sandbox's
/// Secret carries (the API derives the same one to reach the harness).
pub async fn reconcile(
    client: &kube::Client,
    sandbox: &Sandbox,
    token: &str,
) -> Result<Pass, Error> {
    let ns = sandbox.metadata.namespace.clone().ok_or(Error::Unnamed)?;
    let name = sandbox.metadata.name.clone().ok_or(Error::Unnamed)?;
    let sandboxes: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let templates: Api<SandboxTemplate> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let read = |what: &str| {
        let what = what.to_string();
        move |source| Error::Read { what, source }
    };
    let write = |what: &str| {
        let what = what.to_string();
        move |source| Error::Write { what, source }
    };
    let template_name = &sandbox.spec.template_ref.name;
    let template = templates
        .get_opt(template_name)
        .await
        .map_err(read("the SandboxTemplate"))?;
    let pod = pods.get_opt(&name).await.map_err(read("the Pod"))?;
    let secret = secrets
        .get_opt(&token_secret_name(&name))
        .await
        .map_err(read("the token Secret"))?;
    let plan = decide(
        sandbox,
        template.as_ref(),
        pod.as_ref(),
        secret.is_some(),
        Utc::now(),
    );
    if plan.delete_sandbox {
        sandboxes
            .delete(&name, &DeleteParams::default())
            .await
            .map_err(write("the Sandbox past its shutdownTime"))?;
        return Ok(Pass {
            requeue: RESYNC,
            transition: Some(Transition {
                from: sandbox.status.as_ref().and_then(|s| s.phase.clone()),
                to: "Deleted".into(),
                reason: "ShutdownTime".into(),
                message: "its shutdownTime passed".into(),
            }),
        });
    }
    if plan.create_secret {
        match secrets
            .create(
                &PostParams::default(),
                &token_secret(sandbox, template_name, token),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {} // made by an earlier pass
            Err(source) => return Err(write("the token Secret")(source)),
        }
    }
    match &plan.pod {
        PodAction::Keep => {}
        PodAction::Apply(desired) => {
            pods.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(desired.as_ref()),
            )
            .await
            .map_err(write("the Pod"))?;
        }
        PodAction::Delete => match pods.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => return Err(write("the failed Pod")(source)),
        },
    }
    let from = sandbox.status.as_ref().and_then(|s| s.phase.clone());
    let transition = (from != plan.status.phase).then(|| {
        let ready = plan.status.conditions.first();
        Transition {
            from: from.clone(),
            to: plan.status.phase.clone().unwrap_or_default(),
            reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
            message: ready.map(|c| c.message.clone()).unwrap_or_default(),
        }
    });
    if sandbox.status.as_ref() != Some(&plan.status) {
        match sandboxes
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": plan.status })),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {} // deleted meanwhile: nothing to say
            Err(source) => return Err(write("the Sandbox status")(source)),
        }
    }
    Ok(Pass {
        requeue: plan.requeue,
        transition,
    })
}
