/*!
Prometheus metrics: the recorder behind `GET /metrics`, every histogram's buckets, and the
metrics only the HTTP layer sees.

Each metric is declared once, by the layer that records it: the engine loop's (running and
waiting sequences, KV use, preemptions, token counters, per-sequence latencies) in
[`gptj_scheduler::metrics`], the HTTP layer's here. Names follow vLLM's
(`vllm:time_to_first_token_seconds` becomes `gptj_time_to_first_token_seconds`) with vLLM's
bucket lists, so existing dashboards need only a prefix change. docs/metrics.md lists them
all with their labels.
*/

use std::time::Duration;

use gptj_scheduler::metrics as sched;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ErrorTag;

/// Counter: HTTP requests answered, by `route` (the matched route pattern), `method` and
/// `status`.
pub const HTTP_REQUESTS: &str = "gptj_http_requests_total";
/// Histogram: time from a request's arrival to the last byte of its response, by `route`.
pub const HTTP_REQUEST_DURATION: &str = "gptj_http_request_duration_seconds";
/// Gauge: generation requests being served now.
pub const REQUESTS_IN_FLIGHT: &str = "gptj_http_requests_in_flight";
/// Counter: requests refused before any work started, by `reason` (the error's `error_type`).
pub const REQUEST_REJECTED: &str = "gptj_request_rejected_total";
/// Counter: requests that failed after work started, by `reason`.
pub const REQUEST_FAILED: &str = "gptj_request_failed_total";
/// Histogram: prompt length of each finished sequence.
pub const REQUEST_PROMPT_TOKENS: &str = "gptj_request_prompt_tokens";
/// Histogram: generated length of each finished sequence.
pub const REQUEST_GENERATION_TOKENS: &str = "gptj_request_generation_tokens";
/// Gauge: 1 when the model is loaded and the server takes work, 0 while loading or draining.
pub const SERVER_READY: &str = "gptj_server_ready";
/// Gauge: 1 while the engine thread runs, 0 once it has stopped.
pub const ENGINE_ALIVE: &str = "gptj_engine_alive";
/// Gauge: TCP connections open.
pub const CONNECTIONS_OPEN: &str = "gptj_http_connections_open";
/// Gauge, labels `block_size` and `num_gpu_blocks`: 1; the KV cache's geometry, for
/// prefix-aware routers (vLLM's `cache_config_info`).
pub const CACHE_CONFIG_INFO: &str = "gptj_cache_config_info";
/// Counter: connections refused at `--max-connections`.
pub const CONNECTIONS_REFUSED: &str = "gptj_http_connections_refused_total";

/// vLLM's TTFT buckets.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request-latency buckets (end-to-end, queue), the default for any histogram not
/// listed.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Finer buckets for HTTP durations, which include fast answers (health, errors).
pub const HTTP_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
];
/// vLLM's 1-2-5 token-count buckets up to the 2048-token context.
pub const TOKEN_COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
];
/// vLLM's tokens-per-step buckets.
pub const ITERATION_TOKEN_BUCKETS: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
/// Step-time buckets (one engine forward pass).
pub const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide recorder with every histogram's buckets and describes every
/// metric, the scheduler's included. Call once, before the scheduler starts.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = builder()?.install_recorder()?;
    describe();
    sched::describe();
    Ok(handle)
}

/// The exporter configuration: the buckets of each histogram, by its full name.
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    let buckets: [(&str, &[f64]); 7] = [
        (HTTP_REQUEST_DURATION, HTTP_DURATION_BUCKETS),
        (REQUEST_PROMPT_TOKENS, TOKEN_COUNT_BUCKETS),
        (REQUEST_GENERATION_TOKENS, TOKEN_COUNT_BUCKETS),
        (sched::TIME_TO_FIRST_TOKEN, TTFT_BUCKETS),
        (sched::INTER_TOKEN_LATENCY, ITL_BUCKETS),
        (sched::ITERATION_TOKENS, ITERATION_TOKEN_BUCKETS),
        (sched::STEP_DURATION, STEP_BUCKETS),
    ];
    let mut b = PrometheusBuilder::new().set_buckets(REQUEST_LATENCY_BUCKETS)?;
    for (name, list) in buckets {
        b = b.set_buckets_for_metric(Matcher::Full(name.to_owned()), list)?;
    }
    Ok(b)
}

