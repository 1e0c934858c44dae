//! Per-worker counters and histograms, and their export to Prometheus.
//!
//! Each worker owns one [`WorkerStats`]; only that worker's thread writes it (relaxed atomics, so
//! a reader on another thread sees plain, slightly stale integers and the writer never contends
//! on a shared cache line with other workers). Nothing is added up on the data path: the
//! [`collector`] reads every worker's numbers when Prometheus scrapes, and the [`server`] answers
//! `GET /metrics` on its own thread, outside the workers' event loops.

pub mod collector;
pub mod server;

use std::time::Duration;

use crate::proto::connect_udp::{HttpVersion, Rejection};
use crate::proto::sf::ProxyError;
use crate::relay::flow::{CloseReason, DropReason};

pub use crate::counter::{Counter, Gauge};
use crate::io::dgram::{EngineStats, IoDrop};
pub use collector::RelayCollector;
pub use server::MetricsServer;

/// A histogram of durations with fixed buckets, written by one thread and read by any.
///
/// Each observation bumps one bucket (not every bucket above it) and the sum; readers make the
/// counts cumulative. The total count is the sum of the buckets as read, so the `+Inf` bucket and
/// `_count` always agree; `_sum` is read separately and may be one observation ahead or behind.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds (inclusive), ascending.
    bounds: &'static [Duration],
    /// One slot per bound plus one for everything above the last bound.
    counts: Box<[Counter]>,
    sum_nanos: Counter,
}

/// What a reader sees of a [`Histogram`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations <= bound)` for every finite bound, ascending.
    pub buckets: Vec<(f64, u64)>,
    /// Every observation, including those above the last bound.
    pub count: u64,
    /// Sum of the observations, in seconds.
    pub sum: f64,
}

impl Histogram {
    /// A histogram with these upper bounds, which must be ascending.
    pub fn new(bounds: &'static [Duration]) -> Self {
        debug_assert!(
            bounds.windows(2).all(|w| w[0] < w[1]),
            "bounds not ascending"
        );
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum_nanos: Counter::default(),
        }
    }

    /// Records one duration. A bucket counts observations less than or equal to its bound.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let i = self.bounds.partition_point(|b| *b < d);
        self.counts[i].inc();
        self.sum_nanos
            .add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The upper bounds.
    pub fn bounds(&self) -> &'static [Duration] {
        self.bounds
    }

    /// Cumulative bucket counts, count and sum as of now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0u64;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, c) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += c.get();
            buckets.push((bound.as_secs_f64(), cumulative));
        }
        let count = cumulative + self.counts[self.bounds.len()].get();
        let sum = self.sum_nanos.get() as f64 / 1e9;
        HistogramSnapshot {
            buckets,
            count,
            sum,
        }
    }
}

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn us(n: u64) -> Duration {
    Duration::from_micros(n)
}
const fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Handshake buckets: a loopback TLS handshake takes about a millisecond, one across a continent
/// a few hundred; the default handshake timeout is ten seconds.
pub const HANDSHAKE_BUCKETS: [Duration; 13] = [
    ms(1),
    us(2_500),
    ms(5),
    ms(10),
    ms(25),
    ms(50),
    ms(100),
    ms(250),
    ms(500),
    s(1),
    us(2_500_000),
    s(5),
    s(10),
];

/// Request-to-response buckets: an IP literal costs a socket (tens of microseconds), a name adds
/// a resolution (up to the five-second default resolve timeout).
pub const RESPONSE_BUCKETS: [Duration; 16] = [
    us(100),
    us(250),
    us(500),
    ms(1),
    us(2_500),
    ms(5),
    ms(10),
    ms(25),
    ms(50),
    ms(100),
    ms(250),
    ms(500),
    s(1),
    us(2_500_000),
    s(5),
    s(10),
];

/// Flow lifetime buckets: from a DNS exchange (well under a second) to a day-long tunnel.
pub const FLOW_LIFETIME_BUCKETS: [Duration; 14] = [
    ms(100),
    s(1),
    s(5),
    s(10),
    s(30),
    s(60),
    s(120),
    s(300),
    s(600),
    s(1_800),
    s(3_600),
    s(7_200),
    s(21_600),
    s(86_400),
];

/// Status codes counted individually; anything else falls in the last slot.
pub const STATUS_CODES: [u16; 14] = [
    101, 200, 400, 403, 404, 405, 407, 429, 500, 501, 502, 503, 504, 0,
];

