//! The worker's flow table: every flow of the worker in one paged slab ([`Slots`]), linked to
//! its client side (the QUIC connection and request stream, or the TCP connection and stream)
//! and to its target side (an egress socket and the target's address), plus what the data
//! path needs to find a flow from either side in O(1):
//!
//! ```text
//! client datagram --(session: stream -> FlowId)--> flows[FlowId] --> (egress socket, target)
//! target datagram --(demux: (egress socket, source) -> FlowId)--> flows[FlowId] --> client
//! ```
//!
//! No I/O and no clock: time comes in as `now`, sockets are the worker's indices.
//!
//! **Egress sockets are shared.** A socket carries at most one flow per target address, so the
//! pair (socket, target) names a flow; the table picks a socket for a new flow ([`assign`])
//! and says when the worker must open another one. A target datagram whose (socket, source)
//! names no flow (a third host spraying the relay's ports, or a late reply to a closed flow)
//! is dropped by the caller and counted. A pair freed by a closing flow is kept out of use
//! for [`QUARANTINE`], so late replies meant for the old flow can never reach a new flow's
//! client.
//!
//! **Timers are lazy and coarse.** A flow's idle deadline puts it in the bucket of [`TICK`]
//! that holds the deadline when the flow opens, and the flow is looked at when that bucket
//! has passed; datagrams only move the flow's last-activity time, never the timer. A flow that
//! was active meanwhile moves to the bucket of its new deadline. So a flow closes at most one
//! tick after its idle timeout, and the timer costs a flow 4 bytes (its index in a bucket)
//! plus its place in that bucket, kept in its slot so a closing flow leaves in O(1).
//!
//! **Memory per flow is a target** (`masque-bench flow-scale` reports it): the slots grow a
//! page at a time ([`Slots`]), and the demux entry is 36 bytes.
//!
//! [`assign`]: FlowTable::assign

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::relay::slots::Slots;

use crate::proto::capsule::CapsuleDecoder;
use crate::proto::connect_udp::HttpVersion;
use crate::relay::flow::{CloseReason, Flow};
use crate::relay::limits::FlowPermit;

/// How long a (socket, target) pair freed by a closing flow stays out of use.
pub const QUARANTINE: Duration = Duration::from_secs(2);
/// Egress sockets per address family a worker opens before flows start to share them: up to
/// this many flows each get a socket of their own (a target flooding its flow's socket then
/// disturbs no other flow), and sockets left empty are used first.
pub const SPREAD: usize = 64;

/// How long an egress socket serves nothing (no flow, no quarantined pair) before the worker
/// closes it: the pool shrinks back after a burst of flows.
pub const EGRESS_IDLE: Duration = Duration::from_secs(1);

/// The idle timers' granularity: a flow closes within this much after its idle timeout.
pub const TICK: Duration = Duration::from_millis(50);
const TICK_MS: u64 = TICK.as_millis() as u64;

/// A flow: its slab index and the generation that owns it (a stale id finds nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    idx: u32,
    gen: u32,
}

/// The client side of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientRef {
    /// HTTP/3: the QUIC connection (quinn-proto's handle) and the request stream.
    H3 { conn: u32, stream: u64 },
    /// HTTP/2 or HTTP/1.1: the worker's TCP connection and the stream (0 on HTTP/1.1).
    Tcp { conn: u32, stream: u32 },
}

/// The target side of a flow: an egress socket (the worker's index) and the target address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetRef {
    pub egress: u32,
    pub addr: SocketAddr,
}

/// One flow.
#[derive(Debug)]
pub struct FlowEntry {
    pub flow: Flow,
    pub client: ClientRef,
    pub version: HttpVersion,
    pub target: TargetRef,
    /// Capsules from a client whose flow travels in a byte stream (HTTP/2, HTTP/1.1).
    pub decoder: Option<Box<CapsuleDecoder>>,
    /// Reply with DATAGRAM capsules rather than QUIC DATAGRAM frames (HTTP/3 clients that
    /// send capsules, or connections without QUIC datagrams).
    pub capsules: bool,
    /// The flow's slot in the relay-wide and per-identity caps, given back when it goes.
    pub permit: FlowPermit,
    /// Where the flow's idle timer is: its bucket and its place there (`bucket` is `NO_TIMER`
    /// once the timer has fired).
    bucket: u32,
    pos: u32,
}

