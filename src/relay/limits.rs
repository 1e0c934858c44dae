//! Limits that keep one client (or all of them) from taking the relay down: flow caps in total
//! and per identity, and token buckets for new flows per connection and datagrams per flow.
//!
//! No I/O and no clock: buckets take `now`. The flow caps are shared by all workers, so they are
//! atomics and a mutex, touched only when a flow opens or closes, never per datagram.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u32,
    burst: u32,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A `rate` of 0 means unlimited.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = burst.max(1);
        Self {
            rate,
            burst,
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.rate)).min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Which flow cap was hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The relay as a whole is at its flow cap: 503.
    #[error("relay flow limit reached")]
    Total,
    /// This identity is at its flow cap: 429.
    #[error("flow limit for this identity reached")]
    Identity,
}

/// Flow caps shared by all workers.
#[derive(Debug)]
pub struct FlowLimiter {
    open: AtomicUsize,
    max_total: AtomicUsize,
    max_per_identity: AtomicUsize,
    per_identity: Mutex<HashMap<Arc<str>, usize>>,
}

impl FlowLimiter {
    /// Caps of 0 mean unlimited.
    pub fn new(max_total: usize, max_per_identity: usize) -> Arc<Self> {
        let l = Arc::new(Self {
            open: AtomicUsize::new(0),
            max_total: AtomicUsize::new(0),
            max_per_identity: AtomicUsize::new(0),
            per_identity: Mutex::new(HashMap::new()),
        });
        l.set_caps(max_total, max_per_identity);
        l
    }

    /// Changes the caps (a reload); flows over a lowered cap are not closed, new ones wait.
    pub fn set_caps(&self, max_total: usize, max_per_identity: usize) {
        let unlimited = |v: usize| if v == 0 { usize::MAX } else { v };
        self.max_total
            .store(unlimited(max_total), Ordering::Release);
        self.max_per_identity
            .store(unlimited(max_per_identity), Ordering::Release);
    }

    /// Takes a flow slot for `identity` (None: unauthenticated); the permit gives it back.
    pub fn acquire(self: &Arc<Self>, identity: Option<&str>) -> Result<FlowPermit, LimitError> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_total.load(Ordering::Acquire) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(LimitError::Total);
        }
        let mut held = None;
        if let Some(id) = identity {
            let mut map = self.per_identity.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.get(id).copied().unwrap_or(0);
            if n >= self.max_per_identity.load(Ordering::Acquire) {
                drop(map);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(LimitError::Identity);
            }
            // The identity's flows share one copy of its name.
            let key = match map.get_key_value(id) {
                Some((k, _)) => k.clone(),
                None => Arc::from(id),
            };
            map.insert(key.clone(), n + 1);
            held = Some(key);
        }
        Ok(FlowPermit {
            limiter: self.clone(),
            identity: held,
        })
    }

    /// Flows holding a permit now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A held flow slot; dropping it frees the slot.
#[derive(Debug)]
pub struct FlowPermit {
    limiter: Arc<FlowLimiter>,
    identity: Option<Arc<str>>,
}

impl FlowPermit {
    /// The identity the flow was admitted for, if authenticated.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }
}

impl Drop for FlowPermit {
    fn drop(&mut self) {
        if let Some(id) = self.identity.take() {
            let mut map = self
                .limiter
                .per_identity
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&*id) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&*id);
                }
            }
        }
        self.limiter.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.try_take(t0)).count(), 5);
        // 100 ms at 10/s refills one token.
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..8).filter(|_| b.try_take(later)).count(), 5);
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 1, t0);
        assert!((0..10_000).all(|_| b.try_take(t0)));
    }

    #[test]
    fn flow_caps_total_and_per_identity() {
        let l = FlowLimiter::new(3, 2);
        let a1 = l.acquire(Some("a")).unwrap();
        let _a2 = l.acquire(Some("a")).unwrap();
        assert_eq!(l.acquire(Some("a")).unwrap_err(), LimitError::Identity);
        let _b = l.acquire(Some("b")).unwrap();
        assert_eq!(l.acquire(None).unwrap_err(), LimitError::Total);
        assert_eq!(l.open(), 3);
        drop(a1);
        assert_eq!(l.open(), 2);
        let _a3 = l.acquire(Some("a")).unwrap();
        assert_eq!(l.open(), 3);
    }

    #[test]
    fn permits_free_their_identity_entry() {
        let l = FlowLimiter::new(0, 1);
        for _ in 0..100 {
            let p = l.acquire(Some("x")).unwrap();
            drop(p);
        }
        assert_eq!(l.open(), 0);
        assert!(l.per_identity.lock().unwrap().is_empty());
    }
}
