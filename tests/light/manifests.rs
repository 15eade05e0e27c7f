//! The Kubernetes manifests and the example resources in the docs, checked without a cluster:
//! - every `sandwarden.dev` resource in `manifests/` and in the ```yaml blocks of README.md and
//!   docs/*.md is valid against the `openAPIV3Schema` of its CRD in `crds/` (unknown fields are
//!   errors, as with `kubectl apply`'s strict field validation), and reads into the Rust types;
//! - every built-in resource in `manifests/` reads into its k8s-openapi type and writes back
//!   unchanged, so no field is misspelt or misplaced (kubernetes-validate in scripts/test checks
//!   the same against the published schemas, when it is installed);
//! - every kustomization references files that exist, and every manifest is referenced;
//! - the default templates run what the local runtime's built-in templates run, and the Pods
//!   the controller makes from them pass the namespace's `restricted` Pod Security Standard and
//!   are reachable through the sandboxes' NetworkPolicy.
//!
//! CEL rules (`x-kubernetes-validations`) are left to the API server.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One YAML document and where it came from (for messages).
struct Doc {
    origin: String,
    value: Value,
}

fn parse_yaml(origin: &str, text: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(de)
            .unwrap_or_else(|e| panic!("{origin}: document {i} is not valid YAML: {e}"));
        if !value.is_null() {
            docs.push(Doc {
                origin: format!("{origin} (document {i})"),
                value,
            });
        }
    }
    docs
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
    out.sort();
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml")
}

/// The files under `manifests/` that some kustomization lists as a patch (partial resources).
fn patch_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    yaml_files(&root().join("manifests"), &mut files);
    let mut patches = Vec::new();
    for k in files.iter().filter(|p| is_kustomization(p)) {
        let dir = k.parent().expect("a kustomization has a directory");
        for doc in read_docs(k) {
            for p in doc.value["patches"].as_array().into_iter().flatten() {
                if let Some(path) = p["path"].as_str() {
                    patches.push(normalize(&dir.join(path)));
                }
            }
        }
    }
    patches
}

fn read_docs(path: &Path) -> Vec<Doc> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    parse_yaml(&relative(path), &text)
}

/// Every resource document in `manifests/`: neither a kustomization nor a patch.
fn manifest_docs() -> Vec<Doc> {
    let mut files = Vec::new();
    yaml_files(&root().join("manifests"), &mut files);
    let patches = patch_files();
    files
        .iter()
        .filter(|p| !is_kustomization(p) && !patches.contains(&normalize(p)))
        .flat_map(|p| read_docs(p))
        .collect()
}

/// The ```yaml blocks of README.md and docs/*.md.
fn docs_yaml_blocks() -> Vec<Doc> {
    let mut files = vec![root().join("README.md")];
    let entries = std::fs::read_dir(root().join("docs")).expect("read docs/");
    for entry in entries {
        let path = entry.expect("docs/ entry").path();
        if path.extension().is_some_and(|x| x == "md") {
            files.push(path);
        }
    }
    files.sort();
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read a markdown file");
        docs.extend(yaml_blocks(&relative(&path), &text));
    }
    docs
}

