//! `sandwarden launch PRESET -- PROGRAM ARGS…`: points an agent CLI at the model named in its
//! environment, then becomes that CLI (exec, same process id).
//!
//! The built-in templates run every CLI through this, so the model endpoint, key and name come
//! from the template's and the session's environment and never from code. The CLIs that take
//! their endpoint from the environment (claude-code, claude-agent-acp) need only first-run state;
//! opencode gets a config file, codex gets `-c` overrides. API keys are never written to disk:
//! the configs name the variable that holds the key. It must not know about sessions or servers.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which CLI family a program belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// opencode (`opencode acp`): an OpenAI-compatible provider from `OPENAI_*`.
    Opencode,
    /// claude-code (`claude`) and claude-agent-acp: `ANTHROPIC_*` are read by the CLI itself;
    /// first-run state (onboarding, folder trust, key approval) is seeded in `~/.claude.json`.
    Claude,
    /// codex (`codex`, `codex-acp`): a Responses-API provider from `OPENAI_*`, folder trusted.
    Codex,
}

#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Which CLI family the program belongs to.
    #[arg(value_enum)]
    pub preset: Preset,
    /// The program and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Config(String),
    #[error("writing {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot run {program:?}: {source}. Install the harness CLIs with scripts/install-harnesses \
         and put harnesses/node_modules/.bin on PATH (or install {program} on PATH)"
    )]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl LaunchError {
    /// The exit status `sandwarden launch` ends with, as a shell would: 127 when the program was
    /// not found, 126 when it was found but could not be run; the harness server reads 127 as
    /// "the agent CLI is not installed" and reports this error's line as the reason.
    pub fn exit_code(&self) -> Option<u8> {
        match self {
            LaunchError::Exec { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                Some(127)
            }
            LaunchError::Exec { .. } => Some(126),
            _ => None,
        }
    }
}

/// Names the file holding the session's standing instructions, when it has any: the harness
/// server writes the file and sets this for the agent it starts.
pub const INSTRUCTIONS_FILE_ENV: &str = "SANDWARDEN_INSTRUCTIONS_FILE";

/// Default endpoint when only a key and a model are given.
const OPENAI_DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The provider id the generated configs use.
const PROVIDER: &str = "sandwarden";

/// What to do before exec: files to write, variables to set, arguments to append.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub files: Vec<(PathBuf, String)>,
    pub env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
}

/// The OpenAI-style model settings, if any were given.
struct OpenAiModel {
    base_url: String,
    model: String,
}

fn openai_model(env: &BTreeMap<String, String>) -> Result<Option<OpenAiModel>, LaunchError> {
    let get = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let (base_url, key, model) = (
        get("OPENAI_BASE_URL"),
        get("OPENAI_API_KEY"),
        get("OPENAI_MODEL"),
    );
    if base_url.is_none() && key.is_none() && model.is_none() {
        return Ok(None); // the CLI's own configuration applies
    }
    let Some(model) = model else {
        return Err(LaunchError::Config(
            "OPENAI_BASE_URL or OPENAI_API_KEY is set but OPENAI_MODEL is not: set OPENAI_MODEL \
             to the model's name (in the template's env or the session's env)"
                .into(),
        ));
    };
    if key.is_none() {
        return Err(LaunchError::Config(
            "OPENAI_MODEL is set but OPENAI_API_KEY is not: pass the provider's key as \
             OPENAI_API_KEY in the session's env (any non-empty value for a local model)"
                .into(),
        ));
    }
    let base_url = base_url.unwrap_or_else(|| OPENAI_DEFAULT_BASE_URL.to_string());
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(LaunchError::Config(format!(
            "OPENAI_BASE_URL must be an http(s) URL such as {OPENAI_DEFAULT_BASE_URL}, got {base_url:?}"
        )));
    }
    Ok(Some(OpenAiModel {
        base_url: base_url.trim_end_matches('/').to_string(),
        model,
    }))
}

/// What `plan` reads besides the environment: the home and working directories, an existing
/// `~/.claude.json`, and the session's instructions (read from `INSTRUCTIONS_FILE_ENV`'s file).
#[derive(Debug)]
pub struct Found<'a> {
    pub home: &'a Path,
    pub cwd: &'a Path,
    pub claude_json: Option<&'a str>,
    pub instructions: Option<&'a str>,
}

