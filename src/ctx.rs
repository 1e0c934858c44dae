//! What every part of a worker sees: the live configuration and everything built from it
//! ([`Shared`], replaced as a whole on reload), the relay's life cycle ([`Phase`]) and the
//! worker's own handle on both ([`WorkerCtx`]). A leaf: it names no transport or worker code,
//! so those can all depend on it without depending on each other.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::Checked;
use crate::io::resolve::Resolve;
use crate::metrics::WorkerStats;
use crate::relay::policy::TargetPolicy;

/// State shared by all workers, replaced as a whole on reload.
#[derive(Debug)]
pub struct Shared {
    pub config: Checked,
    pub policy: TargetPolicy,
    pub tls: Arc<rustls::ServerConfig>,
    /// The QUIC server configuration (certificate, transport limits), when HTTP/3 is on.
    pub quic: Option<Arc<quinn_proto::ServerConfig>>,
    pub resolver: Arc<dyn Resolve>,
    /// Accepted credentials, when `auth.credentials_file` is set.
    pub credentials: Option<Arc<crate::relay::auth::CredentialStore>>,
    /// Flow caps shared by all workers (kept across reloads, which only change the caps).
    pub limiter: Arc<crate::relay::limits::FlowLimiter>,
    /// Set while the memory cgroup is above `limits.memory_high_percent` of its limit.
    pub memory_pressure: Arc<std::sync::atomic::AtomicBool>,
}

/// The relay's life cycle, as the workers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting connections and requests.
    Run,
    /// Graceful drain: listeners closed, GOAWAY sent, new requests refused, established flows
    /// go on relaying.
    Drain,
    /// Everything ends now.
    Stop,
}

/// What one worker's tasks have at hand.
#[derive(Debug, Clone)]
pub struct WorkerCtx {
    pub id: usize,
    /// The live shared state; see [`WorkerCtx::shared`].
    pub live: watch::Receiver<Arc<Shared>>,
    pub stats: Arc<WorkerStats>,
    /// Run, drain or stop.
    pub phase: watch::Receiver<Phase>,
}

impl WorkerCtx {
    /// The shared state in force now. Callers keep the `Arc` for the life of what they start,
    /// so a reload applies to new connections and flows only.
    pub fn shared(&self) -> Arc<Shared> {
        self.live.borrow().clone()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// True once the relay drains or stops: new requests are refused.
    pub fn refusing(&self) -> bool {
        self.phase() != Phase::Run
    }
}

/// Waits until `phase` reaches at least `at` (or its sender is gone, which means stop).
pub async fn reached(phase: &mut watch::Receiver<Phase>, at: Phase) {
    let rank = |p: Phase| match p {
        Phase::Run => 0,
        Phase::Drain => 1,
        Phase::Stop => 2,
    };
    let _ = phase.wait_for(|p| rank(*p) >= rank(at)).await;
}
