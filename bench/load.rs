//! What every client shares: the run's clock and phases, the load shape (which flow sends next),
//! and the recorder that counts datagrams and round-trip times. No I/O: each client's event loop
//! asks [`Load`] what to send and tells [`Recorder`] what happened.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::wire::{DownloadRequest, Header, Kind, HEADER_LEN};

/// The phases of a run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Flows are being opened; nothing is sent yet.
    Setup,
    /// Sending, not counted.
    Warmup,
    /// Sending and counted.
    Measure,
    /// Not sending; waiting for what is in flight.
    Drain,
    Done,
}

/// The run's clock: time zero, and when each phase starts once the load begins.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub epoch: Instant,
    /// Set when the load starts (after the flows are open).
    pub load_start: Option<Instant>,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
}

impl Clock {
    pub fn new(warmup: Duration, duration: Duration, drain: Duration) -> Self {
        Clock {
            epoch: Instant::now(),
            load_start: None,
            warmup,
            duration,
            drain,
        }
    }

    pub fn start_load(&mut self, now: Instant) {
        self.load_start.get_or_insert(now);
    }

    pub fn measure_start(&self) -> Option<Instant> {
        self.load_start.map(|t| t + self.warmup)
    }

    pub fn measure_end(&self) -> Option<Instant> {
        self.measure_start().map(|t| t + self.duration)
    }

    pub fn phase(&self, now: Instant) -> Phase {
        let Some(start) = self.load_start else {
            return Phase::Setup;
        };
        let m = start + self.warmup;
        let e = m + self.duration;
        if now < m {
            Phase::Warmup
        } else if now < e {
            Phase::Measure
        } else if now < e + self.drain {
            Phase::Drain
        } else {
            Phase::Done
        }
    }

    /// Nanoseconds since the epoch, for send timestamps.
    pub fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// How flows send.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// Closed loop: each flow keeps this many datagrams in flight (echo mode); one with no
    /// reply after `loss_timeout` is counted as lost and a replacement is sent.
    Closed {
        inflight: u32,
        loss_timeout: Duration,
    },
    /// Open loop: this many datagrams per second for the whole group, round-robin over flows,
    /// `burst` datagrams of a flow back to back before the next flow's turn (1 but in upload
    /// runs).
    Rate { per_sec: f64, burst: u32 },
    /// As fast as the transport takes them (one-way and upload runs without a rate), `burst`
    /// datagrams of a flow back to back as in [`Shape::Rate`].
    Unlimited { burst: u32 },
}

/// The default of [`Shape::Closed`]'s `loss_timeout` (`--loss-timeout-ms`): about ten times
/// the worst round-trip p99 the suite has seen on loopback (20-30 ms under load), so an echo
/// that is merely late is rarely given up on, and a lost one costs a flow a quarter second.
pub const LOSS_TIMEOUT: Duration = Duration::from_millis(250);
/// Tokens an open-loop group may bank, in seconds of its rate: a loop that falls behind loses
/// the excess, and the offered rate it reports says so.
const MAX_BANK_SECS: f64 = 0.01;

#[derive(Debug, Clone)]
struct FlowLoad {
    open: bool,
    credit: u32,
    queued: bool,
    /// Closed loop: when each datagram in flight was sent, oldest first. A reply retires the
    /// oldest entry (replies carry no credit identity the load could use, and echoes mostly
    /// come back in order), so a lost datagram's entry is the one left behind and times out at
    /// most one window after its own send time.
    in_flight: VecDeque<Instant>,
}