/// Decides what `preset` needs, from the environment and what was `found` (pure).
pub fn plan(
    preset: Preset,
    env: &BTreeMap<String, String>,
    found: &Found<'_>,
) -> Result<Plan, LaunchError> {
    let (home, cwd, claude_json) = (found.home, found.cwd, found.claude_json);
    let mut plan = Plan::default();
    match preset {
        Preset::Opencode => {
            // opencode reads standing instructions from the files its config lists.
            let instructions = env
                .get(INSTRUCTIONS_FILE_ENV)
                .filter(|_| found.instructions.is_some())
                .map(|path| json!([path]));
            if let Some(m) = openai_model(env)? {
                let config = json!({
                    "$schema": "https://opencode.ai/config.json",
                    "provider": { PROVIDER: {
                        "npm": "@ai-sdk/openai-compatible",
                        "name": PROVIDER,
                        // opencode substitutes {env:NAME} itself: the key stays off the disk.
                        "options": { "baseURL": m.base_url, "apiKey": "{env:OPENAI_API_KEY}" },
                        "models": { m.model.clone(): { "name": m.model, "tool_call": true } },
                    }},
                    "model": format!("{PROVIDER}/{}", m.model),
                    "small_model": format!("{PROVIDER}/{}", m.model),
                    "autoupdate": false,
                    "share": "disabled",
                    "instructions": instructions,
                });
                plan.opencode_config(home, config);
            } else if let Some(instructions) = instructions {
                plan.opencode_config(home, json!({ "instructions": instructions }));
            }
        }
        Preset::Claude => {
            let mut state: Value = claude_json
                .and_then(|s| serde_json::from_str(s).ok())
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            state["hasCompletedOnboarding"] = json!(true);
            state["bypassPermissionsModeAccepted"] = json!(true);
            if state.get("theme").is_none() {
                state["theme"] = json!("dark");
            }
            // The TUI asks once whether to use a custom key; it remembers the answer by the
            // key's last 20 characters, as it does when a user says yes.
            if let Some(key) = env.get("ANTHROPIC_API_KEY").filter(|k| !k.is_empty()) {
                let tail: String = {
                    let chars: Vec<char> = key.chars().collect();
                    chars[chars.len().saturating_sub(20)..].iter().collect()
                };
                let approved = &mut state["customApiKeyResponses"]["approved"];
                if !approved.is_array() {
                    *approved = json!([]);
                }
                if let Some(list) = approved.as_array_mut()
                    && !list.iter().any(|v| v == &json!(tail))
                {
                    list.push(json!(tail));
                }
                if !state["customApiKeyResponses"]["rejected"].is_array() {
                    state["customApiKeyResponses"]["rejected"] = json!([]);
                }
            }
            let project = &mut state["projects"][cwd.display().to_string()];
            project["hasTrustDialogAccepted"] = json!(true);
            if !project["allowedTools"].is_array() {
                project["allowedTools"] = json!([]);
            }
            plan.files.push((home.join(".claude.json"), pretty(&state)));
        }
        Preset::Codex => {
            if let Some(m) = openai_model(env)? {
                let provider = json!({
                    "name": PROVIDER,
                    "base_url": m.base_url,
                    "env_key": "OPENAI_API_KEY",
                    "wire_api": "responses",
                });
                for (key, value) in [
                    ("model_provider", toml_value(&json!(PROVIDER))),
                    ("model", toml_value(&json!(m.model))),
                    (
                        &format!("model_providers.{PROVIDER}") as &str,
                        toml_value(&provider),
                    ),
                ] {
                    plan.extra_args.push("-c".into());
                    plan.extra_args.push(format!("{key}={value}"));
                }
            }
            // A trusted folder: no first-run prompt. An inline table, so a path with dots in it
            // is one key.
            let trusted = json!({ cwd.display().to_string(): { "trust_level": "trusted" } });
            plan.extra_args.push("-c".into());
            plan.extra_args
                .push(format!("projects={}", toml_value(&trusted)));
            // codex adds `developer_instructions` to its own as a developer message.
            if let Some(text) = found.instructions {
                plan.extra_args.push("-c".into());
                plan.extra_args
                    .push(format!("developer_instructions={}", toml_string(text)));
            }
        }
    }
    Ok(plan)
}

