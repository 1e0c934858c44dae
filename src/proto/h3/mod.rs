//! The sans-I/O HTTP/3 layer (RFC 9114) with QPACK (RFC 9204) limited to the static table: the
//! codes every part shares, and the error type that tells the transport what to tear down.
//!
//! Nothing here touches a socket, a clock or a QUIC type. The transport feeds each stream's bytes
//! into the readers of [`stream`] as they arrive and writes what [`frame`], [`qpack`] and
//! [`request`] encode; every decision comes back as a value.
//!
//! ```text
//!   peer uni stream ──► UniStreamHead ──► Control / QpackEncoder / QpackDecoder reader
//!                                          └─ unknown: stop reading (H3_STREAM_CREATION_ERROR)
//!   request stream  ──► RequestStreamReader ──► Headers ──► qpack::decode_field_section
//!         (FrameReader inside)              │              └─► request::parse_request
//!                                           └─► Data chunks ──► capsule decoder
//! ```
//!
//! Every error is an [`H3Error`] whose [`ErrorScope`] says whether the whole connection closes
//! (CONNECTION_CLOSE with the code) or only the one stream is reset.

pub mod frame;
pub mod huffman;
pub mod qpack;
pub mod request;
pub mod stream;

use std::fmt;

//= https://www.rfc-editor.org/rfc/rfc9114#section-8.1
//# The following error codes are defined for use when abruptly
//# terminating streams, aborting reading of streams, or immediately
//# closing HTTP/3 connections.

/// No error: a graceful close.
pub const H3_NO_ERROR: u64 = 0x100;
/// A protocol violation with no more specific code.
pub const H3_GENERAL_PROTOCOL_ERROR: u64 = 0x101;
/// An internal error in the HTTP stack.
pub const H3_INTERNAL_ERROR: u64 = 0x102;
/// The peer created a stream this endpoint will not accept.
pub const H3_STREAM_CREATION_ERROR: u64 = 0x103;
/// A stream required by the connection (control, QPACK) was closed or reset.
pub const H3_CLOSED_CRITICAL_STREAM: u64 = 0x104;
/// A frame not permitted in the current state or on the current stream.
pub const H3_FRAME_UNEXPECTED: u64 = 0x105;
/// A frame that fails its layout requirements or has an invalid size.
pub const H3_FRAME_ERROR: u64 = 0x106;
/// The peer's behaviour might be generating excessive load.
pub const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// A stream ID or push ID used incorrectly.
pub const H3_ID_ERROR: u64 = 0x108;
/// An error in the payload of a SETTINGS frame.
pub const H3_SETTINGS_ERROR: u64 = 0x109;
/// No SETTINGS frame at the beginning of the control stream.
pub const H3_MISSING_SETTINGS: u64 = 0x10a;
/// The server rejected a request without processing it.
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
/// The request or its response is cancelled.
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// The client's stream ended without a fully formed request.
pub const H3_REQUEST_INCOMPLETE: u64 = 0x10d;
/// A malformed HTTP message.
pub const H3_MESSAGE_ERROR: u64 = 0x10e;
/// The tunnel of a CONNECT request was reset or closed abnormally.
pub const H3_CONNECT_ERROR: u64 = 0x10f;
/// HTTP Datagram errors (RFC 9297 §5).
pub const H3_DATAGRAM_ERROR: u64 = 0x33;
/// The decoder failed to interpret an encoded field section (RFC 9204 §6).
pub const QPACK_DECOMPRESSION_FAILED: u64 = 0x200;
/// The decoder failed to interpret an encoder-stream instruction (RFC 9204 §6).
pub const QPACK_ENCODER_STREAM_ERROR: u64 = 0x201;
/// The encoder failed to interpret a decoder-stream instruction (RFC 9204 §6).
pub const QPACK_DECODER_STREAM_ERROR: u64 = 0x202;

// Unidirectional stream types (RFC 9114 §6.2, RFC 9204 §4.2): the varint that opens a stream.

/// The control stream (RFC 9114 §6.2.1).
pub const STREAM_CONTROL: u64 = 0x00;
/// A push stream (RFC 9114 §6.2.2); only servers may open one.
pub const STREAM_PUSH: u64 = 0x01;
/// The QPACK encoder stream (RFC 9204 §4.2).
pub const STREAM_QPACK_ENCODER: u64 = 0x02;
/// The QPACK decoder stream (RFC 9204 §4.2).
pub const STREAM_QPACK_DECODER: u64 = 0x03;

