//! The properties behind masque-relay's fuzz targets, written once and run two ways:
//!
//! - by the cargo-fuzz binaries in `fuzz_targets/` (this file is the fuzz crate's library), and
//! - by `tests/fuzz_props.rs` in `cargo test`, which includes this file with `#[path]` and drives
//!   the same functions with proptest (arbitrary bytes, mutated seeds, structured inputs).
//!
//! Each function named in [`TARGETS`] is one fuzz target's body: it takes any bytes and panics
//! only when a property of the decoder under test fails. The properties are:
//!
//! - **No panic** on any input, with debug assertions on (cargo fuzz builds with them).
//! - **Chunking does not matter**: a stream decoder fed the input in pieces (one byte at a time,
//!   or pseudo-random sizes including empty pieces) reports exactly what it reports when fed the
//!   input whole, and ends with the same error.
//! - **Memory bounds**: what a decoder buffers stays within its documented limit, and the bytes
//!   it allocates while decoding one input (measured by [`CountingAlloc`] when that is the global
//!   allocator, as it is in the fuzz binaries and in `tests/fuzz_props.rs`) stay within a bound
//!   set by its limits, never by lengths the peer declares.
//! - **Round trips** through the relay's own encoders, where it has one.
//! - **Poisoning**: after an error a decoder keeps returning that error.
//!
//! Input layouts (so seeds can be written by hand; missing parameter bytes read as 0):
//!
//! | target | layout |
//! |---|---|
//! | `varint` | bytes: a sequence of varints |
//! | `capsule` | `mode` u8, `max_payload` u16, capsule stream |
//! | `h3_frame` | `mode` u8, `max_headers` u16, `max_other` u16, `reject` u8, frame stream |
//! | `h3_settings` | SETTINGS payload |
//! | `h3_stream` | `kind` u8, `mode` u8, `max_field_section` u16, stream bytes |
//! | `qpack` | `max_size` u16, encoded field section |
//! | `huffman` | `max_len` u16, Huffman string |
//! | `uri_template` | `template` u8, then a request target; or, for `template` >= the number of fixed templates, `TEMPLATE\nTARGET` |
//! | `target` | `flags` u8, then `HOST\nPORT` |
//! | `http1` | bytes: an HTTP/1.1 request head and whatever follows it |
//!
//! `mode` picks how a stream is cut into chunks (see [`chunks`]); a u16 limit of 0xffff means
//! "no limit" (u64::MAX) where the API takes a u64.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use masque_relay::proto::capsule::{self, CapsuleDecoder, CapsuleError, Event};
use masque_relay::proto::connect_udp::{self, HttpVersion};
use masque_relay::proto::h3::frame::{self, FrameEvent, FrameReader, Settings};
use masque_relay::proto::h3::qpack::{self, Field, QpackError};
use masque_relay::proto::h3::request;
use masque_relay::proto::h3::stream::{
    ControlEvent, ControlStreamReader, PeerUniStreams, QpackDecoderStreamReader,
    QpackEncoderStreamReader, RequestEvent, RequestStreamReader, StreamKind, UniStreamHead,
};
use masque_relay::proto::h3::{self as h3, huffman, H3Error};
use masque_relay::proto::target::{self, Target, TargetError, TargetHost};
use masque_relay::proto::uri_template::{UriTemplate, MAX_REQUEST_TARGET_LEN};
use masque_relay::proto::varint;
use masque_relay::transport::http1::{self, Parsed, MAX_HEAD};

