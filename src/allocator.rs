//! The memory allocator the `bgjobs` binary runs on: jemalloc.
//!
//! A replica holds every job in scope in its cache, so its heap grows with the backlog (210–230 MiB at 100,000
//! jobs), and every watch event allocates and frees a few dozen small blocks next to those long-lived ones. glibc's
//! allocator keeps freed blocks on free lists that it walks and coalesces: in a 215 MiB heap that work took a
//! quarter more of a replica's CPU for the same events than at 10,000 jobs (`unlink_chunk` alone went from 2.5 % to
//! 10.6 % of the samples; docs/benchmarks.md, run 10), so the cost per job grew with the backlog. jemalloc serves
//! small blocks from slabs of one size class, so a free never searches or coalesces, whatever the heap's size.
//!
//! A type the binaries name as their `#[global_allocator]`, not one the library sets: a team's own worker binary
//! that links the library keeps whatever allocator it chose.

/// The global allocator of the `bgjobs` binary (and of the test worker, so that the benchmarks measure the
/// product's): `#[global_allocator] static GLOBAL: Jemalloc = Jemalloc;`.
#[cfg(not(target_env = "msvc"))]
pub use tikv_jemallocator::Jemalloc;
