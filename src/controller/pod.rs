//! Pure decisions about a sandbox's Pod: the Pod that should exist for a `Sandbox` of a
//! `SandboxTemplate` (with the secure defaults the template leaves out), and the sandbox's status
//! as read from the Pod observed. No I/O.

use crate::k8s::crd::{Sandbox, SandboxTemplate};
use crate::k8s::labels;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, Pod,
    PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use std::collections::BTreeMap;

/// The container the controller fills in (or adds) in the template's Pod.
pub const HARNESS_CONTAINER: &str = "harness";
/// The key of the harness token in the sandbox's Secret.
pub const TOKEN_KEY: &str = "token";
/// The non-root user the harness images run as.
pub const SANDBOX_UID: i64 = 10001;
pub const WORKDIR: &str = "/work";

/// The labels of everything made for a sandbox.
pub fn labels(sandbox: &str, template: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sandwarden-sandbox".into()),
        ("app.kubernetes.io/instance".into(), sandbox.to_string()),
        ("app.kubernetes.io/component".into(), "harness".into()),
        (labels::MANAGED_BY.into(), labels::MANAGER.into()),
        (labels::SANDBOX.into(), sandbox.to_string()),
        (labels::TEMPLATE.into(), template.to_string()),
    ])
}

/// The name of the Secret holding a sandbox's harness token.
pub fn token_secret_name(sandbox: &str) -> String {
    format!("{sandbox}-harness-token")
}

/// An owner reference making `sandbox` the controller of what it owns.
pub fn owner_reference(sandbox: &Sandbox) -> Option<OwnerReference> {
    let mut owner = sandbox.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

fn quantity(q: &str) -> Quantity {
    Quantity(q.to_string())
}

/// Fills `c` in as the harness container, keeping what the template set explicitly.
fn fill_harness(c: &mut Container, template: &SandboxTemplate, sandbox: &Sandbox) {
    let spec = &template.spec;
    let name = template.metadata.name.as_deref().unwrap_or("harness");
    if c.image.is_none() {
        c.image =
            Some(spec.image.clone().unwrap_or_else(|| {
                format!("sandwarden/harness-{name}:{}", env!("CARGO_PKG_VERSION"))
            }));
    }
    c.args = Some(
        template
            .to_template()
            .harness_flags(&format!("0.0.0.0:{}", template.spec.port), WORKDIR),
    );
    let port = ContainerPort {
        name: Some("harness".into()),
        container_port: spec.port,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let ports = c.ports.get_or_insert_with(Vec::new);
    ports.retain(|p| p.container_port != spec.port);
    ports.push(port);
    // The token from the sandbox's Secret, then the sandbox's own env over the template's.
    let env = c.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != "SANDWARDEN_TOKEN" && !sandbox.spec.env.contains_key(&e.name));
    env.push(EnvVar {
        name: "SANDWARDEN_TOKEN".into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: token_secret_name(sandbox.metadata.name.as_deref().unwrap_or_default()),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    env.extend(sandbox.spec.env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: Some(v.clone()),
        ..Default::default()
    }));
    if !env.iter().any(|e| e.name == "HOME") {
        env.push(EnvVar {
            name: "HOME".into(),
            value: Some(WORKDIR.into()),
            ..Default::default()
        });
    }
    // Probes: the harness answers only with its token, so readiness is "it listens"; the API
    // checks the agent itself before handing the sandbox to a session.
    let listening = Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(spec.port),
            ..Default::default()
        }),
        period_seconds: Some(2),
        ..Default::default()
    };
    c.readiness_probe.get_or_insert_with(|| listening.clone());
    c.liveness_probe.get_or_insert(Probe {
        period_seconds: Some(10),
        failure_threshold: Some(6),
        ..listening
    });
    let sc = c.security_context.get_or_insert_with(Default::default);
    sc.allow_privilege_escalation.get_or_insert(false);
    sc.read_only_root_filesystem.get_or_insert(true);
    sc.run_as_non_root.get_or_insert(true);
    sc.capabilities.get_or_insert_with(|| Capabilities {
        drop: Some(vec!["ALL".into()]),
        ..Default::default()
    });
    let resources = c
        .resources
        .get_or_insert_with(ResourceRequirements::default);
    let requests = resources.requests.get_or_insert_with(BTreeMap::new);
    requests
        .entry("cpu".into())
        .or_insert_with(|| quantity("250m"));
    requests
        .entry("memory".into())
        .or_insert_with(|| quantity("512Mi"));
    let limits = resources.limits.get_or_insert_with(BTreeMap::new);
    limits
        .entry("memory".into())
        .or_insert_with(|| quantity("2Gi"));
    let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
    for (volume, path) in [("work", WORKDIR), ("tmp", "/tmp")] {
        if !mounts.iter().any(|m| m.mount_path == path) {
            mounts.push(VolumeMount {
                name: format!("sandwarden-{volume}"),
                mount_path: path.into(),
                ..Default::default()
            });
        }
    }
}

