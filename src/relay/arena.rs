//! Per-worker byte arenas for the `Bytes` quinn-proto takes: received packets (decrypted in
//! place) and DATAGRAM payloads to clients are carved out of one 64 KiB block at a time, so
//! neither costs an allocation per datagram. A block is reused in place once every slice of it
//! has been dropped; otherwise the next block is allocated (once per block, not per datagram).

use std::cell::RefCell;

use bytes::BytesMut;

const BLOCK: usize = 64 * 1024;

/// One arena: slices are split off the front of the current block.
#[derive(Debug, Default)]
pub(crate) struct Arena {
    buf: BytesMut,
}

impl Arena {
    /// A buffer of `len` bytes written by `fill`, split off the arena.
    pub fn take(&mut self, len: usize, fill: impl FnOnce(&mut BytesMut)) -> BytesMut {
        if self.buf.capacity() < len {
            // Reclaims the block when nothing refers to it any more, else starts a new one.
            self.buf.reserve(BLOCK.max(len));
        }
        fill(&mut self.buf);
        self.buf.split()
    }
}

thread_local! {
    static ARENAS: RefCell<[Arena; 2]> = RefCell::new(Default::default());
}

/// Which of the worker's arenas.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Use {
    /// Packets from clients, until quinn-proto is done with them.
    Rx = 0,
    /// Encoded DATAGRAM payloads, until quinn-proto has sent them.
    Tx = 1,
}

/// [`Arena::take`] on this worker's arena for `u`.
pub(crate) fn take(u: Use, len: usize, fill: impl FnOnce(&mut BytesMut)) -> BytesMut {
    ARENAS.with_borrow_mut(|a| a[u as usize].take(len, fill))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_blocks_and_blocks_are_reused() {
        let mut a = Arena::default();
        let x = a.take(100, |b| b.extend_from_slice(&[1; 100])).freeze();
        let y = a.take(100, |b| b.extend_from_slice(&[2; 100])).freeze();
        assert_eq!((&x[..], &y[..]), (&[1u8; 100][..], &[2u8; 100][..]));
        // Same block: y starts where x ends.
        assert_eq!(x.as_ptr() as usize + 100, y.as_ptr() as usize);
        let block = x.as_ptr();
        drop((x, y));
        // Fill the block to its end; with nothing else alive the next take reuses it.
        let rest = a.buf.capacity();
        drop(a.take(rest, |b| b.extend_from_slice(&vec![3; rest])));
        let z = a.take(10, |b| b.extend_from_slice(&[4; 10]));
        assert_eq!(
            z.as_ptr(),
            block,
            "the block was reclaimed, not reallocated"
        );
    }
}
