//! The C heap's settings for a process that allocates and frees the same buffers every step.
//!
//! A CPU step allocates every intermediate tensor afresh (candle's ops return new storage)
//! and frees it before the next: tens of megabytes at batch 64. glibc's defaults hand buffers
//! of more than its dynamic threshold straight to `mmap` and give freed memory at the top of
//! the heap back to the kernel, so every step faulted its buffers in again, page by zeroed
//! page: about 6,000 page faults a step on `small` at batch 64, a tenth of the step's time
//! (`perf stat -e page-faults` on `cargo bench --bench decode`; none a step after this).
//!
//! After the model has loaded, [`keep_step_buffers`] returns what loading left free, then
//! serves buffers up to [`MMAP_THRESHOLD`] from the heap and keeps up to [`TRIM_THRESHOLD`]
//! of freed heap for the next step. An operator's own `MALLOC_MMAP_THRESHOLD_` or
//! `MALLOC_TRIM_THRESHOLD_` (glibc's variables) wins: then nothing is changed.

/// Buffers up to this size come from the heap: glibc's largest allowed threshold on 64-bit
/// (half its 64 MiB heap size), above a batch-64 step's largest buffer on `small` (the
/// logits, 12.9 MB).
pub(crate) const MMAP_THRESHOLD: usize = 32 << 20;
/// Freed heap kept for reuse: more than a step's working set, so that the memory a step
/// frees is still there for the next one. What the process holds beyond its live data is
/// bounded by this.
pub(crate) const TRIM_THRESHOLD: usize = 512 << 20;

/// Sets the heap up for per-step buffers (once per process; later calls do nothing). glibc
/// on Linux only: elsewhere, under Miri, or where the operator set glibc's variables, it
/// leaves the allocator as it is.
pub(crate) fn keep_step_buffers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let operator_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
            .iter()
            .any(|v| std::env::var_os(v).is_some());
        if operator_set {
            tracing::info!("MALLOC_*_THRESHOLD_ set: the heap keeps the operator's settings");
            return;
        }
        tune();
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu", not(miri)))]
fn tune() {
    // SAFETY: `malloc_trim` and `mallopt` only change how glibc's allocator manages its own
    // free memory; no live allocation is touched, and both are thread-safe.
    let (mmap, trim) = unsafe {
        libc::malloc_trim(0);
        (
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int),
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int),
        )
    };
    if mmap != 1 || trim != 1 {
        tracing::warn!("glibc refused the heap settings for per-step buffers; steps will fault their buffers in");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(miri))))]
fn tune() {}
