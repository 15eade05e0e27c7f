//! The sandbox's working directory over HTTP: list, read and write files (`GET /v1/files`,
//! `GET`/`PUT /v1/files/{path}`), for clients that hand an agent its inputs or collect what it
//! wrote.
//!
//! Every path is resolved inside the working directory by cap-std, which refuses any path that
//! would leave it, through `..` or through a symbolic link (one the agent planted pointing at
//! `/proc/…` included): the server never reads or writes for a client what lies outside, even
//! though it runs with the agent's own rights in the sandbox.

use crate::event::is_inside;
use crate::problem::Problem;
use axum::http::StatusCode;
use cap_std::fs::Dir;
use serde::Serialize;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// Largest file `GET /v1/files/{path}` reads (a larger one is refused, not cut).
pub const MAX_READ_BYTES: u64 = 16 * 1024 * 1024;
/// Most entries one listing holds, how many bytes of paths, and how deep it goes.
const MAX_ENTRIES: usize = 10_000;
const MAX_LISTING_BYTES: usize = 1024 * 1024;
const MAX_DEPTH: usize = 32;

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Relative to the working directory, `/`-separated.
    pub path: String,
    /// `file`, `dir` or `symlink` (a link is listed, never followed).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Bytes, for a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// `GET /v1/files`'s answer.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub files: Vec<Entry>,
    /// Whether entries were left out past `MAX_ENTRIES`, `MAX_LISTING_BYTES` or `MAX_DEPTH`.
    pub truncated: bool,
    /// Bytes of paths so far.
    #[serde(skip)]
    bytes: usize,
}

/// A path a client named, checked: relative, with no `..`, no NUL.
fn checked(path: &str) -> Result<PathBuf, Problem> {
    if !is_inside(path) || path.chars().any(char::is_control) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_path",
            format!(
                "{path:?} is not a path inside the working directory: give a relative path \
                 without `..` or control characters"
            ),
        ));
    }
    Ok(PathBuf::from(path))
}

fn open(workdir: &Path) -> Result<Dir, Problem> {
    Dir::open_ambient_dir(workdir, cap_std::ambient_authority()).map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "workdir_unavailable",
            format!("the working directory cannot be opened: {e}"),
        )
    })
}

/// An I/O error on `path` as the client should read it.
fn failed(path: &Path, e: &std::io::Error) -> Problem {
    use nix::libc::{ELOOP, ENAMETOOLONG, ENXIO};
    let shown = path.display();
    match e.raw_os_error() {
        Some(ELOOP) => {
            return Problem::new(
                StatusCode::FORBIDDEN,
                "path_not_allowed",
                format!("{shown} cannot be reached: its symbolic links go round in a loop"),
            );
        }
        Some(ENAMETOOLONG) => {
            return Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_path",
                format!(
                    "{shown}: a name in it, or the whole path, is too long for the file system"
                ),
            );
        }
        Some(ENXIO) => {
            return Problem::new(
                StatusCode::CONFLICT,
                "not_a_file",
                format!(
                    "{shown} is not a regular file (a socket or a device): only files are read"
                ),
            );
        }
        _ => {}
    }
    match e.kind() {
        ErrorKind::NotFound => Problem::new(
            StatusCode::NOT_FOUND,
            "file_not_found",
            format!("{shown} does not exist in the working directory (list it with GET …/files)"),
        ),
        ErrorKind::PermissionDenied => Problem::new(
            StatusCode::FORBIDDEN,
            "path_not_allowed",
            format!(
                "{shown} cannot be reached: it leads out of the working directory (through a \
                 symbolic link, say), or its permissions do not allow it"
            ),
        ),
        ErrorKind::AlreadyExists => Problem::new(
            StatusCode::CONFLICT,
            "not_a_directory",
            format!(
                "{shown} exists and is not a directory (a file, or a symbolic link, which is \
                 never followed)"
            ),
        ),
        ErrorKind::IsADirectory | ErrorKind::NotADirectory => Problem::new(
            StatusCode::CONFLICT,
            "not_a_file",
            format!("{shown} is a directory or lies under a file: {e}"),
        ),
        _ => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "file_error",
            format!("{shown}: {e}"),
        ),
    }
}

/// Runs blocking file work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "file_error",
            format!("the file operation stopped: {e}"),
        )
    })?
}

