//! HTTP and WebSocket routes of the harness server, and the bearer-token check in front of them.
//!
//! Handlers translate between HTTP and the drivers; they hold no state of their own.

use super::{Driver, HarnessConfig};
use crate::event::{BindRequest, InputAnswer, Phase, TurnRequest, validate_id};
use crate::problem::Problem;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// Largest WebSocket message a viewer may send (terminal input and control frames are small).
const MAX_WS_MESSAGE: usize = 1024 * 1024;

#[derive(Clone)]
struct AppState {
    cfg: Arc<HarnessConfig>,
    driver: Driver,
}

pub fn router(cfg: Arc<HarnessConfig>, driver: Driver) -> Router {
    let state = AppState {
        cfg: cfg.clone(),
        driver,
    };
    Router::new()
        .route("/healthz", get(health))
        .route("/v1/turns", post(start_turn))
        .route("/v1/turns/cancel", post(cancel_turn))
        .route("/v1/options", get(agent_options))
        .route("/v1/inputs/{request_id}", post(answer_input))
        .route("/v1/bind", post(bind))
        .route("/v1/tty", get(tty))
        .route("/v1/files", get(list_files))
        .route("/v1/files/{*path}", get(read_file).put(write_file))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(cfg.max_request_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

use crate::event::constant_time_eq;

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), state.cfg.token.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is wrong; use the token this sandbox was started with",
        )
        .into_response(),
        None => Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: Bearer <token>` with the token this sandbox was started with",
        )
        .into_response(),
    }
}

async fn not_found() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see GET /healthz, POST /v1/turns, POST /v1/turns/cancel, \
         POST /v1/inputs/{request_id}, POST /v1/bind, GET /v1/tty, GET /v1/files, \
         GET|PUT /v1/files/{path}",
    )
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

async fn health(State(state): State<AppState>) -> Response {
    let health = match &state.driver {
        Driver::Api(a) => a.health(),
        Driver::Tui(t) => t.health(),
    };
    let code = match health.phase {
        Phase::Ready => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(health)).into_response()
}

fn wrong_kind(route: &str, kind: &str) -> Problem {
    let hint = match kind {
        "tui" => "this sandbox runs a terminal program: attach to GET /v1/tty over WebSocket",
        _ => "this sandbox runs an API agent: send turns to POST /v1/turns",
    };
    Problem::new(
        StatusCode::CONFLICT,
        "wrong_kind",
        format!("{route} is not available here; {hint}"),
    )
    .with("kind", kind)
}

async fn start_turn(
    State(state): State<AppState>,
    body: Result<Json<TurnRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Driver::Api(agent) = &state.driver else {
        return Err(wrong_kind("POST /v1/turns", "tui"));
    };
    let Json(req) = body?;
    let (turn_id, events) = agent.start_turn(req).await?;
    let stream = events.map(|event| {
        Event::default()
            .id(event.index.to_string())
            .event(event.kind.as_str())
            .json_data(&event)
    });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&turn_id) {
        response.headers_mut().insert("x-turn-id", v);
    }
    // Tell proxies (nginx) not to buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

async fn cancel_turn(State(state): State<AppState>) -> Result<Response, Problem> {
    let Driver::Api(agent) = &state.driver else {
        return Err(wrong_kind("POST /v1/turns/cancel", "tui"));
    };
    let turn_id = agent.cancel_turn()?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "turn_id": turn_id, "cancelling": true })),
    )
        .into_response())
}

async fn answer_input(
    State(state): State<AppState>,
    Path(request_id): Path<String>,
    body: Result<Json<InputAnswer>, JsonRejection>,
) -> Result<Response, Problem> {
    let Driver::Api(agent) = &state.driver else {
        return Err(wrong_kind("POST /v1/inputs/{request_id}", "tui"));
    };
    validate_id("request_id", &request_id)
        .map_err(|m| Problem::new(StatusCode::BAD_REQUEST, "invalid_id", m))?;
    let Json(answer) = body?;
    Ok(Json(agent.answer_input(&request_id, &answer)?).into_response())
}

async fn bind(
    State(state): State<AppState>,
    body: Result<Json<BindRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(req) = body?;
    let checked = super::bind::check(&req, &state.cfg.workdir)
        .map_err(|m| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_bind", m))?;
    let health = match &state.driver {
        Driver::Api(a) => a.bind(checked).await?,
        Driver::Tui(t) => t.bind(checked).await?,
    };
    Ok(Json(health).into_response())
}

/// The settings a message may choose (`model`, `agent`, `thinking`) and what the agent offers.
async fn agent_options(State(state): State<AppState>) -> Result<Response, Problem> {
    let Driver::Api(agent) = &state.driver else {
        return Err(wrong_kind("GET /v1/options", "tui"));
    };
    Ok(Json(agent.agent_options()).into_response())
}

async fn tty(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Problem> {
    let Driver::Tui(term) = &state.driver else {
        return Err(wrong_kind("GET /v1/tty", "api"));
    };
    let ws = ws.map_err(|e| {
        Problem::new(
            e.status(),
            "websocket_required",
            format!(
                "GET /v1/tty is a WebSocket; connect with a WebSocket client ({})",
                e.body_text()
            ),
        )
    })?;
    term.ready_for_attach().await?;
    let term = term.clone();
    Ok(ws
        .max_message_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| term.serve_viewer(socket)))
}

#[derive(serde::Deserialize)]
struct ListQuery {
    under: Option<String>,
}

async fn list_files(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, Problem> {
    let listing = super::files::list(state.cfg.workdir.clone(), q.under).await?;
    Ok(Json(listing).into_response())
}

async fn read_file(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<Response, Problem> {
    let bytes = super::files::read(state.cfg.workdir.clone(), path).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn write_file(
    State(state): State<AppState>,
    Path(path): Path<String>,
    body: bytes::Bytes,
) -> Result<Response, Problem> {
    let size = body.len();
    let created = super::files::write(state.cfg.workdir.clone(), path.clone(), body).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({ "path": path, "size": size })),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokem"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
    }
}
