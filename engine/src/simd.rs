//! Small vector kernels shared by the CPU ops (paged attention, streaming matmul): widening
//! f16/bf16 to f32, dot products and axpy, with AVX2 + FMA + F16C versions picked at run time
//! (checked once) and portable fallbacks.

use half::{bf16, f16};

/// Loading 16 values as f32 for the AVX-512 kernels (nothing elsewhere).
#[cfg(target_arch = "x86_64")]
pub(crate) use crate::avx512::Widen16 as Lanes16;
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Lanes16 {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> Lanes16 for T {}

/// An output buffer the pool's threads write in disjoint parts (the packed products' column
/// groups, attention's heads): a raw pointer, because the parts are not contiguous slices.
pub(crate) struct SharedOut<T>(*mut T);
// Safety: its users write disjoint elements only, into a buffer that outlives the parallel
// section (see `packed::Job::columns` and `paged::PagedAttention::attend_avx512`).
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    pub(crate) fn new(ptr: *mut T) -> Self {
        Self(ptr)
    }

    /// # Safety
    /// `offset` is inside the buffer.
    pub(crate) unsafe fn at(&self, offset: usize) -> *mut T {
        self.0.add(offset)
    }
}

/// Float types that are stored narrow and computed in f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static + Lanes16 {
    /// `src` as f32: `src` itself for f32, else widened into `buf`.
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
    fn narrow(v: f32) -> Self;
}

impl Elem for f32 {
    fn as_f32<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }
    fn narrow(v: f32) -> Self {
        v
    }
}

impl Elem for f16 {
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        widen_f16(src, buf);
        buf
    }
    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Elem for bf16 {
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        widen_bf16(src, buf);
        buf
    }
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

use std::sync::LazyLock;

#[cfg(target_arch = "x86_64")]
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
        // Safety: the CPU supports the features the function is compiled for.
        return unsafe { x86::widen_f16(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub(crate) fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // Safety: as above.
        return unsafe { x86::widen_bf16(src, dst) };
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // Safety: as above.
        return unsafe { x86::dot(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `y += alpha * x`.
pub(crate) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *AVX2 {
        // Safety: the CPU supports the features the function is compiled for.
        return unsafe { x86::axpy(alpha, x, y) };
    }
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen_f16(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            let w = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (l, a_l) in acc.iter_mut().enumerate() {
                let off = i + 8 * l;
                *a_l = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(off)),
                    _mm256_loadu_ps(pb.add(off)),
                    *a_l,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
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
    pub(super) unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let av = _mm256_set1_ps(alpha);
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i)));
            _mm256_storeu_ps(py.add(i), v);
            i += 8;
        }
        for j in i..n {
            y[j] += alpha * x[j];
        }
    }
}
