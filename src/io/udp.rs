//! Egress sockets: the UDP sockets a worker sends to targets from and receives their replies
//! on. They are unconnected and shared: one socket carries the flows to many different targets
//! (at most one flow per target address and port on each socket), so a worker holds a hundred
//! thousand flows with a few thousand descriptors and ports instead of one of each per flow.
//!
//! What a connected socket per flow had the kernel do, the worker now does itself (RFC 9298
//! §3.1: "validate source address and port on every packet"): every datagram is matched to its
//! flow by (socket, source address and port) and anything else is dropped and counted
//! (`crate::relay::flow_table`); ICMP errors arrive through the socket's error queue
//! (`IP_RECVERR`), each naming the destination it was about, and end that flow only.
//!
//! Options (RFC 9298 §3.1, §6.2): Don't Fragment, Not-ECT, UDP GRO (trains of datagrams from
//! one target in one buffer) when the worker's buffers can hold a whole train.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use super::dgram::cmsg::UDP_GRO;
use super::sockopt;

/// Opens an egress socket for IPv4 (`ipv6` false) or IPv6 targets, bound to `local` (an
/// address of this host; the unspecified address when `None`) and a port the kernel picks.
/// `buffer` is asked for as SO_RCVBUF and SO_SNDBUF (the kernel caps it at `rmem_max` and
/// `wmem_max`); `gro` turns UDP GRO on.
pub fn open_egress(
    ipv6: bool,
    local: Option<IpAddr>,
    buffer: usize,
    gro: bool,
) -> io::Result<UdpSocket> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_nonblocking(true)?;
    if ipv6 {
        sock.set_only_v6(true)?;
    }
    sockopt::set_dont_fragment(&sock, ipv6)?;
    // RFC 9298 §6.2: packets to the target are Not-ECT, and ECN marks from the target are not
    // copied. Zero is the kernel default; set it so an inherited default cannot leak.
    if ipv6 {
        sock.set_tclass_v6(0)?;
    } else {
        sock.set_tos_v4(0)?;
    }
    // ICMP errors go to the error queue with the destination they were about.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    if ipv6 {
        sockopt::set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)?;
    } else {
        sockopt::set_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
    }
    if gro {
        // Older kernels lack UDP GRO: then every datagram is its own receive.
        let _ = sockopt::set_int(fd, libc::SOL_UDP, UDP_GRO, 1);
    }
    let _ = sock.set_recv_buffer_size(buffer);
    let _ = sock.set_send_buffer_size(buffer);
    let ip = local.unwrap_or(if ipv6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    });
    sock.bind(&SocketAddr::new(ip, 0).into())?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_set_v4() {
        let s = open_egress(false, None, 1 << 20, true).unwrap();
        assert_eq!(
            sockopt::mtu_discover(&s, false).unwrap(),
            sockopt::PMTUDISC_DO
        );
        assert_eq!(sockopt::traffic_class(&s, false).unwrap() & 0x3, 0);
    }

    #[test]
    fn options_are_set_v6() {
        let Ok(s) = open_egress(true, None, 1 << 20, true) else {
            println!("SKIP: no IPv6 on this machine");
            return;
        };
        assert_eq!(
            sockopt::mtu_discover(&s, true).unwrap(),
            sockopt::PMTUDISC_DO
        );
        assert_eq!(sockopt::traffic_class(&s, true).unwrap() & 0x3, 0);
    }

    #[test]
    fn oversize_is_refused_not_fragmented() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = peer.local_addr().unwrap();
        let s = open_egress(false, Some("127.0.0.1".parse().unwrap()), 1 << 20, false).unwrap();
        // Loopback's MTU is 65536, so the largest UDP payload fits; the kernel refuses
        // anything over 65507 for IPv4 with EMSGSIZE.
        let e = s.send_to(&vec![0u8; 65_508], to).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
        assert_eq!(s.send_to(&[1, 2, 3], to).unwrap(), 3);
    }
}
