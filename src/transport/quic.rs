//! QUIC for one worker: a `quinn_proto::Endpoint` driven by the worker's pass on the worker's
//! own SO_REUSEPORT socket, with connection IDs that name the worker.
//!
//! The driver follows quinn-proto's contract (see the doc of `quinn_proto::Connection`) and
//! does no I/O itself: packets come in through [`QuicDriver::handle_packet`], time through
//! `now`, and transmits leave through [`QuicOut`] (the worker's datagram engine, or a test's
//! queue):
//!
//! ```text
//! packet (a GRO segment) --> one copy --> Endpoint::handle --> NewConnection   -> accept / retry / refuse
//!                                                         --> ConnectionEvent -> Connection::handle_event
//!                                                         --> Response        -> send
//! timer --> Connection::handle_timeout
//! then for every connection touched, within the pass budget: poll_transmit (GSO) ->
//!   poll_timeout -> poll_endpoint_events (-> Endpoint::handle_event) -> the HTTP/3 session
//!   (`relay::h3`), whose events the worker takes with [`QuicDriver::take_evented`]
//! ```

use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::{
    ConnectionHandle, ConnectionId, ConnectionIdGenerator, DatagramEvent, Endpoint, EndpointConfig,
    IdleTimeout, MtuDiscoveryConfig, ServerConfig, TransportConfig, VarInt,
};
use rand::Rng;
use rustc_hash::{FxHashMap, FxHashSet};
use tracing::debug;

use crate::ctx::WorkerCtx;
use crate::io::dgram::{self, Engine, Role, SockId};
use crate::proto::connect_udp::HttpVersion;
use crate::relay::admission::ConnAdmission;
use crate::relay::flow_table::FlowId;
use crate::relay::h3::{H3Session, SessionConfig};
use crate::transport::tls::{self, Identity, TlsError};

/// ALPN for HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";
/// Length of the connection IDs the relay issues.
pub const CID_LEN: usize = 8;
/// Bytes in one GSO train at most (a UDP send carries at most 65,507).
const MAX_GSO_BYTES: usize = 65_000;
/// Connections polled in one pass at most; the rest stay marked for the next one.
const CONNS_PER_PASS: usize = 256;
/// Rounds (transmit, timer, endpoint events, HTTP/3 events) one connection gets per pass.
const ROUNDS_PER_CONN: usize = 4;
/// Transmits (each up to a GSO train) taken from one connection in one round.
const TRANSMITS_PER_ROUND: usize = 32;

/// Connection IDs whose first byte names the worker: `byte % workers == worker`. The reuseport
/// BPF program (`io::bpf`) reads that byte, so a client's packets reach the worker that owns its
/// connection even after its address changes. The rest of the ID is random.
#[derive(Debug, Clone, Copy)]
pub struct WorkerCid {
    worker: u8,
    workers: u8,
}

impl WorkerCid {
    pub fn new(worker: usize, workers: usize) -> Self {
        assert!((1..=256).contains(&workers) && worker < workers);
        Self {
            worker: worker as u8,
            workers: (workers - 1) as u8 + 1,
        }
    }

    /// The worker a connection ID (or the DCID of a packet) belongs to.
    pub fn worker_of(first_byte: u8, workers: usize) -> usize {
        usize::from(first_byte) % workers
    }
}

impl ConnectionIdGenerator for WorkerCid {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut rng = rand::rng();
        let mut bytes = [0u8; CID_LEN];
        rng.fill(&mut bytes[..]);
        // Any byte b with b % workers == worker; the multiple is random so IDs stay unlinkable.
        let n = u16::from(self.workers);
        let spans = 256 / n;
        bytes[0] = (u16::from(self.worker) + n * rng.random_range(0..spans)) as u8;
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() == CID_LEN && cid[0] % self.workers == self.worker {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The anti-amplification limit of RFC 9000 §8.1, enforced at the socket: until the client's
/// address is validated, at most three times the bytes received from it are sent.
#[derive(Debug, Default, Clone, Copy)]
pub struct Amplification {
    received: u64,
    sent: u64,
    validated: bool,
}

impl Amplification {
    /// `len` bytes arrived from the peer; `validates` when they prove its address.
    pub fn received(&mut self, len: usize, validates: bool) {
        self.received += len as u64;
        self.validated |= validates;
    }

    /// How many bytes of a transmit of `len` bytes (datagrams of `segment` bytes, the last one
    /// possibly shorter) may go out now: whole datagrams only. Counts what it allows.
    pub fn allow(&mut self, len: usize, segment: usize) -> usize {
        if self.validated {
            return len;
        }
        let budget = (3 * self.received).saturating_sub(self.sent) as usize;
        let segment = segment.max(1);
        let mut ok = 0;
        while ok < len {
            let next = (ok + segment).min(len);
            if next > budget {
                break;
            }
            ok = next;
        }
        self.sent += ok as u64;
        ok
    }

    /// The address is validated (the handshake completed): no limit from now on.
    pub fn validate(&mut self) {
        self.validated = true;
    }

    /// May a datagram of `len` bytes go out now? Counts it if so.
    pub fn may_send(&mut self, len: usize) -> bool {
        self.allow(len, len) == len
    }
}

/// The QUIC server configuration shared by all workers.
pub fn server_config(
    id: &Identity,
    cfg: &crate::config::Http3Config,
    client_ca: Option<&std::path::Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut tls = tls::server_config_builder(id, client_ca, &[&rustls::version::TLS13])?;
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    // 0-RTT stays off: an early CONNECT-UDP could be replayed (RFC 9298 §7, PROTOCOL.md).
    tls.max_early_data_size = 0;
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_concurrent_streams))
        // Control, QPACK encoder and decoder, plus room for grease streams.
        .max_concurrent_uni_streams(VarInt::from_u32(8))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(Duration::from_secs(cfg.idle_timeout_secs))
                .unwrap_or(IdleTimeout::from(VarInt::from_u32(30_000))),
        ))
        .initial_mtu(cfg.initial_mtu)
        .mtu_discovery_config(Some(MtuDiscoveryConfig::default()))
        // Advertises max_datagram_frame_size (RFC 9221) and bounds what waits each way.
        .datagram_receive_buffer_size(Some(cfg.datagram_buffer))
        .datagram_send_buffer_size(cfg.datagram_buffer)
        .enable_segmentation_offload(true)
        // Explicit flow-control windows (SECURITY.md): what one stream and one connection may
        // make the relay buffer. Request streams carry little besides headers and capsules.
        .stream_receive_window(VarInt::from_u32(256 * 1024))
        .receive_window(VarInt::from_u32(4 * 1024 * 1024))
        .send_window(4 * 1024 * 1024);
    let mut server = ServerConfig::with_crypto(Arc::new(crypto));
    server
        .transport_config(Arc::new(transport))
        .migration(true)
        .max_incoming(4096)
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total(16 * 1024 * 1024);
    Ok(Arc::new(server))
}

