//! `sandwarden-fake-model`: a scriptable stand-in for the Anthropic Messages, OpenAI Chat
//! Completions and OpenAI Responses APIs on loopback, so real agent CLIs run offline in tests.
//!
//! It answers from the conversation alone (directives in the last user message, see
//! `docs/fake-model.md`), logs every request, and never runs the tools it asks for nor calls a
//! real model. It depends on nothing of the orchestrator.
//!
//! Layout: the pure middle, a file each (`read`: a request into a [`Conversation`]; `decide`: an
//! [`Answer`]; `render`: one provider's JSON or SSE frames), has unit tests (`tests`); `http`
//! only extracts, records and sends.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// The model id listed by `/v1/models` and used when a request names none.
pub const MODEL: &str = "fake-model";
/// The start of every default reply.
pub const GREETING: &str = "Hello from the fake model!";
/// The reply once a tool result comes back.
pub const TOOL_DONE: &str = "Tool done.";
/// The reply to a title-generation request.
pub const TITLE: &str = "Fake session title";
/// Longest a `SLOW` reply may stream, in total.
pub const SLOW_MAX_TOTAL: Duration = Duration::from_secs(60);
/// Deltas a plain reply is split into.
const TEXT_DELTAS: usize = 4;
/// Pieces a tool call's JSON arguments are streamed in.
const ARG_DELTAS: usize = 3;
/// Longest prompt echo in a default reply, in characters.
const ECHO_MAX_CHARS: usize = 200;
/// Longest non-JSON body kept in the request log, in characters.
const LOGGED_RAW_BODY_CHARS: usize = 4096;

#[derive(Debug, Clone, clap::Args)]
pub struct FakeModelArgs {
    /// Address to listen on, loopback only (port 0 picks a free port; the chosen address is
    /// printed on stdout as `{"listening":"127.0.0.1:PORT"}`).
    #[arg(
        long,
        env = "SANDWARDEN_FAKE_MODEL_LISTEN",
        default_value = "127.0.0.1:0"
    )]
    pub listen: SocketAddr,
    /// Append every request as one JSON line to this file.
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_LOG")]
    pub log: Option<PathBuf>,
    /// How many recent requests `GET /_fake/requests` keeps.
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_KEEP", default_value_t = 1000)]
    pub keep: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Allow a non-loopback `--listen`: only inside a container, whose network is private to
    /// the sandboxes (how the container tests reach it from harness containers).
    #[arg(long, env = "SANDWARDEN_FAKE_MODEL_IN_CONTAINER")]
    pub in_container: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FakeModelError {
    #[error(
        "--listen {0} is not a loopback address: the fake model only listens on 127.0.0.1 or ::1 \
         (inside a container, add --in-container)"
    )]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the request log {}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

mod decide;
mod http;
mod read;
mod render;
#[cfg(test)]
mod tests;

pub use decide::*;
pub use http::*;
pub use read::*;
pub use render::*;