/// The ```yaml (or ```yml) fenced blocks of one markdown text, parsed.
fn yaml_blocks(origin: &str, markdown: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    let mut block: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut block {
            None => {
                let info = trimmed.strip_prefix("```").map(str::trim);
                if matches!(info, Some("yaml" | "yml")) {
                    block = Some((n + 1, String::new()));
                }
            }
            Some((start, text)) => {
                if trimmed.starts_with("```") {
                    docs.extend(parse_yaml(&format!("{origin}:{}", *start + 1), text));
                    block = None;
                } else {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    assert!(block.is_none(), "{origin}: a ```yaml block is not closed");
    docs
}

/// The CRDs in `crds/` (tests/light/crds.rs keeps them equal to what the Rust types generate), by kind.
fn crd_schemas() -> BTreeMap<String, Value> {
    let mut schemas = BTreeMap::new();
    for name in ["sandboxtemplates", "sandboxes", "sandboxwarmpools"] {
        let path = root().join("crds").join(format!("{name}.yaml"));
        for doc in read_docs(&path) {
            let crd = &doc.value;
            let kind = crd["spec"]["names"]["kind"]
                .as_str()
                .expect("a CRD names its kind");
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            assert!(schema.is_object(), "{}: no openAPIV3Schema", doc.origin);
            schemas.insert(kind.to_string(), json_schema(kind, schema));
        }
    }
    schemas
}

/// A CRD's structural OpenAPI schema as the JSON Schema the API server effectively applies:
/// `nullable` allows null; an object with `properties` rejects other fields unless it preserves
/// unknown fields (strict field validation); the top level takes apiVersion, kind and metadata.
fn json_schema(kind: &str, openapi: &Value) -> Value {
    let mut schema = strict(openapi);
    let props = schema["properties"]
        .as_object_mut()
        .expect("the top-level schema has properties");
    props.insert(
        "apiVersion".into(),
        json!({"const": "sandwarden.dev/v1alpha1"}),
    );
    props.insert("kind".into(), json!({"const": kind}));
    props.insert("metadata".into(), json!({"type": "object"}));
    schema["required"]
        .as_array_mut()
        .expect("the top-level schema requires spec")
        .extend([json!("apiVersion"), json!("kind"), json!("metadata")]);
    schema
}

fn strict(schema: &Value) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        let value = match key.as_str() {
            "properties" => Value::Object(
                value
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), strict(v)))
                    .collect(),
            ),
            "items" | "additionalProperties" => strict(value),
            _ => value.clone(),
        };
        out.insert(key.clone(), value);
    }
    if out.get("nullable") == Some(&json!(true))
        && let Some(t) = out.get("type").cloned()
    {
        out.insert("type".into(), json!([t, "null"]));
    }
    let preserves = out.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if out.contains_key("properties") && !preserves && !out.contains_key("additionalProperties") {
        out.insert("additionalProperties".into(), json!(false));
    }
    Value::Object(out)
}

/// The schema errors of one sandwarden.dev resource, each with the path of the field.
fn schema_errors(schemas: &BTreeMap<String, Value>, doc: &Value) -> Vec<String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let Some(schema) = schemas.get(kind) else {
        return vec![format!("no CRD in crds/ defines kind {kind:?}")];
    };
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .expect("the CRD schema compiles as JSON Schema");
    validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Reads `value` into `T` and writes it back: anything that does not come back unchanged is a
/// field the type does not know (k8s-openapi ignores unknown fields when reading).
fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
    value: &Value,
) -> Result<(), String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(value, &back, "") {
        None => Ok(()),
        Some(path) => Err(format!(
            "{path} does not survive a read and write: is it misspelt or misplaced?"
        )),
    }
}

fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => x
            .iter()
            .find_map(|(k, v)| match y.get(k) {
                Some(w) => first_difference(v, w, &format!("{path}.{k}")),
                None => Some(format!("{path}.{k}")),
            })
            .or_else(|| {
                y.keys()
                    .find(|k| !x.contains_key(*k))
                    .map(|k| format!("{path}.{k} (added)"))
            }),
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(if path.is_empty() {
            ".".into()
        } else {
            path.into()
        }),
    }
}

/// Checks one sandwarden.dev resource: the CRD schema, then the Rust types (and, for a
/// template, that its Pod template is a Pod template).
fn check_custom_resource(schemas: &BTreeMap<String, Value>, doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use sandwarden::k8s::crd::{Sandbox, SandboxTemplate, SandboxWarmPool};
    let errors = schema_errors(schemas, doc);
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    round_trip::<ObjectMeta>(&doc["metadata"]).map_err(|e| format!("metadata: {e}"))?;
    let read = match doc["kind"].as_str() {
        Some("SandboxTemplate") => {
            if let Some(pod) = doc["spec"].get("podTemplate") {
                round_trip::<PodTemplateSpec>(pod).map_err(|e| format!("spec.podTemplate: {e}"))?;
            }
            serde_json::from_value::<SandboxTemplate>(doc.clone()).map(drop)
        }
        Some("Sandbox") => serde_json::from_value::<Sandbox>(doc.clone()).map(drop),
        Some("SandboxWarmPool") => serde_json::from_value::<SandboxWarmPool>(doc.clone()).map(drop),
        other => return Err(format!("unknown sandwarden.dev kind {other:?}")),
    };
    read.map_err(|e| format!("does not read into the Rust type: {e}"))
}

fn is_custom(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("sandwarden.dev/"))
}

