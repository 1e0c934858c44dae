//! QUIC variable-length integers (RFC 9000 §16): the one integer encoding shared by capsules,
//! HTTP/3 frames, settings and HTTP Datagram headers. This module owns encoding (always minimal)
//! and decoding (any length the prefix announces).

use bytes::BufMut;

//= https://www.rfc-editor.org/rfc/rfc9000#section-16
//# The QUIC variable-length integer encoding reserves the two most
//# significant bits of the first byte to encode the base-2 logarithm of
//# the integer encoding length in bytes.  The integer value is encoded
//# on the remaining bits, in network byte order.

/// Largest value a varint can carry: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Number of bytes the minimal encoding of `v` takes: 1, 2, 4 or 8.
///
/// `v` must not exceed [`MAX`]; debug builds assert it, release builds answer 8.
#[inline]
pub fn encoded_len(v: u64) -> usize {
    debug_assert!(v <= MAX, "varint value {v} exceeds 2^62-1");
    if v < (1 << 6) {
        1
    } else if v < (1 << 14) {
        2
    } else if v < (1 << 30) {
        4
    } else {
        8
    }
}

/// Number of bytes a varint whose first byte is `first` occupies (1, 2, 4 or 8).
///
/// Lets stream parsers know how many bytes to wait for after seeing only one.
#[inline]
pub fn decoded_len(first: u8) -> usize {
    1 << (first >> 6)
}

