//! A fake [`Model`] for tests: exact, instant, and strict about block tables.
//!
//! [`FakeModel`] keeps a real paged "KV cache" of token ids: each forward writes every row's
//! tokens into the slots its block table names, then reads the row's whole context back
//! through the table and computes the next token as a function of that context (by default a
//! hash of all of it). So the output depends on every token the cache holds for the sequence:
//! a wrong block table, a prefix-cache block with the wrong content or a block reused while
//! still in use changes the output, and tests comparing outputs catch it.
//!
//! It also checks each step the way a real engine relies on (tables cover the row, ids in
//! range, no row writes a block another row of the step reads, positions before `start_pos`
//! were written) and records every step's rows in a [`FakeLog`] that tests can inspect after
//! the model has moved into the engine thread.

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use gptj_engine::{EngineError, LogitRows, Logits, SeqChunk, Tokenizer};

use crate::model::Model;

/// GPT-J's tokenizer, loaded once per process.
///
/// # Panics
/// If the tokenizer embedded in the engine cannot be parsed (a build defect).
pub fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| match Tokenizer::gptj() {
        Ok(t) => t,
        Err(e) => panic!("the embedded GPT-J tokenizer does not load: {e}"),
    })
}

/// The next-token function: context (prompt and generated tokens, as read from the cache)
/// to the next token id.
pub type Rule = Arc<dyn Fn(&[u32]) -> u32 + Send + Sync>;

/// The default rule: an FNV hash of the whole context, mapped into `0..50000` (never EOS).
pub fn hash_rule() -> Rule {
    Arc::new(|ctx: &[u32]| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in ctx {
            h ^= u64::from(t);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % 50_000) as u32
    })
}

/// The logit the fake model gives the token its rule picks, and every other token.
const PICKED_LOGIT: f32 = 10.0;
const OTHER_LOGIT: f32 = -10.0;
/// Rows of the fake model's logits (GPT-J's).
const VOCAB: usize = 50400;

/// The fake model's log-probability of `token` after `ctx` under the default rule
/// ([`hash_rule`]) over its rows, by the definition of log-softmax: what a server
/// that reports log-probabilities must report for it.
pub fn hash_rule_logprob(ctx: &[u32], token: u32) -> f64 {
    let (picked, other) = (f64::from(PICKED_LOGIT), f64::from(OTHER_LOGIT));
    let lse = (picked.exp() + (VOCAB - 1) as f64 * other.exp()).ln();
    let l = if hash_rule()(ctx) == token {
        picked
    } else {
        other
    };
    l - lse
}

/// One row of a recorded step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRow {
    /// The row's tokens.
    pub tokens: Vec<u32>,
    /// Position of the first.
    pub start_pos: usize,
    /// Its block table.
    pub block_table: Vec<u32>,
    /// Which logits it asked for.
    pub logits: LogitRows,
}

#[derive(Debug, Default)]
struct LogInner {
    steps: Vec<Vec<RecordedRow>>,
    violations: Vec<String>,
}

/// What the fake model saw; shared with the model, readable from any thread.
#[derive(Debug, Clone, Default)]
pub struct FakeLog(Arc<Mutex<LogInner>>);

impl FakeLog {
    fn lock(&self) -> MutexGuard<'_, LogInner> {
        // A test that panicked while holding the lock leaves valid data behind.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every forward call's rows, in order.
    pub fn steps(&self) -> Vec<Vec<RecordedRow>> {
        self.lock().steps.clone()
    }

    /// Number of forward calls so far.
    pub fn num_steps(&self) -> usize {
        self.lock().steps.len()
    }

    /// Every broken expectation about a step (should stay empty).
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }
}