/// The Pod that should exist for `sandbox`: the template's Pod with the harness container filled
/// in, secure defaults where the template is silent, labels, and the sandbox as owner.
pub fn desired_pod(template: &SandboxTemplate, sandbox: &Sandbox) -> Pod {
    let name = sandbox.metadata.name.clone().unwrap_or_default();
    let template_name = template.metadata.name.clone().unwrap_or_default();
    let base = template.spec.pod_template.clone();
    let mut meta = base.metadata.unwrap_or_default();
    let mut spec: PodSpec = base.spec.unwrap_or_default();

    let mut pod_labels = meta.labels.take().unwrap_or_default();
    pod_labels.extend(labels(&name, &template_name));
    match spec
        .containers
        .iter_mut()
        .find(|c| c.name == HARNESS_CONTAINER)
    {
        Some(c) => fill_harness(c, template, sandbox),
        None => {
            let mut c = Container {
                name: HARNESS_CONTAINER.into(),
                ..Default::default()
            };
            fill_harness(&mut c, template, sandbox);
            spec.containers.insert(0, c);
        }
    }
    spec.automount_service_account_token.get_or_insert(false);
    spec.restart_policy = Some("Never".into()); // a failed Pod is replaced by the controller
    let psc = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default);
    psc.run_as_non_root.get_or_insert(true);
    psc.run_as_user.get_or_insert(SANDBOX_UID);
    psc.run_as_group.get_or_insert(SANDBOX_UID);
    psc.fs_group.get_or_insert(SANDBOX_UID);
    psc.seccomp_profile.get_or_insert_with(|| SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    });
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for volume in ["work", "tmp"] {
        let name = format!("sandwarden-{volume}");
        if !volumes.iter().any(|v| v.name == name) {
            volumes.push(Volume {
                name,
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
        }
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: sandbox.metadata.namespace.clone(),
            labels: Some(pod_labels),
            annotations: meta.annotations.take(),
            owner_references: owner_reference(sandbox).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// What a sandbox's status says, from the Pod observed (or its absence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `Pending`, `Starting`, `Ready`, `Failed` or `Terminating`.
    pub phase: &'static str,
    /// True only when the Pod is Running, ready, and has an IP.
    pub ready: bool,
    pub pod_ip: Option<String>,
    pub endpoint: Option<String>,
    /// Why it is not ready, for the condition's message.
    pub reason: String,
}

/// Reads a sandbox's state from its Pod.
pub fn observe(pod: Option<&Pod>, port: i32) -> Observed {
    let Some(pod) = pod else {
        return Observed {
            phase: "Pending",
            ready: false,
            pod_ip: None,
            endpoint: None,
            reason: "no Pod yet".into(),
        };
    };
    let status = pod.status.clone().unwrap_or_default();
    let ip = status.pod_ip.clone().filter(|ip| !ip.is_empty());
    let pod_ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let phase = status.phase.clone().unwrap_or_default();
    let terminated = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| {
            format!(
                "the harness exited with code {}{}",
                t.exit_code,
                t.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        });
    let (phase, ready, reason) = if pod.metadata.deletion_timestamp.is_some() {
        ("Terminating", false, "the Pod is being deleted".to_string())
    } else if phase == "Failed" || phase == "Succeeded" || terminated.is_some() {
        (
            "Failed",
            false,
            terminated.unwrap_or_else(|| format!("the Pod is {phase}")),
        )
    } else if phase == "Running" && pod_ready && ip.is_some() {
        ("Ready", true, "the harness is listening".to_string())
    } else {
        (
            "Starting",
            false,
            format!(
                "the Pod is {}",
                if phase.is_empty() { "Pending" } else { &phase }
            ),
        )
    };
    Observed {
        phase,
        ready,
        endpoint: ip
            .as_ref()
            .filter(|_| ready)
            .map(|ip| format!("http://{ip}:{port}")),
        pod_ip: ip,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{SandboxSpec, SandboxTemplateSpec, TemplateRef};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodStatus,
    };

    fn template(pod_template: serde_json::Value) -> SandboxTemplate {
        let spec: SandboxTemplateSpec = serde_json::from_value(serde_json::json!({
            "kind": "api", "command": "sandwarden echo-agent", "podTemplate": pod_template
        }))
        .expect("template spec");
        let mut t = SandboxTemplate::new("echo", spec);
        t.metadata.namespace = Some("agents".into());
        t
    }

    fn sandbox(env: &[(&str, &str)]) -> Sandbox {
        let mut s = Sandbox::new(
            "sbx-1",
            SandboxSpec {
                template_ref: TemplateRef {
                    name: "echo".into(),
                },
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                shutdown_time: None,
            },
        );
        s.metadata.namespace = Some("agents".into());
        s.metadata.uid = Some("uid-1".into());
        s
    }

    fn harness(pod: &Pod) -> Container {
        pod.spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == HARNESS_CONTAINER))
            .cloned()
            .expect("harness container")
    }

    #[test]
    fn an_empty_template_gets_a_harness_container_with_secure_defaults() {
        let pod = desired_pod(&template(serde_json::json!({})), &sandbox(&[]));
        let c = harness(&pod);
        assert_eq!(
            c.image.as_deref(),
            Some(format!("sandwarden/harness-echo:{}", env!("CARGO_PKG_VERSION")).as_str())
        );
        let args = c.args.clone().unwrap_or_default();
        assert_eq!(&args[..2], ["--listen", "0.0.0.0:7000"]);
        assert!(
            args.windows(2)
                .any(|w| w == ["--agent", "sandwarden echo-agent"])
        );
        let sc = c.security_context.clone().expect("security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        let spec = pod.spec.clone().expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(
            spec.security_context.and_then(|s| s.run_as_user),
            Some(SANDBOX_UID)
        );
        let requests = c.resources.and_then(|r| r.requests).expect("requests");
        assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
        let token = c
            .env
            .unwrap_or_default()
            .into_iter()
            .find(|e| e.name == "SANDWARDEN_TOKEN");
        let secret = token
            .and_then(|t| t.value_from)
            .and_then(|v| v.secret_key_ref);
        assert_eq!(
            secret.map(|s| s.name),
            Some("sbx-1-harness-token".to_string())
        );
        let owner = pod.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(
            owner.first().map(|o| (o.kind.as_str(), o.controller)),
            Some(("Sandbox", Some(true)))
        );
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(labels::TEMPLATE).map(String::as_str),
            Some("echo")
        );
        assert_eq!(
            labels.get(labels::MANAGED_BY).map(String::as_str),
            Some("sandwarden")
        );
    }

    #[test]
    fn what_the_template_sets_is_kept_and_sandbox_env_overrides_it() {
        let t = template(serde_json::json!({
            "metadata": {"labels": {"team": "a"}},
            "spec": {
                "serviceAccountName": "agents",
                "automountServiceAccountToken": true,
                "containers": [
                    {"name": "sidecar", "image": "busybox"},
                    {"name": "harness", "image": "custom:1",
                     "env": [{"name": "MODEL", "value": "big"}, {"name": "KEEP", "value": "1"}],
                     "resources": {"requests": {"cpu": "2"}},
                     "securityContext": {"readOnlyRootFilesystem": false}}
                ]
            }
        }));
        let pod = desired_pod(&t, &sandbox(&[("MODEL", "small")]));
        let c = harness(&pod);
        assert_eq!(c.image.as_deref(), Some("custom:1"));
        let env = c.env.clone().unwrap_or_default();
        let value = |n: &str| {
            env.iter()
                .find(|e| e.name == n)
                .and_then(|e| e.value.clone())
        };
        assert_eq!(value("MODEL").as_deref(), Some("small"));
        assert_eq!(value("KEEP").as_deref(), Some("1"));
        assert_eq!(env.iter().filter(|e| e.name == "MODEL").count(), 1);
        assert_eq!(
            c.security_context.and_then(|s| s.read_only_root_filesystem),
            Some(false)
        );
        let requests = c.resources.and_then(|r| r.requests).unwrap_or_default();
        assert_eq!(requests.get("cpu"), Some(&Quantity("2".into())));
        let spec = pod.spec.clone().expect("spec");
        assert_eq!(spec.automount_service_account_token, Some(true));
        assert_eq!(spec.containers.len(), 2, "no second harness container");
        assert_eq!(
            pod.metadata
                .labels
                .unwrap_or_default()
                .get("team")
                .map(String::as_str),
            Some("a")
        );
    }

    fn pod(phase: &str, ready: bool, ip: Option<&str>) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: ip.map(String::from),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ready_needs_running_ready_and_an_ip() {
        assert_eq!(observe(None, 7000).phase, "Pending");
        assert!(!observe(Some(&pod("Pending", false, None)), 7000).ready);
        assert!(!observe(Some(&pod("Running", false, Some("10.0.0.5"))), 7000).ready);
        assert!(!observe(Some(&pod("Running", true, None)), 7000).ready);
        let ok = observe(Some(&pod("Running", true, Some("10.0.0.5"))), 7000);
        assert_eq!((ok.phase, ok.ready), ("Ready", true));
        assert_eq!(ok.endpoint.as_deref(), Some("http://10.0.0.5:7000"));
    }

    #[test]
    fn a_dead_harness_or_a_deleted_pod_is_not_ready() {
        let mut dead = pod("Running", true, Some("10.0.0.5"));
        if let Some(s) = dead.status.as_mut() {
            s.container_statuses = Some(vec![ContainerStatus {
                name: "harness".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 137,
                        reason: Some("OOMKilled".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        let o = observe(Some(&dead), 7000);
        assert_eq!((o.phase, o.ready), ("Failed", false));
        assert!(
            o.reason.contains("137") && o.reason.contains("OOMKilled"),
            "{}",
            o.reason
        );
        let mut deleting = pod("Running", true, Some("10.0.0.5"));
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::chrono::DateTime::UNIX_EPOCH,
            ));
        assert_eq!(observe(Some(&deleting), 7000).phase, "Terminating");
    }
}
