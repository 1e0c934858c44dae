//! HTTP/3 written by hand from RFC 9114 (frames) and RFC 9204 (QPACK literals, no dynamic
//! table), independently of the relay's `proto::h3`: what the hand-driven clients of the tests
//! send and read.

use super::{read_varint, udp_path, varint};

/// An HPACK / QPACK prefixed integer (RFC 7541 §5.1): `flags` holds the bits above the prefix.
pub fn prefixed_int(v: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = v - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

pub fn h3_frame(ty: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 16);
    varint(ty, &mut f);
    varint(payload.len() as u64, &mut f);
    f.extend_from_slice(payload);
    f
}

/// QPACK literal field line with a literal name, neither Huffman-coded (RFC 9204 §4.5.6).
pub fn qpack_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    prefixed_int(name.len(), 3, 0x20, out);
    out.extend_from_slice(name);
    prefixed_int(value.len(), 7, 0, out);
    out.extend_from_slice(value);
}

/// QPACK literal field line with a literal name and a Huffman-coded value.
pub fn qpack_literal_huffman(name: &[u8], huffman_value: &[u8], out: &mut Vec<u8>) {
    prefixed_int(name.len(), 3, 0x20, out);
    out.extend_from_slice(name);
    prefixed_int(huffman_value.len(), 7, 0x80, out);
    out.extend_from_slice(huffman_value);
}

/// `n` times the letter `a` in the HPACK/QPACK Huffman code (RFC 7541 Appendix B: `a` is the
/// five bits 00011), padded with ones: 5/8 of a byte per decoded byte.
pub fn huffman_a(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 5 / 8 + 1);
    let (mut acc, mut bits) = (0u64, 0u32);
    for _ in 0..n {
        acc = (acc << 5) | 0b00011;
        bits += 5;
        while bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
    }
    out
}

/// A CONNECT-UDP request's field section (Required Insert Count 0, Base 0) plus `extra` lines.
pub fn qpack_connect_udp(port: u16, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![0x00, 0x00];
    qpack_literal(b":method", b"CONNECT", &mut b);
    qpack_literal(b":protocol", b"connect-udp", &mut b);
    qpack_literal(b":scheme", b"https", &mut b);
    qpack_literal(b":authority", b"localhost", &mut b);
    qpack_literal(b":path", udp_path("127.0.0.1", port).as_bytes(), &mut b);
    qpack_literal(b"capsule-protocol", b"?1", &mut b);
    b.extend_from_slice(extra);
    b
}

pub fn read_prefixed_int(buf: &[u8], prefix: u8) -> Option<(usize, usize)> {
    let max = (1usize << prefix) - 1;
    let mut v = usize::from(*buf.first()?) & max;
    if v < max {
        return Some((v, 1));
    }
    let mut shift = 0;
    for (i, b) in buf[1..].iter().enumerate() {
        v += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some((v, i + 2));
        }
    }
    None
}

/// The `:status` of the first HEADERS frame in the bytes of an HTTP/3 response stream. Knows
/// the two forms a status can take without the dynamic table: an indexed static field line and
/// a literal with a static name reference and a plain value (RFC 9204 §4.5.2, §4.5.4).
pub fn h3_response_status(stream: &[u8]) -> Option<u16> {
    let mut rest = stream;
    loop {
        let (ty, a) = read_varint(rest)?;
        let (len, b) = read_varint(&rest[a..])?;
        let payload = rest.get(a + b..a + b + len as usize)?;
        if ty != 0x01 {
            rest = &rest[a + b + len as usize..];
            continue;
        }
        let line = payload.get(2..)?;
        let first = *line.first()?;
        if first & 0xc0 == 0xc0 {
            let (index, _) = read_prefixed_int(line, 6)?;
            return match index {
                24 => Some(103),
                25 => Some(200),
                26 => Some(304),
                27 => Some(404),
                28 => Some(503),
                63 => Some(100),
                64 => Some(204),
                65 => Some(206),
                66 => Some(302),
                67 => Some(400),
                68 => Some(403),
                69 => Some(421),
                70 => Some(425),
                71 => Some(500),
                _ => None,
            };
        }
        if first & 0xd0 == 0x50 {
            let (_, n) = read_prefixed_int(line, 4)?;
            let value = &line[n..];
            if value.first()? & 0x80 != 0 {
                return None; // Huffman: not produced by the relay
            }
            let (vlen, m) = read_prefixed_int(value, 7)?;
            let digits = value.get(m..m + vlen)?;
            return std::str::from_utf8(digits).ok()?.parse().ok();
        }
        return None;
    }
}

/// A client's control stream opening: stream type 0x00 and a SETTINGS frame with
/// SETTINGS_H3_DATAGRAM = 1 (RFC 9297 §2.1.1) and QPACK's dynamic table off.
pub fn client_control_stream() -> Vec<u8> {
    let mut settings = Vec::new();
    for (id, v) in [(0x01u64, 0u64), (0x07, 0), (0x33, 1)] {
        varint(id, &mut settings);
        varint(v, &mut settings);
    }
    let mut out = vec![0x00];
    out.extend_from_slice(&h3_frame(0x04, &settings));
    out
}

/// The settings of a peer's control stream (its bytes so far), once its SETTINGS frame is
/// complete: (identifier, value) pairs.
pub fn control_stream_settings(b: &[u8]) -> Option<Vec<(u64, u64)>> {
    let (ty, a) = read_varint(b)?;
    if ty != 0 {
        return None;
    }
    let (ft, c) = read_varint(&b[a..])?;
    if ft != 0x04 {
        return None;
    }
    let (len, d) = read_varint(&b[a + c..])?;
    let start = a + c + d;
    let body = b.get(start..start + len as usize)?;
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        let (k, x) = read_varint(&body[i..])?;
        let (v, y) = read_varint(&body[i + x..])?;
        out.push((k, v));
        i += x + y;
    }
    Some(out)
}