/// A deterministic, instant model over a paged cache of token ids. See the module docs.
pub struct FakeModel {
    num_blocks: usize,
    block_size: usize,
    max_context: usize,
    vocab: usize,
    slots: Vec<Option<u32>>,
    rule: Rule,
    poison: Option<u32>,
    delay: Duration,
    log: FakeLog,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for FakeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeModel")
            .field("num_blocks", &self.num_blocks)
            .field("block_size", &self.block_size)
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

impl FakeModel {
    /// A pool of `num_blocks` blocks of `block_size` tokens, context 2048, vocabulary 50400,
    /// the [`hash_rule`].
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            num_blocks,
            block_size,
            max_context: 2048,
            vocab: VOCAB,
            slots: vec![None; num_blocks * block_size],
            rule: hash_rule(),
            poison: None,
            delay: Duration::ZERO,
            log: FakeLog::default(),
            tokenizer: tokenizer().clone(),
        }
    }

    /// Uses `rule` to pick each next token.
    pub fn with_rule(mut self, rule: impl Fn(&[u32]) -> u32 + Send + Sync + 'static) -> Self {
        self.rule = Arc::new(rule);
        self
    }

    /// Sets the context window.
    pub fn with_max_context(mut self, n: usize) -> Self {
        self.max_context = n;
        self
    }

    /// Sets the width of the logits rows.
    pub fn with_vocab(mut self, n: usize) -> Self {
        self.vocab = n;
        self
    }

    /// Any forward with a row containing `token` fails (as an engine error would).
    pub fn with_poison(mut self, token: u32) -> Self {
        self.poison = Some(token);
        self
    }

    /// Every forward sleeps this long (to make running jobs observable from other threads).
    pub fn with_step_delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// The log of what this model saw.
    pub fn log(&self) -> FakeLog {
        self.log.clone()
    }

    /// Checks a step's rows; returns the first problem.
    fn check(&self, rows: &[SeqChunk<'_>]) -> Result<(), String> {
        let bs = self.block_size;
        let mut written: Vec<(usize, u32)> = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            if row.tokens.is_empty() {
                return Err(format!("row {i} has no tokens"));
            }
            let end = row.start_pos + row.tokens.len();
            if end > self.max_context {
                return Err(format!(
                    "row {i} reaches position {end} past the context {}",
                    self.max_context
                ));
            }
            if row.block_table.len() * bs < end {
                return Err(format!(
                    "row {i}: {} blocks cannot hold {end} positions",
                    row.block_table.len()
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for b in row.block_table {
                if b.0 as usize >= self.num_blocks || !seen.insert(b.0) {
                    return Err(format!("row {i}: block {} out of range or repeated", b.0));
                }
            }
            for p in 0..row.start_pos {
                let slot = row.block_table[p / bs].0 as usize * bs + p % bs;
                if self.slots[slot].is_none() {
                    return Err(format!("row {i} reads position {p} that was never written"));
                }
            }
            for p in row.start_pos..end {
                written.push((i, row.block_table[p / bs].0));
            }
        }
        for &(i, b) in &written {
            for (j, row) in rows.iter().enumerate() {
                if j != i && row.block_table.iter().any(|x| x.0 == b) {
                    return Err(format!("row {i} writes block {b}, which row {j} also uses"));
                }
            }
        }
        Ok(())
    }
}

impl Model for FakeModel {
    fn forward(&mut self, rows: &[SeqChunk<'_>]) -> Result<Logits, EngineError> {
        {
            let mut log = self.log.lock();
            log.steps.push(
                rows.iter()
                    .map(|r| RecordedRow {
                        tokens: r.tokens.to_vec(),
                        start_pos: r.start_pos,
                        block_table: r.block_table.iter().map(|b| b.0).collect(),
                        logits: r.logits,
                    })
                    .collect(),
            );
        }
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if let Err(v) = self.check(rows) {
            self.log.lock().violations.push(v.clone());
            return Err(EngineError::InvalidInput(v));
        }
        if let Some(p) = self.poison {
            if rows.iter().any(|r| r.tokens.contains(&p)) {
                return Err(EngineError::InvalidInput(format!(
                    "poisoned token {p} in the batch"
                )));
            }
        }
        let bs = self.block_size;
        let wanted: usize = rows.iter().map(|r| r.logits.count(r.tokens.len())).sum();
        let mut data = vec![OTHER_LOGIT; wanted * self.vocab];
        let mut out_row = 0;
        let mut ctx = Vec::new();
        for row in rows {
            for (k, &t) in row.tokens.iter().enumerate() {
                let p = row.start_pos + k;
                self.slots[row.block_table[p / bs].0 as usize * bs + p % bs] = Some(t);
            }
            let end = row.start_pos + row.tokens.len();
            let count = row.logits.count(row.tokens.len());
            // Each position's logits see the context up to and including it.
            for upto in end + 1 - count..=end {
                ctx.clear();
                for p in 0..upto {
                    let slot = row.block_table[p / bs].0 as usize * bs + p % bs;
                    ctx.push(self.slots[slot].unwrap_or(u32::MAX));
                }
                let next = (self.rule)(&ctx) as usize;
                if next >= self.vocab {
                    return Err(EngineError::InvalidInput(format!(
                        "rule produced {next} >= vocab {}",
                        self.vocab
                    )));
                }
                data[out_row * self.vocab + next] = PICKED_LOGIT;
                out_row += 1;
            }
        }
        Ok(Logits::new(data, self.vocab))
    }

    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn max_context(&self) -> usize {
        self.max_context
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}
