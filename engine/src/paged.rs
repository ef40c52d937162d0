//! The paged KV cache and the two custom ops that use it: writing a step's new keys and
//! values into their slots, and attention of each new token over its sequence's blocks.
//!
//! Layout of one layer's cache: a single tensor `(2, num_blocks, block_size, n_head, head_dim)`,
//! K at index 0 and V at index 1. A step touches only the slots of its own tokens and the
//! blocks of its own rows: nothing here copies or concatenates the pool, so a step's cost is
//! independent of the pool's size.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, InplaceOp3, Layout, Shape, Tensor};

use crate::simd::{self, Elem};
use rayon::prelude::*;

use crate::batch::SeqChunk;
use crate::error::{EngineError, Result};

#[cfg(feature = "cuda")]
#[path = "paged_cuda.rs"]
mod cuda;

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
    /// The index arrays uploaded to the GPU, on first use in a step.
    #[cfg(feature = "cuda")]
    device: cuda::DeviceIndexCell,
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

    /// Block table of the row that token `t` belongs to.
    fn table_of(&self, t: usize) -> &[u32] {
        let row = self.token_row[t] as usize;
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
        n_embd: usize,
        block_size: usize,
        dtype: DType,
    ) -> usize {
        n_layer * 2 * block_size * n_embd * dtype.size_in_bytes()
    }

    /// Allocates the pool, zeroed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n_layer: usize,
        n_head: usize,
        head_dim: usize,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
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
                    &[2, num_blocks, block_size, n_head, head_dim],
                    dtype,
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

/// Writes a step's new keys and values into their slots (in place).
pub(crate) fn write_kv(
    cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    step: &Arc<StepLayout>,
) -> Result<()> {
    cache.inplace_op3(
        k,
        v,
        &WriteKv {
            step: Arc::clone(step),
        },
    )?;
    Ok(())
}

/// Attention of each new token (`q`: `(tokens, n_head, head_dim)`) over the cached keys and
/// values of its own sequence, positions `0..=its position`. Scores and softmax in f32.
pub(crate) fn paged_attention(
    q: &Tensor,
    cache: &Tensor,
    step: &Arc<StepLayout>,
    scale: f32,
) -> Result<Tensor> {
    Ok(q.apply_op2_no_bwd(
        cache,
        &PagedAttention {
            step: Arc::clone(step),
            scale,
        },
    )?)
}

struct WriteKv {
    step: Arc<StepLayout>,
}

struct PagedAttention {
    step: Arc<StepLayout>,
    scale: f32,
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// Cache geometry from its layout: (slots per K or V half, n_head * head_dim).
fn cache_dims(layout: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    match layout.dims() {
        [2, blocks, block_size, heads, dim] => Ok((blocks * block_size, *heads, *dim)),
        d => candle_core::bail!(
            "KV cache must be (2, blocks, block_size, heads, head_dim), got {d:?}"
        ),
    }
}

impl WriteKv {
    fn write<T: Elem>(
        &self,
        cache: &mut [T],
        cache_l: &Layout,
        k: &[T],
        k_l: &Layout,
        v: &[T],
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let (slots, heads, dim) = cache_dims(cache_l)?;
        let width = heads * dim;
        let (start, end) = cache_l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("KV cache must be contiguous".into()))?;
        let cache = &mut cache[start..end];
        let k = contiguous(k, k_l, "new keys")?;
        let v = contiguous(v, v_l, "new values")?;
        let n = self.step.num_tokens();
        if k.len() != n * width || v.len() != n * width {
            candle_core::bail!(
                "new K/V hold {} values, expected {n} tokens x {width}",
                k.len()
            );
        }
        let (k_half, v_half) = cache.split_at_mut(slots * width);
        for (t, &slot) in self.step.slots.iter().enumerate() {
            let dst = slot as usize * width;
            k_half[dst..dst + width].copy_from_slice(&k[t * width..(t + 1) * width]);
            v_half[dst..dst + width].copy_from_slice(&v[t * width..(t + 1) * width]);
        }
        Ok(())
    }
}

impl InplaceOp3 for WriteKv {
    fn name(&self) -> &'static str {
        "gptj-write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        match (cache, k, v) {
            (CpuStorage::F32(c), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (CpuStorage::F16(c), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l)
            }
            (c, k, _) => candle_core::bail!(
                "KV write: cache is {:?} but new keys are {:?}; both must be the same float type",
                c.dtype(),
                k.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cache_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        self.cuda(cache, cache_l, k, k_l, v, v_l)
    }
}

