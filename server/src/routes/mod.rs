/*!
The HTTP routes, one module per protocol, and the app that joins them.

- [`kserve_v1`]: the seed's API (`GET /`, `/v1/models`, `/v1/models/{name}`,
  `POST /v1/models/{name}:predict`);
- [`kserve_v2`]: Open Inference Protocol health and metadata, and the generate extension
  (`/v2/models/{name}/generate`, `/generate_stream`);
- [`openai`]: `/openai/v1/completions` (with `stream`) and `/openai/v1/models`;
- `GET /metrics`: Prometheus text.
*/

pub mod kserve_v1;
pub mod kserve_v2;
pub mod openai;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{Map, Value};

use crate::error::{ApiError, Protocol};
use crate::params::parse_body;
use crate::state::AppState;
use crate::{auth, telemetry};

/// The whole app. Layers, outermost first: request id, log line and request metrics
/// ([`telemetry::observe`]); API keys ([`auth::require_key`]); the body-size limit.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config().body_limit;
    Router::new()
        .merge(kserve_v1::routes())
        .merge(kserve_v2::routes())
        .merge(openai::routes())
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // `layer` wraps what is already there: the last one added runs first.
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(from_fn_with_state(state.clone(), auth::require_key))
        .layer(from_fn(telemetry::observe))
        .with_state(state)
}

/// `GET /metrics`: the Prometheus text exposition.
async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics() {
        Some(h) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::RouteNotFound {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    }
    .into_response_for(auth::protocol_of(req.uri().path()))
}

async fn method_not_allowed(req: Request) -> Response {
    let mut r = ApiError::RouteNotFound {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    }
    .into_response_for(auth::protocol_of(req.uri().path()));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

/// The request body as a JSON object, or the error: 413 past the body limit, 400/422 for
/// anything that is not a JSON object. The content type is not checked: `curl -d` sends
/// `application/x-www-form-urlencoded`, and the seed's commands must work as they are.
pub fn json_object(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Map<String, Value>, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: limit as u64,
            }
        } else {
            ApiError::Validation(crate::params::ValidationError::BadJson(
                rejection.body_text(),
            ))
        }
    })?;
    Ok(parse_body(&bytes)?)
}

/// 404 unless `name` is the served model.
pub fn check_model(state: &AppState, name: &str) -> Result<(), ApiError> {
    if name == state.config().model_name {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(name.to_owned()))
    }
}

/// The tenant named by the configured header, if any.
pub fn tenant(state: &AppState, headers: &HeaderMap) -> Option<String> {
    headers
        .get(&state.config().tenant_header)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().chars().take(128).collect::<String>())
        .filter(|s| !s.is_empty())
}

/// Turns a handler's result into a response in `protocol`.
pub fn respond(result: Result<Response, ApiError>, protocol: Protocol) -> Response {
    result.unwrap_or_else(|e| e.into_response_for(protocol))
}
