//! One generation's state.
//!
//! A sequence is in one of three states, and the type it lives in says which:
//!
//! - **waiting** — a [`Sequence`] in the waiting queue, fresh or [`SeqState::Preempted`]
//!   (its blocks were freed and its tokens, prompt and generated, will be recomputed). A
//!   waiting sequence holds no KV block: it has no field to hold one in.
//! - **running** — a [`Running`]: the sequence plus its [`BlockTable`] and the number of its
//!   tokens whose KV is computed.
//! - **finished** — consumed by the loop, which frees its blocks and sends the last event
//!   with a [`FinishReason`](crate::FinishReason).
//!
//! So no flag can say "running" while the blocks say otherwise.

use std::sync::Arc;
use std::time::Instant;

use gptj_engine::{LogitRows, Sampler, TokenLogprob};
use tokio::sync::mpsc::UnboundedSender;

use crate::blocks::{BlockHash, BlockTable};
use crate::job::{JobEvent, LogprobsRequest, Usage};
use crate::stop::TextOutput;

/// Whether a waiting sequence has run before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqState {
    /// Never admitted yet.
    Queued,
    /// Admitted, then preempted this many times; will be recomputed.
    Preempted(u32),
}

/// A generation and everything it carries across steps, apart from its KV blocks.
#[derive(Debug)]
pub(crate) struct Sequence {
    pub id: u64,
    /// Arrival order, for FCFS.
    pub arrival: u64,
    /// Tenant (`""` when none), shared so the policy's per-tenant counts copy no string.
    pub tenant: Arc<str>,
    /// Subtenant within the tenant (`""` when none).
    pub subtenant: Arc<str>,
    /// The prefix-cache scope's root key.
    pub cache_root: BlockHash,
    pub priority: i32,
    pub deadline: Option<Instant>,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    /// Token ids that end the sequence ([`crate::JobRequest::stop_token_ids`]).
    pub stop_token_ids: Vec<u32>,
    pub sampler: Sampler,
    pub output: TextOutput,
    pub events: UnboundedSender<JobEvent>,
    pub submitted: Instant,
    pub first_admitted: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    /// Prefix-cache hit at first admission, in tokens.
    pub cached_prompt_tokens: usize,
    pub preemptions: u32,
    /// Tokens this sequence counts for in the waiting-queue limits, until it is first admitted.
    pub queued_tokens: Option<usize>,
    /// Log-probabilities to report.
    pub logprobs: Option<LogprobsRequest>,
    /// The prompt's log-probabilities while they are being computed (entry `p` is about
    /// prompt token `p + 1`); `None` when not asked for or once sent.
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
}

impl Sequence {
    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Fresh or preempted.
    pub fn state(&self) -> SeqState {
        if self.preemptions == 0 {
            SeqState::Queued
        } else {
            SeqState::Preempted(self.preemptions)
        }
    }

    /// How many leading tokens the prefix cache may supply: the prompt positions whose logits
    /// are still needed must be computed.
    pub fn max_cached_prefix(&self) -> usize {
        let last = self.tokens.len() - 1;
        self.prompt_logprobs
            .as_ref()
            .map_or(last, |got| got.len().min(last))
    }

    /// Records the logits at position `pos` (computed in a [`LogitRows::All`] chunk): the
    /// log-probability of the prompt token after it, if that one is still missing.
    pub fn record_prompt_logits(&mut self, pos: usize, logits: &[f32]) {
        let (Some(got), Some(l)) = (self.prompt_logprobs.as_mut(), self.logprobs) else {
            return;
        };
        if pos == got.len() && pos + 1 < self.prompt_len {
            got.push(gptj_engine::token_logprob(
                logits,
                self.tokens[pos + 1],
                l.top,
            ));
        }
    }

    /// True once the client has dropped its stream.
    pub fn is_abandoned(&self) -> bool {
        self.events.is_closed()
    }

    /// Counts and timings as of `now`.
    pub fn usage(&self, now: Instant) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            cached_prompt_tokens: self.cached_prompt_tokens,
            generated_tokens: self.generated(),
            preemptions: self.preemptions,
            queue_time: self
                .first_admitted
                .unwrap_or(now)
                .saturating_duration_since(self.submitted),
            time_to_first_token: self
                .first_token
                .map(|t| t.saturating_duration_since(self.submitted)),
            total_time: now.saturating_duration_since(self.submitted),
        }
    }
}

/// A sequence admitted to the running set: it holds blocks.
#[derive(Debug)]
pub(crate) struct Running {
    pub seq: Sequence,
    /// Its blocks: positions `0..computed` hold its KV; more are added as it grows.
    pub table: BlockTable,
    /// Tokens of `seq.tokens` whose KV is in the cache. A decoding sequence has computed all
    /// but its last (just sampled) token.
    pub computed: usize,
    /// Admission order (for "preempt the most recently admitted").
    pub admitted: u64,
}

impl Running {
    /// Tokens still to compute before the next token can be sampled: the gap between what
    /// it has computed and what it needs. Always at least 1.
    pub fn need(&self) -> usize {
        self.seq.tokens.len() - self.computed
    }

    /// Which logits a chunk of `len` tokens from `computed` returns: every position's while
    /// prompt log-probabilities are missing from there on, else the last one's when the chunk
    /// reaches the end (to sample from), else none.
    pub fn logit_rows(&self, len: usize) -> LogitRows {
        let end = self.computed + len;
        let missing = self.seq.prompt_logprobs.as_ref().is_some_and(|got| {
            got.len() + 1 < self.seq.prompt_len && (self.computed..end).contains(&got.len())
        });
        if missing && len > 0 {
            LogitRows::All
        } else if end == self.seq.tokens.len() {
            LogitRows::Last
        } else {
            LogitRows::None
        }
    }
}