/// The load of one group of flows (one connection, one socket): decides which flow sends next.
///
/// Closed loop (echo): each flow has `inflight` credits; a send takes one, a reply gives one
/// back, and a datagram still unanswered `loss_timeout` after it was sent is counted as lost
/// ([`Load::take_timeouts`]) and gives its credit back, so the flow sends a replacement. Without
/// that, every lost datagram (a relay dropping the first burst, a full socket buffer) would
/// shrink the window for good, and a flow that lost them all would stall for the rest of the run.
#[derive(Debug)]
pub struct Load {
    shape: Shape,
    flows: Vec<FlowLoad>,
    /// Closed loop: flows with credit, each at most once.
    ready: VecDeque<u32>,
    /// Open loop: open flows, for round-robin.
    open: Vec<u32>,
    rr: usize,
    /// Open loop: datagrams the flow whose turn it is has sent of its burst.
    burst_sent: u32,
    tokens: f64,
    last: Option<Instant>,
    /// Closed loop: datagrams in flight over all flows, when the last scan for lost ones ran,
    /// and how many were given up since [`Load::take_timeouts`] was last called.
    in_flight: usize,
    last_scan: Option<Instant>,
    timeouts: u64,
}

impl Load {
    pub fn new(shape: Shape, flows: usize) -> Self {
        Load {
            shape,
            flows: vec![
                FlowLoad {
                    open: false,
                    credit: 0,
                    queued: false,
                    in_flight: VecDeque::new(),
                };
                flows
            ],
            ready: VecDeque::new(),
            open: Vec::new(),
            rr: 0,
            burst_sent: 0,
            tokens: 0.0,
            last: None,
            in_flight: 0,
            last_scan: None,
            timeouts: 0,
        }
    }

    #[cfg(test)]
    pub fn open_flows(&self) -> usize {
        self.open.len()
    }

    /// Closed loop: datagrams in flight over all flows.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The flow may now send.
    pub fn open_flow(&mut self, i: usize, _now: Instant) {
        let f = &mut self.flows[i];
        if f.open {
            return;
        }
        f.open = true;
        self.open.push(i as u32);
        if let Shape::Closed { inflight, .. } = self.shape {
            f.credit = inflight;
            if !f.queued {
                f.queued = true;
                self.ready.push_back(i as u32);
            }
        }
    }

    /// The flow can no longer send (its stream or connection ended).
    pub fn close_flow(&mut self, i: usize) {
        let Some(f) = self.flows.get_mut(i) else {
            return;
        };
        if !f.open {
            return;
        }
        f.open = false;
        f.credit = 0;
        self.in_flight -= f.in_flight.len();
        f.in_flight.clear();
        self.open.retain(|&x| x as usize != i);
    }

    /// An echo (or anything) came back on flow `i`: in closed loop, one more may be sent. A
    /// reply to a datagram already counted as lost finds nothing in flight and is ignored, so
    /// a flow never has more than `inflight` credits.
    pub fn on_reply(&mut self, i: usize, _now: Instant) {
        if let Shape::Closed { .. } = self.shape {
            let Some(f) = self.flows.get_mut(i) else {
                return;
            };
            if f.open && f.in_flight.pop_front().is_some() {
                self.in_flight -= 1;
                f.credit += 1;
                if !f.queued {
                    f.queued = true;
                    self.ready.push_back(i as u32);
                }
            }
        }
    }

    /// The last datagram `send` accepted for flow `i` did not leave after all (a batch the
    /// socket took only part of): in closed loop its credit comes back at once.
    pub fn cancel(&mut self, i: usize) {
        if let Shape::Closed { .. } = self.shape {
            let Some(f) = self.flows.get_mut(i) else {
                return;
            };
            if f.open && f.in_flight.pop_back().is_some() {
                self.in_flight -= 1;
                f.credit += 1;
                if !f.queued {
                    f.queued = true;
                    self.ready.push_back(i as u32);
                }
            }
        }
    }

    /// Closed loop: datagrams counted as lost after the timeout since the last call.
    pub fn take_timeouts(&mut self) -> u64 {
        std::mem::take(&mut self.timeouts)
    }