/// The engine's send tag for datagrams of flows on `v`: its index in [`PROTOCOLS`].
pub fn send_tag(v: HttpVersion) -> u8 {
    proto_index(v) as u8
}

/// The protocols in label order.
pub const PROTOCOLS: [HttpVersion; 3] =
    [HttpVersion::Http3, HttpVersion::Http2, HttpVersion::Http11];

fn proto_index(v: HttpVersion) -> usize {
    match v {
        HttpVersion::Http3 => 0,
        HttpVersion::Http2 => 1,
        HttpVersion::Http11 => 2,
    }
}

/// Direction of a datagram through the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToTarget,
    ToClient,
}

impl Direction {
    /// Both directions, in index order.
    pub const ALL: [Direction; 2] = [Direction::ToTarget, Direction::ToClient];

    /// Label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToTarget => "to_target",
            Direction::ToClient => "to_client",
        }
    }
}

/// Why a client's handshake (TLS, later QUIC) did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within `handshake_timeout_secs`.
    Timeout,
    /// The TLS layer (or QUIC's) refused it: bad ClientHello, no common ALPN or cipher, alert,
    /// reset.
    Tls,
    /// The relay turned the connection away (over a connection limit).
    Refused,
    /// Counted without a reason (the plain [`WorkerStats::handshake_failures`] counter).
    Other,
}

impl HandshakeFailure {
    /// All reasons, in index order.
    pub const ALL: [HandshakeFailure; 4] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Tls,
        HandshakeFailure::Refused,
        HandshakeFailure::Other,
    ];

    /// Label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Tls => "tls_error",
            HandshakeFailure::Refused => "refused",
            HandshakeFailure::Other => "other",
        }
    }
}

/// Why a client connection (after its handshake) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionClose {
    /// Ended without an error: the client closed it, or (HTTP/1.1) its one request is over.
    Normal,
    /// The client broke the HTTP protocol (HTTP/2 connection error, bad preface, ...).
    ProtocolError,
    /// Reading or writing failed (reset, broken pipe, a TLS error after the handshake).
    IoError,
    /// The client took none of the relay's bytes for `http2.write_stall_timeout_secs`
    /// ([`crate::transport::stall`]).
    WriteStall,
    /// Counted without a reason (the plain [`WorkerStats::connection_closed`]).
    Other,
}

impl ConnectionClose {
    /// All reasons, in index order.
    pub const ALL: [ConnectionClose; 5] = [
        ConnectionClose::Normal,
        ConnectionClose::ProtocolError,
        ConnectionClose::IoError,
        ConnectionClose::WriteStall,
        ConnectionClose::Other,
    ];

    /// Label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionClose::Normal => "normal",
            ConnectionClose::ProtocolError => "protocol_error",
            ConnectionClose::IoError => "io_error",
            ConnectionClose::WriteStall => "write_stall",
            ConnectionClose::Other => "other",
        }
    }
}

/// The I/O backend label before a worker has started its datagram engine.
pub const IO_BACKEND_NONE: &str = "none";

/// One worker's counters and histograms.
#[derive(Debug)]
pub struct WorkerStats {
    /// What the worker's datagram engine counts itself (passes, pools, its drops, datagrams
    /// the kernel took per protocol).
    pub io: std::sync::Arc<EngineStats>,
    /// The I/O backend this worker runs on (an info metric), set when its engine starts.
    io_backend: std::sync::Mutex<&'static str>,
    pub connections_accepted: [Counter; 3],
    /// Connections closed without a reason, by protocol (exported as reason `other`); see
    /// [`WorkerStats::connection_ended`] for the classified ones.
    pub connections_closed: [Counter; 3],
    /// Connections closed, by protocol and [`ConnectionClose`] reason.
    pub connections_closed_by_reason: [[Counter; ConnectionClose::ALL.len()]; 3],
    /// Handshake failures without a reason (exported as reason `other`); see
    /// [`WorkerStats::handshake_failed`] for the classified ones.
    pub handshake_failures: Counter,
    /// Handshake failures by [`HandshakeFailure`] reason.
    pub handshake_failures_by_reason: [Counter; HandshakeFailure::ALL.len()],
    pub requests: [[Counter; STATUS_CODES.len()]; 3],
    /// Refused requests by their `Proxy-Status` error, in [`ProxyError::ALL`] order.
    pub refusals: [Counter; ProxyError::ALL.len()],
    pub flows_opened: Counter,
    /// Egress sockets the worker has open now (shared by its flows).
    pub egress_sockets: Gauge,
    pub flows_closed: [Counter; CloseReason::ALL.len()],
    pub datagrams: [[Counter; 2]; 3],
    pub bytes: [[Counter; 2]; 3],
    pub drops: [Counter; DropReason::ALL.len()],
    pub resolve_failures: Counter,
    pub capsules_unknown: Counter,
    /// HTTP/3 connection errors the relay detected (it then closes the connection).
    pub h3_connection_errors: Counter,
    /// HTTP/3 stream errors (a malformed request or message): the stream is reset.
    pub h3_stream_errors: Counter,
    /// QUIC datagrams held back by the 3x anti-amplification limit.
    pub quic_amplification_held: Counter,
    /// QUIC packets that reached this worker but belong to another one's connection.
    pub quic_misrouted: Counter,
    /// Time from accept (TCP) or first packet (QUIC) to a completed handshake.
    pub handshake_seconds: Histogram,
    /// From a complete request head to the response sent, resolution and socket included.
    pub request_seconds: Histogram,
    /// Lifetimes of closed flows.
    pub flow_lifetime_seconds: Histogram,
}

