//! The HTTP/3 client: quinn-proto driven by hand on one UDP socket (GSO on send and GRO on
//! receive through quinn-udp), HTTP/3 written with the relay's own sans-I/O codecs, UDP
//! payloads in QUIC DATAGRAM frames.
//!
//! ```text
//! socket batch (GRO) -> Endpoint::handle -> Connection::handle_event
//! per connection: poll() events -> control stream SETTINGS, response HEADERS, DATAGRAMs
//!                 Load::poll -> datagrams().send -> poll_transmit (GSO) -> socket
//! ```
//!
//! A connection opens its control stream once the handshake completes, waits for the relay's
//! SETTINGS (extended CONNECT and H3_DATAGRAM), then opens one request stream per flow.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use masque_relay::proto::capsule::{self, CapsuleDecoder};
use masque_relay::proto::h3::frame::{self, Settings};
use masque_relay::proto::h3::qpack;
use masque_relay::proto::h3::stream::{
    ControlEvent, ControlStreamReader, RequestEvent, RequestStreamReader, StreamKind, UniStreamHead,
};
use masque_relay::proto::h3::{self as h3proto, H3_NO_ERROR};
use masque_relay::proto::varint;
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig,
    MtuDiscoveryConfig, SendDatagramError, StreamEvent, StreamId, TransportConfig, VarInt,
};
use quinn_udp::{RecvMeta, UdpSocketState};
use tokio::io::Interest;

use crate::load::Load;
use crate::run::{split, Ctx};
use crate::udpc::sleep_until;
use crate::BenchError;

/// Receive buffers per socket call.
const RX_BUFS: usize = 8;
/// Datagrams one connection may queue per loop pass, so every connection gets its turn.
const SEND_BUDGET: usize = 64;
/// Bytes of DATAGRAM frames quinn may hold per connection before `send` says blocked: small,
/// so the client does not add its own queueing delay to the round trip.
const DATAGRAM_SEND_BUFFER: usize = 256 * 1024;
/// Bytes in one GSO send at most: a UDP datagram's 65,507-byte limit, with room to spare.
/// quinn-proto fills `max_datagrams` segments of the current MTU without looking at the total,
/// and the kernel refuses a larger train whole (EMSGSIZE).
const MAX_GSO_BYTES: usize = 65_000;

/// Segments per GSO send at an MTU of `mtu` bytes, at most `max_gso`.
pub fn gso_segments(max_gso: usize, mtu: u16) -> usize {
    max_gso.min(MAX_GSO_BYTES / usize::from(mtu).max(1)).max(1)
}

/// The smallest UDP payload the client assumes the path carries: 1350 bytes, or enough for one
/// DATAGRAM frame of `size` payload bytes (quarter stream ID, context ID, frame header, short
/// packet header and AEAD tag fit in 64 bytes).
pub fn path_mtu(size: usize) -> u16 {
    (size + 64).clamp(1350, 65_527) as u16
}

/// The QUIC client configuration: HTTP/3 ALPN, DATAGRAM frames on, 1350-byte first packets so
/// 1200-byte payloads fit at once, no streams opened by the relay except unidirectional ones.
///
/// The MTU never falls below that either (`min_mtu`): quinn's black-hole detection takes a
/// burst of lost full-size packets for an MTU problem and drops to 1200 bytes for a minute
/// (`black_hole_cooldown`), after which no 1200-byte payload fits in a DATAGRAM frame. A
/// closed-loop window of 64 x 1200 B lost whole (the client's own GSO train used to exceed the
/// UDP size limit, see [`gso_segments`]; a relay whose socket refuses a burst of echoes does the
/// same) used to end the run that way: "datagram too large", and the client stopped.
pub fn client_config(ctx: &Ctx) -> Result<ClientConfig, BenchError> {
    let tls = crate::tls::client_config(ctx.spec.insecure, ctx.spec.ca.as_deref(), b"h3")?;
    let crypto = quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| BenchError::Tls(e.to_string()))?;
    let mut cfg = ClientConfig::new(Arc::new(crypto));
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(16))
        .datagram_receive_buffer_size(Some(4 << 20))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER)
        .initial_mtu(path_mtu(ctx.spec.size))
        .min_mtu(path_mtu(ctx.spec.size))
        .mtu_discovery_config(Some(MtuDiscoveryConfig::default()))
        .enable_segmentation_offload(true)
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(VarInt::from_u32(30_000).into()));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowState {
    Idle,
    Requested,
    Open,
    Closed,
}

