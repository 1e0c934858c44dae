//! Per-stream state machines of an HTTP/3 server (RFC 9114 §6, RFC 9204 §4.2): what may arrive
//! on each kind of stream the client opens, and in what order.
//!
//! - [`UniStreamHead`] reads the type that opens a client unidirectional stream;
//!   [`PeerUniStreams`] enforces "at most one" per critical type across the connection.
//! - [`ControlStreamReader`]: the client's control stream (SETTINGS first, then GOAWAY and
//!   MAX_PUSH_ID).
//! - [`QpackEncoderStreamReader`] and [`QpackDecoderStreamReader`]: the client's QPACK streams,
//!   checked against our zero-capacity dynamic table.
//! - [`RequestStreamReader`]: a client-initiated bidirectional stream (HEADERS, DATA, trailers).
//!
//! The peer is always a client: the relay is an HTTP/3 server and never pushes.

use super::frame::{
    self, decode_id_payload, FrameEvent, FrameReader, Settings, DEFAULT_MAX_CONTROL_FRAME,
};
use super::qpack::{decode_int, IntError};
use super::{
    H3Error, H3_CLOSED_CRITICAL_STREAM, H3_FRAME_UNEXPECTED, H3_ID_ERROR, H3_MISSING_SETTINGS,
    H3_REQUEST_INCOMPLETE, H3_STREAM_CREATION_ERROR, QPACK_DECODER_STREAM_ERROR,
    QPACK_ENCODER_STREAM_ERROR, STREAM_CONTROL, STREAM_PUSH, STREAM_QPACK_DECODER,
    STREAM_QPACK_ENCODER,
};
use crate::proto::varint;

const fn unexpected(reason: &'static str) -> H3Error {
    H3Error::connection(H3_FRAME_UNEXPECTED, reason)
}

// ---------------------------------------------------------------------------------------------
// Unidirectional stream types
// ---------------------------------------------------------------------------------------------

/// What a client unidirectional stream is, from its first varint (RFC 9114 §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Control,
    Push,
    QpackEncoder,
    QpackDecoder,
    /// An unknown or reserved type. The caller must stop reading it (STOP_SENDING with
    /// H3_STREAM_CREATION_ERROR) or discard its data; it is never a connection error.
    Unknown(u64),
}

impl StreamKind {
    pub fn from_type(ty: u64) -> Self {
        match ty {
            STREAM_CONTROL => StreamKind::Control,
            STREAM_PUSH => StreamKind::Push,
            STREAM_QPACK_ENCODER => StreamKind::QpackEncoder,
            STREAM_QPACK_DECODER => StreamKind::QpackDecoder,
            other => StreamKind::Unknown(other),
        }
    }
}

/// Reads the stream type at the start of a unidirectional stream; it may arrive split.
#[derive(Debug, Clone, Default)]
pub struct UniStreamHead {
    buf: [u8; 8],
    len: usize,
    kind: Option<StreamKind>,
}

impl UniStreamHead {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the stream's next bytes. Once the type is complete, returns it with the number of
    /// bytes of `data` it used; the rest of `data` belongs to the stream body. Afterwards keeps
    /// returning the same kind with 0 bytes used.
    ///
    //= https://www.rfc-editor.org/rfc/rfc9114#section-6.2
    //# A receiver MUST tolerate unidirectional streams being closed or reset
    //# prior to the reception of the unidirectional stream header.
    //
    // So a stream that ends while this returns `None` is simply dropped: there is no `finish`.
    pub fn push(&mut self, data: &[u8]) -> Option<(StreamKind, usize)> {
        if let Some(kind) = self.kind {
            return Some((kind, 0));
        }
        if self.len == 0 {
            if let Some((ty, n)) = varint::read(data) {
                let kind = StreamKind::from_type(ty);
                self.kind = Some(kind);
                return Some((kind, n));
            }
        }
        let first = *self.buf[..self.len].first().or(data.first())?;
        let need = varint::decoded_len(first);
        let take = (need - self.len).min(data.len());
        self.buf[self.len..self.len + take].copy_from_slice(&data[..take]);
        self.len += take;
        let (ty, _) = varint::read(&self.buf[..self.len])?;
        let kind = StreamKind::from_type(ty);
        self.kind = Some(kind);
        Some((kind, take))
    }
}

/// The critical unidirectional streams a client has opened, to refuse duplicates.
#[derive(Debug, Clone, Default)]
pub struct PeerUniStreams {
    control: bool,
    encoder: bool,
    decoder: bool,
}

