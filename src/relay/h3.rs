//! The HTTP/3 session of one QUIC connection, sans-I/O: the control and QPACK streams,
//! SETTINGS, request streams, HTTP Datagrams (QUIC DATAGRAM frames and DATAGRAM capsules),
//! GOAWAY. It runs over a `quinn_proto::Connection` (itself sans-I/O) and talks to the worker
//! in events and calls, quinn-proto style:
//!
//! ```text
//! quinn-proto events --process()--> Event::Request      --> the worker admits it --> accept() / respond()
//!                                   Event::Datagram     --> the worker's flow table --> target
//!                                   Event::FlowEnded    --> the worker closes the flow
//!                                   Event::Lost         --> every flow of the connection ends
//! target datagram --> the worker --> send_datagram() --> QUIC DATAGRAM (or a capsule)
//! ```
//!
//! Frames, settings, QPACK and the stream state machines are in `proto::h3`; this file applies
//! them to the connection's streams. It reads no clock (time comes in as `now`) and owns no
//! socket: it is tested in memory against a quinn-proto client on virtual time.
//!
//! Datagrams that arrive before their request has been answered are held briefly (bounded
//! per stream and in total) and delivered when the flow opens (RFC 9298 does not forbid
//! optimistic datagrams; envoy #34836 and h2o #3200 reset instead).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use quinn_proto::{Dir, ReadError, StreamEvent, StreamId, VarInt, WriteError};
use tracing::debug;

use crate::metrics::WorkerStats;
use crate::proto::capsule::{self, CapsuleDecoder, Event as CapsuleEvent};
use crate::proto::connect_udp::{HttpVersion, OwnedRequest, Rejection};
use crate::proto::h3::frame::{self, Settings};
use crate::proto::h3::stream::{
    ControlEvent, ControlStreamReader, QpackDecoderStreamReader, QpackEncoderStreamReader,
    RequestEvent, RequestStreamReader, StreamKind, UniStreamHead,
};
use crate::proto::h3::{qpack, request, ErrorScope, H3Error};
use crate::proto::{h3, varint};
use crate::relay::flow::{CloseReason, DropReason};
use crate::relay::flow_table::FlowId;

const VERSION: HttpVersion = HttpVersion::Http3;
/// Datagrams held per stream while its request is being answered.
const HELD_PER_STREAM: usize = 16;
/// Datagrams held per connection in total.
const HELD_TOTAL: usize = 256;
/// How long a held datagram may wait for its request.
const HELD_FOR: Duration = Duration::from_secs(1);
/// The largest quarter stream ID (RFC 9297 §2.1).
const MAX_QUARTER_STREAM_ID: u64 = (1 << 60) - 1;

/// What the session needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// `http3.max_field_section_size`.
    pub max_field_section_size: u64,
    /// `max_udp_payload`: capsule payloads above it are skipped without being buffered.
    pub max_udp_payload: usize,
    /// `client_send_buffer`: bytes of capsules that may wait on one stream for the client.
    pub client_send_buffer: usize,
}

/// Event queue capacity a session keeps once drained.
const EVENTS_KEPT: usize = 16;

/// What the session tells the worker.
#[derive(Debug)]
pub enum Event {
    /// The handshake completed.
    Connected,
    /// A request head arrived and follows the HTTP/3 message rules (or the session refused it
    /// itself: a header section over the limit). The worker answers with
    /// [`H3Session::accept`] or [`H3Session::respond`], now or once the target is resolved.
    Request {
        stream: StreamId,
        request: Result<OwnedRequest, Rejection>,
    },
    /// An HTTP Datagram (context ID and payload) for an open flow.
    Datagram {
        flow: FlowId,
        context_id: u64,
        payload: Bytes,
    },
    /// A DATAGRAM capsule too large to buffer was skipped; the flow decides between a drop
    /// and an abort (RFC 9298 §5).
    DatagramTooLarge {
        flow: FlowId,
        context_id: u64,
        len: u64,
    },
    /// A flow's stream ended from the client's side (or broke the protocol); the session has
    /// done what the stream needs. The worker closes the flow.
    FlowEnded { flow: FlowId, reason: CloseReason },
    /// The connection is gone; every flow on it ends ([`H3Session::take_flows`]).
    Lost,
}

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqState {
    /// Waiting for the HEADERS frame.
    Head,
    /// Handed to the worker; waiting for its answer.
    Pending,
    /// Relaying.
    Open(FlowId),
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
    /// The client finished its side while its request was pending: answer, then end.
    client_fin: bool,
    /// Capsules the client sends on the stream (created at the first DATA).
    decoder: Option<Box<CapsuleDecoder>>,
    /// The client sends capsules: answer in kind.
    capsules: bool,
}