const NO_TIMER: u32 = u32::MAX;

/// A demux key: an egress socket and a peer address, packed into six 32-bit words (36 bytes
/// with the value, where `(u32, SocketAddr)` and an `Instant` took 64); a lookup hashes them as
/// three 64-bit words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PairKey([u32; 6]);

impl PairKey {
    fn new(egress: u32, addr: SocketAddr) -> Self {
        let (v6, ip) = match addr.ip() {
            IpAddr::V4(a) => (0, a.to_ipv6_mapped().octets()),
            IpAddr::V6(a) => (1, a.octets()),
        };
        let w = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
        PairKey([
            w(0),
            w(4),
            w(8),
            w(12),
            egress,
            u32::from(addr.port()) << 1 | v6,
        ])
    }

    fn egress(&self) -> u32 {
        self.0[4]
    }
}

impl std::hash::Hash for PairKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let k = &self.0;
        state.write_u64(u64::from(k[0]) << 32 | u64::from(k[1]));
        state.write_u64(u64::from(k[2]) << 32 | u64::from(k[3]));
        state.write_u64(u64::from(k[4]) << 32 | u64::from(k[5]));
    }
}

/// One egress socket's use.
#[derive(Debug, Default, Clone, Copy)]
struct Egress {
    ipv6: bool,
    live: bool,
    /// Flows plus quarantined pairs.
    load: u32,
    idle_since: Option<Instant>,
}

/// What a lookup by (socket, source) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pair {
    Flow(FlowId),
    /// Freed by a closed flow; out of use until its quarantine (this sequence number in the
    /// quarantine queue) ends.
    Quarantined(u32),
}

/// Per target address: how many flows go there, how many (socket, address) pairs it holds
/// (its flows' and its quarantined ones), and where the next socket search starts.
#[derive(Debug, Default, Clone, Copy)]
struct Remote {
    flows: u32,
    held: u32,
    cursor: u32,
}

/// Why a flow could not get an egress socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assign {
    /// Use this socket.
    Socket(u32),
    /// Every socket of the family already serves this target (or still quarantines it):
    /// the worker must open another one and call [`FlowTable::add_egress`].
    NeedSocket,
}

/// The worker's flows.
#[derive(Debug)]
pub struct FlowTable {
    flows: Slots<FlowEntry>,
    /// (egress socket, target or source address) -> flow. Keys a peer chooses: SipHash with a
    /// random key (std's default), so collisions cannot be steered.
    demux: HashMap<PairKey, Pair>,
    remotes: HashMap<SocketAddr, Remote>,
    /// Egress socket indices per address family: [IPv4, IPv6].
    sockets: [Vec<u32>; 2],
    /// Per egress index: flows and quarantined pairs on it, and since when it has had none.
    egress: Vec<Egress>,
    /// Egress sockets with no load, per family (stale entries are skipped).
    empty: [Vec<u32>; 2],
    /// Egress sockets as they became idle, oldest first (an entry whose socket has been used
    /// since is skipped).
    idle: VecDeque<(Instant, u32)>,
    /// Idle timers: bucket number (ticks since `epoch`) -> slot indices of its flows.
    timers: BTreeMap<u32, Vec<u32>>,
    /// Time zero of the timer buckets.
    epoch: Instant,
    /// Quarantined pairs in the order they end: (end, sequence number, pair).
    quarantine: VecDeque<(Instant, u32, PairKey, SocketAddr)>,
    next_quarantine: u32,
}

impl Default for FlowTable {
    fn default() -> Self {
        Self::new()
    }
}

fn family(a: &SocketAddr) -> usize {
    usize::from(a.is_ipv6())
}

impl FlowTable {
    pub fn new() -> Self {
        FlowTable {
            flows: Slots::new(),
            demux: HashMap::new(),
            remotes: HashMap::new(),
            sockets: [Vec::new(), Vec::new()],
            egress: Vec::new(),
            idle: VecDeque::new(),
            empty: [Vec::new(), Vec::new()],
            timers: BTreeMap::new(),
            epoch: Instant::now(),
            quarantine: VecDeque::new(),
            next_quarantine: 0,
        }
    }