impl PeerUniStreams {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a new client unidirectional stream of `kind`; an error closes the connection.
    /// `Unknown` kinds are accepted here: the caller ignores them (see [`StreamKind::Unknown`]).
    pub fn accept(&mut self, kind: StreamKind) -> Result<(), H3Error> {
        let seen = match kind {
            //= https://www.rfc-editor.org/rfc/rfc9114#section-6.2.1
            //# Only one control stream per peer is permitted;
            //# receipt of a second stream claiming to be a control stream MUST be
            //# treated as a connection error of type H3_STREAM_CREATION_ERROR.
            StreamKind::Control => &mut self.control,
            //= https://www.rfc-editor.org/rfc/rfc9204#section-4.2
            //# Receipt of a second instance of either stream type MUST be
            //# treated as a connection error of type H3_STREAM_CREATION_ERROR.
            StreamKind::QpackEncoder => &mut self.encoder,
            StreamKind::QpackDecoder => &mut self.decoder,
            //= https://www.rfc-editor.org/rfc/rfc9114#section-6.2.2
            //# Only servers can push; if a server receives a client-initiated push
            //# stream, this MUST be treated as a connection error of type
            //# H3_STREAM_CREATION_ERROR.
            StreamKind::Push => {
                return Err(H3Error::connection(
                    H3_STREAM_CREATION_ERROR,
                    "push stream from a client",
                ))
            }
            StreamKind::Unknown(_) => return Ok(()),
        };
        if std::mem::replace(seen, true) {
            return Err(H3Error::connection(
                H3_STREAM_CREATION_ERROR,
                "second control or QPACK stream",
            ));
        }
        Ok(())
    }
}

//= https://www.rfc-editor.org/rfc/rfc9114#section-6.2.1
//# If either control
//# stream is closed at any point, this MUST be treated as a connection
//# error of type H3_CLOSED_CRITICAL_STREAM.
//
//= https://www.rfc-editor.org/rfc/rfc9204#section-4.2
//# Closure of either unidirectional stream type MUST be treated as a
//# connection error of type H3_CLOSED_CRITICAL_STREAM.
//
// A reset of any of these streams is the same error; the transport raises it with this value.

/// The error for a control or QPACK stream that ends or is reset.
pub const CLOSED_CRITICAL_STREAM: H3Error =
    H3Error::connection(H3_CLOSED_CRITICAL_STREAM, "critical stream closed");

// ---------------------------------------------------------------------------------------------
// Control stream
// ---------------------------------------------------------------------------------------------

/// What the client's control stream said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// The client's SETTINGS (exactly once, first).
    Settings(Settings),
    /// GOAWAY from a client: the push ID from which pushes would be refused. The relay never
    /// pushes, so it only signals that the client is shutting the connection down.
    Goaway(u64),
    /// MAX_PUSH_ID; meaningless to a server that never pushes, but legal.
    MaxPushId(u64),
}

/// The client's control stream, after its type byte.
#[derive(Debug)]
pub struct ControlStreamReader {
    frames: FrameReader,
    settings_seen: bool,
    last_goaway: Option<u64>,
    max_push_id: Option<u64>,
}

impl Default for ControlStreamReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlStreamReader {
    pub fn new() -> Self {
        Self {
            // HEADERS is refused on this stream before its size matters.
            frames: FrameReader::new(0, DEFAULT_MAX_CONTROL_FRAME),
            settings_seen: false,
            last_goaway: None,
            max_push_id: None,
        }
    }

    /// True once the client's SETTINGS have arrived.
    pub fn settings_received(&self) -> bool {
        self.settings_seen
    }

    /// Feeds the next bytes of the stream. Every error closes the connection.
    pub fn push(&mut self, data: &[u8], mut on: impl FnMut(ControlEvent)) -> Result<(), H3Error> {
        let settings_seen = &mut self.settings_seen;
        let last_goaway = &mut self.last_goaway;
        let max_push_id = &mut self.max_push_id;
        self.frames.push(data, &mut |ev| match ev {
            FrameEvent::Start { ty, .. } => {
                if !*settings_seen {
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-6.2.1
                    //# If the first frame of the control stream is any other frame
                    //# type, this MUST be treated as a connection error of type
                    //# H3_MISSING_SETTINGS.
                    //
                    // Unknown and reserved types included: §9 says an unknown frame type does
                    // not satisfy the requirement for a SETTINGS frame first.
                    if ty != frame::SETTINGS {
                        return Err(H3Error::connection(
                            H3_MISSING_SETTINGS,
                            "first frame on the control stream is not SETTINGS",
                        ));
                    }
                    *settings_seen = true;
                    return Ok(());
                }
                match ty {
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.4
                    //# If an endpoint receives a second SETTINGS
                    //# frame on the control stream, the endpoint MUST respond with a
                    //# connection error of type H3_FRAME_UNEXPECTED.
                    frame::SETTINGS => Err(unexpected("second SETTINGS frame")),
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.1
                    //# If
                    //# a DATA frame is received on a control stream, the recipient MUST
                    //# respond with a connection error of type H3_FRAME_UNEXPECTED.
                    frame::DATA => Err(unexpected("DATA on the control stream")),
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.2
                    //# If a HEADERS frame is received on a control stream, the recipient
                    //# MUST respond with a connection error of type H3_FRAME_UNEXPECTED.
                    frame::HEADERS => Err(unexpected("HEADERS on the control stream")),
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.5
                    //# A client MUST NOT send a PUSH_PROMISE frame.  A server MUST treat the
                    //# receipt of a PUSH_PROMISE frame as a connection error of type
                    //# H3_FRAME_UNEXPECTED.
                    frame::PUSH_PROMISE => Err(unexpected("PUSH_PROMISE from a client")),
                    _ => Ok(()),
                }
            }
            FrameEvent::Frame { ty, payload } => match ty {
                frame::SETTINGS => {
                    on(ControlEvent::Settings(Settings::decode(payload)?));
                    Ok(())
                }
                frame::GOAWAY => {
                    let id = decode_id_payload(payload)?;
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-5.2
                    //# Receiving a GOAWAY containing a larger identifier than previously
                    //# received MUST be treated as a connection error of type H3_ID_ERROR.
                    if last_goaway.is_some_and(|prev| id > prev) {
                        return Err(H3Error::connection(H3_ID_ERROR, "GOAWAY ID increased"));
                    }
                    *last_goaway = Some(id);
                    on(ControlEvent::Goaway(id));
                    Ok(())
                }
                frame::MAX_PUSH_ID => {
                    let id = decode_id_payload(payload)?;
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.7
                    //# A MAX_PUSH_ID frame cannot reduce the maximum push
                    //# ID; receipt of a MAX_PUSH_ID frame that contains a smaller value than
                    //# previously received MUST be treated as a connection error of type
                    //# H3_ID_ERROR.
                    if max_push_id.is_some_and(|prev| id < prev) {
                        return Err(H3Error::connection(H3_ID_ERROR, "MAX_PUSH_ID decreased"));
                    }
                    *max_push_id = Some(id);
                    on(ControlEvent::MaxPushId(id));
                    Ok(())
                }
                frame::CANCEL_PUSH => {
                    decode_id_payload(payload)?;
                    //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.3
                    //# If a server receives a CANCEL_PUSH frame for a push
                    //# ID that has not yet been mentioned by a PUSH_PROMISE frame, this MUST
                    //# be treated as a connection error of type H3_ID_ERROR.
                    //
                    // The relay sends no PUSH_PROMISE, so no push ID was ever mentioned.
                    Err(H3Error::connection(
                        H3_ID_ERROR,
                        "CANCEL_PUSH for a push never promised",
                    ))
                }
                // Refused at Start.
                _ => Err(unexpected("frame not allowed on the control stream")),
            },
            // DATA is refused at Start, so no payload reaches here.
            FrameEvent::Data(_) => Err(unexpected("DATA on the control stream")),
        })
    }