impl Default for WorkerStats {
    fn default() -> Self {
        Self {
            io: Default::default(),
            io_backend: std::sync::Mutex::new(IO_BACKEND_NONE),
            connections_accepted: Default::default(),
            connections_closed: Default::default(),
            connections_closed_by_reason: Default::default(),
            handshake_failures: Counter::default(),
            handshake_failures_by_reason: Default::default(),
            requests: Default::default(),
            refusals: std::array::from_fn(|_| Counter::default()),
            flows_opened: Counter::default(),
            egress_sockets: Gauge::default(),
            flows_closed: Default::default(),
            datagrams: Default::default(),
            bytes: Default::default(),
            drops: Default::default(),
            resolve_failures: Counter::default(),
            capsules_unknown: Counter::default(),
            h3_connection_errors: Counter::default(),
            h3_stream_errors: Counter::default(),
            quic_amplification_held: Counter::default(),
            quic_misrouted: Counter::default(),
            handshake_seconds: Histogram::new(&HANDSHAKE_BUCKETS),
            request_seconds: Histogram::new(&RESPONSE_BUCKETS),
            flow_lifetime_seconds: Histogram::new(&FLOW_LIFETIME_BUCKETS),
        }
    }
}

impl WorkerStats {
    /// Records the worker's I/O backend (once, at engine start; never on the data path).
    pub fn set_io_backend(&self, name: &'static str) {
        *self.io_backend.lock().unwrap_or_else(|e| e.into_inner()) = name;
    }

