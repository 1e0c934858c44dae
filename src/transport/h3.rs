//! The HTTP/3 session of one QUIC connection, and its CONNECT-UDP flows.
//!
//! Frames, settings, QPACK and the stream state machines are sans-I/O in `proto::h3`; this file
//! applies them to a `quinn_proto::Connection` and to the flows' target sockets. A datagram's
//! path through it:
//!
//! ```text
//! QUIC DATAGRAM --datagrams()--> quarter stream ID -> request -> Flow -> FlowSocket::send
//! DATA frame on the request stream --> CapsuleDecoder --------------^
//! FlowSocket (flow reader task) --> Flow --> QUIC DATAGRAM (or a DATAGRAM capsule on the stream)
//! ```
//!
//! A request is checked by the shared rules (`proto::connect_udp`), then its target is resolved
//! and opened by a task (resolution may take time); the response goes out when that finishes.
//! Datagrams that arrive before the response are held briefly (bounded per stream and in total).

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use quinn_proto::{ConnectionHandle, Dir, ReadError, StreamEvent, StreamId, VarInt, WriteError};
use tracing::debug;

use super::admit::{admit, ConnLimits, Ticket};
use super::quic::Shared;
use super::{target, tunnel};
use crate::ctx::WorkerCtx;
use crate::io::udp::FlowSocket;
use crate::metrics::Direction;
use crate::proto::capsule::{self, CapsuleDecoder};
use crate::proto::connect_udp::{check_request, HttpVersion, Rejection};
use crate::proto::h3::frame::{self, Settings};
use crate::proto::h3::stream::{
    ControlEvent, ControlStreamReader, QpackDecoderStreamReader, QpackEncoderStreamReader,
    RequestEvent, RequestStreamReader, StreamKind, UniStreamHead,
};
use crate::proto::h3::{qpack, request, ErrorScope, H3Error};
use crate::proto::{h3, varint};
use crate::relay::flow::{CloseReason, DropReason, Flow};

const VERSION: HttpVersion = HttpVersion::Http3;
/// Datagrams held per stream while its request is being processed.
const HELD_PER_STREAM: usize = 16;
/// Datagrams held per connection in total.
const HELD_TOTAL: usize = 256;
/// How long a held datagram may wait for its request.
const HELD_FOR: Duration = Duration::from_secs(1);
/// Target datagrams read per wake-up of one flow reader.
const RECV_BUDGET: usize = 64;

/// The largest quarter stream ID (RFC 9297 §2.1).
const MAX_QUARTER_STREAM_ID: u64 = (1 << 60) - 1;

/// A peer-initiated unidirectional stream.
enum Uni {
    Head(UniStreamHead),
    Control(ControlStreamReader),
    Encoder(QpackEncoderStreamReader),
    Decoder(QpackDecoderStreamReader),
    /// Unknown or grease type: read and discarded after STOP_SENDING.
    Ignored,
}

/// Where a request stands.
enum ReqState {
    /// Waiting for the HEADERS frame.
    Head,
    /// Target being resolved and opened.
    Opening,
    /// Relaying.
    Open(Box<FlowEntry>),
    /// Response sent (a refusal, or the flow ended); waiting for the stream to finish.
    Done,
}

struct Request {
    reader: RequestStreamReader,
    state: ReqState,
    /// Bytes to write on the stream that did not fit yet (response, capsules).
    out: BytesMut,
    /// Finish the stream once `out` is written.
    fin: bool,
    /// The client finished its side while the target was being opened: answer, then end.
    client_fin: bool,
}

struct FlowEntry {
    flow: Flow,
    sock: Rc<FlowSocket>,
    decoder: CapsuleDecoder,
    /// Reply with DATAGRAM capsules on the stream rather than QUIC DATAGRAM frames: the client
    /// used capsules, or QUIC datagrams are not available on this connection.
    capsules: bool,
    reader: tokio::task::JoinHandle<()>,
    opened: Instant,
    /// The flow's admission slots, freed when the entry goes.
    _ticket: Ticket,
}

/// One QUIC connection with its HTTP/3 state.
pub(crate) struct H3Conn {
    pub conn: quinn_proto::Connection,
    pub timeout: Option<Instant>,
    started: Instant,
    connected: bool,
    control: Option<(StreamId, BytesMut)>,
    peer_control: Option<StreamId>,
    peer_encoder: Option<StreamId>,
    peer_decoder: Option<StreamId>,
    peer_settings: Option<Settings>,
    uni: HashMap<StreamId, Uni>,
    /// Flows by request stream: stream IDs are chosen by the client, so SipHash (std's
    /// randomly keyed default) keeps a peer from steering collisions.
    requests: HashMap<StreamId, Request>,
    held: VecDeque<(Instant, StreamId, Bytes)>,
    closed: bool,
    /// The configuration in force when the connection arrived.
    live: Arc<crate::ctx::Shared>,
    /// The stream ID sent in our GOAWAY: requests on this stream or later are refused.
    goaway: Option<u64>,
    /// One past the highest request stream ID accepted so far.
    next_request_id: u64,
    /// Admission state, set when the handshake completes.
    limits: Option<Rc<ConnLimits>>,
    /// Bytes in and out before the client's address is validated.
    pub amplification: super::quic::Amplification,
}