/// Checks one built-in resource against its k8s-openapi type.
fn check_builtin(doc: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps, core, networking, policy, rbac};
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<core::v1::Namespace>(doc),
        ("v1", "ServiceAccount") => round_trip::<core::v1::ServiceAccount>(doc),
        ("v1", "Service") => round_trip::<core::v1::Service>(doc),
        ("v1", "PersistentVolumeClaim") => round_trip::<core::v1::PersistentVolumeClaim>(doc),
        ("v1", "ConfigMap") => round_trip::<core::v1::ConfigMap>(doc),
        ("apps/v1", "Deployment") => round_trip::<apps::v1::Deployment>(doc),
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<rbac::v1::Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<rbac::v1::RoleBinding>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<policy::v1::PodDisruptionBudget>(doc),
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            round_trip::<networking::v1::NetworkPolicy>(doc)
        }
        // A Secret in manifests/ would be a committed secret: the operator creates them.
        _ => Err(format!(
            "{api_version} {kind} is not a kind this test knows: add it to check_builtin"
        )),
    }
}

#[test]
fn every_sandwarden_resource_in_manifests_and_docs_matches_its_crd_schema() {
    let schemas = crd_schemas();
    let manifests: Vec<Doc> = manifest_docs()
        .into_iter()
        .filter(|d| is_custom(&d.value))
        .collect();
    let docs: Vec<Doc> = docs_yaml_blocks()
        .into_iter()
        .filter(|d| is_custom(&d.value))
        .collect();
    // The defaults: seven templates and a warm pool; the docs show at least one of each kind.
    let count = |set: &[Doc], kind: &str| set.iter().filter(|d| d.value["kind"] == kind).count();
    assert_eq!(count(&manifests, "SandboxTemplate"), 7, "default templates");
    assert!(
        count(&manifests, "SandboxWarmPool") >= 1,
        "a default warm pool"
    );
    for kind in ["Sandbox", "SandboxTemplate", "SandboxWarmPool"] {
        assert!(
            count(&docs, kind) >= 1,
            "no {kind} example in README.md or docs/"
        );
    }
    assert_all_pass(manifests.iter().chain(&docs), |doc| {
        check_custom_resource(&schemas, doc)
    });
}

/// Runs `check` on every document and fails listing every one that does not pass.
fn assert_all_pass<'a>(
    docs: impl IntoIterator<Item = &'a Doc>,
    check: impl Fn(&Value) -> Result<(), String>,
) {
    let failures: Vec<String> = docs
        .into_iter()
        .filter_map(|d| check(&d.value).err().map(|e| format!("{}: {e}", d.origin)))
        .collect();
    assert!(
        failures.is_empty(),
        "invalid resources:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_builtin_resource_in_manifests_reads_into_its_kubernetes_type_unchanged() {
    let docs: Vec<Doc> = manifest_docs()
        .into_iter()
        .filter(|d| !is_custom(&d.value))
        .collect();
    assert!(
        docs.len() >= 10,
        "found only {} built-in resources",
        docs.len()
    );
    assert_all_pass(&docs, check_builtin);
}

#[test]
fn a_bad_field_or_value_is_caught() {
    let schemas = crd_schemas();
    let template = |spec: Value| {
        json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxTemplate",
               "metadata": {"name": "t"}, "spec": spec})
    };
    let good = template(json!({"kind": "api", "command": "sandwarden echo-agent"}));
    assert_eq!(check_custom_resource(&schemas, &good), Ok(()));
    let cases = [
        // A misspelt field, at the top of the spec and inside a nested object.
        (
            template(json!({"kind": "api", "comand": "x", "command": "x"})),
            "comand",
        ),
        (
            json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "Sandbox",
                   "metadata": {"name": "s"}, "spec": {"templateRef": {"name": "echo", "nmae": "x"}}}),
            "nmae",
        ),
        // A wrong enum value and a wrong type.
        (template(json!({"kind": "gui", "command": "x"})), "gui"),
        (
            json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxWarmPool",
                   "metadata": {"name": "p"}, "spec": {"templateRef": {"name": "echo"}, "replicas": "2"}}),
            "replicas",
        ),
        // A missing required field, a bad timestamp.
        (
            json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "Sandbox",
                   "metadata": {"name": "s"}, "spec": {}}),
            "templateRef",
        ),
        (
            json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "Sandbox", "metadata": {"name": "s"},
                   "spec": {"templateRef": {"name": "echo"}, "shutdownTime": "tomorrow"}}),
            "tomorrow",
        ),
        // A typo inside the Pod template, which the CRD keeps as an open object.
        (
            template(json!({"kind": "api", "command": "x",
                            "podTemplate": {"spec": {"containers": [{"name": "harness", "resorces": {}}]}}})),
            "resorces",
        ),
        // A field at the top level, and a kind no CRD defines.
        (
            json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "Sandbox", "metadata": {"name": "s"},
                   "spec": {"templateRef": {"name": "echo"}}, "extra": 1}),
            "extra",
        ),
        (
            json!({"apiVersion": "sandwarden.dev/v1alpha1", "kind": "SandboxClaim",
                   "metadata": {"name": "c"}, "spec": {}}),
            "SandboxClaim",
        ),
    ];
    for (doc, needle) in cases {
        let err = check_custom_resource(&schemas, &doc)
            .expect_err(&format!("accepted an invalid resource: {doc}"));
        assert!(
            err.contains(needle),
            "the error for {doc} does not name {needle:?}: {err}"
        );
    }
    // Built-in kinds: a misplaced field and an unknown kind.
    let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c", "imagePullPolicy": "Always"}],
                 "readOnlyRootFilesystem": true}}}});
    let err = check_builtin(&deployment).expect_err("a misplaced field");
    assert!(err.contains("readOnlyRootFilesystem"), "{err}");
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}});
    assert!(check_builtin(&secret).is_err(), "a Secret in manifests/");
}

