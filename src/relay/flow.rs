//! One flow's state machine: what to do with each datagram, when the flow has gone idle, and why
//! it ended. No I/O and no clock: the caller passes `now` and acts on the returned decisions, so
//! every rule here is tested with virtual time.
//!
//! The transports (HTTP/3, HTTP/2, HTTP/1.1) share this type, which is how they share the
//! rules of RFC 9298 §4-§5 for the payload and the idle timeout of §3.1.

use std::time::{Duration, Instant};

use crate::proto::capsule::MAX_UDP_PAYLOAD;
use crate::relay::limits::TokenBucket;

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

/// The state of one flow.
#[derive(Debug)]
pub struct Flow {
    idle_timeout: Duration,
    max_udp_payload: u32,
    last_activity: Instant,
    opened: Instant,
    counters: FlowCounters,
    /// Datagram rate limits, client to target and target to client.
    to_target_rate: TokenBucket,
    to_client_rate: TokenBucket,
}

impl Flow {
    /// A flow opened at `now`.
    pub fn new(now: Instant, idle_timeout: Duration, max_udp_payload: usize) -> Self {
        Self {
            idle_timeout,
            // MAX_UDP_PAYLOAD (65 527) fits in 32 bits.
            max_udp_payload: max_udp_payload.min(MAX_UDP_PAYLOAD) as u32,
            last_activity: now,
            opened: now,
            counters: FlowCounters::default(),
            to_target_rate: TokenBucket::new(0, 1, now),
            to_client_rate: TokenBucket::new(0, 1, now),
        }
    }

    /// Limits each direction to `per_second` datagrams (0: unlimited), with a burst of a tenth
    /// of a second's worth (at least 64).
    pub fn with_rate_limit(mut self, per_second: u32, now: Instant) -> Self {
        let burst = (per_second / 10).max(64);
        self.to_target_rate = TokenBucket::new(per_second, burst, now);
        self.to_client_rate = TokenBucket::new(per_second, burst, now);
        self
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
        if !self.to_target_rate.try_take(now) {
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
        if !self.to_client_rate.try_take(now) {
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
        self.last_activity + self.idle_timeout
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
        // A second later the buckets are full again.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(f.on_client_datagram(t1, 0, 10), ClientDatagram::Forward);
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
