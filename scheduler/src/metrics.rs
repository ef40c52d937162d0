//! The metrics the engine loop records, through the `metrics` crate facade.
//!
//! Names follow vLLM's (`vllm:X` becomes `gptj_X`), so dashboards built for vLLM map over.
//! Nothing is recorded anywhere until the binary installs a recorder (the server installs
//! the Prometheus exporter); [`describe`] registers help texts and units and every series at
//! zero (each label value included), so a fresh server exposes them all before the first
//! event. Call it once after installing the recorder. Histogram buckets are the exporter's
//! business; docs/scheduler.md suggests some.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Gauge: sequences in the running set (the running batch size).
pub const NUM_REQUESTS_RUNNING: &str = "gptj_num_requests_running";
/// Gauge: sequences waiting (queued or preempted).
pub const NUM_REQUESTS_WAITING: &str = "gptj_num_requests_waiting";
/// Gauge: fraction of KV blocks held by sequences, 0 to 1.
pub const KV_CACHE_USAGE_PERC: &str = "gptj_kv_cache_usage_perc";
/// Gauge: KV blocks held by sequences.
pub const KV_CACHE_BLOCKS_USED: &str = "gptj_kv_cache_blocks_used";
/// Gauge: KV blocks in the pool. (Not `_total`: that suffix is for counters.)
pub const KV_CACHE_BLOCKS: &str = "gptj_kv_cache_blocks";
/// Counter: preemptions.
pub const NUM_PREEMPTIONS: &str = "gptj_num_preemptions_total";
/// Counter: tokens looked up in the prefix cache at admission.
pub const PREFIX_CACHE_QUERIES: &str = "gptj_prefix_cache_queries_total";
/// Counter: tokens found in the prefix cache at admission.
pub const PREFIX_CACHE_HITS: &str = "gptj_prefix_cache_hits_total";
/// Counter: prompt tokens of requests admitted for the first time.
pub const PROMPT_TOKENS: &str = "gptj_prompt_tokens_total";
/// Counter: tokens generated.
pub const GENERATION_TOKENS: &str = "gptj_generation_tokens_total";
/// Counter, label `finished_reason`: finished requests.
pub const REQUEST_SUCCESS: &str = "gptj_request_success_total";
/// Histogram: seconds from submission to the first token.
pub const TIME_TO_FIRST_TOKEN: &str = "gptj_time_to_first_token_seconds";
/// Histogram: seconds between consecutive tokens of a request.
pub const INTER_TOKEN_LATENCY: &str = "gptj_inter_token_latency_seconds";
/// Histogram: seconds from submission to first admission.
pub const REQUEST_QUEUE_TIME: &str = "gptj_request_queue_time_seconds";
/// Histogram: seconds from submission to the end.
pub const E2E_REQUEST_LATENCY: &str = "gptj_e2e_request_latency_seconds";
/// Histogram: tokens computed per step (prefill and decode). (vLLM's
/// `iteration_tokens_total`; a histogram's name takes no `_total`.)
pub const ITERATION_TOKENS: &str = "gptj_iteration_tokens";

/// The `finished_reason` values of [`REQUEST_SUCCESS`] ([`crate::FinishReason::as_str`]).
pub const FINISHED_REASONS: &[&str] = &[
    "stop",
    "length",
    "stop_sequence",
    "cancelled",
    "timeout",
    "error",
];
/// Histogram: seconds per step (plan, forward, sampling, emission).
pub const STEP_DURATION: &str = "gptj_step_duration_seconds";

/// Registers every metric's description and unit with the installed recorder, and every
/// series at zero.
pub fn describe() {
    for name in [
        NUM_REQUESTS_RUNNING,
        NUM_REQUESTS_WAITING,
        KV_CACHE_USAGE_PERC,
        KV_CACHE_BLOCKS_USED,
        KV_CACHE_BLOCKS,
    ] {
        metrics::gauge!(name).set(0.0);
    }
    for name in [
        NUM_PREEMPTIONS,
        PREFIX_CACHE_QUERIES,
        PREFIX_CACHE_HITS,
        PROMPT_TOKENS,
        GENERATION_TOKENS,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for reason in FINISHED_REASONS {
        metrics::counter!(REQUEST_SUCCESS, "finished_reason" => *reason).absolute(0);
    }
    for name in [
        TIME_TO_FIRST_TOKEN,
        INTER_TOKEN_LATENCY,
        REQUEST_QUEUE_TIME,
        E2E_REQUEST_LATENCY,
        ITERATION_TOKENS,
        STEP_DURATION,
    ] {
        // Registering a histogram makes it exist, with every bucket at 0.
        let _ = metrics::histogram!(name);
    }
    describe_gauge!(
        NUM_REQUESTS_RUNNING,
        Unit::Count,
        "Sequences in the running batch."
    );
    describe_gauge!(
        NUM_REQUESTS_WAITING,
        Unit::Count,
        "Sequences waiting to run (new or preempted)."
    );
    describe_gauge!(
        KV_CACHE_USAGE_PERC,
        Unit::Percent,
        "Fraction of KV blocks held by sequences (0-1)."
    );
    describe_gauge!(
        KV_CACHE_BLOCKS_USED,
        Unit::Count,
        "KV blocks held by sequences."
    );
    describe_gauge!(KV_CACHE_BLOCKS, Unit::Count, "KV blocks in the pool.");
    describe_counter!(
        NUM_PREEMPTIONS,
        Unit::Count,
        "Sequences preempted (freed, to be recomputed)."
    );
    describe_counter!(
        PREFIX_CACHE_QUERIES,
        Unit::Count,
        "Tokens looked up in the prefix cache."
    );
    describe_counter!(
        PREFIX_CACHE_HITS,
        Unit::Count,
        "Tokens found in the prefix cache."
    );
    describe_counter!(
        PROMPT_TOKENS,
        Unit::Count,
        "Prompt tokens of admitted requests."
    );
    describe_counter!(GENERATION_TOKENS, Unit::Count, "Tokens generated.");
    describe_counter!(
        REQUEST_SUCCESS,
        Unit::Count,
        "Finished requests, by finished_reason."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Submission to first token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Time between consecutive tokens of a request."
    );
    describe_histogram!(
        REQUEST_QUEUE_TIME,
        Unit::Seconds,
        "Submission to first admission."
    );
    describe_histogram!(E2E_REQUEST_LATENCY, Unit::Seconds, "Submission to finish.");
    describe_histogram!(
        ITERATION_TOKENS,
        Unit::Count,
        "Tokens computed per engine step."
    );
    describe_histogram!(STEP_DURATION, Unit::Seconds, "Duration of one engine step.");
}