    /// The stream ended cleanly: always H3_CLOSED_CRITICAL_STREAM.
    pub fn finish(&mut self) -> Result<(), H3Error> {
        Err(CLOSED_CRITICAL_STREAM)
    }
}

// ---------------------------------------------------------------------------------------------
// QPACK encoder and decoder streams
// ---------------------------------------------------------------------------------------------

/// Longest instruction either QPACK reader ever holds: [`decode_int`] may still need more after
/// a first byte and nine continuation bytes, and always answers once it has a tenth.
const MAX_INSTRUCTION: usize = 11;

/// Holds one instruction split across reads.
#[derive(Debug, Clone, Default)]
struct InstructionBuf {
    buf: [u8; MAX_INSTRUCTION],
    len: usize,
    /// After an error, every later call returns it again.
    poisoned: Option<H3Error>,
}

impl InstructionBuf {
    /// Runs `parse` over whole instructions in `data`, carrying a split one to the next call.
    /// `parse` returns the instruction length, or `None` if it needs more bytes.
    fn feed(
        &mut self,
        data: &[u8],
        parse: impl Fn(&[u8]) -> Result<Option<usize>, H3Error>,
    ) -> Result<(), H3Error> {
        if let Some(err) = &self.poisoned {
            return Err(err.clone());
        }
        let result = self.run(data, parse);
        if let Err(err) = &result {
            self.poisoned = Some(err.clone());
            self.len = 0;
        }
        result
    }

    fn run(
        &mut self,
        mut data: &[u8],
        parse: impl Fn(&[u8]) -> Result<Option<usize>, H3Error>,
    ) -> Result<(), H3Error> {
        while !data.is_empty() {
            if self.len == 0 {
                match parse(data)? {
                    Some(n) => data = &data[n..],
                    None => {
                        debug_assert!(data.len() < MAX_INSTRUCTION);
                        self.buf[..data.len()].copy_from_slice(data);
                        self.len = data.len();
                        return Ok(());
                    }
                }
            } else {
                // One byte at a time: no byte of the next instruction is taken into this one,
                // and parse answers before the buffer fills.
                self.buf[self.len] = data[0];
                self.len += 1;
                data = &data[1..];
                if let Some(n) = parse(&self.buf[..self.len])? {
                    debug_assert_eq!(n, self.len);
                    self.len = 0;
                }
            }
        }
        Ok(())
    }
}

/// Reads an integer inside an instruction: `Ok(None)` if more bytes are needed.
fn instruction_int(buf: &[u8], prefix: u8, err: H3Error) -> Result<Option<(u64, usize)>, H3Error> {
    match decode_int(buf, prefix) {
        Ok(v) => Ok(Some(v)),
        Err(IntError::Incomplete) => Ok(None),
        Err(IntError::Overflow) => Err(err),
    }
}

const fn encoder_stream_error(reason: &'static str) -> H3Error {
    H3Error::connection(QPACK_ENCODER_STREAM_ERROR, reason)
}

const fn decoder_stream_error(reason: &'static str) -> H3Error {
    H3Error::connection(QPACK_DECODER_STREAM_ERROR, reason)
}

/// The client's QPACK encoder stream (RFC 9204 §4.3), after its type byte, for a decoder that
/// advertised SETTINGS_QPACK_MAX_TABLE_CAPACITY = 0.
#[derive(Debug, Clone, Default)]
pub struct QpackEncoderStreamReader {
    pending: InstructionBuf,
}

