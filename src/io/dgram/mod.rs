//! The datagram engine: every UDP socket of a worker (its QUIC socket and every flow's target
//! socket) served by one per-worker engine, on io_uring or on recvmmsg/sendmmsg + epoll.
//!
//! ```text
//! kernel --(multishot recvmsg into a provided buffer | recvmmsg into pool buffers)--> pass()
//!   --> socket table (slab index = SockId, O(1), no hashing, no locks) --> the socket's backlog
//!   --> wakes its consumer: the QUIC driver or the flow's task --> try_recv() -> Received
//! consumer --send()/send_to() (queued)--> pass() --> one SendMsg SQE per message, submitted
//!   together (io_uring) | one sendmmsg per run of messages on one socket (fallback)
//! ```
//!
//! **One pass** = buffers given back, completions (or readiness) drained into backlogs up to a
//! budget, queued sends turned into submissions, one `io_uring_enter` (or the mmsg syscalls).
//! Work beyond the budget waits for the next pass, after the worker's other tasks have run, so a
//! busy socket cannot starve the rest. Nothing waits to build a batch (RFC 9298 §6): a pass
//! sends what the worker queued since the last one.
//!
//! **Where bytes are copied.** A received datagram is written once by the kernel into a pool
//! buffer and read from there:
//! - target -> client: the payload is read in place and copied once into the client's framing
//!   (quinn-proto's DATAGRAM queue, or the capsule written into the HTTP/2 or TLS buffer);
//!   those copies are unavoidable because encryption needs the bytes in its own buffer.
//! - client -> target: QUIC packets are copied once from the pool buffer into the buffer
//!   quinn-proto decrypts in place (it owns its receive buffers); the decrypted payload is sent
//!   to the target as a slice of that buffer (a `Bytes`, reference-counted, not copied). Capsule
//!   payloads are likewise sent as slices of the chunk h2 or TLS decrypted into.
//! - QUIC transmits are written (encrypted) by quinn-proto straight into a send buffer that the
//!   kernel reads from; the buffer returns to a free list after the send completes.
//!
//! **No allocation per datagram** in steady state: pool buffers, send operations, send buffers
//! and the completion scratch vectors are all recycled; a socket's backlog grows to its burst
//! size once.
//!
//! **Lifecycle.** Memory the kernel may write (pool buffers, the provided-buffer rings) or read
//! (a send's header, iovecs, address, control bytes and payload) stays owned by the engine
//! until the operation's final completion: sends are boxed operations in a slab indexed by
//! their `user_data`; a socket being closed keeps its table slot until its multishot receive
//! has completed for the last time; dropping the engine cancels and waits for everything in
//! flight before the pools are freed (or leaks them, loudly, if the kernel does not answer).

pub mod cmsg;
mod mmsg;
pub mod pool;
mod uring;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tracing::{debug, warn};

use self::cmsg::RecvInfo;
use self::pool::{BufRef, Group, Pool};
use crate::metrics::{Direction, WorkerStats};
use crate::proto::connect_udp::HttpVersion;
use crate::relay::flow::DropReason;

/// Datagrams (or GSO segments) in one send message at most.
pub const MAX_SEGMENTS: usize = 64;
/// Bytes in one GSO message at most (UDP's 65,507-byte limit, with room to spare).
const MAX_GSO_BYTES: usize = 65_000;
/// Completions (io_uring) or datagrams (fallback) handled per pass before yielding.
const PASS_BUDGET: usize = 1024;
/// Sends queued between two passes at most; beyond, sends are dropped and counted.
const SENDQ_CAP: usize = 4096;

/// Which backend to run, as configured (`io.backend`, `--io-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// io_uring when the probe finds it usable, otherwise recvmmsg/sendmmsg.
    #[default]
    Auto,
    Uring,
    Mmsg,
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Choice::Auto),
            "uring" | "io_uring" => Ok(Choice::Uring),
            "mmsg" => Ok(Choice::Mmsg),
            _ => Err(format!("{s:?} is not one of auto, uring, mmsg")),
        }
    }
}

/// The backend a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Mmsg,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Mmsg => "mmsg",
        }
    }
}

