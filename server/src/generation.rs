/*!
The protocol-independent part of serving a generation: tokenize the prompts, submit one job
per returned sequence (all at once, so the instances of a query run concurrently), and
either collect every job's text or hand the job streams to [`crate::sse`].

Cancellation is by ownership: a request's [`JobStream`]s live in the handler's future (or in
its response stream), so when a client goes away and the future or stream is dropped, the
scheduler sees the streams closed and frees the jobs' KV blocks at its next step.
*/

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, BoxStream, StreamExt};
use gptj_engine::Tokenizer;
use gptj_scheduler::{FinishReason, JobEvent, JobRequest, JobStream, SubmitError, Usage};

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::params::{Plan, RequestParams, ValidationError};
use crate::state::Backend;
use crate::telemetry::RequestRecord;

/// Extra time past the scheduler's deadline before the server stops waiting by itself (the
/// scheduler ends late jobs at its next step boundary; this only guards against a stuck loop).
const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// Tokenizes `texts` on a blocking thread; `at(i)` names prompt `i` in errors.
pub async fn tokenize(
    tokenizer: &Tokenizer,
    texts: Vec<String>,
    at: fn(usize) -> String,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let tokenizer = tokenizer.clone();
    tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                tokenizer.encode(t).map_err(|e| ValidationError::Tokenize {
                    at: at(i),
                    message: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
    .map_err(ApiError::from)
}

/// The job for sequence `j` of a prompt.
pub fn job(
    prompt_ids: &[u32],
    plan: &Plan,
    j: usize,
    tenant: Option<String>,
    deadline: Instant,
) -> JobRequest {
    JobRequest {
        prompt_ids: prompt_ids.to_vec(),
        params: plan.sampling_for(j),
        max_new_tokens: plan.max_new_tokens,
        stop: plan.stop.clone(),
        tenant,
        priority: 0,
        deadline: Some(deadline),
    }
}

/// Maps a refused submission to the HTTP error.
pub fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::QueueFull { retry_after, .. } => ApiError::Overloaded {
            retry_after,
            detail: e.to_string(),
        },
        SubmitError::ShuttingDown => ApiError::Draining,
        SubmitError::ExceedsContext { .. }
        | SubmitError::ExceedsKvCache { .. }
        | SubmitError::Invalid(_) => ApiError::Validation(ValidationError::Refused(e.to_string())),
        other => ApiError::Internal(other.to_string()),
    }
}

/// Submits every job; if one is refused, those already accepted are dropped (cancelled) and
/// the refusal is returned, so a request runs whole or not at all.
pub fn submit_all(backend: &Backend, jobs: Vec<JobRequest>) -> Result<Vec<JobStream>, ApiError> {
    jobs.into_iter()
        .map(|j| backend.scheduler.submit(j).map_err(submit_error))
        .collect()
}

/// One finished sequence.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The generated text (without the prompt, without any stop string).
    pub text: String,
    /// Why it ended.
    pub reason: FinishReason,
    /// Counts and timings.
    pub usage: Usage,
}

/// Records a finished sequence in the request's log record and the per-sequence metrics.
pub fn record_finish(record: &RequestRecord, reason: &FinishReason, usage: &Usage) {
    record.add_sequence(usage, reason.as_str());
    metrics::histogram!(crate::metrics::REQUEST_PROMPT_TOKENS).record(usage.prompt_tokens as f64);
    metrics::histogram!(crate::metrics::REQUEST_GENERATION_TOKENS)
        .record(usage.generated_tokens as f64);
}

/// The error a sequence's end means for a non-streaming response, if any.
pub fn finish_error(reason: &FinishReason, timeout: Duration) -> Option<ApiError> {
    match reason {
        FinishReason::Stop | FinishReason::Length | FinishReason::StopSequence(_) => None,
        FinishReason::Timeout => Some(ApiError::Timeout(timeout)),
        FinishReason::Cancelled => Some(ApiError::Cancelled),
        FinishReason::Error(m) => Some(ApiError::Generation(m.clone())),
    }
}