/// Where the driver's packets go: the worker's datagram engine, or a test's queue.
pub(crate) trait QuicOut {
    /// An empty buffer (64 KiB capacity) for quinn-proto to write a transmit into.
    fn tx_buf(&self) -> Vec<u8>;
    /// Returns a buffer that carried nothing.
    fn give_back(&self, buf: Vec<u8>);
    /// Queues a transmit; false when it was dropped (counted by the receiver).
    fn send(&self, t: dgram::Transmit) -> bool;
}

/// The worker's datagram engine as the driver's output: the QUIC socket's sends.
#[derive(Debug)]
pub(crate) struct EngineOut {
    pub engine: Rc<Engine>,
    pub sock: SockId,
}

impl QuicOut for EngineOut {
    fn tx_buf(&self) -> Vec<u8> {
        self.engine.tx_buf()
    }

    fn give_back(&self, buf: Vec<u8>) {
        self.engine.give_back_tx_buf(buf)
    }

    fn send(&self, t: dgram::Transmit) -> bool {
        self.engine.send_transmit(self.sock, t)
    }
}

/// What one pass of the driver did, for the worker loop (and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PassWork {
    /// Connections polled.
    pub conns: usize,
    /// Poll rounds over all connections.
    pub rounds: usize,
    /// Transmits queued.
    pub transmits: usize,
    /// Work was left for the next pass (budget reached).
    pub more: bool,
}

/// One connection: its HTTP/3 session and what the driver and the worker keep beside it.
#[derive(Debug)]
pub(crate) struct QuicConn {
    pub session: H3Session,
    /// The connection's admission state (flows held, new-flow rate, mTLS identity).
    pub admission: ConnAdmission,
    timeout: Option<Instant>,
    /// Bytes in and out before the client's address is validated.
    amplification: Amplification,
}

/// One worker's endpoint and connections.
pub(crate) struct QuicDriver {
    pub ctx: WorkerCtx,
    out: Box<dyn QuicOut>,
    max_gso: usize,
    endpoint: Endpoint,
    /// Connections by handle. Handles are quinn-proto's own indices, never chosen by a peer,
    /// so they are hashed with Fx; requests by stream ID (in the session) are keyed by
    /// peer-chosen IDs and keep SipHash. Boxed: `drive_dirty` takes a connection out of the
    /// map while it drives it, and a connection is kilobytes (moving it in and out was 8 % of
    /// the worker's CPU while flows opened).
    pub conns: FxHashMap<ConnectionHandle, Box<QuicConn>>,
    /// Connections with work to do (events handled, data written) since their last poll.
    dirty: FxHashSet<ConnectionHandle>,
    /// Connections whose pass budget ran out: polled again at the next pass.
    deferred: Vec<ConnectionHandle>,
    /// Connections whose sessions have events for the worker.
    evented: Vec<ConnectionHandle>,
    /// Flows of connections that went away, for the worker to close.
    ended: Vec<FlowId>,
    /// Every connection's next deadline, soonest first, so a pass looks at expired ones only.
    timers: BTreeSet<(Instant, ConnectionHandle)>,
    workers: usize,
    /// New connections are refused, and connections close once their flows are done.
    draining: bool,
}

impl std::fmt::Debug for QuicDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicDriver")
            .field("worker", &self.ctx.id)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

impl QuicDriver {
    /// A driver sending through `out`; `max_gso` datagrams per transmit at most, path MTU
    /// discovery when `allow_mtud` (the socket does not fragment).
    pub fn new(
        ctx: WorkerCtx,
        out: Box<dyn QuicOut>,
        max_gso: usize,
        allow_mtud: bool,
        server: Arc<ServerConfig>,
        workers: usize,
    ) -> Self {
        let mut ec = EndpointConfig::default();
        let (id, n) = (ctx.id, workers);
        ec.cid_generator(move || Box::new(WorkerCid::new(id, n)));
        let endpoint = Endpoint::new(Arc::new(ec), Some(server), allow_mtud, None);
        QuicDriver {
            ctx,
            out,
            max_gso: max_gso.max(1),
            endpoint,
            conns: FxHashMap::default(),
            dirty: FxHashSet::default(),
            deferred: Vec::new(),
            evented: Vec::new(),
            ended: Vec::new(),
            timers: BTreeSet::new(),
            workers,
            draining: false,
        }
    }

    /// Marks a connection as needing a poll pass.
    pub fn touch(&mut self, ch: ConnectionHandle) {
        self.dirty.insert(ch);
    }

    /// True when connections wait for a poll.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// A reload: new connections get the new certificate and limits.
    pub fn set_server_config(&mut self, server: Option<Arc<ServerConfig>>) {
        self.endpoint.set_server_config(server);
    }

    /// The connections whose sessions have events, each once (the worker polls them).
    pub fn take_evented(&mut self, out: &mut Vec<ConnectionHandle>) {
        out.append(&mut self.evented);
    }

