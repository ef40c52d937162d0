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
use super::runs::{self, AttendScratch, BlockKernel, HeadsView, Kernel, Prepared};
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
    let (one, block): (Kernel<T>, BlockKernel<T>) = match shape.head_dim {
        16 => (attend_heads::<1, T>, attend_block::<1, T>),
        32 => (attend_heads::<2, T>, attend_block::<2, T>),
        64 => (attend_heads::<4, T>, attend_block::<4, T>),
        128 => (attend_heads::<8, T>, attend_block::<8, T>),
        256 => (attend_heads::<16, T>, attend_block::<16, T>),
        _ => return None,
    };
    let kernels = runs::Kernels {
        one,
        block: Some(block),
    };
    // SAFETY: `_cpu` proves the CPU has the kernels' features.
    Some(unsafe { runs::attend(kernels, step, shape, q, k, v, scale) })
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
    // Every element read below is written first in this call: scores by whole groups of
    // 16, `parts` (16 vectors per head) for each position of the group.
    let Prepared {
        scores,
        offsets,
        parts,
        inv,
        padded,
    } = scratch.prepare(at, ctx, 1, 16, heads * 16 * 16);
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

/// [`attend_heads`] for a block of new tokens of one sequence at once (a prefill chunk's
/// queries): `ctxs` holds each token's context, `q` and `out` each token's run of heads in
/// turn. The walk goes head by head: a group of 16 positions' keys is widened once into
/// `parts` and every query's 16 products are summed in registers; the value sums of up to 4
/// queries stay in registers over the whole context, each value row widened once for them.
///
/// Every query's arithmetic is `attend_heads`'s, operation for operation: the same products
/// and lane sums (a lane sum of 16 positions takes each position's vector alone, and a
/// query's rows past its context are zero, as there), the same softmax over its own context,
/// the same value sums in position order from zero, then the same scaling. So a token's
/// result is the same bits in any block, or alone.
///
/// # Safety
/// As `attend_heads`, for every query: `q` and `out` hold `ctxs.len() * at.heads * 16 * CH`
/// values, and `at.table` covers the largest context.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
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
    let dim = LANES * CH;
    let heads = at.heads;
    let run = heads * dim;
    let row = T::row_len(dim);
    let nq = ctxs.len();
    assert!(
        nq > 0 && q.len() == nq * run && out.len() == nq * run,
        "a block's queries and outputs hold each token's run of heads"
    );
    let ctx_max = ctxs.iter().copied().max().unwrap_or(0);
    // Every score read below is written first in this call (a query's groups up to its own
    // context), and `parts` (16 widened key rows) for each position of a group before it is
    // read.
    let Prepared {
        scores,
        offsets,
        parts,
        inv,
        padded,
    } = scratch.prepare(at, ctx_max, nq, 16, 16 * dim);
    let scale_v = _mm512_set1_ps(scale);
    let kp = parts.as_mut_ptr();
    for (g, group) in offsets.chunks(16).enumerate() {
        // The next group's slots, while this one's are widened head by head.
        for s in 0..16 {
            runs::prefetch_at(k, offsets, 16 * (g + 1) + s, heads * row);
        }
        for h in 0..heads {
            // The group's keys of head `h`, widened: position `s` at `parts[s * dim..]`.
            let mut kscale = [1.0f32; 16];
            for (s, &off) in group.iter().enumerate() {
                // SAFETY: `off + heads * row` is within `k` (the caller's promise), `h <
                // heads`; `parts` holds 16 rows of `dim`, `s < 16`.
                unsafe {
                    let kh = k.as_ptr().add(off + h * row);
                    for j in 0..CH {
                        _mm512_storeu_ps(kp.add(s * dim + 16 * j), T::load16(kh.add(16 * j)));
                    }
                    if T::SCALED {
                        kscale[s] = T::scale(kh, dim);
                    }
                }
            }
            for (i, &ctx) in ctxs.iter().enumerate() {
                let valid = ctx.saturating_sub(16 * g).min(group.len());
                if valid == 0 {
                    continue;
                }
                // SAFETY: `q` holds `nq` runs of `heads * dim`, `i < nq`, `h < heads`; the
                // first `valid` rows of `parts` were written above; `scores` is sized above
                // and group `g` ends at or before `padded`.
                unsafe {
                    let qh = q.as_ptr().add(i * run + h * dim);
                    let mut qv = [_mm512_setzero_ps(); CH];
                    for (j, qj) in qv.iter_mut().enumerate() {
                        *qj = _mm512_loadu_ps(qh.add(16 * j));
                    }
                    let dot = |s: usize| {
                        let ks = kp.add(s * dim);
                        let mut a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(ks));
                        for (j, &qj) in qv.iter().enumerate().skip(1) {
                            a = _mm512_fmadd_ps(qj, _mm512_loadu_ps(ks.add(16 * j)), a);
                        }
                        if T::SCALED {
                            a = _mm512_mul_ps(a, _mm512_set1_ps(kscale[s]));
                        }
                        a
                    };
                    // Written out position by position, so that `rows` stays in registers
                    // (a loop over a runtime bound left it on the stack for int8 rows).
                    let mut rows = [_mm512_setzero_ps(); 16];
                    macro_rules! rows {
                        ($($s:literal)*) => {$(
                            if $s < valid {
                                rows[$s] = dot($s);
                            }
                        )*};
                    }
                    rows!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
                    let sums = _mm512_mul_ps(sum_lanes16(rows), scale_v);
                    let at = (i * heads + h) * padded + 16 * g;
                    _mm512_storeu_ps(scores.as_mut_ptr().add(at), sums);
                }
            }
        }
    }
    // Softmax per query and head, as `attend_heads`; `inv` holds the reciprocal sums.
    for (i, &ctx) in ctxs.iter().enumerate() {
        for h in 0..heads {
            // SAFETY: this query's head's row of `scores` is `padded >= ctx` long.
            inv[i * heads + h] =
                unsafe { softmax(scores.as_mut_ptr().add((i * heads + h) * padded), ctx) };
        }
    }
    // Value sums, as many queries at a time as keep their sums and a value row in registers.
    let values = ValuePass {
        v,
        offsets,
        scores,
        inv,
        ctxs,
        heads,
        padded,
        row,
    };
    // The queries whose sums (`CH` registers each) fit in registers next to a value row.
    for h in 0..heads {
        // SAFETY: the caller's promise on `v`'s offsets and `out`'s length; `h < heads`.
        unsafe {
            match CH {
                1 | 2 | 4 => values.head::<CH, 4>(h, out),
                8 => values.head::<CH, 2>(h, out),
                _ => values.head::<CH, 1>(h, out),
            }
        }
    }
}

