//! What the server hands the scheduler (a [`JobRequest`]) and what comes back (a
//! [`JobStream`] of [`JobEvent`]s), plus the reasons a submission is refused.

use std::time::{Duration, Instant};

use gptj_engine::{Penalties, SamplingParams, TokenLogprob};
use tokio::sync::mpsc;

/// One generation to run: already tokenized and validated by the server.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// Prompt token ids (at least one; GPT-J has no BOS token).
    pub prompt_ids: Vec<u32>,
    /// How to pick tokens.
    pub params: SamplingParams,
    /// Stop after this many new tokens (finish reason [`FinishReason::Length`]); at least 1.
    pub max_new_tokens: usize,
    /// Stop as soon as the generated text contains one of these (finish reason
    /// [`FinishReason::StopSequence`]); the stop string's text is not emitted.
    pub stop: Vec<String>,
    /// Stop when one of these token ids is generated (finish reason [`FinishReason::Stop`],
    /// as end-of-text); the token's text is not emitted. Held back until
    /// `params.min_new_tokens`, as end-of-text is.
    pub stop_token_ids: Vec<u32>,
    /// OpenAI's presence and frequency penalties and logit bias (none by default).
    pub penalties: Penalties,
    /// Who is asking (the API key, or a header a trusted gateway sets), for fair sharing.
    /// `None` is one shared anonymous tenant.
    pub tenant: Option<String>,
    /// A subdivision of the tenant's share (a header under an API key): jobs of one tenant
    /// share its slots fairly between their subtenants, and a subtenant never gets more
    /// than its tenant would.
    pub subtenant: Option<String>,
    /// The prefix-cache scope: jobs reuse each other's cached KV blocks only when their
    /// salts are equal. `None` is the shared scope.
    pub cache_salt: Option<String>,
    /// Larger is more urgent; 0 by default. Only the priority policy and fair share (within
    /// a tenant) look at it.
    pub priority: i32,
    /// End the job with [`FinishReason::Timeout`] if it has not finished by then.
    pub deadline: Option<Instant>,
    /// Log-probabilities to report (none by default).
    pub logprobs: Option<LogprobsRequest>,
}

/// Which log-probabilities a job reports: the model's `log_softmax` before any sampling
/// transform (see [`gptj_engine::logprobs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobsRequest {
    /// How many of the most likely tokens to list at each position, besides the token itself
    /// (at most [`LogprobsRequest::MAX_TOP`]).
    pub top: usize,
    /// Whether to report the prompt's too ([`JobEvent::PromptLogprobs`]). The prompt's KV is
    /// then computed rather than taken from the prefix cache, since its logits are needed.
    pub prompt: bool,
}

impl LogprobsRequest {
    /// The most alternatives a position may list (vLLM's default limit).
    pub const MAX_TOP: usize = 20;
}

impl JobRequest {
    /// A greedy job for `prompt_ids` with defaults for everything else.
    pub fn new(prompt_ids: Vec<u32>, max_new_tokens: usize) -> Self {
        Self {
            prompt_ids,
            params: SamplingParams::default(),
            max_new_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            penalties: Penalties::default(),
            tenant: None,
            subtenant: None,
            cache_salt: None,
            priority: 0,
            deadline: None,
            logprobs: None,
        }
    }
}

/// One event of a job's stream. A stream is one `PromptLogprobs` if they were asked for and a
/// token was generated, zero or more `Token`s, then exactly one `Finished`, then the end.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// The prompt's log-probabilities ([`LogprobsRequest::prompt`]): entry `i` is about prompt
    /// token `i + 1` (the first token has none: nothing precedes it). Sent just before the
    /// first `Token`.
    PromptLogprobs(Vec<TokenLogprob>),
    /// A new token. `text` is the text it completes: possibly empty (half a UTF-8
    /// character, a special token such as EOS, or text held back because it may begin a stop
    /// string), possibly more than the token's own text (held-back text released).
    Token {
        /// The token id.
        id: u32,
        /// Text to append to the output.
        text: String,
        /// Its log-probability, when the job asked for them ([`JobRequest::logprobs`]).
        logprob: Option<TokenLogprob>,
    },
    /// The job is over.
    Finished {
        /// Why it ended.
        reason: FinishReason,
        /// Counts and timings.
        usage: Usage,
    },
}

