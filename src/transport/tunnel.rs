//! The relay loop of one flow: capsules from the client to the target socket and target
//! datagrams back as capsules, for any transport that carries capsules on a byte stream
//! (an HTTP/2 request stream, an upgraded HTTP/1.1 connection).
//!
//! Reading down the loop follows a datagram both ways:
//!
//! ```text
//! client bytes --ClientRecv::recv--> CapsuleDecoder --Flow::on_client_datagram--> FlowSocket::send
//! FlowSocket::try_recv (worker scratch buffer) --Flow::on_target_datagram--> ClientSend::try_send
//! ```
//!
//! Nothing here waits to build a batch (RFC 9298 §6) and nothing queues without bound: a datagram
//! the target socket or the client side cannot take right now is dropped and counted.

use std::cell::RefCell;
use std::io;
use std::pin::pin;
use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use crate::io::udp::{FlowSocket, Recv, Sent};
use crate::metrics::{Direction, WorkerStats};
use crate::proto::capsule::{CapsuleDecoder, Event, MAX_UDP_PAYLOAD};
use crate::proto::connect_udp::HttpVersion;
use crate::relay::flow::{ClientDatagram, CloseReason, DropReason, Flow};
use crate::worker::WorkerCtx;

/// Target datagrams read per wake-up of one flow before the others get a turn.
const RECV_BUDGET: usize = 64;

thread_local! {
    /// One receive buffer per worker thread, shared by all its flows: a flow reads a datagram,
    /// encodes it for the client and gives the buffer back before it next awaits.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_UDP_PAYLOAD + 1]);
}

/// Runs `f` with the worker's shared receive buffer (large enough for any UDP payload). A flow
/// holds it only between two awaits, so one buffer per worker serves every flow and an idle
/// flow costs no receive buffer at all.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with_borrow_mut(|buf| f(buf))
}

