//! QPACK (RFC 9204) for an endpoint that never allows a dynamic table: field sections are decoded
//! against the static table only, and encoded with static references and literals.
//!
//! The relay advertises SETTINGS_QPACK_MAX_TABLE_CAPACITY = 0 and QPACK_BLOCKED_STREAMS = 0, so a
//! conforming peer's field sections have a Required Insert Count of 0 and never reference the
//! dynamic table; anything else is QPACK_DECOMPRESSION_FAILED. That removes blocking, the encoder
//! and decoder stream state, and every cross-stream dependency: each field section decodes on its
//! own. The peer's encoder and decoder streams are checked in [`super::stream`].
//!
//! The decoder limits the *decoded* size of a field section (RFC 9114 §4.2.2: name + value + 32
//! per field) as it goes, before allocating, so a small Huffman-coded or static-indexed block
//! cannot make it allocate more than the limit.

use bytes::BufMut;

use super::{huffman, H3Error, H3_EXCESSIVE_LOAD, QPACK_DECOMPRESSION_FAILED};
use crate::proto::varint;

/// The per-field overhead in the size of a field section (RFC 9114 §4.2.2) and of a table entry
/// (RFC 9204 §3.2.1).
pub const FIELD_OVERHEAD: u64 = 32;

/// One decoded field line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

impl Field {
    pub fn new(name: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }

    /// This field's share of the field-section size (RFC 9114 §4.2.2).
    pub fn size(&self) -> u64 {
        self.name.len() as u64 + self.value.len() as u64 + FIELD_OVERHEAD
    }
}

/// Why a field section was not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QpackError {
    /// Malformed, or references a dynamic table we never allowed: a connection error of type
    /// QPACK_DECOMPRESSION_FAILED (RFC 9204 §6).
    #[error("QPACK decompression failed: {0}")]
    DecompressionFailed(&'static str),
    /// The decoded field section exceeds the size limit. The block itself was well-formed as far
    /// as it was read; a server answers 431 (RFC 9114 §4.2.2) or resets the stream.
    #[error("decoded field section exceeds the size limit")]
    TooLarge,
}

