//! Batched UDP for the target, the raw forwarder and the plain UDP client: recvmmsg and sendmmsg
//! (through nix, so no `unsafe` here) on a non-blocking socket registered with the thread's tokio
//! reactor. No GRO anywhere, and no GSO in the raw forwarder (the plain forwarder of BENCH.md);
//! [`GsoTx`] sends UDP GSO trains (`UDP_SEGMENT`) for the target's download bursts and the UDP
//! client's upload bursts.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{
    getsockopt, recvmmsg, sendmmsg, sockopt, ControlMessage, MsgFlags, MultiHeaders,
    SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

/// Datagrams per recvmmsg / sendmmsg call.
pub const BATCH: usize = 64;
/// Segments in one GSO message at most (the kernel's UDP_MAX_SEGMENTS on older kernels).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes in one GSO message at most: under the 65,507-byte UDP limit, with room to spare.
pub const GSO_MAX_BYTES: usize = 65_000;

/// Segments of `size` bytes in one GSO message.
pub fn gso_segments(size: usize) -> usize {
    (GSO_MAX_BYTES / size.max(1)).clamp(1, GSO_MAX_SEGMENTS)
}

/// Binds a non-blocking UDP socket with large buffers (the kernel caps them at
/// net.core.rmem_max / wmem_max).
pub fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    sock.set_nonblocking(true)?;
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// A socket for the address family of `peer`, bound to any port and connected to `peer`.
pub fn connected(peer: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let any: SocketAddr = if peer.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let s = bind(any)?;
    s.connect(peer)?;
    Ok(s)
}

/// Converts a nix address to a std one.
pub fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        Some(SocketAddr::V4(SocketAddrV4::from(*v4)))
    } else {
        a.as_sockaddr_in6()
            .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
    }
}

/// Receive buffers and headers for one recvmmsg batch, usable with any socket.
pub struct RxBatch {
    headers: MultiHeaders<SockaddrStorage>,
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    addrs: Vec<Option<SocketAddr>>,
    /// The datagram did not fit its buffer (MSG_TRUNC): what [`RxBatch::datagram`] gives is cut.
    truncated: Vec<bool>,
}

impl std::fmt::Debug for RxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RxBatch")
            .field("buffers", &self.bufs.len())
            .finish_non_exhaustive()
    }
}

impl RxBatch {
    /// [`BATCH`] buffers of `buf_len` bytes.
    pub fn new(buf_len: usize) -> Self {
        RxBatch {
            headers: MultiHeaders::preallocate(BATCH, None),
            bufs: vec![vec![0u8; buf_len]; BATCH],
            lens: vec![0; BATCH],
            addrs: vec![None; BATCH],
            truncated: vec![false; BATCH],
        }
    }

    /// Receives one batch from `io`; `Ok(0)` when nothing is waiting. Read the datagrams with
    /// [`RxBatch::datagram`].
    pub fn recv(&mut self, io: &tokio::net::UdpSocket) -> io::Result<usize> {
        let RxBatch {
            headers,
            bufs,
            lens,
            addrs,
            truncated,
        } = self;
        let fd = io.as_raw_fd();
        let r = io.try_io(Interest::READABLE, || {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            let results = recvmmsg(fd, headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
                .map_err(io::Error::from)?;
            let mut n = 0;
            for (i, m) in results.enumerate() {
                lens[i] = m.bytes;
                addrs[i] = m.address.as_ref().and_then(to_std);
                truncated[i] = m.flags.contains(MsgFlags::MSG_TRUNC);
                n = i + 1;
            }
            Ok(n)
        });
        match r {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Datagram `i` of the last batch and where it came from.
    pub fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        (&self.bufs[i][..self.lens[i]], self.addrs[i])
    }

    /// Datagram `i` of the last batch was longer than its buffer (and is cut short).
    pub fn truncated(&self, i: usize) -> bool {
        self.truncated[i]
    }
}

/// Headers for sendmmsg, usable with any socket.
pub struct TxBatch {
    headers: MultiHeaders<SockaddrStorage>,
}

impl std::fmt::Debug for TxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxBatch").finish_non_exhaustive()
    }
}

impl Default for TxBatch {
    fn default() -> Self {
        TxBatch {
            headers: MultiHeaders::preallocate(BATCH, None),
        }
    }
}