/// What [`H3Session::accept`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The flow is open.
    Open,
    /// The client had already finished its side: the response went out and the stream ends;
    /// the flow ends as it opens.
    EndedByClient,
    /// The stream is gone: nothing was sent.
    Gone,
}

/// One QUIC connection with its HTTP/3 state.
pub struct H3Session {
    pub conn: quinn_proto::Connection,
    cfg: SessionConfig,
    started: Instant,
    control: Option<(StreamId, BytesMut)>,
    peer_control: Option<StreamId>,
    peer_encoder: Option<StreamId>,
    peer_decoder: Option<StreamId>,
    peer_settings: Option<Settings>,
    uni: HashMap<StreamId, Uni>,
    /// Requests by stream: stream IDs are chosen by the client, so SipHash (std's randomly
    /// keyed default) keeps a peer from steering collisions.
    /// Boxed: a table sized for a few hundred requests holds pointers, not requests.
    requests: HashMap<StreamId, Box<Request>>,
    held: VecDeque<(Instant, StreamId, Bytes)>,
    closed: bool,
    lost: bool,
    /// The stream ID sent in our GOAWAY: requests on this stream or later are refused.
    goaway: Option<u64>,
    /// One past the highest request stream ID accepted so far.
    next_request_id: u64,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for H3Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H3Session")
            .field("requests", &self.requests.len())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl H3Session {
    /// A session for a connection just accepted. Its control stream and SETTINGS are queued at
    /// once, so they leave as 0.5-RTT data with the handshake flight (RFC 9114 §6.2.1: "at the
    /// beginning of the connection"): a client that waits for them before its first request
    /// has them when its handshake completes.
    pub fn new(conn: quinn_proto::Connection, cfg: SessionConfig, now: Instant) -> Self {
        let mut s = Self {
            conn,
            cfg,
            started: now,
            control: None,
            peer_control: None,
            peer_encoder: None,
            peer_decoder: None,
            peer_settings: None,
            uni: HashMap::new(),
            requests: HashMap::new(),
            held: VecDeque::new(),
            closed: false,
            lost: false,
            goaway: None,
            next_request_id: 0,
            events: VecDeque::new(),
        };
        s.open_control();
        s
    }

    /// When the connection arrived (for the handshake duration).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// True when events wait for the worker.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next event for the worker.
    pub fn poll_event(&mut self) -> Option<Event> {
        let e = self.events.pop_front();
        if e.is_none() && self.events.capacity() > EVENTS_KEPT {
            // A burst of requests grew the queue; an idle session keeps only a little of it.
            self.events.shrink_to(EVENTS_KEPT);
        }
        e
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

    /// Handles the connection's application events (after quinn-proto has taken packets and
    /// timers); returns true if anything happened. What the worker must act on is queued for
    /// [`H3Session::poll_event`].
    pub fn process(&mut self, now: Instant, stats: &WorkerStats) -> bool {
        let mut any = false;
        self.expire_held(now, stats);
        while let Some(ev) = self.conn.poll() {
            any = true;
            match ev {
                quinn_proto::Event::Connected => {
                    self.open_control();
                    self.events.push_back(Event::Connected);
                    self.accept_streams(now, stats);
                }
                quinn_proto::Event::HandshakeDataReady => {}
                quinn_proto::Event::ConnectionLost { reason } => {
                    debug!(%reason, "HTTP/3 connection lost");
                    if !self.lost {
                        self.lost = true;
                        self.events.push_back(Event::Lost);
                    }
                }
                quinn_proto::Event::Stream(StreamEvent::Opened { .. }) => {
                    self.accept_streams(now, stats)
                }
                quinn_proto::Event::Stream(StreamEvent::Readable { id }) => {
                    self.read_stream(id, now, stats)
                }
                quinn_proto::Event::Stream(StreamEvent::Writable { id }) => self.flush(id),
                quinn_proto::Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    // The client no longer reads this stream: the flow cannot answer.
                    if let Some(r) = self.requests.remove(&id) {
                        self.abort_stream(id, h3::H3_REQUEST_CANCELLED);
                        if let ReqState::Open(flow) = r.state {
                            self.events.push_back(Event::FlowEnded {
                                flow,
                                reason: CloseReason::ClientAbort,
                            });
                        }
                    }
                }
                quinn_proto::Event::Stream(StreamEvent::Finished { id }) => {
                    if self
                        .requests
                        .get(&id)
                        .is_some_and(|r| r.state == ReqState::Done)
                    {
                        self.requests.remove(&id);
                    }
                }
                quinn_proto::Event::Stream(StreamEvent::Available { .. }) => {}
                quinn_proto::Event::DatagramReceived => self.recv_datagrams(now, stats),
                quinn_proto::Event::DatagramsUnblocked => {}
            }
        }
        any
    }

    fn open_control(&mut self) {
        if self.control.is_some() {
            return;
        }
        let Some(id) = self.conn.streams().open(Dir::Uni) else {
            return;
        };
        let mut out = BytesMut::new();
        varint::write(h3::STREAM_CONTROL, &mut out);
        // The grease setting differs per connection (RFC 9114 §7.2.4.1), so peers cannot come
        // to depend on one value.
        frame::encode_settings_seeded(
            &Settings {
                qpack_max_table_capacity: 0,
                qpack_blocked_streams: 0,
                max_field_section_size: Some(self.cfg.max_field_section_size),
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

    fn accept_streams(&mut self, now: Instant, stats: &WorkerStats) {
        while let Some(id) = self.conn.streams().accept(Dir::Uni) {
            self.uni.insert(id, Uni::Head(UniStreamHead::default()));
            self.read_stream(id, now, stats);
        }
        while let Some(id) = self.conn.streams().accept(Dir::Bi) {
            let raw = u64::from(VarInt::from(id));
            self.next_request_id = self.next_request_id.max(raw + 4);
            if self.goaway.is_some_and(|g| raw >= g) {
                // RFC 9114 §5.2: after GOAWAY, requests at or past its ID are rejected, and the
                // client may retry them elsewhere.
                stats.request(VERSION, 503);
                self.abort_stream(id, h3::H3_REQUEST_REJECTED);
                continue;
            }
            self.requests.insert(
                id,
                Box::new(Request {
                    reader: RequestStreamReader::new(self.cfg.max_field_section_size),
                    state: ReqState::Head,
                    out: BytesMut::new(),
                    fin: false,
                    client_fin: false,
                    decoder: None,
                    capsules: false,
                }),
            );
            self.read_stream(id, now, stats);
        }
    }

    /// Reads what a stream holds and hands it to its state machine.
    fn read_stream(&mut self, id: StreamId, now: Instant, stats: &WorkerStats) {
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
            self.uni_data(id, &chunks_out, fin || reset.is_some(), now, stats);
        } else {
            self.request_data(id, &chunks_out, fin, reset, now, stats);
        }
    }

    fn uni_data(
        &mut self,
        id: StreamId,
        chunks: &[Bytes],
        fin: bool,
        now: Instant,
        stats: &WorkerStats,
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
            stats.h3_connection_errors.inc();
            self.close(now, &e);
        }
    }

    fn request_data(
        &mut self,
        id: StreamId,
        chunks: &[Bytes],
        fin: bool,
        reset: Option<VarInt>,
        now: Instant,
        stats: &WorkerStats,
    ) {
        let Some(mut req) = self.requests.remove(&id) else {
            return;
        };
        let mut close: Option<CloseReason> = None;
        let mut err: Option<H3Error> = None;
        for chunk in chunks {
            let mut head: Option<Vec<u8>> = None;
            let mut data: Vec<Bytes> = Vec::new();
            let res = req.reader.push(chunk, |ev| match ev {
                RequestEvent::Headers(block) => head = Some(block.to_vec()),
                RequestEvent::Data(d) => data.push(share(chunk, d)),
                RequestEvent::Trailers(_) => {}
            });
            if let Err(e) = res {
                err = Some(e);
                break;
            }
            if let Some(block) = head {
                if let Err(e) = self.start_request(id, &mut req, &block) {
                    err = Some(e);
                    break;
                }
            }
            for d in data {
                if let Some(r) = self.client_capsules(id, &mut req, &d, stats) {
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
                    close = Some(match req.decoder.as_mut().map(|d| d.finish()) {
                        Some(Err(_)) => CloseReason::ClientProtocolError,
                        _ => CloseReason::ClientEnd,
                    });
                }
            }
        }
        let flow = match req.state {
            ReqState::Open(f) => Some(f),
            _ => None,
        };
        if let Some(e) = err {
            if let Some(flow) = flow {
                self.events.push_back(Event::FlowEnded {
                    flow,
                    reason: CloseReason::ClientProtocolError,
                });
            }
            match e.scope {
                ErrorScope::Connection => {
                    stats.h3_connection_errors.inc();
                    self.close(now, &e);
                }
                ErrorScope::Stream => {
                    // A malformed request or message is a stream error (RFC 9114 §4.1.2): the
                    // stream is reset with the error's code, the connection goes on.
                    stats.h3_stream_errors.inc();
                    self.abort_stream(id, e.code);
                }
            }
            return;
        }
        match close {
            Some(CloseReason::ClientAbort) => {
                let _ = self
                    .conn
                    .send_stream(id)
                    .reset(varint_of(h3::H3_REQUEST_CANCELLED));
                if let Some(flow) = flow {
                    self.events.push_back(Event::FlowEnded {
                        flow,
                        reason: CloseReason::ClientAbort,
                    });
                }
            }
            Some(CloseReason::ClientProtocolError) => {
                self.abort_stream(id, h3::H3_MESSAGE_ERROR);
                if let Some(flow) = flow {
                    self.events.push_back(Event::FlowEnded {
                        flow,
                        reason: CloseReason::ClientProtocolError,
                    });
                }
            }
            Some(r) => {
                // The client finished its side: end the flow and finish ours promptly.
                if req.state == ReqState::Pending {
                    // The answer is still to come; it goes out, then the stream ends.
                    req.client_fin = true;
                } else {
                    if let Some(flow) = flow {
                        self.events.push_back(Event::FlowEnded { flow, reason: r });
                    }
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

    /// The request's HEADERS arrived: decode and check them against the HTTP/3 message rules;
    /// the worker decides the rest.
    fn start_request(
        &mut self,
        id: StreamId,
        req: &mut Request,
        block: &[u8],
    ) -> Result<(), H3Error> {
        let fields = match qpack::decode_field_section(block, self.cfg.max_field_section_size) {
            Ok(f) => f,
            Err(qpack::QpackError::TooLarge) => {
                req.state = ReqState::Pending;
                self.events.push_back(Event::Request {
                    stream: id,
                    request: Err(Rejection::new(431, None, "request headers too large")),
                });
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
        let proxy_authorization = fields
            .iter()
            .find(|f| f.name == b"proxy-authorization")
            .map(|f| f.value.clone());
        req.state = ReqState::Pending;
        self.events.push_back(Event::Request {
            stream: id,
            request: Ok(OwnedRequest {
                version: VERSION,
                method: head.method,
                protocol: head.protocol,
                scheme: head.scheme,
                authority: head.authority,
                path: head.path,
                capsule_protocol: head.capsule_protocol,
                proxy_authorization,
            }),
        });
        Ok(())
    }

    /// Answers a pending request with a refusal and finishes the stream. False when the
    /// stream is gone (the client reset it meanwhile).
    pub fn respond(&mut self, id: StreamId, r: &Rejection, challenge: &str) -> bool {
        let Some(req) = self.requests.get_mut(&id) else {
            return false;
        };
        if req.state != ReqState::Pending {
            return false;
        }
        let fields = r.header_fields(VERSION, challenge);
        let extra: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let mut block = BytesMut::new();
        request::encode_response(r.status, &extra, &mut block);
        frame::encode_headers_frame(&block, &mut req.out);
        req.fin = true;
        req.state = ReqState::Done;
        let _ = self.conn.recv_stream(id).stop(varint_of(h3::H3_NO_ERROR));
        self.drop_held(id);
        self.flush(id);
        true
    }

    /// Answers a pending request with 200 and starts relaying on `flow`. Datagrams held for
    /// the stream come out as [`Event::Datagram`]s.
    pub fn accept(&mut self, id: StreamId, flow: FlowId) -> Accepted {
        let Some(req) = self.requests.get_mut(&id) else {
            return Accepted::Gone;
        };
        if req.state != ReqState::Pending {
            return Accepted::Gone;
        }
        let mut block = BytesMut::new();
        request::encode_response(200, &[("capsule-protocol", "?1")], &mut block);
        frame::encode_headers_frame(&block, &mut req.out);
        if req.client_fin {
            req.fin = true;
            req.state = ReqState::Done;
            self.drop_held(id);
            self.flush(id);
            return Accepted::EndedByClient;
        }
        req.state = ReqState::Open(flow);
        let mut keep = VecDeque::new();
        for (t, s, d) in self.held.drain(..) {
            if s == id {
                if let Some((context_id, n)) = varint::read(&d) {
                    self.events.push_back(Event::Datagram {
                        flow,
                        context_id,
                        payload: d.slice(n..),
                    });
                }
            } else {
                keep.push_back((t, s, d));
            }
        }
        self.held = keep;
        self.flush(id);
        Accepted::Open
    }

    /// Ends a flow from the relay's side with the stream action its reason calls for: a
    /// failed target resets it with H3_CONNECT_ERROR, a protocol error with H3_MESSAGE_ERROR,
    /// anything else finishes it.
    pub fn end_flow(&mut self, id: StreamId, reason: CloseReason) {
        let Some(req) = self.requests.get_mut(&id) else {
            return;
        };
        req.state = ReqState::Done;
        match reason {
            CloseReason::TargetError => self.abort_stream(id, h3::H3_CONNECT_ERROR),
            CloseReason::ClientProtocolError => self.abort_stream(id, h3::H3_MESSAGE_ERROR),
            _ => {
                req.fin = true;
                let _ = self.conn.recv_stream(id).stop(varint_of(h3::H3_NO_ERROR));
                self.flush(id);
            }
        }
    }

    /// The flows still open on this connection (at its end), leaving none.
    pub fn take_flows(&mut self) -> Vec<FlowId> {
        let mut out = Vec::new();
        for req in self.requests.values_mut() {
            if let ReqState::Open(f) = req.state {
                out.push(f);
                req.state = ReqState::Done;
            }
        }
        out
    }

    /// DATA on a request stream: capsules.
    fn client_capsules(
        &mut self,
        id: StreamId,
        req: &mut Request,
        data: &Bytes,
        stats: &WorkerStats,
    ) -> Option<CloseReason> {
        let ReqState::Open(flow) = req.state else {
            // Capsules before the response: RFC 9298 lets a client send optimistically; with no
            // flow yet they cannot be relayed. Dropped and counted.
            stats.dropped(DropReason::NoFlow);
            return None;
        };
        // The client uses capsules: answer in kind.
        req.capsules = true;
        let max = self.cfg.max_udp_payload;
        let decoder = req
            .decoder
            .get_or_insert_with(|| Box::new(CapsuleDecoder::new(max)));
        let events = &mut self.events;
        let res = decoder.decode(data, |ev| match ev {
            CapsuleEvent::Datagram {
                context_id,
                payload,
            } => events.push_back(Event::Datagram {
                flow,
                context_id,
                payload: share(data, payload),
            }),
            CapsuleEvent::DatagramTooLarge {
                context_id,
                payload_len,
            } => events.push_back(Event::DatagramTooLarge {
                flow,
                context_id,
                len: payload_len,
            }),
            CapsuleEvent::Unknown { .. } => stats.capsules_unknown.inc(),
        });
        if let Err(e) = res {
            debug!(stream = %id, error = %e, "malformed capsule");
            return Some(CloseReason::ClientProtocolError);
        }
        None
    }

    /// QUIC DATAGRAM frames from the client.
    fn recv_datagrams(&mut self, now: Instant, stats: &WorkerStats) {
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
            match self.requests.get(&id).map(|r| r.state) {
                Some(ReqState::Open(flow)) => {
                    let Some((context_id, m)) = varint::read(&payload) else {
                        stats.dropped(DropReason::Malformed);
                        continue;
                    };
                    self.events.push_back(Event::Datagram {
                        flow,
                        context_id,
                        payload: payload.slice(m..),
                    });
                }
                Some(ReqState::Done) => stats.dropped(DropReason::NoFlow),
                _ => self.hold(now, id, payload, stats),
            }
        }
    }

    /// Keeps a datagram that arrived before its request was answered, within bounds.
    fn hold(&mut self, now: Instant, id: StreamId, payload: Bytes, stats: &WorkerStats) {
        let for_stream = self.held.iter().filter(|(_, s, _)| *s == id).count();
        if self.held.len() >= HELD_TOTAL || for_stream >= HELD_PER_STREAM {
            stats.dropped(DropReason::NoFlow);
            return;
        }
        self.held.push_back((now, id, payload));
    }

    fn drop_held(&mut self, id: StreamId) {
        self.held.retain(|(_, s, _)| *s != id);
    }

    fn expire_held(&mut self, now: Instant, stats: &WorkerStats) {
        while let Some((t, _, _)) = self.held.front() {
            if now.saturating_duration_since(*t) < HELD_FOR {
                break;
            }
            self.held.pop_front();
            stats.dropped(DropReason::NoFlow);
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
                .any(|r| matches!(r.state, ReqState::Pending | ReqState::Open(_)))
    }

    /// Closes the connection with H3_NO_ERROR (the end of a drain, or shutdown).
    pub fn close_gracefully(&mut self, now: Instant) {
        if !self.closed {
            self.closed = true;
            self.conn
                .close(now, varint_of(h3::H3_NO_ERROR), Bytes::new());
        }
    }

    /// True once the connection has been closed from this side.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Aborts a request stream both ways (RESET_STREAM and STOP_SENDING) with `code`.
    fn abort_stream(&mut self, id: StreamId, code: u64) {
        let _ = self.conn.send_stream(id).reset(varint_of(code));
        let _ = self.conn.recv_stream(id).stop(varint_of(code));
    }

    /// Sends one target datagram to the client on the flow of stream `id`: a QUIC DATAGRAM
    /// frame, or a capsule on the stream when the client uses capsules (or the connection has
    /// no QUIC datagrams). `Err` with the drop reason when it cannot go now.
    pub fn send_datagram(&mut self, id: StreamId, payload: &[u8]) -> Result<(), DropReason> {
        let use_capsules = match self.requests.get(&id) {
            Some(r) if matches!(r.state, ReqState::Open(_)) => r.capsules,
            _ => return Err(DropReason::NoFlow),
        } || !self.datagrams_ok();
        if use_capsules {
            let limit = self.cfg.client_send_buffer;
            let req = self.requests.get_mut(&id).ok_or(DropReason::NoFlow)?;
            let clen = capsule::datagram_header_len(0, payload.len()) + payload.len();
            let flen = frame::data_frame_header_len(clen as u64) + clen;
            if req.out.len() + flen > limit {
                return Err(DropReason::ClientNotReading);
            }
            frame::encode_frame_header(frame::DATA, clen as u64, &mut req.out);
            capsule::encode_datagram_header(0, payload.len(), &mut req.out);
            req.out.put_slice(payload);
            self.flush(id);
            return Ok(());
        }
        // RFC 9297 §2.1: the quarter stream ID is the request stream ID divided by four.
        let qsid = u64::from(VarInt::from(id)) / 4;
        let len = varint::encoded_len(qsid) + 1 + payload.len();
        if self.conn.datagrams().max_size().is_none_or(|m| len > m) {
            // RFC 9298 §5: too big for a DATAGRAM frame is dropped, not moved into a capsule.
            return Err(DropReason::TooLarge);
        }
        // The one copy of a target datagram on its way to the client: into the worker's
        // arena, which quinn-proto encrypts from.
        let d = crate::relay::arena::take(crate::relay::arena::Use::Tx, len, |b| {
            varint::write(qsid, b);
            varint::write(0, b);
            b.put_slice(payload);
        })
        .freeze();
        match self.conn.datagrams().send(d, false) {
            Ok(()) => Ok(()),
            Err(quinn_proto::SendDatagramError::Blocked(_)) => Err(DropReason::ClientNotReading),
            Err(_) => Err(DropReason::TooLarge),
        }
    }
}

/// The payload as a `Bytes`: a slice of the chunk when it lies inside it (no copy); a copy
/// only for a capsule the decoder had to reassemble across chunks.
pub fn share(chunk: &Bytes, payload: &[u8]) -> Bytes {
    let (c, p) = (chunk.as_ptr() as usize, payload.as_ptr() as usize);
    if p >= c && p + payload.len() <= c + chunk.len() {
        chunk.slice_ref(payload)
    } else {
        Bytes::copy_from_slice(payload)
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
