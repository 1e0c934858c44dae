//! A flow's target socket: one connected UDP socket per flow.
//!
//! Connecting the socket (RFC 9298 §3.1) makes the kernel do three jobs for us: it demultiplexes
//! replies to the right flow, it drops datagrams from any other source address and port (so a
//! third party cannot inject into a flow), and it reports ICMP errors for the flow as socket
//! errors (ECONNREFUSED and friends), which close the flow.

use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

use super::sockopt;

/// A connected, non-blocking UDP socket to one target.
#[derive(Debug)]
pub struct FlowSocket {
    sock: tokio::net::UdpSocket,
    target: SocketAddr,
}

/// What a receive on the target socket produced.
#[derive(Debug)]
pub enum Recv {
    /// A datagram of this many bytes.
    Datagram(usize),
    /// The target (or a router on the way) reported an error: the flow is unusable.
    TargetError(io::Error),
}

/// What a send to the target did.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    Ok,
    /// The socket buffer is full: the datagram was dropped (no queueing, RFC 9298 §6).
    WouldBlock,
    /// Larger than the path MTU allows with DF set: dropped.
    TooLarge,
    /// An ICMP error from an earlier datagram surfaced on this send: the flow is unusable.
    TargetError,
}

impl FlowSocket {
    /// Opens a socket connected to `target`: non-blocking, DF set, Not-ECT. Must be called
    /// inside a tokio runtime.
    pub fn connect(target: SocketAddr) -> io::Result<Self> {
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
        let sock = tokio::net::UdpSocket::from_std(sock.into())?;
        Ok(Self { sock, target })
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Sends one datagram now or drops it; never waits for room.
    pub fn send(&self, payload: &[u8]) -> Sent {
        // Straight to send(2) on the non-blocking fd: tokio's try_send would refuse until the
        // reactor has seen the socket writable once, dropping the first datagrams of every flow.
        // Write readiness means nothing for UDP anyway; the kernel says EAGAIN when it is full.
        match socket2::SockRef::from(&self.sock).send(payload) {
            Ok(_) => Sent::Ok,
            Err(e) => classify_send_error(&e),
        }
    }

    /// Waits until a datagram (or an error) can be read. Cancel-safe.
    pub async fn readable(&self) {
        // ICMP errors arrive as EPOLLERR without EPOLLIN, so wait for either. An error from
        // `ready` itself means the reactor is gone; the next try_recv reports it.
        let _ = self.sock.ready(Interest::READABLE | Interest::ERROR).await;
    }

    /// Reads one datagram if one is waiting; `None` when there is nothing more to read now.
    /// The caller supplies the buffer, so a worker can share one scratch buffer among its flows.
    pub fn try_recv(&self, buf: &mut [u8]) -> Option<Recv> {
        // recv(2) directly (through `Read for &Socket`) so that a pending socket error is read
        // even when only error readiness is set. tokio's `try_io` takes one interest at a time
        // (a combined mask matches nothing), so datagrams are tried under READABLE and the
        // pending error under ERROR; each clears its own readiness when the kernel says EAGAIN.
        let sock = socket2::SockRef::from(&self.sock);
        loop {
            let r = match self.sock.try_io(Interest::READABLE, || (&*sock).read(buf)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.sock.try_io(Interest::ERROR, || (&*sock).read(buf))
                }
                other => other,
            };
            match r {
                Ok(n) => return Some(Recv::Datagram(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Some(Recv::TargetError(e)),
            }
        }
    }

    /// Waits for the next datagram (or error) from the target. Cancel-safe.
    pub async fn recv(&self, buf: &mut [u8]) -> Recv {
        loop {
            self.readable().await;
            if let Some(r) = self.try_recv(buf) {
                return r;
            }
        }
    }

    /// For tests and diagnostics: the raw socket.
    pub fn socket(&self) -> &tokio::net::UdpSocket {
        &self.sock
    }
}

fn classify_send_error(e: &io::Error) -> Sent {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::ENOBUFS) => Sent::WouldBlock,
        Some(libc::EMSGSIZE) => Sent::TooLarge,
        _ if e.kind() == io::ErrorKind::WouldBlock => Sent::WouldBlock,
        _ => Sent::TargetError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_are_set_v4() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = FlowSocket::connect(peer.local_addr().unwrap()).unwrap();
        assert_eq!(
            sockopt::mtu_discover(s.socket(), false).unwrap(),
            sockopt::PMTUDISC_DO
        );
        assert_eq!(sockopt::traffic_class(s.socket(), false).unwrap() & 0x3, 0);
    }

    #[tokio::test]
    async fn options_are_set_v6() {
        let Ok(peer) = std::net::UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        let s = FlowSocket::connect(peer.local_addr().unwrap()).unwrap();
        assert_eq!(
            sockopt::mtu_discover(s.socket(), true).unwrap(),
            sockopt::PMTUDISC_DO
        );
        assert_eq!(sockopt::traffic_class(s.socket(), true).unwrap() & 0x3, 0);
    }

    #[tokio::test]
    async fn oversize_is_refused_not_fragmented() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = FlowSocket::connect(peer.local_addr().unwrap()).unwrap();
        // Loopback's MTU is 65536, so the largest UDP payload fits; the kernel refuses
        // anything over 65507 for IPv4 with EMSGSIZE.
        assert_eq!(s.send(&vec![0u8; 65_508]), Sent::TooLarge);
        assert_eq!(s.send(&[1, 2, 3]), Sent::Ok);
    }

    #[tokio::test]
    async fn icmp_port_unreachable_surfaces_as_target_error() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = peer.local_addr().unwrap();
        drop(peer);
        let s = FlowSocket::connect(addr).unwrap();
        assert_eq!(s.send(b"hello"), Sent::Ok);
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(std::time::Duration::from_secs(2), s.recv(&mut buf))
            .await
            .unwrap();
        match r {
            Recv::TargetError(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn foreign_source_is_filtered() {
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = FlowSocket::connect(peer.local_addr().unwrap()).unwrap();
        let local = s.local_addr().unwrap();
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"spoof", local).unwrap();
        peer.send_to(b"real", local).unwrap();
        let mut buf = [0u8; 16];
        match s.recv(&mut buf).await {
            Recv::Datagram(n) => assert_eq!(&buf[..n], b"real"),
            other => panic!("{other:?}"),
        }
    }
}
