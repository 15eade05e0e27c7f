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
    /// Send one message and print the reply as it streams.
    Send {
        #[command(flatten)]
        conn: crate::client::Connection,
        /// The session id.
        id: String,
        /// The message.
        text: String,
    },
    /// Chat with a session: each line you type is a message. Ctrl-D ends.
    Chat {
        #[command(flatten)]
        conn: crate::client::Connection,
        id: String,
    },
    /// Attach this terminal to a terminal (TUI) session. Ctrl-] detaches.
    Attach {
        #[command(flatten)]
        conn: crate::client::Connection,
        id: String,
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

fn client_rt() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
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
        Command::Session { conn, command } => {
            client_rt()?.block_on(crate::client::session(&conn, command))
        }
        Command::Keys { conn, command } => {
            client_rt()?.block_on(crate::client::keys(&conn, command))
        }
        Command::Templates { conn } => client_rt()?.block_on(crate::client::templates(&conn)),
        Command::Send { conn, id, text } => {
            client_rt()?.block_on(crate::client::send(&conn, &id, &text))
        }
        Command::Chat { conn, id } => client_rt()?.block_on(crate::client::chat(&conn, &id)),
        Command::Attach { conn, id } => client_rt()?.block_on(crate::client::attach(&conn, &id)),
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