    /// The timer bucket that holds instant `t` (times before the epoch fall in the first).
    fn bucket_of(&self, t: Instant) -> u32 {
        let ms = t.saturating_duration_since(self.epoch).as_millis() as u64;
        u32::try_from(ms / TICK_MS).unwrap_or(NO_TIMER - 1)
    }

    /// When bucket `b` has passed.
    fn bucket_end(&self, b: u32) -> Instant {
        self.epoch + TICK * (b + 1)
    }

    /// Puts the flow in slot `idx` in the timer bucket of `deadline`.
    fn arm(&mut self, idx: u32, deadline: Instant) {
        let b = self.bucket_of(deadline);
        let v = self.timers.entry(b).or_default();
        let pos = v.len() as u32;
        v.push(idx);
        if let Some((_, e)) = self.flows.get_any_mut(idx) {
            e.bucket = b;
            e.pos = pos;
        }
    }

    /// Takes the flow in slot `idx` out of its timer bucket (the bucket's last flow moves
    /// into its place).
    fn disarm(&mut self, bucket: u32, pos: u32) {
        if bucket == NO_TIMER {
            return;
        }
        let Some(v) = self.timers.get_mut(&bucket) else {
            return;
        };
        let pos = pos as usize;
        if pos >= v.len() {
            return;
        }
        v.swap_remove(pos);
        if let Some(&moved) = v.get(pos) {
            if let Some((_, e)) = self.flows.get_any_mut(moved) {
                e.pos = pos as u32;
            }
        }
        if v.is_empty() {
            self.timers.remove(&bucket);
        }
    }

    /// Flows open.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Egress sockets known for IPv4 (`false`) or IPv6 targets.
    pub fn egress_count(&self, ipv6: bool) -> usize {
        self.sockets[usize::from(ipv6)].len()
    }

    /// A new egress socket (the worker's index, which may be one retired before) for IPv4 or
    /// IPv6 targets.
    pub fn add_egress(&mut self, ipv6: bool, egress: u32, now: Instant) {
        self.sockets[usize::from(ipv6)].push(egress);
        let i = egress as usize;
        if self.egress.len() <= i {
            self.egress.resize(i + 1, Egress::default());
        }
        self.egress[i] = Egress {
            ipv6,
            live: true,
            load: 0,
            idle_since: Some(now),
        };
        self.idle.push_back((now, egress));
        self.empty[usize::from(ipv6)].push(egress);
    }

    fn load(&mut self, egress: u32, now: Instant, up: bool) {
        if let Some(e) = self.egress.get_mut(egress as usize) {
            if up {
                e.load += 1;
                e.idle_since = None;
            } else {
                e.load = e.load.saturating_sub(1);
                if e.load == 0 {
                    e.idle_since = Some(now);
                    self.idle.push_back((now, egress));
                    self.empty[usize::from(e.ipv6)].push(egress);
                }
            }
        }
    }

    /// Egress sockets that have served nothing for [`EGRESS_IDLE`]: out of the pool, for the
    /// worker to close (their indices may come back through [`FlowTable::add_egress`]).
    pub fn retire(&mut self, now: Instant, out: &mut Vec<u32>) {
        let before = out.len();
        while let Some(&(since, i)) = self.idle.front() {
            if now < since + EGRESS_IDLE {
                break;
            }
            self.idle.pop_front();
            let Some(e) = self.egress.get_mut(i as usize) else {
                continue;
            };
            if e.live && e.idle_since == Some(since) {
                e.live = false;
                e.idle_since = None;
                out.push(i);
            }
        }
        if out.len() > before {
            // One sweep for all retired sockets (not one per socket).
            let egress = &self.egress;
            for socks in &mut self.sockets {
                socks.retain(|&s| egress.get(s as usize).is_some_and(|e| e.live));
            }
        }
    }

