//! The CPU attention kernels' common driver: each new token's heads are cut into runs, the
//! runs handed out on candle's thread pool, and each run computed by one instruction set's
//! kernel (`avx512.rs`, `avx2.rs`) that reads the paged cache through a [`HeadsView`].
//!
//! How heads are grouped into runs depends on the batch (small batches get more, shorter
//! runs, to keep every thread busy); the kernels compute each head the same way in any run,
//! so the grouping never changes a result.

use super::kv_elem::KvElem;
use crate::cpu::{Elem, SharedOut};
use crate::paged::{CacheShape, StepLayout};

/// One run of heads of one token against its context: `(q, k, v, ctx, at, scale, scratch,
/// out)`, `q` and `out` holding the run's heads in f32. The safety contract is each kernel's:
/// its CPU features, and `at` covering `ctx` positions inside `k` and `v` (rows of
/// `T::row_len(head_dim)` elements).
pub(super) type Kernel<T> =
    unsafe fn(&[f32], &[T], &[T], usize, &HeadsView<'_>, f32, &mut AttendScratch, &mut [f32]);

/// Attention of every new token of `step` over its own sequence on `kernel`: `q` is
/// `(tokens, heads, head_dim)` in the activations' type `Q` (the output's too); `k` and `v`
/// are the two halves of a cache whose geometry is `shape`, as returned by
/// `step.check_cache` (panics if their lengths or rows disagree with it), in the cache's type
/// `T`.
///
/// # Safety
/// The CPU has `kernel`'s target features (its caller holds the token that proves them).
pub(super) unsafe fn attend<T: KvElem, Q: Elem>(
    kernel: Kernel<T>,
    step: &StepLayout,
    shape: CacheShape,
    q: &[Q],
    k: &[T],
    v: &[T],
    scale: f32,
) -> Vec<Q> {
    let (heads, dim, width, row) = (shape.heads, shape.head_dim, shape.width(), shape.row);
    let tokens = step.num_tokens();
    assert!(
        k.len() == shape.half_len()
            && v.len() == shape.half_len()
            && q.len() == tokens * width
            && row == T::row_len(dim),
        "paged attention: buffers do not match the checked cache shape"
    );
    let pool = candle_core::utils::barrier_pool();
    // Work items are runs of heads of one token: all heads when there are tokens enough to
    // keep every thread busy, fewer (more items) for small batches.
    let runs = ((pool.n_workers() + 1) * 4)
        .div_ceil(tokens.max(1))
        .clamp(1, heads);
    let per_run = heads.div_ceil(runs);
    let runs = heads.div_ceil(per_run);
    let mut out = vec![Q::narrow(0.0); tokens * width];
    let shared = SharedOut::new(&mut out);
    pool.execute_chunked(tokens * runs, |range| {
        let mut scratch = AttendScratch::default();
        let (mut qbuf, mut res) = (vec![0f32; per_run * dim], vec![0f32; per_run * dim]);
        for i in range {
            let (t, r) = (i / runs, i % runs);
            let (h0, h1) = (r * per_run, ((r + 1) * per_run).min(heads));
            let len = (h1 - h0) * dim;
            let start = t * width + h0 * dim;
            let qf = Q::as_f32(&q[start..start + len], &mut qbuf);
            let at = HeadsView {
                table: step.table_of(t),
                block_size: shape.block_size,
                slot_len: shape.slot_len(),
                first: h0 * row,
                heads: h1 - h0,
            };
            let ctx = step.context_of(t);
            // The kernel's bounds: `q` and `res` hold the run's heads; every slot of the
            // table is below `shape.slots()` (block ids checked by `StepLayout::new`, the
            // geometry by `check_cache`), so every offset plus the run's rows is inside `k`
            // and `v` (`first + heads * row <= slot_len`); the table covers `ctx` positions.
            assert!(qf.len() == len && at.first + (h1 - h0) * row <= at.slot_len);
            assert!(at.table.len() * at.block_size >= ctx);
            // SAFETY: the bounds above, and the CPU has the kernel's features (the caller's
            // promise).
            unsafe { kernel(qf, k, v, ctx, &at, scale, &mut scratch, &mut res[..len]) };
            // SAFETY: item `i` is handed to exactly one call (the pool's cursor), and it owns
            // `out[start..start + len]`: token `t`, heads `h0..h1`.
            let dst = unsafe { shared.slice(start..start + len) };
            Q::narrow_into(&res[..len], dst);
        }
    });
    out
}

/// Positions ahead of the one being read whose run of heads `prefetch_ahead` asks for. A run
/// of fewer heads than a slot holds (small batches cut each token's heads into runs, see
/// `attend`) reads a piece of every slot, a slot's width apart: a stride the hardware
/// prefetchers did not follow on the AVX2 VM (2026-12-03), where one head's walk over 1,024
/// positions ran at ~6 GB/s without it and at 13-19 GB/s with it; 4 to 32 ahead measured the
/// same there.
pub(super) const PREFETCH_AHEAD: usize = 8;

/// Asks the cache hierarchy for the run of `len` elements of `half` at position `p +
/// PREFETCH_AHEAD` (through `offsets`, the kernel's offset of each position), if the context
/// goes that far: one prefetch per 64-byte line. A hint: it never faults and changes no
/// result, and the address is only computed with wrapping arithmetic, never dereferenced.
#[inline(always)]
pub(super) fn prefetch_ahead<T>(half: &[T], offsets: &[usize], p: usize, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    const LINE: usize = 64;
    let Some(&ahead) = offsets.get(p + PREFETCH_AHEAD) else {
        return;
    };
    if len == 0 {
        return;
    }
    let start = half.as_ptr().wrapping_add(ahead) as *const u8;
    let first = start as usize / LINE;
    let last = (start as usize + len * std::mem::size_of::<T>() - 1) / LINE;
    for line in 0..=last - first {
        // SAFETY: a prefetch reads nothing the program sees and cannot fault, whatever the
        // address; SSE, which it needs, is part of x86_64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line * LINE) as *const i8) };
    }
}

/// Where a run of heads of one sequence lives in a paged cache half.
pub(super) struct HeadsView<'a> {
    /// The sequence's block table.
    pub table: &'a [u32],
    pub block_size: usize,
    /// Elements per cache slot: heads * row length.
    pub slot_len: usize,
    /// The first head's row's first element within a slot.
    pub first: usize,
    /// Heads in the run.
    pub heads: usize,
}

impl HeadsView<'_> {
    /// Element offsets of positions `0..ctx`, walking the block table (no divisions).
    pub(super) fn offsets(&self, ctx: usize, into: &mut Vec<usize>) {
        into.clear();
        for &block in self.table {
            let first = block as usize * self.block_size;
            let take = self.block_size.min(ctx - into.len());
            into.extend((first..first + take).map(|slot| slot * self.slot_len + self.first));
            if into.len() == ctx {
                break;
            }
        }
    }
}

/// Scratch space reused across one thread's calls of a kernel.
#[derive(Default)]
pub(super) struct AttendScratch {
    /// Per head, the scores (then probabilities) of every position, padded to the kernel's
    /// group of positions (16 on AVX-512, 8 on AVX2).
    pub scores: Vec<f32>,
    /// Per position, its offset in the cache.
    pub offsets: Vec<usize>,
    /// Per head and position in a group, a query-key product before its lane sum.
    pub parts: Vec<f32>,
    /// Per head, the reciprocal of its softmax sum.
    pub inv: Vec<f32>,
}
