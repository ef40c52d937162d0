//! The CPU attention kernels' common driver: each new token's heads are cut into runs, the
//! runs handed out on candle's thread pool, and each run computed by one instruction set's
//! kernel (`avx512.rs`, `avx2.rs`) that reads the paged cache through a [`HeadsView`].
//!
//! How heads are grouped into runs depends on the batch (small batches get more, shorter
//! runs, to keep every thread busy); the kernels compute each head the same way in any run,
//! so the grouping never changes a result.
//!
//! A kernel may also take a block of consecutive new tokens of one sequence at once (a
//! prefill chunk's queries, which read the same cache positions): it then reads each
//! position's keys and values once for the whole block instead of once per token. It
//! computes each query exactly as the one-token kernel does, so a token's result does not
//! depend on the block it falls in either.

use super::kv_elem::KvElem;
use crate::cpu::{Elem, SharedOut};
use crate::paged::{CacheShape, StepLayout};

/// One run of heads of one token against its context: `(q, k, v, ctx, at, scale, scratch,
/// out)`, `q` and `out` holding the run's heads in f32. The safety contract is each kernel's:
/// its CPU features, and `at` covering `ctx` positions inside `k` and `v` (rows of
/// `T::row_len(head_dim)` elements).
pub(super) type Kernel<T> =
    unsafe fn(&[f32], &[T], &[T], usize, &HeadsView<'_>, f32, &mut AttendScratch, &mut [f32]);

/// One run of heads of a block of new tokens of one sequence: as [`Kernel`], with `q` and
/// `out` holding the run's heads of each token in turn and the slice of contexts one per
/// token, each covered by `at`.
pub(super) type BlockKernel<T> =
    unsafe fn(&[f32], &[T], &[T], &[usize], &HeadsView<'_>, f32, &mut AttendScratch, &mut [f32]);

/// An instruction set's kernels: one token's, and (where it has one) a block's.
pub(super) struct Kernels<T> {
    pub one: Kernel<T>,
    pub block: Option<BlockKernel<T>>,
}

/// Most new tokens of one sequence a [`BlockKernel`] takes at once. Its scratch grows with
/// it (scores for every token of the block), so the block stays small enough for L2.
pub(super) const QUERY_BLOCK: usize = 8;

/// Attention of every new token of `step` over its own sequence on `kernels`: the block
/// kernel, where there is one, for blocks of consecutive tokens of one sequence: `q` is
/// `(tokens, heads, head_dim)` in the activations' type `Q` (the output's too); `k` and `v`
/// are the two halves of a cache whose geometry is `shape`, as returned by
/// `step.check_cache` (panics if their lengths or rows disagree with it), in the cache's type
/// `T`.
///
/// # Safety
/// The CPU has the kernels' target features (its caller holds the token that
/// proves them).
pub(super) unsafe fn attend<T: KvElem, Q: Elem>(
    kernels: Kernels<T>,
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
    let Kernels { one, block } = kernels;
    let most = if block.is_some() { QUERY_BLOCK } else { 1 };
    let blocks = query_blocks(step, most);
    let pool = candle_core::utils::barrier_pool();
    // Work items are runs of heads of one block of tokens: all heads when there are blocks
    // enough to keep every thread busy, fewer (more items) for small batches.
    let runs = ((pool.n_workers() + 1) * 4)
        .div_ceil(blocks.len().max(1))
        .clamp(1, heads);
    let per_run = heads.div_ceil(runs);
    let runs = heads.div_ceil(per_run);
    let mut out = vec![Q::narrow(0.0); tokens * width];
    let shared = SharedOut::new(&mut out);
    pool.execute_chunked(blocks.len() * runs, |range| {
        BUFFERS.with_borrow_mut(|buffers| {
            let RunBuffers {
                scratch,
                qbuf,
                qs,
                res,
            } = buffers;
            qbuf.resize(per_run * dim, 0.0);
            qs.resize(most * per_run * dim, 0.0);
            res.resize(most * per_run * dim, 0.0);
            for i in range {
                let ((t0, n), r) = (blocks[i / runs], i % runs);
                let (h0, h1) = (r * per_run, ((r + 1) * per_run).min(heads));
                let len = (h1 - h0) * dim;
                let start = |t: usize| t * width + h0 * dim;
                let at = HeadsView {
                    table: step.table_of(t0),
                    block_size: shape.block_size,
                    slot_len: shape.slot_len(),
                    first: h0 * row,
                    heads: h1 - h0,
                };
                let mut ctxs = [0usize; QUERY_BLOCK];
                for (j, c) in ctxs[..n].iter_mut().enumerate() {
                    *c = step.context_of(t0 + j);
                }
                let ctxs = &ctxs[..n];
                // The kernel's bounds: `q` and `res` hold the run's heads of each token; every
                // slot of the table is below `shape.slots()` (block ids checked by
                // `StepLayout::new`, the geometry by `check_cache`), so every offset plus the
                // run's rows is inside `k` and `v` (`first + heads * row <= slot_len`); the table
                // (the block's one row's) covers every token's context.
                assert!(at.first + (h1 - h0) * row <= at.slot_len);
                assert!(ctxs.iter().all(|&c| at.table.len() * at.block_size >= c));
                if n == 1 {
                    let qf = Q::as_f32(&q[start(t0)..start(t0) + len], qbuf);
                    assert!(qf.len() == len);
                    // SAFETY: the bounds above, and the CPU has the kernel's features (the
                    // caller's promise).
                    unsafe { one(qf, k, v, ctxs[0], &at, scale, scratch, &mut res[..len]) };
                } else {
                    for j in 0..n {
                        let t = t0 + j;
                        let qf = Q::as_f32(&q[start(t)..start(t) + len], qbuf);
                        qs[j * len..(j + 1) * len].copy_from_slice(qf);
                    }
                    let block = block.expect("blocks of several tokens only with a block kernel");
                    // SAFETY: as for one token, for each of the block's tokens.
                    unsafe {
                        block(
                            &qs[..n * len],
                            k,
                            v,
                            ctxs,
                            &at,
                            scale,
                            scratch,
                            &mut res[..n * len],
                        )
                    };
                }
                for j in 0..n {
                    let s = start(t0 + j);
                    // SAFETY: item `i` is handed to exactly one call (the pool's cursor), and it
                    // owns `out[s..s + len]` for each of its tokens: block `i / runs` (tokens
                    // `t0..t0 + n`), heads `h0..h1`.
                    let dst = unsafe { shared.slice(s..s + len) };
                    Q::narrow_into(&res[j * len..(j + 1) * len], dst);
                }
            }
        });
    });
    out
}

/// A pool thread's buffers for its runs, kept from step to step: the scratch of a block of
/// long contexts runs to hundreds of KiB, which `malloc` would map and the kernel zero
/// afresh on every layer's call. They only grow, up to what the longest context needs.
#[derive(Default)]
struct RunBuffers {
    scratch: AttendScratch,
    /// One token's run of queries widened to f32.
    qbuf: Vec<f32>,
    /// A block's queries, token after token, and its results.
    qs: Vec<f32>,
    res: Vec<f32>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<RunBuffers> = std::cell::RefCell::default();
}

/// The step's new tokens as blocks `(first token, count)` of up to `most` consecutive tokens
/// of one sequence, in order.
fn query_blocks(step: &StepLayout, most: usize) -> Vec<(usize, usize)> {
    let tokens = step.num_tokens();
    let mut blocks = Vec::with_capacity(tokens.div_ceil(most.max(1)));
    let mut t = 0;
    while t < tokens {
        let row = step.row_of(t);
        let mut n = 1;
        while n < most && t + n < tokens && step.row_of(t + n) == row {
            n += 1;
        }
        blocks.push((t, n));
        t += n;
    }
    blocks
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
/// goes that far: see [`prefetch_at`].
#[inline(always)]
pub(super) fn prefetch_ahead<T>(half: &[T], offsets: &[usize], p: usize, len: usize) {
    prefetch_at(half, offsets, p + PREFETCH_AHEAD, len);
}

/// Asks the cache hierarchy for the run of `len` elements of `half` at position `p`, if the
/// context goes that far: one prefetch per 64-byte line. A hint: it never faults and changes
/// no result, and the address is only computed with wrapping arithmetic, never dereferenced.
#[inline(always)]
pub(super) fn prefetch_at<T>(half: &[T], offsets: &[usize], p: usize, len: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    const LINE: usize = 64;
    let Some(&at) = offsets.get(p) else {
        return;
    };
    if len == 0 {
        return;
    }
    let start = half.as_ptr().wrapping_add(at) as *const u8;
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

/// What [`AttendScratch::prepare`] laid out: the scratch's parts, and the stride of one
/// (query, head)'s scores.
pub(super) struct Prepared<'a> {
    pub scores: &'a mut [f32],
    pub offsets: &'a [usize],
    pub parts: &'a mut [f32],
    pub inv: &'a mut [f32],
    /// The longest context rounded up to a whole group: query `i`, head `h`'s scores start
    /// at `(i * heads + h) * padded`.
    pub padded: usize,
}

impl AttendScratch {
    /// The scratch of one kernel call for `queries` queries of `at.heads` heads over
    /// contexts up to `ctx`, positions in groups of `group`: the offsets of positions
    /// `0..ctx`, and `scores`, `parts` (at least `parts` values) and `inv` sized for them.
    /// Scratch only grows and is never zeroed: the kernels write every element before they
    /// read it.
    pub(super) fn prepare(
        &mut self,
        at: &HeadsView<'_>,
        ctx: usize,
        queries: usize,
        group: usize,
        parts: usize,
    ) -> Prepared<'_> {
        at.offsets(ctx, &mut self.offsets);
        assert_eq!(
            self.offsets.len(),
            ctx,
            "block table too short for the context"
        );
        let padded = ctx.next_multiple_of(group);
        let (rows, heads) = (queries * at.heads, at.heads);
        if self.scores.len() < rows * padded {
            self.scores.resize(rows * padded, 0.0);
        }
        if self.parts.len() < parts {
            self.parts.resize(parts, 0.0);
        }
        self.inv.resize(queries * heads, 0.0);
        Prepared {
            scores: &mut self.scores,
            offsets: &self.offsets,
            parts: &mut self.parts,
            inv: &mut self.inv,
            padded,
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
