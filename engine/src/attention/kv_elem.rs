//! The element types of a KV cache ([`KvElem`]) and how the attention ops read one head's row
//! of a slot in each: the float types' rows are their values, an int8 row is `head_dim`
//! signed bytes followed by its f32 scale (see [`KvFormat::Int8`](crate::KvFormat)).
//!
//! The int8 kernels multiply the scale in once per row, after the query-key sum and into the
//! value's softmax weight, instead of widening every byte to its value first: the same
//! instruction count per element as f16's widening, on half the bytes.

use crate::cpu::Elem;
use crate::precision::KvFormat;

/// An element type of a KV cache: f32, f16 and bf16 (rows of values) or `u8` (int8 rows:
/// bytes read as `i8`, then the scale).
pub(crate) trait KvElem: Copy + Send + Sync + 'static {
    /// Whether rows carry a scale after their values: the kernels multiply by it only then.
    const SCALED: bool;

    /// Elements of a row of `head_dim` values.
    fn row_len(head_dim: usize) -> usize {
        if Self::SCALED {
            KvFormat::Int8.row_len(head_dim)
        } else {
            head_dim
        }
    }

    /// The values of `row` (`row_len(head_dim)` elements) as f32, scaled: `row` itself is
    /// not, so they go into `buf` (at least `head_dim` long) unless the type is f32.
    fn values<'a>(row: &'a [Self], head_dim: usize, buf: &'a mut [f32]) -> &'a [f32];

    /// The scale of the row at `row` (1 for the float types).
    ///
    /// # Safety
    /// `row` points at `row_len(head_dim)` readable elements.
    unsafe fn scale(row: *const Self, head_dim: usize) -> f32;

    /// 16 values from `p`, widened to f32 lanes (unscaled).
    ///
    /// # Safety
    /// As [`Elem::load16`]: `p` points at 16 readable values, and the CPU has AVX-512F and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// 8 values from `p`, widened to f32 lanes (unscaled).
    ///
    /// # Safety
    /// As [`Elem::load8`]: `p` points at 8 readable values, and the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl<T: Elem> KvElem for T {
    const SCALED: bool = false;

    fn values<'a>(row: &'a [Self], head_dim: usize, buf: &'a mut [f32]) -> &'a [f32] {
        T::as_f32(&row[..head_dim], buf)
    }

    unsafe fn scale(_row: *const Self, _head_dim: usize) -> f32 {
        1.0
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller.
        unsafe { T::load16(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller.
        unsafe { T::load8(p) }
    }
}

impl KvElem for u8 {
    const SCALED: bool = true;

    fn values<'a>(row: &'a [Self], head_dim: usize, buf: &'a mut [f32]) -> &'a [f32] {
        let scale = row_scale(row, head_dim);
        let buf = &mut buf[..head_dim];
        for (b, &q) in buf.iter_mut().zip(&row[..head_dim]) {
            *b = f32::from(q as i8) * scale;
        }
        buf
    }

    #[inline(always)]
    unsafe fn scale(row: *const Self, head_dim: usize) -> f32 {
        // SAFETY: the row's last 4 elements are its scale (the caller's promise that the row
        // is readable); an unaligned read of 4 bytes.
        let bytes = unsafe { std::ptr::read_unaligned(row.add(head_dim) as *const [u8; 4]) };
        f32::from_le_bytes(bytes)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller (16 readable bytes, AVX-512F).
        unsafe { crate::cpu::avx512::load16_i8(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: forwarded from the caller (8 readable bytes, AVX2).
        unsafe { crate::cpu::avx2::load8_i8(p) }
    }
}

/// The scale of an int8 row (`head_dim + 4` bytes).
fn row_scale(row: &[u8], head_dim: usize) -> f32 {
    let mut bytes = [0u8; KvFormat::INT8_SCALE_BYTES];
    bytes.copy_from_slice(&row[head_dim..head_dim + KvFormat::INT8_SCALE_BYTES]);
    f32::from_le_bytes(bytes)
}

/// One token's keys or values (`src`: `heads` rows of `head_dim` f32 values) as int8 rows
/// into `dst` (`heads` rows of `head_dim + 4` bytes): each row scaled by its own largest
/// magnitude, so that it maps to 127, and rounded to the nearest byte. A row of zeros gets a
/// scale of zero. Deterministic, and each row depends on nothing else, so a token's rows are
/// the same in any batch.
pub(crate) fn quantize_rows(src: &[f32], dst: &mut [u8], head_dim: usize) {
    let row = KvFormat::Int8.row_len(head_dim);
    for (values, out) in src.chunks_exact(head_dim).zip(dst.chunks_exact_mut(row)) {
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (scale, inv) = if max > 0.0 {
            (max / 127.0, 127.0 / max)
        } else {
            (0.0, 0.0)
        };
        let (bytes, scale_bytes) = out.split_at_mut(head_dim);
        for (b, &v) in bytes.iter_mut().zip(values) {
            *b = round_to_i8(v * inv) as u8;
        }
        scale_bytes.copy_from_slice(&scale.to_le_bytes());
    }
}

/// `x.round().clamp(-127.0, 127.0) as i8` (to nearest, halves away from zero; NaN to 0),
/// in integer steps a compiler turns into vector code: `f32::round` is a call into libm on
/// x86_64 without SSE4.1, which took 3% of an int8 prefill. Past ±128 everything ends at
/// ±127 either way, so `x` is first clamped there (NaN stays NaN); then `as i32` truncates
/// toward zero (NaN to 0), and the part it dropped, `x - t`, is exact, so comparing it with
/// one half decides the rounding exactly.
#[inline(always)]
fn round_to_i8(x: f32) -> i8 {
    let x = x.clamp(-128.0, 128.0);
    let t = x as i32;
    let dropped = x - t as f32;
    let r = t + i32::from(dropped >= 0.5) - i32::from(dropped <= -0.5);
    r.clamp(-127, 127) as i8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `round_to_i8` is `round`, `clamp` and `as` on halves, the floats either side of them,
    /// the ends of the range, beyond it, and NaN and the infinities.
    #[test]
    fn rounding_to_bytes_matches_round() {
        let mut xs = vec![
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            3e9,
            -3e9,
        ];
        for i in -260..=260 {
            let half = i as f32 * 0.5;
            xs.extend([half, half.next_up(), half.next_down()]);
        }
        xs.extend((0..10_000).map(|i| (i as f32 * 0.0371).sin() * 130.0));
        for x in xs {
            let want = x.round().clamp(-127.0, 127.0) as i8;
            assert_eq!(round_to_i8(x), want, "{x} ({:#x})", x.to_bits());
        }
    }

    #[test]
    fn int8_rows_round_trip_within_half_a_step() {
        let dim = 8;
        let src: Vec<f32> = (0..2 * dim).map(|i| (i as f32 - 5.0) * 0.37).collect();
        let mut zero = vec![0f32; dim];
        let mut rows = vec![0u8; 2 * (dim + 4)];
        quantize_rows(&src, &mut rows, dim);
        for (h, values) in src.chunks(dim).enumerate() {
            let row = &rows[h * (dim + 4)..(h + 1) * (dim + 4)];
            let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            // SAFETY: `row` is a whole row.
            assert_eq!(unsafe { u8::scale(row.as_ptr(), dim) }, max / 127.0);
            let got = u8::values(row, dim, &mut zero).to_vec();
            for (g, v) in got.iter().zip(values) {
                assert!((g - v).abs() <= max / 254.0 * 1.0001, "{g} vs {v}");
            }
            assert!(got.iter().any(|g| (g.abs() - max).abs() < 1e-6));
        }
        let mut rows = vec![1u8; dim + 4];
        quantize_rows(&vec![0f32; dim], &mut rows, dim);
        assert!(rows.iter().all(|&b| b == 0), "zeros stay zeros, scale 0");
        assert_eq!(<u8 as KvElem>::row_len(dim), dim + 4);
        assert_eq!(<f32 as KvElem>::row_len(dim), dim);
    }
}
