//! The scheduler's knobs and their defaults.

use crate::policy::PolicyKind;

/// Continuous (iteration-level) batching, or static (request-level) batching for comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulerKind {
    /// Sequences join and leave the batch at every step. The default.
    #[default]
    Continuous,
    /// Take up to `max_num_seqs` waiting jobs, run them all to their end, then take the next
    /// batch. Only for benchmarks: it is what continuous batching is measured against.
    Static,
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "continuous" => Ok(SchedulerKind::Continuous),
            "static" => Ok(SchedulerKind::Static),
            other => Err(format!(
                "unknown scheduler `{other}`: use continuous or static"
            )),
        }
    }
}

/// How the scheduler batches and admits work. See the field docs for the defaults and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch. Default 64: on CPU a step's cost grows with the
    /// batch, and 64 decoding sequences already keep every core busy.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (decode tokens plus prefill chunks). Bounds a step's
    /// latency, so a long prompt cannot stall everyone's next token: it is prefilled in
    /// chunks. Default 512. Must be >= `max_num_seqs`.
    pub max_batched_tokens: usize,
    /// Most jobs waiting (submitted, never admitted) before submissions are refused with
    /// `QueueFull`. Default 1024.
    pub max_waiting_requests: usize,
    /// Most tokens (prompt plus `max_new_tokens`) waiting before submissions are refused.
    /// Default 1,048,576 (512 full GPT-J contexts). A job alone in the queue is accepted
    /// whatever its size.
    pub max_waiting_tokens: usize,
    /// Admission and preemption order. Default fair share between tenants.
    pub policy: PolicyKind,
    /// Continuous or static batching. Default continuous.
    pub kind: SchedulerKind,
    /// Reuse the KV blocks of shared prompt prefixes. Default on.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 64,
            max_batched_tokens: 512,
            max_waiting_requests: 1024,
            max_waiting_tokens: 1 << 20,
            policy: PolicyKind::default(),
            kind: SchedulerKind::default(),
            prefix_caching: true,
        }
    }
}

/// A configuration (or model) the scheduler cannot run with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A limit that must be positive is zero.
    #[error("scheduler config: `{0}` must be >= 1")]
    Zero(&'static str),
    /// The token budget cannot give every running sequence its decode token.
    #[error("scheduler config: `max_batched_tokens` ({max_batched_tokens}) must be >= `max_num_seqs` ({max_num_seqs}), or running sequences could wait for a step with room")]
    BudgetBelowBatch {
        /// The token budget.
        max_batched_tokens: usize,
        /// The batch size.
        max_num_seqs: usize,
    },
    /// The model reports an empty KV pool, zero block size or zero context.
    #[error("the model has no KV cache to schedule ({num_blocks} blocks of {block_size} tokens, context {max_context}): give it KV memory")]
    NoKvCache {
        /// Blocks in the pool.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
        /// The model's context window.
        max_context: usize,
    },
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Thread(String),
}

impl SchedulerConfig {
    /// Checks the limits against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("max_waiting_requests", self.max_waiting_requests),
            ("max_waiting_tokens", self.max_waiting_tokens),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        if self.max_batched_tokens < self.max_num_seqs {
            return Err(ConfigError::BudgetBelowBatch {
                max_batched_tokens: self.max_batched_tokens,
                max_num_seqs: self.max_num_seqs,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_checked() {
        assert_eq!(SchedulerConfig::default().validate(), Ok(()));
        let c = SchedulerConfig {
            max_num_seqs: 0,
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::Zero("max_num_seqs")));
        let c = SchedulerConfig {
            max_batched_tokens: 8,
            max_num_seqs: 16,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("must be >= `max_num_seqs`"));
        assert_eq!("static".parse::<SchedulerKind>(), Ok(SchedulerKind::Static));
    }
}
