//! Which program runs a local sandbox's harness server. `sandwarden harness` works everywhere,
//! but every process running it maps the whole orchestrator binary: relocating its data alone
//! costs each idle sandbox about 0.6 MiB of private memory. The `sandwarden-harness` binary links
//! only the harness; when it sits next to this binary and was built from the same sources, local
//! sandboxes run it instead. A copy from another build (`cargo build --bin sandwarden` leaves the
//! old one in place) is never used: its API may differ.

use std::path::{Path, PathBuf};
use std::process::Command;

/// This build's identity: the package version and a hash of this crate's and the vocabulary's
/// sources (from `build.rs`); `sandwarden-harness --version` prints it.
pub const BUILD_ID: &str = env!("SANDWARDEN_BUILD_ID");

/// The slim binary's file name.
pub const SLIM: &str = "sandwarden-harness";

/// A program that runs the harness server, and the arguments that go before the harness's own.
#[derive(Debug, Clone, PartialEq)]
pub struct HarnessProgram {
    pub path: PathBuf,
    /// `["harness"]` for the `sandwarden` binary; none for `sandwarden-harness`.
    pub leading: Vec<String>,
}

impl HarnessProgram {
    /// The slim binary next to `me` when it is from this build, else `me harness`.
    pub fn beside(me: &Path) -> HarnessProgram {
        let slim = me.with_file_name(SLIM);
        if slim.is_file() {
            match build_of(&slim) {
                Some(id) if id == BUILD_ID => {
                    return HarnessProgram {
                        path: slim,
                        leading: Vec::new(),
                    };
                }
                other => tracing::warn!(
                    path = %slim.display(),
                    build = other.as_deref().unwrap_or("unknown"),
                    this_build = BUILD_ID,
                    "the harness binary is from another build, so sandboxes run `sandwarden harness` \
                     (more memory each); rebuild both with `cargo build --release`"
                ),
            }
        }
        HarnessProgram {
            path: me.to_path_buf(),
            leading: vec!["harness".into()],
        }
    }

    /// `beside` this very binary, found once per process (it runs the slim binary to ask).
    pub fn for_this_binary() -> std::io::Result<HarnessProgram> {
        static FOUND: std::sync::OnceLock<HarnessProgram> = std::sync::OnceLock::new();
        if let Some(found) = FOUND.get() {
            return Ok(found.clone());
        }
        let found = HarnessProgram::beside(&std::env::current_exe()?);
        Ok(FOUND.get_or_init(|| found).clone())
    }

    /// How a person would type it: `sandwarden-harness` or `sandwarden harness`.
    pub fn name(&self) -> String {
        let file = self.path.file_name().unwrap_or_default().to_string_lossy();
        std::iter::once(file.as_ref())
            .chain(self.leading.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The build a `sandwarden-harness` binary reports (`--version`), if it runs and says.
fn build_of(slim: &Path) -> Option<String> {
    let out = Command::new(slim).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    text.trim()
        .strip_prefix(SLIM)
        .map(|id| id.trim().to_string())
}

/// The `sandwarden` binary that `sandwarden` at the start of an agent's command line means (the
/// echo agent lives there): this binary, or from `sandwarden-harness` the `sandwarden` beside it.
/// `None` when there is none beside it: the name is then looked up in PATH.
pub fn sandwarden_exe() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    if me.file_name().and_then(|n| n.to_str()) != Some(SLIM) {
        return Some(me);
    }
    let full = me.with_file_name("sandwarden");
    full.is_file().then_some(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, says: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\necho '{says}'\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn the_slim_binary_runs_sandboxes_only_when_it_is_from_this_build() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = dir.path().join("sandwarden");
        std::fs::write(&me, "").expect("write");
        let full = HarnessProgram {
            path: me.clone(),
            leading: vec!["harness".into()],
        };
        assert_eq!(HarnessProgram::beside(&me), full, "none beside it");
        script(
            dir.path(),
            SLIM,
            "sandwarden-harness 0.0.1-0000000000000000",
        );
        assert_eq!(HarnessProgram::beside(&me), full, "another build's");
        let slim = script(dir.path(), SLIM, &format!("sandwarden-harness {BUILD_ID}"));
        assert_eq!(
            HarnessProgram::beside(&me),
            HarnessProgram {
                path: slim,
                leading: Vec::new()
            }
        );
    }
}
