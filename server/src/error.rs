/*!
One error type for every route, and its mapping to HTTP per wire protocol.

[`ApiError`] says what went wrong; [`ApiError::into_response`] turns it into the status code
and body of the route group's [`Wire`]:

| error | KServe V1 | OIP (V2) | OpenAI |
|---|---|---|---|
| validation | 400 | 422 | 400 |
| unauthorized | 401 | 401 | 401 |
| model not found / no route | 404 | 404 | 404 |
| method not allowed | 405 | 405 | 405 |
| body too large | 413 | 413 | 413 |
| body too slow | 408 | 408 | 408 |
| overloaded (queue full) | 429 + Retry-After | 429 + Retry-After | 429 + Retry-After |
| loading, draining, cancelled by shutdown | 503 | 503 | 503 |
| request timeout | 504 | 504 | 504 |
| generation failure | 500 | 424 | 500 |
| internal | 500 | 500 | 500 |

KServe and OIP bodies are `{"error": "<message>", "error_type": "<tag>"}`; OpenAI bodies are
OpenAI's `{"error": {"message", "type", "param", "code"}}`, with one of OpenAI's `type`s
([`ApiError::openai_type`]) and the tag as `code`. The tag (`error_type`) is a stable
snake_case word, also the `reason` label of the rejection and failure metrics.

Errors that the same request would meet again (validation, 401, 404, 405, 413, 504) carry
`x-should-retry: false`, which OpenAI's SDKs obey instead of their own rule (they retry every
5xx, so a 504 would run the request twice more).

The conversion has no side effects: the response carries an [`ErrorTag`] (and, for internal
errors, the detail the client is not shown), which the request's log record reads, logs and
counts ([`crate::telemetry`]).
*/

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::params::ValidationError;

/// The header OpenAI's SDKs read to decide whether to retry (it overrides their status rule).
pub const SHOULD_RETRY: &str = "x-should-retry";

/// The wire protocol of a route group: it decides status codes and error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// KServe V1 (`/v1/...`) and everything outside the other groups.
    KserveV1,
    /// Open Inference Protocol (`/v2/...`).
    Oip,
    /// OpenAI-compatible (`/openai/v1/...`).
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
    #[error(
        "method {method} is not allowed on {path}; the Allow header lists the methods it takes"
    )]
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
    /// The body did not arrive within `--body-read-timeout`.
    #[error("the request body did not arrive within {} s", .0.as_secs_f64())]
    BodyTimeout(Duration),
    /// The body could not be read (the client sent a broken or truncated one).
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// The request did not finish within `--request-timeout`.
    #[error("the request did not finish within the request timeout of {} s", .0.as_secs_f64())]
    Timeout(Duration),
    /// The model failed while generating.
    #[error("generation failed: {0}")]
    Generation(String),
    /// A bug or an unexpected condition on the server's side. The detail goes to the log,
    /// not to the client.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What kind of failure a response reports, put on error responses (and set by streams that
/// end in an error) so the request's log line and metrics can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorTag {
    /// The stable tag (`validation`, `overloaded`, ...).
    pub error_type: &'static str,
    /// Refused before any work started (`gptj_request_rejected_total`), or failed after
    /// (`gptj_request_failed_total`).
    pub rejected: bool,
}

/// Every `error_type` tag, and whether it is a rejection (before work started) or a failure.
/// The metrics start each one's series at zero.
pub const ERROR_TYPES: &[(&str, bool)] = &[
    ("validation", true),
    ("not_found", true),
    ("method_not_allowed", true),
    ("not_ready", true),
    ("draining", true),
    ("overloaded", true),
    ("unauthorized", true),
    ("payload_too_large", true),
    ("body_timeout", true),
    ("cancelled", false),
    ("timeout", false),
    ("generation", false),
    ("internal", false),
];

/// The detail of an internal error, for the log only.
#[derive(Debug, Clone)]
pub struct InternalDetail(pub String);

