//! Opening the target side of a flow: resolve the host (before the response, RFC 9298 §3.1),
//! apply the target policy to every resolved address, and connect a socket to the first one the
//! policy allows. Every refusal comes back as a [`Rejection`] with its `Proxy-Status` error, and
//! no socket exists for a refused request.

use std::io;
use std::net::SocketAddr;

use tracing::debug;

use crate::ctx::WorkerCtx;
pub use crate::io::resolve::{Resolution, Resolve, SystemResolver};
use crate::io::udp::FlowSocket;
use crate::proto::connect_udp::HttpVersion;
use crate::proto::connect_udp::Rejection;
use crate::proto::sf::ProxyError;
use crate::proto::target::{Target, TargetHost};

/// Resolves, checks and connects.
pub(crate) async fn open(
    ctx: &WorkerCtx,
    target: &Target,
    version: HttpVersion,
) -> Result<FlowSocket, Rejection> {
    let shared = ctx.shared();
    let addrs: Vec<SocketAddr> = match &target.host {
        TargetHost::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        TargetHost::Name(name) => {
            let lookup = shared.resolver.resolve(name, target.port);
            match tokio::time::timeout(shared.config.resolve_timeout, lookup).await {
                Err(_) => {
                    ctx.stats.resolve_failures.inc();
                    return Err(Rejection::new(
                        504,
                        Some(ProxyError::DnsTimeout),
                        "resolution timed out",
                    ));
                }
                Ok(Err(e)) => {
                    ctx.stats.resolve_failures.inc();
                    debug!(host = %name, error = %e, "resolution failed");
                    return Err(Rejection::new(
                        502,
                        Some(ProxyError::DnsError),
                        "resolution failed",
                    ));
                }
                Ok(Ok(addrs)) => addrs,
            }
        }
    };
    if addrs.is_empty() {
        ctx.stats.resolve_failures.inc();
        return Err(Rejection::new(
            502,
            Some(ProxyError::DnsError),
            "no address",
        ));
    }
    // The policy applies to resolved addresses, not names (a name can point at 127.0.0.1).
    // Addresses the policy refuses are skipped; if none is left the request is refused.
    let mut denied = None;
    let mut last_err = None;
    for addr in addrs {
        if let Err(reason) = shared.policy.check(addr) {
            debug!(%addr, reason = reason.as_str(), "target refused by policy");
            denied.get_or_insert(reason);
            continue;
        }
        match FlowSocket::connect(addr, version) {
            Ok(sock) => return Ok(sock),
            Err(e) => {
                debug!(%addr, error = %e, "cannot open target socket");
                last_err = Some(e);
            }
        }
    }
    if let Some(e) = last_err {
        return Err(socket_error(&e));
    }
    let reason = denied.map_or("denied", |r| r.as_str());
    Err(Rejection::new(
        403,
        Some(ProxyError::DestinationIpProhibited),
        reason,
    ))
}

fn socket_error(e: &io::Error) -> Rejection {
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
