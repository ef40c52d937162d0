//! Paged attention with AVX-512: the kernel for one run of heads of one token (`runs.rs`
//! hands out the runs on candle's thread pool), walking the cache slot by slot (each slot
//! holds every head side by side) so reads are sequential, summing 16 query-key products
//! across lanes at once with a transposing shuffle tree, softmax with the vector exp.
//!
//! The kernel reads the cache through offsets without bounds checks. They stay inside it
//! because the caller hands over a [`CacheShape`] from [`StepLayout::check_cache`] for the very
//! cache halves it passes (see `paged.rs`), and `attend` checks the halves' lengths against it.

use std::arch::x86_64::*;

use super::kv_elem::KvElem;
use super::runs::{self, AttendScratch, HeadsView, Kernel};
use crate::cpu::avx512::exp16;
use crate::cpu::{Avx512, Elem, LANES};
use crate::paged::{CacheShape, StepLayout};

/// Attention of every new token of `step` over its own sequence, `None` for head sizes the
/// kernel has no instance for (the caller then takes the portable path).
///
/// `q` is `(tokens, heads, head_dim)` in the activations' type `Q` (the output's too); `k`
/// and `v` are the two halves of a cache whose geometry is `shape`, as returned by
/// `step.check_cache` (panics if their lengths disagree with it), in the cache's type `T`.
pub(crate) fn attend<T: KvElem, Q: Elem>(
    _cpu: Avx512,
    step: &StepLayout,
    shape: CacheShape,
    q: &[Q],
    k: &[T],
    v: &[T],
    scale: f32,
) -> Option<Vec<Q>> {
    let kernel: Kernel<T> = match shape.head_dim {
        16 => attend_heads::<1, T>,
        32 => attend_heads::<2, T>,
        64 => attend_heads::<4, T>,
        128 => attend_heads::<8, T>,
        256 => attend_heads::<16, T>,
        _ => return None,
    };
    // SAFETY: `_cpu` proves the CPU has the kernel's features.
    Some(unsafe { runs::attend(kernel, step, shape, q, k, v, scale) })
}

/// Sums each of 16 vectors across its lanes, returning the 16 sums in order: a transposing
/// tree of shuffles and adds (about 3 instructions per vector instead of 8).
///
/// # Safety
/// The CPU has AVX-512F (the caller is `attend_heads`).
#[inline(always)]
unsafe fn sum_lanes16(a: [__m512; 16]) -> __m512 {
    // SAFETY: register-only intrinsics; the caller has AVX-512F.
    unsafe {
        // Pairs of vectors: 256-bit halves added, the two results side by side.
        let mut v = [_mm512_setzero_ps(); 8];
        for (i, vi) in v.iter_mut().enumerate() {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            *vi = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(x, y),
                _mm512_shuffle_f32x4::<0xEE>(x, y),
            );
        }
        // Each 128-bit chunk now one vector's four partial sums.
        let mut w = [_mm512_setzero_ps(); 4];
        for (i, wi) in w.iter_mut().enumerate() {
            let (x, y) = (v[2 * i], v[2 * i + 1]);
            *wi = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            );
        }
        // Within chunks: two partial sums per vector, then one.
        let mut x = [_mm512_setzero_ps(); 2];
        for (i, xi) in x.iter_mut().enumerate() {
            let (p, q) = (w[2 * i], w[2 * i + 1]);
            *xi = _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(p, q),
                _mm512_shuffle_ps::<0xEE>(p, q),
            );
        }
        let e = _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(x[0], x[1]),
            _mm512_shuffle_ps::<0xDD>(x[0], x[1]),
        );
        // Lane 4c + k holds vector c + 4k: transpose back.
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, e)
    }
}

