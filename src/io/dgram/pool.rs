//! The worker's receive buffer pools: one allocation per pool, made at start, carved into
//! fixed-size buffers named by a 16-bit id (the id io_uring's provided-buffer ring hands back).
//!
//! A buffer belongs to exactly one owner at a time: the kernel (queued in the provided-buffer
//! ring, or handed to `recvmmsg`), a socket's backlog of received datagrams, or a
//! [`super::Received`] guard while its datagram is processed. The pool itself never moves or
//! frees its memory while the engine lives, so a pointer given to the kernel stays valid.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Which pool a buffer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Target sockets: one datagram per buffer.
    Target = 0,
    /// The QUIC socket: a GRO train per buffer.
    Quic = 1,
}

impl Group {
    pub const ALL: [Group; 2] = [Group::Target, Group::Quic];

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A buffer id within a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufRef {
    pub group: Group,
    pub bid: u16,
}

/// Fixed-size buffers in one page-aligned allocation.
#[derive(Debug)]
pub struct Pool {
    base: NonNull<u8>,
    layout: Layout,
    buf_size: usize,
    count: u16,
}

impl Pool {
    /// `count` buffers of `buf_size` bytes (rounded up to 64). `count` is at most 32768, the
    /// most a provided-buffer ring holds.
    pub fn new(buf_size: usize, count: u16) -> Pool {
        assert!(count > 0 && count <= 32_768, "pool of {count} buffers");
        let buf_size = buf_size.next_multiple_of(64);
        let layout = Layout::from_size_align(buf_size * count as usize, 4096)
            .expect("pool layout: size fits in isize");
        // SAFETY: the layout has a non-zero size (count > 0, buf_size >= 64).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Pool {
            base,
            layout,
            buf_size,
            count,
        }
    }

    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// The address of buffer `bid`, for the kernel.
    pub fn addr(&self, bid: u16) -> *mut u8 {
        assert!(bid < self.count);
        // SAFETY: bid < count, so the offset stays inside the allocation.
        unsafe { self.base.as_ptr().add(bid as usize * self.buf_size) }
    }

    /// Buffer `bid` for reading what the kernel wrote into it.
    ///
    /// # Safety
    /// The caller owns the buffer: it is neither queued to the kernel nor borrowed mutably.
    pub unsafe fn buf(&self, bid: u16) -> &[u8] {
        // SAFETY: in bounds (see `addr`); the caller guarantees nobody writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.addr(bid), self.buf_size) }
    }
}

impl Pool {
    /// Buffer `bid` for writing (the in-memory backend plays the kernel).
    ///
    /// # Safety
    /// The caller owns the buffer: it is neither queued to the kernel nor borrowed elsewhere.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn buf_mut(&self, bid: u16) -> &mut [u8] {
        // SAFETY: in bounds (see `addr`); the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.addr(bid), self.buf_size) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. The engine drops its pools only after
        // the kernel has given back every buffer (or leaks them when it could not make sure).
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
    }
}
