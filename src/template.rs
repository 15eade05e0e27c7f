//! Templates: what a sandbox runs (the agent or program, its kind, its start mode, its pool, its
//! limits and environment), the built-in ones and their checks. Every runtime starts sandboxes
//! from them and the orchestrator creates sessions from them; a template knows nothing of
//! either.

use sandwarden_proto::kind::{HarnessKind, StartMode};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest a session may sit idle before it is reaped, and the longest turn timeout a
/// template may set: 30 days, in seconds.
pub const MAX_IDLE_TIMEOUT_S: u64 = 30 * 24 * 3600;

/// What a sandbox runs. Built-ins cover the echo agent, a shell and the supported CLIs; a JSON
/// file given with `--templates` adds or replaces templates by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    /// `api` (ACP agent over stdio) or `tui` (program under a PTY).
    pub kind: HarnessKind,
    /// The agent's or program's command line.
    pub command: String,
    /// `boot`: start the agent with the sandbox (fastest first turn); `bind`: start it when a
    /// session claims the sandbox (per-session env reaches it without a restart).
    #[serde(default)]
    pub start: StartMode,
    /// Warm sandboxes kept ready for new sessions.
    #[serde(default)]
    pub pool: usize,
    /// Idle sessions are reaped after this many seconds without a message or terminal.
    #[serde(default = "default_idle")]
    pub idle_timeout_s: u64,
    /// Longest turn, in seconds.
    #[serde(default = "default_turn_timeout")]
    pub turn_timeout_s: u64,
    /// Non-secret environment for every sandbox of this template.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How the docker runtime runs it; its memory, CPU and process limits bound local
    /// sandboxes too (through cgroups, where `serve` may make them).
    #[serde(default)]
    pub container: ContainerSpec,
    /// The packages its image provides, by package manager (`apt`, `npm`, `pip`, …): what a
    /// client may ask an environment to have (the vendor APIs' `packages`) and get.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub packages: BTreeMap<String, Vec<String>>,
}

/// A template's container settings; the defaults are the secure ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerSpec {
    /// The harness image (default `sandwarden/harness-<template>:<version>`).
    pub image: Option<String>,
    /// `uid:gid` the harness runs as; never root unless set so.
    pub user: String,
    pub memory_mib: u64,
    pub cpus: f64,
    pub pids: i64,
    /// Read-only root file system (the working directory `/work` and `/tmp` stay writable).
    pub read_only: bool,
}

impl Default for ContainerSpec {
    fn default() -> Self {
        ContainerSpec {
            image: None,
            user: "10001:10001".into(),
            memory_mib: 2048,
            cpus: 1.0,
            pids: 512,
            read_only: true,
        }
    }
}