impl From<QpackError> for H3Error {
    /// `TooLarge` becomes a stream error (H3_EXCESSIVE_LOAD), for callers that do not answer 431.
    fn from(e: QpackError) -> Self {
        match e {
            QpackError::DecompressionFailed(reason) => {
                H3Error::connection(QPACK_DECOMPRESSION_FAILED, reason)
            }
            QpackError::TooLarge => {
                H3Error::stream(H3_EXCESSIVE_LOAD, "field section exceeds the size limit")
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prefixed integers (RFC 7541 §5.1, used unmodified by RFC 9204 §4.1.1)
// ---------------------------------------------------------------------------------------------

/// Why a prefixed integer could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntError {
    /// The buffer ends inside the integer.
    Incomplete,
    /// The value exceeds 2^62 - 1, or the encoding is absurdly long.
    Overflow,
}

//= https://www.rfc-editor.org/rfc/rfc9204#section-4.1.1
//# QPACK implementations MUST be able to decode integers up to and
//# including 62 bits long.
//
// Larger values are refused: nothing in QPACK can meaningfully exceed 2^62 - 1 (stream IDs,
// lengths and indices all fit a varint), and the bound keeps the arithmetic in a u64.

/// Reads an integer with a `prefix`-bit prefix (1..=8) from the start of `buf`; the bits above
/// the prefix in the first byte are the caller's. Returns the value and the bytes it took.
/// Non-minimal encodings (extra zero continuation bytes) are accepted up to the 2^62 bound.
pub(crate) fn decode_int(buf: &[u8], prefix: u8) -> Result<(u64, usize), IntError> {
    debug_assert!((1..=8).contains(&prefix));
    let first = *buf.first().ok_or(IntError::Incomplete)?;
    let max_prefix = (1u16 << prefix) - 1;
    let mut value = u64::from(u16::from(first) & max_prefix);
    if value < u64::from(max_prefix) {
        return Ok((value, 1));
    }
    let mut shift = 0u32;
    for (i, &b) in buf[1..].iter().enumerate() {
        // Nine continuation bytes carry 63 bits; a tenth can only overflow or be padding.
        if shift > 56 {
            return Err(IntError::Overflow);
        }
        // Cannot overflow a u64: value <= 2^62 - 1 and the addend is below 2^63.
        value += u64::from(b & 0x7f) << shift;
        if value > varint::MAX {
            return Err(IntError::Overflow);
        }
        if b & 0x80 == 0 {
            return Ok((value, i + 2));
        }
        shift += 7;
    }
    Err(IntError::Incomplete)
}

/// Writes `value` with a `prefix`-bit prefix; `flags` supplies the bits above the prefix.
pub(crate) fn encode_int(value: u64, prefix: u8, flags: u8, out: &mut impl BufMut) {
    debug_assert!((1..=8).contains(&prefix));
    let max_prefix = (1u16 << prefix) - 1;
    if value < u64::from(max_prefix) {
        out.put_u8(flags | value as u8);
        return;
    }
    out.put_u8(flags | max_prefix as u8);
    let mut rest = value - u64::from(max_prefix);
    while rest >= 0x80 {
        out.put_u8(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.put_u8(rest as u8);
}

// ---------------------------------------------------------------------------------------------
// The static table (RFC 9204 §3.1, Appendix A)
// ---------------------------------------------------------------------------------------------

/// The QPACK static table, indexed from 0.
///
/// Source: RFC 9204 Appendix A (transcribed from the copy in the `h3` crate,
/// `src/qpack/static_.rs`, MIT, and checked against the RFC's table).
#[rustfmt::skip]
pub const STATIC_TABLE: [(&[u8], &[u8]); 99] = [
    (b":authority", b""), // 0
    (b":path", b"/"), // 1
    (b"age", b"0"), // 2
    (b"content-disposition", b""), // 3
    (b"content-length", b"0"), // 4
    (b"cookie", b""), // 5
    (b"date", b""), // 6
    (b"etag", b""), // 7
    (b"if-modified-since", b""), // 8
    (b"if-none-match", b""), // 9
    (b"last-modified", b""), // 10
    (b"link", b""), // 11
    (b"location", b""), // 12
    (b"referer", b""), // 13
    (b"set-cookie", b""), // 14
    (b":method", b"CONNECT"), // 15
    (b":method", b"DELETE"), // 16
    (b":method", b"GET"), // 17
    (b":method", b"HEAD"), // 18
    (b":method", b"OPTIONS"), // 19
    (b":method", b"POST"), // 20
    (b":method", b"PUT"), // 21
    (b":scheme", b"http"), // 22
    (b":scheme", b"https"), // 23
    (b":status", b"103"), // 24
    (b":status", b"200"), // 25
    (b":status", b"304"), // 26
    (b":status", b"404"), // 27
    (b":status", b"503"), // 28
    (b"accept", b"*/*"), // 29
    (b"accept", b"application/dns-message"), // 30
    (b"accept-encoding", b"gzip, deflate, br"), // 31
    (b"accept-ranges", b"bytes"), // 32
    (b"access-control-allow-headers", b"cache-control"), // 33
    (b"access-control-allow-headers", b"content-type"), // 34
    (b"access-control-allow-origin", b"*"), // 35
    (b"cache-control", b"max-age=0"), // 36
    (b"cache-control", b"max-age=2592000"), // 37
    (b"cache-control", b"max-age=604800"), // 38
    (b"cache-control", b"no-cache"), // 39
    (b"cache-control", b"no-store"), // 40
    (b"cache-control", b"public, max-age=31536000"), // 41
    (b"content-encoding", b"br"), // 42
    (b"content-encoding", b"gzip"), // 43
    (b"content-type", b"application/dns-message"), // 44
    (b"content-type", b"application/javascript"), // 45
    (b"content-type", b"application/json"), // 46
    (b"content-type", b"application/x-www-form-urlencoded"), // 47
    (b"content-type", b"image/gif"), // 48
    (b"content-type", b"image/jpeg"), // 49
    (b"content-type", b"image/png"), // 50
    (b"content-type", b"text/css"), // 51
    (b"content-type", b"text/html; charset=utf-8"), // 52
    (b"content-type", b"text/plain"), // 53
    (b"content-type", b"text/plain;charset=utf-8"), // 54
    (b"range", b"bytes=0-"), // 55
    (b"strict-transport-security", b"max-age=31536000"), // 56
    (b"strict-transport-security", b"max-age=31536000; includesubdomains"), // 57
    (b"strict-transport-security", b"max-age=31536000; includesubdomains; preload"), // 58
    (b"vary", b"accept-encoding"), // 59
    (b"vary", b"origin"), // 60
    (b"x-content-type-options", b"nosniff"), // 61
    (b"x-xss-protection", b"1; mode=block"), // 62
    (b":status", b"100"), // 63
    (b":status", b"204"), // 64
    (b":status", b"206"), // 65
    (b":status", b"302"), // 66
    (b":status", b"400"), // 67
    (b":status", b"403"), // 68
    (b":status", b"421"), // 69
    (b":status", b"425"), // 70
    (b":status", b"500"), // 71
    (b"accept-language", b""), // 72
    (b"access-control-allow-credentials", b"FALSE"), // 73
    (b"access-control-allow-credentials", b"TRUE"), // 74
    (b"access-control-allow-headers", b"*"), // 75
    (b"access-control-allow-methods", b"get"), // 76
    (b"access-control-allow-methods", b"get, post, options"), // 77
    (b"access-control-allow-methods", b"options"), // 78
    (b"access-control-expose-headers", b"content-length"), // 79
    (b"access-control-request-headers", b"content-type"), // 80
    (b"access-control-request-method", b"get"), // 81
    (b"access-control-request-method", b"post"), // 82
    (b"alt-svc", b"clear"), // 83
    (b"authorization", b""), // 84
    (b"content-security-policy", b"script-src 'none'; object-src 'none'; base-uri 'none'"), // 85
    (b"early-data", b"1"), // 86
    (b"expect-ct", b""), // 87
    (b"forwarded", b""), // 88
    (b"if-range", b""), // 89
    (b"origin", b""), // 90
    (b"purpose", b"prefetch"), // 91
    (b"server", b""), // 92
    (b"timing-allow-origin", b"*"), // 93
    (b"upgrade-insecure-requests", b"1"), // 94
    (b"user-agent", b""), // 95
    (b"x-forwarded-for", b""), // 96
    (b"x-frame-options", b"deny"), // 97
    (b"x-frame-options", b"sameorigin"), // 98
];

/// Index of the entry equal to `(name, value)`.
fn static_find(name: &[u8], value: &[u8]) -> Option<usize> {
    STATIC_TABLE
        .iter()
        .position(|&(n, v)| n == name && v == value)
}

/// Index of the first entry named `name`.
fn static_find_name(name: &[u8]) -> Option<usize> {
    STATIC_TABLE.iter().position(|&(n, _)| n == name)
}

//= https://www.rfc-editor.org/rfc/rfc9204#section-3.1
//# When the decoder encounters an invalid static table index in a field
//# line representation, it MUST treat this as a connection error of type
//# QPACK_DECOMPRESSION_FAILED.
fn static_entry(index: u64) -> Result<(&'static [u8], &'static [u8]), QpackError> {
    usize::try_from(index)
        .ok()
        .and_then(|i| STATIC_TABLE.get(i))
        .copied()
        .ok_or(QpackError::DecompressionFailed(
            "static table index out of range",
        ))
}

// ---------------------------------------------------------------------------------------------
// Decoding a field section (RFC 9204 §4.5)
// ---------------------------------------------------------------------------------------------

const fn failed(reason: &'static str) -> QpackError {
    QpackError::DecompressionFailed(reason)
}

/// A cursor over an encoded field section; running out of bytes is always malformed here,
/// because a HEADERS frame carries the whole section.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    fn int(&mut self, prefix: u8) -> Result<u64, QpackError> {
        match decode_int(self.buf, prefix) {
            Ok((v, n)) => {
                self.buf = &self.buf[n..];
                Ok(v)
            }
            Err(IntError::Incomplete) => Err(failed("truncated integer")),
            Err(IntError::Overflow) => Err(failed("integer overflow")),
        }
    }

    /// Reads a string literal whose H flag sits just above a `prefix`-bit length, appending the
    /// decoded bytes to `out`; refuses to produce more than `budget` bytes.
    fn string(&mut self, prefix: u8, budget: u64, out: &mut Vec<u8>) -> Result<(), QpackError> {
        let huffman = self.peek().ok_or(failed("truncated string"))? & (1 << prefix) != 0;
        let len = self.int(prefix)?;
        // Checked before any allocation: the declared length must be present in the block.
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.buf.len())
            .ok_or(failed("string overruns the field section"))?;
        let (bytes, rest) = self.buf.split_at(len);
        self.buf = rest;
        let budget = usize::try_from(budget).unwrap_or(usize::MAX);
        if huffman {
            huffman::decode(bytes, budget, out).map_err(|e| match e {
                huffman::HuffmanError::TooLong => QpackError::TooLarge,
                huffman::HuffmanError::LongPadding => failed("Huffman padding longer than 7 bits"),
                huffman::HuffmanError::BadPadding => failed("Huffman padding is not EOS"),
                huffman::HuffmanError::Eos => failed("EOS inside a Huffman string"),
            })
        } else if len > budget {
            Err(QpackError::TooLarge)
        } else {
            out.extend_from_slice(bytes);
            Ok(())
        }
    }
}

/// Decodes one encoded field section (the payload of a HEADERS frame) against the static table.
///
/// `max_size` bounds the decoded size (sum of name + value + 32 per field, RFC 9114 §4.2.2); it
/// is enforced before each allocation, so memory use stays within it whatever the block holds.
pub fn decode_field_section(block: &[u8], max_size: u64) -> Result<Vec<Field>, QpackError> {
    let mut cur = Cursor { buf: block };

    //= https://www.rfc-editor.org/rfc/rfc9204#section-4.5.1.1
    //# If the decoder encounters a value
    //# of EncodedInsertCount that could not have been produced by a
    //# conformant encoder, it MUST treat this as a connection error of type
    //# QPACK_DECOMPRESSION_FAILED.
    //
    // With a maximum table capacity of 0, MaxEntries is 0 and the only value a conformant encoder
    // can produce is 0.
    if cur.int(8)? != 0 {
        return Err(failed("Required Insert Count > 0 without a dynamic table"));
    }
    let sign = cur.peek().ok_or(failed("truncated field section prefix"))? & 0x80 != 0;
    let delta_base = cur.int(7)?;
    //= https://www.rfc-editor.org/rfc/rfc9204#section-4.5.1.2
    //# An endpoint MUST treat a field block
    //# with a Sign bit of 1 as invalid if the value of Required Insert Count
    //# is less than or equal to the value of Delta Base.
    //
    // Required Insert Count is 0 here, so any Sign bit of 1 is invalid; with Sign 0 the Base
    // (= Delta Base) is otherwise unused, as nothing may reference the dynamic table.
    if sign {
        return Err(failed("negative Base"));
    }
    let _ = delta_base;

    let mut fields = Vec::new();
    let mut size: u64 = 0;
    while let Some(first) = cur.peek() {
        let remaining = max_size.saturating_sub(size);
        let field = if first & 0x80 != 0 {
            // Indexed Field Line: 1 T Index(6+).
            if first & 0x40 == 0 {
                return Err(failed("dynamic table reference"));
            }
            let (name, value) = static_entry(cur.int(6)?)?;
            if name.len() as u64 + value.len() as u64 + FIELD_OVERHEAD > remaining {
                return Err(QpackError::TooLarge);
            }
            Field::new(name, value)
        } else if first & 0x40 != 0 {
            // Literal Field Line with Name Reference: 0 1 N T NameIndex(4+), value string(7+).
            // N only constrains how an intermediary re-encodes the field; we never index.
            if first & 0x10 == 0 {
                return Err(failed("dynamic table name reference"));
            }
            let (name, _) = static_entry(cur.int(4)?)?;
            let budget = remaining
                .checked_sub(name.len() as u64 + FIELD_OVERHEAD)
                .ok_or(QpackError::TooLarge)?;
            let mut value = Vec::new();
            cur.string(7, budget, &mut value)?;
            Field::new(name, value)
        } else if first & 0x20 != 0 {
            // Literal Field Line with Literal Name: 0 0 1 N H NameLen(3+), name, value string(7+).
            let budget = remaining
                .checked_sub(FIELD_OVERHEAD)
                .ok_or(QpackError::TooLarge)?;
            let mut name = Vec::new();
            cur.string(3, budget, &mut name)?;
            let mut value = Vec::new();
            cur.string(7, budget - name.len() as u64, &mut value)?;
            Field { name, value }
        } else if first & 0x10 != 0 {
            return Err(failed("post-base indexed field line"));
        } else {
            return Err(failed("post-base name reference"));
        };
        size += field.size();
        debug_assert!(size <= max_size);
        fields.push(field);
    }
    Ok(fields)
}

// ---------------------------------------------------------------------------------------------
// Encoding a field section
// ---------------------------------------------------------------------------------------------

/// Encodes `fields` as a field section that needs no dynamic table: Required Insert Count 0,
/// Base 0, then per field an Indexed Field Line for an exact static match, a Literal with Name
/// Reference for a static name, or a Literal with Literal Name. Strings are not Huffman-coded
/// (the relay's responses are a few short fields).
///
/// Field names must already be lowercase (RFC 9114 §4.2); this function does not check.
pub fn encode_field_section(fields: &[(&[u8], &[u8])], out: &mut impl BufMut) {
    // Required Insert Count = 0 (8-bit prefix), then Sign = 0, Delta Base = 0 (7-bit prefix).
    out.put_u8(0);
    out.put_u8(0);
    for &(name, value) in fields {
        if let Some(index) = static_find(name, value) {
            // 1 T=1 Index(6+)
            encode_int(index as u64, 6, 0b1100_0000, out);
        } else if let Some(index) = static_find_name(name) {
            // 0 1 N=0 T=1 NameIndex(4+), then H=0 ValueLength(7+) value
            encode_int(index as u64, 4, 0b0101_0000, out);
            encode_raw_string(value, 7, 0, out);
        } else {
            // 0 0 1 N=0 H=0 NameLength(3+) name, then H=0 ValueLength(7+) value
            encode_raw_string(name, 3, 0b0010_0000, out);
            encode_raw_string(value, 7, 0, out);
        }
    }
}

/// A string literal without Huffman coding: H = 0, then the length with a `prefix`-bit prefix.
fn encode_raw_string(s: &[u8], prefix: u8, flags: u8, out: &mut impl BufMut) {
    encode_int(s.len() as u64, prefix, flags, out);
    out.put_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn encode(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_field_section(fields, &mut out);
        out
    }

    fn int(value: u64, prefix: u8, flags: u8) -> Vec<u8> {
        let mut out = Vec::new();
        encode_int(value, prefix, flags, &mut out);
        out
    }

    //= https://www.rfc-editor.org/rfc/rfc7541#appendix-C.1
    // C.1.1: 10 with a 5-bit prefix is 0a; C.1.2: 1337 with a 5-bit prefix is 1f 9a 0a;
    // C.1.3: 42 with an 8-bit prefix is 2a.
    #[test]
    fn rfc7541_integer_examples() {
        assert_eq!(int(10, 5, 0), [0x0a]);
        assert_eq!(int(1337, 5, 0), [0x1f, 0x9a, 0x0a]);
        assert_eq!(int(42, 8, 0), [0x2a]);
        assert_eq!(decode_int(&[0xea], 5), Ok((10, 1)), "flag bits are ignored");
        assert_eq!(decode_int(&[0x1f, 0x9a, 0x0a], 5), Ok((1337, 3)));
        assert_eq!(decode_int(&[0x2a], 8), Ok((42, 1)));
    }

    #[test]
    fn integer_edges() {
        assert_eq!(decode_int(&[], 5), Err(IntError::Incomplete));
        assert_eq!(decode_int(&[0x1f], 5), Err(IntError::Incomplete));
        assert_eq!(decode_int(&[0x1f, 0x80], 5), Err(IntError::Incomplete));
        // Non-minimal: zero continuation bytes.
        assert_eq!(decode_int(&[0x1f, 0x80, 0x00], 5), Ok((31, 3)));
        // 2^62 - 1 is the largest accepted value; one more overflows.
        let max = int(varint::MAX, 7, 0);
        assert_eq!(decode_int(&max, 7), Ok((varint::MAX, max.len())));
        let mut over = int(varint::MAX - 1, 7, 0);
        *over.last_mut().unwrap() += 1 << 6; // bump the top continuation chunk
        assert_eq!(decode_int(&over, 7), Err(IntError::Overflow));
        // Ten continuation bytes overflow even if they are all zero padding.
        let mut long = vec![0x7f];
        long.extend([0x80; 10]);
        long.push(0);
        assert_eq!(decode_int(&long, 7), Err(IntError::Overflow));
        assert_eq!(decode_int(&[0xff; 12], 8), Err(IntError::Overflow));
    }

    #[test]
    fn static_table_matches_rfc9204_appendix_a() {
        assert_eq!(STATIC_TABLE.len(), 99);
        assert_eq!(STATIC_TABLE[0], (&b":authority"[..], &b""[..]));
        assert_eq!(STATIC_TABLE[15], (&b":method"[..], &b"CONNECT"[..]));
        assert_eq!(STATIC_TABLE[23], (&b":scheme"[..], &b"https"[..]));
        assert_eq!(STATIC_TABLE[25], (&b":status"[..], &b"200"[..]));
        assert_eq!(STATIC_TABLE[68], (&b":status"[..], &b"403"[..]));
        assert_eq!(
            STATIC_TABLE[98],
            (&b"x-frame-options"[..], &b"sameorigin"[..])
        );
        // Every name is lowercase and every entry distinct.
        for (i, (n, v)) in STATIC_TABLE.iter().enumerate() {
            assert!(!n.iter().any(u8::is_ascii_uppercase), "{i}");
            assert_eq!(static_find(n, v), Some(i), "{i}");
        }
    }

    //= https://www.rfc-editor.org/rfc/rfc9204#appendix-B.1
    // 0000                | Required Insert Count = 0, Base = 0
    // 510b 2f69 6e64 6578 | Literal Field Line with Name Reference
    // 2e68 746d 6c        |  Static Table, Index=1
    //                     |  (:path=/index.html)
    #[test]
    fn rfc9204_appendix_b1() {
        let block = hex("0000 510b 2f69 6e64 6578 2e68 746d 6c");
        assert_eq!(
            decode_field_section(&block, 1000).unwrap(),
            [Field::new(":path", "/index.html")]
        );
        assert_eq!(encode(&[(b":path", b"/index.html")]), block);
    }

    /// RFC 9204 Appendix B.2 and B.4 field sections reference the dynamic table: with no table
    /// allowed they must fail, never decode to something.
    #[test]
    fn rfc9204_dynamic_examples_are_refused() {
        for block in ["0381 10 11", "0500 80 c1 81"] {
            assert!(
                matches!(
                    decode_field_section(&hex(block), 1000),
                    Err(QpackError::DecompressionFailed(_))
                ),
                "{block}"
            );
        }
    }

    #[test]
    fn representations_that_need_a_dynamic_table_are_refused() {
        for (block, why) in [
            ("0000 80", "dynamic indexed"),
            ("0000 10", "post-base indexed"),
            ("0000 40 00", "dynamic name reference"),
            ("0000 00 00", "post-base name reference"),
            ("0100", "RIC 1"),
            ("0080", "sign bit with RIC 0"),
        ] {
            assert!(
                matches!(
                    decode_field_section(&hex(block), 1000),
                    Err(QpackError::DecompressionFailed(_))
                ),
                "{why}"
            );
        }
    }

    #[test]
    fn malformed_sections_are_refused() {
        for (block, why) in [
            ("", "empty"),
            ("00", "no base"),
            ("0000 ff 24", "static index 99"),
            ("0000 ff", "truncated index"),
            ("0000 51 05 2f", "value overruns"),
            ("0000 51", "missing value"),
            ("0000 23 61 62", "name overruns"),
            ("0000 5f", "truncated name index"),
            ("0000 51 81 00", "bad Huffman padding"),
            ("0000 51 81 ff", "long Huffman padding"),
            ("0000 51 84 ff ff ff ff", "EOS in value"),
        ] {
            assert!(
                matches!(
                    decode_field_section(&hex(block), 1000),
                    Err(QpackError::DecompressionFailed(_))
                ),
                "{why}"
            );
        }
    }

    #[test]
    fn base_is_ignored_when_positive() {
        // Delta Base 5 with Sign 0, then :method CONNECT (index 15).
        assert_eq!(
            decode_field_section(&hex("0005 cf"), 1000).unwrap(),
            [Field::new(":method", "CONNECT")]
        );
        // The N bit on a literal is only advice to intermediaries.
        assert_eq!(
            decode_field_section(&hex("0000 71 01 78"), 1000).unwrap(),
            [Field::new(":path", "x")]
        );
        assert_eq!(
            decode_field_section(&hex("0000 31 61 01 62"), 1000).unwrap(),
            [Field::new("a", "b")]
        );
    }

    #[test]
    fn huffman_literals_decode() {
        // :authority (name ref 0) with the RFC 7541 C.4.1 Huffman value, and a Huffman name.
        let mut block = hex("0000 50 8c f1e3 c2e5 f23a 6ba0 ab90 f4ff");
        // Literal name "custom-key" Huffman (H bit 0x08, length 8), value "custom-value" raw.
        block.extend(hex("2f01 25a8 49e9 5ba9 7d7f 0c"));
        block.extend(b"custom-value");
        assert_eq!(
            decode_field_section(&block, 1000).unwrap(),
            [
                Field::new(":authority", "www.example.com"),
                Field::new("custom-key", "custom-value"),
            ]
        );
    }

    #[test]
    fn size_limit_counts_decoded_bytes() {
        // :method CONNECT is 7 + 7 + 32 = 46 bytes from a one-byte representation.
        let block = hex("0000 cf cf");
        assert_eq!(decode_field_section(&block, 92).unwrap().len(), 2);
        assert_eq!(decode_field_section(&block, 91), Err(QpackError::TooLarge));
        assert_eq!(
            decode_field_section(&hex("0000 cf"), 45),
            Err(QpackError::TooLarge)
        );
        // A Huffman value may decode to more bytes than it encodes; the limit applies to the
        // decoded length: ":authority" (10) + "www.example.com" (15) + 32 = 57.
        let block = hex("0000 50 8c f1e3 c2e5 f23a 6ba0 ab90 f4ff");
        assert!(decode_field_section(&block, 57).is_ok());
        assert_eq!(decode_field_section(&block, 56), Err(QpackError::TooLarge));
        // A literal that is too long is refused before its bytes are copied.
        let mut block = hex("0000");
        encode_int(200, 3, 0b0010_0000, &mut block);
        block.extend(vec![b'a'; 200]);
        block.push(0);
        assert_eq!(decode_field_section(&block, 100), Err(QpackError::TooLarge));
        assert_eq!(
            decode_field_section(&block, 232).unwrap()[0].name.len(),
            200
        );
    }

    #[test]
    fn encoder_picks_the_shortest_static_form() {
        assert_eq!(
            encode(&[(b":status", b"200")]),
            hex("0000 d9"),
            "indexed 25"
        );
        assert_eq!(
            encode(&[(b":status", b"429")]),
            hex("0000 5f09 03 343239"),
            "name reference 24"
        );
        assert_eq!(
            encode(&[(b"capsule-protocol", b"?1")]),
            [&hex("0000 27 09")[..], b"capsule-protocol", &[0x02], b"?1"].concat(),
            "literal name (length 16 = 7 + 9)"
        );
    }

    #[test]
    fn errors_map_to_h3_errors() {
        let e = H3Error::from(QpackError::DecompressionFailed("x"));
        assert_eq!(e.code, QPACK_DECOMPRESSION_FAILED);
        assert!(e.is_connection());
        let e = H3Error::from(QpackError::TooLarge);
        assert_eq!(e.code, H3_EXCESSIVE_LOAD);
        assert!(!e.is_connection());
    }

    fn field_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        let name = prop_oneof![
            proptest::sample::select(
                STATIC_TABLE
                    .iter()
                    .map(|e| e.0.to_vec())
                    .collect::<Vec<_>>()
            ),
            proptest::collection::vec(any::<u8>(), 0..40),
        ];
        let value = prop_oneof![
            proptest::sample::select(
                STATIC_TABLE
                    .iter()
                    .map(|e| e.1.to_vec())
                    .collect::<Vec<_>>()
            ),
            proptest::collection::vec(any::<u8>(), 0..200),
        ];
        (name, value)
    }

    proptest! {
        #[test]
        fn int_roundtrip(v in 0..=varint::MAX, prefix in 1u8..=8, flags in any::<u8>()) {
            let flags = if prefix == 8 { 0 } else { flags & !((1u16 << prefix) - 1) as u8 };
            let bytes = int(v, prefix, flags);
            prop_assert_eq!(bytes[0] & flags, flags);
            prop_assert_eq!(decode_int(&bytes, prefix), Ok((v, bytes.len())));
            for cut in 0..bytes.len() {
                prop_assert_eq!(decode_int(&bytes[..cut], prefix), Err(IntError::Incomplete));
            }
        }

        #[test]
        fn field_section_roundtrip(fields in proptest::collection::vec(field_strategy(), 0..12)) {
            let refs: Vec<(&[u8], &[u8])> =
                fields.iter().map(|(n, v)| (&n[..], &v[..])).collect();
            let block = encode(&refs);
            let decoded = decode_field_section(&block, u64::MAX).unwrap();
            let expected: Vec<Field> =
                fields.iter().map(|(n, v)| Field::new(n.clone(), v.clone())).collect();
            prop_assert_eq!(&decoded, &expected);
            // The limit is exact: the decoded size passes, one byte less does not.
            let size: u64 = expected.iter().map(Field::size).sum();
            prop_assert!(decode_field_section(&block, size).is_ok());
            if !expected.is_empty() {
                prop_assert_eq!(decode_field_section(&block, size - 1), Err(QpackError::TooLarge));
            }
        }

        #[test]
        fn huffman_values_roundtrip(value in proptest::collection::vec(any::<u8>(), 0..200)) {
            // Literal with literal name "x", Huffman-coded value.
            let mut block = hex("0000 21 78");
            let mut coded = Vec::new();
            huffman::encode(&value, &mut coded);
            encode_int(coded.len() as u64, 7, 0x80, &mut block);
            block.extend(&coded);
            let decoded = decode_field_section(&block, u64::MAX).unwrap();
            prop_assert_eq!(decoded, vec![Field::new("x", value)]);
        }

        #[test]
        fn random_blocks_never_panic_and_honour_the_limit(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            limit in 0u64..2000,
        ) {
            let block = [&[0u8, 0][..], &body].concat();
            if let Ok(fields) = decode_field_section(&block, limit) {
                prop_assert!(fields.iter().map(Field::size).sum::<u64>() <= limit);
            }
            let _ = decode_field_section(&body, limit);
        }
    }
}
