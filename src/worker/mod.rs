//! Workers: one thread per core, each with its own single-threaded runtime, its own
//! SO_REUSEPORT listener, and every connection, stream and flow it accepted. Nothing on the data
//! path is shared between workers; the control thread only signals shutdown.

use std::net::TcpListener;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::Checked;
use crate::metrics::{ConnectionClose, HandshakeFailure, WorkerStats};
use crate::proto::connect_udp::HttpVersion;
use crate::relay::policy::TargetPolicy;
use crate::transport::target::Resolve;
use crate::transport::{h2, http1, tls};

/// Read-only state shared by all workers.
#[derive(Debug)]
pub struct Shared {
    pub config: Checked,
    pub policy: TargetPolicy,
    pub tls: Arc<rustls::ServerConfig>,
    pub resolver: Arc<dyn Resolve>,
}

/// What one worker's tasks have at hand.
#[derive(Debug, Clone)]
pub struct WorkerCtx {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub stats: Arc<WorkerStats>,
    /// Flips to true when the relay shuts down.
    pub shutdown: watch::Receiver<bool>,
}

/// Runs a worker on the current thread until shutdown: accepts TCP connections and serves them.
pub fn run(
    ctx: WorkerCtx,
    listener: TcpListener,
    quic: Option<(Arc<quinn_proto::ServerConfig>, std::net::UdpSocket)>,
    core: Option<core_affinity::CoreId>,
) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core) {
            warn!(
                worker = ctx.id,
                core = core.id,
                "cannot pin worker to its core"
            );
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(worker = ctx.id, error = %e, "cannot build the worker runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let quic = quic.map(|(server, socket)| {
            let workers = ctx.shared.config.workers;
            tokio::task::spawn_local(crate::transport::quic::run(
                ctx.clone(),
                socket,
                server,
                workers,
            ))
        });
        accept_loop(ctx, listener).await;
        // The QUIC side closes its connections (CONNECTION_CLOSE) before the runtime goes away.
        if let Some(q) = quic {
            let _ = q.await;
        }
    });
}

async fn accept_loop(ctx: WorkerCtx, listener: TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(worker = ctx.id, error = %e, "cannot register the listener");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.shared.tls.clone());
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(worker = ctx.id, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        tokio::task::spawn_local(async move {
            let timeout = ctx.shared.config.handshake_timeout;
            let started = std::time::Instant::now();
            let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    ctx.stats.handshake_failure(HandshakeFailure::Tls);
                    debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    ctx.stats.handshake_failure(HandshakeFailure::Timeout);
                    debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let is_h2 = tls.get_ref().1.alpn_protocol() == Some(tls::ALPN_H2);
            let version = if is_h2 {
                HttpVersion::Http2
            } else {
                HttpVersion::Http11
            };
            ctx.stats.handshake_seconds.observe(started.elapsed());
            ctx.stats.connection_accepted(version);
            debug!(%peer, protocol = version.as_str(), "connection accepted");
            let (result, why) = if is_h2 {
                match h2::serve(ctx.clone(), tls).await {
                    Ok(()) => (Ok(()), ConnectionClose::Normal),
                    Err(e) if e.is_io() => (Err(e.to_string()), ConnectionClose::IoError),
                    Err(e) => (Err(e.to_string()), ConnectionClose::ProtocolError),
                }
            } else {
                match http1::serve(ctx.clone(), tls).await {
                    Ok(()) => (Ok(()), ConnectionClose::Normal),
                    Err(e) => (Err(e.to_string()), ConnectionClose::IoError),
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            ctx.stats.connection_ended(version, why);
        });
    }
    info!(worker = ctx.id, "worker stopped accepting");
}
