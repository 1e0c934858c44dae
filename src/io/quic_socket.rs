//! The per-worker QUIC socket: SO_REUSEPORT on the relay's port, GSO on send and GRO on receive
//! through `quinn-udp` (which owns the cmsg details), registered with the worker's reactor.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

/// Binds a UDP socket with SO_REUSEPORT for one worker, with the given buffer sizes (the
/// kernel caps them at net.core.rmem_max / wmem_max).
pub fn bind_reuseport(addr: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// A worker's QUIC socket.
#[derive(Debug)]
pub struct QuicSocket {
    sock: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl QuicSocket {
    /// Registers the socket with the current runtime and enables GRO, ECN and DF through
    /// quinn-udp.
    pub fn new(sock: std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new((&sock).into())?;
        let sock = tokio::net::UdpSocket::from_std(sock)?;
        Ok(Self { sock, state })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Datagrams one send may carry with GSO (1 without it).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Datagrams one receive may return with GRO (1 without it).
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// False when the kernel will not fragment (DF set): path MTU discovery is safe.
    pub fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    /// Waits until the socket may have datagrams. Cancel-safe.
    pub async fn readable(&self) {
        let _ = self.sock.readable().await;
    }

    /// Receives a batch into `bufs`; `Ok(0)` when there is nothing to read now.
    pub fn try_recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        match self.sock.try_io(Interest::READABLE, || {
            self.state.recv((&self.sock).into(), bufs, meta)
        }) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Sends one transmit (several datagrams with GSO) now; `Err(WouldBlock)` when the socket
    /// buffer is full (the caller counts the loss; QUIC recovers it).
    pub fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.state.try_send((&self.sock).into(), transmit)
    }
}
