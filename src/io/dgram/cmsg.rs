//! Control messages and socket addresses as bytes: what both backends put next to a datagram
//! (GSO segment size, ECN, source address) and read back (GRO segment size, ECN, destination
//! address). Parsing works on plain byte slices, so it needs no `unsafe` and is tested in memory.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

const HDR: usize = std::mem::size_of::<libc::cmsghdr>();
const ALIGN: usize = std::mem::size_of::<usize>();

/// Room for the control messages of one datagram, in 8-byte words so it is aligned for
/// `cmsghdr`: GRO/GSO segment size, ECN and packet info.
pub type CmsgBuf = [u64; 16];

/// `UDP_GRO` and `UDP_SEGMENT` (linux/udp.h), not in every libc release.
pub const UDP_SEGMENT: libc::c_int = 103;
pub const UDP_GRO: libc::c_int = 104;

const fn align(n: usize) -> usize {
    (n + ALIGN - 1) & !(ALIGN - 1)
}

/// What the kernel said about one received datagram (or GRO train).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecvInfo {
    /// The GRO segment size; 0 when the buffer holds one datagram.
    pub stride: u16,
    /// The ECN bits of the IP header.
    pub ecn: u8,
    /// The destination address the datagram was sent to.
    pub dst_ip: Option<IpAddr>,
    /// How many datagrams the kernel has dropped on this socket so far for lack of receive
    /// buffer space (`SO_RXQ_OVFL`; present once the socket has dropped any).
    pub kernel_drops: Option<u32>,
}

/// Room for the control messages of a target datagram: `SO_RXQ_OVFL` (and a GRO segment
/// size), in 8-byte words.
pub const TARGET_CONTROL: usize = 64;

/// Reads the control messages of a received datagram.
pub fn parse(control: &[u8]) -> RecvInfo {
    let mut info = RecvInfo::default();
    let mut off = 0;
    while off + HDR <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + ALIGN].try_into().unwrap_or_default());
        let level = i32::from_ne_bytes(
            control[off + ALIGN..off + ALIGN + 4]
                .try_into()
                .unwrap_or_default(),
        );
        let ty = i32::from_ne_bytes(
            control[off + ALIGN + 4..off + HDR]
                .try_into()
                .unwrap_or_default(),
        );
        if len < HDR || off + len > control.len() {
            break;
        }
        let data = &control[off + HDR..off + len];
        match (level, ty) {
            (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) if data.len() >= 4 => {
                info.kernel_drops =
                    Some(u32::from_ne_bytes(data[..4].try_into().unwrap_or_default()));
            }
            (libc::SOL_UDP, UDP_GRO) if data.len() >= 4 => {
                let s = i32::from_ne_bytes(data[..4].try_into().unwrap_or_default());
                info.stride = u16::try_from(s).unwrap_or(0);
            }
            // IP_RECVTOS delivers one byte; IPV6_RECVTCLASS an int.
            (libc::IPPROTO_IP, libc::IP_TOS) if !data.is_empty() => info.ecn = data[0] & 0x3,
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) if data.len() >= 4 => {
                info.ecn =
                    (i32::from_ne_bytes(data[..4].try_into().unwrap_or_default()) & 0x3) as u8
            }
            // in_pktinfo { ipi_ifindex, ipi_spec_dst, ipi_addr }: ipi_addr is the header's
            // destination.
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= 12 => {
                let a: [u8; 4] = data[8..12].try_into().unwrap_or_default();
                info.dst_ip = Some(IpAddr::V4(Ipv4Addr::from(a)));
            }
            // in6_pktinfo { ipi6_addr, ipi6_ifindex }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if data.len() >= 16 => {
                let a: [u8; 16] = data[..16].try_into().unwrap_or_default();
                info.dst_ip = Some(IpAddr::V6(Ipv6Addr::from(a)));
            }
            _ => {}
        }
        off += align(len);
    }
    info
}

/// The error an ICMP (or local) error report carries, from the control messages of a
/// `MSG_ERRQUEUE` read: `sock_extended_err.ee_errno` of `IP_RECVERR` / `IPV6_RECVERR`.
pub fn extended_errno(control: &[u8]) -> Option<i32> {
    let mut off = 0;
    while off + HDR <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + ALIGN].try_into().ok()?);
        let level = i32::from_ne_bytes(control[off + ALIGN..off + ALIGN + 4].try_into().ok()?);
        let ty = i32::from_ne_bytes(control[off + ALIGN + 4..off + HDR].try_into().ok()?);
        if len < HDR || off + len > control.len() {
            return None;
        }
        let data = &control[off + HDR..off + len];
        if matches!(
            (level, ty),
            (libc::IPPROTO_IP, libc::IP_RECVERR) | (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        ) && data.len() >= 4
        {
            return Some(u32::from_ne_bytes(data[..4].try_into().ok()?) as i32);
        }
        off += align(len);
    }
    None
}

