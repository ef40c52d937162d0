//! The portable CPU paths of the paged ops: plain, bounds-checked Rust over slices (rayon for
//! attention's heads, the vector helpers for dot products). They run wherever the AVX-512
//! kernel does not (other CPUs, head sizes it has no instance for, `GPTJ_CPU_KERNELS=candle`)
//! and are what Miri checks.

use rayon::prelude::*;

use super::kv_elem::{quantize_rows, KvElem};
use crate::cpu::{vector, Elem};
use crate::paged::{CacheShape, StepLayout};

/// How one token's keys or values (every head, in the activations' type `X`) become its
/// slot of a cache of element type `C`: `(src, slot, f32 scratch as long as src, head_dim)`.
pub(crate) type StoreSlot<X, C> = fn(&[X], &mut [C], &mut [f32], usize);

/// Writes the step's new keys and values (`(tokens, heads, head_dim)` each, in the
/// activations' type `X`) into their slots of `cache`, a layer's cache of geometry `shape`,
/// each token's slot through `store` ([`copy_slot`] where the types are the same,
/// [`round_slot`] where the cache is a narrower or wider float, [`quantize_slot`] for int8).
pub(crate) fn write_kv<C, X>(
    step: &StepLayout,
    shape: CacheShape,
    cache: &mut [C],
    k: &[X],
    v: &[X],
    store: StoreSlot<X, C>,
) {
    let (width, slot_len, dim) = (shape.width(), shape.slot_len(), shape.head_dim);
    let (k_half, v_half) = cache.split_at_mut(shape.half_len());
    let mut wide = vec![0f32; width];
    for (t, &slot) in step.slots().iter().enumerate() {
        let dst = slot as usize * slot_len..(slot as usize + 1) * slot_len;
        let src = t * width..(t + 1) * width;
        store(&k[src.clone()], &mut k_half[dst.clone()], &mut wide, dim);
        store(&v[src], &mut v_half[dst], &mut wide, dim);
    }
}

/// A slot stored as it is (cache and activations of one type).
pub(crate) fn copy_slot<T: Copy>(src: &[T], dst: &mut [T], _wide: &mut [f32], _dim: usize) {
    dst.copy_from_slice(src);
}

/// A slot rounded to the cache's float type through f32.
pub(crate) fn round_slot<X: Elem, C: Elem>(src: &[X], dst: &mut [C], wide: &mut [f32], _: usize) {
    C::narrow_into(X::as_f32(src, wide), dst);
}

/// A slot quantized to int8 rows, one scale per head (see [`quantize_rows`]).
pub(crate) fn quantize_slot<X: Elem>(src: &[X], dst: &mut [u8], wide: &mut [f32], dim: usize) {
    quantize_rows(X::as_f32(src, wide), dst, dim);
}

/// Attention of every new token of `step` (`q`: `(tokens, heads, head_dim)`) over positions
/// `0..=its position` of its own sequence, read from the K and V halves of a cache of
/// geometry `shape`. Scores and softmax in f32; queries and output in the activations' type
/// `Q`, the cache in its own `T` (each row's values widened and, for int8, scaled).
pub(crate) fn attend<T: KvElem, Q: Elem>(
    step: &StepLayout,
    shape: CacheShape,
    q: &[Q],
    k_half: &[T],
    v_half: &[T],
    scale: f32,
) -> Vec<Q> {
    let (heads, dim, width, block_size) =
        (shape.heads, shape.head_dim, shape.width(), shape.block_size);
    let (slot_len, row_len) = (shape.slot_len(), shape.row);
    let mut out = vec![Q::narrow(0.0); step.num_tokens() * width];
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
            let qf = Q::as_f32(&q[i * dim..(i + 1) * dim], qbuf);
            let table = step.table_of(t);
            let ctx = step.context_of(t);
            let offset_of = |pos: usize| {
                let slot = table[pos / block_size] as usize * block_size + pos % block_size;
                slot * slot_len + h * row_len
            };
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for pos in 0..ctx {
                let off = offset_of(pos);
                let s = vector::dot(qf, T::values(&k_half[off..off + row_len], dim, row)) * scale;
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
                vector::axpy(
                    p / sum,
                    T::values(&v_half[off..off + row_len], dim, row),
                    acc,
                );
            }
            Q::narrow_into(acc, out);
        },
    );
    out
}
