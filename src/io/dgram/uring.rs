//! The io_uring backend: one ring per worker; one multishot recvmsg per socket drawing from a
//! provided-buffer ring per pool; sends as SendMsg SQEs, submitted together once per pass.
//!
//! `user_data` names what completed: the kind in the top two bits, then a 30-bit generation and
//! a 32-bit slab index (a socket's table slot for receives, the send operation's slot for sends).
//! A socket slot is reused only after its receive's final completion (no `IORING_CQE_F_MORE`),
//! and a send operation (with its header, iovecs, address, control bytes and payload) is freed
//! only on its completion, so the kernel never reads or writes memory that has been reused.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, RecvMsgOut};
use io_uring::{cqueue, opcode, squeue, IoUring};
use slab::Slab;
use tracing::debug;

use super::cmsg;
use super::pool::{BufRef, Group, Pool};
use super::{
    empty_msghdr, message_len, message_lens, Entry, IoDrop, MsgStore, Payload, Role, SendReq, Table,
};

/// Bytes of each receive buffer taken by the kernel's `io_uring_recvmsg_out` header.
pub const RECV_OVERHEAD: usize = 16;
/// Generations are 30 bits.
pub const GEN_MASK: u32 = (1 << 30) - 1;
/// Control bytes reserved in QUIC receive buffers (GRO, ECN, packet info).
const QUIC_CONTROL: usize = 128;
/// Submission queue entries; the completion queue is four times larger.
const SQ_ENTRIES: u32 = 1024;
/// Send operations in flight at most; beyond, sends are dropped and counted.
const MAX_IN_FLIGHT: usize = 4096;

const KIND_RECV: u64 = 0;
const KIND_SEND: u64 = 1;
const KIND_CANCEL: u64 = 2;

fn user_data(kind: u64, idx: u32, gen: u32) -> u64 {
    (kind << 62) | (u64::from(gen & GEN_MASK) << 32) | u64::from(idx)
}

fn split(ud: u64) -> (u64, u32, u32) {
    (ud >> 62, ((ud >> 32) as u32) & GEN_MASK, ud as u32)
}

/// A provided-buffer ring: page-aligned entries shared with the kernel; the tail is published
/// with a release store after the entries are written.
struct BufRing {
    base: NonNull<BufRingEntry>,
    layout: Layout,
    entries: u16,
    tail: u16,
    bgid: u16,
    /// Buffers the kernel may pick from.
    free: u16,
}

impl BufRing {
    fn new(ring: &IoUring, bgid: u16, entries: u16) -> io::Result<BufRing> {
        let entries = entries.next_power_of_two();
        let layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size (entries >= 1).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(ptr.cast::<BufRingEntry>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: the memory is page-aligned, sized for `entries` entries, and lives until
        // after the ring is unregistered (Ring::drop unregisters before freeing it).
        let r = unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(base.as_ptr() as u64, entries, bgid, 0)
        };
        if let Err(e) = r {
            // SAFETY: allocated just above with this layout; the kernel refused it.
            unsafe { alloc::dealloc(ptr, layout) };
            return Err(e);
        }
        Ok(BufRing {
            base,
            layout,
            entries,
            tail: 0,
            bgid,
            free: 0,
        })
    }

