//! The web console (console/, served by `serve` at `/`): its files as served (content types, the
//! Content-Security-Policy, nothing loaded from another origin), and the whole console driven in
//! a real browser, headless Chromium through chromedriver, by tests/console/console_test.py.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The policy every console answer carries (src/api/console.rs), spelled out here so a change
/// to it is a change to this test too.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn console_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("console")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `GET path` without a key (the console's files need none): status, content type, CSP, body.
async fn get(serve: &Serve, path: &str) -> (u16, String, String, String) {
    let response = reqwest::get(serve.url(path)).await.expect("request sent");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (content_type, csp) = (header("content-type"), header("content-security-policy"));
    let status = response.status().as_u16();
    (
        status,
        content_type,
        csp,
        response.text().await.unwrap_or_default(),
    )
}

/// The values of every `src="…"` and `href="…"` attribute in `html`.
fn references(html: &str) -> Vec<&str> {
    ["src=\"", "href=\""]
        .iter()
        .flat_map(|attr| html.match_indices(attr).map(move |(at, _)| at + attr.len()))
        .map(|start| {
            let end = html[start..].find('"').expect("a closed attribute");
            &html[start..start + end]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_served_with_its_policy_and_refers_to_this_server_alone() {
    let serve = Serve::start(&[]);

    let (status, kind, csp, index) = get(&serve, "/").await;
    assert_eq!(status, 200, "{index}");
    assert!(kind.starts_with("text/html"), "{kind}");
    assert_eq!(csp, CSP);
    // The built-in copy is the tree's (include_str!, rebuilt when console/ changes).
    assert_eq!(index, console_file("index.html"));

    for (path, expected, file) in [
        ("/console/app.js", "text/javascript", Some("app.js")),
        ("/console/app.css", "text/css", Some("app.css")),
        ("/console/vendor/xterm.js", "text/javascript", None),
        ("/console/vendor/xterm.css", "text/css", None),
        ("/console/vendor/addon-fit.js", "text/javascript", None),
    ] {
        let (status, kind, csp, body) = get(&serve, path).await;
        assert_eq!(
            status, 200,
            "{path}: {body} (the vendor files need `npm ci --prefix console` before the build)"
        );
        assert!(kind.starts_with(expected), "{path}: {kind}");
        assert_eq!(csp, CSP, "{path}");
        if let Some(file) = file {
            assert_eq!(body, console_file(file), "{path}");
        }
    }
    for path in [
        "/console/nope.js",
        "/console/vendor/nope.js",
        "/console/package.json",
    ] {
        let (status, kind, _, body) = get(&serve, path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            kind.starts_with("application/problem+json"),
            "{path}: {kind}"
        );
    }

    // Nothing from another origin: every reference is a path on this server (or inline data),
    // and neither the page nor its script names an http(s) URL.
    let refs = references(&index);
    assert!(refs.len() >= 4, "{refs:?}");
    for r in &refs {
        assert!(
            (r.starts_with('/') && !r.starts_with("//"))
                || r.starts_with('#')
                || r.starts_with("data:"),
            "the index refers to {r:?}"
        );
    }
    for (name, text) in [("index.html", &index), ("app.js", &console_file("app.js"))] {
        assert!(
            !text.contains("http://") && !text.contains("https://"),
            "{name} names a URL of another origin"
        );
    }
    // No inline script or handler, which the policy would refuse anyway.
    assert!(
        !index.contains("<script>") && !index.contains(" onclick="),
        "{index}"
    );
}

/// The Python that has selenium (scripts/install-sdks puts it in target/sdk-venv), when the
/// browser test can run here; `None` (said loudly) when it cannot and is not required.
fn browser_python() -> Option<PathBuf> {
    let require_browser = std::env::var_os("SANDWARDEN_REQUIRE_BROWSER").is_some();
    if !Path::new(CHROMEDRIVER).exists() {
        assert!(
            !require_browser,
            "SANDWARDEN_REQUIRE_BROWSER is set but {CHROMEDRIVER} is missing: install the chromium and chromium-driver packages"
        );
        eprintln!(
            "\n*** SKIPPED: the console's browser test needs {CHROMEDRIVER} (apt-get install chromium chromium-driver) ***\n"
        );
        return None;
    }
    let python = std::env::var_os("SANDWARDEN_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv/bin/python")
        });
    let has_selenium = std::process::Command::new(&python)
        .args(["-c", "import selenium"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !has_selenium {
        assert!(
            !require_browser && std::env::var_os("SANDWARDEN_REQUIRE_SDKS").is_none(),
            "the console's browser test is required but {} has no selenium: run scripts/install-sdks",
            python.display()
        );
        eprintln!(
            "\n*** SKIPPED: the console's browser test needs selenium in target/sdk-venv (run scripts/install-sdks) ***\n"
        );
        return None;
    }
    Some(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let Some(python) = browser_python() else {
        return;
    };
    // The built-in console, as shipped (not --console-dir).
    let serve = Serve::start(&[]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/console/console_test.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg("--url")
        .arg(&serve.base)
        .env("SANDWARDEN_ADMIN_KEY", ADMIN_KEY)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the browser test ends within 5 minutes")
        .expect("run the browser test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}\n(screenshots in target/console-screenshots)",
        script.display(),
        out.status
    );
    assert!(stdout.contains("console test passed"), "{stdout}");
}
