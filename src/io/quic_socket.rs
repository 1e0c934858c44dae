//! The per-worker QUIC socket: SO_REUSEPORT on the relay's port, configured for GSO on send
//! and GRO on receive; its I/O goes through the worker's datagram engine.

use std::io;
use std::net::SocketAddr;

use quinn_udp::UdpSocketState;
use socket2::{Domain, Protocol, Socket, Type};

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

/// What the kernel offers on a worker's QUIC socket. `quinn-udp` sets the options (GRO,
/// ECN and packet-info reporting, Don't Fragment) and probes GSO; the datagram engine does the
/// I/O.
#[derive(Debug)]
pub struct QuicSocket {
    state: UdpSocketState,
}

impl QuicSocket {
    /// Configures `sock` for QUIC.
    pub fn new(sock: &std::net::UdpSocket) -> io::Result<Self> {
        let state = UdpSocketState::new(sock.into())?;
        Ok(Self { state })
    }

    /// Datagrams one send may carry with GSO (1 without it).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// False when the kernel will not fragment (DF set): path MTU discovery is safe.
    pub fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}