    /// Offers up to `budget` sends, in order, to `send(flow)`, which returns false when the
    /// transport takes no more now (the flow keeps its turn). Returns how many were sent.
    pub fn poll(
        &mut self,
        now: Instant,
        budget: usize,
        mut send: impl FnMut(usize) -> bool,
    ) -> usize {
        let mut sent = 0;
        match self.shape {
            Shape::Closed { loss_timeout, .. } => {
                self.expire(now, loss_timeout);
                // A flow that cannot send now goes to the back of the queue (it keeps its
                // credit); a full round of refusals ends the poll.
                let mut refused = 0;
                while sent < budget && refused < self.ready.len() {
                    let Some(&i) = self.ready.front() else { break };
                    if !self.flows[i as usize].open {
                        self.flows[i as usize].queued = false;
                        self.ready.pop_front();
                        continue;
                    }
                    if !send(i as usize) {
                        self.ready.rotate_left(1);
                        refused += 1;
                        continue;
                    }
                    refused = 0;
                    sent += 1;
                    let f = &mut self.flows[i as usize];
                    f.credit -= 1;
                    f.in_flight.push_back(now);
                    self.in_flight += 1;
                    if f.credit == 0 {
                        f.queued = false;
                        self.ready.pop_front();
                    }
                }
            }
            Shape::Rate { per_sec, burst } => {
                if self.open.is_empty() {
                    self.last = Some(now);
                    return 0;
                }
                let last = *self.last.get_or_insert(now);
                let dt = now.saturating_duration_since(last).as_secs_f64();
                self.last = Some(now);
                let cap = (per_sec * MAX_BANK_SECS).max(1.0);
                self.tokens = (self.tokens + per_sec * dt).min(cap);
                // A flow that cannot send now (no flow-control credit) is skipped, not waited
                // on: waiting on it would hold back the flows that do have credit, and with
                // HTTP/2 those may be holding the very connection credit it waits for.
                let mut refused = 0;
                while sent < budget && self.tokens >= 1.0 && refused < self.open.len() {
                    let i = self.open[self.rr % self.open.len()] as usize;
                    if !send(i) {
                        self.next_turn();
                        refused += 1;
                        continue;
                    }
                    self.sent_in_turn(burst);
                    refused = 0;
                    self.tokens -= 1.0;
                    sent += 1;
                }
            }
            Shape::Unlimited { burst } => {
                // As for Rate: a refusing flow is skipped; a full round of refusals ends the poll.
                let mut refused = 0;
                while sent < budget && refused < self.open.len() {
                    let i = self.open[self.rr % self.open.len()] as usize;
                    if !send(i) {
                        self.next_turn();
                        refused += 1;
                        continue;
                    }
                    self.sent_in_turn(burst);
                    refused = 0;
                    sent += 1;
                }
            }
        }
        sent
    }

    /// Open loop: the next flow's turn (a refusing flow's burst is cut short).
    fn next_turn(&mut self) {
        self.rr = self.rr.wrapping_add(1);
        self.burst_sent = 0;
    }

    /// Open loop: the flow whose turn it is sent one more of its `burst`.
    fn sent_in_turn(&mut self, burst: u32) {
        self.burst_sent += 1;
        if self.burst_sent >= burst.max(1) {
            self.next_turn();
        }
    }

    /// When the group next has something to send, if it is waiting on time alone.
    pub fn next_send(&self, now: Instant) -> Option<Instant> {
        match self.shape {
            Shape::Rate { per_sec, .. } if !self.open.is_empty() && per_sec > 0.0 => {
                let need = (1.0 - self.tokens).max(0.0) / per_sec;
                // At least 100 us apart: sends are batched rather than paced one by one.
                Some(now + Duration::from_secs_f64(need).max(Duration::from_micros(100)))
            }
            // The next scan for datagrams past their timeout.
            Shape::Closed { loss_timeout, .. } if self.in_flight > 0 => {
                Some(now + (loss_timeout / 4).max(Duration::from_millis(1)))
            }
            Shape::Unlimited { .. } if !self.open.is_empty() => Some(now),
            _ => None,
        }
    }

    /// True when something can be sent right now without waiting for a reply or time.
    pub fn has_ready(&self) -> bool {
        match self.shape {
            Shape::Closed { .. } => !self.ready.is_empty(),
            Shape::Rate { .. } => !self.open.is_empty() && self.tokens >= 1.0,
            Shape::Unlimited { .. } => !self.open.is_empty(),
        }
    }

