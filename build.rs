//! Builds the web console's third-party files into the binary: xterm.js and its fit add-on, from
//! `console/node_modules` (installed by `npm ci --prefix console`, pinned by
//! console/package-lock.json). Without them the binary still builds and serves the console; its
//! terminal page then says how to get them.

use std::fmt::Write as _;
use std::path::Path;

/// The files the console's terminal page loads: (served name, content type, path in the
/// console's node_modules).
const VENDOR: &[(&str, &str, &str)] = &[
    ("xterm.js", "text/javascript", "@xterm/xterm/lib/xterm.js"),
    ("xterm.css", "text/css", "@xterm/xterm/css/xterm.css"),
    (
        "addon-fit.js",
        "text/javascript",
        "@xterm/addon-fit/lib/addon-fit.js",
    ),
];

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let modules = root.join("console/node_modules");
    // The whole console directory: installing node_modules changes it.
    println!("cargo:rerun-if-changed=console");
    let found: Vec<_> = VENDOR
        .iter()
        .map(|(name, kind, rel)| (name, kind, modules.join(rel)))
        .collect();
    let all = found.iter().all(|(_, _, path)| path.is_file());
    let mut out = String::from(
        "/// The console's third-party files, when they were installed at build time.\n",
    );
    out.push_str("pub const VENDOR: &[(&str, &str, &[u8])] = &[\n");
    if all {
        for (name, kind, path) in &found {
            let _ = writeln!(
                out,
                "    ({name:?}, {kind:?}, include_bytes!({:?})),",
                path.display().to_string()
            );
        }
    } else {
        println!(
            "cargo:warning=console/node_modules has no xterm.js: the console's terminal page will say how to add it (npm ci --prefix console, then build again)"
        );
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into()))
        .join("console_vendor.rs");
    if let Err(e) = std::fs::write(&dest, out) {
        panic!("cannot write {}: {e}", dest.display());
    }
}
