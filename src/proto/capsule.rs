//! The Capsule Protocol (RFC 9297 §3): encoding DATAGRAM capsules, and the incremental decoder
//! that turns an HTTP data stream, in chunks of any size, into capsule events.
//!
//! The decoder is built for the relay's hot path and for hostile peers:
//! - a DATAGRAM capsule that sits wholly inside one input chunk is delivered as a slice of that
//!   chunk (no copy);
//! - only a capsule split across chunks is reassembled, into a buffer never larger than the
//!   configured payload limit;
//! - unknown capsules and oversize DATAGRAM capsules are skipped by counting bytes, so a declared
//!   length of 2^62-1 costs nothing but the bytes the peer actually sends.

use bytes::BufMut;

use super::varint;

//= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
//# Capsule {
//#   Capsule Type (i),
//#   Capsule Length (i),
//#   Capsule Value (..),
//# }

//= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
//# Datagram Capsule {
//#   Capsule Type (i) = 0x00,
//#   Capsule Length (i),
//#   HTTP Datagram Payload (..),
//# }

/// Capsule Type of the DATAGRAM capsule.
pub const DATAGRAM: u64 = 0x00;

/// Max UDP payload carried in context 0 (RFC 9298 §5): 65527.
///
/// The decoder does not enforce this (it only knows `max_payload`); the flow layer must abort the
/// stream when a context-0 payload exceeds it.
//= https://www.rfc-editor.org/rfc/rfc9298#section-5
//# endpoints MUST NOT send HTTP Datagrams with a UDP Proxying Payload
//# field longer than 65527 using Context ID zero.  An endpoint that
//# receives an HTTP Datagram using Context ID zero whose UDP Proxying
//# Payload field is longer than 65527 MUST abort the corresponding
//# stream.
pub const MAX_UDP_PAYLOAD: usize = 65_527;

/// Longest possible capsule header the decoder ever holds: Type, Length and (for DATAGRAM) the
/// Context ID, each at most an 8-byte varint.
const MAX_HEADER_LEN: usize = 3 * 8;

/// Writes Type=0, Length, Context ID, then payload.
///
/// # Panics
/// If `context_id` exceeds [`varint::MAX`], or the capsule length would.
pub fn encode_datagram(context_id: u64, payload: &[u8], out: &mut impl BufMut) {
    encode_datagram_header(context_id, payload.len(), out);
    out.put_slice(payload);
}

/// Writes only the header (type, length, context id) so callers can place the payload themselves
/// without a copy; returns header length.
///
/// # Panics
/// If `context_id` exceeds [`varint::MAX`], or the capsule length would.
pub fn encode_datagram_header(context_id: u64, payload_len: usize, out: &mut impl BufMut) -> usize {
    // The Capsule Length covers the Context ID as well as the payload: both form the
    // HTTP Datagram Payload that is the DATAGRAM capsule's value.
    let length = varint::encoded_len(context_id) as u64 + payload_len as u64;
    varint::write(DATAGRAM, out);
    varint::write(length, out);
    varint::write(context_id, out);
    varint::encoded_len(DATAGRAM) + varint::encoded_len(length) + varint::encoded_len(context_id)
}

/// Length of the header [`encode_datagram_header`] writes for these arguments.
pub fn datagram_header_len(context_id: u64, payload_len: usize) -> usize {
    let cid_len = varint::encoded_len(context_id);
    varint::encoded_len(DATAGRAM)
        + varint::encoded_len(cid_len as u64 + payload_len as u64)
        + cid_len
}

/// Writes a capsule of any type: Type, Length, then `value`.
///
/// # Panics
/// If `capsule_type` exceeds [`varint::MAX`].
pub fn encode_capsule(capsule_type: u64, value: &[u8], out: &mut impl BufMut) {
    varint::write(capsule_type, out);
    varint::write(value.len() as u64, out);
    out.put_slice(value);
}

/// What the decoder found in the stream.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Event<'a> {
    /// A complete DATAGRAM capsule. `payload` borrows either the caller's input (no copy, the
    /// common case when a whole capsule sits in one read) or the decoder's internal reassembly
    /// buffer.
    Datagram { context_id: u64, payload: &'a [u8] },
    /// A DATAGRAM capsule whose payload length exceeds the decoder's limit. Its bytes are skipped
    /// without being buffered. Reported once, when the context ID is known.
    DatagramTooLarge { context_id: u64, payload_len: u64 },
    /// An unknown capsule type, skipped (RFC 9297 §3.2 MUST). Reported once when its header is
    /// parsed.
    Unknown { capsule_type: u64, length: u64 },
}

/// A stream error: the caller must abort the stream (RFC 9297 §3.3; on HTTP/3 with
/// H3_MESSAGE_ERROR or H3_DATAGRAM_ERROR, on HTTP/2 with RST_STREAM, on HTTP/1.1 by closing).
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum CapsuleError {
    #[error("capsule truncated by end of stream")]
    Truncated,
    #[error("DATAGRAM capsule context ID overruns its length")]
    ContextIdOverrun,
}

