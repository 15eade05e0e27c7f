//! sandwarden: runs AI coding agents in sandboxes and gives clients one API to reach them.
//!
//! `main.rs` only parses arguments; everything else lives here so tests can reach it. Layers, top
//! to bottom (imports point down): `cli` → `api` → `session` → `runtime`, `store`,
//! `harness_client` → `egress`, `pool`, `metrics`, `event`, `problem`. The in-sandbox `harness` server depends
//! only on `event` and `problem`.

pub mod api;
pub mod bench;
pub mod bench_claims;
pub mod bench_controller;
pub mod bench_density;
pub mod bench_docker;
pub mod bench_flood;
pub mod bench_harnesses;
mod bench_history;
mod bench_isolation;
mod bench_nginx;
pub mod bench_postgres;
pub mod bench_serve;
mod bench_tty;
pub mod cli;
pub mod client;
pub mod controller;
pub mod crd;
pub mod echo_agent;
pub mod egress;
pub mod event;
pub mod fake_kube;
pub mod fake_model;
pub mod harness;
pub mod harness_client;
pub mod http;
pub mod launch;
pub mod logs;
pub mod metrics;
pub mod pool;
pub mod problem;
pub mod procfs;
pub mod runtime;
pub mod serve;
pub mod session;
pub mod store;
