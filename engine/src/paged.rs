//! The paged KV cache: the pool ([`KvPool`]), and where a step's tokens live in it
//! ([`StepLayout`]). The ops that write and read it are in `attention`.
//!
//! Layout of one layer's cache: a single tensor `(2, num_blocks, block_size, n_head, row)`, K
//! at index 0 and V at index 1, where a row is one head's keys or values in the cache's
//! [`KvFormat`] (`head_dim` floats, or for int8 `head_dim` bytes and their scale). A step touches only the slots of its own tokens and the
//! blocks of its own rows: nothing copies or concatenates the pool, so a step's cost is
//! independent of the pool's size.
//!
//! The kernels read the cache through raw offsets (the AVX-512 and CUDA ones without bounds
//! checks), so what keeps them inside it is two checks made here: [`StepLayout::new`] checks
//! every block id of the step against the pool's `num_blocks`, and [`StepLayout::check_cache`]
//! checks, before any kernel runs, that the cache tensor it is handed has exactly the
//! geometry the step was laid out for.

use candle_core::{DType, Device, Tensor};

use crate::batch::SeqChunk;
use crate::error::{EngineError, Result};
use crate::precision::KvFormat;

/// Where every token of a ragged batch lives, computed once per step and shared by all layers.
#[derive(Debug)]
pub(crate) struct StepLayout {
    /// Per new token: its cache slot, `block * block_size + position % block_size`.
    slots: Vec<u32>,
    /// Per new token: its absolute position in its sequence.
    positions: Vec<u32>,
    /// Per new token: the row (sequence) it belongs to.
    token_row: Vec<u32>,
    /// All rows' block tables, one after another.
    tables: Vec<u32>,
    /// Per row: where its block table starts in `tables`.
    table_start: Vec<u32>,
    block_size: usize,
    /// The pool size every block id was checked against.
    num_blocks: usize,
    /// The index arrays uploaded to the GPU, on first use in a step.
    #[cfg(feature = "cuda")]
    device: std::sync::OnceLock<DeviceIndex>,
}

/// The geometry of one layer's cache tensor, checked against a step by
/// [`StepLayout::check_cache`]: every slot the step refers to is below `slots()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheShape {
    pub(crate) num_blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    /// Cache elements of one head's row: `format.row_len(head_dim)`.
    pub(crate) row: usize,
    pub(crate) format: KvFormat,
}

impl CacheShape {
    /// The geometry of a cache of `format` (the dims of its tensor are `(2, num_blocks,
    /// block_size, heads, format.row_len(head_dim))`).
    #[cfg(test)]
    pub(crate) fn new(
        num_blocks: usize,
        block_size: usize,
        heads: usize,
        head_dim: usize,
        format: KvFormat,
    ) -> Self {
        Self {
            num_blocks,
            block_size,
            heads,
            head_dim,
            row: format.row_len(head_dim),
            format,
        }
    }

    /// Token slots in each of the K and V halves.
    pub(crate) fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Values per token of the activations: every head's `head_dim` side by side.
    pub(crate) fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Cache elements per slot: every head's row side by side (`width()` for float caches).
    pub(crate) fn slot_len(&self) -> usize {
        self.heads * self.row
    }

    /// Elements in each of the K and V halves.
    pub(crate) fn half_len(&self) -> usize {
        self.slots() * self.slot_len()
    }
}

impl StepLayout {
    /// Checks a batch against the pool's geometry and lays it out. Every problem is the
    /// caller's bug, reported as `InvalidInput` instead of a panic or a corrupted cache.
    pub(crate) fn new(
        rows: &[SeqChunk<'_>],
        block_size: usize,
        num_blocks: usize,
        max_positions: usize,
    ) -> Result<Self> {
        let total: usize = rows.iter().map(|r| r.tokens.len()).sum();
        let mut layout = Self {
            slots: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            token_row: Vec::with_capacity(total),
            tables: Vec::new(),
            table_start: Vec::with_capacity(rows.len()),
            block_size,
            num_blocks,
            #[cfg(feature = "cuda")]
            device: Default::default(),
        };
        for (r, row) in rows.iter().enumerate() {
            if row.tokens.is_empty() {
                return Err(EngineError::InvalidInput(format!("row {r} has no tokens")));
            }
            let end = row.start_pos + row.tokens.len();
            if end > max_positions {
                return Err(EngineError::InvalidInput(format!(
                    "row {r} reaches position {end}, past the model's context of {max_positions}"
                )));
            }
            let needed = end.div_ceil(block_size);
            if row.block_table.len() < needed {
                return Err(EngineError::InvalidInput(format!(
                    "row {r} needs {needed} blocks for {end} positions but its block table has {}",
                    row.block_table.len()
                )));
            }
            if let Some(b) = row.block_table[..needed]
                .iter()
                .find(|b| b.0 as usize >= num_blocks)
            {
                return Err(EngineError::InvalidInput(format!(
                    "row {r} refers to block {} but the pool has {num_blocks} blocks",
                    b.0
                )));
            }
            layout.table_start.push(layout.tables.len() as u32);
            layout
                .tables
                .extend(row.block_table[..needed].iter().map(|b| b.0));
            for pos in row.start_pos..end {
                let block = row.block_table[pos / block_size].0 as usize;
                layout
                    .slots
                    .push((block * block_size + pos % block_size) as u32);
                layout.positions.push(pos as u32);
                layout.token_row.push(r as u32);
            }
        }
        let mut sorted = layout.slots.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(EngineError::InvalidInput(format!(
                "two new tokens of this step would write the same cache slot {}",
                w[0]
            )));
        }
        Ok(layout)
    }