/// A run of query heads of one token against its context: per head, `out = softmax(scale *
/// q . k_p) . v_p` over positions `p < ctx`, read through `at` (the paged cache). Scores,
/// max and softmax are f32; `CH` is the head size in 16s.
///
/// A cache slot holds every head of a position side by side, so the loops go position by
/// position and, inside, head by head: the cache is read front to back, as the hardware
/// prefetchers like, instead of in head-sized pieces a slot apart. Query-key products are
/// summed across lanes 16 positions at a time (`sum_lanes16`). Each head's arithmetic is
/// the same whatever run it is computed in, so how heads are grouped (which depends on the
/// batch) never changes a result.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL, F16C and FMA (an [`Avx512`] token is in hand); `q` and `out`
/// hold `at.heads * 16 * CH` values; `at.table` covers `ctx` positions, and every position's
/// offset (from `at`) plus `at.heads` rows of `T::row_len(16 * CH)` elements is within `k` and
/// `v`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_heads<const CH: usize, T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    ctx: usize,
    at: &HeadsView<'_>,
    scale: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    let dim = LANES * CH;
    let heads = at.heads;
    // A head's row in the cache: its values, then (int8) its scale.
    let row = T::row_len(dim);
    let AttendScratch {
        scores,
        offsets,
        parts,
        inv,
    } = scratch;
    at.offsets(ctx, offsets);
    assert_eq!(offsets.len(), ctx, "block table too short for the context");
    let padded = ctx.next_multiple_of(16);
    // Scratch only grows: every element read below is written first in this call (scores
    // by whole groups of 16, parts for each position of the group), so nothing is zeroed.
    if scores.len() < heads * padded {
        scores.resize(heads * padded, 0.0);
    }
    if parts.len() < heads * 16 * 16 {
        parts.resize(heads * 16 * 16, 0.0);
    }
    inv.resize(heads, 0.0);
    let scale_v = _mm512_set1_ps(scale);
    for (g, group) in offsets.chunks(16).enumerate() {
        for (s, &off) in group.iter().enumerate() {
            runs::prefetch_ahead(k, offsets, g * 16 + s, heads * row);
            // SAFETY: `off + heads * row` is within `k` (the caller's promise); `parts` holds
            // `heads * 16` vectors, `s < 16`.
            unsafe {
                let kp = k.as_ptr().add(off);
                for h in 0..heads {
                    let (qh, kh) = (q.as_ptr().add(h * dim), kp.add(h * row));
                    let mut a = _mm512_mul_ps(_mm512_loadu_ps(qh), T::load16(kh));
                    for j in 1..CH {
                        a = _mm512_fmadd_ps(
                            _mm512_loadu_ps(qh.add(16 * j)),
                            T::load16(kh.add(16 * j)),
                            a,
                        );
                    }
                    if T::SCALED {
                        a = _mm512_mul_ps(a, _mm512_set1_ps(T::scale(kh, dim)));
                    }
                    _mm512_storeu_ps(parts.as_mut_ptr().add((h * 16 + s) * 16), a);
                }
            }
        }
        for h in 0..heads {
            // SAFETY: `parts` and `scores` are sized above: `h < heads`, `s < 16`, and group
            // `g` ends at or before `padded`.
            unsafe {
                let mut rows = [_mm512_setzero_ps(); 16];
                for (s, r) in rows.iter_mut().enumerate().take(group.len()) {
                    *r = _mm512_loadu_ps(parts.as_ptr().add((h * 16 + s) * 16));
                }
                let sums = _mm512_mul_ps(sum_lanes16(rows), scale_v);
                _mm512_storeu_ps(scores.as_mut_ptr().add(h * padded + 16 * g), sums);
            }
        }
    }
    // Softmax per head; `inv` holds each head's reciprocal sum until the value pass.
    for (h, inv_h) in inv.iter_mut().enumerate() {
        // SAFETY: head `h`'s row of `scores` is `padded >= ctx` long, read and written 16 at a
        // time from `i < ctx`, so up to `padded`.
        unsafe {
            let row = scores.as_mut_ptr().add(h * padded);
            let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < ctx {
                let mask = lanes(ctx - i);
                maxv = _mm512_mask_max_ps(maxv, mask, maxv, _mm512_loadu_ps(row.add(i)));
                i += 16;
            }
            let maxv = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
            let mut sumv = _mm512_setzero_ps();
            let mut i = 0;
            while i < ctx {
                let mask = lanes(ctx - i);
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row.add(i)), maxv));
                _mm512_storeu_ps(row.add(i), e);
                sumv = _mm512_mask_add_ps(sumv, mask, sumv, e);
                i += 16;
            }
            *inv_h = 1.0 / _mm512_reduce_add_ps(sumv);
        }
    }
    out.fill(0.0);
    let o = out.as_mut_ptr();
    for (p, &off) in offsets.iter().enumerate() {
        runs::prefetch_ahead(v, offsets, p, heads * row);
        // SAFETY: `off + heads * row` is within `v` and `out` holds `heads * dim` values (the
        // caller's promise); `h * padded + p < heads * padded`.
        unsafe {
            let vp = v.as_ptr().add(off);
            for h in 0..heads {
                let vh = vp.add(h * row);
                let mut w = *scores.get_unchecked(h * padded + p);
                if T::SCALED {
                    w *= T::scale(vh, dim);
                }
                let w = _mm512_set1_ps(w);
                for j in 0..CH {
                    let at = o.add(h * dim + 16 * j);
                    let acc = _mm512_fmadd_ps(w, T::load16(vh.add(16 * j)), _mm512_loadu_ps(at));
                    _mm512_storeu_ps(at, acc);
                }
            }
        }
    }
    for (h, &inv_h) in inv.iter().enumerate() {
        let iv = _mm512_set1_ps(inv_h);
        for j in 0..CH {
            // SAFETY: `out` holds `heads * dim` values.
            unsafe {
                let at = o.add(h * dim + 16 * j);
                _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), iv));
            }
        }
    }
}

/// A mask of the first `n` lanes (all 16 when `n >= 16`).
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}
