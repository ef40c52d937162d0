//! The AVX-512 kernels behind `packed.rs` (products, GELU, q8_0 quantization) and the CPU
//! paged attention: the unsafe, instruction-level half, kept apart from the safe code that
//! packs weights and splits work. Callers check `packed::available()` first.
//!
//! Every kernel computes each output with one fixed sequence of operations whatever the batch
//! or the tile around it, which is what makes a row's results bitwise batch-invariant.

use crate::packed::{LANES, QBLOCK};
use half::{bf16, f16};
use std::arch::x86_64::*;

/// Where a tile's accumulators start.
#[derive(Clone, Copy)]
pub(crate) enum Start {
    Zero,
    /// 16 * C biases for the tile's columns.
    Bias(*const f32),
    /// The partial sums already in the output.
    Out,
}

pub(crate) struct FloatTile<T> {
    pub x: *const f32,
    pub x_stride: usize,
    pub w: *const T,
    /// Elements between the panels of consecutive column groups.
    pub w_stride: usize,
    pub len: usize,
    pub out: *mut f32,
    pub out_stride: usize,
    pub bias: Start,
}

/// A weight element type the float kernel widens to f32, 16 at a time.
pub(crate) trait Widen16: Copy {
    /// # Safety
    /// `p` points at 16 readable elements; the CPU has AVX-512F.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Widen16 for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl Widen16 for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

impl Widen16 for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

#[inline(always)]
unsafe fn start_acc<const R: usize, const C: usize>(
    start: Start,
    out: *mut f32,
    out_stride: usize,
) -> [[__m512; C]; R] {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        for (c, a) in row.iter_mut().enumerate() {
            *a = match start {
                Start::Zero => _mm512_setzero_ps(),
                Start::Bias(b) => _mm512_loadu_ps(b.add(c * LANES)),
                Start::Out => _mm512_loadu_ps(out.add(r * out_stride + c * LANES)),
            };
        }
    }
    acc
}

#[inline(always)]
unsafe fn store_acc<const R: usize, const C: usize>(
    acc: &[[__m512; C]; R],
    out: *mut f32,
    out_stride: usize,
) {
    for (r, row) in acc.iter().enumerate() {
        for (c, a) in row.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * out_stride + c * LANES), *a);
        }
    }
}

/// `R` rows times `C * 16` columns over `len` inputs: per input, `C` weight loads, `R`
/// broadcasts and `R * C` multiply-adds.
///
/// # Safety
/// The pointers cover the tile; the CPU has AVX-512F and F16C.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(crate) unsafe fn float_tile<const R: usize, const C: usize, T: Widen16>(t: FloatTile<T>) {
    let mut acc = start_acc::<R, C>(t.bias, t.out, t.out_stride);
    for k in 0..t.len {
        let mut w = [_mm512_setzero_ps(); C];
        for (c, wc) in w.iter_mut().enumerate() {
            *wc = T::load16(t.w.add(c * t.w_stride + k * LANES));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*t.x.add(r * t.x_stride + k));
            for (c, a) in row.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w[c], xv, *a);
            }
        }
    }
    store_acc(&acc, t.out, t.out_stride);
}

/// e^x in 16 lanes (relative error about 1e-7): `2^n * p(f)` with `x = n ln2 + f`,
/// `|f| <= ln2 / 2`, `p` the degree-7 Taylor polynomial. Inputs are clamped to
/// [-104, 89], beyond which f32 underflows to 0 or overflows to infinity anyway.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-104.0)),
        _mm512_set1_ps(89.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
    let f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), f);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0 / c));
    }
    _mm512_scalef_ps(p, n)
}

/// GPT-J's `gelu_new`, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, in place, as
/// `x / (1 + e^(-2u))` (the same function; no cancellation for negative `x`).
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn gelu_new(v: &mut [f32]) {
    let k = (2.0 / std::f64::consts::PI).sqrt() as f32;
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        let x = _mm512_loadu_ps(c.as_ptr());
        let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        let u = _mm512_mul_ps(
            _mm512_fmadd_ps(x3, _mm512_set1_ps(0.044715), x),
            _mm512_set1_ps(k),
        );
        let e = exp16(_mm512_mul_ps(u, _mm512_set1_ps(-2.0)));
        let y = _mm512_div_ps(x, _mm512_add_ps(e, _mm512_set1_ps(1.0)));
        _mm512_storeu_ps(c.as_mut_ptr(), y);
    }
    for x in chunks.into_remainder() {
        let u = k * (*x + 0.044715 * *x * *x * *x);
        *x /= 1.0 + (-2.0 * u).exp();
    }
}