impl QpackEncoderStreamReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the stream. Every error closes the connection.
    pub fn push(&mut self, data: &[u8]) -> Result<(), H3Error> {
        self.pending.feed(data, |buf| {
            let first = buf[0];
            if first & 0b1110_0000 == 0b0010_0000 {
                // Set Dynamic Table Capacity: 001 Capacity(5+).
                let Some((capacity, n)) = instruction_int(
                    buf,
                    5,
                    encoder_stream_error("dynamic table capacity overflows"),
                )?
                else {
                    return Ok(None);
                };
                //= https://www.rfc-editor.org/rfc/rfc9204#section-4.3.1
                //# The decoder MUST treat a new dynamic table capacity value that
                //# exceeds this limit as a connection error of type
                //# QPACK_ENCODER_STREAM_ERROR.
                //
                // The limit is 0. A capacity of 0 is a no-op, tolerated although §3.2.3 says an
                // encoder facing a zero limit sends no instructions at all.
                if capacity > 0 {
                    return Err(encoder_stream_error(
                        "dynamic table capacity above SETTINGS_QPACK_MAX_TABLE_CAPACITY (0)",
                    ));
                }
                return Ok(Some(n));
            }
            //= https://www.rfc-editor.org/rfc/rfc9204#section-3.2.2
            //# It is an error if the encoder attempts to add an
            //# entry that is larger than the dynamic table capacity; the decoder
            //# MUST treat this as a connection error of type
            //# QPACK_ENCODER_STREAM_ERROR.
            //
            // The capacity is 0, so Insert with Name Reference (1...), Insert with Literal Name
            // (01..) and Duplicate (000.) are all refused by their first byte.
            Err(encoder_stream_error(
                "dynamic table insertion with capacity 0",
            ))
        })
    }

    /// The stream ended cleanly: always H3_CLOSED_CRITICAL_STREAM.
    pub fn finish(&mut self) -> Result<(), H3Error> {
        Err(CLOSED_CRITICAL_STREAM)
    }
}

/// The client's QPACK decoder stream (RFC 9204 §4.4), after its type byte. Our encoder never
/// references the dynamic table, so there is nothing the client can acknowledge.
#[derive(Debug, Clone, Default)]
pub struct QpackDecoderStreamReader {
    pending: InstructionBuf,
}

impl QpackDecoderStreamReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the stream. Every error closes the connection.
    pub fn push(&mut self, data: &[u8]) -> Result<(), H3Error> {
        self.pending.feed(data, |buf| {
            let first = buf[0];
            if first & 0x80 != 0 {
                //= https://www.rfc-editor.org/rfc/rfc9204#section-4.4.1
                //# If an encoder receives a Section Acknowledgment instruction referring
                //# to a stream on which every encoded field section with a non-zero
                //# Required Insert Count has already been acknowledged, this MUST be
                //# treated as a connection error of type QPACK_DECODER_STREAM_ERROR.
                //
                // Every field section we send has a Required Insert Count of 0.
                return Err(decoder_stream_error(
                    "Section Acknowledgment with no dynamic table references",
                ));
            }
            if first & 0x40 != 0 {
                // Stream Cancellation: 01 StreamID(6+). Nothing to release without a dynamic
                // table, but the integer must parse.
                return Ok(
                    instruction_int(buf, 6, decoder_stream_error("stream ID overflows"))?
                        .map(|(_, n)| n),
                );
            }
            //= https://www.rfc-editor.org/rfc/rfc9204#section-4.4.3
            //# An encoder that receives an Increment field equal to zero, or one
            //# that increases the Known Received Count beyond what the encoder has
            //# sent, MUST treat this as a connection error of type
            //# QPACK_DECODER_STREAM_ERROR.
            //
            // We have sent no insertions, so every increment is one or the other.
            Err(decoder_stream_error(
                "Insert Count Increment with no dynamic table",
            ))
        })
    }

    /// The stream ended cleanly: always H3_CLOSED_CRITICAL_STREAM.
    pub fn finish(&mut self) -> Result<(), H3Error> {
        Err(CLOSED_CRITICAL_STREAM)
    }
}

// ---------------------------------------------------------------------------------------------
// Request streams
// ---------------------------------------------------------------------------------------------

