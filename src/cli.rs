//! Command-line surface: clap definitions and the dispatch to each subcommand.
//!
//! Every flag can also be set by a `SANDWARDEN_*` environment variable. This module parses and
//! hands over; it holds no logic of its own.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "sandwarden",
    version = sandwarden_harness::binary::BUILD_ID,
    about = "Run AI coding agents in sandboxes behind one API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The orchestrator: the public API, the session store and the sandboxes' runtime.
    Serve(Box<crate::serve::ServeArgs>),
    /// Manage sessions (create, list, get, delete).
    Session {
        #[command(flatten)]
        conn: crate::client::Connection,
        #[command(subcommand)]
        command: crate::client::SessionCommand,
    },
    /// Manage API keys (admin key): create one for a tenant, list them, revoke one.
    Keys {
        #[command(flatten)]
        conn: crate::client::Connection,
        #[command(subcommand)]
        command: crate::client::KeysCommand,
    },
    /// List the harness templates a session can be created from.
    Templates {
        #[command(flatten)]
        conn: crate::client::Connection,
    },
    /// Send one message to an API session and print the reply as it streams.
    Send {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
        /// The message.
        text: String,
    },
    /// Chat with an API session: Enter sends a line; Ctrl-C cancels the running turn, twice
    /// leaves; the agent's questions are answered inline. Ctrl-D leaves.
    Chat {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
    },
    /// Attach this terminal to a terminal (TUI) session. Ctrl-] detaches; when the program
    /// ends, attach exits with its exit status.
    Attach {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
    },
    /// Cancel the turn running in a session.
    Cancel {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
    },
    /// Approve what the agent asked to do (its `input_required` question).
    Approve {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
        /// The question's request id (`send`, `chat` and `events` show it); may be left out
        /// when one question waits.
        request_id: Option<String>,
        /// Allow it for the rest of the session, not just this once.
        #[arg(long)]
        session: bool,
    },
    /// Deny what the agent asked to do.
    Deny {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
        /// The question's request id (`send`, `chat` and `events` show it); may be left out
        /// when one question waits.
        request_id: Option<String>,
    },
    /// Print a session's messages, oldest first.
    History {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
    },
    /// Print a session's events, one JSON object per line.
    Events {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session's id (or name).
        id: String,
        /// Only events after this seq.
        #[arg(long, default_value_t = 0)]
        since: i64,
        /// Keep printing new events as they happen (Ctrl-C ends).
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Print usage per tenant: sessions, turns, tokens, turn and sandbox seconds.
    Usage {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// From this day on (YYYY-MM-DD, UTC).
        #[arg(long)]
        since: Option<String>,
        /// Only this tenant (the admin key; a tenant's key sees its own).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The server inside a sandbox: drives one agent over ACP (api) or one program under a PTY (tui).
    Harness(Box<sandwarden_harness::args::HarnessArgs>),
    /// A deterministic ACP agent over stdio, for tests and for trying sandwarden without a model key.
    EchoAgent,
    /// Point an agent CLI at the model in its environment (OPENAI_* or ANTHROPIC_*), then run it.
    /// The built-in templates use this; see docs/harnesses.md.
    Launch(sandwarden_harness::launch::LaunchArgs),
    /// Used by `serve`: starts a local sandbox's first process inside its cgroups and limits.
    #[command(hide = true)]
    SandboxExec {
        /// A `cgroup.procs` file to join (repeatable).
        #[arg(long = "join")]
        join: Vec<PathBuf>,
        /// This user's process limit (RLIMIT_NPROC) from here on.
        #[arg(long)]
        nproc: Option<u64>,
        /// Stay as the program's parent (bubblewrap with --die-with-parent) instead of becoming it.
        #[arg(long)]
        stay: bool,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Print the API's OpenAPI 3.1 document (generated from the Rust types; the repository
    /// keeps it in docs/openapi.json, served live at /v1/openapi.json).
    Openapi,
    /// Write the CustomResourceDefinitions (generated from the Rust types) as YAML files.
    Crd {
        /// The directory to write them to (the repository keeps them in crds/).
        #[arg(long, env = "SANDWARDEN_CRD_DIR", default_value = "crds")]
        dir: std::path::PathBuf,
    },
}

fn init_tracing() {
    sandwarden_proto::logs::init_with(Box::new(crate::metrics::step_timings()));
}

/// Runs a client command to its end. The runtime is let go without waiting for its blocking
/// threads: one may be parked reading the terminal (chat, attach), which only a key would end.
fn client<T>(command: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(command);
    rt.shutdown_background();
    result
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            init_tracing();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(crate::serve::run(*args))
        }
        Command::Harness(args) => sandwarden_harness::args::run_harness(*args),
        Command::Session { conn, command } => client(crate::client::session(&conn, command)),
        Command::Keys { conn, command } => client(crate::client::keys(&conn, command)),
        Command::Templates { conn } => client(crate::client::templates(&conn)),
        Command::Send { conn, id, text } => client(crate::client::send(&conn, &id, &text)),
        Command::Chat { conn, id } => client(crate::client::chat(&conn, &id)),
        Command::Attach { conn, id } => client(crate::client::attach(&conn, &id)),
        Command::Cancel { conn, id } => client(crate::client::cancel(&conn, &id)),
        Command::Approve {
            conn,
            id,
            request_id,
            session,
        } => {
            let decision = if session {
                crate::client::Decision::ApproveSession
            } else {
                crate::client::Decision::ApproveOnce
            };
            client(crate::client::decide(
                &conn,
                &id,
                request_id.as_deref(),
                decision,
            ))
        }
        Command::Deny {
            conn,
            id,
            request_id,
        } => client(crate::client::decide(
            &conn,
            &id,
            request_id.as_deref(),
            crate::client::Decision::Deny,
        )),
        Command::History { conn, id } => client(crate::client::history(&conn, &id)),
        Command::Events {
            conn,
            id,
            since,
            follow,
        } => client(crate::client::events(&conn, &id, since, follow)),
        Command::Usage {
            conn,
            since,
            tenant,
        } => client(crate::client::usage(
            &conn,
            since.as_deref(),
            tenant.as_deref(),
        )),
        Command::EchoAgent => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(sandwarden_harness::echo_agent::run())
        }
        Command::Launch(args) => Ok(sandwarden_harness::launch::run(args)?),
        Command::SandboxExec {
            join,
            nproc,
            stay,
            argv,
        } => Err(anyhow::anyhow!(
            "sandbox-exec: {}",
            crate::runtime::cgroup::sandbox_exec(&join, nproc, stay, &argv)
        )),
        Command::Openapi => {
            println!("{}", crate::api::openapi::document().to_pretty_json()?);
            Ok(())
        }
        Command::Crd { dir } => {
            std::fs::create_dir_all(&dir)?;
            for (name, yaml) in crate::k8s::crd::crds()? {
                let path = dir.join(name);
                std::fs::write(&path, yaml)?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}
