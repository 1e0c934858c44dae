//! The worker pass: one task per worker that owns the datagram engine, the QUIC endpoint with
//! its HTTP/3 sessions, the flow table and the egress sockets, and runs passes over them. No
//! task per flow, no state shared between tasks: HTTP/2 and HTTP/1.1 connections (tasks of
//! their own, since the `h2` crate and TLS are async) send what they read through a channel
//! ([`CoreMsg`]) and the pass writes to them through the `h2` crate's stream handles (HTTP/2)
//! or a bounded channel (HTTP/1.1).
//!
//! ```text
//! wait (engine fd, messages, the next deadline)
//! pass: engine.complete()                      completions -> socket backlogs
//!       QUIC socket  -> QuicDriver::handle_packet
//!       egress sockets -> flow table (socket, source) -> client: HTTP/3 session / h2 stream / HTTP/1.1
//!       messages     -> requests, capsules (-> target), stream ends
//!       timers       -> QUIC timeouts, idle flows
//!       drive        -> QuicDriver::drive_dirty -> session events: requests (admission -> open),
//!                       datagrams (-> target), stream ends
//!       ICMP errors  -> flows end
//!       engine.flush()                         sends queued this pass, one submission
//! ```
//!
//! Every step has a budget; what is left makes the next pass come at once (after the
//! worker's other tasks have run) instead of waiting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use quinn_proto::{ConnectionHandle, StreamId, VarInt};
use rustc_hash::FxHashMap;
use slab::Slab;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::ctx::{Phase, WorkerCtx};
use crate::io::dgram::{Engine, Role, SockError, SockId};
use crate::metrics::{send_tag, Direction};
use crate::proto::capsule::{self, CapsuleDecoder, Event as CapsuleEvent};
use crate::proto::connect_udp::{HttpVersion, Rejection};
use crate::relay::admission::{admit, Admitted, ConnAdmission};
use crate::relay::auth::CHALLENGE;
use crate::relay::flow::{ClientDatagram, CloseReason, DropReason, Flow};
use crate::relay::flow_table::{Assign, ClientRef, FlowId, FlowTable, TargetRef};
use crate::relay::h3::{share, Accepted, Event as H3Event};
use crate::transport::link::{CoreMsg, Credit, TcpAnswer, TcpConnId, TcpCtl};
use crate::transport::quic::{self, EngineOut, QuicDriver};
use crate::transport::target;

/// QUIC datagrams (GRO segments) handed to the driver per pass.
const QUIC_BUDGET: usize = 256;
/// Receives (datagrams or GRO trains) read from one egress socket per pass.
const SOCKET_BUDGET: usize = 64;
/// Receives from all egress sockets per pass.
const EGRESS_BUDGET: usize = 1024;
/// Messages from connection tasks per pass.
const MESSAGE_BUDGET: usize = 1024;
/// Idle flows closed per pass.
const EXPIRE_BUDGET: usize = 1024;
/// Rounds of driving the QUIC connections and handling their events per pass.
const DRIVE_ROUNDS: usize = 3;
/// Capsule chunks held per stream while its request is being opened.
const EARLY_CHUNKS: usize = 16;

/// Who asked for a flow.
enum Asker {
    H3 {
        ch: ConnectionHandle,
        stream: StreamId,
    },
    Tcp {
        conn: TcpConnId,
        stream: u32,
        answer: TcpAnswer,
    },
}

/// A request admitted and waiting for its target's name to resolve.
struct Pending {
    serial: u64,
    asker: Asker,
    version: HttpVersion,
    admitted: Admitted,
    started: Instant,
}

/// How target datagrams reach a TCP client.
enum TcpOut {
    H2(h2::SendStream<Bytes>),
    H1(mpsc::Sender<Bytes>),
}

struct TcpFlow {
    flow: FlowId,
    out: TcpOut,
}

/// What arrived on a stream whose request is still being opened.
#[derive(Default)]
struct Early {
    chunks: Vec<Bytes>,
    ended: Option<CloseReason>,
}

struct TcpConn {
    version: HttpVersion,
    admission: ConnAdmission,
    streams: HashMap<u32, TcpFlow>,
    early: HashMap<u32, Early>,
    ctl: mpsc::UnboundedSender<TcpCtl>,
    credit: Arc<Credit>,
}

/// The pass's state.
pub(crate) struct Core {
    ctx: WorkerCtx,
    engine: Rc<Engine>,
    quic_sock: Option<SockId>,
    driver: Option<QuicDriver>,
    flows: FlowTable,
    /// Egress sockets by the flow table's index (`None`: retired, the index free for reuse).
    egress: Vec<Option<SockId>>,
    /// Retired egress indices.
    egress_free: Vec<u32>,
    /// The flow table's index of an egress socket, by its engine slot.
    egress_index: FxHashMap<u32, u32>,
    tcp: FxHashMap<TcpConnId, TcpConn>,
    pending: Slab<Pending>,
    serial: u64,
    tx: mpsc::UnboundedSender<CoreMsg>,
    // Scratch, kept for their allocations.
    ready: Vec<SockId>,
    carry: Vec<SockId>,
    errors: Vec<SockError>,
    evented: Vec<ConnectionHandle>,
    expired: Vec<(FlowId, CloseReason)>,
    ended: Vec<FlowId>,
    decoded: Vec<(u64, Result<Bytes, u64>)>,
    retired: Vec<u32>,
}

fn stream_id(raw: u64) -> StreamId {
    StreamId::from(VarInt::from_u64(raw).unwrap_or(VarInt::MAX))
}

impl Core {
    pub fn new(
        ctx: WorkerCtx,
        engine: Rc<Engine>,
        quic: Option<(
            std::net::UdpSocket,
            std::sync::Arc<quinn_proto::ServerConfig>,
        )>,
        tx: mpsc::UnboundedSender<CoreMsg>,
    ) -> Core {
        let mut quic_sock = None;
        let mut driver = None;
        if let Some((socket, server)) = quic {
            match quic::register(&engine, socket) {
                Ok((sock, max_gso, allow_mtud)) => {
                    let out = Box::new(EngineOut {
                        engine: engine.clone(),
                        sock,
                    });
                    let workers = ctx.shared().config.workers;
                    quic_sock = Some(sock);
                    driver = Some(QuicDriver::new(
                        ctx.clone(),
                        out,
                        max_gso,
                        allow_mtud,
                        server,
                        workers,
                    ));
                }
                Err(e) => warn!(worker = ctx.id, error = %e, "cannot register the QUIC socket"),
            }
        }
        Core {
            ctx,
            engine,
            quic_sock,
            driver,
            flows: FlowTable::new(),
            egress: Vec::new(),
            egress_free: Vec::new(),
            egress_index: FxHashMap::default(),
            tcp: FxHashMap::default(),
            pending: Slab::new(),
            serial: 0,
            tx,
            ready: Vec::new(),
            carry: Vec::new(),
            errors: Vec::new(),
            evented: Vec::new(),
            expired: Vec::new(),
            ended: Vec::new(),
            decoded: Vec::new(),
            retired: Vec::new(),
        }
    }