/// Quantizes whole blocks of 32 to q8_0: scale `amax / 127`, quants rounded to nearest
/// (even), and each block's `-128 * sum(quants)`.
///
/// # Safety
/// The CPU has AVX-512F; `quants` is as long as `x`, `scales` and `offsets` have one
/// entry per block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn quantize_blocks(
    x: &[f32],
    quants: &mut [i8],
    scales: &mut [f32],
    offsets: &mut [i32],
) {
    for ((src, dst), (d_out, o_out)) in x
        .chunks_exact(QBLOCK)
        .zip(quants.chunks_exact_mut(QBLOCK))
        .zip(scales.iter_mut().zip(offsets.iter_mut()))
    {
        let a = _mm512_loadu_ps(src.as_ptr());
        let b = _mm512_loadu_ps(src.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        let d = amax / 127.0;
        let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
        let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128(
            dst.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtsepi32_epi8(qb),
        );
        *d_out = d;
        *o_out = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

pub(crate) struct Q8Tile {
    pub xq: *const i8,
    pub x_scales: *const f32,
    pub x_offsets: *const i32,
    /// Between rows, in quants and in blocks.
    pub x_stride: usize,
    pub x_block_stride: usize,
    pub wq: *const u8,
    pub w_scales: *const f16,
    /// Blocks in one column group's panel.
    pub w_group_blocks: usize,
    pub blocks: usize,
    pub out: *mut f32,
    pub out_stride: usize,
    pub bias: Start,
}

/// `R` rows times `C * 16` columns of q8_0 over `blocks` blocks: per block, exact integer
/// sums by `vpdpbusd`, then one scaled multiply-add into the f32 accumulators.
///
/// # Safety
/// The pointers cover the tile; the CPU has AVX-512F/BW/VL/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
pub(crate) unsafe fn q8_tile<const R: usize, const C: usize>(t: Q8Tile) {
    let mut acc = start_acc::<R, C>(t.bias, t.out, t.out_stride);
    let panel = t.w_group_blocks * QBLOCK * LANES;
    for b in 0..t.blocks {
        let mut sums = [[_mm512_setzero_si512(); C]; R];
        for (r, row) in sums.iter_mut().enumerate() {
            let start = _mm512_set1_epi32(*t.x_offsets.add(r * t.x_block_stride + b));
            *row = [start; C];
        }
        let wb = t.wq.add(b * QBLOCK * LANES);
        let xb = t.xq.add(b * QBLOCK);
        for quad in 0..QBLOCK / 4 {
            let mut w = [_mm512_setzero_si512(); C];
            for (c, wc) in w.iter_mut().enumerate() {
                *wc = _mm512_loadu_si512(wb.add(c * panel + quad * 4 * LANES) as *const _);
            }
            for (r, row) in sums.iter_mut().enumerate() {
                let four = (xb.add(r * t.x_stride + quad * 4) as *const i32).read_unaligned();
                let xv = _mm512_set1_epi32(four);
                for (c, s) in row.iter_mut().enumerate() {
                    *s = _mm512_dpbusd_epi32(*s, w[c], xv);
                }
            }
        }
        let mut ws = [_mm512_setzero_ps(); C];
        for (c, wsc) in ws.iter_mut().enumerate() {
            let p = t.w_scales.add(c * t.w_group_blocks * LANES + b * LANES);
            *wsc = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let dx = _mm512_set1_ps(*t.x_scales.add(r * t.x_block_stride + b));
            for (c, a) in row.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(ws[c], dx);
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][c]), scale, *a);
            }
        }
    }
    store_acc(&acc, t.out, t.out_stride);
}

/// Where a run of heads of one sequence lives in a paged cache half.
pub(crate) struct HeadsView<'a> {
    /// The sequence's block table.
    pub table: &'a [u32],
    pub block_size: usize,
    /// Elements per cache slot: heads * head size.
    pub width: usize,
    /// The first head's first element within a slot.
    pub first: usize,
    /// Heads in the run.
    pub heads: usize,
}

