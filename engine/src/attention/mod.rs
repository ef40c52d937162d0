//! The two custom ops on the paged KV cache: [`write_kv`] stores a step's new keys and values
//! in their slots (in place), and [`paged_attention`] computes each new token's attention over
//! its own sequence's blocks (scores and softmax in f32).
//!
//! Each op is a private candle op struct behind a checked public function, with one
//! implementation per backend:
//!
//! - `portable`: plain Rust over slices, for any CPU and head size (and under Miri);
//! - `kv_elem`: what a head's row of the cache holds in each format (float values, or int8
//!   bytes and a scale), the one thing the CPU paths need to know about the format;
//! - `avx512` and `avx2`: the vector kernels, where an [`Isa`](crate::cpu::Isa) token says
//!   the CPU has them (attention only; the write is a copy, a rounding or, for int8, the
//!   portable quantization), driven by `runs`;
//! - `cuda`: launches of `kernels/paged.cu`, under `--features cuda`.
//!
//! Before any kernel runs, the cache tensor is checked against the step
//! ([`StepLayout::check_cache`]): the block ids of the step were checked against the pool's
//! size when the step was laid out, and the kernels read without bounds checks, so a cache of
//! another geometry would be read out of bounds.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, InplaceOp3, Layout, Shape, Tensor};

use crate::cpu::Elem;
#[cfg(target_arch = "x86_64")]
use crate::cpu::Isa;
use crate::error::Result;
use crate::paged::{CacheShape, StepLayout};
use crate::precision::KvFormat;
use kv_elem::KvElem;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(feature = "cuda")]
mod cuda;
mod kv_elem;
mod portable;
#[cfg(target_arch = "x86_64")]
mod runs;

/// Writes a step's new keys and values (`(tokens, n_head, head_dim)` each, any float dtype)
/// into their slots of one layer's `cache` (in place), rounded to the cache's dtype. On the
/// CPU the rounding happens in the copy; the CUDA kernels take the cache's dtype, so there
/// the keys and values are converted first.
pub(crate) fn write_kv(cache: &Tensor, k: &Tensor, v: &Tensor, step: &StepLayout) -> Result<()> {
    cpu_only_int8(step.check_cache(cache.dims(), cache.dtype())?, cache)?;
    if cache.device().is_cpu() || k.dtype() == cache.dtype() {
        cache.inplace_op3(k, v, &WriteKv { step })?;
    } else {
        let (k, v) = (k.to_dtype(cache.dtype())?, v.to_dtype(cache.dtype())?);
        cache.inplace_op3(&k, &v, &WriteKv { step })?;
    }
    Ok(())
}

/// Attention of each new token (`q`: `(tokens, n_head, head_dim)`, any float dtype) over the
/// cached keys and values of its own sequence, positions `0..=its position`. Scores and
/// softmax in f32; the output in `q`'s dtype. On the CPU queries and output stay in their
/// dtype whatever the cache's; the CUDA kernels take the cache's, so there they are
/// converted on the way in and out.
pub(crate) fn paged_attention(
    q: &Tensor,
    cache: &Tensor,
    step: &StepLayout,
    scale: f32,
) -> Result<Tensor> {
    cpu_only_int8(step.check_cache(cache.dims(), cache.dtype())?, cache)?;
    let op = PagedAttention { step, scale };
    if cache.device().is_cpu() || q.dtype() == cache.dtype() {
        Ok(q.apply_op2_no_bwd(cache, &op)?)
    } else {
        let out = q.to_dtype(cache.dtype())?.apply_op2_no_bwd(cache, &op)?;
        Ok(out.to_dtype(q.dtype())?)
    }
}

/// The int8 cache has CPU kernels only: on another device it is an error, not a conversion of
/// the activations to bytes. (The model refuses `--kv-cache-dtype int8` off the CPU before
/// this could happen.)
fn cpu_only_int8(shape: CacheShape, cache: &Tensor) -> Result<()> {
    if shape.format == KvFormat::Int8 && !cache.device().is_cpu() {
        return Err(crate::EngineError::InvalidInput(
            "the int8 KV cache runs on the CPU only: use --kv-cache-dtype f16 (or auto) on a GPU"
                .into(),
        ));
    }
    Ok(())
}

