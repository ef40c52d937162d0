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
    ApiError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    }
    .into_response_for(auth::protocol_of(req.uri().path()))
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

/// The request's tenant: the configured header's value if sent, else the API key that
/// authenticated it (`key-<n>`), else none (one shared anonymous tenant).
pub fn tenant(
    state: &AppState,
    headers: &HeaderMap,
    key: Option<auth::KeyIndex>,
) -> Option<String> {
    headers
        .get(&state.config().tenant_header)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().chars().take(128).collect::<String>())
        .filter(|s| !s.is_empty())
        .or_else(|| key.map(|k| format!("key-{}", k.0)))
}

/// Turns a handler's result into a response in `protocol`.
pub fn respond(result: Result<Response, ApiError>, protocol: Protocol) -> Response {
    result.unwrap_or_else(|e| e.into_response_for(protocol))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use clap::Parser;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::config::ServerConfig;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        serve: crate::cli::ServeArgs,
    }

    fn state(extra: &[&str]) -> AppState {
        let mut args = vec!["t", "--model", "builtin:tiny"];
        args.extend_from_slice(extra);
        let config = ServerConfig::from_args(&T::parse_from(args).serve).unwrap();
        AppState::new(config, None)
    }

    async fn call(app: Router, method: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_owned()))
            .unwrap();
        let r = app.oneshot(req).await.unwrap();
        let status = r.status();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn not_ready_while_loading() {
        let s = state(&[]);
        let app = router(s.clone());
        let (st, v) = call(app.clone(), "GET", "/v1/models/eleutherai-gpt-j-6b", "").await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            v["error"],
            "Model with name eleutherai-gpt-j-6b is not ready."
        );
        let (st, _) = call(app.clone(), "GET", "/v2/health/ready", "").await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        let (st, v) = call(app.clone(), "GET", "/", "").await;
        assert_eq!((st, v["status"].as_str()), (StatusCode::OK, Some("alive")));
        let (st, v) = call(
            app.clone(),
            "POST",
            "/v1/models/eleutherai-gpt-j-6b:predict",
            r#"{"instances": ["a"]}"#,
        )
        .await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error_type"], "not_ready");
        let (st, _) = call(app.clone(), "GET", "/v1/models/other", "").await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        // Draining answers 503 too, with its own reason.
        s.start_draining();
        let (st, v) = call(
            app,
            "POST",
            "/v2/models/eleutherai-gpt-j-6b/generate",
            r#"{"text_input": "a"}"#,
        )
        .await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error_type"], "draining");
        assert_eq!(s.in_flight(), 0);
    }

    #[tokio::test]
    async fn keys_checked_before_anything_else() {
        let app = router(state(&["--api-key", "k"]));
        let (st, v) = call(app.clone(), "POST", "/openai/v1/completions", "{}").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_eq!(v["error"]["type"], "unauthorized");
        let (st, _) = call(app, "GET", "/v1/models/eleutherai-gpt-j-6b", "").await;
        assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn unknown_routes_and_methods() {
        let app = router(state(&[]));
        let (st, v) = call(app.clone(), "GET", "/nope", "").await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert!(v["error"].as_str().unwrap().contains("/nope"));
        let (st, _) = call(app, "DELETE", "/v1/models", "").await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    }
}