    /// Number of new tokens in the step.
    pub(crate) fn num_tokens(&self) -> usize {
        self.slots.len()
    }

    /// Absolute positions of the new tokens, in order.
    pub(crate) fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Cache slots of the new tokens, in order: each below `num_blocks * block_size`.
    pub(crate) fn slots(&self) -> &[u32] {
        &self.slots
    }

    /// The row (sequence chunk) that token `t` belongs to; a row's tokens are consecutive.
    pub(crate) fn row_of(&self, t: usize) -> usize {
        self.token_row[t] as usize
    }

    /// How many positions token `t` attends over: `0..=its position`.
    pub(crate) fn context_of(&self, t: usize) -> usize {
        self.positions[t] as usize + 1
    }

    /// Checks a cache tensor's dimensions and element type against the pool this step was laid
    /// out for, and returns its geometry. A kernel may read every slot of the step's block
    /// tables without further checks only after this returned `Ok` for the tensor it reads: the
    /// block ids were checked against `num_blocks` by [`StepLayout::new`], and this checks that
    /// the cache has exactly that many blocks of `block_size` slots. O(1).
    pub(crate) fn check_cache(&self, dims: &[usize], dtype: DType) -> Result<CacheShape> {
        let &[2, num_blocks, block_size, heads, row] = dims else {
            return Err(EngineError::InvalidInput(format!(
                "a KV cache must be (2, blocks, block_size, heads, row), got {dims:?}"
            )));
        };
        let Some(format) = KvFormat::from_storage(dtype) else {
            return Err(EngineError::InvalidInput(format!(
                "a KV cache of {dtype:?} elements: use f32, f16, bf16 or (int8) u8"
            )));
        };
        let Some(head_dim) = format.head_dim(row).filter(|&d| d > 0) else {
            return Err(EngineError::InvalidInput(format!(
                "a {format} KV cache's rows of {row} elements hold no values"
            )));
        };
        if num_blocks != self.num_blocks || block_size != self.block_size {
            return Err(EngineError::InvalidInput(format!(
                "the KV cache has {num_blocks} blocks of {block_size} slots but the step was laid \
                 out for a pool of {} blocks of {}",
                self.num_blocks, self.block_size
            )));
        }
        Ok(CacheShape {
            num_blocks,
            block_size,
            heads,
            head_dim,
            row,
            format,
        })
    }

    /// Block table of the row that token `t` belongs to: `context_of(t).div_ceil(block_size)`
    /// block ids (at least), each below `num_blocks`.
    pub(crate) fn table_of(&self, t: usize) -> &[u32] {
        let row = self.row_of(t);
        let start = self.table_start[row] as usize;
        let end = self
            .table_start
            .get(row + 1)
            .map_or(self.tables.len(), |&e| e as usize);
        &self.tables[start..end]
    }
}

/// Per-layer K/V storage for `num_blocks` blocks of `block_size` token slots.
#[derive(Debug)]
pub struct KvPool {
    layers: Vec<Tensor>,
    num_blocks: usize,
    block_size: usize,
}

impl KvPool {
    /// Bytes one block costs across all layers (K and V).
    pub fn bytes_per_block(
        n_layer: usize,
        n_head: usize,
        head_dim: usize,
        block_size: usize,
        format: KvFormat,
    ) -> usize {
        n_layer * 2 * block_size * format.bytes_per_token(n_head, head_dim)
    }

