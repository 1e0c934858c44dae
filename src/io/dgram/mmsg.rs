//! The fallback backend, for kernels or sandboxes without a usable io_uring: an epoll instance
//! (edge-triggered) says which sockets are readable, `recvmmsg` reads batches into the same
//! pool buffers, `sendmmsg` sends each run of queued messages to one socket in one call, with
//! the same GSO and GRO control messages as the io_uring backend.
//!
//! Edge-triggered readiness is kept in the engine's own ready list: a socket stays on it until
//! a read returns EAGAIN, so a socket left unread because of the per-pass budget is read again
//! at the next pass without the kernel having to say so twice.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::cmsg::{self, CmsgBuf};
use super::pool::{BufRef, Group, Pool};
use super::{
    message_len, message_lens, words_as_bytes, Entry, IoDrop, MsgStore, Payload, Role, SendReq,
    Table,
};

/// Datagrams per recvmmsg and messages per sendmmsg.
const BATCH: usize = 32;
/// Datagrams read from one socket per pass before the others get a turn.
const PER_SOCKET: usize = 64;

/// What a socket read left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    Drained,
    Budget,
    NoBuffers,
}

fn key(idx: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(idx)
}

pub(super) struct Poller {
    epfd: OwnedFd,
    events: Vec<libc::epoll_event>,
    ready: VecDeque<(u32, u32)>,
    free: [Vec<u16>; 2],
    rx_hdrs: Vec<libc::mmsghdr>,
    rx_iov: Vec<libc::iovec>,
    rx_names: Vec<[u32; 8]>,
    rx_ctrl: Vec<CmsgBuf>,
    rx_bids: Vec<u16>,
    tx_store: Vec<MsgStore>,
    tx_hdrs: Vec<libc::mmsghdr>,
    /// (first request, request count) of each message in the current sendmmsg batch.
    tx_msgs: Vec<(usize, usize)>,
    /// A read found the pool empty: the next buffer given back asks for a pass.
    starved: bool,
}

fn empty_mmsghdr() -> libc::mmsghdr {
    libc::mmsghdr {
        msg_hdr: super::empty_msghdr(),
        msg_len: 0,
    }
}

