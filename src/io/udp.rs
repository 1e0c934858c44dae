//! A flow's target socket: one connected UDP socket per flow.
//!
//! Connecting the socket (RFC 9298 §3.1) makes the kernel do three jobs for us: it demultiplexes
//! replies to the right flow, it drops datagrams from any other source address and port (so a
//! third party cannot inject into a flow), and it reports ICMP errors for the flow as socket
//! errors (ECONNREFUSED and friends), which close the flow.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};

use super::dgram::{self, Engine, Received, Role, SockId};
use super::sockopt;
use crate::proto::connect_udp::HttpVersion;

/// A connected UDP socket to one target, served by the worker's datagram engine.
#[derive(Debug)]
pub struct FlowSocket {
    engine: Rc<Engine>,
    id: SockId,
    target: SocketAddr,
    local: SocketAddr,
}

/// What a send to the target did.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued for this pass's submission. A failure the kernel reports later (a full socket
    /// buffer, a datagram over the path MTU) is counted by the engine; an ICMP error from an
    /// earlier datagram surfaces on the next receive and ends the flow.
    Queued,
    /// The worker's send queue is full: dropped (no queueing beyond it, RFC 9298 §6).
    WouldBlock,
}

impl FlowSocket {
    /// Opens a socket connected to `target` (non-blocking, DF set, Not-ECT) and registers it
    /// with the current worker's engine, relaying for a client on `version`.
    pub fn connect(target: SocketAddr, version: HttpVersion) -> io::Result<Self> {
        let engine = dgram::current()?;
        let sock = Self::open(target)?;
        let local = sock.local_addr()?;
        let id = engine.register(sock, Role::Target(version))?;
        Ok(Self {
            engine,
            id,
            target,
            local,
        })
    }

    /// The socket itself, before registration: options set, bound and connected.
    pub fn open(target: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let ipv6 = target.is_ipv6();
        let sock = Socket::new(
            Domain::for_address(target),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        sock.set_nonblocking(true)?;
        sockopt::set_dont_fragment(&sock, ipv6)?;
        // RFC 9298 §6.2: packets to the target are Not-ECT, and ECN marks from the target are
        // not copied. Zero is the kernel default; set it so an inherited default cannot leak.
        if ipv6 {
            sock.set_tclass_v6(0)?;
        } else {
            sock.set_tos_v4(0)?;
        }
        let unspecified: IpAddr = if ipv6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        sock.bind(&SocketAddr::new(unspecified, 0).into())?;
        sock.connect(&target.into())?;
        Ok(sock.into())
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Queues one datagram (a slice of the buffer it arrived in: no copy); never waits.
    pub fn send(&self, payload: Bytes) -> Sent {
        if self.engine.send(self.id, payload) {
            Sent::Queued
        } else {
            Sent::WouldBlock
        }
    }

    /// Waits until a datagram (or an error) can be read. Cancel-safe.
    pub async fn readable(&self) {
        self.engine.readable(self.id).await
    }

    /// The next datagram from the target, read in place from the worker's buffer pool (the
    /// buffer returns to the pool when the `Received` drops), the socket's error (an ICMP
    /// error: the flow is unusable), or `None` when nothing is waiting.
    pub fn try_recv(&self) -> Option<io::Result<Received<'_>>> {
        self.engine.try_recv(self.id)
    }
}

impl Drop for FlowSocket {
    fn drop(&mut self) {
        self.engine.close(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_set_v4() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = FlowSocket::open(peer.local_addr().unwrap()).unwrap();
        assert_eq!(
            sockopt::mtu_discover(&s, false).unwrap(),
            sockopt::PMTUDISC_DO
        );
        assert_eq!(sockopt::traffic_class(&s, false).unwrap() & 0x3, 0);
    }

    #[test]
    fn options_are_set_v6() {
        let Ok(peer) = std::net::UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        let s = FlowSocket::open(peer.local_addr().unwrap()).unwrap();
        assert_eq!(
            sockopt::mtu_discover(&s, true).unwrap(),
            sockopt::PMTUDISC_DO
        );
        assert_eq!(sockopt::traffic_class(&s, true).unwrap() & 0x3, 0);
    }

    #[test]
    fn oversize_is_refused_not_fragmented() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = FlowSocket::open(peer.local_addr().unwrap()).unwrap();
        // Loopback's MTU is 65536, so the largest UDP payload fits; the kernel refuses
        // anything over 65507 for IPv4 with EMSGSIZE.
        let e = s.send(&vec![0u8; 65_508]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
        assert_eq!(s.send(&[1, 2, 3]).unwrap(), 3);
    }

    #[test]
    fn foreign_source_is_filtered() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = FlowSocket::open(peer.local_addr().unwrap()).unwrap();
        s.set_nonblocking(false).unwrap();
        let local = s.local_addr().unwrap();
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"spoof", local).unwrap();
        peer.send_to(b"real", local).unwrap();
        let mut buf = [0u8; 16];
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"real");
    }
}