/// The outcome of the start-up probe: the backend and why.
#[derive(Debug, Clone)]
pub struct Selected {
    pub backend: Backend,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("io_uring was asked for (io.backend = \"uring\") but is unusable here: {0}")]
    UringUnavailable(String),
}

/// Probes io_uring (the syscall may be disabled by `kernel.io_uring_disabled`, refused by a
/// seccomp filter, or lack the opcodes the engine needs) and picks a backend.
pub fn select(choice: Choice) -> Result<Selected, SelectError> {
    match choice {
        Choice::Mmsg => Ok(Selected {
            backend: Backend::Mmsg,
            reason: "configured (io.backend = \"mmsg\")".into(),
        }),
        Choice::Uring => match uring::probe() {
            Ok(()) => Ok(Selected {
                backend: Backend::Uring,
                reason: "configured (io.backend = \"uring\"); probe passed".into(),
            }),
            Err(why) => Err(SelectError::UringUnavailable(why)),
        },
        Choice::Auto => match uring::probe() {
            Ok(()) => Ok(Selected {
                backend: Backend::Uring,
                reason: "probe passed: multishot recvmsg, provided-buffer ring, sendmsg".into(),
            }),
            Err(why) => Ok(Selected {
                backend: Backend::Mmsg,
                reason: format!("io_uring unusable ({why}); recvmmsg/sendmmsg fallback"),
            }),
        },
    }
}

/// Whether the kernel accepts UDP_SEGMENT (GSO) on a UDP socket.
pub fn gso_supported() -> bool {
    let Ok(s) = UdpSocket::bind("127.0.0.1:0") else {
        return false;
    };
    super::sockopt::set_int(s.as_raw_fd(), libc::SOL_UDP, cmsg::UDP_SEGMENT, 1200).is_ok()
}

/// Pool sizes (from `[io]`).
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Payload bytes per target buffer: longer datagrams are truncated, dropped and counted.
    pub target_buffer_size: usize,
    pub target_buffers: u16,
    pub quic_buffers: u16,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            target_buffer_size: 4096,
            target_buffers: 2048,
            quic_buffers: 64,
        }
    }
}

/// A socket registered with the engine: a slab index and the generation that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockId {
    idx: u32,
    gen: u32,
}

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The worker's QUIC socket (unconnected; GRO trains; addresses and ECN matter).
    Quic,
    /// A flow's connected target socket, relaying for a client on this HTTP version.
    Target(HttpVersion),
}

impl Role {
    fn group(self) -> Group {
        match self {
            Role::Quic => Group::Quic,
            Role::Target(_) => Group::Target,
        }
    }
}

/// A received datagram in a socket's backlog.
#[derive(Debug, Clone, Copy)]
struct Entry {
    buf: BufRef,
    off: u32,
    len: u32,
    info: RecvInfo,
    addr: Option<SocketAddr>,
}

struct Slot {
    gen: u32,
    sock: UdpSocket,
    role: Role,
    ipv6: bool,
    backlog: VecDeque<Entry>,
    /// A socket error (an ICMP error on a target socket): sticky, reported after the backlog.
    err: Option<i32>,
    /// The kernel's count of datagrams it dropped on this socket, as last reported
    /// (`SO_RXQ_OVFL`); the difference to the next report is counted as dropped.
    kernel_drops: u32,
    waker: Option<Waker>,
    /// Closed by its owner; kept until the kernel is done with it.
    closing: bool,
    /// io_uring: a multishot receive is in flight.
    armed: bool,
    /// fallback: readable and not yet drained.
    ready: bool,
}

/// The per-worker socket table (the flow table by target socket).
struct Table {
    slots: Slab<Slot>,
    next_gen: u32,
    stats: Arc<WorkerStats>,
    backlog_cap: [usize; 2],
}

impl Table {
    fn get(&mut self, idx: u32, gen: u32) -> Option<&mut Slot> {
        self.slots
            .get_mut(idx as usize)
            .filter(|s| s.gen == gen && !s.closing)
    }