    /// Picks the egress socket for a new flow to `target`: one that serves no flow to that
    /// address yet and does not quarantine it. Searches from where the last search for the
    /// same target ended, so opening many flows to one target costs O(1) each.
    pub fn assign(&mut self, target: SocketAddr, now: Instant) -> Assign {
        self.expire_quarantine(now);
        let f = family(&target);
        // An empty socket first (it cannot serve the target yet); then a new one while the
        // family has fewer than SPREAD.
        while let Some(&e) = self.empty[f].last() {
            match self.egress.get(e as usize) {
                Some(x) if x.live && x.load == 0 => return Assign::Socket(e),
                _ => {
                    self.empty[f].pop();
                }
            }
        }
        let socks = &self.sockets[f];
        let n = socks.len();
        if n < SPREAD {
            return Assign::NeedSocket;
        }
        let remote = self.remotes.get(&target).copied().unwrap_or_default();
        // Every socket already carries a flow to the target or quarantines it: no search. The
        // next search starts at the socket about to be added (sockets are appended), where
        // the ones this target has not used yet are.
        if remote.held as usize >= n {
            if let Some(r) = self.remotes.get_mut(&target) {
                r.cursor = n as u32;
            }
            return Assign::NeedSocket;
        }
        for k in 0..n {
            let i = (remote.cursor as usize + k) % n;
            let s = socks[i];
            if !self.demux.contains_key(&PairKey::new(s, target)) {
                let r = self.remotes.entry(target).or_default();
                // Not reduced modulo n: if sockets are added meanwhile, the next search starts at
                // the first of them rather than wrapping to the start.
                r.cursor = (i + 1) as u32;
                return Assign::Socket(s);
            }
        }
        Assign::NeedSocket
    }

