/*!
One error type for every route, and its mapping to HTTP per protocol.

[`ApiError`] says what went wrong; [`ApiError::into_response_for`] turns it into the status
code and body that the route's protocol uses:

| error | KServe V1 | OIP (V2) generate | OpenAI |
|---|---|---|---|
| validation | 400 | 422 | 400 |
| unauthorized | 401 | 401 | 401 |
| model not found / no route | 404 | 404 | 404 |
| method not allowed | 405 | 405 | 405 |
| body too large | 413 | 413 | 413 |
| overloaded (queue full) | 429 + Retry-After | 429 + Retry-After | 429 + Retry-After |
| loading, draining, cancelled by shutdown | 503 | 503 | 503 |
| request timeout | 504 | 504 | 504 |
| generation failure | 500 | 424 | 500 |

KServe and OIP bodies are `{"error": "<message>", "error_type": "<tag>"}`; OpenAI bodies are
OpenAI's `{"error": {"message", "type", "param", "code"}}`. `error_type` is a stable
snake_case tag, also used as the `reason` label of the rejection metrics.
*/

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::params::ValidationError;

/// The wire protocol a route speaks; it decides status codes and error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// KServe V1 (`/v1/...`) and everything that is not a generation route.
    KserveV1,
    /// Open Inference Protocol, generate extension (`/v2/...`).
    KserveV2,
    /// OpenAI-compatible completions (`/openai/v1/...`).
    OpenAi,
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// The request is malformed or asks for something out of range.
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// No model by that name is served here.
    #[error("Model with name {0} does not exist.")]
    ModelNotFound(String),
    /// No such route.
    #[error("no route for {method} {path}")]
    RouteNotFound {
        /// The request method.
        method: String,
        /// The request path.
        path: String,
    },
    /// The route exists but not with this method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The request method.
        method: String,
        /// The request path.
        path: String,
    },
    /// The model is still loading (or warming up).
    #[error("Model with name {0} is not ready.")]
    NotReady(String),
    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down and accepts no new requests")]
    Draining,
    /// The server shut down before the request finished (its jobs were cancelled at the end
    /// of the shutdown timeout).
    #[error("the server shut down before the request finished")]
    Cancelled,
    /// The scheduler's queue is full.
    #[error("overloaded: {detail}")]
    Overloaded {
        /// Suggested wait before retrying.
        retry_after: Duration,
        /// What is full.
        detail: String,
    },
    /// Missing or wrong API key.
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// The body is larger than `--body-limit`.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The request did not finish within `--request-timeout`.
    #[error("the request did not finish within the request timeout of {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The model failed while generating.
    #[error("generation failed: {0}")]
    Generation(String),
    /// A bug or an unexpected condition on the server's side.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A stable snake_case tag for the body's `error_type` and for metric labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Validation(_) => "validation",
            Self::ModelNotFound(_) | Self::RouteNotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::NotReady(_) => "not_ready",
            Self::Draining => "draining",
            Self::Cancelled => "cancelled",
            Self::Overloaded { .. } => "overloaded",
            Self::Unauthorized => "unauthorized",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::Timeout(_) => "timeout",
            Self::Generation(_) => "generation",
            Self::Internal(_) => "internal",
        }
    }

    /// True for errors that refuse a request before any of its work starts.
    pub fn is_rejection(&self) -> bool {
        !matches!(
            self,
            Self::Timeout(_) | Self::Generation(_) | Self::Internal(_) | Self::Cancelled
        )
    }

    /// The status code under `protocol`.
    pub fn status(&self, protocol: Protocol) -> StatusCode {
        match self {
            Self::Validation(_) if protocol == Protocol::KserveV2 => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Validation(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotReady(_) | Self::Draining | Self::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Generation(_) if protocol == Protocol::KserveV2 => StatusCode::FAILED_DEPENDENCY,
            Self::Generation(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON error body under `protocol`.
    pub fn body(&self, protocol: Protocol) -> serde_json::Value {
        match protocol {
            Protocol::OpenAi => json!({
                "error": {
                    "message": self.to_string(),
                    "type": self.error_type(),
                    "param": self.param(),
                    "code": self.status(protocol).as_u16(),
                }
            }),
            _ => json!({"error": self.to_string(), "error_type": self.error_type()}),
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Self::Validation(v) => v.field().map(str::to_owned),
            _ => None,
        }
    }

    /// The full response under `protocol`; records the error in the metrics.
    pub fn into_response_for(self, protocol: Protocol) -> Response {
        let reason = self.error_type();
        if self.is_rejection() {
            metrics::counter!(crate::metrics::REQUEST_REJECTED, "reason" => reason).increment(1);
        } else {
            metrics::counter!(crate::metrics::REQUEST_FAILED, "reason" => reason).increment(1);
        }
        let status = self.status(protocol);
        let mut response = (status, Json(self.body(protocol))).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Overloaded { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1);
                if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                    headers.insert(header::RETRY_AFTER, v);
                }
            }
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Draining | Self::NotReady(_) | Self::Cancelled => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response.extensions_mut().insert(ErrorTag(reason));
        response
    }
}

/// Put on error responses so the request log line can name the error.
#[derive(Debug, Clone, Copy)]
pub struct ErrorTag(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_protocol() {
        let v = || ApiError::Validation(ValidationError::EmptyInstances);
        assert_eq!(v().status(Protocol::KserveV1), StatusCode::BAD_REQUEST);
        assert_eq!(
            v().status(Protocol::KserveV2),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(v().status(Protocol::OpenAi), StatusCode::BAD_REQUEST);
        let g = || ApiError::Generation("boom".into());
        assert_eq!(
            g().status(Protocol::KserveV2),
            StatusCode::FAILED_DEPENDENCY
        );
        assert_eq!(
            g().status(Protocol::KserveV1),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn overloaded_sets_retry_after() {
        let r = ApiError::Overloaded {
            retry_after: Duration::from_millis(200),
            detail: "queue full".into(),
        }
        .into_response_for(Protocol::KserveV1);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn openai_body_shape() {
        let b = ApiError::Unauthorized.body(Protocol::OpenAi);
        assert_eq!(b["error"]["code"], 401);
        assert_eq!(b["error"]["type"], "unauthorized");
        let b = ApiError::Unauthorized.body(Protocol::KserveV1);
        assert!(b["error"].as_str().unwrap().contains("API key"));
    }
}
