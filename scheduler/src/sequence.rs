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

use gptj_engine::Sampler;
use tokio::sync::mpsc::UnboundedSender;

use crate::blocks::{BlockHash, BlockTable};
use crate::job::{JobEvent, Usage};
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
}
