//! Workers: one thread per core, each with its own single-threaded runtime, its own
//! SO_REUSEPORT listener, and every connection, stream and flow it accepted. Nothing on the data
//! path is shared between workers. The control thread talks to them through two watch
//! channels: the [`Phase`](crate::ctx::Phase) (run, drain, stop) and the live
//! [`Shared`](crate::ctx::Shared) state that a reload
//! (SIGHUP) replaces. Connections read the live state when they start; flows keep what they
//! started with, so a reload never disturbs an established flow.

use std::net::TcpListener;
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::ctx::{reached, Phase, WorkerCtx};
use crate::io::dgram::{Backend, Engine, Sizes};
use crate::metrics::{ConnectionClose, HandshakeFailure};
use crate::proto::connect_udp::HttpVersion;
use crate::transport::{h2, http1, tls};

pub(crate) mod core;

pub use self::core::bench::PassBench;

/// Runs a worker on the current thread until shutdown: accepts TCP connections and serves them.
pub fn run(
    ctx: WorkerCtx,
    listener: TcpListener,
    quic: Option<(Arc<quinn_proto::ServerConfig>, std::net::UdpSocket)>,
    core: Option<core_affinity::CoreId>,
    (backend, sizes): (Backend, Sizes),
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
        // The datagram engine serves every UDP socket of this worker.
        let stats = ctx.stats.io.clone();
        let engine = match Engine::new(backend, sizes, stats.clone()) {
            Ok(e) => e,
            Err(e) if backend == Backend::Uring => {
                warn!(worker = ctx.id, error = %e, "io_uring engine failed; using the fallback");
                match Engine::new(Backend::Mmsg, sizes, stats) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(worker = ctx.id, error = %e, "cannot start the datagram engine");
                        return;
                    }
                }
            }
            Err(e) => {
                warn!(worker = ctx.id, error = %e, "cannot start the datagram engine");
                return;
            }
        };
        ctx.stats.set_io_backend(engine.backend().as_str());
        let engine = std::rc::Rc::new(engine);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let quic = quic.map(|(server, socket)| (socket, server));
        let pass = core::Core::new(ctx.clone(), engine, quic, tx.clone());
        let pass = tokio::task::spawn_local(pass.run(rx));
        let mut phase = ctx.phase.clone();
        // Returns when the relay drains; the listener closes with it, so the kernel sends new
        // connections to any other process on the same port.
        accept_loop(ctx, listener, tx).await;
        // Established connections and flows go on until stop; then the pass ends every flow
        // and closes the QUIC connections (CONNECTION_CLOSE) before the runtime goes away.
        reached(&mut phase, Phase::Stop).await;
        let _ = pass.await;
        // The HTTP/2 and HTTP/1.1 connections write the ends of their streams.
        for _ in 0..10 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    // Connection tasks still open are dropped with the LocalSet; the engine went with the pass,
    // after the kernel had finished with its buffers.
    drop(local);
}

async fn accept_loop(
    ctx: WorkerCtx,
    listener: TcpListener,
    tx: tokio::sync::mpsc::UnboundedSender<crate::transport::link::CoreMsg>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(worker = ctx.id, error = %e, "cannot register the listener");
            return;
        }
    };
    let mut phase = ctx.phase.clone();
    // Per-worker counts of TLS handshakes in progress and of open connections: beyond the
    // limits a new connection is closed at once instead of taking memory and file descriptors.
    let handshaking = std::rc::Rc::new(std::cell::Cell::new(0usize));
    // Numbers the connections for the worker's pass.
    let mut next_conn: u32 = 0;
    let open = std::rc::Rc::new(std::cell::Cell::new(0usize));
    loop {
        let (tcp, peer) = tokio::select! {
            () = reached(&mut phase, Phase::Drain) => break,
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
        let limits = ctx.shared().config.limits.clone();
        if handshaking.get() >= limits.max_pending_handshakes
            || open.get() >= limits.max_connections_per_worker
        {
            ctx.stats.handshake_failure(HandshakeFailure::Refused);
            debug!(%peer, "connection refused: too many handshakes or connections");
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let (handshaking, open) = (handshaking.clone(), open.clone());
        next_conn = next_conn.wrapping_add(1);
        let conn = next_conn;
        let tx = tx.clone();
        tokio::task::spawn_local(async move {
            let _open = CountGuard::new(&open);
            let in_handshake = CountGuard::new(&handshaking);
            let shared = ctx.shared();
            // The certificate in force when the connection arrives (a reload swaps it).
            let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
            let timeout = shared.config.handshake_timeout;
            let started = std::time::Instant::now();
            // Under TLS, so progress means bytes the kernel took, not bytes rustls buffered: a
            // client that reads none of them for this long is cut (SECURITY.md 7).
            let tcp = crate::transport::stall::StallGuard::new(
                tcp,
                shared.config.http2.write_stall_timeout(),
            );
            let stalled = tcp.stalled();
            let tls = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
            drop(in_handshake);
            let tls = match tls {
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
            // With mTLS the handshake proved who the client is.
            let tls_identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| tls::cert_identity(c));
            let version = if is_h2 {
                HttpVersion::Http2
            } else {
                HttpVersion::Http11
            };
            ctx.stats.handshake_seconds.observe(started.elapsed());
            ctx.stats.connection_accepted(version);
            debug!(%peer, protocol = version.as_str(), "connection accepted");
            let (result, why) = if is_h2 {
                match h2::serve(ctx.clone(), tls, tx, conn, tls_identity).await {
                    Ok(()) => (Ok(()), ConnectionClose::Normal),
                    Err(e) if e.is_io() => (Err(e.to_string()), ConnectionClose::IoError),
                    Err(e) => (Err(e.to_string()), ConnectionClose::ProtocolError),
                }
            } else {
                match http1::serve(ctx.clone(), tls, tx, conn, tls_identity).await {
                    Ok(()) => (Ok(()), ConnectionClose::Normal),
                    Err(e) => (Err(e.to_string()), ConnectionClose::IoError),
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            let why = if stalled.get() {
                ConnectionClose::WriteStall
            } else {
                why
            };
            ctx.stats.connection_ended(version, why);
        });
    }
    // Closed before the log line says so: an operator (or a test) handing the port over to a
    // new process can rely on it.
    drop(listener);
    info!(worker = ctx.id, "worker stopped accepting");
}

/// Counts something in progress for as long as it lives.
struct CountGuard(std::rc::Rc<std::cell::Cell<usize>>);

impl CountGuard {
    fn new(c: &std::rc::Rc<std::cell::Cell<usize>>) -> Self {
        c.set(c.get() + 1);
        Self(c.clone())
    }
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}
