//! The worker's receive buffer pools: one allocation per pool, made at start, carved into
//! fixed-size buffers named by a 16-bit id (the id io_uring's provided-buffer ring hands back).
//!
//! A buffer belongs to exactly one owner at a time: the kernel (queued in the provided-buffer
//! ring, or handed to `recvmmsg`), a socket's backlog of received datagrams, or a
//! [`super::Received`] guard while its datagram is processed. The pool itself never moves or
//! frees its memory while the engine lives, so a pointer given to the kernel stays valid.
//!
//! The memory is mapped straight from the kernel, not taken from the allocator, and kept out of
//! transparent huge pages: a page becomes resident when a datagram first lands in it, so a pool
//! costs what its traffic touches (a 64-byte datagram: one 4 KiB page of its 64 KiB buffer),
//! not 2 MiB for the first datagram in each huge-page-sized stretch (mimalloc asks for huge
//! pages on its arenas).

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
    len: usize,
    buf_size: usize,
    count: u16,
}

impl Pool {
    /// `count` buffers of `buf_size` bytes (rounded up to 64). `count` is at most 32768, the
    /// most a provided-buffer ring holds.
    pub fn new(buf_size: usize, count: u16) -> Pool {
        assert!(count > 0 && count <= 32_768, "pool of {count} buffers");
        let buf_size = buf_size.next_multiple_of(64);
        let len = buf_size * count as usize;
        // SAFETY: an anonymous private mapping of a non-zero length (count > 0, buf_size >= 64)
        // at an address the kernel picks: it aliases nothing; zero-filled, page-aligned.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "mapping a {len}-byte buffer pool: {}",
            std::io::Error::last_os_error()
        );
        // Only a hint (a kernel without THP refuses it): nothing to do if it fails.
        // SAFETY: the range is the mapping just made.
        let _ = unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null here");
        Pool {
            base,
            len,
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
        // SAFETY: mapped in `new` with this length. The engine drops its pools only after the
        // kernel has given back every buffer (or leaks them when it could not make sure).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
