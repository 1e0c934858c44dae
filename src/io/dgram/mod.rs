//! The datagram engine: every UDP socket of a worker (its QUIC socket and its egress sockets,
//! which carry every flow's traffic to and from targets) served by one per-worker engine, on
//! io_uring or on recvmmsg/sendmmsg + epoll.
//!
//! ```text
//! kernel --(multishot recvmsg into a provided buffer | recvmmsg into pool buffers)--> complete()
//!   --> socket table (slab index = SockId, O(1), no hashing, no locks) --> the socket's backlog
//!   --> the ready list --> the worker's pass: take_ready() -> try_recv() -> Received
//! ICMP error on an egress socket --> its error queue read at once --> take_errors()
//! the pass --send()/send_transmit() (queued)--> flush() --> one SendMsg SQE per message,
//!   submitted together (io_uring) | one sendmmsg per run of messages on one socket (fallback)
//! ```
//!
//! The engine has one user, the worker's pass ([`crate::worker`]): it waits on [`Engine::wait`],
//! calls [`Engine::complete`] (buffers back, completions or readiness drained into backlogs up
//! to a budget), reads what [`Engine::take_ready`] names, queues sends, and ends with
//! [`Engine::flush`] (one `io_uring_enter`, or the mmsg syscalls). Work beyond the budget waits
//! for the next pass ([`Engine::pending`] says so), after the worker's other tasks have run, so
//! a busy socket cannot starve the rest. Nothing waits to build a batch (RFC 9298 §6): a pass
//! sends what the worker queued since the last one.
//!
//! **Egress sockets** are unconnected and shared by many flows: a datagram comes with its
//! source address, and the worker demultiplexes by (socket, source) and drops every other
//! source. They receive with UDP GRO (a train of datagrams from one source in one buffer, read
//! by [`Received::datagrams`]) and report ICMP errors through their error queue (`IP_RECVERR`),
//! which the engine reads as soon as the socket signals one: each error names the destination
//! it was about, so it ends that flow only.
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
pub mod memory;
mod mmsg;
pub mod pool;
mod uring;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tracing::{debug, warn};

use self::cmsg::RecvInfo;
use self::pool::{BufRef, Group, Pool};
use crate::counter::{Counter, Gauge};

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
    /// No kernel I/O: datagrams injected, sends counted (tests and benchmarks of the pass).
    Memory,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Mmsg => "mmsg",
            Backend::Memory => "memory",
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
    /// Payload bytes per target buffer: longer datagrams (or GRO trains) are truncated,
    /// dropped and counted. At 65,536 (the default) egress sockets receive with GRO.
    pub target_buffer_size: usize,
    pub target_buffers: u16,
    pub quic_buffers: u16,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes {
            target_buffer_size: 65_536,
            target_buffers: 1024,
            quic_buffers: 64,
        }
    }
}

/// Why the engine dropped a datagram. The worker exports these with its own drop reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDrop {
    /// A socket's backlog held its share of the receive pool (the consumer is behind).
    BacklogFull,
    /// The kernel dropped it: the socket's receive buffer was full (`SO_RXQ_OVFL`).
    KernelDropped,
    /// Longer than a receive buffer: cut short by the kernel, so not relayed.
    Truncated,
    /// The send found the socket's buffer (or the engine's send queue) full.
    SendBufferFull,
    /// Refused as too large for the path (EMSGSIZE, or an ICMP "fragmentation needed").
    TooLarge,
}

impl IoDrop {
    pub const ALL: [IoDrop; 5] = [
        IoDrop::BacklogFull,
        IoDrop::KernelDropped,
        IoDrop::Truncated,
        IoDrop::SendBufferFull,
        IoDrop::TooLarge,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Send tags: what the caller says a datagram to a target belongs to (an HTTP version, say),
/// so the datagrams the kernel took are counted per tag.
pub const TAGS: usize = 4;

/// What the engine counts. Written by the worker's thread only.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Passes: `complete` calls.
    pub passes: Counter,
    /// Completions (io_uring) or datagrams read (fallback) handled.
    pub completions: Counter,
    /// Send messages handed to the kernel (a GSO message may carry many datagrams).
    pub submissions: Counter,
    /// Free receive buffers per pool (`Group` order).
    pub pool_free: [Gauge; 2],
    /// Times receiving paused because a pool had no free buffer, per pool.
    pub receive_paused: [Counter; 2],
    pub drops: [Counter; IoDrop::ALL.len()],
    /// Datagrams and payload bytes to targets the kernel took, per send tag.
    pub sent: [[Counter; 2]; TAGS],
    /// QUIC packets the socket did not take (lost, as on the network; QUIC recovers).
    pub quic_send_errors: Counter,
}

impl EngineStats {
    pub fn drops_for(&self, d: IoDrop) -> u64 {
        self.drops[d.index()].get()
    }