/// Where the decoder is in the capsule stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between capsules, or inside a header whose first `hdr_len` bytes are in `hdr`.
    Header,
    /// Copying a split DATAGRAM payload of `payload_len` bytes into `buf`.
    Reassemble { context_id: u64, payload_len: usize },
    /// Discarding `remaining` more bytes of an unknown or oversize capsule.
    Skip { remaining: u64 },
}

/// A parsed capsule header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Datagram { context_id: u64, payload_len: u64 },
    Other { capsule_type: u64, length: u64 },
}

/// Result of parsing a prefix of the stream as a capsule header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    /// The prefix is too short: at least `need` bytes (always at most [`MAX_HEADER_LEN`]) are
    /// required before trying again.
    Incomplete { need: usize },
    /// A whole header of `len` bytes.
    Complete { kind: Kind, len: usize },
}

/// Parses the capsule header at the start of `b`, reporting exactly how many bytes it still needs
/// when `b` is short. That exactness lets the decoder copy only header bytes into its header
/// buffer, never bytes of the value.
fn parse_header(b: &[u8]) -> Result<Parsed, CapsuleError> {
    let Some(&first) = b.first() else {
        return Ok(Parsed::Incomplete { need: 1 });
    };
    let Some((capsule_type, type_len)) = varint::read(b) else {
        return Ok(Parsed::Incomplete {
            need: varint::decoded_len(first),
        });
    };
    let Some(&first) = b.get(type_len) else {
        return Ok(Parsed::Incomplete { need: type_len + 1 });
    };
    let Some((length, length_len)) = varint::read(&b[type_len..]) else {
        return Ok(Parsed::Incomplete {
            need: type_len + varint::decoded_len(first),
        });
    };
    let value_at = type_len + length_len;
    if capsule_type != DATAGRAM {
        return Ok(Parsed::Complete {
            kind: Kind::Other {
                capsule_type,
                length,
            },
            len: value_at,
        });
    }

    //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
    //# Each Capsule's payload MUST contain exactly the fields identified in
    //# its description.  A Capsule payload that contains additional bytes
    //# after the identified fields or a Capsule payload that terminates
    //# before the end of the identified fields MUST be treated as it if
    //# were a malformed or incomplete message.  In particular, redundant
    //# length encodings MUST be verified to be self-consistent.
    //
    // The Context ID (RFC 9298 §5) is the first field of the DATAGRAM value; a Length too short
    // to hold it is known from the Length alone (0) or from the Context ID's first byte, so the
    // error is raised without waiting for the rest.
    if length == 0 {
        return Err(CapsuleError::ContextIdOverrun);
    }
    let Some(&first) = b.get(value_at) else {
        return Ok(Parsed::Incomplete { need: value_at + 1 });
    };
    let cid_len = varint::decoded_len(first);
    if cid_len as u64 > length {
        return Err(CapsuleError::ContextIdOverrun);
    }
    let Some((context_id, _)) = varint::read(&b[value_at..]) else {
        return Ok(Parsed::Incomplete {
            need: value_at + cid_len,
        });
    };
    Ok(Parsed::Complete {
        kind: Kind::Datagram {
            context_id,
            payload_len: length - cid_len as u64,
        },
        len: value_at + cid_len,
    })
}

/// Incremental capsule stream decoder. Feed it the stream's bytes with [`decode`] in whatever
/// chunks they arrive, then call [`finish`] at end of stream.
///
/// [`decode`]: CapsuleDecoder::decode
/// [`finish`]: CapsuleDecoder::finish
pub struct CapsuleDecoder {
    max_payload: usize,
    state: State,
    /// A header split across chunks; at most [`MAX_HEADER_LEN`] bytes.
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: usize,
    /// A DATAGRAM payload split across chunks; never holds (or reserves) more than `max_payload`.
    buf: Vec<u8>,
    poisoned: Option<CapsuleError>,
}