impl H3Conn {
    pub fn new(conn: quinn_proto::Connection, now: Instant, live: Arc<crate::ctx::Shared>) -> Self {
        Self {
            conn,
            timeout: None,
            started: now,
            connected: false,
            control: None,
            peer_control: None,
            peer_encoder: None,
            peer_decoder: None,
            peer_settings: None,
            uni: HashMap::new(),
            requests: HashMap::new(),
            held: VecDeque::new(),
            closed: false,
            live,
            goaway: None,
            next_request_id: 0,
            limits: None,
            amplification: Default::default(),
        }
    }

    /// True when UDP payloads may travel in QUIC DATAGRAM frames: SETTINGS_H3_DATAGRAM sent and
    /// received, and the transport parameter negotiated (RFC 9297 §2.1.1).
    fn datagrams_ok(&mut self) -> bool {
        self.peer_settings.as_ref().is_some_and(|s| s.h3_datagram)
            && self.conn.datagrams().max_size().is_some()
    }

    fn close(&mut self, now: Instant, e: &H3Error) {
        debug!(
            code = e.code,
            reason = e.reason,
            "closing HTTP/3 connection"
        );
        if !self.closed {
            self.closed = true;
            self.conn.close(
                now,
                varint_of(e.code),
                Bytes::from_static(e.reason.as_bytes()),
            );
        }
    }