    fn drop_n(&self, d: IoDrop, n: u64) {
        self.drops[d.index()].add(n);
    }
}

/// A socket registered with the engine: a slab index and the generation that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockId {
    idx: u32,
    gen: u32,
}

impl SockId {
    /// The slab index (unique among the sockets registered now).
    pub fn index(self) -> u32 {
        self.idx
    }
}

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The worker's QUIC socket (unconnected; GRO trains; addresses and ECN matter).
    Quic,
    /// An egress socket: unconnected, shared by the flows to different targets, GRO trains,
    /// source addresses, ICMP errors through the error queue.
    Egress,
}

impl Role {
    fn group(self) -> Group {
        match self {
            Role::Quic => Group::Quic,
            Role::Egress => Group::Target,
        }
    }
}

/// An ICMP (or local) error an egress socket reported about one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockError {
    pub sock: SockId,
    /// The destination the failed datagram was sent to.
    pub dest: SocketAddr,
    pub errno: i32,
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
    /// On the ready list.
    listed: bool,
    /// The kernel's count of datagrams it dropped on this socket, as last reported
    /// (`SO_RXQ_OVFL`); the difference to the next report is counted as dropped.
    kernel_drops: u32,
    /// Closed by its owner; kept until the kernel is done with it.
    closing: bool,
    /// io_uring: a multishot receive is in flight.
    armed: bool,
    /// fallback: readable and not yet drained.
    ready: bool,
}

/// The per-worker socket table.
struct Table {
    slots: Slab<Slot>,
    next_gen: u32,
    stats: Arc<EngineStats>,
    backlog_cap: [usize; 2],
    /// Sockets with datagrams in their backlog, each once, for the worker's pass.
    ready: Vec<SockId>,
    /// Errors egress sockets reported, for the worker's pass.
    errors: Vec<SockError>,
    /// Scratch for error-queue reads.
    errq: Vec<(SocketAddr, i32)>,
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
        let stats = self.stats.clone();
        let Some(s) = self.get(idx, gen) else {
            return Some(e.buf);
        };
        if let Some(n) = e.info.kernel_drops {
            let lost = n.wrapping_sub(s.kernel_drops);
            s.kernel_drops = n;
            stats.drop_n(IoDrop::KernelDropped, u64::from(lost));
        }
        if s.backlog.len() >= cap {
            // The consumer has not caught up with its share of the pool: drop, do not stall.
            stats.drop_n(IoDrop::BacklogFull, 1);
            return Some(e.buf);
        }
        s.backlog.push_back(e);
        if !s.listed {
            s.listed = true;
            self.ready.push(SockId { idx, gen });
        }
        None
    }

    /// A receive on the socket failed with `errno`: for an egress socket that is an ICMP error
    /// waiting in its error queue (read now, each naming its destination); for the QUIC
    /// socket, lost like a packet.
    fn fail(&mut self, idx: u32, gen: u32, errno: i32) {
        let Some(s) = self.get(idx, gen) else {
            return;
        };
        match s.role {
            Role::Egress => {
                let fd = s.sock.as_raw_fd();
                let mut errq = std::mem::take(&mut self.errq);
                read_errqueue(fd, &mut errq);
                for (dest, errno) in errq.drain(..) {
                    self.errors.push(SockError {
                        sock: SockId { idx, gen },
                        dest,
                        errno,
                    });
                }
                self.errq = errq;
            }
            Role::Quic => debug!(errno, "QUIC socket receive error"),
        }
    }

    /// Accounts a completed send to a target (QUIC packets are not relayed datagrams).
    fn sent(&mut self, idx: u32, gen: u32, tag: u8, lens: impl Iterator<Item = usize>) {
        let role = self
            .slots
            .get(idx as usize)
            .filter(|s| s.gen == gen)
            .map(|s| s.role);
        if role == Some(Role::Egress) {
            let t = usize::from(tag).min(TAGS - 1);
            for len in lens {
                self.stats.sent[t][0].inc();
                self.stats.sent[t][1].add(len as u64);
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
            Some(Role::Egress) => match errno {
                libc::EAGAIN | libc::ENOBUFS => self.stats.drop_n(IoDrop::SendBufferFull, n as u64),
                libc::EMSGSIZE => self.stats.drop_n(IoDrop::TooLarge, n as u64),
                // A pending ICMP error surfaced on the send (already retried once): read the
                // error queue.
                _ => {
                    self.stats.drop_n(IoDrop::SendBufferFull, n as u64);
                    self.fail(idx, gen, errno);
                }
            },
        }
    }
}