impl std::fmt::Debug for CapsuleDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Payload bytes are not printed: they are user traffic and can be large.
        f.debug_struct("CapsuleDecoder")
            .field("max_payload", &self.max_payload)
            .field("state", &self.state)
            .field("buffered", &self.buffered())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl CapsuleDecoder {
    /// `max_payload`: largest DATAGRAM payload (after the context ID) the decoder will deliver;
    /// larger ones are skipped.
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            state: State::Header,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            buf: Vec::new(),
            poisoned: None,
        }
    }

    /// Feeds one chunk of the stream (any split, down to one byte; several capsules per chunk).
    /// Calls `on_event` for each event in order.
    /// After an error the decoder is poisoned: further calls return the same error.
    ///
    /// Events found in `input` before an error are still delivered.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut on_event: impl FnMut(Event<'_>),
    ) -> Result<(), CapsuleError> {
        if let Some(err) = self.poisoned {
            return Err(err);
        }
        let result = self.run(input, &mut on_event);
        if let Err(err) = result {
            self.poison(err);
        }
        result
    }

    /// End of stream: Err(Truncated) if a capsule is partly received (including a partial header).
    pub fn finish(&mut self) -> Result<(), CapsuleError> {
        if let Some(err) = self.poisoned {
            return Err(err);
        }
        //= https://www.rfc-editor.org/rfc/rfc9297#section-3.3
        //# If the receive side of a stream carrying Capsules is terminated
        //# cleanly (for example, in HTTP/3 this is defined as receiving a
        //# QUIC STREAM frame with the FIN bit set) and the last Capsule on
        //# the stream was truncated, this MUST be treated as if it were a
        //# malformed or incomplete message.
        if self.state == State::Header && self.hdr_len == 0 {
            Ok(())
        } else {
            self.poison(CapsuleError::Truncated);
            Err(CapsuleError::Truncated)
        }
    }

    /// Bytes currently buffered for reassembly (for memory accounting / tests).
    pub fn buffered(&self) -> usize {
        self.hdr_len + self.buf.len()
    }

    fn poison(&mut self, err: CapsuleError) {
        self.poisoned = Some(err);
        self.state = State::Header;
        self.hdr_len = 0;
        // Release the reassembly memory now: a poisoned stream is about to be torn down, but the
        // owner may keep the decoder around until then.
        self.buf = Vec::new();
    }

    fn run<F: FnMut(Event<'_>)>(
        &mut self,
        mut input: &[u8],
        on_event: &mut F,
    ) -> Result<(), CapsuleError> {
        while !input.is_empty() {
            match self.state {
                State::Header => {
                    let Some((kind, rest)) = self.header(input)? else {
                        // Every byte went into the header buffer; wait for more.
                        return Ok(());
                    };
                    input = rest;
                    input = self.begin(kind, input, on_event);
                }
                State::Skip { remaining } => {
                    let take = remaining.min(input.len() as u64);
                    input = &input[take as usize..];
                    self.state = skip_or_header(remaining - take);
                }
                State::Reassemble {
                    context_id,
                    payload_len,
                } => {
                    if self.buf.is_empty() {
                        if let Some((payload, rest)) = input.split_at_checked(payload_len) {
                            // The header ended a chunk and the payload came whole in this one:
                            // still no copy.
                            on_event(Event::Datagram {
                                context_id,
                                payload,
                            });
                            input = rest;
                            self.state = State::Header;
                            continue;
                        }
                        // Reserve exactly the payload (bounded by `max_payload`) so this and
                        // the following chunks never reallocate.
                        self.buf.reserve_exact(payload_len);
                    }
                    let take = (payload_len - self.buf.len()).min(input.len());
                    self.buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if self.buf.len() == payload_len {
                        on_event(Event::Datagram {
                            context_id,
                            payload: &self.buf,
                        });
                        self.buf.clear();
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(())
    }

    /// Parses a header from the header buffer plus `input`. Returns the header and the input left
    /// after it, or `None` when `input` ran out first (its bytes are then in the header buffer).
    fn header<'i>(&mut self, input: &'i [u8]) -> Result<Option<(Kind, &'i [u8])>, CapsuleError> {
        if self.hdr_len == 0 {
            // Fast path: the header is parsed in place, nothing is copied.
            return match parse_header(input)? {
                Parsed::Complete { kind, len } => Ok(Some((kind, &input[len..]))),
                Parsed::Incomplete { .. } => {
                    // `Incomplete` means input is shorter than a header, so it fits.
                    self.hdr[..input.len()].copy_from_slice(input);
                    self.hdr_len = input.len();
                    Ok(None)
                }
            };
        }
        let mut input = input;
        loop {
            match parse_header(&self.hdr[..self.hdr_len])? {
                Parsed::Complete { kind, .. } => {
                    self.hdr_len = 0;
                    return Ok(Some((kind, input)));
                }
                Parsed::Incomplete { need } => {
                    if input.is_empty() {
                        return Ok(None);
                    }
                    // Take only what the header is known to need, so no value byte is copied.
                    let take = (need - self.hdr_len).min(input.len());
                    self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&input[..take]);
                    self.hdr_len += take;
                    input = &input[take..];
                }
            }
        }
    }

    /// Acts on a freshly parsed header; returns the input left after whatever of the capsule's
    /// value was handled right away.
    fn begin<'i, F: FnMut(Event<'_>)>(
        &mut self,
        kind: Kind,
        input: &'i [u8],
        on_event: &mut F,
    ) -> &'i [u8] {
        match kind {
            //= https://www.rfc-editor.org/rfc/rfc9297#section-3.2
            //# Endpoints that receive a Capsule with an unknown Capsule Type MUST
            //# silently drop that Capsule and skip over it to parse the next
            //# Capsule.
            //
            // Reserved greasing types (0x29 * N + 0x17) land here too, as they must.
            Kind::Other {
                capsule_type,
                length,
            } => {
                on_event(Event::Unknown {
                    capsule_type,
                    length,
                });
                self.state = skip_or_header(length);
                input
            }
            Kind::Datagram {
                context_id,
                payload_len,
            } if payload_len > self.max_payload as u64 => {
                //= https://www.rfc-editor.org/rfc/rfc9297#section-3.5
                //# If an incoming DATAGRAM Capsule has a length that is known to
                //# be so large as to not be usable, the implementation SHOULD
                //# discard the Capsule without buffering its contents into memory.
                on_event(Event::DatagramTooLarge {
                    context_id,
                    payload_len,
                });
                self.state = skip_or_header(payload_len);
                input
            }
            Kind::Datagram {
                context_id,
                payload_len,
            } => {
                // Fits under `max_payload`, so it fits in usize.
                let payload_len = payload_len as usize;
                if let Some((payload, rest)) = input.split_at_checked(payload_len) {
                    on_event(Event::Datagram {
                        context_id,
                        payload,
                    });
                    rest
                } else {
                    // The rest of `input` (maybe nothing) is copied by the `Reassemble` state.
                    self.state = State::Reassemble {
                        context_id,
                        payload_len,
                    };
                    input
                }
            }
        }
    }
}