    /// Handles the connection's application events; returns true if anything happened (the
    /// driver then polls transmits again).
    pub fn process(
        &mut self,
        ch: ConnectionHandle,
        now: Instant,
        ctx: &WorkerCtx,
        shared: &Shared,
    ) -> bool {
        let mut any = false;
        self.expire_held(now, ctx);
        while let Some(ev) = self.conn.poll() {
            any = true;
            match ev {
                quinn_proto::Event::Connected => {
                    self.connected = true;
                    ctx.stats.connection_accepted(VERSION);
                    ctx.stats
                        .handshake_seconds
                        .observe(now.saturating_duration_since(self.started));
                    // With mTLS the handshake proved who the client is.
                    let tls_identity = self
                        .conn
                        .crypto_session()
                        .peer_identity()
                        .and_then(|any| {
                            any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                                .ok()
                        })
                        .and_then(|certs| certs.first().map(|c| super::tls::cert_identity(c)));
                    self.limits = Some(ConnLimits::new(&self.live, tls_identity));
                    self.open_control();
                    self.accept_streams(ch, now, ctx, shared);
                }
                quinn_proto::Event::HandshakeDataReady => {}
                quinn_proto::Event::ConnectionLost { reason } => {
                    debug!(%reason, "HTTP/3 connection lost");
                    self.close_all_flows(ctx, CloseReason::ClientAbort);
                }
                quinn_proto::Event::Stream(StreamEvent::Opened { .. }) => {
                    self.accept_streams(ch, now, ctx, shared)
                }
                quinn_proto::Event::Stream(StreamEvent::Readable { id }) => {
                    self.read_stream(ch, id, now, ctx, shared)
                }
                quinn_proto::Event::Stream(StreamEvent::Writable { id }) => self.flush(id),
                quinn_proto::Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    // The client no longer reads this stream: the flow cannot answer.
                    if let Some(mut r) = self.requests.remove(&id) {
                        self.abort_stream(id, h3::H3_REQUEST_CANCELLED);
                        end_flow(&mut r, CloseReason::ClientAbort, ctx);
                    }
                }
                quinn_proto::Event::Stream(StreamEvent::Finished { id }) => {
                    if matches!(
                        self.requests.get(&id),
                        Some(Request {
                            state: ReqState::Done,
                            ..
                        })
                    ) {
                        self.requests.remove(&id);
                    }
                }
                quinn_proto::Event::Stream(StreamEvent::Available { .. }) => {}
                quinn_proto::Event::DatagramReceived => self.recv_datagrams(now, ctx),
                quinn_proto::Event::DatagramsUnblocked => {}
            }
        }
        any
    }

    /// Opens the control stream and queues SETTINGS on it. Called when the connection is
    /// accepted, so SETTINGS leave as 0.5-RTT data with the handshake flight (RFC 9114 §6.2.1:
    /// "at the beginning of the connection"); a client that waits for them before its first
    /// request has them once its handshake completes. Again at `Connected` if the stream could
    /// not be opened yet.
    pub fn open_control(&mut self) {
        if self.control.is_some() {
            return;
        }
        let Some(id) = self.conn.streams().open(Dir::Uni) else {
            return;
        };
        let cfg = &self.live.config.http3;
        let mut out = BytesMut::new();
        varint::write(h3::STREAM_CONTROL, &mut out);
        // The grease setting differs per connection (RFC 9114 §7.2.4.1), so peers cannot come
        // to depend on one value.
        frame::encode_settings_seeded(
            &Settings {
                qpack_max_table_capacity: 0,
                qpack_blocked_streams: 0,
                max_field_section_size: Some(cfg.max_field_section_size),
                enable_connect_protocol: true,
                h3_datagram: true,
                grease: true,
            },
            rand::random(),
            &mut out,
        );
        self.control = Some((id, out));
        self.flush(id);
    }

    fn accept_streams(
        &mut self,
        ch: ConnectionHandle,
        now: Instant,
        ctx: &WorkerCtx,
        shared: &Shared,
    ) {
        while let Some(id) = self.conn.streams().accept(Dir::Uni) {
            self.uni.insert(id, Uni::Head(UniStreamHead::default()));
            self.read_stream(ch, id, now, ctx, shared);
        }
        while let Some(id) = self.conn.streams().accept(Dir::Bi) {
            let raw = u64::from(VarInt::from(id));
            self.next_request_id = self.next_request_id.max(raw + 4);
            if self.goaway.is_some_and(|g| raw >= g) {
                // RFC 9114 §5.2: after GOAWAY, requests at or past its ID are rejected, and the
                // client may retry them elsewhere.
                ctx.stats.request(VERSION, 503);
                self.abort_stream(id, h3::H3_REQUEST_REJECTED);
                continue;
            }
            let max = self.live.config.http3.max_field_section_size;
            self.requests.insert(
                id,
                Request {
                    reader: RequestStreamReader::new(max),
                    state: ReqState::Head,
                    out: BytesMut::new(),
                    fin: false,
                    client_fin: false,
                },
            );
            self.read_stream(ch, id, now, ctx, shared);
        }
    }

    /// Reads what a stream holds and hands it to its state machine.
    fn read_stream(
        &mut self,
        ch: ConnectionHandle,
        id: StreamId,
        now: Instant,
        ctx: &WorkerCtx,
        shared: &Shared,
    ) {
        let mut chunks_out: Vec<Bytes> = Vec::new();
        let mut fin = false;
        let mut reset = None;
        {
            let mut rs = self.conn.recv_stream(id);
            let Ok(mut chunks) = rs.read(true) else {
                return;
            };
            loop {
                match chunks.next(usize::MAX) {
                    Ok(Some(c)) => chunks_out.push(c.bytes),
                    Ok(None) => {
                        fin = true;
                        break;
                    }
                    Err(ReadError::Blocked) => break,
                    Err(ReadError::Reset(code)) => {
                        reset = Some(code);
                        break;
                    }
                }
            }
            let _ = chunks.finalize();
        }
        if id.dir() == Dir::Uni {
            self.uni_data(id, &chunks_out, fin || reset.is_some(), now, ctx);
        } else {
            self.request_data(ch, id, &chunks_out, fin, reset, now, ctx, shared);
        }
    }

    fn uni_data(
        &mut self,
        id: StreamId,
        chunks: &[Bytes],
        fin: bool,
        now: Instant,
        ctx: &WorkerCtx,
    ) {
        let mut err: Option<H3Error> = None;
        for chunk in chunks {
            let mut data: &[u8] = chunk;
            if let Some(Uni::Head(head)) = self.uni.get_mut(&id) {
                let Some((kind, used)) = head.push(data) else {
                    continue; // the type varint is still incomplete
                };
                data = &data[used..];
                let next = match kind {
                    StreamKind::Control if self.peer_control.is_some() => {
                        err = Some(conn_error(
                            h3::H3_STREAM_CREATION_ERROR,
                            "second control stream",
                        ));
                        break;
                    }
                    StreamKind::Control => {
                        self.peer_control = Some(id);
                        Uni::Control(ControlStreamReader::new())
                    }
                    StreamKind::QpackEncoder if self.peer_encoder.replace(id).is_some() => {
                        err = Some(conn_error(
                            h3::H3_STREAM_CREATION_ERROR,
                            "second QPACK encoder stream",
                        ));
                        break;
                    }
                    StreamKind::QpackEncoder => Uni::Encoder(QpackEncoderStreamReader::new()),
                    StreamKind::QpackDecoder if self.peer_decoder.replace(id).is_some() => {
                        err = Some(conn_error(
                            h3::H3_STREAM_CREATION_ERROR,
                            "second QPACK decoder stream",
                        ));
                        break;
                    }
                    StreamKind::QpackDecoder => Uni::Decoder(QpackDecoderStreamReader::new()),
                    StreamKind::Push => {
                        // RFC 9114 §6.2.2: only servers push; a client push stream is an error.
                        err = Some(conn_error(
                            h3::H3_STREAM_CREATION_ERROR,
                            "push stream from a client",
                        ));
                        break;
                    }
                    StreamKind::Unknown(_) => {
                        // RFC 9114 §6.2: unknown stream types are ignored; ask the peer to stop.
                        let _ = self
                            .conn
                            .recv_stream(id)
                            .stop(varint_of(h3::H3_STREAM_CREATION_ERROR));
                        Uni::Ignored
                    }
                };
                self.uni.insert(id, next);
            }
            let res = match self.uni.get_mut(&id) {
                Some(Uni::Control(r)) => {
                    let mut events = Vec::new();
                    let res = r.push(data, |e| events.push(e));
                    for e in events {
                        if let ControlEvent::Settings(s) = e {
                            self.peer_settings = Some(s);
                        }
                    }
                    res
                }
                Some(Uni::Encoder(r)) => r.push(data),
                Some(Uni::Decoder(r)) => r.push(data),
                _ => Ok(()),
            };
            if let Err(e) = res {
                err = Some(e);
                break;
            }
        }
        if err.is_none() && fin {
            // Closing a critical stream (control, QPACK) is a connection error.
            err = match self.uni.get_mut(&id) {
                Some(Uni::Control(r)) => r.finish().err(),
                Some(Uni::Encoder(_) | Uni::Decoder(_)) => Some(conn_error(
                    h3::H3_CLOSED_CRITICAL_STREAM,
                    "QPACK stream closed",
                )),
                _ => None,
            };
            self.uni.remove(&id);
        }
        if let Some(e) = err {
            ctx.stats.h3_connection_errors.inc();
            self.close(now, &e);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn request_data(
        &mut self,
        ch: ConnectionHandle,
        id: StreamId,
        chunks: &[Bytes],
        fin: bool,
        reset: Option<VarInt>,
        now: Instant,
        ctx: &WorkerCtx,
        shared: &Shared,
    ) {
        let Some(mut req) = self.requests.remove(&id) else {
            return;
        };
        let mut close: Option<CloseReason> = None;
        let mut err: Option<H3Error> = None;
        for chunk in chunks {
            let mut head: Option<Vec<u8>> = None;
            let mut capsule_bytes: Vec<Bytes> = Vec::new();
            let res = req.reader.push(chunk, |ev| match ev {
                RequestEvent::Headers(block) => head = Some(block.to_vec()),
                RequestEvent::Data(d) => capsule_bytes.push(Bytes::copy_from_slice(d)),
                RequestEvent::Trailers(_) => {}
            });
            if let Err(e) = res {
                err = Some(e);
                break;
            }
            if let Some(block) = head {
                if let Err(e) = self.start_request(ch, id, &mut req, &block, now, ctx, shared) {
                    err = Some(e);
                    break;
                }
            }
            for data in capsule_bytes {
                if let Some(r) = self.client_capsules(&mut req, &data, ctx) {
                    close = Some(r);
                    break;
                }
            }
            if close.is_some() {
                break;
            }
        }
        if err.is_none() && close.is_none() {
            if reset.is_some() {
                close = Some(CloseReason::ClientAbort);
            } else if fin {
                err = req.reader.finish().err();
                if err.is_none() {
                    close = Some(match &mut req.state {
                        ReqState::Open(f) => match f.decoder.finish() {
                            Ok(()) => CloseReason::ClientEnd,
                            Err(_) => CloseReason::ClientProtocolError,
                        },
                        _ => CloseReason::ClientEnd,
                    });
                }
            }
        }
        if let Some(e) = err {
            match e.scope {
                ErrorScope::Connection => {
                    ctx.stats.h3_connection_errors.inc();
                    end_flow(&mut req, CloseReason::ClientProtocolError, ctx);
                    self.close(now, &e);
                    return;
                }
                ErrorScope::Stream => {
                    // A malformed request or message is a stream error (RFC 9114 §4.1.2): the
                    // stream is reset with the error's code, the connection goes on.
                    ctx.stats.h3_stream_errors.inc();
                    end_flow(&mut req, CloseReason::ClientProtocolError, ctx);
                    self.abort_stream(id, e.code);
                    return;
                }
            }
        }
        match close {
            Some(CloseReason::ClientAbort) => {
                end_flow(&mut req, CloseReason::ClientAbort, ctx);
                let _ = self
                    .conn
                    .send_stream(id)
                    .reset(varint_of(h3::H3_REQUEST_CANCELLED));
            }
            Some(CloseReason::ClientProtocolError) => {
                end_flow(&mut req, CloseReason::ClientProtocolError, ctx);
                self.abort_stream(id, h3::H3_MESSAGE_ERROR);
            }
            Some(r) => {
                // The client finished its side: end the flow and finish ours promptly.
                if matches!(req.state, ReqState::Opening) {
                    // The response is still to come (the target is being opened); it goes
                    // out, then the stream ends.
                    req.client_fin = true;
                } else {
                    end_flow(&mut req, r, ctx);
                    req.fin = true;
                    req.state = ReqState::Done;
                }
                self.requests.insert(id, req);
                self.flush(id);
            }
            None => {
                self.requests.insert(id, req);
                // A refusal may have been queued by start_request.
                self.flush(id);
            }
        }
    }

    /// The request's HEADERS arrived: decode, check, and start opening the target.
    #[allow(clippy::too_many_arguments)]
    fn start_request(
        &mut self,
        ch: ConnectionHandle,
        id: StreamId,
        req: &mut Request,
        block: &[u8],
        _now: Instant,
        ctx: &WorkerCtx,
        shared: &Shared,
    ) -> Result<(), H3Error> {
        let max = self.live.config.http3.max_field_section_size;
        let fields = match qpack::decode_field_section(block, max) {
            Ok(f) => f,
            Err(qpack::QpackError::TooLarge) => {
                self.respond(
                    id,
                    req,
                    &Rejection::new(431, None, "request headers too large"),
                    ctx,
                );
                return Ok(());
            }
            Err(_) => {
                return Err(conn_error(
                    h3::QPACK_DECOMPRESSION_FAILED,
                    "cannot decode field section",
                ))
            }
        };
        let head = request::parse_request(&fields)?;
        let rh = head.as_connect_udp();
        if ctx.refusing() {
            self.respond(
                id,
                req,
                &Rejection::new(503, None, "relay is draining"),
                ctx,
            );
            return Ok(());
        }
        let proxy_authorization = fields
            .iter()
            .find(|f| f.name == b"proxy-authorization")
            .map(|f| f.value.as_slice());
        let limits = self
            .limits
            .get_or_insert_with(|| ConnLimits::new(&self.live, None))
            .clone();
        let checked = admit(&self.live, &limits, proxy_authorization).and_then(|ticket| {
            check_request(&rh, &self.live.config.uri_template).map(|t| (t, ticket))
        });
        match checked {
            Err(r) => self.respond(id, req, &r, ctx),
            Ok((t, ticket)) => {
                req.state = ReqState::Opening;
                let ctx2 = ctx.clone();
                let shared = shared.clone();
                let started = Instant::now();
                tokio::task::spawn_local(async move {
                    let opened = target::open(&ctx2, &t, VERSION).await;
                    opened_target(&shared, ch, id, opened.map(|s| (s, ticket)), started);
                });
            }
        }
        Ok(())
    }

    /// Sends a refusal and finishes the stream.
    fn respond(&mut self, id: StreamId, req: &mut Request, r: &Rejection, ctx: &WorkerCtx) {
        debug!(status = r.status, details = %r.details, "h3 request refused");
        ctx.stats.request(VERSION, r.status);
        if let Some(e) = r.proxy_error {
            ctx.stats.refusal(e);
        }
        let fields = r.header_fields(VERSION, crate::relay::auth::CHALLENGE);
        let extra: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let mut block = BytesMut::new();
        request::encode_response(r.status, &extra, &mut block);
        frame::encode_headers_frame(&block, &mut req.out);
        req.fin = true;
        req.state = ReqState::Done;
        let _ = self.conn.recv_stream(id).stop(varint_of(h3::H3_NO_ERROR));
    }

    /// DATA on a request stream: capsules.
    fn client_capsules(
        &mut self,
        req: &mut Request,
        data: &Bytes,
        ctx: &WorkerCtx,
    ) -> Option<CloseReason> {
        let ReqState::Open(f) = &mut req.state else {
            // Capsules before the response: RFC 9298 lets a client send optimistically; with no
            // flow yet they cannot be relayed. Dropped and counted.
            ctx.stats.dropped(DropReason::NoFlow);
            return None;
        };
        // The client uses capsules: answer in kind.
        f.capsules = true;
        tunnel::client_capsules(&mut f.flow, &mut f.decoder, &f.sock, &ctx.stats, data)
    }

    /// QUIC DATAGRAM frames from the client.
    fn recv_datagrams(&mut self, now: Instant, ctx: &WorkerCtx) {
        while let Some(d) = self.conn.datagrams().recv() {
            let Some((qsid, n)) = varint::read(&d) else {
                self.close(
                    now,
                    &conn_error(h3::H3_DATAGRAM_ERROR, "datagram too short"),
                );
                return;
            };
            if qsid > MAX_QUARTER_STREAM_ID {
                self.close(
                    now,
                    &conn_error(h3::H3_DATAGRAM_ERROR, "quarter stream ID too large"),
                );
                return;
            }
            let Some(id) = VarInt::from_u64(qsid * 4).ok().map(StreamId::from) else {
                continue;
            };
            let payload = d.slice(n..);
            match self.requests.get_mut(&id) {
                Some(Request {
                    state: ReqState::Open(f),
                    ..
                }) => {
                    let Some((ctx_id, m)) = varint::read(&payload) else {
                        ctx.stats.dropped(DropReason::Malformed);
                        continue;
                    };
                    let (flow, sock) = (&mut f.flow, &f.sock);
                    if let Some(reason) = forward(flow, sock, ctx_id, payload.slice(m..), now, ctx)
                    {
                        if let Some(mut req) = self.requests.remove(&id) {
                            self.finish_flow(id, &mut req, reason, ctx);
                            self.requests.insert(id, req);
                        }
                    }
                }
                Some(Request {
                    state: ReqState::Done,
                    ..
                }) => ctx.stats.dropped(DropReason::NoFlow),
                _ => self.hold(now, id, payload, ctx),
            }
        }
    }

    /// Keeps a datagram that arrived before its request was answered, within bounds.
    fn hold(&mut self, now: Instant, id: StreamId, payload: Bytes, ctx: &WorkerCtx) {
        let for_stream = self.held.iter().filter(|(_, s, _)| *s == id).count();
        if self.held.len() >= HELD_TOTAL || for_stream >= HELD_PER_STREAM {
            ctx.stats.dropped(DropReason::NoFlow);
            return;
        }
        self.held.push_back((now, id, payload));
    }

    fn expire_held(&mut self, now: Instant, ctx: &WorkerCtx) {
        while let Some((t, _, _)) = self.held.front() {
            if now.saturating_duration_since(*t) < HELD_FOR {
                break;
            }
            self.held.pop_front();
            ctx.stats.dropped(DropReason::NoFlow);
        }
    }

    /// Writes what a stream has pending; finishes it when asked and everything is out.
    fn flush(&mut self, id: StreamId) {
        if let Some((cid, out)) = &mut self.control {
            if *cid == id {
                write_some(&mut self.conn, id, out);
                return;
            }
        }
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        if !write_some(&mut self.conn, id, &mut req.out) {
            return;
        }
        if req.out.is_empty() && req.fin {
            req.fin = false;
            let _ = self.conn.send_stream(id).finish();
        }
    }

    /// Ends a flow from the relay's side with the stream action its reason calls for.
    fn finish_flow(
        &mut self,
        id: StreamId,
        req: &mut Request,
        reason: CloseReason,
        ctx: &WorkerCtx,
    ) {
        end_flow(req, reason, ctx);
        req.state = ReqState::Done;
        match reason {
            CloseReason::TargetError => self.abort_stream(id, h3::H3_CONNECT_ERROR),
            CloseReason::ClientProtocolError => self.abort_stream(id, h3::H3_MESSAGE_ERROR),
            _ => {
                req.fin = true;
                let _ = self.conn.recv_stream(id).stop(varint_of(h3::H3_NO_ERROR));
            }
        }
    }

    /// Starts the graceful drain of this connection: GOAWAY on the control stream naming the
    /// first request that will not be processed.
    pub fn goaway(&mut self) {
        if self.goaway.is_some() || self.closed {
            return;
        }
        let id = self.next_request_id;
        self.goaway = Some(id);
        if let Some((cid, out)) = &mut self.control {
            frame::encode_goaway(id, out);
            let cid = *cid;
            self.flush(cid);
        }
    }

    /// True when a draining connection has nothing left to relay and can be closed.
    pub fn drained(&self) -> bool {
        self.goaway.is_some()
            && !self
                .requests
                .values()
                .any(|r| matches!(r.state, ReqState::Opening | ReqState::Open(_)))
    }

    /// Closes the connection with H3_NO_ERROR (the end of a drain, or shutdown).
    pub fn close_gracefully(&mut self, now: Instant) {
        if !self.closed {
            self.closed = true;
            self.conn
                .close(now, varint_of(h3::H3_NO_ERROR), Bytes::new());
        }
    }

    /// Aborts a request stream both ways (RESET_STREAM and STOP_SENDING) with `code`.
    fn abort_stream(&mut self, id: StreamId, code: u64) {
        let _ = self.conn.send_stream(id).reset(varint_of(code));
        let _ = self.conn.recv_stream(id).stop(varint_of(code));
    }

    /// The connection is gone (or the relay stops): every flow ends, for `reason`.
    pub fn close_all_flows(&mut self, ctx: &WorkerCtx, reason: CloseReason) {
        for (_, mut req) in self.requests.drain() {
            end_flow(&mut req, reason, ctx);
        }
    }

    /// True once the connection has been closed from this side.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends one target datagram to the client: a QUIC DATAGRAM frame, or a capsule on the
    /// stream. Returns false when it was dropped.
    fn send_to_client(&mut self, id: StreamId, payload: &[u8], ctx: &WorkerCtx) -> bool {
        let use_capsules = match self.requests.get(&id) {
            Some(Request {
                state: ReqState::Open(f),
                ..
            }) => f.capsules,
            _ => return false,
        } || !self.datagrams_ok();
        if use_capsules {
            let req = self.requests.get_mut(&id).expect("checked above");
            let clen = capsule::datagram_header_len(0, payload.len()) + payload.len();
            let flen = frame::data_frame_header_len(clen as u64) + clen;
            if req.out.len() + flen > self.live.config.client_send_buffer {
                ctx.stats.dropped(DropReason::ClientNotReading);
                return false;
            }
            frame::encode_frame_header(frame::DATA, clen as u64, &mut req.out);
            capsule::encode_datagram_header(0, payload.len(), &mut req.out);
            req.out.put_slice(payload);
            self.flush(id);
            return true;
        }
        // RFC 9297 §2.1: the quarter stream ID is the request stream ID divided by four.
        let qsid = u64::from(VarInt::from(id)) / 4;
        let len = varint::encoded_len(qsid) + 1 + payload.len();
        if self.conn.datagrams().max_size().is_none_or(|m| len > m) {
            // RFC 9298 §5: too big for a DATAGRAM frame is dropped, not moved into a capsule.
            ctx.stats.dropped(DropReason::TooLarge);
            return false;
        }
        // The one copy of a target datagram on its way to the client: into the worker's
        // arena, which quinn-proto encrypts from.
        let d = super::arena::take(super::arena::Use::Tx, len, |b| {
            varint::write(qsid, b);
            varint::write(0, b);
            b.put_slice(payload);
        })
        .freeze();
        match self.conn.datagrams().send(d, false) {
            Ok(()) => true,
            Err(quinn_proto::SendDatagramError::Blocked(_)) => {
                ctx.stats.dropped(DropReason::ClientNotReading);
                false
            }
            Err(_) => {
                ctx.stats.dropped(DropReason::TooLarge);
                false
            }
        }
    }
}

/// Sends a client datagram to the target; returns a close reason if the flow must end.
fn forward(
    flow: &mut Flow,
    sock: &FlowSocket,
    context_id: u64,
    payload: Bytes,
    now: Instant,
    ctx: &WorkerCtx,
) -> Option<CloseReason> {
    tunnel::forward_to_target(flow, sock, context_id, payload, now, &ctx.stats)
}

/// Ends a request's flow, if it has one: stops its reader, closes its socket, counts it.
fn end_flow(req: &mut Request, reason: CloseReason, ctx: &WorkerCtx) {
    if !matches!(req.state, ReqState::Open(_)) {
        return; // no flow: a request still opening keeps its state for its answer
    }
    if let ReqState::Open(f) = std::mem::replace(&mut req.state, ReqState::Done) {
        f.reader.abort();
        let c = f.flow.counters();
        let now = Instant::now();
        debug!(
            target = %f.sock.target(),
            reason = reason.as_str(),
            to_target = c.to_target_datagrams,
            to_client = c.to_client_datagrams,
            dropped = c.dropped,
            "h3 flow closed"
        );
        ctx.stats.flow_closed(reason);
        ctx.stats
            .flow_lifetime_seconds
            .observe(now.saturating_duration_since(f.opened));
    }
}

/// Writes as much of `out` as the stream takes; false if the stream is gone.
fn write_some(conn: &mut quinn_proto::Connection, id: StreamId, out: &mut BytesMut) -> bool {
    while !out.is_empty() {
        match conn.send_stream(id).write(out) {
            Ok(n) => out.advance(n),
            Err(WriteError::Blocked) => return true,
            Err(_) => {
                out.clear();
                return false;
            }
        }
    }
    true
}

fn varint_of(code: u64) -> VarInt {
    VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0))
}