struct Flow {
    quarter: u64,
    state: FlowState,
    reader: RequestStreamReader,
    capsules: CapsuleDecoder,
}

enum Uni {
    Head(UniStreamHead),
    Control(ControlStreamReader),
    Ignore,
}

/// One QUIC connection and its flows.
struct Conn {
    ch: ConnectionHandle,
    conn: quinn_proto::Connection,
    /// Global index of the first flow.
    base: usize,
    flows: Vec<Flow>,
    load: Load,
    /// Flows whose request stream is open.
    opened: usize,
    by_stream: HashMap<StreamId, usize>,
    uni: HashMap<StreamId, Uni>,
    /// Bytes waiting for stream credit.
    out: HashMap<StreamId, Bytes>,
    settings: Option<Settings>,
    timeout: Option<Instant>,
    connected: bool,
    lost: bool,
    /// A DATAGRAM frame was queued: a later "too large" is the path MTU shrinking, not a
    /// payload that never fits.
    datagram_sent: bool,
    /// The HEADERS frame of each target port (flow i sends that of its port).
    requests: Rc<Vec<Bytes>>,
}

impl Conn {
    fn new(
        ch: ConnectionHandle,
        conn: quinn_proto::Connection,
        ctx: &Ctx,
        flows: std::ops::Range<usize>,
    ) -> Self {
        let n = flows.len();
        Conn {
            ch,
            conn,
            base: flows.start,
            flows: (0..n)
                .map(|_| Flow {
                    quarter: 0,
                    state: FlowState::Idle,
                    reader: RequestStreamReader::new(64 * 1024),
                    capsules: CapsuleDecoder::new(capsule::MAX_UDP_PAYLOAD),
                })
                .collect(),
            load: Load::new(ctx.spec.shape(n), n),
            opened: 0,
            by_stream: HashMap::new(),
            uni: HashMap::new(),
            out: HashMap::new(),
            settings: None,
            timeout: None,
            connected: false,
            lost: false,
            datagram_sent: false,
            requests: Rc::new(Vec::new()),
        }
    }