#[test]
fn yaml_blocks_are_found_in_markdown() {
    let md = "text\n```yaml\na: 1\n---\nb: 2\n```\n```sh\nc: 3\n```\n  ```yml\nd: 4\n  ```\n";
    let docs = yaml_blocks("x.md", md);
    let values: Vec<&Value> = docs.iter().map(|d| &d.value).collect();
    assert_eq!(
        values,
        [&json!({"a": 1}), &json!({"b": 2}), &json!({"d": 4})]
    );
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[test]
fn kustomizations_reference_existing_files_and_every_manifest_is_referenced() {
    let mut files = Vec::new();
    yaml_files(&root().join("manifests"), &mut files);
    let kustomizations: Vec<&PathBuf> = files.iter().filter(|p| is_kustomization(p)).collect();
    assert!(root().join("manifests/kustomization.yaml").is_file());
    let mut referenced = Vec::new();
    let mut problems = Vec::new();
    for k in kustomizations
        .iter()
        .copied()
        .chain([&root().join("crds/kustomization.yaml")])
    {
        let dir = k.parent().expect("a kustomization has a directory");
        for doc in read_docs(k) {
            let v = &doc.value;
            let resources = v["resources"].as_array().into_iter().flatten();
            let patches = v["patches"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| &p["path"]);
            for entry in resources.chain(patches) {
                let Some(name) = entry.as_str() else {
                    problems.push(format!("{}: an entry is not a path: {entry}", doc.origin));
                    continue;
                };
                let target = normalize(&dir.join(name));
                let ok = if target.is_dir() {
                    target.join("kustomization.yaml").is_file()
                } else {
                    target.is_file()
                };
                if !ok {
                    problems.push(format!(
                        "{}: {name} is neither a file nor a directory with a kustomization.yaml",
                        doc.origin
                    ));
                }
                referenced.push(target);
            }
        }
    }
    for f in files.iter().filter(|p| !is_kustomization(p)) {
        if !referenced.contains(&normalize(f)) {
            problems.push(format!(
                "{} is in no kustomization, so never applied",
                relative(f)
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_default_templates_run_what_the_local_built_in_templates_run() {
    let templates: BTreeMap<String, Value> = manifest_docs()
        .into_iter()
        .filter(|d| d.value["kind"] == "SandboxTemplate")
        .map(|d| {
            (
                d.value["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                d.value,
            )
        })
        .collect();
    let builtins = sandwarden::template::builtin_templates();
    assert_eq!(
        templates.keys().collect::<Vec<_>>(),
        {
            let mut names: Vec<&String> = builtins.iter().map(|t| &t.name).collect();
            names.sort();
            names
        },
        "one default SandboxTemplate per built-in template"
    );
    for builtin in &builtins {
        let t = &templates[&builtin.name];
        let spec = &t["spec"];
        assert_eq!(
            spec["kind"],
            builtin.kind.as_str(),
            "{}: kind",
            builtin.name
        );
        assert_eq!(
            spec["start"],
            builtin.start.as_str(),
            "{}: start",
            builtin.name
        );
        // The local shell is the user's $SHELL; a sandbox's is the image's bash.
        if builtin.name != "shell" {
            assert_eq!(
                spec["command"],
                builtin.command.as_str(),
                "{}: command",
                builtin.name
            );
        }
        let env: BTreeMap<&str, &str> = spec["podTemplate"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "harness")
            .flat_map(|c| c["env"].as_array().into_iter().flatten())
            .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
            .collect();
        for (k, v) in &builtin.env {
            assert_eq!(
                env.get(k.as_str()),
                Some(&v.as_str()),
                "{}: env {k}",
                builtin.name
            );
        }
    }
}

#[test]
fn the_serve_deployment_runs_this_version_of_the_base_image() {
    let deployment = manifest_docs()
        .into_iter()
        .find(|d| d.value["kind"] == "Deployment")
        .expect("manifests/ has the serve Deployment");
    let image = &deployment.value["spec"]["template"]["spec"]["containers"][0]["image"];
    let expected = format!("sandwarden/harness-base:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(
        image.as_str(),
        Some(expected.as_str()),
        "the images are tagged with the crate's version (harness-images/build.sh)"
    );
}

/// Why `container` (with the pod-level settings `pod`) breaks the `restricted` Pod Security
/// Standard that manifests/base/namespace.yaml enforces, if it does.
fn restricted_violations(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    c: &k8s_openapi::api::core::v1::Container,
) -> Vec<String> {
    let psc = pod.security_context.clone().unwrap_or_default();
    let sc = c.security_context.clone().unwrap_or_default();
    let mut bad = Vec::new();
    if sc.allow_privilege_escalation != Some(false) {
        bad.push("allowPrivilegeEscalation is not false".to_string());
    }
    if sc.privileged == Some(true) {
        bad.push("privileged".into());
    }
    let caps = sc.capabilities.unwrap_or_default();
    if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
        bad.push("capabilities do not drop ALL".into());
    }
    if caps
        .add
        .unwrap_or_default()
        .iter()
        .any(|a| a != "NET_BIND_SERVICE")
    {
        bad.push("capabilities added".into());
    }
    if sc.run_as_non_root.or(psc.run_as_non_root) != Some(true) {
        bad.push("runAsNonRoot is not true".into());
    }
    if sc.run_as_user.or(psc.run_as_user) == Some(0) {
        bad.push("runs as user 0".into());
    }
    let seccomp = sc.seccomp_profile.or(psc.seccomp_profile).map(|p| p.type_);
    if !matches!(seccomp.as_deref(), Some("RuntimeDefault" | "Localhost")) {
        bad.push("no RuntimeDefault or Localhost seccomp profile".into());
    }
    bad
}

#[test]
fn the_default_templates_make_pods_the_namespace_admits_and_the_network_policy_reaches() {
    use sandwarden::controller::pod::desired_pod;
    use sandwarden::k8s::crd::{Sandbox, SandboxSpec, SandboxTemplate, TemplateRef};
    let docs = manifest_docs();
    let policy = docs
        .iter()
        .find(|d| {
            d.value["kind"] == "NetworkPolicy"
                && d.value["metadata"]["name"] == "sandwarden-sandboxes"
        })
        .expect("the sandboxes' NetworkPolicy");
    let open_ports: Vec<&Value> = policy.value["spec"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["ports"].as_array().into_iter().flatten())
        .map(|p| &p["port"])
        .collect();
    let selector = &policy.value["spec"]["podSelector"]["matchLabels"];
    let mut checked = 0;
    for doc in docs.iter().filter(|d| d.value["kind"] == "SandboxTemplate") {
        let template: SandboxTemplate =
            serde_json::from_value(doc.value.clone()).expect("a default template reads");
        let name = template
            .metadata
            .name
            .clone()
            .expect("a template has a name");
        let mut sandbox = Sandbox::new(
            &format!("{name}-test"),
            SandboxSpec {
                template_ref: TemplateRef { name: name.clone() },
                env: BTreeMap::new(),
                shutdown_time: None,
            },
        );
        sandbox.metadata.namespace = Some("sandwarden".into());
        let pod = desired_pod(&template, &sandbox);
        let spec = pod.spec.expect("a desired Pod has a spec");
        assert!(
            spec.host_network != Some(true)
                && spec.host_pid != Some(true)
                && spec.host_ipc != Some(true),
            "{name}: host namespaces"
        );
        for volume in spec.volumes.iter().flatten() {
            assert!(
                volume.host_path.is_none(),
                "{name}: hostPath volume {}",
                volume.name
            );
        }
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            let bad = restricted_violations(&spec, c);
            assert!(
                bad.is_empty(),
                "{name}: container {}: {}",
                c.name,
                bad.join(", ")
            );
        }
        let labels = pod.metadata.labels.unwrap_or_default();
        for (k, v) in selector.as_object().expect("matchLabels") {
            assert_eq!(
                labels.get(k).map(String::as_str),
                v.as_str(),
                "{name}: label {k}"
            );
        }
        assert!(
            open_ports.contains(&&json!(template.spec.port)),
            "{name}: the harness port {} is not open to serve in the NetworkPolicy",
            template.spec.port
        );
        checked += 1;
    }
    assert_eq!(checked, 7);
}
