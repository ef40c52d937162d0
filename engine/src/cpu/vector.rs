//! Small vector helpers for the portable CPU paths (paged attention without AVX-512, the
//! streaming bf16 product) and the packed layers' conversions: widening f16/bf16 to f32,
//! rounding f32 to bf16, dot products and axpy. Each has an
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

/// `src` rounded to bf16 into `dst` (as long), with exactly `bf16::from_f32`'s bits: to
/// nearest even, NaNs kept NaN with their top mantissa bits and the quiet bit set.
pub(crate) fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // SAFETY: as in `widen_f16`.
        return unsafe { x86::narrow_bf16(src, dst) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

/// `out = (x + a) + m` in bf16, rounded after each add as two separate bf16 adds are (each
/// sum computed exactly in f32, then rounded as `bf16::from_f32`). All four are as long.
pub(crate) fn add3_bf16(x: &[bf16], a: &[bf16], m: &[bf16], out: &mut [bf16]) {
    assert!(
        x.len() == out.len() && a.len() == out.len() && m.len() == out.len(),
        "add3_bf16: lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // SAFETY: as in `widen_f16`.
        return unsafe { x86::add3_bf16(x, a, m, out) };
    }
    for (((o, x), a), m) in out.iter_mut().zip(x).zip(a).zip(m) {
        *o = add3_one(*x, *a, *m);
    }
}

fn add3_one(x: bf16, a: bf16, m: bf16) -> bf16 {
    let xa = bf16::from_f32(x.to_f32() + a.to_f32());
    bf16::from_f32(xa.to_f32() + m.to_f32())
}

/// GPT-J's interleaved rotary embedding of one head's `2 * cos.len()` values, as candle's
/// `rope_i` computes it in `T`: for each pair `(a, b)` with angle `(c, s)`,
/// `(a c - b s, a s + b c)`, every product and sum rounded to `T` (for bf16, as half's
/// arithmetic rounds each operation). `x` and `out` are `2 * cos.len()` long, `sin` as long as
/// `cos`.
pub(crate) fn rope_pairs<T: RopeElem>(x: &[T], cos: &[T], sin: &[T], out: &mut [T]) {
    assert!(
        x.len() == 2 * cos.len() && sin.len() == cos.len() && out.len() == x.len(),
        "rope_pairs: lengths do not match"
    );
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // SAFETY: as in `widen_f16`.
        return unsafe { T::rope_avx2(x, cos, sin, out) };
    }
    rope_scalar(x, cos, sin, out);
}

fn rope_scalar<T: RopeElem>(x: &[T], cos: &[T], sin: &[T], out: &mut [T]) {
    for (((o, x), &c), &s) in out
        .chunks_exact_mut(2)
        .zip(x.chunks_exact(2))
        .zip(cos)
        .zip(sin)
    {
        let (a, b) = (x[0], x[1]);
        o[0] = a * c - b * s;
        o[1] = a * s + b * c;
    }
}

/// The element types [`rope_pairs`] takes: f32 and bf16, each with its own arithmetic (half's
/// for bf16 rounds every operation), and the AVX2 loop that computes the same bits.
pub(crate) trait RopeElem:
    Copy + std::ops::Mul<Output = Self> + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self>
{
    /// The AVX2 version.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rope_avx2(x: &[Self], cos: &[Self], sin: &[Self], out: &mut [Self]);
}

impl RopeElem for f32 {
    #[cfg(target_arch = "x86_64")]
    unsafe fn rope_avx2(x: &[Self], cos: &[Self], sin: &[Self], out: &mut [Self]) {
        // SAFETY: the CPU has the features (the caller's promise).
        unsafe { x86::rope_f32(x, cos, sin, out) }
    }
}