    /// Queues a datagram on its socket; hands the buffer back when it cannot be queued. `free`
    /// is how many buffers of the datagram's pool are still free (not in any backlog).
    ///
    /// A socket's backlog may hold its fixed share of the pool (an eighth), or half of what is
    /// free, whichever is more: a lone busy flow keeps its whole burst (a window of 256
    /// datagrams from one inner QUIC connection is common), while any number of busy sockets
    /// together can never take the last buffers from the others.
    fn deliver(&mut self, idx: u32, gen: u32, e: Entry, free: u16) -> Option<BufRef> {
        let cap = self.backlog_cap[e.buf.group.index()].max(usize::from(free) / 2);
        let Some(s) = self.get(idx, gen) else {
            return Some(e.buf);
        };
        if let Some(n) = e.info.kernel_drops {
            let lost = n.wrapping_sub(s.kernel_drops);
            s.kernel_drops = n;
            if lost > 0 {
                self.stats
                    .dropped_n(DropReason::SocketBufferFull, u64::from(lost));
            }
        }
        let Some(s) = self.get(idx, gen) else {
            return Some(e.buf);
        };
        if s.backlog.len() >= cap {
            // The consumer has not caught up with its share of the pool: drop, do not stall.
            self.stats.dropped(DropReason::NoBuffer);
            return Some(e.buf);
        }
        s.backlog.push_back(e);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
        None
    }

    fn fail(&mut self, idx: u32, gen: u32, errno: i32) {
        if let Some(s) = self.get(idx, gen) {
            s.err.get_or_insert(errno);
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }

    /// Accounts a completed send (target datagrams; QUIC packets are not relayed datagrams).
    fn sent(&mut self, idx: u32, gen: u32, lens: impl Iterator<Item = usize>) {
        let role = self
            .slots
            .get(idx as usize)
            .filter(|s| s.gen == gen)
            .map(|s| s.role);
        if let Some(Role::Target(v)) = role {
            for len in lens {
                self.stats.datagram(v, Direction::ToTarget, len);
            }
        }
    }

    /// Accounts a failed send of `n` datagrams.
    fn send_failed(&mut self, idx: u32, gen: u32, errno: i32, n: usize) {
        let role = self
            .slots
            .get(idx as usize)
            .filter(|s| s.gen == gen)
            .map(|s| s.role);
        match role {
            Some(Role::Quic) | None => {
                // Lost like on the network; QUIC recovers it.
                self.stats.quic_send_errors.add(n as u64);
                debug!(errno, "QUIC send failed");
            }
            Some(Role::Target(_)) => match errno {
                libc::EAGAIN | libc::ENOBUFS => {
                    for _ in 0..n {
                        self.stats.dropped(DropReason::TargetBusy);
                    }
                }
                libc::EMSGSIZE => {
                    for _ in 0..n {
                        self.stats.dropped(DropReason::TooLarge);
                    }
                }
                // An ICMP error from an earlier datagram: the flow is unusable.
                _ => self.fail(idx, gen, errno),
            },
        }
    }
}

/// What to send.
#[derive(Debug)]
enum Payload {
    /// A slice of a buffer someone else filled (a decrypted packet, an h2 DATA chunk).
    Shared(Bytes),
    /// A send buffer from the engine's free list (a QUIC transmit).
    Owned(Vec<u8>),
}

impl Payload {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Shared(b) => b,
            Payload::Owned(v) => v,
        }
    }
}

#[derive(Debug)]
struct SendReq {
    id: SockId,
    payload: Payload,
    dest: Option<SocketAddr>,
    /// GSO segment size of an `Owned` QUIC transmit; 0 for one datagram.
    segment: u16,
    ecn: u8,
    src_ip: Option<IpAddr>,
}

/// A QUIC transmit for [`Engine::send_to`].
#[derive(Debug)]
pub struct Transmit {
    pub dest: SocketAddr,
    /// The datagrams, back to back; from [`Engine::tx_buf`].
    pub buf: Vec<u8>,
    /// GSO segment size when `buf` holds several datagrams.
    pub segment_size: Option<usize>,
    pub ecn: u8,
    pub src_ip: Option<IpAddr>,
}

