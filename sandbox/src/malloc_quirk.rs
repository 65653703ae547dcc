//! glibc's malloc opens `/proc/sys/vm/overcommit_memory` the first time it shrinks the heap of
//! a thread arena (`shrink_heap` → `check_may_shrink_heap`, cached in a static afterwards). In
//! a sandboxed worker thread that `openat` would be killed by seccomp. [`prewarm`] makes glibc
//! take that branch once, from a short-lived thread, while `/proc` is still there.

/// How long to wait for the helper thread to leave the thread group (it is gone from
/// `pthread_join`'s point of view slightly before the kernel removes it).
const SETTLE_POLLS: u32 = 2000;

/// Grows and shrinks a fresh thread arena so that glibc caches its overcommit setting, then
/// waits until the process is single-threaded again. A no-op outside glibc.
pub fn prewarm() {
    if !cfg!(target_env = "gnu") {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("sandbox-prewarm".into())
        .spawn(|| {
            // Below the mmap threshold, so they come from the thread's arena heap; freeing
            // them leaves a top chunk above the trim threshold: heap_trim shrinks the heap.
            let blocks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 100 << 10]).collect();
            std::hint::black_box(&blocks);
        });
    if let Ok(handle) = spawned {
        let _ = handle.join();
    }
    for _ in 0..SETTLE_POLLS {
        if crate::namespaces::thread_count().map_or(true, |n| n <= 1) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}
