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
use super::runs::{self, AttendScratch, BlockKernel, HeadsView, Kernel, Prepared};
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
    let (one, block): (Kernel<T>, BlockKernel<T>) = match shape.head_dim {
        16 => (attend_heads::<2, T>, attend_block::<2, T>),
        32 => (attend_heads::<4, T>, attend_block::<4, T>),
        64 => (attend_heads::<8, T>, attend_block::<8, T>),
        128 => (attend_heads::<16, T>, attend_block::<16, T>),
        256 => (attend_heads::<32, T>, attend_block::<32, T>),
        _ => return None,
    };
    let kernels = runs::Kernels {
        one,
        block: Some(block),
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
    // Every element read below is written first in this call: scores by whole groups of
    // 8, `parts` (8 vectors per head) for each position of the group.
    let Prepared {
        scores,
        offsets,
        parts,
        inv,
        padded,
    } = scratch.prepare(at, ctx, 1, LANES8, heads * LANES8 * LANES8);
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
    // Softmax per head; `inv` holds each head's reciprocal sum until the value pass.
    for (h, inv_h) in inv.iter_mut().enumerate() {
        // SAFETY: head `h`'s row of `scores` is `padded >= ctx` long.
        *inv_h = unsafe { softmax(scores.as_mut_ptr().add(h * padded), ctx) };
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

/// Softmax in place over the `ctx` scores at `row` (the exponentials, unnormalised; lanes
/// past `ctx` in the last group are masked out of the max and the sum), returning the
/// reciprocal of their sum.
///
/// # Safety
/// The CPU has AVX2 and FMA; `row` points at `ctx.next_multiple_of(8)` writable scores.
#[inline(always)]
unsafe fn softmax(row: *mut f32, ctx: usize) -> f32 {
    // SAFETY: 8 lanes at `row + i` for `i < ctx` in steps of 8 stay below
    // `ctx.next_multiple_of(8)` (the caller's promise).
    unsafe {
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
        1.0 / _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }
}

/// [`attend_heads`] for a block of new tokens of one sequence at once, as the AVX-512
/// `attend_block` (see there) with 8-lane registers: per group of 8 positions and per head the
/// keys are widened once into `parts` and each query's 8 products summed in registers (the
/// query read from memory, 16 registers being few), and each query's value sums stay in
/// registers over its context. Every query's arithmetic is `attend_heads`'s, operation for
/// operation, so a token's result is the same bits in any block, or alone.
///
/// # Safety
/// As `attend_heads`, for every query: `q` and `out` hold `ctxs.len() * at.heads * 8 * CH`
/// values, and `at.table` covers the largest context.
#[target_feature(enable = "avx2,f16c,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_block<const CH: usize, T: KvElem>(
    q: &[f32],
    k: &[T],
    v: &[T],
    ctxs: &[usize],
    at: &HeadsView<'_>,
    scale: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    let dim = LANES8 * CH;
    let heads = at.heads;
    let run = heads * dim;
    let row = T::row_len(dim);
    let nq = ctxs.len();
    assert!(
        nq > 0 && q.len() == nq * run && out.len() == nq * run,
        "a block's queries and outputs hold each token's run of heads"
    );
    let ctx_max = ctxs.iter().copied().max().unwrap_or(0);
    // Every score read below is written first in this call, and `parts` (8 widened key
    // rows) for each position of a group before it is read.
    let Prepared {
        scores,
        offsets,
        parts,
        inv,
        padded,
    } = scratch.prepare(at, ctx_max, nq, LANES8, LANES8 * dim);
    let scale_v = _mm256_set1_ps(scale);
    let kp = parts.as_mut_ptr();
    for (g, group) in offsets.chunks(LANES8).enumerate() {
        // The next group's slots, while this one's are widened head by head.
        for s in 0..LANES8 {
            runs::prefetch_at(k, offsets, LANES8 * (g + 1) + s, heads * row);
        }
        for h in 0..heads {
            // The group's keys of head `h`, widened: position `s` at `parts[s * dim..]`.
            let mut kscale = [1.0f32; LANES8];
            for (s, &off) in group.iter().enumerate() {
                // SAFETY: `off + heads * row` is within `k` (the caller's promise), `h <
                // heads`; `parts` holds 8 rows of `dim`, `s < 8`.
                unsafe {
                    let kh = k.as_ptr().add(off + h * row);
                    for j in 0..CH {
                        let at = kp.add(s * dim + LANES8 * j);
                        _mm256_storeu_ps(at, T::load8(kh.add(LANES8 * j)));
                    }
                    if T::SCALED {
                        kscale[s] = T::scale(kh, dim);
                    }
                }
            }
            for (i, &ctx) in ctxs.iter().enumerate() {
                let valid = ctx.saturating_sub(LANES8 * g).min(group.len());
                if valid == 0 {
                    continue;
                }
                // SAFETY: `q` holds `nq` runs of `heads * dim`, `i < nq`, `h < heads`; the
                // first `valid` rows of `parts` were written above; `scores` is sized above
                // and group `g` ends at or before `padded`.
                unsafe {
                    let qh = q.as_ptr().add(i * run + h * dim);
                    let dot = |s: usize| {
                        let ks = kp.add(s * dim);
                        let mut a = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(ks));
                        for j in 1..CH {
                            a = _mm256_fmadd_ps(
                                _mm256_loadu_ps(qh.add(LANES8 * j)),
                                _mm256_loadu_ps(ks.add(LANES8 * j)),
                                a,
                            );
                        }
                        if T::SCALED {
                            a = _mm256_mul_ps(a, _mm256_set1_ps(kscale[s]));
                        }
                        a
                    };
                    // Written out position by position, so that `rows` stays in registers.
                    let mut rows = [_mm256_setzero_ps(); LANES8];
                    macro_rules! rows {
                        ($($s:literal)*) => {$(
                            if $s < valid {
                                rows[$s] = dot($s);
                            }
                        )*};
                    }
                    rows!(0 1 2 3 4 5 6 7);
                    let sums = _mm256_mul_ps(sum_lanes8(rows), scale_v);
                    let at = (i * heads + h) * padded + LANES8 * g;
                    _mm256_storeu_ps(scores.as_mut_ptr().add(at), sums);
                }
            }
        }
    }
    for (i, &ctx) in ctxs.iter().enumerate() {
        for h in 0..heads {
            // SAFETY: this query's head's row of `scores` is `padded >= ctx` long.
            inv[i * heads + h] =
                unsafe { softmax(scores.as_mut_ptr().add((i * heads + h) * padded), ctx) };
        }
    }
    // Value sums, one query's head at a time, in registers over its context.
    for h in 0..heads {
        let head_v = &v[h * row..];
        for (i, &ctx) in ctxs.iter().enumerate() {
            let mut acc = [_mm256_setzero_ps(); CH];
            for (p, &off) in offsets[..ctx].iter().enumerate() {
                runs::prefetch_ahead(head_v, offsets, p, row);
                // SAFETY: `off + heads * row` is within `v` (the caller's promise), so head
                // `h`'s row is too; `(i * heads + h) * padded + p < nq * heads * padded`.
                unsafe {
                    let vh = head_v.as_ptr().add(off);
                    let mut w = *scores.get_unchecked((i * heads + h) * padded + p);
                    if T::SCALED {
                        w *= T::scale(vh, dim);
                    }
                    let w = _mm256_set1_ps(w);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(w, T::load8(vh.add(LANES8 * j)), *a);
                    }
                }
            }
            let iv = _mm256_set1_ps(inv[i * heads + h]);
            let o = &mut out[i * run + h * dim..i * run + (h + 1) * dim];
            for (j, &a) in acc.iter().enumerate() {
                // SAFETY: `o` holds `dim = 8 * CH` values, `j < CH`.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(LANES8 * j), _mm256_mul_ps(a, iv)) };
            }
        }
    }
}