/// The bytes of the file at `path`: a regular file of at most `MAX_READ_BYTES`, opened once
/// (without blocking, so a FIFO an agent planted cannot hold the server) and read no further
/// than the bound, so a file that grows while it is read is refused rather than followed.
pub async fn read(workdir: PathBuf, path: String) -> Result<Vec<u8>, Problem> {
    use cap_std::fs::OpenOptionsExt;
    use std::io::Read;
    let path = checked(&path)?;
    blocking(move || {
        let dir = open(&workdir)?;
        let mut options = cap_std::fs::OpenOptions::new();
        options.read(true).custom_flags(nix::libc::O_NONBLOCK);
        let file = dir.open_with(&path, &options).map_err(|e| failed(&path, &e))?;
        let meta = file.metadata().map_err(|e| failed(&path, &e))?;
        if meta.is_dir() {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "not_a_file",
                format!(
                    "{} is a directory: list it with GET …/files?under={}",
                    path.display(),
                    path.display()
                ),
            ));
        }
        if !meta.is_file() {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "not_a_file",
                format!(
                    "{} is not a regular file (a FIFO, a socket or a device): only files are read",
                    path.display()
                ),
            ));
        }
        let too_large = |size: u64| {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "file_too_large",
                format!(
                    "{} holds {size} bytes or more; files of at most {MAX_READ_BYTES} bytes are read",
                    path.display()
                ),
            )
            .with("size", size)
            .with("max", MAX_READ_BYTES)
        };
        if meta.len() > MAX_READ_BYTES {
            return Err(too_large(meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.into_std()
            .take(MAX_READ_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| failed(&path, &e))?;
        if bytes.len() as u64 > MAX_READ_BYTES {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes)
    })
    .await
}

/// Writes `bytes` to `path` (its directories made as needed), whole or not at all: written to a
/// file beside it, then renamed over it. Returns whether the file is new.
pub async fn write(workdir: PathBuf, path: String, bytes: bytes::Bytes) -> Result<bool, Problem> {
    let path = checked(&path)?;
    blocking(move || {
        let dir = open(&workdir)?;
        if path.file_name().is_none() {
            return Err(failed_name(&path));
        }
        let parent = path.parent().unwrap_or(Path::new(""));
        if !parent.as_os_str().is_empty() {
            dir.create_dir_all(parent).map_err(|e| failed(parent, &e))?;
        }
        let existed = match dir.symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                return Err(Problem::new(
                    StatusCode::CONFLICT,
                    "not_a_file",
                    format!("{} is a directory", path.display()),
                ));
            }
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => return Err(failed(&path, &e)),
        };
        // A short name of its own, so any name the file system takes can be written.
        let staged = parent.join(format!(".sw-{}.part", uuid::Uuid::new_v4().simple()));
        // A replaced file keeps its permissions (an executable stays executable).
        let kept = existed
            .then(|| dir.metadata(&path).ok().map(|m| m.permissions()))
            .flatten();
        let written = dir
            .write(&staged, &bytes)
            .and_then(|()| match kept {
                Some(perms) => dir.set_permissions(&staged, perms),
                None => Ok(()),
            })
            .and_then(|()| dir.rename(&staged, &dir, &path));
        if let Err(e) = written {
            let _ = dir.remove_file(&staged);
            return Err(failed(&path, &e));
        }
        Ok(!existed)
    })
    .await
}

fn failed_name(path: &Path) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_path",
        format!("{} names no file", path.display()),
    )
}

/// Every entry under `under` (the working directory itself for `None`), depth first, sorted;
/// symbolic links are listed, not followed.
pub async fn list(workdir: PathBuf, under: Option<String>) -> Result<Listing, Problem> {
    let start = match under.as_deref() {
        None | Some("") | Some(".") => PathBuf::new(),
        Some(p) => checked(p)?,
    };
    blocking(move || {
        let root = open(&workdir)?;
        let dir = if start.as_os_str().is_empty() {
            root
        } else {
            root.open_dir(&start).map_err(|e| failed(&start, &e))?
        };
        let mut listing = Listing {
            files: Vec::new(),
            truncated: false,
            bytes: 0,
        };
        walk(&dir, &start, 0, &mut listing);
        listing.files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(listing)
    })
    .await
}

