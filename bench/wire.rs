//! The bench's own payload header, written at the front of every UDP payload it sends, and the
//! target's counter query.
//!
//! ```text
//!  0       4    5         8          12         16                  24
//!  +-------+----+---------+----------+----------+-------------------+---------------
//!  | MQB1  |kind| run tag | flow id  | sequence | send time (ns)    | filler ...
//!  +-------+----+---------+----------+----------+-------------------+---------------
//!  kind: low bits echo / sink / query / reply / download / burst; bit 7 set when sent inside
//!        the measured window
//! ```
//!
//! A download request (kind download) carries what it asks for after the header: the burst
//! length B (u16) and the payload size S (u32) of each datagram of the burst. The target answers
//! it with B datagrams of S bytes (kind burst) as GSO trains; each carries the request's run tag,
//! flow, measured bit and send time, and sequence `request sequence * B + i` for i in 0..B, so
//! the client tells the bursts of one flow apart and knows when one is complete.
//!
//! ```text
//!  24       26       28        32
//!  +--------+--------+---------+
//!  | burst  | 0      | size    |   (download request, after the header)
//!  +--------+--------+---------+
//! ```
//!
//! The "measured" bit is what makes the counts exact: the target and the client count only
//! datagrams sent inside the window, however late they arrive, so loss is sent-minus-received of
//! the same datagrams and never an artefact of where a clock tick fell.

/// First four bytes of every bench payload.
pub const MAGIC: [u8; 4] = *b"MQB1";
/// Bytes of the header; payloads are at least this long.
pub const HEADER_LEN: usize = 24;
/// Bytes of a query reply: the header and five counters.
pub const REPLY_LEN: usize = HEADER_LEN + 5 * 8;
/// Bytes of a download request: the header, the burst length and the datagram size.
pub const DOWNLOAD_REQUEST_LEN: usize = HEADER_LEN + 8;
/// Longest burst a target sends for one download request.
pub const MAX_BURST: u16 = 4096;
/// Largest UDP payload over IPv4 and IPv6 alike.
pub const MAX_PAYLOAD: usize = 65_507;

const MEASURED: u8 = 0x80;

/// What the receiver of a bench payload is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Send it back to where it came from.
    Echo = 0,
    /// Count it and drop it (one-way runs).
    Sink = 1,
    /// Answer with the counters of this run tag.
    Query = 2,
    /// The answer to a query.
    Reply = 3,
    /// Answer with a burst of datagrams (a download): see [`DownloadRequest`].
    Download = 4,
    /// One datagram of a download burst, sent by the target.
    Burst = 5,
}

impl Kind {
    fn from_bits(b: u8) -> Option<Kind> {
        match b & !MEASURED {
            0 => Some(Kind::Echo),
            1 => Some(Kind::Sink),
            2 => Some(Kind::Query),
            3 => Some(Kind::Reply),
            4 => Some(Kind::Download),
            5 => Some(Kind::Burst),
            _ => None,
        }
    }
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub measured: bool,
    /// 24 bits identifying one run, so one target serves several runs and baselines.
    pub tag: u32,
    pub flow: u32,
    pub seq: u32,
    /// Send time in nanoseconds on the sender's clock.
    pub sent_ns: u64,
}

impl Header {
    /// Writes the header at the front of `buf` (at least [`HEADER_LEN`] bytes); the rest of
    /// `buf` is left as it is.
    pub fn write(&self, buf: &mut [u8]) {
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4] = self.kind as u8 | if self.measured { MEASURED } else { 0 };
        buf[5..8].copy_from_slice(&self.tag.to_be_bytes()[1..4]);
        buf[8..12].copy_from_slice(&self.flow.to_be_bytes());
        buf[12..16].copy_from_slice(&self.seq.to_be_bytes());
        buf[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
    }

    /// Parses a payload; `None` when it is not a bench payload.
    pub fn read(buf: &[u8]) -> Option<Header> {
        if buf.len() < HEADER_LEN || buf[0..4] != MAGIC {
            return None;
        }
        let b = |r: std::ops::Range<usize>| -> [u8; 8] {
            let mut out = [0u8; 8];
            out[8 - r.len()..].copy_from_slice(&buf[r]);
            out
        };
        Some(Header {
            kind: Kind::from_bits(buf[4])?,
            measured: buf[4] & MEASURED != 0,
            tag: u64::from_be_bytes(b(5..8)) as u32,
            flow: u64::from_be_bytes(b(8..12)) as u32,
            seq: u64::from_be_bytes(b(12..16)) as u32,
            sent_ns: u64::from_be_bytes(b(16..24)),
        })
    }
}

/// What a download request asks for, after its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadRequest {
    /// Datagrams in the burst, 1..=[`MAX_BURST`].
    pub burst: u16,
    /// Payload bytes of each, [`HEADER_LEN`]..=[`MAX_PAYLOAD`].
    pub size: u32,
}

impl DownloadRequest {
    /// Writes the request's fields after the header in `buf` (at least
    /// [`DOWNLOAD_REQUEST_LEN`] bytes; a shorter buffer is left alone).
    pub fn write(&self, buf: &mut [u8]) {
        if buf.len() < DOWNLOAD_REQUEST_LEN {
            return;
        }
        buf[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&self.burst.to_be_bytes());
        buf[HEADER_LEN + 2..HEADER_LEN + 4].fill(0);
        buf[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&self.size.to_be_bytes());
    }

