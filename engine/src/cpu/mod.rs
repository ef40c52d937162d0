//! What the CPU kernels share, and nothing else: the proofs that this CPU has the AVX-512 or
//! AVX2 features the kernels are compiled for ([`Avx512`], [`Avx2`], and [`Isa`], the best of
//! them, with the extras [`Bf16Dot`] and [`Amx`] on top of AVX-512), the lane width, the
//! element types that are stored narrow and computed in f32 ([`Elem`]), an output buffer that
//! threads write in disjoint parts ([`SharedOut`]), and small vector helpers ([`vector`]).
//!
//! A leaf: it imports nothing else from the engine, and both `linear` and `attention` build
//! on it.

use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::ptr::NonNull;

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod peak;
pub(crate) mod vector;

#[cfg(target_arch = "x86_64")]
pub(crate) use amx::Amx;

/// f32 lanes in one 512-bit register: the kernels' unit of columns (linear) and of positions
/// (attention).
pub(crate) const LANES: usize = 16;

/// Proof that the CPU runs gptj's AVX-512 kernels: it has AVX-512 F, BW, VL and VNNI, F16C
/// and FMA, and `GPTJ_CPU_KERNELS` did not turn the kernels off (`candle`) or ask for the
/// AVX2 ones (`avx2`).
///
/// Zero-sized, with a private field: [`Avx512::detect`] is the only way to get one, so a value
/// in hand is the proof. Every packed constructor and every kernel dispatch takes one, which is
/// what lets their `unsafe` calls into `#[target_feature]` functions say why the features are
/// there.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512 {
    _detected: (),
}

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The token where the CPU has the features (checked once per process), else `None`.
    pub(crate) fn detect() -> Option<Self> {
        static DETECTED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
            let forced_off =
                std::env::var("GPTJ_CPU_KERNELS").is_ok_and(|v| v == "candle" || v == "avx2");
            !forced_off
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
        });
        DETECTED.then_some(Self { _detected: () })
    }
}

/// Proof that the CPU runs gptj's AVX2 kernels (every packed product, and attention): it
/// has AVX2, FMA and F16C, and `GPTJ_CPU_KERNELS=candle` did not turn the kernels off. Made
/// only by [`Avx2::detect`], as [`Avx512`] is.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2 {
    _detected: (),
}

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The token where the CPU has the features (checked once per process), else `None`.
    pub(crate) fn detect() -> Option<Self> {
        static DETECTED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
            let forced_off = std::env::var("GPTJ_CPU_KERNELS").is_ok_and(|v| v == "candle");
            !forced_off
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("f16c")
                && is_x86_feature_detected!("fma")
        });
        DETECTED.then_some(Self { _detected: () })
    }
}

/// The instruction set gptj's own CPU kernels run on, with the token that proves it.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) enum Isa {
    /// Every packed kernel (float, bf16 pairs, q8_0) and the AVX-512 attention.
    Avx512(Avx512),
    /// The same products on 256-bit registers (bf16 widened, no pair panels) and the AVX2
    /// attention.
    Avx2(Avx2),
}

#[cfg(target_arch = "x86_64")]
impl Isa {
    /// The best this CPU has, `None` where it has neither (or `GPTJ_CPU_KERNELS=candle`).
    pub(crate) fn detect() -> Option<Self> {
        Avx512::detect()
            .map(Self::Avx512)
            .or_else(|| Avx2::detect().map(Self::Avx2))
    }

    /// Every one this CPU has, best first (the kernel tests run each).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut all = Vec::new();
        all.extend(Avx512::detect().map(Self::Avx512));
        all.extend(Avx2::detect().map(Self::Avx2));
        all
    }

    /// The AVX-512 token, where that is the instruction set.
    pub(crate) fn avx512(self) -> Option<Avx512> {
        match self {
            Self::Avx512(cpu) => Some(cpu),
            Self::Avx2(_) => None,
        }
    }
}