    /// Handles the connection's events; true if there were any.
    fn process(&mut self, now: Instant, ctx: &Ctx) -> bool {
        let mut any = false;
        while let Some(ev) = self.conn.poll() {
            any = true;
            match ev {
                quinn_proto::Event::Connected => {
                    self.connected = true;
                    ctx.connection_opened();
                    self.open_control();
                }
                quinn_proto::Event::ConnectionLost { reason } => {
                    if !ctx.stop.get() {
                        ctx.error(format!("HTTP/3 connection lost: {reason}"));
                    }
                    self.lost = true;
                    self.fail_pending(now, ctx);
                }
                quinn_proto::Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                    while let Some(id) = self.conn.streams().accept(Dir::Uni) {
                        self.uni.insert(id, Uni::Head(UniStreamHead::new()));
                        self.read(id, now, ctx);
                    }
                }
                quinn_proto::Event::Stream(StreamEvent::Readable { id }) => self.read(id, now, ctx),
                quinn_proto::Event::Stream(StreamEvent::Writable { id }) => self.flush(id),
                quinn_proto::Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                    self.open_flows()
                }
                quinn_proto::Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    self.close_flow(id, now, ctx)
                }
                quinn_proto::Event::DatagramReceived => self.recv_datagrams(now, ctx),
                _ => {}
            }
        }
        any
    }

    /// Control stream: type, then SETTINGS with H3_DATAGRAM (RFC 9297 §2.1.1).
    fn open_control(&mut self) {
        let Some(id) = self.conn.streams().open(Dir::Uni) else {
            return;
        };
        let mut out = BytesMut::new();
        varint::write(h3proto::STREAM_CONTROL, &mut out);
        frame::encode_settings(
            &Settings {
                qpack_max_table_capacity: 0,
                qpack_blocked_streams: 0,
                max_field_section_size: Some(64 * 1024),
                enable_connect_protocol: false,
                h3_datagram: true,
                grease: true,
            },
            &mut out,
        );
        self.out.insert(id, out.freeze());
        self.flush(id);
    }

    /// Opens request streams for the flows not yet requested, as far as stream credit goes.
    fn open_flows(&mut self) {
        let Some(settings) = &self.settings else {
            return;
        };
        if !settings.h3_datagram {
            // Payloads then go in capsules; the bench measures DATAGRAM frames only.
            return;
        }
        while self.opened < self.flows.len() {
            let Some(id) = self.conn.streams().open(Dir::Bi) else {
                break;
            };
            let i = self.opened;
            self.opened += 1;
            let f = &mut self.flows[i];
            f.quarter = u64::from(VarInt::from(id)) / 4;
            f.state = FlowState::Requested;
            self.by_stream.insert(id, i);
            let n = self.requests.len().max(1);
            let req = self
                .requests
                .get((self.base + i) % n)
                .cloned()
                .unwrap_or_default();
            self.out.insert(id, req);
            self.flush(id);
        }
    }

    fn flush(&mut self, id: StreamId) {
        let Some(mut buf) = self.out.remove(&id) else {
            return;
        };
        match self.conn.send_stream(id).write(&buf) {
            Ok(n) => buf.advance(n),
            Err(quinn_proto::WriteError::Blocked) => {}
            Err(_) => return,
        }
        if !buf.is_empty() {
            self.out.insert(id, buf);
        }
    }

    fn read(&mut self, id: StreamId, now: Instant, ctx: &Ctx) {
        let mut chunks_in: Vec<Bytes> = Vec::new();
        {
            let mut rs = self.conn.recv_stream(id);
            let Ok(mut chunks) = rs.read(true) else {
                return;
            };
            while let Ok(Some(c)) = chunks.next(usize::MAX) {
                chunks_in.push(c.bytes);
            }
            let _ = chunks.finalize();
        }
        if let Some(u) = self.uni.get_mut(&id) {
            for c in chunks_in {
                let mut data = &c[..];
                if let Uni::Head(h) = u {
                    let Some((kind, used)) = h.push(data) else {
                        continue;
                    };
                    data = &data[used..];
                    *u = match kind {
                        StreamKind::Control => Uni::Control(ControlStreamReader::new()),
                        _ => Uni::Ignore,
                    };
                }
                if let Uni::Control(r) = u {
                    let mut got = None;
                    if let Err(e) = r.push(data, |ev| {
                        if let ControlEvent::Settings(s) = ev {
                            got = Some(s);
                        }
                    }) {
                        ctx.error(format!("relay control stream: {e}"));
                        *u = Uni::Ignore;
                    }
                    if let Some(s) = got {
                        if !s.enable_connect_protocol || !s.h3_datagram {
                            ctx.error(format!(
                                "relay SETTINGS: extended CONNECT {}, H3_DATAGRAM {}",
                                s.enable_connect_protocol, s.h3_datagram
                            ));
                        }
                        self.settings = Some(s);
                        self.open_flows();
                        return self.read(id, now, ctx);
                    }
                }
            }
            return;
        }
        let Some(&i) = self.by_stream.get(&id) else {
            return;
        };
        let mut status = None;
        let mut payloads: Vec<Vec<u8>> = Vec::new();
        let mut failed = None;
        {
            let Flow {
                reader, capsules, ..
            } = &mut self.flows[i];
            for c in &chunks_in {
                let r = reader.push(c, |ev| match ev {
                    RequestEvent::Headers(block) => {
                        status = Some(response_status(block));
                    }
                    RequestEvent::Data(d) => {
                        // Payloads in capsules (a relay that will not use DATAGRAM frames).
                        if let Err(e) = capsules.decode(d, |ev| {
                            if let capsule::Event::Datagram {
                                context_id: 0,
                                payload,
                            } = ev
                            {
                                payloads.push(payload.to_vec());
                            }
                        }) {
                            failed = Some(e.to_string());
                        }
                    }
                    RequestEvent::Trailers(_) => {}
                });
                if let Err(e) = r {
                    failed = Some(e.to_string());
                }
            }
        }
        if let Some(s) = status {
            let f = &mut self.flows[i];
            if f.state == FlowState::Requested {
                if s == 200 {
                    f.state = FlowState::Open;
                    self.load.open_flow(i, now);
                    ctx.flow_opened(now);
                } else {
                    f.state = FlowState::Closed;
                    ctx.flow_failed(now, s);
                }
            }
        }
        if !payloads.is_empty() {
            let mut rec = ctx.rec.borrow_mut();
            for p in payloads {
                if rec.on_receive(now, &p).is_some() {
                    self.load.on_reply(i, now);
                }
            }
        }
        if let Some(e) = failed {
            ctx.error(format!("request stream: {e}"));
            self.close_flow(id, now, ctx);
        }
    }

    fn close_flow(&mut self, id: StreamId, now: Instant, ctx: &Ctx) {
        if let Some(&i) = self.by_stream.get(&id) {
            let f = &mut self.flows[i];
            if f.state == FlowState::Requested {
                ctx.flow_failed(now, 0);
            }
            f.state = FlowState::Closed;
            self.load.close_flow(i);
        }
    }

    /// The connection is gone: flows that never opened count as failed.
    fn fail_pending(&mut self, now: Instant, ctx: &Ctx) {
        for f in &mut self.flows {
            if matches!(f.state, FlowState::Idle | FlowState::Requested) {
                f.state = FlowState::Closed;
                ctx.flow_failed(now, 0);
            }
        }
    }

    fn recv_datagrams(&mut self, now: Instant, ctx: &Ctx) {
        let mut rec = ctx.rec.borrow_mut();
        while let Some(d) = self.conn.datagrams().recv() {
            let Some((_quarter, a)) = varint::read(&d) else {
                continue;
            };
            let Some((context, b)) = varint::read(&d[a..]) else {
                continue;
            };
            if context != 0 {
                continue;
            }
            if let Some(flow) = rec.on_receive(now, &d[a + b..]) {
                if let Some(local) = (flow as usize).checked_sub(self.base) {
                    self.load.on_reply(local, now);
                }
            }
        }
    }

    /// Queues the datagrams the load allows now; true if any.
    fn send_load(&mut self, now: Instant, ctx: &Ctx) -> bool {
        let Conn {
            conn,
            flows,
            load,
            base,
            datagram_sent,
            ..
        } = self;
        let size = ctx.spec.payload_size();
        let mut rec = ctx.rec.borrow_mut();
        let mut fatal = None;
        let mut shrunk = false;
        let n = load.poll(now, SEND_BUDGET, |i| {
            let mut b = BytesMut::with_capacity(size + 16);
            varint::write(flows[i].quarter, &mut b);
            b.put_u8(0); // context ID 0: UDP payload (RFC 9298 §4)
            let start = b.len();
            b.resize(start + size, 0);
            rec.fill(now, (*base + i) as u32, &mut b[start..]);
            // A second handle (a reference count) for the refusal below.
            let d = b.freeze();
            match conn.datagrams().send(d.clone(), false) {
                Ok(()) => {
                    *datagram_sent = true;
                    true
                }
                Err(SendDatagramError::Blocked(d)) => {
                    rec.unsend(&d[start..]);
                    false
                }
                Err(SendDatagramError::TooLarge) if *datagram_sent => {
                    // The path MTU went down after all: not sent, tried again later.
                    rec.unsend(&d[start..]);
                    shrunk = true;
                    false
                }
                Err(e) => {
                    fatal = Some(e);
                    false
                }
            }
        });
        if shrunk {
            ctx.error(format!(
                "a DATAGRAM frame of {size} bytes no longer fits (the path MTU went down): \
                 not sent, tried again later"
            ));
        }
        rec.timed_out += load.take_timeouts();
        if let Some(e) = fatal {
            ctx.error(format!("cannot send a DATAGRAM frame of {size} bytes: {e}"));
            ctx.stop.set(true);
        }
        n > 0
    }
}