    /// Counts the datagrams sent `timeout` ago or earlier and still unanswered as lost, and
    /// gives their credit back. Scans at most every quarter timeout (every flow is looked at),
    /// so a datagram is given up between 1 and 1.25 timeouts after it was sent.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        if self.in_flight == 0
            || self
                .last_scan
                .is_some_and(|t| now.saturating_duration_since(t) < timeout / 4)
        {
            return;
        }
        self.last_scan = Some(now);
        for (i, f) in self.flows.iter_mut().enumerate() {
            while f
                .in_flight
                .front()
                .is_some_and(|&t| now.saturating_duration_since(t) >= timeout)
            {
                f.in_flight.pop_front();
                self.in_flight -= 1;
                self.timeouts += 1;
                f.credit += 1;
            }
            if f.open && f.credit > 0 && !f.queued {
                f.queued = true;
                self.ready.push_back(i as u32);
            }
        }
    }
}

/// Download runs: how far the burst a flow is receiving has come.
#[derive(Debug, Clone, Copy, Default)]
struct BurstProgress {
    seen: bool,
    /// The burst's request: its datagrams' sequence / B.
    id: u32,
    got: u32,
    done: bool,
}

/// Flows whose bursts are followed one by one; a flow ID beyond it (not one of this client's)
/// completes a request on a burst's last datagram alone.
const MAX_TRACKED_FLOWS: usize = 1 << 22;

/// Counts and round-trip times of one run, on the client side.
#[derive(Debug)]
pub struct Recorder {
    pub clock: Clock,
    pub tag: u32,
    /// What the client's payloads ask of the target.
    pub kind: Kind,
    /// Bytes of each payload the client sends (a download request, not its answer).
    pub size: usize,
    /// Download runs: the burst each request asks for.
    pub download: Option<DownloadRequest>,
    /// Measured datagrams handed to the transport, and their payload bytes.
    pub sent: u64,
    pub sent_bytes: u64,
    /// Measured datagrams that came back (echo), and their bytes.
    pub received: u64,
    pub received_bytes: u64,
    /// All datagrams sent and received, warm-up included (for the progress line).
    pub sent_all: u64,
    pub received_all: u64,
    /// Sends the transport refused (its buffer or flow-control window was full).
    pub blocked: u64,
    /// Closed loop: datagrams given up as lost after the loss timeout (and replaced), every
    /// phase.
    pub timed_out: u64,
    /// Payloads that came back but were not ours, or not of this run.
    pub foreign: u64,
    /// Round-trip times in nanoseconds (measured datagrams only); in download runs, request to
    /// the arrival of each datagram of its burst.
    pub rtt: Histogram<u64>,
    seq: u32,
    /// Download runs: per flow ID.
    bursts: Vec<BurstProgress>,
}

impl Recorder {
    pub fn new(clock: Clock, tag: u32, kind: Kind, size: usize) -> Self {
        Recorder {
            clock,
            tag,
            kind,
            size: size.max(HEADER_LEN),
            download: None,
            sent: 0,
            sent_bytes: 0,
            received: 0,
            received_bytes: 0,
            sent_all: 0,
            received_all: 0,
            blocked: 0,
            timed_out: 0,
            foreign: 0,
            rtt: new_histogram(),
            seq: 0,
            bursts: Vec::new(),
        }
    }

    /// A download run's recorder: each request asks for `req`.
    pub fn with_download(mut self, req: DownloadRequest) -> Self {
        self.download = Some(req);
        self
    }

    /// True while sending is allowed.
    pub fn sending(&self, now: Instant) -> bool {
        matches!(self.clock.phase(now), Phase::Warmup | Phase::Measure)
    }