impl PagedAttention {
    fn attend<T: Elem>(
        &self,
        q: &[T],
        q_l: &Layout,
        cache: &[T],
        cache_l: &Layout,
    ) -> candle_core::Result<Vec<T>> {
        let (slots, heads, dim) = cache_dims(cache_l)?;
        let width = heads * dim;
        let q = contiguous(q, q_l, "queries")?;
        let cache = contiguous(cache, cache_l, "KV cache")?;
        let n = self.step.num_tokens();
        if q.len() != n * width {
            candle_core::bail!(
                "queries hold {} values, expected {n} tokens x {width}",
                q.len()
            );
        }
        let (k_half, v_half) = cache.split_at(slots * width);
        #[cfg(target_arch = "x86_64")]
        if crate::packed::available() {
            if let Some(out) = self.attend_avx512(q, k_half, v_half, heads, dim) {
                return Ok(out);
            }
        }
        let block_size = self.step.block_size;
        let mut out = vec![T::narrow(0.0); n * width];
        out.par_chunks_mut(dim).enumerate().for_each_init(
            || {
                (
                    Vec::<f32>::new(),
                    vec![0f32; dim],
                    vec![0f32; dim],
                    vec![0f32; dim],
                )
            },
            |(scores, qbuf, row, acc), (i, out)| {
                let (t, h) = (i / heads, i % heads);
                let qf = T::as_f32(&q[i * dim..(i + 1) * dim], qbuf);
                let table = self.step.table_of(t);
                let ctx = self.step.positions[t] as usize + 1;
                let offset_of = |pos: usize| {
                    let slot = table[pos / block_size] as usize * block_size + pos % block_size;
                    slot * width + h * dim
                };
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for pos in 0..ctx {
                    let off = offset_of(pos);
                    let s = simd::dot(qf, T::as_f32(&k_half[off..off + dim], row)) * self.scale;
                    max = max.max(s);
                    scores.push(s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                acc.fill(0.0);
                for (pos, &p) in scores.iter().enumerate() {
                    let off = offset_of(pos);
                    simd::axpy(p / sum, T::as_f32(&v_half[off..off + dim], row), acc);
                }
                for (o, &a) in out.iter_mut().zip(acc.iter()) {
                    *o = T::narrow(a);
                }
            },
        );
        Ok(out)
    }
}

#[cfg(target_arch = "x86_64")]
impl PagedAttention {
    /// The AVX-512 path, on candle's thread pool: `None` for head sizes it has no kernel for.
    fn attend_avx512<T: Elem>(
        &self,
        q: &[T],
        k_half: &[T],
        v_half: &[T],
        heads: usize,
        dim: usize,
    ) -> Option<Vec<T>> {
        use crate::avx512::{attend_heads, AttendScratch, HeadsView};
        type Kernel<T> = unsafe fn(
            &[f32],
            &[T],
            &[T],
            usize,
            &HeadsView<'_>,
            f32,
            &mut AttendScratch,
            &mut [f32],
        );
        let kernel: Kernel<T> = match dim {
            16 => attend_heads::<1, T>,
            32 => attend_heads::<2, T>,
            64 => attend_heads::<4, T>,
            128 => attend_heads::<8, T>,
            256 => attend_heads::<16, T>,
            _ => return None,
        };
        if heads > 64 {
            return None;
        }
        let width = heads * dim;
        let tokens = self.step.num_tokens();
        let pool = candle_core::utils::barrier_pool();
        // Work items are runs of heads of one token: all heads when there are tokens enough to
        // keep every thread busy, fewer (more items) for small batches.
        let runs = ((pool.n_workers() + 1) * 4)
            .div_ceil(tokens.max(1))
            .clamp(1, heads);
        let per_run = heads.div_ceil(runs);
        let runs = heads.div_ceil(per_run);
        let block_size = self.step.block_size;
        let mut out = vec![T::narrow(0.0); tokens * width];
        let out_ptr = crate::simd::SharedOut::new(out.as_mut_ptr());
        pool.execute_chunked(tokens * runs, |range| {
            let mut scratch = AttendScratch::default();
            let (mut qbuf, mut res) = (vec![0f32; per_run * dim], vec![0f32; per_run * dim]);
            for i in range {
                let (t, r) = (i / runs, i % runs);
                let (h0, h1) = (r * per_run, ((r + 1) * per_run).min(heads));
                let len = (h1 - h0) * dim;
                let start = t * width + h0 * dim;
                let qf = T::as_f32(&q[start..start + len], &mut qbuf);
                let at = HeadsView {
                    table: self.step.table_of(t),
                    block_size,
                    width,
                    first: h0 * dim,
                    heads: h1 - h0,
                };
                let ctx = self.step.positions[t] as usize + 1;
                // Safety: `available()` held; the step layout was checked against the pool's
                // geometry when built, so every slot is inside the cache halves.
                unsafe {
                    kernel(
                        qf,
                        k_half,
                        v_half,
                        ctx,
                        &at,
                        self.scale,
                        &mut scratch,
                        &mut res[..len],
                    );
                }
                // Safety: item `i` owns `out[start..start + len]`; the buffer outlives the
                // pool call.
                let dst = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(start), len) };
                for (o, &x) in dst.iter_mut().zip(&res[..len]) {
                    *o = T::narrow(x);
                }
            }
        });
        Some(out)
    }
}

