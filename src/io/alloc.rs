//! An allocator wrapper that counts allocations. A test installs it as the global allocator
//! of its own binary to show that the relay's data path makes no heap allocation per datagram
//! in steady state; the relay binary itself uses mimalloc directly.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Counts every allocation (and reallocation) made through `A`.
#[derive(Debug)]
pub struct Counting<A>(pub A);

/// Allocations and reallocations so far, process-wide.
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Relaxed)
}

// SAFETY: every method forwards to `A` with the same arguments, so `A`'s guarantees hold; the
// counter is a plain atomic that never allocates.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: forwarded with the caller's layout (the caller upholds alloc's contract).
        unsafe { self.0.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: as for alloc.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator (so from `A`) with `layout`.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: `ptr` came from `A` with `layout`; the caller upholds realloc's contract.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}
