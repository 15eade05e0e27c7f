//! sandwarden: runs AI coding agents in sandboxes and gives clients one API to reach them.
//!
//! `main.rs` only parses arguments; everything else lives here so tests can reach it.

pub mod bench;
pub mod cli;
pub mod echo_agent;
pub mod event;
pub mod harness;
pub mod harness_client;
pub mod problem;
