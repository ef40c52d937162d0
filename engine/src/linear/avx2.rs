//! The AVX2 kernels of the packed linear layers (`packed.rs`), for CPUs without AVX-512: the
//! register-tiled float product over the same 16-column panels (two 256-bit registers per
//! column group) and `gelu_new`. q8_0 has no kernel here: without VNNI, 8-bit products go
//! through `vpmaddubsw`, whose 16-bit pair sums saturate on the panels' unsigned weights, so
//! q8_0 layers keep candle's kernel on these CPUs.
//!
//! Each output is one accumulator that sees its terms in input order, as in the AVX-512
//! kernel, so a row's result is bitwise the same in any batch (and the same bits as the
//! AVX-512 float kernel's: one fused multiply-add per term, in the same order).

use std::arch::x86_64::*;

use super::tile::{FloatTile, Start};
use crate::cpu::avx2::exp8;
use crate::cpu::{Avx2, Elem, LANES};

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
