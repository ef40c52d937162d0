//! The AVX2 kernels of the packed linear layers (`packed.rs`), for CPUs without AVX-512: the
//! register-tiled float and q8_0 products over the same 16-column panels as the AVX-512
//! kernels (each column group read as two 256-bit halves), `gelu_new`, and quantizing input
//! rows to q8_0.
//!
//! Each output is one accumulator that sees its terms in input order (float) or block order
//! (q8_0), as in the AVX-512 kernels, so a row's result is bitwise the same in any batch, and
//! the same bits as the AVX-512 kernel's: one fused multiply-add per term in the same order,
//! and for q8_0 the same exact integer block sums, scaled and added in the same order.

use std::arch::x86_64::*;

use super::tile::{check_q8_buffers, FloatTile, Q8Tile, Start, QBLOCK};
use crate::cpu::avx2::exp8;
use crate::cpu::{Avx2, Elem, LANES};

/// Bytes of one quad row of a q8_0 panel half: 8 columns of 4 inputs.
const QUAD_HALF: usize = 4 * LANES / 2;

/// f32 lanes in one 256-bit register: half a column group.
const HALF: usize = LANES / 2;

/// `R` rows times `C` column groups (16 columns, two registers each) over `len` inputs: per
/// input, `2 C` weight loads, `R` broadcasts and `2 R C` multiply-adds. `packed.rs` uses
/// `C = 1` and `R <= 6`: 12 accumulators, two weights and a broadcast in AVX2's 16 registers.
///
/// # Safety
/// The CPU has AVX2, F16C and FMA (an [`Avx2`] token is in hand); `x` covers `R` rows of `len`
/// inputs, `w` `C` panels of `len * 16`, `out` (and the bias, if any) `R` rows of `C * 16`
/// outputs.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn float_tile<const R: usize, const C: usize, T: Elem>(t: FloatTile<f32, T>) {
    // SAFETY: every pointer below stays inside the tile (the caller's promise), and the
    // intrinsics need only this function's features.
    unsafe {
        // acc[r][c][h]: row r, column group c, half h (columns 8h..8h + 8 of the group).
        let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (c, group) in row.iter_mut().enumerate() {
                for (h, a) in group.iter_mut().enumerate() {
                    let col = c * LANES + h * HALF;
                    *a = match t.bias {
                        Start::Zero => _mm256_setzero_ps(),
                        Start::Bias(b) => _mm256_loadu_ps(b.add(col)),
                        Start::Out => _mm256_loadu_ps(t.out.add(r * t.out_stride + col)),
                    };
                }
            }
        }
        for k in 0..t.len {
            let mut w = [[_mm256_setzero_ps(); 2]; C];
            for (c, wc) in w.iter_mut().enumerate() {
                let wp = t.w.add(c * t.w_stride + k * LANES);
                *wc = [T::load8(wp), T::load8(wp.add(HALF))];
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = _mm256_set1_ps(*t.x.add(r * t.x_stride + k));
                for (c, group) in row.iter_mut().enumerate() {
                    for (h, a) in group.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(w[c][h], xv, *a);
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, group) in row.iter().enumerate() {
                for (h, a) in group.iter().enumerate() {
                    _mm256_storeu_ps(t.out.add(r * t.out_stride + c * LANES + h * HALF), *a);
                }
            }
        }
    }
}

/// GPT-J's `gelu_new` in place, as the AVX-512 kernel computes it: `x / (1 + e^(-2u))`.
pub(crate) fn gelu_new(_cpu: Avx2, v: &mut [f32]) {
    // SAFETY: `_cpu` proves the CPU has the function's target features.
    unsafe { gelu_new_avx2(v) }
}

#[target_feature(enable = "avx2,fma")]
fn gelu_new_avx2(v: &mut [f32]) {
    let k = (2.0 / std::f64::consts::PI).sqrt() as f32;
    let mut chunks = v.chunks_exact_mut(HALF);
    for c in &mut chunks {
        // SAFETY: `c` is 8 values; this function has AVX2 and FMA, which `exp8` needs.
        unsafe {
            let x = _mm256_loadu_ps(c.as_ptr());
            let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            let u = _mm256_mul_ps(
                _mm256_fmadd_ps(x3, _mm256_set1_ps(0.044715), x),
                _mm256_set1_ps(k),
            );
            let e = exp8(_mm256_mul_ps(u, _mm256_set1_ps(-2.0)));
            let y = _mm256_div_ps(x, _mm256_add_ps(e, _mm256_set1_ps(1.0)));
            _mm256_storeu_ps(c.as_mut_ptr(), y);
        }
    }
    for x in chunks.into_remainder() {
        let u = k * (*x + 0.044715 * *x * *x * *x);
        *x /= 1.0 + (-2.0 * u).exp();
    }
}

