//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps freed blocks in per-thread arenas for reuse, so after a burst of
//! large requests (prompts, echoed streams) the process's RSS stays near its peak although
//! nothing holds that memory. [`release_free_memory`] asks it to return what is free; the
//! server calls it after tokenizing large inputs and every few seconds (`serve`).
//!
//! glibc also opens a new arena whenever threads contend, up to eight per core, and each
//! keeps its own free lists and top chunk: the RSS after a burst then depends on how many
//! arenas the burst happened to touch (measured: 30 MiB more after one burst of 8 large
//! prompts than after the next). [`limit_arenas`] caps them at one per core before any
//! thread starts, which makes the settled RSS repeatable; an operator's `MALLOC_ARENA_MAX`
//! takes precedence.
//!
//! The engine sets the heap's other two tunables for its step buffers once the model has
//! loaded (`gptj_engine`'s `heap.rs`: buffers up to 32 MiB from the heap, 512 MiB of freed
//! heap kept). A trim here returns those buffers too; the next step faults them back in, once
//! every few seconds instead of every step.

/// Caps glibc's malloc arenas at one per core (at least 2), unless `MALLOC_ARENA_MAX` is set.
/// Call it before the first thread is spawned: arenas that exist are not merged.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let arenas = libc::c_int::try_from(cores.max(2)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` only changes an allocator tunable; `M_ARENA_MAX` with a positive
    // value is a documented setting, valid at any time (it bounds arenas created later).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// Other allocators manage their own arenas.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas() {}

/// Asks the allocator to give its free memory back to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free_memory() {
    // SAFETY: `malloc_trim` has no preconditions: glibc documents it as safe to call at any
    // time from any thread (it takes each arena's lock), and it only releases memory that is
    // free, so no live allocation is affected.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}
