//! A counting wrapper around the global allocator, so `drape bench` can report the model's
//! heap allocations per frame and tests can prove a steady state allocates nothing.
//!
//! Each allocation is booked to an [`Account`]: the model's (made while a thread is inside a
//! model [`Scope`], which `MaskRcnn::detect_into` enters for its tensor work, or on a rayon
//! worker while any thread is: candle and gemm run their parallel parts there), the preview
//! encoder's (the `image` crate's JPEG encoder, inside an encoder [`Scope`]), or drape's own,
//! everything else, which a steady state must keep at zero.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

/// Whose code an allocation is booked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Account {
    /// candle's tensors and gemm's packing buffers during a forward pass.
    Model = 1,
    /// The `image` crate's JPEG encoder, for the live preview.
    Encoder = 2,
}

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// The parts of `ALLOCATIONS` booked to each [`Account`], by its value.
static BOOKED: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
/// Bytes allocated and not yet freed, for leak checks over long runs.
static LIVE: AtomicI64 = AtomicI64::new(0);
/// Threads inside a model [`Scope`] now.
static IN_MODEL_THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The [`Account`] this thread books to now (0: drape's own). A const-initialised `Cell`
    /// needs no allocation and no destructor, so the allocator may read it at any time.
    static ACCOUNT: Cell<u8> = const { Cell::new(0) };
}

/// Books the allocations of the thread that holds it to `account` until it is dropped (for
/// the model, rayon's workers' too meanwhile). Scopes nest; the innermost wins.
pub struct Scope {
    previous: u8,
}

impl Scope {
    pub fn enter(account: Account) -> Self {
        let previous = ACCOUNT.with(|a| a.replace(account as u8));
        if account == Account::Model {
            IN_MODEL_THREADS.fetch_add(1, Ordering::Relaxed);
        }
        Self { previous }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let left = ACCOUNT.with(|a| a.replace(self.previous));
        if left == Account::Model as u8 {
            IN_MODEL_THREADS.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The account an allocation made now on this thread is booked to (0: drape's own).
fn account() -> u8 {
    match ACCOUNT.with(Cell::get) {
        0 if rayon::current_thread_index().is_some()
            && IN_MODEL_THREADS.load(Ordering::Relaxed) > 0 =>
        {
            Account::Model as u8
        }
        a => a,
    }
}

fn book(bytes: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    BOOKED[account() as usize].fetch_add(1, Ordering::Relaxed);
}

/// Counts every allocation (and reallocation) before delegating to `A`.
pub struct CountingAlloc<A>(pub A);

// SAFETY: every method hands its arguments to `A` unchanged and returns what `A` returns; the
// bookkeeping beside it touches only atomics and a const-initialised thread-local, so it can
// neither allocate (recursing into this allocator) nor unwind.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAlloc<A> {
    // SAFETY: the caller's `GlobalAlloc` contract is passed on to `A` as is.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        book(layout.size());
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        self.0.alloc(layout)
    }

    // SAFETY: as `alloc`.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        book(layout.size());
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
        book(new_size);
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

/// Allocations since process start booked to `account`, on every thread.
pub fn booked(account: Account) -> u64 {
    BOOKED[account as usize].load(Ordering::Relaxed)
}

/// Allocations since process start booked to no [`Account`]: drape's own.
pub fn own_allocations() -> u64 {
    BOOKED[0].load(Ordering::Relaxed)
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
