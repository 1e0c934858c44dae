//! The in-memory backend, for tests and benchmarks of the worker's pass without the kernel's
//! UDP path: datagrams are injected with their source ([`super::Engine::inject`]) and copied
//! into pool buffers at the next `complete`, like a receive; sends are counted as taken by the
//! kernel, and QUIC transmits are kept for the test to read back
//! ([`super::Engine::take_transmits`]). The sockets registered are real (unused) UDP sockets;
//! an eventfd stands for the ring or epoll fd, so the engine's `wait` works as usual.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::cmsg::RecvInfo;
use super::pool::{BufRef, Pool};
use super::{message_len, message_lens, Entry, Payload, SendReq, Table};

/// A QUIC transmit as the engine would have handed it to the kernel.
#[derive(Debug)]
pub struct SentTransmit {
    pub dest: SocketAddr,
    pub buf: Vec<u8>,
    /// GSO segment size when `buf` holds several datagrams.
    pub segment: Option<usize>,
}

pub(super) struct Memory {
    efd: OwnedFd,
    free: [Vec<u16>; 2],
    inbox: VecDeque<(u32, u32, SocketAddr, Vec<u8>)>,
    pub transmits: Vec<SentTransmit>,
}

impl Memory {
    pub fn new(pools: &[Pool; 2]) -> io::Result<Memory> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh eventfd that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Memory {
            efd,
            free: [
                (0..pools[0].count()).rev().collect(),
                (0..pools[1].count()).rev().collect(),
            ],
            inbox: VecDeque::new(),
            transmits: Vec::new(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    pub fn free(&self) -> [u16; 2] {
        [self.free[0].len() as u16, self.free[1].len() as u16]
    }

    pub fn pending(&self) -> bool {
        !self.inbox.is_empty()
    }

    pub fn give_back(&mut self, b: BufRef) -> bool {
        self.free[b.group.index()].push(b.bid);
        false
    }

    /// Queues a datagram for socket (`idx`, `gen`) as if it had arrived from `from`.
    pub fn inject(&mut self, idx: u32, gen: u32, from: SocketAddr, data: &[u8]) {
        self.inbox.push_back((idx, gen, from, data.to_vec()));
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer; non-blocking.
        unsafe { libc::write(self.efd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Moves injected datagrams into pool buffers and backlogs, up to the pass budget.
    pub fn receive(&mut self, table: &mut Table, pools: &[Pool; 2]) -> (usize, bool) {
        let mut v = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer; non-blocking.
        unsafe { libc::read(self.efd.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
        let mut n = 0;
        while n < super::PASS_BUDGET {
            let Some((idx, gen, from, data)) = self.inbox.pop_front() else {
                break;
            };
            let Some(g) = table.get(idx, gen).map(|s| s.role.group()) else {
                continue;
            };
            let Some(bid) = self.free[g.index()].pop() else {
                table.stats.receive_paused[g.index()].inc();
                self.inbox.push_front((idx, gen, from, data));
                break;
            };
            let pool = &pools[g.index()];
            let len = data.len().min(pool.buf_size());
            // SAFETY: the buffer was just taken from the free list: nothing else reads or
            // writes it until it is given back.
            unsafe { pool.buf_mut(bid)[..len].copy_from_slice(&data[..len]) };
            n += 1;
            let e = Entry {
                buf: BufRef { group: g, bid },
                off: 0,
                len: len as u32,
                info: RecvInfo::default(),
                addr: Some(from),
            };
            let free = self.free[g.index()].len() as u16;
            if let Some(back) = table.deliver(idx, gen, e, free) {
                self.free[back.group.index()].push(back.bid);
            }
        }
        (n, !self.inbox.is_empty())
    }

    /// "Sends": accounts every message as taken; keeps QUIC transmits for the test.
    pub fn flush(
        &mut self,
        q: &mut Vec<SendReq>,
        table: &mut Table,
        lens: &mut Vec<u32>,
        gso: bool,
    ) -> usize {
        let mut messages = 0;
        let mut i = 0;
        while i < q.len() {
            let n = message_len(&q[i..], gso);
            let reqs = &q[i..i + n];
            i += n;
            message_lens(reqs, lens);
            let first = &reqs[0];
            table.sent(
                first.id.idx,
                first.id.gen,
                first.tag,
                reqs.iter().map(|r| r.payload.as_slice().len()),
            );
            messages += 1;
        }
        for r in q.drain(..) {
            if let Payload::Owned(buf) = r.payload {
                self.transmits.push(SentTransmit {
                    dest: r.dest,
                    buf,
                    segment: (r.segment > 0).then_some(usize::from(r.segment)),
                });
            }
        }
        messages
    }
}