impl ApiError {
    /// A stable snake_case tag for the body's `error_type` and for metric labels.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Validation(_) | Self::BadBody(_) => "validation",
            Self::ModelNotFound(_) | Self::RouteNotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::NotReady(_) => "not_ready",
            Self::Draining => "draining",
            Self::Cancelled => "cancelled",
            Self::Overloaded { .. } => "overloaded",
            Self::Unauthorized => "unauthorized",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BodyTimeout(_) => "body_timeout",
            Self::Timeout(_) => "timeout",
            Self::Generation(_) => "generation",
            Self::Internal(_) => "internal",
        }
    }

    /// OpenAI's error `type` for this error: what OpenAI's API answers with the same status.
    pub fn openai_type(&self) -> &'static str {
        match self {
            Self::Validation(_)
            | Self::BadBody(_)
            | Self::MethodNotAllowed { .. }
            | Self::PayloadTooLarge { .. }
            | Self::BodyTimeout(_) => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::ModelNotFound(_) | Self::RouteNotFound { .. } => "not_found_error",
            Self::Overloaded { .. } => "rate_limit_error",
            Self::NotReady(_)
            | Self::Draining
            | Self::Cancelled
            | Self::Timeout(_)
            | Self::Generation(_) => "server_error",
            Self::Internal(_) => "api_error",
        }
    }

    /// Whether the same request sent again cannot succeed: `x-should-retry: false`.
    pub fn retry_is_futile(&self) -> bool {
        matches!(
            self,
            Self::Validation(_)
                | Self::BadBody(_)
                | Self::Unauthorized
                | Self::ModelNotFound(_)
                | Self::RouteNotFound { .. }
                | Self::MethodNotAllowed { .. }
                | Self::PayloadTooLarge { .. }
                | Self::Timeout(_)
        )
    }

    /// The tag of this error for logs and metrics.
    pub fn tag(&self) -> ErrorTag {
        ErrorTag {
            error_type: self.error_type(),
            rejected: !matches!(
                self,
                Self::Timeout(_) | Self::Generation(_) | Self::Internal(_) | Self::Cancelled
            ),
        }
    }

    /// The status code under `wire`.
    pub fn status(&self, wire: Wire) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadBody(_) if wire == Wire::Oip => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Validation(_) | Self::BadBody(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotReady(_) | Self::Draining | Self::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Generation(_) if wire == Wire::Oip => StatusCode::FAILED_DEPENDENCY,
            Self::Generation(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message the client sees: the error itself, except for internal errors, whose
    /// detail stays in the server's log.
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => {
                "internal server error; the server's log has the details under this request's \
                 x-request-id"
                    .to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The JSON error body under `wire`.
    pub fn body(&self, wire: Wire) -> serde_json::Value {
        match wire {
            Wire::OpenAi => json!({
                "error": {
                    "message": self.public_message(),
                    "type": self.openai_type(),
                    "param": self.param(),
                    "code": self.error_type(),
                }
            }),
            Wire::KserveV1 | Wire::Oip => {
                json!({"error": self.public_message(), "error_type": self.error_type()})
            }
        }
    }

    /// The request field the error is about, when there is one (OpenAI's `param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::Validation(v) => v.field(),
            _ => None,
        }
    }

    /// The full response under `wire`: status, body, `Retry-After`, `WWW-Authenticate` or
    /// `x-should-retry` where they apply, and the [`ErrorTag`] extension.
    pub fn into_response(self, wire: Wire) -> Response {
        let status = self.status(wire);
        let mut response = (status, Json(self.body(wire))).into_response();
        let headers = response.headers_mut();
        match &self {
            Self::Overloaded { retry_after, .. } => {
                let secs = retry_after.as_secs().max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Draining | Self::NotReady(_) | Self::Cancelled => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        if self.retry_is_futile() {
            headers.insert(SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        response.extensions_mut().insert(self.tag());
        if let Self::Internal(detail) = self {
            response.extensions_mut().insert(InternalDetail(detail));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_wire() {
        let v = || ApiError::Validation(ValidationError::EmptyInstances);
        assert_eq!(v().status(Wire::KserveV1), StatusCode::BAD_REQUEST);
        assert_eq!(v().status(Wire::Oip), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(v().status(Wire::OpenAi), StatusCode::BAD_REQUEST);
        let g = || ApiError::Generation("boom".into());
        assert_eq!(g().status(Wire::Oip), StatusCode::FAILED_DEPENDENCY);
        assert_eq!(
            g().status(Wire::KserveV1),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn overloaded_sets_retry_after() {
        let r = ApiError::Overloaded {
            retry_after: Duration::from_millis(200),
            detail: "queue full".into(),
        }
        .into_response(Wire::KserveV1);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let tag = r.extensions().get::<ErrorTag>().copied();
        assert_eq!(
            tag,
            Some(ErrorTag {
                error_type: "overloaded",
                rejected: true
            })
        );
    }

    #[test]
    fn openai_body_shape() {
        let b = ApiError::Unauthorized.body(Wire::OpenAi);
        assert_eq!(b["error"]["code"], "unauthorized");
        assert_eq!(b["error"]["type"], "authentication_error");
        let e = ApiError::Validation(ValidationError::EmptyInstances);
        assert_eq!(
            e.body(Wire::OpenAi)["error"]["type"],
            "invalid_request_error"
        );
        let e = ApiError::ModelNotFound("m".into());
        assert_eq!(e.body(Wire::OpenAi)["error"]["type"], "not_found_error");
        let b = ApiError::Unauthorized.body(Wire::KserveV1);
        assert!(b["error"].as_str().unwrap().contains("API key"));
    }

    #[test]
    fn every_tag_is_listed_with_its_kind() {
        let d = Duration::from_secs(1);
        let all = [
            ApiError::Validation(ValidationError::EmptyInstances),
            ApiError::ModelNotFound("m".into()),
            ApiError::RouteNotFound {
                method: "GET".into(),
                path: "/".into(),
            },
            ApiError::MethodNotAllowed {
                method: "GET".into(),
                path: "/".into(),
            },
            ApiError::NotReady("m".into()),
            ApiError::Draining,
            ApiError::Cancelled,
            ApiError::Overloaded {
                retry_after: d,
                detail: String::new(),
            },
            ApiError::Unauthorized,
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::BodyTimeout(d),
            ApiError::BadBody(String::new()),
            ApiError::Timeout(d),
            ApiError::Generation(String::new()),
            ApiError::Internal(String::new()),
        ];
        for e in all {
            let tag = e.tag();
            assert!(
                ERROR_TYPES.contains(&(tag.error_type, tag.rejected)),
                "{tag:?} is not in ERROR_TYPES"
            );
        }
    }

    #[test]
    fn futile_retries_are_marked() {
        let r = ApiError::Timeout(Duration::from_secs(1)).into_response(Wire::OpenAi);
        assert_eq!(r.headers()[SHOULD_RETRY], "false");
        let r = ApiError::PayloadTooLarge { limit: 1 }.into_response(Wire::KserveV1);
        assert_eq!(r.headers()[SHOULD_RETRY], "false");
        let r = ApiError::Draining.into_response(Wire::OpenAi);
        assert!(r.headers().get(SHOULD_RETRY).is_none());
        let r = ApiError::Overloaded {
            retry_after: Duration::from_secs(1),
            detail: String::new(),
        }
        .into_response(Wire::OpenAi);
        assert!(r.headers().get(SHOULD_RETRY).is_none());
    }

    #[test]
    fn internal_details_stay_in_the_log() {
        let r = ApiError::Internal("mutex poisoned at x.rs:3".into()).into_response(Wire::OpenAi);
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let detail = r.extensions().get::<InternalDetail>().map(|d| d.0.clone());
        assert_eq!(detail.as_deref(), Some("mutex poisoned at x.rs:3"));
        let body = ApiError::Internal("mutex poisoned".into()).body(Wire::KserveV1);
        assert!(!body["error"].as_str().unwrap().contains("mutex"), "{body}");
    }

    #[test]
    fn typed_fields_reach_the_wire() {
        let e = ApiError::from(ValidationError::ContextOverflow {
            at: "prompt 0".into(),
            field: "max_tokens".into(),
            prompt_tokens: 10,
            new_tokens: 4000,
            context: 2048,
        });
        assert_eq!(e.body(Wire::OpenAi)["error"]["param"], "max_tokens");
    }
}
