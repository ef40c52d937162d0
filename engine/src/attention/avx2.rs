//! Paged attention with AVX2, for CPUs without AVX-512: the AVX-512 kernel's walk (slot by
//! slot through the cache, every head of a position side by side) on 256-bit registers,
//! summing 8 query-key products across lanes at once with a tree of horizontal adds, softmax
//! with the AVX2 vector exp. `runs.rs` hands out the runs of heads on candle's thread pool.
//!
//! The kernel reads the cache through offsets without bounds checks, under the same contract
//! as the AVX-512 one: the caller hands over a [`CacheShape`] from
//! [`StepLayout::check_cache`] for the very cache halves it passes, and `runs::attend` checks
//! the halves' lengths and each run's view against it.

use std::arch::x86_64::*;

use super::kv_elem::KvElem;
use super::runs::{self, AttendScratch, HeadsView, Kernel};
use crate::cpu::avx2::exp8;
use crate::cpu::{Avx2, Elem};
use crate::paged::{CacheShape, StepLayout};

/// f32 lanes in one 256-bit register, and so positions per group of scores.
const LANES8: usize = 8;

/// Attention of every new token of `step` over its own sequence, `None` for head sizes the
/// kernel has no instance for (the caller then takes the portable path). Arguments as
/// [`super::avx512::attend`]'s.
pub(crate) fn attend<T: KvElem, Q: Elem>(
    _cpu: Avx2,
    step: &StepLayout,
    shape: CacheShape,
    q: &[Q],
    k: &[T],
    v: &[T],
    scale: f32,
) -> Option<Vec<Q>> {
    let kernel: Kernel<T> = match shape.head_dim {
        16 => attend_heads::<2, T>,
        32 => attend_heads::<4, T>,
        64 => attend_heads::<8, T>,
        128 => attend_heads::<16, T>,
        256 => attend_heads::<32, T>,
        _ => return None,
    };
    let kernels = runs::Kernels {
        one: kernel,
        block: None,
    };
    // SAFETY: `_cpu` proves the CPU has the kernel's features.
    Some(unsafe { runs::attend(kernels, step, shape, q, k, v, scale) })
}

/// Sums each of 8 vectors across its lanes, returning the 8 sums in order: three rounds of
/// horizontal adds (pairs, quads within each 128-bit half), then the two halves added.
///
/// # Safety
/// The CPU has AVX (the caller is `attend_heads`).
#[inline(always)]
unsafe fn sum_lanes8(a: [__m256; 8]) -> __m256 {
    // SAFETY: register-only intrinsics; the caller has AVX.
    unsafe {
        let h01 = _mm256_hadd_ps(a[0], a[1]);
        let h23 = _mm256_hadd_ps(a[2], a[3]);
        let h45 = _mm256_hadd_ps(a[4], a[5]);
        let h67 = _mm256_hadd_ps(a[6], a[7]);
        // Per 128-bit half: vectors 0..4 (g0) and 4..8 (g1), each one half's four lanes.
        let g0 = _mm256_hadd_ps(h01, h23);
        let g1 = _mm256_hadd_ps(h45, h67);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(g0, g1),
            _mm256_permute2f128_ps::<0x31>(g0, g1),
        )
    }
}

/// Lanes below `n` (all 8 when `n >= 8`) set, as a float mask.
///
/// # Safety
/// The CPU has AVX2.
#[inline(always)]
unsafe fn lanes(n: usize) -> __m256 {
    // SAFETY: register-only intrinsics; the caller has AVX2.
    unsafe {
        let n = _mm256_set1_epi32(n.min(LANES8) as i32);
        let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, index))
    }
}

