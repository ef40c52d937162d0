//! AVX-512 building blocks shared by the linear and attention kernels: widening loads and a
//! vector `exp`. They are `#[inline(always)]` so that they compile into their callers, the
//! `#[target_feature]` kernels, with those kernels' features.

use std::arch::x86_64::*;

use half::{bf16, f16};

/// # Safety
/// `p` points at 16 readable f32; the CPU has AVX-512F.
#[inline(always)]
pub(crate) unsafe fn load16_f32(p: *const f32) -> __m512 {
    // SAFETY: forwarded from the caller.
    unsafe { _mm512_loadu_ps(p) }
}

/// # Safety
/// `p` points at 16 readable f16; the CPU has AVX-512F and F16C.
#[inline(always)]
pub(crate) unsafe fn load16_f16(p: *const f16) -> __m512 {
    // SAFETY: forwarded from the caller; f16 is 2 bytes, so 16 of them are one 256-bit load.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
}

/// # Safety
/// `p` points at 16 readable bf16; the CPU has AVX-512F.
#[inline(always)]
pub(crate) unsafe fn load16_bf16(p: *const bf16) -> __m512 {
    // SAFETY: forwarded from the caller; bf16 is the high half of an f32, so widening is a
    // shift of each 16-bit value into the top of a 32-bit lane.
    unsafe {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// # Safety
/// `p` points at 16 readable bytes, read as `i8`; the CPU has AVX-512F.
#[inline(always)]
pub(crate) unsafe fn load16_i8(p: *const u8) -> __m512 {
    // SAFETY: forwarded from the caller; a 128-bit load, each byte sign-extended to a lane.
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
}

/// e^x in 16 lanes (relative error about 1e-7): `2^n * p(f)` with `x = n ln2 + f`,
/// `|f| <= ln2 / 2`, `p` the degree-7 Taylor polynomial. Inputs are clamped to
/// [-104, 89], beyond which f32 underflows to 0 or overflows to infinity anyway.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline(always)]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    // SAFETY: register-only intrinsics; the caller has AVX-512F.
    unsafe {
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
}

/// The same 512 bits read as 32 bf16 values, for the `vdpbf16ps` operands.
#[inline(always)]
pub(crate) fn as_bf16x32(v: __m512i) -> __m512bh {
    // SAFETY: both are plain 512-bit vectors; every bit pattern is valid in each.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}