    /// Flows whose connections went away since the last call.
    pub fn take_ended(&mut self, out: &mut Vec<FlowId>) {
        out.append(&mut self.ended);
    }

    /// One UDP datagram from a client (one segment of a GRO train).
    pub fn handle_packet(
        &mut self,
        now: Instant,
        addr: std::net::SocketAddr,
        dst_ip: Option<std::net::IpAddr>,
        ecn: u8,
        seg: &[u8],
    ) {
        if self.misrouted(seg) {
            // Never answer another worker's packet with a stateless reset on a guess.
            self.ctx.stats.quic_misrouted.inc();
            return;
        }
        let ecn = quinn_proto::EcnCodepoint::from_bits(ecn);
        // A Handshake packet from the client proves its address (RFC 9000 §8.1).
        let validates = seg
            .first()
            .is_some_and(|b| b & 0x80 != 0 && (b >> 4) & 0x3 == 0x2);
        // The one copy on receive: into the worker's arena, which quinn-proto decrypts in
        // place and slices the DATAGRAM payloads from.
        let data = crate::relay::arena::take(crate::relay::arena::Use::Rx, seg.len(), |b| {
            b.extend_from_slice(seg)
        });
        let mut response = self.out.tx_buf();
        match self
            .endpoint
            .handle(now, addr, dst_ip, ecn, data, &mut response)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                self.out.give_back(response);
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.amplification.received(seg.len(), validates);
                    c.session.conn.handle_event(ev);
                    self.dirty.insert(ch);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.out.give_back(response);
                self.incoming(now, incoming, seg.len())
            }
            Some(DatagramEvent::Response(t)) => self.send(&t, response),
            None => self.out.give_back(response),
        }
    }

    /// A short-header or Handshake packet whose destination CID names another worker.
    fn misrouted(&self, pkt: &[u8]) -> bool {
        if self.workers <= 1 || pkt.is_empty() {
            return false;
        }
        let first = pkt[0];
        let dcid0 = if first & 0x80 == 0 {
            pkt.get(1)
        } else if (first >> 4) & 0x3 == 0x2 {
            pkt.get(6) // Handshake: the DCID is one of ours
        } else {
            return false; // Initial / 0-RTT carry a client-chosen DCID
        };
        dcid0.is_some_and(|b| WorkerCid::worker_of(*b, self.workers) != self.ctx.id)
    }

    fn incoming(&mut self, now: Instant, incoming: quinn_proto::Incoming, len: usize) {
        let validated = incoming.remote_address_validated();
        let live = self.ctx.shared();
        let h3 = &live.config.http3;
        let pending = self
            .conns
            .values()
            .filter(|c| c.session.conn.is_handshaking())
            .count();
        let mut response = self.out.tx_buf();
        if self.draining || self.conns.len() >= h3.max_connections_per_worker {
            self.ctx
                .stats
                .handshake_failure(crate::metrics::HandshakeFailure::Refused);
            let t = self.endpoint.refuse(incoming, &mut response);
            self.send(&t, response);
            return;
        }
        if pending >= h3.retry_threshold
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            match self.endpoint.retry(incoming, &mut response) {
                Ok(t) => self.send(&t, response),
                Err(_) => self.out.give_back(response),
            }
            return;
        }
        match self.endpoint.accept(incoming, now, &mut response, None) {
            Ok((ch, conn)) => {
                self.out.give_back(response);
                debug!(worker = self.ctx.id, remote = %conn.remote_address(), "QUIC connection accepted");
                let cfg = SessionConfig {
                    max_field_section_size: h3.max_field_section_size,
                    max_udp_payload: live.config.max_udp_payload,
                    client_send_buffer: live.config.client_send_buffer,
                };
                let mut c = Box::new(QuicConn {
                    session: H3Session::new(conn, cfg, now),
                    admission: ConnAdmission::new(&live.config, None, now),
                    timeout: None,
                    amplification: Amplification::default(),
                });
                c.amplification.received(len, validated);
                self.conns.insert(ch, c);
                self.dirty.insert(ch);
            }
            Err(e) => {
                self.ctx
                    .stats
                    .handshake_failure(crate::metrics::HandshakeFailure::Tls);
                debug!(worker = self.ctx.id, error = %e.cause, "QUIC connection not accepted");
                match e.response {
                    Some(t) => self.send(&t, response),
                    None => self.out.give_back(response),
                }
            }
        }
    }

    /// Queues a transmit; `buf` holds it (quinn-proto wrote it there) and goes to the kernel
    /// as is.
    fn send(&self, t: &quinn_proto::Transmit, mut buf: Vec<u8>) {
        buf.truncate(t.size);
        let queued = self.out.send(dgram::Transmit {
            dest: t.destination,
            buf,
            segment_size: t.segment_size,
            ecn: t.ecn.map_or(0, |e| e as u8),
            src_ip: t.src_ip,
        });
        if !queued {
            debug!(worker = self.ctx.id, "QUIC send queue full");
        }
    }

    /// Handles expired timers: only the connections whose deadline has passed are touched.
    pub fn timeouts(&mut self, now: Instant) {
        while let Some(&(t, ch)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            if let Some(c) = self.conns.get_mut(&ch) {
                c.timeout = None;
                c.session.conn.handle_timeout(now);
                self.dirty.insert(ch);
            }
        }
    }

    /// Records a connection's next deadline in the timer set.
    fn set_timer(&mut self, ch: ConnectionHandle, c: &mut QuicConn, next: Option<Instant>) {
        if c.timeout == next {
            return;
        }
        if let Some(old) = c.timeout {
            self.timers.remove(&(old, ch));
        }
        if let Some(new) = next {
            self.timers.insert((new, ch));
        }
        c.timeout = next;
    }

    /// Polls the connections marked dirty, within a budget: at most [`CONNS_PER_PASS`]
    /// connections, [`ROUNDS_PER_CONN`] rounds each, [`TRANSMITS_PER_ROUND`] transmits a
    /// round. Whatever a peer does or stops doing, a pass ends; a connection with work left
    /// stays marked and is polled at the next pass, after the worker's other tasks have run.
    /// Sessions with events for the worker are listed for [`QuicDriver::take_evented`].
    pub fn drive_dirty(&mut self, now: Instant) -> PassWork {
        let mut work = PassWork::default();
        while let Some(&ch) = self.dirty.iter().next() {
            if work.conns == CONNS_PER_PASS {
                work.more = true;
                break;
            }
            self.dirty.remove(&ch);
            let Some(mut c) = self.conns.remove(&ch) else {
                continue;
            };
            work.conns += 1;
            // A GSO train must fit in one UDP send (64 KiB): the kernel refuses a longer one
            // with EMSGSIZE, losing the whole train, which quinn-proto would then take for a
            // path MTU problem.
            let mtu = usize::from(c.session.conn.current_mtu()).max(1);
            let max_gso = self.max_gso.min(MAX_GSO_BYTES / mtu).max(1);
            let mut rounds = 0;
            loop {
                rounds += 1;
                work.rounds += 1;
                // The handshake completes only once the client's Handshake packet arrived,
                // which validates its address (RFC 9000 §8.1), even when it came coalesced
                // behind an Initial in one datagram.
                if !c.session.conn.is_handshaking() {
                    c.amplification.validate();
                }
                // 1. transmit (GSO batches)
                let mut more = false;
                let mut sent = 0;
                loop {
                    if sent == TRANSMITS_PER_ROUND {
                        more = true;
                        break;
                    }
                    let mut buf = self.out.tx_buf();
                    match c.session.conn.poll_transmit(now, max_gso, &mut buf) {
                        Some(mut t) => {
                            let ok = c
                                .amplification
                                .allow(t.size, t.segment_size.unwrap_or(t.size));
                            if ok < t.size {
                                // Over 3x what an unvalidated address sent us: the rest is held
                                // back like a lost packet (quinn-proto lets one full datagram
                                // overshoot its budget) and sent again once the client has
                                // said more.
                                self.ctx.stats.quic_amplification_held.inc();
                                if ok == 0 {
                                    self.out.give_back(buf);
                                    break;
                                }
                                t.size = ok;
                            }
                            self.send(&t, buf);
                            sent += 1;
                        }
                        None => {
                            self.out.give_back(buf);
                            break;
                        }
                    }
                }
                work.transmits += sent;
                // 2. timer
                let next = c.session.conn.poll_timeout();
                self.set_timer(ch, &mut c, next);
                // 3. endpoint events
                while let Some(ev) = c.session.conn.poll_endpoint_events() {
                    if let Some(cev) = self.endpoint.handle_event(ch, ev) {
                        c.session.conn.handle_event(cev);
                    }
                }
                // 4. application events: the HTTP/3 session
                more |= c.session.process(now, &self.ctx.stats);
                // A draining connection with nothing left to relay is closed, once.
                if self.draining && !c.session.is_closed() && c.session.drained() {
                    c.session.close_gracefully(now);
                    more = true;
                }
                if !more {
                    break;
                }
                if rounds == ROUNDS_PER_CONN {
                    self.deferred.push(ch);
                    break;
                }
            }
            if c.session.has_events() {
                self.evented.push(ch);
            }
            if c.session.conn.is_drained() {
                debug!(worker = self.ctx.id, "QUIC connection drained");
                self.set_timer(ch, &mut c, None);
                self.ended.extend(c.session.take_flows());
                // Events left (a last Datagram, say) are moot: the flows end.
                self.evented.retain(|x| *x != ch);
                self.ctx.stats.connection_closed(HttpVersion::Http3);
            } else {
                self.conns.insert(ch, c);
            }
        }
        if !self.deferred.is_empty() {
            work.more = true;
            self.dirty.extend(self.deferred.drain(..));
        }
        work
    }

    /// Shutdown: every connection is closed with H3_NO_ERROR (its CONNECTION_CLOSE is queued
    /// by one last bounded pass). Returns the flows that were still open, for the worker to
    /// count as ended by the drain.
    pub fn shutdown(&mut self, now: Instant) -> Vec<FlowId> {
        let mut flows = Vec::new();
        let handles: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for ch in handles {
            if let Some(c) = self.conns.get_mut(&ch) {
                c.session.close_gracefully(now);
                flows.extend(c.session.take_flows());
            }
            self.dirty.insert(ch);
        }
        self.drive_dirty(now);
        self.timers.clear();
        self.evented.clear();
        flows.append(&mut self.ended);
        for _ in self.conns.drain() {
            self.ctx.stats.connection_closed(HttpVersion::Http3);
        }
        flows
    }

    /// Graceful drain: GOAWAY on every connection; new connections are refused from now on.
    pub fn begin_drain(&mut self) {
        self.draining = true;
        let handles: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for ch in handles {
            if let Some(c) = self.conns.get_mut(&ch) {
                c.session.goaway();
            }
            self.dirty.insert(ch);
        }
    }

    pub fn next_timeout(&self) -> Option<Instant> {
        self.timers.first().map(|(t, _)| *t)
    }
}