    /// Opens a flow on `target` (from [`FlowTable::assign`]).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &mut self,
        flow: Flow,
        client: ClientRef,
        version: HttpVersion,
        target: TargetRef,
        decoder: Option<Box<CapsuleDecoder>>,
        permit: FlowPermit,
        now: Instant,
    ) -> FlowId {
        let deadline = flow.poll_timeout();
        let (idx, gen) = self.flows.insert(FlowEntry {
            flow,
            client,
            version,
            target,
            decoder,
            capsules: false,
            permit,
            bucket: NO_TIMER,
            pos: 0,
        });
        let id = FlowId { idx, gen };
        self.demux
            .insert(PairKey::new(target.egress, target.addr), Pair::Flow(id));
        let r = self.remotes.entry(target.addr).or_default();
        r.flows += 1;
        r.held += 1;
        self.load(target.egress, now, true);
        self.arm(idx, deadline);
        id
    }

    pub fn get(&self, id: FlowId) -> Option<&FlowEntry> {
        self.flows.get(id.idx, id.gen)
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut FlowEntry> {
        self.flows.get_mut(id.idx, id.gen)
    }

    /// The flow a target datagram belongs to: the one on `egress` to `source`. `None` for any
    /// other source (dropped and counted by the caller).
    pub fn demux(&self, egress: u32, source: SocketAddr) -> Option<FlowId> {
        match self.demux.get(&PairKey::new(egress, source)) {
            Some(Pair::Flow(id)) => Some(*id),
            _ => None,
        }
    }

    /// Removes a flow; its (socket, target) pair is quarantined. Returns the entry (its permit
    /// goes with it when dropped).
    pub fn close(&mut self, id: FlowId, now: Instant) -> Option<FlowEntry> {
        let e = self.flows.remove(id.idx, id.gen)?;
        self.disarm(e.bucket, e.pos);
        let key = PairKey::new(e.target.egress, e.target.addr);
        let seq = self.next_quarantine;
        self.next_quarantine = seq.wrapping_add(1);
        self.demux.insert(key, Pair::Quarantined(seq));
        self.quarantine
            .push_back((now + QUARANTINE, seq, key, e.target.addr));
        if let Some(r) = self.remotes.get_mut(&e.target.addr) {
            r.flows = r.flows.saturating_sub(1);
        }
        Some(e)
    }

    fn expire_quarantine(&mut self, now: Instant) {
        while let Some(&(until, seq, key, addr)) = self.quarantine.front() {
            if until > now {
                break;
            }
            self.quarantine.pop_front();
            // Only if it is still this quarantine (a later close may have renewed it).
            if self.demux.get(&key) == Some(&Pair::Quarantined(seq)) {
                self.demux.remove(&key);
                self.load(key.egress(), now, false);
                if let Some(r) = self.remotes.get_mut(&addr) {
                    r.held = r.held.saturating_sub(1);
                    if r.held == 0 {
                        self.remotes.remove(&addr);
                    }
                }
            }
        }
    }

    /// The earliest deadline in the table: a flow's idle timeout, a quarantine's end, an
    /// idle egress socket's retirement.
    pub fn next_deadline(&self) -> Option<Instant> {
        let t = self.timers.keys().next().map(|&b| self.bucket_end(b));
        let q = self.quarantine.front().map(|(t, ..)| *t);
        let r = self.idle.front().map(|(t, _)| *t + EGRESS_IDLE);
        [t, q, r].into_iter().flatten().min()
    }

    /// Flows whose idle timeout has passed, up to `max`, into `out` (the caller closes them).
    /// A flow that was active meanwhile moves to the bucket of its new deadline.
    pub fn expired(&mut self, now: Instant, max: usize, out: &mut Vec<(FlowId, CloseReason)>) {
        self.expire_quarantine(now);
        while out.len() < max {
            let Some(&b) = self.timers.keys().next() else {
                return;
            };
            if self.bucket_end(b) > now {
                return;
            }
            let Some(mut first) = self.timers.first_entry() else {
                return;
            };
            // The bucket's last flow: taking it moves no other.
            let Some(idx) = first.get_mut().pop() else {
                first.remove();
                continue;
            };
            if first.get().is_empty() {
                first.remove();
            }
            let Some((gen, e)) = self.flows.get_any_mut(idx) else {
                continue;
            };
            e.bucket = NO_TIMER;
            match e.flow.handle_timeout(now) {
                // Out of the timers now; `close` finds nothing there to remove.
                Some(reason) => out.push((FlowId { idx, gen }, reason)),
                // Its deadline is after `now`, so after this bucket: a later one.
                None => {
                    let deadline = e.flow.poll_timeout();
                    self.arm(idx, deadline);
                }
            }
        }
    }

    /// Every flow, for shutdown.
    pub fn ids(&self) -> Vec<FlowId> {
        self.flows
            .iter()
            .map(|(idx, gen, _)| FlowId { idx, gen })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::limits::FlowLimiter;

    fn flow(now: Instant) -> Flow {
        Flow::new(now, Duration::from_secs(120), 65_527)
    }

    fn open(t: &mut FlowTable, target: SocketAddr, stream: u64, now: Instant) -> FlowId {
        let egress = match t.assign(target, now) {
            Assign::Socket(e) => e,
            Assign::NeedSocket => {
                let e = t.egress.len() as u32;
                t.add_egress(target.is_ipv6(), e, now);
                match t.assign(target, now) {
                    Assign::Socket(e) => e,
                    Assign::NeedSocket => panic!("a new socket serves the target"),
                }
            }
        };
        let permit = FlowLimiter::new(0, 0).acquire(None).unwrap();
        t.open(
            flow(now),
            ClientRef::H3 { conn: 1, stream },
            HttpVersion::Http3,
            TargetRef {
                egress,
                addr: target,
            },
            None,
            permit,
            now,
        )
    }

    /// Memory per idle flow is a target (flow-scale reports it): the table's slot for a flow
    /// (held inline with its generation) and its demux entry must not grow unnoticed.
    #[test]
    fn a_flow_slot_stays_small() {
        let slot = crate::relay::slots::slot_size::<FlowEntry>();
        assert!(slot <= 208, "a flow slot is {slot} bytes");
        assert_eq!(
            std::mem::size_of::<(PairKey, Pair)>(),
            36,
            "a demux entry is 36 bytes"
        );
    }

    #[test]
    fn sustained_churn_needs_as_many_sockets_as_the_quarantine_holds_and_no_more() {
        // 50 000 flows/s opened and closed at once, over 64 target ports: each port has
        // 50 000 / 64 * 2 s = 1 563 pairs in quarantine at any time, so about that many
        // sockets, and the pool stops growing once the first quarantines end.
        let mut now = Instant::now();
        let mut t = FlowTable::new();
        let port = |i: usize| SocketAddr::new([192, 0, 2, 1].into(), 1000 + (i % 64) as u16);
        let mut sizes = Vec::new();
        for round in 0..4 {
            for i in 0..100_000usize {
                now += Duration::from_micros(20);
                let id = open(&mut t, port(i), (round * 100_000 + i) as u64, now);
                assert_eq!(t.demux(t.get(id).unwrap().target.egress, port(i)), Some(id));
                t.close(id, now);
            }
            sizes.push(t.egress_count(false));
        }
        assert!(
            (1563..=1563 + SPREAD).contains(&sizes[0]),
            "sockets after 2 s: {sizes:?}"
        );
        assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
        assert!(t.is_empty());
    }

    #[test]
    fn flows_get_sockets_of_their_own_up_to_the_spread_then_share_them() {
        let now = Instant::now();
        let mut t = FlowTable::new();
        let a: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let ids: Vec<FlowId> = (0..5).map(|i| open(&mut t, a, 4 * i, now)).collect();
        assert_eq!(
            t.egress_count(false),
            5,
            "five flows to one target: five sockets"
        );
        let egress: Vec<u32> = ids
            .iter()
            .map(|i| t.get(*i).unwrap().target.egress)
            .collect();
        let mut uniq = egress.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 5);
        // Up to SPREAD sockets, every flow has its own (whatever its target).
        for i in 5..SPREAD as u64 {
            open(
                &mut t,
                SocketAddr::new("192.0.2.2".parse().unwrap(), 1000 + i as u16),
                i,
                now,
            );
        }
        assert_eq!(t.egress_count(false), SPREAD);
        // Beyond, flows to other targets share the sockets...
        for i in 0..100u16 {
            open(
                &mut t,
                SocketAddr::new("192.0.2.3".parse().unwrap(), i + 1),
                5000 + u64::from(i),
                now,
            );
        }
        assert_eq!(t.egress_count(false), SPREAD);
        // ...while flows to one target still need one socket each.
        for i in 5..(SPREAD as u64 + 3) {
            open(&mut t, a, 9000 + i, now);
        }
        assert_eq!(t.egress_count(false), SPREAD + 3);
        // Each datagram finds its flow by (socket, source); any other source finds none.
        for (id, e) in ids.iter().zip(&egress) {
            assert_eq!(t.demux(*e, a), Some(*id));
        }
        let stranger: SocketAddr = "198.51.100.9:443".parse().unwrap();
        assert_eq!(t.demux(egress[0], stranger), None);
        assert_eq!(t.demux(egress[0], "192.0.2.1:444".parse().unwrap()), None);
        // IPv6 targets have sockets of their own.
        open(&mut t, "[2001:db8::1]:443".parse().unwrap(), 99_999, now);
        assert_eq!(t.egress_count(true), 1);
    }

    #[test]
    fn a_closed_flows_pair_is_quarantined_before_reuse() {
        let t0 = Instant::now();
        let mut t = FlowTable::new();
        let a: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let first = open(&mut t, a, 0, t0);
        let e = t.get(first).unwrap().target.egress;
        assert!(t.close(first, t0).is_some());
        assert!(t.get(first).is_none(), "stale id finds nothing");
        // A late reply meant for the closed flow reaches no one...
        assert_eq!(t.demux(e, a), None);
        // ...and a new flow to the same target cannot take the pair yet.
        let second = open(&mut t, a, 4, t0);
        assert_ne!(t.get(second).unwrap().target.egress, e);
        assert_eq!(t.egress_count(false), 2);
        // After the quarantine the pair is free again.
        let later = t0 + QUARANTINE + Duration::from_millis(1);
        assert_eq!(t.assign(a, later), Assign::Socket(e));
    }

    #[test]
    fn idle_flows_expire_lazily_and_active_ones_stay() {
        let t0 = Instant::now();
        let mut t = FlowTable::new();
        let a = open(&mut t, "192.0.2.1:1".parse().unwrap(), 0, t0);
        let b = open(&mut t, "192.0.2.1:2".parse().unwrap(), 4, t0);
        // b is active halfway through its idle timeout.
        let mid = t0 + Duration::from_secs(60);
        assert_eq!(
            t.get_mut(b).unwrap().flow.on_client_datagram(mid, 0, 10),
            crate::relay::flow::ClientDatagram::Forward
        );
        let mut out = Vec::new();
        t.expired(t0 + Duration::from_secs(121), 10, &mut out);
        assert_eq!(out, vec![(a, CloseReason::Idle)]);
        t.close(a, t0 + Duration::from_secs(121));
        out.clear();
        t.expired(t0 + Duration::from_secs(170), 10, &mut out);
        assert!(out.is_empty(), "b was active at 60 s");
        t.expired(t0 + Duration::from_secs(181), 10, &mut out);
        assert_eq!(out, vec![(b, CloseReason::Idle)]);
    }

    #[test]
    fn a_flow_expires_within_a_tick_of_its_timeout_and_closed_flows_leave_their_timers() {
        let t0 = Instant::now();
        let mut t = FlowTable::new();
        let idle = Duration::from_secs(120);
        let ids: Vec<FlowId> = (0..1000u16)
            .map(|i| {
                let a = SocketAddr::new([192, 0, 2, 1].into(), 1 + i);
                open(&mut t, a, u64::from(i) * 4, t0)
            })
            .collect();
        // Every other flow closes early: its timer goes with it (no stale entry to skip).
        for id in ids.iter().step_by(2) {
            assert!(t.close(*id, t0).is_some());
        }
        let timers: usize = t.timers.values().map(Vec::len).sum();
        assert_eq!(timers, 500);
        // Each remaining flow's slot knows its place in its bucket.
        for (&b, v) in &t.timers {
            for (pos, &idx) in v.iter().enumerate() {
                let (_, e) = t.flows.get_any_mut(idx).unwrap();
                assert_eq!((e.bucket, e.pos), (b, pos as u32));
            }
        }
        let mut out = Vec::new();
        t.expired(t0 + idle - Duration::from_millis(1), usize::MAX, &mut out);
        assert!(out.is_empty(), "expired before the idle timeout");
        // The first bucket with flows passes within a tick after their deadline.
        let due = t.bucket_end(*t.timers.keys().next().unwrap());
        assert!(
            due >= t0 + idle && due <= t0 + idle + TICK,
            "{:?}",
            due - t0
        );
        t.expired(t0 + idle + TICK, usize::MAX, &mut out);
        assert!(out.iter().all(|(_, r)| *r == CloseReason::Idle));
        let mut expired: Vec<FlowId> = out.iter().map(|(id, _)| *id).collect();
        let mut open: Vec<FlowId> = ids.iter().skip(1).step_by(2).copied().collect();
        expired.sort();
        open.sort();
        assert_eq!(
            expired, open,
            "every open flow expires within a tick, no closed one"
        );
        assert!(t.timers.is_empty());
    }

    #[test]
    fn idle_egress_sockets_are_retired_and_their_indices_reused() {
        let t0 = Instant::now();
        let mut t = FlowTable::new();
        let a: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let ids: Vec<FlowId> = (0..3).map(|i| open(&mut t, a, 4 * i, t0)).collect();
        assert_eq!(t.egress_count(false), 3);
        for id in &ids {
            t.close(*id, t0);
        }
        let mut out = Vec::new();
        // Still quarantined: nothing retires.
        t.retire(t0 + QUARANTINE, &mut out);
        assert!(out.is_empty());
        let mut none = Vec::new();
        t.expired(t0 + QUARANTINE + Duration::from_millis(1), 10, &mut none);
        let due = t.next_deadline().unwrap();
        assert!(due <= t0 + QUARANTINE + EGRESS_IDLE + Duration::from_millis(1));
        t.retire(due, &mut out);
        out.sort();
        assert_eq!(out, vec![0, 1, 2]);
        assert_eq!(t.egress_count(false), 0);
        // A retired index may be given to a new socket.
        t.add_egress(false, 1, due);
        assert_eq!(t.assign(a, due), Assign::Socket(1));
    }
}
