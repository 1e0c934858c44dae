//! The HPACK Huffman code (RFC 7541 §5.2 and Appendix B), which QPACK string literals use
//! unchanged (RFC 9204 §4.1.2): a strict decoder for peers' strings and an encoder for tests and
//! for callers that want shorter literals.
//!
//! The decoder walks a binary tree built once from the code table. Bit-at-a-time is plenty for a
//! relay: field sections are a few hundred bytes and bounded by the field-section limit, and the
//! tree keeps the padding and EOS rules (the part implementations get wrong) obvious.

use std::sync::OnceLock;

use bytes::BufMut;

/// Symbol number of EOS, the 257th symbol: never a decoded byte, only padding material.
const EOS: usize = 256;

/// `(code, bit length)` for each symbol 0..=256, codes right-aligned.
///
/// Source: RFC 7541 Appendix B (transcribed from the copy in the `h2` crate,
/// `src/hpack/huffman/table.rs`, MIT), plus EOS. Checked in tests against the RFC 7541
/// Appendix C examples and for being a complete prefix code.
#[rustfmt::skip]
const CODES: [(u32, u8); 257] = [
(0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), // 0x000..=0x003
    (0xfffffe4, 28), (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28), // 0x004..=0x007
    (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28), // 0x008..=0x00b
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), // 0x00c..=0x00f
    (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28), // 0x010..=0x013
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28), // 0x014..=0x017
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), // 0x018..=0x01b
    (0xffffff8, 28), (0xffffff9, 28), (0xffffffa, 28), (0xffffffb, 28), // 0x01c..=0x01f
    (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12), // 0x020..=0x023
    (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11), // 0x024..=0x027
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11), // 0x028..=0x02b
    (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6), // 0x02c..=0x02f
    (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), // 0x030..=0x033
    (0x1a, 6), (0x1b, 6), (0x1c, 6), (0x1d, 6), // 0x034..=0x037
    (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8), // 0x038..=0x03b
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), // 0x03c..=0x03f
    (0x1ffa, 13), (0x21, 6), (0x5d, 7), (0x5e, 7), // 0x040..=0x043
    (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7), // 0x044..=0x047
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7), // 0x048..=0x04b
    (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7), // 0x04c..=0x04f
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7), // 0x050..=0x053
    (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), // 0x054..=0x057
    (0xfc, 8), (0x73, 7), (0xfd, 8), (0x1ffb, 13), // 0x058..=0x05b
    (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6), // 0x05c..=0x05f
    (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5), // 0x060..=0x063
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), // 0x064..=0x067
    (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7), // 0x068..=0x06b
    (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), // 0x06c..=0x06f
    (0x2b, 6), (0x76, 7), (0x2c, 6), (0x8, 5), // 0x070..=0x073
    (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7), // 0x074..=0x077
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), // 0x078..=0x07b
    (0x7fc, 11), (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28), // 0x07c..=0x07f
    (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20), // 0x080..=0x083
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), // 0x084..=0x087
    (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23), // 0x088..=0x08b
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23), // 0x08c..=0x08f
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), // 0x090..=0x093
    (0xffffee, 24), (0x7fffe1, 23), (0x7fffe2, 23), (0x7fffe3, 23), // 0x094..=0x097
    (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23), // 0x098..=0x09b
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24), // 0x09c..=0x09f
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22), // 0x0a0..=0x0a3
    (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21), // 0x0a4..=0x0a7
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), // 0x0a8..=0x0ab
    (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23), (0x7fffec, 23), // 0x0ac..=0x0af
    (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21), // 0x0b0..=0x0b3
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), // 0x0b4..=0x0b7
    (0xfffea, 20), (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22), // 0x0b8..=0x0bb
    (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23), // 0x0bc..=0x0bf
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), // 0x0c0..=0x0c3
    (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25), // 0x0c4..=0x0c7
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27), // 0x0c8..=0x0cb
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), // 0x0cc..=0x0cf
    (0x7fff2, 19), (0x1fffe3, 21), (0x3ffffe6, 26), (0x7ffffe0, 27), // 0x0d0..=0x0d3
    (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24), // 0x0d4..=0x0d7
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26), // 0x0d8..=0x0db
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27), // 0x0dc..=0x0df
    (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21), // 0x0e0..=0x0e3
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), // 0x0e4..=0x0e7
    (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25), (0x1ffffef, 25), // 0x0e8..=0x0eb
    (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23), // 0x0ec..=0x0ef
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), // 0x0f0..=0x0f3
    (0x7ffffe7, 27), (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27), // 0x0f4..=0x0f7
    (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27), // 0x0f8..=0x0fb
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26), // 0x0fc..=0x0ff
    (0x3fffffff, 30), // 0x100 (EOS)
];

