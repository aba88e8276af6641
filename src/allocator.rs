//! How much freed memory the process keeps: glibc's allocator, told to give back what a large list's parse freed.
//!
//! A replica's peak is its job watch's initial list: one response holding every job in scope, parsed whole, then
//! slimmed into the cache. By default glibc keeps most of what that parse freed (its trim threshold grows with the
//! largest block freed, and every thread may get its own arena of up to 64 MiB), so a replica with 100,000 jobs in
//! scope sat at 192 MiB. A fixed trim threshold (which also keeps large blocks in their own mappings, returned on
//! free) and one arena hold it at 155 MiB, and a small replica at its 25 MiB; mimalloc measured 173 MiB and 55 MiB.
//!
//! A call, not `MALLOC_*` variables, so that the binary gets it however it is started; and a call the binary makes,
//! not the operator's entry point, because it must come before any thread allocates (a thread keeps the arena it
//! got) and because a team's own worker binary may want its allocator left alone.

/// Freed memory above this much at the heap's top goes back to the system (glibc's `M_TRIM_THRESHOLD`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD_BYTES: i32 = 128 * 1024;
/// Arenas for the process's threads (glibc's `M_ARENA_MAX`; its default is 8 per core, each keeping its own free
/// memory). One is shared by all; the per-thread caches keep most small allocations off its lock, and a replica's
/// work is network-bound.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: i32 = 1;

/// Tell glibc's allocator to give back what large transient allocations freed (see the module docs). Call it first
/// thing in `main`, before the async runtime starts its threads; the `bgjobs` binary does. A no-op where the C
/// library is not glibc.
#[allow(unsafe_code)]
pub fn keep_little_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (integers); it is safe to call at any time, from any thread.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}
