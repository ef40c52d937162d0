/*!
Logs and per-request bookkeeping.

[`init_logging`] sets up `tracing` (text or JSON lines on stderr, filtered by `RUST_LOG`,
default `info`). [`observe`] is the outermost middleware: it takes the request's
`x-request-id` (or makes one), echoes it on the response, opens the request's span, counts
the request by route and status, and hands the handler a [`RequestRecord`] to fill in.
When the last reference to the record is dropped (after the response head for plain
responses, after the last event for streams) it writes the request's one log line and its
duration histogram.
*/

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;
use crate::error::ErrorTag;

/// The request-id header.
pub const REQUEST_ID: &str = "x-request-id";

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

/// The route label of a request: its route pattern, never the raw path (so label values
/// stay few).
pub fn route_label(method: &Method, path: &str) -> &'static str {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match (method.as_str(), segs.as_slice()) {
        (_, [] | [""]) => "/",
        (_, ["metrics"]) => "/metrics",
        (_, ["v1", "models"]) => "/v1/models",
        ("POST", ["v1", "models", m]) if m.ends_with(":predict") => "/v1/models/{name}:predict",
        (_, ["v1", "models", _]) => "/v1/models/{name}",
        (_, ["v2"]) => "/v2",
        (_, ["v2", "health", "live"]) => "/v2/health/live",
        (_, ["v2", "health", "ready"]) => "/v2/health/ready",
        (_, ["v2", "models", _]) => "/v2/models/{name}",
        (_, ["v2", "models", _, "ready"]) => "/v2/models/{name}/ready",
        (_, ["v2", "models", _, "generate"]) => "/v2/models/{name}/generate",
        (_, ["v2", "models", _, "generate_stream"]) => "/v2/models/{name}/generate_stream",
        (_, ["openai", "v1", "models"]) => "/openai/v1/models",
        (_, ["openai", "v1", "completions"]) => "/openai/v1/completions",
        _ => "unmatched",
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

/// What one request did, for its log line. Handlers fill it in; it logs itself when the last
/// reference goes.
#[derive(Debug)]
pub struct RequestRecord {
    /// The request id.
    pub id: String,
    method: Method,
    route: &'static str,
    start: Instant,
    fields: Mutex<Fields>,
}

#[derive(Debug, Default)]
struct Fields {
    status: u16,
    error: Option<&'static str>,
    stream: bool,
    sequences: usize,
    prompt_tokens: usize,
    generated_tokens: usize,
    first_token: Option<Duration>,
    queue_time: Option<Duration>,
    finish: Option<String>,
}

impl RequestRecord {
    /// When the request arrived.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Marks the request as streaming.
    pub fn set_stream(&self) {
        if let Ok(mut f) = self.fields.lock() {
            f.stream = true;
        }
    }

    /// Adds one finished sequence's counts.
    pub fn add_sequence(&self, usage: &gptj_scheduler::Usage, finish: &str) {
        if let Ok(mut f) = self.fields.lock() {
            f.sequences += 1;
            f.prompt_tokens += usage.prompt_tokens;
            f.generated_tokens += usage.generated_tokens;
            f.queue_time = f.queue_time.max(Some(usage.queue_time));
            f.finish = Some(finish.to_owned());
        }
    }

    /// Notes when the first token of the request reached the response.
    pub fn first_token(&self) {
        if let Ok(mut f) = self.fields.lock() {
            if f.first_token.is_none() {
                f.first_token = Some(self.start.elapsed());
            }
        }
    }

    fn set_status(&self, status: u16, error: Option<&'static str>) {
        if let Ok(mut f) = self.fields.lock() {
            f.status = status;
            f.error = error;
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        metrics::histogram!(crate::metrics::HTTP_REQUEST_DURATION, "route" => self.route)
            .record(elapsed.as_secs_f64());
        let f = match self.fields.get_mut() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e3).round() as u64);
        // Probes and scrapes come every few seconds: their lines are debug-level unless they
        // fail, so the info log holds the traffic that matters.
        let quiet = f.status < 400
            && !self.route.contains("predict")
            && !self.route.contains("generate")
            && !self.route.contains("completions");
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    request_id = %self.id,
                    method = %self.method,
                    route = self.route,
                    status = f.status,
                    error = f.error,
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

/// The outermost middleware; see the module docs.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    let route = route_label(req.method(), req.uri().path());
    let record = Arc::new(RequestRecord {
        id: id.clone(),
        method: req.method().clone(),
        route,
        start: Instant::now(),
        fields: Mutex::new(Fields::default()),
    });
    req.extensions_mut().insert(Arc::clone(&record));
    let method = req.method().to_string();
    let span = tracing::info_span!("request", request_id = %id, route);
    let mut response = next.run(req).instrument(span).await;
    let status = response.status().as_u16();
    let error = response.extensions().get::<ErrorTag>().map(|t| t.0);
    record.set_status(status, error);
    metrics::counter!(
        crate::metrics::HTTP_REQUESTS,
        "route" => route,
        "method" => method,
        "status" => status.to_string()
    )
    .increment(1);
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels() {
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            route_label(&post, "/v1/models/x:predict"),
            "/v1/models/{name}:predict"
        );
        assert_eq!(route_label(&get, "/v1/models/x"), "/v1/models/{name}");
        assert_eq!(route_label(&get, "/"), "/");
        assert_eq!(
            route_label(&post, "/v2/models/x/generate_stream"),
            "/v2/models/{name}/generate_stream"
        );
        assert_eq!(route_label(&get, "/etc/passwd"), "unmatched");
    }
}
