//! Gives each build of the sources an identity, `SANDWARDEN_BUILD_ID`, that `sandwarden` and
//! `sandwarden-harness` both carry: `sandwarden` starts the slim harness binary next to it only
//! when that binary was built from the same sources (see `src/harness/binary.rs`).

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
    files(Path::new("src"), &mut paths);
    paths.extend(["Cargo.toml", "Cargo.lock", "build.rs"].map(PathBuf::from));
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
    for watched in ["src", "Cargo.toml", "Cargo.lock", "build.rs"] {
        println!("cargo:rerun-if-changed={watched}");
    }
}
