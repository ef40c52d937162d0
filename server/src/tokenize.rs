/*!
Prompt tokenization with bounded cost.

BPE on a long run of text without spaces costs far more memory than the text itself (about
80 bytes per byte measured on a 1.9 MB one-word prompt), and a prompt that could never fit
the context window is worth no tokenizing at all. So:

- a prompt longer than the context window times the longest token's bytes is refused
  before tokenizing: it has more tokens than the window, whatever its text
  ([`PromptTokenizer::max_prompt_bytes`]);
- at most as many prompts are tokenized at once as the machine has cores (others wait);
- after tokenizing a large input the allocator is asked to return its free memory to the
  system (glibc keeps freed blocks in its arenas otherwise, so a burst of large prompts
  would leave the process's RSS high long after).
*/

use std::sync::Arc;

use gptj_engine::Tokenizer;
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::params::{PromptName, ValidationError};

/// Inputs at least this large (bytes, all prompts of a request) are followed by a trim.
const TRIM_AFTER_BYTES: usize = 64 << 10;

/// The tokenizer, behind the bounds of the module docs.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_prompt_bytes: usize,
    permits: Arc<Semaphore>,
}

impl PromptTokenizer {
    /// Bounds for a model whose context window is `max_context` tokens.
    pub fn new(tokenizer: Tokenizer, max_context: usize) -> Self {
        // A token's lossy text is never shorter than its bytes (an invalid sequence of 1 to 3
        // bytes becomes the 3-byte U+FFFD). Added tokens (`<|endoftext|>`) decode to nothing
        // but are matched in the input text: the floor covers them.
        let longest = (0..tokenizer.vocab_size() as u32)
            .map(|id| tokenizer.decode(&[id]).len())
            .max()
            .unwrap_or(0)
            .max(32);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            tokenizer,
            max_prompt_bytes: max_context.saturating_mul(longest),
            permits: Arc::new(Semaphore::new(cores)),
        }
    }

    /// The tokenizer itself.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Prompts longer than this (bytes) have more tokens than the context window.
    pub fn max_prompt_bytes(&self) -> usize {
        self.max_prompt_bytes
    }

    /// Tokenizes `texts`; `at(i)` names prompt `i` in errors.
    pub async fn encode(
        &self,
        texts: Vec<String>,
        at: PromptName,
    ) -> Result<Vec<Vec<u32>>, ApiError> {
        if let Some(i) = texts.iter().position(|t| t.len() > self.max_prompt_bytes) {
            return Err(ValidationError::PromptTooManyBytes {
                at: at(i),
                bytes: texts[i].len(),
                max_bytes: self.max_prompt_bytes,
            }
            .into());
        }
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|e| ApiError::Internal(format!("tokenizer gate closed: {e}")))?;
        let tokenizer = self.tokenizer.clone();
        tokio::task::spawn_blocking(move || {
            let out = texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    tokenizer.encode(t).map_err(|e| ValidationError::Tokenize {
                        at: at(i),
                        message: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>();
            let bytes: usize = texts.iter().map(String::len).sum();
            drop(texts);
            if bytes >= TRIM_AFTER_BYTES {
                crate::memory::release_free_memory();
            }
            drop(permit);
            out
        })
        .await
        .map_err(|e| ApiError::Internal(format!("tokenizer task failed: {e}")))?
        .map_err(ApiError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prompts_past_the_byte_bound_are_refused_untokenized() {
        let t = PromptTokenizer::new(gptj_scheduler::testing::tokenizer().clone(), 2048);
        // GPT-2's longest tokens are long runs of one character; the bound is well under the
        // 2 MB body limit.
        assert!(
            t.max_prompt_bytes() >= 2048 * 32,
            "{}",
            t.max_prompt_bytes()
        );
        assert!(t.max_prompt_bytes() < 2_000_000, "{}", t.max_prompt_bytes());
        let at = |i: usize| format!("instance {i}");
        let huge = "x".repeat(t.max_prompt_bytes() + 1);
        let e = t.encode(vec!["ok".into(), huge], at).await.unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("instance 1") && msg.contains("context window"),
            "{msg}"
        );
        let ids = t.encode(vec!["Hello world".into()], at).await.unwrap();
        assert_eq!(ids[0].len(), 2);
    }
}
