//! One flow's state machine: what to do with each datagram, when the flow has gone idle, and why
//! it ended. No I/O and no clock: the caller passes `now` and acts on the returned decisions, so
//! every rule here is tested with virtual time.
//!
//! The transports (HTTP/3, HTTP/2, HTTP/1.1) share this type, which is how they share the
//! rules of RFC 9298 §4-§5 for the payload and the idle timeout of §3.1.

use std::time::{Duration, Instant};

use crate::proto::capsule::MAX_UDP_PAYLOAD;

/// What to do with an HTTP Datagram the client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientDatagram {
    /// Send the payload to the target.
    Forward,
    /// Drop it, for this reason (counted by the caller).
    Drop(DropReason),
    /// Abort the request stream (RFC 9298 §5).
    Abort,
}

/// Why a datagram was dropped. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A context ID the relay did not register (RFC 9298 §4: drop or buffer briefly).
    UnknownContext,
    /// Larger than the configured maximum UDP payload, or than the path MTU allows.
    TooLarge,
    /// The client's side of the tunnel has no room (flow-control window or send buffer full).
    ClientNotReading,
    /// The target socket's send buffer is full.
    TargetBusy,
    /// For a stream with no flow: not yet answered (held too long or too many held), already
    /// closed, or refused.
    NoFlow,
    /// An HTTP Datagram too short to carry a context ID.
    Malformed,
    /// Over the flow's datagram rate (`limits.datagrams_per_second`).
    RateLimit,
    /// A socket's backlog of received datagrams held its share of the worker's receive buffer
    /// pool: the consumer is behind, and the datagram was dropped rather than take the
    /// buffers other sockets need.
    NoBuffer,
    /// The kernel dropped it: the socket's receive buffer was full (reported by
    /// `SO_RXQ_OVFL` with the next datagram the socket delivers).
    SocketBufferFull,
    /// From a source that is no flow's target: a third host sending to an egress socket, or a
    /// late reply to a flow that has closed.
    UnknownSource,
    /// Longer than the worker's receive buffers (`io.target_buffer_size`): cut short by the
    /// kernel, so dropped rather than relayed incomplete.
    Truncated,
}

impl DropReason {
    /// All reasons, for metric label enumeration.
    pub const ALL: [DropReason; 11] = [
        DropReason::UnknownContext,
        DropReason::TooLarge,
        DropReason::ClientNotReading,
        DropReason::TargetBusy,
        DropReason::NoFlow,
        DropReason::Malformed,
        DropReason::RateLimit,
        DropReason::NoBuffer,
        DropReason::SocketBufferFull,
        DropReason::UnknownSource,
        DropReason::Truncated,
    ];

    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownContext => "unknown_context",
            DropReason::TooLarge => "too_large",
            DropReason::ClientNotReading => "client_not_reading",
            DropReason::TargetBusy => "target_busy",
            DropReason::NoFlow => "no_flow",
            DropReason::Malformed => "malformed",
            DropReason::RateLimit => "rate_limit",
            DropReason::NoBuffer => "buffer_pool_empty",
            DropReason::SocketBufferFull => "socket_buffer_full",
            DropReason::UnknownSource => "unknown_source",
            DropReason::Truncated => "truncated_receive",
        }
    }
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client finished its side of the stream (END_STREAM / FIN).
    ClientEnd,
    /// The client reset the stream or the connection went away.
    ClientAbort,
    /// The client broke the capsule protocol; the relay aborted the stream.
    ClientProtocolError,
    /// No datagram in either direction for the idle timeout.
    Idle,
    /// The target socket reported an error (ICMP unreachable and the like).
    TargetError,
    /// The relay drained and stopped while the flow was open.
    Drain,
}