/// Writes control messages into `buf`; returns the length used.
#[derive(Debug)]
pub struct Encoder<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Encoder<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Encoder { buf, len: 0 }
    }

    fn push(&mut self, level: i32, ty: i32, data: &[u8]) {
        let space = HDR + align(data.len());
        if self.len + space > self.buf.len() {
            return; // cannot happen with CmsgBuf and the messages below
        }
        let b = &mut self.buf[self.len..self.len + space];
        b.fill(0);
        b[..ALIGN].copy_from_slice(&(HDR + data.len()).to_ne_bytes());
        b[ALIGN..ALIGN + 4].copy_from_slice(&level.to_ne_bytes());
        b[ALIGN + 4..HDR].copy_from_slice(&ty.to_ne_bytes());
        b[HDR..HDR + data.len()].copy_from_slice(data);
        self.len += space;
    }

    /// GSO: the kernel cuts the payload into datagrams of `size` bytes (the last may be shorter).
    pub fn segment_size(&mut self, size: u16) {
        self.push(libc::SOL_UDP, UDP_SEGMENT, &size.to_ne_bytes());
    }

    /// The ECN codepoint of the IP header.
    pub fn ecn(&mut self, ipv6: bool, ecn: u8) {
        let v = i32::from(ecn & 0x3);
        if ipv6 {
            self.push(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &v.to_ne_bytes());
        } else {
            self.push(libc::IPPROTO_IP, libc::IP_TOS, &v.to_ne_bytes());
        }
    }

    /// The source address to send from (the address the client's packets were sent to).
    pub fn src_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                let mut d = [0u8; 12];
                d[4..8].copy_from_slice(&a.octets()); // ipi_spec_dst
                self.push(libc::IPPROTO_IP, libc::IP_PKTINFO, &d);
            }
            IpAddr::V6(a) => {
                let mut d = [0u8; 20];
                d[..16].copy_from_slice(&a.octets());
                self.push(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &d);
            }
        }
    }

    /// Bytes written so far.
    pub fn used(&self) -> usize {
        self.len
    }
}

/// A `sockaddr_in` / `sockaddr_in6` as the kernel wrote it.
pub fn sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(name.get(..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(name.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => {
            let a: [u8; 4] = name.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(a.into(), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
            let a: [u8; 16] = name.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                a.into(),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// Room for the largest address the relay receives from (`sockaddr_in6`).
pub const NAME_LEN: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_messages_parse_back() {
        let mut buf: CmsgBuf = [0; 16];
        let bytes = words_as_bytes(&mut buf);
        let mut e = Encoder::new(bytes);
        e.segment_size(1200);
        e.ecn(false, 2);
        e.src_ip("10.0.0.1".parse().unwrap());
        // 16-byte headers; data padded to 8: u16 -> 8, int -> 8, in_pktinfo (12) -> 16.
        assert_eq!(e.used(), 24 + 24 + 32);
        // The parser reads what the kernel writes on receive; build such messages by hand.
        let mut rx = Vec::new();
        let mut push = |level: i32, ty: i32, data: &[u8]| {
            let len = HDR + data.len();
            rx.extend_from_slice(&len.to_ne_bytes());
            rx.extend_from_slice(&level.to_ne_bytes());
            rx.extend_from_slice(&ty.to_ne_bytes());
            rx.extend_from_slice(data);
            rx.resize(rx.len().next_multiple_of(ALIGN), 0);
        };
        push(libc::SOL_UDP, UDP_GRO, &1350i32.to_ne_bytes());
        push(libc::IPPROTO_IP, libc::IP_TOS, &[0b10]);
        let mut pk = [0u8; 12];
        pk[8..12].copy_from_slice(&[127, 0, 0, 2]);
        push(libc::IPPROTO_IP, libc::IP_PKTINFO, &pk);
        push(libc::SOL_SOCKET, libc::SO_RXQ_OVFL, &7u32.to_ne_bytes());
        let info = parse(&rx);
        assert_eq!(info.kernel_drops, Some(7));
        // sock_extended_err: ee_errno first, then origin, type, code, pad, info, data.
        let mut ee = Vec::new();
        ee.extend_from_slice(&(libc::ECONNREFUSED as u32).to_ne_bytes());
        ee.extend_from_slice(&[2, 3, 3, 0]);
        ee.extend_from_slice(&[0u8; 8]);
        let mut err = Vec::new();
        let len = HDR + ee.len();
        err.extend_from_slice(&len.to_ne_bytes());
        err.extend_from_slice(&libc::IPPROTO_IP.to_ne_bytes());
        err.extend_from_slice(&libc::IP_RECVERR.to_ne_bytes());
        err.extend_from_slice(&ee);
        assert_eq!(extended_errno(&err), Some(libc::ECONNREFUSED));
        assert_eq!(extended_errno(&rx), None);
        assert_eq!(info.stride, 1350);
        assert_eq!(info.ecn, 2);
        assert_eq!(info.dst_ip, Some("127.0.0.2".parse().unwrap()));
        // A length running past the end stops the parser instead of reading beyond.
        let mut bad = rx.clone();
        bad[..ALIGN].copy_from_slice(&4096usize.to_ne_bytes());
        assert_eq!(parse(&bad), RecvInfo::default());
    }

    #[test]
    fn addresses_parse_from_kernel_layout() {
        for a in ["192.0.2.7:443", "[2001:db8::1]:8443"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(sockaddr(&sockaddr_bytes(&addr.into())), Some(addr));
        }
        assert_eq!(sockaddr(&[0u8; 3]), None, "too short");
        assert_eq!(sockaddr(&[0u8; 28]), None, "AF_UNSPEC");
    }

    fn sockaddr_bytes(s: &socket2::SockAddr) -> Vec<u8> {
        let mut out = vec![0u8; s.len() as usize];
        match s.as_socket() {
            Some(SocketAddr::V4(v4)) => {
                out[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
                out[2..4].copy_from_slice(&v4.port().to_be_bytes());
                out[4..8].copy_from_slice(&v4.ip().octets());
            }
            Some(SocketAddr::V6(v6)) => {
                out[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
                out[2..4].copy_from_slice(&v6.port().to_be_bytes());
                out[8..24].copy_from_slice(&v6.ip().octets());
            }
            None => {}
        }
        out
    }

    fn words_as_bytes(w: &mut CmsgBuf) -> &mut [u8] {
        super::super::words_as_bytes(w)
    }
}