fn walk(dir: &Dir, at: &Path, depth: usize, listing: &mut Listing) {
    let Ok(entries) = dir.entries() else {
        return;
    };
    for entry in entries.flatten() {
        if listing.files.len() >= MAX_ENTRIES {
            listing.truncated = true;
            return;
        }
        let path = at.join(entry.file_name());
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let shown = path.to_string_lossy().into_owned();
        listing.bytes += shown.len();
        if listing.bytes > MAX_LISTING_BYTES {
            listing.truncated = true;
            return;
        }
        if kind.is_symlink() {
            listing.files.push(Entry {
                path: shown,
                kind: "symlink",
                size: None,
            });
        } else if kind.is_dir() {
            listing.files.push(Entry {
                path: shown,
                kind: "dir",
                size: None,
            });
            if depth + 1 >= MAX_DEPTH {
                listing.truncated = true;
                continue;
            }
            if let Ok(sub) = entry.open_dir() {
                walk(&sub, &path, depth + 1, listing);
            }
        } else {
            listing.files.push(Entry {
                path: shown,
                kind: "file",
                size: entry.metadata().ok().map(|m| m.len()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_reads_and_lists_inside_and_refuses_the_way_out() {
        let work = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("secret"), "outside").expect("write");
        let wd = work.path().to_path_buf();
        assert!(
            write(wd.clone(), "in/a.txt".into(), "alpha".into())
                .await
                .expect("new")
        );
        assert!(
            !write(wd.clone(), "in/a.txt".into(), "beta".into())
                .await
                .expect("replaced")
        );
        assert_eq!(
            read(wd.clone(), "in/a.txt".into()).await.expect("read"),
            b"beta"
        );
        // A link out, as an agent could plant one: listed, never followed.
        std::os::unix::fs::symlink(outside.path(), work.path().join("out")).expect("symlink");
        std::os::unix::fs::symlink("/proc/self/environ", work.path().join("env")).expect("link");
        for bad in ["out/secret", "env"] {
            let e = read(wd.clone(), bad.into()).await.expect_err(bad);
            assert_eq!(e.status, 403, "{bad}: {e:?}");
        }
        let e = write(wd.clone(), "out/planted".into(), "x".into())
            .await
            .expect_err("write through a link");
        assert_eq!(e.status, 409, "{e:?}");
        assert!(!outside.path().join("planted").exists());
        for bad in ["../x", "/etc/passwd", ""] {
            let e = read(wd.clone(), bad.into()).await.expect_err(bad);
            assert_eq!(e.status, 422, "{bad}: {e:?}");
        }
        let e = read(wd.clone(), "missing".into())
            .await
            .expect_err("missing");
        assert_eq!(e.status, 404);
        // A FIFO with no writer is refused at once, not waited on.
        nix::unistd::mkfifo(
            &work.path().join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        let e = read(wd.clone(), "pipe".into()).await.expect_err("a FIFO");
        assert_eq!((e.status, e.kind.as_str()), (409, "not_a_file"), "{e:?}");
        std::fs::remove_file(work.path().join("pipe")).expect("rm");
        // Control characters are refused, not dropped on the way.
        let e = read(wd.clone(), "in/a\ntxt".into())
            .await
            .expect_err("newline");
        assert_eq!(e.status, 422);
        // Past the bound: refused, not cut.
        std::fs::write(
            work.path().join("big"),
            vec![7u8; MAX_READ_BYTES as usize + 1],
        )
        .expect("big");
        let e = read(wd.clone(), "big".into()).await.expect_err("too large");
        assert_eq!(e.status, 413);
        std::fs::remove_file(work.path().join("big")).expect("rm");
        // Any name the file system takes can be written; one it does not is the client's to fix.
        let long = "n".repeat(255);
        write(wd.clone(), long.clone(), "long".into())
            .await
            .expect("a 255-byte name");
        let e = write(wd.clone(), "n".repeat(256), "x".into())
            .await
            .expect_err("too long");
        assert_eq!(e.status, 422, "{e:?}");
        std::fs::remove_file(work.path().join(&long)).expect("rm");
        // Links that go round in a loop.
        std::os::unix::fs::symlink("loop-b", work.path().join("loop-a")).expect("link");
        std::os::unix::fs::symlink("loop-a", work.path().join("loop-b")).expect("link");
        let e = read(wd.clone(), "loop-a".into()).await.expect_err("a loop");
        assert_eq!(e.status, 403, "{e:?}");
        std::fs::remove_file(work.path().join("loop-a")).expect("rm");
        std::fs::remove_file(work.path().join("loop-b")).expect("rm");
        // A replaced file keeps its mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            work.path().join("in/a.txt"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        write(wd.clone(), "in/a.txt".into(), "gamma".into())
            .await
            .expect("replaced");
        let mode = std::fs::metadata(work.path().join("in/a.txt"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        let e = read(wd.clone(), "in".into())
            .await
            .expect_err("a directory");
        assert_eq!(e.status, 409);
        let listing = list(wd.clone(), None).await.expect("list");
        let shown: Vec<(&str, &str)> = listing
            .files
            .iter()
            .map(|e| (e.path.as_str(), e.kind))
            .collect();
        assert_eq!(
            shown,
            [
                ("env", "symlink"),
                ("in", "dir"),
                ("in/a.txt", "file"),
                ("out", "symlink")
            ]
        );
        let under = list(wd.clone(), Some("in".into())).await.expect("under");
        assert_eq!(under.files.len(), 1);
        assert_eq!(under.files[0].size, Some(5));
        assert!(!listing.truncated);
    }
}