impl TxBatch {
    /// Sends up to [`BATCH`] datagrams on `io`, each to its address (`None` on a connected
    /// socket). Returns how many the kernel took: fewer than asked when its buffer filled (0
    /// when it was full already). Other errors (an ICMP error on a connected socket) are
    /// returned.
    pub fn send(
        &mut self,
        io: &tokio::net::UdpSocket,
        msgs: &[(&[u8], Option<SocketAddr>)],
    ) -> io::Result<usize> {
        let msgs = &msgs[..msgs.len().min(BATCH)];
        if msgs.is_empty() {
            return Ok(0);
        }
        let fd = io.as_raw_fd();
        let slices: Vec<[IoSlice<'_>; 1]> = msgs.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = msgs
            .iter()
            .map(|(_, a)| a.map(SockaddrStorage::from))
            .collect();
        // Straight to sendmmsg: tokio's try_io would refuse until the reactor has seen the
        // socket writable once. A full buffer then clears the write readiness by hand, so
        // `writable()` waits for room.
        let r = sendmmsg(
            fd,
            &mut self.headers,
            slices.iter(),
            &addrs,
            [] as [ControlMessage<'_>; 0],
            MsgFlags::MSG_DONTWAIT,
        )
        .map(|res| res.count())
        .map_err(io::Error::from);
        if r.as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            clear_writable(io);
        }
        match r {
            Ok(n) => Ok(n),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOBUFS) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }
}

/// One GSO message: datagrams for one destination, all of the same size but the last (which may
/// be shorter), sent as one train (`UDP_SEGMENT`).
#[derive(Debug, Clone)]
pub struct Train<'a> {
    pub datagrams: Vec<&'a [u8]>,
    /// `None` on a connected socket.
    pub to: Option<SocketAddr>,
}

impl Train<'_> {
    /// The segment size, when the train can go as one GSO message.
    fn segment(&self) -> Option<usize> {
        let seg = self.datagrams.first()?.len();
        let (last, rest) = self.datagrams.split_last()?;
        let total: usize = self.datagrams.iter().map(|d| d.len()).sum();
        (seg > 0
            && seg <= usize::from(u16::MAX)
            && self.datagrams.len() <= GSO_MAX_SEGMENTS
            && total <= GSO_MAX_BYTES.max(seg)
            && last.len() <= seg
            && rest.iter().all(|d| d.len() == seg))
        .then_some(seg)
    }
}

/// Said once per process: GSO was refused and datagrams go one by one.
static GSO_REFUSAL_SAID: AtomicBool = AtomicBool::new(false);

/// Whether the kernel knows `UDP_SEGMENT` on this socket.
pub fn gso_supported(io: &tokio::net::UdpSocket) -> bool {
    getsockopt(io, sockopt::UdpGsoSegment).is_ok()
}

/// Sends UDP GSO trains with sendmmsg: one message (and one `UDP_SEGMENT` control message) per
/// train. Where the kernel refuses GSO, says so once on standard error and sends the datagrams
/// one by one from then on (plain sendmmsg).
pub struct GsoTx {
    headers: MultiHeaders<SockaddrStorage>,
    plain: TxBatch,
    enabled: bool,
}

