//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps freed blocks in per-thread arenas for reuse, so after a burst of
//! large requests (prompts, echoed streams) the process's RSS stays near its peak although
//! nothing holds that memory. [`release_free_memory`] asks it to return what is free; the
//! server calls it after tokenizing large inputs and every few seconds (`serve`).

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
