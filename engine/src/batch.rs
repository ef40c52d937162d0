//! The shapes that cross the engine's boundary: what the scheduler asks for in one step
//! (a ragged batch of sequence chunks, each with its KV block table) and what comes back
//! (the logits of the positions that asked for them).

/// Index of one block in the paged KV pool. Block `b` holds token slots
/// `b * block_size .. (b + 1) * block_size` in every layer's K and V storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// One row of a ragged batch: new tokens of one sequence, to be appended at `start_pos`.
///
/// A decode row has one token; a prefill row has the prompt (or a chunk of it). The row's
/// tokens attend to positions `0..start_pos` already in the cache (through `block_table`)
/// and causally to each other. `block_table` must cover positions `0..start_pos + tokens.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// Token ids to run, at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [u32],
    /// Position of the first token, i.e. how many tokens of this sequence are already cached.
    pub start_pos: usize,
    /// The blocks of this sequence, in order: position `p` lives in block `block_table[p / block_size]`.
    pub block_table: &'a [BlockId],
    /// Which of the row's positions return logits.
    pub logits: LogitRows,
}

/// Which positions of a [`SeqChunk`] return logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// None: a prefill chunk that is not the last, whose only job is to fill the cache.
    None,
    /// The last token's, to sample the next token from.
    Last,
    /// Every token's, in position order (prompt log-probabilities); the last one is also the
    /// one to sample from when the chunk ends the sequence.
    All,
}

impl LogitRows {
    /// How many logit rows a chunk of `len` tokens returns.
    pub fn count(self, len: usize) -> usize {
        match self {
            Self::None => 0,
            Self::Last => usize::from(len > 0),
            Self::All => len,
        }
    }
}

/// Logits of the positions that asked for them ([`SeqChunk::logits`]), in row order and
/// position order within a row, as f32.
#[derive(Debug, Clone)]
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
}

impl Logits {
    /// Wraps `rows * vocab` values laid out row after row.
    pub fn new(data: Vec<f32>, vocab: usize) -> Self {
        debug_assert!(vocab > 0 && data.len().is_multiple_of(vocab));
        Self { data, vocab }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    /// True when no row asked for logits.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Width of each row (the model's vocabulary, embedding rows included).
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The logits of row `i` (the i-th position that asked for them).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// Iterates over the rows in order.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.vocab)
    }
}