/// What `attend_block`'s value pass reads: the softmax weights and reciprocal sums of every
/// query and head, and the cache's values.
struct ValuePass<'a, T> {
    v: &'a [T],
    offsets: &'a [usize],
    scores: &'a [f32],
    inv: &'a [f32],
    ctxs: &'a [usize],
    heads: usize,
    padded: usize,
    row: usize,
}

impl<T: KvElem> ValuePass<'_, T> {
    /// Head `h`'s outputs of every query, `QS` queries at a time ([`Self::sums`]).
    ///
    /// # Safety
    /// As [`Self::sums`], for `h < heads`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn head<const CH: usize, const QS: usize>(&self, h: usize, out: &mut [f32]) {
        for first in (0..self.ctxs.len()).step_by(QS) {
            // SAFETY: the caller's promise; `first < ctxs.len()`.
            unsafe { self.sums::<CH, QS>(h, first, out) };
        }
    }

    /// Head `h`'s outputs of queries `first..first + QS` (fewer at the end): each value row
    /// widened once and added into every query's sums whose context reaches it, in
    /// position order from zero, then scaled by the query's reciprocal sum into `out`.
    ///
    /// # Safety
    /// As `attend_block` (AVX-512F/BW/VL, F16C and FMA; every offset plus `heads` rows within
    /// `v`; `out` holding every query's run); `h < heads`, `first < ctxs.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
    unsafe fn sums<const CH: usize, const QS: usize>(
        &self,
        h: usize,
        first: usize,
        out: &mut [f32],
    ) {
        let dim = LANES * CH;
        let run = self.heads * dim;
        let ctxs = &self.ctxs[first..(first + QS).min(self.ctxs.len())];
        let lo = ctxs.iter().copied().min().unwrap_or(0);
        let hi = ctxs.iter().copied().max().unwrap_or(0);
        let mut acc = [[_mm512_setzero_ps(); CH]; QS];
        let head_v = &self.v[h * self.row..];
        let weight =
            |u: usize, p: usize| self.scores[((first + u) * self.heads + h) * self.padded + p];
        for p in 0..hi {
            runs::prefetch_ahead(head_v, self.offsets, p, self.row);
            // SAFETY: `offsets[p] + heads * row` is within `v` (the caller's promise), so head
            // `h`'s row is too.
            unsafe {
                let vh = head_v.as_ptr().add(self.offsets[p]);
                let mut vv = [_mm512_setzero_ps(); CH];
                for (j, vj) in vv.iter_mut().enumerate() {
                    *vj = T::load16(vh.add(16 * j));
                }
                let vs = if T::SCALED { T::scale(vh, dim) } else { 1.0 };
                for (u, a) in acc.iter_mut().enumerate().take(ctxs.len()) {
                    if p >= lo && p >= ctxs[u] {
                        continue;
                    }
                    let mut w = weight(u, p);
                    if T::SCALED {
                        w *= vs;
                    }
                    let w = _mm512_set1_ps(w);
                    for (aj, &vj) in a.iter_mut().zip(&vv) {
                        *aj = _mm512_fmadd_ps(w, vj, *aj);
                    }
                }
            }
        }
        for (u, a) in acc.iter().enumerate().take(ctxs.len()) {
            let i = first + u;
            let iv = _mm512_set1_ps(self.inv[i * self.heads + h]);
            let o = &mut out[i * run + h * dim..i * run + (h + 1) * dim];
            for (j, &aj) in a.iter().enumerate() {
                // SAFETY: `o` holds `dim = 16 * CH` values, `j < CH`.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * j), _mm512_mul_ps(aj, iv)) };
            }
        }
    }
}

/// Softmax in place over the `ctx` scores at `row` (the exponentials, unnormalised; lanes
/// past `ctx` in the last group are masked out of the max and the sum), returning the
/// reciprocal of their sum.
///
/// # Safety
/// The CPU has AVX-512F; `row` points at `ctx.next_multiple_of(16)` writable scores.
#[inline(always)]
unsafe fn softmax(row: *mut f32, ctx: usize) -> f32 {
    // SAFETY: 16 lanes at `row + i` for `i < ctx` in steps of 16 stay below
    // `ctx.next_multiple_of(16)` (the caller's promise).
    unsafe {
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
        1.0 / _mm512_reduce_add_ps(sumv)
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