/// A run of query heads of one token against its context, as the AVX-512 `attend_heads`
/// (see there) with 8-lane registers: `CH` is the head size in 8s. Each head's arithmetic is
/// the same whatever run it is computed in.
///
/// # Safety
/// The CPU has AVX2, F16C and FMA (an [`Avx2`] token is in hand); `q` and `out` hold
/// `at.heads * 8 * CH` values; `at.table` covers `ctx` positions, and every position's offset
/// (from `at`) plus `at.heads` rows of `T::row_len(8 * CH)` elements is within `k` and `v`.
#[target_feature(enable = "avx2,f16c,fma")]
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
    let dim = LANES8 * CH;
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
    let padded = ctx.next_multiple_of(LANES8);
    // Scratch only grows: every element read below is written first in this call (scores
    // by whole groups of 8, parts for each position of the group), so nothing is zeroed.
    if scores.len() < heads * padded {
        scores.resize(heads * padded, 0.0);
    }
    if parts.len() < heads * LANES8 * LANES8 {
        parts.resize(heads * LANES8 * LANES8, 0.0);
    }
    inv.resize(heads, 0.0);
    let scale_v = _mm256_set1_ps(scale);
    for (g, group) in offsets.chunks(LANES8).enumerate() {
        for (s, &off) in group.iter().enumerate() {
            runs::prefetch_ahead(k, offsets, g * LANES8 + s, heads * row);
            // SAFETY: `off + heads * row` is within `k` (the caller's promise); `parts` holds
            // `heads * 8` vectors, `s < 8`.
            unsafe {
                let kp = k.as_ptr().add(off);
                for h in 0..heads {
                    let (qh, kh) = (q.as_ptr().add(h * dim), kp.add(h * row));
                    let mut a = _mm256_mul_ps(_mm256_loadu_ps(qh), T::load8(kh));
                    for j in 1..CH {
                        a = _mm256_fmadd_ps(
                            _mm256_loadu_ps(qh.add(LANES8 * j)),
                            T::load8(kh.add(LANES8 * j)),
                            a,
                        );
                    }
                    if T::SCALED {
                        a = _mm256_mul_ps(a, _mm256_set1_ps(T::scale(kh, dim)));
                    }
                    _mm256_storeu_ps(parts.as_mut_ptr().add((h * LANES8 + s) * LANES8), a);
                }
            }
        }
        for h in 0..heads {
            // SAFETY: `parts` and `scores` are sized above: `h < heads`, `s < 8`, and group
            // `g` ends at or before `padded`.
            unsafe {
                let mut rows = [_mm256_setzero_ps(); LANES8];
                for (s, r) in rows.iter_mut().enumerate().take(group.len()) {
                    *r = _mm256_loadu_ps(parts.as_ptr().add((h * LANES8 + s) * LANES8));
                }
                let sums = _mm256_mul_ps(sum_lanes8(rows), scale_v);
                _mm256_storeu_ps(scores.as_mut_ptr().add(h * padded + LANES8 * g), sums);
            }
        }
    }
    // Softmax per head; `inv` holds each head's reciprocal sum until the value pass. Lanes
    // past `ctx` in the last group are masked out of the max and the sum.
    for (h, inv_h) in inv.iter_mut().enumerate() {
        // SAFETY: head `h`'s row of `scores` is `padded >= ctx` long, read and written 8 at a
        // time from `i < ctx`, so up to `padded`.
        unsafe {
            let row = scores.as_mut_ptr().add(h * padded);
            let low = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut maxv = low;
            let mut i = 0;
            while i < ctx {
                let s = _mm256_blendv_ps(low, _mm256_loadu_ps(row.add(i)), lanes(ctx - i));
                maxv = _mm256_max_ps(maxv, s);
                i += LANES8;
            }
            let m = _mm_max_ps(
                _mm256_castps256_ps128(maxv),
                _mm256_extractf128_ps::<1>(maxv),
            );
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let maxv = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m))));
            let mut sumv = _mm256_setzero_ps();
            let mut i = 0;
            while i < ctx {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row.add(i)), maxv));
                _mm256_storeu_ps(row.add(i), e);
                sumv = _mm256_add_ps(sumv, _mm256_and_ps(e, lanes(ctx - i)));
                i += LANES8;
            }
            let s = _mm_add_ps(
                _mm256_castps256_ps128(sumv),
                _mm256_extractf128_ps::<1>(sumv),
            );
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            *inv_h = 1.0 / _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)));
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
                let w = _mm256_set1_ps(w);
                for j in 0..CH {
                    let at = o.add(h * dim + LANES8 * j);
                    let acc = _mm256_fmadd_ps(w, T::load8(vh.add(LANES8 * j)), _mm256_loadu_ps(at));
                    _mm256_storeu_ps(at, acc);
                }
            }
        }
    }
    for (h, &inv_h) in inv.iter().enumerate() {
        let iv = _mm256_set1_ps(inv_h);
        for j in 0..CH {
            // SAFETY: `out` holds `heads * dim` values.
            unsafe {
                let at = o.add(h * dim + LANES8 * j);
                _mm256_storeu_ps(at, _mm256_mul_ps(_mm256_loadu_ps(at), iv));
            }
        }
    }
}
