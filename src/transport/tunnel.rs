//! The relay loop of one flow: capsules from the client to the target socket and target
//! datagrams back as capsules, for any transport that carries capsules on a byte stream
//! (an HTTP/2 request stream, an upgraded HTTP/1.1 connection).
//!
//! Reading down the loop follows a datagram both ways:
//!
//! ```text
//! client bytes --ClientRecv::recv--> CapsuleDecoder --Flow::on_client_datagram--> FlowSocket::send
//!   (the payload as a slice of the decrypted chunk: no copy)
//! FlowSocket::try_recv (a pool buffer, read in place) --Flow::on_target_datagram-->
//!   ClientSend::try_send_datagram (the one copy, into the client's framing)
//! ```
//!
//! Nothing here waits to build a batch (RFC 9298 §6) and nothing queues without bound: a datagram
//! the target socket or the client side cannot take right now is dropped and counted.

use std::io;
use std::pin::pin;
use std::time::Instant;

use bytes::Bytes;
use tracing::debug;

use crate::ctx::WorkerCtx;
use crate::io::udp::{FlowSocket, Sent};
use crate::metrics::{Direction, WorkerStats};
use crate::proto::capsule::{CapsuleDecoder, Event};
use crate::proto::connect_udp::HttpVersion;
use crate::relay::flow::{ClientDatagram, CloseReason, DropReason, Flow};

/// Target datagrams read per wake-up of one flow before the others get a turn.
const RECV_BUDGET: usize = 64;

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

    let mut reason =
        first_chunk.and_then(|c| client_capsules(&mut flow, &mut decoder, &sock, stats, &c));
    while reason.is_none() {
        reason = tokio::select! {
            biased;
            () = crate::ctx::reached(&mut phase, crate::ctx::Phase::Stop) => Some(CloseReason::Drain),
            chunk = recv.recv() => match chunk {
                Ok(Some(chunk)) => {
                    let r = client_capsules(&mut flow, &mut decoder, &sock, stats, &chunk);
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
/// The payload is a slice of the buffer it was decrypted into; it is sent from there. Datagrams
/// are counted as relayed when the kernel has taken them (by the datagram engine).
pub(crate) fn forward_to_target(
    flow: &mut Flow,
    sock: &FlowSocket,
    context_id: u64,
    payload: Bytes,
    now: Instant,
    stats: &WorkerStats,
) -> Option<CloseReason> {
    let len = payload.len();
    match flow.on_client_datagram(now, context_id, len as u64) {
        ClientDatagram::Forward => match sock.send(payload) {
            Sent::Queued => {}
            Sent::WouldBlock => {
                flow.on_target_send_failed(len);
                stats.dropped(DropReason::TargetBusy);
            }
        },
        ClientDatagram::Drop(r) => stats.dropped(r),
        ClientDatagram::Abort => return Some(CloseReason::ClientProtocolError),
    }
    None
}

/// Decodes one chunk of a client's capsule stream and forwards its datagrams; returns a close
/// reason if the flow must end (a malformed capsule, an oversize payload, a target error).
pub(crate) fn client_capsules(
    flow: &mut Flow,
    decoder: &mut CapsuleDecoder,
    sock: &FlowSocket,
    stats: &WorkerStats,
    chunk: &Bytes,
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
            } => {
                let payload = share(chunk, payload);
                close = forward_to_target(flow, sock, context_id, payload, now, stats)
            }
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

/// The payload as a `Bytes`: a slice of the chunk when it lies inside it (no copy); a copy
/// only for a capsule the decoder had to reassemble across chunks.
fn share(chunk: &Bytes, payload: &[u8]) -> Bytes {
    let (c, p) = (chunk.as_ptr() as usize, payload.as_ptr() as usize);
    if p >= c && p + payload.len() <= c + chunk.len() {
        chunk.slice_ref(payload)
    } else {
        Bytes::copy_from_slice(payload)
    }
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
    for _ in 0..RECV_BUDGET {
        match sock.try_recv() {
            None => return None,
            Some(Err(e)) => {
                debug!(target = %sock.target(), error = %e, "target socket error");
                return Some(CloseReason::TargetError);
            }
            Some(Ok(rx)) => {
                let d = rx.data();
                let n = d.len();
                if let Err(r) = flow.on_target_datagram(Instant::now(), n) {
                    stats.dropped(r);
                } else if send.try_send_datagram(d) {
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
}