impl CloseReason {
    /// All reasons, for metric label enumeration.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::ClientEnd,
        CloseReason::ClientAbort,
        CloseReason::ClientProtocolError,
        CloseReason::Idle,
        CloseReason::TargetError,
        CloseReason::Drain,
    ];

    /// Label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientEnd => "client_end",
            CloseReason::ClientAbort => "client_abort",
            CloseReason::ClientProtocolError => "client_protocol_error",
            CloseReason::Idle => "idle",
            CloseReason::TargetError => "target_error",
            CloseReason::Drain => "drain",
        }
    }
}

/// Per-flow counters, reported when the flow closes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FlowCounters {
    pub to_target_datagrams: u64,
    pub to_target_bytes: u64,
    pub to_client_datagrams: u64,
    pub to_client_bytes: u64,
    pub dropped: u64,
}

/// One direction's token bucket of a flow's datagram rate limit: the rate and burst are the
/// flow's, time is milliseconds since the flow opened (8 bytes, where a general
/// [`crate::relay::limits::TokenBucket`] takes 32; a flow has two and there may be 100 000
/// flows).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    /// When the bucket was last filled, in ms since the flow opened (wrapping after 49 days:
    /// the bucket is then full either way).
    last_ms: u32,
}

impl Bucket {
    fn take(&mut self, now_ms: u64, rate: u32, burst: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let now = now_ms as u32;
        let elapsed = now.wrapping_sub(self.last_ms);
        self.last_ms = now;
        self.tokens = (self.tokens + elapsed as f32 * rate as f32 / 1000.0).min(burst as f32);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The state of one flow.
#[derive(Debug)]
pub struct Flow {
    opened: Instant,
    last_activity: Instant,
    idle_ms: u32,
    max_udp_payload: u32,
    counters: FlowCounters,
    /// Datagram rate limit of each direction: datagrams per second (0: unlimited), burst.
    rate: u32,
    burst: u32,
    to_target_rate: Bucket,
    to_client_rate: Bucket,
}

impl Flow {
    /// A flow opened at `now`.
    pub fn new(now: Instant, idle_timeout: Duration, max_udp_payload: usize) -> Self {
        Self {
            opened: now,
            last_activity: now,
            // Idle timeouts are whole milliseconds, up to 49 days.
            idle_ms: u32::try_from(idle_timeout.as_millis()).unwrap_or(u32::MAX),
            // MAX_UDP_PAYLOAD (65 527) fits in 32 bits.
            max_udp_payload: max_udp_payload.min(MAX_UDP_PAYLOAD) as u32,
            counters: FlowCounters::default(),
            rate: 0,
            burst: 1,
            to_target_rate: Bucket {
                tokens: 1.0,
                last_ms: 0,
            },
            to_client_rate: Bucket {
                tokens: 1.0,
                last_ms: 0,
            },
        }
    }

    /// Limits each direction to `per_second` datagrams (0: unlimited), with a burst of a tenth
    /// of a second's worth (at least 64); the buckets start full.
    pub fn with_rate_limit(mut self, per_second: u32, now: Instant) -> Self {
        self.rate = per_second;
        self.burst = (per_second / 10).max(64);
        let full = Bucket {
            tokens: self.burst as f32,
            last_ms: self.ms(now) as u32,
        };
        self.to_target_rate = full;
        self.to_client_rate = full;
        self
    }

    /// Milliseconds since the flow opened.
    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.opened).as_millis() as u64
    }