/// What a request stream carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEvent<'a> {
    /// The encoded field section of the request's HEADERS frame; decode it with
    /// [`super::qpack::decode_field_section`].
    Headers(&'a [u8]),
    /// A piece of DATA frame payload (for CONNECT-UDP, capsules), in order, never empty.
    Data(&'a [u8]),
    /// The encoded field section of the trailing HEADERS frame.
    Trailers(&'a [u8]),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestState {
    /// Nothing but unknown frames yet.
    AwaitHeaders,
    /// After the header section: DATA, or trailers.
    Body,
    /// After the trailers: only unknown frames.
    Done,
}

/// A client-initiated bidirectional stream: one request (RFC 9114 §4.1).
#[derive(Debug)]
pub struct RequestStreamReader {
    frames: FrameReader,
    state: RequestState,
}

impl RequestStreamReader {
    /// `max_field_section_size` bounds each HEADERS frame payload (the encoded section); the
    /// decoded size is bounded separately by the QPACK decoder.
    pub fn new(max_field_section_size: u64) -> Self {
        Self {
            frames: FrameReader::new(max_field_section_size, DEFAULT_MAX_CONTROL_FRAME),
            state: RequestState::AwaitHeaders,
        }
    }

    /// True once the request's HEADERS frame has been delivered.
    pub fn headers_received(&self) -> bool {
        self.state != RequestState::AwaitHeaders
    }

    /// Feeds the next bytes of the stream, reporting the request's parts in order.
    pub fn push(
        &mut self,
        data: &[u8],
        mut on: impl FnMut(RequestEvent<'_>),
    ) -> Result<(), H3Error> {
        let state = &mut self.state;
        self.frames.push(data, &mut |ev| match ev {
            FrameEvent::Start { ty, .. } => match (ty, *state) {
                //= https://www.rfc-editor.org/rfc/rfc9114#section-4.1
                //# Receipt of an invalid sequence of frames MUST be treated as a
                //# connection error of type H3_FRAME_UNEXPECTED.  In particular, a DATA
                //# frame before any HEADERS frame, or a HEADERS or DATA frame after the
                //# trailing HEADERS frame, is considered invalid.
                (frame::DATA, RequestState::AwaitHeaders) => Err(unexpected("DATA before HEADERS")),
                (frame::DATA | frame::HEADERS, RequestState::Done) => {
                    Err(unexpected("frame after the trailers"))
                }
                (frame::DATA | frame::HEADERS, _) => Ok(()),
                //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.5
                //# A client MUST NOT send a PUSH_PROMISE frame.  A server MUST treat the
                //# receipt of a PUSH_PROMISE frame as a connection error of type
                //# H3_FRAME_UNEXPECTED.
                (frame::PUSH_PROMISE, _) => Err(unexpected("PUSH_PROMISE from a client")),
                // §7.2.3, §7.2.4, §7.2.6, §7.2.7: these are control-stream frames; on any other
                // stream each is a connection error of type H3_FRAME_UNEXPECTED.
                (frame::SETTINGS, _) => Err(unexpected("SETTINGS on a request stream")),
                (frame::GOAWAY, _) => Err(unexpected("GOAWAY on a request stream")),
                (frame::MAX_PUSH_ID, _) => Err(unexpected("MAX_PUSH_ID on a request stream")),
                (frame::CANCEL_PUSH, _) => Err(unexpected("CANCEL_PUSH on a request stream")),
                //= https://www.rfc-editor.org/rfc/rfc9114#section-4.1
                //# Frames of unknown types (Section 9), including reserved frames
                //# (Section 7.2.8) MAY be sent on a request or push stream before,
                //# after, or interleaved with other frames described in this section.
                _ => Ok(()),
            },
            FrameEvent::Frame {
                ty: frame::HEADERS,
                payload,
            } => {
                match *state {
                    RequestState::AwaitHeaders => {
                        *state = RequestState::Body;
                        on(RequestEvent::Headers(payload));
                    }
                    RequestState::Body => {
                        *state = RequestState::Done;
                        on(RequestEvent::Trailers(payload));
                    }
                    // Refused at Start.
                    RequestState::Done => return Err(unexpected("frame after the trailers")),
                }
                Ok(())
            }
            // Every other buffered type was refused at Start.
            FrameEvent::Frame { .. } => Err(unexpected("frame not allowed on a request stream")),
            FrameEvent::Data(chunk) => {
                on(RequestEvent::Data(chunk));
                Ok(())
            }
        })
    }

    /// The client ended its side of the stream (FIN).
    pub fn finish(&mut self) -> Result<(), H3Error> {
        self.frames.finish()?;
        //= https://www.rfc-editor.org/rfc/rfc9114#section-4.1
        //# If a client-initiated
        //# stream terminates without enough of the HTTP message to provide a
        //# complete response, the server SHOULD abort its response stream with
        //# the error code H3_REQUEST_INCOMPLETE.
        if self.state == RequestState::AwaitHeaders {
            return Err(H3Error::stream(
                H3_REQUEST_INCOMPLETE,
                "request stream ended before HEADERS",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::h3::frame::{encode_frame_header, encode_goaway, encode_settings};
    use crate::proto::h3::{
        grease_value, ErrorScope, H3_EXCESSIVE_LOAD, H3_FRAME_ERROR, H3_SETTINGS_ERROR,
    };
    use proptest::prelude::*;

    fn frame(ty: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame_header(ty, payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn settings_frame() -> Vec<u8> {
        let mut out = Vec::new();
        encode_settings(
            &Settings {
                h3_datagram: true,
                enable_connect_protocol: true,
                grease: true,
                ..Settings::default()
            },
            &mut out,
        );
        out
    }

    fn control(chunks: &[&[u8]]) -> (Vec<ControlEvent>, Result<(), H3Error>) {
        let mut r = ControlStreamReader::new();
        let mut events = Vec::new();
        for c in chunks {
            if let Err(e) = r.push(c, |ev| events.push(ev)) {
                return (events, Err(e));
            }
        }
        (events, Ok(()))
    }

    fn code(result: Result<(), H3Error>) -> (u64, ErrorScope) {
        let e = result.unwrap_err();
        (e.code, e.scope)
    }

    const CONN: ErrorScope = ErrorScope::Connection;

    #[test]
    fn uni_stream_head() {
        let mut h = UniStreamHead::new();
        assert_eq!(h.push(&[0x00, 0x04]), Some((StreamKind::Control, 1)));
        assert_eq!(h.push(&[0x99]), Some((StreamKind::Control, 0)));
        // A two-byte type split across reads: 0x4021 = grease 0x21 non-minimally encoded.
        let mut h = UniStreamHead::new();
        assert_eq!(h.push(&[]), None);
        assert_eq!(h.push(&[0x40]), None);
        assert_eq!(h.push(&[0x21, 0xaa]), Some((StreamKind::Unknown(0x21), 1)));
        // An eight-byte type one byte at a time.
        let mut bytes = Vec::new();
        varint::write(grease_value(1 << 40), &mut bytes);
        let mut h = UniStreamHead::new();
        for b in &bytes[..7] {
            assert_eq!(h.push(std::slice::from_ref(b)), None);
        }
        assert_eq!(
            h.push(&[bytes[7], 0, 0]),
            Some((StreamKind::Unknown(grease_value(1 << 40)), 1))
        );
        for (ty, kind) in [
            (1, StreamKind::Push),
            (2, StreamKind::QpackEncoder),
            (3, StreamKind::QpackDecoder),
        ] {
            assert_eq!(UniStreamHead::new().push(&[ty]), Some((kind, 1)));
        }
    }

    #[test]
    fn peer_uni_streams() {
        let mut p = PeerUniStreams::new();
        p.accept(StreamKind::Control).unwrap();
        p.accept(StreamKind::QpackEncoder).unwrap();
        p.accept(StreamKind::QpackDecoder).unwrap();
        p.accept(StreamKind::Unknown(0x21)).unwrap();
        p.accept(StreamKind::Unknown(0x21)).unwrap();
        for kind in [
            StreamKind::Control,
            StreamKind::QpackEncoder,
            StreamKind::QpackDecoder,
            StreamKind::Push,
        ] {
            assert_eq!(
                code(p.accept(kind)),
                (H3_STREAM_CREATION_ERROR, CONN),
                "{kind:?}"
            );
        }
        assert_eq!(
            code(PeerUniStreams::new().accept(StreamKind::Push)),
            (H3_STREAM_CREATION_ERROR, CONN)
        );
    }

    #[test]
    fn control_stream_happy_path() {
        let mut bytes = settings_frame();
        bytes.extend(frame(0x21, b"grease"));
        bytes.extend(frame(frame::MAX_PUSH_ID, &[0x05]));
        bytes.extend(frame(frame::MAX_PUSH_ID, &[0x05]));
        let mut goaway = Vec::new();
        encode_goaway(10, &mut goaway);
        encode_goaway(10, &mut goaway);
        encode_goaway(3, &mut goaway);
        bytes.extend(goaway);
        let whole = control(&[&bytes]);
        let split = control(&bytes.chunks(1).collect::<Vec<_>>());
        assert_eq!(whole, split);
        let (events, result) = whole;
        result.unwrap();
        assert_eq!(
            events,
            [
                ControlEvent::Settings(Settings {
                    h3_datagram: true,
                    enable_connect_protocol: true,
                    ..Settings::default()
                }),
                ControlEvent::MaxPushId(5),
                ControlEvent::MaxPushId(5),
                ControlEvent::Goaway(10),
                ControlEvent::Goaway(10),
                ControlEvent::Goaway(3),
            ]
        );
        let mut r = ControlStreamReader::new();
        assert!(!r.settings_received());
        r.push(&settings_frame(), |_| {}).unwrap();
        assert!(r.settings_received());
        assert_eq!(code(r.finish()), (H3_CLOSED_CRITICAL_STREAM, CONN));
        assert_eq!(
            code(ControlStreamReader::new().finish()),
            (H3_CLOSED_CRITICAL_STREAM, CONN)
        );
    }

    #[test]
    fn control_stream_errors() {
        let s = settings_frame();
        let after = |f: Vec<u8>| [s.clone(), f].concat();
        let cases: Vec<(Vec<u8>, u64)> = vec![
            (frame(0x21, b""), H3_MISSING_SETTINGS),
            (frame(frame::GOAWAY, &[0]), H3_MISSING_SETTINGS),
            (frame(frame::DATA, b""), H3_MISSING_SETTINGS),
            (after(s.clone()), H3_FRAME_UNEXPECTED),
            (after(frame(frame::DATA, b"x")), H3_FRAME_UNEXPECTED),
            (after(frame(frame::HEADERS, b"x")), H3_FRAME_UNEXPECTED),
            (after(frame(frame::PUSH_PROMISE, b"x")), H3_FRAME_UNEXPECTED),
            (after(frame(0x06, b"")), H3_FRAME_UNEXPECTED),
            (after(frame(frame::CANCEL_PUSH, &[0])), H3_ID_ERROR),
            (after(frame(frame::GOAWAY, &[0, 0])), H3_FRAME_ERROR),
            (after(frame(frame::GOAWAY, &[])), H3_FRAME_ERROR),
            (
                after([frame(frame::GOAWAY, &[4]), frame(frame::GOAWAY, &[8])].concat()),
                H3_ID_ERROR,
            ),
            (
                after(
                    [
                        frame(frame::MAX_PUSH_ID, &[4]),
                        frame(frame::MAX_PUSH_ID, &[3]),
                    ]
                    .concat(),
                ),
                H3_ID_ERROR,
            ),
            (frame(frame::SETTINGS, &[0x33, 0x02]), H3_SETTINGS_ERROR),
        ];
        for (bytes, expected) in cases {
            let (_, result) = control(&[&bytes]);
            assert_eq!(code(result), (expected, CONN), "{bytes:02x?}");
        }
    }

    #[test]
    fn encoder_stream() {
        let mut r = QpackEncoderStreamReader::new();
        // Set Dynamic Table Capacity 0, twice: harmless.
        r.push(&[0x20, 0x20]).unwrap();
        // A capacity split across reads: 31 + 97 = 128, refused once complete.
        r.push(&[0x3f]).unwrap();
        r.push(&[0xe1]).unwrap();
        assert_eq!(code(r.push(&[0x00])), (QPACK_ENCODER_STREAM_ERROR, CONN));
        // Zero-valued continuation bytes, one at a time, up to the longest legal encoding.
        let mut r = QpackEncoderStreamReader::new();
        r.push(&[0x3f]).unwrap();
        for _ in 0..9 {
            r.push(&[0x80]).unwrap();
        }
        assert_eq!(code(r.push(&[0x80])), (QPACK_ENCODER_STREAM_ERROR, CONN));
        // RFC 9204 Appendix B.2: Set Dynamic Table Capacity=220, then inserts.
        for bytes in [
            &[0x3f, 0xbd, 0x01][..],
            &[0xc0, 0x0f],
            &[0x4a, 0x63],
            &[0x02],
            &[0x21],
        ] {
            assert_eq!(
                code(QpackEncoderStreamReader::new().push(bytes)),
                (QPACK_ENCODER_STREAM_ERROR, CONN),
                "{bytes:02x?}"
            );
        }
        // Split: the first byte alone says "insert", so the error is immediate.
        assert_eq!(
            code(QpackEncoderStreamReader::new().push(&[0x80])),
            (QPACK_ENCODER_STREAM_ERROR, CONN)
        );
        // An overflowing capacity.
        let mut huge = vec![0x3f];
        huge.extend([0xff; 10]);
        assert_eq!(
            code(QpackEncoderStreamReader::new().push(&huge)),
            (QPACK_ENCODER_STREAM_ERROR, CONN)
        );
        assert_eq!(
            code(QpackEncoderStreamReader::new().finish()),
            (H3_CLOSED_CRITICAL_STREAM, CONN)
        );
    }

    #[test]
    fn decoder_stream() {
        let mut r = QpackDecoderStreamReader::new();
        // RFC 9204 Appendix B.4: Stream Cancellation (stream 8).
        r.push(&[0x48]).unwrap();
        // A long stream ID split: 0x7f then continuation bytes.
        r.push(&[0x7f, 0x80]).unwrap();
        r.push(&[0x01]).unwrap();
        r.push(&[0x40, 0x41]).unwrap();
        // RFC 9204 Appendix B.2 / B.3: Section Acknowledgment (84) and Insert Count
        // Increment (01) acknowledge things we never sent.
        for bytes in [&[0x84][..], &[0x01], &[0x00], &[0xff, 0xff]] {
            assert_eq!(
                code(QpackDecoderStreamReader::new().push(bytes)),
                (QPACK_DECODER_STREAM_ERROR, CONN),
                "{bytes:02x?}"
            );
        }
        let mut huge = vec![0x7f];
        huge.extend([0xff; 10]);
        assert_eq!(
            code(QpackDecoderStreamReader::new().push(&huge)),
            (QPACK_DECODER_STREAM_ERROR, CONN)
        );
        assert_eq!(
            code(QpackDecoderStreamReader::new().finish()),
            (H3_CLOSED_CRITICAL_STREAM, CONN)
        );
    }

    #[test]
    fn qpack_readers_stay_failed() {
        let mut e = QpackEncoderStreamReader::new();
        let err = e
            .push(&[0x3f, 0x80])
            .and_then(|()| e.push(&[0x01]))
            .unwrap_err();
        assert_eq!(e.push(&[0x20]).unwrap_err(), err);
        let mut d = QpackDecoderStreamReader::new();
        let err = d.push(&[0x48, 0x01]).unwrap_err();
        assert_eq!(d.push(&[0x48]).unwrap_err(), err);
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Req {
        Headers(Vec<u8>),
        Data(Vec<u8>),
        Trailers(Vec<u8>),
    }

    fn request(r: &mut RequestStreamReader, chunks: &[&[u8]]) -> (Vec<Req>, Result<(), H3Error>) {
        let mut events: Vec<Req> = Vec::new();
        for c in chunks {
            let result = r.push(c, |ev| match ev {
                RequestEvent::Headers(h) => events.push(Req::Headers(h.to_vec())),
                RequestEvent::Trailers(h) => events.push(Req::Trailers(h.to_vec())),
                RequestEvent::Data(d) => {
                    assert!(!d.is_empty());
                    match events.last_mut() {
                        Some(Req::Data(acc)) => acc.extend_from_slice(d),
                        _ => events.push(Req::Data(d.to_vec())),
                    }
                }
            });
            if let Err(e) = result {
                return (events, Err(e));
            }
        }
        (events, r.finish())
    }

    #[test]
    fn request_stream_happy_path() {
        let bytes = [
            frame(0x21, b"grease first"),
            frame(frame::HEADERS, b"head"),
            frame(frame::DATA, b"cap"),
            frame(0x40, b""),
            frame(frame::DATA, b"sules"),
            frame(frame::DATA, b""),
            frame(frame::HEADERS, b"trailers"),
            frame(0x5f, b"grease last"),
        ]
        .concat();
        let mut r = RequestStreamReader::new(100);
        let (events, result) = request(&mut r, &[&bytes]);
        result.unwrap();
        assert!(r.headers_received());
        assert_eq!(
            events,
            [
                Req::Headers(b"head".to_vec()),
                Req::Data(b"capsules".to_vec()),
                Req::Trailers(b"trailers".to_vec()),
            ]
        );
        let (split, result) = request(
            &mut RequestStreamReader::new(100),
            &bytes.chunks(3).collect::<Vec<_>>(),
        );
        result.unwrap();
        assert_eq!(split, events);
    }

    #[test]
    fn request_stream_errors() {
        let h = frame(frame::HEADERS, b"h");
        let cases: Vec<(Vec<u8>, u64, ErrorScope)> = vec![
            (frame(frame::DATA, b"x"), H3_FRAME_UNEXPECTED, CONN),
            (frame(frame::DATA, b""), H3_FRAME_UNEXPECTED, CONN),
            (
                [h.clone(), h.clone(), frame(frame::DATA, b"")].concat(),
                H3_FRAME_UNEXPECTED,
                CONN,
            ),
            (
                [h.clone(), h.clone(), h.clone()].concat(),
                H3_FRAME_UNEXPECTED,
                CONN,
            ),
            (
                [h.clone(), settings_frame()].concat(),
                H3_FRAME_UNEXPECTED,
                CONN,
            ),
            (frame(frame::GOAWAY, &[0]), H3_FRAME_UNEXPECTED, CONN),
            (frame(frame::MAX_PUSH_ID, &[0]), H3_FRAME_UNEXPECTED, CONN),
            (frame(frame::CANCEL_PUSH, &[0]), H3_FRAME_UNEXPECTED, CONN),
            (frame(frame::PUSH_PROMISE, &[0]), H3_FRAME_UNEXPECTED, CONN),
            (frame(0x08, b""), H3_FRAME_UNEXPECTED, CONN),
            (
                frame(frame::HEADERS, &[0; 11]),
                H3_EXCESSIVE_LOAD,
                ErrorScope::Stream,
            ),
            (Vec::new(), H3_REQUEST_INCOMPLETE, ErrorScope::Stream),
            (
                frame(0x21, b"only grease"),
                H3_REQUEST_INCOMPLETE,
                ErrorScope::Stream,
            ),
            (h[..2].to_vec(), H3_FRAME_ERROR, CONN),
            (
                [h.clone(), vec![0x00, 0x05, 1]].concat(),
                H3_FRAME_ERROR,
                CONN,
            ),
        ];
        for (bytes, expected, scope) in cases {
            let (_, result) = request(&mut RequestStreamReader::new(10), &[&bytes]);
            assert_eq!(code(result), (expected, scope), "{bytes:02x?}");
        }
    }

    proptest! {
        #[test]
        fn request_stream_any_split(
            head in proptest::collection::vec(any::<u8>(), 0..50),
            body in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 0..8),
            trailers in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
            split in 1usize..20,
        ) {
            let mut bytes = frame(frame::HEADERS, &head);
            for (i, d) in body.iter().enumerate() {
                bytes.extend(frame(frame::DATA, d));
                bytes.extend(frame(grease_value(i as u64), &d[..d.len().min(3)]));
            }
            if let Some(t) = &trailers {
                bytes.extend(frame(frame::HEADERS, t));
            }
            let (events, result) =
                request(&mut RequestStreamReader::new(64), &bytes.chunks(split).collect::<Vec<_>>());
            result.unwrap();
            let mut expected = vec![Req::Headers(head)];
            let data: Vec<u8> = body.concat();
            if !data.is_empty() {
                expected.push(Req::Data(data));
            }
            if let Some(t) = trailers {
                expected.push(Req::Trailers(t));
            }
            prop_assert_eq!(events, expected);
        }

        #[test]
        fn readers_never_panic_on_random_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            split in 1usize..20,
        ) {
            let mut c = ControlStreamReader::new();
            let mut e = QpackEncoderStreamReader::new();
            let mut d = QpackDecoderStreamReader::new();
            let mut r = RequestStreamReader::new(64);
            let mut h = UniStreamHead::new();
            for chunk in bytes.chunks(split) {
                let _ = c.push(chunk, |_| {});
                let _ = e.push(chunk);
                let _ = d.push(chunk);
                let _ = r.push(chunk, |_| {});
                let _ = h.push(chunk);
            }
            let _ = r.finish();
        }

        #[test]
        fn decoder_stream_cancellations_any_split(
            ids in proptest::collection::vec(0..=varint::MAX, 0..20),
            split in 1usize..12,
        ) {
            let mut bytes = Vec::new();
            for id in ids {
                crate::proto::h3::qpack::encode_int(id, 6, 0x40, &mut bytes);
            }
            let mut r = QpackDecoderStreamReader::new();
            for chunk in bytes.chunks(split) {
                r.push(chunk).unwrap();
            }
            prop_assert_eq!(r.pending.len, 0);
        }
    }
}