/// Configures the QUIC socket (GRO, ECN, packet info, DF) and hands it to the worker's engine.
/// Returns its id, the GSO segments one send may carry, and whether path MTU discovery is
/// safe (the socket does not fragment).
pub(crate) fn register(
    engine: &Engine,
    socket: std::net::UdpSocket,
) -> std::io::Result<(SockId, usize, bool)> {
    let q = crate::io::quic_socket::QuicSocket::new(&socket)?;
    let id = engine.register(socket, Role::Quic)?;
    let max_gso = if engine.gso() {
        q.max_gso_segments()
    } else {
        1
    };
    Ok((id, max_gso, !q.may_fragment()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::Phase;
    use std::cell::RefCell;
    use std::net::SocketAddr;
    use std::sync::mpsc;

    /// The driver's output as a queue the test reads.
    struct QueueOut(Rc<RefCell<Vec<dgram::Transmit>>>);

    impl QuicOut for QueueOut {
        fn tx_buf(&self) -> Vec<u8> {
            Vec::with_capacity(65_536)
        }
        fn give_back(&self, _buf: Vec<u8>) {}
        fn send(&self, t: dgram::Transmit) -> bool {
            self.0.borrow_mut().push(t);
            true
        }
    }

    /// A driver on a relay configuration with its certificate, a quinn-proto client endpoint
    /// that trusts it, and the queue of what the driver sent. No sockets, virtual time.
    struct Harness {
        driver: QuicDriver,
        sent: Rc<RefCell<Vec<dgram::Transmit>>>,
        client: Endpoint,
        client_cfg: quinn_proto::ClientConfig,
        _phase: tokio::sync::watch::Sender<Phase>,
        _live: tokio::sync::watch::Sender<Arc<crate::ctx::Shared>>,
        _dir: tempfile::TempDir,
    }

    const SERVER: &str = "127.0.0.1:4433";
    const CLIENT: &str = "127.0.0.1:50000";

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let config = crate::config::Config {
            cert: Some(cert),
            key: Some(key),
            ..Default::default()
        }
        .validate()
        .unwrap();
        let limiter = crate::relay::limits::FlowLimiter::new(1000, 1000);
        let (shared, _) = crate::live_state(
            config,
            None,
            Arc::new(super::super::target::SystemResolver),
            limiter,
            Default::default(),
        )
        .unwrap();
        let server = shared.quic.clone().unwrap();
        let shared = Arc::new(shared);
        let (live_tx, live) = tokio::sync::watch::channel(shared);
        let (phase_tx, phase) = tokio::sync::watch::channel(Phase::Run);
        let ctx = WorkerCtx {
            id: 0,
            live,
            stats: Default::default(),
            phase,
        };
        let sent = Rc::new(RefCell::new(Vec::new()));
        let driver = QuicDriver::new(ctx, Box::new(QueueOut(sent.clone())), 1, true, server, 1);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN_H3.to_vec()];
        let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client_cfg = quinn_proto::ClientConfig::new(Arc::new(crypto));
        let client = Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None);
        Harness {
            driver,
            sent,
            client,
            client_cfg,
            _phase: phase_tx,
            _live: live_tx,
            _dir: dir,
        }
    }

    impl Harness {
        /// One pass of the driver, as the worker runs it: timers, then the dirty connections.
        fn pass(&mut self, now: Instant) -> PassWork {
            self.driver.timeouts(now);
            self.driver.drive_dirty(now)
        }

        /// The driver's packets so far, cut into datagrams.
        fn take_sent(&self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            for t in self.sent.borrow_mut().drain(..) {
                let seg = t.segment_size.unwrap_or(t.buf.len()).max(1);
                out.extend(t.buf.chunks(seg).map(<[u8]>::to_vec));
            }
            out
        }
    }

    /// Connects an in-memory client; returns its connection once both sides are established.
    fn connect(h: &mut Harness, now: &mut Instant) -> quinn_proto::Connection {
        connect_handle(h, now).1
    }

    /// [`connect`], with the client endpoint's handle of the connection.
    fn connect_handle(
        h: &mut Harness,
        now: &mut Instant,
    ) -> (ConnectionHandle, quinn_proto::Connection) {
        let server: SocketAddr = SERVER.parse().unwrap();
        let client: SocketAddr = CLIENT.parse().unwrap();
        let before = h.driver.conns.len();
        let (cch, mut conn) = h
            .client
            .connect(*now, h.client_cfg.clone(), server, "localhost")
            .unwrap();
        for _ in 0..200 {
            let mut buf = Vec::new();
            while let Some(t) = conn.poll_transmit(*now, 1, &mut buf) {
                h.driver
                    .handle_packet(*now, client, None, 0, &buf[..t.size]);
                buf.clear();
            }
            h.pass(*now);
            for d in h.take_sent() {
                let mut resp = Vec::new();
                if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, ev)) =
                    h.client
                        .handle(*now, server, None, None, d.as_slice().into(), &mut resp)
                {
                    conn.handle_event(ev);
                }
            }
            while let Some(ev) = conn.poll_endpoint_events() {
                if let Some(ev) = h.client.handle_event(cch, ev) {
                    conn.handle_event(ev);
                }
            }
            while conn.poll().is_some() {}
            if !conn.is_handshaking() && h.driver.conns.len() == before + 1 {
                let settled = h
                    .driver
                    .conns
                    .values()
                    .all(|c| !c.session.conn.is_handshaking());
                if settled {
                    return (cch, conn);
                }
            }
            *now += Duration::from_millis(1);
            conn.handle_timeout(*now);
        }
        panic!("in-memory handshake did not complete");
    }

    /// Runs `f` on its own thread and fails the test if it does not return in time: a
    /// driver pass that never ends would otherwise hang the test run instead of failing it.
    fn within(secs: u64, f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        let t = std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(secs)) {
            Ok(()) => t.join().unwrap(),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Err(e) = t.join() {
                    std::panic::resume_unwind(e);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("a driver pass did not return within {secs} s: livelock")
            }
        }
    }

    /// Moves packets both ways (and timers forward by `step`) until neither side has anything
    /// to send; the driver's session events are left for the test.
    fn pump(
        h: &mut Harness,
        cch: ConnectionHandle,
        conn: &mut quinn_proto::Connection,
        now: &mut Instant,
    ) {
        let server: SocketAddr = SERVER.parse().unwrap();
        let client: SocketAddr = CLIENT.parse().unwrap();
        for _ in 0..20 {
            let mut quiet = true;
            let mut buf = Vec::new();
            while let Some(t) = conn.poll_transmit(*now, 1, &mut buf) {
                quiet = false;
                h.driver
                    .handle_packet(*now, client, None, 0, &buf[..t.size]);
                buf.clear();
            }
            h.pass(*now);
            for d in h.take_sent() {
                quiet = false;
                let mut resp = Vec::new();
                if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, ev)) =
                    h.client
                        .handle(*now, server, None, None, d.as_slice().into(), &mut resp)
                {
                    conn.handle_event(ev);
                }
            }
            while let Some(ev) = conn.poll_endpoint_events() {
                if let Some(ev) = h.client.handle_event(cch, ev) {
                    conn.handle_event(ev);
                }
            }
            *now += Duration::from_millis(1);
            conn.handle_timeout(*now);
            if quiet {
                return;
            }
        }
    }

    /// Every event the driver's sessions have for the worker.
    fn events(h: &mut Harness) -> Vec<crate::relay::h3::Event> {
        let mut chs = Vec::new();
        h.driver.take_evented(&mut chs);
        let mut out = Vec::new();
        for ch in chs {
            let c = h.driver.conns.get_mut(&ch).unwrap();
            while let Some(ev) = c.session.poll_event() {
                out.push(ev);
            }
        }
        out
    }

    /// What the client read on `id` so far.
    fn read_all(conn: &mut quinn_proto::Connection, id: quinn_proto::StreamId) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = conn.recv_stream(id);
        if let Ok(mut chunks) = s.read(true) {
            while let Ok(Some(c)) = chunks.next(usize::MAX) {
                out.extend_from_slice(&c.bytes);
            }
            let _ = chunks.finalize();
        }
        out
    }

    /// The client's control stream with SETTINGS_H3_DATAGRAM = 1.
    fn client_settings(conn: &mut quinn_proto::Connection) {
        let ctrl = conn.streams().open(quinn_proto::Dir::Uni).unwrap();
        conn.send_stream(ctrl)
            .write(&[0x00, 0x04, 0x02, 0x33, 0x01])
            .unwrap();
    }

    /// Opens a request stream and writes a CONNECT-UDP request for 192.0.2.7:443 on it.
    fn client_request(conn: &mut quinn_proto::Connection) -> quinn_proto::StreamId {
        use crate::proto::h3::{frame, qpack};
        let req = conn.streams().open(quinn_proto::Dir::Bi).unwrap();
        let mut block = bytes::BytesMut::new();
        qpack::encode_field_section(
            &[
                (b":method", b"CONNECT"),
                (b":protocol", b"connect-udp"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", b"/.well-known/masque/udp/192.0.2.7/443/"),
                (b"capsule-protocol", b"?1"),
            ],
            &mut block,
        );
        let mut head = bytes::BytesMut::new();
        frame::encode_headers_frame(&block, &mut head);
        conn.send_stream(req).write(&head).unwrap();
        req
    }

    /// An HTTP Datagram for request stream `req`: quarter stream ID, context 0, payload.
    fn h3_datagram(req: quinn_proto::StreamId, payload: &[u8]) -> bytes::Bytes {
        use bytes::BufMut;
        let mut d = bytes::BytesMut::new();
        crate::proto::varint::write(u64::from(VarInt::from(req)) / 4, &mut d);
        d.put_u8(0);
        d.put_slice(payload);
        d.freeze()
    }

    /// A flow in a table of its own, as the worker would open for an accepted request.
    fn test_flow(now: Instant) -> (crate::relay::flow_table::FlowTable, FlowId) {
        let mut table = crate::relay::flow_table::FlowTable::new();
        table.add_egress(false, 0, now);
        let flow = table.open(
            crate::relay::flow::Flow::new(now, Duration::from_secs(120), 1500),
            crate::relay::flow_table::ClientRef::H3 { conn: 0, stream: 0 },
            HttpVersion::Http3,
            crate::relay::flow_table::TargetRef {
                egress: 0,
                addr: "192.0.2.7:443".parse().unwrap(),
            },
            None,
            crate::relay::limits::FlowLimiter::new(0, 0)
                .acquire(None)
                .unwrap(),
            now,
        );
        (table, flow)
    }

    /// The request stream's response head and what followed it (DATA frame payloads).
    fn client_response(
        conn: &mut quinn_proto::Connection,
        req: quinn_proto::StreamId,
    ) -> (Vec<crate::proto::h3::qpack::Field>, Vec<u8>) {
        use crate::proto::h3::stream::{RequestEvent, RequestStreamReader};
        let resp = read_all(conn, req);
        let mut rdr = RequestStreamReader::new(16_384);
        let mut fields = None;
        let mut data = Vec::new();
        rdr.push(&resp, |ev| match ev {
            RequestEvent::Headers(b) => {
                fields = Some(crate::proto::h3::qpack::decode_field_section(b, 16_384).unwrap())
            }
            RequestEvent::Data(d) => data.extend_from_slice(d),
            _ => {}
        })
        .unwrap();
        (fields.expect("a response"), data)
    }

    fn field(fields: &[crate::proto::h3::qpack::Field], name: &[u8]) -> Option<Vec<u8>> {
        fields
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.to_vec())
    }

    #[test]
    fn a_request_becomes_a_flow_whose_datagrams_come_out_as_events() {
        use crate::relay::h3::{Accepted, Event};
        let mut h = harness();
        let mut now = Instant::now();
        let (cch, mut conn) = connect_handle(&mut h, &mut now);
        client_settings(&mut conn);
        // A CONNECT-UDP request, and a datagram sent before its answer (held, not lost).
        let req = client_request(&mut conn);
        pump(&mut h, cch, &mut conn, &mut now);
        conn.datagrams()
            .send(h3_datagram(req, b"early"), false)
            .unwrap();
        pump(&mut h, cch, &mut conn, &mut now);
        let evs = events(&mut h);
        let request = evs
            .iter()
            .find_map(|e| match e {
                Event::Request { stream, request } => Some((*stream, request.clone())),
                _ => None,
            })
            .expect("a request event");
        assert_eq!(request.0, req);
        let r = request.1.unwrap();
        assert_eq!(
            (r.method.as_str(), r.protocol.as_deref()),
            ("CONNECT", Some("connect-udp"))
        );
        assert!(
            !evs.iter().any(|e| matches!(e, Event::Datagram { .. })),
            "held until answered"
        );
        // The worker opens a flow and answers.
        let (_table, flow) = test_flow(now);
        let ch = *h.driver.conns.keys().next().unwrap();
        let c = h.driver.conns.get_mut(&ch).unwrap();
        assert_eq!(c.session.accept(req, flow), Accepted::Open);
        // The held datagram comes out now, a slice of the packet it arrived in.
        let mut evs = Vec::new();
        while let Some(e) = c.session.poll_event() {
            evs.push(e);
        }
        h.driver.touch(ch);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::Datagram { flow: f, context_id: 0, payload }] if *f == flow && &payload[..] == b"early"
            ),
            "{evs:?}"
        );
        pump(&mut h, cch, &mut conn, &mut now);
        // The client reads 200 with capsule-protocol.
        let (fields, _) = client_response(&mut conn, req);
        assert_eq!(field(&fields, b":status").as_deref(), Some(&b"200"[..]));
        assert_eq!(
            field(&fields, b"capsule-protocol").as_deref(),
            Some(&b"?1"[..])
        );
        // Datagrams both ways.
        conn.datagrams()
            .send(h3_datagram(req, b"to target"), false)
            .unwrap();
        pump(&mut h, cch, &mut conn, &mut now);
        let evs = events(&mut h);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::Datagram { payload, .. }] if &payload[..] == b"to target"
            ),
            "{evs:?}"
        );
        let c = h.driver.conns.get_mut(&ch).unwrap();
        c.session.send_datagram(req, b"to client").unwrap();
        h.driver.touch(ch);
        pump(&mut h, cch, &mut conn, &mut now);
        let got = conn.datagrams().recv().expect("a datagram for the client");
        assert_eq!(&got[..], &h3_datagram(req, b"to client")[..]);
        // The client ends its side: the flow ends, and the relay finishes its own.
        conn.send_stream(req).finish().unwrap();
        pump(&mut h, cch, &mut conn, &mut now);
        let evs = events(&mut h);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::FlowEnded { flow: f, reason: crate::relay::flow::CloseReason::ClientEnd }] if *f == flow
            ),
            "{evs:?}"
        );
    }

    #[test]
    fn a_client_that_sends_capsules_is_answered_in_capsules_and_stray_datagrams_are_counted() {
        use crate::proto::capsule;
        use crate::proto::h3::frame;
        use crate::relay::flow::DropReason;
        use crate::relay::h3::{Accepted, Event};
        let mut h = harness();
        let mut now = Instant::now();
        let (cch, mut conn) = connect_handle(&mut h, &mut now);
        client_settings(&mut conn);
        let req = client_request(&mut conn);
        pump(&mut h, cch, &mut conn, &mut now);
        assert!(events(&mut h)
            .iter()
            .any(|e| matches!(e, Event::Request { stream, .. } if *stream == req)));
        let (_table, flow) = test_flow(now);
        let ch = *h.driver.conns.keys().next().unwrap();
        let c = h.driver.conns.get_mut(&ch).unwrap();
        assert_eq!(c.session.accept(req, flow), Accepted::Open);
        h.driver.touch(ch);
        pump(&mut h, cch, &mut conn, &mut now);
        // A QUIC datagram for a stream that is no flow (yet: it may be a request still on its
        // way): held, then dropped and counted once it has waited a second.
        let stray =
            quinn_proto::StreamId::new(quinn_proto::Side::Client, quinn_proto::Dir::Bi, 100);
        let before = h.driver.ctx.stats.drops_for(DropReason::NoFlow);
        conn.datagrams()
            .send(h3_datagram(stray, b"nobody's"), false)
            .unwrap();
        pump(&mut h, cch, &mut conn, &mut now);
        assert!(events(&mut h).is_empty());
        assert_eq!(h.driver.ctx.stats.drops_for(DropReason::NoFlow), before);
        now += Duration::from_millis(1100);
        conn.handle_timeout(now);
        // A DATAGRAM capsule in a DATA frame on the request stream (RFC 9297 §3.5).
        let mut caps = bytes::BytesMut::new();
        capsule::encode_datagram_header(0, b"in a capsule".len(), &mut caps);
        caps.extend_from_slice(b"in a capsule");
        let mut data = bytes::BytesMut::new();
        frame::encode_frame_header(frame::DATA, caps.len() as u64, &mut data);
        data.extend_from_slice(&caps);
        conn.send_stream(req).write(&data).unwrap();
        pump(&mut h, cch, &mut conn, &mut now);
        let evs = events(&mut h);
        assert!(
            matches!(
                evs.as_slice(),
                [Event::Datagram { flow: f, context_id: 0, payload }] if *f == flow && &payload[..] == b"in a capsule"
            ),
            "{evs:?}"
        );
        assert_eq!(h.driver.ctx.stats.drops_for(DropReason::NoFlow), before + 1);
        // The answer goes back the way the client speaks: a capsule on the stream, not a
        // QUIC DATAGRAM frame.
        let c = h.driver.conns.get_mut(&ch).unwrap();
        c.session.send_datagram(req, b"back in a capsule").unwrap();
        h.driver.touch(ch);
        pump(&mut h, cch, &mut conn, &mut now);
        assert!(conn.datagrams().recv().is_none());
        let (fields, data) = client_response(&mut conn, req);
        assert_eq!(field(&fields, b":status").as_deref(), Some(&b"200"[..]));
        let mut dec = capsule::CapsuleDecoder::new(65_535);
        let mut got = Vec::new();
        dec.decode(&data, |ev| {
            if let capsule::Event::Datagram { payload, .. } = ev {
                got.push(payload.to_vec());
            }
        })
        .unwrap();
        assert_eq!(got, vec![b"back in a capsule".to_vec()]);
    }

    #[test]
    fn settings_leave_with_the_handshake_flight() {
        // RFC 9114 §6.2.1: the control stream and SETTINGS at the beginning of the connection.
        // Sent as 0.5-RTT data with the first flight, they are readable by the client when its
        // handshake completes, before the relay has heard anything more from it: a client that
        // waits for them before its first request (and then for a packet) is never stuck.
        let mut h = harness();
        let now = Instant::now();
        let server: SocketAddr = SERVER.parse().unwrap();
        let (_, mut conn) = h
            .client
            .connect(now, h.client_cfg.clone(), server, "localhost")
            .unwrap();
        let mut buf = Vec::new();
        while let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            let client: SocketAddr = CLIENT.parse().unwrap();
            h.driver.handle_packet(now, client, None, 0, &buf[..t.size]);
            buf.clear();
        }
        h.pass(now);
        // The relay's first flight, and nothing after it.
        for d in h.take_sent() {
            let mut resp = Vec::new();
            if let Some(quinn_proto::DatagramEvent::ConnectionEvent(_, ev)) =
                h.client
                    .handle(now, server, None, None, d.as_slice().into(), &mut resp)
            {
                conn.handle_event(ev);
            }
        }
        while conn.poll().is_some() {}
        assert!(!conn.is_handshaking(), "the client's handshake is complete");
        let id = conn
            .streams()
            .accept(quinn_proto::Dir::Uni)
            .expect("the relay's control stream came with its first flight");
        let mut stream = conn.recv_stream(id);
        let mut chunks = stream.read(true).unwrap();
        let mut bytes = Vec::new();
        while let Ok(Some(c)) = chunks.next(usize::MAX) {
            bytes.extend_from_slice(&c.bytes);
        }
        let _ = chunks.finalize();
        assert_eq!(bytes.first(), Some(&0x00), "stream type: control");
        assert_eq!(bytes.get(1), Some(&0x04), "first frame: SETTINGS");
    }

    #[test]
    fn a_peer_that_goes_silent_during_drain_never_makes_a_pass_unbounded() {
        within(30, || {
            let mut h = harness();
            let mut now = Instant::now();
            let _silent = connect(&mut h, &mut now);
            // From here on the client answers nothing (its socket is gone). The relay drains:
            // GOAWAY, then, with no flow left, CONNECTION_CLOSE; the peer never acknowledges.
            h.driver.begin_drain();
            let budget = PassWork {
                conns: CONNS_PER_PASS,
                rounds: CONNS_PER_PASS * ROUNDS_PER_CONN,
                transmits: CONNS_PER_PASS * ROUNDS_PER_CONN * TRANSMITS_PER_ROUND,
                more: true,
            };
            let mut passes = 0;
            // Virtual time in 10 ms steps, for at most a minute: the connection must be gone
            // by its close timeout (3 PTO), well before its 30 s idle timeout.
            while !h.driver.conns.is_empty() {
                let w = h.pass(now);
                assert!(
                    w.conns <= budget.conns && w.rounds <= budget.rounds,
                    "{w:?}"
                );
                assert!(w.transmits <= budget.transmits, "{w:?}");
                h.take_sent();
                passes += 1;
                now += Duration::from_millis(10);
                assert!(passes < 6000, "the closed connection never went away");
            }
            let stats = &h.driver.ctx.stats;
            assert_eq!(stats.connections_closed[0].get(), 1, "counted as closed");
        });
    }

    #[test]
    fn a_silent_peer_is_dropped_by_the_idle_timeout_and_shutdown_ends_every_connection() {
        within(30, || {
            let mut h = harness();
            let mut now = Instant::now();
            let _a = connect(&mut h, &mut now);
            let _b = connect(&mut h, &mut now);
            assert_eq!(h.driver.conns.len(), 2);
            // Both peers go silent; the idle timeout (30 s) closes them, pass by pass.
            let start = now;
            while !h.driver.conns.is_empty() {
                let w = h.pass(now);
                assert!(w.rounds <= CONNS_PER_PASS * ROUNDS_PER_CONN, "{w:?}");
                h.take_sent();
                now += Duration::from_millis(100);
                assert!(
                    now - start < Duration::from_secs(40),
                    "idle timeout not applied"
                );
            }
            // A stop with connections still open ends them all in one bounded pass.
            let _c = connect(&mut h, &mut now);
            h.driver.shutdown(now);
            assert!(h.driver.conns.is_empty());
            assert_eq!(h.driver.ctx.stats.connections_closed[0].get(), 3);
            let close = h.take_sent();
            assert!(!close.is_empty(), "a CONNECTION_CLOSE went out");
        });
    }

    #[test]
    fn amplification_is_three_times_until_validated() {
        let mut a = Amplification::default();
        a.received(1200, false);
        assert!(a.may_send(1350));
        assert!(a.may_send(1350));
        assert!(!a.may_send(1350), "4050 > 3600");
        assert!(a.may_send(900));
        assert!(!a.may_send(1));
        a.received(50, false);
        assert!(a.may_send(150));
        a.received(40, true);
        assert!(a.may_send(65_000));
        // A GSO train is cut at a datagram boundary.
        let mut b = Amplification::default();
        b.received(1200, false);
        assert_eq!(b.allow(4050, 1350), 2700);
        assert_eq!(b.allow(1000, 1000), 0, "900 left is not a whole datagram");
        let mut c = Amplification::default();
        c.received(1200, false);
        assert_eq!(
            c.allow(3000, 1350),
            3000,
            "1350 + 1350 + a short last one of 300"
        );
    }

    #[test]
    fn worker_cids_name_their_worker() {
        for workers in [1usize, 2, 3, 7, 64] {
            for w in 0..workers {
                let mut g = WorkerCid::new(w, workers);
                for _ in 0..50 {
                    let cid = g.generate_cid();
                    assert_eq!(cid.len(), CID_LEN);
                    assert_eq!(WorkerCid::worker_of(cid[0], workers), w);
                    assert!(g.validate(&cid).is_ok());
                }
            }
        }
    }
}
