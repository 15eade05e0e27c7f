//! The MCP server a session's client tools are offered through: the agent reaches it on the
//! sandbox's own loopback (streamable HTTP, JSON answers), with a bearer token only this harness
//! and the agent it started hold. A `tools/call` becomes an `input_required` event carrying
//! `client_tool {name, input}`; the client's answer (`POST /v1/inputs/{request_id}` with
//! `output`) is the call's result.

use crate::acp::ApiAgent;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::Arc;

/// Where the agent reaches the server, and the header it must send.
#[derive(Clone)]
pub struct Endpoint {
    pub url: String,
    pub token: String,
}

#[derive(Clone)]
struct ServerState {
    agent: Arc<ApiAgent>,
    token: Arc<str>,
}

/// Starts the server on 127.0.0.1 (a port of its own) for `agent`'s client tools.
pub async fn start(agent: Arc<ApiAgent>) -> std::io::Result<Endpoint> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let token = uuid::Uuid::new_v4().simple().to_string();
    let state = ServerState {
        agent,
        token: token.clone().into(),
    };
    let app = Router::new()
        .route("/mcp", post(rpc).get(no_stream))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "the client tools' MCP server stopped");
        }
    });
    Ok(Endpoint {
        url: format!("http://{addr}/mcp"),
        token,
    })
}

/// Whether two tokens are equal, taking the same time wherever they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The server sends nothing unasked: no server-to-client stream.
async fn no_stream() -> StatusCode {
    StatusCode::METHOD_NOT_ALLOWED
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Response {
    Json(json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
        .into_response()
}

async fn rpc(State(state): State<ServerState>, headers: HeaderMap, body: String) -> Response {
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .is_some_and(|(_, t)| same(t.trim().as_bytes(), state.token.as_bytes()));
    if !authorized {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Ok(msg) = serde_json::from_str::<Value>(&body) else {
        return rpc_error(&Value::Null, -32700, "the body is not JSON");
    };
    if msg.is_array() {
        return rpc_error(
            &Value::Null,
            -32600,
            "send one request at a time (no batches)",
        );
    }
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let method = msg["method"].as_str().unwrap_or("");
    // Notifications (no id) and responses need no answer.
    if msg.get("id").is_none() {
        return StatusCode::ACCEPTED.into_response();
    }
    let result = match method {
        "initialize" => json!({
            "protocolVersion": msg["params"]["protocolVersion"].as_str().unwrap_or("2025-03-26"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "sandwarden-client-tools", "version": env!("CARGO_PKG_VERSION")},
        }),
        "ping" => json!({}),
        "tools/list" => json!({"tools": state.agent.client_tools().iter().map(|t| json!({
            "name": t.name, "description": t.description, "inputSchema": t.input_schema,
        })).collect::<Vec<_>>()}),
        "tools/call" => {
            let name = msg["params"]["name"].as_str().unwrap_or("").to_string();
            let input = msg["params"]["arguments"].clone();
            let input = if input.is_null() { json!({}) } else { input };
            let (text, is_error) = match state.agent.call_client_tool(&name, input).await {
                Ok(answer) => answer,
                Err(why) => (why, true),
            };
            json!({"content": [{"type": "text", "text": text}], "isError": is_error})
        }
        other => return rpc_error(&id, -32601, &format!("no method {other:?}")),
    };
    Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response()
}
