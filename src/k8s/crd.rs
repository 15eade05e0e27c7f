//! The custom resources (`sandwarden.dev/v1alpha1`): `SandboxTemplate`, `Sandbox` and
//! `SandboxWarmPool`, as Rust types the CRDs in `crds/` are generated from (`sandwarden crd`).
//!
//! Types and their schemas only: what the controller does with them lives elsewhere.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
pub use sandwarden_proto::kind::{HarnessKind, StartMode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a sandbox runs: the harness image, the agent or program, and the Pod around it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandwarden.dev",
    version = "v1alpha1",
    kind = "SandboxTemplate",
    namespaced,
    shortname = "sbxt",
    category = "sandwarden",
    printcolumn = r#"{"name":"Kind","type":"string","jsonPath":".spec.kind"}"#,
    printcolumn = r#"{"name":"Command","type":"string","jsonPath":".spec.command"}"#,
    printcolumn = r#"{"name":"Start","type":"string","jsonPath":".spec.start"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplateSpec {
    /// `api`: an ACP agent over stdio; `tui`: a program under a PTY.
    pub kind: HarnessKind,
    /// The agent's or program's command line, run by the harness server in the Pod.
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 4096").message("command must be 1 to 4096 characters"))]
    pub command: String,
    /// The harness image (default `sandwarden/harness-<template name>:<version>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The port the harness server listens on in the Pod.
    #[serde(default = "default_port")]
    #[x_kube(validation = Rule::new("self >= 1024 && self <= 65535").message("port must be 1024 to 65535 (the harness runs as non-root)"))]
    pub port: i32,
    /// `boot`: the agent starts with the Pod (fastest first turn); `bind`: when a session claims
    /// the sandbox (its env reaches the agent without a restart).
    #[serde(default)]
    pub start: StartMode,
    /// Idle sessions are reaped after this long without activity.
    #[serde(default = "default_idle_timeout")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 604800").message("idleTimeoutSeconds must be 1 to 604800"))]
    pub idle_timeout_seconds: i64,
    /// Longest turn.
    #[serde(default = "default_turn_timeout")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("turnTimeoutSeconds must be 1 to 86400"))]
    pub turn_timeout_seconds: i64,
    /// What happens when a sandbox's Pod fails or vanishes.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// The Pod around the harness: resources, node selection, volumes, extra containers. A
    /// container named `harness` is filled in (image, command, port, probes); left out, it is
    /// added. Secure defaults apply where the template is silent: non-root, no service-account
    /// token, read-only root file system, all capabilities dropped, resource requests.
    #[serde(default)]
    #[schemars(schema_with = "pod_template_schema")]
    pub pod_template: PodTemplateSpec,
    /// The packages the image provides, by package manager (`apt`, `npm`, `pip`, …): what a
    /// client's environment may ask for (the vendor APIs' `packages`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub packages: std::collections::BTreeMap<String, Vec<String>>,
}

/// What happens to a sandbox whose Pod failed or vanished.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FailurePolicy {
    /// A new Pod is created, with backoff (an unclaimed sandbox only: a claimed one's session
    /// is dead, since its agent's state is gone).
    #[default]
    Recreate,
    /// The sandbox is marked failed and left for inspection.
    Fail,
}

fn default_port() -> i32 {
    7000
}
fn default_idle_timeout() -> i64 {
    3600
}
fn default_turn_timeout() -> i64 {
    1800
}

/// The Pod template is checked by the API server when Pods are created from it; the CRD keeps
/// it as an open object instead of repeating the whole Pod schema (hundreds of KiB).
fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "description": "A Pod template (metadata and spec), as in a Deployment."
    })
}

/// A reference to a `SandboxTemplate` in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TemplateRef {
    pub name: String,
}

/// One sandbox: a Pod running the template's harness, ready to be claimed by a session.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandwarden.dev",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    shortname = "sbx",
    category = "sandwarden",
    printcolumn = r#"{"name":"Template","type":"string","jsonPath":".spec.templateRef.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Pod","type":"string","jsonPath":".status.podName"}"#,
    printcolumn = r#"{"name":"Claimed-By","type":"string","jsonPath":".status.claimedBy"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// The template it runs; cannot change after creation.
    #[x_kube(validation = Rule::new("self == oldSelf").message("templateRef is immutable: create a new Sandbox"))]
    pub template_ref: TemplateRef,
    /// Environment added to (or overriding) the template's, for this sandbox's harness.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// When to delete the sandbox, whatever it is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<Time>,
}

/// A sandbox as last observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// `Pending`, `Starting`, `Ready`, `Failed` or `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `Ready` is true only when the Pod is Running, ready, and has an IP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// `http://POD_IP:PORT` of its harness server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The session that claimed it (claims are one compare-and-set write of this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
    /// When it was claimed (a claim in flight is not yet recorded by the API's store; one this
    /// old without a session is an orphan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_at: Option<Time>,
    /// Pods created for it after failures.
    #[serde(default)]
    pub restarts: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Keeps `replicas` ready, unclaimed sandboxes of a template; scalable with `kubectl scale` and
