//! Per-worker counters.
//!
//! Each worker owns one [`WorkerStats`]; only that worker's thread writes it (relaxed atomics, so
//! a reader on another thread sees plain, slightly stale integers and the writer never contends
//! on a shared cache line with other workers). Readers add the workers up at read time.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::proto::connect_udp::HttpVersion;
use crate::relay::flow::{CloseReason, DropReason};

/// A counter written by one thread and read by any.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: a load and a store are enough, no locked read-modify-write needed.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Status codes counted individually; anything else falls in the last slot.
pub const STATUS_CODES: [u16; 14] = [
    101, 200, 400, 403, 404, 405, 407, 429, 500, 501, 502, 503, 504, 0,
];

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

/// One worker's counters.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub connections_accepted: [Counter; 3],
    pub connections_closed: [Counter; 3],
    pub handshake_failures: Counter,
    pub requests: [[Counter; STATUS_CODES.len()]; 3],
    pub flows_opened: Counter,
    pub flows_closed: [Counter; CloseReason::ALL.len()],
    pub datagrams: [[Counter; 2]; 3],
    pub bytes: [[Counter; 2]; 3],
    pub drops: [Counter; DropReason::ALL.len()],
    pub resolve_failures: Counter,
    pub capsules_unknown: Counter,
}

impl WorkerStats {
    pub fn connection_accepted(&self, v: HttpVersion) {
        self.connections_accepted[proto_index(v)].inc();
    }
    pub fn connection_closed(&self, v: HttpVersion) {
        self.connections_closed[proto_index(v)].inc();
    }
    pub fn request(&self, v: HttpVersion, status: u16) {
        let i = STATUS_CODES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUS_CODES.len() - 1);
        self.requests[proto_index(v)][i].inc();
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
        let i = DropReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.drops[i].inc();
    }
    /// Flows currently open on this worker.
    pub fn flows_open(&self) -> u64 {
        let closed: u64 = self.flows_closed.iter().map(Counter::get).sum();
        self.flows_opened.get().saturating_sub(closed)
    }
    pub fn drops_for(&self, r: DropReason) -> u64 {
        let i = DropReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.drops[i].get()
    }
    pub fn flows_closed_for(&self, r: CloseReason) -> u64 {
        let i = CloseReason::ALL.iter().position(|&x| x == r).unwrap_or(0);
        self.flows_closed[i].get()
    }
    pub fn datagrams_for(&self, v: HttpVersion, d: Direction) -> u64 {
        self.datagrams[proto_index(v)][d as usize].get()
    }
}
