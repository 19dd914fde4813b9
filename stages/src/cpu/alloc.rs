//! How the CPU engine's process asks the C allocator to keep freed memory.
//!
//! A training step allocates and frees a few hundred activation and gradient buffers of
//! 0.1-10 MiB. With glibc's defaults the worker threads' arenas hand those pages back to the
//! kernel when they are freed (heap trimming, and `mmap` for the larger ones), and the next
//! step faults every page in again and the kernel zeroes it: on the shipped studies' model a
//! LoRA step took 551k page faults and a fifth of its time in the kernel (BENCHMARKS.md).
//! Keeping the pages in one arena removes that. Memory is still returned at exit; the peak
//! resident size does not change (the same buffers are live at the peak either way).
//!
//! Written by hand because it is three `mallopt` calls; a replacement allocator (mimalloc,
//! jemalloc) would do the same with a C build and its own purge tuning.

/// Makes freed heap memory stay with the process: one arena, no trimming, `mmap` only for
/// blocks over 32 MiB (glibc's ceiling for the threshold). The train and eval stages call it
/// as they start (each stage has its worker process to itself); not the data stages: the
/// tokenizer's trainer, many small allocations on every thread, took 8 s instead of 2 with
/// one arena. A no-op where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before the process
    // starts the threads that allocate heavily, and glibc serializes it with allocation.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
