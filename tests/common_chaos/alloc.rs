//! A global allocator that counts live heap bytes and their peak, for the memory invariant.
//!
//! The `#[global_allocator]` static lives in the test binary (`tests/chaos.rs`); this module
//! only holds the type and the counters it updates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// Forwards to the system allocator and counts the bytes it hands out and takes back.
pub struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the wrapper only updates
// two atomic counters (no allocation, no thread-local state). Counting heap bytes needs a
// global allocator, and that trait is unsafe to implement; the crate itself forbids unsafe
// code. `realloc` keeps the default implementation, which goes through `alloc` and `dealloc`.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live =
                LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed) + layout.size() as isize;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Heap bytes allocated and not yet freed, in the whole process.
pub fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Starts a new peak measurement at the current live size.
pub fn reset_peak() {
    PEAK.store(live(), Ordering::Relaxed);
}

/// The largest live size since the last [`reset_peak`].
pub fn peak() -> isize {
    PEAK.load(Ordering::Relaxed)
}

/// Bytes as MiB, for the summary.
pub fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