/// Proof that the CPU also has AVX-512 BF16 (`vdpbf16ps`), on top of [`Avx512`]'s features.
/// Only [`Avx512::bf16_dot`] makes one; `GPTJ_CPU_BF16_DOT=0` withholds it (for A/B runs
/// against the widening f32 kernel).
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bf16Dot {
    _detected: (),
}

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The bf16 dot-product token where the CPU has AVX-512 BF16, else `None`.
    pub(crate) fn bf16_dot(self) -> Option<Bf16Dot> {
        static DETECTED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
            std::env::var("GPTJ_CPU_BF16_DOT").map_or(true, |v| v != "0")
                && is_x86_feature_detected!("avx512bf16")
        });
        DETECTED.then_some(Bf16Dot { _detected: () })
    }
}

/// Float types that are stored narrow and computed in f32: f32 itself, f16 and bf16.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// `src` as f32: `src` itself for f32, else widened into `buf` (at least as long).
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// `v` rounded to this type.
    fn narrow(v: f32) -> Self;

    /// `src` rounded to this type into `dst` (as long), as `narrow` does each value.
    fn narrow_into(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::narrow(s);
        }
    }

    /// 16 values from `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// `p` points at 16 readable values; the CPU has AVX-512F and F16C (the caller is a
    /// `#[target_feature]` function reached through an [`Avx512`] token).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// 8 values from `p`, widened to f32 lanes.
    ///
    /// # Safety
    /// `p` points at 8 readable values; the CPU has AVX2 and F16C (the caller is a
    /// `#[target_feature]` function reached through an [`Avx2`] or [`Avx512`] token).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    fn as_f32<'a>(src: &'a [Self], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }

    fn narrow(v: f32) -> Self {
        v
    }

    fn narrow_into(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller (16 readable values, AVX-512F).
        unsafe { avx512::load16_f32(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller (8 readable values, AVX).
        unsafe { avx2::load8_f32(p) }
    }
}

impl Elem for f16 {
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        vector::widen_f16(src, buf);
        buf
    }

    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }

    fn narrow_into(src: &[f32], dst: &mut [Self]) {
        // half's slice conversion: F16C where the CPU has it, the same rounding either way.
        half::slice::HalfFloatSliceExt::convert_from_f32_slice(dst, src);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller (16 readable values, AVX-512F and F16C).
        unsafe { avx512::load16_f16(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller (8 readable values, AVX and F16C).
        unsafe { avx2::load8_f16(p) }
    }
}

impl Elem for bf16 {
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        let buf = &mut buf[..src.len()];
        vector::widen_bf16(src, buf);
        buf
    }

    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }

    fn narrow_into(src: &[f32], dst: &mut [Self]) {
        vector::narrow_bf16(src, dst);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller (16 readable values, AVX-512F and BW).
        unsafe { avx512::load16_bf16(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller (8 readable values, AVX2).
        unsafe { avx2::load8_bf16(p) }
    }
}

/// A buffer that the threads of one parallel section write in disjoint parts (the packed
/// products' column groups, attention's runs of heads), which are not contiguous slices and
/// so cannot be handed out with `split_at_mut`.
///
/// It borrows the buffer mutably for `'a`, so the buffer outlives every use, and it knows the
/// buffer's length, so every range it hands out is checked against it. What it cannot check is
/// that two threads never touch the same element at once: that is the one promise left to the
/// `unsafe` callers of [`SharedOut::slice`] and of the pointers from [`SharedOut::ptr`].
pub(crate) struct SharedOut<'a, T> {
    ptr: NonNull<T>,
    len: usize,
    _buf: PhantomData<&'a mut [T]>,
}

// SAFETY: a `SharedOut` stands for `&'a mut [T]` split between threads, each writing its own
// elements (the callers' promise above). Moving `T`s into a buffer from other threads is what
// `&mut [T]: Send` allows, and it asks `T: Send`; sharing `&SharedOut` is how the threads get
// their parts, so `Sync` asks the same.
unsafe impl<T: Send> Send for SharedOut<'_, T> {}
// SAFETY: as for `Send`.
unsafe impl<T: Send> Sync for SharedOut<'_, T> {}