    fn push(&mut self, pool: &Pool, bid: u16) {
        let i = usize::from(self.tail & (self.entries - 1));
        // SAFETY: i < entries; the kernel only reads entries between its head and our published
        // tail, and this slot is past the tail (the ring holds at most `entries` buffers, and
        // a pool never has more buffers than its ring has entries).
        let e = unsafe { &mut *self.base.as_ptr().add(i) };
        e.set_addr(pool.addr(bid) as u64);
        e.set_len(pool.buf_size() as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.free += 1;
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry's reserved bytes, inside our
        // allocation, and is only ever accessed atomically by the kernel and by us.
        let tail = unsafe { &*(BufRingEntry::tail(self.base.as_ptr()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

/// One boxed send operation: the message storage and what keeps its payload alive.
struct SendOp {
    msg: MsgStore,
    payloads: Vec<Payload>,
    idx: u32,
    gen: u32,
    datagrams: u16,
    tag: u8,
    /// Sent again once already, after an ICMP error about another destination failed it.
    retried: bool,
}

pub(super) struct Ring {
    ring: IoUring,
    bufs: [BufRing; 2],
    /// The templates the kernel reads at each multishot receive (only the name and control
    /// lengths matter).
    recv_hdr: [Box<libc::msghdr>; 2],
    ops: Slab<Box<SendOp>>,
    // Boxed: an operation keeps its address while the kernel reads it, and moves between the
    // slab and this list without being copied.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<SendOp>>,
    cqes: Vec<(u64, i32, u32)>,
    /// Sockets whose multishot receive ended and must be re-armed.
    rearm: Vec<(u32, u32)>,
    /// Sockets whose receive stopped for lack of buffers.
    starved: Vec<(u32, u32)>,
    /// Cancels the submission queue had no room for.
    cancels: Vec<(u32, u32)>,
    /// The buffer rings are unregistered: their memory may be freed.
    unregistered: bool,
}

/// Checks that io_uring is permitted and offers what the engine needs, with a live test of a
/// multishot recvmsg on a provided-buffer ring over loopback.
pub fn probe() -> Result<(), String> {
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?;
    let mut p = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut p)
        .map_err(|e| format!("IORING_REGISTER_PROBE: {e}"))?;
    for (code, name) in [
        (opcode::RecvMsg::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !p.is_supported(code) {
            return Err(format!("opcode {name} unsupported"));
        }
    }
    let pool = Pool::new(256, 4);
    let mut ring = ring;
    let mut br = BufRing::new(&ring, 0, 4)
        .map_err(|e| format!("provided-buffer ring (Linux 5.19+): {e}"))?;
    for bid in 0..4 {
        br.push(&pool, bid);
    }
    br.publish();
    let result = (|| {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let mut hdr = empty_msghdr();
        hdr.msg_namelen = cmsg::NAME_LEN as libc::socklen_t;
        let sqe = opcode::RecvMsgMulti::new(Fd(rx.as_raw_fd()), &hdr, 0)
            .build()
            .user_data(7);
        // SAFETY: the SQE points at `hdr` and the registered buffer ring, both alive until the
        // ring is dropped below (which cancels the request and waits for it).
        unsafe { ring.submission().push(&sqe) }.map_err(|_| "SQ full".to_string())?;
        ring.submit().map_err(|e| e.to_string())?;
        tx.send_to(b"probe", rx.local_addr().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let ts = io_uring::types::Timespec::new().sec(1);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| "multishot recvmsg did not complete".to_string())?;
        if cqe.result() < 0 {
            return Err(format!(
                "multishot recvmsg (Linux 6.0+): {}",
                io::Error::from_raw_os_error(-cqe.result())
            ));
        }
        if !cqueue::more(cqe.flags()) || cqueue::buffer_select(cqe.flags()).is_none() {
            return Err("recvmsg is not multishot here (Linux 6.0+)".into());
        }
        // Cancel and wait, so the kernel is done with the buffers before they are freed.
        let cancel = opcode::AsyncCancel::new(7).build().user_data(8);
        // SAFETY: a cancel SQE references no memory.
        let _ = unsafe { ring.submission().push(&cancel) };
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut done = false;
        while !done && Instant::now() < deadline {
            let _ = ring.submitter().submit_with_args(1, &args);
            for c in ring.completion() {
                if c.user_data() == 7 && !cqueue::more(c.flags()) {
                    done = true;
                }
            }
        }
        if done {
            Ok(())
        } else {
            Err("cancel did not complete".into())
        }
    })();
    let _ = ring.submitter().unregister_buf_ring(0);
    drop(ring);
    // SAFETY: unregistered and the ring is gone; nothing refers to the entries any more.
    unsafe { alloc::dealloc(br.base.as_ptr().cast(), br.layout) };
    drop(pool);
    result
}

impl Ring {
    pub fn new(pools: &[Pool; 2]) -> io::Result<Ring> {
        // Cooperative task running (Linux 5.19+): the kernel never interrupts the worker to
        // post a completion; it posts them when the worker next enters the kernel (its
        // reactor's epoll_wait, or the pass's io_uring_enter), in batches. The ring fd itself is
        // what the reactor polls, so a datagram arriving while the worker sleeps wakes it at
        // once.
        //
        // Not deferred task running (IORING_SETUP_DEFER_TASKRUN): there the kernel only tells
        // the reactor through a registered eventfd, which on the kernels measured here was
        // signalled a grace period (13-20 ms) after the datagram arrived: every round trip of
        // a lightly loaded flow paid it, and a client that waits for one answer before sending
        // more saw the relay stall (the ring fd itself never becomes readable in that mode).
        let coop = IoUring::builder()
            .setup_cqsize(SQ_ENTRIES * 4)
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .build(SQ_ENTRIES);
        let ring = match coop {
            Ok(ring) => ring,
            Err(e) => {
                debug!(error = %e, "io_uring without cooperative task running");
                IoUring::builder()
                    .setup_cqsize(SQ_ENTRIES * 4)
                    .build(SQ_ENTRIES)?
            }
        };
        let mut bufs = [
            BufRing::new(&ring, 0, pools[0].count())?,
            BufRing::new(&ring, 1, pools[1].count())?,
        ];
        for g in Group::ALL {
            let p = &pools[g.index()];
            for bid in 0..p.count() {
                bufs[g.index()].push(p, bid);
            }
            bufs[g.index()].publish();
        }
        let mut target_hdr = Box::new(empty_msghdr());
        target_hdr.msg_namelen = cmsg::NAME_LEN as libc::socklen_t;
        target_hdr.msg_controllen = cmsg::TARGET_CONTROL as _;
        let mut quic_hdr = Box::new(empty_msghdr());
        quic_hdr.msg_namelen = cmsg::NAME_LEN as libc::socklen_t;
        quic_hdr.msg_controllen = QUIC_CONTROL as _;
        Ok(Ring {
            ring,
            bufs,
            recv_hdr: [target_hdr, quic_hdr],
            ops: Slab::with_capacity(256),
            spare: Vec::new(),
            cqes: Vec::with_capacity(super::PASS_BUDGET),
            rearm: Vec::new(),
            starved: Vec::new(),
            cancels: Vec::new(),
            unregistered: false,
        })
    }

    /// What the worker's reactor waits on: the ring, readable when completions are queued.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Completions are waiting in the queue, or for the kernel to post them, or a receive
    /// stopped for lack of buffers can restart (another pass is due).
    pub fn pending(&mut self, pools: &[Pool; 2]) -> bool {
        !self.ring.completion().is_empty()
            || self.ring.submission().taskrun()
            || !self.rearm.is_empty()
            || self.starved.iter().any(|_| {
                Group::ALL
                    .iter()
                    .any(|g| self.bufs[g.index()].free >= (pools[g.index()].count() / 8).max(1))
            })
    }

    pub fn free(&self) -> [u16; 2] {
        [self.bufs[0].free, self.bufs[1].free]
    }

    /// Queues an SQE; when the queue is full, submits what it holds and tries once more.
    /// False when the kernel cannot take more now (the caller retries at a later pass or
    /// drops).
    fn push_sqe(&mut self, sqe: &squeue::Entry) -> bool {
        for attempt in 0..2 {
            // SAFETY: every SQE built here points only at memory the engine keeps alive until
            // its final completion (see the module docs).
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return true;
            }
            if attempt == 0 {
                if let Err(e) = self.ring.submit() {
                    debug!(error = %e, "io_uring submit failed");
                }
            }
        }
        false
    }

    /// Starts the multishot receive of a socket.
    pub fn arm(&mut self, table: &mut Table, idx: u32) -> io::Result<()> {
        let Some(s) = table.slots.get_mut(idx as usize) else {
            return Ok(());
        };
        if s.armed || s.closing {
            return Ok(());
        }
        let g = s.role.group().index();
        let sqe = opcode::RecvMsgMulti::new(Fd(s.sock.as_raw_fd()), &*self.recv_hdr[g], g as u16)
            .build()
            .user_data(user_data(KIND_RECV, idx, s.gen));
        let gen = s.gen;
        if self.push_sqe(&sqe) {
            s.armed = true;
        } else {
            self.rearm.push((idx, gen)); // next pass
        }
        Ok(())
    }

    pub fn cancel(&mut self, idx: u32, gen: u32) {
        let sqe = opcode::AsyncCancel::new(user_data(KIND_RECV, idx, gen))
            .build()
            .user_data(user_data(KIND_CANCEL, idx, gen));
        if !self.push_sqe(&sqe) {
            self.cancels.push((idx, gen)); // next pass
        }
    }

    /// Returns a buffer to its ring; true when a starved receive waits for a pass.
    pub fn give_back(&mut self, pools: &[Pool; 2], b: BufRef) -> bool {
        let g = b.group.index();
        self.bufs[g].push(&pools[g], b.bid);
        self.bufs[g].publish();
        !self.starved.is_empty()
    }

    /// Drains completions (up to the pass budget) into the table. Returns (completions, more).
    pub fn complete(
        &mut self,
        table: &mut Table,
        pools: &[Pool; 2],
        tx_bufs: &mut super::TxBufs,
    ) -> (usize, bool) {
        self.cqes.clear();
        // Completions the kernel has queued as task work (IORING_SQ_TASKRUN) are posted by an
        // enter; `submit` adds GETEVENTS when the flag is up.
        if self.ring.submission().taskrun() {
            if let Err(e) = self.ring.submit() {
                debug!(error = %e, "io_uring enter failed");
            }
        }
        {
            let mut cq = self.ring.completion();
            cq.sync();
            for c in &mut cq {
                self.cqes.push((c.user_data(), c.result(), c.flags()));
                if self.cqes.len() == super::PASS_BUDGET {
                    break;
                }
            }
        }
        let n = self.cqes.len();
        for i in 0..n {
            let (ud, res, flags) = self.cqes[i];
            let (kind, gen, idx) = split(ud);
            match kind {
                KIND_RECV => self.on_recv(table, pools, idx, gen, res, flags),
                KIND_SEND => self.on_send(table, idx, res, tx_bufs),
                _ => {}
            }
        }
        for (idx, gen) in std::mem::take(&mut self.cancels) {
            self.cancel(idx, gen);
        }
        self.restart(table, pools);
        (n, n == super::PASS_BUDGET)
    }

    /// Restarts receives that ended (multishot stops on CQ overflow, errors, or no buffers);
    /// those that ran out of buffers once an eighth of their pool is back.
    fn restart(&mut self, table: &mut Table, pools: &[Pool; 2]) {
        let mut rearm = std::mem::take(&mut self.rearm);
        for &(idx, gen) in &rearm {
            if table.get(idx, gen).is_some() {
                let _ = self.arm(table, idx);
            }
        }
        // Keep the list's allocation; what failed to re-arm again waits for the next pass.
        rearm.clear();
        rearm.append(&mut self.rearm);
        self.rearm = rearm;
        if !self.starved.is_empty() {
            let starved = std::mem::take(&mut self.starved);
            for &(idx, gen) in &starved {
                let Some(s) = table.get(idx, gen) else {
                    continue;
                };
                let g = s.role.group();
                if self.bufs[g.index()].free >= (pools[g.index()].count() / 8).max(1) {
                    let _ = self.arm(table, idx);
                } else {
                    self.starved.push((idx, gen));
                }
            }
        }
    }

    fn on_recv(
        &mut self,
        table: &mut Table,
        pools: &[Pool; 2],
        idx: u32,
        gen: u32,
        res: i32,
        flags: u32,
    ) {
        let slot = table.slots.get(idx as usize).filter(|s| s.gen == gen);
        let role = slot.map(|s| s.role);
        if let Some(bid) = cqueue::buffer_select(flags) {
            let g = role.map(Role::group).unwrap_or(Group::Target);
            self.bufs[g.index()].free -= 1;
            let b = BufRef { group: g, bid };
            let back = match role {
                Some(role) if res >= 0 => self.parse(table, pools, idx, gen, role, b, res),
                _ => Some(b),
            };
            if let Some(b) = back {
                self.bufs[b.group.index()].push(&pools[b.group.index()], b.bid);
                self.bufs[b.group.index()].publish();
            }
        }
        if res < 0 {
            match -res {
                libc::ENOBUFS => {
                    // The pool is empty: the datagram waits in the socket buffer until the
                    // receive is re-armed (if the kernel drops it meanwhile, SO_RXQ_OVFL says
                    // so with the next one).
                    let g = role.map(Role::group).unwrap_or(Group::Target);
                    table.stats.receive_paused[g.index()].inc();
                }
                libc::ECANCELED => {}
                e => table.fail(idx, gen, e),
            }
        }
        if !cqueue::more(flags) {
            let Some(s) = table.slots.get_mut(idx as usize).filter(|s| s.gen == gen) else {
                return;
            };
            s.armed = false;
            if s.closing {
                table.slots.remove(idx as usize); // the socket closes here
            } else if res == -libc::ENOBUFS {
                self.starved.push((idx, gen));
            } else {
                self.rearm.push((idx, gen));
            }
        }
    }

    /// Reads one completed receive; returns the buffer when it is not queued for a consumer.
    #[allow(clippy::too_many_arguments)]
    fn parse(
        &mut self,
        table: &mut Table,
        pools: &[Pool; 2],
        idx: u32,
        gen: u32,
        role: Role,
        b: BufRef,
        res: i32,
    ) -> Option<BufRef> {
        let g = b.group.index();
        // SAFETY: the completion handed this buffer to us; it is in no ring until given back.
        let buf = unsafe { pools[g].buf(b.bid) };
        let used = (res as usize).min(buf.len());
        let Ok(out) = RecvMsgOut::parse(&buf[..used], &self.recv_hdr[g]) else {
            return Some(b);
        };
        if out.is_payload_truncated() {
            table.stats.drop_n(IoDrop::Truncated, 1);
            return Some(b);
        }
        let payload = out.payload_data();
        let off = payload.as_ptr() as usize - buf.as_ptr() as usize;
        let _ = role;
        let (info, addr) = (
            cmsg::parse(out.control_data()),
            cmsg::sockaddr(out.name_data()),
        );
        let free = self.bufs[g].free;
        table.deliver(
            idx,
            gen,
            Entry {
                buf: b,
                off: off as u32,
                len: payload.len() as u32,
                info,
                addr,
            },
            free,
        )
    }

    fn on_send(&mut self, table: &mut Table, op: u32, res: i32, tx_bufs: &mut super::TxBufs) {
        if res < 0 && super::pending_icmp(-res) {
            let retry = self
                .ops
                .get(op as usize)
                .filter(|o| !o.retried)
                .map(|o| (o.idx, o.gen));
            if let Some((idx, gen)) = retry {
                // An ICMP error about another destination of this shared socket failed this
                // send: read it (it ends that flow) and send this message again.
                table.fail(idx, gen, -res);
                if let Some(fd) = table.get(idx, gen).map(|s| s.sock.as_raw_fd()) {
                    let o = &mut self.ops[op as usize];
                    o.retried = true;
                    let sqe = opcode::SendMsg::new(Fd(fd), &o.msg.hdr)
                        .flags(libc::MSG_DONTWAIT as u32)
                        .build()
                        .user_data(user_data(KIND_SEND, op, 0));
                    if self.push_sqe(&sqe) {
                        return;
                    }
                }
            }
        }
        let Some(mut op) = self.ops.try_remove(op as usize) else {
            return;
        };
        if res < 0 {
            table.send_failed(op.idx, op.gen, -res, usize::from(op.datagrams));
        } else {
            table.sent(
                op.idx,
                op.gen,
                op.tag,
                op.payloads.iter().map(|p| p.as_slice().len()),
            );
        }
        for p in op.payloads.drain(..) {
            if let Payload::Owned(b) = p {
                tx_bufs.put(b);
            }
        }
        self.spare.push(op);
    }

    /// Turns the queued sends into SQEs and submits them with everything else queued this
    /// pass (re-armed receives, cancels). Returns the messages submitted.
    pub fn flush(
        &mut self,
        q: &mut Vec<SendReq>,
        table: &mut Table,
        pools: &[Pool; 2],
        tx_bufs: &mut super::TxBufs,
        lens: &mut Vec<u32>,
        gso: bool,
    ) -> usize {
        self.restart(table, pools);
        let mut messages = 0;
        let mut i = 0;
        while i < q.len() {
            let n = message_len(&q[i..], gso);
            let reqs = &mut q[i..i + n];
            i += n;
            let id = reqs[0].id;
            message_lens(reqs, lens);
            let Some((fd, ipv6)) = table
                .get(id.idx, id.gen)
                .map(|s| (s.sock.as_raw_fd(), s.ipv6))
            else {
                continue; // the socket closed meanwhile
            };
            if self.ops.len() >= MAX_IN_FLIGHT {
                // Too many sends in flight: dropped like a full socket buffer.
                table.send_failed(id.idx, id.gen, libc::EAGAIN, lens.len());
                continue;
            }
            let mut op = self.spare.pop().unwrap_or_else(|| {
                Box::new(SendOp {
                    msg: MsgStore::new(),
                    payloads: Vec::with_capacity(super::MAX_SEGMENTS),
                    idx: 0,
                    gen: 0,
                    datagrams: 0,
                    tag: 0,
                    retried: false,
                })
            });
            op.msg.fill(reqs, ipv6);
            op.idx = id.idx;
            op.gen = id.gen;
            op.datagrams = lens.len() as u16;
            op.tag = reqs[0].tag;
            op.retried = false;
            // Move the payloads into the operation: the iovecs point into them, and moving a
            // Bytes or a Vec does not move the bytes. An empty Bytes (no allocation) is left.
            for r in reqs.iter_mut() {
                op.payloads.push(std::mem::replace(
                    &mut r.payload,
                    Payload::Shared(bytes::Bytes::new()),
                ));
            }
            let key = self.ops.insert(op) as u32;
            // MSG_DONTWAIT: a full socket buffer fails the send (dropped and counted) rather
            // than parking it in the kernel until there is room (no queueing, RFC 9298 §6).
            let sqe = opcode::SendMsg::new(Fd(fd), &self.ops[key as usize].msg.hdr)
                .flags(libc::MSG_DONTWAIT as u32)
                .build()
                .user_data(user_data(KIND_SEND, key, 0));
            if self.push_sqe(&sqe) {
                messages += 1;
            } else {
                // The kernel cannot take more now: dropped like a full socket buffer.
                let mut op = self.ops.remove(key as usize);
                table.send_failed(id.idx, id.gen, libc::EAGAIN, lens.len());
                for p in op.payloads.drain(..) {
                    if let Payload::Owned(b) = p {
                        tx_bufs.put(b);
                    }
                }
                self.spare.push(op);
            }
        }
        // What was not moved into an operation (dropped sends) gives its buffers back.
        for r in q.drain(..) {
            if let Payload::Owned(b) = r.payload {
                tx_bufs.put(b);
            }
        }
        // One enter per pass: it submits what the pass queued and posts the completions
        // waiting as task work (collected at the next pass).
        let work = self.ring.submission().taskrun();
        if !self.ring.submission().is_empty() || work {
            if let Err(e) = self.ring.submit() {
                debug!(error = %e, "io_uring submit failed");
            }
        }
        messages
    }

    /// Cancels every receive and waits (bounded) until the kernel has finished every
    /// operation. Returns false if it did not finish in time.
    pub fn shutdown(
        &mut self,
        table: &mut Table,
        pools: &[Pool; 2],
        tx_bufs: &mut super::TxBufs,
    ) -> bool {
        let armed: Vec<(u32, u32)> = table
            .slots
            .iter_mut()
            .filter(|(_, s)| s.armed)
            .map(|(i, s)| {
                s.closing = true;
                (i as u32, s.gen)
            })
            .collect();
        for (idx, gen) in armed {
            self.cancel(idx, gen);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let ts = io_uring::types::Timespec::new().nsec(50_000_000);
        loop {
            let busy = table.slots.iter().any(|(_, s)| s.armed) || !self.ops.is_empty();
            if !busy {
                break;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let args = io_uring::types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.complete(table, pools, tx_bufs);
        }
        for b in &self.bufs {
            let _ = self.ring.submitter().unregister_buf_ring(b.bgid);
        }
        self.unregistered = true;
        true
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.unregistered {
            return; // the kernel may still read the entries: leak them with the pools
        }
        for b in &self.bufs {
            // SAFETY: allocated in BufRing::new with this layout and unregistered in
            // `shutdown`, so the kernel no longer reads it.
            unsafe { alloc::dealloc(b.base.as_ptr().cast(), b.layout) };
        }
    }
}