    pub fn io_backend(&self) -> &'static str {
        *self.io_backend.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn connection_accepted(&self, v: HttpVersion) {
        self.connections_accepted[proto_index(v)].inc();
    }
    /// A connection closed without a reason given; prefer [`WorkerStats::connection_ended`].
    pub fn connection_closed(&self, v: HttpVersion) {
        self.connections_closed[proto_index(v)].inc();
    }
    /// A connection closed, and why.
    pub fn connection_ended(&self, v: HttpVersion, why: ConnectionClose) {
        let r = ConnectionClose::ALL
            .iter()
            .position(|&x| x == why)
            .unwrap_or(0);
        self.connections_closed_by_reason[proto_index(v)][r].inc();
    }
    /// A handshake that did not complete, and why.
    pub fn handshake_failure(&self, why: HandshakeFailure) {
        let r = HandshakeFailure::ALL
            .iter()
            .position(|&x| x == why)
            .unwrap_or(0);
        self.handshake_failures_by_reason[r].inc();
    }
    pub fn request(&self, v: HttpVersion, status: u16) {
        let i = STATUS_CODES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUS_CODES.len() - 1);
        self.requests[proto_index(v)][i].inc();
    }
    /// A refused request: counts its status (as [`WorkerStats::request`]) and its
    /// `Proxy-Status` error, if it has one.
    pub fn refused(&self, v: HttpVersion, r: &Rejection) {
        self.request(v, r.status);
        if let Some(e) = r.proxy_error {
            self.refusal(e);
        }
    }
    /// A refusal with this `Proxy-Status` error (the status is counted by
    /// [`WorkerStats::request`]).
    pub fn refusal(&self, e: ProxyError) {
        if let Some(i) = ProxyError::ALL.iter().position(|&x| x == e) {
            self.refusals[i].inc();
        }
    }
    pub fn flow_closed(&self, r: CloseReason) {
        let i = CloseReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.flows_closed[i].inc();
    }
    #[inline]
    pub fn datagram(&self, v: HttpVersion, d: Direction, len: usize) {
        let (p, d) = (proto_index(v), d as usize);
        self.datagrams[p][d].inc();
        self.bytes[p][d].add(len as u64);
    }
    #[inline]
    pub fn dropped(&self, r: DropReason) {
        self.dropped_n(r, 1);
    }

    /// `n` datagrams dropped for the same reason.
    pub fn dropped_n(&self, r: DropReason, n: u64) {
        let i = DropReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.drops[i].add(n);
    }
    /// Flows currently open on this worker.
    pub fn flows_open(&self) -> u64 {
        let closed: u64 = self.flows_closed.iter().map(Counter::get).sum();
        self.flows_opened.get().saturating_sub(closed)
    }
    /// Connections of protocol `v` currently open on this worker.
    pub fn connections_open(&self, v: HttpVersion) -> u64 {
        let p = proto_index(v);
        let closed = self.connections_closed[p].get()
            + self.connections_closed_by_reason[p]
                .iter()
                .map(Counter::get)
                .sum::<u64>();
        self.connections_accepted[p].get().saturating_sub(closed)
    }
    /// Connections of protocol `v` closed for `why` (reason `other` includes the unclassified).
    pub fn connections_closed_for(&self, v: HttpVersion, why: ConnectionClose) -> u64 {
        let p = proto_index(v);
        let r = ConnectionClose::ALL
            .iter()
            .position(|&x| x == why)
            .unwrap_or(0);
        let legacy = if why == ConnectionClose::Other {
            self.connections_closed[p].get()
        } else {
            0
        };
        self.connections_closed_by_reason[p][r].get() + legacy
    }
    /// Handshake failures for `why` (reason `other` includes the unclassified).
    pub fn handshake_failures_for(&self, why: HandshakeFailure) -> u64 {
        let r = HandshakeFailure::ALL
            .iter()
            .position(|&x| x == why)
            .unwrap_or(0);
        let legacy = if why == HandshakeFailure::Other {
            self.handshake_failures.get()
        } else {
            0
        };
        self.handshake_failures_by_reason[r].get() + legacy
    }
    pub fn requests_for(&self, v: HttpVersion, status: u16) -> u64 {
        let i = STATUS_CODES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUS_CODES.len() - 1);
        self.requests[proto_index(v)][i].get()
    }
    pub fn refusals_for(&self, e: ProxyError) -> u64 {
        ProxyError::ALL
            .iter()
            .position(|&x| x == e)
            .map_or(0, |i| self.refusals[i].get())
    }
    pub fn drops_for(&self, r: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        let io = match r {
            DropReason::NoBuffer => Some(IoDrop::BacklogFull),
            DropReason::SocketBufferFull => Some(IoDrop::KernelDropped),
            DropReason::Truncated => Some(IoDrop::Truncated),
            DropReason::TargetBusy => Some(IoDrop::SendBufferFull),
            DropReason::TooLarge => Some(IoDrop::TooLarge),
            _ => None,
        };
        self.drops[i].get() + io.map_or(0, |d| self.io.drops_for(d))
    }
    pub fn flows_closed_for(&self, r: CloseReason) -> u64 {
        let i = CloseReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.flows_closed[i].get()
    }
    /// Datagrams relayed; to targets, those the kernel took (counted by the engine per
    /// protocol, the send tag being [`send_tag`]).
    pub fn datagrams_for(&self, v: HttpVersion, d: Direction) -> u64 {
        let p = proto_index(v);
        self.datagrams[p][d as usize].get()
            + match d {
                Direction::ToTarget => self.io.sent[p][0].get(),
                Direction::ToClient => 0,
            }
    }
    pub fn bytes_for(&self, v: HttpVersion, d: Direction) -> u64 {
        let p = proto_index(v);
        self.bytes[p][d as usize].get()
            + match d {
                Direction::ToTarget => self.io.sent[p][1].get(),
                Direction::ToClient => 0,
            }
    }

    /// A request answered: its status, its `Proxy-Status` error (a refusal's), and the time
    /// from the complete request head to the response. Every answer of every HTTP version,
    /// accepted or refused, is recorded here and only here.
    pub fn answered(
        &self,
        v: HttpVersion,
        status: u16,
        refusal: Option<&Rejection>,
        took: Duration,
    ) {
        self.request(v, status);
        if let Some(e) = refusal.and_then(|r| r.proxy_error) {
            self.refusal(e);
        }
        self.request_seconds.observe(took);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static BOUNDS: [Duration; 3] = [ms(1), ms(10), ms(100)];

    #[test]
    fn histogram_buckets_are_inclusive_and_cumulative() {
        let h = Histogram::new(&BOUNDS);
        for d in [
            Duration::ZERO,
            ms(1), // on a bound: counts in that bucket (le)
            us(1_001),
            ms(10),
            ms(99),
            ms(100),
            ms(101), // above the last bound: +Inf only
            s(3600),
        ] {
            h.observe(d);
        }
        let snap = h.snapshot();
        assert_eq!(snap.buckets, vec![(0.001, 2), (0.01, 4), (0.1, 6)]);
        assert_eq!(snap.count, 8);
        let expected = 0.0 + 0.001 + 0.001001 + 0.01 + 0.099 + 0.1 + 0.101 + 3600.0;
        assert!((snap.sum - expected).abs() < 1e-9, "{}", snap.sum);
    }

    #[test]
    fn empty_histogram() {
        let h = Histogram::new(&BOUNDS);
        let snap = h.snapshot();
        assert_eq!(snap.buckets, vec![(0.001, 0), (0.01, 0), (0.1, 0)]);
        assert_eq!((snap.count, snap.sum), (0, 0.0));
    }

    #[test]
    fn histogram_read_while_written() {
        let h = std::sync::Arc::new(Histogram::new(&BOUNDS));
        let w = h.clone();
        let writer = std::thread::spawn(move || {
            for i in 0..100_000u64 {
                w.observe(us(i % 200_000));
            }
        });
        let mut last = 0;
        while !writer.is_finished() {
            let snap = h.snapshot();
            // Cumulative counts never decrease along the buckets, and count covers them all.
            assert!(snap.buckets.windows(2).all(|b| b[0].1 <= b[1].1));
            assert!(snap.buckets.last().unwrap().1 <= snap.count);
            assert!(snap.count >= last, "count went backwards");
            last = snap.count;
        }
        writer.join().unwrap();
        assert_eq!(h.snapshot().count, 100_000);
    }

    #[test]
    fn bucket_bounds_ascend() {
        for b in [
            &HANDSHAKE_BUCKETS[..],
            &RESPONSE_BUCKETS[..],
            &FLOW_LIFETIME_BUCKETS[..],
        ] {
            assert!(b.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn unclassified_closes_and_failures_count_as_other() {
        let s = WorkerStats::default();
        s.connection_accepted(HttpVersion::Http2);
        s.connection_accepted(HttpVersion::Http2);
        s.connection_accepted(HttpVersion::Http2);
        s.connection_closed(HttpVersion::Http2);
        s.connection_ended(HttpVersion::Http2, ConnectionClose::Normal);
        assert_eq!(s.connections_open(HttpVersion::Http2), 1);
        assert_eq!(
            s.connections_closed_for(HttpVersion::Http2, ConnectionClose::Other),
            1
        );
        assert_eq!(
            s.connections_closed_for(HttpVersion::Http2, ConnectionClose::Normal),
            1
        );
        s.handshake_failures.inc();
        s.handshake_failure(HandshakeFailure::Timeout);
        s.handshake_failure(HandshakeFailure::Other);
        assert_eq!(s.handshake_failures_for(HandshakeFailure::Other), 2);
        assert_eq!(s.handshake_failures_for(HandshakeFailure::Timeout), 1);
        assert_eq!(s.handshake_failures_for(HandshakeFailure::Tls), 0);
    }

    #[test]
    fn refusals_count_status_and_proxy_error() {
        let s = WorkerStats::default();
        let v = HttpVersion::Http11;
        s.refused(
            v,
            &Rejection::new(403, Some(ProxyError::DestinationIpProhibited), "x"),
        );
        s.refused(v, &Rejection::new(404, None, "no match"));
        assert_eq!(s.requests_for(v, 403), 1);
        assert_eq!(s.requests_for(v, 404), 1);
        assert_eq!(s.refusals_for(ProxyError::DestinationIpProhibited), 1);
        assert_eq!(
            ProxyError::ALL
                .iter()
                .map(|&e| s.refusals_for(e))
                .sum::<u64>(),
            1
        );
    }
}