impl Plan {
    /// opencode's config file, named by `OPENCODE_CONFIG` (merged over the user's own).
    fn opencode_config(&mut self, home: &Path, mut config: Value) {
        if let Some(map) = config.as_object_mut() {
            map.retain(|_, v| !v.is_null());
        }
        let path = home.join(".config/sandwarden/opencode.json");
        self.env
            .push(("OPENCODE_CONFIG".into(), path.display().to_string()));
        self.files.push((path, pretty(&config)));
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// A JSON value written as a TOML value (strings, numbers, booleans, arrays, inline tables).
fn toml_value(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let items: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{} = {}", toml_string(k), toml_value(v)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::String(s) => toml_string(s),
        Value::Null => "\"\"".into(),
        other => other.to_string(),
    }
}

/// A TOML basic string: JSON string escapes are valid TOML escapes; DEL, which JSON leaves
/// as it is and TOML does not take raw, is escaped too.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s)
        .unwrap_or_else(|_| "\"\"".into())
        .replace('\u{7f}', "\\u007F")
}

/// Writes the plan's files, then replaces this process with the program. Returns only on error.
pub fn run(args: LaunchArgs) -> Result<(), LaunchError> {
    use std::os::unix::process::CommandExt;
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let home = env
        .get("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            LaunchError::Config("HOME is not set: the agent's config lives under HOME".into())
        })?;
    let cwd = std::env::current_dir().map_err(|e| LaunchError::Config(format!("no cwd: {e}")))?;
    let claude_path = home.join(".claude.json");
    let existing = match args.preset {
        Preset::Claude => std::fs::read_to_string(&claude_path).ok(),
        _ => None,
    };
    let instructions = match env.get(INSTRUCTIONS_FILE_ENV) {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            LaunchError::Config(format!(
                "{INSTRUCTIONS_FILE_ENV} names {path:?}, which cannot be read: {e}"
            ))
        })?),
        None => None,
    };
    let found = Found {
        home: &home,
        cwd: &cwd,
        claude_json: existing.as_deref(),
        instructions: instructions.as_deref(),
    };
    let plan = plan(args.preset, &env, &found)?;
    for (path, content) in &plan.files {
        write_private(path, content).map_err(|source| LaunchError::Write {
            path: path.clone(),
            source,
        })?;
    }
    let Some((program, rest)) = args.command.split_first() else {
        return Err(LaunchError::Config(
            "no program given: sandwarden launch PRESET -- PROGRAM [ARGS]".into(),
        ));
    };
    let source = std::process::Command::new(program)
        .args(rest)
        .args(&plan.extra_args)
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .exec();
    Err(LaunchError::Exec {
        program: program.clone(),
        source,
    })
}

