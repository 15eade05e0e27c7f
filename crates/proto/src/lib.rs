//! The vocabulary sandwarden's parts share: what the orchestrator (`sandwarden serve`), the server
//! inside each sandbox (`sandwarden-harness`) and the CLI say to each other, and the process edges
//! they have in common.
//!
//! - `event`: turn requests, the events a turn streams, parts, health and bind payloads;
//! - `problem`: the one error shape every HTTP answer uses;
//! - `harness_client`: the orchestrator's client of a harness server, whose `health()` is the
//!   readiness probe;
//! - `kind`: the harness kind (`api`, `tui`) and start mode (`boot`, `bind`);
//! - `http`: the accept loop (bounded slow clients), the listen line and signals;
//! - `logs`: log output, with the wire-logging libraries capped so no level logs a secret.
//!
//! Nothing here knows about Kubernetes, the store or containers: the harness server links this
//! crate and nothing of the orchestrator.

pub mod event;
pub mod harness_client;
pub mod http;
pub mod kind;
pub mod logs;
pub mod problem;