// Setting identifiers this layer understands, under their RFC names.

/// SETTINGS_QPACK_MAX_TABLE_CAPACITY (RFC 9204 §5); default 0.
pub const SETTINGS_QPACK_MAX_TABLE_CAPACITY: u64 = 0x01;
/// SETTINGS_MAX_FIELD_SECTION_SIZE (RFC 9114 §7.2.4.1); default unlimited.
pub const SETTINGS_MAX_FIELD_SECTION_SIZE: u64 = 0x06;
/// SETTINGS_QPACK_BLOCKED_STREAMS (RFC 9204 §5); default 0.
pub const SETTINGS_QPACK_BLOCKED_STREAMS: u64 = 0x07;
/// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441 §3, carried to HTTP/3 by RFC 9220 §3).
pub const SETTINGS_ENABLE_CONNECT_PROTOCOL: u64 = 0x08;
/// SETTINGS_H3_DATAGRAM (RFC 9297 §2.1.1).
pub const SETTINGS_H3_DATAGRAM: u64 = 0x33;

/// What an [`H3Error`] closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorScope {
    /// Close the whole connection: CONNECTION_CLOSE with the error code.
    Connection,
    /// Abort only this stream: RESET_STREAM and STOP_SENDING with the error code.
    Stream,
}

impl fmt::Display for ErrorScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorScope::Connection => "connection error",
            ErrorScope::Stream => "stream error",
        })
    }
}

/// An HTTP/3 protocol error: the code to send, a fixed reason for the log, and what to close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} ({name}, {scope})", name = code_name(*.code))]
pub struct H3Error {
    /// The HTTP/3 or QPACK error code for CONNECTION_CLOSE or RESET_STREAM/STOP_SENDING.
    pub code: u64,
    /// A short, fixed description: safe to log, never peer-controlled text.
    pub reason: &'static str,
    /// Whether the connection or only the stream ends.
    pub scope: ErrorScope,
}

impl H3Error {
    /// An error that closes the connection.
    pub const fn connection(code: u64, reason: &'static str) -> Self {
        Self {
            code,
            reason,
            scope: ErrorScope::Connection,
        }
    }

    /// An error that aborts only the stream it happened on.
    pub const fn stream(code: u64, reason: &'static str) -> Self {
        Self {
            code,
            reason,
            scope: ErrorScope::Stream,
        }
    }

    /// True if the connection must close.
    pub fn is_connection(&self) -> bool {
        self.scope == ErrorScope::Connection
    }
}

/// The registered name of an error code, for logs and metrics labels; `"unknown"` otherwise.
pub fn code_name(code: u64) -> &'static str {
    match code {
        H3_NO_ERROR => "H3_NO_ERROR",
        H3_GENERAL_PROTOCOL_ERROR => "H3_GENERAL_PROTOCOL_ERROR",
        H3_INTERNAL_ERROR => "H3_INTERNAL_ERROR",
        H3_STREAM_CREATION_ERROR => "H3_STREAM_CREATION_ERROR",
        H3_CLOSED_CRITICAL_STREAM => "H3_CLOSED_CRITICAL_STREAM",
        H3_FRAME_UNEXPECTED => "H3_FRAME_UNEXPECTED",
        H3_FRAME_ERROR => "H3_FRAME_ERROR",
        H3_EXCESSIVE_LOAD => "H3_EXCESSIVE_LOAD",
        H3_ID_ERROR => "H3_ID_ERROR",
        H3_SETTINGS_ERROR => "H3_SETTINGS_ERROR",
        H3_MISSING_SETTINGS => "H3_MISSING_SETTINGS",
        H3_REQUEST_REJECTED => "H3_REQUEST_REJECTED",
        H3_REQUEST_CANCELLED => "H3_REQUEST_CANCELLED",
        H3_REQUEST_INCOMPLETE => "H3_REQUEST_INCOMPLETE",
        H3_MESSAGE_ERROR => "H3_MESSAGE_ERROR",
        H3_CONNECT_ERROR => "H3_CONNECT_ERROR",
        H3_DATAGRAM_ERROR => "H3_DATAGRAM_ERROR",
        QPACK_DECOMPRESSION_FAILED => "QPACK_DECOMPRESSION_FAILED",
        QPACK_ENCODER_STREAM_ERROR => "QPACK_ENCODER_STREAM_ERROR",
        QPACK_DECODER_STREAM_ERROR => "QPACK_DECODER_STREAM_ERROR",
        c if is_reserved(c) => "reserved",
        _ => "unknown",
    }
}