fn skip_or_header(remaining: u64) -> State {
    if remaining == 0 {
        State::Header
    } else {
        State::Skip { remaining }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An [`Event`] that owns its payload and remembers whether the payload borrowed the input.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        Datagram(u64, Vec<u8>),
        TooLarge(u64, u64),
        Unknown(u64, u64),
    }

    fn own(event: Event<'_>) -> Owned {
        match event {
            Event::Datagram {
                context_id,
                payload,
            } => Owned::Datagram(context_id, payload.to_vec()),
            Event::DatagramTooLarge {
                context_id,
                payload_len,
            } => Owned::TooLarge(context_id, payload_len),
            Event::Unknown {
                capsule_type,
                length,
            } => Owned::Unknown(capsule_type, length),
        }
    }

    /// Feeds `input` cut at `cuts` (sorted offsets), then finishes. Also checks the memory bound
    /// after every chunk.
    fn feed(
        max_payload: usize,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<Owned>, Result<(), CapsuleError>) {
        let mut decoder = CapsuleDecoder::new(max_payload);
        let mut events = Vec::new();
        let mut start = 0;
        for end in cuts.iter().copied().chain([input.len()]) {
            let result = decoder.decode(&input[start..end], |e| events.push(own(e)));
            assert!(decoder.buffered() <= max_payload + MAX_HEADER_LEN);
            assert!(decoder.buf.capacity() <= max_payload);
            if result.is_err() {
                return (events, result);
            }
            start = end;
        }
        let result = decoder.finish();
        (events, result)
    }

    fn one_byte_cuts(input: &[u8]) -> Vec<usize> {
        (1..input.len()).collect()
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn datagram(context_id: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_datagram(context_id, payload, &mut out);
        out
    }

    fn capsule(capsule_type: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_capsule(capsule_type, value, &mut out);
        out
    }

    fn is_reserved(capsule_type: u64) -> bool {
        capsule_type >= 0x17 && (capsule_type - 0x17) % 0x29 == 0
    }

    #[test]
    fn encodes_datagram_capsules() {
        assert_eq!(datagram(0, b"abc"), hex("00 04 00 616263"));
        assert_eq!(datagram(0, b""), hex("00 01 00"));
        // A 2-byte context ID counts in the Length.
        assert_eq!(datagram(64, b"x"), hex("00 03 4040 78"));
        // Length crosses into a 2-byte varint at 64.
        let payload = [7u8; 63];
        let bytes = datagram(0, &payload);
        assert_eq!(&bytes[..4], &hex("00 4040 00")[..]);
        assert_eq!(bytes.len(), 4 + 63);
    }

    #[test]
    fn header_len_matches_encoding() {
        for (cid, len) in [
            (0, 0),
            (0, 62),
            (0, 63),
            (63, 1),
            (64, 0),
            (1 << 20, 65_527),
            (varint::MAX, 0),
        ] {
            let mut out = Vec::new();
            let n = encode_datagram_header(cid, len, &mut out);
            assert_eq!(n, out.len());
            assert_eq!(n, datagram_header_len(cid, len));
            let Ok(Parsed::Complete { kind, len: hlen }) = parse_header(&out) else {
                panic!("header for {cid}/{len} did not parse");
            };
            assert_eq!(hlen, n);
            assert_eq!(
                kind,
                Kind::Datagram {
                    context_id: cid,
                    payload_len: len as u64
                }
            );
        }
    }

    #[test]
    fn encodes_generic_capsules() {
        assert_eq!(capsule(0x17, b"hi"), hex("17 02 6869"));
        assert_eq!(capsule(0x40, b""), hex("4040 00"));
    }

    #[test]
    fn whole_capsule_in_one_chunk_borrows_the_input() {
        let input = [datagram(2, b"hello"), datagram(0, b"world!")].concat();
        let range = input.as_ptr_range();
        let mut decoder = CapsuleDecoder::new(1500);
        let mut seen = 0;
        decoder
            .decode(&input, |e| {
                let Event::Datagram { payload, .. } = e else {
                    panic!("unexpected {e:?}");
                };
                assert!(range.contains(&payload.as_ptr()), "payload was copied");
                seen += 1;
            })
            .unwrap();
        assert_eq!(seen, 2);
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.buf.capacity(), 0, "nothing was ever reassembled");
        decoder.finish().unwrap();
    }

    #[test]
    fn split_payload_is_reassembled_then_released() {
        let input = datagram(0, b"split payload");
        let (head, tail) = input.split_at(6);
        let mut decoder = CapsuleDecoder::new(1500);
        let mut events = Vec::new();
        decoder.decode(head, |e| events.push(own(e))).unwrap();
        assert!(events.is_empty());
        assert_eq!(decoder.buffered(), 3, "only the payload bytes so far");
        assert!(decoder.buf.capacity() <= 1500);
        decoder.decode(tail, |e| events.push(own(e))).unwrap();
        assert_eq!(events, [Owned::Datagram(0, b"split payload".to_vec())]);
        assert_eq!(decoder.buffered(), 0);
        decoder.finish().unwrap();
    }

    #[test]
    fn header_split_across_chunks_still_borrows_a_whole_payload() {
        // Header arrives a byte at a time; the payload then arrives whole in one chunk.
        let input = datagram(0x3fff_ffff, b"payload");
        let header_len = datagram_header_len(0x3fff_ffff, 7);
        assert_eq!(header_len, 6);
        let mut decoder = CapsuleDecoder::new(1500);
        for (i, b) in input[..header_len].iter().enumerate() {
            decoder
                .decode(std::slice::from_ref(b), |e| panic!("early {e:?}"))
                .unwrap();
            // Header bytes are held until the header completes, then released.
            let held = if i + 1 < header_len { i + 1 } else { 0 };
            assert_eq!(decoder.buffered(), held);
        }
        let tail = &input[header_len..];
        let mut got = None;
        decoder
            .decode(tail, |e| {
                let Event::Datagram {
                    context_id,
                    payload,
                } = e
                else {
                    panic!("unexpected {e:?}");
                };
                assert_eq!(payload.as_ptr(), tail.as_ptr(), "payload was copied");
                got = Some((context_id, payload.to_vec()));
            })
            .unwrap();
        assert_eq!(got, Some((0x3fff_ffff, b"payload".to_vec())));
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.buf.capacity(), 0, "nothing was reassembled");
    }

    #[test]
    fn eight_byte_varints_split_anywhere() {
        // Type, Length and Context ID all as 8-byte varints (non-minimal for type and length).
        let input = hex("c000000000000000 c000000000000009 c0000000deadbeef 2a");
        let expected = vec![Owned::Datagram(0xdead_beef, vec![0x2a])];
        assert_eq!(feed(16, &input, &[]), (expected.clone(), Ok(())));
        assert_eq!(
            feed(16, &input, &one_byte_cuts(&input)),
            (expected.clone(), Ok(()))
        );
        for cut in 0..=input.len() {
            assert_eq!(
                feed(16, &input, &[cut]),
                (expected.clone(), Ok(())),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn non_minimal_type_zero_is_a_datagram() {
        let input = hex("4000 02 00 ff");
        assert_eq!(
            feed(16, &input, &[]),
            (vec![Owned::Datagram(0, vec![0xff])], Ok(()))
        );
    }

    #[test]
    fn empty_payload_datagram() {
        let input = [datagram(0, b""), datagram(4, b"")].concat();
        let expected = vec![Owned::Datagram(0, vec![]), Owned::Datagram(4, vec![])];
        assert_eq!(feed(0, &input, &[]), (expected.clone(), Ok(())));
        assert_eq!(feed(0, &input, &one_byte_cuts(&input)), (expected, Ok(())));
    }

    #[test]
    fn payload_limit_is_inclusive() {
        let input = [
            datagram(0, &[1; 8]),
            datagram(0, &[2; 9]),
            datagram(0, &[3; 8]),
        ]
        .concat();
        let expected = vec![
            Owned::Datagram(0, vec![1; 8]),
            Owned::TooLarge(0, 9),
            Owned::Datagram(0, vec![3; 8]),
        ];
        assert_eq!(feed(8, &input, &[]), (expected.clone(), Ok(())));
        assert_eq!(feed(8, &input, &one_byte_cuts(&input)), (expected, Ok(())));
    }

    #[test]
    fn unknown_and_reserved_types_are_skipped() {
        let max_n = (varint::MAX - 0x17) / 0x29;
        let reserved: Vec<u64> = [0u64, 1, 2, 3, 100, 1 << 20, 1 << 40, max_n]
            .iter()
            .map(|n| 0x29 * n + 0x17)
            .collect();
        assert_eq!(&reserved[..4], &[0x17, 0x40, 0x69, 0x92]);
        let others = [0x01u64, 0x02, 0x3f, 0xff37a0, 0x3f5a1d, varint::MAX];
        for capsule_type in reserved.iter().chain(&others).copied() {
            assert_eq!(is_reserved(capsule_type), reserved.contains(&capsule_type));
            for value in [&b""[..], b"x", &[0xaa; 300]] {
                let input = [capsule(capsule_type, value), datagram(0, b"after")].concat();
                let expected = vec![
                    Owned::Unknown(capsule_type, value.len() as u64),
                    Owned::Datagram(0, b"after".to_vec()),
                ];
                assert_eq!(feed(64, &input, &[]), (expected.clone(), Ok(())));
                assert_eq!(feed(64, &input, &one_byte_cuts(&input)), (expected, Ok(())));
            }
        }
    }

    #[test]
    fn unknown_capsule_is_never_buffered() {
        let input = capsule(0x40, &[0x55; 4096]);
        let mut decoder = CapsuleDecoder::new(16);
        let mut events = Vec::new();
        for chunk in input.chunks(7) {
            decoder.decode(chunk, |e| events.push(own(e))).unwrap();
            assert!(decoder.buffered() <= 2, "only header bytes may be held");
        }
        assert_eq!(events, [Owned::Unknown(0x40, 4096)]);
        assert_eq!(decoder.buf.capacity(), 0);
        decoder.finish().unwrap();
    }

    #[test]
    fn context_id_overrunning_length_is_an_error() {
        let cases = [
            "00 00",                  // Length 0: no room for any Context ID
            "00 01 4001",             // 2-byte Context ID in a Length of 1
            "00 03 80000001",         // 4-byte Context ID in a Length of 3
            "00 07 c000000000000001", // 8-byte Context ID in a Length of 7
            "4000 4001 4001",         // same, with non-minimal Type and Length
        ];
        for case in cases {
            let input = hex(case);
            assert_eq!(
                feed(64, &input, &[]),
                (vec![], Err(CapsuleError::ContextIdOverrun)),
                "{case}"
            );
            assert_eq!(
                feed(64, &input, &one_byte_cuts(&input)),
                (vec![], Err(CapsuleError::ContextIdOverrun)),
                "{case}"
            );
        }
        // Exactly fitting is fine: a 2-byte Context ID with an empty payload.
        assert_eq!(
            feed(64, &hex("00 02 4001"), &[]),
            (vec![Owned::Datagram(1, vec![])], Ok(()))
        );
    }

    #[test]
    fn overrun_is_raised_before_the_context_id_bytes_arrive() {
        // Type, Length=1 and the first byte of an 8-byte Context ID are enough to know.
        let mut decoder = CapsuleDecoder::new(64);
        assert_eq!(
            decoder.decode(&hex("00 01 c0"), |_| {}),
            Err(CapsuleError::ContextIdOverrun)
        );
    }

    #[test]
    fn events_before_an_error_are_delivered() {
        let input = [datagram(0, b"ok"), hex("00 00")].concat();
        assert_eq!(
            feed(64, &input, &[]),
            (
                vec![Owned::Datagram(0, b"ok".to_vec())],
                Err(CapsuleError::ContextIdOverrun)
            )
        );
    }

    #[test]
    fn poisoned_after_error() {
        let mut decoder = CapsuleDecoder::new(64);
        assert_eq!(
            decoder.decode(&hex("00 00"), |_| {}),
            Err(CapsuleError::ContextIdOverrun)
        );
        let valid = datagram(0, b"x");
        assert_eq!(
            decoder.decode(&valid, |e| panic!("event after error: {e:?}")),
            Err(CapsuleError::ContextIdOverrun)
        );
        assert_eq!(decoder.finish(), Err(CapsuleError::ContextIdOverrun));

        let mut decoder = CapsuleDecoder::new(64);
        decoder.decode(&valid[..2], |_| {}).unwrap();
        assert_eq!(decoder.finish(), Err(CapsuleError::Truncated));
        assert_eq!(decoder.finish(), Err(CapsuleError::Truncated));
        assert_eq!(decoder.decode(&valid, |_| {}), Err(CapsuleError::Truncated));
        assert_eq!(decoder.buffered(), 0, "memory released on poison");
    }

    #[test]
    fn empty_input_is_a_no_op() {
        let mut decoder = CapsuleDecoder::new(64);
        decoder.decode(&[], |e| panic!("{e:?}")).unwrap();
        decoder.finish().unwrap();
        let mut decoder = CapsuleDecoder::new(64);
        decoder.decode(&[0x00], |e| panic!("{e:?}")).unwrap();
        decoder.decode(&[], |e| panic!("{e:?}")).unwrap();
        assert_eq!(decoder.buffered(), 1);
        assert_eq!(decoder.finish(), Err(CapsuleError::Truncated));
    }

    #[test]
    fn truncation_at_every_position() {
        let parts = [
            datagram(0, b"abc"),
            capsule(0x17, b"grease"),
            datagram(0x4000, b""),
            datagram(1, &[9; 70]),
            datagram(0, &[8; 200]), // over the limit below: skipped
        ];
        let mut boundaries = vec![0];
        for part in &parts {
            boundaries.push(boundaries.last().unwrap() + part.len());
        }
        let input = parts.concat();
        for end in 0..=input.len() {
            let expected = if boundaries.contains(&end) {
                Ok(())
            } else {
                Err(CapsuleError::Truncated)
            };
            assert_eq!(feed(100, &input[..end], &[]).1, expected, "prefix {end}");
        }
    }

    #[test]
    fn every_split_point_matches_a_single_feed() {
        let input = [
            datagram(0, b"first"),
            capsule(0x69, b"grease"),
            datagram(2, b""),
            datagram(0, &[0xee; 40]), // too large for the limit of 32 below
            capsule(0xff37a0, b""),
            datagram(0x1234_5678, &[0x11; 32]),
        ]
        .concat();
        let whole = feed(32, &input, &[]);
        assert_eq!(
            whole,
            (
                vec![
                    Owned::Datagram(0, b"first".to_vec()),
                    Owned::Unknown(0x69, 6),
                    Owned::Datagram(2, vec![]),
                    Owned::TooLarge(0, 40),
                    Owned::Unknown(0xff37a0, 0),
                    Owned::Datagram(0x1234_5678, vec![0x11; 32]),
                ],
                Ok(())
            )
        );
        for cut in 0..=input.len() {
            assert_eq!(feed(32, &input, &[cut]), whole, "split at {cut}");
        }
        for a in 0..=input.len() {
            for b in (a..=input.len()).step_by(5) {
                assert_eq!(feed(32, &input, &[a, b]), whole, "split at {a},{b}");
            }
        }
        assert_eq!(feed(32, &input, &one_byte_cuts(&input)), whole);
    }

    #[test]
    fn huge_declared_datagram_is_skipped_without_buffering() {
        // Type 0, Length 2^62-1, Context ID 0: the payload claims 2^62-2 bytes.
        let header = hex("00 ffffffffffffffff 00");
        let mut decoder = CapsuleDecoder::new(MAX_UDP_PAYLOAD);
        let mut events = Vec::new();
        // Feed the header a byte at a time too: a split header must not change anything.
        for b in &header {
            decoder
                .decode(std::slice::from_ref(b), |e| events.push(own(e)))
                .unwrap();
        }
        assert_eq!(events, [Owned::TooLarge(0, varint::MAX - 1)]);
        assert_eq!(decoder.buffered(), 0);
        let chunk = vec![0u8; 4096];
        for _ in 0..256 {
            decoder
                .decode(&chunk, |e| panic!("unexpected {e:?}"))
                .unwrap();
            assert_eq!(decoder.buffered(), 0);
        }
        for _ in 0..100 {
            decoder
                .decode(&[0], |e| panic!("unexpected {e:?}"))
                .unwrap();
        }
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.buf.capacity(), 0);
        assert_eq!(
            decoder.state,
            State::Skip {
                remaining: varint::MAX - 1 - (1 << 20) - 100
            }
        );
        assert_eq!(decoder.finish(), Err(CapsuleError::Truncated));
    }

    #[test]
    fn huge_declared_unknown_capsule_is_skipped_without_buffering() {
        let mut decoder = CapsuleDecoder::new(64);
        let mut events = Vec::new();
        decoder
            .decode(&hex("40 40 ff ff ff ff ff ff ff ff"), |e| {
                events.push(own(e))
            })
            .unwrap();
        assert_eq!(events, [Owned::Unknown(0x40, varint::MAX)]);
        let chunk = vec![0xffu8; 1 << 20];
        decoder
            .decode(&chunk, |e| panic!("unexpected {e:?}"))
            .unwrap();
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.finish(), Err(CapsuleError::Truncated));
    }

    #[test]
    fn too_large_skip_then_next_capsule() {
        let input = [datagram(7, &[1; 100]), datagram(0, b"next")].concat();
        let expected = vec![
            Owned::TooLarge(7, 100),
            Owned::Datagram(0, b"next".to_vec()),
        ];
        assert_eq!(feed(10, &input, &[]), (expected.clone(), Ok(())));
        assert_eq!(feed(10, &input, &one_byte_cuts(&input)), (expected, Ok(())));
    }

    #[test]
    fn reassembly_capacity_stays_within_the_limit() {
        let mut decoder = CapsuleDecoder::new(100);
        for len in [10usize, 100, 50, 99, 100] {
            let input = datagram(0, &vec![3; len]);
            let (a, b) = input.split_at(input.len() / 2);
            let mut got = 0;
            decoder.decode(a, |_| got += 1).unwrap();
            assert!(
                decoder.buf.capacity() <= 100,
                "capacity {}",
                decoder.buf.capacity()
            );
            decoder.decode(b, |_| got += 1).unwrap();
            assert_eq!(got, 1);
        }
    }

    #[test]
    fn debug_does_not_dump_payload() {
        let mut decoder = CapsuleDecoder::new(64);
        decoder
            .decode(&datagram(0, b"secret-bytes")[..6], |_| {})
            .unwrap();
        let text = format!("{decoder:?}");
        assert!(text.contains("buffered: 3"), "{text}");
        assert!(!text.contains("115"), "{text}"); // b's'
    }

    /// One capsule of a generated stream, with how widely to encode each header varint (so
    /// non-minimal encodings are exercised too).
    #[derive(Debug, Clone)]
    enum Cap {
        Datagram {
            context_id: u64,
            payload: Vec<u8>,
            widen: [u8; 3],
        },
        Unknown {
            capsule_type: u64,
            value: Vec<u8>,
            widen: [u8; 2],
        },
    }

    const PROP_MAX_PAYLOAD: usize = 24;

    /// Writes `v` in at least `1 << class` bytes.
    fn put_wide(v: u64, class: u8, out: &mut Vec<u8>) {
        let minimal = varint::encoded_len(v).trailing_zeros() as u8;
        let class = minimal.max(class.min(3));
        let width = 1usize << class;
        let raw = ((u64::from(class) << (8 * width - 2)) | v).to_be_bytes();
        out.extend_from_slice(&raw[8 - width..]);
    }

    impl Cap {
        fn encode(&self, out: &mut Vec<u8>) {
            match self {
                Cap::Datagram {
                    context_id,
                    payload,
                    widen,
                } => {
                    let mut cid = Vec::new();
                    put_wide(*context_id, widen[2], &mut cid);
                    put_wide(DATAGRAM, widen[0], out);
                    put_wide((cid.len() + payload.len()) as u64, widen[1], out);
                    out.extend_from_slice(&cid);
                    out.extend_from_slice(payload);
                }
                Cap::Unknown {
                    capsule_type,
                    value,
                    widen,
                } => {
                    put_wide(*capsule_type, widen[0], out);
                    put_wide(value.len() as u64, widen[1], out);
                    out.extend_from_slice(value);
                }
            }
        }

        fn expected(&self) -> Owned {
            match self {
                Cap::Datagram {
                    context_id,
                    payload,
                    ..
                } if payload.len() > PROP_MAX_PAYLOAD => {
                    Owned::TooLarge(*context_id, payload.len() as u64)
                }
                Cap::Datagram {
                    context_id,
                    payload,
                    ..
                } => Owned::Datagram(*context_id, payload.clone()),
                Cap::Unknown {
                    capsule_type,
                    value,
                    ..
                } => Owned::Unknown(*capsule_type, value.len() as u64),
            }
        }
    }

    fn any_varint() -> impl Strategy<Value = u64> {
        prop_oneof![
            0..64u64,
            64..16_384u64,
            16_384..(1u64 << 30),
            (1u64 << 30)..=varint::MAX
        ]
    }

    fn any_cap() -> impl Strategy<Value = Cap> {
        let unknown_type = prop_oneof![
            (0..1000u64).prop_map(|n| 0x29 * n + 0x17),
            (0..=(varint::MAX - 0x17) / 0x29).prop_map(|n| 0x29 * n + 0x17),
            any_varint().prop_filter("not DATAGRAM", |t| *t != DATAGRAM),
        ];
        prop_oneof![
            3 => (any_varint(), prop::collection::vec(any::<u8>(), 0..=PROP_MAX_PAYLOAD + 8), any::<[u8; 3]>())
                .prop_map(|(context_id, payload, widen)| Cap::Datagram { context_id, payload, widen: widen.map(|w| w % 4) }),
            1 => (unknown_type, prop::collection::vec(any::<u8>(), 0..40), any::<[u8; 2]>())
                .prop_map(|(capsule_type, value, widen)| Cap::Unknown { capsule_type, value, widen: widen.map(|w| w % 4) }),
        ]
    }

    fn stream(caps: &[Cap]) -> (Vec<u8>, Vec<usize>, Vec<Owned>) {
        let mut bytes = Vec::new();
        let mut boundaries = vec![0];
        for cap in caps {
            cap.encode(&mut bytes);
            boundaries.push(bytes.len());
        }
        (bytes, boundaries, caps.iter().map(Cap::expected).collect())
    }

    proptest! {
        #[test]
        fn any_chunking_yields_the_same_events(
            caps in prop::collection::vec(any_cap(), 0..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let (bytes, _, expected) = stream(&caps);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            prop_assert_eq!(feed(PROP_MAX_PAYLOAD, &bytes, &[]), (expected.clone(), Ok(())));
            prop_assert_eq!(feed(PROP_MAX_PAYLOAD, &bytes, &cuts), (expected.clone(), Ok(())));
            prop_assert_eq!(feed(PROP_MAX_PAYLOAD, &bytes, &one_byte_cuts(&bytes)), (expected, Ok(())));
        }

        #[test]
        fn single_feed_never_copies(caps in prop::collection::vec(any_cap(), 0..8)) {
            let (bytes, _, _) = stream(&caps);
            let range = bytes.as_ptr_range();
            let mut decoder = CapsuleDecoder::new(PROP_MAX_PAYLOAD);
            let mut copied = false;
            decoder.decode(&bytes, |e| {
                if let Event::Datagram { payload, .. } = e {
                    // An empty slice may point anywhere; only real bytes count.
                    copied |= !payload.is_empty() && !range.contains(&payload.as_ptr());
                }
            }).unwrap();
            prop_assert!(!copied);
            prop_assert_eq!(decoder.buf.capacity(), 0);
            prop_assert_eq!(decoder.finish(), Ok(()));
        }

        #[test]
        fn truncation_is_detected_except_at_boundaries(caps in prop::collection::vec(any_cap(), 1..5)) {
            let (bytes, boundaries, _) = stream(&caps);
            for end in 0..=bytes.len() {
                let expected = if boundaries.contains(&end) { Ok(()) } else { Err(CapsuleError::Truncated) };
                prop_assert_eq!(feed(PROP_MAX_PAYLOAD, &bytes[..end], &[]).1, expected, "prefix {}", end);
            }
        }

        #[test]
        fn header_helpers_agree(context_id in any_varint(), payload_len in 0usize..100_000) {
            let mut out = Vec::new();
            let n = encode_datagram_header(context_id, payload_len, &mut out);
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(n, datagram_header_len(context_id, payload_len));
            prop_assert_eq!(
                parse_header(&out),
                Ok(Parsed::Complete { kind: Kind::Datagram { context_id, payload_len: payload_len as u64 }, len: n })
            );
        }
    }
}
