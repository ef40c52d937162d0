//! The AVX-512 kernels of the packed linear layers (`packed.rs`): register-tiled products over
//! float and q8_0 panels, `gelu_new`, and quantizing input rows to q8_0.
//!
//! Each kernel is a `#[target_feature]` function. The ones that take slices are wrapped in
//! safe functions that ask for an [`Avx512`] token (the proof of the features); the two tile
//! kernels take raw pointers into the panels and the output, so they stay `unsafe` and their
//! callers in `packed.rs` state why the pointers cover the tile.
//!
//! Every kernel computes each output with one fixed sequence of operations whatever the batch
//! or the tile around it, which is what makes a row's results bitwise batch-invariant.

use std::arch::x86_64::*;

use half::bf16;

use super::tile::{check_q8_buffers, FloatTile, Q8Tile, Start, QBLOCK};
use crate::cpu::avx512::{as_bf16x32, exp16};
use crate::cpu::{Avx512, Bf16Dot, Elem, LANES};

/// # Safety
/// The CPU has AVX-512F; `start` and `out` cover `R` rows of `C * 16` values.
#[inline(always)]
pub(super) unsafe fn start_acc<const R: usize, const C: usize>(
    start: Start,
    out: *mut f32,
    out_stride: usize,
) -> [[__m512; C]; R] {
    // SAFETY: forwarded from the caller.
    unsafe {
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
}

/// # Safety
/// The CPU has AVX-512F; `out` covers `R` rows of `C * 16` values.
#[inline(always)]
pub(super) unsafe fn store_acc<const R: usize, const C: usize>(
    acc: &[[__m512; C]; R],
    out: *mut f32,
    out_stride: usize,
) {
    for (r, row) in acc.iter().enumerate() {
        for (c, a) in row.iter().enumerate() {
            // SAFETY: forwarded from the caller.
            unsafe { _mm512_storeu_ps(out.add(r * out_stride + c * LANES), *a) };
        }
    }
}

/// `R` rows times `C * 16` columns over `len` inputs: per input, `C` weight loads, `R`
/// broadcasts and `R * C` multiply-adds.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL, F16C and FMA (an [`Avx512`] token is in hand); `x` covers `R`
/// rows of `len` inputs, `w` `C` panels of `len * 16`, `out` (and the bias, if any) `R` rows of
/// `C * 16` outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub(crate) unsafe fn float_tile<const R: usize, const C: usize, T: Elem>(t: FloatTile<f32, T>) {
    // SAFETY: the bias and `out` cover the tile (the caller's promise).
    let mut acc = unsafe { start_acc::<R, C>(t.bias, t.out, t.out_stride) };
    for k in 0..t.len {
        let mut w = [_mm512_setzero_ps(); C];
        for (c, wc) in w.iter_mut().enumerate() {
            // SAFETY: `c < C` panels of `len * 16` from `w`, `k < len` (the caller's promise).
            *wc = unsafe { T::load16(t.w.add(c * t.w_stride + k * LANES)) };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: `r < R` rows of `len` inputs from `x`, `k < len`.
            let xv = _mm512_set1_ps(unsafe { *t.x.add(r * t.x_stride + k) });
            for (c, a) in row.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(w[c], xv, *a);
            }
        }
    }
    // SAFETY: `out` covers the tile.
    unsafe { store_acc(&acc, t.out, t.out_stride) };
}

/// `R` rows times `C * 16` columns of bf16 over `len` inputs (even), two at a time: per pair,
/// `C` weight loads, `R` broadcasts of an input pair and `R * C` `vdpbf16ps`, each adding
/// both products of a pair into the output's f32 accumulator. No widening: the weights and
/// inputs go to the dot-product unit as stored.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL and BF16 (an [`Avx512`] and the `Bf16Dot` token are in hand);
/// `x` covers `R` rows of `len` inputs, `w` `C` pair panels (`[k / 2][16 columns][2]`) of
/// `len * 16`, `out` (and the bias, if any) `R` rows of `C * 16` outputs. An odd `len` would
/// leave its last input out (wrong, not unsound); the callers' are even.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn bf16_pair_tile<const R: usize, const C: usize>(
    _dot: Bf16Dot,
    t: FloatTile<bf16, bf16>,
) {
    // SAFETY: the bias and `out` cover the tile (the caller's promise).
    let mut acc = unsafe { start_acc::<R, C>(t.bias, t.out, t.out_stride) };
    for k2 in 0..t.len / 2 {
        let mut w = [_mm512_setzero_si512(); C];
        for (c, wc) in w.iter_mut().enumerate() {
            // SAFETY: 32 bf16 (16 pairs) of pair `k2 < len / 2` in panel `c < C`.
            *wc =
                unsafe { _mm512_loadu_si512(t.w.add(c * t.w_stride + k2 * 2 * LANES) as *const _) };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: inputs `2 k2, 2 k2 + 1 < len` of row `r < R`.
            let pair = unsafe { (t.x.add(r * t.x_stride + 2 * k2) as *const i32).read_unaligned() };
            let xv = as_bf16x32(_mm512_set1_epi32(pair));
            for (c, a) in row.iter_mut().enumerate() {
                *a = _mm512_dpbf16_ps(*a, as_bf16x32(w[c]), xv);
            }
        }
    }
    // SAFETY: `out` covers the tile.
    unsafe { store_acc(&acc, t.out, t.out_stride) };
}

