//! Socket options that `socket2` does not expose, set with `setsockopt(2)`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

pub(crate) fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int on our stack and we pass its exact size; the kernel only
    // reads `optlen` bytes from `optval` and does not keep the pointer.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals; the kernel writes at most `len` bytes into
    // `value` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the Don't Fragment behaviour: the kernel never fragments, and a datagram larger than
/// the path MTU fails with EMSGSIZE (RFC 9298 §3.1: UDP proxies never fragment).
pub fn set_dont_fragment(sock: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    let fd = sock.as_raw_fd();
    if ipv6 {
        set_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )?;
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    } else {
        set_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    }
}

/// Reads the path-MTU discovery mode (for tests and diagnostics).
pub fn mtu_discover(sock: &impl AsRawFd, ipv6: bool) -> io::Result<i32> {
    let fd = sock.as_raw_fd();
    if ipv6 {
        get_int(fd, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
    } else {
        get_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
    }
}

/// The value `mtu_discover` reports once `set_dont_fragment` has been applied.
pub const PMTUDISC_DO: i32 = libc::IP_PMTUDISC_DO;

/// Reads the traffic class / TOS byte outgoing packets carry (for tests and diagnostics).
pub fn traffic_class(sock: &impl AsRawFd, ipv6: bool) -> io::Result<i32> {
    let fd = sock.as_raw_fd();
    if ipv6 {
        get_int(fd, libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
    } else {
        get_int(fd, libc::IPPROTO_IP, libc::IP_TOS)
    }
}