    /// Writes a payload for `flow` into `buf` (exactly `self.size` bytes) and counts it as sent.
    /// The caller calls [`Recorder::unsend`] if the transport then refuses it.
    pub fn fill(&mut self, now: Instant, flow: u32, buf: &mut [u8]) {
        let measured = self.clock.phase(now) == Phase::Measure;
        self.seq = self.seq.wrapping_add(1);
        Header {
            kind: self.kind,
            measured,
            tag: self.tag,
            flow,
            seq: self.seq,
            sent_ns: self.clock.ns(now),
        }
        .write(buf);
        if let Some(d) = &self.download {
            d.write(buf);
        }
        self.sent_all += 1;
        if measured {
            self.sent += 1;
            self.sent_bytes += buf.len() as u64;
        }
    }

    /// A payload built by [`Recorder::fill`] was not taken by the transport.
    pub fn unsend(&mut self, buf: &[u8]) {
        self.blocked += 1;
        self.sent_all -= 1;
        if Header::read(buf).is_some_and(|h| h.measured) {
            self.sent -= 1;
            self.sent_bytes -= buf.len() as u64;
        }
    }

    /// A payload came back. Returns its flow when it answers a request in full, so the flow
    /// may send again: an echo does on its own; a burst datagram when it is the last of its
    /// burst, or completes the count. `None` for anything else (counted as foreign when it is
    /// not ours).
    pub fn on_receive(&mut self, now: Instant, payload: &[u8]) -> Option<u32> {
        let want = if self.download.is_some() {
            Kind::Burst
        } else {
            Kind::Echo
        };
        let h = match Header::read(payload) {
            Some(h) if h.tag == self.tag && h.kind == want => h,
            _ => {
                self.foreign += 1;
                return None;
            }
        };
        if self.clock.phase(now) != Phase::Done {
            self.received_all += 1;
            if h.measured {
                self.received += 1;
                self.received_bytes += payload.len() as u64;
                let rtt = self.clock.ns(now).saturating_sub(h.sent_ns).max(1);
                let _ = self.rtt.record(rtt);
            }
        }
        match self.download {
            Some(d) => self.burst_done(h.flow, h.seq, d.burst).then_some(h.flow),
            None => Some(h.flow),
        }
    }

    /// Download runs: a datagram of flow `flow` with sequence `seq` arrived; true when it
    /// completes its burst (its last datagram, or the burst's count reached).
    fn burst_done(&mut self, flow: u32, seq: u32, burst: u16) -> bool {
        let b = u32::from(burst.max(1));
        let (id, last) = (seq / b, seq % b == b - 1);
        let f = flow as usize;
        if f >= MAX_TRACKED_FLOWS {
            return last;
        }
        if self.bursts.len() <= f {
            self.bursts.resize(f + 1, BurstProgress::default());
        }
        let p = &mut self.bursts[f];
        if !p.seen || p.id != id {
            *p = BurstProgress {
                seen: true,
                id,
                got: 0,
                done: false,
            };
        }
        p.got += 1;
        if !p.done && (last || p.got >= b) {
            p.done = true;
            return true;
        }
        false
    }

    /// Adds another recorder's counts (clients with several threads).
    pub fn merge(&mut self, o: &Recorder) {
        self.sent += o.sent;
        self.sent_bytes += o.sent_bytes;
        self.received += o.received;
        self.received_bytes += o.received_bytes;
        self.sent_all += o.sent_all;
        self.received_all += o.received_all;
        self.blocked += o.blocked;
        self.timed_out += o.timed_out;
        self.foreign += o.foreign;
        let _ = self.rtt.add(&o.rtt);
    }
}