impl HeadsView<'_> {
    /// Element offsets of positions `0..ctx`, walking the block table (no divisions).
    fn offsets(&self, ctx: usize, into: &mut Vec<usize>) {
        into.clear();
        for &block in self.table {
            let first = block as usize * self.block_size;
            let take = self.block_size.min(ctx - into.len());
            into.extend((first..first + take).map(|slot| slot * self.width + self.first));
            if into.len() == ctx {
                break;
            }
        }
    }
}

/// Sums each of 16 vectors across its lanes, returning the 16 sums in order: a transposing
/// tree of shuffles and adds (about 3 instructions per vector instead of 8).
#[inline(always)]
unsafe fn sum_lanes16(a: [__m512; 16]) -> __m512 {
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

/// Scratch space reused across calls of `attend_heads`.
#[derive(Default)]
pub(crate) struct AttendScratch {
    /// Per head, the scores (then probabilities) of every position, padded to 16.
    scores: Vec<f32>,
    /// Per position, its offset in the cache.
    offsets: Vec<usize>,
    /// Per head and position in a group of 16, a query-key product before its lane sum.
    parts: Vec<f32>,
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
/// The CPU has AVX-512F and F16C; `q` and `out` hold `at.heads * 16 * CH` values; every
/// position's offset (from `at`) plus `at.heads * 16 * CH` is within `k` and `v`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn attend_heads<const CH: usize, T: Widen16>(
    q: &[f32],
    k: &[T],
    v: &[T],
    ctx: usize,
    at: &HeadsView<'_>,
    scale: f32,
    scratch: &mut AttendScratch,
    out: &mut [f32],
) {
    let dim = 16 * CH;
    let heads = at.heads;
    let AttendScratch {
        scores,
        offsets,
        parts,
    } = scratch;
    at.offsets(ctx, offsets);
    let padded = ctx.next_multiple_of(16);
    // Scratch only grows: every element read below is written first in this call (scores
    // by whole groups of 16, parts for each position of the group), so nothing is zeroed.
    if scores.len() < heads * padded {
        scores.resize(heads * padded, 0.0);
    }
    if parts.len() < heads * 16 * 16 {
        parts.resize(heads * 16 * 16, 0.0);
    }
    let scale_v = _mm512_set1_ps(scale);
    for (g, group) in offsets.chunks(16).enumerate() {
        for (s, &off) in group.iter().enumerate() {
            let kp = k.as_ptr().add(off);
            for h in 0..heads {
                let (qh, kh) = (q.as_ptr().add(h * dim), kp.add(h * dim));
                let mut a = _mm512_mul_ps(_mm512_loadu_ps(qh), T::load16(kh));
                for j in 1..CH {
                    a = _mm512_fmadd_ps(
                        _mm512_loadu_ps(qh.add(16 * j)),
                        T::load16(kh.add(16 * j)),
                        a,
                    );
                }
                _mm512_storeu_ps(parts.as_mut_ptr().add((h * 16 + s) * 16), a);
            }
        }
        for h in 0..heads {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (s, r) in rows.iter_mut().enumerate().take(group.len()) {
                *r = _mm512_loadu_ps(parts.as_ptr().add((h * 16 + s) * 16));
            }
            let sums = _mm512_mul_ps(sum_lanes16(rows), scale_v);
            _mm512_storeu_ps(scores.as_mut_ptr().add(h * padded + 16 * g), sums);
        }
    }
    // Softmax per head; `out` holds each head's reciprocal sum until the value pass.
    let mut inv = [0f32; 64];
    let inv = if heads <= inv.len() {
        &mut inv[..heads]
    } else {
        unreachable!("at most 64 heads per run")
    };
    for (h, inv_h) in inv.iter_mut().enumerate() {
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
    out.fill(0.0);
    let o = out.as_mut_ptr();
    for (p, &off) in offsets.iter().enumerate() {
        let vp = v.as_ptr().add(off);
        for h in 0..heads {
            let w = _mm512_set1_ps(*scores.get_unchecked(h * padded + p));
            for j in 0..CH {
                let at = o.add(h * dim + 16 * j);
                let acc =
                    _mm512_fmadd_ps(w, T::load16(vp.add(h * dim + 16 * j)), _mm512_loadu_ps(at));
                _mm512_storeu_ps(at, acc);
            }
        }
    }
    for (h, &inv_h) in inv.iter().enumerate() {
        let iv = _mm512_set1_ps(inv_h);
        for j in 0..CH {
            let at = o.add(h * dim + 16 * j);
            _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), iv));
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
