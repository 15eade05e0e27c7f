//! Every label key, selector and name sandwarden writes on Kubernetes objects and containers,
//! spelled once.

/// The template a sandbox (its Pod, its container) runs.
pub const TEMPLATE: &str = "sandwarden.dev/template";
/// The sandbox a Pod or container belongs to.
pub const SANDBOX: &str = "sandwarden.dev/sandbox";
/// The replica (or `shared`) that owns a container.
pub const OWNER: &str = "sandwarden.dev/owner";
/// The pool a sandbox belongs to, until it is claimed.
pub const POOL_LABEL: &str = "sandwarden.dev/pool";
/// The recommended `app.kubernetes.io/managed-by` label, and sandwarden's value of it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "sandwarden";
/// The selector of every object sandwarden manages.
pub const MANAGED: &str = "app.kubernetes.io/managed-by=sandwarden";
/// The field manager of the controller's server-side applies.
pub const FIELD_MANAGER: &str = "sandwarden-controller";
/// The Lease the controller replicas elect a leader under.
pub const LEASE: &str = "sandwarden-controller";
