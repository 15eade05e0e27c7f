//! A session's files over HTTP (`GET /v1/sessions/{id}/files`, `GET`/`PUT …/files/{path}`):
//! what a client writes is what the program in the sandbox reads in its working directory, what
//! the program writes the client reads back, and no path, `..` or a link the program planted,
//! reaches anything outside it.

use crate::common::shell::Shell;
use crate::common::*;
use serde_json::Value;

/// A file's status and bytes through the API.
async fn get_file(api: &Api, id: &str, path: &str) -> (u16, Vec<u8>) {
    api.call_bytes(
        "GET",
        &format!("/v1/sessions/{id}/files/{path}"),
        Vec::new(),
    )
    .await
}

/// Writes a file through the API: the status and the answer.
async fn put_file(api: &Api, id: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let (status, answer) = api
        .call_bytes(
            "PUT",
            &format!("/v1/sessions/{id}/files/{path}"),
            body.to_vec(),
        )
        .await;
    (status, serde_json::from_slice(&answer).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_files_are_its_sandboxs_working_directory_and_nothing_else() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("sh").await;

    // The client writes; the program in the sandbox reads the same bytes where it runs.
    let (status, put) = put_file(&api, &id, "notes/plan-7f3.txt", b"osprey plan 7f3\n").await;
    assert_eq!(status, 201, "{put}");
    assert_eq!(put["size"], 16, "{put}");
    let (status, put) = put_file(&api, &id, "notes/plan-7f3.txt", b"heron plan 7f4\n").await;
    assert_eq!(status, 200, "a second write replaces the file: {put}");
    let (_, s) = api.call("GET", &format!("/v1/sessions/{id}"), None).await;
    let mut shell = Shell::attach(s["tty_url"].as_str().expect("tty_url")).await;
    let (out, rc) = shell.run("cat notes/plan-7f3.txt").await;
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("heron plan 7f4") && !out.contains("osprey"),
        "{out}"
    );

    // The program writes (bytes that are not text among them); the client reads them back.
    let (out, rc) = shell
        .run("printf 'kestrel\\001\\377end' > made-by-program.bin && ln -s /etc/hostname leak && ln -s / root-link")
        .await;
    assert_eq!(rc, 0, "{out}");
    let (status, bytes) = get_file(&api, &id, "made-by-program.bin").await;
    assert_eq!(status, 200);
    assert_eq!(bytes, b"kestrel\x01\xffend");

    // The listing: entries with their kinds and sizes, links listed, not followed.
    let (status, listing) = api
        .call("GET", &format!("/v1/sessions/{id}/files"), None)
        .await;
    assert_eq!(status, 200, "{listing}");
    let entry = |path: &str| {
        listing["files"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["path"] == path).cloned())
            .unwrap_or_else(|| panic!("no {path} in {listing}"))
    };
    assert_eq!(entry("notes")["type"], "dir");
    assert_eq!(entry("notes/plan-7f3.txt")["size"], 15);
    assert_eq!(entry("made-by-program.bin")["size"], 12);
    assert_eq!(entry("leak")["type"], "symlink");
    let (status, under) = api
        .call("GET", &format!("/v1/sessions/{id}/files?under=notes"), None)
        .await;
    assert_eq!(status, 200, "{under}");
    assert_eq!(under["files"].as_array().map(Vec::len), Some(1), "{under}");

    // What an agent could plant to hold or flood the server: a FIFO with no writer is refused
    // at once (not waited on); a path with a control character is refused, not shortened.
    let (out, rc) = shell.run("mkfifo stuck-pipe").await;
    assert_eq!(rc, 0, "{out}");
    let (status, body) = get_file(&api, &id, "stuck-pipe").await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let (status, _) = put_file(&api, &id, "notes/a%0Ab", b"x").await;
    assert_eq!(status, 422);
    // A body past the 16 MiB bound is refused, and nothing is left behind.
    // serve answers before reading the body, so a client still sending may see its
    // connection closed instead of the 413; either way nothing is written.
    let sent = api
        .http
        .put(serve.url(&format!("/v1/sessions/{id}/files/too-big.bin")))
        .bearer_auth(&api.key)
        .body(vec![1u8; 17 << 20])
        .send()
        .await;
    match sent {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 413),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    let (out, rc) = shell.run("ls -a | grep -q too-big").await;
    assert_eq!(rc, 1, "no file and no part of one: {out}");

    // No way out: `..`, a link the program planted, a write through a link.
    for (path, want) in [
        ("..%2Fescape", 422),
        ("notes%2F..%2F..%2Fescape", 422),
        ("leak", 403),
        ("root-link/etc/passwd", 403),
        ("missing.txt", 404),
        ("notes", 409),
    ] {
        let (status, body) = get_file(&api, &id, path).await;
        assert_eq!(status, want, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let (status, put) = put_file(&api, &id, "root-link/tmp/planted", b"x").await;
    assert_eq!(status, 403, "{put}");
    let (status, put) = put_file(&api, &id, "..%2Fplanted", b"x").await;
    assert_eq!(status, 422, "{put}");
    let (out, rc) = shell
        .run("test -e /tmp/planted || test -e ../planted")
        .await;
    assert_eq!(rc, 1, "nothing was written outside: {out}");

    // Another tenant's key finds no such session.
    let other = crate::tenancy::tenant_client(&api, "other").await;
    let (status, _) = get_file(&other, &id, "notes/plan-7f3.txt").await;
    assert_eq!(status, 404);
    let (status, _) = put_file(&other, &id, "intruder.txt", b"x").await;
    assert_eq!(status, 404);

    // A deleted session has no files to reach.
    let (status, _) = api
        .call("DELETE", &format!("/v1/sessions/{id}"), None)
        .await;
    assert_eq!(status, 200);
    let (status, body) = get_file(&api, &id, "made-by-program.bin").await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
}

/// An API session too: what the client writes, the agent reads in its working directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_sessions_agent_reads_the_files_a_client_wrote() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let (status, put) = put_file(&api, &id, "input/brief-91c.md", b"grebe brief 91c").await;
    assert_eq!(status, 201, "{put}");
    let (status, reply) = api.say(&id, "/cat input/brief-91c.md").await;
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["text"]
            .as_str()
            .unwrap_or("")
            .contains("grebe brief 91c"),
        "{reply}"
    );
}

/// A file an agent wrote is never a page of serve's origin: bytes as they are, with no sniffing
/// and a sandboxing policy, however HTML they look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_is_never_a_page_of_this_origin() {
    let serve = Serve::start(&[]);
    let api = serve.client();
    let id = api.ready("echo").await;
    let page = b"<html><script>alert(document.cookie)</script></html>";
    let (status, _) = put_file(&api, &id, "page.html", page).await;
    assert_eq!(status, 201);
    let resp = reqwest::Client::new()
        .get(serve.url(&format!("/v1/sessions/{id}/files/page.html")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .expect("read");
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(header("content-type"), "application/octet-stream");
    assert_eq!(header("x-content-type-options"), "nosniff");
    assert_eq!(
        header("content-security-policy"),
        "default-src 'none'; sandbox"
    );
    assert_eq!(resp.bytes().await.expect("body").as_ref(), page);
}