    /// Decides what to do with an HTTP Datagram from the client.
    pub fn on_client_datagram(
        &mut self,
        now: Instant,
        context_id: u64,
        payload_len: u64,
    ) -> ClientDatagram {
        if context_id != 0 {
            // RFC 9298 §4: a datagram with an unknown context ID is dropped (or buffered
            // briefly), never an error. No context other than 0 is ever registered by this relay, so every other one is
            // unknown. Not activity either: it does not keep a flow alive.
            return self.drop(ClientDatagram::Drop(DropReason::UnknownContext));
        }
        if payload_len > MAX_UDP_PAYLOAD as u64 {
            // RFC 9298 §5: a context-0 payload longer than 65527 bytes (the largest UDP payload)
            // cannot be sent, and the proxy aborts the request stream.
            return ClientDatagram::Abort;
        }
        if payload_len > u64::from(self.max_udp_payload) {
            return self.drop(ClientDatagram::Drop(DropReason::TooLarge));
        }
        let ms = self.ms(now);
        if !self.to_target_rate.take(ms, self.rate, self.burst) {
            return self.drop(ClientDatagram::Drop(DropReason::RateLimit));
        }
        self.last_activity = now;
        self.counters.to_target_datagrams += 1;
        self.counters.to_target_bytes += payload_len;
        ClientDatagram::Forward
    }

    /// Records a datagram from the target; `Err` with the reason when it must be dropped.
    pub fn on_target_datagram(
        &mut self,
        now: Instant,
        payload_len: usize,
    ) -> Result<(), DropReason> {
        if payload_len > self.max_udp_payload as usize {
            self.counters.dropped += 1;
            return Err(DropReason::TooLarge);
        }
        let ms = self.ms(now);
        if !self.to_client_rate.take(ms, self.rate, self.burst) {
            self.counters.dropped += 1;
            return Err(DropReason::RateLimit);
        }
        self.last_activity = now;
        Ok(())
    }

    /// The target datagram reached the client's side of the tunnel.
    pub fn on_sent_to_client(&mut self, payload_len: usize) {
        self.counters.to_client_datagrams += 1;
        self.counters.to_client_bytes += payload_len as u64;
    }

    /// A datagram that had been forwarded was dropped afterwards (by the socket or the client
    /// side); moves it from the delivered counts to the dropped count.
    pub fn on_dropped(&mut self) {
        self.counters.dropped += 1;
    }

    /// A datagram forwarded to the target could not be sent after all.
    pub fn on_target_send_failed(&mut self, payload_len: usize) {
        self.counters.to_target_datagrams -= 1;
        self.counters.to_target_bytes -= payload_len as u64;
        self.counters.dropped += 1;
    }

    fn drop(&mut self, d: ClientDatagram) -> ClientDatagram {
        self.counters.dropped += 1;
        d
    }

    /// When the flow must be looked at again: the idle deadline.
    pub fn poll_timeout(&self) -> Instant {
        self.last_activity + Duration::from_millis(u64::from(self.idle_ms))
    }

    /// Called when the timer fires; returns `Some(Idle)` once the flow has really been idle.
    pub fn handle_timeout(&self, now: Instant) -> Option<CloseReason> {
        (now >= self.poll_timeout()).then_some(CloseReason::Idle)
    }

    pub fn counters(&self) -> FlowCounters {
        self.counters
    }