/// `R` rows times `C` column groups of q8_0 over `blocks` blocks. Without VNNI the products of
/// a block go through `vpmaddubsw` (unsigned times signed bytes, pairs added into 16 bits,
/// saturating) and `vpmaddwd` (pairs of those into 32 bits): per quad of inputs and half a
/// column group, the weights are read as signed bytes (the panels' +128 offset flipped off)
/// and split into magnitude and sign, the sign is moved onto the broadcast inputs
/// (`vpsignb`), and `|w| * (x sign(w))` goes through both. Quants are within [-127, 127]
/// (weights are clamped, and inputs are rounded from at most 127 in magnitude), so a 16-bit
/// pair sum is at most 2 * 127 * 127 = 32,258 and never saturates: each block sum is the
/// exact `sum(w x)` the AVX-512 kernel gets. Then one scaled multiply-add per block into the
/// f32 accumulators, which live in `out` (L1): AVX2's 16 registers hold the integer sums of
/// `R <= 4` rows, the weights and a broadcast, not the float sums as well.
///
/// # Safety
/// The CPU has AVX2, F16C and FMA (an [`Avx2`] token is in hand); the input pointers cover
/// `R` rows of `blocks` blocks, the weight pointers `C` panels of `blocks` blocks, `out` (and
/// the bias, if any) `R` rows of `C * 16` outputs.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn q8_tile<const R: usize, const C: usize>(t: Q8Tile) {
    // SAFETY: every pointer below stays inside the tile (the caller's promise), and the
    // intrinsics need only this function's features.
    unsafe {
        for r in 0..R {
            for c in 0..C * 2 {
                let o = t.out.add(r * t.out_stride + c * HALF);
                match t.bias {
                    Start::Zero => _mm256_storeu_ps(o, _mm256_setzero_ps()),
                    Start::Bias(b) => _mm256_storeu_ps(o, _mm256_loadu_ps(b.add(c * HALF))),
                    Start::Out => {}
                }
            }
        }
        let panel = t.w_group_blocks * QBLOCK * LANES;
        let ones = _mm256_set1_epi16(1);
        let offset = _mm256_set1_epi8(i8::MIN);
        for b in 0..t.blocks {
            // sums[r][c][h]: row r, column group c, half h.
            let mut sums = [[[_mm256_setzero_si256(); 2]; C]; R];
            let (wb, xb) = (t.wq.add(b * QBLOCK * LANES), t.xq.add(b * QBLOCK));
            for quad in 0..QBLOCK / 4 {
                let mut w = [[_mm256_setzero_si256(); 2]; C];
                let mut magnitude = [[_mm256_setzero_si256(); 2]; C];
                for c in 0..C {
                    for h in 0..2 {
                        let p = wb.add(c * panel + quad * 4 * LANES + h * QUAD_HALF);
                        let signed = _mm256_xor_si256(_mm256_loadu_si256(p as *const _), offset);
                        w[c][h] = signed;
                        magnitude[c][h] = _mm256_abs_epi8(signed);
                    }
                }
                for (r, row) in sums.iter_mut().enumerate() {
                    let four = (xb.add(r * t.x_stride + quad * 4) as *const i32).read_unaligned();
                    let xv = _mm256_set1_epi32(four);
                    for (c, group) in row.iter_mut().enumerate() {
                        for (h, s) in group.iter_mut().enumerate() {
                            let x = _mm256_sign_epi8(xv, w[c][h]);
                            let pairs = _mm256_maddubs_epi16(magnitude[c][h], x);
                            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(pairs, ones));
                        }
                    }
                }
            }
            let mut ws = [[_mm256_setzero_ps(); 2]; C];
            for (c, group) in ws.iter_mut().enumerate() {
                for (h, wsh) in group.iter_mut().enumerate() {
                    let p = t
                        .w_scales
                        .add(c * t.w_group_blocks * LANES + b * LANES + h * HALF);
                    *wsh = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
                }
            }
            for (r, row) in sums.iter().enumerate() {
                let dx = _mm256_set1_ps(*t.x_scales.add(r * t.x_block_stride + b));
                for (c, group) in row.iter().enumerate() {
                    for (h, s) in group.iter().enumerate() {
                        let o = t.out.add(r * t.out_stride + c * LANES + h * HALF);
                        let scale = _mm256_mul_ps(ws[c][h], dx);
                        let acc =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(*s), scale, _mm256_loadu_ps(o));
                        _mm256_storeu_ps(o, acc);
                    }
                }
            }
        }
    }
}

/// Quantizes whole blocks of 32 to q8_0 exactly as the AVX-512 quantizer does (the same
/// scale `amax / 127`, quants rounded to nearest even, and each block's `-128 * sum(quants)`).
/// `quants` is as long as `x`, `scales` and `offsets` have one entry per block (panics
/// otherwise).
pub(crate) fn quantize_blocks(
    _cpu: Avx2,
    x: &[f32],
    quants: &mut [i8],
    scales: &mut [f32],
    offsets: &mut [i32],
) {
    check_q8_buffers(x, quants, scales, offsets);
    // SAFETY: `_cpu` proves the CPU has the function's target features.
    unsafe { quantize_blocks_avx2(x, quants, scales, offsets) }
}

#[target_feature(enable = "avx2")]
fn quantize_blocks_avx2(x: &[f32], quants: &mut [i8], scales: &mut [f32], offsets: &mut [i32]) {
    for ((src, dst), (d_out, o_out)) in x
        .chunks_exact(QBLOCK)
        .zip(quants.chunks_exact_mut(QBLOCK))
        .zip(scales.iter_mut().zip(offsets.iter_mut()))
    {
        // SAFETY: `src` and `dst` are whole blocks of 32: four 8-lane loads and one 32-byte
        // store stay inside them.
        unsafe {
            let v: [__m256; 4] =
                std::array::from_fn(|i| _mm256_loadu_ps(src.as_ptr().add(i * HALF)));
            let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &vi| {
                _mm256_max_ps(m, _mm256_and_ps(vi, abs))
            });
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
            let d = amax / 127.0;
            let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let q = v.map(|vi| _mm256_cvtps_epi32(_mm256_mul_ps(vi, inv)));
            // Saturating packs to 16 then 8 bits interleave the four vectors by 128-bit lane:
            // dword i of `bytes` holds quants 4 (i / 4)..4 (i / 4) + 4 of vector i % 4.
            let bytes = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let ordered =
                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, ordered);
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            *d_out = d;
            *o_out = -128 * _mm_cvtsi128_si32(s);
        }
    }
}
