//! The target side of a request before its flow opens: resolve the host (before the response,
//! RFC 9298 §3.1) and apply the target policy to every resolved address; the first address the
//! policy allows is the flow's target. Every refusal is a [`Rejection`] with its `Proxy-Status`
//! error, and nothing is opened for a refused request. The egress socket comes after (the
//! worker's flow table).

use std::net::SocketAddr;

use tracing::debug;

use crate::ctx::Shared;
pub use crate::io::resolve::{Resolution, Resolve, SystemResolver};
use crate::proto::connect_udp::Rejection;
use crate::proto::sf::ProxyError;
use crate::proto::target::{Target, TargetHost};

/// Resolves a host name (within `resolve_timeout_ms`). IP literals need no resolution: see
/// [`Target::socket_addr`].
pub async fn resolve(shared: &Shared, name: &str, port: u16) -> Result<Vec<SocketAddr>, Rejection> {
    let lookup = shared.resolver.resolve(name, port);
    match tokio::time::timeout(shared.config.resolve_timeout, lookup).await {
        Err(_) => Err(Rejection::new(
            504,
            Some(ProxyError::DnsTimeout),
            "resolution timed out",
        )),
        Ok(Err(e)) => {
            debug!(host = %name, error = %e, "resolution failed");
            Err(Rejection::new(
                502,
                Some(ProxyError::DnsError),
                "resolution failed",
            ))
        }
        Ok(Ok(addrs)) if addrs.is_empty() => Err(Rejection::new(
            502,
            Some(ProxyError::DnsError),
            "no address",
        )),
        Ok(Ok(addrs)) => Ok(addrs),
    }
}

/// The target's name when it must be resolved first, else its address.
pub fn literal(target: &Target) -> Result<SocketAddr, &str> {
    match &target.host {
        TargetHost::Ip(ip) => Ok(SocketAddr::new(*ip, target.port)),
        TargetHost::Name(name) => Err(name),
    }
}

/// The first address the policy allows. The policy applies to resolved addresses, not names
/// (a name can point at 127.0.0.1).
pub fn choose(shared: &Shared, addrs: &[SocketAddr]) -> Result<SocketAddr, Rejection> {
    let mut denied = None;
    for &addr in addrs {
        match shared.policy.check(addr) {
            Ok(()) => return Ok(addr),
            Err(reason) => {
                debug!(%addr, reason = reason.as_str(), "target refused by policy");
                denied.get_or_insert(reason);
            }
        }
    }
    let reason = denied.map_or("denied", |r| r.as_str());
    Err(Rejection::new(
        403,
        Some(ProxyError::DestinationIpProhibited),
        reason,
    ))
}

/// The refusal for an egress socket that could not be opened.
pub fn socket_error(e: &std::io::Error) -> Rejection {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            Rejection::new(503, Some(ProxyError::ProxyInternalError), "out of sockets")
        }
        _ => Rejection::new(
            502,
            Some(ProxyError::DestinationIpUnroutable),
            "cannot reach target",
        ),
    }
}