impl<'a, T> SharedOut<'a, T> {
    /// Shares an initialised buffer.
    pub(crate) fn new(buf: &'a mut [T]) -> Self {
        let len = buf.len();
        Self {
            ptr: NonNull::from(buf).cast(),
            len,
            _buf: PhantomData,
        }
    }

    /// Shares a buffer not yet initialised (a `Vec`'s spare capacity): every element must be
    /// written before it is read, and before the owner treats the buffer as initialised.
    pub(crate) fn uninit(buf: &'a mut [MaybeUninit<T>]) -> Self {
        let len = buf.len();
        Self {
            ptr: NonNull::from(buf).cast(),
            len,
            _buf: PhantomData,
        }
    }

    /// A raw pointer to `range` of the buffer (the pointer itself is harmless; what is done
    /// through it is the caller's `unsafe`). Panics if `range` is not inside the buffer.
    pub(crate) fn ptr(&self, range: Range<usize>) -> *mut T {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "SharedOut: {range:?} outside a buffer of {}",
            self.len
        );
        // SAFETY: `range.start <= len`, so the offset stays inside (or one past) the buffer.
        unsafe { self.ptr.as_ptr().add(range.start) }
    }

    /// `range` of the buffer as a slice. Panics if `range` is not inside the buffer.
    ///
    /// # Safety
    /// No other thread reads or writes any element of `range` while the slice lives, and every
    /// element of it has been initialised (a buffer from [`SharedOut::new`] always is).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, range: Range<usize>) -> &mut [T] {
        let len = range.end.saturating_sub(range.start);
        let ptr = self.ptr(range);
        // SAFETY: `ptr` covers `len` elements inside the buffer, which `'a` keeps alive; the
        // caller promises exclusive access and initialised elements.
        unsafe { std::slice::from_raw_parts_mut(ptr, len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_out_hands_out_disjoint_parts_to_threads() {
        let mut buf = vec![0u32; 64];
        let out = SharedOut::new(&mut buf);
        std::thread::scope(|s| {
            for part in 0..4 {
                let out = &out;
                s.spawn(move || {
                    // SAFETY: each thread takes its own quarter.
                    let dst = unsafe { out.slice(part * 16..(part + 1) * 16) };
                    dst.fill(part as u32 + 1);
                });
            }
        });
        let want: Vec<u32> = (0..64).map(|i| i / 16 + 1).collect();
        assert_eq!(buf, want);
    }

    #[test]
    #[should_panic(expected = "outside a buffer")]
    fn shared_out_refuses_a_range_past_the_buffer() {
        let mut buf = vec![0f32; 8];
        let out = SharedOut::new(&mut buf);
        let _ = out.ptr(4..9);
    }

    /// The token costs nothing to carry, and detection hands one out exactly where the CPU
    /// has every feature the kernels are compiled for (this process does not set
    /// `GPTJ_CPU_KERNELS=candle`, or the token is refused whatever the CPU).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_token_is_free_and_only_detection_makes_one() {
        assert_eq!(std::mem::size_of::<Avx512>(), 0);
        assert_eq!(std::mem::size_of::<Amx>(), 0);
        assert_eq!(std::mem::size_of::<Bf16Dot>(), 0);
        let forced_off = std::env::var("GPTJ_CPU_KERNELS").is_ok_and(|v| v == "candle");
        let cpu = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma");
        assert_eq!(Avx512::detect().is_some(), cpu && !forced_off);
    }

    #[test]
    fn elem_round_trips_through_f32() {
        let x = [1.5f32, -2.25, 0.0, 65504.0];
        let h: Vec<f16> = x.iter().map(|&v| f16::narrow(v)).collect();
        let b: Vec<bf16> = x.iter().map(|&v| bf16::narrow(v)).collect();
        let mut buf = [0f32; 4];
        assert_eq!(f16::as_f32(&h, &mut buf), &x);
        let mut buf = [0f32; 4];
        assert_eq!(bf16::as_f32(&b, &mut buf)[..3], x[..3]);
        let mut buf = [0f32; 0];
        assert_eq!(f32::as_f32(&x, &mut buf), &x);
    }
}