    /// Runs passes until the relay stops, then ends every flow and connection.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<CoreMsg>) {
        let mut phase = self.ctx.phase.clone();
        let mut live = self.ctx.live.clone();
        let mut draining = false;
        // A first pass at once: it submits what registering the sockets queued (their
        // receives).
        let mut more = true;
        loop {
            if more {
                // Work left by a budget: the next pass comes at once, after the worker's other
                // tasks have had their turn.
                tokio::task::yield_now().await;
            } else {
                let deadline = self.next_deadline();
                let sleep = async {
                    match deadline {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = phase.changed() => {}
                    r = live.changed() => {
                        if r.is_ok() {
                            let quic = live.borrow_and_update().quic.clone();
                            if let Some(d) = &mut self.driver {
                                d.set_server_config(quic);
                            }
                        }
                    }
                    () = self.engine.wait() => {}
                    msg = rx.recv() => {
                        if let Some(m) = msg {
                            self.message(m, Instant::now());
                        }
                    }
                    () = sleep => {}
                }
            }
            match *phase.borrow_and_update() {
                Phase::Stop => break,
                Phase::Drain if !draining => {
                    draining = true;
                    if let Some(d) = &mut self.driver {
                        d.begin_drain();
                    }
                }
                _ => {}
            }
            more = self.pass(&mut rx, Instant::now());
        }
        self.shutdown(Instant::now());
    }