/// `msg_controllen` is a `size_t` on glibc and a `socklen_t` on musl.
#[allow(clippy::useless_conversion)]
fn control_len(h: &libc::msghdr) -> usize {
    usize::try_from(h.msg_controllen).unwrap_or(0)
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl Poller {
    pub fn new(pools: &[Pool; 2]) -> io::Result<Poller> {
        // SAFETY: epoll_create1 takes no pointers; the returned fd is checked below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh epoll fd that nothing else owns.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Poller {
            epfd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 256],
            ready: VecDeque::with_capacity(256),
            free: [
                (0..pools[0].count()).rev().collect(),
                (0..pools[1].count()).rev().collect(),
            ],
            rx_hdrs: (0..BATCH).map(|_| empty_mmsghdr()).collect(),
            rx_iov: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            rx_names: vec![[0; 8]; BATCH],
            rx_ctrl: vec![[0; 16]; BATCH],
            rx_bids: vec![0; BATCH],
            tx_store: (0..BATCH).map(|_| MsgStore::new()).collect(),
            tx_hdrs: (0..BATCH).map(|_| empty_mmsghdr()).collect(),
            tx_msgs: Vec::with_capacity(BATCH),
            starved: false,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }

    /// Sockets left unread by the pass budget wait (not those waiting for buffers: a buffer
    /// given back clears `starved`).
    pub fn pending(&self) -> bool {
        !self.ready.is_empty() && !self.starved
    }

    pub fn free(&self) -> [u16; 2] {
        [self.free[0].len() as u16, self.free[1].len() as u16]
    }

    /// Returns a buffer to the free list; true when a read waits for buffers.
    pub fn give_back(&mut self, b: BufRef) -> bool {
        self.free[b.group.index()].push(b.bid);
        std::mem::take(&mut self.starved)
    }

    pub fn add(&mut self, table: &mut Table, idx: u32) -> io::Result<()> {
        let Some(s) = table.slots.get_mut(idx as usize) else {
            return Ok(());
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLET) as u32,
            u64: key(idx, s.gen),
        };
        // SAFETY: `ev` is a live local the kernel copies; both fds are open.
        let rc = unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                s.sock.as_raw_fd(),
                &mut ev,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn remove(&mut self, table: &Table, idx: u32) {
        if let Some(s) = table.slots.get(idx as usize) {
            // SAFETY: no pointer is passed for EPOLL_CTL_DEL (allowed since Linux 2.6.9).
            unsafe {
                libc::epoll_ctl(
                    self.epfd.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    s.sock.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
    }

    /// Reads readable sockets into pool buffers and their backlogs, up to the pass budget.
    /// Returns (datagrams read, more to read).
    pub fn receive(&mut self, table: &mut Table, pools: &[Pool; 2]) -> (usize, bool) {
        // SAFETY: `events` has room for its length in entries; timeout 0 never blocks.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                0,
            )
        };
        for i in 0..n.max(0) as usize {
            let k = self.events[i].u64;
            let (idx, gen) = (k as u32, (k >> 32) as u32);
            if self.events[i].events & libc::EPOLLERR as u32 != 0 {
                // The error queue holds ICMP errors (its pending error may already have been
                // taken by a send): read them all now.
                table.fail(idx, gen, 0);
            }
            if let Some(s) = table.get(idx, gen) {
                if !s.ready {
                    s.ready = true;
                    self.ready.push_back((idx, gen));
                }
            }
        }
        let mut handled = 0;
        let mut starved = false;
        let rounds = self.ready.len();
        for _ in 0..rounds {
            if handled >= super::PASS_BUDGET {
                break;
            }
            let Some((idx, gen)) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = table.get(idx, gen) else {
                continue;
            };
            let (fd, role) = (s.sock.as_raw_fd(), s.role);
            let (got, left) = self.read_socket(table, pools, idx, gen, fd, role);
            handled += got;
            starved |= left == Left::NoBuffers;
            if let Some(s) = table.get(idx, gen) {
                if left == Left::Drained {
                    s.ready = false;
                } else {
                    self.ready.push_back((idx, gen));
                }
            }
        }
        if starved && !self.starved {
            // Counted once per time a pool ran dry; the datagrams wait in the socket buffers
            // until consumers give buffers back (if the kernel drops some meanwhile,
            // SO_RXQ_OVFL says so with the next one).
            for g in Group::ALL {
                if self.free[g.index()].is_empty() {
                    table.stats.receive_paused[g.index()].inc();
                }
            }
        }
        self.starved = starved;
        // Sockets left unread for lack of buffers wait for a give-back, not for a busy loop.
        (handled, !starved && !self.ready.is_empty())
    }

    /// Reads up to PER_SOCKET datagrams; returns how many and what is left.
    fn read_socket(
        &mut self,
        table: &mut Table,
        pools: &[Pool; 2],
        idx: u32,
        gen: u32,
        fd: RawFd,
        role: Role,
    ) -> (usize, Left) {
        let g = role.group();
        let pool = &pools[g.index()];

        let mut read = 0;
        while read < PER_SOCKET {
            let k = BATCH.min(self.free[g.index()].len()).min(PER_SOCKET - read);
            if k == 0 {
                return (read, Left::NoBuffers);
            }
            for j in 0..k {
                let bid = self.free[g.index()].pop().unwrap_or_default();
                self.rx_bids[j] = bid;
                self.rx_iov[j] = libc::iovec {
                    iov_base: pool.addr(bid).cast(),
                    iov_len: pool.buf_size(),
                };
                let h = &mut self.rx_hdrs[j].msg_hdr;
                *h = super::empty_msghdr();
                h.msg_iov = &mut self.rx_iov[j];
                h.msg_iovlen = 1;
                h.msg_name = self.rx_names[j].as_mut_ptr().cast();
                h.msg_namelen = cmsg::NAME_LEN as libc::socklen_t;
                h.msg_control = self.rx_ctrl[j].as_mut_ptr().cast();
                h.msg_controllen = std::mem::size_of::<CmsgBuf>() as _;
                self.rx_hdrs[j].msg_len = 0;
            }
            // SAFETY: the k headers point at k pool buffers this backend owns (popped from the
            // free list) and at per-slot name/control storage, all alive during the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.rx_hdrs.as_mut_ptr(),
                    k as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                let e = errno();
                for j in 0..k {
                    self.free[g.index()].push(self.rx_bids[j]);
                }
                match e {
                    libc::EINTR => continue,
                    libc::EAGAIN => return (read, Left::Drained),
                    e => {
                        table.fail(idx, gen, e);
                        return (read, Left::Drained);
                    }
                }
            }
            let r = r as usize;
            for j in 0..r {
                let bid = self.rx_bids[j];
                let h = &self.rx_hdrs[j];
                let b = BufRef { group: g, bid };
                if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    table.stats.drop_n(IoDrop::Truncated, 1);
                    self.free[g.index()].push(bid);
                    continue;
                }
                let clen = control_len(&h.msg_hdr).min(std::mem::size_of::<CmsgBuf>());
                let info = cmsg::parse(&words_as_bytes(&mut self.rx_ctrl[j])[..clen]);
                let nlen = (h.msg_hdr.msg_namelen as usize).min(cmsg::NAME_LEN);
                let addr = cmsg::sockaddr(&words_as_bytes(&mut self.rx_names[j])[..nlen]);
                let e = Entry {
                    buf: b,
                    off: 0,
                    len: self.rx_hdrs[j].msg_len,
                    info,
                    addr,
                };
                // Buffers holding no datagram: the free list and this batch's unused ones (as
                // io_uring counts the buffers still in its ring).
                let free = (self.free[g.index()].len() + (k - r)) as u16;
                if let Some(back) = table.deliver(idx, gen, e, free) {
                    self.free[g.index()].push(back.bid);
                }
            }
            for j in r..k {
                self.free[g.index()].push(self.rx_bids[j]);
            }
            read += r;
            if r < k {
                return (read, Left::Drained);
            }
        }
        (read, Left::Budget)
    }

    /// Sends the queued requests: one sendmmsg per run of messages to one socket. Returns the
    /// messages sent.
    pub fn flush(
        &mut self,
        q: &mut Vec<SendReq>,
        table: &mut Table,
        tx_bufs: &mut super::TxBufs,
        lens: &mut Vec<u32>,
        gso: bool,
    ) -> usize {
        let mut sent_total = 0;
        let mut start = 0;
        while start < q.len() {
            let id = q[start].id;
            let target = table
                .get(id.idx, id.gen)
                .map(|s| (s.sock.as_raw_fd(), s.ipv6));
            // The run of messages to this socket, at most BATCH.
            self.tx_msgs.clear();
            let mut end = start;
            while end < q.len() && self.tx_msgs.len() < BATCH && q[end].id == id {
                let n = message_len(&q[end..], gso);
                self.tx_msgs.push((end, n));
                end += n;
            }
            if let Some((fd, ipv6)) = target {
                let m = self.tx_msgs.len();
                for (i, &(first, n)) in self.tx_msgs.iter().enumerate() {
                    self.tx_store[i].fill(&q[first..first + n], ipv6);
                    self.tx_hdrs[i] = libc::mmsghdr {
                        msg_hdr: self.tx_store[i].hdr,
                        msg_len: 0,
                    };
                }
                let mut done = 0;
                let mut retried = usize::MAX;
                while done < m {
                    // SAFETY: headers done..m point at tx_store entries and at payloads in `q`,
                    // none of which move or drop during the call.
                    let r = unsafe {
                        libc::sendmmsg(
                            fd,
                            self.tx_hdrs[done..].as_mut_ptr(),
                            (m - done) as u32,
                            libc::MSG_DONTWAIT,
                        )
                    };
                    if r < 0 {
                        let e = errno();
                        if e == libc::EINTR {
                            continue;
                        }
                        if super::pending_icmp(e) && retried != done {
                            // An ICMP error about another destination of this shared socket
                            // surfaced on this send: read it (it ends that flow) and send this
                            // message again.
                            retried = done;
                            table.fail(id.idx, id.gen, e);
                            continue;
                        }
                        // The message at `done` failed; a full buffer fails the rest too.
                        let upto = if e == libc::EAGAIN || e == libc::ENOBUFS {
                            m
                        } else {
                            done + 1
                        };
                        for &(first, n) in &self.tx_msgs[done..upto] {
                            message_lens(&q[first..first + n], lens);
                            table.send_failed(id.idx, id.gen, e, lens.len());
                        }
                        done = upto;
                        continue;
                    }
                    let r = r as usize;
                    for &(first, n) in &self.tx_msgs[done..done + r] {
                        table.sent(
                            id.idx,
                            id.gen,
                            q[first].tag,
                            q[first..first + n]
                                .iter()
                                .map(|r| r.payload.as_slice().len()),
                        );
                    }
                    sent_total += r;
                    done += r;
                }
            }
            start = end;
        }
        for r in q.drain(..) {
            if let Payload::Owned(b) = r.payload {
                tx_bufs.put(b);
            }
        }
        sent_total
    }
}