    /// Allocates the pool, zeroed (for int8, rows of zeros with a scale of zero).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n_layer: usize,
        n_head: usize,
        head_dim: usize,
        num_blocks: usize,
        block_size: usize,
        format: KvFormat,
        device: &Device,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(EngineError::InvalidInput(format!(
                "a KV pool needs at least one block of at least one slot (got {num_blocks} blocks of {block_size})"
            )));
        }
        let layers = (0..n_layer)
            .map(|_| {
                crate::hugepages::zeros(
                    &[2, num_blocks, block_size, n_head, format.row_len(head_dim)],
                    format.storage_dtype(),
                    device,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
        })
    }

    /// Number of blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The cache tensor of one layer.
    pub(crate) fn layer(&self, i: usize) -> &Tensor {
        &self.layers[i]
    }
}

/// A step's index arrays on the GPU, uploaded once per step (on first use) and shared by every
/// layer's kernels.
#[cfg(feature = "cuda")]
pub(crate) struct DeviceIndex {
    pub(crate) slots: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    pub(crate) positions: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    pub(crate) token_row: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    pub(crate) tables: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    pub(crate) table_start: candle_core::cuda_backend::cudarc::driver::CudaSlice<u32>,
    /// The longest context of the step: the kernel's score buffer.
    pub(crate) max_context: u32,
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for DeviceIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIndex")
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "cuda")]
impl StepLayout {
    /// The index arrays on `dev`, uploaded on the first call.
    pub(crate) fn device_index(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> candle_core::Result<&DeviceIndex> {
        if let Some(index) = self.device.get() {
            return Ok(index);
        }
        let index = DeviceIndex {
            slots: dev.clone_htod(&self.slots)?,
            positions: dev.clone_htod(&self.positions)?,
            token_row: dev.clone_htod(&self.token_row)?,
            tables: dev.clone_htod(&self.tables)?,
            table_start: dev.clone_htod(&self.table_start)?,
            max_context: self.positions.iter().copied().max().unwrap_or(0) + 1,
        };
        Ok(self.device.get_or_init(|| index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BlockId, LogitRows};

    #[test]
    fn bad_batches_are_errors_not_panics() {
        let table = [BlockId(0)];
        let toks = [1u32, 2, 3];
        let rows = [SeqChunk {
            tokens: &toks,
            start_pos: 2,
            block_table: &table,
            logits: LogitRows::Last,
        }];
        let err = StepLayout::new(&rows, 4, 8, 64).unwrap_err().to_string();
        assert!(err.contains("needs 2 blocks"), "{err}");
        let table = [BlockId(8)];
        let rows = [SeqChunk {
            tokens: &toks[..1],
            start_pos: 0,
            block_table: &table,
            logits: LogitRows::Last,
        }];
        let err = StepLayout::new(&rows, 4, 8, 64).unwrap_err().to_string();
        assert!(err.contains("block 8"), "{err}");
        let table = [BlockId(1)];
        let rows = [
            SeqChunk {
                tokens: &toks[..1],
                start_pos: 0,
                block_table: &table,
                logits: LogitRows::Last,
            },
            SeqChunk {
                tokens: &toks[..1],
                start_pos: 0,
                block_table: &table,
                logits: LogitRows::Last,
            },
        ];
        let err = StepLayout::new(&rows, 4, 8, 64).unwrap_err().to_string();
        assert!(err.contains("same cache slot"), "{err}");
    }

    #[test]
    fn a_cache_of_another_geometry_is_refused() {
        let table = [BlockId(7)];
        let rows = [SeqChunk {
            tokens: &[1],
            start_pos: 0,
            block_table: &table,
            logits: LogitRows::Last,
        }];
        let step = StepLayout::new(&rows, 4, 8, 64).unwrap();
        let ok = step.check_cache(&[2, 8, 4, 3, 16], DType::F16).unwrap();
        assert_eq!((ok.slots(), ok.width(), ok.half_len()), (32, 48, 32 * 48));
        let int8 = step.check_cache(&[2, 8, 4, 3, 20], DType::U8).unwrap();
        assert_eq!(int8, CacheShape::new(8, 4, 3, 16, KvFormat::Int8));
        assert_eq!((int8.width(), int8.slot_len()), (48, 60));
        for (dims, dtype, want) in [
            (&[2, 4, 4, 3, 16][..], DType::F32, "4 blocks of 4 slots"),
            (&[2, 8, 2, 3, 16][..], DType::F32, "8 blocks of 2 slots"),
            (&[2, 16, 4, 3, 16][..], DType::F32, "16 blocks of 4 slots"),
            (&[8, 4, 3, 16][..], DType::F32, "must be (2, blocks"),
            (&[2, 8, 4, 3, 4][..], DType::U8, "hold no values"),
            (&[2, 8, 4, 3, 16][..], DType::I64, "I64 elements"),
        ] {
            let err = step.check_cache(dims, dtype).unwrap_err().to_string();
            assert!(err.contains(want), "{dims:?}: {err}");
        }
    }
}
