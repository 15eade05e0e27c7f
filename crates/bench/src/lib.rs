//! sandwarden's benchmarks (`sandwarden-bench SCENARIO`): measurements taken side by side in one
//! run, reported as percentiles and ratios. docs/benchmarks.md has the figures and commands.

pub mod bench;
pub mod claims;
pub mod controller;
pub mod density;
pub mod docker;
pub mod flood;
pub mod harnesses;
pub mod history;
pub mod isolation;
pub mod mounts;
pub mod nginx;
pub mod peers;
pub mod postgres;
pub mod serve;
pub mod steps;
pub mod tty;
pub mod vendors;