impl std::fmt::Debug for GsoTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GsoTx")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl GsoTx {
    /// For sockets like `io`: GSO on when the kernel knows `UDP_SEGMENT`.
    pub fn new(io: &tokio::net::UdpSocket) -> Self {
        let enabled = gso_supported(io);
        if !enabled {
            refused("UDP_SEGMENT is not supported");
        }
        GsoTx {
            headers: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(u16))),
            plain: TxBatch::default(),
            enabled,
        }
    }

    /// Sends a prefix of `trains` on `io`: up to [`BATCH`] trains of one segment size with GSO,
    /// else up to [`BATCH`] datagrams one by one. Returns how many datagrams the kernel took,
    /// counted in order over the trains (with GSO a train goes whole or not at all); 0 when its
    /// buffer is full. Other errors are returned, as by [`TxBatch::send`].
    pub fn send(&mut self, io: &tokio::net::UdpSocket, trains: &[Train<'_>]) -> io::Result<usize> {
        let Some(first) = trains.first() else {
            return Ok(0);
        };
        if self.enabled {
            if let Some(seg) = first.segment() {
                let n = trains
                    .iter()
                    .take(BATCH)
                    .take_while(|t| t.segment() == Some(seg))
                    .count();
                let slices: Vec<Vec<IoSlice<'_>>> = trains[..n]
                    .iter()
                    .map(|t| t.datagrams.iter().map(|d| IoSlice::new(d)).collect())
                    .collect();
                let addrs: Vec<Option<SockaddrStorage>> = trains[..n]
                    .iter()
                    .map(|t| t.to.map(SockaddrStorage::from))
                    .collect();
                let seg16 = seg as u16;
                let cmsgs = [ControlMessage::UdpGsoSegments(&seg16)];
                let r = sendmmsg(
                    io.as_raw_fd(),
                    &mut self.headers,
                    slices.iter(),
                    &addrs,
                    cmsgs,
                    MsgFlags::MSG_DONTWAIT,
                )
                .map(|res| res.count())
                .map_err(io::Error::from);
                match r {
                    Ok(k) => return Ok(trains[..k].iter().map(|t| t.datagrams.len()).sum()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        clear_writable(io);
                        return Ok(0);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(0),
                    // No checksum offload on the route (EIO), no GSO in this kernel or on this
                    // socket: plain sends from now on.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
                        ) =>
                    {
                        self.enabled = false;
                        refused(&e.to_string());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let msgs: Vec<(&[u8], Option<SocketAddr>)> = trains
            .iter()
            .flat_map(|t| t.datagrams.iter().map(move |d| (*d, t.to)))
            .take(BATCH)
            .collect();
        self.plain.send(io, &msgs)
    }
}

fn refused(why: &str) {
    if !GSO_REFUSAL_SAID.swap(true, Ordering::Relaxed) {
        eprintln!("masque-bench: UDP GSO refused ({why}): sending datagrams one by one instead");
    }
}

/// Tells the reactor the socket is not writable now (after a send saw EAGAIN outside of
/// `try_io`), so the next `writable()` waits for the kernel to say so.
pub fn clear_writable(io: &tokio::net::UdpSocket) {
    let _ = io.try_io(Interest::WRITABLE, || {
        Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
    });
}

/// A UDP socket with its own receive and send batches.
#[derive(Debug)]
pub struct MmsgSocket {
    pub io: tokio::net::UdpSocket,
    rx: RxBatch,
    tx: TxBatch,
}

impl MmsgSocket {
    /// Registers a non-blocking socket with the current runtime; `buf_len` bytes per datagram.
    pub fn new(sock: std::net::UdpSocket, buf_len: usize) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(MmsgSocket {
            io: tokio::net::UdpSocket::from_std(sock)?,
            rx: RxBatch::new(buf_len),
            tx: TxBatch::default(),
        })
    }

    #[cfg(test)]
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    /// Waits until a receive may find something. Cancel-safe.
    pub async fn readable(&self) {
        let _ = self.io.readable().await;
    }

    /// Waits until a send may succeed. Cancel-safe.
    pub async fn writable(&self) {
        let _ = self.io.writable().await;
    }

    /// See [`RxBatch::recv`].
    pub fn try_recv(&mut self) -> io::Result<usize> {
        self.rx.recv(&self.io)
    }

    /// See [`RxBatch::datagram`].
    pub fn datagram(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        self.rx.datagram(i)
    }

    /// See [`TxBatch::send`].
    pub fn try_send(&mut self, msgs: &[(&[u8], Option<SocketAddr>)]) -> io::Result<usize> {
        self.tx.send(&self.io, msgs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::SockaddrLike;

    fn sockaddr_len(a: SocketAddr) -> u32 {
        SockaddrStorage::from(a).len()
    }

    #[test]
    fn address_conversion_round_trips() {
        for a in ["127.0.0.1:4433", "[::1]:53"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(to_std(&SockaddrStorage::from(a)), Some(a));
            assert!(sockaddr_len(a) >= 16);
        }
    }

    #[test]
    fn gso_trains_stay_under_the_limits() {
        assert_eq!(gso_segments(1200), 54);
        assert_eq!(gso_segments(64), 64);
        assert_eq!(gso_segments(65_000), 1);
        assert_eq!(gso_segments(0), 64);
        let (a, b) = ([0u8; 100], [0u8; 40]);
        let (a, b) = (&a[..], &b[..]);
        let t = |datagrams: Vec<&[u8]>| {
            Train {
                datagrams,
                to: None,
            }
            .segment()
        };
        assert_eq!(t(vec![a, a, b]), Some(100));
        assert_eq!(t(vec![a, b, a]), None);
        assert_eq!(t(vec![b, a]), None);
        assert_eq!(t(vec![a; 65]), None);
        assert_eq!(t(vec![]), None);
    }

    /// A train of five segments leaves as one GSO message (or one by one where the kernel has no
    /// GSO) and arrives as five datagrams on a socket without GRO, in order.
    #[tokio::test]
    async fn a_gso_train_arrives_as_its_segments() {
        let a = MmsgSocket::new(bind("127.0.0.1:0".parse().unwrap()).unwrap(), 2048).unwrap();
        let mut b = MmsgSocket::new(bind("127.0.0.1:0".parse().unwrap()).unwrap(), 2048).unwrap();
        let to = Some(b.local_addr().unwrap());
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 300]).collect();
        let tail = vec![9u8; 120];
        let mut datagrams: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        datagrams.push(&tail);
        let mut gso = GsoTx::new(&a.io);
        let trains = [Train { datagrams, to }];
        assert_eq!(gso.send(&a.io, &trains).unwrap(), 6);
        let mut got = Vec::new();
        while got.len() < 6 {
            b.readable().await;
            let n = b.try_recv().unwrap();
            for i in 0..n {
                assert!(!b.rx.truncated(i));
                got.push(b.datagram(i).0.to_vec());
            }
        }
        let mut want = payloads.clone();
        want.push(tail);
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn a_batch_goes_out_and_comes_back() {
        let mut a = MmsgSocket::new(bind("127.0.0.1:0".parse().unwrap()).unwrap(), 2048).unwrap();
        let mut b = MmsgSocket::new(bind("127.0.0.1:0".parse().unwrap()).unwrap(), 2048).unwrap();
        let to = Some(b.local_addr().unwrap());
        let msgs: Vec<(&[u8], Option<SocketAddr>)> =
            vec![(b"one", to), (b"two", to), (b"three", to)];
        assert_eq!(a.try_send(&msgs).unwrap(), 3);
        let mut got = Vec::new();
        while got.len() < 3 {
            b.readable().await;
            let n = b.try_recv().unwrap();
            for i in 0..n {
                let (d, from) = b.datagram(i);
                assert_eq!(from, Some(a.local_addr().unwrap()));
                got.push(d.to_vec());
            }
        }
        assert_eq!(
            got,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }
}
