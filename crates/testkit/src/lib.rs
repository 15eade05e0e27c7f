//! sandwarden's test kit (`publish = false`): the doubles its tests and benchmarks run against,
//! kept out of the product binary.
//!
//! - `fake_kube`: an in-memory Kubernetes API server a `kube::Client` talks to (the controller's
//!   and the Kubernetes runtime's tests and benchmarks).
//! - `fake_model`: a scriptable model server speaking the Anthropic, OpenAI Chat and Responses
//!   APIs, for the real agent CLIs (also the `sandwarden-fake-model` binary; docs/fake-model.md).
//! - `flood`: a client that opens connections and keeps them, as a flooding tenant does.

pub mod fake_kube;
pub mod fake_model;
pub mod flood;