/// Records one answered request: its count, duration and, if it failed, the reason.
pub fn record_request(
    route: &str,
    method: &'static str,
    status: u16,
    error: Option<ErrorTag>,
    elapsed: Duration,
) {
    metrics::counter!(
        HTTP_REQUESTS,
        "route" => route.to_owned(),
        "method" => method,
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION, "route" => route.to_owned())
        .record(elapsed.as_secs_f64());
    if let Some(tag) = error {
        let name = if tag.rejected {
            REQUEST_REJECTED
        } else {
            REQUEST_FAILED
        };
        metrics::counter!(name, "reason" => tag.error_type).increment(1);
    }
}

/// A connection was accepted.
pub fn connection_opened() {
    metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
}

/// An accepted connection ended.
pub fn connection_closed() {
    metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
}

/// A connection was refused at the cap.
pub fn connection_refused() {
    metrics::counter!(CONNECTIONS_REFUSED).increment(1);
}

/// Publishes the KV cache's geometry once the model is loaded.
pub fn cache_config(block_size: usize, num_blocks: usize) {
    metrics::gauge!(
        CACHE_CONFIG_INFO,
        "block_size" => block_size.to_string(),
        "num_gpu_blocks" => num_blocks.to_string()
    )
    .set(1.0);
}

/// Describes the metrics this crate records (help text and units), and starts every series
/// whose labels are known in advance at zero, so a fresh server exposes them before the
/// first event. (`gptj_http_requests_total` and the request duration appear per route and
/// status as requests come; `gptj_cache_config_info` once the model is loaded.)
pub fn describe() {
    for name in [
        REQUESTS_IN_FLIGHT,
        SERVER_READY,
        ENGINE_ALIVE,
        CONNECTIONS_OPEN,
    ] {
        metrics::gauge!(name).set(0.0);
    }
    metrics::counter!(CONNECTIONS_REFUSED).absolute(0);
    for (reason, rejected) in crate::error::ERROR_TYPES {
        let name = if *rejected {
            REQUEST_REJECTED
        } else {
            REQUEST_FAILED
        };
        metrics::counter!(name, "reason" => *reason).absolute(0);
    }
    for name in [REQUEST_PROMPT_TOKENS, REQUEST_GENERATION_TOKENS] {
        let _ = metrics::histogram!(name);
    }
    describe_gauge!(
        CACHE_CONFIG_INFO,
        "KV cache geometry: block_size and num_gpu_blocks labels, value 1"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route, method and status"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION,
        Unit::Seconds,
        "Time from a request's arrival to the last byte of its response"
    );
    describe_gauge!(REQUESTS_IN_FLIGHT, "Generation requests being served");
    describe_counter!(
        REQUEST_REJECTED,
        "Requests refused before any work started, by reason"
    );
    describe_counter!(
        REQUEST_FAILED,
        "Requests that failed after work started, by reason"
    );
    describe_histogram!(
        REQUEST_PROMPT_TOKENS,
        "Prompt length of each finished sequence"
    );
    describe_histogram!(
        REQUEST_GENERATION_TOKENS,
        "Generated length of each finished sequence"
    );
    describe_gauge!(
        SERVER_READY,
        "1 when the model is loaded and the server takes work, 0 while loading or draining"
    );
    describe_gauge!(CONNECTIONS_OPEN, "TCP connections open");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused because --max-connections were open"
    );
    describe_gauge!(
        ENGINE_ALIVE,
        "1 while the engine thread runs, 0 once it has stopped"
    );
}
