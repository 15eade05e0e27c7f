//! The web console: a plain single-page app (console/, no framework, no build step of its own)
//! served by `serve` at `/`, with its files under `/console/`. It speaks the public API like any
//! client, with the API key the person signs in with (kept in the tab's session storage), and a
//! terminal session's `tty_url` for xterm.js.
//!
//! Every answer carries a Content-Security-Policy: scripts only from this server (no inline
//! script, no `eval`), connections only to this server, no frames, no forms posting elsewhere.
//! Styles may be inline: xterm.js writes its theme into a `<style>` element it makes.

use super::AppState;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sandwarden_proto::problem::Problem;

// `VENDOR`: xterm.js and its fit add-on, when console/node_modules held them at build time.
include!(concat!(env!("OUT_DIR"), "/console_vendor.rs"));

/// The console's own files: (name, content type, built-in copy).
const OWN: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../console/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../console/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../console/app.css"),
    ),
];

/// Where a vendor file lies under node_modules (for `--console-dir`).
fn vendor_path(name: &str) -> Option<&'static str> {
    match name {
        "xterm.js" => Some("@xterm/xterm/lib/xterm.js"),
        "xterm.css" => Some("@xterm/xterm/css/xterm.css"),
        "addon-fit.js" => Some("@xterm/addon-fit/lib/addon-fit.js"),
        _ => None,
    }
}

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/console/vendor/{name}", get(vendor))
        .route("/console/{name}", get(own))
}

async fn index(State(orch): State<AppState>) -> Response {
    own_file(&orch, "index.html").await
}

async fn own(State(orch): State<AppState>, Path(name): Path<String>) -> Response {
    own_file(&orch, &name).await
}

async fn own_file(orch: &AppState, name: &str) -> Response {
    let Some((name, kind, built_in)) = OWN.iter().find(|(n, _, _)| *n == name) else {
        return not_found();
    };
    match &orch.config.console_dir {
        // Only the three names above are read from the directory: nothing else under it is
        // served.
        Some(dir) => match tokio::fs::read(dir.join(name)).await {
            Ok(bytes) => answer(kind, bytes),
            Err(e) => Problem::new(
                StatusCode::NOT_FOUND,
                "console_file_missing",
                format!("--console-dir has no readable {name} ({e})"),
            )
            .into_response(),
        },
        None => answer(kind, built_in.as_bytes().to_vec()),
    }
}

async fn vendor(State(orch): State<AppState>, Path(name): Path<String>) -> Response {
    if let Some((_, kind, bytes)) = VENDOR.iter().find(|(n, _, _)| *n == name) {
        return answer(kind, bytes.to_vec());
    }
    let Some(rel) = vendor_path(&name) else {
        return not_found();
    };
    if let Some(dir) = &orch.config.console_dir
        && let Ok(bytes) = tokio::fs::read(dir.join("node_modules").join(rel)).await
    {
        let kind = if name.ends_with(".css") {
            "text/css"
        } else {
            "text/javascript"
        };
        return answer(kind, bytes);
    }
    Problem::new(
        StatusCode::NOT_FOUND,
        "console_terminal_missing",
        "this build has no xterm.js for the console's terminal: run `npm ci --prefix console`, then build sandwarden again",
    )
    .into_response()
}

fn not_found() -> Response {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such console file; the console is at /",
    )
    .into_response()
}

/// Sets what a browser may do with an answer (`policy`) and that it must take the content type
/// as given.
pub(super) fn policed(headers: &mut axum::http::HeaderMap, policy: &'static str) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(policy),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

fn answer(kind: &str, body: Vec<u8>) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(kind).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    policed(headers, CSP);
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
