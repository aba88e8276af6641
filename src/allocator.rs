//! How much freed memory the process keeps: glibc's allocator, told to give back what a large list's parse freed.
//!
//! A replica's peak is its job watch's initial list: one response holding every job in scope, parsed whole, then
//! slimmed into the cache. By default glibc keeps most of what that parse freed (its trim threshold grows with the
//! largest block freed, and every thread may get its own arena of up to 64 MiB), so a replica with 100,000 jobs in
//! scope sat at 192 MiB. A fixed trim threshold (which also keeps large blocks in their own mappings, returned on
//! free) and one arena hold it at 155 MiB, and a small replica at its 25 MiB; mimalloc measured 173 MiB and 55 MiB.
//!
//! Done in the operator's entry point rather than through `MALLOC_*` variables, so that every replica gets it: the
//! `bgjobs` binary, its image, and a team's own worker binary that calls [`crate::operator::run`].
#![allow(unsafe_code)]

/// Freed memory above this much at the heap's top goes back to the system (glibc's `M_TRIM_THRESHOLD`).
const TRIM_THRESHOLD_BYTES: i32 = 128 * 1024;
/// Arenas for the process's threads (glibc's `M_ARENA_MAX`; its default is 8 per core, each keeping its own free
/// memory). One is shared by all; the per-thread caches keep most small allocations off its lock, and a replica's
/// work is network-bound.
const ARENA_MAX: i32 = 1;

/// Apply the settings above; a no-op where the C library is not glibc.
pub(crate) fn keep_little_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (integers); it is safe to call at any time, from any thread.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}