/// Why the client side is gone.
#[derive(Debug, thiserror::Error)]
pub enum ClientGone {
    #[error("client reset the stream: {0}")]
    Reset(String),
    #[error("client connection failed: {0}")]
    Io(#[from] io::Error),
}

/// The client-to-relay half of a tunnel.
pub(crate) trait ClientRecv {
    /// The next chunk of capsule bytes; `Ok(None)` when the client finished its side cleanly.
    async fn recv(&mut self) -> Result<Option<Bytes>, ClientGone>;
    /// `n` bytes of a received chunk are processed: flow-control credit may go back.
    fn release(&mut self, n: usize);
}

/// The relay-to-client half of a tunnel.
pub(crate) trait ClientSend {
    /// Encodes one DATAGRAM capsule (context 0) for the client if there is room now; returns
    /// false, having queued nothing, when the client cannot take more.
    fn try_send_datagram(&mut self, payload: &[u8]) -> bool;
    /// Makes progress on queued output; never completes while there is nothing to do.
    async fn drive(&mut self) -> Result<(), ClientGone>;
    /// Ends the relay's side cleanly (END_STREAM, or TLS close on HTTP/1.1).
    async fn finish(self);
    /// Aborts the stream: `protocol_error` for a client that broke the capsule protocol,
    /// otherwise the target side failed.
    fn abort(self, protocol_error: bool);
}

/// Runs one flow until it ends; returns why.
pub(crate) async fn run<R: ClientRecv, S: ClientSend>(
    ctx: &WorkerCtx,
    version: HttpVersion,
    sock: FlowSocket,
    mut recv: R,
    mut send: S,
    first_chunk: Option<Bytes>,
    // Held for the flow's life: its slots in the connection, identity and relay caps.
    ticket: Option<super::admit::Ticket>,
) -> CloseReason {
    // The configuration in force when the flow opened stays with it (a reload does not move
    // an established flow).
    let shared = ctx.shared();
    let cfg = &shared.config;
    let stats = &*ctx.stats;
    let opened = Instant::now();
    let mut flow = Flow::new(opened, cfg.flow_idle_timeout, cfg.max_udp_payload)
        .with_rate_limit(cfg.limits.datagrams_per_second, opened);
    let mut decoder = CapsuleDecoder::new(cfg.max_udp_payload);
    let mut phase = ctx.phase.clone();
    let mut idle = pin!(tokio::time::sleep_until(flow.poll_timeout().into()));

    let mut reason = first_chunk
        .and_then(|c| client_capsules(version, &mut flow, &mut decoder, &sock, stats, &c));
    while reason.is_none() {
        reason = tokio::select! {
            biased;
            () = crate::worker::reached(&mut phase, crate::worker::Phase::Stop) => Some(CloseReason::Drain),
            chunk = recv.recv() => match chunk {
                Ok(Some(chunk)) => {
                    let r = client_capsules(version, &mut flow, &mut decoder, &sock, stats, &chunk);
                    recv.release(chunk.len());
                    r
                }
                Ok(None) => match decoder.finish() {
                    Ok(()) => Some(CloseReason::ClientEnd),
                    Err(e) => {
                        debug!(target = %sock.target(), error = %e, "capsule stream truncated");
                        Some(CloseReason::ClientProtocolError)
                    }
                },
                Err(e) => {
                    debug!(target = %sock.target(), error = %e, "client side gone");
                    Some(CloseReason::ClientAbort)
                }
            },
            () = sock.readable() => target_ready(version, &mut flow, &sock, &mut send, ctx),
            r = send.drive() => r.err().map(|e| {
                debug!(target = %sock.target(), error = %e, "client side gone");
                CloseReason::ClientAbort
            }),
            () = &mut idle => {
                let now = Instant::now();
                let r = flow.handle_timeout(now);
                idle.as_mut().reset(flow.poll_timeout().into());
                r
            }
        };
    }
    let reason = reason.unwrap_or(CloseReason::ClientAbort);
    match reason {
        CloseReason::ClientEnd | CloseReason::Idle | CloseReason::Drain => send.finish().await,
        CloseReason::ClientProtocolError => send.abort(true),
        CloseReason::TargetError => send.abort(false),
        CloseReason::ClientAbort => {}
    }
    let c = flow.counters();
    let lifetime = flow.age(Instant::now());
    debug!(
        target = %sock.target(),
        reason = reason.as_str(),
        to_target = c.to_target_datagrams,
        to_client = c.to_client_datagrams,
        dropped = c.dropped,
        identity = ?ticket.as_ref().and_then(|t| t.identity.as_deref()),
        lifetime_ms = lifetime.as_millis() as u64,
        "flow closed"
    );
    stats.flow_lifetime_seconds.observe(lifetime);
    stats.flow_closed(reason);
    reason
}

/// Sends one HTTP Datagram payload from the client to the target, as the flow decides;
/// returns a close reason if the flow must end. Shared by every transport: QUIC DATAGRAM
/// frames and capsules alike end up here.
pub(crate) fn forward_to_target(
    version: HttpVersion,
    flow: &mut Flow,
    sock: &FlowSocket,
    context_id: u64,
    payload: &[u8],
    now: Instant,
    stats: &WorkerStats,
) -> Option<CloseReason> {
    match flow.on_client_datagram(now, context_id, payload.len() as u64) {
        ClientDatagram::Forward => match sock.send(payload) {
            Sent::Ok => stats.datagram(version, Direction::ToTarget, payload.len()),
            Sent::WouldBlock => {
                flow.on_target_send_failed(payload.len());
                stats.dropped(DropReason::TargetBusy);
            }
            Sent::TooLarge => {
                flow.on_target_send_failed(payload.len());
                stats.dropped(DropReason::TooLarge);
            }
            Sent::TargetError => return Some(CloseReason::TargetError),
        },
        ClientDatagram::Drop(r) => stats.dropped(r),
        ClientDatagram::Abort => return Some(CloseReason::ClientProtocolError),
    }
    None
}

/// Decodes one chunk of a client's capsule stream and forwards its datagrams; returns a close
/// reason if the flow must end (a malformed capsule, an oversize payload, a target error).
pub(crate) fn client_capsules(
    version: HttpVersion,
    flow: &mut Flow,
    decoder: &mut CapsuleDecoder,
    sock: &FlowSocket,
    stats: &WorkerStats,
    chunk: &[u8],
) -> Option<CloseReason> {
    let now = Instant::now();
    let mut close = None;
    let res = decoder.decode(chunk, |ev| {
        if close.is_some() {
            return;
        }
        match ev {
            Event::Datagram {
                context_id,
                payload,
            } => close = forward_to_target(version, flow, sock, context_id, payload, now, stats),
            Event::DatagramTooLarge {
                context_id,
                payload_len,
            } => {
                // Skipped by the decoder without buffering; the flow decides between a drop
                // (over our configured limit) and an abort (over what UDP can carry).
                match flow.on_client_datagram(now, context_id, payload_len) {
                    ClientDatagram::Abort => close = Some(CloseReason::ClientProtocolError),
                    ClientDatagram::Drop(r) => stats.dropped(r),
                    ClientDatagram::Forward => {
                        flow.on_target_send_failed(payload_len as usize);
                        stats.dropped(DropReason::TooLarge);
                    }
                }
            }
            Event::Unknown { .. } => stats.capsules_unknown.inc(),
        }
    });
    if let Err(e) = res {
        debug!(target = %sock.target(), error = %e, "malformed capsule");
        return Some(CloseReason::ClientProtocolError);
    }
    close
}

/// Drains what the target socket holds (up to a budget) towards the client.
fn target_ready<S: ClientSend>(
    version: HttpVersion,
    flow: &mut Flow,
    sock: &FlowSocket,
    send: &mut S,
    ctx: &WorkerCtx,
) -> Option<CloseReason> {
    let stats = &*ctx.stats;
    SCRATCH.with_borrow_mut(|buf| {
        for _ in 0..RECV_BUDGET {
            match sock.try_recv(buf) {
                None => return None,
                Some(Recv::TargetError(e)) => {
                    debug!(target = %sock.target(), error = %e, "target socket error");
                    return Some(CloseReason::TargetError);
                }
                Some(Recv::Datagram(n)) => {
                    if let Err(r) = flow.on_target_datagram(Instant::now(), n) {
                        stats.dropped(r);
                    } else if send.try_send_datagram(&buf[..n]) {
                        flow.on_sent_to_client(n);
                        stats.datagram(version, Direction::ToClient, n);
                    } else {
                        flow.on_dropped();
                        stats.dropped(DropReason::ClientNotReading);
                    }
                }
            }
        }
        None
    })
}