/// An errno a send or receive on an egress socket returns when an earlier ICMP error (about
/// any destination) is pending on it: the datagram at hand was not the cause.
fn pending_icmp(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNREFUSED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::EHOSTDOWN
            | libc::ENETDOWN
            | libc::EPROTO
            | libc::EACCES
            | libc::EPERM
    )
}

/// Reads every error queued on `fd` (`MSG_ERRQUEUE`): the destination each was about and its
/// errno.
fn read_errqueue(fd: RawFd, out: &mut Vec<(SocketAddr, i32)>) {
    for _ in 0..64 {
        let mut name = [0u32; 8];
        let mut control: cmsg::CmsgBuf = [0; 16];
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: byte.len(),
        };
        let mut hdr = empty_msghdr();
        hdr.msg_name = name.as_mut_ptr().cast();
        hdr.msg_namelen = cmsg::NAME_LEN as libc::socklen_t;
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = std::mem::size_of::<cmsg::CmsgBuf>() as _;
        // SAFETY: every pointer in `hdr` refers to a live local buffer of the stated length;
        // MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recvmsg(fd, &mut hdr, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            return; // EAGAIN: the queue is empty
        }
        #[allow(clippy::useless_conversion)]
        let clen = usize::try_from(hdr.msg_controllen).unwrap_or(0).min(128);
        let nlen = (hdr.msg_namelen as usize).min(cmsg::NAME_LEN);
        let errno = cmsg::extended_errno(&words_as_bytes(&mut control)[..clen]);
        let dest = cmsg::sockaddr(&words_as_bytes(&mut name)[..nlen]);
        if let (Some(dest), Some(errno)) = (dest, errno) {
            out.push((dest, errno));
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
    dest: SocketAddr,
    /// GSO segment size of an `Owned` QUIC transmit; 0 for one datagram.
    segment: u16,
    ecn: u8,
    src_ip: Option<IpAddr>,
    /// The caller's tag, for the sent counters.
    tag: u8,
    /// Its place in the queue, so sorting keeps each destination's order.
    seq: u32,
}

