/*!
The protocol-independent part of serving a generation: tokenize the prompts, resolve each
one's plan, submit one job per returned sequence (all at once, so the instances of a query
run concurrently), and either collect every job's text or hand the job streams to
[`crate::sse`].

Cancellation is by ownership: a request's [`JobStream`]s live in the handler's future (or in
its response stream), so when a client goes away and the future or stream is dropped, the
scheduler sees the streams closed and frees the jobs' KV blocks at its next step.
*/

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{self, BoxStream, StreamExt};
use gptj_scheduler::{
    FinishReason, JobEvent, JobRequest, JobStream, SubmitError, TokenLogprob, Usage,
};

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::params::{Dialect, Plan, PromptName, RequestParams, ValidationError};
use crate::state::Backend;
use crate::telemetry::RequestRecord;

/// Extra time past the scheduler's deadline before the server stops waiting by itself (the
/// scheduler ends late jobs at its next step boundary; this only guards against a stuck loop).
pub const DEADLINE_GRACE: Duration = Duration::from_secs(5);

/// What a protocol asks the server to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The model the body names, if it names one (OpenAI's `model`).
    pub model: Option<String>,
    /// The prompts.
    pub prompts: Prompts,
    /// The request's parameters.
    pub params: RequestParams,
    /// Stream the answer.
    pub stream: bool,
}

/// A request's prompts: texts, or token ids (OpenAI's completions take either, never both).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompts {
    /// Texts, to tokenize.
    Text(Vec<String>),
    /// Token ids, taken as they are (each checked against the vocabulary).
    Tokens(Vec<Vec<u32>>),
}

impl Prompts {
    /// How many prompts.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Tokens(t) => t.len(),
        }
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<String>> for Prompts {
    fn from(texts: Vec<String>) -> Self {
        Self::Text(texts)
    }
}

/// Who a request is for: whose share of the batch it takes, and whose cached prompt
/// prefixes it may reuse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenancy {
    /// The scheduler tenant (`None`: the one anonymous tenant).
    pub tenant: Option<String>,
    /// A subdivision of the tenant's share.
    pub subtenant: Option<String>,
    /// The prefix-cache scope (`None`: shared with every request in the shared scope).
    pub cache_scope: Option<String>,
}

impl Tenancy {
    /// The cache salt of a request that also gave its own `cache_salt`: it shares cached
    /// prefixes only with requests of the same scope and the same salt.
    fn cache_salt(&self, request_salt: Option<&str>) -> Option<String> {
        match (&self.cache_scope, request_salt) {
            (scope, None) => scope.clone(),
            (scope, Some(salt)) => Some(format!(
                "{}\u{1f}{salt}",
                scope.as_deref().unwrap_or_default()
            )),
        }
    }
}

/// The job for sequence `j` of a prompt.
pub fn job(
    prompt_ids: &[u32],
    plan: &Plan,
    j: usize,
    tenancy: &Tenancy,
    deadline: Instant,
) -> JobRequest {
    JobRequest {
        prompt_ids: prompt_ids.to_vec(),
        params: plan.sampling_for(j),
        max_new_tokens: plan.max_new_tokens,
        stop: plan.stop.clone(),
        stop_token_ids: plan.stop_token_ids.clone(),
        penalties: plan.penalties.clone(),
        tenant: tenancy.tenant.clone(),
        subtenant: tenancy.subtenant.clone(),
        cache_salt: tenancy.cache_salt(plan.cache_salt.as_deref()),
        priority: 0,
        deadline: Some(deadline),
        logprobs: plan.logprobs,
    }
}

/// Maps a refused submission of prompt `at`'s job to the HTTP error, keeping its fields.
pub fn submit_error(e: SubmitError, at: String, dialect: &Dialect) -> ApiError {
    match e {
        SubmitError::QueueFull { retry_after, .. } => ApiError::Overloaded {
            retry_after,
            detail: e.to_string(),
        },
        SubmitError::ShuttingDown => ApiError::Draining,
        SubmitError::ExceedsContext {
            prompt_tokens,
            max_new_tokens,
            max_context,
        } => ValidationError::ContextOverflow {
            at,
            field: dialect.path("max_new_tokens"),
            prompt_tokens,
            new_tokens: max_new_tokens,
            context: max_context,
        }
        .into(),
        SubmitError::ExceedsKvCache {
            tokens,
            needed_blocks,
            total_blocks,
        } => ValidationError::ExceedsKvCache {
            at,
            tokens,
            needed_blocks,
            total_blocks,
        }
        .into(),
        SubmitError::Invalid(message) => ValidationError::Refused { at, message }.into(),
        other => ApiError::Internal(other.to_string()),
    }
}

/// One finished sequence.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The generated text (without the prompt, without any stop string).
    pub text: String,
    /// The prompt's log-probabilities, when asked for (entry `i` is about prompt token `i + 1`).
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    /// Each generated token's log-probability, when asked for.
    pub logprobs: Vec<TokenLogprob>,
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