fn conn_error(code: u64, reason: &'static str) -> H3Error {
    H3Error {
        code,
        reason,
        scope: ErrorScope::Connection,
    }
}

/// The target of a request is open (or refused): send the response and start relaying.
fn opened_target(
    shared: &Shared,
    ch: ConnectionHandle,
    id: StreamId,
    opened: Result<(FlowSocket, Ticket), Rejection>,
    started: Instant,
) {
    let mut driver = shared.borrow_mut();
    let ctx = driver.ctx.clone();
    let Some(c) = driver.conns.get_mut(&ch) else {
        return; // the connection went away meanwhile; the socket closes here
    };
    let Some(mut req) = c.requests.remove(&id) else {
        return; // the stream went away meanwhile
    };
    if !matches!(req.state, ReqState::Opening) {
        c.requests.insert(id, req);
        return;
    }
    ctx.stats
        .request_seconds
        .observe(Instant::now().saturating_duration_since(started));
    match opened {
        Err(r) => {
            c.respond(id, &mut req, &r, &ctx);
            c.requests.insert(id, req);
        }
        Ok((sock, ticket)) => {
            let mut block = BytesMut::new();
            request::encode_response(200, &[("capsule-protocol", "?1")], &mut block);
            frame::encode_headers_frame(&block, &mut req.out);
            ctx.stats.request(VERSION, 200);
            ctx.stats.flows_opened.inc();
            if req.client_fin {
                // The client already ended its side: the flow ends as it opens.
                debug!(target = %sock.target(), "h3 flow ended by the client before its response");
                ctx.stats.flow_closed(CloseReason::ClientEnd);
                req.fin = true;
                req.state = ReqState::Done;
                c.requests.insert(id, req);
                c.flush(id);
                driver.touch(ch);
                driver.wake.notify_one();
                return;
            }
            debug!(target = %sock.target(), identity = ?ticket.identity, "h3 flow opened");
            let sock = Rc::new(sock);
            let cfg = &c.live.config;
            let now = Instant::now();
            let flow = Flow::new(now, cfg.flow_idle_timeout, cfg.max_udp_payload)
                .with_rate_limit(cfg.limits.datagrams_per_second, now);
            let reader =
                tokio::task::spawn_local(flow_reader(shared.clone(), ch, id, sock.clone()));
            req.state = ReqState::Open(Box::new(FlowEntry {
                flow,
                sock,
                decoder: CapsuleDecoder::new(cfg.max_udp_payload),
                capsules: false,
                reader,
                opened: now,
                _ticket: ticket,
            }));
            c.requests.insert(id, req);
            // Datagrams that came early.
            let held: Vec<Bytes> = {
                let mut keep = VecDeque::new();
                let mut mine = Vec::new();
                for (t, s, d) in c.held.drain(..) {
                    if s == id {
                        mine.push(d);
                    } else {
                        keep.push_back((t, s, d));
                    }
                }
                c.held = keep;
                mine
            };
            for payload in held {
                if let Some(Request {
                    state: ReqState::Open(f),
                    ..
                }) = c.requests.get_mut(&id)
                {
                    if let Some((ctx_id, m)) = varint::read(&payload) {
                        let _ =
                            forward(&mut f.flow, &f.sock, ctx_id, payload.slice(m..), now, &ctx);
                    }
                }
            }
        }
    }
    c.flush(id);
    driver.touch(ch);
    driver.wake.notify_one();
}

