//! The CRDs in `crds/` are exactly what the Rust types generate: regenerate with
//! `cargo run -- crd` after changing `src/crd.rs`.

#[test]
fn the_committed_crds_match_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let generated = sandwarden::crd::crds().expect("generate the CRDs");
    assert_eq!(generated.len(), 3);
    for (name, yaml) in generated {
        let committed = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert!(
            committed == yaml,
            "crds/{name} is out of date with src/crd.rs: run `cargo run -- crd` and commit the result"
        );
    }
}