/// Writes `content` readable by the owner only (the files may name endpoints and keys' owners).
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const KEY: &str = "sk-secret-value-0123456789abcdefghij";

    /// What `plan` finds with home `/h` and working directory `cwd`, and nothing else.
    fn at(cwd: &'static str) -> Found<'static> {
        Found {
            home: Path::new("/h"),
            cwd: Path::new(cwd),
            claude_json: None,
            instructions: None,
        }
    }

    #[test]
    fn instructions_reach_opencode_through_its_config_and_codex_as_developer_instructions() {
        let text = "Answer in \"French\".\nNever delete files.";
        let file = "/h/.config/sandwarden/instructions.md";
        let found = Found {
            instructions: Some(text),
            ..at("/w")
        };
        let e = env(&[(INSTRUCTIONS_FILE_ENV, file)]);
        // opencode without model settings: a config with the instructions only.
        let p = plan(Preset::Opencode, &e, &found).expect("plan");
        let v: Value = serde_json::from_str(&p.files[0].1).expect("json");
        assert_eq!(v, json!({ "instructions": [file] }));
        let e = env(&[
            (INSTRUCTIONS_FILE_ENV, file),
            ("OPENAI_API_KEY", KEY),
            ("OPENAI_MODEL", "m-1"),
        ]);
        let p = plan(Preset::Opencode, &e, &found).expect("plan");
        let v: Value = serde_json::from_str(&p.files[0].1).expect("json");
        assert_eq!(v["instructions"], json!([file]));
        assert_eq!(v["model"], "sandwarden/m-1");
        let p = plan(Preset::Codex, &e, &found).expect("plan");
        let args = p.extra_args.join(" ");
        assert!(
            args.contains(r#"developer_instructions="Answer in \"French\".\nNever delete files.""#),
            "{args}"
        );
        // Without instructions neither gets any.
        let p = plan(Preset::Opencode, &env(&[]), &at("/w")).expect("plan");
        assert!(p.files.is_empty());
        let p = plan(Preset::Codex, &env(&[]), &at("/w")).expect("plan");
        assert!(!p.extra_args.join(" ").contains("instructions"));
    }

    #[test]
    fn opencode_gets_a_provider_config_that_names_the_key_variable_only() {
        let e = env(&[
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1/"),
            ("OPENAI_API_KEY", KEY),
            ("OPENAI_MODEL", "m-1"),
        ]);
        let p = plan(Preset::Opencode, &e, &at("/w")).expect("plan");
        assert_eq!(p.files.len(), 1);
        let (path, text) = &p.files[0];
        assert_eq!(path, Path::new("/h/.config/sandwarden/opencode.json"));
        assert!(!text.contains(KEY), "the key is never written");
        let v: Value = serde_json::from_str(text).expect("json");
        assert_eq!(
            v["provider"]["sandwarden"]["options"]["baseURL"],
            "http://127.0.0.1:9/v1"
        );
        assert_eq!(v["model"], "sandwarden/m-1");
        assert_eq!(
            p.env,
            vec![(
                "OPENCODE_CONFIG".to_string(),
                "/h/.config/sandwarden/opencode.json".to_string()
            )]
        );
    }

    #[test]
    fn without_model_settings_the_clis_own_config_applies() {
        for preset in [Preset::Opencode, Preset::Codex] {
            let p = plan(preset, &env(&[]), &at("/w")).expect("plan");
            assert!(p.files.is_empty() && p.env.is_empty());
        }
    }

    #[test]
    fn half_given_model_settings_say_what_is_missing() {
        let e = env(&[("OPENAI_API_KEY", KEY)]);
        let err = plan(Preset::Codex, &e, &at("/w"))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("OPENAI_MODEL") && !err.contains(KEY), "{err}");
        let e = env(&[("OPENAI_MODEL", "m")]);
        let err = plan(Preset::Opencode, &e, &at("/w"))
            .expect_err("refused")
            .to_string();
        assert!(err.contains("OPENAI_API_KEY"), "{err}");
        let e = env(&[
            ("OPENAI_MODEL", "m"),
            ("OPENAI_API_KEY", "k"),
            ("OPENAI_BASE_URL", "localhost:1"),
        ]);
        assert!(plan(Preset::Codex, &e, &at("/w")).is_err());
    }

    #[test]
    fn codex_gets_overrides_for_provider_model_and_a_trusted_folder() {
        let e = env(&[
            ("OPENAI_BASE_URL", "http://127.0.0.1:9/v1"),
            ("OPENAI_API_KEY", KEY),
            ("OPENAI_MODEL", "m-1"),
        ]);
        let p = plan(Preset::Codex, &e, &at("/tmp/.x y")).expect("plan");
        let args = p.extra_args.join(" ");
        assert!(!args.contains(KEY), "{args}");
        assert!(args.contains(r#"model_provider="sandwarden""#), "{args}");
        assert!(args.contains(r#"model="m-1""#), "{args}");
        assert!(
            args.contains(r#"model_providers.sandwarden={ "name" = "sandwarden", "base_url" = "http://127.0.0.1:9/v1", "env_key" = "OPENAI_API_KEY", "wire_api" = "responses" }"#),
            "{args}"
        );
        assert!(
            args.contains(r#"projects={ "/tmp/.x y" = { "trust_level" = "trusted" } }"#),
            "{args}"
        );
    }

    #[test]
    fn claude_state_is_seeded_and_merged_with_what_exists() {
        let e = env(&[("ANTHROPIC_API_KEY", KEY)]);
        let existing = r#"{"theme":"light","projects":{"/old":{"x":1}},"numStartups":3}"#;
        let p = plan(
            Preset::Claude,
            &e,
            &Found {
                claude_json: Some(existing),
                ..at("/w")
            },
        )
        .expect("plan");
        let (path, text) = &p.files[0];
        assert_eq!(path, Path::new("/h/.claude.json"));
        assert!(!text.contains(KEY), "only the key's tail is remembered");
        let v: Value = serde_json::from_str(text).expect("json");
        assert_eq!(v["hasCompletedOnboarding"], true);
        assert_eq!(v["theme"], "light");
        assert_eq!(v["numStartups"], 3);
        assert_eq!(v["projects"]["/old"]["x"], 1);
        assert_eq!(v["projects"]["/w"]["hasTrustDialogAccepted"], true);
        assert_eq!(
            v["customApiKeyResponses"]["approved"],
            json!(["0123456789abcdefghij"])
        );
    }
}