/// A QUIC transmit for [`Engine::send_transmit`].
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
/// equal-size datagrams to the same destination from the same socket (the last may be
/// shorter).
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
        if r.id != first.id
            || r.dest != first.dest
            || !matches!(r.payload, Payload::Shared(_))
            || len > size
        {
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
        let name_len = encode_sockaddr(first.dest, words_as_bytes(&mut self.name));
        let mut e = cmsg::Encoder::new(words_as_bytes(&mut self.cmsg));
        if reqs.len() > 1 {
            e.segment_size(first.payload.as_slice().len() as u16);
        } else if first.segment > 0 && first.segment as usize != first.payload.as_slice().len() {
            e.segment_size(first.segment);
        }
        // Not-ECT (0) is the sockets' default: only QUIC transmits carry another codepoint.
        if first.ecn != 0 {
            e.ecn(ipv6, first.ecn);
        }
        if let Some(ip) = first.src_ip {
            e.src_ip(ip);
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
            s if s > 0 => {
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
    Memory(memory::Memory),
}

/// Send buffers for QUIC transmits, kept for reuse. A burst (thousands of handshakes at
/// once) may have many in flight; once they come back, only [`TxBufs::KEPT`] stay, so the
/// burst's memory goes back to the allocator instead of staying with the worker.
#[derive(Debug, Default)]
pub(crate) struct TxBufs(Vec<Vec<u8>>);

impl TxBufs {
    /// Buffers kept (64 KiB each).
    pub const KEPT: usize = 64;
    const SIZE: usize = 65_536;

    fn take(&mut self) -> Vec<u8> {
        let mut b = self
            .0
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(Self::SIZE));
        b.clear();
        b
    }

    pub(crate) fn put(&mut self, b: Vec<u8>) {
        if self.0.len() < Self::KEPT && b.capacity() >= Self::SIZE {
            self.0.push(b);
        }
    }
}

struct Inner {
    io: Io,
    table: Table,
    sendq: Vec<SendReq>,
    tx_bufs: TxBufs,
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

/// One worker's datagram engine. Not `Send`: it lives and dies on its worker's thread, owned
/// by the worker's pass.
pub struct Engine {
    backend: Backend,
    gso: bool,
    stats: Arc<EngineStats>,
    wait: AsyncFd<WaitFd>,
    inner: RefCell<Inner>,
    /// Buffers given back while the engine was busy; returned at the next pass.
    recycled: RefCell<Vec<BufRef>>,
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

impl Engine {
    /// An engine on `backend`. Must be created inside the worker's tokio runtime (its wait fd
    /// is registered with the runtime's reactor).
    pub fn new(backend: Backend, sizes: Sizes, stats: Arc<EngineStats>) -> io::Result<Engine> {
        let target_size =
            sizes.target_buffer_size + uring::RECV_OVERHEAD + cmsg::NAME_LEN + cmsg::TARGET_CONTROL;
        let quic_size = 65_536 + uring::RECV_OVERHEAD + cmsg::NAME_LEN + 128;
        let pools = [
            Pool::new(target_size, sizes.target_buffers),
            Pool::new(quic_size, sizes.quic_buffers),
        ];
        let io = match backend {
            Backend::Uring => Io::Uring(uring::Ring::new(&pools)?),
            Backend::Mmsg => Io::Mmsg(mmsg::Poller::new(&pools)?),
            Backend::Memory => Io::Memory(memory::Memory::new(&pools)?),
        };
        let fd = match &io {
            Io::Uring(r) => r.fd(),
            Io::Mmsg(p) => p.fd(),
            Io::Memory(m) => m.fd(),
        };
        // SAFETY: the fd (the ring's or the epoll instance's) is owned by `inner.io`, which
        // the Engine drops after `wait` (field order), so it stays open and the same for the
        // AsyncFd's whole life.
        let wait =
            unsafe { AsyncFd::register_with_interest(WaitFd(fd), tokio::io::Interest::READABLE) }?;
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
                    // A socket's backlog holds at least its share of the pool (see
                    // `Table::deliver`), so one consumer that falls behind cannot take every
                    // buffer.
                    backlog_cap: [
                        (usize::from(sizes.target_buffers) / 8).max(1),
                        usize::from(sizes.quic_buffers),
                    ],
                    ready: Vec::with_capacity(256),
                    errors: Vec::new(),
                    errq: Vec::new(),
                },
                sendq: Vec::with_capacity(SENDQ_CAP),
                tx_bufs: TxBufs::default(),
                lens: Vec::with_capacity(MAX_SEGMENTS * 64),
            }),
            recycled: RefCell::new(Vec::with_capacity(
                usize::from(sizes.target_buffers) + usize::from(sizes.quic_buffers),
            )),
            pools: ManuallyDrop::new(pools),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether sends use UDP GSO.
    pub fn gso(&self) -> bool {
        self.gso
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
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
            listed: false,
            kernel_drops: 0,
            closing: false,
            armed: false,
            ready: false,
        });
        let id = SockId { idx, gen };
        let r = match &mut inner.io {
            Io::Uring(r) => r.arm(&mut inner.table, idx),
            Io::Mmsg(p) => p.add(&mut inner.table, idx),
            Io::Memory(_) => Ok(()),
        };
        if let Err(e) = r {
            inner.table.slots.remove(idx as usize);
            return Err(e);
        }
        Ok(id)
    }

    /// The local address a registered socket is bound to.
    pub fn local_addr(&self, id: SockId) -> Option<SocketAddr> {
        let mut inner = self.inner.borrow_mut();
        inner
            .table
            .get(id.idx, id.gen)
            .and_then(|s| s.sock.local_addr().ok())
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
            Io::Memory(_) => {
                inner.table.slots.remove(id.idx as usize);
            }
        }
    }

    /// Waits until the kernel has something for the engine (completions, or a readable
    /// socket), then clears the readiness: what arrives after this call wakes the next wait.
    pub async fn wait(&self) {
        match self.wait.readable().await {
            Ok(mut guard) => guard.clear_ready(),
            Err(e) => {
                warn!(error = %e, "datagram engine: waiting failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }

    /// The first half of a pass: buffers given back, completions (or readable sockets) drained
    /// into the sockets' backlogs, up to the pass budget. True when the budget ran out.
    pub fn complete(&self) -> bool {
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        for b in self.recycled.borrow_mut().drain(..) {
            give_back(&mut inner.io, &self.pools, b);
        }
        let (completions, more) = match &mut inner.io {
            Io::Uring(r) => r.complete(&mut inner.table, &self.pools, &mut inner.tx_bufs),
            Io::Mmsg(p) => p.receive(&mut inner.table, &self.pools),
            Io::Memory(m) => m.receive(&mut inner.table, &self.pools),
        };
        self.stats.passes.inc();
        self.stats.completions.add(completions as u64);
        self.publish_free(&inner.io);
        more
    }

    /// The sockets whose backlogs gained datagrams since the last call, each once.
    pub fn take_ready(&self, out: &mut Vec<SockId>) {
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        for id in inner.table.ready.drain(..) {
            if let Some(s) = inner
                .table
                .slots
                .get_mut(id.idx as usize)
                .filter(|s| s.gen == id.gen)
            {
                s.listed = false;
            }
            out.push(id);
        }
    }

    /// The errors egress sockets reported since the last call.
    pub fn take_errors(&self, out: &mut Vec<SockError>) {
        out.append(&mut self.inner.borrow_mut().table.errors);
    }

    /// The next datagram (or GRO train) received on `id`, read in place from its pool buffer
    /// (the buffer returns to the pool when the `Received` drops), or `None`.
    pub fn try_recv(&self, id: SockId) -> Option<Received<'_>> {
        let mut inner = self.inner.borrow_mut();
        let s = inner.table.get(id.idx, id.gen)?;
        let e = s.backlog.pop_front()?;
        Some(Received {
            engine: self,
            buf: e.buf,
            off: e.off,
            len: e.len,
            info: e.info,
            addr: e.addr,
        })
    }

    /// Queues a datagram for `dest` on egress socket `id` (a slice of the buffer it arrived in:
    /// no copy); false (dropped and counted) when the queue is full. Failures the kernel
    /// reports later are counted by the engine; `tag` says which `sent` counter it goes to.
    pub fn send(&self, id: SockId, dest: SocketAddr, payload: Bytes, tag: u8) -> bool {
        self.queue(SendReq {
            id,
            payload: Payload::Shared(payload),
            dest,
            segment: 0,
            ecn: 0,
            src_ip: None,
            tag,
            seq: 0,
        })
    }

    /// An empty send buffer (64 KiB capacity) for a QUIC transmit.
    pub fn tx_buf(&self) -> Vec<u8> {
        let mut inner = self.inner.borrow_mut();
        inner.tx_bufs.take()
    }

    /// Returns an unused send buffer.
    pub fn give_back_tx_buf(&self, b: Vec<u8>) {
        self.inner.borrow_mut().tx_bufs.put(b);
    }

    /// Queues a QUIC transmit (several datagrams with GSO).
    pub fn send_transmit(&self, id: SockId, t: Transmit) -> bool {
        let segment = match t.segment_size {
            Some(s) if s < t.buf.len() => s as u16,
            _ => 0,
        };
        self.queue(SendReq {
            id,
            payload: Payload::Owned(t.buf),
            dest: t.dest,
            segment,
            ecn: t.ecn,
            src_ip: t.src_ip,
            tag: 0,
            seq: 0,
        })
    }

    fn queue(&self, mut r: SendReq) -> bool {
        let mut inner = self.inner.borrow_mut();
        r.seq = inner.sendq.len() as u32;
        if inner.sendq.len() >= SENDQ_CAP {
            let n = match r.payload {
                Payload::Owned(ref b) if r.segment > 0 => b.len().div_ceil(r.segment as usize),
                _ => 1,
            };
            inner.table.send_failed(r.id.idx, r.id.gen, libc::EAGAIN, n);
            if let Payload::Owned(b) = r.payload {
                inner.tx_bufs.put(b);
            }
            return false;
        }
        inner.sendq.push(r);
        true
    }

    fn recycle(&self, b: BufRef) {
        match self.inner.try_borrow_mut() {
            Ok(mut inner) => {
                give_back(&mut inner.io, &self.pools, b);
            }
            Err(_) => self.recycled.borrow_mut().push(b),
        }
    }

    /// The second half of a pass: the queued sends become messages (GSO trains where a run of
    /// datagrams goes to one destination), submitted with one `io_uring_enter` (or the mmsg
    /// syscalls); receives stopped for lack of buffers restart. Returns the messages sent.
    pub fn flush(&self) -> usize {
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        for b in self.recycled.borrow_mut().drain(..) {
            give_back(&mut inner.io, &self.pools, b);
        }
        // Sends to one destination next to each other (stable: each flow keeps its order), so
        // runs of them can leave as one GSO message.
        // (In place: an unstable sort on a key that includes the queue position.)
        if self.gso && inner.sendq.len() > 1 {
            inner
                .sendq
                .sort_unstable_by_key(|r| (r.id.idx, r.dest, r.seq));
        }
        let submitted = match &mut inner.io {
            Io::Uring(r) => r.flush(
                &mut inner.sendq,
                &mut inner.table,
                &self.pools,
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
            Io::Memory(m) => m.flush(
                &mut inner.sendq,
                &mut inner.table,
                &mut inner.lens,
                self.gso,
            ),
        };
        self.stats.submissions.add(submitted as u64);
        self.publish_free(&inner.io);
        submitted
    }

    /// True when another pass would find work without the kernel saying so: completions left
    /// in the queue, sockets left unread by the budget, receives waiting to restart.
    pub fn pending(&self) -> bool {
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        !inner.table.ready.is_empty()
            || match &mut inner.io {
                Io::Uring(r) => r.pending(&self.pools),
                Io::Mmsg(p) => p.pending(),
                Io::Memory(m) => m.pending(),
            }
    }

    fn publish_free(&self, io: &Io) {
        let free = match io {
            Io::Uring(r) => r.free(),
            Io::Mmsg(p) => p.free(),
            Io::Memory(m) => m.free(),
        };
        for g in Group::ALL {
            self.stats.pool_free[g.index()].set(u64::from(free[g.index()]));
        }
    }

    /// Free buffers per group, for tests and the metrics.
    pub fn free_buffers(&self) -> [u16; 2] {
        let inner = self.inner.borrow();
        match &inner.io {
            Io::Uring(r) => r.free(),
            Io::Mmsg(p) => p.free(),
            Io::Memory(m) => m.free(),
        }
    }

    /// In-memory backend only: `data` arrives on `id` from `from` (at the next pass).
    #[doc(hidden)]
    pub fn inject(&self, id: SockId, from: SocketAddr, data: &[u8]) {
        if let Io::Memory(m) = &mut self.inner.borrow_mut().io {
            m.inject(id.idx, id.gen, from, data);
        }
    }

    /// In-memory backend only: the QUIC transmits "sent" so far (give their buffers back with
    /// [`Engine::give_back_tx_buf`]).
    #[doc(hidden)]
    pub fn take_transmits(&self, out: &mut Vec<memory::SentTransmit>) {
        if let Io::Memory(m) = &mut self.inner.borrow_mut().io {
            out.append(&mut m.transmits);
        }
    }
}

/// Returns a buffer to the kernel (io_uring) or the free list (fallback); true when a receive
/// stopped for lack of buffers is waiting for a pass to restart it.
fn give_back(io: &mut Io, pools: &[Pool; 2], b: BufRef) -> bool {
    match io {
        Io::Uring(r) => r.give_back(pools, b),
        Io::Mmsg(p) => p.give_back(b),
        Io::Memory(m) => m.give_back(b),
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
                    &self.pools,
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
            Io::Memory(_) => true,
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
    /// The sender.
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

    /// The datagrams of a GRO train (one when GRO did not coalesce; an empty datagram is one
    /// too).
    pub fn datagrams(&self) -> Datagrams<'_> {
        let d = self.data();
        let stride = if self.info.stride == 0 {
            d.len().max(1)
        } else {
            self.info.stride as usize
        };
        Datagrams {
            rest: d,
            stride,
            empty: d.is_empty(),
        }
    }
}

/// The datagrams of a [`Received`], in order.
#[derive(Debug)]
pub struct Datagrams<'a> {
    rest: &'a [u8],
    stride: usize,
    /// One empty datagram still to yield.
    empty: bool,
}

impl<'a> Iterator for Datagrams<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if std::mem::take(&mut self.empty) {
            return Some(&[]);
        }
        if self.rest.is_empty() {
            return None;
        }
        let n = self.stride.min(self.rest.len());
        let (d, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(d)
    }
}

impl Drop for Received<'_> {
    fn drop(&mut self) {
        self.engine.recycle(self.buf);
    }
}

#[cfg(test)]
mod tests;