/// Reads one flow's target socket and sends what arrives to the client; ends the flow on a
/// target error or when it has been idle too long.
async fn flow_reader(shared: Shared, ch: ConnectionHandle, id: StreamId, sock: Rc<FlowSocket>) {
    loop {
        let deadline = {
            let d = shared.borrow();
            match d.conns.get(&ch).and_then(|c| c.requests.get(&id)) {
                Some(Request {
                    state: ReqState::Open(f),
                    ..
                }) => f.flow.poll_timeout(),
                _ => return,
            }
        };
        let timed_out = tokio::select! {
            () = sock.readable() => false,
            () = tokio::time::sleep_until(deadline.into()) => true,
        };
        let mut d = shared.borrow_mut();
        let ctx = d.ctx.clone();
        let Some(c) = d.conns.get_mut(&ch) else {
            return;
        };
        let now = Instant::now();
        let mut close = None;
        if timed_out {
            if let Some(Request {
                state: ReqState::Open(f),
                ..
            }) = c.requests.get(&id)
            {
                close = f.flow.handle_timeout(now);
            }
        } else {
            let mut gone = false;
            for _ in 0..RECV_BUDGET {
                match sock.try_recv() {
                    None => break,
                    Some(Err(e)) => {
                        debug!(target = %sock.target(), error = %e, "target socket error");
                        close = Some(CloseReason::TargetError);
                        break;
                    }
                    Some(Ok(rx)) => {
                        let data = rx.data();
                        let n = data.len();
                        let Some(Request {
                            state: ReqState::Open(f),
                            ..
                        }) = c.requests.get_mut(&id)
                        else {
                            gone = true;
                            break;
                        };
                        if let Err(r) = f.flow.on_target_datagram(now, n) {
                            ctx.stats.dropped(r);
                            continue;
                        }
                        let sent = c.send_to_client(id, data, &ctx);
                        if let Some(Request {
                            state: ReqState::Open(f),
                            ..
                        }) = c.requests.get_mut(&id)
                        {
                            if sent {
                                ctx.stats.datagram(VERSION, Direction::ToClient, n);
                                f.flow.on_sent_to_client(n);
                            } else {
                                f.flow.on_dropped();
                            }
                        }
                    }
                }
            }
            if gone {
                return;
            }
        }
        if let Some(reason) = close {
            if let Some(mut req) = c.requests.remove(&id) {
                // Ending the flow aborts this task at its next await; finish the work first.
                c.finish_flow(id, &mut req, reason, &ctx);
                c.requests.insert(id, req);
                c.flush(id);
            }
        }
        d.touch(ch);
        d.wake.notify_one();
        if close.is_some() {
            return;
        }
    }
}