/// A fuzz target: its name (the binary in `fuzz_targets/` and the folder in `corpus/`) and its
/// body.
pub type FuzzTarget = (&'static str, fn(&[u8]));

/// Every fuzz target.
pub const TARGETS: &[FuzzTarget] = &[
    ("varint", varint),
    ("capsule", capsule),
    ("h3_frame", h3_frame),
    ("h3_settings", h3_settings),
    ("h3_stream", h3_stream),
    ("qpack", qpack),
    ("huffman", huffman),
    ("uri_template", uri_template),
    ("target", target),
    ("http1", http1),
];

// ---------------------------------------------------------------------------------------------
// Measuring allocations
// ---------------------------------------------------------------------------------------------

/// A global allocator that forwards to the system allocator and counts, per thread, the bytes
/// live and their peak, so [`measure`] can tell what one decoding allocated.
#[derive(Debug, Clone, Copy)]
pub struct CountingAlloc;

thread_local! {
    // Const-initialized and without destructors: safe to touch from inside the allocator.
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn counted(delta: i64) {
    let _ = LIVE.try_with(|live| {
        let now = live.get().wrapping_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

fn size_delta(size: usize) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// allocator contract is the system allocator's; the counting touches only thread-local cells.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            counted(size_delta(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            counted(size_delta(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, hence from `System`.
        unsafe { System.dealloc(ptr, layout) };
        counted(-size_delta(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` and `layout` come from this allocator, hence from `System`; the rest of
        // the caller's contract is passed on unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            counted(size_delta(new_size) - size_delta(layout.size()));
        }
        p
    }
}

/// Runs `f` and returns its result with the peak number of bytes it had allocated on this
/// thread at any moment (beyond what was live before). `None` when [`CountingAlloc`] is not the
/// global allocator, so nothing can be measured.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<usize>) {
    let live = || LIVE.with(Cell::get);
    let probe_before = live();
    let probe = std::hint::black_box(Vec::<u8>::with_capacity(64));
    let counting = live() >= probe_before + 64;
    drop(probe);
    let base = live();
    PEAK.with(|p| p.set(base));
    let result = f();
    let peak = PEAK.with(Cell::get);
    let grown = usize::try_from(peak - base).unwrap_or(0);
    (result, counting.then_some(grown))
}

/// Fails when a measured peak exceeds `bound`.
fn assert_allocated(what: &str, peak: Option<usize>, bound: usize) {
    if let Some(peak) = peak {
        assert!(
            peak <= bound,
            "{what}: allocated {peak} bytes while decoding, bound {bound}"
        );
    }
}

/// Slack for small fixed allocations (a result vector, an error's string).
const SLACK: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Input helpers
// ---------------------------------------------------------------------------------------------

/// Reads parameters off the front of a fuzz input; missing bytes read as 0.
#[derive(Debug)]
struct Params<'a>(&'a [u8]);

impl<'a> Params<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// A u16 limit parameter as a u64 limit: 0xffff means none.
fn limit(x: u16) -> u64 {
    if x == u16::MAX {
        u64::MAX
    } else {
        u64::from(x)
    }
}

/// Cuts `data` into the chunks a network might deliver. `mode` 0: one chunk; 1: one byte each;
/// anything else: pseudo-random sizes from 0 to a maximum that grows with `mode >> 4`, seeded
/// by `mode`. Empty chunks happen, as they do in real reads.
pub fn chunks(data: &[u8], mode: u8) -> Vec<&[u8]> {
    match mode {
        0 => vec![data],
        1 => data.chunks(1).collect(),
        _ => {
            let mut state = u32::from(mode).wrapping_mul(0x9e37_79b9) | 1;
            let max = usize::from(mode >> 4) * 4 + 2;
            let mut out = Vec::new();
            let mut rest = data;
            while !rest.is_empty() {
                // xorshift32: never zero, so the sizes never all come out 0.
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let n = (state as usize % (max + 1)).min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                out.push(chunk);
                rest = tail;
            }
            out
        }
    }
}

/// Percent-encodes every byte outside RFC 3986 `unreserved` (what a simple-string expansion
/// does), and also the bytes for which `also(byte)` is true; hex digits in upper case unless
/// `lower`.
pub fn percent_encode(value: &[u8], lower: bool, also: impl Fn(u8) -> bool) -> String {
    let mut out = String::new();
    for &b in value {
        let unreserved = b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if unreserved && !also(b) {
            out.push(char::from(b));
        } else if lower {
            out.push_str(&format!("%{b:02x}"));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// varint
// ---------------------------------------------------------------------------------------------

/// Fuzz target `varint`: decodes `data` as consecutive varints, and round-trips every value.
pub fn varint(data: &[u8]) {
    let mut rest = data;
    while let Some(&first) = rest.first() {
        let need = varint::decoded_len(first);
        assert!(matches!(need, 1 | 2 | 4 | 8));
        match varint::read(rest) {
            None => {
                assert!(rest.len() < need, "a whole varint was not read");
                break;
            }
            Some((v, n)) => {
                assert_eq!(n, need);
                assert!(v <= varint::MAX);
                assert!(
                    varint::encoded_len(v) <= n,
                    "minimal encoding longer than this one"
                );
                varint_value(v);
                rest = &rest[n..];
            }
        }
    }
    // The same bytes as values, masked to 62 bits.
    for c in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..c.len()].copy_from_slice(c);
        varint_value(u64::from_be_bytes(b) & varint::MAX);
    }
}

/// Round trips of one value (at most [`varint::MAX`]) through every encoder, and through the
/// non-minimal encodings a receiver must accept.
pub fn varint_value(v: u64) {
    assert!(v <= varint::MAX);
    let mut out = Vec::new();
    varint::write(v, &mut out);
    assert_eq!(out.len(), varint::encoded_len(v));
    assert_eq!(varint::decoded_len(out[0]), out.len());
    assert_eq!(varint::read(&out), Some((v, out.len())));
    let mut slice = [0u8; 8];
    assert_eq!(varint::write_to_slice(v, &mut slice), out.len());
    assert_eq!(&slice[..out.len()], &out[..]);
    for k in 0..out.len() {
        assert_eq!(varint::read(&out[..k]), None, "prefix of {k} bytes");
    }
    // Longer encodings of the same value read back too (RFC 9000 §16).
    for (log, len) in [1usize, 2, 4, 8].into_iter().enumerate() {
        if len < out.len() {
            continue;
        }
        let bytes = ((log as u64) << (8 * len - 2) | v).to_be_bytes();
        let mut long = bytes[8 - len..].to_vec();
        long.extend_from_slice(b"tail");
        assert_eq!(varint::read(&long), Some((v, len)));
    }
}

// ---------------------------------------------------------------------------------------------
// Capsules
// ---------------------------------------------------------------------------------------------

/// Longest capsule header the decoder may hold: three 8-byte varints.
const CAPSULE_HEADER_MAX: usize = 24;

/// A capsule event that owns its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapsuleEvent {
    Datagram(u64, Vec<u8>),
    TooLarge(u64, u64),
    Unknown(u64, u64),
}

/// Everything a capsule decoder said about one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleOutcome {
    pub events: Vec<CapsuleEvent>,
    pub result: Result<(), CapsuleError>,
}

fn own_capsule(event: Event<'_>, max_payload: usize) -> CapsuleEvent {
    match event {
        Event::Datagram {
            context_id,
            payload,
        } => {
            assert!(payload.len() <= max_payload, "delivered over max_payload");
            assert!(context_id <= varint::MAX);
            CapsuleEvent::Datagram(context_id, payload.to_vec())
        }
        Event::DatagramTooLarge {
            context_id,
            payload_len,
        } => {
            assert!(
                payload_len > max_payload as u64,
                "skipped a payload that fits"
            );
            CapsuleEvent::TooLarge(context_id, payload_len)
        }
        Event::Unknown {
            capsule_type,
            length,
        } => {
            assert_ne!(capsule_type, capsule::DATAGRAM);
            CapsuleEvent::Unknown(capsule_type, length)
        }
    }
}

/// Feeds `stream` to a fresh decoder in the chunks `mode` picks, then (if `finish`) ends the
/// stream; checks the buffering bound after every chunk and the poisoning after an error.
pub fn decode_capsules(
    max_payload: usize,
    stream: &[u8],
    mode: u8,
    finish: bool,
) -> CapsuleOutcome {
    let mut decoder = CapsuleDecoder::new(max_payload);
    let mut events = Vec::new();
    let mut result = Ok(());
    for chunk in chunks(stream, mode) {
        result = decoder.decode(chunk, |e| events.push(own_capsule(e, max_payload)));
        assert!(
            decoder.buffered() <= max_payload + CAPSULE_HEADER_MAX,
            "capsule decoder buffers {} bytes, limit {max_payload}",
            decoder.buffered()
        );
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() && finish {
        result = decoder.finish();
    }
    if let Err(err) = result {
        // Poisoned: the same error, no more events, nothing held.
        let n = events.len();
        assert_eq!(
            decoder.decode(&[0, 2, 0, 0], |_| events.push(CapsuleEvent::Unknown(0, 0))),
            Err(err)
        );
        assert_eq!(events.len(), n);
        assert_eq!(decoder.finish(), Err(err));
        assert_eq!(decoder.buffered(), 0);
    }
    let delivered: usize = events
        .iter()
        .map(|e| match e {
            CapsuleEvent::Datagram(_, p) => p.len(),
            _ => 0,
        })
        .sum();
    assert!(delivered <= stream.len(), "more payload than input");
    CapsuleOutcome { events, result }
}

/// The bytes a capsule decoder allocates for `stream`, with a callback that allocates nothing.
fn capsule_peak(max_payload: usize, stream: &[u8], mode: u8) -> Option<usize> {
    let pieces = chunks(stream, mode);
    let mut sink = 0usize;
    let ((), peak) = measure(|| {
        let mut decoder = CapsuleDecoder::new(max_payload);
        for chunk in &pieces {
            let r = decoder.decode(chunk, |e| {
                if let Event::Datagram { payload, .. } = e {
                    sink = sink.wrapping_add(payload.len());
                }
            });
            if r.is_err() {
                return;
            }
        }
        let _ = decoder.finish();
    });
    std::hint::black_box(sink);
    peak
}

/// Fuzz target `capsule`: `mode` u8, `max_payload` u16, then the stream.
pub fn capsule(data: &[u8]) {
    let mut p = Params(data);
    let mode = p.u8();
    let max_payload = usize::from(p.u16());
    let stream = p.rest();
    let whole = decode_capsules(max_payload, stream, 0, true);
    let split = decode_capsules(max_payload, stream, mode, true);
    assert_eq!(
        whole, split,
        "chunking changed what the capsule decoder saw"
    );
    // The relay's own limit, too.
    decode_capsules(capsule::MAX_UDP_PAYLOAD, stream, mode, true);
    // Memory: the reassembly buffer is bounded by max_payload, never by a declared length.
    let peak = capsule_peak(max_payload, stream, mode);
    assert_allocated("capsule decoder", peak, max_payload + SLACK);
}

/// A capsule to encode, for [`capsule_round_trip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capsule {
    Datagram {
        context_id: u64,
        payload: Vec<u8>,
    },
    /// `capsule_type` must not be 0 (DATAGRAM).
    Other {
        capsule_type: u64,
        value: Vec<u8>,
    },
}

/// Encodes `capsules` with the relay's encoders and checks that the decoder gives them back, in
/// any chunking; then that the stream cut at `cut` (modulo its length + 1) is reported truncated
/// exactly when the cut is not between two capsules.
pub fn capsule_round_trip(max_payload: usize, capsules: &[Capsule], mode: u8, cut: usize) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    let mut boundaries = vec![0];
    for c in capsules {
        match c {
            Capsule::Datagram {
                context_id,
                payload,
            } => {
                let mut header = Vec::new();
                let n = capsule::encode_datagram_header(*context_id, payload.len(), &mut header);
                assert_eq!(n, header.len());
                assert_eq!(n, capsule::datagram_header_len(*context_id, payload.len()));
                let before = stream.len();
                capsule::encode_datagram(*context_id, payload, &mut stream);
                assert_eq!(&stream[before..before + n], &header[..]);
                expected.push(if payload.len() <= max_payload {
                    CapsuleEvent::Datagram(*context_id, payload.clone())
                } else {
                    CapsuleEvent::TooLarge(*context_id, payload.len() as u64)
                });
            }
            Capsule::Other {
                capsule_type,
                value,
            } => {
                assert_ne!(*capsule_type, capsule::DATAGRAM);
                capsule::encode_capsule(*capsule_type, value, &mut stream);
                expected.push(CapsuleEvent::Unknown(*capsule_type, value.len() as u64));
            }
        }
        boundaries.push(stream.len());
    }
    for m in [0, 1, mode] {
        let out = decode_capsules(max_payload, &stream, m, true);
        assert_eq!(
            out,
            CapsuleOutcome {
                events: expected.clone(),
                result: Ok(())
            }
        );
    }
    let cut = cut % (stream.len() + 1);
    let out = decode_capsules(max_payload, &stream[..cut], mode, true);
    let complete = boundaries.iter().filter(|&&b| b <= cut).count() - 1;
    assert_eq!(
        &expected[..out.events.len()],
        &out.events[..],
        "events of a cut stream are a prefix of the whole stream's"
    );
    assert!(out.events.len() >= complete);
    if boundaries.contains(&cut) {
        assert_eq!(out.result, Ok(()));
        assert_eq!(out.events.len(), complete);
    } else {
        assert_eq!(out.result, Err(CapsuleError::Truncated));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/3 frames
// ---------------------------------------------------------------------------------------------

/// Longest frame header the reader may hold: two 8-byte varints.
const FRAME_HEADER_MAX: u64 = 16;

/// A frame event that owns its bytes; the DATA pieces of one frame are joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEv {
    Start { ty: u64, len: u64 },
    Data(Vec<u8>),
    Frame { ty: u64, payload: Vec<u8> },
}

/// Everything a [`FrameReader`] said about one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameOutcome {
    pub events: Vec<FrameEv>,
    pub result: Result<(), H3Error>,
}

/// Frame types [`FrameReader`] reassembles and delivers whole.
fn is_buffered_type(ty: u64) -> bool {
    matches!(
        ty,
        frame::HEADERS
            | frame::SETTINGS
            | frame::PUSH_PROMISE
            | frame::GOAWAY
            | frame::MAX_PUSH_ID
            | frame::CANCEL_PUSH
    )
}

/// Feeds `stream` to a fresh reader in the chunks `mode` picks and finishes it. The callback
/// accepts every event except the `reject`-th frame start (counting from 0), which it refuses
/// with a stream error, as a stream state machine would.
pub fn read_frames(
    max_headers: u64,
    max_other: u64,
    reject: Option<usize>,
    stream: &[u8],
    mode: u8,
) -> FrameOutcome {
    let mut reader = FrameReader::new(max_headers, max_other);
    let bound = FRAME_HEADER_MAX.saturating_add(max_headers.max(max_other).max(8));
    let mut events: Vec<FrameEv> = Vec::new();
    let mut starts = 0usize;
    let refused = H3Error::stream(h3::H3_REQUEST_CANCELLED, "refused by the fuzz callback");
    let mut result = Ok(());
    for chunk in chunks(stream, mode) {
        result = reader.push(chunk, &mut |ev| {
            match ev {
                FrameEvent::Start { ty, len } => {
                    assert!(ty <= varint::MAX && len <= varint::MAX);
                    starts += 1;
                    if reject == Some(starts - 1) {
                        return Err(refused.clone());
                    }
                    events.push(FrameEv::Start { ty, len });
                }
                FrameEvent::Data(d) => {
                    assert!(!d.is_empty(), "empty DATA piece");
                    match events.last_mut() {
                        Some(FrameEv::Data(prev)) => prev.extend_from_slice(d),
                        _ => events.push(FrameEv::Data(d.to_vec())),
                    }
                }
                FrameEvent::Frame { ty, payload } => events.push(FrameEv::Frame {
                    ty,
                    payload: payload.to_vec(),
                }),
            }
            Ok(())
        });
        assert!(
            reader.buffered() as u64 <= bound,
            "frame reader buffers {} bytes, bound {bound}",
            reader.buffered()
        );
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = reader.finish();
    }
    if let Err(err) = &result {
        let n = events.len();
        let again = reader.push(&[0x21, 0], &mut |_| panic!("event from a poisoned reader"));
        assert_eq!(again.as_ref(), Err(err));
        assert_eq!(reader.finish().as_ref(), Err(err));
        assert_eq!(reader.buffered(), 0);
        assert_eq!(events.len(), n);
    } else {
        assert!(reader.is_between_frames());
    }
    check_frame_events(&events, result.is_ok());
    FrameOutcome { events, result }
}

/// Every frame's payload matches its header; only the last frame may be incomplete, and only
/// when the stream did not end cleanly.
fn check_frame_events(events: &[FrameEv], clean: bool) {
    let mut i = 0;
    while i < events.len() {
        let FrameEv::Start { ty, len } = events[i] else {
            panic!("payload without a frame header: {:?}", events[i]);
        };
        i += 1;
        let last = |i: usize| i >= events.len();
        if ty == frame::DATA {
            let got = match events.get(i) {
                Some(FrameEv::Data(d)) => {
                    i += 1;
                    d.len() as u64
                }
                _ => 0,
            };
            if clean || !last(i) {
                assert_eq!(got, len, "DATA payload length");
            } else {
                assert!(got <= len);
            }
        } else if is_buffered_type(ty) {
            match events.get(i) {
                Some(FrameEv::Frame { ty: t, payload }) => {
                    assert_eq!(*t, ty);
                    assert_eq!(payload.len() as u64, len, "frame payload length");
                    i += 1;
                }
                Some(other) => panic!("frame {ty:#x} followed by {other:?}"),
                None => assert!(!clean, "frame {ty:#x} never delivered"),
            }
        }
    }
}

/// Fuzz target `h3_frame`: `mode` u8, `max_headers` u16, `max_other` u16, `reject` u8, then the
/// stream. `reject` < 16 refuses that frame start; anything else refuses none.
pub fn h3_frame(data: &[u8]) {
    let mut p = Params(data);
    let mode = p.u8();
    let max_headers = limit(p.u16());
    let max_other = limit(p.u16());
    let reject = p.u8();
    let reject = (reject < 16).then_some(usize::from(reject));
    let stream = p.rest();
    let whole = read_frames(max_headers, max_other, reject, stream, 0);
    let split = read_frames(max_headers, max_other, reject, stream, mode);
    assert_eq!(whole, split, "chunking changed what the frame reader saw");
    // Payloads of control frames go through their decoders.
    for ev in &whole.events {
        if let FrameEv::Frame { ty, payload } = ev {
            match *ty {
                frame::SETTINGS => settings_payload(payload),
                frame::GOAWAY | frame::MAX_PUSH_ID | frame::CANCEL_PUSH => {
                    if let Ok(id) = frame::decode_id_payload(payload) {
                        assert!(id <= varint::MAX);
                    }
                }
                _ => {}
            }
        }
    }
    // Memory: a split frame is reassembled up to its limit (and the bytes that came), never
    // reserved from its declared length.
    let pieces = chunks(stream, mode);
    let ((), peak) = measure(|| {
        let mut reader = FrameReader::new(max_headers, max_other);
        for chunk in &pieces {
            if reader.push(chunk, &mut |_| Ok(())).is_err() {
                return;
            }
        }
        let _ = reader.finish();
    });
    let held = max_headers.max(max_other).min(stream.len() as u64) as usize;
    assert_allocated("frame reader", peak, 2 * held + SLACK);
}

/// A frame to encode, for [`frame_round_trip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Vec<u8>),
    Headers(Vec<u8>),
    Settings {
        settings: Settings,
        seed: u64,
    },
    Goaway(u64),
    /// Becomes a reserved (grease) type chosen by `seed`: always skipped.
    Grease {
        seed: u64,
        payload: Vec<u8>,
    },
}

/// Encodes `frames` with the relay's encoders and checks that a reader without limits gives
/// them back in any chunking, with SETTINGS and GOAWAY payloads decoding to what was encoded.
pub fn frame_round_trip(frames: &[Frame], mode: u8) {
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for f in frames {
        match f {
            Frame::Data(p) => {
                let before = stream.len();
                frame::encode_data_frame_header(p.len() as u64, &mut stream);
                assert_eq!(
                    stream.len() - before,
                    frame::data_frame_header_len(p.len() as u64)
                );
                stream.extend_from_slice(p);
                expected.push(FrameEv::Start {
                    ty: frame::DATA,
                    len: p.len() as u64,
                });
                if !p.is_empty() {
                    expected.push(FrameEv::Data(p.clone()));
                }
            }
            Frame::Headers(p) => {
                frame::encode_headers_frame(p, &mut stream);
                expected.push(FrameEv::Start {
                    ty: frame::HEADERS,
                    len: p.len() as u64,
                });
                expected.push(FrameEv::Frame {
                    ty: frame::HEADERS,
                    payload: p.clone(),
                });
            }
            Frame::Settings { settings, seed } => {
                let mut encoded = Vec::new();
                frame::encode_settings_seeded(settings, *seed, &mut encoded);
                let (ty, n) = varint::read(&encoded).unwrap();
                let (len, m) = varint::read(&encoded[n..]).unwrap();
                assert_eq!(ty, frame::SETTINGS);
                assert_eq!(frame::frame_header_len(ty, len), n + m);
                let payload = encoded[n + m..].to_vec();
                assert_eq!(payload.len() as u64, len);
                let mut want = settings.clone();
                want.grease = false;
                assert_eq!(Settings::decode(&payload), Ok(want));
                stream.extend_from_slice(&encoded);
                expected.push(FrameEv::Start { ty, len });
                expected.push(FrameEv::Frame { ty, payload });
            }
            Frame::Goaway(id) => {
                let mut encoded = Vec::new();
                frame::encode_goaway(*id, &mut encoded);
                let (_, n) = varint::read(&encoded).unwrap();
                let (len, m) = varint::read(&encoded[n..]).unwrap();
                let payload = encoded[n + m..].to_vec();
                assert_eq!(frame::decode_id_payload(&payload), Ok(*id));
                stream.extend_from_slice(&encoded);
                expected.push(FrameEv::Start {
                    ty: frame::GOAWAY,
                    len,
                });
                expected.push(FrameEv::Frame {
                    ty: frame::GOAWAY,
                    payload,
                });
            }
            Frame::Grease { seed, payload } => {
                let ty = h3::grease_value(*seed);
                frame::encode_frame_header(ty, payload.len() as u64, &mut stream);
                stream.extend_from_slice(payload);
                expected.push(FrameEv::Start {
                    ty,
                    len: payload.len() as u64,
                });
            }
        }
    }
    for m in [0, 1, mode] {
        let out = read_frames(u64::MAX, u64::MAX, None, &stream, m);
        assert_eq!(
            out,
            FrameOutcome {
                events: expected.clone(),
                result: Ok(())
            }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// SETTINGS
// ---------------------------------------------------------------------------------------------

fn settings_payload(payload: &[u8]) {
    match Settings::decode(payload) {
        Ok(s) => {
            assert!(!s.grease);
            // What was understood re-encodes and decodes to the same settings.
            settings_round_trip(&s, 0);
            let mut with_grease = s.clone();
            with_grease.grease = true;
            settings_round_trip(&with_grease, payload.len() as u64);
        }
        Err(e) => {
            assert!(e.is_connection());
            assert!(
                e.code == h3::H3_FRAME_ERROR || e.code == h3::H3_SETTINGS_ERROR,
                "unexpected SETTINGS error {e}"
            );
        }
    }
}

/// Fuzz target `h3_settings`: the bytes are a SETTINGS payload.
pub fn h3_settings(data: &[u8]) {
    settings_payload(data);
    // Memory: one identifier per pair at most.
    let (_, peak) = measure(|| Settings::decode(data));
    assert_allocated(
        "Settings::decode",
        peak,
        2 * 8 * (data.len() / 2 + 1) + SLACK,
    );
}

/// Encodes `settings` (values at most [`varint::MAX`]) with a grease setting chosen by `seed`,
/// and checks that the payload decodes to the same settings.
pub fn settings_round_trip(settings: &Settings, seed: u64) {
    let mut encoded = Vec::new();
    frame::encode_settings_seeded(settings, seed, &mut encoded);
    let out = read_frames(0, u64::MAX, None, &encoded, 0);
    assert_eq!(out.result, Ok(()));
    let [FrameEv::Start { ty, .. }, FrameEv::Frame { payload, .. }] = &out.events[..] else {
        panic!("one SETTINGS frame expected: {:?}", out.events);
    };
    assert_eq!(*ty, frame::SETTINGS);
    let mut want = settings.clone();
    want.grease = false;
    assert_eq!(Settings::decode(payload), Ok(want));
}

// ---------------------------------------------------------------------------------------------
// Stream state machines
// ---------------------------------------------------------------------------------------------

/// What a stream reader reported, owning its bytes; DATA pieces are joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEv {
    Kind(StreamKind),
    Control(ControlEvent),
    Headers(Vec<u8>),
    Data(Vec<u8>),
    Trailers(Vec<u8>),
}

/// Everything one stream's reader said, and how it ended (`finish` included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOutcome {
    pub events: Vec<StreamEv>,
    pub result: Result<(), H3Error>,
}

/// The reader for one kind of stream.
#[derive(Debug)]
enum Reader {
    Control(ControlStreamReader),
    Encoder(QpackEncoderStreamReader),
    Decoder(QpackDecoderStreamReader),
    Request(RequestStreamReader),
    /// An unknown unidirectional stream: its bytes are discarded.
    Discard,
}

impl Reader {
    fn push(&mut self, data: &[u8], events: &mut Vec<StreamEv>) -> Result<(), H3Error> {
        match self {
            Reader::Control(r) => r.push(data, |e| events.push(StreamEv::Control(e))),
            Reader::Encoder(r) => r.push(data),
            Reader::Decoder(r) => r.push(data),
            Reader::Request(r) => r.push(data, |e| match e {
                RequestEvent::Headers(b) => events.push(StreamEv::Headers(b.to_vec())),
                RequestEvent::Trailers(b) => events.push(StreamEv::Trailers(b.to_vec())),
                RequestEvent::Data(d) => {
                    assert!(!d.is_empty(), "empty DATA piece");
                    match events.last_mut() {
                        Some(StreamEv::Data(prev)) => prev.extend_from_slice(d),
                        _ => events.push(StreamEv::Data(d.to_vec())),
                    }
                }
            }),
            Reader::Discard => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<(), H3Error> {
        let critical = match self {
            Reader::Control(r) => r.finish(),
            Reader::Encoder(r) => r.finish(),
            Reader::Decoder(r) => r.finish(),
            Reader::Request(r) => return r.finish(),
            Reader::Discard => return Ok(()),
        };
        // A critical stream may never end.
        assert_eq!(
            critical.as_ref().map_err(|e| e.code),
            Err(h3::H3_CLOSED_CRITICAL_STREAM)
        );
        critical
    }
}

/// Which stream [`read_stream`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamSel {
    /// A client unidirectional stream from its first byte: the type, then that stream's reader.
    Uni,
    Control,
    QpackEncoder,
    QpackDecoder,
    /// A request stream with this HEADERS size limit.
    Request(u64),
}

/// Feeds `stream` to the reader `sel` names, in the chunks `mode` picks, then ends the stream.
pub fn read_stream(sel: StreamSel, stream: &[u8], mode: u8) -> StreamOutcome {
    let mut events = Vec::new();
    let mut head = UniStreamHead::new();
    let mut reader = match sel {
        StreamSel::Uni => None,
        StreamSel::Control => Some(Reader::Control(ControlStreamReader::new())),
        StreamSel::QpackEncoder => Some(Reader::Encoder(QpackEncoderStreamReader::new())),
        StreamSel::QpackDecoder => Some(Reader::Decoder(QpackDecoderStreamReader::new())),
        StreamSel::Request(max) => Some(Reader::Request(RequestStreamReader::new(max))),
    };
    let mut result = Ok(());
    for chunk in chunks(stream, mode) {
        let mut body = chunk;
        if reader.is_none() {
            let Some((kind, used)) = head.push(chunk) else {
                continue;
            };
            assert!(used <= chunk.len());
            assert_eq!(head.push(b"more"), Some((kind, 0)), "the type is read once");
            body = &chunk[used..];
            events.push(StreamEv::Kind(kind));
            let mut peers = PeerUniStreams::new();
            let accepted = peers.accept(kind);
            reader = Some(match kind {
                StreamKind::Control => Reader::Control(ControlStreamReader::new()),
                StreamKind::QpackEncoder => Reader::Encoder(QpackEncoderStreamReader::new()),
                StreamKind::QpackDecoder => Reader::Decoder(QpackDecoderStreamReader::new()),
                StreamKind::Push => {
                    assert!(accepted.is_err(), "a client push stream was accepted");
                    result = accepted;
                    break;
                }
                StreamKind::Unknown(ty) => {
                    assert!(ty > h3::STREAM_QPACK_DECODER);
                    Reader::Discard
                }
            });
            assert_eq!(accepted, Ok(()));
            if !matches!(kind, StreamKind::Unknown(_)) {
                assert!(peers.accept(kind).is_err(), "a second critical stream");
            }
        }
        let r = reader.as_mut().expect("reader chosen above");
        result = r.push(body, &mut events);
        if let Err(err) = &result {
            let n = events.len();
            assert_eq!(r.push(b"\x00\x04\x00", &mut events).as_ref(), Err(err));
            assert_eq!(events.len(), n, "events from a poisoned reader");
            break;
        }
    }
    if result.is_ok() {
        if let Some(r) = reader.as_mut() {
            result = r.finish();
        }
    }
    StreamOutcome { events, result }
}

/// The rest of the request pipeline, as the HTTP/3 transport runs it: QPACK-decode the header
/// section, parse the request, check it against the default template; decode trailers; run the
/// DATA through the capsule decoder.
fn request_pipeline(events: &[StreamEv], mode: u8, max_field_section: u64) {
    let template: UriTemplate = TEMPLATES[0].parse().unwrap();
    for ev in events {
        match ev {
            StreamEv::Headers(block) => {
                if let Ok(fields) = qpack::decode_field_section(block, max_field_section) {
                    if let Ok(req) = request::parse_request(&fields) {
                        let head = req.as_connect_udp();
                        assert_eq!(head.version, HttpVersion::Http3);
                        if let Ok(t) = connect_udp::check_request(&head, &template) {
                            assert_ne!(t.port, 0);
                        }
                    }
                }
            }
            StreamEv::Trailers(block) => {
                if let Ok(fields) = qpack::decode_field_section(block, max_field_section) {
                    let _ = request::check_trailers(&fields);
                }
            }
            StreamEv::Data(data) => {
                decode_capsules(capsule::MAX_UDP_PAYLOAD, data, mode, true);
            }
            StreamEv::Kind(_) | StreamEv::Control(_) => {}
        }
    }
}

/// Fuzz target `h3_stream`: `kind` u8 (modulo 5: unidirectional from its type byte, control,
/// QPACK encoder, QPACK decoder, request), `mode` u8, `max_field_section` u16, then the bytes.
pub fn h3_stream(data: &[u8]) {
    let mut p = Params(data);
    let kind = p.u8();
    let mode = p.u8();
    let max = limit(p.u16());
    let stream = p.rest();
    let sel = match kind % 5 {
        0 => StreamSel::Uni,
        1 => StreamSel::Control,
        2 => StreamSel::QpackEncoder,
        3 => StreamSel::QpackDecoder,
        _ => StreamSel::Request(max),
    };
    let whole = read_stream(sel, stream, 0);
    let split = read_stream(sel, stream, mode);
    assert_eq!(whole, split, "chunking changed what the stream reader saw");
    if let Err(e) = &whole.result {
        assert_ne!(e.code, h3::H3_NO_ERROR);
    }
    if sel == StreamSel::Request(max) {
        request_pipeline(&whole.events, mode, max.min(1 << 16));
    }
}

// ---------------------------------------------------------------------------------------------
// QPACK and Huffman
// ---------------------------------------------------------------------------------------------

/// Decodes `block` with and without the limit `max_size` and checks that the limit is exact:
/// a section whose decoded size fits decodes the same, one that does not is `TooLarge`; what
/// decodes re-encodes to a block that decodes the same.
pub fn qpack_block(block: &[u8], max_size: u64) {
    let unlimited = qpack::decode_field_section(block, u64::MAX);
    let limited = qpack::decode_field_section(block, max_size);
    if let Err(e) = &limited {
        // Every error maps to an HTTP/3 error; TooLarge only resets the stream.
        let h3e = H3Error::from(*e);
        assert_eq!(h3e.is_connection(), *e != QpackError::TooLarge);
    }
    match &unlimited {
        Ok(fields) => {
            let total: u64 = fields.iter().map(Field::size).sum();
            if total <= max_size {
                assert_eq!(
                    &limited, &unlimited,
                    "a section within the limit was refused"
                );
            } else {
                assert_eq!(limited, Err(QpackError::TooLarge));
            }
            assert_eq!(
                qpack::decode_field_section(block, total).as_ref(),
                Ok(fields)
            );
            if total > 0 {
                assert_eq!(
                    qpack::decode_field_section(block, total - 1),
                    Err(QpackError::TooLarge),
                    "the limit is not exact"
                );
            }
            qpack_round_trip(fields);
        }
        Err(QpackError::TooLarge) => panic!("TooLarge without a limit"),
        Err(QpackError::DecompressionFailed(_)) => {
            assert!(limited.is_err(), "a limit made a bad block decode");
        }
    }
}

/// Encodes `fields` with the relay's encoder, and again with Huffman-coded literal names and
/// values, and checks that both decode to `fields` exactly at their size.
pub fn qpack_round_trip(fields: &[Field]) {
    let total: u64 = fields.iter().map(Field::size).sum();
    let pairs: Vec<(&[u8], &[u8])> = fields.iter().map(|f| (&f.name[..], &f.value[..])).collect();
    let mut plain = Vec::new();
    qpack::encode_field_section(&pairs, &mut plain);
    assert_eq!(
        qpack::decode_field_section(&plain, total).as_ref(),
        Ok(&fields.to_vec())
    );
    let mut coded = vec![0, 0];
    for f in fields {
        // Literal Field Line with Literal Name: 0 0 1 N H NameLen(3+), then H ValueLen(7+).
        huffman_literal(&f.name, 3, 0b0010_1000, &mut coded);
        huffman_literal(&f.value, 7, 0b1000_0000, &mut coded);
    }
    assert_eq!(
        qpack::decode_field_section(&coded, total).as_ref(),
        Ok(&fields.to_vec())
    );
    if total > 0 {
        assert_eq!(
            qpack::decode_field_section(&coded, total - 1),
            Err(QpackError::TooLarge)
        );
    }
}

/// Writes a Huffman-coded string literal: `flags` (with the H bit) above a `prefix`-bit length.
fn huffman_literal(s: &[u8], prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let mut coded = Vec::new();
    huffman::encode(s, &mut coded);
    prefix_int(coded.len() as u64, prefix, flags, out);
    out.extend_from_slice(&coded);
}

/// RFC 7541 §5.1 prefixed integer.
fn prefix_int(value: u64, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1u64 << prefix) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Fuzz target `qpack`: `max_size` u16, then an encoded field section.
pub fn qpack(data: &[u8]) {
    let mut p = Params(data);
    let max_size = u64::from(p.u16());
    let block = p.rest();
    qpack_block(block, max_size);
    // Memory: bounded by the decoded-size limit (fields, their strings, the vector's growth)
    // plus what Huffman decoding reserves, at most 8/5 of the block's bytes; never by a length
    // the block declares.
    let (_, peak) = measure(|| qpack::decode_field_section(block, max_size));
    let bound = 4 * max_size as usize + 2 * block.len() + SLACK;
    assert_allocated("QPACK decoder", peak, bound);
}

/// Decodes `input` with the limit `max_len` and checks: the output fits the limit; what decodes
/// re-encodes to exactly `input` (the padding a decoder accepts is the one an encoder writes);
/// a limit below the decoded length is `TooLong`.
pub fn huffman_string(input: &[u8], max_len: usize) {
    let mut out = b"prefix".to_vec();
    let limited = huffman::decode(input, max_len, &mut out);
    let mut full = Vec::new();
    let unlimited = huffman::decode(input, usize::MAX, &mut full);
    match unlimited {
        Ok(()) => {
            let mut again = Vec::new();
            huffman::encode(&full, &mut again);
            assert_eq!(again, input, "decode then encode is not the identity");
            assert_eq!(huffman::encoded_len(&full), input.len());
            if full.len() <= max_len {
                assert_eq!(limited, Ok(()));
                assert_eq!(&out[6..], &full[..], "output appended after what was there");
            } else {
                assert_eq!(limited, Err(huffman::HuffmanError::TooLong));
            }
        }
        Err(huffman::HuffmanError::TooLong) => panic!("TooLong without a limit"),
        Err(_) => assert!(limited.is_err()),
    }
    assert!(out.len() - 6 <= max_len, "output over the limit");
    assert_eq!(&out[..6], b"prefix");
}

/// Encodes `s` and checks that it decodes back, and that [`huffman::encoded_len`] is right.
pub fn huffman_round_trip(s: &[u8]) {
    let mut coded = Vec::new();
    huffman::encode(s, &mut coded);
    assert_eq!(coded.len(), huffman::encoded_len(s));
    let mut out = Vec::new();
    assert_eq!(huffman::decode(&coded, s.len(), &mut out), Ok(()));
    assert_eq!(out, s);
    if !s.is_empty() {
        out.clear();
        assert_eq!(
            huffman::decode(&coded, s.len() - 1, &mut out),
            Err(huffman::HuffmanError::TooLong)
        );
    }
}

/// Fuzz target `huffman`: `max_len` u16, then a Huffman string; the string's bytes are also
/// encoded and decoded back.
pub fn huffman(data: &[u8]) {
    let mut p = Params(data);
    let max_len = usize::from(p.u16());
    let input = p.rest();
    huffman_string(input, max_len);
    huffman_round_trip(input);
    let mut out = Vec::new();
    let (_, peak) = measure(|| huffman::decode(input, max_len, &mut out));
    assert_allocated(
        "Huffman decoder",
        peak,
        max_len.min(input.len() * 8 / 5) + SLACK,
    );
}

// ---------------------------------------------------------------------------------------------
// URI template and targets
// ---------------------------------------------------------------------------------------------

/// Templates the `uri_template` target matches against; the first is the relay's default.
pub const TEMPLATES: &[&str] = &[
    "/.well-known/masque/udp/{target_host}/{target_port}/",
    "https://proxy.example.org:4443/masque{?target_host,target_port}",
    "/masque?h={target_host}&p={target_port}",
    "/udp/{target_host,target_port}/",
    "/udp/{target_host}.{target_port}",
    "/udp?v=1&flag{&target_host,target_port}",
    "/udp/{target_host}?port={target_port}",
    "/udp?target=x{target_host}y&port={target_port}",
    "/v/{version}/{target_host}/{target_port}/",
    "/{a}.{target_host}.{target_port}/x",
    // Level 3 operators RFC 9298 forbids but `parse_level3` accepts.
    "/p/{+target_host}/{target_port}",
    "/p{/target_host,target_port}",
    "/p{;target_host,target_port}/",
    "/p/x{.target_host}/{target_port}",
];

/// Parses `s` both as a CONNECT-UDP and as a level-3 template; checks they agree.
pub fn parse_template(s: &str) -> Option<UriTemplate> {
    let connect_udp = s.parse::<UriTemplate>();
    let level3 = UriTemplate::parse_level3(s);
    if let Ok(t) = &connect_udp {
        assert_eq!(t.as_str(), s);
        assert!(
            level3.is_ok(),
            "a CONNECT-UDP template is a level-3 template"
        );
    }
    if let Ok(t) = &level3 {
        assert_eq!(t.as_str(), s);
        if let Some(a) = t.authority() {
            assert!(!a.is_empty() && s.contains(a));
        }
    }
    connect_udp.or(level3).ok()
}

/// Matches `path` against `template`; a match's values are slices of `path`, and go on to
/// [`target_strings`].
pub fn match_and_parse(template: &UriTemplate, path: &str) {
    let (m, peak) = measure(|| template.match_path(path));
    assert_allocated("URI template match", peak, 16 * path.len() + 64 * 1024);
    let Some(m) = m else { return };
    assert!(path.len() <= MAX_REQUEST_TARGET_LEN && !path.contains('#'));
    let range = path.as_ptr() as usize..=path.as_ptr() as usize + path.len();
    // An empty value may be any empty string; a non-empty one must be a slice of the target.
    for v in [m.target_host, m.target_port].into_iter().flatten() {
        if v.is_empty() {
            continue;
        }
        let start = v.as_ptr() as usize;
        assert!(
            range.contains(&start) && range.contains(&(start + v.len())),
            "a matched value is not part of the request target"
        );
    }
    target_strings(m.target_host, m.target_port);
}

/// Fuzz target `uri_template`: `template` u8, then a request target; for `template` past the
/// fixed list, `TEMPLATE\nTARGET` (both parsed as text, invalid UTF-8 replaced).
pub fn uri_template(data: &[u8]) {
    let mut p = Params(data);
    let which = usize::from(p.u8());
    let text = String::from_utf8_lossy(p.rest());
    if let Some(t) = TEMPLATES.get(which) {
        let template = parse_template(t).expect("fixed templates parse");
        match_and_parse(&template, &text);
    } else {
        let (t, path) = text.split_once('\n').unwrap_or((&*text, ""));
        if let Some(template) = parse_template(t) {
            match_and_parse(&template, path);
        }
    }
}

/// A valid target as the client means it, with how to spell it in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpelling {
    pub target: Target,
    /// Also percent-encode these (otherwise unreserved) characters of the host.
    pub encode_extra: Vec<u8>,
    /// Lower-case hex digits in escapes.
    pub lower_hex: bool,
    /// Leading zeros before the port.
    pub port_zeros: usize,
}

impl TargetSpelling {
    /// The raw `target_host` and `target_port` values a client would put in the URI.
    pub fn raw(&self) -> (String, String) {
        let host = match &self.target.host {
            TargetHost::Ip(ip) => ip.to_string(),
            TargetHost::Name(n) => n.clone(),
        };
        let host = percent_encode(host.as_bytes(), self.lower_hex, |b| {
            self.encode_extra.contains(&b)
        });
        let port = format!("{}{}", "0".repeat(self.port_zeros), self.target.port);
        (host, port)
    }
}

/// Expands a few templates with the spelled target, matches each, and checks that the raw
/// values come back and parse to the target.
pub fn target_round_trip(spelling: &TargetSpelling) {
    let (host, port) = spelling.raw();
    assert_eq!(
        target::parse_target(Some(&host), Some(&port)),
        Ok(spelling.target.clone()),
        "{host:?} {port:?}"
    );
    let expansions = [
        (
            TEMPLATES[0],
            format!("/.well-known/masque/udp/{host}/{port}/"),
        ),
        (
            TEMPLATES[1],
            format!("/masque?target_host={host}&target_port={port}"),
        ),
        (
            TEMPLATES[1],
            format!("/masque?target_port={port}&x=y&target_host={host}"),
        ),
        (TEMPLATES[2], format!("/masque?h={host}&p={port}")),
        (TEMPLATES[3], format!("/udp/{host},{port}/")),
    ];
    for (t, path) in expansions {
        let template = parse_template(t).unwrap();
        let m = template
            .match_path(&path)
            .unwrap_or_else(|| panic!("{t} did not match {path}"));
        assert_eq!(m.target_host, Some(&host[..]), "{path}");
        assert_eq!(m.target_port, Some(&port[..]), "{path}");
        match_and_parse(&template, &path);
    }
    target_strings(Some(&host), Some(&port));
}

/// Checks [`target::parse_target`] on raw values: a target it accepts has a port, a host in one
/// of the three forms, and is accepted again when spelled canonically.
pub fn target_strings(host: Option<&str>, port: Option<&str>) {
    let (parsed, peak) = measure(|| target::parse_target(host, port));
    let len = host.map_or(0, str::len) + port.map_or(0, str::len);
    assert_allocated("parse_target", peak, 4 * len + SLACK);
    for raw in [host, port].into_iter().flatten() {
        if let Ok(decoded) = target::percent_decode(raw) {
            assert!(decoded.len() <= raw.len());
            let again = percent_encode(&decoded, false, |_| false);
            assert_eq!(target::percent_decode(&again), Ok(decoded));
        }
    }
    match parsed {
        Ok(t) => {
            assert_ne!(t.port, 0);
            match &t.host {
                TargetHost::Ip(IpAddr::V4(ip)) => {
                    assert_eq!(t.ip_socket_addr().map(|a| a.ip()), Some(IpAddr::V4(*ip)))
                }
                TargetHost::Ip(IpAddr::V6(_)) => assert!(t.to_string().starts_with('[')),
                TargetHost::Name(n) => {
                    assert!(n.is_ascii() && !n.is_empty() && n.len() <= 254, "{n:?}");
                    assert!(n.parse::<Ipv4Addr>().is_err() && n.parse::<Ipv6Addr>().is_err());
                    assert!(t.ip_socket_addr().is_none());
                }
            }
            let canonical = TargetSpelling {
                target: t.clone(),
                encode_extra: Vec::new(),
                lower_hex: false,
                port_zeros: 0,
            };
            let (h, p) = canonical.raw();
            assert_eq!(target::parse_target(Some(&h), Some(&p)), Ok(t));
        }
        Err(e) => {
            if host.is_none() {
                assert_eq!(e, TargetError::MissingHost);
            }
        }
    }
}

/// Fuzz target `target`: `flags` u8 (bit 0: no host, bit 1: no port), then `HOST\nPORT`.
pub fn target(data: &[u8]) {
    let mut p = Params(data);
    let flags = p.u8();
    let text = String::from_utf8_lossy(p.rest());
    let (host, port) = text.split_once('\n').unwrap_or((&*text, ""));
    let host = (flags & 1 == 0).then_some(host);
    let port = (flags & 2 == 0).then_some(port);
    target_strings(host, port);
}

/// A whole CONNECT-UDP request stream built with the relay's encoders (HEADERS for the spelled
/// target, then `capsules` in one DATA frame) read back through the request stream reader, the
/// QPACK decoder, the request parser and `check_request`, and the capsule decoder.
pub fn request_round_trip(spelling: &TargetSpelling, capsules: &[Capsule], mode: u8) {
    let (host, port) = spelling.raw();
    let path = format!("/.well-known/masque/udp/{host}/{port}/");
    let mut block = Vec::new();
    qpack::encode_field_section(
        &[
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-udp"),
            (b":scheme", b"https"),
            (b":authority", b"relay.example:443"),
            (b":path", path.as_bytes()),
            (b"capsule-protocol", b"?1"),
        ],
        &mut block,
    );
    let mut data = Vec::new();
    let mut expected = Vec::new();
    for c in capsules {
        match c {
            Capsule::Datagram {
                context_id,
                payload,
            } => {
                capsule::encode_datagram(*context_id, payload, &mut data);
                expected.push(if payload.len() <= capsule::MAX_UDP_PAYLOAD {
                    CapsuleEvent::Datagram(*context_id, payload.clone())
                } else {
                    CapsuleEvent::TooLarge(*context_id, payload.len() as u64)
                });
            }
            Capsule::Other {
                capsule_type,
                value,
            } => {
                capsule::encode_capsule(*capsule_type, value, &mut data);
                expected.push(CapsuleEvent::Unknown(*capsule_type, value.len() as u64));
            }
        }
    }
    let mut stream = Vec::new();
    frame::encode_headers_frame(&block, &mut stream);
    frame::encode_data_frame_header(data.len() as u64, &mut stream);
    stream.extend_from_slice(&data);
    let out = read_stream(StreamSel::Request(16384), &stream, mode);
    let mut want = vec![StreamEv::Headers(block.clone())];
    if !data.is_empty() {
        want.push(StreamEv::Data(data.clone()));
    }
    assert_eq!(
        out,
        StreamOutcome {
            events: want,
            result: Ok(())
        }
    );
    let fields = qpack::decode_field_section(&block, 16384).unwrap();
    let req = request::parse_request(&fields).unwrap();
    let template: UriTemplate = TEMPLATES[0].parse().unwrap();
    assert_eq!(
        connect_udp::check_request(&req.as_connect_udp(), &template),
        Ok(spelling.target.clone())
    );
    let caps = decode_capsules(capsule::MAX_UDP_PAYLOAD, &data, mode, true);
    assert_eq!(
        caps,
        CapsuleOutcome {
            events: expected,
            result: Ok(())
        }
    );
    request_pipeline(&out.events, mode, 16384);
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 upgrade requests
// ---------------------------------------------------------------------------------------------

/// Parses `buf` as a request head and checks: a complete head ends inside `buf` and parses the
/// same from exactly its bytes or with more bytes after it (capsules); no prefix of it is
/// complete; a partial head is shorter than the limit. A complete head goes on to
/// [`connect_udp::check_request`] with the default template.
pub fn http1_head(buf: &[u8]) {
    let (parsed, peak) = measure(|| http1::parse_head(buf));
    assert_allocated("parse_head", peak, 4 * buf.len() + SLACK);
    match parsed {
        Parsed::Complete(head) => {
            assert!(head.len > 0 && head.len <= buf.len());
            assert_eq!(
                http1::parse_head(&buf[..head.len]),
                Parsed::Complete(head.clone())
            );
            let mut longer = buf.to_vec();
            longer.extend_from_slice(b"\x00\x04\x00\x2a\r\n\r\n");
            assert_eq!(http1::parse_head(&longer), Parsed::Complete(head.clone()));
            assert!(
                !matches!(http1::parse_head(&buf[..head.len - 1]), Parsed::Complete(_)),
                "a head complete before its end"
            );
            let template: UriTemplate = TEMPLATES[0].parse().unwrap();
            let req = connect_udp::RequestHead {
                version: HttpVersion::Http11,
                method: &head.method,
                protocol: head.upgrade.as_deref(),
                scheme: None,
                authority: head.host.as_deref(),
                path: Some(&head.path),
                capsule_protocol: head.capsule_protocol.as_deref(),
            };
            match connect_udp::check_request(&req, &template) {
                Ok(t) => {
                    assert_eq!(head.method, "GET");
                    assert_ne!(t.port, 0);
                }
                Err(r) => assert!((400..=599).contains(&r.status), "status {}", r.status),
            }
        }
        Parsed::Partial => assert!(buf.len() < MAX_HEAD),
        Parsed::Error(status, _) => assert!((400..=599).contains(&status)),
    }
}

/// Fuzz target `http1`: the bytes are what a client sent on the connection.
pub fn http1(data: &[u8]) {
    http1_head(data);
}

/// An HTTP/1.1 upgrade request to build, for [`http1_round_trip`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H1Request {
    pub method: String,
    /// Origin form: `/path?query`.
    pub path: String,
    /// Send the target in absolute form (`https://AUTHORITY/path`) with this authority.
    pub absolute: Option<String>,
    pub host: Option<String>,
    pub connection_upgrade: bool,
    pub upgrade: Option<String>,
    pub capsule_protocol: Option<String>,
    /// Other header fields; names must not be ones `parse_head` looks at.
    pub extra: Vec<(String, String)>,
    /// Bytes after the head (capsules).
    pub after: Vec<u8>,
}

/// Writes the request, parses it, and checks every field `parse_head` returns.
pub fn http1_round_trip(r: &H1Request) {
    let target = match &r.absolute {
        Some(a) => format!("https://{a}{}", r.path),
        None => r.path.clone(),
    };
    let mut head = format!("{} {target} HTTP/1.1\r\n", r.method);
    if let Some(h) = &r.host {
        head.push_str(&format!("Host: {h}\r\n"));
    }
    let connection = if r.connection_upgrade {
        "keep-alive, Upgrade"
    } else {
        "keep-alive"
    };
    head.push_str(&format!("Connection: {connection}\r\n"));
    if let Some(u) = &r.upgrade {
        head.push_str(&format!("Upgrade: {u}\r\n"));
    }
    if let Some(c) = &r.capsule_protocol {
        head.push_str(&format!("Capsule-Protocol: {c}\r\n"));
    }
    for (n, v) in &r.extra {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut buf = head.clone().into_bytes();
    buf.extend_from_slice(&r.after);
    // Field by field, so fields added to `Head` later need no change here.
    let Parsed::Complete(got) = http1::parse_head(&buf) else {
        panic!("not complete: {head:?}");
    };
    assert_eq!(got.method, r.method);
    assert_eq!(got.path, r.path);
    assert_eq!(got.host, r.absolute.clone().or_else(|| r.host.clone()));
    assert_eq!(got.connection_upgrade, r.connection_upgrade);
    assert_eq!(got.upgrade, r.upgrade);
    assert_eq!(
        got.capsule_protocol,
        r.capsule_protocol.clone().map(String::into_bytes)
    );
    assert_eq!(got.len, head.len());
    http1_head(&buf);
    for cut in [0, head.len() / 2, head.len() - 1] {
        assert_eq!(
            http1::parse_head(&buf[..cut]),
            Parsed::Partial,
            "cut at {cut}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// Small, valid (and a few famously invalid) inputs per target, built with the relay's encoders,
/// from which the committed corpora were grown. `tests/fuzz_props.rs` runs them every time.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out: Vec<(&'static str, Vec<u8>)> = Vec::new();
    let cat = |parts: &[&[u8]]| parts.concat();

    // varint: the RFC 9000 Appendix A.1 examples.
    out.push((
        "varint",
        cat(&[
            &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
            &[0x9d, 0x7f, 0x3e, 0x7d],
            &[0x7b, 0xbd, 0x25, 0x40, 0x25],
        ]),
    ));

    // capsule: datagrams, an unknown capsule, an oversize one, and the SECURITY.md abuse cases.
    let mut caps = Vec::new();
    capsule::encode_datagram(0, b"hello", &mut caps);
    capsule::encode_capsule(0x2a, b"grease", &mut caps);
    capsule::encode_datagram(7, &[0xab; 40], &mut caps);
    capsule::encode_datagram(0, &[1; 300], &mut caps);
    out.push(("capsule", cat(&[&[3, 0x01, 0x00], &caps])));
    out.push(("capsule", cat(&[&[1, 0x00, 0x10], &caps])));
    // DATAGRAM declaring 2^62-1 bytes; context ID overrunning Length; a truncated capsule.
    out.push((
        "capsule",
        vec![
            0x45, 0xff, 0xff, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 1, 2,
        ],
    ));
    out.push(("capsule", vec![0, 0x04, 0x00, 0x00, 0x01, 0x40]));
    out.push(("capsule", vec![0x20, 0xff, 0xff, 0x00, 0x0a, 0x00, 1, 2, 3]));

    // h3_frame: the frames a client sends.
    let mut frames = Vec::new();
    frame::encode_settings(
        &Settings {
            h3_datagram: true,
            enable_connect_protocol: true,
            max_field_section_size: Some(16384),
            grease: true,
            ..Settings::default()
        },
        &mut frames,
    );
    frame::encode_goaway(8, &mut frames);
    frame::encode_frame_header(h3::grease_value(3), 3, &mut frames);
    frames.extend_from_slice(b"xyz");
    let mut field_section = Vec::new();
    qpack::encode_field_section(
        &[
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-udp"),
            (b":scheme", b"https"),
            (b":authority", b"relay.example"),
            (b":path", b"/.well-known/masque/udp/192.0.2.6/443/"),
            (b"capsule-protocol", b"?1"),
        ],
        &mut field_section,
    );
    let mut request = Vec::new();
    frame::encode_headers_frame(&field_section, &mut request);
    frame::encode_data_frame_header(caps.len() as u64, &mut request);
    request.extend_from_slice(&caps);
    out.push((
        "h3_frame",
        cat(&[&[7, 0x40, 0x00, 0x40, 0x00, 0xff], &frames]),
    ));
    out.push((
        "h3_frame",
        cat(&[&[1, 0x00, 0x40, 0x40, 0x00, 0x01], &request]),
    ));
    // A DATA frame declaring 2^62-1 bytes, then an HTTP/2-only type.
    out.push((
        "h3_frame",
        vec![
            0x25, 0x01, 0x00, 0x01, 0x00, 0xff, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0xff, 1, 2, 0x06, 0x00,
        ],
    ));

    // h3_settings: the relay's own payload.
    out.push(("h3_settings", frames[2..frames[1] as usize + 2].to_vec()));
    out.push((
        "h3_settings",
        vec![0x33, 0x01, 0x08, 0x01, 0x06, 0x44, 0x00, 0x33, 0x00],
    ));

    // h3_stream: a control stream, QPACK streams, a request stream.
    out.push(("h3_stream", cat(&[&[0, 7, 0xff, 0xff, 0x00], &frames])));
    out.push(("h3_stream", cat(&[&[1, 1, 0xff, 0xff], &frames])));
    out.push(("h3_stream", vec![2, 2, 0, 0, 0x20, 0x3f, 0x01]));
    out.push(("h3_stream", vec![3, 3, 0, 0, 0x44, 0x7f, 0x80, 0x01]));
    out.push(("h3_stream", cat(&[&[4, 9, 0x40, 0x00], &request])));

    // qpack: the request above, Huffman-coded literals, a Huffman bomb of static entries.
    out.push(("qpack", cat(&[&[0x40, 0x00], &field_section])));
    let mut coded = vec![0, 0];
    huffman_literal(b"user-agent", 3, 0b0010_1000, &mut coded);
    huffman_literal(b"masque-relay fuzz", 7, 0b1000_0000, &mut coded);
    coded.extend_from_slice(&[0xd1, 0x5f, 0x1d, 0x84, 0x25, 0x07, 0x41, 0xff]);
    out.push(("qpack", cat(&[&[0x01, 0x00], &coded])));
    out.push((
        "qpack",
        cat(&[&[0x00, 0x80], &[0, 0], &[0xff, 0x19].repeat(40)]),
    ));

    // huffman: strings and the bad paddings.
    let mut h = Vec::new();
    huffman::encode(b"www.example.com", &mut h);
    out.push(("huffman", cat(&[&[0x00, 0x40], &h])));
    out.push((
        "huffman",
        vec![
            0x00, 0x04, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ],
    ));
    out.push(("huffman", vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff]));

    // uri_template: matching targets for each fixed template, and a template of one's own.
    for (i, path) in [
        "/.well-known/masque/udp/192.0.2.6/443/",
        "/masque?target_host=2001%3Adb8%3A%3A42&target_port=443",
        "/masque?h=example.com&p=53",
        "/udp/example.com,0443/",
        "/udp/example.com.443",
        "/udp?v=1&flag&target_host=h&target_port=1",
    ]
    .iter()
    .enumerate()
    {
        out.push(("uri_template", cat(&[&[i as u8], path.as_bytes()])));
    }
    out.push((
        "uri_template",
        cat(&[&[0xff], b"/x/{target_host}/{target_port}{?q}\n/x/a.b/1?q=2"]),
    ));

    // target: each host form and the refusals of SECURITY.md item 3.
    for spec in [
        "192.0.2.6\n443",
        "2001%3Adb8%3A%3A42\n0443",
        "Example.COM.\n65535",
        "fe80%3A%3A1%2525eth0\n1",
        "%5B%3A%3A1%5D\n1",
        "127.1\n0",
        "a%253Ab\n65536",
    ] {
        out.push(("target", cat(&[&[0], spec.as_bytes()])));
    }

    // http1: an upgrade request with a capsule after it, and an absolute-form one.
    let mut h1 = b"GET /.well-known/masque/udp/192.0.2.6/443/ HTTP/1.1\r\nHost: relay.example\r\n\
Connection: Upgrade\r\nUpgrade: connect-udp\r\nCapsule-Protocol: ?1\r\n\r\n"
        .to_vec();
    h1.extend_from_slice(&caps[..12]);
    out.push(("http1", h1));
    out.push((
        "http1",
        b"GET https://relay.example:4433/.well-known/masque/udp/h/1/ HTTP/1.1\r\n\
Connection: keep-alive, upgrade\r\nupgrade: websocket\r\nUpgrade: connect-udp\r\n\r\n"
            .to_vec(),
    ));
    // Credentials and a repeated header the parser refuses.
    out.push((
        "http1",
        b"GET /.well-known/masque/udp/h/1/ HTTP/1.1\r\nHost: r\r\nProxy-Authorization: Bearer \
dG9rZW4\r\nConnection: upgrade\r\nUpgrade: connect-udp\r\nHost: s\r\n\r\n"
            .to_vec(),
    ));
    out
}