/// A histogram for nanoseconds from 1 ns to 60 s, three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock_in_measure() -> (Clock, Instant) {
        let mut c = Clock::new(
            Duration::from_secs(1),
            Duration::from_secs(10),
            Duration::ZERO,
        );
        let t0 = c.epoch;
        c.start_load(t0);
        (c, t0 + Duration::from_secs(2))
    }

    #[test]
    fn phases_follow_the_clock() {
        let mut c = Clock::new(
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(1),
        );
        let t0 = c.epoch;
        assert_eq!(c.phase(t0), Phase::Setup);
        c.start_load(t0);
        assert_eq!(c.phase(t0), Phase::Warmup);
        assert_eq!(c.phase(t0 + Duration::from_millis(1500)), Phase::Measure);
        assert_eq!(c.phase(t0 + Duration::from_millis(3500)), Phase::Drain);
        assert_eq!(c.phase(t0 + Duration::from_secs(5)), Phase::Done);
    }

    #[test]
    fn closed_loop_keeps_k_in_flight() {
        let now = Instant::now();
        let mut l = Load::new(closed(3), 2);
        l.open_flow(0, now);
        l.open_flow(1, now);
        let mut sent = Vec::new();
        assert_eq!(
            l.poll(now, 100, |f| {
                sent.push(f);
                true
            }),
            6
        );
        assert_eq!(sent, vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(l.poll(now, 100, |_| true), 0);
        l.on_reply(1, now);
        let mut sent = Vec::new();
        l.poll(now, 100, |f| {
            sent.push(f);
            true
        });
        assert_eq!(sent, vec![1]);
        // A refusing transport keeps the credit.
        l.on_reply(0, now);
        assert_eq!(l.poll(now, 100, |_| false), 0);
        assert!(l.has_ready());
    }

    #[test]
    fn a_flow_without_credit_is_skipped_not_waited_on() {
        // HTTP/2: a stream with no flow-control credit must not hold back the others (they
        // may hold the connection credit it waits for).
        let now = Instant::now();
        for shape in [
            Shape::Unlimited { burst: 1 },
            Shape::Rate {
                per_sec: 1e9,
                burst: 1,
            },
            closed(2),
        ] {
            let mut l = Load::new(shape, 3);
            for f in 0..3 {
                l.open_flow(f, now);
            }
            // Rate: the first poll starts the bucket's clock; it fills until `later`.
            l.poll(now, 0, |_| true);
            let later = now + Duration::from_millis(10);
            let mut sent = Vec::new();
            l.poll(later, 6, |f| {
                if f == 0 {
                    return false;
                }
                sent.push(f);
                true
            });
            assert!(!sent.is_empty(), "{shape:?}: nothing sent");
            assert!(
                sent.contains(&1) && sent.contains(&2),
                "{shape:?}: {sent:?}"
            );
            // When every flow refuses, the poll ends instead of spinning.
            assert_eq!(l.poll(later, 100, |_| false), 0, "{shape:?}");
        }
    }

    #[test]
    fn a_closed_flow_no_longer_sends() {
        let now = Instant::now();
        let mut l = Load::new(closed(1), 2);
        l.open_flow(0, now);
        l.open_flow(1, now);
        l.close_flow(0);
        let mut sent = Vec::new();
        l.poll(now, 10, |f| {
            sent.push(f);
            true
        });
        assert_eq!(sent, vec![1]);
        assert_eq!(l.open_flows(), 1);
    }

    fn closed(inflight: u32) -> Shape {
        Shape::Closed {
            inflight,
            loss_timeout: LOSS_TIMEOUT,
        }
    }

    #[test]
    fn closed_loop_recovers_from_loss() {
        let now = Instant::now();
        let mut l = Load::new(closed(2), 1);
        l.open_flow(0, now);
        assert_eq!(l.poll(now, 10, |_| true), 2);
        let later = now + LOSS_TIMEOUT + Duration::from_millis(1);
        assert_eq!(l.poll(later, 10, |_| true), 2);
        assert_eq!(l.take_timeouts(), 2);
        assert_eq!(l.take_timeouts(), 0);
    }

    /// One datagram of a window is lost while the others come back: only it is given up after
    /// the timeout and replaced (before, the flow ran one short until all of its window was
    /// lost); a late echo of it retires one entry and never adds a credit.
    #[test]
    fn a_lost_datagram_times_out_and_is_replaced() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Load::new(closed(4), 1);
        l.open_flow(0, t0);
        assert_eq!(l.poll(t0, 10, |_| true), 4);
        // Three echoes come back; the fourth datagram is lost.
        for _ in 0..3 {
            l.on_reply(0, t0 + ms(1));
        }
        assert_eq!(l.poll(t0 + ms(2), 10, |_| true), 3);
        assert_eq!(l.in_flight(), 4);
        // Before the timeout nothing is given up (the scan runs at most every quarter timeout).
        assert_eq!(l.poll(t0 + LOSS_TIMEOUT / 2, 10, |_| true), 0);
        assert_eq!(l.take_timeouts(), 0);
        // After it, the oldest entry (sent at t0) is; those sent at t0 + 2 ms are not yet.
        let later = t0 + LOSS_TIMEOUT + ms(1);
        assert_eq!(l.poll(later, 10, |_| true), 1);
        assert_eq!(l.take_timeouts(), 1);
        assert_eq!(l.in_flight(), 4);
        // The late echo retires an entry and gives its credit back: still 4 at most.
        l.on_reply(0, later);
        assert_eq!(l.poll(later, 10, |_| true), 1);
        assert_eq!(l.in_flight(), 4);
        // Echoes beyond what is in flight are ignored.
        for _ in 0..10 {
            l.on_reply(0, later);
        }
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.poll(later, 100, |_| true), 4);
        assert_eq!(l.in_flight(), 4);
        // Nothing ever came back for a closed flow: its entries are dropped, not timed out.
        l.close_flow(0);
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.poll(later + LOSS_TIMEOUT * 2, 10, |_| true), 0);
        assert_eq!(l.take_timeouts(), 0);
    }

    #[test]
    fn a_cancelled_send_gives_its_credit_back_at_once() {
        let t0 = Instant::now();
        let mut l = Load::new(closed(2), 1);
        l.open_flow(0, t0);
        assert_eq!(l.poll(t0, 10, |_| true), 2);
        l.cancel(0);
        assert_eq!(l.in_flight(), 1);
        assert_eq!(l.poll(t0, 10, |_| true), 1);
        assert_eq!(l.take_timeouts(), 0);
    }

    #[test]
    fn rate_is_spread_round_robin() {
        let now = Instant::now();
        let mut l = Load::new(
            Shape::Rate {
                per_sec: 1000.0,
                burst: 1,
            },
            3,
        );
        for i in 0..3 {
            l.open_flow(i, now);
        }
        assert_eq!(l.poll(now, 100, |_| true), 0);
        let mut sent = Vec::new();
        // 6 ms at 1000/s: 6 tokens.
        l.poll(now + Duration::from_millis(6), 100, |f| {
            sent.push(f);
            true
        });
        assert_eq!(sent, vec![0, 1, 2, 0, 1, 2]);
        // Banked tokens are capped at 10 ms of rate.
        assert_eq!(l.poll(now + Duration::from_secs(5), 100, |_| true), 10);
    }

    /// Upload: each flow's turn is a burst of datagrams back to back; a refusing flow's burst is
    /// cut short and the next flow goes on.
    #[test]
    fn upload_bursts_go_back_to_back() {
        let now = Instant::now();
        let mut l = Load::new(Shape::Unlimited { burst: 3 }, 2);
        l.open_flow(0, now);
        l.open_flow(1, now);
        let mut sent = Vec::new();
        l.poll(now, 8, |f| {
            sent.push(f);
            true
        });
        assert_eq!(sent, vec![0, 0, 0, 1, 1, 1, 0, 0]);
        // Flow 0 finishes its turn in the next poll.
        let mut sent = Vec::new();
        l.poll(now, 4, |f| {
            sent.push(f);
            true
        });
        assert_eq!(sent, vec![0, 1, 1, 1]);
        // Flow 0 refuses after one datagram: flow 1 takes over.
        let mut sent = Vec::new();
        let mut zero = 0;
        l.poll(now, 5, |f| {
            if f == 0 {
                zero += 1;
                if zero > 1 {
                    return false;
                }
            }
            sent.push(f);
            true
        });
        assert_eq!(sent, vec![0, 1, 1, 1, 1]);
    }

    fn burst_payload(tag: u32, flow: u32, seq: u32, measured: bool) -> Vec<u8> {
        let mut b = vec![0u8; 100];
        Header {
            kind: Kind::Burst,
            measured,
            tag,
            flow,
            seq,
            sent_ns: 1,
        }
        .write(&mut b);
        b
    }

    /// Download: a request is answered when its burst's last datagram arrives (or all of them
    /// did), once; every measured datagram of the burst is counted.
    #[test]
    fn a_download_request_completes_with_its_burst() {
        let (clock, t) = clock_in_measure();
        let req = DownloadRequest {
            burst: 4,
            size: 100,
        };
        let mut r = Recorder::new(clock, 7, Kind::Download, crate::wire::DOWNLOAD_REQUEST_LEN)
            .with_download(req);
        let mut buf = vec![0u8; crate::wire::DOWNLOAD_REQUEST_LEN];
        r.fill(t, 3, &mut buf);
        assert_eq!(Header::read(&buf).unwrap().kind, Kind::Download);
        assert_eq!(DownloadRequest::read(&buf), Some(req));
        let seq = Header::read(&buf).unwrap().seq;
        let got: Vec<Option<u32>> = (0..4)
            .map(|i| {
                let p = burst_payload(7, 3, crate::wire::burst_seq(seq, 4, i), true);
                r.on_receive(t, &p)
            })
            .collect();
        assert_eq!(got, vec![None, None, None, Some(3)]);
        assert_eq!((r.received, r.received_bytes, r.foreign), (4, 400, 0));
        // The next burst loses its second datagram: the last one still completes it.
        let next = crate::wire::burst_seq(seq + 1, 4, 0);
        for i in [0, 2] {
            assert_eq!(r.on_receive(t, &burst_payload(7, 3, next + i, true)), None);
        }
        assert_eq!(
            r.on_receive(t, &burst_payload(7, 3, next + 3, true)),
            Some(3)
        );
        // A duplicate of the last does not answer twice; an echo is not ours in a download run.
        assert_eq!(r.on_receive(t, &burst_payload(7, 3, next + 3, true)), None);
        let mut echo = burst_payload(7, 3, 1, true);
        echo[4] = Kind::Echo as u8;
        assert_eq!(r.on_receive(t, &echo), None);
        assert_eq!(r.foreign, 1);
        // Reordered: the last arrives first, then the others; the count completes nothing more.
        let third = crate::wire::burst_seq(seq + 2, 4, 0);
        assert_eq!(
            r.on_receive(t, &burst_payload(7, 3, third + 3, false)),
            Some(3)
        );
        for i in 0..3 {
            assert_eq!(
                r.on_receive(t, &burst_payload(7, 3, third + i, false)),
                None
            );
        }
        assert_eq!(r.received, 8);
    }

    #[test]
    fn recorder_counts_only_the_measured_window() {
        let (clock, t) = clock_in_measure();
        let mut r = Recorder::new(clock, 7, Kind::Echo, 64);
        let mut buf = vec![0u8; 64];
        // A warm-up datagram: sent, not measured.
        r.fill(clock.epoch, 1, &mut buf);
        let warm = buf.clone();
        r.fill(t, 2, &mut buf);
        assert_eq!((r.sent, r.sent_all), (1, 2));
        assert_eq!(r.on_receive(t + Duration::from_micros(250), &buf), Some(2));
        assert_eq!(r.on_receive(t, &warm), Some(1));
        assert_eq!((r.received, r.received_all), (1, 2));
        assert_eq!(r.rtt.len(), 1);
        assert_eq!(r.rtt.max(), r.rtt.highest_equivalent(250_000));
        r.unsend(&buf);
        assert_eq!((r.sent, r.blocked), (0, 1));
        // Someone else's payload.
        assert_eq!(r.on_receive(t, b"hello"), None);
        assert_eq!(r.foreign, 1);
    }
}
