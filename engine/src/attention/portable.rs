//! The portable CPU paths of the paged ops: plain, bounds-checked Rust over slices (rayon for
//! attention's heads, the vector helpers for dot products). They run wherever the AVX-512
//! kernel does not (other CPUs, head sizes it has no instance for, `GPTJ_CPU_KERNELS=candle`)
//! and are what Miri checks.

use rayon::prelude::*;

use crate::cpu::{vector, Elem};
use crate::paged::{CacheShape, StepLayout};

/// Writes the step's new keys and values (`(tokens, heads, head_dim)` each, in the
/// activations' type `X`) into their slots of `cache`, a layer's cache of geometry `shape`,
/// each token's row through `store` ([`copy_row`] where the types are the same,
/// [`round_row`] where the cache is narrower or wider).
pub(crate) fn write_kv<C, X>(
    step: &StepLayout,
    shape: CacheShape,
    cache: &mut [C],
    k: &[X],
    v: &[X],
    store: fn(&[X], &mut [C], &mut [f32]),
) {
    let width = shape.width();
    let (k_half, v_half) = cache.split_at_mut(shape.half_len());
    let mut wide = vec![0f32; width];
    for (t, &slot) in step.slots().iter().enumerate() {
        let dst = slot as usize * width..(slot as usize + 1) * width;
        let src = t * width..(t + 1) * width;
        store(&k[src.clone()], &mut k_half[dst.clone()], &mut wide);
        store(&v[src], &mut v_half[dst], &mut wide);
    }
}

/// A row stored as it is (cache and activations of one type).
pub(crate) fn copy_row<T: Copy>(src: &[T], dst: &mut [T], _wide: &mut [f32]) {
    dst.copy_from_slice(src);
}

/// A row rounded to the cache's type through f32 (`wide`, at least as long).
pub(crate) fn round_row<X: Elem, C: Elem>(src: &[X], dst: &mut [C], wide: &mut [f32]) {
    C::narrow_into(X::as_f32(src, wide), dst);
}

/// Attention of every new token of `step` (`q`: `(tokens, heads, head_dim)`) over positions
/// `0..=its position` of its own sequence, read from the K and V halves of a cache of
/// geometry `shape`. Scores and softmax in f32; queries and output in the activations' type
/// `Q`, the cache in its own `T`.
pub(crate) fn attend<T: Elem, Q: Elem>(
    step: &StepLayout,
    shape: CacheShape,
    q: &[Q],
    k_half: &[T],
    v_half: &[T],
    scale: f32,
) -> Vec<Q> {
    let (heads, dim, width, block_size) =
        (shape.heads, shape.head_dim, shape.width(), shape.block_size);
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
                slot * width + h * dim
            };
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for pos in 0..ctx {
                let off = offset_of(pos);
                let s = vector::dot(qf, T::as_f32(&k_half[off..off + dim], row)) * scale;
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
                vector::axpy(p / sum, T::as_f32(&v_half[off..off + dim], row), acc);
            }
            Q::narrow_into(acc, out);
        },
    );
    out
}
