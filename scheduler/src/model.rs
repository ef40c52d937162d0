//! The one thing the scheduler needs from a model: a forward pass over a ragged batch with
//! paged KV, and the shape of its KV pool.
//!
//! The scheduler is generic over [`Model`] so its tests run against
//! [`testing::FakeModel`](crate::testing::FakeModel), which is exact and instant. The real
//! [`gptj_engine::Engine`] implements it by delegation.

use gptj_engine::{EngineError, Logits, SeqChunk, Tokenizer};

/// A model the engine thread can drive. Its methods mirror [`gptj_engine::Engine`]'s.
pub trait Model: Send + 'static {
    /// Runs one step: appends each row's tokens to its sequence's KV (at `start_pos`, in the
    /// row's blocks) and returns the logits of every row with `want_logits`, in row order.
    fn forward(&mut self, rows: &[SeqChunk<'_>]) -> Result<Logits, EngineError>;
    /// Blocks in the KV pool.
    fn num_kv_blocks(&self) -> usize;
    /// Token slots per block.
    fn block_size(&self) -> usize;
    /// The longest sequence the model can run (prompt plus generation): 2048 for GPT-J.
    fn max_context(&self) -> usize;
    /// The model's tokenizer (for the text of streamed tokens and stop strings).
    fn tokenizer(&self) -> &Tokenizer;
    /// Rows of its output (token ids it can take and score).
    fn vocab_size(&self) -> usize;
}

impl Model for gptj_engine::Engine {
    fn forward(&mut self, rows: &[SeqChunk<'_>]) -> Result<Logits, EngineError> {
        gptj_engine::Engine::forward(self, rows)
    }
    fn num_kv_blocks(&self) -> usize {
        gptj_engine::Engine::num_kv_blocks(self)
    }
    fn block_size(&self) -> usize {
        gptj_engine::Engine::block_size(self)
    }
    fn max_context(&self) -> usize {
        gptj_engine::Engine::max_context(self)
    }
    fn tokenizer(&self) -> &Tokenizer {
        gptj_engine::Engine::tokenizer(self)
    }
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
}
