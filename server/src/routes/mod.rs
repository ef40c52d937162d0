/*!
The HTTP routes: one module per protocol, and the app that joins them.

- [`kserve_v1`]: the seed's API (`GET /`, `/v1/models`, `/v1/models/{name}`,
  `POST /v1/models/{name}:predict`);
- [`kserve_v2`]: Open Inference Protocol health and metadata, `/v2/models/{name}/infer`, and
  the generate extension (`/v2/models/{name}/generate`, `/generate_stream`);
- [`openai`]: `/openai/v1/completions` and `/openai/v1/chat/completions` (with `stream`; also
  at `/v1/...`), `/openai/v1/models`, and vLLM's `/tokenize` and `/detokenize`;
- `GET /metrics`: Prometheus text.

Each protocol hands over a group of routes with its [`Wire`]: the group's generation routes
get the API-key layer, and errors inside the group (401, 405) take its shape. A path that
matches no route gets a 404 in the shape of the group whose prefix it starts with.

Custom verbs: KServe's `:predict` sits inside a path segment (`/v1/models/{name}:predict`),
which axum's router cannot match. [`split_custom_verb`] rewrites a request's last segment
`NAME:verb` to `NAME/:verb` before routing, so the route table holds
`/v1/models/{name}/:predict` as a route of its own (and `GET` on it, or `POST` on
`/v1/models/{name}`, is a plain 405); the rewrite marks the request, and a path that arrives
already spelled `/:verb` is not routed. Paths are matched as sent: percent-encoding is not
decoded before routing, so `%3Apredict` is not the `:predict` verb.
*/

pub mod kserve_v1;
pub mod kserve_v2;
pub mod openai;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower::util::MapRequest;
use tower::ServiceExt;

use crate::auth::{require_key, Guard};
use crate::error::{ApiError, ErrorTag, Wire};
use crate::state::AppState;
use crate::telemetry;

/// The app as served: the router behind the custom-verb rewrite.
pub type App = MapRequest<Router, fn(Request) -> Request>;

/// Where each protocol's routes live, for the shape of 404s outside any route: OpenAI's own
/// `/v1/chat/...` and `/v1/completions/...` paths are OpenAI's, the rest of `/v1/` KServe V1's.
const PREFIXES: &[(&str, Wire)] = &[
    ("/openai/", Wire::OpenAi),
    ("/v1/chat/", Wire::OpenAi),
    ("/v1/completions/", Wire::OpenAi),
    ("/v2/", Wire::Oip),
];

/// The whole app (see the module docs). Layers, outermost first: the custom-verb rewrite;
/// request id, log line and request metrics ([`telemetry::observe`]); per group, the API-key
/// check on generation routes ([`require_key`]).
pub fn app(state: AppState) -> App {
    let f: fn(Request) -> Request = split_custom_verb;
    router(state).map_request(f)
}

/// An empty group of routes. axum 0.8 refuses path segments that start with `:` (0.7's
/// capture syntax) unless told otherwise, on every router merged into the app; the
/// custom-verb segment `/:predict` is one, so every group starts here.
pub fn group() -> Router<AppState> {
    Router::new().without_v07_checks()
}

/// The router alone (without the custom-verb rewrite).
pub fn router(state: AppState) -> Router {
    let (v1_open, v1_generation) = kserve_v1::routes();
    let (v2_open, v2_generation) = kserve_v2::routes();
    let keyed = |routes: Router<AppState>, wire: Wire| {
        let guard = Guard {
            state: state.clone(),
            wire,
        };
        routes
            .route_layer(from_fn_with_state(guard, require_key))
            .route_layer(from_fn_with_state(wire, errors_in))
    };
    let open = |routes: Router<AppState>, wire: Wire| {
        routes.route_layer(from_fn_with_state(wire, errors_in))
    };
    group()
        .merge(open(v1_open, Wire::KserveV1))
        .merge(keyed(v1_generation, Wire::KserveV1).route_layer(from_fn(only_via_custom_verb)))
        .merge(open(v2_open, Wire::Oip))
        .merge(keyed(v2_generation, Wire::Oip))
        .merge(keyed(openai::routes(), Wire::OpenAi))
        .merge(open(
            Router::new().route("/metrics", get(metrics)),
            Wire::KserveV1,
        ))
        .fallback(not_found)
        .layer(from_fn(telemetry::observe))
        .layer(from_fn(close_if_unread))
        .with_state(state)
}

/// Says `Connection: close` on a response sent before the request's body was read to its
/// end (a 401, 404, 405, 413, 408 or 503 answered early): the rest of the body is still on
/// the wire, so the connection cannot carry another request, and a pooled client must know
/// before it tries.
async fn close_if_unread(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if http_body::Body::is_end_stream(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let ended = Arc::new(AtomicBool::new(false));
    let body = axum::body::Body::new(WatchEnd {
        inner: body,
        ended: Arc::clone(&ended),
    });
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if !ended.load(Ordering::SeqCst) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A request body that notes when it has been read to its end.
struct WatchEnd {
    inner: axum::body::Body,
    ended: Arc<AtomicBool>,
}

impl http_body::Body for WatchEnd {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.ended.store(true, Ordering::SeqCst);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Marks a request whose last path segment's custom verb was moved into a segment of its own.
#[derive(Debug, Clone, Copy)]
struct CustomVerb;

/// Rewrites a last path segment `NAME:verb` to `NAME/:verb` (see the module docs).
pub fn split_custom_verb(mut req: Request) -> Request {
    let uri = req.uri();
    let path = uri.path();
    let last = path.rfind('/').map_or(0, |i| i + 1);
    let Some(colon) = path[last..]
        .find(':')
        .map(|c| last + c)
        .filter(|&c| c > last)
    else {
        return req;
    };
    let rewritten = match uri.query() {
        Some(q) => format!("{}/{}?{q}", &path[..colon], &path[colon..]),
        None => format!("{}/{}", &path[..colon], &path[colon..]),
    };
    let mut parts = uri.clone().into_parts();
    match rewritten.parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return req,
    }
    if let Ok(new) = Uri::from_parts(parts) {
        *req.uri_mut() = new;
        req.extensions_mut().insert(CustomVerb);
    }
    req
}

/// Routes spelled `/:verb` are reached only through [`split_custom_verb`].
async fn only_via_custom_verb(req: Request, next: Next) -> Response {
    if req.extensions().get::<CustomVerb>().is_some() {
        return next.run(req).await;
    }
    ApiError::RouteNotFound {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    }
    .into_response(Wire::KserveV1)
}

/// The group's error shape for what axum answers itself inside it: 405 on a known path.
async fn errors_in(State(wire): State<Wire>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = original_path(req.uri());
    let response = next.run(req).await;
    // axum's own 405 (no ErrorTag: not one of ours) gets the group's body; axum adds the
    // `Allow` header on the way out.
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && response.extensions().get::<ErrorTag>().is_none()
    {
        return ApiError::MethodNotAllowed { method, path }.into_response(wire);
    }
    response
}

/// The path as the client spelled it (undoing [`split_custom_verb`]), for messages.
fn original_path(uri: &Uri) -> String {
    uri.path().replace("/:", ":")
}

/// `GET /metrics`: the Prometheus text exposition.
async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics() {
        Some(h) => {
            state.record_gauges();
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                h.render(),
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

async fn not_found(req: Request) -> Response {
    let path = original_path(req.uri());
    let wire = PREFIXES
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .map_or(Wire::KserveV1, |(_, w)| *w);
    ApiError::RouteNotFound {
        method: req.method().to_string(),
        path,
    }
    .into_response(wire)
}

#[cfg(test)]
mod tests;