impl Template {
    /// The harness server's own flags for this template, listening on `listen` with `workdir` as
    /// the working directory. Every runtime starts the same ones: local sandboxes after the
    /// harness program, containers and Pods as the arguments to the images' entrypoint
    /// (`sandwarden-harness`).
    pub fn harness_flags(&self, listen: &str, workdir: &str) -> Vec<String> {
        let agent_or_command = match self.kind {
            HarnessKind::Api => "--agent",
            HarnessKind::Tui => "--command",
        };
        [
            "--listen",
            listen,
            "--kind",
            self.kind.as_str(),
            agent_or_command,
            &self.command,
            "--workdir",
            workdir,
            "--start",
            self.start.as_str(),
            "--turn-timeout",
            &self.turn_timeout_s.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The image the docker runtime starts for this template.
    pub fn image(&self) -> String {
        self.container.image.clone().unwrap_or_else(|| {
            format!(
                "sandwarden/harness-{}:{}",
                self.name,
                env!("CARGO_PKG_VERSION")
            )
        })
    }
}

fn default_idle() -> u64 {
    3600
}
fn default_turn_timeout() -> u64 {
    1800
}

impl Template {
    fn new(name: &str, kind: HarnessKind, command: &str, pool: usize) -> Template {
        Template {
            name: name.into(),
            kind,
            command: command.into(),
            start: StartMode::Boot,
            pool,
            idle_timeout_s: default_idle(),
            turn_timeout_s: default_turn_timeout(),
            env: BTreeMap::new(),
            container: ContainerSpec::default(),
            packages: BTreeMap::new(),
        }
    }

    fn with_env(mut self, vars: &[(&str, &str)]) -> Template {
        self.env
            .extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Checks a template from a config file; the message names the template and the field.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        sandwarden_proto::event::validate_id("template name", n)?;
        sandwarden_harness::process::parse_command_line(&self.command)
            .map_err(|e| format!("template {n}: command: {e}"))?;
        if self.pool > 100 {
            return Err(format!("template {n}: pool is at most 100"));
        }
        if self.turn_timeout_s == 0 || self.idle_timeout_s == 0 {
            return Err(format!("template {n}: timeouts must be at least 1 second"));
        }
        if self.turn_timeout_s > MAX_IDLE_TIMEOUT_S || self.idle_timeout_s > MAX_IDLE_TIMEOUT_S {
            return Err(format!(
                "template {n}: timeouts are at most {MAX_IDLE_TIMEOUT_S} seconds (30 days)"
            ));
        }
        let c = &self.container;
        if !(16..=1024 * 1024).contains(&c.memory_mib)
            || !(0.01..=256.0).contains(&c.cpus)
            || !(16..=1_000_000).contains(&c.pids)
        {
            return Err(format!(
                "template {n}: container limits out of range (memory_mib 16..=1048576, cpus 0.01..=256, pids 16..=1000000)"
            ));
        }
        if c.user.trim().is_empty() {
            return Err(format!(
                "template {n}: container.user must be a user, e.g. \"10001:10001\""
            ));
        }
        Ok(())
    }
}

/// The built-in templates. The agent CLIs (opencode, claude-agent-acp, codex-acp, claude, codex)
/// must be on PATH: `scripts/install-harnesses` puts the pinned versions in
/// `harnesses/node_modules/.bin`. Each runs through `sandwarden launch`, which points it at the
/// model named by the template's or session's env (`OPENAI_*` or `ANTHROPIC_*`, docs/harnesses.md);
/// nothing here names a model or an endpoint.
pub fn builtin_templates() -> Vec<Template> {
    let shell = std::env::var("SHELL").unwrap_or_else(|_| "/bin/bash".into());
    // Offline-safe opencode: no self-update, model catalogue fetch, LSP download, default plugin
    // install or share links.
    let opencode_env = [
        ("OPENCODE_DISABLE_AUTOUPDATE", "1"),
        ("OPENCODE_DISABLE_MODELS_FETCH", "1"),
        ("OPENCODE_DISABLE_LSP_DOWNLOAD", "1"),
        ("OPENCODE_DISABLE_DEFAULT_PLUGINS", "1"),
        ("OPENCODE_DISABLE_SHARE", "1"),
    ];
    // No telemetry, update checks or side requests to anthropic.com. IS_SANDBOX=1 says the CLI
    // runs in a sandbox: as root it refuses to skip permissions (claude-code's flag, and the
    // `--allow-dangerously-skip-permissions` claude-agent-acp always passes) without it.
    let claude_env = [
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
        ("IS_SANDBOX", "1"),
    ];
    vec![
        Template::new("echo", HarnessKind::Api, "sandwarden echo-agent", 1),
        Template::new("shell", HarnessKind::Tui, &shell, 0),
        Template::new(
            "opencode",
            HarnessKind::Api,
            "sandwarden launch opencode -- opencode acp",
            0,
        )
        .with_env(&opencode_env),
        Template::new(
            "claude-agent-sdk",
            HarnessKind::Api,
            "sandwarden launch claude -- claude-agent-acp",
            0,
        )
        .with_env(&claude_env),
        // codex's own command sandbox (bubblewrap plus a `codex-linux-sandbox` helper that the
        // codex-acp package does not ship) cannot run here; the sandbox it runs in is the
        // isolation boundary, so commands run unconfined inside it.
        Template::new(
            "codex",
            HarnessKind::Api,
            "sandwarden launch codex -- codex-acp -c sandbox_mode=\"danger-full-access\"",
            0,
        ),
        // Permissions are skipped inside the sandbox (see IS_SANDBOX above).
        Template::new(
            "claude-code",
            HarnessKind::Tui,
            "sandwarden launch claude -- claude --dangerously-skip-permissions",
            0,
        )
        .with_env(&claude_env),
        // Without these flags codex starts an app-server daemon that outlives the TUI, and looks
        // for updates.
        Template::new(
            "codex-tui",
            HarnessKind::Tui,
            "sandwarden launch codex -- codex --disable daemon_auto_start --disable in_app_updates",
            0,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid() {
        for t in builtin_templates() {
            assert_eq!(t.validate(), Ok(()), "{}", t.name);
        }
        let mut bad = builtin_templates()[0].clone();
        bad.command = "\"unclosed".into();
        assert!(bad.validate().is_err());
    }
}
