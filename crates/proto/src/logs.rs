//! The process's log output: the filter `SANDWARDEN_LOG` sets, on stderr, with the HTTP and
//! container-engine client libraries held at `info` whatever it asks.
//!
//! Their `debug` and `trace` output prints what goes over the wire: bollard prints every container
//! definition it sends and every inspect answer it decodes, both with the sandbox's
//! `SANDWARDEN_TOKEN` in the environment; reqwest's verbose connections print raw bytes with the
//! `Authorization` header; the ACP and WebSocket libraries print the messages and terminal bytes
//! they carry, which hold whatever a session's agent says (secrets it was handed among them). No level may put a sandbox token in the logs, so this module must not
//! let an operator's filter lift that cap.

use tracing::{Level, Metadata};

/// The libraries (log targets, with their submodules) whose `debug` and `trace` records may carry
/// request or response bodies or headers.
/// agent-client-protocol prints every JSON-RPC message (prompts, the agent's answers), and
/// tungstenite every terminal frame, at `trace`.
const WIRE_LOGGING_TARGETS: &[&str] = &[
    "bollard",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "agent_client_protocol",
    "tungstenite",
    "tokio_tungstenite",
];

/// Whether a record at `level` from `target` may be written at all: anything at `info` or above,
/// and anything from a target that is not a wire-logging library.
pub fn may_log(target: &str, level: Level) -> bool {
    level <= Level::INFO
        || !WIRE_LOGGING_TARGETS.iter().any(|lib| {
            target
                .strip_prefix(lib)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// Logs to stderr (stdout carries machine-readable output, such as the harness's listen line),
/// filtered by `SANDWARDEN_LOG` (default `info`) and by `may_log`.
pub fn init() {
    init_with(Box::new(tracing_subscriber::layer::Identity::new()));
}

/// `init`, with `extra` beside the log output (a layer with a filter of its own, such as one that
/// turns spans into metrics).
pub fn init_with(
    extra: Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>,
) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, filter_fn};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let asked =
        EnvFilter::try_from_env("SANDWARDEN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // The cap's hint says "any level" so that the pair keeps the asked filter's hint (the most
    // verbose level any record can pass), which spares the rest from being built at all.
    let cap = filter_fn(|m: &Metadata<'_>| may_log(m.target(), *m.level()))
        .with_max_level_hint(LevelFilter::TRACE);
    let filter = asked.and(cap);
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log write that fails (stderr a file on a full disk) is dropped: reporting it goes
        // through eprintln!, which panics the task that logged, e.g. a request's handler.
        .log_internal_errors(false)
        .with_filter(filter);
    let _ = tracing_subscriber::registry()
        .with(extra)
        .with(output)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_logging_libraries_log_at_info_and_above_only() {
        for target in [
            "bollard",
            "bollard::docker",
            "bollard::read",
            "hyper_util::client",
            "reqwest::connect::verbose",
            "h2::codec",
        ] {
            assert!(!may_log(target, Level::DEBUG), "{target}");
            assert!(!may_log(target, Level::TRACE), "{target}");
            assert!(may_log(target, Level::INFO), "{target}");
            assert!(may_log(target, Level::WARN), "{target}");
        }
    }

    #[test]
    fn other_targets_keep_every_level() {
        for target in [
            "sandwarden::runtime::docker",
            "sandwarden",
            "bollardish",
            "hyperion",
            "log",
        ] {
            assert!(may_log(target, Level::TRACE), "{target}");
            assert!(may_log(target, Level::DEBUG), "{target}");
        }
    }
}
