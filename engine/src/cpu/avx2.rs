//! AVX2 building blocks for the kernels that also run on CPUs without AVX-512: widening loads
//! of 8 values and a vector `exp`. `#[inline(always)]`, so they compile into their callers
//! (`#[target_feature]` kernels reached through an [`Avx2`](super::Avx2) token) with those
//! kernels' features.

use std::arch::x86_64::*;

use half::{bf16, f16};

/// # Safety
/// `p` points at 8 readable f32; the CPU has AVX.
#[inline(always)]
pub(crate) unsafe fn load8_f32(p: *const f32) -> __m256 {
    // SAFETY: forwarded from the caller.
    unsafe { _mm256_loadu_ps(p) }
}

/// # Safety
/// `p` points at 8 readable f16; the CPU has AVX and F16C.
#[inline(always)]
pub(crate) unsafe fn load8_f16(p: *const f16) -> __m256 {
    // SAFETY: forwarded from the caller; 8 f16 are one 128-bit load.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
}

/// # Safety
/// `p` points at 8 readable bf16; the CPU has AVX2.
#[inline(always)]
pub(crate) unsafe fn load8_bf16(p: *const bf16) -> __m256 {
    // SAFETY: forwarded from the caller; bf16 is the high half of an f32, so widening is a
    // shift of each 16-bit value into the top of a 32-bit lane.
    unsafe {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// # Safety
/// `p` points at 8 readable bytes, read as `i8`; the CPU has AVX2.
#[inline(always)]
pub(crate) unsafe fn load8_i8(p: *const u8) -> __m256 {
    // SAFETY: forwarded from the caller; a 64-bit load, each byte sign-extended to a lane.
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
}

/// e^x in 8 lanes, the same polynomial as the AVX-512 `exp16` (relative error about 1e-7),
/// with `2^n` built in the exponent bits. Inputs are clamped to [-87, 88], so that `n` stays
/// a normal exponent: below, the result is at most ~1.6e-38 instead of a denormal or 0; above,
/// ~1.6e38 instead of infinity (what `gelu_new` makes of either is the same).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[inline(always)]
pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
    // SAFETY: register-only intrinsics; the caller has AVX2 and FMA.
    unsafe {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let f = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), f);
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [720.0, 120.0, 24.0, 6.0, 2.0, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0 / c));
        }
        // n is in [-126, 127]: 2^n is the float with biased exponent n + 127.
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
    }
}
