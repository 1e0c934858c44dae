//! HTTP/3 frames (RFC 9114 §7): encoders for the frames the relay sends, the SETTINGS codec, and
//! [`FrameReader`], the incremental reader every stream state machine is built on.
//!
//! The reader is made for hostile peers and the data path:
//! - DATA payloads are never buffered: each input chunk is handed on as a slice of the caller's
//!   buffer, so a DATA frame of any declared length costs nothing but the bytes that arrive;
//! - other known frames are reassembled only up to a limit fixed at construction, and a frame
//!   that lies wholly inside one input chunk is delivered without a copy;
//! - unknown and reserved frame types are skipped by counting bytes (RFC 9114 §9).
//!
//! ```text
//!   input chunks:  |--- chunk 1 ---|------ chunk 2 ------|-- chunk 3 --|
//!   frames:        [T L | DATA payload......][T L | HEADERS payload..]
//!   events:        Start  Data(..) Data(..)  Start   Frame{HEADERS, whole payload}
//!                         (slices of chunks)          (copied only because it was split)
//! ```

use bytes::BufMut;

use super::{
    grease_value, H3Error, H3_EXCESSIVE_LOAD, H3_FRAME_ERROR, H3_FRAME_UNEXPECTED,
    H3_SETTINGS_ERROR, SETTINGS_ENABLE_CONNECT_PROTOCOL, SETTINGS_H3_DATAGRAM,
    SETTINGS_MAX_FIELD_SECTION_SIZE, SETTINGS_QPACK_BLOCKED_STREAMS,
    SETTINGS_QPACK_MAX_TABLE_CAPACITY,
};
use crate::proto::varint;

/// DATA (RFC 9114 §7.2.1).
pub const DATA: u64 = 0x00;
/// HEADERS (RFC 9114 §7.2.2).
pub const HEADERS: u64 = 0x01;
/// CANCEL_PUSH (RFC 9114 §7.2.3).
pub const CANCEL_PUSH: u64 = 0x03;
/// SETTINGS (RFC 9114 §7.2.4).
pub const SETTINGS: u64 = 0x04;
/// PUSH_PROMISE (RFC 9114 §7.2.5).
pub const PUSH_PROMISE: u64 = 0x05;
/// GOAWAY (RFC 9114 §7.2.6).
pub const GOAWAY: u64 = 0x07;
/// MAX_PUSH_ID (RFC 9114 §7.2.7).
pub const MAX_PUSH_ID: u64 = 0x0d;

/// Default reassembly limit for frames other than HEADERS: SETTINGS and PUSH_PROMISE. Real
/// SETTINGS frames are tens of bytes; this leaves room for generous grease.
pub const DEFAULT_MAX_CONTROL_FRAME: u64 = 16 * 1024;

/// Longest frame header: two 8-byte varints.
const MAX_HEADER_LEN: usize = 16;

/// Frame types HTTP/2 used that have no HTTP/3 counterpart: PRIORITY, PING, WINDOW_UPDATE,
/// CONTINUATION (RFC 9114 §11.2.1).
fn is_http2_only(ty: u64) -> bool {
    matches!(ty, 0x02 | 0x06 | 0x08 | 0x09)
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Writes a frame header: Type, then Length.
///
/// # Panics
/// If `ty` or `len` exceeds [`varint::MAX`].
pub fn encode_frame_header(ty: u64, len: u64, out: &mut impl BufMut) {
    varint::write(ty, out);
    varint::write(len, out);
}

/// Length of the header [`encode_frame_header`] writes.
pub fn frame_header_len(ty: u64, len: u64) -> usize {
    varint::encoded_len(ty) + varint::encoded_len(len)
}

/// Writes the header of a DATA frame whose payload of `len` bytes the caller places itself (so
/// capsules can be written straight into the stream's send buffer).
pub fn encode_data_frame_header(len: u64, out: &mut impl BufMut) {
    encode_frame_header(DATA, len, out);
}

/// Length of the DATA frame header for a payload of `len` bytes.
pub fn data_frame_header_len(len: u64) -> usize {
    frame_header_len(DATA, len)
}

/// Writes a whole HEADERS frame around an encoded field section (see
/// [`super::qpack::encode_field_section`]).
pub fn encode_headers_frame(field_section: &[u8], out: &mut impl BufMut) {
    encode_frame_header(HEADERS, field_section.len() as u64, out);
    out.put_slice(field_section);
}

/// Writes a GOAWAY frame. A server sends a client-initiated bidirectional stream ID (a multiple
/// of 4): requests on that stream and above will not be processed (RFC 9114 §5.2).
///
/// # Panics
/// If `id` exceeds [`varint::MAX`].
pub fn encode_goaway(id: u64, out: &mut impl BufMut) {
    encode_frame_header(GOAWAY, varint::encoded_len(id) as u64, out);
    varint::write(id, out);
}

/// HTTP/3 settings (RFC 9114 §7.2.4.1, RFC 9204 §5, RFC 9220 §3, RFC 9297 §2.1.1). `Default`
/// is every setting's default value, which is what applies until the peer's SETTINGS arrive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// SETTINGS_QPACK_MAX_TABLE_CAPACITY; the relay sends 0.
    pub qpack_max_table_capacity: u64,
    /// SETTINGS_QPACK_BLOCKED_STREAMS; the relay sends 0.
    pub qpack_blocked_streams: u64,
    /// SETTINGS_MAX_FIELD_SECTION_SIZE; `None` is the default, unlimited.
    pub max_field_section_size: Option<u64>,
    /// SETTINGS_ENABLE_CONNECT_PROTOCOL = 1 (extended CONNECT, RFC 9220).
    pub enable_connect_protocol: bool,
    /// SETTINGS_H3_DATAGRAM = 1 (RFC 9297).
    pub h3_datagram: bool,
    /// Encode only: add one reserved setting (RFC 9114 §7.2.4.1: "Endpoints SHOULD include at
    /// least one such setting in their SETTINGS frame"). Its identifier comes from the seed given
    /// to [`encode_settings_seeded`]. Always `false` after [`Settings::decode`].
    pub grease: bool,
}

