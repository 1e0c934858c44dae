//! The one admission pipeline: every CONNECT-UDP request, on any HTTP version, is decided here,
//! by a pure function of the request, the connection's admission state, the live
//! configuration, the relay's phase and the time. What comes out is either the target to open
//! with the flow's permit, or a [`Rejection`] that says everything the response carries
//! (status, `Proxy-Status`, `Allow`, `Proxy-Authenticate`: [`Rejection::header_fields`]).
//!
//! The order is the same everywhere:
//!
//! 1. the relay is draining: 503;
//! 2. authentication (`auth.credentials_file`, or the mTLS identity): 407 before anything
//!    about the request is looked at;
//! 3. the request itself (RFC 9298 §3 and the URI template): 400, 404, 405, 501;
//! 4. limits, only for requests that could otherwise open a flow: flows per connection and new
//!    flows per second (429), memory pressure (503), flows per identity (429) and in total
//!    (503).
//!
//! Resolution, the target policy and the egress socket come after admission (they may wait
//! on DNS); their refusals are [`Rejection`]s too, answered and recorded the same way.

use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::config::Checked;
use crate::ctx::{Phase, Shared};
use crate::proto::connect_udp::{check_request, Rejection, RequestHead};
use crate::proto::sf::ProxyError;
use crate::proto::target::Target;
use crate::relay::auth::AuthError;
use crate::relay::limits::{FlowPermit, LimitError, TokenBucket};

/// One client connection's admission state: the flows it holds and its new-flow rate. Owned by
/// whoever owns the connection's state (the worker's pass); flows give their slot back with
/// [`ConnAdmission::flow_closed`].
#[derive(Debug)]
pub struct ConnAdmission {
    flows: usize,
    max_flows: usize,
    new_flows: TokenBucket,
    /// The identity the TLS handshake proved (mTLS), if any.
    pub tls_identity: Option<String>,
}

impl ConnAdmission {
    pub fn new(config: &Checked, tls_identity: Option<String>, now: Instant) -> Self {
        let l = &config.limits;
        let rate = l.new_flows_per_second;
        Self {
            flows: 0,
            max_flows: l.max_flows_per_connection,
            new_flows: TokenBucket::new(rate, rate.saturating_mul(2), now),
            tls_identity,
        }
    }

    /// A flow admitted on this connection ended.
    pub fn flow_closed(&mut self) {
        self.flows = self.flows.saturating_sub(1);
    }

    /// Flows admitted and not yet closed.
    pub fn flows(&self) -> usize {
        self.flows
    }
}

/// An admitted request: the target to open and the flow's slot in the relay-wide caps.
#[derive(Debug)]
pub struct Admitted {
    pub target: Target,
    pub permit: FlowPermit,
}

