//! Sharing one service safely (issue 18): one `serve` per data dir, bounds on what a request
//! may ask for, and answers that say which status is whose.

mod common;

use common::*;
use std::process::{Command, Stdio};

/// Runs `sandwarden serve` on `data` expecting it to refuse to start: returns its exit status
/// and what it wrote on stderr.
fn serve_refusal(data: &std::path::Path, env: &[(&str, String)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sandwarden"))
        .args(["serve", "--listen", "127.0.0.1:0", "--isolation", "none"])
        .arg("--data-dir")
        .arg(data)
        .env("SANDWARDEN_API_KEY", ADMIN_KEY)
        .env("SANDWARDEN_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run serve");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_one_data_dir_refuses_to_start_naming_the_first() {
    let first = Serve::start(&[]);
    let id = first.client().ready("echo").await;
    let (code, stderr) = serve_refusal(&first.data, &[]);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains(&format!("(pid {})", first.pid())) && stderr.contains("--data-dir"),
        "{stderr}"
    );
    // The first one is untouched and serves on.
    let (status, reply) = first.client().say(&id, "still here").await;
    assert_eq!((status, reply["text"].as_str()), (200, Some("still here")));
}

/// Two replicas on one PostgreSQL store with different server secrets: the second refuses to
/// start and says why (the fingerprints, never a secret); with `--accept-new-secret` it starts
/// and its secret becomes the store's, which the first one's then no longer is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_secret_differs_from_the_stores_refuses_to_start() {
    let Some(db) = postgres_database().await else {
        return;
    };
    let (one, two) = (
        hex::encode(rand::random::<[u8; 32]>()),
        hex::encode(rand::random::<[u8; 32]>()),
    );
    let first = Serve::start_with_env(
        &[],
        &[
            ("SANDWARDEN_STORE", db.clone()),
            ("SANDWARDEN_SECRET", one.clone()),
        ],
    );
    let id = first.client().ready("echo").await;

    let elsewhere = tempfile::tempdir().expect("tempdir");
    let env = [
        ("SANDWARDEN_STORE", db.clone()),
        ("SANDWARDEN_SECRET", two.clone()),
    ];
    let (code, stderr) = serve_refusal(elsewhere.path(), &env);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("not the one the store") && stderr.contains("--accept-new-secret"),
        "{stderr}"
    );
    assert!(!stderr.contains(&one) && !stderr.contains(&two), "{stderr}");
    // The first replica serves on.
    let (status, _) = first.client().say(&id, "unchanged").await;
    assert_eq!(status, 200);

    let second = Serve::start_in_with_env(elsewhere.path(), &["--accept-new-secret"], &env);
    let (status, _) = second
        .client()
        .call("GET", &format!("/v1/sessions/{id}"), None)
        .await;
    assert_eq!(status, 200);
    drop(second);
    kill_sandboxes_under(elsewhere.path());
    let again = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = serve_refusal(
        again.path(),
        &[("SANDWARDEN_STORE", db), ("SANDWARDEN_SECRET", one)],
    );
    assert_ne!(code, 0, "the old secret is refused once replaced: {stderr}");
}
