/*!
Prometheus metrics: the names the server records, their descriptions and buckets, and the
recorder behind `GET /metrics`.

Names follow vLLM's (`vllm:time_to_first_token_seconds` becomes
`gptj_time_to_first_token_seconds`) with vLLM's bucket lists, so existing dashboards need
only a prefix change. The scheduler records the engine-side metrics (running and waiting
sequences, KV usage, preemptions, token counters, per-sequence latencies) with the same
`metrics` facade; this module installs the one recorder they all go to, sets the buckets of
every histogram, and records what only the HTTP layer sees (requests by route and status,
rejections by reason, in-flight requests). docs/metrics.md lists them all.
*/

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// HTTP requests answered, by `route` (the matched route pattern), `method` and `status`.
pub const HTTP_REQUESTS: &str = "gptj_http_requests_total";
/// Time from a request's arrival to the last byte of its response, by `route`.
pub const HTTP_REQUEST_DURATION: &str = "gptj_http_request_duration_seconds";
/// Generation requests being served now.
pub const REQUESTS_IN_FLIGHT: &str = "gptj_http_requests_in_flight";
/// Requests refused before any work started, by `reason` (the error's `error_type`).
pub const REQUEST_REJECTED: &str = "gptj_request_rejected_total";
/// Requests that failed after work started, by `reason` (timeout, generation, internal).
pub const REQUEST_FAILED: &str = "gptj_request_failed_total";
/// Time from a request's arrival to its first generated token reaching the response
/// (streaming and not), per sequence.
pub const TIME_TO_FIRST_TOKEN: &str = "gptj_time_to_first_token_seconds";
/// Time between consecutive tokens of one sequence, as the server receives them.
pub const INTER_TOKEN_LATENCY: &str = "gptj_inter_token_latency_seconds";
/// Time from a request's arrival to the end of one of its sequences.
pub const E2E_REQUEST_LATENCY: &str = "gptj_e2e_request_latency_seconds";
/// Sequences finished, by `finished_reason` (stop, length, abort, timeout, error).
pub const REQUEST_SUCCESS: &str = "gptj_request_success_total";
/// Prompt tokens of sequences the server finished (counts each returned sequence).
pub const SERVED_PROMPT_TOKENS: &str = "gptj_served_prompt_tokens_total";
/// Generated tokens returned to clients.
pub const SERVED_GENERATION_TOKENS: &str = "gptj_served_generation_tokens_total";
/// Per-sequence prompt length.
pub const REQUEST_PROMPT_TOKENS: &str = "gptj_request_prompt_tokens";
/// Per-sequence generated length.
pub const REQUEST_GENERATION_TOKENS: &str = "gptj_request_generation_tokens";
/// 1 when the model is loaded and the server takes work, 0 while loading or draining.
pub const SERVER_READY: &str = "gptj_server_ready";

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
/// vLLM's request-latency buckets (end-to-end, queue, inference, prefill, decode).
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

/// Installs the process-wide recorder with every histogram's buckets and describes the
/// server's metrics. Call once, before the scheduler starts.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = builder()?.install_recorder()?;
    describe();
    Ok(handle)
}

/// The exporter configuration: buckets per metric name (scheduler metrics included).
pub fn builder() -> Result<PrometheusBuilder, BuildError> {
    let full = |n: &str| Matcher::Full(n.to_owned());
    let suffix = |n: &str| Matcher::Suffix(n.to_owned());
    PrometheusBuilder::new()
        .set_buckets(REQUEST_LATENCY_BUCKETS)?
        .set_buckets_for_metric(full(HTTP_REQUEST_DURATION), HTTP_DURATION_BUCKETS)?
        .set_buckets_for_metric(suffix("time_to_first_token_seconds"), TTFT_BUCKETS)?
        .set_buckets_for_metric(suffix("inter_token_latency_seconds"), ITL_BUCKETS)?
        .set_buckets_for_metric(suffix("time_per_output_token_seconds"), ITL_BUCKETS)?
        .set_buckets_for_metric(suffix("prompt_tokens"), TOKEN_COUNT_BUCKETS)?
        .set_buckets_for_metric(suffix("generation_tokens"), TOKEN_COUNT_BUCKETS)?
        .set_buckets_for_metric(suffix("max_new_tokens"), TOKEN_COUNT_BUCKETS)?
        .set_buckets_for_metric(suffix("iteration_tokens"), ITERATION_TOKEN_BUCKETS)?
        .set_buckets_for_metric(suffix("iteration_tokens_total"), ITERATION_TOKEN_BUCKETS)?
        .set_buckets_for_metric(suffix("step_duration_seconds"), STEP_BUCKETS)?
        .set_buckets_for_metric(suffix("batch_size"), ITERATION_TOKEN_BUCKETS)
}

/// Describes the metrics this crate records (help text and units).
pub fn describe() {
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
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Time from request arrival to the sequence's first token (streaming and not)"
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Time between consecutive tokens of one sequence"
    );
    describe_histogram!(
        E2E_REQUEST_LATENCY,
        Unit::Seconds,
        "Time from request arrival to the end of the sequence"
    );
    describe_counter!(REQUEST_SUCCESS, "Sequences finished, by finished_reason");
    describe_counter!(
        SERVED_PROMPT_TOKENS,
        "Prompt tokens of the sequences served (one count per returned sequence)"
    );
    describe_counter!(
        SERVED_GENERATION_TOKENS,
        "Generated tokens returned to clients"
    );
    describe_histogram!(REQUEST_PROMPT_TOKENS, "Prompt length of each sequence");
    describe_histogram!(
        REQUEST_GENERATION_TOKENS,
        "Generated length of each sequence"
    );
    describe_gauge!(
        SERVER_READY,
        "1 when the model is loaded and the server takes work, 0 while loading or draining"
    );
}