impl RopeElem for bf16 {
    #[cfg(target_arch = "x86_64")]
    unsafe fn rope_avx2(x: &[Self], cos: &[Self], sin: &[Self], out: &mut [Self]) {
        // SAFETY: the CPU has the features (the caller's promise).
        unsafe { x86::rope_bf16(x, cos, sin, out) }
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

    /// The bf16 bits of 8 f32 lanes (in the low half of each 32-bit lane), as
    /// `bf16::from_f32` rounds: to nearest even; a NaN keeps its top bits, made quiet.
    #[target_feature(enable = "avx2")]
    fn round_to_bf16(x: __m256i) -> __m256i {
        // A NaN's magnitude is above infinity's bits (as i32, both positive).
        let magnitude = _mm256_and_si256(x, _mm256_set1_epi32(0x7FFF_FFFF));
        let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7F80_0000));
        let high = _mm256_srli_epi32::<16>(x);
        // Nearest even: add 0x7FFF plus the lowest kept bit, then drop the low half.
        let lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
        let bias = _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF));
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(x, bias));
        let quiet = _mm256_or_si256(high, _mm256_set1_epi32(0x0040));
        _mm256_blendv_epi8(rounded, quiet, nan)
    }

    /// Stores 8 bf16 bits held in the low halves of 32-bit lanes.
    ///
    /// # Safety
    /// `p` has room for 8 bf16; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn store_bf16x8(p: *mut bf16, bits: __m256i) {
        // Every lane is below 0x10000: the unsigned pack keeps it; then lanes 0-3 and 4-7
        // sit in the low 64 bits of each 128-bit half.
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(bits, bits));
        // SAFETY: 16 bytes at `p` (the caller's promise).
        unsafe { _mm_storeu_si128(p as *mut __m128i, _mm256_castsi256_si128(packed)) };
    }

    /// 8 bf16 from `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// `p` points at 8 readable bf16; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn load_bf16x8(p: *const bf16) -> __m256 {
        // SAFETY: 16 readable bytes at `p` (the caller's promise).
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n`: 8 f32 readable from `src`, 8 bf16 writable in `dst`.
            unsafe {
                let x = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
                store_bf16x8(dst.as_mut_ptr().add(i), round_to_bf16(x));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = bf16::from_f32(src[j]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn add3_bf16(x: &[bf16], a: &[bf16], m: &[bf16], out: &mut [bf16]) {
        let n = out.len().min(x.len()).min(a.len()).min(m.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: `i + 8 <= n`: 8 values readable from each input and writable in `out`.
            unsafe {
                let xa = _mm256_add_ps(
                    load_bf16x8(x.as_ptr().add(i)),
                    load_bf16x8(a.as_ptr().add(i)),
                );
                let xa = _mm256_slli_epi32::<16>(round_to_bf16(_mm256_castps_si256(xa)));
                let sum = _mm256_add_ps(_mm256_castsi256_ps(xa), load_bf16x8(m.as_ptr().add(i)));
                store_bf16x8(
                    out.as_mut_ptr().add(i),
                    round_to_bf16(_mm256_castps_si256(sum)),
                );
            }
            i += 8;
        }
        for j in i..n {
            out[j] = super::add3_one(x[j], a[j], m[j]);
        }
    }

    /// `[c0, c0, c1, c1, c2, c2, c3, c3]` from four f32.
    #[target_feature(enable = "avx2")]
    fn pairs_of(c: __m128) -> __m256 {
        _mm256_set_m128(_mm_unpackhi_ps(c, c), _mm_unpacklo_ps(c, c))
    }

    /// Minus on the even lanes (the first of each pair), for `a c - b s` beside `a s + b c`.
    #[target_feature(enable = "avx2")]
    fn minus_even() -> __m256 {
        _mm256_castsi256_ps(_mm256_setr_epi32(
            i32::MIN,
            0,
            i32::MIN,
            0,
            i32::MIN,
            0,
            i32::MIN,
            0,
        ))
    }

    /// Four pairs at once: `x * [c c]` and `swap(x) * [s s]`, the second negated on the
    /// even lanes, added: `(a c - b s, b c + a s)` (the adds commute exactly). The products
    /// and the sum each pass through `round` (bf16's rounding, or nothing for f32).
    #[target_feature(enable = "avx2")]
    fn rope4(x: __m256, c: __m128, s: __m128, round: impl Fn(__m256) -> __m256) -> __m256 {
        let swapped = _mm256_permute_ps::<0b10_11_00_01>(x);
        let p = round(_mm256_mul_ps(x, pairs_of(c)));
        let q = round(_mm256_mul_ps(swapped, pairs_of(s)));
        round(_mm256_add_ps(p, _mm256_xor_ps(q, minus_even())))
    }

    /// Pairs past the shortest of the four slices are left alone, as in the helpers above.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rope_f32(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
        let half = pairs_in(x.len(), cos.len(), sin.len(), out.len());
        let mut j = 0;
        while j + 4 <= half {
            // SAFETY: `j + 4 <= half`, which every slice holds: pairs `j..j + 4` are inside `x`
            // and `out` (8 values from `2 j`) and `cos`, `sin` (4 values from `j`).
            unsafe {
                let xv = _mm256_loadu_ps(x.as_ptr().add(2 * j));
                let c = _mm_loadu_ps(cos.as_ptr().add(j));
                let s = _mm_loadu_ps(sin.as_ptr().add(j));
                _mm256_storeu_ps(out.as_mut_ptr().add(2 * j), rope4(xv, c, s, |v| v));
            }
            j += 4;
        }
        super::rope_scalar(&x[2 * j..], &cos[j..half], &sin[j..half], &mut out[2 * j..]);
    }

    /// As `rope_f32`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn rope_bf16(x: &[bf16], cos: &[bf16], sin: &[bf16], out: &mut [bf16]) {
        let half = pairs_in(x.len(), cos.len(), sin.len(), out.len());
        let round = |v: __m256| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(round_to_bf16(_mm256_castps_si256(
                v,
            ))))
        };
        // Four bf16 (8 bytes) widened to f32.
        let load4 = |p: *const bf16| {
            // SAFETY: the callers below pass 4 readable bf16.
            let h = unsafe { _mm_loadl_epi64(p as *const __m128i) };
            _mm_castsi128_ps(_mm_slli_epi32::<16>(_mm_cvtepu16_epi32(h)))
        };
        let mut j = 0;
        while j + 4 <= half {
            // SAFETY: as in `rope_f32`.
            unsafe {
                let xv = load_bf16x8(x.as_ptr().add(2 * j));
                let (c, s) = (load4(cos.as_ptr().add(j)), load4(sin.as_ptr().add(j)));
                let r = rope4(xv, c, s, round);
                store_bf16x8(
                    out.as_mut_ptr().add(2 * j),
                    _mm256_srli_epi32::<16>(_mm256_castps_si256(r)),
                );
            }
            j += 4;
        }
        super::rope_scalar(&x[2 * j..], &cos[j..half], &sin[j..half], &mut out[2 * j..]);
    }

    /// The pairs all four slices of a rotary call hold.
    fn pairs_in(x: usize, cos: usize, sin: usize, out: usize) -> usize {
        (x / 2).min(out / 2).min(cos).min(sin)
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

    /// Rounding to bf16 gives `bf16::from_f32`'s bits for ties (both ways), values just
    /// above and below them, overflow to infinity, infinities, signed zeros, subnormals and
    /// NaNs (signalling and quiet, both signs), at lengths with and without a tail.
    /// The vector rotary gives the scalar one's bits (candle's `rope_i` arithmetic) in f32
    /// and bf16, with and without a tail of fewer than 4 pairs.
    #[test]
    fn rope_pairs_match_the_scalar_arithmetic() {
        for half in [32, 7, 3] {
            let x = values(2 * half);
            let cos: Vec<f32> = (0..half).map(|j| (j as f32 * 0.37).cos()).collect();
            let sin: Vec<f32> = (0..half).map(|j| (j as f32 * 0.37).sin()).collect();
            let mut got = vec![0f32; 2 * half];
            let mut want = vec![0f32; 2 * half];
            rope_pairs(&x, &cos, &sin, &mut got);
            rope_scalar(&x, &cos, &sin, &mut want);
            assert_eq!(got, want, "f32, {half} pairs");
            let b = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
            let (xb, cb, sb) = (b(&x), b(&cos), b(&sin));
            let mut got = vec![bf16::ZERO; 2 * half];
            let mut want = vec![bf16::ZERO; 2 * half];
            rope_pairs(&xb, &cb, &sb, &mut got);
            rope_scalar(&xb, &cb, &sb, &mut want);
            let bits = |v: &[bf16]| v.iter().map(|h| h.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "bf16, {half} pairs");
        }
    }

    #[test]
    fn add3_bf16_is_two_rounded_adds() {
        let v = values(45);
        let b = |f: &dyn Fn(f32) -> f32| -> Vec<bf16> {
            v.iter().map(|&x| bf16::from_f32(f(x))).collect()
        };
        let (x, a, m) = (
            b(&|x| x * 1.37),
            b(&|x| x / 3.1 + 0.01),
            b(&|x| -x * 0.77 + 2e-3),
        );
        for n in [45, 40, 3] {
            let mut got = vec![bf16::ZERO; n];
            add3_bf16(&x[..n], &a[..n], &m[..n], &mut got);
            for i in 0..n {
                let want = bf16::from_f32(
                    bf16::from_f32(x[i].to_f32() + a[i].to_f32()).to_f32() + m[i].to_f32(),
                );
                assert_eq!(got[i].to_bits(), want.to_bits(), "value {i} of {n}");
            }
        }
    }

    #[test]
    fn narrow_bf16_rounds_as_half_does() {
        let specials = [
            0x3F80_8000u32, // tie, even below: stays
            0x3F81_8000,    // tie, odd below: rounds up
            0x3F80_8001,
            0x3F80_7FFF,
            0x7F7F_FFFF, // rounds to infinity
            0x7F80_0000,
            0xFF80_0000,
            0x0000_0000,
            0x8000_0000,
            0x0000_8001, // subnormal
            0x807F_FFFF,
            0x7F80_0001, // signalling NaN
            0xFFC1_2345, // quiet NaN, negative
            0x7FFF_FFFF,
        ];
        let mut x: Vec<f32> = specials.iter().map(|&b| f32::from_bits(b)).collect();
        x.extend(values(45).iter().map(|v| v * 1.000_173));
        for n in [x.len(), x.len() - 3, 5] {
            let src = &x[..n];
            let mut got = vec![bf16::ZERO; n];
            narrow_bf16(src, &mut got);
            for (i, (g, s)) in got.iter().zip(src).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    bf16::from_f32(*s).to_bits(),
                    "value {i}: {:#x}",
                    s.to_bits()
                );
            }
        }
    }
}
