//! A counting wrapper around the global allocator, so `drape bench` can report the model's
//! heap allocations per frame and tests can prove a steady state allocates nothing.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// Bytes allocated and not yet freed, for leak checks over long runs.
static LIVE: AtomicI64 = AtomicI64::new(0);

/// Counts every allocation (and reallocation) before delegating to `A`.
pub struct CountingAlloc<A>(pub A);

// SAFETY: every method hands the caller's arguments to `A` unchanged and returns its answer,
// so `A`'s guarantees are this allocator's; the counting only touches atomics and never
// allocates.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAlloc<A> {
    // SAFETY: the caller's `GlobalAlloc` contract is passed on to `A` as is.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        self.0.alloc(layout)
    }

    // SAFETY: as `alloc`.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        self.0.alloc_zeroed(layout)
    }

    // SAFETY: as `alloc`; `ptr` and `layout` come from the caller, who got them from us.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        self.0.dealloc(ptr, layout)
    }

    // SAFETY: as `dealloc`.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        self.0.realloc(ptr, layout, new_size)
    }
}

/// (allocations, bytes) since process start, on every thread. Zero unless the binary installed
/// [`CountingAlloc`] as its global allocator.
pub fn counts() -> (u64, u64) {
    (
        ALLOCATIONS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

/// Heap bytes allocated and not yet freed, on every thread (0 without [`CountingAlloc`]).
pub fn live_bytes() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Peak resident set size of this process in MiB (`VmHWM`), where the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
