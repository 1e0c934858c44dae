//! Admission of a CONNECT-UDP request, the same for every HTTP version: authentication first
//! (407 before anything else happens), then the flow caps and rates (429 / 503). What comes out
//! is a ticket the flow holds for its whole life; dropping it gives every slot back.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use crate::ctx::Shared;
use crate::proto::connect_udp::Rejection;
use crate::proto::sf::ProxyError;
use crate::relay::auth::AuthError;
use crate::relay::limits::{FlowPermit, LimitError, TokenBucket};

/// Per-connection admission state (one connection lives on one worker thread).
#[derive(Debug)]
pub(crate) struct ConnLimits {
    flows: Cell<usize>,
    max_flows: usize,
    new_flows: RefCell<TokenBucket>,
    /// The identity the TLS handshake proved (mTLS), if any.
    pub tls_identity: Option<String>,
}

impl ConnLimits {
    pub fn new(shared: &Shared, tls_identity: Option<String>) -> Rc<Self> {
        let l = &shared.config.limits;
        let rate = l.new_flows_per_second;
        Rc::new(Self {
            flows: Cell::new(0),
            max_flows: l.max_flows_per_connection,
            new_flows: RefCell::new(TokenBucket::new(
                rate,
                rate.saturating_mul(2),
                Instant::now(),
            )),
            tls_identity,
        })
    }
}

/// What an admitted flow holds.
#[derive(Debug)]
pub(crate) struct Ticket {
    _permit: FlowPermit,
    conn: Rc<ConnLimits>,
    /// Who the flow belongs to, for logs.
    pub identity: Option<String>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.conn.flows.set(self.conn.flows.get().saturating_sub(1));
    }
}

/// Is this request allowed to open a flow? `proxy_authorization` is the header value.
pub(crate) fn admit(
    shared: &Shared,
    conn: &Rc<ConnLimits>,
    proxy_authorization: Option<&[u8]>,
) -> Result<Ticket, Rejection> {
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
    if conn.flows.get() >= conn.max_flows {
        return Err(Rejection::new(
            429,
            Some(ProxyError::ConnectionLimitReached),
            "too many flows on this connection",
        ));
    }
    if !conn.new_flows.borrow_mut().try_take(Instant::now()) {
        return Err(Rejection::new(
            429,
            Some(ProxyError::ConnectionLimitReached),
            "new flows too fast on this connection",
        ));
    }
    if shared
        .memory_pressure
        .load(std::sync::atomic::Ordering::Relaxed)
    {
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
            LimitError::Identity => Rejection::new(
                429,
                Some(ProxyError::ConnectionLimitReached),
                "too many flows for this identity",
            ),
            LimitError::Total => Rejection::new(
                503,
                Some(ProxyError::ConnectionLimitReached),
                "relay flow limit reached",
            ),
        })?;
    conn.flows.set(conn.flows.get() + 1);
    Ok(Ticket {
        _permit: permit,
        conn: conn.clone(),
        identity,
    })
}