/// The error a sequence's end means for the response, if any.
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
    let mut out = Finished {
        text: String::new(),
        prompt_logprobs: None,
        logprobs: Vec::new(),
        reason: FinishReason::Error("the engine stopped".into()),
        usage: Usage::default(),
    };
    let mut ev = events(js);
    while let Some(e) = ev.next().await {
        match e {
            JobEvent::PromptLogprobs(lp) => out.prompt_logprobs = Some(lp),
            JobEvent::Token { text, logprob, .. } => {
                record.first_token();
                out.text.push_str(&text);
                out.logprobs.extend(logprob);
            }
            JobEvent::Finished { reason, usage } => {
                record_finish(record, &reason, &usage);
                out.reason = reason;
                out.usage = usage;
                break;
            }
        }
    }
    out
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

/// What was submitted for a request, besides the job streams: what rendering needs.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// Each prompt's token ids.
    pub prompt_ids: Vec<Vec<u32>>,
    /// Each prompt's text (decoded from its ids when it was given as ids).
    pub prompt_texts: Vec<String>,
    /// Each prompt's plan.
    pub plans: Vec<Plan>,
    /// Sequences per prompt: prompt `i`'s sequence `j` is sequence `i * per_prompt + j`.
    pub per_prompt: usize,
}

impl Submitted {
    /// Whether sequence `seq`'s returned text starts with its prompt.
    pub fn echo(&self, seq: usize) -> bool {
        self.plans
            .get(seq / self.per_prompt.max(1))
            .is_some_and(|p| p.return_full_text)
    }

    /// Prompt tokens of the whole request (each prompt once).
    pub fn total_prompt_tokens(&self) -> usize {
        self.prompt_ids.iter().map(Vec::len).sum()
    }

    /// The plan of sequence `seq`'s prompt.
    pub fn plan(&self, seq: usize) -> &Plan {
        &self.plans[seq / self.per_prompt.max(1)]
    }

    /// The text and ids of sequence `seq`'s prompt.
    pub fn prompt(&self, seq: usize) -> (&str, &[u32]) {
        let i = seq / self.per_prompt.max(1);
        (&self.prompt_texts[i], &self.prompt_ids[i])
    }
}

/// Everything between parsing and generating: checks the sequence count, tokenizes,
/// resolves each prompt's plan (errors name the prompt), and submits all jobs. If one job is
/// refused, those already accepted are dropped (cancelled) and the refusal is returned, so a
/// request runs whole or not at all.
pub async fn submit(
    config: &ServerConfig,
    backend: &Backend,
    generation: &Generation,
    dialect: &Dialect,
    at: PromptName,
    tenancy: &Tenancy,
    deadline: Instant,
) -> Result<(Submitted, Vec<JobStream>), ApiError> {
    let Generation {
        prompts, params, ..
    } = generation;
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
    let tokenizer = backend.prompts.tokenizer();
    let (ids, texts) = match prompts {
        Prompts::Text(texts) => {
            if let Some(i) = texts.iter().position(String::is_empty) {
                return Err(ValidationError::EmptyPrompt { at: at(i) }.into());
            }
            (
                backend.prompts.encode(texts.clone(), at).await?,
                texts.clone(),
            )
        }
        Prompts::Tokens(ids) => {
            check_token_prompts(ids, backend.scheduler.vocab_size(), at)?;
            let texts = ids.iter().map(|p| tokenizer.decode(p)).collect();
            (ids.clone(), texts)
        }
    };
    let plans = ids
        .iter()
        .enumerate()
        .map(|(i, p)| {
            config
                .defaults
                .resolve(params, dialect, p.len(), backend.max_context, &at(i))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut streams = Vec::with_capacity(total);
    for (i, (p, plan)) in ids.iter().zip(&plans).enumerate() {
        for j in 0..per_prompt {
            let stream = backend
                .scheduler
                .submit(job(p, plan, j, tenancy, deadline))
                .map_err(|e| submit_error(e, at(i), dialect))?;
            streams.push(stream);
        }
    }
    let submitted = Submitted {
        prompt_ids: ids,
        prompt_texts: texts,
        plans,
        per_prompt,
    };
    Ok((submitted, streams))
}

/// Token-id prompts: none empty, every id in the tokenizer's vocabulary.
fn check_token_prompts(prompts: &[Vec<u32>], vocab: usize, at: PromptName) -> Result<(), ApiError> {
    for (i, p) in prompts.iter().enumerate() {
        if p.is_empty() {
            return Err(ValidationError::EmptyPrompt { at: at(i) }.into());
        }
        if let Some(k) = p.iter().position(|&id| id as usize >= vocab) {
            return Err(ValidationError::OutOfRange {
                field: format!("{}, token {k}", at(i)),
                range: format!("a token id in [0, {})", vocab),
                value: p[k].to_string(),
            }
            .into());
        }
    }
    Ok(())
}
