//! Batched UDP for the target, the raw forwarder and the plain UDP client: recvmmsg and sendmmsg
//! (through nix, so no `unsafe` here) on a non-blocking socket registered with the thread's tokio
//! reactor. No GSO or GRO: this is the plain forwarder of BENCH.md.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

/// Datagrams per recvmmsg / sendmmsg call.
pub const BATCH: usize = 64;

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