/// Why a Huffman string was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HuffmanError {
    #[error("Huffman padding longer than 7 bits")]
    LongPadding,
    #[error("Huffman padding is not the start of the EOS code")]
    BadPadding,
    #[error("EOS symbol inside a Huffman string")]
    Eos,
    #[error("decoded Huffman string exceeds the limit")]
    TooLong,
}

/// Marks a tree slot as a leaf; the low bits are the symbol.
const LEAF: u16 = 0x8000;

/// The decoding tree: node `i` has children `[bit 0, bit 1]`, each either another node's index
/// or `LEAF | symbol`. A complete prefix code over 257 symbols has exactly 256 inner nodes.
fn tree() -> &'static [[u16; 2]] {
    static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
    TREE.get_or_init(|| {
        // Slot 0 doubles as "empty": the root is node 0 and is never anyone's child.
        let mut nodes: Vec<[u16; 2]> = vec![[0, 0]];
        for (sym, &(code, len)) in CODES.iter().enumerate() {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    assert_eq!(
                        nodes[node][bit], 0,
                        "Huffman code of {sym} is not prefix-free"
                    );
                    nodes[node][bit] = LEAF | sym as u16;
                } else {
                    let next = nodes[node][bit];
                    assert!(next & LEAF == 0, "Huffman code of {sym} extends a leaf");
                    node = if next == 0 {
                        nodes.push([0, 0]);
                        let idx = nodes.len() - 1;
                        nodes[node][bit] = idx as u16;
                        idx
                    } else {
                        usize::from(next)
                    };
                }
            }
        }
        // Complete code: every slot filled, so decoding never meets a dead end.
        assert!(nodes.iter().all(|n| n[0] != 0 && n[1] != 0));
        nodes
    })
}

/// Decodes the Huffman string `input`, appending at most `max_len` bytes to `out`.
///
/// On error `out` may hold a partial result; callers discard it.
pub fn decode(input: &[u8], max_len: usize, out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let tree = tree();
    let start = out.len();
    // Every code is at least 5 bits, which bounds the output without trusting the peer.
    out.reserve((input.len() * 8 / 5).min(max_len));
    let mut node = 0usize;
    // Bits read since the last complete symbol, and whether all of them were ones: at the end
    // these are the padding.
    let mut pending_bits = 0u32;
    let mut pending_all_ones = true;
    for &byte in input {
        for shift in (0..8).rev() {
            let bit = (byte >> shift) & 1;
            pending_bits += 1;
            pending_all_ones &= bit == 1;
            let next = tree[node][usize::from(bit)];
            if next & LEAF == 0 {
                node = usize::from(next);
                continue;
            }
            let sym = usize::from(next & !LEAF);
            //= https://www.rfc-editor.org/rfc/rfc7541#section-5.2
            //# A Huffman-encoded string literal containing the EOS symbol MUST be
            //# treated as a decoding error.
            if sym == EOS {
                return Err(HuffmanError::Eos);
            }
            if out.len() - start >= max_len {
                return Err(HuffmanError::TooLong);
            }
            out.push(sym as u8);
            node = 0;
            pending_bits = 0;
            pending_all_ones = true;
        }
    }
    //= https://www.rfc-editor.org/rfc/rfc7541#section-5.2
    //# A padding strictly longer
    //# than 7 bits MUST be treated as a decoding error.  A padding not
    //# corresponding to the most significant bits of the code for the EOS
    //# symbol MUST be treated as a decoding error.
    //
    // EOS is thirty 1-bits, so "the most significant bits of EOS" means all ones.
    if pending_bits > 7 {
        return Err(HuffmanError::LongPadding);
    }
    if !pending_all_ones {
        return Err(HuffmanError::BadPadding);
    }
    Ok(())
}

/// Length in bytes of the Huffman encoding of `input`.
pub fn encoded_len(input: &[u8]) -> usize {
    let bits: usize = input
        .iter()
        .map(|&b| usize::from(CODES[usize::from(b)].1))
        .sum();
    bits.div_ceil(8)
}