/// Writes the minimal encoding of `v`.
///
/// # Panics
/// If `v > MAX`: such a value cannot be put on the wire, so it is a caller bug.
#[inline]
pub fn write(v: u64, out: &mut impl BufMut) {
    assert!(v <= MAX, "varint value {v} exceeds 2^62-1");
    // The `as` casts below cannot lose bits: `encoded_len` chose a width the value fits in.
    match encoded_len(v) {
        1 => out.put_u8(v as u8),
        2 => out.put_u16(0x4000 | v as u16),
        4 => out.put_u32(0x8000_0000 | v as u32),
        _ => out.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// Writes the minimal encoding of `v` at the start of `out` and returns the bytes written.
///
/// # Panics
/// If `v > MAX`, or if `out` is shorter than [`encoded_len`]`(v)`.
#[inline]
pub fn write_to_slice(v: u64, out: &mut [u8]) -> usize {
    assert!(v <= MAX, "varint value {v} exceeds 2^62-1");
    let len = encoded_len(v);
    // The prefix is log2(len) in the top two bits of the `len`-byte big-endian encoding.
    let prefix = u64::from(len.trailing_zeros()) << (8 * len - 2);
    let bytes = (prefix | v).to_be_bytes();
    out[..len].copy_from_slice(&bytes[8 - len..]);
    len
}

//= https://www.rfc-editor.org/rfc/rfc9000#section-16
//# Values do not need to be encoded on the minimum number of bytes
//# necessary, with the sole exception of the Frame Type field; see
//# Section 12.4.

/// Reads one varint from the start of `buf`.
///
/// Returns the value and the number of bytes it took, or `None` if `buf` does not yet hold the
/// whole encoding (more bytes are needed; nothing in a varint can be malformed otherwise).
/// Non-minimal encodings are accepted, as the RFC requires of receivers.
#[inline]
pub fn read(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let len = decoded_len(first);
    let bytes = buf.get(..len)?;
    let v = bytes[1..]
        .iter()
        .fold(u64::from(first & 0x3f), |acc, &b| (acc << 8) | u64::from(b));
    Some((v, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write(v, &mut out);
        out
    }

    //= https://www.rfc-editor.org/rfc/rfc9000#appendix-A.1
    //# For example, the eight-byte sequence 0xc2197c5eff14e88c decodes to
    //# the decimal value 151,288,809,941,952,652; the four-byte sequence
    //# 0x9d7f3e7d decodes to 494,878,333; the two-byte sequence 0x7bbd
    //# decodes to 15,293; and the single byte 0x25 decodes to 37 (as does
    //# the two-byte sequence 0x4025).
    #[test]
    fn rfc9000_appendix_a1_vectors() {
        let vectors: [(&[u8], u64); 4] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
        ];
        for (bytes, value) in vectors {
            assert_eq!(read(bytes), Some((value, bytes.len())), "{bytes:02x?}");
            assert_eq!(encode(value), bytes, "{value}");
            let mut slice = [0u8; 8];
            assert_eq!(write_to_slice(value, &mut slice), bytes.len());
            assert_eq!(&slice[..bytes.len()], bytes);
        }
    }

    #[test]
    fn non_minimal_encodings_are_accepted() {
        assert_eq!(read(&[0x40, 0x25]), Some((37, 2)));
        assert_eq!(read(&[0x80, 0, 0, 0x25]), Some((37, 4)));
        assert_eq!(read(&[0xc0, 0, 0, 0, 0, 0, 0, 0x25]), Some((37, 8)));
        assert_eq!(read(&[0xc0, 0, 0, 0, 0, 0, 0, 0]), Some((0, 8)));
    }

    #[test]
    fn boundaries() {
        let cases = [
            (0, 1),
            (63, 1),
            (64, 2),
            (16_383, 2),
            (16_384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            (MAX, 8),
        ];
        for (value, len) in cases {
            assert_eq!(encoded_len(value), len, "{value}");
            let bytes = encode(value);
            assert_eq!(bytes.len(), len, "{value}");
            assert_eq!(decoded_len(bytes[0]), len);
            assert_eq!(read(&bytes), Some((value, len)), "{value}");
        }
        assert_eq!(encode(MAX), [0xff; 8]);
        assert_eq!(encode(64), [0x40, 0x40]);
    }

    #[test]
    fn trailing_bytes_are_not_consumed() {
        assert_eq!(read(&[0x25, 0xff, 0xff]), Some((37, 1)));
        assert_eq!(read(&[0x7b, 0xbd, 0x00]), Some((15_293, 2)));
    }

    #[test]
    fn empty_and_short_input_needs_more() {
        assert_eq!(read(&[]), None);
        assert_eq!(read(&[0x40]), None);
        assert_eq!(read(&[0x80, 0, 0]), None);
        assert_eq!(read(&[0xc0, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    #[should_panic(expected = "exceeds 2^62-1")]
    fn write_rejects_values_above_max() {
        write(MAX + 1, &mut Vec::new());
    }

    #[test]
    #[should_panic(expected = "exceeds 2^62-1")]
    fn write_to_slice_rejects_values_above_max() {
        write_to_slice(MAX + 1, &mut [0u8; 8]);
    }

    #[test]
    #[should_panic]
    fn write_to_slice_panics_on_short_output() {
        write_to_slice(64, &mut [0u8; 1]);
    }

    /// Values spread over every length class, not just uniformly over 62 bits (which would be
    /// 8-byte encodings almost always).
    fn any_varint() -> impl Strategy<Value = u64> {
        prop_oneof![
            0..64u64,
            64..16_384u64,
            16_384..(1u64 << 30),
            (1u64 << 30)..=MAX
        ]
    }

    proptest! {
        #[test]
        fn roundtrip_is_minimal(v in any_varint()) {
            let bytes = encode(v);
            prop_assert_eq!(bytes.len(), encoded_len(v));
            prop_assert_eq!(read(&bytes), Some((v, bytes.len())));
            // Minimal: the next shorter length class could not hold the value.
            let shorter_max = match bytes.len() {
                1 => None,
                2 => Some(63),
                4 => Some(16_383),
                _ => Some((1 << 30) - 1),
            };
            if let Some(limit) = shorter_max {
                prop_assert!(v > limit);
            }
            let mut slice = [0xaau8; 9];
            let n = write_to_slice(v, &mut slice);
            prop_assert_eq!(&slice[..n], &bytes[..]);
            prop_assert_eq!(slice[8], 0xaa, "wrote past the encoding");
        }

        #[test]
        fn every_truncation_needs_more(v in any_varint()) {
            let bytes = encode(v);
            for cut in 0..bytes.len() {
                prop_assert_eq!(read(&bytes[..cut]), None);
            }
        }

        #[test]
        fn any_length_class_decodes_to_the_same_value(v in any_varint(), widen in 0usize..4) {
            // Re-encode `v` in a wider class than minimal, as a peer may.
            let len = (encoded_len(v).trailing_zeros() as usize).max(widen);
            let width = 1usize << len;
            let raw = (((len as u64) << (8 * width - 2)) | v).to_be_bytes();
            let mut bytes = raw[8 - width..].to_vec();
            bytes.push(0x99);
            prop_assert_eq!(read(&bytes), Some((v, width)));
        }
    }
}
