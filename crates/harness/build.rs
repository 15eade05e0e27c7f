//! Gives each build of the harness server's sources (this crate and the vocabulary it links) an
//! identity, `SANDWARDEN_BUILD_ID`, that `sandwarden` and `sandwarden-harness` both carry through
//! this crate: `sandwarden` starts the slim harness binary next to it only when that binary was
//! built from the same sources (see `src/binary.rs`).

use std::hash::{DefaultHasher, Hasher};
use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let mut paths = Vec::new();
    let watched = [
        "src",
        "../proto/src",
        "Cargo.toml",
        "../proto/Cargo.toml",
        "../../Cargo.toml",
        "../../Cargo.lock",
        "build.rs",
    ];
    for dir in ["src", "../proto/src"] {
        files(Path::new(dir), &mut paths);
    }
    paths.extend(watched[2..].iter().map(PathBuf::from));
    paths.sort();
    // A fixed-key SipHash: the same sources give the same id, build after build.
    let mut hash = DefaultHasher::new();
    for path in &paths {
        hash.write(path.to_string_lossy().as_bytes());
        hash.write(&std::fs::read(path).unwrap_or_default());
    }
    println!(
        "cargo:rustc-env=SANDWARDEN_BUILD_ID={}-{:016x}",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default(),
        hash.finish()
    );
    for path in watched {
        println!("cargo:rerun-if-changed={path}");
    }
}
