//! Small vector helpers for the portable CPU paths (paged attention without AVX-512, the
//! streaming bf16 product): widening f16/bf16 to f32, dot products and axpy. Each has an
//! AVX2 + FMA + F16C version, picked at run time (checked once), and a portable fallback,
//! the one Miri runs.

use half::{bf16, f16};

use std::sync::LazyLock;

#[cfg(target_arch = "x86_64")]
/// Whether the AVX2 versions can run here. Only this flag guards the `unsafe` calls below.
static AVX2: LazyLock<bool> = LazyLock::new(|| {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
});
#[cfg(not(target_arch = "x86_64"))]
static AVX2: LazyLock<bool> = LazyLock::new(|| false);

pub(crate) fn widen_f16(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // SAFETY: `AVX2` checked that the CPU has the function's target features; it reads
        // and writes only inside the two slices.
        return unsafe { x86::widen_f16(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub(crate) fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // SAFETY: as in `widen_f16`.
        return unsafe { x86::widen_bf16(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // SAFETY: as in `widen_f16`.
        return unsafe { x86::dot(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += alpha * x`.
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // SAFETY: as in `widen_f16`.
        return unsafe { x86::axpy(alpha, x, y) };
    }
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// The AVX2 versions. They are safe functions (`#[target_feature]` makes calling them from
/// code without the features `unsafe`): each stays inside its slices by taking the shorter
/// length, so the one invariant a caller must establish is that the CPU has the features.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn widen_f16(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n`, so 8 values are readable from `src` and writable in `dst`.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: as in `widen_f16`.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (l, a_l) in acc.iter_mut().enumerate() {
                let off = i + 8 * l;
                // SAFETY: `off + 8 <= i + 32 <= n`: inside both slices.
                *a_l = unsafe {
                    _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(off)),
                        _mm256_loadu_ps(pb.add(off)),
                        *a_l,
                    )
                };
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n`: inside both slices.
            acc[0] = unsafe {
                _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                )
            };
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut s = hsum(sum);
        for j in i..n {
            s += a[j] * b[j];
        }
        s
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm256_set1_ps(alpha);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n`: inside both slices.
            unsafe {
                let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
                _mm256_storeu_ps(py.add(i), v);
            }
            i += 8;
        }
        for j in i..n {
            y[j] += alpha * x[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0)
            .collect()
    }

    #[test]
    fn helpers_match_scalar_arithmetic() {
        // Lengths that leave tails after the 32- and 8-wide loops.
        for n in [0, 1, 7, 8, 33, 45] {
            let (a, b) = (values(n), values(n + 3)[3..].to_vec());
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                (dot(&a, &b) - want).abs() <= 1e-4 * want.abs().max(1.0),
                "dot {n}"
            );
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for ((yi, bi), ai) in y.iter().zip(&b).zip(&a) {
                assert_eq!(*yi, bi + 0.5 * ai, "axpy {n}");
            }
            // These values are exact in f16 and bf16, so widening gives them back.
            let h: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let bh: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let mut out = vec![0f32; n];
            widen_f16(&h, &mut out);
            assert_eq!(out, a, "widen_f16 {n}");
            widen_bf16(&bh, &mut out);
            assert_eq!(out, a, "widen_bf16 {n}");
        }
    }
}