impl CustomOp2 for PagedAttention {
    fn name(&self) -> &'static str {
        "gptj-paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        cache: &CpuStorage,
        cache_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = q_l.shape().clone();
        let out = match (q, cache) {
            (CpuStorage::F32(q), CpuStorage::F32(c)) => CpuStorage::F32(self.attend(q, q_l, c, cache_l)?),
            (CpuStorage::F16(q), CpuStorage::F16(c)) => CpuStorage::F16(self.attend(q, q_l, c, cache_l)?),
            (CpuStorage::BF16(q), CpuStorage::BF16(c)) => CpuStorage::BF16(self.attend(q, q_l, c, cache_l)?),
            (q, c) => candle_core::bail!(
                "paged attention: queries are {:?} but the cache is {:?}; both must be the same float type",
                q.dtype(),
                c.dtype()
            ),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        cache: &candle_core::CudaStorage,
        cache_l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda(q, q_l, cache, cache_l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BlockId;

    /// Plain causal attention over contiguous K/V for one sequence, the reference.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        heads: usize,
        dim: usize,
        start: usize,
        scale: f32,
    ) -> Vec<f32> {
        let width = heads * dim;
        let n = q.len() / width;
        let mut out = vec![0f32; n * width];
        for t in 0..n {
            let ctx = start + t + 1;
            for h in 0..heads {
                let qv = &q[t * width + h * dim..][..dim];
                let scores: Vec<f32> = (0..ctx)
                    .map(|p| simd::dot(qv, &k[p * width + h * dim..][..dim]) * scale)
                    .collect();
                let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                for (p, e) in exps.iter().enumerate() {
                    for d in 0..dim {
                        out[t * width + h * dim + d] += e / sum * v[p * width + h * dim + d];
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed)) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    /// Prefills `len` tokens in two chunks (split at `split`, each attending to what came
    /// before) through a scattered block table, and compares with plain attention.
    fn check_against_plain(heads: usize, dim: usize, block_size: usize, len: usize, split: usize) {
        let num_blocks = 16;
        let width = heads * dim;
        let (q, k, v) = (
            values(len * width, 1),
            values(len * width, 2),
            values(len * width, 3),
        );
        let dev = Device::Cpu;
        let pool = KvPool::new(1, heads, dim, num_blocks, block_size, DType::F32, &dev).unwrap();
        let table: Vec<BlockId> = [9, 2, 14, 5, 0, 11, 7]
            .iter()
            .take(len.div_ceil(block_size))
            .map(|&b| BlockId(b))
            .collect();
        let tokens = vec![0u32; len];
        let mut got = Vec::new();
        for (a, b) in [(0, split), (split, len)] {
            let rows = [SeqChunk {
                tokens: &tokens[a..b],
                start_pos: a,
                block_table: &table,
                want_logits: true,
            }];
            let step = Arc::new(StepLayout::new(&rows, block_size, num_blocks, 128).unwrap());
            let t = |x: &[f32]| {
                Tensor::from_slice(&x[a * width..b * width], (b - a, heads, dim), &dev).unwrap()
            };
            write_kv(pool.layer(0), &t(&k), &t(&v), &step).unwrap();
            let out = paged_attention(&t(&q), pool.layer(0), &step, 0.3).unwrap();
            got.extend(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let want = reference(&q, &k, &v, heads, dim, 0, 0.3);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "heads {heads} dim {dim}: {g} vs {w}");
        }
    }

    #[test]
    fn chunked_writes_and_scattered_blocks_match_plain_attention() {
        // A head size with no vector kernel (the portable path) ...
        check_against_plain(2, 8, 4, 11, 6);
        // ... and GPT-J's (the AVX-512 path where the CPU has it): contexts that end inside a
        // group of 16 positions and inside a block, odd and even.
        check_against_plain(3, 64, 16, 53, 20);
        check_against_plain(2, 256, 8, 37, 17);
        check_against_plain(1, 32, 16, 16, 15);
    }

    #[test]
    fn bad_batches_are_errors_not_panics() {
        let table = [BlockId(0)];
        let toks = [1u32, 2, 3];
        let rows = [SeqChunk {
            tokens: &toks,
            start_pos: 2,
            block_table: &table,
            want_logits: true,
        }];
        let err = StepLayout::new(&rows, 4, 8, 64).unwrap_err().to_string();
        assert!(err.contains("needs 2 blocks"), "{err}");
        let table = [BlockId(8)];
        let rows = [SeqChunk {
            tokens: &toks[..1],
            start_pos: 0,
            block_table: &table,
            want_logits: true,
        }];
        let err = StepLayout::new(&rows, 4, 8, 64).unwrap_err().to_string();
        assert!(err.contains("block 8"), "{err}");
        let table = [BlockId(1)];
        let rows = [
            SeqChunk {
                tokens: &toks[..1],
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            },
            SeqChunk {
                tokens: &toks[..1],
                start_pos: 0,
                block_table: &table,
                want_logits: true,
            },
        ];
        let err = StepLayout::new(&rows, 4, 8, 64).unwrap_err().to_string();
        assert!(err.contains("same cache slot"), "{err}");
    }
}
