//! The Kubernetes controller: reconciles `Sandbox` resources into Pods and keeps warm pools
//! topped up. Reconciling is a pipeline with a pure middle: observe (I/O), decide what should
//! exist (the pure functions here, unit-tested), apply with server-side apply (I/O).
//!
//! It must not know sessions: the API layer claims sandboxes; the controller only runs them.

pub mod pod;
pub mod sandbox;
pub mod warm_pool;

/// The field manager of every server-side apply the controller makes.
pub const FIELD_MANAGER: &str = "sandwarden-controller";
