//! Shared helpers for the engine's integration tests: the golden fixtures made by
//! `scripts/make-golden.sh` (HuggingFace transformers' outputs) and a tiny driver that runs
//! sequences through `Engine::forward` the way the scheduler does.
#![allow(dead_code)]

use std::path::PathBuf;

use gptj_engine::{BlockId, Engine, EngineOptions, LogitRows, Precision, SeqChunk};
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Expected {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub last_logits_f16: Vec<f32>,
    pub prefix_logits: Option<Prefix>,
    pub logprobs: Logprobs,
}

/// HF's `log_softmax` over a full forward of prompt + greedy ids: entry `t` is about the
/// token at position `t + 1`.
#[derive(Deserialize)]
pub struct Logprobs {
    pub token_logprobs: Vec<f32>,
    pub top_ids: Vec<Vec<u32>>,
    pub top_logprobs: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
pub struct Prefix {
    pub len: usize,
    pub last_logits: Vec<f32>,
}

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

pub fn expected(name: &str) -> Expected {
    let path = fixture_dir(name).join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

pub fn load(name: &str, precision: Precision) -> Engine {
    load_with_kv(name, precision, gptj_engine::KvCacheDtype::Auto)
}

/// As [`load`], with the KV cache in `kv_cache_dtype`.
pub fn load_with_kv(
    name: &str,
    precision: Precision,
    kv_cache_dtype: gptj_engine::KvCacheDtype,
) -> Engine {
    let opts = EngineOptions {
        precision,
        kv_cache_dtype,
        block_size: 4,
        kv_cache_memory: Some(8 << 20),
        ..Default::default()
    };
    Engine::load_dir(&fixture_dir(name), &opts).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Error relative to the reference's largest magnitude (element-wise relative error is
/// meaningless for logits near zero).
pub fn rel_err(got: &[f32], reference: &[f32]) -> f32 {
    let scale = reference.iter().map(|x| x.abs()).fold(0.0, f32::max);
    max_abs_diff(got, reference) / scale
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// One sequence's state as the scheduler would keep it.
pub struct Seq {
    pub tokens: Vec<u32>,
    pub computed: usize,
    pub blocks: Vec<BlockId>,
}

impl Seq {
    pub fn new(prompt: &[u32], blocks: Vec<BlockId>) -> Self {
        Self {
            tokens: prompt.to_vec(),
            computed: 0,
            blocks,
        }
    }

    /// The next chunk of at most `max` uncomputed tokens.
    pub fn chunk(&self, max: usize) -> SeqChunk<'_> {
        let end = self.computed.saturating_add(max).min(self.tokens.len());
        SeqChunk {
            tokens: &self.tokens[self.computed..end],
            start_pos: self.computed,
            block_table: &self.blocks,
            logits: if end == self.tokens.len() {
                LogitRows::Last
            } else {
                LogitRows::None
            },
        }
    }
}

/// Runs one sequence alone: its whole prompt in one chunk, then `steps` greedy decode steps.
/// Returns the logits before each generated token and the generated tokens.
pub fn greedy_alone(
    engine: &mut Engine,
    prompt: &[u32],
    steps: usize,
    blocks: Vec<BlockId>,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut seq = Seq::new(prompt, blocks);
    let mut all_logits = Vec::new();
    for _ in 0..steps {
        let chunk = seq.chunk(usize::MAX);
        let n = chunk.tokens.len();
        let logits = engine.forward(&[chunk]).unwrap();
        let row = logits.row(0).to_vec();
        seq.computed += n;
        seq.tokens.push(argmax(&row));
        all_logits.push(row);
    }
    let generated = seq.tokens[prompt.len()..].to_vec();
    (all_logits, generated)
}

/// `n` blocks starting at `first`, every other id, so tables are scattered through the pool.
pub fn scattered_blocks(first: u32, n: usize) -> Vec<BlockId> {
    (0..n as u32).map(|i| BlockId(first + 2 * i)).collect()
}
