//! Transparent huge pages for the large CPU buffers a decode step sweeps: the packed weights
//! and the KV cache.
//!
//! A step reads every head's rows of every cached position; with 4 KiB pages that is a page
//! walk every couple of positions once the cache outgrows the TLB. Where the kernel hands out
//! huge pages only on request (`transparent_hugepage=madvise`, the common default), this asks.
//! It is advice: where huge pages are off or unavailable nothing changes.

use candle_core::{DType, Device, Result, Tensor};
use half::{bf16, f16};

const HUGE_PAGE: usize = 2 << 20;

/// Advises huge pages for the whole 2 MiB pages inside `start..start + len`, an allocation
/// not yet touched (pages already faulted in stay small until the kernel collapses them).
fn advise_range(start: usize, len: usize) {
    // Not under Miri, which has no `madvise` (and no pages to back).
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        let end = start + len;
        let (first, last) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        if last > first {
            // SAFETY: the range lies inside the caller's allocation (`first >= start`,
            // `last <= end`); MADV_HUGEPAGE changes no contents, only how the kernel backs the
            // pages.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    let _ = (start, len);
}

/// `vec![value; len]`, advised onto huge pages before it is first written.
pub(crate) fn filled_vec<T: Clone>(value: T, len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // Only the address range is used, never the (uninitialised) contents.
    advise_range(v.as_ptr() as usize, len * std::mem::size_of::<T>());
    v.resize(len, value);
    v
}

/// A zeroed CPU tensor on huge pages; other devices get a plain `Tensor::zeros`.
pub(crate) fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    if !device.is_cpu() {
        return Tensor::zeros(shape, dtype, device);
    }
    let n: usize = shape.iter().product();
    match dtype {
        DType::F32 => Tensor::from_vec(filled_vec(0f32, n), shape, device),
        DType::F16 => Tensor::from_vec(filled_vec(f16::ZERO, n), shape, device),
        DType::BF16 => Tensor::from_vec(filled_vec(bf16::ZERO, n), shape, device),
        _ => Tensor::zeros(shape, dtype, device),
    }
}