/// Seed for the reserved setting of [`encode_settings`]: fixed, so the frame is reproducible.
const DEFAULT_GREASE_SEED: u64 = 0x6d61_7371_7565;

/// Writes a whole SETTINGS frame; the reserved setting (if `grease`) is the same every time.
pub fn encode_settings(settings: &Settings, out: &mut impl BufMut) {
    encode_settings_seeded(settings, DEFAULT_GREASE_SEED, out);
}

/// Writes a whole SETTINGS frame whose reserved setting (if `grease`) is chosen by `seed`, for a
/// caller that wants it to vary between connections, as grease should.
///
/// QPACK settings are written even when 0 so a peer (and a packet capture) sees the relay's
/// stance explicitly; booleans only when true, since absent means 0.
pub fn encode_settings_seeded(settings: &Settings, seed: u64, out: &mut impl BufMut) {
    let mut pairs: Vec<(u64, u64)> = vec![
        (
            SETTINGS_QPACK_MAX_TABLE_CAPACITY,
            settings.qpack_max_table_capacity,
        ),
        (
            SETTINGS_QPACK_BLOCKED_STREAMS,
            settings.qpack_blocked_streams,
        ),
    ];
    if let Some(size) = settings.max_field_section_size {
        pairs.push((SETTINGS_MAX_FIELD_SECTION_SIZE, size));
    }
    if settings.enable_connect_protocol {
        pairs.push((SETTINGS_ENABLE_CONNECT_PROTOCOL, 1));
    }
    if settings.h3_datagram {
        pairs.push((SETTINGS_H3_DATAGRAM, 1));
    }
    if settings.grease {
        // Any value will do; derive a small one so the frame stays short.
        pairs.push((grease_value(seed), seed.rotate_left(23) & 0x3fff));
    }
    let len: usize = pairs
        .iter()
        .map(|&(id, v)| varint::encoded_len(id) + varint::encoded_len(v))
        .sum();
    encode_frame_header(SETTINGS, len as u64, out);
    for (id, v) in pairs {
        varint::write(id, out);
        varint::write(v, out);
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding payloads
// ---------------------------------------------------------------------------------------------

//= https://www.rfc-editor.org/rfc/rfc9114#section-7.1
//# Each frame's payload MUST contain exactly the fields identified in
//# its description.  A frame payload that contains additional bytes
//# after the identified fields or a frame payload that terminates before
//# the end of the identified fields MUST be treated as a connection
//# error of type H3_FRAME_ERROR.
const fn frame_error(reason: &'static str) -> H3Error {
    H3Error::connection(H3_FRAME_ERROR, reason)
}

const fn settings_error(reason: &'static str) -> H3Error {
    H3Error::connection(H3_SETTINGS_ERROR, reason)
}

/// Parses the payload of GOAWAY, MAX_PUSH_ID or CANCEL_PUSH: exactly one varint.
pub fn decode_id_payload(payload: &[u8]) -> Result<u64, H3Error> {
    match varint::read(payload) {
        Some((id, n)) if n == payload.len() => Ok(id),
        Some(_) => Err(frame_error("bytes after the ID in a frame payload")),
        None => Err(frame_error("truncated ID in a frame payload")),
    }
}

impl Settings {
    /// Parses a SETTINGS payload (without the frame header).
    pub fn decode(payload: &[u8]) -> Result<Settings, H3Error> {
        let mut settings = Settings::default();
        let mut ids = Vec::new();
        let mut rest = payload;
        while !rest.is_empty() {
            let (id, n) = varint::read(rest).ok_or(frame_error("truncated setting identifier"))?;
            rest = &rest[n..];
            let (value, n) = varint::read(rest).ok_or(frame_error("truncated setting value"))?;
            rest = &rest[n..];
            ids.push(id);
            match id {
                SETTINGS_QPACK_MAX_TABLE_CAPACITY => settings.qpack_max_table_capacity = value,
                SETTINGS_QPACK_BLOCKED_STREAMS => settings.qpack_blocked_streams = value,
                SETTINGS_MAX_FIELD_SECTION_SIZE => settings.max_field_section_size = Some(value),
                //= https://www.rfc-editor.org/rfc/rfc9297#section-2.1.1
                //# If the SETTINGS_H3_DATAGRAM setting is received with a value that is
                //# neither 0 nor 1, the receiver MUST terminate the connection with error
                //# H3_SETTINGS_ERROR.
                SETTINGS_H3_DATAGRAM => {
                    settings.h3_datagram = bool_setting(value)
                        .ok_or(settings_error("SETTINGS_H3_DATAGRAM is neither 0 nor 1"))?;
                }
                // RFC 8441 §3 allows only 0 and 1; RFC 9220 §3 uses the same setting in HTTP/3,
                // where an invalid SETTINGS value is an H3_SETTINGS_ERROR.
                SETTINGS_ENABLE_CONNECT_PROTOCOL => {
                    settings.enable_connect_protocol = bool_setting(value).ok_or(
                        settings_error("SETTINGS_ENABLE_CONNECT_PROTOCOL is neither 0 nor 1"),
                    )?;
                }
                //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.4.1
                //# Setting identifiers that were defined in [HTTP/2] where there is no
                //# corresponding HTTP/3 setting have also been reserved
                //# (Section 11.2.2).  These reserved settings MUST NOT be sent, and
                //# their receipt MUST be treated as a connection error of type
                //# H3_SETTINGS_ERROR.
                //
                // §11.2.2 lists 0x00 and 0x02..=0x05 as reserved.
                0x00 | 0x02..=0x05 => return Err(settings_error("HTTP/2-only setting")),
                //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.4
                //# An implementation MUST ignore any parameter with an identifier it
                //# does not understand.
                _ => {}
            }
        }
        //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.4
        //# The same setting identifier MUST NOT occur more than once in the
        //# SETTINGS frame.  A receiver MAY treat the presence of duplicate
        //# setting identifiers as a connection error of type H3_SETTINGS_ERROR.
        //
        // Checked over all identifiers, known or not; sorting keeps a frame full of grease
        // O(n log n).
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(settings_error("duplicate setting identifier"));
        }
        Ok(settings)
    }
}

fn bool_setting(value: u64) -> Option<bool> {
    match value {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The incremental reader
// ---------------------------------------------------------------------------------------------

/// What [`FrameReader`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameEvent<'a> {
    /// A frame header, for every frame including DATA and skipped unknown types. Stream state
    /// machines reject unexpected types here, before any payload is read or buffered.
    Start { ty: u64, len: u64 },
    /// A piece of a DATA frame's payload, in order; empty pieces are never reported. Borrows
    /// the caller's input.
    Data(&'a [u8]),
    /// The whole payload of a HEADERS, SETTINGS, GOAWAY, MAX_PUSH_ID, CANCEL_PUSH or
    /// PUSH_PROMISE frame. Borrows the input when the frame sat in one chunk, else the reader's
    /// reassembly buffer.
    Frame { ty: u64, payload: &'a [u8] },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames, or inside a header whose first `hdr_len` bytes are in `hdr`.
    Header,
    /// Passing `remaining` more DATA payload bytes through.
    Data { remaining: u64 },
    /// Collecting the `len`-byte payload of a known frame.
    Buffer { ty: u64, len: usize },
    /// Discarding `remaining` more bytes of an unknown frame.
    Skip { remaining: u64 },
}

/// Result of parsing a prefix of the stream as a frame header.
enum Parsed {
    /// At least `need` bytes (at most [`MAX_HEADER_LEN`]) are required.
    Incomplete {
        need: usize,
    },
    Complete {
        ty: u64,
        len: u64,
        hdr_len: usize,
    },
}

fn parse_header(b: &[u8]) -> Parsed {
    let Some(&first) = b.first() else {
        return Parsed::Incomplete { need: 1 };
    };
    let Some((ty, ty_len)) = varint::read(b) else {
        return Parsed::Incomplete {
            need: varint::decoded_len(first),
        };
    };
    let Some(&first) = b.get(ty_len) else {
        return Parsed::Incomplete { need: ty_len + 1 };
    };
    let Some((len, len_len)) = varint::read(&b[ty_len..]) else {
        return Parsed::Incomplete {
            need: ty_len + varint::decoded_len(first),
        };
    };
    Parsed::Complete {
        ty,
        len,
        hdr_len: ty_len + len_len,
    }
}

/// Incremental HTTP/3 frame reader for one stream. Feed it bytes with [`push`] in whatever
/// chunks they arrive, and call [`finish`] at a clean end of stream.
///
/// The callback may return an error (a frame not allowed on this stream, say); the reader then
/// stops, and it and every later call return that error.
///
/// [`push`]: FrameReader::push
/// [`finish`]: FrameReader::finish
pub struct FrameReader {
    /// The limits, saturated to 4 GiB (more than any buffer a relay grants).
    max_headers: u32,
    max_other: u32,
    state: State,
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: usize,
    /// A split known frame; never larger than its limit.
    buf: Vec<u8>,
    /// Boxed: a reader lives as long as its stream (there is one per request, and a flow's
    /// request stream stays open), an error is rare.
    poisoned: Option<Box<H3Error>>,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payload bytes are not printed: they can be large, and are user data.
        f.debug_struct("FrameReader")
            .field("max_headers", &self.max_headers)
            .field("max_other", &self.max_other)
            .field("state", &self.state)
            .field("buffered", &self.buffered())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

/// Above this, the reassembly buffer is released after use rather than kept for the next frame.
const KEEP_BUFFER: usize = 4096;

impl FrameReader {
    /// `max_headers`: largest HEADERS payload (encoded field section) reassembled; larger is a
    /// stream error H3_EXCESSIVE_LOAD. `max_other`: the same for SETTINGS and PUSH_PROMISE
    /// (connection error H3_EXCESSIVE_LOAD). GOAWAY, MAX_PUSH_ID and CANCEL_PUSH longer than one
    /// varint (8 bytes) are malformed: H3_FRAME_ERROR.
    pub fn new(max_headers: u64, max_other: u64) -> Self {
        let cap = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Self {
            max_headers: cap(max_headers),
            max_other: cap(max_other),
            state: State::Header,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            buf: Vec::new(),
            poisoned: None,
        }
    }

    /// Feeds the next chunk of the stream and reports what it completes, in order.
    ///
    /// Events before an error are still delivered.
    pub fn push(
        &mut self,
        input: &[u8],
        on: &mut impl FnMut(FrameEvent<'_>) -> Result<(), H3Error>,
    ) -> Result<(), H3Error> {
        if let Some(err) = &self.poisoned {
            return Err(H3Error::clone(err));
        }
        let result = self.run(input, on);
        if let Err(err) = &result {
            self.poison(err.clone());
        }
        result
    }

    /// Clean end of stream (FIN): an error if a frame is cut short.
    pub fn finish(&mut self) -> Result<(), H3Error> {
        if let Some(err) = &self.poisoned {
            return Err(H3Error::clone(err));
        }
        //= https://www.rfc-editor.org/rfc/rfc9114#section-7.1
        //# When a stream terminates cleanly, if the last frame on the stream was
        //# truncated, this MUST be treated as a connection error of type
        //# H3_FRAME_ERROR.
        if self.is_between_frames() {
            Ok(())
        } else {
            let err = frame_error("frame truncated by end of stream");
            self.poison(err.clone());
            Err(err)
        }
    }

    /// True when no frame is partly read.
    pub fn is_between_frames(&self) -> bool {
        self.state == State::Header && self.hdr_len == 0
    }

    /// Bytes held for reassembly (for memory accounting and tests).
    pub fn buffered(&self) -> usize {
        self.hdr_len + self.buf.len()
    }

    fn poison(&mut self, err: H3Error) {
        self.poisoned = Some(Box::new(err));
        self.state = State::Header;
        self.hdr_len = 0;
        self.buf = Vec::new();
    }

    fn run(
        &mut self,
        mut input: &[u8],
        on: &mut impl FnMut(FrameEvent<'_>) -> Result<(), H3Error>,
    ) -> Result<(), H3Error> {
        while !input.is_empty() {
            match self.state {
                State::Header => {
                    let Some((ty, len, used)) = self.read_header(input) else {
                        // The whole input went into the header buffer.
                        return Ok(());
                    };
                    input = &input[used..];
                    self.start_frame(ty, len, on)?;
                }
                State::Data { remaining } => {
                    let take = clamp(remaining, input.len());
                    let (chunk, rest) = input.split_at(take);
                    input = rest;
                    self.state = match remaining - take as u64 {
                        0 => State::Header,
                        remaining => State::Data { remaining },
                    };
                    on(FrameEvent::Data(chunk))?;
                }
                State::Buffer { ty, len } => {
                    if self.buf.is_empty() && input.len() >= len {
                        // Zero-copy: the whole payload is in this chunk.
                        let (payload, rest) = input.split_at(len);
                        input = rest;
                        self.state = State::Header;
                        on(FrameEvent::Frame { ty, payload })?;
                    } else {
                        let take = (len - self.buf.len()).min(input.len());
                        self.buf.extend_from_slice(&input[..take]);
                        input = &input[take..];
                        if self.buf.len() == len {
                            self.state = State::Header;
                            self.deliver_buffered(ty, on)?;
                        }
                    }
                }
                State::Skip { remaining } => {
                    let take = clamp(remaining, input.len());
                    input = &input[take..];
                    self.state = match remaining - take as u64 {
                        0 => State::Header,
                        remaining => State::Skip { remaining },
                    };
                }
            }
        }
        Ok(())
    }

    /// Completes a frame header from the header buffer and `input`. Returns the type, length
    /// and the number of bytes of `input` used, or `None` if all of `input` was buffered.
    fn read_header(&mut self, input: &[u8]) -> Option<(u64, u64, usize)> {
        if self.hdr_len == 0 {
            match parse_header(input) {
                Parsed::Complete { ty, len, hdr_len } => return Some((ty, len, hdr_len)),
                Parsed::Incomplete { .. } => {
                    // Shorter than a header (at most 15 bytes): keep it all.
                    self.hdr[..input.len()].copy_from_slice(input);
                    self.hdr_len = input.len();
                    return None;
                }
            }
        }
        // Copy only as many bytes as the header still needs, so no payload byte lands here.
        let old = self.hdr_len;
        loop {
            match parse_header(&self.hdr[..self.hdr_len]) {
                Parsed::Complete { ty, len, hdr_len } => {
                    debug_assert_eq!(hdr_len, self.hdr_len);
                    self.hdr_len = 0;
                    return Some((ty, len, hdr_len - old));
                }
                Parsed::Incomplete { need } => {
                    let used = self.hdr_len - old;
                    let take = (need - self.hdr_len).min(input.len() - used);
                    if take == 0 {
                        return None;
                    }
                    self.hdr[self.hdr_len..self.hdr_len + take]
                        .copy_from_slice(&input[used..used + take]);
                    self.hdr_len += take;
                }
            }
        }
    }

    fn start_frame(
        &mut self,
        ty: u64,
        len: u64,
        on: &mut impl FnMut(FrameEvent<'_>) -> Result<(), H3Error>,
    ) -> Result<(), H3Error> {
        //= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.8
        //# Frame types that were used in HTTP/2 where there is no corresponding
        //# HTTP/3 frame have also been reserved (Section 11.2.1).  These frame
        //# types MUST NOT be sent, and their receipt MUST be treated as a
        //# connection error of type H3_FRAME_UNEXPECTED.
        if is_http2_only(ty) {
            return Err(H3Error::connection(
                H3_FRAME_UNEXPECTED,
                "HTTP/2 frame type",
            ));
        }
        on(FrameEvent::Start { ty, len })?;
        let limit = match ty {
            DATA => {
                self.state = if len == 0 {
                    State::Header
                } else {
                    State::Data { remaining: len }
                };
                return Ok(());
            }
            HEADERS => {
                if len > u64::from(self.max_headers) {
                    return Err(H3Error::stream(
                        H3_EXCESSIVE_LOAD,
                        "HEADERS frame exceeds the field section limit",
                    ));
                }
                len
            }
            SETTINGS | PUSH_PROMISE => {
                if len > u64::from(self.max_other) {
                    return Err(H3Error::connection(
                        H3_EXCESSIVE_LOAD,
                        "control frame exceeds the size limit",
                    ));
                }
                len
            }
            GOAWAY | MAX_PUSH_ID | CANCEL_PUSH => {
                // One varint: known to be malformed before reading it.
                if len > 8 {
                    return Err(frame_error("ID frame longer than one varint"));
                }
                len
            }
            _ => {
                //= https://www.rfc-editor.org/rfc/rfc9114#section-9
                //# Implementations MUST ignore unknown or unsupported values in all
                //# extensible protocol elements.
                //
                // Reserved types (0x1f * N + 0x21, §7.2.8) land here too: none is a known type.
                self.state = if len == 0 {
                    State::Header
                } else {
                    State::Skip { remaining: len }
                };
                return Ok(());
            }
        };
        let Ok(len) = usize::try_from(limit) else {
            // Only on targets whose memory could never hold it anyway.
            return Err(H3Error::connection(
                H3_EXCESSIVE_LOAD,
                "frame larger than memory",
            ));
        };
        if len == 0 {
            self.state = State::Header;
            return on(FrameEvent::Frame { ty, payload: &[] });
        }
        self.state = State::Buffer { ty, len };
        Ok(())
    }

    fn deliver_buffered(
        &mut self,
        ty: u64,
        on: &mut impl FnMut(FrameEvent<'_>) -> Result<(), H3Error>,
    ) -> Result<(), H3Error> {
        // Moved out so the callback can borrow it while `self` stays usable.
        let mut payload = std::mem::take(&mut self.buf);
        let result = on(FrameEvent::Frame {
            ty,
            payload: &payload,
        });
        if payload.capacity() <= KEEP_BUFFER {
            payload.clear();
            self.buf = payload;
        }
        result
    }
}

/// `min(remaining, available)` as a usize.
fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::h3::{ErrorScope, H3_EXCESSIVE_LOAD};
    use proptest::prelude::*;

    /// Events with owned payloads, DATA pieces merged per frame.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        Start(u64, u64),
        Data(Vec<u8>),
        Frame(u64, Vec<u8>),
    }

    fn collect(reader: &mut FrameReader, chunks: &[&[u8]]) -> (Vec<Owned>, Result<(), H3Error>) {
        let mut events: Vec<Owned> = Vec::new();
        let mut on = |ev: FrameEvent<'_>| {
            match ev {
                FrameEvent::Start { ty, len } => events.push(Owned::Start(ty, len)),
                FrameEvent::Data(d) => {
                    assert!(!d.is_empty(), "empty DATA piece");
                    match events.last_mut() {
                        Some(Owned::Data(acc)) => acc.extend_from_slice(d),
                        _ => events.push(Owned::Data(d.to_vec())),
                    }
                }
                FrameEvent::Frame { ty, payload } => {
                    events.push(Owned::Frame(ty, payload.to_vec()))
                }
            }
            Ok(())
        };
        for chunk in chunks {
            if let Err(e) = reader.push(chunk, &mut on) {
                return (events, Err(e));
            }
        }
        (events, reader.finish())
    }

    fn frame(ty: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame_header(ty, payload.len() as u64, &mut out);
        out.extend_from_slice(payload);
        out
    }

    fn reader() -> FrameReader {
        FrameReader::new(1024, DEFAULT_MAX_CONTROL_FRAME)
    }

    #[test]
    fn frames_in_one_chunk() {
        let mut bytes = frame(HEADERS, b"abc");
        bytes.extend(frame(DATA, b"hello"));
        bytes.extend(frame(DATA, b""));
        bytes.extend(frame(0x21, b"grease"));
        bytes.extend(frame(GOAWAY, &[0x04]));
        let (events, result) = collect(&mut reader(), &[&bytes]);
        result.unwrap();
        assert_eq!(
            events,
            [
                Owned::Start(HEADERS, 3),
                Owned::Frame(HEADERS, b"abc".to_vec()),
                Owned::Start(DATA, 5),
                Owned::Data(b"hello".to_vec()),
                Owned::Start(DATA, 0),
                Owned::Start(0x21, 6),
                Owned::Start(GOAWAY, 1),
                Owned::Frame(GOAWAY, vec![4]),
            ]
        );
    }

    #[test]
    fn data_is_streamed_not_buffered() {
        // A DATA frame declaring 2^62 - 1 bytes: pieces are delivered, nothing is held.
        let mut bytes = Vec::new();
        encode_frame_header(DATA, varint::MAX, &mut bytes);
        let mut r = reader();
        let mut pieces = Vec::new();
        r.push(&bytes, &mut |_| Ok(())).unwrap();
        for _ in 0..3 {
            r.push(&[7u8; 1000], &mut |ev| {
                if let FrameEvent::Data(d) = ev {
                    pieces.push(d.len());
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(r.buffered(), 0);
        }
        assert_eq!(pieces, [1000, 1000, 1000]);
        // Ending now truncates the frame.
        assert_eq!(r.finish().unwrap_err().code, H3_FRAME_ERROR);
    }

    #[test]
    fn whole_frames_and_data_borrow_the_input() {
        let mut bytes = frame(HEADERS, b"field section");
        bytes.extend(frame(DATA, b"capsules"));
        let range = bytes.as_ptr_range();
        let mut borrowed = 0;
        reader()
            .push(&bytes, &mut |ev| {
                if let FrameEvent::Frame { payload: p, .. } | FrameEvent::Data(p) = ev {
                    assert!(range.contains(&p.as_ptr()), "payload was copied");
                    borrowed += 1;
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(borrowed, 2);
    }

    #[test]
    fn split_frames_are_reassembled_and_header_bytes_not_overread() {
        let payload = vec![0x5a; 300];
        let bytes = frame(HEADERS, &payload);
        let mut r = reader();
        let (events, result) = collect(&mut r, &bytes.chunks(1).collect::<Vec<_>>());
        result.unwrap();
        assert_eq!(
            events,
            [Owned::Start(HEADERS, 300), Owned::Frame(HEADERS, payload)]
        );
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn unknown_frames_are_skipped_without_buffering() {
        let mut bytes = Vec::new();
        encode_frame_header(0x2f, 1 << 40, &mut bytes);
        let mut r = reader();
        r.push(&bytes, &mut |_| Ok(())).unwrap();
        r.push(&[0u8; 4096], &mut |_| Ok(())).unwrap();
        assert_eq!(r.buffered(), 0);
        // A reserved type mid-request.
        let mut bytes = frame(0x21 + 0x1f * 7, b"pad");
        bytes.extend(frame(DATA, b"x"));
        let (events, result) = collect(&mut reader(), &[&bytes]);
        result.unwrap();
        assert_eq!(events.last(), Some(&Owned::Data(b"x".to_vec())));
    }

    #[test]
    fn http2_frame_types_are_connection_errors() {
        for ty in [0x02, 0x06, 0x08, 0x09] {
            let (_, result) = collect(&mut reader(), &[&frame(ty, b"")]);
            let err = result.unwrap_err();
            assert_eq!(err.code, H3_FRAME_UNEXPECTED, "{ty:#x}");
            assert_eq!(err.scope, ErrorScope::Connection);
        }
    }

    #[test]
    fn limits() {
        let mut r = FrameReader::new(10, 20);
        let (_, result) = collect(&mut r, &[&frame(HEADERS, &[0; 10])]);
        result.unwrap();
        let mut r = FrameReader::new(10, 20);
        let mut hdr = Vec::new();
        encode_frame_header(HEADERS, 11, &mut hdr);
        let err = r.push(&hdr, &mut |_| Ok(())).unwrap_err();
        assert_eq!(
            (err.code, err.scope),
            (H3_EXCESSIVE_LOAD, ErrorScope::Stream)
        );
        // Poisoned: the same error again.
        assert_eq!(r.push(b"", &mut |_| Ok(())).unwrap_err(), err);
        assert_eq!(r.finish().unwrap_err(), err);

        let mut r = FrameReader::new(10, 20);
        let mut hdr = Vec::new();
        encode_frame_header(SETTINGS, 21, &mut hdr);
        let err = r.push(&hdr, &mut |_| Ok(())).unwrap_err();
        assert_eq!(
            (err.code, err.scope),
            (H3_EXCESSIVE_LOAD, ErrorScope::Connection)
        );

        let mut r = reader();
        let mut hdr = Vec::new();
        encode_frame_header(GOAWAY, 9, &mut hdr);
        assert_eq!(
            r.push(&hdr, &mut |_| Ok(())).unwrap_err().code,
            H3_FRAME_ERROR
        );
    }

    #[test]
    fn truncation_at_end_of_stream() {
        let bytes = frame(HEADERS, b"abcdef");
        for cut in 1..bytes.len() {
            let (_, result) = collect(&mut reader(), &[&bytes[..cut]]);
            let err = result.unwrap_err();
            assert_eq!(
                (err.code, err.scope),
                (H3_FRAME_ERROR, ErrorScope::Connection)
            );
        }
        // A two-byte varint header cut after one byte.
        let (_, result) = collect(&mut reader(), &[&[0x40]]);
        assert_eq!(result.unwrap_err().code, H3_FRAME_ERROR);
        let (_, result) = collect(&mut reader(), &[]);
        result.unwrap();
    }

    #[test]
    fn callback_errors_stop_the_reader() {
        let mut bytes = frame(DATA, b"abc");
        bytes.extend(frame(HEADERS, b"x"));
        let mut r = reader();
        let mut seen = 0;
        let err = r
            .push(&bytes, &mut |ev| {
                seen += 1;
                match ev {
                    FrameEvent::Start { ty: HEADERS, .. } => {
                        Err(H3Error::connection(H3_FRAME_UNEXPECTED, "test"))
                    }
                    _ => Ok(()),
                }
            })
            .unwrap_err();
        assert_eq!(err.reason, "test");
        assert_eq!(seen, 3);
        assert_eq!(r.push(b"more", &mut |_| Ok(())).unwrap_err(), err);
    }

    #[test]
    fn id_payloads() {
        assert_eq!(decode_id_payload(&[0x25]), Ok(37));
        assert_eq!(decode_id_payload(&[0x40, 0x25]), Ok(37));
        assert_eq!(decode_id_payload(&[]).unwrap_err().code, H3_FRAME_ERROR);
        assert_eq!(decode_id_payload(&[0x40]).unwrap_err().code, H3_FRAME_ERROR);
        assert_eq!(
            decode_id_payload(&[0x25, 0]).unwrap_err().code,
            H3_FRAME_ERROR
        );
        let mut out = Vec::new();
        encode_goaway(8, &mut out);
        assert_eq!(out, [0x07, 0x01, 0x08]);
    }

    #[test]
    fn settings_encoding_is_exact() {
        let relay = Settings {
            qpack_max_table_capacity: 0,
            qpack_blocked_streams: 0,
            max_field_section_size: Some(65536),
            enable_connect_protocol: true,
            h3_datagram: true,
            grease: false,
        };
        let mut out = Vec::new();
        encode_settings(&relay, &mut out);
        assert_eq!(
            out,
            [
                0x04, 0x0d, // SETTINGS, 13 bytes
                0x01, 0x00, // QPACK_MAX_TABLE_CAPACITY 0
                0x07, 0x00, // QPACK_BLOCKED_STREAMS 0
                0x06, 0x80, 0x01, 0x00, 0x00, // MAX_FIELD_SECTION_SIZE 65536
                0x08, 0x01, // ENABLE_CONNECT_PROTOCOL 1
                0x33, 0x01, // H3_DATAGRAM 1
            ]
        );
        assert_eq!(Settings::decode(&out[2..]).unwrap(), relay);
    }

    #[test]
    fn settings_grease_is_ignored_on_receipt() {
        let s = Settings {
            grease: true,
            ..Settings::default()
        };
        let mut fixed = Vec::new();
        encode_settings(&s, &mut fixed);
        let mut again = Vec::new();
        encode_settings(&s, &mut again);
        assert_eq!(fixed, again, "reproducible");
        let (id, _) = varint::read(&fixed[6..]).unwrap();
        assert!(crate::proto::h3::is_reserved(id));
        for seed in [0, 1, 12345, u64::MAX] {
            let mut out = Vec::new();
            encode_settings_seeded(&s, seed, &mut out);
            let (id, _) = varint::read(&out[6..]).unwrap();
            assert_eq!(id, grease_value(seed));
            assert_eq!(Settings::decode(&out[2..]).unwrap(), Settings::default());
        }
    }

    #[test]
    fn settings_errors() {
        let cases: [(&[u8], u64); 9] = [
            (&[0x33, 0x02], H3_SETTINGS_ERROR),
            (&[0x08, 0x02], H3_SETTINGS_ERROR),
            (&[0x00, 0x00], H3_SETTINGS_ERROR),
            (&[0x02, 0x00], H3_SETTINGS_ERROR),
            (&[0x05, 0x00], H3_SETTINGS_ERROR),
            (&[0x06, 0x01, 0x06, 0x01], H3_SETTINGS_ERROR),
            (&[0x21, 0x01, 0x21, 0x02], H3_SETTINGS_ERROR),
            (&[0x06], H3_FRAME_ERROR),
            (&[0x06, 0x40], H3_FRAME_ERROR),
        ];
        for (payload, code) in cases {
            let err = Settings::decode(payload).unwrap_err();
            assert_eq!(err.code, code, "{payload:02x?}");
            assert!(err.is_connection());
        }
        // Unknown and reserved identifiers are ignored; an empty SETTINGS is fine.
        assert_eq!(
            Settings::decode(&[0x21, 0x05, 0x40, 0x63, 0x00]).unwrap(),
            Settings::default()
        );
        assert_eq!(Settings::decode(&[]).unwrap(), Settings::default());
        assert_eq!(
            Settings::decode(&[0x33, 0x00, 0x08, 0x00, 0x01, 0x10]).unwrap(),
            Settings {
                qpack_max_table_capacity: 16,
                ..Settings::default()
            }
        );
    }

    fn frame_strategy() -> impl Strategy<Value = (u64, Vec<u8>)> {
        let ty = prop_oneof![
            Just(DATA),
            Just(HEADERS),
            Just(SETTINGS),
            Just(PUSH_PROMISE),
            (0u64..1000).prop_map(grease_value),
            0x0eu64..0x40,
        ];
        (ty, proptest::collection::vec(any::<u8>(), 0..300))
            .prop_filter("valid for the reader", |(ty, _)| !is_http2_only(*ty))
    }

    fn split_points() -> impl Strategy<Value = Vec<usize>> {
        proptest::collection::vec(1usize..40, 0..200)
    }

    fn chunks<'a>(bytes: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        let mut rest = bytes;
        for &s in sizes.iter().cycle().take(bytes.len() + 1) {
            if rest.is_empty() {
                break;
            }
            let (a, b) = rest.split_at(s.min(rest.len()));
            out.push(a);
            rest = b;
        }
        if !rest.is_empty() {
            out.push(rest);
        }
        out
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_events(
            frames in proptest::collection::vec(frame_strategy(), 0..10),
            sizes in split_points(),
        ) {
            let bytes: Vec<u8> = frames.iter().flat_map(|(ty, p)| frame(*ty, p)).collect();
            let (whole, r1) = collect(&mut reader(), &[&bytes]);
            r1.unwrap();
            let sizes = if sizes.is_empty() { vec![1] } else { sizes };
            let (split, r2) = collect(&mut reader(), &chunks(&bytes, &sizes));
            r2.unwrap();
            prop_assert_eq!(&whole, &split);
            // And the events describe the frames.
            let mut expected = Vec::new();
            for (ty, p) in &frames {
                expected.push(Owned::Start(*ty, p.len() as u64));
                match *ty {
                    DATA if !p.is_empty() => expected.push(Owned::Data(p.clone())),
                    DATA => {}
                    HEADERS | SETTINGS | PUSH_PROMISE => expected.push(Owned::Frame(*ty, p.clone())),
                    _ => {}
                }
            }
            prop_assert_eq!(whole, expected);
        }

        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            sizes in split_points(),
        ) {
            let sizes = if sizes.is_empty() { vec![7] } else { sizes };
            let mut r = FrameReader::new(64, 64);
            let _ = collect(&mut r, &chunks(&bytes, &sizes));
            prop_assert!(r.buffered() <= 64 + MAX_HEADER_LEN);
        }

        #[test]
        fn settings_roundtrip(
            cap in 0..=varint::MAX,
            blocked in 0..=varint::MAX,
            size in proptest::option::of(0..=varint::MAX),
            connect in any::<bool>(),
            datagram in any::<bool>(),
            grease in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let s = Settings {
                qpack_max_table_capacity: cap,
                qpack_blocked_streams: blocked,
                max_field_section_size: size,
                enable_connect_protocol: connect,
                h3_datagram: datagram,
                grease,
            };
            let mut out = Vec::new();
            encode_settings_seeded(&s, seed, &mut out);
            let mut events = Vec::new();
            let mut r = reader();
            r.push(&out, &mut |ev| {
                if let FrameEvent::Frame { ty, payload } = ev {
                    events.push((ty, Settings::decode(payload)));
                }
                Ok(())
            }).unwrap();
            r.finish().unwrap();
            prop_assert_eq!(events, vec![(SETTINGS, Ok(Settings { grease: false, ..s }))]);
        }
    }
}