/// The `:status` of a response field section, or 0 when there is none.
fn response_status(block: &[u8]) -> u16 {
    qpack::decode_field_section(block, 64 * 1024)
        .ok()
        .and_then(|fields| {
            fields
                .iter()
                .find(|f| f.name == b":status")
                .and_then(|f| std::str::from_utf8(&f.value).ok()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The HEADERS frame of an extended CONNECT for connect-udp (RFC 9298 §3.4, RFC 9220).
pub fn connect_udp_request(authority: &str, path: &str) -> Bytes {
    let mut fields = BytesMut::new();
    qpack::encode_field_section(
        &[
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-udp"),
            (b":scheme", b"https"),
            (b":authority", authority.as_bytes()),
            (b":path", path.as_bytes()),
            (b"capsule-protocol", b"?1"),
        ],
        &mut fields,
    );
    let mut out = BytesMut::new();
    frame::encode_headers_frame(&fields, &mut out);
    out.freeze()
}

/// The client's socket: tokio for readiness, quinn-udp for GSO/GRO.
struct Socket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

impl Socket {
    fn send(&self, t: &quinn_proto::Transmit, buf: &[u8]) -> std::io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: t.destination,
            ecn: t
                .ecn
                .and_then(|e| quinn_udp::EcnCodepoint::from_bits(e as u8)),
            contents: &buf[..t.size],
            segment_size: t.segment_size,
            src_ip: t.src_ip,
        };
        let r = self.state.try_send((&self.io).into(), &transmit);
        if r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
        {
            crate::mmsg::clear_writable(&self.io);
        }
        r
    }
}

pub async fn run(ctx: Rc<Ctx>) -> Result<(), BenchError> {
    let spec = &ctx.spec;
    let bind: SocketAddr = if spec.relay.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let std_sock = crate::mmsg::bind(bind)?;
    let state = UdpSocketState::new((&std_sock).into())?;
    let sock = Socket {
        io: tokio::net::UdpSocket::from_std(std_sock)?,
        state,
    };
    let max_gso = sock.state.max_gso_segments();
    let mut endpoint = Endpoint::new(
        Arc::new(EndpointConfig::default()),
        None,
        !sock.state.may_fragment(),
        None,
    );
    let cfg = client_config(&ctx)?;
    let authority = format!("{}:{}", spec.server_name, spec.relay.port());
    let requests: Rc<Vec<Bytes>> = Rc::new(
        (0..usize::from(spec.target_ports.max(1)))
            .map(|p| connect_udp_request(&authority, &spec.path_for(p)))
            .collect(),
    );
    let mut conns: Vec<Conn> = Vec::new();
    let mut index: HashMap<ConnectionHandle, usize> = HashMap::new();
    let mut to_connect: std::collections::VecDeque<_> = split(spec.flows, spec.connections).into();

    let mut bufs: Vec<Vec<u8>> = (0..RX_BUFS).map(|_| vec![0u8; 65_536]).collect();
    let mut meta = [RecvMeta::default(); RX_BUFS];
    let mut send_buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut response_buf: Vec<u8> = Vec::new();
    let mut pending: Option<(quinn_proto::Transmit, Vec<u8>)> = None;
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let mut busy = false;

        // 0. Connect, at most HANDSHAKES_AT_ONCE in progress (a relay asks for Retry beyond
        //    its own threshold anyway).
        if !to_connect.is_empty() && !ctx.stop.get() {
            let mut handshaking = conns.iter().filter(|c| !c.connected && !c.lost).count();
            while handshaking < crate::h2c::HANDSHAKES_AT_ONCE {
                let Some(g) = to_connect.pop_front() else {
                    break;
                };
                let (ch, conn) = endpoint
                    .connect(now, cfg.clone(), spec.relay, &spec.server_name)
                    .map_err(|e| BenchError::Setup(format!("QUIC connect: {e}")))?;
                index.insert(ch, conns.len());
                let mut c = Conn::new(ch, conn, &ctx, g);
                c.requests = requests.clone();
                conns.push(c);
                handshaking += 1;
                busy = true;
            }
        }

        // 1. Receive (bounded), feeding the endpoint and the connections.
        for _ in 0..16 {
            let n = {
                let mut slices: Vec<IoSliceMut<'_>> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                sock.io
                    .try_io(Interest::READABLE, || {
                        sock.state.recv((&sock.io).into(), &mut slices, &mut meta)
                    })
                    .unwrap_or_default()
            };
            if n == 0 {
                break;
            }
            busy = true;
            for (m, buf) in meta.iter().zip(&bufs).take(n) {
                let stride = m.stride.max(1);
                for seg in buf[..m.len].chunks(stride) {
                    let ecn = m
                        .ecn
                        .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                    response_buf.clear();
                    match endpoint.handle(
                        now,
                        m.addr,
                        m.dst_ip,
                        ecn,
                        BytesMut::from(seg),
                        &mut response_buf,
                    ) {
                        Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                            if let Some(&i) = index.get(&ch) {
                                conns[i].conn.handle_event(ev);
                            }
                        }
                        Some(DatagramEvent::Response(t)) => {
                            let _ = sock.send(&t, &response_buf);
                        }
                        _ => {}
                    }
                }
            }
        }

        // 2. Timers, events, load.
        let stop = ctx.stop.get();
        if stop && closing.is_none() {
            closing = Some(now + Duration::from_millis(500));
            for c in &mut conns {
                c.conn.close(
                    now,
                    VarInt::from_u64(H3_NO_ERROR).unwrap_or(VarInt::from_u32(0)),
                    Bytes::new(),
                );
            }
        }
        let sending = !stop && ctx.sending(now);
        for c in &mut conns {
            if c.timeout.is_some_and(|t| t <= now) {
                c.conn.handle_timeout(now);
            }
            busy |= c.process(now, &ctx);
            if sending && !c.lost {
                busy |= c.send_load(now, &ctx);
            }
        }

        // 3. Transmit (GSO batches); a full socket keeps the transmit for later.
        if let Some((t, b)) = pending.take() {
            match sock.send(&t, &b) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => pending = Some((t, b)),
                Err(e) => ctx.error(format!("UDP send of {} bytes: {e}", t.size)),
                Ok(()) => {}
            }
        }
        for c in &mut conns {
            while pending.is_none() {
                send_buf.clear();
                // 64 segments of 1350 bytes would be 86 KB: the kernel would drop the whole
                // train (a closed loop's full window of 64 x 1200 B at once).
                let segments = gso_segments(max_gso, c.conn.current_mtu());
                let Some(t) = c.conn.poll_transmit(now, segments, &mut send_buf) else {
                    break;
                };
                busy = true;
                match sock.send(&t, &send_buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        pending = Some((t, send_buf.clone()));
                    }
                    // Lost (QUIC recovers what it must); the first few are reported.
                    Err(e) => ctx.error(format!("UDP send of {} bytes: {e}", t.size)),
                    Ok(()) => {}
                }
            }
            c.timeout = c.conn.poll_timeout();
            while let Some(ev) = c.conn.poll_endpoint_events() {
                if let Some(cev) = endpoint.handle_event(c.ch, ev) {
                    c.conn.handle_event(cev);
                    busy = true;
                }
            }
        }

        if let Some(deadline) = closing {
            if now >= deadline || conns.iter().all(|c| c.conn.is_drained() || c.lost) {
                return Ok(());
            }
        }

        // 4. Wait for the socket, a timer, the next send, or the monitor.
        if busy && pending.is_none() {
            tokio::task::yield_now().await;
            continue;
        }
        let mut wake = conns.iter().filter_map(|c| c.timeout).min();
        if sending {
            if let Some(t) = conns.iter().filter_map(|c| c.load.next_send(now)).min() {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
        } else {
            // Setup or drain: look at the clock now and then.
            let t = now + Duration::from_millis(10);
            wake = Some(wake.map_or(t, |w| w.min(t)));
        }
        tokio::select! {
            r = sock.io.readable() => { let _ = r; }
            r = sock.io.writable(), if pending.is_some() => { let _ = r; }
            () = sleep_until(wake) => {}
            () = ctx.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_trains_stay_under_the_udp_limit() {
        assert_eq!(gso_segments(64, 1350), 48);
        assert!(gso_segments(64, 1350) * 1350 <= 65_507);
        assert_eq!(gso_segments(64, 1452), 44);
        assert_eq!(gso_segments(10, 1200), 10);
        assert_eq!(gso_segments(64, 65_000), 1);
        assert_eq!(path_mtu(1200), 1350);
        assert_eq!(path_mtu(1400), 1464);
    }
}