/// GPT-J's `gelu_new`, `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, in place, as
/// `x / (1 + e^(-2u))` (the same function; no cancellation for negative `x`).
pub(crate) fn gelu_new(_cpu: Avx512, v: &mut [f32]) {
    // SAFETY: `_cpu` proves the CPU has the function's target features.
    unsafe { gelu_new_avx512(v) }
}

#[target_feature(enable = "avx512f,fma")]
fn gelu_new_avx512(v: &mut [f32]) {
    let k = (2.0 / std::f64::consts::PI).sqrt() as f32;
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: `c` is 16 values; this function has AVX-512F, which `exp16` needs.
        unsafe {
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
    }
    for x in chunks.into_remainder() {
        let u = k * (*x + 0.044715 * *x * *x * *x);
        *x /= 1.0 + (-2.0 * u).exp();
    }
}

/// Quantizes whole blocks of 32 to q8_0: scale `amax / 127`, quants rounded to nearest
/// (even), and each block's `-128 * sum(quants)`. `quants` is as long as `x`, `scales` and
/// `offsets` have one entry per block (panics otherwise).
pub(crate) fn quantize_blocks(
    _cpu: Avx512,
    x: &[f32],
    quants: &mut [i8],
    scales: &mut [f32],
    offsets: &mut [i32],
) {
    check_q8_buffers(x, quants, scales, offsets);
    // SAFETY: `_cpu` proves the CPU has the function's target features.
    unsafe { quantize_blocks_avx512(x, quants, scales, offsets) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn quantize_blocks_avx512(x: &[f32], quants: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    for ((src, dst), (d_out, o_out)) in x
        .chunks_exact(QBLOCK)
        .zip(quants.chunks_exact_mut(QBLOCK))
        .zip(scales.iter_mut().zip(offsets.iter_mut()))
    {
        // SAFETY: `src` and `dst` are whole blocks of 32: two 16-lane loads and two 16-byte
        // stores stay inside them.
        unsafe {
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
}

/// `R` rows times `C * 16` columns of q8_0 over `blocks` blocks: per block, exact integer
/// sums by `vpdpbusd`, then one scaled multiply-add into the f32 accumulators.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL/VNNI, F16C and FMA (an [`Avx512`] token is in hand); the input
/// pointers cover `R` rows of `blocks` blocks, the weight pointers `C` panels of `blocks`
/// blocks, `out` (and the bias, if any) `R` rows of `C * 16` outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
pub(crate) unsafe fn q8_tile<const R: usize, const C: usize>(t: Q8Tile) {
    // SAFETY: the bias and `out` cover the tile (the caller's promise).
    let mut acc = unsafe { start_acc::<R, C>(t.bias, t.out, t.out_stride) };
    let panel = t.w_group_blocks * QBLOCK * LANES;
    for b in 0..t.blocks {
        let mut sums = [[_mm512_setzero_si512(); C]; R];
        for (r, row) in sums.iter_mut().enumerate() {
            // SAFETY: `r < R` rows of `blocks` offsets, `b < blocks` (the caller's promise).
            let start = _mm512_set1_epi32(unsafe { *t.x_offsets.add(r * t.x_block_stride + b) });
            *row = [start; C];
        }
        // SAFETY: block `b < blocks` of the first panel and of the first input row.
        let (wb, xb) = unsafe { (t.wq.add(b * QBLOCK * LANES), t.xq.add(b * QBLOCK)) };
        for quad in 0..QBLOCK / 4 {
            let mut w = [_mm512_setzero_si512(); C];
            for (c, wc) in w.iter_mut().enumerate() {
                // SAFETY: 64 bytes of quad `quad` of block `b` in panel `c < C`.
                *wc =
                    unsafe { _mm512_loadu_si512(wb.add(c * panel + quad * 4 * LANES) as *const _) };
            }
            for (r, row) in sums.iter_mut().enumerate() {
                // SAFETY: 4 quants of row `r < R`, block `b`.
                let four =
                    unsafe { (xb.add(r * t.x_stride + quad * 4) as *const i32).read_unaligned() };
                let xv = _mm512_set1_epi32(four);
                for (c, s) in row.iter_mut().enumerate() {
                    *s = _mm512_dpbusd_epi32(*s, w[c], xv);
                }
            }
        }
        let mut ws = [_mm512_setzero_ps(); C];
        for (c, wsc) in ws.iter_mut().enumerate() {
            // SAFETY: the 16 f16 scales of block `b` in panel `c < C`.
            let scales = unsafe {
                let p = t.w_scales.add(c * t.w_group_blocks * LANES + b * LANES);
                _mm256_loadu_si256(p as *const __m256i)
            };
            *wsc = _mm512_cvtph_ps(scales);
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: row `r < R`'s scale of block `b`.
            let dx = _mm512_set1_ps(unsafe { *t.x_scales.add(r * t.x_block_stride + b) });
            for (c, a) in row.iter_mut().enumerate() {
                let scale = _mm512_mul_ps(ws[c], dx);
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][c]), scale, *a);
            }
        }
    }
    // SAFETY: `out` covers the tile.
    unsafe { store_acc(&acc, t.out, t.out_stride) };
}