    fn next_deadline(&self) -> Option<Instant> {
        let q = self.driver.as_ref().and_then(QuicDriver::next_timeout);
        let f = self.flows.next_deadline();
        match (q, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One pass; true when a budget left work for the next one.
    pub fn pass(&mut self, rx: &mut mpsc::UnboundedReceiver<CoreMsg>, now: Instant) -> bool {
        let mut more = self.engine.complete();
        more |= self.quic_in(now);
        more |= self.egress_in(now);
        for _ in 0..MESSAGE_BUDGET {
            match rx.try_recv() {
                Ok(m) => self.message(m, now),
                Err(_) => break,
            }
        }
        more |= !rx.is_empty();
        self.timers(now);
        self.errors(now);
        more |= self.drive(now);
        self.engine.flush();
        more || self.engine.pending()
    }

    /// Packets from clients, into the QUIC driver.
    fn quic_in(&mut self, now: Instant) -> bool {
        let (Some(sock), Some(d)) = (self.quic_sock, self.driver.as_mut()) else {
            return false;
        };
        let mut handled = 0;
        while handled < QUIC_BUDGET {
            let Some(rx) = self.engine.try_recv(sock) else {
                return false;
            };
            let Some(addr) = rx.addr else {
                continue;
            };
            for seg in rx.datagrams() {
                handled += 1;
                d.handle_packet(now, addr, rx.info.dst_ip, rx.info.ecn, seg);
            }
        }
        true
    }

    /// Datagrams from targets, to their flows' clients.
    fn egress_in(&mut self, now: Instant) -> bool {
        let mut socks = std::mem::take(&mut self.ready);
        socks.clear();
        socks.append(&mut self.carry);
        self.engine.take_ready(&mut socks);
        let mut total = 0;
        let mut left = std::mem::take(&mut self.carry);
        for (i, &sock) in socks.iter().enumerate() {
            if Some(sock) == self.quic_sock {
                continue; // read by quic_in
            }
            if total >= EGRESS_BUDGET {
                left.extend_from_slice(&socks[i..]);
                break;
            }
            let Some(&egress) = self.egress_index.get(&sock.index()) else {
                continue;
            };
            let engine = self.engine.clone();
            let mut n = 0;
            while n < SOCKET_BUDGET {
                let Some(rx) = engine.try_recv(sock) else {
                    break;
                };
                n += 1;
                let Some(src) = rx.addr else {
                    continue;
                };
                let Some(id) = self.flows.demux(egress, src) else {
                    // Not a flow's target: a third host, or a late reply to a closed flow.
                    let count = rx.datagrams().count() as u64;
                    self.ctx.stats.dropped_n(DropReason::UnknownSource, count);
                    continue;
                };
                for seg in rx.datagrams() {
                    self.deliver_to_client(id, seg, now);
                }
            }
            total += n;
            if n == SOCKET_BUDGET {
                left.push(sock);
            }
        }
        self.ready = socks;
        let more = !left.is_empty();
        self.carry = left;
        more
    }

    /// One target datagram to its flow's client.
    fn deliver_to_client(&mut self, id: FlowId, data: &[u8], now: Instant) {
        let stats = &*self.ctx.stats;
        let Some(e) = self.flows.get_mut(id) else {
            return;
        };
        let n = data.len();
        if let Err(r) = e.flow.on_target_datagram(now, n) {
            stats.dropped(r);
            return;
        }
        let version = e.version;
        let sent = match e.client {
            ClientRef::H3 { conn, stream } => {
                let ch = ConnectionHandle(conn as usize);
                match self.driver.as_mut().and_then(|d| {
                    let r = d
                        .conns
                        .get_mut(&ch)
                        .map(|c| c.session.send_datagram(stream_id(stream), data));
                    d.touch(ch);
                    r
                }) {
                    Some(Ok(())) => Ok(()),
                    Some(Err(r)) => Err(r),
                    None => Err(DropReason::NoFlow),
                }
            }
            ClientRef::Tcp { conn, stream } => match self
                .tcp
                .get_mut(&conn)
                .and_then(|t| t.streams.get_mut(&stream))
            {
                Some(TcpFlow { out, .. }) => tcp_send(out, data),
                None => Err(DropReason::NoFlow),
            },
        };
        match sent {
            Ok(()) => {
                e.flow.on_sent_to_client(n);
                stats.datagram(version, Direction::ToClient, n);
            }
            Err(r) => {
                e.flow.on_dropped();
                stats.dropped(r);
            }
        }
    }

    /// One client datagram (context ID and payload, a slice of the buffer it was decrypted
    /// in) to its flow's target; a close reason when the flow must end.
    fn forward(
        &mut self,
        id: FlowId,
        context_id: u64,
        payload: Bytes,
        now: Instant,
    ) -> Option<CloseReason> {
        let stats = &*self.ctx.stats;
        let e = self.flows.get_mut(id)?;
        match e
            .flow
            .on_client_datagram(now, context_id, payload.len() as u64)
        {
            ClientDatagram::Forward => {
                let sock = self.egress[e.target.egress as usize]?;
                let len = payload.len();
                // A full send queue is counted by the engine.
                if !self
                    .engine
                    .send(sock, e.target.addr, payload, send_tag(e.version))
                {
                    e.flow.on_target_send_failed(len);
                }
            }
            ClientDatagram::Drop(r) => stats.dropped(r),
            ClientDatagram::Abort => return Some(CloseReason::ClientProtocolError),
        }
        None
    }

    /// A DATAGRAM capsule too large to buffer was skipped.
    fn too_large(
        &mut self,
        id: FlowId,
        context_id: u64,
        len: u64,
        now: Instant,
    ) -> Option<CloseReason> {
        let stats = &*self.ctx.stats;
        let e = self.flows.get_mut(id)?;
        match e.flow.on_client_datagram(now, context_id, len) {
            ClientDatagram::Abort => return Some(CloseReason::ClientProtocolError),
            ClientDatagram::Drop(r) => stats.dropped(r),
            ClientDatagram::Forward => {
                e.flow.on_target_send_failed(len as usize);
                stats.dropped(DropReason::TooLarge);
            }
        }
        None
    }

    /// Capsule bytes from a TCP client: decoded with the flow's decoder, forwarded.
    fn capsules(&mut self, id: FlowId, chunk: &Bytes, now: Instant) -> Option<CloseReason> {
        let mut decoder = self.flows.get_mut(id)?.decoder.take()?;
        let mut out = std::mem::take(&mut self.decoded);
        out.clear();
        let res = decoder.decode(chunk, |ev| match ev {
            CapsuleEvent::Datagram {
                context_id,
                payload,
            } => out.push((context_id, Ok(share(chunk, payload)))),
            CapsuleEvent::DatagramTooLarge {
                context_id,
                payload_len,
            } => out.push((context_id, Err(payload_len))),
            CapsuleEvent::Unknown { .. } => self.ctx.stats.capsules_unknown.inc(),
        });
        if let Some(e) = self.flows.get_mut(id) {
            e.decoder = Some(decoder);
        }
        let mut close = None;
        for (context_id, d) in out.drain(..) {
            if close.is_some() {
                continue;
            }
            close = match d {
                Ok(payload) => self.forward(id, context_id, payload, now),
                Err(len) => self.too_large(id, context_id, len, now),
            };
        }
        self.decoded = out;
        if close.is_some() {
            return close;
        }
        if let Err(e) = res {
            debug!(error = %e, "malformed capsule");
            return Some(CloseReason::ClientProtocolError);
        }
        None
    }

    fn message(&mut self, m: CoreMsg, now: Instant) {
        match m {
            CoreMsg::TcpOpen {
                conn,
                version,
                tls_identity,
                ctl,
                credit,
            } => {
                let admission = ConnAdmission::new(&self.ctx.shared().config, tls_identity, now);
                self.tcp.insert(
                    conn,
                    TcpConn {
                        version,
                        admission,
                        streams: HashMap::new(),
                        early: HashMap::new(),
                        ctl,
                        credit,
                    },
                );
            }
            CoreMsg::Request {
                conn,
                stream,
                request,
                started,
                answer,
            } => {
                let shared = self.ctx.shared();
                let phase = self.ctx.phase();
                let Some(t) = self.tcp.get_mut(&conn) else {
                    return;
                };
                let version = t.version;
                let admitted = admit(
                    &request.head(),
                    request.proxy_authorization.as_deref(),
                    &shared,
                    phase,
                    &mut t.admission,
                    now,
                );
                if admitted.is_ok() {
                    t.early.insert(stream, Early::default());
                }
                let asker = Asker::Tcp {
                    conn,
                    stream,
                    answer,
                };
                self.decide(asker, version, admitted, started, now);
            }
            CoreMsg::Chunk { conn, stream, data } => {
                let Some(t) = self.tcp.get_mut(&conn) else {
                    return;
                };
                // Taken: relayed, dropped or held (a bounded few) below.
                t.credit.give_back(data.len());
                if let Some(f) = t.streams.get(&stream) {
                    let id = f.flow;
                    if let Some(r) = self.capsules(id, &data, now) {
                        self.close_flow(id, r, false, now);
                    }
                } else if let Some(early) = t.early.get_mut(&stream) {
                    // Capsules sent before the response (RFC 9298 lets a client be optimistic):
                    // relayed once the flow opens, within bounds.
                    if early.chunks.len() < EARLY_CHUNKS {
                        early.chunks.push(data);
                    } else {
                        self.ctx.stats.dropped(DropReason::NoFlow);
                    }
                } else {
                    self.ctx.stats.dropped(DropReason::NoFlow);
                }
            }
            CoreMsg::ClientEnd {
                conn,
                stream,
                reason,
            } => {
                let Some(t) = self.tcp.get_mut(&conn) else {
                    return;
                };
                if let Some(f) = t.streams.get(&stream) {
                    let id = f.flow;
                    let reason = match (reason, self.flows.get_mut(id)) {
                        (CloseReason::ClientEnd, Some(e)) => {
                            // A capsule cut off by the end of the stream is malformed.
                            match e.decoder.as_mut().map(|d| d.finish()) {
                                Some(Err(_)) => CloseReason::ClientProtocolError,
                                _ => CloseReason::ClientEnd,
                            }
                        }
                        (r, _) => r,
                    };
                    // The client ended its side; the relay ends its own (or aborts on a
                    // protocol error).
                    let by_client = reason == CloseReason::ClientAbort;
                    self.close_flow(id, reason, by_client, now);
                } else if let Some(early) = t.early.get_mut(&stream) {
                    early.ended = Some(reason);
                }
            }
            CoreMsg::TcpClosed { conn } => {
                if let Some(t) = self.tcp.get(&conn) {
                    let ids: Vec<FlowId> = t.streams.values().map(|f| f.flow).collect();
                    for id in ids {
                        self.close_flow(id, CloseReason::ClientAbort, true, now);
                    }
                }
                self.tcp.remove(&conn);
            }
            CoreMsg::Resolved {
                key,
                serial,
                result,
            } => {
                if self.pending.get(key).is_some_and(|p| p.serial == serial) {
                    let p = self.pending.remove(key);
                    self.open_target(p.asker, p.version, p.admitted, result, p.started, now);
                }
            }
        }
    }

    /// After admission: refuse, open at once (an IP literal), or resolve first (a name, on a
    /// task of its own; the answer comes back as a message).
    fn decide(
        &mut self,
        asker: Asker,
        version: HttpVersion,
        admitted: Result<Admitted, Rejection>,
        started: Instant,
        now: Instant,
    ) {
        let admitted = match admitted {
            Ok(a) => a,
            Err(r) => return self.answer(asker, version, Err(r), started, now),
        };
        match target::literal(&admitted.target) {
            Ok(addr) => self.open_target(asker, version, admitted, Ok(vec![addr]), started, now),
            Err(name) => {
                let (name, port) = (name.to_owned(), admitted.target.port);
                self.serial += 1;
                let serial = self.serial;
                let key = self.pending.insert(Pending {
                    serial,
                    asker,
                    version,
                    admitted,
                    started,
                });
                let shared = self.ctx.shared();
                let tx = self.tx.clone();
                let stats = self.ctx.stats.clone();
                tokio::task::spawn_local(async move {
                    let result = target::resolve(&shared, &name, port).await;
                    if result.is_err() {
                        stats.resolve_failures.inc();
                    }
                    let _ = tx.send(CoreMsg::Resolved {
                        key,
                        serial,
                        result,
                    });
                });
            }
        }
    }

    /// The target's addresses are known: apply the policy, pick an egress socket, open the
    /// flow, answer.
    fn open_target(
        &mut self,
        asker: Asker,
        version: HttpVersion,
        admitted: Admitted,
        addrs: Result<Vec<SocketAddr>, Rejection>,
        started: Instant,
        now: Instant,
    ) {
        let shared = self.ctx.shared();
        let chosen = addrs
            .and_then(|a| target::choose(&shared, &a))
            .and_then(|addr| self.egress_for(addr, now).map(|e| (addr, e)));
        let (addr, egress) = match chosen {
            Ok(x) => x,
            Err(r) => {
                self.admission_closed(&asker);
                return self.answer(asker, version, Err(r), started, now);
            }
        };
        let cfg = &shared.config;
        let flow = Flow::new(now, cfg.flow_idle_timeout, cfg.max_udp_payload)
            .with_rate_limit(cfg.limits.datagrams_per_second, now);
        let (client, decoder) = match &asker {
            Asker::H3 { ch, stream } => (
                ClientRef::H3 {
                    // quinn-proto's handles are slab indices: far below 2^32.
                    conn: ch.0 as u32,
                    stream: u64::from(VarInt::from(*stream)),
                },
                None,
            ),
            Asker::Tcp { conn, stream, .. } => (
                ClientRef::Tcp {
                    conn: *conn,
                    stream: *stream,
                },
                Some(Box::new(CapsuleDecoder::new(cfg.max_udp_payload))),
            ),
        };
        let id = self.flows.open(
            flow,
            client,
            version,
            TargetRef { egress, addr },
            decoder,
            admitted.permit,
            now,
        );
        self.answer(asker, version, Ok(id), started, now);
    }

    /// The egress socket for a new flow to `target`, opening one when every socket already
    /// serves that target.
    fn egress_for(&mut self, target: SocketAddr, now: Instant) -> Result<u32, Rejection> {
        loop {
            match self.flows.assign(target, now) {
                Assign::Socket(e) => return Ok(e),
                Assign::NeedSocket => {
                    let shared = self.ctx.shared();
                    let io = &shared.config.io;
                    let ipv6 = target.is_ipv6();
                    if self.flows.egress_count(ipv6) >= io.egress_sockets_max as usize {
                        return Err(Rejection::new(
                            503,
                            Some(crate::proto::sf::ProxyError::ProxyInternalError),
                            "no egress socket left for this target",
                        ));
                    }
                    let gro = io.target_buffer_size >= 65_536;
                    let sock =
                        crate::io::udp::open_egress(ipv6, None, io.egress_socket_buffer, gro)
                            .and_then(|s| self.engine.register(s, Role::Egress))
                            .map_err(|e| {
                                debug!(error = %e, "cannot open an egress socket");
                                target::socket_error(&e)
                            })?;
                    let idx = match self.egress_free.pop() {
                        Some(i) => {
                            self.egress[i as usize] = Some(sock);
                            i
                        }
                        None => {
                            self.egress.push(Some(sock));
                            (self.egress.len() - 1) as u32
                        }
                    };
                    self.egress_index.insert(sock.index(), idx);
                    self.flows.add_egress(ipv6, idx, now);
                    self.ctx
                        .stats
                        .egress_sockets
                        .set(self.egress_index.len() as u64);
                }
            }
        }
    }

    /// An admitted request did not become a flow: its connection slot comes back.
    fn admission_closed(&mut self, asker: &Asker) {
        match asker {
            Asker::H3 { ch, .. } => {
                if let Some(c) = self.driver.as_mut().and_then(|d| d.conns.get_mut(ch)) {
                    c.admission.flow_closed();
                }
            }
            Asker::Tcp { conn, stream, .. } => {
                if let Some(t) = self.tcp.get_mut(conn) {
                    t.admission.flow_closed();
                    t.early.remove(stream);
                }
            }
        }
    }

    /// Answers a request: the refusal, or the success response with the flow relaying from
    /// now on. Recorded here, for every HTTP version.
    fn answer(
        &mut self,
        asker: Asker,
        version: HttpVersion,
        result: Result<FlowId, Rejection>,
        started: Instant,
        now: Instant,
    ) {
        let stats = self.ctx.stats.clone();
        let took = now.saturating_duration_since(started);
        match asker {
            Asker::H3 { ch, stream } => {
                let Some(d) = self.driver.as_mut() else {
                    return;
                };
                d.touch(ch);
                let Some(c) = d.conns.get_mut(&ch) else {
                    if let Ok(id) = result {
                        self.discard(id, now);
                    }
                    return;
                };
                match result {
                    Err(r) => {
                        if c.session.respond(stream, &r, CHALLENGE) {
                            debug!(status = r.status, details = %r.details, "h3 request refused");
                            stats.answered(version, r.status, Some(&r), took);
                        }
                    }
                    Ok(id) => match c.session.accept(stream, id) {
                        Accepted::Open => {
                            self.opened(id, version, 200, took);
                            self.session_events(ch, now);
                        }
                        Accepted::EndedByClient => {
                            self.opened(id, version, 200, took);
                            self.close_flow(id, CloseReason::ClientEnd, true, now);
                        }
                        Accepted::Gone => self.discard(id, now),
                    },
                }
            }
            Asker::Tcp {
                conn,
                stream,
                answer,
            } => {
                let early = self
                    .tcp
                    .get_mut(&conn)
                    .and_then(|t| t.early.remove(&stream))
                    .unwrap_or_default();
                match (answer, result) {
                    (TcpAnswer::H2(mut respond), Err(r)) => {
                        debug!(status = r.status, details = %r.details, "h2 request refused");
                        let _ = respond.send_response(error_response(version, &r), true);
                        stats.answered(version, r.status, Some(&r), took);
                    }
                    (TcpAnswer::H1 { reply, .. }, Err(r)) => {
                        debug!(status = r.status, details = %r.details, "http/1.1 request refused");
                        stats.answered(version, r.status, Some(&r), took);
                        let _ = reply.send(Err(r));
                    }
                    (answer, Ok(id)) => {
                        let out = match answer {
                            TcpAnswer::H2(mut respond) => {
                                let response = http::Response::builder()
                                    .status(http::StatusCode::OK)
                                    .header("capsule-protocol", "?1")
                                    .body(())
                                    .expect("static response is valid");
                                match respond.send_response(response, false) {
                                    Ok(s) => Some((TcpOut::H2(s), 200)),
                                    Err(e) => {
                                        debug!(error = %e, "client went away before the response");
                                        None
                                    }
                                }
                            }
                            TcpAnswer::H1 { reply, out } => {
                                reply.send(Ok(())).ok().map(|()| (TcpOut::H1(out), 101))
                            }
                        };
                        let Some((out, status)) = out else {
                            return self.discard(id, now);
                        };
                        let Some(t) = self.tcp.get_mut(&conn) else {
                            return self.discard(id, now);
                        };
                        t.streams.insert(stream, TcpFlow { flow: id, out });
                        self.opened(id, version, status, took);
                        for chunk in early.chunks {
                            if let Some(r) = self.capsules(id, &chunk, now) {
                                return self.close_flow(id, r, false, now);
                            }
                        }
                        if let Some(reason) = early.ended {
                            let by_client = reason == CloseReason::ClientAbort;
                            self.close_flow(id, reason, by_client, now);
                        }
                    }
                }
            }
        }
    }

    fn opened(&self, id: FlowId, version: HttpVersion, status: u16, took: Duration) {
        let stats = &self.ctx.stats;
        stats.answered(version, status, None, took);
        stats.flows_opened.inc();
        if let Some(e) = self.flows.get(id) {
            debug!(target = %e.target.addr, identity = ?e.permit.identity(), protocol = version.as_str(), "flow opened");
        }
    }

    /// Removes a flow that never opened (its client went away before the answer).
    fn discard(&mut self, id: FlowId, now: Instant) {
        if let Some(e) = self.flows.close(id, now) {
            self.release(&e.client);
        }
    }

    /// Gives the flow's slot back to its connection.
    fn release(&mut self, client: &ClientRef) {
        match *client {
            ClientRef::H3 { conn, .. } => {
                if let Some(c) = self
                    .driver
                    .as_mut()
                    .and_then(|d| d.conns.get_mut(&ConnectionHandle(conn as usize)))
                {
                    c.admission.flow_closed();
                }
            }
            ClientRef::Tcp { conn, .. } => {
                if let Some(t) = self.tcp.get_mut(&conn) {
                    t.admission.flow_closed();
                }
            }
        }
    }

    /// Ends a flow: out of the table, counted, and its client stream ended the way `reason`
    /// calls for, unless the client already ended it (`by_client`).
    fn close_flow(&mut self, id: FlowId, reason: CloseReason, by_client: bool, now: Instant) {
        let Some(e) = self.flows.close(id, now) else {
            return;
        };
        let stats = &self.ctx.stats;
        let c = e.flow.counters();
        let lifetime = e.flow.age(now);
        debug!(
            target = %e.target.addr,
            reason = reason.as_str(),
            to_target = c.to_target_datagrams,
            to_client = c.to_client_datagrams,
            dropped = c.dropped,
            identity = ?e.permit.identity(),
            lifetime_ms = lifetime.as_millis() as u64,
            "flow closed"
        );
        stats.flow_closed(reason);
        stats.flow_lifetime_seconds.observe(lifetime);
        self.release(&e.client);
        match e.client {
            ClientRef::H3 { conn, stream } => {
                if by_client {
                    return;
                }
                let ch = ConnectionHandle(conn as usize);
                if let Some(d) = self.driver.as_mut() {
                    if let Some(c) = d.conns.get_mut(&ch) {
                        c.session.end_flow(stream_id(stream), reason);
                    }
                    d.touch(ch);
                }
            }
            ClientRef::Tcp { conn, stream } => {
                let Some(t) = self.tcp.get_mut(&conn) else {
                    return;
                };
                let Some(f) = t.streams.remove(&stream) else {
                    return;
                };
                match f.out {
                    TcpOut::H2(mut send) => match reason {
                        // RFC 9297 §3.3: a malformed capsule stream is a malformed message:
                        // RST_STREAM(PROTOCOL_ERROR). A failed target is reported like a failed
                        // CONNECT tunnel (RFC 9113 §8.5): CONNECT_ERROR.
                        CloseReason::ClientProtocolError => {
                            send.send_reset(h2::Reason::PROTOCOL_ERROR)
                        }
                        CloseReason::TargetError => send.send_reset(h2::Reason::CONNECT_ERROR),
                        CloseReason::ClientAbort => {}
                        CloseReason::ClientEnd | CloseReason::Idle | CloseReason::Drain => {
                            let _ = send.send_data(Bytes::new(), true);
                        }
                    },
                    // HTTP/1.1 carries one flow: the connection closes with it.
                    TcpOut::H1(out) => drop(out),
                }
                if !by_client {
                    let _ = t.ctl.send(TcpCtl::Drop(stream));
                }
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        if let Some(d) = self.driver.as_mut() {
            d.timeouts(now);
        }
        let mut expired = std::mem::take(&mut self.expired);
        self.flows.expired(now, EXPIRE_BUDGET, &mut expired);
        for (id, reason) in expired.drain(..) {
            self.close_flow(id, reason, false, now);
        }
        self.expired = expired;
        // Egress sockets left idle after a burst of flows close.
        let mut retired = std::mem::take(&mut self.retired);
        self.flows.retire(now, &mut retired);
        for i in retired.drain(..) {
            if let Some(sock) = self.egress[i as usize].take() {
                self.egress_index.remove(&sock.index());
                self.engine.close(sock);
                self.egress_free.push(i);
            }
        }
        self.retired = retired;
        self.ctx
            .stats
            .egress_sockets
            .set(self.egress_index.len() as u64);
    }

    /// ICMP errors from egress sockets: each ends the flow to its destination.
    fn errors(&mut self, now: Instant) {
        self.engine.take_errors(&mut self.errors);
        let errors = std::mem::take(&mut self.errors);
        for err in &errors {
            let Some(&egress) = self.egress_index.get(&err.sock.index()) else {
                continue;
            };
            let Some(id) = self.flows.demux(egress, err.dest) else {
                continue;
            };
            if err.errno == libc::EMSGSIZE {
                // Over the path MTU (ICMP "fragmentation needed"): that datagram is lost, the
                // flow goes on (RFC 9298 §3.1: never fragment).
                self.ctx.stats.dropped(DropReason::TooLarge);
                continue;
            }
            debug!(target = %err.dest, errno = err.errno, "target unreachable");
            self.close_flow(id, CloseReason::TargetError, false, now);
        }
        self.errors = errors;
        self.errors.clear();
    }

    /// Drives the QUIC connections and handles their sessions' events, a few rounds (handling
    /// events makes connections dirty again: responses, datagrams to send).
    fn drive(&mut self, now: Instant) -> bool {
        let mut more = false;
        for _ in 0..DRIVE_ROUNDS {
            let Some(d) = self.driver.as_mut() else {
                return false;
            };
            if !d.has_dirty() {
                break;
            }
            let work = d.drive_dirty(now);
            more = work.more;
            let mut evented = std::mem::take(&mut self.evented);
            d.take_evented(&mut evented);
            let mut ended = std::mem::take(&mut self.ended);
            d.take_ended(&mut ended);
            for id in ended.drain(..) {
                self.close_flow(id, CloseReason::ClientAbort, true, now);
            }
            self.ended = ended;
            for ch in evented.drain(..) {
                self.session_events(ch, now);
            }
            self.evented = evented;
        }
        more || self.driver.as_ref().is_some_and(QuicDriver::has_dirty)
    }

    fn session_events(&mut self, ch: ConnectionHandle, now: Instant) {
        loop {
            let Some(d) = self.driver.as_mut() else {
                return;
            };
            let Some(ev) = d.conns.get_mut(&ch).and_then(|c| c.session.poll_event()) else {
                return;
            };
            d.touch(ch);
            match ev {
                H3Event::Connected => {
                    let Some(c) = d.conns.get_mut(&ch) else {
                        return;
                    };
                    let stats = &self.ctx.stats;
                    stats.connection_accepted(HttpVersion::Http3);
                    stats
                        .handshake_seconds
                        .observe(now.saturating_duration_since(c.session.started()));
                    // With mTLS the handshake proved who the client is.
                    c.admission.tls_identity = c
                        .session
                        .conn
                        .crypto_session()
                        .peer_identity()
                        .and_then(|any| {
                            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                                .ok()
                        })
                        .and_then(|certs| {
                            certs
                                .first()
                                .map(|c| crate::transport::tls::cert_identity(c))
                        });
                }
                H3Event::Request { stream, request } => {
                    let shared = self.ctx.shared();
                    let phase = self.ctx.phase();
                    let Some(c) = d.conns.get_mut(&ch) else {
                        return;
                    };
                    let admitted = request.and_then(|r| {
                        admit(
                            &r.head(),
                            r.proxy_authorization.as_deref(),
                            &shared,
                            phase,
                            &mut c.admission,
                            now,
                        )
                    });
                    self.decide(
                        Asker::H3 { ch, stream },
                        HttpVersion::Http3,
                        admitted,
                        now,
                        now,
                    );
                }
                H3Event::Datagram {
                    flow,
                    context_id,
                    payload,
                } => {
                    if let Some(r) = self.forward(flow, context_id, payload, now) {
                        self.close_flow(flow, r, false, now);
                    }
                }
                H3Event::DatagramTooLarge {
                    flow,
                    context_id,
                    len,
                } => {
                    if let Some(r) = self.too_large(flow, context_id, len, now) {
                        self.close_flow(flow, r, false, now);
                    }
                }
                H3Event::FlowEnded { flow, reason } => self.close_flow(flow, reason, true, now),
                H3Event::Lost => {
                    let flows = d
                        .conns
                        .get_mut(&ch)
                        .map(|c| c.session.take_flows())
                        .unwrap_or_default();
                    for id in flows {
                        self.close_flow(id, CloseReason::ClientAbort, true, now);
                    }
                }
            }
        }
    }

    /// The relay stops: every flow ends (counted as ended by the drain), every QUIC
    /// connection closes with H3_NO_ERROR, and the last sends go out.
    fn shutdown(&mut self, now: Instant) {
        for id in self.flows.ids() {
            self.close_flow(id, CloseReason::Drain, false, now);
        }
        if let Some(d) = self.driver.as_mut() {
            for id in d.shutdown(now) {
                self.close_flow(id, CloseReason::Drain, true, now);
            }
        }
        self.engine.flush();
    }
}

/// Encodes one DATAGRAM capsule (context 0) for a TCP client if there is room now.
fn tcp_send(out: &mut TcpOut, payload: &[u8]) -> Result<(), DropReason> {
    let len = capsule::datagram_header_len(0, payload.len()) + payload.len();
    match out {
        TcpOut::H2(stream) => {
            // Ask for exactly this capsule's worth of flow-control credit and send only if it
            // is there now. h2 caps a stream's capacity at max_send_buffer_size minus what it
            // still holds unsent, so a client that stops reading sees its datagrams dropped,
            // not queued.
            stream.reserve_capacity(len);
            if stream.capacity() < len {
                // Give back whatever was assigned so idle capacity is not hoarded.
                stream.reserve_capacity(0);
                return Err(DropReason::ClientNotReading);
            }
            // The one copy of a target datagram on its way to the client: into the worker's
            // arena (no allocation per capsule), from which h2 writes the DATA frame.
            let c = crate::relay::arena::take(crate::relay::arena::Use::Tx, len, |b| {
                capsule::encode_datagram_header(0, payload.len(), b);
                b.put_slice(payload);
            })
            .freeze();
            stream
                .send_data(c, false)
                .map_err(|_| DropReason::ClientNotReading)
        }
        TcpOut::H1(tx) => {
            let permit = tx.try_reserve().map_err(|_| DropReason::ClientNotReading)?;
            let c = crate::relay::arena::take(crate::relay::arena::Use::Tx, len, |b| {
                capsule::encode_datagram_header(0, payload.len(), b);
                b.put_slice(payload);
            })
            .freeze();
            permit.send(c);
            Ok(())
        }
    }
}

/// The HTTP/2 response of a refusal.
fn error_response(version: HttpVersion, r: &Rejection) -> http::Response<()> {
    let mut b = http::Response::builder().status(r.status);
    for (name, value) in r.header_fields(version, CHALLENGE) {
        b = b.header(name, value);
    }
    b.body(()).unwrap_or_else(|_| {
        let mut resp = http::Response::new(());
        *resp.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        resp
    })
}

/// The worker's pass in memory, for benchmarks (`bench/benches/worker_pass.rs`) and tests:
/// the real [`Core`] on the in-memory datagram engine, with an in-memory quinn-proto client
/// whose flows are open. Only the pass is timed; the client's side (encryption of its packets,
/// reading what the relay sent) happens outside.
#[doc(hidden)]
pub mod bench {
    use std::net::UdpSocket;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::{BufMut, BytesMut};
    use quinn_proto::{ClientConfig, Dir, Endpoint, EndpointConfig};

    use super::*;
    use crate::io::dgram::memory::SentTransmit;
    use crate::io::dgram::{Backend, Sizes};

    const CLIENT: &str = "127.0.0.1:40000";

    /// A worker with an HTTP/3 client and its flows.
    pub struct PassBench {
        _rt: tokio::runtime::Runtime,
        core: Core,
        rx: mpsc::UnboundedReceiver<CoreMsg>,
        engine: Rc<Engine>,
        quic_sock: SockId,
        server: SocketAddr,
        client: Endpoint,
        cch: quinn_proto::ConnectionHandle,
        conn: quinn_proto::Connection,
        /// Per flow: quarter stream ID, target, egress socket.
        flows: Vec<(u64, SocketAddr, SockId)>,
        sent: Vec<SentTransmit>,
        _phase: tokio::sync::watch::Sender<Phase>,
        _live: tokio::sync::watch::Sender<std::sync::Arc<crate::ctx::Shared>>,
        next: usize,
    }

    impl std::fmt::Debug for PassBench {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PassBench")
                .field("flows", &self.flows.len())
                .finish_non_exhaustive()
        }
    }

    impl PassBench {
        /// A worker with `flows` HTTP/3 flows open on one connection, to targets
        /// 192.0.2.1:1000 and up (a documentation range the configuration allows).
        pub fn h3(flows: usize) -> PassBench {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let guard = rt.enter();
            let dir = std::env::temp_dir().join(format!(
                "masque-pass-bench-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
                .expect("certificate");
            let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
            std::fs::write(&cert, ck.cert.pem()).expect("write");
            std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write");
            let mut config = crate::config::Config {
                cert: Some(cert),
                key: Some(key),
                allow_targets: vec!["192.0.2.0/24".to_owned()],
                ..Default::default()
            };
            config.limits.new_flows_per_second = 0;
            config.limits.datagrams_per_second = 0;
            config.http3.max_concurrent_streams = flows as u32 + 8;
            config.limits.max_flows_per_connection = flows + 8;
            let config = config.validate().expect("configuration");
            let (shared, _) = crate::live_state(
                config,
                None,
                std::sync::Arc::new(crate::io::resolve::SystemResolver),
                crate::relay::limits::FlowLimiter::new(0, 0),
                Default::default(),
            )
            .expect("state");
            let _ = std::fs::remove_dir_all(&dir);
            let server_cfg = shared.quic.clone().expect("QUIC");
            let (live_tx, live) = tokio::sync::watch::channel(std::sync::Arc::new(shared));
            let (phase_tx, phase) = tokio::sync::watch::channel(Phase::Run);
            let ctx = WorkerCtx {
                id: 0,
                live,
                stats: Default::default(),
                phase,
            };
            let engine = Rc::new(
                Engine::new(Backend::Memory, Sizes::default(), ctx.stats.io.clone())
                    .expect("engine"),
            );
            let sock = UdpSocket::bind("127.0.0.1:0").expect("socket");
            let server = sock.local_addr().expect("address");
            let (tx, rx) = mpsc::unbounded_channel();
            let core = Core::new(ctx, engine.clone(), Some((sock, server_cfg)), tx);
            let quic_sock = core.quic_sock.expect("QUIC socket");
            drop(guard);
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ck.cert.der().clone()).expect("root");
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3")
                .with_root_certificates(roots)
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"h3".to_vec()];
            let crypto =
                quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
            let mut client_cfg = ClientConfig::new(Arc::new(crypto));
            let mut transport = quinn_proto::TransportConfig::default();
            transport
                .datagram_receive_buffer_size(Some(64 << 20))
                .datagram_send_buffer_size(64 << 20)
                .max_concurrent_bidi_streams(quinn_proto::VarInt::from_u32(flows as u32 + 8));
            // The client is not what is measured: a window large enough that each call sends
            // everything it was given at once.
            let mut cc = quinn_proto::congestion::NewRenoConfig::default();
            cc.initial_window(64 << 20);
            transport.congestion_controller_factory(Arc::new(cc));
            client_cfg.transport_config(Arc::new(transport));
            let mut client = Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None);
            let (cch, conn) = client
                .connect(Instant::now(), client_cfg, server, "localhost")
                .expect("connect");
            let mut b = PassBench {
                _rt: rt,
                core,
                rx,
                engine,
                quic_sock,
                server,
                client,
                cch,
                conn,
                flows: Vec::new(),
                sent: Vec::new(),
                _phase: phase_tx,
                _live: live_tx,
                next: 0,
            };
            b.settle(|b| !b.conn.is_handshaking());
            // SETTINGS (with SETTINGS_H3_DATAGRAM), then the requests.
            let ctrl = b.conn.streams().open(Dir::Uni).expect("uni stream");
            let _ = b
                .conn
                .send_stream(ctrl)
                .write(&[0x00, 0x04, 0x02, 0x33, 0x01]);
            let mut ids = Vec::new();
            for i in 0..flows {
                let id = b.conn.streams().open(Dir::Bi).expect("bidi stream");
                let path = format!("/.well-known/masque/udp/192.0.2.1/{}/", 1000 + i);
                let mut block = BytesMut::new();
                crate::proto::h3::qpack::encode_field_section(
                    &[
                        (b":method", b"CONNECT"),
                        (b":protocol", b"connect-udp"),
                        (b":scheme", b"https"),
                        (b":authority", b"localhost"),
                        (b":path", path.as_bytes()),
                        (b"capsule-protocol", b"?1"),
                    ],
                    &mut block,
                );
                let mut head = BytesMut::new();
                crate::proto::h3::frame::encode_headers_frame(&block, &mut head);
                let _ = b.conn.send_stream(id).write(&head);
                ids.push(id);
            }
            b.settle(|b| b.core.flows.len() == flows);
            assert_eq!(b.core.flows.len(), flows, "every flow opened");
            for id in b.core.flows.ids() {
                let e = b.core.flows.get(id).expect("flow");
                let ClientRef::H3 { stream, .. } = e.client else {
                    continue;
                };
                let sock = b.core.egress[e.target.egress as usize].expect("egress");
                b.flows.push((stream / 4, e.target.addr, sock));
            }
            b.flows.sort_by_key(|f| f.0);
            b
        }

        /// Runs passes and feeds the client until `done` or nothing moves.
        fn settle(&mut self, done: impl Fn(&Self) -> bool) {
            for _ in 0..2000 {
                let moved = self.client_out();
                self.pass();
                let back = self.client_in();
                if done(self) && !moved && !back {
                    return;
                }
            }
        }

        /// The client's packets into the relay's QUIC socket; true if there were any.
        fn client_out(&mut self) -> bool {
            let client: SocketAddr = CLIENT.parse().expect("address");
            let now = Instant::now();
            let mut any = false;
            let mut buf = Vec::with_capacity(1500);
            while let Some(t) = self.conn.poll_transmit(now, 1, &mut buf) {
                self.engine.inject(self.quic_sock, client, &buf[..t.size]);
                buf.clear();
                any = true;
            }
            while let Some(ev) = self.conn.poll_endpoint_events() {
                if let Some(ev) = self.client.handle_event(self.cch, ev) {
                    self.conn.handle_event(ev);
                }
            }
            any
        }

        /// What the relay sent the client, into the client; true if there was any.
        fn client_in(&mut self) -> bool {
            let now = Instant::now();
            self.engine.take_transmits(&mut self.sent);
            let any = !self.sent.is_empty();
            for t in self.sent.drain(..) {
                let seg = t.segment.unwrap_or(t.buf.len()).max(1);
                for d in t.buf.chunks(seg) {
                    let mut resp = Vec::new();
                    if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, ev)) = self
                        .client
                        .handle(now, self.server, None, None, d.into(), &mut resp)
                    {
                        self.conn.handle_event(ev);
                    }
                }
                self.engine.give_back_tx_buf(t.buf);
            }
            self.conn.handle_timeout(now);
            while self.conn.poll().is_some() {}
            while self.conn.datagrams().recv().is_some() {}
            any
        }

        fn pass(&mut self) -> Duration {
            let t = Instant::now();
            self.core.pass(&mut self.rx, t);
            t.elapsed()
        }

        /// `n` client datagrams of `size` bytes, spread over the flows (several to a packet
        /// where they fit), through one timed pass to the targets.
        pub fn client_to_target(&mut self, n: usize, size: usize) -> Duration {
            let payload = vec![0x5a; size];
            for _ in 0..n {
                let (qsid, _, _) = self.flows[self.next % self.flows.len()];
                self.next += 1;
                let mut d = BytesMut::with_capacity(size + 9);
                crate::proto::varint::write(qsid, &mut d);
                d.put_u8(0);
                d.put_slice(&payload);
                let _ = self.conn.datagrams().send(d.freeze(), false);
            }
            self.client_out();
            let took = self.pass();
            self.client_in();
            took
        }

        /// `n` target datagrams of `size` bytes, spread over the flows, through one timed pass
        /// to the client.
        pub fn target_to_client(&mut self, n: usize, size: usize) -> Duration {
            let payload = vec![0xa5; size];
            for _ in 0..n {
                let (_, target, sock) = self.flows[self.next % self.flows.len()];
                self.next += 1;
                self.engine.inject(sock, target, &payload);
            }
            let took = self.pass();
            self.client_in();
            self.client_out();
            self.pass();
            self.client_in();
            took
        }

        /// Datagrams the relay forwarded to targets and to the client so far.
        pub fn relayed(&self) -> (u64, u64) {
            let s = &self.core.ctx.stats;
            (
                s.datagrams_for(HttpVersion::Http3, Direction::ToTarget),
                s.datagrams_for(HttpVersion::Http3, Direction::ToClient),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bench::PassBench;

    #[test]
    fn the_pass_relays_both_ways_in_memory() {
        let mut b = PassBench::h3(100);
        let (t0, c0) = b.relayed();
        b.client_to_target(64, 1200);
        let (t1, _) = b.relayed();
        assert_eq!(t1 - t0, 64, "every client datagram went to its target");
        b.target_to_client(64, 1200);
        let (_, c1) = b.relayed();
        assert_eq!(c1 - c0, 64, "every target datagram went to the client");
    }
}