//= https://www.rfc-editor.org/rfc/rfc9114#section-7.2.8
//# Frame types of the format 0x1f * N + 0x21 for non-negative integer
//# values of N are reserved to exercise the requirement that unknown
//# types be ignored (Section 9).
//
// The same pattern reserves stream types (§6.2.3), setting identifiers (§7.2.4.1) and error
// codes (§8.1).

/// Smallest reserved ("grease") codepoint, N = 0.
const GREASE_BASE: u64 = 0x21;
/// Distance between reserved codepoints.
const GREASE_STEP: u64 = 0x1f;
/// Largest N whose codepoint still fits a varint: 0x1f * N + 0x21 = 0x3fff_ffff_ffff_fffe
/// (RFC 9114 §11.2.1 lists the range "0x21, 0x40, ..., through 0x3ffffffffffffffe").
const GREASE_MAX_N: u64 = (crate::proto::varint::MAX - GREASE_BASE) / GREASE_STEP;

/// True for the reserved codepoints 0x1f * N + 0x21 (frame types, stream types, setting
/// identifiers, error codes), which carry no meaning and must be ignored.
pub fn is_reserved(id: u64) -> bool {
    id >= GREASE_BASE && (id - GREASE_BASE) % GREASE_STEP == 0
}

/// A reserved codepoint chosen by `seed` (any value; the caller brings the randomness, since this
/// layer has none). Always a valid varint and always [`is_reserved`].
pub fn grease_value(seed: u64) -> u64 {
    GREASE_STEP * (seed % (GREASE_MAX_N + 1)) + GREASE_BASE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::varint;
    use proptest::prelude::*;

    #[test]
    fn reserved_codepoints() {
        for id in [0x21, 0x40, 0x5f, 0x3fff_ffff_ffff_fffe] {
            assert!(is_reserved(id), "{id:#x}");
        }
        for id in [0, 1, 0x20, 0x22, 0x3f, 0x41, 0x33, 0x100, varint::MAX] {
            assert!(!is_reserved(id), "{id:#x}");
        }
        assert_eq!(
            GREASE_STEP * GREASE_MAX_N + GREASE_BASE,
            0x3fff_ffff_ffff_fffe
        );
        assert_eq!(grease_value(0), 0x21);
        assert_eq!(grease_value(1), 0x40);
        assert_eq!(grease_value(GREASE_MAX_N), 0x3fff_ffff_ffff_fffe);
        assert_eq!(grease_value(GREASE_MAX_N + 1), 0x21);
    }

    #[test]
    fn errors_say_what_they_close() {
        let e = H3Error::connection(H3_FRAME_ERROR, "truncated frame");
        assert!(e.is_connection());
        assert_eq!(
            e.to_string(),
            "truncated frame (H3_FRAME_ERROR, connection error)"
        );
        let e = H3Error::stream(H3_MESSAGE_ERROR, "bad header");
        assert!(!e.is_connection());
        assert_eq!(e.to_string(), "bad header (H3_MESSAGE_ERROR, stream error)");
        assert_eq!(code_name(0x21), "reserved");
        assert_eq!(code_name(0x999), "unknown");
        assert_eq!(
            code_name(QPACK_DECODER_STREAM_ERROR),
            "QPACK_DECODER_STREAM_ERROR"
        );
    }

    proptest! {
        #[test]
        fn grease_is_reserved_and_fits_a_varint(seed in any::<u64>()) {
            let v = grease_value(seed);
            prop_assert!(is_reserved(v));
            prop_assert!(v <= varint::MAX);
        }

        #[test]
        fn is_reserved_matches_the_formula(n in 0..=GREASE_MAX_N, off in 1u64..0x1f) {
            let v = 0x1f * n + 0x21;
            prop_assert!(is_reserved(v));
            prop_assert!(!is_reserved(v - off));
        }
    }
}