    /// Reads the fields of a download request; `None` when they are missing or out of range.
    pub fn read(buf: &[u8]) -> Option<DownloadRequest> {
        if buf.len() < DOWNLOAD_REQUEST_LEN {
            return None;
        }
        let burst = u16::from_be_bytes([buf[HEADER_LEN], buf[HEADER_LEN + 1]]);
        let size = u32::from_be_bytes(buf[HEADER_LEN + 4..HEADER_LEN + 8].try_into().ok()?);
        ((1..=MAX_BURST).contains(&burst) && (HEADER_LEN..=MAX_PAYLOAD).contains(&(size as usize)))
            .then_some(DownloadRequest { burst, size })
    }
}

/// The sequence number of datagram `i` of the burst answering request `seq` of `burst`
/// datagrams (wrapping: a run would need 2^32 burst datagrams to wrap).
pub fn burst_seq(seq: u32, burst: u16, i: u16) -> u32 {
    seq.wrapping_mul(u32::from(burst))
        .wrapping_add(u32::from(i))
}

/// What a target counted for one run tag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TargetCounts {
    /// Datagrams received that were sent inside the measured window (for a download run: the
    /// requests).
    pub measured: u64,
    /// Their payload bytes.
    pub measured_bytes: u64,
    /// Measured datagrams sent back toward the client that the kernel took: echoes, or the
    /// datagrams of the bursts answering measured download requests.
    pub echoed: u64,
    /// Measured datagrams the target could not send back (its socket buffer was full).
    pub echo_failed: u64,
    /// Every datagram of the tag, warm-up included.
    pub total: u64,
}

impl TargetCounts {
    /// Encodes a reply to a query for `tag`.
    pub fn encode_reply(&self, tag: u32) -> [u8; REPLY_LEN] {
        let mut out = [0u8; REPLY_LEN];
        Header {
            kind: Kind::Reply,
            measured: false,
            tag,
            flow: 0,
            seq: 0,
            sent_ns: 0,
        }
        .write(&mut out);
        let fields = [
            self.measured,
            self.measured_bytes,
            self.echoed,
            self.echo_failed,
            self.total,
        ];
        for (i, v) in fields.iter().enumerate() {
            let at = HEADER_LEN + 8 * i;
            out[at..at + 8].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    /// Decodes a reply; `None` if `buf` is not a reply for `tag`.
    pub fn decode_reply(buf: &[u8], tag: u32) -> Option<TargetCounts> {
        let h = Header::read(buf)?;
        if h.kind != Kind::Reply || h.tag != tag || buf.len() < REPLY_LEN {
            return None;
        }
        let f = |i: usize| {
            let at = HEADER_LEN + 8 * i;
            u64::from_be_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]))
        };
        Some(TargetCounts {
            measured: f(0),
            measured_bytes: f(1),
            echoed: f(2),
            echo_failed: f(3),
            total: f(4),
        })
    }
}

/// A fresh run tag (24 bits, never 0).
pub fn new_tag() -> u32 {
    (rand::random::<u32>() & 0x00ff_ffff).max(1)
}

/// Asks the target at `target` for the counters of `tag`, over a socket of its own. Retries a
/// few times (UDP); `None` if the target never answers as a bench target would.
pub fn query_target(target: std::net::SocketAddr, tag: u32) -> Option<TargetCounts> {
    let bind = if target.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = std::net::UdpSocket::bind(bind).ok()?;
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .ok()?;
    let mut q = [0u8; HEADER_LEN];
    Header {
        kind: Kind::Query,
        measured: false,
        tag,
        flow: 0,
        seq: 0,
        sent_ns: 0,
    }
    .write(&mut q);
    let mut buf = [0u8; 256];
    for _ in 0..5 {
        sock.send_to(&q, target).ok()?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Some(c) = TargetCounts::decode_reply(&buf[..n], tag) {
                        return Some(c);
                    }
                }
                Err(_) => break,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            kind: Kind::Sink,
            measured: true,
            tag: 0x00ab_cdef,
            flow: 70_000,
            seq: 0xdead_beef,
            sent_ns: 123_456_789_012,
        };
        let mut buf = [0xffu8; 64];
        h.write(&mut buf);
        assert_eq!(Header::read(&buf), Some(h));
        assert_eq!(buf[HEADER_LEN], 0xff, "filler untouched");
        assert_eq!(Header::read(&buf[..HEADER_LEN - 1]), None);
        buf[0] = b'X';
        assert_eq!(Header::read(&buf), None);
    }

    #[test]
    fn download_request_round_trip() {
        let mut buf = [0u8; DOWNLOAD_REQUEST_LEN];
        let r = DownloadRequest {
            burst: 16,
            size: 1200,
        };
        r.write(&mut buf);
        assert_eq!(DownloadRequest::read(&buf), Some(r));
        assert_eq!(DownloadRequest::read(&buf[..HEADER_LEN]), None);
        for (burst, size) in [(0, 1200), (MAX_BURST + 1, 1200), (16, 23), (16, 65_508)] {
            DownloadRequest { burst, size }.write(&mut buf);
            assert_eq!(DownloadRequest::read(&buf), None, "{burst} x {size}");
        }
        assert_eq!(burst_seq(3, 16, 0), 48);
        assert_eq!(burst_seq(3, 16, 15), 63);
        assert_eq!(burst_seq(u32::MAX, 2, 1), u32::MAX);
    }

    #[test]
    fn reply_round_trip() {
        let c = TargetCounts {
            measured: 1,
            measured_bytes: 1200,
            echoed: 1,
            echo_failed: 0,
            total: 7,
        };
        let r = c.encode_reply(42);
        assert_eq!(TargetCounts::decode_reply(&r, 42), Some(c));
        assert_eq!(TargetCounts::decode_reply(&r, 43), None);
    }
}