/// `$body` with `$x` bound to the elements of a float [`CpuStorage`] (`f32`, `f16` or
/// `bf16`); any other dtype is an error naming `$what`.
macro_rules! with_float {
    ($storage:expr, $what:literal, |$x:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32($x) => $body,
            CpuStorage::F16($x) => $body,
            CpuStorage::BF16($x) => $body,
            other => candle_core::bail!(
                "{}: {:?} is not a float type (f32, f16 or bf16)",
                $what,
                other.dtype()
            ),
        }
    };
}

/// `$body` with `$x` bound to the elements of a KV cache's [`CpuStorage`]: a float type, or
/// `u8` for int8; any other is an error.
macro_rules! with_cache {
    ($storage:expr, |$x:ident| $body:expr) => {
        match $storage {
            CpuStorage::U8($x) => $body,
            other => with_float!(other, "KV cache", |$x| $body),
        }
    };
}

struct WriteKv<'a> {
    step: &'a StepLayout,
}

struct PagedAttention<'a> {
    step: &'a StepLayout,
    scale: f32,
}

/// The geometry of the cache in `cache_l` (of `cache_dtype` elements), checked against `step`,
/// and that the cache and the step's `(tokens, heads, head_dim)` operands (`operands`) are
/// contiguous and sized to match.
/// Both backends call this before launching anything.
fn check_operands(
    step: &StepLayout,
    cache_l: &Layout,
    cache_dtype: candle_core::DType,
    operands: &[(&Layout, &str)],
) -> candle_core::Result<CacheShape> {
    let shape = step
        .check_cache(cache_l.dims(), cache_dtype)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if !cache_l.is_contiguous() {
        candle_core::bail!("the KV cache must be contiguous");
    }
    let want = step.num_tokens() * shape.width();
    for (layout, what) in operands {
        if !layout.is_contiguous() || layout.shape().elem_count() != want {
            candle_core::bail!(
                "{what} must be contiguous with {} tokens x {} heads x {} (got {:?})",
                step.num_tokens(),
                shape.heads,
                shape.head_dim,
                layout.dims()
            );
        }
    }
    Ok(shape)
}

/// The elements of a contiguous operand.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) if end <= data.len() => Ok(&data[start..end]),
        _ => candle_core::bail!("paged KV op: operand is not contiguous"),
    }
}

impl WriteKv<'_> {
    #[allow(clippy::too_many_arguments)]
    fn write<C: candle_core::WithDType, X>(
        &self,
        cache: &mut [C],
        cache_l: &Layout,
        k: &[X],
        k_l: &Layout,
        v: &[X],
        v_l: &Layout,
        store: portable::StoreSlot<X, C>,
    ) -> candle_core::Result<()> {
        let shape = check_operands(
            self.step,
            cache_l,
            C::DTYPE,
            &[(k_l, "new keys"), (v_l, "new values")],
        )?;
        let Some((start, end)) = cache_l.contiguous_offsets() else {
            candle_core::bail!("the KV cache must be contiguous");
        };
        let (k, v) = (contiguous(k, k_l)?, contiguous(v, v_l)?);
        portable::write_kv(self.step, shape, &mut cache[start..end], k, v, store);
        Ok(())
    }
}

impl InplaceOp3 for WriteKv<'_> {
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
        use portable::{copy_slot, quantize_slot, round_slot};
        /// `$body` with `$k` and `$v` bound to the new keys' and values' elements, of one
        /// float type.
        macro_rules! with_new_kv {
            (|$k:ident, $v:ident| $body:expr) => {
                match (k, v) {
                    (CpuStorage::F32($k), CpuStorage::F32($v)) => $body,
                    (CpuStorage::F16($k), CpuStorage::F16($v)) => $body,
                    (CpuStorage::BF16($k), CpuStorage::BF16($v)) => $body,
                    (k, v) => candle_core::bail!(
                        "KV write: new keys are {:?} and new values {:?}; both must be the same float type",
                        k.dtype(),
                        v.dtype()
                    ),
                }
            };
        }
        match (cache, k, v) {
            // One type throughout (f32 weights, f16 or bf16 activations by default): a copy.
            (CpuStorage::F32(c), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l, copy_slot)
            }
            (CpuStorage::F16(c), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l, copy_slot)
            }
            (CpuStorage::BF16(c), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.write(c, cache_l, k, k_l, v, v_l, copy_slot)
            }
            // The int8 cache: each head's row quantized on the way in.
            (CpuStorage::U8(c), ..) => {
                with_new_kv!(|k, v| self.write(c, cache_l, k, k_l, v, v_l, quantize_slot))
            }
            // A float cache of another type (q8_0's f16 under f32 activations): rounded in
            // the copy.
            (cache, ..) => with_float!(cache, "KV cache", |c| {
                with_new_kv!(|k, v| self.write(c, cache_l, k, k_l, v, v_l, round_slot))
            }),
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
        let shape = check_operands(
            self.step,
            cache_l,
            cache.dtype(),
            &[(k_l, "new keys"), (v_l, "new values")],
        )?;
        cuda::write_kv(self.step, shape, cache, cache_l, k, k_l, v, v_l)
    }
}