/// Why a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced EOS (its token is the last `Token` event, with no text).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// The generated text reached this stop string (not included in the emitted text).
    StopSequence(String),
    /// The client went away (the stream was dropped), or the server shut down before the
    /// job could finish.
    Cancelled,
    /// The job's deadline passed.
    Timeout,
    /// The engine failed on this job; the message says why.
    Error(String),
}

impl FinishReason {
    /// A stable lowercase tag (for metric labels and API bodies): `stop`, `length`,
    /// `stop_sequence`, `cancelled`, `timeout`, `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::StopSequence(_) => "stop_sequence",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Timeout => "timeout",
            FinishReason::Error(_) => "error",
        }
    }
}

/// Token counts and timings of a finished job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache at first admission.
    pub cached_prompt_tokens: usize,
    /// Tokens generated (EOS included when it ended the job).
    pub generated_tokens: usize,
    /// Times the job was preempted and recomputed.
    pub preemptions: u32,
    /// From submission to first admission (the whole life, if never admitted).
    pub queue_time: Duration,
    /// From submission to the first token, if there was one.
    pub time_to_first_token: Option<Duration>,
    /// From submission to the end.
    pub total_time: Duration,
}

/// The events of one job. Dropping it cancels the job: the engine notices at the next step
/// boundary and frees its KV blocks.
#[derive(Debug)]
pub struct JobStream {
    pub(crate) id: u64,
    pub(crate) rx: mpsc::UnboundedReceiver<JobEvent>,
}

impl JobStream {
    /// The job's id (unique for the life of the scheduler; useful in logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after `Finished` (or if the engine thread died).
    pub async fn recv(&mut self) -> Option<JobEvent> {
        self.rx.recv().await
    }

    /// The next event, blocking the thread. Not for async code (it panics inside a runtime).
    pub fn blocking_recv(&mut self) -> Option<JobEvent> {
        self.rx.blocking_recv()
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<JobEvent> {
        self.rx.try_recv().ok()
    }

    /// The underlying receiver, e.g. to wrap in a `tokio_stream::wrappers::UnboundedReceiverStream`.
    pub fn into_inner(self) -> mpsc::UnboundedReceiver<JobEvent> {
        self.rx
    }
}

/// Why a job was refused at submission. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The waiting queue is at its request or token limit. Retry after `retry_after`
    /// (HTTP 429 with `Retry-After`).
    #[error("the server is busy: {waiting_requests} requests ({waiting_tokens} tokens) are waiting; retry in {}s", retry_after.as_secs().max(1))]
    QueueFull {
        /// Suggested wait before retrying, from the recent token throughput.
        retry_after: Duration,
        /// Requests waiting when this one was refused.
        waiting_requests: usize,
        /// Tokens (prompt plus max new) waiting when this one was refused.
        waiting_tokens: usize,
    },
    /// The prompt plus `max_new_tokens` is longer than the model's context window.
    #[error("`max_new_tokens` + prompt length must be <= {max_context} (the model's context window), got {prompt_tokens} + {max_new_tokens}: shorten the prompt or lower `max_new_tokens`")]
    ExceedsContext {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens asked for.
        max_new_tokens: usize,
        /// The context window.
        max_context: usize,
    },
    /// The job could never fit in the KV cache, even alone.
    #[error("the request needs {needed_blocks} KV blocks ({tokens} tokens) but the whole cache has {total_blocks}: shorten the prompt, lower `max_new_tokens`, or give the server more KV memory")]
    ExceedsKvCache {
        /// Token slots the job needs at most.
        tokens: usize,
        /// Blocks that takes.
        needed_blocks: usize,
        /// Blocks in the pool.
        total_blocks: usize,
    },
    /// The job is malformed (empty prompt, out-of-range parameter, ...): the message says
    /// which field and why.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The scheduler is shutting down (or its engine thread has stopped) and accepts no new
    /// jobs (HTTP 503).
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
}