/// Writes the Huffman encoding of `input`, padded with the start of EOS (ones).
pub fn encode(input: &[u8], out: &mut impl BufMut) {
    // Up to 7 pending bits plus a 30-bit code fit in 64.
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    for &b in input {
        let (code, len) = CODES[usize::from(b)];
        acc = (acc << len) | u64::from(code);
        bits += u32::from(len);
        while bits >= 8 {
            bits -= 8;
            out.put_u8((acc >> bits) as u8);
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        let pad = 8 - bits;
        out.put_u8(((acc << pad) | ((1 << pad) - 1)) as u8);
    }
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

    fn dec(input: &[u8]) -> Result<Vec<u8>, HuffmanError> {
        let mut out = Vec::new();
        decode(input, usize::MAX, &mut out).map(|()| out)
    }

    fn enc(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(input, &mut out);
        out
    }

    /// RFC 7541 Appendix C.4 (requests) and C.6 (responses): independent vectors that pin the
    /// transcribed table as well as the coder.
    #[test]
    fn rfc7541_appendix_c_vectors() {
        let vectors = [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ];
        for (encoded, plain) in vectors {
            let encoded = hex(encoded);
            assert_eq!(dec(&encoded).unwrap(), plain.as_bytes(), "decode {plain}");
            assert_eq!(enc(plain.as_bytes()), encoded, "encode {plain}");
            assert_eq!(encoded_len(plain.as_bytes()), encoded.len(), "{plain}");
        }
    }

    #[test]
    fn code_is_complete_and_eos_is_all_ones() {
        // Kraft equality: a complete prefix code, so no bit pattern is undecodable.
        let sum: u64 = CODES.iter().map(|&(_, len)| 1u64 << (30 - len)).sum();
        assert_eq!(sum, 1 << 30);
        assert_eq!(CODES[EOS], (0x3fff_ffff, 30));
        assert_eq!(tree().len(), 256);
        // Spot checks against RFC 7541 Appendix B.
        assert_eq!(CODES[usize::from(b' ')], (0x14, 6));
        assert_eq!(CODES[usize::from(b'0')], (0x0, 5));
        assert_eq!(CODES[usize::from(b'a')], (0x3, 5));
        assert_eq!(CODES[0], (0x1ff8, 13));
        assert_eq!(CODES[255], (0x3ffffee, 26));
    }

    #[test]
    fn empty_string() {
        assert_eq!(dec(&[]).unwrap(), b"");
        assert_eq!(enc(b""), b"");
    }

    #[test]
    fn padding_rules() {
        // '0' is 00000 then three 1-bits of padding: fine.
        assert_eq!(dec(&[0x07]).unwrap(), b"0");
        // Padding with a zero bit in it.
        assert_eq!(dec(&[0x06]), Err(HuffmanError::BadPadding));
        // '0' (00000) then three zero bits: padding that is not the start of EOS.
        assert_eq!(dec(&[0x00]), Err(HuffmanError::BadPadding));
        // A full byte of ones is 8 bits of padding.
        assert_eq!(dec(&[0xff]), Err(HuffmanError::LongPadding));
        // 'a' (00011) then 0xff: 3 + 8 = 11 bits of ones left over.
        assert_eq!(dec(&[0x1f, 0xff]), Err(HuffmanError::LongPadding));
    }

    #[test]
    fn eos_inside_the_string_is_refused() {
        // 30 one-bits then 2 more: EOS is complete before the end.
        assert_eq!(dec(&[0xff, 0xff, 0xff, 0xff]), Err(HuffmanError::Eos));
        // 'a' (00011), then EOS, then padding.
        let mut bits: u64 = 0b00011;
        bits = (bits << 30) | 0x3fff_ffff;
        bits = (bits << 5) | 0b11111; // 40 bits total
        let bytes = bits.to_be_bytes();
        assert_eq!(dec(&bytes[3..]), Err(HuffmanError::Eos));
    }

    #[test]
    fn output_limit() {
        let encoded = hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff");
        let mut out = Vec::new();
        assert_eq!(decode(&encoded, 15, &mut out), Ok(()));
        let mut out = Vec::new();
        assert_eq!(decode(&encoded, 14, &mut out), Err(HuffmanError::TooLong));
        assert!(out.len() <= 14);
    }

    proptest! {
        #[test]
        fn roundtrip(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let encoded = enc(&input);
            prop_assert_eq!(encoded.len(), encoded_len(&input));
            prop_assert_eq!(dec(&encoded).unwrap(), input);
        }

        #[test]
        fn random_input_never_panics_and_respects_the_limit(
            input in proptest::collection::vec(any::<u8>(), 0..64),
            limit in 0usize..100,
        ) {
            let mut out = vec![0xaa];
            if decode(&input, limit, &mut out).is_ok() {
                prop_assert!(out.len() - 1 <= limit);
                // What decodes must re-encode to the same bytes: the padding rules leave no
                // freedom in a valid string.
                prop_assert_eq!(enc(&out[1..]), input);
            }
            prop_assert!(out.len() - 1 <= limit);
        }
    }
}