/// How many queued requests, from the front of `q`, go into one message: GSO joins a run of
/// equal-size datagrams to the same connected socket (the last may be shorter).
fn message_len(q: &[SendReq], gso: bool) -> usize {
    let first = &q[0];
    if !gso || !matches!(first.payload, Payload::Shared(_)) {
        return 1;
    }
    let size = first.payload.as_slice().len();
    let mut total = size;
    let mut n = 1;
    while n < q.len() && n < MAX_SEGMENTS {
        let r = &q[n];
        let len = r.payload.as_slice().len();
        if r.id != first.id || !matches!(r.payload, Payload::Shared(_)) || len > size {
            break;
        }
        if total + len > MAX_GSO_BYTES {
            break;
        }
        total += len;
        n += 1;
        if len < size {
            break; // a shorter datagram ends a GSO train
        }
    }
    n
}

/// The storage of one `msghdr` and what it points to. Its address must not change between
/// filling it and the kernel's reading it (boxed for io_uring, in a fixed array for sendmmsg).
struct MsgStore {
    hdr: libc::msghdr,
    iov: [libc::iovec; MAX_SEGMENTS],
    name: [u32; 8],
    cmsg: cmsg::CmsgBuf,
}

impl MsgStore {
    fn new() -> Self {
        MsgStore {
            hdr: empty_msghdr(),
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_SEGMENTS],
            name: [0; 8],
            cmsg: [0; 16],
        }
    }

    /// Points the header at `reqs` (one message); returns the datagram lengths' count.
    fn fill(&mut self, reqs: &[SendReq], ipv6: bool) {
        for (i, r) in reqs.iter().enumerate() {
            let s = r.payload.as_slice();
            self.iov[i] = libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            };
        }
        let first = &reqs[0];
        let name_len = match first.dest {
            Some(a) => encode_sockaddr(a, words_as_bytes(&mut self.name)),
            None => 0,
        };
        let mut e = cmsg::Encoder::new(words_as_bytes(&mut self.cmsg));
        if reqs.len() > 1 {
            e.segment_size(first.payload.as_slice().len() as u16);
        } else if first.segment > 0 && first.segment as usize != first.payload.as_slice().len() {
            e.segment_size(first.segment);
        }
        if first.dest.is_some() {
            e.ecn(ipv6, first.ecn);
            if let Some(ip) = first.src_ip {
                e.src_ip(ip);
            }
        }
        let cmsg_len = e.used();
        self.hdr = empty_msghdr();
        self.hdr.msg_iov = self.iov.as_mut_ptr();
        self.hdr.msg_iovlen = reqs.len() as _;
        if name_len > 0 {
            self.hdr.msg_name = self.name.as_mut_ptr().cast();
            self.hdr.msg_namelen = name_len as libc::socklen_t;
        }
        if cmsg_len > 0 {
            self.hdr.msg_control = self.cmsg.as_mut_ptr().cast();
            self.hdr.msg_controllen = cmsg_len as _;
        }
    }
}

/// The datagram count and lengths of one message, for accounting.
fn message_lens(reqs: &[SendReq], lens: &mut Vec<u32>) {
    lens.clear();
    for r in reqs {
        let len = r.payload.as_slice().len();
        match r.segment {
            s if s > 0 && r.dest.is_some() => {
                let mut left = len;
                while left > 0 {
                    let n = left.min(s as usize);
                    lens.push(n as u32);
                    left -= n;
                }
            }
            _ => lens.push(len as u32),
        }
    }
}

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid empty header (null pointers, 0 lengths).
    unsafe { std::mem::zeroed() }
}

/// Views a word array as bytes (for cmsg and sockaddr storage that must be aligned).
pub(crate) fn words_as_bytes<T: Copy>(w: &mut [T]) -> &mut [u8] {
    let len = std::mem::size_of_val(w);
    // SAFETY: T is plain integer data (u32/u64 arrays here); any byte pattern is valid and the
    // byte view covers exactly the same memory, borrowed mutably for the same lifetime.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast::<u8>(), len) }
}

