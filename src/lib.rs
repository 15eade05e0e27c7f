//! sandwarden: runs AI coding agents in sandboxes and gives clients one API to reach them.
//!
//! `main.rs` only parses arguments; everything else lives here so tests can reach it. Layers, top
//! to bottom (imports point down): `cli` → `api` → `session` → `runtime`, `store` → `egress`,
//! `pool`, `metrics` → the vocabulary (`sandwarden-proto`: `event`, `problem`, `harness_client`,
//! `http`, `logs`). The in-sandbox server (`sandwarden-harness`, with the echo agent and
//! `launch`) is its own crate and depends on the vocabulary alone; this crate links it for the
//! `sandwarden harness`, `echo-agent` and `launch` commands.

pub mod api;
pub mod cli;
pub mod client;
pub mod controller;
pub mod egress;
pub mod k8s;
pub mod metrics;
pub mod pool;
pub mod procfs;
pub mod runtime;
pub mod serve;
pub mod session;
pub mod status;
pub mod store;
pub mod template;
pub mod tokens;
