/*!
Logs and per-request bookkeeping.

[`init_logging`] sets up `tracing` (text or JSON lines on stderr, filtered by `RUST_LOG`,
default `info`). [`observe`] is the outermost layer of every route: it takes the request's
`x-request-id` (or makes one), echoes it on the response, opens the request's span, and hands
the handler a [`RequestRecord`] to fill in. When the last reference to the record is dropped
(after the response head for plain responses, after the last event for streams) it writes the
request's one log line and records its metrics: the request count by route, method and
status, the duration, and the rejection or failure by reason. That is the only place those
are counted.

The `route` label is the route pattern axum matched ([`MatchedPath`]), with a custom verb
shown as the wire spells it (`/v1/models/{name}:predict`), or `unmatched`; the `method` label
is one of the standard methods or `other`. Both sets are bounded whatever clients send.
*/

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;
use crate::error::{ErrorTag, InternalDetail};
use crate::metrics;

/// The request-id header.
pub const REQUEST_ID: &str = "x-request-id";

/// The route label of requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// Installs the global `tracing` subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second call (tests) finds a subscriber already set: keep it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The `method` label: a standard method's name, or `other`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// A request id: the client's if it is 1 to 128 visible ASCII characters, else a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()))
}

/// What one request did, for its log line and metrics. Handlers fill it in; it logs and
/// counts itself when the last reference goes.
#[derive(Debug)]
pub struct RequestRecord {
    /// The request id.
    pub id: String,
    method: &'static str,
    route: String,
    start: Instant,
    fields: Mutex<Fields>,
}

#[derive(Debug, Default)]
struct Fields {
    status: u16,
    error: Option<ErrorTag>,
    internal: Option<String>,
    generation: bool,
    stream: bool,
    sequences: usize,
    prompt_tokens: usize,
    generated_tokens: usize,
    first_token: Option<Duration>,
    queue_time: Option<Duration>,
    finish: Option<String>,
}

impl RequestRecord {
    /// A record for a request that arrived now.
    pub fn new(id: String, method: &Method, route: String) -> Self {
        Self {
            id,
            method: method_label(method),
            route,
            start: Instant::now(),
            fields: Mutex::new(Fields::default()),
        }
    }

    /// When the request arrived.
    pub fn start(&self) -> Instant {
        self.start
    }

    fn with(&self, f: impl FnOnce(&mut Fields)) {
        let mut guard = match self.fields.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard);
    }

    /// Marks the request as a generation (logged at info level whatever its outcome).
    pub fn set_generation(&self) {
        self.with(|f| f.generation = true);
    }

    /// Marks the request as streaming.
    pub fn set_stream(&self) {
        self.with(|f| f.stream = true);
    }

    /// Records that the request failed (a stream that ends with an error event).
    pub fn set_error(&self, tag: ErrorTag) {
        self.with(|f| f.error = Some(tag));
    }

    /// Adds one finished sequence's counts.
    pub fn add_sequence(&self, usage: &gptj_scheduler::Usage, finish: &str) {
        self.with(|f| {
            f.sequences += 1;
            f.prompt_tokens += usage.prompt_tokens;
            f.generated_tokens += usage.generated_tokens;
            f.queue_time = f.queue_time.max(Some(usage.queue_time));
            f.finish = Some(finish.to_owned());
        });
    }

    /// Notes when the first token of the request reached the response.
    pub fn first_token(&self) {
        let at = self.start.elapsed();
        self.with(|f| {
            f.first_token.get_or_insert(at);
        });
    }

    fn set_response(&self, response: &Response) {
        let tag = response.extensions().get::<ErrorTag>().copied();
        let internal = response
            .extensions()
            .get::<InternalDetail>()
            .map(|d| d.0.clone());
        self.with(|f| {
            f.status = response.status().as_u16();
            f.error = tag;
            f.internal = internal;
        });
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let f = match self.fields.get_mut() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        metrics::record_request(&self.route, self.method, f.status, f.error, elapsed);
        if let Some(detail) = &f.internal {
            tracing::error!(request_id = %self.id, detail = %detail, "internal error");
        }
        let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e3).round() as u64);
        // Probes and scrapes come every few seconds: their lines are debug-level unless they
        // fail, so the info log holds the traffic that matters.
        let quiet = f.status < 400 && !f.generation && f.error.is_none();
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    request_id = %self.id,
                    method = self.method,
                    route = %self.route,
                    status = f.status,
                    error = f.error.map(|e| e.error_type),
                    stream = f.stream,
                    sequences = f.sequences,
                    prompt_tokens = f.prompt_tokens,
                    generated_tokens = f.generated_tokens,
                    queue_ms = ms(f.queue_time),
                    first_token_ms = ms(f.first_token),
                    total_ms = (elapsed.as_secs_f64() * 1e3).round() as u64,
                    finish = f.finish.as_deref(),
                    "request"
                )
            };
        }
        if quiet {
            line!(debug);
        } else {
            line!(info);
        }
    }
}

/// The route label of a matched pattern: a custom verb segment (`/:predict`, see
/// [`crate::routes::split_custom_verb`]) is shown as the wire spells it (`:predict`).
pub fn route_label(matched: Option<&MatchedPath>) -> String {
    match matched {
        Some(m) => m.as_str().replace("/:", ":"),
        None => UNMATCHED.to_owned(),
    }
}

/// The outermost layer of every route; see the module docs.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let route = route_label(req.extensions().get::<MatchedPath>());
    let record = Arc::new(RequestRecord::new(id.clone(), req.method(), route));
    req.extensions_mut().insert(Arc::clone(&record));
    let span = tracing::info_span!("request", request_id = %id, route = %record.route);
    let mut response = next.run(req).instrument(span).await;
    record.set_response(&response);
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(method_label(&Method::POST), "POST");
        let made_up = Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&made_up), "other");
    }
}