/// Writes a `sockaddr_in`/`sockaddr_in6`; returns its length.
fn encode_sockaddr(a: SocketAddr, out: &mut [u8]) -> usize {
    out.fill(0);
    match a {
        SocketAddr::V4(v4) => {
            out[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&v4.port().to_be_bytes());
            out[4..8].copy_from_slice(&v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            out[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out[2..4].copy_from_slice(&v6.port().to_be_bytes());
            out[4..8].copy_from_slice(&v6.flowinfo().to_be_bytes());
            out[8..24].copy_from_slice(&v6.ip().octets());
            out[24..28].copy_from_slice(&v6.scope_id().to_ne_bytes());
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    }
}

// One per worker: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Io {
    Uring(uring::Ring),
    Mmsg(mmsg::Poller),
}

struct Inner {
    io: Io,
    table: Table,
    sendq: Vec<SendReq>,
    tx_bufs: Vec<Vec<u8>>,
    lens: Vec<u32>,
}

/// The fd the worker's reactor waits on: the ring (readable when completions are queued) or
/// the fallback's epoll instance (readable when a socket is).
#[derive(Debug)]
struct WaitFd(RawFd);

impl AsRawFd for WaitFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One worker's datagram engine. Not `Send`: it lives and dies on its worker's thread.
pub struct Engine {
    backend: Backend,
    gso: bool,
    stats: Arc<WorkerStats>,
    wait: AsyncFd<WaitFd>,
    inner: RefCell<Inner>,
    /// Buffers given back while the engine was busy; returned at the next pass.
    recycled: RefCell<Vec<BufRef>>,
    wake: Notify,
    wake_pending: Cell<bool>,
    /// Declared last: freed after `inner` has made sure the kernel is done with them.
    pools: ManuallyDrop<[Pool; 2]>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend)
            .field("gso", &self.gso)
            .finish_non_exhaustive()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Engine>>> = const { RefCell::new(None) };
}

/// The engine of the current worker thread.
pub fn current() -> io::Result<Rc<Engine>> {
    CURRENT
        .with_borrow(|e| e.clone())
        .ok_or_else(|| io::Error::other("no datagram engine on this thread"))
}

impl Engine {
    /// Creates the engine of the calling worker thread and makes it [`current`]. Must be
    /// called inside the worker's tokio runtime; [`Engine::run`] must then be spawned.
    pub fn install(
        backend: Backend,
        sizes: Sizes,
        stats: Arc<WorkerStats>,
    ) -> io::Result<Rc<Engine>> {
        let e = Rc::new(Engine::new(backend, sizes, stats)?);
        CURRENT.with_borrow_mut(|c| *c = Some(e.clone()));
        Ok(e)
    }

    /// Forgets the current thread's engine (it is dropped with its last user).
    pub fn uninstall() {
        CURRENT.with_borrow_mut(|c| *c = None);
    }

    fn new(backend: Backend, sizes: Sizes, stats: Arc<WorkerStats>) -> io::Result<Engine> {
        let target_size = sizes.target_buffer_size + uring::RECV_OVERHEAD + cmsg::TARGET_CONTROL;
        let quic_size = 65_536 + uring::RECV_OVERHEAD + cmsg::NAME_LEN + 128;
        let pools = [
            Pool::new(target_size, sizes.target_buffers),
            Pool::new(quic_size, sizes.quic_buffers),
        ];
        let io = match backend {
            Backend::Uring => Io::Uring(uring::Ring::new(&pools)?),
            Backend::Mmsg => Io::Mmsg(mmsg::Poller::new(&pools)?),
        };
        let fd = match &io {
            Io::Uring(r) => r.fd(),
            Io::Mmsg(p) => p.fd(),
        };
        // SAFETY: the fd (the ring's or the epoll instance's) is owned by `inner.io`, which
        // the Engine drops after `wait` (field order), so it stays open and the same for the
        // AsyncFd's whole life.
        let wait =
            unsafe { AsyncFd::register_with_interest(WaitFd(fd), tokio::io::Interest::READABLE) }?;
        stats.set_io_backend(backend.as_str());
        for g in Group::ALL {
            stats.pool_free[g.index()].set(u64::from(pools[g.index()].count()));
        }
        Ok(Engine {
            backend,
            gso: gso_supported(),
            stats: stats.clone(),
            wait,
            inner: RefCell::new(Inner {
                io,
                table: Table {
                    slots: Slab::new(),
                    next_gen: 0,
                    stats,
                    // A socket's backlog holds at most its share of the pool, so one consumer
                    // that falls behind cannot take every buffer.
                    backlog_cap: [
                        (usize::from(sizes.target_buffers) / 8).clamp(1, 64),
                        usize::from(sizes.quic_buffers),
                    ],
                },
                sendq: Vec::with_capacity(SENDQ_CAP),
                tx_bufs: Vec::new(),
                lens: Vec::with_capacity(MAX_SEGMENTS * 64),
            }),
            recycled: RefCell::new(Vec::with_capacity(
                usize::from(sizes.target_buffers) + usize::from(sizes.quic_buffers),
            )),
            wake: Notify::new(),
            wake_pending: Cell::new(false),
            pools: ManuallyDrop::new(pools),
        })
    }

    /// Whether sends use UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Takes ownership of a non-blocking UDP socket and starts receiving on it.
    pub fn register(&self, sock: UdpSocket, role: Role) -> io::Result<SockId> {
        sock.set_nonblocking(true)?;
        // The kernel reports, with each datagram, how many it has dropped on this socket for
        // lack of buffer space: those losses are counted too.
        super::sockopt::set_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)?;
        let ipv6 = sock.local_addr()?.is_ipv6();
        let mut guard = self.inner.borrow_mut();
        let inner = &mut *guard;
        let gen = inner.table.next_gen;
        inner.table.next_gen = (gen + 1) & uring::GEN_MASK;
        let entry = inner.table.slots.vacant_entry();
        let idx = entry.key() as u32;
        entry.insert(Slot {
            gen,
            sock,
            role,
            ipv6,
            backlog: VecDeque::new(),
            err: None,
            kernel_drops: 0,
            waker: None,
            closing: false,
            armed: false,
            ready: false,
        });
        let id = SockId { idx, gen };
        let r = match &mut inner.io {
            Io::Uring(r) => r.arm(&mut inner.table, idx),
            Io::Mmsg(p) => p.add(&mut inner.table, idx),
        };
        if let Err(e) = r {
            inner.table.slots.remove(idx as usize);
            return Err(e);
        }
        drop(guard);
        self.poke();
        Ok(id)
    }

    /// Stops receiving and closes the socket (once the kernel is done with it).
    pub fn close(&self, id: SockId) {
        let Ok(mut guard) = self.inner.try_borrow_mut() else {
            return; // only during the engine's own teardown
        };
        let inner = &mut *guard;
        let Some(s) = inner.table.get(id.idx, id.gen) else {
            return;
        };
        s.closing = true;
        s.waker = None;
        let backlog = std::mem::take(&mut s.backlog);
        let armed = s.armed;
        for e in backlog {
            give_back(&mut inner.io, &self.pools, e.buf);
        }
        match &mut inner.io {
            Io::Uring(r) if armed => r.cancel(id.idx, id.gen),
            Io::Uring(_) => {
                inner.table.slots.remove(id.idx as usize);
            }
            Io::Mmsg(p) => {
                p.remove(&inner.table, id.idx);
                inner.table.slots.remove(id.idx as usize);
            }
        }
        drop(guard);
        self.poke();
    }

    /// Ready when a datagram or an error waits on `id`.
    pub fn poll_readable(&self, id: SockId, cx: &mut Context<'_>) -> Poll<()> {
        let mut inner = self.inner.borrow_mut();
        match inner.table.get(id.idx, id.gen) {
            Some(s) if s.backlog.is_empty() && s.err.is_none() => {
                if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    s.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }

    /// Waits until [`Engine::try_recv`] has something for `id`. Cancel-safe.
    pub async fn readable(&self, id: SockId) {
        poll_fn(|cx| self.poll_readable(id, cx)).await
    }

    /// The next datagram received on `id`, an error the socket reported, or `None`.
    pub fn try_recv(&self, id: SockId) -> Option<io::Result<Received<'_>>> {
        let mut inner = self.inner.borrow_mut();
        let Some(s) = inner.table.get(id.idx, id.gen) else {
            return Some(Err(io::Error::from(io::ErrorKind::NotConnected)));
        };
        if let Some(e) = s.backlog.pop_front() {
            return Some(Ok(Received {
                engine: self,
                buf: e.buf,
                off: e.off,
                len: e.len,
                info: e.info,
                addr: e.addr,
            }));
        }
        s.err.map(|e| Err(io::Error::from_raw_os_error(e)))
    }

    /// Queues a datagram for a connected target socket; false (dropped) when the queue is
    /// full. Failures the kernel reports later are counted by the engine.
    pub fn send(&self, id: SockId, payload: Bytes) -> bool {
        self.queue(SendReq {
            id,
            payload: Payload::Shared(payload),
            dest: None,
            segment: 0,
            ecn: 0,
            src_ip: None,
        })
    }

    /// An empty send buffer (64 KiB capacity) for a QUIC transmit.
    pub fn tx_buf(&self) -> Vec<u8> {
        let mut inner = self.inner.borrow_mut();
        let mut b = inner
            .tx_bufs
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(65_536));
        b.clear();
        b
    }

    /// Returns an unused send buffer.
    pub fn give_back_tx_buf(&self, b: Vec<u8>) {
        self.inner.borrow_mut().tx_bufs.push(b);
    }

    /// Queues a QUIC transmit (several datagrams with GSO).
    pub fn send_to(&self, id: SockId, t: Transmit) -> bool {
        let segment = match t.segment_size {
            Some(s) if s < t.buf.len() => s as u16,
            _ => 0,
        };
        self.queue(SendReq {
            id,
            payload: Payload::Owned(t.buf),
            dest: Some(t.dest),
            segment,
            ecn: t.ecn,
            src_ip: t.src_ip,
        })
    }

    fn queue(&self, r: SendReq) -> bool {
        let mut inner = self.inner.borrow_mut();
        if inner.sendq.len() >= SENDQ_CAP {
            let n = match r.payload {
                Payload::Owned(ref b) if r.segment > 0 => b.len().div_ceil(r.segment as usize),
                _ => 1,
            };
            inner.table.send_failed(r.id.idx, r.id.gen, libc::EAGAIN, n);
            if let Payload::Owned(b) = r.payload {
                inner.tx_bufs.push(b);
            }
            return false;
        }
        inner.sendq.push(r);
        drop(inner);
        self.poke();
        true
    }

    /// Asks for a pass soon (after the tasks that are ready now have run).
    fn poke(&self) {
        if !self.wake_pending.replace(true) {
            self.wake.notify_one();
        }
    }

    fn recycle(&self, b: BufRef) {
        match self.inner.try_borrow_mut() {
            Ok(mut inner) => {
                let starved = give_back(&mut inner.io, &self.pools, b);
                let free = match &inner.io {
                    Io::Uring(r) => r.free(),
                    Io::Mmsg(p) => p.free(),
                };
                let g = b.group.index();
                self.stats.pool_free[g].set(u64::from(free[g]));
                if starved {
                    drop(inner);
                    self.poke();
                }
            }
            Err(_) => {
                self.recycled.borrow_mut().push(b);
                self.poke();
            }
        }
    }

    /// One pass: buffers back, completions in (bounded), sends out. Returns true when work
    /// was left for the next pass.
    pub fn pass(&self) -> bool {
        self.wake_pending.set(false);
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        for b in self.recycled.borrow_mut().drain(..) {
            give_back(&mut inner.io, &self.pools, b);
        }
        let stats = &*self.stats;
        let (completions, more) = match &mut inner.io {
            Io::Uring(r) => r.complete(&mut inner.table, &self.pools, &mut inner.tx_bufs),
            Io::Mmsg(p) => p.receive(&mut inner.table, &self.pools),
        };
        let submitted = match &mut inner.io {
            Io::Uring(r) => r.flush(
                &mut inner.sendq,
                &mut inner.table,
                &mut inner.tx_bufs,
                &mut inner.lens,
                self.gso,
            ),
            Io::Mmsg(p) => p.flush(
                &mut inner.sendq,
                &mut inner.table,
                &mut inner.tx_bufs,
                &mut inner.lens,
                self.gso,
            ),
        };
        let more = more
            || match &mut inner.io {
                Io::Uring(r) => r.pending(),
                Io::Mmsg(_) => false,
            };
        stats.io_passes.inc();
        stats.io_completions.add(completions as u64);
        stats.io_submissions.add(submitted as u64);
        let free = match &inner.io {
            Io::Uring(r) => r.free(),
            Io::Mmsg(p) => p.free(),
        };
        for g in Group::ALL {
            stats.pool_free[g.index()].set(u64::from(free[g.index()]));
        }
        more
    }

    /// Runs passes whenever the kernel or a consumer has something, forever (the worker drops
    /// the task at its end).
    pub async fn run(self: Rc<Self>) {
        loop {
            tokio::select! {
                biased;
                r = self.wait.readable() => match r {
                    Ok(mut guard) => {
                        let more = self.pass();
                        if more {
                            self.poke();
                        } else {
                            guard.clear_ready();
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "datagram engine: waiting failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                () = self.wake.notified() => {
                    if self.pass() {
                        self.poke();
                    }
                }
            }
            // Let the consumers this pass woke run before the next one.
            tokio::task::yield_now().await;
        }
    }

    /// Free buffers per group, for tests and the metrics.
    pub fn free_buffers(&self) -> [u16; 2] {
        let inner = self.inner.borrow();
        match &inner.io {
            Io::Uring(r) => r.free(),
            Io::Mmsg(p) => p.free(),
        }
    }
}

/// Returns a buffer to the kernel (io_uring) or the free list (fallback); true when a receive
/// stopped for lack of buffers is waiting for a pass to restart it.
fn give_back(io: &mut Io, pools: &[Pool; 2], b: BufRef) -> bool {
    match io {
        Io::Uring(r) => r.give_back(pools, b),
        Io::Mmsg(p) => p.give_back(b),
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        for b in self.recycled.get_mut().drain(..) {
            give_back(&mut inner.io, &self.pools, b);
        }
        let quiet = match &mut inner.io {
            Io::Uring(r) => {
                // Last sends (a CONNECTION_CLOSE, say) go out before the receives are cancelled.
                r.flush(
                    &mut inner.sendq,
                    &mut inner.table,
                    &mut inner.tx_bufs,
                    &mut inner.lens,
                    self.gso,
                );
                r.shutdown(&mut inner.table, &self.pools, &mut inner.tx_bufs)
            }
            Io::Mmsg(p) => {
                p.flush(
                    &mut inner.sendq,
                    &mut inner.table,
                    &mut inner.tx_bufs,
                    &mut inner.lens,
                    self.gso,
                );
                true
            }
        };
        if quiet {
            // SAFETY: the kernel holds no buffer of the pools any more (every operation has
            // completed), and the pools are not used after this point.
            unsafe { ManuallyDrop::drop(&mut self.pools) };
        } else {
            warn!("datagram engine: the kernel did not finish in time; leaking its buffers");
        }
    }
}

/// A datagram (or a GRO train of datagrams) received on a socket, read in place from its pool
/// buffer; the buffer goes back to the pool when this is dropped.
pub struct Received<'e> {
    engine: &'e Engine,
    buf: BufRef,
    off: u32,
    len: u32,
    pub info: RecvInfo,
    /// The sender (QUIC socket only; a target socket is connected).
    pub addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("len", &self.len)
            .field("info", &self.info)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Received<'_> {
    pub fn data(&self) -> &[u8] {
        let pool = &self.engine.pools[self.buf.group.index()];
        // SAFETY: this guard owns the buffer: the kernel handed it over with the completion
        // (or recvmmsg returned) and it is queued nowhere until the guard drops.
        let b = unsafe { pool.buf(self.buf.bid) };
        &b[self.off as usize..(self.off + self.len) as usize]
    }

    /// The datagrams of a GRO train (one when GRO did not coalesce).
    pub fn datagrams(&self) -> std::slice::Chunks<'_, u8> {
        let d = self.data();
        let stride = if self.info.stride == 0 {
            d.len().max(1)
        } else {
            self.info.stride as usize
        };
        d.chunks(stride)
    }
}

impl Drop for Received<'_> {
    fn drop(&mut self) {
        self.engine.recycle(self.buf);
    }
}

#[cfg(test)]
mod tests;