/// The events of one job, ending with exactly one `Finished` (a synthetic error one if the
/// engine thread went away first).
pub fn events(js: JobStream) -> BoxStream<'static, JobEvent> {
    stream::unfold(Some(js), |state| async move {
        let mut js = state?;
        match js.recv().await {
            Some(e @ JobEvent::Finished { .. }) => Some((e, None)),
            Some(e) => Some((e, Some(js))),
            None => Some((
                JobEvent::Finished {
                    reason: FinishReason::Error("the engine stopped".into()),
                    usage: Usage::default(),
                },
                None,
            )),
        }
    })
    .boxed()
}

/// Runs one job to its end, collecting its text.
async fn collect(js: JobStream, record: &RequestRecord) -> Finished {
    let mut text = String::new();
    let mut ev = events(js);
    while let Some(e) = ev.next().await {
        match e {
            JobEvent::Token { text: t, .. } => {
                record.first_token();
                text.push_str(&t);
            }
            JobEvent::Finished { reason, usage } => {
                record_finish(record, &reason, &usage);
                return Finished {
                    text,
                    reason,
                    usage,
                };
            }
        }
    }
    Finished {
        text,
        reason: FinishReason::Error("the engine stopped".into()),
        usage: Usage::default(),
    }
}

/// Runs every job to its end, concurrently; fails with the first sequence's error (a
/// timeout, the engine failing, or the server shutting down under it).
pub async fn collect_all(
    streams: Vec<JobStream>,
    record: &Arc<RequestRecord>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<Finished>, ApiError> {
    let all = futures_util::future::join_all(streams.into_iter().map(|s| collect(s, record)));
    let out = tokio::time::timeout_at((deadline + DEADLINE_GRACE).into(), all)
        .await
        .map_err(|_| ApiError::Timeout(timeout))?;
    if let Some(e) = out.iter().find_map(|f| finish_error(&f.reason, timeout)) {
        return Err(e);
    }
    Ok(out)
}

/// A request's jobs, submitted.
#[derive(Debug)]
pub struct Prepared {
    /// Each prompt's length in tokens.
    pub prompt_tokens: Vec<usize>,
    /// Each prompt's plan.
    pub plans: Vec<Plan>,
    /// One stream per sequence, prompt-major: prompt `i`'s sequence `j` is at
    /// `i * per_prompt + j`.
    pub streams: Vec<JobStream>,
    /// Sequences per prompt.
    pub per_prompt: usize,
}

/// What a route asks [`prepare`] to run.
#[derive(Debug)]
pub struct Submission<'a> {
    /// The prompts.
    pub prompts: &'a [String],
    /// The request's parameters.
    pub params: &'a RequestParams,
    /// Names prompt `i` in messages (`instance 2`, `prompt 0`).
    pub at: fn(usize) -> String,
    /// The scheduler tenant.
    pub tenant: Option<String>,
    /// When the request must be done.
    pub deadline: Instant,
}

/// Everything between parsing and generating: checks the sequence count, tokenizes,
/// resolves each prompt's plan (errors name the prompt), and submits all jobs.
pub async fn prepare(
    config: &ServerConfig,
    backend: &Backend,
    sub: Submission<'_>,
) -> Result<Prepared, ApiError> {
    let Submission {
        prompts,
        params,
        at,
        tenant,
        deadline,
    } = sub;
    let per_prompt = config.defaults.num_return_sequences(params);
    let total = prompts.len() * per_prompt;
    if total > config.max_sequences_per_request {
        return Err(ValidationError::TooManySequences {
            prompts: prompts.len(),
            per_prompt,
            total,
            max: config.max_sequences_per_request,
        }
        .into());
    }
    if let Some(i) = prompts.iter().position(String::is_empty) {
        return Err(ValidationError::EmptyPrompt { at: at(i) }.into());
    }
    let ids = tokenize(&backend.tokenizer, prompts.to_vec(), at).await?;
    let plans = ids
        .iter()
        .enumerate()
        .map(|(i, p)| {
            config
                .defaults
                .resolve(params, p.len(), backend.max_context, &at(i))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let jobs = ids
        .iter()
        .zip(&plans)
        .flat_map(|(p, plan)| (0..per_prompt).map(|j| job(p, plan, j, tenant.clone(), deadline)))
        .collect();
    let streams = submit_all(backend, jobs)?;
    Ok(Prepared {
        prompt_tokens: ids.iter().map(Vec::len).collect(),
        plans,
        streams,
        per_prompt,
    })
}