/// Decides a request. On success the connection counts one more flow (give it back with
/// [`ConnAdmission::flow_closed`] if the flow does not open after all).
pub fn admit(
    head: &RequestHead<'_>,
    proxy_authorization: Option<&[u8]>,
    shared: &Shared,
    phase: Phase,
    conn: &mut ConnAdmission,
    now: Instant,
) -> Result<Admitted, Rejection> {
    if phase != Phase::Run {
        // RFC 9110 §15.6.4: a request that raced the drain.
        return Err(Rejection::new(503, None, "relay is draining"));
    }
    let identity = match &shared.credentials {
        Some(store) => match store.check(proxy_authorization) {
            Ok(id) => Some(id.0),
            Err(e) => {
                let why = match e {
                    AuthError::Missing => "proxy authentication required",
                    AuthError::Malformed => "malformed Proxy-Authorization",
                    AuthError::Invalid => "invalid credentials",
                };
                return Err(Rejection::new(
                    407,
                    Some(ProxyError::HttpRequestDenied),
                    why,
                ));
            }
        },
        None => conn.tls_identity.clone(),
    };
    let target = check_request(head, &shared.config.uri_template)?;
    let limited = |why: &str| Rejection::new(429, Some(ProxyError::ConnectionLimitReached), why);
    if conn.flows >= conn.max_flows {
        return Err(limited("too many flows on this connection"));
    }
    if !conn.new_flows.try_take(now) {
        return Err(limited("new flows too fast on this connection"));
    }
    if shared.memory_pressure.load(Ordering::Relaxed) {
        return Err(Rejection::new(
            503,
            Some(ProxyError::ProxyInternalError),
            "memory pressure: no new flows for now",
        ));
    }
    let permit = shared
        .limiter
        .acquire(identity.as_deref())
        .map_err(|e| match e {
            LimitError::Identity => limited("too many flows for this identity"),
            LimitError::Total => Rejection::new(
                503,
                Some(ProxyError::ConnectionLimitReached),
                "relay flow limit reached",
            ),
        })?;
    conn.flows += 1;
    Ok(Admitted { target, permit })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::proto::connect_udp::HttpVersion;

    fn shared(f: impl FnOnce(&mut Config)) -> Shared {
        let mut c = Config::default();
        f(&mut c);
        let config = c.validate().unwrap();
        crate::live_state(
            config,
            None,
            Arc::new(crate::io::resolve::SystemResolver),
            crate::relay::limits::FlowLimiter::new(3, 2),
            Default::default(),
        )
        .unwrap()
        .0
    }

    fn head(
        version: HttpVersion,
        method: &'static str,
        path: &'static str,
    ) -> RequestHead<'static> {
        RequestHead {
            version,
            method,
            protocol: Some("connect-udp"),
            scheme: Some("https"),
            authority: Some("relay.example"),
            path: Some(path),
            capsule_protocol: Some(b"?1"),
        }
    }

    const OK: &str = "/.well-known/masque/udp/192.0.2.6/443/";

    #[test]
    fn the_order_is_drain_auth_request_limits() {
        let s = shared(|_| {});
        let now = Instant::now();
        let mut conn = ConnAdmission::new(&s.config, None, now);
        let h = head(HttpVersion::Http3, "CONNECT", OK);
        // Draining wins over everything, even a bad method.
        let bad = head(HttpVersion::Http3, "GET", OK);
        assert_eq!(
            admit(&bad, None, &s, Phase::Drain, &mut conn, now)
                .unwrap_err()
                .status,
            503
        );
        assert_eq!(conn.flows(), 0);
        // A bad request is refused without taking a slot or a rate token.
        for _ in 0..10 {
            let r = admit(&bad, None, &s, Phase::Run, &mut conn, now).unwrap_err();
            assert_eq!(r.status, 405);
        }
        let a = admit(&h, None, &s, Phase::Run, &mut conn, now).unwrap();
        assert_eq!(a.target.port, 443);
        assert_eq!(conn.flows(), 1);
        // The relay-wide cap (3 here) is a 503; its permits come back when dropped.
        let b = admit(&h, None, &s, Phase::Run, &mut conn, now).unwrap();
        let c = admit(&h, None, &s, Phase::Run, &mut conn, now).unwrap();
        let r = admit(&h, None, &s, Phase::Run, &mut conn, now).unwrap_err();
        assert_eq!(r.status, 503);
        assert_eq!(r.proxy_error, Some(ProxyError::ConnectionLimitReached));
        drop((a, b, c));
        conn.flow_closed();
        assert!(admit(&h, None, &s, Phase::Run, &mut conn, now).is_ok());
    }

    #[test]
    fn credentials_are_checked_before_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        let line = crate::relay::auth::token_line("ci", "s3cret-token-of-some-length");
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let s = shared(|c| c.auth.credentials_file = Some(path.clone()));
        let now = Instant::now();
        let mut conn = ConnAdmission::new(&s.config, None, now);
        // A malformed request without credentials: 407 first (nothing about it is revealed).
        let bad = head(HttpVersion::Http2, "GET", "/nope");
        let r = admit(&bad, None, &s, Phase::Run, &mut conn, now).unwrap_err();
        assert_eq!(r.status, 407);
        assert!(r
            .header_fields(HttpVersion::Http2, "Bearer")
            .iter()
            .any(|(n, _)| *n == "proxy-authenticate"));
        let good = head(HttpVersion::Http2, "CONNECT", OK);
        let auth = b"Bearer s3cret-token-of-some-length";
        assert!(admit(&good, Some(auth), &s, Phase::Run, &mut conn, now).is_ok());
        let r = admit(&bad, Some(auth), &s, Phase::Run, &mut conn, now).unwrap_err();
        assert_eq!(r.status, 405);
        assert!(r
            .header_fields(HttpVersion::Http2, "")
            .contains(&("allow", "CONNECT".to_owned())));
    }

    #[test]
    fn flows_per_connection_and_new_flow_rate() {
        let s = shared(|c| {
            c.limits.max_flows_per_connection = 2;
            c.limits.new_flows_per_second = 1;
            c.limits.max_flows = 0;
            c.limits.max_flows_per_identity = 0;
        });
        let t0 = Instant::now();
        let mut conn = ConnAdmission::new(&s.config, None, t0);
        let h = head(HttpVersion::Http11, "GET", OK);
        let h = RequestHead {
            protocol: Some("connect-udp"),
            ..h
        };
        let _a = admit(&h, None, &s, Phase::Run, &mut conn, t0).unwrap();
        let _b = admit(&h, None, &s, Phase::Run, &mut conn, t0).unwrap();
        // Two slots taken: the third is refused for the slots (not the rate).
        let r = admit(&h, None, &s, Phase::Run, &mut conn, t0).unwrap_err();
        assert_eq!(
            (r.status, r.details.as_str()),
            (429, "too many flows on this connection")
        );
        conn.flow_closed();
        // A slot again, but the bucket (burst 2) is empty until a second has passed.
        let r = admit(&h, None, &s, Phase::Run, &mut conn, t0).unwrap_err();
        assert_eq!(r.details, "new flows too fast on this connection");
        let t1 = t0 + Duration::from_millis(1100);
        assert!(admit(&h, None, &s, Phase::Run, &mut conn, t1).is_ok());
    }
}