/// a HorizontalPodAutoscaler.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "sandwarden.dev",
    version = "v1alpha1",
    kind = "SandboxWarmPool",
    namespaced,
    status = "SandboxWarmPoolStatus",
    shortname = "sbxpool",
    category = "sandwarden",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Template","type":"string","jsonPath":".spec.templateRef.name"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolSpec {
    /// The template its sandboxes run; cannot change after creation.
    #[x_kube(validation = Rule::new("self == oldSelf").message("templateRef is immutable: create a new SandboxWarmPool"))]
    pub template_ref: TemplateRef,
    /// Ready, unclaimed sandboxes to keep.
    #[x_kube(validation = Rule::new("self >= 0 && self <= 1000").message("replicas must be 0 to 1000"))]
    pub replicas: i32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolStatus {
    /// Unclaimed sandboxes that exist (ready or starting).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// The label selector of its sandboxes, for the scale subresource.
    #[serde(default)]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl SandboxTemplate {
    /// The template as the API layer and every runtime know it (one harness command line for
    /// all of them). Its warm pool is a `SandboxWarmPool`, not the API's own.
    pub fn to_template(&self) -> crate::template::Template {
        let spec = &self.spec;
        crate::template::Template {
            name: self.metadata.name.clone().unwrap_or_default(),
            kind: spec.kind,
            command: spec.command.clone(),
            start: spec.start,
            pool: 0,
            idle_timeout_s: u64::try_from(spec.idle_timeout_seconds).unwrap_or(1),
            turn_timeout_s: u64::try_from(spec.turn_timeout_seconds).unwrap_or(1),
            env: Default::default(),
            container: Default::default(),
            packages: spec.packages.clone(),
        }
    }
}

/// The CRDs, in the order they are applied, as `(file name, YAML)`, followed by the
/// `kustomization.yaml` that lists them (so `manifests/` can include `crds/` as a base, and
/// `kubectl apply -k crds/` installs them alone).
pub fn crds() -> Result<Vec<(String, String)>, serde_yaml::Error> {
    let all = [
        SandboxTemplate::crd(),
        Sandbox::crd(),
        SandboxWarmPool::crd(),
    ];
    let mut files = all
        .into_iter()
        .map(|crd| {
            let name = format!("{}.yaml", crd.spec.names.plural);
            let yaml = serde_yaml::to_string(&crd)?;
            Ok((
                name,
                format!("# Generated by `sandwarden crd`; do not edit.\n{yaml}"),
            ))
        })
        .collect::<Result<Vec<_>, serde_yaml::Error>>()?;
    let resources: String = files
        .iter()
        .map(|(name, _)| format!("- {name}\n"))
        .collect();
    files.push((
        "kustomization.yaml".into(),
        format!(
            "# Generated by `sandwarden crd`; do not edit.\n\
             apiVersion: kustomize.config.k8s.io/v1beta1\n\
             kind: Kustomization\n\
             resources:\n{resources}"
        ),
    ));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> serde_json::Value {
        serde_json::to_value(&crd.spec.versions[0].schema).expect("schema")
    }

    #[test]
    fn the_warm_pool_scales_and_immutable_refs_are_enforced_by_cel() {
        let pool = SandboxWarmPool::crd();
        let scale = pool.spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.scale.as_ref())
            .expect("scale subresource");
        assert_eq!(scale.spec_replicas_path, ".spec.replicas");
        assert_eq!(
            scale.label_selector_path.as_deref(),
            Some(".status.selector")
        );
        for crd in [Sandbox::crd(), SandboxWarmPool::crd()] {
            let text = schema_of(&crd).to_string();
            assert!(text.contains("self == oldSelf"), "{}", crd.spec.names.kind);
        }
        assert!(
            schema_of(&SandboxTemplate::crd())
                .to_string()
                .contains("x-kubernetes-preserve-unknown-fields")
        );
    }

    #[test]
    fn specs_round_trip_with_defaults() {
        let t: SandboxTemplateSpec = serde_json::from_value(serde_json::json!({
            "kind": "api", "command": "sandwarden echo-agent"
        }))
        .expect("minimal template");
        assert_eq!(
            (t.port, t.start, t.on_failure),
            (7000, StartMode::Boot, FailurePolicy::Recreate)
        );
        let s: SandboxSpec = serde_json::from_value(serde_json::json!({
            "templateRef": {"name": "echo"}, "env": {"A": "b"}
        }))
        .expect("sandbox");
        assert_eq!(s.template_ref.name, "echo");
    }
}
