//! The integration suites that need nothing but this machine (processes, bubblewrap, the fake
//! Kubernetes API, the fake model), in one test binary so the suite links once. Each module is
//! one suite: `cargo test --test light tenancy` runs one. The suites that need more (PostgreSQL
//! stopped and started, containers, the agent CLIs, a cluster) or kill `serve` mid-load keep a
//! binary of their own: faults, replicas, docker_runtime, real_harnesses, cluster.

#[path = "../common/mod.rs"]
mod common;

mod agent_exit;
mod auth;
mod cli;
mod console;
mod controller;
mod crds;
mod dead_session;
mod fake_model;
mod files;
mod fuzz;
mod harness_api;
mod harness_tui;
mod hostile;
mod isolation;
mod kubernetes;
mod manifests;
mod openapi;
mod routes;
mod sandbox_boundary;
mod secrets;
mod seed_clients;
mod serve_api;
mod session_logic;
mod tenancy;
mod vendor_sdks;
