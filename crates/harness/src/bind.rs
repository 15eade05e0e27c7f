//! Late binding: checking and applying per-session env, files and working directory.
//!
//! Everything is checked before anything is written, so a bad request changes nothing.
//! Values may be secrets: nothing here logs them.

#[cfg(test)]
use crate::event::BindFile;
use crate::event::BindRequest;
use base64::Engine;
use std::path::{Path, PathBuf};

/// A bind request that passed every check, with file contents decoded.
pub struct CheckedBind {
    pub env: std::collections::BTreeMap<String, String>,
    pub files: Vec<(PathBuf, Vec<u8>, u32)>,
    pub cwd: PathBuf,
    pub mcp_servers: Vec<crate::event::McpServerSpec>,
    pub client_tools: Vec<crate::event::ClientToolSpec>,
    pub instructions: Option<String>,
}

/// Checks a bind request against the sandbox's working directory. The message says what to fix.
pub fn check(req: &BindRequest, workdir: &Path) -> Result<CheckedBind, String> {
    req.validate()?;
    let mut files = Vec::with_capacity(req.files.len());
    for file in &req.files {
        let bytes = match (&file.content, &file.content_base64) {
            (Some(text), _) => text.as_bytes().to_vec(),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| format!("content_base64 is not valid base64: {e}"))?,
            (None, None) => Vec::new(),
        };
        files.push((workdir.join(&file.path), bytes, file.mode.unwrap_or(0o644)));
    }
    let cwd = crate::process::resolve_dir(workdir, req.cwd.as_deref()).or_else(|e| {
        // A cwd that one of the files creates is fine.
        let wanted = req.cwd.as_deref().map(|c| workdir.join(c));
        match wanted {
            Some(dir) if files.iter().any(|(p, _, _)| p.starts_with(&dir)) => Ok(dir),
            _ => Err(e),
        }
    })?;
    Ok(CheckedBind {
        env: req.env.clone(),
        files,
        cwd,
        mcp_servers: req.mcp_servers.clone(),
        client_tools: req.client_tools.clone(),
        instructions: req.instructions.clone().filter(|t| !t.trim().is_empty()),
    })
}

/// Writes the checked files. Parent directories are created as needed.
pub fn write_files(checked: &CheckedBind) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (path, bytes, mode) in &checked.files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> BindRequest {
        serde_json::from_str(json).expect("bind json")
    }

    #[test]
    fn refuses_paths_outside_the_workdir() {
        let dir = std::env::temp_dir();
        for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
            let r = BindRequest {
                files: vec![BindFile {
                    path: bad.into(),
                    content: Some("x".into()),
                    content_base64: None,
                    mode: None,
                }],
                ..Default::default()
            };
            let e = check(&r, &dir).err().unwrap_or_default();
            assert!(e.contains("relative path"), "{bad}: {e}");
        }
    }

    #[test]
    fn refuses_reserved_and_malformed_env() {
        let dir = std::env::temp_dir();
        let e = check(&req(r#"{"env":{"SANDWARDEN_TOKEN":"x"}}"#), &dir).err();
        assert!(e.unwrap_or_default().contains("reserved"));
        let e = check(&req(r#"{"env":{"A=B":"x"}}"#), &dir).err();
        assert!(e.unwrap_or_default().contains("not valid"));
    }

    #[test]
    fn decodes_base64_and_accepts_a_cwd_the_files_create() {
        let dir = std::env::temp_dir();
        let r =
            req(r#"{"files":[{"path":"proj-x/a.bin","content_base64":"aGk="}],"cwd":"proj-x"}"#);
        let checked = check(&r, &dir).expect("valid");
        assert_eq!(checked.files[0].1, b"hi");
        assert_eq!(checked.cwd, dir.join("proj-x"));
        let bad = req(r#"{"files":[{"path":"a","content_base64":"%%"}]}"#);
        assert!(
            check(&bad, &dir)
                .err()
                .unwrap_or_default()
                .contains("base64")
        );
    }
}