impl PagedAttention<'_> {
    fn attend<T: KvElem + candle_core::WithDType, Q: Elem>(
        &self,
        q: &[Q],
        q_l: &Layout,
        cache: &[T],
        cache_l: &Layout,
    ) -> candle_core::Result<Vec<Q>> {
        let shape = check_operands(self.step, cache_l, T::DTYPE, &[(q_l, "queries")])?;
        let (q, cache) = (contiguous(q, q_l)?, contiguous(cache, cache_l)?);
        let (k_half, v_half) = cache.split_at(shape.half_len());
        #[cfg(target_arch = "x86_64")]
        {
            let (step, scale) = (self.step, self.scale);
            let out = match crate::cpu::Isa::detect() {
                Some(Isa::Avx512(cpu)) => {
                    avx512::attend(cpu, step, shape, q, k_half, v_half, scale)
                }
                Some(Isa::Avx2(cpu)) => avx2::attend(cpu, step, shape, q, k_half, v_half, scale),
                None => None,
            };
            if let Some(out) = out {
                return Ok(out);
            }
        }
        Ok(portable::attend(
            self.step, shape, q, k_half, v_half, self.scale,
        ))
    }
}

impl CustomOp2 for PagedAttention<'_> {
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
        let out = with_cache!(cache, |c| match q {
            CpuStorage::F32(q) => CpuStorage::F32(self.attend(q, q_l, c, cache_l)?),
            CpuStorage::F16(q) => CpuStorage::F16(self.attend(q, q_l, c, cache_l)?),
            CpuStorage::BF16(q) => CpuStorage::BF16(self.attend(q, q_l, c, cache_l)?),
            other => candle_core::bail!(
                "paged attention: queries are {:?}, not a float type (f32, f16 or bf16)",
                other.dtype()
            ),
        });
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
        let shape = check_operands(self.step, cache_l, cache.dtype(), &[(q_l, "queries")])?;
        cuda::attend(self.step, shape, self.scale, q, q_l, cache, cache_l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BlockId, LogitRows, SeqChunk};
    use crate::cpu::vector;
    use crate::paged::KvPool;
    use candle_core::{DType, Device};

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
                    .map(|p| vector::dot(qv, &k[p * width + h * dim..][..dim]) * scale)
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
    /// before) through a scattered block table, and compares with plain attention. Queries,
    /// keys and values are f32; the cache is `cache` (keys and values rounded or quantized to
    /// it on the way in, as plain attention is given them), the output f32.
    fn check_against_plain(
        heads: usize,
        dim: usize,
        block_size: usize,
        len: usize,
        split: usize,
        cache: KvFormat,
    ) {
        let num_blocks = 16;
        let width = heads * dim;
        let (q, k, v) = (
            values(len * width, 1),
            values(len * width, 2),
            values(len * width, 3),
        );
        let dev = Device::Cpu;
        let pool = KvPool::new(1, heads, dim, num_blocks, block_size, cache, &dev).unwrap();
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
                logits: LogitRows::Last,
            }];
            let step = StepLayout::new(&rows, block_size, num_blocks, 128).unwrap();
            let t = |x: &[f32]| {
                Tensor::from_slice(&x[a * width..b * width], (b - a, heads, dim), &dev).unwrap()
            };
            write_kv(pool.layer(0), &t(&k), &t(&v), &step).unwrap();
            let out = paged_attention(&t(&q), pool.layer(0), &step, 0.3).unwrap();
            assert_eq!(
                out.dtype(),
                DType::F32,
                "the output keeps the queries' dtype"
            );
            got.extend(out.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        let want = reference(
            &q,
            &stored(&k, dim, cache),
            &stored(&v, dim, cache),
            heads,
            dim,
            0,
            0.3,
        );
        // Int8's kernels scale each query-key sum, plain attention each value: another rounding.
        let tolerance = if cache == KvFormat::Int8 { 1e-4 } else { 1e-5 };
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() < tolerance,
                "heads {heads} dim {dim} cache {cache:?}: {g} vs {w}"
            );
        }
    }

    /// `x` (rows of `dim` values) as a cache of `format` gives them back (without candle for
    /// f32 and int8: Miri runs those).
    fn stored(x: &[f32], dim: usize, format: KvFormat) -> Vec<f32> {
        if format == KvFormat::F32 {
            return x.to_vec();
        }
        if format == KvFormat::Int8 {
            let row = format.row_len(dim);
            let mut bytes = vec![0u8; x.len() / dim * row];
            kv_elem::quantize_rows(x, &mut bytes, dim);
            let mut buf = vec![0f32; dim];
            return bytes
                .chunks(row)
                .flat_map(|r| u8::values(r, dim, &mut buf).to_vec())
                .collect();
        }
        let t = Tensor::from_slice(x, x.len(), &Device::Cpu).unwrap();
        let t = t.to_dtype(format.storage_dtype()).unwrap();
        t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn chunked_writes_and_scattered_blocks_match_plain_attention() {
        // A head size with no vector kernel (the portable path) ...
        check_against_plain(2, 8, 4, 11, 6, KvFormat::F32);
        // ... and GPT-J's (the vector kernel of the best instruction set the CPU has):
        // contexts that end inside a group of positions (16 on AVX-512, 8 on AVX2) and
        // inside a block, odd and even.
        check_against_plain(3, 64, 16, 53, 20, KvFormat::F32);
        check_against_plain(2, 256, 8, 37, 17, KvFormat::F32);
        check_against_plain(1, 32, 16, 16, 15, KvFormat::F32);
    }

    /// f32 activations over a narrower cache (q8_0's f16 by default, or int8): keys and values
    /// are rounded or quantized once on the way in, queries and output stay f32, on both
    /// paths.
    #[test]
    fn f32_queries_attend_over_a_narrow_cache() {
        for cache in [KvFormat::F16, KvFormat::Bf16, KvFormat::Int8] {
            check_against_plain(2, 8, 4, 11, 6, cache);
            check_against_plain(3, 64, 16, 53, 20, cache);
            check_against_plain(2, 256, 8, 37, 17, cache);
        }
    }

    /// The portable paths on plain slices, without candle's tensors: what Miri runs. Step 1
    /// prefills row a (5 tokens) next to the first 2 tokens of row b; step 2 decodes row b's
    /// third token. Both rows have scattered block tables. An f32 cache and an int8 one.
    #[test]
    fn portable_paths_match_plain_attention() {
        portable_path_matches::<f32>(KvFormat::F32, portable::copy_slot);
        portable_path_matches::<u8>(KvFormat::Int8, portable::quantize_slot);
    }

    fn portable_path_matches<C: KvElem + Default + Clone>(
        format: KvFormat,
        store: portable::StoreSlot<f32, C>,
    ) {
        let (heads, dim, block_size, num_blocks) = (2, 4, 2, 8);
        let width = heads * dim;
        let shape = CacheShape::new(num_blocks, block_size, heads, dim, format);
        let mut cache = vec![C::default(); 2 * shape.half_len()];
        let seq = |n: usize, seed: u32| {
            let w = n * width;
            (values(w, seed), values(w, seed + 1), values(w, seed + 2))
        };
        let ((qa, ka, va), (qb, kb, vb)) = (seq(5, 1), seq(3, 4));
        let (table_a, table_b) = (
            [BlockId(6), BlockId(1), BlockId(4)],
            [BlockId(0), BlockId(7)],
        );
        let tokens = [0u32; 5];
        /// A row of a step: its token range, block table and the sequence's q, k, v.
        type Row<'a> = (usize, usize, &'a [BlockId], &'a [f32], &'a [f32], &'a [f32]);
        let mut run = |rows: &[Row<'_>]| {
            let chunks: Vec<SeqChunk<'_>> = rows
                .iter()
                .map(|&(a, b, table, ..)| SeqChunk {
                    tokens: &tokens[a..b],
                    start_pos: a,
                    block_table: table,
                    logits: LogitRows::Last,
                })
                .collect();
            let step = StepLayout::new(&chunks, block_size, num_blocks, 16).unwrap();
            let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
            for &(a, b, _, qs, ks, vs) in rows {
                q.extend_from_slice(&qs[a * width..b * width]);
                k.extend_from_slice(&ks[a * width..b * width]);
                v.extend_from_slice(&vs[a * width..b * width]);
            }
            portable::write_kv(&step, shape, &mut cache, &k, &v, store);
            let (k_half, v_half) = cache.split_at(shape.half_len());
            portable::attend(&step, shape, &q, k_half, v_half, 0.5)
        };
        let first = run(&[
            (0, 5, &table_a, &qa, &ka, &va),
            (0, 2, &table_b, &qb, &kb, &vb),
        ]);
        let second = run(&[(2, 3, &table_b, &qb, &kb, &vb)]);
        let got_a = &first[..5 * width];
        let got_b = [&first[5 * width..], &second[..]].concat();
        let plain = |q: &[f32], k: &[f32], v: &[f32]| {
            let (k, v) = (stored(k, dim, format), stored(v, dim, format));
            reference(q, &k, &v, heads, dim, 0, 0.5)
        };
        for (got, want) in [
            (got_a, plain(&qa, &ka, &va)),
            (&got_b[..], plain(&qb, &kb, &vb)),
        ] {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "{format}: {g} vs {w}");
            }
        }
    }

    /// Every vector kernel the CPU has (not only the one `paged_attention` picks) against the
    /// portable path: one sequence of 21 positions (inside a group of 8 and of 16) over a
    /// scattered table, f32 queries, and an f16 cache and an int8 one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_vector_kernel_matches_the_portable_path() {
        kernels_match_portable::<half::f16>(KvFormat::F16, portable::round_slot, 1e-5);
        // The kernels scale each query-key sum, the portable path each value.
        kernels_match_portable::<u8>(KvFormat::Int8, portable::quantize_slot, 1e-4);
    }

    #[cfg(target_arch = "x86_64")]
    fn kernels_match_portable<C: KvElem + Default + Clone>(
        format: KvFormat,
        store: portable::StoreSlot<f32, C>,
        tolerance: f32,
    ) {
        let (heads, dim, block_size, num_blocks, len) = (3, 64, 4, 8, 21);
        let width = heads * dim;
        let shape = CacheShape::new(num_blocks, block_size, heads, dim, format);
        let table: Vec<BlockId> = [5, 0, 7, 2, 6, 1].map(BlockId).to_vec();
        let tokens = [0u32; 21];
        let rows = [SeqChunk {
            tokens: &tokens[..len],
            start_pos: 0,
            block_table: &table,
            logits: LogitRows::Last,
        }];
        let step = StepLayout::new(&rows, block_size, num_blocks, 32).unwrap();
        let (q, k, v) = (
            values(len * width, 7),
            values(len * width, 8),
            values(len * width, 9),
        );
        let mut cache = vec![C::default(); 2 * shape.half_len()];
        portable::write_kv(&step, shape, &mut cache, &k, &v, store);
        let (kh, vh) = cache.split_at(shape.half_len());
        let want = portable::attend(&step, shape, &q, kh, vh, 0.3);
        let isas = Isa::available();
        if isas.is_empty() {
            eprintln!("skipped: no vector kernel on this CPU");
        }
        for isa in isas {
            let got = match isa {
                Isa::Avx512(cpu) => avx512::attend(cpu, &step, shape, &q, kh, vh, 0.3),
                Isa::Avx2(cpu) => avx2::attend(cpu, &step, shape, &q, kh, vh, 0.3),
            }
            .expect("a kernel for head size 64");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < tolerance, "{isa:?} {format}: {g} vs {w}");
            }
        }
    }

    /// A prefill chunk's tokens go to the kernels in blocks of consecutive tokens
    /// (`runs::QUERY_BLOCK`); a token's result is the same bits whatever block it falls in,
    /// and alone (a one-token row, the decode kernel): the whole chunk as one row, the same
    /// tokens cut into rows at other points, and each token alone, on every vector kernel
    /// the CPU has, for an f16 cache and an int8 one, two head sizes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_token_is_the_same_bits_in_any_query_block() {
        for (heads, dim) in [(3, 64), (2, 256)] {
            blocks_agree::<half::f16>(heads, dim, KvFormat::F16, portable::round_slot);
            blocks_agree::<u8>(heads, dim, KvFormat::Int8, portable::quantize_slot);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn blocks_agree<C: KvElem + Default + Clone>(
        heads: usize,
        dim: usize,
        format: KvFormat,
        store: portable::StoreSlot<f32, C>,
    ) {
        let (block_size, num_blocks, len) = (4, 12, 37);
        let width = heads * dim;
        let shape = CacheShape::new(num_blocks, block_size, heads, dim, format);
        let table: Vec<BlockId> = [5, 0, 7, 2, 6, 1, 11, 3, 9, 4].map(BlockId).to_vec();
        let tokens = [0u32; 37];
        // A step of the given rows, each `start..end` of the one sequence.
        let layout = |cuts: &[(usize, usize)]| {
            let rows: Vec<SeqChunk<'_>> = cuts
                .iter()
                .map(|&(a, b)| SeqChunk {
                    tokens: &tokens[a..b],
                    start_pos: a,
                    block_table: &table,
                    logits: LogitRows::Last,
                })
                .collect();
            StepLayout::new(&rows, block_size, num_blocks, 64).unwrap()
        };
        let (q, k, v) = (
            values(len * width, 3),
            values(len * width, 4),
            values(len * width, 5),
        );
        let mut cache = vec![C::default(); 2 * shape.half_len()];
        portable::write_kv(&layout(&[(0, len)]), shape, &mut cache, &k, &v, store);
        let (kh, vh) = cache.split_at(shape.half_len());
        if Isa::available().is_empty() {
            eprintln!("skipped: no vector kernel on this CPU");
        }
        for isa in Isa::available() {
            let attend = |cuts: &[(usize, usize)]| {
                let step = layout(cuts);
                let q: Vec<f32> = cuts
                    .iter()
                    .flat_map(|&(a, b)| q[a * width..b * width].to_vec())
                    .collect();
                match isa {
                    Isa::Avx512(cpu) => avx512::attend(cpu, &step, shape, &q, kh, vh, 0.3),
                    Isa::Avx2(cpu) => avx2::attend(cpu, &step, shape, &q, kh, vh, 0.3),
                }
                .expect("a kernel for this head size")
            };
            let whole = attend(&[(0, len)]);
            let cut = attend(&[(0, 5), (5, 6), (6, 19), (19, len)]);
            let alone: Vec<f32> = (0..len).flat_map(|t| attend(&[(t, t + 1)])).collect();
            for (name, got) in [("cut", &cut), ("alone", &alone)] {
                let same = whole
                    .iter()
                    .zip(got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{isa:?} {format} dim {dim}: whole chunk against {name}"
                );
            }
        }
    }

    /// Issue 14: a cache that does not match the step is an error, not an out-of-bounds read,
    /// through the checked functions and through the op itself.
    #[test]
    fn a_cache_that_does_not_match_the_step_is_an_error() {
        let dev = Device::Cpu;
        let (heads, dim) = (2, 16);
        // The step is laid out for a pool of 16 blocks of 4 slots and uses block 15.
        let table = [BlockId(15)];
        let rows = [SeqChunk {
            tokens: &[1, 2],
            start_pos: 0,
            block_table: &table,
            logits: LogitRows::Last,
        }];
        let step = StepLayout::new(&rows, 4, 16, 64).unwrap();
        let q = Tensor::ones((2, heads, dim), DType::F32, &dev).unwrap();
        let good = KvPool::new(1, heads, dim, 16, 4, KvFormat::F32, &dev).unwrap();
        write_kv(good.layer(0), &q, &q, &step).unwrap();
        paged_attention(&q, good.layer(0), &step, 0.25).unwrap();
        for (blocks, block_size) in [(2, 4), (16, 2), (4, 16)] {
            let small =
                KvPool::new(1, heads, dim, blocks, block_size, KvFormat::F32, &dev).unwrap();
            let cache = small.layer(0);
            let err = paged_attention(&q, cache, &step, 0.25)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("was laid out for a pool of 16 blocks of 4"),
                "{err}"
            );
            let err = write_kv(cache, &q, &q, &step).unwrap_err().to_string();
            assert!(
                err.contains("was laid out for a pool of 16 blocks of 4"),
                "{err}"
            );
            // The op checks for itself, whoever calls it.
            let op = PagedAttention {
                step: &step,
                scale: 0.25,
            };
            let err = q.apply_op2_no_bwd(cache, &op).unwrap_err().to_string();
            assert!(err.contains("was laid out for a pool"), "{err}");
            let err = cache
                .inplace_op3(&q, &q, &WriteKv { step: &step })
                .unwrap_err()
                .to_string();
            assert!(err.contains("was laid out for a pool"), "{err}");
        }
        // Queries for a different number of heads than the cache holds.
        let wrong_q = Tensor::ones((2, heads + 1, dim), DType::F32, &dev).unwrap();
        let err = paged_attention(&wrong_q, good.layer(0), &step, 0.25)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("queries must be contiguous with 2 tokens"),
            "{err}"
        );
    }
}