    /// How long the flow has been open.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(now: Instant) -> Flow {
        Flow::new(now, Duration::from_secs(120), MAX_UDP_PAYLOAD)
    }

    #[test]
    fn context_zero_is_forwarded_and_counted() {
        let t0 = Instant::now();
        let mut f = flow(t0);
        assert_eq!(f.on_client_datagram(t0, 0, 1200), ClientDatagram::Forward);
        assert_eq!(f.on_client_datagram(t0, 0, 0), ClientDatagram::Forward);
        assert_eq!(f.counters().to_target_datagrams, 2);
        assert_eq!(f.counters().to_target_bytes, 1200);
    }

    #[test]
    fn unknown_context_is_dropped_not_fatal() {
        let t0 = Instant::now();
        let mut f = flow(t0);
        for ctx in [1, 2, 3, 0x3fff_ffff_ffff_ffff] {
            assert_eq!(
                f.on_client_datagram(t0, ctx, 10),
                ClientDatagram::Drop(DropReason::UnknownContext)
            );
        }
        assert_eq!(f.counters().dropped, 4);
        assert_eq!(f.counters().to_target_datagrams, 0);
    }

    #[test]
    fn oversize_context_zero_aborts() {
        let t0 = Instant::now();
        let mut f = flow(t0);
        assert_eq!(f.on_client_datagram(t0, 0, 65_527), ClientDatagram::Forward);
        assert_eq!(f.on_client_datagram(t0, 0, 65_528), ClientDatagram::Abort);
        assert_eq!(f.on_client_datagram(t0, 0, u64::MAX), ClientDatagram::Abort);
    }

    #[test]
    fn configured_limit_drops_instead_of_aborting() {
        let t0 = Instant::now();
        let mut f = Flow::new(t0, Duration::from_secs(120), 1500);
        assert_eq!(f.on_client_datagram(t0, 0, 1500), ClientDatagram::Forward);
        assert_eq!(
            f.on_client_datagram(t0, 0, 1501),
            ClientDatagram::Drop(DropReason::TooLarge)
        );
        assert_eq!(f.on_target_datagram(t0, 1500), Ok(()));
        assert_eq!(f.on_target_datagram(t0, 1501), Err(DropReason::TooLarge));
    }

    #[test]
    fn idle_timer_moves_with_traffic_in_either_direction() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(120);
        let mut f = flow(t0);
        assert_eq!(f.poll_timeout(), t0 + idle);
        assert_eq!(f.handle_timeout(t0 + idle - Duration::from_millis(1)), None);

        let t1 = t0 + Duration::from_secs(100);
        f.on_client_datagram(t1, 0, 1);
        assert_eq!(f.poll_timeout(), t1 + idle);
        assert_eq!(
            f.handle_timeout(t0 + idle),
            None,
            "client traffic resets the timer"
        );

        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(f.on_target_datagram(t2, 1), Ok(()));
        assert_eq!(
            f.handle_timeout(t1 + idle),
            None,
            "target traffic resets it too"
        );
        assert_eq!(f.handle_timeout(t2 + idle), Some(CloseReason::Idle));
    }

    #[test]
    fn rate_limit_drops_beyond_the_burst_in_each_direction() {
        let t0 = Instant::now();
        let mut f = flow(t0).with_rate_limit(1000, t0);
        let fwd = (0..200)
            .filter(|_| f.on_client_datagram(t0, 0, 10) == ClientDatagram::Forward)
            .count();
        assert_eq!(fwd, 100, "burst of a tenth of a second");
        let back = (0..200)
            .filter(|_| f.on_target_datagram(t0, 10).is_ok())
            .count();
        assert_eq!(back, 100);
        // The bucket refills at the rate: 10 more after 10 ms, and a second later it is
        // full again (the burst, no more).
        let t1 = t0 + Duration::from_millis(10);
        let refill = (0..200)
            .filter(|_| f.on_client_datagram(t1, 0, 10) == ClientDatagram::Forward)
            .count();
        assert_eq!(refill, 10);
        let t2 = t1 + Duration::from_secs(1);
        let full = (0..200)
            .filter(|_| f.on_client_datagram(t2, 0, 10) == ClientDatagram::Forward)
            .count();
        assert_eq!(full, 100);
        // Unlimited flows take every datagram.
        let mut u = flow(t0);
        assert!((0..10_000).all(|_| u.on_client_datagram(t0, 0, 1) == ClientDatagram::Forward));
    }

    /// A flow's state is most of a flow's memory, and there may be 100 000 of them.
    #[test]
    fn a_flow_stays_small() {
        assert!(
            std::mem::size_of::<Flow>() <= 104,
            "{}",
            std::mem::size_of::<Flow>()
        );
    }

    #[test]
    fn dropped_datagrams_do_not_keep_a_flow_alive() {
        let t0 = Instant::now();
        let mut f = flow(t0);
        f.on_client_datagram(t0 + Duration::from_secs(119), 7, 1);
        assert_eq!(
            f.handle_timeout(t0 + Duration::from_secs(120)),
            Some(CloseReason::Idle)
        );
    }
}
