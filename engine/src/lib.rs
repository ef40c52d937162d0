//! The GPT-J engine: everything that touches tensors.
//!
//! It loads a GPT-J checkpoint (HuggingFace layout) or a `builtin:` model, runs one forward
//! pass over a *ragged batch* (every row has its own length and position; prefill chunks and
//! single decode tokens mix freely) against a paged KV cache, and turns logits into tokens with
//! per-sequence sampling. It knows nothing about HTTP or scheduling policy: the scheduler
//! decides which rows go into a step and which KV blocks each row owns.

// Every `unsafe` operation, inside `unsafe fn`s too, sits in its own block with the reason it
// is sound: the kernels are where that matters most.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod attention;
pub mod batch;
pub mod bench;
pub mod config;
mod cpu;
mod engine;
pub mod error;
mod heap;
pub mod hub;
mod hugepages;
mod linear;
pub mod logprobs;
mod model;
mod paged;
pub mod precision;
mod residual;
mod rope;
pub mod sampling;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
mod weights;

pub use batch::{BlockId, LogitRows, Logits, SeqChunk};
pub use config::GptjConfig;
pub use engine::{Builtin, DeviceKind, Engine, EngineOptions, ModelSpec};
pub use error::{EngineError, Result};
pub use logprobs::{token_logprob, TokenLogprob};
pub use paged::KvPool;
pub use precision::{KvCacheDtype, KvFormat, Precision};
pub use sampling::{Penalties, Sampler, SamplingParams};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
